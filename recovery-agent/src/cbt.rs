//! Change-block tracking of the served block devices with eBPF (no kernel module).
//!
//! The BPF program (bpf/blocktrack.bpf.c, compiled by clang in build.rs) hooks the block
//! layer's `block_bio_queue` and `block_rq_complete` tracepoints, keeps the writes (and
//! discards, write-zeroes) of the served devices and queues `(dev, sector, sectors)` records
//! on a ring buffer. A thread here drains it into each disk's
//! [`DirtyMap`](failback_replication::cbt::DirtyMap); every round's cut drains it again first,
//! so the cut holds every write submitted before it. A full ring (lost records), a failed
//! drain or a stopped tracker marks every disk wholly dirty (a hash-compare round).
//!
//! Why aya: its loader is pure Rust (nothing C to build or link, ~1 crate tree), it does the
//! CO-RE relocations our program needs, and it loads a clang-built object; aya's own
//! Rust-for-BPF side would need a nightly toolchain and bpf-linker, so the program is C.
//! libbpf-rs would build libbpf (and link libelf/zlib) into the agent for the same result.
//! Only the agent links this; the appliance client never does.

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aya::maps::{Array, HashMap as BpfHashMap, MapData, RingBuf};
use aya::programs::TracePoint;
use aya::{include_bytes_aligned, Ebpf, EbpfLoader};
use failback_replication::cbt::DirtyMap;

static PROGRAM: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/blocktrack.bpf.o"));

/// Tracker tuning (defaults suit production; tests shrink them to provoke an overflow).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackerOptions {
    /// Track at all (`--no-change-tracking` turns it off: every round hash-compares).
    pub enabled: bool,
    /// Ring buffer bytes (power of two, at least one page). One record is 24 bytes.
    pub ring_bytes: u32,
    /// How often the drain thread empties the ring.
    pub poll: Duration,
}

impl Default for TrackerOptions {
    fn default() -> Self {
        TrackerOptions {
            enabled: true,
            ring_bytes: 4 << 20,
            poll: Duration::from_millis(5),
        }
    }
}

/// Why a disk is not tracked (the agent keeps hash-compare rounds for it).
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("{path} is not a block device (image files are not tracked)")]
    NotBlockDevice { path: PathBuf },
    #[error("{path}: {what}: {source}")]
    Sysfs {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the eBPF tracker failed (needs root or CAP_BPF+CAP_PERFMON and a kernel with BTF): {0}")]
    Load(String),
}

/// One device range that belongs to a served disk: events on kernel device `dev` in sectors
/// `start..start + sectors` are bytes `(sector - start) * 512` of the disk.
#[derive(Debug, Clone)]
struct Region {
    dev: u32,
    start: u64,
    sectors: u64,
    map: Arc<DirtyMap>,
}

struct Shared {
    ring: Mutex<RingBuf<MapData>>,
    lost: Mutex<(Array<MapData, u64>, u64)>,
    regions: Vec<Region>,
}

/// A running tracker; dropping it detaches the programs and stops the drain thread
/// (the maps are then marked lost, so nothing trusts a stopped tracker).
pub struct Tracker {
    _ebpf: Ebpf,
    shared: Arc<Shared>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker").finish_non_exhaustive()
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for r in &self.shared.regions {
            r.map.lose("the change tracker stopped");
        }
    }
}

/// The kernel's internal dev_t encoding (what the tracepoints carry): `major << 20 | minor`.
pub fn kernel_dev(rdev: u64) -> u32 {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    (major << 20) | (minor & 0xf_ffff)
}

fn read_sys(path: &Path, what: &'static str) -> Result<String, Unavailable> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| Unavailable::Sysfs {
            path: path.to_owned(),
            what,
            source,
        })
}

fn parse_sys<T: std::str::FromStr>(path: &Path, what: &'static str) -> Result<T, Unavailable> {
    let s = read_sys(path, what)?;
    s.parse().map_err(|_| Unavailable::Sysfs {
        path: path.to_owned(),
        what,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{s:?}")),
    })
}

/// The device ranges to watch for the disk at `path` of `size` bytes: the device itself and,
/// for a partition, its range on the parent disk (bios are remapped to the parent).
fn regions(path: &Path, size: u64, map: &Arc<DirtyMap>) -> Result<Vec<Region>, Unavailable> {
    let meta = std::fs::metadata(path).map_err(|source| Unavailable::Sysfs {
        path: path.to_owned(),
        what: "stat",
        source,
    })?;
    if !meta.file_type().is_block_device() {
        return Err(Unavailable::NotBlockDevice {
            path: path.to_owned(),
        });
    }
    let rdev = meta.rdev();
    let sectors = size.div_ceil(512);
    let mut out = vec![Region {
        dev: kernel_dev(rdev),
        start: 0,
        sectors,
        map: map.clone(),
    }];
    let sys = PathBuf::from(format!(
        "/sys/dev/block/{}:{}",
        libc::major(rdev),
        libc::minor(rdev)
    ));
    if sys.join("partition").exists() {
        let start: u64 = parse_sys(&sys.join("start"), "partition start")?;
        let real = std::fs::canonicalize(&sys).map_err(|source| Unavailable::Sysfs {
            path: sys.clone(),
            what: "resolve",
            source,
        })?;
        let parent = real.parent().unwrap_or(Path::new("/")).join("dev");
        let dev = read_sys(&parent, "parent device")?;
        let (ma, mi) = dev.split_once(':').unwrap_or(("", ""));
        let (ma, mi): (u32, u32) = (ma.parse().unwrap_or(0), mi.parse().unwrap_or(0));
        out.push(Region {
            dev: (ma << 20) | mi,
            start,
            sectors,
            map: map.clone(),
        });
    }
    Ok(out)
}

/// Makes sure tracefs is mounted (aya finds tracepoints there).
fn mount_tracefs() {
    let events = Path::new("/sys/kernel/tracing/events");
    if events.exists() || Path::new("/sys/kernel/debug/tracing/events").exists() {
        return;
    }
    let out = std::process::Command::new("mount")
        .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
        .output();
    if let Ok(o) = out {
        if !o.status.success() {
            tracing::debug!(
                "mount tracefs: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
    }
}

/// Disks that cannot be tracked, with the reason.
pub type Skipped = Vec<(String, Unavailable)>;

/// Starts tracking `disks` (`(id, path, map)`). Disks that cannot be tracked come back with
/// the reason; an error means nothing can be tracked at all.
pub fn start(
    disks: &[(String, PathBuf, Arc<DirtyMap>)],
    opts: TrackerOptions,
) -> Result<(Option<Tracker>, Skipped), Unavailable> {
    let mut all = Vec::new();
    let mut skipped = Vec::new();
    for (id, path, map) in disks {
        match regions(path, map.size(), map) {
            Ok(r) => all.extend(r),
            Err(e) => skipped.push((id.clone(), e)),
        }
    }
    if all.is_empty() {
        return Ok((None, skipped));
    }
    mount_tracefs();
    let mut ebpf = load(opts)?;
    let err = |e: &dyn std::fmt::Display| Unavailable::Load(e.to_string());
    {
        let mut targets: BpfHashMap<_, u32, u8> = BpfHashMap::try_from(
            ebpf.map_mut("targets")
                .ok_or_else(|| err(&"no targets map"))?,
        )
        .map_err(|e| err(&e))?;
        for r in &all {
            targets.insert(r.dev, 1, 0).map_err(|e| err(&e))?;
        }
    }
    let ring = RingBuf::try_from(
        ebpf.take_map("events")
            .ok_or_else(|| err(&"no events map"))?,
    )
    .map_err(|e| err(&e))?;
    let lost: Array<MapData, u64> =
        Array::try_from(ebpf.take_map("lost").ok_or_else(|| err(&"no lost map"))?)
            .map_err(|e| err(&e))?;
    for (prog, name) in [
        ("bio_queue", "block_bio_queue"),
        ("rq_complete", "block_rq_complete"),
    ] {
        let p: &mut TracePoint = ebpf
            .program_mut(prog)
            .ok_or_else(|| err(&format!("no program {prog}")))?
            .try_into()
            .map_err(|e| err(&e))?;
        p.load().map_err(|e| err(&format!("{prog}: {e}")))?;
        p.attach("block", name)
            .map_err(|e| err(&format!("attaching to block:{name}: {e}")))?;
    }
    let shared = Arc::new(Shared {
        ring: Mutex::new(ring),
        lost: Mutex::new((lost, 0)),
        regions: all,
    });
    let mut maps: Vec<Arc<DirtyMap>> = Vec::new();
    for r in &shared.regions {
        if !maps.iter().any(|m| Arc::ptr_eq(m, &r.map)) {
            maps.push(r.map.clone());
        }
    }
    for m in &maps {
        let s = Arc::downgrade(&shared);
        m.set_drain(Box::new(move || match s.upgrade() {
            Some(s) => s.drain(),
            None => Err("the change tracker stopped".into()),
        }));
    }
    let stop: Arc<std::sync::atomic::AtomicBool> = Arc::default();
    spawn_drain_thread(&shared, &stop, opts.poll);
    Ok((
        Some(Tracker {
            _ebpf: ebpf,
            shared,
            stop,
        }),
        skipped,
    ))
}

fn load(opts: TrackerOptions) -> Result<Ebpf, Unavailable> {
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(Unavailable::Load(
            "the kernel has no BTF (/sys/kernel/btf/vmlinux)".into(),
        ));
    }
    EbpfLoader::new()
        .set_max_entries("events", opts.ring_bytes)
        .load(PROGRAM)
        .map_err(|e| Unavailable::Load(format!("{e}")))
}

fn spawn_drain_thread(
    shared: &Arc<Shared>,
    stop: &Arc<std::sync::atomic::AtomicBool>,
    poll: Duration,
) {
    let (s, stop) = (Arc::downgrade(shared), stop.clone());
    let spawned = std::thread::Builder::new()
        .name("failback-cbt".into())
        .spawn(move || loop {
            std::thread::sleep(poll);
            if stop.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let Some(s) = s.upgrade() else { return };
            if let Err(e) = s.drain() {
                s.lose_all(&format!("tracker failed: {e}"));
            }
        });
    if let Err(e) = spawned {
        shared.lose_all(&format!("cannot start the tracker thread: {e}"));
    }
}

impl Shared {
    fn lose_all(&self, why: &str) {
        for r in &self.regions {
            r.map.lose(why.to_owned());
        }
    }

    /// Hands every queued record to the disks' maps, then checks the lost count.
    fn drain(&self) -> Result<(), String> {
        {
            let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            while let Some(item) = ring.next() {
                let b: &[u8] = &item;
                if b.len() < 16 {
                    return Err(format!("short tracker record of {} bytes", b.len()));
                }
                let dev = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
                let n = u32::from_ne_bytes([b[4], b[5], b[6], b[7]]);
                let mut s = [0u8; 8];
                s.copy_from_slice(&b[8..16]);
                self.record(dev, u64::from_ne_bytes(s), u64::from(n));
            }
        }
        let mut lost = self.lost.lock().unwrap_or_else(|p| p.into_inner());
        let now = lost
            .0
            .get(&0, 0)
            .map_err(|e| format!("reading the lost count: {e}"))?;
        if now != lost.1 {
            let n = now.wrapping_sub(lost.1);
            lost.1 = now;
            self.lose_all(&format!(
                "{n} change events lost (tracker ring buffer full)"
            ));
        }
        Ok(())
    }

    fn record(&self, dev: u32, sector: u64, sectors: u64) {
        let end = sector.saturating_add(sectors);
        for r in self.regions.iter().filter(|r| r.dev == dev) {
            let lo = sector.max(r.start);
            let hi = end.min(r.start.saturating_add(r.sectors));
            if lo < hi {
                r.map.mark((lo - r.start) * 512, (hi - lo) * 512);
            }
        }
    }
}

static OPTIONS: std::sync::OnceLock<TrackerOptions> = std::sync::OnceLock::new();

/// Sets the process's tracker options (once, from `main`; later calls are ignored).
pub fn configure(opts: TrackerOptions) {
    let _ = OPTIONS.set(opts);
}

/// Starts tracking the served block devices (with the options from [`configure`]) and sets
/// each disk's tracking; keep the returned tracker alive while serving.
pub fn track(disks: &mut [failback_replication::SourceDisk]) -> Option<Tracker> {
    let opts = OPTIONS.get().copied().unwrap_or_default();
    let specs: Vec<(String, PathBuf, Arc<DirtyMap>)> = disks
        .iter()
        .map(|d| {
            (
                d.info.id.clone(),
                d.path.clone(),
                Arc::new(DirtyMap::new(d.info.size)),
            )
        })
        .collect();
    let (tracker, status) = if opts.enabled {
        track_disks(&specs, opts)
    } else {
        let off = "unavailable: turned off (--no-change-tracking)".to_owned();
        (
            None,
            specs.iter().map(|s| (s.0.clone(), off.clone())).collect(),
        )
    };
    for (d, (id, _, map)) in disks.iter_mut().zip(specs) {
        let st = status.get(&id).cloned().unwrap_or_default();
        tracing::info!(disk = %id, "tracking: {st}");
        let map = (st == "on").then_some(map);
        d.set_tracking(map, st);
    }
    tracker
}

/// Tracks each disk that can be tracked; returns the tracker (keep it alive) and a status
/// line per disk id: `on` or `unavailable: <why>`.
pub fn track_disks(
    disks: &[(String, PathBuf, Arc<DirtyMap>)],
    opts: TrackerOptions,
) -> (Option<Tracker>, HashMap<String, String>) {
    let mut status = HashMap::new();
    match start(disks, opts) {
        Ok((t, skipped)) => {
            for (id, _, _) in disks {
                status.insert(id.clone(), "on".to_owned());
            }
            for (id, why) in skipped {
                status.insert(id, format!("unavailable: {why}"));
            }
            (t, status)
        }
        Err(e) => {
            for (id, _, _) in disks {
                status.insert(id.clone(), format!("unavailable: {e}"));
            }
            (None, status)
        }
    }
}
