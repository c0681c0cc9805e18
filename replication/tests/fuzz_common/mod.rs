//! Shared pieces of the wire and protocol fuzz tests: case counts, message generators and
//! byte mutations.
#![allow(dead_code)]

use failback_replication::wire::{
    DiskInfo, Encoding, ErrorCode, Hash, Message, WireBlock, CONNECTION_STREAM, PROTOCOL_VERSION,
};
use proptest::prelude::*;

/// A position in a buffer of any length, as a fraction of it (`Pos(u64::MAX / 2)`: the middle).
/// Like proptest's `Index`, but constructible, so regression tests can replay a finding.
#[derive(Debug, Clone, Copy)]
pub struct Pos(pub u64);

impl Pos {
    /// The position in `0..len` (`len` > 0).
    pub fn index(self, len: usize) -> usize {
        let len64 = u64::try_from(len).unwrap_or(u64::MAX);
        let at = (u128::from(self.0) * u128::from(len64)) >> 64;
        usize::try_from(at).unwrap_or(0)
    }
}

/// Environment variable that sets the number of cases of every fuzz test (a longer run than
/// the bounded one in `cargo test`): `FAILBACK_FUZZ_CASES=100000`.
pub const CASES_ENV: &str = "FAILBACK_FUZZ_CASES";

/// Proptest settings: `default` cases unless [`CASES_ENV`] says otherwise; no regression files
/// written into the source tree (a failure prints its minimal input; findings become named
/// regression tests).
pub fn config(default: u32) -> ProptestConfig {
    ProptestConfig {
        cases: cases(default),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The case count: [`CASES_ENV`] if set, else `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var(CASES_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Every message tag of protocol v2, and a few that are not.
pub const TAGS: &[u8] = &[
    0x01, 0x02, 0x03, 0x10, 0x11, 0x12, 0x13, 0x20, 0x21, 0x22, 0x30, 0x31, 0x32, 0x7f, 0x00, 0xff,
];

/// Short strings, ASCII or not (the encoder cuts at 65535 bytes; these stay below).
pub fn arb_string() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z0-9_.-]{0,12}", ".{0,24}", Just(String::new()),]
}

/// Numbers that hit edges more often than uniform ones would.
pub fn edgy_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        3 => any::<u32>(),
        1 => prop::sample::select(vec![0, 1, 2, 255, 4096, 65536, 1 << 24, i32::MAX as u32, CONNECTION_STREAM - 1, CONNECTION_STREAM]),
        2 => 0u32..16,
    ]
}

pub fn edgy_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => any::<u64>(),
        1 => prop::sample::select(vec![0, 1, u64::from(u32::MAX), 1 << 40, i64::MAX as u64, u64::MAX - 1, u64::MAX]),
        2 => 0u64..64,
    ]
}

pub fn arb_hash() -> impl Strategy<Value = Hash> {
    prop_oneof![any::<[u8; 32]>(), Just([0u8; 32])]
}

pub fn arb_disk() -> impl Strategy<Value = DiskInfo> {
    (
        arb_string(),
        edgy_u64(),
        edgy_u32(),
        arb_string(),
        proptest::option::of(arb_string()),
    )
        .prop_map(|(id, size, logical_sector_size, device, serial)| DiskInfo {
            id,
            size,
            logical_sector_size,
            device,
            serial,
        })
}

pub fn arb_block() -> impl Strategy<Value = WireBlock> {
    prop_oneof![
        arb_hash().prop_map(|h| WireBlock::new(Encoding::Zero, h, bytes::Bytes::new())),
        (arb_hash(), proptest::collection::vec(any::<u8>(), 0..300))
            .prop_map(|(h, p)| WireBlock::new(Encoding::Raw, h, p.into())),
        (arb_hash(), proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(h, p)| WireBlock::new(Encoding::Zstd, h, p.into())),
    ]
}

pub fn arb_code() -> impl Strategy<Value = ErrorCode> {
    any::<u16>().prop_map(ErrorCode::from_u16)
}

/// Any message of protocol v2 (hellos carry the current version, so they round-trip whole).
pub fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        any::<u16>().prop_map(|version| Message::ClientHello { version }),
        (arb_string(), proptest::option::of(arb_string())).prop_map(|(software, instance)| {
            Message::AgentHello {
                version: PROTOCOL_VERSION,
                software,
                instance,
            }
        }),
        proptest::collection::vec(arb_disk(), 0..6).prop_map(|disks| Message::Manifest { disks }),
        (edgy_u32(), arb_string(), edgy_u32(), any::<bool>()).prop_map(
            |(stream, disk, block_size, estimate)| Message::SyncStart {
                stream,
                disk,
                block_size,
                estimate,
                changes_since: None,
                compression: Default::default(),
            }
        ),
        (
            edgy_u32(),
            edgy_u64(),
            proptest::collection::vec(arb_hash(), 0..40)
        )
            .prop_map(|(stream, first_block, hashes)| Message::Hashes {
                stream,
                first_block,
                hashes,
            }),
        (edgy_u32(), edgy_u64(), edgy_u32()).prop_map(|(stream, first_block, count)| {
            Message::Refetch {
                stream,
                first_block,
                count,
            }
        }),
        edgy_u32().prop_map(|stream| Message::SyncEnd { stream }),
        (
            edgy_u32(),
            edgy_u64(),
            proptest::collection::vec(arb_block(), 0..6)
        )
            .prop_map(|(stream, first_block, blocks)| Message::Blocks {
                stream,
                first_block,
                blocks,
            }),
        (edgy_u32(), edgy_u64(), edgy_u32(), edgy_u32(), edgy_u64()).prop_map(
            |(stream, first_block, count, differing, differing_bytes)| Message::WindowDone {
                stream,
                first_block,
                count,
                differing,
                differing_bytes,
            }
        ),
        (edgy_u32(), edgy_u64(), arb_hash()).prop_map(|(stream, blocks, digest)| {
            Message::SyncDone {
                stream,
                blocks,
                digest,
            }
        }),
        Just(Message::Quiesce),
        Just(Message::Thaw),
        arb_string().prop_map(|message| Message::CommandDone { message }),
        (edgy_u32(), arb_code(), arb_string()).prop_map(|(stream, code, message)| {
            Message::Error {
                stream,
                code,
                message,
            }
        }),
    ]
}

/// One edit of an encoded frame.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Flip one bit.
    Flip(Pos, u8),
    /// Overwrite one byte.
    Set(Pos, u8),
    /// Cut the bytes from here on.
    Truncate(Pos),
    /// Insert bytes here.
    Insert(Pos, Vec<u8>),
    /// Remove up to this many bytes here.
    Remove(Pos, u8),
    /// Overwrite 4 bytes with a big-endian number (hits lengths and counts).
    Word(Pos, u32),
    /// Overwrite 8 bytes with a big-endian number (hits block indexes and sizes).
    Long(Pos, u64),
}

pub fn arb_mutation() -> impl Strategy<Value = Mutation> {
    let idx = || any::<u64>().prop_map(Pos);
    prop_oneof![
        (idx(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (idx(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        idx().prop_map(Mutation::Truncate),
        (idx(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        (idx(), 1u8..16).prop_map(|(i, n)| Mutation::Remove(i, n)),
        (idx(), edgy_u32()).prop_map(|(i, v)| Mutation::Word(i, v)),
        (idx(), edgy_u64()).prop_map(|(i, v)| Mutation::Long(i, v)),
    ]
}

/// Applies `m` to `buf` (positions are taken modulo the buffer's length).
pub fn mutate(buf: &mut Vec<u8>, m: &Mutation) {
    let at = |i: &Pos, room: usize| {
        if buf.len() < room || buf.is_empty() {
            None
        } else {
            Some(i.index(buf.len() - room + 1))
        }
    };
    match m {
        Mutation::Flip(i, bit) => {
            if let Some(p) = at(i, 1) {
                buf[p] ^= 1 << bit;
            }
        }
        Mutation::Set(i, b) => {
            if let Some(p) = at(i, 1) {
                buf[p] = *b;
            }
        }
        Mutation::Truncate(i) => {
            let p = i.index(buf.len() + 1);
            buf.truncate(p);
        }
        Mutation::Insert(i, bytes) => {
            let p = i.index(buf.len() + 1);
            buf.splice(p..p, bytes.iter().copied());
        }
        Mutation::Remove(i, n) => {
            if let Some(p) = at(i, 1) {
                let end = (p + usize::from(*n)).min(buf.len());
                buf.drain(p..end);
            }
        }
        Mutation::Word(i, v) => {
            if let Some(p) = at(i, 4) {
                buf[p..p + 4].copy_from_slice(&v.to_be_bytes());
            }
        }
        Mutation::Long(i, v) => {
            if let Some(p) = at(i, 8) {
                buf[p..p + 8].copy_from_slice(&v.to_be_bytes());
            }
        }
    }
}
