//! Release bundles (`NAME-VERSION.tnt`): the streaming verifier and the writer.
//!
//! A bundle is a tar archive, in this order:
//!
//! | member            | what                                                    |
//! |-------------------|---------------------------------------------------------|
//! | `manifest.json`   | the [`Manifest`], exactly the bytes that were signed    |
//! | `signatures.json` | a JSON list of `{key_id, sig}` over `manifest.json`     |
//! | `payload/…`       | the files and links the manifest lists, in any order    |
//!
//! [`verify_and_unpack`] reads a bundle from any `Read` in one pass:
//! 1. read `manifest.json` and `signatures.json` (bounded by [`Limits`]);
//! 2. check the signatures over the exact manifest bytes against the trust,
//!    the manifest's rules and its expiry, before any payload byte is written;
//! 3. stream each payload member into the [`Sink`] while hashing it, checking
//!    it is listed, of the listed kind and size, and then of the listed digest;
//! 4. check that nothing listed was missing.
//!
//! Any failure is a [`BundleError`]; the sink's owner discards what was
//! written (the agent removes its staging directory), so a rejected bundle
//! leaves nothing behind.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::time::SystemTime;

use sha2::{Digest as _, Sha256};

use crate::ids::Digest;
use crate::keys::KeyId;
use crate::limits::Limits;
use crate::manifest::{FileEntry, LinkEntry, Manifest, ManifestError, Mode, PayloadPath};
use crate::signature::{SignatureEntry, SignatureError, check_threshold};
use crate::trust::Trust;

/// The first member's name.
pub const MANIFEST_MEMBER: &str = "manifest.json";
/// The second member's name.
pub const SIGNATURES_MEMBER: &str = "signatures.json";
/// The directory every payload member is under.
pub const PAYLOAD_DIR: &str = "payload";

/// Where verified payload members go. Paths are validated [`PayloadPath`]s;
/// the sink decides what they are relative to.
pub trait Sink {
    /// A directory member (parents of files may also arrive without one).
    fn dir(&mut self, path: &PayloadPath) -> io::Result<()>;
    /// A regular file; `data` yields exactly its content. The file's digest is
    /// checked after this returns, so a sink must not make it visible yet.
    fn file(&mut self, path: &PayloadPath, mode: Mode, data: &mut dyn Read) -> io::Result<()>;
    /// A symbolic link whose target already was checked to stay in the payload.
    fn symlink(&mut self, path: &PayloadPath, target: &str) -> io::Result<()>;
}

/// A sink that keeps nothing: verification only.
#[derive(Debug, Default)]
pub struct Discard;

impl Sink for Discard {
    fn dir(&mut self, _: &PayloadPath) -> io::Result<()> {
        Ok(())
    }

    fn file(&mut self, _: &PayloadPath, _: Mode, data: &mut dyn Read) -> io::Result<()> {
        io::copy(data, &mut io::sink()).map(drop)
    }

    fn symlink(&mut self, _: &PayloadPath, _: &str) -> io::Result<()> {
        Ok(())
    }
}

/// The first two members of a bundle, unverified: what `inspect` shows.
#[derive(Debug, Clone)]
pub struct Head {
    /// The parsed manifest (its own rules checked, signatures not).
    pub manifest: Manifest,
    /// The exact bytes of `manifest.json`.
    pub manifest_bytes: Vec<u8>,
    /// The signatures as listed.
    pub signatures: Vec<SignatureEntry>,
}

/// A bundle that passed every check.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The manifest.
    pub manifest: Manifest,
    /// The exact bytes of `manifest.json`.
    pub manifest_bytes: Vec<u8>,
    /// The trusted keys whose signatures verified.
    pub signed_by: Vec<KeyId>,
    /// Bytes read from the bundle.
    pub bundle_bytes: u64,
}

/// Why a bundle was rejected. Each says what was expected, what was found,
/// and, where it helps, what to do.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Zero bytes.
    #[error("the bundle is empty (0 bytes); expected a tar archive made by `turnout pack`")]
    Empty,
    /// The first header is not a tar header.
    #[error(
        "not a Turnout bundle: the start is not a tar header ({detail}); expected a .tnt made by `turnout pack`"
    )]
    NotATar {
        /// The tar reader's complaint.
        detail: String,
    },
    /// The data ends inside a member.
    #[error("the bundle is truncated: it ends inside {member}; fetch it again")]
    Truncated {
        /// The member being read.
        member: String,
    },
    /// A later header or block is damaged.
    #[error("the bundle is corrupt at {member}: {detail}")]
    Corrupt {
        /// The member being read.
        member: String,
        /// The tar reader's complaint.
        detail: String,
    },
    /// Reading failed for a reason other than the bundle's content.
    #[error("reading the bundle failed: {0}")]
    Read(#[source] io::Error),
    /// More bytes than `Limits::max_bundle_bytes`.
    #[error("the bundle is larger than the limit of {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// The first two members are not `manifest.json` and `signatures.json`.
    #[error("expected {expected} as member {position} of the bundle, found {found}")]
    MissingMember {
        /// The expected name.
        expected: &'static str,
        /// 1 or 2.
        position: u8,
        /// What was there.
        found: String,
    },
    /// The manifest breaks a rule, or has expired.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// `signatures.json` is not a list of `{key_id, sig}`, or too large.
    #[error("signatures.json is not valid: {detail}")]
    SignaturesMalformed {
        /// What was wrong.
        detail: String,
    },
    /// Not enough valid signatures by trusted keys.
    #[error(transparent)]
    Signature(#[from] SignatureError),
    /// A member after the first two that is not under `payload/`.
    #[error(
        "member {member:?} is outside payload/; a bundle holds only manifest.json, signatures.json and payload/"
    )]
    OutsidePayload {
        /// The member's name.
        member: String,
    },
    /// A member name that is absolute, has `..`, or is not UTF-8.
    #[error("member {member:?}: {detail}")]
    UnsafePath {
        /// The member's name, lossily decoded.
        member: String,
        /// The rule it broke.
        detail: String,
    },
    /// The same payload path twice.
    #[error("payload/{path} appears twice in the bundle")]
    DuplicateMember {
        /// The path.
        path: PayloadPath,
    },
    /// A payload member the manifest does not list (as this kind).
    #[error("payload/{path} ({kind}) is not listed in the manifest")]
    Unlisted {
        /// The path.
        path: PayloadPath,
        /// "file", "directory" or "symlink".
        kind: &'static str,
    },
    /// A manifest entry with no payload member.
    #[error("the manifest lists {path}, but the bundle has no payload/{path}")]
    Missing {
        /// The path.
        path: PayloadPath,
    },
    /// A member's size differs from the manifest's.
    #[error("payload/{path} is {archive} bytes in the bundle, but the manifest says {manifest}")]
    SizeMismatch {
        /// The path.
        path: PayloadPath,
        /// The manifest's size.
        manifest: u64,
        /// The member's size.
        archive: u64,
    },
    /// A member's content differs from the manifest's digest.
    #[error(
        "payload/{path} has sha256 {actual}, but the manifest says {manifest}: the payload was altered"
    )]
    DigestMismatch {
        /// The path.
        path: PayloadPath,
        /// The manifest's digest.
        manifest: Digest,
        /// The content's digest.
        actual: Digest,
    },
    /// A symlink whose target differs from the manifest's.
    #[error(
        "payload/{path} links to {archive:?} in the bundle, but the manifest says {manifest:?}"
    )]
    LinkMismatch {
        /// The path.
        path: PayloadPath,
        /// The manifest's target.
        manifest: String,
        /// The member's target.
        archive: String,
    },
    /// A hard link (never made by `turnout pack`, and a classic escape).
    #[error("payload/{path} is a hard link to {target:?}; bundles may not contain hard links")]
    HardLink {
        /// The path.
        path: PayloadPath,
        /// Its target.
        target: String,
    },
    /// A device node, FIFO or other special member.
    #[error("payload/{path} is a {kind}; bundles hold only files, directories and symlinks")]
    SpecialFile {
        /// The path.
        path: PayloadPath,
        /// What it is.
        kind: String,
    },
    /// Bytes after the archive's end: the same signed content with a new
    /// file digest, which nobody's `turnout pack` made.
    #[error(
        "the archive's end is followed by {found} byte(s) where exactly {BLOCK} zero bytes were expected: bytes were added after `turnout pack` (a re-packed or tampered copy); fetch the bundle as it was packed"
    )]
    TrailingData {
        /// How many bytes follow the first end block (up to about 1 MiB counted).
        found: u64,
    },
    /// The sink could not store a member (e.g. the disk is full).
    #[error("writing payload/{path} failed: {source}")]
    Sink {
        /// The path.
        path: PayloadPath,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

impl BundleError {
    /// Whether the bundle itself was refused (its content broke a rule), as
    /// opposed to reading or writing failing: a refusal is not retried.
    pub fn is_refusal(&self) -> bool {
        !matches!(self, BundleError::Read(_) | BundleError::Sink { .. })
    }
}

/// Counts bytes read, refuses to read past the limit, and notes end of input.
struct Counted<'a, R> {
    inner: R,
    input: &'a Input,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let input = self.input;
        if n == 0 && !buf.is_empty() {
            input.eof.set(true);
        }
        input.count.set(input.count.get() + n as u64);
        if input.count.get() > input.limit {
            // The tar reader may rewrap this error; the flag survives that.
            input.over_limit.set(true);
            return Err(io::Error::other("the bundle is over its size limit"));
        }
        Ok(n)
    }
}

/// Hashes and counts what passes through, and remembers whether a read failed
/// (so a read error surfacing through the sink is not blamed on the sink).
struct Hashing<'a, R> {
    inner: &'a mut R,
    hasher: Sha256,
    count: u64,
    read_failed: bool,
}

impl<R: Read> Read for Hashing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self
            .inner
            .read(buf)
            .inspect_err(|_| self.read_failed = true)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Reading state shared by the steps: byte count, end of input, the limit.
struct Input {
    count: Cell<u64>,
    eof: Cell<bool>,
    over_limit: Cell<bool>,
    limit: u64,
}

impl Input {
    fn new(limits: &Limits) -> Input {
        Input {
            count: Cell::new(0),
            eof: Cell::new(false),
            over_limit: Cell::new(false),
            limit: limits.max_bundle_bytes,
        }
    }

    fn wrap<R: Read>(&self, reader: R) -> Counted<'_, R> {
        Counted {
            inner: reader,
            input: self,
        }
    }

    /// Classifies an I/O error met while reading `member`.
    fn error(&self, err: io::Error, member: &str) -> BundleError {
        if self.over_limit.get() {
            return BundleError::TooLarge { limit: self.limit };
        }
        if self.count.get() == 0 {
            BundleError::Empty
        } else if self.eof.get() || err.kind() == io::ErrorKind::UnexpectedEof {
            BundleError::Truncated {
                member: member.to_owned(),
            }
        } else if err.kind() == io::ErrorKind::Other || err.kind() == io::ErrorKind::InvalidData {
            if member == MANIFEST_MEMBER {
                BundleError::NotATar {
                    detail: err.to_string(),
                }
            } else {
                BundleError::Corrupt {
                    member: member.to_owned(),
                    detail: err.to_string(),
                }
            }
        } else {
            BundleError::Read(err)
        }
    }
}

/// Reads one head member completely: its name and type must match, its size
/// must be within `limit`.
fn read_head_member<R: Read>(
    input: &Input,
    entries: &mut tar::Entries<'_, R>,
    expected: &'static str,
    position: u8,
    limit: u64,
) -> Result<Vec<u8>, BundleError> {
    let missing = |found: String| BundleError::MissingMember {
        expected,
        position,
        found,
    };
    let mut entry = match entries.next() {
        None if input.count.get() == 0 => return Err(BundleError::Empty),
        None => return Err(missing("the end of the archive".into())),
        Some(Err(err)) => return Err(input.error(err, expected)),
        Some(Ok(entry)) => entry,
    };
    let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
    if name != expected || !entry.header().entry_type().is_file() {
        return Err(missing(format!("{name:?}")));
    }
    let size = entry.size();
    if size > limit {
        return Err(match expected {
            MANIFEST_MEMBER => ManifestError::TooLarge { size, limit }.into(),
            _ => BundleError::SignaturesMalformed {
                detail: format!("it is {size} bytes, over the limit of {limit}"),
            },
        });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    entry
        .read_to_end(&mut bytes)
        .map_err(|err| input.error(err, expected))?;
    if (bytes.len() as u64) < size {
        return Err(BundleError::Truncated {
            member: expected.into(),
        });
    }
    Ok(bytes)
}

fn read_head_from<R: Read>(
    input: &Input,
    entries: &mut tar::Entries<'_, R>,
    limits: &Limits,
) -> Result<Head, BundleError> {
    let manifest_bytes = read_head_member(
        input,
        entries,
        MANIFEST_MEMBER,
        1,
        limits.max_manifest_bytes,
    )?;
    let manifest = Manifest::parse(&manifest_bytes, limits)?;
    let signature_bytes = read_head_member(
        input,
        entries,
        SIGNATURES_MEMBER,
        2,
        limits.max_signatures_bytes,
    )?;
    let signatures: Vec<SignatureEntry> = serde_path_to_error::deserialize(
        &mut serde_json::Deserializer::from_slice(&signature_bytes),
    )
    .map_err(|err| BundleError::SignaturesMalformed {
        detail: format!("at `{}`: {}", err.path(), err.inner()),
    })?;
    if signatures.len() > limits.max_signatures {
        return Err(BundleError::SignaturesMalformed {
            detail: format!(
                "{} signatures, over the limit of {}",
                signatures.len(),
                limits.max_signatures
            ),
        });
    }
    Ok(Head {
        manifest,
        manifest_bytes,
        signatures,
    })
}

/// Opens a bundle, reads its head, and hands both to `then` with the entries
/// that follow; the one place an archive is opened.
fn with_head<R: Read, T>(
    reader: R,
    limits: &Limits,
    to_the_end: bool,
    then: impl FnOnce(&Input, Head, &mut tar::Entries<'_, Counted<'_, R>>) -> Result<T, BundleError>,
) -> Result<T, BundleError> {
    let input = Input::new(limits);
    let mut archive = tar::Archive::new(input.wrap(reader));
    let mut entries = archive
        .entries()
        .map_err(|err| input.error(err, MANIFEST_MEMBER))?;
    let head = read_head_from(&input, &mut entries, limits)?;
    let value = then(&input, head, &mut entries)?;
    if to_the_end {
        check_end(&input, archive.into_inner())?;
    }
    Ok(value)
}

/// After the tar reader met the first zero block of the archive's end, what
/// follows must be exactly the second zero block, as `turnout pack` writes
/// it. Anything more would give the same signed content a new file digest,
/// so anyone could mint "new" bundles from a signed one without a key.
fn check_end<R: Read>(input: &Input, mut rest: Counted<'_, R>) -> Result<(), BundleError> {
    let mut tail = Vec::with_capacity(BLOCK + 1);
    (&mut rest)
        .take(BLOCK as u64 + 1)
        .read_to_end(&mut tail)
        .map_err(|err| input.error(err, "the end of the archive"))?;
    if tail.len() == BLOCK && tail.iter().all(|b| *b == 0) {
        return Ok(());
    }
    let mut more = 0u64;
    if tail.len() > BLOCK {
        more = io::copy(&mut rest.take(1 << 20), &mut io::sink()).unwrap_or(0);
    }
    Err(BundleError::TrailingData {
        found: tail.len() as u64 + more,
    })
}

/// A tar block.
const BLOCK: usize = 512;

/// Reads only the head of a bundle, trusting nothing: for `inspect` and `sign`.
pub fn read_head<R: Read>(reader: R, limits: &Limits) -> Result<Head, BundleError> {
    with_head(reader, limits, false, |_, head, _| Ok(head))
}

/// A link member's target, lossily decoded (it is compared, never trusted).
fn link_target<R: Read>(entry: &tar::Entry<'_, R>) -> String {
    entry
        .link_name_bytes()
        .map(|target| String::from_utf8_lossy(&target).into_owned())
        .unwrap_or_default()
}

/// A payload member's path: validated whole, then required under `payload/`.
/// `None` for the `payload/` directory itself.
fn payload_path(raw: &[u8], is_dir: bool) -> Result<Option<PayloadPath>, BundleError> {
    let lossy = || String::from_utf8_lossy(raw).into_owned();
    let text = std::str::from_utf8(raw).map_err(|_| BundleError::UnsafePath {
        member: lossy(),
        detail: "the name is not UTF-8".into(),
    })?;
    let text = if is_dir {
        text.strip_suffix('/').unwrap_or(text)
    } else {
        text
    };
    let whole = PayloadPath::new(text).map_err(|detail| BundleError::UnsafePath {
        member: lossy(),
        detail,
    })?;
    if whole.as_str() == PAYLOAD_DIR && is_dir {
        return Ok(None);
    }
    match whole
        .as_str()
        .strip_prefix(PAYLOAD_DIR)
        .and_then(|rest| rest.strip_prefix('/'))
    {
        Some(rest) => Ok(Some(
            PayloadPath::new(rest).expect("a suffix of a valid path is valid"),
        )),
        None => Err(BundleError::OutsidePayload { member: lossy() }),
    }
}

/// What the manifest lists, for checking members off as they arrive.
struct Expected<'m> {
    files: BTreeMap<&'m PayloadPath, &'m FileEntry>,
    links: BTreeMap<&'m PayloadPath, &'m LinkEntry>,
    dirs: BTreeSet<&'m str>,
    seen: BTreeSet<PayloadPath>,
}

impl<'m> Expected<'m> {
    fn new(manifest: &'m Manifest) -> Expected<'m> {
        let files: BTreeMap<_, _> = manifest.files.iter().map(|f| (&f.path, f)).collect();
        let links: BTreeMap<_, _> = manifest.links.iter().map(|l| (&l.path, l)).collect();
        let dirs = files
            .keys()
            .chain(links.keys())
            .flat_map(|path| path.ancestors())
            .collect();
        Expected {
            files,
            links,
            dirs,
            seen: BTreeSet::new(),
        }
    }

    /// The first listed path that never arrived.
    fn first_missing(&self) -> Option<PayloadPath> {
        self.files
            .keys()
            .chain(self.links.keys())
            .find(|path| !self.seen.contains(**path))
            .map(|path| (*path).clone())
    }
}

/// Verifies a bundle against `trust` at time `now` and streams its payload
/// into `sink`, in one pass over `reader` (see the module docs).
pub fn verify_and_unpack<R: Read>(
    reader: R,
    trust: &Trust,
    now: SystemTime,
    limits: &Limits,
    sink: &mut dyn Sink,
) -> Result<Verified, BundleError> {
    with_head(reader, limits, true, |input, head, entries| {
        verify_payload(input, head, entries, trust, now, sink)
    })
}

fn verify_payload<R: Read>(
    input: &Input,
    head: Head,
    entries: &mut tar::Entries<'_, R>,
    trust: &Trust,
    now: SystemTime,
    sink: &mut dyn Sink,
) -> Result<Verified, BundleError> {
    let signed_by = check_threshold(
        "manifest",
        &head.manifest_bytes,
        &head.signatures,
        trust.keys(),
        trust.threshold(),
    )?;
    head.manifest.check_expiry(now)?;

    let mut expected = Expected::new(&head.manifest);
    let mut last_member = SIGNATURES_MEMBER.to_owned();
    for entry in entries.by_ref() {
        let mut entry =
            entry.map_err(|err| input.error(err, &format!("the member after {last_member}")))?;
        let kind = entry.header().entry_type();
        let Some(path) = payload_path(&entry.path_bytes(), kind.is_dir())? else {
            continue;
        };
        last_member = format!("payload/{path}");
        if !expected.seen.insert(path.clone()) {
            return Err(BundleError::DuplicateMember { path });
        }
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let Some(file) = expected.files.get(&path) else {
                    return Err(BundleError::Unlisted { path, kind: "file" });
                };
                unpack_file(input, &mut entry, file, sink)?;
            }
            tar::EntryType::Directory => {
                if !expected.dirs.contains(path.as_str()) {
                    return Err(BundleError::Unlisted {
                        path,
                        kind: "directory",
                    });
                }
                sink.dir(&path)
                    .map_err(|source| BundleError::Sink { path, source })?;
            }
            tar::EntryType::Symlink => {
                let target = link_target(&entry);
                let Some(link) = expected.links.get(&path) else {
                    return Err(BundleError::Unlisted {
                        path,
                        kind: "symlink",
                    });
                };
                if link.target != target {
                    return Err(BundleError::LinkMismatch {
                        path,
                        manifest: link.target.clone(),
                        archive: target,
                    });
                }
                sink.symlink(&path, &target)
                    .map_err(|source| BundleError::Sink { path, source })?;
            }
            tar::EntryType::Link => {
                let target = link_target(&entry);
                return Err(BundleError::HardLink { path, target });
            }
            other => {
                let kind = match other {
                    tar::EntryType::Char => "character device".to_owned(),
                    tar::EntryType::Block => "block device".to_owned(),
                    tar::EntryType::Fifo => "FIFO".to_owned(),
                    other => format!("tar member of type {:?}", other.as_byte() as char),
                };
                return Err(BundleError::SpecialFile { path, kind });
            }
        }
    }
    if let Some(path) = expected.first_missing() {
        return Err(BundleError::Missing { path });
    }
    Ok(Verified {
        manifest: head.manifest,
        manifest_bytes: head.manifest_bytes,
        signed_by,
        bundle_bytes: input.count.get(),
    })
}

fn unpack_file<R: Read>(
    input: &Input,
    entry: &mut tar::Entry<'_, R>,
    file: &FileEntry,
    sink: &mut dyn Sink,
) -> Result<(), BundleError> {
    let path = &file.path;
    let member = format!("payload/{path}");
    if entry.size() != file.size {
        return Err(BundleError::SizeMismatch {
            path: path.clone(),
            manifest: file.size,
            archive: entry.size(),
        });
    }
    let mut hashing = Hashing {
        inner: entry,
        hasher: Sha256::new(),
        count: 0,
        read_failed: false,
    };
    let stored = sink.file(path, file.mode, &mut hashing);
    // Whatever the sink left unread still counts toward the digest.
    let drained = stored.and_then(|()| io::copy(&mut hashing, &mut io::sink()).map(drop));
    match drained {
        Err(err) if hashing.read_failed => return Err(input.error(err, &member)),
        Err(source) => {
            return Err(BundleError::Sink {
                path: path.clone(),
                source,
            });
        }
        Ok(()) => {}
    }
    if hashing.count < file.size {
        return Err(BundleError::Truncated { member });
    }
    let actual = Digest::from_bytes(hashing.hasher.finalize().into());
    if actual != file.sha256 {
        return Err(BundleError::DigestMismatch {
            path: path.clone(),
            manifest: file.sha256.clone(),
            actual,
        });
    }
    Ok(())
}

/// Writes bundles: the head first, then payload members. Headers are
/// normalised (owner 0, mtime 0) so the same inputs give the same bytes.
pub struct BundleWriter<W: Write> {
    builder: tar::Builder<W>,
}

fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(mode);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header
}

impl<W: Write> BundleWriter<W> {
    /// Starts a bundle with its manifest bytes and signatures.
    pub fn new(
        out: W,
        manifest_bytes: &[u8],
        signatures: &[SignatureEntry],
    ) -> io::Result<BundleWriter<W>> {
        let mut builder = tar::Builder::new(out);
        let signature_bytes = serde_json::to_vec_pretty(signatures).expect("signatures serialise");
        for (name, bytes) in [
            (MANIFEST_MEMBER, manifest_bytes),
            (SIGNATURES_MEMBER, &signature_bytes[..]),
        ] {
            let mut head = header(tar::EntryType::Regular, bytes.len() as u64, 0o644);
            builder.append_data(&mut head, name, bytes)?;
        }
        Ok(BundleWriter { builder })
    }

    /// Adds a regular file of `size` bytes read from `data`.
    pub fn file(
        &mut self,
        path: &PayloadPath,
        mode: Mode,
        size: u64,
        data: impl Read,
    ) -> io::Result<()> {
        let mut head = header(tar::EntryType::Regular, size, mode.bits());
        self.builder
            .append_data(&mut head, format!("{PAYLOAD_DIR}/{path}"), data)
    }

    /// Adds a symbolic link.
    pub fn symlink(&mut self, path: &PayloadPath, target: &str) -> io::Result<()> {
        let mut head = header(tar::EntryType::Symlink, 0, 0o777);
        self.builder
            .append_link(&mut head, format!("{PAYLOAD_DIR}/{path}"), target)
    }

    /// Writes the end-of-archive blocks and returns the writer.
    pub fn finish(self) -> io::Result<W> {
        self.builder.into_inner()
    }
}

/// Copies a bundle with a new `signatures.json`: the manifest bytes and every
/// payload member are kept as they are. For `turnout sign`.
pub fn rewrite_signatures<R: Read, W: Write>(
    reader: R,
    out: W,
    signatures: &[SignatureEntry],
    limits: &Limits,
) -> Result<W, BundleError> {
    with_head(reader, limits, false, |input, head, entries| {
        copy_with_signatures(input, &head, entries, out, signatures)
    })
}

fn copy_with_signatures<R: Read, W: Write>(
    input: &Input,
    head: &Head,
    entries: &mut tar::Entries<'_, R>,
    out: W,
    signatures: &[SignatureEntry],
) -> Result<W, BundleError> {
    let write_error = |err: io::Error| BundleError::Read(err);
    let mut writer =
        BundleWriter::new(out, &head.manifest_bytes, signatures).map_err(write_error)?;
    for entry in entries {
        let mut entry = entry.map_err(|err| input.error(err, "a payload member"))?;
        let name = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&name).into_owned();
        let mut head = entry.header().clone();
        if head.entry_type().is_symlink() {
            let target = link_target(&entry);
            writer
                .builder
                .append_link(&mut head, &name, &target)
                .map_err(write_error)?;
        } else {
            writer
                .builder
                .append_data(&mut head, &name, &mut entry)
                .map_err(write_error)?;
        }
    }
    writer.finish().map_err(write_error)
}
