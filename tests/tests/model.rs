//! Model-based test of the rollout engine and the agents' convergence, under
//! timings and interleavings nobody chose: a seeded simulation of a fleet
//! whose agents download, install, bake, revert and go quiet at random,
//! driven by the real engine (`turnout::engine::step`), the real mapping of
//! reports to what the engine sees (`turnout::coordinator::host_view`), the
//! real start and rollback rules, and the real agent decision
//! (`turnout_agent::converge::decide`), with desired state that persists
//! between steps as it does on the wire. Operators pause, resume, promote,
//! abort, roll back (also old rollouts), forget hosts and restart the
//! coordinator in between.
//!
//! Invariants, checked at rest:
//! - when a rollout is rolled back, every host it counts as back runs its
//!   previous release, at rest; every other moved host is `rollback failed`
//!   with a reason or forgotten; the summary's counts are the hosts' phases;
//! - no host's desired state is a rolled-back rollout's release, set by it;
//! - a succeeded rollout's done hosts run its release;
//! - never two active rollouts of a service;
//! - once everything is quiet, every reachable host runs its desired
//!   release, unless that release failed on it.
//!
//! `MODEL_SEEDS=N` sets the number of seeds (default 5,000); a failure prints
//! its seed, and `MODEL_SEED=S` replays that one with its trace.

use std::collections::BTreeMap;
use std::time::Duration;

use turnout::coordinator::host_view;
use turnout::engine::{self, Action, Fleet, Input, Phase, Rollout, State};
use turnout::spec::{Amount, Offline, OnFailure, Promote, ReleaseSelector, RolloutSpec};
use turnout_agent::converge::{self, Decision};
use turnout_agent::journal::HistoryEntry;
use turnout_proto::messages::{
    Health, Outcome, OutcomeKind, ReleaseRef, ServiceReport, ServiceState,
};
use turnout_proto::{Digest, HostId, ServiceName};
use turnout_testkit::Rng;

/// One simulated step.
const STEP_MS: u64 = 250;
/// The coordinator's rollout tick.
const TICK_MS: u64 = 500;
/// A host is online when seen within this long.
const ONLINE_MS: u64 = 3_000;

fn release(major: u64) -> ReleaseRef {
    ReleaseRef {
        name: "web".into(),
        version: semver::Version::new(major, 0, 0),
        sha256: Digest::from_bytes([major as u8; 32]),
    }
}

fn service() -> ServiceName {
    "web".parse().unwrap()
}

/// What an agent is doing.
#[derive(Debug, Clone)]
enum Work {
    /// Waiting for its next poll.
    Idle,
    /// Installing (or switching back to) `release` for desired-state `index`.
    Busy {
        release: ReleaseRef,
        index: u64,
        /// From the other slot: no download.
        rollback: bool,
        fetched_at: u64,
        decided_at: u64,
        done_at: u64,
        fails: bool,
    },
}

/// One host's agent, following `turnout_agent::link`'s session loop: poll
/// (carrying the index it finished acting on), decide, act to the end,
/// report, poll again.
#[derive(Debug, Clone)]
struct Agent {
    committed: Option<ReleaseRef>,
    other: Option<ReleaseRef>,
    history: Vec<HistoryEntry>,
    work: Work,
    /// The index of the last desired state acted on in full (0 after a
    /// session ends, as in the real link).
    index: u64,
    link_down_until: u64,
    forgotten: bool,
}

impl Agent {
    fn state(&self, now: u64) -> ServiceState {
        match &self.work {
            Work::Idle => ServiceState::Idle,
            Work::Busy {
                fetched_at,
                decided_at,
                fails,
                ..
            } => {
                if now < *fetched_at {
                    ServiceState::Fetching
                } else if now < *decided_at || !fails {
                    ServiceState::Baking
                } else {
                    ServiceState::Reverting
                }
            }
        }
    }

    fn report(&self, now: u64) -> ServiceReport {
        let target = match &self.work {
            Work::Busy { release, .. } => Some(release.clone()),
            Work::Idle => None,
        };
        let last = self.history.first();
        ServiceReport {
            service: service(),
            state: self.state(now),
            active_slot: None,
            committed: self.committed.clone(),
            other: self.other.clone(),
            target,
            health: Health::Healthy,
            last_outcome: last.and_then(|h| {
                Some(Outcome {
                    kind: h.kind.clone(),
                    release: h.release.clone()?,
                    reason: h.reason.clone(),
                    at_ms: h.at_ms,
                })
            }),
            last_error: None,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct HostRecord {
    desired_index: u64,
    desired: Option<ReleaseRef>,
    /// The rollout that set `desired`, as the store's `desired.rollout`.
    desired_by: Option<String>,
    report: Option<ServiceReport>,
    acked: u64,
    last_seen: u64,
}

/// What reaches the coordinator, written at its next tick (like the real
/// batching of reports), and lost if it restarts first.
enum Delivery {
    Report(Box<ServiceReport>, u64),
    Poll(u64),
}

struct World {
    rng: Rng,
    now: u64,
    agents: BTreeMap<HostId, Agent>,
    hosts: BTreeMap<HostId, HostRecord>,
    /// In flight to the coordinator: (host, what, sent at, arrives at).
    /// One agent's requests are sequential, so they arrive in order.
    pending: Vec<(HostId, Delivery, u64, u64)>,
    last_arrival: BTreeMap<HostId, u64>,
    rollouts: Vec<Rollout>,
    /// Which releases fail their bake on which host.
    bad: BTreeMap<(HostId, u64), bool>,
    next_major: u64,
    trace: Vec<String>,
    tracing: bool,
}

impl World {
    fn new(seed: u64, tracing: bool) -> World {
        let mut rng = Rng(seed);
        let n = 2 + rng.below(9);
        let mut agents = BTreeMap::new();
        let mut hosts = BTreeMap::new();
        for i in 0..n {
            let id: HostId = format!("host-{i:02}").parse().unwrap();
            // Some hosts have never run the service.
            let committed = (!rng.chance(10)).then(|| release(1));
            agents.insert(
                id.clone(),
                Agent {
                    committed,
                    other: None,
                    history: Vec::new(),
                    work: Work::Idle,
                    index: 0,
                    link_down_until: 0,
                    forgotten: false,
                },
            );
            hosts.insert(id, HostRecord::default());
        }
        World {
            rng,
            now: 0,
            agents,
            hosts,
            pending: Vec::new(),
            last_arrival: BTreeMap::new(),
            rollouts: Vec::new(),
            bad: BTreeMap::new(),
            next_major: 2,
            trace: Vec::new(),
            tracing,
        }
    }

    fn note(&mut self, line: String) {
        if self.tracing {
            self.trace.push(format!("{:>7} {line}", self.now));
        }
    }

    fn link_up(&self, host: &HostId) -> bool {
        let agent = &self.agents[host];
        !agent.forgotten && self.now >= agent.link_down_until
    }

    /// Sends a report; a failed one ends the session (index back to 0).
    fn send_report(&mut self, host: &HostId) {
        if self.link_up(host) {
            let agent = &self.agents[host];
            let delivery = Delivery::Report(Box::new(agent.report(self.now)), agent.index);
            self.deliver(host, delivery);
        } else {
            self.agents.get_mut(host).unwrap().index = 0;
        }
    }

    /// Sends something to the coordinator with a random latency.
    fn deliver(&mut self, host: &HostId, delivery: Delivery) {
        let latency = if self.rng.chance(20) {
            self.rng.below(2_000)
        } else {
            0
        };
        let last = self.last_arrival.get(host).copied().unwrap_or(0);
        let arrives = (self.now + latency).max(last);
        self.last_arrival.insert(host.clone(), arrives);
        self.pending
            .push((host.clone(), delivery, self.now, arrives));
    }

    fn is_bad(&mut self, host: &HostId, major: u64) -> bool {
        let chance = if major == 1 { 0 } else { 25 };
        let roll = self.rng.chance(chance);
        *self.bad.entry((host.clone(), major)).or_insert(roll)
    }

    fn agent_step(&mut self, host: &HostId) {
        let now = self.now;
        let work = self.agents[host].work.clone();
        match work {
            Work::Busy {
                release,
                index,
                rollback,
                done_at,
                fails,
                ..
            } => {
                if now < done_at {
                    // Progress reports while working carry the old index.
                    if self.rng.chance(20) {
                        self.send_report(host);
                    }
                    return;
                }
                let a = self.agents.get_mut(host).unwrap();
                let kind = if fails {
                    // A failed install leaves its release in the idle slot.
                    if !rollback {
                        a.other = Some(release.clone());
                    }
                    OutcomeKind::Reverted
                } else {
                    let previous = a.committed.replace(release.clone());
                    a.other = previous;
                    OutcomeKind::Committed
                };
                a.history.insert(
                    0,
                    HistoryEntry {
                        kind: kind.clone(),
                        release: Some(release.clone()),
                        reason: "bake".into(),
                        at_ms: now,
                    },
                );
                a.work = Work::Idle;
                self.note(format!("{host} {kind} {}", release.version));
                self.send_report(host);
                if self.link_up(host) {
                    self.agents.get_mut(host).unwrap().index = index;
                    self.send_report(host);
                }
            }
            Work::Idle => {
                if !self.link_up(host) {
                    self.agents.get_mut(host).unwrap().index = 0;
                    return;
                }
                // The long poll: it acknowledges what was acted on, and
                // answers with the current desired state.
                let index = self.agents[host].index;
                self.deliver(host, Delivery::Poll(index));
                let (desired_index, desired) = {
                    let record = &self.hosts[host];
                    (record.desired_index, record.desired.clone())
                };
                if desired_index == index {
                    // Nothing new: a heartbeat report now and then.
                    if self.rng.chance(15) {
                        self.send_report(host);
                    }
                    return;
                }
                let Some(want) = desired else {
                    self.agents.get_mut(host).unwrap().index = desired_index;
                    self.send_report(host);
                    return;
                };
                let agent = &self.agents[host];
                let decision = converge::decide(
                    &want,
                    &converge::Local {
                        idle: true,
                        committed: agent.committed.as_ref(),
                        other: agent.other.as_ref(),
                        history: &agent.history,
                    },
                    true,
                );
                match decision {
                    Decision::Wait => {
                        unreachable!("the model's agents run one operation at a time")
                    }
                    Decision::Nothing | Decision::Refuse { .. } => {
                        self.agents.get_mut(host).unwrap().index = desired_index;
                        self.send_report(host);
                    }
                    Decision::Rollback | Decision::Install => {
                        let rollback = decision == Decision::Rollback;
                        let fetch = if rollback { 0 } else { self.rng.below(12_000) };
                        let bake = self.rng.below(6_000);
                        let revert = self.rng.below(3_000);
                        let fails = if rollback {
                            self.rng.chance(5)
                        } else {
                            self.is_bad(host, want.version.major)
                        };
                        self.note(format!(
                            "{host} starts {} {} (index {}){}",
                            if rollback {
                                "rollback to"
                            } else {
                                "install of"
                            },
                            want.version,
                            desired_index,
                            if fails { ", will fail" } else { "" }
                        ));
                        self.agents.get_mut(host).unwrap().work = Work::Busy {
                            release: want,
                            index: desired_index,
                            rollback,
                            fetched_at: now + fetch,
                            decided_at: now + fetch + bake,
                            done_at: now + fetch + bake + if fails { revert } else { 0 },
                            fails,
                        };
                        self.send_report(host);
                    }
                }
            }
        }
    }

    fn flush(&mut self) {
        let now = self.now;
        let (arrived, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(_, _, _, arrives)| *arrives <= now);
        self.pending = later;
        for (host, delivery, at, _) in arrived {
            let Some(record) = self.hosts.get_mut(&host) else {
                continue; // forgotten: its requests are refused
            };
            record.last_seen = record.last_seen.max(at);
            match delivery {
                Delivery::Report(report, acked) => {
                    record.report = Some(*report);
                    record.acked = record.acked.max(acked);
                }
                Delivery::Poll(acked) => record.acked = record.acked.max(acked),
            }
        }
    }

    fn fleet(&self, rollout: &Rollout) -> Fleet {
        self.hosts
            .iter()
            .filter(|(id, _)| rollout.hosts.contains_key(*id))
            .map(|(id, record)| {
                (
                    id.clone(),
                    host_view(
                        record.report.as_ref(),
                        self.now.saturating_sub(record.last_seen) <= ONLINE_MS
                            && record.last_seen > 0,
                        record.acked >= record.desired_index,
                    ),
                )
            })
            .collect()
    }

    /// Steps rollout `i` with `input`; applies its actions; checks what
    /// must hold when it finishes.
    fn step(&mut self, i: usize, input: Input) -> Result<(), String> {
        let before = &self.rollouts[i];
        if matches!(input, Input::Rollback { .. })
            && let Some(why) = engine::rollback_conflict(before, &self.rollouts)
        {
            self.note(format!("rollback of {} refused: {why}", before.id));
            return Ok(());
        }
        let was_finished = before.state.is_finished();
        let fleet = self.fleet(before);
        let Ok((after, actions)) = engine::step(before.clone(), input.clone(), self.now, &fleet)
        else {
            return Ok(());
        };
        if input != Input::Tick {
            self.note(format!("operator: {input:?} on {}", after.id));
        }
        let mut summary = None;
        for action in actions {
            match action {
                Action::SetDesired { host, release } => {
                    let record = self
                        .hosts
                        .get_mut(&host)
                        .ok_or("desired state set for a forgotten host")?;
                    record.desired_index += 1;
                    record.desired = Some(release);
                    record.desired_by = Some(after.id.clone());
                }
                Action::ClearDesired { host } => {
                    let record = self
                        .hosts
                        .get_mut(&host)
                        .ok_or("desired state cleared for a forgotten host")?;
                    record.desired_index += 1;
                    record.desired = None;
                    record.desired_by = Some(after.id.clone());
                }
                Action::Log { host, message } => {
                    if message.starts_with("rolled back: ") || message.starts_with("succeeded: ") {
                        summary = Some(message.clone());
                    }
                    self.note(format!(
                        "[{}] {} {message}",
                        after.id,
                        host.map_or("-".into(), |h| h.to_string())
                    ));
                }
            }
        }
        let newly_finished = !was_finished && after.state.is_finished();
        self.rollouts[i] = after;
        if newly_finished {
            self.check_finished(&self.rollouts[i], summary.as_deref())?;
        }
        Ok(())
    }

    fn check_finished(&self, rollout: &Rollout, summary: Option<&str>) -> Result<(), String> {
        match &rollout.state {
            State::RolledBack => {
                let (mut back, mut none, mut failed, mut forgotten) = (0, 0, 0, 0);
                for host in &rollout.switch_order {
                    let progress = &rollout.hosts[host];
                    let agent = &self.agents[host];
                    match &progress.phase {
                        Phase::Reverted => {
                            if progress.previous.is_some() {
                                back += 1;
                            } else {
                                none += 1;
                            }
                            if agent.committed != progress.previous
                                || !matches!(agent.work, Work::Idle)
                            {
                                return Err(format!(
                                    "{host} counted back on {:?}, but it runs {:?} ({:?})",
                                    progress.previous.as_ref().map(|r| &r.version),
                                    agent.committed.as_ref().map(|r| &r.version),
                                    agent.work
                                ));
                            }
                        }
                        Phase::RevertFailed { reason } if !reason.is_empty() => failed += 1,
                        Phase::Forgotten { .. } => forgotten += 1,
                        other => {
                            return Err(format!("{host} left in {other:?} by a finished rollback"));
                        }
                    }
                }
                let summary = summary.ok_or("no summary line")?;
                let expected =
                    format!("rolled back: {back} host(s) back on their previous release");
                if !summary.starts_with(&expected)
                    || (none > 0) != summary.contains(&format!("{none} ran no release before"))
                    || (failed > 0) != summary.contains(&format!("{failed} rollback failed"))
                    || (forgotten > 0) != summary.contains(&format!("{forgotten} forgotten"))
                {
                    return Err(format!(
                        "summary {summary:?} does not match the hosts: {back} back, {none} had none, {failed} failed, {forgotten} forgotten"
                    ));
                }
            }
            State::Succeeded => {
                for (host, progress) in &rollout.hosts {
                    if progress.phase == Phase::Done
                        && self.agents[host].committed.as_ref() != Some(&rollout.target)
                    {
                        return Err(format!(
                            "{host} counted done with {}, but runs {:?}",
                            rollout.target.version,
                            self.agents[host].committed.as_ref().map(|r| &r.version)
                        ));
                    }
                }
            }
            State::Failed { .. } | State::Aborted { .. } => {}
            other => return Err(format!("finished in {other:?}")),
        }
        Ok(())
    }

    fn check_always(&self) -> Result<(), String> {
        let active = self
            .rollouts
            .iter()
            .filter(|r| !r.state.is_finished())
            .count();
        if active > 1 {
            return Err(format!("{active} active rollouts of one service"));
        }
        // A later rollout may send a host back to a release it really ran,
        // even one whose own rollout was rolled back: what must never stay
        // is the rolled-back rollout's own instruction.
        for rolled_back in self
            .rollouts
            .iter()
            .filter(|r| r.state == State::RolledBack)
        {
            for (host, record) in &self.hosts {
                if record.desired.as_ref() == Some(&rolled_back.target)
                    && record.desired_by.as_deref() == Some(rolled_back.id.as_str())
                {
                    return Err(format!(
                        "{host}'s desired state names {}, whose rollout {} was rolled back",
                        rolled_back.target.version, rolled_back.id
                    ));
                }
            }
        }
        Ok(())
    }

    fn spec(&mut self, major: u64) -> RolloutSpec {
        let rng = &mut self.rng;
        RolloutSpec {
            service: service(),
            release: ReleaseSelector::Named {
                name: "web".into(),
                version: semver::Version::new(major, 0, 0),
            },
            selector: BTreeMap::new(),
            waves: vec![
                Amount::Count(1),
                Amount::Percent(50.0),
                Amount::Percent(100.0),
            ],
            max_parallel: 1 + rng.below(4) as usize,
            bake: Duration::from_millis(rng.below(3) * 1000),
            healthy_deadline: Duration::from_secs(20 + rng.below(30)),
            progress_deadline: Duration::from_secs(40 + rng.below(60)),
            max_failed: Amount::Count(rng.below(2) as usize),
            on_failure: if rng.chance(80) {
                OnFailure::Rollback
            } else {
                OnFailure::Pause
            },
            promote: if rng.chance(80) {
                Promote::Auto
            } else {
                Promote::Manual
            },
            offline: if rng.chance(70) {
                Offline::Skip
            } else {
                Offline::Fail
            },
        }
    }

    fn start(&mut self) {
        if let Some(why) = engine::start_conflict(&service(), &self.rollouts) {
            self.note(format!("start refused: {why}"));
            return;
        }
        let major = self.next_major;
        self.next_major += 1;
        let spec = self.spec(major);
        let id = format!("web-{major}");
        // As the coordinator's plan: hosts whose agent reported the service.
        let eligible: Vec<HostId> = self
            .hosts
            .iter()
            .filter(|(_, r)| r.report.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        if eligible.is_empty() {
            return;
        }
        let waves = engine::plan(&id, &spec, &eligible);
        self.note(format!("operator: start {id}"));
        self.rollouts
            .push(Rollout::new(id, spec, release(major), 1, waves, self.now));
    }

    fn operator(&mut self) -> Result<(), String> {
        let roll = self.rng.below(1000);
        let last = self.rollouts.len().checked_sub(1);
        match (roll, last) {
            (0..=14, _) => self.start(),
            (15..=22, Some(i)) => self.step(i, Input::Pause)?,
            (23..=34, Some(i)) => self.step(i, Input::Resume)?,
            (35..=44, Some(i)) => self.step(i, Input::Promote)?,
            (45..=47, Some(i)) => self.step(i, Input::Abort)?,
            (48..=57, Some(i)) => {
                let all_at_once = self.rng.chance(30);
                self.step(i, Input::Rollback { all_at_once })?;
            }
            (58..=60, Some(_)) => {
                // A rollback of any rollout, old ones too.
                let i = self.rng.below(self.rollouts.len() as u64) as usize;
                self.step(i, Input::Rollback { all_at_once: false })?;
            }
            (61, _) if self.hosts.len() > 1 => {
                let i = self.rng.below(self.hosts.len() as u64) as usize;
                let host = self.hosts.keys().nth(i).unwrap().clone();
                self.note(format!("operator: forget {host}"));
                self.hosts.remove(&host);
                self.agents.get_mut(&host).unwrap().forgotten = true;
            }
            (62..=63, _) => {
                // A coordinator restart: unwritten reports are lost, and
                // rollouts come back from what was stored.
                self.note("coordinator restarts".into());
                self.pending.clear();
                self.rollouts = self
                    .rollouts
                    .iter()
                    .map(|r| serde_json::from_str(&serde_json::to_string(r).unwrap()).unwrap())
                    .collect();
            }
            (64..=79, _) => {
                // A link freezes for a while (partition, stalled proxy).
                let i = self.rng.below(self.agents.len() as u64) as usize;
                let host = self.agents.keys().nth(i).unwrap().clone();
                let until = self.now + 1_000 + self.rng.below(20_000);
                self.note(format!("{host}'s link is down until {until}"));
                self.agents.get_mut(&host).unwrap().link_down_until = until;
            }
            _ => {}
        }
        Ok(())
    }

    fn tick(&mut self) -> Result<(), String> {
        self.flush();
        for i in 0..self.rollouts.len() {
            if !self.rollouts[i].state.is_finished() {
                self.step(i, Input::Tick)?;
            }
        }
        self.check_always()
    }

    fn advance(&mut self, operators: bool) -> Result<(), String> {
        self.now += STEP_MS;
        let hosts: Vec<HostId> = self.agents.keys().cloned().collect();
        for host in &hosts {
            self.agent_step(host);
        }
        if operators {
            self.operator()?;
        }
        if self.now.is_multiple_of(TICK_MS) {
            self.tick()?;
        }
        Ok(())
    }

    fn quiet(&self) -> bool {
        self.rollouts.iter().all(|r| r.state.is_finished())
            && self.agents.iter().all(|(host, a)| {
                a.forgotten
                    || (matches!(a.work, Work::Idle)
                        && self.now >= a.link_down_until
                        && a.index == self.hosts[host].desired_index)
            })
    }

    /// The whole run: random activity, then operators stop, links heal,
    /// every unfinished rollout is rolled back, and the fleet comes to rest.
    fn run(&mut self) -> Result<(), String> {
        self.start();
        let active_until = 45_000 + self.rng.below(45_000);
        while self.now < active_until {
            self.advance(true)?;
        }
        self.note("operators stop; links heal".into());
        for agent in self.agents.values_mut() {
            agent.link_down_until = 0;
        }
        let deadline = self.now + 400_000;
        while !self.quiet() {
            if self.now > deadline {
                return Err("the fleet did not come to rest".into());
            }
            if let Some(i) = self.rollouts.iter().position(|r| {
                matches!(
                    r.state,
                    State::Paused { .. }
                        | State::Running {
                            awaiting_promotion: true,
                            ..
                        }
                )
            }) {
                self.step(i, Input::Rollback { all_at_once: false })?;
            }
            self.advance(false)?;
        }
        self.check_rest()
    }

    /// At rest, every reachable host runs its desired release, unless that
    /// release failed on it (and so is not retried).
    fn check_rest(&self) -> Result<(), String> {
        for (host, record) in &self.hosts {
            let agent = &self.agents[host];
            let Some(want) = &record.desired else {
                continue;
            };
            if agent.committed.as_ref() == Some(want) {
                continue;
            }
            if converge::failed_here(want, &agent.history).is_none() {
                return Err(format!(
                    "{host} at rest on {:?}, told {}, which never failed on it",
                    agent.committed.as_ref().map(|r| &r.version),
                    want.version
                ));
            }
        }
        Ok(())
    }
}

fn run_seed(seed: u64, tracing: bool) -> Result<(), (String, Vec<String>)> {
    let mut world = World::new(seed, tracing);
    world
        .run()
        .map_err(|e| (e, std::mem::take(&mut world.trace)))
}

#[test]
fn rollbacks_leave_every_host_where_the_rollout_says_across_random_interleavings() {
    if let Ok(seed) = std::env::var("MODEL_SEED") {
        let seed: u64 = seed.parse().expect("MODEL_SEED is a number");
        if let Err((error, trace)) = run_seed(seed, true) {
            panic!("seed {seed}: {error}\n{}", trace.join("\n"));
        }
        return;
    }
    let seeds: u64 = std::env::var("MODEL_SEEDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(5_000);
    // Seeds are independent: share them among the cores, and report the
    // smallest failing one, so a failure replays the same way every time.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let failures: Vec<(u64, String)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|first| {
                scope.spawn(move || {
                    (first..seeds)
                        .step_by(threads as usize)
                        .find_map(|seed| run_seed(seed, false).err().map(|(e, _)| (seed, e)))
                })
            })
            .collect();
        workers
            .into_iter()
            .filter_map(|w| w.join().expect("a worker does not panic"))
            .collect()
    });
    if let Some((seed, error)) = failures.into_iter().min_by_key(|(seed, _)| *seed) {
        panic!(
            "seed {seed} of {seeds}: {error}\nreplay with its trace: MODEL_SEED={seed} cargo test -p turnout-tests --test model"
        );
    }
}
