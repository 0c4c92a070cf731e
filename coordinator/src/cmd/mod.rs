//! One module per `turnout` subcommand: its arguments and its `run`.

pub mod ca;
pub mod director;
pub mod fleet;
pub mod inspect;
pub mod keygen;
pub mod pack;
pub mod policy;
pub mod remote;
pub mod rollout;
pub mod serve;
pub mod sign;
pub mod trust;
pub mod verify;
