//! A development CA (rcgen) that issues role-marked certificates like the DR service's CA does:
//! for `failback-agent dev-certs`, tests and benchmarks. Behind the `dev-ca` feature so that
//! the appliance client never links certificate issuing.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::identity::{instance_uri, Role, AGENT_SERVER_NAME};

/// Certificate generation failed.
#[derive(Debug, thiserror::Error)]
#[error("generating certificates: {0}")]
pub struct DevCaError(String);

fn gen_err(e: rcgen::Error) -> DevCaError {
    DevCaError(e.to_string())
}

/// What to put into a certificate issued by [`DevCa::issue`]. Tests use it to make the
/// certificates an attacker would hold (wrong role, other instance, extra names).
#[derive(Debug, Clone, Default)]
pub struct Spec {
    pub common_name: String,
    pub roles: Vec<Role>,
    pub instances: Vec<String>,
    /// DNS names or IP addresses.
    pub names: Vec<String>,
    /// Server (true) or client (false) extended key usage.
    pub server_auth: bool,
    /// Validity in days from now (negative: already expired).
    pub days: i64,
}

/// A self-signed CA able to issue service, agent and client certificates.
pub struct DevCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DevCa")
    }
}

impl DevCa {
    /// A new self-signed CA.
    pub fn generate(common_name: &str) -> Result<Self, DevCaError> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().map_err(gen_err)?;
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

    /// Issues a certificate exactly as `spec` says. Returns (cert PEM, key PEM).
    pub fn issue(&self, spec: &Spec) -> Result<(String, String), DevCaError> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
        params.subject_alt_names = sans(spec)?;
        params
            .distinguished_name
            .push(DnType::CommonName, spec.common_name.as_str());
        params.extended_key_usages = vec![if spec.server_auth {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let now = time::OffsetDateTime::now_utc();
        if spec.days < 0 {
            params.not_before = now - time::Duration::days(2 - spec.days);
        } else {
            params.not_before = now - time::Duration::days(1);
        }
        params.not_after = now + time::Duration::days(spec.days);
        let key = KeyPair::generate().map_err(gen_err)?;
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(gen_err)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// The DR service's certificate for `names` (DNS names or IPs).
    pub fn issue_service(&self, names: &[String]) -> Result<(String, String), DevCaError> {
        self.issue(&Spec {
            common_name: "failback DR service".into(),
            roles: vec![Role::Service],
            names: names.to_vec(),
            server_auth: true,
            days: 30,
            ..Spec::default()
        })
    }

    /// An agent certificate for `instance` ([`AGENT_SERVER_NAME`] + `extra_sans`).
    pub fn issue_agent(
        &self,
        instance: &str,
        extra_sans: &[String],
    ) -> Result<(String, String), DevCaError> {
        let mut names = vec![AGENT_SERVER_NAME.to_owned()];
        names.extend(extra_sans.iter().cloned());
        self.issue(&Spec {
            common_name: format!("{AGENT_SERVER_NAME} {instance}"),
            roles: vec![Role::Agent],
            instances: vec![instance.to_owned()],
            names,
            server_auth: true,
            days: 30,
        })
    }

    /// A client certificate for `instance`.
    pub fn issue_client(&self, instance: &str) -> Result<(String, String), DevCaError> {
        self.issue(&Spec {
            common_name: format!("failback client {instance}"),
            roles: vec![Role::Client],
            instances: vec![instance.to_owned()],
            server_auth: false,
            days: 30,
            ..Spec::default()
        })
    }
}

fn sans(spec: &Spec) -> Result<Vec<SanType>, DevCaError> {
    let mut out = Vec::new();
    let uri = |s: String| -> Result<SanType, DevCaError> {
        Ok(SanType::URI(s.try_into().map_err(gen_err)?))
    };
    for r in &spec.roles {
        out.push(uri(r.uri())?);
    }
    for i in &spec.instances {
        out.push(uri(instance_uri(i))?);
    }
    for n in &spec.names {
        out.push(match n.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(n.clone().try_into().map_err(gen_err)?),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Identity, IdentityError};
    use crate::pem::certs;
    use std::path::Path;

    fn id(pem: &str) -> Identity {
        let der = certs("c", Path::new("x"), pem.as_bytes()).unwrap();
        Identity::from_der(&der[0]).unwrap()
    }

    #[test]
    fn issued_certificates_carry_their_role_and_instance() {
        let ca = DevCa::generate("t").unwrap();
        let agent = id(&ca.issue_agent("i-0abc", &[]).unwrap().0);
        agent.expect(Role::Agent, Some("i-0abc")).unwrap();
        assert!(matches!(
            agent.expect(Role::Agent, Some("i-0def")),
            Err(IdentityError::WrongInstance { .. })
        ));
        assert!(matches!(
            agent.expect(Role::Service, None),
            Err(IdentityError::WrongRole { .. })
        ));
        let client = id(&ca.issue_client("i-0abc").unwrap().0);
        client.expect(Role::Client, Some("i-0abc")).unwrap();
        let svc = id(&ca.issue_service(&["localhost".into()]).unwrap().0);
        svc.expect(Role::Service, None).unwrap();
        assert!(svc.expect(Role::Agent, None).is_err());
    }
}
