//! `turnout serve`: the coordinator server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use crate::coordinator::{Coordinator, Settings};
use crate::exit::Exit;
use crate::files;
use crate::store::Role;

/// Arguments of `turnout serve`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A config file (TOML) with any of: listen, state_dir, trust,
    /// report_interval, offline_after, max_connections. Flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The address to listen on.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Where the database and bundle store live.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// The trust file pushed bundles are checked against.
    #[arg(long)]
    pub trust: Option<PathBuf>,
    /// How often agents report (their heartbeat).
    #[arg(long)]
    pub report_interval: Option<humantime::Duration>,
    /// Missed report intervals after which a host counts as offline.
    #[arg(long)]
    pub offline_after: Option<u32>,
    /// Most agent and operator connections served at once [default: 16384];
    /// keep it under the file limit (the shipped unit sets LimitNOFILE=65536).
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Make a first admin token (once) if none exists yet, and start even
    /// when the database is missing or empty beside a bundle store that
    /// holds bundles (a coordinator that lost its database).
    #[arg(long)]
    pub init: bool,
    /// With --init: write the first admin token to this file (mode 0600)
    /// instead of printing it.
    #[arg(long, requires = "init")]
    pub token_file: Option<PathBuf>,
    /// How log lines are written to stderr.
    #[arg(long, value_enum, env = "TURNOUT_LOG_FORMAT", default_value = "text")]
    pub log_format: turnout_rt::log::LogFormat,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    state_dir: Option<PathBuf>,
    trust: Option<PathBuf>,
    report_interval: Option<String>,
    offline_after: Option<u32>,
    max_connections: Option<usize>,
}

/// Serves until SIGTERM or Ctrl-C.
pub fn run(args: &Args) -> anyhow::Result<Exit> {
    turnout_rt::log::init(args.log_format);
    let file: FileConfig = match &args.config {
        None => FileConfig::default(),
        Some(path) => toml::from_str(&String::from_utf8(files::read(path)?)?).map_err(|e| {
            files::InputError::Invalid {
                path: path.clone(),
                detail: e.to_string(),
            }
        })?,
    };
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| "127.0.0.1:7400".parse().expect("valid"));
    let state_dir = args
        .state_dir
        .clone()
        .or(file.state_dir)
        .unwrap_or_else(|| "/var/lib/turnout-coordinator".into());
    let trust_path = args
        .trust
        .clone()
        .or(file.trust)
        .unwrap_or_else(|| "/etc/turnout/trust.json".into());
    let mut settings = Settings::default();
    if let Some(interval) = args.report_interval.map(Into::into).or(file
        .report_interval
        .as_deref()
        .map(humantime::parse_duration)
        .transpose()?)
    {
        settings.report_interval = interval;
    }
    if let Some(n) = args.offline_after.or(file.offline_after) {
        settings.offline_after = n;
    }
    if let Some(n) = args.max_connections.or(file.max_connections) {
        settings.max_connections = n.max(1);
    }
    let trust = files::trust_file(&trust_path)?.trust;
    std::fs::create_dir_all(&state_dir)?;
    if !args.init {
        refuse_lost_database(&state_dir)?;
    }
    let coordinator = Arc::new(Coordinator::open(&state_dir, trust, settings)?);
    if args.init {
        if coordinator.with_store(|s| s.has_tokens())? {
            tracing::info!(
                "an operator token exists already; create more with `turnout token create`"
            );
        } else {
            let token =
                coordinator.with_store(|s| s.create_token(Role::Admin, coordinator.now_ms()))?;
            match &args.token_file {
                Some(path) => {
                    files::write_atomic(path, format!("{token}\n").as_bytes(), 0o600, true)?;
                    tracing::info!(
                        "wrote the first admin token to {} (mode 0600)",
                        path.display()
                    );
                }
                None => println!("admin token (shown once, keep it safe): {token}"),
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        tracing::info!(
            "coordinator listening on http://{}, state in {}",
            listener.local_addr()?,
            state_dir.display()
        );
        crate::server::serve(coordinator, listener, shutdown()).await
    })?;
    Ok(Exit::Success)
}

/// Refuses to start on a missing or empty database beside a bundle store
/// that holds bundles: that coordinator had state, and starting afresh would
/// silently forget every host, token and rollout.
fn refuse_lost_database(state_dir: &std::path::Path) -> Result<(), files::InputError> {
    let db = state_dir.join("coordinator.db");
    let empty = std::fs::metadata(&db).map_or(true, |m| m.len() == 0);
    let bundles = std::fs::read_dir(state_dir.join("bundles")).map_or(0, |entries| {
        entries
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "tnt"))
            .count()
    });
    if empty && bundles > 0 {
        return Err(files::InputError::Invalid {
            path: db,
            detail: format!(
                "the database is missing or empty, but the bundle store beside it holds {bundles} bundle(s): this coordinator had state, and starting on an empty database would forget every host, token and rollout. Restore coordinator.db from a backup, or start with --init to begin afresh (hosts must then enroll again)"
            ),
        });
    }
    Ok(())
}

async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
}
