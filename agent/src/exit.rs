//! The agent's exit codes: a contract with systemd and scripts, mapped in one place.
//!
//! systemd's `RestartPreventExitStatus=` names the codes after which a restart
//! cannot help (a bad config), so the numbers never change meaning.

use std::process::ExitCode;

/// Why the agent exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Done, nothing wrong.
    Success = 0,
    /// Failed at run time; a retry or restart may help.
    Failure = 1,
    /// The command line was wrong (clap also exits 2).
    Usage = 2,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit as u8)
    }
}
