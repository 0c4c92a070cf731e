//! `turnout-agent run`: the daemon, and the lock that keeps one actor per
//! state directory.
//!
//! The daemon holds `STATE_DIR/agent.lock` for its lifetime; a local command
//! that finds no daemon takes the same lock for the length of its operation.
//! So the daemon and a command, or two commands, never act on the same slots
//! at once: the second one is refused with a clear message.

use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;

use crate::control::{self, SOCKET};
use crate::service::Agent;

/// The lock file's name in the state directory.
pub const LOCK: &str = "agent.lock";

/// Another process holds the state directory.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Held by someone else.
    #[error(
        "another turnout-agent is working in {0} (a daemon starting or stopping, or another command); \
         wait for it to finish, then try again"
    )]
    Held(PathBuf),
    /// The lock file could not be opened.
    #[error("cannot open the lock file {path}{}", permission_hint(source))]
    Open {
        /// The lock file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn permission_hint(source: &std::io::Error) -> &'static str {
    if source.kind() == std::io::ErrorKind::PermissionDenied {
        " (the state directory is root's: run this as root)"
    } else {
        ""
    }
}

/// Takes the state directory's lock; released when the file is dropped.
pub fn lock(state_dir: &Path) -> Result<File, LockError> {
    let path = state_dir.join(LOCK);
    std::fs::create_dir_all(state_dir).map_err(|source| LockError::Open {
        path: path.clone(),
        source,
    })?;
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| LockError::Open {
            path: path.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(LockError::Held(state_dir.to_owned())),
        Err(TryLockError::Error(source)) => Err(LockError::Open { path, source }),
    }
}

/// Recovers every service, then answers local commands until `shutdown`.
pub async fn run(
    agent: Arc<Agent>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    for (name, result) in agent.recover_all().await {
        if let Err(err) = result {
            // One broken service must not keep the others unmanaged.
            tracing::error!(service = %name, "recovery failed: {err}");
        }
    }
    let socket = agent.config().state_dir.join(SOCKET);
    match std::fs::remove_file(&socket) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err.into()),
        _ => {}
    }
    let listener = UnixListener::bind(&socket)?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!(
        "ready: {} service(s), control socket {}",
        agent.config().services.len(),
        socket.display()
    );
    let state_dir = agent.config().state_dir.clone();
    let me =
        tokio::task::spawn_blocking(move || crate::upgrade::switch::identify(&state_dir)).await?;
    tracing::info!(
        "this agent is {} {}{}",
        crate::upgrade::SELF_SERVICE,
        me.release.version,
        me.dir
            .as_ref()
            .map_or(" (the installed binary)".to_owned(), |d| format!(
                " (release {d})"
            ))
    );
    agent.set_myself(me);
    let link = tokio::spawn(crate::link::follow(Arc::clone(&agent)));
    let monitors: Vec<_> = agent
        .service_names()
        .into_iter()
        .map(|name| {
            let agent = Arc::clone(&agent);
            tokio::spawn(async move { agent.monitor(&name).await })
        })
        .collect();
    turnout_rt::notify::notify(&format!("READY=1\nSTATUS={}", agent.status_line()));
    let watchdog = tokio::spawn(turnout_rt::notify::keep_watchdog());
    let freeze = tokio::spawn(turnout_rt::notify::freeze_switch());
    let settle = tokio::spawn(crate::upgrade::switch::settle(
        Arc::clone(&agent),
        std::time::Instant::now(),
    ));
    control::serve(Arc::clone(&agent), listener, shutdown).await;
    turnout_rt::notify::notify("STOPPING=1\nSTATUS=stopping");
    watchdog.abort();
    freeze.abort();
    settle.abort();
    monitors.iter().for_each(tokio::task::JoinHandle::abort);
    link.abort();
    tracing::info!("stopping");
    agent.stop_exec_services().await;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
