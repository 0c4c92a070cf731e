//! `turnout-agent`, the daemon on every host: it keeps two slots per managed
//! service and moves each service between them (DESIGN.md §5, §6).
//!
//! The binary's `main.rs` only parses arguments and maps the outcome to an
//! exit code; everything it runs lives here so that tests can drive it.

pub mod cli;
pub mod config;
pub mod control;
pub mod converge;
pub mod daemon;
pub mod exit;
pub mod health;
pub mod install;
pub mod journal;
pub mod link;
pub mod machine;
pub mod service;
pub mod slots;
pub mod stage;
pub mod supervisor;
pub mod trust_chain;
pub mod upgrade;

use turnout_proto::{CapabilitySet, Offer, SUPPORTED};

/// This build's software version: the package's, unless the build set
/// `TURNOUT_BUILD_VERSION` (how tests make "the same code, a newer
/// version" to upgrade agents to).
pub const VERSION: &str = match option_env!("TURNOUT_BUILD_VERSION") {
    Some(version) => version,
    None => env!("CARGO_PKG_VERSION"),
};

/// What this agent build offers in its handshake.
pub fn offer() -> Offer {
    Offer {
        software: format!("turnout-agent {VERSION}"),
        range: SUPPORTED,
        capabilities: CapabilitySet::all_known(),
    }
}
