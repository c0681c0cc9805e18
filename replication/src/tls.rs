//! Mutual TLS 1.3 between client and agent, both sides pinned to one private CA.
//!
//! The agent presents a certificate with DNS SAN [`AGENT_SERVER_NAME`]; the client always
//! verifies against that name whatever address it dials. The client presents a certificate with
//! URI SAN `urn:failback:instance:<ID>`; an agent scoped to an instance refuses other clients.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The name the client verifies in the agent's certificate.
pub const AGENT_SERVER_NAME: &str = "failback-agent";
/// Prefix of the client certificate's URI SAN.
pub const INSTANCE_URI_PREFIX: &str = "urn:failback:instance:";

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
    /// Certificate generation failed.
    #[error("generating certificates: {0}")]
    Generate(String),
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
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls")
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

/// ring's provider with TLS 1.3 AES-128-GCM preferred: it is the suite every TLS 1.3 stack
/// must implement, and ~30 % cheaper per byte than AES-256-GCM (10 AES rounds instead of
/// 14), which counts when every disk byte is encrypted once and decrypted once.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != TLS13_AES_128_GCM_SHA256.suite());
    Arc::new(p)
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Parses all certificates of a PEM buffer.
pub fn certs_from_pem(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            what,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_owned(),
            expected: "PEM certificate",
        });
    }
    Ok(certs)
}

fn key_from_pem(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|source| TlsError::Read {
            what: "private key",
            path: path.to_owned(),
            source,
        })?
        .ok_or_else(|| TlsError::Empty {
            what: "private key",
            path: path.to_owned(),
            expected: "PEM private key",
        })
}

fn roots(ca: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in ca {
        roots.add(c.clone()).map_err(|source| TlsError::Rustls {
            what: "CA certificate",
            source,
        })?;
    }
    Ok(roots)
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
        )
    }

    /// Loads the PEM files.
    pub fn from_files(files: &TlsFiles) -> Result<Self, TlsError> {
        Self::build(
            &certs_from_pem("CA", &files.ca, &read("CA", &files.ca)?)?,
            certs_from_pem(
                "certificate",
                &files.cert,
                &read("certificate", &files.cert)?,
            )?,
            key_from_pem(&files.key, &read("private key", &files.key)?)?,
        )
    }

    fn build(
        ca: &[CertificateDer<'static>],
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsError> {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|source| TlsError::Rustls {
                what: "protocol versions",
                source,
            })?
            .with_root_certificates(roots(ca)?)
            .with_client_auth_cert(chain, key)
            .map_err(|source| TlsError::Rustls {
                what: "client certificate/key",
                source,
            })?;
        // The data path protects records itself after the handshake (see crate::record).
        config.enable_secret_extraction = true;
        Ok(ClientTls {
            config: Arc::new(config),
        })
    }
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
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
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
            instance,
        })
    }
}

/// The recovery-instance id named by a client certificate's URI SAN
/// `urn:failback:instance:<ID>`, if any.
pub fn instance_id_from_cert(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(uri) => uri
            .strip_prefix(INSTANCE_URI_PREFIX)
            .filter(|id| !id.is_empty())
            .map(str::to_owned),
        _ => None,
    })
}

/// A generated development CA with an agent and a client certificate, all PEM.
#[derive(Debug, Clone)]
pub struct DevCerts {
    pub ca: String,
    pub ca_key: String,
    pub agent: String,
    pub agent_key: String,
    pub client: String,
    pub client_key: String,
}

impl DevCerts {
    /// A fresh CA, an agent certificate (`failback-agent`, `localhost`, 127.0.0.1) and a client
    /// certificate for `instance`.
    pub fn generate(instance: &str) -> Result<Self, TlsError> {
        let ca = DevCa::generate("failback dev CA")?;
        let (agent, agent_key) = ca.issue_agent(&[])?;
        let (client, client_key) = ca.issue_client(instance)?;
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

/// A development CA able to issue agent and client certificates (tests, `dev-certs`).
pub struct DevCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DevCa")
    }
}

fn gen_err(e: rcgen::Error) -> TlsError {
    TlsError::Generate(e.to_string())
}

impl DevCa {
    /// A new self-signed CA.
    pub fn generate(common_name: &str) -> Result<Self, TlsError> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().map_err(gen_err)?;
        let cert = params.self_signed(&key).map_err(gen_err)?;
        Ok(DevCa { cert, key })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// The CA key, PEM.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// An agent (server) certificate for [`AGENT_SERVER_NAME`], `localhost`, 127.0.0.1 and
    /// `extra_sans` (DNS names or IP addresses). Returns (cert PEM, key PEM).
    pub fn issue_agent(&self, extra_sans: &[String]) -> Result<(String, String), TlsError> {
        let mut names = vec![
            AGENT_SERVER_NAME.to_owned(),
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ];
        names.extend(extra_sans.iter().cloned());
        let mut params = rcgen::CertificateParams::new(names).map_err(gen_err)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, AGENT_SERVER_NAME);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate naming `instance` in its URI SAN. Returns (cert PEM, key PEM).
    pub fn issue_client(&self, instance: &str) -> Result<(String, String), TlsError> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
        let uri = format!("{INSTANCE_URI_PREFIX}{instance}");
        params.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::Ia5String::try_from(uri).map_err(gen_err)?,
        )];
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("failback client {instance}"),
        );
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: rcgen::CertificateParams) -> Result<(String, String), TlsError> {
        let key = rcgen::KeyPair::generate().map_err(gen_err)?;
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(gen_err)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_id_is_read_from_uri_san() {
        let ca = DevCa::generate("t").unwrap();
        let (client, _) = ca.issue_client("i-0abc").unwrap();
        let der = certs_from_pem("c", Path::new("x"), client.as_bytes()).unwrap();
        assert_eq!(instance_id_from_cert(&der[0]).as_deref(), Some("i-0abc"));
        let (agent, _) = ca.issue_agent(&[]).unwrap();
        let der = certs_from_pem("c", Path::new("x"), agent.as_bytes()).unwrap();
        assert_eq!(instance_id_from_cert(&der[0]), None);
    }
}
