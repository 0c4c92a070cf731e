//! `turnout-sim`: a fleet of simulated hosts in one process, against a real
//! `turnout serve`, for the benchmarks (docs/benchmarks.md).
//!
//! Each host is a real protocol client: its own ed25519 key and enrollment,
//! a signed hello with negotiation, desired-state long polls, and reports on
//! a keep-alive connection from one of several 127.0.0.x source addresses,
//! reconnecting with the agent's own jittered backoff. Installs are
//! simulated: a host told to run a release "installs" it for `--install-ms`
//! and commits, or, when the seeded plan says so, fails its health checks
//! `--failure-threshold` times `--check-interval-ms` apart, reports that it is
//! reverting (as the agent does the moment it decides), and reverts.
//!
//! Scenarios (`--scenario`), each measured after every host has said hello:
//! - `steady`: hosts report and long-poll; coordinator CPU, RSS, latency.
//! - `storm`: the coordinator is stopped and started again (`--restart`);
//!   time until 99 % of hosts are back (hello and report accepted).
//! - `waves`: a rollout over every host with zero bake; time per wave.
//! - `rollback`: two rollouts over every host, then `turnout rollout rollback
//!   --all-at-once`; time until 99 % of hosts have their new desired state.
//! - `decision`: a rollout whose canary fails its health checks; time from
//!   its first failing check to the coordinator's decision to roll back.
//!
//!   turnout-sim --coordinator https://127.0.0.1:7400 --ca STATE_DIR/tls/ca.pem --token TNT --hosts 1000 --duration 60s

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Parser, ValueEnum};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use turnout_agent::service::now_ms;
use turnout_proto::keys::SecretKey;
use turnout_proto::messages::{
    DesiredState, Health, Hello, Outcome, OutcomeKind, ReleaseRef, Report, ServiceReport,
    ServiceState,
};
use turnout_proto::{CapabilitySet, HostId, SUPPORTED, encode, request_auth};
use turnout_tests::http::Conn;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Report and long-poll; coordinator CPU, RSS and report latency.
    Steady,
    /// Restart the coordinator under the fleet; time until 99 % are back.
    Storm,
    /// A rollout over every host with zero bake; coordinator overhead per wave.
    Waves,
    /// Roll every host back at once; time until 99 % have their new desired state.
    Rollback,
    /// A canary fails its checks; time until the coordinator decides to roll back.
    Decision,
}

/// Simulated fleet options.
#[derive(Debug, Parser)]
#[command(
    name = "turnout-sim",
    about = "A fleet of simulated hosts against a real coordinator"
)]
struct Args {
    /// The coordinator (https://127.0.0.1:PORT, or http:// for --plaintext).
    #[arg(long)]
    coordinator: String,
    /// The coordinator's CA certificates (its STATE_DIR/tls/ca.pem), for https.
    #[arg(long)]
    ca: Option<std::path::PathBuf>,
    /// An admin token (to make the enrollment token and steer rollouts).
    #[arg(long, env = "TURNOUT_TOKEN")]
    token: String,
    /// What to measure.
    #[arg(long, value_enum, default_value = "steady")]
    scenario: Scenario,
    /// How many hosts.
    #[arg(long, default_value_t = 1000)]
    hosts: u32,
    /// The newest protocol version the simulated agents offer: 2 (signed
    /// desired state, as this build's agents) or 1 (plain, as 0.1.0's), to
    /// measure what signing costs the coordinator.
    #[arg(long, env = "TURNOUT_SIM_PROTO", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=2))]
    proto: u16,
    /// How long `steady` measures, after every host has said hello.
    #[arg(long, default_value = "60s")]
    duration: humantime::Duration,
    /// Source addresses to spread connections over (127.0.0.1 ..).
    #[arg(long, default_value_t = 32)]
    addresses: u32,
    /// Percentage of installs that fail, by a seeded plan.
    #[arg(long, default_value_t = 0)]
    fail_percent: u32,
    /// The seed of the failure plan.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// How long a simulated install takes (download, unpack, restart).
    #[arg(long, default_value_t = 100)]
    install_ms: u64,
    /// A failing host's check interval.
    #[arg(long, default_value_t = 1000)]
    check_interval_ms: u64,
    /// A failing host's consecutive failures before it reverts.
    #[arg(long, default_value_t = 3)]
    failure_threshold: u32,
    /// How long a simulated revert takes once decided.
    #[arg(long, default_value_t = 500)]
    revert_ms: u64,
    /// Host id prefix (several simulators can share a coordinator).
    #[arg(long, default_value = "sim")]
    prefix: String,
    /// The coordinator's pid: its CPU and RSS are read from /proc; `storm` stops it.
    #[arg(long)]
    coordinator_pid: Option<u32>,
    /// `storm`: the shell command that starts the coordinator again.
    #[arg(long)]
    restart: Option<String>,
    /// `waves`, `rollback`, `decision`: releases of service `web` already
    /// pushed, as NAME@VERSION, oldest first (`rollback` needs two).
    #[arg(long = "release")]
    releases: Vec<String>,
    /// `waves`: the rollout's waves.
    #[arg(long, default_value = "1,10%,50%,100%")]
    waves: String,
    /// `turnout`, the operator CLI (`rollback` runs it); default: next to this binary.
    #[arg(long)]
    turnout: Option<std::path::PathBuf>,
    /// Spread the hosts' first hello evenly over this long, as a fleet's
    /// agents start at different times (0s: all at once).
    #[arg(long, default_value = "10s")]
    spread: humantime::Duration,
    /// Write the summary as JSON to this file too.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// What every simulated host records, shared.
#[derive(Default)]
struct Shared {
    reports: AtomicU64,
    polls: AtomicU64,
    errors: AtomicU64,
    installs: AtomicU64,
    failures: AtomicU64,
    hellos: AtomicU64,
    latencies_us: std::sync::Mutex<Vec<u32>>,
    /// When a host first saw each desired release (by sha256).
    arrivals: std::sync::Mutex<HashMap<String, Vec<Instant>>>,
    /// When a host was back after (re)connecting: hello and a report accepted.
    back: std::sync::Mutex<Vec<Instant>>,
    /// Wall-clock ms of each failing host's first failing check.
    first_failing_check_ms: std::sync::Mutex<Vec<u64>>,
}

struct Sim {
    host: HostId,
    key: SecretKey,
    committed: Option<ReleaseRef>,
    outcome: Option<Outcome>,
    seq: u64,
}

impl Sim {
    fn auth(&self, method: &str, path: &str, body: &[u8]) -> String {
        request_auth::sign(&self.key, &self.host, method, path, now_ms(), body)
    }

    fn report_body(&mut self, reverting: Option<&ReleaseRef>) -> Vec<u8> {
        self.seq += 1;
        let report = Report {
            host: self.host.clone(),
            seq: self.seq,
            desired_index: 0,
            services: vec![ServiceReport {
                service: "web".parse().expect("valid"),
                state: if reverting.is_some() {
                    ServiceState::Reverting
                } else {
                    ServiceState::Idle
                },
                active_slot: None,
                committed: self.committed.clone(),
                other: None,
                target: reverting.cloned(),
                health: if reverting.is_some() {
                    Health::Unhealthy
                } else {
                    Health::Healthy
                },
                last_outcome: self.outcome.clone(),
                last_error: reverting.map(|_| "simulated health check failure".into()),
            }],
            stale_since_ms: None,
            desired_refused: None,
            trust_version: None,
            trust_refused: None,
            policy_version: None,
            policy_refused: None,
            accepted_index: None,
        };
        encode(proto(), &report)
    }

    async fn report(
        &mut self,
        c: &mut Conn,
        reverting: Option<&ReleaseRef>,
    ) -> std::io::Result<u32> {
        let body = self.report_body(reverting);
        let started = Instant::now();
        let (status, _) = c
            .request(
                "POST",
                "/v1/agent/report",
                Some(&self.auth("POST", "/v1/agent/report", &body)),
                &body,
            )
            .await?;
        if status != 204 {
            return Err(std::io::Error::other(format!("report: {status}")));
        }
        Ok(started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32)
    }
}

/// Whether the seeded plan fails `host`'s install of `release`.
fn fails(seed: u64, host: &str, release: &ReleaseRef, percent: u32) -> bool {
    let digest = Sha256::digest(format!("{seed}/{host}/{}", release.sha256));
    u32::from(digest[0]) * 100 / 256 < percent
}

fn source(args: &Args, index: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        0,
        1 + (index % args.addresses.clamp(1, 250)) as u8,
    ))
}

fn host_key(args: &Args, index: u32) -> (HostId, SecretKey) {
    let seed: [u8; 32] = Sha256::digest(format!("{}-{index}", args.prefix)).into();
    let host = format!("{}-{index:05}", args.prefix)
        .parse()
        .expect("valid id");
    (host, SecretKey::from_seed(seed))
}

/// One simulated host, until the process ends.
async fn run_host(
    args: Arc<Args>,
    server: SocketAddr,
    tls: Option<Arc<tokio_rustls::TlsConnector>>,
    index: u32,
    shared: Arc<Shared>,
) {
    let (host, key) = host_key(&args, index);
    let mut sim = Sim {
        host,
        key,
        committed: None,
        outcome: None,
        seq: 0,
    };
    let source = source(&args, index);
    let spread =
        Duration::from(args.spread).mul_f64(f64::from(index) / f64::from(args.hosts.max(1)));
    tokio::time::sleep(spread).await;
    let mut conn: Option<Conn> = None;
    let mut index_seen = 0;
    let mut desired_seen: Option<String> = None;
    let mut said_hello = false;
    let mut fresh = false;
    let mut failures = 0u32;
    loop {
        if conn.is_none() {
            match Conn::connect(source, server, tls.as_deref()).await {
                Ok(c) => conn = Some(c),
                Err(_) => {
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                    failures = failures.saturating_add(1);
                    tokio::time::sleep(turnout_agent::link::backoff(failures)).await;
                    continue;
                }
            }
        }
        let c = conn.as_mut().expect("connected");
        let result: std::io::Result<()> = async {
            if !said_hello {
                let hello = Hello {
                    agent_version: "sim".into(),
                    proto_range: turnout_proto::ProtoRange::new(SUPPORTED.min(), proto())
                        .expect("a valid range"),
                    capabilities: CapabilitySet::all_known(),
                    host: sim.host.clone(),
                    labels: [("role".to_owned(), "web".to_owned())].into(),
                    facts: Default::default(),
                };
                let body = encode(SUPPORTED.max(), &hello);
                let (status, _) = c
                    .request(
                        "POST",
                        "/v1/agent/hello",
                        Some(&sim.auth("POST", "/v1/agent/hello", &body)),
                        &body,
                    )
                    .await?;
                if status != 200 {
                    return Err(std::io::Error::other(format!("hello: {status}")));
                }
                said_hello = true;
                fresh = true;
            }
            let took = sim.report(c, None).await?;
            if fresh {
                fresh = false;
                shared
                    .back
                    .lock()
                    .expect("not poisoned")
                    .push(Instant::now());
                shared.hellos.fetch_add(1, Ordering::Relaxed);
            }
            shared.reports.fetch_add(1, Ordering::Relaxed);
            shared.latencies_us.lock().expect("not poisoned").push(took);
            let path = format!("/v1/agent/desired?index={index_seen}&wait=10s");
            let (status, body) = c
                .request("GET", &path, Some(&sim.auth("GET", &path, b"")), b"")
                .await?;
            if status != 200 {
                return Err(std::io::Error::other(format!("desired: {status}")));
            }
            shared.polls.fetch_add(1, Ordering::Relaxed);
            // v2 (what the simulated agents agree to): a signed document.
            // The simulator reads it without checking the signature: what
            // it measures is the coordinator, which signs every answer.
            let desired: DesiredState = if proto() >= turnout_proto::ProtoVersion::V2 {
                let signed: turnout_proto::desired::SignedDesired = turnout_proto::decode(&body)
                    .map(|e| e.body)
                    .map_err(std::io::Error::other)?;
                serde_json::from_str(&signed.document).map_err(std::io::Error::other)?
            } else {
                turnout_proto::decode(&body)
                    .map(|e| e.body)
                    .map_err(std::io::Error::other)?
            };
            index_seen = desired.index;
            let Some(wanted) = desired.services.first().map(|s| s.release.clone()) else {
                return Ok(());
            };
            if desired_seen.as_deref() != Some(wanted.sha256.as_str()) {
                desired_seen = Some(wanted.sha256.to_string());
                shared
                    .arrivals
                    .lock()
                    .expect("not poisoned")
                    .entry(wanted.sha256.to_string())
                    .or_default()
                    .push(Instant::now());
            }
            let failed_before = sim.outcome.as_ref().is_some_and(|o| {
                o.release.sha256 == wanted.sha256 && o.kind != OutcomeKind::Committed
            });
            if sim.committed.as_ref() == Some(&wanted) || failed_before {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(args.install_ms)).await;
            shared.installs.fetch_add(1, Ordering::Relaxed);
            if fails(args.seed, sim.host.as_str(), &wanted, args.fail_percent) {
                shared.failures.fetch_add(1, Ordering::Relaxed);
                // Checks fail `threshold` times, `interval` apart; the agent
                // then reports that it is reverting, and reverts.
                shared
                    .first_failing_check_ms
                    .lock()
                    .expect("not poisoned")
                    .push(now_ms());
                let checks = args.failure_threshold.saturating_sub(1);
                tokio::time::sleep(Duration::from_millis(
                    args.check_interval_ms * u64::from(checks),
                ))
                .await;
                sim.report(c, Some(&wanted)).await?;
                tokio::time::sleep(Duration::from_millis(args.revert_ms)).await;
                sim.outcome = Some(Outcome {
                    kind: OutcomeKind::Reverted,
                    release: wanted,
                    reason: "simulated health failure".into(),
                    at_ms: now_ms(),
                });
            } else {
                sim.outcome = Some(Outcome {
                    kind: OutcomeKind::Committed,
                    release: wanted.clone(),
                    reason: "simulated".into(),
                    at_ms: now_ms(),
                });
                sim.committed = Some(wanted);
            }
            Ok(())
        }
        .await;
        if result.is_err() {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            conn = None;
            said_hello = false;
            failures = failures.saturating_add(1);
            tokio::time::sleep(turnout_agent::link::backoff(failures)).await;
        } else {
            failures = 0;
        }
    }
}

/// (CPU ticks, RSS KiB) of a process.
fn sample(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((ticks, rss))
}

/// The `q` quantile of sorted values.
fn quantile<T: Copy + Default>(sorted: &[T], q: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

/// The operator API, off the async workers.
#[derive(Clone)]
struct Admin(Arc<turnout::client::Client>);

impl Admin {
    async fn get(&self, path: String) -> anyhow::Result<Value> {
        let client = self.0.clone();
        Ok(tokio::task::spawn_blocking(move || client.get::<Value>(&path)).await??)
    }

    async fn post(&self, path: String, body: Value) -> anyhow::Result<Value> {
        let client = self.0.clone();
        Ok(tokio::task::spawn_blocking(move || client.post::<Value>(&path, &body)).await??)
    }

    /// Starts a rollout of `release` over every host.
    async fn start(&self, release: &str, waves: &[&str], extra: Value) -> anyhow::Result<String> {
        let mut spec = json!({
            "service": "web", "release": release, "waves": waves,
            "bake": "0s", "max_parallel": 100_000,
        });
        if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
            spec.extend(extra.clone());
        }
        let rollout = self
            .post("/v1/rollouts".into(), json!({"spec": spec}))
            .await?;
        rollout["id"]
            .as_str()
            .map(str::to_owned)
            .context("the coordinator's answer to a rollout start has no id")
    }

    /// Waits until rollout `id` is in one of `states`; returns the state.
    async fn wait_state(
        &self,
        id: &str,
        states: &[&str],
        limit: Duration,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            let rollout = self.get(format!("/v1/rollouts/{id}")).await?;
            let state = rollout["state"]["state"].as_str().unwrap_or("").to_owned();
            if states.contains(&state.as_str()) {
                return Ok(state);
            }
            if Instant::now() > deadline {
                bail!("rollout {id} is still {state} after {limit:?}; expected {states:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every event of rollout `id`.
    async fn events(&self, id: &str) -> anyhow::Result<Vec<Value>> {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let page = self
                .get(format!("/v1/events?rollout={id}&after={after}"))
                .await?;
            let page = page.as_array().cloned().unwrap_or_default();
            let Some(last) = page.last() else {
                return Ok(all);
            };
            after = last["id"].as_u64().unwrap_or(u64::MAX);
            all.extend(page);
        }
    }
}

/// The sha256 of a pushed release NAME@VERSION.
async fn release_sha(admin: &Admin, release: &str) -> anyhow::Result<String> {
    let (name, version) = release
        .split_once('@')
        .with_context(|| format!("expected NAME@VERSION, found {release:?}"))?;
    let bundles = admin.get("/v1/bundles".into()).await?;
    bundles
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| b["name"] == name && b["version"] == version)
        .and_then(|b| b["sha256"].as_str().map(str::to_owned))
        .with_context(|| {
            format!("release {release} is not in the coordinator's bundle store; push it first")
        })
}

/// The instants at or after `since`, as sorted offsets from it.
fn offsets_since<'a>(
    instants: impl IntoIterator<Item = &'a Instant>,
    since: Instant,
) -> Vec<Duration> {
    let mut offsets: Vec<Duration> = instants
        .into_iter()
        .filter(|t| **t >= since)
        .map(|t| t.duration_since(since))
        .collect();
    offsets.sort_unstable();
    offsets
}

/// Waits until 99 % of the hosts have an offset in `offsets()` (within
/// `limit`), then up to 10 s more for the rest, and tells when they did, as
/// `NAME`, `NAME_50_percent_seconds`, `NAME_99_percent_seconds` and
/// `NAME_all_seconds` (NaN when not reached).
async fn arrivals(
    hosts: u32,
    limit: Duration,
    name: &str,
    offsets: impl Fn() -> Vec<Duration>,
) -> serde_json::Map<String, Value> {
    let made_it = wait_for(limit, ninety_nine(hosts), || offsets().len()).await;
    wait_for(Duration::from_secs(10), hosts as usize, || offsets().len()).await;
    let times = offsets();
    let mut out = serde_json::Map::new();
    out.insert(name.into(), json!(times.len()));
    out.insert(
        format!("{name}_50_percent_seconds"),
        json!(secs(quantile(&times, 0.50))),
    );
    out.insert(
        format!("{name}_99_percent_seconds"),
        json!(if made_it {
            secs(quantile(&times, 0.99))
        } else {
            f64::NAN
        }),
    );
    out.insert(
        format!("{name}_all_seconds"),
        json!(if times.len() >= hosts as usize {
            secs(quantile(&times, 1.0))
        } else {
            f64::NAN
        }),
    );
    out
}

/// Waits until `count` returns at least `want`, or `limit` passes.
async fn wait_for(limit: Duration, want: usize, count: impl Fn() -> usize) -> bool {
    let deadline = Instant::now() + limit;
    while count() < want {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

fn need_release(args: &Args, n: usize) -> anyhow::Result<()> {
    if args.releases.len() < n {
        bail!(
            "scenario {:?} needs {n} pushed release(s) of service web, given with --release web@VERSION (oldest first); found {}",
            args.scenario,
            args.releases.len()
        );
    }
    Ok(())
}

fn ninety_nine(hosts: u32) -> usize {
    (f64::from(hosts) * 0.99).ceil() as usize
}

async fn steady(args: &Args, shared: &Shared) -> anyhow::Result<Value> {
    shared.latencies_us.lock().expect("not poisoned").clear();
    let (reports0, polls0) = (
        shared.reports.load(Ordering::Relaxed),
        shared.polls.load(Ordering::Relaxed),
    );
    let errors0 = shared.errors.load(Ordering::Relaxed);
    let before = args.coordinator_pid.and_then(sample);
    let window = Instant::now();
    tokio::time::sleep(args.duration.into()).await;
    let after = args.coordinator_pid.and_then(sample);
    let elapsed = window.elapsed().as_secs_f64();
    let (cpu_percent, rss_mib) = match (before, after) {
        (Some((t0, _)), Some((t1, rss))) => (
            (t1 - t0) as f64 / 100.0 / elapsed * 100.0,
            rss as f64 / 1024.0,
        ),
        _ => (f64::NAN, f64::NAN),
    };
    let mut latencies = shared.latencies_us.lock().expect("not poisoned").clone();
    latencies.sort_unstable();
    let reports = shared.reports.load(Ordering::Relaxed) - reports0;
    Ok(json!({
        "seconds": elapsed,
        "reports": reports,
        "reports_per_second": reports as f64 / elapsed,
        "polls": shared.polls.load(Ordering::Relaxed) - polls0,
        "report_p50_ms": f64::from(quantile(&latencies, 0.50)) / 1000.0,
        "report_p99_ms": f64::from(quantile(&latencies, 0.99)) / 1000.0,
        "report_max_ms": f64::from(quantile(&latencies, 1.0)) / 1000.0,
        "errors": shared.errors.load(Ordering::Relaxed) - errors0,
        "coordinator_cpu_percent_of_one_core": cpu_percent,
        "coordinator_rss_mib": rss_mib,
        "coordinator_rss_kib_per_host": rss_mib * 1024.0 / f64::from(args.hosts),
    }))
}

async fn storm(
    args: &Args,
    shared: &Shared,
) -> anyhow::Result<(Value, Option<std::process::Child>)> {
    let pid = args
        .coordinator_pid
        .context("storm stops the coordinator: give its --coordinator-pid")?;
    let restart = args
        .restart
        .as_deref()
        .context("storm starts the coordinator again: give the command as --restart")?;
    // Let every host settle into its long poll first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stopped_at = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let gone = wait_for(Duration::from_secs(60), 1, || {
        usize::from(
            !std::path::Path::new(&format!("/proc/{pid}/stat")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z ")),
        )
    })
    .await;
    if !gone {
        bail!("the coordinator (pid {pid}) did not stop within 60 s of SIGTERM");
    }
    let down = stopped_at.elapsed();
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("exec {restart}"))
        .spawn()
        .context("starting the coordinator again")?;
    let started = stopped_at.elapsed();
    let offsets = || offsets_since(shared.back.lock().expect("not poisoned").iter(), stopped_at);
    let mut summary = arrivals(args.hosts, Duration::from_secs(300), "back", offsets).await;
    let mut per_second: Vec<u64> = Vec::new();
    for t in &offsets() {
        let bucket = t.as_secs() as usize;
        if per_second.len() <= bucket {
            per_second.resize(bucket + 1, 0);
        }
        per_second[bucket] += 1;
    }
    summary.extend([
        ("stopped_in_seconds".into(), json!(secs(down))),
        ("restarted_at_seconds".into(), json!(secs(started))),
        (
            "peak_reconnects_per_second".into(),
            json!(per_second.iter().max().copied().unwrap_or(0)),
        ),
        ("reconnects_per_second".into(), json!(per_second)),
        (
            "errors_while_down".into(),
            json!(shared.errors.load(Ordering::Relaxed)),
        ),
    ]);
    Ok((Value::Object(summary), Some(child)))
}

/// CPU ticks of the coordinator, if its pid is known.
fn ticks(args: &Args) -> Option<u64> {
    args.coordinator_pid.and_then(sample).map(|(t, _)| t)
}

/// The coordinator's CPU seconds since it had used `before` ticks; NaN if unknown.
fn cpu_seconds_since(args: &Args, before: Option<u64>) -> f64 {
    match (before, ticks(args)) {
        (Some(a), Some(b)) => (b - a) as f64 / 100.0,
        _ => f64::NAN,
    }
}

async fn waves(args: &Args, admin: &Admin) -> anyhow::Result<Value> {
    need_release(args, 1)?;
    let release = args.releases.last().expect("checked");
    let waves: Vec<&str> = args.waves.split(',').map(str::trim).collect();
    let cpu0 = ticks(args);
    let started = Instant::now();
    let start_ms = now_ms();
    let id = admin.start(release, &waves, json!({})).await?;
    let state = admin
        .wait_state(
            &id,
            &["succeeded", "rolled_back", "aborted", "paused"],
            Duration::from_secs(600),
        )
        .await?;
    let total = started.elapsed();
    let cpu = cpu_seconds_since(args, cpu0);
    if state != "succeeded" {
        bail!("rollout {id} ended {state}, not succeeded");
    }
    // Each wave's span, from the event log: from the previous wave's end
    // (or the start) to "wave N done".
    let events = admin.events(&id).await?;
    let mut spans = Vec::new();
    let mut from = start_ms;
    for event in &events {
        let message = event["message"].as_str().unwrap_or("");
        if (message.starts_with("wave ") && message.ends_with(" done"))
            || message.starts_with("succeeded")
        {
            let at = event["at_ms"].as_u64().unwrap_or(from);
            spans.push(json!({"wave": spans.len() + 1, "seconds": (at.saturating_sub(from)) as f64 / 1000.0}));
            from = at;
        }
    }
    let installing = spans.len() as f64 * args.install_ms as f64 / 1000.0;
    Ok(json!({
        "rollout": id,
        "waves": spans,
        "total_seconds": secs(total),
        "simulated_install_seconds": installing,
        "overhead_seconds": secs(total) - installing,
        "coordinator_cpu_seconds": cpu,
    }))
}

async fn rollback(args: &Args, admin: &Admin, shared: &Shared) -> anyhow::Result<Value> {
    need_release(args, 2)?;
    let (old, new) = (&args.releases[0], &args.releases[1]);
    let old_sha = release_sha(admin, old).await?;
    let limit = Duration::from_secs(900);
    let first = admin.start(old, &["100%"], json!({})).await?;
    admin.wait_state(&first, &["succeeded"], limit).await?;
    eprintln!("turnout-sim: every host runs {old}");
    let second = admin.start(new, &["100%"], json!({})).await?;
    admin.wait_state(&second, &["succeeded"], limit).await?;
    eprintln!("turnout-sim: every host runs {new}; rolling back");
    // Every host back in its long poll.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let turnout = match &args.turnout {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("turnout"),
    };
    let cpu0 = ticks(args);
    let t0 = Instant::now();
    let status = tokio::process::Command::new(&turnout)
        .args(["rollout", "rollback", &second, "--all-at-once"])
        .env("TURNOUT_COORDINATOR", &args.coordinator)
        .env("TURNOUT_TOKEN", &args.token)
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .with_context(|| format!("running {}", turnout.display()))?;
    let command = t0.elapsed();
    if !status.success() {
        bail!("`turnout rollout rollback {second} --all-at-once` failed: {status}");
    }
    let offsets = || {
        let arrivals = shared.arrivals.lock().expect("not poisoned");
        offsets_since(arrivals.get(&old_sha).into_iter().flatten(), t0)
    };
    let mut summary = arrivals(args.hosts, Duration::from_secs(120), "received", offsets).await;
    let cpu = cpu_seconds_since(args, cpu0);
    admin
        .wait_state(&second, &["rolled_back"], Duration::from_secs(300))
        .await?;
    summary.extend([
        ("rollout".into(), json!(second)),
        ("command_seconds".into(), json!(secs(command))),
        ("rolled_back_seconds".into(), json!(secs(t0.elapsed()))),
        ("coordinator_cpu_seconds".into(), json!(cpu)),
    ]);
    Ok(Value::Object(summary))
}

async fn decision(args: &Args, admin: &Admin, shared: &Shared) -> anyhow::Result<Value> {
    need_release(args, 1)?;
    if args.fail_percent == 0 {
        bail!("scenario decision needs failing installs: give --fail-percent 100");
    }
    let release = args.releases.last().expect("checked");
    let id = admin
        .start(release, &["1", "100%"], json!({"max_parallel": 1}))
        .await?;
    admin
        .wait_state(
            &id,
            &["rolling_back", "rolled_back", "paused"],
            Duration::from_secs(120),
        )
        .await?;
    let events = admin.events(&id).await?;
    let at = |prefix: &str| {
        events
            .iter()
            .find(|e| e["message"].as_str().is_some_and(|m| m.starts_with(prefix)))
            .and_then(|e| e["at_ms"].as_u64())
    };
    let decided = at("rolling back").context("no \"rolling back\" event in the rollout's log")?;
    let dispatched = at("dispatched").or_else(|| at("wave 1"));
    let first_fail = shared
        .first_failing_check_ms
        .lock()
        .expect("not poisoned")
        .first()
        .copied()
        .context("no simulated host failed its checks")?;
    let budget = args.check_interval_ms * u64::from(args.failure_threshold) + 1000;
    Ok(json!({
        "rollout": id,
        "failure_threshold": args.failure_threshold,
        "check_interval_ms": args.check_interval_ms,
        "dispatch_to_decision_seconds": dispatched.map(|d| decided.saturating_sub(d) as f64 / 1000.0),
        "first_failing_check_to_decision_seconds": decided.saturating_sub(first_fail) as f64 / 1000.0,
        "detection_on_host_seconds": (args.check_interval_ms * u64::from(args.failure_threshold.saturating_sub(1))) as f64 / 1000.0,
        "goal_seconds": budget as f64 / 1000.0,
    }))
}

/// The protocol version the simulated agents speak (`--proto`).
static PROTO: std::sync::OnceLock<turnout_proto::ProtoVersion> = std::sync::OnceLock::new();

fn proto() -> turnout_proto::ProtoVersion {
    *PROTO.get().unwrap_or(&turnout_proto::ProtoVersion::V2)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    let _ = PROTO.set(turnout_proto::ProtoVersion::new(args.proto).expect("1 or 2"));
    // Ten thousand connections need more descriptors than the default soft limit.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)?;
    let server: SocketAddr = args
        .coordinator
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .parse()?;
    let cas = match &args.ca {
        Some(path) => turnout_rt::tls::certificates_from_pem(&std::fs::read(path)?)?,
        None => Vec::new(),
    };
    let tls = args
        .coordinator
        .starts_with("https://")
        .then(|| Arc::new(turnout_tests::http::tls_connector(&cas)));
    let admin = Admin(Arc::new(turnout::client::Client::with_ca(
        &args.coordinator,
        Some(args.token.clone()),
        &cas,
    )));
    let token = admin
        .post(
            "/v1/tokens".into(),
            json!({"enroll": true, "uses": args.hosts, "ttl_secs": 3600}),
        )
        .await?;
    let token = token["token"].as_str().unwrap_or_default().to_owned();
    let enroll_started = Instant::now();
    let mut enrollments = tokio::task::JoinSet::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(64));
    for index in 0..args.hosts {
        let (args, token, permits, tls) =
            (args.clone(), token.clone(), permits.clone(), tls.clone());
        enrollments.spawn(async move {
            let _permit = permits.acquire().await.expect("open");
            let (host, key) = host_key(&args, index);
            let body = json!({"token": token, "host": host.as_str(), "public_key": key.public().to_pem(), "labels": {"role": "web"}});
            let mut conn = Conn::connect(source(&args, index), server, tls.as_deref()).await?;
            let (status, answer) = conn
                .request("POST", "/v1/enroll", None, body.to_string().as_bytes())
                .await?;
            if status != 200 {
                return Err(std::io::Error::other(format!(
                    "enroll: {status}: {}",
                    String::from_utf8_lossy(&answer)
                )));
            }
            Ok::<_, std::io::Error>(())
        });
    }
    while let Some(done) = enrollments.join_next().await {
        done??;
    }
    eprintln!(
        "turnout-sim: enrolled {} hosts in {:.1}s",
        args.hosts,
        enroll_started.elapsed().as_secs_f64()
    );
    let shared = Arc::new(Shared::default());
    let started = Instant::now();
    let mut hosts = tokio::task::JoinSet::new();
    for index in 0..args.hosts {
        hosts.spawn(run_host(
            args.clone(),
            server,
            tls.clone(),
            index,
            shared.clone(),
        ));
    }
    let all = args.hosts as usize;
    if !wait_for(Duration::from_secs(600), all, || {
        shared.hellos.load(Ordering::Relaxed) as usize
    })
    .await
    {
        bail!("not every host could say hello within 10 minutes");
    }
    let connected_in = started.elapsed();
    eprintln!(
        "turnout-sim: all {} hosts said hello in {:.1}s; scenario {:?}",
        args.hosts,
        connected_in.as_secs_f64(),
        args.scenario
    );
    let mut restarted = None;
    let measured = match args.scenario {
        Scenario::Steady => steady(&args, &shared).await?,
        Scenario::Storm => {
            let (measured, child) = storm(&args, &shared).await?;
            restarted = child;
            measured
        }
        Scenario::Waves => waves(&args, &admin).await?,
        Scenario::Rollback => rollback(&args, &admin, &shared).await?,
        Scenario::Decision => decision(&args, &admin, &shared).await?,
    };
    let mut summary = json!({
        "scenario": format!("{:?}", args.scenario).to_lowercase(),
        "hosts": args.hosts,
        "hello_all_seconds": secs(connected_in),
        "installs": shared.installs.load(Ordering::Relaxed),
        "failed_installs": shared.failures.load(Ordering::Relaxed),
    });
    if let (Some(summary), Some(measured)) = (summary.as_object_mut(), measured.as_object()) {
        summary.extend(measured.clone());
    }
    println!("{}", serde_json::to_string_pretty(&summary)?);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)?;
    }
    hosts.abort_all();
    if let Some(mut child) = restarted {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = child.wait();
    }
    Ok(())
}
