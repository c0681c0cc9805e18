//! Persistence behind one trait ([`Store`]) with two backends: the embedded default, one
//! SQLite file ([`SqliteStore`], `failback.db` in the data directory, WAL mode), and
//! PostgreSQL ([`PgStore`], `--database postgres://...`) for several replicas.
//!
//! Recovery instances are stored as JSON documents (the API type itself) plus a few indexed
//! columns the monitor queries; every change of a request is written in one transaction
//! ([`Batch`]), so a refused request stores nothing and a crash never leaves half a pairing.
//!
//! Concurrency is optimistic, with no lock held across a request: every instance write names
//! the instance as it was read ([`InstanceWrite::expected`]) and a one-time token is marked
//! used only if it still is unused; when another request (or replica) got there first the
//! whole batch is refused with [`StoreError::Conflict`] and the service retries the request
//! from a fresh read.
//!
//! The schema is versioned ([`migrations`]): each backend applies, in order and once, the
//! migrations a database has not seen yet, recorded in `schema_migrations`.

use std::path::PathBuf;

use failback_api::{Credential, Event, RecoveryInstance, Role, TokenKind};

pub mod migrations;
mod pg_tls;
mod postgres;
mod sqlite;

pub use self::postgres::{PgStore, ScratchSchema};
pub use self::sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// The driver's message and its causes (the TLS or server error).
    #[error("database {url}: {}", pg_cause(source))]
    Postgres {
        /// The URL without its password.
        url: String,
        #[source]
        source: ::postgres::Error,
    },
    /// A `--database` setting refused before connecting (TLS settings, CA file).
    #[error("database {url}: {what}")]
    Config { url: String, what: String },
    #[error("database {url}: connection pool: {message}")]
    Pool { url: String, message: String },
    #[error("database {db}: corrupt record {what}: {source}")]
    Corrupt {
        db: String,
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("database {db}: {what}")]
    BadValue { db: String, what: String },
    /// Another request changed what this one read (or used the same one-time token) first;
    /// the service retries from a fresh read.
    #[error("database {db}: concurrent change of {what}")]
    Conflict { db: String, what: String },
    #[error("database {db}: schema version {found} is newer than this program knows ({known}); upgrade failback-server")]
    TooNew { db: String, found: i64, known: i64 },
}

/// Connections a PostgreSQL store keeps at most (per replica).
pub const PG_POOL_SIZE: u32 = 16;

/// Opens the store `database` names: `postgres://...` / `postgresql://...` (or key=value
/// settings starting with `host=`) is PostgreSQL, anything else a SQLite file path; `None` is
/// SQLite `failback.db` in `data_dir`. Blocks (connects, migrates).
pub fn open(
    database: Option<&str>,
    data_dir: &std::path::Path,
) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    Ok(match database {
        Some(url) if is_postgres(url) => std::sync::Arc::new(PgStore::open(url, PG_POOL_SIZE)?),
        Some(path) => std::sync::Arc::new(SqliteStore::open(std::path::Path::new(path))?),
        None => std::sync::Arc::new(SqliteStore::open(&data_dir.join("failback.db"))?),
    })
}

/// Whether `--database` names PostgreSQL.
pub fn is_postgres(database: &str) -> bool {
    database.starts_with("postgres://")
        || database.starts_with("postgresql://")
        || database.starts_with("host=")
}

/// A PostgreSQL error with its causes: the driver's own message says only "error performing
/// TLS handshake" or "db error"; the cause says which (unknown issuer, host name, refused by
/// the server's pg_hba.conf).
fn pg_cause(e: &::postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.severity(), db.message());
    }
    let mut msg = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        msg.push_str(": ");
        msg.push_str(&c.to_string());
        if let Some(hint) = tls_hint(c) {
            msg.push_str(hint);
        }
        cause = c.source();
    }
    msg
}

/// What to do about a refused server certificate.
fn tls_hint(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    use rustls::{CertificateError, Error};
    let tls = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        .and_then(|inner| inner.downcast_ref::<Error>())?;
    match tls {
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => Some(
            " (the server's certificate is not signed by a CA in sslrootcert: give the CA \
             that signed it)",
        ),
        Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => Some(
            " (connect with a host name the certificate names, or use sslmode=verify-ca to \
             check the CA only)",
        ),
        _ => None,
    }
}

impl StoreError {
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. })
    }
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

/// One instance write: the new document and the document as it was read (`None`: the
/// instance must not exist yet).
#[derive(Debug, Clone)]
pub struct InstanceWrite {
    pub expected: Option<RecoveryInstance>,
    pub new: RecoveryInstance,
}

/// Everything one request changes, written atomically.
#[derive(Debug, Default)]
pub struct Batch {
    /// Recorded on every event of the batch (who made the request).
    pub actor: Option<String>,
    pub instances: Vec<InstanceWrite>,
    /// New tokens (`used_at: None`) are inserted; a token with `used_at` set is marked used,
    /// which conflicts when it was already used.
    pub tokens: Vec<TokenRecord>,
    /// Tokens revoked (hash, time): they expire at that time; conflicts when the token is
    /// already used or expired.
    pub revoked_tokens: Vec<(String, u64)>,
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

    /// Writes `new`, which was read as `old` (`None`: created by this request).
    pub fn put(&mut self, old: Option<&RecoveryInstance>, new: RecoveryInstance) {
        self.instances.push(InstanceWrite {
            expected: old.cloned(),
            new,
        });
    }
}

/// The storage interface the service logic uses. Calls block (run them off the async
/// runtime: the HTTP layer uses `spawn_blocking`).
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
    /// The schema version of the database (the last migration applied).
    fn schema_version(&self) -> Result<i64, StoreError>;
    /// The client checkpoints stored for `instance` (JSON of `ClientCheckpoints`).
    fn checkpoint(&self, instance: &str) -> Result<Option<String>, StoreError>;
    /// Stores (`Some`) or clears (`None`) the client checkpoints of `instance`.
    fn put_checkpoint(&self, instance: &str, body: Option<&str>, at: u64)
        -> Result<(), StoreError>;
    /// A shared value (e.g. the sealed CA), if stored.
    fn secret(&self, name: &str) -> Result<Option<String>, StoreError>;
    /// Stores a shared value unless one is stored already (the first replica wins); returns
    /// whether this call stored it.
    fn insert_secret(&self, name: &str, value: &str) -> Result<bool, StoreError>;
    /// Takes or keeps the lease for periodic work (monitor, timeouts): true while this
    /// process holds it. Exactly one process holds it at a time; it moves when the holder
    /// dies. SQLite (one process) always holds it.
    fn lease(&self) -> Result<bool, StoreError>;
}

pub(crate) fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(crate) fn kind_str(k: TokenKind) -> &'static str {
    match k {
        TokenKind::Pairing => "pairing",
        TokenKind::Agent => "agent",
    }
}

pub(crate) fn kind_of(s: &str) -> TokenKind {
    if s == "agent" {
        TokenKind::Agent
    } else {
        TokenKind::Pairing
    }
}

/// Whether a failback in this state counts as running (the `active` column).
pub(crate) fn active(inst: &RecoveryInstance) -> bool {
    use failback_api::FailbackState as F;
    matches!(
        inst.failback.state,
        F::FailbackInProgress | F::FailbackReadyForLaunch | F::FailbackNotReadyForLaunch
    )
}

pub(crate) fn flags(inst: &RecoveryInstance) -> (bool, bool) {
    use failback_api::ReplicationError as E;
    let e = &inst.failback.errors;
    (
        e.contains(&E::AgentNotSeen),
        e.contains(&E::FailbackClientNotSeen),
    )
}

pub(crate) const CREDENTIAL_COLUMNS: &str =
    "id, name, role, secret_hash, created_at, created_by, revoked_at, revoked_by";
