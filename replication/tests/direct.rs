//! The writer's O_DIRECT path on a real filesystem (the workspace's target directory): long
//! verified runs go direct, short runs and an odd-sized tail buffered, the first MiB last;
//! the result is byte-equal either way.

use failback_replication::block::{self, encode_block, hash_block, ZeroHashes};
use failback_replication::wire::WireBlock;
use failback_replication::writer::{Target, HEAD_BYTES};

fn wire(data: &[u8], bs: usize, zeros: &ZeroHashes) -> Vec<WireBlock> {
    data.chunks(bs)
        .map(|b| {
            let (h, z) = hash_block(b, zeros);
            encode_block(b, h, z)
        })
        .collect()
}

#[test]
fn direct_and_buffered_runs_land_byte_equal() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    const BS: u32 = 64 * 1024;
    let bs = BS as usize;
    // 6 MiB + an odd tail; random data with a zero stretch.
    let size = 6 * 1024 * 1024 + 12345;
    let mut src = failback_tests::random_bytes(7, size);
    src[3 * 1024 * 1024..3 * 1024 * 1024 + 256 * 1024].fill(0);
    let zeros = ZeroHashes::new(size as u64, BS);
    let path = dir.path().join("target.img");
    let target = Target::open(&path, size as u64, true).unwrap();
    let mut w = target.writer().unwrap();
    assert!(
        w.is_direct(),
        "the target directory's filesystem takes O_DIRECT (ext4 here and in CI)"
    );
    // Whole image in 2 MiB runs (direct), except one short run (buffered) in the middle.
    let mut at = 0usize;
    let runs = [
        2 << 20,
        2 << 20,
        64 << 10,
        (2 << 20) - (64 << 10),
        size - (6 << 20),
    ];
    for len in runs {
        let first = (at / bs) as u64;
        let blocks = wire(&src[at..at + len], bs, &zeros);
        let (verified, bad) =
            block::verify_run(first, blocks, size as u64, BS, &zeros, w.is_direct());
        assert!(bad.is_empty());
        for r in verified {
            w.write(r).unwrap();
        }
        at += len;
    }
    assert_eq!(at, size);
    assert!(
        w.is_direct(),
        "an O_DIRECT write was refused (writer fell back to buffered)"
    );
    // Before finish: everything but the held-back first MiB is on disk.
    let head = usize::try_from(HEAD_BYTES).unwrap();
    let before = std::fs::read(&path).unwrap();
    assert!(before[..head].iter().all(|&b| b == 0), "head written early");
    assert!(before[head..] == src[head..]);
    let written = w.finish().unwrap();
    assert_eq!(written, size as u64);
    assert!(
        std::fs::read(&path).unwrap() == src,
        "target differs from source"
    );
}
