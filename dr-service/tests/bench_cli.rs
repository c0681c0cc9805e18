//! `failback-server bench` end to end (SQLite): the service in this process, the simulated
//! clients in the `bench-load` child process, the JSON report adding up; on PostgreSQL, twice
//! on one database (each run in a throwaway schema).

use std::process::Command;

#[test]
fn bench_runs_its_clients_in_a_child_and_counts_every_heartbeat() {
    let out = Command::new(env!("CARGO_BIN_EXE_failback-server"))
        .args([
            "bench",
            "--clients",
            "20",
            "--interval",
            "1",
            "--secs",
            "3",
            "--json",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run failback-server bench");
    assert!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(r["backend"], "sqlite");
    assert_eq!(r["clients"], 20);
    assert_eq!(r["interval_secs"], 1);
    assert_eq!(r["errors"], 0);
    // 20 clients x 1/s x 3 s measured: 60 heartbeats, give or take one per client at the edges.
    let n = r["requests"].as_u64().expect("requests");
    assert!((40..=80).contains(&n), "requests {n}");
    let (p50, p99) = (r["p50_ms"].as_f64().unwrap(), r["p99_ms"].as_f64().unwrap());
    assert!(p50 > 0.0 && p50 <= p99, "p50 {p50} p99 {p99}");
    // The worst second's p99 is one of the seconds measured: at least the median, at most the
    // maximum, sent within the run.
    let worst = r["worst_second_p99_ms"]
        .as_f64()
        .expect("worst_second_p99_ms");
    let max = r["max_ms"].as_f64().unwrap();
    assert!(
        p50 <= worst && worst <= max,
        "worst second p99 {worst}, p50 {p50}, max {max}"
    );
    let at = r["worst_second_at"].as_u64().expect("worst_second_at");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        at <= now && at + 300 > now,
        "worst second at {at}, now {now}"
    );
}

#[test]
fn bench_refuses_zero_clients_or_interval() {
    for args in [["--clients", "0"], ["--interval", "0"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_failback-server"))
            .arg("bench")
            .args(args)
            .output()
            .expect("run failback-server bench");
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("must be at least 1"), "{args:?}: {err}");
    }
}

/// `failback-server bench` twice on one PostgreSQL database: each run works in a throwaway
/// schema (its own sealed CA), so the second run does not meet the first one's CA (sealed with
/// another random secret); nothing stays in the database afterwards.
#[test]
fn bench_runs_twice_on_one_postgres_database() {
    let url = failback_tests::pg::PgCluster::fresh_database("bench_twice");
    for run in 1..=2 {
        let out = Command::new(env!("CARGO_BIN_EXE_failback-server"))
            .args(["bench", "--clients", "4", "--interval", "1", "--secs", "1"])
            .args(["--json", "--database", &url])
            .env("RUST_LOG", "warn")
            .output()
            .expect("run failback-server bench");
        assert!(
            out.status.success(),
            "bench run {run} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
        assert_eq!(
            (r["backend"].as_str(), r["errors"].as_u64()),
            (Some("postgres"), Some(0)),
            "run {run}: {r}"
        );
        assert!(r["requests"].as_u64() > Some(0), "run {run}: {r}");
    }
    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let left: Vec<String> = c
        .query(
            "SELECT table_schema || '.' || table_name FROM information_schema.tables \
             WHERE table_schema NOT IN ('pg_catalog', 'information_schema')",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(left.is_empty(), "left in the database: {left:?}");
}
