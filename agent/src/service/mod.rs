//! The agent's services: the operations an operator or the coordinator
//! asks for (install, rollback, status, history) and the rules that need
//! host state: the downgrade rule, refusing to roll back onto a release
//! that just failed here, and one operation per service at a time.
//!
//! The work is split along its seams:
//! - [`effects`]: the interpreter. [`Agent::drive`] loads the state,
//!   computes the pure [`machine`](crate::machine)'s `next`, commits the new
//!   state (and any outcome) to the journal, performs the effects on real
//!   slots, a supervisor and health checks, and feeds what they produced
//!   back in as the next event.
//! - [`monitor`]: health at rest, judged with the checks' thresholds.
//!
//! Every change of a service's state or judged health is published on a
//! `watch` channel ([`Agent::changes`]), which the coordinator link waits on.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use turnout_rt::Clock;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use turnout_proto::messages::{Health, OutcomeKind, ReleaseRef};
use turnout_proto::trust::{Trust, TrustFile};
use turnout_proto::{Digest, Limits};

use crate::config::{Config, ServiceConfig, SupervisorConfig};
use crate::health;
use crate::journal::{HistoryEntry, Journal, JournalError};
use crate::machine::{self, Disallowed, Effect, Event, State};
use crate::slots::{RELEASE_FILE, ServiceDir, Slot, SlotRelease};
use crate::stage::{self, StageError};
use crate::supervisor::{Exec, ExecSupervisor, Launch, Supervisor, SupervisorError, Systemd};

mod effects;
mod monitor;

/// Milliseconds since the epoch, by the system clock (for callers with no
/// [`Clock`] of their own).
pub fn now_ms() -> u64 {
    turnout_rt::clock::system_now_ms()
}

/// Makes the supervisor of one configured service.
pub type SupervisorFactory =
    dyn Fn(&ServiceConfig, &ServiceDir) -> Arc<dyn Supervisor> + Send + Sync;

/// The supervisors the config names: systemd units, or exec children of
/// this agent.
pub fn real_supervisor(service: &ServiceConfig, dir: &ServiceDir) -> Arc<dyn Supervisor> {
    match &service.supervisor {
        SupervisorConfig::Systemd { unit } => Arc::new(Systemd { unit: unit.clone() }),
        SupervisorConfig::Exec { stop_timeout, .. } => Arc::new(ExecSupervisor(Exec::new(
            service.name.as_str(),
            dir.root(),
            *stop_timeout,
        ))),
    }
}

/// Why an operation could not run (as opposed to running and failing, which
/// is an [`OperationResult`] with a `reverted` or `rejected` outcome).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No such service in the config.
    #[error("no service {name:?} is configured (configured: {known})")]
    UnknownService {
        /// The name asked for.
        name: String,
        /// The configured names.
        known: String,
    },
    /// Another operation on the service is running.
    #[error("service {service}: {source}")]
    Busy {
        /// The service.
        service: String,
        /// What the state machine said.
        #[source]
        source: Disallowed,
    },
    /// The journal failed.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The trust file could not be read.
    #[error("cannot use the trust file {path}: {detail}")]
    Trust {
        /// The trust file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// The bundle file could not be read.
    #[error("cannot read the bundle {path}: {source}")]
    Bundle {
        /// The bundle.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A rollback with nothing to roll back to.
    #[error("service {service}: cannot roll back: {why}")]
    NoRollback {
        /// The service.
        service: String,
        /// Why, and what to do instead.
        why: String,
    },
    /// The slots on disk do not hold what the journal says.
    #[error("service {service}: {what}: {source}")]
    Io {
        /// The service.
        service: String,
        /// What was being done.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The committed release is in neither slot.
    #[error(
        "service {service}: the committed release {version} is in neither slot; the state directory \
         was changed behind the agent's back. Install a release to recover"
    )]
    SlotLost {
        /// The service.
        service: String,
        /// The committed version.
        version: String,
    },
    /// The supervisor failed outside a switch.
    #[error("service {service}: {source}")]
    Supervisor {
        /// The service.
        service: String,
        /// Its error.
        #[source]
        source: SupervisorError,
    },
    /// An exec-supervised service needs the daemon to be its parent.
    #[error(
        "service {service} is supervised by exec, so it runs as a child of `turnout-agent run`; \
         start the daemon first, and this command will talk to it"
    )]
    NeedsDaemon {
        /// The service.
        service: String,
    },
    /// The daemon's control socket failed.
    #[error("talking to the agent daemon at {socket}: {detail}")]
    Control {
        /// The socket.
        socket: PathBuf,
        /// Why.
        detail: String,
    },
}

/// How an install or rollback ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OperationResult {
    /// The service.
    pub service: String,
    /// The outcome recorded (none when nothing needed doing).
    pub outcome: Option<HistoryEntry>,
    /// A line for people.
    pub summary: String,
}

impl OperationResult {
    /// The outcome kind, `committed` when nothing needed doing.
    pub fn kind(&self) -> OutcomeKind {
        self.outcome
            .as_ref()
            .map_or(OutcomeKind::Committed, |o| o.kind.clone())
    }
}

/// One service's status, for `status` and reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// The service.
    pub service: String,
    /// Its install-cycle state.
    pub state: String,
    /// The committed release.
    pub committed: Option<ReleaseRef>,
    /// The slot `current` points at.
    pub active_slot: Option<Slot>,
    /// The release kept in the other slot.
    pub other: Option<ReleaseRef>,
    /// When that release expires (its signed manifest), if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other_expires: Option<turnout_proto::manifest::Timestamp>,
    /// The release in flight.
    pub target: Option<ReleaseRef>,
    /// Health, probed now (or `pending` while an operation runs).
    pub health: Health,
    /// Why it is not healthy.
    pub health_detail: Option<String>,
    /// Whether the supervisor has it running.
    pub running: bool,
    /// The last outcome.
    pub last_outcome: Option<HistoryEntry>,
    /// Why the journal cannot be written, while it cannot: nothing moves
    /// until it can (but a revert, which goes ahead unrecorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal_error: Option<String>,
}

struct Service {
    config: ServiceConfig,
    dir: ServiceDir,
    supervisor: Arc<dyn Supervisor>,
    /// The HTTP client of its checks (a pool: probes keep a connection alive).
    http: health::HttpClient,
    /// The supervisor's restart count right after the last switch.
    baseline_restarts: AtomicU64,
    /// Health of the previous release, probed just before a switch.
    baseline_note: Mutex<Option<String>>,
    /// Idle with a committed release: what the health monitor watches.
    /// Kept in memory beside the journal so the monitor need not query it.
    at_rest: AtomicBool,
}

/// The agent: its config, journal and services.
pub struct Agent {
    config: Config,
    journal: Mutex<Journal>,
    services: BTreeMap<String, Service>,
    limits: Limits,
    /// Health as the daemon's monitors last judged it, by service.
    monitored: Mutex<BTreeMap<String, (Health, Option<String>)>>,
    /// Whether monitors run (in the daemon); then they alone judge health.
    monitoring: std::sync::atomic::AtomicBool,
    /// The coordinator link's state, for `status`.
    link: Arc<Mutex<crate::link::LinkStatus>>,
    /// Why the journal cannot be written right now, while it cannot.
    journal_error: Mutex<Option<String>>,
    /// The time of day: journal stamps, bundle expiry.
    clock: Arc<dyn Clock>,
    /// Bumped at every change of a service's state or judged health.
    changes: tokio::sync::watch::Sender<u64>,
    /// Which agent this is (set once the daemon identified itself).
    myself: std::sync::OnceLock<crate::upgrade::AgentRelease>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Agent({} services)", self.services.len())
    }
}

fn io_error(service: &str, what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
    let (service, what) = (service.to_owned(), what.into());
    move |source| AgentError::Io {
        service,
        what,
        source,
    }
}

impl Agent {
    /// Opens the journal and the service directories under the config's
    /// state dir, with the system clock and the supervisors the config names.
    pub fn open(config: Config) -> Result<Agent, AgentError> {
        Agent::open_with(config, turnout_rt::SystemClock::shared(), &real_supervisor)
    }

    /// Like [`open`](Self::open), with the clock and the supervisors given
    /// (tests: a manual clock and a fake supervisor).
    pub fn open_with(
        config: Config,
        clock: Arc<dyn Clock>,
        supervisors: &SupervisorFactory,
    ) -> Result<Agent, AgentError> {
        std::fs::create_dir_all(&config.state_dir).map_err(io_error(
            "-",
            format!("creating {}", config.state_dir.display()),
        ))?;
        let journal = Journal::open(&config.state_dir.join("agent.db"))?;
        let mut services = BTreeMap::new();
        for service in &config.services {
            let name = service.name.to_string();
            let dir = ServiceDir::open(&config.state_dir, &name)
                .map_err(io_error(&name, "creating its directory"))?;
            let supervisor = supervisors(service, &dir);
            services.insert(
                name,
                Service {
                    config: service.clone(),
                    dir,
                    supervisor,
                    http: health::HttpClient::new(),
                    baseline_restarts: AtomicU64::new(0),
                    baseline_note: Mutex::new(None),
                    at_rest: AtomicBool::new(matches!(
                        journal.state(service.name.as_str())?,
                        State::Idle { committed: Some(_) }
                    )),
                },
            );
        }
        Ok(Agent {
            config,
            journal: Mutex::new(journal),
            services,
            limits: Limits::default(),
            monitored: Mutex::new(BTreeMap::new()),
            monitoring: std::sync::atomic::AtomicBool::new(false),
            link: Arc::new(Mutex::new(crate::link::LinkStatus {
                coordinator: None,
                state: "standalone".into(),
                ..Default::default()
            })),
            journal_error: Mutex::new(None),
            clock,
            changes: tokio::sync::watch::channel(0).0,
            myself: std::sync::OnceLock::new(),
        })
    }

    /// Which agent runs, once identified ([`crate::upgrade::switch::identify`]).
    pub fn myself(&self) -> Option<&crate::upgrade::AgentRelease> {
        self.myself.get()
    }

    /// Records which agent runs (once).
    pub fn set_myself(&self, me: crate::upgrade::AgentRelease) {
        let _ = self.myself.set(me);
    }

    /// Records an outcome of the agent's own releases (service
    /// [`SELF_SERVICE`](crate::upgrade::SELF_SERVICE)) in the journal.
    pub fn record_self(
        &self,
        kind: OutcomeKind,
        release: ReleaseRef,
        reason: String,
    ) -> Result<(), AgentError> {
        let now = self.clock.now_ms();
        let state = State::Idle {
            committed: self.myself().map(|m| m.release.clone()),
        };
        let record = HistoryEntry {
            kind,
            release: Some(release),
            reason,
            at_ms: now,
        };
        self.journal.lock().expect("not poisoned").persist(
            crate::upgrade::SELF_SERVICE,
            &state,
            &[record],
            now,
        )?;
        self.changed();
        Ok(())
    }

    /// Keeps a copy of the journal at `path` (replacing one there).
    pub fn snapshot_journal(&self, path: &Path) -> Result<(), AgentError> {
        let _ = std::fs::remove_file(path);
        Ok(self
            .journal
            .lock()
            .expect("not poisoned")
            .snapshot_to(path)?)
    }

    /// The newest `limit` outcomes of the agent's own releases, newest first.
    pub fn self_history(&self, limit: usize) -> Result<Vec<HistoryEntry>, AgentError> {
        Ok(self
            .journal
            .lock()
            .expect("not poisoned")
            .history(crate::upgrade::SELF_SERVICE, limit)?)
    }

    /// Whether no managed service has an install or revert in flight.
    pub fn all_idle(&self) -> bool {
        self.services.keys().all(|name| {
            self.state(name)
                .is_ok_and(|s| matches!(s, State::Idle { .. }))
        })
    }

    /// One line for `systemctl status`: each service's release and state,
    /// e.g. `web 1.4.2 committed; idle`.
    pub fn status_line(&self) -> String {
        let parts: Vec<String> = self
            .services
            .keys()
            .map(|name| match self.state(name) {
                Ok(State::Idle { committed: Some(c) }) => {
                    format!("{name} {} committed; idle", c.version)
                }
                Ok(State::Idle { committed: None }) => format!("{name}: nothing installed"),
                Ok(state) => format!(
                    "{name} {} committed; {} {}",
                    state
                        .committed()
                        .map_or("-".to_owned(), |c| c.version.to_string()),
                    state.name(),
                    state
                        .target()
                        .map_or(String::new(), |t| t.version.to_string())
                ),
                Err(err) => format!("{name}: {err}"),
            })
            .collect();
        if parts.is_empty() {
            "no services configured".into()
        } else {
            parts.join(" | ")
        }
    }

    /// The coordinator link's state, shared with the link task.
    pub fn link(&self) -> Arc<Mutex<crate::link::LinkStatus>> {
        Arc::clone(&self.link)
    }

    /// The config the agent runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    fn service(&self, name: &str) -> Result<&Service, AgentError> {
        self.services
            .get(name)
            .ok_or_else(|| AgentError::UnknownService {
                name: name.to_owned(),
                known: self.services.keys().cloned().collect::<Vec<_>>().join(", "),
            })
    }

    /// Whether `name` (or any service, for `None`) is run by the exec supervisor.
    pub fn uses_exec(&self, name: Option<&str>) -> Option<String> {
        self.services
            .iter()
            .filter(|(n, _)| name.is_none_or(|want| want == n.as_str()))
            .find(|(_, s)| matches!(s.config.supervisor, SupervisorConfig::Exec { .. }))
            .map(|(n, _)| n.clone())
    }

    fn state(&self, name: &str) -> Result<State, AgentError> {
        Ok(self.journal.lock().expect("not poisoned").state(name)?)
    }

    /// The name of the state one service is in (`idle`, `baking`, ...), from
    /// the journal alone: cheap enough to poll, unlike [`status`](Self::status).
    pub fn state_name(&self, name: &str) -> Result<&'static str, AgentError> {
        Ok(self.state(name)?.name())
    }

    /// Resolves whatever every service had in flight when the agent stopped.
    pub async fn recover_all(&self) -> Vec<(String, Result<(), AgentError>)> {
        let mut results = Vec::new();
        for name in self.services.keys() {
            if let Err(err) = self.adopt_from_slots(name) {
                results.push((name.clone(), Err(err)));
                continue;
            }
            results.push((name.clone(), self.drive(name, Event::Recover).await));
        }
        results
    }

    /// Installs the bundle at `bundle` on service `name`, verified against `trust`.
    #[tracing::instrument(name = "install", skip_all, fields(service = %name, bundle = %bundle.display()))]
    pub async fn install(
        &self,
        name: &str,
        bundle: &Path,
        trust: Option<&Path>,
    ) -> Result<OperationResult, AgentError> {
        let service = self.service(name)?;
        let state = self.state(name)?;
        if !matches!(state, State::Idle { .. }) {
            // Refuse before reading anything: another operation owns the slots.
            machine::next(
                state.clone(),
                Event::Install {
                    source: bundle.display().to_string(),
                },
            )
            .map_err(|source| AgentError::Busy {
                service: name.to_owned(),
                source,
            })?;
        }
        // A unit that does not exist would fail the switch; refuse before touching anything.
        service
            .supervisor
            .status()
            .await
            .map_err(|source| AgentError::Supervisor {
                service: name.to_owned(),
                source,
            })?;
        let digest = digest_of_file(bundle).await?;
        // Committed and still on disk: nothing to do. (Committed but its slot
        // gone, it is installed again: that is how an operator repairs it.)
        if let Some(committed) = state
            .committed()
            .filter(|c| c.sha256 == digest && service.dir.slot_holding(c).is_some())
        {
            return Ok(OperationResult {
                service: name.to_owned(),
                outcome: None,
                summary: format!(
                    "{name}: {} {} is already the committed release; nothing to do",
                    committed.name, committed.version
                ),
            });
        }
        let trust = match trust {
            Some(path) => read_trust(path)?,
            None => current_trust(&self.config)?.trust,
        };
        if let Some(result) = self
            .same_release_renamed(name, service, &state, bundle, &trust, &digest)
            .await?
        {
            return Ok(result);
        }
        let before = self.history_len(name)?;
        self.drive_with(
            name,
            Event::Install {
                source: bundle.display().to_string(),
            },
            Some((&trust, digest)),
        )
        .await?;
        let _ = service;
        self.result(name, before)
    }

    /// A bundle whose signed manifest is the one the committed release was
    /// installed from is the same release in another file (signatures
    /// added or reordered, headers rewritten): it is verified, then only
    /// recorded under its new digest. Nothing is unpacked or restarted, so
    /// a coordinator alternating copies of one release cannot make a host
    /// reinstall it again and again.
    async fn same_release_renamed(
        &self,
        name: &str,
        service: &Service,
        state: &State,
        bundle: &Path,
        trust: &Trust,
        digest: &Digest,
    ) -> Result<Option<OperationResult>, AgentError> {
        let State::Idle {
            committed: Some(committed),
        } = state
        else {
            return Ok(None);
        };
        let Some(slot) = service.dir.slot_holding(committed) else {
            return Ok(None);
        };
        let Some(held) = service.dir.release_in(slot) else {
            return Ok(None);
        };
        let Some(known) = held.manifest_sha256.clone() else {
            return Ok(None);
        };
        let (path, trust, limits, now) = (
            bundle.to_owned(),
            trust.clone(),
            self.limits,
            self.clock.now(),
        );
        let verified = tokio::task::spawn_blocking(move || {
            let file = File::open(&path).ok()?;
            turnout_proto::bundle::verify_and_unpack(
                BufReader::new(file),
                &trust,
                now,
                &limits,
                &mut turnout_proto::bundle::Discard,
            )
            .ok()
        })
        .await
        .ok()
        .flatten();
        // Anything that does not verify goes the normal way, and is
        // refused there with its reason.
        let Some(verified) = verified else {
            return Ok(None);
        };
        if manifest_digest(&verified.manifest_bytes) != known {
            return Ok(None);
        }
        let renamed = ReleaseRef {
            sha256: digest.clone(),
            ..committed.clone()
        };
        service
            .dir
            .rewrite_release(
                slot,
                &SlotRelease {
                    format: crate::slots::RELEASE_FILE_FORMAT,
                    release: renamed.clone(),
                    ..held
                },
            )
            .map_err(io_error(name, "recording the release's new bundle digest"))?;
        let reason = format!(
            "already running {} {} from the same signed manifest; now known by bundle {digest} (was {})",
            renamed.name, renamed.version, committed.sha256
        );
        let now = self.clock.now_ms();
        let record = HistoryEntry {
            kind: OutcomeKind::Committed,
            release: Some(renamed.clone()),
            reason: reason.clone(),
            at_ms: now,
        };
        self.persist(
            name,
            &State::Idle {
                committed: Some(renamed),
            },
            std::slice::from_ref(&record),
            now,
            true,
        )
        .await?;
        tracing::info!(service = %name, "{reason}");
        Ok(Some(OperationResult {
            service: name.to_owned(),
            outcome: Some(record),
            summary: format!("{name}: {reason}"),
        }))
    }

    /// Switches service `name` back to the release in its other slot, with a bake.
    #[tracing::instrument(name = "rollback", skip_all, fields(service = %name))]
    pub async fn rollback(&self, name: &str) -> Result<OperationResult, AgentError> {
        let service = self.service(name)?;
        let state = self.state(name)?;
        let no = |why: String| AgentError::NoRollback {
            service: name.to_owned(),
            why,
        };
        let committed = match &state {
            State::Idle { committed: Some(c) } => c.clone(),
            State::Idle { committed: None } => {
                return Err(no(
                    "nothing is committed yet; install a release first".into()
                ));
            }
            other => {
                return Err(AgentError::Busy {
                    service: name.to_owned(),
                    source: machine::next(
                        other.clone(),
                        Event::Rollback {
                            target: committed_or_dummy(other),
                        },
                    )
                    .unwrap_err(),
                });
            }
        };
        let active = service.dir.slot_holding(&committed);
        let other = active
            .and_then(|slot| service.dir.release_in(!slot))
            .ok_or_else(|| {
                no(format!(
                    "the other slot holds no release; only {} {} is on this host",
                    committed.name, committed.version
                ))
            })?;
        let history = self
            .journal
            .lock()
            .expect("not poisoned")
            .history(name, 100)?;
        if let Some(failed) = history
            .iter()
            .find(|h| {
                h.release
                    .as_ref()
                    .is_some_and(|r| r.sha256 == other.release.sha256)
            })
            .filter(|h| matches!(h.kind, OutcomeKind::Reverted | OutcomeKind::Interrupted))
        {
            return Err(no(format!(
                "the other slot holds {} {}, which failed on this host ({} at {}: {}); rolling back to it would \
                 fail again. Install a release instead",
                other.release.name,
                other.release.version,
                failed.kind,
                humantime::format_rfc3339_seconds(
                    UNIX_EPOCH + std::time::Duration::from_millis(failed.at_ms)
                ),
                failed.reason
            )));
        }
        let before = self.history_len(name)?;
        self.drive(
            name,
            Event::Rollback {
                target: other.release,
            },
        )
        .await?;
        self.result(name, before)
    }

    /// Records an outcome that never reached the install cycle (a download
    /// that failed its digest), so status and reports carry it.
    pub fn record_outcome(
        &self,
        name: &str,
        kind: OutcomeKind,
        release: ReleaseRef,
        reason: String,
    ) -> Result<(), AgentError> {
        if name == crate::upgrade::SELF_SERVICE {
            return self.record_self(kind, release, reason);
        }
        self.service(name)?;
        let state = self.state(name)?;
        let now = self.clock.now_ms();
        let record = HistoryEntry {
            kind,
            release: Some(release),
            reason,
            at_ms: now,
        };
        self.journal
            .lock()
            .expect("not poisoned")
            .persist(name, &state, &[record], now)?;
        Ok(())
    }

    /// The newest `limit` outcomes of service `name`, newest first.
    pub fn history(&self, name: &str, limit: usize) -> Result<Vec<HistoryEntry>, AgentError> {
        self.service(name)?;
        Ok(self
            .journal
            .lock()
            .expect("not poisoned")
            .history(name, limit)?)
    }

    fn history_len(&self, name: &str) -> Result<Option<HistoryEntry>, AgentError> {
        Ok(self
            .journal
            .lock()
            .expect("not poisoned")
            .history(name, 1)?
            .into_iter()
            .next())
    }

    fn result(
        &self,
        name: &str,
        before: Option<HistoryEntry>,
    ) -> Result<OperationResult, AgentError> {
        let latest = self.history_len(name)?;
        let outcome = latest.filter(|l| Some(l) != before.as_ref());
        let summary = match &outcome {
            Some(o) => format!(
                "{name}: {} {}: {}",
                o.kind,
                o.release
                    .as_ref()
                    .map_or("(unknown release)".into(), |r| format!(
                        "{} {}",
                        r.name, r.version
                    )),
                o.reason
            ),
            None => format!("{name}: nothing changed"),
        };
        Ok(OperationResult {
            service: name.to_owned(),
            outcome,
            summary,
        })
    }

    /// A receiver that sees every change of a service's state (each step
    /// journaled) or judged health at rest: what the coordinator link waits
    /// on to report progress, instead of polling the journal.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The names of the configured services.
    pub fn service_names(&self) -> Vec<String> {
        self.services.keys().cloned().collect()
    }

    /// Every service's status. Health comes from the daemon's monitor when it
    /// runs, or is probed once now (a local command with no daemon).
    pub async fn status(&self) -> Result<Vec<ServiceStatus>, AgentError> {
        let mut out = Vec::new();
        for (name, service) in &self.services {
            let state = self.state(name)?;
            let active = service.dir.active();
            let running = service
                .supervisor
                .status()
                .await
                .map(|s| s.active)
                .unwrap_or(false);
            let (health, health_detail) = match (&state, running) {
                (State::Idle { committed: None }, _) => {
                    (Health::Unchecked, Some("nothing installed".into()))
                }
                (State::Idle { .. }, false) => {
                    (Health::Unhealthy, Some("the service is not running".into()))
                }
                (State::Idle { .. }, true) if service.config.checks.is_empty() => {
                    (Health::Unchecked, None)
                }
                (State::Idle { .. }, true) => {
                    let monitored = self
                        .monitored
                        .lock()
                        .expect("not poisoned")
                        .get(name)
                        .cloned();
                    match monitored {
                        Some(judged) => judged,
                        None if self.monitoring.load(Ordering::SeqCst) => {
                            (Health::Pending, Some("checks have not settled yet".into()))
                        }
                        None => {
                            match health::probe_all(
                                &service.config.checks,
                                &*service.supervisor,
                                &service.http,
                            )
                            .await
                            {
                                None => (Health::Healthy, None),
                                Some(detail) => (Health::Unhealthy, Some(detail)),
                            }
                        }
                    }
                }
                // Why it reverts travels with the reverting report, so the
                // coordinator can say why before the revert is done.
                (State::Reverting { reason, .. }, _) => (Health::Unhealthy, Some(reason.clone())),
                _ => (
                    Health::Pending,
                    Some(format!("{} in progress", state.name())),
                ),
            };
            let last_outcome = self
                .journal
                .lock()
                .expect("not poisoned")
                .history(name, 1)?
                .into_iter()
                .next();
            let other = active.and_then(|slot| service.dir.release_in(!slot));
            out.push(ServiceStatus {
                service: name.clone(),
                state: state.name().to_owned(),
                committed: state.committed().cloned(),
                active_slot: active,
                other: other.as_ref().map(|r| r.release.clone()),
                other_expires: other.and_then(|r| r.expires),
                target: state.target().cloned(),
                health,
                health_detail,
                running,
                last_outcome,
                journal_error: self.journal_error.lock().expect("not poisoned").clone(),
            });
        }
        Ok(out)
    }

    /// Stops every exec-supervised service (the daemon is their parent).
    pub async fn stop_exec_services(&self) {
        for service in self.services.values() {
            if let SupervisorConfig::Exec { .. } = service.config.supervisor {
                let _ = service.supervisor.stop().await;
            }
        }
    }
}

/// The dummy release only names the event in a refusal message.
fn committed_or_dummy(state: &State) -> ReleaseRef {
    state
        .target()
        .or(state.committed())
        .cloned()
        .expect("a busy state names a release")
}

/// The sha256 of a bundle's `manifest.json` bytes.
fn manifest_digest(bytes: &[u8]) -> Digest {
    Digest::from_bytes(Sha256::digest(bytes).into())
}

/// The release trust this host applies ([`crate::trust_chain`]).
pub fn current_trust(config: &crate::config::Config) -> Result<TrustFile, AgentError> {
    crate::trust_chain::current(config)
}

fn read_trust(path: &Path) -> Result<Trust, AgentError> {
    let bytes = std::fs::read(path).map_err(|err| AgentError::Trust {
        path: path.to_owned(),
        detail: err.to_string(),
    })?;
    TrustFile::parse(&bytes, &Limits::default())
        .map(|file| file.trust)
        .map_err(|err| AgentError::Trust {
            path: path.to_owned(),
            detail: err.to_string(),
        })
}

/// The sha256 of the file at `path`, hashed on a blocking thread: a bundle
/// may be gigabytes, and the runtime's threads serve the health checks.
pub(crate) async fn digest_of_file(path: &Path) -> Result<Digest, AgentError> {
    let owned = path.to_owned();
    tokio::task::spawn_blocking(move || digest_of(&owned))
        .await
        .unwrap_or_else(|err| {
            Err(AgentError::Bundle {
                path: path.to_owned(),
                source: std::io::Error::other(format!("hashing panicked: {err}")),
            })
        })
}

pub(crate) fn digest_of(path: &Path) -> Result<Digest, AgentError> {
    let read = |source| AgentError::Bundle {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 256 * 1024];
    loop {
        let n = file.read(&mut buffer).map_err(read)?;
        if n == 0 {
            return Ok(Digest::from_bytes(hasher.finalize().into()));
        }
        hasher.update(&buffer[..n]);
    }
}
