//! One module per `turnout` subcommand: its arguments and its `run`.

pub mod inspect;
pub mod keygen;
pub mod pack;
pub mod sign;
pub mod trust;
pub mod verify;
