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
    /// A disk sync finished successfully.
    fn disk_finished(&self, disk: &str, report: &DiskReport);
    /// A free-form note (retries, phases).
    fn message(&self, msg: &str);
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
