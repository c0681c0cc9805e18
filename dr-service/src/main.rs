//! `failback-server`: the DR service. Thin: parse arguments, set up logging, call the
//! library, map errors to exit codes (0 ok, 1 internal, 2 usage/config, 4 network).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use failback_server::{bench, Limits, ServerConfig, Settings};

#[derive(Parser, Debug)]
#[command(name = "failback-server", version, about = "The failback DR service")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the HTTPS API (state, CA and admin token in --data-dir).
    Serve(Box<ServeArgs>),
    /// Start an in-process service and N simulated clients heartbeating; print latency.
    Bench(BenchArgs),
    /// The simulated clients of `bench`, run by it as a child process.
    #[command(hide = true)]
    BenchLoad(bench::LoadSpec),
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Directory for failback.db, ca.pem, ca-key.pem, admin-token and uploaded logs.
    #[arg(
        long,
        env = "FAILBACK_DATA_DIR",
        default_value = "/var/lib/failback-server"
    )]
    data_dir: PathBuf,
    /// Where the state lives: `postgres://USER@HOST/DB` (several replicas may share it), or a
    /// SQLite file path (default: failback.db in --data-dir). PostgreSQL over TLS:
    /// `?sslmode=verify-full&sslrootcert=/path/ca.pem` (libpq's settings); plaintext to a host
    /// not on this machine needs `sslmode=disable` written out.
    #[arg(long, env = "FAILBACK_DATABASE", hide_env_values = true)]
    database: Option<String>,
    /// File holding the secret (64 hex digits) that seals the CA key in a PostgreSQL
    /// database; the same on every replica. Or the environment variable FAILBACK_CA_SECRET.
    #[arg(long)]
    ca_secret_file: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// Extra subject alternative name (IP or DNS) for the HTTPS certificate; repeatable.
    /// QEMU guests reach the host as 10.0.2.2.
    #[arg(long = "san")]
    sans: Vec<String>,
    /// Admin token (default: read data-dir/admin-token, created on first start).
    #[arg(long, env = "FAILBACK_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Heartbeat interval handed to clients and agents (seconds).
    #[arg(long, default_value_t = 10)]
    heartbeat_secs: u64,
    /// Raise AGENT_NOT_SEEN after this many seconds without an agent heartbeat.
    #[arg(long, default_value_t = 60)]
    agent_timeout_secs: u64,
    /// Raise FAILBACK_CLIENT_NOT_SEEN after this many seconds without a client heartbeat.
    #[arg(long, default_value_t = 60)]
    client_timeout_secs: u64,
    /// Sync block size handed to clients (bytes: a power of two from 4096 to 4194304, the
    /// replication engine's rule).
    #[arg(long, default_value_t = 128 << 10,
          value_parser = failback_config::block_size::parse_block_size)]
    block_size: u64,
    /// How launches check the disks when the request does not say: `changes` (quiesce,
    /// changed blocks, digests kept from cached hashes) or `full` (also re-read and re-hash
    /// both sides).
    #[arg(long, value_enum, default_value = "changes")]
    launch_verify: LaunchVerifyArg,
    /// How agents encode the blocks they send clients: `auto` (zstd-1 when the link is the
    /// bottleneck, raw when the CPU is), `zstd` (always) or `none` (never). Handed to clients
    /// at pairing and in every heartbeat answer; applies from their next round.
    #[arg(long, env = "FAILBACK_COMPRESSION", value_enum, default_value = "auto")]
    compression: CompressionArg,
    /// Web console (`/console`): a login session ends this many seconds after it began.
    #[arg(long, default_value_t = 8 * 3600)]
    console_session_secs: u64,
    /// Web console: seconds between two samples of progress and state counts (charts).
    #[arg(long, default_value_t = 30)]
    console_sample_secs: u64,
    /// Write the bound address (host:port) to this file once listening (for scripts/tests).
    #[arg(long)]
    addr_file: Option<PathBuf>,
    #[command(flatten)]
    limits: LimitArgs,
}

/// Transport limits (defaults in `failback_server::Limits`).
#[derive(clap::Args, Debug)]
struct LimitArgs {
    /// A TLS handshake must finish within this many seconds.
    #[arg(long, default_value_t = 10.0)]
    handshake_timeout_secs: f64,
    /// A request head must arrive within this many seconds of its first byte.
    #[arg(long, default_value_t = 10.0)]
    header_timeout_secs: f64,
    /// Close a connection idle (no request in progress) for this many seconds.
    #[arg(long, default_value_t = 120.0)]
    idle_timeout_secs: f64,
    /// A request body must arrive within this many seconds.
    #[arg(long, default_value_t = 60.0)]
    body_timeout_secs: f64,
    /// Open connections in all (also kept below the open-file limit).
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    /// Open connections per source address (IPv6: per /64); beyond it the oldest idle one
    /// of that source is closed.
    #[arg(long, default_value_t = 256)]
    max_connections_per_ip: usize,
}

fn secs(flag: &str, v: f64) -> Result<std::time::Duration, String> {
    std::time::Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("--{flag} {v}: not a positive number of seconds"))
}

impl LimitArgs {
    fn limits(&self) -> Result<Limits, String> {
        Ok(Limits {
            handshake_timeout: secs("handshake-timeout-secs", self.handshake_timeout_secs)?,
            header_timeout: secs("header-timeout-secs", self.header_timeout_secs)?,
            idle_timeout: secs("idle-timeout-secs", self.idle_timeout_secs)?,
            body_timeout: secs("body-timeout-secs", self.body_timeout_secs)?,
            max_connections: self.max_connections.max(1),
            max_connections_per_ip: self.max_connections_per_ip.max(1),
        })
    }
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// Simulated clients.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Measurement duration in seconds (after every client has connected and one more
    /// interval, at least 3 s, has passed).
    #[arg(long, default_value_t = 20)]
    secs: u64,
    /// Seconds between two heartbeats of one client (a real client uses the service's
    /// `--heartbeat-secs`, 10 by default; 1 is the stress setting).
    #[arg(long, default_value_t = 1)]
    interval: u64,
    /// Output JSON instead of a table line.
    #[arg(long)]
    json: bool,
    /// State backend: `postgres://...` (the bench works in a schema of its own, dropped at
    /// the end) or a SQLite path (default: SQLite in a temp dir).
    #[arg(long)]
    database: Option<String>,
}

fn main() -> ExitCode {
    failback_config::stdio::exit_quietly_on_broken_pipe();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async {
        match cli.command {
            Command::Serve(a) => serve(*a).await,
            Command::BenchLoad(spec) => match bench::load(spec).await {
                Ok(r) => {
                    println!("{}", serde_json::to_string(&r).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            },
            Command::Bench(a) => match bench::run(
                bench::Load {
                    clients: a.clients,
                    interval_secs: a.interval,
                    secs: a.secs,
                },
                a.database,
            )
            .await
            {
                Ok(r) => {
                    if a.json {
                        println!("{}", serde_json::to_string(&r).unwrap_or_default());
                    } else {
                        println!("{r}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            },
        }
    })
}

/// `--compression`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum CompressionArg {
    Auto,
    Zstd,
    None,
}

impl From<CompressionArg> for failback_api::CompressionMode {
    fn from(c: CompressionArg) -> Self {
        match c {
            CompressionArg::Auto => Self::Auto,
            CompressionArg::Zstd => Self::Zstd,
            CompressionArg::None => Self::None,
        }
    }
}

/// `--launch-verify`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum LaunchVerifyArg {
    Changes,
    Full,
}

async fn serve(a: ServeArgs) -> ExitCode {
    let limits = match a.limits.limits() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let ca_secret = match ca_secret(a.ca_secret_file.as_deref()) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let cfg = ServerConfig {
        data_dir: a.data_dir.clone(),
        database: a.database,
        ca_secret,
        listen: a.listen,
        sans: a.sans,
        admin_token: a.admin_token,
        settings: Settings {
            heartbeat_secs: a.heartbeat_secs.max(1),
            agent_timeout_secs: a.agent_timeout_secs.max(1),
            client_timeout_secs: a.client_timeout_secs.max(1),
            block_size: a.block_size,
            console_session_secs: a.console_session_secs.max(1),
            console_sample_secs: a.console_sample_secs.max(1),
            launch_verify_full: a.launch_verify == LaunchVerifyArg::Full,
            compression: a.compression.into(),
            ..Settings::default()
        },
        limits,
    };
    let server = match failback_server::start(cfg).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return match e {
                failback_server::ServerError::Listen { .. } => ExitCode::from(4),
                failback_server::ServerError::DataDir { .. }
                | failback_server::ServerError::Startup(_) => ExitCode::from(2),
                _ => ExitCode::from(1),
            };
        }
    };
    eprintln!(
        "failback-server: listening on https://{} (CA {}/ca.pem, admin token {}/admin-token)",
        server.addr,
        a.data_dir.display(),
        a.data_dir.display()
    );
    if let Some(f) = &a.addr_file {
        let tmp = f.with_extension("tmp");
        if let Err(e) =
            std::fs::write(&tmp, server.addr.to_string()).and_then(|_| std::fs::rename(&tmp, f))
        {
            eprintln!("error: writing {}: {e}", f.display());
            return ExitCode::from(2);
        }
    }
    let stop = server.shutdown_sender();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
        }
        let _ = stop.send(true);
    });
    server.wait().await;
    ExitCode::SUCCESS
}

/// The CA sealing secret from `--ca-secret-file` or `FAILBACK_CA_SECRET` (none: not needed
/// with SQLite; the service refuses PostgreSQL without it).
fn ca_secret(
    file: Option<&std::path::Path>,
) -> Result<Option<std::sync::Arc<failback_server::sealed::SealKey>>, String> {
    use failback_server::sealed::SealKey;
    let parsed = match (file, std::env::var("FAILBACK_CA_SECRET")) {
        (Some(f), _) => {
            let t = std::fs::read_to_string(f)
                .map_err(|e| format!("--ca-secret-file {}: {e}", f.display()))?;
            SealKey::parse(&t, &f.display().to_string())
        }
        (None, Ok(t)) => SealKey::parse(&t, "FAILBACK_CA_SECRET"),
        (None, Err(_)) => return Ok(None),
    };
    parsed
        .map(|k| Some(std::sync::Arc::new(k)))
        .map_err(|e| e.to_string())
}
