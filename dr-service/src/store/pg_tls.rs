//! How the PostgreSQL backend reaches its server: TLS (rustls, the project's ring provider)
//! or plaintext, decided from libpq's own settings in `--database`, so that a libpq user's
//! URL means what it says:
//!
//! | written in the URL | failback-server does |
//! |---|---|
//! | `sslmode=verify-full&sslrootcert=FILE` (or only `sslrootcert=FILE`) | TLS; the server's certificate must chain to a CA in FILE (PEM) and name the host |
//! | `sslmode=verify-ca&sslrootcert=FILE` | TLS; certificate chained to FILE, host name not checked |
//! | `sslmode=require` | TLS, certificate not verified (libpq's meaning; a warning is logged); with `sslrootcert` it is `verify-ca` (as in libpq) |
//! | `sslmode=disable` | plaintext, to any host (written explicitly) |
//! | no `sslmode`, no `sslrootcert` | plaintext if every host is on this machine (loopback address, `localhost` or a Unix socket), else refused before connecting |
//! | `sslmode=prefer` / `allow` | refused: they fall back to plaintext silently |
//!
//! rust-postgres' own parser knows only `disable|prefer|require` and no `sslrootcert`: both
//! are taken out of the URL here, and TLS is then always required of the driver.

use std::path::PathBuf;
use std::sync::Arc;

use postgres::config::{Host, SslMode};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::StoreError;

/// libpq's `sslmode` values that failback-server honours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    Require,
    VerifyCa,
    VerifyFull,
}

/// Where and how to connect: the driver's settings and the TLS connector (if any).
#[derive(Clone)]
pub struct Target {
    pub config: postgres::Config,
    pub tls: Option<MakeRustlsConnect>,
    pub mode: TlsMode,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Target({:?})", self.mode)
    }
}

impl Target {
    /// Parses `url` (URL or key=value form) and loads the CA file; checks that plaintext is
    /// asked for explicitly unless the server is on this machine. `shown` is the redacted
    /// URL for messages.
    pub fn parse(url: &str, shown: &str) -> Result<Target, StoreError> {
        let bad = |what: String| StoreError::Config {
            url: shown.to_string(),
            what,
        };
        let (rest, settings) = take_tls_settings(url).map_err(bad)?;
        let mut config: postgres::Config = rest.parse().map_err(|source| StoreError::Postgres {
            url: shown.to_string(),
            source,
        })?;
        let mode = decide(&settings, &config).map_err(bad)?;
        let tls = match mode {
            TlsMode::Disable => None,
            _ => Some(connector(mode, settings.rootcert.as_ref(), shown)?),
        };
        if mode == TlsMode::Require && settings.rootcert.is_none() {
            tracing::warn!(
                "database {shown}: sslmode=require: TLS without checking the server's certificate \
                 (anyone on the path can pose as the server); use sslmode=verify-full with \
                 sslrootcert=FILE"
            );
        }
        config.ssl_mode(if tls.is_some() {
            SslMode::Require
        } else {
            SslMode::Disable
        });
        Ok(Target { config, tls, mode })
    }

    /// One connection, over TLS when the mode asks for it.
    pub fn connect(&self) -> Result<postgres::Client, postgres::Error> {
        match &self.tls {
            Some(tls) => self.config.connect(tls.clone()),
            None => self.config.connect(postgres::NoTls),
        }
    }
}

/// `sslmode` and `sslrootcert` as written (taken out of the URL).
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct TlsSettings {
    mode: Option<String>,
    rootcert: Option<PathBuf>,
}

/// Removes `sslmode` and `sslrootcert` from a URL's query or a key=value string.
pub(super) fn take_tls_settings(url: &str) -> Result<(String, TlsSettings), String> {
    let mut s = TlsSettings::default();
    let mut take = |k: &str, v: String| match k {
        "sslmode" => {
            s.mode = Some(v);
            true
        }
        "sslrootcert" => {
            s.rootcert = Some(PathBuf::from(v));
            true
        }
        _ => false,
    };
    let rest = if url.contains("://") {
        match url.split_once('?') {
            None => url.to_string(),
            Some((base, query)) => {
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|pair| {
                        let decoded = form_urlencoded::parse(pair.as_bytes()).next();
                        !decoded.is_some_and(|(k, v)| take(&k, v.into_owned()))
                    })
                    .collect();
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for (raw, k, v) in key_values(url)? {
            if !take(&k, v) {
                kept.push(raw);
            }
        }
        kept.join(" ")
    };
    Ok((rest, s))
}

/// `key=value` pairs of a libpq key=value string (values optionally in single quotes with
/// `\'` and `\\` escapes): (the pair as written, key, value).
pub(super) fn key_values(s: &str) -> Result<Vec<(String, String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = s.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else {
            return Ok(out);
        };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        if chars.next_if(|(_, c)| *c == '=').is_none() {
            return Err(format!("`{key}` has no `=value`"));
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if(|(_, c)| *c == '\'').is_some() {
            loop {
                match chars.next() {
                    None => return Err(format!("unterminated quote in the value of `{key}`")),
                    Some((_, '\'')) => break,
                    Some((_, '\\')) => value.extend(chars.next().map(|(_, c)| c)),
                    Some((_, c)) => value.push(c),
                }
            }
        } else {
            while let Some((_, c)) = chars.next_if(|(_, c)| !c.is_whitespace()) {
                value.push(c);
            }
        }
        let end = chars.peek().map_or(s.len(), |&(i, _)| i);
        out.push((s[start..end].to_string(), key, value));
    }
}

/// Whether `host` is this machine: a loopback address, `localhost` or a Unix socket.
fn is_local(host: &Host) -> bool {
    match host {
        Host::Unix(_) => true,
        Host::Tcp(name) => {
            name.eq_ignore_ascii_case("localhost")
                || name
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    }
}

/// The mode the written settings ask for; refuses what would fall back or send in clear.
fn decide(s: &TlsSettings, config: &postgres::Config) -> Result<TlsMode, String> {
    let mode = match s.mode.as_deref() {
        Some("disable") if s.rootcert.is_some() => {
            return Err("sslmode=disable with sslrootcert: choose TLS or plaintext".into())
        }
        Some("disable") => TlsMode::Disable,
        Some("require") if s.rootcert.is_some() => TlsMode::VerifyCa,
        Some("require") => TlsMode::Require,
        Some("verify-ca") => TlsMode::VerifyCa,
        Some("verify-full") => TlsMode::VerifyFull,
        Some(m @ ("prefer" | "allow")) => {
            return Err(format!(
                "sslmode={m} would fall back to plaintext without saying so: write \
                 sslmode=verify-full&sslrootcert=FILE, or sslmode=disable"
            ))
        }
        Some(m) => {
            return Err(format!(
                "unknown sslmode={m} (known: disable, require, verify-ca, verify-full)"
            ))
        }
        None if s.rootcert.is_some() => TlsMode::VerifyFull,
        None => {
            // hostaddr, when given, is where the connection goes.
            let remote: Vec<String> = if config.get_hostaddrs().is_empty() {
                config
                    .get_hosts()
                    .iter()
                    .filter(|h| !is_local(h))
                    .map(|h| match h {
                        Host::Tcp(n) => n.clone(),
                        Host::Unix(p) => p.display().to_string(),
                    })
                    .collect()
            } else {
                config
                    .get_hostaddrs()
                    .iter()
                    .filter(|a| !a.is_loopback())
                    .map(|a| a.to_string())
                    .collect()
            };
            if !remote.is_empty() {
                return Err(format!(
                    "host {} is not on this machine and the URL asks for no TLS: add \
                     sslmode=verify-full&sslrootcert=/path/to/ca.pem (the CA that signed the \
                     server's certificate), or sslmode=disable to send the password and all \
                     data in clear",
                    remote.join(", ")
                ));
            }
            TlsMode::Disable
        }
    };
    if matches!(mode, TlsMode::VerifyCa | TlsMode::VerifyFull) && s.rootcert.is_none() {
        return Err(format!(
            "sslmode={} needs sslrootcert=FILE (PEM, the CA that signed the server's certificate)",
            s.mode.as_deref().unwrap_or_default()
        ));
    }
    Ok(mode)
}

/// The rustls connector for `mode`, trusting the CA certificates in `rootcert`.
fn connector(
    mode: TlsMode,
    rootcert: Option<&PathBuf>,
    shown: &str,
) -> Result<MakeRustlsConnect, StoreError> {
    let provider = failback_trust::verify::provider();
    let webpki = match rootcert {
        Some(path) => Some(webpki_verifier(path, &provider, shown)?),
        None => None,
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Config {
            url: shown.to_string(),
            what: format!("TLS set-up: {e}"),
        })?;
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, webpki) {
        (TlsMode::VerifyFull, Some(v)) => v,
        (_, webpki) => Arc::new(Relaxed { webpki, provider }),
    };
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

fn webpki_verifier(
    path: &PathBuf,
    provider: &Arc<rustls::crypto::CryptoProvider>,
    shown: &str,
) -> Result<Arc<rustls::client::WebPkiServerVerifier>, StoreError> {
    let bad = |what: String| StoreError::Config {
        url: shown.to_string(),
        what: format!("sslrootcert {}: {what}", path.display()),
    };
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(format!("not PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("not a CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad("no CERTIFICATE in the file".into()));
    }
    rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| bad(e.to_string()))
}

/// `verify-ca` (chain checked, host name not) and `require` (nothing checked, as in libpq):
/// the handshake's signatures are still verified.
#[derive(Debug)]
struct Relaxed {
    webpki: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Relaxed {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(v) = &self.webpki else {
            return Ok(ServerCertVerified::assertion());
        };
        match v.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
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
        rustls::crypto::verify_tls13_signature(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(url: &str) -> Result<TlsMode, String> {
        let (rest, s) = take_tls_settings(url)?;
        let config: postgres::Config = rest.parse().map_err(|e| format!("{e:?}"))?;
        decide(&s, &config)
    }

    #[test]
    fn tls_settings_are_taken_out_of_both_forms() {
        let (rest, s) = take_tls_settings(
            "postgres://fb@db:5432/x?sslmode=verify-full&connect_timeout=5&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://fb@db:5432/x?connect_timeout=5");
        assert_eq!(s.mode.as_deref(), Some("verify-full"));
        assert_eq!(s.rootcert, Some(PathBuf::from("/etc/ca.pem")));
        let (rest, s) =
            take_tls_settings("host=db sslrootcert='/a b/ca.pem' user=fb sslmode = require")
                .unwrap();
        assert_eq!(rest, "host=db user=fb");
        assert_eq!(s.mode.as_deref(), Some("require"));
        assert_eq!(s.rootcert, Some(PathBuf::from("/a b/ca.pem")));
        assert!(take_tls_settings("host=db sslmode='x").is_err());
    }

    /// A remote host without TLS settings is refused before any connection; loopback is not.
    #[test]
    fn plaintext_to_a_remote_host_needs_sslmode_disable() {
        let err = mode("postgres://fb:pw@db.example.com/failback").unwrap_err();
        assert!(
            err.contains("host db.example.com is not on this machine")
                && err.contains("sslmode=disable"),
            "{err}"
        );
        let err = mode("host=localhost,10.0.0.7 user=fb").unwrap_err();
        assert!(err.contains("host 10.0.0.7 "), "{err}");
        let err = mode("host=localhost hostaddr=10.0.0.7 user=fb").unwrap_err();
        assert!(err.contains("host 10.0.0.7 "), "{err}");
        for local in [
            "postgres://fb@127.0.0.1:5432/x",
            "postgres://fb@localhost/x",
            "postgres://fb@[::1]:5432/x",
            "host=/run/postgresql user=fb",
        ] {
            assert_eq!(mode(local), Ok(TlsMode::Disable), "{local}");
        }
        assert_eq!(
            mode("postgres://fb@db.example.com/x?sslmode=disable"),
            Ok(TlsMode::Disable)
        );
        assert_eq!(
            mode("postgres://fb@db.example.com/x?sslrootcert=/ca.pem"),
            Ok(TlsMode::VerifyFull)
        );
        assert_eq!(
            mode("postgres://fb@db.example.com/x?sslmode=require"),
            Ok(TlsMode::Require)
        );
        assert_eq!(
            mode("postgres://fb@db.example.com/x?sslmode=require&sslrootcert=/ca.pem"),
            Ok(TlsMode::VerifyCa)
        );
    }

    #[test]
    fn modes_that_would_fall_back_or_lack_a_ca_are_refused() {
        for (url, says) in [
            (
                "postgres://fb@db/x?sslmode=prefer",
                "sslmode=prefer would fall back",
            ),
            (
                "postgres://fb@db/x?sslmode=allow",
                "sslmode=allow would fall back",
            ),
            (
                "postgres://fb@db/x?sslmode=verify-full",
                "needs sslrootcert",
            ),
            ("postgres://fb@db/x?sslmode=verify-ca", "needs sslrootcert"),
            (
                "postgres://fb@db/x?sslmode=strict",
                "unknown sslmode=strict",
            ),
            (
                "postgres://fb@db/x?sslmode=disable&sslrootcert=/ca.pem",
                "choose TLS or plaintext",
            ),
        ] {
            let err = mode(url).unwrap_err();
            assert!(err.contains(says), "{url}: {err}");
        }
    }

    #[test]
    fn unreadable_ca_file_is_named() {
        let err = Target::parse(
            "postgres://fb@db/x?sslrootcert=/nonexistent/ca.pem",
            "postgres://fb@db/x",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("postgres://fb@db/x") && err.contains("sslrootcert /nonexistent/ca.pem"),
            "{err}"
        );
    }
}
