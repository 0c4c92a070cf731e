//! The envelope every body travels in, and the bounded, tolerant decoder.
//!
//! On the wire a message is one JSON object: `"proto": N` (the version the
//! body is written in) beside the message's own fields:
//!
//! ```json
//! {"proto": 1, "host": "web-01", "seq": 7, "desired_index": 3, "services": []}
//! ```
//!
//! Decoding takes these steps, and each failure is its own [`DecodeError`]:
//! 1. the byte size against [`Limits::max_body_bytes`], before parsing;
//! 2. JSON syntax (nesting is bounded by `serde_json`'s recursion limit);
//! 3. a top-level object with a valid `proto`;
//! 4. `proto` within the versions this reader speaks, unless the message is
//!    [frozen](Message::FROZEN);
//! 5. the message's fields, unknown ones ignored, with the path of a bad one;
//! 6. the message's counts and string lengths against [`Limits`].

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::limits::{LimitExceeded, Limits};
use crate::version::{ProtoRange, ProtoVersion, SUPPORTED};

/// A message type that travels in an [`Envelope`].
pub trait Message: Serialize + DeserializeOwned {
    /// The message's name in errors and logs.
    const NAME: &'static str;

    /// A frozen message keeps its shape across all protocol versions (fields
    /// are only ever added), so a reader decodes it whatever the envelope's
    /// version. True for the handshake and the error body; false for the rest,
    /// which a reader only takes in a version it speaks.
    const FROZEN: bool = false;

    /// Checks counts and string lengths against `limits`.
    fn check_limits(&self, limits: &Limits) -> Result<(), LimitExceeded>;
}

/// A message and the protocol version it is written in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope<T> {
    /// The version the body is written in.
    pub proto: ProtoVersion,
    /// The message.
    pub body: T,
}

/// Why a body could not be decoded. Every variant names the message kind and
/// says what was expected and what was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Zero bytes, or only whitespace.
    #[error("{message}: the body is empty; expected a JSON object with a \"proto\" field")]
    Empty {
        /// The message kind.
        message: &'static str,
    },
    /// More bytes than [`Limits::max_body_bytes`].
    #[error("{message}: the body is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// The message kind.
        message: &'static str,
        /// The body's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Not valid JSON.
    #[error("{message}: malformed JSON at line {line}, column {column}: {detail}")]
    Syntax {
        /// The message kind.
        message: &'static str,
        /// 1-based line of the fault.
        line: usize,
        /// 1-based column of the fault.
        column: usize,
        /// What the parser expected.
        detail: String,
    },
    /// Valid JSON of the wrong shape: a missing field, a wrong type, a bad value.
    #[error("{message}: invalid `{path}`: {detail}")]
    Invalid {
        /// The message kind.
        message: &'static str,
        /// Where, e.g. `services[0].state`; `.` for the top level.
        path: String,
        /// What was wrong.
        detail: String,
    },
    /// A version this reader does not speak, on a message that is not frozen.
    #[error(
        "{message}: written in protocol {found}, but this reader speaks {accepted}; \
         the sender must use the version negotiated in the handshake"
    )]
    UnsupportedVersion {
        /// The message kind.
        message: &'static str,
        /// The envelope's version.
        found: ProtoVersion,
        /// What this reader speaks.
        accepted: ProtoRange,
    },
    /// Within the byte limit, but over a count or length limit.
    #[error("{message}: {source}")]
    OverLimit {
        /// The message kind.
        message: &'static str,
        /// Which limit.
        source: LimitExceeded,
    },
}

/// Decodes messages under one set of limits, accepting one range of versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reader {
    /// The bounds enforced on every body.
    pub limits: Limits,
    /// The versions accepted for messages that are not frozen.
    pub accept: ProtoRange,
}

impl Default for Reader {
    fn default() -> Self {
        Reader {
            limits: Limits::default(),
            accept: SUPPORTED,
        }
    }
}

impl Reader {
    /// Decodes one message; see the module docs for the steps.
    pub fn decode<T: Message>(&self, bytes: &[u8]) -> Result<Envelope<T>, DecodeError> {
        let message = T::NAME;
        if bytes.len() > self.limits.max_body_bytes {
            return Err(DecodeError::TooLarge {
                message,
                size: bytes.len(),
                limit: self.limits.max_body_bytes,
            });
        }
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(DecodeError::Empty { message });
        }
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|err| DecodeError::Syntax {
                message,
                line: err.line(),
                column: err.column(),
                detail: strip_position(&err),
            })?;
        let serde_json::Value::Object(mut fields) = value else {
            return Err(DecodeError::Invalid {
                message,
                path: ".".into(),
                detail: format!("expected a JSON object, found {}", kind_of(&value)),
            });
        };
        let invalid = |path: &str, detail: String| DecodeError::Invalid {
            message,
            path: path.to_owned(),
            detail,
        };
        let proto = fields
            .remove("proto")
            .ok_or_else(|| invalid("proto", "missing field `proto`".into()))?;
        let proto = ProtoVersion::deserialize(proto)
            .map_err(|err| invalid("proto", format!("{err}; expected a version number >= 1")))?;
        if !T::FROZEN && !self.accept.contains(proto) {
            return Err(DecodeError::UnsupportedVersion {
                message,
                found: proto,
                accepted: self.accept,
            });
        }
        let body: T = serde_path_to_error::deserialize(serde_json::Value::Object(fields))
            .map_err(|err| invalid(&err.path().to_string(), err.into_inner().to_string()))?;
        body.check_limits(&self.limits)
            .map_err(|source| DecodeError::OverLimit { message, source })?;
        Ok(Envelope { proto, body })
    }
}

/// Decodes one message with the default [`Reader`]: default limits, this build's versions.
pub fn decode<T: Message>(bytes: &[u8]) -> Result<Envelope<T>, DecodeError> {
    Reader::default().decode(bytes)
}

/// Encodes `body` written in version `proto`: `"proto"` first, then the body's fields.
pub fn encode<T: Message>(proto: ProtoVersion, body: &T) -> Vec<u8> {
    #[derive(Serialize)]
    struct Framed<'a, T> {
        proto: ProtoVersion,
        #[serde(flatten)]
        body: &'a T,
    }
    serde_json::to_vec(&Framed { proto, body })
        .expect("messages are structs of strings, numbers and string-keyed maps")
}

/// `serde_json` appends " at line L column C"; the error's own fields carry those.
fn strip_position(err: &serde_json::Error) -> String {
    let text = err.to_string();
    match text.rfind(" at line ") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

fn kind_of(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}
