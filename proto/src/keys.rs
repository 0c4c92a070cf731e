//! Ed25519 keys in the standard formats, their ids, and raw signatures.
//!
//! Private keys are PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), public keys
//! SPKI PEM (`-----BEGIN PUBLIC KEY-----`): the formats `openssl genpkey
//! -algorithm ed25519` writes, so a release team can make and hold keys with
//! its own tools (or an HSM) and Turnout reads them. A key's id is the first
//! 16 hex digits of the sha256 of the raw 32-byte public key.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// A key that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not an Ed25519 private key in PKCS#8 PEM.
    #[error(
        "expected an Ed25519 private key in PKCS#8 PEM (\"-----BEGIN PRIVATE KEY-----\"), as \
         written by `turnout keygen` or `openssl genpkey -algorithm ed25519`; found {found} ({detail})"
    )]
    Private {
        /// A short description of what the text looks like.
        found: String,
        /// The decoder's complaint.
        detail: String,
    },
    /// Not an Ed25519 public key in SPKI PEM.
    #[error(
        "expected an Ed25519 public key in SPKI PEM (\"-----BEGIN PUBLIC KEY-----\"), as \
         written by `turnout keygen` or `openssl pkey -pubout`; found {found} ({detail})"
    )]
    Public {
        /// A short description of what the text looks like.
        found: String,
        /// The decoder's complaint.
        detail: String,
    },
}

/// What a PEM-ish text looks like, for error messages.
fn describe(text: &str) -> String {
    match text.lines().find(|line| line.starts_with("-----BEGIN ")) {
        Some(line) => format!("a PEM block {line:?}"),
        None if text.trim().is_empty() => "an empty file".into(),
        None => "no PEM block".into(),
    }
}

/// A key id: the first 16 hex digits of sha256(raw public key).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyId(String);

impl KeyId {
    /// The id of a raw public key.
    fn of(key: &VerifyingKey) -> KeyId {
        let digest = Sha256::digest(key.as_bytes());
        KeyId(hex::encode(&digest[..8]))
    }

    /// The 16 hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for KeyId {
    type Error = String;

    fn try_from(value: String) -> Result<Self, String> {
        if value.len() == 16
            && value
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            Ok(KeyId(value))
        } else {
            Err(format!(
                "invalid key id {value:?}: expected 16 lowercase hex digits (the start of the \
                 sha256 of the public key, as `turnout keygen` prints)"
            ))
        }
    }
}

impl std::str::FromStr for KeyId {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        KeyId::try_from(value.to_owned())
    }
}

impl From<KeyId> for String {
    fn from(id: KeyId) -> String {
        id.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An Ed25519 public key and its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: VerifyingKey,
    id: KeyId,
}

impl PublicKey {
    /// Reads an SPKI PEM public key.
    pub fn from_pem(text: &str) -> Result<PublicKey, KeyError> {
        let key =
            VerifyingKey::from_public_key_pem(text.trim()).map_err(|err| KeyError::Public {
                found: describe(text),
                detail: err.to_string(),
            })?;
        Ok(PublicKey::from(key))
    }

    /// The key as SPKI PEM.
    pub fn to_pem(&self) -> String {
        self.key
            .to_public_key_pem(LineEnding::LF)
            .expect("encoding a valid Ed25519 public key cannot fail")
    }

    /// The key's id.
    pub fn id(&self) -> &KeyId {
        &self.id
    }

    /// Whether `signature` is this key's signature over exactly `message`.
    /// Strict verification: no malleable signatures, no weak keys.
    pub fn verifies(&self, message: &[u8], signature: &RawSignature) -> bool {
        let signature = ed25519_dalek::Signature::from_bytes(&signature.0);
        self.key.verify_strict(message, &signature).is_ok()
    }
}

impl From<VerifyingKey> for PublicKey {
    fn from(key: VerifyingKey) -> PublicKey {
        PublicKey {
            id: KeyId::of(&key),
            key,
        }
    }
}

/// An Ed25519 private key. Its `Debug` does not print the key.
pub struct SecretKey {
    key: SigningKey,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({})", self.public().id())
    }
}

impl SecretKey {
    /// A key from 32 random bytes; the caller supplies the randomness, since
    /// this crate does no I/O.
    pub fn from_seed(seed: [u8; 32]) -> SecretKey {
        SecretKey {
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// Reads a PKCS#8 PEM private key (v1 or v2, with or without the public key).
    pub fn from_pem(text: &str) -> Result<SecretKey, KeyError> {
        let key = SigningKey::from_pkcs8_pem(text.trim()).map_err(|err| KeyError::Private {
            found: describe(text),
            detail: err.to_string(),
        })?;
        Ok(SecretKey { key })
    }

    /// The key as PKCS#8 v1 PEM, the form `openssl genpkey` writes.
    pub fn to_pem(&self) -> String {
        // v1 (no embedded public key): every OpenSSL 1.1 and 3.x reads it.
        let der = ed25519_dalek::pkcs8::KeypairBytes {
            secret_key: self.key.to_bytes(),
            public_key: None,
        }
        .to_pkcs8_pem(LineEnding::LF)
        .expect("encoding a valid Ed25519 key cannot fail");
        der.to_string()
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey::from(self.key.verifying_key())
    }

    /// Signs exactly `message`.
    pub fn sign(&self, message: &[u8]) -> RawSignature {
        RawSignature(self.key.sign(message).to_bytes())
    }
}

/// A 64-byte Ed25519 signature; base64 in JSON.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RawSignature(pub [u8; 64]);

impl RawSignature {
    /// Reads a signature as a tool wrote it: 64 raw bytes (`openssl pkeyutl
    /// -sign -rawin`), or their base64 text.
    pub fn from_file_bytes(bytes: &[u8]) -> Result<RawSignature, String> {
        if let Ok(raw) = <[u8; 64]>::try_from(bytes) {
            return Ok(RawSignature(raw));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| {
            format!(
                "expected a 64-byte Ed25519 signature (raw, or base64 text); found {} bytes of binary",
                bytes.len()
            )
        })?;
        RawSignature::try_from(text.trim().to_owned())
    }
}

impl fmt::Debug for RawSignature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RawSignature({})", BASE64.encode(self.0))
    }
}

impl TryFrom<String> for RawSignature {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        let bytes = BASE64
            .decode(text.as_bytes())
            .map_err(|err| format!("signature is not valid base64: {err}"))?;
        let raw = <[u8; 64]>::try_from(bytes.as_slice()).map_err(|_| {
            format!(
                "expected a 64-byte Ed25519 signature, found {} bytes",
                bytes.len()
            )
        })?;
        Ok(RawSignature(raw))
    }
}

impl From<RawSignature> for String {
    fn from(signature: RawSignature) -> String {
        BASE64.encode(signature.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_pem_and_sign() {
        let secret = SecretKey::from_seed([7; 32]);
        let again = SecretKey::from_pem(&secret.to_pem()).unwrap();
        let public = PublicKey::from_pem(&secret.public().to_pem()).unwrap();
        assert_eq!(again.public(), public);
        let signature = again.sign(b"manifest bytes");
        assert!(public.verifies(b"manifest bytes", &signature));
        assert!(!public.verifies(b"manifest bytez", &signature));
    }

    #[test]
    fn key_id_is_sha256_of_the_raw_key() {
        let public = SecretKey::from_seed([7; 32]).public();
        let digest = Sha256::digest(public.key.as_bytes());
        assert_eq!(public.id().as_str(), &hex_prefix(&digest));
    }

    fn hex_prefix(digest: &[u8]) -> String {
        hex::encode(&digest[..8])
    }

    #[test]
    fn a_public_key_where_a_private_one_belongs_is_named() {
        let public_pem = SecretKey::from_seed([1; 32]).public().to_pem();
        let err = SecretKey::from_pem(&public_pem).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("expected an Ed25519 private key"), "{text}");
        assert!(text.contains("-----BEGIN PUBLIC KEY-----"), "{text}");
        assert!(
            PublicKey::from_pem("")
                .unwrap_err()
                .to_string()
                .contains("an empty file")
        );
    }

    #[test]
    fn signatures_read_raw_or_base64() {
        let signature = SecretKey::from_seed([2; 32]).sign(b"x");
        assert_eq!(
            RawSignature::from_file_bytes(&signature.0).unwrap(),
            signature
        );
        let text = String::from(signature);
        assert_eq!(
            RawSignature::from_file_bytes(format!("{text}\n").as_bytes()).unwrap(),
            signature
        );
        let err = RawSignature::from_file_bytes(&[0xff; 10]).unwrap_err();
        assert!(err.contains("found 10 bytes"), "{err}");
    }
}
