//! Signed, fresh, monotonic desired state (protocol v2): what a host is
//! told to run, signed by the coordinator's *director* key, and the pure
//! rule an agent applies before it acts on one.
//!
//! On the wire (`GET /v1/agent/desired` in v2):
//!
//! ```json
//! {"proto": 2,
//!  "document": "{\"host\":\"web-01\",\"index\":7,\"services\":[…],\"issued_at_ms\":…,\"expires_ms\":…}",
//!  "signature": {"key_id": "9f86d081884c7d65", "sig": "base64…"}}
//! ```
//!
//! The document travels as a string so that the signature covers its exact
//! bytes, whatever a JSON reader on the way does to whitespace or key order.
//! [`accept`] refuses, each with its own [`DesiredRefusal`]: a document
//! signed by a key the host does not know or with a bad signature, one for
//! another host, an expired one, one with a lower index than the newest the
//! host accepted (a replay), and one with the same index but other content
//! (a forgery or a mix-and-match). What it returns to keep ([`Accepted`]) is
//! how a host notices a coordinator that keeps answering the same document
//! forever: its expiry passes, and the host is *stale*.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::envelope::Message;
use crate::ids::HostId;
use crate::keys::{KeyId, PublicKey, RawSignature, SecretKey};
use crate::limits::{LimitExceeded, Limits};
use crate::messages::DesiredState;
use crate::signature::SignatureEntry;

/// A desired-state document and the director's signature over its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedDesired {
    /// The [`DesiredState`] as JSON text: exactly the signed bytes.
    pub document: String,
    /// The director key's signature over `document`.
    pub signature: SignatureEntry,
}

impl Message for SignedDesired {
    const NAME: &'static str = "signed desired state";

    fn check_limits(&self, _limits: &Limits) -> Result<(), LimitExceeded> {
        // The document is bounded by the body limit here and checked in
        // full by `accept`, once its signature holds.
        Ok(())
    }
}

impl SignedDesired {
    /// Signs `state` (which must carry `issued_at_ms` and `expires_ms`) with
    /// the director key.
    pub fn sign(state: &DesiredState, director: &SecretKey) -> SignedDesired {
        debug_assert!(state.issued_at_ms.is_some() && state.expires_ms.is_some());
        let document = serde_json::to_string(state).expect("desired state serialises");
        SignedDesired {
            signature: SignatureEntry {
                key_id: director.public().id().clone(),
                sig: director.sign(document.as_bytes()),
            },
            document,
        }
    }
}

/// What a host keeps of the newest desired state it accepted (persisted, so
/// a restart cannot be talked into an older one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// The director key that signed it.
    pub director: KeyId,
    /// Its index.
    pub index: u64,
    /// sha256 (hex) of its services, to tell the same index with other content.
    pub content: String,
    /// When it was issued (coordinator clock), ms since the epoch.
    pub issued_at_ms: u64,
    /// When it stops being valid, ms since the epoch.
    pub expires_ms: u64,
}

impl Accepted {
    /// Since when the host has had no valid desired state, if it has none
    /// now: the newest document it accepted expired and nothing replaced it.
    pub fn stale_since(&self, now_ms: u64) -> Option<u64> {
        (now_ms >= self.expires_ms).then_some(self.expires_ms)
    }
}

/// Why a desired-state document was refused. Each names what was expected
/// and what was found; none changes any service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DesiredRefusal {
    /// Signed by a key this host does not know as its coordinator's director.
    #[error(
        "the desired state is signed by key {found}, but this host knows the coordinator's \
         director key as {}: not acted on (a forged document, or the coordinator's key \
         changed: enroll the host again if that was intended)",
        known_text(known)
    )]
    UnknownKey {
        /// The key it names.
        found: KeyId,
        /// The keys this host accepts.
        known: Vec<KeyId>,
    },
    /// The director's signature does not verify over the document.
    #[error(
        "the desired state's signature by director key {key_id} does not verify: the document \
         was changed after it was signed; not acted on"
    )]
    BadSignature {
        /// The key it names.
        key_id: KeyId,
    },
    /// The signed document does not parse or is over a limit.
    #[error("the signed desired state is not valid: {0}; not acted on")]
    Malformed(String),
    /// A document for another host.
    #[error(
        "the desired state is for host {found}, but this is host {expected}: not acted on \
         (a document replayed from another host)"
    )]
    OtherHost {
        /// This host.
        expected: HostId,
        /// The host it names.
        found: HostId,
    },
    /// A document whose `expires_ms` has passed.
    #[error(
        "the desired state (index {index}) expired at {}, and it is {} here: not acted on \
         (a replayed or held-back answer, or this host's clock is wrong)",
        utc(*expires_ms), utc(*now_ms)
    )]
    Expired {
        /// Its index.
        index: u64,
        /// When it expired.
        expires_ms: u64,
        /// Now, on this host's clock.
        now_ms: u64,
    },
    /// No `issued_at_ms`/`expires_ms`: not a v2 document.
    #[error(
        "the desired state (index {index}) carries no issue and expiry times: not a v2 \
         document; not acted on"
    )]
    Undated {
        /// Its index.
        index: u64,
    },
    /// A lower index than the newest this host accepted.
    #[error(
        "the desired state has index {found}, below index {newest} that this host already \
         accepted: a replayed older document; not acted on"
    )]
    Replayed {
        /// Its index.
        found: u64,
        /// The newest accepted.
        newest: u64,
    },
    /// The index this host accepted, with other services in it.
    #[error(
        "the desired state has index {index}, which this host already accepted with other \
         content: a forged or mixed document; not acted on"
    )]
    Conflicting {
        /// The index.
        index: u64,
    },
}

/// `ms` since the epoch as an RFC 3339 time, e.g. `2026-12-02T10:00:00Z`.
pub fn utc(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

fn known_text(known: &[KeyId]) -> String {
    if known.is_empty() {
        "none".into()
    } else {
        known
            .iter()
            .map(KeyId::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The handover from one director key to the next (`turnout director
/// rotate`): the new key, signed by the old one over the new key's PEM.
/// A host takes a new director key only this way, so a coordinator without
/// the current key cannot introduce one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    /// The new key (SPKI PEM).
    pub key: String,
    /// The key that signed it.
    pub by: KeyId,
    /// `by`'s signature over `key`'s bytes.
    pub sig: RawSignature,
}

impl Handover {
    /// `old` hands over to `new`.
    pub fn make(old: &SecretKey, new: &PublicKey) -> Handover {
        let key = new.to_pem();
        Handover {
            sig: old.sign(key.as_bytes()),
            by: old.public().id().clone(),
            key,
        }
    }
}

/// A director key a host accepts, and the key that handed it over (None:
/// learnt at enrollment, or asked for once over the verified channel).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Director {
    /// The key (SPKI PEM).
    pub key: String,
    /// The key it was handed over from.
    #[serde(default)]
    pub from: Option<KeyId>,
}

impl Director {
    /// The parsed key, if it parses.
    pub fn public(&self) -> Option<PublicKey> {
        PublicKey::from_pem(&self.key).ok()
    }
}

/// The keys in `directors` by id, for [`accept`].
pub fn director_keys(directors: &[Director]) -> BTreeMap<KeyId, PublicKey> {
    directors
        .iter()
        .filter_map(Director::public)
        .map(|key| (key.id().clone(), key))
        .collect()
}

/// Takes the handovers in `offered` whose signer is a key in `known`
/// (also one taken from an earlier handover here, so a chain applies in
/// one go) and whose signature verifies; returns the ids added.
pub fn apply_handovers(known: &mut Vec<Director>, offered: &[Handover]) -> Vec<KeyId> {
    let mut added = Vec::new();
    loop {
        let keys = director_keys(known);
        let next = offered.iter().find_map(|handover| {
            let new = PublicKey::from_pem(&handover.key).ok()?;
            if keys.contains_key(new.id()) {
                return None;
            }
            let by = keys.get(&handover.by)?;
            by.verifies(handover.key.as_bytes(), &handover.sig)
                .then(|| (new, handover.by.clone()))
        });
        let Some((new, by)) = next else {
            return added;
        };
        added.push(new.id().clone());
        known.push(Director {
            key: new.to_pem(),
            from: Some(by),
        });
    }
}

/// After a document signed by `signer` verified: keeps `signer` and the
/// keys handed over from it (and from those), and drops the keys it was
/// handed over from, which the coordinator no longer signs with; returns
/// the ids dropped.
pub fn retire_predecessors(known: &mut Vec<Director>, signer: &KeyId) -> Vec<KeyId> {
    let id_of = |d: &Director| d.public().map(|k| k.id().clone());
    let mut keep = vec![signer.clone()];
    loop {
        let more: Vec<KeyId> = known
            .iter()
            .filter(|d| d.from.as_ref().is_some_and(|from| keep.contains(from)))
            .filter_map(id_of)
            .filter(|id| !keep.contains(id))
            .collect();
        if more.is_empty() {
            break;
        }
        keep.extend(more);
    }
    let dropped: Vec<KeyId> = known
        .iter()
        .filter_map(id_of)
        .filter(|id| !keep.contains(id))
        .collect();
    known.retain(|d| id_of(d).is_some_and(|id| keep.contains(&id)));
    dropped
}

/// The longest a host counts a desired state as valid, whatever its
/// `expires_ms` says: a leaked director key cannot sign a document that
/// never goes stale. `desired_expiry` may not exceed it.
pub const MAX_VALIDITY_MS: u64 = 7 * 24 * 3600 * 1000;

/// sha256 (hex) of a desired state's services: what must not change under one index.
pub fn content_digest(state: &DesiredState) -> String {
    let bytes = serde_json::to_vec(&state.services).expect("services serialise");
    hex::encode(Sha256::digest(bytes))
}

/// Checks `signed` for host `host` at `now_ms` against the director keys the
/// host knows and the newest document it accepted; returns the document and
/// what to keep instead of `last`. Pure: the caller persists [`Accepted`]
/// before acting on the document.
pub fn accept(
    signed: &SignedDesired,
    directors: &BTreeMap<KeyId, PublicKey>,
    host: &HostId,
    now_ms: u64,
    last: Option<&Accepted>,
    limits: &Limits,
) -> Result<(DesiredState, Accepted), DesiredRefusal> {
    let key_id = &signed.signature.key_id;
    let Some(key) = directors.get(key_id) else {
        return Err(DesiredRefusal::UnknownKey {
            found: key_id.clone(),
            known: directors.keys().cloned().collect(),
        });
    };
    if !key.verifies(signed.document.as_bytes(), &signed.signature.sig) {
        return Err(DesiredRefusal::BadSignature {
            key_id: key_id.clone(),
        });
    }
    let state: DesiredState = serde_json::from_str(&signed.document)
        .map_err(|err| DesiredRefusal::Malformed(err.to_string()))?;
    state
        .check_limits(limits)
        .map_err(|err| DesiredRefusal::Malformed(err.to_string()))?;
    if &state.host != host {
        return Err(DesiredRefusal::OtherHost {
            expected: host.clone(),
            found: state.host,
        });
    }
    let (Some(issued_at_ms), Some(expires_ms)) = (state.issued_at_ms, state.expires_ms) else {
        return Err(DesiredRefusal::Undated { index: state.index });
    };
    if now_ms >= expires_ms {
        return Err(DesiredRefusal::Expired {
            index: state.index,
            expires_ms,
            now_ms,
        });
    }
    let content = content_digest(&state);
    let mut keep = Accepted {
        director: key_id.clone(),
        index: state.index,
        content,
        issued_at_ms,
        expires_ms: expires_ms.min(now_ms.saturating_add(MAX_VALIDITY_MS)),
    };
    // A record kept under a key this host no longer accepts (a new
    // enrollment) says nothing about this key's documents; one under a key
    // it still accepts (a handover in progress) binds them.
    if let Some(last) = last.filter(|last| directors.contains_key(&last.director)) {
        if state.index < last.index {
            return Err(DesiredRefusal::Replayed {
                found: state.index,
                newest: last.index,
            });
        }
        if state.index == last.index {
            if keep.content != last.content {
                return Err(DesiredRefusal::Conflicting { index: state.index });
            }
            // The same document again: an older copy never shortens what
            // the newer one granted.
            keep.issued_at_ms = keep.issued_at_ms.max(last.issued_at_ms);
            keep.expires_ms = keep.expires_ms.max(last.expires_ms);
        }
    }
    Ok((state, keep))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{DesiredService, ReleaseRef};

    fn director() -> SecretKey {
        SecretKey::from_seed([7; 32])
    }

    fn keys(key: &SecretKey) -> BTreeMap<KeyId, PublicKey> {
        [(key.public().id().clone(), key.public())].into()
    }

    fn host() -> HostId {
        "web-01".parse().unwrap()
    }

    fn state(index: u64, version: &str, issued: u64) -> DesiredState {
        DesiredState {
            host: host(),
            index,
            services: vec![DesiredService {
                service: "web".parse().unwrap(),
                release: ReleaseRef {
                    name: "web".into(),
                    version: version.parse().unwrap(),
                    sha256: crate::Digest::from_bytes([index as u8; 32]),
                },
                size: 10,
                urls: Vec::new(),
                rollout: None,
            }],
            issued_at_ms: Some(issued),
            expires_ms: Some(issued + 3_600_000),
            policy_version: None,
        }
    }

    fn check(
        signed: &SignedDesired,
        now: u64,
        last: Option<&Accepted>,
    ) -> Result<(DesiredState, Accepted), DesiredRefusal> {
        accept(
            signed,
            &keys(&director()),
            &host(),
            now,
            last,
            &Limits::default(),
        )
    }

    #[test]
    fn a_fresh_document_is_accepted_and_remembered() {
        let signed = SignedDesired::sign(&state(3, "1.0.0", 1_000), &director());
        let (doc, kept) = check(&signed, 2_000, None).unwrap();
        assert_eq!(doc.index, 3);
        assert_eq!(kept.index, 3);
        assert_eq!(kept.expires_ms, 3_601_000);
        assert_eq!(kept.stale_since(3_600_999), None);
        assert_eq!(kept.stale_since(3_601_000), Some(3_601_000));
    }

    #[test]
    fn each_attack_is_refused_with_its_own_reason() {
        let (_, kept) = check(
            &SignedDesired::sign(&state(5, "2.0.0", 1_000), &director()),
            2_000,
            None,
        )
        .unwrap();
        // Replay of an older index.
        let old = SignedDesired::sign(&state(4, "1.0.0", 500), &director());
        assert!(matches!(
            check(&old, 2_000, Some(&kept)),
            Err(DesiredRefusal::Replayed {
                found: 4,
                newest: 5
            })
        ));
        // Same index, other content.
        let mixed = SignedDesired::sign(&state(5, "1.0.0", 1_500), &director());
        assert!(matches!(
            check(&mixed, 2_000, Some(&kept)),
            Err(DesiredRefusal::Conflicting { index: 5 })
        ));
        // Another host's document.
        let mut other = state(6, "2.0.0", 1_500);
        other.host = "web-02".parse().unwrap();
        let err = check(
            &SignedDesired::sign(&other, &director()),
            2_000,
            Some(&kept),
        )
        .unwrap_err();
        assert!(matches!(err, DesiredRefusal::OtherHost { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("for host web-02, but this is host web-01")
        );
        // Expired.
        let late = SignedDesired::sign(&state(6, "2.0.0", 1_000), &director());
        let err = check(&late, 3_601_000, Some(&kept)).unwrap_err();
        assert!(
            matches!(err, DesiredRefusal::Expired { index: 6, .. }),
            "{err}"
        );
        // Unknown key.
        let stranger = SecretKey::from_seed([8; 32]);
        let err = check(
            &SignedDesired::sign(&state(6, "2.0.0", 1_500), &stranger),
            2_000,
            Some(&kept),
        )
        .unwrap_err();
        assert!(matches!(err, DesiredRefusal::UnknownKey { .. }), "{err}");
        assert!(err.to_string().contains(director().public().id().as_str()));
        // A changed byte.
        let mut forged = SignedDesired::sign(&state(6, "2.0.0", 1_500), &director());
        forged.document = forged.document.replace("2.0.0", "2.0.1");
        assert!(matches!(
            check(&forged, 2_000, Some(&kept)),
            Err(DesiredRefusal::BadSignature { .. })
        ));
        // Undated (a v1 document signed anyway).
        let mut undated = state(6, "2.0.0", 1_500);
        undated.expires_ms = None;
        let signed = SignedDesired {
            document: serde_json::to_string(&undated).unwrap(),
            signature: SignatureEntry {
                key_id: director().public().id().clone(),
                sig: director().sign(serde_json::to_string(&undated).unwrap().as_bytes()),
            },
        };
        assert!(matches!(
            check(&signed, 2_000, Some(&kept)),
            Err(DesiredRefusal::Undated { index: 6 })
        ));
    }

    #[test]
    fn a_document_counts_as_valid_for_a_week_at_most() {
        let mut forever = state(5, "2.0.0", 1_000);
        forever.expires_ms = Some(u64::MAX);
        let signed = SignedDesired::sign(&forever, &director());
        let (_, kept) = check(&signed, 2_000, None).unwrap();
        assert_eq!(kept.expires_ms, 2_000 + MAX_VALIDITY_MS);
        assert!(kept.stale_since(2_000 + MAX_VALIDITY_MS).is_some());
    }

    #[test]
    fn the_same_document_again_refreshes_but_an_older_copy_never_shortens() {
        let first = SignedDesired::sign(&state(5, "2.0.0", 1_000), &director());
        let (_, kept) = check(&first, 2_000, None).unwrap();
        let newer = SignedDesired::sign(&state(5, "2.0.0", 9_000), &director());
        let (_, kept) = check(&newer, 10_000, Some(&kept)).unwrap();
        assert_eq!(kept.expires_ms, 3_609_000);
        let (_, kept) = check(&first, 10_000, Some(&kept)).unwrap();
        assert_eq!(
            kept.expires_ms, 3_609_000,
            "an older copy shortened the expiry"
        );
    }

    #[test]
    fn a_handover_is_taken_only_from_a_known_key_and_retires_it_once_the_new_one_signs() {
        let (old, new, newer) = (
            director(),
            SecretKey::from_seed([8; 32]),
            SecretKey::from_seed([10; 32]),
        );
        let mut known = vec![Director {
            key: old.public().to_pem(),
            from: None,
        }];
        // Signed by a stranger: ignored.
        let stranger = SecretKey::from_seed([11; 32]);
        assert!(
            apply_handovers(&mut known, &[Handover::make(&stranger, &new.public())]).is_empty()
        );
        // A bad signature: ignored.
        let mut forged = Handover::make(&old, &new.public());
        forged.key = newer.public().to_pem();
        assert!(apply_handovers(&mut known, &[forged]).is_empty());
        // A chain old -> new -> newer, offered out of order, applies in one go.
        let chain = [
            Handover::make(&new, &newer.public()),
            Handover::make(&old, &new.public()),
        ];
        let added = apply_handovers(&mut known, &chain);
        assert_eq!(
            added,
            [new.public().id().clone(), newer.public().id().clone()]
        );
        assert!(apply_handovers(&mut known, &chain).is_empty(), "taken once");
        // A document signed by `new` retires `old`, keeps `newer`.
        let dropped = retire_predecessors(&mut known, new.public().id());
        assert_eq!(dropped, [old.public().id().clone()]);
        let ids: Vec<KeyId> = director_keys(&known).into_keys().collect();
        assert!(ids.contains(new.public().id()) && ids.contains(newer.public().id()));
        assert_eq!(ids.len(), 2);
    }

    #[test]
    fn a_record_under_another_director_key_does_not_bind_a_new_enrollment() {
        let old = Accepted {
            director: SecretKey::from_seed([9; 32]).public().id().clone(),
            index: 100,
            content: String::new(),
            issued_at_ms: 0,
            expires_ms: 1,
        };
        let signed = SignedDesired::sign(&state(1, "1.0.0", 1_000), &director());
        assert!(check(&signed, 2_000, Some(&old)).is_ok());
    }
}
