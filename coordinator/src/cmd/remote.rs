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

/// `text` as it may reach an operator's terminal: control characters
/// (escape sequences, line breaks) written out as escapes. Hosts choose
/// their agent version and labels, and bundles their member names; none of
/// it may move the cursor, recolour the screen or forge a row.
pub fn clean(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    std::borrow::Cow::Owned(
        text.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

/// Like [`clean`], keeping line breaks: for messages of several lines.
pub fn clean_lines(text: &str) -> String {
    text.split('\n').map(clean).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_written_out() {
        assert_eq!(clean("web-01"), "web-01");
        assert_eq!(clean("0.1.0\"} 1\n\u{1b}[2Jx"), "0.1.0\"} 1\\n\\u{1b}[2Jx");
        assert_eq!(clean_lines("a\n\u{1b}b"), "a\n\\u{1b}b");
    }
}
