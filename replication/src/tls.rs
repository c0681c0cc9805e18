//! Mutual TLS 1.3 between client and agent, both sides pinned to one private CA, each
//! checking the other's role (see `failback_trust`).
//!
//! The agent presents a certificate with the agent role, DNS SAN [`AGENT_SERVER_NAME`] and the
//! URI SAN of its recovery instance; the client verifies all three (the instance must be the
//! one it paired with) whatever address it dials. The client presents a certificate with the
//! client role and its instance's URI SAN; the agent serves only clients of its own instance.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use failback_trust::pem::PemError;
use failback_trust::verify::{provider, roots, RoleClientVerifier, RoleServerVerifier};
use failback_trust::{Identity, Role};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, ServerConfig};

#[cfg(feature = "dev-ca")]
pub use failback_trust::dev::DevCa;
pub use failback_trust::{AGENT_SERVER_NAME, INSTANCE_URI_PREFIX};

/// Loading or building TLS material failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A PEM file held nothing usable.
    #[error("{what} {path} contains no {expected}")]
    Empty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    /// rustls refused the material (bad key, CA not a CA, ...).
    #[error("invalid TLS material ({what}): {source}")]
    Rustls {
        what: &'static str,
        #[source]
        source: rustls::Error,
    },
    /// The client verifier could not be built from the CA.
    #[error("invalid CA for client verification: {0}")]
    Verifier(String),
    /// A PEM buffer or file held nothing usable.
    #[error(transparent)]
    Pem(#[from] PemError),
    /// Certificate generation failed.
    #[error("generating certificates: {0}")]
    Generate(String),
    /// Our own certificate does not say which instance we are (client certificates must).
    #[error("{0}")]
    Identity(String),
    /// Writing generated certificates failed.
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// PEM material: CA to pin, own certificate chain, own key.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The client's TLS configuration (ready to dial agents).
#[derive(Clone)]
pub struct ClientTls {
    pub(crate) config: Arc<ClientConfig>,
    /// The instance the agent's certificate must name.
    instance: String,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientTls {{ instance: {} }}", self.instance)
    }
}

/// The agent's TLS configuration, plus the instance it is scoped to (if any).
#[derive(Clone)]
pub struct ServerTls {
    pub(crate) config: Arc<ServerConfig>,
    /// When set, only client certificates naming this instance are served.
    pub instance: Option<String>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerTls {{ instance: {:?} }}", self.instance)
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    Ok(failback_trust::pem::read_file(what, path)?)
}

/// Parses all certificates of a PEM buffer.
pub fn certs_from_pem(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    Ok(failback_trust::pem::certs(what, path, pem)?)
}

fn key_from_pem(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    Ok(failback_trust::pem::private_key(path, pem)?)
}

fn verifier_error(e: failback_trust::VerifyError) -> TlsError {
    TlsError::Verifier(e.to_string())
}

impl ClientTls {
    /// The rustls configuration (for callers that build their own connections).
    pub fn config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }

    /// Builds from PEM buffers (CA, certificate chain, key).
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Self, TlsError> {
        let p = Path::new("<memory>");
        Self::build(
            &certs_from_pem("CA", p, ca)?,
            certs_from_pem("certificate", p, cert)?,
            key_from_pem(p, key)?,
            None,
        )
    }

    /// Loads the PEM files.
    pub fn from_files(files: &TlsFiles) -> Result<Self, TlsError> {
        Self::from_files_for(files, None)
    }

    /// Like [`from_files`](Self::from_files); with `Some(instance)` the agent must name that
    /// instance instead of our own certificate's (`failback-client sync --instance`).
    pub fn from_files_for(files: &TlsFiles, instance: Option<String>) -> Result<Self, TlsError> {
        Self::build(
            &certs_from_pem("CA", &files.ca, &read("CA", &files.ca)?)?,
            certs_from_pem(
                "certificate",
                &files.cert,
                &read("certificate", &files.cert)?,
            )?,
            key_from_pem(&files.key, &read("private key", &files.key)?)?,
            instance,
        )
    }

    /// The recovery instance an agent must name to be trusted.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    fn build(
        ca: &[CertificateDer<'static>],
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        instance: Option<String>,
    ) -> Result<Self, TlsError> {
        let instance = match instance {
            Some(i) => i,
            None => own_instance(&chain, "client")?,
        };
        let verifier = RoleServerVerifier::new(
            roots(ca).map_err(verifier_error)?,
            Role::Agent,
            Some(instance.clone()),
        )
        .map_err(verifier_error)?;
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|source| TlsError::Rustls {
                what: "protocol versions",
                source,
            })?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(chain, key)
            .map_err(|source| TlsError::Rustls {
                what: "client certificate/key",
                source,
            })?;
        // The data path protects records itself after the handshake (see crate::record).
        config.enable_secret_extraction = true;
        Ok(ClientTls {
            config: Arc::new(config),
            instance,
        })
    }
}

/// The one instance our own certificate (first of `chain`) names.
fn own_instance(chain: &[CertificateDer<'static>], what: &str) -> Result<String, TlsError> {
    let first = chain
        .first()
        .ok_or_else(|| TlsError::Identity(format!("no {what} certificate")))?;
    let id = Identity::from_der(first).map_err(|e| TlsError::Identity(format!("{what} {e}")))?;
    id.instance().map(str::to_owned).ok_or_else(|| {
        TlsError::Identity(format!(
            "the {what} certificate names {} recovery instances; it must name exactly one \
             (URI SAN {INSTANCE_URI_PREFIX}<ID>)",
            id.instances.len()
        ))
    })
}

impl ServerTls {
    /// The rustls configuration (for callers that accept their own connections).
    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }

    /// Builds from PEM buffers (CA that signs client certs, certificate chain, key).
    pub fn from_pem(
        ca: &[u8],
        cert: &[u8],
        key: &[u8],
        instance: Option<String>,
    ) -> Result<Self, TlsError> {
        let p = Path::new("<memory>");
        Self::build(
            &certs_from_pem("CA", p, ca)?,
            certs_from_pem("certificate", p, cert)?,
            key_from_pem(p, key)?,
            instance,
        )
    }

    /// Loads the PEM files.
    pub fn from_files(files: &TlsFiles, instance: Option<String>) -> Result<Self, TlsError> {
        Self::build(
            &certs_from_pem("CA", &files.ca, &read("CA", &files.ca)?)?,
            certs_from_pem(
                "certificate",
                &files.cert,
                &read("certificate", &files.cert)?,
            )?,
            key_from_pem(&files.key, &read("private key", &files.key)?)?,
            instance,
        )
    }

    fn build(
        ca: &[CertificateDer<'static>],
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        instance: Option<String>,
    ) -> Result<Self, TlsError> {
        let instance = match instance {
            Some(i) => i,
            None => own_instance(&chain, "agent")?,
        };
        let verifier = RoleClientVerifier::new(roots(ca).map_err(verifier_error)?, Role::Client)
            .map_err(verifier_error)?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|source| TlsError::Rustls {
                what: "protocol versions",
                source,
            })?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|source| TlsError::Rustls {
                what: "agent certificate/key",
                source,
            })?;
        // The data path protects records itself after the handshake (see crate::record);
        // no session tickets: connections are long-lived and never resumed.
        config.enable_secret_extraction = true;
        config.send_tls13_tickets = 0;
        Ok(ServerTls {
            config: Arc::new(config),
            instance: Some(instance),
        })
    }
}

/// The recovery-instance id named by a certificate's URI SAN `urn:failback:instance:<ID>`,
/// if it names exactly one.
pub fn instance_id_from_cert(der: &[u8]) -> Option<String> {
    Identity::from_der(der).ok()?.instance().map(str::to_owned)
}

/// A generated development CA with an agent and a client certificate, all PEM.
#[cfg(feature = "dev-ca")]
#[derive(Debug, Clone)]
pub struct DevCerts {
    pub ca: String,
    pub ca_key: String,
    pub agent: String,
    pub agent_key: String,
    pub client: String,
    pub client_key: String,
}

#[cfg(feature = "dev-ca")]
impl DevCerts {
    /// A fresh CA, an agent certificate ([`AGENT_SERVER_NAME`]) and a client certificate,
    /// both for `instance`.
    pub fn generate(instance: &str) -> Result<Self, TlsError> {
        let gen = |e: failback_trust::dev::DevCaError| TlsError::Generate(e.to_string());
        let ca = DevCa::generate("failback dev CA").map_err(gen)?;
        let (agent, agent_key) = ca.issue_agent(instance, &[]).map_err(gen)?;
        let (client, client_key) = ca.issue_client(instance).map_err(gen)?;
        Ok(DevCerts {
            ca: ca.cert_pem(),
            ca_key: ca.key_pem(),
            agent,
            agent_key,
            client,
            client_key,
        })
    }

    /// Writes ca.pem ca-key.pem agent.pem agent-key.pem client.pem client-key.pem into `dir`.
    pub fn write_to(&self, dir: &Path) -> Result<(), TlsError> {
        std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
            path: dir.to_owned(),
            source,
        })?;
        for (name, body) in [
            ("ca.pem", &self.ca),
            ("ca-key.pem", &self.ca_key),
            ("agent.pem", &self.agent),
            ("agent-key.pem", &self.agent_key),
            ("client.pem", &self.client),
            ("client-key.pem", &self.client_key),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, body).map_err(|source| TlsError::Write { path, source })?;
        }
        Ok(())
    }

    /// Client TLS config from these certificates.
    pub fn client_tls(&self) -> Result<ClientTls, TlsError> {
        ClientTls::from_pem(
            self.ca.as_bytes(),
            self.client.as_bytes(),
            self.client_key.as_bytes(),
        )
    }

    /// Agent TLS config from these certificates.
    pub fn server_tls(&self, instance: Option<String>) -> Result<ServerTls, TlsError> {
        ServerTls::from_pem(
            self.ca.as_bytes(),
            self.agent.as_bytes(),
            self.agent_key.as_bytes(),
            instance,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_id_is_read_from_uri_san() {
        let certs = DevCerts::generate("i-0abc").unwrap();
        let der = certs_from_pem("c", Path::new("x"), certs.client.as_bytes()).unwrap();
        assert_eq!(instance_id_from_cert(&der[0]).as_deref(), Some("i-0abc"));
        let der = certs_from_pem("c", Path::new("x"), certs.agent.as_bytes()).unwrap();
        assert_eq!(instance_id_from_cert(&der[0]).as_deref(), Some("i-0abc"));
        let der = certs_from_pem("c", Path::new("x"), certs.ca.as_bytes()).unwrap();
        assert_eq!(instance_id_from_cert(&der[0]), None);
    }
}
