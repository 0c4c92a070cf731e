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
//! | `GET  /v1/auth?role=R`              | any token     | 204 if the token has role R        |
//! | `POST /v1/rollouts/plan`, `POST /v1/rollouts` | viewer / operator | plan, start        |
//! | `GET  /v1/rollouts[/{id}]`          | viewer        | list, one                          |
//! | `POST /v1/rollouts/{id}/{command}`  | operator      | pause, resume, promote, abort, rollback |
//! | `GET  /v1/events?after&rollout&wait`| viewer        | the event log (long poll to follow) |
//! | `GET  /metrics`                     | viewer (or anyone with `--metrics-public`; `--metrics-listen` serves it apart) | Prometheus text |
//!
//! Hosts sign every request (`turnout_proto::request_auth`); the server
//! refuses unknown hosts, bad signatures, stale timestamps and replays, and
//! counts each refusal. Operators send `Authorization: Bearer TOKEN`; a token
//! of too low a role gets 403 naming the role needed.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
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
use turnout_proto::{Envelope, HostId, Limits, ProtoVersion, Reader, SUPPORTED, encode, negotiate};

use crate::coordinator::{ApiError, Coordinator};
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
        let mut response =
            (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        if status == StatusCode::UNAUTHORIZED {
            // RFC 9110: a 401 names the scheme it wants.
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"turnout\""),
            );
        }
        response
    }
}

/// Every failure answers with an ErrorBody, an unknown path too.
async fn no_route(request: Request) -> ApiError {
    ApiError::not_found(format!(
        "no such API path: {} {} (the API is under /v1; see docs/protocol.md)",
        request.method(),
        request.uri().path()
    ))
}

async fn wrong_method(request: Request) -> ApiError {
    ApiError {
        status: 405,
        code: ErrorCode::BadRequest,
        message: format!(
            "{} is not a method of {} (see docs/protocol.md)",
            request.method(),
            request.uri().path()
        ),
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
        .route("/v1/agent/ca", get(agent_ca))
        .route("/v1/agent/director", get(agent_director))
        .route("/v1/agent/trust", get(agent_trust))
        .route("/v1/trust", get(show_trust).post(push_trust))
        .route("/v1/agent/policy", get(agent_policy))
        .route("/v1/policy", get(show_policy).post(push_policy))
        .route("/v1/bundles", get(list_bundles).post(push_bundle))
        .route("/v1/bundles/{sha256}", get(get_bundle))
        .route("/v1/hosts", get(list_hosts))
        .route("/v1/hosts/{id}", axum::routing::delete(forget_host))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{name}", axum::routing::delete(revoke_token))
        .route("/v1/hosts/{id}/labels", post(label_host))
        .route("/v1/auth", get(check_role))
        .route("/v1/rollouts", get(list_rollouts).post(start_rollout))
        .route("/v1/rollouts/plan", post(plan_rollout))
        .route("/v1/rollouts/{id}", get(get_rollout))
        .route("/v1/rollouts/{id}/{command}", post(command_rollout))
        .route("/v1/events", get(events))
        .route("/metrics", get(metrics))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(middleware::from_fn_with_state(
            coordinator.clone(),
            bounded_body,
        ))
        .layer(middleware::from_fn_with_state(coordinator.clone(), measure))
        // Bodies read whole (`Bytes`, `Json`) are refused past this as they
        // arrive; a bundle push streams to disk under its own limit.
        .layer(axum::extract::DefaultBodyLimit::max(
            Limits::default().max_body_bytes,
        ))
        .with_state(coordinator)
}

/// Every body a handler reads whole is bounded before the handler runs: a
/// declared length over the limit is refused at once (413), and the body is
/// read with the limit and `body_timeout`, so a client that never sends it
/// cannot hold a connection. The bundle push (which streams to disk under
/// its own limit and idle timeout) and the signed agent routes (which check
/// the host's headers before reading) bound theirs themselves.
async fn bounded_body(State(c): State<Shared>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let own_bounds = (request.method() == Method::POST && path == "/v1/bundles")
        || path == "/v1/agent/hello"
        || path == "/v1/agent/report";
    if own_bounds {
        return next.run(request).await;
    }
    let limit = Limits::default().max_body_bytes;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return ApiError {
            status: 413,
            code: ErrorCode::TooLarge,
            message: format!(
                "the request body is {} bytes, over the limit of {limit} bytes",
                declared.unwrap_or_default()
            ),
        }
        .into_response();
    }
    let (parts, body) = request.into_parts();
    match read_body(&c, body).await {
        Ok(bytes) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Err(err) => err.into_response(),
    }
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
///
/// Each connection gets `header_timeout` to send a request's headers (which
/// also closes kept-alive connections idle that long), at most
/// `max_connections` are served at once, and shutdown waits at most
/// `shutdown_grace` for requests in flight: a slow or half-sent request
/// can neither pin a connection nor keep a stopped coordinator alive.
pub async fn serve(
    coordinator: Shared,
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
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
    if let Ok(address) = listener.local_addr() {
        turnout_rt::notify::notify(&format!(
            "READY=1\nSTATUS=coordinator listening on {address}"
        ));
    }
    let watchdog = {
        let c = coordinator.clone();
        tokio::spawn(turnout_rt::notify::keep_watchdog_while(move |period| {
            c.loop_alive(period)
        }))
    };
    let freeze = tokio::spawn(turnout_rt::notify::freeze_switch());
    let settings = coordinator.settings();
    let service = hyper_util::service::TowerToHyperService::new(router(coordinator.clone()));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(settings.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .keep_alive(true);
    let mut last_complaint: Option<Instant> = None;
    let handshaking = Arc::new(std::sync::Mutex::new(HashMap::new()));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors, most often: say so, and give
                // finishing connections a moment to free some.
                complain(
                    &mut last_complaint,
                    &format!("accepting a connection: {err}"),
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            coordinator.metrics.connection_refused();
            complain(
                &mut last_complaint,
                &format!(
                    "refusing a connection from {peer}: {} connections are open, the most allowed (max_connections)",
                    settings.max_connections
                ),
            );
            drop(stream);
            continue;
        };
        // Every request carries the address it came from (for the log
        // lines of refused credentials).
        let service = {
            let service = service.clone();
            hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(Peer(peer));
                hyper::service::Service::call(&service, request)
            })
        };
        let Some(acceptor) = tls.clone() else {
            let connection = graceful
                .watch(http.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
            tokio::spawn(async move {
                let _ = connection.await;
                drop(slot);
            });
            continue;
        };
        // The handshake runs on the connection's own task, bounded by the
        // header timeout: a client that never finishes one holds only its
        // slot, for that long, and never the accept loop.
        // One source may hold only so many connections in their handshake:
        // a client that opens thousands and finishes none must not take
        // every connection slot from agents and operators.
        let Some(in_handshake) = Handshaking::enter(&handshaking, peer.ip()) else {
            coordinator.metrics.tls_failure("too_many_handshakes");
            complain(
                &mut last_complaint,
                &format!(
                    "refusing a connection from {}: {MAX_HANDSHAKES_PER_SOURCE} of its connections are in their TLS handshake already",
                    peer.ip()
                ),
            );
            drop(stream);
            continue;
        };
        let (watcher, http, c) = (graceful.watcher(), http.clone(), coordinator.clone());
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(
                settings.header_timeout.min(HANDSHAKE_TIMEOUT),
                handshake(&acceptor, stream),
            )
            .await;
            drop(in_handshake);
            let stream = match handshake {
                Ok(Ok(stream)) => stream,
                Ok(Err(reason)) => {
                    c.metrics.tls_failure(reason);
                    return;
                }
                Err(_) => {
                    c.metrics.tls_failure("timeout");
                    return;
                }
            };
            let connection =
                watcher.watch(http.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
            let _ = connection.await;
            drop(slot);
        });
    }
    // Parked long polls answer now, so shutdown does not wait out their waits.
    coordinator.stop_waiting();
    let _ = stop_tx.send(true);
    if tokio::time::timeout(settings.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "stopping with requests still in flight after {} (shutdown_grace)",
            humantime::format_duration(settings.shutdown_grace)
        );
    }
    turnout_rt::notify::notify("STOPPING=1");
    watchdog.abort();
    freeze.abort();
    let _ = engine.await;
    Ok(())
}

/// The most connections one source address may have in their TLS
/// handshake at once (10,000 agents behind one NAT reconnect spread out by
/// their jittered backoff, far below this).
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 256;

/// The longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections in their handshake, by source address; a place is held
/// until the guard drops.
type HandshakeCounts = Arc<std::sync::Mutex<HashMap<std::net::IpAddr, usize>>>;

struct Handshaking {
    counts: HandshakeCounts,
    source: std::net::IpAddr,
}

impl Handshaking {
    fn enter(counts: &HandshakeCounts, source: std::net::IpAddr) -> Option<Handshaking> {
        let mut map = counts.lock().expect("not poisoned");
        let count = map.entry(source).or_insert(0);
        if *count >= MAX_HANDSHAKES_PER_SOURCE {
            return None;
        }
        *count += 1;
        Some(Handshaking {
            counts: Arc::clone(counts),
            source,
        })
    }
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        let mut map = self.counts.lock().expect("not poisoned");
        if let Some(count) = map.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.source);
            }
        }
    }
}

/// A TLS handshake on a new connection. A client that speaks plain HTTP
/// to a TLS port gets a plain answer that says to use https (the first byte
/// of a TLS connection is 0x16, a handshake record; no HTTP method starts so).
async fn handshake(
    acceptor: &tokio_rustls::TlsAcceptor,
    stream: tokio::net::TcpStream,
) -> Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, &'static str> {
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await {
        Ok(1) if first[0] != 0x16 => {
            refuse_plain_http(stream).await;
            return Err("plain_http");
        }
        Ok(1) => {}
        _ => return Err("handshake"),
    }
    acceptor.accept(stream).await.map_err(|err| {
        tracing::debug!("a TLS handshake failed: {err}");
        "handshake"
    })
}

/// Answers a plain-HTTP request on the TLS port with a 400 that says what to do.
async fn refuse_plain_http(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt as _;
    let body = encode(
        SUPPORTED.max(),
        &ErrorBody {
            code: ErrorCode::BadRequest,
            message: "this coordinator speaks TLS: use an https:// URL (or start `turnout serve` with --plaintext \
                      behind a proxy that terminates TLS)"
                .into(),
        },
    );
    let head = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    // Best effort: the client may already be gone.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        stream.shutdown().await
    })
    .await;
}

/// Logs `message`, at most once every ten seconds: a flood of refused
/// connections must not become a flood of log lines.
fn complain(last: &mut Option<Instant>, message: &str) {
    if last.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
        *last = Some(Instant::now());
        tracing::warn!("{message}");
    }
}

// ---- authentication ----

/// Who called: an operator token's name and role.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    /// The token's name.
    pub(crate) name: String,
    /// Its role.
    pub(crate) role: Role,
}

/// The address a request came from (set per connection by [`serve`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub(crate) std::net::SocketAddr);

/// Counts a refused operator credential and logs it with where it came
/// from, at most once every ten seconds (with how many were not logged).
fn refuse_operator(
    c: &Coordinator,
    peer: Option<Peer>,
    reason: &'static str,
    error: ApiError,
) -> ApiError {
    c.metrics.auth_failure(reason);
    let from = peer.map_or_else(|| "an unknown address".to_owned(), |p| p.0.ip().to_string());
    c.auth_complaint(&format!(
        "refused an operator request from {from}: {}",
        error.message
    ));
    error
}

fn operator(
    c: &Coordinator,
    headers: &HeaderMap,
    peer: Option<Peer>,
    need: Role,
) -> Result<Caller, ApiError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(if headers.contains_key(header::AUTHORIZATION) {
            refuse_operator(
                c,
                peer,
                "operator_malformed",
                ApiError::bad_request(
                    "two Authorization headers: send one, `Authorization: Bearer tnt_…`",
                ),
            )
        } else {
            refuse_operator(
                c,
                peer,
                "operator_missing",
                ApiError::unauthorized(
                    "no operator token: pass --token or set TURNOUT_TOKEN (`turnout serve --init` prints the first admin token)",
                ),
            )
        });
    };
    // The scheme's name is case-insensitive (RFC 9110 11.1).
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .ok_or_else(|| {
            refuse_operator(
                c,
                peer,
                "operator_scheme",
                ApiError::unauthorized(
                    "expected an operator token as `Authorization: Bearer tnt_…`; this route takes no other scheme",
                ),
            )
        })?;
    let now = c.now_ms();
    let Some(found) = c.with_store(|s| s.use_token(token, now))? else {
        return Err(refuse_operator(
            c,
            peer,
            "operator_unknown",
            ApiError::unauthorized("the operator token is not known"),
        ));
    };
    if let Some(at) = found.revoked_ms {
        return Err(refuse_operator(
            c,
            peer,
            "operator_revoked",
            ApiError::unauthorized(format!(
                "the operator token {:?} was revoked at {}; ask an admin for a new one",
                found.name,
                crate::cmd::remote::when(at)
            )),
        ));
    }
    if let Some(at) = found.expires_ms.filter(|at| *at <= now) {
        return Err(refuse_operator(
            c,
            peer,
            "operator_expired",
            ApiError::unauthorized(format!(
                "the operator token {:?} expired at {}; ask an admin for a new one",
                found.name,
                crate::cmd::remote::when(at)
            )),
        ));
    }
    if found.role < need {
        return Err(refuse_operator(
            c,
            peer,
            "operator_role",
            ApiError {
                status: 403,
                code: ErrorCode::Forbidden,
                message: format!(
                    "this needs role {}; the token {:?} has role {}",
                    need.name(),
                    found.name,
                    found.role.name()
                ),
            },
        ));
    }
    Ok(Caller {
        name: found.name,
        role: found.role,
    })
}

/// What a route needs of an operator's token: a role at least.
pub(crate) trait NeedRole {
    /// The least role that may call it.
    const ROLE: Role;
}

/// Routes any token may call.
pub(crate) struct Viewer;
/// Routes that change rollouts and bundles.
pub(crate) struct Operator;
/// Routes that change who may do what (tokens, hosts).
pub(crate) struct Admin;

impl NeedRole for Viewer {
    const ROLE: Role = Role::Viewer;
}
impl NeedRole for Operator {
    const ROLE: Role = Role::Operator;
}
impl NeedRole for Admin {
    const ROLE: Role = Role::Admin;
}

/// An operator's bearer token of at least role `R`, checked before the
/// handler runs (and before any body is read); holds who called.
pub(crate) struct Authorized<R>(pub(crate) Caller, std::marker::PhantomData<R>);

impl<R: NeedRole> axum::extract::FromRequestParts<Shared> for Authorized<R> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        c: &Shared,
    ) -> Result<Self, ApiError> {
        let peer = parts.extensions.get::<Peer>().copied();
        operator(c, &parts.headers, peer, R::ROLE)
            .map(|caller| Authorized(caller, std::marker::PhantomData))
    }
}

/// How the event log names a caller: `alice (operator)`.
fn actor(caller: &Caller) -> String {
    format!("{} ({})", caller.name, caller.role.name())
}

/// What a host's request claims in its headers, checked before its body is
/// read: the header parses, its timestamp is fresh, the host is enrolled.
/// Nobody else gets a body read at all.
struct HostClaim {
    auth: HostAuth,
    key: turnout_proto::keys::PublicKey,
}

fn refuse_host(c: &Coordinator, reason: &'static str, message: String) -> ApiError {
    c.metrics.auth_failure(reason);
    ApiError::unauthorized(message)
}

fn host_claim(c: &Coordinator, headers: &HeaderMap) -> Result<HostClaim, ApiError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            refuse_host(
                c,
                "host_missing",
                "no Turnout-Host authorization header".into(),
            )
        })?;
    let auth =
        HostAuth::parse(value).map_err(|e| refuse_host(c, "host_malformed", e.to_string()))?;
    let now = c.now_ms();
    let window = c.settings().freshness.as_millis() as u64;
    if now.abs_diff(auth.ts_ms) > window {
        return Err(refuse_host(
            c,
            "host_stale",
            format!(
                "the request's timestamp is {} ms from the coordinator's clock, more than the {window} ms allowed; check the host's clock (NTP)",
                now.abs_diff(auth.ts_ms)
            ),
        ));
    }
    let key = c.host_key(auth.host.as_str())?.ok_or_else(|| {
        refuse_host(
            c,
            "host_unknown",
            format!(
                "host {} is not enrolled; enroll it with `turnout-agent enroll`",
                auth.host
            ),
        )
    })?;
    Ok(HostClaim { auth, key })
}

/// Checks the claim's signature over the request and that it is not a replay.
fn verify_host(
    c: &Coordinator,
    claim: HostClaim,
    method: &Method,
    uri: &Uri,
    body: &[u8],
) -> Result<HostId, ApiError> {
    let HostClaim { auth, key } = claim;
    let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    if !auth.verifies(&key, method.as_str(), path, body) {
        return Err(refuse_host(
            c,
            "host_signature",
            format!(
                "the request's signature does not verify with host {}'s enrolled key",
                auth.host
            ),
        ));
    }
    if !c.first_use(&auth.sig.0, auth.ts_ms, c.now_ms()) {
        return Err(refuse_host(
            c,
            "host_replay",
            "this signed request was already received (a replay)".into(),
        ));
    }
    Ok(auth.host)
}

fn authenticate_host(
    c: &Coordinator,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<HostId, ApiError> {
    verify_host(c, host_claim(c, headers)?, method, uri, body)
}

/// A bodiless request signed by an enrolled host (the desired-state poll).
pub(crate) struct SignedHost(pub(crate) HostId);

impl axum::extract::FromRequestParts<Shared> for SignedHost {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        c: &Shared,
    ) -> Result<Self, ApiError> {
        authenticate_host(c, &parts.method, &parts.uri, &parts.headers, b"").map(SignedHost)
    }
}

/// A request with a body, signed by an enrolled host (hello, report): the
/// claim in its headers is checked first, so nobody else gets a body read
/// at all; then the body is read (bounded) and the signature checked over it.
pub(crate) struct SignedBody {
    pub(crate) host: HostId,
    pub(crate) body: Bytes,
}

/// Why a [`SignedBody`] was refused: the credentials, or the body itself
/// (too large, too slow), which the report route counts apart.
pub(crate) enum SignedBodyRejection {
    /// The header, the host or the signature.
    Credentials(ApiError),
    /// Reading the body.
    Body(ApiError),
}

impl SignedBodyRejection {
    fn into_error(self) -> ApiError {
        match self {
            SignedBodyRejection::Credentials(err) | SignedBodyRejection::Body(err) => err,
        }
    }
}

impl IntoResponse for SignedBodyRejection {
    fn into_response(self) -> Response {
        self.into_error().into_response()
    }
}

impl axum::extract::FromRequest<Shared> for SignedBody {
    type Rejection = SignedBodyRejection;

    async fn from_request(
        request: axum::extract::Request,
        c: &Shared,
    ) -> Result<Self, SignedBodyRejection> {
        let (parts, body) = request.into_parts();
        let claim = host_claim(c, &parts.headers).map_err(SignedBodyRejection::Credentials)?;
        let body = read_body(c, body)
            .await
            .map_err(SignedBodyRejection::Body)?;
        let host = verify_host(c, claim, &parts.method, &parts.uri, &body)
            .map_err(SignedBodyRejection::Credentials)?;
        Ok(SignedBody { host, body })
    }
}

/// Reads a request body of at most `Limits::max_body_bytes`, refusing a
/// larger one as it arrives (413), before it is ever held whole.
async fn read_body(c: &Coordinator, body: Body) -> Result<Bytes, ApiError> {
    let limit = Limits::default().max_body_bytes;
    let timeout = c.settings().body_timeout;
    let read = tokio::time::timeout(timeout, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| {
            ApiError::bad_request(format!(
                "the request body did not arrive within {} (body_timeout)",
                humantime::format_duration(timeout)
            ))
        })?;
    read.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError {
                status: 413,
                code: ErrorCode::TooLarge,
                message: format!("the request body is over the limit of {limit} bytes"),
            }
        } else {
            ApiError::bad_request(format!("reading the request body: {e}"))
        }
    })
}

/// Labels are matched by selectors and shown to operators: keys are
/// 1 to 63 letters, digits, `.`, `_`, `-` or `/`, and neither keys nor
/// values may hold control characters.
fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), ApiError> {
    for (key, value) in labels {
        let key_ok = !key.is_empty()
            && key.len() <= 63
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
        if !key_ok {
            return Err(ApiError::bad_request(format!(
                "label {key:?}: expected a key of 1 to 63 letters, digits, '.', '_', '-' or '/'"
            )));
        }
        // A selector is `k=v,k2=v2`: a value with ',' or '=' could never be
        // selected.
        if value.len() > 255
            || value
                .chars()
                .any(|c| c.is_control() || c == ',' || c == '=')
        {
            return Err(ApiError::bad_request(format!(
                "label {key}: expected a value of at most 255 characters without ',', '=' or control characters"
            )));
        }
    }
    Ok(())
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
    check_labels(&request.labels)?;
    let result = c.with_store(|s| {
        s.enroll(
            &request.token,
            &request.host,
            &request.public_key,
            &request.labels,
            c.now_ms(),
        )
    })?;
    let enrolled = match result {
        Ok(enrolled) => enrolled,
        Err(refusal) => return Err(refuse_enrollment(&c, &request.host, refusal)?),
    };
    c.forget_key(request.host.as_str());
    c.log(
        &format!("host:{}", request.host),
        None,
        Some(request.host.as_str()),
        match enrolled {
            crate::store::Enrolled::New => "enrolled",
            crate::store::Enrolled::Again => "enrolled again with its own key (no token use spent)",
            crate::store::Enrolled::Replaced => {
                "enrolled with a new key, replacing the old one (a token made for this host with --replace)"
            }
        },
    )?;
    // The director key travels over the channel the agent just verified
    // against its pin: from now on it takes only desired state signed by it.
    Ok(json(&serde_json::json!({
        "host": request.host,
        "director_key": c.director_public().to_pem(),
    })))
}

/// The answer to a refused enrollment: a host id taken by another key is a
/// conflict (and in the event log); a token that does not work, a 401.
fn refuse_enrollment(
    c: &Coordinator,
    host: &HostId,
    refusal: crate::store::EnrollRefusal,
) -> Result<ApiError, ApiError> {
    c.metrics.auth_failure("enroll");
    if matches!(refusal, crate::store::EnrollRefusal::Taken(_)) {
        c.log(
            "coordinator",
            None,
            Some(host.as_str()),
            "refused an enrollment with another key for this enrolled host",
        )?;
        return Ok(ApiError::conflict(refusal.to_string()));
    }
    Ok(ApiError::unauthorized(refusal.to_string()))
}

async fn hello(
    State(c): State<Shared>,
    signed: Result<SignedBody, SignedBodyRejection>,
) -> Result<Response, ApiError> {
    let SignedBody { host, body } = signed.map_err(SignedBodyRejection::into_error)?;
    let Envelope { body: hello, .. } = Reader::default()
        .decode::<Hello>(&body)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    if hello.host != host {
        return Err(ApiError::bad_request(format!(
            "the hello names host {} but was signed by {host}",
            hello.host
        )));
    }
    check_labels(&hello.labels)?;
    let offer = c.offer();
    match negotiate(&hello.offer(), &offer) {
        Ok(agreed) => {
            c.with_store(|s| {
                s.record_hello(
                    &host,
                    &hello.agent_version,
                    &hello.labels,
                    Some((agreed.version.get(), &agreed.capabilities)),
                    None,
                    c.now_ms(),
                )
            })?;
            c.hello_agreed(host.as_str(), Some(&agreed));
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
                    c.now_ms(),
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

/// The CA certificates a host should trust (its `ca.pem`): during a CA
/// rotation both the old and the new, afterwards the new one only. Asked
/// over a connection the host already verified, so it can take the answer.
async fn agent_ca(State(c): State<Shared>, _: SignedHost) -> Result<Response, ApiError> {
    let pins: Vec<String> = c.ca_pins().iter().map(ToString::to_string).collect();
    Ok(json(&serde_json::json!({"pins": pins, "pem": c.ca_pem()})))
}

/// The director key that signs this host's desired state, for an agent
/// enrolled before protocol v2 (its enrollment did not carry it). Asked,
/// like the CAs, over a connection the host already verified.
async fn agent_director(State(c): State<Shared>, _: SignedHost) -> Result<Response, ApiError> {
    Ok(json(&serde_json::json!({
        "keys": [c.director_public().to_pem()],
        "handovers": c.director_handovers(),
    })))
}

/// The release trust rotations this coordinator holds, oldest first: a
/// host applies the newer ones only if each passes the rotation rules, so
/// what is served here needs no more trust than the channel.
async fn agent_trust(State(c): State<Shared>, _: SignedHost) -> Result<Response, ApiError> {
    Ok(json(&serde_json::json!({"files": c.rotations()})))
}

/// The release policy in force (its signed document), for a host to check
/// against its own trust: what is served here needs no more trust than the
/// channel.
async fn agent_policy(State(c): State<Shared>, _: SignedHost) -> Result<Response, ApiError> {
    let policy = c
        .policy()
        .map(|p| String::from_utf8_lossy(&p.to_bytes()).into_owned());
    Ok(json(&serde_json::json!({"policy": policy})))
}

/// Every host's id, with what `fields` takes from its last report (an
/// object; null fields for a host that never reported), queued reports
/// written first.
fn per_host(
    c: &Coordinator,
    fields: impl Fn(&Report) -> serde_json::Value,
) -> Result<Vec<serde_json::Value>, ApiError> {
    c.flush()?;
    Ok(c.with_store(|s| s.hosts())?
        .into_iter()
        .map(|h| {
            let mut value = h.report.as_ref().map_or(serde_json::json!({}), &fields);
            value["id"] = serde_json::json!(h.id);
            value
        })
        .collect())
}

/// The release policy in force, and the version each host holds.
async fn show_policy(State(c): State<Shared>, _: Authorized<Viewer>) -> Result<Response, ApiError> {
    let policy = c.policy();
    let hosts = per_host(
        &c,
        |r| serde_json::json!({"policy_version": r.policy_version, "policy_refused": r.policy_refused}),
    )?;
    Ok(json(&serde_json::json!({
        "document": policy.as_ref().map(|p| String::from_utf8_lossy(&p.to_bytes()).into_owned()),
        "policy": policy.map(|p| p.policy),
        "hosts": hosts,
    })))
}

/// `turnout policy set|push`: a release policy signed by the release keys,
/// checked against the trust this coordinator applies, kept and served.
async fn push_policy(
    State(c): State<Shared>,
    Authorized(caller, ..): Authorized<Admin>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let file = turnout_proto::policy::PolicyFile::parse(&body, &Limits::default())
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    c.set_policy(&file)?;
    c.log(
        &actor(&caller),
        None,
        None,
        &format!(
            "release policy v{} in force ({}); expires {}",
            file.policy.version,
            file.policy.rules_text(),
            file.policy.expires
        ),
    )?;
    Ok(json(&serde_json::json!({"version": file.policy.version})))
}

/// The release trust the coordinator applies now, and where hosts are.
async fn show_trust(State(c): State<Shared>, _: Authorized<Viewer>) -> Result<Response, ApiError> {
    let trust = c.trust();
    let keys: Vec<String> = trust.keys().keys().map(ToString::to_string).collect();
    let hosts = per_host(
        &c,
        |r| serde_json::json!({"trust_version": r.trust_version, "trust_refused": r.trust_refused}),
    )?;
    Ok(json(&serde_json::json!({
        "version": trust.version(),
        "threshold": trust.threshold(),
        "keys": keys,
        "rotations": c.rotations().len(),
        "hosts": hosts,
    })))
}

/// `turnout trust push`: a rotation of the release trust, checked against
/// the current one (higher version, current threshold, its own threshold),
/// kept and served to agents.
async fn push_trust(
    State(c): State<Shared>,
    Authorized(caller, ..): Authorized<Admin>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let file = turnout_proto::trust::TrustFile::parse(&body, &Limits::default())
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let before = c.rotate_trust(&file)?;
    c.log(
        &actor(&caller),
        None,
        None,
        &format!(
            "release trust rotated from version {before} to version {} ({} of {} keys): hosts apply it at their next check",
            file.trust.version(),
            file.trust.threshold(),
            file.trust.keys().len()
        ),
    )?;
    Ok(json(
        &serde_json::json!({"version": file.trust.version(), "replaced": before}),
    ))
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
    SignedHost(host): SignedHost,
    Query(query): Query<DesiredQuery>,
) -> Result<Response, ApiError> {
    let now = c.now_ms();
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
    // Written in exactly the version the host agreed to: v1 agents (0.1.0)
    // read the plain document, v2 agents only a signed, dated one.
    let version = c.agreement(host.as_str())?.version;
    let body = if version >= ProtoVersion::V2 {
        encode(ProtoVersion::V2, &c.sign_desired(&state))
    } else {
        encode(ProtoVersion::V1, &*state)
    };
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

async fn report(
    State(c): State<Shared>,
    signed: Result<SignedBody, SignedBodyRejection>,
) -> Result<Response, ApiError> {
    let SignedBody { host, body } = signed.map_err(|rejected| {
        if let SignedBodyRejection::Body(_) = rejected {
            c.metrics.bad_report();
        }
        rejected.into_error()
    })?;
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
    c.queue_report(report, c.now_ms());
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ---- bundles ----

/// The prefix of a push's temporary file in the bundle store; whatever
/// carries it at start-up is left from a push that never finished.
pub const PUSH_PREFIX: &str = ".push-";

/// Room a push leaves free on the store's file system, beyond the bundle:
/// the database must still be able to grow.
const PUSH_HEADROOM: u64 = 64 << 20;

fn internal(what: &str, err: impl std::fmt::Display) -> ApiError {
    ApiError {
        status: 500,
        code: ErrorCode::Internal,
        message: format!("{what}: {err}"),
    }
}

/// Removes temporary files of pushes that never finished (a kill, a crash):
/// on a full disk they would keep the database from opening.
pub fn remove_unfinished_pushes(bundles_dir: &std::path::Path) -> std::io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(bundles_dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(PUSH_PREFIX) {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Free bytes on the file system holding `dir`.
fn free_bytes(dir: &std::path::Path) -> std::io::Result<u64> {
    let stat = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok(stat.blocks_available() as u64 * stat.fragment_size() as u64)
}

/// A push streams into a temporary file of its own (created with O_EXCL
/// under a random name, so concurrent pushes never share one), is hashed
/// and verified there, and is renamed to its digest only once verified.
/// The temporary file is removed on every other path: a refusal, an error,
/// a client that goes away (the handler is dropped), a full disk.
async fn push_bundle(
    State(c): State<Shared>,
    Authorized(caller, ..): Authorized<Operator>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let limit = Limits::default().max_bundle_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = |size: u64| ApiError {
        status: 413,
        code: ErrorCode::TooLarge,
        message: format!("the bundle is {size} bytes or more, over the limit of {limit} bytes"),
    };
    if let Some(size) = declared.filter(|size| *size > limit) {
        return Err(too_large(size));
    }
    let free = free_bytes(c.bundles_dir()).map_err(|e| internal("checking free space", e))?;
    let needed = declared.unwrap_or(0).saturating_add(PUSH_HEADROOM);
    if free < needed {
        return Err(ApiError {
            status: 507,
            code: ErrorCode::Internal,
            message: format!(
                "the bundle store {} has {free} bytes free; this push needs {needed} (the bundle and {PUSH_HEADROOM} bytes for the database): free space, or remove old bundles",
                c.bundles_dir().display()
            ),
        });
    }
    let temp = tempfile::Builder::new()
        .prefix(PUSH_PREFIX)
        .tempfile_in(c.bundles_dir())
        .map_err(|e| internal("creating the upload's file", e))?;
    // Written through tokio's file, whose writes and flush run on the
    // blocking pool: a slow disk holds this upload, never a runtime thread.
    let mut file = tokio::fs::File::from_std(
        temp.as_file()
            .try_clone()
            .map_err(|e| internal("opening the upload's file", e))?,
    );
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut body = body;
    let idle = c.settings().body_timeout;
    loop {
        let Ok(frame) = tokio::time::timeout(idle, http_body_util::BodyExt::frame(&mut body)).await
        else {
            return Err(ApiError::bad_request(format!(
                "the upload stalled: no data for {} (body_timeout); nothing was stored",
                humantime::format_duration(idle)
            )));
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| ApiError::bad_request(format!("reading the upload: {e}")))?;
        // Trailers carry no payload.
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        size += chunk.len() as u64;
        if size > limit {
            return Err(too_large(size));
        }
        hasher.update(&chunk);
        tokio::io::AsyncWriteExt::write_all(&mut file, &chunk)
            .await
            .map_err(|e| {
                let full = e.raw_os_error() == Some(nix::libc::ENOSPC);
                ApiError {
                    status: if full { 507 } else { 500 },
                    code: ErrorCode::Internal,
                    message: format!(
                        "writing the upload to {}: {e}{}",
                        c.bundles_dir().display(),
                        if full {
                            "; nothing was stored: free space and push again"
                        } else {
                            ""
                        }
                    ),
                }
            })?;
    }
    tokio::io::AsyncWriteExt::flush(&mut file)
        .await
        .map_err(|e| internal("writing the upload", e))?;
    file.sync_all()
        .await
        .map_err(|e| internal("writing the upload", e))?;
    let sha256 = turnout_proto::Digest::from_bytes(hasher.finalize().into());
    let (trust, now) = (c.trust(), c.now());
    let check = temp
        .reopen()
        .map_err(|e| internal("reading the upload", e))?;
    let verified = tokio::task::spawn_blocking(move || {
        turnout_proto::bundle::verify_and_unpack(
            std::io::BufReader::new(check),
            &trust,
            now,
            &Limits::default(),
            &mut turnout_proto::bundle::Discard,
        )
    })
    .await
    .expect("verification does not panic")
    .map_err(|err| ApiError {
        status: 422,
        code: ErrorCode::BadRequest,
        message: format!("bundle refused: {err}"),
    })?;
    // A release is immutable: another bundle of the same name and version
    // is refused, unless it carries the very same signed manifest (the
    // release re-signed, say).
    let name = verified.manifest.name.to_string();
    let version = verified.manifest.version.to_string();
    let others: Vec<(String, PathBuf)> = c
        .with_store(|s| s.bundles())?
        .into_iter()
        .filter(|b| b.name == name && b.version == version && b.sha256 != sha256.as_str())
        .map(|b| {
            let path = c.bundle_path(&b.sha256);
            (b.sha256, path)
        })
        .collect();
    let (dest, dir) = (c.bundle_path(sha256.as_str()), c.bundles_dir().to_owned());
    let manifest = verified.manifest_bytes.clone();
    // Reading the stored heads, the rename and the directory's flush are
    // file I/O: on the blocking pool.
    let stored = tokio::task::spawn_blocking(move || -> Result<Result<(), String>, ApiError> {
        let same_release = others.into_iter().find(|(_, path)| {
            let stored = std::fs::File::open(path).ok().and_then(|f| {
                turnout_proto::bundle::read_head(std::io::BufReader::new(f), &Limits::default())
                    .ok()
            });
            stored.is_none_or(|head| head.manifest_bytes != manifest)
        });
        if let Some((other, _)) = same_release {
            return Ok(Err(other));
        }
        // Content-addressed: a concurrent push of the same bytes renames the
        // same content over it, so whichever lands, the name matches the bytes.
        temp.persist(&dest)
            .map_err(|e| internal("storing the bundle", e.error))?;
        let _ = turnout_rt::files::sync_dir(&dir);
        Ok(Ok(()))
    })
    .await
    .map_err(|e| internal("storing the bundle", std::io::Error::other(e)))??;
    if let Err(other) = stored {
        return Err(ApiError::conflict(format!(
            "{name} {version} is stored already as another release (bundle {other}): a release is immutable; pack this one under a new version"
        )));
    }
    let record = BundleRecord {
        sha256: sha256.to_string(),
        name: verified.manifest.name.to_string(),
        version: verified.manifest.version.to_string(),
        size,
        created_ms: c.now_ms(),
    };
    c.with_store(|s| s.add_bundle(&record))?;
    c.log(
        &actor(&caller),
        None,
        None,
        &format!(
            "bundle pushed: {} {} ({sha256})",
            record.name, record.version
        ),
    )?;
    Ok((StatusCode::CREATED, json(&record)).into_response())
}

async fn list_bundles(
    State(c): State<Shared>,
    _: Authorized<Viewer>,
) -> Result<Response, ApiError> {
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
        operator(&c, &headers, None, Role::Viewer)?;
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
    // A Range that is not a single `bytes=` range is ignored (RFC 9110
    // §14.2): the whole file is sent. One past the end is refused (416).
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .filter(|r| is_byte_range(r))
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

/// Whether `value` has the shape of one byte range: `bytes=A-B`,
/// `bytes=A-` or `bytes=-N` with decimal digits.
fn is_byte_range(value: &str) -> bool {
    value.strip_prefix("bytes=").is_some_and(|spec| {
        spec.split_once('-').is_some_and(|(a, b)| {
            let (a, b) = (a.trim(), b.trim());
            let number = |t: &str| -> Option<Option<u64>> {
                if t.is_empty() {
                    Some(None)
                } else if t.bytes().all(|c| c.is_ascii_digit()) {
                    // Past u64: as large as any file, not a syntax error.
                    Some(Some(t.parse().unwrap_or(u64::MAX)))
                } else {
                    None
                }
            };
            match (number(a), number(b)) {
                (Some(None), Some(None)) | (None, _) | (_, None) => false,
                // `bytes=5-2` is invalid (RFC 9110 §14.1.1), so ignored.
                (Some(Some(first)), Some(Some(last))) => first <= last,
                _ => true,
            }
        })
    })
}

/// `bytes=A-B`, `bytes=A-`, `bytes=-N` → [start, end); `None` if unsatisfiable.
fn parse_range(value: &str, size: u64) -> Option<(u64, u64)> {
    let spec = value.strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().unwrap_or(u64::MAX);
            (size.saturating_sub(n), size)
        }
        (a, "") => (a.parse().ok()?, size),
        (a, b) => (
            a.parse().ok()?,
            b.parse::<u64>()
                .unwrap_or(u64::MAX)
                .saturating_add(1)
                .min(size),
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
    _: Authorized<Viewer>,
    Query(query): Query<HostsQuery>,
) -> Result<Response, ApiError> {
    let selector = crate::spec::parse_selector(query.selector.as_deref().unwrap_or_default())
        .map_err(|why| ApiError::bad_request(format!("selector: {why}")))?;
    c.flush()?;
    let now = c.now_ms();
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
            value["legacy"] = h.legacy().into();
            value["stale_since_ms"] = h.stale_since().into();
            value["desired_refused"] = h
                .report
                .as_ref()
                .and_then(|r| r.desired_refused.clone())
                .into();
            value["trust_version"] = h.report.as_ref().and_then(|r| r.trust_version).into();
            value["policy_version"] = h.report.as_ref().and_then(|r| r.policy_version).into();
            value["policy_refused"] = h
                .report
                .as_ref()
                .and_then(|r| r.policy_refused.clone())
                .into();
            value["trust_refused"] = h
                .report
                .as_ref()
                .and_then(|r| r.trust_refused.clone())
                .into();
            value
        })
        .collect();
    Ok(json(&hosts))
}

async fn forget_host(
    State(c): State<Shared>,
    Authorized(caller, ..): Authorized<Admin>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    c.forget_key(&id);
    if !c.with_store(|s| s.forget_host(&id))? {
        return Err(ApiError::not_found(format!("no host {id}")));
    }
    c.log(&actor(&caller), None, Some(&id), "forgotten")?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct RoleQuery {
    role: String,
}

/// Whether the caller's token has a role, answered before a client sends
/// something large (a bundle push): a refused push of a big bundle would
/// otherwise end in a broken pipe instead of the refusal.
async fn check_role(
    State(c): State<Shared>,
    headers: HeaderMap,
    Query(query): Query<RoleQuery>,
) -> Result<Response, ApiError> {
    let need = Role::parse(&query.role).ok_or_else(|| {
        ApiError::bad_request(format!(
            "role {:?}: expected viewer, operator or admin",
            query.role
        ))
    })?;
    operator(&c, &headers, None, need)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The longest an enrollment token may live: a year.
const MAX_ENROLL_TTL_SECS: u64 = 366 * 24 * 3600;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    #[serde(default)]
    enroll: bool,
    name: Option<String>,
    role: Option<String>,
    ttl_secs: Option<u64>,
    uses: Option<u32>,
    host: Option<HostId>,
    #[serde(default)]
    replace: bool,
}

/// A token's name: what the event log says; letters, digits, `.`, `_`,
/// `-` and `@`, 1 to 64 of them.
fn check_token_name(name: &str) -> Result<(), ApiError> {
    let fine = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b));
    if fine {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "name {name:?}: expected 1 to 64 letters, digits, '.', '_', '-' or '@' (who holds the token, e.g. alice)"
        )))
    }
}

async fn create_token(
    State(c): State<Shared>,
    Authorized(caller, ..): Authorized<Admin>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: TokenRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "expected {{name, role, ttl_secs}} or {{enroll: true, ttl_secs, uses, host, replace}}: {e}"
        ))
    })?;
    let now = c.now_ms();
    let ttl_secs = request.ttl_secs;
    if let Some(ttl) = ttl_secs
        && !(1..=MAX_ENROLL_TTL_SECS).contains(&ttl)
    {
        return Err(ApiError::bad_request(format!(
            "ttl_secs {ttl}: expected 1 to {MAX_ENROLL_TTL_SECS} seconds (a year); make a new token when one runs out"
        )));
    }
    let (token, what) = if request.enroll {
        let uses = request.uses.unwrap_or(1);
        if uses == 0 {
            return Err(ApiError::bad_request(
                "uses 0: expected at least 1 (how many hosts may enroll with the token)",
            ));
        }
        if request.role.is_some() || request.name.is_some() {
            return Err(ApiError::bad_request(
                "role and name are for operator tokens; an enrollment token has neither",
            ));
        }
        if request.replace && request.host.is_none() {
            return Err(ApiError::bad_request(
                "replace needs host: a token may re-key exactly one enrolled host",
            ));
        }
        let token = c.with_store(|s| {
            s.create_enroll_token(
                ttl_secs.unwrap_or(3600) * 1000,
                uses,
                request.host.as_ref(),
                request.replace,
                now,
            )
        })?;
        let what = match (&request.host, request.replace) {
            (Some(host), true) => {
                format!("enrollment token created for host {host}, which may replace its key")
            }
            (Some(host), false) => format!("enrollment token created for host {host}"),
            (None, _) => format!("enrollment token created for {uses} host(s)"),
        };
        (token, what)
    } else {
        if request.uses.is_some() || request.host.is_some() || request.replace {
            return Err(ApiError::bad_request(
                "uses, host and replace are for enrollment tokens (enroll: true)",
            ));
        }
        let name = request.name.as_deref().ok_or_else(|| {
            ApiError::bad_request(
                "an operator token needs a name: who holds it (e.g. alice), for the event log",
            )
        })?;
        check_token_name(name)?;
        let wanted = request.role.as_deref().unwrap_or("viewer");
        let new_role = Role::parse(wanted).ok_or_else(|| {
            ApiError::bad_request(format!(
                "role {wanted:?}: expected viewer, operator or admin"
            ))
        })?;
        let token = c
            .with_store(|s| s.create_token(name, new_role, ttl_secs.map(|t| t * 1000), now))?
            .map_err(|refusal| ApiError::conflict(refusal.to_string()))?;
        let what = format!(
            "operator token {name} ({}) created{}",
            new_role.name(),
            ttl_secs.map_or(String::new(), |t| format!(
                ", valid until {}",
                crate::cmd::remote::when(now + t * 1000)
            ))
        );
        (token, what)
    };
    c.log(
        &actor(&caller),
        None,
        request.host.as_ref().map(HostId::as_str),
        &what,
    )?;
    let pins: Vec<String> = c.ca_pins().iter().map(ToString::to_string).collect();
    let answer = if request.enroll {
        serde_json::json!({"token": token, "ca_pins": pins})
    } else {
        serde_json::json!({"token": token, "name": request.name})
    };
    Ok((StatusCode::CREATED, json(&answer)).into_response())
}

async fn list_tokens(State(c): State<Shared>, _: Authorized<Admin>) -> Result<Response, ApiError> {
    Ok(json(&c.with_store(|s| s.tokens())?))
}

async fn revoke_token(
    State(c): State<Shared>,
    Authorized(caller, ..): Authorized<Admin>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let now = c.now_ms();
    let working_admins: Vec<String> = c
        .with_store(|s| s.tokens())?
        .into_iter()
        .filter(|t| {
            t.role == Role::Admin
                && t.revoked_ms.is_none()
                && t.expires_ms.is_none_or(|at| at > now)
        })
        .map(|t| t.name)
        .collect();
    if working_admins == [name.clone()] {
        return Err(ApiError::conflict(format!(
            "{name:?} is the last working admin token: revoking it would lock every admin out; create another admin token first (`turnout token create --name NAME --role admin`)"
        )));
    }
    if !c.with_store(|s| s.revoke_token(&name, now))? {
        return Err(ApiError::not_found(format!(
            "no working operator token named {name:?} (`turnout token list` shows them)"
        )));
    }
    c.log(
        &actor(&caller),
        None,
        None,
        &format!("operator token {name} revoked"),
    )?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelRequest {
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
}

async fn label_host(
    State(c): State<Shared>,
    Authorized(caller, ..): Authorized<Operator>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: LabelRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!("expected {{set: {{k: v}}, remove: [k]}}: {e}"))
    })?;
    check_labels(&request.set)?;
    let Some(labels) = c.with_store(|s| s.label_host(&id, &request.set, &request.remove))? else {
        return Err(ApiError::not_found(format!("no host {id}")));
    };
    let shown: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    c.log(
        &actor(&caller),
        None,
        Some(&id),
        &format!(
            "labels set to {}",
            if shown.is_empty() {
                "none".into()
            } else {
                shown.join(",")
            }
        ),
    )?;
    Ok(json(&labels))
}

// ---- rollouts and events ----

#[derive(Deserialize)]
struct StartRequest {
    spec: RawSpec,
    id: Option<String>,
}

async fn plan_rollout(
    State(c): State<Shared>,
    _: Authorized<Viewer>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: StartRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("expected {{spec, id}}: {e}")))?;
    Ok(json(&c.plan(&request.spec, request.id)?))
}

async fn start_rollout(
    State(c): State<Shared>,
    Authorized(caller, ..): Authorized<Operator>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: StartRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("expected {{spec, id}}: {e}")))?;
    let rollout = c.start(&request.spec, request.id, &actor(&caller))?;
    Ok((StatusCode::CREATED, json(&rollout)).into_response())
}

async fn list_rollouts(
    State(c): State<Shared>,
    _: Authorized<Viewer>,
) -> Result<Response, ApiError> {
    Ok(json(&c.rollouts()?))
}

async fn get_rollout(
    State(c): State<Shared>,
    _: Authorized<Viewer>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(json(&c.rollout(&id)?))
}

#[derive(Deserialize, Default)]
struct CommandBody {
    #[serde(default)]
    all_at_once: bool,
}

async fn command_rollout(
    State(c): State<Shared>,
    Authorized(caller, ..): Authorized<Operator>,
    Path((id, command)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
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
    Ok(json(&c.step(&id, input, &actor(&caller))?))
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
    _: Authorized<Viewer>,
    Query(query): Query<EventsQuery>,
) -> Result<Response, ApiError> {
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

/// `/metrics` on the API listener: a viewer token unless `metrics_public`.
async fn metrics(
    State(c): State<Shared>,
    headers: HeaderMap,
    peer: Option<axum::Extension<Peer>>,
) -> Result<Response, ApiError> {
    if !c.settings().metrics_public {
        operator(&c, &headers, peer.map(|p| p.0), Role::Viewer)?;
    }
    Ok(metrics_page(&c))
}

fn metrics_page(c: &Coordinator) -> Response {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        c.metrics.render(),
    )
        .into_response()
}

/// The separate metrics listener (`--metrics-listen`): `/metrics` only, no
/// token, plain HTTP, for a scraper on a management network.
pub fn metrics_router(coordinator: Shared) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(c): State<Shared>| async move { metrics_page(&c) }),
        )
        .fallback(no_route)
        .with_state(coordinator)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::parse_range;

    proptest! {
        /// Whatever a client sends as `Range`, the answer is a range inside
        /// the file, or none (416): never past its end, never empty.
        #[test]
        fn a_range_is_inside_the_file_or_refused(value in "(bytes=)?[0-9 ]{0,25}-?[0-9 ]{0,25}|\\PC{0,40}", size in 0u64..10_000_000) {
            if let Some((start, end)) = parse_range(&value, size) {
                prop_assert!(start < end && end <= size, "{} of {}: {}..{}", value, size, start, end);
            }
        }
    }

    #[test]
    fn a_header_that_is_no_byte_range_is_ignored_not_refused() {
        assert!(super::is_byte_range("bytes=0-99"));
        assert!(super::is_byte_range("bytes=-5"));
        for junk in [
            "junk",
            "bytes=",
            "bytes=-",
            "bytes=a-b",
            "items=0-1",
            "bytes=0-1,5-9",
        ] {
            assert!(!super::is_byte_range(junk), "{junk}");
        }
    }

    #[test]
    fn ranges_as_clients_send_them() {
        assert_eq!(parse_range("bytes=0-99", 1000), Some((0, 100)));
        assert_eq!(parse_range("bytes=900-", 1000), Some((900, 1000)));
        assert_eq!(parse_range("bytes=-100", 1000), Some((900, 1000)));
        assert_eq!(parse_range("bytes=1000-", 1000), None, "past the end: 416");
        assert_eq!(parse_range("bytes=5-1", 1000), None);
        assert_eq!(
            parse_range("bytes=0-99999999999999999999", 1000),
            Some((0, 1000)),
            "a last byte past u64 is past the end: the whole file"
        );
    }
}
