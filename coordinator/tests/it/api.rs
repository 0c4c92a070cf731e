//! The coordinator's HTTP API with scripted fake agents: enrollment, signed
//! requests and their refusals, the long poll, roles, bad reports, and
//! rollouts across a fleet that obeys its desired state.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use turnout::coordinator::Settings;
use turnout::engine::{Phase, Rollout, State};
use turnout_proto::messages::{Incompatible, ReleaseRef, Welcome};
use turnout_proto::{ProtoRange, ProtoVersion};

use crate::fake::{FakeAgent, Server, now_ms, wait_for};

fn settings() -> Settings {
    Settings {
        tick: Duration::from_millis(50),
        ..Settings::default()
    }
}

#[test]
fn a_host_enrolls_negotiates_and_reports() {
    let server = Server::start(settings());
    let token = server.enroll_token(1);
    let mut agent = FakeAgent::new(&server.url, "web-01", 1);
    assert_eq!(agent.enroll(&token, &[("role", "web")]).status, 200);
    let second = FakeAgent::new(&server.url, "web-02", 2);
    let used_up = second.enroll(&token, &[]);
    assert_eq!(used_up.status, 401);
    assert!(
        used_up.text().contains("used as many times as it allows"),
        "{}",
        used_up.text()
    );

    let hello = agent.hello();
    assert_eq!(hello.status, 200, "{}", hello.text());
    let welcome = turnout_proto::decode::<Welcome>(&hello.body).unwrap().body;
    assert_eq!(
        welcome.capabilities,
        turnout_proto::CapabilitySet::all_known()
    );
    assert_eq!(agent.report(None).status, 204);
    let hosts: Vec<Value> = server.client(Some(&server.admin)).get("/v1/hosts").unwrap();
    assert_eq!(hosts[0]["id"], "web-01");
    assert_eq!(hosts[0]["state"], "online");
    assert_eq!(hosts[0]["proto"], 2, "the highest version both speak");
    assert_eq!(hosts[0]["legacy"], false);
}

#[test]
fn the_host_list_filters_by_selector_and_refuses_a_malformed_one() {
    let server = Server::start(settings());
    let token = server.enroll_token(2);
    for (name, seed, role) in [("web-01", 1, "web"), ("db-01", 2, "db")] {
        let agent = FakeAgent::new(&server.url, name, seed);
        assert_eq!(agent.enroll(&token, &[("role", role)]).status, 200);
    }
    let admin = server.client(Some(&server.admin));
    let web: Vec<Value> = admin.get("/v1/hosts?selector=role=web").unwrap();
    let ids: Vec<&str> = web.iter().filter_map(|h| h["id"].as_str()).collect();
    assert_eq!(ids, ["web-01"]);
    // "role" alone used to be ignored, listing every host as if no selector were given.
    match admin.get::<Value>("/v1/hosts?selector=role") {
        Err(turnout::client::ClientError::Api { status, message }) => {
            assert_eq!(status, 400);
            assert!(
                message.contains("expected key=value pairs separated by commas, found \"role\""),
                "{message}"
            );
        }
        other => panic!("expected a 400 for a malformed selector, got {other:?}"),
    }
}

#[test]
fn bad_signatures_stale_timestamps_replays_and_unknown_hosts_are_refused_and_counted() {
    let server = Server::start(settings());
    let agent = FakeAgent::new(&server.url, "web-01", 1);
    assert_eq!(agent.enroll(&server.enroll_token(1), &[]).status, 200);
    let path = "/v1/agent/desired?index=0";

    let impostor = turnout_proto::keys::SecretKey::from_seed([66; 32]);
    let answer = agent.signed_as(&impostor, now_ms(), "GET", path, b"");
    assert_eq!(answer.status, 401);
    assert!(
        answer
            .text()
            .contains("does not verify with host web-01's enrolled key"),
        "{}",
        answer.text()
    );

    let answer = agent.signed_as(&agent.key, now_ms() - 3_600_000, "GET", path, b"");
    assert_eq!(answer.status, 401);
    assert!(
        answer.text().contains("check the host's clock"),
        "{}",
        answer.text()
    );

    let ts = now_ms();
    assert_eq!(
        agent.signed_as(&agent.key, ts, "GET", path, b"").status,
        200
    );
    let replay = agent.signed_as(&agent.key, ts, "GET", path, b"");
    assert_eq!(replay.status, 401);
    assert!(replay.text().contains("a replay"), "{}", replay.text());

    let stranger = FakeAgent::new(&server.url, "db-09", 3);
    let answer = stranger.signed("GET", path, b"");
    assert_eq!(answer.status, 401);
    assert!(
        answer.text().contains("host db-09 is not enrolled"),
        "{}",
        answer.text()
    );

    let metrics = &server.coordinator.metrics;
    for reason in [
        "host_signature",
        "host_stale",
        "host_replay",
        "host_unknown",
    ] {
        assert_eq!(metrics.auth_failures(reason), 1, "{reason}");
    }
    let text = agent
        .raw(
            "GET",
            "/metrics",
            Some(format!("Bearer {}", server.admin)),
            b"",
        )
        .text();
    assert!(
        text.contains("turnout_auth_failures_total{reason=\"host_replay\"} 1"),
        "{text}"
    );
}

#[test]
fn a_desired_state_change_reaches_a_waiting_long_poll_at_once() {
    let server = Server::start(settings());
    let token = server.enroll_token(1);
    let v1 = server.push_release("1.0.0");
    let v2 = server.push_release("2.0.0");
    let agent = FakeAgent::join(&server.url, "web-01", 1, &token, &v1);
    let index = agent.desired(0, "0s").index;
    let (tx, rx) = std::sync::mpsc::channel();
    // A poll far longer than any test deadline: an answer before it runs
    // out can only be the change waking it.
    let waiter = std::thread::spawn(move || {
        let state = agent.desired(index, "300s");
        tx.send(Instant::now()).unwrap();
        state
    });
    wait_for(
        "the long poll to park on the server",
        Duration::from_secs(10),
        || server.coordinator.waiting("web-01") > 0,
    );
    let started = Instant::now();
    let _: Rollout = server
        .client(Some(&server.admin))
        .post(
            "/v1/rollouts",
            &json!({"spec": {"service": "web", "release": "web@2.0.0"}}),
        )
        .unwrap();
    let answered = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the long poll answered before its 300 s ran out");
    let state = waiter.join().unwrap();
    assert_eq!(state.services[0].release, v2, "answered with the change");
    assert!(state.index > index);
    // Measured, not asserted (the machine may be loaded): docs/benchmarks.md
    // has the latency figures.
    eprintln!(
        "long-poll latency from rollout start to answer: {:?}",
        answered.duration_since(started)
    );
}

#[test]
fn roles_gate_the_operator_api() {
    let server = Server::start(settings());
    let admin = server.client(Some(&server.admin));
    let viewer: Value = admin
        .post("/v1/tokens", &json!({"name": "vera", "role": "viewer"}))
        .unwrap();
    let viewer = server.client(viewer["token"].as_str());
    let operator: Value = admin
        .post("/v1/tokens", &json!({"name": "otto", "role": "operator"}))
        .unwrap();
    let operator = server.client(operator["token"].as_str());

    assert!(viewer.get::<Value>("/v1/hosts").is_ok());
    let err = viewer
        .post::<Value>("/v1/rollouts", &json!({"spec": {}}))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("this needs role operator; the token \"vera\" has role viewer (HTTP 403)"),
        "{err}"
    );
    let err = operator
        .post::<Value>("/v1/tokens", &json!({"name": "ada", "role": "admin"}))
        .unwrap_err();
    assert!(err.to_string().contains("needs role admin"), "{err}");
    let err = server
        .client(None)
        .get::<Value>("/v1/rollouts")
        .unwrap_err();
    assert!(err.to_string().contains("no operator token"), "{err}");
    let err = server
        .client(Some("tnt_forged"))
        .get::<Value>("/v1/rollouts")
        .unwrap_err();
    assert!(err.to_string().contains("(HTTP 401)"), "{err}");
}

#[test]
fn a_malformed_or_oversized_report_is_refused_counted_and_changes_nothing() {
    let server = Server::start(settings());
    let v1 = server.push_release("1.0.0");
    let mut agent = FakeAgent::join(&server.url, "web-01", 1, &server.enroll_token(1), &v1);
    let before: Vec<Value> = server.client(Some(&server.admin)).get("/v1/hosts").unwrap();

    let answer = agent.signed(
        "POST",
        "/v1/agent/report",
        br#"{"proto":1,"host":"web-01","seq":"many"}"#,
    );
    assert_eq!(answer.status, 400);
    assert!(answer.text().contains("invalid `seq`"), "{}", answer.text());
    // Refused as it arrives: the answer is a 413, or, when the coordinator
    // closes before the client has sent it all, a broken connection.
    let huge = vec![b' '; 2 << 20];
    if let Some(answer) = agent.try_signed("POST", "/v1/agent/report", &huge) {
        assert_eq!(answer.status, 413, "{}", answer.text());
    }
    let after: Vec<Value> = server.client(Some(&server.admin)).get("/v1/hosts").unwrap();
    assert_eq!(before[0]["report"], after[0]["report"]);
    assert!(
        agent
            .raw(
                "GET",
                "/metrics",
                Some(format!("Bearer {}", server.admin)),
                b""
            )
            .text()
            .contains("turnout_bad_reports_total 2")
    );
    agent.committed = None;
}

#[test]
fn an_agent_with_no_common_version_is_refused_with_both_ranges_and_listed() {
    let server = Server::start(settings());
    let agent = FakeAgent::new(&server.url, "web-07", 7);
    assert_eq!(agent.enroll(&server.enroll_token(1), &[]).status, 200);
    let future =
        ProtoRange::new(ProtoVersion::new(5).unwrap(), ProtoVersion::new(7).unwrap()).unwrap();
    let answer = agent.hello_with(future, &[]);
    assert_eq!(answer.status, 409);
    let refusal = turnout_proto::decode::<Incompatible>(&answer.body)
        .unwrap()
        .body;
    let expected = format!(
        "the agent speaks v5-v7, the coordinator (turnout {}) speaks v1-v2",
        env!("CARGO_PKG_VERSION")
    );
    assert!(refusal.to_string().contains(&expected), "{refusal}");
    let hosts: Vec<Value> = server.client(Some(&server.admin)).get("/v1/hosts").unwrap();
    assert_eq!(hosts[0]["state"], "incompatible");
    assert!(
        hosts[0]["incompatible"]
            .as_str()
            .unwrap()
            .contains("upgrade the coordinator")
    );
}

/// Moves every fake agent to its desired release, except `bad` ones, which
/// report that release as failed.
fn obey(agents: &mut [FakeAgent], bad: &[&str]) {
    for agent in agents.iter_mut() {
        let desired = agent.desired(0, "0s");
        // It acts on what it was told, and says so in its report.
        agent.converged = desired.index;
        let Some(wanted) = desired.services.first().map(|s| s.release.clone()) else {
            continue;
        };
        if agent.committed.as_ref() == Some(&wanted) {
            assert_eq!(agent.report(None).status, 204);
        } else if bad.contains(&agent.host.as_str()) && wanted.version.major == 2 {
            assert_eq!(
                agent
                    .report(Some((&wanted, "check http failed 3 times in a row")))
                    .status,
                204
            );
        } else {
            agent.committed = Some(wanted);
            assert_eq!(agent.report(None).status, 204);
        }
    }
}

fn fleet(server: &Server, n: usize) -> (Vec<FakeAgent>, ReleaseRef) {
    let token = server.enroll_token(n as u32);
    let v1 = server.push_release("1.0.0");
    server.push_release("2.0.0");
    let agents = (0..n)
        .map(|i| {
            FakeAgent::join(
                &server.url,
                &format!("web-{i:02}"),
                i as u8 + 10,
                &token,
                &v1,
            )
        })
        .collect();
    (agents, v1)
}

fn rollout_state(server: &Server, id: &str) -> Rollout {
    server
        .client(Some(&server.admin))
        .get(&format!("/v1/rollouts/{id}"))
        .unwrap()
}

#[test]
fn a_rollout_moves_the_fleet_wave_by_wave_and_logs_its_cohorts() {
    let server = Server::start(settings());
    let (mut agents, _) = fleet(&server, 6);
    let admin = server.client(Some(&server.admin));
    let plan: Value = admin.post("/v1/rollouts/plan", &json!({"spec": {"service": "web", "release": "web@2.0.0", "waves": ["1", "50%", "100%"], "max_parallel": 2}})).unwrap();
    let started: Rollout = admin.post("/v1/rollouts", &json!({"spec": {"service": "web", "release": "web@2.0.0", "waves": ["1", "50%", "100%"], "max_parallel": 2}})).unwrap();
    assert_eq!(
        serde_json::to_value(&started.waves).unwrap(),
        plan["waves"],
        "start follows the plan it showed"
    );
    wait_for("the rollout to succeed", Duration::from_secs(30), || {
        obey(&mut agents, &[]);
        rollout_state(&server, &started.id).state == State::Succeeded
    });
    assert!(
        agents
            .iter()
            .all(|a| a.committed.as_ref().unwrap().version.major == 2)
    );
    let events: Vec<Value> = admin
        .get(&format!("/v1/events?rollout={}", started.id))
        .unwrap();
    let messages: Vec<&str> = events
        .iter()
        .filter_map(|e| e["message"].as_str())
        .collect();
    assert!(
        messages.iter().any(|m| m.starts_with("planned wave 1: ")),
        "{messages:#?}"
    );
    assert!(
        messages.iter().any(|m| m.starts_with("succeeded")),
        "{messages:#?}"
    );

    // One active rollout per service; mistakes are clear.
    let err = admin
        .post::<Value>(
            "/v1/rollouts",
            &json!({"spec": {"service": "web", "release": "web@9.9.9"}}),
        )
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("release web@9.9.9 is not in the bundle store"),
        "{err}"
    );
    let err = admin
        .post::<Value>(
            "/v1/rollouts",
            &json!({"spec": {"service": "web", "release": "web@1.0.0", "selector": "role=db"}}),
        )
        .unwrap_err();
    assert!(err.to_string().contains("matches no host"), "{err}");
}

#[test]
fn a_failing_canary_rolls_back_and_only_one_rollout_runs_per_service() {
    let server = Server::start(settings());
    let (mut agents, v1) = fleet(&server, 4);
    let admin = server.client(Some(&server.admin));
    let rollout: Rollout = admin
        .post(
            "/v1/rollouts",
            &json!({"spec": {"service": "web", "release": "web@2.0.0", "promote": "manual"}}),
        )
        .unwrap();
    let canary = rollout.waves[0][0].to_string();
    let err = admin
        .post::<Value>(
            "/v1/rollouts",
            &json!({"spec": {"service": "web", "release": "web@2.0.0"}}),
        )
        .unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "rollout {} of service web is still running",
            rollout.id
        )),
        "{err}"
    );
    wait_for(
        "the canary's failure to roll the rollout back",
        Duration::from_secs(30),
        || {
            obey(&mut agents, &[canary.as_str()]);
            rollout_state(&server, &rollout.id).state == State::RolledBack
        },
    );
    assert!(
        agents.iter().all(|a| a.committed.as_ref() == Some(&v1)),
        "no host outside the canary moved"
    );
    let err = admin
        .post::<Value>(&format!("/v1/rollouts/{}/promote", rollout.id), &json!({}))
        .unwrap_err();
    assert!(err.to_string().contains("(HTTP 409)"), "{err}");
}

#[test]
fn a_canary_reporting_it_is_reverting_fails_before_its_revert_ends() {
    let server = Server::start(settings());
    let (mut agents, v1) = fleet(&server, 3);
    let admin = server.client(Some(&server.admin));
    let rollout: Rollout = admin
        .post(
            "/v1/rollouts",
            &json!({"spec": {"service": "web", "release": "web@2.0.0", "waves": ["1", "100%"]}}),
        )
        .unwrap();
    let canary = agents
        .iter_mut()
        .find(|a| a.host == rollout.waves[0][0])
        .unwrap();
    let v2 = canary.desired(0, "0s").services[0].release.clone();
    assert_eq!(v2.version.major, 2);
    // The canary never reports an outcome: only that it is reverting.
    let answer = canary.report_reverting(&v2, "check http failed 3 times in a row");
    assert_eq!(answer.status, 204, "{}", answer.text());
    wait_for(
        "the reverting canary to trip the gate",
        Duration::from_secs(30),
        || {
            matches!(
                rollout_state(&server, &rollout.id).state,
                State::RollingBack { .. }
            )
        },
    );
    // Still reverting, it is not taken as back yet; it is told its previous
    // release all the same, so that it stays there.
    let state = rollout_state(&server, &rollout.id);
    let canary = state.waves[0][0].to_string();
    assert!(
        matches!(
            state.hosts[&state.waves[0][0]].phase,
            Phase::Reverting { .. }
        ),
        "{:?}",
        state.hosts
    );
    // Its revert ends: at rest on 1.0.0, 2.0.0 recorded as reverted.
    wait_for("the rollback to finish", Duration::from_secs(30), || {
        obey(&mut agents, &[canary.as_str()]);
        rollout_state(&server, &rollout.id).state == State::RolledBack
    });
    let events: Vec<Value> = admin
        .get(&format!("/v1/events?rollout={}", rollout.id))
        .unwrap();
    assert!(
        events
            .iter()
            .any(|e| e["message"] == "rolling back to 1.0.0"),
        "{events:#?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["message"] == "failed: reverting: check http failed 3 times in a row"),
        "{events:#?}"
    );
    assert!(
        agents.iter().all(|a| a.committed.as_ref() == Some(&v1)),
        "no host moved past the canary"
    );
}

#[test]
fn a_bundle_failing_the_trust_check_is_refused_and_not_stored() {
    let server = Server::start(settings());
    let dir = tempfile::tempdir().unwrap();
    // Signed by a key the coordinator's trust file does not list.
    let bundle = {
        let path = crate::fake::demo_bundle(dir.path(), "6.6.6");
        let bytes = std::fs::read(&path).unwrap();
        let other = turnout_proto::keys::SecretKey::from_seed([77; 32]);
        let head = turnout_proto::bundle::read_head(&bytes[..], &turnout_proto::Limits::default())
            .unwrap();
        let signature = turnout_proto::signature::SignatureEntry {
            key_id: other.public().id().clone(),
            sig: other.sign(&head.manifest_bytes),
        };
        turnout_proto::bundle::rewrite_signatures(
            &bytes[..],
            std::fs::File::create(&path).unwrap(),
            &[signature],
            &turnout_proto::Limits::default(),
        )
        .unwrap();
        path
    };
    let err = server
        .client(Some(&server.admin))
        .post_stream::<Value>("/v1/bundles", &mut std::fs::File::open(&bundle).unwrap())
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("bundle refused: the manifest is signed by key"),
        "{err}"
    );
    assert!(err.to_string().contains("(HTTP 422)"), "{err}");
    let stored: Vec<Value> = server
        .client(Some(&server.admin))
        .get("/v1/bundles")
        .unwrap();
    assert!(stored.is_empty());
    let files: Vec<_> = std::fs::read_dir(server.coordinator.bundles_dir())
        .unwrap()
        .collect();
    assert!(files.is_empty(), "the refused upload left {files:?}");
}

#[test]
fn bundles_download_whole_or_by_range() {
    let server = Server::start(settings());
    let release = server.push_release("1.0.0");
    let agent = FakeAgent::join(&server.url, "web-01", 1, &server.enroll_token(1), &release);
    let path = format!("/v1/bundles/{}", release.sha256);
    let whole = agent.signed("GET", &path, b"");
    assert_eq!(whole.status, 200);
    let on_disk = std::fs::read(server.coordinator.bundle_path(release.sha256.as_str())).unwrap();
    assert_eq!(whole.body, on_disk);

    let url = format!("{}{path}", server.url);
    let http: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let ranged = |range: &str| {
        let mut response = http
            .get(&url)
            .header("Authorization", format!("Bearer {}", server.admin))
            .header("Range", range)
            .call()
            .unwrap();
        let status = response.status().as_u16();
        let content_range = response
            .headers()
            .get("content-range")
            .map(|v| v.to_str().unwrap().to_owned());
        (
            status,
            content_range,
            response.body_mut().read_to_vec().unwrap(),
        )
    };
    let (status, content_range, body) = ranged("bytes=100-199");
    assert_eq!((status, body.as_slice()), (206, &on_disk[100..200]));
    assert_eq!(
        content_range.unwrap(),
        format!("bytes 100-199/{}", on_disk.len())
    );
    let (status, _, body) = ranged("bytes=1000-");
    assert_eq!(
        (status, body.as_slice()),
        (206, &on_disk[1000..]),
        "resuming from an offset"
    );
    let (status, content_range, _) = ranged(&format!("bytes={}-", on_disk.len() + 5));
    assert_eq!(status, 416);
    assert_eq!(content_range.unwrap(), format!("bytes */{}", on_disk.len()));
}

#[test]
fn the_rollout_cli_plans_starts_and_watches_to_the_end() {
    let server = Server::start(settings());
    let (mut agents, _) = fleet(&server, 3);
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_turnout"))
            .args(args)
            .env("TURNOUT_COORDINATOR", &server.url)
            .env("TURNOUT_TOKEN", &server.admin)
            .output()
            .unwrap()
    };
    let plan = cli(&[
        "rollout",
        "plan",
        "--service",
        "web",
        "--release",
        "web@2.0.0",
        "--waves",
        "1,100%",
    ]);
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(
        plan.status.success(),
        "{}",
        String::from_utf8_lossy(&plan.stderr)
    );
    assert!(
        text.contains("rollout web-2.0.0-1: web to web 2.0.0"),
        "{text}"
    );
    assert!(
        text.contains("wave 1 (1 host(s))") && text.contains("wave 2 (2 host(s))"),
        "{text}"
    );

    let bad = cli(&[
        "rollout",
        "start",
        "--service",
        "web",
        "--release",
        "web@2.0.0",
        "--waves",
        "1,lots",
        "--on-failure",
        "shrug",
    ]);
    assert_eq!(bad.status.code(), Some(3));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("2 problem(s)") && err.contains("waves[1]") && err.contains("on_failure"),
        "{err}"
    );

    let start = cli(&[
        "rollout",
        "start",
        "--service",
        "web",
        "--release",
        "web@2.0.0",
        "--waves",
        "1,100%",
    ]);
    assert!(
        start.status.success(),
        "{}",
        String::from_utf8_lossy(&start.stderr)
    );
    let watcher = std::process::Command::new(env!("CARGO_BIN_EXE_turnout"))
        .args(["rollout", "watch", "web-2.0.0-1"])
        .env("TURNOUT_COORDINATOR", &server.url)
        .env("TURNOUT_TOKEN", &server.admin)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let watcher_pid = watcher.id();
    wait_for("the fleet to move", Duration::from_secs(30), || {
        obey(&mut agents, &[]);
        rollout_state(&server, "web-2.0.0-1").state == State::Succeeded
    });
    let out = watcher.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "watch {watcher_pid}: {text}");
    assert!(
        text.contains("dispatched 2.0.0") && text.contains("succeeded"),
        "{text}"
    );
    let status = cli(&["rollout", "status", "web-2.0.0-1"]);
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("wave 2 (2 host(s)): 2 done"),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );
    // The list's columns line up under their headings.
    let list = cli(&["rollout", "list"]);
    let text = String::from_utf8_lossy(&list.stdout);
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let row = lines.next().unwrap();
    for (heading, value) in [
        ("SERVICE", "web "),
        ("STATE", "succeeded"),
        ("RELEASE", " 2.0.0"),
    ] {
        let at = row
            .rfind(value)
            .map(|i| i + value.len() - value.trim_start().len());
        assert_eq!(header.find(heading), at, "{heading}:\n{text}");
    }
}

#[test]
fn shutting_down_does_not_wait_out_parked_long_polls() {
    let server = Server::start(settings());
    let release = server.push_release("1.0.0");
    let agent = FakeAgent::join(&server.url, "web-01", 1, &server.enroll_token(1), &release);
    let index = agent.desired(0, "0s").index;
    // Parked for 300 s, far beyond the deadline below: only the shutdown
    // can answer it in time.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(agent.desired(index, "300s")));
    wait_for("the long poll to park", Duration::from_secs(10), || {
        server.coordinator.waiting("web-01") > 0
    });
    let stopping = std::thread::spawn(move || drop(server));
    let state = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("shutdown answered the parked poll instead of waiting it out");
    assert_eq!(state.index, index, "answered with the unchanged state");
    stopping.join().unwrap();
}

#[test]
fn the_demo_runs_the_whole_story_and_cleans_up() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_turnout"))
        .args(["demo", "--hosts", "3"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "Rollout 1: install web 1.0.0",
        "=> succeeded",
        "=> rolled_back",
        "every host runs 2.0.0",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    // The canary's failure names its check, whether the coordinator saw
    // the revert under way ("reverting: …") or done ("reverted: …").
    assert!(
        text.lines()
            .any(|l| l.contains("failed: revert") && l.contains("check http")),
        "the canary's failure does not name its check:\n{text}"
    );
    let dir = text
        .lines()
        .find_map(|l| l.strip_prefix("==> Turnout demo in "))
        .and_then(|l| l.split(':').next())
        .unwrap();
    assert!(
        !std::path::Path::new(dir).exists(),
        "the demo left {dir} behind"
    );
}

#[test]
fn a_re_enrolled_host_is_known_by_its_new_key_at_once() {
    let server = Server::start(settings());
    let old = FakeAgent::new(&server.url, "web-01", 1);
    assert_eq!(old.enroll(&server.enroll_token(1), &[]).status, 200);
    assert_eq!(
        old.signed("GET", "/v1/agent/desired?index=0", b"").status,
        200,
        "caches the first key"
    );
    // The host is reinstalled: same id, new key. An admin forgets the old
    // host first (an enrollment token alone cannot replace a key).
    let new = FakeAgent::new(&server.url, "web-01", 2);
    assert_eq!(new.enroll(&server.enroll_token(1), &[]).status, 409);
    server
        .client(Some(&server.admin))
        .delete("/v1/hosts/web-01")
        .unwrap();
    assert_eq!(new.enroll(&server.enroll_token(1), &[]).status, 200);
    assert_eq!(
        new.signed("GET", "/v1/agent/desired?index=0", b"").status,
        200,
        "the new key works"
    );
    let answer = old.signed("GET", "/v1/agent/desired?index=0", b"");
    assert_eq!(answer.status, 401, "the old key no longer does");
    assert!(
        answer.text().contains("does not verify"),
        "{}",
        answer.text()
    );
}

#[test]
fn refused_enrollments_bad_host_ids_and_mangled_tokens_exit_with_their_own_codes() {
    let server = Server::start(settings());
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
    let turnout = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_turnout"))
            .args(args)
            .env("TURNOUT_AGENT_CONFIG", &config)
            .env_remove("TURNOUT_TOKEN")
            .output()
            .unwrap();
        (
            out.status.code().expect("exited"),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // An unknown enrollment token: the credentials were refused (8), as
    // `turnout` says it, and no identity is kept.
    let (code, stderr) = turnout(&[
        "agent",
        "enroll",
        "--coordinator",
        &server.url,
        "--token",
        "tnt_unknown",
        "--host",
        "web-1",
    ]);
    assert_eq!(code, 8, "{stderr}");
    assert!(stderr.contains("not known"), "{stderr}");
    assert!(!dir.path().join("state/coordinator.json").exists());
    // A host id that can never be one: invalid input (3), nothing sent.
    let token = server.enroll_token(1);
    let (code, stderr) = turnout(&[
        "agent",
        "enroll",
        "--coordinator",
        &server.url,
        "--token",
        &token,
        "--host",
        "bad host!",
    ]);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("bad host!"), "{stderr}");
    // An operator token with a line break pasted in: said so, exit 3, not
    // "cannot reach the coordinator".
    let mangled = format!("{}\r\n", server.admin);
    let (code, stderr) = turnout(&[
        "host",
        "list",
        "--coordinator",
        &server.url,
        "--token",
        &mangled,
    ]);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("line break"), "{stderr}");
    // The token itself still works: nothing was spent.
    let (code, stderr) = turnout(&[
        "agent",
        "enroll",
        "--coordinator",
        &server.url,
        "--token",
        &token,
        "--host",
        "web-1",
    ]);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn operator_auth_takes_any_case_of_bearer_refuses_two_headers_and_every_failure_has_a_body() {
    let server = Server::start(settings());
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let call = |method: &str, path: &str, auth: &[&str]| {
        let mut request = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", server.url));
        for value in auth {
            request = request.header("Authorization", *value);
        }
        let mut response = agent.run(request.body(()).unwrap()).unwrap();
        let challenge = response
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_owned());
        let status = response.status().as_u16();
        let body: Value = serde_json::from_slice(&response.body_mut().read_to_vec().unwrap())
            .unwrap_or(Value::Null);
        (status, body, challenge)
    };
    let admin = &server.admin;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let (status, body, _) = call("GET", "/v1/hosts", &[&format!("{scheme} {admin}")]);
        assert_eq!(status, 200, "{scheme}: {body}");
    }
    let (status, body, challenge) = call("GET", "/v1/hosts", &["Basic YWRtaW46YWRtaW4="]);
    assert_eq!(status, 401);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("Authorization: Bearer tnt_"),
        "{body}"
    );
    assert_eq!(challenge.as_deref(), Some("Bearer realm=\"turnout\""));
    let (_, _, challenge) = call("GET", "/v1/hosts", &[]);
    assert_eq!(
        challenge.as_deref(),
        Some("Bearer realm=\"turnout\""),
        "no token: a challenge too"
    );
    // Two headers, whichever comes first: refused, not "the first wins".
    for pair in [
        [format!("Bearer {admin}"), "Bearer tnt_wrong".to_owned()],
        ["Bearer tnt_wrong".to_owned(), format!("Bearer {admin}")],
    ] {
        let (status, body, _) = call("GET", "/v1/hosts", &[&pair[0], &pair[1]]);
        assert_eq!(status, 400, "{body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("two Authorization headers"),
            "{body}"
        );
    }
    let (status, body, _) = call("GET", "/v1/nothing-here", &[]);
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("not_found")),
        "{body}"
    );
    let (status, body, _) = call("DELETE", "/v1/rollouts", &[&format!("Bearer {admin}")]);
    assert_eq!(status, 405, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("DELETE is not a method"),
        "{body}"
    );
}
