//! `failback-client run`: the unattended failback flow driven by the DR service.
//!
//! 1. Pair: present the one-time token and the hardware inventory; receive the recovery
//!    instance, the device mapping, the agent address, and a client certificate scoped to that
//!    instance.
//! 2. Initial sync (round 1), then delta rounds until the operator launches; a background task
//!    heartbeats with progress and fetches the next command.
//! 3. Launch: ask the agent to quiesce, run a final round, compare whole-disk digests, flush,
//!    report `FAILBACK_COMPLETED` with the digests, return [`RunOutcome::Completed`] (exit 0).
//!    Stop: return [`RunOutcome::Stopped`] (exit 8). A later run re-pairs (new token) and
//!    only fetches what differs (delta).
//!
//! Usable without clap (the appliance boot flow builds [`RunOptions`] from its seed) and prints
//! one clear console line per step, prefixed `failback:`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use failback_api::*;
use failback_api::{routes, ServiceClient, Timeouts};
use failback_replication::report::DiskReport;
use failback_replication::{ClientTls, Mapping, Progress, Session, SyncOptions, SyncReport};
use tokio::sync::Notify;

mod checkpoints;

/// Everything `run` needs; build it from flags, a seed file or code.
#[derive(Clone)]
pub struct RunOptions {
    /// DR service base URL, e.g. `https://10.0.2.2:8443`; several (replicas of one service)
    /// separated by commas.
    pub server: String,
    /// One-time pairing token.
    pub token: String,
    /// CA to pin for the service (PEM file). `None`: `ca_pem` (one of them is required).
    pub ca: Option<PathBuf>,
    /// CA PEM text (alternative to `ca`, e.g. from a seed file).
    pub ca_pem: Option<String>,
    /// Recovery instance to pair with (`None`: token scope or SMBIOS auto-match).
    pub instance: Option<String>,
    /// Device mapping override (any of the three formats, parsed).
    pub mapping: Option<Vec<DeviceMapping>>,
    /// Inventory to present (`None`: [`crate::inventory::collect`]).
    pub inventory: Option<Inventory>,
    /// Ask the agent to run its quiesce command before the final round.
    pub quiesce: bool,
    /// Pause between delta rounds (`None`: the service's heartbeat interval).
    pub delta_interval: Option<Duration>,
    /// Wait between attempts when the agent or service is unreachable.
    pub retry_interval: Duration,
    /// Give up pairing after this long if the service stays unreachable.
    pub pair_timeout: Duration,
    /// Upload the run's console log to the service when finishing.
    pub upload_log: bool,
    /// Also copy console lines to this file (appended).
    pub log_file: Option<PathBuf>,
    /// Extra progress sink (terminal bars, JSON lines); the service always gets progress.
    pub progress: Option<Arc<dyn Progress>>,
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("server", &self.server)
            .field("token", &"<redacted>")
            .field("ca", &self.ca)
            .field("instance", &self.instance)
            .field("mapping", &self.mapping)
            .field("quiesce", &self.quiesce)
            .field("delta_interval", &self.delta_interval)
            .field("retry_interval", &self.retry_interval)
            .field("log_file", &self.log_file)
            .finish_non_exhaustive()
    }
}

impl RunOptions {
    /// Options with defaults for everything but the server and token.
    pub fn new(server: impl Into<String>, token: impl Into<String>) -> Self {
        RunOptions {
            server: server.into(),
            token: token.into(),
            ca: None,
            ca_pem: None,
            instance: None,
            mapping: None,
            inventory: None,
            quiesce: true,
            delta_interval: None,
            retry_interval: Duration::from_secs(3),
            pair_timeout: Duration::from_secs(600),
            upload_log: true,
            log_file: None,
            progress: None,
        }
    }
}

/// How a run ended without error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// Launch finished: every disk's digest equals the agent's.
    Completed {
        recovery_instance_id: String,
        digests: Vec<DiskDigest>,
    },
    /// The operator stopped the failback (exit code 8).
    Stopped { recovery_instance_id: String },
    /// The token was used for a failback that has since completed: the service answered
    /// with its digests instead of pairing (the appliance booted again on the failed-back
    /// machine). Nothing was written; the caller checks the local disks against it.
    AlreadyCompleted(CompletedFailback),
}

impl RunOutcome {
    /// Exit code per the shared table (0 ok, 8 stopped by operator).
    pub fn exit_code(&self) -> u8 {
        match self {
            RunOutcome::Completed { .. } | RunOutcome::AlreadyCompleted(_) => 0,
            RunOutcome::Stopped { .. } => 8,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Bad options (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The DR service refused (token invalid/expired/used/other instance, not authorised) (exit 7).
    #[error("DR service {url} refused: {message}")]
    Refused { url: String, message: String },
    /// The service could not be reached (exit 4).
    #[error("DR service {url} unreachable: {message}")]
    Network { url: String, message: String },
    /// A target disk was refused as unsafe (exit 3).
    #[error("unsafe target: {0}")]
    Unsafe(String),
    /// Digests differ after the final round (exit 5).
    #[error("verification failed: {0}")]
    Verification(String),
    /// Agent or protocol error (exit 6).
    #[error("agent: {0}")]
    Agent(#[source] failback_replication::Error),
    /// Anything else (exit 1).
    #[error("{0}")]
    Internal(String),
}

impl RunError {
    /// Exit code per the shared table.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Internal(_) => 1,
            RunError::Usage(_) => 2,
            RunError::Unsafe(_) => 3,
            RunError::Network { .. } => 4,
            RunError::Verification(_) => 5,
            RunError::Agent(_) => 6,
            RunError::Refused { .. } => 7,
        }
    }
}

/// Console + in-memory log (uploaded to the service at the end).
#[derive(Debug)]
struct Console {
    buf: Mutex<String>,
    file: Option<PathBuf>,
}

impl Console {
    fn say(&self, msg: impl AsRef<str>) {
        let line = format!("failback: {}", msg.as_ref());
        println!("{line}");
        tracing::info!("{}", msg.as_ref());
        let stamped = format!("{} {line}\n", humantime_now());
        if let Ok(mut b) = self.buf.lock() {
            b.push_str(&stamped);
        }
        if let Some(f) = &self.file {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(f)
            {
                let _ = f.write_all(stamped.as_bytes());
            }
        }
    }
    fn text(&self) -> String {
        self.buf.lock().map(|b| b.clone()).unwrap_or_default()
    }
    /// The newest `max` bytes of the log: the log file when there is one (the appliance
    /// writes its boot steps there too), else this run's lines.
    fn tail(&self, max: usize) -> String {
        let text = self
            .file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .unwrap_or_else(|| self.text());
        tail_bytes(&text, max).to_string()
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn humantime_now() -> String {
    httpdate::fmt_http_date(std::time::SystemTime::now())
}

fn mib(b: u64) -> String {
    // Display only; precision loss above 2^53 bytes is irrelevant.
    #[allow(clippy::cast_precision_loss)]
    let m = b as f64 / 1048576.0;
    format!("{m:.1} MiB")
}

// ---------------------------------------------------------------- service API client

/// The DR service through the API crate's client ([`ServiceClient`]: pinned CA, service role,
/// the next service URL on connection failure), with its errors sorted the way the flow
/// needs them.
#[derive(Debug, Clone)]
struct Api {
    svc: ServiceClient,
}

enum ApiErr {
    /// Transport trouble or 5xx: retry.
    Transient(String),
    /// 4xx: the service said no (status 0: not the pinned DR service).
    Refused(u16, String),
}

impl From<failback_api::Error> for ApiErr {
    /// A certificate problem (not the pinned DR service) is refused at once: retrying for the
    /// pairing timeout cannot fix it, and nothing was sent to that server.
    fn from(e: failback_api::Error) -> ApiErr {
        use failback_api::Error as E;
        match e {
            E::Untrusted { cause, .. } => ApiErr::Refused(0, format!("TLS: {cause}")),
            E::Api { status, error, .. } if status < 500 => {
                ApiErr::Refused(status, format!("{} ({})", error.message, error.error))
            }
            e => ApiErr::Transient(e.to_string()),
        }
    }
}

impl Api {
    /// The DR service's HTTPS client: only the pinned CA, and only a certificate with the
    /// service role (an agent's or client's certificate from the same CA is refused).
    fn new(opts: &RunOptions) -> Result<Api, RunError> {
        let (pem, source) = match (&opts.ca, &opts.ca_pem) {
            (Some(p), _) => (
                std::fs::read(p).map_err(|e| {
                    RunError::Usage(format!("cannot read CA file {}: {e}", p.display()))
                })?,
                p.clone(),
            ),
            (None, Some(s)) => (s.as_bytes().to_vec(), PathBuf::from("<seed ca_pem>")),
            (None, None) => {
                return Err(RunError::Usage(
                    "the DR service's CA is required (--ca, or ca_pem in the seed)".into(),
                ))
            }
        };
        let urls = failback_api::parse_urls(&opts.server)
            .map_err(|e| RunError::Usage(format!("--server: {e}")))?;
        let svc = ServiceClient::new(&urls, &pem, &source, Timeouts::default())
            .map_err(|e| RunError::Usage(e.to_string()))?;
        Ok(Api { svc })
    }

    /// The service URL(s), for messages.
    fn base(&self) -> String {
        self.svc.urls().join(",")
    }

    async fn post<T: serde::Serialize, R: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        bearer: Option<&str>,
        body: &T,
    ) -> Result<R, ApiErr> {
        Ok(self.svc.post(path, bearer, body).await?)
    }

    /// Unauthenticated report of a failure before the client holds a secret.
    async fn boot_report(&self, report: &BootReport) -> Result<BootReportResponse, ApiErr> {
        self.post(routes::CLIENT_BOOT_REPORT, None, report).await
    }

    async fn upload_log(&self, secret: &str, text: String) -> Result<LogUploadResponse, ApiErr> {
        Ok(self.svc.post_text(routes::CLIENT_LOG, secret, text).await?)
    }
}

// ---------------------------------------------------------------- shared state

#[derive(Debug)]
struct Shared {
    report: ClientReport,
    command: ClientCommand,
    agent_address: String,
    bandwidth: Option<u64>,
    /// The service's compression setting (from the pairing, then every heartbeat answer).
    compression: CompressionMode,
    heartbeat_secs: u64,
    /// The launch asked for a full re-read and re-hash of both sides.
    verify_full: bool,
    /// Set when the service no longer knows the client (wiped, or replaced by a new pairing).
    unauthorized: bool,
}

struct State {
    shared: Mutex<Shared>,
    /// Command or agent address changed (wakes the replication loop).
    changed: Notify,
    /// Send a heartbeat now (wakes the heartbeat task).
    kick: Notify,
}

impl State {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn set_phase(&self, phase: ClientPhase, error: Option<String>) {
        let mut s = self.lock();
        s.report.phase = phase;
        s.report.error = error;
    }
}

/// Feeds per-disk progress into the report (and to the optional UI sink).
struct ReportProgress {
    state: Arc<State>,
    ui: Option<Arc<dyn Progress>>,
    /// Per disk: when its round started and the work done in it (for the ETA).
    rates: Mutex<std::collections::HashMap<String, DiskRate>>,
}

/// Work of one disk's round so far: bytes fetched (changes round) or compared (hash compare).
#[derive(Debug, Clone, Copy)]
struct DiskRate {
    started: Instant,
    changes: bool,
    done: u64,
}

/// Seconds until `left` more bytes are done at the rate `done` bytes per `elapsed`
/// (`None` before anything was measured; `Some(0)` when nothing is left).
fn eta_secs(left: u64, done: u64, elapsed: Duration) -> Option<u64> {
    if left == 0 {
        return Some(0);
    }
    let secs = elapsed.as_secs_f64();
    if done == 0 || secs <= 0.0 {
        return None;
    }
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    Some((left as f64 * secs / done as f64).ceil() as u64)
}

impl Progress for ReportProgress {
    fn disk_started(&self, disk: &str, total: u64) {
        {
            let mut s = self.state.lock();
            if let Some(d) = s.report.disks.iter_mut().find(|d| d.remote_id == disk) {
                d.total_bytes = total;
                d.rescanned_bytes = 0;
                d.replicated_bytes = 0;
                d.backlog_bytes = 0;
            }
        }
        if let Some(u) = &self.ui {
            u.disk_started(disk, total);
        }
    }
    fn disk_planned(&self, disk: &str, plan: &failback_replication::RoundPlan) {
        if let Ok(mut r) = self.rates.lock() {
            let rate = DiskRate {
                started: Instant::now(),
                changes: plan.changes,
                done: 0,
            };
            r.insert(disk.to_owned(), rate);
        }
        {
            let mut s = self.state.lock();
            if let Some(d) = s.report.disks.iter_mut().find(|d| d.remote_id == disk) {
                // A hash compare's backlog is unknown until compared: the service shows RESCAN.
                d.backlog_bytes = if plan.changes { plan.backlog_bytes } else { 0 };
                d.tracking = Some(plan.tracking.clone());
                d.lag_secs = plan
                    .lag_secs
                    .map(|l| std::time::Duration::from_secs_f64(l.max(0.0)).as_secs());
            }
        }
        self.state.kick.notify_one();
        if let Some(u) = &self.ui {
            u.disk_planned(disk, plan);
        }
    }
    fn disk_advanced(&self, disk: &str, compared: u64, fetched: u64) {
        {
            let mut s = self.state.lock();
            if let Some(d) = s.report.disks.iter_mut().find(|d| d.remote_id == disk) {
                d.backlog_bytes = d.backlog_bytes.saturating_sub(fetched);
                d.rescanned_bytes = d
                    .rescanned_bytes
                    .saturating_add(compared)
                    .min(d.total_bytes);
                d.replicated_bytes = d.rescanned_bytes;
                if let Some(r) = self
                    .rates
                    .lock()
                    .ok()
                    .as_mut()
                    .and_then(|r| r.get_mut(disk))
                {
                    r.done += if r.changes { fetched } else { compared };
                    let left = if r.changes {
                        d.backlog_bytes
                    } else {
                        d.total_bytes.saturating_sub(d.rescanned_bytes)
                    };
                    d.eta_secs = eta_secs(left, r.done, r.started.elapsed());
                }
            }
        }
        if let Some(u) = &self.ui {
            u.disk_advanced(disk, compared, fetched);
        }
    }
    fn disk_finished(&self, disk: &str, report: &DiskReport) {
        {
            let mut s = self.state.lock();
            if let Some(d) = s.report.disks.iter_mut().find(|d| d.remote_id == disk) {
                d.rescanned_bytes = d.total_bytes;
                d.replicated_bytes = d.total_bytes;
                d.backlog_bytes = 0;
                d.eta_secs = Some(0);
            }
        }
        if let Some(u) = &self.ui {
            u.disk_finished(disk, report);
        }
    }
    fn message(&self, msg: &str) {
        if let Some(u) = &self.ui {
            u.message(msg);
        }
    }
}

/// One heartbeat: send the current report, apply the answer.
async fn heartbeat_once(api: &Api, secret: &str, state: &State) -> Result<(), ApiErr> {
    let report = state.lock().report.clone();
    let r: Result<ClientCommandResponse, ApiErr> = api
        .post(routes::CLIENT_HEARTBEAT, Some(secret), &report)
        .await;
    match r {
        Ok(resp) => {
            let mut s = state.lock();
            let changed = s.command != resp.command
                || resp
                    .agent_address
                    .as_ref()
                    .is_some_and(|a| *a != s.agent_address);
            s.command = resp.command;
            if let Some(a) = resp.agent_address {
                s.agent_address = a;
            }
            s.bandwidth = resp.bandwidth_limit_mbps;
            s.compression = resp.compression;
            s.verify_full = resp.verify_full;
            s.heartbeat_secs = resp.heartbeat_interval_secs.max(1);
            drop(s);
            if changed {
                state.changed.notify_waiters();
            }
            Ok(())
        }
        Err(ApiErr::Refused(401, m)) => {
            state.lock().unauthorized = true;
            state.changed.notify_waiters();
            Err(ApiErr::Refused(401, m))
        }
        Err(e) => Err(e),
    }
}

// ---------------------------------------------------------------- the flow

async fn pair(
    api: &Api,
    opts: &RunOptions,
    mut inventory: Inventory,
    console: &Console,
) -> Result<PairAnswer, RunError> {
    // Hand-mapped local targets (image files in tests, by-id paths) must be in the inventory
    // so the service can check their size.
    if let Some(m) = &opts.mapping {
        for e in m.iter().filter(|e| !e.is_excluded()) {
            let known = inventory
                .disks
                .iter()
                .any(|d| d.path == e.local || d.by_path.as_deref() == Some(e.local.as_str()));
            if !known {
                let d = crate::inventory::disk_from_path(std::path::Path::new(&e.local)).map_err(
                    |err| RunError::Usage(format!("mapped local device {}: {err}", e.local)),
                )?;
                inventory.disks.push(d);
            }
        }
    }
    console.say(format!(
        "pairing with {} (SMBIOS UUID {}, {} disk(s), {} NIC(s))",
        api.svc.current_url(),
        inventory.smbios_uuid.as_deref().unwrap_or("unknown"),
        inventory.disks.len(),
        inventory.mac_addresses.len()
    ));
    let req = PairRequest {
        token: opts.token.clone(),
        inventory,
        recovery_instance_id: opts.instance.clone(),
        device_mapping: opts.mapping.clone(),
        client_version: Some(env!("CARGO_PKG_VERSION").to_string()),
    };
    let started = Instant::now();
    loop {
        match api.post::<_, PairAnswer>(routes::PAIR, None, &req).await {
            Ok(r) => return Ok(r),
            Err(ApiErr::Refused(_, message)) => {
                return Err(RunError::Refused {
                    url: api.base(),
                    message,
                })
            }
            Err(ApiErr::Transient(message)) => {
                if started.elapsed() > opts.pair_timeout {
                    return Err(RunError::Network {
                        url: api.base(),
                        message,
                    });
                }
                console.say(format!("service not reachable yet ({message}); retrying"));
                tokio::time::sleep(opts.retry_interval).await;
            }
        }
    }
}

/// Ships a failure that happened before the client held a secret to the service's boot-report
/// endpoint (best effort: says on the console whether it worked). An unreachable service
/// cannot be told, so network failures are only printed.
async fn report_boot_failure(
    api: &Api,
    opts: &RunOptions,
    console: &Console,
    smbios_uuid: Option<String>,
    stage: &str,
    e: &RunError,
) {
    console.say(format!("FAILED to {stage}: {e}"));
    if matches!(e, RunError::Network { .. }) {
        return;
    }
    let report = BootReport {
        token: Some(opts.token.clone()),
        smbios_uuid,
        recovery_instance_id: opts.instance.clone(),
        stage: stage.to_string(),
        message: tail_bytes(&e.to_string(), BOOT_REPORT_MAX_MESSAGE).to_string(),
        log: Some(console.tail(BOOT_REPORT_MAX_LOG)),
        client_version: Some(env!("CARGO_PKG_VERSION").to_string()),
    };
    match api.boot_report(&report).await {
        Ok(r) => console.say(format!(
            "failure reported to the DR service{}",
            r.recovery_instance_id
                .map(|i| format!(" (recovery instance {i})"))
                .unwrap_or_default()
        )),
        Err(ApiErr::Transient(m)) | Err(ApiErr::Refused(_, m)) => console.say(format!(
            "could not report the failure to the DR service: {m}"
        )),
    }
}

/// Classifies a failed round: `Ok(())` means "retry later" (network), `Err` is fatal.
fn round_error(e: failback_replication::Error) -> Result<String, RunError> {
    use failback_replication::ErrorClass;
    match e.class() {
        ErrorClass::Network => Ok(e.to_string()),
        ErrorClass::Verification => Err(RunError::Verification(e.to_string())),
        ErrorClass::LocalIo => Err(RunError::Unsafe(e.to_string())),
        ErrorClass::Usage => Err(RunError::Usage(e.to_string())),
        ErrorClass::Protocol => Err(RunError::Agent(e)),
    }
}

/// Waits up to `d`, returning early when the command or agent address changes.
/// Longest pause between hash-compare rounds that find nothing changed.
const MAX_IDLE_PAUSE: Duration = Duration::from_secs(300);

/// The pause before the next delta round: `base`, doubled for each hash-compare round in a row
/// that found nothing changed (each re-reads the whole source disk on the agent), up to
/// [`MAX_IDLE_PAUSE`] (never below `base`). Changes rounds cost only what changed: no backoff.
fn backoff(base: Duration, idle_compares: u32) -> Duration {
    let cap = MAX_IDLE_PAUSE.max(base);
    base.checked_mul(1u32 << idle_compares.min(16))
        .map_or(cap, |d| d.min(cap))
}

async fn pause(state: &State, d: Duration) {
    let _ = tokio::time::timeout(d, state.changed.notified()).await;
}

/// Runs the whole failback on the caller's tokio runtime. See the module documentation.
pub async fn run_async(opts: RunOptions) -> Result<RunOutcome, RunError> {
    let console = Arc::new(Console {
        buf: Mutex::new(String::new()),
        file: opts.log_file.clone(),
    });
    if opts.token.trim().is_empty() {
        return Err(RunError::Usage("pairing token is empty (--token)".into()));
    }
    let api = Api::new(&opts)?;
    let inventory = match &opts.inventory {
        Some(i) => i.clone(),
        None => crate::inventory::collect(),
    };
    let uuid = inventory.smbios_uuid.clone();
    // Before the client holds a secret, a failure goes to the unauthenticated boot-report
    // endpoint (the service files it under the token's instance); afterwards the heartbeat
    // carries it (CLIENT_FAILED) and the log is uploaded.
    let fail = |stage: &'static str, e: RunError| {
        let (api, opts, console, uuid) = (&api, &opts, &console, uuid.clone());
        async move {
            report_boot_failure(api, opts, console, uuid, stage, &e).await;
            e
        }
    };
    let paired = match pair(&api, &opts, inventory, &console).await {
        Ok(PairAnswer::Paired(p)) => *p,
        Ok(PairAnswer::Completed(c)) => {
            let done = c.failback_completed;
            console.say(format!(
                "FAILBACK_ALREADY_COMPLETED recovery instance {}: this pairing token belongs to a failback that completed{}; nothing to sync",
                done.recovery_instance_id,
                done.completed_at.map(|t| format!(" at {t} (Unix time)")).unwrap_or_default()
            ));
            return Ok(RunOutcome::AlreadyCompleted(done));
        }
        Err(e) => return Err(fail("pair", e).await),
    };
    let id = paired.recovery_instance_id.clone();
    console.say(format!(
        "paired with recovery instance {id} as client {} (matched by {:?}{}); agent {}",
        paired.client_id,
        paired.matched_by,
        if paired.failback_to_original_server {
            ", original server"
        } else {
            ""
        },
        paired.agent_address
    ));
    for m in &paired.device_mapping {
        let size = paired
            .remote_disks
            .iter()
            .find(|d| d.id == m.remote)
            .map(|d| mib(d.size_bytes))
            .unwrap_or_default();
        console.say(format!("  volume {} ({size}) -> {}", m.remote, m.local));
    }
    let tls = ClientTls::from_pem(
        paired.ca_pem.as_bytes(),
        paired.client_cert_pem.as_bytes(),
        paired.client_key_pem.as_bytes(),
    );
    let tls = match tls {
        Ok(t) => t,
        Err(e) => {
            let e = RunError::Internal(format!("client certificate from the service: {e}"));
            return Err(fail("setup", e).await);
        }
    };
    let mappings: Vec<Mapping> = paired
        .device_mapping
        .iter()
        .filter(|m| !m.is_excluded())
        .map(|m| Mapping {
            remote: m.remote.clone(),
            local: PathBuf::from(&m.local),
        })
        .collect();
    if mappings.is_empty() {
        let e = RunError::Usage(format!(
            "recovery instance {id}: every volume is EXCLUDEd; nothing to fail back"
        ));
        return Err(fail("setup", e).await);
    }
    let Ok(block_size) = u32::try_from(paired.block_size) else {
        let e = RunError::Usage(format!("block size {} too large", paired.block_size));
        return Err(fail("setup", e).await);
    };
    let state = Arc::new(State {
        shared: Mutex::new(Shared {
            report: ClientReport {
                phase: ClientPhase::Connecting,
                round: 0,
                disks: mappings
                    .iter()
                    .map(|m| DiskProgress {
                        remote_id: m.remote.clone(),
                        local_path: m.local.to_string_lossy().into_owned(),
                        total_bytes: paired
                            .remote_disks
                            .iter()
                            .find(|d| d.id == m.remote)
                            .map(|d| d.size_bytes)
                            .unwrap_or(0),
                        ..Default::default()
                    })
                    .collect(),
                last_round_differing_bytes: None,
                last_round_secs: None,
                last_consistent_at: None,
                digests: Vec::new(),
                error: None,
            },
            command: ClientCommand::Continue,
            agent_address: paired.agent_address.clone(),
            bandwidth: paired.bandwidth_limit_mbps,
            compression: paired.compression,
            heartbeat_secs: paired.heartbeat_interval_secs.max(1),
            unauthorized: false,
            verify_full: false,
        }),
        changed: Notify::new(),
        kick: Notify::new(),
    });
    let secret = paired.client_secret.clone();

    // Heartbeat task: reports progress, fetches commands; survives service restarts.
    let hb = {
        let (api, secret, state, console) =
            (api.clone(), secret.clone(), state.clone(), console.clone());
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                match heartbeat_once(&api, &secret, &state).await {
                    Ok(()) => {
                        if failing {
                            console.say("DR service reachable again");
                        }
                        failing = false;
                    }
                    Err(ApiErr::Transient(m)) | Err(ApiErr::Refused(_, m)) => {
                        if !failing {
                            console.say(format!(
                                "heartbeat failed: {m} (replication continues; retrying)"
                            ));
                        }
                        failing = true;
                    }
                }
                let secs = state.lock().heartbeat_secs;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(secs)) => {}
                    _ = state.kick.notified() => {}
                }
            }
        })
    };

    let progress: Arc<dyn Progress> = Arc::new(ReportProgress {
        state: state.clone(),
        ui: opts.progress.clone(),
        rates: Mutex::default(),
    });
    let result = replicate(
        &opts, &api, &secret, &state, &console, &tls, &mappings, block_size, &progress, &id,
    )
    .await;
    hb.abort();
    if let Err(e) = &result {
        // The service records it as CLIENT_FAILED with the cause (FAILBACK_ERROR). A digest
        // mismatch stays a Completed report: the service checks the digests itself.
        if state.lock().report.phase != ClientPhase::Completed {
            state.set_phase(
                ClientPhase::Failed,
                Some(tail_bytes(&e.to_string(), BOOT_REPORT_MAX_MESSAGE).to_string()),
            );
        }
    }

    // Final report (best effort, a few tries: the service may be restarting).
    for _ in 0..5 {
        match heartbeat_once(&api, &secret, &state).await {
            Ok(()) | Err(ApiErr::Refused(..)) => break,
            Err(ApiErr::Transient(_)) => tokio::time::sleep(opts.retry_interval).await,
        }
    }
    match &result {
        Ok(RunOutcome::Completed { digests, .. }) => {
            console.say(format!("FAILBACK_COMPLETED for {id}"));
            for d in digests {
                console.say(format!(
                    "  {} -> {}: blake3 {} (agent {})",
                    d.remote_id, d.local_path, d.local_digest, d.agent_digest
                ));
            }
        }
        Ok(RunOutcome::Stopped { .. }) => {
            console.say(format!("failback of {id} stopped by the operator"))
        }
        Ok(RunOutcome::AlreadyCompleted(_)) => {}
        Err(e) => console.say(format!("failback of {id} failed: {e}")),
    }
    if opts.upload_log {
        // The service refuses bodies over LOG_UPLOAD_MAX_BODY (413): send the newest part.
        let log = tail_bytes(&console.text(), LOG_UPLOAD_MAX_BODY - 4096).to_string();
        match api.upload_log(&secret, log).await {
            Ok(r) => console.say(format!("log uploaded to the DR service as {}", r.stored_as)),
            Err(ApiErr::Transient(m)) | Err(ApiErr::Refused(_, m)) => {
                console.say(format!("log upload failed: {m}"))
            }
        }
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn replicate(
    opts: &RunOptions,
    api: &Api,
    secret: &str,
    state: &Arc<State>,
    console: &Console,
    tls: &ClientTls,
    mappings: &[Mapping],
    block_size: u32,
    progress: &Arc<dyn Progress>,
    id: &str,
) -> Result<RunOutcome, RunError> {
    let mut session: Option<(String, Session)> = None;
    // The hashes of everything written: after round 1 the targets are not read again.
    let cache = Arc::new(failback_replication::HashCache::default());
    let mut round: u64 = 0;
    let mut consistent = false;
    let mut unreachable_reported = false;
    // Hash-compare rounds in a row that found nothing changed (they back off).
    let mut idle_compares: u32 = 0;
    // The final round resumes only what it verified itself (after the quiesce), never a prefix
    // of an earlier round (see failback_replication::resume).
    let mut final_started = false;
    // After a reboot mid-round: resume from the checkpoints stored at the DR service.
    let mut stored = checkpoints::restore(api, secret, &cache, mappings, console).await;
    loop {
        let (command, addr, bw, compression, hb_secs, unauthorized) = {
            let s = state.lock();
            (
                s.command,
                s.agent_address.clone(),
                s.bandwidth,
                s.compression,
                s.heartbeat_secs,
                s.unauthorized,
            )
        };
        if command == ClientCommand::Stop || unauthorized {
            state.set_phase(ClientPhase::Stopped, None);
            if let Some((_, s)) = session.take() {
                s.close().await;
            }
            return Ok(RunOutcome::Stopped {
                recovery_instance_id: id.to_string(),
            });
        }
        let launching = command == ClientCommand::Launch && consistent;
        // (Re)connect, also when the agent moved.
        if session.as_ref().is_some_and(|(a, _)| *a != addr) {
            console.say(format!("agent moved to {addr}; reconnecting"));
            if let Some((_, s)) = session.take() {
                s.close().await;
            }
        }
        if session.is_none() {
            match Session::connect(&addr, tls).await {
                Ok(s) => {
                    console.say(format!(
                        "connected to agent {addr} ({}; instance {})",
                        s.agent_software(),
                        s.agent_instance().unwrap_or("unscoped")
                    ));
                    // Safety rules before the first write: not mounted, not swap, not held,
                    // not the boot medium, large enough, same sector size.
                    let remote = s.check_mappings(mappings).map_err(RunError::Agent)?;
                    for (m, d) in mappings.iter().zip(&remote) {
                        crate::safety::check_target(&m.local, d)
                            .map_err(|r| RunError::Unsafe(r.to_string()))?;
                    }
                    unreachable_reported = false;
                    session = Some((addr.clone(), s));
                }
                Err(e) => {
                    let msg = round_error(e)?;
                    if !unreachable_reported {
                        console.say(format!("agent unreachable: {msg}; retrying"));
                        unreachable_reported = true;
                    }
                    state.set_phase(ClientPhase::AgentUnreachable, Some(msg));
                    pause(state, opts.retry_interval).await;
                    continue;
                }
            }
        }
        let Some((_, sess)) = session.as_ref() else {
            continue;
        };
        if launching {
            console.say("launch requested: final round");
            state.set_phase(ClientPhase::Finalizing, None);
            if opts.quiesce {
                match sess.quiesce().await {
                    Ok(out) => console.say(format!(
                        "agent quiesced{}",
                        if out.trim().is_empty() {
                            String::new()
                        } else {
                            format!(": {}", out.trim())
                        }
                    )),
                    Err(e) => {
                        let msg = round_error(e)?;
                        console.say(format!("quiesce failed: {msg}; retrying"));
                        session = None;
                        pause(state, opts.retry_interval).await;
                        continue;
                    }
                }
            }
        }
        round += 1;
        let started_at = now_secs();
        {
            let mut s = state.lock();
            s.report.round = round;
            if !launching {
                s.report.phase = ClientPhase::Syncing;
                s.report.error = None;
            }
        }
        // Report the round start at once (INITIAL_SYNC / RESCAN shows even for short rounds).
        state.kick.notify_one();
        let sync_opts = SyncOptions {
            block_size,
            bandwidth_limit_mbps: bw,
            compression: wire_compression(compression),
            ..Default::default()
        };
        console.say(format!(
            "round {round}: {} ({} disk(s){})",
            if launching {
                "final delta round"
            } else if round == 1 {
                "initial sync"
            } else {
                "delta round"
            },
            mappings.len(),
            bw.map(|b| format!(", limit {b} Mbit/s"))
                .unwrap_or_default()
        ));
        if launching && state.lock().verify_full {
            console.say("verify full: re-reading and re-hashing both sides in the final round");
            cache.clear();
        }
        if launching && !final_started {
            final_started = true;
            cache.forget_partial();
        }
        let t0 = Instant::now();
        // A stop request aborts a running round; everything written so far stays verified.
        let outcome = tokio::select! {
            r = sess.sync_cached(mappings, &sync_opts, progress.clone(), &cache) => Some(r),
            _ = async {
                loop {
                    state.changed.notified().await;
                    let s = state.lock();
                    if s.command == ClientCommand::Stop || s.unauthorized { break; }
                }
            } => None,
        };
        let Some(outcome) = outcome else {
            round -= 1;
            continue; // the loop top handles the stop
        };
        match outcome {
            Ok(report) => {
                let differing = report.bytes_differing();
                // The kind: `changes` when every disk sent only what its tracker saw change,
                // else `compare` (a hash compare of some disk; the bench parses this line).
                let kind = if report.disks.iter().all(|d| d.round_kind == "changes") {
                    "changes"
                } else {
                    "compare"
                };
                console.say(format!(
                    "round {round} done in {:.3}s ({kind}): {} differed, {} fetched",
                    t0.elapsed().as_secs_f64(),
                    mib(differing),
                    mib(report.bytes_fetched())
                ));
                for d in &report.disks {
                    console.say(format!("  disk {}: {}", d.remote_id, d.wire.summary()));
                }
                consistent = true;
                if stored {
                    stored = checkpoints::store(api, secret, &cache, console).await;
                }
                {
                    let mut s = state.lock();
                    s.report.last_round_differing_bytes = Some(differing);
                    add_round_bytes(&mut s.report.disks, &report);
                    s.report.last_round_secs = Some(t0.elapsed().as_secs_f64());
                    s.report.last_consistent_at = Some(started_at);
                    if !launching {
                        s.report.phase = ClientPhase::Idle;
                    }
                }
                if launching {
                    console.say(format!(
                        "final round took {:.3}s (after the quiesce: changed blocks + digests; \
                         the downtime on the agent side)",
                        t0.elapsed().as_secs_f64()
                    ));
                    return finish(state, console, &report, id);
                }
                // Tell the service right away (READY_FOR_LAUNCH shows without a heartbeat delay).
                state.kick.notify_one();
                idle_compares = if kind == "compare" && differing == 0 {
                    idle_compares.saturating_add(1)
                } else {
                    0
                };
                let base = opts.delta_interval.unwrap_or(Duration::from_secs(hb_secs));
                let wait = backoff(base, idle_compares);
                if wait > base {
                    console.say(format!(
                        "nothing changed in {idle_compares} hash-compare round(s): next round in {}s",
                        wait.as_secs()
                    ));
                }
                pause(state, wait).await;
            }
            Err(e) => {
                round -= 1;
                let msg = round_error(e)?;
                let at: Vec<String> = cache
                    .resume_points()
                    .iter()
                    .map(|(p, o)| format!("{} at {}", p.display(), mib(*o)))
                    .collect();
                console.say(format!(
                    "round interrupted: {msg}; reconnecting{}",
                    if at.is_empty() {
                        String::new()
                    } else {
                        format!(" (resuming {})", at.join(", "))
                    }
                ));
                state.set_phase(ClientPhase::AgentUnreachable, Some(msg));
                state.kick.notify_one();
                stored = checkpoints::store(api, secret, &cache, console).await;
                session = None;
                pause(state, opts.retry_interval).await;
            }
        }
    }
}

/// Compares digests, flushes, records the completion report.
fn finish(
    state: &State,
    console: &Console,
    report: &SyncReport,
    id: &str,
) -> Result<RunOutcome, RunError> {
    let digests: Vec<DiskDigest> = report
        .disks
        .iter()
        .map(|d| DiskDigest {
            remote_id: d.remote_id.clone(),
            local_path: d.local_path.to_string_lossy().into_owned(),
            local_digest: d.digest.clone().unwrap_or_default(),
            agent_digest: d.agent_digest.clone(),
        })
        .collect();
    // The engine syncs each target at the end of a round; flush once more so a power cut
    // after we report COMPLETED cannot lose what the report claims.
    for d in &report.disks {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&d.local_path)
            .and_then(|f| f.sync_all());
        if let Err(e) = f {
            return Err(RunError::Unsafe(format!(
                "flushing {}: {e}",
                d.local_path.display()
            )));
        }
    }
    let bad: Vec<&DiskDigest> = digests
        .iter()
        .filter(|d| d.local_digest.is_empty() || d.local_digest != d.agent_digest)
        .collect();
    let mismatch = bad
        .iter()
        .map(|d| {
            format!(
                "{} -> {}: local {} agent {}",
                d.remote_id, d.local_path, d.local_digest, d.agent_digest
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    {
        let mut s = state.lock();
        s.report.phase = ClientPhase::Completed;
        s.report.digests = digests.clone();
        s.report.error = (!bad.is_empty()).then(|| mismatch.clone());
    }
    if !bad.is_empty() {
        console.say(format!("digest mismatch: {mismatch}"));
        return Err(RunError::Verification(mismatch));
    }
    Ok(RunOutcome::Completed {
        recovery_instance_id: id.to_string(),
        digests,
    })
}

/// Runs the whole failback (own tokio runtime; for callers that have none, such as the
/// appliance boot flow and `failback-client run`). Must not be called from inside a runtime:
/// use [`run_async`] there.
pub fn run(opts: RunOptions) -> Result<RunOutcome, RunError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| RunError::Internal(format!("tokio runtime: {e}")))?;
    rt.block_on(run_async(opts))
}

// ---------------------------------------------------------------- CLI

/// Arguments of `failback-client run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// DR service URL, e.g. https://10.0.2.2:8443. Several replicas: repeat the flag or
    /// separate them by commas; the client moves to the next when one cannot be reached.
    #[arg(
        long = "server",
        env = "FAILBACK_SERVER",
        value_delimiter = ',',
        required = true
    )]
    pub servers: Vec<String>,
    /// One-time pairing token (from `failback token create pairing`).
    #[arg(long, env = "FAILBACK_PAIRING_TOKEN", hide_env_values = true)]
    pub token: String,
    /// CA certificate (PEM) of the DR service, pinned (no system roots).
    #[arg(long, env = "FAILBACK_CA")]
    pub ca: Option<PathBuf>,
    /// Recovery instance to fail back (default: the token's scope, or auto-match by SMBIOS UUID).
    #[arg(long)]
    pub instance: Option<String>,
    /// Device mapping override: `remote=local,...` CSV, a JSON object, or the API list
    /// (`[{"remote":..,"local":..}]`); `EXCLUDE` skips a volume. Repeatable (CSV parts).
    #[arg(long = "map", value_name = "MAPPING")]
    pub maps: Vec<String>,
    /// Do not ask the agent to quiesce before the final round.
    #[arg(long)]
    pub no_quiesce: bool,
    /// Seconds between delta rounds (default: the service's heartbeat interval).
    #[arg(long)]
    pub delta_interval_secs: Option<u64>,
    /// Seconds between retries when the agent or service is unreachable.
    #[arg(long, default_value_t = 3)]
    pub retry_secs: u64,
    /// Also append console lines to this file.
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    /// Do not upload the run log to the DR service at the end.
    #[arg(long)]
    pub no_log_upload: bool,
    /// Progress display for sync rounds (auto, plain, json).
    #[arg(long, value_enum, default_value = "plain")]
    pub progress: crate::progress::ProgressMode,
}

impl RunArgs {
    /// Turns flags into [`RunOptions`].
    pub fn options(&self) -> Result<RunOptions, RunError> {
        let mapping = if self.maps.is_empty() {
            None
        } else {
            let joined = if self.maps.len() == 1 {
                self.maps[0].clone()
            } else {
                self.maps.join(",")
            };
            Some(
                parse_device_mapping(&joined)
                    .map_err(|e| RunError::Usage(format!("--map: {e}")))?,
            )
        };
        let mut o = RunOptions::new(self.servers.join(","), &self.token);
        o.ca = self.ca.clone();
        o.instance = self.instance.clone();
        o.mapping = mapping;
        o.quiesce = !self.no_quiesce;
        o.delta_interval = self.delta_interval_secs.map(Duration::from_secs);
        o.retry_interval = Duration::from_secs(self.retry_secs.max(1));
        o.log_file = self.log_file.clone();
        o.upload_log = !self.no_log_upload;
        o.progress = Some(crate::progress::make(self.progress));
        Ok(o)
    }
}

/// Entry point of the `run` subcommand: runs it, prints a failure, returns the exit code.
pub fn main(args: RunArgs) -> crate::exit::Exit {
    use crate::exit::Exit;
    let res = args.options().and_then(run);
    match res {
        Ok(RunOutcome::Completed { .. }) | Ok(RunOutcome::AlreadyCompleted(_)) => Exit::Ok,
        Ok(RunOutcome::Stopped { .. }) => Exit::Stopped,
        Err(e) => {
            eprintln!("failback-client: error: {e}");
            match e.exit_code() {
                2 => Exit::Usage,
                3 => Exit::UnsafeTarget,
                4 => Exit::Network,
                5 => Exit::Verification,
                6 => Exit::Agent,
                7 => Exit::DrRefused,
                _ => Exit::Internal,
            }
        }
    }
}

/// Adds a finished round's per-disk counts (bytes that differed, bytes fetched) to the
/// totals the service receives, so the admin sees what a delta really cost.
fn add_round_bytes(disks: &mut [DiskProgress], report: &SyncReport) {
    for r in &report.disks {
        if let Some(d) = disks.iter_mut().find(|d| d.remote_id == r.remote_id) {
            d.differing_bytes = Some(d.differing_bytes.unwrap_or(0) + r.bytes_differing);
            d.fetched_bytes = Some(d.fetched_bytes.unwrap_or(0) + r.bytes_fetched);
            add_wire(d, &r.wire);
        }
    }
}

/// Adds a round's wire figures of one disk (see `DiskProgress::wire_bytes` and the next
/// fields): counts summed over the rounds, mode and rates of the last round.
// `as` from f64 saturates (and a rate is finite and non-negative): intended.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn add_wire(d: &mut DiskProgress, w: &failback_replication::wirestats::WireReport) {
    let sum = |v: Option<u64>, n: u64| Some(v.unwrap_or(0).saturating_add(n));
    d.wire_bytes = sum(d.wire_bytes, w.received_bytes);
    d.payload_bytes = sum(d.payload_bytes, w.payload_bytes);
    d.compressed_blocks = sum(d.compressed_blocks, w.blocks_zstd);
    d.raw_blocks = sum(d.raw_blocks, w.blocks_raw);
    d.compression = serde_json::to_value(w.compression)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned));
    d.wire_bytes_per_sec = Some(w.rate_bytes_per_sec as u64);
    d.link_bytes_per_sec = w.link_bytes_per_sec.map(|l| l as u64);
}

/// The service's setting as the wire protocol's (the API crate does not link the engine).
fn wire_compression(c: CompressionMode) -> failback_replication::wire::Compression {
    match c {
        CompressionMode::Auto => failback_replication::wire::Compression::Auto,
        CompressionMode::Zstd => failback_replication::wire::Compression::Zstd,
        CompressionMode::None => failback_replication::wire::Compression::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_compare_rounds_back_off_exponentially_up_to_the_cap() {
        let s = Duration::from_secs;
        assert_eq!(backoff(s(10), 0), s(10));
        assert_eq!(backoff(s(10), 1), s(20));
        assert_eq!(backoff(s(10), 3), s(80));
        assert_eq!(backoff(s(10), 5), MAX_IDLE_PAUSE);
        assert_eq!(backoff(s(10), u32::MAX), MAX_IDLE_PAUSE);
        assert_eq!(backoff(s(900), 4), s(900), "never below the interval");
    }

    #[test]
    fn eta_is_what_is_left_at_the_measured_rate() {
        let s = Duration::from_secs;
        assert_eq!(eta_secs(0, 0, s(0)), Some(0));
        assert_eq!(eta_secs(100, 0, s(3)), None, "no rate yet");
        assert_eq!(eta_secs(300, 100, s(2)), Some(6));
        assert_eq!(eta_secs(1, 3, s(1)), Some(1), "rounded up");
    }
}
