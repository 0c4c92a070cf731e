//! Release-trust rotation through the coordinator to real hosts: a 2-of-3
//! rotation pushed with `turnout trust push` reaches every host (they then
//! install a release signed by two new keys), and a rotation signed by one
//! old key is refused by the coordinator and, when a compromised
//! coordinator serves it anyway, by every host, which keep the trust they had.

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use turnout_proto::keys::SecretKey;
use turnout_proto::signature::SignatureEntry;
use turnout_proto::trust::{Trust, TrustFile};
use turnout_tests::{Fleet, Options, turnout_bin, wait_for};

const LONG: Duration = Duration::from_secs(45);

fn rotation(
    version: u64,
    threshold: usize,
    keys: &[&SecretKey],
    signers: &[&SecretKey],
) -> TrustFile {
    let trust = Trust::new(
        version,
        threshold,
        std::time::SystemTime::now(),
        keys.iter().map(|k| k.public()).collect(),
    )
    .unwrap();
    let mut file = TrustFile::unsigned(trust);
    for key in signers {
        file.signatures.push(SignatureEntry {
            key_id: key.public().id().clone(),
            sig: key.sign(&file.signed_bytes),
        });
    }
    file
}

fn host_trust(fleet: &Fleet) -> Vec<Value> {
    let status: Value = fleet.client().get("/v1/trust").unwrap();
    status["hosts"].as_array().unwrap().clone()
}

#[test]
fn a_two_of_three_rotation_reaches_every_host_and_one_signed_by_one_old_key_is_refused_everywhere()
{
    let mut fleet = Fleet::start(Options::default());
    fleet.install_everywhere("1.0.0");
    let old = SecretKey::from_seed([3; 32]);
    let (a, b, c, d) = (
        SecretKey::from_seed([61; 32]),
        SecretKey::from_seed([62; 32]),
        SecretKey::from_seed([63; 32]),
        SecretKey::from_seed([64; 32]),
    );

    // Version 2: keys a, b, c, two of them to sign; authorised by the old key.
    let v2 = rotation(2, 2, &[&a, &b, &c], &[&old, &a, &b]);
    let file = fleet.dir.path().join("trust-v2.json");
    std::fs::write(&file, v2.to_bytes()).unwrap();
    let pushed = fleet.turnout(&["trust", "push", file.to_str().unwrap()]);
    assert!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    assert!(
        String::from_utf8_lossy(&pushed.stdout).contains("trust version 2: 2 of 3 keys required")
    );
    wait_for("every host to apply trust version 2", LONG, || {
        host_trust(&fleet).iter().all(|h| h["trust_version"] == 2)
    });

    // The coordinator and the hosts now want two of a, b, c.
    let by_old = fleet.bundle("4.0.0", "healthy", &old);
    let refused = fleet
        .client()
        .post_stream::<Value>("/v1/bundles", &mut std::fs::File::open(&by_old).unwrap());
    assert!(
        refused.is_err(),
        "a bundle signed by the retired key was taken: {refused:?}"
    );
    let path = turnout_tests::demo_bundle_signed(fleet.dir.path(), "4.0.0", "healthy", &[&a, &c]);
    fleet.push(&path);
    let id = fleet.rollout(
        json!({"service": "web", "release": "web@4.0.0", "waves": ["100%"], "max_parallel": 3}),
    );
    fleet.wait_state(&id, "succeeded", LONG);
    for host in &fleet.hosts {
        assert_eq!(host.served().as_deref(), Some("4.0.0"), "{}", host.id);
    }

    // Version 3 signed by one key of version 2 (and its own key): the
    // coordinator refuses the push, saying why.
    let v3 = rotation(3, 1, &[&d], &[&a, &d]);
    let file = fleet.dir.path().join("trust-v3.json");
    std::fs::write(&file, v3.to_bytes()).unwrap();
    let pushed = fleet.turnout(&["trust", "push", file.to_str().unwrap()]);
    assert!(!pushed.status.success());
    let stderr = String::from_utf8_lossy(&pushed.stderr);
    assert!(
        stderr.contains("not authorised by the current keys"),
        "{stderr}"
    );
    assert!(
        stderr.contains("1 valid signature(s)") || stderr.contains("2 required"),
        "{stderr}"
    );

    // A compromised coordinator serves it anyway: every host refuses it,
    // says so, and keeps version 2.
    std::fs::copy(&file, fleet.dir.path().join("coordinator/trust/3.json")).unwrap();
    fleet.kill_coordinator();
    fleet.start_coordinator(false);
    wait_for("every host to refuse version 3", LONG, || {
        host_trust(&fleet).iter().all(|h| {
            h["trust_version"] == 2
                && h["trust_refused"]
                    .as_str()
                    .is_some_and(|why| why.contains("not authorised by the current keys"))
        })
    });
    let status = fleet.turnout(&["trust", "status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("coordinator: trust version 2"), "{text}");
    assert!(
        text.contains("refused: refused the release trust rotation"),
        "{text}"
    );
    for host in &fleet.hosts {
        assert_eq!(host.served().as_deref(), Some("4.0.0"), "{}", host.id);
        let kept = std::fs::read(
            fleet
                .dir
                .path()
                .join(&host.id)
                .join("state/trust-rotations/2.json"),
        )
        .unwrap();
        let kept = TrustFile::parse(&kept, &Default::default()).unwrap();
        assert_eq!(kept.trust.version(), 2, "{}", host.id);
    }
}

/// The director key rotates like the CA: `turnout director rotate` on the
/// coordinator's machine, and every host takes the new key through the
/// handover (signed by the old key) at its next answer, drops the old one,
/// and never refuses a desired state meanwhile.
#[test]
fn a_director_key_rotation_reaches_every_host_without_a_refusal_or_enrolling_again() {
    let fleet = Fleet::start(Options::default());
    fleet.install_everywhere("1.0.0");
    let state = fleet.dir.path().join("coordinator");
    let old = std::fs::read_to_string(state.join("director.pem")).unwrap();
    let old = SecretKey::from_pem(&old).unwrap().public().id().to_string();
    let rotated = Command::new(turnout_bin())
        .args(["director", "rotate", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(
        rotated.status.success(),
        "{}",
        String::from_utf8_lossy(&rotated.stderr)
    );
    let new = std::fs::read_to_string(state.join("director.pem")).unwrap();
    let new = SecretKey::from_pem(&new).unwrap().public().id().to_string();
    assert!(
        String::from_utf8_lossy(&rotated.stdout).contains(&format!("{old} handed over to {new}"))
    );

    let director_of = |host: &turnout_tests::Host| -> Vec<String> {
        let text =
            std::fs::read_to_string(fleet.dir.path().join(&host.id).join("state/director.json"))
                .unwrap_or_default();
        let file: Value = serde_json::from_str(&text).unwrap_or_default();
        file["keys"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d["key"].as_str())
            .map(|pem| {
                turnout_proto::keys::PublicKey::from_pem(pem)
                    .unwrap()
                    .id()
                    .to_string()
            })
            .collect()
    };
    wait_for("every host to hold only the new director key", LONG, || {
        fleet.hosts.iter().all(|h| director_of(h) == [new.clone()])
    });
    let id = fleet.rollout(
        json!({"service": "web", "release": "web@2.0.0", "waves": ["100%"], "max_parallel": 3}),
    );
    fleet.wait_state(&id, "succeeded", LONG);
    for host in &fleet.hosts {
        assert_eq!(host.served().as_deref(), Some("2.0.0"), "{}", host.id);
        assert!(
            !host
                .log()
                .contains("refused the coordinator's desired state"),
            "{}:\n{}",
            host.id,
            host.log()
        );
        assert!(
            host.log()
                .contains("took the coordinator's new director key"),
            "{}",
            host.log()
        );
    }
}

/// Two `turnout director rotate` at once take turns: both handovers are
/// kept, as a chain, and the key in use is the end of it.
#[test]
fn concurrent_director_rotations_chain_instead_of_losing_one() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("director.pem"),
        SecretKey::from_seed([5; 32]).to_pem(),
    )
    .unwrap();
    let rotate = || {
        Command::new(turnout_bin())
            .args(["director", "rotate", "--state-dir"])
            .arg(dir.path())
            .spawn()
            .unwrap()
    };
    // While another holds the lock, a rotation waits: it neither writes a
    // key nor finishes. (Without the lock it is done within milliseconds.)
    let held = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.path().join("director.lock"))
        .unwrap();
    held.lock().unwrap();
    let before = std::fs::read(dir.path().join("director.pem")).unwrap();
    let mut waiting = rotate();
    let until = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < until {
        assert!(
            waiting.try_wait().unwrap().is_none(),
            "a rotation finished while another held the lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        std::fs::read(dir.path().join("director.pem")).unwrap(),
        before
    );
    held.unlock().unwrap();
    assert!(waiting.wait().unwrap().success());

    let (mut a, mut b) = (rotate(), rotate());
    assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
    let handovers: Vec<turnout_proto::desired::Handover> =
        serde_json::from_slice(&std::fs::read(dir.path().join("director-handovers.json")).unwrap())
            .unwrap();
    assert_eq!(handovers.len(), 3);
    let first = turnout_proto::keys::PublicKey::from_pem(&handovers[1].key).unwrap();
    assert_eq!(
        &handovers[2].by,
        first.id(),
        "the second hands over from the first's key"
    );
    let in_use =
        SecretKey::from_pem(&std::fs::read_to_string(dir.path().join("director.pem")).unwrap())
            .unwrap();
    let last = turnout_proto::keys::PublicKey::from_pem(&handovers[2].key).unwrap();
    assert_eq!(in_use.public().id(), last.id());
}
