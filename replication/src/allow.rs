//! Which client certificates an agent serves right now: revocation the agent learns from the
//! DR service.
//!
//! A client certificate that passed the TLS checks (pinned CA, client role, this agent's
//! instance) is served only while its SHA-256 fingerprint is on the list the DR service
//! returns with every agent heartbeat: the certificate of the instance's current pairing, and
//! none after a stop, a new pairing or completion. When the list changes, connections of
//! certificates no longer on it are closed. A fingerprint the agent has not heard of (a
//! pairing newer than its last heartbeat) makes it ask the service at once and wait briefly
//! for the answer, so a fresh client is never refused for being faster than the heartbeat.
//!
//! An agent started with certificates by hand (no DR service) has no list: it serves every
//! client certificate the TLS checks accept.

use std::collections::HashSet;
use std::time::Duration;

use tokio::sync::{watch, Notify};

/// How long an unknown client waits for the service's answer before it is refused.
pub const REFRESH_WAIT: Duration = Duration::from_secs(10);

/// The fingerprints an agent currently serves, updated from DR-service heartbeats.
#[derive(Debug)]
pub struct ClientAllowlist {
    /// `None` until the service first answered; then the allowed fingerprints (hex SHA-256).
    allowed: watch::Sender<Option<HashSet<String>>>,
    /// Woken when a connection presents a fingerprint not on the list.
    refresh: Notify,
}

impl Default for ClientAllowlist {
    fn default() -> Self {
        ClientAllowlist {
            allowed: watch::channel(None).0,
            refresh: Notify::new(),
        }
    }
}

impl ClientAllowlist {
    /// Replaces the list (from a heartbeat answer). Connections whose certificate is not on
    /// the new list are closed by their session.
    pub fn set(&self, fingerprints: impl IntoIterator<Item = String>) {
        let set: HashSet<String> = fingerprints
            .into_iter()
            .map(|f| f.to_ascii_lowercase())
            .collect();
        self.allowed.send_replace(Some(set));
    }

    /// Resolves when a connection asks for a fresh list (the heartbeat task waits on it).
    pub async fn refresh_requested(&self) {
        self.refresh.notified().await;
    }

    fn allows(&self, fingerprint: &str) -> Option<bool> {
        self.allowed
            .borrow()
            .as_ref()
            .map(|s| s.contains(fingerprint))
    }

    /// Whether the certificate with `fingerprint` (hex SHA-256) may be served. Asks the
    /// service for a fresh list and waits up to `wait` when it is not on the current one.
    pub async fn admit(&self, fingerprint: &str, wait: Duration) -> Result<(), String> {
        if self.allows(fingerprint) == Some(true) {
            return Ok(());
        }
        let mut rx = self.allowed.subscribe();
        rx.mark_unchanged();
        self.refresh.notify_one();
        let deadline = tokio::time::Instant::now() + wait;
        while tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_ok_and(|r| r.is_ok())
        {
            if self.allows(fingerprint) == Some(true) {
                return Ok(());
            }
        }
        Err(match self.allows(fingerprint) {
            None => format!(
                "the DR service has not answered this agent yet (waited {} s); client \
                 certificate sha256:{fingerprint} cannot be checked",
                wait.as_secs()
            ),
            Some(_) => format!(
                "client certificate sha256:{fingerprint} is not (or no longer) allowed by the \
                 DR service: its pairing was stopped, replaced by a new pairing, or completed"
            ),
        })
    }

    /// Resolves once `fingerprint` is no longer allowed (never while it is).
    pub async fn revoked(&self, fingerprint: &str) {
        let mut rx = self.allowed.subscribe();
        loop {
            if self.allows(fingerprint) == Some(false) {
                return;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn unknown_fingerprint_waits_for_a_refresh() {
        let list = Arc::new(ClientAllowlist::default());
        list.set(["aa".to_string()]);
        assert!(list.admit("aa", Duration::ZERO).await.is_ok());
        let l2 = list.clone();
        let refresher = tokio::spawn(async move {
            l2.refresh_requested().await;
            l2.set(["aa".to_string(), "bb".to_string()]);
        });
        assert!(list.admit("bb", Duration::from_secs(5)).await.is_ok());
        refresher.await.unwrap();
        let e = list
            .admit("cc", Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(e.contains("no longer"), "{e}");
    }

    #[tokio::test]
    async fn revocation_wakes_the_session() {
        let list = Arc::new(ClientAllowlist::default());
        list.set(["aa".to_string()]);
        let l2 = list.clone();
        let waiter = tokio::spawn(async move { l2.revoked("aa").await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        list.set(Vec::<String>::new());
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("revocation noticed")
            .unwrap();
    }
}
