//! Running a service's process: through systemd, or by the agent itself.
//!
//! Both answer the same questions (restart, make sure it runs, stop, status)
//! so the install cycle does not care which one a service uses. `exec` is for
//! hosts without systemd, tests and the demo: the agent is the service's
//! parent, prefixes its output with the service name on the agent's stderr,
//! restarts it after a crash (1 s, doubling to 30 s), and counts restarts as
//! systemd's `NRestarts` does. Its process group id goes into `exec.pid` so an
//! agent that was killed can stop its orphan on the next start.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::watch;

/// What a supervisor reports about a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitStatus {
    /// Running (or starting).
    pub active: bool,
    /// Restarts after crashes since the supervisor started counting.
    pub restarts: u64,
    /// The main process, when running.
    pub main_pid: Option<u32>,
}

/// Why a supervisor could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The systemd unit does not exist.
    #[error(
        "the systemd unit {unit} is not loaded (LoadState={state}); install its unit file and run `systemctl daemon-reload`"
    )]
    UnitMissing {
        /// The unit.
        unit: String,
        /// Its load state.
        state: String,
    },
    /// `systemctl` failed.
    #[error("`systemctl {action} {unit}` failed: {detail}")]
    Systemctl {
        /// restart, start, stop, show.
        action: &'static str,
        /// The unit.
        unit: String,
        /// Its stderr or exit status.
        detail: String,
    },
    /// The exec supervisor could not start the program.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What the exec supervisor runs: resolved against the active slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// The program, e.g. `…/current/bin/web`.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its working directory, `…/current` unless configured.
    pub cwd: PathBuf,
    /// Environment variables set for it, over the agent's own.
    pub env: Vec<(String, String)>,
}

/// Whether `name` is an environment variable name: letters, digits and
/// `_`, not starting with a digit.
pub fn is_variable_name(name: &str) -> bool {
    !name.is_empty()
        && !name.as_bytes()[0].is_ascii_digit()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Parses an environment file: `KEY=VALUE` lines, `#` comments and blank
/// lines; a value may be wrapped in double or single quotes.
pub fn parse_env_file(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!(
                "line {}: expected KEY=VALUE, found {line:?}",
                n + 1
            ));
        };
        let key = key.trim();
        if !is_variable_name(key) {
            return Err(format!(
                "line {}: {key:?} is not a variable name (letters, digits, '_')",
                n + 1
            ));
        }
        let value = value.trim();
        let value = match [('"', '"'), ('\'', '\'')]
            .iter()
            .find_map(|(a, b)| value.strip_prefix(*a).and_then(|v| v.strip_suffix(*b)))
        {
            Some(quoted) => quoted,
            // Unquoted, ` #` starts a comment, as in most .env files.
            None => value.split_once(" #").map_or(value, |(v, _)| v).trim_end(),
        };
        out.push((key.to_owned(), value.to_owned()));
    }
    Ok(out)
}

/// Expands `${NAME}` in `arg` from `env`; a name that is not set is an
/// error (an empty `--port` would only crash the service, over and over).
pub fn expand(
    arg: &str,
    env: &std::collections::BTreeMap<String, String>,
) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(start) = rest.find("${") {
        let Some(len) = rest[start + 2..].find('}') else {
            break;
        };
        out.push_str(&rest[..start]);
        let name = &rest[start + 2..start + 2 + len];
        let value = env
            .get(name)
            .ok_or_else(|| format!("{arg:?} uses ${{{name}}}, which is not set"))?;
        out.push_str(value);
        rest = &rest[start + 3 + len..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The names `${NAME}` in `arg` refers to.
pub fn references(arg: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut rest = arg;
    while let Some(start) = rest.find("${") {
        let Some(len) = rest[start + 2..].find('}') else {
            break;
        };
        names.push(&rest[start + 2..start + 2 + len]);
        rest = &rest[start + 3 + len..];
    }
    names
}

/// A boxed future, as the [`Supervisor`] trait's methods return.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// What runs a service's process: systemd ([`Systemd`]), the agent itself
/// ([`Exec`]), or, in tests, a [`Fake`](fake::Fake).
pub trait Supervisor: Send + Sync + std::fmt::Debug {
    /// Restarts the service, running `launch` (exec) or its unit (systemd).
    fn restart<'a>(&'a self, launch: &'a Launch) -> BoxFuture<'a, Result<(), SupervisorError>>;

    /// Starts the service if it is not running; leaves it alone if it is.
    fn ensure_running<'a>(
        &'a self,
        launch: &'a Launch,
    ) -> BoxFuture<'a, Result<(), SupervisorError>>;

    /// Stops the service.
    fn stop(&self) -> BoxFuture<'_, Result<(), SupervisorError>>;

    /// Whether it runs, how often it restarted, its main pid.
    fn status(&self) -> BoxFuture<'_, Result<UnitStatus, SupervisorError>>;

    /// How often it has restarted after crashes (0 if the supervisor cannot say).
    fn restarts(&self) -> BoxFuture<'_, u64> {
        Box::pin(async move { self.status().await.map_or(0, |s| s.restarts) })
    }
}

/// systemd, through `systemctl`.
#[derive(Debug, Clone)]
pub struct Systemd {
    /// The unit.
    pub unit: String,
}

impl Supervisor for Systemd {
    fn restart<'a>(&'a self, _launch: &'a Launch) -> BoxFuture<'a, Result<(), SupervisorError>> {
        Box::pin(async move { systemctl("restart", &self.unit).await.map(drop) })
    }

    fn ensure_running<'a>(
        &'a self,
        _launch: &'a Launch,
    ) -> BoxFuture<'a, Result<(), SupervisorError>> {
        Box::pin(async move { systemctl("start", &self.unit).await.map(drop) })
    }

    fn stop(&self) -> BoxFuture<'_, Result<(), SupervisorError>> {
        Box::pin(async move { systemctl("stop", &self.unit).await.map(drop) })
    }

    fn status(&self) -> BoxFuture<'_, Result<UnitStatus, SupervisorError>> {
        Box::pin(async move {
            let unit = &self.unit;
            let text = systemctl("show", unit).await?;
            let field = |key: &str| {
                text.lines()
                    .find_map(|line| {
                        line.strip_prefix(key)
                            .and_then(|rest| rest.strip_prefix('='))
                    })
                    .unwrap_or("")
                    .to_owned()
            };
            let load = field("LoadState");
            if load != "loaded" {
                return Err(SupervisorError::UnitMissing {
                    unit: unit.clone(),
                    state: load,
                });
            }
            let active = field("ActiveState");
            Ok(UnitStatus {
                active: active == "active" || active == "activating" || active == "reloading",
                restarts: field("NRestarts").parse().unwrap_or(0),
                main_pid: field("MainPID").parse().ok().filter(|pid| *pid != 0),
            })
        })
    }
}

/// The exec supervisor, shared with the task that watches its child.
#[derive(Debug, Clone)]
pub struct ExecSupervisor(pub Arc<Exec>);

impl Supervisor for ExecSupervisor {
    fn restart<'a>(&'a self, launch: &'a Launch) -> BoxFuture<'a, Result<(), SupervisorError>> {
        Box::pin(async move {
            self.0.stop().await;
            // A previous agent killed mid-bake may have left the old process serving.
            self.0.reap_orphan().await;
            self.0.start(launch.clone())
        })
    }

    fn ensure_running<'a>(
        &'a self,
        launch: &'a Launch,
    ) -> BoxFuture<'a, Result<(), SupervisorError>> {
        Box::pin(async move {
            if self.0.status().active {
                Ok(())
            } else {
                self.0.reap_orphan().await;
                self.0.start(launch.clone())
            }
        })
    }

    fn stop(&self) -> BoxFuture<'_, Result<(), SupervisorError>> {
        Box::pin(async move {
            self.0.stop().await;
            Ok(())
        })
    }

    fn status(&self) -> BoxFuture<'_, Result<UnitStatus, SupervisorError>> {
        Box::pin(async move { Ok(self.0.status()) })
    }
}

async fn systemctl(action: &'static str, unit: &str) -> Result<String, SupervisorError> {
    let mut command = Command::new("systemctl");
    command.arg(action).arg(unit);
    if action == "show" {
        command.args([
            "-p",
            "LoadState",
            "-p",
            "ActiveState",
            "-p",
            "NRestarts",
            "-p",
            "MainPID",
        ]);
    }
    let failed = |detail: String| SupervisorError::Systemctl {
        action,
        unit: unit.to_owned(),
        detail,
    };
    let out = command
        .output()
        .await
        .map_err(|err| failed(err.to_string()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(failed(if stderr.is_empty() {
            out.status.to_string()
        } else {
            stderr
        }));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The exec supervisor of one service.
#[derive(Debug)]
pub struct Exec {
    service: String,
    pidfile: PathBuf,
    stop_timeout: Duration,
    restarts: AtomicU64,
    running: Mutex<Option<Running>>,
}

#[derive(Debug)]
struct Running {
    pid: u32,
    /// Set before an intended stop, so the monitor does not restart it.
    stopping: Arc<AtomicBool>,
    exited: watch::Receiver<bool>,
}

impl Exec {
    /// A supervisor for `service` whose pid file lives in `dir`.
    pub fn new(service: &str, dir: &Path, stop_timeout: Duration) -> Arc<Exec> {
        Arc::new(Exec {
            service: service.to_owned(),
            pidfile: dir.join("exec.pid"),
            stop_timeout,
            restarts: AtomicU64::new(0),
            running: Mutex::new(None),
        })
    }

    fn status(&self) -> UnitStatus {
        let running = self.running.lock().expect("not poisoned");
        let alive = running.as_ref().filter(|r| !*r.exited.borrow());
        UnitStatus {
            active: alive.is_some(),
            restarts: self.restarts.load(Ordering::SeqCst),
            main_pid: alive.map(|r| r.pid),
        }
    }

    fn start(self: &Arc<Self>, launch: Launch) -> Result<(), SupervisorError> {
        let mut child = Command::new(&launch.program)
            .args(&launch.args)
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&launch.cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|source| SupervisorError::Spawn {
                program: launch.program.clone(),
                source,
            })?;
        let pid = child.id().unwrap_or(0);
        let _ = std::fs::write(&self.pidfile, pid.to_string());
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward(self.service.clone(), out));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward(self.service.clone(), err));
        }
        let stopping = Arc::new(AtomicBool::new(false));
        let (exited_tx, exited) = watch::channel(false);
        *self.running.lock().expect("not poisoned") = Some(Running {
            pid,
            stopping: stopping.clone(),
            exited,
        });
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = exited_tx.send(true);
            if stopping.load(Ordering::SeqCst) {
                return;
            }
            let n = this.restarts.fetch_add(1, Ordering::SeqCst) + 1;
            let delay = Duration::from_secs(1 << (n - 1).min(5)).min(Duration::from_secs(30));
            tracing::warn!(
                service = %this.service,
                "the service exited unexpectedly ({}); restarting in {}s (restart {n})",
                status.map_or_else(|e| e.to_string(), |s| s.to_string()),
                delay.as_secs()
            );
            tokio::time::sleep(delay).await;
            if stopping.load(Ordering::SeqCst) {
                return;
            }
            if let Err(err) = this.start(launch) {
                tracing::error!(service = %this.service, "restarting the service: {err}");
            }
        });
        Ok(())
    }

    /// SIGTERM to the process group, SIGKILL after the stop timeout.
    async fn stop(&self) {
        let running = self.running.lock().expect("not poisoned").take();
        let Some(running) = running else {
            return;
        };
        running.stopping.store(true, Ordering::SeqCst);
        let mut exited = running.exited.clone();
        if *exited.borrow() {
            return;
        }
        let group = Pid::from_raw(running.pid as i32);
        let _ = killpg(group, Signal::SIGTERM);
        if tokio::time::timeout(self.stop_timeout, exited.wait_for(|done| *done))
            .await
            .is_err()
        {
            let _ = killpg(group, Signal::SIGKILL);
            let _ = exited.wait_for(|done| *done).await;
        }
        let _ = std::fs::remove_file(&self.pidfile);
    }

    /// Stops a process group a previous, killed agent left running.
    async fn reap_orphan(&self) {
        let Some(pid) = std::fs::read_to_string(&self.pidfile)
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
        else {
            return;
        };
        let group = Pid::from_raw(pid);
        // Only a group still led by that pid: killpg fails with ESRCH otherwise.
        if killpg(group, Signal::SIGTERM).is_ok() {
            tracing::warn!(
                service = %self.service,
                "stopping process group {pid} left by a previous agent"
            );
            let deadline = tokio::time::Instant::now() + self.stop_timeout;
            while killpg(group, None).is_ok() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = killpg(group, Signal::SIGKILL);
        }
        let _ = std::fs::remove_file(&self.pidfile);
    }
}

/// Copies a child's output to the agent's log, a line at a time, with the
/// service's name as a field (target `turnout_agent::output`).
async fn forward(service: String, stream: impl tokio::io::AsyncRead + Unpin) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::info!(target: "turnout_agent::output", service = %service, "{line}");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn an_environment_file_reads_like_systemds_and_says_where_it_is_wrong() {
        let parsed = parse_env_file(
            "# per host\nPORT=8081 # this host's\n\nexport REGION = \"eu-1\"\nNAME='web # one'\n",
        )
        .unwrap();
        assert_eq!(
            parsed,
            [
                ("PORT".to_owned(), "8081".to_owned()),
                ("REGION".to_owned(), "eu-1".to_owned()),
                ("NAME".to_owned(), "web # one".to_owned()),
            ]
        );
        assert_eq!(
            parse_env_file("PORT=1\njust words\n").unwrap_err(),
            "line 2: expected KEY=VALUE, found \"just words\""
        );
        assert!(
            parse_env_file("9X=1")
                .unwrap_err()
                .contains("not a variable name")
        );
    }

    #[test]
    fn arguments_expand_variables() {
        let env: BTreeMap<String, String> = [("PORT".to_owned(), "8081".to_owned())].into();
        assert_eq!(expand("--port=${PORT}", &env).unwrap(), "--port=8081");
        assert_eq!(
            expand("${MISSING}x", &env).unwrap_err(),
            "\"${MISSING}x\" uses ${MISSING}, which is not set"
        );
        assert_eq!(expand("${unterminated", &env).unwrap(), "${unterminated");
        assert_eq!(expand("plain", &env).unwrap(), "plain");
        assert_eq!(references("a${B}c${D}"), ["B", "D"]);
    }
}

/// A supervisor that runs nothing, for in-process tests of the install
/// cycle: it records what it was asked to start, and a release whose
/// directory holds a file named [`CRASH_MARKER`](fake::CRASH_MARKER) "crashes"
/// as soon as it starts (not active, one more restart).
#[cfg(any(test, feature = "fault-injection"))]
pub mod fake {
    use super::{BoxFuture, Launch, Supervisor, SupervisorError, UnitStatus};
    use std::sync::Mutex;

    /// The file that makes a release crash under the fake supervisor.
    pub const CRASH_MARKER: &str = "FAKE_CRASH";

    /// What the fake supervisor runs.
    #[derive(Debug, Default)]
    pub struct Fake {
        state: Mutex<State>,
    }

    #[derive(Debug, Default)]
    struct State {
        running: Option<Launch>,
        crashed: bool,
        restarts: u64,
        starts: u64,
    }

    impl Fake {
        /// A fake with nothing running.
        pub fn new() -> Fake {
            Fake::default()
        }

        /// The program it runs now, if any.
        pub fn running(&self) -> Option<std::path::PathBuf> {
            let state = self.state.lock().expect("not poisoned");
            state
                .running
                .as_ref()
                .filter(|_| !state.crashed)
                .map(|l| l.program.clone())
        }

        /// How many times it started something.
        pub fn starts(&self) -> u64 {
            self.state.lock().expect("not poisoned").starts
        }

        fn start(&self, launch: &Launch) {
            let mut state = self.state.lock().expect("not poisoned");
            state.starts += 1;
            // The release's directory: the entry's program lives under it.
            let crashes = launch.cwd.join(CRASH_MARKER).exists();
            if crashes {
                state.restarts += 1;
            }
            state.crashed = crashes;
            state.running = Some(launch.clone());
        }
    }

    impl Supervisor for Fake {
        fn restart<'a>(&'a self, launch: &'a Launch) -> BoxFuture<'a, Result<(), SupervisorError>> {
            Box::pin(async move {
                self.start(launch);
                Ok(())
            })
        }

        fn ensure_running<'a>(
            &'a self,
            launch: &'a Launch,
        ) -> BoxFuture<'a, Result<(), SupervisorError>> {
            Box::pin(async move {
                if self.running().is_none() {
                    self.start(launch);
                }
                Ok(())
            })
        }

        fn stop(&self) -> BoxFuture<'_, Result<(), SupervisorError>> {
            Box::pin(async move {
                let mut state = self.state.lock().expect("not poisoned");
                state.running = None;
                state.crashed = false;
                Ok(())
            })
        }

        fn status(&self) -> BoxFuture<'_, Result<UnitStatus, SupervisorError>> {
            Box::pin(async move {
                let state = self.state.lock().expect("not poisoned");
                Ok(UnitStatus {
                    active: state.running.is_some() && !state.crashed,
                    restarts: state.restarts,
                    main_pid: None,
                })
            })
        }
    }
}
