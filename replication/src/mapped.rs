//! Zero-copy reads for hashing: a read-only memory map of one batch of a disk or image.
//!
//! One of the two ways [`crate::scan::Scanner`] reads a batch (it measures which is cheaper).
//! Each batch is faulted in with `MADV_POPULATE_READ`, which reports an unreadable page as an
//! error instead of raising SIGBUS; callers then fall back to `pread`, whose error names the
//! failing offset.
//!
//! Residual risk, and why mapping can be turned off (`--no-mmap`): a source that *shrinks*
//! while one of its batches is being hashed (an image truncated, a volume resized under a
//! running sync) can still raise SIGBUS instead of an error.
#![allow(unsafe_code)]

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns mapping on or off for this process (`--no-mmap`: always `pread`).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether mapping is on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// A mapped, faulted-in range; derefs to its bytes.
#[derive(Debug)]
pub struct Mapped(memmap2::Mmap);

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl std::ops::Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// Maps `len` bytes of `file` at `offset` (a multiple of the page size, and the range within
/// the file or device) and faults them in. `None` when mapping is off, impossible for this
/// file (pipes, character devices) or a page cannot be read: the caller then uses `pread`.
pub fn map(file: &File, offset: u64, len: usize) -> Option<Mapped> {
    if !enabled() || len == 0 || !offset.is_multiple_of(4096) {
        return None;
    }
    // SAFETY: a read-only, shared mapping of a range the caller keeps inside the file or
    // device. The bytes may change while mapped (the agent serves live disks); they are only
    // ever hashed or encrypted, never assumed to stay equal: a block that changes between its
    // hash and its encryption fails the client's check and is fetched again from a private copy
    // (see `BlocksFrame::push_hashed`).
    let map = unsafe {
        memmap2::MmapOptions::new()
            .offset(offset)
            .len(len)
            .map(file)
    }
    .ok()?;
    match map.advise(memmap2::Advice::PopulateRead) {
        Ok(()) => Some(Mapped(map)),
        Err(e) => {
            tracing::debug!("MADV_POPULATE_READ at offset {offset}: {e}; reading with pread");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn maps_a_range_and_refuses_what_it_cannot() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        let m = map(&f, 4096, 8192).expect("mapped");
        assert_eq!(&m[..], &data[4096..]);
        assert!(map(&f, 100, 4096).is_none(), "unaligned offset");
        assert!(map(&f, 0, 0).is_none(), "empty range");
        let null = File::open("/dev/null").unwrap();
        assert!(map(&null, 0, 4096).is_none(), "character device");
    }
}
