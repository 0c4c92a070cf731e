//! `turnout-rt`: the plumbing both daemons share, so neither borrows the
//! other's: an injectable [`clock`], [`log`] set-up on `tracing`, systemd
//! [`notify`] and watchdog, the [`shutdown`] signal, SQLite [`sqlite`] opening
//! and migrations, [`files`] written atomically, and [`hex`], the [`cli`]'s closed-pipe rule, and
//! [`tls`] for the coordinator's clients (pins, first contact, trusted CAs).

pub mod cli;
pub mod clock;
pub mod files;
pub mod hex;
pub mod log;
pub mod net;
pub mod notify;
pub mod shutdown;
pub mod sqlite;
pub mod tls;

pub use clock::{Clock, ManualClock, SystemClock};
