//! The wall clock, injected: daemons take an `Arc<dyn Clock>` so that
//! tests can set the time (bundle expiry, event timestamps) instead of
//! waiting for it. Durations and deadlines use `tokio::time`, which tests
//! pause and advance; this clock is for instants that are written down or
//! compared with signed times.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where the time of day comes from.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Now.
    fn now(&self) -> SystemTime;

    /// Milliseconds since the Unix epoch (0 before it).
    fn now_ms(&self) -> u64 {
        self.now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

impl SystemClock {
    /// The system clock, shared.
    pub fn shared() -> Arc<dyn Clock> {
        Arc::new(SystemClock)
    }
}

/// A clock that moves only when told to.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<SystemTime>,
}

impl ManualClock {
    /// A clock stopped at `at`.
    pub fn at(at: SystemTime) -> Arc<ManualClock> {
        Arc::new(ManualClock {
            now: Mutex::new(at),
        })
    }

    /// A clock stopped at `ms` milliseconds after the epoch.
    pub fn at_ms(ms: u64) -> Arc<ManualClock> {
        ManualClock::at(UNIX_EPOCH + Duration::from_millis(ms))
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        *self.now.lock().unwrap_or_else(|p| p.into_inner()) += by;
    }

    /// The time `by` after now by this clock.
    pub fn now_plus(&self, by: Duration) -> SystemTime {
        self.now() + by
    }

    /// Sets the clock to `at` (which may be earlier: a clock stepped back).
    pub fn set(&self, at: SystemTime) {
        *self.now.lock().unwrap_or_else(|p| p.into_inner()) = at;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.now.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Milliseconds since the epoch by the system clock, for the few places
/// that stamp a file name or a log and have no clock of their own.
pub fn system_now_ms() -> u64 {
    SystemClock.now_ms()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let clock = ManualClock::at_ms(1_000);
        assert_eq!(clock.now_ms(), 1_000);
        clock.advance(Duration::from_millis(500));
        assert_eq!(clock.now_ms(), 1_500);
        clock.set(UNIX_EPOCH + Duration::from_secs(1));
        assert_eq!(clock.now_ms(), 1_000);
    }

    #[test]
    fn before_the_epoch_is_zero() {
        let clock = ManualClock::at(UNIX_EPOCH - Duration::from_secs(5));
        assert_eq!(clock.now_ms(), 0);
    }
}
