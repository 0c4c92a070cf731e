//! `turnout keygen`: a new Ed25519 release key pair.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::anyhow;
use turnout_proto::keys::SecretKey;

use crate::exit::Exit;
use std::os::unix::fs::DirBuilderExt;

use crate::files::{InputError, write_atomic};

/// Arguments of `turnout keygen`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// DIR/NAME: writes DIR/NAME.key.pem (private, mode 0600) and DIR/NAME.pub.pem.
    #[arg(long, value_name = "DIR/NAME")]
    pub out: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

fn with_suffix(base: &Path, suffix: &str) -> PathBuf {
    let mut name = OsString::from(base.as_os_str());
    name.push(suffix);
    PathBuf::from(name)
}

/// Makes the key pair; never overwrites an existing key.
pub fn run(args: &Args) -> anyhow::Result<Exit> {
    let private = with_suffix(&args.out, ".key.pem");
    let public = with_suffix(&args.out, ".pub.pem");
    for path in [&private, &public] {
        if path.exists() {
            return Err(InputError::Exists(path.clone()).into());
        }
    }
    // `--out keys/a` with no `keys/` yet: make it, private to its owner.
    if let Some(dir) = private
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| InputError::Write {
                path: dir.to_owned(),
                cause: source,
            })?;
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)
        .map_err(|err| anyhow!("the system's random source failed: {err}"))?;
    let key = SecretKey::from_seed(seed);
    seed.fill(0);
    write_atomic(&private, key.to_pem().as_bytes(), 0o600, true)?;
    write_atomic(&public, key.public().to_pem().as_bytes(), 0o644, true)?;
    let id = key.public().id().to_string();
    if args.json {
        let out = serde_json::json!({"key_id": id, "private_key": private, "public_key": public});
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("key id {id}");
        println!(
            "private key {} (mode 0600: keep it secret, or in an HSM)",
            private.display()
        );
        println!("public key  {}", public.display());
    }
    Ok(Exit::Success)
}
