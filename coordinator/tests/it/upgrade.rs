//! A store an earlier coordinator wrote opens and reads in this one: main
//! at 70b2e72's `coordinator.db` after `turnout demo` (two hosts, three
//! bundles, three rollouts, 36 events), in `tests/fixtures/main-70b2e72`.

use std::path::Path;

use turnout::coordinator::{Coordinator, Settings};
use turnout::store::Store;

use crate::fake::trust;

fn copy_fixture(dir: &Path) {
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/main-70b2e72/coordinator.db"),
        dir.join("coordinator.db"),
    )
    .unwrap();
}

#[test]
fn a_store_written_before_issue_13_opens_and_reads_every_table() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path());
    let store = Store::open(&dir.path().join("coordinator.db")).unwrap();
    let hosts = store.hosts().unwrap();
    let ids: Vec<&str> = hosts.iter().map(|h| h.id.as_str()).collect();
    assert_eq!(ids, ["host-1", "host-2"]);
    assert!(hosts.iter().all(|h| h.report.is_some()), "reports parse");
    assert_eq!(store.bundles().unwrap().len(), 3);
    let rollouts = store.rollouts().unwrap();
    let summary: Vec<(String, &str)> = rollouts
        .iter()
        .map(|r| (r.id.to_string(), r.state.name()))
        .collect();
    assert_eq!(
        summary,
        [
            ("web-1.0.0-1".to_owned(), "succeeded"),
            ("web-2.0.0-1".to_owned(), "succeeded"),
            ("web-3.0.0-1".to_owned(), "rolled_back"),
        ]
    );
    assert_eq!(store.last_event_id().unwrap(), 36);
    assert_eq!(store.events(0, None, 100).unwrap().len(), 36);
}

#[test]
fn a_coordinator_serves_a_store_written_before_issue_13() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path());
    let coordinator = Coordinator::open(dir.path(), trust(), Settings::default()).unwrap();
    let rollouts = coordinator.with_store(|s| s.rollouts()).unwrap();
    assert_eq!(rollouts.len(), 3);
    coordinator.tick();
    assert_eq!(
        coordinator.metrics.engine_rounds(),
        1,
        "a round ran over it"
    );
    let events = coordinator.with_store(|s| s.events(0, None, 100)).unwrap();
    assert_eq!(events.len(), 36, "nothing was rewritten or added");
}

/// Runs `turnout serve` on `state` until it exits (it should refuse to start).
fn serve_refusing(dir: &Path, state: &Path) -> std::process::Output {
    let trust = crate::fake::trust_file(dir);
    std::process::Command::new(env!("CARGO_BIN_EXE_turnout"))
        .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(state)
        .arg("--trust")
        .arg(&trust)
        .output()
        .unwrap()
}

#[test]
fn a_store_of_a_newer_coordinator_is_refused_with_exit_3_and_left_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    copy_fixture(&state);
    let db = state.join("coordinator.db");
    {
        // As a newer build might leave it: another schema version, and the
        // rollback journal instead of WAL.
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.pragma_update(None, "journal_mode", "DELETE").unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
    }
    let before = std::fs::read(&db).unwrap();
    let out = serve_refusing(dir.path(), &state);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("has schema version 99") && stderr.contains("run the newer coordinator"),
        "{stderr}"
    );
    assert!(
        std::fs::read(&db).unwrap() == before,
        "the file is untouched"
    );
    let left: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left, ["coordinator.db"], "nothing made beside it");
}

#[test]
fn a_file_that_is_no_database_is_refused_with_exit_3_and_left_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let junk = b"this is a text file someone put where the database goes\n".repeat(40);
    std::fs::write(state.join("coordinator.db"), &junk).unwrap();
    let out = serve_refusing(dir.path(), &state);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("not a database"), "{stderr}");
    assert_eq!(std::fs::read(state.join("coordinator.db")).unwrap(), junk);
}
