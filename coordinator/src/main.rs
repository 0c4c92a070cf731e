//! `turnout` entry point: parse arguments, run, map the outcome to an exit code.

use std::process::ExitCode;

use clap::Parser;
use turnout::cli::{Cli, run};
use turnout::exit::classify;

fn main() -> ExitCode {
    turnout::cli::quiet_on_closed_stdout();
    match run(Cli::parse()) {
        Ok(exit) => exit.into(),
        Err(err) => {
            eprintln!(
                "turnout: {}",
                turnout::cmd::remote::clean_lines(&format!("{err:#}"))
            );
            classify(&err).into()
        }
    }
}
