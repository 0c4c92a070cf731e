//! `turnout-sim`: a fleet of simulated hosts in one process, against a real
//! `turnout serve`, for the benchmarks (docs/benchmarks.md).
//!
//! Each host is a real protocol client: its own ed25519 key and enrollment,
//! a signed hello with negotiation, desired-state long polls, and reports on
//! a keep-alive connection from one of several 127.0.0.x source addresses.
//! Installs are simulated: a host told to run a release "installs" it for
//! `--install-ms` and commits, or fails when the seeded plan says so.
//!
//!   turnout-sim --coordinator http://127.0.0.1:7400 --token TNT --hosts 1000 --duration 60s

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use sha2::{Digest as _, Sha256};
use tokio::sync::Mutex;
use turnout_proto::keys::SecretKey;
use turnout_proto::messages::{
    DesiredState, Health, Hello, Outcome, OutcomeKind, ReleaseRef, Report, ServiceReport,
    ServiceState,
};
use turnout_proto::{CapabilitySet, HostId, SUPPORTED, encode, request_auth};
use turnout_tests::http::Conn;

/// Simulated fleet options.
#[derive(Debug, Parser)]
#[command(
    name = "turnout-sim",
    about = "A fleet of simulated hosts against a real coordinator"
)]
struct Args {
    /// The coordinator (http://127.0.0.1:PORT).
    #[arg(long)]
    coordinator: String,
    /// An admin token (to make the enrollment token).
    #[arg(long, env = "TURNOUT_TOKEN")]
    token: String,
    /// How many hosts.
    #[arg(long, default_value_t = 1000)]
    hosts: u32,
    /// How long to run after every host has said hello.
    #[arg(long, default_value = "60s")]
    duration: humantime::Duration,
    /// Source addresses to spread connections over (127.0.0.1 ..).
    #[arg(long, default_value_t = 32)]
    addresses: u32,
    /// Percentage of installs that fail, by a seeded plan.
    #[arg(long, default_value_t = 0)]
    fail_percent: u32,
    /// Only hosts in this many first ranks fail (0: any host may).
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// How long a simulated install takes.
    #[arg(long, default_value_t = 100)]
    install_ms: u64,
    /// Host id prefix (several simulators can share a coordinator).
    #[arg(long, default_value = "sim")]
    prefix: String,
    /// The coordinator's pid: its CPU and RSS are read from /proc over the measured window.
    #[arg(long)]
    coordinator_pid: Option<u32>,
    /// Write the summary as JSON to this file too.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Default)]
struct Stats {
    reports: AtomicU64,
    polls: AtomicU64,
    errors: AtomicU64,
    installs: AtomicU64,
    failures: AtomicU64,
    latencies_us: Mutex<Vec<u32>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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

    fn report_body(&mut self) -> Vec<u8> {
        self.seq += 1;
        let report = Report {
            host: self.host.clone(),
            seq: self.seq,
            desired_index: 0,
            services: vec![ServiceReport {
                service: "web".parse().expect("valid"),
                state: ServiceState::Idle,
                active_slot: None,
                committed: self.committed.clone(),
                other: None,
                target: None,
                health: Health::Healthy,
                last_outcome: self.outcome.clone(),
                last_error: None,
            }],
        };
        encode(SUPPORTED.max(), &report)
    }
}

/// Whether the seeded plan fails `host`'s install of `release`.
fn fails(seed: u64, host: &str, release: &ReleaseRef, percent: u32) -> bool {
    let digest = Sha256::digest(format!("{seed}/{host}/{}", release.sha256));
    u32::from(digest[0]) * 100 / 256 < percent
}

async fn run_host(
    args: Arc<Args>,
    server: SocketAddr,
    index: u32,
    stats: Arc<Stats>,
    until: Instant,
    hello_done: Arc<AtomicU64>,
) {
    let host: HostId = format!("{}-{index:05}", args.prefix)
        .parse()
        .expect("valid id");
    let seed: [u8; 32] = Sha256::digest(format!("{}-{index}", args.prefix)).into();
    let mut sim = Sim {
        host,
        key: SecretKey::from_seed(seed),
        committed: None,
        outcome: None,
        seq: 0,
    };
    let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (index % args.addresses) as u8));
    let mut conn = None;
    let mut index_seen = 0;
    let mut said_hello = false;
    let mut backoff = Duration::from_millis(200);
    while Instant::now() < until {
        if conn.is_none() {
            match Conn::connect(source, server).await {
                Ok(c) => conn = Some(c),
                Err(_) => {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        }
        let c = conn.as_mut().expect("connected");
        let result: std::io::Result<()> = async {
            if !said_hello {
                let hello = Hello {
                    agent_version: "sim".into(),
                    proto_range: SUPPORTED,
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
                hello_done.fetch_add(1, Ordering::Relaxed);
            }
            let body = sim.report_body();
            let started = Instant::now();
            let (status, _) = c
                .request(
                    "POST",
                    "/v1/agent/report",
                    Some(&sim.auth("POST", "/v1/agent/report", &body)),
                    &body,
                )
                .await?;
            let took = started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
            if status != 204 {
                return Err(std::io::Error::other(format!("report: {status}")));
            }
            stats.reports.fetch_add(1, Ordering::Relaxed);
            stats.latencies_us.lock().await.push(took);
            let path = format!("/v1/agent/desired?index={index_seen}&wait=10s");
            let (status, body) = c
                .request("GET", &path, Some(&sim.auth("GET", &path, b"")), b"")
                .await?;
            if status != 200 {
                return Err(std::io::Error::other(format!("desired: {status}")));
            }
            stats.polls.fetch_add(1, Ordering::Relaxed);
            let desired: DesiredState = turnout_proto::decode(&body)
                .map(|e| e.body)
                .map_err(std::io::Error::other)?;
            index_seen = desired.index;
            if let Some(wanted) = desired.services.first().map(|s| s.release.clone()) {
                let failed_before = sim.outcome.as_ref().is_some_and(|o| {
                    o.release.sha256 == wanted.sha256 && o.kind != OutcomeKind::Committed
                });
                if sim.committed.as_ref() != Some(&wanted) && !failed_before {
                    tokio::time::sleep(Duration::from_millis(args.install_ms)).await;
                    stats.installs.fetch_add(1, Ordering::Relaxed);
                    if fails(args.seed, sim.host.as_str(), &wanted, args.fail_percent) {
                        stats.failures.fetch_add(1, Ordering::Relaxed);
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
                }
            }
            Ok(())
        }
        .await;
        if result.is_err() {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            conn = None;
            said_hello = false;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        } else {
            backoff = Duration::from_millis(200);
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

fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    f64::from(sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]) / 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    // Ten thousand connections need more descriptors than the default soft limit.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)?;
    let server: SocketAddr = args.coordinator.trim_start_matches("http://").parse()?;
    let admin = turnout::client::Client::new(&args.coordinator, Some(args.token.clone()));
    let token: serde_json::Value = admin.post(
        "/v1/tokens",
        &serde_json::json!({"enroll": true, "uses": args.hosts, "ttl_secs": 3600}),
    )?;
    let token = token["token"].as_str().unwrap_or_default().to_owned();
    let enroll_started = Instant::now();
    let mut enrollments = tokio::task::JoinSet::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(64));
    for index in 0..args.hosts {
        let (args, token, permits) = (args.clone(), token.clone(), permits.clone());
        enrollments.spawn(async move {
            let _permit = permits.acquire().await.expect("open");
            let seed: [u8; 32] = Sha256::digest(format!("{}-{index}", args.prefix)).into();
            let key = SecretKey::from_seed(seed);
            let body = serde_json::json!({"token": token, "host": format!("{}-{index:05}", args.prefix), "public_key": key.public().to_pem(), "labels": {"role": "web"}});
            let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (index % args.addresses) as u8));
            let mut conn = Conn::connect(source, server).await?;
            let (status, answer) = conn.request("POST", "/v1/enroll", None, body.to_string().as_bytes()).await?;
            if status != 200 {
                return Err(std::io::Error::other(format!("enroll: {status}: {}", String::from_utf8_lossy(&answer))));
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
    let stats = Arc::new(Stats::default());
    let hello_done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let until = started + Duration::from(args.duration) + Duration::from_secs(600);
    let stop_at = Arc::new(Mutex::new(until));
    let mut hosts = tokio::task::JoinSet::new();
    for index in 0..args.hosts {
        let (args, stats, hello_done) = (args.clone(), stats.clone(), hello_done.clone());
        let until = *stop_at.lock().await;
        hosts.spawn(run_host(args, server, index, stats, until, hello_done));
    }
    while hello_done.load(Ordering::Relaxed) < u64::from(args.hosts) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connected_in = started.elapsed();
    eprintln!(
        "turnout-sim: all {} hosts said hello in {:.1}s; running for {}",
        args.hosts,
        connected_in.as_secs_f64(),
        args.duration
    );
    stats.latencies_us.lock().await.clear();
    let (reports0, polls0) = (
        stats.reports.load(Ordering::Relaxed),
        stats.polls.load(Ordering::Relaxed),
    );
    let before = args.coordinator_pid.and_then(sample);
    let window = Instant::now();
    tokio::time::sleep(args.duration.into()).await;
    let after = args.coordinator_pid.and_then(sample);
    let (cpu_percent, rss_mib) = match (before, after) {
        (Some((t0, _)), Some((t1, rss))) => (
            (t1 - t0) as f64 / 100.0 / window.elapsed().as_secs_f64() * 100.0,
            rss as f64 / 1024.0,
        ),
        _ => (f64::NAN, f64::NAN),
    };
    let mut latencies = stats.latencies_us.lock().await.clone();
    latencies.sort_unstable();
    let seconds = Duration::from(args.duration).as_secs_f64();
    let summary = serde_json::json!({
        "hosts": args.hosts,
        "seconds": seconds,
        "hello_all_seconds": connected_in.as_secs_f64(),
        "reports": stats.reports.load(Ordering::Relaxed) - reports0,
        "reports_per_second": (stats.reports.load(Ordering::Relaxed) - reports0) as f64 / seconds,
        "polls": stats.polls.load(Ordering::Relaxed) - polls0,
        "report_p50_ms": percentile(&latencies, 0.50),
        "report_p99_ms": percentile(&latencies, 0.99),
        "errors": stats.errors.load(Ordering::Relaxed),
        "installs": stats.installs.load(Ordering::Relaxed),
        "failed_installs": stats.failures.load(Ordering::Relaxed),
        "coordinator_cpu_percent_of_one_core": cpu_percent,
        "coordinator_rss_mib": rss_mib,
        "coordinator_rss_kib_per_host": rss_mib * 1024.0 / f64::from(args.hosts),
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)?;
    }
    hosts.abort_all();
    Ok(())
}
