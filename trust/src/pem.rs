//! PEM parsing with `rustls-pki-types` (replaces the unmaintained `rustls-pemfile`,
//! RUSTSEC-2025-0134). Errors name the file (or `<memory>`) and what was expected.

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A PEM buffer or file that holds nothing usable.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} is not valid PEM: {message}")]
    Invalid {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("{what} {path} contains no {expected}")]
    Empty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("{what} {path}: certificate {index} is not a valid X.509 certificate: {message}")]
    BadCertificate {
        what: &'static str,
        path: PathBuf,
        index: usize,
        message: String,
    },
}

/// Reads a file, naming it on failure.
pub fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, PemError> {
    std::fs::read(path).map_err(|source| PemError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// All certificates of a PEM buffer; at least one, each a parseable X.509 certificate (so a
/// garbage CA file is refused when loaded, not at the first handshake).
pub fn certs(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| PemError::Invalid {
            what,
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PemError::Empty {
            what,
            path: path.to_owned(),
            expected: "PEM certificate",
        });
    }
    for (index, c) in certs.iter().enumerate() {
        if let Err(e) = x509_parser::parse_x509_certificate(c) {
            return Err(PemError::BadCertificate {
                what,
                path: path.to_owned(),
                index,
                message: e.to_string(),
            });
        }
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) of a PEM buffer.
pub fn private_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => PemError::Empty {
            what: "private key",
            path: path.to_owned(),
            expected: "PEM private key",
        },
        other => PemError::Invalid {
            what: "private key",
            path: path.to_owned(),
            message: other.to_string(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_refused_naming_the_file() {
        let p = Path::new("/x/ca.pem");
        let e = certs("CA", p, b"garbage").unwrap_err().to_string();
        assert!(
            e.contains("/x/ca.pem") && e.contains("no PEM certificate"),
            "{e}"
        );
        let bad = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let e = certs("CA", p, bad).unwrap_err().to_string();
        assert!(e.contains("not a valid X.509"), "{e}");
        let e = private_key(Path::new("/k.pem"), b"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/k.pem") && e.contains("no PEM private key"),
            "{e}"
        );
    }
}
