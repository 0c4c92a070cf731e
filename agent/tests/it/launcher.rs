//! The launcher, with the real binary: `turnout-agent run` execs the agent
//! release `current` names (here a script that records how it was run),
//! reverts a switch whose deadline passed before it launches anything, and
//! gives a new agent a whole window again after a reboot.

use std::path::PathBuf;
use std::process::Command;

use turnout_agent::upgrade::{AgentRelease, HANDOFF_FORMAT, Handoff, Layout, Phase};
use turnout_proto::Digest;
use turnout_proto::messages::ReleaseRef;

struct Host {
    /// Everything lives here, for as long as the test.
    _dir: tempfile::TempDir,
    layout: Layout,
    config: PathBuf,
}

fn host() -> Host {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\ntrust = \"{}\"\n",
            state.display(),
            dir.path().join("trust.json").display()
        ),
    )
    .unwrap();
    Host {
        layout: Layout::new(&state),
        _dir: dir,
        config,
    }
}

/// Stages an agent release whose entry writes `ran` beside itself.
fn release(layout: &Layout, version: &str, fill: u8) -> AgentRelease {
    let release = ReleaseRef {
        name: "turnout-agent".into(),
        version: version.parse().unwrap(),
        sha256: Digest::from_bytes([fill; 32]),
    };
    let dir = Layout::dir_name(&release);
    let root = layout.release_dir(&dir);
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::write(
        root.join("bin/turnout-agent"),
        "#!/bin/sh\necho \"$TURNOUT_AGENT_RELEASE $*\" > \"$(dirname \"$0\")/../ran\"\n",
    )
    .unwrap();
    std::fs::set_permissions(
        root.join("bin/turnout-agent"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(
        root.join(".turnout-release.json"),
        serde_json::to_vec(&serde_json::json!({
            "format": 1, "release": release, "entry": "bin/turnout-agent", "installed_ms": 0
        }))
        .unwrap(),
    )
    .unwrap();
    AgentRelease {
        release,
        dir: Some(dir),
    }
}

fn ran(layout: &Layout, agent: &AgentRelease) -> Option<String> {
    std::fs::read_to_string(
        layout
            .release_dir(agent.dir.as_deref().unwrap())
            .join("ran"),
    )
    .ok()
}

fn launch(host: &Host) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_turnout-agent"))
        .arg("--config")
        .arg(&host.config)
        .arg("run")
        .env_remove("TURNOUT_AGENT_RELEASE")
        .output()
        .unwrap()
}

fn armed(
    from: &AgentRelease,
    to: &AgentRelease,
    deadline_ms: u64,
    boot: Option<String>,
) -> Handoff {
    Handoff {
        format: HANDOFF_FORMAT,
        from: from.clone(),
        to: to.clone(),
        armed_ms: 1_000,
        deadline_ms,
        needs_hello: true,
        unit: "turnout-agent.service".into(),
        deadman: "turnout-agent-deadman-test".into(),
        boot_id: boot,
        window_ms: 600_000,
        previous_before: None,
        phase: Phase::Armed,
    }
}

fn now_ms() -> u64 {
    turnout_agent::service::now_ms()
}

#[test]
fn the_installed_binary_execs_current_even_beside_a_damaged_record() {
    let host = host();
    let new = release(&host.layout, "0.3.0", 3);
    host.layout.point("current", new.dir.as_deref()).unwrap();
    std::fs::write(host.layout.root().join("handoff.json"), b"{").unwrap();
    let out = launch(&host);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        ran(&host.layout, &new).as_deref(),
        Some(format!("{} run\n", new.dir.as_deref().unwrap()).as_str()),
        "{out:?}"
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("does not read"), "{log}");
    // Nothing was changed: the record stays for an operator to look at.
    assert_eq!(
        std::fs::read(host.layout.root().join("handoff.json")).unwrap(),
        b"{"
    );
}

#[test]
fn a_switch_past_its_deadline_in_this_boot_is_reverted_before_anything_runs() {
    let host = host();
    let (old, new) = (
        release(&host.layout, "0.2.0", 2),
        release(&host.layout, "0.3.0", 3),
    );
    host.layout.point("previous", old.dir.as_deref()).unwrap();
    host.layout.point("current", new.dir.as_deref()).unwrap();
    let boot = turnout_agent::upgrade::switch::boot_id();
    host.layout
        .save_handoff(&armed(&old, &new, now_ms() - 1_000, boot))
        .unwrap();
    let out = launch(&host);
    assert!(out.status.success(), "{out:?}");
    assert!(ran(&host.layout, &new).is_none(), "the new agent ran");
    assert!(ran(&host.layout, &old).is_some(), "{out:?}");
    assert_eq!(host.layout.current(), old.dir);
    assert_eq!(
        host.layout.previous(),
        None,
        "the failed agent is no rollback target"
    );
    let Phase::Reverted {
        reason, verdict, ..
    } = host.layout.handoff().unwrap().unwrap().phase
    else {
        panic!("not reverted")
    };
    assert!(
        reason.contains("did not confirm itself by its deadline"),
        "{reason}"
    );
    assert!(verdict);
}

#[test]
fn after_a_reboot_a_new_agent_on_probation_gets_a_whole_window() {
    let host = host();
    let (old, new) = (
        release(&host.layout, "0.2.0", 2),
        release(&host.layout, "0.3.0", 3),
    );
    host.layout.point("current", new.dir.as_deref()).unwrap();
    // Its deadline passed while the host was down, in another boot.
    host.layout
        .save_handoff(&armed(
            &old,
            &new,
            now_ms() - 1_000,
            Some("another boot".into()),
        ))
        .unwrap();
    let before = now_ms();
    let out = launch(&host);
    assert!(out.status.success(), "{out:?}");
    assert!(ran(&host.layout, &new).is_some(), "{out:?}");
    assert!(ran(&host.layout, &old).is_none());
    let h = host.layout.handoff().unwrap().unwrap();
    assert_eq!(h.phase, Phase::Armed);
    assert!(h.deadline_ms >= before + 600_000, "{h:?}");
    assert_eq!(h.boot_id, turnout_agent::upgrade::switch::boot_id());
}

fn upgrade(host: &Host, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_turnout-agent"))
        .arg("--config")
        .arg(&host.config)
        .arg("upgrade")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn upgrade_status_and_retry_read_a_host_and_change_only_what_they_say() {
    let host = host();
    // A host where no agent ran: nothing to show, nothing made.
    let out = upgrade(&host, &["status"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("current:  the installed binary"), "{text}");
    assert!(
        !host
            .layout
            .root()
            .parent()
            .unwrap()
            .join("agent.db")
            .exists()
    );
    let out = upgrade(&host, &["retry", "0.3.0"]);
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing to retry"),
        "{out:?}"
    );

    // An agent version that failed here is forgotten by `retry`, and only it.
    let state = host.layout.root().parent().unwrap().to_owned();
    std::fs::create_dir_all(&state).unwrap();
    let bad = release(&host.layout, "0.3.0", 3).release;
    let good = release(&host.layout, "0.2.0", 2).release;
    {
        let mut journal = turnout_agent::journal::Journal::open(&state.join("agent.db")).unwrap();
        let entry = |kind, r: &ReleaseRef| turnout_agent::journal::HistoryEntry {
            kind,
            release: Some(r.clone()),
            reason: "agent upgrade to 0.3.0 failed: it exited".into(),
            at_ms: 1,
        };
        use turnout_proto::messages::OutcomeKind;
        journal
            .persist(
                "turnout-agent",
                &turnout_agent::machine::State::Idle {
                    committed: Some(good.clone()),
                },
                &[
                    entry(OutcomeKind::Committed, &good),
                    entry(OutcomeKind::Reverted, &bad),
                ],
                1,
            )
            .unwrap();
    }
    let out = upgrade(&host, &["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["history"][0]["kind"], "reverted", "{status}");
    let out = upgrade(&host, &["retry", "0.2.0"]);
    assert_eq!(out.status.code(), Some(6), "0.2.0 never failed: {out:?}");
    let out = upgrade(&host, &["retry", "0.3.0"]);
    assert!(out.status.success(), "{out:?}");
    let out = upgrade(&host, &["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let kinds: Vec<&str> = status["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["committed"], "{status}");
}
