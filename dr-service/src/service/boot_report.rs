//! Boot reports: failures a client hit before it held a client secret (pairing refused,
//! mapped disk unusable, ...), posted without authentication so that the admin sees the
//! cause in the event log. Because anyone can post one, a report is only *filed under* a
//! recovery instance when it names a pairing token the service issued (used or expired ones
//! included: that is the usual failure) or a BIOS UUID that matches exactly one instance;
//! anything else becomes an unattributed event marked as unverified, without its log.
//! Sizes are capped and reports are rate-limited per key and overall, so a flood can neither
//! fill the disk nor bury the event log.

use std::collections::HashMap;

use failback_config::api::{
    normalize_uuid, tail_bytes, BootReport, BootReportResponse, TokenKind, BOOT_REPORT_MAX_LOG,
    BOOT_REPORT_MAX_MESSAGE,
};

use super::{ApiFailure, Service, R};
use crate::store::Batch;
use crate::util::{now_secs, random_hex, secret_hash};

/// Reports accepted per key (token or UUID) and per minute.
const PER_KEY_PER_MINUTE: u32 = 6;
/// Reports accepted per minute over all keys.
const TOTAL_PER_MINUTE: u32 = 60;
/// Keys remembered before old windows are dropped.
const MAX_KEYS: usize = 10_000;

/// Fixed one-minute windows; enough to stop a loop or a flood, no persistence needed.
#[derive(Debug, Default)]
pub(super) struct Limiter {
    minute: u64,
    total: u32,
    per_key: HashMap<String, u32>,
}

impl Limiter {
    /// Counts one report for `key` at `now`; false when over a limit.
    fn admit(&mut self, key: &str, now: u64) -> bool {
        let minute = now / 60;
        if minute != self.minute {
            self.minute = minute;
            self.total = 0;
            self.per_key.clear();
        }
        if self.total >= TOTAL_PER_MINUTE {
            return false;
        }
        if self.per_key.len() >= MAX_KEYS && !self.per_key.contains_key(key) {
            return false;
        }
        let n = self.per_key.entry(key.to_string()).or_insert(0);
        if *n >= PER_KEY_PER_MINUTE {
            return false;
        }
        *n += 1;
        self.total += 1;
        true
    }
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
        check(&req)?;
        let now = now_secs();
        let token_hash = req
            .token
            .as_deref()
            .filter(|t| !t.trim().is_empty())
            .map(|t| secret_hash(t.trim()));
        let uuid = req.smbios_uuid.as_deref().map(normalize_uuid);
        let key = token_hash
            .clone()
            .or_else(|| uuid.clone())
            .unwrap_or_else(|| "anonymous".into());
        {
            let mut l = self.boot_limits.lock().unwrap_or_else(|p| p.into_inner());
            if !l.admit(&key, now) {
                return Err(ApiFailure::RateLimited(format!(
                    "too many boot reports (at most {PER_KEY_PER_MINUTE} per token or UUID and {TOTAL_PER_MINUTE} in all per minute); try again later"
                )));
            }
        }
        let _g = self.guard();
        // Attribution: a token we issued (its scope, or the instance the client asked for if
        // the token was auto-match), else a BIOS UUID matching exactly one instance.
        let token = match &token_hash {
            Some(h) => self
                .store
                .token(h)?
                .filter(|t| t.kind == TokenKind::Pairing),
            None => None,
        };
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
    fn limiter_caps_per_key_and_in_all_and_resets_each_minute() {
        let mut l = Limiter::default();
        let t = 6000;
        for _ in 0..PER_KEY_PER_MINUTE {
            assert!(l.admit("a", t));
        }
        assert!(!l.admit("a", t + 1));
        assert!(l.admit("b", t + 1));
        assert!(l.admit("a", t + 60), "a new minute starts afresh");
        let mut l = Limiter::default();
        for i in 0..TOTAL_PER_MINUTE {
            assert!(l.admit(&format!("k{i}"), t));
        }
        assert!(!l.admit("fresh", t));
    }

    #[test]
    fn control_characters_cannot_forge_lines() {
        assert_eq!(clean("a\nb\r\x1b[2Jc"), "a b  [2Jc");
    }
}
