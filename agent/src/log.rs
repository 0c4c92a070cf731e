//! The daemons' log lines, to stderr (journald keeps stderr), in one of two
//! forms: plain text (the default, no colours) or one JSON object per line
//! (`--log-format json`) with the time, the program and the message.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};

static JSON: AtomicBool = AtomicBool::new(false);

/// The form log lines take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `program: message`.
    Text,
    /// `{"ts":"…","program":"…","msg":"…"}`.
    Json,
}

/// Chooses the form for the rest of the process.
pub fn set_format(format: LogFormat) {
    JSON.store(format == LogFormat::Json, Ordering::SeqCst);
}

/// Writes one log line for `program`.
pub fn line(program: &str, message: &str) {
    let mut err = std::io::stderr().lock();
    let _ = if JSON.load(Ordering::SeqCst) {
        let ts = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        writeln!(
            err,
            "{}",
            serde_json::json!({"ts": ts, "program": program, "msg": message})
        )
    } else {
        writeln!(err, "{program}: {message}")
    };
}

/// Logs a formatted message from the agent.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::log::line("turnout-agent", &format!($($arg)*))
    };
}
