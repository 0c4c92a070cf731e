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
//! fields they do not know, and a request the daemon cannot read is
//! answered with an error that says to restart the daemon.

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

/// Answers requests on `listener` until `shutdown` resolves.
pub async fn serve(
    agent: Arc<Agent>,
    listener: UnixListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let agent = Arc::clone(&agent);
                tokio::spawn(async move { answer(agent, stream).await });
            }
        }
    }
}

async fn answer(agent: Arc<Agent>, stream: tokio::net::UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(read.take(64 * 1024));
    let response = match reader.read_line(&mut line).await {
        Err(err) => Response::Error {
            message: format!("reading the request: {err}"),
            exit: Exit::Usage as u8,
        },
        Ok(_) => match read_request(&line) {
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
    let version = value
        .get("v")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
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
