//! The CA private key as stored in a shared database: sealed with ChaCha20-Poly1305 under a
//! 256-bit key the operator gives every replica (`--ca-secret-file PATH` or the environment
//! variable `FAILBACK_CA_SECRET`: 64 hex digits). The database never holds the key in clear;
//! a wrong secret is an authentication failure, not a garbled CA.
//!
//! Format: `v1:<24 hex nonce>:<hex ciphertext+tag>`; the associated data names what is sealed
//! (`name`), so a sealed value cannot be swapped for another.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("CA secret {source_name}: {problem} (need 64 hex digits = 256 bits; create one with `openssl rand -hex 32`)")]
    BadSecret {
        source_name: String,
        problem: String,
    },
    #[error("sealed {name}: not in the v1:NONCE:CIPHERTEXT format")]
    Format { name: String },
    #[error(
        "sealed {name}: authentication failed (wrong CA secret, or the stored value was altered)"
    )]
    Open { name: String },
}

/// The 256-bit sealing key.
pub struct SealKey(Key);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(..)")
    }
}

impl SealKey {
    /// Parses 64 hex digits (surrounding white space ignored); `source_name` names the file
    /// or variable in errors.
    pub fn parse(text: &str, source_name: &str) -> Result<SealKey, SealError> {
        let bad = |problem: String| SealError::BadSecret {
            source_name: source_name.to_string(),
            problem,
        };
        let t = text.trim();
        if t.len() != 64 {
            return Err(bad(format!("{} characters", t.len())));
        }
        let b = hex::decode(t).map_err(|e| bad(format!("not hex: {e}")))?;
        Ok(SealKey(*Key::from_slice(&b)))
    }

    pub fn seal(&self, name: &str, plaintext: &[u8]) -> String {
        let mut nonce = [0u8; 12];
        crate::util::fill_random(&mut nonce);
        let ct = ChaCha20Poly1305::new(&self.0)
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: name.as_bytes(),
                },
            )
            .expect("ChaCha20-Poly1305 encryption of a short value cannot fail");
        format!("v1:{}:{}", hex::encode(nonce), hex::encode(ct))
    }

    pub fn open(&self, name: &str, sealed: &str) -> Result<Vec<u8>, SealError> {
        let format = || SealError::Format {
            name: name.to_string(),
        };
        let mut parts = sealed.trim().split(':');
        let (Some("v1"), Some(n), Some(c), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(format());
        };
        let nonce = hex::decode(n)
            .ok()
            .filter(|n| n.len() == 12)
            .ok_or_else(format)?;
        let ct = hex::decode(c).map_err(|_| format())?;
        ChaCha20Poly1305::new(&self.0)
            .decrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &ct,
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| SealError::Open {
                name: name.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_the_same_key_and_name() {
        let k = SealKey::parse(&"ab".repeat(32), "test").unwrap();
        let s = k.seal("ca-key", b"-----BEGIN PRIVATE KEY-----");
        assert!(!s.contains("PRIVATE"), "{s}");
        assert_eq!(
            k.open("ca-key", &s).unwrap(),
            b"-----BEGIN PRIVATE KEY-----"
        );
        // A second seal uses another nonce.
        assert_ne!(s, k.seal("ca-key", b"-----BEGIN PRIVATE KEY-----"));
        let other = SealKey::parse(&"cd".repeat(32), "test").unwrap();
        assert!(matches!(
            other.open("ca-key", &s),
            Err(SealError::Open { .. })
        ));
        assert!(matches!(k.open("other", &s), Err(SealError::Open { .. })));
        let mut tampered = s.clone();
        tampered.pop();
        tampered.push(if s.ends_with('0') { '1' } else { '0' });
        assert!(k.open("ca-key", &tampered).is_err());
        assert!(matches!(
            k.open("ca-key", "garbage"),
            Err(SealError::Format { .. })
        ));
        let e = SealKey::parse("abc", "FAILBACK_CA_SECRET")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("FAILBACK_CA_SECRET") && e.contains("3 characters"),
            "{e}"
        );
    }
}
