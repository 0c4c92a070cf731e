//! The trusted channel with real processes: agents that joined with the
//! coordinator's CA pin refuse a man in the middle, at enrollment and
//! after, and keep their services as they are.

use std::path::Path;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use turnout_tests::{Fleet, Options, ProxyTls, turnout_bin, wait_for};

const LONG: Duration = Duration::from_secs(45);

/// A proxy identity from a CA that is not the coordinator's (made in
/// `dir`), with a certificate for 127.0.0.1 all the same; it trusts the
/// real coordinator upstream.
fn impostor(fleet: &Fleet, dir: &Path) -> (ProxyTls, String) {
    let paths = turnout::tls::Paths::in_state_dir(dir);
    turnout::tls::init(&paths, &["127.0.0.1".to_owned()], SystemTime::now()).unwrap();
    let pin = turnout::tls::pins(&paths).unwrap()[0].to_string();
    let tls = ProxyTls::new(
        &paths.cert,
        &paths.key,
        &fleet.dir.path().join("coordinator/tls/ca.pem"),
    );
    (tls, pin)
}

fn agent_status(fleet: &Fleet, host: &str) -> String {
    let out = std::process::Command::new(turnout_bin())
        .args(["agent", "status"])
        .env(
            "TURNOUT_AGENT_CONFIG",
            fleet.dir.path().join(host).join("agent.toml"),
        )
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_man_in_the_middle_is_refused_at_enrollment_and_after_and_services_keep_running() {
    let fleet = Fleet::start(Options {
        hosts: 1,
        proxied: vec![0],
        ..Options::default()
    });
    fleet.install_everywhere("1.0.0");
    let host = &fleet.hosts[0];
    let proxy = host.proxy.as_ref().unwrap();
    let other = tempfile::tempdir().unwrap();
    let (fake, fake_pin) = impostor(&fleet, other.path());

    // An enrolled agent behind the impostor: every request fails, and
    // its status says why.
    proxy.impersonate(fake);
    let deadline = std::time::Instant::now() + LONG;
    while !agent_status(&fleet, "host-00").contains("untrusted") {
        assert!(
            std::time::Instant::now() < deadline,
            "the link never called the coordinator untrusted:\n{}\n{}",
            agent_status(&fleet, "host-00"),
            host.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = agent_status(&fleet, "host-00");
    assert!(
        status.contains("could not be verified")
            && status.contains("not signed by a CA this client trusts"),
        "{status}"
    );
    // No desired state reaches it: the coordinator loses it, a rollout of
    // 2.0.0 does not touch it, and it serves 1.0.0 throughout.
    wait_for("the coordinator to see the host offline", LONG, || {
        let hosts: Vec<Value> = fleet.client().get("/v1/hosts").unwrap();
        hosts[0]["state"] == "offline"
    });
    // (The rollout counts the unreachable host as failed: the
    // coordinator's view; the host's own release stands.)
    fleet.rollout(json!({"service": "web", "release": "web@2.0.0", "waves": ["100%"]}));
    let before = fleet.engine_rounds();
    wait_for("three rounds of the rollout loop", LONG, || {
        fleet.engine_rounds() >= before + 3
    });
    assert_eq!(host.served().as_deref(), Some("1.0.0"));
    assert_eq!(host.status()["state"], "idle", "{}", host.status());
    assert!(!host.log().contains("2.0.0"), "{}", host.log());

    // A new host enrolling through the impostor with the real pin is
    // refused before it sends its token, and is told both fingerprints.
    let token: Value = fleet
        .client()
        .post("/v1/tokens", &json!({"enroll": true}))
        .unwrap();
    let home = other.path().join("new-host");
    std::fs::create_dir_all(&home).unwrap();
    let config = home.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\ntrust = \"{}\"\n",
            home.join("state").display(),
            fleet.dir.path().join("trust.json").display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(turnout_bin())
        .args([
            "agent",
            "enroll",
            "--coordinator",
            &format!("https://127.0.0.1:{}", proxy.port),
            "--token",
            token["token"].as_str().unwrap(),
            "--host",
            "web-new",
            "--ca-pin",
            &fleet.pin,
        ])
        .env("TURNOUT_AGENT_CONFIG", &config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(9), "{stderr}");
    assert!(
        stderr.contains(&fleet.pin) && stderr.contains(&fake_pin),
        "names the expected and the seen CA: {stderr}"
    );
    assert!(!home.join("state/coordinator.json").exists());
    let hosts: Vec<Value> = fleet.client().get("/v1/hosts").unwrap();
    assert_eq!(hosts.len(), 1, "the token was never sent: {hosts:?}");
}

#[test]
fn two_thousand_stalled_handshakes_do_not_stop_a_rollout_or_reports() {
    // Room for 2,000 connections in this process and the coordinator it starts.
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let fleet = Fleet::start(Options {
        hosts: 3,
        ..Options::default()
    });
    let address: std::net::SocketAddr = fleet.url.trim_start_matches("https://").parse().unwrap();
    // From eight other addresses (one source may hold at most 256 in their
    // handshake: these stay under it, so all 2,000 are held open); half
    // send nothing, half the first bytes of a TLS record and no more.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stalled: Vec<tokio::net::TcpStream> = runtime.block_on(async {
        let mut open = Vec::new();
        for i in 0..2000u32 {
            use tokio::io::AsyncWriteExt as _;
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            let source = std::net::Ipv4Addr::new(127, 0, 0, 2 + (i % 8) as u8);
            socket.bind((source, 0).into()).unwrap();
            let mut stream = socket.connect(address).await.unwrap();
            if i % 2 == 1 {
                stream
                    .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
                    .await
                    .unwrap();
            }
            open.push(stream);
        }
        open
    });
    fleet.install_everywhere("1.0.0");
    fleet.install_everywhere("2.0.0");
    for host in &fleet.hosts {
        assert_eq!(host.served().as_deref(), Some("2.0.0"), "{}", host.id);
    }
    fleet.wait_reported();
    drop(stalled);
}

fn cas_of(path: &Path) -> Vec<String> {
    let pem = std::fs::read(path).unwrap();
    turnout_rt::tls::certificates_from_pem(&pem)
        .unwrap()
        .iter()
        .map(|c| turnout_rt::tls::Pin::of_certificate(c).unwrap().to_string())
        .collect()
}

/// Whether the coordinator's chain verifies by `pin` now.
fn served_by(fleet: &Fleet, pin: &str) -> bool {
    turnout_rt::tls::discover(&fleet.url, &[pin.parse().unwrap()], Duration::from_secs(5)).is_ok()
}

#[test]
fn a_ca_rotation_reaches_every_host_without_enrolling_again() {
    let mut fleet = Fleet::start(Options {
        hosts: 2,
        ..Options::default()
    });
    fleet.install_everywhere("1.0.0");
    let state = fleet.dir.path().join("coordinator");
    let out = std::process::Command::new(turnout_bin())
        .args([
            "ca",
            "rotate",
            "--grace",
            "40s",
            "--allow-short-grace",
            "--state-dir",
        ])
        .arg(&state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rotation = turnout::tls::rotation(&turnout::tls::Paths::in_state_dir(&state))
        .unwrap()
        .unwrap();
    assert_eq!(rotation.old, fleet.pin);
    // The running coordinator serves the new CA's certificate (cross-signed
    // by the old one, so hosts that have not heard yet still verify it) ...
    wait_for(
        "the coordinator to serve the new CA's certificate",
        LONG,
        || served_by(&fleet, &rotation.new),
    );
    assert!(
        served_by(&fleet, &rotation.old),
        "a join line with the old pin still works"
    );
    let old_ca =
        turnout_rt::tls::certificates_from_pem(&std::fs::read(state.join("tls/ca.pem")).unwrap())
            .unwrap()[..1]
            .to_vec();
    let trusting_old_only = |fleet: &Fleet| {
        turnout::client::Client::with_ca(&fleet.url, Some(fleet.admin.clone()), &old_ca)
            .get::<Value>("/v1/hosts")
    };
    trusting_old_only(&fleet)
        .expect("a client that trusts only the old CA verifies the new certificate");
    // ... hosts learn both CAs, and keep working throughout.
    for host in ["host-00", "host-01"] {
        let ca = fleet.dir.path().join(host).join("state/ca.pem");
        wait_for(&format!("{host} to trust both CAs"), LONG, || {
            cas_of(&ca).len() == 2
        });
    }
    fleet.install_everywhere("2.0.0");
    // A restart with the new certificate: every host comes back.
    fleet.kill_coordinator();
    fleet.start_coordinator(false);
    fleet.wait_reported();
    // After the grace period the old CA is gone: from the coordinator's
    // chain, its ca.pem and every host's.
    let coordinator_ca = state.join("tls/ca.pem");
    wait_for("the old CA to be dropped", Duration::from_secs(90), || {
        cas_of(&coordinator_ca) == [rotation.new.clone()]
    });
    wait_for("the chain to carry only the new CA", LONG, || {
        !served_by(&fleet, &rotation.old)
    });
    let refused = trusting_old_only(&fleet).unwrap_err();
    assert!(
        refused.to_string().contains("could not be verified"),
        "{refused}"
    );
    for host in ["host-00", "host-01"] {
        let ca = fleet.dir.path().join(host).join("state/ca.pem");
        wait_for(&format!("{host} to drop the old CA"), LONG, || {
            cas_of(&ca) == [rotation.new.clone()]
        });
    }
    fleet.install_everywhere("1.0.0");
    let log = fleet.hosts[0].log();
    assert!(
        !log.contains("untrusted") && !log.contains("could not be verified"),
        "{log}"
    );
}

#[test]
fn a_host_enrolled_again_follows_the_new_enrollment_without_a_restart() {
    let mut fleet = Fleet::start(Options {
        hosts: 1,
        ..Options::default()
    });
    fleet.install_everywhere("1.0.0");
    // The coordinator is rebuilt from nothing: a new CA, a new database.
    fleet.kill_coordinator();
    std::fs::remove_dir_all(fleet.dir.path().join("coordinator")).unwrap();
    fleet.admin = fleet.start_coordinator(true).unwrap();
    let pin = turnout_rt::tls::Pin::of_certificate(&fleet.ca()[0])
        .unwrap()
        .to_string();
    assert_ne!(pin, fleet.pin);
    // The running agent does not trust the new coordinator.
    wait_for(
        "the agent to call the new coordinator untrusted",
        LONG,
        || agent_status(&fleet, "host-00").contains("untrusted"),
    );
    // Enrolled again with the new join line while the agent runs: the same
    // agent process follows the new enrollment, with no restart.
    let token: Value = fleet
        .client()
        .post("/v1/tokens", &json!({"enroll": true}))
        .unwrap();
    let out = std::process::Command::new(turnout_bin())
        .args([
            "agent",
            "enroll",
            "--coordinator",
            &fleet.url,
            "--token",
            token["token"].as_str().unwrap(),
            "--host",
            "host-00",
            "--ca-pin",
            &pin,
        ])
        .env(
            "TURNOUT_AGENT_CONFIG",
            fleet.dir.path().join("host-00/agent.toml"),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fleet.pin = pin;
    fleet.wait_reported();
    let host = &fleet.hosts[0];
    assert!(
        host.log().contains("the host enrolled again"),
        "{}",
        host.log()
    );
    assert!(agent_status(&fleet, "host-00").contains("connected"));
    assert_eq!(host.served().as_deref(), Some("1.0.0"));
}
