//! `/metrics`: the coordinator's counters and gauges, exposed in the
//! OpenMetrics text format by the `prometheus-client` crate, which escapes
//! label values (a host's `agent_version` is the host's to choose, and must
//! never become a series of its own).
//!
//! Counters are bumped where things happen. Fleet gauges (hosts by state and
//! agent, rollouts by state, a rollout's hosts by phase) are a snapshot the
//! rollout loop refreshes (see [`Metrics::set_fleet`]); a scrape only encodes
//! what is there, so scraping often costs the coordinator almost nothing.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Upper bounds of the request-latency histogram, in seconds.
const BUCKETS: [f64; 8] = [0.001, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5, 30.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Route {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    agent_version: String,
    proto: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RolloutPhase {
    rollout: String,
    phase: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// What the fleet gauges show; made by the rollout loop from the store.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetSnapshot {
    /// Hosts by state: `online`, `offline`, `incompatible`.
    pub hosts: Vec<(&'static str, i64)>,
    /// Hosts by (agent version, protocol version).
    pub agents: Vec<((String, String), i64)>,
    /// Rollouts by state.
    pub rollouts: Vec<(&'static str, i64)>,
    /// Unfinished rollouts' hosts by (rollout, phase).
    pub phases: Vec<((String, &'static str), i64)>,
    /// Hosts whose newest signed desired state expired (they start nothing new).
    pub stale: i64,
}

/// The coordinator's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RouteStatus, Counter>,
    latency: Family<Route, Histogram, fn() -> Histogram>,
    auth_failures: Family<Reason, Counter>,
    bad_reports: Counter,
    stale_reports: Counter,
    connections_refused: Counter,
    tls_failures: Family<Reason, Counter>,
    engine_rounds: Counter,
    hosts: Family<StateLabel, Gauge>,
    agents: Family<AgentLabels, Gauge>,
    stale: Gauge,
    rollouts: Family<StateLabel, Gauge>,
    phases: Family<RolloutPhase, Gauge>,
    /// Encoding is cheap but not free; one scrape at a time.
    encoding: Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RouteStatus, Counter>::default();
        let latency =
            Family::<Route, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let auth_failures = Family::<Reason, Counter>::default();
        let tls_failures = Family::<Reason, Counter>::default();
        let (bad_reports, stale_reports, connections_refused, engine_rounds) = (
            Counter::default(),
            Counter::default(),
            Counter::default(),
            Counter::default(),
        );
        let hosts = Family::<StateLabel, Gauge>::default();
        let stale = Gauge::default();
        let agents = Family::<AgentLabels, Gauge>::default();
        let rollouts = Family::<StateLabel, Gauge>::default();
        let phases = Family::<RolloutPhase, Gauge>::default();
        registry.register(
            "turnout_http_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        registry.register(
            "turnout_http_request_seconds",
            "HTTP request latency by route",
            latency.clone(),
        );
        registry.register(
            "turnout_auth_failures",
            "refused host or operator credentials, by reason",
            auth_failures.clone(),
        );
        registry.register(
            "turnout_bad_reports",
            "malformed or oversized agent reports",
            bad_reports.clone(),
        );
        registry.register(
            "turnout_stale_reports",
            "reports dropped because the host's stored one is as new or newer (late or replayed)",
            stale_reports.clone(),
        );
        registry.register(
            "turnout_connections_refused",
            "connections closed because max_connections were open",
            connections_refused.clone(),
        );
        registry.register(
            "turnout_tls_failures",
            "connections that did not finish a TLS handshake, by reason (timeout, plain_http, handshake)",
            tls_failures.clone(),
        );
        registry.register(
            "turnout_engine_rounds",
            "rounds of the rollout loop completed (every unfinished rollout stepped once)",
            engine_rounds.clone(),
        );
        registry.register("turnout_hosts", "enrolled hosts by state", hosts.clone());
        registry.register(
            "turnout_hosts_by_agent",
            "enrolled hosts by agent version and protocol",
            agents.clone(),
        );
        registry.register(
            "turnout_hosts_stale",
            "hosts that report no valid signed desired state (its expiry passed: a frozen or silenced coordinator, or a path that holds answers back)",
            stale.clone(),
        );
        registry.register("turnout_rollouts", "rollouts by state", rollouts.clone());
        registry.register(
            "turnout_rollout_hosts",
            "hosts of unfinished rollouts by phase",
            phases.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            auth_failures,
            bad_reports,
            stale_reports,
            connections_refused,
            tls_failures,
            engine_rounds,
            hosts,
            agents,
            stale,
            rollouts,
            phases,
            encoding: Mutex::new(()),
        }
    }
}

impl Metrics {
    /// Counts one request to `route` that answered `status` after `elapsed`.
    pub fn request(&self, route: &str, status: u16, elapsed: Duration) {
        self.requests
            .get_or_create(&RouteStatus {
                route: route.to_owned(),
                status,
            })
            .inc();
        self.latency
            .get_or_create(&Route {
                route: route.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a refused host or operator credential.
    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&Reason {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts one completed round of the rollout loop.
    pub fn engine_round(&self) {
        self.engine_rounds.inc();
    }

    /// Rounds of the rollout loop completed so far.
    pub fn engine_rounds(&self) -> u64 {
        self.engine_rounds.get()
    }

    /// Counts a malformed or oversized agent report.
    pub fn bad_report(&self) {
        self.bad_reports.inc();
    }

    /// Counts a report dropped because the host's stored one is as new or newer.
    pub fn stale_report(&self) {
        self.stale_reports.inc();
    }

    /// Counts a connection closed because `max_connections` were open.
    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// Counts a connection that did not finish its TLS handshake.
    pub fn tls_failure(&self, reason: &'static str) {
        self.tls_failures
            .get_or_create(&Reason {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// How many TLS failures of `reason` were counted.
    pub fn tls_failures(&self, reason: &str) -> u64 {
        self.tls_failures
            .get_or_create(&Reason {
                reason: reason.to_owned(),
            })
            .get()
    }

    /// How many auth failures of `reason` were counted.
    pub fn auth_failures(&self, reason: &str) -> u64 {
        self.auth_failures
            .get_or_create(&Reason {
                reason: reason.to_owned(),
            })
            .get()
    }

    /// Replaces the fleet gauges with `snapshot`.
    pub fn set_fleet(&self, snapshot: &FleetSnapshot) {
        self.hosts.clear();
        for (state, n) in &snapshot.hosts {
            self.hosts
                .get_or_create(&StateLabel {
                    state: (*state).to_owned(),
                })
                .set(*n);
        }
        self.agents.clear();
        for ((agent_version, proto), n) in &snapshot.agents {
            self.agents
                .get_or_create(&AgentLabels {
                    agent_version: agent_version.clone(),
                    proto: proto.clone(),
                })
                .set(*n);
        }
        self.stale.set(snapshot.stale);
        self.rollouts.clear();
        for (state, n) in &snapshot.rollouts {
            self.rollouts
                .get_or_create(&StateLabel {
                    state: (*state).to_owned(),
                })
                .set(*n);
        }
        self.phases.clear();
        for ((rollout, phase), n) in &snapshot.phases {
            self.phases
                .get_or_create(&RolloutPhase {
                    rollout: rollout.clone(),
                    phase: (*phase).to_owned(),
                })
                .set(*n);
        }
    }

    /// The exposition, in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let _one = self.encoding.lock().expect("not poisoned");
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String does not fail");
        out
    }
}

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hostile_label_value_stays_one_escaped_value() {
        let metrics = Metrics::default();
        metrics.set_fleet(&FleetSnapshot {
            agents: vec![(
                (
                    "1.0\"} 1\nturnout_hosts{state=\"online\"} 9999\n#".into(),
                    "1".into(),
                ),
                1,
            )],
            ..FleetSnapshot::default()
        });
        let text = metrics.render();
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("turnout_hosts{state=\"online\"} 9999")),
            "{text}"
        );
        assert!(
            text.contains(
                "turnout_hosts_by_agent{agent_version=\"1.0\\\"} 1\\nturnout_hosts{state=\\\"online\\\"} 9999\\n#\",proto=\"1\"} 1"
            ),
            "{text}"
        );
    }
}
