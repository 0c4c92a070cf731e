//! `turnout ca`: the coordinator's own CA, on the coordinator's machine
//! (it works on the state directory, as `turnout serve --init` does).

use std::path::PathBuf;
use std::time::SystemTime;

use clap::Subcommand;

use crate::cmd::remote::when;
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
    },
    /// Show the CAs agents trust and a rotation under way.
    Status {
        /// The coordinator's state directory.
        #[arg(long, default_value = "/var/lib/turnout-coordinator")]
        state_dir: PathBuf,
    },
}

/// Runs a CA command.
pub fn run(command: Command) -> anyhow::Result<Exit> {
    match command {
        Command::Rotate { state_dir, grace } => {
            let paths = tls::Paths::in_state_dir(&state_dir);
            let rotation = tls::rotate(&paths, grace.into(), SystemTime::now())?;
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
            let paths = tls::Paths::in_state_dir(&state_dir);
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
