//! Reading operator inputs with errors that name the file, and replacing
//! files atomically (temp file, fsync, rename, fsync the directory).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use turnout_proto::Limits;
use turnout_proto::keys::{PublicKey, SecretKey};
use turnout_proto::trust::TrustFile;

/// An input the operator named is missing or invalid.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// The file could not be read. (The cause is in the message and not a
    /// `source`, so that printing the chain does not say it twice.)
    #[error("cannot read {path}: {cause}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        cause: io::Error,
    },
    /// The file could not be written.
    #[error("cannot write {path}: {cause}{}", missing_dir_hint(path, cause))]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        cause: io::Error,
    },
    /// The file was read but its content is wrong.
    #[error("{path}: {detail}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and what was expected.
        detail: String,
    },
    /// An output would overwrite something precious.
    #[error("{0} already exists; refusing to overwrite it (move it away first)")]
    Exists(PathBuf),
}

fn missing_dir_hint(path: &Path, source: &io::Error) -> String {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) if source.kind() == io::ErrorKind::NotFound && !dir.exists() => {
            format!(
                " (the directory {} does not exist: create it first)",
                dir.display()
            )
        }
        _ => String::new(),
    }
}

/// Reads a whole file.
pub fn read(path: &Path) -> Result<Vec<u8>, InputError> {
    fs::read(path).map_err(|source| InputError::Read {
        path: path.to_owned(),
        cause: source,
    })
}

fn read_text(path: &Path) -> Result<String, InputError> {
    String::from_utf8(read(path)?).map_err(|_| InputError::Invalid {
        path: path.to_owned(),
        detail: "expected PEM text, found binary data".into(),
    })
}

/// Reads a PKCS#8 PEM private key.
pub fn secret_key(path: &Path) -> anyhow::Result<SecretKey> {
    let text = read_text(path)?;
    SecretKey::from_pem(&text).with_context(|| path.display().to_string())
}

/// Reads an SPKI PEM public key.
pub fn public_key(path: &Path) -> anyhow::Result<PublicKey> {
    let text = read_text(path)?;
    PublicKey::from_pem(&text).with_context(|| path.display().to_string())
}

/// Reads a trust file.
pub fn trust_file(path: &Path) -> anyhow::Result<TrustFile> {
    let bytes = read(path)?;
    TrustFile::parse(&bytes, &Limits::default()).with_context(|| path.display().to_string())
}

/// A temporary file beside `dest`, renamed over it by [`Pending::commit`]
/// and removed if dropped uncommitted.
pub struct Pending {
    temp: PathBuf,
    dest: PathBuf,
    file: Option<File>,
}

impl Pending {
    /// Starts writing what will become `dest`, with permission bits `mode`.
    pub fn create(dest: &Path, mode: u32) -> io::Result<Pending> {
        let dir = parent(dest);
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        let temp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temp)?;
        Ok(Pending {
            temp,
            dest: dest.to_owned(),
            file: Some(file),
        })
    }

    /// The file being written.
    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("present until commit")
    }

    /// Flushes the data, renames it over `dest` (or, with `no_clobber`, links
    /// it there only if `dest` does not exist), and flushes the directory.
    pub fn commit(mut self, no_clobber: bool) -> Result<(), anyhow::Error> {
        let file = self.file.take().expect("present until commit");
        file.sync_all()?;
        drop(file);
        if no_clobber {
            match fs::hard_link(&self.temp, &self.dest) {
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(InputError::Exists(self.dest.clone()).into());
                }
                other => other?,
            }
            fs::remove_file(&self.temp)?;
        } else {
            fs::rename(&self.temp, &self.dest)?;
        }
        File::open(parent(&self.dest))?.sync_all()?;
        Ok(())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.file.is_some() || self.temp.exists() {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Writes `bytes` to `dest` atomically.
pub fn write_atomic(dest: &Path, bytes: &[u8], mode: u32, no_clobber: bool) -> anyhow::Result<()> {
    let mut pending = Pending::create(dest, mode).map_err(|source| InputError::Write {
        path: dest.to_owned(),
        cause: source,
    })?;
    pending.file().write_all(bytes)?;
    pending.commit(no_clobber)
}

/// `7.0 MiB`, for people.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
