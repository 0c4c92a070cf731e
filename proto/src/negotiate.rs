//! Version and capability negotiation: a pure function of the two offers.
//!
//! The agent offers its range and capabilities in [`Hello`](crate::messages::Hello);
//! the coordinator answers with the highest version both speak and the
//! capabilities both have, or with [`Incompatible`] naming both ranges. Like a
//! TLS handshake, the newest common version wins, so upgrading either side
//! moves a pair forward as soon as the other side catches up.

use serde::Serialize;

use crate::capability::CapabilitySet;
use crate::messages::Incompatible;
use crate::version::{ProtoRange, ProtoVersion};

/// What one side speaks. Serialises for `version --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Offer {
    /// The software and its version, e.g. `turnout 0.1.0`, for messages.
    pub software: String,
    /// The protocol versions it speaks.
    pub range: ProtoRange,
    /// The optional features it implements.
    pub capabilities: CapabilitySet,
}

/// What two sides agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreement {
    /// The version both write from now on: the highest they share.
    pub version: ProtoVersion,
    /// The only capabilities either side may use.
    pub capabilities: CapabilitySet,
}

impl std::fmt::Display for Offer {
    /// `turnout 0.1.0, protocol v1-v2, capabilities: long_poll, mirrors`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}, protocol {}, capabilities: ",
            self.software, self.range
        )?;
        let names: Vec<&str> = self.capabilities.iter().map(|c| c.as_str()).collect();
        f.write_str(if names.is_empty() { "none" } else { "" })?;
        f.write_str(&names.join(", "))
    }
}

/// Picks the highest common version and intersects the capabilities.
pub fn negotiate(agent: &Offer, coordinator: &Offer) -> Result<Agreement, Incompatible> {
    match agent.range.intersect(coordinator.range) {
        Some(common) => Ok(Agreement {
            version: common.max(),
            capabilities: agent.capabilities.intersect(&coordinator.capabilities),
        }),
        None => Err(Incompatible {
            agent: agent.range,
            coordinator: coordinator.range,
            coordinator_version: coordinator.software.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capability::Capability;

    fn offer(software: &str, min: u16, max: u16, capabilities: &[&str]) -> Offer {
        Offer {
            software: software.into(),
            range: ProtoRange::new(
                ProtoVersion::new(min).unwrap(),
                ProtoVersion::new(max).unwrap(),
            )
            .unwrap(),
            capabilities: capabilities
                .iter()
                .map(|name| Capability::from(*name))
                .collect(),
        }
    }

    #[test]
    fn overlapping_ranges_pick_the_highest_common_version() {
        // (agent min, agent max, coordinator min, coordinator max, expected)
        let cases = [
            (1, 1, 1, 1, 1),
            (1, 3, 2, 5, 3),
            (2, 5, 1, 3, 3),
            (1, 9, 4, 4, 4),
            (3, 3, 1, 7, 3),
        ];
        for (amin, amax, cmin, cmax, want) in cases {
            let agreed = negotiate(&offer("a", amin, amax, &[]), &offer("c", cmin, cmax, &[]))
                .unwrap_or_else(|e| panic!("{amin}-{amax} vs {cmin}-{cmax}: {e}"));
            assert_eq!(agreed.version.get(), want, "{amin}-{amax} vs {cmin}-{cmax}");
        }
    }

    #[test]
    fn disjoint_ranges_are_incompatible_and_name_both_ranges() {
        let err = negotiate(
            &offer("turnout-agent 9.0.0", 3, 5, &[]),
            &offer("turnout 0.1.0", 1, 2, &[]),
        )
        .unwrap_err();
        assert_eq!(err.agent.to_string(), "v3-v5");
        assert_eq!(err.coordinator.to_string(), "v1-v2");
        let text = err.to_string();
        assert!(text.contains("the agent speaks v3-v5"), "{text}");
        assert!(
            text.contains("the coordinator (turnout 0.1.0) speaks v1-v2"),
            "{text}"
        );
        assert!(text.contains("upgrade the coordinator"), "{text}");
    }

    #[test]
    fn an_old_agent_is_told_to_upgrade_itself() {
        let err = negotiate(&offer("a", 1, 1, &[]), &offer("c", 2, 3, &[])).unwrap_err();
        assert!(
            err.to_string()
                .contains("upgrade this agent to a release that speaks v2"),
            "{err}"
        );
    }

    #[test]
    fn capabilities_are_intersected() {
        let agreed = negotiate(
            &offer("a", 1, 1, &["long_poll", "mirrors", "range_download"]),
            &offer("c", 1, 1, &["mirrors", "long_poll", "slot_rollback"]),
        )
        .unwrap();
        let names: Vec<_> = agreed.capabilities.iter().map(Capability::as_str).collect();
        assert_eq!(names, ["long_poll", "mirrors"]);
    }

    #[test]
    fn unknown_capability_names_are_ignored_not_errors() {
        // Both sides name the same feature this build does not know: it still
        // cannot be agreed on, because this build cannot act on it.
        let agreed = negotiate(
            &offer("a", 1, 1, &["long_poll", "x-quantum"]),
            &offer("c", 1, 1, &["long_poll", "x-quantum", "x-other"]),
        )
        .unwrap();
        let names: Vec<_> = agreed.capabilities.iter().map(Capability::as_str).collect();
        assert_eq!(names, ["long_poll"]);
    }
}
