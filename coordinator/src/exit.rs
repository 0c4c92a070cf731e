//! The `turnout` command's exit codes: a contract with scripts, mapped in one place.
//!
//! | code | meaning                                                          |
//! |------|------------------------------------------------------------------|
//! | 0    | done                                                             |
//! | 1    | failed at run time (I/O, network); retrying may help             |
//! | 2    | the command line was wrong                                       |
//! | 3    | an input file is invalid (key, trust file, payload directory)    |
//! | 4    | verification refused a bundle or trust file                      |
//! | 5    | (the agent's: installed, failed its bake, reverted)              |
//! | 6    | the coordinator refused the request in its state (409)           |
//! | 7    | a watched rollout finished without succeeding                    |
//! | 8    | the coordinator refused the credentials (401, 403)               |
//! | 9    | the coordinator could not be verified (TLS: pin, CA, name, dates) |
//!
//! One table for both binaries: `turnout agent …` exits with the agent's
//! codes, and no code means one thing there and another here (the refused
//! credentials were 5 before 0.2, which is the agent's "reverted").

use std::process::ExitCode;

/// The exit codes, for `--help`.
pub const HELP: &str = "Exit codes (one table with turnout-agent's):
  0  done; a watched rollout succeeded
  1  run-time failure (I/O, network); a retry may help
  2  usage
  3  invalid input: a spec, a file, a database this build cannot use, an unknown release or host
  4  a bundle or trust file was refused by verification
  5  (the agent's: installed, failed its bake, reverted)
  6  refused in the current state (409)
  7  a watched rollout finished without succeeding
  8  the coordinator refused the credentials (401, 403)
  9  the coordinator could not be verified (TLS: pin, CA, host name, dates)";

use turnout_proto::bundle::BundleError;
use turnout_proto::keys::KeyError;
use turnout_proto::manifest::ManifestError;
use turnout_proto::trust::TrustError;

use crate::files::InputError;

/// Why `turnout` exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Done, nothing wrong.
    Success = 0,
    /// Failed at run time; a retry may help.
    Failure = 1,
    /// The command line was wrong (clap also exits 2).
    Usage = 2,
    /// An input file is invalid: fix it, then run again.
    Input = 3,
    /// A bundle or trust file was refused by verification.
    Rejected = 4,
    /// The coordinator refused the credentials (was 5 before 0.2).
    Denied = 8,
    /// The coordinator refused the request in the current state.
    Refused = 6,
    /// A watched rollout finished without succeeding.
    Unsuccessful = 7,
    /// The coordinator's certificate could not be trusted: a pin that does
    /// not match, a CA that did not sign it, a wrong name, expired.
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
        if let Some(err) = cause.downcast_ref::<TrustError>() {
            return match err {
                TrustError::NotNewer { .. }
                | TrustError::NotAuthorised(_)
                | TrustError::NotSelfSigned(_) => Exit::Rejected,
                _ => Exit::Input,
            };
        }
        match cause.downcast_ref::<crate::client::ClientError>() {
            Some(crate::client::ClientError::Untrusted { .. }) => return Exit::Untrusted,
            Some(
                crate::client::ClientError::NoCa { .. }
                | crate::client::ClientError::CaAndPins { .. },
            ) => return Exit::Usage,
            _ => {}
        }
        if let Some(err) = cause.downcast_ref::<turnout_rt::tls::TlsError>() {
            use turnout_rt::tls::TlsError;
            return match err {
                TlsError::PinMismatch { .. } | TlsError::Invalid { .. } => Exit::Untrusted,
                TlsError::BadPin(_) | TlsError::NotHttps(_) => Exit::Usage,
                TlsError::BadCertificate(_) | TlsError::NoCertificates => Exit::Input,
                TlsError::Connect { .. } => Exit::Failure,
            };
        }
        if cause.is::<crate::tls::TlsSetupError>() {
            return Exit::Input;
        }
        if let Some(crate::client::ClientError::BadToken) =
            cause.downcast_ref::<crate::client::ClientError>()
        {
            return Exit::Input;
        }
        if let Some(crate::client::ClientError::Api { status, .. }) =
            cause.downcast_ref::<crate::client::ClientError>()
        {
            return match status {
                401 | 403 => Exit::Denied,
                409 => Exit::Refused,
                422 => Exit::Rejected,
                400..=499 => Exit::Input,
                _ => Exit::Failure,
            };
        }
        // A database this build must not use: written by a newer build, or
        // not a database. A restart cannot fix either (the unit does not retry 3).
        if let Some(err) = cause.downcast_ref::<crate::store::StoreError>() {
            match err {
                crate::store::StoreError::Newer { .. }
                | crate::store::StoreError::Corrupt { .. } => {
                    return Exit::Input;
                }
                crate::store::StoreError::Sqlite { source, .. }
                    if matches!(
                        source.sqlite_error_code(),
                        Some(
                            rusqlite::ErrorCode::NotADatabase
                                | rusqlite::ErrorCode::DatabaseCorrupt
                        )
                    ) =>
                {
                    return Exit::Input;
                }
                _ => {}
            }
        }
        if cause.is::<crate::spec::SpecError>() {
            return Exit::Input;
        }
        if cause.is::<KeyError>() || cause.is::<ManifestError>() || cause.is::<InputError>() {
            return Exit::Input;
        }
    }
    Exit::Failure
}
