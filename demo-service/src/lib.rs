//! The demo service (`turnout demo-service`, hidden; `turnout-agent demo-service` in test builds): a tiny HTTP
//! server that tests, the demo and the benchmarks pack into bundles.
//!
//! Its behaviour comes from a file inside its payload, so two bundles of the
//! same binary can be a good and a bad release:
//!
//! ```toml
//! version = "2.0.0"        # served at /version and in /healthz
//! mode = "healthy"         # healthy | unhealthy | fail-after | crash | slow-start | silent
//! after = "5s"             # fail-after: healthy this long, then 503; slow-start: delay before listening
//! ```
//!
//! `GET /healthz` answers `200 ok VERSION` or `503 unhealthy VERSION`. In
//! builds with the `fault-injection` feature (tests only, never a release),
//! `TURNOUT_DEMO_UNHEALTHY=2.0.0,…` in the environment makes this host's
//! copy of those versions unhealthy.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// What the demo service does.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Behaviour {
    /// Served at `/version`.
    pub version: String,
    /// How it behaves.
    pub mode: Mode,
    /// The delay for `fail-after` and `slow-start`.
    #[serde(default, with = "humantime_serde_opt")]
    pub after: Option<Duration>,
}

/// The behaviours a release can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Always healthy.
    Healthy,
    /// Unhealthy from the start.
    Unhealthy,
    /// Healthy for `after`, then unhealthy.
    FailAfter,
    /// Exits with status 1 at once.
    Crash,
    /// Waits `after` before listening, then healthy.
    SlowStart,
    /// Runs but never listens: its health endpoint refuses connections.
    Silent,
}

mod humantime_serde_opt {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|t| humantime::parse_duration(&t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Runs the demo service on `port` until killed. Returns only on error.
pub fn run(behaviour_file: &Path, port: u16) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(behaviour_file).map_err(|err| {
        anyhow::anyhow!(
            "cannot read the behaviour file {}: {err}",
            behaviour_file.display()
        )
    })?;
    #[cfg_attr(not(feature = "fault-injection"), allow(unused_mut))]
    let mut behaviour: Behaviour = toml::from_str(&text)?;
    // Fault injection for fleet tests: this host's copy of these versions is unhealthy.
    #[cfg(feature = "fault-injection")]
    if let Ok(versions) = std::env::var("TURNOUT_DEMO_UNHEALTHY")
        && versions.split(',').any(|v| v.trim() == behaviour.version)
    {
        behaviour.mode = Mode::Unhealthy;
    }
    let started = Instant::now();
    let after = behaviour.after.unwrap_or(Duration::from_secs(5));
    match behaviour.mode {
        Mode::Crash => anyhow::bail!(
            "demo service {} crashes on start, as its behaviour file says",
            behaviour.version
        ),
        Mode::SlowStart => std::thread::sleep(after),
        Mode::Silent => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
        Mode::Healthy | Mode::Unhealthy | Mode::FailAfter => {}
    }
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    println!(
        "demo service {} listening on 127.0.0.1:{port} ({:?})",
        behaviour.version, behaviour.mode
    );
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let (mode, version) = (behaviour.mode, behaviour.version.clone());
        let healthy = move || match mode {
            Mode::Healthy | Mode::SlowStart => true,
            Mode::Unhealthy | Mode::Crash | Mode::Silent => false,
            Mode::FailAfter => started.elapsed() < after,
        };
        std::thread::spawn(move || serve(stream, &healthy, &version));
    }
    Ok(())
}

/// Answers the requests of one connection, kept alive (HTTP/1.1) until the
/// client closes it, asks to (`Connection: close`), or is idle for 30 s.
fn serve(mut stream: TcpStream, healthy: &dyn Fn() -> bool, version: &str) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") else {
            if pending.len() > 16 * 1024 {
                return;
            }
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&pending[..end]).into_owned();
        pending.drain(..end + 4);
        let path = head.split_whitespace().nth(1).unwrap_or("/");
        let close = head.lines().any(|line| {
            let line = line.to_ascii_lowercase();
            line.starts_with("connection:") && line.contains("close")
        });
        let (status, body) = match path {
            "/healthz" if healthy() => ("200 OK", format!("ok {version}\n")),
            "/healthz" => ("503 Service Unavailable", format!("unhealthy {version}\n")),
            "/version" => ("200 OK", format!("{version}\n")),
            _ => ("404 Not Found", "not found\n".to_owned()),
        };
        let written = write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n{body}",
            body.len(),
            if close { "close" } else { "keep-alive" }
        );
        if written.is_err() || close {
            return;
        }
    }
}
