//! Change-block tracking state of one served disk, shared by the agent's tracker (which
//! marks written byte ranges as the kernel reports them) and the sync engine (which takes a
//! *cut* at the start of every round: the set of blocks to send, and a [`Token`] the client
//! presents next time).
//!
//! Rules that make a "send me what is dirty" round trustworthy:
//! - The cut is taken before the round reads anything; a write racing with the round's reads
//!   lands in the next cut.
//! - What a round sent stays owed ("in flight") until the client presents that round's token
//!   (it only does after the round succeeded); a failed round's blocks go out again.
//! - Anything that may have lost a write — the tracker lost events, failed or restarted, the
//!   device changed size, a token this map never issued — makes the next cut a
//!   [`Plan::Rescan`]: the whole disk is hash-compared. Never a silent gap.
//!
//! The map is kept at [`GRANULE`] bytes (2 TiB cost 4 MiB of bits) and turned into sync
//! blocks of any size at the cut.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bytes covered by one bit of the dirty map.
pub const GRANULE: u64 = 64 * 1024;

/// Names one cut of one tracking session (a new session starts with every agent start).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Token {
    /// Random per tracking session.
    pub session: u64,
    /// Cut number inside the session (1, 2, ...).
    pub cut: u64,
}

/// What a round must cover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Only these sync blocks changed since the client's last successful round:
    /// `(first_block, count)` runs in disk order.
    Changes(Vec<(u64, u64)>),
    /// The whole disk must be hash-compared, for this reason.
    Rescan(String),
}

/// The result of [`DirtyMap::cut`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    /// The token of this cut (the client presents it next round if this one succeeds).
    pub token: Token,
    /// What this round covers.
    pub plan: Plan,
    /// Bytes changed and not yet delivered, as of the cut (whole disk for a rescan).
    pub backlog_bytes: u64,
    /// Age of the oldest change not yet delivered, as of the cut.
    pub oldest_change: Option<Duration>,
}

/// Hook run at the start of every cut: it must hand every change the kernel reported so far
/// to the map (e.g. drain the tracker's ring buffer) and report lost events, so the cut misses
/// nothing submitted before it. An error marks the disk wholly dirty.
pub type Drain = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// A disk's dirty bitmap and cut bookkeeping. See the module documentation.
pub struct DirtyMap {
    size: u64,
    session: u64,
    state: Mutex<State>,
    drain: Mutex<Option<Drain>>,
}

impl std::fmt::Debug for DirtyMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyMap")
            .field("size", &self.size)
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct State {
    /// Changed since the last cut.
    current: Bits,
    /// Taken by cuts the client has not acknowledged.
    inflight: Bits,
    /// Number of the last cut (0: none yet).
    last_cut: u64,
    /// The cut whose round the client last completed, as far as `inflight` is concerned.
    acked: Option<u64>,
    /// Why the next cut must be a rescan.
    lost: Option<String>,
}

#[derive(Debug, Clone, Default)]
struct Bits {
    words: Vec<u64>,
    /// When the first bit was set (for the lag).
    since: Option<Instant>,
}

impl Bits {
    fn new(granules: u64) -> Self {
        Bits {
            words: vec![0; usize::try_from(granules.div_ceil(64)).unwrap_or(usize::MAX)],
            since: None,
        }
    }
    fn set_range(&mut self, first: u64, end: u64) {
        for g in first..end {
            if let Some(w) = self
                .words
                .get_mut(usize::try_from(g / 64).unwrap_or(usize::MAX))
            {
                *w |= 1 << (g % 64);
            }
        }
        if first < end && self.since.is_none() {
            self.since = Some(Instant::now());
        }
    }
    fn take(&mut self) -> Bits {
        let n = self.words.len();
        std::mem::replace(
            self,
            Bits {
                words: vec![0; n],
                since: None,
            },
        )
    }
    fn or(&mut self, other: &Bits) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
        self.since = match (self.since, other.since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }
    fn is_set(&self, g: u64) -> bool {
        self.words
            .get(usize::try_from(g / 64).unwrap_or(usize::MAX))
            .is_some_and(|w| w & (1 << (g % 64)) != 0)
    }
}

impl DirtyMap {
    /// A map for a disk of `size` bytes. Its first cut is a rescan ("tracking started"): the
    /// map knows nothing of writes before it existed.
    pub fn new(size: u64) -> Self {
        let granules = size.div_ceil(GRANULE);
        let mut seed = [0u8; 8];
        // A fresh random session id per map: a token from an earlier agent run never matches.
        if getrandom::getrandom(&mut seed).is_err() {
            // No entropy source: the clock still differs between agent runs.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            seed = (u64::from(t) << 32 | u64::from(std::process::id())).to_le_bytes();
        }
        DirtyMap {
            size,
            session: u64::from_le_bytes(seed),
            state: Mutex::new(State {
                current: Bits::new(granules),
                inflight: Bits::new(granules),
                last_cut: 0,
                acked: None,
                lost: Some("tracking started: earlier writes are unknown".into()),
            }),
            drain: Mutex::new(None),
        }
    }

    /// The disk size this map covers.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Installs the hook run before every cut (see [`Drain`]).
    pub fn set_drain(&self, drain: Drain) {
        *self.drain.lock().unwrap_or_else(|p| p.into_inner()) = Some(drain);
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks bytes `offset..offset + len` changed (clipped to the disk).
    pub fn mark(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.size);
        if len == 0 || offset >= end {
            return;
        }
        let (first, last) = (offset / GRANULE, end.div_ceil(GRANULE));
        self.state().current.set_range(first, last);
    }

    /// Something may have been missed: the next cut is a rescan (the first reason is kept).
    pub fn lose(&self, reason: impl Into<String>) {
        let mut s = self.state();
        if s.lost.is_none() {
            let reason = reason.into();
            tracing::warn!("change tracking: whole disk dirty: {reason}");
            s.lost = Some(reason);
        }
    }

    /// Whether `token` names this map's last cut: no round cut the map since, so every write
    /// after that cut is still in `current` (a resumed round may take no cut of its own).
    pub fn is_last_cut(&self, token: &Token) -> bool {
        let s = self.state();
        token.session == self.session && token.cut == s.last_cut && s.lost.is_none()
    }

    /// Bytes changed and not yet delivered, and the age of the oldest such change.
    pub fn backlog(&self) -> (u64, Option<Duration>) {
        let s = self.state();
        let mut all = s.inflight.clone();
        all.or(&s.current);
        let bytes = if s.lost.is_some() {
            self.size
        } else {
            (all.count() * GRANULE).min(self.size)
        };
        (bytes, all.since.map(|t| t.elapsed()))
    }

    /// Takes the cut for a round of a client whose last successful round had token `since`,
    /// at sync block size `block_size`. Runs the drain hook first.
    pub fn cut(&self, since: Option<Token>, block_size: u32) -> Cut {
        let drained = self
            .drain
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|d| d());
        if let Some(Err(e)) = drained {
            self.lose(format!("tracker failed: {e}"));
        }
        let (backlog_bytes, oldest_change) = self.backlog();
        let mut s = self.state();
        s.last_cut += 1;
        let token = Token {
            session: self.session,
            cut: s.last_cut,
        };
        let previous = s.last_cut - 1;
        let reason = match (s.lost.take(), since) {
            (Some(r), _) => Some(r),
            (None, None) => Some("the client asked for a hash compare".into()),
            (None, Some(t)) if t.session == self.session && t.cut == previous => {
                s.inflight = s.current.take();
                s.acked = Some(t.cut);
                None
            }
            (None, Some(t)) if t.session == self.session && Some(t.cut) == s.acked => {
                let current = s.current.take();
                s.inflight.or(&current);
                None
            }
            (None, Some(t)) => Some(format!(
                "the client's last round (cut {} of tracking session {:016x}) is unknown to \
                 this agent (session {:016x}): the agent or its tracker restarted",
                t.cut, t.session, self.session
            )),
        };
        let plan = match reason {
            Some(r) => {
                s.current.take();
                s.inflight.take();
                s.acked = None;
                Plan::Rescan(r)
            }
            None => Plan::Changes(self.runs(&s.inflight, block_size)),
        };
        Cut {
            token,
            plan,
            backlog_bytes,
            oldest_change,
        }
    }

    /// The sync blocks of `block_size` bytes that the set granules touch, as runs.
    fn runs(&self, bits: &Bits, block_size: u32) -> Vec<(u64, u64)> {
        let bs = u64::from(block_size);
        let nblocks = self.size.div_ceil(bs);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (wi, w) in bits.words.iter().enumerate() {
            let mut w = *w;
            while w != 0 {
                let g = wi as u64 * 64 + u64::from(w.trailing_zeros());
                w &= w - 1;
                debug_assert!(bits.is_set(g));
                let first = g * GRANULE / bs;
                let end = ((g + 1) * GRANULE).div_ceil(bs).min(nblocks);
                match runs.last_mut() {
                    Some((f, n)) if *f + *n >= first => *n = (*n).max(end - *f),
                    _ if first < end => runs.push((first, end - first)),
                    _ => {}
                }
            }
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn changes(c: &Cut) -> &[(u64, u64)] {
        match &c.plan {
            Plan::Changes(r) => r,
            Plan::Rescan(r) => panic!("rescan: {r}"),
        }
    }

    #[test]
    fn first_cut_rescans_then_only_changes_are_sent() {
        let m = DirtyMap::new(16 * MIB);
        m.mark(0, 1);
        let c1 = m.cut(None, 65536);
        assert!(matches!(&c1.plan, Plan::Rescan(r) if r.contains("tracking started")));
        let c2 = m.cut(Some(c1.token), 65536);
        assert_eq!(changes(&c2), &[] as &[(u64, u64)], "nothing written since");
        m.mark(65536 * 3 + 100, 10);
        m.mark(65536 * 4, 65536 * 2);
        m.mark(15 * MIB, 10 * MIB); // clipped at the end
        let c3 = m.cut(Some(c2.token), 65536);
        assert_eq!(changes(&c3), &[(3, 3), (240, 16)]);
        // 128 KiB blocks: granules 3..6 are blocks 1..3; 4 KiB blocks: 16 each.
        m.mark(65536 * 3, 1);
        let c4 = m.cut(Some(c3.token), 131072);
        assert_eq!(changes(&c4), &[(1, 1)]);
        m.mark(65536, 1);
        let c5 = m.cut(Some(c4.token), 4096);
        assert_eq!(changes(&c5), &[(16, 16)]);
    }

    #[test]
    fn a_failed_round_is_sent_again_and_unknown_tokens_rescan() {
        let m = DirtyMap::new(MIB);
        let c1 = m.cut(None, 65536);
        m.mark(0, 1);
        let c2 = m.cut(Some(c1.token), 65536);
        assert_eq!(changes(&c2), &[(0, 1)]);
        // The round of c2 failed: the client presents c1 again and gets block 0 again.
        m.mark(65536 * 2, 1);
        let c3 = m.cut(Some(c1.token), 65536);
        assert_eq!(changes(&c3), &[(0, 1), (2, 1)]);
        assert_eq!(c3.backlog_bytes, 2 * 65536);
        // Success of c3: only what came after it.
        let c4 = m.cut(Some(c3.token), 65536);
        assert_eq!(changes(&c4), &[] as &[(u64, u64)]);
        let other = DirtyMap::new(MIB); // an agent restart
        assert!(matches!(
            &other.cut(Some(c4.token), 65536).plan,
            Plan::Rescan(_)
        ));
        let stale = Token { cut: 1, ..c4.token };
        assert!(
            matches!(&m.cut(Some(stale), 65536).plan, Plan::Rescan(r) if r.contains("unknown"))
        );
    }

    #[test]
    fn lost_events_and_drain_failures_rescan_once() {
        let m = DirtyMap::new(MIB);
        let c1 = m.cut(None, 65536);
        m.lose("ring buffer overflow: 3 events lost");
        let c2 = m.cut(Some(c1.token), 65536);
        assert!(matches!(&c2.plan, Plan::Rescan(r) if r.contains("overflow")));
        assert_eq!(
            c2.backlog_bytes, MIB,
            "a lost event makes the whole disk backlog"
        );
        let c3 = m.cut(Some(c2.token), 65536);
        assert_eq!(changes(&c3), &[] as &[(u64, u64)]);
        m.set_drain(Box::new(|| Err("ring buffer poll failed".into())));
        let c4 = m.cut(Some(c3.token), 65536);
        assert!(matches!(&c4.plan, Plan::Rescan(r) if r.contains("poll failed")));
    }

    #[test]
    fn backlog_counts_changes_and_their_age() {
        let m = DirtyMap::new(MIB);
        let c1 = m.cut(None, 65536);
        assert_eq!(m.backlog(), (0, None));
        m.mark(0, 3 * 65536);
        let (bytes, age) = m.backlog();
        assert_eq!(bytes, 3 * 65536);
        assert!(age.is_some());
        let c2 = m.cut(Some(c1.token), 65536);
        assert_eq!(c2.backlog_bytes, 3 * 65536);
        assert_eq!(m.backlog().0, 3 * 65536, "in flight until acknowledged");
        let _ = m.cut(Some(c2.token), 65536);
        assert_eq!(m.backlog(), (0, None));
    }
}
