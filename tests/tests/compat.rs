//! Mixed-version fleets against the real build of an earlier release
//! (`compat/releases.toml`): the 0.1.0 agent with this coordinator, this
//! agent with the 0.1.0 coordinator, and a half-upgraded fleet through a
//! canary failure and rollback, then the contract step (`min_agent_proto
//! = 2`) that refuses the 0.1.0 agents and lists them.
//!
//! The release is built by `tests/compat/build.sh 0.1.0` and named by
//! `TURNOUT_COMPAT_0_1_0` (the `turnout` binary); `tests/compat/run.sh`
//! does both and runs these tests, which are ignored otherwise.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use turnout_tests::{Fleet, Options, wait_for};

const LONG: Duration = Duration::from_secs(60);

/// The 0.1.0 `turnout` binary.
fn release_0_1_0() -> PathBuf {
    let path = std::env::var_os("TURNOUT_COMPAT_0_1_0")
        .map(PathBuf::from)
        .expect("TURNOUT_COMPAT_0_1_0 names the 0.1.0 build of `turnout`: run tests/compat/run.sh");
    let version = std::process::Command::new(&path)
        .arg("version")
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let text = String::from_utf8_lossy(&version.stdout);
    assert!(
        text.starts_with("turnout 0.1.0, protocol v1,"),
        "{} is not the 0.1.0 build: {text}",
        path.display()
    );
    path
}

fn hosts(fleet: &Fleet) -> Vec<Value> {
    fleet.client().get("/v1/hosts").unwrap()
}

fn host<'a>(hosts: &'a [Value], id: &str) -> &'a Value {
    hosts.iter().find(|h| h["id"] == id).unwrap()
}

/// Every host serves `version`.
#[track_caller]
fn all_serve(fleet: &Fleet, version: &str) {
    for host in &fleet.hosts {
        wait_for(&format!("{} to serve {version}", host.id), LONG, || {
            host.served().as_deref() == Some(version)
        });
    }
}

#[test]
#[ignore = "needs the 0.1.0 build: tests/compat/run.sh"]
fn agents_of_0_1_0_work_with_this_coordinator_in_v1() {
    let old = release_0_1_0();
    let fleet = Fleet::start(Options {
        hosts: 3,
        agent_bin: Box::new(move |_| Some(old.clone())),
        ..Options::default()
    });
    for h in hosts(&fleet) {
        assert_eq!(h["proto"], 1, "{h}");
        assert_eq!(h["legacy"], true, "{h}");
        assert_eq!(h["agent_version"], "0.1.0", "{h}");
    }
    fleet.install_everywhere("1.0.0");
    let id =
        fleet.rollout(json!({"service": "web", "release": "web@2.0.0", "waves": ["1", "100%"]}));
    fleet.wait_state(&id, "succeeded", LONG);
    all_serve(&fleet, "2.0.0");
    // An operator's rollback of a finished rollout: every host back to 1.0.0.
    fleet
        .client()
        .post::<Value>(&format!("/v1/rollouts/{id}/rollback"), &json!({}))
        .unwrap();
    fleet.wait_state(&id, "rolled_back", LONG);
    all_serve(&fleet, "1.0.0");
}

#[test]
#[ignore = "needs the 0.1.0 build: tests/compat/run.sh"]
fn this_agent_works_with_the_0_1_0_coordinator_in_v1() {
    let fleet = Fleet::start(Options {
        hosts: 3,
        coordinator_bin: Some(release_0_1_0()),
        ..Options::default()
    });
    for h in hosts(&fleet) {
        assert_eq!(h["proto"], 1, "{h}");
        assert_ne!(h["agent_version"], "0.1.0", "{h}");
    }
    fleet.install_everywhere("1.0.0");
    let id =
        fleet.rollout(json!({"service": "web", "release": "web@3.0.0", "waves": ["1", "100%"]}));
    fleet.wait_state(&id, "rolled_back", LONG);
    all_serve(&fleet, "1.0.0");
    let id =
        fleet.rollout(json!({"service": "web", "release": "web@2.0.0", "waves": ["1", "100%"]}));
    fleet.wait_state(&id, "succeeded", LONG);
    all_serve(&fleet, "2.0.0");
    for host in &fleet.hosts {
        assert!(
            host.status_text().contains("connected, protocol v1"),
            "{}",
            host.status_text()
        );
    }
}

#[test]
#[ignore = "needs the 0.1.0 build: tests/compat/run.sh"]
fn a_half_upgraded_fleet_rolls_back_together_then_the_contract_step_refuses_the_old_agents() {
    let old = release_0_1_0();
    // Hosts 0 and 1 still run the 0.1.0 agent; 2 and 3 run this one.
    let mut fleet = Fleet::start(Options {
        hosts: 4,
        agent_bin: Box::new(move |i| (i < 2).then(|| old.clone())),
        ..Options::default()
    });
    let listed = hosts(&fleet);
    for (id, proto) in [
        ("host-00", 1),
        ("host-01", 1),
        ("host-02", 2),
        ("host-03", 2),
    ] {
        assert_eq!(host(&listed, id)["proto"], proto, "{id}");
    }
    fleet.install_everywhere("1.0.0");
    // 3.0.0 fails its health checks: the canary trips the gate, whichever
    // version its agent is, and the rollout rolls back.
    let id = fleet.rollout(
        json!({"service": "web", "release": "web@3.0.0", "waves": ["1", "100%"], "max_parallel": 4}),
    );
    let rollout = fleet.wait_state(&id, "rolled_back", LONG);
    assert_eq!(rollout.waves[0].len(), 1);
    all_serve(&fleet, "1.0.0");
    let id = fleet.rollout(json!({"service": "web", "release": "web@2.0.0", "waves": ["50%", "100%"], "max_parallel": 4}));
    fleet.wait_state(&id, "succeeded", LONG);
    all_serve(&fleet, "2.0.0");

    // The contract step: v1 agents are refused, and listed as left behind.
    fleet.kill_coordinator();
    fleet.coordinator_args = vec!["--min-agent-proto".into(), "2".into()];
    fleet.start_coordinator(false);
    wait_for("the 0.1.0 agents to be refused", LONG, || {
        let listed = hosts(&fleet);
        ["host-00", "host-01"]
            .iter()
            .all(|id| host(&listed, id)["state"] == "incompatible")
    });
    let listed = hosts(&fleet);
    for id in ["host-00", "host-01"] {
        let why = host(&listed, id)["incompatible"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(why.contains("the agent speaks v1"), "{why}");
        assert!(why.contains("speaks v2"), "{why}");
    }
    let text = fleet.turnout(&["host", "list"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("refused: no common protocol version"),
        "{text}"
    );

    // The new agents carry on: a rollout reaches them, and only them.
    wait_for("the v2 agents to say hello again", LONG, || {
        let listed = hosts(&fleet);
        ["host-02", "host-03"]
            .iter()
            .all(|id| host(&listed, id)["state"] == "online")
    });
    let id = fleet.rollout(
        json!({"service": "web", "release": "web@1.0.0", "waves": ["100%"], "max_parallel": 4}),
    );
    let rollout = fleet.wait_state(&id, "succeeded", LONG);
    let moved: Vec<String> = rollout.hosts.keys().map(ToString::to_string).collect();
    assert_eq!(moved, ["host-02", "host-03"]);
    for h in &fleet.hosts {
        let want = if h.id == "host-02" || h.id == "host-03" {
            "1.0.0"
        } else {
            "2.0.0"
        };
        assert_eq!(
            h.served().as_deref(),
            Some(want),
            "{}: services keep running",
            h.id
        );
    }
}

#[test]
#[ignore = "needs the 0.1.0 build: tests/compat/run.sh"]
fn a_0_1_0_agent_is_not_ordered_below_a_policy_floor_it_cannot_enforce() {
    let old = release_0_1_0();
    let fleet = Fleet::start(Options {
        hosts: 2,
        agent_bin: Box::new(move |_| Some(old.clone())),
        ..Options::default()
    });
    fleet.install_everywhere("1.0.0");
    let id = fleet.rollout(json!({"service": "web", "release": "web@2.0.0", "waves": ["100%"], "max_parallel": 2, "healthy_deadline": "5s"}));
    fleet.wait_state(&id, "succeeded", LONG);
    let key = fleet.dir.path().join("release.pem");
    std::fs::write(
        &key,
        turnout_proto::keys::SecretKey::from_seed([3; 32]).to_pem(),
    )
    .unwrap();
    let set = fleet.turnout(&[
        "policy",
        "set",
        "web",
        "--min-version",
        "2.0.0",
        "--sign-with",
        key.to_str().unwrap(),
    ]);
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    fleet
        .client()
        .post::<Value>(&format!("/v1/rollouts/{id}/rollback"), &json!({}))
        .unwrap();
    fleet.wait_state(&id, "rolled_back", LONG);
    let events = fleet.events(&id);
    for host in &fleet.hosts {
        assert_eq!(host.served().as_deref(), Some("2.0.0"), "{}", host.id);
        assert!(
            events.iter().any(
                |e| e.starts_with(&format!("{} not told to move to 1.0.0", host.id))
                    && e.contains("speaks protocol v1")
            ),
            "{}: {events:#?}",
            host.id
        );
    }
}

/// The coordinator upgrade as docs/operations.md describes it: stop the
/// 0.1.0 coordinator mid-rollout, start this build on the same state
/// directory; the agents reconnect (now in v2) and the rollout carries on
/// from where it stood, to the end.
#[test]
#[ignore = "needs the 0.1.0 build: tests/compat/run.sh"]
fn the_0_1_0_coordinator_is_replaced_mid_rollout_and_the_rollout_finishes() {
    let mut fleet = Fleet::start(Options {
        hosts: 3,
        coordinator_bin: Some(release_0_1_0()),
        ..Options::default()
    });
    fleet.install_everywhere("1.0.0");
    let id = fleet.rollout(json!({"service": "web", "release": "web@2.0.0", "waves": ["1", "100%"], "promote": "manual", "max_parallel": 3}));
    wait_for("the canary wave to wait for promotion", LONG, || {
        let rollout: Value = fleet.client().get(&format!("/v1/rollouts/{id}")).unwrap();
        rollout["state"]["awaiting_promotion"] == true
    });
    let canary = fleet.get(&id).waves[0][0].to_string();

    // Stop, replace, start.
    fleet.kill_coordinator();
    fleet.coordinator_bin = turnout_tests::turnout_bin();
    fleet.start_coordinator(false);
    wait_for("every agent to say hello in v2", LONG, || {
        hosts(&fleet)
            .iter()
            .all(|h| h["proto"] == 2 && h["state"] == "online")
    });
    let rollout: Value = fleet.client().get(&format!("/v1/rollouts/{id}")).unwrap();
    assert_eq!(rollout["state"]["awaiting_promotion"], true, "{rollout}");
    for host in &fleet.hosts {
        let want = if host.id == canary { "2.0.0" } else { "1.0.0" };
        assert_eq!(host.served().as_deref(), Some(want), "{}", host.id);
    }
    let promoted = fleet.turnout(&["rollout", "promote", &id]);
    assert!(
        promoted.status.success(),
        "{}",
        String::from_utf8_lossy(&promoted.stderr)
    );
    fleet.wait_state(&id, "succeeded", LONG);
    all_serve(&fleet, "2.0.0");
}

/// A 0.1.0 agent cannot upgrade itself (it has no switch): planning an
/// agent rollout says so, host by host, instead of dispatching to it.
#[test]
#[ignore = "needs the 0.1.0 build: tests/compat/run.sh"]
fn a_0_1_0_agent_is_left_out_of_agent_rollouts_with_the_manual_step_named() {
    let old = release_0_1_0();
    let fleet = Fleet::start(Options {
        hosts: 2,
        agent_bin: Box::new(move |i| (i == 0).then(|| old.clone())),
        ..Options::default()
    });
    let src = fleet.dir.path().join("agent-src");
    std::fs::create_dir_all(src.join("bin")).unwrap();
    std::fs::write(src.join("bin/turnout-agent"), "#!/bin/sh\nexit 1\n").unwrap();
    std::fs::set_permissions(
        src.join("bin/turnout-agent"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let key = fleet.dir.path().join("release.pem");
    std::fs::write(
        &key,
        turnout_proto::keys::SecretKey::from_seed([3; 32]).to_pem(),
    )
    .unwrap();
    let bundle = fleet.dir.path().join("agent.tnt");
    let packed = std::process::Command::new(turnout_tests::turnout_bin())
        .arg("pack")
        .arg(&src)
        .args(["--name", "turnout-agent", "--version", "9.0.0"])
        .args([
            "--entry",
            "bin/turnout-agent",
            "--provides",
            "turnout-proto/1-2",
        ])
        .arg("--key")
        .arg(&key)
        .arg("--out")
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(packed.status.success(), "{packed:?}");
    fleet.push(&bundle);
    let plan: Value = fleet
        .client()
        .post(
            "/v1/rollouts/plan",
            &json!({"spec": {"service": "turnout-agent", "release": "turnout-agent@9.0.0", "waves": ["100%"]}}),
        )
        .unwrap();
    let why = plan["excluded"]["host-00"].as_str().unwrap_or_default();
    assert!(
        why.contains("its agent (0.1.0) cannot upgrade itself")
            && why.contains("upgrade it once by hand"),
        "{plan}"
    );
    assert_eq!(plan["waves"], json!([["host-01"]]), "{plan}");
}
