//! Bounds on everything a reader accepts from the other side: messages,
//! bundles and trust files.
//!
//! A reader checks the byte size before parsing and the counts and string
//! lengths after, so a hostile or broken peer cannot make a daemon allocate
//! without bound. JSON nesting is bounded by `serde_json`'s recursion limit
//! (128 levels).
//!
//! | limit              | default | why this much                                  |
//! |--------------------|---------|------------------------------------------------|
//! | `max_body_bytes`   | 1 MiB   | a full report of 128 services is ~100 KiB      |
//! | `max_services`     | 128     | services one agent manages                     |
//! | `max_labels`       | 64      | labels per host                                |
//! | `max_facts`        | 64      | facts per host                                 |
//! | `max_capabilities` | 64      | capability names in one handshake              |
//! | `max_urls`         | 16      | mirror URLs per desired service                |
//! | `max_text_bytes`   | 4 KiB   | any one string: label, version, error, reason  |
//!
//! Release bundles and trust files:
//!
//! | limit                  | default | why this much                                   |
//! |------------------------|---------|-------------------------------------------------|
//! | `max_bundle_bytes`     | 4 GiB   | the whole `.tnt` as read; also declared sizes   |
//! | `max_manifest_bytes`   | 4 MiB   | ~20,000 files' entries                          |
//! | `max_signatures_bytes` | 64 KiB  | `signatures.json`                               |
//! | `max_signatures`       | 64      | signatures on one bundle or trust file          |
//! | `max_files`            | 100,000 | files and links in one payload                  |
//! | `max_tags`             | 256     | `provides` plus `requires` tags                 |
//! | `max_trust_bytes`      | 256 KiB | a trust file                                    |
//! | `max_keys`             | 64      | keys in a trust file                            |

/// Reader limits; see the module docs for the defaults and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest message body, in bytes, checked before parsing.
    pub max_body_bytes: usize,
    /// Most services in one report or desired state.
    pub max_services: usize,
    /// Most labels on one host.
    pub max_labels: usize,
    /// Most facts on one host.
    pub max_facts: usize,
    /// Most capability names in one handshake message.
    pub max_capabilities: usize,
    /// Most mirror URLs for one desired service.
    pub max_urls: usize,
    /// Longest single string, in bytes.
    pub max_text_bytes: usize,
    /// Largest bundle, in bytes as read, and largest sum of declared file sizes.
    pub max_bundle_bytes: u64,
    /// Largest `manifest.json`.
    pub max_manifest_bytes: u64,
    /// Largest `signatures.json`.
    pub max_signatures_bytes: u64,
    /// Most signatures on one bundle or trust file.
    pub max_signatures: usize,
    /// Most files and links in one payload.
    pub max_files: usize,
    /// Most `provides` plus `requires` tags.
    pub max_tags: usize,
    /// Largest trust file.
    pub max_trust_bytes: usize,
    /// Most keys in a trust file.
    pub max_keys: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1024 * 1024,
            max_services: 128,
            max_labels: 64,
            max_facts: 64,
            max_capabilities: 64,
            max_urls: 16,
            max_text_bytes: 4096,
            max_bundle_bytes: 4 << 30,
            max_manifest_bytes: 4 << 20,
            max_signatures_bytes: 64 << 10,
            max_signatures: 64,
            max_files: 100_000,
            max_tags: 256,
            max_trust_bytes: 256 << 10,
            max_keys: 64,
        }
    }
}

/// A decoded message held more of something than [`Limits`] allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{path}` has {found} {unit}, over the limit of {limit}")]
pub struct LimitExceeded {
    /// Where in the message, e.g. `services` or `labels.region`.
    pub path: String,
    /// What was found.
    pub found: usize,
    /// The limit.
    pub limit: usize,
    /// "entries" or "bytes".
    pub unit: &'static str,
}

impl Limits {
    /// Checks a collection's length.
    pub fn count(&self, path: &str, found: usize, limit: usize) -> Result<(), LimitExceeded> {
        if found > limit {
            return Err(LimitExceeded {
                path: path.to_owned(),
                found,
                limit,
                unit: "entries",
            });
        }
        Ok(())
    }

    /// Checks one string's length against `max_text_bytes`.
    pub fn text(&self, path: &str, text: &str) -> Result<(), LimitExceeded> {
        if text.len() > self.max_text_bytes {
            return Err(LimitExceeded {
                path: path.to_owned(),
                found: text.len(),
                limit: self.max_text_bytes,
                unit: "bytes",
            });
        }
        Ok(())
    }

    /// Checks a string map's size and every key and value in it.
    pub fn map<'a>(
        &self,
        path: &str,
        entries: impl ExactSizeIterator<Item = (&'a String, &'a String)>,
        limit: usize,
    ) -> Result<(), LimitExceeded> {
        self.count(path, entries.len(), limit)?;
        for (key, value) in entries {
            self.text(path, key)?;
            self.text(&format!("{path}.{key}"), value)?;
        }
        Ok(())
    }
}
