//! The release policy end to end: `turnout policy set web --min-version
//! 2.0.0`, signed by the release key, reaches every host through the
//! coordinator; a coordinator-ordered rollback to 1.0.0 is then refused by
//! every host (each says why, and the rollout's rollback names them), no
//! service moves, and a policy signed by a key the trust does not list is
//! refused.

use std::time::Duration;

use serde_json::{Value, json};
use turnout_proto::keys::SecretKey;
use turnout_tests::{Fleet, Options, turnout_bin};

const LONG: Duration = Duration::from_secs(45);

#[test]
fn after_a_floor_is_set_a_rollback_below_it_is_refused_by_every_host_and_reported() {
    let fleet = Fleet::start(Options::default());
    fleet.install_everywhere("1.0.0");
    let id = fleet.rollout(
        json!({"service": "web", "release": "web@2.0.0", "waves": ["100%"], "max_parallel": 3}),
    );
    fleet.wait_state(&id, "succeeded", LONG);

    let key = fleet.dir.path().join("release.pem");
    std::fs::write(&key, SecretKey::from_seed([3; 32]).to_pem()).unwrap();
    let set = fleet.turnout(&[
        "policy",
        "set",
        "web",
        "--min-version",
        "2.0.0",
        "--sign-with",
        key.to_str().unwrap(),
    ]);
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    assert!(
        String::from_utf8_lossy(&set.stdout).contains("policy v1 (web: floor 2.0.0, 0 revoked)"),
        "{}",
        String::from_utf8_lossy(&set.stdout)
    );

    // Straight away (the desired state names policy v1, so each host asks
    // for it before acting): the operator rolls the finished rollout back.
    fleet
        .client()
        .post::<Value>(&format!("/v1/rollouts/{id}/rollback"), &json!({}))
        .unwrap();
    let rollout = fleet.wait_state(&id, "rolled_back", LONG);
    assert_eq!(rollout.hosts.len(), 3);
    let events = fleet.events(&id);
    for host in &fleet.hosts {
        assert_eq!(
            host.served().as_deref(),
            Some("2.0.0"),
            "{}: the service moved",
            host.id
        );
        assert_eq!(
            host.status()["committed"]["version"],
            "2.0.0",
            "{}",
            host.id
        );
        let refused = events.iter().any(|e| {
            e.starts_with(&format!("{} rollback failed", host.id))
                && e.contains("web 1.0.0 is below the floor 2.0.0 set by policy v1")
        });
        assert!(
            refused,
            "{}: no refusal in the rollout's events:\n{events:#?}",
            host.id
        );
        assert_eq!(
            host.status()["last_outcome"]["kind"],
            "refused",
            "{}: {}",
            host.id,
            host.status()
        );
    }
    assert!(
        events.iter().any(|e| e.contains("3 rollback failed")),
        "{events:#?}"
    );
    let shown = fleet.turnout(&["policy", "show"]);
    let text = String::from_utf8_lossy(&shown.stdout);
    for host in &fleet.hosts {
        assert!(text.contains(&format!("{:<24} v1", host.id)), "{text}");
    }

    // A new rollout below the floor is refused before it starts.
    let below = fleet.client().post::<Value>(
        "/v1/rollouts",
        &json!({"spec": {"service": "web", "release": "web@1.0.0", "waves": ["100%"]}}),
    );
    match below {
        Err(turnout::client::ClientError::Api { status, message }) => {
            assert_eq!(status, 409);
            assert!(
                message.contains("below the floor 2.0.0 set by policy v1"),
                "{message}"
            );
        }
        other => panic!("a rollout below the floor started: {other:?}"),
    }

    // A policy signed by a key the trust does not list changes nothing.
    let stranger = fleet.dir.path().join("stranger.pem");
    std::fs::write(&stranger, SecretKey::from_seed([99; 32]).to_pem()).unwrap();
    let forged = fleet.turnout(&[
        "policy",
        "set",
        "web",
        "--no-floor",
        "--sign-with",
        stranger.to_str().unwrap(),
    ]);
    assert!(!forged.status.success());
    let stderr = String::from_utf8_lossy(&forged.stderr);
    assert!(
        stderr.contains("not signed by the release keys"),
        "{stderr}"
    );
    let shown: Value = fleet.client().get("/v1/policy").unwrap();
    assert_eq!(shown["policy"]["version"], 1);

    // Lifted by the release keys, the floor no longer holds: the release
    // the hosts refused is taken again (a refusal is not a failure).
    let lifted = fleet.turnout(&[
        "policy",
        "set",
        "web",
        "--no-floor",
        "--sign-with",
        key.to_str().unwrap(),
    ]);
    assert!(
        lifted.status.success(),
        "{}",
        String::from_utf8_lossy(&lifted.stderr)
    );
    let id = fleet.rollout(
        json!({"service": "web", "release": "web@1.0.0", "waves": ["100%"], "max_parallel": 3}),
    );
    fleet.wait_state(&id, "succeeded", LONG);
    for host in &fleet.hosts {
        assert_eq!(host.served().as_deref(), Some("1.0.0"), "{}", host.id);
    }
}

/// A coordinator's rollback to the other slot's release is refused once
/// that release's signed manifest has expired, as an install of it would be.
#[test]
fn a_rollback_to_a_release_that_expired_meanwhile_is_refused() {
    let fleet = Fleet::start(Options::default());
    let expires = std::time::SystemTime::now() + Duration::from_secs(20);
    let path = fleet.dir.path().join("web-1.5.0-expiring.tnt");
    turnout_testkit::write_bundle_expiring(
        &path,
        "web",
        "1.5.0",
        "bin/web",
        &[
            ("behaviour.toml", 0o644, b"version = \"1.5.0\"\nmode = \"healthy\"\n".to_vec()),
            (
                "bin/web",
                0o755,
                format!(
                    "#!/bin/sh\nexec \"{}\" demo-service --behaviour \"$(dirname \"$0\")/../behaviour.toml\" \"$@\"\n",
                    turnout_bin().display()
                )
                .into_bytes(),
            ),
        ],
        &[&SecretKey::from_seed([3; 32])],
        Some(expires),
    );
    fleet.push(&path);
    fleet.install_everywhere("1.5.0");
    let id = fleet.rollout(
        json!({"service": "web", "release": "web@2.0.0", "waves": ["100%"], "max_parallel": 3}),
    );
    fleet.wait_state(&id, "succeeded", LONG);
    turnout_tests::wait_for("1.5.0 to expire", LONG, || {
        std::time::SystemTime::now() > expires
    });
    fleet
        .client()
        .post::<Value>(&format!("/v1/rollouts/{id}/rollback"), &json!({}))
        .unwrap();
    fleet.wait_state(&id, "rolled_back", LONG);
    let events = fleet.events(&id);
    for host in &fleet.hosts {
        assert_eq!(host.served().as_deref(), Some("2.0.0"), "{}", host.id);
        assert!(
            events
                .iter()
                .any(|e| e.starts_with(&format!("{} rollback failed", host.id))
                    && e.contains("web 1.5.0 expired at")),
            "{}: {events:#?}",
            host.id
        );
    }
}
