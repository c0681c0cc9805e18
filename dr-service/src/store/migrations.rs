//! Versioned schema migrations, one list for both backends.
//!
//! A database records the migrations it has applied in `schema_migrations (version, name,
//! applied_at)`; opening a store applies the missing ones in order, each in its own
//! transaction together with its row in `schema_migrations`. A database without that table
//! is version 0: either empty, or written by a release before migrations existed (its tables
//! are exactly migration 1's, created `IF NOT EXISTS`, so migration 1 adopts them in place).
//! A database whose version is newer than [`MIGRATIONS`] is refused (an older binary must not
//! write a schema it does not know).
//!
//! To add a table (or column, or index): append a [`Migration`] with the next version and the
//! SQL for each backend; never edit a migration that was released.

/// One schema change, in each backend's dialect.
#[derive(Debug)]
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sqlite: &'static str,
    pub postgres: &'static str,
}

/// Every migration, in order; versions are 1, 2, 3, ... with no gap.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "baseline: instances, tokens, clients, agents, events, credentials",
        sqlite: SQLITE_BASELINE,
        postgres: POSTGRES_BASELINE,
    },
    Migration {
        version: 2,
        name: "one active credential per name (enforced by the database for replicas)",
        sqlite: "CREATE UNIQUE INDEX IF NOT EXISTS credentials_active_name \
                 ON credentials(name) WHERE revoked_at IS NULL;",
        postgres: "CREATE UNIQUE INDEX IF NOT EXISTS credentials_active_name \
                   ON credentials(name) WHERE revoked_at IS NULL;",
    },
    Migration {
        version: 3,
        name: "shared secrets (the sealed CA of replicas on PostgreSQL)",
        sqlite: "CREATE TABLE IF NOT EXISTS secrets (name TEXT PRIMARY KEY, value TEXT NOT NULL, \
                 created_at INTEGER NOT NULL);",
        postgres:
            "CREATE TABLE IF NOT EXISTS secrets (name TEXT PRIMARY KEY, value TEXT NOT NULL, \
                   created_at BIGINT NOT NULL);",
    },
    Migration {
        version: 4,
        name: "client checkpoints (resume points of interrupted rounds, JSON per instance)",
        sqlite: "CREATE TABLE IF NOT EXISTS client_checkpoints (instance_id TEXT PRIMARY KEY, \
                 body TEXT NOT NULL, updated_at INTEGER NOT NULL);",
        postgres: "CREATE TABLE IF NOT EXISTS client_checkpoints (instance_id TEXT PRIMARY KEY, \
                   body TEXT NOT NULL, updated_at BIGINT NOT NULL);",
    },
];

/// The latest schema version this program knows.
pub fn latest() -> i64 {
    MIGRATIONS.last().map(|m| m.version).unwrap_or(0)
}

/// The schema of the release before migrations (verbatim, `IF NOT EXISTS`), so that its
/// databases are adopted in place. Its `events.actor` column came in a later edit of that
/// release: the SQLite backend adds it when missing (see `sqlite.rs`).
const SQLITE_BASELINE: &str = "
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

/// The same tables for PostgreSQL (BIGINT times, BIGSERIAL event sequence, BOOLEAN flags).
const POSTGRES_BASELINE: &str = "
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY,
    doc TEXT NOT NULL,
    active BOOLEAN NOT NULL,
    agent_seen BIGINT NOT NULL,
    client_seen BIGINT NOT NULL,
    agent_flag BOOLEAN NOT NULL,
    client_flag BOOLEAN NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_active ON instances(active);
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    instance_id TEXT,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT
);
CREATE TABLE IF NOT EXISTS clients (
    client_id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL UNIQUE,
    instance_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    stopped BOOLEAN NOT NULL
);
CREATE INDEX IF NOT EXISTS clients_instance ON clients(instance_id);
CREATE TABLE IF NOT EXISTS agents (
    secret_hash TEXT PRIMARY KEY,
    instance_id TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq BIGSERIAL PRIMARY KEY,
    at BIGINT NOT NULL,
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
    created_at BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    revoked_at BIGINT,
    revoked_by TEXT
);
";

/// `schema_migrations` itself (the same SQL works on both backends).
pub const TRACKING_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version BIGINT PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at BIGINT NOT NULL
)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_consecutive_from_one() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i64::try_from(i).unwrap() + 1, "{}", m.name);
            assert!(!m.sqlite.trim().is_empty() && !m.postgres.trim().is_empty());
        }
        assert_eq!(latest(), i64::try_from(MIGRATIONS.len()).unwrap());
    }
}
