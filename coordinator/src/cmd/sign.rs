//! `turnout sign`: add signatures to a bundle, in place and atomically.
//!
//! With `--key`, turnout signs. With `--signature FILE --public-key PUB.pem`
//! it adds a signature made elsewhere (openssl, an HSM, a cloud KMS) over the
//! exact bytes of the bundle's `manifest.json`, after checking it verifies.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::ArgGroup;
use turnout_proto::Limits;
use turnout_proto::bundle::{read_head, rewrite_signatures};
use turnout_proto::keys::RawSignature;
use turnout_proto::signature::SignatureEntry;

use crate::exit::Exit;
use crate::files::{self, InputError, Pending};

/// Arguments of `turnout sign`.
#[derive(Debug, clap::Args)]
#[command(group(ArgGroup::new("how").required(true).args(["keys", "signature"])))]
pub struct Args {
    /// The bundle to sign; replaced atomically.
    pub bundle: PathBuf,
    /// A private key to sign with; repeatable.
    #[arg(long = "key", value_name = "KEY.pem")]
    pub keys: Vec<PathBuf>,
    /// A signature made elsewhere over the exact bytes of manifest.json
    /// (64 raw bytes, as `openssl pkeyutl -sign -rawin` writes, or base64).
    #[arg(long, value_name = "FILE", requires = "public_key")]
    pub signature: Option<PathBuf>,
    /// The public key of the external signature (its key id is derived from it).
    #[arg(long, value_name = "PUB.pem", requires = "signature")]
    pub public_key: Option<PathBuf>,
}

/// Adds the signatures; a key's earlier signature is replaced, not doubled.
pub fn run(args: &Args) -> anyhow::Result<Exit> {
    let limits = Limits::default();
    let open = || {
        File::open(&args.bundle)
            .map(BufReader::new)
            .map_err(|source| InputError::Read {
                path: args.bundle.clone(),
                cause: source,
            })
    };
    let head = read_head(open()?, &limits)
        .with_context(|| format!("reading {}", args.bundle.display()))?;

    let mut added = Vec::new();
    for path in &args.keys {
        let key = files::secret_key(path)?;
        added.push(SignatureEntry {
            key_id: key.public().id().clone(),
            sig: key.sign(&head.manifest_bytes),
        });
    }
    if let (Some(signature), Some(public)) = (&args.signature, &args.public_key) {
        let key = files::public_key(public)?;
        let sig = RawSignature::from_file_bytes(&files::read(signature)?).map_err(|detail| {
            InputError::Invalid {
                path: signature.clone(),
                detail,
            }
        })?;
        if !key.verifies(&head.manifest_bytes, &sig) {
            bail!(InputError::Invalid {
                path: signature.clone(),
                detail: format!(
                    "this signature does not verify with key {} over the manifest of {}; it must be \
                     made over the exact bytes of its manifest.json (`tar -xOf BUNDLE manifest.json`)",
                    key.id(),
                    args.bundle.display()
                ),
            });
        }
        added.push(SignatureEntry {
            key_id: key.id().clone(),
            sig,
        });
    }

    let mut signatures = head.signatures;
    for entry in &added {
        signatures.retain(|existing| existing.key_id != entry.key_id);
        signatures.push(entry.clone());
    }
    let mut pending = Pending::create(&args.bundle, 0o644)?;
    let out = BufWriter::with_capacity(256 * 1024, pending.file());
    rewrite_signatures(open()?, out, &signatures, &limits)?.flush()?;
    pending.commit(false)?;

    let added: Vec<_> = added.iter().map(|s| s.key_id.as_str()).collect();
    let all: Vec<_> = signatures.iter().map(|s| s.key_id.as_str()).collect();
    println!(
        "signed {} {} with {}; signatures now: {}",
        head.manifest.name,
        head.manifest.version,
        added.join(", "),
        all.join(", ")
    );
    Ok(Exit::Success)
}
