//! `failback-client sync --bwlimit MBIT`: the transfer of an incompressible disk cannot finish
//! faster than its wire bytes at the limit allow. Only that lower bound is asserted (a limiter
//! that does nothing fails it; a slow machine cannot), plus a byte-equal result.

mod common;

use std::time::Instant;

use common::{random_bytes, text, Env, MIB};

#[test]
fn bwlimit_holds_the_transfer_to_the_limit() {
    // 6 MiB of random data: no zero blocks and nothing zstd can shrink, so at least 6 MiB
    // crosses the wire.
    let env = Env::with_data(None, random_bytes(42, 6 * MIB));
    let dst = env.path("dst.img");
    let report = env.path("report.json");
    let limit_mbps: u64 = 8;
    let started = Instant::now();
    let o = env.sync(
        &[("d", &dst)],
        &[
            "--bwlimit",
            &limit_mbps.to_string(),
            "--report",
            report.to_str().unwrap(),
        ],
    );
    let elapsed = started.elapsed();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&format!("limit {limit_mbps} Mbit/s")),
        "{}",
        text(&o)
    );
    assert!(
        std::fs::read(&dst).unwrap() == env.data,
        "target differs from the source"
    );

    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let d = &r["disks"][0];
    assert_eq!(d["digest"], d["agent_digest"]);
    let wire = d["bytes_on_wire"]
        .as_u64()
        .expect("bytes_on_wire in the report");
    assert!(
        wire >= 6 * MIB as u64,
        "only {wire} bytes on the wire for 6 MiB of random data"
    );
    // 8 Mbit/s = 1,000,000 bytes/s: at least ~6.3 s. 80 % of that leaves room for where the
    // limiter starts counting; an unlimited sync of 6 MiB takes well under a second.
    let min_secs = wire as f64 * 8.0 / (limit_mbps as f64 * 1e6) * 0.8;
    assert!(
        elapsed.as_secs_f64() >= min_secs,
        "{wire} bytes at {limit_mbps} Mbit/s took {:.2} s, less than {min_secs:.2} s: the limit is not applied",
        elapsed.as_secs_f64()
    );
}
