//! `turnout director rotate|status`: the key the coordinator signs desired
//! state with, on the coordinator's machine (it works on the state
//! directory, as `turnout ca` does).

use std::path::PathBuf;

use clap::Subcommand;
use turnout_proto::desired::Handover;
use turnout_proto::keys::SecretKey;

use crate::coordinator::{handovers_path, load_handovers};
use crate::exit::Exit;
use crate::files;

/// `turnout director …`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make a new director key and hand over to it: the old key signs the
    /// new one, a running coordinator signs with the new key within 5 s,
    /// and each host takes it through the handover at its next answer (no
    /// host enrolls again) and then drops the old key.
    Rotate {
        /// The coordinator's state directory.
        #[arg(long, default_value = "/var/lib/turnout-coordinator")]
        state_dir: PathBuf,
    },
    /// The director key in use and the handovers that lead to it.
    Status {
        /// The coordinator's state directory.
        #[arg(long, default_value = "/var/lib/turnout-coordinator")]
        state_dir: PathBuf,
    },
}

fn current(state_dir: &std::path::Path) -> anyhow::Result<Option<(PathBuf, SecretKey)>> {
    let path = state_dir.join("director.pem");
    if !path.exists() {
        eprintln!(
            "turnout: {} is missing: expected the state directory of a coordinator that has run (`turnout serve` \
             makes its director key at its first start); check --state-dir",
            path.display()
        );
        return Ok(None);
    }
    Ok(Some((path.clone(), files::secret_key(&path)?)))
}

/// Runs a director command.
pub fn run(command: Command) -> anyhow::Result<Exit> {
    match command {
        Command::Rotate { state_dir } => {
            // Two rotations at once would each hand over from the same key,
            // and one handover would be lost: they take turns.
            let lock = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(state_dir.join("director.lock"))?;
            lock.lock()?;
            let Some((path, old)) = current(&state_dir)? else {
                return Ok(Exit::Input);
            };
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed)
                .map_err(|err| anyhow::anyhow!("no randomness for the new director key: {err}"))?;
            let new = SecretKey::from_seed(seed);
            let mut handovers = load_handovers(&path)?;
            handovers.push(Handover::make(&old, &new.public()));
            // The handover first: a stop between the two writes leaves the
            // old key in use and a handover no host acts on yet.
            files::write_atomic(
                &handovers_path(&path),
                &serde_json::to_vec_pretty(&handovers)?,
                0o644,
                false,
            )?;
            files::write_atomic(&path, new.to_pem().as_bytes(), 0o600, false)?;
            println!(
                "director key {} handed over to {}: a running coordinator signs with the new key within 5 s; hosts \
                 take it through the handover at their next answer and then drop the old key",
                old.public().id(),
                new.public().id()
            );
            Ok(Exit::Success)
        }
        Command::Status { state_dir } => {
            let Some((path, key)) = current(&state_dir)? else {
                return Ok(Exit::Input);
            };
            println!("director key {} ({})", key.public().id(), path.display());
            for handover in load_handovers(&path)? {
                let new = turnout_proto::keys::PublicKey::from_pem(&handover.key)?;
                println!("  handed over from {} to {}", handover.by, new.id());
            }
            Ok(Exit::Success)
        }
    }
}
