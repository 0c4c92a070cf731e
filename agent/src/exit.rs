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
//! | 3    | an input (config, trust file, path, token) is invalid       |
//! | 4    | verification refused a bundle                             |
//! | 5    | the release was installed, failed its bake, and was reverted |
//! | 6    | refused: another operation runs, nothing to roll back to, or the coordinator refused (409) |
//! | 8    | the coordinator refused the credentials (an unknown, used-up or expired enrollment token: 401, 403) |
//! | 9    | the coordinator could not be verified (TLS: pin, CA, name, dates) |

use std::process::ExitCode;

/// The exit codes, for `--help`.
pub const HELP: &str = "Exit codes (the same table as turnout's):
  0  committed, or done
  1  run-time failure (I/O, disk full, supervisor, coordinator unreachable); a retry may help
  2  usage
  3  invalid config, trust file, journal, host id or request; a restart cannot help
  4  the bundle was rejected
  5  installed, failed its bake, reverted
  6  refused: another operation runs, nothing to roll back to, or the coordinator refused in its state (409)
  8  the coordinator refused the credentials (401, 403)
  9  the coordinator could not be verified (TLS: pin, CA, host name, dates)";

use turnout_proto::bundle::BundleError;
use turnout_proto::trust::TrustError;

use crate::config::ConfigError;
use crate::service::AgentError;
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
    /// Installed, failed its bake, reverted (or interrupted and reverted).
    Reverted = 5,
    /// Refused in the current state: busy, or nothing to roll back to.
    Refused = 6,
    /// The coordinator refused the credentials (same code as `turnout`'s).
    Denied = 8,
    /// The coordinator's certificate could not be trusted (same code as `turnout`'s).
    Untrusted = 9,
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
        if cause.is::<ConfigError>() {
            return Exit::Input;
        }
        if let Some(err) = cause.downcast_ref::<crate::daemon::LockError>() {
            return match err {
                crate::daemon::LockError::Held(_) => Exit::Refused,
                crate::daemon::LockError::Open { .. } => Exit::Failure,
            };
        }
        if cause.is::<turnout_proto::ids::IdError>() {
            return Exit::Input;
        }
        if let Some(err) = cause.downcast_ref::<AgentError>() {
            return classify_agent(err);
        }
        // The coordinator's answer to an enrollment: a token or request it
        // will not take is an input to fix; a host id taken by another key
        // is refused in the current state.
        if let Some(crate::link::LinkError::Untrusted { .. }) =
            cause.downcast_ref::<crate::link::LinkError>()
        {
            return Exit::Untrusted;
        }
        if let Some(err) = cause.downcast_ref::<turnout_rt::tls::TlsError>() {
            use turnout_rt::tls::TlsError;
            return match err {
                TlsError::BadPin(_) | TlsError::NotHttps(_) => Exit::Usage,
                TlsError::PinMismatch { .. } | TlsError::Invalid { .. } => Exit::Untrusted,
                TlsError::Connect { .. } => Exit::Failure,
                TlsError::BadCertificate(_) | TlsError::NoCertificates => Exit::Input,
            };
        }
        if let Some(crate::link::LinkError::Refused { status, .. }) =
            cause.downcast_ref::<crate::link::LinkError>()
        {
            return match status {
                401 | 403 => Exit::Denied,
                409 => Exit::Refused,
                400..=499 => Exit::Input,
                _ => Exit::Failure,
            };
        }
    }
    Exit::Failure
}

/// The exit code for an agent operation that could not run.
pub fn classify_agent(err: &AgentError) -> Exit {
    match err {
        AgentError::UnknownService { .. }
        | AgentError::Trust { .. }
        | AgentError::Bundle { .. } => Exit::Input,
        AgentError::Busy { .. }
        | AgentError::NoRollback { .. }
        | AgentError::NeedsDaemon { .. } => Exit::Refused,
        AgentError::Journal(crate::journal::JournalError::Newer { .. }) => Exit::Input,
        // A damaged journal: a restart loop cannot help, and must not run.
        AgentError::Journal(err) if err.is_damage() => Exit::Input,
        AgentError::Journal(_)
        | AgentError::Io { .. }
        | AgentError::SlotLost { .. }
        | AgentError::Supervisor { .. }
        | AgentError::Control { .. } => Exit::Failure,
    }
}

/// The exit code for how an install or rollback ended.
pub fn for_outcome(kind: &turnout_proto::messages::OutcomeKind) -> Exit {
    use turnout_proto::messages::OutcomeKind;
    match kind {
        OutcomeKind::Committed => Exit::Success,
        OutcomeKind::Rejected | OutcomeKind::Refused => Exit::Rejected,
        OutcomeKind::Reverted | OutcomeKind::Interrupted => Exit::Reverted,
        OutcomeKind::Failed | OutcomeKind::Unknown(_) => Exit::Failure,
    }
}
