//! The messages of protocol v1 (DESIGN.md §8), as written inside an
//! [`Envelope`](crate::Envelope).
//!
//! | endpoint                        | request  | answer                                  |
//! |---------------------------------|----------|-----------------------------------------|
//! | `POST /v1/agent/hello`          | [`Hello`]| [`Welcome`], or 409 [`Incompatible`]    |
//! | `GET  /v1/agent/desired?index=` | -        | [`DesiredState`]                        |
//! | `POST /v1/agent/report`         | [`Report`]| 204, or an [`ErrorBody`]               |
//! | any endpoint, on failure        | -        | [`ErrorBody`]                           |
//!
//! Rules every struct here keeps (see `docs/protocol.md`): unknown fields are
//! ignored; optional and collection fields default when absent, so a field can
//! be added without a new version; enums are [`wire_enum`]s with an `Unknown`.

use std::collections::BTreeMap;

use semver::Version;
use serde::{Deserialize, Serialize};

use crate::capability::CapabilitySet;
use crate::envelope::Message;
use crate::ids::{Digest, HostId, ServiceName};
use crate::limits::{LimitExceeded, Limits};
use crate::negotiate::Offer;
use crate::version::ProtoRange;

/// The agent's opening message: who it is and what it speaks.
///
/// A handshake message: its shape is frozen (additions only, forever), and a
/// coordinator reads it whatever the envelope's version, so that it can answer
/// even an agent it shares no version with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The agent's software version, e.g. `0.1.0`.
    pub agent_version: String,
    /// The protocol versions the agent speaks.
    pub proto_range: ProtoRange,
    /// The optional features the agent implements.
    #[serde(default)]
    pub capabilities: CapabilitySet,
    /// The host's identity in the fleet.
    pub host: HostId,
    /// Operator-assigned labels used by rollout selectors, e.g. `role=web`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Observed facts, e.g. `os`, `arch`, `kernel`: shown, never selected on.
    #[serde(default)]
    pub facts: BTreeMap<String, String>,
}

impl Hello {
    /// What the agent offers, for [`negotiate`](crate::negotiate()).
    pub fn offer(&self) -> Offer {
        Offer {
            software: format!("turnout-agent {}", self.agent_version),
            range: self.proto_range,
            capabilities: self.capabilities.clone(),
        }
    }
}

impl Message for Hello {
    const NAME: &'static str = "hello";
    const FROZEN: bool = true;

    fn check_limits(&self, limits: &Limits) -> Result<(), LimitExceeded> {
        limits.text("agent_version", &self.agent_version)?;
        limits.count(
            "capabilities",
            self.capabilities.len(),
            limits.max_capabilities,
        )?;
        for capability in self.capabilities.iter() {
            limits.text("capabilities", capability.as_str())?;
        }
        limits.map("labels", self.labels.iter(), limits.max_labels)?;
        limits.map("facts", self.facts.iter(), limits.max_facts)
    }
}

/// The coordinator's answer to a [`Hello`] it can serve. The envelope's
/// `proto` is the negotiated version both sides now write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The coordinator's software version.
    pub coordinator_version: String,
    /// The capabilities both sides have: the only ones either may use.
    #[serde(default)]
    pub capabilities: CapabilitySet,
    /// How often the agent sends a heartbeat report, in milliseconds.
    pub report_interval_ms: u64,
}

impl Message for Welcome {
    const NAME: &'static str = "welcome";

    fn check_limits(&self, limits: &Limits) -> Result<(), LimitExceeded> {
        limits.text("coordinator_version", &self.coordinator_version)?;
        limits.count(
            "capabilities",
            self.capabilities.len(),
            limits.max_capabilities,
        )
    }
}

/// The coordinator's answer to a [`Hello`] it shares no version with (HTTP 409).
///
/// A handshake message, frozen like [`Hello`]: an agent of any version can
/// read it and say why it was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{}", incompatible_text(self))]
pub struct Incompatible {
    /// The versions the agent offered.
    pub agent: ProtoRange,
    /// The versions the coordinator speaks.
    pub coordinator: ProtoRange,
    /// The coordinator's software, e.g. `turnout 0.1.0`.
    pub coordinator_version: String,
}

fn incompatible_text(err: &Incompatible) -> String {
    let advice = if err.agent.min() > err.coordinator.max() {
        format!(
            "upgrade the coordinator to a release that speaks {} or newer",
            err.agent.min()
        )
    } else {
        format!(
            "upgrade this agent to a release that speaks {} or newer",
            err.coordinator.min()
        )
    };
    format!(
        "no common protocol version: the agent speaks {}, the coordinator ({}) speaks {}; {advice}",
        err.agent, err.coordinator_version, err.coordinator
    )
}

impl Message for Incompatible {
    const NAME: &'static str = "incompatible";
    const FROZEN: bool = true;

    fn check_limits(&self, limits: &Limits) -> Result<(), LimitExceeded> {
        limits.text("coordinator_version", &self.coordinator_version)
    }
}

/// A release, named the three ways people and machines name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRef {
    /// The bundle's name (usually the service's), e.g. `web`.
    pub name: String,
    /// The bundle's semantic version.
    pub version: Version,
    /// The sha256 of the bundle file: what content addressing and caches use.
    pub sha256: Digest,
}

impl ReleaseRef {
    fn check_limits(&self, path: &str, limits: &Limits) -> Result<(), LimitExceeded> {
        limits.text(&format!("{path}.name"), &self.name)?;
        limits.text(&format!("{path}.version"), &self.version.to_string())
    }
}

/// What the coordinator wants one host to run. Agents converge to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    /// The host this is for.
    pub host: HostId,
    /// Grows every time this host's desired state changes; never reused.
    pub index: u64,
    /// One entry per service the coordinator has an opinion on. A service
    /// the agent manages but that is absent here is left as it is.
    #[serde(default)]
    pub services: Vec<DesiredService>,
    /// When the coordinator issued it (its clock), ms since the epoch.
    /// v2 only: part of the signed document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at_ms: Option<u64>,
    /// When it stops being valid; a host whose newest document expired is
    /// stale and starts nothing new. v2 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    /// The version of the release policy in force at the coordinator: a
    /// host holding an older one asks for it before acting. v2 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<u64>,
}

/// The release one service should run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredService {
    /// The service.
    pub service: ServiceName,
    /// The release it should run.
    pub release: ReleaseRef,
    /// The bundle's size in bytes, so the agent can check space first.
    pub size: u64,
    /// Extra places to fetch the bundle from, tried before the coordinator.
    /// Sent only to agents with the `mirrors` capability.
    #[serde(default)]
    pub urls: Vec<String>,
    /// The rollout that set this, for the agent's journal and reports.
    #[serde(default)]
    pub rollout: Option<String>,
}

impl Message for DesiredState {
    const NAME: &'static str = "desired state";

    fn check_limits(&self, limits: &Limits) -> Result<(), LimitExceeded> {
        limits.count("services", self.services.len(), limits.max_services)?;
        for (i, service) in self.services.iter().enumerate() {
            let path = format!("services[{i}]");
            service
                .release
                .check_limits(&format!("{path}.release"), limits)?;
            limits.count(&format!("{path}.urls"), service.urls.len(), limits.max_urls)?;
            for url in &service.urls {
                limits.text(&format!("{path}.urls"), url)?;
            }
            if let Some(rollout) = &service.rollout {
                limits.text(&format!("{path}.rollout"), rollout)?;
            }
        }
        Ok(())
    }
}

wire_enum! {
    /// Where a service is in the agent's install cycle (DESIGN.md §6).
    pub enum ServiceState {
        /// Running its committed release; nothing in flight.
        Idle = "idle",
        /// Downloading and verifying a bundle.
        Fetching = "fetching",
        /// A verified release is unpacked in the idle slot.
        Staged = "staged",
        /// Flipping `current` and restarting the service.
        Switching = "switching",
        /// Running the new release and watching its health.
        Baking = "baking",
        /// Switching back to the committed release after a failure.
        Reverting = "reverting",
    }
}

wire_enum! {
    /// The service's health as the agent's local checks see it.
    pub enum Health {
        /// Every check passes.
        Healthy = "healthy",
        /// At least one check has crossed its failure threshold.
        Unhealthy = "unhealthy",
        /// Checks have not yet reached a verdict (e.g. just after a switch).
        Pending = "pending",
        /// The service has no checks configured.
        Unchecked = "unchecked",
    }
}

wire_enum! {
    /// How the last install or rollback on a service ended.
    pub enum OutcomeKind {
        /// The release baked healthy and is now committed.
        Committed = "committed",
        /// The release failed its bake; the agent switched back on its own.
        Reverted = "reverted",
        /// The bundle failed verification; no slot was touched.
        Rejected = "rejected",
        /// The agent stopped mid-switch or mid-bake and reverted on restart.
        Interrupted = "interrupted",
        /// The install could not proceed (download, disk, supervisor error).
        Failed = "failed",
        /// The release policy forbids the release (below its floor, revoked)
        /// or its signed manifest expired: nothing was touched, and it is
        /// tried again when the policy allows it (v2).
        Refused = "refused",
    }
}

wire_enum! {
    /// One of a service's two slots.
    pub enum Slot {
        /// The blue slot.
        Blue = "blue",
        /// The green slot.
        Green = "green",
    }
}

/// The end of one install or rollback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// How it ended.
    pub kind: OutcomeKind,
    /// The release that was being installed.
    pub release: ReleaseRef,
    /// Why, in words an operator can act on.
    pub reason: String,
    /// When it ended, in milliseconds since the Unix epoch (agent clock).
    pub at_ms: u64,
}

/// One service's state in a [`Report`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceReport {
    /// The service.
    pub service: ServiceName,
    /// Where it is in the install cycle.
    pub state: ServiceState,
    /// The slot `current` points at; absent before the first install.
    #[serde(default)]
    pub active_slot: Option<Slot>,
    /// The committed release: what the host falls back to.
    #[serde(default)]
    pub committed: Option<ReleaseRef>,
    /// The release kept in the other slot, ready for an instant rollback.
    #[serde(default)]
    pub other: Option<ReleaseRef>,
    /// The release being installed, while one is in flight.
    #[serde(default)]
    pub target: Option<ReleaseRef>,
    /// Local health.
    pub health: Health,
    /// How the last install or rollback ended.
    #[serde(default)]
    pub last_outcome: Option<Outcome>,
    /// The last error, if the service is not where it should be.
    #[serde(default)]
    pub last_error: Option<String>,
}

/// The agent's account of its services: sent on every change and as a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The reporting host.
    pub host: HostId,
    /// Grows with every report the agent sends, across restarts; lets the
    /// coordinator drop a late, reordered report.
    pub seq: u64,
    /// The highest desired-state index the agent has seen.
    pub desired_index: u64,
    /// Every managed service.
    #[serde(default)]
    pub services: Vec<ServiceReport>,
    /// Since when the host has had no valid desired state (its newest
    /// signed document expired and nothing replaced it), ms since the
    /// epoch. v2; absent when fresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_since_ms: Option<u64>,
    /// Why the last desired state was refused (a bad signature, a replay,
    /// another host's document, an expired one), when it was. v2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_refused: Option<String>,
    /// The version of the release trust file the host applies. v2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_version: Option<u64>,
    /// Why the last trust rotation the coordinator offered was refused. v2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_refused: Option<String>,
    /// The index of the newest signed desired state the host accepted
    /// (v2): a coordinator whose own index is not above it (a database
    /// restored from a backup) moves past it, or the host would refuse
    /// every answer as a replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_index: Option<u64>,
    /// The version of the release policy the host holds. v2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<u64>,
    /// Why the last release policy the coordinator offered was refused. v2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_refused: Option<String>,
}

impl Message for Report {
    const NAME: &'static str = "report";

    fn check_limits(&self, limits: &Limits) -> Result<(), LimitExceeded> {
        limits.count("services", self.services.len(), limits.max_services)?;
        for (i, service) in self.services.iter().enumerate() {
            let path = format!("services[{i}]");
            let releases = [
                ("committed", &service.committed),
                ("other", &service.other),
                ("target", &service.target),
            ];
            for (name, release) in releases {
                if let Some(release) = release {
                    release.check_limits(&format!("{path}.{name}"), limits)?;
                }
            }
            if let Some(outcome) = &service.last_outcome {
                outcome
                    .release
                    .check_limits(&format!("{path}.last_outcome.release"), limits)?;
                limits.text(&format!("{path}.last_outcome.reason"), &outcome.reason)?;
            }
            if let Some(error) = &service.last_error {
                limits.text(&format!("{path}.last_error"), error)?;
            }
        }
        if let Some(refused) = &self.desired_refused {
            limits.text("desired_refused", refused)?;
        }
        if let Some(refused) = &self.trust_refused {
            limits.text("trust_refused", refused)?;
        }
        if let Some(refused) = &self.policy_refused {
            limits.text("policy_refused", refused)?;
        }
        Ok(())
    }
}

wire_enum! {
    /// The machine-readable kind of an [`ErrorBody`].
    pub enum ErrorCode {
        /// The request was malformed or failed validation (400).
        BadRequest = "bad_request",
        /// No, or bad, credentials (401).
        Unauthorized = "unauthorized",
        /// Credentials without the needed role (403).
        Forbidden = "forbidden",
        /// No such host, rollout or bundle (404).
        NotFound = "not_found",
        /// The request conflicts with current state, e.g. a second rollout (409).
        Conflict = "conflict",
        /// The body is over the reader's limit (413).
        TooLarge = "too_large",
        /// The body's `proto` is a version this reader does not speak (400).
        UnsupportedVersion = "unsupported_version",
        /// The server failed; the request may be retried (500).
        Internal = "internal",
        /// The server is starting or shutting down; retry with backoff (503).
        Unavailable = "unavailable",
    }
}

/// The body of every error answer. Frozen like the handshake messages, since
/// an error may be the answer to a peer that shares no version with us.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What kind of error, for programs.
    pub code: ErrorCode,
    /// What was expected, what was found and what to do, for people.
    pub message: String,
}

impl ErrorBody {
    /// The message of an error answer: its `ErrorBody`, or its raw text when
    /// the answer is not one (a proxy's page, an older peer).
    pub fn message_of(body: &[u8]) -> String {
        crate::decode::<ErrorBody>(body)
            .map(|e| e.body.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned())
    }
}

impl Message for ErrorBody {
    const NAME: &'static str = "error";
    const FROZEN: bool = true;

    fn check_limits(&self, limits: &Limits) -> Result<(), LimitExceeded> {
        limits.text("message", &self.message)
    }
}
