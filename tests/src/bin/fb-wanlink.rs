//! `fb-wanlink`: a user-space WAN link for the benchmark (the kernel here has no netem/tbf).
//!
//! `fb-wanlink --listen 127.0.0.1:0 --upstream 127.0.0.1:7000 --rtt-ms 40 --mbit 1000` forwards
//! every connection to the upstream through one emulated link (RTT/2 each way, the rate shared by
//! all connections) and prints `listening on ADDR` once it accepts.

use std::net::SocketAddr;

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
    wanlink::serve(listener, args.upstream, Link::new(spec))
        .await
        .with_context(|| format!("accepting on {}", args.listen))
}
