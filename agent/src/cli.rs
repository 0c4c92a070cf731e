//! The `turnout-agent` command line: argument types and one function per subcommand.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use turnout_proto::Limits;
use turnout_proto::bundle::{BundleError, Discard, Verified, verify_and_unpack};
use turnout_proto::trust::{Trust, TrustFile};

use crate::exit::Exit;
use crate::stage;

/// Turnout's host agent.
#[derive(Debug, Parser)]
#[command(name = "turnout-agent", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The agent's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show this build's version, protocol versions and capabilities.
    Version {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Verify a bundle as an install would, touching no slot.
    Verify {
        /// The bundle.
        bundle: PathBuf,
        /// The trust file to verify against.
        #[arg(long)]
        trust: PathBuf,
        /// Also unpack the verified payload into this new directory (removed
        /// again if the bundle is refused).
        #[arg(long, value_name = "DIR")]
        unpack_to: Option<PathBuf>,
    },
}

/// Runs one command; the returned value is the process's exit status.
pub fn run(cli: Cli) -> anyhow::Result<Exit> {
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
        Command::Verify {
            bundle,
            trust,
            unpack_to,
        } => verify(&bundle, &trust, unpack_to.as_deref()),
    }
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
