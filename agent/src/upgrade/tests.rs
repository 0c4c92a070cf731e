//! The switch proven at rest over seeded random interleavings: an old agent
//! that may die at any step of the switch, a host that may reboot (losing
//! the dead-man timer) at any time, a coordinator that may be down, and new
//! agents that work, exit at start, wedge or cannot hello. Every run drives
//! the real decisions and the real files of [`Layout`]; only processes and
//! systemd are simulated.

use std::time::Duration;

use turnout_proto::Digest;
use turnout_proto::messages::ReleaseRef;

use super::*;
use crate::link::LinkStatus;
use crate::slots::{RELEASE_FILE, SlotRelease};

use turnout_testkit::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Good,
    ExitsAtStart,
    Wedges,
    CannotHello,
    /// Its coordinator cannot be verified (a network intercepting TLS).
    Intercepted,
}

fn release(version: &str, fill: u8) -> ReleaseRef {
    ReleaseRef {
        name: SELF_SERVICE.into(),
        version: version.parse().unwrap(),
        sha256: Digest::from_bytes([fill; 32]),
    }
}

fn stage(layout: &Layout, r: &ReleaseRef) -> AgentRelease {
    let dir = Layout::dir_name(r);
    std::fs::create_dir_all(layout.release_dir(&dir)).unwrap();
    let record = SlotRelease {
        format: 1,
        release: r.clone(),
        entry: turnout_proto::manifest::PayloadPath::new("bin/turnout-agent").unwrap(),
        installed_ms: 0,
        manifest_sha256: None,
        expires: None,
    };
    std::fs::write(
        layout.release_dir(&dir).join(RELEASE_FILE),
        serde_json::to_vec(&record).unwrap(),
    )
    .unwrap();
    AgentRelease {
        release: r.clone(),
        dir: Some(dir),
    }
}

/// A switch from `from` to `to`, armed at 5 with its deadline at 10.
fn armed(from: &AgentRelease, to: &AgentRelease) -> Handoff {
    Handoff {
        format: HANDOFF_FORMAT,
        from: from.clone(),
        to: to.clone(),
        armed_ms: 5,
        deadline_ms: 10,
        needs_hello: true,
        unit: "turnout-agent.service".into(),
        deadman: "d".into(),
        boot_id: None,
        window_ms: 5,
        previous_before: None,
        phase: Phase::Armed,
    }
}

const DEADLINE: u64 = 60_000;
const HOLD: Duration = Duration::from_secs(6);
const RESTART_DELAY: u64 = 2_000;
const WATCHDOG: u64 = 3_000;

/// One simulated host.
struct Host {
    layout: Layout,
    old: AgentRelease,
    new: AgentRelease,
    kind: Kind,
    now: u64,
    /// The dead-man timer: (fires at, armed_ms); lost in a reboot.
    timer: Option<(u64, u64)>,
    /// The agent process: which release, since when; `None` while down.
    running: Option<(Option<String>, u64)>,
    /// When systemd starts the unit next.
    start_at: Option<u64>,
    /// Outcomes recorded by the agents: (kind, version).
    history: Vec<(&'static str, String)>,
    /// The coordinator is down until then.
    coordinator_back_at: u64,
    /// The launcher reverted a switch whose deadline passed while the host was down.
    late_revert: bool,
    rebooted: bool,
    boots: u32,
    /// The new agent's last link state (its `progress`).
    last_link: Option<String>,
    trace: Vec<String>,
}

impl Host {
    fn is_new(&self, dir: &Option<String>) -> bool {
        *dir == self.new.dir
    }

    /// systemd starts the unit: the launcher, then the agent it execs.
    fn start(&mut self) {
        self.start_at = None;
        let current = loop {
            let handoff = self.layout.handoff().unwrap();
            let current = self.layout.current();
            let boot = format!("boot-{}", self.boots);
            match launch_decision(handoff.as_ref(), current.as_deref(), Some(&boot), self.now) {
                Launch::Run(dir) => break dir,
                Launch::NewBoot(deadline) => {
                    let h = handoff.unwrap();
                    self.layout
                        .save_handoff(&Layout::new_boot(&h, deadline, Some(&boot)))
                        .unwrap();
                }
                Launch::RevertFirst(reason) => {
                    self.late_revert |= self.rebooted;
                    self.trace
                        .push(format!("{}: launcher reverts: {reason}", self.now));
                    let verdict = is_verdict(self.last_link.as_deref());
                    switch::revert_links(&self.layout, handoff.as_ref().unwrap(), &reason, verdict)
                        .unwrap();
                }
            }
        };
        // The launcher arms the timer again when a reboot lost it.
        if let Some(h) = self.layout.handoff().unwrap()
            && h.phase == Phase::Armed
            && h.to.dir == current
            && self.timer.is_none()
        {
            self.timer = Some((h.deadline_ms, h.armed_ms));
        }
        if self.is_new(&current) && self.kind == Kind::ExitsAtStart {
            self.trace.push(format!("{}: new agent exits", self.now));
            self.start_at = Some(self.now + RESTART_DELAY);
            return;
        }
        self.running = Some((current.clone(), self.now));
        let me = if current.is_some() {
            self.layout.agent_release(current.as_deref()).unwrap()
        } else {
            self.old.clone()
        };
        // What the agent does about the record at start.
        let handoff = self.layout.handoff().unwrap();
        match at_start(handoff.as_ref(), &me) {
            AtStart::Nothing | AtStart::Confirm => {}
            AtStart::Abandoned => {
                let h = handoff.unwrap();
                self.layout
                    .point("previous", h.previous_before.as_deref())
                    .unwrap();
                self.layout.remove_handoff().unwrap();
            }
            AtStart::RecordReverted { verdict, .. } => {
                let h = handoff.unwrap();
                let kind = if verdict { "reverted" } else { "failed" };
                self.history.push((kind, h.to.release.version.to_string()));
                self.timer = None;
                self.layout.remove_handoff().unwrap();
            }
            AtStart::FinishConfirmed => {
                let h = handoff.unwrap();
                self.history
                    .push(("committed", h.to.release.version.to_string()));
                self.timer = None;
                self.layout.remove_handoff().unwrap();
            }
        }
    }

    /// The old agent's switch, dying after `die_after` of its steps.
    fn switch(&mut self, die_after: usize) {
        let h = Handoff {
            format: HANDOFF_FORMAT,
            from: self.old.clone(),
            to: self.new.clone(),
            armed_ms: self.now,
            deadline_ms: self.now + DEADLINE,
            needs_hello: true,
            unit: "turnout-agent.service".into(),
            deadman: format!("turnout-agent-deadman-{}", self.now),
            boot_id: Some(format!("boot-{}", self.boots)),
            window_ms: DEADLINE,
            previous_before: self.layout.previous(),
            phase: Phase::Armed,
        };
        let steps: [&dyn Fn(&mut Host); 5] = [
            &|host| host.layout.save_handoff(&h).unwrap(),
            &|host| host.timer = Some((host.now + DEADLINE, h.armed_ms)),
            &|host| {
                host.layout
                    .point("previous", h.from.dir.as_deref())
                    .unwrap();
            },
            &|host| host.layout.point("current", h.to.dir.as_deref()).unwrap(),
            // The restart, by systemd.
            &|host| {
                host.running = None;
                host.start_at = Some(host.now + 100);
            },
        ];
        for (i, step) in steps.iter().enumerate() {
            if i == die_after {
                self.trace
                    .push(format!("{}: old agent dies before step {i}", self.now));
                self.running = None;
                self.start_at = Some(self.now + RESTART_DELAY);
                return;
            }
            step(self);
        }
    }

    /// One 250 ms tick of everything that runs.
    fn tick(&mut self) {
        self.now += 250;
        if let Some((at, armed)) = self.timer
            && self.now >= at
        {
            self.timer = None;
            let handoff = self.layout.handoff().unwrap();
            let current = self.layout.current();
            if on_deadline(handoff.as_ref(), armed, current.as_deref(), self.now) {
                self.trace.push(format!("{}: dead-man reverts", self.now));
                let verdict = is_verdict(self.last_link.as_deref());
                switch::revert_links(
                    &self.layout,
                    handoff.as_ref().unwrap(),
                    "unconfirmed",
                    verdict,
                )
                .unwrap();
                self.running = None;
                self.start_at = Some(self.now);
            }
        }
        if let Some(at) = self.start_at
            && self.now >= at
        {
            self.start();
        }
        let Some((dir, since)) = self.running.clone() else {
            return;
        };
        if !self.is_new(&dir) {
            return;
        }
        let up = self.now - since;
        match self.kind {
            Kind::Wedges if up >= WATCHDOG => {
                self.trace
                    .push(format!("{}: watchdog kills the new agent", self.now));
                self.running = None;
                self.start_at = Some(self.now + RESTART_DELAY);
            }
            Kind::Wedges | Kind::ExitsAtStart => {}
            Kind::Good | Kind::CannotHello | Kind::Intercepted => {
                let Ok(Some(h)) = self.layout.handoff() else {
                    return;
                };
                if h.phase != Phase::Armed {
                    return;
                }
                let up_now = self.now >= self.coordinator_back_at;
                let link = LinkStatus {
                    state: match (self.kind, up_now) {
                        (_, false) => "unreachable".into(),
                        (Kind::CannotHello, true) => "refused".into(),
                        (Kind::Intercepted, true) => "untrusted".into(),
                        _ => "connected".into(),
                    },
                    reported_ms: (self.kind == Kind::Good && up_now).then_some(self.now),
                    ..LinkStatus::default()
                };
                self.last_link = Some(link.state.clone());
                match probation(Duration::from_millis(up), HOLD, h.needs_hello, &link) {
                    Probation::Confirm => {
                        let mut confirmed = h.clone();
                        confirmed.phase = Phase::Confirmed { at_ms: self.now };
                        self.layout.save_handoff(&confirmed).unwrap();
                        self.timer = None;
                        self.history
                            .push(("committed", h.to.release.version.to_string()));
                        self.layout.remove_handoff().unwrap();
                    }
                    Probation::Wait(_) => {}
                    Probation::Extend(_) => {
                        let window = Duration::from_millis(DEADLINE);
                        let deadline = extended(h.deadline_ms, self.now, window);
                        if deadline != h.deadline_ms {
                            let mut next = h.clone();
                            next.deadline_ms = deadline;
                            self.layout.save_handoff(&next).unwrap();
                            self.timer = Some((deadline, h.armed_ms));
                        }
                    }
                }
            }
        }
    }

    fn reboot(&mut self, down_for: u64) {
        self.trace
            .push(format!("{}: reboot for {down_for} ms", self.now));
        self.running = None;
        self.timer = None;
        self.rebooted = true;
        self.boots += 1;
        self.now += down_for;
        self.start_at = Some(self.now);
    }
}

fn simulate(seed: u64, kind: Kind) {
    let mut rng = Rng(seed);
    let tmp = tempfile::tempdir().unwrap();
    let layout = Layout::new(tmp.path());
    std::fs::create_dir_all(layout.root()).unwrap();
    let from_installed = rng.below(2) == 0;
    let old = if from_installed {
        AgentRelease {
            release: release("0.2.0", 2),
            dir: None,
        }
    } else {
        stage(&layout, &release("0.2.0", 2))
    };
    layout.point("current", old.dir.as_deref()).unwrap();
    let new = stage(&layout, &release("0.3.0", 3));
    let mut host = Host {
        layout,
        old: old.clone(),
        new: new.clone(),
        kind,
        now: 1_000_000,
        timer: None,
        running: Some((old.dir.clone(), 0)),
        start_at: None,
        history: Vec::new(),
        coordinator_back_at: 0,
        late_revert: false,
        rebooted: false,
        boots: 0,
        last_link: None,
        trace: Vec::new(),
    };
    // The coordinator is down from the switch on, for up to three deadlines.
    if rng.below(3) == 0 {
        host.coordinator_back_at = host.now + rng.below(DEADLINE * 3);
    }
    // The old agent dies at a random step (5: it does not die).
    let die_after = if rng.below(2) == 0 {
        rng.below(5) as usize
    } else {
        5
    };
    host.switch(die_after);
    let reboot_at = (rng.below(3) == 0).then(|| host.now + rng.below(DEADLINE * 2));
    let reboot_for = rng.below(DEADLINE * 2);
    let end = host.now + DEADLINE * 7;
    while host.now < end {
        if reboot_at.is_some_and(|at| host.now < at && host.now + 250 >= at) {
            host.reboot(reboot_for);
        }
        host.tick();
    }
    let context = format!(
        "seed {seed}, {kind:?}, from installed {from_installed}, dies after {die_after}, coordinator back at {}, \
         reboot {reboot_at:?} for {reboot_for}\n{}",
        host.coordinator_back_at,
        host.trace.join("\n")
    );
    // At rest: an agent runs, nothing is in flight.
    let (running, _) = host
        .running
        .clone()
        .unwrap_or_else(|| panic!("no agent runs at rest: {context}"));
    assert_eq!(host.layout.handoff().unwrap(), None, "{context}");
    assert_eq!(host.timer, None, "{context}");
    let switched = die_after >= 4;
    if kind == Kind::Good && switched {
        // A working agent is kept: a reboot or an outage gives it its
        // whole window again.
        assert!(!host.late_revert, "{context}");
        assert_eq!(running, new.dir, "a working agent was reverted: {context}");
        assert_eq!(
            host.history,
            [("committed", "0.3.0".to_owned())],
            "{context}"
        );
    } else if switched {
        assert_eq!(running, old.dir, "a broken agent runs at rest: {context}");
        assert_eq!(host.layout.current(), old.dir, "{context}");
        assert_eq!(
            host.layout.previous(),
            None,
            "a failed agent became the one to roll back to: {context}"
        );
        // Held against the new agent only when something was proven: an
        // intercepted link proves nothing, and is tried again.
        let kind = if kind == Kind::Intercepted {
            "failed"
        } else {
            "reverted"
        };
        assert_eq!(
            host.history,
            [(kind, "0.3.0".to_owned())],
            "the failure is recorded once: {context}"
        );
    } else {
        // Died before `current` moved: the old agent runs, nothing failed,
        // and the links are as they were.
        assert_eq!(running, old.dir, "{context}");
        assert!(host.history.is_empty(), "{context}");
        assert_eq!(host.layout.previous(), None, "{context}");
    }
    if running == new.dir {
        assert_eq!(host.layout.previous(), old.dir, "{context}");
    }
}

#[test]
fn every_switch_ends_on_a_working_agent_with_nothing_in_flight() {
    let seeds: u64 = std::env::var("TURNOUT_MODEL_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    for kind in [
        Kind::Good,
        Kind::ExitsAtStart,
        Kind::Wedges,
        Kind::CannotHello,
        Kind::Intercepted,
    ] {
        for seed in 0..seeds {
            simulate(seed * 7919 + kind as u64, kind);
        }
    }
}

#[test]
fn an_unreachable_coordinator_moves_the_deadline_and_a_refusing_one_does_not() {
    let link = |state: &str, reported: bool| LinkStatus {
        state: state.into(),
        detail: Some("connection refused".into()),
        reported_ms: reported.then_some(1),
        ..LinkStatus::default()
    };
    let up = Duration::from_secs(10);
    assert!(matches!(
        probation(up, HOLD, true, &link("unreachable", false)),
        Probation::Extend(why) if why.contains("unreachable: connection refused")
    ));
    assert_eq!(
        probation(up, HOLD, true, &link("connected", true)),
        Probation::Confirm
    );
    // Reachable but refusing: the new agent cannot talk to it.
    assert!(matches!(
        probation(up, HOLD, true, &link("refused", false)),
        Probation::Wait(why) if why.contains("refused")
    ));
    assert!(matches!(
        probation(up, HOLD, true, &link("untrusted", false)),
        Probation::Wait(_)
    ));
    // Connected but no report yet.
    assert!(matches!(
        probation(up, HOLD, true, &link("connected", false)),
        Probation::Wait(_)
    ));
    // Not up long enough, whatever the link says.
    assert_eq!(
        probation(Duration::from_secs(2), HOLD, true, &link("connected", true)),
        Probation::Wait("up for 2s of the 6s hold".into())
    );
    // A switch made without a coordinator needs no hello.
    assert_eq!(
        probation(up, HOLD, false, &link("standalone", false)),
        Probation::Confirm
    );
    // The deadline moves a whole window ahead once half of it is gone.
    let window = Duration::from_secs(60);
    assert_eq!(extended(100_000, 50_000, window), 100_000);
    assert_eq!(extended(100_000, 75_000, window), 135_000);
}

#[test]
fn the_hold_is_two_watchdog_timeouts_and_at_least_five_seconds() {
    assert_eq!(hold(Some(Duration::from_secs(15))), Duration::from_secs(60));
    assert_eq!(
        hold(Some(Duration::from_millis(500))),
        Duration::from_secs(5)
    );
    assert_eq!(hold(None), Duration::from_secs(10));
}

#[test]
fn a_dead_man_for_another_or_a_confirmed_switch_does_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = Layout::new(tmp.path());
    let (old, new) = (
        stage(&layout, &release("0.2.0", 2)),
        stage(&layout, &release("0.3.0", 3)),
    );
    let h = armed(&old, &new);
    assert!(on_deadline(Some(&h), 5, new.dir.as_deref(), 10));
    assert!(
        !on_deadline(Some(&h), 5, new.dir.as_deref(), 9),
        "extended since"
    );
    assert!(
        !on_deadline(Some(&h), 4, new.dir.as_deref(), 10),
        "another switch"
    );
    assert!(
        !on_deadline(Some(&h), 5, old.dir.as_deref(), 10),
        "never flipped"
    );
    assert!(!on_deadline(None, 5, new.dir.as_deref(), 10));
    let confirmed = Handoff {
        phase: Phase::Confirmed { at_ms: 7 },
        ..h
    };
    assert!(!on_deadline(Some(&confirmed), 5, new.dir.as_deref(), 10));
    // The record survives a round trip through its file, phase and all.
    layout.save_handoff(&confirmed).unwrap();
    assert_eq!(layout.handoff().unwrap(), Some(confirmed));
    // Pruning keeps `current` and `previous` only.
    let third = stage(&layout, &release("0.1.0", 1));
    layout.point("current", new.dir.as_deref()).unwrap();
    layout.point("previous", old.dir.as_deref()).unwrap();
    assert_eq!(layout.prune(), [third.dir.unwrap()]);
    assert!(layout.release_of(new.dir.as_deref().unwrap()).is_ok());
    assert!(layout.release_of(old.dir.as_deref().unwrap()).is_ok());
    // A record that does not read is an error, never a guess.
    std::fs::write(layout.root().join("handoff.json"), b"{").unwrap();
    assert!(layout.handoff().is_err());
}

mod fuzz {
    //! `handoff.json`, which one agent build writes and another reads,
    //! against arbitrary and mutated bytes: a record that does not read is
    //! an error, one that reads drives every decision without a panic.

    use proptest::prelude::*;

    use super::*;

    fn cases() -> u32 {
        std::env::var("FUZZ_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(256)
    }

    fn example() -> Vec<u8> {
        let h = Handoff {
            format: HANDOFF_FORMAT,
            from: AgentRelease {
                release: release("0.2.0", 2),
                dir: None,
            },
            to: AgentRelease {
                release: release("0.3.0", 3),
                dir: Some("0.3.0-030303030303".into()),
            },
            armed_ms: 1_000,
            deadline_ms: 61_000,
            needs_hello: true,
            unit: "turnout-agent.service".into(),
            deadman: "turnout-agent-deadman-1000".into(),
            boot_id: Some("b".into()),
            window_ms: 60_000,
            previous_before: None,
            phase: Phase::Reverted {
                at_ms: 2_000,
                reason: "it exited".into(),
                verdict: true,
            },
        };
        serde_json::to_vec_pretty(&h).unwrap()
    }

    fn decide_all(bytes: &[u8]) {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::new(tmp.path());
        std::fs::create_dir_all(layout.root()).unwrap();
        std::fs::write(layout.root().join("handoff.json"), bytes).unwrap();
        let Ok(Some(h)) = layout.handoff() else {
            return;
        };
        for current in [None, Some("0.3.0-030303030303"), h.to.dir.as_deref()] {
            for boot in [None, Some("b"), Some("c")] {
                let _ = launch_decision(Some(&h), current, boot, 30_000);
            }
            let _ = on_deadline(Some(&h), h.armed_ms, current, u64::MAX);
        }
        // Numbers from the file are never trusted to be small.
        let huge = Handoff {
            window_ms: u64::MAX,
            previous_before: None,
            deadline_ms: u64::MAX,
            armed_ms: u64::MAX,
            phase: Phase::Armed,
            ..h.clone()
        };
        let _ = launch_decision(Some(&huge), huge.to.dir.as_deref(), Some("z"), u64::MAX);
        let _ = at_start(Some(&h), &h.from);
        let _ = at_start(Some(&h), &h.to);
        let _ = Layout::new_boot(&h, u64::MAX, None);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_are_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            decide_all(&bytes);
        }

        #[test]
        fn mutated_records_are_an_error_or_a_decision_not_a_panic(
            edits in proptest::collection::vec((any::<proptest::sample::Index>(), proptest::collection::vec(any::<u8>(), 0..8), 0usize..16), 1..6),
        ) {
            let mut bytes = example();
            for (at, insert, remove) in edits {
                let i = at.index(bytes.len().max(1)).min(bytes.len());
                let end = (i + remove).min(bytes.len());
                bytes.splice(i..end, insert);
            }
            decide_all(&bytes);
        }
    }

    #[test]
    fn the_example_reads_back_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::new(tmp.path());
        std::fs::create_dir_all(layout.root()).unwrap();
        std::fs::write(layout.root().join("handoff.json"), example()).unwrap();
        let h = layout.handoff().unwrap().unwrap();
        assert_eq!(serde_json::to_vec_pretty(&h).unwrap(), example());
        // A reader tolerates what it does not know (a newer build's field).
        let mut value: serde_json::Value = serde_json::from_slice(&example()).unwrap();
        value["from_a_newer_build"] = serde_json::json!(1);
        std::fs::write(
            layout.root().join("handoff.json"),
            serde_json::to_vec(&value).unwrap(),
        )
        .unwrap();
        assert_eq!(layout.handoff().unwrap(), Some(h));
    }
}

#[test]
fn on_probation_an_agent_reports_what_it_falls_back_to_not_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = Layout::new(tmp.path());
    let (old, new) = (
        stage(&layout, &release("0.2.0", 2)),
        stage(&layout, &release("0.3.0", 3)),
    );
    let mut h = armed(&old, &new);
    // Armed, this is the new agent: baking, committed is the old one.
    assert_eq!(
        reported(&new, Some(&h)),
        (true, old.release.clone(), Some(new.release.clone()))
    );
    // The old agent, or anyone once confirmed, reports itself.
    assert_eq!(reported(&old, Some(&h)), (false, old.release.clone(), None));
    h.phase = Phase::Confirmed { at_ms: 7 };
    assert_eq!(reported(&new, Some(&h)), (false, new.release.clone(), None));
    assert_eq!(reported(&new, None), (false, new.release, None));
}

#[test]
fn the_dead_man_reads_systemd_and_the_last_word_of_this_switch_only() {
    // An operator's stop is left stopped; a crash or a pending restart is restarted.
    assert_eq!(revert_for("inactive"), Revert::AndLeaveStopped);
    for state in ["failed", "active", "activating", "deactivating", ""] {
        assert_eq!(revert_for(state), Revert::AndRestart, "{state}");
    }
    assert_eq!(ended("1", "3").unwrap(), "it exited with status 3");
    assert_eq!(ended("2", "9").unwrap(), "it was killed by signal 9");
    assert_eq!(ended("3", "11").unwrap(), "it dumped core on signal 11");
    assert_eq!(ended("1", "0"), None);
    assert_eq!(ended("", ""), None);
    assert!(is_verdict(Some("refused")));
    assert!(is_verdict(None));
    assert!(!is_verdict(Some("untrusted")));
    // Another switch's last word is no word about this one.
    let tmp = tempfile::tempdir().unwrap();
    let layout = Layout::new(tmp.path());
    std::fs::create_dir_all(layout.root()).unwrap();
    let word = Progress {
        armed_ms: 5,
        waiting: "up for 2s of the 6s hold".into(),
        link: Some("connected".into()),
    };
    std::fs::write(layout.progress_path(), serde_json::to_vec(&word).unwrap()).unwrap();
    assert_eq!(layout.progress(5), Some(word));
    assert_eq!(layout.progress(6), None);
    std::fs::write(
        layout.progress_path(),
        b"up for 2s (an older build's plain text)",
    )
    .unwrap();
    assert_eq!(layout.progress(5), None);
}

#[test]
fn a_revert_puts_back_the_journal_a_newer_agent_migrated() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = Layout::new(tmp.path());
    let (old, new) = (
        stage(&layout, &release("0.2.0", 2)),
        stage(&layout, &release("0.3.0", 3)),
    );
    let path = tmp.path().join("agent.db");
    {
        let mut journal = crate::journal::Journal::open(&path).unwrap();
        let state = crate::machine::State::Idle {
            committed: Some(old.release.clone()),
        };
        journal.persist("web", &state, &[], 1).unwrap();
        journal.snapshot_to(&layout.journal_snapshot()).unwrap();
    }
    // The new agent migrates the journal to a schema the old one refuses.
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        conn.execute("CREATE TABLE from_the_future (x)", [])
            .unwrap();
    }
    assert!(matches!(
        crate::journal::Journal::open(&path),
        Err(crate::journal::JournalError::Newer { .. })
    ));
    let h = armed(&old, &new);
    layout.point("current", new.dir.as_deref()).unwrap();
    switch::revert_links(&layout, &h, "it exited", true).unwrap();
    assert_eq!(layout.current(), old.dir);
    // `previous` is what it was before the switch: never the failed agent.
    assert_eq!(layout.previous(), None);
    // The old agent opens its journal as it left it.
    let journal = crate::journal::Journal::open(&path).unwrap();
    assert_eq!(
        journal.state("web").unwrap(),
        crate::machine::State::Idle {
            committed: Some(old.release)
        }
    );
    assert!(matches!(
        layout.handoff().unwrap().unwrap().phase,
        Phase::Reverted { verdict: true, .. }
    ));
}

#[test]
fn forgetting_a_failure_leaves_no_outcome_a_coordinator_would_read_as_one() {
    let tmp = tempfile::tempdir().unwrap();
    let mut journal = crate::journal::Journal::open(&tmp.path().join("agent.db")).unwrap();
    let (good, bad) = (release("0.2.0", 2), release("0.3.0", 3));
    let state = crate::machine::State::Idle {
        committed: Some(good.clone()),
    };
    let entry = |kind, r: &ReleaseRef| crate::journal::HistoryEntry {
        kind,
        release: Some(r.clone()),
        reason: "x".into(),
        at_ms: 1,
    };
    use turnout_proto::messages::OutcomeKind;
    journal
        .persist(
            SELF_SERVICE,
            &state,
            &[
                entry(OutcomeKind::Committed, &good),
                entry(OutcomeKind::Reverted, &bad),
            ],
            1,
        )
        .unwrap();
    assert_eq!(
        journal.forget(SELF_SERVICE, bad.sha256.as_str()).unwrap(),
        1
    );
    let history = journal.history(SELF_SERVICE, 10).unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].kind, OutcomeKind::Committed);
    assert!(crate::converge::failed_here(&bad, &history).is_none());
}
