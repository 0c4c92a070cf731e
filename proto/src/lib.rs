//! Turnout's wire contract: the messages agents and coordinators exchange, the
//! protocol versions and capabilities they negotiate, and the limits every
//! reader enforces.
//!
//! This crate does no I/O and needs no runtime, so both daemons, the operator
//! CLI and the tests share one definition of what is on the wire. The rules it
//! encodes are written down for humans in `docs/protocol.md`:
//!
//! - every body is a JSON object with `"proto": N`, the version it is written in
//!   ([`envelope`]);
//! - readers ignore fields they do not know and keep enum values they do not
//!   know as `Unknown(..)` ([`wire_enum`]);
//! - the two sides pick the highest common version and the intersection of
//!   their capabilities ([`negotiate`]);
//! - every read is bounded by [`Limits`].
//!
//! It also holds the release-bundle format and its trust model (DESIGN.md §4):
//! [`keys`], [`signature`] thresholds, [`trust`] files, the [`manifest`], and
//! the streaming [`bundle`] verifier that writes through a caller's sink.

#[macro_use]
mod wire_enum;

pub mod bundle;
pub mod capability;
pub mod desired;
pub mod envelope;
pub mod ids;
pub mod keys;
pub mod limits;
pub mod manifest;
pub mod messages;
pub mod negotiate;
pub mod policy;
pub mod request_auth;
pub mod signature;
pub mod text;
pub mod trust;
pub mod version;

pub use capability::{Capability, CapabilitySet};
pub use envelope::{DecodeError, Envelope, Message, Reader, decode, encode};
pub use ids::{Digest, HostId, IdError, RolloutId, ServiceName};
pub use limits::{LimitExceeded, Limits};
pub use negotiate::{Agreement, Offer, negotiate};
pub use version::{ProtoRange, ProtoVersion, SUPPORTED};
