//! `fb-wanlink`: a user-space WAN link for the benchmark (the kernel here has no netem/tbf).
//!
//! `fb-wanlink --listen 127.0.0.1:0 --upstream 127.0.0.1:7000 --rtt-ms 40 --mbit 1000` forwards
//! every connection to the upstream through one emulated link (RTT/2 each way, the rate shared by
//! all connections) and prints `listening on ADDR` once it accepts.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use failback_tests::wanlink::{self, Link, LinkSpec};

#[derive(Parser, Debug)]
#[command(about = "TCP proxy emulating one WAN link: delay + shared rate cap")]
struct Args {
    /// Address to listen on (port 0: a free port, printed on stdout).
    #[arg(long)]
    listen: SocketAddr,
    /// Address every connection is forwarded to.
    #[arg(long)]
    upstream: SocketAddr,
    /// Round-trip time added, in milliseconds.
    #[arg(long)]
    rtt_ms: u64,
    /// Rate of each direction, in Mbit/s (10^6 bits per second).
    #[arg(long)]
    mbit: u32,
    /// Print `delivered N bytes` on stdout (bytes delivered downstream so far, over every
    /// connection) every this many milliseconds while the count changes, and once more on
    /// SIGTERM, then exit (which closes every connection: a real cut). Tests use it to measure
    /// what crossed the link before a cut and after a restart. 0: never.
    #[arg(long, default_value_t = 0)]
    report_ms: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let spec = LinkSpec::new(args.rtt_ms, args.mbit).map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    println!("listening on {}", listener.local_addr()?);
    let link = Link::new(spec);
    let serve = wanlink::serve(listener, args.upstream, link.clone());
    let serve = async {
        serve
            .await
            .with_context(|| format!("accepting on {}", args.listen))
    };
    if args.report_ms == 0 {
        return serve.await;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut tick = tokio::time::interval(Duration::from_millis(args.report_ms));
    let mut last = None;
    tokio::pin!(serve);
    loop {
        tokio::select! {
            r = &mut serve => return r,
            _ = tick.tick() => {
                let d = link.delivered();
                if last != Some(d) {
                    println!("delivered {d} bytes");
                    last = Some(d);
                }
            }
            _ = term.recv() => {
                // Exact up to a chunk still being written (counted before it is written).
                println!("delivered {} bytes", link.delivered());
                return Ok(());
            }
        }
    }
}
