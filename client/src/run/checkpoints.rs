//! Resume points at the DR service, for an appliance reboot in the middle of a round: after a
//! round is interrupted the client flushes its targets and stores one checkpoint per disk
//! (`POST /v1/client/checkpoint`); when it starts it fetches them and resumes each disk whose
//! checkpoint still matches its local target ([`failback_replication::checkpoint`]). A
//! finished round clears them. Everything is best effort: a failure only costs a restart of
//! the disk at byte 0, and says so.

use std::sync::Arc;

use failback_api::{routes, ClientCheckpoints};
use failback_replication::checkpoint::Checkpoint;
use failback_replication::{HashCache, Mapping};

use super::{Api, ApiErr, Console};

impl Api {
    async fn checkpoints(&self, secret: &str) -> Result<ClientCheckpoints, ApiErr> {
        Ok(self.svc.get(routes::CLIENT_CHECKPOINT, secret).await?)
    }

    async fn put_checkpoints(&self, secret: &str, c: &ClientCheckpoints) -> Result<(), ApiErr> {
        let _: ClientCheckpoints = self
            .post(routes::CLIENT_CHECKPOINT, Some(secret), c)
            .await?;
        Ok(())
    }
}

fn err_text(e: &ApiErr) -> String {
    match e {
        ApiErr::Transient(m) => m.clone(),
        ApiErr::Refused(s, m) => format!("HTTP {s}: {m}"),
    }
}

/// Fetches the stored checkpoints and restores those of mapped disks that still match their
/// targets; logs each decision on the console. Returns whether any were stored.
pub(super) async fn restore(
    api: &Api,
    secret: &str,
    cache: &Arc<HashCache>,
    mappings: &[Mapping],
    console: &Console,
) -> bool {
    let stored = match api.checkpoints(secret).await {
        Ok(c) => c,
        Err(e) => {
            console.say(format!(
                "checkpoints not fetched ({}); disks start at 0",
                err_text(&e)
            ));
            return false;
        }
    };
    let any = !stored.disks.is_empty();
    for d in stored.disks {
        let cp: Checkpoint = match serde_json::to_value(&d).and_then(serde_json::from_value) {
            Ok(cp) => cp,
            Err(e) => {
                console.say(format!(
                    "checkpoint of {} unreadable ({e}); starting at 0",
                    d.remote
                ));
                continue;
            }
        };
        if !mappings
            .iter()
            .any(|m| m.remote == cp.remote && m.local == cp.local)
        {
            console.say(format!(
                "checkpoint of {} -> {} is for another mapping; starting at 0",
                cp.remote,
                cp.local.display()
            ));
            continue;
        }
        let c = cache.clone();
        let cp2 = cp.clone();
        let checked = tokio::task::spawn_blocking(move || c.restore(&cp2))
            .await
            .unwrap_or_else(|e| Err(format!("check task: {e}")));
        match checked {
            Ok(()) => console.say(format!(
                "disk {} -> {}: resuming at byte {} (checkpoint; sampled blocks match)",
                cp.remote,
                cp.local.display(),
                cp.offset
            )),
            Err(why) => console.say(format!(
                "disk {} -> {}: checkpoint not used, starting at 0: {why}",
                cp.remote,
                cp.local.display()
            )),
        }
    }
    any
}

/// Flushes the targets of the interrupted rounds and stores their checkpoints (an empty list
/// clears them). Returns whether any are stored now.
pub(super) async fn store(
    api: &Api,
    secret: &str,
    cache: &Arc<HashCache>,
    console: &Console,
) -> bool {
    let c = cache.clone();
    let cps = tokio::task::spawn_blocking(move || {
        c.checkpoints(failback_replication::client::WINDOW_BYTES)
    })
    .await
    .unwrap_or_default();
    let disks = cps
        .iter()
        .filter_map(|cp| {
            serde_json::to_value(cp)
                .and_then(serde_json::from_value::<failback_api::DiskCheckpoint>)
                .ok()
        })
        .collect::<Vec<_>>();
    let body = ClientCheckpoints { disks };
    match api.put_checkpoints(secret, &body).await {
        Ok(()) => {
            // Said after the service has them: from here on a reboot resumes (tests wait for it).
            for d in &body.disks {
                console.say(format!(
                    "disk {} -> {}: checkpoint at byte {} stored at the DR service",
                    d.remote, d.local, d.offset
                ));
            }
            !body.disks.is_empty()
        }
        Err(e) => {
            console.say(format!(
                "checkpoints not stored at the DR service: {}",
                err_text(&e)
            ));
            !body.disks.is_empty()
        }
    }
}
