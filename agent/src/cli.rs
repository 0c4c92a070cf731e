//! The `turnout-agent` command line: argument types and one function per subcommand.
//!
//! `status`, `install` and `rollback` ask a running daemon over its control
//! socket; with no daemon they take the state directory's lock and act
//! directly (systemd-supervised services only: exec-supervised services are
//! children of the daemon).

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use turnout_proto::Limits;
use turnout_proto::bundle::{BundleError, Discard, Verified, verify_and_unpack};
use turnout_proto::trust::{Trust, TrustFile};

use crate::config::{Config, DEFAULT_PATH};
use crate::control::{self, Request, Response, SOCKET};
use crate::exit::{Exit, for_outcome};
use crate::service::{Agent, AgentError, OperationResult, ServiceStatus};
use crate::{daemon, stage};

/// Turnout's host agent.
#[derive(Debug, Parser)]
#[command(name = "turnout-agent", version, about, after_help = crate::exit::HELP)]
pub struct Cli {
    /// The agent's config file.
    #[arg(long, global = true, env = "TURNOUT_AGENT_CONFIG", default_value = DEFAULT_PATH)]
    pub config: PathBuf,
    /// How the daemon writes its log lines to stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "TURNOUT_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: turnout_rt::log::LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The agent's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: recover, then manage the services and answer local commands.
    Run,
    /// Check the config and its trust file as `run` would read them,
    /// changing nothing: every problem with its key, exit 3 if any.
    Check,
    /// Show each service: state, committed release, slots, health, last outcome.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Install a bundle: verify, stage, switch, bake, then commit or revert.
    Install {
        /// The bundle.
        bundle: PathBuf,
        /// The service to install it on.
        #[arg(long)]
        service: String,
        /// Verify against this trust file instead of the configured one.
        #[arg(long)]
        trust: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Switch a service back to the release in its other slot, with a bake.
    Rollback {
        /// The service.
        #[arg(long)]
        service: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Verify a bundle as an install would, touching no slot.
    Verify {
        /// The bundle.
        bundle: PathBuf,
        /// The trust file (default: the configured one).
        #[arg(long)]
        trust: Option<PathBuf>,
        /// Also unpack the verified payload into this new directory (removed
        /// again if the bundle is refused).
        #[arg(long, value_name = "DIR")]
        unpack_to: Option<PathBuf>,
    },
    /// Enroll this host with a coordinator: make its key, register it.
    Enroll {
        /// The coordinator's URL.
        #[arg(long)]
        coordinator: String,
        /// An enrollment token (`turnout token create --enroll`).
        #[arg(long, env = "TURNOUT_ENROLL_TOKEN")]
        token: String,
        /// The host's id (default: its hostname).
        #[arg(long)]
        host: Option<String>,
        /// The coordinator's CA pin (sha256:…, on the join line); repeatable.
        #[arg(long = "ca-pin", value_delimiter = ',')]
        ca_pins: Vec<String>,
        /// Or the coordinator's CA certificates (PEM), instead of a pin.
        #[arg(long, conflicts_with = "ca_pins")]
        ca: Option<PathBuf>,
    },
    /// Install this agent as a systemd service: binary, unit, tmpfiles entry,
    /// an example config (kept if one exists), then `systemctl daemon-reload`.
    InstallUnit {
        /// Install under this root instead of `/` (for images; skips systemctl).
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// The agent's own releases: what runs, what ran, the switch in
    /// flight, failed versions (see docs/operations.md).
    #[command(subcommand)]
    Upgrade(UpgradeCommand),
    /// Show this build's version, protocol versions and capabilities.
    Version {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The demo service that tests pack into bundles (test builds only).
    #[cfg(feature = "fault-injection")]
    #[command(hide = true)]
    DemoService {
        /// Its behaviour file.
        #[arg(long)]
        behaviour: PathBuf,
        /// The port to listen on (127.0.0.1).
        #[arg(long)]
        port: u16,
    },
}

/// `turnout-agent upgrade …`.
#[derive(Debug, Subcommand)]
pub enum UpgradeCommand {
    /// Show the agent that runs, the one before it, a switch in flight and
    /// the agent versions that failed here.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Allow an agent version that failed here to be tried again (the
    /// coordinator's next desired state retries it).
    Retry {
        /// The version, e.g. 0.3.0.
        version: String,
    },
    /// Run by the dead-man timer: put the previous agent back unless the
    /// switch armed at `--armed` confirmed.
    #[command(hide = true)]
    Revert {
        /// The switch's id (when it was armed, ms since the epoch).
        #[arg(long)]
        armed: u64,
    },
}

/// The state directory a config names, read leniently: the launcher must
/// find `current` even when this (older) binary cannot read all of a
/// config that a newer agent understands.
fn state_dir_of(path: &Path) -> PathBuf {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|t| t.get("state_dir")?.as_str().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/var/lib/turnout"))
}

fn upgrade(command: UpgradeCommand, config: &Path) -> anyhow::Result<Exit> {
    let state_dir = state_dir_of(config);
    let layout = crate::upgrade::Layout::new(&state_dir);
    match command {
        UpgradeCommand::Revert { armed } => {
            match crate::upgrade::switch::revert(&state_dir, armed) {
                Ok(said) => {
                    println!("{said}");
                    Ok(Exit::Success)
                }
                Err(err) => anyhow::bail!("the dead-man switch could not revert: {err}"),
            }
        }
        UpgradeCommand::Status { json } => {
            // Read, never made: a host with no journal has no history yet.
            let history = if state_dir.join("agent.db").exists() {
                crate::journal::Journal::open(&state_dir.join("agent.db"))?
                    .history(crate::upgrade::SELF_SERVICE, 10)?
            } else {
                Vec::new()
            };
            let current = layout.current();
            let status = serde_json::json!({
                "current": layout.agent_release(current.as_deref()),
                "current_dir": current,
                "previous": layout.previous(),
                "installed": layout.installed(),
                "handoff": layout.handoff().ok().flatten(),
                "handoff_error": layout.handoff().err().map(|e| e.to_string()),
                "history": history.iter().map(|h| serde_json::json!({
                    "kind": h.kind.as_str(), "release": h.release, "reason": h.reason, "at_ms": h.at_ms,
                })).collect::<Vec<_>>(),
            });
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
                return Ok(Exit::Success);
            }
            let name = |dir: Option<&str>| match layout.agent_release(dir) {
                Some(a) => format!(
                    "{} ({})",
                    a.release.version,
                    dir.unwrap_or("the installed binary")
                ),
                None => dir.map_or("the installed binary".into(), |d| {
                    format!("{d} (unreadable)")
                }),
            };
            println!("current:  {}", name(current.as_deref()));
            println!("previous: {}", name(layout.previous().as_deref()));
            match layout.handoff() {
                Ok(Some(h)) => println!(
                    "switch:   {} -> {}: {:?}, deadline {}",
                    h.from.release.version,
                    h.to.release.version,
                    h.phase,
                    turnout_proto::desired::utc(h.deadline_ms)
                ),
                Ok(None) => println!("switch:   none in flight"),
                Err(err) => println!("switch:   the record does not read: {err}"),
            }
            for h in &history {
                println!(
                    "{}  {:<11} {}  {}",
                    turnout_proto::desired::utc(h.at_ms),
                    h.kind.as_str(),
                    h.release
                        .as_ref()
                        .map_or("-".into(), |r| r.version.to_string()),
                    turnout_proto::text::clean_lines(&h.reason)
                );
            }
            Ok(Exit::Success)
        }
        UpgradeCommand::Retry { version } => {
            if !state_dir.join("agent.db").exists() {
                eprintln!(
                    "turnout-agent: no agent has run with the state directory {} (no agent.db); nothing to retry",
                    state_dir.display()
                );
                return Ok(Exit::Refused);
            }
            let mut journal = crate::journal::Journal::open(&state_dir.join("agent.db"))?;
            let history = journal.history(
                crate::upgrade::SELF_SERVICE,
                crate::journal::HISTORY_KEPT as usize,
            )?;
            let failed = history.iter().find(|h| {
                h.release
                    .as_ref()
                    .is_some_and(|r| r.version.to_string() == version)
            });
            let Some(failed) = failed.filter(|h| crate::converge::is_failure(&h.kind)) else {
                eprintln!(
                    "turnout-agent: agent {version} has not failed on this host (see `turnout-agent upgrade status`); nothing to retry"
                );
                return Ok(Exit::Refused);
            };
            let release = failed.release.clone().expect("found by its release");
            // Forgotten, not overwritten: an outcome for it would read as a
            // new failure to the coordinator's next rollout of it.
            let forgotten =
                journal.forget(crate::upgrade::SELF_SERVICE, release.sha256.as_str())?;
            println!(
                "agent {version} may be tried again ({forgotten} outcome(s) forgotten): the coordinator's next \
                 desired state naming it retries it"
            );
            Ok(Exit::Success)
        }
    }
}

/// Runs one command; the returned value is the process's exit status.
pub fn run(cli: Cli) -> anyhow::Result<Exit> {
    turnout_rt::log::init(cli.log_format);
    match cli.command {
        Command::Version { json } => {
            let offer = crate::offer();
            if json {
                println!("{}", serde_json::to_string_pretty(&offer)?);
            } else {
                println!("{offer}");
            }
            Ok(Exit::Success)
        }
        Command::InstallUnit { root } => {
            crate::install::install(&root)?;
            Ok(Exit::Success)
        }
        #[cfg(feature = "fault-injection")]
        Command::DemoService { behaviour, port } => {
            turnout_demo_service::run(&behaviour, port)?;
            Ok(Exit::Success)
        }
        Command::Verify {
            bundle,
            trust,
            unpack_to,
        } => {
            let trust = match trust {
                Some(path) => path,
                None => Config::load(&cli.config)?.trust,
            };
            verify(&bundle, &trust, unpack_to.as_deref())
        }
        Command::Upgrade(command) => upgrade(command, &cli.config),
        Command::Run => {
            use clap::ValueEnum as _;
            let format = cli
                .log_format
                .to_possible_value()
                .map_or("text".into(), |v| v.get_name().to_owned());
            crate::upgrade::switch::launch(&state_dir_of(&cli.config), &cli.config, &format);
            crate::upgrade::set_config_path(&cli.config);
            let config = Config::load(&cli.config)?;
            let _lock = daemon::lock(&config.state_dir)?;
            let agent = Arc::new(Agent::open(config)?);
            runtime()?.block_on(daemon::run(agent, shutdown_signal()))?;
            Ok(Exit::Success)
        }
        Command::Enroll {
            coordinator,
            token,
            host,
            ca_pins,
            ca,
        } => {
            let config = Config::load(&cli.config)?;
            let host = match host {
                Some(h) => h,
                None => std::fs::read_to_string("/proc/sys/kernel/hostname")?
                    .trim()
                    .to_owned(),
            };
            let host: turnout_proto::HostId = host.parse()?;
            let trust = crate::link::EnrollTrust {
                pins: ca_pins
                    .iter()
                    .map(|p| turnout_rt::tls::Pin::parse(p))
                    .collect::<Result<_, _>>()?,
                ca_pem: ca
                    .as_deref()
                    .map(std::fs::read)
                    .transpose()
                    .context("reading --ca")?,
            };
            let identity = crate::link::Identity::enroll(
                &config.state_dir,
                &coordinator,
                &token,
                &host,
                &config.labels,
                &trust,
            )?;
            println!(
                "enrolled host {} with {}; `turnout-agent run` follows it now",
                identity.host, identity.coordinator
            );
            Ok(Exit::Success)
        }
        Command::Check => {
            let config = Config::load(&cli.config)?;
            let trust = read_trust(&config.trust).map_err(|err| {
                anyhow::Error::from(crate::config::ConfigError::Invalid {
                    path: cli.config.clone(),
                    problems: vec![crate::config::Problem {
                        path: "trust".into(),
                        message: format!("expected a trust file ({err:#})"),
                    }],
                })
            })?;
            println!(
                "{}: {} service(s), trusting {} key(s) (threshold {}); coordinator: {}",
                cli.config.display(),
                config.services.len(),
                trust.keys().len(),
                trust.threshold(),
                // The enrollment (`coordinator.json`) is what the daemon follows.
                match crate::link::Identity::load(&config.state_dir) {
                    Ok(Some(identity)) =>
                        format!("{} (enrolled as {})", identity.coordinator, identity.host),
                    _ => config
                        .coordinator
                        .clone()
                        .unwrap_or_else(|| "none (standalone: not enrolled)".into()),
                }
            );
            Ok(Exit::Success)
        }
        Command::Status { json } => {
            let config = Config::load(&cli.config)?;
            let statuses = match ask(&config, &Request::Status)? {
                Some(Response::Status(statuses)) => statuses,
                Some(other) => return answered(other, json),
                // Nothing to show, and nothing is made just to show it.
                None if !config.state_dir.join("agent.db").exists() => {
                    if json {
                        println!("[]");
                    } else {
                        println!(
                            "no daemon is running and nothing is installed yet: {} holds no journal",
                            config.state_dir.display()
                        );
                    }
                    return Ok(Exit::Success);
                }
                None => {
                    let _lock = daemon::lock(&config.state_dir)?;
                    let agent = Agent::open(config.clone())?;
                    runtime()?.block_on(agent.status())?
                }
            };
            if !json && let Some(Response::Link(link)) = ask(&config, &Request::Link)? {
                println!(
                    "coordinator: {} {}{}{}",
                    link.coordinator.as_deref().unwrap_or("-"),
                    link.state,
                    link.proto
                        .filter(|_| link.state == "connected")
                        .map(|v| format!(", protocol v{v}"))
                        .unwrap_or_default(),
                    link.detail
                        .as_ref()
                        .map(|d| format!(": {d}"))
                        .unwrap_or_default()
                );
                if let Some(line) = desired_line(&link, crate::service::now_ms()) {
                    println!("{line}");
                }
            }
            print_status(&statuses, json)?;
            Ok(Exit::Success)
        }
        Command::Install {
            bundle,
            service,
            trust,
            json,
        } => {
            let config = Config::load(&cli.config)?;
            let bundle = absolute(&bundle)?;
            let trust = trust.as_deref().map(absolute).transpose()?;
            let request = Request::Install {
                service: service.clone(),
                bundle: bundle.clone(),
                trust: trust.clone(),
            };
            match ask(&config, &request)? {
                Some(response) => answered(response, json),
                None => {
                    let name = service.clone();
                    direct(config, &name, json, |agent| async move {
                        agent.install(&service, &bundle, trust.as_deref()).await
                    })
                }
            }
        }
        Command::Rollback { service, json } => {
            let config = Config::load(&cli.config)?;
            match ask(
                &config,
                &Request::Rollback {
                    service: service.clone(),
                },
            )? {
                Some(response) => answered(response, json),
                None => {
                    let name = service.clone();
                    direct(config, &name, json, |agent| async move {
                        agent.rollback(&service).await
                    })
                }
            }
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    // One thread: the agent is mostly idle, and small matters on every host.
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))
}

fn ask(config: &Config, request: &Request) -> Result<Option<Response>, AgentError> {
    control::call(&config.state_dir.join(SOCKET), request)
}

/// Runs an operation in this process, when no daemon runs.
fn direct<F, Fut>(config: Config, service: &str, json: bool, operation: F) -> anyhow::Result<Exit>
where
    F: FnOnce(Arc<Agent>) -> Fut,
    Fut: std::future::Future<Output = Result<OperationResult, AgentError>>,
{
    let _lock = daemon::lock(&config.state_dir)?;
    let agent = Arc::new(Agent::open(config)?);
    if agent.uses_exec(Some(service)).is_some() {
        return Err(AgentError::NeedsDaemon {
            service: service.to_owned(),
        }
        .into());
    }
    let result = runtime()?.block_on(async {
        agent.drive(service, crate::machine::Event::Recover).await?;
        operation(Arc::clone(&agent)).await
    })?;
    answered(Response::Done(result), json)
}

fn answered(response: Response, json: bool) -> anyhow::Result<Exit> {
    match response {
        Response::Done(result) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&result)?);
            } else {
                println!("{}", result.summary);
            }
            Ok(for_outcome(&result.kind()))
        }
        Response::Status(statuses) => {
            print_status(&statuses, json)?;
            Ok(Exit::Success)
        }
        Response::Link(link) => {
            println!("{}", serde_json::to_string_pretty(&link)?);
            Ok(Exit::Success)
        }
        Response::Error { message, exit } => {
            eprintln!("turnout-agent: {message}");
            Ok(match exit {
                2 => Exit::Usage,
                3 => Exit::Input,
                4 => Exit::Rejected,
                5 => Exit::Reverted,
                6 => Exit::Refused,
                _ => Exit::Failure,
            })
        }
    }
}

fn print_status(statuses: &[ServiceStatus], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(statuses)?);
        return Ok(());
    }
    let version = |r: &Option<turnout_proto::messages::ReleaseRef>| {
        r.as_ref().map_or("-".to_owned(), |r| r.version.to_string())
    };
    for s in statuses {
        let slot = s.active_slot.map_or("-", |slot| slot.name());
        let health = format!(
            "health {}{}",
            s.health,
            s.health_detail
                .as_ref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default()
        );
        match &s.target {
            // In flight: the active slot holds the release on trial, not the committed one.
            Some(target) if s.state != "idle" => println!(
                "{}: {} {} in {slot}, committed {} in the other slot, {health}",
                s.service,
                s.state,
                target.version,
                version(&s.committed)
            ),
            _ => println!(
                "{}: {}, committed {} in {slot}, other slot {}, {health}",
                s.service,
                s.state,
                version(&s.committed),
                version(&s.other)
            ),
        }
        if let Some(last) = &s.last_outcome {
            let when =
                humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(last.at_ms));
            println!(
                "  last: {} {} at {when}: {}",
                last.kind,
                last.release
                    .as_ref()
                    .map_or("-".to_owned(), |r| r.version.to_string()),
                last.reason
            );
        }
        if let Some(error) = &s.journal_error {
            println!("  journal: {error}");
        }
    }
    Ok(())
}

fn read_trust(path: &Path) -> anyhow::Result<Trust> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read the trust file {}", path.display()))?;
    let file =
        TrustFile::parse(&bytes, &Limits::default()).with_context(|| path.display().to_string())?;
    Ok(file.trust)
}

fn verify(bundle: &Path, trust: &Path, unpack_to: Option<&Path>) -> anyhow::Result<Exit> {
    let trust = read_trust(trust)?;
    let file = File::open(bundle).with_context(|| format!("cannot read {}", bundle.display()))?;
    let reader = BufReader::with_capacity(256 * 1024, file);
    let (now, limits) = (SystemTime::now(), Limits::default());
    let rejected = |err: BundleError| {
        anyhow::Error::new(err).context(format!("{} rejected", bundle.display()))
    };
    let verified: Verified = match unpack_to {
        None => verify_and_unpack(reader, &trust, now, &limits, &mut Discard).map_err(rejected)?,
        Some(dest) => match stage::unpack(reader, &trust, now, &limits, dest) {
            Ok((verified, _)) => verified,
            Err(stage::StageError::Bundle(err)) => return Err(rejected(err)),
            Err(err) => return Err(err.into()),
        },
    };
    let m = &verified.manifest;
    let keys: Vec<_> = verified.signed_by.iter().map(|id| id.as_str()).collect();
    println!(
        "OK {} {}: {} files, {} bytes, signed by {} of {} required keys ({}){}",
        m.name,
        m.version,
        m.files.len(),
        m.payload_bytes(),
        keys.len(),
        trust.threshold(),
        keys.join(", "),
        unpack_to
            .map(|d| format!(", unpacked into {}", d.display()))
            .unwrap_or_default()
    );
    Ok(Exit::Success)
}

pub use turnout_rt::cli::quiet_on_closed_stdout;

/// What `status` says of the signed desired state (protocol v2): fresh
/// until when, or stale since when, and the last refusal.
fn desired_line(link: &crate::link::LinkStatus, now_ms: u64) -> Option<String> {
    let mut line = match link.desired_expires_ms {
        Some(expires) if now_ms >= expires => format!(
            "desired state stale since {}: no valid desired state from the coordinator; services keep running on \
             their committed releases and nothing new starts",
            turnout_proto::desired::utc(expires)
        ),
        Some(expires) => format!(
            "desired state: signed, valid until {}",
            turnout_proto::desired::utc(expires)
        ),
        None => String::new(),
    };
    if let Some(refused) = link
        .desired_refused
        .as_ref()
        .filter(|_| link.state != "refusing")
    {
        if !line.is_empty() {
            line.push('\n');
        }
        line.push_str(&format!("desired state refused: {refused}"));
    }
    (!line.is_empty()).then_some(line)
}
