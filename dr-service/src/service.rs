//! The service logic: tokens, agent enrollment, pairing, the failback state machine, the
//! heartbeat monitor and the admin operations. Transport-free (the HTTP layer in `http.rs`
//! only parses, authenticates the bearer and maps [`ApiFailure`] to a status), so it is tested
//! directly and the bench measures the real request path.
//!
//! Every operation runs under one lock and writes its whole effect in one [`Batch`]: a
//! refused request stores nothing, concurrent heartbeats never lose an update. Events are
//! derived by diffing the instance before and after, so every transition is logged.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use failback_api::{self as api, *};

use crate::ca::{Ca, CaError};
use crate::mapping::{self, MappingError};
use crate::store::{AgentRecord, Batch, ClientRecord, Store, StoreError, TokenRecord};
use crate::util::{new_instance_id, now_secs, random_hex, secret_hash};

mod access;
mod boot_report;
mod credentials;
pub mod state;
mod tokens;

use state::{set_failback, set_replication};

pub use credentials::{Caller, BOOTSTRAP_ADMIN};
pub use tokens::TokenView;

/// Tunables (defaults suit production; tests shorten the intervals).
#[derive(Debug, Clone)]
pub struct Settings {
    pub heartbeat_secs: u64,
    /// An agent not heard from for this long raises `AGENT_NOT_SEEN` (-> `DISCONNECTED`).
    pub agent_timeout_secs: u64,
    /// A client not heard from for this long raises `FAILBACK_CLIENT_NOT_SEEN`.
    pub client_timeout_secs: u64,
    /// Sync block size handed to clients.
    pub block_size: u64,
    pub default_token_ttl_secs: u64,
    /// Where uploaded client logs go.
    pub log_dir: PathBuf,
    /// Web console: a login session ends this long after it began.
    pub console_session_secs: u64,
    /// Web console: seconds between two samples of progress and state counts (charts).
    pub console_sample_secs: u64,
    /// Launches re-read and re-hash both sides unless the request says otherwise
    /// (`--launch-verify full`).
    pub launch_verify_full: bool,
    /// Compression clients ask of their agents (`--compression`).
    pub compression: CompressionMode,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            heartbeat_secs: 10,
            agent_timeout_secs: 60,
            client_timeout_secs: 60,
            block_size: 64 << 10,
            default_token_ttl_secs: 3600,
            log_dir: PathBuf::from("logs"),
            console_session_secs: 8 * 3600,
            console_sample_secs: 30,
            launch_verify_full: false,
            compression: CompressionMode::Auto,
        }
    }
}

/// Why a request failed; the HTTP layer maps each to a status and an [`ApiError`] body.
#[derive(Debug, thiserror::Error)]
pub enum ApiFailure {
    #[error("{message}")]
    BadRequest { field: String, message: String },
    #[error("{0}")]
    Unauthorized(String),
    /// Authenticated, but the credential's role is below what the route needs (403).
    #[error("{0}")]
    Forbidden(String),
    /// A pairing or agent token was refused (`TOKEN_INVALID`, `TOKEN_USED`, `TOKEN_EXPIRED`,
    /// `TOKEN_SCOPE`, `TOKEN_KIND`).
    #[error("{message}")]
    Token { code: &'static str, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("certificate authority: {0}")]
    Ca(#[from] CaError),
    #[error("{0}")]
    Internal(String),
    /// Too many unauthenticated boot reports (429).
    #[error("{0}")]
    RateLimited(String),
}

impl ApiFailure {
    pub fn bad(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiFailure::BadRequest {
            field: field.into(),
            message: message.into(),
        }
    }
}

type R<T> = Result<T, ApiFailure>;

pub struct Service {
    store: Arc<dyn Store>,
    ca: Ca,
    settings: Settings,
    /// Whether this replica held the periodic-work lease at the last tick (for logging).
    lease_held: std::sync::atomic::AtomicBool,
    /// Rate limit of unauthenticated boot reports (in memory, per replica).
    boot_limits: Mutex<boot_report::Limiter>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Service({:?})", self.settings)
    }
}

/// Attempts of a request whose writes conflicted with a concurrent one.
const MAX_ATTEMPTS: u64 = 16;
const MAX_TTL: u64 = 30 * 24 * 3600;
const BACKLOG_THRESHOLD: u64 = 64 << 20;

fn new_instance(id: &str, now: u64) -> RecoveryInstance {
    RecoveryInstance {
        recovery_instance_id: id.to_string(),
        hostname: None,
        source_hints: IdentificationHints::default(),
        agent: AgentStatus::default(),
        failback: FailbackStatus::default(),
        config: ReplicationConfig::default(),
        created_at: now,
    }
}

/// A fresh instance (for store tests).
#[cfg(test)]
pub(crate) fn test_instance(id: &str) -> RecoveryInstance {
    new_instance(id, 1)
}

fn set_step(f: &mut FailbackStatus, name: InitiationStepName, status: StepStatus) {
    if let Some(s) = f.steps.iter_mut().find(|s| s.name == name) {
        s.status = status;
    } else {
        f.steps.push(InitiationStep { name, status });
    }
}

fn add_error(f: &mut FailbackStatus, e: ReplicationError) {
    if !f.errors.contains(&e) {
        f.errors.push(e);
    }
}

fn clear_error(f: &mut FailbackStatus, e: ReplicationError) {
    f.errors.retain(|x| *x != e);
}

/// The agent (or client) of a running failback is lost: replication is `DISCONNECTED` and
/// a launchable failback is no longer launchable.
fn lose_peer(f: &mut FailbackStatus) {
    set_replication(f, ReplicationState::Disconnected);
    if f.state == FailbackState::FailbackReadyForLaunch {
        set_failback(f, FailbackState::FailbackNotReadyForLaunch);
    }
}

fn is_running(s: FailbackState) -> bool {
    matches!(
        s,
        FailbackState::FailbackInProgress
            | FailbackState::FailbackReadyForLaunch
            | FailbackState::FailbackNotReadyForLaunch
    )
}

/// Appends an event for every visible change between `old` and `new`.
fn diff_events(old: &RecoveryInstance, new: &RecoveryInstance, now: u64, b: &mut Batch) {
    let id = Some(new.recovery_instance_id.as_str());
    let (o, n) = (&old.failback, &new.failback);
    if o.state != n.state {
        b.event(
            now,
            id,
            "FAILBACK_STATE",
            format!("{} -> {}", o.state, n.state),
        );
    }
    if o.replication_state != n.replication_state {
        b.event(
            now,
            id,
            "REPLICATION_STATE",
            format!("{} -> {}", o.replication_state, n.replication_state),
        );
    }
    for e in &n.errors {
        if !o.errors.contains(e) {
            b.event(now, id, "ERROR_RAISED", e.to_string());
        }
    }
    for e in &o.errors {
        if !n.errors.contains(e) {
            b.event(now, id, "ERROR_CLEARED", e.to_string());
        }
    }
    for s in &n.steps {
        let before = o
            .steps
            .iter()
            .find(|x| x.name == s.name)
            .map(|x| x.status)
            .unwrap_or_default();
        if before != s.status {
            b.event(
                now,
                id,
                "INITIATION_STEP",
                format!("{}: {}", s.name, s.status),
            );
        }
    }
}

fn check_token(rec: Option<TokenRecord>, kind: TokenKind, now: u64) -> R<TokenRecord> {
    let Some(t) = rec else {
        return Err(ApiFailure::Token {
            code: "TOKEN_INVALID",
            message: format!("{kind} token not recognised (field token)"),
        });
    };
    if t.kind != kind {
        return Err(ApiFailure::Token {
            code: "TOKEN_KIND",
            message: format!(
                "token is a {} token, not a {kind} token (field token)",
                t.kind
            ),
        });
    }
    if let Some(at) = t.used_at {
        return Err(ApiFailure::Token {
            code: "TOKEN_USED",
            message: format!(
                "{kind} token was already used at {at} (one-time token; create a new one)"
            ),
        });
    }
    if t.expires_at <= now {
        return Err(ApiFailure::Token {
            code: "TOKEN_EXPIRED",
            message: format!(
                "{kind} token expired at {} (create a new one)",
                t.expires_at
            ),
        });
    }
    Ok(t)
}

fn check_address(field: &str, a: &str) -> R<()> {
    let host = crate::ca::strip_port(a);
    let has_port = a
        .rsplit_once(':')
        .is_some_and(|(_, p)| !p.is_empty() && p.parse::<u16>().is_ok());
    if host.is_empty() || !has_port {
        return Err(ApiFailure::bad(
            field,
            format!("field {field}: {a:?} is not HOST:PORT"),
        ));
    }
    Ok(())
}

fn check_agent_disks(disks: &[AgentDisk], field: &str) -> R<()> {
    if disks.is_empty() {
        return Err(ApiFailure::bad(
            field,
            format!("field {field}: no disks reported"),
        ));
    }
    for (i, d) in disks.iter().enumerate() {
        if d.id.trim().is_empty() {
            let f = format!("{field}[{i}].id");
            return Err(ApiFailure::bad(&f, format!("field {f}: empty volume id")));
        }
        if d.size_bytes == 0 {
            let f = format!("{field}[{i}].size_bytes");
            return Err(ApiFailure::bad(
                &f,
                format!("field {f}: volume {} has size 0", d.id),
            ));
        }
    }
    Ok(())
}

impl Service {
    /// Recovery instances whose source server had this (normalised) VMware BIOS UUID: the
    /// auto-match of pairing and of unauthenticated boot reports.
    fn instances_with_bios_uuid(&self, uuid: &str) -> Result<Vec<RecoveryInstance>, ApiFailure> {
        Ok(self
            .store
            .instances()?
            .into_iter()
            .filter(|i| {
                i.source_hints
                    .vmware_uuid
                    .as_deref()
                    .map(normalize_uuid)
                    .as_deref()
                    == Some(uuid)
            })
            .collect())
    }

    pub fn new(store: Arc<dyn Store>, ca: Ca, settings: Settings) -> Service {
        Service {
            store,
            ca,
            settings,
            lease_held: std::sync::atomic::AtomicBool::new(false),
            boot_limits: Mutex::new(boot_report::Limiter::default()),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn ca_pem(&self) -> &str {
        self.ca.ca_pem()
    }

    /// Runs `op` again from a fresh read while the store reports a concurrent change of
    /// what it read (another request, or another replica, wrote first).
    fn retry<T>(&self, mut op: impl FnMut() -> R<T>) -> R<T> {
        let mut attempt: u64 = 0;
        loop {
            match op() {
                Err(ApiFailure::Store(e)) if e.is_conflict() && attempt < MAX_ATTEMPTS => {
                    attempt += 1;
                    tracing::debug!("retrying after {e} (attempt {attempt})");
                    let jitter = u64::from(crate::util::random_hex(1).as_bytes()[0] % 8);
                    std::thread::sleep(std::time::Duration::from_millis(attempt + jitter));
                }
                other => return other,
            }
        }
    }

    fn instance(&self, id: &str) -> R<RecoveryInstance> {
        self.store
            .instance(id)?
            .ok_or_else(|| ApiFailure::NotFound(format!("recovery instance {id} not found")))
    }

    /// Fills the derived fields (lag) for display.
    fn present(&self, mut i: RecoveryInstance, now: u64) -> RecoveryInstance {
        if let Some(c) = i.failback.last_consistent_at {
            if is_running(i.failback.state) {
                i.failback.lag_secs = Some(now.saturating_sub(c));
            }
        }
        i
    }

    // ------------------------------------------------------------ admin

    pub fn create_token(&self, actor: &str, req: CreateTokenRequest) -> R<CreateTokenResponse> {
        let now = now_secs();
        let ttl = req.ttl_secs.unwrap_or(self.settings.default_token_ttl_secs);
        if ttl == 0 || ttl > MAX_TTL {
            return Err(ApiFailure::bad(
                "ttl_secs",
                format!("field ttl_secs: {ttl} is outside 1..={MAX_TTL}"),
            ));
        }
        if let Some(id) = &req.recovery_instance_id {
            if !valid_instance_id(id) {
                return Err(ApiFailure::bad(
                    "recovery_instance_id",
                    format!(
                        "field recovery_instance_id: {id:?} is not i- followed by 8..32 hex digits"
                    ),
                ));
            }
            if req.kind == TokenKind::Pairing && self.store.instance(id)?.is_none() {
                return Err(ApiFailure::NotFound(format!(
                    "recovery instance {id} not found (enroll its agent first)"
                )));
            }
        }
        let prefix = match req.kind {
            TokenKind::Pairing => "fbp_",
            TokenKind::Agent => "fba_",
        };
        let token = format!("{prefix}{}", random_hex(24));
        let mut b = Batch::by(actor);
        b.tokens.push(TokenRecord {
            hash: secret_hash(&token),
            kind: req.kind,
            instance_id: req.recovery_instance_id.clone(),
            created_at: now,
            expires_at: now + ttl,
            used_at: None,
        });
        b.event(
            now,
            req.recovery_instance_id.as_deref(),
            "TOKEN_CREATED",
            format!(
                "{} token for {} (expires in {ttl}s)",
                req.kind,
                req.recovery_instance_id.as_deref().unwrap_or("auto-match")
            ),
        );
        self.store.apply(b)?;
        Ok(CreateTokenResponse {
            token,
            kind: req.kind,
            recovery_instance_id: req.recovery_instance_id,
            expires_at: now + ttl,
        })
    }

    pub fn list(&self) -> R<InstanceList> {
        let now = now_secs();
        let items = self.store.instances()?;
        Ok(InstanceList {
            items: items.into_iter().map(|i| self.present(i, now)).collect(),
        })
    }

    pub fn describe(&self, id: &str) -> R<RecoveryInstance> {
        Ok(self.present(self.instance(id)?, now_secs()))
    }

    pub fn set_hints(&self, actor: &str, id: &str, req: SetHintsRequest) -> R<RecoveryInstance> {
        self.retry(|| self.set_hints_once(actor, id, req.clone()))
    }

    fn set_hints_once(&self, actor: &str, id: &str, req: SetHintsRequest) -> R<RecoveryInstance> {
        let now = now_secs();
        let old = self.instance(id)?;
        let mut inst = old.clone();
        inst.source_hints = req.source_hints;
        let mut b = Batch::by(actor);
        b.event(
            now,
            Some(id),
            "HINTS_UPDATED",
            format!("{:?}", inst.source_hints),
        );
        b.put(Some(&old), inst.clone());
        self.store.apply(b)?;
        Ok(inst)
    }

    pub fn get_config(&self, id: &str) -> R<ReplicationConfig> {
        Ok(self.instance(id)?.config)
    }

    pub fn update_config(
        &self,
        actor: &str,
        id: &str,
        req: UpdateReplicationConfig,
    ) -> R<ReplicationConfig> {
        self.retry(|| self.update_config_once(actor, id, req.clone()))
    }

    fn update_config_once(
        &self,
        actor: &str,
        id: &str,
        req: UpdateReplicationConfig,
    ) -> R<ReplicationConfig> {
        if let Some(bw) = req.bandwidth_throttling_mbps {
            if bw > 1_000_000 {
                return Err(ApiFailure::bad(
                    "bandwidth_throttling_mbps",
                    format!("field bandwidth_throttling_mbps: {bw} Mbit/s is more than 1,000,000"),
                ));
            }
        }
        let now = now_secs();
        let old = self.instance(id)?;
        let mut inst = old.clone();
        if let Some(bw) = req.bandwidth_throttling_mbps {
            inst.config.bandwidth_throttling_mbps = bw;
        }
        if let Some(p) = req.use_private_ip {
            inst.config.use_private_ip = p;
        }
        if let Some(n) = req.name {
            inst.config.name = Some(n);
        }
        let mut b = Batch::by(actor);
        b.event(
            now,
            Some(id),
            "CONFIG_UPDATED",
            format!(
                "bandwidth_throttling_mbps={} use_private_ip={}",
                inst.config.bandwidth_throttling_mbps, inst.config.use_private_ip
            ),
        );
        let cfg = inst.config.clone();
        b.put(Some(&old), inst);
        self.store.apply(b)?;
        Ok(cfg)
    }

    /// AWS `StartFailbackLaunch`: only instances in `FAILBACK_READY_FOR_LAUNCH` are accepted.
    pub fn launch(&self, actor: &str, req: LaunchRequest) -> R<LaunchResponse> {
        self.retry(|| self.launch_once(actor, req.clone()))
    }

    fn launch_once(&self, actor: &str, req: LaunchRequest) -> R<LaunchResponse> {
        let n = req.recovery_instance_ids.len();
        if n == 0 || n > 200 {
            return Err(ApiFailure::bad(
                "recovery_instance_ids",
                format!("field recovery_instance_ids: {n} ids, must be 1..=200"),
            ));
        }
        for (i, id) in req.recovery_instance_ids.iter().enumerate() {
            if !valid_instance_id(id) {
                let f = format!("recovery_instance_ids[{i}]");
                return Err(ApiFailure::bad(
                    &f,
                    format!("field {f}: {id:?} is not a recovery instance id"),
                ));
            }
        }
        let now = now_secs();
        let job = format!("drsjob-{}", &random_hex(9)[..17]);
        let mut b = Batch::by(actor);
        let mut results = Vec::new();
        for id in &req.recovery_instance_ids {
            if b.instances
                .iter()
                .any(|w| w.new.recovery_instance_id == *id)
            {
                // Named twice: one write, the same answer.
                results.push(LaunchResult {
                    recovery_instance_id: id.clone(),
                    accepted: true,
                    reason: None,
                });
                continue;
            }
            let Some(old) = self.store.instance(id)? else {
                results.push(LaunchResult {
                    recovery_instance_id: id.clone(),
                    accepted: false,
                    reason: Some("NOT_FOUND: no such recovery instance".into()),
                });
                continue;
            };
            if old.failback.state != FailbackState::FailbackReadyForLaunch {
                results.push(LaunchResult {
                    recovery_instance_id: id.clone(),
                    accepted: false,
                    reason: Some(format!(
                        "NOT_READY: failback state is {} (needs FAILBACK_READY_FOR_LAUNCH)",
                        old.failback.state
                    )),
                });
                continue;
            }
            let mut inst = old.clone();
            inst.failback.launch_requested_at = Some(now);
            inst.failback.launch_job_id = Some(job.clone());
            let full = req.verify.map_or(self.settings.launch_verify_full, |v| {
                v == failback_api::LaunchVerify::Full
            });
            inst.failback.launch_verify_full = full;
            let verify = if full {
                "verify full (re-read and re-hash both sides)"
            } else {
                "verify changes (changed blocks + digests)"
            };
            b.event(
                now,
                Some(id),
                "LAUNCH_REQUESTED",
                format!("job {job}; {verify}"),
            );
            b.put(Some(&old), inst);
            results.push(LaunchResult {
                recovery_instance_id: id.clone(),
                accepted: true,
                reason: None,
            });
        }
        self.store.apply(b)?;
        Ok(LaunchResponse {
            job_id: job,
            results,
        })
    }

    /// AWS `StopFailback`: back to `FAILBACK_NOT_STARTED`; the client is told to stop.
    pub fn stop(&self, actor: &str, id: &str) -> R<RecoveryInstance> {
        self.retry(|| self.stop_once(actor, id))
    }

    fn stop_once(&self, actor: &str, id: &str) -> R<RecoveryInstance> {
        let now = now_secs();
        let old = self.instance(id)?;
        let mut inst = old.clone();
        let f = &mut inst.failback;
        set_failback(f, FailbackState::FailbackNotStarted);
        set_replication(f, ReplicationState::Stopped);
        f.launch_requested_at = None;
        f.launch_job_id = None;
        f.launch_verify_full = false;
        f.errors.clear();
        let mut b = Batch::by(actor);
        for mut c in self.store.clients_of(id)? {
            if !c.stopped {
                c.stopped = true;
                b.clients.push(c);
            }
        }
        b.event(now, Some(id), "STOP_REQUESTED", "stop failback".into());
        diff_events(&old, &inst, now, &mut b);
        b.put(Some(&old), inst.clone());
        self.store.apply(b)?;
        Ok(inst)
    }

    pub fn events(&self, instance: Option<&str>, after: u64, limit: u64) -> R<EventList> {
        Ok(EventList {
            items: self.store.events(instance, after, limit.clamp(1, 10_000))?,
        })
    }

    // ------------------------------------------------------------ agent

    pub fn enroll_agent(&self, req: AgentEnrollRequest) -> R<AgentEnrollResponse> {
        self.retry(|| self.enroll_agent_once(req.clone()))
    }

    fn enroll_agent_once(&self, req: AgentEnrollRequest) -> R<AgentEnrollResponse> {
        if req.token.trim().is_empty() {
            return Err(ApiFailure::bad("token", "field token: empty"));
        }
        check_address("address", &req.address)?;
        if let Some(p) = &req.private_address {
            check_address("private_address", p)?;
        }
        check_agent_disks(&req.disks, "disks")?;
        if !req.cert_sans.is_empty() {
            // An agent certificate names only `failback-agent` and its instance: a caller-chosen
            // name would let an enrollment token buy a certificate for someone else's name.
            return Err(ApiFailure::bad(
                "cert_sans",
                "field cert_sans: agents cannot choose certificate names; leave it empty",
            ));
        }
        let now = now_secs();
        let tok = check_token(
            self.store.token(&secret_hash(&req.token))?,
            TokenKind::Agent,
            now,
        )?;
        let id = tok.instance_id.clone().unwrap_or_else(new_instance_id);
        let existing = self.store.instance(&id)?;
        let created = existing.is_none();
        let old = existing.clone().unwrap_or_else(|| new_instance(&id, now));
        let mut inst = old.clone();
        inst.agent.address = Some(req.address.clone());
        inst.agent.private_address = req.private_address.clone();
        inst.agent.disks = req.disks.clone();
        inst.agent.last_seen_at = Some(now);
        inst.agent.enrolled_at = Some(now);
        if req.hostname.is_some() {
            inst.hostname = req.hostname.clone();
        }
        if let Some(h) = req.source_hints.clone() {
            inst.source_hints = h;
        }
        clear_error(&mut inst.failback, ReplicationError::AgentNotSeen);
        let cert = self.ca.agent_cert(&id)?;
        let secret = format!("fbs_{}", random_hex(32));
        let mut b = Batch::by(format!("agent:{id}"));
        b.tokens.push(TokenRecord {
            used_at: Some(now),
            ..tok
        });
        b.agents.push(AgentRecord {
            secret_hash: secret_hash(&secret),
            instance_id: id.clone(),
            created_at: now,
        });
        b.event(
            now,
            Some(&id),
            "AGENT_ENROLLED",
            format!(
                "{} agent at {} with {} volume(s)",
                if created { "new" } else { "re-enrolled" },
                req.address,
                req.disks.len()
            ),
        );
        diff_events(&old, &inst, now, &mut b);
        b.put(existing.as_ref(), inst);
        self.store.apply(b)?;
        Ok(AgentEnrollResponse {
            recovery_instance_id: id,
            agent_secret: secret,
            ca_pem: self.ca.ca_pem().to_string(),
            agent_cert_pem: cert.cert_pem,
            agent_key_pem: cert.key_pem,
            heartbeat_interval_secs: self.settings.heartbeat_secs,
        })
    }

    pub fn agent_heartbeat(&self, secret: &str, hb: AgentHeartbeat) -> R<AgentHeartbeatResponse> {
        self.retry(|| self.agent_heartbeat_once(secret, hb.clone()))
    }

    fn agent_heartbeat_once(&self, secret: &str, hb: AgentHeartbeat) -> R<AgentHeartbeatResponse> {
        check_address("address", &hb.address)?;
        if let Some(p) = &hb.private_address {
            check_address("private_address", p)?;
        }
        if let Some(d) = &hb.disks {
            check_agent_disks(d, "disks")?;
        }
        let now = now_secs();
        let agent = self
            .store
            .agent_by_secret(&secret_hash(secret))?
            .ok_or_else(|| ApiFailure::Unauthorized("agent secret not recognised".into()))?;
        let old = self.instance(&agent.instance_id)?;
        let mut inst = old.clone();
        let mut b = Batch::by(format!("agent:{}", agent.instance_id));
        if inst.agent.address.as_deref() != Some(hb.address.as_str()) {
            b.event(
                now,
                Some(&agent.instance_id),
                "AGENT_ADDRESS",
                format!("agent now at {}", hb.address),
            );
        }
        inst.agent.address = Some(hb.address);
        inst.agent.private_address = hb.private_address;
        if let Some(d) = hb.disks {
            inst.agent.disks = d;
        }
        inst.agent.last_seen_at = Some(now);
        clear_error(&mut inst.failback, ReplicationError::AgentNotSeen);
        diff_events(&old, &inst, now, &mut b);
        let inst_after = inst.clone();
        b.put(Some(&old), inst);
        self.store.apply(b)?;
        Ok(AgentHeartbeatResponse {
            recovery_instance_id: agent.instance_id,
            heartbeat_interval_secs: self.settings.heartbeat_secs,
            allowed_clients: Some(allowed_clients(&inst_after)),
        })
    }

    // ------------------------------------------------------------ client

    fn agent_address_for(inst: &RecoveryInstance) -> Option<String> {
        if inst.config.use_private_ip {
            inst.agent
                .private_address
                .clone()
                .or_else(|| inst.agent.address.clone())
        } else {
            inst.agent.address.clone()
        }
    }

    fn bandwidth(inst: &RecoveryInstance) -> Option<u64> {
        match inst.config.bandwidth_throttling_mbps {
            0 => None,
            n => Some(n),
        }
    }

    /// `POST /v1/pair`: [`Service::pair`], except that a used token whose failback has
    /// completed gets [`PairAnswer::Completed`] (the appliance booted again on the
    /// failed-back machine), recorded as the informational event
    /// `APPLIANCE_BOOTED_AFTER_COMPLETION`.
    pub fn pair_answer(&self, req: PairRequest) -> R<PairAnswer> {
        match self.pair(req.clone()) {
            Ok(p) => Ok(PairAnswer::Paired(Box::new(p))),
            Err(ApiFailure::Token { code, message }) if code == "TOKEN_USED" => {
                match self.completed_for_used_token(&req)? {
                    Some(done) => Ok(PairAnswer::Completed(PairCompleted {
                        failback_completed: done,
                    })),
                    None => Err(ApiFailure::Token { code, message }),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// The completed failback a used pairing token belongs to (its scope, the instance the
    /// client names, or the SMBIOS UUID), if that failback is FAILBACK_COMPLETED.
    fn completed_for_used_token(&self, req: &PairRequest) -> R<Option<CompletedFailback>> {
        let Some(tok) = self.store.token(&secret_hash(&req.token))? else {
            return Ok(None);
        };
        if tok.kind != TokenKind::Pairing || tok.used_at.is_none() {
            return Ok(None);
        }
        let inst = match (&tok.instance_id, &req.recovery_instance_id) {
            (Some(scope), _) => self.instance(scope).ok(),
            (None, Some(asked)) => self.instance(asked).ok(),
            (None, None) => {
                let uuid = req.inventory.smbios_uuid.as_deref().map(normalize_uuid);
                match uuid {
                    Some(u) => {
                        let mut found = self.instances_with_bios_uuid(&u)?;
                        (found.len() == 1).then(|| found.remove(0))
                    }
                    None => None,
                }
            }
        };
        let Some(inst) = inst else { return Ok(None) };
        let f = &inst.failback;
        if f.state != FailbackState::FailbackCompleted || f.digests.is_empty() {
            return Ok(None);
        }
        let id = inst.recovery_instance_id.clone();
        // The restored disks on this boot, found as the pairing found them (names can change).
        let original = match (&req.inventory.smbios_uuid, &inst.source_hints.vmware_uuid) {
            (Some(a), Some(b)) => normalize_uuid(a) == normalize_uuid(b),
            _ => false,
        };
        let suggested =
            mapping::suggest(&inst.agent.disks, &req.inventory.disks, original).unwrap_or_default();
        let then = f
            .client_inventory
            .as_ref()
            .map_or(&[][..], |i| i.disks.as_slice());
        let local_now = |d: &DiskDigest| {
            mapping::locate_restored(
                &d.remote_id,
                &d.local_path,
                then,
                &req.inventory.disks,
                req.device_mapping.as_deref(),
                &suggested,
            )
        };
        let mut b = Batch::by("appliance".to_string());
        b.event(
            now_secs(),
            Some(&id),
            "APPLIANCE_BOOTED_AFTER_COMPLETION",
            format!(
                "an appliance booted again with the used pairing token of this completed failback; told it the failback completed (digests {}) so it boots the local disk",
                f.digests
                    .iter()
                    .map(|d| format!("{}={}", d.remote_id, d.local_digest))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        self.store.apply(b)?;
        Ok(Some(CompletedFailback {
            recovery_instance_id: id,
            completed_at: f.completed_at,
            disks: f
                .digests
                .iter()
                .map(|d| CompletedDisk {
                    remote_id: d.remote_id.clone(),
                    local_path: local_now(d),
                    size_bytes: f
                        .disks
                        .iter()
                        .find(|p| p.remote_id == d.remote_id)
                        .map_or(0, |p| p.total_bytes),
                    digest: d.local_digest.clone(),
                })
                .collect(),
            block_size: self.settings.block_size,
        }))
    }

    pub fn pair(&self, req: PairRequest) -> R<PairResponse> {
        self.retry(|| self.pair_once(req.clone()))
    }

    fn pair_once(&self, req: PairRequest) -> R<PairResponse> {
        if req.token.trim().is_empty() {
            return Err(ApiFailure::bad("token", "field token: empty"));
        }
        for (i, d) in req.inventory.disks.iter().enumerate() {
            if d.path.trim().is_empty() {
                let f = format!("inventory.disks[{i}].path");
                return Err(ApiFailure::bad(&f, format!("field {f}: empty")));
            }
        }
        if let Some(m) = &req.device_mapping {
            api::validate_mapping(m).map_err(|e| {
                ApiFailure::bad("device_mapping", format!("field device_mapping: {e}"))
            })?;
        }
        if let Some(id) = &req.recovery_instance_id {
            if !valid_instance_id(id) {
                return Err(ApiFailure::bad(
                    "recovery_instance_id",
                    format!("field recovery_instance_id: {id:?} is not a recovery instance id"),
                ));
            }
        }
        let now = now_secs();
        let tok = check_token(
            self.store.token(&secret_hash(&req.token))?,
            TokenKind::Pairing,
            now,
        )?;
        let smbios = req.inventory.smbios_uuid.as_deref().map(normalize_uuid);
        let (old, matched_by) = match (&tok.instance_id, &req.recovery_instance_id) {
            (Some(scope), Some(asked)) if scope != asked => {
                return Err(ApiFailure::Token {
                    code: "TOKEN_SCOPE",
                    message: format!(
                        "pairing token is scoped to recovery instance {scope}, not {asked}"
                    ),
                })
            }
            (Some(scope), _) => (self.instance(scope)?, MatchReason::TokenScope),
            (None, Some(asked)) => (self.instance(asked)?, MatchReason::TokenScope),
            (None, None) => {
                let Some(uuid) = &smbios else {
                    return Err(ApiFailure::Conflict {
                        code: "NO_MATCH",
                        message: "auto-match token but the client reported no SMBIOS UUID; pass --instance".into(),
                    });
                };
                let mut found = self.instances_with_bios_uuid(uuid)?;
                match found.len() {
                    1 => (found.remove(0), MatchReason::SmbiosUuid),
                    0 => {
                        return Err(ApiFailure::Conflict {
                            code: "NO_MATCH",
                            message: format!(
                                "no recovery instance has source VMware BIOS UUID {uuid}; pass --instance"
                            ),
                        })
                    }
                    n => {
                        return Err(ApiFailure::Conflict {
                            code: "AMBIGUOUS_MATCH",
                            message: format!(
                                "{n} recovery instances have source VMware BIOS UUID {uuid}; pass --instance"
                            ),
                        })
                    }
                }
            }
        };
        let id = old.recovery_instance_id.clone();
        let Some(agent_address) = Self::agent_address_for(&old) else {
            return Err(ApiFailure::Conflict {
                code: "AGENT_NOT_ENROLLED",
                message: format!("recovery instance {id} has no enrolled agent yet"),
            });
        };
        let original = match (&smbios, &old.source_hints.vmware_uuid) {
            (Some(a), Some(b)) => *a == normalize_uuid(b),
            _ => false,
        };
        let remote = &old.agent.disks;
        let local = &req.inventory.disks;
        let device_mapping = match &req.device_mapping {
            Some(m) => mapping::check_override(remote, local, m).map_err(|e| {
                ApiFailure::bad("device_mapping", format!("field device_mapping: {e}"))
            })?,
            None => mapping::suggest(remote, local, original).map_err(|e: MappingError| {
                ApiFailure::Conflict {
                    code: "MAPPING_INCOMPLETE",
                    message: format!("recovery instance {id}: {e}"),
                }
            })?,
        };
        let client_id = format!("fc-{}", random_hex(8));
        let secret = format!("fbc_{}", random_hex(32));
        let cert = self.ca.client_cert(&id, &client_id)?;

        let mut inst = old.clone();
        let f = &mut inst.failback;
        let previous_client = f.client_id.clone();
        *f = FailbackStatus {
            // The states move below, through the state machine.
            state: f.state,
            replication_state: f.replication_state,
            client_id: Some(client_id.clone()),
            client_last_seen_at: Some(now),
            initiated_at: Some(now),
            failback_to_original_server: original,
            steps: InitiationStepName::ALL
                .iter()
                .map(|n| InitiationStep {
                    name: *n,
                    status: StepStatus::NotStarted,
                })
                .collect(),
            disks: device_mapping
                .iter()
                .filter(|m| !m.is_excluded())
                .map(|m| DiskProgress {
                    remote_id: m.remote.clone(),
                    local_path: m.local.clone(),
                    total_bytes: remote
                        .iter()
                        .find(|r| r.id == m.remote)
                        .map(|r| r.size_bytes)
                        .unwrap_or(0),
                    ..Default::default()
                })
                .collect(),
            device_mapping: device_mapping.clone(),
            client_inventory: Some(req.inventory.clone()),
            client_cert_sha256: Some(cert.sha256.clone()),
            ..Default::default()
        };
        set_failback(f, FailbackState::FailbackInProgress);
        set_replication(f, ReplicationState::Initiating);
        set_step(
            f,
            InitiationStepName::LinkFailbackClientWithRecoveryInstance,
            StepStatus::Succeeded,
        );
        set_step(
            f,
            InitiationStepName::CompleteVolumeMapping,
            StepStatus::Succeeded,
        );
        set_step(
            f,
            InitiationStepName::ConfigureReplicationSoftware,
            StepStatus::Succeeded,
        );
        set_step(
            f,
            InitiationStepName::EstablishRecoveryInstanceCommunication,
            StepStatus::InProgress,
        );
        let mut b = Batch::by(format!("client:{client_id}"));
        b.tokens.push(TokenRecord {
            used_at: Some(now),
            ..tok
        });
        // A previous client of this instance is told to stop: one client per instance.
        for mut c in self.store.clients_of(&id)? {
            if !c.stopped {
                c.stopped = true;
                b.clients.push(c);
            }
        }
        b.clients.push(ClientRecord {
            client_id: client_id.clone(),
            secret_hash: secret_hash(&secret),
            instance_id: id.clone(),
            created_at: now,
            stopped: false,
        });
        b.event(
            now,
            Some(&id),
            "PAIRED",
            format!(
                "client {client_id} (SMBIOS {}, {}) matched by {:?}{}; mapping {}",
                smbios.as_deref().unwrap_or("unknown"),
                req.inventory.hostname.as_deref().unwrap_or("no hostname"),
                matched_by,
                previous_client
                    .map(|p| format!(", replaces client {p}"))
                    .unwrap_or_default(),
                device_mapping
                    .iter()
                    .map(|m| format!("{}={}", m.remote, m.local))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        );
        diff_events(&old, &inst, now, &mut b);
        let resp = PairResponse {
            recovery_instance_id: id,
            client_id,
            client_secret: secret,
            matched_by,
            failback_to_original_server: original,
            agent_address,
            ca_pem: self.ca.ca_pem().to_string(),
            client_cert_pem: cert.cert_pem,
            client_key_pem: cert.key_pem,
            device_mapping,
            remote_disks: inst.agent.disks.clone(),
            block_size: self.settings.block_size,
            bandwidth_limit_mbps: Self::bandwidth(&inst),
            heartbeat_interval_secs: self.settings.heartbeat_secs,
            compression: self.settings.compression,
            verify_full: inst.failback.launch_verify_full,
        };
        b.put(Some(&old), inst);
        self.store.apply(b)?;
        Ok(resp)
    }

    fn client(&self, secret: &str) -> R<ClientRecord> {
        self.store
            .client_by_secret(&secret_hash(secret))?
            .ok_or_else(|| ApiFailure::Unauthorized("client secret not recognised".into()))
    }

    /// Heartbeat + progress report; answers with the next command.
    pub fn client_heartbeat(&self, secret: &str, rep: ClientReport) -> R<ClientCommandResponse> {
        self.retry(|| self.client_heartbeat_once(secret, rep.clone()))
    }

    fn client_heartbeat_once(&self, secret: &str, rep: ClientReport) -> R<ClientCommandResponse> {
        for (i, d) in rep.disks.iter().enumerate() {
            if d.remote_id.is_empty() {
                let f = format!("disks[{i}].remote_id");
                return Err(ApiFailure::bad(&f, format!("field {f}: empty")));
            }
        }
        if let Some(s) = rep.last_round_secs {
            if !s.is_finite() || s < 0.0 {
                return Err(ApiFailure::bad(
                    "last_round_secs",
                    "field last_round_secs: must be a finite number >= 0",
                ));
            }
        }
        let now = now_secs();
        let client = self.client(secret)?;
        let old = self.instance(&client.instance_id)?;
        let mut inst = old.clone();
        let current = inst.failback.client_id.as_deref() == Some(client.client_id.as_str());
        let mut b = Batch::by(format!("client:{}", client.client_id));
        if client.stopped || !current {
            if rep.phase == ClientPhase::Stopped {
                b.event(
                    now,
                    Some(&client.instance_id),
                    "CLIENT_STOPPED",
                    format!("client {} stopped", client.client_id),
                );
                self.store.apply(b)?;
            }
            return Ok(ClientCommandResponse {
                command: ClientCommand::Stop,
                failback_state: inst.failback.state,
                replication_state: inst.failback.replication_state,
                agent_address: Self::agent_address_for(&inst),
                bandwidth_limit_mbps: Self::bandwidth(&inst),
                heartbeat_interval_secs: self.settings.heartbeat_secs,
                compression: self.settings.compression,
                verify_full: false,
            });
        }
        self.apply_report(&mut inst, &rep, now, &mut b);
        diff_events(&old, &inst, now, &mut b);
        let command =
            if inst.failback.launch_requested_at.is_some() && is_running(inst.failback.state) {
                ClientCommand::Launch
            } else if is_running(inst.failback.state)
                || inst.failback.state == FailbackState::FailbackCompleted
            {
                ClientCommand::Continue
            } else {
                ClientCommand::Stop
            };
        let resp = ClientCommandResponse {
            command,
            failback_state: inst.failback.state,
            replication_state: inst.failback.replication_state,
            agent_address: Self::agent_address_for(&inst),
            bandwidth_limit_mbps: Self::bandwidth(&inst),
            heartbeat_interval_secs: self.settings.heartbeat_secs,
            compression: self.settings.compression,
            verify_full: inst.failback.launch_verify_full,
        };
        b.put(Some(&old), inst);
        self.store.apply(b)?;
        Ok(resp)
    }

    /// The failback state machine, driven by the client's report.
    fn apply_report(
        &self,
        inst: &mut RecoveryInstance,
        rep: &ClientReport,
        now: u64,
        b: &mut Batch,
    ) {
        let id = inst.recovery_instance_id.clone();
        let f = &mut inst.failback;
        f.client_last_seen_at = Some(now);
        clear_error(f, ReplicationError::FailbackClientNotSeen);
        if !rep.disks.is_empty() {
            f.disks = rep.disks.clone();
        }
        if rep.last_consistent_at.is_some() {
            f.last_consistent_at = rep.last_consistent_at;
        }
        if !is_running(f.state) {
            // COMPLETED / ERROR / NOT_STARTED: only Failed/Stopped reports are recorded.
            return;
        }
        let backlog: u64 = rep.disks.iter().map(|d| d.backlog_bytes).sum();
        if rep.round >= 1
            && matches!(
                rep.phase,
                ClientPhase::Syncing
                    | ClientPhase::Idle
                    | ClientPhase::Finalizing
                    | ClientPhase::Completed
            )
        {
            // A round ran, so the agent was reached and paired (a quick round may start and
            // finish between two heartbeats).
            for n in [
                InitiationStepName::EstablishRecoveryInstanceCommunication,
                InitiationStepName::PairAgentWithReplicationSoftware,
                InitiationStepName::EstablishAgentReplicatorSoftwareCommunication,
            ] {
                set_step(f, n, StepStatus::Succeeded);
            }
            if f.first_byte_at.is_none() {
                f.first_byte_at = Some(now);
            }
        }
        let was_disconnected = f.replication_state == ReplicationState::Disconnected;
        match rep.phase {
            ClientPhase::Connecting => {
                set_step(
                    f,
                    InitiationStepName::EstablishRecoveryInstanceCommunication,
                    StepStatus::InProgress,
                );
            }
            ClientPhase::Syncing => {
                if f.round != rep.round {
                    f.round = rep.round;
                    f.round_started_at = Some(now);
                }
                let rescan = rep.disks.iter().any(|d| {
                    d.tracking
                        .as_deref()
                        .is_some_and(|t| t.starts_with("rescan:"))
                });
                let to = if rep.round <= 1 {
                    if f.failback_to_original_server {
                        ReplicationState::Rescan
                    } else {
                        ReplicationState::InitialSync
                    }
                } else if rescan {
                    // The agent's tracker may have missed a write: a whole-disk hash compare.
                    ReplicationState::Rescan
                } else if f.replication_state == ReplicationState::Continuous
                    && backlog < BACKLOG_THRESHOLD
                {
                    ReplicationState::Continuous
                } else if backlog > 0 {
                    ReplicationState::Backlog
                } else {
                    ReplicationState::Rescan
                };
                set_replication(f, to);
                // Lag: the agent's age of the oldest change not yet received.
                if let Some(lag) = rep.disks.iter().filter_map(|d| d.lag_secs).max() {
                    f.lag_secs = Some(lag);
                }
                // ETA from the rate of this round: bytes compared (hash-compare rounds) or
                // backlog received (changes rounds).
                let total: u64 = rep.disks.iter().map(|d| d.total_bytes).sum();
                let done: u64 = rep.disks.iter().map(|d| d.rescanned_bytes).sum();
                let elapsed = now.saturating_sub(f.round_started_at.unwrap_or(now));
                f.eta_at = if done > 0 && elapsed > 0 && total > done {
                    Some(now + (total - done).saturating_mul(elapsed) / done)
                } else {
                    None
                };
            }
            ClientPhase::Idle => {
                f.round = rep.round.max(f.round);
                set_replication(f, ReplicationState::Continuous);
                f.eta_at = None;
                if matches!(
                    f.state,
                    FailbackState::FailbackInProgress | FailbackState::FailbackNotReadyForLaunch
                ) && rep.round >= 1
                {
                    set_failback(f, FailbackState::FailbackReadyForLaunch);
                }
                if let Some(d) = rep.last_round_differing_bytes {
                    if f.recent_round_differing_bytes.len() >= 4 {
                        f.recent_round_differing_bytes.remove(0);
                    }
                    f.recent_round_differing_bytes.push(d);
                    // Three rounds in a row each with more to copy than the one before:
                    // the writes on the recovery instance outpace replication.
                    let r = &f.recent_round_differing_bytes;
                    let growing = r.len() >= 3
                        && r[r.len() - 3..].windows(2).all(|w| w[1] > w[0] && w[0] > 0);
                    if growing {
                        add_error(f, ReplicationError::NotConverging);
                    } else {
                        clear_error(f, ReplicationError::NotConverging);
                    }
                }
                f.last_error_message = None;
            }
            ClientPhase::AgentUnreachable => {
                if !was_disconnected {
                    // Once per outage: the client retries every few seconds and says so in
                    // each heartbeat.
                    b.event(
                        now,
                        Some(&id),
                        "AGENT_DISCONNECTED",
                        rep.error
                            .clone()
                            .unwrap_or_else(|| "recovery agent not reachable".into()),
                    );
                }
                lose_peer(f);
                f.last_error_message = rep.error.clone();
            }
            ClientPhase::Finalizing => {}
            ClientPhase::Completed => {
                let ok = !rep.digests.is_empty()
                    && rep
                        .digests
                        .iter()
                        .all(|d| !d.local_digest.is_empty() && d.local_digest == d.agent_digest);
                f.digests = rep.digests.clone();
                if ok && f.launch_requested_at.is_some() {
                    set_failback(f, FailbackState::FailbackCompleted);
                    set_replication(f, ReplicationState::Stopped);
                    f.completed_at = Some(now);
                    f.lag_secs = Some(0);
                    f.final_round_secs = rep.last_round_secs;
                    if let Some(secs) = rep.last_round_secs {
                        b.event(
                            now,
                            Some(&id),
                            "FINAL_ROUND",
                            format!(
                                "final round took {secs:.3}s (after the quiesce: changed blocks \
                                 + digests; the downtime on the agent side)"
                            ),
                        );
                    }
                    b.event(
                        now,
                        Some(&id),
                        "DIGESTS",
                        rep.digests
                            .iter()
                            .map(|d| format!("{} {}={}", d.remote_id, d.local_path, d.local_digest))
                            .collect::<Vec<_>>()
                            .join("; "),
                    );
                } else {
                    set_failback(f, FailbackState::FailbackError);
                    add_error(f, ReplicationError::VerificationFailed);
                    f.last_error_message = Some(if f.launch_requested_at.is_none() {
                        "client reported completion without a launch request".into()
                    } else {
                        "digest mismatch between local disk and recovery volume".into()
                    });
                }
            }
            ClientPhase::Failed => {
                set_failback(f, FailbackState::FailbackError);
                f.last_error_message = rep.error.clone();
                b.event(
                    now,
                    Some(&id),
                    "CLIENT_FAILED",
                    rep.error.clone().unwrap_or_else(|| "no message".into()),
                );
            }
            ClientPhase::Stopped => {
                set_failback(f, FailbackState::FailbackNotStarted);
                set_replication(f, ReplicationState::Stopped);
            }
        }
        if was_disconnected
            && matches!(rep.phase, ClientPhase::Syncing | ClientPhase::Idle)
            && !f.errors.contains(&ReplicationError::AgentNotSeen)
        {
            b.event(
                now,
                Some(&id),
                "AGENT_RECONNECTED",
                format!("replication resumed (round {})", rep.round),
            );
        }
        // A client between rounds does not notice a dead agent; the missed agent
        // heartbeats win until the agent is back.
        if is_running(f.state) && f.errors.contains(&ReplicationError::AgentNotSeen) {
            lose_peer(f);
        }
    }

    /// Stores the client's resume points (validated by the HTTP layer; an empty list clears
    /// them) for its instance.
    pub fn put_checkpoints(&self, secret: &str, c: ClientCheckpoints) -> R<ClientCheckpoints> {
        let client = self.client(secret)?;
        let body = if c.disks.is_empty() {
            None
        } else {
            Some(serde_json::to_string(&c).map_err(|e| ApiFailure::Internal(e.to_string()))?)
        };
        self.store
            .put_checkpoint(&client.instance_id, body.as_deref(), now_secs())?;
        Ok(c)
    }

    /// The client's last stored resume points (none: an empty list).
    pub fn checkpoints(&self, secret: &str) -> R<ClientCheckpoints> {
        let client = self.client(secret)?;
        match self.store.checkpoint(&client.instance_id)? {
            Some(b) => serde_json::from_str(&b).map_err(|e| {
                ApiFailure::Internal(format!(
                    "stored checkpoints of {} unreadable: {e}",
                    client.instance_id
                ))
            }),
            None => Ok(ClientCheckpoints::default()),
        }
    }

    /// Stores an uploaded client log under `log_dir/<instance>/`.
    pub fn upload_log(&self, secret: &str, body: &[u8]) -> R<LogUploadResponse> {
        let now = now_secs();
        let client = { self.client(secret)? };
        let dir = self.settings.log_dir.join(&client.instance_id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| ApiFailure::Internal(format!("creating {}: {e}", dir.display())))?;
        let name = format!("{}-{now}-{}.log", client.client_id, random_hex(3));
        let path = dir.join(&name);
        std::fs::write(&path, body)
            .map_err(|e| ApiFailure::Internal(format!("writing {}: {e}", path.display())))?;
        let mut b = Batch::by(format!("client:{}", client.client_id));
        b.event(
            now,
            Some(&client.instance_id),
            "LOG_UPLOADED",
            format!("{name} ({} bytes)", body.len()),
        );
        {
            self.store.apply(b)?;
        }
        Ok(LogUploadResponse {
            stored_as: name,
            bytes: u64::try_from(body.len()).unwrap_or(u64::MAX),
        })
    }

    pub fn list_logs(&self, id: &str) -> R<LogList> {
        self.instance(id)?;
        let dir = self.settings.log_dir.join(id);
        let mut items = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let Ok(md) = e.metadata() else { continue };
                items.push(LogEntry {
                    name: e.file_name().to_string_lossy().into_owned(),
                    bytes: md.len(),
                    uploaded_at: md
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.as_secs())
                        .unwrap_or(0),
                });
            }
        }
        items.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(LogList { items })
    }

    pub fn read_log(&self, id: &str, name: &str) -> R<Vec<u8>> {
        crate::validate::instance_id("id", id).and(crate::validate::log_name("name", name))?;
        let path = self.settings.log_dir.join(id).join(name);
        std::fs::read(&path)
            .map_err(|e| ApiFailure::NotFound(format!("log {}: {e}", path.display())))
    }

    // ------------------------------------------------------------ monitor

    /// The periodic work (the monitor below), on the one replica holding the lease; `None`
    /// when another replica holds it.
    pub fn periodic(&self) -> R<Option<usize>> {
        let held = self.store.lease()?;
        let was = self
            .lease_held
            .swap(held, std::sync::atomic::Ordering::Relaxed);
        if held && !was {
            tracing::info!("lease acquired: this replica runs the periodic work (monitor)");
        } else if was && !held {
            tracing::warn!("lease lost: another replica runs the periodic work");
        }
        if !held {
            return Ok(None);
        }
        self.monitor_tick().map(Some)
    }

    /// Raises `AGENT_NOT_SEEN` / `FAILBACK_CLIENT_NOT_SEEN` for silent peers of running
    /// failbacks; both make the replication state `DISCONNECTED`.
    pub fn monitor_tick(&self) -> R<usize> {
        self.retry(|| self.monitor_tick_once())
    }

    fn monitor_tick_once(&self) -> R<usize> {
        let now = now_secs();
        let stale = self.store.stale_instances(
            now.saturating_sub(self.settings.agent_timeout_secs),
            now.saturating_sub(self.settings.client_timeout_secs),
        )?;
        let n = stale.len();
        if n == 0 {
            return Ok(0);
        }
        let mut b = Batch::by("monitor");
        for old in stale {
            let mut inst = old.clone();
            let f = &mut inst.failback;
            let agent_seen = inst.agent.last_seen_at.unwrap_or(0);
            if agent_seen < now.saturating_sub(self.settings.agent_timeout_secs) {
                add_error(f, ReplicationError::AgentNotSeen);
            }
            if f.client_last_seen_at.unwrap_or(0)
                < now.saturating_sub(self.settings.client_timeout_secs)
            {
                add_error(f, ReplicationError::FailbackClientNotSeen);
            }
            lose_peer(f);
            diff_events(&old, &inst, now, &mut b);
            b.put(Some(&old), inst);
        }
        self.store.apply(b)?;
        Ok(n)
    }
}

/// The client certificates an instance's agent may serve: the current pairing's, while the
/// failback runs (not before pairing, after stop or after completion).
fn allowed_clients(inst: &RecoveryInstance) -> Vec<String> {
    let f = &inst.failback;
    let running = !matches!(
        f.state,
        FailbackState::FailbackNotStarted | FailbackState::FailbackCompleted
    );
    match &f.client_cert_sha256 {
        Some(fp) if running => vec![fp.clone()],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod allow_tests {
    use super::*;

    /// Revocation by state: only a running failback's current certificate is allowed; stop
    /// (NOT_STARTED) and completion end it; a new pairing replaces the fingerprint.
    #[test]
    fn only_the_running_pairing_is_allowed() {
        let mut inst = new_instance("i-0123456789abcdef", 1);
        inst.failback.client_cert_sha256 = Some("aa".into());
        for (state, allowed) in [
            (FailbackState::FailbackNotStarted, false),
            (FailbackState::FailbackInProgress, true),
            (FailbackState::FailbackReadyForLaunch, true),
            (FailbackState::FailbackNotReadyForLaunch, true),
            (FailbackState::FailbackError, true),
            (FailbackState::FailbackCompleted, false),
        ] {
            inst.failback.state = state;
            let want: Vec<String> = if allowed { vec!["aa".into()] } else { vec![] };
            assert_eq!(allowed_clients(&inst), want, "{state:?}");
        }
        inst.failback.state = FailbackState::FailbackInProgress;
        inst.failback.client_cert_sha256 = Some("bb".into());
        assert_eq!(allowed_clients(&inst), vec!["bb".to_string()]);
        inst.failback.client_cert_sha256 = None;
        assert!(allowed_clients(&inst).is_empty());
    }
}
