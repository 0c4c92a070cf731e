//! Fleets of real processes: a coordinator (`turnout serve`) and agents
//! (`turnout agent run`) with the demo service, on 127.0.0.1. Each test
//! builds its own fleet and polls for conditions with deadlines.

use std::time::Duration;

use serde_json::json;
use turnout::engine::Phase;
use turnout_tests::{Fleet, Options, wait_for};

const LONG: Duration = Duration::from_secs(45);

fn dispatched_order(events: &[String], version: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.contains(&format!("dispatched {version}")))
        .map(|e| e.split(' ').next().unwrap().to_owned())
        .collect()
}

/// 1. Ten hosts, a healthy release through 1, 30%, 100%.
#[test]
fn ten_hosts_take_a_healthy_release_in_planned_cohorts() {
    let fleet = Fleet::start(Options {
        hosts: 10,
        ..Options::default()
    });
    fleet.install_everywhere("1.0.0");
    let id = fleet.rollout(json!({"service": "web", "release": "web@2.0.0", "waves": ["1", "30%", "100%"], "max_parallel": 3}));
    let rollout = fleet.wait_state(&id, "succeeded", LONG);
    assert!(rollout.hosts.values().all(|h| h.phase == Phase::Done));
    for host in &fleet.hosts {
        assert_eq!(host.served().as_deref(), Some("2.0.0"), "{}", host.id);
    }
    let events = fleet.events(&id);
    let planned: Vec<String> = rollout
        .waves
        .concat()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        dispatched_order(&events, "2.0.0"),
        planned,
        "hosts moved in the planned order"
    );
    assert_eq!(
        events.iter().filter(|e| e.contains("planned wave")).count(),
        3
    );
}

/// 2. The canary fails health: automatic rollback, and no other host ever got the release.
#[test]
fn a_failing_canary_rolls_back_and_no_other_host_gets_the_release() {
    let fleet = Fleet::start(Options {
        hosts: 4,
        ..Options::default()
    });
    fleet.install_everywhere("2.0.0");
    let id =
        fleet.rollout(json!({"service": "web", "release": "web@3.0.0", "waves": ["1", "100%"]}));
    let rollout = fleet.wait_state(&id, "rolled_back", LONG);
    let events = fleet.events(&id);
    assert_eq!(
        dispatched_order(&events, "3.0.0"),
        vec![rollout.waves[0][0].to_string()]
    );
    for host in &fleet.hosts {
        assert_eq!(host.served().as_deref(), Some("2.0.0"), "{}", host.id);
        let committed = host.status()["committed"]["version"].clone();
        assert_eq!(committed, "2.0.0", "{}", host.id);
        let history_holds_v3 = host.status()["last_outcome"]["release"]["version"] == "3.0.0";
        assert_eq!(
            history_holds_v3,
            host.id == rollout.waves[0][0].as_str(),
            "{}: only the canary ever saw 3.0.0",
            host.id
        );
    }
}

/// 3. A failure in the last wave: every moved host rolls back in reverse switch order.
#[test]
fn a_failure_in_the_last_wave_rolls_back_in_reverse_switch_order() {
    // The rollout id is deterministic, so the last wave is known before the fleet starts.
    let ids: Vec<turnout_proto::HostId> = (0..5)
        .map(|i| format!("host-{i:02}").parse().unwrap())
        .collect();
    let ranked = turnout::engine::rank("web-2.0.0-1", &ids);
    let last = ranked.last().unwrap().to_string();
    let index: usize = last.trim_start_matches("host-").parse().unwrap();
    let fleet = Fleet::start(Options {
        hosts: 5,
        env: Box::new(move |i| {
            if i == index {
                vec![("TURNOUT_DEMO_UNHEALTHY".into(), "2.0.0".into())]
            } else {
                vec![]
            }
        }),
        ..Options::default()
    });
    fleet.install_everywhere("1.0.0");
    let id = fleet.rollout(json!({"service": "web", "release": "web@2.0.0", "waves": ["1", "50%", "100%"], "max_parallel": 1}));
    assert_eq!(id, "web-2.0.0-1");
    fleet.wait_state(&id, "rolled_back", LONG);
    let events = fleet.events(&id);
    let moved = dispatched_order(&events, "2.0.0");
    assert_eq!(moved.len(), 5, "{events:#?}");
    assert_eq!(moved.last(), Some(&last));
    let rolled: Vec<String> = events
        .iter()
        .filter(|e| e.contains("rolling back to 1.0.0"))
        .map(|e| e.split(' ').next().unwrap().to_owned())
        .collect();
    let mut expected: Vec<String> = moved.iter().rev().cloned().collect();
    assert_eq!(
        rolled, expected,
        "newest first; the failed host, which reverted itself, is told too"
    );
    // The agents' journals agree: each host's last commit of 1.0.0 came in that order.
    let mut committed_at: Vec<(u64, String)> = fleet
        .hosts
        .iter()
        .filter(|h| h.id != last)
        .map(|h| {
            (
                h.status()["last_outcome"]["at_ms"].as_u64().unwrap(),
                h.id.clone(),
            )
        })
        .collect();
    committed_at.sort();
    expected.retain(|h| *h != last);
    assert_eq!(
        committed_at.into_iter().map(|(_, h)| h).collect::<Vec<_>>(),
        expected
    );
    for host in &fleet.hosts {
        assert_eq!(host.served().as_deref(), Some("1.0.0"), "{}", host.id);
    }
}

/// 4. promote = manual waits after the canary; pause and resume mid-wave; abort leaves hosts.
#[test]
fn manual_promotion_pause_resume_and_abort() {
    let fleet = Fleet::start(Options {
        hosts: 5,
        ..Options::default()
    });
    fleet.install_everywhere("1.0.0");
    let client = fleet.client();
    let id = fleet.rollout(json!({"service": "web", "release": "web@2.0.0", "waves": ["1", "100%"], "max_parallel": 1, "promote": "manual", "bake": "1s"}));
    wait_for("the canary to finish and wait", LONG, || {
        matches!(
            fleet.get(&id).state,
            turnout::engine::State::Running {
                awaiting_promotion: true,
                ..
            }
        )
    });
    assert_eq!(
        fleet
            .hosts
            .iter()
            .filter(|h| h.served().as_deref() == Some("2.0.0"))
            .count(),
        1
    );
    let _: serde_json::Value = client
        .post(&format!("/v1/rollouts/{id}/promote"), &json!({}))
        .unwrap();
    wait_for("the second wave to start moving", LONG, || {
        fleet
            .get(&id)
            .hosts
            .values()
            .filter(|h| h.phase == Phase::Done)
            .count()
            >= 2
    });
    let _: serde_json::Value = client
        .post(&format!("/v1/rollouts/{id}/pause"), &json!({}))
        .unwrap();
    let paused = fleet.get(&id);
    let moved = paused.switch_order.len();
    let started = |r: &turnout::engine::Rollout| {
        r.hosts
            .values()
            .filter(|h| h.phase != Phase::Waiting)
            .count()
    };
    // Not a fixed wait: three rounds of the rollout loop, each of which
    // would have dispatched the next host were the rollout not paused.
    let rounds = fleet.engine_rounds();
    wait_for("three rounds of the rollout loop", LONG, || {
        fleet.engine_rounds() >= rounds + 3
    });
    let after = fleet.get(&id);
    assert_eq!(
        (started(&after), after.switch_order.len()),
        (started(&paused), moved),
        "no host starts while paused"
    );
    let _: serde_json::Value = client
        .post(&format!("/v1/rollouts/{id}/resume"), &json!({}))
        .unwrap();
    wait_for("one more host to move", LONG, || {
        fleet.get(&id).switch_order.len() > moved
    });
    let _: serde_json::Value = client
        .post(&format!("/v1/rollouts/{id}/abort"), &json!({}))
        .unwrap();
    let aborted = fleet.get(&id);
    assert_eq!(aborted.state.name(), "aborted");
    let on_v2 = fleet
        .hosts
        .iter()
        .filter(|h| h.served().as_deref() == Some("2.0.0"))
        .count();
    assert!(
        on_v2 >= moved.min(fleet.hosts.len()) - 1 && on_v2 < fleet.hosts.len(),
        "hosts stay where they are: {on_v2} on 2.0.0"
    );
}

/// 5. An agent killed with SIGKILL mid-bake recovers, reports interrupted, and the rollout treats it as failed.
#[test]
fn an_agent_killed_mid_bake_recovers_and_the_rollout_applies_its_policy() {
    let mut fleet = Fleet::start(Options {
        hosts: 3,
        min_healthy: "4s",
        ..Options::default()
    });
    fleet.install_everywhere("1.0.0");
    let id =
        fleet.rollout(json!({"service": "web", "release": "web@2.0.0", "waves": ["1", "100%"]}));
    let canary = fleet.get(&id).waves[0][0].to_string();
    let index = fleet.hosts.iter().position(|h| h.id == canary).unwrap();
    wait_for("the canary to be baking", LONG, || {
        fleet.hosts[index].status()["state"] == "baking"
    });
    fleet.hosts[index].kill();
    fleet.hosts[index].start(&[]);
    wait_for("the restarted agent to settle", LONG, || {
        fleet.hosts[index].status()["state"] == "idle"
    });
    let status = fleet.hosts[index].status();
    assert_eq!(status["committed"]["version"], "1.0.0");
    assert_eq!(status["last_outcome"]["kind"], "interrupted");
    fleet.wait_state(&id, "rolled_back", LONG);
    assert!(
        fleet
            .events(&id)
            .iter()
            .any(|e| e.contains(&format!("{canary} failed: interrupted"))),
        "{:#?}",
        fleet.events(&id)
    );
    assert_eq!(fleet.hosts[index].served().as_deref(), Some("1.0.0"));
}

/// 6. The coordinator killed with SIGKILL mid-wave and restarted on its database.
#[test]
fn a_coordinator_killed_mid_wave_finishes_and_switches_no_host_twice() {
    let mut fleet = Fleet::start(Options {
        hosts: 5,
        min_healthy: "500ms",
        ..Options::default()
    });
    fleet.install_everywhere("1.0.0");
    let id = fleet.rollout(json!({"service": "web", "release": "web@2.0.0", "waves": ["1", "100%"], "max_parallel": 1}));
    wait_for("the second wave to be under way", LONG, || {
        let r = fleet.get(&id);
        r.waves.len() > 1
            && r.waves[1]
                .iter()
                .filter(|h| r.hosts[*h].phase == Phase::Done)
                .count()
                >= 1
    });
    fleet.kill_coordinator();
    fleet.start_coordinator(false);
    fleet.wait_state(&id, "succeeded", LONG);
    let events = fleet.events(&id);
    for host in &fleet.hosts {
        assert_eq!(
            events
                .iter()
                .filter(|e| e.starts_with(&format!("{} dispatched", host.id)))
                .count(),
            1,
            "{}",
            host.id
        );
        assert_eq!(host.served().as_deref(), Some("2.0.0"), "{}", host.id);
    }
}

/// 7. A host cut off during its wave: the wave waits, the offline policy applies, the host comes back.
#[test]
fn a_partitioned_host_is_skipped_and_converges_when_the_link_returns() {
    let fleet = Fleet::start(Options {
        hosts: 3,
        proxied: vec![2],
        ..Options::default()
    });
    fleet.install_everywhere("1.0.0");
    let cut_off = &fleet.hosts[2];
    cut_off.proxy.as_ref().unwrap().cut();
    wait_for("the cut-off host to count as offline", LONG, || {
        let hosts: Vec<serde_json::Value> = fleet.client().get("/v1/hosts").unwrap();
        hosts
            .iter()
            .any(|h| h["id"] == cut_off.id.as_str() && h["state"] == "offline")
    });
    let id = fleet.rollout(json!({"service": "web", "release": "web@2.0.0", "waves": ["100%"], "max_parallel": 3, "offline": "skip"}));
    let rollout = fleet.wait_state(&id, "succeeded", LONG);
    assert!(matches!(
        rollout.hosts[&cut_off.id.parse().unwrap()].phase,
        Phase::Skipped { .. }
    ));
    assert!(
        fleet
            .events(&id)
            .iter()
            .any(|e| e.starts_with(&format!("{} skipped: offline at its turn", cut_off.id)))
    );
    assert_eq!(
        cut_off.served().as_deref(),
        Some("1.0.0"),
        "the cut-off host kept serving"
    );
    cut_off.proxy.as_ref().unwrap().restore();
    wait_for("the host to come back and report", LONG, || {
        let hosts: Vec<serde_json::Value> = fleet.client().get("/v1/hosts").unwrap();
        hosts
            .iter()
            .any(|h| h["id"] == cut_off.id.as_str() && h["state"] == "online")
    });
    // Its desired state is what it runs: nothing was decided for it while it was away.
    let hosts: Vec<serde_json::Value> = fleet.client().get("/v1/hosts").unwrap();
    let back = hosts
        .iter()
        .find(|h| h["id"] == cut_off.id.as_str())
        .unwrap();
    assert_eq!(
        back["report"]["services"][0]["committed"]["version"],
        "1.0.0"
    );
}

/// 8. A hostile coordinator serves bundles signed by an unknown key, or tampered: refused, release kept.
#[test]
fn a_hostile_coordinator_cannot_make_a_host_run_an_untrusted_bundle() {
    let fleet = Fleet::start(Options {
        hosts: 2,
        ..Options::default()
    });
    fleet.install_everywhere("1.0.0");
    let outsider = turnout_proto::keys::SecretKey::from_seed([99; 32]);
    let rogue = fleet.bundle("6.6.6", "healthy", &outsider);
    // The compromise: the bundle goes straight into the store, past the push check.
    let bytes = std::fs::read(&rogue).unwrap();
    let sha =
        turnout_proto::Digest::from_bytes(<sha2::Sha256 as sha2::Digest>::digest(&bytes).into());
    std::fs::copy(
        &rogue,
        fleet
            .dir
            .path()
            .join(format!("coordinator/bundles/{sha}.tnt")),
    )
    .unwrap();
    let db = rusqlite_free_insert(&fleet, &sha, "6.6.6", bytes.len());
    assert!(db);
    let id =
        fleet.rollout(json!({"service": "web", "release": "web@6.6.6", "waves": ["1", "100%"]}));
    fleet.wait_state(&id, "rolled_back", LONG);
    let canary = fleet.get(&id).waves[0][0].to_string();
    let host = fleet.hosts.iter().find(|h| h.id == canary).unwrap();
    let status = host.status();
    assert_eq!(status["last_outcome"]["kind"], "rejected", "{status}");
    assert!(
        status["last_outcome"]["reason"]
            .as_str()
            .unwrap()
            .contains("does not list"),
        "{status}"
    );
    assert_eq!(host.served().as_deref(), Some("1.0.0"));
    assert!(
        fleet
            .events(&id)
            .iter()
            .any(|e| e.contains("failed: rejected")),
        "{:#?}",
        fleet.events(&id)
    );

    // A swapped file: the store serves other bytes under the digest the desired state names.
    let v2 = fleet
        .client()
        .get::<Vec<serde_json::Value>>("/v1/bundles")
        .unwrap()
        .into_iter()
        .find(|b| b["version"] == "2.0.0")
        .unwrap();
    let path = fleet.dir.path().join(format!(
        "coordinator/bundles/{}.tnt",
        v2["sha256"].as_str().unwrap()
    ));
    let mut tampered = std::fs::read(&path).unwrap();
    let at = tampered.len() - 1100;
    tampered[at] ^= 0x20;
    std::fs::write(&path, tampered).unwrap();
    let id =
        fleet.rollout(json!({"service": "web", "release": "web@2.0.0", "waves": ["1", "100%"]}));
    fleet.wait_state(&id, "rolled_back", LONG);
    let canary = fleet.get(&id).waves[0][0].to_string();
    let host = fleet.hosts.iter().find(|h| h.id == canary).unwrap();
    let status = host.status();
    assert!(
        status["last_outcome"]["reason"]
            .as_str()
            .unwrap()
            .contains("corrupt or swapped"),
        "{status}"
    );
    assert_eq!(host.served().as_deref(), Some("1.0.0"));
}

/// Registers a bundle in the coordinator's database the way a compromised
/// coordinator would, bypassing the trust check (the `sqlite3` shell is not
/// needed: the coordinator's own store does it).
fn rusqlite_free_insert(
    fleet: &Fleet,
    sha: &turnout_proto::Digest,
    version: &str,
    size: usize,
) -> bool {
    let store =
        turnout::store::Store::open(&fleet.dir.path().join("coordinator/coordinator.db")).unwrap();
    store
        .add_bundle(&turnout::store::BundleRecord {
            sha256: sha.to_string(),
            name: "web".into(),
            version: version.into(),
            size: size as u64,
            created_ms: 1,
        })
        .is_ok()
}

/// 9. Mixed versions: an agent without long polls works alongside; one with a disjoint range is refused and keeps serving.
#[test]
fn mixed_agent_versions_work_together_or_are_refused_cleanly() {
    let fleet = Fleet::start(Options {
        hosts: 3,
        env: Box::new(|i| match i {
            1 => vec![("TURNOUT_AGENT_TEST_WITHOUT".into(), "long_poll".into())],
            2 => vec![("TURNOUT_AGENT_TEST_PROTO".into(), "5-7".into())],
            _ => vec![],
        }),
        ..Options::default()
    });
    let hosts: Vec<serde_json::Value> = fleet.client().get("/v1/hosts").unwrap();
    let future = hosts.iter().find(|h| h["id"] == "host-02").unwrap();
    assert_eq!(future["state"], "incompatible");
    assert!(
        future["incompatible"]
            .as_str()
            .unwrap()
            .contains("the agent speaks v5-v7"),
        "{future}"
    );
    let old = hosts.iter().find(|h| h["id"] == "host-01").unwrap();
    assert!(
        !old["capabilities"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "long_poll"),
        "{old}"
    );
    // The refused host shows why (once its link has the answer the
    // coordinator already recorded), and keeps serving what it runs.
    let status = || {
        let out = std::process::Command::new(turnout_tests::turnout_bin())
            .args(["agent", "status"])
            .env(
                "TURNOUT_AGENT_CONFIG",
                fleet.dir.path().join("host-02/agent.toml"),
            )
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    turnout_tests::wait_for("host-02's status to show the refusal", LONG, || {
        status().contains("refused: no common protocol version")
    });
    let id = fleet.rollout(
        json!({"service": "web", "release": "web@1.0.0", "waves": ["100%"], "max_parallel": 3}),
    );
    let rollout = fleet.wait_state(&id, "succeeded", LONG);
    assert_eq!(
        rollout.hosts.len(),
        2,
        "the incompatible host is not part of the rollout"
    );
    assert_eq!(
        fleet.hosts[1].served().as_deref(),
        Some("1.0.0"),
        "the agent without long polls converged"
    );
}

/// The defect found against a live fleet: when the gate trips while a host
/// is still baking the release, that host was sent nothing ("reverting on
/// its own"), kept a desired state naming the failed release, and committed
/// it while the rollout said rolled back. Now it is told its previous
/// release, and counted back only once it is at rest on it.
#[test]
fn a_host_still_baking_when_the_gate_trips_is_brought_back_and_verified() {
    let ids: Vec<turnout_proto::HostId> = (0..3)
        .map(|i| format!("host-{i:02}").parse().unwrap())
        .collect();
    let ranked = turnout::engine::rank("web-2.0.0-1", &ids);
    let index = |h: &turnout_proto::HostId| -> usize {
        h.as_str().trim_start_matches("host-").parse().unwrap()
    };
    // Wave 2 holds a host that fails 2.0.0 at once and one that bakes it
    // healthily for 5 s: the gate trips in the middle of that bake.
    let failing = index(&ranked[1]);
    let baking = ranked[2].to_string();
    let fleet = Fleet::start(Options {
        hosts: 3,
        min_healthy: "5s",
        env: Box::new(move |i| {
            if i == failing {
                vec![("TURNOUT_DEMO_UNHEALTHY".into(), "2.0.0".into())]
            } else {
                vec![]
            }
        }),
        ..Options::default()
    });
    fleet.install_everywhere("1.0.0");
    let id =
        fleet.rollout(json!({"service": "web", "release": "web@2.0.0", "waves": ["1", "100%"]}));
    let rollout = fleet.wait_state(&id, "rolled_back", LONG);
    let events = fleet.events(&id);
    assert!(
        events
            .iter()
            .any(|e| e.starts_with(&format!("{baking} rolling back to 1.0.0"))),
        "the baking host is told its previous release: {events:#?}"
    );
    assert_eq!(
        rollout.hosts[&ranked[2]].phase,
        Phase::Reverted,
        "{events:#?}"
    );
    for host in &fleet.hosts {
        assert_eq!(host.served().as_deref(), Some("1.0.0"), "{}", host.id);
        assert_eq!(
            host.status()["committed"]["version"],
            "1.0.0",
            "{} at rest on its previous release",
            host.id
        );
    }
    assert!(
        events
            .last()
            .unwrap()
            .contains("rolled back: 3 host(s) back on their previous release"),
        "{events:#?}"
    );
}

/// A fleet at rest keeps its desired-state indexes: the reports of hosts
/// that accepted exactly what the coordinator holds move nothing (a bug
/// once moved the index at every report, so a host was never at rest).
#[test]
fn a_fleet_at_rest_keeps_its_desired_state_indexes() {
    let fleet = Fleet::start(Options {
        hosts: 2,
        ..Options::default()
    });
    fleet.install_everywhere("1.0.0");
    let snapshot = || -> Vec<(u64, u64)> {
        let hosts: Vec<serde_json::Value> = fleet.client().get("/v1/hosts").unwrap();
        hosts
            .iter()
            .map(|h| {
                (
                    h["desired_index"].as_u64().unwrap(),
                    h["report"]["seq"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    };
    let before = snapshot();
    // A report's seq is its time in ms (strictly growing): three report
    // intervals (500 ms here) later, every host has reported again.
    wait_for("three more report intervals from every host", LONG, || {
        let now = snapshot();
        now.iter()
            .zip(&before)
            .all(|((_, seq), (_, seq_before))| *seq > seq_before + 1_500)
    });
    let indexes = |s: &[(u64, u64)]| s.iter().map(|(i, _)| *i).collect::<Vec<_>>();
    assert_eq!(indexes(&snapshot()), indexes(&before));
}
