//! `turnout rollout …`: plan, start, watch and steer rollouts.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Subcommand;
use serde_json::{Value, json};

use crate::cmd::fleet::print_event;
use crate::cmd::remote::Remote;
use crate::engine::{Phase, Rollout, State};
use crate::exit::Exit;
use crate::files;
use crate::spec::{RawSpec, RolloutSpec};

/// A spec from a file and flags (flags win).
#[derive(Debug, Clone, clap::Args)]
pub struct SpecArgs {
    /// A spec file (TOML); flags override its keys.
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// The rollout's id (default SERVICE-VERSION-N).
    #[arg(long)]
    pub id: Option<String>,
    /// The service to move.
    #[arg(long)]
    pub service: Option<String>,
    /// NAME@VERSION or a bundle sha256.
    #[arg(long)]
    pub release: Option<String>,
    /// Labels hosts must have, e.g. role=web,region=eu-1.
    #[arg(long)]
    pub selector: Option<String>,
    /// Cumulative waves, e.g. 1,10%,50%,100% [default: 1,100%].
    #[arg(long, value_delimiter = ',')]
    pub waves: Vec<String>,
    /// Hosts switching at once within a wave [default: the whole wave].
    #[arg(long)]
    pub max_parallel: Option<u64>,
    /// Coordinator-side bake after a host commits, e.g. 30s [default: 0s].
    #[arg(long)]
    pub bake: Option<String>,
    /// Per host, from dispatch to committed, e.g. 2m [default: 2m].
    #[arg(long)]
    pub healthy_deadline: Option<String>,
    /// Per wave, e.g. 10m [default: 10m].
    #[arg(long)]
    pub progress_deadline: Option<String>,
    /// Failures allowed: a count or a percentage [default: 0].
    #[arg(long)]
    pub max_failed: Option<String>,
    /// What a tripped gate does: rollback or pause [default: rollback].
    #[arg(long)]
    pub on_failure: Option<String>,
    /// Whether each wave after the first waits for `promote`: auto or manual [default: auto].
    #[arg(long)]
    pub promote: Option<String>,
    /// Hosts offline at their turn: skip or fail [default: skip].
    #[arg(long)]
    pub offline: Option<String>,
}

impl SpecArgs {
    fn raw(&self) -> anyhow::Result<RawSpec> {
        let mut raw = match &self.file {
            Some(path) => RolloutSpec::raw_from_toml(&String::from_utf8(files::read(path)?)?)?,
            None => RawSpec::new(),
        };
        let strings = [
            ("service", &self.service),
            ("release", &self.release),
            ("selector", &self.selector),
            ("bake", &self.bake),
            ("healthy_deadline", &self.healthy_deadline),
            ("progress_deadline", &self.progress_deadline),
            ("max_failed", &self.max_failed),
            ("on_failure", &self.on_failure),
            ("promote", &self.promote),
            ("offline", &self.offline),
        ];
        for (key, value) in strings {
            if let Some(value) = value {
                raw.insert(key.into(), Value::String(value.clone()));
            }
        }
        if let Some(n) = self.max_parallel {
            raw.insert("max_parallel".into(), json!(n));
        }
        if !self.waves.is_empty() {
            raw.insert("waves".into(), json!(self.waves));
        }
        Ok(raw)
    }
}

/// `turnout rollout …`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the cohorts and waves a rollout would use; nothing moves.
    Plan {
        #[command(flatten)]
        spec: SpecArgs,
        #[command(flatten)]
        remote: Remote,
    },
    /// Start a rollout.
    Start {
        #[command(flatten)]
        spec: SpecArgs,
        /// Then follow it until it finishes, as `turnout rollout watch`
        /// (exit 0 if it succeeded, 7 if not).
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show a rollout (or every unfinished one).
    Status {
        /// The rollout.
        id: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Follow a rollout until it finishes: 0 if it succeeded, 7 if not.
    Watch {
        /// The rollout.
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Stop starting hosts; hosts in flight finish.
    Pause {
        /// The rollout.
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Continue a paused rollout.
    Resume {
        /// The rollout.
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Start the next wave (promote = manual).
    Promote {
        /// The rollout.
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Stop for good, leaving hosts where they are.
    Abort {
        /// The rollout.
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Move every host the rollout moved back, newest first.
    Rollback {
        /// The rollout.
        id: String,
        /// Ignore max_parallel: move every host back at once.
        #[arg(long)]
        all_at_once: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// List rollouts.
    List {
        #[command(flatten)]
        remote: Remote,
    },
}

/// Runs a rollout command.
pub fn run(command: Command) -> anyhow::Result<Exit> {
    match command {
        Command::Plan { spec, remote } => {
            let plan: Value = remote.client()?.post(
                "/v1/rollouts/plan",
                &json!({"spec": spec.raw()?, "id": spec.id}),
            )?;
            if !remote.print_json(&plan)? {
                println!(
                    "rollout {}: {} to {} {}",
                    plan["id"].as_str().unwrap_or_default(),
                    plan["spec"]["service"].as_str().unwrap_or_default(),
                    plan["target"]["name"].as_str().unwrap_or_default(),
                    plan["target"]["version"].as_str().unwrap_or_default()
                );
                if let Ok(spec) =
                    serde_json::from_value::<crate::spec::RolloutSpec>(plan["spec"].clone())
                {
                    println!("  {}", spec.settings());
                }
                for (i, wave) in plan["waves"].as_array().into_iter().flatten().enumerate() {
                    let hosts: Vec<&str> = wave
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .collect();
                    println!(
                        "  wave {} ({} host(s)): {}",
                        i + 1,
                        hosts.len(),
                        hosts.join(", ")
                    );
                }
                for (host, why) in plan["excluded"].as_object().into_iter().flatten() {
                    println!("  excluded {host}: {}", why.as_str().unwrap_or_default());
                }
                for warning in plan["warnings"].as_array().into_iter().flatten() {
                    println!("  warning: {}", warning.as_str().unwrap_or_default());
                }
            }
            Ok(Exit::Success)
        }
        Command::Start {
            spec,
            watch: follow,
            remote,
        } => {
            let rollout: Rollout = remote
                .client()?
                .post("/v1/rollouts", &json!({"spec": spec.raw()?, "id": spec.id}))?;
            if follow {
                if !remote.json {
                    print_rollout(&rollout);
                    println!("  {}", rollout.spec.settings());
                }
                return watch(&rollout.id, &remote);
            }
            if !remote.print_json(&rollout)? {
                print_rollout(&rollout);
                println!("  {}", rollout.spec.settings());
                println!("follow it with: turnout rollout watch {}", rollout.id);
            }
            Ok(Exit::Success)
        }
        Command::Status { id, remote } => {
            let rollouts: Vec<Rollout> = match id {
                Some(id) => vec![remote.client()?.get(&format!("/v1/rollouts/{id}"))?],
                None => remote
                    .client()?
                    .get::<Vec<Rollout>>("/v1/rollouts")?
                    .into_iter()
                    .filter(|r| !r.state.is_finished())
                    .collect(),
            };
            if !remote.print_json(&rollouts)? {
                if rollouts.is_empty() {
                    println!("no rollout is running");
                }
                rollouts.iter().for_each(print_rollout);
            }
            Ok(Exit::Success)
        }
        Command::Watch { id, remote } => watch(&id, &remote),
        Command::Pause { id, remote } => send_command(&id, "pause", json!({}), &remote),
        Command::Resume { id, remote } => send_command(&id, "resume", json!({}), &remote),
        Command::Promote { id, remote } => send_command(&id, "promote", json!({}), &remote),
        Command::Abort { id, remote } => send_command(&id, "abort", json!({}), &remote),
        Command::Rollback {
            id,
            all_at_once,
            remote,
        } => send_command(
            &id,
            "rollback",
            json!({"all_at_once": all_at_once}),
            &remote,
        ),
        Command::List { remote } => {
            let rollouts: Vec<Rollout> = remote.client()?.get("/v1/rollouts")?;
            if !remote.print_json(&rollouts)? {
                println!(
                    "{:<28} {:<10} {:<14} {:<8} RELEASE",
                    "ID", "SERVICE", "STATE", "HOSTS"
                );
                for r in &rollouts {
                    // Padding applies to strings: ids and names are
                    // formatted first.
                    println!(
                        "{:<28} {:<10} {:<14} {:<8} {}",
                        r.id.to_string(),
                        r.spec.service.to_string(),
                        r.state.name(),
                        r.hosts.len(),
                        r.target.version
                    );
                }
            }
            Ok(Exit::Success)
        }
    }
}

fn send_command(id: &str, name: &str, body: Value, remote: &Remote) -> anyhow::Result<Exit> {
    let rollout: Rollout = remote
        .client()?
        .post(&format!("/v1/rollouts/{id}/{name}"), &body)?;
    if !remote.print_json(&rollout)? {
        print_rollout(&rollout);
    }
    Ok(Exit::Success)
}

fn state_line(r: &Rollout) -> String {
    let detail = match &r.state {
        State::Running {
            wave,
            awaiting_promotion: true,
            ..
        } => format!(
            "wave {} of {} done, waiting for `turnout rollout promote {}`",
            wave + 1,
            r.waves.len(),
            r.id
        ),
        State::Running { wave, .. } => format!("wave {} of {}", wave + 1, r.waves.len()),
        State::Paused { reason, .. } => format!("paused: {reason}"),
        State::RollingBack { reason, .. } => format!("rolling back: {reason}"),
        State::Aborted { reason } => format!("aborted: {reason}"),
        State::Failed { reason } => format!("failed: {reason}"),
        State::Succeeded | State::RolledBack => String::new(),
    };
    format!(
        "rollout {}: {} to {} — {}{}",
        r.id,
        r.spec.service,
        r.target.version,
        r.state.name(),
        if detail.is_empty() {
            String::new()
        } else {
            format!(", {detail}")
        }
    )
}

/// Prints a rollout's state and per-wave progress.
pub fn print_rollout(r: &Rollout) {
    println!("{}", state_line(r));
    for (i, wave) in r.waves.iter().enumerate() {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for host in wave {
            *counts.entry(r.hosts[host].phase.name()).or_default() += 1;
        }
        let parts: Vec<String> = counts
            .iter()
            .map(|(phase, n)| format!("{n} {phase}"))
            .collect();
        println!(
            "  wave {} ({} host(s)): {}",
            i + 1,
            wave.len(),
            parts.join(", ")
        );
    }
    println!(
        "  failed {} (max_failed allows {})",
        r.failed(),
        r.allowed_failures()
    );
    // Why each host that did not get where it should is where it is.
    for (host, progress) in &r.hosts {
        let why = match &progress.phase {
            Phase::Failed { reason } => Some(("failed", reason)),
            Phase::RevertFailed { reason } => Some(("rollback failed", reason)),
            Phase::Skipped { reason } => Some(("skipped", reason)),
            _ => None,
        };
        if let Some((what, reason)) = why {
            println!("  {host}: {what}: {}", crate::cmd::remote::clean(reason));
        }
        // A host that failed and was then moved back still says why it failed.
        if let (Some(failure), false) = (
            &progress.failure,
            matches!(progress.phase, Phase::Failed { .. }),
        ) {
            println!(
                "  {host}: failed earlier: {}",
                crate::cmd::remote::clean(failure)
            );
        }
    }
}

fn watch(id: &str, remote: &Remote) -> anyhow::Result<Exit> {
    let client = remote.client()?;
    let live = std::io::stdout().is_terminal() && !remote.json;
    let mut after = 0;
    let mut recent: Vec<Value> = Vec::new();
    let mut last_line = String::new();
    loop {
        let events: Vec<Value> =
            client.get(&format!("/v1/events?after={after}&rollout={id}&wait=10s"))?;
        let rollout: Rollout = client.get(&format!("/v1/rollouts/{id}"))?;
        for event in &events {
            after = event["id"].as_u64().unwrap_or(after);
            if live {
                recent.push(event.clone());
            } else if remote.json {
                println!("{}", serde_json::to_string(event)?);
            } else {
                print_event(event);
            }
        }
        if live {
            let keep = recent.len().saturating_sub(10);
            recent.drain(..keep);
            draw(&rollout, &recent);
        } else if !remote.json {
            let line = state_line(&rollout);
            if line != last_line {
                println!("{line}");
                last_line = line;
            }
        }
        if rollout.state.is_finished() {
            return Ok(if rollout.state == State::Succeeded {
                Exit::Success
            } else {
                Exit::Unsuccessful
            });
        }
    }
}

/// The live view: state, a progress bar, per-host state, the last events.
fn draw(r: &Rollout, recent: &[Value]) {
    let total = r.hosts.len().max(1);
    let settled = r
        .hosts
        .values()
        .filter(|h| {
            matches!(
                h.phase,
                Phase::Done
                    | Phase::Reverted
                    | Phase::Skipped { .. }
                    | Phase::Failed { .. }
                    | Phase::RevertFailed { .. }
                    | Phase::Forgotten { .. }
            )
        })
        .count();
    let width = 40;
    let filled = settled * width / total;
    print!("\x1b[2J\x1b[H");
    println!("{}", state_line(r));
    println!(
        "[{}{}] {settled}/{total} settled, {} failed (allowed {})",
        "#".repeat(filled),
        ".".repeat(width - filled),
        r.failed(),
        r.allowed_failures()
    );
    for (i, wave) in r.waves.iter().enumerate() {
        let hosts: Vec<String> = wave
            .iter()
            .map(|h| format!("{h}:{}", r.hosts[h].phase.name()))
            .collect();
        println!("wave {}: {}", i + 1, hosts.join("  "));
    }
    println!("--- last events");
    recent.iter().for_each(print_event);
}
