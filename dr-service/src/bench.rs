//! Load benchmark (`failback-server bench`): a real service (HTTPS, SQLite in a temp dir) and
//! N simulated failback clients, each with its own TLS connection, sending a heartbeat with a
//! progress report every `interval` seconds (a real client beats at the interval the service
//! hands it, 10 s by default; 1 s is the stress setting). Reports request latency percentiles measured at the client
//! (so they include TLS, HTTP, JSON and the SQLite transaction). Clients and service share this
//! process and its cores, which makes the figure conservative.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use failback_api::*;

use crate::http::{start, ServerConfig};
use crate::service::Settings;

#[derive(Debug, serde::Serialize)]
pub struct BenchReport {
    /// `sqlite` or `postgres`.
    pub backend: String,
    pub clients: usize,
    /// Seconds between two heartbeats of one client.
    pub interval_secs: u64,
    pub seconds: u64,
    /// Heartbeats per second offered to the service (`clients / interval_secs`).
    pub offered_per_sec: f64,
    pub requests: u64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The worst one-second window (by when the requests were sent): its p99 and when it began
    /// (Unix seconds), so that a spike can be matched to what the service did at that moment.
    pub worst_second_p99_ms: f64,
    pub worst_second_at: u64,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "dr-service heartbeat ({}): {} clients x 1/{} s ({:.0} heartbeats/s) for {} s: {} requests, {} errors, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, worst second p99 {:.1} ms (at {})",
            self.backend, self.clients, self.interval_secs, self.offered_per_sec, self.seconds, self.requests, self.errors, self.p50_ms, self.p99_ms, self.max_ms, self.worst_second_p99_ms, self.worst_second_at
        )
    }
}

#[derive(Debug, thiserror::Error)]
#[error("bench: {0}")]
pub struct BenchError(String);

fn e(x: impl fmt::Display) -> BenchError {
    BenchError(x.to_string())
}

/// What to run: `clients` simulated clients, one heartbeat each every `interval_secs`, measured
/// for `secs` seconds after a warm-up: every client's first request (which opens its TLS
/// connection), then one more interval (at least 3 s), are not measured.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub clients: usize,
    pub interval_secs: u64,
    pub secs: u64,
}

/// Runs the benchmark with the state in `database` (see `ServerConfig::database`; `None`:
/// SQLite in a temp dir).
pub async fn run(load: Load, database: Option<String>) -> Result<BenchReport, BenchError> {
    if load.interval_secs == 0 || load.clients == 0 {
        return Err(e("--clients and --interval must be at least 1"));
    }
    let dir = std::env::temp_dir().join(format!(
        "failback-bench-{}-{}",
        std::process::id(),
        crate::util::random_hex(4)
    ));
    // On PostgreSQL: a schema of its own, dropped afterwards, so that every run starts empty
    // (a second run would otherwise meet the first one's CA, sealed with another secret) and
    // no bench data stays in the user's database.
    let scratch = match database.as_deref() {
        Some(d) if crate::store::is_postgres(d) => Some(scratch_schema(d.to_string()).await?),
        _ => None,
    };
    let database = scratch.as_ref().map(|s| s.url.clone()).or(database);
    let res = run_in(&dir, load, database).await;
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(s) = scratch {
        let name = s.name.clone();
        let why = match tokio::task::spawn_blocking(move || s.remove()).await {
            Ok(Ok(())) => None,
            Ok(Err(err)) => Some(err.to_string()),
            Err(err) => Some(err.to_string()),
        };
        if let Some(why) = why {
            tracing::warn!("bench: schema {name} not removed (DROP SCHEMA {name} CASCADE): {why}");
        }
    }
    res
}

/// Creates the bench's throwaway schema (`failback_bench_<pid>_<random>`) on `url`.
async fn scratch_schema(url: String) -> Result<crate::store::ScratchSchema, BenchError> {
    let name = format!(
        "failback_bench_{}_{}",
        std::process::id(),
        crate::util::random_hex(4)
    );
    tokio::task::spawn_blocking(move || crate::store::ScratchSchema::create(&url, &name))
        .await
        .map_err(e)?
        .map_err(e)
}

async fn run_in(
    dir: &std::path::Path,
    load: Load,
    database: Option<String>,
) -> Result<BenchReport, BenchError> {
    let Load {
        clients,
        interval_secs,
        secs,
    } = load;
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
            heartbeat_secs: interval_secs,
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
    // The clients run in a child process (`failback-server bench-load`): both ends of 10,000
    // connections do not fit one process's open-file limit, and the service's process then
    // holds only its own work.
    let ca_file = dir.join("bench-ca.pem");
    let secrets_file = dir.join("bench-secrets");
    write_private(&ca_file, server.ca_pem.as_bytes())?;
    write_private(&secrets_file, secrets.join("\n").as_bytes())?;
    let url = format!("{}{}", server.url(), failback_api::routes::CLIENT_HEARTBEAT);
    let spec = LoadSpec {
        url,
        ca_file,
        secrets_file,
        interval_secs,
        secs,
    };
    let res = run_child(&spec).await;
    server.shutdown().await;
    let LoadResult {
        latencies_ms: mut all,
        sent_at_ms,
        errors,
    } = res?;
    let (worst_second_p99_ms, worst_second_at) = worst_second(&sent_at_ms, &all);
    all.sort_by(f64::total_cmp);
    let pct = |p: f64| percentile(&all, p);
    Ok(BenchReport {
        backend: backend.into(),
        clients,
        interval_secs,
        seconds: secs,
        #[allow(clippy::cast_precision_loss)] // a client count, far below 2^52
        offered_per_sec: clients as f64 / interval_secs as f64,
        requests: u64::try_from(all.len()).unwrap_or(u64::MAX),
        errors,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: all.last().copied().unwrap_or(f64::NAN),
        worst_second_p99_ms,
        worst_second_at,
    })
}

/// The `p` quantile of a sorted sample (NaN when empty).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Index arithmetic on a sorted sample; truncation is the intended floor.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The one-second window (by send time, Unix ms) with the highest p99: (p99, its Unix second).
fn worst_second(sent_at_ms: &[u64], latencies_ms: &[f64]) -> (f64, u64) {
    let mut by_sec: std::collections::BTreeMap<u64, Vec<f64>> = Default::default();
    for (t, l) in sent_at_ms.iter().zip(latencies_ms) {
        by_sec.entry(t / 1000).or_default().push(*l);
    }
    by_sec
        .into_iter()
        .map(|(sec, mut v)| {
            v.sort_by(f64::total_cmp);
            let p99 = percentile(&v, 0.99);
            tracing::debug!("second {sec}: {} requests, p99 {p99:.1} ms", v.len());
            (p99, sec)
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .unwrap_or((f64::NAN, 0))
}

/// What the client process runs (hidden subcommand `bench-load`).
#[derive(Debug, Clone, clap::Args)]
pub struct LoadSpec {
    /// Heartbeat URL of the service under test.
    #[arg(long)]
    pub url: String,
    /// The service CA (PEM).
    #[arg(long)]
    pub ca_file: std::path::PathBuf,
    /// One client secret per line, one simulated client each.
    #[arg(long)]
    pub secrets_file: std::path::PathBuf,
    #[arg(long)]
    pub interval_secs: u64,
    #[arg(long)]
    pub secs: u64,
}

/// What the client process prints (JSON on stdout).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadResult {
    /// Latency of every measured successful heartbeat.
    pub latencies_ms: Vec<f64>,
    /// When each of them was sent (Unix ms), index for index.
    pub sent_at_ms: Vec<u64>,
    /// Measured heartbeats that failed (transport error or non-2xx).
    pub errors: u64,
}

fn write_private(path: &std::path::Path, data: &[u8]) -> Result<(), BenchError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(data))
        .map_err(|er| e(format!("{}: {er}", path.display())))
}

async fn run_child(spec: &LoadSpec) -> Result<LoadResult, BenchError> {
    let exe = std::env::current_exe().map_err(e)?;
    let out = tokio::process::Command::new(&exe)
        .arg("bench-load")
        .arg("--url")
        .arg(&spec.url)
        .arg("--ca-file")
        .arg(&spec.ca_file)
        .arg("--secrets-file")
        .arg(&spec.secrets_file)
        .arg("--interval-secs")
        .arg(spec.interval_secs.to_string())
        .arg("--secs")
        .arg(spec.secs.to_string())
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|er| e(format!("{}: {er}", exe.display())))?;
    if !out.status.success() {
        return Err(e(format!(
            "client process {}: {}",
            exe.display(),
            out.status
        )));
    }
    serde_json::from_slice(&out.stdout).map_err(|er| e(format!("client process output: {er}")))
}

/// The client side: one TLS connection and one heartbeat every `interval_secs` per secret,
/// spread evenly over the interval. Nothing is measured until every client has made its first
/// request (which opens its TLS connection) and then one more interval (at least 3 s) has
/// passed: 10,000 handshakes can outlast the first interval on two cores, and their backlog
/// is the bench's own start-up, not the service's steady state.
pub async fn load(spec: LoadSpec) -> Result<LoadResult, BenchError> {
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).map_err(|er| e(format!("{}: {er}", p.display())))
    };
    let secrets: Vec<String> = read(&spec.secrets_file)?
        .lines()
        .map(str::to_owned)
        .collect();
    open_files_for(secrets.len())?;
    let ca = reqwest::Certificate::from_pem(read(&spec.ca_file)?.as_bytes()).map_err(e)?;
    let interval = Duration::from_secs(spec.interval_secs.max(1));
    let start_at = Instant::now() + Duration::from_millis(500);
    let window = std::sync::Arc::new(Window {
        clients: secrets.len(),
        connected: Default::default(),
        ready: Default::default(),
        warm: Duration::from_secs(3).max(interval),
        secs: Duration::from_secs(spec.secs),
        connect_by: start_at + CONNECT_WITHIN + interval,
    });
    let n = u64::try_from(secrets.len().max(1)).unwrap_or(1);
    let mut tasks = Vec::with_capacity(secrets.len());
    for (i, secret) in secrets.into_iter().enumerate() {
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca.clone())
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(e)?;
        let offset = Duration::from_millis(
            u64::try_from(i).unwrap_or(0) * 1000 * spec.interval_secs.max(1) / n,
        );
        let beat = Beat {
            http,
            url: spec.url.clone(),
            secret,
        };
        tasks.push(tokio::spawn(beat.run(
            start_at + offset,
            interval,
            window.clone(),
        )));
    }
    let mut all = LoadResult::default();
    for t in tasks {
        let (l, er) = t.await.map_err(e)?;
        for (at, ms) in l {
            all.sent_at_ms.push(at);
            all.latencies_ms.push(ms);
        }
        all.errors += er;
    }
    if window.ready.get().is_none() {
        return Err(e(format!(
            "only {} of {} clients made their first request within {} s",
            window.connected.load(Ordering::Relaxed),
            window.clients,
            (CONNECT_WITHIN + interval).as_secs()
        )));
    }
    Ok(all)
}

/// How long the clients may take to open their connections before the bench gives up.
const CONNECT_WITHIN: Duration = Duration::from_secs(120);

/// The measured window, shared by all simulated clients: it opens `warm` after the last
/// client's first request and lasts `secs`.
struct Window {
    clients: usize,
    connected: AtomicUsize,
    ready: std::sync::OnceLock<Instant>,
    warm: Duration,
    secs: Duration,
    connect_by: Instant,
}

impl Window {
    fn connected_one(&self) {
        if self.connected.fetch_add(1, Ordering::Relaxed) + 1 == self.clients {
            let _ = self.ready.set(Instant::now());
        }
    }
    fn measure_from(&self) -> Option<Instant> {
        self.ready.get().map(|r| *r + self.warm)
    }
    /// Whether a client should stop: the window closed, or the clients never all connected.
    fn over(&self, now: Instant) -> bool {
        match self.measure_from() {
            Some(m) => now >= m + self.secs,
            None => now >= self.connect_by,
        }
    }
}

/// One simulated client.
struct Beat {
    http: reqwest::Client,
    url: String,
    secret: String,
}

impl Beat {
    async fn run(
        self,
        mut next: Instant,
        interval: Duration,
        window: std::sync::Arc<Window>,
    ) -> (Vec<(u64, f64)>, u64) {
        let mut lat = Vec::new();
        let mut errors = 0u64;
        let mut round = 1u64;
        loop {
            tokio::time::sleep_until(next.into()).await;
            let t = Instant::now();
            if window.over(t) {
                break;
            }
            let sent_at = unix_ms();
            let ok = self.once(round).await;
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            if round == 1 {
                window.connected_one();
            } else if window.measure_from().is_some_and(|m| t >= m) {
                if ok {
                    lat.push((sent_at, ms));
                } else {
                    errors += 1;
                }
            }
            round += 1;
            // A client that fell behind (a slow first request) keeps its slot in the interval
            // instead of firing the missed beats at once, as a real client's timer does.
            next += interval;
            while next <= Instant::now() {
                next += interval;
            }
        }
        (lat, errors)
    }

    async fn once(&self, round: u64) -> bool {
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
        match self
            .http
            .post(&self.url)
            .bearer_auth(&self.secret)
            .json(&report)
            .send()
            .await
        {
            Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
            Err(_) => false,
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Makes sure the client process may open one connection per client, so that the figure is not
/// an artefact of `EMFILE` back-off.
fn open_files_for(clients: usize) -> Result<(), BenchError> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let need = u64::try_from(clients)
        .unwrap_or(u64::MAX)
        .saturating_add(1024);
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(e)?;
    if soft >= need {
        return Ok(());
    }
    setrlimit(Resource::RLIMIT_NOFILE, need, need.max(hard)).map_err(|er| {
        e(format!(
            "{clients} clients need {need} open files \
             the limit is {soft} (hard {hard}) and raising it failed: {er}"
        ))
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
