//! Verifiers that check, on top of the usual chain/name/validity checks against the pinned CA,
//! that the peer's certificate carries the role (and instance) this connection expects.
//!
//! Every party pins the one CA of its DR service, which issues certificates to three kinds of
//! holder. Without the role check, any certificate from that CA would do for any purpose: an
//! agent's certificate could pose as the service. rustls' stock verifiers cannot check a URI
//! SAN, so these wrap them (the chain check stays webpki's) and add the role check.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, SignatureScheme,
};

use crate::identity::{Identity, IdentityError, Role};
use crate::pem::PemError;

/// Building a verifier or TLS configuration failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error("CA certificate refused: {0}")]
    Ca(rustls::Error),
    #[error("verifier: {0}")]
    Verifier(String),
    #[error("TLS configuration: {0}")]
    Config(rustls::Error),
}

/// ring's provider with TLS 1.3 AES-128-GCM preferred: the suite every TLS 1.3 stack must
/// implement, ~30 % cheaper per byte than AES-256-GCM.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != TLS13_AES_128_GCM_SHA256.suite());
    Arc::new(p)
}

/// A root store holding exactly the pinned CA certificates.
pub fn roots(ca: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, VerifyError> {
    let mut roots = RootCertStore::empty();
    for c in ca {
        roots.add(c.clone()).map_err(VerifyError::Ca)?;
    }
    Ok(Arc::new(roots))
}

fn refuse(e: IdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Verifies a server certificate against the pinned CA and the expected role (+ instance).
#[derive(Debug)]
pub struct RoleServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    role: Role,
    instance: Option<String>,
}

impl RoleServerVerifier {
    /// `instance`: for agents, the recovery instance the caller paired with (`None` accepts
    /// any one instance — only for tools that do not know it yet).
    pub fn new(
        roots: Arc<RootCertStore>,
        role: Role,
        instance: Option<String>,
    ) -> Result<Arc<Self>, VerifyError> {
        let inner = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| VerifyError::Verifier(e.to_string()))?;
        Ok(Arc::new(RoleServerVerifier {
            inner,
            role,
            instance,
        }))
    }
}

impl ServerCertVerifier for RoleServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        Identity::from_der(end_entity)
            .and_then(|id| id.expect(self.role, self.instance.as_deref()))
            .map_err(refuse)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Verifies client certificates against the pinned CA and the client role. Which instance a
/// client may read, and whether its certificate is still allowed, is checked by the agent
/// right after the handshake (it changes while connections live).
#[derive(Debug)]
pub struct RoleClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    role: Role,
}

impl RoleClientVerifier {
    pub fn new(roots: Arc<RootCertStore>, role: Role) -> Result<Arc<Self>, VerifyError> {
        let inner = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| VerifyError::Verifier(e.to_string()))?;
        Ok(Arc::new(RoleClientVerifier { inner, role }))
    }
}

impl ClientCertVerifier for RoleClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        Identity::from_der(end_entity)
            .and_then(|id| id.expect(self.role, None))
            .map_err(refuse)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The TLS configuration every caller of the DR service uses (admin CLI, orchestrator, agent,
/// appliance client): only the pinned CA, and only a certificate with the service role.
/// Pass it to `reqwest::ClientBuilder::use_preconfigured_tls`.
/// `source` names where the PEM came from (a file path, or e.g. `<seed>`), for errors.
pub fn service_client_config(
    ca_pem: &[u8],
    source: &std::path::Path,
) -> Result<ClientConfig, VerifyError> {
    let ca = crate::pem::certs("CA", source, ca_pem)?;
    let verifier = RoleServerVerifier::new(roots(&ca)?, Role::Service, None)?;
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(VerifyError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(config)
}
