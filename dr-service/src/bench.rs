//! Load benchmark (`failback-server bench`): a real service (HTTPS, SQLite in a temp dir) and
//! N simulated failback clients, each with its own TLS connection, sending a heartbeat with a
//! progress report once a second. Reports request latency percentiles measured at the client
//! (so they include TLS, HTTP, JSON and the SQLite transaction). Clients and service share this
//! process and its cores, which makes the figure conservative.

use std::fmt;
use std::time::{Duration, Instant};

use failback_api::*;

use crate::http::{start, ServerConfig};
use crate::service::Settings;

#[derive(Debug, serde::Serialize)]
pub struct BenchReport {
    /// `sqlite` or `postgres`.
    pub backend: String,
    pub clients: usize,
    pub seconds: u64,
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
            "dr-service heartbeat ({}): {} clients x 1/s for {} s: {} requests, {} errors, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.backend, self.clients, self.seconds, self.requests, self.errors, self.p50_ms, self.p99_ms, self.max_ms
        )
    }
}

#[derive(Debug, thiserror::Error)]
#[error("bench: {0}")]
pub struct BenchError(String);

fn e(x: impl fmt::Display) -> BenchError {
    BenchError(x.to_string())
}

/// Runs the benchmark: `clients` simulated clients for `secs` seconds after a warm-up, with
/// the state in `database` (see `ServerConfig::database`; `None`: SQLite in a temp dir).
pub async fn run(
    clients: usize,
    secs: u64,
    database: Option<String>,
) -> Result<BenchReport, BenchError> {
    let dir = std::env::temp_dir().join(format!(
        "failback-bench-{}-{}",
        std::process::id(),
        crate::util::random_hex(4)
    ));
    let res = run_in(&dir, clients, secs, database).await;
    let _ = std::fs::remove_dir_all(&dir);
    res
}

async fn run_in(
    dir: &std::path::Path,
    clients: usize,
    secs: u64,
    database: Option<String>,
) -> Result<BenchReport, BenchError> {
    let backend = match &database {
        Some(d) if crate::store::is_postgres(d) => "postgres",
        _ => "sqlite",
    };
    let server = start(ServerConfig {
        data_dir: dir.to_path_buf(),
        database,
        // A throwaway sealing secret (the bench's CA lives as long as its database).
        ca_secret: Some(std::sync::Arc::new(
            crate::sealed::SealKey::parse(&crate::util::random_hex(32), "bench").map_err(e)?,
        )),
        listen: "127.0.0.1:0".parse().map_err(e)?,
        sans: vec![],
        admin_token: Some("bench".into()),
        settings: Settings {
            heartbeat_secs: 1,
            agent_timeout_secs: 3600,
            client_timeout_secs: 3600,
            ..Settings::default()
        },
        // All simulated clients share 127.0.0.1.
        limits: crate::limits::Limits {
            max_connections_per_ip: clients + 64,
            max_connections: (clients + 64).max(crate::limits::Limits::default().max_connections),
            ..Default::default()
        },
    })
    .await
    .map_err(e)?;
    let svc = server.service.clone();
    // Set-up through the service directly (not measured), on 4 blocking threads: one
    // enrolled instance and one paired client per simulated client.
    let secrets = tokio::task::spawn_blocking(move || -> Result<Vec<String>, BenchError> {
        let per = clients.div_ceil(4).max(1);
        std::thread::scope(|sc| {
            let parts: Vec<_> = (0..clients)
                .step_by(per)
                .map(|from| {
                    let svc = &svc;
                    sc.spawn(move || {
                        (from..(from + per).min(clients))
                            .map(|i| set_up_client(svc, i))
                            .collect::<Result<Vec<_>, _>>()
                    })
                })
                .collect();
            let mut all = Vec::with_capacity(clients);
            for p in parts {
                all.extend(p.join().map_err(|_| e("set-up thread panicked"))??);
            }
            Ok(all)
        })
    })
    .await
    .map_err(e)??;
    let ca = reqwest::Certificate::from_pem(server.ca_pem.as_bytes()).map_err(e)?;
    let url = format!("{}{}", server.url(), failback_api::routes::CLIENT_HEARTBEAT);
    let warmup = Duration::from_secs(3);
    let start_at = Instant::now() + Duration::from_millis(500);
    let measure_from = start_at + warmup;
    let end = measure_from + Duration::from_secs(secs);
    let mut tasks = Vec::with_capacity(clients);
    for (i, secret) in secrets.into_iter().enumerate() {
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca.clone())
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(e)?;
        let url = url.clone();
        let n = u64::try_from(clients.max(1)).unwrap_or(1);
        let offset = Duration::from_millis(u64::try_from(i).unwrap_or(0) * 1000 / n);
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<f64> = Vec::new();
            let mut errors = 0u64;
            let mut round = 1u64;
            let mut next = start_at + offset;
            loop {
                tokio::time::sleep_until(next.into()).await;
                if Instant::now() >= end {
                    break;
                }
                let report = ClientReport {
                    phase: ClientPhase::Idle,
                    round,
                    disks: vec![DiskProgress {
                        remote_id: "disk0".into(),
                        local_path: "/dev/sda".into(),
                        total_bytes: 8 << 30,
                        replicated_bytes: 8 << 30,
                        rescanned_bytes: 8 << 30,
                        backlog_bytes: 0,
                        ..Default::default()
                    }],
                    last_round_differing_bytes: Some(0),
                    last_round_secs: Some(1.0),
                    last_consistent_at: Some(crate::util::now_secs()),
                    digests: vec![],
                    error: None,
                };
                let t = Instant::now();
                let ok = match http
                    .post(&url)
                    .bearer_auth(&secret)
                    .json(&report)
                    .send()
                    .await
                {
                    Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                if t >= measure_from {
                    if ok {
                        lat.push(ms);
                    } else {
                        errors += 1;
                    }
                }
                round += 1;
                next += Duration::from_secs(1);
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, er) = t.await.map_err(e)?;
        all.extend(l);
        errors += er;
    }
    server.shutdown().await;
    all.sort_by(f64::total_cmp);
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return f64::NAN;
        }
        // Index arithmetic on a sorted sample; truncation is the intended floor.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = ((all.len() as f64 - 1.0) * p).round() as usize;
        all[i.min(all.len() - 1)]
    };
    Ok(BenchReport {
        backend: backend.into(),
        clients,
        seconds: secs,
        requests: u64::try_from(all.len()).unwrap_or(u64::MAX),
        errors,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: all.last().copied().unwrap_or(f64::NAN),
    })
}

/// Enrolls the `i`-th simulated instance's agent and pairs its client; returns the client
/// secret.
fn set_up_client(svc: &crate::service::Service, i: usize) -> Result<String, BenchError> {
    let at = svc
        .create_token(
            crate::service::BOOTSTRAP_ADMIN,
            CreateTokenRequest {
                kind: TokenKind::Agent,
                recovery_instance_id: None,
                ttl_secs: None,
            },
        )
        .map_err(e)?;
    let en = svc
        .enroll_agent(AgentEnrollRequest {
            token: at.token,
            address: format!("127.0.0.1:{}", 20000 + i % 40000),
            private_address: None,
            disks: vec![AgentDisk {
                id: "disk0".into(),
                size_bytes: 8 << 30,
                logical_sector_size: 512,
                device: None,
            }],
            hostname: None,
            source_hints: None,
            cert_sans: vec![],
        })
        .map_err(e)?;
    let pt = svc
        .create_token(
            crate::service::BOOTSTRAP_ADMIN,
            CreateTokenRequest {
                kind: TokenKind::Pairing,
                recovery_instance_id: Some(en.recovery_instance_id),
                ttl_secs: None,
            },
        )
        .map_err(e)?;
    let p = svc
        .pair(PairRequest {
            token: pt.token,
            inventory: Inventory {
                disks: vec![InventoryDisk {
                    path: "/dev/sda".into(),
                    size_bytes: 8 << 30,
                    logical_sector_size: 512,
                    ..Default::default()
                }],
                ..Default::default()
            },
            recovery_instance_id: None,
            device_mapping: None,
            client_version: None,
        })
        .map_err(e)?;
    Ok(p.client_secret)
}
