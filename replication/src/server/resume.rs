//! The agent's side of `SyncResume` (protocol 5): continuing a hash-compare round that a dropped
//! connection interrupted, from the end of the client's verified and written prefix.
//!
//! - The request is hostile input: the offset must be a multiple of the block size and inside
//!   the disk; nothing is allocated from it.
//! - A tracked disk resumes only while the interrupted round's cut is still the map's last one
//!   (no round cut it since, no lost events): a resumed round takes no cut of its own, so every
//!   write after that cut — also to the prefix, while the client was away — stays in the map
//!   and goes out in the next round, which presents that same cut. Otherwise the resume is
//!   refused ([`ErrorCode::ResumeRefused`]) and the client starts the disk over.
//! - An untracked disk always resumes: its next round is a hash compare of the whole disk.
//! - When a compare stream ends with its connection, the worker keeps the hashes of what it
//!   compared; the resumed stream starts from them, so the agent still holds every block's
//!   hash after the round (its next round can be a changes round).

use super::{send_error, stream_disk, AgentCache, Conn, RoundPlan, StreamWorker};
use crate::cbt::Token;
use crate::error::Result;
use crate::resume::ResumeAt;
use crate::wire::{Compression, ErrorCode, Hash, Message};

impl Conn<'_> {
    /// Answers a `SyncResume`: checks it and starts the stream from `offset`, or refuses.
    pub(super) async fn resume_stream(
        &mut self,
        stream: u32,
        disk: &str,
        block_size: u32,
        compression: Compression,
        (offset, cut): (u64, Option<Token>),
    ) -> Result<()> {
        let Some(src) = stream_disk(self.ctx, self.out, stream, disk, block_size).await else {
            return Ok(());
        };
        let size = src.info.size;
        let bs = u64::from(block_size);
        if offset == 0 || !offset.is_multiple_of(bs) || offset >= size {
            let m = format!(
                "resume of disk {disk:?} at byte offset {offset}: must be a non-zero multiple \
                 of the block size {bs} below the disk size {size}"
            );
            send_error(self.out, stream, ErrorCode::BadRequest, m).await;
            return Ok(());
        }
        if let Some(map) = &src.tracking.map {
            let current = cut.is_some_and(|t| map.is_last_cut(&t));
            if !current {
                let m = format!(
                    "resume of disk {disk:?} at byte offset {offset} refused: the interrupted \
                     round's cut {} is no longer this agent's last (the agent restarted, \
                     another round ran or the tracker lost events), so changes to the prefix \
                     could be missed; start the disk over",
                    cut.map_or_else(
                        || "(none)".to_owned(),
                        |t| format!("{}/{}", t.session, t.cut)
                    )
                );
                tracing::info!(peer = %self.peer, "{m}");
                send_error(self.out, stream, ErrorCode::ResumeRefused, m).await;
                return Ok(());
            }
        }
        tracing::info!(peer = %self.peer, disk, offset, "resuming an interrupted round");
        let resume = ResumeAt {
            start_block: offset / bs,
            cut,
        };
        let opts = (false, None, compression);
        self.start_stream(stream, disk, block_size, opts, Some(resume))
            .await
    }
}

impl StreamWorker {
    /// The plan of a resumed round: a hash compare under the interrupted round's cut (no new
    /// cut is taken: see the module documentation).
    pub(super) fn resumed_plan(&self, r: &ResumeAt) -> RoundPlan {
        let t = &self.disk.tracking;
        let (dirty_bytes, lag_ms) = match &t.map {
            Some(map) => {
                let (bytes, oldest) = map.backlog();
                let lag = oldest.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                (bytes, lag)
            }
            None => (self.disk.info.size, None),
        };
        let offset = r.start_block.saturating_mul(u64::from(self.block_size));
        RoundPlan {
            changes: None,
            message: Message::SyncPlan {
                stream: self.stream,
                changes: false,
                token: r.cut,
                dirty_bytes,
                lag_ms,
                note: format!("{} (resumed at byte {offset})", t.status),
            },
        }
    }

    /// The hashes of blocks `0..start_block` the interrupted round kept, or nothing (then the
    /// agent holds no hashes of this disk after the round: its next round is a hash compare).
    pub(super) fn resumed_prefix(&self) -> Vec<Hash> {
        let Some(r) = &self.resume else {
            return Vec::new();
        };
        let kept = self
            .disk
            .tracking
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match kept {
            Some(mut c)
                if c.block_size == self.block_size && c.hashes.len() as u64 >= r.start_block =>
            {
                c.hashes
                    .truncate(usize::try_from(r.start_block).unwrap_or(usize::MAX));
                c.hashes
            }
            _ => Vec::new(),
        }
    }

    /// Keeps the hashes of blocks `0..next` of a compare stream whose connection ended (only
    /// for tracked disks: the others keep no hashes).
    pub(super) fn keep_prefix(&self, all: Vec<Hash>, next: u64) {
        if self.disk.tracking.map.is_none() || next == 0 || all.len() as u64 != next {
            return;
        }
        *self
            .disk
            .tracking
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(AgentCache {
            block_size: self.block_size,
            hashes: all,
        });
    }
}
