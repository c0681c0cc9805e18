//! `failback-agent`: the recovery agent. Thin: parse arguments, set up logging, call the
//! library, map errors to exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use failback_agent::{AgentError, AgentOptions, LimitArgs};
use failback_replication::{ServerTls, TlsFiles};

#[derive(Parser, Debug)]
#[command(
    name = "failback-agent",
    version,
    about = "The recovery agent: serves this instance's disks read-only to a failback client"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve disks (block devices or image files) read-only over mutual TLS.
    Serve(Box<ServeArgs>),
    /// Write a development CA plus agent and client certificates (client for instance `dev`).
    DevCerts {
        /// Directory for ca.pem ca-key.pem agent.pem agent-key.pem client.pem client-key.pem.
        dir: PathBuf,
        /// Instance id named in the client certificate.
        #[arg(long, default_value = "dev")]
        instance: String,
    },
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Address to listen on, e.g. 0.0.0.0:1740 (port 0 picks a free port; the bound address is
    /// printed on stdout as `listening on ADDR`).
    #[arg(long)]
    listen: String,
    /// Disk to serve as NAME=PATH (repeatable).
    #[arg(long = "disk", value_name = "NAME=PATH", required = true)]
    disks: Vec<String>,
    /// CA certificate (PEM) that must have signed client certificates (with --server: the
    /// DR service's CA, pinned for enrollment).
    #[arg(long, required_unless_present = "server")]
    ca: Option<PathBuf>,
    /// Agent certificate (PEM), with DNS SAN `failback-agent`.
    #[arg(long, required_unless_present = "server")]
    cert: Option<PathBuf>,
    /// Agent private key (PEM).
    #[arg(long, required_unless_present = "server")]
    key: Option<PathBuf>,
    /// DR-service enrollment (instead of --cert/--key).
    #[command(flatten)]
    enroll: Box<failback_agent::enroll::EnrollArgs>,
    /// Serve only clients whose certificate names this recovery instance
    /// (URI SAN urn:failback:instance:ID).
    #[arg(long)]
    instance: Option<String>,
    /// Shell command run when the client asks to quiesce (before the final round).
    #[arg(long)]
    quiesce_cmd: Option<String>,
    /// Shell command run when the client asks to thaw.
    #[arg(long)]
    thaw_cmd: Option<String>,
    /// Read disks with pread only, never memory-mapped (mapping saves a copy of every byte
    /// hashed, but a disk that shrinks mid-sync then kills the agent with SIGBUS).
    #[arg(long)]
    no_mmap: bool,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    track: failback_agent::TrackArgs,
}

fn main() -> ExitCode {
    failback_config::stdio::exit_quietly_on_broken_pipe();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Command::Serve(args) = &cli.command {
        args.track.configure();
    }
    let res = match cli.command {
        Command::DevCerts { dir, instance } => failback_agent::write_dev_certs(&dir, &instance)
            .map(|()| println!("wrote development certificates to {}", dir.display())),
        Command::Serve(args) if args.enroll.server.is_some() => {
            return failback_agent::enroll::main(failback_agent::enroll::EnrollServe {
                agent: AgentOptions {
                    quiesce_cmd: args.quiesce_cmd,
                    thaw_cmd: args.thaw_cmd,
                    limits: args.limits.limits(),
                    scan_pacer: args.track.pacer(),
                    ..Default::default()
                }
                .with_fault_env(),
                args: *args.enroll,
                listen: args.listen,
                disks: match args
                    .disks
                    .iter()
                    .map(|s| failback_agent::parse_disk_spec(s))
                    .collect()
                {
                    Ok(d) => d,
                    Err(e) => {
                        eprintln!("failback-agent: error: {e}");
                        return ExitCode::from(2);
                    }
                },
                ca: args.ca,
            })
        }
        Command::Serve(args) => serve(*args),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("failback-agent: error: {e}");
            let code = match e {
                AgentError::DiskSpec(_) | AgentError::DuplicateDisk(_) | AgentError::NoDisks => 2,
                AgentError::Replication(ref r)
                    if r.class() == failback_replication::ErrorClass::Usage =>
                {
                    2
                }
                AgentError::Listen { .. } => 4,
                AgentError::Replication(_) => 1,
            };
            ExitCode::from(code)
        }
    }
}

fn serve(args: ServeArgs) -> Result<(), AgentError> {
    failback_replication::mapped::set_enabled(!args.no_mmap);
    let specs = args
        .disks
        .iter()
        .map(|s| failback_agent::parse_disk_spec(s))
        .collect::<Result<Vec<_>, _>>()?;
    let disks = failback_agent::open_disks(&specs)?;
    let tls = ServerTls::from_files(
        &TlsFiles {
            ca: args.ca.unwrap_or_default(),
            cert: args.cert.unwrap_or_default(),
            key: args.key.unwrap_or_default(),
        },
        args.instance,
    )
    .map_err(failback_replication::Error::from)?;
    let opts = AgentOptions {
        quiesce_cmd: args.quiesce_cmd,
        thaw_cmd: args.thaw_cmd,
        limits: args.limits.limits(),
        scan_pacer: args.track.pacer(),
        ..Default::default()
    }
    .with_fault_env();
    // Disk syncs run on blocking threads, at most `max_streams` of them; a few more for the rest.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(opts.limits.max_streams + 8)
        .build()
        .map_err(|source| AgentError::Listen {
            addr: args.listen.clone(),
            source,
        })?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .map_err(|source| AgentError::Listen {
                addr: args.listen.clone(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| AgentError::Listen {
            addr: args.listen.clone(),
            source,
        })?;
        println!("listening on {addr}");
        failback_agent::serve(listener, disks, tls, opts).await
    })
}
