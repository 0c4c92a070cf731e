//! The agent crate's integration tests (one test binary, one module per area).

mod corpus;
mod hostile_bundles;
