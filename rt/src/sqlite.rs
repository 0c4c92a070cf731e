//! Opening a daemon's SQLite file and bringing its schema up to date.
//!
//! Each database's schema version is `PRAGMA user_version`: migration `i`
//! (0-based) takes it from `i` to `i + 1`, all in one transaction. A file
//! written by a newer build (a higher version) is left untouched and
//! refused by the caller, so a downgrade never half-reads it. Every JSON
//! column is tied to this version: a change to what one holds comes with a
//! migration that rewrites it.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

/// How durably each commit reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `synchronous=FULL`: every commit survives a power cut (the agent's journal).
    Full,
    /// `synchronous=NORMAL`: the last commits may be lost in a power cut,
    /// never the file (the coordinator, which agents re-report to).
    Normal,
}

/// What [`open`] found.
#[derive(Debug)]
pub enum Opened {
    /// The file, in WAL mode, its schema now this build's.
    Current(Connection),
    /// The file is from a newer build; nothing was changed, not even its
    /// journal mode.
    Newer {
        /// Its schema version.
        found: i64,
        /// The newest this build knows.
        known: i64,
    },
}

/// Opens `path` (creating it) with a 5 s busy timeout, reads its schema
/// version *before* changing anything, and then, unless a newer build wrote
/// it, switches it to WAL mode and runs the `migrations` it has not had, in
/// one transaction. A file that is no database fails at that first read,
/// unchanged too.
pub fn open(path: &Path, durability: Durability, migrations: &[&str]) -> rusqlite::Result<Opened> {
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let known = migrations.len() as i64;
    let found: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if found > known {
        return Ok(Opened::Newer { found, known });
    }
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(
        None,
        "synchronous",
        match durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        },
    )?;
    match migrate(&mut conn, migrations)? {
        Migrated::Current => Ok(Opened::Current(conn)),
        Migrated::Newer { found, known } => Ok(Opened::Newer { found, known }),
    }
}

/// What [`migrate`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Migrated {
    /// The schema is (now) this build's.
    Current,
    /// The file is from a newer build; nothing was changed.
    Newer {
        /// Its schema version.
        found: i64,
        /// The newest this build knows.
        known: i64,
    },
}

/// Runs the migrations `conn` has not had yet, in one transaction.
fn migrate(conn: &mut Connection, migrations: &[&str]) -> rusqlite::Result<Migrated> {
    let known = migrations.len() as i64;
    let tx = conn.transaction()?;
    let found: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if found > known {
        return Ok(Migrated::Newer { found, known });
    }
    for migration in &migrations[found as usize..] {
        tx.execute_batch(migration)?;
    }
    tx.pragma_update(None, "user_version", known)?;
    tx.commit()?;
    Ok(Migrated::Current)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIGRATIONS: &[&str] = &[
        "CREATE TABLE a (x INTEGER);",
        "ALTER TABLE a ADD COLUMN y TEXT;",
    ];

    fn current(opened: Opened) -> Connection {
        match opened {
            Opened::Current(conn) => conn,
            other => panic!("expected the current schema, found {other:?}"),
        }
    }

    #[test]
    fn migrates_once_and_refuses_a_newer_file_byte_for_byte_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let conn = current(open(&path, Durability::Full, &MIGRATIONS[..1]).unwrap());
        conn.execute("INSERT INTO a (x) VALUES (1)", []).unwrap();
        drop(conn);
        let conn = current(open(&path, Durability::Full, MIGRATIONS).unwrap());
        let y: Option<String> = conn.query_row("SELECT y FROM a", [], |r| r.get(0)).unwrap();
        assert_eq!(y, None, "the second migration ran, once");
        drop(conn);
        // A file of a newer build, in rollback-journal mode as that build
        // may keep it: refused, and not one byte changes.
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "journal_mode", "DELETE").unwrap();
        conn.pragma_update(None, "user_version", 7).unwrap();
        drop(conn);
        let before = std::fs::read(&path).unwrap();
        match open(&path, Durability::Full, MIGRATIONS).unwrap() {
            Opened::Newer { found: 7, known: 2 } => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert!(!dir.path().join("db-wal").exists());
    }

    #[test]
    fn a_file_that_is_no_database_is_refused_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let junk =
            b"not a database, but quite long enough to look like a header..........".repeat(20);
        std::fs::write(&path, &junk).unwrap();
        let err = open(&path, Durability::Normal, MIGRATIONS).unwrap_err();
        assert_eq!(
            err.sqlite_error_code(),
            Some(rusqlite::ErrorCode::NotADatabase),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), junk);
    }
}
