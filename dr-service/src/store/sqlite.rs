//! The embedded SQLite backend: one file, WAL mode, one connection (SQLite has one writer
//! anyway; the connection is held for one statement or one transaction, never across a
//! request, and only on the blocking thread pool).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use failback_api::{Event, RecoveryInstance};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::migrations::{self, MIGRATIONS};
use super::{
    active, flags, i64_of, kind_of, kind_str, u64_of, AgentRecord, Batch, ClientRecord,
    CredentialRecord, Store, StoreError, TokenRecord, CREDENTIAL_COLUMNS,
};

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

/// Migration 1 adopts a database of the release before migrations; one written before
/// events had an `actor` lacks that column.
fn add_missing_actor(conn: &Connection) -> rusqlite::Result<()> {
    let has_actor = conn
        .prepare("SELECT 1 FROM pragma_table_info('events') WHERE name = 'actor'")?
        .exists([])?;
    if !has_actor {
        conn.execute_batch("ALTER TABLE events ADD COLUMN actor TEXT")?;
    }
    Ok(())
}

fn version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        [],
        |r| r.get(0),
    )
}

/// Applies the migrations `conn` has not seen, each in one transaction with its record.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let err = |source| StoreError::Sqlite {
        path: path.to_owned(),
        source,
    };
    conn.execute_batch(migrations::TRACKING_TABLE)
        .map_err(err)?;
    let found = version(conn).map_err(err)?;
    if found > migrations::latest() {
        return Err(StoreError::TooNew {
            db: path.display().to_string(),
            found,
            known: migrations::latest(),
        });
    }
    for m in MIGRATIONS.iter().filter(|m| m.version > found) {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        tx.execute_batch(m.sqlite).map_err(err)?;
        if m.version == 1 {
            add_missing_actor(&tx).map_err(err)?;
        }
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
            params![m.version, m.name, i64_of(crate::util::now_secs())],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        tracing::info!(
            "database {}: migration {} applied ({})",
            path.display(),
            m.version,
            m.name
        );
    }
    Ok(())
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
            || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
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
        let mut conn = conn;
        migrate(&mut conn, path)?;
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
            db: self.path.display().to_string(),
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
        kind: kind_of(&kind),
        instance_id: r.get(2)?,
        created_at: u64_of(r.get(3)?),
        expires_at: u64_of(r.get(4)?),
        used_at: r.get::<_, Option<i64>>(5)?.map(u64_of),
    })
}

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
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.err())?;
        self.write_instances(&tx, &batch)?;
        self.write_tokens(&tx, &batch)?;
        self.write_rest(&tx, &batch)?;
        tx.commit().map_err(self.err())
    }

    fn schema_version(&self) -> Result<i64, StoreError> {
        version(&self.conn()).map_err(self.err())
    }

    fn checkpoint(&self, instance: &str) -> Result<Option<String>, StoreError> {
        self.conn()
            .query_row(
                "SELECT body FROM client_checkpoints WHERE instance_id = ?1",
                [instance],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.err())
    }

    fn put_checkpoint(
        &self,
        instance: &str,
        body: Option<&str>,
        at: u64,
    ) -> Result<(), StoreError> {
        let conn = self.conn();
        match body {
            Some(b) => conn.execute(
                "INSERT INTO client_checkpoints (instance_id, body, updated_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (instance_id) DO UPDATE SET body = ?2, updated_at = ?3",
                rusqlite::params![instance, b, i64_of(at)],
            ),
            None => conn.execute(
                "DELETE FROM client_checkpoints WHERE instance_id = ?1",
                [instance],
            ),
        }
        .map_err(self.err())?;
        Ok(())
    }

    fn secret(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.conn()
            .query_row("SELECT value FROM secrets WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.err())
    }

    fn insert_secret(&self, name: &str, value: &str) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .execute(
                "INSERT INTO secrets (name, value, created_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT(name) DO NOTHING",
                params![name, value, i64_of(crate::util::now_secs())],
            )
            .map_err(self.err())?;
        Ok(n == 1)
    }

    fn lease(&self) -> Result<bool, StoreError> {
        Ok(true)
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

impl SqliteStore {
    fn conflict(&self, what: String) -> StoreError {
        StoreError::Conflict {
            db: self.path.display().to_string(),
            what,
        }
    }

    /// Writes each instance if it is still as the request read it.
    fn write_instances(&self, tx: &rusqlite::Transaction<'_>, b: &Batch) -> Result<(), StoreError> {
        for w in &b.instances {
            let inst = &w.new;
            let id = &inst.recovery_instance_id;
            let current: Option<String> = tx
                .prepare_cached("SELECT doc FROM instances WHERE id = ?1")
                .and_then(|mut st| st.query_row([id], |r| r.get(0)).optional())
                .map_err(self.err())?;
            let current = current.map(|d| self.parse(id, &d)).transpose()?;
            if current != w.expected {
                return Err(self.conflict(format!("recovery instance {id}")));
            }
            let doc = serde_json::to_string(inst).map_err(|source| StoreError::Corrupt {
                db: self.path.display().to_string(),
                what: format!("instance {id}"),
                source,
            })?;
            let (agent_flag, client_flag) = flags(inst);
            tx.prepare_cached(
                "INSERT INTO instances (id, doc, active, agent_seen, client_seen, agent_flag, client_flag) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT(id) DO UPDATE SET doc = ?2, active = ?3, \
                 agent_seen = ?4, client_seen = ?5, agent_flag = ?6, client_flag = ?7",
            )
            .and_then(|mut st| {
                st.execute(params![
                    id,
                    doc,
                    active(inst),
                    i64_of(inst.agent.last_seen_at.unwrap_or(0)),
                    i64_of(inst.failback.client_last_seen_at.unwrap_or(0)),
                    agent_flag,
                    client_flag,
                ])
            })
            .map_err(self.err())?;
        }
        Ok(())
    }

    /// Inserts new tokens; marks used ones used unless another request did first.
    fn write_tokens(&self, tx: &rusqlite::Transaction<'_>, b: &Batch) -> Result<(), StoreError> {
        for t in &b.tokens {
            match t.used_at {
                None => {
                    tx.execute(
                        "INSERT INTO tokens (hash, kind, instance_id, created_at, expires_at, used_at) \
                         VALUES (?1, ?2, ?3, ?4, ?5, NULL)",
                        params![
                            t.hash,
                            kind_str(t.kind),
                            t.instance_id,
                            i64_of(t.created_at),
                            i64_of(t.expires_at),
                        ],
                    )
                    .map_err(self.err())?;
                }
                Some(at) => {
                    let n = tx
                        .execute(
                            "UPDATE tokens SET used_at = ?2 WHERE hash = ?1 AND used_at IS NULL",
                            params![t.hash, i64_of(at)],
                        )
                        .map_err(self.err())?;
                    if n != 1 {
                        return Err(self.conflict(format!("{} token", t.kind)));
                    }
                }
            }
        }
        for (hash, at) in &b.revoked_tokens {
            let n = tx
                .execute(
                    "UPDATE tokens SET expires_at = ?2 \
                     WHERE hash = ?1 AND used_at IS NULL AND expires_at > ?2",
                    params![hash, i64_of(*at)],
                )
                .map_err(self.err())?;
            if n != 1 {
                return Err(self.conflict("revoked token".into()));
            }
        }
        Ok(())
    }

    fn write_rest(&self, tx: &rusqlite::Transaction<'_>, b: &Batch) -> Result<(), StoreError> {
        for c in &b.clients {
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
        for a in &b.agents {
            tx.execute(
                "INSERT OR REPLACE INTO agents (secret_hash, instance_id, created_at) VALUES (?1, ?2, ?3)",
                params![a.secret_hash, a.instance_id, i64_of(a.created_at)],
            )
            .map_err(self.err())?;
        }
        for c in &b.credentials {
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
            .map_err(|e| {
                if is_unique_violation(&e) {
                    self.conflict(format!("credential name '{}'", c.name))
                } else {
                    self.err()(e)
                }
            })?;
        }
        for e in &b.events {
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
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use failback_api::Role;

    /// The schema of the release before versioned migrations, verbatim from its `store.rs`
    /// (commit 4a25fa8), with a row in each table as that release wrote them.
    const RELEASE_SCHEMA: &str = include_str!("../../tests/fixtures/schema-4a25fa8.sql");

    fn credential(name: &str, hash: &str) -> CredentialRecord {
        CredentialRecord {
            id: format!("cred-{:0>16}", hash),
            name: name.into(),
            role: Role::Operator,
            secret_hash: hash.into(),
            created_at: 6,
            created_by: "bootstrap-admin".into(),
            revoked_at: None,
            revoked_by: None,
        }
    }

    /// A database written by the previous release upgrades in place: every migration is
    /// recorded, its rows read back, new writes work, and opening again changes nothing.
    #[test]
    fn release_database_upgrades_in_place() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("failback.db");
        {
            // Rows written with that release's statements.
            let c = Connection::open(&path).unwrap();
            c.execute_batch(RELEASE_SCHEMA).unwrap();
            let mut inst = crate::service::test_instance("i-0123456789abcdef");
            inst.hostname = Some("web1".into());
            c.execute(
                "INSERT INTO instances (id, doc, active, agent_seen, client_seen, agent_flag, client_flag) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT(id) DO UPDATE SET doc = ?2, active = ?3, \
                 agent_seen = ?4, client_seen = ?5, agent_flag = ?6, client_flag = ?7",
                params![inst.recovery_instance_id, serde_json::to_string(&inst).unwrap(), true, 1, 1, false, false],
            )
            .unwrap();
            c.execute_batch(
                "INSERT INTO tokens VALUES ('tokhash', 'pairing', 'i-0123456789abcdef', 1, 99, 5);
                 INSERT INTO clients VALUES ('fc-1', 'clienthash', 'i-0123456789abcdef', 5, 0);
                 INSERT INTO agents VALUES ('agenthash', 'i-0123456789abcdef', 1);
                 INSERT INTO events (at, instance_id, kind, message, actor) \
                 VALUES (5, 'i-0123456789abcdef', 'PAIRED', 'm', 'client:fc-1');",
            )
            .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), migrations::latest());
        let inst = s.instance("i-0123456789abcdef").unwrap().unwrap();
        assert_eq!(inst.hostname.as_deref(), Some("web1"));
        assert_eq!(s.token("tokhash").unwrap().unwrap().used_at, Some(5));
        assert!(s.client_by_secret("clienthash").unwrap().is_some());
        assert!(s.agent_by_secret("agenthash").unwrap().is_some());
        let ev = s.events(None, 0, 10).unwrap();
        assert_eq!(
            (ev[0].kind.as_str(), ev[0].actor.as_deref()),
            ("PAIRED", Some("client:fc-1"))
        );
        let mut b = Batch::by("bootstrap-admin");
        b.credentials.push(credential("ci-bot", "h"));
        b.event(6, None, "NEW", "n".into());
        s.apply(b).unwrap();
        // Migration 2: one active credential per name, enforced by the database.
        let mut b = Batch::by("bootstrap-admin");
        b.credentials.push(credential("ci-bot", "h2"));
        assert!(s.apply(b).unwrap_err().is_conflict());
        drop(s);
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.credentials().unwrap().len(), 1);
        let n: i64 = s
            .conn()
            .query_row("SELECT COUNT(*) FROM schema_migrations", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, migrations::latest());
    }

    /// A database written before credentials and actors existed opens, its events read with
    /// no actor.
    #[test]
    fn database_without_actor_column_is_migrated() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("failback.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                "CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, \
                 instance_id TEXT, kind TEXT NOT NULL, message TEXT NOT NULL);
                 INSERT INTO events (at, instance_id, kind, message) VALUES (5, NULL, 'OLD', 'm');",
            )
            .unwrap();
        let s = SqliteStore::open(&path).unwrap();
        let mut b = Batch::by("bootstrap-admin");
        b.event(6, None, "NEW", "n".into());
        s.apply(b).unwrap();
        let ev = s.events(None, 0, 10).unwrap();
        assert_eq!((ev[0].kind.as_str(), ev[0].actor.as_deref()), ("OLD", None));
        assert_eq!(ev[1].actor.as_deref(), Some("bootstrap-admin"));
    }

    /// A database migrated by a newer program is refused, naming both versions.
    #[test]
    fn newer_schema_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("failback.db");
        drop(SqliteStore::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .execute(
                "INSERT INTO schema_migrations VALUES (999, 'future', 0)",
                [],
            )
            .unwrap();
        let e = SqliteStore::open(&path).unwrap_err().to_string();
        assert!(
            e.contains("schema version 999") && e.contains("upgrade"),
            "{e}"
        );
    }
}
