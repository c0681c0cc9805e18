//! Boot reports: failures a client hit before it held a client secret (pairing refused,
//! mapped disk unusable, ...), posted without authentication so that the admin sees the
//! cause in the event log. Because anyone can post one, a report is only *filed under* a
//! recovery instance when it names a pairing token the service issued (used or expired ones
//! included: that is the usual failure) or a BIOS UUID that matches exactly one instance;
//! anything else becomes an unattributed event marked as unverified, without its log.
//! Sizes are capped and reports are rate-limited, so a flood can neither fill the disk nor
//! bury the event log, nor silence a genuine appliance: a report naming a pairing token the
//! service issued counts only against that token's own budget; every other report (no token,
//! an unknown token, a BIOS UUID only) counts against its source address's budget and the
//! shared budget of unverified reports.

use std::collections::HashMap;
use std::net::IpAddr;

use failback_api::{
    normalize_uuid, tail_bytes, BootReport, BootReportResponse, TokenKind, BOOT_REPORT_MAX_LOG,
    BOOT_REPORT_MAX_MESSAGE,
};

use super::{ApiFailure, Service, R};
use crate::store::Batch;
use crate::util::{now_secs, random_hex, secret_hash};

/// Reports accepted per key (issued pairing token, or BIOS UUID) and per minute.
const PER_KEY_PER_MINUTE: u32 = 6;
/// Unverified reports accepted per source address (IPv6: /64) and per minute.
const PER_SOURCE_PER_MINUTE: u32 = 10;
/// Unverified reports accepted per minute from all sources together.
const UNVERIFIED_PER_MINUTE: u32 = 60;
/// Keys (and sources) remembered per minute.
const MAX_KEYS: usize = 10_000;

/// One counter per key in fixed one-minute windows.
#[derive(Debug)]
struct Window<K> {
    counts: HashMap<K, u32>,
}

impl<K> Default for Window<K> {
    fn default() -> Self {
        Window {
            counts: HashMap::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone> Window<K> {
    fn full(&self, key: &K, max: u32) -> bool {
        match self.counts.get(key) {
            Some(n) => *n >= max,
            None => self.counts.len() >= MAX_KEYS,
        }
    }
    fn count(&mut self, key: &K) {
        *self.counts.entry(key.clone()).or_insert(0) += 1;
    }
}

/// Which budget refused a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    Key,
    Source,
    Unverified,
}

/// Fixed one-minute windows; enough to stop a loop or a flood, no persistence needed.
#[derive(Debug, Default)]
pub(super) struct Limiter {
    minute: u64,
    unverified: u32,
    per_source: Window<IpAddr>,
    per_key: Window<String>,
}

impl Limiter {
    fn roll(&mut self, now: u64) {
        let minute = now / 60;
        if minute != self.minute {
            *self = Limiter {
                minute,
                ..Limiter::default()
            };
        }
    }

    /// Counts one report naming an issued pairing token (its hash is `key`).
    fn admit_known(&mut self, key: &str, now: u64) -> Result<(), Refused> {
        self.roll(now);
        let key = key.to_string();
        if self.per_key.full(&key, PER_KEY_PER_MINUTE) {
            return Err(Refused::Key);
        }
        self.per_key.count(&key);
        Ok(())
    }

    /// Counts one unverified report from `source`, keyed by its BIOS UUID if it has one.
    fn admit_unverified(
        &mut self,
        source: Option<IpAddr>,
        uuid: Option<&str>,
        now: u64,
    ) -> Result<(), Refused> {
        self.roll(now);
        let uuid = uuid.map(str::to_string);
        if self.unverified >= UNVERIFIED_PER_MINUTE {
            return Err(Refused::Unverified);
        }
        if let Some(s) = &source {
            if self.per_source.full(s, PER_SOURCE_PER_MINUTE) {
                return Err(Refused::Source);
            }
        }
        if let Some(u) = &uuid {
            if self.per_key.full(u, PER_KEY_PER_MINUTE) {
                return Err(Refused::Key);
            }
        }
        self.unverified += 1;
        source.iter().for_each(|s| self.per_source.count(s));
        uuid.iter().for_each(|u| self.per_key.count(u));
        Ok(())
    }
}

fn rate_limited(r: Refused) -> ApiFailure {
    ApiFailure::RateLimited(match r {
        Refused::Key => format!(
            "too many boot reports for this pairing token or BIOS UUID (at most {PER_KEY_PER_MINUTE} per minute); try again later"
        ),
        Refused::Source => format!(
            "too many unverified boot reports from this address (at most {PER_SOURCE_PER_MINUTE} per minute); try again later"
        ),
        Refused::Unverified => format!(
            "too many unverified boot reports (at most {UNVERIFIED_PER_MINUTE} per minute in all); reports naming an issued pairing token are still accepted"
        ),
    })
}

/// Control characters would let a report forge lines in `failback events` output.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn check(req: &BootReport) -> R<()> {
    let stage_ok = !req.stage.is_empty()
        && req.stage.len() <= 32
        && req
            .stage
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'-');
    if !stage_ok {
        return Err(ApiFailure::bad(
            "stage",
            format!(
                "field stage: {:?} is not a lowercase word of at most 32 letters",
                tail_bytes(&req.stage, 40)
            ),
        ));
    }
    if req.message.trim().is_empty() {
        return Err(ApiFailure::bad("message", "field message: empty"));
    }
    if req.message.len() > BOOT_REPORT_MAX_MESSAGE {
        return Err(ApiFailure::bad(
            "message",
            format!(
                "field message: {} bytes, at most {BOOT_REPORT_MAX_MESSAGE}",
                req.message.len()
            ),
        ));
    }
    if let Some(l) = &req.log {
        if l.len() > BOOT_REPORT_MAX_LOG {
            return Err(ApiFailure::bad(
                "log",
                format!(
                    "field log: {} bytes, at most {BOOT_REPORT_MAX_LOG}",
                    l.len()
                ),
            ));
        }
    }
    Ok(())
}

impl Service {
    /// Files a boot report as a `CLIENT_BOOT_FAILED` event (and its log, when attributed).
    pub fn boot_report(&self, req: BootReport) -> R<BootReportResponse> {
        self.boot_report_from(req, None)
    }

    /// [`Service::boot_report`] from a source address (its rate budget; see the module doc).
    pub fn boot_report_from(
        &self,
        req: BootReport,
        source: Option<IpAddr>,
    ) -> R<BootReportResponse> {
        check(&req)?;
        let now = now_secs();
        let token_hash = req
            .token
            .as_deref()
            .filter(|t| !t.trim().is_empty())
            .map(|t| secret_hash(t.trim()));
        let uuid = req.smbios_uuid.as_deref().map(normalize_uuid);
        // An indexed look-up, before any budget: only an issued token is exempt from the
        // budgets of unverified reports.
        let token = match &token_hash {
            Some(h) => self
                .store
                .token(h)?
                .filter(|t| t.kind == TokenKind::Pairing),
            None => None,
        };
        {
            let mut l = self.boot_limits.lock().unwrap_or_else(|p| p.into_inner());
            match (&token, &token_hash) {
                (Some(_), Some(h)) => l.admit_known(h, now),
                _ => l.admit_unverified(source.map(crate::conn::source), uuid.as_deref(), now),
            }
            .map_err(rate_limited)?;
        }
        // Attribution: a token we issued (its scope, or the instance the client asked for if
        // the token was auto-match), else a BIOS UUID matching exactly one instance.
        let mut instance = None;
        let mut via = "";
        if let Some(t) = &token {
            instance = match (&t.instance_id, &req.recovery_instance_id) {
                (Some(scope), _) => Some(scope.clone()),
                (None, Some(asked)) => self.store.instance(asked)?.map(|i| i.recovery_instance_id),
                (None, None) => None,
            };
            via = "pairing token";
        }
        if instance.is_none() {
            if let Some(u) = &uuid {
                if let [one] = self.instances_with_bios_uuid(u)?.as_slice() {
                    instance = Some(one.recovery_instance_id.clone());
                    via = "BIOS UUID";
                }
            }
        }
        let mut message = format!("{}: {}", req.stage, clean(req.message.trim()));
        match &instance {
            Some(_) => message.push_str(&format!(" (reported by the client, matched by {via}")),
            None => message.push_str(&format!(
                " (unverified report: {}",
                if token_hash.is_some() {
                    "token not issued by this service"
                } else {
                    "no token"
                }
            )),
        }
        if let Some(u) = &uuid {
            message.push_str(&format!(", SMBIOS UUID {}", clean(tail_bytes(u, 64))));
        }
        message.push(')');

        let mut stored_as = None;
        if let (Some(id), Some(log)) = (&instance, &req.log) {
            let dir = self.settings.log_dir.join(id);
            std::fs::create_dir_all(&dir)
                .map_err(|e| ApiFailure::Internal(format!("creating {}: {e}", dir.display())))?;
            let name = format!("boot-{now}-{}.log", random_hex(3));
            let path = dir.join(&name);
            std::fs::write(&path, log)
                .map_err(|e| ApiFailure::Internal(format!("writing {}: {e}", path.display())))?;
            message.push_str(&format!("; console log {name}"));
            stored_as = Some(name);
        }
        let mut b = Batch::by("anonymous");
        b.event(now, instance.as_deref(), "CLIENT_BOOT_FAILED", message);
        self.store.apply(b)?;
        Ok(BootReportResponse {
            recovery_instance_id: instance,
            stored_as,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_caps_per_key_source_and_unverified_and_resets_each_minute() {
        let mut l = Limiter::default();
        let t = 6000;
        for _ in 0..PER_KEY_PER_MINUTE {
            assert!(l.admit_known("a", t).is_ok());
        }
        assert_eq!(l.admit_known("a", t + 1), Err(Refused::Key));
        assert!(l.admit_known("b", t + 1).is_ok());
        assert!(
            l.admit_known("a", t + 60).is_ok(),
            "a new minute starts afresh"
        );
        let ip = |i: u32| Some(IpAddr::from(i.to_be_bytes()));
        for _ in 0..PER_SOURCE_PER_MINUTE {
            assert!(l.admit_unverified(ip(1), None, t + 60).is_ok());
        }
        assert_eq!(
            l.admit_unverified(ip(1), None, t + 60),
            Err(Refused::Source)
        );
        for i in 0..UNVERIFIED_PER_MINUTE - PER_SOURCE_PER_MINUTE {
            assert!(l.admit_unverified(ip(100 + i), None, t + 60).is_ok());
        }
        assert_eq!(
            l.admit_unverified(ip(9), None, t + 60),
            Err(Refused::Unverified)
        );
        assert!(
            l.admit_known("c", t + 60).is_ok(),
            "an issued token is not silenced by the unverified flood"
        );
    }

    #[test]
    fn control_characters_cannot_forge_lines() {
        assert_eq!(clean("a\nb\r\x1b[2Jc"), "a b  [2Jc");
    }
}
