//! `turnout serve`: the coordinator server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use crate::coordinator::{Coordinator, Settings};
use crate::exit::Exit;
use crate::files;
use crate::profile::Profile;
use crate::store::Role;
use crate::tls;

/// Arguments of `turnout serve`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A config file (TOML) with any of: listen, state_dir, trust,
    /// report_interval, offline_after, max_connections, san (a list),
    /// tls_cert, tls_key, plaintext, metrics_listen, metrics_public,
    /// desired_expiry, min_agent_proto. Flags override it.
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
    /// How long a signed desired state stays valid [default: 1h]: a host
    /// whose newest one expired is stale and starts nothing new.
    #[arg(long)]
    pub desired_expiry: Option<humantime::Duration>,
    /// The oldest protocol version agents may speak [default: 1]: 2 refuses
    /// agents of 0.1.0 (unsigned desired state); `turnout host list` shows
    /// who is left behind.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=2))]
    pub min_agent_proto: Option<u16>,
    /// Make a first admin token (once) if none exists yet, and start even
    /// when the database is missing or empty beside a bundle store that
    /// holds bundles (a coordinator that lost its database).
    #[arg(long)]
    pub init: bool,
    /// With --init: write the first admin token to this file (mode 0600)
    /// instead of printing it.
    #[arg(long, requires = "init")]
    pub token_file: Option<PathBuf>,
    /// With --init: a DNS name or IP address agents and operators reach
    /// this coordinator by, for its TLS certificate (repeat it; localhost,
    /// 127.0.0.1, this machine's host name and the listen address are always in).
    #[arg(long = "san", value_name = "NAME")]
    pub sans: Vec<String>,
    /// Serve this certificate chain (PEM: the server's certificate, then
    /// its CAs) instead of the one `--init` makes; read again on SIGHUP
    /// and when the file changes.
    #[arg(long, requires = "tls_key", conflicts_with = "plaintext")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Also serve `/metrics`, and nothing else, on this address: plain
    /// HTTP, no token, for a scraper on a management network.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Let `/metrics` on the API listener answer without a token (it names
    /// hosts and rollouts; by default it needs a viewer token).
    #[arg(long)]
    pub metrics_public: bool,
    /// Serve plain HTTP, for a proxy in front that terminates TLS. Tokens
    /// and desired states then cross the network in clear between the
    /// proxy and this coordinator.
    #[arg(long)]
    pub plaintext: bool,
    /// Write the operator profile (`--init`) here instead of
    /// $XDG_CONFIG_HOME/turnout/profile.toml (~/.config/turnout/profile.toml).
    #[arg(long, requires = "init", env = "TURNOUT_PROFILE")]
    pub profile: Option<PathBuf>,
    /// How log lines are written to stderr.
    #[arg(long, value_enum, env = "TURNOUT_LOG_FORMAT", default_value = "text")]
    pub log_format: turnout_rt::log::LogFormat,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    #[serde(default)]
    san: Vec<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    #[serde(default)]
    plaintext: bool,
    metrics_listen: Option<SocketAddr>,
    #[serde(default)]
    metrics_public: bool,
    state_dir: Option<PathBuf>,
    trust: Option<PathBuf>,
    report_interval: Option<String>,
    offline_after: Option<u32>,
    max_connections: Option<usize>,
    desired_expiry: Option<String>,
    min_agent_proto: Option<u16>,
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
    if let Some(expiry) = args.desired_expiry.map(Into::into).or(file
        .desired_expiry
        .as_deref()
        .map(humantime::parse_duration)
        .transpose()?)
    {
        settings.desired_expiry = check_expiry(expiry, settings.report_interval)?;
    }
    if let Some(min) = args.min_agent_proto.or(file.min_agent_proto) {
        settings.min_agent_proto = turnout_proto::ProtoVersion::new(min)
            .filter(|v| turnout_proto::SUPPORTED.contains(*v))
            .ok_or_else(|| crate::files::InputError::Invalid {
                path: args
                    .config
                    .clone()
                    .unwrap_or_else(|| "--min-agent-proto".into()),
                detail: format!(
                    "min_agent_proto = {min}: expected a protocol version this build speaks ({})",
                    turnout_proto::SUPPORTED
                ),
            })?;
    }
    settings.metrics_public = args.metrics_public || file.metrics_public;
    let metrics_listen = args.metrics_listen.or(file.metrics_listen);
    let trust = files::trust_file(&trust_path)?.trust;
    std::fs::create_dir_all(&state_dir)?;
    if !args.init {
        refuse_lost_database(&state_dir)?;
    }
    // The database first: one this build refuses stops it before anything
    // (TLS files included) is made.
    let coordinator = Arc::new(Coordinator::open(&state_dir, trust, settings)?);
    let plaintext = args.plaintext || file.plaintext;
    let tls_files = match (
        args.tls_cert.clone().or(file.tls_cert),
        args.tls_key.clone().or(file.tls_key),
    ) {
        _ if plaintext => None,
        (Some(cert), Some(key)) => Some((cert, key, false)),
        (None, None) => {
            let paths = tls::Paths::in_state_dir(&state_dir);
            if args.init {
                let names = server_names(listen, args.sans.iter().chain(&file.san));
                let done = tls::init(&paths, &names, SystemTime::now())?;
                if done.new_ca {
                    tracing::info!(ca = %paths.ca.display(), "made the coordinator's CA");
                }
                if done.new_cert {
                    tracing::info!(names = %names.join(","), "issued the coordinator's TLS certificate");
                }
            }
            Some((paths.cert, paths.key, true))
        }
        _ => anyhow::bail!("give both tls_cert and tls_key, or neither"),
    };
    let own_ca = matches!(tls_files, Some((_, _, true)));
    let own_paths = tls::Paths::in_state_dir(&state_dir);
    if own_ca {
        // Renews a certificate near or past its end before it is served.
        tls::maintain(&own_paths, SystemTime::now())?;
    }
    let served = tls_files
        .as_ref()
        .map(|(cert, key, _)| tls::Reloading::open(cert, key, SystemTime::now()))
        .transpose()?;
    let (pins, ca_pem) = ca_for_agents(own_ca.then_some(&own_paths), served.as_deref())?;
    coordinator.set_ca(pins.clone(), ca_pem.clone());
    let scheme = if served.is_some() { "https" } else { "http" };
    if args.init {
        let now = coordinator.now_ms();
        let tokens = coordinator.with_store(|s| s.tokens())?;
        let working_admin = tokens.iter().any(|t| {
            t.role == Role::Admin
                && t.revoked_ms.is_none()
                && t.expires_ms.is_none_or(|at| at > now)
        });
        if working_admin {
            tracing::info!(
                "a working admin token exists already; create more with `turnout token create`"
            );
        } else {
            // The first admin token, or a new one when every admin token
            // expired or was revoked (the way back in).
            let name = std::iter::once("admin".to_owned())
                .chain((2..).map(|n| format!("admin-{n}")))
                .find(|n| !tokens.iter().any(|t| &t.name == n))
                .expect("a free name");
            let token = coordinator
                .with_store(|s| s.create_token(&name, Role::Admin, None, now))?
                .map_err(|refusal| anyhow::anyhow!("{refusal}"))?;
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
            let url = format!("{scheme}://{}", local_address(listen));
            // The CAs agents keep: the own CA's, or those in the operator's chain.
            let profile = Profile {
                coordinator: url,
                token: Some(token),
                ca: ca_pem,
                ca_pins: Vec::new(),
            };
            match profile.write_new(args.profile.as_deref()) {
                Ok(path) => tracing::info!(
                    "wrote the operator profile to {} (mode 0600): `turnout` commands on this machine need no flags",
                    path.display()
                ),
                Err(err) => tracing::warn!("no operator profile written: {err:#}"),
            }
        }
    }
    if plaintext {
        tracing::warn!(
            "serving PLAIN HTTP (--plaintext): operator tokens, enrollment tokens and desired states cross the \
             network in clear text; use this only behind a proxy that terminates TLS"
        );
    }
    for pin in &pins {
        tracing::info!(%pin, "agents join with this CA pin (`turnout token create --enroll` prints the join line)");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        tracing::info!(
            "coordinator listening on {scheme}://{}, state in {}",
            listener.local_addr()?,
            state_dir.display()
        );
        if let Some(address) = metrics_listen {
            let listener = tokio::net::TcpListener::bind(address).await?;
            tracing::info!(
                "metrics on http://{}/metrics (no token)",
                listener.local_addr()?
            );
            let router = crate::server::metrics_router(coordinator.clone());
            tokio::spawn(async move {
                if let Err(err) = axum::serve(listener, router).await {
                    tracing::error!("the metrics listener stopped: {err}");
                }
            });
        }
        let acceptor = served.clone().map(tls::acceptor);
        let reload = served.clone().map(|served| tokio::spawn(served.watch()));
        // The CAs agents are told to trust follow the files: for the own
        // CA, a rotation's new CA, its end dropping the old one, and a
        // certificate near its end renewed; for an operator's chain, the
        // CAs in the file as it is now.
        let upkeep = served.map(|served| {
            let (c, paths) = (coordinator.clone(), own_paths.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    if own_ca && let Err(err) = tls::maintain(&paths, SystemTime::now()) {
                        tracing::warn!("keeping the TLS certificates as they are: {err}");
                    }
                    match ca_for_agents(own_ca.then_some(&paths), Some(&served)) {
                        Ok((pins, pem)) => c.set_ca(pins, pem),
                        Err(err) => tracing::warn!("reading the CA certificates: {err:#}"),
                    }
                }
            })
        });
        // A director key rotated by `turnout director rotate` is picked up
        // without a restart.
        let director = {
            let c = coordinator.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    c.reload_director();
                }
            })
        };
        let served = crate::server::serve(coordinator, listener, acceptor, shutdown()).await;
        director.abort();
        if let Some(reload) = reload {
            reload.abort();
        }
        if let Some(upkeep) = upkeep {
            upkeep.abort();
        }
        served
    })?;
    Ok(Exit::Success)
}

/// The pins join lines carry and the CA certificates agents keep: the
/// coordinator's own CAs (`ca.pem`, both during a rotation), or the CAs in
/// the operator's chain being served (never those of a file that was
/// refused, so agents are not told to trust what is not served).
fn ca_for_agents(
    own: Option<&tls::Paths>,
    served: Option<&tls::Reloading>,
) -> anyhow::Result<(Vec<turnout_rt::tls::Pin>, Option<String>)> {
    let cas = match (own, served) {
        (_, None) => return Ok((Vec::new(), None)),
        (Some(paths), Some(_)) => {
            turnout_rt::tls::certificates_from_pem(&std::fs::read(&paths.ca)?)?
        }
        (None, Some(served)) => served.cas(),
    };
    let pins = cas
        .iter()
        .map(turnout_rt::tls::Pin::of_certificate)
        .collect::<Result<_, _>>()?;
    Ok((pins, Some(turnout_rt::tls::certificates_to_pem(&cas))))
}

/// The names the coordinator's certificate carries: loopback, this
/// machine's host name, the listen address when it is a specific one, and
/// the operator's.
fn server_names<'a>(listen: SocketAddr, extra: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim();
        if !host.is_empty() && host.parse::<std::net::IpAddr>().is_err() {
            names.push(host.to_owned());
        }
    }
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    for name in extra {
        names.push(name.clone());
    }
    let mut seen = std::collections::BTreeSet::new();
    names.retain(|n| seen.insert(n.to_ascii_lowercase()));
    names
}

/// How a client on this machine reaches the listen address.
fn local_address(listen: SocketAddr) -> String {
    match listen.ip() {
        ip if ip.is_unspecified() || ip.is_loopback() => format!("127.0.0.1:{}", listen.port()),
        std::net::IpAddr::V6(ip) => format!("[{ip}]:{}", listen.port()),
        ip => format!("{ip}:{}", listen.port()),
    }
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

/// A desired-state expiry must outlast several polls: agents poll at
/// least once a report interval and every answer renews it, so a host must
/// not go stale between two answers.
fn check_expiry(expiry: Duration, interval: Duration) -> Result<Duration, files::InputError> {
    let floor = interval * 3;
    let ceiling = Duration::from_millis(turnout_proto::desired::MAX_VALIDITY_MS);
    if expiry > ceiling {
        return Err(files::InputError::Invalid {
            path: "desired_expiry".into(),
            detail: format!(
                "{} is longer than hosts count any desired state as valid ({}); expected at most that",
                humantime::format_duration(expiry),
                humantime::format_duration(ceiling)
            ),
        });
    }
    if expiry < floor {
        return Err(files::InputError::Invalid {
            path: "desired_expiry".into(),
            detail: format!(
                "{} is shorter than three report intervals ({} each): hosts would go stale between answers; \
                 expected at least {}",
                humantime::format_duration(expiry),
                humantime::format_duration(interval),
                humantime::format_duration(floor)
            ),
        });
    }
    Ok(expiry)
}
