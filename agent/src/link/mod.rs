//! The agent's link to its coordinator: enrollment, the handshake, the
//! desired-state long poll, convergence and reports.
//!
//! The link never touches a running service by itself: it only asks the
//! install cycle ([`Agent::install`], [`Agent::rollback`]) for what the
//! desired state says, and every decision of that cycle (bake, revert) stands.
//! When the coordinator is unreachable or refuses the handshake, services
//! keep running as they are and the link retries with exponential backoff
//! and full jitter (1 s doubling to 5 min), so a fleet cut off together does
//! not return together.
//!
//! - [`identity`]: the host's key and enrollment (`coordinator.json`);
//! - [`transport`]: signed HTTP requests on one pooled client;
//! - [`download`]: bundles into the cache, resumed and checked;
//! - the convergence policy is the pure [`converge::decide`](crate::converge::decide).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use turnout_proto::keys::SecretKey;
use turnout_proto::messages::{
    DesiredService, DesiredState, Health, Hello, Incompatible, Outcome, OutcomeKind, ReleaseRef,
    Report, ServiceReport, ServiceState, Welcome,
};
use turnout_proto::{Capability, CapabilitySet, HostId, encode, request_auth};
use turnout_rt::tls::CertificateDer;

use crate::converge;
use crate::service::{Agent, ServiceStatus, now_ms};

mod download;
mod identity;
mod policy;
mod rotation;
mod signed;
mod transport;
mod upgrade;

pub use identity::{EnrollTrust, Identity};
use transport::{client, error_message, http, signing_time};

/// Why the link failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The coordinator could not be reached.
    #[error("cannot reach the coordinator at {url}: {detail}")]
    Unreachable {
        /// Where.
        url: String,
        /// Why.
        detail: String,
    },
    /// The coordinator answered with an error.
    #[error("the coordinator refused {what}: HTTP {status}: {message}")]
    Refused {
        /// The request.
        what: String,
        /// The status.
        status: u16,
        /// Its message.
        message: String,
    },
    /// The coordinator's certificate could not be trusted (pin, CA, name, dates).
    #[error("the coordinator at {url} could not be verified: {detail}")]
    Untrusted {
        /// Where.
        url: String,
        /// Why, and what to do.
        detail: String,
    },
    /// No common protocol version.
    #[error("{0}")]
    Incompatible(Incompatible),
    /// A desired state that failed its checks (signature, host, index,
    /// expiry), or a coordinator that would not sign it: nothing is acted on.
    #[error("{0}")]
    DesiredRefused(String),
    /// Local files.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What `status` shows about the link.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LinkStatus {
    /// The coordinator, when enrolled.
    pub coordinator: Option<String>,
    /// `connected`, `refused`, `untrusted`, `unreachable`, `standalone`.
    pub state: String,
    /// Why, when not connected.
    pub detail: Option<String>,
    /// The protocol version agreed in the last hello.
    #[serde(default)]
    pub proto: Option<u16>,
    /// When the newest signed desired state this host accepted expires
    /// (v2): past it, the host is stale and starts nothing new.
    #[serde(default)]
    pub desired_expires_ms: Option<u64>,
    /// Why the last desired state was refused, if it was.
    #[serde(default)]
    pub desired_refused: Option<String>,
    /// When this process last reported to the coordinator (ms since the epoch).
    #[serde(default)]
    pub reported_ms: Option<u64>,
}

/// Every this many poll rounds (at least one report interval each), the
/// link asks which CAs to trust: within 5 minutes at a 10 s interval.
const CA_CHECK_ROUNDS: u64 = 30;

/// The running link.
pub struct Link {
    agent: Arc<Agent>,
    identity: Identity,
    status: Arc<Mutex<LinkStatus>>,
    cache: PathBuf,
    /// Per service, why its desired release is refused here, for reports.
    refusals: Mutex<BTreeMap<String, String>>,
    /// The last report's `seq`.
    last_seq: Mutex<u64>,
    /// One HTTP client (a pool) for everything the link asks; replaced
    /// when the coordinator's CA bundle changes (a CA rotation).
    client: Mutex<ureq::Agent>,
    /// The pins of the CAs the client trusts now.
    trusted: Mutex<Vec<turnout_rt::tls::Pin>>,
    /// [`Identity::files`] as this link knows them: when the files differ,
    /// the host enrolled again and the link ends (see [`follow`]).
    files: Mutex<[u8; 32]>,
    /// The protocol version agreed in the last hello.
    version: Mutex<turnout_proto::ProtoVersion>,
    /// The coordinator's director keys (v2 desired state is signed by one).
    directors: Mutex<Vec<turnout_proto::desired::Director>>,
    /// The newest signed desired state accepted (`desired.json`).
    accepted: Mutex<Option<turnout_proto::desired::Accepted>>,
    /// Why the last desired state was refused, for reports and status.
    desired_refused: Mutex<Option<String>>,
    /// The report interval the coordinator asked for in its welcome.
    interval: Mutex<Duration>,
    /// Why the last trust rotation offered was refused, for reports.
    trust_refused: Mutex<Option<String>>,
    /// The release policy held (`policy.json`).
    policy: Mutex<Option<turnout_proto::policy::Policy>>,
    /// Why the last policy offered was refused, for reports.
    policy_refused: Mutex<Option<String>>,
    /// Per service, the policy refusal already logged and recorded.
    policy_noted: Mutex<BTreeMap<String, String>>,
    /// Why no desired state is taken at all: `director.json` or
    /// `desired.json` is damaged (read at start).
    damaged: Mutex<Option<String>>,
    /// Why no install or rollback starts: `policy.json` is damaged.
    policy_damaged: Mutex<Option<String>>,
    /// The agent release this agent is switching to, once the switch began.
    switching: Mutex<Option<ReleaseRef>>,
}

/// How often a link, or an agent not enrolled, looks for a new enrollment.
const ENROLLMENT_CHECK: Duration = Duration::from_secs(5);

/// Runs the link of the enrollment in `STATE_DIR`, until the task is
/// dropped: when the host enrolls (again) while the agent runs, the link
/// ends at its next safe point (between rounds, or in its backoff) and one
/// for the new enrollment starts. No restart is needed, and an install in
/// progress is never cut.
pub async fn follow(agent: Arc<Agent>) {
    let state_dir = agent.config().state_dir.clone();
    let mut complained = None;
    loop {
        match Identity::load(&state_dir) {
            Ok(Some(identity)) => {
                complained = None;
                tracing::info!(
                    "host {} following the coordinator at {}",
                    identity.host,
                    identity.coordinator
                );
                Link::new(Arc::clone(&agent), identity, agent.link())
                    .run()
                    .await;
                tracing::info!("the host enrolled again: following the new enrollment");
                continue;
            }
            Ok(None) => {}
            Err(err) => {
                let text = err.to_string();
                if complained.as_ref() != Some(&text) {
                    tracing::warn!("cannot load the host identity ({text}); running standalone");
                    complained = Some(text);
                }
            }
        }
        // Standalone until the files change.
        let files = Identity::files(&state_dir);
        while Identity::files(&state_dir) == files {
            tokio::time::sleep(ENROLLMENT_CHECK).await;
        }
    }
}

/// How far one service got toward its desired release.
enum Converged {
    /// An install or rollback ran (whatever its outcome).
    Acted,
    /// Nothing to do, or nothing that will be done.
    Settled,
    /// Another operation owns the service; not acted on yet.
    Waiting,
}

/// This agent's offer. Test builds (the `fault-injection` feature) may
/// narrow it with `TURNOUT_AGENT_TEST_PROTO=MIN-MAX` and
/// `TURNOUT_AGENT_TEST_WITHOUT=capability,…` to model older agents.
#[cfg(not(feature = "fault-injection"))]
pub fn offer() -> turnout_proto::Offer {
    crate::offer()
}

/// This agent's offer, narrowed by the test variables.
#[cfg(feature = "fault-injection")]
pub fn offer() -> turnout_proto::Offer {
    let mut offer = crate::offer();
    if let Ok(range) = std::env::var("TURNOUT_AGENT_TEST_PROTO") {
        let parsed = range.split_once('-').and_then(|(a, b)| {
            let version = |s: &str| {
                s.parse::<u16>()
                    .ok()
                    .and_then(turnout_proto::ProtoVersion::new)
            };
            turnout_proto::ProtoRange::new(version(a)?, version(b)?)
        });
        if let Some(range) = parsed {
            offer.range = range;
        }
    }
    if let Ok(without) = std::env::var("TURNOUT_AGENT_TEST_WITHOUT") {
        for name in without.split(',') {
            offer.capabilities.remove(&Capability::from(name.trim()));
        }
    }
    offer
}

impl Link {
    /// A link for `agent` as `identity`; `status` is shared with `turnout-agent status`.
    pub fn new(agent: Arc<Agent>, identity: Identity, status: Arc<Mutex<LinkStatus>>) -> Link {
        let cache = agent.config().state_dir.join("cache");
        let client = Mutex::new(client(&identity.ca));
        let trusted = Mutex::new(
            identity
                .ca
                .iter()
                .filter_map(|c| turnout_rt::tls::Pin::of_certificate(c).ok())
                .collect(),
        );
        let files = Mutex::new(identity.files);
        let state_dir = &agent.config().state_dir;
        // A damaged record fails closed: no desired state (or no install)
        // is taken until an operator acts, since the record is what keeps
        // a forged or older one out.
        let mut damaged = None;
        let directors = signed::load_directors(state_dir).unwrap_or_else(|err| {
            damaged = Some(signed::damaged_directors(&err));
            Vec::new()
        });
        let accepted = signed::load_accepted(state_dir).unwrap_or_else(|why| {
            damaged.get_or_insert(why);
            None
        });
        let (held_policy, policy_damaged) = match policy::load_policy(state_dir) {
            Ok(policy) => (policy, None),
            Err(why) => (None, Some(why)),
        };
        for why in damaged.iter().chain(policy_damaged.iter()) {
            tracing::error!("{why}");
        }
        Link {
            agent,
            identity,
            status,
            cache,
            refusals: Mutex::new(BTreeMap::new()),
            last_seq: Mutex::new(0),
            client,
            trusted,
            files,
            version: Mutex::new(turnout_proto::ProtoVersion::V1),
            directors: Mutex::new(directors),
            accepted: Mutex::new(accepted),
            desired_refused: Mutex::new(None),
            interval: Mutex::new(Duration::from_secs(10)),
            trust_refused: Mutex::new(None),
            policy: Mutex::new(held_policy),
            policy_refused: Mutex::new(None),
            policy_noted: Mutex::new(BTreeMap::new()),
            damaged: Mutex::new(damaged),
            policy_damaged: Mutex::new(policy_damaged),
            switching: Mutex::new(None),
        }
    }

    /// Whether the host enrolled again since this link started.
    fn reenrolled(&self) -> bool {
        Identity::files(&self.agent.config().state_dir) != *self.files.lock().expect("not poisoned")
    }

    /// Sleeps for `pause`, or less when the host enrolls again; returns
    /// whether it did.
    async fn pause_unless_reenrolled(&self, pause: Duration) -> bool {
        let end = tokio::time::Instant::now() + pause;
        loop {
            if self.reenrolled() {
                return true;
            }
            let now = tokio::time::Instant::now();
            if now >= end {
                return false;
            }
            tokio::time::sleep((end - now).min(ENROLLMENT_CHECK)).await;
        }
    }

    /// The HTTP client (a clone shares the pool).
    fn client(&self) -> ureq::Agent {
        self.client.lock().expect("not poisoned").clone()
    }

    /// Asks the coordinator which CAs to trust (over a connection already
    /// verified against the ones trusted now) and, when they changed, keeps
    /// them as `ca.pem` and trusts them from the next request: how a CA
    /// rotation reaches hosts without enrolling again. Failures only log.
    async fn refresh_ca(&self) {
        if !self.identity.coordinator.starts_with("https://") {
            return;
        }
        let (status, body) = match self.call("GET", "/v1/agent/ca".into(), Vec::new()).await {
            Ok(answer) => answer,
            Err(err) => {
                tracing::debug!("asking for the coordinator's CAs: {err}");
                return;
            }
        };
        #[derive(Deserialize)]
        struct Answer {
            pem: Option<String>,
        }
        let Some(pem) = (status == 200)
            .then(|| serde_json::from_slice::<Answer>(&body).ok())
            .flatten()
            .and_then(|a| a.pem)
        else {
            return;
        };
        let certs = match turnout_rt::tls::certificates_from_pem(pem.as_bytes()) {
            Ok(certs) => certs,
            Err(err) => {
                tracing::warn!(
                    "the coordinator's CA certificates do not read: {err}; keeping ca.pem"
                );
                return;
            }
        };
        let mut pins: Vec<turnout_rt::tls::Pin> = certs
            .iter()
            .filter_map(|c| turnout_rt::tls::Pin::of_certificate(c).ok())
            .collect();
        pins.sort_by_key(ToString::to_string);
        let mut trusted = self.trusted.lock().expect("not poisoned").clone();
        trusted.sort_by_key(ToString::to_string);
        if pins == trusted {
            return;
        }
        if self.reenrolled() {
            // The new enrollment's ca.pem stands; this link is ending.
            return;
        }
        let path = self.agent.config().state_dir.join("ca.pem");
        if let Err(err) = turnout_rt::files::write_atomic(
            &path,
            turnout_rt::tls::certificates_to_pem(&certs).as_bytes(),
            0o644,
        ) {
            tracing::warn!(
                "writing {}: {err}; trusting the CAs as they were",
                path.display()
            );
            return;
        }
        // The link's own write is no new enrollment.
        *self.files.lock().expect("not poisoned") = Identity::files(&self.agent.config().state_dir);
        *self.client.lock().expect("not poisoned") = client(&certs);
        let shown: Vec<String> = pins.iter().map(ToString::to_string).collect();
        tracing::info!(
            "the coordinator's CAs changed (a CA rotation): now trusting {}",
            shown.join(", ")
        );
        *self.trusted.lock().expect("not poisoned") = pins;
    }

    fn set(&self, state: &str, detail: Option<String>) {
        let mut status = self.status.lock().expect("not poisoned");
        status.coordinator = Some(self.identity.coordinator.clone());
        status.state = state.to_owned();
        status.detail = detail;
        drop(status);
        self.publish_desired();
    }

    /// Shows the signed desired state as it stands (protocol, expiry, the
    /// last refusal) in `status`, after every answer and at every change of
    /// the link: `status` never shows an old refusal or a staleness that
    /// a newer document ended.
    fn publish_desired(&self) {
        let version = *self.version.lock().expect("not poisoned");
        let mut status = self.status.lock().expect("not poisoned");
        status.proto = Some(version.get());
        status.desired_expires_ms = (version >= turnout_proto::ProtoVersion::V2)
            .then(|| {
                self.accepted
                    .lock()
                    .expect("not poisoned")
                    .as_ref()
                    .map(|a| a.expires_ms)
            })
            .flatten();
        status.desired_refused = self.desired_refused.lock().expect("not poisoned").clone();
    }

    /// Runs until the task is dropped or the host enrolls again:
    /// handshake, then converge and report.
    pub async fn run(self) {
        let mut failures = 0u32;
        loop {
            if self.reenrolled() {
                return;
            }
            let result = match self.hello().await {
                Ok(welcome) => match self.agreed(welcome.proto).await {
                    Ok(()) => {
                        failures = 0;
                        self.set("connected", None);
                        self.refresh_ca().await;
                        self.refresh_trust().await;
                        self.refresh_policy().await;
                        self.session(&welcome.body).await
                    }
                    Err(err) => Err(err),
                },
                Err(err) => Err(err),
            };
            // A session ends without an error only when the host enrolled again.
            let Err(err) = result else {
                return;
            };
            match &err {
                LinkError::Incompatible(refusal) => {
                    self.set("refused", Some(refusal.to_string()));
                    tracing::error!(
                        "the coordinator refused this agent: {refusal}; services keep running as they are"
                    );
                }
                LinkError::DesiredRefused(reason) => {
                    self.set("refusing", Some(reason.clone()));
                    tracing::error!(
                        "refused the coordinator's desired state: {reason}; services keep running as they are, retrying"
                    );
                    // The coordinator hears why, when it listens.
                    if let Err(err) = self.report(0).await {
                        tracing::debug!("reporting the refusal: {err}");
                    }
                }
                LinkError::Untrusted { .. } => {
                    self.set("untrusted", Some(err.to_string()));
                    tracing::error!(
                        "{err}; no desired state is taken from it, services keep running, retrying"
                    );
                }
                other => {
                    self.set("unreachable", Some(other.to_string()));
                    tracing::warn!("{other}; services keep running, retrying");
                }
            }
            // A refused desired state comes from a coordinator that answers:
            // asked again each report interval, not backed off, so the
            // host takes the next good one as soon as it is there.
            let pause = if let LinkError::DesiredRefused(_) = err {
                *self.interval.lock().expect("not poisoned")
            } else {
                failures = failures.saturating_add(1);
                backoff(failures)
            };
            if self.pause_unless_reenrolled(pause).await {
                return;
            }
        }
    }

    /// Takes the version agreed in a hello: a v2 link needs the director
    /// key; a host that knows one refuses to fall back to unsigned v1
    /// desired state (a downgrade: an old or impersonated coordinator).
    async fn agreed(&self, version: turnout_proto::ProtoVersion) -> Result<(), LinkError> {
        *self.version.lock().expect("not poisoned") = version;
        if let Some(why) = self.recheck_damaged() {
            *self.desired_refused.lock().expect("not poisoned") = Some(why.clone());
            return Err(LinkError::DesiredRefused(why));
        }
        if version >= turnout_proto::ProtoVersion::V2 {
            return self.ensure_director().await;
        }
        let known = self.directors.lock().expect("not poisoned").len();
        if known > 0 {
            let reason = format!(
                "the coordinator agreed protocol {version} only, which sends desired state unsigned, but this host \
                 knows the coordinator's director key and takes only signed desired state: upgrade the coordinator \
                 back to a release that speaks v2, or enroll this host again to start over with this one"
            );
            *self.desired_refused.lock().expect("not poisoned") = Some(reason.clone());
            return Err(LinkError::DesiredRefused(reason));
        }
        Ok(())
    }

    /// Reads a damaged `director.json` and `desired.json` again (an
    /// operator may have removed or restored them): Some(why) while one is
    /// still damaged; None, with both taken, once they read.
    fn recheck_damaged(&self) -> Option<String> {
        let mut damaged = self.damaged.lock().expect("not poisoned");
        damaged.as_ref()?;
        let state_dir = &self.agent.config().state_dir;
        let directors = match signed::load_directors(state_dir) {
            Ok(directors) => directors,
            Err(err) => return Some(signed::damaged_directors(&err)),
        };
        let accepted = match signed::load_accepted(state_dir) {
            Ok(accepted) => accepted,
            Err(why) => return Some(why),
        };
        tracing::info!("the host's desired-state records read again: taking desired state");
        *self.directors.lock().expect("not poisoned") = directors;
        *self.accepted.lock().expect("not poisoned") = accepted;
        *self.desired_refused.lock().expect("not poisoned") = None;
        *damaged = None;
        None
    }

    async fn hello(&self) -> Result<turnout_proto::Envelope<Welcome>, LinkError> {
        let offer = offer();
        let hello = Hello {
            agent_version: crate::VERSION.into(),
            proto_range: offer.range,
            capabilities: offer.capabilities,
            host: self.identity.host.clone(),
            labels: self.agent.config().labels.clone(),
            facts: BTreeMap::new(),
        };
        let (status, body) = self
            .call(
                "POST",
                "/v1/agent/hello".into(),
                encode(offer.range.min(), &hello),
            )
            .await?;
        match status {
            200 => turnout_proto::decode::<Welcome>(&body).map_err(|e| LinkError::Refused {
                what: "the hello".into(),
                status,
                message: e.to_string(),
            }),
            409 => {
                let refusal = turnout_proto::decode::<Incompatible>(&body).map_err(|e| {
                    LinkError::Refused {
                        what: "the hello".into(),
                        status,
                        message: e.to_string(),
                    }
                })?;
                Err(LinkError::Incompatible(refusal.body))
            }
            _ => Err(LinkError::Refused {
                what: "the hello".into(),
                status,
                message: error_message(&body),
            }),
        }
    }

    /// Converges and reports until an error, or until the host enrolls
    /// again (`Ok`).
    async fn session(&self, welcome: &Welcome) -> Result<(), LinkError> {
        let interval = Duration::from_millis(welcome.report_interval_ms.max(100));
        *self.interval.lock().expect("not poisoned") = interval;
        let long_poll = welcome.capabilities.contains(&Capability::LongPoll);
        // The index of the last desired state acted on in full: sent as the
        // next poll's `index` and in reports, both of which tell the
        // coordinator this host is done with everything up to it.
        let mut index = 0;
        self.report(index).await?;
        let mut rounds = 0u64;
        loop {
            if self.reenrolled() {
                return Ok(());
            }
            rounds += 1;
            if rounds.is_multiple_of(CA_CHECK_ROUNDS) {
                self.refresh_ca().await;
                self.refresh_trust().await;
                self.refresh_policy().await;
            }
            let path = if long_poll {
                format!(
                    "/v1/agent/desired?index={index}&wait={}ms",
                    interval.as_millis()
                )
            } else {
                format!("/v1/agent/desired?index={index}")
            };
            let desired = self.fetch_desired(path, "the desired-state poll").await?;
            let mut waiting = false;
            for service in &desired.services {
                match self.converge(service, &welcome.capabilities, index).await? {
                    Converged::Acted => self.report(index).await?,
                    Converged::Settled => {}
                    Converged::Waiting => waiting = true,
                }
            }
            if !waiting {
                index = desired.index;
            }
            self.report(index).await?;
            if waiting {
                // The poll would answer at once with the same state.
                tokio::time::sleep(interval.min(Duration::from_secs(1))).await;
            }
            if !long_poll {
                tokio::time::sleep(interval).await;
            }
        }
    }

    /// Moves one service toward its desired release.
    #[tracing::instrument(name = "converge", skip_all, fields(service = %desired.service, release = %format_args!("{}@{}", desired.release.name, desired.release.version)))]
    async fn converge(
        &self,
        desired: &DesiredService,
        capabilities: &CapabilitySet,
        converged: u64,
    ) -> Result<Converged, LinkError> {
        let name = desired.service.as_str();
        if name == crate::upgrade::SELF_SERVICE {
            return self.converge_self(desired, capabilities).await;
        }
        if self.on_probation() {
            // One change at a time: nothing starts until this agent is
            // confirmed (or reverted, with the host as the switch left it).
            return Ok(Converged::Waiting);
        }
        let Some(status) = self.status_of(name).await else {
            return Ok(Converged::Settled);
        };
        let want = &desired.release;
        let history = self
            .agent
            .history(name, crate::journal::HISTORY_KEPT as usize)
            .unwrap_or_default();
        let local = converge::Local {
            idle: status.state == "idle",
            committed: status.committed.as_ref(),
            other: status.other.as_ref(),
            history: &history,
        };
        let decision = converge::decide(
            want,
            &local,
            capabilities.contains(&Capability::SlotRollback),
        );
        {
            let mut refusals = self.refusals.lock().expect("not poisoned");
            match &decision {
                converge::Decision::Refuse { failure } => {
                    let text = format!(
                        "{} {} failed on this host ({}: {}); it is not retried: install it by hand with `turnout-agent install` to try again",
                        want.name, want.version, failure.kind, failure.reason
                    );
                    if refusals.insert(name.to_owned(), text.clone()).as_ref() != Some(&text) {
                        tracing::info!(service = %name, "{text}");
                    }
                }
                converge::Decision::Wait => {}
                _ => {
                    refusals.remove(name);
                }
            }
        }
        // The policy is checked against what the host would really run:
        // for a slot rollback the other slot's own record (written from the
        // verified manifest when it was installed), never only the version
        // the desired state claims for that bundle.
        let slot_release = status.other.as_ref().filter(|o| o.sha256 == want.sha256);
        let real = match (&decision, slot_release) {
            (converge::Decision::Rollback, Some(other)) => other,
            _ => want,
        };
        if matches!(
            decision,
            converge::Decision::Install | converge::Decision::Rollback
        ) && let Some(settled) = self.apply_policy(
            name,
            want,
            real,
            matches!(decision, converge::Decision::Install),
            status.other_expires.filter(|_| slot_release.is_some()),
        ) {
            return Ok(settled);
        }
        let result = match decision {
            // Another operation owns the service: look again soon, and do
            // not tell the coordinator this desired state was acted on.
            converge::Decision::Wait => return Ok(Converged::Waiting),
            // A release that failed here is reported, not retried in a loop.
            converge::Decision::Nothing | converge::Decision::Refuse { .. } => {
                return Ok(Converged::Settled);
            }
            converge::Decision::Rollback => {
                if !self.still_wanted(desired).await? {
                    return Ok(Converged::Settled);
                }
                self.reporting_progress(name, converged, self.agent.rollback(name))
                    .await
            }
            converge::Decision::Install => {
                let bundle = match self
                    .download(desired, capabilities.contains(&Capability::RangeDownload))
                    .await
                {
                    Ok(path) => path,
                    Err(LinkError::Io { what, source }) if what.starts_with("the download of") => {
                        // What was served is not what was asked for: a
                        // fault of the transport or the server, not a verdict
                        // on the release. Recorded as failed (the coordinator
                        // sees it), and tried again at the next poll.
                        let reason = format!(
                            "download failed: {what}: {source}; tried again at the next poll"
                        );
                        tracing::info!(service = %name, "{reason}");
                        let _ = self.agent.record_outcome(
                            name,
                            OutcomeKind::Failed,
                            want.clone(),
                            reason,
                        );
                        return Ok(Converged::Acted);
                    }
                    Err(LinkError::Io { what, source }) if what == "writing the download" => {
                        // A full or failing disk here: say so to the
                        // coordinator, and try again at the next poll.
                        let reason = format!(
                            "download failed: cannot write it to {}: {source}; tried again at the next poll",
                            self.cache.display()
                        );
                        tracing::info!(service = %name, "{reason}");
                        // Reported as the service's last error too: with the
                        // disk full, the journal may not take the outcome.
                        self.refusals
                            .lock()
                            .expect("not poisoned")
                            .insert(name.to_owned(), reason.clone());
                        let _ = self.agent.record_outcome(
                            name,
                            OutcomeKind::Failed,
                            want.clone(),
                            reason,
                        );
                        return Ok(Converged::Acted);
                    }
                    Err(err) => {
                        tracing::warn!(service = %name, "downloading {} {}: {err}", want.name, want.version);
                        return Err(err);
                    }
                };
                // The bundle's own manifest (its signature is checked by the
                // install) must be the release the desired state names, and
                // the policy must allow that release.
                match self.manifest_release(&bundle, want).await {
                    Ok(manifest) => {
                        if let Some(settled) = self.apply_policy(name, want, &manifest, true, None)
                        {
                            return Ok(settled);
                        }
                    }
                    Err(mismatch) => {
                        let known = self
                            .policy_noted
                            .lock()
                            .expect("not poisoned")
                            .insert(name.to_owned(), mismatch.clone())
                            .as_ref()
                            == Some(&mismatch);
                        if !known {
                            tracing::warn!(service = %name, "rejected: {mismatch}");
                            let _ = self.agent.record_outcome(
                                name,
                                OutcomeKind::Rejected,
                                want.clone(),
                                mismatch.clone(),
                            );
                        }
                        self.refusals
                            .lock()
                            .expect("not poisoned")
                            .insert(name.to_owned(), mismatch);
                        return Ok(Converged::Settled);
                    }
                }
                if !self.still_wanted(desired).await? {
                    return Ok(Converged::Settled);
                }
                self.reporting_progress(name, converged, self.agent.install(name, &bundle, None))
                    .await
            }
        };
        match result {
            Ok(result) => tracing::info!("{}", result.summary),
            Err(err) => tracing::info!(service = %name, "{err}"),
        }
        Ok(Converged::Acted)
    }

    /// Refuses, under the release policy held, an install or rollback to
    /// `want`: a release below the floor or revoked, or a rollback to a
    /// release whose manifest expired (`expires`: the other slot's), is
    /// rejected (recorded once as the service's outcome, so the
    /// coordinator's gate and its rollback see it), and a stale policy holds
    /// new installs back. None when allowed.
    fn apply_policy(
        &self,
        name: &str,
        want: &ReleaseRef,
        real: &ReleaseRef,
        install: bool,
        expires: Option<turnout_proto::manifest::Timestamp>,
    ) -> Option<Converged> {
        let verdict = if real.name != want.name || real.version != want.version {
            // The coordinator names the bundle as another release than it is.
            policy::PolicyVerdict::Rejected(format!(
                "the desired state names {} {}, but that bundle is {} {} on this host; not acted on",
                want.name, want.version, real.name, real.version
            ))
        } else {
            self.policy_verdict(name, real, install)
        };
        let verdict = match expires {
            // A slot rollback to a release whose signed manifest expired:
            // refused, as an install of it would be.
            Some(at) if !install && at.0 <= std::time::SystemTime::now() => {
                policy::PolicyVerdict::Rejected(format!(
                    "{} {} expired at {at} (its signed manifest says so); not rolled back to it",
                    want.name, want.version
                ))
            }
            _ => verdict,
        };
        let text = match verdict {
            policy::PolicyVerdict::Allowed => {
                self.policy_noted.lock().expect("not poisoned").remove(name);
                return None;
            }
            policy::PolicyVerdict::Rejected(rule) => {
                let text = format!("{rule}; not installed, the service is untouched");
                let known = self
                    .policy_noted
                    .lock()
                    .expect("not poisoned")
                    .insert(name.to_owned(), text.clone())
                    .as_ref()
                    == Some(&text);
                if !known {
                    tracing::warn!(service = %name, "rejected: {text}");
                    let _ =
                        self.agent
                            .record_outcome(name, OutcomeKind::Refused, want.clone(), rule);
                }
                text
            }
            policy::PolicyVerdict::Stale(why) => {
                let known = self
                    .policy_noted
                    .lock()
                    .expect("not poisoned")
                    .insert(name.to_owned(), why.clone())
                    .as_ref()
                    == Some(&why);
                if !known {
                    tracing::error!(service = %name, "{why}");
                }
                why
            }
        };
        self.refusals
            .lock()
            .expect("not poisoned")
            .insert(name.to_owned(), text);
        Some(Converged::Settled)
    }

    /// The release a downloaded bundle's manifest names (read trusting
    /// nothing: the install verifies its signature), or why it is not the
    /// release `want` names.
    async fn manifest_release(
        &self,
        bundle: &Path,
        want: &ReleaseRef,
    ) -> Result<ReleaseRef, String> {
        let path = bundle.to_owned();
        let head = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&path).map_err(|e| e.to_string())?;
            turnout_proto::bundle::read_head(
                std::io::BufReader::new(file),
                &turnout_proto::Limits::default(),
            )
            .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| {
            format!(
                "the bundle of {} {} does not read: {e}",
                want.name, want.version
            )
        })?;
        let manifest = &head.manifest;
        if manifest.name.as_str() != want.name || manifest.version != want.version {
            return Err(format!(
                "the desired state names {} {}, but the bundle it points at is {} {}; not installed",
                want.name, want.version, manifest.name, manifest.version
            ));
        }
        Ok(ReleaseRef {
            name: manifest.name.to_string(),
            version: manifest.version.clone(),
            sha256: want.sha256.clone(),
        })
    }

    /// GETs the desired state at `path` (`what` names the request in errors).
    async fn fetch_desired(&self, path: String, what: &str) -> Result<DesiredState, LinkError> {
        let (status, body) = self.call("GET", path, Vec::new()).await?;
        if status != 200 {
            return Err(LinkError::Refused {
                what: what.into(),
                status,
                message: error_message(&body),
            });
        }
        let version = *self.version.lock().expect("not poisoned");
        if version >= turnout_proto::ProtoVersion::V2 {
            let mut opened = self.open_signed(&body);
            // A key this host does not know may be the coordinator's next
            // one: take its handover, if a key this host accepts signed it,
            // and look again.
            if matches!(
                opened,
                Err(turnout_proto::desired::DesiredRefusal::UnknownKey { .. })
            ) && self.learn_handovers().await
            {
                opened = self.open_signed(&body);
            }
            return match opened {
                Ok(state) => {
                    self.follow_policy(state.policy_version).await;
                    if self
                        .desired_refused
                        .lock()
                        .expect("not poisoned")
                        .take()
                        .is_some()
                    {
                        tracing::info!("the coordinator's desired state verifies again");
                    }
                    self.publish_desired();
                    Ok(state)
                }
                Err(refusal) => {
                    let text = refusal.to_string();
                    *self.desired_refused.lock().expect("not poisoned") = Some(text.clone());
                    self.publish_desired();
                    Err(LinkError::DesiredRefused(text))
                }
            };
        }
        let reader = turnout_proto::Reader {
            limits: turnout_proto::Limits::default(),
            accept: turnout_proto::ProtoRange::new(version, version).expect("one version"),
        };
        reader
            .decode(&body)
            .map(|e| e.body)
            .map_err(|e| LinkError::Refused {
                what: "the desired state".into(),
                status,
                message: e.to_string(),
            })
    }

    /// Whether the coordinator still wants `desired` for its service, asked
    /// again right before an install or rollback starts: an agent that was
    /// frozen, or slow to download, may hold a desired state that a
    /// rollback has since replaced, and must not install the release the
    /// rollback took back.
    async fn still_wanted(&self, desired: &DesiredService) -> Result<bool, LinkError> {
        let now = self
            .fetch_desired(
                "/v1/agent/desired?index=0".into(),
                "the desired-state check",
            )
            .await?;
        let wanted = now
            .services
            .iter()
            .any(|s| s.service == desired.service && s.release.sha256 == desired.release.sha256);
        if !wanted {
            tracing::info!(
                "{}: {} {} is no longer wanted by the coordinator; not installing it",
                desired.service,
                desired.release.name,
                desired.release.version
            );
        }
        Ok(wanted)
    }

    /// Runs an install or rollback, reporting whenever the service's state
    /// changes meanwhile: the coordinator learns that a release is being
    /// reverted the moment this agent decides it, not once the revert is done.
    /// A report that fails is only logged; the work goes on regardless.
    async fn reporting_progress<T>(
        &self,
        name: &str,
        converged: u64,
        work: impl Future<Output = T>,
    ) -> T {
        let mut changes = self.agent.changes();
        changes.mark_unchanged();
        let watch = async {
            // Woken by the agent at each journaled step, not by a timer.
            while changes.changed().await.is_ok() {
                if let Err(err) = self.report(converged).await {
                    tracing::warn!(service = %name, "reporting progress: {err}");
                }
            }
            std::future::pending::<T>().await
        };
        tokio::select! {
            done = work => done,
            never = watch => never,
        }
    }

    async fn status_of(&self, name: &str) -> Option<ServiceStatus> {
        self.agent
            .status()
            .await
            .ok()?
            .into_iter()
            .find(|s| s.service == name)
    }

    /// Sends a report; `converged` is the index of the last desired state
    /// this agent has finished acting on, so that the coordinator can tell
    /// a host at rest on what it was last told from one not yet told.
    async fn report(&self, converged: u64) -> Result<(), LinkError> {
        let statuses = self.agent.status().await.unwrap_or_default();
        // Strictly growing, also when the clock steps back while running.
        let seq = {
            let mut last = self.last_seq.lock().expect("not poisoned");
            *last = now_ms().max(*last + 1);
            *last
        };
        let report = Report {
            host: self.identity.host.clone(),
            seq,
            desired_index: converged,
            services: {
                let refusals = self.refusals.lock().expect("not poisoned");
                let mut services: Vec<ServiceReport> = statuses
                    .iter()
                    .map(|s| service_report(s, refusals.get(&s.service)))
                    .collect();
                drop(refusals);
                services.extend(self.self_report());
                services
            },
            stale_since_ms: self.stale_since(),
            desired_refused: self.desired_refused.lock().expect("not poisoned").clone(),
            trust_version: None,
            trust_refused: None,
            policy_version: None,
            policy_refused: None,
            accepted_index: None,
        };
        // Written in exactly the version agreed in the hello: the fields
        // v2 added are left out of a v1 report.
        let version = *self.version.lock().expect("not poisoned");
        let report = if version >= turnout_proto::ProtoVersion::V2 {
            Report {
                trust_version: self.trust_version(),
                trust_refused: self.trust_refused.lock().expect("not poisoned").clone(),
                policy_version: self.policy_version(),
                policy_refused: self.policy_refused.lock().expect("not poisoned").clone(),
                accepted_index: self
                    .accepted
                    .lock()
                    .expect("not poisoned")
                    .as_ref()
                    .map(|a| a.index),
                ..report
            }
        } else {
            Report {
                stale_since_ms: None,
                desired_refused: None,
                ..report
            }
        };
        let (status, body) = self
            .call("POST", "/v1/agent/report".into(), encode(version, &report))
            .await?;
        if status != 204 {
            return Err(LinkError::Refused {
                what: "the report".into(),
                status,
                message: error_message(&body),
            });
        }
        self.status.lock().expect("not poisoned").reported_ms = Some(now_ms());
        Ok(())
    }
}

/// Whether the file at `path` has sha256 `sha`, hashed on a blocking thread.
async fn hash_matches(path: &Path, sha: &str) -> bool {
    crate::service::digest_of_file(path)
        .await
        .is_ok_and(|digest| digest.as_str() == sha)
}

fn service_report(s: &ServiceStatus, refusal: Option<&String>) -> ServiceReport {
    ServiceReport {
        service: s.service.parse().expect("configured names are valid"),
        state: ServiceState::from(s.state.as_str()),
        active_slot: s.active_slot.map(crate::slots::Slot::wire),
        committed: s.committed.clone(),
        other: s.other.clone(),
        target: s.target.clone(),
        health: s.health.clone(),
        last_outcome: s.last_outcome.as_ref().and_then(|o| {
            Some(Outcome {
                kind: o.kind.clone(),
                release: o.release.clone()?,
                reason: o.reason.clone(),
                at_ms: o.at_ms,
            })
        }),
        last_error: refusal.cloned().or(s.journal_error.clone()).or_else(|| {
            (s.health == Health::Unhealthy)
                .then(|| s.health_detail.clone())
                .flatten()
        }),
    }
}

/// Exponential backoff with full jitter: a random wait up to 2^n s, capped at 5 min.
pub fn backoff(failures: u32) -> Duration {
    let ceiling = backoff_ceiling(failures);
    let mut byte = [0u8; 2];
    let _ = getrandom::fill(&mut byte);
    let fraction = f64::from(u16::from_le_bytes(byte)) / f64::from(u16::MAX);
    ceiling.mul_f64(fraction.max(0.05))
}

/// The longest wait after `failures` failures in a row: 1 s doubling up to
/// five minutes.
pub fn backoff_ceiling(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.min(10).saturating_sub(1)).min(Duration::from_secs(300))
}

#[cfg(test)]
mod signing_tests {
    #[test]
    fn backoff_doubles_from_one_second_up_to_five_minutes() {
        use std::time::Duration;
        let ceilings: Vec<u64> = (1..=12)
            .map(|n| super::backoff_ceiling(n).as_secs())
            .collect();
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        for failures in [1, 5, 40] {
            let wait = super::backoff(failures);
            assert!(wait <= super::backoff_ceiling(failures), "{wait:?}");
            assert!(
                wait >= super::backoff_ceiling(failures).mul_f64(0.05) - Duration::from_millis(1)
            );
        }
    }

    #[test]
    fn requests_in_one_millisecond_get_distinct_timestamps() {
        let stamps: Vec<u64> = (0..1000).map(|_| super::signing_time()).collect();
        assert!(stamps.windows(2).all(|w| w[1] > w[0]));
    }
}
