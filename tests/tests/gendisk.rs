//! `fb-gendisk` (the demo/bench image generator): same seed gives the same bytes, the layout
//! follows the requested shares, and a stale copy differs in exactly the blocks it reports.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_fb-gendisk");

fn run(args: &[&str]) -> serde_json::Value {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("run fb-gendisk");
    assert!(
        out.status.success(),
        "fb-gendisk {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("fb-gendisk prints one JSON object")
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

#[test]
fn source_is_deterministic_and_shaped() {
    let dir = std::env::temp_dir().join(format!("fb-gendisk-src-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b, c) = (dir.join("a.img"), dir.join("b.img"), dir.join("c.img"));
    let size = 24 << 20;
    let args = |out| {
        vec![
            p(out),
            "--size",
            "24M",
            "--random-pct",
            "50",
            "--text-pct",
            "20",
        ]
    };
    let ra = run(&[args(&a), vec!["--seed", "7"]].concat());
    run(&[args(&b), vec!["--seed", "7"]].concat());
    run(&[args(&c), vec!["--seed", "8"]].concat());
    let (da, db, dc) = (
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        std::fs::read(&c).unwrap(),
    );
    assert_eq!(da.len(), size);
    assert!(da == db, "same seed must give the same image");
    assert!(da != dc, "another seed must give another image");

    // Reported shares add up and match the request (to the byte, as budgets).
    let n = |k: &str| ra[k].as_u64().unwrap();
    assert_eq!(
        n("random_bytes") + n("text_bytes") + n("zero_bytes"),
        size as u64
    );
    assert_eq!(n("random_bytes"), size as u64 / 2);
    // Zero bytes on disk are at least the zero runs (random data is almost never zero).
    let zeros = da.iter().filter(|&&x| x == 0).count() as u64;
    assert!(
        zeros >= n("zero_bytes"),
        "{zeros} zero bytes < {}",
        n("zero_bytes")
    );
    assert!(zeros < n("zero_bytes") + (1 << 20));
    // The text is printable log lines.
    assert!(da.windows(12).any(|w| w == b"2026-11-25T0"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn stale_copy_changes_exactly_the_reported_blocks() {
    let dir = std::env::temp_dir().join(format!("fb-gendisk-stale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (src, stale) = (dir.join("src.img"), dir.join("stale.img"));
    // Odd size: the last block is short.
    run(&[
        p(&src),
        "--size",
        "16781312",
        "--random-pct",
        "60",
        "--seed",
        "3",
    ]);
    let r = run(&[
        p(&stale),
        "--stale-from",
        p(&src),
        "--change-pct",
        "10",
        "--block",
        "65536",
        "--seed",
        "4",
    ]);
    let (a, b) = (std::fs::read(&src).unwrap(), std::fs::read(&stale).unwrap());
    assert_eq!(a.len(), b.len());
    let blocks = a.len().div_ceil(65536);
    let differing: Vec<usize> = (0..blocks)
        .filter(|&i| {
            let r = i * 65536..((i + 1) * 65536).min(a.len());
            a[r.clone()] != b[r]
        })
        .collect();
    assert_eq!(
        r["changed_blocks"].as_u64().unwrap(),
        differing.len() as u64
    );
    assert_eq!(differing.len(), blocks / 10, "10 % of {blocks} blocks");
    let bytes: u64 = differing
        .iter()
        .map(|&i| (((i + 1) * 65536).min(a.len()) - i * 65536) as u64)
        .sum();
    assert_eq!(r["changed_bytes"].as_u64().unwrap(), bytes);
    std::fs::remove_dir_all(&dir).unwrap();
}
