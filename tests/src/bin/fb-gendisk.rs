//! `fb-gendisk`: writes realistic, deterministic disk images for `make demo` and `make bench`.
//!
//! Source mode (`fb-gendisk OUT --size 4G --random-pct 60 --text-pct 0 --seed 1`) lays out the
//! image as shuffled runs of incompressible random data, zero runs (4 KiB–64 MiB, log-uniform)
//! and repeated log-like text, in the requested proportions. Stale mode
//! (`fb-gendisk OUT --stale-from SRC --change-pct 1 --block 65536`) copies SRC and rewrites the
//! given percentage of whole blocks with fresh random data, like a disk that drifted.
//! Both modes print one JSON line describing what was written (the stale mode includes the
//! number of changed bytes, which the benchmark compares with the bytes on the wire).
//! The same seed always gives the same bytes.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use rand_xoshiro::rand_core::{RngCore, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

/// Runs are multiples of this (a file-system block), like real disks.
const ALIGN: u64 = 4096;
/// Shortest and longest run of each kind.
const MIN_RUN: u64 = 4 << 10;
const MAX_RUN: u64 = 64 << 20;
/// Write granularity: large sequential writes keep the generator at page-cache speed.
const CHUNK: usize = 8 << 20;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Write deterministic, realistic disk images for demos and benchmarks"
)]
struct Args {
    /// Image file to write (created or overwritten).
    out: PathBuf,
    /// Image size (bytes, or with K/M/G/T suffix, binary units). Source mode only.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Share of the image that is incompressible random data, in percent.
    #[arg(long, default_value_t = 60.0)]
    random_pct: f64,
    /// Share of the image that is repeated (compressible) text, in percent; the rest is zeros.
    #[arg(long, default_value_t = 0.0)]
    text_pct: f64,
    /// PRNG seed: the same seed gives the same image.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Make a stale copy of this image instead of a new source.
    #[arg(long, conflicts_with = "size")]
    stale_from: Option<PathBuf>,
    /// Percentage of blocks to rewrite in the stale copy.
    #[arg(long, default_value_t = 1.0, requires = "stale_from")]
    change_pct: f64,
    /// Block size used to pick rewritten blocks in the stale copy.
    #[arg(long, default_value_t = 65536, value_parser = parse_size)]
    block: u64,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        Some('T') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|e| format!("invalid size {s:?}: {e}"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} overflows"))
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Random,
    Zero,
    Text,
}

/// Log-uniform length in [MIN_RUN, MAX_RUN], aligned to ALIGN: many small runs, a few huge.
fn run_len(rng: &mut Xoshiro256PlusPlus) -> u64 {
    let u = unit(rng);
    let len = (MIN_RUN as f64) * ((MAX_RUN as f64) / (MIN_RUN as f64)).powf(u);
    // Truncation is the intent: the value is in range and rounded down to the alignment.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let len = len as u64;
    (len / ALIGN).max(1) * ALIGN
}

/// Uniform float in [0, 1).
fn unit(rng: &mut Xoshiro256PlusPlus) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let v = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    v
}

/// Uniform integer in [0, n).
fn below(rng: &mut Xoshiro256PlusPlus, n: u64) -> u64 {
    // Lemire's multiply-shift; the tiny bias is irrelevant for test data.
    let wide = u128::from(rng.next_u64()) * u128::from(n);
    u64::try_from(wide >> 64).expect("high half of a u128 product fits u64")
}

fn pct_bytes(size: u64, pct: f64) -> u64 {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let b = (size as f64 * pct / 100.0) as u64;
    b.min(size)
}

/// Runs of each kind that add up to their byte budgets, shuffled into disk order.
fn layout(
    rng: &mut Xoshiro256PlusPlus,
    size: u64,
    random_pct: f64,
    text_pct: f64,
) -> Vec<(Kind, u64)> {
    let random = pct_bytes(size, random_pct);
    let text = pct_bytes(size, text_pct).min(size - random);
    let zero = size - random - text;
    let mut runs = Vec::new();
    for (kind, mut budget) in [
        (Kind::Random, random),
        (Kind::Text, text),
        (Kind::Zero, zero),
    ] {
        while budget > 0 {
            let len = run_len(rng).min(budget);
            runs.push((kind, len));
            budget -= len;
        }
    }
    // Fisher-Yates shuffle.
    for i in (1..runs.len()).rev() {
        let j = usize::try_from(below(rng, (i + 1) as u64)).expect("index fits usize");
        runs.swap(i, j);
    }
    runs
}

/// A few MiB of log-like lines; text runs copy from it at varying offsets (so the same text
/// repeats across the disk, as logs and binaries do, yet runs are not all identical).
fn text_corpus(rng: &mut Xoshiro256PlusPlus) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "GET",
        "POST",
        "/api/v1/orders",
        "/index.html",
        "/healthz",
        "200",
        "304",
        "404",
        "500",
        "nginx",
        "postgres",
        "checkpoint",
        "vacuum",
        "session",
        "opened",
        "closed",
        "for",
        "user",
        "root",
        "www-data",
        "kernel:",
        "EXT4-fs",
        "mounted",
        "filesystem",
        "with",
        "ordered",
        "data",
        "mode",
        "systemd[1]:",
        "Started",
        "Stopped",
        "Daily",
        "apt",
        "upgrade",
        "activities",
    ];
    let mut out = Vec::with_capacity(4 << 20);
    let mut line = 0u64;
    while out.len() < 4 << 20 {
        line += 1;
        let host = below(rng, 8);
        let pid = 1000 + below(rng, 9000);
        let _ = write!(
            out,
            "2026-11-25T{:02}:{:02}:{:02}.{:03}Z host{host} app[{pid}]: ",
            (line / 3600) % 24,
            (line / 60) % 60,
            line % 60,
            below(rng, 1000)
        );
        for _ in 0..(4 + below(rng, 8)) {
            let w = WORDS[usize::try_from(below(rng, WORDS.len() as u64)).expect("fits")];
            out.extend_from_slice(w.as_bytes());
            out.push(b' ');
        }
        let _ = writeln!(out, "in {} ms", below(rng, 500));
    }
    out
}

#[derive(Default)]
struct Counts {
    random: u64,
    zero: u64,
    text: u64,
    zero_runs: u64,
}

fn generate(args: &Args, size: u64) -> Result<Counts> {
    ensure!(
        (0.0..=100.0).contains(&args.random_pct)
            && (0.0..=100.0).contains(&args.text_pct)
            && args.random_pct + args.text_pct <= 100.0,
        "--random-pct + --text-pct must be within 0..=100"
    );
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(args.seed);
    let runs = layout(&mut rng, size, args.random_pct, args.text_pct);
    let corpus = text_corpus(&mut rng);
    let file = File::create(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let mut out = std::io::BufWriter::with_capacity(CHUNK, file);
    let zeros = vec![0u8; CHUNK];
    let mut buf = vec![0u8; CHUNK];
    let mut counts = Counts::default();
    for (kind, len) in runs {
        let mut left = len;
        match kind {
            Kind::Zero => {
                counts.zero += len;
                counts.zero_runs += 1;
            }
            Kind::Random => counts.random += len,
            Kind::Text => counts.text += len,
        }
        // Text runs start anywhere in the corpus and wrap around.
        let mut text_pos =
            usize::try_from(below(&mut rng, corpus.len() as u64)).expect("corpus index fits");
        while left > 0 {
            let n = usize::try_from(left.min(CHUNK as u64)).expect("chunk fits usize");
            let data: &[u8] = match kind {
                Kind::Zero => &zeros[..n],
                Kind::Random => {
                    rng.fill_bytes(&mut buf[..n]);
                    &buf[..n]
                }
                Kind::Text => {
                    let mut filled = 0;
                    while filled < n {
                        let take = (n - filled).min(corpus.len() - text_pos);
                        buf[filled..filled + take]
                            .copy_from_slice(&corpus[text_pos..text_pos + take]);
                        filled += take;
                        text_pos = (text_pos + take) % corpus.len();
                    }
                    &buf[..n]
                }
            };
            out.write_all(data)
                .with_context(|| format!("write {}", args.out.display()))?;
            left -= n as u64;
        }
    }
    out.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all().map(|()| f))
        .with_context(|| format!("flush {}", args.out.display()))?;
    Ok(counts)
}

/// Copies `src` to `out` and rewrites `change_pct` % of its blocks with random data.
/// Returns (changed blocks, changed bytes).
fn make_stale(args: &Args, src: &Path) -> Result<(u64, u64, u64)> {
    ensure!(args.block > 0, "--block must be > 0");
    ensure!(
        (0.0..=100.0).contains(&args.change_pct),
        "--change-pct must be within 0..=100"
    );
    ensure!(
        src != args.out.as_path(),
        "--stale-from {} is the output file",
        src.display()
    );
    // copy_file_range under the hood: an in-kernel copy, no user-space round trip.
    let size = std::fs::copy(src, &args.out)
        .with_context(|| format!("copy {} to {}", src.display(), args.out.display()))?;
    let blocks = size.div_ceil(args.block);
    let want = pct_bytes(blocks, args.change_pct);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(args.seed ^ 0x5eed_57a1_e000_0000);
    // Partial Fisher-Yates over block indices picks `want` distinct blocks.
    let mut idx: Vec<u64> = (0..blocks).collect();
    for i in 0..usize::try_from(want).context("block count fits usize")? {
        let span = blocks - i as u64;
        let j = i + usize::try_from(below(&mut rng, span)).context("index fits usize")?;
        idx.swap(i, j);
    }
    let mut chosen = idx[..usize::try_from(want).context("fits")?].to_vec();
    chosen.sort_unstable();
    let file = OpenOptions::new()
        .write(true)
        .open(&args.out)
        .with_context(|| format!("open {}", args.out.display()))?;
    let mut buf = vec![0u8; usize::try_from(args.block).context("--block fits usize")?];
    let mut changed = 0u64;
    for b in chosen {
        let off = b * args.block;
        let n = usize::try_from(args.block.min(size - off)).context("fits")?;
        rng.fill_bytes(&mut buf[..n]);
        file.write_all_at(&buf[..n], off)
            .with_context(|| format!("write {} at offset {off}", args.out.display()))?;
        changed += n as u64;
    }
    file.sync_all()
        .with_context(|| format!("sync {}", args.out.display()))?;
    Ok((size, want, changed))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let start = Instant::now();
    if let Some(src) = &args.stale_from {
        let (size, blocks, bytes) = make_stale(&args, src)?;
        let report = serde_json::json!({
            "file": args.out.display().to_string(),
            "size": size,
            "block": args.block,
            "changed_blocks": blocks,
            "changed_bytes": bytes,
            "seconds": start.elapsed().as_secs_f64(),
        });
        println!("{report}");
    } else {
        let Some(size) = args.size else {
            bail!("give --size for a new image or --stale-from SRC for a stale copy");
        };
        let c = generate(&args, size)?;
        let report = serde_json::json!({
            "file": args.out.display().to_string(),
            "size": size,
            "random_bytes": c.random,
            "text_bytes": c.text,
            "zero_bytes": c.zero,
            "zero_runs": c.zero_runs,
            "seconds": start.elapsed().as_secs_f64(),
        });
        println!("{report}");
    }
    Ok(())
}
