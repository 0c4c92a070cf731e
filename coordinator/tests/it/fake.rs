//! Test doubles: a coordinator in this process on port 0, and a scripted
//! fake agent that speaks the real protocol with signed requests.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use turnout::coordinator::{Coordinator, Settings};
use turnout::store::Role;
use turnout_proto::keys::SecretKey;
use turnout_proto::messages::{
    DesiredState, Health, Hello, ReleaseRef, Report, ServiceReport, ServiceState,
};
use turnout_proto::{CapabilitySet, HostId, SUPPORTED, encode, request_auth};

pub(crate) use turnout_rt::clock::system_now_ms as now_ms;

pub(crate) use turnout_testkit::wait_for;

/// A coordinator served in this process on 127.0.0.1:0.
pub(crate) struct Server {
    pub(crate) url: String,
    pub(crate) admin: String,
    pub(crate) coordinator: Arc<Coordinator>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub(crate) dir: tempfile::TempDir,
}

impl Server {
    pub(crate) fn start(settings: Settings) -> Server {
        Server::start_in(settings, tempfile::tempdir().unwrap())
    }

    /// A coordinator whose state lives in `dir`.
    pub(crate) fn start_in(settings: Settings, dir: tempfile::TempDir) -> Server {
        Server::start_with(settings, dir, turnout_rt::SystemClock::shared())
    }

    /// A coordinator on `clock` (a manual one, to let time pass at once).
    pub(crate) fn start_with(
        settings: Settings,
        dir: tempfile::TempDir,
        clock: Arc<dyn turnout_rt::Clock>,
    ) -> Server {
        let now = clock.now_ms();
        let coordinator =
            Arc::new(Coordinator::open_with_clock(dir.path(), trust(), settings, clock).unwrap());
        let admin = coordinator
            .with_store(|s| s.create_token("root", Role::Admin, None, now))
            .unwrap()
            .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let c = coordinator.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                ready_tx.send(listener.local_addr().unwrap()).unwrap();
                turnout::server::serve(c, listener, None, async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            });
        });
        let addr = ready_rx.recv().unwrap();
        Server {
            url: format!("http://{addr}"),
            admin,
            coordinator,
            stop: Some(stop),
            thread: Some(thread),
            dir,
        }
    }

    /// A release signed by the coordinator's trusted key, pushed to its store.
    pub(crate) fn push_release(&self, version: &str) -> ReleaseRef {
        let bundle = demo_bundle(self.dir.path(), version);
        let client = turnout::client::Client::new(&self.url, Some(self.admin.clone()));
        let record: Value = client
            .post_stream("/v1/bundles", &mut std::fs::File::open(&bundle).unwrap())
            .unwrap();
        ReleaseRef {
            name: "web".into(),
            version: version.parse().unwrap(),
            sha256: record["sha256"].as_str().unwrap().parse().unwrap(),
        }
    }

    pub(crate) fn client(&self, token: Option<&str>) -> turnout::client::Client {
        turnout::client::Client::new(&self.url, token.map(str::to_owned))
    }

    pub(crate) fn enroll_token(&self, uses: u32) -> String {
        let answer: Value = self
            .client(Some(&self.admin))
            .post("/v1/tokens", &json!({"enroll": true, "uses": uses}))
            .unwrap();
        answer["token"].as_str().unwrap().to_owned()
    }
}

impl Server {
    /// Stops serving and waits until the server has returned.
    pub(crate) fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The release key the test trust holds.
pub(crate) fn release_key() -> SecretKey {
    SecretKey::from_seed([9; 32])
}

/// The trust every test coordinator checks pushes against: [`release_key`], 1 of 1.
pub(crate) fn trust() -> turnout_proto::trust::Trust {
    turnout_proto::trust::Trust::new(1, 1, SystemTime::UNIX_EPOCH, vec![release_key().public()])
        .unwrap()
}

/// A one-file bundle of `web` at `version`, signed with the test trust's key.
pub(crate) fn demo_bundle(dir: &Path, version: &str) -> std::path::PathBuf {
    let path = dir.join(format!("web-{version}.tnt"));
    let script = format!("#!/bin/sh\necho web {version}\n").into_bytes();
    turnout_testkit::write_bundle(
        &path,
        "web",
        version,
        "bin/web",
        &[("bin/web", 0o755, script)],
        &[&release_key()],
    );
    path
}

/// What an HTTP call answered.
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) body: Vec<u8>,
}

impl Answer {
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A scripted agent: real protocol, real signatures, no slots.
pub(crate) struct FakeAgent {
    pub(crate) host: HostId,
    pub(crate) key: SecretKey,
    url: String,
    http: ureq::Agent,
    pub(crate) committed: Option<ReleaseRef>,
    /// The index of the last desired state it acted on, sent in reports.
    pub(crate) converged: u64,
    seq: u64,
    /// The coordinator's director keys, asked for once.
    directors: std::sync::OnceLock<
        std::collections::BTreeMap<turnout_proto::keys::KeyId, turnout_proto::keys::PublicKey>,
    >,
}

impl FakeAgent {
    pub(crate) fn new(url: &str, host: &str, seed: u8) -> FakeAgent {
        let http = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        FakeAgent {
            host: host.parse().unwrap(),
            key: SecretKey::from_seed([seed; 32]),
            url: url.to_owned(),
            http,
            committed: None,
            converged: 0,
            seq: 0,
            directors: std::sync::OnceLock::new(),
        }
    }

    /// Sends a request signed with `key` at time `ts`.
    pub(crate) fn signed_as(
        &self,
        key: &SecretKey,
        ts: u64,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Answer {
        let header = request_auth::sign(key, &self.host, method, path, ts, body);
        self.raw(method, path, Some(header), body)
    }

    pub(crate) fn raw(
        &self,
        method: &str,
        path: &str,
        auth: Option<String>,
        body: &[u8],
    ) -> Answer {
        let url = format!("{}{path}", self.url);
        let result = match method {
            "GET" => {
                let mut r = self.http.get(&url);
                if let Some(a) = auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            _ => {
                let mut r = self
                    .http
                    .post(&url)
                    .header("Content-Type", "application/json");
                if let Some(a) = auth {
                    r = r.header("Authorization", a);
                }
                r.send(body)
            }
        };
        let mut response = result.unwrap();
        Answer {
            status: response.status().as_u16(),
            body: response.body_mut().read_to_vec().unwrap(),
        }
    }

    /// A signed request whose connection may be cut off by the server
    /// (a body refused as it arrives): None if it was.
    pub(crate) fn try_signed(&self, method: &str, path: &str, body: &[u8]) -> Option<Answer> {
        let auth = request_auth::sign(&self.key, &self.host, method, path, now_ms(), body);
        let url = format!("{}{path}", self.url);
        match self
            .http
            .post(&url)
            .header("Authorization", auth)
            .send(body)
        {
            Ok(mut response) => Some(Answer {
                status: response.status().as_u16(),
                body: response.body_mut().read_to_vec().unwrap_or_default(),
            }),
            Err(ureq::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                None
            }
            Err(other) => panic!("{method} {path}: {other}"),
        }
    }

    pub(crate) fn signed(&self, method: &str, path: &str, body: &[u8]) -> Answer {
        self.signed_as(&self.key, now_ms(), method, path, body)
    }

    pub(crate) fn enroll(&self, token: &str, labels: &[(&str, &str)]) -> Answer {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let body = json!({"token": token, "host": self.host, "public_key": self.key.public().to_pem(), "labels": labels});
        self.raw("POST", "/v1/enroll", None, body.to_string().as_bytes())
    }

    pub(crate) fn hello_with(
        &self,
        range: turnout_proto::ProtoRange,
        labels: &[(&str, &str)],
    ) -> Answer {
        let hello = Hello {
            agent_version: "0.1.0".into(),
            proto_range: range,
            capabilities: CapabilitySet::all_known(),
            host: self.host.clone(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            facts: BTreeMap::new(),
        };
        self.signed("POST", "/v1/agent/hello", &encode(SUPPORTED.max(), &hello))
    }

    pub(crate) fn hello(&self) -> Answer {
        self.hello_with(SUPPORTED, &[("role", "web")])
    }

    /// Reports service `web` as committed on `self.committed`, or failed on `failed`.
    pub(crate) fn report(&mut self, failed: Option<(&ReleaseRef, &str)>) -> Answer {
        self.send_report(ServiceReport {
            last_outcome: failed.map(|(release, reason)| turnout_proto::messages::Outcome {
                kind: turnout_proto::messages::OutcomeKind::Reverted,
                release: release.clone(),
                reason: reason.into(),
                at_ms: now_ms(),
            }),
            ..self.idle()
        })
    }

    /// Reports that service `web` is reverting from `release`, its revert not done yet.
    pub(crate) fn report_reverting(&mut self, release: &ReleaseRef, why: &str) -> Answer {
        self.send_report(ServiceReport {
            state: ServiceState::Reverting,
            target: Some(release.clone()),
            health: Health::Unhealthy,
            last_error: Some(why.into()),
            ..self.idle()
        })
    }

    /// Service `web` at rest on `self.committed`.
    fn idle(&self) -> ServiceReport {
        ServiceReport {
            service: "web".parse().unwrap(),
            state: ServiceState::Idle,
            active_slot: None,
            committed: self.committed.clone(),
            other: None,
            target: None,
            health: Health::Healthy,
            last_outcome: None,
            last_error: None,
        }
    }

    /// Reports as a v2 agent whose desired state went stale at `since`
    /// (None: fresh), and why it refused the last one.
    pub(crate) fn report_stale(&mut self, since: Option<u64>, refused: Option<&str>) -> Answer {
        let service = self.idle();
        self.send_report_with(service, since, refused.map(str::to_owned))
    }

    /// Reports as a v2 agent that accepted desired state up to `index`.
    pub(crate) fn report_accepted(&mut self, index: u64) -> Answer {
        self.seq += 1;
        let report = Report {
            host: self.host.clone(),
            seq: self.seq,
            desired_index: self.converged,
            services: vec![self.idle()],
            stale_since_ms: None,
            desired_refused: None,
            trust_version: None,
            trust_refused: None,
            policy_version: None,
            policy_refused: None,
            accepted_index: Some(index),
        };
        self.signed(
            "POST",
            "/v1/agent/report",
            &encode(SUPPORTED.max(), &report),
        )
    }

    fn send_report(&mut self, service: ServiceReport) -> Answer {
        self.send_report_with(service, None, None)
    }

    fn send_report_with(
        &mut self,
        service: ServiceReport,
        stale_since_ms: Option<u64>,
        desired_refused: Option<String>,
    ) -> Answer {
        self.seq += 1;
        let report = Report {
            host: self.host.clone(),
            seq: self.seq,
            desired_index: self.converged,
            services: vec![service],
            stale_since_ms,
            desired_refused,
            trust_version: None,
            trust_refused: None,
            policy_version: None,
            policy_refused: None,
            accepted_index: None,
        };
        self.signed(
            "POST",
            "/v1/agent/report",
            &encode(SUPPORTED.max(), &report),
        )
    }

    pub(crate) fn desired(&self, index: u64, wait: &str) -> DesiredState {
        let answer = self.signed(
            "GET",
            &format!("/v1/agent/desired?index={index}&wait={wait}"),
            b"",
        );
        assert_eq!(answer.status, 200, "{}", answer.text());
        self.open_desired(&answer.body)
    }

    /// A desired-state answer as a v2 agent takes it: a signed document,
    /// checked against the director key (asked for as an agent enrolled
    /// before v2 would); a v1 answer as it is.
    pub(crate) fn open_desired(&self, body: &[u8]) -> DesiredState {
        let Ok(signed) = turnout_proto::decode::<turnout_proto::desired::SignedDesired>(body)
        else {
            return turnout_proto::decode::<DesiredState>(body).unwrap().body;
        };
        let directors = self.directors.get_or_init(|| self.directors());
        let (state, _) = turnout_proto::desired::accept(
            &signed.body,
            directors,
            &self.host,
            now_ms(),
            None,
            &turnout_proto::Limits::default(),
        )
        .unwrap_or_else(|refusal| panic!("the coordinator's own desired state: {refusal}"));
        state
    }

    /// The coordinator's director keys, as `GET /v1/agent/director` gives them.
    pub(crate) fn directors(
        &self,
    ) -> std::collections::BTreeMap<turnout_proto::keys::KeyId, turnout_proto::keys::PublicKey>
    {
        let answer = self.signed("GET", "/v1/agent/director", b"");
        assert_eq!(answer.status, 200, "{}", answer.text());
        let keys: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        keys["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|pem| {
                let key = turnout_proto::keys::PublicKey::from_pem(pem.as_str().unwrap()).unwrap();
                (key.id().clone(), key)
            })
            .collect()
    }

    /// Enrolls, says hello and reports the release it runs.
    pub(crate) fn join(
        url: &str,
        host: &str,
        seed: u8,
        token: &str,
        runs: &ReleaseRef,
    ) -> FakeAgent {
        let mut agent = FakeAgent::new(url, host, seed);
        assert_eq!(agent.enroll(token, &[("role", "web")]).status, 200);
        assert_eq!(agent.hello().status, 200);
        agent.committed = Some(runs.clone());
        assert_eq!(agent.report(None).status, 204);
        agent
    }
}

/// A trust file of [`release_key`] in `dir`, made by `turnout trust init`
/// as an operator would; returns its path.
pub(crate) fn trust_file(dir: &std::path::Path) -> std::path::PathBuf {
    let key = dir.join("k.pub.pem");
    std::fs::write(&key, release_key().public().to_pem()).unwrap();
    let trust = dir.join("trust.json");
    let made = std::process::Command::new(env!("CARGO_BIN_EXE_turnout"))
        .args(["trust", "init", "--key"])
        .arg(&key)
        .arg("--out")
        .arg(&trust)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    trust
}
