//! Structure-aware fuzzing of the wire frame decoder, on stable Rust.
//!
//! Why proptest (not cargo-fuzz or bolero): it runs on stable inside the normal `cargo test`
//! (so `make test` runs a bounded pass with no extra toolchain or engine), it generates
//! *structured* inputs (whole messages, then mutations of their encodings) rather than only
//! raw bytes, and it shrinks a failing input to a minimal one. A longer run is
//! `FAILBACK_FUZZ_CASES=100000 cargo test -p failback-replication --test fuzz_wire`.
//!
//! Properties:
//! - every message round-trips: `decode(encode(m)) == m`, and the length prefix is accepted;
//! - `decode` of arbitrary bytes and of mutated valid frames never panics, and what it accepts
//!   re-encodes to exactly the input (the decoder accepts nothing the encoder cannot produce);
//! - decoding allocates at most a small multiple of the frame's own size (counted by the
//!   allocator below), so no length field inside a frame can make the reader allocate more;
//! - the streaming frame reader (`FrameReader`, both its plain and its page-aligned `Blocks`
//!   path) never panics, fails only with frame or connection errors, and agrees with `decode`.
// A counting global allocator needs `unsafe impl GlobalAlloc`; it only forwards to `System`.
#![allow(unsafe_code)]

mod fuzz_common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use failback_replication::conn::FrameReader;
use failback_replication::wire::{
    frame_len, Encoding, ErrorCode, FrameError, Message, WireBlock, MAX_FRAME, PROTOCOL_VERSION,
};
use failback_replication::Error;
use fuzz_common::{arb_message, arb_mutation, config, mutate};
use proptest::prelude::*;

/// Counts the bytes live on the current thread and their peak. Thread-local so that the test
/// harness's other threads do not disturb a measurement.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    // `try_with`: during thread teardown the slots may be gone; then nothing is measured.
    let _ = LIVE.try_with(|l| {
        let now = l.get() + delta;
        l.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

fn size(layout: Layout) -> isize {
    isize::try_from(layout.size()).unwrap_or(isize::MAX)
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the counters
// are const-initialised thread-locals without destructors, so touching them never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        track(size(layout));
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        track(size(layout));
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        track(-size(layout));
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        // Counted as a fresh allocation before the old one is freed (the worst case of a move).
        track(isize::try_from(new).unwrap_or(isize::MAX));
        let p = System.realloc(ptr, layout, new);
        track(-size(layout));
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result and the peak bytes it had allocated at once on this thread.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    let peak = PEAK.with(Cell::get) - base;
    (out, usize::try_from(peak).unwrap_or(0))
}

/// Largest allocation a decode may make, per byte of frame body. The worst message is a
/// `Manifest` of empty disks: 17 bytes on the wire, an 88-byte `DiskInfo` in memory.
const MEMORY_FACTOR: usize = 8;
/// Plus this much, whatever the frame.
const MEMORY_SLACK: usize = 4096;

/// Decodes `body` and checks the decoder's contract: no panic (proptest catches one), memory
/// bounded by the body's size, and an accepted body is exactly the encoding of what came out.
fn check_decode(body: &[u8]) -> Result<(), TestCaseError> {
    let (res, peak) = peak_of(|| Message::decode(body));
    let bound = MEMORY_FACTOR * body.len() + MEMORY_SLACK;
    prop_assert!(
        peak <= bound,
        "decoding {} bytes (tag {:?}) allocated {peak} bytes at once, more than {bound}",
        body.len(),
        body.first()
    );
    if let Ok(m) = res {
        let frozen_hello =
            matches!(m, Message::AgentHello { version, .. } if version != PROTOCOL_VERSION);
        if !frozen_hello {
            let again = m.encode();
            prop_assert_eq!(
                &again[4..],
                body,
                "{} was accepted but re-encodes differently",
                m.name()
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn every_message_round_trips(m in arb_message()) {
        let frame = m.encode();
        let len = frame_len(frame[..4].try_into().unwrap());
        prop_assert_eq!(len, Ok(frame.len() - 4));
        let body = &frame[4..];
        prop_assert_eq!(Message::decode(body), Ok(m.clone()));
        let shared = bytes::Bytes::copy_from_slice(body);
        prop_assert_eq!(Message::decode_shared(&shared), Ok(m));
        check_decode(body)?;
    }

    #[test]
    fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        check_decode(&body)?;
    }

    /// Arbitrary bytes behind every known tag, so the fields' parsers see garbage too.
    #[test]
    fn arbitrary_bodies_behind_known_tags_never_panic(
        tag in prop::sample::select(fuzz_common::TAGS),
        rest in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut body = vec![tag];
        body.extend_from_slice(&rest);
        check_decode(&body)?;
    }

    #[test]
    fn mutated_frames_never_panic(
        m in arb_message(),
        muts in proptest::collection::vec(arb_mutation(), 1..4),
    ) {
        let mut body = m.encode()[4..].to_vec();
        for x in &muts {
            mutate(&mut body, x);
        }
        check_decode(&body)?;
    }

    #[test]
    fn length_prefix_is_checked(prefix in any::<[u8; 4]>()) {
        let n = u32::from_be_bytes(prefix) as usize;
        match frame_len(prefix) {
            Ok(len) => prop_assert!(len == n && (1..=MAX_FRAME).contains(&n)),
            Err(e) => prop_assert!(n == 0 || n > MAX_FRAME, "{e}"),
        }
    }
}

/// A `Manifest` that is nothing but empty disks: the densest way to make the decoder build
/// structures, one 88-byte `DiskInfo` per 17 bytes of frame.
fn dense_manifest(disks: u32) -> Vec<u8> {
    let mut body = vec![0x03];
    body.extend_from_slice(&disks.to_be_bytes());
    for _ in 0..disks {
        // id "", size 0, sector 0, device "", no serial
        body.extend_from_slice(&[0; 2 + 8 + 4 + 2 + 1]);
    }
    body
}

/// Regression: the manifest decoder grew its disk list by doubling, so one large frame of
/// empty disks held ~16x its size during decoding (a 16 MiB frame: ~260 MiB). It now reserves
/// what the frame can hold at once.
#[test]
fn dense_manifest_memory_stays_bounded() {
    for disks in [1u32, 1000, 100_000] {
        let body = dense_manifest(disks);
        let (res, peak) = peak_of(|| Message::decode(&body));
        let Ok(Message::Manifest { disks: got }) = res else {
            panic!("dense manifest of {disks} disks does not decode: {res:?}");
        };
        assert_eq!(got.len(), disks as usize);
        assert!(
            peak <= MEMORY_FACTOR * body.len() + MEMORY_SLACK,
            "{disks} disks: {} byte frame, {peak} bytes peak",
            body.len()
        );
    }
    // A count far beyond what the bytes hold is refused before anything is reserved for it.
    let mut lying = dense_manifest(3);
    lying[1..5].copy_from_slice(&u32::MAX.to_be_bytes());
    let (res, peak) = peak_of(|| Message::decode(&lying));
    assert!(matches!(res, Err(FrameError::Truncated(_))), "{res:?}");
    assert!(peak <= MEMORY_SLACK, "{peak}");
}

/// Runs a frame reader over `bytes` (as one connection) and returns every result until the
/// first error or the end.
async fn read_all(bytes: Vec<u8>, aligned: bool) -> Vec<Result<Message, Error>> {
    let (mut a, b) = tokio::io::duplex(1 << 16);
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let _ = a.write_all(&bytes).await;
        let _ = a.shutdown().await;
    });
    let mut reader = FrameReader::new(b, "fuzz");
    if aligned {
        reader = reader.align_blocks();
    }
    let mut out = Vec::new();
    loop {
        match reader.read().await {
            Ok(Some((m, _))) => out.push(Ok(m)),
            Ok(None) => break,
            Err(e) => {
                out.push(Err(e));
                break;
            }
        }
    }
    writer.abort();
    out
}

/// A message compared without the reader's private `arrived` hashes.
fn plain(m: &Message) -> Message {
    match m {
        Message::Blocks {
            stream,
            first_block,
            blocks,
        } => Message::Blocks {
            stream: *stream,
            first_block: *first_block,
            blocks: blocks
                .iter()
                .map(|b| WireBlock::new(b.encoding, b.hash, b.payload.clone()))
                .collect(),
        },
        other => other.clone(),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Checks that both readers agree and fail only with frame/connection errors.
fn check_stream(bytes: Vec<u8>) -> Result<(), TestCaseError> {
    let rt = runtime();
    let plain_path = rt.block_on(read_all(bytes.clone(), false));
    let aligned_path = rt.block_on(read_all(bytes, true));
    prop_assert_eq!(plain_path.len(), aligned_path.len());
    for (p, a) in plain_path.iter().zip(&aligned_path) {
        match (p, a) {
            (Ok(p), Ok(a)) => prop_assert_eq!(plain(p), plain(a)),
            (Err(p), Err(a)) => {
                for e in [p, a] {
                    prop_assert!(
                        matches!(e, Error::Frame { .. } | Error::ConnectionLost { .. }),
                        "unexpected error kind: {e}"
                    );
                }
            }
            _ => prop_assert!(false, "readers disagree: plain {p:?}, aligned {a:?}"),
        }
    }
    Ok(())
}

/// A `Blocks` message big enough for the reader's page-aligned path (>= 1 MiB).
fn big_blocks(seed: u8, raw: usize) -> Message {
    let mut blocks: Vec<WireBlock> = (0..raw)
        .map(|i| {
            let fill = seed.wrapping_add(u8::try_from(i % 251).unwrap());
            WireBlock::new(Encoding::Raw, [fill; 32], vec![fill; 65536].into())
        })
        .collect();
    blocks.push(WireBlock::new(
        Encoding::Zstd,
        [1; 32],
        vec![seed; 77].into(),
    ));
    blocks.push(WireBlock::new(Encoding::Zero, [2; 32], bytes::Bytes::new()));
    blocks.push(WireBlock::new(
        Encoding::Raw,
        [3; 32],
        vec![seed; 4097].into(),
    ));
    Message::Blocks {
        stream: 1,
        first_block: 42,
        blocks,
    }
}

proptest! {
    #![proptest_config(config(64))]

    /// Sequences of valid frames, some mutated, some cut short, through both reader paths.
    #[test]
    fn frame_reader_handles_any_stream(
        msgs in proptest::collection::vec(arb_message(), 1..4),
        muts in proptest::collection::vec(arb_mutation(), 0..3),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = Vec::new();
        for m in &msgs {
            m.encode_into(&mut bytes);
        }
        for x in &muts {
            mutate(&mut bytes, x);
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        check_stream(bytes)?;
    }

    #[test]
    fn frame_reader_handles_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        check_stream(bytes)?;
    }
}

proptest! {
    // Each case moves a 1 MiB frame through two readers: fewer cases.
    #![proptest_config(config(16))]

    /// The page-aligned `Blocks` path (a separate parser) with mutated table entries.
    #[test]
    fn aligned_blocks_path_agrees_with_decode(
        seed in any::<u8>(),
        raw in 16usize..18,
        muts in proptest::collection::vec(arb_mutation(), 0..3),
    ) {
        let mut bytes = big_blocks(seed, raw).encode();
        // Mutations land in the header and table (the first ~1 KiB), where the parsing is.
        let head = bytes.len().min(4 + 21 + 37 * (raw + 3));
        let mut front = bytes[..head].to_vec();
        for x in &muts {
            mutate(&mut front, x);
        }
        bytes.splice(..head, front);
        check_stream(bytes)?;
    }
}

/// The frozen hello prefix: another version's hello decodes to its version whatever follows.
#[test]
fn other_version_hello_keeps_its_version() {
    let mut body = vec![0x02];
    body.extend_from_slice(b"FBRP");
    body.extend_from_slice(&7u16.to_be_bytes());
    body.extend_from_slice(b"anything a newer agent adds");
    let m = Message::decode(&body).unwrap();
    assert!(matches!(m, Message::AgentHello { version: 7, .. }), "{m:?}");
}

/// Decoding is total over the error codes: every wire number comes back as itself.
#[test]
fn error_codes_round_trip() {
    for n in 0..=u16::MAX {
        assert_eq!(ErrorCode::from_u16(n).to_u16(), n);
    }
}
