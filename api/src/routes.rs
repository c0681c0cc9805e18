//! Every route of the DR-service HTTP API, used by the service's router (the constants, with
//! axum's `{id}` parameters) and by [`crate::client`] (the functions, which fill them in).
//!
//! - `POST` [`AGENT_ENROLL`] (agent token in the body) [`AgentEnrollRequest`] ->
//!   [`AgentEnrollResponse`]
//! - `POST` [`AGENT_HEARTBEAT`] (bearer agent secret) [`AgentHeartbeat`] ->
//!   [`AgentHeartbeatResponse`]
//! - `POST` [`PAIR`] [`PairRequest`] -> [`PairAnswer`]
//! - `POST` [`CLIENT_HEARTBEAT`] (bearer client secret) [`ClientReport`] ->
//!   [`ClientCommandResponse`]
//! - `POST` [`CLIENT_LOG`] (bearer client secret, text body) -> [`LogUploadResponse`]
//! - `POST` [`CLIENT_CHECKPOINT`] (bearer client secret) [`ClientCheckpoints`] -> the same;
//!   `GET` -> the last stored ([`ClientCheckpoints`], empty when none)
//! - `POST` [`CLIENT_BOOT_REPORT`] (unauthenticated) [`BootReport`] -> [`BootReportResponse`]
//! - admin (bearer: the bootstrap admin token or a credential secret; the [`Role`] each route
//!   needs in brackets): `GET` [`ADMIN_INSTANCES`], `GET` [`ADMIN_INSTANCE`] [viewer],
//!   `PUT` [`ADMIN_INSTANCE_HINTS`] [operator], `POST` [`ADMIN_TOKENS`] [operator],
//!   `POST` [`ADMIN_LAUNCH`] [operator], `POST` [`ADMIN_INSTANCE_STOP`] [operator],
//!   `GET` [`ADMIN_INSTANCE_CONFIG`] [viewer], `PUT` [`ADMIN_INSTANCE_CONFIG`] [admin],
//!   `GET` [`ADMIN_EVENTS`]`?instance=ID&after=SEQ&limit=N` [viewer],
//!   `GET` [`ADMIN_INSTANCE_LOGS`], [`ADMIN_INSTANCE_LOG`] [viewer],
//!   `GET|POST` [`ADMIN_CREDENTIALS`], `DELETE` [`ADMIN_CREDENTIAL`] [admin].
//!
//! Path parameters are not escaped here: the service refuses ids that are not ids
//! (`validate.rs`), and callers check ids they take from users first (see
//! `AdminClient::revoke_credential`).
//!
//! [`AgentEnrollRequest`]: crate::AgentEnrollRequest
//! [`AgentEnrollResponse`]: crate::AgentEnrollResponse
//! [`AgentHeartbeat`]: crate::AgentHeartbeat
//! [`AgentHeartbeatResponse`]: crate::AgentHeartbeatResponse
//! [`PairRequest`]: crate::PairRequest
//! [`PairAnswer`]: crate::PairAnswer
//! [`ClientReport`]: crate::ClientReport
//! [`ClientCommandResponse`]: crate::ClientCommandResponse
//! [`LogUploadResponse`]: crate::LogUploadResponse
//! [`BootReport`]: crate::BootReport
//! [`BootReportResponse`]: crate::BootReportResponse
//! [`Role`]: crate::Role

/// API version path prefix; bump on an incompatible change.
pub const PREFIX: &str = "/v1";

pub const HEALTH: &str = "/v1/health";
pub const AGENT_ENROLL: &str = "/v1/agent/enroll";
pub const AGENT_HEARTBEAT: &str = "/v1/agent/heartbeat";
pub const PAIR: &str = "/v1/pair";
pub const CLIENT_HEARTBEAT: &str = "/v1/client/heartbeat";
pub const CLIENT_LOG: &str = "/v1/client/log";
pub const CLIENT_CHECKPOINT: &str = "/v1/client/checkpoint";
pub const CLIENT_BOOT_REPORT: &str = "/v1/client/boot-report";
pub const ADMIN_INSTANCES: &str = "/v1/admin/instances";
/// Prefix of every per-instance admin route (the id follows).
pub const ADMIN_INSTANCES_PREFIX: &str = "/v1/admin/instances/";
pub const ADMIN_INSTANCE: &str = "/v1/admin/instances/{id}";
pub const ADMIN_INSTANCE_HINTS: &str = "/v1/admin/instances/{id}/hints";
pub const ADMIN_INSTANCE_STOP: &str = "/v1/admin/instances/{id}/stop";
pub const ADMIN_INSTANCE_CONFIG: &str = "/v1/admin/instances/{id}/config";
pub const ADMIN_INSTANCE_LOGS: &str = "/v1/admin/instances/{id}/logs";
pub const ADMIN_INSTANCE_LOG: &str = "/v1/admin/instances/{id}/logs/{name}";
pub const ADMIN_TOKENS: &str = "/v1/admin/tokens";
pub const ADMIN_LAUNCH: &str = "/v1/admin/launch";
pub const ADMIN_EVENTS: &str = "/v1/admin/events";
pub const ADMIN_CREDENTIALS: &str = "/v1/admin/credentials";
pub const ADMIN_CREDENTIAL: &str = "/v1/admin/credentials/{id}";

/// `pattern` with its `{id}` filled in.
fn with_id(pattern: &str, id: &str) -> String {
    pattern.replace("{id}", id)
}

/// [`ADMIN_INSTANCE`] of `id`.
pub fn instance(id: &str) -> String {
    with_id(ADMIN_INSTANCE, id)
}

/// [`ADMIN_INSTANCE_HINTS`] of `id`.
pub fn instance_hints(id: &str) -> String {
    with_id(ADMIN_INSTANCE_HINTS, id)
}

/// [`ADMIN_INSTANCE_STOP`] of `id`.
pub fn instance_stop(id: &str) -> String {
    with_id(ADMIN_INSTANCE_STOP, id)
}

/// [`ADMIN_INSTANCE_CONFIG`] of `id`.
pub fn instance_config(id: &str) -> String {
    with_id(ADMIN_INSTANCE_CONFIG, id)
}

/// [`ADMIN_INSTANCE_LOGS`] of `id`.
pub fn instance_logs(id: &str) -> String {
    with_id(ADMIN_INSTANCE_LOGS, id)
}

/// [`ADMIN_INSTANCE_LOG`] of `id` and log `name`.
pub fn instance_log(id: &str, name: &str) -> String {
    with_id(ADMIN_INSTANCE_LOG, id).replace("{name}", name)
}

/// [`ADMIN_CREDENTIAL`] of `id`.
pub fn credential(id: &str) -> String {
    with_id(ADMIN_CREDENTIAL, id)
}

/// [`ADMIN_EVENTS`] with its query: events after `after` (sequence number), at most `limit`,
/// of one instance or all.
pub fn events(instance: Option<&str>, after: u64, limit: u64) -> String {
    let mut path = format!("{ADMIN_EVENTS}?after={after}&limit={limit}");
    if let Some(i) = instance {
        path.push_str(&format!("&instance={i}"));
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every route is under the API prefix, and the per-instance ones under theirs: the
    /// service's body limits and parameter checks match on these prefixes.
    #[test]
    fn routes_are_under_their_prefixes() {
        for r in [
            HEALTH,
            AGENT_ENROLL,
            AGENT_HEARTBEAT,
            PAIR,
            CLIENT_HEARTBEAT,
            CLIENT_LOG,
            CLIENT_CHECKPOINT,
            CLIENT_BOOT_REPORT,
            ADMIN_INSTANCES,
            ADMIN_TOKENS,
            ADMIN_LAUNCH,
            ADMIN_EVENTS,
            ADMIN_CREDENTIALS,
            ADMIN_CREDENTIAL,
        ] {
            assert!(r.starts_with(&format!("{PREFIX}/")), "{r}");
        }
        for r in [
            ADMIN_INSTANCE,
            ADMIN_INSTANCE_HINTS,
            ADMIN_INSTANCE_STOP,
            ADMIN_INSTANCE_CONFIG,
            ADMIN_INSTANCE_LOGS,
            ADMIN_INSTANCE_LOG,
        ] {
            assert!(r.starts_with(ADMIN_INSTANCES_PREFIX), "{r}");
            assert!(r.starts_with(&format!("{ADMIN_INSTANCES}/")), "{r}");
        }
    }

    #[test]
    fn functions_fill_the_patterns() {
        let id = "i-0123456789abcdef";
        assert_eq!(instance(id), "/v1/admin/instances/i-0123456789abcdef");
        assert_eq!(
            instance_config(id),
            "/v1/admin/instances/i-0123456789abcdef/config"
        );
        assert_eq!(
            instance_log(id, "client-1.log"),
            "/v1/admin/instances/i-0123456789abcdef/logs/client-1.log"
        );
        assert_eq!(
            credential("cred-0123456789abcdef"),
            "/v1/admin/credentials/cred-0123456789abcdef"
        );
        assert_eq!(events(None, 3, 10), "/v1/admin/events?after=3&limit=10");
        assert_eq!(
            events(Some(id), 0, 1),
            "/v1/admin/events?after=0&limit=1&instance=i-0123456789abcdef"
        );
        for f in [instance, instance_hints, instance_stop, instance_logs] {
            assert!(!f(id).contains('{'), "{}", f(id));
        }
    }
}
