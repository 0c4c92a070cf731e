//! Crash at every journal step: the daemon is killed right after step N of
//! an install, restarted, and must come back on a committed release with
//! consistent slots and a journal that says why.
//!
//! Steps of the daemon that crashes: 1 is its own start-up recovery; then an
//! install writes fetching (2), staged (3), switching (4), baking (5) and, for
//! a healthy release, idle (6); for a failing one, reverting (6) and idle (7).

use std::time::Duration;

use crate::harness::{Host, version, wait_for};

/// Crashes after `step` while installing `mode`; returns the status afterwards.
fn crash_at(step: u32, mode: &str) -> (Host, serde_json::Value) {
    let mut host = Host::new("300ms");
    let (v1, v2) = (host.bundle("1.0.0", "healthy"), host.bundle("2.0.0", mode));
    host.start_daemon(&[]);
    assert_eq!(host.install(&v1).0, 0);
    host.stop_daemon();

    host.start_daemon(&[("TURNOUT_AGENT_CRASH_AFTER_STEP", &step.to_string())]);
    let (code, _, _) = host.install(&v2);
    wait_for(
        "the daemon to die at its step",
        Duration::from_secs(30),
        || host.daemon_exited(),
    );
    assert_ne!(
        code, 0,
        "step {step}: the install cannot have succeeded when the daemon died"
    );

    host.start_daemon(&[]);
    let status = host.status();
    (host, status)
}

fn check_consistent(step: u32, host: &Host, status: &serde_json::Value) {
    let log = host.daemon_log();
    assert_eq!(
        status["state"], "idle",
        "step {step}: recovery must settle\n{log}"
    );
    let committed = version(&status["committed"])
        .unwrap_or_else(|| panic!("step {step}: nothing committed\n{log}"));
    // current points at the slot that holds the committed release, and it serves.
    let slot = status["active_slot"]
        .as_str()
        .unwrap_or_else(|| panic!("step {step}: no active slot"));
    let held = std::fs::read_to_string(
        host.state()
            .join(format!("services/web/{slot}/.turnout-release.json")),
    )
    .unwrap();
    assert!(
        held.contains(&format!("\"version\": \"{committed}\"")),
        "step {step}: {slot} holds {held}"
    );
    let link = std::fs::read_link(host.state().join("services/web/current")).unwrap();
    assert_eq!(link.to_str(), Some(slot));
    wait_for(
        &format!("step {step}: the committed {committed} to serve"),
        Duration::from_secs(10),
        || host.served_version().as_deref() == Some(committed),
    );
    assert!(
        !host.state().join("services/web/staging/unpack").exists(),
        "step {step}: staging left behind"
    );
}

#[test]
fn a_healthy_install_interrupted_at_any_step_recovers() {
    for step in 2..=6 {
        let (host, status) = crash_at(step, "healthy");
        check_consistent(step, &host, &status);
        let committed = version(&status["committed"]).unwrap();
        let last = &status["last_outcome"];
        match step {
            // Before the switch: staging discarded, v1 kept.
            2 | 3 => assert_eq!(committed, "1.0.0", "step {step}"),
            // Switching or baking: reverted to v1, and the journal says interrupted.
            4 | 5 => {
                assert_eq!(committed, "1.0.0", "step {step}");
                assert_eq!(last["kind"], "interrupted", "step {step}: {last}");
                assert!(
                    last["reason"]
                        .as_str()
                        .unwrap()
                        .contains("reverted to 1.0.0"),
                    "step {step}: {last}"
                );
            }
            // Committed before the crash: v2 stays.
            _ => {
                assert_eq!(committed, "2.0.0", "step {step}");
                assert_eq!(last["kind"], "committed", "step {step}");
            }
        }
    }
}

#[test]
fn a_failing_install_interrupted_at_any_step_recovers() {
    for step in 2..=7 {
        let (host, status) = crash_at(step, "unhealthy");
        check_consistent(step, &host, &status);
        assert_eq!(
            version(&status["committed"]),
            Some("1.0.0"),
            "step {step}: the bad release must never stay committed"
        );
        if (4..=6).contains(&step) {
            let kind = status["last_outcome"]["kind"].as_str().unwrap();
            assert!(
                kind == "interrupted" || kind == "reverted",
                "step {step}: {kind}"
            );
        }
    }
}
