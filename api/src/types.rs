//! Every JSON body of the DR-service HTTP API, shared by the service (`failback-server`), the
//! client (`failback-client run`), the agent (`failback-agent serve --server`) and the admin CLI
//! (`failback`). Request bodies use `deny_unknown_fields` so that a typo is a 400 naming the
//! field, never a silently ignored setting.
//!
//! State names are those of AWS DRS (`FAILBACK_NOT_STARTED`, `CONTINUOUS`, `AGENT_NOT_SEEN`, ...)
//! so that operators who know DRS read our output without a glossary.
//!
//! Times are Unix seconds (UTC) as `u64`; `None` means "never".
//!
//! The routes that carry them are in [`crate::routes`].

use serde::{Deserialize, Serialize};
use std::fmt;

/// Failback state of a recovery instance (AWS `FailbackState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FailbackState {
    #[default]
    FailbackNotStarted,
    FailbackInProgress,
    FailbackReadyForLaunch,
    FailbackCompleted,
    FailbackError,
    FailbackNotReadyForLaunch,
}

/// Data replication state (AWS `dataReplicationState`, failback subset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReplicationState {
    #[default]
    NotStarted,
    Stopped,
    Initiating,
    InitialSync,
    Rescan,
    Continuous,
    Backlog,
    Stalled,
    Disconnected,
}

/// Replication errors (AWS `FailbackReplicationError`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReplicationError {
    AgentNotSeen,
    FailbackClientNotSeen,
    NotConverging,
    UnstableNetwork,
    FailedToEstablishRecoveryInstanceCommunication,
    FailedToPairAgentWithReplicationSoftware,
    FailedToEstablishAgentReplicatorSoftwareCommunication,
    VerificationFailed,
}

macro_rules! display_as_serde {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match serde_json::to_value(self) {
                    Ok(serde_json::Value::String(s)) => f.write_str(&s),
                    _ => write!(f, "{self:?}"),
                }
            }
        }
    )*};
}
display_as_serde!(
    FailbackState,
    ReplicationState,
    ReplicationError,
    InitiationStepName,
    StepStatus,
    TokenKind,
    ClientCommand
);

/// Initiation steps on the failback path (AWS `RecoveryInstanceDataReplicationInitiationStepName`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InitiationStepName {
    LinkFailbackClientWithRecoveryInstance,
    CompleteVolumeMapping,
    EstablishRecoveryInstanceCommunication,
    ConfigureReplicationSoftware,
    PairAgentWithReplicationSoftware,
    EstablishAgentReplicatorSoftwareCommunication,
}

impl InitiationStepName {
    /// The steps in the order they happen.
    pub const ALL: [InitiationStepName; 6] = [
        Self::LinkFailbackClientWithRecoveryInstance,
        Self::CompleteVolumeMapping,
        Self::EstablishRecoveryInstanceCommunication,
        Self::ConfigureReplicationSoftware,
        Self::PairAgentWithReplicationSoftware,
        Self::EstablishAgentReplicatorSoftwareCommunication,
    ];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StepStatus {
    #[default]
    NotStarted,
    InProgress,
    Succeeded,
    Failed,
    Skipped,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitiationStep {
    pub name: InitiationStepName,
    pub status: StepStatus,
}

/// Per-disk progress (AWS `totalStorageBytes`, `replicatedStorageBytes`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DiskProgress {
    /// Volume id on the recovery instance (as reported by the agent).
    pub remote_id: String,
    /// Local device on the failback client.
    pub local_path: String,
    pub total_bytes: u64,
    /// Bytes verified equal to the recovery volume in the current round.
    pub replicated_bytes: u64,
    /// Bytes compared (hashed) in the current round.
    pub rescanned_bytes: u64,
    /// Bytes known to differ and not yet written: what the agent's change tracker saw
    /// change and the client has not received yet.
    pub backlog_bytes: u64,
    /// Bytes that differed from the recovery volume and were written, summed over the
    /// rounds of this failback so far (the client's own count; absent from older clients).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub differing_bytes: Option<u64>,
    /// Payload bytes received for those blocks (after compression; zero blocks cost
    /// nothing), summed over the rounds of this failback so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetched_bytes: Option<u64>,
    /// The agent's change tracking for this disk in the current round: `on`,
    /// `unavailable: <why>` or `rescan: <why>` (a hash compare of the whole disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking: Option<String>,
    /// Age in seconds of the oldest change not yet received, at the round's start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_secs: Option<u64>,
    /// Seconds until this disk's round is done, at the rate measured in it: the backlog
    /// (changes round) or the bytes left to compare (hash compare) over bytes per second so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_secs: Option<u64>,
    /// Protocol bytes received for this disk (blocks after compression, answers, frame
    /// headers; TLS overhead not included), summed over the rounds of this failback so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wire_bytes: Option<u64>,
    /// Decoded size of the blocks received with a payload (before compression), summed over
    /// the rounds; `payload_bytes / fetched_bytes` is the compression ratio achieved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_bytes: Option<u64>,
    /// Blocks received zstd-compressed, summed over the rounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compressed_blocks: Option<u64>,
    /// Blocks received as they are (no compression), summed over the rounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_blocks: Option<u64>,
    /// Compression mode of the last round: `auto`, `zstd` or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    /// Wire bytes per second of this disk in the last round (its wire bytes over its time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wire_bytes_per_sec: Option<u64>,
    /// The link's measured capacity in the last round's session: the best receive rate of the
    /// connection over any 0.5 s interval, bytes per second (a lower bound of the link's rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_bytes_per_sec: Option<u64>,
}

impl DiskProgress {
    /// Compression ratio achieved over the rounds so far: decoded payload over payload bytes
    /// received (`None` before any payload).
    pub fn compression_ratio(&self) -> Option<f64> {
        match (self.payload_bytes, self.fetched_bytes) {
            (Some(p), Some(f)) if f > 0 => Some(p as f64 / f as f64),
            _ => None,
        }
    }

    /// One line of wire figures, e.g. `12.0 MiB on the wire, 40 % of blocks zstd (auto),
    /// ratio 1.80, 180 Mbit/s of the link's measured 190`; `None` from clients that do not
    /// report them.
    pub fn wire_summary(&self) -> Option<String> {
        let wire = self.wire_bytes?;
        let mut s = format!("{:.1} MiB on the wire", wire as f64 / (1u64 << 20) as f64);
        let (z, r) = (
            self.compressed_blocks.unwrap_or(0),
            self.raw_blocks.unwrap_or(0),
        );
        let mode = self.compression.as_deref().unwrap_or("-");
        if z + r > 0 {
            let share = z as f64 * 100.0 / (z + r) as f64;
            s += &format!(", {share:.0} % of blocks zstd ({mode})");
        } else {
            s += &format!(", no payload ({mode})");
        }
        if let Some(ratio) = self.compression_ratio() {
            s += &format!(", ratio {ratio:.2}");
        }
        let mbit = |b: u64| b as f64 * 8.0 / 1e6;
        if let Some(rate) = self.wire_bytes_per_sec {
            s += &format!(", {:.0} Mbit/s", mbit(rate));
            if let Some(link) = self.link_bytes_per_sec {
                s += &format!(" of the link's measured {:.0}", mbit(link));
            }
        }
        Some(s)
    }
}

/// Identification hints of the original source server (AWS `IdentificationHints`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct IdentificationHints {
    /// VMware BIOS UUID (== SMBIOS UUID seen by the guest), lower-case with dashes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmware_uuid: Option<String>,
    /// vCenter instance UUID of the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mac_addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fqdn: Option<String>,
}

/// Normalises an SMBIOS / VMware BIOS UUID for comparison (lower case, dashes kept).
pub fn normalize_uuid(s: &str) -> String {
    s.trim().to_ascii_lowercase()
}

// ---------------------------------------------------------------- hardware inventory

/// Hardware inventory of the machine running the failback client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    /// SMBIOS system UUID (`/sys/class/dmi/id/product_uuid`); on VMware the BIOS UUID.
    #[serde(default)]
    pub smbios_uuid: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub mac_addresses: Vec<String>,
    #[serde(default)]
    pub disks: Vec<InventoryDisk>,
    #[serde(default)]
    pub cpus: Vec<InventoryCpu>,
    #[serde(default)]
    pub ram_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct InventoryDisk {
    /// Device path, e.g. `/dev/sda` (or a plain file in tests).
    pub path: String,
    pub size_bytes: u64,
    #[serde(default = "default_sector")]
    pub logical_sector_size: u32,
    #[serde(default)]
    pub serial: Option<String>,
    #[serde(default)]
    pub wwn: Option<String>,
    /// `/dev/disk/by-path/...` link naming this disk, if any (stable across boots).
    #[serde(default)]
    pub by_path: Option<String>,
}

fn default_sector() -> u32 {
    512
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct InventoryCpu {
    pub model: String,
    pub cores: u32,
}

// ---------------------------------------------------------------- device mapping

pub use failback_config::mapping::{
    parse_device_mapping, validate_mapping, DeviceMapping, MappingParseError, EXCLUDE,
};

// ---------------------------------------------------------------- pairing

/// `POST /v1/pair`: the client presents a one-time pairing token and its inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairRequest {
    pub token: String,
    pub inventory: Inventory,
    /// Recovery instance the operator chose (`--instance`); must match the token's scope.
    #[serde(default)]
    pub recovery_instance_id: Option<String>,
    /// Mapping override (`--map`); replaces the suggestion entirely.
    #[serde(default)]
    pub device_mapping: Option<Vec<DeviceMapping>>,
    /// Client software version, for the event log.
    #[serde(default)]
    pub client_version: Option<String>,
}

/// How the service chose the recovery instance for a pairing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MatchReason {
    /// The token was scoped to this instance.
    TokenScope,
    /// SMBIOS UUID of the client equals the VMware BIOS UUID of the source server.
    SmbiosUuid,
}

/// How the agent encodes the blocks it sends a client (the service's `--compression`, handed to
/// clients at pairing and in every heartbeat answer; `failback-client sync --compression`
/// chooses it for a manual sync).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CompressionMode {
    /// zstd-1 when the link is the bottleneck, raw when the CPU is.
    #[default]
    Auto,
    /// zstd-1 for every block it shrinks.
    Zstd,
    /// Never compress.
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairResponse {
    pub recovery_instance_id: String,
    pub client_id: String,
    /// Bearer secret for `/v1/client/*` calls (shown once; the service keeps only a hash).
    pub client_secret: String,
    pub matched_by: MatchReason,
    /// True when the client is the original source server (identity mapping, rescan).
    pub failback_to_original_server: bool,
    /// `host:port` of the recovery agent's replication endpoint.
    pub agent_address: String,
    /// CA that signed the agent certificate (PEM); pin it, never system roots.
    pub ca_pem: String,
    /// Client certificate naming `urn:failback:instance:<id>` (PEM).
    pub client_cert_pem: String,
    pub client_key_pem: String,
    pub device_mapping: Vec<DeviceMapping>,
    /// Volumes of the recovery instance (for display and size checks).
    pub remote_disks: Vec<AgentDisk>,
    pub block_size: u64,
    /// Bandwidth limit in Mbit/s (`None` = unlimited).
    pub bandwidth_limit_mbps: Option<u64>,
    pub heartbeat_interval_secs: u64,
    /// With `command` LAUNCH: re-read and re-hash both sides in the final round.
    #[serde(default)]
    pub verify_full: bool,
    /// Compression the client asks of the agent (absent from older services: `auto`).
    #[serde(default)]
    pub compression: CompressionMode,
}

/// `POST /v1/pair` answer to a pairing token that was already used for a failback that has
/// since completed: the appliance booted again on the failed-back machine (ISO still
/// attached, USB stick still in, boot order unchanged). Not an error: the client compares its
/// disks with `digests` and boots the local disk (or says what to detach).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletedFailback {
    pub recovery_instance_id: String,
    /// When the failback completed (Unix seconds).
    pub completed_at: Option<u64>,
    /// The disks as the client reported them at completion.
    pub disks: Vec<CompletedDisk>,
    /// Block size the digests were computed with (BLAKE3 over the per-block hashes).
    pub block_size: u64,
}

/// One restored disk of a [`CompletedFailback`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletedDisk {
    pub remote_id: String,
    /// The restored disk's device on the booting machine: the service finds it in the new
    /// inventory as the pairing did (the seed's mapping, else the serial / WWN / by-path link
    /// the disk had at pairing, else the suggestion rules), since names like `/dev/sda` can
    /// change between boots.
    pub local_path: String,
    /// Bytes the digest covers (the recovery volume's size).
    pub size_bytes: u64,
    /// BLAKE3 (hex) whole-disk digest, equal on both sides at completion.
    pub digest: String,
}

/// The body of a `POST /v1/pair` answer with `failback_completed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairCompleted {
    pub failback_completed: CompletedFailback,
}

/// What `POST /v1/pair` answers (200): a new pairing, or "this failback already completed".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PairAnswer {
    Paired(Box<PairResponse>),
    Completed(PairCompleted),
}

// ---------------------------------------------------------------- client reports and commands

/// What the client is doing right now; the service derives the replication state from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ClientPhase {
    /// Connecting to the agent.
    Connecting,
    /// A sync round is running (`round` 1 = initial sync / rescan).
    Syncing,
    /// Between delta rounds, disks equal as of the last round.
    Idle,
    /// Cannot reach the agent.
    AgentUnreachable,
    /// Launch: final round and verification running.
    Finalizing,
    /// Launch finished; digests in `digests`.
    Completed,
    /// Gave up with an error (`error`).
    Failed,
    /// Stopped on operator request.
    Stopped,
}

/// One whole-disk digest pair after the final round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskDigest {
    pub remote_id: String,
    pub local_path: String,
    /// BLAKE3 (hex) of the local disk after the final round.
    pub local_digest: String,
    /// BLAKE3 (hex) of the recovery volume as computed by the agent.
    pub agent_digest: String,
}

/// `POST /v1/client/heartbeat` body: heartbeat + progress report in one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientReport {
    pub phase: ClientPhase,
    /// 1-based sync round number (0 before the first round).
    #[serde(default)]
    pub round: u64,
    #[serde(default)]
    pub disks: Vec<DiskProgress>,
    /// Bytes that differed in the last finished round.
    #[serde(default)]
    pub last_round_differing_bytes: Option<u64>,
    /// Duration of the last finished round in seconds.
    #[serde(default)]
    pub last_round_secs: Option<f64>,
    /// Unix time at which the disks were last equal to the recovery volumes.
    #[serde(default)]
    pub last_consistent_at: Option<u64>,
    #[serde(default)]
    pub digests: Vec<DiskDigest>,
    #[serde(default)]
    pub error: Option<String>,
}

/// What the service asks the client to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ClientCommand {
    /// Keep replicating.
    Continue,
    /// Final round, verify, report `COMPLETED`, exit 0.
    Launch,
    /// Stop cleanly (exit 8).
    Stop,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCommandResponse {
    pub command: ClientCommand,
    pub failback_state: FailbackState,
    pub replication_state: ReplicationState,
    /// Current agent address (it may change when the agent restarts).
    pub agent_address: Option<String>,
    pub bandwidth_limit_mbps: Option<u64>,
    pub heartbeat_interval_secs: u64,
    /// With `command` LAUNCH: re-read and re-hash both sides in the final round.
    #[serde(default)]
    pub verify_full: bool,
    /// Compression the client asks of the agent (absent from older services: `auto`).
    #[serde(default)]
    pub compression: CompressionMode,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogUploadResponse {
    pub stored_as: String,
    pub bytes: u64,
}

/// `POST /v1/client/boot-report`, unauthenticated: a failure the appliance or client hit
/// before it held a client secret (pairing refused: token used/expired/unknown, mapped disk
/// too small, ...), so the admin sees the cause in the event log (`CLIENT_BOOT_FAILED`)
/// instead of only on a console nobody watches. The service files it under the recovery
/// instance of the pairing token it names (known to the service even when used or expired)
/// or of the BIOS UUID; it limits size ([`BOOT_REPORT_MAX_BODY`]) and rate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct BootReport {
    /// The pairing token the client tried.
    #[serde(default)]
    pub token: Option<String>,
    /// SMBIOS (VMware BIOS) UUID of the machine.
    #[serde(default)]
    pub smbios_uuid: Option<String>,
    /// Recovery instance the client asked for, if any.
    #[serde(default)]
    pub recovery_instance_id: Option<String>,
    /// Step that failed: lowercase word, e.g. `pair`, `setup`.
    pub stage: String,
    /// The cause, as printed on the console (at most [`BOOT_REPORT_MAX_MESSAGE`] bytes).
    pub message: String,
    /// Tail of the console log (at most [`BOOT_REPORT_MAX_LOG`] bytes).
    #[serde(default)]
    pub log: Option<String>,
    #[serde(default)]
    pub client_version: Option<String>,
}

/// Limits of a [`BootReport`]; larger reports are refused (413 / 400 naming the field).
pub const BOOT_REPORT_MAX_MESSAGE: usize = 2 << 10;
pub const BOOT_REPORT_MAX_LOG: usize = 32 << 10;
pub const BOOT_REPORT_MAX_BODY: usize = 48 << 10;
/// Largest client log upload (`POST /client/log`); the service answers 413 beyond it.
pub const LOG_UPLOAD_MAX_BODY: usize = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootReportResponse {
    /// Where the report was filed (`None`: neither token nor UUID known to the service).
    pub recovery_instance_id: Option<String>,
    /// Name of the stored console log (under the instance's logs), if one was stored.
    pub stored_as: Option<String>,
}

/// Cuts `s` to at most `max` bytes on a char boundary, keeping the end (the newest lines of
/// a log, the cause at the end of an error chain).
pub fn tail_bytes(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut i = s.len() - max;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

// ---------------------------------------------------------------- agent

/// A volume served by the recovery agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AgentDisk {
    /// Volume id as the agent names it in its replication manifest.
    pub id: String,
    pub size_bytes: u64,
    #[serde(default = "default_sector")]
    pub logical_sector_size: u32,
    /// Device name on the recovery instance, e.g. `/dev/xvdb`.
    #[serde(default)]
    pub device: Option<String>,
}

/// `POST /v1/agent/enroll`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentEnrollRequest {
    pub token: String,
    /// `host:port` clients should dial for replication.
    pub address: String,
    /// Private address, used when the instance's config says `use_private_ip`.
    #[serde(default)]
    pub private_address: Option<String>,
    pub disks: Vec<AgentDisk>,
    #[serde(default)]
    pub hostname: Option<String>,
    /// Identification hints of the source server this instance was recovered from.
    #[serde(default)]
    pub source_hints: Option<IdentificationHints>,
    /// Refused unless empty: agent certificates carry only `failback-agent` and the instance
    /// (kept so that agents of the previous release, which send `[]`, still enroll).
    #[serde(default)]
    pub cert_sans: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentEnrollResponse {
    pub recovery_instance_id: String,
    /// Bearer secret for `/v1/agent/*` calls.
    pub agent_secret: String,
    pub ca_pem: String,
    /// Agent server certificate (agent role, DNS SAN `failback-agent`, instance URI SAN).
    pub agent_cert_pem: String,
    pub agent_key_pem: String,
    pub heartbeat_interval_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentHeartbeat {
    pub address: String,
    #[serde(default)]
    pub private_address: Option<String>,
    /// Present when the disks changed since enrollment.
    #[serde(default)]
    pub disks: Option<Vec<AgentDisk>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentHeartbeatResponse {
    pub recovery_instance_id: String,
    pub heartbeat_interval_secs: u64,
    /// SHA-256 fingerprints (hex) of the client certificates the agent may serve now: the
    /// current pairing's while a failback is in progress, none after stop or completion.
    /// The agent closes connections of certificates not on it (revocation).
    #[serde(default)]
    pub allowed_clients: Option<Vec<String>>,
}

// ---------------------------------------------------------------- admin

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    /// One-time token a failback client pairs with.
    Pairing,
    /// One-time token a recovery agent enrolls with.
    Agent,
}

/// `POST /v1/admin/tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    pub kind: TokenKind,
    /// Pairing: scope to this instance (`None` = auto-match by SMBIOS UUID).
    /// Agent: enroll as this (existing or new) instance id (`None` = new id).
    #[serde(default)]
    pub recovery_instance_id: Option<String>,
    /// Lifetime in seconds (default 3600, max 30 days).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenResponse {
    /// The token; shown once, the service stores only its hash.
    pub token: String,
    pub kind: TokenKind,
    pub recovery_instance_id: Option<String>,
    pub expires_at: u64,
}

/// Failback replication configuration (AWS `Get/UpdateFailbackReplicationConfiguration`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// Outbound limit in Mbit/s; 0 = unlimited.
    #[serde(default)]
    pub bandwidth_throttling_mbps: u64,
    /// Clients dial the agent's private address.
    #[serde(default)]
    pub use_private_ip: bool,
    #[serde(default)]
    pub name: Option<String>,
}

/// `PUT /v1/admin/instances/{id}/config`: fields left out keep their value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct UpdateReplicationConfig {
    #[serde(default)]
    pub bandwidth_throttling_mbps: Option<u64>,
    #[serde(default)]
    pub use_private_ip: Option<bool>,
    #[serde(default)]
    pub name: Option<String>,
}

/// `POST /v1/admin/launch` (AWS `StartFailbackLaunch`): 1..=200 ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchRequest {
    pub recovery_instance_ids: Vec<String>,
    /// How the final round checks the disks; `None`: the service's `--launch-verify` default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<LaunchVerify>,
}

/// How the final round at launch checks the disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LaunchVerify {
    /// Quiesce, send the blocks changed since the last round, compare the whole-disk digests
    /// kept up to date from cached hashes on both sides.
    #[default]
    Changes,
    /// Also re-read and re-hash both disks completely (the client's target and the agent's
    /// volume) before comparing the digests.
    Full,
}

/// Per-instance result of a launch request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchResult {
    pub recovery_instance_id: String,
    pub accepted: bool,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchResponse {
    pub job_id: String,
    pub results: Vec<LaunchResult>,
}

/// The agent side of a recovery instance as the service last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AgentStatus {
    pub address: Option<String>,
    #[serde(default)]
    pub private_address: Option<String>,
    pub disks: Vec<AgentDisk>,
    pub last_seen_at: Option<u64>,
    pub enrolled_at: Option<u64>,
}

/// The failback side (AWS `RecoveryInstanceFailback`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FailbackStatus {
    pub state: FailbackState,
    pub replication_state: ReplicationState,
    pub client_id: Option<String>,
    pub client_last_seen_at: Option<u64>,
    pub initiated_at: Option<u64>,
    pub failback_to_original_server: bool,
    pub launch_requested_at: Option<u64>,
    pub launch_job_id: Option<String>,
    /// The launch asked for a full re-read and re-hash of both sides (`--verify full`).
    #[serde(default)]
    pub launch_verify_full: bool,
    pub completed_at: Option<u64>,
    pub first_byte_at: Option<u64>,
    pub steps: Vec<InitiationStep>,
    pub disks: Vec<DiskProgress>,
    pub device_mapping: Vec<DeviceMapping>,
    pub round: u64,
    /// Start of the current (or last) sync round.
    #[serde(default)]
    pub round_started_at: Option<u64>,
    /// Differing bytes of the last few finished rounds (oldest first), for `NOT_CONVERGING`.
    #[serde(default)]
    pub recent_round_differing_bytes: Vec<u64>,
    /// Seconds since the disks were last consistent with the recovery volumes.
    pub lag_secs: Option<u64>,
    /// Estimated completion of the current round (Unix seconds).
    pub eta_at: Option<u64>,
    /// Duration in seconds of the final round at launch (quiesce done → dirty blocks + digest):
    /// the failback's downtime on the agent side. Set at FAILBACK_COMPLETED.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_round_secs: Option<f64>,
    pub last_consistent_at: Option<u64>,
    pub errors: Vec<ReplicationError>,
    pub last_error_message: Option<String>,
    pub digests: Vec<DiskDigest>,
    /// Client hardware as presented at pairing.
    pub client_inventory: Option<Inventory>,
    /// SHA-256 (hex) of the current pairing's client certificate: the one certificate the
    /// instance's agent serves while the failback runs.
    #[serde(default)]
    pub client_cert_sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoveryInstance {
    pub recovery_instance_id: String,
    pub hostname: Option<String>,
    pub source_hints: IdentificationHints,
    pub agent: AgentStatus,
    pub failback: FailbackStatus,
    pub config: ReplicationConfig,
    pub created_at: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceList {
    pub items: Vec<RecoveryInstance>,
}

/// One entry of the event log (every state transition and admin action).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub seq: u64,
    pub at: u64,
    pub recovery_instance_id: Option<String>,
    /// Short machine-readable kind, e.g. `FAILBACK_STATE`, `REPLICATION_STATE`, `PAIRED`.
    pub kind: String,
    pub message: String,
    /// Who caused it: `credential:<id>:<name>`, `bootstrap-admin` (the data-dir admin token),
    /// `agent:<instance id>`, `client:<client id>`, `monitor` (missed heartbeats) or
    /// `anonymous` (unauthenticated boot reports). `None` for events stored before actors
    /// were recorded.
    #[serde(default)]
    pub actor: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventList {
    pub items: Vec<Event>,
}

/// `PUT /v1/admin/instances/{id}/hints`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetHintsRequest {
    pub source_hints: IdentificationHints,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogList {
    pub items: Vec<LogEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogEntry {
    pub name: String,
    pub bytes: u64,
    pub uploaded_at: u64,
}

/// Error body of every 4xx/5xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiError {
    /// Machine-readable code, e.g. `BAD_REQUEST`, `TOKEN_INVALID`, `NOT_FOUND`.
    pub error: String,
    /// Human message naming the field / instance / token involved.
    pub message: String,
    /// Offending field, when the error is about one.
    #[serde(default)]
    pub field: Option<String>,
}

/// Role of an admin credential. Roles are nested: each allows everything the one before it
/// does (`viewer` < `operator` < `admin`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read: instances, configuration, events, logs.
    Viewer,
    /// Day-to-day failback: pairing and agent tokens, identification hints, launch, stop
    /// (everything a mass failback calls).
    Operator,
    /// Configuration (bandwidth, private address) and credentials.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not `viewer`, `operator` or `admin`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?} (viewer, operator or admin)")]
pub struct UnknownRole(pub String);

impl std::str::FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Role, UnknownRole> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownRole(s.to_string()))
    }
}

/// Longest credential name.
pub const CREDENTIAL_NAME_MAX: usize = 64;

/// `POST /v1/admin/credentials` (role admin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateCredentialRequest {
    pub role: Role,
    /// Who or what holds it, e.g. `ci-bot`: see [`valid_credential_name`]. Unique among the
    /// credentials not revoked.
    pub name: String,
}

/// An admin credential as listed: never its secret (the service keeps only its SHA-256).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    /// `cred-` + 16 lower-case hex digits ([`valid_credential_id`]).
    pub id: String,
    pub name: String,
    pub role: Role,
    pub created_at: u64,
    /// Actor that created it (see [`Event::actor`]).
    pub created_by: String,
    #[serde(default)]
    pub revoked_at: Option<u64>,
    #[serde(default)]
    pub revoked_by: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateCredentialResponse {
    pub credential: Credential,
    /// The bearer secret; shown once, the service stores only its hash.
    pub secret: String,
}

/// `GET /v1/admin/credentials`: all credentials, revoked ones included, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialList {
    pub items: Vec<Credential>,
}

/// A credential id: `cred-` followed by exactly 16 lower-case hex digits.
pub fn valid_credential_id(id: &str) -> bool {
    id.strip_prefix("cred-").is_some_and(|h| {
        h.len() == 16
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// A credential name: 1..=64 of ASCII letters, digits, `.`, `_`, `-`, `@`, starting with a
/// letter or digit (so it can be shown and grepped without quoting).
pub fn valid_credential_name(name: &str) -> bool {
    name.len() <= CREDENTIAL_NAME_MAX
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'))
}

/// A request body the service refuses: the field it concerns and serde's reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid request body at field {field}: {message}")]
pub struct BodyError {
    /// Path of the offending field (`inventory.disks[0].size_bytes`; a key that is not a plain
    /// name is quoted: `[""]`); `.` when the error concerns the whole body. Never empty.
    pub field: String,
    /// serde's message (names the unknown or missing field, the expected type, line, column).
    pub message: String,
}

/// Parses a JSON request body as the service does, naming the offending field on error.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, BodyError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let message = e.inner().to_string();
        let mut field = render_path(e.path());
        // An unknown field is the last segment of the path already; a missing one is not.
        if let Some(name) = message
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
        {
            push_key(&mut field, name);
        }
        if field.is_empty() {
            field.push('.');
        }
        BodyError { field, message }
    })
}

fn render_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut s = String::new();
    for seg in path.iter() {
        match seg {
            Segment::Seq { index } => s.push_str(&format!("[{index}]")),
            Segment::Map { key } => push_key(&mut s, key),
            Segment::Enum { variant } => push_key(&mut s, variant),
            Segment::Unknown => s.push_str(if s.is_empty() { "?" } else { ".?" }),
        }
    }
    s
}

/// Appends `.key`, or `["key"]` when the key is empty or not a plain name.
fn push_key(s: &mut String, key: &str) {
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !plain {
        s.push_str(&format!("[{key:?}]"));
        return;
    }
    if !s.is_empty() {
        s.push('.');
    }
    s.push_str(key);
}

/// Checks an AWS-style recovery instance id (`i-` + 8..=32 hex digits; we also accept our own
/// generated ids of that form).
pub fn valid_instance_id(id: &str) -> bool {
    id.strip_prefix("i-")
        .is_some_and(|h| (8..=32).contains(&h.len()) && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_bytes_keeps_the_end_on_a_char_boundary() {
        let log = format!("{}é{}", "a".repeat(10), "b".repeat(5));
        assert_eq!(tail_bytes(&log, 100), log);
        assert_eq!(tail_bytes(&log, 6), "bbbbb");
        assert_eq!(tail_bytes(&log, 7), "ébbbbb");
        assert!(
            tail_bytes(&"x".repeat(LOG_UPLOAD_MAX_BODY * 2), LOG_UPLOAD_MAX_BODY).len()
                <= LOG_UPLOAD_MAX_BODY
        );
    }

    /// The field names the service answers with (dr-service/tests/api.rs checks them end to
    /// end); an empty key is quoted, never reported as "".
    #[test]
    fn parse_body_names_the_field() {
        let field = |body: &str| match parse_body::<PairRequest>(body.as_bytes()) {
            Ok(_) => panic!("{body} accepted"),
            Err(e) => e.field,
        };
        assert_eq!(field(r#"{"token":"x","inventory":{},"bogus":1}"#), "bogus");
        assert_eq!(field(r#"{"inventory":{}}"#), "token");
        assert_eq!(
            field(r#"{"token":"x","inventory":{"disks":[{"path":"/d","size_bytes":"big"}]}}"#),
            "inventory.disks[0].size_bytes"
        );
        assert_eq!(field(r#"{"token":"x","inventory":{},"":1}"#), r#"[""]"#);
        assert_eq!(
            field(r#"{"token":"x","inventory":{"a.b":1}}"#),
            r#"inventory["a.b"]"#
        );
        assert_eq!(field("[]"), ".");
        let e = parse_body::<CreateTokenRequest>(br#"{"kind":"wizard"}"#).unwrap_err();
        assert_eq!(e.field, "kind");
        assert!(
            e.to_string()
                .starts_with("invalid request body at field kind: "),
            "{e}"
        );
    }

    #[test]
    fn state_names_are_aws_names() {
        assert_eq!(
            serde_json::to_string(&FailbackState::FailbackReadyForLaunch).unwrap(),
            "\"FAILBACK_READY_FOR_LAUNCH\""
        );
        assert_eq!(ReplicationState::InitialSync.to_string(), "INITIAL_SYNC");
        assert_eq!(ReplicationError::AgentNotSeen.to_string(), "AGENT_NOT_SEEN");
        assert_eq!(
            InitiationStepName::LinkFailbackClientWithRecoveryInstance.to_string(),
            "LINK_FAILBACK_CLIENT_WITH_RECOVERY_INSTANCE"
        );
    }

    #[test]
    fn unknown_fields_refused_and_named() {
        let e = serde_json::from_str::<LaunchRequest>(r#"{"recovery_instance_idz":[]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("recovery_instance_idz"), "{e}");
    }

    #[test]
    fn roles_are_lowercase_and_ordered() {
        assert_eq!(
            serde_json::to_string(&Role::Operator).unwrap(),
            "\"operator\""
        );
        assert_eq!("viewer".parse::<Role>(), Ok(Role::Viewer));
        assert!("Admin".parse::<Role>().is_err());
        assert!(serde_json::from_str::<Role>("\"root\"").is_err());
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
    }

    #[test]
    fn credential_ids_and_names() {
        assert!(valid_credential_id("cred-0123456789abcdef"));
        for bad in [
            "cred-0123456789ABCDEF",
            "cred-0123456789abcde",
            "cred-0123456789abcdef0",
            "cred-..%2F456789abcdef",
            "0123456789abcdef",
            "",
        ] {
            assert!(!valid_credential_id(bad), "{bad}");
        }
        assert!(valid_credential_name("ci-bot"));
        assert!(valid_credential_name("alice@example.org"));
        for bad in ["", "-x", "a b", "a/b", "ü", &"a".repeat(65)] {
            assert!(!valid_credential_name(bad), "{bad}");
        }
    }

    #[test]
    fn events_without_actor_still_parse() {
        let e: Event = serde_json::from_str(
            r#"{"seq":1,"at":2,"recovery_instance_id":null,"kind":"PAIRED","message":"m"}"#,
        )
        .unwrap();
        assert_eq!(e.actor, None);
    }

    #[test]
    fn instance_ids() {
        assert!(valid_instance_id("i-0123456789abcdef"));
        assert!(!valid_instance_id("i-xyz"));
        assert!(!valid_instance_id("0123456789"));
    }
}

/// `POST /v1/client/checkpoint` (bearer client secret): the resume points of a round a dropped
/// connection interrupted, one per disk (an empty list clears them); `GET` answers the last
/// one stored. After an appliance reboot the client fetches them and checks each against its
/// local disk before it trusts it (the client's `failback_replication::checkpoint`); the
/// service checks their form: sizes, alignment, lengths, counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCheckpoints {
    pub disks: Vec<DiskCheckpoint>,
}

/// At most this many disks in [`ClientCheckpoints`].
pub const MAX_CHECKPOINT_DISKS: usize = 64;

/// One disk's resume point (the JSON of `failback_replication::checkpoint::Checkpoint`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskCheckpoint {
    /// The agent's disk id.
    pub remote: String,
    /// Source disk size in bytes.
    pub disk_size: u64,
    /// Block size of the round (power of two, 4 KiB..=4 MiB).
    pub block_size: u32,
    /// The local target.
    pub local: String,
    /// The local target's size when the checkpoint was taken.
    pub local_size: u64,
    /// The local target's serial or WWID.
    pub local_serial: Option<String>,
    /// Verified, written and flushed below this byte offset (a multiple of `block_size`,
    /// inside both disks).
    pub offset: u64,
    /// The interrupted round's cut on the agent.
    pub cut: Option<CheckpointCut>,
    /// Bytes per hash window (a multiple of `block_size`, at most 64 MiB).
    pub window_bytes: u64,
    /// BLAKE3 of the sampled blocks of the prefix, 64 hex digits.
    pub digest: String,
}

/// The agent's cut a checkpointed round ran under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointCut {
    pub session: u64,
    pub cut: u64,
}
