//! Capabilities: optional features each side advertises in the handshake.
//!
//! The coordinator only uses a feature both sides advertised (the
//! [`negotiate`](crate::negotiate()) result), so a feature can ship in agents
//! and coordinators independently. Names this build does not know decode to
//! [`Capability::Unknown`] and drop out of the intersection; they are never an
//! error.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

wire_enum! {
    /// One optional protocol feature.
    pub enum Capability {
        /// The agent long-polls `GET /v1/agent/desired?wait=`; without it the
        /// coordinator answers at once and the agent polls at its report interval.
        LongPoll = "long_poll",
        /// Bundle downloads resume with HTTP `Range` requests.
        RangeDownload = "range_download",
        /// Desired state may name mirror URLs to fetch a bundle from.
        Mirrors = "mirrors",
        /// A rollback is served from the other slot with no download.
        SlotRollback = "slot_rollback",
    }
}

/// A set of capabilities, on the wire a JSON array of names (duplicates collapse).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CapabilitySet(BTreeSet<Capability>);

impl CapabilitySet {
    /// Every capability this build implements.
    pub fn all_known() -> CapabilitySet {
        Capability::KNOWN.iter().cloned().collect()
    }

    /// Whether the set holds `capability`.
    pub fn contains(&self, capability: &Capability) -> bool {
        self.0.contains(capability)
    }

    /// The known capabilities both sets hold. Unknown names never survive: a
    /// capability neither side can interpret cannot be agreed on.
    pub fn intersect(&self, other: &CapabilitySet) -> CapabilitySet {
        self.0
            .intersection(&other.0)
            .filter(|capability| capability.is_known())
            .cloned()
            .collect()
    }

    /// The number of capabilities in the set.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The capabilities in a stable order.
    pub fn iter(&self) -> impl Iterator<Item = &Capability> {
        self.0.iter()
    }

    /// Removes `capability`; test fleets use it to model agents lacking a feature.
    pub fn remove(&mut self, capability: &Capability) -> bool {
        self.0.remove(capability)
    }
}

impl FromIterator<Capability> for CapabilitySet {
    fn from_iter<I: IntoIterator<Item = Capability>>(iter: I) -> Self {
        CapabilitySet(iter.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_names_decode_and_keep_their_text() {
        let set: CapabilitySet = serde_json::from_str(r#"["long_poll","x-teleport"]"#).unwrap();
        assert!(set.contains(&Capability::LongPoll));
        assert!(set.contains(&Capability::Unknown("x-teleport".into())));
        assert_eq!(
            serde_json::to_string(&set).unwrap(),
            r#"["long_poll","x-teleport"]"#
        );
    }

    #[test]
    fn duplicates_collapse() {
        let set: CapabilitySet = serde_json::from_str(r#"["mirrors","mirrors"]"#).unwrap();
        assert_eq!(set.len(), 1);
    }
}
