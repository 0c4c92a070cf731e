//! What the agent does about one service's desired release: a pure decision
//! over what the host has, shared by the link and the model-based tests.
//!
//! | the host                                   | decision            |
//! |--------------------------------------------|---------------------|
//! | an install or revert in flight             | wait                |
//! | committed release is the desired one       | nothing             |
//! | the desired release failed here last time  | refuse (reported)   |
//! | the other slot holds it, slot rollback ok  | roll back to it     |
//! | otherwise                                  | download, install   |
//!
//! "Failed here last time" reads the journal's history, not the last outcome
//! alone: a local rollback or install after the failure must not make the
//! coordinator's next poll retry a release that already failed on this host.
//! Installing it by hand (`turnout-agent install`) and committing it clears it.
//! Only verdicts on the release count (see [`is_failure`]): a download that
//! was cut or corrupted is tried again.

use turnout_proto::messages::{OutcomeKind, ReleaseRef};

use crate::journal::HistoryEntry;

/// What the host has, for one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local<'a> {
    /// Nothing in flight.
    pub idle: bool,
    /// The committed release.
    pub committed: Option<&'a ReleaseRef>,
    /// The release kept in the other slot.
    pub other: Option<&'a ReleaseRef>,
    /// The service's history, newest first.
    pub history: &'a [HistoryEntry],
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// An operation is in flight; look again at the next poll.
    Wait,
    /// The desired release is the committed one.
    Nothing,
    /// The desired release failed on this host; it is not retried.
    Refuse {
        /// The failure, as recorded.
        failure: HistoryEntry,
    },
    /// Switch back to the other slot, which holds the desired release.
    Rollback,
    /// Download and install the desired release.
    Install,
}

/// The newest outcome concerning `release` in `history`, if it is a failure.
pub fn failed_here<'a>(
    release: &ReleaseRef,
    history: &'a [HistoryEntry],
) -> Option<&'a HistoryEntry> {
    history
        .iter()
        .find(|h| {
            h.release
                .as_ref()
                .is_some_and(|r| r.sha256 == release.sha256)
        })
        .filter(|h| is_failure(&h.kind))
}

/// Whether an outcome is a verdict on the release itself: it failed its
/// bake (or the agent stopped during it), or its verified bytes broke a
/// rule. An install that could not proceed (a download cut or corrupted, a
/// full disk, a supervisor error) says nothing about the release and is
/// tried again.
pub fn is_failure(kind: &OutcomeKind) -> bool {
    match kind {
        OutcomeKind::Reverted | OutcomeKind::Rejected | OutcomeKind::Interrupted => true,
        OutcomeKind::Failed
        | OutcomeKind::Refused
        | OutcomeKind::Committed
        | OutcomeKind::Unknown(_) => false,
    }
}

/// The decision for `want`; `slot_rollback` is whether the coordinator
/// agreed to slot rollbacks (otherwise the other slot's release is installed
/// again from its bundle).
pub fn decide(want: &ReleaseRef, local: &Local<'_>, slot_rollback: bool) -> Decision {
    if !local.idle {
        return Decision::Wait;
    }
    if local.committed.is_some_and(|c| c.sha256 == want.sha256) {
        return Decision::Nothing;
    }
    if let Some(failure) = failed_here(want, local.history) {
        return Decision::Refuse {
            failure: failure.clone(),
        };
    }
    if slot_rollback && local.other.is_some_and(|o| o.sha256 == want.sha256) {
        return Decision::Rollback;
    }
    Decision::Install
}

#[cfg(test)]
mod tests {
    use super::*;
    use turnout_proto::Digest;

    fn release(version: &str, fill: u8) -> ReleaseRef {
        ReleaseRef {
            name: "web".into(),
            version: version.parse().unwrap(),
            sha256: Digest::from_bytes([fill; 32]),
        }
    }

    fn entry(kind: OutcomeKind, release: &ReleaseRef) -> HistoryEntry {
        HistoryEntry {
            kind,
            release: Some(release.clone()),
            reason: "check http failed".into(),
            at_ms: 1,
        }
    }

    #[test]
    fn a_failed_release_is_not_retried_after_a_later_local_rollback() {
        let (v1, v2, v3) = (
            release("1.0.0", 1),
            release("2.0.0", 2),
            release("3.0.0", 3),
        );
        // v2 failed, then an operator rolled back locally (v3 → v1): the
        // newest outcome is about v1, but v2's own newest outcome is a failure.
        let history = [
            entry(OutcomeKind::Committed, &v1),
            entry(OutcomeKind::Reverted, &v2),
            entry(OutcomeKind::Committed, &v3),
        ];
        let local = Local {
            idle: true,
            committed: Some(&v1),
            other: Some(&v3),
            history: &history,
        };
        assert!(matches!(
            decide(&v2, &local, true),
            Decision::Refuse { failure } if failure.kind == OutcomeKind::Reverted
        ));
        // A release committed by hand after its failure is no longer refused.
        let history = [
            entry(OutcomeKind::Committed, &v2),
            entry(OutcomeKind::Reverted, &v2),
        ];
        let local = Local {
            history: &history,
            ..local
        };
        assert_eq!(decide(&v2, &local, true), Decision::Install);
    }

    /// A flaky mirror or a network attacker must not make a host refuse a
    /// correctly signed release for good.
    #[test]
    fn an_install_that_could_not_proceed_is_tried_again() {
        let (v1, v2) = (release("1.0.0", 1), release("2.0.0", 2));
        let history = [entry(OutcomeKind::Failed, &v2)];
        let local = Local {
            idle: true,
            committed: Some(&v1),
            other: None,
            history: &history,
        };
        assert_eq!(decide(&v2, &local, true), Decision::Install);
    }

    #[test]
    fn the_other_slot_is_used_only_when_agreed() {
        let (v1, v2) = (release("1.0.0", 1), release("2.0.0", 2));
        let local = Local {
            idle: true,
            committed: Some(&v2),
            other: Some(&v1),
            history: &[],
        };
        assert_eq!(decide(&v1, &local, true), Decision::Rollback);
        assert_eq!(decide(&v1, &local, false), Decision::Install);
        assert_eq!(decide(&v2, &local, true), Decision::Nothing);
        let busy = Local {
            idle: false,
            ..local
        };
        assert_eq!(decide(&v1, &busy, true), Decision::Wait);
    }
}
