//! The `turnout` crate's integration tests (one test binary, one module per area).

mod api;
mod bundle_tools;
mod fake;
mod hardening;
mod protocol;
mod sigkill;
mod tls;
mod tokens;
mod upgrade;
