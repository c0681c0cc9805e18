//! Persistence behind a small trait, so that a Postgres backend can be added later for HA.
//! The embedded default is one SQLite file (`failback.db` in the data directory, WAL mode).
//!
//! Recovery instances are stored as JSON documents (the API type itself) plus a few indexed
//! columns the monitor queries; every change of a request is written in one transaction
//! ([`Batch`]), so a refused request stores nothing and a crash never leaves half a pairing.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use failback_config::api::{
    Credential, Event, FailbackState, RecoveryInstance, ReplicationError, Role, TokenKind,
};
use rusqlite::{params, Connection, OptionalExtension};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database {path}: corrupt record {what}: {source}")]
    Corrupt {
        path: PathBuf,
        what: String,
        #[source]
        source: serde_json::Error,
    },
}

/// A token as stored: only the SHA-256 of the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub hash: String,
    pub kind: TokenKind,
    pub instance_id: Option<String>,
    pub created_at: u64,
    pub expires_at: u64,
    pub used_at: Option<u64>,
}

/// A paired failback client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRecord {
    pub client_id: String,
    pub secret_hash: String,
    pub instance_id: String,
    pub created_at: u64,
    /// Set by "stop failback": the client's next heartbeat is told to stop.
    pub stopped: bool,
}

/// An enrolled recovery agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRecord {
    pub secret_hash: String,
    pub instance_id: String,
    pub created_at: u64,
}

/// An admin credential as stored: only the SHA-256 of its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialRecord {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub secret_hash: String,
    pub created_at: u64,
    pub created_by: String,
    pub revoked_at: Option<u64>,
    pub revoked_by: Option<String>,
}

impl CredentialRecord {
    /// The API view (no hash).
    pub fn public(&self) -> Credential {
        Credential {
            id: self.id.clone(),
            name: self.name.clone(),
            role: self.role,
            created_at: self.created_at,
            created_by: self.created_by.clone(),
            revoked_at: self.revoked_at,
            revoked_by: self.revoked_by.clone(),
        }
    }
}

/// An event before it gets its sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub at: u64,
    pub instance_id: Option<String>,
    pub kind: String,
    pub message: String,
    pub actor: Option<String>,
}

/// Everything one request changes, written atomically.
#[derive(Debug, Default)]
pub struct Batch {
    /// Recorded on every event of the batch (who made the request).
    pub actor: Option<String>,
    pub instances: Vec<RecoveryInstance>,
    pub tokens: Vec<TokenRecord>,
    pub clients: Vec<ClientRecord>,
    pub agents: Vec<AgentRecord>,
    pub credentials: Vec<CredentialRecord>,
    pub events: Vec<NewEvent>,
}

impl Batch {
    /// An empty batch whose events name `actor` (see `Event::actor`).
    pub fn by(actor: impl Into<String>) -> Batch {
        Batch {
            actor: Some(actor.into()),
            ..Batch::default()
        }
    }

    pub fn event(&mut self, at: u64, instance: Option<&str>, kind: &str, message: String) {
        self.events.push(NewEvent {
            at,
            instance_id: instance.map(str::to_string),
            kind: kind.to_string(),
            message,
            actor: self.actor.clone(),
        });
    }
}

/// The storage interface the service logic uses.
pub trait Store: Send + Sync {
    fn instance(&self, id: &str) -> Result<Option<RecoveryInstance>, StoreError>;
    fn instances(&self) -> Result<Vec<RecoveryInstance>, StoreError>;
    /// Instances with a failback running whose agent (client) was last seen before the given
    /// time and that are not yet flagged `AGENT_NOT_SEEN` (`FAILBACK_CLIENT_NOT_SEEN`).
    fn stale_instances(
        &self,
        agent_before: u64,
        client_before: u64,
    ) -> Result<Vec<RecoveryInstance>, StoreError>;
    fn token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// All tokens, newest first (the console's token list).
    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    fn client_by_secret(&self, hash: &str) -> Result<Option<ClientRecord>, StoreError>;
    fn clients_of(&self, instance_id: &str) -> Result<Vec<ClientRecord>, StoreError>;
    fn agent_by_secret(&self, hash: &str) -> Result<Option<AgentRecord>, StoreError>;
    /// The credential with this secret hash, revoked or not.
    fn credential_by_secret(&self, hash: &str) -> Result<Option<CredentialRecord>, StoreError>;
    fn credential(&self, id: &str) -> Result<Option<CredentialRecord>, StoreError>;
    /// All credentials, revoked ones included, oldest first.
    fn credentials(&self) -> Result<Vec<CredentialRecord>, StoreError>;
    fn apply(&self, batch: Batch) -> Result<(), StoreError>;
    fn events(
        &self,
        instance: Option<&str>,
        after: u64,
        limit: u64,
    ) -> Result<Vec<Event>, StoreError>;
}

/// The embedded SQLite backend.
pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SqliteStore({})", self.path.display())
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY,
    doc TEXT NOT NULL,
    active INTEGER NOT NULL,
    agent_seen INTEGER NOT NULL,
    client_seen INTEGER NOT NULL,
    agent_flag INTEGER NOT NULL,
    client_flag INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_active ON instances(active);
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    instance_id TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER
);
CREATE TABLE IF NOT EXISTS clients (
    client_id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL UNIQUE,
    instance_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    stopped INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS clients_instance ON clients(instance_id);
CREATE TABLE IF NOT EXISTS agents (
    secret_hash TEXT PRIMARY KEY,
    instance_id TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    instance_id TEXT,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    actor TEXT
);
CREATE INDEX IF NOT EXISTS events_instance ON events(instance_id, seq);
CREATE TABLE IF NOT EXISTS credentials (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    secret_hash TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    revoked_at INTEGER,
    revoked_by TEXT
);
";

/// Brings a database created by an older version up to [`SCHEMA`]: events gained `actor`
/// (NULL for the events stored before).
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has_actor = conn
        .prepare("SELECT 1 FROM pragma_table_info('events') WHERE name = 'actor'")?
        .exists([])?;
    if !has_actor {
        conn.execute_batch("ALTER TABLE events ADD COLUMN actor TEXT")?;
    }
    Ok(())
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn kind_str(k: TokenKind) -> &'static str {
    match k {
        TokenKind::Pairing => "pairing",
        TokenKind::Agent => "agent",
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let err = |source| StoreError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        // WAL + NORMAL: commits survive a process crash; an OS crash may lose the last
        // heartbeats, never corrupt the file.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        migrate(&conn).map_err(err)?;
        Ok(SqliteStore {
            path: path.to_owned(),
            conn: Mutex::new(conn),
        })
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves the connection usable (SQLite rolls back an
        // unfinished transaction), so a poisoned lock is recovered.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn parse(&self, id: &str, doc: &str) -> Result<RecoveryInstance, StoreError> {
        serde_json::from_str(doc).map_err(|source| StoreError::Corrupt {
            path: self.path.clone(),
            what: format!("instance {id}"),
            source,
        })
    }

    fn query_instances(
        &self,
        sql: &str,
        p: impl rusqlite::Params,
    ) -> Result<Vec<RecoveryInstance>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(sql).map_err(self.err())?;
        let rows = st
            .query_map(p, |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(self.err())?;
        let mut out = Vec::new();
        for row in rows {
            let (id, doc) = row.map_err(self.err())?;
            out.push(self.parse(&id, &doc)?);
        }
        Ok(out)
    }
}

fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRecord> {
    let kind: String = r.get(1)?;
    Ok(TokenRecord {
        hash: r.get(0)?,
        kind: if kind == "agent" {
            TokenKind::Agent
        } else {
            TokenKind::Pairing
        },
        instance_id: r.get(2)?,
        created_at: u64_of(r.get(3)?),
        expires_at: u64_of(r.get(4)?),
        used_at: r.get::<_, Option<i64>>(5)?.map(u64_of),
    })
}

const CREDENTIAL_COLUMNS: &str =
    "id, name, role, secret_hash, created_at, created_by, revoked_at, revoked_by";

fn credential_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CredentialRecord> {
    let role: String = r.get(2)?;
    Ok(CredentialRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        role: role.parse().map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, Box::new(e))
        })?,
        secret_hash: r.get(3)?,
        created_at: u64_of(r.get(4)?),
        created_by: r.get(5)?,
        revoked_at: r.get::<_, Option<i64>>(6)?.map(u64_of),
        revoked_by: r.get(7)?,
    })
}

fn client_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ClientRecord> {
    Ok(ClientRecord {
        client_id: r.get(0)?,
        secret_hash: r.get(1)?,
        instance_id: r.get(2)?,
        created_at: u64_of(r.get(3)?),
        stopped: r.get::<_, i64>(4)? != 0,
    })
}

impl Store for SqliteStore {
    fn instance(&self, id: &str) -> Result<Option<RecoveryInstance>, StoreError> {
        Ok(self
            .query_instances("SELECT id, doc FROM instances WHERE id = ?1", [id])?
            .pop())
    }

    fn instances(&self) -> Result<Vec<RecoveryInstance>, StoreError> {
        self.query_instances("SELECT id, doc FROM instances ORDER BY id", [])
    }

    fn stale_instances(
        &self,
        agent_before: u64,
        client_before: u64,
    ) -> Result<Vec<RecoveryInstance>, StoreError> {
        self.query_instances(
            "SELECT id, doc FROM instances WHERE active = 1 AND \
             ((agent_seen < ?1 AND agent_flag = 0) OR (client_seen < ?2 AND client_flag = 0))",
            params![i64_of(agent_before), i64_of(client_before)],
        )
    }

    fn token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        let conn = self.conn();
        conn.query_row(
            "SELECT hash, kind, instance_id, created_at, expires_at, used_at FROM tokens WHERE hash = ?1",
            [hash],
            token_row,
        )
        .optional()
        .map_err(self.err())
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(
                "SELECT hash, kind, instance_id, created_at, expires_at, used_at FROM tokens \
                 ORDER BY created_at DESC, hash",
            )
            .map_err(self.err())?;
        let rows = st.query_map([], token_row).map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    fn client_by_secret(&self, hash: &str) -> Result<Option<ClientRecord>, StoreError> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(
                "SELECT client_id, secret_hash, instance_id, created_at, stopped FROM clients WHERE secret_hash = ?1",
            )
            .map_err(self.err())?;
        st.query_row([hash], client_row)
            .optional()
            .map_err(self.err())
    }

    fn clients_of(&self, instance_id: &str) -> Result<Vec<ClientRecord>, StoreError> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(
                "SELECT client_id, secret_hash, instance_id, created_at, stopped FROM clients WHERE instance_id = ?1",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map([instance_id], client_row)
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    fn agent_by_secret(&self, hash: &str) -> Result<Option<AgentRecord>, StoreError> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(
                "SELECT secret_hash, instance_id, created_at FROM agents WHERE secret_hash = ?1",
            )
            .map_err(self.err())?;
        st.query_row([hash], |r| {
            Ok(AgentRecord {
                secret_hash: r.get(0)?,
                instance_id: r.get(1)?,
                created_at: u64_of(r.get(2)?),
            })
        })
        .optional()
        .map_err(self.err())
    }

    fn credential_by_secret(&self, hash: &str) -> Result<Option<CredentialRecord>, StoreError> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(&format!(
                "SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE secret_hash = ?1"
            ))
            .map_err(self.err())?;
        st.query_row([hash], credential_row)
            .optional()
            .map_err(self.err())
    }

    fn credential(&self, id: &str) -> Result<Option<CredentialRecord>, StoreError> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(&format!(
                "SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE id = ?1"
            ))
            .map_err(self.err())?;
        st.query_row([id], credential_row)
            .optional()
            .map_err(self.err())
    }

    fn credentials(&self) -> Result<Vec<CredentialRecord>, StoreError> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(&format!(
                "SELECT {CREDENTIAL_COLUMNS} FROM credentials ORDER BY created_at, id"
            ))
            .map_err(self.err())?;
        let rows = st.query_map([], credential_row).map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.err())?;
        for inst in &batch.instances {
            let doc = serde_json::to_string(inst).map_err(|source| StoreError::Corrupt {
                path: self.path.clone(),
                what: format!("instance {}", inst.recovery_instance_id),
                source,
            })?;
            let f = &inst.failback;
            let active = matches!(
                f.state,
                FailbackState::FailbackInProgress
                    | FailbackState::FailbackReadyForLaunch
                    | FailbackState::FailbackNotReadyForLaunch
            );
            tx.prepare_cached(
                "INSERT INTO instances (id, doc, active, agent_seen, client_seen, agent_flag, client_flag) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT(id) DO UPDATE SET doc = ?2, active = ?3, \
                 agent_seen = ?4, client_seen = ?5, agent_flag = ?6, client_flag = ?7",
            )
            .and_then(|mut st| {
                st.execute(params![
                    inst.recovery_instance_id,
                    doc,
                    active,
                    i64_of(inst.agent.last_seen_at.unwrap_or(0)),
                    i64_of(f.client_last_seen_at.unwrap_or(0)),
                    f.errors.contains(&ReplicationError::AgentNotSeen),
                    f.errors.contains(&ReplicationError::FailbackClientNotSeen),
                ])
            })
            .map_err(self.err())?;
        }
        for t in &batch.tokens {
            tx.execute(
                "INSERT INTO tokens (hash, kind, instance_id, created_at, expires_at, used_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT(hash) DO UPDATE SET used_at = ?6, \
                 expires_at = MIN(expires_at, ?5)",
                params![
                    t.hash,
                    kind_str(t.kind),
                    t.instance_id,
                    i64_of(t.created_at),
                    i64_of(t.expires_at),
                    t.used_at.map(i64_of)
                ],
            )
            .map_err(self.err())?;
        }
        for c in &batch.clients {
            tx.execute(
                "INSERT INTO clients (client_id, secret_hash, instance_id, created_at, stopped) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT(client_id) DO UPDATE SET stopped = ?5",
                params![
                    c.client_id,
                    c.secret_hash,
                    c.instance_id,
                    i64_of(c.created_at),
                    c.stopped
                ],
            )
            .map_err(self.err())?;
        }
        for a in &batch.agents {
            tx.execute(
                "INSERT OR REPLACE INTO agents (secret_hash, instance_id, created_at) VALUES (?1, ?2, ?3)",
                params![a.secret_hash, a.instance_id, i64_of(a.created_at)],
            )
            .map_err(self.err())?;
        }
        for c in &batch.credentials {
            tx.execute(
                &format!(
                    "INSERT INTO credentials ({CREDENTIAL_COLUMNS}) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                     ON CONFLICT(id) DO UPDATE SET revoked_at = ?7, revoked_by = ?8"
                ),
                params![
                    c.id,
                    c.name,
                    c.role.as_str(),
                    c.secret_hash,
                    i64_of(c.created_at),
                    c.created_by,
                    c.revoked_at.map(i64_of),
                    c.revoked_by
                ],
            )
            .map_err(self.err())?;
        }
        for e in &batch.events {
            tx.prepare_cached(
                "INSERT INTO events (at, instance_id, kind, message, actor) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    i64_of(e.at),
                    e.instance_id,
                    e.kind,
                    e.message,
                    e.actor
                ])
            })
            .map_err(self.err())?;
        }
        tx.commit().map_err(self.err())
    }

    fn events(
        &self,
        instance: Option<&str>,
        after: u64,
        limit: u64,
    ) -> Result<Vec<Event>, StoreError> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(
                "SELECT seq, at, instance_id, kind, message, actor FROM events \
                 WHERE seq > ?1 AND (?2 IS NULL OR instance_id = ?2) ORDER BY seq LIMIT ?3",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map(params![i64_of(after), instance, i64_of(limit)], |r| {
                Ok(Event {
                    seq: u64_of(r.get(0)?),
                    at: u64_of(r.get(1)?),
                    recovery_instance_id: r.get(2)?,
                    kind: r.get(3)?,
                    message: r.get(4)?,
                    actor: r.get(5)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database written before credentials and actors existed opens, its events read with
    /// no actor, and new events and credentials are stored.
    #[test]
    fn old_database_is_migrated() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("failback.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, \
                 instance_id TEXT, kind TEXT NOT NULL, message TEXT NOT NULL);
                 INSERT INTO events (at, instance_id, kind, message) VALUES (5, NULL, 'OLD', 'm');",
            )
            .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        let mut b = Batch::by("bootstrap-admin");
        b.event(6, None, "NEW", "n".into());
        b.credentials.push(CredentialRecord {
            id: "cred-0123456789abcdef".into(),
            name: "ci-bot".into(),
            role: Role::Operator,
            secret_hash: "h".into(),
            created_at: 6,
            created_by: "bootstrap-admin".into(),
            revoked_at: None,
            revoked_by: None,
        });
        s.apply(b).unwrap();
        let ev = s.events(None, 0, 10).unwrap();
        assert_eq!(ev.len(), 2);
        assert_eq!((ev[0].kind.as_str(), ev[0].actor.as_deref()), ("OLD", None));
        assert_eq!(ev[1].actor.as_deref(), Some("bootstrap-admin"));
        let c = s.credential_by_secret("h").unwrap().unwrap();
        assert_eq!((c.name.as_str(), c.role), ("ci-bot", Role::Operator));
        drop(s);
        // Opening again (already migrated) is a no-op.
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.credentials().unwrap().len(), 1);
    }
}
