//! The agent's journal: each service's [`State`] and a bounded history of
//! outcomes, in SQLite (`agent.db`, WAL, `synchronous=FULL`).
//!
//! A state change and the outcome it records are one transaction, committed
//! before any effect of the change runs. The schema evolves by append-only
//! migrations keyed by `PRAGMA user_version`; a database from a newer agent
//! is refused rather than guessed at.
//!
//! Test-only fault hook: with `TURNOUT_AGENT_CRASH_AFTER_STEP=N` in the
//! environment, the process kills itself with SIGKILL right after the N-th
//! state change is committed. The crash tests use it to stop the agent
//! between every pair of steps.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};
use turnout_proto::messages::{OutcomeKind, ReleaseRef};

use crate::machine::State;

/// The environment variable of the fault hook (test builds only).
#[cfg(feature = "fault-injection")]
pub const CRASH_HOOK: &str = "TURNOUT_AGENT_CRASH_AFTER_STEP";

/// How many outcomes are kept per service.
pub const HISTORY_KEPT: i64 = 100;

/// Schema migrations, in order; entry `i` moves `user_version` from `i` to `i + 1`.
/// Append only: a released migration never changes.
const MIGRATIONS: &[&str] = &[
    // 1: services and their history.
    "CREATE TABLE services (
         name TEXT PRIMARY KEY,
         state TEXT NOT NULL,
         updated_ms INTEGER NOT NULL
     );
     CREATE TABLE history (
         id INTEGER PRIMARY KEY AUTOINCREMENT,
         service TEXT NOT NULL,
         kind TEXT NOT NULL,
         release TEXT,
         reason TEXT NOT NULL,
         at_ms INTEGER NOT NULL
     );
     CREATE INDEX history_by_service ON history (service, id);",
];

/// Why the journal failed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// SQLite failed.
    #[error("the journal {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// Written by a newer agent.
    #[error(
        "the journal {path} has schema version {found}, but this agent knows versions up to {known}: \
         it was written by a newer turnout-agent. Run that version, or move the file away to start afresh \
         (the slots on disk are kept)"
    )]
    Newer {
        /// The database file.
        path: PathBuf,
        /// Its schema version.
        found: i64,
        /// The newest this build knows.
        known: i64,
    },
    /// The file is not a database, or a corrupt one.
    #[error(
        "the journal {path} is damaged ({detail}): move it away (e.g. `mv {path} {path}.damaged`) and start the agent again; \
         it rebuilds what each service runs from the slots on disk and leaves running services alone"
    )]
    Damaged {
        /// The database file.
        path: PathBuf,
        /// SQLite's complaint.
        detail: String,
    },
    /// A stored state that does not decode.
    #[error("the journal {path} holds an unreadable state for {service}: {detail}")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// The service.
        service: String,
        /// The decoder's complaint.
        detail: String,
    },
}

impl JournalError {
    /// A SQLite error that means the file is damaged, as [`JournalError::Damaged`]
    /// (which says what to do); any other error as it is.
    fn named_if_damage(self) -> JournalError {
        match self {
            JournalError::Sqlite { path, source } if Self::is_damage_code(&source) => {
                JournalError::Damaged {
                    path,
                    detail: source.to_string(),
                }
            }
            other => other,
        }
    }

    fn is_damage_code(source: &rusqlite::Error) -> bool {
        matches!(
            source,
            rusqlite::Error::SqliteFailure(e, _)
                if matches!(e.code, rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
        )
    }

    /// Whether the file itself is damaged (not a database, or corrupt): a
    /// restart cannot help, an operator must move it away.
    pub fn is_damage(&self) -> bool {
        match self {
            JournalError::Corrupt { .. } | JournalError::Damaged { .. } => true,
            JournalError::Sqlite { source, .. } => Self::is_damage_code(source),
            _ => false,
        }
    }
}

/// One outcome in the history.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HistoryEntry {
    /// How it ended.
    pub kind: OutcomeKind,
    /// The release concerned.
    pub release: Option<ReleaseRef>,
    /// Why.
    pub reason: String,
    /// When, ms since the epoch.
    pub at_ms: u64,
}

/// The open journal.
pub struct Journal {
    conn: Connection,
    path: PathBuf,
    steps: u64,
    crash_after: Option<u64>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Journal({})", self.path.display())
    }
}

impl Journal {
    /// Opens (creating if needed) and migrates the journal at `path`.
    pub fn open(path: &Path) -> Result<Journal, JournalError> {
        let damaged = |err: JournalError| err.named_if_damage();
        let sqlite = |source| {
            damaged(JournalError::Sqlite {
                path: path.to_owned(),
                source,
            })
        };
        let conn =
            match turnout_rt::sqlite::open(path, turnout_rt::sqlite::Durability::Full, MIGRATIONS)
                .map_err(sqlite)?
            {
                turnout_rt::sqlite::Opened::Current(conn) => conn,
                turnout_rt::sqlite::Opened::Newer { found, known } => {
                    return Err(JournalError::Newer {
                        path: path.to_owned(),
                        found,
                        known,
                    });
                }
            };
        #[cfg(feature = "fault-injection")]
        let crash_after = std::env::var(CRASH_HOOK).ok().and_then(|n| n.parse().ok());
        #[cfg(not(feature = "fault-injection"))]
        let crash_after = None;
        Ok(Journal {
            conn,
            path: path.to_owned(),
            steps: 0,
            crash_after,
        })
    }

    fn sqlite(&self, source: rusqlite::Error) -> JournalError {
        // Damage found after opening (a page read later) says the same as
        // damage found at open: what it is, and what to do.
        JournalError::Sqlite {
            path: self.path.clone(),
            source,
        }
        .named_if_damage()
    }

    /// Whether the journal holds a state for `service` at all.
    pub fn knows(&self, service: &str) -> Result<bool, JournalError> {
        self.conn
            .query_row("SELECT 1 FROM services WHERE name = ?1", [service], |_| {
                Ok(())
            })
            .optional()
            .map(|row| row.is_some())
            .map_err(|e| self.sqlite(e))
    }

    /// The service's state; a service never seen is idle with nothing committed.
    pub fn state(&self, service: &str) -> Result<State, JournalError> {
        let text: Option<String> = self
            .conn
            .query_row(
                "SELECT state FROM services WHERE name = ?1",
                [service],
                |row| row.get(0),
            )
            .optional()
            .map_err(|e| self.sqlite(e))?;
        match text {
            None => Ok(State::Idle { committed: None }),
            Some(text) => serde_json::from_str(&text).map_err(|err| JournalError::Corrupt {
                path: self.path.clone(),
                service: service.to_owned(),
                detail: err.to_string(),
            }),
        }
    }

    /// Commits the service's new state and the outcomes it records, in one transaction.
    pub fn persist(
        &mut self,
        service: &str,
        state: &State,
        records: &[HistoryEntry],
        now_ms: u64,
    ) -> Result<(), JournalError> {
        let encoded = serde_json::to_string(state).expect("states serialise");
        let tx = self.conn.transaction().map_err(|e| JournalError::Sqlite {
            path: self.path.clone(),
            source: e,
        })?;
        let result = (|| {
            tx.execute(
                "INSERT INTO services (name, state, updated_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET state = excluded.state, updated_ms = excluded.updated_ms",
                params![service, encoded, now_ms as i64],
            )?;
            for record in records {
                let release = record
                    .release
                    .as_ref()
                    .map(|r| serde_json::to_string(r).expect("releases serialise"));
                tx.execute(
                    "INSERT INTO history (service, kind, release, reason, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![service, record.kind.as_str(), release, record.reason, record.at_ms as i64],
                )?;
            }
            tx.execute(
                "DELETE FROM history WHERE service = ?1 AND id <= (SELECT MAX(id) FROM history WHERE service = ?1) - ?2",
                params![service, HISTORY_KEPT],
            )?;
            tx.commit()
        })();
        result.map_err(|e| self.sqlite(e))?;
        self.steps += 1;
        if self.crash_after == Some(self.steps) {
            // The fault hook: die as abruptly as a power cut would allow.
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
        Ok(())
    }

    /// Writes a consistent copy of the journal to `path` (which must not
    /// exist): kept before an agent switch, put back if it is reverted.
    pub fn snapshot_to(&self, path: &Path) -> Result<(), JournalError> {
        self.conn
            .execute("VACUUM INTO ?1", [path.to_string_lossy()])
            .map(|_| ())
            .map_err(|e| self.sqlite(e))
    }

    /// Forgets every outcome of `service` concerning the release with
    /// bundle digest `sha256`: how an operator lets a release that failed
    /// be tried again, without an outcome a coordinator would read as a
    /// new failure. Returns how many were forgotten.
    pub fn forget(&mut self, service: &str, sha256: &str) -> Result<usize, JournalError> {
        self.conn
            .execute(
                "DELETE FROM history WHERE service = ?1 AND json_extract(release, '$.sha256') = ?2",
                params![service, sha256],
            )
            .map_err(|e| self.sqlite(e))
    }

    /// The newest `limit` outcomes of `service`, newest first.
    pub fn history(&self, service: &str, limit: usize) -> Result<Vec<HistoryEntry>, JournalError> {
        let mut statement = self
            .conn
            .prepare("SELECT kind, release, reason, at_ms FROM history WHERE service = ?1 ORDER BY id DESC LIMIT ?2")
            .map_err(|e| self.sqlite(e))?;
        let rows = statement
            .query_map(params![service, limit as i64], |row| {
                let kind: String = row.get(0)?;
                let release: Option<String> = row.get(1)?;
                Ok(HistoryEntry {
                    kind: OutcomeKind::from(kind.as_str()),
                    release: release.and_then(|r| serde_json::from_str(&r).ok()),
                    reason: row.get(2)?,
                    at_ms: row.get::<_, i64>(3)? as u64,
                })
            })
            .map_err(|e| self.sqlite(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sqlite(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(version: &str) -> ReleaseRef {
        ReleaseRef {
            name: "web".into(),
            version: version.parse().unwrap(),
            sha256: turnout_proto::Digest::from_bytes([1; 32]),
        }
    }

    #[test]
    fn states_and_history_survive_reopening_and_migrating_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let state = State::Idle {
            committed: Some(release("1.0.0")),
        };
        {
            let mut journal = Journal::open(&path).unwrap();
            let record = HistoryEntry {
                kind: OutcomeKind::Committed,
                release: Some(release("1.0.0")),
                reason: "ok".into(),
                at_ms: 7,
            };
            journal.persist("web", &state, &[record], 7).unwrap();
        }
        let journal = Journal::open(&path).unwrap();
        let again = Journal::open(&path).unwrap();
        assert_eq!(journal.state("web").unwrap(), state);
        assert_eq!(again.history("web", 10).unwrap()[0].reason, "ok");
        assert_eq!(
            journal.state("never-seen").unwrap(),
            State::Idle { committed: None }
        );
        let version: i64 = journal
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
    }

    #[test]
    fn a_journal_from_a_newer_agent_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        Journal::open(&path).unwrap();
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let err = Journal::open(&path).unwrap_err();
        assert!(
            matches!(
                err,
                JournalError::Newer {
                    found: 99,
                    known: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("written by a newer turnout-agent"));
        let version: i64 = Connection::open(&path)
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, 99, "the newer journal was modified");
    }

    #[test]
    fn history_is_bounded_and_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(&dir.path().join("agent.db")).unwrap();
        let state = State::Idle { committed: None };
        for i in 0..(HISTORY_KEPT + 20) {
            let record = HistoryEntry {
                kind: OutcomeKind::Failed,
                release: None,
                reason: format!("r{i}"),
                at_ms: i as u64,
            };
            journal.persist("web", &state, &[record], 0).unwrap();
        }
        let history = journal.history("web", 1000).unwrap();
        assert_eq!(history.len() as i64, HISTORY_KEPT);
        assert_eq!(history[0].reason, format!("r{}", HISTORY_KEPT + 19));
    }
}
