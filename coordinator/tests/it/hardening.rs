//! The coordinator under hostile and careless clients: oversized and
//! half-sent bodies, slow headers, too many connections, concurrent and
//! aborted pushes, bad ids and token requests, a lost database. Each test
//! checks the specific refusal and that nothing was lost or left behind.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use turnout::coordinator::Settings;
use turnout_proto::request_auth;

use crate::fake::{FakeAgent, Server, demo_bundle, now_ms, release_key, trust, wait_for};

fn connect(server: &Server) -> TcpStream {
    let stream = TcpStream::connect(server.url.trim_start_matches("http://")).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream
}

/// Reads until the peer closes or a full response head arrived; returns it,
/// or "reset" when the server cut the connection while the client was still
/// sending (how a body refused as it arrives may end).
fn read_answer(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && got.is_empty() => {
                return "reset".into();
            }
            Ok(0) | Err(_) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Whether the server closed the connection (a read returns end of file or
/// a reset); a read that times out means it is still open.
fn closed(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(n) => n == 0,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// An enrolled host's fresh authorization header for `path` (signed over
/// a body other than the one sent: the body is never read that far).
fn enrolled_header(server: &Server, path: &str) -> String {
    let token = server.enroll_token(1);
    let agent = FakeAgent::new(&server.url, "web-01", 1);
    assert_eq!(agent.enroll(&token, &[]).status, 200);
    request_auth::sign(&agent.key, &agent.host, "POST", path, now_ms(), b"x")
}

fn stored_bundles(server: &Server) -> Vec<turnout::store::BundleRecord> {
    server.coordinator.with_store(|s| s.bundles()).unwrap()
}

fn still_serves(server: &Server) {
    let hosts: Value = server.client(Some(&server.admin)).get("/v1/hosts").unwrap();
    assert!(hosts.is_array());
}

fn unfinished_pushes(server: &Server) -> Vec<String> {
    std::fs::read_dir(server.dir.path().join("bundles"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".push-"))
        .collect()
}

#[test]
fn an_oversized_body_is_refused_before_it_is_read() {
    let server = Server::start(Settings::default());
    // No credentials: refused from the headers alone, the body never read.
    let mut stream = connect(&server);
    write!(
        stream,
        "POST /v1/agent/hello HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576000\r\n\r\n"
    )
    .unwrap();
    let answer = read_answer(&mut stream);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");

    // An enrolled host's fresh header gets its body read, up to the limit.
    let header = enrolled_header(&server, "/v1/agent/report");
    let mut stream = connect(&server);
    write!(
        stream,
        "POST /v1/agent/report HTTP/1.1\r\nHost: x\r\nAuthorization: {header}\r\nContent-Length: 1048576000\r\n\r\n"
    )
    .unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    for _ in 0..32 {
        if stream.write_all(&chunk).is_err() {
            break; // refused and closed mid-body: as it should be
        }
    }
    let answer = read_answer(&mut stream);
    assert!(
        answer.starts_with("HTTP/1.1 413") || answer == "reset",
        "refused before the body was all read: {answer:?}"
    );
    still_serves(&server);
}

#[test]
fn a_slow_request_head_is_cut_off() {
    let server = Server::start(Settings {
        header_timeout: Duration::from_millis(500),
        ..Settings::default()
    });
    let mut stream = connect(&server);
    write!(stream, "POST /v1/agent/hello HTTP/1.1\r\nHost: x\r\n").unwrap();
    assert!(closed(&mut stream), "a half-sent head is not kept open");
    // An idle kept-alive connection is closed the same way.
    let mut idle = connect(&server);
    assert!(closed(&mut idle));
    still_serves(&server);
}

#[test]
fn connections_past_the_cap_are_closed_and_counted() {
    let server = Server::start(Settings {
        max_connections: 3,
        ..Settings::default()
    });
    let _held: Vec<TcpStream> = (0..3).map(|_| connect(&server)).collect();
    // The accept loop takes them in turn: wait until one more is refused.
    wait_for(
        "a connection past the cap to be closed",
        Duration::from_secs(30),
        || {
            let mut extra = connect(&server);
            extra
                .set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            closed(&mut extra)
        },
    );
    drop(_held);
    wait_for(
        "the coordinator to serve again",
        Duration::from_secs(30),
        || {
            server
                .client(Some(&server.admin))
                .get::<Value>("/v1/hosts")
                .is_ok()
        },
    );
    let metrics = reqwest_metrics(&server);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("turnout_connections_refused_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
}

fn reqwest_metrics(server: &Server) -> String {
    let mut stream = connect(server);
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        server.admin
    )
    .unwrap();
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text
}

#[test]
fn a_half_sent_request_does_not_keep_a_stopping_coordinator_alive() {
    let mut server = Server::start(Settings {
        shutdown_grace: Duration::from_millis(500),
        ..Settings::default()
    });
    let header = enrolled_header(&server, "/v1/agent/report");
    let mut stream = connect(&server);
    write!(
        stream,
        "POST /v1/agent/report HTTP/1.1\r\nHost: x\r\nAuthorization: {header}\r\nContent-Length: 100\r\n\r\n0123456789"
    )
    .unwrap();
    // Stop it, and see it stop although that request never finishes.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let stopping = std::thread::spawn(move || {
        server.stop();
        done_tx.send(()).unwrap();
    });
    assert!(
        done_rx.recv_timeout(Duration::from_secs(60)).is_ok(),
        "the coordinator did not stop"
    );
    stopping.join().unwrap();
    drop(stream);
}

#[test]
fn concurrent_pushes_store_every_bundle_under_its_own_digest() {
    let server = Server::start(Settings::default());
    let dir = tempfile::tempdir().unwrap();
    let bundles: Vec<_> = (0..6)
        .map(|i| demo_bundle(dir.path(), &format!("1.0.{i}")))
        .collect();
    let url = server.url.clone();
    let admin = server.admin.clone();
    std::thread::scope(|scope| {
        let pushes: Vec<_> = (0..24)
            .map(|i| {
                let bundle = bundles[i % bundles.len()].clone();
                let (url, admin) = (url.clone(), admin.clone());
                scope.spawn(move || {
                    turnout::client::Client::new(&url, Some(admin)).post_stream::<Value>(
                        "/v1/bundles",
                        &mut std::fs::File::open(bundle).unwrap(),
                    )
                })
            })
            .collect();
        for push in pushes {
            let record = push.join().unwrap().expect("every valid push succeeds");
            assert!(record["sha256"].is_string());
        }
    });
    let mut stored = 0;
    for entry in std::fs::read_dir(server.dir.path().join("bundles")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let digest =
            turnout_proto::Digest::from_bytes(Sha256::digest(std::fs::read(&path).unwrap()).into());
        assert_eq!(
            name,
            format!("{digest}.tnt"),
            "a stored file's name is its digest"
        );
        stored += 1;
    }
    assert_eq!(stored, 6);
    assert_eq!(unfinished_pushes(&server), Vec::<String>::new());
}

#[test]
fn refused_and_abandoned_pushes_leave_nothing_behind() {
    let server = Server::start(Settings::default());
    let garbage = vec![7u8; 300_000];
    let err = server
        .client(Some(&server.admin))
        .post_stream::<Value>("/v1/bundles", &mut &garbage[..])
        .unwrap_err();
    assert!(err.to_string().contains("bundle refused"), "{err}");
    assert_eq!(unfinished_pushes(&server), Vec::<String>::new());

    // A client that goes away mid-upload.
    let mut stream = connect(&server);
    write!(
        stream,
        "POST /v1/bundles HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: 50000000\r\n\r\n",
        server.admin
    )
    .unwrap();
    stream.write_all(&vec![0u8; 1 << 20]).unwrap();
    wait_for("the upload to start", Duration::from_secs(30), || {
        !unfinished_pushes(&server).is_empty()
    });
    drop(stream);
    wait_for(
        "the abandoned upload's file to go",
        Duration::from_secs(30),
        || unfinished_pushes(&server).is_empty(),
    );
    assert!(stored_bundles(&server).is_empty());
}

#[test]
fn an_unfinished_push_left_by_a_kill_is_removed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("bundles")).unwrap();
    let leftover = dir.path().join("bundles/.push-4242-abc");
    std::fs::write(&leftover, b"half a bundle").unwrap();
    turnout::coordinator::Coordinator::open(dir.path(), trust(), Settings::default()).unwrap();
    assert!(!leftover.exists());
}

#[test]
fn rollout_ids_that_cannot_be_addressed_are_refused() {
    let server = Server::start(Settings::default());
    let token = server.enroll_token(1);
    let v1 = server.push_release("1.0.0");
    server.push_release("2.0.0");
    FakeAgent::join(&server.url, "web-01", 1, &token, &v1);
    let admin = server.client(Some(&server.admin));
    for id in [
        "a\nb",
        "../etc",
        "x\"y",
        "with space",
        "-leading",
        &"a".repeat(70_000),
    ] {
        let err = admin
            .post::<Value>(
                "/v1/rollouts",
                &json!({"spec": {"service": "web", "release": "web@2.0.0"}, "id": id}),
            )
            .unwrap_err();
        assert!(
            err.to_string().contains("rollout id") && err.to_string().contains("(HTTP 400)"),
            "{id:?}: {err}"
        );
    }
    let rollouts: Vec<Value> = admin.get("/v1/rollouts").unwrap();
    assert!(rollouts.is_empty(), "nothing was started: {rollouts:?}");
}

#[test]
fn token_requests_are_strict_and_cannot_overflow() {
    let server = Server::start(Settings::default());
    let admin = server.client(Some(&server.admin));
    for (body, expect) in [
        (json!({"rol": "admin"}), "unknown field `rol`"),
        (
            json!({"enroll": true, "ttl_secs": u64::MAX}),
            "expected 1 to",
        ),
        (json!({"enroll": true, "ttl_secs": 0}), "expected 1 to"),
        (json!({"enroll": true, "uses": 0}), "uses 0"),
        (
            json!({"enroll": true, "role": "admin"}),
            "an enrollment token has neither",
        ),
        (
            json!({"name": "v", "role": "viewer", "uses": 5}),
            "are for enrollment tokens",
        ),
        (json!({"role": "viewer"}), "an operator token needs a name"),
        (
            json!({"name": "bob smith", "role": "viewer"}),
            "expected 1 to 64 letters",
        ),
        (
            json!({"name": "v", "role": "viewer", "ttl_secs": u64::MAX}),
            "expected 1 to",
        ),
        (
            json!({"enroll": true, "replace": true}),
            "replace needs host",
        ),
    ] {
        let err = admin.post::<Value>("/v1/tokens", &body).unwrap_err();
        assert!(
            err.to_string().contains(expect) && err.to_string().contains("(HTTP 400)"),
            "{body}: {err}"
        );
    }
    let made: Value = admin
        .post(
            "/v1/tokens",
            &json!({"enroll": true, "ttl_secs": 366 * 24 * 3600}),
        )
        .unwrap();
    let agent = FakeAgent::new(&server.url, "web-01", 1);
    assert_eq!(
        agent.enroll(made["token"].as_str().unwrap(), &[]).status,
        200,
        "a year-long token is valid now"
    );
}

#[test]
fn serve_refuses_an_empty_database_beside_a_bundle_store() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(state.join("bundles")).unwrap();
    std::fs::write(state.join("bundles/0011.tnt"), b"a stored bundle").unwrap();
    std::fs::write(state.join("coordinator.db"), b"").unwrap();
    let trust = crate::fake::trust_file(dir.path());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_turnout"))
        .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(&state)
        .arg("--trust")
        .arg(&trust)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains(
            "the database is missing or empty, but the bundle store beside it holds 1 bundle(s)"
        ),
        "{stderr}"
    );
    assert_eq!(
        std::fs::metadata(state.join("coordinator.db"))
            .unwrap()
            .len(),
        0,
        "nothing was written"
    );
}

#[test]
fn events_prints_the_whole_log_and_a_closed_pipe_ends_it_quietly() {
    let server = Server::start(Settings::default());
    let admin = server.client(Some(&server.admin));
    for i in 0..1_050 {
        let _: Value = admin
            .post(
                "/v1/tokens",
                &json!({"name": format!("viewer-{i}"), "role": "viewer"}),
            )
            .unwrap();
    }
    let events = || {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_turnout"));
        command
            .args([
                "events",
                "--coordinator",
                &server.url,
                "--token",
                &server.admin,
            ])
            .stderr(std::process::Stdio::piped());
        command
    };
    let out = events().output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let lines = String::from_utf8_lossy(&out.stdout).lines().count();
    assert_eq!(lines, 1_050, "every event, past the server's page of 1,000");

    // `turnout events | head -1`: the reader goes away after one line.
    let mut child = events()
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 16];
    stdout.read_exact(&mut first).unwrap();
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// One bad row used to panic inside the store's lock, poisoning it: every
/// later request panicked while the process looked healthy. Now the row is
/// named in an error, and everything else keeps working.
#[test]
fn a_damaged_row_is_an_error_naming_it_and_the_rest_keeps_working() {
    let server = Server::start(Settings::default());
    let token = server.enroll_token(1);
    let v1 = server.push_release("1.0.0");
    server.push_release("2.0.0");
    FakeAgent::join(&server.url, "web-01", 1, &token, &v1);
    let admin = server.client(Some(&server.admin));
    let started: Value = admin
        .post(
            "/v1/rollouts",
            &json!({"spec": {"service": "web", "release": "web@2.0.0"}}),
        )
        .unwrap();
    let id = started["id"].as_str().unwrap().to_owned();
    // Damaged behind the coordinator's back, as a bad restore or a hand edit would.
    let db = rusqlite::Connection::open(server.dir.path().join("coordinator.db")).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    // The rollout loop may be stepping this rollout right now, and would
    // write its body back over the damage: damage it until it stays so
    // (once unreadable, no step can write it back).
    wait_for("the damage to stay", Duration::from_secs(30), || {
        db.execute(
            "UPDATE rollouts SET body = '{\"half a rollout' WHERE id = ?1",
            [&id],
        )
        .unwrap();
        admin.get::<Value>(&format!("/v1/rollouts/{id}")).is_err()
    });
    for _ in 0..3 {
        let err = admin
            .get::<Value>(&format!("/v1/rollouts/{id}"))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("holds an unreadable rollout \"{id}\"")),
            "{err}"
        );
    }
    let hosts: Vec<Value> = admin.get("/v1/hosts").unwrap();
    assert_eq!(hosts.len(), 1, "the rest of the API still answers");
    let made: Value = admin
        .post("/v1/tokens", &json!({"name": "viewer-3", "role": "viewer"}))
        .unwrap();
    assert!(made["token"].is_string(), "and still writes");
}

/// A push filling the disk used to leave its temporary file, after which
/// the coordinator refused to start ("database or disk is full"). Now a
/// push that cannot fit is refused before a byte is written, one that
/// fills the disk anyway is cleaned up, and the coordinator still starts.
#[test]
fn a_push_on_a_full_disk_is_refused_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let Some(_unmount) = turnout_testkit::Tmpfs::mount(&path, "96m") else {
        return;
    };
    let server = Server::start_in(Settings::default(), dir);
    // Declared too large for the free space: refused before writing.
    let mut stream = connect(&server);
    write!(
        stream,
        "POST /v1/bundles HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: 209715200\r\n\r\n",
        server.admin
    )
    .unwrap();
    let answer = read_answer(&mut stream);
    assert!(answer.starts_with("HTTP/1.1 507"), "{answer}");
    drop(stream);
    assert_eq!(unfinished_pushes(&server), Vec::<String>::new());
    // Undeclared (chunked) and larger than the disk: cut off when it fills.
    let mut stream = connect(&server);
    write!(
        stream,
        "POST /v1/bundles HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nTransfer-Encoding: chunked\r\n\r\n",
        server.admin
    )
    .unwrap();
    let chunk = vec![1u8; 1 << 20];
    for _ in 0..120 {
        if write!(stream, "{:x}\r\n", chunk.len()).is_err()
            || stream.write_all(&chunk).is_err()
            || stream.write_all(b"\r\n").is_err()
        {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n");
    let answer = read_answer(&mut stream);
    assert!(
        answer.starts_with("HTTP/1.1 507") || answer == "reset",
        "{answer}"
    );
    wait_for("the upload's file to go", Duration::from_secs(30), || {
        unfinished_pushes(&server).is_empty()
    });
    still_serves(&server);
    // And a coordinator starts on that state directory again.
    drop(server);
    turnout::coordinator::Coordinator::open(&path, trust(), Settings::default()).unwrap();
}

/// Found by attacking the first fix: the operator and enrollment routes
/// read their bodies before anything else, with no timeout, so sockets that
/// declared a huge body and never sent it held every connection slot.
#[test]
fn every_route_bounds_its_body_in_size_and_time() {
    let server = Server::start(Settings {
        body_timeout: Duration::from_millis(500),
        ..Settings::default()
    });
    for route in ["/v1/tokens", "/v1/enroll", "/v1/rollouts"] {
        let mut stream = connect(&server);
        write!(
            stream,
            "POST {route} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n"
        )
        .unwrap();
        let answer = read_answer(&mut stream);
        assert!(answer.starts_with("HTTP/1.1 413"), "{route}: {answer}");
        assert!(answer.contains("application/json"), "{route}: {answer}");
        let mut trickle = connect(&server);
        write!(
            trickle,
            "POST {route} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{"
        )
        .unwrap();
        let answer = read_answer(&mut trickle);
        assert!(answer.starts_with("HTTP/1.1 400"), "{route}: {answer}");
    }
    still_serves(&server);
}

/// Found by attacking: anyone with an enrollment token (shared by many
/// hosts) could enroll an existing host id with their own key, take over its
/// desired state and lock the real agent out.
#[test]
fn an_enrolled_host_cannot_be_taken_over_with_an_enrollment_token() {
    let server = Server::start(Settings::default());
    let token = server.enroll_token(5);
    let real = FakeAgent::new(&server.url, "web-01", 1);
    assert_eq!(real.enroll(&token, &[]).status, 200);
    assert_eq!(
        real.enroll(&token, &[]).status,
        200,
        "the same key again is harmless"
    );
    let intruder = FakeAgent::new(&server.url, "web-01", 66);
    let answer = intruder.enroll(&token, &[]);
    assert_eq!(answer.status, 409, "{}", answer.text());
    assert!(
        answer.text().contains("turnout host forget web-01"),
        "{}",
        answer.text()
    );
    assert_eq!(real.hello().status, 200, "the real agent is not locked out");
    // A reinstalled host: forgotten by an admin, then enrolled with its new key.
    server
        .client(Some(&server.admin))
        .delete("/v1/hosts/web-01")
        .unwrap();
    assert_eq!(intruder.enroll(&token, &[]).status, 200);
}

/// Found by attacking: a second, different `web 6.0.0` was accepted, and
/// `web@6.0.0` then quietly named the newest push.
#[test]
fn a_release_is_immutable_once_pushed() {
    let server = Server::start(Settings::default());
    let dir = tempfile::tempdir().unwrap();
    let key = release_key();
    let bundle = |file: &str, script: &[u8]| {
        let path = dir.path().join(file);
        turnout_testkit::write_bundle(
            &path,
            "web",
            "6.0.0",
            "bin/web",
            &[("bin/web", 0o755, script.to_vec())],
            &[&key],
        );
        std::fs::File::open(path).unwrap()
    };
    let admin = server.client(Some(&server.admin));
    let first: Value = admin
        .post_stream("/v1/bundles", &mut bundle("a.tnt", b"#!/bin/sh\necho a\n"))
        .unwrap();
    let err = admin
        .post_stream::<Value>("/v1/bundles", &mut bundle("b.tnt", b"#!/bin/sh\necho b\n"))
        .unwrap_err();
    assert!(err.to_string().contains("(HTTP 409)"), "{err}");
    assert!(
        err.to_string()
            .contains("a release is immutable; pack this one under a new version"),
        "{err}"
    );
    let stored: Vec<Value> = admin.get("/v1/bundles").unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0]["sha256"], first["sha256"]);
    assert_eq!(unfinished_pushes(&server), Vec::<String>::new());
}

/// Found by attacking: pushing a real-sized bundle with a bad or too weak
/// token reported a broken pipe ("cannot reach the coordinator"), exit 1.
#[test]
fn a_push_with_too_weak_a_token_is_refused_as_such() {
    let server = Server::start(Settings::default());
    let viewer: Value = server
        .client(Some(&server.admin))
        .post("/v1/tokens", &json!({"name": "viewer-4", "role": "viewer"}))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.tnt");
    turnout_testkit::write_bundle(
        &path,
        "web",
        "1.0.0",
        "bin/web",
        &[
            ("bin/web", 0o755, b"#!/bin/sh\n".to_vec()),
            ("data/blob", 0o644, vec![7; 24 << 20]),
        ],
        &[&release_key()],
    );
    for (token, code, says) in [
        (viewer["token"].as_str().unwrap(), 8, "needs role operator"),
        ("tnt_bogus", 8, "not known"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_turnout"))
            .args(["bundle", "push"])
            .arg(&path)
            .args(["--coordinator", &server.url, "--token", token])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
    }
    assert!(stored_bundles(&server).is_empty());
}

/// Found by attacking: label keys with line breaks were accepted, and host-
/// chosen text reached the operator's terminal raw (fake rows, escape codes).
#[test]
fn host_chosen_text_cannot_forge_what_an_operator_reads() {
    let server = Server::start(Settings::default());
    let token = server.enroll_token(2);
    let forger = FakeAgent::new(&server.url, "web-01", 1);
    let answer = forger.enroll(&token, &[("a\nb", "x")]);
    assert_eq!(answer.status, 400, "{}", answer.text());
    assert!(
        answer.text().contains("expected a key"),
        "{}",
        answer.text()
    );
    assert_eq!(forger.enroll(&token, &[("role", "web")]).status, 200);
    let answer = forger.hello_with(turnout_proto::SUPPORTED, &[("role", "web\u{1b}[2J")]);
    assert_eq!(answer.status, 400, "{}", answer.text());
    // What is stored and shown anyway (an agent version) is written out.
    let hello = turnout_proto::messages::Hello {
        agent_version: "1.0\u{1b}[2J\u{202e}\nweb-99 online FORGED".into(),
        proto_range: turnout_proto::SUPPORTED,
        capabilities: turnout_proto::CapabilitySet::all_known(),
        host: forger.host.clone(),
        labels: [("role".to_owned(), "web".to_owned())].into(),
        facts: Default::default(),
    };
    let body = turnout_proto::encode(turnout_proto::SUPPORTED.max(), &hello);
    assert_eq!(forger.signed("POST", "/v1/agent/hello", &body).status, 200);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_turnout"))
        .args([
            "host",
            "list",
            "--coordinator",
            &server.url,
            "--token",
            &server.admin,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1.0\\u{1b}[2J"), "written out: {text}");
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{202e}'),
        "{text}"
    );
    assert_eq!(text.lines().count(), 2, "a header and one host: {text}");
}

/// Found by attacking: an enrollment the coordinator refused exited 1 (a
/// run-time failure a retry may fix), whatever the reason.
#[test]
fn a_refused_enrollment_exits_with_what_it_means() {
    let server = Server::start(Settings::default());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\ntrust = \"{}\"\n",
            dir.path().join("state").display(),
            dir.path().join("trust.json").display()
        ),
    )
    .unwrap();
    let enroll = |token: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_turnout"))
            .args([
                "agent",
                "enroll",
                "--coordinator",
                &server.url,
                "--token",
                token,
                "--host",
                "web-09",
            ])
            .env("TURNOUT_AGENT_CONFIG", &config)
            .output()
            .unwrap()
    };
    let out = enroll("tne_bogus");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Refused credentials: 8, as `turnout` exits for them.
    assert_eq!(out.status.code(), Some(8), "{stderr}");
    assert!(stderr.contains("not known"), "{stderr}");
    // The id is taken by another host's key.
    let token = server.enroll_token(2);
    assert_eq!(
        FakeAgent::new(&server.url, "web-09", 1)
            .enroll(&token, &[])
            .status,
        200
    );
    let out = enroll(&token);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("turnout host forget web-09"), "{stderr}");
}

#[test]
fn a_bad_log_filter_is_a_warning_in_the_log_format_chosen() {
    let dir = tempfile::tempdir().unwrap();
    for (format, journald) in [("json", false), ("text", true)] {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_turnout"));
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--trust"])
            .arg(dir.path().join("missing-trust.json"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env("TURNOUT_LOG", "garbage==")
            .env("TURNOUT_LOG_FORMAT", format);
        if journald {
            command.env("JOURNAL_STREAM", "8:1234");
        } else {
            command.env_remove("JOURNAL_STREAM");
        }
        let out = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first = stderr.lines().next().unwrap_or_default();
        if journald {
            assert!(
                first.starts_with("<4> WARN TURNOUT_LOG=\"garbage==\" is not a log filter"),
                "{stderr}"
            );
        } else {
            let line: Value =
                serde_json::from_str(first).unwrap_or_else(|e| panic!("{e}: {stderr}"));
            assert_eq!(line["level"], "WARN", "{line}");
            assert!(
                line["message"]
                    .as_str()
                    .unwrap()
                    .contains("is not a log filter"),
                "{line}"
            );
        }
        assert_eq!(
            out.status.code(),
            Some(3),
            "the missing trust file still stops it: {stderr}"
        );
    }
}
