//! The agent crate's integration tests (one test binary, one module per area).

mod corpus;
mod crash;
mod cycle;
mod faults;
mod harness;
mod hostile_bundles;
mod in_process;
mod launcher;
mod upgrade;
