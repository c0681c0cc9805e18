//! Block hashing, encoding for the wire, and verification of received blocks.
//!
//! Bytes from the network become a [`VerifiedRun`] only through [`verify_run`], which checks each
//! block against the agent's BLAKE3 hash; the disk writer accepts nothing else.

use std::cell::RefCell;

use crate::wire::{Encoding, Hash, WireBlock};

pub use failback_config::block_size::{MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};
/// Default block size.
pub const DEFAULT_BLOCK_SIZE: u32 = 64 * 1024;
/// Bytes read and hashed per batch (one memory map, or several cache-sized reads).
pub const BATCH_BYTES: u64 = 4 * 1024 * 1024;

/// Bytes read per `pread` when scanning a disk to hash it: small enough that the buffer stays
/// in the core's L2 cache, so the zero check and BLAKE3 read the bytes from cache right after
/// the kernel copied them there. Measured on a 4 GiB image with a warm page cache (zero check
/// and BLAKE3, one core): 0.86 s with 128 KiB reads, 0.88 s with 64 KiB, 1.1-1.25 s with
/// 256 KiB and 4 MiB reads (the copy and the hash each go to DRAM). Whether reading beats a
/// memory map depends on the page cache; see [`crate::scan`].
pub const SCAN_BYTES: usize = 128 * 1024;

/// Checks a block size: power of two in 4 KiB..=4 MiB (the rule of
/// [`failback_config::block_size`], shared with the DR service's `--block-size`).
pub fn validate_block_size(bs: u32) -> Result<(), String> {
    failback_config::block_size::validate_block_size(u64::from(bs)).map(|_| ())
}

/// Number of blocks of `block_size` covering `size` bytes (the last one may be short).
pub fn block_count(size: u64, block_size: u32) -> u64 {
    size.div_ceil(u64::from(block_size))
}

/// Length of block `index` of a disk of `size` bytes.
pub fn block_len(size: u64, block_size: u32, index: u64) -> u64 {
    let start = index * u64::from(block_size);
    size.saturating_sub(start).min(u64::from(block_size))
}

/// True when every byte is zero. Compares in u64-sized chunks (vectorises well).
pub fn is_zero(buf: &[u8]) -> bool {
    // OR-fold 256-byte chunks (the fold vectorises; one branch per chunk) with an early exit.
    let mut chunks = buf.chunks_exact(256);
    for c in &mut chunks {
        if c.iter().fold(0u8, |a, &b| a | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// Hash of `len` zero bytes, precomputed once per length (full blocks and the tail).
#[derive(Debug, Clone)]
pub struct ZeroHashes {
    full: Hash,
    full_len: usize,
    tail: Hash,
    tail_len: usize,
}

impl ZeroHashes {
    /// For a disk of `size` bytes cut in `block_size` blocks.
    pub fn new(size: u64, block_size: u32) -> Self {
        let full_len = usize::try_from(block_size).unwrap_or(usize::MAX);
        let tail_len = usize::try_from(size % u64::from(block_size)).unwrap_or(0);
        let z = vec![0u8; full_len];
        ZeroHashes {
            full: *blake3::hash(&z).as_bytes(),
            full_len,
            tail: *blake3::hash(&z[..tail_len]).as_bytes(),
            tail_len,
        }
    }

    /// Hash of a zero block of `len` bytes.
    pub fn get(&self, len: usize) -> Hash {
        if len == self.full_len {
            self.full
        } else if len == self.tail_len {
            self.tail
        } else {
            *blake3::hash(&vec![0u8; len]).as_bytes()
        }
    }
}

/// Hash of one block: zero blocks use the precomputed hash (a zero check is far cheaper).
pub fn hash_block(buf: &[u8], zeros: &ZeroHashes) -> (Hash, bool) {
    if is_zero(buf) {
        (zeros.get(buf.len()), true)
    } else {
        (*blake3::hash(buf).as_bytes(), false)
    }
}

/// Whole-disk digest: BLAKE3 over the ordered block hashes.
#[derive(Debug, Default, Clone)]
pub struct DiskDigest {
    hasher: blake3::Hasher,
    blocks: u64,
}

impl DiskDigest {
    pub fn new() -> Self {
        Self::default()
    }
    /// Feeds the next block hash (in disk order).
    pub fn push(&mut self, h: &Hash) {
        self.hasher.update(h);
        self.blocks += 1;
    }
    /// Number of hashes fed.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }
    /// The digest.
    pub fn finish(&self) -> Hash {
        *self.hasher.finalize().as_bytes()
    }
}

/// The whole-disk digest of the first `size` bytes of `path` with `block_size` blocks, as the
/// engine computes it after a final round (what a completed failback recorded). Reads the
/// disk sequentially in large chunks.
pub fn file_digest(path: &std::path::Path, size: u64, block_size: u32) -> std::io::Result<Hash> {
    use std::io::Read;
    validate_block_size(block_size)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut f = std::fs::File::open(path)?;
    let zeros = ZeroHashes::new(size, block_size);
    let mut digest = DiskDigest::new();
    let per = (BATCH_BYTES / u64::from(block_size)).max(1);
    let mut buf = Vec::new();
    let blocks = block_count(size, block_size);
    let mut i = 0;
    while i < blocks {
        let n = per.min(blocks - i);
        let start = i * u64::from(block_size);
        let len = (n * u64::from(block_size)).min(size - start);
        buf.resize(usize::try_from(len).unwrap_or(usize::MAX), 0);
        f.read_exact(&mut buf).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("{} at offset {start}: {e}", path.display()),
            )
        })?;
        for chunk in buf.chunks(usize::try_from(block_size).unwrap_or(usize::MAX)) {
            digest.push(&hash_block(chunk, &zeros).0);
        }
        i += n;
    }
    Ok(digest.finish())
}

thread_local! {
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
}

/// zstd level: fast (1); the link is usually faster than a higher level would compress.
const ZSTD_LEVEL: i32 = 1;
/// Bytes of a block compressed first to decide whether compressing the whole is worth it.
const SAMPLE: usize = 4096;

fn compress(data: &[u8]) -> Option<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
        }
        let comp = c.as_mut()?;
        comp.compress(data).ok()
    })
}

/// The zstd encoding of a non-zero block if it is worth sending instead of the raw bytes
/// (same rule as [`choose_encoding`]).
pub fn compress_if_smaller(data: &[u8]) -> Option<Vec<u8>> {
    match choose_encoding(data, false) {
        (Encoding::Zstd, z) => z,
        _ => None,
    }
}

/// True when the first KiB of `data` uses nearly every byte value, as random, encrypted or
/// already-compressed data does (~251 of 256 values are expected) and text, code or sparse
/// data do not: zstd would not shrink it, and this count costs far less than trying
/// (measured: zstd's sample attempts were ~4 % of the agent's CPU in a full sync).
fn looks_random(data: &[u8]) -> bool {
    const PROBE: usize = 1024;
    const DISTINCT: u32 = 240;
    let mut seen = [0u64; 4];
    for &b in &data[..data.len().min(PROBE)] {
        seen[usize::from(b >> 6)] |= 1 << (b & 63);
    }
    data.len() >= PROBE && seen.iter().map(|w| w.count_ones()).sum::<u32>() >= DISTINCT
}

/// Chooses the wire encoding of a differing block: zero marker, zstd if it shrinks (returned
/// compressed), else raw (the caller copies the block itself). Incompressible data is detected
/// by a byte-value count (`looks_random`), then on a 4 KiB sample, so random data costs almost
/// nothing.
pub fn choose_encoding(data: &[u8], zero: bool) -> (Encoding, Option<Vec<u8>>) {
    if zero {
        return (Encoding::Zero, None);
    }
    let worth_trying = if data.len() > SAMPLE * 2 {
        !looks_random(data) && compress(&data[..SAMPLE]).is_some_and(|s| s.len() < SAMPLE * 7 / 8)
    } else {
        true
    };
    if worth_trying {
        if let Some(z) = compress(data) {
            if z.len() < data.len() - data.len() / 32 {
                return (Encoding::Zstd, Some(z));
            }
        }
    }
    (Encoding::Raw, None)
}

/// Encodes a differing block as an owned [`WireBlock`] (see [`choose_encoding`]).
pub fn encode_block(data: &[u8], hash: Hash, zero: bool) -> WireBlock {
    let (encoding, z) = choose_encoding(data, zero);
    let payload = match encoding {
        Encoding::Zero => Vec::new().into(),
        Encoding::Zstd => z.unwrap_or_default().into(),
        Encoding::Raw => data.to_vec().into(),
    };
    WireBlock::new(encoding, hash, payload)
}

/// The verified bytes of one block, without copying them out of the received frame.
#[derive(Debug, Clone)]
pub enum Piece {
    /// Bytes of the block (a slice of the received frame, or the decompressed block).
    Data(bytes::Bytes),
    /// A block of this many zero bytes.
    Zero(usize),
}

impl Piece {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Piece::Data(b) => b.len(),
            Piece::Zero(n) => *n,
        }
    }

    /// True for an empty piece.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Consecutive blocks whose content matched the agent's hashes. Only [`verify_run`] creates
/// one, so holding a `VerifiedRun` proves the bytes were checked.
#[derive(Debug)]
pub struct VerifiedRun {
    offset: u64,
    pieces: Vec<Piece>,
    hashes: Vec<Hash>,
    first_block: u64,
}

impl VerifiedRun {
    /// Byte offset of the run on the disk.
    pub fn offset(&self) -> u64 {
        self.offset
    }
    /// The blocks' bytes in order (one piece per block).
    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }
    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.pieces.iter().map(|p| p.len() as u64).sum()
    }
    /// True for a run without bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The run's bytes as one buffer (tests and small runs).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(usize::try_from(self.len()).unwrap_or(0));
        for p in &self.pieces {
            match p {
                Piece::Data(b) => out.extend_from_slice(b),
                Piece::Zero(n) => out.resize(out.len() + n, 0),
            }
        }
        out
    }
    /// Index of the first block.
    pub fn first_block(&self) -> u64 {
        self.first_block
    }
    /// The agent's (verified) hash of each block.
    pub fn hashes(&self) -> &[Hash] {
        &self.hashes
    }
}

/// A block of a received run that failed verification.
#[derive(Debug, Clone)]
pub struct BadBlock {
    pub block: u64,
    pub reason: String,
}

/// Runs shorter than this are written buffered even where `O_DIRECT` works (see [`verify_run`]).
pub const DIRECT_MIN_RUN: usize = 1024 * 1024;

/// Decodes and verifies one received block of `len` bytes.
fn verify_block(b: &WireBlock, len: usize, zeros: &ZeroHashes) -> Result<Piece, String> {
    let piece = match b.encoding {
        Encoding::Zero => {
            if b.hash != zeros.get(len) {
                return Err("zero marker with a non-zero hash".into());
            }
            return Ok(Piece::Zero(len));
        }
        Encoding::Raw => {
            if b.payload.len() != len {
                return Err(format!(
                    "raw payload of {} bytes, expected {len}",
                    b.payload.len()
                ));
            }
            b.payload.clone()
        }
        Encoding::Zstd => {
            let mut out = vec![0u8; len];
            let got = zstd::bulk::decompress_to_buffer(&b.payload, &mut out[..])
                .map_err(|e| format!("zstd payload does not decode: {e}"))?;
            if got != len {
                return Err(format!("payload decodes to {got} bytes, expected {len}"));
            }
            bytes::Bytes::from(out)
        }
    };
    // A raw block's hash may have been computed as it arrived (`WireBlock::arrived`).
    let arrived = b.arrived.filter(|_| b.encoding == Encoding::Raw);
    if arrived.unwrap_or_else(|| *blake3::hash(&piece).as_bytes()) != b.hash {
        return Err("BLAKE3 hash mismatch (corrupted in transit)".into());
    }
    Ok(Piece::Data(piece))
}

/// Decodes and verifies a received run starting at `first_block` of a disk of `size` bytes
/// (raw blocks stay slices of the received frame). One thread per run: BLAKE3 verifies at
/// several GB/s, faster than the link delivers, and handing each run to the rayon pool cost
/// more in wake-ups and idle spinning than it saved (measured). Returns the verified
/// sub-runs (consecutive good blocks) and the blocks that failed.
///
/// With `aligned` (the target is written with `O_DIRECT`), each verified block of whole pages
/// of a run of at least [`DIRECT_MIN_RUN`] bytes is copied into a page-aligned buffer right
/// after its hash check, while it is still in the CPU cache: the writer then hands those bytes
/// to the device without a copy of its own. Shorter runs (scattered blocks of a delta) stay
/// buffered: the page cache absorbs them and the final flush writes them together, where a
/// direct write each would wait for the device (measured: slower for a 1 % delta).
pub fn verify_run(
    first_block: u64,
    blocks: Vec<WireBlock>,
    size: u64,
    block_size: u32,
    zeros: &ZeroHashes,
    aligned: bool,
) -> (Vec<VerifiedRun>, Vec<BadBlock>) {
    use crate::pool::{ALIGNED, DIRECT_ALIGN};
    let bs = u64::from(block_size);
    let n = blocks.len() as u64;
    let in_disk = (0..n)
        .take_while(|i| block_len(size, block_size, first_block + i) > 0)
        .count();
    let lens: Vec<usize> = (0..in_disk as u64)
        .map(|i| usize::try_from(block_len(size, block_size, first_block + i)).unwrap_or(0))
        .collect();
    let total: usize = lens.iter().sum();
    let copy = aligned && total >= DIRECT_MIN_RUN;
    // Taken when the first block needs a copy (none do when the frame reader already placed
    // the payloads aligned).
    let mut slab: Option<memmap2::MmapMut> = None;
    // (block index, range in the slab) of the blocks copied there.
    let mut copied: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
    let mut fill = 0usize;
    let mut checks: Vec<Result<Piece, String>> = blocks[..in_disk]
        .iter()
        .zip(&lens)
        .enumerate()
        .map(|(i, (b, &len))| {
            let r = verify_block(b, len, zeros);
            if let Ok(Piece::Data(d)) = &r {
                // Already aligned (the frame reader placed it so): nothing to copy.
                if copy && d.len() % DIRECT_ALIGN == 0 && !crate::pool::is_direct_aligned(d) {
                    if slab.is_none() {
                        slab = ALIGNED.take(total);
                    }
                    if let Some(m) = slab.as_mut().filter(|m| fill + d.len() <= m.len()) {
                        m[fill..fill + d.len()].copy_from_slice(d);
                        copied.push((i, fill..fill + d.len()));
                        fill += d.len();
                    }
                }
            }
            r
        })
        .collect();
    if let Some(m) = slab {
        let shared = ALIGNED.shared(m);
        for (i, range) in copied {
            checks[i] = Ok(Piece::Data(shared.slice(range)));
        }
    }

    let mut bad: Vec<BadBlock> = (in_disk as u64..n)
        .map(|i| BadBlock {
            block: first_block + i,
            reason: format!("block {} lies beyond the end of the disk", first_block + i),
        })
        .collect();
    // Split into runs of consecutive good blocks.
    let mut runs = Vec::new();
    let mut cur: Option<VerifiedRun> = None;
    for (i, (r, b)) in checks.into_iter().zip(&blocks).enumerate() {
        let index = first_block + i as u64;
        match r {
            Ok(piece) => {
                let run = cur.get_or_insert_with(|| VerifiedRun {
                    offset: index * bs,
                    pieces: Vec::new(),
                    hashes: Vec::new(),
                    first_block: index,
                });
                run.pieces.push(piece);
                run.hashes.push(b.hash);
            }
            Err(reason) => {
                runs.extend(cur.take());
                bad.push(BadBlock {
                    block: index,
                    reason,
                });
            }
        }
    }
    runs.extend(cur.take());
    bad.sort_by_key(|b| b.block);
    (runs, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_math() {
        assert!(validate_block_size(65536).is_ok());
        assert!(validate_block_size(4096).is_ok());
        assert!(validate_block_size(4 << 20).is_ok());
        assert!(validate_block_size(2048).is_err());
        assert!(validate_block_size(8 << 20).is_err());
        assert!(validate_block_size(65535).is_err());
        assert_eq!(block_count(10, 4096), 1);
        assert_eq!(block_count(8192, 4096), 2);
        assert_eq!(block_len(10000, 4096, 2), 10000 - 8192);
    }

    #[test]
    fn random_data_is_recognised_and_text_is_not() {
        assert!(looks_random(&failback_tests::random_bytes(1, 65536)));
        let text: Vec<u8> = b"2026-11-26 INFO failback sync started on disk-0 "
            .iter()
            .cycle()
            .take(65536)
            .copied()
            .collect();
        assert!(!looks_random(&text));
        let code: Vec<u8> = (0..65536u32).map(|i| (i % 200) as u8).collect();
        assert!(!looks_random(&code), "200 distinct values is below the bar");
        assert!(!looks_random(&[0xAB; 100]), "too short to judge");
        // Random blocks go raw without a zstd attempt; text still compresses.
        assert_eq!(
            choose_encoding(&failback_tests::random_bytes(2, 65536), false).0,
            Encoding::Raw
        );
        assert_eq!(choose_encoding(&text, false).0, Encoding::Zstd);
    }

    #[test]
    fn zero_detection_and_hashes() {
        let z = ZeroHashes::new(10000, 4096);
        let mut b = vec![0u8; 4096];
        assert!(is_zero(&b));
        assert_eq!(hash_block(&b, &z).0, *blake3::hash(&b).as_bytes());
        b[4095] = 1;
        assert!(!is_zero(&b));
        for at in [0, 300, 999] {
            let mut odd = vec![0u8; 1000];
            assert!(is_zero(&odd));
            odd[at] = 0x80;
            assert!(!is_zero(&odd), "non-zero byte at {at}");
        }
        assert_eq!(z.get(10000 - 8192), *blake3::hash(&[0u8; 1808]).as_bytes());
    }

    /// A hash computed on arrival counts only when it equals the agent's, and only for raw
    /// payloads (a compressed payload's own hash says nothing about the block).
    #[test]
    fn hash_computed_on_arrival_is_still_checked() {
        let zeros = ZeroHashes::new(2 * 4096, 4096);
        let data = failback_tests::random_bytes(3, 4096);
        let h = *blake3::hash(&data).as_bytes();
        let mut good = WireBlock::new(Encoding::Raw, h, data.clone().into());
        good.arrived = Some(h);
        let mut bad = WireBlock::new(Encoding::Raw, h, data.into());
        bad.arrived = Some([9; 32]);
        let text: Vec<u8> = b"some text ".iter().cycle().take(4096).copied().collect();
        let th = *blake3::hash(&text).as_bytes();
        let mut zstd = encode_block(&text, th, false);
        assert_eq!(zstd.encoding, Encoding::Zstd);
        zstd.arrived = Some(th);
        zstd.payload = vec![0u8; 20].into();
        let (runs, failed) = verify_run(0, vec![good, bad], 2 * 4096, 4096, &zeros, false);
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].first_block(), 0);
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].block, 1);
        assert!(failed[0].reason.contains("BLAKE3"), "{}", failed[0].reason);
        let (runs, failed) = verify_run(0, vec![zstd], 4096, 4096, &zeros, false);
        assert!(
            runs.is_empty() && failed.len() == 1,
            "garbage zstd payload accepted"
        );
    }

    #[test]
    fn encode_then_verify_and_detect_corruption() {
        let size = 3 * 4096 + 100;
        let zeros = ZeroHashes::new(size, 4096);
        let text: Vec<u8> = b"hello block ".iter().cycle().take(4096).copied().collect();
        let random: Vec<u8> = (0..4096u32)
            .map(|i| i.wrapping_mul(2654435761).to_le_bytes()[1])
            .collect();
        let zero = vec![0u8; 4096];
        let tail: Vec<u8> = vec![7u8; 100];
        let mut wire = Vec::new();
        for d in [&text, &random, &zero, &tail] {
            let (h, z) = hash_block(d, &zeros);
            wire.push(encode_block(d, h, z));
        }
        assert_eq!(wire[0].encoding, Encoding::Zstd);
        assert_eq!(wire[2].encoding, Encoding::Zero);
        let (runs, bad) = verify_run(0, wire.clone(), size, 4096, &zeros, false);
        assert!(bad.is_empty());
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].len(), size);
        assert_eq!(&runs[0].to_vec()[4096..8192], &random[..]);
        assert_eq!(&runs[0].to_vec()[8192..12288], &zero[..]);
        // For O_DIRECT: whole-page blocks of long runs are copied to page-aligned memory.
        // Raw blocks the writer takes straight from the received frame (not copied).
        let from_frame = |run: &VerifiedRun, wire: &[WireBlock], i: usize| match &run.pieces()[i] {
            Piece::Data(d) => d.as_ptr() == wire[i].payload.as_ptr(),
            Piece::Zero(_) => false,
        };
        let random_run = |n: usize| {
            let z = ZeroHashes::new(n as u64 * 4096, 4096);
            let w: Vec<WireBlock> = (0..n as u64)
                .map(|i| {
                    let d: Vec<u8> = failback_tests::random_bytes(i, 4096);
                    let (h, zero) = hash_block(&d, &z);
                    encode_block(&d, h, zero)
                })
                .collect();
            (w, z)
        };
        let (short, z) = random_run(3);
        let (direct, _) = verify_run(0, short.clone(), 3 * 4096, 4096, &z, true);
        assert!(
            (0..3).all(|i| from_frame(&direct[0], &short, i)),
            "short run: buffered, uncopied"
        );
        let (big, z) = random_run(DIRECT_MIN_RUN / 4096);
        let big_size = DIRECT_MIN_RUN as u64;
        let (direct, bad) = verify_run(0, big.clone(), big_size, 4096, &z, true);
        assert!(bad.is_empty());
        assert_eq!(direct[0].len(), big_size);
        let came_aligned = |i: usize| crate::pool::is_direct_aligned(&big[i].payload);
        assert!(
            (0..big.len()).all(|i| from_frame(&direct[0], &big, i) == came_aligned(i)),
            "unaligned payloads copied for O_DIRECT, aligned ones (as the frame reader places \
             them) used where they are"
        );
        assert!(direct[0].pieces().iter().all(|p| match p {
            Piece::Data(d) => crate::pool::is_direct_aligned(d),
            Piece::Zero(_) => false,
        }));
        let (buffered, _) = verify_run(0, big.clone(), big_size, 4096, &z, false);
        assert_eq!(
            direct[0].to_vec(),
            buffered[0].to_vec(),
            "same bytes either way"
        );
        assert!(
            (0..big.len()).all(|i| from_frame(&buffered[0], &big, i)),
            "buffered: no copy"
        );

        let mut p = wire[1].payload.to_vec();
        p[10] ^= 0xff;
        wire[1].payload = p.into();
        let (runs, bad) = verify_run(0, wire, size, 4096, &zeros, true);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].block, 1);
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[1].offset(), 8192);
    }
}
