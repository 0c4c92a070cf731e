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

/// Opens `path` (creating it) in WAL mode with a 5 s busy timeout.
pub fn open(path: &Path, durability: Durability) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(
        None,
        "synchronous",
        match durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        },
    )?;
    Ok(conn)
}

/// What [`migrate`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migrated {
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
pub fn migrate(conn: &mut Connection, migrations: &[&str]) -> rusqlite::Result<Migrated> {
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

    #[test]
    fn migrates_once_and_refuses_a_newer_file_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let mut conn = open(&path, Durability::Full).unwrap();
        assert_eq!(
            migrate(&mut conn, &MIGRATIONS[..1]).unwrap(),
            Migrated::Current
        );
        conn.execute("INSERT INTO a (x) VALUES (1)", []).unwrap();
        assert_eq!(migrate(&mut conn, MIGRATIONS).unwrap(), Migrated::Current);
        assert_eq!(migrate(&mut conn, MIGRATIONS).unwrap(), Migrated::Current);
        let y: Option<String> = conn.query_row("SELECT y FROM a", [], |r| r.get(0)).unwrap();
        assert_eq!(y, None);
        assert_eq!(
            migrate(&mut conn, &MIGRATIONS[..1]).unwrap(),
            Migrated::Newer { found: 2, known: 1 }
        );
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, 2, "a newer file keeps its version");
    }
}
