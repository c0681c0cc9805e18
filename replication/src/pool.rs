//! Recycled frame buffers.
//!
//! A full sync moves thousands of multi-MiB frames. Allocated fresh, each one costs a page fault
//! and a kernel page-zeroing per 4 KiB (measured: ~10 % of the agent's CPU and, with the
//! `vec![0; n]` memset, ~15 % of the client's). Frames given back here after use are handed out
//! again with their memory already mapped.

use std::sync::Mutex;

/// Buffers smaller than this are not worth keeping.
const MIN_KEEP: usize = 256 * 1024;
/// At most this many idle buffers are kept (bounds idle memory to ~KEEP x frame size).
const KEEP: usize = 24;

/// Size of a transparent huge page (x86-64, aarch64 with 4 KiB pages).
const HUGE_PAGE: usize = 2 * 1024 * 1024;

/// Asks for transparent huge pages on the 2 MiB-aligned part of a large buffer: frames are
/// copied, encrypted, hashed and handed to `O_DIRECT` (which pins their pages) at GB/s, and with
/// 4 KiB pages the TLB misses and per-page pinning showed up in profiles (measured: a 4 GiB full
/// sync used ~5 % less CPU with huge pages). Advice only: where THP is off nothing changes.
fn with_huge_pages(buf: Vec<u8>) -> Vec<u8> {
    let start = buf.as_ptr().addr();
    let first = start.next_multiple_of(HUGE_PAGE);
    let end = (start + buf.capacity()) / HUGE_PAGE * HUGE_PAGE;
    if end > first {
        // SAFETY: madvise with MADV_HUGEPAGE only changes how the kernel backs this range of our
        // own allocation (page-aligned, inside the buffer); contents and validity are unchanged.
        #[allow(unsafe_code)]
        unsafe {
            libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE);
        }
    }
    buf
}

/// A set of idle buffers.
#[derive(Debug)]
pub struct Pool {
    idle: Mutex<Vec<Vec<u8>>>,
    /// Smaller buffers are not kept.
    min_keep: usize,
    /// At most this many idle buffers are kept.
    keep: usize,
}

/// The process-wide pool used by the frame reader, writer and agent.
pub static POOL: Pool = Pool::new();

/// Read buffers of disk pieces ([`crate::scan`], 128 KiB each): the agent's frames hold slices
/// of them until the writer has encrypted them, so as many are in flight as its writer queue
/// holds runs (32 x 4 MiB); kept here, a 128 KiB buffer is not mapped and unmapped by malloc
/// for every read.
pub static PIECES: Pool = Pool::with_limits(64 * 1024, 1024);

impl Default for Pool {
    fn default() -> Self {
        Self::new()
    }
}

impl Pool {
    /// An empty pool for frame buffers.
    pub const fn new() -> Self {
        Self::with_limits(MIN_KEEP, KEEP)
    }

    /// An empty pool keeping up to `keep` buffers of at least `min_keep` bytes.
    pub const fn with_limits(min_keep: usize, keep: usize) -> Self {
        Pool {
            idle: Mutex::new(Vec::new()),
            min_keep,
            keep,
        }
    }

    fn pop(&self, min_capacity: usize) -> Option<Vec<u8>> {
        if min_capacity < self.min_keep {
            return None;
        }
        let mut pool = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let i = best_fit(pool.iter().map(Vec::capacity), min_capacity)?;
        Some(pool.swap_remove(i))
    }

    /// An empty buffer with at least `capacity` bytes reserved.
    pub fn take_empty(&self, capacity: usize) -> Vec<u8> {
        match self.pop(capacity) {
            Some(mut b) => {
                b.clear();
                b
            }
            None => with_huge_pages(Vec::with_capacity(capacity)),
        }
    }

    /// A buffer of exactly `len` bytes with unspecified contents (only newly grown bytes are
    /// zeroed), for reading into.
    pub fn take_filled(&self, len: usize) -> Vec<u8> {
        let mut b = self
            .pop(len)
            .unwrap_or_else(|| with_huge_pages(Vec::with_capacity(len)));
        if b.len() < len {
            b.resize(len, 0);
        }
        b.truncate(len);
        b
    }

    /// Returns a buffer for reuse.
    pub fn give(&self, buf: Vec<u8>) {
        if buf.capacity() < self.min_keep {
            return;
        }
        let mut pool = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        keep(&mut pool, buf, self.keep, Vec::capacity);
    }

    /// Shares a buffer as `Bytes`; it returns to this pool once every slice of it is dropped.
    pub fn shared(&'static self, buf: Vec<u8>) -> bytes::Bytes {
        if buf.capacity() < self.min_keep {
            return bytes::Bytes::from(buf);
        }
        bytes::Bytes::from_owner(Pooled(buf, self))
    }
}

/// Owner of a pooled buffer inside [`bytes::Bytes`]: when the last slice of a received frame
/// is dropped (after the writer wrote it), the memory goes back to the pool.
struct Pooled(Vec<u8>, &'static Pool);

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.1.give(std::mem::take(&mut self.0));
    }
}

/// Alignment of [`ALIGNED`] buffers and of what may be written from them with `O_DIRECT`
/// (covers every logical sector size).
pub const DIRECT_ALIGN: usize = 4096;
/// Idle [`ALIGNED`] buffers kept: as many as a client has frames in flight (its queues hold
/// up to ~15), so a sync does not map fresh memory per frame (measured: 330k page faults).
const ALIGNED_KEEP: usize = 16;
/// [`ALIGNED`] buffers are sized in steps of this.
const ALIGNED_STEP: usize = 1024 * 1024;
/// Smallest [`ALIGNED`] buffer: a full run (4 MiB of blocks) with room for a block or two more,
/// so any idle buffer fits any run. Sized to the request, a pool of small buffers left by short
/// runs missed every long one: each missed run mapped and zeroed fresh memory (measured: 6 % of
/// the client's CPU in a full sync once the buffers were backed by huge pages).
const ALIGNED_MIN: usize = 5 * 1024 * 1024;

/// The idle buffer that fits `need` with the least to spare (sizes in pool order).
fn best_fit(sizes: impl Iterator<Item = usize>, need: usize) -> Option<usize> {
    sizes
        .enumerate()
        .filter(|&(_, s)| s >= need)
        .min_by_key(|&(_, s)| s)
        .map(|(i, _)| i)
}

/// Keeps `buf` for reuse: added while there is room, else in place of a smaller idle buffer
/// (so the pool holds the sizes that fit the most requests), else dropped.
fn keep<T>(pool: &mut Vec<T>, buf: T, max: usize, size: impl Fn(&T) -> usize) {
    if pool.len() < max {
        pool.push(buf);
    } else if let Some(i) = (0..pool.len()).min_by_key(|&i| size(&pool[i])) {
        if size(&pool[i]) < size(&buf) {
            pool[i] = buf;
        }
    }
}

/// Page-aligned buffers (anonymous mappings) for blocks written with `O_DIRECT`, recycled like
/// [`POOL`] so a full sync does not map and fault in fresh memory per run.
#[derive(Debug, Default)]
pub struct AlignedPool(Mutex<Vec<memmap2::MmapMut>>);

/// The process-wide pool of aligned buffers (client: verified blocks bound for the disk).
pub static ALIGNED: AlignedPool = AlignedPool::new();

impl AlignedPool {
    /// An empty pool.
    pub const fn new() -> Self {
        AlignedPool(Mutex::new(Vec::new()))
    }

    /// A page-aligned buffer of at least `len` bytes; `None` if memory cannot be mapped.
    pub fn take(&self, len: usize) -> Option<memmap2::MmapMut> {
        {
            let mut pool = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = best_fit(pool.iter().map(|m| m.len()), len) {
                return Some(pool.swap_remove(i));
            }
        }
        let size = len.div_ceil(ALIGNED_STEP).max(1) * ALIGNED_STEP;
        let m = memmap2::MmapMut::map_anon(size.max(ALIGNED_MIN)).ok()?;
        if m.len() >= HUGE_PAGE {
            // Advice only; without transparent huge pages the buffer works the same.
            let _ = m.advise(memmap2::Advice::HugePage);
        }
        Some(m)
    }

    /// Shares a buffer as `Bytes`; it returns to this pool once every slice of it is dropped.
    pub fn shared(&'static self, m: memmap2::MmapMut) -> bytes::Bytes {
        bytes::Bytes::from_owner(AlignedOwner(Some(m), self))
    }

    fn give(&self, m: memmap2::MmapMut) {
        let mut pool = self.0.lock().unwrap_or_else(|p| p.into_inner());
        keep(&mut pool, m, ALIGNED_KEEP, |m| m.len());
    }
}

/// Owner of an aligned buffer inside [`bytes::Bytes`] (see [`AlignedPool::shared`]).
struct AlignedOwner(Option<memmap2::MmapMut>, &'static AlignedPool);

impl AsRef<[u8]> for AlignedOwner {
    fn as_ref(&self) -> &[u8] {
        self.0.as_deref().unwrap_or_default()
    }
}

impl Drop for AlignedOwner {
    fn drop(&mut self) {
        if let Some(m) = self.0.take() {
            self.1.give(m);
        }
    }
}

/// True when `s` may be written with `O_DIRECT`: aligned start and length.
pub fn is_direct_aligned(s: &[u8]) -> bool {
    s.as_ptr().addr().is_multiple_of(DIRECT_ALIGN) && s.len().is_multiple_of(DIRECT_ALIGN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_are_aligned_and_come_back() {
        let pool: &'static AlignedPool = Box::leak(Box::new(AlignedPool::new()));
        let mut m = pool.take(100_000).unwrap();
        assert!(m.len() >= 100_000 && is_direct_aligned(&m[..8192]));
        m[..5].copy_from_slice(b"hello");
        let ptr = m.as_ptr();
        let b = pool.shared(m);
        let head = b.slice(0..4096);
        assert!(is_direct_aligned(&head) && !is_direct_aligned(&b.slice(1..4097)));
        drop(b);
        assert!(
            pool.0.lock().unwrap().is_empty(),
            "returned while a slice lives"
        );
        assert_eq!(&head[..5], b"hello");
        drop(head);
        assert_eq!(pool.take(4096).unwrap().as_ptr(), ptr, "reused");
    }

    #[test]
    fn best_fit_and_keeping_the_larger() {
        assert_eq!(best_fit([3, 8, 5, 9].into_iter(), 4), Some(2));
        assert_eq!(best_fit([3, 8].into_iter(), 9), None);
        let mut pool = vec![4usize, 2, 6];
        keep(&mut pool, 5, 3, |&s| s);
        assert_eq!(pool, [4, 5, 6], "the smallest gave way to a larger one");
        keep(&mut pool, 1, 3, |&s| s);
        assert_eq!(pool, [4, 5, 6], "a smaller one is dropped when full");
        keep(&mut pool, 1, 4, |&s| s);
        assert_eq!(pool, [4, 5, 6, 1], "kept while there is room");
    }

    #[test]
    fn buffers_come_back() {
        let pool: &'static Pool = Box::leak(Box::new(Pool::new()));
        let b = pool.take_filled(1 << 20);
        assert_eq!(b.len(), 1 << 20);
        let ptr = b.as_ptr();
        let s = pool.shared(b);
        let slice = s.slice(10..20);
        drop(s);
        assert!(
            pool.idle.lock().unwrap().is_empty(),
            "returned while a slice lives"
        );
        drop(slice);
        let again = pool.take_empty(1 << 20);
        assert_eq!(again.as_ptr(), ptr, "the returned buffer is reused");
        assert!(again.is_empty());
        let filled = {
            pool.give(again);
            pool.take_filled(1000 * 1000)
        };
        assert_eq!((filled.len(), filled.as_ptr()), (1000 * 1000, ptr));
        assert_eq!(pool.take_filled(100).len(), 100);
        assert!(pool.take_empty(2 << 20).capacity() >= 2 << 20);
    }
}
