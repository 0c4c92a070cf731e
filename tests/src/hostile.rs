//! A hostile coordinator: a test double that holds a real director key and
//! answers agents as a compromised or impersonated coordinator would. It
//! speaks the agent's side of protocol v2 (enroll, hello, director key,
//! desired state, reports, bundles) over plain HTTP on 127.0.0.1, and its
//! desired-state answers are scripted: honest (signed afresh each time), or
//! a fixed body it replays forever: an older document, a frozen one, one
//! for another host, one signed by another key, one with a changed byte.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use serde_json::{Value, json};
use turnout_proto::desired::SignedDesired;
use turnout_proto::keys::SecretKey;
use turnout_proto::messages::{DesiredService, DesiredState, Welcome};
use turnout_proto::{Capability, CapabilitySet, HostId, ProtoVersion, encode};

/// What the double answers a desired-state poll with.
#[derive(Clone)]
pub enum Script {
    /// `state`, signed with the director key afresh at every answer.
    Honest(DesiredState),
    /// These exact bytes, whenever asked.
    Fixed(Vec<u8>),
}

struct Shared {
    director: SecretKey,
    expiry: Duration,
    script: Mutex<Script>,
    /// The last report each host sent, as JSON.
    reports: Mutex<HashMap<String, Value>>,
    /// Bundles by sha256.
    bundles: Mutex<HashMap<String, PathBuf>>,
    /// The release policy document it serves, if any.
    policy: Mutex<Option<String>>,
}

/// The double, serving on 127.0.0.1 until dropped.
pub struct Hostile {
    /// Its URL (`http://127.0.0.1:PORT`).
    pub url: String,
    shared: Arc<Shared>,
    _runtime: tokio::runtime::Runtime,
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> u64 {
    turnout_rt::clock::system_now_ms()
}

impl Hostile {
    /// Starts the double with its director key, the validity it gives
    /// honest answers, and the first script.
    pub fn start(director: SecretKey, expiry: Duration, script: Script) -> Hostile {
        let shared = Arc::new(Shared {
            director,
            expiry,
            script: Mutex::new(script),
            reports: Mutex::new(HashMap::new()),
            bundles: Mutex::new(HashMap::new()),
            policy: Mutex::new(None),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = Router::new()
            .route("/v1/enroll", post(enroll))
            .route("/v1/agent/hello", post(hello))
            .route("/v1/agent/director", get(director_keys))
            .route("/v1/agent/desired", get(answer_desired))
            .route("/v1/agent/report", post(report))
            .route("/v1/bundles/{sha}", get(bundle))
            .route("/v1/agent/policy", get(policy))
            .with_state(Arc::clone(&shared));
        runtime.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Hostile {
            url,
            shared,
            _runtime: runtime,
        }
    }

    /// Serves `bundle` (a file) at `/v1/bundles/{sha256}`.
    pub fn serve_bundle(&self, sha256: &str, bundle: PathBuf) {
        self.shared
            .bundles
            .lock()
            .unwrap()
            .insert(sha256.to_owned(), bundle);
    }

    /// Serves `document` as the release policy from now on.
    pub fn serve_policy(&self, document: String) {
        *self.shared.policy.lock().unwrap() = Some(document);
    }

    /// Answers desired-state polls by `script` from now on.
    pub fn script(&self, script: Script) {
        *self.shared.script.lock().unwrap() = script;
    }

    /// `state` signed by the director key, issued now, as the honest
    /// coordinator would answer it (an encoded v2 body).
    pub fn signed(&self, state: &DesiredState) -> Vec<u8> {
        self.signed_by(state, &self.shared.director)
    }

    /// `state` signed by `key`, issued now.
    pub fn signed_by(&self, state: &DesiredState, key: &SecretKey) -> Vec<u8> {
        let now = now_ms();
        let mut dated = state.clone();
        dated.issued_at_ms = Some(now);
        dated.expires_ms = Some(now + self.shared.expiry.as_millis() as u64);
        encode(ProtoVersion::V2, &SignedDesired::sign(&dated, key))
    }

    /// `state` signed by the director key with the issue and expiry times it carries.
    pub fn signed_as_is(&self, state: &DesiredState) -> Vec<u8> {
        encode(
            ProtoVersion::V2,
            &SignedDesired::sign(state, &self.shared.director),
        )
    }

    /// The last report `host` sent.
    pub fn report(&self, host: &str) -> Option<Value> {
        self.shared.reports.lock().unwrap().get(host).cloned()
    }
}

/// A desired state for `host` at `index` with one service.
pub fn desired(host: &str, index: u64, service: DesiredService) -> DesiredState {
    DesiredState {
        host: host.parse::<HostId>().unwrap(),
        index,
        services: vec![service],
        issued_at_ms: None,
        expires_ms: None,
        policy_version: None,
    }
}

async fn enroll(State(shared): State<Arc<Shared>>, body: Bytes) -> impl IntoResponse {
    let request: Value = serde_json::from_slice(&body).unwrap_or_default();
    axum::Json(json!({
        "host": request["host"],
        "director_key": shared.director.public().to_pem(),
    }))
}

async fn hello() -> impl IntoResponse {
    let welcome = Welcome {
        coordinator_version: "hostile".into(),
        capabilities: [Capability::LongPoll, Capability::SlotRollback]
            .into_iter()
            .collect::<CapabilitySet>(),
        report_interval_ms: 300,
    };
    (
        [("content-type", "application/json")],
        encode(ProtoVersion::V2, &welcome),
    )
}

async fn director_keys(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    axum::Json(json!({"keys": [shared.director.public().to_pem()]}))
}

async fn answer_desired(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    // A long poll with nothing new: the agent asks again at once otherwise.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let script = shared.script.lock().unwrap().clone();
    let body = match script {
        Script::Fixed(bytes) => bytes,
        Script::Honest(state) => {
            let now = now_ms();
            let mut dated = state;
            dated.issued_at_ms = Some(now);
            dated.expires_ms = Some(now + shared.expiry.as_millis() as u64);
            encode(
                ProtoVersion::V2,
                &SignedDesired::sign(&dated, &shared.director),
            )
        }
    };
    ([("content-type", "application/json")], body)
}

async fn report(State(shared): State<Arc<Shared>>, body: Bytes) -> impl IntoResponse {
    if let Ok(report) = serde_json::from_slice::<Value>(&body)
        && let Some(host) = report["host"].as_str()
    {
        shared
            .reports
            .lock()
            .unwrap()
            .insert(host.to_owned(), report.clone());
    }
    StatusCode::NO_CONTENT
}

async fn policy(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    axum::Json(json!({"policy": *shared.policy.lock().unwrap()}))
}

async fn bundle(State(shared): State<Arc<Shared>>, Path(sha): Path<String>) -> impl IntoResponse {
    let path = shared.bundles.lock().unwrap().get(&sha).cloned();
    match path.map(std::fs::read) {
        Some(Ok(bytes)) => (StatusCode::OK, bytes).into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}
