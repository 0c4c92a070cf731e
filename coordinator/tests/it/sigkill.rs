//! The coordinator killed with SIGKILL in the middle of a wave, as a real
//! child process, and restarted on the same database: the rollout finishes,
//! and no host is dispatched twice or skipped.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use turnout::engine::{Phase, Rollout, State};

use crate::fake::{FakeAgent, demo_bundle, wait_for};

struct Serve {
    child: Child,
}

impl Serve {
    /// Starts `turnout serve`; returns it and the admin token when `init`.
    fn start(dir: &std::path::Path, port: u16, init: bool) -> (Serve, Option<String>) {
        let mut command = Command::new(env!("CARGO_BIN_EXE_turnout"));
        command
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--state-dir",
            ])
            .arg(dir.join("state"))
            .arg("--trust")
            .arg(dir.join("trust.json"))
            .args(["--report-interval", "1s"])
            // Crash recovery is the subject here, over plain HTTP; TLS has its own tests.
            .arg("--plaintext")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if init {
            command
                .arg("--init")
                .arg("--profile")
                .arg(dir.join("profile.toml"));
        }
        let mut child = command.spawn().unwrap();
        let token = init.then(|| {
            let mut line = String::new();
            BufReader::new(child.stdout.as_mut().unwrap())
                .read_line(&mut line)
                .unwrap();
            line.trim().rsplit(' ').next().unwrap().to_owned()
        });
        wait_for("the coordinator to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        (Serve { child }, token)
    }

    fn kill(&mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let _ = self.child.wait();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_coordinator_killed_mid_wave_finishes_the_rollout_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let key = turnout_proto::keys::SecretKey::from_seed([9; 32]);
    let trust = turnout_proto::trust::Trust::new(
        1,
        1,
        std::time::SystemTime::UNIX_EPOCH,
        vec![key.public()],
    )
    .unwrap();
    std::fs::write(
        dir.path().join("trust.json"),
        turnout_proto::trust::TrustFile::unsigned(trust).to_bytes(),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let (mut serve, token) = Serve::start(dir.path(), port, true);
    let admin = turnout::client::Client::new(&url, token);

    for version in ["1.0.0", "2.0.0"] {
        let bundle = demo_bundle(dir.path(), version);
        let _: Value = admin
            .post_stream("/v1/bundles", &mut std::fs::File::open(bundle).unwrap())
            .unwrap();
    }
    let bundles: Vec<Value> = admin.get("/v1/bundles").unwrap();
    let v1_sha = bundles.iter().find(|b| b["version"] == "1.0.0").unwrap()["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    let v1 = turnout_proto::messages::ReleaseRef {
        name: "web".into(),
        version: "1.0.0".parse().unwrap(),
        sha256: v1_sha.parse().unwrap(),
    };
    let enroll: Value = admin
        .post("/v1/tokens", &json!({"enroll": true, "uses": 6}))
        .unwrap();
    let mut agents: Vec<FakeAgent> = (0..6)
        .map(|i| {
            FakeAgent::join(
                &url,
                &format!("web-{i:02}"),
                20 + i as u8,
                enroll["token"].as_str().unwrap(),
                &v1,
            )
        })
        .collect();

    let rollout: Rollout = admin
        .post("/v1/rollouts", &json!({"spec": {"service": "web", "release": "web@2.0.0", "waves": ["1", "100%"], "max_parallel": 1}}))
        .unwrap();
    let get = |admin: &turnout::client::Client| -> Rollout {
        admin.get(&format!("/v1/rollouts/{}", rollout.id)).unwrap()
    };
    let obey = |agents: &mut Vec<FakeAgent>| {
        for agent in agents.iter_mut() {
            let desired = agent.desired(0, "0s");
            if let Some(wanted) = desired.services.first().map(|s| s.release.clone()) {
                agent.committed = Some(wanted);
            }
            assert_eq!(agent.report(None).status, 204);
        }
    };
    // Move until the second wave is partly done.
    wait_for(
        "the second wave to be under way",
        Duration::from_secs(30),
        || {
            obey(&mut agents);
            let r = get(&admin);
            let done = r.waves[1]
                .iter()
                .filter(|h| r.hosts[*h].phase == Phase::Done)
                .count();
            matches!(r.state, State::Running { wave: 1, .. }) && done >= 2
        },
    );
    serve.kill();

    let (_serve, _) = Serve::start(dir.path(), port, false);
    wait_for(
        "the rollout to finish after the restart",
        Duration::from_secs(30),
        || {
            obey(&mut agents);
            get(&admin).state == State::Succeeded
        },
    );
    assert!(
        agents
            .iter()
            .all(|a| a.committed.as_ref().unwrap().version.major == 2)
    );
    let events: Vec<Value> = admin
        .get(&format!("/v1/events?rollout={}", rollout.id))
        .unwrap();
    for agent in &agents {
        let dispatched = events
            .iter()
            .filter(|e| {
                e["host"] == agent.host.as_str()
                    && e["message"].as_str().unwrap().starts_with("dispatched")
            })
            .count();
        assert_eq!(
            dispatched, 1,
            "{} was dispatched {dispatched} times",
            agent.host
        );
    }
}
