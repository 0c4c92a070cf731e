//! Detached signatures over exact bytes, and the k-of-n threshold rule.
//!
//! Bundles (`signatures.json` over `manifest.json`) and rotated trust files
//! (their `signatures` over their `signed` object) use the same rule: count
//! the distinct trusted keys whose signature verifies over the exact bytes;
//! accept when the count reaches the threshold. A key counts once however many
//! signatures it has; signatures by keys the trust does not list are ignored
//! unless the threshold is missed, when they are named in the error.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::keys::{KeyId, PublicKey, RawSignature};

/// One signature: which key, and the 64 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureEntry {
    /// The signing key's id.
    pub key_id: KeyId,
    /// The Ed25519 signature, base64.
    pub sig: RawSignature,
}

/// A document signed over the exact bytes of its `signed` object, as trust
/// files and release policies are: `{"signed": {…}, "signatures": [{…}]}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedDocument {
    /// The exact bytes of `signed`: what the signatures cover.
    pub signed_bytes: Vec<u8>,
    /// The signatures as listed.
    pub signatures: Vec<SignatureEntry>,
}

#[derive(Deserialize)]
struct RawDocument<'a> {
    #[serde(borrow)]
    signed: &'a serde_json::value::RawValue,
    #[serde(default)]
    signatures: Vec<SignatureEntry>,
}

impl SignedDocument {
    /// Splits `bytes` into the signed bytes and the signatures; the error is
    /// the path of the fault and what was wrong.
    pub fn split(bytes: &[u8]) -> Result<SignedDocument, (String, String)> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let document: RawDocument<'_> = serde_path_to_error::deserialize(&mut de)
            .map_err(|err| (err.path().to_string(), err.into_inner().to_string()))?;
        de.end().map_err(|err| (".".to_owned(), err.to_string()))?;
        Ok(SignedDocument {
            signed_bytes: document.signed.get().as_bytes().to_vec(),
            signatures: document.signatures,
        })
    }

    /// The document's bytes: `signed` exactly as given, then the signatures.
    pub fn join(signed_bytes: &[u8], signatures: &[SignatureEntry]) -> Vec<u8> {
        let signed = std::str::from_utf8(signed_bytes).expect("signed bytes are JSON text");
        let signatures = serde_json::to_string_pretty(signatures).expect("signatures serialise");
        format!("{{\n\"signed\": {signed},\n\"signatures\": {signatures}\n}}\n").into_bytes()
    }
}

/// Too few valid signatures, with the most useful reason first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// A trusted key's signature does not verify: the signed bytes changed
    /// after signing, or the signature is corrupt.
    #[error(
        "the signature by trusted key {key_id} does not match the {document}: the {document} \
         was changed after it was signed, or the signature is corrupt; get the release again \
         from its publisher"
    )]
    Invalid {
        /// What was signed ("manifest", "trust file").
        document: &'static str,
        /// The key whose signature failed.
        key_id: KeyId,
    },
    /// One key signed several times, which would have reached the threshold
    /// had each signature counted.
    #[error(
        "key {key_id} signed the {document} {count} times, but each key counts once: \
         {valid} of {threshold} required signatures by distinct trusted keys"
    )]
    Repeated {
        /// What was signed.
        document: &'static str,
        /// The repeated key.
        key_id: KeyId,
        /// How many signatures it has.
        count: usize,
        /// Distinct trusted keys with valid signatures.
        valid: usize,
        /// Signatures needed.
        threshold: usize,
    },
    /// Signed by keys the trust file does not list.
    #[error(
        "the {document} is signed by key {} that the trust file does not list: {valid} of \
         {threshold} required signatures by trusted keys; sign with a trusted key, or rotate \
         the trust file to include this one",
        join(unknown)
    )]
    UnknownKey {
        /// What was signed.
        document: &'static str,
        /// The unknown keys.
        unknown: Vec<KeyId>,
        /// Distinct trusted keys with valid signatures.
        valid: usize,
        /// Signatures needed.
        threshold: usize,
    },
    /// Only good signatures, but not enough of them.
    #[error(
        "the {document} has {} valid signature(s) by trusted keys ({}), {threshold} required; \
         {}",
        valid.len(), if valid.is_empty() { "none".to_owned() } else { join(valid) }, how_to_sign(document)
    )]
    BelowThreshold {
        /// What was signed.
        document: &'static str,
        /// The trusted keys with valid signatures.
        valid: Vec<KeyId>,
        /// Signatures needed.
        threshold: usize,
    },
}

/// How to add a signature to `document`.
fn how_to_sign(document: &str) -> &'static str {
    match document {
        "policy" => {
            "add signatures with `turnout policy set … --sign-with KEY.pem` or `turnout policy sign FILE --key KEY.pem`"
        }
        "trust file" => "sign the rotation with `turnout trust rotate … --sign-with KEY.pem`",
        _ => "add signatures with `turnout sign BUNDLE --key KEY.pem`",
    }
}

fn join(ids: &[KeyId]) -> String {
    ids.iter().map(KeyId::as_str).collect::<Vec<_>>().join(", ")
}

/// Checks `signatures` over exactly `message` against `keys` and `threshold`;
/// returns the distinct trusted keys whose signatures verified.
pub fn check_threshold(
    document: &'static str,
    message: &[u8],
    signatures: &[SignatureEntry],
    keys: &BTreeMap<KeyId, PublicKey>,
    threshold: usize,
) -> Result<Vec<KeyId>, SignatureError> {
    let mut valid = BTreeSet::new();
    let mut invalid = Vec::new();
    let mut unknown = Vec::new();
    let mut counts: BTreeMap<&KeyId, usize> = BTreeMap::new();
    for entry in signatures {
        *counts.entry(&entry.key_id).or_default() += 1;
        match keys.get(&entry.key_id) {
            None => unknown.push(entry.key_id.clone()),
            Some(key) if key.verifies(message, &entry.sig) => {
                valid.insert(entry.key_id.clone());
            }
            Some(_) => invalid.push(entry.key_id.clone()),
        }
    }
    if valid.len() >= threshold {
        return Ok(valid.into_iter().collect());
    }
    if let Some(key_id) = invalid.into_iter().next() {
        return Err(SignatureError::Invalid { document, key_id });
    }
    let trusted_signatures = signatures
        .iter()
        .filter(|s| keys.contains_key(&s.key_id))
        .count();
    if trusted_signatures >= threshold {
        let (key_id, count) = counts
            .into_iter()
            .filter(|(id, _)| keys.contains_key(*id))
            .max_by_key(|(_, count)| *count)
            .expect("some trusted key signed");
        return Err(SignatureError::Repeated {
            document,
            key_id: key_id.clone(),
            count,
            valid: valid.len(),
            threshold,
        });
    }
    if !unknown.is_empty() {
        unknown.dedup();
        return Err(SignatureError::UnknownKey {
            document,
            unknown,
            valid: valid.len(),
            threshold,
        });
    }
    Err(SignatureError::BelowThreshold {
        document,
        valid: valid.into_iter().collect(),
        threshold,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;

    fn setup() -> (Vec<SecretKey>, BTreeMap<KeyId, PublicKey>) {
        let secrets: Vec<_> = (1..=3).map(|i| SecretKey::from_seed([i; 32])).collect();
        let keys = secrets[..2]
            .iter()
            .map(|s| (s.public().id().clone(), s.public()))
            .collect();
        (secrets, keys)
    }

    fn sign(key: &SecretKey, message: &[u8]) -> SignatureEntry {
        SignatureEntry {
            key_id: key.public().id().clone(),
            sig: key.sign(message),
        }
    }

    #[test]
    fn distinct_trusted_keys_reach_the_threshold() {
        let (s, keys) = setup();
        let sigs = [sign(&s[0], b"m"), sign(&s[1], b"m"), sign(&s[2], b"m")];
        let valid = check_threshold("manifest", b"m", &sigs, &keys, 2).unwrap();
        assert_eq!(
            valid.len(),
            2,
            "the unknown third key is ignored once the threshold is met"
        );
    }

    #[test]
    fn each_failure_has_its_own_reason() {
        let (s, keys) = setup();
        let err = check_threshold("manifest", b"m2", &[sign(&s[0], b"m")], &keys, 1).unwrap_err();
        assert!(matches!(err, SignatureError::Invalid { .. }), "{err}");

        let twice = [sign(&s[0], b"m"), sign(&s[0], b"m")];
        let err = check_threshold("manifest", b"m", &twice, &keys, 2).unwrap_err();
        assert!(
            matches!(
                err,
                SignatureError::Repeated {
                    count: 2,
                    valid: 1,
                    ..
                }
            ),
            "{err}"
        );

        let err = check_threshold("manifest", b"m", &[sign(&s[2], b"m")], &keys, 1).unwrap_err();
        assert!(
            matches!(err, SignatureError::UnknownKey { valid: 0, .. }),
            "{err}"
        );

        let err = check_threshold("manifest", b"m", &[sign(&s[0], b"m")], &keys, 2).unwrap_err();
        assert!(matches!(&err, SignatureError::BelowThreshold { valid, .. } if valid.len() == 1));
        assert!(err.to_string().contains("1 valid signature(s)"), "{err}");
    }
}
