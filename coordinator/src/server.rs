//! The coordinator's HTTP API: thin routes over [`Coordinator`].
//!
//! | route                               | who           | what                               |
//! |-------------------------------------|---------------|------------------------------------|
//! | `POST /v1/enroll`                   | enroll token  | register a host and its key        |
//! | `POST /v1/agent/hello`              | signed host   | negotiate; `Welcome` or 409        |
//! | `GET  /v1/agent/desired?index&wait` | signed host   | long poll for desired state        |
//! | `POST /v1/agent/report`             | signed host   | per-service state                  |
//! | `GET  /v1/bundles/{sha256}`         | host / viewer | download, with `Range`             |
//! | `POST /v1/bundles`                  | operator      | push (verified against the trust)  |
//! | `GET  /v1/bundles`                  | viewer        | list                               |
//! | `GET  /v1/hosts`, `DELETE /v1/hosts/{id}` | viewer / admin | registry                   |
//! | `POST /v1/tokens`                   | admin         | operator or enrollment token       |
//! | `POST /v1/rollouts/plan`, `POST /v1/rollouts` | viewer / operator | plan, start        |
//! | `GET  /v1/rollouts[/{id}]`          | viewer        | list, one                          |
//! | `POST /v1/rollouts/{id}/{command}`  | operator      | pause, resume, promote, abort, rollback |
//! | `GET  /v1/events?after&rollout&wait`| viewer        | the event log (long poll to follow) |
//! | `GET  /metrics`                     | anyone        | Prometheus text                    |
//!
//! Hosts sign every request (`turnout_proto::request_auth`); the server
//! refuses unknown hosts, bad signatures, stale timestamps and replays, and
//! counts each refusal. Operators send `Authorization: Bearer TOKEN`; a token
//! of too low a role gets 403 naming the role needed.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use turnout_proto::messages::{ErrorBody, ErrorCode, Hello, Incompatible, Report, Welcome};
use turnout_proto::request_auth::HostAuth;
use turnout_proto::{Envelope, HostId, Limits, Reader, SUPPORTED, encode, negotiate};

use crate::coordinator::{ApiError, Coordinator, now_ms};
use crate::engine::Input;
use crate::spec::RawSpec;
use crate::store::{BundleRecord, Role};

type Shared = Arc<Coordinator>;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = encode(
            SUPPORTED.max(),
            &ErrorBody {
                code: self.code,
                message: self.message,
            },
        );
        (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
    }
}

fn json(value: &impl serde::Serialize) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(value).expect("responses serialise"),
    )
        .into_response()
}

/// The API router.
pub fn router(coordinator: Shared) -> Router {
    Router::new()
        .route("/v1/enroll", post(enroll))
        .route("/v1/agent/hello", post(hello))
        .route("/v1/agent/desired", get(desired))
        .route("/v1/agent/report", post(report))
        .route("/v1/bundles", get(list_bundles).post(push_bundle))
        .route("/v1/bundles/{sha256}", get(get_bundle))
        .route("/v1/hosts", get(list_hosts))
        .route("/v1/hosts/{id}", axum::routing::delete(forget_host))
        .route("/v1/tokens", post(create_token))
        .route("/v1/rollouts", get(list_rollouts).post(start_rollout))
        .route("/v1/rollouts/plan", post(plan_rollout))
        .route("/v1/rollouts/{id}", get(get_rollout))
        .route("/v1/rollouts/{id}/{command}", post(command_rollout))
        .route("/v1/events", get(events))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(coordinator.clone(), measure))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(coordinator)
}

async fn measure(State(c): State<Shared>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    c.metrics
        .request(&route, response.status().as_u16(), started.elapsed());
    response
}

/// Serves the API on `listener` until `shutdown`, with the rollout loop beside it.
pub async fn serve(
    coordinator: Shared,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let engine = {
        let c = coordinator.clone();
        let mut rx = stop_rx.clone();
        tokio::spawn(async move {
            c.run_rollouts(async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await;
        })
    };
    let c = coordinator.clone();
    if let Ok(address) = listener.local_addr() {
        turnout_agent::notify::notify(&format!(
            "READY=1\nSTATUS=coordinator listening on {address}"
        ));
    }
    let watchdog = tokio::spawn(turnout_agent::notify::keep_watchdog());
    let freeze = tokio::spawn(turnout_agent::notify::freeze_switch());
    let result = axum::serve(listener, router(coordinator))
        .with_graceful_shutdown(async move {
            shutdown.await;
            // Parked long polls answer now, so shutdown does not wait out their waits.
            c.stop_waiting();
            let _ = stop_tx.send(true);
        })
        .await;
    turnout_agent::notify::notify("STOPPING=1");
    watchdog.abort();
    freeze.abort();
    let _ = engine.await;
    result
}

// ---- authentication ----

fn operator(c: &Coordinator, headers: &HeaderMap, need: Role) -> Result<Role, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            c.metrics.auth_failure("operator_missing");
            ApiError::unauthorized("no operator token: pass --token or set TURNOUT_TOKEN (`turnout serve --init` prints the first admin token)")
        })?;
    let role = c.with_store(|s| s.token_role(token))?.ok_or_else(|| {
        c.metrics.auth_failure("operator_unknown");
        ApiError::unauthorized("the operator token is not known")
    })?;
    if role < need {
        c.metrics.auth_failure("operator_role");
        return Err(ApiError {
            status: 403,
            code: ErrorCode::Forbidden,
            message: format!(
                "this needs role {}; the token has role {}",
                need.name(),
                role.name()
            ),
        });
    }
    Ok(role)
}

fn actor(role: Role) -> String {
    format!("operator:{}", role.name())
}

fn authenticate_host(
    c: &Coordinator,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<HostId, ApiError> {
    let refuse = |reason: &'static str, message: String| {
        c.metrics.auth_failure(reason);
        ApiError::unauthorized(message)
    };
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            refuse(
                "host_missing",
                "no Turnout-Host authorization header".into(),
            )
        })?;
    let auth = HostAuth::parse(value).map_err(|e| refuse("host_malformed", e.to_string()))?;
    let now = now_ms();
    let window = c.settings().freshness.as_millis() as u64;
    if now.abs_diff(auth.ts_ms) > window {
        return Err(refuse(
            "host_stale",
            format!(
                "the request's timestamp is {} ms from the coordinator's clock, more than the {window} ms allowed; check the host's clock (NTP)",
                now.abs_diff(auth.ts_ms)
            ),
        ));
    }
    let key = c.host_key(auth.host.as_str())?.ok_or_else(|| {
        refuse(
            "host_unknown",
            format!(
                "host {} is not enrolled; enroll it with `turnout-agent enroll`",
                auth.host
            ),
        )
    })?;
    let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    if !auth.verifies(&key, method.as_str(), path, body) {
        return Err(refuse(
            "host_signature",
            format!(
                "the request's signature does not verify with host {}'s enrolled key",
                auth.host
            ),
        ));
    }
    if !c.first_use(&auth.sig.0, auth.ts_ms, now) {
        return Err(refuse(
            "host_replay",
            "this signed request was already received (a replay)".into(),
        ));
    }
    Ok(auth.host)
}

// ---- agents ----

#[derive(Deserialize)]
struct EnrollRequest {
    token: String,
    host: HostId,
    public_key: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

async fn enroll(State(c): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let request: EnrollRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!("expected {{token, host, public_key, labels}}: {e}"))
    })?;
    turnout_proto::keys::PublicKey::from_pem(&request.public_key)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let result = c.with_store(|s| {
        s.enroll(
            &request.token,
            &request.host,
            &request.public_key,
            &request.labels,
            now_ms(),
        )
    })?;
    if let Err(refusal) = result {
        c.metrics.auth_failure("enroll");
        return Err(ApiError::unauthorized(refusal.to_string()));
    }
    c.forget_key(request.host.as_str());
    c.log(
        &format!("host:{}", request.host),
        None,
        Some(request.host.as_str()),
        "enrolled",
    )?;
    Ok(json(&serde_json::json!({"host": request.host})))
}

async fn hello(
    State(c): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let host = authenticate_host(&c, &method, &uri, &headers, &body)?;
    let Envelope { body: hello, .. } = Reader::default()
        .decode::<Hello>(&body)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    if hello.host != host {
        return Err(ApiError::bad_request(format!(
            "the hello names host {} but was signed by {host}",
            hello.host
        )));
    }
    let offer = crate::offer();
    match negotiate(&hello.offer(), &offer) {
        Ok(agreed) => {
            c.with_store(|s| {
                s.record_hello(
                    &host,
                    &hello.agent_version,
                    &hello.labels,
                    Some((agreed.version.get(), &agreed.capabilities)),
                    None,
                    now_ms(),
                )
            })?;
            c.hello_agreed(host.as_str(), Some(&agreed.capabilities));
            let welcome = Welcome {
                coordinator_version: crate::VERSION.into(),
                capabilities: agreed.capabilities,
                report_interval_ms: c.settings().report_interval.as_millis() as u64,
            };
            Ok((
                [(header::CONTENT_TYPE, "application/json")],
                encode(agreed.version, &welcome),
            )
                .into_response())
        }
        Err(incompatible) => {
            let text = incompatible.to_string();
            c.with_store(|s| {
                s.record_hello(
                    &host,
                    &hello.agent_version,
                    &hello.labels,
                    None,
                    Some(&text),
                    now_ms(),
                )
            })?;
            c.hello_agreed(host.as_str(), None);
            c.log(
                &format!("host:{host}"),
                None,
                Some(host.as_str()),
                &format!("refused: {text}"),
            )?;
            let body: Incompatible = incompatible;
            Ok((
                StatusCode::CONFLICT,
                [(header::CONTENT_TYPE, "application/json")],
                encode(SUPPORTED.min(), &body),
            )
                .into_response())
        }
    }
}

/// A long poll's `wait=` (a duration like `30s`), capped at `max`; none is zero.
fn wait_param(text: Option<&String>, max: Duration) -> Result<Duration, ApiError> {
    let Some(text) = text else {
        return Ok(Duration::ZERO);
    };
    let wait = humantime::parse_duration(text).map_err(|e| {
        ApiError::bad_request(format!("wait={text:?}: expected a duration like 30s ({e})"))
    })?;
    Ok(wait.min(max))
}

#[derive(Deserialize)]
struct DesiredQuery {
    #[serde(default)]
    index: u64,
    wait: Option<String>,
}

async fn desired(
    State(c): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(query): Query<DesiredQuery>,
) -> Result<Response, ApiError> {
    let host = authenticate_host(&c, &method, &uri, &headers, b"")?;
    let now = now_ms();
    c.queue_seen(host.as_str(), now, query.index);
    let current = c.desired(&host)?;
    // Only an agent that agreed to long polls is kept waiting.
    let long_poll = c.long_polls(host.as_str())?;
    let wait = wait_param(
        query.wait.as_ref().filter(|_| long_poll),
        c.settings().max_wait,
    )?;
    if current.index <= query.index && !wait.is_zero() {
        let mut changes = c.watch_desired(host.as_str(), current.index);
        tokio::select! {
            _ = tokio::time::timeout(wait, changes.wait_for(|index| *index > query.index)) => {}
            () = c.stopped() => {}
        }
    }
    let state = c.desired(&host)?;
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        encode(SUPPORTED.max(), &*state),
    )
        .into_response())
}

async fn report(
    State(c): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let host = authenticate_host(&c, &method, &uri, &headers, &body)?;
    let decoded = Reader::default().decode::<Report>(&body);
    let report = match decoded {
        Ok(envelope) => envelope.body,
        Err(err) => {
            c.metrics.bad_report();
            let status = if matches!(err, turnout_proto::DecodeError::TooLarge { .. }) {
                413
            } else {
                400
            };
            return Err(ApiError {
                status,
                code: if status == 413 {
                    ErrorCode::TooLarge
                } else {
                    ErrorCode::BadRequest
                },
                message: err.to_string(),
            });
        }
    };
    if report.host != host {
        c.metrics.bad_report();
        return Err(ApiError::bad_request(format!(
            "the report names host {} but was signed by {host}",
            report.host
        )));
    }
    c.queue_report(report, now_ms());
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ---- bundles ----

async fn push_bundle(
    State(c): State<Shared>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let role = operator(&c, &headers, Role::Operator)?;
    let limit = Limits::default().max_bundle_bytes;
    let temp = c
        .bundles_dir()
        .join(format!(".push-{}-{}", std::process::id(), now_ms()));
    let mut file = std::fs::File::create(&temp).map_err(|e| ApiError {
        status: 500,
        code: ErrorCode::Internal,
        message: e.to_string(),
    })?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut stream = body.into_data_stream();
    use futures_util_lite::next;
    while let Some(chunk) = next(&mut stream).await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("reading the upload: {e}")))?;
        size += chunk.len() as u64;
        if size > limit {
            let _ = std::fs::remove_file(&temp);
            return Err(ApiError {
                status: 413,
                code: ErrorCode::TooLarge,
                message: format!("the bundle is over the limit of {limit} bytes"),
            });
        }
        hasher.update(&chunk);
        file.write_all(&chunk).map_err(|e| ApiError {
            status: 500,
            code: ErrorCode::Internal,
            message: e.to_string(),
        })?;
    }
    drop(file);
    let sha256 = turnout_proto::Digest::from_bytes(hasher.finalize().into());
    let trust = c.trust().clone();
    let check = temp.clone();
    let verified = tokio::task::spawn_blocking(move || {
        let reader = std::io::BufReader::new(std::fs::File::open(&check)?);
        turnout_proto::bundle::verify_and_unpack(
            reader,
            &trust,
            std::time::SystemTime::now(),
            &Limits::default(),
            &mut turnout_proto::bundle::Discard,
        )
        .map_err(|e| std::io::Error::other(e.to_string()))
    })
    .await
    .expect("verification does not panic");
    let verified = match verified {
        Ok(v) => v,
        Err(err) => {
            let _ = std::fs::remove_file(&temp);
            return Err(ApiError {
                status: 422,
                code: ErrorCode::BadRequest,
                message: format!("bundle refused: {err}"),
            });
        }
    };
    std::fs::rename(&temp, c.bundle_path(sha256.as_str())).map_err(|e| ApiError {
        status: 500,
        code: ErrorCode::Internal,
        message: e.to_string(),
    })?;
    let record = BundleRecord {
        sha256: sha256.to_string(),
        name: verified.manifest.name.to_string(),
        version: verified.manifest.version.to_string(),
        size,
        created_ms: now_ms(),
    };
    c.with_store(|s| s.add_bundle(&record))?;
    c.log(
        &actor(role),
        None,
        None,
        &format!(
            "bundle pushed: {} {} ({sha256})",
            record.name, record.version
        ),
    )?;
    Ok((StatusCode::CREATED, json(&record)).into_response())
}

async fn list_bundles(State(c): State<Shared>, headers: HeaderMap) -> Result<Response, ApiError> {
    operator(&c, &headers, Role::Viewer)?;
    Ok(json(&c.with_store(|s| s.bundles())?))
}

async fn get_bundle(
    State(c): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path(sha256): Path<String>,
) -> Result<Response, ApiError> {
    let is_host = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(turnout_proto::request_auth::SCHEME));
    if is_host {
        authenticate_host(&c, &method, &uri, &headers, b"")?;
    } else {
        operator(&c, &headers, Role::Viewer)?;
    }
    let digest: turnout_proto::Digest = sha256
        .parse()
        .map_err(|e: turnout_proto::IdError| ApiError::bad_request(e.to_string()))?;
    let path = c.bundle_path(digest.as_str());
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(|_| ApiError::not_found(format!("no bundle {digest} in the store")))?;
    let size = file
        .metadata()
        .await
        .map_err(|e| ApiError {
            status: 500,
            code: ErrorCode::Internal,
            message: e.to_string(),
        })?
        .len();
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(|r| parse_range(r, size));
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, size),
        Some(Some((start, end))) => (StatusCode::PARTIAL_CONTENT, start, end),
        Some(None) => {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{size}"))],
            )
                .into_response());
        }
    };
    file.seek(std::io::SeekFrom::Start(start))
        .await
        .map_err(|e| ApiError {
            status: 500,
            code: ErrorCode::Internal,
            message: e.to_string(),
        })?;
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file.take(end - start)));
    let mut response = (
        status,
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::ACCEPT_RANGES, "bytes".to_owned()),
            (header::CONTENT_LENGTH, (end - start).to_string()),
        ],
        body,
    )
        .into_response();
    if status == StatusCode::PARTIAL_CONTENT {
        response.headers_mut().insert(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", end - 1)
                .parse()
                .expect("a valid header"),
        );
    }
    Ok(response)
}

/// `bytes=A-B`, `bytes=A-`, `bytes=-N` → [start, end); `None` if unsatisfiable.
fn parse_range(value: &str, size: u64) -> Option<(u64, u64)> {
    let spec = value.strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            (size.saturating_sub(n), size)
        }
        (a, "") => (a.parse().ok()?, size),
        (a, b) => (
            a.parse().ok()?,
            b.parse::<u64>().ok()?.saturating_add(1).min(size),
        ),
    };
    (start < end && start < size).then_some((start, end))
}

// ---- registry and tokens ----

#[derive(Deserialize)]
struct HostsQuery {
    selector: Option<String>,
}

async fn list_hosts(
    State(c): State<Shared>,
    headers: HeaderMap,
    Query(query): Query<HostsQuery>,
) -> Result<Response, ApiError> {
    operator(&c, &headers, Role::Viewer)?;
    let selector = crate::spec::parse_selector(query.selector.as_deref().unwrap_or_default())
        .map_err(|why| ApiError::bad_request(format!("selector: {why}")))?;
    c.flush()?;
    let now = now_ms();
    let hosts: Vec<serde_json::Value> = c
        .with_store(|s| s.hosts())?
        .into_iter()
        .filter(|h| selector.iter().all(|(k, v)| h.labels.get(k) == Some(v)))
        .map(|h| {
            let state = if h.incompatible.is_some() {
                "incompatible"
            } else if c.online(&h, now) {
                "online"
            } else {
                "offline"
            };
            let mut value = serde_json::to_value(&h).expect("hosts serialise");
            value["state"] = state.into();
            value
        })
        .collect();
    Ok(json(&hosts))
}

async fn forget_host(
    State(c): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let role = operator(&c, &headers, Role::Admin)?;
    c.forget_key(&id);
    if !c.with_store(|s| s.forget_host(&id))? {
        return Err(ApiError::not_found(format!("no host {id}")));
    }
    c.log(&actor(role), None, Some(&id), "forgotten")?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct TokenRequest {
    #[serde(default)]
    enroll: bool,
    role: Option<String>,
    ttl_secs: Option<u64>,
    uses: Option<u32>,
}

async fn create_token(
    State(c): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let role = operator(&c, &headers, Role::Admin)?;
    let request: TokenRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!("expected {{enroll, role, ttl_secs, uses}}: {e}"))
    })?;
    let now = now_ms();
    let token = if request.enroll {
        let ttl = request.ttl_secs.unwrap_or(3600) * 1000;
        c.with_store(|s| s.create_enroll_token(ttl, request.uses.unwrap_or(1), now))?
    } else {
        let wanted = request.role.as_deref().unwrap_or("viewer");
        let new_role = Role::parse(wanted).ok_or_else(|| {
            ApiError::bad_request(format!(
                "role {wanted:?}: expected viewer, operator or admin"
            ))
        })?;
        c.with_store(|s| s.create_token(new_role, now))?
    };
    c.log(
        &actor(role),
        None,
        None,
        if request.enroll {
            "enrollment token created"
        } else {
            "operator token created"
        },
    )?;
    Ok((
        StatusCode::CREATED,
        json(&serde_json::json!({"token": token})),
    )
        .into_response())
}

// ---- rollouts and events ----

#[derive(Deserialize)]
struct StartRequest {
    spec: RawSpec,
    id: Option<String>,
}

async fn plan_rollout(
    State(c): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    operator(&c, &headers, Role::Viewer)?;
    let request: StartRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("expected {{spec, id}}: {e}")))?;
    Ok(json(&c.plan(&request.spec, request.id)?))
}

async fn start_rollout(
    State(c): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let role = operator(&c, &headers, Role::Operator)?;
    let request: StartRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("expected {{spec, id}}: {e}")))?;
    let rollout = c.start(&request.spec, request.id, &actor(role))?;
    Ok((StatusCode::CREATED, json(&rollout)).into_response())
}

async fn list_rollouts(State(c): State<Shared>, headers: HeaderMap) -> Result<Response, ApiError> {
    operator(&c, &headers, Role::Viewer)?;
    Ok(json(&c.rollouts()?))
}

async fn get_rollout(
    State(c): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    operator(&c, &headers, Role::Viewer)?;
    Ok(json(&c.rollout(&id)?))
}

#[derive(Deserialize, Default)]
struct CommandBody {
    #[serde(default)]
    all_at_once: bool,
}

async fn command_rollout(
    State(c): State<Shared>,
    headers: HeaderMap,
    Path((id, command)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let role = operator(&c, &headers, Role::Operator)?;
    let options: CommandBody = if body.is_empty() {
        CommandBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(e.to_string()))?
    };
    let input = match command.as_str() {
        "pause" => Input::Pause,
        "resume" => Input::Resume,
        "promote" => Input::Promote,
        "abort" => Input::Abort,
        "rollback" => Input::Rollback {
            all_at_once: options.all_at_once,
        },
        other => {
            return Err(ApiError::not_found(format!(
                "no command {other:?}; expected pause, resume, promote, abort or rollback"
            )));
        }
    };
    Ok(json(&c.step(&id, input, &actor(role))?))
}

#[derive(Deserialize)]
struct EventsQuery {
    #[serde(default)]
    after: u64,
    rollout: Option<String>,
    wait: Option<String>,
}

async fn events(
    State(c): State<Shared>,
    headers: HeaderMap,
    Query(query): Query<EventsQuery>,
) -> Result<Response, ApiError> {
    operator(&c, &headers, Role::Viewer)?;
    let wait = wait_param(query.wait.as_ref(), c.settings().max_wait)?;
    let mut changes = c.watch_events();
    let mut found = c.with_store(|s| s.events(query.after, query.rollout.as_deref(), 1000))?;
    let deadline = tokio::time::Instant::now() + wait;
    while found.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::select! {
            changed = tokio::time::timeout_at(deadline, changes.changed()) => {
                if changed.is_err() {
                    break;
                }
            }
            () = c.stopped() => break,
        }
        found = c.with_store(|s| s.events(query.after, query.rollout.as_deref(), 1000))?;
    }
    Ok(json(&found))
}

async fn metrics(State(c): State<Shared>) -> Result<Response, ApiError> {
    c.flush()?;
    let now = now_ms();
    let hosts = c.with_store(|s| s.hosts())?;
    let rollouts = c.rollouts()?;
    let mut gauges: Vec<crate::metrics::Gauge<'_>> = Vec::new();
    let mut by_state: BTreeMap<&str, f64> = BTreeMap::new();
    let mut by_version: BTreeMap<(String, String), f64> = BTreeMap::new();
    for h in &hosts {
        let state = if h.incompatible.is_some() {
            "incompatible"
        } else if c.online(h, now) {
            "online"
        } else {
            "offline"
        };
        *by_state.entry(state).or_default() += 1.0;
        let key = (
            h.agent_version.clone().unwrap_or_else(|| "unknown".into()),
            h.proto.map_or("none".into(), |p| p.to_string()),
        );
        *by_version.entry(key).or_default() += 1.0;
    }
    for state in ["online", "offline", "incompatible"] {
        gauges.push((
            "turnout_hosts",
            vec![("state", state.into())],
            by_state.get(state).copied().unwrap_or(0.0),
        ));
    }
    for ((version, proto), n) in by_version {
        gauges.push((
            "turnout_hosts_by_agent",
            vec![("agent_version", version), ("proto", proto)],
            n,
        ));
    }
    let mut rollout_states: BTreeMap<&str, f64> = BTreeMap::new();
    for r in &rollouts {
        *rollout_states.entry(r.state.name()).or_default() += 1.0;
        if !r.state.is_finished() {
            let mut phases: BTreeMap<String, f64> = BTreeMap::new();
            for h in r.hosts.values() {
                let name = serde_json::to_value(&h.phase)
                    .ok()
                    .and_then(|v| v["phase"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                *phases.entry(name).or_default() += 1.0;
            }
            for (phase, n) in phases {
                gauges.push((
                    "turnout_rollout_hosts",
                    vec![("rollout", r.id.clone()), ("phase", phase)],
                    n,
                ));
            }
        }
    }
    for (state, n) in rollout_states {
        gauges.push(("turnout_rollouts", vec![("state", state.into())], n));
    }
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        c.metrics.render(&gauges),
    )
        .into_response())
}

/// The one stream helper the push handler needs, without a futures dependency.
mod futures_util_lite {
    use std::pin::Pin;

    use axum::body::BodyDataStream;

    /// The next chunk of a body stream.
    pub(super) async fn next(
        stream: &mut BodyDataStream,
    ) -> Option<Result<axum::body::Bytes, axum::Error>> {
        std::future::poll_fn(|cx| http_body_poll(Pin::new(&mut *stream), cx)).await
    }

    fn http_body_poll(
        stream: Pin<&mut BodyDataStream>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<axum::body::Bytes, axum::Error>>> {
        use futures_core::Stream;
        stream.poll_next(cx)
    }
}
