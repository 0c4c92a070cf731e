//! The install cycle on a host: the pure [`machine`](crate::machine)'s
//! effects performed on real slots, a real supervisor and real health checks.
//!
//! [`Agent::drive`] is the loop: load the state, compute `next`, commit the
//! new state (and any outcome) to the journal, perform the effects, and feed
//! what they produced back in as the next event. It also holds the rules that
//! need host state: the downgrade rule, refusing to roll back onto a release
//! that just failed here, the baseline health noted before a switch, and one
//! operation per service at a time.

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
                detail: None,
            })),
            journal_error: Mutex::new(None),
            clock,
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
        let trust_path = trust.unwrap_or(&self.config.trust).to_owned();
        let trust = read_trust(&trust_path)?;
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

    /// Runs `event` and everything it leads to for service `name`.
    pub async fn drive(&self, name: &str, event: Event) -> Result<(), AgentError> {
        self.drive_with(name, event, None).await
    }

    async fn drive_with(
        &self,
        name: &str,
        event: Event,
        bundle: Option<(&Trust, Digest)>,
    ) -> Result<(), AgentError> {
        let service = self.service(name)?;
        let mut events = VecDeque::from([event]);
        // Kept here, not re-read from the journal: a revert may go ahead
        // unrecorded while the journal cannot be written (see `persist`).
        let mut current = self.state(name)?;
        while let Some(event) = events.pop_front() {
            let (state, effects) =
                machine::next(current.clone(), event).map_err(|source| AgentError::Busy {
                    service: name.to_owned(),
                    source,
                })?;
            let now = self.clock.now_ms();
            let records: Vec<HistoryEntry> = effects
                .iter()
                .filter_map(|effect| match effect {
                    Effect::Record {
                        kind,
                        release,
                        reason,
                    } => Some(HistoryEntry {
                        kind: kind.clone(),
                        release: release.clone(),
                        reason: reason.clone(),
                        at_ms: now,
                    }),
                    _ => None,
                })
                .collect();
            let starting = matches!(current, State::Idle { .. });
            self.persist(name, &state, &records, now, starting).await?;
            for record in &records {
                let release = record
                    .release
                    .as_ref()
                    .map_or("-".to_owned(), |r| format!("{}@{}", r.name, r.version));
                tracing::info!(
                    service = %name,
                    release = %release,
                    outcome = %record.kind.as_str(),
                    "{}",
                    record.reason
                );
            }
            if state.name() != current.name() {
                tracing::debug!(service = %name, "{} -> {}", current.name(), state.name());
            }
            current = state.clone();
            let at_rest = matches!(state, State::Idle { committed: Some(_) });
            service.at_rest.store(at_rest, Ordering::SeqCst);
            turnout_rt::notify::notify(&format!("STATUS={}", self.status_line()));
            for effect in effects {
                events.extend(
                    self.perform(name, service, &state, effect, bundle.as_ref())
                        .await?,
                );
            }
        }
        Ok(())
    }

    /// Journals `state` before its effects run. A failed write (a full
    /// disk, most often) is retried with backoff and reported in `status`
    /// until it lands, so a transient failure never leaves a service
    /// "baking" for good. One exception keeps the bake's deadline whatever
    /// the journal does: a revert goes ahead unrecorded after a few
    /// attempts, since recovery from the state still journaled (switching
    /// or baking) reverts too.
    async fn persist(
        &self,
        name: &str,
        state: &State,
        records: &[HistoryEntry],
        now: u64,
        starting: bool,
    ) -> Result<(), AgentError> {
        let mut attempt = 0u32;
        loop {
            let written = self
                .journal
                .lock()
                .expect("not poisoned")
                .persist(name, state, records, now);
            let err = match written {
                Ok(()) => {
                    if attempt > 0 {
                        tracing::info!(service = %name, "the journal is writable again; recorded {}",
                            state.name()
                        );
                    }
                    self.journal_error.lock().expect("not poisoned").take();
                    return Ok(());
                }
                // From rest nothing has been done yet: fail the operation at
                // once, with the reason, instead of waiting for the disk.
                Err(err) if starting => {
                    *self.journal_error.lock().expect("not poisoned") =
                        Some(format!("the journal cannot be written ({err})"));
                    return Err(err.into());
                }
                Err(err) => err,
            };
            attempt += 1;
            if attempt == 1 || attempt.is_multiple_of(60) {
                tracing::error!(service = %name, "writing the journal failed (attempt {attempt}): {err}; retrying, nothing moves until it is recorded"
                );
            }
            *self.journal_error.lock().expect("not poisoned") = Some(format!(
                "the journal cannot be written ({err}); {name} waits to record {}",
                state.name()
            ));
            // Baking and reverting are entered only from switching or
            // baking, whose recovery after a crash is a revert: going ahead
            // unrecorded changes nothing about what a restart would do, and
            // keeps the bake's deadline and the revert on time.
            if matches!(state, State::Baking { .. } | State::Reverting { .. }) && attempt >= 3 {
                tracing::warn!(service = %name, "going on to {} without recording it: the journal still cannot be written, and recovery from what it holds reverts anyway",
                    state.name()
                );
                return Ok(());
            }
            let wait = std::time::Duration::from_millis(100 << attempt.min(6));
            tokio::time::sleep(wait).await;
        }
    }

    async fn perform(
        &self,
        name: &str,
        service: &Service,
        state: &State,
        effect: Effect,
        bundle: Option<&(&Trust, Digest)>,
    ) -> Result<Vec<Event>, AgentError> {
        match effect {
            Effect::Stage { source } => {
                let (trust, digest) = bundle.expect("an install carries its trust and digest");
                let staged = self
                    .stage(
                        name,
                        service,
                        state,
                        Path::new(&source),
                        trust,
                        digest.clone(),
                    )
                    .await;
                Ok(match staged {
                    Ok(target) => vec![Event::Staged { target }, Event::Switch],
                    Err(failure) => {
                        let (kind, release, reason) = *failure;
                        vec![Event::StageFailed {
                            kind,
                            release,
                            reason,
                        }]
                    }
                })
            }
            Effect::DiscardStaging => {
                service
                    .dir
                    .discard_staging()
                    .map_err(io_error(name, "emptying staging"))?;
                Ok(vec![])
            }
            Effect::Activate { release } => {
                if let State::Switching { previous, .. } = state {
                    // The health of what runs now, to tell "broke it" from
                    // "was broken"; with no previous release, nothing ran.
                    let note = match previous {
                        Some(_) => {
                            health::probe_all(
                                &service.config.checks,
                                &*service.supervisor,
                                &service.http,
                            )
                            .await
                        }
                        None => None,
                    };
                    *service.baseline_note.lock().expect("not poisoned") = note;
                }
                match release {
                    Some(release) => {
                        let slot = service.dir.slot_holding(&release).ok_or_else(|| {
                            AgentError::SlotLost {
                                service: name.to_owned(),
                                version: release.version.to_string(),
                            }
                        })?;
                        service
                            .dir
                            .point(slot)
                            .map_err(io_error(name, "switching current"))?;
                    }
                    None => {
                        service.supervisor.stop().await.map_err(|source| {
                            AgentError::Supervisor {
                                service: name.to_owned(),
                                source,
                            }
                        })?;
                        service
                            .dir
                            .unpoint()
                            .map_err(io_error(name, "removing current"))?;
                    }
                }
                Ok(vec![])
            }
            Effect::Restart => {
                let restarted = match self.launch(service) {
                    Ok(Some(launch)) => service
                        .supervisor
                        .restart(&launch)
                        .await
                        .map_err(|e| e.to_string()),
                    Ok(None) => Ok(()),
                    Err(reason) => Err(reason),
                };
                let restarts = service.supervisor.restarts().await;
                service.baseline_restarts.store(restarts, Ordering::SeqCst);
                Ok(match (state, restarted) {
                    (State::Switching { .. }, Ok(())) => vec![Event::Switched {
                        at_ms: self.clock.now_ms(),
                    }],
                    (State::Switching { .. }, Err(reason)) => vec![Event::Unhealthy { reason }],
                    (_, Err(reason)) => {
                        tracing::error!(service = %name, "restarting after the revert failed: {reason}");
                        vec![Event::Reverted]
                    }
                    (_, Ok(())) => {
                        self.await_restored(name, service).await;
                        vec![Event::Reverted]
                    }
                })
            }
            Effect::EnsureRunning { release } => {
                if let Some(release) = release {
                    repair_current_dir(name, &service.dir, self.clock.now_ms())?;
                    let slot = match service.dir.slot_holding(&release) {
                        Some(slot) => slot,
                        None => self.heal_slot(name, service, &release).await?,
                    };
                    if service.dir.active() != Some(slot) {
                        tracing::warn!(service = %name, "current did not point at the committed {}; repaired",
                            release.version
                        );
                        service
                            .dir
                            .point(slot)
                            .map_err(io_error(name, "repairing current"))?;
                    }
                    let launch = self.launch(service).map_err(|detail| AgentError::Io {
                        service: name.to_owned(),
                        what: "preparing to start the service".into(),
                        source: std::io::Error::other(detail),
                    })?;
                    if let Some(launch) = launch {
                        service
                            .supervisor
                            .ensure_running(&launch)
                            .await
                            .map_err(|source| AgentError::Supervisor {
                                service: name.to_owned(),
                                source,
                            })?;
                    }
                }
                Ok(vec![])
            }
            Effect::Bake => {
                let baseline = service.baseline_restarts.load(Ordering::SeqCst);
                let verdict = health::bake(
                    name,
                    &service.config.checks,
                    service.config.bake,
                    &*service.supervisor,
                    &service.http,
                    baseline,
                )
                .await;
                Ok(vec![match verdict {
                    Ok(reason) => Event::Healthy { reason },
                    Err(reason) => {
                        let note = service.baseline_note.lock().expect("not poisoned").clone();
                        Event::Unhealthy {
                            reason: match note {
                                Some(before) => format!(
                                    "{reason} (the previous release was already unhealthy before the switch: {before})"
                                ),
                                None => reason,
                            },
                        }
                    }
                }])
            }
            Effect::Record { .. } => Ok(vec![]),
        }
    }

    /// After a revert, waits (up to the bake deadline) until the restored
    /// release passes every check, so "reverted" means it serves again.
    async fn await_restored(&self, name: &str, service: &Service) {
        if service.dir.active().is_none() {
            return;
        }
        let deadline = tokio::time::Instant::now() + service.config.bake.deadline;
        loop {
            match health::probe_all(&service.config.checks, &*service.supervisor, &service.http)
                .await
            {
                None => return,
                Some(failing) if tokio::time::Instant::now() >= deadline => {
                    tracing::warn!(service = %name, "the restored release is not healthy either: {failing}");
                    return;
                }
                Some(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
    }

    /// What the exec supervisor runs for the active slot; `None` if nothing is active.
    /// How to start the active release; `Ok(None)` when none is active.
    /// An exec service's environment file is read here, at each start: an
    /// unreadable one is an error, not a start without it.
    fn launch(&self, service: &Service) -> Result<Option<Launch>, String> {
        let Some(held) = service
            .dir
            .active()
            .and_then(|active| service.dir.release_in(active))
        else {
            return Ok(None);
        };
        let release = service.dir.current_path();
        let SupervisorConfig::Exec { argv, host, .. } = &service.config.supervisor else {
            return Ok(Some(Launch {
                program: release.join(held.entry.as_str()),
                args: Vec::new(),
                cwd: release,
                env: Vec::new(),
            }));
        };
        let mut env = BTreeMap::new();
        if let Some(file) = &host.environment_file {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("reading the environment file {}: {e}", file.display()))?;
            env.extend(
                crate::supervisor::parse_env_file(&text)
                    .map_err(|e| format!("the environment file {}: {e}", file.display()))?,
            );
        }
        env.extend(host.env.clone());
        let expand = |arg: &String| {
            crate::supervisor::expand(arg, &env).map_err(|e| {
                format!(
                    "exec argument {e}{}",
                    host.environment_file
                        .as_ref()
                        .map_or(" in env".to_owned(), |f| format!(
                            " in env or {}",
                            f.display()
                        ))
                )
            })
        };
        let (program, args) = match argv.split_first() {
            Some((program, args)) => (
                release.join(expand(program)?),
                args.iter().map(expand).collect::<Result<_, _>>()?,
            ),
            None => (release.join(held.entry.as_str()), Vec::new()),
        };
        let cwd = host
            .working_directory
            .as_ref()
            .map_or_else(|| release.clone(), |dir| release.join(dir));
        Ok(Some(Launch {
            program,
            args,
            cwd,
            env: env.into_iter().collect(),
        }))
    }

    /// Verifies and unpacks into the idle slot; the error is the outcome to record.
    async fn stage(
        &self,
        name: &str,
        service: &Service,
        state: &State,
        bundle: &Path,
        trust: &Trust,
        digest: Digest,
    ) -> Result<ReleaseRef, StageFailure> {
        let committed = state.committed().cloned();
        let dir = service.dir.clone();
        let now = self.clock.now();
        let (trust, limits, bundle, name) = (
            trust.clone(),
            self.limits,
            bundle.to_owned(),
            name.to_owned(),
        );
        tokio::task::spawn_blocking(move || {
            stage_blocking(
                &name,
                &dir,
                &trust,
                &limits,
                &bundle,
                digest,
                committed.as_ref(),
                now,
            )
        })
        .await
        .unwrap_or_else(|err| {
            Err(Box::new((
                OutcomeKind::Failed,
                None,
                format!("staging panicked: {err}"),
            )))
        })
    }

    /// A service the journal knows nothing of (a new or emptied journal)
    /// but whose `current` points at a slot holding a release is taken to
    /// have that release committed: the slots are the truth for what each
    /// holds, and recovery then leaves the running service alone instead of
    /// stopping it and starting over.
    fn adopt_from_slots(&self, name: &str) -> Result<(), AgentError> {
        let service = self.service(name)?;
        let mut journal = self.journal.lock().expect("not poisoned");
        if journal.knows(name)? {
            return Ok(());
        }
        let Some(held) = service
            .dir
            .active()
            .and_then(|slot| service.dir.release_in(slot))
        else {
            return Ok(());
        };
        let reason = format!(
            "rebuilt from the slots on disk: the journal had no record of {name}, and current points at {} {}",
            held.release.name, held.release.version
        );
        tracing::info!(service = %name, "{reason}");
        let now = self.clock.now_ms();
        journal.persist(
            name,
            &State::Idle {
                committed: Some(held.release.clone()),
            },
            &[HistoryEntry {
                kind: OutcomeKind::Committed,
                release: Some(held.release),
                reason,
                at_ms: now,
            }],
            now,
        )?;
        Ok(())
    }

    /// Unpacks the committed `release` again from the bundle cache when its
    /// slot is gone (deleted by hand, a disk replaced): the service comes
    /// back without a coordinator. Refused, with the reason, when the
    /// bundle is no longer cached or no longer verifies.
    async fn heal_slot(
        &self,
        name: &str,
        service: &Service,
        release: &ReleaseRef,
    ) -> Result<crate::slots::Slot, AgentError> {
        let lost = |why: String| AgentError::SlotLost {
            service: name.to_owned(),
            version: format!("{} ({why})", release.version),
        };
        let cached = self
            .config
            .state_dir
            .join("cache")
            .join(format!("{}.tnt", release.sha256));
        if !cached.exists() {
            return Err(lost(format!(
                "its bundle is not in the cache either: install it again with `turnout-agent install BUNDLE --service {name}`"
            )));
        }
        if digest_of_file(&cached).await? != release.sha256 {
            return Err(lost(format!("the cached {} is damaged", cached.display())));
        }
        let trust = read_trust(&self.config.trust)?;
        tracing::warn!(service = %name, "the slot holding the committed {} {} is gone; unpacking it again from {}",
            release.name,
            release.version,
            cached.display()
        );
        let dir = service.dir.clone();
        let (limits, name_owned, digest) = (self.limits, name.to_owned(), release.sha256.clone());
        let now = self.clock.now();
        let staged = tokio::task::spawn_blocking(move || {
            stage_blocking(
                &name_owned,
                &dir,
                &trust,
                &limits,
                &cached,
                digest,
                None,
                now,
            )
        })
        .await
        .map_err(|e| lost(format!("unpacking it again panicked: {e}")))?;
        if let Err(failure) = staged {
            return Err(lost(format!("unpacking it again failed: {}", failure.2)));
        }
        service
            .dir
            .slot_holding(release)
            .ok_or_else(|| lost("unpacked again, but no slot holds it".into()))
    }

    /// Watches the health of service `name` while it is at rest, with the
    /// checks' intervals and thresholds, for `status` and reports. Runs until
    /// the task is dropped; probes pause while an operation runs (the bake
    /// watches health then).
    pub async fn monitor(&self, name: &str) {
        let Ok(service) = self.service(name) else {
            return;
        };
        let checks = &service.config.checks;
        if checks.is_empty() {
            return;
        }
        let rest = crate::config::Bake {
            min_healthy: std::time::Duration::ZERO,
            deadline: std::time::Duration::MAX,
        };
        let mut judge = health::Judge::new(checks, rest);
        let mut since = tokio::time::Instant::now();
        let mut cpu: Vec<health::CpuSample> = vec![None; checks.len()];
        let mut due = vec![tokio::time::Instant::now(); checks.len()];
        loop {
            let now = tokio::time::Instant::now();
            if service.at_rest.load(Ordering::SeqCst) {
                let restarts = service.supervisor.restarts().await;
                for (i, check) in checks.iter().enumerate() {
                    if due[i] <= now {
                        let result = health::probe(
                            check,
                            &*service.supervisor,
                            &service.http,
                            restarts,
                            &mut cpu[i],
                        )
                        .await;
                        judge.observe(i, result, now - since);
                        due[i] = now + check.interval;
                    }
                }
                let judged = match judge.verdict(std::time::Duration::ZERO) {
                    health::Verdict::Healthy(_) => (Health::Healthy, None),
                    health::Verdict::Unhealthy(why) => (Health::Unhealthy, Some(why)),
                    health::Verdict::Pending => {
                        (Health::Pending, Some("checks have not settled yet".into()))
                    }
                };
                self.monitored
                    .lock()
                    .expect("not poisoned")
                    .insert(name.to_owned(), judged);
            } else {
                self.monitored.lock().expect("not poisoned").remove(name);
                judge = health::Judge::new(checks, rest);
                since = now;
                due.iter_mut().for_each(|d| *d = now);
            }
            let wake = due
                .iter()
                .copied()
                .min()
                .unwrap_or(now)
                .max(now + std::time::Duration::from_millis(50));
            tokio::time::sleep_until(wake).await;
        }
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
            out.push(ServiceStatus {
                service: name.clone(),
                state: state.name().to_owned(),
                committed: state.committed().cloned(),
                active_slot: active,
                other: active
                    .and_then(|slot| service.dir.release_in(!slot))
                    .map(|r| r.release),
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

/// A real directory where the `current` link belongs (someone copied a
/// release there by hand) is moved aside, so the link can be made again.
fn repair_current_dir(name: &str, dir: &ServiceDir, now_ms: u64) -> Result<(), AgentError> {
    let current = dir.current_path();
    let is_real_dir = std::fs::symlink_metadata(&current).is_ok_and(|m| m.file_type().is_dir());
    if is_real_dir {
        let aside = current.with_file_name(format!("current.moved-aside-{now_ms}"));
        std::fs::rename(&current, &aside)
            .map_err(io_error(name, "moving a directory named current aside"))?;
        tracing::warn!(service = %name, "{} was a directory, not the link to a slot; moved it to {} and linked current again",
            current.display(),
            aside.display()
        );
    }
    Ok(())
}

/// The sha256 of a bundle's `manifest.json` bytes.
fn manifest_digest(bytes: &[u8]) -> Digest {
    Digest::from_bytes(Sha256::digest(bytes).into())
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

fn digest_of(path: &Path) -> Result<Digest, AgentError> {
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

/// How staging failed: the outcome to record, the release if known, why.
type StageFailure = Box<(OutcomeKind, Option<ReleaseRef>, String)>;

fn stage_blocking(
    name: &str,
    dir: &ServiceDir,
    trust: &Trust,
    limits: &Limits,
    bundle: &Path,
    digest: Digest,
    committed: Option<&ReleaseRef>,
    now: SystemTime,
) -> Result<ReleaseRef, StageFailure> {
    let failed = |what: &str, err: &dyn std::fmt::Display| -> StageFailure {
        Box::new((OutcomeKind::Failed, None, format!("{what}: {err}")))
    };
    // The idle slot is the one not holding the committed release, whatever `current` says.
    let idle = committed
        .and_then(|c| dir.slot_holding(c))
        .map_or_else(|| dir.idle(), |active| !active);
    let other = dir.release_in(idle);
    dir.discard_staging()
        .map_err(|e| failed("emptying staging", &e))?;
    std::fs::create_dir_all(dir.unpack_path().parent().expect("staging has a parent"))
        .map_err(|e| failed("creating staging", &e))?;
    let file =
        File::open(bundle).map_err(|e| failed(&format!("reading {}", bundle.display()), &e))?;
    let reader = BufReader::with_capacity(256 * 1024, file);
    let (verified, sink) = match stage::unpack(reader, trust, now, limits, &dir.unpack_path()) {
        Ok(done) => done,
        Err(StageError::Bundle(err)) if err.is_refusal() => {
            // Named by its digest (what the coordinator asked for); the
            // name and version are the bundle's own claim, read untrusted.
            let claimed = File::open(bundle)
                .ok()
                .and_then(|f| turnout_proto::bundle::read_head(BufReader::new(f), limits).ok());
            let release = ReleaseRef {
                name: claimed
                    .as_ref()
                    .map_or_else(|| name.to_owned(), |h| h.manifest.name.to_string()),
                version: claimed
                    .map_or_else(|| semver::Version::new(0, 0, 0), |h| h.manifest.version),
                sha256: digest,
            };
            return Err(Box::new((
                OutcomeKind::Rejected,
                Some(release),
                format!("bundle rejected: {err}"),
            )));
        }
        Err(err) => return Err(failed("unpacking", &err)),
    };
    let m = &verified.manifest;
    let release = ReleaseRef {
        name: m.name.to_string(),
        version: m.version.clone(),
        sha256: digest,
    };
    let reject = |why: String| {
        let _ = dir.discard_staging();
        Err(Box::new((
            OutcomeKind::Rejected,
            Some(release.clone()),
            why,
        )))
    };
    if m.name.as_str() != name {
        return reject(format!(
            "bundle {} {} is a release of {}, not of {name}",
            m.name, m.version, m.name
        ));
    }
    if let Some(c) = committed {
        let is_rollback = other
            .as_ref()
            .is_some_and(|o| o.release.sha256 == release.sha256);
        if release.version < c.version && !is_rollback {
            return reject(format!(
                "downgrade refused: {} {} is older than the committed {}; only the release kept in the other \
                 slot may be gone back to (`turnout-agent rollback`)",
                m.name, m.version, c.version
            ));
        }
    }
    if m.files.iter().any(|f| f.path.as_str() == RELEASE_FILE)
        || m.links.iter().any(|l| l.path.as_str() == RELEASE_FILE)
    {
        return reject(format!(
            "the payload holds {RELEASE_FILE}, a name the agent reserves for itself"
        ));
    }
    let fail = |what: &str, err: std::io::Error| {
        let _ = dir.discard_staging();
        Err(Box::new((
            OutcomeKind::Failed,
            Some(release.clone()),
            format!("{what}: {err}"),
        )))
    };
    if let Err(err) = sink.sync() {
        return fail("flushing the unpacked release to disk", err);
    }
    let held = SlotRelease {
        format: crate::slots::RELEASE_FILE_FORMAT,
        release: release.clone(),
        entry: m.entry.clone(),
        installed_ms: now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        manifest_sha256: Some(manifest_digest(&verified.manifest_bytes)),
    };
    if let Err(err) = dir.promote(idle, &held) {
        return fail(
            &format!("moving the release into the {} slot", idle.name()),
            err,
        );
    }
    Ok(release)
}
