//! Table-driven tests of the engine with a simulated fleet, and properties
//! over random fleets and command orders.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use proptest::prelude::*;
use turnout_proto::messages::ReleaseRef;
use turnout_proto::{Digest, HostId};

use super::*;
use crate::spec::{Amount, Offline, OnFailure, Promote, ReleaseSelector, RolloutSpec};

fn release(version: &str, fill: u8) -> ReleaseRef {
    ReleaseRef {
        name: "web".into(),
        version: version.parse().unwrap(),
        sha256: Digest::from_bytes([fill; 32]),
    }
}

fn spec(waves: &[Amount]) -> RolloutSpec {
    RolloutSpec {
        service: "web".parse().unwrap(),
        release: ReleaseSelector::Named {
            name: "web".into(),
            version: "2.0.0".parse().unwrap(),
        },
        selector: BTreeMap::new(),
        waves: waves.to_vec(),
        max_parallel: 2,
        bake: Duration::from_secs(2),
        healthy_deadline: Duration::from_secs(60),
        progress_deadline: Duration::from_secs(600),
        max_failed: Amount::Count(0),
        on_failure: OnFailure::Rollback,
        promote: Promote::Auto,
        offline: Offline::Skip,
    }
}

fn hosts(n: usize) -> Vec<HostId> {
    (0..n)
        .map(|i| format!("host-{i:02}").parse().unwrap())
        .collect()
}

/// A fleet that obeys desired state: a host commits what it is told one
/// second later, except hosts in `bad`, which report a failure for the target.
struct Sim {
    rollout: Rollout,
    fleet: Fleet,
    now: u64,
    log: Vec<String>,
    /// Every SetDesired, in order.
    sets: Vec<(HostId, ReleaseRef)>,
    bad: BTreeSet<HostId>,
    /// Desired states not yet acted on; None withdraws the service's.
    pending: BTreeMap<HostId, Option<ReleaseRef>>,
    /// Every host's desired release, as the coordinator would serve it.
    desired: BTreeMap<HostId, ReleaseRef>,
}

impl Sim {
    fn new(spec: RolloutSpec, n: usize, bad: &[usize]) -> Sim {
        let all = hosts(n);
        let v1 = release("1.0.0", 1);
        let fleet = all
            .iter()
            .map(|h| {
                (
                    h.clone(),
                    HostView {
                        online: true,
                        committed: Some(v1.clone()),
                        failed: None,
                        busy: false,
                        acked: true,
                        last_error: None,
                    },
                )
            })
            .collect();
        let waves = plan("r-1", &spec, &all);
        Sim {
            rollout: Rollout::new("r-1".into(), spec, release("2.0.0", 2), 100, waves, 0),
            fleet,
            now: 0,
            log: Vec::new(),
            sets: Vec::new(),
            bad: bad.iter().map(|i| all[*i].clone()).collect(),
            pending: BTreeMap::new(),
            desired: BTreeMap::new(),
        }
    }

    fn apply(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::SetDesired { host, release } => {
                    self.sets.push((host.clone(), release.clone()));
                    self.fleet.get_mut(&host).unwrap().acked = false;
                    self.desired.insert(host.clone(), release.clone());
                    self.pending.insert(host, Some(release));
                }
                Action::ClearDesired { host } => {
                    self.fleet.get_mut(&host).unwrap().acked = false;
                    self.desired.remove(&host);
                    self.pending.insert(host, None);
                }
                Action::Log { host, message } => {
                    self.log.push(format!(
                        "{} {} {message}",
                        self.now,
                        host.map_or("-".into(), |h| h.to_string())
                    ));
                }
            }
        }
    }

    fn input(&mut self, input: Input) -> Result<(), Refused> {
        let (rollout, actions) = step(self.rollout.clone(), input, self.now, &self.fleet)?;
        self.rollout = rollout;
        self.apply(actions);
        Ok(())
    }

    /// Agents act on what they were told, then a second passes and the engine ticks.
    fn second(&mut self) {
        for (host, release) in std::mem::take(&mut self.pending) {
            let view = self.fleet.get_mut(&host).unwrap();
            view.acked = true;
            let Some(release) = release else { continue };
            if self.bad.contains(&host) && release.version.major == 2 {
                view.failed = Some((release, "check http failed 3 times in a row".into()));
            } else {
                view.committed = Some(release);
            }
        }
        self.now += 1000;
        self.input(Input::Tick).unwrap();
    }

    fn run(&mut self, seconds: usize) {
        self.input(Input::Tick).unwrap();
        for _ in 0..seconds {
            if self.rollout.state.is_finished() {
                return;
            }
            self.second();
        }
    }

    fn order_of(&self, version: u64) -> Vec<HostId> {
        self.sets
            .iter()
            .filter(|(_, r)| r.version.major == version)
            .map(|(h, _)| h.clone())
            .collect()
    }
}

#[test]
fn cohorts_are_cumulative_deterministic_and_at_least_one_host_each() {
    let all = hosts(10);
    let three = spec(&[
        Amount::Count(1),
        Amount::Percent(30.0),
        Amount::Percent(100.0),
    ]);
    let waves = plan("r-1", &three, &all);
    assert_eq!(waves.iter().map(Vec::len).collect::<Vec<_>>(), [1, 2, 7]);
    assert_eq!(waves, plan("r-1", &three, &all));
    assert_ne!(
        waves,
        plan("r-2", &three, &all),
        "another rollout id shuffles the fleet differently"
    );
    let mut reversed = all;
    reversed.reverse();
    assert_eq!(
        waves,
        plan("r-1", &three, &reversed),
        "input order does not matter"
    );
    // Tiny shares still move one host per wave; waves past the fleet are dropped.
    let waves = plan(
        "r-1",
        &spec(&[
            Amount::Percent(1.0),
            Amount::Percent(2.0),
            Amount::Count(50),
        ]),
        &hosts(3),
    );
    assert_eq!(waves.iter().map(Vec::len).collect::<Vec<_>>(), [1, 1, 1]);
}

#[test]
fn happy_path_through_every_wave() {
    let mut sim = Sim::new(
        spec(&[
            Amount::Count(1),
            Amount::Percent(30.0),
            Amount::Percent(100.0),
        ]),
        10,
        &[],
    );
    sim.run(60);
    assert_eq!(sim.rollout.state, State::Succeeded, "{:#?}", sim.log);
    assert!(sim.rollout.hosts.values().all(|h| h.phase == Phase::Done));
    let planned: Vec<HostId> = sim.rollout.waves.concat();
    assert_eq!(sim.order_of(2), planned, "dispatch follows the plan");
    assert!(
        sim.log
            .iter()
            .any(|l| l.contains("wave 3 of 3 starts: 7 host(s)"))
    );
}

#[test]
fn with_zero_bake_a_commit_report_starts_the_next_wave_in_the_same_step() {
    let mut zero = spec(&[Amount::Count(1), Amount::Percent(100.0)]);
    zero.bake = Duration::ZERO;
    zero.max_parallel = 10;
    let mut sim = Sim::new(zero, 4, &[]);
    sim.input(Input::Tick).unwrap();
    assert_eq!(sim.sets.len(), 1, "only the canary is dispatched");
    // One step after the canary's commit: the canary is done and wave 2 dispatched.
    sim.second();
    assert_eq!(sim.sets.len(), 4, "{:#?}", sim.log);
    sim.second();
    assert_eq!(sim.rollout.state, State::Succeeded, "{:#?}", sim.log);
    assert!(sim.log.iter().any(|l| l.ends_with("committed 2.0.0")));
}

#[test]
fn a_host_still_reverting_is_not_back_until_it_reports_at_rest() {
    let mut sim = Sim::new(spec(&[Amount::Count(1), Amount::Percent(100.0)]), 3, &[]);
    sim.input(Input::Tick).unwrap();
    let (canary, v2) = sim.sets[0].clone();
    // Its agent decided to revert: it says so while still switching back,
    // its committed release (what it falls back to) still 1.0.0.
    let view = sim.fleet.get_mut(&canary).unwrap();
    view.failed = Some((v2, "reverting: check http failed".into()));
    view.busy = true;
    sim.now += 1000;
    sim.input(Input::Tick).unwrap();
    assert!(
        matches!(sim.rollout.state, State::RollingBack { .. }),
        "{:?}",
        sim.rollout.state
    );
    assert!(
        matches!(sim.rollout.hosts[&canary].phase, Phase::Reverting { .. }),
        "not back while its revert runs: {:#?}",
        sim.log
    );
    assert_eq!(
        sim.sets.last().unwrap(),
        &(canary.clone(), release("1.0.0", 1)),
        "it reverts on its own, and is told its previous release all the same"
    );
    // It acted on being told (nothing to do: it is going back already), but
    // it is not back while the revert runs.
    sim.fleet.get_mut(&canary).unwrap().acked = true;
    sim.now += 1000;
    sim.input(Input::Tick).unwrap();
    assert!(matches!(
        sim.rollout.hosts[&canary].phase,
        Phase::Reverting { .. }
    ));
    sim.fleet.get_mut(&canary).unwrap().busy = false;
    sim.now += 1000;
    sim.input(Input::Tick).unwrap();
    assert_eq!(sim.rollout.hosts[&canary].phase, Phase::Reverted);
    assert_eq!(sim.rollout.state, State::RolledBack);
}

/// The defect found against a live fleet: a host still downloading when the
/// gate trips reports its old release as committed. It used to be counted
/// "already back" and sent nothing, kept a desired state naming the failed
/// release, and committed it 29 s later while the rollout said rolled back.
#[test]
fn a_host_still_downloading_when_the_gate_trips_is_sent_back_and_waited_for() {
    let mut spec = spec(&[Amount::Count(1), Amount::Percent(100.0)]);
    spec.max_failed = Amount::Count(0);
    spec.max_parallel = 3;
    let mut sim = Sim::new(spec, 4, &[]);
    let (v1, v2) = (release("1.0.0", 1), release("2.0.0", 2));
    sim.run(3);
    assert!(
        matches!(sim.rollout.state, State::Running { wave: 1, .. }),
        "{:#?}",
        sim.log
    );
    // Wave 2 is dispatched; one host fails at once, another is still
    // downloading: it acted on nothing yet and still reports 1.0.0.
    let wave = sim.rollout.waves[1].clone();
    let (failing, slow) = (wave[0].clone(), wave[1].clone());
    sim.pending.remove(&slow);
    sim.fleet.get_mut(&failing).unwrap().failed = Some((v2.clone(), "check failed".into()));
    sim.pending.remove(&failing);
    sim.fleet.get_mut(&failing).unwrap().acked = true;
    sim.now += 1000;
    sim.input(Input::Tick).unwrap();
    assert!(
        matches!(sim.rollout.state, State::RollingBack { .. }),
        "{:#?}",
        sim.log
    );
    assert_eq!(
        sim.desired[&slow], v1,
        "the slow host is told its previous release again"
    );
    // Its report (at rest on 1.0.0, but from before it acted) proves nothing.
    for _ in 0..5 {
        sim.now += 1000;
        sim.input(Input::Tick).unwrap();
        assert!(
            matches!(sim.rollout.hosts[&slow].phase, Phase::Reverting { .. }),
            "{:#?}",
            sim.log
        );
    }
    // Its download finishes and it commits 2.0.0 (it had not seen the change
    // yet); then it acts on its desired state: back to 1.0.0.
    sim.fleet.get_mut(&slow).unwrap().committed = Some(v2);
    sim.now += 1000;
    sim.input(Input::Tick).unwrap();
    assert!(matches!(
        sim.rollout.hosts[&slow].phase,
        Phase::Reverting { .. }
    ));
    sim.run(5);
    assert_eq!(sim.rollout.state, State::RolledBack, "{:#?}", sim.log);
    for host in &sim.rollout.switch_order {
        assert_eq!(sim.rollout.hosts[host].phase, Phase::Reverted, "{host}");
        assert_eq!(sim.fleet[host].committed.as_ref(), Some(&v1), "{host}");
        assert_eq!(sim.desired[host], v1, "{host}'s desired state");
    }
    assert!(
        sim.log
            .last()
            .unwrap()
            .contains("rolled back: 4 host(s) back on their previous release"),
        "{:#?}",
        sim.log
    );
}

#[test]
fn a_host_that_cannot_get_back_is_rollback_failed_with_its_reason() {
    let mut sim = Sim::new(spec(&[Amount::Count(1), Amount::Percent(100.0)]), 3, &[]);
    sim.bad.insert(sim.rollout.waves[0][0].clone());
    // The canary ran nothing before: it has nothing to go back to.
    let canary = sim.rollout.waves[0][0].clone();
    sim.fleet.get_mut(&canary).unwrap().committed = None;
    sim.run(20);
    assert_eq!(sim.rollout.state, State::RolledBack, "{:#?}", sim.log);
    assert!(
        !sim.desired.contains_key(&canary),
        "its desired release is withdrawn"
    );
    assert_eq!(
        sim.rollout.hosts[&canary].phase,
        Phase::Reverted,
        "it runs nothing, as before"
    );
    assert!(
        sim.log.last().unwrap().contains(
            "0 host(s) back on their previous release; 1 ran no release before and run none now"
        ),
        "{:#?}",
        sim.log
    );
}

#[test]
fn a_rollout_where_every_host_was_skipped_does_not_succeed() {
    let mut sim = Sim::new(spec(&[Amount::Count(1), Amount::Percent(100.0)]), 3, &[]);
    for view in sim.fleet.values_mut() {
        view.online = false;
    }
    sim.run(10);
    assert!(
        matches!(&sim.rollout.state, State::Failed { reason } if reason.contains("3 skipped offline")),
        "{:?}",
        sim.rollout.state
    );
}

#[test]
fn a_forgotten_host_leaves_the_rollout_and_rollback_still_works() {
    let mut spec = spec(&[Amount::Count(1), Amount::Percent(100.0)]);
    spec.max_parallel = 5;
    let mut sim = Sim::new(spec, 4, &[]);
    sim.run(4);
    let wave = sim.rollout.waves[1].clone();
    sim.fleet.remove(&wave[0]);
    sim.pending.remove(&wave[0]);
    sim.input(Input::Tick).unwrap();
    assert!(matches!(
        sim.rollout.hosts[&wave[0]].phase,
        Phase::Forgotten { .. }
    ));
    sim.input(Input::Rollback { all_at_once: false }).unwrap();
    sim.run(10);
    assert_eq!(sim.rollout.state, State::RolledBack, "{:#?}", sim.log);
    assert!(
        sim.sets.iter().filter(|(h, _)| *h == wave[0]).count() == 1,
        "nothing more is sent to a forgotten host"
    );
    assert!(
        sim.log.last().unwrap().contains("1 forgotten"),
        "{:#?}",
        sim.log
    );
}

#[test]
fn an_old_rollout_cannot_be_rolled_back_once_a_newer_one_exists() {
    let old = Sim::new(spec(&[Amount::Percent(100.0)]), 2, &[]);
    let mut done = old.rollout;
    done.state = State::Succeeded;
    let mut newer = done.clone();
    newer.id = "r-2".into();
    let why = rollback_conflict(&done, &[done.clone(), newer.clone()]).expect("refused");
    assert!(
        why.contains("rollout r-2 of service web came after it"),
        "{why}"
    );
    newer.state = State::Running {
        wave: 0,
        wave_started_ms: 0,
        awaiting_promotion: false,
    };
    let why = rollback_conflict(&done, &[done.clone(), newer.clone()]).expect("refused");
    assert!(
        why.contains("rollout r-2 of service web is running"),
        "{why}"
    );
    assert_eq!(rollback_conflict(&done, std::slice::from_ref(&done)), None);
    assert_eq!(
        rollback_conflict(&newer, &[done, newer.clone()]),
        None,
        "the active one may"
    );
}

#[test]
fn never_more_than_max_parallel_in_flight() {
    let mut sim = Sim::new(spec(&[Amount::Percent(100.0)]), 9, &[]);
    sim.input(Input::Tick).unwrap();
    let in_flight = sim
        .rollout
        .hosts
        .values()
        .filter(|h| matches!(h.phase, Phase::Dispatched { .. }))
        .count();
    assert_eq!(in_flight, 2);
    sim.run(60);
    assert_eq!(sim.rollout.state, State::Succeeded);
}

#[test]
fn a_failing_canary_rolls_back_and_no_other_host_gets_the_release() {
    let mut sim = Sim::new(spec(&[Amount::Count(1), Amount::Percent(100.0)]), 10, &[]);
    sim.bad.insert(sim.rollout.waves[0][0].clone());
    sim.run(60);
    assert_eq!(sim.rollout.state, State::RolledBack, "{:#?}", sim.log);
    assert_eq!(
        sim.order_of(2),
        sim.rollout.waves[0],
        "only the canary was dispatched"
    );
    let canary = &sim.rollout.waves[0][0];
    assert!(
        sim.log
            .iter()
            .any(|l| l.contains(&format!("{canary} failed: check http failed 3 times"))),
        "{:#?}",
        sim.log
    );
    assert!(sim.log.iter().any(|l| {
        l.contains("gate tripped: 1 host(s) failed, more than max_failed = 0 allows (0)")
    }));
}

#[test]
fn a_failure_in_the_last_wave_rolls_back_every_moved_host_in_reverse_order() {
    let mut spec = spec(&[
        Amount::Count(1),
        Amount::Percent(30.0),
        Amount::Percent(100.0),
    ]);
    spec.max_parallel = 1;
    let mut sim = Sim::new(spec, 10, &[]);
    let last_wave = sim.rollout.waves[2].clone();
    sim.bad.insert(last_wave[2].clone());
    sim.run(120);
    assert_eq!(sim.rollout.state, State::RolledBack, "{:#?}", sim.log);
    let moved = sim.order_of(2);
    let mut reverse = moved.clone();
    reverse.reverse();
    assert_eq!(
        sim.order_of(1),
        reverse,
        "rollback goes newest first, and tells every moved host, the failed one too"
    );
    assert_eq!(moved.len(), 6, "1 + 2 + the first three of the last wave");
    assert!(
        sim.rollout
            .hosts
            .values()
            .all(|h| matches!(h.phase, Phase::Waiting | Phase::Reverted)),
        "{:#?}",
        sim.rollout.hosts
    );
}

#[test]
fn max_failed_allows_a_failure() {
    let mut spec = spec(&[Amount::Count(1), Amount::Percent(100.0)]);
    spec.max_failed = Amount::Count(1);
    let mut sim = Sim::new(spec, 6, &[]);
    sim.bad.insert(sim.rollout.waves[1][0].clone());
    sim.run(60);
    assert_eq!(sim.rollout.state, State::Succeeded, "{:#?}", sim.log);
    assert_eq!(sim.rollout.failed(), 1);
}

#[test]
fn on_failure_pause_stops_and_resume_continues() {
    let mut spec = spec(&[Amount::Count(1), Amount::Percent(100.0)]);
    spec.on_failure = OnFailure::Pause;
    let mut sim = Sim::new(spec, 4, &[]);
    sim.bad.insert(sim.rollout.waves[0][0].clone());
    sim.run(10);
    assert!(
        matches!(&sim.rollout.state, State::Paused { reason, .. } if reason.contains("1 host(s) failed")),
        "{:?}",
        sim.rollout.state
    );
    // Resuming with the gate still tripped trips it again: the operator must
    // raise max_failed or roll back.
    sim.input(Input::Resume).unwrap();
    assert!(matches!(sim.rollout.state, State::Paused { .. }));
    sim.input(Input::Rollback { all_at_once: true }).unwrap();
    sim.run(10);
    assert_eq!(sim.rollout.state, State::RolledBack);
}

#[test]
fn manual_promotion_waits_after_the_canary() {
    let mut spec = spec(&[Amount::Count(1), Amount::Percent(100.0)]);
    spec.promote = Promote::Manual;
    let mut sim = Sim::new(spec, 5, &[]);
    sim.run(20);
    assert!(
        matches!(
            sim.rollout.state,
            State::Running {
                wave: 0,
                awaiting_promotion: true,
                ..
            }
        ),
        "{:?}",
        sim.rollout.state
    );
    assert_eq!(
        sim.order_of(2).len(),
        1,
        "nothing past the canary before promotion"
    );
    sim.input(Input::Promote).unwrap();
    sim.run(30);
    assert_eq!(sim.rollout.state, State::Succeeded);
}

#[test]
fn offline_hosts_are_skipped_or_failed_per_policy() {
    for (policy, expected) in [(Offline::Skip, "succeeded"), (Offline::Fail, "rolled_back")] {
        let mut spec = spec(&[Amount::Count(1), Amount::Percent(100.0)]);
        spec.offline = policy;
        let mut sim = Sim::new(spec, 4, &[]);
        let offline = sim.rollout.waves[1][0].clone();
        sim.fleet.get_mut(&offline).unwrap().online = false;
        sim.run(30);
        assert_eq!(
            sim.rollout.state.name(),
            expected,
            "{policy:?}: {:#?}",
            sim.log
        );
        assert!(
            !sim.order_of(2).contains(&offline),
            "an offline host is never dispatched"
        );
    }
}

#[test]
fn a_wave_past_its_progress_deadline_trips_the_gate() {
    let mut spec = spec(&[Amount::Count(1), Amount::Percent(100.0)]);
    spec.progress_deadline = Duration::from_secs(5);
    spec.healthy_deadline = Duration::from_secs(3600);
    let mut sim = Sim::new(spec, 3, &[]);
    let canary = sim.rollout.waves[0][0].clone();
    sim.input(Input::Tick).unwrap();
    sim.pending.clear(); // the canary never acts on its desired state
    for _ in 0..6 {
        sim.now += 1000;
        sim.input(Input::Tick).unwrap();
    }
    assert!(
        matches!(
            sim.rollout.state,
            State::RollingBack { .. } | State::RolledBack
        ),
        "{:?}",
        sim.rollout.state
    );
    assert!(
        sim.log
            .iter()
            .any(|l| l.contains("wave 1 did not finish within progress_deadline (5s)")),
        "{:#?}",
        sim.log
    );
    let _ = canary;
}

#[test]
fn a_host_missing_its_healthy_deadline_fails() {
    let mut spec = spec(&[Amount::Percent(100.0)]);
    spec.healthy_deadline = Duration::from_secs(3);
    let mut sim = Sim::new(spec, 1, &[]);
    sim.input(Input::Tick).unwrap();
    sim.pending.clear();
    for _ in 0..4 {
        sim.now += 1000;
        sim.input(Input::Tick).unwrap();
    }
    assert!(
        sim.log
            .iter()
            .any(|l| l.contains("not committed within healthy_deadline (3s)")),
        "{:#?}",
        sim.log
    );
}

/// Each command in each state: allowed, or refused with a reason.
#[test]
fn commands_in_every_state() {
    let states = [
        State::Running {
            wave: 0,
            wave_started_ms: 0,
            awaiting_promotion: false,
        },
        State::Running {
            wave: 0,
            wave_started_ms: 0,
            awaiting_promotion: true,
        },
        State::Paused {
            wave: 0,
            reason: "x".into(),
        },
        State::Succeeded,
        State::RollingBack {
            reason: "x".into(),
            all_at_once: false,
        },
        State::RolledBack,
        State::Aborted { reason: "x".into() },
        State::Failed { reason: "x".into() },
    ];
    // (command, allowed in each state above, in order)
    let table: [(Input, [bool; 8]); 5] = [
        (
            Input::Pause,
            [true, true, false, false, false, false, false, false],
        ),
        (
            Input::Resume,
            [false, false, true, false, false, false, false, false],
        ),
        (
            Input::Promote,
            [false, true, false, false, false, false, false, false],
        ),
        (
            Input::Abort,
            [true, true, true, false, true, false, false, false],
        ),
        (
            Input::Rollback { all_at_once: false },
            [true, true, true, true, true, false, true, true],
        ),
    ];
    for (input, allowed) in table {
        for (state, allowed) in states.iter().zip(allowed) {
            let mut sim = Sim::new(spec(&[Amount::Count(1), Amount::Percent(100.0)]), 3, &[]);
            sim.rollout.state = state.clone();
            let result = step(sim.rollout.clone(), input.clone(), 0, &sim.fleet);
            match (allowed, result) {
                (true, Ok(_)) => {}
                (false, Err(refused)) => {
                    assert!(refused.to_string().starts_with("cannot "), "{refused}");
                    assert!(
                        refused
                            .to_string()
                            .contains(&format!("it is {}", state.name())),
                        "{refused}"
                    );
                }
                (want, got) => panic!(
                    "{input:?} in {}: expected allowed={want}, got {got:?}",
                    state.name()
                ),
            }
        }
    }
}

#[test]
fn abort_leaves_hosts_where_they_are() {
    let mut sim = Sim::new(spec(&[Amount::Count(1), Amount::Percent(100.0)]), 5, &[]);
    sim.run(3);
    let sets = sim.sets.len();
    sim.input(Input::Abort).unwrap();
    sim.run(10);
    assert_eq!(sim.sets.len(), sets, "no host is moved after an abort");
    assert!(matches!(sim.rollout.state, State::Aborted { .. }));
}

/// One scenario run twice gives a byte-identical event log.
#[test]
fn the_same_inputs_give_the_same_event_log() {
    let run = || {
        let mut sim = Sim::new(
            spec(&[
                Amount::Count(1),
                Amount::Percent(40.0),
                Amount::Percent(100.0),
            ]),
            12,
            &[9],
        );
        sim.run(200);
        sim.log.join("\n")
    };
    let (a, b) = (run(), run());
    assert!(!a.is_empty());
    assert_eq!(a, b);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 200,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct("tests/proptest-regressions/engine.txt"),
        )),
        ..ProptestConfig::default()
    })]

    /// Over random fleets, failures, offline hosts and operator commands:
    /// never more than max_parallel switching, no host dispatched twice, and
    /// a rollback touches exactly the hosts that moved.
    #[test]
    fn invariants_hold(
        n in 1usize..25,
        max_parallel in 1usize..5,
        bad in proptest::collection::btree_set(0usize..25, 0..4),
        offline in proptest::collection::btree_set(0usize..25, 0..3),
        commands in proptest::collection::vec((0u8..6, 0usize..40), 0..6),
        max_failed in 0usize..3,
    ) {
        let mut spec = spec(&[Amount::Count(1), Amount::Percent(25.0), Amount::Percent(100.0)]);
        spec.max_parallel = max_parallel;
        spec.max_failed = Amount::Count(max_failed);
        let bad: Vec<usize> = bad.into_iter().filter(|i| *i < n).collect();
        let mut sim = Sim::new(spec, n, &bad);
        for i in offline.into_iter().filter(|i| *i < n) {
            sim.fleet.get_mut(&hosts(n)[i]).unwrap().online = false;
        }
        sim.input(Input::Tick).unwrap();
        let (mut prev_switching, mut prev_reverting) = (0, 0);
        let mut all_at_once_asked = false;
        for second in 0..120 {
            for (command, at) in &commands {
                if *at == second {
                    let input = match command {
                        0 => Input::Pause,
                        1 => Input::Resume,
                        2 => Input::Promote,
                        3 => Input::Abort,
                        4 => Input::Rollback { all_at_once: false },
                        _ => Input::Rollback { all_at_once: true },
                    };
                    let all = input == Input::Rollback { all_at_once: true };
                    if sim.input(input).is_ok() && all {
                        all_at_once_asked = true;
                    }
                }
            }
            let rolling_back_all = all_at_once_asked;
            let switching = sim.rollout.hosts.values().filter(|h| matches!(h.phase, Phase::Dispatched { .. } | Phase::Committed { .. })).count();
            let reverting = sim.rollout.hosts.values().filter(|h| matches!(h.phase, Phase::Reverting { .. })).count();
            // The engine never puts a host in flight past the limit; hosts an
            // all-at-once rollback sent back may stay in flight after an abort.
            prop_assert!(switching <= max_parallel.max(prev_switching), "{} switching > {}", switching, max_parallel);
            prop_assert!(
                rolling_back_all || reverting <= max_parallel.max(prev_reverting),
                "{} reverting > {}", reverting, max_parallel
            );
            (prev_switching, prev_reverting) = (switching, reverting);
            sim.second();
        }
        let dispatched = sim.order_of(2);
        let unique: BTreeSet<_> = dispatched.iter().collect();
        prop_assert_eq!(unique.len(), dispatched.len(), "a host was dispatched twice");
        prop_assert_eq!(&dispatched, &sim.rollout.switch_order);
        let rolled: BTreeSet<_> = sim.order_of(1).into_iter().collect();
        prop_assert!(rolled.iter().all(|h| unique.contains(h)), "rollback touched a host that never moved");
        if sim.rollout.state == State::RolledBack {
            for host in &dispatched {
                let phase = &sim.rollout.hosts[host].phase;
                prop_assert!(matches!(phase, Phase::Reverted | Phase::RevertFailed { .. }), "{} left in {:?}", host, phase);
                // At rest: a host counted back runs its previous release and is told to.
                if *phase == Phase::Reverted {
                    let previous = sim.rollout.hosts[host].previous.clone();
                    prop_assert_eq!(&sim.fleet[host].committed, &previous, "{} counted back", host);
                    prop_assert_eq!(sim.desired.get(host), previous.as_ref(), "{}'s desired state", host);
                }
            }
        }
    }
}

/// Found by attacking: after the gate tripped and the rollout rolled back,
/// `rollout status` said "failed 0", as the failed hosts had moved on to
/// being rolled back.
#[test]
fn a_failure_is_still_counted_after_the_rollback() {
    let mut sim = Sim::new(spec(&[Amount::Count(1), Amount::Percent(100.0)]), 3, &[]);
    let canary = sim.rollout.waves[0][0].clone();
    sim.bad.insert(canary.clone());
    sim.run(20);
    assert_eq!(sim.rollout.state, State::RolledBack, "{:#?}", sim.log);
    assert_eq!(sim.rollout.failed(), 1);
    assert!(
        sim.rollout.hosts[&canary]
            .failure
            .as_deref()
            .is_some_and(|f| f.contains("check http failed")),
        "{:?}",
        sim.rollout.hosts[&canary]
    );
}

/// A host that misses its deadline says why, when it said why: a download
/// it could not write (disk full), a release it refuses.
#[test]
fn a_host_missing_its_deadline_carries_its_own_last_error() {
    let mut sim = Sim::new(spec(&[Amount::Percent(100.0)]), 1, &[]);
    sim.input(Input::Tick).unwrap();
    let host = sim.rollout.waves[0][0].clone();
    sim.pending.clear();
    sim.fleet.get_mut(&host).unwrap().last_error =
        Some("download failed: cannot write it: No space left on device".into());
    sim.now += 61_000;
    sim.input(Input::Tick).unwrap();
    assert!(
        matches!(&sim.rollout.hosts[&host].failure, Some(f) if f.contains("the host says: download failed: cannot write it: No space left on device")),
        "{:#?}",
        sim.log
    );
}
