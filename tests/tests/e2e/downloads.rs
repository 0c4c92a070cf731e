//! Downloads under faults, with real agents and a real coordinator: a
//! download complete on disk but never renamed (the agent stopped between
//! its last byte and the rename), a wrong one of the right size, and a
//! coordinator that serves more bytes than the desired state names.

use std::time::Duration;

use serde_json::json;
use turnout_tests::{Fleet, Options};

const LONG: Duration = Duration::from_secs(45);

/// The pushed 2.0.0 bundle: its digest and bytes.
fn release_2(fleet: &Fleet) -> (String, Vec<u8>) {
    let bundles: Vec<serde_json::Value> = fleet.client().get("/v1/bundles").unwrap();
    let sha = bundles.iter().find(|b| b["version"] == "2.0.0").unwrap()["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    let bytes = std::fs::read(
        fleet
            .dir
            .path()
            .join(format!("coordinator/bundles/{sha}.tnt")),
    )
    .unwrap();
    (sha, bytes)
}

fn cache(fleet: &Fleet, host: &str) -> std::path::PathBuf {
    fleet.dir.path().join(host).join("state/cache")
}

/// Before, the agent asked for `Range: bytes=SIZE-`, got 416, and asked
/// again, hundreds of times, never healing.
#[test]
fn a_complete_download_left_unrenamed_is_checked_and_used_or_discarded() {
    let fleet = Fleet::start(Options {
        hosts: 2,
        ..Options::default()
    });
    fleet.install_everywhere("1.0.0");
    let (sha, bytes) = release_2(&fleet);
    // host-00 has the whole bundle as a .part; host-01 has a wrong one of
    // the same size.
    std::fs::write(cache(&fleet, "host-00").join(format!("{sha}.part")), &bytes).unwrap();
    let mut wrong = bytes.clone();
    let middle = wrong.len() / 2;
    wrong[middle] ^= 0xff;
    std::fs::write(cache(&fleet, "host-01").join(format!("{sha}.part")), &wrong).unwrap();
    let id = fleet.rollout(json!({"service": "web", "release": "web@2.0.0", "waves": ["100%"]}));
    fleet.wait_state(&id, "succeeded", LONG);
    for host in &fleet.hosts {
        assert_eq!(host.served().as_deref(), Some("2.0.0"), "{}", host.id);
        let cached = cache(&fleet, &host.id).join(format!("{sha}.tnt"));
        assert_eq!(std::fs::read(&cached).unwrap(), bytes, "{}", host.id);
        assert!(!cache(&fleet, &host.id).join(format!("{sha}.part")).exists());
    }
    let metrics = fleet.metrics();
    assert!(
        !metrics.contains("status=\"416\""),
        "no download was asked for past its end:\n{metrics}"
    );
}

/// A hostile or broken coordinator wrote 16.6 MB for a 5,120-byte release
/// and filled the disk; now the download stops at the named size.
#[test]
fn a_server_sending_more_than_the_named_size_is_cut_off() {
    let fleet = Fleet::start(Options {
        hosts: 1,
        ..Options::default()
    });
    fleet.install_everywhere("1.0.0");
    let (sha, bytes) = release_2(&fleet);
    // The compromise: the stored file grows by 8 MiB after its record.
    let mut padded = bytes.clone();
    padded.extend(std::iter::repeat_n(0u8, 8 << 20));
    std::fs::write(
        fleet
            .dir
            .path()
            .join(format!("coordinator/bundles/{sha}.tnt")),
        &padded,
    )
    .unwrap();
    let id = fleet.rollout(json!({"service": "web", "release": "web@2.0.0", "waves": ["100%"]}));
    fleet.wait_state(&id, "rolled_back", LONG);
    let host = &fleet.hosts[0];
    let status = host.status();
    // A fault of the server, not a verdict on the release: recorded as
    // failed (the rollout sees it), and not held against the release.
    assert_eq!(status["last_outcome"]["kind"], "failed", "{status}");
    let reason = status["last_outcome"]["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("more than the {} bytes", bytes.len())),
        "{reason}"
    );
    assert_eq!(host.served().as_deref(), Some("1.0.0"));
    let left: u64 = std::fs::read_dir(cache(&fleet, &host.id))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(&sha))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert_eq!(left, 0, "nothing of the oversized download is kept");
}

/// `rm -rf` of the slot that runs: after an agent restart the service used
/// to stay down although the bundle was cached. Now the slot is unpacked
/// again from the cache and the service comes back without a coordinator.
#[test]
fn a_deleted_active_slot_is_unpacked_again_from_the_cache() {
    let mut fleet = Fleet::start(Options {
        hosts: 1,
        ..Options::default()
    });
    fleet.install_everywhere("1.0.0");
    fleet.kill_coordinator();
    let host = &mut fleet.hosts[0];
    host.kill();
    let service = fleet.dir.path().join("host-00/state/services/web");
    let active = std::fs::read_link(service.join("current")).unwrap();
    std::fs::remove_dir_all(service.join(&active)).unwrap();
    host.start(&[]);
    turnout_tests::wait_for("1.0.0 to serve again", LONG, || {
        host.served().as_deref() == Some("1.0.0")
    });
    assert!(
        host.log().contains("unpacking it again from"),
        "{}",
        host.log()
    );
    assert_eq!(std::fs::read_link(service.join("current")).unwrap(), active);
    assert_eq!(host.status()["committed"]["version"], "1.0.0");
}

/// Found by attacking the rollback fix: an agent that was handed a release
/// (here: its link stalls with the answer in flight) and got it only after
/// a rollback took that release back, installed and committed it before
/// going back. Now it asks again right before installing.
#[test]
fn a_stalled_agent_does_not_install_a_release_rolled_back_meanwhile() {
    let fleet = Fleet::start(Options {
        hosts: 1,
        proxied: vec![0],
        ..Options::default()
    });
    fleet.install_everywhere("1.0.0");
    let host = &fleet.hosts[0];
    // The line whose absence below proves 2.0.0 was never committed.
    turnout_tests::wait_for("the commit of 1.0.0 in the agent's log", LONG, || {
        host.log().contains("committed web 1.0.0")
    });
    let proxy = host.proxy.as_ref().unwrap();
    for attempt in 1.. {
        proxy.hold();
        let id =
            fleet.rollout(json!({"service": "web", "release": "web@2.0.0", "waves": ["100%"]}));
        // The answer naming 2.0.0 is held unless the agent was between polls.
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        let mut handed = false;
        while !handed && std::time::Instant::now() < deadline {
            // In the signed document, itself a JSON string: quotes escaped.
            handed = proxy.held().contains(r#"\"2.0.0\""#);
            std::thread::sleep(Duration::from_millis(20));
        }
        fleet
            .client()
            .post::<serde_json::Value>(&format!("/v1/rollouts/{id}/rollback"), &json!({}))
            .unwrap();
        proxy.release();
        fleet.wait_state(&id, "rolled_back", LONG);
        turnout_tests::wait_for("the host to settle on 1.0.0", LONG, || {
            host.served().as_deref() == Some("1.0.0") && host.status()["state"] == "idle"
        });
        assert!(
            !host.log().contains("committed web 2.0.0"),
            "it installed the rolled-back release:\n{}",
            host.log()
        );
        if handed {
            assert!(
                host.log()
                    .contains("no longer wanted by the coordinator; not installing it"),
                "{}",
                host.log()
            );
            return;
        }
        assert!(attempt < 3, "the answer never waited in the stalled link");
    }
}
