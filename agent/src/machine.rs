//! One service's install cycle as a pure state machine (DESIGN.md §6).
//!
//! ```text
//! Idle(X) -Install-> Fetching -Staged(Y)-> Staged(Y) -Switch-> Switching(X→Y)
//!   -Switched-> Baking(X→Y) -Healthy-> Idle(Y)
//!                           -Unhealthy-> Reverting(→X) -Reverted-> Idle(X)
//! Idle(X) -Rollback(W)-> Switching(X→W) …          (W is in the other slot)
//! any state -Recover-> a deterministic safe state   (on agent start)
//! ```
//!
//! [`next`] returns the new state and the effects the caller performs; the
//! caller persists the new state *before* performing them, so a crash between
//! any two steps is resolved by `Recover`: before the switch, staging is
//! discarded; from the switch on, the host goes back to X and the outcome is
//! `interrupted`. Every (state, event) pair is decided explicitly: there is
//! no wildcard arm, so a new event forces a decision in every state.

use serde::{Deserialize, Serialize};
use turnout_proto::messages::{OutcomeKind, ReleaseRef};

/// Whether a switch installs something new or goes back to the other slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// A new release from a bundle.
    Install,
    /// The release kept in the other slot.
    Rollback,
}

/// Where a service is; persisted in the journal before every effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    /// Running its committed release (none before the first install).
    Idle {
        /// The release the host falls back to.
        committed: Option<ReleaseRef>,
    },
    /// Verifying and unpacking a bundle into the idle slot.
    Fetching {
        /// The committed release, still running.
        committed: Option<ReleaseRef>,
        /// Where the bundle comes from (a path or URL), for messages.
        source: String,
    },
    /// A verified release sits in the idle slot.
    Staged {
        /// The committed release, still running.
        committed: Option<ReleaseRef>,
        /// The staged release.
        target: ReleaseRef,
    },
    /// `current` is being flipped to the target and the service restarted.
    Switching {
        /// The release to go back to on failure.
        previous: Option<ReleaseRef>,
        /// The release being switched to.
        target: ReleaseRef,
        /// Install or rollback.
        operation: Operation,
    },
    /// The target runs; health decides.
    Baking {
        /// The release to go back to on failure.
        previous: Option<ReleaseRef>,
        /// The release on trial.
        target: ReleaseRef,
        /// Install or rollback.
        operation: Operation,
        /// When the switch finished, ms since the epoch.
        since_ms: u64,
    },
    /// Going back to `to` after `failed` failed.
    Reverting {
        /// The release to run again (none if the first install failed).
        to: Option<ReleaseRef>,
        /// The release that failed.
        failed: ReleaseRef,
        /// `reverted` (health failed) or `interrupted` (the agent stopped).
        outcome: OutcomeKind,
        /// Why, for the journal and the coordinator.
        reason: String,
    },
}

impl State {
    /// The state's name on the wire and in messages.
    pub fn name(&self) -> &'static str {
        match self {
            State::Idle { .. } => "idle",
            State::Fetching { .. } => "fetching",
            State::Staged { .. } => "staged",
            State::Switching { .. } => "switching",
            State::Baking { .. } => "baking",
            State::Reverting { .. } => "reverting",
        }
    }

    /// The release the host falls back to if everything in flight fails.
    pub fn committed(&self) -> Option<&ReleaseRef> {
        match self {
            State::Idle { committed }
            | State::Fetching { committed, .. }
            | State::Staged { committed, .. } => committed.as_ref(),
            State::Switching { previous, .. } | State::Baking { previous, .. } => previous.as_ref(),
            State::Reverting { to, .. } => to.as_ref(),
        }
    }

    /// The release in flight, if any.
    pub fn target(&self) -> Option<&ReleaseRef> {
        match self {
            State::Idle { .. } | State::Fetching { .. } => None,
            State::Staged { target, .. }
            | State::Switching { target, .. }
            | State::Baking { target, .. } => Some(target),
            State::Reverting { failed, .. } => Some(failed),
        }
    }
}

/// What happened, or what was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Install a bundle from `source`.
    Install {
        /// Path or URL.
        source: String,
    },
    /// The bundle verified and sits in the idle slot.
    Staged {
        /// Its release.
        target: ReleaseRef,
    },
    /// Staging failed; no slot in use was touched.
    StageFailed {
        /// `rejected` (verification) or `failed` (I/O, disk).
        kind: OutcomeKind,
        /// The release, when the manifest got that far.
        release: Option<ReleaseRef>,
        /// Why.
        reason: String,
    },
    /// Switch to the staged release.
    Switch,
    /// Switch back to the release in the other slot.
    Rollback {
        /// That release.
        target: ReleaseRef,
    },
    /// `current` flipped and the service restarted.
    Switched {
        /// When, ms since the epoch.
        at_ms: u64,
    },
    /// The bake passed.
    Healthy {
        /// How, e.g. "all 2 checks passed for 10s".
        reason: String,
    },
    /// The bake failed, or the switch itself did.
    Unhealthy {
        /// Why.
        reason: String,
    },
    /// `current` points back at the committed release and it restarted.
    Reverted,
    /// The agent started: resolve whatever was in flight.
    Recover,
}

impl Event {
    fn name(&self) -> &'static str {
        match self {
            Event::Install { .. } => "install",
            Event::Staged { .. } => "staged",
            Event::StageFailed { .. } => "stage failed",
            Event::Switch => "switch",
            Event::Rollback { .. } => "rollback",
            Event::Switched { .. } => "switched",
            Event::Healthy { .. } => "healthy",
            Event::Unhealthy { .. } => "unhealthy",
            Event::Reverted => "reverted",
            Event::Recover => "recover",
        }
    }
}

/// What the caller must do after persisting the new state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Verify and unpack the bundle into the idle slot; answer `Staged` or `StageFailed`.
    Stage {
        /// Path or URL.
        source: String,
    },
    /// Remove whatever is in the staging area.
    DiscardStaging,
    /// Point `current` at the slot holding `release`, or remove it and stop
    /// the service when `None` (a first install that failed).
    Activate {
        /// The release to run.
        release: Option<ReleaseRef>,
    },
    /// Restart the service; answer `Switched`, or `Unhealthy` if it would not start.
    Restart,
    /// Make sure `current` points at the committed release and the service
    /// runs, restarting nothing that already runs (an agent restart must not
    /// bounce services).
    EnsureRunning {
        /// The committed release.
        release: Option<ReleaseRef>,
    },
    /// Watch health for the bake; answer `Healthy` or `Unhealthy`.
    Bake,
    /// Append an outcome to the history.
    Record {
        /// How it ended.
        kind: OutcomeKind,
        /// The release concerned.
        release: Option<ReleaseRef>,
        /// Why.
        reason: String,
    },
}

/// An event that is not allowed in the current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {event} while the service is {state}{}", busy_hint(state))]
pub struct Disallowed {
    /// The current state's name.
    pub state: &'static str,
    /// The event's name.
    pub event: &'static str,
}

fn busy_hint(state: &str) -> &'static str {
    match state {
        "idle" => "",
        _ => "; wait for the operation in progress to finish (see `turnout-agent status`)",
    }
}

/// The transition function. Pure: no clock, no I/O.
pub fn next(state: State, event: Event) -> Result<(State, Vec<Effect>), Disallowed> {
    use Effect as E;
    use State as S;
    let disallowed = |state: &State, event: &Event| Disallowed {
        state: state.name(),
        event: event.name(),
    };
    match event {
        Event::Install { source } => match state {
            S::Idle { committed } => Ok((
                S::Fetching {
                    committed,
                    source: source.clone(),
                },
                vec![E::Stage { source }],
            )),
            S::Fetching { .. }
            | S::Staged { .. }
            | S::Switching { .. }
            | S::Baking { .. }
            | S::Reverting { .. } => Err(disallowed(&state, &Event::Install { source })),
        },
        Event::Staged { target } => match state {
            S::Fetching { committed, .. } => Ok((S::Staged { committed, target }, vec![])),
            S::Idle { .. }
            | S::Staged { .. }
            | S::Switching { .. }
            | S::Baking { .. }
            | S::Reverting { .. } => Err(disallowed(&state, &Event::Staged { target })),
        },
        Event::StageFailed {
            kind,
            release,
            reason,
        } => match state {
            S::Fetching { committed, .. } => Ok((
                S::Idle { committed },
                vec![
                    E::DiscardStaging,
                    E::Record {
                        kind,
                        release,
                        reason,
                    },
                ],
            )),
            S::Idle { .. }
            | S::Staged { .. }
            | S::Switching { .. }
            | S::Baking { .. }
            | S::Reverting { .. } => Err(disallowed(
                &state,
                &Event::StageFailed {
                    kind,
                    release,
                    reason,
                },
            )),
        },
        Event::Switch => match state {
            S::Staged { committed, target } => Ok((
                S::Switching {
                    previous: committed,
                    target: target.clone(),
                    operation: Operation::Install,
                },
                vec![
                    E::Activate {
                        release: Some(target),
                    },
                    E::Restart,
                ],
            )),
            S::Idle { .. }
            | S::Fetching { .. }
            | S::Switching { .. }
            | S::Baking { .. }
            | S::Reverting { .. } => Err(disallowed(&state, &Event::Switch)),
        },
        Event::Rollback { target } => match state {
            S::Idle {
                committed: Some(committed),
            } => Ok((
                S::Switching {
                    previous: Some(committed),
                    target: target.clone(),
                    operation: Operation::Rollback,
                },
                vec![
                    E::Activate {
                        release: Some(target),
                    },
                    E::Restart,
                ],
            )),
            S::Idle { committed: None }
            | S::Fetching { .. }
            | S::Staged { .. }
            | S::Switching { .. }
            | S::Baking { .. }
            | S::Reverting { .. } => Err(disallowed(&state, &Event::Rollback { target })),
        },
        Event::Switched { at_ms } => match state {
            S::Switching {
                previous,
                target,
                operation,
            } => Ok((
                S::Baking {
                    previous,
                    target,
                    operation,
                    since_ms: at_ms,
                },
                vec![E::Bake],
            )),
            S::Idle { .. }
            | S::Fetching { .. }
            | S::Staged { .. }
            | S::Baking { .. }
            | S::Reverting { .. } => Err(disallowed(&state, &Event::Switched { at_ms })),
        },
        Event::Healthy { reason } => match state {
            S::Baking { target, .. } => Ok((
                S::Idle {
                    committed: Some(target.clone()),
                },
                vec![E::Record {
                    kind: OutcomeKind::Committed,
                    release: Some(target),
                    reason,
                }],
            )),
            S::Idle { .. }
            | S::Fetching { .. }
            | S::Staged { .. }
            | S::Switching { .. }
            | S::Reverting { .. } => Err(disallowed(&state, &Event::Healthy { reason })),
        },
        Event::Unhealthy { reason } => match state {
            S::Switching {
                previous, target, ..
            }
            | S::Baking {
                previous, target, ..
            } => Ok((
                S::Reverting {
                    to: previous.clone(),
                    failed: target,
                    outcome: OutcomeKind::Reverted,
                    reason,
                },
                vec![E::Activate { release: previous }, E::Restart],
            )),
            S::Idle { .. } | S::Fetching { .. } | S::Staged { .. } | S::Reverting { .. } => {
                Err(disallowed(&state, &Event::Unhealthy { reason }))
            }
        },
        Event::Reverted => match state {
            S::Reverting {
                to,
                failed,
                outcome,
                reason,
            } => Ok((
                S::Idle { committed: to },
                vec![E::Record {
                    kind: outcome,
                    release: Some(failed),
                    reason,
                }],
            )),
            S::Idle { .. }
            | S::Fetching { .. }
            | S::Staged { .. }
            | S::Switching { .. }
            | S::Baking { .. } => Err(disallowed(&state, &Event::Reverted)),
        },
        Event::Recover => Ok(recover(state)),
    }
}

/// Where each state goes when the agent starts (see the module docs).
fn recover(state: State) -> (State, Vec<Effect>) {
    use Effect as E;
    use State as S;
    match state {
        S::Idle { committed } => (
            S::Idle {
                committed: committed.clone(),
            },
            vec![E::EnsureRunning { release: committed }],
        ),
        S::Fetching { committed, .. } => (
            S::Idle {
                committed: committed.clone(),
            },
            vec![E::DiscardStaging, E::EnsureRunning { release: committed }],
        ),
        S::Staged { committed, target } => (
            S::Idle {
                committed: committed.clone(),
            },
            vec![
                E::DiscardStaging,
                E::Record {
                    kind: OutcomeKind::Interrupted,
                    release: Some(target),
                    reason:
                        "the agent stopped after staging, before the switch; nothing was switched"
                            .into(),
                },
                E::EnsureRunning { release: committed },
            ],
        ),
        S::Switching {
            previous, target, ..
        }
        | S::Baking {
            previous, target, ..
        } => {
            let reason = format!(
                "the agent stopped while {} was switching or baking; reverted to {}",
                target.version,
                previous
                    .as_ref()
                    .map_or("nothing".into(), |p| p.version.to_string())
            );
            (
                S::Reverting {
                    to: previous.clone(),
                    failed: target,
                    outcome: OutcomeKind::Interrupted,
                    reason,
                },
                vec![E::Activate { release: previous }, E::Restart],
            )
        }
        S::Reverting {
            to,
            failed,
            outcome,
            reason,
        } => (
            S::Reverting {
                to: to.clone(),
                failed,
                outcome,
                reason,
            },
            vec![E::Activate { release: to }, E::Restart],
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(version: &str) -> ReleaseRef {
        ReleaseRef {
            name: "web".into(),
            version: version.parse().unwrap(),
            sha256: turnout_proto::Digest::from_bytes([version.len() as u8; 32]),
        }
    }

    /// Runs events from `state`, panicking on a disallowed one; returns the
    /// final state and every effect in order.
    fn run(mut state: State, events: Vec<Event>) -> (State, Vec<Effect>) {
        let mut effects = Vec::new();
        for event in events {
            let (s, e) = next(state.clone(), event.clone())
                .unwrap_or_else(|err| panic!("{event:?} in {state:?}: {err}"));
            state = s;
            effects.extend(e);
        }
        (state, effects)
    }

    fn install(source: &str) -> Event {
        Event::Install {
            source: source.into(),
        }
    }

    #[test]
    fn a_healthy_install_commits() {
        let (v1, v2) = (release("1.0.0"), release("2.0.0"));
        let (state, effects) = run(
            State::Idle {
                committed: Some(v1),
            },
            vec![
                install("v2.tnt"),
                Event::Staged { target: v2.clone() },
                Event::Switch,
                Event::Switched { at_ms: 5 },
                Event::Healthy {
                    reason: "ok".into(),
                },
            ],
        );
        assert_eq!(
            state,
            State::Idle {
                committed: Some(v2.clone())
            }
        );
        assert_eq!(
            effects,
            vec![
                Effect::Stage {
                    source: "v2.tnt".into()
                },
                Effect::Activate {
                    release: Some(v2.clone())
                },
                Effect::Restart,
                Effect::Bake,
                Effect::Record {
                    kind: OutcomeKind::Committed,
                    release: Some(v2),
                    reason: "ok".into()
                },
            ]
        );
    }

    #[test]
    fn an_unhealthy_bake_reverts_to_the_previous_release() {
        let (v1, v2) = (release("1.0.0"), release("2.0.0"));
        let (state, effects) = run(
            State::Idle {
                committed: Some(v1.clone()),
            },
            vec![
                install("v2.tnt"),
                Event::Staged { target: v2.clone() },
                Event::Switch,
                Event::Switched { at_ms: 5 },
                Event::Unhealthy {
                    reason: "503".into(),
                },
                Event::Reverted,
            ],
        );
        assert_eq!(
            state,
            State::Idle {
                committed: Some(v1.clone())
            }
        );
        assert_eq!(
            &effects[effects.len() - 3..],
            &[
                Effect::Activate { release: Some(v1) },
                Effect::Restart,
                Effect::Record {
                    kind: OutcomeKind::Reverted,
                    release: Some(v2),
                    reason: "503".into()
                },
            ]
        );
    }

    #[test]
    fn a_first_install_that_fails_leaves_nothing_running() {
        let v1 = release("1.0.0");
        let (state, effects) = run(
            State::Idle { committed: None },
            vec![
                install("v1.tnt"),
                Event::Staged { target: v1 },
                Event::Switch,
                Event::Unhealthy {
                    reason: "crash".into(),
                },
                Event::Reverted,
            ],
        );
        assert_eq!(state, State::Idle { committed: None });
        assert!(effects.contains(&Effect::Activate { release: None }));
    }

    #[test]
    fn a_rejected_bundle_touches_nothing_but_staging() {
        let v1 = release("1.0.0");
        let (state, effects) = run(
            State::Idle {
                committed: Some(v1.clone()),
            },
            vec![
                install("bad.tnt"),
                Event::StageFailed {
                    kind: OutcomeKind::Rejected,
                    release: None,
                    reason: "bad signature".into(),
                },
            ],
        );
        assert_eq!(
            state,
            State::Idle {
                committed: Some(v1)
            }
        );
        assert!(
            !effects
                .iter()
                .any(|e| matches!(e, Effect::Activate { .. } | Effect::Restart))
        );
    }

    #[test]
    fn rollback_switches_to_the_other_slot_and_bakes() {
        let (v1, v2) = (release("1.0.0"), release("2.0.0"));
        let (state, _) = run(
            State::Idle {
                committed: Some(v2.clone()),
            },
            vec![
                Event::Rollback { target: v1.clone() },
                Event::Switched { at_ms: 1 },
                Event::Healthy {
                    reason: "ok".into(),
                },
            ],
        );
        assert_eq!(
            state,
            State::Idle {
                committed: Some(v1)
            }
        );
        let err = next(
            State::Idle { committed: None },
            Event::Rollback { target: v2 },
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "cannot rollback while the service is idle");
    }

    #[test]
    fn a_second_install_while_one_runs_is_refused() {
        for state in [
            State::Fetching {
                committed: None,
                source: "a".into(),
            },
            State::Staged {
                committed: None,
                target: release("1.0.0"),
            },
            State::Baking {
                previous: None,
                target: release("1.0.0"),
                operation: Operation::Install,
                since_ms: 0,
            },
        ] {
            let err = next(state, install("b.tnt")).unwrap_err();
            assert!(
                err.to_string()
                    .contains("wait for the operation in progress"),
                "{err}"
            );
        }
    }

    #[test]
    fn recovery_before_the_switch_discards_staging_and_keeps_the_committed_release() {
        let (v1, v2) = (release("1.0.0"), release("2.0.0"));
        for state in [
            State::Fetching {
                committed: Some(v1.clone()),
                source: "v2.tnt".into(),
            },
            State::Staged {
                committed: Some(v1.clone()),
                target: v2,
            },
        ] {
            let (after, effects) = next(state, Event::Recover).unwrap();
            assert_eq!(
                after,
                State::Idle {
                    committed: Some(v1.clone())
                }
            );
            assert_eq!(effects[0], Effect::DiscardStaging);
            assert_eq!(
                effects.last(),
                Some(&Effect::EnsureRunning {
                    release: Some(v1.clone())
                })
            );
        }
    }

    #[test]
    fn recovery_from_the_switch_on_reverts_and_says_interrupted() {
        let (v1, v2) = (release("1.0.0"), release("2.0.0"));
        for state in [
            State::Switching {
                previous: Some(v1.clone()),
                target: v2.clone(),
                operation: Operation::Install,
            },
            State::Baking {
                previous: Some(v1.clone()),
                target: v2.clone(),
                operation: Operation::Install,
                since_ms: 3,
            },
        ] {
            let (after, effects) = run(state, vec![Event::Recover, Event::Reverted]);
            assert_eq!(
                after,
                State::Idle {
                    committed: Some(v1.clone())
                }
            );
            let Some(Effect::Record {
                kind,
                release,
                reason,
            }) = effects.last()
            else {
                panic!("{effects:?}")
            };
            assert_eq!(*kind, OutcomeKind::Interrupted);
            assert_eq!(release.as_ref(), Some(&v2));
            assert!(reason.contains("reverted to 1.0.0"), "{reason}");
        }
    }

    #[test]
    fn recovery_is_idempotent_mid_revert() {
        let v1 = release("1.0.0");
        let reverting = State::Reverting {
            to: Some(v1),
            failed: release("2.0.0"),
            outcome: OutcomeKind::Reverted,
            reason: "x".into(),
        };
        let (once, e1) = next(reverting.clone(), Event::Recover).unwrap();
        let (twice, e2) = next(once.clone(), Event::Recover).unwrap();
        assert_eq!(once, reverting);
        assert_eq!(twice, reverting);
        assert_eq!(e1, e2);
    }

    #[test]
    fn recovery_when_idle_restarts_nothing() {
        let v1 = release("1.0.0");
        let (_, effects) = next(
            State::Idle {
                committed: Some(v1.clone()),
            },
            Event::Recover,
        )
        .unwrap();
        assert_eq!(effects, vec![Effect::EnsureRunning { release: Some(v1) }]);
    }

    #[test]
    fn states_survive_the_journal_encoding() {
        let state = State::Baking {
            previous: Some(release("1.0.0")),
            target: release("2.0.0"),
            operation: Operation::Rollback,
            since_ms: 9,
        };
        let json = serde_json::to_string(&state).unwrap();
        assert!(json.starts_with(r#"{"state":"baking""#), "{json}");
        assert_eq!(serde_json::from_str::<State>(&json).unwrap(), state);
    }
}
