//! Counters for `/metrics`, in the Prometheus text format, written by hand:
//! a few atomics and labelled maps do not need a metrics framework.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the request-latency histogram, in seconds.
const BUCKETS: [f64; 8] = [0.001, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5, 30.0];

/// A gauge computed at scrape time: its name, labels and value.
pub type Gauge<'a> = (&'a str, Vec<(&'a str, String)>, f64);

/// Request counts and latencies by route, and refusals by reason.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    latency: BTreeMap<String, ([u64; BUCKETS.len()], u64, f64)>,
    auth_failures: BTreeMap<&'static str, u64>,
    bad_reports: u64,
    connections_refused: u64,
    stale_reports: u64,
}

impl Metrics {
    /// Counts one request to `route` that answered `status` after `elapsed`.
    pub fn request(&self, route: &str, status: u16, elapsed: Duration) {
        let mut inner = self.inner.lock().expect("not poisoned");
        *inner
            .requests
            .entry((route.to_owned(), status))
            .or_default() += 1;
        let (buckets, count, sum) = inner.latency.entry(route.to_owned()).or_default();
        let seconds = elapsed.as_secs_f64();
        for (bucket, bound) in buckets.iter_mut().zip(BUCKETS) {
            if seconds <= bound {
                *bucket += 1;
            }
        }
        *count += 1;
        *sum += seconds;
    }

    /// Counts a refused host or operator credential.
    pub fn auth_failure(&self, reason: &'static str) {
        *self
            .inner
            .lock()
            .expect("not poisoned")
            .auth_failures
            .entry(reason)
            .or_default() += 1;
    }

    /// Counts a malformed or oversized agent report.
    pub fn bad_report(&self) {
        self.inner.lock().expect("not poisoned").bad_reports += 1;
    }

    /// Counts a report dropped because the host's stored one is as new or newer.
    pub fn stale_report(&self) {
        self.inner.lock().expect("not poisoned").stale_reports += 1;
    }

    /// Counts a connection closed because `max_connections` were open.
    pub fn connection_refused(&self) {
        self.inner.lock().expect("not poisoned").connections_refused += 1;
    }

    /// How many auth failures of `reason` were counted.
    pub fn auth_failures(&self, reason: &str) -> u64 {
        self.inner
            .lock()
            .expect("not poisoned")
            .auth_failures
            .get(reason)
            .copied()
            .unwrap_or(0)
    }

    /// Renders the counters, then `gauges` (name, labels, value) computed by the caller.
    pub fn render(&self, gauges: &[Gauge<'_>]) -> String {
        let inner = self.inner.lock().expect("not poisoned");
        let mut out = String::new();
        out.push_str("# TYPE turnout_http_requests_total counter\n");
        for ((route, status), n) in &inner.requests {
            let _ = writeln!(
                out,
                "turnout_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str("# TYPE turnout_http_request_seconds histogram\n");
        for (route, (buckets, count, sum)) in &inner.latency {
            for (bound, n) in BUCKETS.iter().zip(buckets) {
                let _ = writeln!(
                    out,
                    "turnout_http_request_seconds_bucket{{route=\"{route}\",le=\"{bound}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "turnout_http_request_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                out,
                "turnout_http_request_seconds_sum{{route=\"{route}\"}} {sum}"
            );
            let _ = writeln!(
                out,
                "turnout_http_request_seconds_count{{route=\"{route}\"}} {count}"
            );
        }
        out.push_str("# TYPE turnout_auth_failures_total counter\n");
        for (reason, n) in &inner.auth_failures {
            let _ = writeln!(
                out,
                "turnout_auth_failures_total{{reason=\"{reason}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# TYPE turnout_bad_reports_total counter\nturnout_bad_reports_total {}",
            inner.bad_reports
        );
        let _ = writeln!(
            out,
            "# TYPE turnout_connections_refused_total counter\nturnout_connections_refused_total {}",
            inner.connections_refused
        );
        let _ = writeln!(
            out,
            "# TYPE turnout_stale_reports_total counter\nturnout_stale_reports_total {}",
            inner.stale_reports
        );
        let mut typed = std::collections::BTreeSet::new();
        for (name, labels, value) in gauges {
            if typed.insert(*name) {
                let _ = writeln!(out, "# TYPE {name} gauge");
            }
            let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            let _ = writeln!(out, "{name}{{{}}} {value}", labels.join(","));
        }
        out
    }
}
