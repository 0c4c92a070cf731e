//! `turnout policy set|sign|push|show`: release floors and revocations,
//! signed by the release keys and handed to the coordinator, which serves
//! them to hosts (docs/bundles.md, "Release policy").

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::Subcommand;
use serde_json::Value;
use turnout_proto::Limits;
use turnout_proto::manifest::Timestamp;
use turnout_proto::policy::{POLICY_FORMAT, Policy, PolicyFile, ServicePolicy};

use crate::cmd::remote::{Remote, clean};
use crate::exit::Exit;
use crate::files;

/// The `turnout policy` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make the next policy from the one in force at the coordinator, with
    /// SERVICE's rules changed; sign it and push it (or write it for more
    /// signers with --out).
    Set {
        /// The service whose rules change.
        service: String,
        /// No release of SERVICE below this version may be installed or
        /// rolled back to, on any host.
        #[arg(long)]
        min_version: Option<semver::Version>,
        /// Remove SERVICE's floor.
        #[arg(long, conflicts_with = "min_version")]
        no_floor: bool,
        /// A release version of SERVICE that may never be installed or
        /// rolled back to, whatever bundle carries it; repeat.
        #[arg(long, value_name = "VERSION")]
        revoke: Vec<semver::Version>,
        /// Lift a revocation; repeat.
        #[arg(long, value_name = "VERSION")]
        unrevoke: Vec<semver::Version>,
        /// How long the policy stays fresh: past it, hosts keep its floors
        /// but start no new install until a fresh one arrives.
        #[arg(long, default_value = "90d")]
        expires: humantime::Duration,
        /// A release private key to sign with; repeat up to the trust
        /// file's threshold.
        #[arg(long = "sign-with", value_name = "KEY.pem")]
        sign_with: Vec<PathBuf>,
        /// Write the document here (never overwritten) instead of pushing
        /// it, for other key holders to `policy sign`.
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Add a signature to a policy document, in place.
    Sign {
        /// The policy document.
        file: PathBuf,
        /// A release private key; repeat.
        #[arg(long = "key", value_name = "KEY.pem", required = true)]
        keys: Vec<PathBuf>,
    },
    /// Hand a signed policy document to the coordinator.
    Push {
        /// The policy document.
        file: PathBuf,
        #[command(flatten)]
        remote: Remote,
    },
    /// The policy in force, and the version each host holds.
    Show {
        #[command(flatten)]
        remote: Remote,
    },
}

fn describe(policy: &Policy) -> String {
    format!(
        "policy v{} ({}), fresh until {}",
        policy.version,
        policy.rules_text(),
        policy.expires
    )
}

fn sign_all(file: &mut PolicyFile, keys: &[PathBuf]) -> anyhow::Result<()> {
    for path in keys {
        file.sign(&files::secret_key(path)?);
    }
    Ok(())
}

fn push(remote: &Remote, file: &PolicyFile) -> anyhow::Result<Exit> {
    let bytes = file.to_bytes();
    let answer: Value = remote
        .client()?
        .post_stream("/v1/policy", &mut bytes.as_slice())?;
    if remote.print_json(&answer)? {
        return Ok(Exit::Success);
    }
    println!(
        "the coordinator now serves {}; hosts apply it before their next install or rollback",
        describe(&file.policy)
    );
    Ok(Exit::Success)
}

/// Runs one `turnout policy` subcommand.
pub fn run(command: Command) -> anyhow::Result<Exit> {
    match command {
        Command::Set {
            service,
            min_version,
            no_floor,
            revoke,
            unrevoke,
            expires,
            sign_with,
            out,
            remote,
        } => {
            if sign_with.is_empty() && out.is_none() {
                eprintln!(
                    "turnout: a policy takes effect only when signed by the release keys: give --sign-with KEY.pem \
                     (repeat up to the trust file's threshold), or --out FILE to have other key holders sign it \
                     with `turnout policy sign`"
                );
                return Ok(Exit::Usage);
            }
            let shown: Value = remote.client()?.get("/v1/policy")?;
            let current = shown["document"]
                .as_str()
                .map(|text| PolicyFile::parse(text.as_bytes(), &Limits::default()))
                .transpose()?;
            let now = SystemTime::now();
            let mut services = current
                .as_ref()
                .map(|c| c.policy.services.clone())
                .unwrap_or_default();
            let rules: &mut ServicePolicy = services.entry(service).or_default();
            if let Some(floor) = min_version {
                rules.min_version = Some(floor);
            }
            if no_floor {
                rules.min_version = None;
            }
            rules.revoked.extend(revoke);
            for lifted in &unrevoke {
                rules.revoked.remove(lifted);
            }
            let mut file = PolicyFile::unsigned(Policy {
                format: POLICY_FORMAT,
                version: current.as_ref().map_or(1, |c| c.policy.version + 1),
                created: Timestamp(now),
                expires: Timestamp(now + Duration::from(expires)),
                services,
            });
            sign_all(&mut file, &sign_with)?;
            match out {
                Some(out) => {
                    files::write_atomic(&out, &file.to_bytes(), 0o644, true)?;
                    println!(
                        "wrote {}: {}, {} signature(s); add more with `turnout policy sign {} --key KEY.pem`, then `turnout policy push {}`",
                        out.display(),
                        describe(&file.policy),
                        file.signatures.len(),
                        out.display(),
                        out.display()
                    );
                    Ok(Exit::Success)
                }
                None => push(&remote, &file),
            }
        }
        Command::Sign { file, keys } => {
            let bytes = files::read(&file)?;
            let mut policy = PolicyFile::parse(&bytes, &Limits::default())?;
            sign_all(&mut policy, &keys)?;
            files::write_atomic(&file, &policy.to_bytes(), 0o644, false)?;
            println!(
                "signed {}: {} signature(s) on {}",
                file.display(),
                policy.signatures.len(),
                describe(&policy.policy)
            );
            Ok(Exit::Success)
        }
        Command::Push { file, remote } => {
            let bytes = files::read(&file)?;
            let policy = PolicyFile::parse(&bytes, &Limits::default())?;
            push(&remote, &policy)
        }
        Command::Show { remote } => {
            let shown: Value = remote.client()?.get("/v1/policy")?;
            if remote.print_json(&shown)? {
                return Ok(Exit::Success);
            }
            let policy = shown["document"]
                .as_str()
                .map(|text| PolicyFile::parse(text.as_bytes(), &Limits::default()))
                .transpose()?;
            let Some(policy) = policy else {
                println!("no release policy: no floors, nothing revoked");
                return Ok(Exit::Success);
            };
            println!("{}", describe(&policy.policy));
            let want = policy.policy.version;
            for host in shown["hosts"].as_array().into_iter().flatten() {
                let held = match host["policy_version"].as_u64() {
                    None => "none (an agent before protocol v2, or no report yet)".to_owned(),
                    Some(v) if v == want => format!("v{v}"),
                    Some(v) => format!("v{v} (behind)"),
                };
                println!(
                    "{:<24} {held}",
                    clean(host["id"].as_str().unwrap_or_default())
                );
                if let Some(why) = host["policy_refused"].as_str() {
                    println!("  refused: {}", clean(why));
                }
            }
            Ok(Exit::Success)
        }
    }
}
