//! `turnout serve` over TLS as a real process, and the operator CLI
//! against it: the profile `--init` writes, a CA file, a pin, and every way
//! trust can fail, each with its own message and exit code.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, SystemTime};

use turnout_testkit::{free_port, wait_for};

use crate::fake::trust_file;

/// A coordinator child process; killed on drop.
struct Serve {
    child: Child,
    port: u16,
    stderr: PathBuf,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `turnout serve` on a free port with `extra` arguments, HOME in `dir`.
fn serve(dir: &Path, extra: &[&str]) -> Serve {
    let port = free_port();
    let stderr = dir.join(format!("serve-{port}.log"));
    let child = Command::new(env!("CARGO_BIN_EXE_turnout"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--state-dir",
        ])
        .arg(dir.join("state"))
        .arg("--trust")
        .arg(trust_file(dir))
        .args(extra)
        .env("HOME", dir)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("TURNOUT_PROFILE")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    wait_for("the coordinator to listen", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    Serve {
        child,
        port,
        stderr,
    }
}

/// `turnout ARGS` with HOME in `home` and no operator variables.
fn turnout(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_turnout"))
        .args(args)
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("TURNOUT_PROFILE")
        .env_remove("TURNOUT_COORDINATOR")
        .env_remove("TURNOUT_TOKEN")
        .env_remove("TURNOUT_CA")
        .env_remove("TURNOUT_CA_PIN")
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn profile_token(home: &Path) -> String {
    let profile = std::fs::read_to_string(home.join(".config/turnout/profile.toml")).unwrap();
    let profile: toml::Table = toml::from_str(&profile).unwrap();
    profile["token"].as_str().unwrap().to_owned()
}

#[test]
fn init_makes_a_ca_and_a_profile_and_the_cli_needs_no_flags_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &["--init"]);
    // The profile in HOME names the coordinator, its CA and the admin token.
    let out = turnout(dir.path(), &["host", "list"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    use std::os::unix::fs::PermissionsExt;
    for private in [
        ".config/turnout/profile.toml",
        "state/tls/ca.key",
        "state/tls/server.key",
    ] {
        let mode = std::fs::metadata(dir.path().join(private))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{private}");
    }
    // An enrollment token's join line carries the CA's pin, the one the
    // server logged.
    let out = turnout(dir.path(), &["token", "create", "--enroll", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pin = answer["ca_pins"][0].as_str().unwrap().to_owned();
    assert!(pin.starts_with("sha256:") && pin.len() == 71, "{answer}");
    let join = answer["join"].as_str().unwrap();
    assert!(
        join.contains(&format!("--coordinator https://127.0.0.1:{}", server.port))
            && join.contains(&format!("--ca-pin {pin}")),
        "{join}"
    );
    let log = std::fs::read_to_string(&server.stderr).unwrap();
    assert!(log.contains(&pin), "{log}");

    // A rotation with too short a grace is refused; a real one updates the
    // profile on this machine, so the CLI keeps working after the grace.
    let state = dir.path().join("state");
    let short = turnout(
        dir.path(),
        &[
            "ca",
            "rotate",
            "--grace",
            "90s",
            "--state-dir",
            state.to_str().unwrap(),
        ],
    );
    assert_eq!(short.status.code(), Some(2), "{}", text(&short));
    assert!(
        text(&short).contains("expected at least 1h"),
        "{}",
        text(&short)
    );
    let rotated = turnout(
        dir.path(),
        &["ca", "rotate", "--state-dir", state.to_str().unwrap()],
    );
    assert_eq!(rotated.status.code(), Some(0), "{}", text(&rotated));
    let profile = std::fs::read_to_string(dir.path().join(".config/turnout/profile.toml")).unwrap();
    assert_eq!(profile.matches("BEGIN CERTIFICATE").count(), 2, "{profile}");
    // The running coordinator's join lines carry both pins within its
    // next upkeep round (5 s).
    wait_for("join lines with both pins", Duration::from_secs(20), || {
        let out = turnout(dir.path(), &["token", "create", "--enroll", "--json"]);
        let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        answer["ca_pins"].as_array().is_some_and(|p| p.len() == 2)
    });
    // The same with a pin instead of the profile's CA.
    let elsewhere = tempfile::tempdir().unwrap();
    let url = format!("https://127.0.0.1:{}", server.port);
    let token = profile_token(dir.path());
    let by_pin = turnout(
        elsewhere.path(),
        &[
            "host",
            "list",
            "--coordinator",
            &url,
            "--token",
            &token,
            "--ca-pin",
            &pin,
        ],
    );
    assert_eq!(by_pin.status.code(), Some(0), "{}", text(&by_pin));
    // Without any CA: said what to pass, exit 2, nothing sent.
    let no_ca = turnout(
        elsewhere.path(),
        &["host", "list", "--coordinator", &url, "--token", &token],
    );
    assert_eq!(no_ca.status.code(), Some(2), "{}", text(&no_ca));
    assert!(
        text(&no_ca).contains("--ca FILE") && text(&no_ca).contains("--ca-pin"),
        "{}",
        text(&no_ca)
    );
    // Plain HTTP to the TLS port: told to use https, exit 3.
    let plain = turnout(
        elsewhere.path(),
        &[
            "host",
            "list",
            "--coordinator",
            &format!("http://127.0.0.1:{}", server.port),
            "--token",
            &token,
        ],
    );
    assert_eq!(plain.status.code(), Some(3), "{}", text(&plain));
    assert!(
        text(&plain).contains("this coordinator speaks TLS: use an https:// URL"),
        "{}",
        text(&plain)
    );
    // A pin of another key: refused, both named, exit 9.
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let mismatch = turnout(
        elsewhere.path(),
        &[
            "host",
            "list",
            "--coordinator",
            &url,
            "--token",
            &token,
            "--ca-pin",
            &wrong,
        ],
    );
    assert_eq!(mismatch.status.code(), Some(9), "{}", text(&mismatch));
    assert!(
        text(&mismatch).contains(&wrong) && text(&mismatch).contains(&pin),
        "{}",
        text(&mismatch)
    );
    // Another CA given as the CA file: the certificate is refused, exit 9.
    let other = tempfile::tempdir().unwrap();
    let paths = turnout::tls::Paths::in_state_dir(other.path());
    turnout::tls::init(&paths, &["127.0.0.1".to_owned()], SystemTime::now()).unwrap();
    let other_ca = paths.ca.to_str().unwrap().to_owned();
    let untrusted = turnout(
        elsewhere.path(),
        &[
            "host",
            "list",
            "--coordinator",
            &url,
            "--token",
            &token,
            "--ca",
            &other_ca,
        ],
    );
    assert_eq!(untrusted.status.code(), Some(9), "{}", text(&untrusted));
    assert!(
        text(&untrusted).contains("not signed by a CA this client trusts"),
        "{}",
        text(&untrusted)
    );
}

/// A bare TLS server (not a coordinator) presenting `cert` with `key`
/// to every connection, on a free port: what a client sees from a server
/// whose certificate `turnout serve` itself would refuse to serve.
fn present(cert: &Path, key: &Path) -> u16 {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let chain = turnout_rt::tls::certificates_from_pem(&std::fs::read(cert).unwrap()).unwrap();
    let key = PrivateKeyDer::from_pem_slice(&std::fs::read(key).unwrap()).unwrap();
    let config = std::sync::Arc::new(
        rustls::ServerConfig::builder_with_provider(turnout_rt::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap(),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut tls = rustls::ServerConnection::new(config.clone()).unwrap();
            while tls.is_handshaking() {
                if tls.complete_io(&mut stream).is_err() {
                    break;
                }
            }
        }
    });
    port
}

#[test]
fn an_expired_certificate_is_refused_by_name_and_a_missing_one_stops_serve_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    // A certificate whose year ended long ago, given as the operator's own.
    let old = dir.path().join("old");
    let paths = turnout::tls::Paths::in_state_dir(&old);
    let long_ago = SystemTime::now() - Duration::from_secs(3 * 365 * 24 * 3600);
    turnout::tls::init(&paths, &["127.0.0.1".to_owned()], long_ago).unwrap();
    // `turnout serve` refuses to serve it: exit 3, when it ended, what to do,
    // and nothing made (no database, no token, no profile).
    let out = Command::new(env!("CARGO_BIN_EXE_turnout"))
        .args(["serve", "--init", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--trust")
        .arg(trust_file(dir.path()))
        .arg("--tls-cert")
        .arg(&paths.cert)
        .arg("--tls-key")
        .arg(&paths.key)
        .env("HOME", dir.path())
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("TURNOUT_PROFILE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        text(&out).contains("expired at") && text(&out).contains("renew it"),
        "{}",
        text(&out)
    );
    assert!(!dir.path().join(".config/turnout/profile.toml").exists());

    // A server that presents it anyway: the CLI refuses it by name, exit 9.
    let port = present(&paths.cert, &paths.key);
    let url = format!("https://127.0.0.1:{port}");
    let out = turnout(
        dir.path(),
        &[
            "host",
            "list",
            "--coordinator",
            &url,
            "--token",
            "t",
            "--ca",
            paths.ca.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(9), "{}", text(&out));
    assert!(text(&out).contains("has expired"), "{}", text(&out));

    // No certificate, no --init, no --plaintext: refused with the three ways out.
    let fresh = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_turnout"))
        .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(fresh.path().join("state"))
        .arg("--trust")
        .arg(trust_file(fresh.path()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("turnout serve --init")
            && said.contains("--tls-cert")
            && said.contains("--plaintext"),
        "{said}"
    );
}

#[test]
fn an_operators_own_chain_goes_into_the_profile_and_ambiguous_trust_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // The operator's CA and a certificate it issued (leaf, then CA).
    let own = turnout::tls::Paths::in_state_dir(&dir.path().join("pki"));
    turnout::tls::init(&own, &["127.0.0.1".to_owned()], SystemTime::now()).unwrap();
    let server = serve(
        dir.path(),
        &[
            "--init",
            "--tls-cert",
            own.cert.to_str().unwrap(),
            "--tls-key",
            own.key.to_str().unwrap(),
        ],
    );
    // The profile carries the chain's CA: the first command needs no flags.
    let out = turnout(dir.path(), &["host", "list"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let profile = std::fs::read_to_string(dir.path().join(".config/turnout/profile.toml")).unwrap();
    let ca = std::fs::read_to_string(&own.ca).unwrap();
    assert!(profile.contains(ca.trim()), "{profile}");

    // A CA file and a pin at once (here both from the environment): which
    // decides is not clear, so neither is used; exit 2, says which to drop.
    let pin = turnout::tls::pins(&own).unwrap()[0].to_string();
    let url = format!("https://127.0.0.1:{}", server.port);
    let both = Command::new(env!("CARGO_BIN_EXE_turnout"))
        .args(["host", "list", "--coordinator", &url])
        .env("HOME", dir.path())
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("TURNOUT_PROFILE")
        .env("TURNOUT_CA", &own.ca)
        .env("TURNOUT_CA_PIN", &pin)
        .output()
        .unwrap();
    assert_eq!(both.status.code(), Some(2), "{}", text(&both));
    assert!(text(&both).contains("give one of them"), "{}", text(&both));

    // Another URL for the same server: the profile is not used for it, and
    // the message says so instead of only asking for a CA.
    let other = format!("https://localhost:{}", server.port);
    let out = turnout(dir.path(), &["host", "list", "--coordinator", &other]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("the operator profile is for {url}, not {other}")),
        "{}",
        text(&out)
    );
}

#[test]
fn plaintext_is_loud_and_stalled_handshakes_do_not_block_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let plain = serve(dir.path(), &["--plaintext"]);
    let log = std::fs::read_to_string(&plain.stderr).unwrap();
    assert!(log.contains("serving PLAIN HTTP (--plaintext)"), "{log}");
    drop(plain);

    // Over TLS: clients that connect and never finish a handshake hold
    // only their own connection, and an operator is answered meanwhile.
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &["--init"]);
    let stalled: Vec<std::net::TcpStream> = (0..200)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap())
        .collect();
    let out = turnout(dir.path(), &["host", "list"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    drop(stalled);
}

#[test]
fn metrics_need_a_viewer_token_unless_served_apart_or_made_public() {
    let dir = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    let server = serve(
        dir.path(),
        &[
            "--init",
            "--metrics-listen",
            &format!("127.0.0.1:{metrics_port}"),
        ],
    );
    let token = profile_token(dir.path());
    let ca = dir.path().join("state/tls/ca.pem");
    let cas = turnout_rt::tls::certificates_from_pem(&std::fs::read(&ca).unwrap()).unwrap();
    let url = format!("https://127.0.0.1:{}", server.port);
    let anonymous = turnout::client::Client::with_ca(&url, None, &cas);
    let err = anonymous.get_text("/metrics").unwrap_err();
    assert!(err.to_string().contains("no operator token"), "{err}");
    let viewer = turnout::client::Client::with_ca(&url, Some(token), &cas);
    assert!(
        viewer
            .get_text("/metrics")
            .unwrap()
            .contains("turnout_http_requests")
    );
    // The separate listener: plain, no token, /metrics and nothing else.
    let apart = turnout::client::Client::new(&format!("http://127.0.0.1:{metrics_port}"), None);
    assert!(
        apart
            .get_text("/metrics")
            .unwrap()
            .contains("turnout_auth_failures")
    );
    assert!(apart.get_text("/v1/hosts").is_err(), "only /metrics there");
    drop(server);
    // --metrics-public: the API listener's /metrics answers anyone.
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &["--plaintext", "--metrics-public"]);
    let open = turnout::client::Client::new(&format!("http://127.0.0.1:{}", server.port), None);
    assert!(
        open.get_text("/metrics")
            .unwrap()
            .contains("turnout_engine_rounds")
    );
}

#[test]
fn a_name_the_certificate_does_not_carry_is_refused_and_said_so() {
    let dir = tempfile::tempdir().unwrap();
    // The operator's own certificate, for 127.0.0.1 only.
    let own = dir.path().join("own");
    let paths = turnout::tls::Paths::in_state_dir(&own);
    turnout::tls::init(&paths, &["127.0.0.1".to_owned()], SystemTime::now()).unwrap();
    let server = serve(
        dir.path(),
        &[
            "--init",
            "--tls-cert",
            paths.cert.to_str().unwrap(),
            "--tls-key",
            paths.key.to_str().unwrap(),
        ],
    );
    let token = profile_token(dir.path());
    let ca = paths.ca.to_str().unwrap().to_owned();
    let by_address = format!("https://127.0.0.1:{}", server.port);
    let ok = turnout(
        dir.path(),
        &[
            "host",
            "list",
            "--coordinator",
            &by_address,
            "--token",
            &token,
            "--ca",
            &ca,
        ],
    );
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    let by_name = format!("https://localhost:{}", server.port);
    let refused = turnout(
        dir.path(),
        &[
            "host",
            "list",
            "--coordinator",
            &by_name,
            "--token",
            &token,
            "--ca",
            &ca,
        ],
    );
    assert_eq!(refused.status.code(), Some(9), "{}", text(&refused));
    assert!(
        text(&refused).contains("does not name the host in the URL"),
        "{}",
        text(&refused)
    );
}

#[test]
fn one_source_cannot_hold_every_connection_in_its_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &["--init"]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let target: std::net::SocketAddr = format!("127.0.0.1:{}", server.port).parse().unwrap();
    let cap = turnout::server::MAX_HANDSHAKES_PER_SOURCE;
    // From 127.0.0.2: more stalled connections than one source may hold.
    let stalled: Vec<tokio::net::TcpStream> = runtime.block_on(async {
        let mut open = Vec::new();
        for _ in 0..cap + 50 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            open.push(socket.connect(target).await.unwrap());
        }
        open
    });
    // An operator on another address is served meanwhile ...
    let out = turnout(dir.path(), &["host", "list"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // ... and the stalled source's connections past the cap were closed at once.
    let token = profile_token(dir.path());
    let cas = turnout_rt::tls::certificates_from_pem(
        &std::fs::read(dir.path().join("state/tls/ca.pem")).unwrap(),
    )
    .unwrap();
    let client = turnout::client::Client::with_ca(
        &format!("https://127.0.0.1:{}", server.port),
        Some(token),
        &cas,
    );
    wait_for(
        "the refusals to be counted",
        Duration::from_secs(10),
        || {
            client
                .get_text("/metrics")
                .unwrap()
                .contains("turnout_tls_failures_total{reason=\"too_many_handshakes\"} 50")
        },
    );
    drop(stalled);
}
