//! systemd's notification protocol (`sd_notify`), spoken directly: one
//! datagram of `KEY=value` lines to the socket named by `$NOTIFY_SOCKET`
//! (a path, or an abstract name starting with `@`). Without that variable
//! (not started by systemd) every call does nothing.
//!
//! Both daemons send `READY=1` when they really are ready, `STATUS=` lines
//! for `systemctl status`, `WATCHDOG=1` from their main loop, and
//! `STOPPING=1` on the way out.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Sends `state` (newline-separated `KEY=value` lines); false if not under systemd.
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let Ok(socket) = UnixDatagram::unbound() else {
        return false;
    };
    let path = path.to_string_lossy().into_owned();
    let sent = match path.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .and_then(|address| socket.send_to_addr(state.as_bytes(), &address))
        }
        None => socket.send_to(state.as_bytes(), &path),
    };
    sent.is_ok()
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, when the
/// watchdog is on and meant for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok()? != std::process::id()
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Pings the watchdog from the task that calls it, forever. Run it on the
/// daemon's main runtime: if that runtime wedges, the pings stop and systemd
/// restarts the daemon.
pub async fn keep_watchdog() {
    let Some(interval) = watchdog_interval() else {
        return std::future::pending().await;
    };
    loop {
        notify("WATCHDOG=1");
        tokio::time::sleep(interval).await;
    }
}

/// Like [`keep_watchdog`], but pings only while `healthy(period)` says the
/// daemon's real work goes on (`period` is the whole watchdog timeout): a
/// runtime that still schedules timers while its main loop is stuck or
/// failing must not keep systemd from restarting it.
pub async fn keep_watchdog_while(healthy: impl Fn(Duration) -> bool) {
    let Some(interval) = watchdog_interval() else {
        return std::future::pending().await;
    };
    let mut complained = false;
    loop {
        if healthy(interval * 2) {
            notify("WATCHDOG=1");
            complained = false;
        } else if !complained {
            complained = true;
            tracing::error!(
                "the main loop has not completed a round within the watchdog timeout; not pinging the watchdog"
            );
        }
        tokio::time::sleep(interval).await;
    }
}

/// Test-only (the `fault-injection` feature): when the file named by
/// `TURNOUT_TEST_FREEZE` appears, block the runtime's thread for good, as a
/// wedged main loop would. Without the feature it never returns and does
/// nothing.
#[cfg(feature = "fault-injection")]
pub async fn freeze_switch() {
    let Some(path) = std::env::var_os("TURNOUT_TEST_FREEZE") else {
        return std::future::pending().await;
    };
    loop {
        if std::path::Path::new(&path).exists() {
            tracing::warn!("the test freeze switch is set; wedging the main loop");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Without the `fault-injection` feature there is no freeze switch.
#[cfg(not(feature = "fault-injection"))]
pub async fn freeze_switch() {
    std::future::pending().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datagram_reaches_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        // The sender runs as a child with the variable set (set_var would be unsafe).
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "notify::tests::child_sends_ready", "--nocapture"])
            .env("NOTIFY_SOCKET", &path)
            .env("TURNOUT_NOTIFY_CHILD", "1")
            .status()
            .unwrap();
        assert!(status.success());
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=ready");
    }

    #[test]
    fn child_sends_ready() {
        if std::env::var_os("TURNOUT_NOTIFY_CHILD").is_some() {
            assert!(notify("READY=1\nSTATUS=ready"));
        }
    }

    #[test]
    fn without_systemd_nothing_is_sent() {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            assert!(!notify("READY=1"));
        }
    }
}
