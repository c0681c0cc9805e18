//! `failback-client sync`: pull remote disks from an agent into local block devices or image
//! files. Plan -> show -> apply: connect, print the plan, check every target against the safety
//! rules, stop there with `--dry-run` (or only compare hashes with `--dry-run --estimate`),
//! otherwise sync, print per-disk results and digests, and write the JSON report.

use std::io::Write;
use std::path::PathBuf;

use failback_replication::wire::Compression;
use failback_replication::{block, ClientTls, Mapping, Session, SyncOptions, SyncReport, TlsFiles};

use crate::exit::{self, Exit};
use crate::progress::{self, human, ProgressMode};
use crate::safety::{self, Refusal, TargetState};

/// Arguments of `sync`.
#[derive(clap::Args, Debug, Clone)]
pub struct SyncArgs {
    /// Agent address HOST:PORT.
    #[arg(long)]
    pub agent: String,
    /// REMOTE=LOCAL: the agent's disk id and the local block device or image file (repeatable).
    #[arg(long = "map", value_name = "REMOTE=LOCAL", required = true)]
    pub maps: Vec<String>,
    /// CA certificate (PEM) that signed the agent's certificate.
    #[arg(long)]
    pub ca: PathBuf,
    /// Client certificate (PEM), URI SAN urn:failback:instance:ID.
    #[arg(long)]
    pub cert: PathBuf,
    /// Client private key (PEM).
    #[arg(long)]
    pub key: PathBuf,
    /// Recovery instance the agent's certificate must name (default: the instance named by
    /// --cert). An agent of any other instance is refused before anything is written.
    #[arg(long)]
    pub instance: Option<String>,
    /// Block size: power of two between 4K and 4M (e.g. 65536, 64K, 1M).
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    pub block_size: u32,
    /// Limit the receive rate to this many Mbit/s.
    #[arg(long, value_name = "MBPS")]
    pub bwlimit: Option<u64>,
    /// Print the plan and check the targets, then stop; nothing is written.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: also run the hash compare and report the bytes each disk would fetch.
    #[arg(long, requires = "dry_run")]
    pub estimate: bool,
    /// Progress display: bars on a terminal (auto), plain lines, or JSON lines on stdout.
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: ProgressMode,
    /// Write the JSON report (per disk: bytes fetched, digests, timings) to this file.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Threads hashing each local target (default: one per CPU; all but the first run at idle
    /// priority, so they only use CPU time nothing else wants).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub hash_threads: Option<u16>,
    /// How the agent encodes the blocks it sends: auto (zstd-1 while the link is the
    /// bottleneck, raw while the CPU is), zstd (always zstd-1 where it shrinks) or none.
    #[arg(long, default_value = "auto", value_parser = clap::builder::ValueParser::new(str::parse::<Compression>))]
    pub compression: Compression,
    /// After a dropped connection, reconnect and continue this many times (each disk resumes
    /// from what it verified and wrote; 0: fail at once).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub reconnect: u32,
}

/// Parses sizes like `65536`, `64K`, `64KiB`, `1M`.
pub fn parse_size(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1024u64),
        Some('M' | 'm') => (&t[..t.len() - 1], 1024 * 1024),
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 65536, 64K, 1M)"))?;
    let v = u32::try_from(n * mult).map_err(|_| format!("{s:?} is too large"))?;
    block::validate_block_size(v)?;
    Ok(v)
}

/// Why `sync` failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// A target was refused by a safety rule.
    #[error(transparent)]
    Unsafe(#[from] Refusal),
    /// Connecting, syncing or verifying failed.
    #[error(transparent)]
    Replication(#[from] failback_replication::Error),
    /// The report could not be written.
    #[error("cannot write report {path}: {source}")]
    Report {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl SyncError {
    /// The exit code for this error.
    pub fn exit(&self) -> Exit {
        match self {
            SyncError::Usage(_) => Exit::Usage,
            SyncError::Unsafe(_) => Exit::UnsafeTarget,
            SyncError::Replication(e) => exit::for_replication(e),
            SyncError::Report { .. } => Exit::Internal,
        }
    }
}

/// Parses `REMOTE=LOCAL` mappings.
pub fn parse_maps(maps: &[String]) -> Result<Vec<Mapping>, SyncError> {
    maps.iter()
        .map(|m| match m.split_once('=') {
            Some((r, l)) if !r.is_empty() && !l.is_empty() => Ok(Mapping {
                remote: r.to_owned(),
                local: PathBuf::from(l),
            }),
            _ => Err(SyncError::Usage(format!(
                "invalid --map {m:?}: expected REMOTE=LOCAL (e.g. disk0=/dev/sda)"
            ))),
        })
        .collect()
}

/// Human text on stdout, unless JSON mode (then only JSON lines go to stdout).
struct Out {
    json: bool,
}

impl Out {
    fn text(&self, s: &str) {
        if self.json {
            eprintln!("{s}");
        } else {
            let mut o = std::io::stdout().lock();
            let _ = writeln!(o, "{s}");
            let _ = o.flush();
        }
    }
    fn json(&self, v: serde_json::Value) {
        if self.json {
            let mut o = std::io::stdout().lock();
            let _ = writeln!(o, "{v}");
            let _ = o.flush();
        }
    }
}

/// What `sync` did.
#[derive(Debug)]
pub enum Outcome {
    /// `--dry-run`: plan shown, targets accepted, nothing done.
    Planned,
    /// Synced or estimated.
    Synced(SyncReport),
}

/// Entry point of the `sync` subcommand: runs it, prints a failure on stderr, returns the exit
/// code.
pub fn main(args: SyncArgs) -> Exit {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("failback-client: error: cannot start the runtime: {e}");
            return Exit::Internal;
        }
    };
    match rt.block_on(run(args)) {
        Ok(_) => Exit::Ok,
        Err(e) => {
            let code = e.exit();
            eprintln!("failback-client: error: {e}");
            code
        }
    }
}

/// Runs `sync` (must be called inside a tokio runtime).
pub async fn run(args: SyncArgs) -> Result<Outcome, SyncError> {
    let mappings = parse_maps(&args.maps)?;
    let out = Out {
        json: args.progress == ProgressMode::Json,
    };
    let files = TlsFiles {
        ca: args.ca.clone(),
        cert: args.cert.clone(),
        key: args.key.clone(),
    };
    let tls = ClientTls::from_files_for(&files, args.instance.clone())
        .map_err(failback_replication::Error::from)?;
    let session = Session::connect(&args.agent, &tls).await?;
    let disks = session.check_mappings(&mappings)?;

    // Plan.
    out.text(&format!(
        "plan: agent {} (failback-agent {}), block size {}{}",
        session.peer(),
        session.agent_software(),
        human(u64::from(args.block_size)),
        match args.bwlimit {
            Some(m) => format!(", limit {m} Mbit/s"),
            None => String::new(),
        }
    ));
    let mut refusal = None;
    let mut plan_json = Vec::new();
    for (m, d) in mappings.iter().zip(&disks) {
        let check = safety::check_target(&m.local, d);
        let local = match &check {
            Ok(TargetState::NewFile) => "new image file".to_owned(),
            Ok(TargetState::File(i)) => format!("image file, {}", human(i.size)),
            Ok(TargetState::BlockDevice(i)) => format!(
                "block device {}, {}, {} B sectors{}",
                i.name,
                human(i.size),
                i.logical_sector_size,
                i.serial
                    .as_ref()
                    .map(|s| format!(", serial {s}"))
                    .unwrap_or_default()
            ),
            Err(r) => format!("REFUSED ({}): {}", r.rule, r.detail),
        };
        out.text(&format!(
            "  {} ({}, {}, {} B sectors{}) -> {} [{}]",
            d.id,
            d.device,
            human(d.size),
            d.logical_sector_size,
            d.serial
                .as_ref()
                .map(|s| format!(", serial {s}"))
                .unwrap_or_default(),
            m.local.display(),
            local
        ));
        plan_json.push(serde_json::json!({
            "remote": d, "local": m.local, "refused": check.as_ref().err().map(|r| r.rule.name()),
        }));
        if let Err(r) = check {
            refusal.get_or_insert(r);
        }
    }
    out.json(serde_json::json!({"event": "plan", "agent": session.peer(), "block_size": args.block_size, "disks": plan_json}));
    if let Some(r) = refusal {
        return Err(r.into());
    }
    if args.dry_run && !args.estimate {
        out.text("dry run: nothing written");
        session.close().await;
        return Ok(Outcome::Planned);
    }

    // Apply (or estimate).
    let opts = SyncOptions {
        block_size: args.block_size,
        bandwidth_limit_mbps: args.bwlimit,
        estimate_only: args.estimate,
        hash_threads: args.hash_threads.map(usize::from),
        compression: args.compression,
        ..SyncOptions::default()
    };
    let progress = progress::make(args.progress);
    let report = sync_reconnecting(&args, &tls, session, &mappings, &opts, progress, &out).await?;

    for d in &report.disks {
        if d.estimate_only {
            out.text(&format!(
                "estimate: {} -> {}: {} of {} blocks differ, would fetch up to {} (agent digest {})",
                d.remote_id,
                d.local_path.display(),
                d.blocks_differing,
                d.blocks_total,
                human(d.bytes_differing),
                d.agent_digest
            ));
        } else {
            out.text(&format!(
                "synced: {} -> {}: {} of {} blocks differed ({}), fetched {} payload, {} on the wire, {:.1}s",
                d.remote_id,
                d.local_path.display(),
                d.blocks_differing,
                d.blocks_total,
                human(d.bytes_differing),
                human(d.bytes_fetched),
                human(d.bytes_on_wire),
                d.duration_secs
            ));
            out.text(&format!("  wire: {}", d.wire.summary()));
            out.text(&format!(
                "  digest {} (agent {}) {}",
                d.digest.as_deref().unwrap_or("-"),
                d.agent_digest,
                if d.digest.as_deref() == Some(d.agent_digest.as_str()) {
                    "MATCH"
                } else {
                    "MISMATCH"
                }
            ));
        }
    }
    if args.estimate {
        out.text("dry run (estimate): nothing written");
    }
    out.json(serde_json::json!({"event": "result", "report": report}));
    if let Some(path) = &args.report {
        let body = serde_json::to_vec_pretty(&report).map_err(|e| SyncError::Report {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        std::fs::write(path, body).map_err(|source| SyncError::Report {
            path: path.clone(),
            source,
        })?;
    }
    Ok(Outcome::Synced(report))
}

/// Runs the round, reconnecting after a dropped connection up to `--reconnect` times: the same
/// hash cache carries each disk's verified prefix into the next attempt, which resumes there.
async fn sync_reconnecting(
    args: &SyncArgs,
    tls: &ClientTls,
    mut session: Session,
    mappings: &[Mapping],
    opts: &SyncOptions,
    progress: std::sync::Arc<dyn failback_replication::Progress>,
    out: &Out,
) -> Result<SyncReport, SyncError> {
    let cache = std::sync::Arc::new(failback_replication::HashCache::default());
    let mut left = args.reconnect;
    loop {
        let e = match session
            .sync_cached(mappings, opts, progress.clone(), &cache)
            .await
        {
            Ok(report) => {
                session.close().await;
                return Ok(report);
            }
            Err(e) if e.is_retryable() && left > 0 => e,
            Err(e) => return Err(e.into()),
        };
        session = loop {
            left -= 1;
            let at: Vec<String> = cache
                .resume_points()
                .iter()
                .map(|(p, o)| format!("{} at byte {o}", p.display()))
                .collect();
            out.text(&format!(
                "round interrupted: {e}; reconnecting ({left} more allowed){}",
                if at.is_empty() {
                    String::new()
                } else {
                    format!("; resuming {}", at.join(", "))
                }
            ));
            tokio::time::sleep(RECONNECT_PAUSE).await;
            match Session::connect(&args.agent, tls).await {
                Ok(s) => break s,
                Err(e) if e.is_retryable() && left > 0 => continue,
                Err(e) => return Err(e.into()),
            }
        };
    }
}

/// Pause before reconnecting after a dropped connection.
const RECONNECT_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_maps() {
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert!(parse_size("3K").is_err());
        assert!(parse_size("8M").is_err());
        assert!(parse_size("x").is_err());
        let m = parse_maps(&["a=/tmp/x".into()]).unwrap();
        assert_eq!(m[0].remote, "a");
        assert!(parse_maps(&["a".into()]).is_err());
        assert!(parse_maps(&["=b".into()]).is_err());
    }
}
