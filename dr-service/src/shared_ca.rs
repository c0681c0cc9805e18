//! The CA of replicas that share a PostgreSQL database: stored in the database (`secrets`
//! row `ca`: the certificate in clear, the private key sealed, see [`crate::sealed`]), so
//! that every replica issues certificates that chain to the same `ca.pem`.
//!
//! The first replica to start stores it: the data directory's `ca.pem` + `ca-key.pem` when
//! present (moving a single SQLite service to PostgreSQL keeps the CA that appliances and
//! agents pinned), else a new CA. Replicas starting at the same moment race on one insert;
//! the loser uses the winner's CA. Every replica writes the CA certificate (never the key) to
//! its data directory's `ca.pem`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::ca::{Ca, CaError};
use crate::sealed::{SealError, SealKey};
use crate::store::{Store, StoreError};

const NAME: &str = "ca";

#[derive(Debug, thiserror::Error)]
pub enum SharedCaError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error("shared CA in the database: {0}")]
    Format(String),
    #[error("a PostgreSQL database is shared by replicas and holds the CA key sealed: give the sealing secret with --ca-secret-file PATH or FAILBACK_CA_SECRET (64 hex digits, the same on every replica)")]
    NoSecret,
    #[error("writing {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    cert_pem: String,
    key_sealed: String,
}

/// Loads the shared CA, storing this replica's (or a new) one if the database has none.
pub fn load_or_store(
    store: &dyn Store,
    seal: Option<&SealKey>,
    data_dir: &Path,
) -> Result<Ca, SharedCaError> {
    let seal = seal.ok_or(SharedCaError::NoSecret)?;
    if store.secret(NAME)?.is_none() {
        let ca = match Ca::load(data_dir)? {
            Some(ca) => ca,
            None => Ca::generate()?,
        };
        let stored = Stored {
            cert_pem: ca.ca_pem().to_string(),
            key_sealed: seal.seal("ca-key", ca.key_pem().as_bytes()),
        };
        let json =
            serde_json::to_string(&stored).map_err(|e| SharedCaError::Format(e.to_string()))?;
        if store.insert_secret(NAME, &json)? {
            tracing::info!("stored the CA in the database (key sealed)");
        }
    }
    let json = store
        .secret(NAME)?
        .ok_or_else(|| SharedCaError::Format("row vanished".into()))?;
    let stored: Stored =
        serde_json::from_str(&json).map_err(|e| SharedCaError::Format(e.to_string()))?;
    let key = seal.open("ca-key", &stored.key_sealed)?;
    let key = String::from_utf8(key).map_err(|e| SharedCaError::Format(e.to_string()))?;
    let ca = Ca::from_pems(stored.cert_pem, &key, Path::new("<database secrets.ca>"))?;
    let path = data_dir.join("ca.pem");
    std::fs::write(&path, ca.ca_pem()).map_err(|source| SharedCaError::Io { path, source })?;
    Ok(ca)
}
