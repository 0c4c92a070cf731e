//! What every command that talks to a coordinator shares: where it is, the
//! operator token, and JSON output.

use std::time::{Duration, UNIX_EPOCH};

use crate::client::Client;

/// Options of the commands that call the coordinator's API.
#[derive(Debug, Clone, clap::Args)]
pub struct Remote {
    /// The coordinator's URL.
    #[arg(
        long,
        env = "TURNOUT_COORDINATOR",
        default_value = "http://127.0.0.1:7400"
    )]
    pub coordinator: String,
    /// An operator token (`turnout serve --init` prints the first).
    #[arg(long, env = "TURNOUT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

impl Remote {
    /// A client for the coordinator.
    pub fn client(&self) -> Client {
        Client::new(&self.coordinator, self.token.clone())
    }

    /// Prints `value` as JSON when --json was given; returns whether it did.
    pub fn print_json(&self, value: &impl serde::Serialize) -> anyhow::Result<bool> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(value)?);
        }
        Ok(self.json)
    }
}

/// `2026-11-22 03:18:38` for a time in ms since the epoch.
pub fn when(ms: u64) -> String {
    let text =
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string();
    text.trim_end_matches('Z').replace('T', " ")
}

pub use turnout_proto::text::{clean, clean_lines};
