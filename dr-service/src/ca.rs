//! The service's private certificate authority (rcgen). Created on first start in the data
//! directory (`ca.pem`, `ca-key.pem`, mode 0600 for the key) and reused afterwards, so that
//! agents and clients that pinned the CA keep trusting the service across restarts.
//!
//! It issues one certificate per role (see `failback_trust`), each marked with its role's URI
//! SAN, which every verifier checks, so that no holder of one role can pose as another:
//! - the service's own HTTPS certificate (role `service`; DNS `localhost`, IP 127.0.0.1, ::1
//!   and the operator's `--san` extras) — never issued to anyone else;
//! - agent server certificates (role `agent`; DNS `failback-agent` and the URI SAN of their
//!   recovery instance, nothing a caller chooses);
//! - client certificates (role `client`; the URI SAN of the paired instance).

use std::net::IpAddr;

use sha2::Digest;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

use failback_trust::{instance_uri, Role};
pub use failback_trust::{AGENT_SERVER_NAME, INSTANCE_URI_PREFIX};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CA key {path} is not a valid PEM key: {source}")]
    BadKey {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("certificate generation ({what}): {source}")]
    Generate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("invalid subject alternative name {0:?}")]
    BadSan(String),
}

/// A PEM certificate + key pair as issued.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    /// SHA-256 of the certificate's DER (hex): what agents' allow lists name.
    pub sha256: String,
}

pub struct Ca {
    key: KeyPair,
    cert: Certificate,
    ca_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ca")
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

fn gen(what: &str) -> impl FnOnce(rcgen::Error) -> CaError + '_ {
    move |source| CaError::Generate {
        what: what.to_string(),
        source,
    }
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "failback private CA");
    dn.push(DnType::OrganizationName, "failback");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(3650);
    p
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    crate::util::fill_random(&mut b);
    b[0] &= 0x7f; // positive
    SerialNumber::from_slice(&b)
}

fn write_private(path: &Path, data: &str) -> Result<(), CaError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    o.mode(0o600);
    let mut f = o.open(path).map_err(io(path))?;
    f.write_all(data.as_bytes()).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

impl Ca {
    /// Loads `ca.pem` + `ca-key.pem` from `dir`, creating them on first start.
    pub fn load_or_create(dir: &Path) -> Result<Ca, CaError> {
        if let Some(ca) = Ca::load(dir)? {
            return Ok(ca);
        }
        let ca = Ca::generate()?;
        let key_path = dir.join("ca-key.pem");
        let cert_path = dir.join("ca.pem");
        write_private(&key_path, &ca.key_pem())?;
        std::fs::write(&cert_path, &ca.ca_pem).map_err(io(&cert_path))?;
        Ok(ca)
    }

    /// Loads `ca.pem` + `ca-key.pem` from `dir` if both exist.
    pub fn load(dir: &Path) -> Result<Option<Ca>, CaError> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca-key.pem");
        if !(key_path.exists() && cert_path.exists()) {
            return Ok(None);
        }
        let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
        let ca_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        Ca::from_pems(ca_pem, &key_pem, &key_path).map(Some)
    }

    /// A CA from its certificate and key PEM; `origin` names where the key came from.
    pub fn from_pems(ca_pem: String, key_pem: &str, origin: &Path) -> Result<Ca, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(|source| CaError::BadKey {
            path: origin.to_owned(),
            source,
        })?;
        // rcgen needs an issuer `Certificate` object; only its subject DN and key
        // identifier are used when signing, both derived from the same params and key as
        // the stored ca.pem, so certificates issued now chain to the pinned ca.pem.
        let cert = ca_params().self_signed(&key).map_err(gen("CA"))?;
        Ok(Ca { key, cert, ca_pem })
    }

    /// A new CA (key pair and self-signed certificate), stored nowhere yet.
    pub fn generate() -> Result<Ca, CaError> {
        let key = KeyPair::generate().map_err(gen("CA key"))?;
        let mut params = ca_params();
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(gen("CA"))?;
        let ca_pem = cert.pem();
        Ok(Ca { key, cert, ca_pem })
    }

    /// The CA private key (PEM): only for sealing it into a shared database.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    fn issue(
        &self,
        what: &str,
        cn: &str,
        sans: Vec<SanType>,
        eku: ExtendedKeyUsagePurpose,
        days: i64,
    ) -> Result<Issued, CaError> {
        let key = KeyPair::generate().map_err(gen(what))?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        p.subject_alt_names = sans;
        p.extended_key_usages = vec![eku];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(random_serial());
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::days(1);
        p.not_after = now + time::Duration::days(days);
        let cert = p
            .signed_by(&key, &self.cert, &self.key)
            .map_err(gen(what))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            sha256: hex::encode(sha2::Sha256::digest(cert.der())),
        })
    }

    /// The service's HTTPS certificate: `localhost`, 127.0.0.1, ::1 and `extra` (IPs or DNS,
    /// from the operator's `--san`), marked with the service role.
    pub fn server_cert(&self, extra: &[String]) -> Result<Issued, CaError> {
        let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
        names.extend(extra.iter().cloned());
        let mut sans = vec![uri_san(Role::Service.uri())?];
        sans.extend(sans_from(&names)?);
        self.issue(
            "service certificate",
            "failback DR service",
            sans,
            ExtendedKeyUsagePurpose::ServerAuth,
            825,
        )
    }

    /// An agent server certificate: the agent role, DNS `failback-agent` and the instance's
    /// URI SAN. Nothing in it is chosen by the caller.
    pub fn agent_cert(&self, instance_id: &str) -> Result<Issued, CaError> {
        let sans = vec![
            uri_san(Role::Agent.uri())?,
            uri_san(instance_uri(instance_id))?,
            SanType::DnsName(
                AGENT_SERVER_NAME
                    .to_string()
                    .try_into()
                    .map_err(|_| CaError::BadSan(AGENT_SERVER_NAME.into()))?,
            ),
        ];
        self.issue(
            "agent certificate",
            &format!("failback-agent {instance_id}"),
            sans,
            ExtendedKeyUsagePurpose::ServerAuth,
            365,
        )
    }

    /// A client certificate: the client role and exactly one recovery instance.
    pub fn client_cert(&self, instance_id: &str, client_id: &str) -> Result<Issued, CaError> {
        self.issue(
            "client certificate",
            &format!("failback-client {client_id}"),
            vec![
                uri_san(Role::Client.uri())?,
                uri_san(instance_uri(instance_id))?,
            ],
            ExtendedKeyUsagePurpose::ClientAuth,
            30,
        )
    }
}

fn uri_san(uri: String) -> Result<SanType, CaError> {
    Ok(SanType::URI(
        uri.clone().try_into().map_err(|_| CaError::BadSan(uri))?,
    ))
}

/// Turns `host` / `host:port` / IP strings into SANs (ports are dropped, duplicates removed).
fn sans_from(names: &[String]) -> Result<Vec<SanType>, CaError> {
    let mut out: Vec<SanType> = Vec::new();
    for n in names {
        let host = strip_port(n);
        if host.is_empty() {
            continue;
        }
        let san = if let Ok(ip) = host.parse::<IpAddr>() {
            SanType::IpAddress(ip)
        } else {
            SanType::DnsName(
                host.to_string()
                    .try_into()
                    .map_err(|_| CaError::BadSan(n.clone()))?,
            )
        };
        if !out.contains(&san) {
            out.push(san);
        }
    }
    Ok(out)
}

/// `1.2.3.4:55` -> `1.2.3.4`, `[::1]:5` -> `::1`, `host:5` -> `host`, `::1` -> `::1`.
pub fn strip_port(s: &str) -> &str {
    let s = s.trim();
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    if s.parse::<IpAddr>().is_ok() {
        return s;
    }
    match s.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_survives_reload_and_issues() {
        let d = tempfile::tempdir().unwrap();
        let a = Ca::load_or_create(d.path()).unwrap();
        let b = Ca::load_or_create(d.path()).unwrap();
        assert_eq!(a.ca_pem(), b.ca_pem());
        let c = b.client_cert("i-0123456789abcdef", "fc-1").unwrap();
        assert!(c.cert_pem.contains("BEGIN CERTIFICATE"));
        b.agent_cert("i-0123456789abcdef").unwrap();
        b.server_cert(&["10.0.2.2".into(), "svc.example".into()])
            .unwrap();
    }

    #[test]
    fn ports_stripped() {
        assert_eq!(strip_port("1.2.3.4:55"), "1.2.3.4");
        assert_eq!(strip_port("[::1]:5"), "::1");
        assert_eq!(strip_port("::1"), "::1");
        assert_eq!(strip_port("host:7"), "host");
    }
}
