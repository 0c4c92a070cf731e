//! The agent's exit codes: a contract with systemd and scripts, mapped in one place.
//!
//! systemd's `RestartPreventExitStatus=` names the codes after which a restart
//! cannot help (an invalid config), so the numbers never change meaning. They
//! match the `turnout` command's where the meaning is shared.
//!
//! | code | meaning                                                   |
//! |------|-----------------------------------------------------------|
//! | 0    | done                                                      |
//! | 1    | failed at run time; a retry or restart may help           |
//! | 2    | the command line was wrong                                |
//! | 3    | an input (config, trust file, path) is invalid            |
//! | 4    | verification refused a bundle                             |

use std::process::ExitCode;

use turnout_proto::bundle::BundleError;
use turnout_proto::trust::TrustError;

use crate::stage::StageError;

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
    /// An input is invalid: fix it, then run again.
    Input = 3,
    /// A bundle was refused by verification.
    Rejected = 4,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit as u8)
    }
}

/// The exit code for an error, from the most specific cause in its chain.
pub fn classify(err: &anyhow::Error) -> Exit {
    for cause in err.chain() {
        if let Some(err) = cause.downcast_ref::<BundleError>() {
            return if err.is_refusal() {
                Exit::Rejected
            } else {
                Exit::Failure
            };
        }
        if cause.is::<TrustError>() {
            return Exit::Input;
        }
        if let Some(StageError::Exists(_)) = cause.downcast_ref::<StageError>() {
            return Exit::Input;
        }
    }
    Exit::Failure
}
