//! The coordinator's state in one SQLite file (WAL): hosts, tokens, bundles,
//! desired state, rollouts and the append-only event log.
//!
//! Tokens are stored only as sha256 digests: the database never holds a
//! credential. Desired state carries a per-host index that only grows, which
//! is what an agent's long poll waits on. Migrations are append-only, keyed by
//! `PRAGMA user_version`, and a newer schema is refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use turnout_proto::messages::{DesiredService, DesiredState, ReleaseRef, Report};
use turnout_proto::{CapabilitySet, HostId, ProtoVersion, ServiceName};

use crate::engine::Rollout;

const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE hosts (
        id TEXT PRIMARY KEY,
        public_key TEXT NOT NULL,
        labels TEXT NOT NULL,
        enrolled_ms INTEGER NOT NULL,
        last_seen_ms INTEGER NOT NULL DEFAULT 0,
        agent_version TEXT,
        proto INTEGER,
        capabilities TEXT,
        incompatible TEXT,
        report TEXT,
        desired_index INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE tokens (
        digest TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        role TEXT,
        expires_ms INTEGER,
        uses_left INTEGER,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE bundles (
        sha256 TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        size INTEGER NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE desired (
        host TEXT NOT NULL,
        service TEXT NOT NULL,
        release TEXT NOT NULL,
        size INTEGER NOT NULL,
        rollout TEXT,
        PRIMARY KEY (host, service)
    );
    CREATE TABLE rollouts (
        id TEXT PRIMARY KEY,
        service TEXT NOT NULL,
        finished INTEGER NOT NULL,
        body TEXT NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms INTEGER NOT NULL,
        actor TEXT NOT NULL,
        rollout TEXT,
        host TEXT,
        message TEXT NOT NULL
    );
    CREATE INDEX events_by_rollout ON events (rollout, id);
",
    "
    -- The highest desired-state index each host has acted on: a rollback
    -- counts a host as back only once it acted on being sent back.
    ALTER TABLE hosts ADD COLUMN acked_index INTEGER NOT NULL DEFAULT 0;
",
    "
    -- Accountable operator tokens: a name (events say who), an optional
    -- expiry, revocation, last use. Tokens made before names get one.
    ALTER TABLE tokens ADD COLUMN name TEXT;
    ALTER TABLE tokens ADD COLUMN revoked_ms INTEGER;
    ALTER TABLE tokens ADD COLUMN last_used_ms INTEGER;
    UPDATE tokens SET name = 'token-' || rowid WHERE kind = 'operator' AND name IS NULL;
    CREATE UNIQUE INDEX tokens_by_name ON tokens (name) WHERE kind = 'operator';
    -- An enrollment token for exactly one host id, which may re-key it.
    ALTER TABLE tokens ADD COLUMN host TEXT;
    ALTER TABLE tokens ADD COLUMN may_replace INTEGER NOT NULL DEFAULT 0;
    -- Labels selectors match are the operator's; what a host says of
    -- itself at each hello is kept apart.
    ALTER TABLE hosts ADD COLUMN reported_labels TEXT NOT NULL DEFAULT '{}';
    UPDATE hosts SET reported_labels = labels;
",
];

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("the coordinator database {path}: {source}")]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: rusqlite::Error,
    },
    /// A stored row that does not read back: damaged by hand or by a bug.
    #[error(
        "the coordinator database {path} holds an unreadable {what}: {detail}; fix or delete that row (or restore a backup)"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Which row, e.g. `rollout web-1.0.0-1`.
        what: String,
        /// Why it does not read.
        detail: String,
    },
    /// Written by a newer coordinator.
    #[error(
        "the coordinator database {path} has schema version {found}; this build knows up to {known}: run the newer coordinator"
    )]
    Newer {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: i64,
        /// This build's newest.
        known: i64,
    },
}

/// An operator's role; each includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read everything.
    Viewer,
    /// Also push bundles and drive rollouts.
    Operator,
    /// Also manage tokens and hosts.
    Admin,
}

impl Role {
    /// The role's name.
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// Parses a role name.
    pub fn parse(text: &str) -> Option<Role> {
        [Role::Viewer, Role::Operator, Role::Admin]
            .into_iter()
            .find(|r| r.name() == text)
    }
}

/// Why an enrollment token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnrollRefusal {
    /// Never issued (or mistyped).
    #[error("the enrollment token is not known; create one with `turnout token create --enroll`")]
    Unknown,
    /// Past its time to live.
    #[error("the enrollment token expired; create a new one")]
    Expired,
    /// Used up.
    #[error("the enrollment token has been used as many times as it allows; create a new one")]
    UsedUp,
    /// The host id is enrolled already, with another key: an enrollment
    /// token (shared by many hosts) must not let one take over another.
    #[error(
        "host {0} is enrolled already with another key; if it was reinstalled, an admin forgets it first (`turnout host forget {0}`) or makes a token for it (`turnout token create --enroll --host {0} --replace`), then it enrolls again"
    )]
    Taken(String),
    /// The token was made for another host id.
    #[error("the enrollment token is for host {token_host}, not {host}")]
    OtherHost {
        /// The host the token is for.
        token_host: String,
        /// The host that tried it.
        host: String,
    },
}

/// How an enrollment went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enrolled {
    /// A new host.
    New,
    /// An enrolled host with its own key again (after its coordinator's CA
    /// changed, or a retried enroll): nothing changes, no use is spent.
    Again,
    /// An enrolled host got a new key, with a token made to replace it.
    Replaced,
}

impl HostRecord {
    /// Since when the host has had no valid signed desired state, as its
    /// last report says (protocol v2 hosts only).
    pub fn stale_since(&self) -> Option<u64> {
        self.report.as_ref().and_then(|r| r.stale_since_ms)
    }

    /// Whether the host speaks only protocol v1 (a 0.1.0 agent): it takes
    /// unsigned desired state, and `min_agent_proto = 2` will refuse it.
    pub fn legacy(&self) -> bool {
        self.proto == Some(1) && self.incompatible.is_none()
    }
}

/// An operator token as `token list` shows it (never the secret).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OperatorToken {
    /// Its name: who holds it.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// When it was made.
    pub created_ms: u64,
    /// When it stops working, if ever.
    pub expires_ms: Option<u64>,
    /// When it was revoked, if it was.
    pub revoked_ms: Option<u64>,
    /// When it was last used, if ever.
    pub last_used_ms: Option<u64>,
}

/// Why a new operator token could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    /// Another token has that name.
    #[error("a token named {0:?} exists already; pick another name, or revoke it first")]
    NameTaken(String),
}

/// A host as the registry knows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostRecord {
    /// Its id.
    pub id: HostId,
    /// Its labels, the operator's: what selectors match.
    pub labels: BTreeMap<String, String>,
    /// The labels the host reports of itself (its config), shown beside
    /// them; a host cannot move itself into a selector.
    #[serde(default)]
    pub reported_labels: BTreeMap<String, String>,
    /// When it enrolled.
    pub enrolled_ms: u64,
    /// When it was last heard from.
    pub last_seen_ms: u64,
    /// Its agent's version.
    pub agent_version: Option<String>,
    /// The negotiated protocol version.
    pub proto: Option<u16>,
    /// The negotiated capabilities.
    pub capabilities: Option<CapabilitySet>,
    /// Why its last hello was refused, if it was.
    pub incompatible: Option<String>,
    /// Its last report.
    pub report: Option<Report>,
    /// Its desired-state index.
    pub desired_index: u64,
    /// The highest desired-state index it has acted on.
    pub acked_index: u64,
}

/// A stored bundle.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BundleRecord {
    /// Its digest.
    pub sha256: String,
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// Its size.
    pub size: u64,
    /// When it was pushed.
    pub created_ms: u64,
}

/// One line of the event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Its position; grows by one for each line.
    pub id: u64,
    /// When.
    pub at_ms: u64,
    /// Who: `engine`, `operator:ROLE`, `host:ID`, `coordinator`.
    pub actor: String,
    /// The rollout concerned.
    pub rollout: Option<String>,
    /// The host concerned.
    pub host: Option<String>,
    /// What happened and why.
    pub message: String,
}

/// The open store.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.path.display())
    }
}

/// A new random secret, `PREFIX_` plus 32 random bytes in URL-safe base64.
pub fn new_secret(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the system random source works");
    format!(
        "{prefix}_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

fn digest(secret: &str) -> String {
    turnout_rt::hex::encode(Sha256::digest(secret.as_bytes()))
}

type Result<T> = std::result::Result<T, StoreError>;

impl Store {
    /// Opens (creating and migrating) the database at `path`.
    pub fn open(path: &Path) -> Result<Store> {
        let sqlite = |source| StoreError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let conn = match turnout_rt::sqlite::open(
            path,
            turnout_rt::sqlite::Durability::Normal,
            MIGRATIONS,
        )
        .map_err(sqlite)?
        {
            turnout_rt::sqlite::Opened::Current(conn) => conn,
            turnout_rt::sqlite::Opened::Newer { found, known } => {
                return Err(StoreError::Newer {
                    path: path.to_owned(),
                    found,
                    known,
                });
            }
        };
        Ok(Store {
            conn,
            path: path.to_owned(),
        })
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Rolls back a transaction left open (by a panic mid-transaction).
    pub fn roll_back_open_transaction(&self) {
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }

    /// Runs `f` in one transaction: everything it writes lands, or nothing.
    pub fn atomically<T>(&self, f: impl FnOnce(&Store) -> Result<T>) -> Result<T> {
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(self.err())?;
        match f(self) {
            Ok(value) => {
                self.conn.execute_batch("COMMIT").map_err(self.err())?;
                Ok(value)
            }
            Err(err) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(err)
            }
        }
    }

    /// Creates an operator token `name` with `role`, valid for `ttl_ms`
    /// (or until revoked); returns the secret (shown once).
    pub fn create_token(
        &self,
        name: &str,
        role: Role,
        ttl_ms: Option<u64>,
        now: u64,
    ) -> Result<std::result::Result<String, TokenRefusal>> {
        let secret = new_secret("tnt");
        let expires = ttl_ms.map(|ttl| now.saturating_add(ttl).min(i64::MAX as u64) as i64);
        let inserted = self.conn.execute(
            "INSERT INTO tokens (digest, kind, role, name, expires_ms, created_ms) VALUES (?1, 'operator', ?2, ?3, ?4, ?5)",
            params![digest(&secret), role.name(), name, expires, now as i64],
        );
        match inserted {
            Ok(_) => Ok(Ok(secret)),
            Err(err)
                if err.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation) =>
            {
                Ok(Err(TokenRefusal::NameTaken(name.to_owned())))
            }
            Err(err) => Err(self.err()(err)),
        }
    }

    fn operator_token(r: &rusqlite::Row<'_>) -> rusqlite::Result<OperatorToken> {
        let ms = |v: Option<i64>| v.map(|v| v as u64);
        Ok(OperatorToken {
            name: r.get(0)?,
            role: Role::parse(&r.get::<_, String>(1)?).unwrap_or(Role::Viewer),
            created_ms: r.get::<_, i64>(2)? as u64,
            expires_ms: ms(r.get(3)?),
            revoked_ms: ms(r.get(4)?),
            last_used_ms: ms(r.get(5)?),
        })
    }

    /// The operator token with this secret, if there is one (expired or
    /// revoked ones too: the caller says which).
    pub fn find_token(&self, secret: &str) -> Result<Option<OperatorToken>> {
        self.conn
            .query_row(
                "SELECT name, role, created_ms, expires_ms, revoked_ms, last_used_ms FROM tokens WHERE digest = ?1 AND kind = 'operator'",
                [digest(secret)],
                Store::operator_token,
            )
            .optional()
            .map_err(self.err())
    }

    /// [`find_token`](Self::find_token), recording the use of a token that
    /// was not revoked at `now`.
    pub fn use_token(&self, secret: &str, now: u64) -> Result<Option<OperatorToken>> {
        let token = self.find_token(secret)?;
        if token.as_ref().is_some_and(|t| t.revoked_ms.is_none()) {
            self.conn
                .execute(
                    "UPDATE tokens SET last_used_ms = ?2 WHERE digest = ?1",
                    params![digest(secret), now as i64],
                )
                .map_err(self.err())?;
        }
        Ok(token)
    }

    /// The role of a token that was not revoked; records nothing.
    pub fn token_role(&self, secret: &str) -> Result<Option<Role>> {
        Ok(self
            .find_token(secret)?
            .filter(|t| t.revoked_ms.is_none())
            .map(|t| t.role))
    }

    /// Every operator token, by name.
    pub fn tokens(&self) -> Result<Vec<OperatorToken>> {
        let mut statement = self
            .conn
            .prepare(
                "SELECT name, role, created_ms, expires_ms, revoked_ms, last_used_ms FROM tokens WHERE kind = 'operator' ORDER BY name",
            )
            .map_err(self.err())?;
        let rows = statement
            .query_map([], Store::operator_token)
            .map_err(self.err())?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(|e| self.corrupt("row of the tokens table", e))
    }

    /// Revokes the operator token `name` at `now`; false if there is none
    /// (or it was revoked already).
    pub fn revoke_token(&self, name: &str, now: u64) -> Result<bool> {
        let changed = self
            .conn
            .execute(
                "UPDATE tokens SET revoked_ms = ?2 WHERE kind = 'operator' AND name = ?1 AND revoked_ms IS NULL",
                params![name, now as i64],
            )
            .map_err(self.err())?;
        Ok(changed > 0)
    }

    /// Creates an enrollment token valid for `ttl_ms` and `uses`
    /// enrollments; bound to one `host` id when given, which it may re-key
    /// when `replace`.
    pub fn create_enroll_token(
        &self,
        ttl_ms: u64,
        uses: u32,
        host: Option<&HostId>,
        replace: bool,
        now: u64,
    ) -> Result<String> {
        let secret = new_secret("tne");
        self.conn
            .execute(
                "INSERT INTO tokens (digest, kind, expires_ms, uses_left, host, may_replace, created_ms) VALUES (?1, 'enroll', ?2, ?3, ?4, ?5, ?6)",
                params![digest(&secret), now.saturating_add(ttl_ms).min(i64::MAX as u64) as i64, uses, host.map(HostId::as_str), replace, now as i64],
            )
            .map_err(self.err())?;
        Ok(secret)
    }

    /// Enrolls (or re-keys) host `id` with an enrollment token.
    pub fn enroll(
        &mut self,
        token: &str,
        id: &HostId,
        public_key: &str,
        labels: &BTreeMap<String, String>,
        now: u64,
    ) -> Result<std::result::Result<Enrolled, EnrollRefusal>> {
        let path = self.path.clone();
        let sqlite = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(sqlite)?;
        let row: Option<(i64, i64, Option<String>, bool)> = tx
            .query_row(
                "SELECT expires_ms, uses_left, host, may_replace FROM tokens WHERE digest = ?1 AND kind = 'enroll'",
                [digest(token)],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(sqlite)?;
        let refusal = match &row {
            None => Some(EnrollRefusal::Unknown),
            Some((expires, ..)) if (*expires as u64) <= now => Some(EnrollRefusal::Expired),
            Some((_, 0, ..)) => Some(EnrollRefusal::UsedUp),
            Some((_, _, Some(token_host), _)) if token_host != id.as_str() => {
                Some(EnrollRefusal::OtherHost {
                    token_host: token_host.clone(),
                    host: id.to_string(),
                })
            }
            Some(_) => None,
        };
        if let Some(refusal) = refusal {
            return Ok(Err(refusal));
        }
        let may_replace = row.is_some_and(|(.., replace)| replace);
        let enrolled: Option<String> = tx
            .query_row(
                "SELECT public_key FROM hosts WHERE id = ?1",
                [id.as_str()],
                |r| r.get(0),
            )
            .optional()
            .map_err(sqlite)?;
        let again = enrolled
            .as_ref()
            .is_some_and(|key| key.trim() == public_key.trim());
        let rekey = enrolled.is_some() && !again;
        if rekey && !may_replace {
            return Ok(Err(EnrollRefusal::Taken(id.to_string())));
        }
        if again {
            // Proves the token and the key, takes nothing: a fleet-wide
            // token's uses are for new hosts.
            return Ok(Ok(Enrolled::Again));
        }
        tx.execute(
            "UPDATE tokens SET uses_left = uses_left - 1 WHERE digest = ?1",
            [digest(token)],
        )
        .map_err(sqlite)?;
        tx.execute(
            // The labels a host proposes become the operator's labels when
            // it first enrolls; enrolling again never changes them.
            "INSERT INTO hosts (id, public_key, labels, reported_labels, enrolled_ms) VALUES (?1, ?2, ?3, ?3, ?4)
             ON CONFLICT (id) DO UPDATE SET public_key = excluded.public_key, reported_labels = excluded.reported_labels, enrolled_ms = excluded.enrolled_ms",
            params![id.as_str(), public_key, serde_json::to_string(labels).expect("labels serialise"), now as i64],
        )
        .map_err(sqlite)?;
        tx.commit().map_err(sqlite)?;
        Ok(Ok(if rekey {
            Enrolled::Replaced
        } else {
            Enrolled::New
        }))
    }

    /// An enrolled host's public key (PEM).
    pub fn host_key(&self, id: &str) -> Result<Option<String>> {
        self.conn
            .prepare_cached("SELECT public_key FROM hosts WHERE id = ?1")
            .and_then(|mut statement| statement.query_row([id], |r| r.get(0)).optional())
            .map_err(self.err())
    }

    /// The protocol version and capabilities a host negotiated in its
    /// last hello, if it was not refused.
    pub fn host_agreement(&self, id: &str) -> Result<Option<(ProtoVersion, CapabilitySet)>> {
        let row: Option<(Option<u16>, Option<String>)> = self
            .conn
            .query_row(
                "SELECT proto, capabilities FROM hosts WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(self.err())?;
        Ok(row.and_then(|(proto, caps)| {
            let version = ProtoVersion::new(proto?)?;
            let caps = caps
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_default();
            Some((version, caps))
        }))
    }

    /// Records a hello: what the host runs and speaks, or why it was refused.
    pub fn record_hello(
        &self,
        id: &HostId,
        agent_version: &str,
        labels: &BTreeMap<String, String>,
        negotiated: Option<(u16, &CapabilitySet)>,
        incompatible: Option<&str>,
        now: u64,
    ) -> Result<()> {
        self.conn
            .execute(
                "UPDATE hosts SET agent_version = ?2, reported_labels = ?3, proto = ?4, capabilities = ?5, incompatible = ?6, last_seen_ms = ?7 WHERE id = ?1",
                params![
                    id.as_str(),
                    agent_version,
                    serde_json::to_string(labels).expect("labels serialise"),
                    negotiated.map(|(v, _)| v),
                    negotiated.map(|(_, c)| serde_json::to_string(c).expect("capabilities serialise")),
                    incompatible,
                    now as i64
                ],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// Records a report (and that the host was seen), unless the host's
    /// stored report has a `seq` as high or higher: a late or replayed
    /// report never overwrites a newer one, also across coordinator
    /// restarts. Returns whether it was recorded.
    pub fn record_report(&self, report: &Report, now: u64) -> Result<bool> {
        let changed = self.conn
            .prepare_cached("UPDATE hosts SET report = ?2, last_seen_ms = MAX(last_seen_ms, ?3), acked_index = MAX(acked_index, ?4) WHERE id = ?1 AND (report IS NULL OR COALESCE(json_extract(report, '$.seq'), 0) < ?5)")
            .and_then(|mut statement| {
                statement.execute(params![
                    report.host.as_str(),
                    serde_json::to_string(report).expect("reports serialise"),
                    now as i64,
                    report.desired_index.min(i64::MAX as u64) as i64,
                    report.seq.min(i64::MAX as u64) as i64
                ])
            })
            .map_err(self.err())?;
        Ok(changed > 0)
    }

    /// Marks a host as seen (a long poll counts) and done with desired
    /// states up to `acked`.
    pub fn touch(&self, id: &str, now: u64, acked: u64) -> Result<()> {
        self.conn
            .prepare_cached("UPDATE hosts SET last_seen_ms = MAX(last_seen_ms, ?2), acked_index = MAX(acked_index, ?3) WHERE id = ?1")
            .and_then(|mut statement| statement.execute(params![id, now as i64, acked.min(i64::MAX as u64) as i64]))
            .map_err(self.err())?;
        Ok(())
    }

    /// Sets and removes operator labels of host `id`; the labels after, or
    /// None if there is no such host.
    pub fn label_host(
        &self,
        id: &str,
        set: &BTreeMap<String, String>,
        remove: &[String],
    ) -> Result<Option<BTreeMap<String, String>>> {
        let labels: Option<String> = self
            .conn
            .query_row("SELECT labels FROM hosts WHERE id = ?1", [id], |r| r.get(0))
            .optional()
            .map_err(self.err())?;
        let Some(labels) = labels else {
            return Ok(None);
        };
        let mut labels: BTreeMap<String, String> =
            serde_json::from_str(&labels).unwrap_or_default();
        for key in remove {
            labels.remove(key);
        }
        labels.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.conn
            .execute(
                "UPDATE hosts SET labels = ?2 WHERE id = ?1",
                params![
                    id,
                    serde_json::to_string(&labels).expect("labels serialise")
                ],
            )
            .map_err(self.err())?;
        Ok(Some(labels))
    }

    /// Every host, by id.
    pub fn hosts(&self) -> Result<Vec<HostRecord>> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT id, labels, enrolled_ms, last_seen_ms, agent_version, proto, capabilities, incompatible, report, desired_index, acked_index, reported_labels FROM hosts ORDER BY id")
            .map_err(self.err())?;
        let rows = statement
            .query_map([], |r| {
                let json = |i: usize| -> rusqlite::Result<Option<String>> { r.get(i) };
                let id: String = r.get(0)?;
                Ok(HostRecord {
                    id: id.parse().map_err(|e: turnout_proto::IdError| {
                        rusqlite::Error::FromSqlConversionFailure(
                            0,
                            rusqlite::types::Type::Text,
                            format!("host id {id:?}: {e}").into(),
                        )
                    })?,
                    labels: serde_json::from_str(&r.get::<_, String>(1)?).unwrap_or_default(),
                    enrolled_ms: r.get::<_, i64>(2)? as u64,
                    last_seen_ms: r.get::<_, i64>(3)? as u64,
                    agent_version: r.get(4)?,
                    proto: r.get(5)?,
                    capabilities: json(6)?.and_then(|t| serde_json::from_str(&t).ok()),
                    incompatible: r.get(7)?,
                    report: json(8)?.and_then(|t| serde_json::from_str(&t).ok()),
                    desired_index: r.get::<_, i64>(9)? as u64,
                    acked_index: r.get::<_, i64>(10)? as u64,
                    reported_labels: serde_json::from_str(&r.get::<_, String>(11)?)
                        .unwrap_or_default(),
                })
            })
            .map_err(self.err())?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(|e| self.corrupt("row of the hosts table", e))
    }

    /// A read error, named for the row it came from when the row itself is bad.
    fn corrupt(&self, what: &str, err: rusqlite::Error) -> StoreError {
        match err {
            rusqlite::Error::FromSqlConversionFailure(_, _, detail) => StoreError::Corrupt {
                path: self.path.clone(),
                what: what.to_owned(),
                detail: detail.to_string(),
            },
            other => StoreError::Sqlite {
                path: self.path.clone(),
                source: other,
            },
        }
    }

    /// Removes a host and its desired state; true if it existed.
    pub fn forget_host(&self, id: &str) -> Result<bool> {
        self.conn
            .execute("DELETE FROM desired WHERE host = ?1", [id])
            .map_err(self.err())?;
        Ok(self
            .conn
            .execute("DELETE FROM hosts WHERE id = ?1", [id])
            .map_err(self.err())?
            > 0)
    }

    /// Sets one service's desired release on a host; returns the new index.
    pub fn set_desired(
        &self,
        host: &HostId,
        service: &ServiceName,
        release: &ReleaseRef,
        size: u64,
        rollout: Option<&str>,
    ) -> Result<u64> {
        self.conn
            .prepare_cached(
                "INSERT INTO desired (host, service, release, size, rollout) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (host, service) DO UPDATE SET release = excluded.release, size = excluded.size, rollout = excluded.rollout",
            )
            .and_then(|mut statement| {
                statement.execute(params![host.as_str(), service.as_str(), serde_json::to_string(release).expect("releases serialise"), size as i64, rollout])
            })
            .map_err(self.err())?;
        self.bump_desired_index(host)
    }

    /// Withdraws one service's desired release from a host; returns the new index.
    pub fn clear_desired(&self, host: &HostId, service: &ServiceName) -> Result<u64> {
        self.conn
            .prepare_cached("DELETE FROM desired WHERE host = ?1 AND service = ?2")
            .and_then(|mut statement| statement.execute(params![host.as_str(), service.as_str()]))
            .map_err(self.err())?;
        self.bump_desired_index(host)
    }

    /// Moves `host`'s desired-state index past `accepted` when it is below
    /// it (the host accepted a higher index than this store holds: a
    /// database restored from a backup); returns the new index when it
    /// moved. The same index is the normal case and moves nothing.
    pub fn raise_desired_index(&self, host: &str, accepted: u64) -> Result<Option<u64>> {
        let accepted = accepted.min(i64::MAX as u64 - 1) as i64;
        self.conn
            .prepare_cached(
                "UPDATE hosts SET desired_index = ?2 + 1 WHERE id = ?1 AND desired_index < ?2 RETURNING desired_index",
            )
            .and_then(|mut statement| {
                statement
                    .query_row(params![host, accepted], |r| r.get::<_, i64>(0))
                    .optional()
            })
            .map(|i| i.map(|i| i as u64))
            .map_err(self.err())
    }

    fn bump_desired_index(&self, host: &HostId) -> Result<u64> {
        self.conn
            .prepare_cached(
                "UPDATE hosts SET desired_index = desired_index + 1 WHERE id = ?1 RETURNING desired_index",
            )
            .and_then(|mut statement| statement.query_row([host.as_str()], |r| r.get::<_, i64>(0)))
            .map(|i| i as u64)
            .map_err(self.err())
    }

    /// A host's desired state.
    pub fn desired(&self, host: &HostId) -> Result<DesiredState> {
        let index: i64 = self
            .conn
            .query_row(
                "SELECT desired_index FROM hosts WHERE id = ?1",
                [host.as_str()],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.err())?
            .unwrap_or(0);
        let mut statement = self.conn.prepare_cached("SELECT service, release, size, rollout FROM desired WHERE host = ?1 ORDER BY service").map_err(self.err())?;
        let services = statement
            .query_map([host.as_str()], |r| {
                let bad = |detail: String| {
                    rusqlite::Error::FromSqlConversionFailure(
                        0,
                        rusqlite::types::Type::Text,
                        detail.into(),
                    )
                };
                let service: String = r.get(0)?;
                let release: String = r.get(1)?;
                Ok(DesiredService {
                    service: service.parse().map_err(|e: turnout_proto::IdError| {
                        bad(format!("service {service:?}: {e}"))
                    })?,
                    release: serde_json::from_str(&release)
                        .map_err(|e| bad(format!("release of service {service}: {e}")))?,
                    size: r.get::<_, i64>(2)? as u64,
                    urls: Vec::new(),
                    rollout: r.get(3)?,
                })
            })
            .map_err(self.err())?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| self.corrupt(&format!("desired state of host {host}"), e))?;
        Ok(DesiredState {
            host: host.clone(),
            index: index as u64,
            services,
            issued_at_ms: None,
            expires_ms: None,
            policy_version: None,
        })
    }

    /// Records a pushed bundle.
    pub fn add_bundle(&self, record: &BundleRecord) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO bundles (sha256, name, version, size, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![record.sha256, record.name, record.version, record.size as i64, record.created_ms as i64],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// Every stored bundle, newest first.
    pub fn bundles(&self) -> Result<Vec<BundleRecord>> {
        let mut statement = self.conn.prepare_cached("SELECT sha256, name, version, size, created_ms FROM bundles ORDER BY created_ms DESC, name").map_err(self.err())?;
        let rows = statement
            .query_map([], |r| {
                Ok(BundleRecord {
                    sha256: r.get(0)?,
                    name: r.get(1)?,
                    version: r.get(2)?,
                    size: r.get::<_, i64>(3)? as u64,
                    created_ms: r.get::<_, i64>(4)? as u64,
                })
            })
            .map_err(self.err())?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(self.err())
    }

    /// Saves a rollout (insert or replace).
    pub fn save_rollout(&self, rollout: &Rollout, now: u64) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO rollouts (id, service, finished, body, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (id) DO UPDATE SET finished = excluded.finished, body = excluded.body",
                params![rollout.id, rollout.spec.service.as_str(), rollout.state.is_finished(), serde_json::to_string(rollout).expect("rollouts serialise"), now as i64],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// Every rollout, oldest first.
    pub fn rollouts(&self) -> Result<Vec<Rollout>> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT id, body FROM rollouts ORDER BY created_ms, id")
            .map_err(self.err())?;
        let rows = statement
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(self.err())?;
        let mut out = Vec::new();
        for row in rows {
            let (id, body) = row.map_err(self.err())?;
            out.push(self.rollout_body(&id, &body)?);
        }
        Ok(out)
    }

    /// One rollout.
    pub fn rollout(&self, id: &str) -> Result<Option<Rollout>> {
        let body: Option<String> = self
            .conn
            .prepare_cached("SELECT body FROM rollouts WHERE id = ?1")
            .and_then(|mut statement| statement.query_row([id], |r| r.get(0)).optional())
            .map_err(self.err())?;
        body.map(|b| self.rollout_body(id, &b)).transpose()
    }

    fn rollout_body(&self, id: &str, body: &str) -> Result<Rollout> {
        serde_json::from_str(body).map_err(|e| StoreError::Corrupt {
            path: self.path.clone(),
            what: format!("rollout {id:?}"),
            detail: e.to_string(),
        })
    }

    /// The ids of unfinished rollouts, oldest first: what the engine steps.
    pub fn active_rollout_ids(&self) -> Result<Vec<String>> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT id FROM rollouts WHERE finished = 0 ORDER BY created_ms, id")
            .map_err(self.err())?;
        let rows = statement.query_map([], |r| r.get(0)).map_err(self.err())?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(self.err())
    }

    /// Appends to the event log; returns the line's id.
    pub fn log(
        &self,
        at_ms: u64,
        actor: &str,
        rollout: Option<&str>,
        host: Option<&str>,
        message: &str,
    ) -> Result<u64> {
        self.conn
            .prepare_cached(
                "INSERT INTO events (at_ms, actor, rollout, host, message) VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut statement| {
                statement.execute(params![at_ms as i64, actor, rollout, host, message])
            })
            .map_err(self.err())?;
        let id = self.conn.last_insert_rowid() as u64;
        // The event log is the coordinator's story: it goes to its log too.
        tracing::info!(
            event = id,
            actor,
            rollout = rollout.unwrap_or("-"),
            host = host.unwrap_or("-"),
            "{message}"
        );
        Ok(id)
    }

    /// The newest event's id (0 with none): one index lookup, not a scan.
    pub fn last_event_id(&self) -> Result<u64> {
        self.conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM events", [], |row| {
                row.get::<_, i64>(0)
            })
            .map(|id| id as u64)
            .map_err(self.err())
    }

    /// Event-log lines after `after`, optionally for one rollout, oldest first.
    pub fn events(&self, after: u64, rollout: Option<&str>, limit: usize) -> Result<Vec<Event>> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT id, at_ms, actor, rollout, host, message FROM events WHERE id > ?1 AND (?2 IS NULL OR rollout = ?2) ORDER BY id LIMIT ?3")
            .map_err(self.err())?;
        let rows = statement
            .query_map(params![after as i64, rollout, limit as i64], |r| {
                Ok(Event {
                    id: r.get::<_, i64>(0)? as u64,
                    at_ms: r.get::<_, i64>(1)? as u64,
                    actor: r.get(2)?,
                    rollout: r.get(3)?,
                    host: r.get(4)?,
                    message: r.get(5)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(self.err())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_stored_hashed_and_roles_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("c.db")).unwrap();
        let token = store
            .create_token("alice", Role::Operator, None, 1)
            .unwrap()
            .unwrap();
        assert_eq!(store.token_role(&token).unwrap(), Some(Role::Operator));
        assert_eq!(store.token_role("tnt_nope").unwrap(), None);
        let stored: String = store
            .conn
            .query_row("SELECT digest FROM tokens", [], |r| r.get(0))
            .unwrap();
        assert!(
            !stored.contains(&token[4..]),
            "the secret itself is never stored"
        );
    }

    #[test]
    fn enrollment_tokens_expire_and_run_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("c.db")).unwrap();
        let token = store.create_enroll_token(1000, 1, None, false, 0).unwrap();
        let host: HostId = "web-01".parse().unwrap();
        assert_eq!(
            store
                .enroll(&token, &host, "KEY", &BTreeMap::new(), 10)
                .unwrap(),
            Ok(Enrolled::New)
        );
        assert_eq!(
            store
                .enroll(&token, &host, "KEY", &BTreeMap::new(), 10)
                .unwrap(),
            Err(EnrollRefusal::UsedUp)
        );
        let late = store.create_enroll_token(1000, 5, None, false, 0).unwrap();
        assert_eq!(
            store
                .enroll(&late, &host, "KEY", &BTreeMap::new(), 1000)
                .unwrap(),
            Err(EnrollRefusal::Expired)
        );
        assert_eq!(
            store
                .enroll("tne_x", &host, "KEY", &BTreeMap::new(), 0)
                .unwrap(),
            Err(EnrollRefusal::Unknown)
        );
    }

    #[test]
    fn operator_tokens_have_unique_names_expire_are_revoked_and_record_their_use() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("c.db")).unwrap();
        let alice = store
            .create_token("alice", Role::Operator, Some(1000), 10)
            .unwrap()
            .unwrap();
        assert_eq!(
            store.create_token("alice", Role::Viewer, None, 20).unwrap(),
            Err(TokenRefusal::NameTaken("alice".into()))
        );
        let used = store.use_token(&alice, 500).unwrap().unwrap();
        assert_eq!((used.name.as_str(), used.expires_ms), ("alice", Some(1010)));
        let listed = store.tokens().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].last_used_ms, Some(500), "{listed:?}");
        assert_eq!(store.token_role(&alice).unwrap(), Some(Role::Operator));
        assert_eq!(
            store.tokens().unwrap()[0].last_used_ms,
            Some(500),
            "asking a role is no use"
        );
        assert!(store.revoke_token("alice", 600).unwrap());
        assert!(!store.revoke_token("alice", 700).unwrap(), "once");
        assert!(!store.revoke_token("bob", 700).unwrap());
        let revoked = store.use_token(&alice, 800).unwrap().unwrap();
        assert_eq!(revoked.revoked_ms, Some(600));
        assert_eq!(revoked.last_used_ms, Some(500), "a refused use is no use");
        assert_eq!(store.token_role(&alice).unwrap(), None);
    }

    #[test]
    fn a_host_id_is_re_keyed_only_with_a_token_made_for_it_and_labels_stay_the_operators() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("c.db")).unwrap();
        let web: HostId = "web-01".parse().unwrap();
        let db: HostId = "db-01".parse().unwrap();
        let proposed = BTreeMap::from([("role".to_owned(), "web".to_owned())]);
        let any = store
            .create_enroll_token(10_000, 5, None, false, 0)
            .unwrap();
        assert_eq!(
            store.enroll(&any, &web, "KEY-1", &proposed, 1).unwrap(),
            Ok(Enrolled::New)
        );
        // The same host with its own key again: no use spent, nothing changed.
        let uses = |store: &Store| {
            store
                .conn
                .query_row(
                    "SELECT uses_left FROM tokens WHERE digest = ?1",
                    [digest(&any)],
                    |r| r.get::<_, i64>(0),
                )
                .unwrap()
        };
        assert_eq!(uses(&store), 4);
        for _ in 0..5 {
            assert_eq!(
                store.enroll(&any, &web, "KEY-1", &proposed, 1).unwrap(),
                Ok(Enrolled::Again)
            );
        }
        assert_eq!(uses(&store), 4);
        // Another key under the same id: not with a shared token ...
        assert_eq!(
            store
                .enroll(&any, &web, "KEY-2", &BTreeMap::new(), 2)
                .unwrap(),
            Err(EnrollRefusal::Taken("web-01".into()))
        );
        // ... nor with one for that host that may not replace ...
        let for_web = store
            .create_enroll_token(10_000, 1, Some(&web), false, 0)
            .unwrap();
        assert_eq!(
            store
                .enroll(&for_web, &web, "KEY-2", &BTreeMap::new(), 3)
                .unwrap(),
            Err(EnrollRefusal::Taken("web-01".into()))
        );
        // ... and a token for one host does not enroll another.
        let replace_web = store
            .create_enroll_token(10_000, 1, Some(&web), true, 0)
            .unwrap();
        assert_eq!(
            store
                .enroll(&replace_web, &db, "KEY-3", &BTreeMap::new(), 4)
                .unwrap(),
            Err(EnrollRefusal::OtherHost {
                token_host: "web-01".into(),
                host: "db-01".into()
            })
        );
        let moved = BTreeMap::from([("role".to_owned(), "db".to_owned())]);
        assert_eq!(
            store
                .enroll(&replace_web, &web, "KEY-2", &moved, 5)
                .unwrap(),
            Ok(Enrolled::Replaced)
        );
        // The operator's labels stayed; what the host proposed is kept apart.
        let host = &store.hosts().unwrap()[0];
        assert_eq!(host.labels, proposed);
        assert_eq!(host.reported_labels, moved);
        store
            .record_hello(&web, "0.2.0", &moved, None, None, 6)
            .unwrap();
        assert_eq!(
            store.hosts().unwrap()[0].labels,
            proposed,
            "a hello changes nothing"
        );
        let labels = store.label_host("web-01", &moved, &[]).unwrap().unwrap();
        assert_eq!(labels, moved, "the operator moves it");
        assert_eq!(store.label_host("nope", &moved, &[]).unwrap(), None);
    }

    /// A store at `path` with host `web-01` enrolled.
    fn store_with_host(path: &Path) -> (Store, HostId) {
        let mut store = Store::open(path).unwrap();
        let token = store.create_enroll_token(1000, 1, None, false, 0).unwrap();
        let host: HostId = "web-01".parse().unwrap();
        store
            .enroll(&token, &host, "KEY", &BTreeMap::new(), 0)
            .unwrap()
            .unwrap();
        (store, host)
    }

    #[test]
    fn a_late_or_replayed_report_never_overwrites_a_newer_one_even_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let (store, host) = store_with_host(&path);
        let report = |seq| Report {
            host: host.clone(),
            seq,
            desired_index: 0,
            services: Vec::new(),
            stale_since_ms: None,
            desired_refused: None,
            trust_version: None,
            trust_refused: None,
            policy_version: None,
            policy_refused: None,
            accepted_index: None,
        };
        assert!(store.record_report(&report(10), 1).unwrap());
        assert!(!store.record_report(&report(9), 2).unwrap(), "older");
        assert!(
            !store.record_report(&report(10), 3).unwrap(),
            "the same again"
        );
        drop(store);
        let store = Store::open(&path).unwrap();
        assert!(
            !store.record_report(&report(10), 4).unwrap(),
            "replayed after a restart"
        );
        assert!(store.record_report(&report(11), 5).unwrap());
        assert_eq!(store.hosts().unwrap()[0].report.as_ref().unwrap().seq, 11);
    }

    #[test]
    fn desired_index_grows_with_every_change() {
        let dir = tempfile::tempdir().unwrap();
        let (store, host) = store_with_host(&dir.path().join("c.db"));
        let release = ReleaseRef {
            name: "web".into(),
            version: "1.0.0".parse().unwrap(),
            sha256: turnout_proto::Digest::from_bytes([1; 32]),
        };
        let service: ServiceName = "web".parse().unwrap();
        assert_eq!(
            store
                .set_desired(&host, &service, &release, 10, Some("r-1"))
                .unwrap(),
            1
        );
        assert_eq!(
            store
                .set_desired(&host, &service, &release, 10, Some("r-1"))
                .unwrap(),
            2
        );
        let desired = store.desired(&host).unwrap();
        assert_eq!((desired.index, desired.services.len()), (2, 1));
        drop(store);
        let again = Store::open(&dir.path().join("c.db")).unwrap();
        assert_eq!(
            again.desired(&host).unwrap().index,
            2,
            "migrating twice keeps the data"
        );
    }
}
