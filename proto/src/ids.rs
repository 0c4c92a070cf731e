//! Newtypes for the names and digests that cross the boundary.
//!
//! Each is validated once, where it enters (decoding or parsing), so code
//! further in can use a [`ServiceName`] as a path component or a [`HostId`] as
//! a database key without checking again.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A name or digest that failed validation: what it is, the value, and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: {rule}")]
pub struct IdError {
    /// What was being parsed ("host id", "service name", "sha256 digest").
    pub kind: &'static str,
    /// The rejected value (cut to 80 characters).
    pub value: String,
    /// The rule it broke, phrased as what was expected.
    pub rule: &'static str,
}

impl IdError {
    fn new(kind: &'static str, value: &str, rule: &'static str) -> IdError {
        IdError {
            kind,
            value: value.chars().take(80).collect(),
            rule,
        }
    }
}

/// Checks `value` is 1..=`max` bytes of `[A-Za-z0-9._-]` starting with a letter or digit.
fn check_name(
    kind: &'static str,
    value: &str,
    max: usize,
    rule: &'static str,
) -> Result<(), IdError> {
    let bytes = value.as_bytes();
    let valid = !bytes.is_empty()
        && bytes.len() <= max
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(IdError::new(kind, value, rule))
    }
}

macro_rules! name_newtype {
    ($(#[$meta:meta])* $name:ident, $kind:literal, $max:literal, $rule:literal) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;

            fn from_str(value: &str) -> Result<Self, IdError> {
                check_name($kind, value, $max, $rule)?;
                Ok($name(value.to_owned()))
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;

            fn try_from(value: String) -> Result<Self, IdError> {
                check_name($kind, &value, $max, $rule)?;
                Ok($name(value))
            }
        }

        impl From<$name> for String {
            fn from(name: $name) -> String {
                name.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_newtype!(
    /// A host's stable identity in the fleet (usually its hostname).
    HostId,
    "host id",
    253,
    "expected 1 to 253 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"
);

name_newtype!(
    /// A managed service's name; also a directory name under the agent's state dir.
    ServiceName,
    "service name",
    64,
    "expected 1 to 64 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"
);

name_newtype!(
    /// A rollout's id: part of API paths, metrics and the event log, so it
    /// is kept to characters that need no escaping anywhere.
    RolloutId,
    "rollout id",
    128,
    "expected 1 to 128 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"
);

/// A SHA-256 digest as 64 lowercase hex digits: how bundles are addressed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

const DIGEST_RULE: &str = "expected 64 lowercase hexadecimal digits (a sha256)";

impl Digest {
    /// The digest of raw hash output.
    pub fn from_bytes(bytes: [u8; 32]) -> Digest {
        Digest(hex::encode(bytes))
    }

    /// The 64 hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 hex digits, for people reading logs and tables.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }
}

impl FromStr for Digest {
    type Err = IdError;

    fn from_str(value: &str) -> Result<Self, IdError> {
        Digest::try_from(value.to_owned())
    }
}

impl TryFrom<String> for Digest {
    type Error = IdError;

    fn try_from(value: String) -> Result<Self, IdError> {
        let valid = value.len() == 64
            && value
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if valid {
            Ok(Digest(value))
        } else {
            Err(IdError::new("sha256 digest", &value, DIGEST_RULE))
        }
    }
}

impl From<Digest> for String {
    fn from(digest: Digest) -> String {
        digest.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_that_would_escape_a_directory_are_refused() {
        for bad in ["", "..", ".hidden", "a/b", "-flag", "web service", "wéb"] {
            let err = bad.parse::<ServiceName>().unwrap_err();
            assert_eq!(err.kind, "service name", "{bad:?}");
        }
        assert!("web-1.api_v2".parse::<ServiceName>().is_ok());
        assert!("x".repeat(65).parse::<ServiceName>().is_err());
    }

    #[test]
    fn host_ids_allow_fqdns() {
        assert!("web-01.eu-1.example.com".parse::<HostId>().is_ok());
        let err = "web 01".parse::<HostId>().unwrap_err();
        assert!(
            err.to_string().contains("invalid host id \"web 01\""),
            "{err}"
        );
    }

    #[test]
    fn digest_is_strict_lowercase_hex() {
        let good = "a".repeat(64);
        assert!(good.parse::<Digest>().is_ok());
        assert!("A".repeat(64).parse::<Digest>().is_err());
        assert!("a".repeat(63).parse::<Digest>().is_err());
        assert_eq!(Digest::from_bytes([0xab; 32]).as_str(), "ab".repeat(32));
        assert_eq!(Digest::from_bytes([0xab; 32]).short(), "abababababab");
    }

    #[test]
    fn invalid_names_fail_decoding_with_the_rule() {
        let err = serde_json::from_str::<ServiceName>(r#""../etc""#).unwrap_err();
        assert!(
            err.to_string().contains("starting with a letter or digit"),
            "{err}"
        );
    }
}
