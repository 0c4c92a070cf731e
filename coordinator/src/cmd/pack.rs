//! `turnout pack`: a directory becomes a release bundle.
//!
//! Files are hashed once to build the manifest, then streamed into the bundle
//! while being hashed again, so a file that changes during packing fails the
//! pack instead of producing a bundle no host would accept.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context as _;
use semver::Version;
use sha2::{Digest as _, Sha256};
use turnout_proto::bundle::BundleWriter;
use turnout_proto::manifest::{
    FileEntry, LinkEntry, MANIFEST_FORMAT, Manifest, Mode, PayloadPath, Timestamp,
};
use turnout_proto::signature::SignatureEntry;
use turnout_proto::{Digest, Limits, ServiceName};

use crate::exit::Exit;
use crate::files::{self, InputError, Pending, human_bytes};

/// Arguments of `turnout pack`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The directory holding the release's files (becomes `payload/`).
    pub dir: PathBuf,
    /// The release's name, usually the service's.
    #[arg(long)]
    pub name: ServiceName,
    /// The release's semantic version.
    #[arg(long)]
    pub version: Version,
    /// The executable the service runs, relative to DIR.
    #[arg(long, value_parser = parse_path)]
    pub entry: PayloadPath,
    /// Hosts refuse the bundle after this long, e.g. `90d`.
    #[arg(long, value_name = "DURATION")]
    pub expires: Option<humantime::Duration>,
    /// A compatibility tag this release offers, e.g. `api/v2`; repeatable.
    #[arg(long)]
    pub provides: Vec<String>,
    /// A compatibility tag this release needs, e.g. `db/v3`; repeatable.
    #[arg(long)]
    pub requires: Vec<String>,
    /// A private key to sign with; repeatable. Without one the bundle is
    /// unsigned, for signing later (`turnout sign`, an HSM, openssl).
    #[arg(long = "key", value_name = "KEY.pem")]
    pub keys: Vec<PathBuf>,
    /// Where to write the bundle; default `NAME-VERSION.tnt`. Never overwritten.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

fn parse_path(text: &str) -> Result<PayloadPath, String> {
    PayloadPath::new(text)
}

/// A payload member found in the directory.
enum Item {
    File { entry: FileEntry, source: PathBuf },
    Link(LinkEntry),
}

fn invalid(path: &Path, detail: impl Into<String>) -> InputError {
    InputError::Invalid {
        path: path.to_owned(),
        detail: detail.into(),
    }
}

fn sha256_of(reader: &mut impl Read) -> io::Result<(Digest, u64)> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 256 * 1024];
    let mut total = 0;
    loop {
        let n = reader.read(&mut buffer)?;
        if n == 0 {
            return Ok((Digest::from_bytes(hasher.finalize().into()), total));
        }
        hasher.update(&buffer[..n]);
        total += n as u64;
    }
}

/// Walks `dir` in name order, collecting files and links by payload path.
fn walk(root: &Path, dir: &Path, items: &mut BTreeMap<PayloadPath, Item>) -> anyhow::Result<()> {
    let mut children: Vec<_> = fs::read_dir(dir)
        .map_err(|source| InputError::Read {
            path: dir.to_owned(),
            cause: source,
        })?
        .collect::<Result<_, _>>()?;
    children.sort_by_key(|entry| entry.file_name());
    for child in children {
        let source = child.path();
        let relative = source.strip_prefix(root).expect("walk stays under root");
        let relative = relative.to_str().ok_or_else(|| {
            invalid(
                &source,
                "the file name is not UTF-8; bundles use UTF-8 paths",
            )
        })?;
        let path = PayloadPath::new(relative).map_err(|detail| invalid(&source, detail))?;
        let meta = fs::symlink_metadata(&source)?;
        let kind = meta.file_type();
        if kind.is_dir() {
            walk(root, &source, items)?;
        } else if kind.is_symlink() {
            let target = fs::read_link(&source)?;
            let target = target
                .to_str()
                .ok_or_else(|| invalid(&source, "the link target is not UTF-8"))?
                .to_owned();
            if path.resolve_link(&target).is_none() {
                return Err(invalid(
                    &source,
                    format!("the link points outside {} ({target})", root.display()),
                )
                .into());
            }
            items.insert(path.clone(), Item::Link(LinkEntry { path, target }));
        } else if kind.is_file() {
            let bits = meta.permissions().mode() & 0o7777;
            let mode = Mode::new(bits).ok_or_else(|| {
                invalid(
                    &source,
                    format!("mode {bits:04o} has setuid, setgid or sticky bits; a bundle may not grant privileges (chmod them off)"),
                )
            })?;
            let mut file = File::open(&source).map_err(|err| InputError::Read {
                path: source.clone(),
                cause: err,
            })?;
            let (sha256, size) = sha256_of(&mut file)?;
            let entry = FileEntry {
                path: path.clone(),
                size,
                sha256,
                mode,
            };
            items.insert(path, Item::File { entry, source });
        } else {
            let what = if kind.is_fifo() {
                "a FIFO"
            } else if kind.is_socket() {
                "a socket"
            } else {
                "a device node"
            };
            return Err(invalid(
                &source,
                format!("{what}; a bundle holds only files, directories and symlinks"),
            )
            .into());
        }
    }
    Ok(())
}

/// Packs, signs and writes the bundle.
pub fn run(args: &Args) -> anyhow::Result<Exit> {
    let keys = args
        .keys
        .iter()
        .map(|path| files::secret_key(path))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (manifest, out, signatures) = pack(args, &keys)?;
    let size = fs::metadata(&out)?.len();
    println!(
        "packed {} {}: {} files, {} payload, bundle {} ({}), {}",
        manifest.name,
        manifest.version,
        manifest.files.len(),
        human_bytes(manifest.payload_bytes()),
        out.display(),
        human_bytes(size),
        match signatures {
            0 => "unsigned".to_owned(),
            n => format!("{n} signature(s)"),
        }
    );
    Ok(Exit::Success)
}

/// `args.provides`, and for an agent bundle (`--name turnout-agent`) the
/// protocol range its entry says it speaks (`turnout-proto/1-2`, from
/// `ENTRY version --json`), so that `turnout rollout plan` can warn before
/// agents are upgraded to one that could not talk to the coordinator.
fn with_agent_proto(args: &Args) -> Vec<String> {
    let mut provides = args.provides.clone();
    if args.name.as_str() != crate::coordinator::AGENT_SERVICE
        || provides.iter().any(|p| p.starts_with("turnout-proto/"))
    {
        return provides;
    }
    let entry = args.dir.join(args.entry.as_str());
    let asked = std::process::Command::new(&entry)
        .args(["version", "--json"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output();
    let said: Option<serde_json::Value> = asked
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| serde_json::from_slice(&o.stdout).ok());
    let range = said.as_ref().and_then(|v| {
        serde_json::from_value::<turnout_proto::ProtoRange>(v.get("range")?.clone()).ok()
    });
    // The release's version is what the fleet sees in rollouts; the
    // binary's own is what it says in its hello. Two numbers for one agent
    // confuse everyone: say so.
    if let Some(software) = said.as_ref().and_then(|v| v.get("software")?.as_str())
        && software != format!("turnout-agent {}", args.version)
    {
        eprintln!(
            "turnout: warning: the entry says it is {software:?}, but this release is version {}: hosts will \
             report {} as the release and the binary's own version in their hello; build the agent with the \
             version you pack it as",
            args.version, args.version
        );
    }
    match range {
        Some(range) => provides.push(format!(
            "turnout-proto/{}-{}",
            range.min().get(),
            range.max().get()
        )),
        None => eprintln!(
            "turnout: warning: could not run `{} version --json` to learn which protocol versions this agent \
             speaks; add --provides turnout-proto/MIN-MAX so that `turnout rollout plan` can check it",
            entry.display()
        ),
    }
    provides
}

/// Packs `args.dir` into a bundle signed by `keys`; returns the manifest,
/// where the bundle went, and how many signatures it has.
pub fn pack(
    args: &Args,
    keys: &[turnout_proto::keys::SecretKey],
) -> anyhow::Result<(Manifest, PathBuf, usize)> {
    let meta = fs::metadata(&args.dir).map_err(|source| InputError::Read {
        path: args.dir.clone(),
        cause: source,
    })?;
    if !meta.is_dir() {
        return Err(invalid(&args.dir, "expected a directory of release files").into());
    }
    let mut items = BTreeMap::new();
    walk(&args.dir, &args.dir, &mut items)?;

    let now = SystemTime::now();
    let mut manifest = Manifest {
        format: MANIFEST_FORMAT,
        name: args.name.clone(),
        version: args.version.clone(),
        created: Timestamp(now),
        expires: args.expires.map(|d| Timestamp(now + *d)),
        entry: args.entry.clone(),
        files: Vec::new(),
        links: Vec::new(),
        provides: with_agent_proto(args),
        requires: args.requires.clone(),
        extra: BTreeMap::new(),
    };
    for item in items.values() {
        match item {
            Item::File { entry, .. } => manifest.files.push(entry.clone()),
            Item::Link(link) => manifest.links.push(link.clone()),
        }
    }
    manifest.validate(&Limits::default()).map_err(|err| {
        anyhow::Error::new(err).context(format!("packing {}", args.dir.display()))
    })?;
    let manifest_bytes = serde_json::to_vec_pretty(&manifest)?;

    let mut signatures = Vec::new();
    for key in keys {
        signatures.push(SignatureEntry {
            key_id: key.public().id().clone(),
            sig: key.sign(&manifest_bytes),
        });
    }

    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}-{}.tnt", args.name, args.version)));
    if out.exists() {
        return Err(InputError::Exists(out).into());
    }
    let mut pending =
        Pending::create(&out, 0o644).with_context(|| format!("creating {}", out.display()))?;
    let buffered = BufWriter::with_capacity(256 * 1024, pending.file());
    let mut writer = BundleWriter::new(buffered, &manifest_bytes, &signatures)?;
    for item in items.values() {
        match item {
            Item::File { entry, source } => {
                let file = File::open(source)?;
                let mut hashing = HashingReader {
                    inner: file,
                    hasher: Sha256::new(),
                };
                writer.file(&entry.path, entry.mode, entry.size, &mut hashing)?;
                if Digest::from_bytes(hashing.hasher.finalize().into()) != entry.sha256 {
                    return Err(invalid(
                        source,
                        "the file changed while it was being packed; pack again",
                    )
                    .into());
                }
            }
            Item::Link(link) => writer.symlink(&link.path, &link.target)?,
        }
    }
    writer.finish()?.flush()?;
    pending.commit(true)?;
    Ok((manifest, out, signatures.len()))
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}
