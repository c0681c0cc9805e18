//! Who a certificate speaks for: its role (`urn:failback:role:<ROLE>` URI SAN), the recovery
//! instance it is scoped to (`urn:failback:instance:<ID>` URI SAN), its key strength and its
//! SHA-256 fingerprint (what revocation lists name).

use std::fmt;

use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;
use x509_parser::public_key::PublicKey;

/// Prefix of the URI SAN that marks a certificate's role.
pub const ROLE_URI_PREFIX: &str = "urn:failback:role:";
/// Prefix of the URI SAN that names the recovery instance a certificate is scoped to.
pub const INSTANCE_URI_PREFIX: &str = "urn:failback:instance:";
/// DNS name every agent certificate carries; the client verifies it whatever address it dials.
pub const AGENT_SERVER_NAME: &str = "failback-agent";
/// Longest instance id a certificate may name (ids are `i-` + hex; this only bounds parsing).
pub const MAX_INSTANCE_ID: usize = 64;
/// Smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;
/// Smallest elliptic-curve key accepted, in bits.
pub const MIN_EC_BITS: usize = 256;

/// The roles of the trust model. Each is issued only by the DR service, to exactly one kind
/// of party, and every verifier checks the role it expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The DR service's HTTPS certificate. Never issued to anyone else.
    Service,
    /// A recovery agent's server certificate (one instance).
    Agent,
    /// A failback client's certificate (one instance, one pairing).
    Client,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Service => "service",
            Role::Agent => "agent",
            Role::Client => "client",
        }
    }

    /// The URI SAN that marks this role.
    pub fn uri(self) -> String {
        format!("{ROLE_URI_PREFIX}{}", self.as_str())
    }

    fn from_uri(uri: &str) -> Option<Role> {
        match uri.strip_prefix(ROLE_URI_PREFIX)? {
            "service" => Some(Role::Service),
            "agent" => Some(Role::Agent),
            "client" => Some(Role::Client),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The URI SAN naming `instance`.
pub fn instance_uri(instance: &str) -> String {
    format!("{INSTANCE_URI_PREFIX}{instance}")
}

/// What a certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Roles named by the certificate (a well-formed one names exactly one).
    pub roles: Vec<Role>,
    /// Recovery instances named (a well-formed agent or client certificate names one).
    pub instances: Vec<String>,
    /// SHA-256 of the certificate's DER encoding.
    pub fingerprint: [u8; 32],
    /// Public key strength, for the minimum-size check.
    pub key: KeyStrength,
}

/// The public key's algorithm and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStrength {
    Rsa { bits: usize },
    Ec { bits: usize },
    Ed25519,
    Other,
}

/// Why a certificate does not fit the role it was presented for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("certificate cannot be parsed: {0}")]
    Parse(String),
    #[error("certificate key too small ({found}; at least {min} bits needed)")]
    KeyTooSmall { found: String, min: usize },
    #[error("certificate is not a failback {want} certificate (its roles: {found})")]
    WrongRole { want: Role, found: String },
    #[error("certificate names no recovery instance (a {role} certificate must name one)")]
    NoInstance { role: Role },
    #[error("certificate is for recovery instance {found}, expected {want}")]
    WrongInstance { want: String, found: String },
    #[error("certificate names several recovery instances ({0})")]
    SeveralInstances(String),
}

impl Identity {
    /// Reads a DER certificate. Unknown URIs are ignored; oversized instance ids refused.
    pub fn from_der(der: &[u8]) -> Result<Identity, IdentityError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| IdentityError::Parse(e.to_string()))?;
        let mut roles = Vec::new();
        let mut instances = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                let GeneralName::URI(uri) = name else {
                    continue;
                };
                if let Some(role) = Role::from_uri(uri) {
                    roles.push(role);
                } else if let Some(id) = uri.strip_prefix(INSTANCE_URI_PREFIX) {
                    if id.is_empty() || id.len() > MAX_INSTANCE_ID {
                        return Err(IdentityError::Parse(format!(
                            "instance URI of {} bytes",
                            id.len()
                        )));
                    }
                    instances.push(id.to_owned());
                }
            }
        }
        let key = match cert.public_key().parsed() {
            Ok(PublicKey::RSA(rsa)) => KeyStrength::Rsa {
                bits: rsa.key_size(),
            },
            Ok(PublicKey::EC(ec)) => KeyStrength::Ec {
                bits: ec.key_size(),
            },
            _ if cert.public_key().algorithm.algorithm.to_id_string() == "1.3.101.112" => {
                KeyStrength::Ed25519
            }
            _ => KeyStrength::Other,
        };
        Ok(Identity {
            roles,
            instances,
            fingerprint: Sha256::digest(der).into(),
            key,
        })
    }

    /// The one instance named, if exactly one is.
    pub fn instance(&self) -> Option<&str> {
        match self.instances.as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }

    /// Fingerprint as lowercase hex (what the service's revocation answers carry).
    pub fn fingerprint_hex(&self) -> String {
        hex::encode(self.fingerprint)
    }

    /// Refuses keys below [`MIN_RSA_BITS`] / [`MIN_EC_BITS`].
    pub fn check_key(&self) -> Result<(), IdentityError> {
        let (found, min) = match self.key {
            KeyStrength::Rsa { bits } if bits < MIN_RSA_BITS => {
                (format!("RSA {bits} bits"), MIN_RSA_BITS)
            }
            KeyStrength::Ec { bits } if bits < MIN_EC_BITS => {
                (format!("EC {bits} bits"), MIN_EC_BITS)
            }
            _ => return Ok(()),
        };
        Err(IdentityError::KeyTooSmall { found, min })
    }

    /// Checks the key, that `role` is the certificate's only role and, for agents and
    /// clients, that it names exactly one instance (equal to `instance` when given).
    pub fn expect(&self, role: Role, instance: Option<&str>) -> Result<(), IdentityError> {
        self.check_key()?;
        if self.roles != [role] {
            let found = if self.roles.is_empty() {
                "none".to_owned()
            } else {
                let v: Vec<_> = self.roles.iter().map(|r| r.as_str()).collect();
                v.join(", ")
            };
            return Err(IdentityError::WrongRole { want: role, found });
        }
        if role == Role::Service {
            return Ok(());
        }
        let found = match self.instances.as_slice() {
            [] => return Err(IdentityError::NoInstance { role }),
            [one] => one,
            many => return Err(IdentityError::SeveralInstances(many.join(", "))),
        };
        match instance {
            Some(want) if want != found => Err(IdentityError::WrongInstance {
                want: want.to_owned(),
                found: found.clone(),
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A certificate with a 1024-bit RSA key (made by openssl: ring cannot make RSA keys).
    fn rsa1024_der() -> Vec<u8> {
        let dir = tempfile_dir();
        let out = std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:1024", "-nodes", "-subj", "/CN=weak",
            ])
            .args(["-days", "1", "-outform", "DER", "-keyout"])
            .arg(dir.join("k.pem"))
            .arg("-out")
            .arg(dir.join("c.der"))
            .output()
            .expect("openssl (Debian package openssl) must be installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read(dir.join("c.der")).unwrap()
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("trust-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn small_rsa_keys_are_refused_by_name() {
        let id = Identity::from_der(&rsa1024_der()).unwrap();
        assert_eq!(id.key, KeyStrength::Rsa { bits: 1024 });
        let e = id.expect(Role::Service, None).unwrap_err().to_string();
        assert_eq!(
            e,
            "certificate key too small (RSA 1024 bits; at least 2048 bits needed)"
        );
    }
}
