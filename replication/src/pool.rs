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

/// A set of idle buffers.
#[derive(Debug, Default)]
pub struct Pool(Mutex<Vec<Vec<u8>>>);

/// The process-wide pool used by the frame reader, writer and agent.
pub static POOL: Pool = Pool::new();

impl Pool {
    /// An empty pool.
    pub const fn new() -> Self {
        Pool(Mutex::new(Vec::new()))
    }

    fn pop(&self, min_capacity: usize) -> Option<Vec<u8>> {
        if min_capacity < MIN_KEEP {
            return None;
        }
        let mut pool = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let i = pool.iter().position(|b| b.capacity() >= min_capacity)?;
        Some(pool.swap_remove(i))
    }

    /// An empty buffer with at least `capacity` bytes reserved.
    pub fn take_empty(&self, capacity: usize) -> Vec<u8> {
        match self.pop(capacity) {
            Some(mut b) => {
                b.clear();
                b
            }
            None => Vec::with_capacity(capacity),
        }
    }

    /// A buffer of exactly `len` bytes with unspecified contents (only newly grown bytes are
    /// zeroed), for reading into.
    pub fn take_filled(&self, len: usize) -> Vec<u8> {
        let mut b = self.pop(len).unwrap_or_default();
        if b.len() < len {
            b.resize(len, 0);
        }
        b.truncate(len);
        b
    }

    /// Returns a buffer for reuse.
    pub fn give(&self, buf: Vec<u8>) {
        if buf.capacity() < MIN_KEEP {
            return;
        }
        let mut pool = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < KEEP {
            pool.push(buf);
        }
    }

    /// Shares a buffer as `Bytes`; it returns to this pool once every slice of it is dropped.
    pub fn shared(&'static self, buf: Vec<u8>) -> bytes::Bytes {
        if buf.capacity() < MIN_KEEP {
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

#[cfg(test)]
mod tests {
    use super::*;

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
            pool.0.lock().unwrap().is_empty(),
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
