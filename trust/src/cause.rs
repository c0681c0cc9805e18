//! Names the cause of a failed TLS connection from an error chain (reqwest → hyper → io →
//! rustls), so users read "not signed by the pinned CA" instead of "error sending request",
//! and callers know not to retry what retrying cannot fix.

use std::error::Error as StdError;
use std::fmt;

use rustls::{AlertDescription, CertificateError};

use crate::identity::IdentityError;

/// Why the TLS handshake failed, as far as it can be told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsCause {
    /// The peer's certificate does not chain to the pinned CA.
    UnknownIssuer,
    /// The peer's certificate has expired.
    Expired,
    /// The peer's certificate is not valid yet (or this machine's clock is behind).
    NotYetValid,
    /// The certificate does not name the host that was dialled.
    NameMismatch { expected: String, presented: String },
    /// The certificate does not fit the role/instance expected (or its key is too small).
    Identity(IdentityError),
    /// The certificate was revoked.
    Revoked,
    /// The peer refused our certificate (it sent this alert).
    PeerRefused(String),
    /// Another certificate problem.
    Certificate(String),
}

impl TlsCause {
    /// Certificate and identity problems do not go away by retrying; every variant here is one.
    pub fn is_transient(&self) -> bool {
        false
    }
}

impl fmt::Display for TlsCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsCause::UnknownIssuer => {
                f.write_str("the server's certificate is not signed by the pinned CA")
            }
            TlsCause::Expired => f.write_str("the server's certificate has expired"),
            TlsCause::NotYetValid => f.write_str(
                "the server's certificate is not valid yet (check this machine's clock)",
            ),
            TlsCause::NameMismatch {
                expected,
                presented,
            } => write!(
                f,
                "name mismatch: the server's certificate is for {presented}, not {expected}"
            ),
            TlsCause::Identity(e) => write!(f, "the server's {e}"),
            TlsCause::Revoked => f.write_str("the server's certificate is revoked"),
            TlsCause::PeerRefused(alert) => {
                write!(f, "the server refused our certificate ({alert})")
            }
            TlsCause::Certificate(m) => write!(f, "certificate refused: {m}"),
        }
    }
}

fn from_certificate_error(e: &CertificateError) -> TlsCause {
    match e {
        // A bad signature on a chain that names the pinned CA as issuer: another CA with the
        // same name (every dev CA is "failback dev CA") — not signed by the pinned CA either.
        CertificateError::UnknownIssuer | CertificateError::BadSignature => TlsCause::UnknownIssuer,
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => TlsCause::Expired,
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            TlsCause::NotYetValid
        }
        CertificateError::NotValidForName => TlsCause::NameMismatch {
            expected: "the dialled name".into(),
            presented: "other names".into(),
        },
        CertificateError::NotValidForNameContext {
            expected,
            presented,
        } => TlsCause::NameMismatch {
            expected: expected.to_str().into_owned(),
            presented: presented.join(", "),
        },
        CertificateError::Revoked => TlsCause::Revoked,
        CertificateError::Other(other) => match other.0.downcast_ref::<IdentityError>() {
            Some(id) => TlsCause::Identity(id.clone()),
            None => TlsCause::Certificate(other.to_string()),
        },
        other => TlsCause::Certificate(format!("{other:?}")),
    }
}

fn from_rustls(e: &rustls::Error) -> Option<TlsCause> {
    match e {
        rustls::Error::InvalidCertificate(c) => Some(from_certificate_error(c)),
        rustls::Error::AlertReceived(
            a @ (AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateRequired
            | AlertDescription::AccessDenied),
        ) => Some(TlsCause::PeerRefused(format!("{a:?}"))),
        _ => None,
    }
}

/// Walks `err`'s source chain (looking inside `io::Error`s too) for a rustls certificate error.
pub fn tls_cause(err: &(dyn StdError + 'static)) -> Option<TlsCause> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return from_rustls(r);
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

/// `err` followed by its sources, `: `-joined, with the TLS cause first when there is one
/// (reqwest's own message is only "error sending request for url (...)").
pub fn describe(err: &(dyn StdError + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = e.source();
    }
    match tls_cause(err) {
        Some(c) => format!("TLS: {c} ({})", parts.join(": ")),
        None => parts.join(": "),
    }
}
