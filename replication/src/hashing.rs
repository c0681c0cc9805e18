//! Hashing the client's local target: threads claim whole hash windows in disk order, and the
//! disk task receives them back in disk order (the agent compares windows strictly in order).
//!
//! The first thread runs at normal priority; any further ones at idle priority (`SCHED_IDLE`),
//! so they only take CPU time nothing else wants: receiving, decrypting, verifying and writing
//! never wait for them, and where the agent shares the machine (tests, benchmarks) they fill
//! the moments its core is idle instead of competing with it. A window a starved helper holds
//! back stalls nobody for long: claims stay within a bounded distance of the last retired
//! window, so the normal thread soon waits, its core goes idle and the helper runs there.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::mpsc;

use crate::block::{self, ZeroHashes};
use crate::error::{Error, Result};
use crate::scan::Scanner;
use crate::wire::Hash;
use crate::writer::Target;

/// Default of [`crate::SyncOptions::hash_threads`]: one per CPU. Only the first competes for
/// CPU time; the others run at idle priority.
pub fn default_hash_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Which windows may be claimed: those below `limit`, which grows by one per retired window.
#[derive(Debug)]
struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Debug)]
struct GateState {
    next: u64,
    limit: u64,
    closed: bool,
}

impl Gate {
    /// The next window to hash (waiting while it is too far ahead), or `None` when every window
    /// is claimed or the disk task has gone.
    fn claim(&self, windows: u64) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if s.closed || s.next >= windows {
                return None;
            }
            if s.next < s.limit {
                s.next += 1;
                return Some(s.next - 1);
            }
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn update(&self, f: impl FnOnce(&mut GateState)) {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
        self.cv.notify_all();
    }
}

/// Hash windows of one local target, delivered in disk order.
#[derive(Debug)]
pub(crate) struct LocalHashes {
    gate: Arc<Gate>,
    rx: mpsc::UnboundedReceiver<Result<(u64, Vec<Hash>)>>,
    /// Windows hashed ahead of a gap, by first block.
    ready: BTreeMap<u64, Vec<Hash>>,
    /// First block of the next window to deliver.
    next_first: u64,
    nblocks: u64,
    /// For errors: the target's path and block size.
    path: std::path::PathBuf,
    bs: u32,
}

impl LocalHashes {
    /// Starts `threads` hashing threads over `target` (`size` bytes in `bs`-byte blocks, all-zero
    /// block hashes in `zeros`) in windows of `window_blocks`; at most `ahead` windows are claimed beyond the last one
    /// [`retired`](Self::retired).
    #[cfg(test)]
    pub(crate) fn spawn(
        target: Arc<Target>,
        size: u64,
        bs: u32,
        window_blocks: u64,
        zeros: Arc<ZeroHashes>,
        threads: usize,
        ahead: u64,
    ) -> Result<Self> {
        Self::spawn_from(
            target,
            (size, bs),
            window_blocks,
            zeros,
            (threads, ahead),
            0,
        )
    }

    /// Like `spawn`, from the window starting at block `start` (a multiple of `window_blocks`:
    /// a resumed round, see [`crate::resume`]).
    pub(crate) fn spawn_from(
        target: Arc<Target>,
        (size, bs): (u64, u32),
        window_blocks: u64,
        zeros: Arc<ZeroHashes>,
        (threads, ahead): (usize, u64),
        start: u64,
    ) -> Result<Self> {
        let nblocks = block::block_count(size, bs);
        let windows = nblocks.div_ceil(window_blocks.max(1));
        let first_window = start / window_blocks.max(1);
        let gate = Arc::new(Gate {
            state: Mutex::new(GateState {
                next: first_window,
                limit: first_window + ahead.max(1),
                closed: false,
            }),
            cv: Condvar::new(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        for t in 0..threads.max(1) {
            let path = target.path().to_owned();
            let (target, zeros, gate, tx) =
                (target.clone(), zeros.clone(), gate.clone(), tx.clone());
            std::thread::Builder::new()
                .name(format!("failback-hash{t}"))
                .spawn(move || {
                    if t > 0 {
                        idle_priority();
                    }
                    let mut scanner = Scanner::new(bs);
                    while let Some(w) = gate.claim(windows) {
                        let first = w * window_blocks;
                        let count = window_blocks.min(nblocks - first);
                        let r = hash_blocks(&target, size, bs, first, count, &zeros, &mut scanner);
                        let failed = r.is_err();
                        if tx.send(r.map(|h| (first, h))).is_err() || failed {
                            return;
                        }
                    }
                })
                .map_err(|source| Error::LocalIo {
                    op: "start hashing thread for",
                    path,
                    offset: 0,
                    source,
                })?;
        }
        Ok(LocalHashes {
            gate,
            rx,
            ready: BTreeMap::new(),
            next_first: first_window * window_blocks.max(1),
            nblocks,
            path: target.path().to_owned(),
            bs,
        })
    }

    /// The next window in disk order, `None` after the last. Cancel-safe (for `select!`).
    pub(crate) async fn next(&mut self) -> Option<Result<(u64, Vec<Hash>)>> {
        loop {
            if let Some(h) = self.ready.remove(&self.next_first) {
                let first = self.next_first;
                self.next_first += h.len() as u64;
                return Some(Ok((first, h)));
            }
            match self.rx.recv().await {
                Some(Ok((first, h))) => {
                    self.ready.insert(first, h);
                }
                Some(Err(e)) => return Some(Err(e)),
                None if self.next_first >= self.nblocks => return None,
                None => {
                    return Some(Err(Error::LocalIo {
                        op: "hash",
                        path: self.path.clone(),
                        offset: self.next_first * u64::from(self.bs),
                        source: std::io::Error::other(format!(
                            "hashing threads stopped before block {} of {}",
                            self.next_first, self.nblocks
                        )),
                    }))
                }
            }
        }
    }

    /// One more window is done with: one more may be claimed.
    pub(crate) fn retired(&self) {
        self.gate.update(|s| s.limit += 1);
    }
}

impl Drop for LocalHashes {
    fn drop(&mut self) {
        self.gate.update(|s| s.closed = true);
    }
}

/// Lowers the calling thread to `SCHED_IDLE`. Best effort: on failure it keeps normal priority,
/// which costs only speed where the agent shares the machine.
/// The raw system call, not the libc wrapper: musl's `sched_setscheduler` refuses (ENOSYS)
/// because the kernel call works per thread, which is exactly what is wanted here, and musl's
/// `sched_param` has extra fields (so it is zero-initialised rather than spelled out).
#[allow(unsafe_code)]
fn idle_priority() {
    // SAFETY: sched_param is a plain C struct of integers; all-zero is valid (priority 0, the
    // only one SCHED_IDLE takes). The kernel reads it during the call; tid 0 = this thread.
    let rc = unsafe {
        let param: libc::sched_param = std::mem::zeroed();
        libc::syscall(
            libc::SYS_sched_setscheduler,
            0,
            libc::SCHED_IDLE,
            &param as *const libc::sched_param,
        )
    };
    if rc != 0 {
        tracing::debug!(
            "hashing thread stays at normal priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Hashes blocks `first..first + count` of the local target, batch by batch. Regions beyond the
/// local length hash as zeros unread.
fn hash_blocks(
    target: &Target,
    size: u64,
    bs: u32,
    first: u64,
    count: u64,
    zeros: &ZeroHashes,
    scanner: &mut Scanner,
) -> Result<Vec<Hash>> {
    let bs64 = u64::from(bs);
    let bsz = usize::try_from(bs).unwrap_or(usize::MAX);
    let batch_blocks = (block::BATCH_BYTES / bs64).max(1);
    let mut hashes = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    let mut b = first;
    while b < first + count {
        let n = batch_blocks.min(first + count - b);
        let offset = b * bs64;
        if target.is_beyond_local(offset) {
            for i in b..b + n {
                let len = usize::try_from(block::block_len(size, bs, i)).unwrap_or(0);
                hashes.push(zeros.get(len));
            }
        } else {
            let len = usize::try_from(((b + n) * bs64).min(size) - offset).unwrap_or(0);
            scanner.scan(target, offset, len, |_, data| {
                hashes.extend(data.chunks(bsz).map(|blk| block::hash_block(blk, zeros).0));
            })?;
        }
        b += n;
    }
    Ok(hashes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn target(bytes: &[u8]) -> (tempfile::TempDir, Arc<Target>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.img");
        std::fs::write(&path, bytes).unwrap();
        let t = Target::open(&path, bytes.len() as u64, false).unwrap();
        (dir, Arc::new(t))
    }

    /// Several threads (one at idle priority) deliver every window once, in disk order, with
    /// the hashes one thread computes; no more than `ahead` windows before one is retired.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn windows_arrive_in_disk_order_within_the_claim_limit() {
        let bs = 4096u32;
        // 37 windows of 3 blocks, the last one short (odd tail block too).
        let mut data = failback_tests::random_bytes(7, 4096 * 110 + 1000);
        data[4096 * 5..4096 * 9].fill(0);
        let size = data.len() as u64;
        let (_dir, t) = target(&data);
        let zeros = ZeroHashes::new(size, bs);
        let want: Vec<Hash> = data
            .chunks(4096)
            .map(|b| block::hash_block(b, &zeros).0)
            .collect();

        let mut h = LocalHashes::spawn(t.clone(), size, bs, 3, Arc::new(zeros), 3, 4).unwrap();
        let mut got = Vec::new();
        for i in 0..4u64 {
            let (first, hashes) = h.next().await.unwrap().unwrap();
            assert_eq!(first, i * 3, "windows in disk order");
            got.extend(hashes);
        }
        // Nothing retired yet: a fifth window may not even be claimed.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), h.next())
                .await
                .is_err(),
            "a window beyond the claim limit arrived"
        );
        // The threads now wait at the claim limit: the first at normal priority, the helpers
        // at idle priority.
        let policies = thread_policies();
        assert!(
            policies.iter().any(|(n, _)| n == "failback-hash1"),
            "{policies:?}"
        );
        for (name, policy) in &policies {
            let want = if name == "failback-hash0" {
                0
            } else {
                libc::SCHED_IDLE
            };
            assert_eq!(*policy, want, "{name}: {policies:?}");
        }
        for _ in 0..4 {
            h.retired();
        }
        while let Some(w) = h.next().await {
            let (first, hashes) = w.unwrap();
            assert_eq!(first, got.len() as u64, "windows in disk order");
            got.extend(hashes);
            h.retired();
        }
        assert_eq!(got, want);
    }

    /// (thread name, scheduling policy) of this process's hashing threads, from /proc.
    fn thread_policies() -> Vec<(String, i32)> {
        let mut out = Vec::new();
        for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            let Some((name, rest)) = stat.split_once(" (").and_then(|(_, r)| r.rsplit_once(") "))
            else {
                continue;
            };
            if name.starts_with("failback-hash") {
                // Field 41 of stat is the policy; `rest` starts at field 3.
                let policy = rest.split(' ').nth(38).and_then(|p| p.parse().ok());
                out.push((name.to_owned(), policy.unwrap_or(-1)));
            }
        }
        out
    }

    /// A read error reaches the disk task (the target shrank under the hashing thread).
    #[tokio::test]
    async fn a_read_error_is_reported() {
        let data = failback_tests::random_bytes(8, 4096 * 8);
        let (dir, t) = target(&data);
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("t.img"))
            .unwrap()
            .set_len(4096)
            .unwrap();
        let size = data.len() as u64;
        let zeros = Arc::new(ZeroHashes::new(size, 4096));
        let mut h = LocalHashes::spawn(t, size, 4096, 4, zeros, 1, 8).unwrap();
        let e = loop {
            match h.next().await {
                Some(Ok(_)) => h.retired(),
                Some(Err(e)) => break e,
                None => panic!("no error for a target that shrank"),
            }
        };
        assert!(e.to_string().contains("t.img"), "{e}");
    }
}
