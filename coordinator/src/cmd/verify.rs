//! `turnout verify`: check a bundle against a trust file exactly as a host
//! would, reading it once and keeping nothing.

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;
use std::time::SystemTime;

use turnout_proto::Limits;
use turnout_proto::bundle::{Discard, verify_and_unpack};

use crate::exit::{Exit, classify};
use crate::files::{self, InputError, human_bytes};

/// Arguments of `turnout verify`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The bundle to verify.
    pub bundle: PathBuf,
    /// The trust file hosts use.
    #[arg(long)]
    pub trust: PathBuf,
    /// Print JSON instead of text (also for a rejected bundle).
    #[arg(long)]
    pub json: bool,
}

/// Verifies; exit 0 when valid, 4 with the failed rule when not.
pub fn run(args: &Args) -> anyhow::Result<Exit> {
    let trust = files::trust_file(&args.trust)?.trust;
    let file = File::open(&args.bundle).map_err(|source| InputError::Read {
        path: args.bundle.clone(),
        cause: source,
    })?;
    let reader = BufReader::with_capacity(256 * 1024, file);
    match verify_and_unpack(
        reader,
        &trust,
        SystemTime::now(),
        &Limits::default(),
        &mut Discard,
    ) {
        Ok(verified) => {
            let m = &verified.manifest;
            let signed_by: Vec<_> = verified.signed_by.iter().map(|id| id.as_str()).collect();
            if args.json {
                let out = serde_json::json!({
                    "valid": true,
                    "name": m.name,
                    "version": m.version.to_string(),
                    "files": m.files.len(),
                    "payload_bytes": m.payload_bytes(),
                    "signed_by": signed_by,
                    "threshold": trust.threshold(),
                    "expires": m.expires.map(|t| t.to_string()),
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!(
                    "OK {} {}: {} files, {}, signed by {} of {} required keys ({}){}",
                    m.name,
                    m.version,
                    m.files.len(),
                    human_bytes(m.payload_bytes()),
                    signed_by.len(),
                    trust.threshold(),
                    signed_by.join(", "),
                    m.expires
                        .map(|t| format!(", expires {t}"))
                        .unwrap_or_default()
                );
            }
            Ok(Exit::Success)
        }
        Err(err) => {
            let err =
                anyhow::Error::new(err).context(format!("{} rejected", args.bundle.display()));
            if !args.json {
                return Err(err);
            }
            let out = serde_json::json!({"valid": false, "reason": format!("{:#}", err)});
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(classify(&err))
        }
    }
}
