//! Load benchmark: many simulated clients heartbeating against a real service.

use std::fmt;

#[derive(Debug, serde::Serialize)]
pub struct BenchReport {
    pub clients: usize,
    pub requests: u64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "dr-service heartbeat: {} clients, {} requests, {} errors, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.clients, self.requests, self.errors, self.p50_ms, self.p99_ms, self.max_ms
        )
    }
}

pub async fn run(_clients: usize, _secs: u64) -> anyhow::Result<BenchReport> {
    anyhow::bail!("not implemented yet")
}
