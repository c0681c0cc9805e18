//! The PostgreSQL backend (`--database postgres://user@host/db`): the same tables and the
//! same migrations as SQLite (in PostgreSQL's dialect), a pool of connections, and
//! optimistic writes (`SELECT ... FOR UPDATE` of the instance, compared with what the request
//! read) so that several replicas can share one database.
//!
//! Driver: the synchronous `postgres` crate (rust-postgres, the reference native driver) with
//! an `r2d2` pool: the store is a blocking trait called on tokio's blocking pool, so an async
//! driver (sqlx, tokio-postgres) would only add a second runtime bridge; sqlx's compile-time
//! checks would also need a database at build time.

use failback_api::{Event, RecoveryInstance};
use postgres::error::SqlState;
use std::collections::HashMap;

use postgres::types::ToSql;
use postgres::{GenericClient, Row, Statement};

use super::migrations::{self, MIGRATIONS};
use super::pg_tls::Target;
use super::{
    active, flags, i64_of, kind_of, kind_str, u64_of, AgentRecord, Batch, ClientRecord,
    CredentialRecord, Store, StoreError, TokenRecord, CREDENTIAL_COLUMNS,
};

type Pool = r2d2::Pool<Manager>;
type Conn = r2d2::PooledConnection<Manager>;
type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// Opens pooled connections. Hand-written (instead of `r2d2_postgres`) to keep a cache of
/// prepared statements per connection: a statement prepared once runs in one round trip
/// instead of two (prepare + execute) on every heartbeat.
#[derive(Debug)]
struct Manager {
    target: Target,
}

/// A pooled connection and its prepared statements (keyed by SQL text).
struct PgConn {
    client: postgres::Client,
    cache: HashMap<String, Statement>,
    /// When the pool last handed it out (see `is_valid`).
    checked_out: std::time::Instant,
}

/// A connection handed out this recently is not probed again: a heartbeat takes a connection
/// three times, and the probe is a round trip each (a third of a heartbeat's round trips).
/// A connection that broke meanwhile fails that one request, and the pool drops it.
const PROBE_AFTER_IDLE: std::time::Duration = std::time::Duration::from_secs(2);

impl r2d2::ManageConnection for Manager {
    type Connection = PgConn;
    type Error = postgres::Error;

    fn connect(&self) -> Result<PgConn, postgres::Error> {
        Ok(PgConn {
            client: self.target.connect()?,
            cache: HashMap::new(),
            checked_out: std::time::Instant::now(),
        })
    }

    fn is_valid(&self, c: &mut PgConn) -> Result<(), postgres::Error> {
        let idle = c.checked_out.elapsed();
        c.checked_out = std::time::Instant::now();
        if idle < PROBE_AFTER_IDLE && !c.client.is_closed() {
            return Ok(());
        }
        c.client.simple_query("").map(|_| ())
    }

    fn has_broken(&self, c: &mut PgConn) -> bool {
        c.client.is_closed()
    }
}

fn prepared<C: GenericClient>(
    c: &mut C,
    cache: &mut HashMap<String, Statement>,
    sql: &str,
) -> Result<Statement, postgres::Error> {
    if let Some(st) = cache.get(sql) {
        return Ok(st.clone());
    }
    let st = c.prepare(sql)?;
    cache.insert(sql.to_string(), st.clone());
    Ok(st)
}

/// Queries through the statement cache, on a connection or in a transaction.
macro_rules! cached_queries {
    ($t:ty, $client:ident) => {
        // One API for both; not every method is used on both.
        #[allow(dead_code)]
        impl $t {
            fn query(&mut self, sql: &str, p: Params<'_>) -> Result<Vec<Row>, postgres::Error> {
                let st = prepared(&mut self.$client, &mut self.cache, sql)?;
                self.$client.query(&st, p)
            }
            fn query_opt(
                &mut self,
                sql: &str,
                p: Params<'_>,
            ) -> Result<Option<Row>, postgres::Error> {
                let st = prepared(&mut self.$client, &mut self.cache, sql)?;
                self.$client.query_opt(&st, p)
            }
            fn query_one(&mut self, sql: &str, p: Params<'_>) -> Result<Row, postgres::Error> {
                let st = prepared(&mut self.$client, &mut self.cache, sql)?;
                self.$client.query_one(&st, p)
            }
            fn execute(&mut self, sql: &str, p: Params<'_>) -> Result<u64, postgres::Error> {
                let st = prepared(&mut self.$client, &mut self.cache, sql)?;
                self.$client.execute(&st, p)
            }
        }
    };
}

/// A transaction on a pooled connection, with that connection's statement cache.
struct Tx<'a> {
    tx: postgres::Transaction<'a>,
    cache: &'a mut HashMap<String, Statement>,
}

cached_queries!(PgConn, client);
cached_queries!(Tx<'_>, tx);

impl PgConn {
    fn transaction(&mut self) -> Result<Tx<'_>, postgres::Error> {
        Ok(Tx {
            tx: self.client.transaction()?,
            cache: &mut self.cache,
        })
    }
}

impl Tx<'_> {
    fn batch_execute(&mut self, sql: &str) -> Result<(), postgres::Error> {
        self.tx.batch_execute(sql)
    }

    fn commit(self) -> Result<(), postgres::Error> {
        self.tx.commit()
    }
}

/// Advisory lock key under which migrations run (so that replicas starting together apply
/// each migration once): "failback" in ASCII.
const MIGRATION_LOCK: i64 = 0x6661_696c_6261_636b;
/// Advisory lock key of the periodic-work lease ("failbacl"): another key than migrations.
const LEASE_LOCK: i64 = 0x6661_696c_6261_636c;

pub struct PgStore {
    /// The URL without its password (for messages).
    url: String,
    /// Always `Some` until dropped (see the `Drop` impl).
    pool: Option<Pool>,
    target: Target,
    /// The connection holding the periodic-work lease (advisory lock), when this process
    /// holds it.
    lease: std::sync::Mutex<Option<postgres::Client>>,
}

impl Drop for PgStore {
    /// A `postgres::Client` blocks on its own runtime when dropped, which panics on a tokio
    /// worker thread (a server shut down in an async test or task): the pool's connections
    /// are closed on a thread of their own.
    fn drop(&mut self) {
        let pool = self.pool.take();
        let lease = self
            .lease
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let _ = std::thread::Builder::new()
            .name("pg-pool-drop".into())
            .spawn(move || drop((pool, lease)));
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgStore({})", self.url)
    }
}

/// `postgres://user:secret@host/db` -> `postgres://user@host/db` (also for key=value
/// strings: `password=...` is dropped).
pub fn redact(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (auth, tail) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let tail = redact_query(tail);
        if let Some((user, host)) = auth.rsplit_once('@') {
            let user = user.split(':').next().unwrap_or("");
            return format!("{scheme}://{user}@{host}{tail}");
        }
        return format!("{scheme}://{auth}{tail}");
    }
    match super::pg_tls::key_values(url) {
        Ok(kvs) => kvs
            .into_iter()
            .filter(|(_, k, _)| k != "password")
            .map(|(raw, _, _)| raw)
            .collect::<Vec<_>>()
            .join(" "),
        // Unparsable: show no value at all.
        Err(_) => url
            .split_whitespace()
            .map(|kv| kv.split('=').next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// `/db?password=x&sslmode=y` -> `/db?sslmode=y`.
fn redact_query(tail: &str) -> String {
    match tail.split_once('?') {
        None => tail.to_string(),
        Some((path, query)) => {
            let kept: Vec<&str> = query
                .split('&')
                .filter(|kv| !kv.starts_with("password="))
                .collect();
            if kept.is_empty() {
                path.to_string()
            } else {
                format!("{path}?{}", kept.join("&"))
            }
        }
    }
}

fn row_token(r: &postgres::Row) -> TokenRecord {
    TokenRecord {
        hash: r.get(0),
        kind: kind_of(r.get::<_, &str>(1)),
        instance_id: r.get(2),
        created_at: u64_of(r.get(3)),
        expires_at: u64_of(r.get(4)),
        used_at: r.get::<_, Option<i64>>(5).map(u64_of),
    }
}

fn row_client(r: &postgres::Row) -> ClientRecord {
    ClientRecord {
        client_id: r.get(0),
        secret_hash: r.get(1),
        instance_id: r.get(2),
        created_at: u64_of(r.get(3)),
        stopped: r.get(4),
    }
}

impl PgStore {
    /// Connects (pool of `max_connections`) and applies the missing migrations.
    pub fn open(url: &str, max_connections: u32) -> Result<PgStore, StoreError> {
        let shown = redact(url);
        let target = Target::parse(url, &shown)?;
        // One connection first: its error names the cause (TLS, refused, authentication)
        // at once, where the pool would retry it for its whole timeout.
        let probe = target.connect().map_err(|source| StoreError::Postgres {
            url: shown.clone(),
            source,
        })?;
        drop(probe);
        let manager = Manager {
            target: target.clone(),
        };
        let pool = r2d2::Pool::builder()
            .max_size(max_connections.max(1))
            .connection_timeout(std::time::Duration::from_secs(10))
            .build(manager)
            .map_err(|e| StoreError::Pool {
                url: shown.clone(),
                message: e.to_string(),
            })?;
        let s = PgStore {
            url: shown,
            pool: Some(pool),
            target,
            lease: std::sync::Mutex::new(None),
        };
        s.migrate()?;
        Ok(s)
    }

    fn err(&self) -> impl Fn(postgres::Error) -> StoreError + '_ {
        move |source| StoreError::Postgres {
            url: self.url.clone(),
            source,
        }
    }

    fn conn(&self) -> Result<Conn, StoreError> {
        let pool = self.pool.as_ref().ok_or_else(|| StoreError::Pool {
            url: self.url.clone(),
            message: "store closed".into(),
        })?;
        pool.get().map_err(|e| StoreError::Pool {
            url: self.url.clone(),
            message: e.to_string(),
        })
    }

    fn conflict(&self, what: String) -> StoreError {
        StoreError::Conflict {
            db: self.url.clone(),
            what,
        }
    }

    fn parse(&self, id: &str, doc: &str) -> Result<RecoveryInstance, StoreError> {
        serde_json::from_str(doc).map_err(|source| StoreError::Corrupt {
            db: self.url.clone(),
            what: format!("instance {id}"),
            source,
        })
    }

    /// All missing migrations in one transaction under an advisory lock.
    fn migrate(&self) -> Result<(), StoreError> {
        let mut c = self.conn()?;
        let mut tx = c.transaction().map_err(self.err())?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .map_err(self.err())?;
        tx.batch_execute(migrations::TRACKING_TABLE)
            .map_err(self.err())?;
        let found: i64 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_migrations",
                &[],
            )
            .map_err(self.err())?
            .get(0);
        if found > migrations::latest() {
            return Err(StoreError::TooNew {
                db: self.url.clone(),
                found,
                known: migrations::latest(),
            });
        }
        for m in MIGRATIONS.iter().filter(|m| m.version > found) {
            tx.batch_execute(m.postgres).map_err(self.err())?;
            tx.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                &[&m.version, &m.name, &i64_of(crate::util::now_secs())],
            )
            .map_err(self.err())?;
            tracing::info!(
                "database {}: migration {} applied ({})",
                self.url,
                m.version,
                m.name
            );
        }
        tx.commit().map_err(self.err())
    }

    fn query_instances(
        &self,
        sql: &str,
        p: Params<'_>,
    ) -> Result<Vec<RecoveryInstance>, StoreError> {
        let rows = self.conn()?.query(sql, p).map_err(self.err())?;
        rows.iter()
            .map(|r| self.parse(r.get(0), r.get(1)))
            .collect()
    }

    fn credentials_where(
        &self,
        cond: &str,
        p: Params<'_>,
    ) -> Result<Vec<CredentialRecord>, StoreError> {
        let rows = self
            .conn()?
            .query(
                &format!("SELECT {CREDENTIAL_COLUMNS} FROM credentials {cond}"),
                p,
            )
            .map_err(self.err())?;
        rows.iter()
            .map(|r| {
                let role: &str = r.get(2);
                Ok(CredentialRecord {
                    id: r.get(0),
                    name: r.get(1),
                    role: role.parse().map_err(|_| StoreError::BadValue {
                        db: self.url.clone(),
                        what: format!(
                            "credential {} has unknown role {role:?}",
                            r.get::<_, &str>(0)
                        ),
                    })?,
                    secret_hash: r.get(3),
                    created_at: u64_of(r.get(4)),
                    created_by: r.get(5),
                    revoked_at: r.get::<_, Option<i64>>(6).map(u64_of),
                    revoked_by: r.get(7),
                })
            })
            .collect()
    }

    fn write_instances(&self, tx: &mut Tx<'_>, b: &Batch) -> Result<(), StoreError> {
        for w in &b.instances {
            let inst = &w.new;
            let id = &inst.recovery_instance_id;
            let current = tx
                .query_opt("SELECT doc FROM instances WHERE id = $1 FOR UPDATE", &[id])
                .map_err(self.err())?
                .map(|r| self.parse(id, r.get(0)))
                .transpose()?;
            if current != w.expected {
                return Err(self.conflict(format!("recovery instance {id}")));
            }
            let doc = serde_json::to_string(inst).map_err(|source| StoreError::Corrupt {
                db: self.url.clone(),
                what: format!("instance {id}"),
                source,
            })?;
            let (agent_flag, client_flag) = flags(inst);
            let n = tx
                .execute(
                    "INSERT INTO instances (id, doc, active, agent_seen, client_seen, agent_flag, client_flag) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO UPDATE SET doc = $2, active = $3, \
                     agent_seen = $4, client_seen = $5, agent_flag = $6, client_flag = $7 \
                     WHERE $8",
                    &[
                        id,
                        &doc,
                        &active(inst),
                        &i64_of(inst.agent.last_seen_at.unwrap_or(0)),
                        &i64_of(inst.failback.client_last_seen_at.unwrap_or(0)),
                        &agent_flag,
                        &client_flag,
                        // A row inserted meanwhile by another replica (we read none) conflicts.
                        &w.expected.is_some(),
                    ],
                )
                .map_err(self.err())?;
            if n != 1 {
                return Err(self.conflict(format!("recovery instance {id}")));
            }
        }
        Ok(())
    }

    fn write_tokens(&self, tx: &mut Tx<'_>, b: &Batch) -> Result<(), StoreError> {
        for t in &b.tokens {
            let n = match t.used_at {
                None => tx.execute(
                    "INSERT INTO tokens (hash, kind, instance_id, created_at, expires_at, used_at) \
                     VALUES ($1, $2, $3, $4, $5, NULL)",
                    &[
                        &t.hash,
                        &kind_str(t.kind),
                        &t.instance_id,
                        &i64_of(t.created_at),
                        &i64_of(t.expires_at),
                    ],
                ),
                Some(at) => tx.execute(
                    "UPDATE tokens SET used_at = $2 WHERE hash = $1 AND used_at IS NULL",
                    &[&t.hash, &i64_of(at)],
                ),
            }
            .map_err(self.err())?;
            if n != 1 {
                return Err(self.conflict(format!("{} token", t.kind)));
            }
        }
        for (hash, at) in &b.revoked_tokens {
            let n = tx
                .execute(
                    "UPDATE tokens SET expires_at = $2 \
                     WHERE hash = $1 AND used_at IS NULL AND expires_at > $2",
                    &[hash, &i64_of(*at)],
                )
                .map_err(self.err())?;
            if n != 1 {
                return Err(self.conflict("revoked token".into()));
            }
        }
        Ok(())
    }

    fn write_rest(&self, tx: &mut Tx<'_>, b: &Batch) -> Result<(), StoreError> {
        for c in &b.clients {
            tx.execute(
                "INSERT INTO clients (client_id, secret_hash, instance_id, created_at, stopped) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (client_id) DO UPDATE SET stopped = $5",
                &[
                    &c.client_id,
                    &c.secret_hash,
                    &c.instance_id,
                    &i64_of(c.created_at),
                    &c.stopped,
                ],
            )
            .map_err(self.err())?;
        }
        for a in &b.agents {
            tx.execute(
                "INSERT INTO agents (secret_hash, instance_id, created_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (secret_hash) DO UPDATE SET instance_id = $2, created_at = $3",
                &[&a.secret_hash, &a.instance_id, &i64_of(a.created_at)],
            )
            .map_err(self.err())?;
        }
        for c in &b.credentials {
            tx.execute(
                &format!(
                    "INSERT INTO credentials ({CREDENTIAL_COLUMNS}) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                     ON CONFLICT (id) DO UPDATE SET revoked_at = $7, revoked_by = $8"
                ),
                &[
                    &c.id,
                    &c.name,
                    &c.role.as_str(),
                    &c.secret_hash,
                    &i64_of(c.created_at),
                    &c.created_by,
                    &c.revoked_at.map(i64_of),
                    &c.revoked_by,
                ],
            )
            .map_err(|e| {
                if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
                    self.conflict(format!("credential name '{}'", c.name))
                } else {
                    self.err()(e)
                }
            })?;
        }
        for e in &b.events {
            tx.execute(
                "INSERT INTO events (at, instance_id, kind, message, actor) \
                 VALUES ($1, $2, $3, $4, $5)",
                &[&i64_of(e.at), &e.instance_id, &e.kind, &e.message, &e.actor],
            )
            .map_err(self.err())?;
        }
        Ok(())
    }
}

impl Store for PgStore {
    fn instance(&self, id: &str) -> Result<Option<RecoveryInstance>, StoreError> {
        Ok(self
            .query_instances("SELECT id, doc FROM instances WHERE id = $1", &[&id])?
            .pop())
    }

    fn instances(&self) -> Result<Vec<RecoveryInstance>, StoreError> {
        self.query_instances("SELECT id, doc FROM instances ORDER BY id", &[])
    }

    fn stale_instances(
        &self,
        agent_before: u64,
        client_before: u64,
    ) -> Result<Vec<RecoveryInstance>, StoreError> {
        self.query_instances(
            "SELECT id, doc FROM instances WHERE active AND \
             ((agent_seen < $1 AND NOT agent_flag) OR (client_seen < $2 AND NOT client_flag))",
            &[&i64_of(agent_before), &i64_of(client_before)],
        )
    }

    fn token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        Ok(self
            .conn()?
            .query_opt(
                "SELECT hash, kind, instance_id, created_at, expires_at, used_at FROM tokens WHERE hash = $1",
                &[&hash],
            )
            .map_err(self.err())?
            .as_ref()
            .map(row_token))
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let rows = self
            .conn()?
            .query(
                "SELECT hash, kind, instance_id, created_at, expires_at, used_at FROM tokens \
                 ORDER BY created_at DESC, hash",
                &[],
            )
            .map_err(self.err())?;
        Ok(rows.iter().map(row_token).collect())
    }

    fn client_by_secret(&self, hash: &str) -> Result<Option<ClientRecord>, StoreError> {
        Ok(self
            .conn()?
            .query_opt(
                "SELECT client_id, secret_hash, instance_id, created_at, stopped FROM clients WHERE secret_hash = $1",
                &[&hash],
            )
            .map_err(self.err())?
            .as_ref()
            .map(row_client))
    }

    fn clients_of(&self, instance_id: &str) -> Result<Vec<ClientRecord>, StoreError> {
        Ok(self
            .conn()?
            .query(
                "SELECT client_id, secret_hash, instance_id, created_at, stopped FROM clients WHERE instance_id = $1",
                &[&instance_id],
            )
            .map_err(self.err())?
            .iter()
            .map(row_client)
            .collect())
    }

    fn agent_by_secret(&self, hash: &str) -> Result<Option<AgentRecord>, StoreError> {
        Ok(self
            .conn()?
            .query_opt(
                "SELECT secret_hash, instance_id, created_at FROM agents WHERE secret_hash = $1",
                &[&hash],
            )
            .map_err(self.err())?
            .map(|r| AgentRecord {
                secret_hash: r.get(0),
                instance_id: r.get(1),
                created_at: u64_of(r.get(2)),
            }))
    }

    fn credential_by_secret(&self, hash: &str) -> Result<Option<CredentialRecord>, StoreError> {
        Ok(self
            .credentials_where("WHERE secret_hash = $1", &[&hash])?
            .pop())
    }

    fn credential(&self, id: &str) -> Result<Option<CredentialRecord>, StoreError> {
        Ok(self.credentials_where("WHERE id = $1", &[&id])?.pop())
    }

    fn credentials(&self) -> Result<Vec<CredentialRecord>, StoreError> {
        self.credentials_where("ORDER BY created_at, id", &[])
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        let mut c = self.conn()?;
        let mut tx = c.transaction().map_err(self.err())?;
        self.write_instances(&mut tx, &batch)?;
        self.write_tokens(&mut tx, &batch)?;
        self.write_rest(&mut tx, &batch)?;
        tx.commit().map_err(|e| {
            if e.code() == Some(&SqlState::T_R_SERIALIZATION_FAILURE) {
                self.conflict("transaction".into())
            } else {
                self.err()(e)
            }
        })
    }

    fn events(
        &self,
        instance: Option<&str>,
        after: u64,
        limit: u64,
    ) -> Result<Vec<Event>, StoreError> {
        let rows = self
            .conn()?
            .query(
                "SELECT seq, at, instance_id, kind, message, actor FROM events \
                 WHERE seq > $1 AND ($2::TEXT IS NULL OR instance_id = $2) ORDER BY seq LIMIT $3",
                &[&i64_of(after), &instance, &i64_of(limit)],
            )
            .map_err(self.err())?;
        Ok(rows
            .iter()
            .map(|r| Event {
                seq: u64_of(r.get(0)),
                at: u64_of(r.get(1)),
                recovery_instance_id: r.get(2),
                kind: r.get(3),
                message: r.get(4),
                actor: r.get(5),
            })
            .collect())
    }

    fn checkpoint(&self, instance: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()?
            .query_opt(
                "SELECT body FROM client_checkpoints WHERE instance_id = $1",
                &[&instance],
            )
            .map_err(self.err())?
            .map(|r| r.get(0)))
    }

    fn put_checkpoint(
        &self,
        instance: &str,
        body: Option<&str>,
        at: u64,
    ) -> Result<(), StoreError> {
        let mut c = self.conn()?;
        match body {
            Some(b) => c.execute(
                "INSERT INTO client_checkpoints (instance_id, body, updated_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (instance_id) DO UPDATE SET body = $2, updated_at = $3",
                &[&instance, &b, &i64_of(at)],
            ),
            None => c.execute(
                "DELETE FROM client_checkpoints WHERE instance_id = $1",
                &[&instance],
            ),
        }
        .map_err(self.err())?;
        Ok(())
    }

    fn secret(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()?
            .query_opt("SELECT value FROM secrets WHERE name = $1", &[&name])
            .map_err(self.err())?
            .map(|r| r.get(0)))
    }

    fn insert_secret(&self, name: &str, value: &str) -> Result<bool, StoreError> {
        let n = self
            .conn()?
            .execute(
                "INSERT INTO secrets (name, value, created_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO NOTHING",
                &[&name, &value, &i64_of(crate::util::now_secs())],
            )
            .map_err(self.err())?;
        Ok(n == 1)
    }

    /// A session advisory lock on a connection of its own: PostgreSQL releases it when that
    /// connection ends, so when this process dies (or loses the database) another replica
    /// takes it on its next try.
    fn lease(&self) -> Result<bool, StoreError> {
        let mut held = self.lease.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = held.as_mut() {
            if c.simple_query("SELECT 1").is_ok() {
                return Ok(true);
            }
            tracing::warn!("database {}: lease connection lost", self.url);
            *held = None;
        }
        let mut c = self.target.connect().map_err(self.err())?;
        let got: bool = c
            .query_one("SELECT pg_try_advisory_lock($1)", &[&LEASE_LOCK])
            .map_err(self.err())?
            .get(0);
        if got {
            *held = Some(c);
        }
        Ok(got)
    }

    fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn()?
            .query_one(
                "SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_migrations",
                &[],
            )
            .map_err(self.err())?
            .get(0))
    }
}

/// `url` with `name` as its only search path (`options=-c search_path=NAME`).
fn scoped_url(url: &str, name: &str) -> Result<String, String> {
    if url.contains("options=") {
        return Err(
            "the URL sets `options`: a throwaway schema is chosen with options; remove it".into(),
        );
    }
    Ok(if url.contains("://") {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}options=-c%20search_path%3D{name}")
    } else {
        format!("{url} options='-c search_path={name}'")
    })
}

/// A schema of its own in a PostgreSQL database, for a run that must start from empty tables
/// and leave none behind (`failback-server bench`): created by [`ScratchSchema::create`],
/// named in the URL it hands out (`options=-c search_path=NAME`, so every table the store
/// creates lands there), removed with everything in it by [`ScratchSchema::remove`].
#[derive(Debug)]
pub struct ScratchSchema {
    /// `url` with the schema as its search path.
    pub url: String,
    pub name: String,
    target: Target,
    shown: String,
}

impl ScratchSchema {
    /// Creates schema `name` (letters, digits, `_`) in `url`'s database. Blocks.
    pub fn create(url: &str, name: &str) -> Result<ScratchSchema, StoreError> {
        let shown = redact(url);
        let bad = |what: String| StoreError::Config {
            url: shown.clone(),
            what,
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(bad(format!(
                "schema name {name:?}: letters, digits and _ only"
            )));
        }
        let scoped = scoped_url(url, name).map_err(bad)?;
        let target = Target::parse(url, &shown)?;
        let err = |source| StoreError::Postgres {
            url: shown.clone(),
            source,
        };
        let mut c = target.connect().map_err(err)?;
        c.batch_execute(&format!("CREATE SCHEMA \"{name}\""))
            .map_err(err)?;
        Ok(ScratchSchema {
            url: scoped,
            name: name.to_string(),
            target,
            shown,
        })
    }

    /// Drops the schema and everything in it. Blocks (at most 30 s for locks).
    pub fn remove(self) -> Result<(), StoreError> {
        let err = |source| StoreError::Postgres {
            url: self.shown.clone(),
            source,
        };
        let mut c = self.target.connect().map_err(err)?;
        c.batch_execute(&format!(
            "SET lock_timeout = '30s'; DROP SCHEMA \"{}\" CASCADE",
            self.name
        ))
        .map_err(err)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn scratch_schema_is_the_search_path_in_both_url_forms() {
        for url in [
            "postgres://fb@db/x",
            "postgres://fb@db/x?sslmode=disable",
            "host=db user=fb sslmode=disable",
        ] {
            let scoped = super::scoped_url(url, "failback_bench_1_ab").unwrap();
            let (rest, _) = super::super::pg_tls::take_tls_settings(&scoped).unwrap();
            let c: postgres::Config = rest.parse().unwrap();
            assert_eq!(
                c.get_options(),
                Some("-c search_path=failback_bench_1_ab"),
                "{url}"
            );
        }
        assert!(super::scoped_url("postgres://db/x?options=-c%20a%3Db", "s").is_err());
    }

    #[test]
    fn passwords_are_not_shown() {
        use super::redact;
        assert_eq!(
            redact("postgres://fb:s3cret@db.example:5432/failback"),
            "postgres://fb@db.example:5432/failback"
        );
        assert_eq!(redact("postgres://db/failback"), "postgres://db/failback");
        assert_eq!(redact("host=db user=fb password=s3cret"), "host=db user=fb");
        assert_eq!(
            redact("host=db password='s3 cret' user=fb"),
            "host=db user=fb"
        );
        assert_eq!(
            redact("postgres://fb@db/failback?password=s3cret&sslmode=verify-full"),
            "postgres://fb@db/failback?sslmode=verify-full"
        );
        assert_eq!(
            redact("postgres://fb:s3cret@db/failback?password=s3cret"),
            "postgres://fb@db/failback"
        );
    }
}
