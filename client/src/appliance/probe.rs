//! Reachability and clock check against the DR service before pairing: one HTTPS request
//! (through the proxy if configured) whose `Date` header tells the service's time.
//!
//! The appliance has no time source of its own besides the VM's RTC, which can be far off;
//! with a wrong clock every certificate looks expired or not yet valid. So this one probe
//! accepts a certificate whose only fault is its validity period (it sends no secret and
//! reads only the Date header); the chain must still lead to the pinned CA and name the
//! host. The caller then sets the clock, and every later connection verifies fully.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// What the probe learnt.
#[derive(Debug, Clone)]
pub struct Probe {
    /// HTTP status line of the response.
    pub status: String,
    /// The service's clock (Date header), if sent.
    pub server_time: Option<SystemTime>,
    /// The certificate was valid except for its validity period at our current clock.
    pub clock_suspect: bool,
}

/// Why the probe failed. `transient` errors are worth retrying (network not ready yet).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ProbeError {
    /// What failed, naming the URL/address.
    pub message: String,
    /// Worth retrying.
    pub transient: bool,
}

fn perm(message: String) -> ProbeError {
    ProbeError {
        message,
        transient: false,
    }
}
fn trans(message: String) -> ProbeError {
    ProbeError {
        message,
        transient: true,
    }
}

#[derive(Debug)]
struct ClockTolerant {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    suspect: AtomicBool,
}

impl ServerCertVerifier for ClockTolerant {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. },
            )) => {
                self.suspect.store(true, Ordering::SeqCst);
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
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

/// Splits `https://host[:port]/...` into (host, port).
pub fn host_port(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("https://")?;
    let authority = rest.split('/').next()?;
    if let Some(v6) = authority.strip_prefix('[') {
        let (h, tail) = v6.split_once(']')?;
        let port = tail
            .strip_prefix(':')
            .map_or(Some(443), |p| p.parse().ok())?;
        return Some((h.to_string(), port));
    }
    match authority.split_once(':') {
        Some((h, p)) => Some((h.to_string(), p.parse().ok()?)),
        None => Some((authority.to_string(), 443)),
    }
}

fn connect(addr: &str, timeout: Duration) -> Result<TcpStream, ProbeError> {
    let addrs: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|e| trans(format!("resolving {addr}: {e}")))?
        .collect();
    let mut last = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => {
                let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                let _ = s.set_write_timeout(Some(Duration::from_secs(30)));
                return Ok(s);
            }
            Err(e) => last = Some(format!("connecting to {a}: {e}")),
        }
    }
    Err(trans(last.unwrap_or_else(|| {
        format!("{addr} resolves to no address")
    })))
}

/// Probes `url`: TCP (optionally via an HTTP CONNECT proxy), TLS pinned to `ca_pem`, one
/// `GET /` request; returns the Date header.
pub fn probe(url: &str, ca_pem: &str, proxy: Option<&str>) -> Result<Probe, ProbeError> {
    let (host, port) =
        host_port(url).ok_or_else(|| perm(format!("{url}: not an https://host[:port] URL")))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| perm(format!("CA certificate PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| perm(format!("CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(perm("CA certificate PEM holds no certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(&provider),
    )
    .build()
    .map_err(|e| perm(format!("CA certificate: {e}")))?;
    let verifier = Arc::new(ClockTolerant {
        inner,
        suspect: AtomicBool::new(false),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| perm(format!("TLS config: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::clone(&verifier) as Arc<dyn ServerCertVerifier>)
        .with_no_client_auth();
    let name = ServerName::try_from(host.clone())
        .map_err(|e| perm(format!("{url}: host `{host}`: {e}")))?;
    let target = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };

    let mut tcp = match proxy {
        Some(p) => {
            let paddr = p.trim_start_matches("http://").trim_end_matches('/');
            let mut s = connect(paddr, Duration::from_secs(10))?;
            write!(s, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n")
                .map_err(|e| trans(format!("proxy {p}: {e}")))?;
            let head = read_head(&mut s).map_err(|e| trans(format!("proxy {p}: {e}")))?;
            if head.split_whitespace().nth(1) != Some("200") {
                return Err(perm(format!(
                    "proxy {p} refused CONNECT {target}: {}",
                    head.lines().next().unwrap_or("")
                )));
            }
            s
        }
        None => connect(&target, Duration::from_secs(10))?,
    };
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name)
        .map_err(|e| perm(format!("TLS to {url}: {e}")))?;
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    let authority = if port == 443 {
        host.clone()
    } else {
        target.clone()
    };
    write!(tls, "GET / HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: failback-appliance\r\nConnection: close\r\n\r\n")
        .map_err(|e| classify_tls(url, e))?;
    let head = read_head(&mut tls).map_err(|e| classify_tls(url, e))?;
    let status = head.lines().next().unwrap_or("").to_string();
    let server_time = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if k.eq_ignore_ascii_case("date") {
            httpdate::parse_http_date(v.trim()).ok()
        } else {
            None
        }
    });
    Ok(Probe {
        status,
        server_time,
        clock_suspect: verifier.suspect.load(Ordering::SeqCst),
    })
}

fn classify_tls(url: &str, e: std::io::Error) -> ProbeError {
    // Certificate problems arrive as InvalidData: permanent (wrong CA, wrong host).
    if e.kind() == std::io::ErrorKind::InvalidData {
        perm(format!(
            "TLS with {url}: {e} (is ca_cert_pem the CA of this DR service?)"
        ))
    } else {
        trans(format!("{url}: {e}"))
    }
}

/// Reads an HTTP response head (up to the blank line; at most 16 KiB).
fn read_head(r: &mut impl Read) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if r.read(&mut byte)? == 0 {
            if head.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed before a response",
                ));
            }
            break;
        }
        head.push(byte[0]);
        if head.len() > 16384 {
            return Err(std::io::Error::other("response head larger than 16 KiB"));
        }
    }
    Ok(String::from_utf8_lossy(&head).to_string())
}

#[cfg(test)]
mod tests {
    use super::host_port;

    #[test]
    fn host_port_forms() {
        assert_eq!(
            host_port("https://10.0.2.2:8443/x"),
            Some(("10.0.2.2".into(), 8443))
        );
        assert_eq!(
            host_port("https://dr.example.com"),
            Some(("dr.example.com".into(), 443))
        );
        assert_eq!(
            host_port("https://[2001:db8::1]:9/"),
            Some(("2001:db8::1".into(), 9))
        );
        assert_eq!(host_port("http://x"), None);
    }
}
