//! Staging: a verified bundle's payload unpacked into a fresh directory, all
//! or nothing.
//!
//! [`unpack`] creates the destination, streams the bundle through
//! [`verify_and_unpack`] into a [`DirSink`] rooted there, and removes the
//! destination again on any failure, so a rejected or half-written bundle
//! leaves nothing behind. Files are created with `O_EXCL` (never through an
//! existing path or link) and their manifest mode; nothing is fsynced here:
//! [`DirSink::sync`] does that once, before the agent switches to the slot.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use turnout_proto::Limits;
use turnout_proto::bundle::{BundleError, Sink, Verified, verify_and_unpack};
use turnout_proto::manifest::{Mode, PayloadPath};
use turnout_proto::trust::Trust;

/// Copy buffer size: large enough that syscalls are not the cost.
const BUFFER: usize = 256 * 1024;

/// Why staging failed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The destination already exists; staging never writes into old state.
    #[error("the staging directory {0} already exists; remove it first")]
    Exists(PathBuf),
    /// The destination could not be created.
    #[error("cannot create the staging directory {path}: {source}")]
    Create {
        /// The destination.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The bundle was rejected (or could not be written); the destination was removed.
    #[error(transparent)]
    Bundle(#[from] BundleError),
}

/// A [`Sink`] writing under `root`.
#[derive(Debug)]
pub struct DirSink {
    root: PathBuf,
    buffer: Vec<u8>,
    written: Vec<PathBuf>,
}

impl DirSink {
    /// A sink writing under `root`, which must exist.
    pub fn new(root: PathBuf) -> DirSink {
        DirSink {
            root,
            buffer: vec![0; BUFFER],
            written: Vec::new(),
        }
    }

    fn parent_of(&self, path: &PayloadPath) -> io::Result<PathBuf> {
        let full = self.root.join(path.as_str());
        if let Some(parent) = full.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)?;
        }
        Ok(full)
    }

    /// Flushes every file written and every directory to stable storage.
    pub fn sync(&self) -> io::Result<()> {
        for path in &self.written {
            File::open(path)?.sync_all()?;
        }
        sync_tree_dirs(&self.root)
    }
}

fn sync_tree_dirs(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            sync_tree_dirs(&entry.path())?;
        }
    }
    File::open(dir)?.sync_all()
}

impl Sink for DirSink {
    fn dir(&mut self, path: &PayloadPath) -> io::Result<()> {
        let full = self.root.join(path.as_str());
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(full)
    }

    fn file(&mut self, path: &PayloadPath, mode: Mode, data: &mut dyn Read) -> io::Result<()> {
        let full = self.parent_of(path)?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode.bits())
            .open(&full)?;
        loop {
            let n = match data.read(&mut self.buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            };
            file.write_all(&self.buffer[..n])?;
        }
        self.written.push(full);
        Ok(())
    }

    fn symlink(&mut self, path: &PayloadPath, target: &str) -> io::Result<()> {
        let full = self.parent_of(path)?;
        std::os::unix::fs::symlink(target, full)
    }
}

/// Verifies `reader` against `trust` and unpacks it into `dest`, which must
/// not exist. On any failure `dest` is removed and nothing is left behind.
pub fn unpack(
    reader: impl Read,
    trust: &Trust,
    now: SystemTime,
    limits: &Limits,
    dest: &Path,
) -> Result<(Verified, DirSink), StageError> {
    match fs::DirBuilder::new().mode(0o755).create(dest) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
            return Err(StageError::Exists(dest.to_owned()));
        }
        Err(source) => {
            return Err(StageError::Create {
                path: dest.to_owned(),
                source,
            });
        }
    }
    let mut sink = DirSink::new(dest.to_owned());
    match verify_and_unpack(reader, trust, now, limits, &mut sink) {
        Ok(verified) => Ok((verified, sink)),
        Err(err) => {
            // Best effort: if removal fails too, the bundle error is the one to report,
            // and the next staging attempt refuses the leftover directory loudly.
            let _ = fs::remove_dir_all(dest);
            Err(err.into())
        }
    }
}
