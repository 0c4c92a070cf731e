//! Health checks, and the bake verdict that decides commit or revert.
//!
//! A [`Judge`] is pure: it is fed probe results and the time since the
//! switch, and says pending, healthy or unhealthy. A check passes after
//! `success` consecutive passes and fails after `failure` consecutive
//! failures. Within its `start_period` after the switch, failures before a
//! check's first pass do not count (a service is given time to start
//! listening, like Docker's `--start-period`); its first pass, or the
//! period's end, starts the normal judgement. The release commits once
//! every check has passed continuously
//! for `min_healthy`, and reverts when any check fails, when the service's
//! process dies (it restarted since the switch), or when `deadline` passes
//! first. [`bake`] drives a judge with real probes and real time.
//!
//! Probes: `http` is an HTTP/1.1 GET with hyper, on the agent's runtime
//! (no thread per probe), keeping one connection alive per endpoint, so a
//! check at rest does not open a connection per probe; the body is decoded
//! (chunked or not), read up to 64 KiB, and the whole exchange bounded by
//! the check's timeout. Health endpoints
//! are local, so no TLS. `process` reads `/proc/<pid>` directly (RSS from `statm`, CPU from
//! `stat` between two samples), which keeps the agent small.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::time::Instant;

use crate::config::{Bake, Check, Probe};
use crate::supervisor::Supervisor;

/// Where one check stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckStatus {
    /// Not enough results yet.
    Pending,
    /// `success` consecutive passes.
    Passing,
    /// `failure` consecutive failures; the last reason.
    Failing(String),
}

/// The judge's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Keep watching.
    Pending,
    /// Commit; how it passed.
    Healthy(String),
    /// Revert; why.
    Unhealthy(String),
}

#[derive(Debug, Clone)]
struct Tally {
    name: String,
    success: u32,
    failure: u32,
    passes: u32,
    fails: u32,
    status: CheckStatus,
    start_period: Duration,
    /// It has passed once since the switch: its start period is over.
    started: bool,
}

/// Decides a bake from probe results and elapsed time; see the module docs.
#[derive(Debug, Clone)]
pub struct Judge {
    checks: Vec<Tally>,
    bake: Bake,
    dead: Option<String>,
    green_since: Option<Duration>,
}

impl Judge {
    /// A judge for `checks` under `bake`.
    pub fn new(checks: &[Check], bake: Bake) -> Judge {
        Judge {
            checks: checks
                .iter()
                .map(|c| Tally {
                    name: c.probe.describe(),
                    success: c.success,
                    failure: c.failure,
                    passes: 0,
                    fails: 0,
                    status: CheckStatus::Pending,
                    // Never past the deadline: a service that never starts
                    // is still reverted in time.
                    start_period: c.start_period.min(bake.deadline),
                    started: false,
                })
                .collect(),
            bake,
            dead: None,
            green_since: None,
        }
    }

    /// Records one result of check `index`, `elapsed` after the switch;
    /// returns false if it did not count (a failure in the start period).
    pub fn observe(&mut self, index: usize, result: Result<(), String>, elapsed: Duration) -> bool {
        let tally = &mut self.checks[index];
        if result.is_err() && !tally.started && elapsed < tally.start_period {
            return false;
        }
        match result {
            Ok(()) => {
                tally.started = true;
                tally.passes += 1;
                tally.fails = 0;
                if tally.passes >= tally.success {
                    tally.status = CheckStatus::Passing;
                }
            }
            Err(reason) => {
                tally.fails += 1;
                tally.passes = 0;
                if tally.fails >= tally.failure {
                    tally.status = CheckStatus::Failing(reason);
                }
            }
        }
        true
    }

    /// Records that the service's process died or restarted.
    pub fn died(&mut self, reason: String) {
        self.dead.get_or_insert(reason);
    }

    /// The status of every check, in order.
    pub fn statuses(&self) -> Vec<(String, CheckStatus)> {
        self.checks
            .iter()
            .map(|t| (t.name.clone(), t.status.clone()))
            .collect()
    }

    /// The verdict `elapsed` after the switch.
    pub fn verdict(&mut self, elapsed: Duration) -> Verdict {
        if let Some(reason) = &self.dead {
            return Verdict::Unhealthy(reason.clone());
        }
        if let Some(tally) = self
            .checks
            .iter()
            .find(|t| matches!(t.status, CheckStatus::Failing(_)))
        {
            let CheckStatus::Failing(reason) = &tally.status else {
                unreachable!()
            };
            return Verdict::Unhealthy(format!(
                "check {} failed {} times in a row: {reason}",
                tally.name, tally.fails
            ));
        }
        if self.checks.iter().all(|t| t.status == CheckStatus::Passing) {
            let since = *self.green_since.get_or_insert(elapsed);
            if elapsed - since >= self.bake.min_healthy {
                return Verdict::Healthy(format!(
                    "{} healthy for {}",
                    match self.checks.len() {
                        0 => "running, no checks configured,".to_owned(),
                        n => format!("all {n} check(s)"),
                    },
                    humantime::format_duration(self.bake.min_healthy)
                ));
            }
        } else {
            self.green_since = None;
        }
        if elapsed >= self.bake.deadline {
            let waiting: Vec<_> = self
                .checks
                .iter()
                .filter(|t| t.status != CheckStatus::Passing)
                .map(|t| t.name.as_str())
                .collect();
            return Verdict::Unhealthy(format!(
                "not healthy for {} within the deadline of {}{}",
                humantime::format_duration(self.bake.min_healthy),
                humantime::format_duration(self.bake.deadline),
                if waiting.is_empty() {
                    String::new()
                } else {
                    format!("; still waiting for: {}", waiting.join(", "))
                }
            ));
        }
        Verdict::Pending
    }
}

/// CPU samples of the `process` probe: (pid, ticks, when).
pub type CpuSample = Option<(u32, u64, Instant)>;

/// Runs one probe of `check` within its timeout.
pub async fn probe(
    check: &Check,
    supervisor: &dyn Supervisor,
    http: &HttpClient,
    baseline_restarts: u64,
    cpu: &mut CpuSample,
) -> Result<(), String> {
    match tokio::time::timeout(
        check.timeout,
        probe_once(check, supervisor, http, baseline_restarts, cpu),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no answer within {}",
            humantime::format_duration(check.timeout)
        )),
    }
}

async fn probe_once(
    check: &Check,
    supervisor: &dyn Supervisor,
    http: &HttpClient,
    baseline_restarts: u64,
    cpu: &mut CpuSample,
) -> Result<(), String> {
    match &check.probe {
        Probe::Http {
            url,
            status,
            body_contains,
        } => {
            let (code, body) = http.get(url, check.timeout).await?;
            let status_ok = match status {
                Some(expected) => code == *expected,
                None => (200..300).contains(&code),
            };
            if !status_ok {
                return Err(format!(
                    "status {code}, expected {}",
                    status.map_or("2xx".into(), |s| s.to_string())
                ));
            }
            if let Some(needle) = body_contains
                && !String::from_utf8_lossy(&body).contains(needle.as_str())
            {
                return Err(format!("the body does not contain {needle:?}"));
            }
            Ok(())
        }
        Probe::Tcp { address } => TcpStream::connect(address)
            .await
            .map(drop)
            .map_err(|err| format!("connect: {err}")),
        Probe::Exec { command } => {
            let status = Command::new(&command[0])
                .args(&command[1..])
                .kill_on_drop(true)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .await
                .map_err(|err| format!("cannot run {}: {err}", command[0]))?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("exited with {status}"))
            }
        }
        Probe::Systemd => {
            let status = supervisor.status().await.map_err(|err| err.to_string())?;
            if !status.active {
                Err("the unit is not active".into())
            } else if status.restarts > baseline_restarts {
                Err(format!(
                    "the unit restarted {} time(s) since the switch",
                    status.restarts - baseline_restarts
                ))
            } else {
                Ok(())
            }
        }
        Probe::Process { max_rss, max_cpu } => {
            let status = supervisor.status().await.map_err(|err| err.to_string())?;
            let pid = status.main_pid.ok_or("the service has no main process")?;
            if let Some(limit) = max_rss {
                let rss = rss_bytes(pid).ok_or("cannot read the process's memory")?;
                if rss > *limit {
                    return Err(format!(
                        "RSS {} MiB over the limit of {} MiB",
                        rss >> 20,
                        limit >> 20
                    ));
                }
            }
            if let Some(limit) = max_cpu {
                let ticks = cpu_ticks(pid).ok_or("cannot read the process's CPU time")?;
                let now = Instant::now();
                let previous = cpu.replace((pid, ticks, now));
                if let Some((prev_pid, prev_ticks, then)) = previous.filter(|(p, _, _)| *p == pid) {
                    let _ = prev_pid;
                    let seconds = now.duration_since(then).as_secs_f64();
                    // Linux reports CPU time in clock ticks of 1/100 s.
                    let share =
                        (ticks.saturating_sub(prev_ticks)) as f64 / 100.0 / seconds.max(0.001)
                            * 100.0;
                    if share > *limit {
                        return Err(format!(
                            "CPU {share:.0}% of a core, over the limit of {limit:.0}%"
                        ));
                    }
                }
            }
            Ok(())
        }
    }
}

/// The process's resident size, from `/proc/PID/statm` (one short line;
/// `status` costs the kernel several times as much to format, nine times a
/// second on a host with three services).
fn rss_bytes(pid: u32) -> Option<u64> {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let page = *PAGE.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .map_or(4096, |size| size as u64)
    });
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page)
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields resume after its closing ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The most of a health response's body that is read and judged.
pub const BODY_LIMIT: u64 = 64 * 1024;

/// A kept-alive HTTP/1.1 connection's request half.
type Sender = hyper::client::conn::http1::SendRequest<http_body_util::Empty<hyper::body::Bytes>>;

/// The HTTP client of one service's checks: one kept-alive connection per
/// endpoint (`host:port`), reused while the server keeps it open.
#[derive(Debug, Default)]
pub struct HttpClient {
    idle: std::sync::Mutex<std::collections::HashMap<String, Sender>>,
}

impl HttpClient {
    /// A client with no connection yet.
    pub fn new() -> HttpClient {
        HttpClient::default()
    }

    /// GETs `url`: the status and up to [`BODY_LIMIT`] bytes of the decoded
    /// body, or why not. The whole exchange, from connecting to the last
    /// byte read, ends within `timeout`; a connection cut short is dropped.
    pub async fn get(&self, url: &str, timeout: Duration) -> Result<(u16, Vec<u8>), String> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|err| format!("not a URL: {url:?} ({err})"))?;
        let authority = match (uri.host(), uri.port_u16()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => format!("{host}:80"),
            (None, _) => return Err(format!("no host in {url:?}")),
        };
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        let within = humantime::format_duration(timeout);
        match tokio::time::timeout(timeout, self.exchange(&authority, &path)).await {
            Ok(result) => result,
            Err(_) => Err(format!("no complete answer within {within}")),
        }
    }

    async fn exchange(&self, authority: &str, path: &str) -> Result<(u16, Vec<u8>), String> {
        use http_body_util::BodyExt as _;
        let pooled = self.idle.lock().expect("not poisoned").remove(authority);
        let request = || {
            hyper::Request::get(path)
                .header(hyper::header::HOST, authority)
                .header(hyper::header::USER_AGENT, "turnout-agent")
                .body(http_body_util::Empty::new())
                .map_err(|err| format!("the request: {err}"))
        };
        // A kept-alive connection the server closed meanwhile (its idle
        // timeout) fails before any answer: then once more on a new one.
        let mut reused = None;
        if let Some(mut sender) = pooled
            && sender.ready().await.is_ok()
            && let Ok(response) = sender.send_request(request()?).await
        {
            reused = Some((sender, response));
        }
        let (sender, response) = match reused {
            Some(answered) => answered,
            None => {
                tracing::debug!(authority, "health check: opening a connection");
                let mut sender = connect(authority).await?;
                let response = sender
                    .send_request(request()?)
                    .await
                    .map_err(|err| format!("no answer: {err}"))?;
                (sender, response)
            }
        };
        let code = response.status().as_u16();
        let mut body = response.into_body();
        let mut read = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame
                .map_err(|err| format!("status {code}, but reading the body failed: {err}"))?;
            if let Ok(data) = frame.into_data() {
                let room = BODY_LIMIT as usize - read.len();
                read.extend_from_slice(&data[..data.len().min(room)]);
                if read.len() as u64 >= BODY_LIMIT {
                    // Judged on the first 64 KiB; the rest is not read, and
                    // the connection, mid-body, is not reused.
                    return Ok((code, read));
                }
            }
        }
        tracing::trace!(authority, code, bytes = read.len(), "health check answered");
        // The whole answer was read: the connection can serve the next probe.
        self.idle
            .lock()
            .expect("not poisoned")
            .insert(authority.to_owned(), sender);
        Ok((code, read))
    }
}

/// A new HTTP/1.1 connection to `authority`, its driver on this runtime.
async fn connect(authority: &str) -> Result<Sender, String> {
    let stream = TcpStream::connect(authority)
        .await
        .map_err(|err| format!("connect to {authority}: {err}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|err| format!("connect to {authority}: {err}"))?;
    // Ends when the sender is dropped or the server closes the connection.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// One probe of every check, for a baseline or `status`: None when all pass.
pub async fn probe_all(
    checks: &[Check],
    supervisor: &dyn Supervisor,
    http: &HttpClient,
) -> Option<String> {
    let baseline = supervisor.restarts().await;
    let mut failures = Vec::new();
    for check in checks {
        if let Err(reason) = probe(check, supervisor, http, baseline, &mut None).await {
            failures.push(format!("{}: {reason}", check.probe.describe()));
        }
    }
    (!failures.is_empty()).then(|| failures.join("; "))
}

/// The most the baseline probe before a switch may take, whatever the
/// checks' timeouts.
pub const BASELINE_BUDGET: Duration = Duration::from_secs(5);

/// One probe of every check before a switch, to tell "broke it" from "was
/// broken": [`probe_all`] bounded by `budget` as a whole, since it only
/// annotates and must never hold the switch (checks that hang are the
/// usual reason for an install).
pub async fn baseline(
    checks: &[Check],
    supervisor: &dyn Supervisor,
    http: &HttpClient,
    budget: Duration,
) -> Option<String> {
    tokio::time::timeout(budget, probe_all(checks, supervisor, http))
        .await
        .unwrap_or_else(|_| {
            Some(format!(
                "the checks did not all answer within {}",
                humantime::format_duration(budget)
            ))
        })
}

/// Watches health after a switch until the judge decides: `Ok` with how it
/// passed, or `Err` with why it failed.
pub async fn bake(
    service: &str,
    checks: &[Check],
    bake: Bake,
    supervisor: &dyn Supervisor,
    http: &HttpClient,
    baseline_restarts: u64,
) -> Result<String, String> {
    /// How often the service's process is checked for life between probes.
    const LIVENESS: Duration = Duration::from_millis(100);
    let start = Instant::now();
    let mut judge = Judge::new(checks, bake);
    let mut due: Vec<Instant> = vec![start; checks.len()];
    let mut cpu: Vec<CpuSample> = vec![None; checks.len()];
    let mut failing = vec![false; checks.len()];
    loop {
        match supervisor.status().await {
            Ok(status) if !status.active => judge.died("the service is not running".into()),
            Ok(status) if status.restarts > baseline_restarts => {
                judge.died(format!(
                    "the service crashed and was restarted {} time(s) since the switch",
                    status.restarts - baseline_restarts
                ));
            }
            Ok(_) => {}
            Err(err) => judge.died(err.to_string()),
        }
        let now = Instant::now();
        for (i, check) in checks.iter().enumerate() {
            if due[i] <= now {
                let result = probe(check, supervisor, http, baseline_restarts, &mut cpu[i]).await;
                let failed = result.as_ref().err().cloned();
                let counted = judge.observe(i, result, Instant::now() - start);
                // The first counted failure of a streak is logged: when it
                // began is what an operator reading a revert wants to know.
                if let Some(reason) = &failed
                    && counted
                    && !failing[i]
                {
                    tracing::warn!(service = %service, "check {} started failing during the bake ({} failures in a row revert): {reason}",
                        i + 1,
                        check.failure
                    );
                }
                failing[i] = failed.is_some() && counted;
                due[i] = now + check.interval;
            }
        }
        match judge.verdict(Instant::now() - start) {
            Verdict::Pending => {}
            Verdict::Healthy(how) => return Ok(how),
            Verdict::Unhealthy(why) => return Err(why),
        }
        let wake = due
            .iter()
            .copied()
            .min()
            .unwrap_or(now + LIVENESS)
            .min(Instant::now() + LIVENESS);
        tokio::time::sleep_until(wake).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(success: u32, failure: u32) -> Check {
        Check {
            probe: Probe::Tcp {
                address: "127.0.0.1:1".parse().unwrap(),
            },
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            success,
            failure,
            start_period: Duration::from_secs(15),
        }
    }

    fn bake(min_healthy: u64, deadline: u64) -> Bake {
        Bake {
            min_healthy: Duration::from_secs(min_healthy),
            deadline: Duration::from_secs(deadline),
        }
    }

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn commits_after_min_healthy_of_continuous_green() {
        let mut judge = Judge::new(&[check(2, 3)], bake(3, 60));
        judge.observe(0, Ok(()), s(100));
        assert_eq!(
            judge.verdict(s(0)),
            Verdict::Pending,
            "one pass of two needed"
        );
        judge.observe(0, Ok(()), s(100));
        assert_eq!(judge.verdict(s(1)), Verdict::Pending);
        assert_eq!(judge.verdict(s(3)), Verdict::Pending);
        assert!(matches!(judge.verdict(s(4)), Verdict::Healthy(_)));
    }

    #[test]
    fn failures_below_the_threshold_do_not_revert_but_reset_nothing_green() {
        let mut judge = Judge::new(&[check(1, 3)], bake(10, 60));
        judge.observe(0, Ok(()), s(100));
        assert_eq!(judge.verdict(s(0)), Verdict::Pending);
        judge.observe(0, Err("503".into()), s(100));
        judge.observe(0, Err("503".into()), s(100));
        assert_eq!(judge.verdict(s(2)), Verdict::Pending, "2 failures of 3");
        judge.observe(0, Err("503".into()), s(100));
        assert_eq!(
            judge.verdict(s(3)),
            Verdict::Unhealthy("check tcp 127.0.0.1:1 failed 3 times in a row: 503".into())
        );
    }

    #[test]
    fn a_pass_between_failures_restarts_the_count() {
        let mut judge = Judge::new(&[check(1, 2)], bake(10, 60));
        for result in [Err("x".to_owned()), Ok(()), Err("x".to_owned()), Ok(())] {
            judge.observe(0, result, s(100));
            assert_eq!(judge.verdict(s(1)), Verdict::Pending);
        }
    }

    /// The newcomer's case: a service not listening yet for its first
    /// seconds used to be reverted by its third refused connection.
    #[test]
    fn failures_before_the_first_pass_in_the_start_period_do_not_count() {
        let mut judge = Judge::new(&[check(1, 3)], bake(2, 60));
        for second in 0..10 {
            assert!(!judge.observe(0, Err("connection refused".into()), s(second)));
        }
        assert_eq!(judge.verdict(s(10)), Verdict::Pending);
        assert!(judge.observe(0, Ok(()), s(11)));
        // After the first pass, failures count again at once.
        for _ in 0..3 {
            assert!(judge.observe(0, Err("503".into()), s(12)));
        }
        assert!(
            matches!(judge.verdict(s(12)), Verdict::Unhealthy(r) if r.contains("failed 3 times"))
        );
    }

    #[test]
    fn a_service_that_never_starts_fails_when_the_start_period_ends() {
        let mut judge = Judge::new(&[check(1, 3)], bake(2, 60));
        for second in 10..15 {
            judge.observe(0, Err("connection refused".into()), s(second));
        }
        assert_eq!(judge.verdict(s(15)), Verdict::Pending);
        for second in 15..18 {
            assert!(judge.observe(0, Err("connection refused".into()), s(second)));
        }
        assert!(matches!(judge.verdict(s(18)), Verdict::Unhealthy(_)));
        // The start period never outlasts the deadline.
        let mut short = Judge::new(&[check(1, 3)], bake(1, 5));
        for second in 5..8 {
            assert!(short.observe(0, Err("refused".into()), s(second)));
        }
    }

    #[test]
    fn the_deadline_reverts_a_release_that_never_settles() {
        let mut judge = Judge::new(&[check(1, 3), check(1, 3)], bake(10, 30));
        judge.observe(0, Ok(()), s(100));
        assert_eq!(judge.verdict(s(29)), Verdict::Pending);
        let Verdict::Unhealthy(reason) = judge.verdict(s(30)) else {
            panic!()
        };
        assert!(reason.contains("within the deadline of 30s"), "{reason}");
        assert!(
            reason.contains("still waiting for: tcp 127.0.0.1:1"),
            "{reason}"
        );
    }

    #[test]
    fn a_dead_process_reverts_at_once() {
        let mut judge = Judge::new(&[], bake(1, 60));
        assert_eq!(judge.verdict(s(0)), Verdict::Pending);
        judge.died("the service is not running".into());
        assert_eq!(
            judge.verdict(s(0)),
            Verdict::Unhealthy("the service is not running".into())
        );
    }

    #[test]
    fn no_checks_commits_on_liveness_alone() {
        let mut judge = Judge::new(&[], bake(2, 60));
        assert_eq!(judge.verdict(s(0)), Verdict::Pending);
        assert!(
            matches!(judge.verdict(s(2)), Verdict::Healthy(reason) if reason.contains("no checks configured"))
        );
    }

    /// A raw HTTP server on loopback that answers every request on every
    /// connection with `response`, holding each connection open; it counts
    /// the connections it accepted.
    async fn raw_server(
        response: &'static [u8],
    ) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0; 1024];
                    loop {
                        let Ok(n) = socket.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        request.extend_from_slice(&buf[..n]);
                        while let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                            request.drain(..end + 4);
                            if socket.write_all(response).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (format!("http://{addr}"), accepted)
    }

    fn http_check(url: String, body_contains: Option<&str>, timeout: Duration) -> Check {
        Check {
            probe: Probe::Http {
                url,
                status: None,
                body_contains: body_contains.map(str::to_owned),
            },
            timeout,
            ..check(1, 3)
        }
    }

    async fn probe_http(client: &HttpClient, check: &Check) -> Result<(), String> {
        let supervisor = crate::supervisor::Systemd {
            unit: "unused.service".into(),
        };
        probe(check, &supervisor, client, 0, &mut None).await
    }

    #[tokio::test]
    async fn reads_status_and_body_and_names_a_refused_connection() {
        let (base, _) =
            raw_server(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nsick").await;
        let client = HttpClient::new();
        let (code, body) = client
            .get(&format!("{base}/healthz"), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!((code, body.as_slice()), (503, &b"sick"[..]));
        let err = client
            .get("http://127.0.0.1:1/", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.contains("connect"), "{err}");
    }

    #[tokio::test]
    async fn probes_at_rest_reuse_one_kept_alive_connection() {
        let (base, accepted) = raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
        let client = HttpClient::new();
        let check = http_check(
            format!("{base}/healthz"),
            Some("ok"),
            Duration::from_secs(5),
        );
        for _ in 0..5 {
            probe_http(&client, &check).await.unwrap();
        }
        assert_eq!(
            accepted.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "five probes, one connection"
        );
    }

    #[test]
    fn the_process_probe_reads_this_processs_rss_and_cpu() {
        let pid = std::process::id();
        let rss = rss_bytes(pid).expect("statm reads");
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap();
        let (a, b) = (rss as f64, (kib * 1024) as f64);
        assert!((a - b).abs() / b < 0.2, "statm {rss} vs status {kib} KiB");
        assert!(cpu_ticks(pid).is_some());
        assert_eq!(rss_bytes(u32::MAX), None, "no such process");
    }

    #[tokio::test]
    async fn a_kept_connection_the_server_closed_is_replaced_not_failed() {
        // The server answers one request per connection, then closes it
        // without saying so (an idle timeout racing the next probe).
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut buf = [0; 1024];
                let _ = socket.read(&mut buf).await;
                let _ = socket
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
                drop(socket);
            }
        });
        let client = HttpClient::new();
        let check = http_check(
            format!("http://{addr}/"),
            Some("ok"),
            Duration::from_secs(5),
        );
        for probe in 0..5 {
            probe_http(&client, &check)
                .await
                .unwrap_or_else(|err| panic!("probe {probe}: {err}"));
        }
    }

    #[tokio::test]
    async fn a_chunked_body_is_judged_decoded() {
        // "ok" arrives split over two chunks: only the decoded body holds it.
        let (base, _) = raw_server(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\no\r\n1\r\nk\r\n0\r\n\r\n",
        )
        .await;
        let client = HttpClient::new();
        let (_, body) = client
            .get(&format!("{base}/"), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(body, b"ok");
        let wanted = http_check(format!("{base}/"), Some("ok"), Duration::from_secs(5));
        probe_http(&client, &wanted).await.unwrap();
        let chunk_syntax = http_check(format!("{base}/"), Some("1\r\no"), Duration::from_secs(5));
        let err = probe_http(&client, &chunk_syntax).await.unwrap_err();
        assert!(err.contains("does not contain"), "{err}");
    }

    #[tokio::test]
    async fn an_endpoint_that_never_closes_is_judged_within_the_timeout() {
        // A whole response on a connection the server never closes (it
        // ignores `Connection: close`): judged on the response, at once.
        let (open, _) =
            raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                .await;
        let client = HttpClient::new();
        let check = http_check(format!("{open}/"), Some("ok"), Duration::from_secs(30));
        probe_http(&client, &check).await.unwrap();
        // Headers, then a body that never ends and a connection never
        // closed: failing, with the timeout as the reason (the probe
        // returned, so the timeout bounded it).
        let (stalled, _) =
            raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial").await;
        let check = http_check(
            format!("{stalled}/"),
            Some("ok"),
            Duration::from_millis(300),
        );
        let err = probe_http(&client, &check).await.unwrap_err();
        assert!(
            err.contains("within 300ms") || err.contains("no answer within"),
            "{err}"
        );
        // Nothing at all after the request: the same.
        let (silent, _) = raw_server(b"").await;
        let check = http_check(format!("{silent}/"), None, Duration::from_millis(300));
        let err = probe_http(&client, &check).await.unwrap_err();
        assert!(err.contains("within 300ms"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_baseline_before_a_switch_is_bounded_whatever_the_check_timeouts() {
        // A service that accepts and never answers, checked with the
        // longest timeout allowed: the baseline gives up at its budget.
        let (silent, _) = raw_server(b"").await;
        let check = http_check(format!("{silent}/"), None, crate::config::MAX_CHECK_TIMEOUT);
        let client = HttpClient::new();
        let supervisor = crate::supervisor::fake::Fake::new();
        let started = tokio::time::Instant::now();
        let note = baseline(&[check], &supervisor, &client, BASELINE_BUDGET).await;
        assert_eq!(started.elapsed(), BASELINE_BUDGET);
        assert_eq!(
            note.as_deref(),
            Some("the checks did not all answer within 5s")
        );
    }

    #[tokio::test]
    async fn a_huge_body_is_read_only_up_to_the_limit() {
        static HUGE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        let huge = HUGE.get_or_init(|| {
            let body = vec![b'x'; 1 << 20];
            let mut response =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
            response.extend_from_slice(&body);
            response
        });
        let (base, _) = raw_server(huge).await;
        let (code, body) = HttpClient::new()
            .get(&format!("{base}/"), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!((code, body.len() as u64), (200, BODY_LIMIT));
    }
}
