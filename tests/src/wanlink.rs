//! A user-space WAN link emulator for benchmarks and tests: a TCP proxy that delays each
//! direction by RTT/2 and caps each direction's throughput with one token bucket shared by all
//! connections through it, like one physical full-duplex link.
//!
//! Written here because the kernel on these machines has neither the netem nor the tbf qdisc,
//! and the user-space tools that exist (toxiproxy, comcast) are not Debian packages and model a
//! per-connection rate, not one link shared by several connections. The token bucket itself is
//! `governor`'s (GCRA).
//!
//! Model, per direction: the sender's bytes pass the bucket (serialisation at the link's rate),
//! then wait in a bounded in-flight queue for the propagation delay. The queue holds one
//! bandwidth-delay product plus a few chunks: when it is full the proxy stops reading, the
//! socket buffers fill and back-pressure reaches the sender, as on a real link.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Largest piece the proxy reads and forwards at once.
const CHUNK: u32 = 64 * 1024;
/// The bucket's burst, in time at the link's rate. A burst of one chunk (as before) lost
/// every timer wake-up's lateness: through a 1 Gbit/s link with no delay one TCP stream got
/// 79 % of the rate (300 MB in 3.04 s). A few milliseconds of credit absorb the lateness while
/// the long-term rate stays exact; the bytes of a burst reach the far end at most this early.
const BURST: Duration = Duration::from_millis(5);

/// A link's round-trip time and its rate in each direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkSpec {
    /// Round-trip time added to every exchange (RTT/2 per direction).
    pub rtt: Duration,
    /// Bytes per second in each direction.
    pub bytes_per_second: u32,
}

impl LinkSpec {
    /// A link of `rtt_ms` milliseconds and `mbit` Mbit/s (10^6 bits) per direction.
    pub fn new(rtt_ms: u64, mbit: u32) -> Result<Self, String> {
        let bytes = u64::from(mbit) * 1_000_000 / 8;
        let bytes_per_second = u32::try_from(bytes)
            .ok()
            .filter(|b| *b >= CHUNK)
            .ok_or_else(|| format!("link rate {mbit} Mbit/s: must be 1 to 34359 Mbit/s"))?;
        if rtt_ms > 10_000 {
            return Err(format!("RTT {rtt_ms} ms: must be at most 10000 ms"));
        }
        Ok(Self {
            rtt: Duration::from_millis(rtt_ms),
            bytes_per_second,
        })
    }

    fn one_way(&self) -> Duration {
        self.rtt / 2
    }

    /// Bytes sent at the link's rate in `d`.
    fn bytes_in(&self, d: Duration) -> u64 {
        let micros = u64::try_from(d.as_micros()).expect("RTT <= 10 s");
        u64::from(self.bytes_per_second) * micros / 1_000_000
    }

    /// The bucket's burst in bytes: [`BURST`] at the link's rate, at least one chunk.
    fn burst(&self) -> u32 {
        u32::try_from(self.bytes_in(BURST))
            .unwrap_or(u32::MAX)
            .max(CHUNK)
    }

    /// In-flight queue length in chunks: one bandwidth-delay product plus a burst plus slack.
    fn queue_chunks(&self) -> usize {
        let bytes = self.bytes_in(self.one_way()) + u64::from(self.burst());
        usize::try_from(bytes.div_ceil(u64::from(CHUNK)) + 4).expect("<= 10 s of 34 Gbit/s")
    }
}

/// The two token buckets of one link, shared by every connection through it.
pub struct Link {
    spec: LinkSpec,
    up: DefaultDirectRateLimiter,
    down: DefaultDirectRateLimiter,
}

impl Link {
    pub fn new(spec: LinkSpec) -> Arc<Self> {
        let rate = NonZeroU32::new(spec.bytes_per_second).expect("LinkSpec::new checks the rate");
        let burst = NonZeroU32::new(spec.burst()).expect("at least one chunk");
        let quota = Quota::per_second(rate).allow_burst(burst);
        Arc::new(Self {
            spec,
            up: RateLimiter::direct(quota),
            down: RateLimiter::direct(quota),
        })
    }

    pub fn spec(&self) -> LinkSpec {
        self.spec
    }
}

/// Accept connections on `listener` forever and forward each to `upstream` through `link`.
pub async fn serve(
    listener: TcpListener,
    upstream: SocketAddr,
    link: Arc<Link>,
) -> std::io::Result<()> {
    loop {
        let (client, peer) = listener.accept().await?;
        let link = link.clone();
        tokio::spawn(async move {
            if let Err(e) = forward(client, upstream, link).await {
                tracing::debug!(%peer, %upstream, "link connection ended: {e}");
            }
        });
    }
}

/// Connect to `upstream` and carry both directions of `client` through the link.
async fn forward(client: TcpStream, upstream: SocketAddr, link: Arc<Link>) -> std::io::Result<()> {
    let server = TcpStream::connect(upstream).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pipe(cr, sw, link.clone(), Direction::Up);
    let down = pipe(sr, cw, link, Direction::Down);
    let (a, b) = tokio::join!(up, down);
    a.and(b)
}

#[derive(Clone, Copy)]
enum Direction {
    Up,
    Down,
}

/// One direction: read → bucket → in-flight queue (delay) → write; EOF is forwarded as a
/// half-close after the data before it has arrived.
async fn pipe<R, W>(mut r: R, mut w: W, link: Arc<Link>, dir: Direction) -> std::io::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(link.spec.queue_chunks());
    let delay = link.spec.one_way();
    let reader = tokio::spawn(async move {
        loop {
            let mut buf = vec![0u8; CHUNK as usize];
            let n = r.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
            buf.truncate(n);
            let cells = u32::try_from(n)
                .ok()
                .and_then(NonZeroU32::new)
                .expect("0 < n <= CHUNK");
            let bucket = match dir {
                Direction::Up => &link.up,
                Direction::Down => &link.down,
            };
            bucket
                .until_n_ready(cells)
                .await
                .expect("chunk within the burst");
            if tx.send((Instant::now() + delay, buf)).await.is_err() {
                return Ok(()); // the writer failed; its error is reported
            }
        }
    });
    let mut result = Ok(());
    while let Some((due, buf)) = rx.recv().await {
        tokio::time::sleep_until(due).await;
        if let Err(e) = w.write_all(&buf).await {
            result = Err(e);
            break;
        }
    }
    drop(rx);
    let read = reader.await.map_err(std::io::Error::other)?;
    let _ = w.shutdown().await;
    result.and(read)
}
