//! Protocol versions and the ranges each side speaks.
//!
//! A version is a small positive integer. Each build speaks a contiguous range
//! of them ([`SUPPORTED`] for this one); `docs/protocol.md` says how a version
//! is introduced and retired.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One protocol version. Versions start at 1; 0 is never valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u16", into = "u16")]
pub struct ProtoVersion(u16);

impl ProtoVersion {
    /// The first protocol version.
    pub const V1: ProtoVersion = ProtoVersion(1);
    /// Signed, fresh, monotonic desired state ([`desired`](crate::desired)).
    pub const V2: ProtoVersion = ProtoVersion(2);

    /// A version from its number; `None` for 0.
    pub const fn new(number: u16) -> Option<ProtoVersion> {
        if number == 0 {
            None
        } else {
            Some(ProtoVersion(number))
        }
    }

    /// The version's number.
    pub const fn get(self) -> u16 {
        self.0
    }
}

impl TryFrom<u16> for ProtoVersion {
    type Error = String;

    fn try_from(number: u16) -> Result<Self, Self::Error> {
        ProtoVersion::new(number)
            .ok_or_else(|| "protocol version 0 is not valid; versions start at 1".to_owned())
    }
}

impl From<ProtoVersion> for u16 {
    fn from(version: ProtoVersion) -> u16 {
        version.0
    }
}

impl fmt::Display for ProtoVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

/// The contiguous range of versions one side speaks, `min..=max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawRange")]
pub struct ProtoRange {
    min: ProtoVersion,
    max: ProtoVersion,
}

/// The protocol versions this build reads and writes.
pub const SUPPORTED: ProtoRange = ProtoRange {
    min: ProtoVersion::V1,
    max: ProtoVersion::V2,
};

impl ProtoRange {
    /// The range `min..=max`; `None` when `min > max`.
    pub const fn new(min: ProtoVersion, max: ProtoVersion) -> Option<ProtoRange> {
        if min.0 > max.0 {
            None
        } else {
            Some(ProtoRange { min, max })
        }
    }

    /// The oldest version in the range.
    pub const fn min(self) -> ProtoVersion {
        self.min
    }

    /// The newest version in the range.
    pub const fn max(self) -> ProtoVersion {
        self.max
    }

    /// Whether `version` is in the range.
    pub fn contains(self, version: ProtoVersion) -> bool {
        self.min <= version && version <= self.max
    }

    /// The versions both ranges hold, if any.
    pub fn intersect(self, other: ProtoRange) -> Option<ProtoRange> {
        ProtoRange::new(self.min.max(other.min), self.max.min(other.max))
    }
}

impl fmt::Display for ProtoRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}-{}", self.min, self.max)
        }
    }
}

/// The unchecked wire form of a range.
#[derive(Deserialize)]
struct RawRange {
    min: ProtoVersion,
    max: ProtoVersion,
}

impl TryFrom<RawRange> for ProtoRange {
    type Error = String;

    fn try_from(raw: RawRange) -> Result<Self, Self::Error> {
        ProtoRange::new(raw.min, raw.max).ok_or_else(|| {
            format!(
                "protocol range has min {} above max {}; expected min <= max",
                raw.min.0, raw.max.0
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(min: u16, max: u16) -> ProtoRange {
        ProtoRange::new(
            ProtoVersion::new(min).unwrap(),
            ProtoVersion::new(max).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn version_zero_is_refused_on_the_wire() {
        let err = serde_json::from_str::<ProtoVersion>("0").unwrap_err();
        assert!(err.to_string().contains("versions start at 1"), "{err}");
    }

    #[test]
    fn inverted_range_is_refused_on_the_wire() {
        let err = serde_json::from_str::<ProtoRange>(r#"{"min":3,"max":2}"#).unwrap_err();
        assert!(err.to_string().contains("min 3 above max 2"), "{err}");
    }

    #[test]
    fn intersection() {
        assert_eq!(range(1, 3).intersect(range(2, 5)), Some(range(2, 3)));
        assert_eq!(range(1, 1).intersect(range(1, 1)), Some(range(1, 1)));
        assert_eq!(range(1, 2).intersect(range(3, 4)), None);
    }

    #[test]
    fn display_names_the_versions() {
        assert_eq!(range(1, 1).to_string(), "v1");
        assert_eq!(range(2, 4).to_string(), "v2-v4");
    }
}
