//! What a sync round did, per disk; serialised into the client's JSON report.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One disk's result.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiskReport {
    /// The agent's disk id.
    pub remote_id: String,
    /// The local target.
    pub local_path: PathBuf,
    /// Source size in bytes.
    pub size: u64,
    /// Block size used.
    pub block_size: u32,
    /// Number of blocks compared.
    pub blocks_total: u64,
    /// Blocks that differed (fetched, or would be fetched when estimating).
    pub blocks_differing: u64,
    /// Decoded bytes of the differing blocks (what was written / would be written).
    pub bytes_differing: u64,
    /// Payload bytes received for blocks (after compression; zero blocks cost nothing).
    pub bytes_fetched: u64,
    /// Protocol bytes of this disk's stream in both directions (frames, hashes, blocks).
    pub bytes_on_wire: u64,
    /// Blocks fetched again after failing verification.
    pub blocks_refetched: u64,
    /// Whole-disk digest computed by the client (BLAKE3 over ordered block hashes), hex;
    /// `None` when estimating.
    pub digest: Option<String>,
    /// The agent's whole-disk digest, hex.
    pub agent_digest: String,
    /// True when only the hash compare ran (nothing written).
    pub estimate_only: bool,
    /// Wall time in seconds.
    pub duration_secs: f64,
    /// `changes` (only the blocks the agent's tracker saw change), `compare` (hash compare of
    /// the whole disk) or `estimate`.
    #[serde(default)]
    pub round_kind: String,
    /// The agent's change tracking for this disk: `on`, `unavailable: <why>`, `rescan: <why>`.
    #[serde(default)]
    pub tracking: String,
    /// Whether the client read its target to hash it (only without cached hashes).
    #[serde(default)]
    pub target_read: bool,
    /// Byte offset this round continued at after a dropped connection (0: from the start):
    /// everything below was verified and written before the connection dropped.
    #[serde(default)]
    pub resumed_at: u64,
    /// Changed bytes the agent had not yet delivered at the round's start (whole disk on a
    /// hash compare).
    #[serde(default)]
    pub backlog_bytes: u64,
    /// Age in seconds of the oldest change not yet delivered at the round's start.
    #[serde(default)]
    pub lag_secs: Option<f64>,
    /// Wire bytes, compression achieved and throughput against the link's measured capacity.
    #[serde(default)]
    pub wire: crate::wirestats::WireReport,
}

/// One sync round.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SyncReport {
    /// The agent address.
    pub agent: String,
    /// Per disk, in mapping order.
    pub disks: Vec<DiskReport>,
    /// Wall time of the round in seconds.
    pub duration_secs: f64,
}

impl SyncReport {
    /// Total payload bytes fetched.
    pub fn bytes_fetched(&self) -> u64 {
        self.disks.iter().map(|d| d.bytes_fetched).sum()
    }
    /// Total decoded bytes that differed.
    pub fn bytes_differing(&self) -> u64 {
        self.disks.iter().map(|d| d.bytes_differing).sum()
    }
}
