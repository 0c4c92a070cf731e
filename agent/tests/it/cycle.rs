//! The install cycle end to end, as the agent issue's acceptance reads:
//! install, commit, rollback, automatic revert, and the refusals, with
//! `status` checked at every step. Exec supervisor, demo service, real daemon.

use std::time::Duration;

use crate::harness::{Host, version, wait_for};

#[test]
fn install_commit_rollback_and_automatic_revert() {
    let mut host = Host::new("300ms");
    let (v1, v2, v3) = (
        host.bundle("1.0.0", "healthy"),
        host.bundle("2.0.0", "healthy"),
        host.bundle("3.0.0", "unhealthy"),
    );
    host.start_daemon(&[]);

    let (code, out, err) = host.install(&v1);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("committed web 1.0.0"), "{out}");
    let s = host.status();
    assert_eq!(
        (s["state"].as_str(), version(&s["committed"])),
        (Some("idle"), Some("1.0.0"))
    );
    // The daemon's monitor judges health at rest; it settles within a few intervals.
    wait_for("v1 to be judged healthy", Duration::from_secs(5), || {
        host.status()["health"] == "healthy"
    });
    assert_eq!(host.served_version().as_deref(), Some("1.0.0"));

    let (code, out, _) = host.install(&v2);
    assert_eq!(code, 0, "{out}");
    let s = host.status();
    assert_eq!(version(&s["committed"]), Some("2.0.0"));
    assert_eq!(
        version(&s["other"]),
        Some("1.0.0"),
        "v1 stays in the other slot"
    );
    assert_ne!(s["active_slot"], serde_json::Value::Null);
    assert_eq!(host.served_version().as_deref(), Some("2.0.0"));

    let (code, out, _) = host.run(&["rollback", "--service", "web"]);
    assert_eq!(code, 0, "{out}");
    let s = host.status();
    assert_eq!(
        (version(&s["committed"]), version(&s["other"])),
        (Some("1.0.0"), Some("2.0.0"))
    );
    assert_eq!(s["last_outcome"]["kind"], "committed");
    assert_eq!(host.served_version().as_deref(), Some("1.0.0"));

    assert_eq!(host.install(&v2).0, 0);
    // v3 fails its checks: the agent reverts to v2 on its own, on the
    // failure threshold (3 in a row), not the bake deadline. (How fast is
    // measured in bench/host-revert.sh, not asserted here.)
    let (code, out, _) = host.install(&v3);
    assert_eq!(code, 5, "exit 5 means installed, failed, reverted: {out}");
    assert!(out.contains("reverted web 3.0.0: check http"), "{out}");
    assert!(out.contains("failed 3 times in a row: status 503"), "{out}");
    let s = host.status();
    assert_eq!(
        (version(&s["committed"]), version(&s["other"])),
        (Some("2.0.0"), Some("3.0.0"))
    );
    assert_eq!(s["last_outcome"]["kind"], "reverted");
    assert_eq!(host.served_version().as_deref(), Some("2.0.0"));

    // The other slot holds the release that just failed: rollback refuses.
    let (code, _, err) = host.run(&["rollback", "--service", "web"]);
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("which failed on this host"), "{err}");
    assert_eq!(version(&host.status()["committed"]), Some("2.0.0"));

    // Text status names the committed release, the slots and the last outcome.
    wait_for("v2 to be judged healthy", Duration::from_secs(5), || {
        host.status()["health"] == "healthy"
    });
    let (_, text, _) = host.run(&["status"]);
    assert!(text.contains("web: idle, committed 2.0.0 in"), "{text}");
    assert!(text.contains("other slot 3.0.0, health healthy"), "{text}");
    assert!(text.contains("last: reverted 3.0.0"), "{text}");
    host.stop_daemon();
    wait_for(
        "the service to stop with the daemon",
        Duration::from_secs(5),
        || host.served_version().is_none(),
    );
}

#[test]
fn a_service_that_crashes_on_start_is_reverted_at_once() {
    let mut host = Host::new("2s");
    let (v1, bad) = (
        host.bundle("1.0.0", "healthy"),
        host.bundle("1.1.0", "crash"),
    );
    host.start_daemon(&[]);
    assert_eq!(host.install(&v1).0, 0);
    let (code, out, _) = host.install(&bad);
    assert_eq!(code, 5, "{out}");
    assert!(
        out.contains("the service crashed") || out.contains("not running"),
        "{out}"
    );
    assert_eq!(host.served_version().as_deref(), Some("1.0.0"));
}

#[test]
fn installing_the_committed_release_again_changes_nothing() {
    let mut host = Host::new("300ms");
    let v1 = host.bundle("1.0.0", "healthy");
    host.start_daemon(&[]);
    assert_eq!(host.install(&v1).0, 0);
    let before = host.status();
    let (code, out, _) = host.install(&v1);
    assert_eq!(code, 0);
    assert!(
        out.contains("already the committed release; nothing to do"),
        "{out}"
    );
    assert_eq!(host.status()["last_outcome"], before["last_outcome"]);
}

#[test]
fn a_downgrade_is_refused_unless_it_is_the_other_slot() {
    let mut host = Host::new("300ms");
    let (v1, v2, v0) = (
        host.bundle("1.0.0", "healthy"),
        host.bundle("2.0.0", "healthy"),
        host.bundle("0.9.0", "healthy"),
    );
    host.start_daemon(&[]);
    assert_eq!(host.install(&v1).0, 0);
    assert_eq!(host.install(&v2).0, 0);
    let (code, out, _) = host.install(&v0);
    assert_eq!(code, 4, "{out}");
    assert!(
        out.contains("downgrade refused: web 0.9.0 is older than the committed 2.0.0"),
        "{out}"
    );
    // v1's bundle is the release in the other slot: going back to it is a rollback.
    let (code, out, _) = host.install(&v1);
    assert_eq!(code, 0, "{out}");
    assert_eq!(host.served_version().as_deref(), Some("1.0.0"));
}

#[test]
fn health_is_watched_at_rest_and_status_shows_it() {
    let mut host = Host::new("300ms");
    // Healthy for 1 s (long enough to commit), then 503.
    let flaky = host.bundle("1.0.0", "fail-after");
    host.start_daemon(&[]);
    let (code, out, _) = host.install(&flaky);
    assert_eq!(code, 0, "{out}");
    wait_for(
        "the monitor to see the service turn unhealthy",
        Duration::from_secs(10),
        || host.status()["health"] == "unhealthy",
    );
    let s = host.status();
    assert!(
        s["health_detail"]
            .as_str()
            .unwrap()
            .contains("failed 3 times in a row: status 503"),
        "{s}\n{}",
        host.daemon_log()
    );
    assert_eq!(
        s["state"], "idle",
        "health at rest is reported, not acted on: the coordinator decides"
    );
}

#[test]
fn the_daemon_logs_json_lines_when_asked() {
    let mut host = Host::new("300ms");
    let v1 = host.bundle("1.0.0", "healthy");
    host.start_daemon(&[("TURNOUT_LOG_FORMAT", "json")]);
    assert_eq!(host.install(&v1).0, 0);
    host.stop_daemon();
    let log = host.daemon_log();
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.len() >= 3, "{log}");
    for line in lines {
        let entry: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            entry["timestamp"].as_str().unwrap().ends_with('Z'),
            "{line}"
        );
        assert!(
            ["ERROR", "WARN", "INFO"].contains(&entry["level"].as_str().unwrap()),
            "{line}"
        );
        assert!(entry["message"].is_string(), "{line}");
    }
    let entries: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        entries.iter().any(|e| e["message"]
            .as_str()
            .unwrap()
            .starts_with("demo service 1.0.0 listening")
            && e["service"] == "web"
            && e["target"] == "turnout_agent::output"),
        "the service's own output is logged with its name: {log}"
    );
    assert!(
        entries
            .iter()
            .any(|e| e["spans"].as_array().is_some_and(|spans| spans
                .iter()
                .any(|s| s["name"] == "install" && s["service"] == "web"))),
        "what an install logs is inside its span, with the service: {log}"
    );
}

#[test]
fn a_health_url_without_a_port_probes_port_80_and_commits() {
    // Before: `http://127.0.0.1/healthz` passed validation, then every probe
    // failed to connect (no port), so every install reverted.
    let host = Host::new("300ms");
    let text = std::fs::read_to_string(host.path("agent.toml")).unwrap();
    host.write_config(
        &text
            .replace(
                &format!(r#"exec = ["bin/demo", "--port", "{}"]"#, host.port),
                r#"exec = ["bin/demo", "--port", "80"]"#,
            )
            .replace(
                &format!("http://127.0.0.1:{}/healthz", host.port),
                "http://127.0.0.1/healthz",
            ),
    );
    let mut host = host;
    let v1 = host.bundle("1.0.0", "healthy");
    host.start_daemon(&[]);
    let (code, out, err) = host.install(&v1);
    assert_eq!(code, 0, "{out}{err}");
    let s = host.status();
    assert_eq!(s["state"], "idle", "{s}");
    assert_eq!(s["committed"]["version"], "1.0.0", "{s}");
    assert_eq!(s["last_outcome"]["kind"], "committed", "{s}");
}
