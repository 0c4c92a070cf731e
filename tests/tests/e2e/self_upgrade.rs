//! The agent's own releases, outside systemd (the switch itself is proven on
//! real systemd hosts by tests/systemd/run.sh): every agent reports itself
//! as service `turnout-agent`; `turnout pack` records the protocol range an
//! agent bundle speaks and `turnout rollout plan` warns when it would not
//! talk to this coordinator; and an agent that is not a systemd service of
//! its own refuses to restart itself, so the gate trips and nothing moves.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use turnout_proto::keys::SecretKey;
use turnout_tests::{Fleet, Options, turnout_bin};

/// Packs an agent release whose entry only answers `version --json` with
/// protocol range `min`-`max`, with `turnout pack` as an operator would.
fn agent_bundle(dir: &Path, version: &str, range: (u16, u16), extra: &[&str]) -> PathBuf {
    let src = dir.join(format!("agent-src-{version}"));
    std::fs::create_dir_all(src.join("bin")).unwrap();
    let script = format!(
        "#!/bin/sh\necho '{{\"software\":\"turnout-agent {version}\",\"range\":{{\"min\":{},\"max\":{}}},\"capabilities\":[]}}'\n",
        range.0, range.1
    );
    std::fs::write(src.join("bin/turnout-agent"), script).unwrap();
    std::fs::set_permissions(
        src.join("bin/turnout-agent"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let key = dir.join("release.key.pem");
    std::fs::write(&key, SecretKey::from_seed([3; 32]).to_pem()).unwrap();
    let out = dir.join(format!("turnout-agent-{version}.tnt"));
    let packed = std::process::Command::new(turnout_bin())
        .arg("pack")
        .arg(&src)
        .args([
            "--name",
            "turnout-agent",
            "--version",
            version,
            "--entry",
            "bin/turnout-agent",
        ])
        .args(extra)
        .arg("--key")
        .arg(&key)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(packed.status.success(), "{packed:?}");
    out
}

fn plan(fleet: &Fleet, release: &str) -> Value {
    fleet
        .client()
        .post(
            "/v1/rollouts/plan",
            &json!({"spec": {"service": "turnout-agent", "release": release, "waves": ["1", "100%"]}}),
        )
        .unwrap()
}

#[test]
fn agent_releases_are_planned_with_their_protocol_checked_and_refused_outside_systemd() {
    let fleet = Fleet::start(Options::default());
    // Every agent reports itself: the installed binary, as a release.
    let hosts: Vec<Value> = fleet.client().get("/v1/hosts").unwrap();
    for h in &hosts {
        let me = h["report"]["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["service"] == "turnout-agent")
            .unwrap_or_else(|| panic!("{} does not report its agent: {h}", h["id"]));
        assert_eq!(me["committed"]["version"], h["agent_version"], "{me}");
        assert_eq!(me["state"], "idle", "{me}");
    }

    // `turnout pack` asked the entry which protocols it speaks.
    let good = agent_bundle(fleet.dir.path(), "9.0.0", (1, 2), &[]);
    fleet.push(&good);
    let inspected = std::process::Command::new(turnout_bin())
        .arg("inspect")
        .arg(&good)
        .arg("--json")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&inspected.stdout);
    assert!(text.contains("turnout-proto/1-2"), "{text}");
    let planned = plan(&fleet, "turnout-agent@9.0.0");
    assert_eq!(planned["warnings"], Value::Null, "{planned}");
    assert_eq!(
        planned["waves"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|w| w.as_array().unwrap())
            .count(),
        3,
        "{planned}"
    );

    // One that would not talk to this coordinator (v1–v2) is warned about,
    // naming the hosts.
    let alien = agent_bundle(fleet.dir.path(), "9.1.0", (7, 8), &[]);
    fleet.push(&alien);
    let warned = plan(&fleet, "turnout-agent@9.1.0");
    let warning = warned["warnings"][0].as_str().unwrap_or_default();
    assert!(
        warning.contains(
            "speaks protocol v7-v8, which does not overlap what this coordinator accepts (v1-v2)"
        ),
        "{warned}"
    );
    assert!(warning.contains("host-00"), "{warning}");
    let shown = fleet.turnout(&[
        "rollout",
        "plan",
        "--service",
        "turnout-agent",
        "--release",
        "turnout-agent@9.1.0",
        "--waves",
        "1,100%",
    ]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains("warning: turnout-agent 9.1.0 speaks"),
        "{text}"
    );

    // These agents run from a test, not as systemd services of their own:
    // they must not restart whatever unit they happen to live in.
    let pids: Vec<Option<i32>> = fleet.hosts.iter().map(|h| h.service_pid()).collect();
    let id = fleet.rollout(json!({"service": "turnout-agent", "release": "turnout-agent@9.0.0", "waves": ["1", "100%"]}));
    let rollout = fleet.wait_state(&id, "rolled_back", Duration::from_secs(60));
    let shown = serde_json::to_string(&rollout).unwrap();
    assert!(
        shown.contains("does not run as a systemd service of its own"),
        "{shown}"
    );
    // The gate tripped at the canary: nothing else was asked to move.
    let dispatched = fleet
        .events(&id)
        .iter()
        .filter(|e| e.contains("dispatched"))
        .count();
    assert_eq!(dispatched, 1, "{:?}", fleet.events(&id));
    for (host, pid) in fleet.hosts.iter().zip(pids) {
        assert_eq!(host.service_pid(), pid, "{}: web was restarted", host.id);
        let status = host.status_text();
        assert!(status.contains("connected"), "{}: {status}", host.id);
    }
    // The refusal is recorded as `refused`: it says nothing against the
    // release, so a later rollout of it is judged again (and refused again
    // here, for the same reason, not as a release that failed).
    let hosts: Vec<Value> = fleet.client().get("/v1/hosts").unwrap();
    let outcome = hosts
        .iter()
        .flat_map(|h| {
            h["report"]["services"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .find(|s| s["service"] == "turnout-agent" && !s["last_outcome"].is_null())
        .map(|s| s["last_outcome"].clone())
        .expect("the canary reports its refusal");
    assert_eq!(outcome["kind"], "refused", "{outcome}");
    assert_eq!(outcome["release"]["version"], "9.0.0", "{outcome}");
    let again = fleet.rollout(json!({"service": "turnout-agent", "release": "turnout-agent@9.0.0", "waves": ["1", "100%"]}));
    let rollout = fleet.wait_state(&again, "rolled_back", Duration::from_secs(60));
    let shown = serde_json::to_string(&rollout).unwrap();
    assert!(
        shown.contains("does not run as a systemd service of its own"),
        "{shown}"
    );
    assert!(!shown.contains("not tried again"), "{shown}");
}
