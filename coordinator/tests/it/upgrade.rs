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
