//! What an earlier agent wrote opens and reads in this one: the journal,
//! the enrollment and a slot's release file, as main at 70b2e72 wrote
//! them (`tests/fixtures/main-70b2e72`, made by `turnout demo`).

use std::path::Path;

use turnout_agent::journal::Journal;
use turnout_agent::machine::State;
use turnout_agent::slots::{RELEASE_FILE, RELEASE_FILE_FORMAT, ServiceDir, Slot, SlotRelease};
use turnout_proto::messages::OutcomeKind;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/main-70b2e72")
        .join(name)
}

#[test]
fn a_journal_written_before_issue_13_opens_with_its_state_and_history() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.db");
    std::fs::copy(fixture("agent.db"), &path).unwrap();
    let journal = Journal::open(&path).unwrap();
    let State::Idle {
        committed: Some(committed),
    } = journal.state("web").unwrap()
    else {
        panic!("web is idle with a committed release");
    };
    assert_eq!(committed.version.to_string(), "2.0.0");
    assert_eq!(
        committed.sha256.to_string(),
        "86dfaded774619b1540e2188bb619bab326daa1ae341f2fd077325ee50f87840"
    );
    let history = journal.history("web", 10).unwrap();
    assert_eq!(history.len(), 2, "{history:?}");
    assert!(
        history
            .iter()
            .all(|h| h.kind == OutcomeKind::Committed && h.at_ms > 0),
        "{history:?}"
    );
    drop(journal);
    // Opened again (migrations are idempotent), it reads the same.
    assert_eq!(
        Journal::open(&path).unwrap().history("web", 10).unwrap(),
        history
    );
}

#[test]
fn a_slot_release_file_and_an_enrollment_written_before_issue_13_read() {
    let dir = tempfile::tempdir().unwrap();
    let service = ServiceDir::open(dir.path(), "web").unwrap();
    let green = dir.path().join("services/web/green");
    std::fs::create_dir_all(&green).unwrap();
    std::fs::copy(fixture(".turnout-release.json"), green.join(RELEASE_FILE)).unwrap();
    let held: SlotRelease = service.release_in(Slot::Green).expect("it reads");
    assert_eq!(held.format, 1, "a file without a format is format 1");
    assert_eq!(held.release.version.to_string(), "2.0.0");
    assert_eq!(held.entry.as_str(), "bin/web");
    assert!(held.manifest_sha256.is_some());
    // Rewritten by this build, it carries its format and still reads.
    service.rewrite_release(Slot::Green, &held).unwrap();
    let text = std::fs::read_to_string(green.join(RELEASE_FILE)).unwrap();
    assert!(
        text.contains(&format!("\"format\": {RELEASE_FILE_FORMAT}")),
        "{text}"
    );
    assert_eq!(service.release_in(Slot::Green), Some(held));

    let state = dir.path();
    std::fs::copy(fixture("coordinator.json"), state.join("coordinator.json")).unwrap();
    let key = turnout_proto::keys::SecretKey::from_seed([9; 32]);
    std::fs::write(state.join("identity.pem"), key.to_pem()).unwrap();
    let identity = turnout_agent::link::Identity::load(state)
        .unwrap()
        .expect("enrolled");
    assert_eq!(identity.host.as_str(), "host-1");
    assert_eq!(identity.coordinator, "http://127.0.0.1:43457");
}
