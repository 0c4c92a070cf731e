//! Shared helpers for the workspace end-to-end tests in `tests/tests/`.
//!
//! Empty for now: the fleet harness (real processes on loopback) arrives with
//! the end-to-end issue.
