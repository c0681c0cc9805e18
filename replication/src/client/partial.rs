//! The client's side of resuming an interrupted round (see [`crate::resume`]): what it keeps of
//! a hash-compare round cut short by a network error, and how a later round of the same
//! [`HashCache`] continues from it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::{DiskJob, HashCache, Planned, WriterGuard};
use crate::cbt::Token;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::wire::{ErrorCode, Hash, Message};
use crate::writer::Head;

/// What an interrupted round of one disk verified and wrote.
pub(crate) struct Partial {
    remote: String,
    size: u64,
    block_size: u32,
    /// Blocks `0..start` are compared, and written where they differed.
    start: u64,
    /// Their hashes (empty after a reboot: a [`Checkpoint`] does not hold them).
    pub(crate) prefix: Vec<Hash>,
    /// The first MiB must be fetched again: the interrupted round's held-back head was lost
    /// (resumed from a [`Checkpoint`]).
    pub(crate) refetch_head: bool,
    /// The interrupted round's cut (from its `SyncPlan`).
    cut: Option<Token>,
    /// The verified part of the first MiB, held back by the writer (written when a round
    /// commits).
    pub(crate) head: Head,
    /// The whole disk's cached hashes the round compared with, when it did not read the target.
    pub(crate) rest: Option<Vec<Hash>>,
}

impl std::fmt::Debug for Partial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partial")
            .field("remote", &self.remote)
            .field("blocks", &self.prefix.len())
            .field("cut", &self.cut)
            .finish_non_exhaustive()
    }
}

impl Partial {
    /// Byte offset the round continues at.
    pub(crate) fn offset(&self) -> u64 {
        self.start * u64::from(self.block_size)
    }

    /// First block the round continues at.
    pub(crate) fn start_block(&self) -> u64 {
        self.start
    }
}

impl HashCache {
    /// Forgets every interrupted round (the next rounds start their disks at 0). The final
    /// round calls this before it starts: a prefix compared before the quiesce must not count.
    pub fn forget_partial(&self) {
        self.partial_lock().clear();
    }

    /// Byte offsets at which interrupted rounds would resume, per local target.
    pub fn resume_points(&self) -> Vec<(PathBuf, u64)> {
        self.partial_lock()
            .iter()
            .map(|(p, r)| (p.clone(), r.offset()))
            .collect()
    }

    /// Checkpoints of the interrupted rounds, to store at the DR service for a resume after a
    /// reboot: each target is flushed first, then its sampled blocks are read (blocking I/O;
    /// run it off the async threads). A disk whose prefix ends inside the first MiB, or whose
    /// target cannot be flushed or read, gets none (logged).
    pub fn checkpoints(&self, window_bytes: u64) -> Vec<Checkpoint> {
        let parts: Vec<_> = self
            .partial_lock()
            .iter()
            .map(|(local, p)| {
                let c = (p.remote.clone(), p.size, p.block_size, p.offset(), p.cut);
                (local.clone(), c)
            })
            .collect();
        let mut out = Vec::new();
        for (local, (remote, size, bs, offset, cut)) in parts {
            match checkpoint_of(&local, (remote, size, bs, offset, cut), window_bytes) {
                Ok(Some(cp)) => out.push(cp),
                Ok(None) => {}
                Err(e) => tracing::warn!("no checkpoint of {}: {e}", local.display()),
            }
        }
        out
    }

    /// Resumes from `cp` (fetched from the DR service after a reboot) if it checks out
    /// against its local target ([`Checkpoint::check_target`]); `Err` says why not (the disk
    /// then starts over at 0).
    pub fn restore(&self, cp: &Checkpoint) -> std::result::Result<(), String> {
        cp.check_target()?;
        let p = Partial {
            remote: cp.remote.clone(),
            size: cp.disk_size,
            block_size: cp.block_size,
            start: cp.start_block(),
            prefix: Vec::new(),
            refetch_head: true,
            cut: cp.cut,
            head: Head::new(),
            rest: None,
        };
        self.put_partial(cp.local.clone(), p);
        Ok(())
    }

    fn partial_lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Partial>> {
        self.partial.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take_partial(&self, local: &Path) -> Option<Partial> {
        self.partial_lock().remove(local)
    }

    fn put_partial(&self, local: PathBuf, p: Partial) {
        self.partial_lock().insert(local, p);
    }
}

/// Flushes `local` and takes its checkpoint at `offset` (`None` inside the first MiB).
fn checkpoint_of(
    local: &Path,
    (remote, disk_size, block_size, offset, cut): (String, u64, u32, u64, Option<Token>),
    window_bytes: u64,
) -> std::io::Result<Option<Checkpoint>> {
    if offset <= crate::writer::HEAD_BYTES {
        return Ok(None);
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(local)?
        .sync_data()?;
    let info = crate::device::inspect(local)?;
    let digest = Checkpoint::digest_of(local, offset, block_size, window_bytes)?;
    Ok(Some(Checkpoint {
        remote,
        disk_size,
        block_size,
        local: local.to_owned(),
        local_size: info.size,
        local_serial: info.serial,
        offset,
        cut,
        window_bytes,
        digest,
    }))
}

/// What the interrupted round leaves behind, from the disk job's state at the error.
pub(crate) struct Interrupted {
    /// Blocks compared before this round (resumed from a checkpoint, without their hashes;
    /// otherwise 0).
    pub(crate) base: u64,
    /// Hashes of the retired windows, in disk order, from block `base`.
    pub(crate) retired: Vec<Hash>,
    /// Blocks per hash window.
    pub(crate) window_blocks: u64,
    /// The round's cut (its plan's token).
    pub(crate) cut: Option<Token>,
    /// The whole disk's cached hashes the round compared with, if any.
    pub(crate) rest: Option<Vec<Hash>>,
}

impl DiskJob {
    /// The interrupted round of this disk to continue, if the cache holds one for the same
    /// remote disk, size and block size (never when estimating).
    pub(super) fn take_partial(&self) -> Option<Partial> {
        if self.opts.estimate_only {
            return None;
        }
        self.cache.take_partial(&self.local).filter(|p| {
            p.remote == self.disk.id
                && p.size == self.disk.size
                && p.block_size == self.opts.block_size
                && p.start > 0
        })
    }

    /// Asks the agent to continue `p` (`SyncResume`); returns the plan, or `None` when the
    /// agent refused (then `SyncStart` went out on the same stream and the disk starts over).
    pub(super) async fn resume(
        &self,
        p: &Partial,
        rx: &mut tokio::sync::mpsc::Receiver<(Message, usize)>,
        wire_bytes: &mut u64,
    ) -> Result<Option<Planned>> {
        let id = &self.disk.id;
        let m = Message::SyncResume {
            stream: self.stream,
            disk: id.clone(),
            block_size: self.opts.block_size,
            compression: self.opts.compression,
            offset: p.offset(),
            cut: p.cut,
        };
        self.send_counted(m, wire_bytes).await?;
        match self.read_plan(rx, wire_bytes).await {
            Ok(plan) => {
                if plan.changes || plan.token != p.cut {
                    return Err(self.protocol(format!(
                        "agent answered the resume of disk {id} with another round's plan"
                    )));
                }
                let msg = format!(
                    "disk {id}: resuming the interrupted round at byte {} of {} \
                     (verified and written before the connection dropped)",
                    p.offset(),
                    self.disk.size
                );
                tracing::info!("{msg}");
                self.progress.message(&msg);
                Ok(Some(plan))
            }
            Err(Error::Remote {
                code: ErrorCode::ResumeRefused,
                message,
                ..
            }) => {
                let msg = format!("disk {id}: starting over from byte 0: {message}");
                tracing::warn!("{msg}");
                self.progress.message(&msg);
                let m = Message::SyncStart {
                    stream: self.stream,
                    disk: id.clone(),
                    block_size: self.opts.block_size,
                    estimate: false,
                    changes_since: None,
                    compression: self.opts.compression,
                };
                self.send_counted(m, wire_bytes).await?;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    async fn send_counted(&self, m: Message, wire_bytes: &mut u64) -> Result<()> {
        let f = m.encode();
        *wire_bytes += f.len() as u64;
        if self.inner.out.send_raw(f).await {
            Ok(())
        } else {
            Err(self.inner.dead_error())
        }
    }

    /// After a network error: drains the writer (so every run of a retired window is on the
    /// target) and keeps what the round verified and wrote for a resume. Nothing is kept when
    /// the writer failed, nothing was retired, or a held-back head piece straddles the prefix.
    pub(super) async fn keep_partial(&self, writer: &mut WriterGuard, i: Interrupted) {
        let Some(head) = writer.stop().await else {
            return;
        };
        let nblocks = crate::block::block_count(self.disk.size, self.opts.block_size);
        let mut retired = i.retired;
        // A fully compared disk still needs its digest: continue with its last window.
        if i.base + retired.len() as u64 >= nblocks {
            let w = i.window_blocks.max(1);
            let last = (nblocks.saturating_sub(1) / w) * w;
            let keep = last.saturating_sub(i.base);
            retired.truncate(usize::try_from(keep).unwrap_or(usize::MAX));
        }
        let start = i.base + retired.len() as u64;
        if start == 0 {
            return;
        }
        let end = start * u64::from(self.opts.block_size);
        let Some(head) = keep_head(head, end) else {
            return;
        };
        let p = Partial {
            remote: self.disk.id.clone(),
            size: self.disk.size,
            block_size: self.opts.block_size,
            start,
            prefix: if i.base == 0 { retired } else { Vec::new() },
            refetch_head: i.base > 0,
            cut: i.cut,
            head,
            rest: i.rest,
        };
        tracing::info!(
            disk = %self.disk.id,
            offset = p.offset(),
            "round interrupted: its verified and written prefix is kept for a resume"
        );
        self.cache.put_partial(self.local.clone(), p);
    }
}

/// The held-back head pieces that lie below `end` (the others belong to windows compared
/// again). `None` when a piece straddles `end`: runs never cross hash windows, so that would be
/// a bug — start over rather than trust it.
fn keep_head(head: Head, end: u64) -> Option<Head> {
    let mut kept = Vec::with_capacity(head.len());
    for (offset, data) in head {
        if offset + data.len() as u64 <= end {
            kept.push((offset, data));
        } else if offset < end {
            return None;
        }
    }
    Some(kept)
}

#[cfg(test)]
mod tests {
    use super::keep_head;

    #[test]
    fn head_pieces_beyond_the_prefix_are_dropped_and_straddling_ones_refused() {
        let head = vec![(0, vec![1u8; 4096]), (4096, vec![2u8; 4096])];
        assert_eq!(keep_head(head.clone(), 8192), Some(head.clone()));
        assert_eq!(
            keep_head(head.clone(), 4096),
            Some(vec![(0, vec![1u8; 4096])])
        );
        assert_eq!(keep_head(head, 6000), None);
    }
}
