//! Progress reporting as a trait: the engine reports, front ends (indicatif bars, plain lines,
//! JSON lines; see `failback_client::progress`) render.

use crate::report::DiskReport;

/// Receives progress events from a sync. Calls come from several tasks at once.
pub trait Progress: Send + Sync {
    /// A disk sync starts; `total_bytes` is the source disk size.
    fn disk_started(&self, disk: &str, total_bytes: u64);
    /// `compared_bytes` more of the disk are done (compared and, if different, fetched and
    /// verified); `fetched_bytes` of them were fetched.
    fn disk_advanced(&self, disk: &str, compared_bytes: u64, fetched_bytes: u64);
    /// The agent said what this round of `disk` covers (after `disk_started`): only changed
    /// blocks (`changes`) or a hash compare, with the changed bytes not yet received and the
    /// age of the oldest such change (from the agent's tracker) and the tracking state line.
    fn disk_planned(&self, disk: &str, plan: &RoundPlan) {
        let _ = (disk, plan);
    }
    /// A disk sync finished successfully.
    fn disk_finished(&self, disk: &str, report: &DiskReport);
    /// A free-form note (retries, phases).
    fn message(&self, msg: &str);
}

/// What the agent said a round of one disk covers (see [`Progress::disk_planned`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RoundPlan {
    /// Only changed blocks travel (no hash compare).
    pub changes: bool,
    /// Changed bytes not yet received (the whole disk for a hash compare).
    pub backlog_bytes: u64,
    /// Age in seconds of the oldest change not yet received.
    pub lag_secs: Option<f64>,
    /// `on`, `unavailable: <why>`, `rescan: <why>`.
    pub tracking: String,
}

/// Discards everything (tests, library callers without a UI).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn disk_started(&self, _: &str, _: u64) {}
    fn disk_advanced(&self, _: &str, _: u64, _: u64) {}
    fn disk_finished(&self, _: &str, _: &DiskReport) {}
    fn message(&self, _: &str) {}
}
