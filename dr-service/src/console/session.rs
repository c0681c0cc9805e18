//! Console login sessions, in memory: a random 128-bit id in a cookie, stored only as its
//! SHA-256, with a fixed lifetime and a CSRF token of its own. The credential is checked
//! again on every request (a revoked credential ends its sessions at once); a restart of
//! the service ends every session (people log in again).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::util::{random_hex, secret_hash};

/// Cookie that carries the session id.
pub const COOKIE: &str = "fbconsole";
/// Sessions kept at most; the oldest is dropped past this (bounded memory).
const MAX_SESSIONS: usize = 10_000;

#[derive(Debug, Clone)]
pub struct Session {
    /// SHA-256 of the credential (or bootstrap token) used to log in.
    pub secret_hash: String,
    /// Sent back in every form; compared with the form's `csrf` field.
    pub csrf: String,
    pub expires_at: u64,
}

#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    /// Starts a session; returns the cookie value (the only copy of the id).
    pub fn create(&self, secret_hash: String, now: u64, ttl: u64) -> String {
        let id = random_hex(16);
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, s| s.expires_at > now);
        if m.len() >= MAX_SESSIONS {
            if let Some(k) = m
                .iter()
                .min_by_key(|(_, s)| s.expires_at)
                .map(|(k, _)| k.clone())
            {
                m.remove(&k);
            }
        }
        m.insert(
            secret_hash_of(&id),
            Session {
                secret_hash,
                csrf: random_hex(16),
                expires_at: now + ttl,
            },
        );
        id
    }

    /// The live session of this cookie value; an expired one is removed.
    pub fn get(&self, id: &str, now: u64) -> Option<Session> {
        let key = secret_hash_of(id);
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match m.get(&key) {
            Some(s) if s.expires_at > now => Some(s.clone()),
            Some(_) => {
                m.remove(&key);
                None
            }
            None => None,
        }
    }

    pub fn remove(&self, id: &str) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(&secret_hash_of(id));
    }
}

fn secret_hash_of(id: &str) -> String {
    secret_hash(id)
}

/// The `Set-Cookie` value that starts a session of `ttl` seconds.
pub fn set_cookie(id: &str, ttl: u64) -> String {
    let ttl = i64::try_from(ttl).unwrap_or(i64::MAX);
    cookie::Cookie::build((COOKIE, id.to_string()))
        .path("/console")
        .secure(true)
        .http_only(true)
        .same_site(cookie::SameSite::Strict)
        .max_age(cookie::time::Duration::seconds(ttl))
        .build()
        .to_string()
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie() -> String {
    cookie::Cookie::build((COOKIE, ""))
        .path("/console")
        .secure(true)
        .http_only(true)
        .same_site(cookie::SameSite::Strict)
        .max_age(cookie::time::Duration::ZERO)
        .build()
        .to_string()
}

/// The session id from a `Cookie` header, if any.
pub fn cookie_value(header: &str) -> Option<String> {
    cookie::Cookie::split_parse(header)
        .flatten()
        .find(|c| c.name() == COOKIE)
        .map(|c| c.value().to_string())
        .filter(|v| v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_and_cookies_are_strict() {
        let s = Sessions::default();
        let id = s.create("h".into(), 100, 10);
        assert_eq!(s.get(&id, 105).unwrap().secret_hash, "h");
        assert!(s.get(&id, 110).is_none(), "expired at 110");
        assert!(s.get(&id, 105).is_none(), "removed once expired");
        let c = set_cookie(&id, 60);
        for part in [
            "Secure",
            "HttpOnly",
            "SameSite=Strict",
            "Max-Age=60",
            "Path=/console",
        ] {
            assert!(c.contains(part), "{c}");
        }
        assert_eq!(
            cookie_value(&format!("a=b; {COOKIE}={id}")).as_deref(),
            Some(id.as_str())
        );
        assert_eq!(cookie_value(&format!("{COOKIE}=../x")), None);
    }
}
