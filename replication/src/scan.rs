//! Reading a disk batch by batch to hash it, through whichever of two paths measures cheaper
//! on this machine, for this file, right now.
//!
//! - **Map**: a read-only memory map of the batch ([`crate::mapped`]); no copy, but the kernel
//!   sets up and tears down page tables for it. When the page cache holds the file in 2 MiB
//!   folios this costs almost nothing (one entry per 2 MiB); in 4 KiB folios (a file just
//!   written, e.g. copied) it costs more than copying.
//! - **Read**: `pread` into a buffer small enough to stay in the core's L2 cache
//!   ([`block::SCAN_BYTES`]), so hashing reads from cache what the kernel just copied there.
//!
//! Measured on 4 GiB images with a warm page cache (zero check + BLAKE3, one core): map
//! 0.64 s vs read 0.77 s on a file read back after a cache drop (2 MiB folios); map 1.0-1.15 s
//! vs read 0.84-0.86 s on a freshly copied file. Neither is always right, and which folios the
//! page cache holds is not visible to a program, so the scanner measures: every
//! [`TRIAL_EVERY`] batches it reads [`TRIAL_BATCHES`] batches alternating the two methods,
//! timing each batch's read and processing in thread CPU time (user + system), and uses the
//! cheaper per byte until the next trial. The trial does the real work, so it costs nothing
//! extra; neighbouring batches usually hold similar data, so the content evens out. (Timing
//! one batch both ways was tried first: the second pass finds the batch in L3 cache, which
//! hides exactly the DRAM cost that makes mapping lose on small folios.)

use std::time::Duration;

use crate::block;
use crate::mapped::Mapped;

/// Batches between two trials: 1 GiB.
pub const TRIAL_EVERY: u64 = batches(1 << 30);
/// Batches in a trial (half read each way): 64 MiB.
pub const TRIAL_BATCHES: u64 = batches(64 << 20);

/// Whole batches in `bytes` (at least two).
const fn batches(bytes: u64) -> u64 {
    let n = bytes / block::BATCH_BYTES;
    if n < 2 {
        2
    } else {
        n
    }
}

/// Something a [`Scanner`] can read: a source disk on the agent, the local target on the client.
pub trait Source {
    /// The error a failed read reports (it names the path and offset).
    type Error;
    /// The range mapped and faulted in, or `None` (mapping off or impossible: use `read`).
    fn map(&self, offset: u64, len: usize) -> Option<Mapped>;
    /// False for a source that never maps (then no trial is run: every batch is read).
    fn mappable(&self) -> bool {
        true
    }
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), Self::Error>;
}

/// How a batch is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Memory map.
    Map,
    /// `pread` into a cache-sized buffer.
    Read,
}

/// Reads batches for one thread (one stream on the agent, one disk on the client).
#[derive(Debug)]
pub struct Scanner {
    block_size: usize,
    method: Method,
    /// Batches left in the current trial, or before the next one (see `in_trial`).
    left: u64,
    in_trial: bool,
    /// Alternates which method a trial starts with.
    map_first: bool,
    /// Per method (map, read): CPU time and bytes in the current trial.
    cost: [(Duration, u64); 2],
}

impl Scanner {
    /// A scanner for a disk cut in `block_size` blocks.
    pub fn new(block_size: u32) -> Self {
        Scanner {
            block_size: usize::try_from(block_size).unwrap_or(usize::MAX),
            method: Method::Read,
            left: 0,
            in_trial: false,
            map_first: true,
            cost: [(Duration::ZERO, 0); 2],
        }
    }

    /// The method the last batch used.
    pub fn method(&self) -> Method {
        self.method
    }

    /// Reads `len` bytes at `offset` (a batch starting on a block boundary) and hands them to
    /// `f` in order, in pieces of whole blocks (the last block of the disk may be short), each
    /// with its offset. A piece is shared (a map, or a pooled read buffer): the agent keeps
    /// slices of it in its frames until they are encrypted.
    pub fn scan<S: Source>(
        &mut self,
        src: &S,
        offset: u64,
        len: usize,
        mut f: impl FnMut(u64, &bytes::Bytes),
    ) -> Result<(), S::Error> {
        if !crate::mapped::enabled() || !src.mappable() {
            self.method = Method::Read;
            return self.read_pieces(src, offset, len, f);
        }
        if self.left == 0 {
            self.next_phase(offset);
        }
        self.left -= 1;
        if self.in_trial {
            // Alternate batch by batch, starting with the method this trial begins with.
            let map_now = (self.left % 2 == 1) == self.map_first;
            self.method = if map_now { Method::Map } else { Method::Read };
        }
        let t0 = self.in_trial.then(thread_cpu);
        let mut used = Method::Read;
        if self.method == Method::Map {
            if let Some(m) = src.map(offset, len) {
                f(offset, &bytes::Bytes::from_owner(m));
                used = Method::Map;
            }
        }
        if used == Method::Read {
            self.read_pieces(src, offset, len, &mut f)?;
            if self.method == Method::Map {
                // Cannot be mapped (a device that refuses, an unreadable page): read from now on.
                self.method = Method::Read;
                self.in_trial = false;
                self.left = TRIAL_EVERY;
            }
        }
        if let Some(t0) = t0.filter(|_| self.in_trial) {
            let c = &mut self.cost[usize::from(used == Method::Read)];
            c.0 += thread_cpu().saturating_sub(t0);
            c.1 += len as u64;
        }
        Ok(())
    }

    /// Starts a trial, or ends one and keeps the cheaper method per byte.
    fn next_phase(&mut self, offset: u64) {
        if !self.in_trial {
            self.in_trial = true;
            self.left = TRIAL_BATCHES;
            self.cost = [(Duration::ZERO, 0); 2];
            self.map_first = !self.map_first;
            return;
        }
        self.in_trial = false;
        self.left = TRIAL_EVERY;
        let per_byte = |(t, n): (Duration, u64)| t.as_nanos() as f64 / n.max(1) as f64;
        let (map, read) = (per_byte(self.cost[0]), per_byte(self.cost[1]));
        let was = self.method;
        self.method = if map < read {
            Method::Map
        } else {
            Method::Read
        };
        tracing::debug!(
            "scan from offset {offset}: {:?} (ns/KiB: map {:.0}, read {:.0}; was {was:?})",
            self.method,
            map * 1024.0,
            read * 1024.0
        );
    }

    fn read_pieces<S: Source>(
        &mut self,
        src: &S,
        offset: u64,
        len: usize,
        mut f: impl FnMut(u64, &bytes::Bytes),
    ) -> Result<(), S::Error> {
        let piece = (block::SCAN_BYTES / self.block_size).max(1) * self.block_size;
        let mut at = 0;
        while at < len {
            let n = piece.min(len - at);
            let mut buf = crate::pool::PIECES.take_filled(n);
            src.read(&mut buf, offset + at as u64)?;
            f(offset + at as u64, &crate::pool::PIECES.shared(buf));
            at += n;
        }
        Ok(())
    }
}

/// CPU time (user + system) of the calling thread.
fn thread_cpu() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    struct F(File);
    impl Source for F {
        type Error = std::io::Error;
        fn map(&self, offset: u64, len: usize) -> Option<Mapped> {
            crate::mapped::map(&self.0, offset, len)
        }
        fn read(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.0.read_exact_at(buf, offset)
        }
    }

    /// Whatever method a trial picks, the pieces cover the batch in order, byte for byte, on
    /// block boundaries; a read error reaches the caller.
    #[test]
    fn pieces_cover_the_batch_in_order() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..1024 * 1024 + 4096u32)
            .map(|i| (i % 251) as u8)
            .collect();
        f.write_all(&data).unwrap();
        let src = F(f);
        let mut s = Scanner::new(65536);
        for round in 0..TRIAL_BATCHES + 3 {
            let mut got = Vec::new();
            let mut next = 0u64;
            s.scan(&src, 0, data.len(), |off, piece| {
                assert_eq!(off, next, "round {round}: pieces in order");
                assert!(off % 65536 == 0, "on a block boundary");
                next += piece.len() as u64;
                got.extend_from_slice(piece);
            })
            .unwrap();
            assert_eq!(got, data, "round {round} ({:?})", s.method());
        }
        let err = s.read_pieces(&src, data.len() as u64, 65536, |_, _| {});
        assert!(err.is_err(), "a short read is an error");
    }

    /// A source that cannot be mapped is read, in cache-sized pieces, during a trial and after.
    #[test]
    fn unmappable_source_is_read() {
        struct Unmappable;
        impl Source for Unmappable {
            type Error = std::io::Error;
            fn map(&self, _: u64, _: usize) -> Option<Mapped> {
                None
            }
            fn read(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
                buf.fill((offset / 4096).to_le_bytes()[0]);
                Ok(())
            }
        }
        let mut s = Scanner::new(4096);
        for batch in 0..TRIAL_BATCHES + 2 {
            let mut pieces = 0;
            s.scan(&Unmappable, batch << 20, 1 << 20, |off, p| {
                assert!(p.len() <= block::SCAN_BYTES);
                assert_eq!(p[0], (off / 4096).to_le_bytes()[0]);
                pieces += 1;
            })
            .unwrap();
            assert_eq!(pieces, (1 << 20) / block::SCAN_BYTES);
            assert_eq!(s.method(), Method::Read);
        }
    }

    /// A source that says it never maps is never asked to, through trials and after.
    #[test]
    fn a_source_that_never_maps_is_never_asked_to() {
        struct NeverMaps;
        impl Source for NeverMaps {
            type Error = std::io::Error;
            fn map(&self, _: u64, _: usize) -> Option<Mapped> {
                panic!("map() called on a source that never maps")
            }
            fn mappable(&self) -> bool {
                false
            }
            fn read(&self, buf: &mut [u8], _: u64) -> std::io::Result<()> {
                buf.fill(1);
                Ok(())
            }
        }
        let mut s = Scanner::new(4096);
        for batch in 0..TRIAL_EVERY + TRIAL_BATCHES + 2 {
            s.scan(&NeverMaps, batch << 20, 1 << 20, |_, p| assert_eq!(p[0], 1))
                .unwrap();
        }
    }
}
