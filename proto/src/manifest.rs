//! The bundle manifest (`manifest.json`): what a release is and every file in it.
//!
//! ```json
//! {"format": 1, "name": "web", "version": "1.4.2", "created": "2026-11-22T03:00:00Z",
//!  "expires": "2027-02-20T03:00:00Z", "entry": "bin/web",
//!  "files": [{"path": "bin/web", "size": 7340032, "sha256": "3f7c…", "mode": "0755"}],
//!  "links": [{"path": "bin/latest", "target": "web"}],
//!  "provides": ["api/v2"], "requires": ["db/v3"]}
//! ```
//!
//! Readers keep fields they do not know (`extra`), but never re-serialise a
//! manifest to check it: signatures are over the exact bytes. [`Manifest::parse`]
//! enforces every rule that can be checked without the payload: paths are
//! relative and normalised, no duplicates, no path through a link, links stay
//! inside the payload, no setuid bits, the entry is an executable file, and
//! the declared sizes fit the limits.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::SystemTime;

use semver::Version;
use serde::{Deserialize, Serialize};

use crate::ids::{Digest, ServiceName};
use crate::limits::Limits;

/// The manifest format this build reads.
pub const MANIFEST_FORMAT: u32 = 1;
/// Longest payload path, in bytes.
pub const MAX_PATH_BYTES: usize = 1024;
/// Longest path component, in bytes (the common filesystem limit).
pub const MAX_COMPONENT_BYTES: usize = 255;

/// A point in time, RFC 3339 in UTC on the wire (`2026-11-22T03:00:00Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Timestamp(pub SystemTime);

impl TryFrom<String> for Timestamp {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        humantime::parse_rfc3339(&text)
            .map(Timestamp)
            .map_err(|err| {
                format!(
                    "invalid time {text:?}: {err}; expected RFC 3339 UTC like 2026-11-22T03:00:00Z"
                )
            })
    }
}

impl From<Timestamp> for String {
    fn from(time: Timestamp) -> String {
        time.to_string()
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_rfc3339_seconds(self.0))
    }
}

/// A path inside the payload: relative, `/`-separated, every component a
/// plain name (no `.`, `..`, empty component or NUL). Validated once, here,
/// so that joining it under a staging directory cannot leave that directory.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PayloadPath(String);

impl PayloadPath {
    /// Validates `text` as a payload path; the error says which rule it broke.
    pub fn new(text: &str) -> Result<PayloadPath, String> {
        let rule = |why: &str| Err(format!("unsafe path {text:?}: {why}"));
        if text.is_empty() {
            return rule("it is empty");
        }
        if text.len() > MAX_PATH_BYTES {
            return rule(&format!(
                "it is {} bytes, over the limit of {MAX_PATH_BYTES}",
                text.len()
            ));
        }
        if text.starts_with('/') {
            return rule("it is absolute; expected a path relative to the payload");
        }
        for component in text.split('/') {
            match component {
                "" => return rule("it has an empty component ('//' or a trailing '/')"),
                "." | ".." => return rule("it has a '.' or '..' component"),
                c if c.contains('\0') => return rule("it contains a NUL byte"),
                // Names are printed to operators: no escape sequences, no
                // line breaks, nothing that reorders text.
                c if c.chars().any(crate::text::unsafe_on_a_terminal) => {
                    return rule("it contains a control or invisible formatting character");
                }
                c if c.len() > MAX_COMPONENT_BYTES => {
                    return rule(&format!("a component is over {MAX_COMPONENT_BYTES} bytes"));
                }
                _ => {}
            }
        }
        Ok(PayloadPath(text.to_owned()))
    }

    /// The path as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The directories above this path, nearest last (`a`, `a/b` for `a/b/c`).
    pub fn ancestors(&self) -> impl Iterator<Item = &str> {
        self.0.match_indices('/').map(|(i, _)| &self.0[..i])
    }

    /// Where a link at this path pointing to `target` resolves, relative to
    /// the payload root; `None` if it leaves the payload.
    pub fn resolve_link(&self, target: &str) -> Option<String> {
        if target.starts_with('/') || target.is_empty() {
            return None;
        }
        let mut stack: Vec<&str> = self
            .ancestors()
            .last()
            .map(|d| d.split('/').collect())
            .unwrap_or_default();
        for component in target.split('/') {
            match component {
                "" | "." => {}
                ".." => {
                    stack.pop()?;
                }
                name => stack.push(name),
            }
        }
        Some(stack.join("/"))
    }
}

impl TryFrom<String> for PayloadPath {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        PayloadPath::new(&text)
    }
}

impl From<PayloadPath> for String {
    fn from(path: PayloadPath) -> String {
        path.0
    }
}

impl fmt::Display for PayloadPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Unix permission bits, `"0755"` on the wire; setuid, setgid and sticky bits
/// are refused, since a bundle must not be able to grant privileges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Mode(u32);

impl Mode {
    /// Permission bits, `None` if any bit above 0o777 is set.
    pub fn new(bits: u32) -> Option<Mode> {
        (bits & !0o777 == 0).then_some(Mode(bits))
    }

    /// The bits.
    pub fn bits(self) -> u32 {
        self.0
    }

    /// Whether anyone may execute it.
    pub fn is_executable(self) -> bool {
        self.0 & 0o111 != 0
    }
}

impl TryFrom<String> for Mode {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        let bits = u32::from_str_radix(&text, 8)
            .map_err(|_| format!("invalid mode {text:?}: expected octal digits like \"0755\""))?;
        Mode::new(bits).ok_or_else(|| {
            format!("mode {text} has setuid, setgid or sticky bits (or more); only permission bits 0777 are allowed")
        })
    }
}

impl From<Mode> for String {
    fn from(mode: Mode) -> String {
        format!("{:04o}", mode.0)
    }
}

/// One regular file of the payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Where, under `payload/`.
    pub path: PayloadPath,
    /// Its exact size in bytes.
    pub size: u64,
    /// The sha256 of its content.
    pub sha256: Digest,
    /// Its permission bits.
    pub mode: Mode,
}

/// One symbolic link of the payload; it must resolve inside the payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkEntry {
    /// Where, under `payload/`.
    pub path: PayloadPath,
    /// What it points to, relative to its own directory.
    pub target: String,
}

/// A release's manifest. See the module docs for the rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The format, [`MANIFEST_FORMAT`].
    pub format: u32,
    /// The release's name, usually the service's.
    pub name: ServiceName,
    /// Its semantic version.
    pub version: Version,
    /// When it was packed.
    pub created: Timestamp,
    /// After this, hosts refuse to install it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<Timestamp>,
    /// The executable the service runs, a path in `files`.
    pub entry: PayloadPath,
    /// Every regular file.
    pub files: Vec<FileEntry>,
    /// Every symbolic link.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<LinkEntry>,
    /// Compatibility tags this release offers, e.g. `api/v2`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub provides: Vec<String>,
    /// Compatibility tags this release needs from its surroundings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<String>,
    /// Fields from newer formats, kept for display.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// A manifest that breaks a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Larger than `Limits::max_manifest_bytes`.
    #[error("manifest.json is {size} bytes, over the limit of {limit}")]
    TooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// Not the expected JSON, or a field with a bad value (including unsafe paths).
    #[error("manifest.json is not valid: at `{path}`: {detail}")]
    Malformed {
        /// Where.
        path: String,
        /// What was wrong.
        detail: String,
    },
    /// A newer format.
    #[error(
        "manifest format {found} is newer than this build reads ({MANIFEST_FORMAT}); upgrade turnout"
    )]
    Format {
        /// The manifest's format.
        found: u32,
    },
    /// The same path twice.
    #[error("manifest.json lists {path} twice")]
    DuplicatePath {
        /// The path.
        path: PayloadPath,
    },
    /// A file and a directory of the same name, or a path below a link.
    #[error(
        "manifest.json lists {path}, but {parent} is listed as a file or link, not a directory"
    )]
    PathThroughFile {
        /// The deeper path.
        path: PayloadPath,
        /// The file or link above it.
        parent: String,
    },
    /// A link that leaves the payload.
    #[error("link {path} -> {target} points outside the payload")]
    LinkEscapes {
        /// The link.
        path: PayloadPath,
        /// Its target.
        target: String,
    },
    /// The entry is missing or not executable.
    #[error("the entry {entry} {problem}")]
    Entry {
        /// The entry path.
        entry: PayloadPath,
        /// "is not listed in files" or "is not executable (mode 0644)".
        problem: String,
    },
    /// Too many files, or more bytes declared than a bundle may hold.
    #[error("manifest.json declares {found} {what}, over the limit of {limit}")]
    OverLimit {
        /// "files", "bytes" or "tags".
        what: &'static str,
        /// How many.
        found: u64,
        /// The limit.
        limit: u64,
    },
    /// The release has expired.
    #[error("the release expired at {expires} (now {now}); pack and sign a new one")]
    Expired {
        /// When it expired.
        expires: Timestamp,
        /// The verifier's clock.
        now: Timestamp,
    },
}

impl Manifest {
    /// Parses the exact bytes of `manifest.json` and checks every rule.
    pub fn parse(bytes: &[u8], limits: &Limits) -> Result<Manifest, ManifestError> {
        if bytes.len() as u64 > limits.max_manifest_bytes {
            return Err(ManifestError::TooLarge {
                size: bytes.len() as u64,
                limit: limits.max_manifest_bytes,
            });
        }
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let manifest: Manifest =
            serde_path_to_error::deserialize(&mut de).map_err(|err| ManifestError::Malformed {
                path: err.path().to_string(),
                detail: err.into_inner().to_string(),
            })?;
        de.end().map_err(|err| ManifestError::Malformed {
            path: ".".into(),
            detail: err.to_string(),
        })?;
        manifest.validate(limits)?;
        Ok(manifest)
    }

    /// Checks the rules that need no payload (see the module docs).
    pub fn validate(&self, limits: &Limits) -> Result<(), ManifestError> {
        if self.format != MANIFEST_FORMAT {
            return Err(ManifestError::Format { found: self.format });
        }
        let over = |what, found: usize, limit: usize| ManifestError::OverLimit {
            what,
            found: found as u64,
            limit: limit as u64,
        };
        let entries = self.files.len() + self.links.len();
        if entries > limits.max_files {
            return Err(over("files", entries, limits.max_files));
        }
        let tags = self.provides.len() + self.requires.len();
        if tags > limits.max_tags {
            return Err(over("tags", tags, limits.max_tags));
        }
        let declared = self
            .files
            .iter()
            .fold(0u64, |sum, file| sum.saturating_add(file.size));
        if declared > limits.max_bundle_bytes {
            return Err(ManifestError::OverLimit {
                what: "bytes",
                found: declared,
                limit: limits.max_bundle_bytes,
            });
        }

        let mut leaves = BTreeSet::new();
        for path in self
            .files
            .iter()
            .map(|f| &f.path)
            .chain(self.links.iter().map(|l| &l.path))
        {
            if !leaves.insert(path.as_str()) {
                return Err(ManifestError::DuplicatePath { path: path.clone() });
            }
        }
        for path in self
            .files
            .iter()
            .map(|f| &f.path)
            .chain(self.links.iter().map(|l| &l.path))
        {
            if let Some(parent) = path.ancestors().find(|dir| leaves.contains(dir)) {
                return Err(ManifestError::PathThroughFile {
                    path: path.clone(),
                    parent: parent.to_owned(),
                });
            }
        }
        for link in &self.links {
            if link.path.resolve_link(&link.target).is_none() {
                return Err(ManifestError::LinkEscapes {
                    path: link.path.clone(),
                    target: link.target.clone(),
                });
            }
        }
        match self.files.iter().find(|f| f.path == self.entry) {
            None => Err(ManifestError::Entry {
                entry: self.entry.clone(),
                problem: "is not listed in files".into(),
            }),
            Some(file) if !file.mode.is_executable() => Err(ManifestError::Entry {
                entry: self.entry.clone(),
                problem: format!("is not executable (mode {})", String::from(file.mode)),
            }),
            Some(_) => Ok(()),
        }
    }

    /// Refuses a manifest whose `expires` is at or before `now`.
    pub fn check_expiry(&self, now: SystemTime) -> Result<(), ManifestError> {
        match self.expires {
            Some(expires) if expires.0 <= now => Err(ManifestError::Expired {
                expires,
                now: Timestamp(now),
            }),
            _ => Ok(()),
        }
    }

    /// The sum of the payload files' sizes.
    pub fn payload_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_paths_refuse_every_escape() {
        for (bad, why) in [
            ("", "empty"),
            ("/etc/passwd", "absolute"),
            ("../x", "'..'"),
            ("a/../../x", "'..'"),
            ("a/./b", "'.'"),
            ("a//b", "empty component"),
            ("a/", "empty component"),
            ("a\0b", "NUL"),
        ] {
            let err = PayloadPath::new(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        assert!(PayloadPath::new("bin/web").is_ok());
        assert!(PayloadPath::new("...").is_ok(), "'...' is a plain name");
    }

    #[test]
    fn links_resolve_relative_to_their_directory() {
        let link = PayloadPath::new("a/b/link").unwrap();
        assert_eq!(link.resolve_link("c").as_deref(), Some("a/b/c"));
        assert_eq!(link.resolve_link("../../top").as_deref(), Some("top"));
        assert_eq!(link.resolve_link("../../../etc/passwd"), None);
        assert_eq!(link.resolve_link("/etc/passwd"), None);
        assert_eq!(PayloadPath::new("top").unwrap().resolve_link(".."), None);
    }

    #[test]
    fn modes_refuse_privilege_bits() {
        assert!(
            Mode::try_from("4755".to_owned())
                .unwrap_err()
                .contains("setuid")
        );
        assert_eq!(
            String::from(Mode::try_from("755".to_owned()).unwrap()),
            "0755"
        );
    }
}
