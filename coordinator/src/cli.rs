//! The `turnout` command line: the argument types, and dispatch to one module
//! per subcommand (`cmd/`).

use clap::{Parser, Subcommand};

use crate::cmd;
use crate::exit::Exit;

/// Turnout: roll services out across a fleet, wave by wave.
#[derive(Debug, Parser)]
#[command(name = "turnout", version, about, after_help = crate::exit::HELP)]
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
    /// Make an Ed25519 release key pair (PKCS#8 and SPKI PEM, as openssl writes).
    Keygen(cmd::keygen::Args),
    /// Make, rotate and check trust files (which keys hosts accept).
    #[command(subcommand)]
    Trust(cmd::trust::Command),
    /// Release floors and revocations, signed by the release keys.
    #[command(subcommand)]
    Policy(cmd::policy::Command),
    /// Pack a directory into a release bundle, optionally signing it.
    Pack(cmd::pack::Args),
    /// Add signatures to a bundle, in place and atomically.
    Sign(cmd::sign::Args),
    /// Verify a bundle against a trust file, as a host would.
    Verify(cmd::verify::Args),
    /// Show a bundle's manifest, files and signatures, trusting nothing.
    Inspect(cmd::inspect::Args),
    /// Run the coordinator server.
    Serve(cmd::serve::Args),
    /// The coordinator's own CA: rotate it, show it.
    #[command(subcommand)]
    Ca(cmd::ca::Command),
    /// The key the coordinator signs desired state with: rotate it, show it.
    #[command(subcommand)]
    Director(cmd::director::Command),
    /// Create, list and revoke operator and enrollment tokens.
    #[command(subcommand)]
    Token(cmd::fleet::TokenCommand),
    /// The fleet registry.
    #[command(subcommand)]
    Host(cmd::fleet::HostCommand),
    /// The coordinator's bundle store.
    #[command(subcommand)]
    Bundle(cmd::fleet::BundleCommand),
    /// Plan, start, watch and steer rollouts.
    #[command(subcommand)]
    Rollout(cmd::rollout::Command),
    /// The event log: who did what, when and why.
    Events(cmd::fleet::EventsArgs),
    /// Show the whole system on this machine: a coordinator, agents, three rollouts.
    #[cfg(feature = "agent")]
    Demo(crate::demo::Args),
    /// The demo service that the demo, tests and benchmarks pack into bundles.
    #[command(hide = true)]
    DemoService {
        /// Its behaviour file.
        #[arg(long)]
        behaviour: std::path::PathBuf,
        /// The port to listen on (127.0.0.1).
        #[arg(long)]
        port: u16,
    },
    /// Run the agent's command line from this binary (`turnout agent status`, …);
    /// its exit codes are the agent's (see `turnout-agent --help`).
    #[cfg(feature = "agent")]
    Agent {
        /// The agent's arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
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
        Command::Keygen(args) => cmd::keygen::run(&args),
        Command::Trust(command) => cmd::trust::run(command),
        Command::Policy(command) => cmd::policy::run(command),
        Command::Pack(args) => cmd::pack::run(&args),
        Command::Sign(args) => cmd::sign::run(&args),
        Command::Verify(args) => cmd::verify::run(&args),
        Command::Inspect(args) => cmd::inspect::run(&args),
        Command::Serve(args) => cmd::serve::run(&args),
        Command::Ca(command) => cmd::ca::run(command),
        Command::Director(command) => cmd::director::run(command),
        Command::Token(command) => cmd::fleet::token(command),
        Command::Host(command) => cmd::fleet::host(command),
        Command::Bundle(command) => cmd::fleet::bundle(command),
        Command::Rollout(command) => cmd::rollout::run(command),
        Command::Events(args) => cmd::fleet::events(&args),
        #[cfg(feature = "agent")]
        Command::Demo(args) => crate::demo::run(&args),
        Command::DemoService { behaviour, port } => {
            turnout_demo_service::run(&behaviour, port)?;
            Ok(Exit::Success)
        }
        #[cfg(feature = "agent")]
        Command::Agent { args } => {
            use clap::Parser as _;
            let cli = turnout_agent::cli::Cli::parse_from(
                std::iter::once(std::ffi::OsString::from("turnout-agent")).chain(args),
            );
            // The agent's own exit codes, so systemd units and scripts see the same contract.
            let exit = turnout_agent::cli::run(cli).unwrap_or_else(|err| {
                eprintln!("turnout-agent: {err:#}");
                turnout_agent::exit::classify(&err)
            });
            std::process::exit(exit as i32);
        }
    }
}

pub use turnout_rt::cli::quiet_on_closed_stdout;
