//! `turnout trust init|rotate|verify|push|status`: the files that say which
//! keys hosts accept, and their rotation through the coordinator to hosts.

use std::path::PathBuf;
use std::time::SystemTime;

use clap::Subcommand;
use turnout_proto::keys::PublicKey;
use turnout_proto::signature::SignatureEntry;
use turnout_proto::trust::{Trust, TrustFile};

use crate::cmd::remote::{Remote, clean};
use crate::exit::Exit;
use crate::files;

/// The `turnout trust` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make a first trust file (version 1) from public keys.
    Init {
        /// A trusted public key (SPKI PEM); repeat for each key.
        #[arg(long = "key", value_name = "PUB.pem", required = true)]
        keys: Vec<PathBuf>,
        /// How many distinct keys must sign a bundle [default with one key: 1;
        /// with several, say how many: it is a security decision].
        #[arg(long)]
        threshold: Option<usize>,
        /// Where to write the trust file; never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Make the next trust file: the full new key set and threshold, signed
    /// by a threshold of the current keys and of the new keys.
    Rotate {
        /// The trust file hosts have now.
        #[arg(long)]
        current: PathBuf,
        /// A public key of the new set; repeat for each key.
        #[arg(long = "key", value_name = "PUB.pem", required = true)]
        keys: Vec<PathBuf>,
        /// The new threshold.
        #[arg(long)]
        threshold: usize,
        /// A private key to sign the rotation with (current or new); repeat.
        #[arg(long = "sign-with", value_name = "KEY.pem", required = true)]
        sign_with: Vec<PathBuf>,
        /// Where to write the new trust file; never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Check that NEXT may replace CURRENT, as a host would.
    Verify {
        /// The new trust file.
        next: PathBuf,
        /// The trust file hosts have now.
        #[arg(long)]
        current: PathBuf,
    },
    /// Hand a rotation (made by `trust rotate`) to the coordinator: it
    /// checks it against the trust it applies, checks bundles against it
    /// from now on, and serves it to hosts, which apply it only if it passes
    /// the same rules (within 5 minutes at a 10 s report interval).
    Push {
        /// The new trust file.
        file: PathBuf,
        #[command(flatten)]
        remote: Remote,
    },
    /// The coordinator's release trust, and the version each host applies.
    Status {
        #[command(flatten)]
        remote: Remote,
    },
}

fn public_keys(paths: &[PathBuf]) -> anyhow::Result<Vec<PublicKey>> {
    paths.iter().map(|path| files::public_key(path)).collect()
}

fn describe(trust: &Trust) -> String {
    let ids: Vec<_> = trust.keys().keys().map(|id| id.as_str()).collect();
    format!(
        "trust version {}: {} of {} keys required ({})",
        trust.version(),
        trust.threshold(),
        ids.len(),
        ids.join(", ")
    )
}

/// Runs one `turnout trust` subcommand.
pub fn run(command: Command) -> anyhow::Result<Exit> {
    match command {
        Command::Init {
            keys,
            threshold,
            out,
        } => {
            let threshold = match (threshold, keys.len()) {
                (Some(threshold), _) => threshold,
                (None, 1) => 1,
                (None, n) => {
                    return Err(files::InputError::Invalid {
                        path: keys[0].clone(),
                        detail: format!(
                            "{n} keys given and no --threshold: say how many of them must sign each bundle, e.g. --threshold 2"
                        ),
                    }
                    .into());
                }
            };
            let trust = Trust::new(1, threshold, SystemTime::now(), public_keys(&keys)?)?;
            let file = TrustFile::unsigned(trust);
            files::write_atomic(&out, &file.to_bytes(), 0o644, true)?;
            println!("wrote {}: {}", out.display(), describe(&file.trust));
        }
        Command::Rotate {
            current,
            keys,
            threshold,
            sign_with,
            out,
        } => {
            let current = files::trust_file(&current)?;
            let next = Trust::new(
                current.trust.version() + 1,
                threshold,
                SystemTime::now(),
                public_keys(&keys)?,
            )?;
            let mut file = TrustFile::unsigned(next);
            for path in &sign_with {
                let key = files::secret_key(path)?;
                file.signatures.push(SignatureEntry {
                    key_id: key.public().id().clone(),
                    sig: key.sign(&file.signed_bytes),
                });
            }
            // Never write a file hosts would refuse.
            current.trust.accept_rotation(&file)?;
            files::write_atomic(&out, &file.to_bytes(), 0o644, true)?;
            println!("wrote {}: {}", out.display(), describe(&file.trust));
        }
        Command::Verify { next, current } => {
            let current = files::trust_file(&current)?;
            let next_file = files::trust_file(&next)?;
            current.trust.accept_rotation(&next_file)?;
            println!(
                "OK {} may replace trust version {}: {}",
                next.display(),
                current.trust.version(),
                describe(&next_file.trust)
            );
        }
        Command::Push { file, remote } => {
            let parsed = files::trust_file(&file)?;
            let answer: serde_json::Value = remote
                .client()?
                .post_stream("/v1/trust", &mut std::fs::File::open(&file)?)?;
            if remote.print_json(&answer)? {
                return Ok(Exit::Success);
            }
            println!(
                "the coordinator now applies {} (was version {}); hosts apply it at their next check",
                describe(&parsed.trust),
                answer["replaced"]
            );
        }
        Command::Status { remote } => {
            let status: serde_json::Value = remote.client()?.get("/v1/trust")?;
            if remote.print_json(&status)? {
                return Ok(Exit::Success);
            }
            let keys: Vec<&str> = status["keys"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|k| k.as_str())
                .collect();
            println!(
                "coordinator: trust version {}: {} of {} keys required ({}); {} rotation(s) served",
                status["version"],
                status["threshold"],
                keys.len(),
                keys.join(", "),
                status["rotations"]
            );
            let want = status["version"].as_u64();
            for host in status["hosts"].as_array().into_iter().flatten() {
                let version = host["trust_version"].as_u64();
                let mark = match version {
                    None => "unknown (an agent before protocol v2, or no report yet)".to_owned(),
                    Some(v) if Some(v) == want => format!("version {v}"),
                    Some(v) => format!("version {v} (behind)"),
                };
                println!(
                    "{:<24} {mark}",
                    clean(host["id"].as_str().unwrap_or_default())
                );
                if let Some(why) = host["trust_refused"].as_str() {
                    println!("  refused: {}", clean(why));
                }
            }
        }
    }
    Ok(Exit::Success)
}
