//! Trust files: which release keys a host accepts, and how many must sign.
//!
//! ```json
//! {
//!   "signed": {"format": 1, "version": 2, "threshold": 2, "created": "2026-11-22T03:00:00Z",
//!              "keys": [{"id": "9f86d081884c7d65", "public_key": "-----BEGIN PUBLIC KEY-----\n…"}]},
//!   "signatures": [{"key_id": "9f86d081884c7d65", "sig": "base64…"}]
//! }
//! ```
//!
//! The first trust file a host gets is installed by the operator and needs no
//! signature. A replacement is accepted only as a *rotation*: a higher
//! `version`, signed over the exact bytes of its `signed` object by at least
//! the current threshold of current keys, and also by its own threshold of its
//! own keys (as TUF does for root rotation), which proves the new key holders
//! can sign before the old ones lose their say.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::keys::{KeyError, KeyId, PublicKey};
use crate::limits::Limits;
use crate::manifest::Timestamp;
use crate::signature::{SignatureEntry, SignatureError, SignedDocument, check_threshold};

/// The trust file format this build reads.
pub const TRUST_FORMAT: u32 = 1;

/// Why a trust file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    /// Larger than `Limits::max_trust_bytes`.
    #[error("the trust file is {size} bytes, over the limit of {limit}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Not the expected JSON shape.
    #[error("the trust file is not valid: at `{path}`: {detail}")]
    Malformed {
        /// Where.
        path: String,
        /// What was wrong.
        detail: String,
    },
    /// A format this build does not read.
    #[error(
        "the trust file has format {found}; this build reads format {TRUST_FORMAT}: upgrade it"
    )]
    Format {
        /// The file's format.
        found: u32,
    },
    /// A public key that does not parse.
    #[error("the trust file's key {id}: {source}")]
    Key {
        /// The id it was listed under.
        id: String,
        /// Why it did not parse.
        source: KeyError,
    },
    /// A key listed under an id that is not its own.
    #[error("the trust file lists a key under id {listed}, but that key's id is {actual}")]
    KeyIdMismatch {
        /// The listed id.
        listed: KeyId,
        /// The key's real id.
        actual: KeyId,
    },
    /// The same key twice.
    #[error("the trust file lists key {0} twice")]
    DuplicateKey(KeyId),
    /// A threshold no set of keys can meet, or zero.
    #[error(
        "the trust file's threshold is {threshold} with {keys} key(s); expected 1 <= threshold <= number of keys"
    )]
    Threshold {
        /// The threshold.
        threshold: usize,
        /// The number of keys.
        keys: usize,
    },
    /// More keys or signatures than the limits allow.
    #[error("the trust file has {found} {what}, over the limit of {limit}")]
    OverLimit {
        /// "keys" or "signatures".
        what: &'static str,
        /// How many.
        found: usize,
        /// The limit.
        limit: usize,
    },
    /// A rotation to a version that is not newer.
    #[error(
        "the new trust file has version {next}, but the current one is version {current}: a \
         rotation must raise the version, so an old trust file cannot be replayed"
    )]
    NotNewer {
        /// The current version.
        current: u64,
        /// The offered version.
        next: u64,
    },
    /// A rotation without enough signatures by the current keys.
    #[error("the rotation is not authorised by the current keys: {0}")]
    NotAuthorised(SignatureError),
    /// A rotation without enough signatures by its own keys.
    #[error("the new trust file is not signed by its own keys: {0}")]
    NotSelfSigned(SignatureError),
}

/// The parsed, validated content of a trust file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trust {
    version: u64,
    threshold: usize,
    created: Timestamp,
    keys: BTreeMap<KeyId, PublicKey>,
}

#[derive(Serialize, Deserialize)]
struct SignedBody {
    format: u32,
    version: u64,
    threshold: usize,
    created: Timestamp,
    keys: Vec<KeyEntry>,
}

#[derive(Serialize, Deserialize)]
struct KeyEntry {
    id: String,
    public_key: String,
}

/// A trust file as read: its content, and what its signatures are over.
#[derive(Debug, Clone)]
pub struct TrustFile {
    /// The validated content.
    pub trust: Trust,
    /// The exact bytes of the `signed` object: what signatures cover.
    pub signed_bytes: Vec<u8>,
    /// The signatures as listed.
    pub signatures: Vec<SignatureEntry>,
}

impl Trust {
    /// A new trust from keys and a threshold (`turnout trust init` and `rotate`).
    pub fn new(
        version: u64,
        threshold: usize,
        created: SystemTime,
        keys: Vec<PublicKey>,
    ) -> Result<Trust, TrustError> {
        let mut map = BTreeMap::new();
        for key in keys {
            if map.insert(key.id().clone(), key.clone()).is_some() {
                return Err(TrustError::DuplicateKey(key.id().clone()));
            }
        }
        if threshold == 0 || threshold > map.len() {
            return Err(TrustError::Threshold {
                threshold,
                keys: map.len(),
            });
        }
        Ok(Trust {
            version,
            threshold,
            created: Timestamp(created),
            keys: map,
        })
    }

    /// The trust file's version; rotations raise it.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// How many distinct trusted keys must sign.
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// The trusted keys by id.
    pub fn keys(&self) -> &BTreeMap<KeyId, PublicKey> {
        &self.keys
    }

    /// The exact bytes to sign for this trust's `signed` object.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let body = SignedBody {
            format: TRUST_FORMAT,
            version: self.version,
            threshold: self.threshold,
            created: self.created,
            keys: self
                .keys
                .values()
                .map(|key| KeyEntry {
                    id: key.id().to_string(),
                    public_key: key.to_pem(),
                })
                .collect(),
        };
        serde_json::to_vec_pretty(&body).expect("a trust body always serialises")
    }

    /// Checks that `next` may replace this trust (see the module docs).
    pub fn accept_rotation(&self, next: &TrustFile) -> Result<(), TrustError> {
        if next.trust.version <= self.version {
            return Err(TrustError::NotNewer {
                current: self.version,
                next: next.trust.version,
            });
        }
        check_threshold(
            "trust file",
            &next.signed_bytes,
            &next.signatures,
            &self.keys,
            self.threshold,
        )
        .map_err(TrustError::NotAuthorised)?;
        check_threshold(
            "trust file",
            &next.signed_bytes,
            &next.signatures,
            &next.trust.keys,
            next.trust.threshold,
        )
        .map_err(TrustError::NotSelfSigned)?;
        Ok(())
    }
}

/// Applies the rotations in `offered` (any order, older ones ignored) to
/// `current`, one version after the other, as a host does with what its
/// coordinator serves: each must pass [`Trust::accept_rotation`] from the
/// one before. Returns the newest trust file accepted (None: nothing newer)
/// and the refusal that stopped the chain, if one did; a refused rotation
/// leaves the trust where the last good one put it.
pub fn apply_rotations<'a>(
    current: &Trust,
    offered: &'a [TrustFile],
) -> (Option<&'a TrustFile>, Option<TrustError>) {
    let mut newer: Vec<&TrustFile> = offered
        .iter()
        .filter(|file| file.trust.version > current.version)
        .collect();
    newer.sort_by_key(|file| file.trust.version);
    let mut now = current;
    let mut accepted = None;
    for next in newer {
        if next.trust.version <= now.version {
            continue;
        }
        if let Err(refusal) = now.accept_rotation(next) {
            return (accepted, Some(refusal));
        }
        accepted = Some(next);
        now = &next.trust;
    }
    (accepted, None)
}

impl TrustFile {
    /// Reads and validates a trust file. Signatures are not checked here: a
    /// host's first trust file needs none, and a rotation is checked with
    /// [`Trust::accept_rotation`].
    pub fn parse(bytes: &[u8], limits: &Limits) -> Result<TrustFile, TrustError> {
        if bytes.len() > limits.max_trust_bytes {
            return Err(TrustError::TooLarge {
                size: bytes.len(),
                limit: limits.max_trust_bytes,
            });
        }
        let malformed = |path: String, detail: String| TrustError::Malformed { path, detail };
        let document =
            SignedDocument::split(bytes).map_err(|(path, detail)| malformed(path, detail))?;
        let signed_bytes = document.signed_bytes;
        let body: SignedBody = serde_path_to_error::deserialize(
            &mut serde_json::Deserializer::from_slice(&signed_bytes),
        )
        .map_err(|err| {
            malformed(
                format!("signed.{}", err.path()),
                err.into_inner().to_string(),
            )
        })?;
        if body.format != TRUST_FORMAT {
            return Err(TrustError::Format { found: body.format });
        }
        let over = |what, found, limit| TrustError::OverLimit { what, found, limit };
        if body.keys.len() > limits.max_keys {
            return Err(over("keys", body.keys.len(), limits.max_keys));
        }
        if document.signatures.len() > limits.max_signatures {
            return Err(over(
                "signatures",
                document.signatures.len(),
                limits.max_signatures,
            ));
        }
        let mut keys = Vec::with_capacity(body.keys.len());
        for entry in &body.keys {
            let key = PublicKey::from_pem(&entry.public_key).map_err(|source| TrustError::Key {
                id: entry.id.clone(),
                source,
            })?;
            if key.id().as_str() != entry.id {
                let listed = KeyId::try_from(entry.id.clone())
                    .map_err(|detail| malformed("signed.keys".into(), detail))?;
                return Err(TrustError::KeyIdMismatch {
                    listed,
                    actual: key.id().clone(),
                });
            }
            keys.push(key);
        }
        let trust = Trust::new(body.version, body.threshold, body.created.0, keys)?;
        Ok(TrustFile {
            trust,
            signed_bytes,
            signatures: document.signatures,
        })
    }

    /// The file's bytes: `signed` exactly as given, then the signatures.
    pub fn to_bytes(&self) -> Vec<u8> {
        SignedDocument::join(&self.signed_bytes, &self.signatures)
    }

    /// A trust file for `trust` with no signatures yet.
    pub fn unsigned(trust: Trust) -> TrustFile {
        TrustFile {
            signed_bytes: trust.signed_bytes(),
            trust,
            signatures: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;

    fn key(i: u8) -> SecretKey {
        SecretKey::from_seed([i; 32])
    }

    fn trust_of(version: u64, threshold: usize, keys: &[&SecretKey]) -> TrustFile {
        let public = keys.iter().map(|k| k.public()).collect();
        TrustFile::unsigned(Trust::new(version, threshold, SystemTime::UNIX_EPOCH, public).unwrap())
    }

    fn sign(file: &mut TrustFile, by: &SecretKey) {
        file.signatures.push(SignatureEntry {
            key_id: by.public().id().clone(),
            sig: by.sign(&file.signed_bytes),
        });
    }

    #[test]
    fn a_trust_file_survives_writing_and_reading() {
        let file = trust_of(1, 2, &[&key(1), &key(2)]);
        let again = TrustFile::parse(&file.to_bytes(), &Limits::default()).unwrap();
        assert_eq!(again.trust, file.trust);
        assert_eq!(again.signed_bytes, file.signed_bytes);
    }

    #[test]
    fn rotations_apply_in_version_order_and_stop_at_the_first_bad_one() {
        let v1 = trust_of(1, 2, &[&key(1), &key(2), &key(3)]);
        let mut v2 = trust_of(2, 2, &[&key(2), &key(3), &key(4)]);
        for k in [&key(2), &key(3)] {
            sign(&mut v2, k);
        }
        let mut v3 = trust_of(3, 1, &[&key(5)]);
        sign(&mut v3, &key(4));
        sign(&mut v3, &key(5));
        // v3 has one of v2's keys: below v2's threshold of 2.
        let offered = [v3.clone(), v2.clone()];
        let (accepted, refusal) = apply_rotations(&v1.trust, &offered);
        assert_eq!(accepted.unwrap().trust.version(), 2);
        assert!(
            matches!(refusal, Some(TrustError::NotAuthorised(_))),
            "{refusal:?}"
        );
        // From v2 on, with v3 properly signed, both steps apply.
        sign(&mut v3, &key(3));
        let offered = [v3.clone(), v2.clone()];
        let (accepted, refusal) = apply_rotations(&v1.trust, &offered);
        assert_eq!(accepted.unwrap().trust.version(), 3);
        assert!(refusal.is_none());
        // Nothing newer: nothing to do.
        let offered = [v2, v3.clone()];
        let (accepted, refusal) = apply_rotations(&v3.trust, &offered);
        assert!(accepted.is_none() && refusal.is_none());
    }

    #[test]
    fn rotation_needs_old_threshold_new_threshold_and_a_higher_version() {
        let (a, b, c) = (key(1), key(2), key(3));
        let current = trust_of(1, 2, &[&a, &b]).trust;

        let mut next = trust_of(2, 1, &[&b, &c]);
        sign(&mut next, &a);
        let err = current.accept_rotation(&next).unwrap_err();
        assert!(
            matches!(
                err,
                TrustError::NotAuthorised(SignatureError::BelowThreshold { .. })
            ),
            "{err}"
        );

        sign(&mut next, &b);
        // b is also a new key, so the new threshold of 1 is met by b.
        current.accept_rotation(&next).unwrap();

        let mut replay = trust_of(1, 1, &[&c]);
        sign(&mut replay, &a);
        sign(&mut replay, &b);
        sign(&mut replay, &c);
        assert!(matches!(
            current.accept_rotation(&replay),
            Err(TrustError::NotNewer {
                current: 1,
                next: 1
            })
        ));

        let mut locked_out = trust_of(2, 1, &[&c]);
        sign(&mut locked_out, &a);
        sign(&mut locked_out, &b);
        let err = current.accept_rotation(&locked_out).unwrap_err();
        assert!(matches!(err, TrustError::NotSelfSigned(_)), "{err}");
    }

    #[test]
    fn a_signed_body_edited_after_signing_is_refused() {
        let (a, b) = (key(1), key(2));
        let current = trust_of(1, 1, &[&a]).trust;
        let mut next = trust_of(2, 1, &[&a, &b]);
        sign(&mut next, &a);
        let text = String::from_utf8(next.to_bytes())
            .unwrap()
            .replace("\"threshold\": 1", "\"threshold\": 2");
        let edited = TrustFile::parse(text.as_bytes(), &Limits::default()).unwrap();
        let err = current.accept_rotation(&edited).unwrap_err();
        assert!(
            matches!(
                err,
                TrustError::NotAuthorised(SignatureError::Invalid { .. })
            ),
            "{err}"
        );
    }

    #[test]
    fn impossible_thresholds_and_bad_keys_are_refused() {
        let err = Trust::new(1, 3, SystemTime::UNIX_EPOCH, vec![key(1).public()]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the trust file's threshold is 3 with 1 key(s); expected 1 <= threshold <= number of keys"
        );
        let text = String::from_utf8(trust_of(1, 1, &[&key(1)]).to_bytes()).unwrap();
        let id = key(1).public().id().to_string();
        let swapped = text.replace(&id, &key(2).public().id().to_string());
        let err = TrustFile::parse(swapped.as_bytes(), &Limits::default()).unwrap_err();
        assert!(matches!(err, TrustError::KeyIdMismatch { .. }), "{err}");
        let err = TrustFile::parse(b"{\"signed\": 3}", &Limits::default()).unwrap_err();
        assert!(
            err.to_string().contains("invalid type: integer `3`"),
            "{err}"
        );
    }
}
