//! Change-block tracking on real loop devices (root only: losetup, eBPF): the agent binary
//! tracks writes with its eBPF tracker; the client keeps the hashes of what it wrote and, from
//! round 2 on, asks only for what changed. Every test ends with the target byte-equal to the
//! source.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use failback_replication::{
    ClientTls, DiskReport, HashCache, Mapping, NoProgress, Session, SyncOptions,
};
use failback_tests::{random_bytes, KillOnDrop};

const AGENT: &str = env!("CARGO_BIN_EXE_failback-agent");
const MIB: u64 = 1024 * 1024;
const BS: u64 = 65536;

/// A loop device over a sparse image file; detached on drop.
struct Loop {
    dev: PathBuf,
    _dir: tempfile::TempDir,
}

impl Loop {
    fn new(size: u64) -> Loop {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("src.img");
        File::create(&img).unwrap().set_len(size).unwrap();
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&img)
            .output()
            .expect("losetup (tests run as root)");
        assert!(out.status.success(), "losetup: {out:?}");
        let dev = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        Loop { dev, _dir: dir }
    }
}

impl Loop {
    /// A loop device with partition scanning over an image holding the sfdisk `table`.
    fn partitioned(size: u64, table: &str) -> Loop {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("src.img");
        File::create(&img).unwrap().set_len(size).unwrap();
        let mut sfdisk = Command::new("sfdisk")
            .arg(&img)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("sfdisk");
        std::io::Write::write_all(sfdisk.stdin.as_mut().unwrap(), table.as_bytes()).unwrap();
        drop(sfdisk.stdin.take());
        assert!(sfdisk.wait().unwrap().success(), "sfdisk {table:?}");
        let out = Command::new("losetup")
            .args(["-f", "--show", "-P"])
            .arg(&img)
            .output()
            .expect("losetup -P (tests run as root)");
        assert!(out.status.success(), "losetup -P: {out:?}");
        let dev = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        Loop { dev, _dir: dir }
    }
}

impl Loop {
    /// The device node of partition `n`: the kernel's scan may lag (then `partx -a` adds the
    /// partitions) and a container's /dev may lack the node (then it is made from sysfs).
    fn partition(&self, n: u32) -> PathBuf {
        let name = self.dev.file_name().unwrap().to_str().unwrap().to_owned();
        let sys = PathBuf::from(format!("/sys/block/{name}/{name}p{n}/dev"));
        for i in 0..100 {
            if sys.exists() {
                break;
            }
            if i == 20 {
                let _ = Command::new("partx").arg("-a").arg(&self.dev).status();
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let numbers = std::fs::read_to_string(&sys)
            .unwrap_or_else(|e| panic!("{}: {e} (no partition {n})", sys.display()));
        let part = PathBuf::from(format!("/dev/{name}p{n}"));
        if !part.exists() {
            let (major, minor) = numbers.trim().split_once(':').unwrap();
            let st = Command::new("mknod")
                .arg(&part)
                .args(["b", major, minor])
                .status()
                .unwrap();
            assert!(st.success(), "mknod {}", part.display());
        }
        part
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// Writes `data` at `offset` with O_DIRECT (aligned copy).
fn write_direct(dev: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .unwrap();
    let mut buf = vec![0u8; data.len() + 4096];
    let at = buf.as_ptr().align_offset(4096);
    buf[at..at + data.len()].copy_from_slice(data);
    f.write_all_at(&buf[at..at + data.len()], offset).unwrap();
}

/// Writes `data` at `offset` through the page cache, then syncs (writeback reaches the device).
fn write_buffered(dev: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new().write(true).open(dev).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

fn certs(dir: &Path) -> ClientTls {
    let out = Command::new(AGENT)
        .arg("dev-certs")
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    ClientTls::from_files(&failback_replication::TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("client.pem"),
        key: dir.join("client-key.pem"),
    })
    .unwrap()
}

fn agent(dir: &Path, disk: &Path, extra: &[&str]) -> (KillOnDrop, String) {
    let mut cmd = Command::new(AGENT);
    cmd.arg("serve")
        .args(["--listen", "127.0.0.1:0", "--ca"])
        .arg(dir.join("ca.pem"))
        .arg("--cert")
        .arg(dir.join("agent.pem"))
        .arg("--key")
        .arg(dir.join("agent-key.pem"))
        .arg("--disk")
        .arg(format!("d={}", disk.display()))
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().expect("start failback-agent");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    (KillOnDrop(child), addr)
}

struct Client {
    tls: ClientTls,
    addr: String,
    target: PathBuf,
    cache: Arc<HashCache>,
}

impl Client {
    async fn round(&self) -> DiskReport {
        let s = Session::connect(&self.addr, &self.tls).await.unwrap();
        let maps = [Mapping {
            remote: "d".into(),
            local: self.target.clone(),
        }];
        let opts = SyncOptions {
            block_size: u32::try_from(BS).unwrap(),
            ..Default::default()
        };
        let r = s
            .sync_cached(&maps, &opts, Arc::new(NoProgress), &self.cache)
            .await
            .unwrap();
        s.close().await;
        let d = r.disks.into_iter().next().unwrap();
        assert_eq!(d.digest.as_deref(), Some(d.agent_digest.as_str()));
        d
    }
}

fn assert_same(src: &Path, dst: &Path) {
    let out = Command::new("cmp").arg(src).arg(dst).output().unwrap();
    assert!(
        out.status.success(),
        "target differs from source: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn setup(size: u64, extra: &[&str]) -> (Loop, tempfile::TempDir, KillOnDrop, Client) {
    let src = Loop::new(size);
    write_direct(
        &src.dev,
        0,
        &random_bytes(1, usize::try_from(4 * MIB).unwrap()),
    );
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(dir.path());
    let (agent, addr) = agent(dir.path(), &src.dev, extra);
    let target = dir.path().join("dst.img");
    let c = Client {
        tls,
        addr,
        target,
        cache: Arc::new(HashCache::default()),
    };
    (src, dir, agent, c)
}

/// Round 1 compares; later rounds carry exactly the blocks written (direct, buffered,
/// discard-free) and never read the target; a writer racing with rounds loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracked_rounds_send_only_changes_and_catch_racing_writes() {
    let (src, _dir, _agent, c) = setup(64 * MIB, &[]);
    let r1 = c.round().await;
    assert_eq!(r1.round_kind, "compare");
    assert!(
        r1.tracking.starts_with("rescan: tracking started"),
        "{r1:?}"
    );
    assert!(r1.target_read);
    assert_same(&src.dev, &c.target);

    let r2 = c.round().await;
    assert_eq!(
        (r2.round_kind.as_str(), r2.tracking.as_str()),
        ("changes", "on")
    );
    assert_eq!((r2.blocks_differing, r2.target_read), (0, false));

    write_direct(&src.dev, 10 * BS, &random_bytes(2, 4096)); // block 10
    write_direct(
        &src.dev,
        20 * BS,
        &random_bytes(3, usize::try_from(3 * BS).unwrap()),
    ); // 20..23
    write_buffered(&src.dev, 700 * BS + 512, &random_bytes(4, 100)); // block 700
    let r3 = c.round().await;
    assert_eq!(r3.round_kind, "changes");
    assert_eq!(r3.blocks_differing, 5, "{r3:?}");
    assert_eq!(r3.backlog_bytes, 5 * BS);
    assert!(r3.lag_secs.is_some());
    assert!(!r3.target_read);
    assert_same(&src.dev, &c.target);

    // A writer racing with three rounds; then it stops ("quiesce") and one more round.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, written, dev) = (stop.clone(), written.clone(), src.dev.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let block = (i * 7919) % 1024;
                let data = random_bytes(100 + i, 4096);
                if i.is_multiple_of(3) {
                    write_buffered(&dev, block * BS + 4096 * (i % 16), &data);
                } else {
                    write_direct(&dev, block * BS + 4096 * (i % 16), &data);
                }
                i += 1;
                written.store(i, Ordering::SeqCst);
            }
        })
    };
    for _ in 0..3 {
        let r = c.round().await;
        assert_eq!(r.round_kind, "changes");
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    assert!(written.load(Ordering::SeqCst) > 10, "the writer wrote");
    let last = c.round().await;
    assert_eq!(last.round_kind, "changes");
    assert_same(&src.dev, &c.target);
}

/// A ring buffer too small for a burst of writes (and drained only at cuts) loses events:
/// the next round is a hash compare that still reads nothing on the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_events_make_a_rescan() {
    let extra = [
        "--tracker-ring-bytes",
        "4096",
        "--tracker-poll-ms",
        "600000",
    ];
    let (src, _dir, _agent, c) = setup(32 * MIB, &extra);
    c.round().await;
    for i in 0..400u64 {
        write_direct(&src.dev, (i % 512) * BS, &random_bytes(i, 4096));
    }
    let r = c.round().await;
    assert_eq!(r.round_kind, "compare");
    assert!(r.tracking.contains("events lost"), "{r:?}");
    assert!(!r.target_read, "the rescan compares against cached hashes");
    assert_same(&src.dev, &c.target);
    let again = c.round().await;
    assert_eq!(
        (again.round_kind.as_str(), again.blocks_differing),
        ("changes", 0)
    );
}

/// A restarted agent knows nothing of the writes while it was down: hash compare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_makes_a_rescan() {
    let (src, dir, agent1, mut c) = setup(32 * MIB, &[]);
    c.round().await;
    drop(agent1);
    write_direct(&src.dev, 3 * BS, &random_bytes(9, 8192));
    let (_agent2, addr) = agent(dir.path(), &src.dev, &[]);
    c.addr = addr;
    let r = c.round().await;
    assert_eq!(r.round_kind, "compare");
    assert!(r.tracking.starts_with("rescan: "), "{r:?}");
    assert_eq!(r.blocks_differing, 1);
    assert!(!r.target_read);
    assert_same(&src.dev, &c.target);
}

/// Image files cannot be tracked: the agent says why and every round hash-compares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untracked_image_files_keep_hash_compare_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("src.img");
    std::fs::write(&img, random_bytes(5, usize::try_from(8 * MIB).unwrap())).unwrap();
    let tls = certs(dir.path());
    let (_agent, addr) = agent(dir.path(), &img, &[]);
    let c = Client {
        tls,
        addr,
        target: dir.path().join("dst.img"),
        cache: Arc::new(HashCache::default()),
    };
    c.round().await;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(b"changed", 5 * BS)
        .unwrap();
    let r = c.round().await;
    assert_eq!(r.round_kind, "compare");
    assert!(
        r.tracking.starts_with("unavailable: ") && r.tracking.contains("not a block device"),
        "{r:?}"
    );
    assert_eq!((r.blocks_differing, r.target_read), (1, false));
    assert_same(&img, &c.target);
}

/// A partition of a loop device is tracked on the device served: writes through the partition
/// and writes to the parent disk inside the partition's range are seen (bios are remapped to
/// the parent); writes to the parent outside the partition are not this disk's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_is_tracked_through_its_parent_device() {
    // One partition from 1 MiB (sector 2048), 32 MiB long, in a 48 MiB image.
    let disk = Loop::partitioned(48 * MIB, "label: dos\nstart=2048, size=65536\n");
    let part = disk.partition(1);
    write_direct(
        &part,
        0,
        &random_bytes(20, usize::try_from(2 * MIB).unwrap()),
    );
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(dir.path());
    let (_agent, addr) = agent(dir.path(), &part, &[]);
    let c = Client {
        tls,
        addr,
        target: dir.path().join("dst.img"),
        cache: Arc::new(HashCache::default()),
    };
    let r1 = c.round().await;
    assert_eq!(r1.size, 32 * MIB);
    assert_same(&part, &c.target);
    let r2 = c.round().await;
    assert_eq!(
        (r2.round_kind.as_str(), r2.tracking.as_str()),
        ("changes", "on")
    );
    write_direct(&part, 5 * BS, &random_bytes(21, 4096)); // partition block 5
    write_direct(&disk.dev, MIB + 9 * BS, &random_bytes(22, 4096)); // parent -> partition block 9
    write_direct(&disk.dev, 40 * MIB, &random_bytes(23, 4096)); // parent, outside the partition
    let r3 = c.round().await;
    assert_eq!(r3.round_kind, "changes");
    assert_eq!(r3.blocks_differing, 2, "{r3:?}");
    assert_eq!(
        r3.backlog_bytes,
        2 * BS,
        "only the partition's two blocks are its backlog"
    );
    assert_same(&part, &c.target);
}

/// The I/O priority class of thread `tid` (3 = idle).
#[allow(unsafe_code)]
fn ioprio_class(tid: i32) -> i64 {
    // SAFETY: ioprio_get(IOPRIO_WHO_PROCESS = 1, tid) takes plain integers.
    let v = unsafe { libc::syscall(libc::SYS_ioprio_get, 1, tid) };
    v >> 13
}

fn threads(pid: u32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Untracked (an image file): hash-compare rounds are paced by --scan-rate (an upper bound on
/// bytes per elapsed time, which cannot flake) and read at idle I/O priority, restored after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untracked_rescans_are_paced_at_idle_io_priority() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("src.img");
    let size = 32 * MIB;
    std::fs::write(&img, random_bytes(30, usize::try_from(size).unwrap())).unwrap();
    let tls = certs(dir.path());
    let (rate_mb, burst_mib) = (16.0, 4u64);
    let (agent, addr) = agent(
        dir.path(),
        &img,
        &["--scan-rate", "16", "--scan-burst-mib", "4"],
    );
    let pid = agent.0.id();
    let c = Client {
        tls,
        addr,
        target: dir.path().join("dst.img"),
        cache: Arc::new(HashCache::default()),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut seen_idle = false;
            while !stop.load(Ordering::SeqCst) {
                seen_idle |= threads(pid).into_iter().any(|t| ioprio_class(t) == 3);
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            seen_idle
        })
    };
    let t0 = std::time::Instant::now();
    let r = c.round().await;
    let secs = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    assert!(
        watcher.join().unwrap(),
        "no agent thread ran at idle I/O priority"
    );
    assert_eq!(r.round_kind, "compare");
    assert_same(&img, &c.target);
    // Burst + one 4 MiB read batch of slack over rate x time.
    let bound = rate_mb * 1e6 * secs + ((burst_mib + 4) * MIB) as f64;
    assert!(
        (size as f64) <= bound,
        "{size} bytes read in {secs:.2}s: more than {rate_mb} MB/s allows (bound {bound})"
    );
    let still: Vec<i32> = threads(pid)
        .into_iter()
        .filter(|t| ioprio_class(*t) == 3)
        .collect();
    assert!(still.is_empty(), "threads left at idle priority: {still:?}");
}
