//! `turnout`: the coordinator server (`turnout serve`), the operator CLI, the
//! offline bundle tools and `turnout demo` (DESIGN.md §7, §8).
//!
//! The binary's `main.rs` only parses arguments and maps the outcome to an
//! exit code; everything it runs lives here so that tests can drive it.

pub mod broker;
pub mod cli;
pub mod client;
pub mod cmd;
pub mod coordinator;
#[cfg(feature = "agent")]
pub mod demo;
pub mod engine;
pub mod exit;
pub mod files;
pub mod host_auth;
pub mod metrics;
pub mod profile;
pub mod reports;
pub mod server;
pub mod spec;
pub mod store;
pub mod tls;

use turnout_proto::{CapabilitySet, Offer, SUPPORTED};

/// This build's software version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What this coordinator build offers to agents in the handshake.
pub fn offer() -> Offer {
    Offer {
        software: format!("turnout {VERSION}"),
        range: SUPPORTED,
        capabilities: CapabilitySet::all_known(),
    }
}
