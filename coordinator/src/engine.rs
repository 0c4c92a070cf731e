//! The rollout engine: cohorts and a pure step function (DESIGN.md §7).
//!
//! [`plan`] ranks the eligible hosts by sha256(rollout id ‖ 0 ‖ host id) and
//! cuts the ranking into cumulative waves. [`step`] takes a rollout, one
//! [`Input`] (a tick, or an operator's command), the time, and a snapshot of
//! what each host reports, and returns the new rollout and the [`Action`]s to
//! perform: desired-state changes and event-log lines. It reads no clock and
//! does no I/O, so the same inputs always give the same rollout and the same
//! event log; the caller persists the rollout after every step.
//!
//! ```text
//! running(wave k) ⇄ paused            running(last wave) → succeeded
//!        │ gate trips (on_failure = rollback), or the operator's rollback
//!        ▼
//!  rolling_back → rolled_back          abort (running, paused, rolling back) → aborted
//! ```
//!
//! A host moves `waiting → dispatched → committed → done`; it fails when it
//! reports a failed outcome for the target or misses `healthy_deadline`, and
//! is skipped or failed when offline at its turn. The gate trips when more
//! hosts failed than `max_failed` allows, or a wave misses `progress_deadline`.
//! Rollback takes every host that was dispatched, in the reverse of the order
//! they were dispatched, `max_parallel` at a time unless all at once, back to
//! the release it ran before.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use turnout_proto::messages::ReleaseRef;
use turnout_proto::{HostId, ServiceName};

use crate::spec::{Offline, OnFailure, Promote, RolloutSpec};

/// What the coordinator knows of one host, for the rollout's service.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostView {
    /// Reporting within its interval.
    pub online: bool,
    /// The release it has committed.
    pub committed: Option<ReleaseRef>,
    /// The last failure it reported (release and why), if its last outcome was one.
    pub failed: Option<(ReleaseRef, String)>,
    /// An install or revert is under way on it: its committed release is
    /// what it falls back to, not necessarily what runs.
    pub busy: bool,
    /// The service's last error as the host reported it (a refused
    /// release, a download it could not write, a journal it cannot write):
    /// what an operator reads when the host misses its deadline.
    pub last_error: Option<String>,
    /// It has acted on its current desired state: it asked for the desired
    /// state after the last change of it, or reported having done so. Until
    /// then, a report of being at rest says nothing about what it was told.
    pub acked: bool,
}

impl HostView {
    /// At rest on `release` (or on none) after acting on its desired state.
    pub fn at_rest_on(&self, release: Option<&ReleaseRef>) -> bool {
        self.acked
            && !self.busy
            && self.committed.as_ref().map(|c| &c.sha256) == release.map(|r| &r.sha256)
    }
}

/// A snapshot of the fleet as the engine sees it. A host of the rollout that
/// is absent was forgotten by an operator; offline hosts are present with
/// `online: false`.
pub type Fleet = BTreeMap<HostId, HostView>;

/// Where a rollout is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    /// Moving wave `wave` (0 is the canary).
    Running {
        /// The current wave.
        wave: usize,
        /// When it started, ms.
        wave_started_ms: u64,
        /// Done with the wave, waiting for `promote` (promote = manual).
        awaiting_promotion: bool,
    },
    /// Stopped by an operator or a tripped gate; in-flight hosts finish.
    Paused {
        /// The wave to resume.
        wave: usize,
        /// Why.
        reason: String,
    },
    /// Every wave done.
    Succeeded,
    /// Moving every dispatched host back.
    RollingBack {
        /// Why.
        reason: String,
        /// Ignore `max_parallel`.
        all_at_once: bool,
    },
    /// Every dispatched host is back (or could not be moved back, see hosts).
    RolledBack,
    /// Every wave ended, but no host runs the release: all were skipped
    /// (offline), failed within `max_failed`, or were forgotten.
    Failed {
        /// Why.
        reason: String,
    },
    /// Stopped for good; hosts stay where they are.
    Aborted {
        /// Why.
        reason: String,
    },
}

impl State {
    /// The state's name.
    pub fn name(&self) -> &'static str {
        match self {
            State::Running { .. } => "running",
            State::Paused { .. } => "paused",
            State::Succeeded => "succeeded",
            State::RollingBack { .. } => "rolling_back",
            State::RolledBack => "rolled_back",
            State::Failed { .. } => "failed",
            State::Aborted { .. } => "aborted",
        }
    }

    /// Whether the rollout is over.
    pub fn is_finished(&self) -> bool {
        matches!(
            self,
            State::Succeeded | State::RolledBack | State::Failed { .. } | State::Aborted { .. }
        )
    }
}

/// Where one host is in the rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// Not yet its turn.
    Waiting,
    /// Told to run the target since `at_ms`.
    Dispatched {
        /// When.
        at_ms: u64,
    },
    /// Committed the target at `at_ms`; the coordinator's bake runs.
    Committed {
        /// When.
        at_ms: u64,
    },
    /// Done.
    Done,
    /// Failed.
    Failed {
        /// Why.
        reason: String,
    },
    /// Offline at its turn, skipped.
    Skipped {
        /// Why.
        reason: String,
    },
    /// Told to go back to its previous release since `at_ms`.
    Reverting {
        /// When.
        at_ms: u64,
    },
    /// Back on its previous release.
    Reverted,
    /// Could not be moved back.
    RevertFailed {
        /// Why.
        reason: String,
    },
    /// Forgotten by an operator (`turnout host forget`): no longer part of
    /// the rollout, counted neither as failed nor as moved back.
    Forgotten {
        /// Where it was when it was forgotten.
        was: String,
    },
}

impl Phase {
    /// The phase's name, as the CLI, the API and `/metrics` show it.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Waiting => "waiting",
            Phase::Dispatched { .. } => "dispatched",
            Phase::Committed { .. } => "committed",
            Phase::Done => "done",
            Phase::Failed { .. } => "failed",
            Phase::Skipped { .. } => "skipped",
            Phase::Reverting { .. } => "reverting",
            Phase::Reverted => "reverted",
            Phase::RevertFailed { .. } => "revert_failed",
            Phase::Forgotten { .. } => "forgotten",
        }
    }
}

/// One host's part in the rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostProgress {
    /// Its wave.
    pub wave: usize,
    /// Where it is.
    #[serde(flatten)]
    pub phase: Phase,
    /// What it ran when dispatched: what a rollback restores.
    pub previous: Option<ReleaseRef>,
    /// Why it failed, kept when a rollback moves it on: the gate's count,
    /// and what an operator reads afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

impl HostProgress {
    /// Marks the host failed, keeping why beyond the phase (see `failure`).
    fn fail(&mut self, reason: String) {
        self.failure = Some(reason.clone());
        self.phase = Phase::Failed { reason };
    }
}

/// A rollout and everything the engine needs to continue it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// Its id.
    pub id: String,
    /// What was asked.
    pub spec: RolloutSpec,
    /// The release moved to.
    pub target: ReleaseRef,
    /// The bundle's size.
    pub size: u64,
    /// The hosts of each wave, in dispatch order.
    pub waves: Vec<Vec<HostId>>,
    /// Every selected host's progress.
    pub hosts: BTreeMap<HostId, HostProgress>,
    /// The order hosts were dispatched in: rollback goes in reverse.
    pub switch_order: Vec<HostId>,
    /// Where the rollout is.
    pub state: State,
}

/// What the engine is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Time passed or hosts reported: look at the fleet again.
    Tick,
    /// Stop dispatching; in-flight hosts finish.
    Pause,
    /// Continue a paused rollout.
    Resume,
    /// Start the next wave (promote = manual).
    Promote,
    /// Stop for good, leaving hosts where they are.
    Abort,
    /// Move every dispatched host back.
    Rollback {
        /// Ignore `max_parallel`.
        all_at_once: bool,
    },
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Set `host`'s desired release for the rollout's service.
    SetDesired {
        /// The host.
        host: HostId,
        /// The release.
        release: ReleaseRef,
    },
    /// Withdraw `host`'s desired release for the rollout's service: it had
    /// none before the rollout, so there is nothing to send it back to.
    ClearDesired {
        /// The host.
        host: HostId,
    },
    /// Append to the event log.
    Log {
        /// The host concerned, if one.
        host: Option<HostId>,
        /// What happened and why.
        message: String,
    },
}

/// A command the rollout's state does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {command} rollout {id}: it is {state}; {hint}")]
pub struct Refused {
    /// The rollout.
    pub id: String,
    /// The command.
    pub command: &'static str,
    /// The state's name.
    pub state: &'static str,
    /// What would work.
    pub hint: &'static str,
}

/// Ranks hosts for a rollout: sha256(rollout id ‖ 0 ‖ host id), ascending.
pub fn rank(rollout_id: &str, hosts: &[HostId]) -> Vec<HostId> {
    let mut keyed: Vec<([u8; 32], &HostId)> = hosts
        .iter()
        .map(|host| {
            let mut hasher = Sha256::new();
            hasher.update(rollout_id.as_bytes());
            hasher.update([0]);
            hasher.update(host.as_str().as_bytes());
            (hasher.finalize().into(), host)
        })
        .collect();
    keyed.sort();
    keyed.into_iter().map(|(_, host)| host.clone()).collect()
}

/// Cuts the ranked hosts into cumulative waves; each wave has at least one host.
pub fn plan(rollout_id: &str, spec: &RolloutSpec, eligible: &[HostId]) -> Vec<Vec<HostId>> {
    let ranked = rank(rollout_id, eligible);
    let total = ranked.len();
    let mut waves = Vec::new();
    let mut taken = 0;
    for amount in &spec.waves {
        if taken == total {
            break;
        }
        let upto = amount.of(total).max(taken + 1).min(total);
        waves.push(ranked[taken..upto].to_vec());
        taken = upto;
    }
    waves
}

impl Rollout {
    /// A new rollout at its canary.
    pub fn new(
        id: String,
        spec: RolloutSpec,
        target: ReleaseRef,
        size: u64,
        waves: Vec<Vec<HostId>>,
        now: u64,
    ) -> Rollout {
        let hosts = waves
            .iter()
            .enumerate()
            .flat_map(|(wave, hosts)| {
                hosts.iter().map(move |host| {
                    (
                        host.clone(),
                        HostProgress {
                            wave,
                            phase: Phase::Waiting,
                            previous: None,
                            failure: None,
                        },
                    )
                })
            })
            .collect();
        Rollout {
            id,
            spec,
            target,
            size,
            waves,
            hosts,
            switch_order: Vec::new(),
            state: State::Running {
                wave: 0,
                wave_started_ms: now,
                awaiting_promotion: false,
            },
        }
    }

    /// How many hosts failed.
    pub fn failed(&self) -> usize {
        self.hosts
            .values()
            .filter(|h| matches!(h.phase, Phase::Failed { .. }) || h.failure.is_some())
            .count()
    }

    /// How many failures the gate allows.
    pub fn allowed_failures(&self) -> usize {
        self.spec.max_failed.of(self.hosts.len())
    }

    fn refuse(&self, command: &'static str, hint: &'static str) -> Refused {
        Refused {
            id: self.id.clone(),
            command,
            state: self.state.name(),
            hint,
        }
    }
}

struct Out {
    actions: Vec<Action>,
}

impl Out {
    fn log(&mut self, host: Option<&HostId>, message: String) {
        self.actions.push(Action::Log {
            host: host.cloned(),
            message,
        });
    }
}

/// The step function; see the module docs.
pub fn step(
    mut rollout: Rollout,
    input: Input,
    now: u64,
    fleet: &Fleet,
) -> Result<(Rollout, Vec<Action>), Refused> {
    let mut out = Out {
        actions: Vec::new(),
    };
    if !rollout.state.is_finished() || matches!(input, Input::Rollback { .. }) {
        forget_absent(&mut rollout, fleet, &mut out);
    }
    match input {
        Input::Tick => match rollout.state.clone() {
            State::Running {
                wave,
                wave_started_ms,
                awaiting_promotion,
            } => {
                observe(&mut rollout, now, fleet, &mut out);
                if !awaiting_promotion {
                    run_wave(&mut rollout, wave, wave_started_ms, now, fleet, &mut out);
                }
            }
            State::Paused { .. } => observe(&mut rollout, now, fleet, &mut out),
            State::RollingBack { all_at_once, .. } => {
                roll_back(&mut rollout, all_at_once, now, fleet, &mut out);
            }
            State::Succeeded | State::RolledBack | State::Failed { .. } | State::Aborted { .. } => {
            }
        },
        Input::Pause => match rollout.state.clone() {
            State::Running { wave, .. } => {
                rollout.state = State::Paused {
                    wave,
                    reason: "paused by an operator".into(),
                };
                out.log(
                    None,
                    format!(
                        "paused in wave {}; hosts in flight finish, no new host starts",
                        wave + 1
                    ),
                );
            }
            State::Paused { .. } => {
                return Err(rollout.refuse("pause", "it is paused already; `resume` continues it"));
            }
            State::RollingBack { .. } => {
                return Err(rollout.refuse("pause", "a rollback runs to the end; `abort` stops it"));
            }
            State::Succeeded | State::RolledBack | State::Failed { .. } | State::Aborted { .. } => {
                return Err(rollout.refuse("pause", "it is finished"));
            }
        },
        Input::Resume => match rollout.state.clone() {
            State::Paused { wave, .. } => {
                rollout.state = State::Running {
                    wave,
                    wave_started_ms: now,
                    awaiting_promotion: false,
                };
                out.log(None, format!("resumed in wave {}", wave + 1));
                run_wave(&mut rollout, wave, now, now, fleet, &mut out);
            }
            State::Running { .. } => {
                return Err(rollout.refuse("resume", "it is running; `pause` stops it"));
            }
            State::RollingBack { .. } => {
                return Err(rollout.refuse(
                    "resume",
                    "a rollback cannot be resumed as a rollout; start a new rollout",
                ));
            }
            State::Succeeded | State::RolledBack | State::Failed { .. } | State::Aborted { .. } => {
                return Err(rollout.refuse("resume", "it is finished; start a new rollout"));
            }
        },
        Input::Promote => {
            match rollout.state.clone() {
                State::Running {
                    wave,
                    awaiting_promotion: true,
                    ..
                } => {
                    out.log(None, format!("promoted: wave {} starts", wave + 2));
                    start_wave(&mut rollout, wave + 1, now, fleet, &mut out);
                }
                State::Running {
                    awaiting_promotion: false,
                    ..
                } => {
                    return Err(rollout.refuse("promote", "it is not waiting for promotion (its wave is still moving, or promote = auto)"));
                }
                State::Paused { .. } => return Err(rollout.refuse("promote", "`resume` it first")),
                State::RollingBack { .. }
                | State::Succeeded
                | State::RolledBack
                | State::Failed { .. }
                | State::Aborted { .. } => {
                    return Err(rollout.refuse(
                        "promote",
                        "only a rollout waiting after a wave can be promoted",
                    ));
                }
            }
        }
        Input::Abort => match rollout.state.clone() {
            State::Running { .. } | State::Paused { .. } | State::RollingBack { .. } => {
                rollout.state = State::Aborted {
                    reason: "aborted by an operator".into(),
                };
                out.log(
                    None,
                    "aborted by an operator; hosts stay where they are".into(),
                );
            }
            State::Succeeded | State::RolledBack | State::Failed { .. } | State::Aborted { .. } => {
                return Err(
                    rollout.refuse("abort", "it is finished; `rollback` moves its hosts back")
                );
            }
        },
        Input::Rollback { all_at_once } => match rollout.state.clone() {
            State::Running { .. }
            | State::Paused { .. }
            | State::Succeeded
            | State::Failed { .. }
            | State::Aborted { .. } => {
                begin_rollback(
                    &mut rollout,
                    "rollback requested by an operator".into(),
                    all_at_once,
                    now,
                    fleet,
                    &mut out,
                );
            }
            // Idempotent: asking again changes nothing.
            State::RollingBack { .. } => out.log(
                None,
                "rollback requested again; it is already rolling back".into(),
            ),
            State::RolledBack => {
                return Err(rollout.refuse("rollback", "it is rolled back already"));
            }
        },
    }
    Ok((rollout, out.actions))
}

/// Why a rollout of `service` may not start, if it may not: one rollout of
/// a service is under way at a time. `all` is every rollout.
pub fn start_conflict(service: &ServiceName, all: &[Rollout]) -> Option<String> {
    all.iter()
        .find(|r| r.spec.service == *service && !r.state.is_finished())
        .map(|active| {
            format!(
                "rollout {} of service {} is still {}; finish, abort or roll it back first",
                active.id,
                active.spec.service,
                active.state.name()
            )
        })
}

/// Why a finished `rollout` may not be rolled back, if it may not: a newer
/// rollout of its service exists, or one is under way. Its hosts have moved
/// on since; sending them back to what they ran before it would undo the
/// newer rollout behind its back. `all` is every rollout, oldest first.
pub fn rollback_conflict(rollout: &Rollout, all: &[Rollout]) -> Option<String> {
    if !rollout.state.is_finished() {
        return None;
    }
    let position = all.iter().position(|r| r.id == rollout.id)?;
    let same_service = |r: &&Rollout| r.spec.service == rollout.spec.service && r.id != rollout.id;
    if let Some(active) = all
        .iter()
        .filter(same_service)
        .find(|r| !r.state.is_finished())
    {
        return Some(format!(
            "rollout {} of service {} is {}; roll that one back or abort it first",
            active.id,
            active.spec.service,
            active.state.name()
        ));
    }
    all[position + 1..].iter().rev().find(same_service).map(|newer| {
        let instead = if newer.state == State::RolledBack {
            String::new()
        } else {
            format!("roll back {} instead, or ", newer.id)
        };
        format!(
            "rollout {} of service {} came after it and its hosts have moved on; {instead}start a rollout of the release you want",
            newer.id, newer.spec.service
        )
    })
}

/// Takes hosts an operator forgot out of the rollout: nothing is sent to
/// them again, and they count neither as failed nor as moved back.
fn forget_absent(rollout: &mut Rollout, fleet: &Fleet, out: &mut Out) {
    for (host, progress) in rollout.hosts.iter_mut() {
        if fleet.contains_key(host) || matches!(progress.phase, Phase::Forgotten { .. }) {
            continue;
        }
        let was = progress.phase.name().to_owned();
        out.log(
            Some(host),
            format!("forgotten by an operator while {was}; no longer part of this rollout"),
        );
        progress.phase = Phase::Forgotten { was };
    }
}

/// Moves dispatched and committed hosts along by what they report.
fn observe(rollout: &mut Rollout, now: u64, fleet: &Fleet, out: &mut Out) {
    let target = rollout.target.clone();
    let (bake, deadline) = (
        rollout.spec.bake.as_millis() as u64,
        rollout.spec.healthy_deadline.as_millis() as u64,
    );
    for host in rollout.switch_order.clone() {
        let view = fleet.get(&host).cloned().unwrap_or_default();
        let progress = rollout
            .hosts
            .get_mut(&host)
            .expect("dispatched hosts are in the rollout");
        let failed_on_target = view
            .failed
            .as_ref()
            .filter(|(release, _)| release.sha256 == target.sha256);
        let runs_target = view
            .committed
            .as_ref()
            .is_some_and(|c| c.sha256 == target.sha256);
        // A host moves as far as what it reported allows, in one step: with
        // zero bake, a commit seen now is done now, not at the next tick.
        loop {
            let before = progress.phase.clone();
            match before.clone() {
                Phase::Dispatched { at_ms } => {
                    if let Some((_, reason)) = failed_on_target {
                        progress.fail(format!("the host reported: {reason}"));
                        out.log(Some(&host), format!("failed: {reason}"));
                    } else if runs_target {
                        progress.phase = Phase::Committed { at_ms: now };
                        out.log(Some(&host), format!("committed {}", target.version));
                    } else if now.saturating_sub(at_ms) >= deadline {
                        let reason = format!(
                            "not committed within healthy_deadline ({}){}",
                            humantime::format_duration(rollout.spec.healthy_deadline),
                            view.last_error
                                .as_ref()
                                .map_or(String::new(), |e| format!("; the host says: {e}"))
                        );
                        out.log(Some(&host), format!("failed: {reason}"));
                        progress.fail(reason);
                    }
                }
                Phase::Committed { at_ms } => {
                    if !runs_target {
                        let reason = failed_on_target.map_or(
                            "it no longer runs the target release".to_owned(),
                            |(_, r)| r.clone(),
                        );
                        out.log(Some(&host), format!("failed after committing: {reason}"));
                        progress.fail(reason);
                    } else if now.saturating_sub(at_ms) >= bake {
                        progress.phase = Phase::Done;
                        out.log(Some(&host), "done".into());
                    }
                }
                Phase::Waiting | Phase::Done | Phase::Failed { .. } | Phase::Skipped { .. } => {}
                Phase::Reverting { .. }
                | Phase::Reverted
                | Phase::RevertFailed { .. }
                | Phase::Forgotten { .. } => {}
            }
            if progress.phase == before {
                break;
            }
        }
    }
}

/// Dispatches, checks the gate and advances waves.
fn run_wave(
    rollout: &mut Rollout,
    wave: usize,
    wave_started_ms: u64,
    now: u64,
    fleet: &Fleet,
    out: &mut Out,
) {
    if let Some(reason) = gate(rollout) {
        trip(rollout, wave, reason, now, fleet, out);
        return;
    }
    let members = rollout.waves[wave].clone();
    // Counted once and kept up to date: a wave of 10,000 hosts is dispatched
    // in one pass, not in 10,000 passes over the wave.
    let mut in_flight = members
        .iter()
        .filter(|h| {
            matches!(
                rollout.hosts[*h].phase,
                Phase::Dispatched { .. } | Phase::Committed { .. }
            )
        })
        .count();
    for host in &members {
        if in_flight >= rollout.spec.max_parallel {
            break;
        }
        if rollout.hosts[host].phase != Phase::Waiting {
            continue;
        }
        let view = fleet.get(host).cloned().unwrap_or_default();
        if !view.online {
            let progress = rollout
                .hosts
                .get_mut(host)
                .expect("wave hosts are in the rollout");
            match rollout.spec.offline {
                Offline::Skip => {
                    progress.phase = Phase::Skipped {
                        reason: "offline at its turn".into(),
                    };
                    out.log(
                        Some(host),
                        "skipped: offline at its turn (offline = skip)".into(),
                    );
                }
                Offline::Fail => {
                    progress.fail("offline at its turn".into());
                    out.log(
                        Some(host),
                        "failed: offline at its turn (offline = fail)".into(),
                    );
                }
            }
            continue;
        }
        let progress = rollout
            .hosts
            .get_mut(host)
            .expect("wave hosts are in the rollout");
        progress.previous = view.committed.clone();
        progress.phase = Phase::Dispatched { at_ms: now };
        in_flight += 1;
        rollout.switch_order.push(host.clone());
        out.actions.push(Action::SetDesired {
            host: host.clone(),
            release: rollout.target.clone(),
        });
        out.log(
            Some(host),
            format!(
                "dispatched {} (was {})",
                rollout.target.version,
                view.committed
                    .map_or("nothing".into(), |c| c.version.to_string())
            ),
        );
    }
    if let Some(reason) = gate(rollout) {
        trip(rollout, wave, reason, now, fleet, out);
        return;
    }
    let settled = members.iter().all(|h| {
        matches!(
            rollout.hosts[h].phase,
            Phase::Done | Phase::Skipped { .. } | Phase::Failed { .. } | Phase::Forgotten { .. }
        )
    });
    if settled {
        let last = wave + 1 == rollout.waves.len();
        if last {
            finish(rollout, out);
        } else if rollout.spec.promote == Promote::Manual {
            rollout.state = State::Running {
                wave,
                wave_started_ms,
                awaiting_promotion: true,
            };
            out.log(
                None,
                format!(
                    "wave {} done; waiting for `turnout rollout promote` (promote = manual)",
                    wave + 1
                ),
            );
        } else {
            out.log(None, format!("wave {} done", wave + 1));
            start_wave(rollout, wave + 1, now, fleet, out);
        }
    } else if now.saturating_sub(wave_started_ms)
        >= rollout.spec.progress_deadline.as_millis() as u64
    {
        let reason = format!(
            "wave {} did not finish within progress_deadline ({})",
            wave + 1,
            humantime::format_duration(rollout.spec.progress_deadline)
        );
        trip(rollout, wave, reason, now, fleet, out);
    }
}

/// Ends a rollout whose last wave settled: a success only if some host runs
/// the release; every host skipped, failed or forgotten is no success.
fn finish(rollout: &mut Rollout, out: &mut Out) {
    let count = |f: fn(&Phase) -> bool| rollout.hosts.values().filter(|h| f(&h.phase)).count();
    let done = count(|p| *p == Phase::Done);
    let skipped = count(|p| matches!(p, Phase::Skipped { .. }));
    let failed = count(|p| matches!(p, Phase::Failed { .. }));
    let forgotten = count(|p| matches!(p, Phase::Forgotten { .. }));
    let mut tail = Vec::new();
    for (n, what) in [
        (skipped, "skipped offline"),
        (failed, "failed"),
        (forgotten, "forgotten"),
    ] {
        if n > 0 {
            tail.push(format!("{n} {what}"));
        }
    }
    let tail = if tail.is_empty() {
        String::new()
    } else {
        format!(" ({})", tail.join(", "))
    };
    if done == 0 {
        let reason = format!(
            "no host took {}: every wave ended with none done{tail}",
            rollout.target.version
        );
        out.log(None, format!("failed: {reason}"));
        rollout.state = State::Failed { reason };
    } else {
        out.log(
            None,
            format!(
                "succeeded: {done} host(s) run {}{tail}",
                rollout.target.version
            ),
        );
        rollout.state = State::Succeeded;
    }
}

fn start_wave(rollout: &mut Rollout, wave: usize, now: u64, fleet: &Fleet, out: &mut Out) {
    rollout.state = State::Running {
        wave,
        wave_started_ms: now,
        awaiting_promotion: false,
    };
    out.log(
        None,
        format!(
            "wave {} of {} starts: {} host(s)",
            wave + 1,
            rollout.waves.len(),
            rollout.waves[wave].len()
        ),
    );
    run_wave(rollout, wave, now, now, fleet, out);
}

/// Why the gate trips, if it does.
fn gate(rollout: &Rollout) -> Option<String> {
    let (failed, allowed) = (rollout.failed(), rollout.allowed_failures());
    (failed > allowed).then(|| {
        format!(
            "{failed} host(s) failed, more than max_failed = {} allows ({allowed})",
            rollout.spec.max_failed
        )
    })
}

fn trip(
    rollout: &mut Rollout,
    wave: usize,
    reason: String,
    now: u64,
    fleet: &Fleet,
    out: &mut Out,
) {
    match rollout.spec.on_failure {
        OnFailure::Rollback => begin_rollback(
            rollout,
            format!("gate tripped: {reason}"),
            false,
            now,
            fleet,
            out,
        ),
        OnFailure::Pause => {
            out.log(
                None,
                format!("gate tripped: {reason}; paused (on_failure = pause)"),
            );
            rollout.state = State::Paused { wave, reason };
        }
    }
}

fn begin_rollback(
    rollout: &mut Rollout,
    reason: String,
    all_at_once: bool,
    now: u64,
    fleet: &Fleet,
    out: &mut Out,
) {
    out.log(
        None,
        format!(
            "rolling back {} host(s) in reverse switch order{}: {reason}",
            rollout.switch_order.len(),
            if all_at_once { ", all at once" } else { "" }
        ),
    );
    rollout.state = State::RollingBack {
        reason,
        all_at_once,
    };
    roll_back(rollout, all_at_once, now, fleet, out);
}

/// Moves dispatched hosts back, newest first, `max_parallel` at a time.
///
/// Every dispatched host is told its previous release again (or has its
/// desired release withdrawn when it had none), whatever it last reported:
/// a host still downloading or baking the failed release reports its old
/// release as committed, and would go on to commit the new one if its
/// desired state still named it. A host counts as back only once it has
/// acted on that desired state and is at rest on its previous release.
fn roll_back(rollout: &mut Rollout, all_at_once: bool, now: u64, fleet: &Fleet, out: &mut Out) {
    let deadline = rollout.spec.healthy_deadline.as_millis() as u64;
    let limit = if all_at_once {
        usize::MAX
    } else {
        rollout.spec.max_parallel
    };
    let order: Vec<HostId> = rollout.switch_order.iter().rev().cloned().collect();
    for host in &order {
        let view = fleet.get(host).cloned().unwrap_or_default();
        let progress = rollout
            .hosts
            .get_mut(host)
            .expect("dispatched hosts are in the rollout");
        let Phase::Reverting { at_ms } = progress.phase else {
            continue;
        };
        if let Some((phase, message)) = judge_revert(progress.previous.as_ref(), &view) {
            progress.phase = phase;
            out.log(Some(host), message);
        } else if now.saturating_sub(at_ms) >= deadline {
            let reason = format!(
                "not back on {} within healthy_deadline ({}){}; its desired state still names it, so it goes back when it can",
                progress
                    .previous
                    .as_ref()
                    .map_or("no release".into(), |p| p.version.to_string()),
                humantime::format_duration(rollout.spec.healthy_deadline),
                if view.online { "" } else { ": it is offline" }
            );
            out.log(Some(host), format!("rollback failed: {reason}"));
            progress.phase = Phase::RevertFailed { reason };
        }
    }
    let mut reverting = rollout
        .hosts
        .values()
        .filter(|h| matches!(h.phase, Phase::Reverting { .. }))
        .count();
    for host in &order {
        if reverting >= limit {
            break;
        }
        let progress = rollout
            .hosts
            .get_mut(host)
            .expect("dispatched hosts are in the rollout");
        if matches!(
            progress.phase,
            Phase::Reverting { .. }
                | Phase::Reverted
                | Phase::RevertFailed { .. }
                | Phase::Forgotten { .. }
        ) {
            continue;
        }
        progress.phase = Phase::Reverting { at_ms: now };
        reverting += 1;
        match progress.previous.clone() {
            None => {
                out.actions
                    .push(Action::ClearDesired { host: host.clone() });
                out.log(
                    Some(host),
                    format!(
                        "rolling back: it ran no release before this rollout; its desired {} is withdrawn",
                        rollout.target.version
                    ),
                );
            }
            Some(previous) => {
                out.actions.push(Action::SetDesired {
                    host: host.clone(),
                    release: previous.clone(),
                });
                out.log(Some(host), format!("rolling back to {}", previous.version));
            }
        }
    }
    let finished = order.iter().all(|h| {
        matches!(
            rollout.hosts[h].phase,
            Phase::Reverted | Phase::RevertFailed { .. } | Phase::Forgotten { .. }
        )
    });
    if finished {
        rollout.state = State::RolledBack;
        let count =
            |f: fn(&HostProgress) -> bool| order.iter().filter(|h| f(&rollout.hosts[*h])).count();
        let back = count(|h| h.phase == Phase::Reverted && h.previous.is_some());
        let none_before = count(|h| h.phase == Phase::Reverted && h.previous.is_none());
        let failed = count(|h| matches!(h.phase, Phase::RevertFailed { .. }));
        let forgotten = count(|h| matches!(h.phase, Phase::Forgotten { .. }));
        let mut parts = vec![format!("{back} host(s) back on their previous release")];
        if none_before > 0 {
            parts.push(format!(
                "{none_before} ran no release before and run none now"
            ));
        }
        if failed > 0 {
            parts.push(format!(
                "{failed} rollback failed (`turnout rollout status {}` says why)",
                rollout.id
            ));
        }
        if forgotten > 0 {
            parts.push(format!("{forgotten} forgotten"));
        }
        out.log(None, format!("rolled back: {}", parts.join("; ")));
    }
}

/// Whether a host told to go back is back, or can no longer get there; None
/// while it has not acted on its desired state, or is still busy.
fn judge_revert(previous: Option<&ReleaseRef>, view: &HostView) -> Option<(Phase, String)> {
    if !view.acked || view.busy {
        return None;
    }
    if view.at_rest_on(previous) {
        let message = previous.map_or("rolled back: it runs no release, as before".into(), |p| {
            format!("rolled back: at rest on {}", p.version)
        });
        return Some((Phase::Reverted, message));
    }
    let now_runs = view
        .committed
        .as_ref()
        .map_or("no release".into(), |c| format!("{} {}", c.name, c.version));
    let reason = match previous {
        None => format!(
            "it ran no release before this rollout and has committed {now_runs}; there is none to go back to"
        ),
        Some(previous) => {
            let why = view
                .failed
                .as_ref()
                .filter(|(r, _)| r.sha256 == previous.sha256)
                .map_or(String::new(), |(_, why)| format!(": {why}"));
            format!(
                "told to go back to {} {}, it is at rest on {now_runs}{why}",
                previous.name, previous.version
            )
        }
    };
    Some((
        Phase::RevertFailed {
            reason: reason.clone(),
        },
        format!("rollback failed: {reason}"),
    ))
}

#[cfg(test)]
mod tests;
