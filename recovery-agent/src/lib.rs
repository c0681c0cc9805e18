//! The recovery agent: runs on the recovery instance and serves its disks read-only to a
//! paired failback client over the replication protocol (mutual TLS, see
//! `failback_replication::server`).

pub mod cbt;
pub mod enroll;
pub mod pace;

use std::path::{Path, PathBuf};

pub use failback_replication::server::ServeOptions as AgentOptions;
use failback_replication::server::{Limits, SourceDisk};
pub use failback_replication::tls::DevCerts;
use failback_replication::ServerTls;
use tokio::net::TcpListener;

/// Agent errors.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A `--disk` argument is not `NAME=PATH`.
    #[error("invalid --disk {0:?}: expected NAME=PATH (e.g. disk0=/dev/nvme1n1)")]
    DiskSpec(String),
    /// Two disks share a name.
    #[error("disk name {0:?} given twice")]
    DuplicateDisk(String),
    /// No disks to serve.
    #[error("no disks to serve: give at least one --disk NAME=PATH")]
    NoDisks,
    /// Opening a disk or loading TLS material failed.
    #[error(transparent)]
    Replication(#[from] failback_replication::Error),
    /// Binding or accepting failed.
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// Flags for the limits that keep one peer from exhausting the agent (see [`Limits`]).
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct LimitArgs {
    /// Connections in the TLS handshake (not yet authorized) at once; more are closed at once.
    #[arg(long, value_name = "N", default_value_t = count(Limits::default().max_unauthenticated),
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_unauthenticated: u32,
    /// Seconds a new connection has for the TLS handshake and its hello.
    #[arg(long = "handshake-timeout", value_name = "SECS",
          default_value_t = Limits::default().handshake_timeout.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    pub handshake_timeout_secs: u64,
    /// Seconds an authorized connection may send nothing (while no quiesce/thaw command runs)
    /// before it is closed; must exceed the time a 16 MiB hash window takes on the slowest link.
    #[arg(long = "idle-timeout", value_name = "SECS",
          default_value_t = Limits::default().idle_timeout.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout_secs: u64,
    /// Disk syncs one connection may run at once (a client syncing more disks at once is
    /// refused with "agent busy").
    #[arg(long, value_name = "N", default_value_t = count(Limits::default().max_streams_per_connection),
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_connection: u32,
    /// Disk syncs the agent runs at once over all connections (one thread each).
    #[arg(long, value_name = "N", default_value_t = count(Limits::default().max_streams),
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams: u32,
}

impl LimitArgs {
    /// The limits these flags set.
    pub fn limits(&self) -> Limits {
        Limits {
            max_unauthenticated: usize::try_from(self.max_unauthenticated).unwrap_or(usize::MAX),
            handshake_timeout: std::time::Duration::from_secs(self.handshake_timeout_secs),
            idle_timeout: std::time::Duration::from_secs(self.idle_timeout_secs),
            max_streams_per_connection: usize::try_from(self.max_streams_per_connection)
                .unwrap_or(usize::MAX),
            max_streams: usize::try_from(self.max_streams).unwrap_or(usize::MAX),
        }
    }
}

/// Change-block tracking flags (see [`cbt`]).
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct TrackArgs {
    /// Do not track changed blocks: every round hash-compares the whole disk.
    #[arg(long)]
    pub no_change_tracking: bool,
    /// Tracker ring buffer in bytes (power of two, at least 4096; a record takes 24 bytes).
    /// Tests shrink it to provoke an overflow.
    #[arg(long, value_name = "BYTES", default_value_t = cbt::TrackerOptions::default().ring_bytes, hide = true)]
    pub tracker_ring_bytes: u32,
    /// How often (ms) the tracker drains its ring buffer (every round's start drains it too).
    #[arg(long, value_name = "MS", default_value_t = 5, hide = true,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub tracker_poll_ms: u64,
    /// Rescans of disks that cannot be tracked read at most this many MB/s (10^6 bytes), at
    /// idle I/O priority, so they leave the volume mostly to the workload; 0 = unlimited. The
    /// final round after a quiesce is never paced.
    #[arg(long, value_name = "MB/s", default_value_t = pace::DEFAULT_RATE_MB)]
    pub scan_rate: u64,
    /// Bytes (MiB) a paced rescan may read at full speed before the rate applies (a small
    /// disk's round is not slowed; the average stays at --scan-rate).
    #[arg(long, value_name = "MIB", default_value_t = pace::DEFAULT_BURST_MIB, hide = true)]
    pub scan_burst_mib: u64,
}

impl TrackArgs {
    /// Sets the process's tracker options from these flags.
    pub fn configure(&self) {
        cbt::configure(cbt::TrackerOptions {
            enabled: !self.no_change_tracking,
            ring_bytes: self.tracker_ring_bytes,
            poll: std::time::Duration::from_millis(self.tracker_poll_ms),
        });
    }

    /// The pacer for hash-compare rounds of untracked disks (`None` for `--scan-rate 0`).
    pub fn pacer(&self) -> Option<std::sync::Arc<dyn failback_replication::server::ScanPacer>> {
        let p = pace::Pacer::new(self.scan_rate, self.scan_burst_mib)?;
        tracing::info!(
            "rescans of untracked disks: at most {} MB/s (after {} MiB), idle I/O priority",
            self.scan_rate,
            self.scan_burst_mib
        );
        Some(std::sync::Arc::new(p))
    }
}

/// A default count as a flag value.
fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Parses `NAME=PATH`.
pub fn parse_disk_spec(spec: &str) -> Result<(String, PathBuf), AgentError> {
    match spec.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => {
            Ok((name.to_owned(), PathBuf::from(path)))
        }
        _ => Err(AgentError::DiskSpec(spec.to_owned())),
    }
}

/// Opens every disk read-only (refusing duplicate names).
pub fn open_disks(specs: &[(String, PathBuf)]) -> Result<Vec<SourceDisk>, AgentError> {
    if specs.is_empty() {
        return Err(AgentError::NoDisks);
    }
    let mut out: Vec<SourceDisk> = Vec::new();
    for (name, path) in specs {
        if out.iter().any(|d| &d.info.id == name) {
            return Err(AgentError::DuplicateDisk(name.clone()));
        }
        out.push(SourceDisk::open(name, path)?);
    }
    Ok(out)
}

/// Serves `disks` on `listener` (connections are independent; failed accepts are retried).
pub async fn serve(
    listener: TcpListener,
    mut disks: Vec<SourceDisk>,
    tls: ServerTls,
    opts: AgentOptions,
) -> Result<(), AgentError> {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    for d in &disks {
        tracing::info!(
            disk = %d.info.id,
            path = %d.path.display(),
            size = d.info.size,
            sector = d.info.logical_sector_size,
            "serving read-only"
        );
    }
    let _tracker = cbt::track(&mut disks);
    failback_replication::serve(listener, disks, tls, opts)
        .await
        .map_err(|source| AgentError::Listen { addr, source })
}

/// Writes a development CA, agent and client certificates into `dir` (client for `instance`).
pub fn write_dev_certs(dir: &Path, instance: &str) -> Result<(), AgentError> {
    let certs = DevCerts::generate(instance).map_err(failback_replication::Error::from)?;
    certs
        .write_to(dir)
        .map_err(failback_replication::Error::from)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        limits: LimitArgs,
    }

    #[test]
    fn limit_flags_default_to_the_library_limits_and_refuse_zero() {
        let cli = Cli::parse_from(["agent"]);
        assert_eq!(cli.limits.limits(), Limits::default());
        let cli = Cli::parse_from(["agent", "--idle-timeout", "5", "--max-streams", "3"]);
        let l = cli.limits.limits();
        assert_eq!((l.idle_timeout.as_secs(), l.max_streams), (5, 3));
        for flag in [
            "--max-unauthenticated",
            "--handshake-timeout",
            "--max-streams",
        ] {
            assert!(
                Cli::try_parse_from(["agent", flag, "0"]).is_err(),
                "{flag} 0"
            );
        }
    }
}
