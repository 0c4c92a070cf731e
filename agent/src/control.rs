//! The daemon's control socket: how local commands ask a running
//! `turnout-agent run` to act, instead of acting behind its back.
//!
//! One JSON request per connection, one JSON line back, over the Unix socket
//! `STATE_DIR/agent.sock` (mode 0600: root only).
//!
//! | request                                              | answer              |
//! |------------------------------------------------------|---------------------|
//! | `{"op":"status"}`                                    | `{"status":[…]}`    |
//! | `{"op":"install","service":S,"bundle":P,"trust":T?}` | `{"done":{…}}`      |
//! | `{"op":"rollback","service":S}`                      | `{"done":{…}}`      |
//! | any failure                                          | `{"error":{"message":M,"exit":N}}` |
//!
//! Versioned for upgrades, when a new `turnout-agent` binary talks to the
//! daemon still running the old one: a request carries `"v"`
//! ([`CONTROL_VERSION`]; absent means 0, before versions), readers ignore
//! fields they do not know (a newer request whose `op` this daemon knows is
//! served), and a request the daemon cannot read is answered with an error
//! that says to restart the daemon.
//!
//! A client has 10 s to send its line (at most 64 KiB); at most 64 are
//! answered at once, and more are told to try again, so neither a stuck
//! local tool nor a flood can wedge the daemon.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

use crate::exit::{Exit, classify_agent};
use crate::service::{Agent, AgentError, OperationResult, ServiceStatus};

/// The socket's file name in the state directory.
pub const SOCKET: &str = "agent.sock";

/// The control messages' version this build speaks.
pub const CONTROL_VERSION: u32 = 1;

/// A local command's request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Every service's status.
    Status,
    /// Install a bundle on a service.
    Install {
        /// The service.
        service: String,
        /// The bundle's path on this host.
        bundle: PathBuf,
        /// A trust file other than the configured one.
        trust: Option<PathBuf>,
    },
    /// Roll a service back to its other slot.
    Rollback {
        /// The service.
        service: String,
    },
    /// The coordinator link's state.
    Link,
}

/// The daemon's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// Answer to `status`.
    Status(Vec<ServiceStatus>),
    /// Answer to `install` or `rollback`.
    Done(OperationResult),
    /// Answer to `link`.
    Link(crate::link::LinkStatus),
    /// The request failed.
    Error {
        /// What went wrong.
        message: String,
        /// The exit code the command should end with.
        exit: u8,
    },
}

/// Sends `request` to the daemon at `socket`; `None` when no daemon listens.
pub fn call(socket: &Path, request: &Request) -> Result<Option<Response>, AgentError> {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return Ok(None);
    };
    let failed = |detail: String| AgentError::Control {
        socket: socket.to_owned(),
        detail,
    };
    let mut message = serde_json::to_value(request).expect("requests serialise");
    message["v"] = CONTROL_VERSION.into();
    let mut line = serde_json::to_vec(&message).expect("requests serialise");
    line.push(b'\n');
    stream.write_all(&line).map_err(|e| failed(e.to_string()))?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(|e| failed(e.to_string()))?;
    if answer.is_empty() {
        return Err(failed(
            "the daemon closed the connection without answering (did it stop?)".into(),
        ));
    }
    serde_json::from_str(&answer)
        .map(Some)
        .map_err(|e| failed(format!("unreadable answer: {e}")))
}

/// How the control socket guards the daemon against a stuck or flooding
/// local client.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections answered at once; more are told to try again and closed.
    pub max_connections: usize,
    /// How long a client has to send its request line.
    pub request_timeout: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 64,
            request_timeout: std::time::Duration::from_secs(10),
        }
    }
}

/// The longest request line read.
const MAX_REQUEST: u64 = 64 * 1024;

/// Answers requests on `listener` until `shutdown` resolves.
pub async fn serve(
    agent: Arc<Agent>,
    listener: UnixListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    serve_with(agent, listener, shutdown, Limits::default()).await;
}

/// [`serve`] with other [`Limits`] (tests).
pub async fn serve_with(
    agent: Arc<Agent>,
    listener: UnixListener,
    shutdown: impl std::future::Future<Output = ()>,
    limits: Limits,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let mut complained: Option<tokio::time::Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of descriptors, most often: say so (not in a flood),
                // and give connections a moment to finish instead of
                // spinning on a listener that stays readable.
                if complained.is_none_or(|at| at.elapsed() >= std::time::Duration::from_secs(10)) {
                    complained = Some(tokio::time::Instant::now());
                    tracing::warn!("the control socket cannot accept a connection: {err}");
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tokio::spawn(refuse_busy(stream, limits.max_connections));
            continue;
        };
        let agent = Arc::clone(&agent);
        tokio::spawn(async move {
            answer(agent, stream, limits.request_timeout).await;
            drop(slot);
        });
    }
}

async fn refuse_busy(mut stream: tokio::net::UnixStream, max: usize) {
    let response = Response::Error {
        message: format!(
            "the daemon is answering {max} local commands already (the most it takes at once); try again"
        ),
        exit: Exit::Failure as u8,
    };
    let mut bytes = serde_json::to_vec(&response).expect("responses serialise");
    bytes.push(b'\n');
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), stream.write_all(&bytes)).await;
}

async fn answer(agent: Arc<Agent>, stream: tokio::net::UnixStream, timeout: std::time::Duration) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(read.take(MAX_REQUEST));
    let response = match tokio::time::timeout(timeout, reader.read_line(&mut line)).await {
        Err(_) => Response::Error {
            message: format!(
                "no request line within {}; closing",
                humantime::format_duration(timeout)
            ),
            exit: Exit::Usage as u8,
        },
        Ok(Err(err)) => Response::Error {
            message: format!("reading the request: {err}"),
            exit: Exit::Usage as u8,
        },
        Ok(Ok(_)) if !line.ends_with('\n') && line.len() as u64 >= MAX_REQUEST => Response::Error {
            message: format!("the request is longer than {MAX_REQUEST} bytes, the most read"),
            exit: Exit::Usage as u8,
        },
        Ok(Ok(_)) => match read_request(&line) {
            Err(message) => Response::Error {
                message,
                exit: Exit::Usage as u8,
            },
            Ok(request) => handle(&agent, request).await,
        },
    };
    let mut bytes = serde_json::to_vec(&response).expect("responses serialise");
    bytes.push(b'\n');
    let _ = write.write_all(&bytes).await;
}

/// A request line, or why it cannot be read: from a newer client, the
/// answer says to restart this daemon (the binary was upgraded under it).
fn read_request(line: &str) -> Result<Request, String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|err| format!("malformed request: {err}"))?;
    let version = match value.get("v") {
        None => 0,
        Some(v) => v.as_u64().ok_or_else(|| {
            format!("malformed request: \"v\" is the control version, a whole number; found {v}")
        })?,
    };
    serde_json::from_value(value).map_err(|err| {
        if version > u64::from(CONTROL_VERSION) {
            format!(
                "this daemon speaks control version {CONTROL_VERSION} and cannot read a version {version} request ({err}); the agent binary was upgraded under a running daemon: restart it (systemctl restart turnout-agent)"
            )
        } else {
            format!("malformed request: {err}")
        }
    })
}

/// Performs one request on the agent.
pub async fn handle(agent: &Agent, request: Request) -> Response {
    let result = match request {
        Request::Status => agent.status().await.map(Response::Status),
        Request::Install {
            service,
            bundle,
            trust,
        } => agent
            .install(&service, &bundle, trust.as_deref())
            .await
            .map(Response::Done),
        Request::Rollback { service } => agent.rollback(&service).await.map(Response::Done),
        Request::Link => Ok(Response::Link(
            agent.link().lock().expect("not poisoned").clone(),
        )),
    };
    result.unwrap_or_else(|err| Response::Error {
        message: err.to_string(),
        exit: classify_agent(&err) as u8,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_read_with_or_without_a_version_and_ignore_unknown_fields() {
        for line in [
            r#"{"op":"status"}"#,
            r#"{"op":"status","v":1}"#,
            r#"{"op":"status","v":1,"later":"field"}"#,
        ] {
            assert!(matches!(read_request(line), Ok(Request::Status)), "{line}");
        }
        let install = read_request(
            r#"{"v":1,"op":"install","service":"web","bundle":"/b.tnt","trust":null,"dry_run":true}"#,
        )
        .unwrap();
        assert!(matches!(install, Request::Install { service, .. } if service == "web"));
    }

    #[test]
    fn a_version_that_is_no_whole_number_is_refused_by_name() {
        for line in [
            r#"{"v":-1,"op":"status"}"#,
            r#"{"v":"1","op":"status"}"#,
            r#"{"v":1.5,"op":"status"}"#,
        ] {
            let err = read_request(line).unwrap_err();
            assert!(
                err.contains("\"v\" is the control version, a whole number"),
                "{line}: {err}"
            );
        }
    }

    #[test]
    fn a_newer_request_this_daemon_cannot_read_says_to_restart_it() {
        let err = read_request(r#"{"v":2,"op":"reticulate","service":"web"}"#).unwrap_err();
        assert!(err.contains("restart it"), "{err}");
        assert!(err.contains("control version 1"), "{err}");
        let err = read_request(r#"{"op":"reticulate"}"#).unwrap_err();
        assert!(err.starts_with("malformed request"), "{err}");
        let err = read_request("not json").unwrap_err();
        assert!(err.starts_with("malformed request"), "{err}");
    }
}
