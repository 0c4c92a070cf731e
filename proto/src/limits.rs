//! Bounds on everything a reader accepts from the other side.
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
