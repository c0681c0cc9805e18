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
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Bytes delivered downstream (upstream server → client) over all connections.
    delivered: AtomicU64,
    /// Downstream byte count at which every connection is cut ([`Link::cut_at`]).
    cut_at: AtomicU64,
    /// Bumped at every cut; each connection watches it.
    cuts: tokio::sync::watch::Sender<u64>,
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
            delivered: AtomicU64::new(0),
            cut_at: AtomicU64::new(u64::MAX),
            cuts: tokio::sync::watch::channel(0).0,
        })
    }

    pub fn spec(&self) -> LinkSpec {
        self.spec
    }

    /// Bytes delivered downstream so far, over all connections.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::SeqCst)
    }

    /// Cuts every connection through the link (both directions, no FIN of the data in flight:
    /// what is queued is dropped) once `bytes` have been delivered downstream in total; the
    /// bytes up to exactly that count arrive. One-shot; later connections pass.
    pub fn cut_at(&self, bytes: u64) {
        self.cut_at.store(bytes, Ordering::SeqCst);
    }

    /// How many of `n` downstream bytes may still be delivered before the armed cut, and
    /// whether the cut happens after them (then it is disarmed and every connection is cut).
    fn deliver(&self, n: u64) -> (u64, bool) {
        let at = self.cut_at.load(Ordering::SeqCst);
        let before = self.delivered.fetch_add(n, Ordering::SeqCst);
        if before.saturating_add(n) < at {
            return (n, false);
        }
        let allowed = at.saturating_sub(before).min(n);
        self.delivered.fetch_sub(n - allowed, Ordering::SeqCst);
        self.cut_at.store(u64::MAX, Ordering::SeqCst);
        self.cuts.send_modify(|c| *c += 1);
        (allowed, true)
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
    let mut cuts = link.cuts.subscribe();
    let up = pipe(cr, sw, link.clone(), Direction::Up);
    let down = pipe(sr, cw, link, Direction::Down);
    // A cut drops both pipes: every socket half closes, queued bytes are lost.
    tokio::select! {
        (a, b) = async { tokio::join!(up, down) } => a.and(b),
        _ = cuts.changed() => Err(std::io::Error::other("link cut")),
    }
}

/// Aborts the task when dropped (a cut link drops its pipes; their readers must go too).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
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
    let counter = link.clone();
    let mut reader = AbortOnDrop(tokio::spawn(async move {
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
    }));
    let mut result = Ok(());
    while let Some((due, mut buf)) = rx.recv().await {
        tokio::time::sleep_until(due).await;
        let mut cut = false;
        if let Direction::Down = dir {
            let (allowed, now) = counter.deliver(buf.len() as u64);
            buf.truncate(usize::try_from(allowed).unwrap_or(buf.len()));
            cut = now;
        }
        if let Err(e) = w.write_all(&buf).await {
            result = Err(e);
            break;
        }
        if cut {
            // The connection is dropped by `forward` (it watches the cuts); stop here.
            std::future::pending::<()>().await;
        }
    }
    drop(rx);
    let read = (&mut reader.0).await.map_err(std::io::Error::other)?;
    let _ = w.shutdown().await;
    result.and(read)
}
