//! Release policy: per-service version floors and revoked releases, in a
//! versioned, expiring document signed by the release keys (the trust
//! file's threshold), so that no coordinator can lower a floor or lift a
//! revocation on its own.
//!
//! ```json
//! {
//!   "signed": {"format": 1, "version": 3, "created": "2026-12-02T10:00:00Z",
//!              "expires": "2027-03-02T10:00:00Z",
//!              "services": {"web": {"min_version": "1.5.0", "revoked": ["1.6.2"]}}},
//!   "signatures": [{"key_id": "9f86d081884c7d65", "sig": "base64…"}]
//! }
//! ```
//!
//! A host accepts a policy only if a threshold of its trusted keys signed the
//! exact bytes of `signed`, and only a higher version than the one it holds
//! ([`accept`]). It then refuses to install, or to roll back to, a release of
//! a service below its floor or revoked ([`Policy::check`]), whether or not
//! anything is installed yet. Both rules name versions, which the release's
//! signed manifest carries: a bundle's own sha256 would not do, since
//! re-packing or adding a signature changes it while the release stays the
//! same. The host checks the version of what it would really run (the
//! slot's record, the downloaded manifest), never only what it was told. A policy past its `expires` is still a floor
//! (it never lowers one), but it is stale: the host starts no new install
//! until a fresh one arrives ([`Policy::expired`]).

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use semver::Version;
use serde::{Deserialize, Serialize};

use crate::limits::Limits;
use crate::manifest::Timestamp;
use crate::messages::ReleaseRef;
use crate::signature::{SignatureEntry, SignatureError, SignedDocument, check_threshold};
use crate::trust::Trust;

/// The policy format this build reads.
pub const POLICY_FORMAT: u32 = 1;

/// Why a policy document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// Larger than the trust-file limit.
    #[error("the policy is {size} bytes, over the limit of {limit}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Not the expected shape.
    #[error("the policy is not valid: at `{path}`: {detail}")]
    Malformed {
        /// Where.
        path: String,
        /// What was wrong.
        detail: String,
    },
    /// A format this build does not read.
    #[error("the policy has format {found}; this build reads format {POLICY_FORMAT}: upgrade it")]
    Format {
        /// Its format.
        found: u32,
    },
    /// Not signed by enough release keys.
    #[error("the policy (version {version}) is not signed by the release keys: {source}")]
    NotSigned {
        /// Its version.
        version: u64,
        /// Which signatures were missing or bad.
        source: SignatureError,
    },
    /// Not newer than the one held.
    #[error(
        "the policy has version {found}, but version {current} is in force: a policy is \
         replaced only by a higher version, so an old one cannot be replayed"
    )]
    NotNewer {
        /// The version held.
        current: u64,
        /// The version offered.
        found: u64,
    },
}

/// One service's rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePolicy {
    /// No release below this version may be installed or rolled back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_version: Option<Version>,
    /// Release versions that may never be installed or rolled back to.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub revoked: BTreeSet<Version>,
}

/// A policy's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Always [`POLICY_FORMAT`].
    pub format: u32,
    /// Grows with every change.
    pub version: u64,
    /// When it was made.
    pub created: Timestamp,
    /// When it goes stale.
    pub expires: Timestamp,
    /// Rules by service name.
    #[serde(default)]
    pub services: BTreeMap<String, ServicePolicy>,
}

/// A policy document as read: its content and what its signatures cover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyFile {
    /// The content.
    pub policy: Policy,
    /// The exact bytes of `signed`.
    pub signed_bytes: Vec<u8>,
    /// The signatures.
    pub signatures: Vec<SignatureEntry>,
}

impl Policy {
    /// Whether `release` of `service` may be installed or rolled back to;
    /// the refusal says which rule and which policy version.
    pub fn check(&self, service: &str, release: &ReleaseRef) -> Result<(), String> {
        let Some(rules) = self.services.get(service) else {
            return Ok(());
        };
        if rules.revoked.contains(&release.version) {
            return Err(format!(
                "{} {} is revoked by policy v{}",
                release.name, release.version, self.version
            ));
        }
        if let Some(floor) = &rules.min_version
            && release.version < *floor
        {
            return Err(format!(
                "{} {} is below the floor {floor} set by policy v{}",
                release.name, release.version, self.version
            ));
        }
        Ok(())
    }

    /// The rules in a line, e.g. `web: floor 1.5.0, 1 revoked; api: no
    /// floor, 0 revoked` (`no rules` when there are none): for logs, events
    /// and the CLI alike.
    pub fn rules_text(&self) -> String {
        if self.services.is_empty() {
            return "no rules".into();
        }
        self.services
            .iter()
            .map(|(service, rules)| {
                let floor = rules
                    .min_version
                    .as_ref()
                    .map_or("no floor".into(), |v| format!("floor {v}"));
                format!("{service}: {floor}, {} revoked", rules.revoked.len())
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Whether the policy is past its `expires` at `now`.
    pub fn expired(&self, now: SystemTime) -> bool {
        now >= self.expires.0
    }
}

impl PolicyFile {
    /// An unsigned document for `policy` (sign it with [`PolicyFile::sign`]).
    pub fn unsigned(policy: Policy) -> PolicyFile {
        let signed_bytes = serde_json::to_vec_pretty(&policy).expect("a policy serialises");
        PolicyFile {
            policy,
            signed_bytes,
            signatures: Vec::new(),
        }
    }

    /// Adds `key`'s signature over the signed bytes.
    pub fn sign(&mut self, key: &crate::keys::SecretKey) {
        self.signatures
            .retain(|entry| &entry.key_id != key.public().id());
        self.signatures.push(SignatureEntry {
            key_id: key.public().id().clone(),
            sig: key.sign(&self.signed_bytes),
        });
    }

    /// The document's bytes: `signed` exactly as given, then the signatures.
    pub fn to_bytes(&self) -> Vec<u8> {
        SignedDocument::join(&self.signed_bytes, &self.signatures)
    }

    /// Reads a policy document (signatures are checked by [`accept`]).
    pub fn parse(bytes: &[u8], limits: &Limits) -> Result<PolicyFile, PolicyError> {
        if bytes.len() > limits.max_trust_bytes {
            return Err(PolicyError::TooLarge {
                size: bytes.len(),
                limit: limits.max_trust_bytes,
            });
        }
        let malformed = |path: String, detail: String| PolicyError::Malformed { path, detail };
        let document =
            SignedDocument::split(bytes).map_err(|(path, detail)| malformed(path, detail))?;
        let signed_bytes = document.signed_bytes;
        let policy: Policy = serde_path_to_error::deserialize(
            &mut serde_json::Deserializer::from_slice(&signed_bytes),
        )
        .map_err(|err| {
            malformed(
                format!("signed.{}", err.path()),
                err.into_inner().to_string(),
            )
        })?;
        if policy.format != POLICY_FORMAT {
            return Err(PolicyError::Format {
                found: policy.format,
            });
        }
        if document.signatures.len() > limits.max_signatures {
            return Err(malformed(
                "signatures".into(),
                format!(
                    "{} signatures, over the limit of {}",
                    document.signatures.len(),
                    limits.max_signatures
                ),
            ));
        }
        if policy.services.len() > limits.max_services {
            return Err(malformed(
                "signed.services".into(),
                format!(
                    "{} services, over the limit of {}",
                    policy.services.len(),
                    limits.max_services
                ),
            ));
        }
        Ok(PolicyFile {
            policy,
            signed_bytes,
            signatures: document.signatures,
        })
    }
}

/// Whether a host holding `current` (if any) takes `next`: signed by a
/// threshold of `trust`'s keys over its exact bytes, and newer. The same
/// version again is no change (Ok, nothing to do is the caller's to see).
pub fn accept(
    trust: &Trust,
    current: Option<&Policy>,
    next: &PolicyFile,
) -> Result<(), PolicyError> {
    check_threshold(
        "policy",
        &next.signed_bytes,
        &next.signatures,
        trust.keys(),
        trust.threshold(),
    )
    .map_err(|source| PolicyError::NotSigned {
        version: next.policy.version,
        source,
    })?;
    if let Some(current) = current
        && next.policy.version < current.version
    {
        return Err(PolicyError::NotNewer {
            current: current.version,
            found: next.policy.version,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::keys::SecretKey;

    fn key(i: u8) -> SecretKey {
        SecretKey::from_seed([i; 32])
    }

    fn trust() -> Trust {
        Trust::new(
            1,
            2,
            SystemTime::UNIX_EPOCH,
            vec![key(1).public(), key(2).public(), key(3).public()],
        )
        .unwrap()
    }

    fn policy(version: u64, floor: &str, revoked: &[&str]) -> PolicyFile {
        PolicyFile::unsigned(Policy {
            format: POLICY_FORMAT,
            version,
            created: Timestamp(SystemTime::UNIX_EPOCH),
            expires: Timestamp(SystemTime::UNIX_EPOCH + Duration::from_secs(1000)),
            services: [(
                "web".to_owned(),
                ServicePolicy {
                    min_version: Some(floor.parse().unwrap()),
                    revoked: revoked.iter().map(|v| v.parse().unwrap()).collect(),
                },
            )]
            .into(),
        })
    }

    fn release(version: &str, byte: u8) -> ReleaseRef {
        ReleaseRef {
            name: "web".into(),
            version: version.parse().unwrap(),
            sha256: crate::ids::Digest::from_bytes([byte; 32]),
        }
    }

    #[test]
    fn floors_and_revocations_refuse_with_the_rule_and_the_version() {
        let p = policy(3, "1.5.0", &["2.0.0"]).policy;
        let err = p.check("web", &release("1.4.9", 1)).unwrap_err();
        assert_eq!(err, "web 1.4.9 is below the floor 1.5.0 set by policy v3");
        // Whatever bundle carries it: a re-packed copy has another digest.
        for byte in [9, 10] {
            let err = p.check("web", &release("2.0.0", byte)).unwrap_err();
            assert_eq!(err, "web 2.0.0 is revoked by policy v3");
        }
        assert!(p.check("web", &release("1.5.0", 1)).is_ok());
        assert!(
            p.check("api", &release("0.1.0", 1)).is_ok(),
            "no rules for api"
        );
    }

    #[test]
    fn a_policy_needs_the_threshold_of_release_keys_and_a_newer_version() {
        let mut v3 = policy(3, "1.5.0", &[]);
        v3.sign(&key(1));
        let err = accept(&trust(), None, &v3).unwrap_err();
        assert!(
            matches!(err, PolicyError::NotSigned { version: 3, .. }),
            "{err}"
        );
        v3.sign(&key(1)); // the same key twice still counts once
        assert!(accept(&trust(), None, &v3).is_err());
        v3.sign(&key(2));
        accept(&trust(), None, &v3).unwrap();
        let again = PolicyFile::parse(&v3.to_bytes(), &Limits::default()).unwrap();
        assert_eq!(again, v3);
        let mut v2 = policy(2, "1.0.0", &[]);
        v2.sign(&key(1));
        v2.sign(&key(2));
        let err = accept(&trust(), Some(&v3.policy), &v2).unwrap_err();
        assert!(
            matches!(
                err,
                PolicyError::NotNewer {
                    current: 3,
                    found: 2
                }
            ),
            "{err}"
        );
        // A byte changed after signing.
        let mut forged = v3.clone();
        forged.signed_bytes = String::from_utf8(forged.signed_bytes)
            .unwrap()
            .replace("1.5.0", "1.0.0")
            .into_bytes();
        assert!(accept(&trust(), None, &forged).is_err());
    }

    #[test]
    fn expiry_is_a_point_in_time() {
        let p = policy(1, "1.0.0", &[]).policy;
        assert!(!p.expired(SystemTime::UNIX_EPOCH + Duration::from_secs(999)));
        assert!(p.expired(SystemTime::UNIX_EPOCH + Duration::from_secs(1000)));
    }
}
