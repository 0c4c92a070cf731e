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

/// A host whose coordinator is a hostile double: web 1.0.0 and 2.0.0,
/// signed by the release key the host trusts, are served by the double,
/// whose first answer names 1.0.0 at `index`; the host is enrolled and its
/// agent started.
struct Setup {
    dir: tempfile::TempDir,
    release_key: SecretKey,
    one: DesiredService,
    two: DesiredService,
    double: Hostile,
    host: Host,
}

fn setup(expiry: Duration, index: u64) -> Setup {
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
        expiry,
        Script::Honest(desired("host-00", index, one.clone())),
    );
    double.serve_bundle(one.release.sha256.as_str(), v1);
    double.serve_bundle(two.release.sha256.as_str(), v2);
    let mut host = Host::new("host-00", &dir.path().join("host-00"), &trust, "300ms");
    host.enroll(&double.url, "tne_any", None);
    host.start(&[]);
    Setup {
        dir,
        release_key,
        one,
        two,
        double,
        host,
    }
}

#[test]
fn a_hostile_coordinator_is_refused_each_way_and_the_service_never_moves() {
    let Setup {
        one,
        two,
        double,
        mut host,
        // The directory lives as long as the test.
        dir: _dir,
        ..
    } = setup(Duration::from_secs(4), 5);
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

/// The release policy is checked against what the host would really run,
/// not against the version the desired state claims: a hostile coordinator
/// that names an old bundle as a new version gets neither a slot rollback
/// nor an install below the floor.
#[test]
fn a_hostile_coordinator_cannot_pass_an_old_release_off_as_a_new_one() {
    let Setup {
        dir,
        release_key,
        one,
        two,
        double,
        mut host,
    } = setup(Duration::from_secs(60), 1);
    wait_for("web 1.0.0 to run", Duration::from_secs(40), || {
        host.served().as_deref() == Some("1.0.0")
    });
    double.script(Script::Honest(desired("host-00", 2, two)));
    wait_for("web 2.0.0 to run", Duration::from_secs(40), || {
        host.served().as_deref() == Some("2.0.0") && host.status()["state"] == "idle"
    });
    // The release team's floor: 2.0.0.
    let mut policy = turnout_proto::policy::PolicyFile::unsigned(turnout_proto::policy::Policy {
        format: turnout_proto::policy::POLICY_FORMAT,
        version: 1,
        created: turnout_proto::manifest::Timestamp(SystemTime::now()),
        expires: turnout_proto::manifest::Timestamp(SystemTime::now() + Duration::from_secs(3600)),
        services: [(
            "web".to_owned(),
            turnout_proto::policy::ServicePolicy {
                min_version: Some("2.0.0".parse().unwrap()),
                revoked: Default::default(),
            },
        )]
        .into(),
    });
    policy.sign(&release_key);
    double.serve_policy(String::from_utf8(policy.to_bytes()).unwrap());
    let pid = host.service_pid().unwrap();

    // 1.0.0's bundle (in the other slot) named as "2.5.0": no slot rollback.
    let mut disguised = one;
    disguised.release.version = "2.5.0".parse().unwrap();
    let mut state = desired("host-00", 3, disguised);
    state.policy_version = Some(1);
    double.script(Script::Honest(state));
    wait_for(
        "the disguised rollback to be refused",
        Duration::from_secs(30),
        || {
            double.report("host-00").is_some_and(|r| {
                r["services"][0]["last_error"].as_str().is_some_and(|e| {
                    e.contains("the desired state names web 2.5.0, but that bundle is web 1.0.0")
                })
            })
        },
    );
    assert_eq!(host.served().as_deref(), Some("2.0.0"));
    assert_eq!(host.service_pid(), Some(pid));

    // A bundle of 1.5.0, never installed here, named "2.0.1": refused
    // once downloaded, before anything is touched.
    let v3 = demo_bundle(dir.path(), "1.5.0", "healthy", &release_key);
    let mut old = release(&v3, "1.5.0");
    double.serve_bundle(old.release.sha256.as_str(), v3);
    old.release.version = "2.0.1".parse().unwrap();
    let mut state = desired("host-00", 4, old);
    state.policy_version = Some(1);
    double.script(Script::Honest(state));
    wait_for(
        "the disguised install to be refused",
        Duration::from_secs(30),
        || {
            double.report("host-00").is_some_and(|r| {
            r["services"][0]["last_error"].as_str().is_some_and(|e| {
                e.contains("the desired state names web 2.0.1, but the bundle it points at is web 1.5.0")
            })
        })
        },
    );
    assert_eq!(host.served().as_deref(), Some("2.0.0"));
    assert_eq!(host.service_pid(), Some(pid));
    assert_eq!(host.status()["committed"]["version"], "2.0.0");
    host.stop();
}

/// The records a host keeps against forged and older desired state fail
/// closed: a damaged `desired.json` or `director.json` means no desired
/// state is taken (and the status says what to do), a damaged
/// `policy.json` means no install starts; the service keeps its process
/// throughout, and removing the damaged file lets the host go on.
#[test]
fn damaged_records_fail_closed_and_say_what_to_do() {
    let Setup {
        dir,
        one,
        two,
        double,
        mut host,
        ..
    } = setup(Duration::from_secs(60), 1);
    wait_for("web 1.0.0 to run", Duration::from_secs(40), || {
        host.served().as_deref() == Some("1.0.0")
            && double
                .report("host-00")
                .is_some_and(|r| r["desired_index"] == 1)
    });
    let state = dir.path().join("host-00/state");
    let refused = |what: &str| {
        double.report("host-00").is_some_and(|r| {
            r["desired_refused"]
                .as_str()
                .is_some_and(|t| t.contains(what))
        })
    };

    for (file, says) in [
        (
            "desired.json",
            "Remove the file to accept the coordinator's next signed desired state",
        ),
        ("director.json", "Enroll the host again"),
    ] {
        host.kill();
        std::fs::write(state.join(file), b"{ damaged").unwrap();
        double.script(Script::Honest(desired("host-00", 2, two.clone())));
        host.start(&[]);
        wait_for(
            &format!("a damaged {file} to be refused"),
            Duration::from_secs(30),
            || refused(says),
        );
        // The agent's own restart starts its exec service afresh; from
        // then on, while it refuses, the service keeps that process.
        let pid = host.service_pid().unwrap();
        let seq = double.report("host-00").unwrap()["seq"].as_u64().unwrap();
        wait_for(
            "more reports while refusing",
            Duration::from_secs(30),
            || {
                double
                    .report("host-00")
                    .is_some_and(|r| r["seq"].as_u64().unwrap() > seq + 2 && refused(says))
            },
        );
        let status = host.status_text();
        assert!(status.contains(&format!("{file} is damaged")), "{status}");
        assert_eq!(host.served().as_deref(), Some("1.0.0"), "{file}");
        assert_eq!(
            host.service_pid(),
            Some(pid),
            "{file}: the service was restarted"
        );
        // Put back as the operator is told to: the host goes on without a restart.
        if file == "desired.json" {
            std::fs::remove_file(state.join(file)).unwrap();
            wait_for(
                "the host to take desired state again",
                Duration::from_secs(30),
                || {
                    double
                        .report("host-00")
                        .is_some_and(|r| r["desired_refused"].is_null())
                        && host.served().as_deref() == Some("2.0.0")
                },
            );
            double.script(Script::Honest(desired("host-00", 3, one.clone())));
            wait_for("back on 1.0.0, at rest", Duration::from_secs(30), || {
                host.served().as_deref() == Some("1.0.0") && host.status()["state"] == "idle"
            });
        }
    }
    host.stop();
}

/// Expiry never stops a running agent: an agent restarted while the only
/// desired state it holds has expired (a coordinator frozen on an old
/// answer) starts, says it is stale, keeps its service on the committed
/// release, and starts nothing new.
#[test]
fn an_agent_that_starts_on_expired_desired_state_keeps_running() {
    let Setup {
        one,
        two,
        double,
        mut host,
        dir: _dir,
        ..
    } = setup(Duration::from_secs(2), 5);
    wait_for("web 1.0.0 to run", Duration::from_secs(40), || {
        host.served().as_deref() == Some("1.0.0")
    });
    // Frozen on one signed answer; it expires within 2 s.
    double.script(Script::Fixed(double.signed(&desired("host-00", 5, one))));
    wait_for("the host to report stale", Duration::from_secs(30), || {
        double
            .report("host-00")
            .is_some_and(|r| r["stale_since_ms"].as_u64().is_some())
    });
    host.stop();
    // Meanwhile the frozen coordinator would name 2.0.0, in a document
    // that is already past its expiry.
    let mut late = desired("host-00", 9, two);
    late.issued_at_ms = Some(now_ms() - 120_000);
    late.expires_ms = Some(now_ms() - 60_000);
    double.script(Script::Fixed(double.signed_as_is(&late)));
    host.start(&[]);
    wait_for(
        "the restarted agent to report",
        Duration::from_secs(30),
        || {
            double.report("host-00").is_some_and(|r| {
                r["desired_refused"]
                    .as_str()
                    .is_some_and(|t| t.contains("expired at"))
            })
        },
    );
    let status = host.status_text();
    assert!(status.contains("desired state stale since"), "{status}");
    assert_eq!(host.served().as_deref(), Some("1.0.0"));
    // Still running, a while later: expiry blocks installs, never the agent.
    wait_for("a few more reports", Duration::from_secs(30), || {
        double
            .report("host-00")
            .is_some_and(|r| r["seq"].as_u64().unwrap_or(0) > now_ms() - 1_000)
    });
    // Only the running daemon knows its link: a status made without it
    // would say nothing of staleness.
    let status = host.status_text();
    assert!(
        status.contains("desired state stale since"),
        "the agent stopped: {status}"
    );
    assert_eq!(host.served().as_deref(), Some("1.0.0"));
    host.stop();
}
