//! `turnout-agent` entry point: parse arguments, run, map the outcome to an exit code.

use std::process::ExitCode;

use clap::Parser;
use turnout_agent::cli::{Cli, run};
use turnout_agent::exit::classify;

fn main() -> ExitCode {
    turnout_agent::cli::quiet_on_closed_stdout();
    match run(Cli::parse()) {
        Ok(exit) => exit.into(),
        Err(err) => {
            eprintln!(
                "turnout-agent: {}",
                turnout_proto::text::clean_lines(&format!("{err:#}"))
            );
            classify(&err).into()
        }
    }
}
