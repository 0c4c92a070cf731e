//! `turnout ca`: the coordinator's own CA, on the coordinator's machine
//! (it works on the state directory, as `turnout serve --init` does).

use std::path::PathBuf;
use std::time::SystemTime;

use clap::Subcommand;

use crate::cmd::remote::when;
use crate::profile::Profile;

/// The shortest grace `ca rotate` takes: hosts check every 5 minutes.
const MIN_GRACE: std::time::Duration = std::time::Duration::from_secs(3600);
use crate::exit::Exit;
use crate::tls;

/// `turnout ca …`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a CA rotation: a new CA that agents learn and trust beside the
    /// old one, the server's certificate reissued under it (the running
    /// coordinator picks it up), and the old CA dropped after --grace. Hosts
    /// keep working throughout; none enrolls again.
    Rotate {
        /// The coordinator's state directory.
        #[arg(long, default_value = "/var/lib/turnout-coordinator")]
        state_dir: PathBuf,
        /// How long both CAs are trusted; agents fetch the new one within
        /// minutes, so a day is plenty for hosts that are up.
        #[arg(long, default_value = "7d")]
        grace: humantime::Duration,
        /// Allow a grace under an hour (tests): hosts check for new CAs only
        /// every 30 rounds, and any still trusting only the old CA when it
        /// is dropped must enroll again.
        #[arg(long, hide = true)]
        allow_short_grace: bool,
        /// The operator profile whose CA to update [default: the standard one].
        #[arg(long, env = "TURNOUT_PROFILE")]
        profile: Option<PathBuf>,
    },
    /// Show the CAs agents trust and a rotation under way.
    Status {
        /// The coordinator's state directory.
        #[arg(long, default_value = "/var/lib/turnout-coordinator")]
        state_dir: PathBuf,
    },
}

/// Refuses a state directory without a CA of the coordinator's own, and
/// says what to do instead.
fn own_ca(state_dir: &std::path::Path) -> Option<tls::Paths> {
    let paths = tls::Paths::in_state_dir(state_dir);
    if paths.ca.exists() {
        return Some(paths);
    }
    eprintln!(
        "turnout: {} has no CA of the coordinator's own: expected the state directory of a coordinator set up \
         with `turnout serve --init` (check --state-dir). A coordinator that serves your certificate \
         (--tls-cert) uses your CA: to rotate it, first serve a chain that carries both CAs (server certificate, \
         old CA, new CA; agents learn the CAs that follow the server's certificate within minutes), then one \
         with a server certificate from the new CA; see docs/operations.md",
        paths.ca.display()
    );
    None
}

/// Runs a CA command.
pub fn run(command: Command) -> anyhow::Result<Exit> {
    match command {
        Command::Rotate {
            state_dir,
            grace,
            allow_short_grace,
            profile,
        } => {
            let grace: std::time::Duration = grace.into();
            if grace < MIN_GRACE && !allow_short_grace {
                eprintln!(
                    "turnout: --grace {}: expected at least {}: hosts ask for new CAs every 30 rounds (5 minutes at a 10 s report interval), and one that has not asked when the old CA is dropped must enroll again",
                    humantime::format_duration(grace),
                    humantime::format_duration(MIN_GRACE)
                );
                return Ok(Exit::Usage);
            }
            let Some(paths) = own_ca(&state_dir) else {
                return Ok(Exit::Input);
            };
            let rotation = tls::rotate(&paths, grace, SystemTime::now())?;
            // The operator profile on this machine trusts both from now on,
            // and the new one after the grace.
            if let Some(mut found) = Profile::load(profile.as_deref()).ok().flatten()
                && found.ca.is_some()
            {
                found.ca = Some(std::fs::read_to_string(&paths.ca)?);
                let path = profile.or_else(crate::profile::default_path);
                if let Some(path) = path {
                    crate::files::write_atomic(
                        &path,
                        toml::to_string_pretty(&found)?.as_bytes(),
                        0o600,
                        false,
                    )?;
                    println!(
                        "updated the operator profile {} to trust both CAs",
                        path.display()
                    );
                }
            }
            println!("new CA {} beside {}", rotation.new, rotation.old);
            println!(
                "agents trust both from their next check (within 5 minutes); the server certificate is now from the new CA \
                 (a running coordinator serves it within 10 s); the old CA is dropped at {}",
                when(rotation.until_ms)
            );
            println!(
                "join lines carry both pins until then; new hosts may join with {}",
                rotation.new
            );
            Ok(Exit::Success)
        }
        Command::Status { state_dir } => {
            let Some(paths) = own_ca(&state_dir) else {
                return Ok(Exit::Input);
            };
            for pin in tls::pins(&paths)? {
                println!("trusted CA {pin}");
            }
            match tls::rotation(&paths)? {
                Some(r) => println!(
                    "rotating from {} to {}; the old CA is dropped at {}",
                    r.old,
                    r.new,
                    when(r.until_ms)
                ),
                None => println!("no rotation under way"),
            }
            Ok(Exit::Success)
        }
    }
}
