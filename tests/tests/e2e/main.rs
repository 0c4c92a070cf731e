//! Workspace end-to-end tests (one test binary): the build's agent and
//! coordinator agree on the protocol, and fleets of real processes on
//! loopback survive the faults of a real fleet.

mod downloads;
mod fleet;
mod handshake;
mod hostile;
mod policy;
mod self_upgrade;
mod tls;
mod trust;
mod units;
