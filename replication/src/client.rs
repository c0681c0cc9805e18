//! Client side: [`Session::connect`] (TLS, handshake, manifest) and [`Session::sync`] (one
//! delta round over any number of disks in parallel).
//!
//! Per disk: hashing threads read the local target window by window (`hashing.rs`);
//! the disk task sends hash windows in disk order (a bounded number outstanding), verifies the
//! blocks the agent returns and hands [`VerifiedRun`]s to the disk's single writer thread.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::block::{self, DiskDigest, VerifiedRun, ZeroHashes};
use crate::cbt::Token;
use crate::conn::{spawn_writer, DeadSlot, FrameReader, FrameSender};
use crate::error::{Error, Result};
pub use crate::hashing::default_hash_threads;
use crate::hashing::LocalHashes;
use crate::progress::Progress;
use crate::report::{DiskReport, SyncReport};
use crate::tls::{ClientTls, AGENT_SERVER_NAME};
use crate::wire::{
    Compression, DiskInfo, ErrorCode, Hash, Message, WireBlock, CONNECTION_STREAM, HASH_LEN,
    PROTOCOL_VERSION,
};
use crate::wirestats::{LinkMeter, WireReport, WireTally};
use crate::writer::{Head, Target};

mod partial;

/// Timeout for TCP connect, TLS handshake and hello.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A disk sync fails if the agent sends nothing for this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Bytes of disk covered by one hash window.
pub const WINDOW_BYTES: u64 = 16 * 1024 * 1024;
/// The compare rate the hash windows in flight are sized for: windows ahead of the last one
/// done, per disk, cover this many bytes of disk per round trip. A compare round moves at most
/// `windows ahead × WINDOW_BYTES` per round trip; a fixed 6 windows (96 MiB) made a 1 GiB
/// delta round take 1.32 s through a 100 ms link where loopback took 0.33 s.
const AHEAD_BYTES_PER_SEC: f64 = 8.0 * 1024.0 * 1024.0 * 1024.0;
/// Fewest windows ahead (a short link still needs some to keep the agent busy).
const MIN_AHEAD: usize = 8;
/// Most windows ahead: at 4 KiB blocks a window's hashes are 128 KiB, so a disk holds at most
/// 16 MiB of them in flight (32 MiB with cached hashes, which run twice as far ahead).
const MAX_AHEAD: usize = 128;

/// Hash windows per disk that may be hashed and sent ahead of the last one done (besides one
/// per hashing thread), for a session whose round trip measured `rtt`: enough for
/// 8 GiB/s (`AHEAD_BYTES_PER_SEC`) of compare over the link's bandwidth-delay product.
pub fn windows_ahead(rtt: Duration) -> usize {
    let per_rtt = rtt.as_secs_f64() * AHEAD_BYTES_PER_SEC / WINDOW_BYTES as f64;
    // Bounded before the cast; a ceiling of a non-negative figure.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let n = per_rtt.ceil().min(MAX_AHEAD as f64) as usize;
    n.clamp(MIN_AHEAD, MAX_AHEAD)
}
/// Wait for quiesce/thaw commands.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(600);

/// Memory the client may spend on cached block hashes over all its disks: 2 TiB of disks at
/// the default 128 KiB block size (32 bytes per block).
pub const HASH_CACHE_BUDGET: u64 = 512 << 20;

/// The hashes of everything the client wrote, per local target, kept from round to round:
/// after the first round the client holds its targets exclusively, so it need not read them
/// again; later rounds send these hashes (hash compare) or ask only for what changed.
/// A failed round forgets its disk (the next one reads the target again).
#[derive(Debug, Default)]
pub struct HashCache {
    disks: Mutex<HashMap<PathBuf, DiskCache>>,
    /// Rounds cut short by a network error, to continue (see [`crate::resume`]).
    partial: Mutex<HashMap<PathBuf, partial::Partial>>,
}

#[derive(Debug, Clone)]
struct DiskCache {
    remote: String,
    size: u64,
    block_size: u32,
    hashes: Vec<Hash>,
    /// The agent's token of the round that produced these hashes (`None`: untracked agent).
    token: Option<Token>,
}

impl HashCache {
    /// Forgets everything (the next round re-reads and re-hashes every target: `--verify full`).
    pub fn clear(&self) {
        self.lock().clear();
        self.forget_partial();
    }

    /// Bytes of hashes held.
    pub fn bytes(&self) -> u64 {
        self.lock()
            .values()
            .map(|d| (d.hashes.len() * HASH_LEN) as u64)
            .sum()
    }

    /// Whether hashes of `local` are held.
    pub fn holds(&self, local: &std::path::Path) -> bool {
        self.lock().contains_key(local)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, DiskCache>> {
        self.disks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self, local: &std::path::Path) -> Option<DiskCache> {
        self.lock().remove(local)
    }

    fn put(&self, local: PathBuf, d: DiskCache) {
        let held = self.bytes();
        let need = (d.hashes.len() * HASH_LEN) as u64;
        if held + need > HASH_CACHE_BUDGET {
            tracing::warn!(
                "not caching the hashes of {} ({need} bytes; {held} of {HASH_CACHE_BUDGET} held): \
                 its next round reads it again (use a larger --block-size)",
                local.display()
            );
            return;
        }
        self.lock().insert(local, d);
    }
}

/// Where a hash-compare round's local hashes come from.
enum HashSource {
    /// Hashing threads reading the target.
    Disk(LocalHashes),
    /// The cached hashes, window by window.
    Cache {
        hashes: Vec<Hash>,
        next: usize,
        window: usize,
    },
}

impl HashSource {
    async fn next(&mut self) -> Option<Result<(u64, Vec<Hash>)>> {
        match self {
            HashSource::Disk(l) => l.next().await,
            HashSource::Cache {
                hashes,
                next,
                window,
            } => {
                if *next >= hashes.len() {
                    return None;
                }
                let end = (*next + *window).min(hashes.len());
                let w = hashes[*next..end].to_vec();
                let first = *next as u64;
                *next = end;
                Some(Ok((first, w)))
            }
        }
    }

    /// The cached hashes a `Cache` source compares with (kept for a resume).
    fn into_cached(self) -> Option<Vec<Hash>> {
        match self {
            HashSource::Cache { hashes, .. } => Some(hashes),
            HashSource::Disk(_) => None,
        }
    }

    fn retired(&self) {
        if let HashSource::Disk(l) = self {
            l.retired();
        }
    }

    /// Whether another window may be taken with `open` windows outstanding (`ahead`: see
    /// [`windows_ahead`]; a disk source is bounded by its hashing threads' queue instead).
    fn may_take(&self, open: usize, ahead: usize) -> bool {
        match self {
            HashSource::Disk(_) => true,
            HashSource::Cache { .. } => open < 2 * ahead,
        }
    }
}

/// One remote disk to pull into one local target.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mapping {
    /// The agent's disk id (from the manifest).
    pub remote: String,
    /// Local block device or image file.
    pub local: PathBuf,
}

/// Options of one sync round.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncOptions {
    /// Block size: power of two, 4 KiB..=4 MiB.
    pub block_size: u32,
    /// Receive-rate limit in Mbit/s for the whole session (None = unlimited).
    pub bandwidth_limit_mbps: Option<u64>,
    /// Only compare hashes and report what would be fetched; write nothing.
    pub estimate_only: bool,
    /// How often one block may fail verification and be fetched again before giving up.
    pub max_block_retries: u32,
    /// Threads hashing each local target (None: one per CPU). The first runs at normal
    /// priority, the others at idle priority, so they never slow receiving, decrypting,
    /// verifying and writing.
    pub hash_threads: Option<usize>,
    /// How the agent encodes the blocks it sends: `auto` (zstd-1 while the link is the
    /// bottleneck, raw while the CPU is), `zstd` or `none`.
    pub compression: Compression,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            block_size: block::DEFAULT_BLOCK_SIZE,
            bandwidth_limit_mbps: None,
            estimate_only: false,
            max_block_retries: 3,
            hash_threads: None,
            compression: Compression::Auto,
        }
    }
}

type Route = mpsc::Sender<(Message, usize)>;

/// Simple receive-side rate limiter (TCP back-pressure throttles the agent).
#[derive(Debug, Default)]
struct RateLimiter {
    state: Mutex<Option<(u64, Instant, u64)>>,
}

impl RateLimiter {
    fn set(&self, mbps: Option<u64>) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        *s = mbps
            .filter(|m| *m > 0)
            .map(|m| (m.saturating_mul(1_000_000) / 8, Instant::now(), 0));
    }
    fn delay_for(&self, bytes: usize) -> Option<Duration> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (rate, start, used) = s.as_mut()?;
        *used += bytes as u64;
        pace(*used, *rate, start.elapsed())
    }
}

/// How long to wait so that `used` bytes since the start take at least `used / rate` seconds,
/// `elapsed` after the start; `None` when already that late.
fn pace(used: u64, bytes_per_sec: u64, elapsed: Duration) -> Option<Duration> {
    Duration::from_secs_f64(used as f64 / bytes_per_sec as f64).checked_sub(elapsed)
}

struct Inner {
    peer: String,
    out: FrameSender,
    routes: Mutex<HashMap<u32, Route>>,
    control: tokio::sync::Mutex<mpsc::Receiver<Message>>,
    dead: DeadSlot,
    dead_err: Mutex<Option<DeadReason>>,
    next_stream: AtomicU32,
    limiter: RateLimiter,
    /// The connection's receive rate (the link's measured capacity, see [`LinkMeter`]).
    meter: LinkMeter,
    /// Round trip of the protocol handshake (`ClientHello` -> `AgentHello`).
    rtt: Duration,
    /// Hash windows each disk runs ahead for that round trip ([`windows_ahead`]).
    ahead: usize,
}

#[derive(Debug, Clone)]
enum DeadReason {
    Frame(crate::wire::FrameError),
    Remote(ErrorCode, String),
    Lost(String),
}

impl Inner {
    fn dead_error(&self) -> Error {
        let reason = self
            .dead_err
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match reason {
            Some(DeadReason::Frame(source)) => Error::Frame {
                peer: self.peer.clone(),
                source,
            },
            Some(DeadReason::Remote(code, message)) => Error::Remote {
                peer: format!("agent {}", self.peer),
                code,
                message,
            },
            Some(DeadReason::Lost(reason)) => Error::ConnectionLost {
                peer: self.peer.clone(),
                reason,
            },
            None => Error::ConnectionLost {
                peer: self.peer.clone(),
                reason: self
                    .dead
                    .get()
                    .unwrap_or_else(|| "closed by the agent".into()),
            },
        }
    }
}

/// A connection to one agent. Cheap to keep open between delta rounds; after an error, drop it
/// and connect again.
pub struct Session {
    inner: Arc<Inner>,
    manifest: Vec<DiskInfo>,
    agent_software: String,
    agent_instance: Option<String>,
    reader: tokio::task::JoinHandle<()>,
    writer: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("agent", &self.inner.peer)
            .field("manifest", &self.manifest)
            .finish()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A certificate problem is [`Error::Untrusted`] (not retried), anything else a network error.
fn handshake_error(peer: &str, source: std::io::Error) -> Error {
    match failback_trust::tls_cause(&source) {
        Some(cause) => Error::Untrusted {
            peer: format!("agent {peer}"),
            cause,
        },
        None => Error::Handshake {
            peer: peer.to_owned(),
            source,
        },
    }
}

impl Session {
    /// Connects to the agent at `addr` (host:port), runs the TLS handshake (verifying the agent
    /// as [`AGENT_SERVER_NAME`] against the pinned CA), the protocol handshake, and reads the
    /// manifest.
    pub async fn connect(addr: &str, tls: &ClientTls) -> Result<Session> {
        Self::connect_with_version(addr, tls, PROTOCOL_VERSION).await
    }

    /// Like [`connect`](Self::connect) but announcing another protocol version (tests of the
    /// version-mismatch path only).
    #[doc(hidden)]
    pub async fn connect_with_version(
        addr: &str,
        tls: &ClientTls,
        version: u16,
    ) -> Result<Session> {
        let peer = addr.to_owned();
        let timeout = |what: &'static str| Error::Timeout {
            peer: peer.clone(),
            what,
            secs: CONNECT_TIMEOUT.as_secs(),
        };
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| timeout("TCP connect"))?
            .map_err(|source| Error::Connect {
                addr: peer.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let name = rustls::pki_types::ServerName::try_from(AGENT_SERVER_NAME)
            .map_err(|e| Error::Usage(format!("server name: {e}")))?;
        let stream = tokio::time::timeout(
            CONNECT_TIMEOUT,
            crate::record::connect(tcp, tls.config.clone(), name),
        )
        .await
        .map_err(|_| timeout("TLS handshake"))?
        .map_err(|source| handshake_error(&peer, source))?;
        let (r, w) = stream;
        let dead = DeadSlot::default();
        let (out, writer) = spawn_writer(w, dead.clone());
        let mut reader = FrameReader::new(r, peer.clone()).align_blocks();
        let hello_at = Instant::now();
        out.send(&Message::ClientHello { version }).await;

        let (agent_software, agent_instance) = match read_handshake(&mut reader, &peer).await? {
            Message::AgentHello {
                version: v,
                software,
                instance,
            } => {
                if v != version {
                    return Err(Error::VersionMismatch {
                        agent: v,
                        client: version,
                    });
                }
                (software, instance)
            }
            Message::Error { code, message, .. } => {
                return Err(Error::Remote {
                    peer: format!("agent {peer}"),
                    code,
                    message,
                })
            }
            other => {
                return Err(Error::Protocol {
                    peer,
                    message: format!("expected AgentHello, got {}", other.name()),
                })
            }
        };
        let rtt = hello_at.elapsed();
        let ahead = windows_ahead(rtt);
        tracing::debug!(
            "agent {peer}: round trip {:.1} ms, {ahead} hash windows ahead per disk",
            rtt.as_secs_f64() * 1000.0
        );
        let manifest = match read_handshake(&mut reader, &peer).await? {
            Message::Manifest { disks } => disks,
            other => {
                return Err(Error::Protocol {
                    peer,
                    message: format!("expected Manifest, got {}", other.name()),
                })
            }
        };

        let (control_tx, control_rx) = mpsc::channel(8);
        let inner = Arc::new(Inner {
            peer: peer.clone(),
            out,
            routes: Mutex::new(HashMap::new()),
            control: tokio::sync::Mutex::new(control_rx),
            dead,
            dead_err: Mutex::new(None),
            next_stream: AtomicU32::new(1),
            limiter: RateLimiter::default(),
            meter: LinkMeter::default(),
            rtt,
            ahead,
        });
        let reader = tokio::spawn(read_loop(reader, inner.clone(), control_tx));
        Ok(Session {
            inner,
            manifest,
            agent_software,
            agent_instance,
            reader,
            writer: Some(writer),
        })
    }

    /// The disks the agent serves.
    pub fn manifest(&self) -> &[DiskInfo] {
        &self.manifest
    }

    /// The agent's software version.
    pub fn agent_software(&self) -> &str {
        &self.agent_software
    }

    /// The instance the agent is scoped to, if any.
    pub fn agent_instance(&self) -> Option<&str> {
        self.agent_instance.as_deref()
    }

    /// The agent address.
    pub fn peer(&self) -> &str {
        &self.inner.peer
    }

    /// Runs the agent's quiesce command; returns its output.
    pub async fn quiesce(&self) -> Result<String> {
        self.command(Message::Quiesce).await
    }

    /// Runs the agent's thaw command; returns its output.
    pub async fn thaw(&self) -> Result<String> {
        self.command(Message::Thaw).await
    }

    async fn command(&self, m: Message) -> Result<String> {
        let mut control = self.inner.control.lock().await;
        if !self.inner.out.send(&m).await {
            return Err(self.inner.dead_error());
        }
        match tokio::time::timeout(COMMAND_TIMEOUT, control.recv()).await {
            Err(_) => Err(Error::Timeout {
                peer: self.inner.peer.clone(),
                what: "quiesce/thaw result",
                secs: COMMAND_TIMEOUT.as_secs(),
            }),
            Ok(None) => Err(self.inner.dead_error()),
            Ok(Some(Message::CommandDone { message })) => Ok(message),
            Ok(Some(Message::Error { code, message, .. })) => Err(Error::Remote {
                peer: format!("agent {}", self.inner.peer),
                code,
                message,
            }),
            Ok(Some(other)) => Err(Error::Protocol {
                peer: self.inner.peer.clone(),
                message: format!("unexpected {} in reply to a command", other.name()),
            }),
        }
    }

    /// Checks mappings against the manifest: every remote disk exists, no local target twice.
    pub fn check_mappings(&self, mappings: &[Mapping]) -> Result<Vec<DiskInfo>> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for m in mappings {
            let Some(d) = self.manifest.iter().find(|d| d.id == m.remote) else {
                let ids: Vec<_> = self.manifest.iter().map(|d| d.id.as_str()).collect();
                return Err(Error::Usage(format!(
                    "agent {} serves no disk {:?} (it serves: {})",
                    self.inner.peer,
                    m.remote,
                    ids.join(", ")
                )));
            };
            if !seen.insert(m.local.clone()) {
                return Err(Error::Usage(format!(
                    "local target {} is mapped twice",
                    m.local.display()
                )));
            }
            out.push(d.clone());
        }
        Ok(out)
    }

    /// One sync round: every mapping in parallel. On error the first failure is returned and
    /// the other disks stop; targets keep what was written (the next round resumes), but the
    /// first MiB of an unfinished disk is not written.
    pub async fn sync(
        &self,
        mappings: &[Mapping],
        opts: &SyncOptions,
        progress: Arc<dyn Progress>,
    ) -> Result<SyncReport> {
        self.sync_cached(mappings, opts, progress, &Arc::new(HashCache::default()))
            .await
    }

    /// Like [`sync`](Self::sync), keeping the hashes of what was written in `cache`: a disk
    /// whose hashes `cache` holds is not read again, and with an agent that tracks changes
    /// only the changed blocks travel (see [`crate::cbt`]).
    pub async fn sync_cached(
        &self,
        mappings: &[Mapping],
        opts: &SyncOptions,
        progress: Arc<dyn Progress>,
        cache: &Arc<HashCache>,
    ) -> Result<SyncReport> {
        block::validate_block_size(opts.block_size).map_err(Error::Usage)?;
        let disks = self.check_mappings(mappings)?;
        if let Some(reason) = self.inner.dead.get() {
            return Err(Error::ConnectionLost {
                peer: self.inner.peer.clone(),
                reason,
            });
        }
        self.inner.limiter.set(opts.bandwidth_limit_mbps);
        let started = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for (i, (m, d)) in mappings.iter().zip(disks).enumerate() {
            let stream = self.inner.next_stream.fetch_add(1, Ordering::Relaxed);
            let job = DiskJob {
                inner: self.inner.clone(),
                stream,
                disk: d,
                local: m.local.clone(),
                opts: opts.clone(),
                progress: progress.clone(),
                cache: cache.clone(),
                tally: Mutex::default(),
            };
            set.spawn(async move { (i, job.run().await) });
        }
        let mut reports: Vec<Option<DiskReport>> = vec![None; mappings.len()];
        // After a network error the other disks end on their own (the connection is gone):
        // each keeps what it verified and wrote for a resume, which an abort would lose.
        let mut lost: Option<Error> = None;
        while let Some(joined) = set.join_next().await {
            let (i, res) = joined.map_err(|e| Error::Usage(format!("sync task failed: {e}")))?;
            match res {
                Ok(r) => reports[i] = Some(r),
                Err(e) if e.is_retryable() => {
                    lost.get_or_insert(e);
                }
                Err(e) => {
                    set.abort_all();
                    return Err(e);
                }
            }
        }
        if let Some(e) = lost {
            return Err(e);
        }
        Ok(SyncReport {
            agent: self.inner.peer.clone(),
            disks: reports.into_iter().flatten().collect(),
            duration_secs: started.elapsed().as_secs_f64(),
        })
    }

    /// Closes the connection cleanly.
    pub async fn close(mut self) {
        self.reader.abort();
        let writer = self.writer.take();
        drop(self);
        if let Some(w) = writer {
            let _ = tokio::time::timeout(Duration::from_secs(5), w).await;
        }
    }
}

/// Reads one handshake message. In TLS 1.3 the agent checks our certificate after our side of
/// the handshake is done, so a refused certificate shows up here as an alert.
async fn read_handshake<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    peer: &str,
) -> Result<Message> {
    match tokio::time::timeout(CONNECT_TIMEOUT, reader.read()).await {
        Err(_) => Err(Error::Timeout {
            peer: peer.to_owned(),
            what: "hello",
            secs: CONNECT_TIMEOUT.as_secs(),
        }),
        Ok(Err(Error::ConnectionLost { peer, reason })) if refused_certificate(&reason) => {
            Err(Error::Untrusted {
                peer: format!("agent {peer}"),
                cause: failback_trust::TlsCause::PeerRefused(format!(
                    "{reason}; is the client certificate from the agent's CA and for its instance?"
                )),
            })
        }
        Ok(Err(Error::ConnectionLost { peer, reason })) => Err(Error::Handshake {
            peer,
            source: std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                format!("agent refused the connection: {reason} (is the client certificate signed by the agent's CA?)"),
            ),
        }),
        Ok(Err(e)) => Err(e),
        Ok(Ok(None)) => Err(Error::ConnectionLost {
            peer: peer.to_owned(),
            reason: "agent closed the connection during the handshake".into(),
        }),
        Ok(Ok(Some((m, _)))) => Ok(m),
    }
}

/// Whether a lost handshake is the agent's TLS alert refusing our certificate (the record
/// layer reports alerts as text).
fn refused_certificate(reason: &str) -> bool {
    const ALERTS: [&str; 7] = [
        "BadCertificate",
        "UnknownCA",
        "CertificateUnknown",
        "CertificateRequired",
        "CertificateRevoked",
        "CertificateExpired",
        "AccessDenied",
    ];
    reason.contains("alert") && ALERTS.iter().any(|a| reason.contains(a))
}

fn stream_of(m: &Message) -> Option<u32> {
    match m {
        Message::Blocks { stream, .. }
        | Message::WindowDone { stream, .. }
        | Message::SyncDone { stream, .. }
        | Message::SyncPlan { stream, .. }
        | Message::ChangesDone { stream, .. } => Some(*stream),
        Message::Error { stream, .. } if *stream != CONNECTION_STREAM => Some(*stream),
        _ => None,
    }
}

async fn read_loop<R: tokio::io::AsyncRead + Unpin>(
    mut reader: FrameReader<R>,
    inner: Arc<Inner>,
    control: mpsc::Sender<Message>,
) {
    let reason = loop {
        let (msg, len) = match reader.read().await {
            Ok(Some(x)) => x,
            Ok(None) => break DeadReason::Lost("agent closed the connection".into()),
            Err(Error::Frame { source, .. }) => break DeadReason::Frame(source),
            Err(Error::ConnectionLost { reason, .. }) => break DeadReason::Lost(reason),
            Err(e) => break DeadReason::Lost(e.to_string()),
        };
        inner.meter.add(len);
        if let Some(d) = inner.limiter.delay_for(len) {
            tokio::time::sleep(d).await;
        }
        if let Some(stream) = stream_of(&msg) {
            let route = inner
                .routes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&stream)
                .cloned();
            match route {
                Some(tx) => {
                    let _ = tx.send((msg, len)).await;
                }
                None => tracing::debug!("dropping {} for finished stream {stream}", msg.name()),
            }
            continue;
        }
        match msg {
            Message::CommandDone { .. } => {
                let _ = control.send(msg).await;
            }
            Message::Error { code, message, .. } => {
                if code == ErrorCode::CommandFailed {
                    let _ = control
                        .send(Message::Error {
                            stream: CONNECTION_STREAM,
                            code,
                            message,
                        })
                        .await;
                } else {
                    break DeadReason::Remote(code, message);
                }
            }
            other => {
                break DeadReason::Frame(crate::wire::FrameError::Malformed(format!(
                    "unexpected {} from agent",
                    other.name()
                )))
            }
        }
    };
    tracing::debug!("agent connection ended: {reason:?}");
    let text = match &reason {
        DeadReason::Frame(e) => e.to_string(),
        DeadReason::Remote(c, m) => format!("{c}: {m}"),
        DeadReason::Lost(s) => s.clone(),
    };
    *inner.dead_err.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
    inner.dead.set(text);
    inner
        .routes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
}

struct DiskJob {
    inner: Arc<Inner>,
    stream: u32,
    disk: DiskInfo,
    local: PathBuf,
    opts: SyncOptions,
    progress: Arc<dyn Progress>,
    cache: Arc<HashCache>,
    /// What this disk's stream received (see [`WireTally`]).
    tally: Mutex<WireTally>,
}

/// What a disk job carries into its round, whichever kind it is.
struct Round {
    started: Instant,
    wire_bytes: u64,
    zeros: Arc<ZeroHashes>,
    direct: bool,
    /// `None` until the agent's `SyncPlan` arrived (a hash compare reads it with the answers).
    plan: Option<Planned>,
    target_read: bool,
}

/// The agent's `SyncPlan`, as the client uses it.
struct Planned {
    changes: bool,
    token: Option<Token>,
    backlog_bytes: u64,
    lag_secs: Option<f64>,
    note: String,
}

struct Window {
    hashes: Vec<Hash>,
    received: Vec<bool>,
    arrived: u32,
    verified: u32,
    done: Option<u32>,
}

/// Removes the stream's route when the job ends, however it ends.
struct RouteGuard(Arc<Inner>, u32);
impl Drop for RouteGuard {
    fn drop(&mut self) {
        self.0
            .routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.1);
    }
}

impl DiskJob {
    fn tally(&self) -> std::sync::MutexGuard<'_, WireTally> {
        self.tally.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The round's wire figures; `wire_bytes` counts both directions.
    fn wire_report(&self, wire_bytes: u64, started: Instant) -> WireReport {
        let t = self.tally();
        let sent = wire_bytes.saturating_sub(t.received());
        let link = self.inner.meter.best();
        let mut r = t.report(self.opts.compression, sent, started.elapsed(), link);
        r.rtt_ms = Some(self.inner.rtt.as_secs_f64() * 1000.0);
        r.windows_ahead = u32::try_from(self.inner.ahead).unwrap_or(u32::MAX);
        r
    }

    /// Counts one more failed verification of `b`; past `max_block_retries` the block is given
    /// up with an error naming the disk, the local path and the offset. Returns the count.
    fn count_failure(&self, attempts: &mut HashMap<u64, u32>, b: &block::BadBlock) -> Result<u32> {
        let n = attempts.entry(b.block).or_insert(0);
        *n += 1;
        if *n > self.opts.max_block_retries {
            return Err(Error::Verification {
                disk: self.disk.id.clone(),
                path: self.local.clone(),
                block: b.block,
                offset: b.block * u64::from(self.opts.block_size),
                attempts: *n,
                reason: b.reason.clone(),
            });
        }
        Ok(*n)
    }

    fn protocol(&self, message: String) -> Error {
        Error::Protocol {
            peer: format!("agent {}", self.inner.peer),
            message,
        }
    }

    /// Waits for the agent's `SyncPlan` (the first answer to `SyncStart`).
    async fn read_plan(
        &self,
        rx: &mut mpsc::Receiver<(Message, usize)>,
        wire_bytes: &mut u64,
    ) -> Result<Planned> {
        let (msg, len) = match tokio::time::timeout(IDLE_TIMEOUT, rx.recv()).await {
            Err(_) => {
                return Err(Error::Timeout {
                    peer: self.inner.peer.clone(),
                    what: "the round's plan",
                    secs: IDLE_TIMEOUT.as_secs(),
                })
            }
            Ok(None) => return Err(self.inner.dead_error()),
            Ok(Some(x)) => x,
        };
        *wire_bytes += len as u64;
        self.tally().frame(len);
        self.planned(msg)
    }

    /// The client's view of the agent's `SyncPlan` (an `Error` or anything else fails).
    fn planned(&self, msg: Message) -> Result<Planned> {
        let id = &self.disk.id;
        match msg {
            Message::SyncPlan {
                changes,
                token,
                dirty_bytes,
                lag_ms,
                note,
                ..
            } => {
                tracing::info!(disk = %id, changes, dirty_bytes, "round plan; tracking: {note}");
                self.progress.disk_planned(
                    id,
                    &crate::progress::RoundPlan {
                        changes,
                        backlog_bytes: dirty_bytes,
                        lag_secs: lag_ms.map(|ms| ms as f64 / 1000.0),
                        tracking: note.clone(),
                    },
                );
                Ok(Planned {
                    changes,
                    token,
                    backlog_bytes: dirty_bytes,
                    lag_secs: lag_ms.map(|ms| ms as f64 / 1000.0),
                    note,
                })
            }
            Message::Error { code, message, .. } => Err(Error::Remote {
                peer: format!("agent {}", self.inner.peer),
                code,
                message,
            }),
            other => Err(self.protocol(format!(
                "expected SyncPlan for disk {id}, got {}",
                other.name()
            ))),
        }
    }

    /// Keeps the hashes of a finished round for the next one.
    fn keep(&self, hashes: Vec<Hash>, token: Option<Token>) {
        if hashes.len() as u64 != block::block_count(self.disk.size, self.opts.block_size) {
            return;
        }
        self.cache.put(
            self.local.clone(),
            DiskCache {
                remote: self.disk.id.clone(),
                size: self.disk.size,
                block_size: self.opts.block_size,
                hashes,
                token,
            },
        );
    }

    /// A changes round: the agent sends only the blocks its tracker saw change, then
    /// `ChangesDone`; each is verified, written and its cached hash updated; then the digests
    /// over all cached hashes must match.
    async fn changes_round(
        &self,
        mut rx: mpsc::Receiver<(Message, usize)>,
        mut writer: WriterGuard,
        mut hashes: Vec<Hash>,
        round: Round,
    ) -> Result<DiskReport> {
        let Round {
            started,
            mut wire_bytes,
            zeros,
            direct,
            plan,
            target_read,
        } = round;
        let plan = plan.ok_or_else(|| {
            self.protocol(format!(
                "changes round of disk {} without a plan",
                self.disk.id
            ))
        })?;
        let (id, size, bs) = (self.disk.id.clone(), self.disk.size, self.opts.block_size);
        let bs64 = u64::from(bs);
        let nblocks = block::block_count(size, bs);
        let mut received: HashSet<u64> = HashSet::new();
        let mut pending: HashSet<u64> = HashSet::new();
        let mut attempts: HashMap<u64, u32> = HashMap::new();
        let (mut expected, mut sent_end) = (None::<u64>, false);
        let (mut bytes_differing, mut bytes_fetched, mut refetched) = (0u64, 0u64, 0u64);
        let agent_digest = loop {
            let (msg, len) = match tokio::time::timeout(IDLE_TIMEOUT, rx.recv()).await {
                Err(_) => {
                    return Err(Error::Timeout {
                        peer: self.inner.peer.clone(),
                        what: "changed blocks",
                        secs: IDLE_TIMEOUT.as_secs(),
                    })
                }
                Ok(None) => return Err(self.inner.dead_error()),
                Ok(Some(x)) => x,
            };
            wire_bytes += len as u64;
            self.tally().frame(len);
            match msg {
                Message::Blocks {
                    first_block,
                    blocks,
                    ..
                } => {
                    self.tally().blocks(first_block, &blocks, size, bs);
                    let n = blocks.len() as u64;
                    for idx in first_block..first_block.saturating_add(n) {
                        if idx >= nblocks || (received.contains(&idx) && !pending.contains(&idx)) {
                            return Err(self.protocol(format!(
                                "agent sent block {idx} (offset {}) of disk {id} out of range or \
                                 twice in a changes round; nothing of it was written",
                                idx.saturating_mul(bs64)
                            )));
                        }
                    }
                    bytes_fetched += blocks.iter().map(|b| b.payload.len() as u64).sum::<u64>();
                    let bad = self
                        .verify_and_write(
                            first_block,
                            blocks,
                            &zeros,
                            direct,
                            &mut writer,
                            |idx, h| {
                                if let Some(slot) =
                                    hashes.get_mut(usize::try_from(idx).unwrap_or(usize::MAX))
                                {
                                    *slot = h;
                                }
                                pending.remove(&idx);
                                if received.insert(idx) {
                                    bytes_differing += block::block_len(size, bs, idx);
                                }
                            },
                        )
                        .await?;
                    for b in bad {
                        self.count_failure(&mut attempts, &b)?;
                        refetched += 1;
                        received.insert(b.block);
                        pending.insert(b.block);
                        let m = Message::Refetch {
                            stream: self.stream,
                            first_block: b.block,
                            count: 1,
                        };
                        let f = m.encode();
                        wire_bytes += f.len() as u64;
                        if !self.inner.out.send_raw(f).await {
                            return Err(self.inner.dead_error());
                        }
                    }
                }
                Message::ChangesDone { blocks, .. } if expected.is_none() => {
                    expected = Some(blocks)
                }
                Message::SyncDone { blocks, digest, .. } => {
                    if !sent_end || blocks != nblocks {
                        return Err(self.protocol(format!("premature SyncDone for disk {id}")));
                    }
                    break digest;
                }
                Message::Error { code, message, .. } => {
                    return Err(Error::Remote {
                        peer: format!("agent {}", self.inner.peer),
                        code,
                        message,
                    })
                }
                other => {
                    return Err(self.protocol(format!(
                        "unexpected {} for disk {id} in a changes round",
                        other.name()
                    )))
                }
            }
            if expected == Some(received.len() as u64) && pending.is_empty() && !sent_end {
                sent_end = true;
                let f = Message::SyncEnd {
                    stream: self.stream,
                }
                .encode();
                wire_bytes += f.len() as u64;
                if !self.inner.out.send_raw(f).await {
                    return Err(self.inner.dead_error());
                }
            } else if expected.is_some_and(|e| (received.len() as u64) > e) {
                return Err(self.protocol(format!(
                    "agent sent more changed blocks of disk {id} than it announced"
                )));
            }
        };
        let local = tokio::task::spawn_blocking(move || {
            let mut d = DiskDigest::new();
            for h in &hashes {
                d.push(h);
            }
            (d.finish(), hashes)
        })
        .await
        .map_err(|e| Error::Usage(format!("digest task: {e}")))?;
        let (local, hashes) = local;
        if local != agent_digest {
            return Err(Error::DigestMismatch {
                disk: id,
                path: self.local.clone(),
                local: hex::encode(local),
                agent: hex::encode(agent_digest),
            });
        }
        writer.commit().await?;
        self.keep(hashes, plan.token);
        let blocks_differing = received.len() as u64;
        self.progress.disk_advanced(&id, size, 0);
        let report = DiskReport {
            remote_id: id.clone(),
            local_path: self.local.clone(),
            size,
            block_size: bs,
            blocks_total: nblocks,
            blocks_differing,
            bytes_differing,
            bytes_fetched,
            bytes_on_wire: wire_bytes,
            blocks_refetched: refetched,
            digest: Some(hex::encode(local)),
            agent_digest: hex::encode(agent_digest),
            estimate_only: false,
            duration_secs: started.elapsed().as_secs_f64(),
            round_kind: "changes".into(),
            tracking: plan.note,
            target_read,
            resumed_at: 0,
            backlog_bytes: plan.backlog_bytes,
            lag_secs: plan.lag_secs,
            wire: self.wire_report(wire_bytes, started),
        };
        self.progress.disk_finished(&id, &report);
        Ok(report)
    }

    /// Verifies a run of received blocks, hands the good ones to the writer (calling `good`
    /// with each block's index and hash) and returns the bad ones.
    async fn verify_and_write(
        &self,
        first_block: u64,
        blocks: Vec<WireBlock>,
        zeros: &Arc<ZeroHashes>,
        direct: bool,
        writer: &mut WriterGuard,
        mut good: impl FnMut(u64, Hash),
    ) -> Result<Vec<block::BadBlock>> {
        let (size, bs) = (self.disk.size, self.opts.block_size);
        let z = zeros.clone();
        let (runs, bad) = tokio::task::spawn_blocking(move || {
            block::verify_run(first_block, blocks, size, bs, &z, direct)
        })
        .await
        .map_err(|e| Error::Usage(format!("verify task: {e}")))?;
        for run in runs {
            let mut fetched = 0u64;
            for (k, h) in run.hashes().iter().enumerate() {
                let idx = run.first_block() + k as u64;
                good(idx, *h);
                fetched += block::block_len(size, bs, idx);
            }
            self.progress.disk_advanced(&self.disk.id, 0, fetched);
            if let Some(tx) = writer.sender() {
                if tx.send(Some(run)).await.is_err() {
                    break; // the writer stopped on an I/O error; its result says why
                }
            }
        }
        Ok(bad)
    }

    async fn run(self) -> Result<DiskReport> {
        let started = Instant::now();
        let size = self.disk.size;
        let bs = self.opts.block_size;
        let bs64 = u64::from(bs);
        let nblocks = block::block_count(size, bs);
        let estimate = self.opts.estimate_only;
        let id = self.disk.id.clone();

        let local = self.local.clone();
        let target = tokio::task::spawn_blocking(move || Target::open(&local, size, !estimate))
            .await
            .map_err(|e| Error::Usage(format!("open task: {e}")))??;
        let target = Arc::new(target);

        // Bounded: each queued message may be a multi-MiB Blocks frame (memory of the appliance;
        // 8 here and 4 runs for the writer keep a fast full sync near 100 MiB at the same speed).
        let (route_tx, mut rx) = mpsc::channel(8);
        {
            let mut routes = self.inner.routes.lock().unwrap_or_else(|p| p.into_inner());
            // The reader marks the connection dead before it drops the routes: a route added
            // after that would never be served (the job would wait out IDLE_TIMEOUT).
            if self.inner.dead.get().is_some() {
                return Err(self.inner.dead_error());
            }
            routes.insert(self.stream, route_tx);
        }
        let _guard = RouteGuard(self.inner.clone(), self.stream);
        let mut wire_bytes = 0u64;
        let send = |m: Message, wire_bytes: &mut u64| {
            let f = m.encode();
            *wire_bytes += f.len() as u64;
            let out = self.inner.out.clone();
            async move { out.send_raw(f).await }
        };
        let cached = if estimate {
            None
        } else {
            self.cache
                .take(&self.local)
                .filter(|c| c.remote == id && c.size == size && c.block_size == bs)
        };
        // An interrupted round of this disk: continue it (protocol 5) or, if the agent
        // refuses, start over (`resume` sent `SyncStart` then).
        let mut resumed = None;
        let partial = self.take_partial();
        let started_already = partial.is_some();
        if let Some(p) = partial {
            let tried = self.resume(&p, &mut rx, &mut wire_bytes).await?;
            resumed = tried.map(|plan| (p, plan));
        }
        let cached = if started_already { None } else { cached };
        if started_already {
            // SyncResume (or, refused, SyncStart) went out already.
        } else if !send(
            Message::SyncStart {
                stream: self.stream,
                disk: id.clone(),
                block_size: bs,
                estimate,
                changes_since: cached.as_ref().and_then(|c| c.token),
                compression: self.opts.compression,
            },
            &mut wire_bytes,
        )
        .await
        {
            return Err(self.inner.dead_error());
        }
        self.progress.disk_started(&id, size);
        // Only a client holding hashes (and a token) can be offered a changes round: without
        // them the round is a hash compare whatever the plan says, so the first hash windows
        // go out at once and the plan is read with the answers (one round trip less).
        let (plan, mut resumed) = match (resumed, &cached) {
            (Some((p, plan)), _) => (Some(plan), Some(p)),
            (None, Some(_)) => (Some(self.read_plan(&mut rx, &mut wire_bytes).await?), None),
            (None, None) => (None, None),
        };
        let changes = plan.as_ref().is_some_and(|p| p.changes);
        let start_block = resumed.as_ref().map_or(0, |p| p.start_block());

        // Hashing threads: local target -> windows of hashes, in disk order.
        let window_blocks = (WINDOW_BYTES / bs64).max(1);
        let threads = self.opts.hash_threads.unwrap_or_else(default_hash_threads);
        let zeros = Arc::new(ZeroHashes::new(size, bs));
        // A resumed round compares with the cached hashes the interrupted one used, if any.
        let rest = resumed.as_mut().and_then(|p| p.rest.take());
        let target_read = cached.is_none() && rest.is_none();
        let (mut local_hashes, changes_hashes) = match cached {
            Some(c) if changes => (None, Some(c.hashes)),
            Some(c) => (
                Some(HashSource::Cache {
                    hashes: c.hashes,
                    next: 0,
                    window: usize::try_from(window_blocks).unwrap_or(usize::MAX),
                }),
                None,
            ),
            None => match rest {
                Some(hashes) => (
                    Some(HashSource::Cache {
                        hashes,
                        next: usize::try_from(start_block).unwrap_or(usize::MAX),
                        window: usize::try_from(window_blocks).unwrap_or(usize::MAX),
                    }),
                    None,
                ),
                None => (
                    Some(HashSource::Disk(LocalHashes::spawn_from(
                        target.clone(),
                        (size, bs),
                        window_blocks,
                        zeros.clone(),
                        (threads, (self.inner.ahead + threads) as u64),
                        start_block,
                    )?)),
                    None,
                ),
            },
        };

        // Writer thread: verified runs -> disk; head last.
        // `None` = commit: only then is the held-back head written. If the job fails, the
        // channel just closes and the head stays unwritten.
        let (wtx, mut wrx) = mpsc::channel::<Option<VerifiedRun>>(4);
        let mut direct = false;
        let handle = if estimate {
            None
        } else {
            let mut w = target.writer()?;
            direct = w.is_direct();
            if let Some(p) = resumed.as_mut() {
                w.hold_head(std::mem::take(&mut p.head));
            }
            let h = std::thread::Builder::new()
                .name("failback-writer".into())
                // Stopped without a commit: the held-back head goes back (for a resume).
                .spawn(move || -> WriterEnd {
                    while let Some(msg) = wrx.blocking_recv() {
                        match msg {
                            Some(run) => w.write(run)?,
                            None => return w.finish().map(|n| (Some(n), Head::new())),
                        }
                    }
                    Ok((None, w.take_head()))
                })
                .map_err(|source| Error::LocalIo {
                    op: "start writer for",
                    path: self.local.clone(),
                    offset: 0,
                    source,
                })?;
            Some(h)
        };
        let mut writer = WriterGuard {
            tx: Some(wtx),
            handle,
        };
        let round = Round {
            started,
            wire_bytes,
            zeros: zeros.clone(),
            direct,
            plan,
            target_read,
        };
        let mut local_hashes = match local_hashes.take() {
            Some(l) => l,
            None => {
                let hashes = changes_hashes.unwrap_or_default();
                return self.changes_round(rx, writer, hashes, round).await;
            }
        };
        let Round {
            mut wire_bytes,
            mut plan,
            ..
        } = round;
        // A resumed round holds the hashes of its prefix (none after a reboot: then its first
        // MiB, held back and lost, is fetched again); windows continue at `start_block`.
        let refetch_head = resumed.as_ref().is_some_and(|p| p.refetch_head);
        let base = if refetch_head { start_block } else { 0 };
        let mut new_hashes: Vec<Hash> = resumed.map(|p| p.prefix).unwrap_or_default();
        if start_block > 0 {
            self.progress
                .disk_advanced(&id, (start_block * bs64).min(size), 0);
        }

        let mut windows: BTreeMap<u64, Window> = BTreeMap::new();
        let mut pending: HashSet<u64> = HashSet::new();
        let mut attempts: HashMap<u64, u32> = HashMap::new();
        let mut digest = DiskDigest::new();
        let mut hashing_done = false;
        let mut sent_end = false;
        let mut blocks_differing = 0u64;
        let mut bytes_differing = 0u64;
        let mut bytes_fetched = 0u64;
        let mut refetched = 0u64;
        let mut theirs_digest: Option<Hash> = None;
        if refetch_head {
            let n = crate::writer::HEAD_BYTES.div_ceil(bs64).min(start_block);
            pending.extend(0..n);
            let m = Message::Refetch {
                stream: self.stream,
                first_block: 0,
                count: u32::try_from(n).unwrap_or(u32::MAX),
            };
            if !send(m, &mut wire_bytes).await {
                return Err(self.inner.dead_error());
            }
        }

        // Any error leaves the loop here; a network error keeps the verified prefix.
        let looped = async {
        let agent_digest: Hash;
        loop {
            tokio::select! {
                w = local_hashes.next(), if !hashing_done && local_hashes.may_take(windows.len(), self.inner.ahead) => match w {
                    Some(Ok((first, hashes))) => {
                        let count = hashes.len();
                        windows.insert(first, Window {
                            hashes: hashes.clone(),
                            received: vec![false; count],
                            arrived: 0,
                            verified: 0,
                            done: None,
                        });
                        if !send(Message::Hashes { stream: self.stream, first_block: first, hashes }, &mut wire_bytes).await {
                            return Err(self.inner.dead_error());
                        }
                    }
                    Some(Err(e)) => return Err(e),
                    None => hashing_done = true,
                },
                m = tokio::time::timeout(IDLE_TIMEOUT, rx.recv()) => {
                    let (msg, len) = match m {
                        Err(_) => return Err(Error::Timeout { peer: self.inner.peer.clone(), what: "blocks", secs: IDLE_TIMEOUT.as_secs() }),
                        Ok(None) => return Err(self.inner.dead_error()),
                        Ok(Some(x)) => x,
                    };
                    wire_bytes += len as u64;
                    self.tally().frame(len);
                    match msg {
                        m @ Message::SyncPlan { .. } if plan.is_none() => {
                            let p = self.planned(m)?;
                            if p.changes {
                                return Err(self.protocol(format!(
                                    "agent answered a hash-compare request for disk {id} with a changes round"
                                )));
                            }
                            plan = Some(p);
                        }
                        Message::Blocks { first_block, blocks, .. } => {
                            if estimate {
                                return Err(self.protocol(format!("agent sent blocks of disk {id} while only estimating")));
                            }
                            // Every block must have been asked for: in an open window and not
                            // yet received, or awaiting a refetch.
                            for i in 0..blocks.len() as u64 {
                                let idx = first_block.checked_add(i).ok_or_else(|| self.protocol("block index overflow".into()))?;
                                let asked = pending.contains(&idx) || match windows.range(..=idx).next_back() {
                                    Some((&wf, w)) => idx - wf < w.received.len() as u64
                                        && w.done.is_none()
                                        && !w.received[usize::try_from(idx - wf).unwrap_or(usize::MAX)]
                                        && !attempts.contains_key(&idx),
                                    None => false,
                                };
                                if !asked {
                                    // Saturating: the index is the agent's and may be near 2^64.
                                    return Err(self.protocol(format!(
                                        "agent sent block {idx} (offset {}) of disk {id}, which was not asked for; nothing of it was written",
                                        idx.saturating_mul(bs64)
                                    )));
                                }
                            }
                            let payload: u64 = blocks.iter().map(|b| b.payload.len() as u64).sum();
                            self.tally().blocks(first_block, &blocks, size, bs);
                            let count = blocks.len() as u64;
                            for i in 0..count {
                                let idx = first_block + i;
                                if !pending.contains(&idx) {
                                    if let Some((_, w)) = windows.range_mut(..=idx).next_back() {
                                        w.arrived += 1;
                                    }
                                }
                            }
                            let z = zeros.clone();
                            let (runs, bad) = tokio::task::spawn_blocking(move || block::verify_run(first_block, blocks, size, bs, &z, direct))
                                .await
                                .map_err(|e| Error::Usage(format!("verify task: {e}")))?;
                            bytes_fetched += payload;
                            for run in runs {
                                let mut fetched = 0u64;
                                for (k, h) in run.hashes().iter().enumerate() {
                                    let idx = run.first_block() + k as u64;
                                    pending.remove(&idx);
                                    if let Some((&wf, w)) = windows.range_mut(..=idx).next_back() {
                                        let j = usize::try_from(idx - wf).unwrap_or(usize::MAX);
                                        if !w.received[j] {
                                            w.received[j] = true;
                                            w.verified += 1;
                                        }
                                        w.hashes[j] = *h;
                                    }
                                    fetched += block::block_len(size, bs, idx);
                                }
                                self.progress.disk_advanced(&id, 0, fetched);
                                if let Some(tx) = writer.sender() {
                                    if tx.send(Some(run)).await.is_err() {
                                        // The writer stopped on an I/O error; its result says why.
                                        break;
                                    }
                                }
                            }
                            for b in bad {
                                let n = self.count_failure(&mut attempts, &b)?;
                                refetched += 1;
                                tracing::warn!(disk = %id, block = b.block, "block failed verification ({}); fetching it again", b.reason);
                                self.progress.message(&format!(
                                    "disk {id}: block {} (offset {}) failed verification ({}); fetching it again (attempt {})",
                                    b.block, b.block * bs64, b.reason, n + 1
                                ));
                                pending.insert(b.block);
                                if !send(Message::Refetch { stream: self.stream, first_block: b.block, count: 1 }, &mut wire_bytes).await {
                                    return Err(self.inner.dead_error());
                                }
                            }
                        }
                        Message::WindowDone { first_block, count, differing, differing_bytes, .. } => {
                            let Some(w) = windows.get_mut(&first_block) else {
                                return Err(self.protocol(format!("WindowDone for unknown window at block {first_block} of disk {id}")));
                            };
                            if w.done.is_some() || w.hashes.len() as u64 != u64::from(count) {
                                return Err(self.protocol(format!("bad WindowDone for window at block {first_block} of disk {id}")));
                            }
                            let expect_arrived = if estimate { 0 } else { differing };
                            if w.arrived != expect_arrived {
                                return Err(self.protocol(format!(
                                    "agent announced {differing} differing blocks in window at block {first_block} of disk {id} but sent {}",
                                    w.arrived
                                )));
                            }
                            w.done = Some(differing);
                            blocks_differing += u64::from(differing);
                            bytes_differing += differing_bytes;
                        }
                        // Sent after the last window (protocol 4), or on SyncEnd for an empty disk;
                        // the round ends once every window is also retired.
                        Message::SyncDone { blocks, digest: theirs, .. } => {
                            // (A resumed round's digest covers its blocks from `start_block`.)
                            if theirs_digest.is_some() || blocks != nblocks - start_block {
                                return Err(self.protocol(format!("premature SyncDone for disk {id}")));
                            }
                            theirs_digest = Some(theirs);
                        }
                        Message::Error { code, message, .. } => {
                            return Err(Error::Remote { peer: format!("agent {}", self.inner.peer), code, message });
                        }
                        other => return Err(self.protocol(format!("unexpected {} for disk {id}", other.name()))),
                    }
                }
            }

            // Retire complete windows in disk order.
            while let Some(entry) = windows.first_entry() {
                let w = entry.get();
                let complete = match w.done {
                    Some(d) => estimate || w.verified == d,
                    None => false,
                };
                if !complete {
                    break;
                }
                let first = *entry.key();
                let w = entry.remove();
                for h in &w.hashes {
                    digest.push(h);
                }
                if !estimate {
                    new_hashes.extend_from_slice(&w.hashes);
                }
                local_hashes.retired();
                let end = ((first + w.hashes.len() as u64) * bs64).min(size);
                self.progress.disk_advanced(&id, end - first * bs64, 0);
            }
            if hashing_done && windows.is_empty() && pending.is_empty() {
                if !sent_end {
                    sent_end = true;
                    let end = Message::SyncEnd {
                        stream: self.stream,
                    };
                    if !send(end, &mut wire_bytes).await {
                        return Err(self.inner.dead_error());
                    }
                }
                if let Some(d) = theirs_digest {
                    agent_digest = d;
                    break;
                }
            }
        }
        Ok::<Hash, Error>(agent_digest)
        }
        .await;
        let agent_digest = match looped {
            Ok(d) => d,
            Err(e) => {
                if e.is_retryable() && !estimate {
                    let i = partial::Interrupted {
                        base,
                        retired: new_hashes,
                        window_blocks,
                        cut: plan.as_ref().and_then(|p| p.token),
                        rest: local_hashes.into_cached(),
                    };
                    self.keep_partial(&mut writer, i).await;
                }
                return Err(e);
            }
        };

        let plan =
            plan.ok_or_else(|| self.protocol(format!("agent finished disk {id} without a plan")))?;
        let agent_hex = hex::encode(agent_digest);
        let local_digest = (!estimate).then(|| digest.finish());
        if let Some(local) = local_digest {
            if local != agent_digest {
                // Not committed (the guard only drains): the head stays unwritten.
                return Err(Error::DigestMismatch {
                    disk: id,
                    path: self.local.clone(),
                    local: hex::encode(local),
                    agent: agent_hex,
                });
            }
        }
        writer.commit().await?;
        if !estimate {
            self.keep(new_hashes, plan.token);
        }
        let report = DiskReport {
            remote_id: id.clone(),
            local_path: self.local.clone(),
            size,
            block_size: bs,
            blocks_total: nblocks,
            blocks_differing,
            bytes_differing,
            bytes_fetched,
            bytes_on_wire: wire_bytes,
            blocks_refetched: refetched,
            digest: local_digest.map(hex::encode),
            agent_digest: agent_hex,
            estimate_only: estimate,
            duration_secs: started.elapsed().as_secs_f64(),
            round_kind: if estimate { "estimate" } else { "compare" }.into(),
            tracking: plan.note,
            target_read,
            resumed_at: start_block * bs64,
            backlog_bytes: plan.backlog_bytes,
            lag_secs: plan.lag_secs,
            wire: self.wire_report(wire_bytes, started),
        };
        self.progress.disk_finished(&id, &report);
        Ok(report)
    }
}

/// Owns a disk's writer thread. `commit` writes the held-back head and syncs; dropping it
/// without commit (error, abort) only lets queued verified runs drain and waits for the thread,
/// so no write is in flight once a sync has returned.
struct WriterGuard {
    tx: Option<mpsc::Sender<Option<VerifiedRun>>>,
    handle: Option<std::thread::JoinHandle<WriterEnd>>,
}

/// What the writer thread returns: the bytes written on a commit, or (stopped without one)
/// the held-back head.
type WriterEnd = Result<(Option<u64>, Head)>;

impl WriterGuard {
    fn sender(&self) -> Option<&mpsc::Sender<Option<VerifiedRun>>> {
        self.handle.as_ref().and(self.tx.as_ref())
    }

    async fn commit(&mut self) -> Result<()> {
        let (Some(tx), Some(h)) = (self.tx.take(), self.handle.take()) else {
            return Ok(());
        };
        let _ = tx.send(None).await;
        drop(tx);
        tokio::task::spawn_blocking(move || h.join())
            .await
            .map_err(|e| Error::Usage(format!("writer task: {e}")))?
            .map_err(|_| Error::Usage("writer thread panicked".into()))??;
        Ok(())
    }
}

impl WriterGuard {
    /// Stops without a commit: lets the queued runs drain, waits for the thread and returns
    /// the held-back head (`None` when the writer failed or was never started).
    async fn stop(&mut self) -> Option<Head> {
        self.tx.take();
        let h = self.handle.take()?;
        match tokio::task::spawn_blocking(move || h.join()).await {
            Ok(Ok(Ok((None, head)))) => Some(head),
            _ => None,
        }
    }
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Windows ahead cover 8 GiB/s of compare per round trip, between the floor and the cap.
    #[test]
    fn windows_ahead_follow_the_round_trip() {
        assert_eq!(windows_ahead(Duration::ZERO), MIN_AHEAD);
        assert_eq!(windows_ahead(Duration::from_millis(1)), MIN_AHEAD);
        // 40 ms x 8 GiB/s = 327.7 MiB = 20.5 windows of 16 MiB.
        assert_eq!(windows_ahead(Duration::from_millis(40)), 21);
        // 100 ms: 51.2 windows.
        assert_eq!(windows_ahead(Duration::from_millis(100)), 52);
        assert_eq!(windows_ahead(Duration::from_secs(10)), MAX_AHEAD);
        assert_eq!(windows_ahead(Duration::MAX), MAX_AHEAD);
    }

    /// The limiter's arithmetic without a clock: 8 Mbit/s = 1,000,000 bytes/s.
    #[test]
    fn pace_holds_bytes_to_the_rate() {
        let rate = 1_000_000;
        let ms = Duration::from_millis;
        assert_eq!(pace(1_000_000, rate, ms(0)), Some(ms(1000)));
        assert_eq!(pace(1_000_000, rate, ms(400)), Some(ms(600)));
        assert_eq!(
            pace(500_000, rate, ms(600)),
            None,
            "behind the rate: no wait"
        );
        assert_eq!(pace(3_000_000, rate, ms(1000)), Some(ms(2000)));
    }

    #[test]
    fn limiter_is_off_without_a_limit_and_paces_with_one() {
        let l = RateLimiter::default();
        assert_eq!(l.delay_for(10 << 20), None, "no limit set");
        l.set(Some(0));
        assert_eq!(l.delay_for(10 << 20), None, "0 means no limit");
        l.set(Some(8));
        let d = l.delay_for(1_000_000).expect("1 MB at 8 Mbit/s must wait");
        assert!(
            d > Duration::from_millis(900) && d <= Duration::from_secs(1),
            "{d:?}"
        );
    }
}
