//! The coordinator's logic, independent of HTTP: the registry, desired state
//! and its watchers, rollouts driven through the pure engine, and the event
//! log. The server (`server.rs`) is a thin layer of routes over this.
//!
//! Every engine step runs in one SQLite transaction with its actions (desired
//! state changes, event-log lines) and the rollout's new state, so a
//! coordinator killed at any moment restarts from a state where each host was
//! either dispatched and recorded as such, or neither: no host is sent its
//! release twice, none is skipped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use turnout_proto::keys::SecretKey;
use turnout_proto::messages::{
    DesiredService, DesiredState, ErrorCode, OutcomeKind, ReleaseRef, ServiceReport, ServiceState,
};
use turnout_proto::trust::Trust;
use turnout_proto::{HostId, ProtoVersion, ServiceName};

use crate::broker::{Agreed, Broker};
use crate::engine::{self, Action, Fleet, HostView, Input, Rollout};
use crate::host_auth::HostAuth;
use crate::metrics::Metrics;
use crate::reports::ReportQueue;
use crate::spec::{RawSpec, ReleaseSelector, RolloutSpec};
use crate::store::{HostRecord, Store, StoreError};

/// The coordinator's tunables.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// How often agents send a heartbeat report.
    pub report_interval: Duration,
    /// Missed intervals after which a host counts as offline.
    pub offline_after: u32,
    /// How far a signed request's timestamp may be from the coordinator's clock.
    pub freshness: Duration,
    /// The longest long poll.
    pub max_wait: Duration,
    /// How often rollouts are stepped when nothing wakes them earlier.
    pub tick: Duration,
    /// Most connections served at once; past it new ones are closed (and
    /// logged). Keep it under the process's file limit (`LimitNOFILE=`).
    pub max_connections: usize,
    /// How long a connection may take to send a request's headers, and how
    /// long a kept-alive connection may sit idle between requests.
    pub header_timeout: Duration,
    /// How long a request body may take to arrive, between two chunks.
    pub body_timeout: Duration,
    /// How long shutdown waits for requests in flight before it stops anyway.
    pub shutdown_grace: Duration,
    /// Whether `/metrics` on the API listener answers without a token
    /// (it names hosts and rollouts; by default it needs a viewer token).
    pub metrics_public: bool,
    /// How long a signed desired state (protocol v2) stays valid; every
    /// answer issues a fresh one, so a host hears within this long that its
    /// coordinator was frozen or silenced.
    pub desired_expiry: Duration,
    /// The oldest protocol version an agent may speak: 1 while agents of
    /// 0.1.0 are in the fleet, 2 to refuse them (the contract step).
    pub min_agent_proto: ProtoVersion,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            report_interval: Duration::from_secs(10),
            offline_after: 3,
            freshness: Duration::from_secs(300),
            max_wait: Duration::from_secs(60),
            tick: Duration::from_millis(500),
            max_connections: 16_384,
            header_timeout: Duration::from_secs(20),
            body_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            metrics_public: false,
            desired_expiry: Duration::from_secs(3600),
            min_agent_proto: ProtoVersion::V1,
        }
    }
}

/// An error with its HTTP status and wire code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// The HTTP status.
    pub status: u16,
    /// The wire code.
    pub code: ErrorCode,
    /// What was expected, what was found, what to do.
    pub message: String,
}

impl ApiError {
    /// A 400.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            code: ErrorCode::BadRequest,
            message: message.into(),
        }
    }

    /// A 404.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 404,
            code: ErrorCode::NotFound,
            message: message.into(),
        }
    }

    /// A 409.
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 409,
            code: ErrorCode::Conflict,
            message: message.into(),
        }
    }

    /// A 401.
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 401,
            code: ErrorCode::Unauthorized,
            message: message.into(),
        }
    }

    /// A 422: a signed document its verification refused (a trust rotation
    /// or a policy without the signatures the rules need, or not newer).
    pub fn rejected(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 422,
            code: ErrorCode::BadRequest,
            message: message.into(),
        }
    }

    /// A 500: the coordinator failed (a file it could not write).
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 500,
            code: ErrorCode::Internal,
            message: message.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> ApiError {
        ApiError {
            status: 500,
            code: ErrorCode::Internal,
            message: err.to_string(),
        }
    }
}

/// What `plan` shows, and `start` then does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanView {
    /// The rollout id the plan is for.
    pub id: String,
    /// The validated spec.
    pub spec: RolloutSpec,
    /// The release it moves to.
    pub target: ReleaseRef,
    /// The hosts of each wave, in dispatch order.
    pub waves: Vec<Vec<HostId>>,
    /// Hosts the selector matched but that cannot take part, and why.
    pub excluded: BTreeMap<String, String>,
    /// What the operator should know before starting it (an agent upgrade
    /// whose agents could not talk to this coordinator afterwards).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// The agent's own releases go by this service name.
pub const AGENT_SERVICE: &str = "turnout-agent";

/// The protocol range a `turnout-agent` bundle declares it speaks, from its
/// manifest's `provides` (`turnout-proto/1-2`, which `turnout pack` adds).
pub fn declared_proto(provides: &[String]) -> Option<turnout_proto::ProtoRange> {
    provides.iter().find_map(|p| {
        let (min, max) = p.strip_prefix("turnout-proto/")?.split_once('-')?;
        let version = |s: &str| {
            s.trim_start_matches('v')
                .parse::<u16>()
                .ok()
                .and_then(ProtoVersion::new)
        };
        turnout_proto::ProtoRange::new(version(min)?, version(max)?)
    })
}

/// A host that reports it is reverting from a release has failed on it,
/// already: its agent decided so before the revert itself, which may take a
/// while, and the coordinator need not wait for it to stop dispatching.
fn reverting(report: &ServiceReport) -> Option<(ReleaseRef, String)> {
    let target = report.target.as_ref()?;
    (report.state == ServiceState::Reverting).then(|| {
        (
            target.clone(),
            format!(
                "reverting: {}",
                report
                    .last_error
                    .as_deref()
                    .unwrap_or("its agent is switching back to the committed release")
            ),
        )
    })
}

/// What the engine sees of one host's service: its last report, whether it
/// is online, and whether it has acted on its current desired state.
pub fn host_view(report: Option<&ServiceReport>, online: bool, acked: bool) -> HostView {
    HostView {
        online,
        busy: report.is_some_and(|r| {
            matches!(
                r.state,
                ServiceState::Fetching
                    | ServiceState::Staged
                    | ServiceState::Switching
                    | ServiceState::Baking
                    | ServiceState::Reverting
            )
        }),
        committed: report.and_then(|r| r.committed.clone()),
        last_error: report.and_then(|r| r.last_error.clone()),
        failed: report.and_then(reverting).or_else(|| {
            report
                .and_then(|r| r.last_outcome.as_ref())
                .and_then(|o| match o.kind {
                    // A refusal by policy is lifted with the policy: one
                    // from before the host acted on its current desired
                    // state (an earlier rollout) says nothing about it.
                    OutcomeKind::Refused if !acked => None,
                    OutcomeKind::Reverted
                    | OutcomeKind::Rejected
                    | OutcomeKind::Refused
                    | OutcomeKind::Failed
                    | OutcomeKind::Interrupted => {
                        Some((o.release.clone(), format!("{}: {}", o.kind, o.reason)))
                    }
                    OutcomeKind::Committed | OutcomeKind::Unknown(_) => None,
                })
        }),
        acked,
    }
}

/// How an operator's command reads in the event log.
fn requested(input: &Input) -> String {
    match input {
        Input::Tick => "tick".into(),
        Input::Pause => "pause requested".into(),
        Input::Resume => "resume requested".into(),
        Input::Promote => "promotion requested".into(),
        Input::Abort => "abort requested".into(),
        Input::Rollback { all_at_once: false } => "rollback requested".into(),
        Input::Rollback { all_at_once: true } => "rollback requested, all hosts at once".into(),
    }
}

fn agreed(version: ProtoVersion, capabilities: Option<&turnout_proto::CapabilitySet>) -> Agreed {
    Agreed {
        version,
        long_poll: capabilities
            .is_some_and(|caps| caps.contains(&turnout_proto::Capability::LongPoll)),
    }
}

/// The rotations kept in `dir` (pushed with `turnout trust push`, or put
/// there by hand), oldest first.
fn read_rotations(dir: &Path) -> Result<Vec<turnout_proto::trust::TrustFile>, anyhow::Error> {
    let mut files = Vec::new();
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                let path = entry?.path();
                if path.extension().is_none_or(|e| e != "json") {
                    continue;
                }
                let bytes = std::fs::read(&path)?;
                match turnout_proto::trust::TrustFile::parse(
                    &bytes,
                    &turnout_proto::Limits::default(),
                ) {
                    Ok(file) => files.push(file),
                    Err(err) => {
                        tracing::warn!("skipping the trust rotation {}: {err}", path.display());
                    }
                }
            }
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(anyhow::anyhow!("reading {}: {err}", dir.display())),
    }
    files.sort_by_key(|f| f.trust.version());
    Ok(files)
}

/// The trust this coordinator applies (the operator's file, then every
/// rotation in `dir` that follows, in version order) and the rotations it
/// serves to agents: all of them. Hosts check each rotation themselves, so
/// one that does not follow is refused by every host and reported, not
/// hidden; it is warned about here.
fn load_rotations(trust: Trust, dir: &Path) -> Result<(Trust, Vec<String>), anyhow::Error> {
    let files = read_rotations(dir)?;
    let (accepted, refusal) = turnout_proto::trust::apply_rotations(&trust, &files);
    if let Some(err) = refusal {
        tracing::warn!(
            "a trust rotation in {} does not follow from the one before: {err}; hosts will refuse it too",
            dir.display()
        );
    }
    let current = accepted.map_or(trust, |file| file.trust.clone());
    let served = files
        .iter()
        .map(|f| String::from_utf8_lossy(&f.to_bytes()).into_owned())
        .collect();
    Ok((current, served))
}

/// The release policy kept at `path`, if any.
fn load_policy(path: &Path) -> Result<Option<turnout_proto::policy::PolicyFile>, anyhow::Error> {
    match std::fs::read(path) {
        Ok(bytes) => turnout_proto::policy::PolicyFile::parse(&bytes, &turnout_proto::Limits::default())
            .map(Some)
            .map_err(|err| {
                anyhow::anyhow!(
                    "{}: {err}; restore it from a backup, or remove it and set the policy again with `turnout policy set`",
                    path.display()
                )
            }),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(anyhow::anyhow!("reading {}: {err}", path.display())),
    }
}

/// Where the handovers of the director key at `director` are kept.
pub fn handovers_path(director: &Path) -> PathBuf {
    director.with_file_name("director-handovers.json")
}

/// The handovers kept beside the director key at `director` (none before
/// its first rotation).
pub fn load_handovers(
    director: &Path,
) -> Result<Vec<turnout_proto::desired::Handover>, anyhow::Error> {
    let path = handovers_path(director);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|err| anyhow::anyhow!("reading {}: {err}", path.display())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(err) => Err(anyhow::anyhow!("reading {}: {err}", path.display())),
    }
}

/// Reads the director key at `path`, or makes one (mode 0600) when there
/// is none: at `serve --init`, and at the first start of a state directory
/// written by a build before protocol v2.
fn load_or_make_director(path: &Path) -> Result<SecretKey, anyhow::Error> {
    match std::fs::read_to_string(path) {
        Ok(text) => SecretKey::from_pem(&text).map_err(|err| {
            anyhow::anyhow!(
                "the director key {} does not read: {err}; restore it from a backup (agents \
                 refuse desired state signed by any other key)",
                path.display()
            )
        }),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed)
                .map_err(|err| anyhow::anyhow!("no randomness for the director key: {err}"))?;
            let key = SecretKey::from_seed(seed);
            turnout_rt::files::write_atomic(path, key.to_pem().as_bytes(), 0o600)?;
            tracing::info!(
                key = %key.public().id(),
                "made the coordinator's director key {}: it signs what hosts are told to run",
                path.display()
            );
            Ok(key)
        }
        Err(err) => Err(anyhow::anyhow!("reading {}: {err}", path.display())),
    }
}

/// How often the rollout loop recomputes the fleet gauges of `/metrics`.
const GAUGES_EVERY: Duration = Duration::from_secs(5);

/// The coordinator.
pub struct Coordinator {
    store: Mutex<Store>,
    /// The release trust pushed bundles are checked against: the
    /// operator's file, or the newest rotation pushed since.
    trust: Mutex<Trust>,
    /// The rotations pushed (`STATE_DIR/trust/VERSION.json`), oldest
    /// first, as served to agents.
    rotations: Mutex<Vec<String>>,
    /// Where pushed rotations are kept.
    rotations_dir: PathBuf,
    /// The release policy (floors, revocations) pushed last, as its
    /// document's text (`STATE_DIR/policy.json`).
    policy: Mutex<Option<turnout_proto::policy::PolicyFile>>,
    /// Where it is kept.
    policy_path: PathBuf,
    bundles_dir: PathBuf,
    settings: Settings,
    /// Desired states in memory, the long polls waiting on them.
    broker: Broker,
    events: watch::Sender<u64>,
    wake: Notify,
    stopping: watch::Sender<bool>,
    /// Host keys and used request signatures.
    auth: HostAuth,
    /// Reports and last-seen times not yet written.
    reports: ReportQueue,
    /// Request and refusal counters, and the fleet gauges.
    pub metrics: Metrics,
    /// When the fleet gauges were last computed.
    gauges_at: Mutex<Option<std::time::Instant>>,
    /// When the rollout loop last completed a round with the store answering.
    last_round: Mutex<Option<std::time::Instant>>,
    /// Rollouts whose step fails, and when that was last logged.
    step_failures: Mutex<HashMap<String, std::time::Instant>>,
    /// The time of day: event stamps, request-signature freshness, deadlines.
    clock: Arc<dyn turnout_rt::Clock>,
    /// The pins of the CAs agents may trust this coordinator by (empty
    /// when it serves plain HTTP); join lines carry them.
    ca_pins: Mutex<Vec<turnout_rt::tls::Pin>>,
    /// Those CAs' certificates (PEM), for agents to keep as `ca.pem`.
    ca_pem: Mutex<Option<String>>,
    /// When a refused operator request was last logged, and how many
    /// were not logged since.
    auth_complaints: Mutex<(Option<std::time::Instant>, u64)>,
    /// The director key: signs every v2 desired state (`STATE_DIR/director.pem`).
    director: Mutex<SecretKey>,
    /// The handovers from earlier director keys to later ones
    /// (`STATE_DIR/director-handovers.json`), for hosts that hold an older key.
    handovers: Mutex<Vec<turnout_proto::desired::Handover>>,
    /// Where the director key and its handovers are kept.
    director_path: PathBuf,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Coordinator({})", self.bundles_dir.display())
    }
}

impl Coordinator {
    /// Opens the coordinator's state in `state_dir` (database and bundle
    /// store), on the system clock.
    pub fn open(
        state_dir: &Path,
        trust: Trust,
        settings: Settings,
    ) -> Result<Coordinator, anyhow::Error> {
        Coordinator::open_with_clock(
            state_dir,
            trust,
            settings,
            turnout_rt::SystemClock::shared(),
        )
    }

    /// Like [`open`](Self::open), on `clock` (tests: a manual one).
    pub fn open_with_clock(
        state_dir: &Path,
        trust: Trust,
        settings: Settings,
        clock: Arc<dyn turnout_rt::Clock>,
    ) -> Result<Coordinator, anyhow::Error> {
        // The database first: one this build refuses leaves the state
        // directory as it found it.
        std::fs::create_dir_all(state_dir)?;
        let store = Store::open(&state_dir.join("coordinator.db"))?;
        let bundles_dir = state_dir.join("bundles");
        std::fs::create_dir_all(&bundles_dir)?;
        let removed = crate::server::remove_unfinished_pushes(&bundles_dir)?;
        if removed > 0 {
            tracing::info!(
                "removed {removed} unfinished bundle upload(s) from {}",
                bundles_dir.display()
            );
        }
        let latest = store.last_event_id()?;
        let director_path = state_dir.join("director.pem");
        let director = load_or_make_director(&director_path)?;
        let handovers = load_handovers(&director_path)?;
        let rotations_dir = state_dir.join("trust");
        let (trust, rotations) = load_rotations(trust, &rotations_dir)?;
        let policy_path = state_dir.join("policy.json");
        let policy = load_policy(&policy_path)?;
        Ok(Coordinator {
            store: Mutex::new(store),
            trust: Mutex::new(trust),
            rotations: Mutex::new(rotations),
            rotations_dir,
            policy: Mutex::new(policy),
            policy_path,
            bundles_dir,
            settings,
            broker: Broker::default(),
            events: watch::channel(latest).0,
            wake: Notify::new(),
            stopping: watch::channel(false).0,
            auth: HostAuth::default(),
            reports: ReportQueue::default(),
            metrics: Metrics::default(),
            gauges_at: Mutex::new(None),
            last_round: Mutex::new(Some(std::time::Instant::now())),
            step_failures: Mutex::new(HashMap::new()),
            clock,
            ca_pins: Mutex::new(Vec::new()),
            ca_pem: Mutex::new(None),
            auth_complaints: Mutex::new((None, 0)),
            director: Mutex::new(director),
            handovers: Mutex::new(handovers),
            director_path,
        })
    }

    /// The director key's public half, which agents verify desired state with.
    pub fn director_public(&self) -> turnout_proto::keys::PublicKey {
        self.director.lock().expect("not poisoned").public()
    }

    /// The handovers that lead from earlier director keys to this one.
    pub fn director_handovers(&self) -> Vec<turnout_proto::desired::Handover> {
        self.handovers.lock().expect("not poisoned").clone()
    }

    /// Reads the director key and its handovers again (`turnout director
    /// rotate` wrote new ones); a key that does not read is logged and the
    /// one in use kept.
    pub fn reload_director(&self) {
        let key = match std::fs::read_to_string(&self.director_path)
            .map_err(|e| e.to_string())
            .and_then(|text| SecretKey::from_pem(&text).map_err(|e| e.to_string()))
        {
            Ok(key) => key,
            Err(err) => {
                tracing::warn!(
                    "reading {}: {err}; signing with the director key in use",
                    self.director_path.display()
                );
                return;
            }
        };
        let mut current = self.director.lock().expect("not poisoned");
        if current.public() == key.public() {
            return;
        }
        match load_handovers(&self.director_path) {
            Ok(handovers) => *self.handovers.lock().expect("not poisoned") = handovers,
            Err(err) => {
                tracing::warn!("{err}; signing with the director key in use");
                return;
            }
        }
        tracing::info!(
            old = %current.public().id(),
            new = %key.public().id(),
            "signing desired state with the new director key: hosts take it through its handover"
        );
        *current = key;
    }

    /// `state` signed for its host: issued now, valid for `desired_expiry`.
    pub fn sign_desired(&self, state: &DesiredState) -> turnout_proto::desired::SignedDesired {
        let now = self.now_ms();
        let mut dated = state.clone();
        dated.issued_at_ms = Some(now);
        dated.expires_ms = Some(now + self.settings.desired_expiry.as_millis() as u64);
        // Every answer: read the version under the lock, not a copy of the document.
        dated.policy_version = self
            .policy
            .lock()
            .expect("not poisoned")
            .as_ref()
            .map(|p| p.policy.version);
        turnout_proto::desired::SignedDesired::sign(
            &dated,
            &self.director.lock().expect("not poisoned"),
        )
    }

    /// The protocol range this coordinator accepts from agents now:
    /// `min_agent_proto` up to what this build speaks.
    pub fn offer(&self) -> turnout_proto::Offer {
        let mut offer = crate::offer();
        if let Some(range) = turnout_proto::ProtoRange::new(
            self.settings.min_agent_proto.min(offer.range.max()),
            offer.range.max(),
        ) {
            offer.range = range;
        }
        offer
    }

    /// Logs a refused operator request, at most once every ten seconds,
    /// saying how many were not logged in between (they are all counted in
    /// `turnout_auth_failures`): a guessing client must not flood the log.
    pub fn auth_complaint(&self, message: &str) {
        let mut complaints = self.auth_complaints.lock().expect("not poisoned");
        let (last, quiet) = &mut *complaints;
        if last.is_none_or(|at| at.elapsed() >= std::time::Duration::from_secs(10)) {
            if *quiet > 0 {
                tracing::warn!("{message} (and {quiet} more refused since the last such line)");
            } else {
                tracing::warn!("{message}");
            }
            *last = Some(std::time::Instant::now());
            *quiet = 0;
        } else {
            *quiet += 1;
        }
    }

    /// Sets the CA certificates agents are told to trust (`GET
    /// /v1/agent/ca`), and their pins.
    pub fn set_ca(&self, pins: Vec<turnout_rt::tls::Pin>, pem: Option<String>) {
        *self.ca_pins.lock().expect("not poisoned") = pins;
        *self.ca_pem.lock().expect("not poisoned") = pem;
    }

    /// The CA certificates (PEM) agents are told to trust, if this
    /// coordinator serves TLS.
    pub fn ca_pem(&self) -> Option<String> {
        self.ca_pem.lock().expect("not poisoned").clone()
    }

    /// The CA pins join lines carry (none for a plain-HTTP coordinator).
    pub fn ca_pins(&self) -> Vec<turnout_rt::tls::Pin> {
        self.ca_pins.lock().expect("not poisoned").clone()
    }

    /// Now, by this coordinator's clock.
    pub fn now(&self) -> std::time::SystemTime {
        self.clock.now()
    }

    /// Milliseconds since the epoch, by this coordinator's clock.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Runs `f` with the store.
    ///
    /// A panic while the store was held (a bug) does not take every later
    /// request down with it: the lock is taken back, and a transaction the
    /// panic left open is rolled back first.
    pub fn with_store<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        let mut store = self.store.lock().unwrap_or_else(|poisoned| {
            tracing::error!(
                "a request failed while holding the store; rolling back what it left open"
            );
            let store = poisoned.into_inner();
            store.roll_back_open_transaction();
            store
        });
        self.store.clear_poison();
        f(&mut store)
    }

    /// Whether the rollout loop completed a round (the store answered)
    /// within `period`: what the watchdog is fed on.
    pub fn loop_alive(&self, period: Duration) -> bool {
        self.last_round
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|at| at.elapsed() < period)
    }

    /// The trust bundles are checked against on push.
    pub fn trust(&self) -> Trust {
        self.trust.lock().expect("not poisoned").clone()
    }

    /// The release policy in force, if one was pushed.
    pub fn policy(&self) -> Option<turnout_proto::policy::PolicyFile> {
        self.policy.lock().expect("not poisoned").clone()
    }

    /// Takes `next` as the release policy if the release keys signed it (a
    /// threshold of the trust this coordinator applies) and it is newer than
    /// the one in force; keeps it and serves it to agents.
    pub fn set_policy(&self, next: &turnout_proto::policy::PolicyFile) -> Result<(), ApiError> {
        let trust = self.trust();
        let mut policy = self.policy.lock().expect("not poisoned");
        let current = policy.as_ref().map(|p| &p.policy);
        turnout_proto::policy::accept(&trust, current, next)
            .map_err(|err| ApiError::rejected(err.to_string()))?;
        if next.policy.expired(std::time::SystemTime::now()) {
            return Err(ApiError::rejected(format!(
                "policy version {} expired at {}: hosts would hold every install back at once; sign one that \
                 expires later (`turnout policy set … --expires 90d`)",
                next.policy.version, next.policy.expires
            )));
        }
        if current.is_some_and(|c| c.version == next.policy.version) {
            return Err(ApiError::conflict(format!(
                "policy version {} is already in force: raise the version to change it",
                next.policy.version
            )));
        }
        turnout_rt::files::write_atomic(&self.policy_path, &next.to_bytes(), 0o644).map_err(
            |e| ApiError::internal(format!("writing {}: {e}", self.policy_path.display())),
        )?;
        *policy = Some(next.clone());
        Ok(())
    }

    /// The trust rotations pushed so far (trust files, oldest first), for agents.
    pub fn rotations(&self) -> Vec<String> {
        self.rotations.lock().expect("not poisoned").clone()
    }

    /// Takes `file` as the next release trust if it passes the rotation
    /// rules from the current one, keeps it, and serves it to agents from
    /// now on; returns the version it replaced.
    pub fn rotate_trust(&self, file: &turnout_proto::trust::TrustFile) -> Result<u64, ApiError> {
        let mut trust = self.trust.lock().expect("not poisoned");
        trust.accept_rotation(file).map_err(|err| {
            ApiError::rejected(format!(
                "the trust file is not a valid rotation of the coordinator's version {}: {err}",
                trust.version()
            ))
        })?;
        std::fs::create_dir_all(&self.rotations_dir).map_err(|e| {
            ApiError::internal(format!("creating {}: {e}", self.rotations_dir.display()))
        })?;
        let path = self
            .rotations_dir
            .join(format!("{}.json", file.trust.version()));
        let bytes = file.to_bytes();
        turnout_rt::files::write_atomic(&path, &bytes, 0o644)
            .map_err(|e| ApiError::internal(format!("writing {}: {e}", path.display())))?;
        let before = trust.version();
        *trust = file.trust.clone();
        let served = read_rotations(&self.rotations_dir)
            .map_err(|e| ApiError::internal(e.to_string()))?
            .iter()
            .map(|f| String::from_utf8_lossy(&f.to_bytes()).into_owned())
            .collect();
        *self.rotations.lock().expect("not poisoned") = served;
        Ok(before)
    }

    /// Where bundles are stored, by digest.
    pub fn bundle_path(&self, sha256: &str) -> PathBuf {
        self.bundles_dir.join(format!("{sha256}.tnt"))
    }

    /// The directory of the bundle store.
    pub fn bundles_dir(&self) -> &Path {
        &self.bundles_dir
    }

    /// The settings.
    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// An enrolled host's public key, from memory or the store.
    pub fn host_key(&self, host: &str) -> Result<Option<turnout_proto::keys::PublicKey>, ApiError> {
        self.auth.key(host, || {
            let Some(pem) = self.with_store(|s| s.host_key(host))? else {
                return Ok(None);
            };
            turnout_proto::keys::PublicKey::from_pem(&pem)
                .map(Some)
                .map_err(|e| ApiError {
                    status: 500,
                    code: ErrorCode::Internal,
                    message: e.to_string(),
                })
        })
    }

    /// Drops what is kept in memory of a host (it re-enrolled, or was forgotten).
    pub fn forget_key(&self, host: &str) {
        self.auth.forget(host);
        self.broker.forget(host);
    }

    /// Records `signature`, of a request stamped `ts_ms`, as used; false if
    /// it was used before (a replay).
    pub fn first_use(&self, signature: &[u8], ts_ms: u64, now: u64) -> bool {
        let window = self.settings.freshness.as_millis() as u64;
        self.auth.first_use(signature, ts_ms, now, window)
    }

    /// Whether `host` agreed to long polls in its last hello.
    pub fn long_polls(&self, host: &str) -> Result<bool, ApiError> {
        Ok(self.agreement(host)?.long_poll)
    }

    /// What `host` agreed to in its last hello (from memory, else the
    /// store); v1 without long polls when it never said hello.
    pub fn agreement(&self, host: &str) -> Result<Agreed, ApiError> {
        if let Some(known) = self.broker.agreement(host) {
            return Ok(known);
        }
        let negotiated = self.with_store(|s| s.host_agreement(host))?;
        let agreed = match negotiated {
            Some((version, capabilities)) => agreed(version, Some(&capabilities)),
            None => agreed(ProtoVersion::V1, None),
        };
        self.broker.agreed(host, agreed);
        Ok(agreed)
    }

    /// Remembers what `host` agreed to in a hello (None: it was refused).
    pub fn hello_agreed(&self, host: &str, agreement: Option<&turnout_proto::Agreement>) {
        let agreed = match agreement {
            Some(a) => agreed(a.version, Some(&a.capabilities)),
            None => agreed(ProtoVersion::V1, None),
        };
        self.broker.agreed(host, agreed);
    }

    /// `host`'s desired state, from memory when it is known there.
    pub fn desired(&self, host: &HostId) -> Result<Arc<DesiredState>, ApiError> {
        if let Some(state) = self.broker.cached(host.as_str()) {
            return Ok(state);
        }
        // Read and remembered under the store's lock, as `step` changes both:
        // a read can never put back a state older than a change.
        Ok(self.with_store(|s| -> Result<_, StoreError> {
            Ok(self.broker.remember(host.as_str(), s.desired(host)?))
        })?)
    }

    /// Queues a report; the rollout loop writes queued reports in one
    /// transaction (see `flush`), and stepping a rollout flushes first.
    pub fn queue_report(&self, report: turnout_proto::messages::Report, now: u64) {
        if !self.reports.report(report, now) {
            self.metrics.stale_report();
        }
        self.wake();
    }

    /// Queues "seen at `now`, done with desired states up to `acked`" for
    /// a host (a long poll arrived; an agent asks for the next desired state
    /// only once it has acted on the one before).
    pub fn queue_seen(&self, host: &str, now: u64, acked: u64) {
        self.reports.seen(host, now, acked);
    }

    /// Writes queued reports and last-seen times, in one transaction.
    pub fn flush(&self) -> Result<(), ApiError> {
        self.with_store(|s| self.flush_into(s))
    }

    fn flush_into(&self, store: &mut Store) -> Result<(), ApiError> {
        let queued = self.reports.take();
        if queued.is_empty() {
            return Ok(());
        }
        let raised = store.atomically(|s| {
            let mut raised = Vec::new();
            for (report, at) in queued.reports.values() {
                if !s.record_report(report, *at)? {
                    self.metrics.stale_report();
                    continue;
                }
                if let Some(accepted) = report.accepted_index
                    && let Some(index) = s.raise_desired_index(report.host.as_str(), accepted)?
                {
                    raised.push((report.host.to_string(), accepted, index));
                }
            }
            for (host, (at, acked)) in &queued.seen {
                s.touch(host, *at, *acked)?;
            }
            Ok(raised)
        })?;
        for (host, accepted, index) in raised {
            // What is in memory is older than the store now.
            self.broker.forget_state(&host);
            self.broker.notify(&host, index);
            let message = format!(
                "its desired-state index moved to {index}, past index {accepted} that the host accepted before (was \
                 the coordinator's database restored from a backup?): the host takes the next answer"
            );
            tracing::warn!(host = %host, "{message}");
            let id = store.log(self.now_ms(), "coordinator", None, Some(&host), &message)?;
            self.events.send_replace(id);
        }
        Ok(())
    }

    /// A receiver that changes when `host`'s desired-state index does.
    pub fn watch_desired(&self, host: &str, current: u64) -> watch::Receiver<u64> {
        self.broker.watch(host, current)
    }

    /// How many long polls are waiting on `host`'s desired state right now.
    pub fn waiting(&self, host: &str) -> usize {
        self.broker.waiting(host)
    }

    /// A receiver that changes when the event log grows.
    pub fn watch_events(&self) -> watch::Receiver<u64> {
        self.events.subscribe()
    }

    /// Appends to the event log.
    pub fn log(
        &self,
        actor: &str,
        rollout: Option<&str>,
        host: Option<&str>,
        message: &str,
    ) -> Result<(), ApiError> {
        let id = self.with_store(|s| s.log(self.now_ms(), actor, rollout, host, message))?;
        self.events.send_replace(id);
        Ok(())
    }

    /// Tells long polls to answer now: the server is shutting down.
    pub fn stop_waiting(&self) {
        self.stopping.send_replace(true);
    }

    /// Resolves when the server starts shutting down.
    pub async fn stopped(&self) {
        let mut stopping = self.stopping.subscribe();
        let _ = stopping.wait_for(|s| *s).await;
    }

    /// Wakes the rollout loop (a host reported).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Whether a host counts as online at `now`.
    pub fn online(&self, host: &HostRecord, now: u64) -> bool {
        let window = self.settings.report_interval.as_millis() as u64
            * u64::from(self.settings.offline_after);
        host.incompatible.is_none()
            && host.last_seen_ms > 0
            && now.saturating_sub(host.last_seen_ms) <= window
    }

    fn view(&self, host: &HostRecord, service: &ServiceName, now: u64) -> HostView {
        let report = host
            .report
            .as_ref()
            .and_then(|r| r.services.iter().find(|s| &s.service == service));
        host_view(
            report,
            self.online(host, now),
            host.acked_index >= host.desired_index,
        )
    }

    fn fleet(&self, rollout: &Rollout, hosts: &[HostRecord], now: u64) -> Fleet {
        hosts
            .iter()
            .filter(|h| rollout.hosts.contains_key(&h.id))
            .map(|h| (h.id.clone(), self.view(h, &rollout.spec.service, now)))
            .collect()
    }

    /// Validates a spec and computes its cohorts, moving nothing.
    pub fn plan(&self, raw: &RawSpec, id: Option<String>) -> Result<PlanView, ApiError> {
        let spec = RolloutSpec::from_raw(raw).map_err(|e| ApiError::bad_request(e.to_string()))?;
        self.flush()?;
        let (bundles, hosts, rollouts) = self.with_store(|s| -> Result<_, StoreError> {
            Ok((s.bundles()?, s.hosts()?, s.rollouts()?))
        })?;
        let bundle = bundles
            .iter()
            .find(|b| match &spec.release {
                ReleaseSelector::Named { name, version } => b.name == *name && b.version == version.to_string(),
                ReleaseSelector::Digest(d) => b.sha256 == d.as_str(),
            })
            .ok_or_else(|| ApiError::not_found(format!("release {} is not in the bundle store; push it first with `turnout bundle push FILE`", spec.release)))?;
        if bundle.name != spec.service.as_str() {
            return Err(ApiError::bad_request(format!(
                "release {} {} is a bundle of {}, not of service {}",
                bundle.name, bundle.version, bundle.name, spec.service
            )));
        }
        let target = ReleaseRef {
            name: bundle.name.clone(),
            version: bundle.version.parse().map_err(|e| {
                ApiError::from(StoreError::Corrupt {
                    path: "coordinator.db".into(),
                    what: format!("bundle {}", bundle.sha256),
                    detail: format!("version {:?}: {e}", bundle.version),
                })
            })?,
            sha256: bundle.sha256.parse().map_err(|e: turnout_proto::IdError| {
                ApiError::from(StoreError::Corrupt {
                    path: "coordinator.db".into(),
                    what: format!("bundle {}", bundle.sha256),
                    detail: e.to_string(),
                })
            })?,
        };
        if let Some(policy) = self.policy()
            && let Err(rule) = policy.policy.check(spec.service.as_str(), &target)
        {
            return Err(ApiError::conflict(format!(
                "{rule}: every host would refuse it; roll out a release the policy allows, or change the policy \
                 with `turnout policy set` (signed by the release keys)"
            )));
        }
        let mut eligible = Vec::new();
        let mut excluded = BTreeMap::new();
        for host in hosts.iter().filter(|h| spec.selects(&h.labels)) {
            let runs_service = host
                .report
                .as_ref()
                .is_some_and(|r| r.services.iter().any(|s| s.service == spec.service));
            if let Some(why) = &host.incompatible {
                excluded.insert(host.id.to_string(), format!("incompatible: {why}"));
            } else if !runs_service && spec.service.as_str() == AGENT_SERVICE {
                excluded.insert(
                    host.id.to_string(),
                    format!(
                        "its agent ({}) cannot upgrade itself (it does not report service {AGENT_SERVICE}): \
                         upgrade it once by hand, see docs/operations.md",
                        host.agent_version.as_deref().unwrap_or("unknown version")
                    ),
                );
            } else if !runs_service {
                excluded.insert(
                    host.id.to_string(),
                    format!("its agent does not manage service {}", spec.service),
                );
            } else if let Some(why) = host
                .report
                .as_ref()
                .and_then(|r| r.desired_refused.as_ref())
            {
                // It would sit on the dispatch until the deadline.
                excluded.insert(
                    host.id.to_string(),
                    format!("it refuses this coordinator's desired state: {why}"),
                );
            } else if let Some(since) = host.stale_since() {
                excluded.insert(
                    host.id.to_string(),
                    format!(
                        "its desired state has been stale since {} (it hears no valid answer); it starts nothing new",
                        turnout_proto::desired::utc(since)
                    ),
                );
            } else {
                eligible.push(host.id.clone());
            }
        }
        if eligible.is_empty() {
            let selector: Vec<String> = spec
                .selector
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            return Err(ApiError::bad_request(format!(
                "the selector {:?} matches no host that runs service {} ({} enrolled host(s), {} matched but cannot take part)",
                selector.join(","),
                spec.service,
                hosts.len(),
                excluded.len()
            )));
        }
        if let Some(id) = &id {
            id.parse::<turnout_proto::RolloutId>()
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
        }
        let id = id.unwrap_or_else(|| {
            // A version's build metadata (`+…`) is no id character.
            let version = target.version.to_string().replace('+', "_");
            let prefix = format!("{}-{version}", spec.service);
            let n = rollouts
                .iter()
                .filter(|r| r.id.starts_with(&prefix))
                .count()
                + 1;
            format!("{prefix}-{n}")
        });
        let waves = engine::plan(&id, &spec, &eligible);
        // Hosts past the last wave are not moved: say so, not silently.
        let planned: HashSet<&HostId> = waves.iter().flatten().collect();
        let last = spec
            .waves
            .last()
            .map(ToString::to_string)
            .unwrap_or_default();
        for host in eligible.iter().filter(|h| !planned.contains(h)) {
            excluded.insert(
                host.to_string(),
                format!(
                    "beyond the last wave (the waves end at {last}); add a wave of 100% to move it"
                ),
            );
        }
        let warnings = if spec.service.as_str() == AGENT_SERVICE {
            self.agent_upgrade_warnings(&target, &waves)
        } else {
            Vec::new()
        };
        Ok(PlanView {
            id,
            spec,
            target,
            waves,
            excluded,
            warnings,
        })
    }

    /// What to know before upgrading the agents of `waves` to `target`:
    /// whether the new agent speaks a protocol this coordinator accepts.
    fn agent_upgrade_warnings(&self, target: &ReleaseRef, waves: &[Vec<HostId>]) -> Vec<String> {
        let path = self.bundle_path(target.sha256.as_str());
        let head = std::fs::File::open(&path).ok().and_then(|f| {
            turnout_proto::bundle::read_head(std::io::BufReader::new(f), &Default::default()).ok()
        });
        let accepted = self.offer().range;
        let hosts: Vec<&str> = waves.iter().flatten().map(HostId::as_str).collect();
        let shown = if hosts.len() > 10 {
            format!("{} and {} more", hosts[..10].join(", "), hosts.len() - 10)
        } else {
            hosts.join(", ")
        };
        match head
            .as_ref()
            .and_then(|h| declared_proto(&h.manifest.provides))
        {
            None => vec![format!(
                "{} {} does not say which protocol versions it speaks (its manifest has no \
                 `turnout-proto/MIN-MAX` in provides; `turnout pack --name {AGENT_SERVICE}` adds it): \
                 this plan cannot check that the upgraded agents will still talk to this coordinator ({accepted})",
                target.name, target.version
            )],
            Some(range) if range.intersect(accepted).is_none() => vec![format!(
                "{} {} speaks protocol {range}, which does not overlap what this coordinator accepts ({accepted}): \
                 after the upgrade, hosts {shown} could not report, and their dead-man switches would put the \
                 old agent back",
                target.name, target.version
            )],
            Some(_) => Vec::new(),
        }
    }

    /// Starts a rollout (one active rollout per service).
    pub fn start(
        &self,
        raw: &RawSpec,
        id: Option<String>,
        actor: &str,
    ) -> Result<Rollout, ApiError> {
        let plan = self.plan(raw, id)?;
        let now = self.now_ms();
        let size = self
            .with_store(|s| s.bundles())?
            .into_iter()
            .find(|b| b.sha256 == plan.target.sha256.as_str())
            .map_or(0, |b| b.size);
        let rollout = self.with_store(|store| {
            let existing = store.rollouts()?;
            if let Some(why) = engine::start_conflict(&plan.spec.service, &existing) {
                return Ok(Err(ApiError::conflict(why)));
            }
            if existing.iter().any(|r| r.id == plan.id) {
                return Ok(Err(ApiError::conflict(format!(
                    "a rollout with id {} exists already",
                    plan.id
                ))));
            }
            let rollout = Rollout::new(
                plan.id.clone(),
                plan.spec.clone(),
                plan.target.clone(),
                size,
                plan.waves.clone(),
                now,
            );
            store.atomically(|s| {
                s.save_rollout(&rollout, now)?;
                s.log(
                    now,
                    actor,
                    Some(&rollout.id),
                    None,
                    &format!(
                        "started: {} to {} {}",
                        rollout.spec.service, rollout.target.name, rollout.target.version
                    ),
                )?;
                for (i, wave) in rollout.waves.iter().enumerate() {
                    let hosts: Vec<&str> = wave.iter().map(HostId::as_str).collect();
                    s.log(
                        now,
                        "engine",
                        Some(&rollout.id),
                        None,
                        &format!("planned wave {}: {}", i + 1, hosts.join(", ")),
                    )?;
                }
                Ok(())
            })?;
            Ok::<_, StoreError>(Ok(rollout))
        })??;
        self.step(&rollout.id, Input::Tick, actor)
    }

    /// Steps one rollout with `input`, applying its actions atomically.
    #[tracing::instrument(name = "rollout_step", skip_all, fields(rollout = %id, actor = %actor))]
    pub fn step(&self, id: &str, input: Input, actor: &str) -> Result<Rollout, ApiError> {
        let now = self.now_ms();
        let mut notify = Vec::new();
        let mut cleared = Vec::new();
        let mut last_event = None;
        self.flush()?;
        let result = self.with_store(|store| -> Result<Result<Rollout, ApiError>, StoreError> {
            let Some(rollout) = store.rollout(id)? else {
                return Ok(Err(ApiError::not_found(format!(
                    "no rollout {id}; `turnout rollout list` shows them"
                ))));
            };
            if matches!(input, Input::Rollback { .. })
                && let Some(why) = engine::rollback_conflict(&rollout, &store.rollouts()?)
            {
                return Ok(Err(ApiError::conflict(format!(
                    "cannot roll back rollout {id}: {why}"
                ))));
            }
            let hosts = store.hosts()?;
            let fleet = self.fleet(&rollout, &hosts, now);
            let command = input != Input::Tick;
            let (rollout, actions) = match engine::step(rollout, input.clone(), now, &fleet) {
                Ok(next) => next,
                Err(refused) => return Ok(Err(ApiError::conflict(refused.to_string()))),
            };
            // Hosts on protocol v1 (0.1.0) never fetch the release policy:
            // the coordinator does not order them a release it forbids.
            let policy = self.policy();
            let forbidden_for_legacy = |host: &HostId, release: &ReleaseRef| -> Option<String> {
                let rule = policy
                    .as_ref()?
                    .policy
                    .check(rollout.spec.service.as_str(), release)
                    .err()?;
                let legacy = hosts
                    .iter()
                    .find(|h| &h.id == host)
                    .is_some_and(HostRecord::legacy);
                legacy.then_some(rule)
            };
            store.atomically(|s| {
                if command {
                    last_event = Some(s.log(now, actor, Some(id), None, &requested(&input))?);
                }
                for action in &actions {
                    match action {
                        Action::SetDesired { host, release }
                            if let Some(rule) = forbidden_for_legacy(host, release) =>
                        {
                            last_event = Some(s.log(
                                now,
                                "coordinator",
                                Some(id),
                                Some(host.as_str()),
                                &format!(
                                    "not told to move to {}: {rule}, and the host speaks protocol v1, which does not \
                                     enforce the release policy; upgrade its agent",
                                    release.version
                                ),
                            )?);
                        }
                        Action::SetDesired { host, release } => {
                            let index = s.set_desired(
                                host,
                                &rollout.spec.service,
                                release,
                                rollout.size,
                                Some(id),
                            )?;
                            notify.push((
                                host.clone(),
                                index,
                                DesiredService {
                                    service: rollout.spec.service.clone(),
                                    release: release.clone(),
                                    size: rollout.size,
                                    urls: Vec::new(),
                                    rollout: Some(id.to_owned()),
                                },
                            ));
                        }
                        Action::ClearDesired { host } => {
                            let index = s.clear_desired(host, &rollout.spec.service)?;
                            cleared.push((host.clone(), index));
                        }
                        Action::Log { host, message } => {
                            last_event = Some(s.log(
                                now,
                                "engine",
                                Some(id),
                                host.as_ref().map(HostId::as_str),
                                message,
                            )?);
                        }
                    }
                }
                s.save_rollout(&rollout, now)
            })?;
            // Known desired states change in memory as they did in the store,
            // still under its lock (see `desired`).
            for (host, index, service) in &notify {
                self.broker.set(host.as_str(), *index, service);
            }
            for (host, index) in &cleared {
                self.broker
                    .clear(host.as_str(), *index, rollout.spec.service.as_str());
            }
            Ok(Ok(rollout))
        })?;
        for (host, index, _) in notify {
            self.broker.notify(host.as_str(), index);
        }
        for (host, index) in cleared {
            self.broker.notify(host.as_str(), index);
        }
        if let Some(id) = last_event {
            self.events.send_replace(id);
        }
        result
    }

    fn flush_or_log(&self) {
        if let Err(err) = self.flush() {
            tracing::warn!("writing reports: {err}");
        }
    }

    /// Recomputes the fleet gauges `/metrics` shows, from the store.
    pub fn refresh_gauges(&self) -> Result<(), ApiError> {
        let now = self.now_ms();
        let (hosts, rollouts) =
            self.with_store(|s| -> Result<_, StoreError> { Ok((s.hosts()?, s.rollouts()?)) })?;
        let mut by_state: BTreeMap<&'static str, i64> =
            [("online", 0), ("offline", 0), ("incompatible", 0)].into();
        let mut agents: BTreeMap<(String, String), i64> = BTreeMap::new();
        let mut stale = 0;
        for h in &hosts {
            stale += i64::from(h.stale_since().is_some());
            let state = if h.incompatible.is_some() {
                "incompatible"
            } else if self.online(h, now) {
                "online"
            } else {
                "offline"
            };
            *by_state.entry(state).or_default() += 1;
            let key = (
                h.agent_version.clone().unwrap_or_else(|| "unknown".into()),
                h.proto.map_or("none".into(), |p| p.to_string()),
            );
            *agents.entry(key).or_default() += 1;
        }
        let mut states: BTreeMap<&'static str, i64> = BTreeMap::new();
        let mut phases: BTreeMap<(String, &'static str), i64> = BTreeMap::new();
        for r in &rollouts {
            *states.entry(r.state.name()).or_default() += 1;
            if !r.state.is_finished() {
                for h in r.hosts.values() {
                    *phases.entry((r.id.clone(), h.phase.name())).or_default() += 1;
                }
            }
        }
        self.metrics.set_fleet(&crate::metrics::FleetSnapshot {
            hosts: by_state.into_iter().collect(),
            agents: agents.into_iter().collect(),
            rollouts: states.into_iter().collect(),
            phases: phases.into_iter().collect(),
            stale,
        });
        Ok(())
    }

    /// Writes queued reports, then steps every unfinished rollout once.
    pub fn tick(&self) {
        self.flush_or_log();
        {
            let mut last = self.gauges_at.lock().expect("not poisoned");
            if last.is_none_or(|at| at.elapsed() >= GAUGES_EVERY) {
                *last = Some(std::time::Instant::now());
                if let Err(err) = self.refresh_gauges() {
                    tracing::warn!("computing metrics: {err}");
                }
            }
        }
        let active: Vec<String> = match self.with_store(|s| s.active_rollout_ids()) {
            Ok(ids) => ids,
            Err(err) => {
                tracing::warn!("reading rollouts: {err}");
                return;
            }
        };
        for id in active {
            match self.step(&id, Input::Tick, "engine") {
                Ok(_) => {
                    self.step_failures
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .remove(&id);
                }
                Err(err) => {
                    // Said once a minute, not at every tick.
                    let mut failures = self
                        .step_failures
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let last = failures.get(&id).copied();
                    if last.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                        failures.insert(id.clone(), std::time::Instant::now());
                        tracing::error!(rollout = %id, "stepping the rollout failed: {err}");
                    }
                }
            }
        }
        *self
            .last_round
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(std::time::Instant::now());
        self.metrics.engine_round();
    }

    /// Writes queued reports and steps rollouts every tick, and soon after a
    /// host reports, until `shutdown`; then writes what is still queued.
    /// The work runs on a blocking thread, so a slow disk never stalls the
    /// async workers that serve requests.
    pub async fn run_rollouts(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        /// Reports arriving within this long of each other are written together.
        const BATCH: Duration = Duration::from_millis(20);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(self.settings.tick) => {}
                () = self.wake.notified() => {}
            }
            let c = self.clone();
            let _ = tokio::task::spawn_blocking(move || c.tick()).await;
            tokio::time::sleep(BATCH).await;
        }
        let c = self.clone();
        let _ = tokio::task::spawn_blocking(move || c.flush_or_log()).await;
    }

    /// Every rollout.
    pub fn rollouts(&self) -> Result<Vec<Rollout>, ApiError> {
        Ok(self.with_store(|s| s.rollouts())?)
    }

    /// One rollout.
    pub fn rollout(&self, id: &str) -> Result<Rollout, ApiError> {
        self.with_store(|s| s.rollout(id))?.ok_or_else(|| {
            ApiError::not_found(format!(
                "no rollout {id}; `turnout rollout list` shows them"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use turnout_proto::messages::Health;

    fn service(state: ServiceState, target: bool) -> ServiceReport {
        ServiceReport {
            service: "web".parse().unwrap(),
            state,
            active_slot: None,
            committed: None,
            other: None,
            target: target.then(|| ReleaseRef {
                name: "web".into(),
                version: "2.0.0".parse().unwrap(),
                sha256: turnout_proto::Digest::from_bytes([2; 32]),
            }),
            health: Health::Unhealthy,
            last_outcome: None,
            last_error: Some("check http failed 3 times in a row".into()),
        }
    }

    #[test]
    fn a_host_reverting_from_a_release_has_failed_on_it() {
        let (release, reason) = reverting(&service(ServiceState::Reverting, true))
            .expect("a revert in progress is a failure");
        assert_eq!(release.version.to_string(), "2.0.0");
        assert_eq!(reason, "reverting: check http failed 3 times in a row");
        assert_eq!(reverting(&service(ServiceState::Baking, true)), None);
        assert_eq!(reverting(&service(ServiceState::Reverting, false)), None);
    }
}
