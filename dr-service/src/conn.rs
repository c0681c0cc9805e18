//! Connection handling of the HTTPS API: accept loop, TLS handshake timeout, request-head and
//! keep-alive idle timeouts, and caps on open connections in all and per source address.
//!
//! When a cap is reached, the oldest connection of that source (or, for the global cap, of
//! any source) that is *not* serving a request — still in its TLS handshake, sending a request
//! head, or idle between requests — is closed to make room; only when every connection is busy
//! is the new one refused. So idle or slow connections can never keep `/v1/health` or a
//! heartbeat out. The table is locked only on connect and disconnect; a request touches only
//! its own connection's atomics.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tower::ServiceExt;

use crate::limits::Limits;

/// Milliseconds since the first call (never 0, so 0 can mean "unset").
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let e = EPOCH.get_or_init(Instant::now).elapsed().as_millis();
    u64::try_from(e).unwrap_or(u64::MAX).saturating_add(1)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The per-connection state the request path updates (atomics only).
#[derive(Debug, Default)]
struct ConnState {
    /// A request is being served (from its head until its response body is sent).
    busy: AtomicBool,
    /// When the first byte of the next request head arrived (0: none yet).
    head_at: AtomicU64,
    /// When the connection became idle (accepted, or last response sent).
    idle_since: AtomicU64,
    /// Closed by the table to make room.
    evict: Notify,
}

impl ConnState {
    fn new() -> ConnState {
        let s = ConnState::default();
        s.idle_since.store(now_ms(), Ordering::Relaxed);
        s
    }

    /// Why the connection must be closed now, if it must.
    fn expired(&self, l: &Limits, now: u64) -> Option<&'static str> {
        if self.busy.load(Ordering::Acquire) {
            return None;
        }
        let head = self.head_at.load(Ordering::Acquire);
        if head != 0 {
            return (now.saturating_sub(head) > ms(l.header_timeout)).then_some("request head");
        }
        let idle = self.idle_since.load(Ordering::Acquire);
        (now.saturating_sub(idle) > ms(l.idle_timeout)).then_some("idle")
    }

    fn request_started(&self) {
        self.busy.store(true, Ordering::Release);
        self.head_at.store(0, Ordering::Release);
    }

    fn request_done(&self) {
        self.idle_since.store(now_ms(), Ordering::Release);
        self.busy.store(false, Ordering::Release);
    }
}

/// Marks the request done when the response body is dropped (sent or abandoned).
struct RequestDone(Arc<ConnState>);

impl Drop for RequestDone {
    fn drop(&mut self) {
        self.0.request_done();
    }
}

/// IPv6 peers are counted per /64 (one host usually holds a whole /64).
pub(crate) fn source(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

#[derive(Debug)]
struct Entry {
    src: IpAddr,
    state: Arc<ConnState>,
}

#[derive(Debug, Default)]
struct Table {
    next: u64,
    conns: BTreeMap<u64, Entry>,
    per_src: HashMap<IpAddr, usize>,
}

impl Table {
    fn remove(&mut self, seq: u64) -> Option<Entry> {
        let e = self.conns.remove(&seq)?;
        if let Some(n) = self.per_src.get_mut(&e.src) {
            *n -= 1;
            if *n == 0 {
                self.per_src.remove(&e.src);
            }
        }
        Some(e)
    }

    /// Closes the oldest connection not serving a request (of `src` when given).
    fn evict_oldest_idle(&mut self, src: Option<IpAddr>) -> bool {
        let victim = self.conns.iter().find_map(|(seq, e)| {
            let same = src.is_none_or(|s| s == e.src);
            (same && !e.state.busy.load(Ordering::Acquire)).then_some(*seq)
        });
        match victim.and_then(|seq| self.remove(seq)) {
            Some(e) => {
                e.state.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Open connections, shared by the accept loop and the connection tasks.
#[derive(Debug)]
pub struct Conns {
    table: Mutex<Table>,
    max: usize,
    max_per_src: usize,
}

/// A connection's place in the table; leaving it frees the place.
#[derive(Debug)]
struct Slot {
    conns: Arc<Conns>,
    seq: u64,
    state: Arc<ConnState>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.conns.lock().remove(self.seq);
    }
}

impl Conns {
    pub fn new(max: usize, max_per_src: usize) -> Arc<Conns> {
        Arc::new(Conns {
            table: Mutex::new(Table::default()),
            max: max.max(1),
            max_per_src: max_per_src.max(1),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Open connections now (for tests and logs).
    pub fn open(&self) -> usize {
        self.lock().conns.len()
    }

    /// Takes a place for a new connection from `ip`, closing an idle one if a cap is reached;
    /// `None` when every connection in the way is serving a request.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let src = source(ip);
        let mut t = self.lock();
        if t.per_src.get(&src).copied().unwrap_or(0) >= self.max_per_src
            && !t.evict_oldest_idle(Some(src))
        {
            return None;
        }
        if t.conns.len() >= self.max && !t.evict_oldest_idle(None) {
            return None;
        }
        let seq = t.next;
        t.next += 1;
        let state = Arc::new(ConnState::new());
        t.conns.insert(
            seq,
            Entry {
                src,
                state: state.clone(),
            },
        );
        *t.per_src.entry(src).or_insert(0) += 1;
        Some(Slot {
            conns: self.clone(),
            seq,
            state,
        })
    }
}

/// The TLS stream, noting when the first byte of a request head arrives.
struct Watched<S> {
    inner: S,
    state: Arc<ConnState>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let s = &self.state;
        if buf.filled().len() > before
            && !s.busy.load(Ordering::Acquire)
            && s.head_at.load(Ordering::Acquire) == 0
        {
            s.head_at.store(now_ms(), Ordering::Release);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// File descriptors kept for SQLite, logs and the CA besides connections.
const RESERVED_FDS: u64 = 64;

/// Raises the open-file soft limit to the hard limit and caps `wanted` below it, so that a
/// connection flood meets the connection cap (and its eviction) before `EMFILE` stops the
/// accept loop.
pub fn connection_budget(wanted: usize) -> usize {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return wanted;
    };
    if soft < hard {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            tracing::debug!("raising the open-file limit {soft} to {hard}: {e}");
        }
    }
    let soft = getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |(s, _)| s);
    let budget = usize::try_from(soft.saturating_sub(RESERVED_FDS).max(16)).unwrap_or(usize::MAX);
    if budget < wanted {
        tracing::warn!("open-file limit {soft}: at most {budget} connections (not {wanted})");
    }
    wanted.min(budget)
}

/// Everything a connection task needs.
#[derive(Clone)]
pub struct Transport {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub app: Router,
    pub limits: Limits,
    pub conns: Arc<Conns>,
}

/// Accepts until `stop` changes; accept errors (e.g. out of file descriptors) back off and
/// go on.
pub async fn accept_loop(listener: TcpListener, t: Transport, mut stop: watch::Receiver<bool>) {
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("accept on {:?}: {e}", listener.local_addr().ok());
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let Some(slot) = t.conns.admit(peer.ip()) else {
            tracing::debug!("connection from {peer} refused: every connection is busy");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(serve(t.clone(), tcp, peer, slot, stop.clone()));
    }
}

/// One connection: handshake, then HTTP/1.1 requests until it ends, idles out, is evicted or
/// the server stops.
async fn serve(
    t: Transport,
    tcp: TcpStream,
    peer: SocketAddr,
    slot: Slot,
    mut stop: watch::Receiver<bool>,
) {
    let st = slot.state.clone();
    let tls = tokio::select! {
        r = tokio::time::timeout(t.limits.handshake_timeout, t.acceptor.accept(tcp)) => match r {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return tracing::debug!("TLS handshake from {peer}: {e}"),
            Err(_) => return tracing::debug!("TLS handshake from {peer}: timed out"),
        },
        _ = st.evict.notified() => return,
        _ = stop.changed() => return,
    };
    st.idle_since.store(now_ms(), Ordering::Release);
    let io = Watched {
        inner: tls,
        state: st.clone(),
    };
    let (app, svc_state) = (t.app.clone(), st.clone());
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        svc_state.request_started();
        req.extensions_mut().insert(ConnectInfo(peer));
        let done = RequestDone(svc_state.clone());
        let app = app.clone();
        async move {
            let resp = app.oneshot(req.map(Body::new)).await?;
            Ok::<_, std::convert::Infallible>(resp.map(|b| {
                Body::new(b.map_frame(move |f| {
                    let _ = &done;
                    f
                }))
            }))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
    tokio::pin!(conn);
    let tick = (t.limits.header_timeout.min(t.limits.idle_timeout) / 4)
        .clamp(Duration::from_millis(20), Duration::from_secs(1));
    let mut iv = tokio::time::interval(tick);
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!("connection from {peer}: {e}");
                }
                break;
            }
            _ = iv.tick() => if let Some(why) = st.expired(&t.limits, now_ms()) {
                tracing::debug!("connection from {peer}: {why} timeout");
                break;
            },
            _ = st.evict.notified() => break,
            _ = stop.changed() => break,
        }
    }
    drop(slot);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_evict_the_oldest_idle_connection_of_the_source() {
        let c = Conns::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = c.admit(a).unwrap();
        let a2 = c.admit(a).unwrap();
        a2.state.request_started();
        let _a3 = c.admit(a).expect("a1 is idle and makes room");
        assert_eq!(c.open(), 2);
        assert!(!c.lock().conns.contains_key(&a1.seq));
        let _b1 = c.admit(b).unwrap();
        assert_eq!(c.open(), 3);
        _a3.state.request_started();
        _b1.state.request_started();
        assert!(c.admit(b).is_none(), "all busy: refused");
        drop(a1); // evicted already: no double count
        assert_eq!(c.open(), 3);
    }

    #[test]
    fn ipv6_counts_per_64() {
        let x: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let y: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert_eq!(source(x), source(y));
        let m: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(source(m), "10.0.0.1".parse::<IpAddr>().unwrap());
    }
}
