//! A hostile coordinator (a double that holds the real director key, see
//! `turnout_tests::hostile`) against a real agent process: every forged,
//! replayed, misaddressed, expired or frozen desired state is refused with
//! its own reason in the agent's status and report, and the service keeps
//! running on its committed release, the same process throughout.

use std::time::{Duration, SystemTime};

use sha2::Digest as _;

use turnout_proto::keys::SecretKey;
use turnout_proto::messages::{DesiredService, ReleaseRef};
use turnout_proto::trust::{Trust, TrustFile};
use turnout_tests::hostile::{Hostile, Script, desired, now_ms};
use turnout_tests::{Host, demo_bundle, wait_for};

fn release(path: &std::path::Path, version: &str) -> DesiredService {
    let bytes = std::fs::read(path).unwrap();
    DesiredService {
        service: "web".parse().unwrap(),
        release: ReleaseRef {
            name: "web".into(),
            version: version.parse().unwrap(),
            sha256: turnout_proto::Digest::from_bytes(sha2::Sha256::digest(&bytes).into()),
        },
        size: bytes.len() as u64,
        urls: Vec::new(),
        rollout: None,
    }
}

#[test]
fn a_hostile_coordinator_is_refused_each_way_and_the_service_never_moves() {
    let dir = tempfile::tempdir().unwrap();
    let release_key = SecretKey::from_seed([3; 32]);
    let trust = dir.path().join("trust.json");
    let trusted = Trust::new(1, 1, SystemTime::UNIX_EPOCH, vec![release_key.public()]).unwrap();
    std::fs::write(&trust, TrustFile::unsigned(trusted).to_bytes()).unwrap();
    let v1 = demo_bundle(dir.path(), "1.0.0", "healthy", &release_key);
    let v2 = demo_bundle(dir.path(), "2.0.0", "healthy", &release_key);
    let (one, two) = (release(&v1, "1.0.0"), release(&v2, "2.0.0"));

    let double = Hostile::start(
        SecretKey::from_seed([44; 32]),
        Duration::from_secs(4),
        Script::Honest(desired("host-00", 5, one.clone())),
    );
    double.serve_bundle(one.release.sha256.as_str(), v1);
    double.serve_bundle(two.release.sha256.as_str(), v2);

    let mut host = Host::new("host-00", &dir.path().join("host-00"), &trust, "300ms");
    host.enroll(&double.url, "tne_any", None);
    host.start(&[]);
    wait_for("web 1.0.0 to run", Duration::from_secs(40), || {
        host.served().as_deref() == Some("1.0.0")
            && double
                .report("host-00")
                .is_some_and(|r| r["desired_index"] == 5 && r["services"][0]["state"] == "idle")
    });
    let pid = host.service_pid().expect("the service runs");

    // Each attack offers web 2.0.0; each must be refused for its own reason.
    let other_host = desired("host-01", 9, two.clone());
    let mut expired = desired("host-00", 9, two.clone());
    expired.issued_at_ms = Some(now_ms() - 120_000);
    expired.expires_ms = Some(now_ms() - 60_000);
    let mut tampered =
        String::from_utf8(double.signed(&desired("host-00", 9, two.clone()))).unwrap();
    tampered = tampered.replacen("\\\"index\\\":9", "\\\"index\\\":10", 1);
    assert!(tampered.contains("\\\"index\\\":10"), "{tampered}");
    let attacks: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "a replayed older document",
            double.signed(&desired("host-00", 4, two.clone())),
            "below index 5 that this host already accepted",
        ),
        (
            "the same index with other content",
            double.signed(&desired("host-00", 5, two.clone())),
            "already accepted with other content",
        ),
        (
            "another host's document",
            double.signed(&other_host),
            "is for host host-01, but this is host host-00",
        ),
        (
            "a document signed by an unknown key",
            double.signed_by(&desired("host-00", 9, two), &SecretKey::from_seed([45; 32])),
            "this host knows the coordinator's director key as",
        ),
        (
            "a document changed after signing",
            tampered.into_bytes(),
            "does not verify",
        ),
        (
            "an expired document",
            double.signed_as_is(&expired),
            "expired at",
        ),
    ];
    for (attack, body, reason) in attacks {
        double.script(Script::Fixed(body));
        wait_for(
            &format!("{attack} to be refused"),
            Duration::from_secs(30),
            || {
                double.report("host-00").is_some_and(|r| {
                    r["desired_refused"]
                        .as_str()
                        .is_some_and(|text| text.contains(reason))
                })
            },
        );
        let status = host.status_text();
        assert!(status.contains(reason), "{attack}: status says\n{status}");
        assert_eq!(host.served().as_deref(), Some("1.0.0"), "{attack}");
        assert_eq!(
            host.service_pid(),
            Some(pid),
            "{attack}: the service was restarted"
        );
    }

    // An honest answer is taken again at once.
    double.script(Script::Honest(desired("host-00", 6, one.clone())));
    wait_for("the refusal to clear", Duration::from_secs(30), || {
        double
            .report("host-00")
            .is_some_and(|r| r["desired_refused"].is_null() && r["desired_index"] == 6)
    });

    // A frozen coordinator: the same signed answer forever. Within one
    // expiry (4 s) the host reports itself stale and touches nothing.
    let frozen = double.signed(&desired("host-00", 6, one));
    let frozen_at = now_ms();
    double.script(Script::Fixed(frozen));
    wait_for("the host to report stale", Duration::from_secs(30), || {
        double
            .report("host-00")
            .is_some_and(|r| r["stale_since_ms"].as_u64().is_some())
    });
    let stale_since = double.report("host-00").unwrap()["stale_since_ms"]
        .as_u64()
        .unwrap();
    assert!(
        stale_since >= frozen_at && stale_since <= frozen_at + 4_000 + 1_000,
        "stale since {stale_since}, frozen at {frozen_at}"
    );
    let status = host.status_text();
    assert!(status.contains("desired state stale since"), "{status}");
    assert_eq!(host.served().as_deref(), Some("1.0.0"));
    assert_eq!(host.service_pid(), Some(pid), "the service was restarted");
    host.stop();
}
