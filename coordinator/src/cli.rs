//! The `turnout` command line: one function per subcommand.

use clap::{Parser, Subcommand};

use crate::exit::Exit;

/// Turnout: roll services out across a fleet, wave by wave.
#[derive(Debug, Parser)]
#[command(name = "turnout", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `turnout`'s subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show this build's version, protocol versions and capabilities.
    Version {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Runs one command; the returned value is the process's exit status.
pub fn run(cli: Cli) -> anyhow::Result<Exit> {
    match cli.command {
        Command::Version { json } => {
            let offer = crate::offer();
            if json {
                println!("{}", serde_json::to_string_pretty(&offer)?);
            } else {
                println!("{offer}");
            }
            Ok(Exit::Success)
        }
    }
}
