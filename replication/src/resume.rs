//! Resuming a round after a dropped connection (protocol 5, `SyncResume`).
//!
//! The client keeps, per disk, how far the interrupted hash-compare round is verified *and
//! written*: the windows retired in disk order (every block compared, every differing block
//! verified and handed to the disk's writer), after the writer has drained (so every run below
//! the offset is on the target; the held-back first MiB is kept in memory and carried into the
//! resumed round's writer). After reconnecting, the round continues from there: the client
//! hashes and sends windows only from that offset, the agent compares only from there, and the
//! `SyncDone` digest covers only the blocks from there (the prefix was compared block by block
//! already). Blocks in flight at the cut (a partly answered window) are compared again.
//! Written means handed to the kernel (`pwrite`, direct or buffered), not flushed: the resume
//! happens in the same client process on the same machine, which reads its own writes; only a
//! checkpoint that must survive a reboot would need an `fdatasync` first.
//!
//! Why no change is lost: a resumed round takes no new cut on the agent. It runs under the
//! interrupted round's cut, and the agent accepts it only while that is still its last cut, so
//! every write since the cut — also to the prefix, while the connection was down — is still in
//! its dirty map; the client keeps that cut's token for the disk, so the next round asks for
//! exactly those changes. An agent that restarted, or whose map was cut by another round or
//! lost events, refuses the resume and the client starts the disk over. An untracked agent
//! always resumes: its next round is a hash compare of the whole disk, which finds any change.
//! The final round (launch) never resumes a prefix compared before the quiesce: the client
//! forgets such prefixes when the final round starts ([`crate::HashCache::forget_partial`]).

use crate::cbt::Token;

/// Where a resumed stream starts, as the agent accepted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeAt {
    /// First block the client will send hashes for (everything below is done).
    pub start_block: u64,
    /// The interrupted round's cut (`None` on an untracked disk).
    pub cut: Option<Token>,
}
