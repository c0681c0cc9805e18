//! How the vCenter certificate is checked.

use crate::error::{Error, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Certificate policy. The default verifies against the public web PKI roots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// Verify the chain and host name against the built-in web PKI roots.
    #[default]
    Verify,
    /// Verify the chain and host name against these CA certificates (PEM) only.
    CaFile(PathBuf),
    /// Accept exactly the server certificate whose SHA-256 (of its DER) is this, whatever
    /// its chain or names (what govc's `--thumbprint` does, with SHA-256).
    Thumbprint(String),
    /// Accept any certificate. Only with an explicit switch (`--insecure`,
    /// `DISABLE_SSL_VERIFICATION=true`).
    Insecure,
}

/// Normalises a SHA-256 thumbprint: hex with or without `:`, any case -> 64 lowercase hex.
pub fn normalize_thumbprint(s: &str) -> Result<String> {
    let hex: String = s
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Error::Config(format!(
            "thumbprint '{s}' is not a SHA-256 (64 hex digits, colons allowed)"
        )));
    }
    Ok(hex)
}

/// SHA-256 thumbprint (lowercase hex) of a DER certificate.
pub fn thumbprint_of(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

fn provider() -> Arc<CryptoProvider> {
    // Explicit ring provider: never depend on the process-wide default (another crate in
    // the build could enable aws-lc-rs, which would make the implicit choice ambiguous).
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Applies the mode to a reqwest builder.
pub(crate) fn configure(
    builder: reqwest::ClientBuilder,
    mode: &TlsMode,
) -> Result<reqwest::ClientBuilder> {
    Ok(match mode {
        TlsMode::Verify => builder,
        TlsMode::Insecure => builder.danger_accept_invalid_certs(true),
        TlsMode::CaFile(path) => {
            let roots = ca_roots(path)?;
            let cfg = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| Error::Config(format!("TLS: {e}")))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            builder.use_preconfigured_tls(cfg)
        }
        TlsMode::Thumbprint(tp) => {
            let expected = normalize_thumbprint(tp)?;
            let verifier = Arc::new(PinnedCert {
                expected,
                provider: provider(),
            });
            let cfg = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| Error::Config(format!("TLS: {e}")))?
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth();
            builder.use_preconfigured_tls(cfg)
        }
    })
}

/// The CA certificates in the PEM file `path` (other sections, e.g. keys, are skipped); at
/// least one.
fn ca_roots(path: &Path) -> Result<rustls::RootCertStore> {
    let pem = std::fs::read(path).map_err(|source| Error::CaFile {
        path: path.to_owned(),
        source,
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| Error::CaFile {
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        roots.add(cert).map_err(|e| {
            Error::Config(format!("CA file {}: bad certificate: {e}", path.display()))
        })?;
    }
    if roots.is_empty() {
        return Err(Error::Config(format!(
            "CA file {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(roots)
}

/// Accepts only the certificate with the pinned SHA-256; handshake signatures are still
/// verified, so the peer must hold the pinned certificate's private key.
#[derive(Debug)]
struct PinnedCert {
    expected: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = thumbprint_of(end_entity.as_ref());
        if got == self.expected {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server certificate SHA-256 {got} does not match pinned thumbprint {}",
                self.expected
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The TLS reason behind a failed request, from its source chain (reqwest -> hyper -> io ->
/// rustls), in words; `None` when the failure was not about TLS. reqwest's own message is
/// only "error sending request for url". Written here rather than taken from the `trust`
/// crate so that this library stays standalone; the vCenter cases (1024-bit keys, pinned
/// thumbprints) are its own.
pub fn tls_cause(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(rustls_cause(r));
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(c) = tls_cause(inner) {
                return Some(c);
            }
        }
        cur = e.source();
    }
    None
}

fn rustls_cause(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => "the vCenter certificate is not signed by a trusted CA (with \
                --vcenter-ca / VCENTER_CA: not by the CA in that file; a self-signed \
                certificate must itself be in the file)"
                .into(),
            C::BadSignature => "the vCenter certificate's signature cannot be verified: its \
                key is too weak for this TLS library (e.g. a 1024-bit RSA key, as vcsim's \
                built-in certificate has; RSA needs at least 2048 bits) or it was not \
                signed by the CA that names it"
                .into(),
            C::Expired | C::ExpiredContext { .. } => "the vCenter certificate has expired".into(),
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "the vCenter certificate is not valid yet (check this machine's clock)".into()
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => format!(
                "the vCenter certificate is not issued for the host name used ({c:?}); use \
                 the name in its certificate, or pin it with --vcenter-thumbprint"
            ),
            C::Revoked => "the vCenter certificate is revoked".into(),
            C::Other(o) if format!("{o:?}").contains("CaUsedAsEndEntity") => {
                "the vCenter certificate is a CA certificate used as the server's own (vcsim's \
                 built-in one is): the TLS library refuses that even when it is in \
                 --vcenter-ca; give vCenter a server certificate signed by that CA, or pin it \
                 with --vcenter-thumbprint"
                    .into()
            }
            other => format!("the vCenter certificate was refused: {other:?}"),
        },
        rustls::Error::PeerIncompatible(p) => format!(
            "vCenter's TLS is not compatible with this client ({p:?}): e.g. a 1024-bit RSA \
             key (vcsim's built-in certificate) or an old protocol version"
        ),
        rustls::Error::General(m) if m.contains("pinned thumbprint") => m.clone(),
        rustls::Error::General(m) => format!("TLS: {m}"),
        other => format!("TLS: {other}"),
    }
}

/// Text for a transport error: the TLS cause first when there is one, then reqwest's chain.
pub(crate) fn describe(err: &reqwest::Error) -> String {
    let mut parts = vec![err.to_string()];
    let mut cur = std::error::Error::source(err);
    while let Some(e) = cur {
        let s = e.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = e.source();
    }
    match tls_cause(err) {
        Some(c) => format!("{c} ({})", parts.join(": ")),
        None => parts.join(": "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbprint_forms() {
        let h = "AB:".repeat(31) + "AB";
        assert_eq!(normalize_thumbprint(&h).unwrap(), "ab".repeat(32));
        assert!(normalize_thumbprint("abcd").is_err());
        assert!(normalize_thumbprint(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn ca_file_forms() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        // Certificates among other sections (a key) and text: the certificates count.
        let both = dir.path().join("both.pem");
        let text = format!("comment\n{}{}", key.serialize_pem(), ca.pem());
        std::fs::write(&both, text.repeat(2)).unwrap();
        assert_eq!(ca_roots(&both).unwrap().len(), 2);
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let none = write("key-only.pem", &key.serialize_pem());
        let e = ca_roots(&none).unwrap_err().to_string();
        assert!(
            e.contains("key-only.pem") && e.contains("no PEM certificate"),
            "{e}"
        );
        let broken = write(
            "broken.pem",
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        );
        let e = ca_roots(&broken).unwrap_err().to_string();
        assert!(e.contains("broken.pem"), "{e}");
        let e = ca_roots(&dir.path().join("missing.pem"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.pem"), "{e}");
    }
}
