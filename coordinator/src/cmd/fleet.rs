//! `turnout token`, `turnout host`, `turnout bundle` and `turnout events`.

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::{Value, json};

use crate::cmd::remote::{Remote, clean, when};
use crate::exit::Exit;
use crate::files::{self, human_bytes};

/// `turnout token …`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create an operator token (`--name alice --role operator`), or an
    /// enrollment token for hosts (`--enroll`); the secret is shown once.
    Create {
        /// An enrollment token (for `turnout-agent enroll`) instead of an operator token.
        #[arg(long)]
        enroll: bool,
        /// Who holds the operator token: the event log names it.
        #[arg(long, required_unless_present = "enroll", conflicts_with = "enroll")]
        name: Option<String>,
        /// The operator token's role: viewer, operator or admin.
        #[arg(long, default_value = "viewer", conflicts_with = "enroll")]
        role: String,
        /// How long the token stays valid [enrollment tokens: 1h; operator
        /// tokens: until revoked].
        #[arg(long)]
        ttl: Option<humantime::Duration>,
        /// How many hosts may enroll with it.
        #[arg(long, default_value_t = 1, requires = "enroll")]
        uses: u32,
        /// Only this host id may enroll with it.
        #[arg(long, requires = "enroll")]
        host: Option<String>,
        /// With --host: it may give that enrolled host a new key (a
        /// reinstalled machine); logged.
        #[arg(long, requires = "host")]
        replace: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// List operator tokens: name, role, created, expires, last used (never the secret).
    List {
        #[command(flatten)]
        remote: Remote,
    },
    /// Revoke an operator token by name; it is refused from then on.
    Revoke {
        /// The token's name.
        name: String,
        #[command(flatten)]
        remote: Remote,
    },
}

/// `turnout host …`.
#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// List enrolled hosts: state, agent, protocol, labels, last seen.
    List {
        /// Only hosts with these labels, e.g. role=web,region=eu-1.
        #[arg(long)]
        selector: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Set or remove a host's labels, which selectors match (`k=v` sets,
    /// `k-` removes); what the host reports of itself is shown beside them.
    Label {
        /// The host.
        host: String,
        /// `key=value` to set, `key-` to remove.
        #[arg(required = true)]
        labels: Vec<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Remove a host from the registry (it must enroll again).
    Forget {
        /// The host.
        host: String,
        #[command(flatten)]
        remote: Remote,
    },
}

/// `turnout bundle …`.
#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Upload a bundle; the coordinator verifies it against its trust file first.
    Push {
        /// The bundle.
        file: PathBuf,
        #[command(flatten)]
        remote: Remote,
    },
    /// List stored bundles.
    List {
        #[command(flatten)]
        remote: Remote,
    },
}

/// Arguments of `turnout events`.
#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// Only this rollout's events.
    #[arg(long)]
    pub rollout: Option<String>,
    /// Keep printing new events as they come.
    #[arg(long)]
    pub follow: bool,
    #[command(flatten)]
    pub remote: Remote,
}

/// Runs a token command.
pub fn token(command: TokenCommand) -> anyhow::Result<Exit> {
    let (enroll, name, role, ttl, uses, host, replace, remote) = match command {
        TokenCommand::Create {
            enroll,
            name,
            role,
            ttl,
            uses,
            host,
            replace,
            remote,
        } => (enroll, name, role, ttl, uses, host, replace, remote),
        TokenCommand::List { remote } => return list_tokens(&remote),
        TokenCommand::Revoke { name, remote } => {
            remote.client()?.delete(&format!("/v1/tokens/{name}"))?;
            println!("revoked the operator token {name}");
            return Ok(Exit::Success);
        }
    };
    let ttl_secs = ttl.map(|t| t.as_secs());
    let body = if enroll {
        json!({"enroll": true, "ttl_secs": ttl_secs, "uses": uses, "host": host, "replace": replace})
    } else {
        json!({"name": name, "role": role, "ttl_secs": ttl_secs})
    };
    let mut answer: Value = remote.client()?.post("/v1/tokens", &body)?;
    let secret = answer["token"].as_str().unwrap_or_default().to_owned();
    let join = enroll.then(|| {
        let mut line = format!(
            "turnout-agent enroll --coordinator {} --token {secret}",
            remote.url().unwrap_or_default()
        );
        if let Some(host) = &host {
            line.push_str(&format!(" --host {host}"));
        }
        for pin in answer["ca_pins"].as_array().into_iter().flatten() {
            line.push_str(&format!(" --ca-pin {}", pin.as_str().unwrap_or_default()));
        }
        line
    });
    if let Some(join) = &join {
        answer["join"] = Value::from(join.clone());
    }
    if !remote.print_json(&answer)? {
        // The token alone on stdout, for scripts; the join line for people.
        println!("{secret}");
        if let Some(join) = join {
            eprintln!("join a host with:\n  {join}");
        }
    }
    Ok(Exit::Success)
}

fn list_tokens(remote: &Remote) -> anyhow::Result<Exit> {
    let tokens: Vec<Value> = remote.client()?.get("/v1/tokens")?;
    if remote.print_json(&tokens)? {
        return Ok(Exit::Success);
    }
    println!(
        "{:<20} {:<9} {:<20} {:<28} LAST USED",
        "NAME", "ROLE", "CREATED", "EXPIRES"
    );
    let time = |v: &Value| v.as_u64().map(when);
    for t in &tokens {
        let expires = match (time(&t["revoked_ms"]), time(&t["expires_ms"])) {
            (Some(at), _) => format!("revoked {at}"),
            (None, Some(at)) => at,
            (None, None) => "never".into(),
        };
        println!(
            "{:<20} {:<9} {:<20} {:<28} {}",
            clean(t["name"].as_str().unwrap_or_default()),
            t["role"].as_str().unwrap_or_default(),
            time(&t["created_ms"]).unwrap_or_default(),
            expires,
            time(&t["last_used_ms"]).unwrap_or_else(|| "never".into())
        );
    }
    Ok(Exit::Success)
}

/// Runs a host command.
pub fn host(command: HostCommand) -> anyhow::Result<Exit> {
    match command {
        HostCommand::List { selector, remote } => {
            let path = match &selector {
                Some(s) => format!("/v1/hosts?selector={}", s.replace(' ', "")),
                None => "/v1/hosts".into(),
            };
            let hosts: Vec<Value> = remote.client()?.get(&path)?;
            if remote.print_json(&hosts)? {
                return Ok(Exit::Success);
            }
            println!(
                "{:<24} {:<13} {:<9} {:<6} {:<20} LABELS",
                "HOST", "STATE", "AGENT", "PROTO", "LAST SEEN"
            );
            for h in &hosts {
                let labels: Vec<String> = h["labels"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| {
                                format!("{}={}", clean(k), clean(v.as_str().unwrap_or_default()))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                println!(
                    "{:<24} {:<13} {:<9} {:<6} {:<20} {}",
                    clean(h["id"].as_str().unwrap_or_default()),
                    h["state"].as_str().unwrap_or_default(),
                    clean(h["agent_version"].as_str().unwrap_or("-")),
                    h["proto"].as_u64().map_or("-".into(), |p| format!("v{p}")),
                    h["last_seen_ms"]
                        .as_u64()
                        .filter(|t| *t > 0)
                        .map_or("never".into(), when),
                    labels.join(",")
                );
                if let Some(why) = h["incompatible"].as_str() {
                    println!("  refused: {}", clean(why));
                }
                if h["legacy"] == true {
                    println!(
                        "  legacy: speaks protocol v1 only (unsigned desired state); upgrade its agent before setting min_agent_proto = 2"
                    );
                }
                if let Some(since) = h["stale_since_ms"].as_u64() {
                    println!(
                        "  stale since {}: its newest signed desired state expired; it starts nothing new",
                        when(since)
                    );
                }
                if let Some(why) = h["desired_refused"].as_str() {
                    println!("  refuses desired state: {}", clean(why));
                }
                if !h["reported_labels"].is_null() && h["reported_labels"] != h["labels"] {
                    let reported: Vec<String> = h["reported_labels"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(k, v)| {
                            format!("{}={}", clean(k), clean(v.as_str().unwrap_or_default()))
                        })
                        .collect();
                    println!(
                        "  reports labels {} (selectors match the labels above; `turnout host label` sets them)",
                        reported.join(",")
                    );
                }
            }
            Ok(Exit::Success)
        }
        HostCommand::Label {
            host,
            labels,
            remote,
        } => {
            let mut set = serde_json::Map::new();
            let mut remove = Vec::new();
            for label in &labels {
                match label.split_once('=') {
                    Some((key, value)) => {
                        set.insert(key.to_owned(), Value::from(value));
                    }
                    None => match label.strip_suffix('-') {
                        Some(key) if !key.is_empty() => remove.push(key.to_owned()),
                        _ => {
                            eprintln!(
                                "turnout: {label:?}: expected key=value to set a label, or key- to remove one"
                            );
                            return Ok(Exit::Usage);
                        }
                    },
                }
            }
            let labels: Value = remote.client()?.post(
                &format!("/v1/hosts/{host}/labels"),
                &json!({"set": set, "remove": remove}),
            )?;
            if !remote.print_json(&labels)? {
                let shown: Vec<String> = labels
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                    .collect();
                println!(
                    "{host}: {}",
                    if shown.is_empty() {
                        "no labels".into()
                    } else {
                        shown.join(",")
                    }
                );
            }
            Ok(Exit::Success)
        }
        HostCommand::Forget { host, remote } => {
            remote.client()?.delete(&format!("/v1/hosts/{host}"))?;
            println!("forgot host {host}");
            Ok(Exit::Success)
        }
    }
}

/// Runs a bundle command.
pub fn bundle(command: BundleCommand) -> anyhow::Result<Exit> {
    match command {
        BundleCommand::Push { file, remote } => {
            let mut reader =
                std::fs::File::open(&file).map_err(|source| files::InputError::Read {
                    path: file.clone(),
                    cause: source,
                })?;
            let client = remote.client()?;
            // Credentials first: a refused push of a large bundle would end in
            // a broken pipe, not in the refusal.
            let _: Value = client.get("/v1/auth?role=operator")?;
            let record: Value = client.post_stream("/v1/bundles", &mut reader)?;
            if !remote.print_json(&record)? {
                println!(
                    "pushed {} {} ({}, sha256 {})",
                    record["name"].as_str().unwrap_or_default(),
                    record["version"].as_str().unwrap_or_default(),
                    human_bytes(record["size"].as_u64().unwrap_or(0)),
                    record["sha256"].as_str().unwrap_or_default()
                );
            }
            Ok(Exit::Success)
        }
        BundleCommand::List { remote } => {
            let bundles: Vec<Value> = remote.client()?.get("/v1/bundles")?;
            if !remote.print_json(&bundles)? {
                println!(
                    "{:<16} {:<12} {:>10}  {:<20} SHA256",
                    "NAME", "VERSION", "SIZE", "PUSHED"
                );
                for b in &bundles {
                    println!(
                        "{:<16} {:<12} {:>10}  {:<20} {}",
                        b["name"].as_str().unwrap_or_default(),
                        b["version"].as_str().unwrap_or_default(),
                        human_bytes(b["size"].as_u64().unwrap_or(0)),
                        when(b["created_ms"].as_u64().unwrap_or(0)),
                        b["sha256"].as_str().unwrap_or_default()
                    );
                }
            }
            Ok(Exit::Success)
        }
    }
}

/// Prints one event line.
pub fn print_event(event: &Value) {
    println!(
        "{} {:<14} {:<18} {}",
        when(event["at_ms"].as_u64().unwrap_or(0)),
        clean(event["actor"].as_str().unwrap_or_default()),
        clean(event["host"].as_str().unwrap_or("-")),
        clean(event["message"].as_str().unwrap_or_default())
    );
}

/// Runs `turnout events`.
pub fn events(args: &EventsArgs) -> anyhow::Result<Exit> {
    let client = args.remote.client()?;
    let mut after = 0;
    loop {
        let mut path = format!("/v1/events?after={after}");
        if let Some(r) = &args.rollout {
            path.push_str(&format!("&rollout={r}"));
        }
        if args.follow {
            path.push_str("&wait=30s");
        }
        let events: Vec<Value> = client.get(&path)?;
        // The server answers a page at a time: without --follow, read pages
        // until one comes back empty, so the whole log is printed.
        if events.is_empty() && !args.follow {
            return Ok(Exit::Success);
        }
        for event in &events {
            if args.remote.json {
                println!("{}", serde_json::to_string(event)?);
            } else {
                print_event(event);
            }
            after = event["id"].as_u64().unwrap_or(after);
        }
    }
}
