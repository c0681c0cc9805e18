//! Agent side of the protocol: accept mutual-TLS connections, check the client's instance,
//! announce the manifest, and answer hash windows with the blocks that differ.
//!
//! Per stream (one disk sync) a blocking worker reads the source in large batches, hashes the
//! blocks, compresses the differing ones, and queues frames for the connection's writer task,
//! so disk reads, hashing and the network overlap; several disks sync on several workers.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::block::{self, DiskDigest, ZeroHashes};
use crate::cbt::{DirtyMap, Plan, Token};
use crate::conn::{spawn_writer, DeadSlot, FrameReader, FrameSender};
use crate::device;
use crate::error::{Error, Result};
use crate::record::TlsReader;
use crate::scan::Scanner;
use crate::sendmeter::SendMeter;
use crate::tls::ServerTls;
use crate::wire::{
    BlocksFrame, Compression, DiskInfo, Encoding, ErrorCode, Hash, Message, CONNECTION_STREAM,
    MAX_CLIENT_FRAME, PROTOCOL_VERSION,
};
use failback_trust::Identity;

mod resume;

/// Largest payload of one `Blocks` frame (a run is cut here).
const RUN_BYTES: usize = 4 * 1024 * 1024;

/// A disk (block device or image file) served read-only.
#[derive(Debug, Clone)]
pub struct SourceDisk {
    /// What the manifest says about it.
    pub info: DiskInfo,
    /// Where it lives.
    pub path: PathBuf,
    file: Arc<File>,
    tracking: Arc<DiskTracking>,
}

/// A served disk's change tracking and the agent's hashes of its blocks (kept from round to
/// round, so a changes round's digest needs no full read).
#[derive(Debug)]
struct DiskTracking {
    map: Option<Arc<DirtyMap>>,
    /// `on`, or `unavailable: <why>`.
    status: String,
    cache: Mutex<Option<AgentCache>>,
}

/// The agent's hashes of every block of a disk at one block size (as of the last round).
#[derive(Debug)]
struct AgentCache {
    block_size: u32,
    hashes: Vec<Hash>,
}

impl SourceDisk {
    /// Opens `path` read-only and describes it as disk `id`.
    pub fn open(id: &str, path: &Path) -> Result<Self> {
        let io = |op: &'static str| {
            let path = path.to_owned();
            move |source| Error::LocalIo {
                op,
                path,
                offset: 0,
                source,
            }
        };
        let file = File::open(path).map_err(io("open"))?;
        let d = device::inspect(path).map_err(io("inspect"))?;
        if id.is_empty() || id.len() > 200 {
            return Err(Error::Usage(format!(
                "disk id {id:?} for {} must be 1..200 characters",
                path.display()
            )));
        }
        Ok(SourceDisk {
            info: DiskInfo {
                id: id.to_owned(),
                size: d.size,
                logical_sector_size: d.logical_sector_size,
                device: d.name,
                serial: d.serial,
            },
            path: path.to_owned(),
            file: Arc::new(file),
            tracking: Arc::new(DiskTracking {
                map: None,
                status: "unavailable: no change tracker runs in this process".into(),
                cache: Mutex::new(None),
            }),
        })
    }

    /// Sets the disk's change tracking: its dirty map (`None`: untracked, every round hash
    /// compares the whole disk) and a status line (`on`, `unavailable: <why>`).
    pub fn set_tracking(&mut self, map: Option<Arc<DirtyMap>>, status: impl Into<String>) {
        self.tracking = Arc::new(DiskTracking {
            map,
            status: status.into(),
            cache: Mutex::new(None),
        });
    }

    /// The tracking status line (`on`, `unavailable: <why>`).
    pub fn tracking_status(&self) -> &str {
        &self.tracking.status
    }

    /// The disk's dirty map, when tracked.
    pub fn dirty_map(&self) -> Option<&Arc<DirtyMap>> {
        self.tracking.map.as_ref()
    }

    /// The disk's size now (a block device may have been resized since it was opened).
    fn current_size(&self) -> std::io::Result<u64> {
        device::inspect(&self.path).map(|d| d.size)
    }
}

impl crate::scan::Source for SourceDisk {
    type Error = (ErrorCode, String);
    fn map(&self, offset: u64, len: usize) -> Option<crate::mapped::Mapped> {
        crate::mapped::map(&self.file, offset, len)
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), (ErrorCode, String)> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            (
                ErrorCode::Io,
                format!(
                    "agent cannot read disk {} ({}) at offset {offset}: {e}",
                    self.info.id,
                    self.path.display()
                ),
            )
        })
    }
}

/// Test-only fault injection: flips one byte of the next N non-zero blocks the agent sends.
/// Compiled only with the `fault-injection` feature (enabled from dev-dependencies).
#[cfg(feature = "fault-injection")]
#[derive(Debug, Default)]
pub struct FaultInjection {
    /// Blocks still to corrupt.
    pub corrupt_blocks: std::sync::atomic::AtomicU64,
}

#[cfg(feature = "fault-injection")]
impl FaultInjection {
    /// Environment variable read by [`ServeOptions::with_fault_env`].
    pub const ENV: &'static str = "FAILBACK_FAULT_CORRUPT_BLOCKS";

    /// Corrupt the next `n` blocks.
    pub fn corrupt(n: u64) -> Arc<Self> {
        Arc::new(FaultInjection {
            corrupt_blocks: std::sync::atomic::AtomicU64::new(n),
        })
    }

    fn take(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.corrupt_blocks
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// Limits that keep one peer (with or without credentials) from exhausting the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections in the TLS handshake or hello (not yet authorized) at once; more are
    /// closed at once, before the handshake.
    pub max_unauthenticated: usize,
    /// Time a new connection has for the TLS handshake and its hello together.
    pub handshake_timeout: Duration,
    /// An authorized connection that sends nothing for this long (while no quiesce/thaw
    /// command runs for it) is closed. Must exceed the time one hash window's answer (16 MiB
    /// of disk) takes over the slowest link.
    pub idle_timeout: Duration,
    /// Disk syncs one connection may run at once; more are refused with [`ErrorCode::Busy`].
    pub max_streams_per_connection: usize,
    /// Disk syncs the agent runs at once over all connections (each runs on a thread of its
    /// own); more are refused with [`ErrorCode::Busy`].
    pub max_streams: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_unauthenticated: 64,
            handshake_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(600),
            max_streams_per_connection: 16,
            max_streams: 32,
        }
    }
}

/// Paces the whole-disk reads of hash-compare rounds of untracked disks so they leave the
/// volume mostly to the instance's workload (the agent's `--scan-rate` and idle I/O priority).
/// Its calls come on the stream's reading thread.
pub trait ScanPacer: Send + Sync + std::fmt::Debug {
    /// A paced round starts on this thread; the round ends when the returned guard drops
    /// (e.g. lower the thread's I/O priority and restore it).
    fn begin(&self) -> Box<dyn std::any::Any>;
    /// Blocks until `bytes` more may be read.
    fn wait(&self, bytes: u64);
}

/// Agent behaviour beyond the disks and TLS.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Shell command run on `Quiesce` (e.g. freeze filesystems / flush databases).
    pub quiesce_cmd: Option<String>,
    /// Shell command run on `Thaw`.
    pub thaw_cmd: Option<String>,
    /// Client certificates the DR service currently allows (revocation); `None` serves every
    /// client certificate the TLS checks accept (an agent given certificates by hand).
    pub allow: Option<Arc<crate::allow::ClientAllowlist>>,
    /// Connection, time and stream limits.
    pub limits: Limits,
    /// Paces the hash-compare rounds of untracked disks (`None`: full speed). Not applied on
    /// a connection that asked to quiesce: the final round runs at full speed.
    pub scan_pacer: Option<Arc<dyn ScanPacer>>,
    /// Test-only fault injection.
    #[cfg(feature = "fault-injection")]
    pub fault: Option<Arc<FaultInjection>>,
}

impl ServeOptions {
    /// With the `fault-injection` feature, reads `FAILBACK_FAULT_CORRUPT_BLOCKS=N`; without it,
    /// does nothing (release builds ignore the variable).
    pub fn with_fault_env(self) -> Self {
        #[cfg(feature = "fault-injection")]
        {
            let mut s = self;
            if let Some(n) = std::env::var(FaultInjection::ENV)
                .ok()
                .and_then(|v| v.parse().ok())
            {
                tracing::warn!("fault injection: corrupting the next {n} blocks sent");
                s.fault = Some(FaultInjection::corrupt(n));
            }
            s
        }
        #[cfg(not(feature = "fault-injection"))]
        self
    }
}

struct Ctx {
    disks: Vec<SourceDisk>,
    tls: Arc<rustls::ServerConfig>,
    instance: Option<String>,
    opts: ServeOptions,
    /// Permits for connections not yet authorized ([`Limits::max_unauthenticated`]).
    unauthenticated: Arc<Semaphore>,
    /// Permits for disk syncs over all connections ([`Limits::max_streams`]).
    streams: Arc<Semaphore>,
}

/// Serves `disks` on `listener`. Each connection runs in its own task; a failing connection is
/// logged and closed without affecting others. A failed accept (e.g. out of file descriptors)
/// is logged and retried after a pause (50 ms, doubling up to 1 s), so this never returns.
pub async fn serve(
    listener: TcpListener,
    disks: Vec<SourceDisk>,
    tls: ServerTls,
    opts: ServeOptions,
) -> std::io::Result<()> {
    let ctx = Arc::new(Ctx {
        disks,
        tls: tls.config.clone(),
        instance: tls.instance.clone(),
        unauthenticated: Arc::new(Semaphore::new(opts.limits.max_unauthenticated)),
        streams: Arc::new(Semaphore::new(opts.limits.max_streams)),
        opts,
    });
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut refused = Throttled::default();
    loop {
        match listener.accept().await {
            Ok((tcp, addr)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                spawn_connection(&ctx, tcp, addr.to_string(), &mut refused);
            }
            Err(e) => {
                tracing::warn!(
                    "accepting a connection failed: {e}; retrying in {} ms",
                    backoff.as_millis()
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}

/// Pause after the first failed accept; it doubles up to [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(50);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Counts refused connections and logs them at most every 10 s (a flood must not flood the log).
#[derive(Default)]
struct Throttled {
    count: u64,
    logged: Option<std::time::Instant>,
}

impl Throttled {
    fn refused(&mut self, peer: &str, limit: usize) {
        self.count += 1;
        if self
            .logged
            .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
        {
            return;
        }
        tracing::warn!(
            %peer,
            "closed {} connection(s) at once: {limit} connections are already in the TLS handshake (limit max-unauthenticated)",
            self.count
        );
        self.count = 0;
        self.logged = Some(std::time::Instant::now());
    }
}

/// Runs a connection in a task of its own, if a permit for an unauthenticated connection is
/// free; otherwise closes it at once.
fn spawn_connection(ctx: &Arc<Ctx>, tcp: TcpStream, peer: String, refused: &mut Throttled) {
    let Ok(permit) = ctx.unauthenticated.clone().try_acquire_owned() else {
        refused.refused(&peer, ctx.opts.limits.max_unauthenticated);
        return;
    };
    let ctx = ctx.clone();
    tokio::spawn(async move {
        tracing::info!(%peer, "client connected");
        match handle(tcp, peer.clone(), ctx, permit).await {
            Ok(()) => tracing::info!(%peer, "client disconnected"),
            Err(e) => tracing::error!(%peer, "connection closed: {e}"),
        }
    });
}

fn stream_of(m: &Message) -> Option<u32> {
    match m {
        Message::SyncStart { stream, .. }
        | Message::SyncResume { stream, .. }
        | Message::Hashes { stream, .. }
        | Message::Refetch { stream, .. }
        | Message::SyncEnd { stream }
        | Message::Blocks { stream, .. }
        | Message::WindowDone { stream, .. }
        | Message::SyncDone { stream, .. }
        | Message::Error { stream, .. } => Some(*stream),
        _ => None,
    }
}

async fn send_error(out: &FrameSender, stream: u32, code: ErrorCode, message: String) {
    let _ = out
        .send(&Message::Error {
            stream,
            code,
            message,
        })
        .await;
}

/// Largest frame read before the peer's hello was accepted (a hello is 7 bytes).
const HELLO_FRAME: usize = 1024;
/// How long a refused peer's hello is waited for (read and dropped, so that closing the
/// connection does not reset it before the peer has read why it was refused).
const REFUSAL_DRAIN: Duration = Duration::from_secs(1);

/// Decides whether the client that completed the TLS handshake with certificate chain `certs`
/// may use this agent. Called right after the handshake, before anything is read from the
/// connection or allocated for it. The TLS verifier already checked the CA and the client
/// role; this checks the instance and, with an allow list, that the DR service still allows
/// this certificate (waiting at most until `deadline` for its answer about a new one).
/// Returns the certificate's fingerprint (hex SHA-256).
async fn authorize_peer(
    ctx: &Ctx,
    peer: &str,
    certs: &[CertificateDer<'_>],
    deadline: tokio::time::Instant,
) -> Result<String> {
    let refuse = |message: String| Error::Remote {
        peer: peer.to_owned(),
        code: ErrorCode::NotAuthorized,
        message,
    };
    let id = certs
        .first()
        .and_then(|c| Identity::from_der(c).ok())
        .ok_or_else(|| refuse("no readable client certificate".into()))?;
    let client = id.instance();
    if let Some(want) = &ctx.instance {
        if client != Some(want.as_str()) {
            return Err(refuse(format!(
                "client certificate is for instance {}, but this agent serves instance {want}",
                client.unwrap_or("<none>")
            )));
        }
    }
    let fingerprint = id.fingerprint_hex();
    if let Some(allow) = &ctx.opts.allow {
        let wait = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .min(crate::allow::REFRESH_WAIT);
        allow.admit(&fingerprint, wait).await.map_err(refuse)?;
    }
    Ok(fingerprint)
}

/// Resolves when the DR service revokes `fingerprint` (never without an allow list).
async fn revoked(ctx: &Ctx, peer: &str, fingerprint: &str) -> Error {
    match &ctx.opts.allow {
        Some(allow) => allow.revoked(fingerprint).await,
        None => std::future::pending::<()>().await,
    }
    Error::Remote {
        peer: peer.to_owned(),
        code: ErrorCode::NotAuthorized,
        message: format!(
            "client certificate sha256:{fingerprint} was revoked by the DR service (stopped, \
             re-paired or completed); connection closed"
        ),
    }
}

async fn handle(
    tcp: TcpStream,
    peer: String,
    ctx: Arc<Ctx>,
    permit: OwnedSemaphorePermit,
) -> Result<()> {
    let _ = tcp.set_nodelay(true);
    let limit = ctx.opts.limits.handshake_timeout;
    let deadline = tokio::time::Instant::now() + limit;
    let started = std::time::Instant::now();
    let accept = crate::record::accept(tcp, ctx.tls.clone());
    let (r, w, certs) = match tokio::time::timeout_at(deadline, accept).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(Error::Handshake { peer, source }),
        Err(_) => {
            return Err(Error::Timeout {
                peer,
                what: "TLS handshake",
                secs: limit.as_secs(),
            })
        }
    };
    let handshake = started.elapsed();
    tracing::debug!(%peer, ms = handshake.as_secs_f64() * 1e3, "TLS handshake done");
    let (out, mut writer) = spawn_writer(w, DeadSlot::default());
    let mut reader = FrameReader::new(r, peer.clone()).max_frame(HELLO_FRAME);
    let res = match authorize_peer(&ctx, &peer, &certs, deadline).await {
        Ok(fingerprint) => {
            let hello = hello(&mut reader, &peer, deadline, limit).await;
            drop(permit);
            match hello {
                Ok(()) => {
                    reader.set_max_frame(MAX_CLIENT_FRAME);
                    tokio::select! {
                        r = session(&mut reader, &out, &peer, &ctx, handshake) => r,
                        e = revoked(&ctx, &peer, &fingerprint) => Err(e),
                    }
                }
                Err(e) => Err(e),
            }
        }
        Err(e) => {
            let _ = tokio::time::timeout(REFUSAL_DRAIN, reader.read()).await;
            Err(e)
        }
    };
    if let Err(e) = &res {
        // Tell the client why before closing (best effort; the connection may be gone).
        let code = match e {
            Error::VersionMismatch { .. } => ErrorCode::VersionMismatch,
            Error::Remote { code, .. } => *code,
            Error::LocalIo { .. } => ErrorCode::Io,
            _ => ErrorCode::BadRequest,
        };
        let message = match e {
            Error::Remote { message, .. } => message.clone(),
            other => other.to_string(),
        };
        send_error(&out, CONNECTION_STREAM, code, message).await;
    }
    drop(out);
    // A peer that stopped reading must not keep the writer (and its queued frames) forever.
    if tokio::time::timeout(Duration::from_secs(10), &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
    res
}

/// Reads the client's hello (before `deadline`) and checks its protocol version.
async fn hello(
    reader: &mut FrameReader<TlsReader>,
    peer: &str,
    deadline: tokio::time::Instant,
    limit: Duration,
) -> Result<()> {
    let first = match tokio::time::timeout_at(deadline, reader.read()).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(Error::Timeout {
                peer: peer.to_owned(),
                what: "hello",
                secs: limit.as_secs(),
            })
        }
    };
    match first {
        Some((Message::ClientHello { version }, _)) if version == PROTOCOL_VERSION => Ok(()),
        Some((Message::ClientHello { version }, _)) => Err(Error::VersionMismatch {
            agent: PROTOCOL_VERSION,
            client: version,
        }),
        Some((other, _)) => Err(Error::Protocol {
            peer: peer.to_owned(),
            message: format!("expected ClientHello, got {}", other.name()),
        }),
        None => Err(Error::ConnectionLost {
            peer: peer.to_owned(),
            reason: "closed before hello".into(),
        }),
    }
}

/// The next message from an authorized client. Fails when it sends nothing for the idle
/// timeout while `busy()` is false, or stops in the middle of a frame for that long.
async fn next_frame(
    reader: &mut FrameReader<TlsReader>,
    peer: &str,
    idle: Duration,
    busy: impl Fn() -> bool,
) -> Result<Option<Message>> {
    loop {
        match tokio::time::timeout(idle, reader.read()).await {
            Ok(r) => return Ok(r?.map(|(m, _)| m)),
            Err(_) if !reader.mid_frame() && busy() => continue,
            Err(_) => {
                return Err(Error::Timeout {
                    peer: peer.to_owned(),
                    what: if reader.mid_frame() {
                        "the rest of a frame"
                    } else {
                        "a request on an idle connection"
                    },
                    secs: idle.as_secs(),
                })
            }
        }
    }
}

/// One authorized connection's state.
struct Conn<'a> {
    out: &'a FrameSender,
    peer: &'a str,
    ctx: &'a Arc<Ctx>,
    streams: HashMap<u32, mpsc::Sender<Message>>,
    /// The quiesce/thaw command running for this connection (one at a time).
    command: Option<tokio::task::JoinHandle<()>>,
    /// The client asked to quiesce (and not thaw) on this connection: its rounds are not paced.
    quiesced: bool,
    /// How long the TLS handshake took (see [`AutoCompression::for_path`]).
    handshake: Duration,
}

/// The served disk a stream asks for, at a valid block size; otherwise answers the stream with
/// the error and returns `None`.
async fn stream_disk<'c>(
    ctx: &'c Ctx,
    out: &FrameSender,
    stream: u32,
    disk: &str,
    block_size: u32,
) -> Option<&'c SourceDisk> {
    let Some(src) = ctx.disks.iter().find(|d| d.info.id == disk) else {
        let m = format!("this agent serves no disk {disk:?}");
        send_error(out, stream, ErrorCode::UnknownDisk, m).await;
        return None;
    };
    if let Err(m) = block::validate_block_size(block_size) {
        send_error(out, stream, ErrorCode::BadRequest, m).await;
        return None;
    }
    Some(src)
}

async fn session(
    reader: &mut FrameReader<TlsReader>,
    out: &FrameSender,
    peer: &str,
    ctx: &Arc<Ctx>,
    handshake: Duration,
) -> Result<()> {
    out.send(&Message::AgentHello {
        version: PROTOCOL_VERSION,
        software: env!("CARGO_PKG_VERSION").to_owned(),
        instance: ctx.instance.clone(),
    })
    .await;
    out.send(&Message::Manifest {
        disks: ctx.disks.iter().map(|d| d.info.clone()).collect(),
    })
    .await;
    let mut conn = Conn {
        out,
        peer,
        ctx,
        streams: HashMap::new(),
        command: None,
        quiesced: false,
        handshake,
    };
    let idle = ctx.opts.limits.idle_timeout;
    loop {
        let running = || conn.command.as_ref().is_some_and(|c| !c.is_finished());
        let Some(msg) = next_frame(reader, peer, idle, running).await? else {
            return Ok(());
        };
        conn.dispatch(msg).await?;
    }
}

impl Conn<'_> {
    async fn dispatch(&mut self, msg: Message) -> Result<()> {
        match msg {
            Message::SyncStart {
                stream,
                disk,
                block_size,
                estimate,
                changes_since,
                compression,
            } => {
                let opts = (estimate, changes_since, compression);
                self.start_stream(stream, &disk, block_size, opts, None)
                    .await
            }
            Message::SyncResume {
                stream,
                disk,
                block_size,
                compression,
                offset,
                cut,
            } => {
                self.resume_stream(stream, &disk, block_size, compression, (offset, cut))
                    .await
            }
            Message::SyncEnd { stream } => {
                self.forward(Message::SyncEnd { stream }).await?;
                // The client may start its next sync before the worker has read this: the
                // stream no longer counts against the connection's limit.
                self.streams.remove(&stream);
                Ok(())
            }
            m @ (Message::Hashes { .. } | Message::Refetch { .. }) => self.forward(m).await,
            Message::Quiesce => {
                self.command(true).await;
                Ok(())
            }
            Message::Thaw => {
                self.command(false).await;
                Ok(())
            }
            other => Err(self.protocol(format!("unexpected {} from client", other.name()))),
        }
    }

    fn protocol(&self, message: String) -> Error {
        Error::Protocol {
            peer: self.peer.to_owned(),
            message,
        }
    }

    async fn start_stream(
        &mut self,
        stream: u32,
        disk: &str,
        block_size: u32,
        (estimate, changes_since, compression): (bool, Option<Token>, Compression),
        resume: Option<crate::resume::ResumeAt>,
    ) -> Result<()> {
        if stream == CONNECTION_STREAM || self.streams.contains_key(&stream) {
            return Err(self.protocol(format!("stream id {stream} reused")));
        }
        let Some(src) = stream_disk(self.ctx, self.out, stream, disk, block_size).await else {
            return Ok(());
        };
        let permit = match self.stream_permit(disk) {
            Ok(p) => p,
            Err(m) => {
                tracing::warn!(peer = %self.peer, "{m}");
                send_error(self.out, stream, ErrorCode::Busy, m).await;
                return Ok(());
            }
        };
        let (tx, rx) = mpsc::channel(16);
        self.streams.insert(stream, tx);
        let worker = StreamWorker {
            disk: src.clone(),
            stream,
            block_size,
            estimate,
            changes_since,
            compression,
            resume,
            auto: std::cell::RefCell::new(AutoCompression::for_path(self.handshake)),
            out: self.out.clone(),
            pacer: (src.tracking.map.is_none() && !self.quiesced)
                .then(|| self.ctx.opts.scan_pacer.clone())
                .flatten(),
            #[cfg(feature = "fault-injection")]
            fault: self.ctx.opts.fault.clone(),
        };
        tokio::task::spawn_blocking(move || worker.run(rx, permit));
        Ok(())
    }

    /// A permit for one more disk sync, or why there is none.
    fn stream_permit(&mut self, disk: &str) -> std::result::Result<OwnedSemaphorePermit, String> {
        let limits = &self.ctx.opts.limits;
        self.streams.retain(|_, tx| !tx.is_closed());
        let mine = limits.max_streams_per_connection;
        if self.streams.len() >= mine {
            return Err(format!(
                "sync of disk {disk:?} refused: this connection already runs {mine} disk syncs \
                 (limit max-streams-per-connection {mine})"
            ));
        }
        let all = limits.max_streams;
        self.ctx.streams.clone().try_acquire_owned().map_err(|_| {
            format!(
                "sync of disk {disk:?} refused: the agent already runs {all} disk syncs for \
                 its clients (limit max-streams {all})"
            )
        })
    }

    /// Hands a stream's message to its worker (waiting at most the idle timeout for room).
    async fn forward(&mut self, m: Message) -> Result<()> {
        let stream = stream_of(&m).unwrap_or(CONNECTION_STREAM);
        let Some(tx) = self.streams.get(&stream) else {
            return Err(self.protocol(format!("{} for unknown stream {stream}", m.name())));
        };
        let idle = self.ctx.opts.limits.idle_timeout;
        // A closed worker already reported its error; the message is dropped.
        if tokio::time::timeout(idle, tx.send(m)).await.is_err() {
            return Err(Error::Timeout {
                peer: self.peer.to_owned(),
                what: "the connection to take the answers of a stream",
                secs: idle.as_secs(),
            });
        }
        Ok(())
    }

    /// Runs the quiesce (or thaw) command in a task; refused while one is still running.
    async fn command(&mut self, quiesce: bool) {
        let what = if quiesce { "quiesce" } else { "thaw" };
        self.quiesced = quiesce;
        if self.command.as_ref().is_some_and(|c| !c.is_finished()) {
            let m = format!("{what} refused: a quiesce or thaw command is still running");
            send_error(self.out, CONNECTION_STREAM, ErrorCode::CommandFailed, m).await;
            return;
        }
        let opts = &self.ctx.opts;
        let cmd = if quiesce {
            opts.quiesce_cmd.clone()
        } else {
            opts.thaw_cmd.clone()
        };
        let out = self.out.clone();
        self.command = Some(tokio::spawn(async move {
            let msg = match run_command(what, cmd).await {
                Ok(message) => Message::CommandDone { message },
                Err(message) => Message::Error {
                    stream: CONNECTION_STREAM,
                    code: ErrorCode::CommandFailed,
                    message,
                },
            };
            out.send(&msg).await;
        }));
    }
}

async fn run_command(what: &str, cmd: Option<String>) -> std::result::Result<String, String> {
    let Some(cmd) = cmd else {
        return Ok(format!("no {what} command configured; nothing to do"));
    };
    tracing::info!("running {what} command: {cmd}");
    let out = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(&cmd)
        .output()
        .await
        .map_err(|e| format!("{what} command {cmd:?} could not start: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(format!("{what} command {cmd:?} succeeded: {}", text.trim()))
    } else {
        Err(format!(
            "{what} command {cmd:?} failed ({}): {}",
            out.status,
            text.trim()
        ))
    }
}

/// What comparing one window produced so far.
struct Batch {
    /// Hashes of the blocks compared, not yet added to the digest.
    hashes: Vec<Hash>,
    /// Finished runs, not yet sent.
    frames: Vec<BlocksFrame>,
    /// The run being built (continues into the next read).
    frame: Option<BlocksFrame>,
    differing: u32,
    differing_bytes: u64,
}

struct StreamWorker {
    disk: SourceDisk,
    stream: u32,
    block_size: u32,
    estimate: bool,
    changes_since: Option<Token>,
    compression: Compression,
    /// Set for a round continued with `SyncResume` (see [`crate::resume`]).
    resume: Option<crate::resume::ResumeAt>,
    /// `Compression::Auto`'s measurements and choice (see [`StreamWorker::squeeze`]).
    auto: std::cell::RefCell<AutoCompression>,
    out: FrameSender,
    /// Set for the compare rounds of an untracked disk (see [`ScanPacer`]).
    pacer: Option<Arc<dyn ScanPacer>>,
    #[cfg(feature = "fault-injection")]
    fault: Option<Arc<FaultInjection>>,
}

/// `Compression::Auto`: bytes queued for the connection's writer from which the socket counts
/// as the bottleneck (it drains slower than the agent reads and hashes): a whole run's bytes
/// queued and not yet written. Counted in bytes, not frames: the writer's queue holds up to
/// 32 runs (128 MiB), and every raw run queued before the choice still crosses the link raw
/// (measured through 100 ms / 200 Mbit/s on a text disk: 14 MB went raw at the start of the
/// stream with a threshold of two runs, 8 MB with one). Once the link and zstd are measured,
/// the threshold follows them ([`AutoCompression::lag_threshold`]).
const BACKLOG: u64 = RUN_BYTES as u64;
/// Bytes a busy-rate sample spans beyond what buffers may have taken (the writer counts
/// blocks as each socket write of about 1 MiB goes out, messages once written: at most a
/// quarter off).
const DRAIN_LEAST: u64 = 4 << 20;
/// `Compression::Auto`: the shortest queue that counts as the writer lagging, once the link
/// and zstd are measured: what the link drains while zstd compresses two batches. A fixed
/// [`BACKLOG`] is seconds of a slow link: the queue dipped under it as a frame went out and
/// the next batch went raw (measured through 200 Mbit/s: 4 MiB raw in the middle of a text
/// stream).
const LAG_BATCHES: f64 = 2.0;
/// Shortest lag threshold.
const LAG_LEAST: u64 = 256 << 10;
/// Stalled time (the socket full, the writer waiting) each sample of the link's rate spans.
/// The first sample of a connection reads low (the socket takes nothing for the first round
/// trip: nothing is acknowledged yet), which only errs towards compressing.
const STALL_SAMPLE: Duration = Duration::from_millis(20);
/// Bytes that may sit between the writer and the far end (socket buffers, a proxy, a link's
/// bandwidth-delay product) and so do not count as carried by the link in the stream's
/// average rate, [`carried`]: about this host's largest TCP send buffer
/// (4 MiB) and 1 Gbit/s × 100 ms in flight.
const HIDDEN: u64 = 16 << 20;

/// `Compression::Auto`: a TLS handshake (a round trip and the certificate checks) at least this
/// long marks a far path ([`AutoCompression::for_path`]): 40 ms and more through the emulated
/// WAN links, 1-5 ms on loopback with client and agent on two shared cores.
const FAR_HANDSHAKE: Duration = Duration::from_millis(10);
/// `Compression::Auto`: the weight of older zstd measurements after each new one (the ratio
/// and speed follow the data: about the last 50 blocks measured count).
const Z_DECAY: f64 = 0.98;
/// `Compression::Auto`: share of the stream's time that measuring zstd on sample blocks may
/// cost while compression is off (one block in [`Z_SAMPLE`] at most).
const Z_SAMPLE_BUDGET: f64 = 0.02;
/// `Compression::Auto`: while compression is off, at most one block in this many is a sample.
const Z_SAMPLE: u64 = 8;
/// `Compression::Auto`: how much faster than the link zstd must run for compression to stay on
/// whatever the data (measured over 100 ms / 200 Mbit/s: on random runs, zstd and raw took the
/// same time; switching off there left the start of each text run raw, 276 MB on the wire where
/// zstd sent 247 MB).
const Z_SPARE: f64 = 1.5;
/// `Compression::Auto`: zstd must shrink data to at most this share for compression to pay
/// where zstd is only a little faster than the link, or where the link's rate is not yet known.
const Z_SHRINKS: f64 = 1.0 / 1.05;

/// What `Compression::Auto` has measured on one stream: the link's rate (see
/// [`AutoCompression::decide`]), and zstd's input rate and ratio on this disk's recent blocks.
#[derive(Debug)]
struct AutoCompression {
    on: bool,
    /// Whether the path is far ([`Self::for_path`]): what the rule assumes before the link is
    /// measured.
    far: bool,
    /// Whether the writer lagged ([`Self::lag_threshold`] queued) at the last
    /// [`Self::decide`].
    backlogged: bool,
    /// The link's rate, bytes per second, as the rule uses it ([`Self::decide`]), and the
    /// latest sample of it.
    drain: Option<f64>,
    sampled: Option<f64>,
    /// The writer's stalled bytes and time when the current stall sample began.
    stall_from: Option<(u64, Duration)>,
    /// The current busy-rate span ([`Self::measure_busy`]).
    busy_from: Option<BusySpan>,
    /// The stream's first lag: when, and the writer's byte count then (`None`: the writer
    /// has always kept up).
    first_lag: Option<(std::time::Instant, u64)>,
    /// zstd's recent work, decayed by [`Z_DECAY`] per block: input bytes, output bytes (raw
    /// length when it did not shrink), seconds.
    zin: f64,
    zout: f64,
    zsecs: f64,
    /// Blocks passed over since the last sample while off; time spent on samples.
    skipped: u64,
    sampling: Duration,
    started: std::time::Instant,
}

impl Default for AutoCompression {
    fn default() -> Self {
        AutoCompression {
            on: false,
            far: true,
            backlogged: false,
            drain: None,
            sampled: None,
            stall_from: None,
            busy_from: None,
            first_lag: None,
            zin: 0.0,
            zout: 0.0,
            zsecs: 0.0,
            skipped: Z_SAMPLE,
            sampling: Duration::ZERO,
            started: std::time::Instant::now(),
        }
    }
}

impl AutoCompression {
    /// For a stream on a connection whose TLS handshake took `handshake`. Until the link is
    /// measured, a far path ([`FAR_HANDSHAKE`]) compresses what shrinks while the writer
    /// lags: its first measurement takes a round trip or more, and every raw run queued
    /// meanwhile crosses the link raw (measured through 100 ms / 200 Mbit/s: 8 MiB raw at the
    /// start cost 0.25 s). A near one (a LAN, or client and agent on one host) sends raw until
    /// then: its links are fast, a slow one is measured within milliseconds, and compressing
    /// the first batches cost a loopback sync of a 1 GiB text disk 3-5 % (0.58 s against
    /// 0.54 s raw, zstd's CPU taken from a client on the same two cores).
    fn for_path(handshake: Duration) -> Self {
        AutoCompression {
            far: handshake >= FAR_HANDSHAKE,
            ..AutoCompression::default()
        }
    }

    /// Whether the next batch may compress (the writer lags or has lagged in this stream). Raw
    /// while the writer has always kept up (compressing would only cost CPU); once it lags,
    /// [`Self::rule`] decides from the link's rate and zstd's recent measurements
    /// ([`Self::compress`] keeps measuring sample blocks while it is off, so the choice follows
    /// the data run by run).
    ///
    /// The link's rate is the latest of two samples, but at least what the link has carried
    /// ([`carried`]): the rate a full socket takes bytes at (every [`STALL_SAMPLE`] of
    /// stalls, see [`crate::sendmeter`]), exact while the link is the bottleneck; and the
    /// writer's rate over spans in which something stays queued ([`Self::measure_busy`]),
    /// exact where the writer itself is the bottleneck and never waits for the socket.
    fn decide(&mut self, queued: u64, meter: &SendMeter) -> bool {
        let now = std::time::Instant::now();
        let (written, stalled) = (meter.written(), meter.stalled());
        let (b0, t0) = *self.stall_from.get_or_insert(stalled);
        self.backlogged = queued >= self.lag_threshold();
        if self.backlogged {
            self.first_lag.get_or_insert((now, written));
        }
        let Some(first_lag) = self.first_lag else {
            return false;
        };
        if stalled.1 - t0 >= STALL_SAMPLE {
            self.sampled = Some((stalled.0 - b0) as f64 / (stalled.1 - t0).as_secs_f64());
            self.stall_from = Some(stalled);
        }
        if let Some(busy) = self.measure_busy(now, queued, written, meter.stalling()) {
            self.sampled = Some(busy);
        }
        // What the link carried only raises a sample: alone, early in a stream, it is mostly
        // the hidden bytes' deduction (measured on loopback: 62 MB/s 20 ms in, where the link
        // took 1 GB/s, turned zstd on for 90 batches).
        let carried = carried(first_lag, now, written);
        self.drain = self.sampled.map(|s| carried.map_or(s, |c| s.max(c)));
        self.on = self.rule();
        tracing::trace!(
            ms = (now - self.started).as_millis(),
            queued,
            threshold = self.lag_threshold(),
            written,
            stalling = meter.stalling(),
            sampled = self.sampled,
            drain = self.drain,
            zstd = self.zstd_rate(),
            ratio = self.zout / self.zin.max(1.0),
            far = self.far,
            on = self.on,
            "auto compression decided"
        );
        true
    }

    /// The queued bytes from which the writer lags: [`BACKLOG`], or once the link and zstd are
    /// measured, what the link drains while zstd compresses [`LAG_BATCHES`] batches.
    fn lag_threshold(&self) -> u64 {
        match self.drain {
            Some(drain) if self.zstd_rate().is_some() => {
                let batch_secs = block::BATCH_BYTES as f64 * self.zsecs / self.zin;
                let bytes = drain * batch_secs * LAG_BATCHES;
                // Bounded before the cast (NaN casts to 0, then LAG_LEAST).
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let bytes = bytes.min(BACKLOG as f64) as u64;
                bytes.clamp(LAG_LEAST, BACKLOG)
            }
            _ => BACKLOG,
        }
    }

    /// The writer's rate over spans in which something stays queued (it is busy throughout),
    /// from the first lag on: the link's rate where the writer itself is the bottleneck and
    /// never waits for the socket, and where it waits for a receiver that takes bytes in
    /// bursts. A dry queue (zstd may be what keeps it dry) ends the span, and the rate is that
    /// since the span began: a lower bound of the link's, as bytes written over a span = bytes
    /// the link took + what the buffers on the way filled by. A span that begins in a stall
    /// begins with them full (they can only have emptied since), so all of it counts and later
    /// stalls change nothing; any other may have begun with them empty, and they take
    /// [`HIDDEN`] bytes at memory speed, which do not count (measured through 25 MB/s: 4 MiB
    /// written in 1.5 ms at the start of a stream, read as 2.8 GB/s; 80 MB went raw before a
    /// stall sample corrected it) until a stall starts a full span.
    ///
    /// Unlike a stall sample, a span counts the writes a socket takes whole after a receiver
    /// that was descheduled catches up (measured on loopback, client and agent on two shared
    /// cores: stall samples of 136 MB/s where 263 MB/s went through, which kept zstd on and
    /// the client short of CPU).
    fn measure_busy(
        &mut self,
        now: std::time::Instant,
        queued: u64,
        written: u64,
        stalling: bool,
    ) -> Option<f64> {
        let span = match self.busy_from {
            _ if queued == 0 => None,
            Some(span) if span.full || !stalling => Some(span),
            _ => Some(BusySpan {
                at: now,
                written,
                full: stalling,
            }),
        };
        self.busy_from = span;
        let span = span?;
        let hidden = if span.full { 0 } else { HIDDEN };
        let bytes = written.saturating_sub(span.written).saturating_sub(hidden);
        (bytes >= DRAIN_LEAST && now > span.at)
            .then(|| bytes as f64 / (now - span.at).as_secs_f64())
    }

    /// Only while the writer lags ([`Self::lag_threshold`]): while it keeps up, the link has
    /// room, and raw blocks fill it for no CPU; so a link faster than zstd's output but slower
    /// than its input gets a mix (compressed while the queue is long, raw while it is short),
    /// the queue never runs dry and the link goes on being measured.
    /// Then, on the recent measurements: zstd feeds the link faster than raw bytes do,
    /// min(zstd's input rate, drain / ratio) > 1.05 × drain; or zstd runs at least
    /// [`Z_SPARE`] × the drain rate, so compressing costs the link no time even where the data
    /// does not shrink (zstd keeps up; a block that does not shrink goes raw), and the next
    /// compressible block is compressed at once instead of after a few sample blocks.
    /// Before the link's rate is measured: on a far path ([`Self::for_path`]) wherever zstd
    /// shrinks the data (or has not been measured), since the link may be far slower than the
    /// agent, and every raw run queued meanwhile crosses it raw; on a near one, never.
    fn rule(&self) -> bool {
        let ratio = self.zout / self.zin.max(1.0);
        self.backlogged
            && match (self.drain, self.zstd_rate()) {
                (None, None) => self.far,
                (None, Some(_)) => self.far && ratio <= Z_SHRINKS,
                (Some(drain), Some(rate)) => {
                    rate >= drain * Z_SPARE || rate.min(drain / ratio.max(0.01)) > drain * 1.05
                }
                (Some(_), None) => false,
            }
    }

    /// zstd's recent input rate, bytes per second, once measured.
    fn zstd_rate(&self) -> Option<f64> {
        (self.zin > 0.0 && self.zsecs > 0.0).then(|| self.zin / self.zsecs)
    }

    /// One block of a batch [`Self::decide`] let compress: zstd when on, else only a sample
    /// block now and then (within [`Z_SAMPLE_BUDGET`]); `None`: sent raw.
    fn compress(&mut self, block: &[u8]) -> Option<Vec<u8>> {
        if !self.on {
            self.skipped += 1;
            let budget = self.started.elapsed().mul_f64(Z_SAMPLE_BUDGET);
            if self.skipped < Z_SAMPLE || self.sampling > budget {
                return None;
            }
            self.skipped = 0;
        }
        let t = std::time::Instant::now();
        let z = block::compress_if_smaller(block);
        let took = t.elapsed();
        if !self.on {
            self.sampling += took;
        }
        self.zin = self.zin * Z_DECAY + block.len() as f64;
        self.zout = self.zout * Z_DECAY + z.as_ref().map_or(block.len(), Vec::len) as f64;
        self.zsecs = self.zsecs * Z_DECAY + took.as_secs_f64();
        // Decided again after every block measured: the next block follows the data.
        self.on = self.rule();
        z
    }
}

/// A span of [`AutoCompression::measure_busy`]: when it began, the writer's byte count then,
/// and whether the writer was in a stall then (the buffers on the way full).
#[derive(Debug, Clone, Copy)]
struct BusySpan {
    at: std::time::Instant,
    written: u64,
    full: bool,
}

/// What the link has carried since the stream's first lag (`(when, writer's byte count)`),
/// per second, not counting [`HIDDEN`] bytes that may still be on the way: a lower bound of its
/// rate, so that samples read low while the client, not the link, held the socket up
/// (measured on loopback, where client and agent share two cores: stall samples of
/// 5-280 MB/s while 1.4 GB/s went through) do not turn compression on.
fn carried(
    (since, from): (std::time::Instant, u64),
    now: std::time::Instant,
    written: u64,
) -> Option<f64> {
    let bytes = written.saturating_sub(from).saturating_sub(HIDDEN);
    (bytes > 0 && now > since).then(|| bytes as f64 / (now - since).as_secs_f64())
}

/// `(first_block, count)` runs of blocks.
type BlockRuns = Vec<(u64, u64)>;

/// What one round covers, decided at its start (before any read).
struct RoundPlan {
    /// `Some`: a changes round over these block runs (with the agent's cached hashes);
    /// `None`: a hash compare.
    changes: Option<(BlockRuns, Vec<Hash>)>,
    message: Message,
}

impl StreamWorker {
    /// Answers the stream's messages until `SyncEnd`, an error or the connection's end; the
    /// stream's `permit` is returned before the last answer goes out, so a client that starts
    /// its next sync on receiving it finds the slot free.
    fn run(self, mut rx: mpsc::Receiver<Message>, permit: OwnedSemaphorePermit) {
        let size = self.disk.info.size;
        let nblocks = block::block_count(size, self.block_size);
        let zeros = ZeroHashes::new(size, self.block_size);
        let mut digest = DiskDigest::new();
        let mut next = self.resume.as_ref().map_or(0, |r| r.start_block);
        let mut scanner = Scanner::new(self.block_size);
        let in_flight = Arc::new(InFlight::default());
        let plan = match &self.resume {
            Some(r) => self.resumed_plan(r),
            None => self.plan(nblocks),
        };
        self.out.blocking_send_raw(plan.message.encode());
        // Compare rounds collect every block's hash for the cache; changes rounds update it.
        // A resumed round starts from the interrupted one's hashes of the prefix, if kept.
        let mut all: Vec<Hash> = self.resumed_prefix();
        let mut cache = None;
        // A hash compare's digest is final once the last window is compared (refetches do not
        // change it), so `SyncDone` goes out then, not a round trip later on `SyncEnd`.
        let mut done_sent = false;
        let _paced = plan
            .changes
            .is_none()
            .then(|| self.pacer.as_ref().map(|p| p.begin()));
        if let Some((runs, hashes)) = plan.changes {
            let mut hashes = hashes;
            let Some(done) = self.send_changes(&runs, &zeros, &in_flight, &mut hashes) else {
                return; // the error went out already
            };
            self.out.blocking_send_raw(done.encode());
            cache = Some(hashes);
            next = nblocks;
        }
        while let Some(m) = rx.blocking_recv() {
            let res = match m {
                Message::Hashes {
                    first_block,
                    hashes,
                    ..
                } => {
                    let count = hashes.len() as u64;
                    if cache.is_some()
                        || first_block != next
                        || self.beyond(first_block, count, nblocks)
                    {
                        Err(self.out_of_range("hash window", first_block, count, next, nblocks))
                    } else {
                        next += count;
                        let d = (&mut digest, &mut all);
                        let r = self.window(first_block, &hashes, &zeros, d, &mut scanner);
                        if r.is_ok() && next == nblocks {
                            done_sent = true;
                            self.out.blocking_send_raw(self.sync_done(&digest).encode());
                        }
                        r
                    }
                }
                Message::Refetch {
                    first_block, count, ..
                } => {
                    let count = u64::from(count);
                    if self.beyond(first_block, count, next) {
                        Err(self.out_of_range("refetch", first_block, count, next, nblocks))
                    } else {
                        let mut fresh = Vec::new();
                        let r = self.refetch(first_block, count, &zeros, &in_flight, &mut fresh);
                        for (b, h) in fresh {
                            if let Some(slot) = cache
                                .as_mut()
                                .and_then(|c| c.get_mut(usize::try_from(b).unwrap_or(usize::MAX)))
                            {
                                *slot = h;
                            }
                        }
                        r
                    }
                }
                Message::SyncEnd { .. } if next == nblocks => {
                    let hashes = match cache.take() {
                        Some(c) => {
                            digest = DiskDigest::new();
                            for h in &c {
                                digest.push(h);
                            }
                            Some(c)
                        }
                        None => (!self.estimate).then(|| std::mem::take(&mut all)),
                    };
                    self.keep_cache(hashes, nblocks);
                    let done = self.sync_done(&digest);
                    drop((rx, permit));
                    if !done_sent {
                        self.out.blocking_send_raw(done.encode());
                    }
                    return;
                }
                Message::SyncEnd { .. } => Err((
                    ErrorCode::BadRequest,
                    format!(
                        "sync of disk {} ended after {next} of {nblocks} blocks",
                        self.disk.info.id
                    ),
                )),
                _ => Ok(()),
            };
            if let Err((code, message)) = res {
                tracing::error!(disk = %self.disk.info.id, "{message}");
                drop((rx, permit));
                let stream = self.stream;
                let error = Message::Error {
                    stream,
                    code,
                    message,
                };
                self.out.blocking_send_raw(error.encode());
                return;
            }
        }
        // The connection dropped mid-round: keep the hashes of what was compared, for a
        // `SyncResume` of this round.
        if cache.is_none() && !self.estimate {
            self.keep_prefix(all, next);
        }
    }

    fn sync_done(&self, digest: &DiskDigest) -> Message {
        Message::SyncDone {
            stream: self.stream,
            blocks: digest.blocks(),
            digest: digest.finish(),
        }
    }

    /// Whether the next batch's blocks are compressed: always, never, or (auto) while the
    /// connection's writer lags behind and zstd beats the link ([`AutoCompression::decide`]).
    fn squeeze(&self) -> bool {
        match self.compression {
            Compression::Zstd => true,
            Compression::None => false,
            Compression::Auto => {
                use std::sync::atomic::Ordering::Relaxed;
                let meter = &self.out.meter;
                let queued = self.out.sent.load(Relaxed).saturating_sub(meter.written());
                self.auto.borrow_mut().decide(queued, meter)
            }
        }
    }

    /// Decides what this round covers: a cut of the disk's dirty map (before any read) and,
    /// when the client's token is good and the agent holds the disk's hashes at this block
    /// size, a changes round; otherwise a hash compare.
    fn plan(&self, nblocks: u64) -> RoundPlan {
        let t = &self.disk.tracking;
        let compare = |token, dirty_bytes, lag_ms, note: String| RoundPlan {
            changes: None,
            message: Message::SyncPlan {
                stream: self.stream,
                changes: false,
                token,
                dirty_bytes,
                lag_ms,
                note,
            },
        };
        let size = self.disk.info.size;
        let map = match (&t.map, self.estimate) {
            (Some(map), false) => map,
            _ => return compare(None, size, None, t.status.clone()),
        };
        match self.disk.current_size() {
            Ok(now) if now != size => map.lose(format!(
                "disk {} changed size from {size} to {now} bytes (restart the agent to serve \
                 the new size)",
                self.disk.info.id
            )),
            Ok(_) => {}
            Err(e) => map.lose(format!(
                "cannot read the size of {}: {e}",
                self.disk.path.display()
            )),
        }
        let cut = map.cut(self.changes_since, self.block_size);
        let lag_ms = cut
            .oldest_change
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let runs = match cut.plan {
            Plan::Rescan(why) => {
                tracing::info!(disk = %self.disk.info.id, "hash-compare round: {why}");
                return compare(Some(cut.token), size, lag_ms, format!("rescan: {why}"));
            }
            Plan::Changes(runs) => runs,
        };
        let cached = t.cache.lock().unwrap_or_else(|p| p.into_inner()).take();
        match cached {
            Some(c) if c.block_size == self.block_size && c.hashes.len() as u64 == nblocks => {
                RoundPlan {
                    changes: Some((runs, c.hashes)),
                    message: Message::SyncPlan {
                        stream: self.stream,
                        changes: true,
                        token: Some(cut.token),
                        dirty_bytes: cut.backlog_bytes,
                        lag_ms,
                        note: "on".into(),
                    },
                }
            }
            _ => compare(
                Some(cut.token),
                size,
                lag_ms,
                format!(
                    "rescan: the agent holds no hashes of disk {} at block size {}",
                    self.disk.info.id, self.block_size
                ),
            ),
        }
    }

    /// Sends every block of `runs` (read afresh, hashed after reading) and updates `hashes`;
    /// returns the `ChangesDone` to send (`None` when the connection is gone).
    fn send_changes(
        &self,
        runs: &[(u64, u64)],
        zeros: &ZeroHashes,
        in_flight: &Arc<InFlight>,
        hashes: &mut [Hash],
    ) -> Option<Message> {
        let (mut blocks, mut bytes) = (0u64, 0u64);
        for &(first, count) in runs {
            let mut fresh = Vec::new();
            if let Err((_, m)) = self.refetch(first, count, zeros, in_flight, &mut fresh) {
                tracing::error!(disk = %self.disk.info.id, "{m}");
                self.out.blocking_send_raw(
                    Message::Error {
                        stream: self.stream,
                        code: ErrorCode::Io,
                        message: m,
                    }
                    .encode(),
                );
                return None;
            }
            for (b, h) in fresh {
                if let Some(slot) = hashes.get_mut(usize::try_from(b).unwrap_or(usize::MAX)) {
                    *slot = h;
                }
                blocks += 1;
                bytes += block::block_len(self.disk.info.size, self.block_size, b);
            }
        }
        Some(Message::ChangesDone {
            stream: self.stream,
            blocks,
            bytes,
        })
    }

    /// Keeps the hashes of a finished round (all blocks) for the next changes round.
    fn keep_cache(&self, hashes: Option<Vec<Hash>>, nblocks: u64) {
        let Some(hashes) = hashes.filter(|h| h.len() as u64 == nblocks) else {
            return;
        };
        if self.disk.tracking.map.is_none() {
            return; // no changes rounds without tracking: keep no memory
        }
        *self
            .disk
            .tracking
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(AgentCache {
            block_size: self.block_size,
            hashes,
        });
    }

    /// True when blocks `first..first + count` do not all lie below block `limit`.
    fn beyond(&self, first: u64, count: u64, limit: u64) -> bool {
        first.checked_add(count).is_none_or(|end| end > limit)
    }

    /// The error for a request of blocks `first..first + count` outside what may be asked.
    fn out_of_range(
        &self,
        what: &str,
        first: u64,
        count: u64,
        compared: u64,
        nblocks: u64,
    ) -> (ErrorCode, String) {
        let bs = u64::from(self.block_size);
        let offset = first
            .checked_mul(bs)
            .map_or_else(|| "beyond 2^64".to_owned(), |o| o.to_string());
        let d = &self.disk.info;
        (
            ErrorCode::BadRequest,
            format!(
                "{what} of {count} blocks from block {first} (byte offset {offset}) of disk {} \
                 is out of order or outside the {compared} blocks compared so far (the disk \
                 has {nblocks} blocks of {bs} bytes, {} bytes)",
                d.id, d.size
            ),
        )
    }

    /// Reads blocks `first..first + count` (inside the disk) into a fresh buffer.
    fn read(&self, first: u64, count: u64) -> Result<Vec<u8>, (ErrorCode, String)> {
        let bs = u64::from(self.block_size);
        let offset = first * bs;
        let end = ((first + count) * bs).min(self.disk.info.size);
        let len = usize::try_from(end - offset).map_err(|_| (ErrorCode::Io, "batch".into()))?;
        let mut buf = crate::pool::POOL.take_filled(len);
        crate::scan::Source::read(&self.disk, &mut buf, offset)?;
        Ok(buf)
    }

    fn window(
        &self,
        first: u64,
        client: &[Hash],
        zeros: &ZeroHashes,
        (digest, all): (&mut DiskDigest, &mut Vec<Hash>),
        scanner: &mut Scanner,
    ) -> Result<(), (ErrorCode, String)> {
        let bs = usize::try_from(self.block_size).unwrap_or(usize::MAX);
        let total = client.len() as u64;
        let mut g = Batch {
            hashes: Vec::new(),
            frames: Vec::new(),
            frame: None,
            differing: 0,
            differing_bytes: 0,
        };
        let mut done = 0u64;
        // One thread per stream: it hashes at several GB/s, more than the link it feeds, while
        // splitting batches over the rayon pool cost more in wake-ups and idle spinning than it
        // gained (measured: 3x the context switches, no time saved).
        let bs64 = u64::from(self.block_size);
        let batch_blocks = (block::BATCH_BYTES / bs64).max(1);
        while done < total {
            let n = batch_blocks.min(total - done);
            let offset = (first + done) * bs64;
            let len =
                usize::try_from(((first + done + n) * bs64).min(self.disk.info.size) - offset)
                    .unwrap_or(0);
            if let Some(p) = &self.pacer {
                p.wait(len as u64);
            }
            scanner.scan(&self.disk, offset, len, |at, data| {
                let b = at / bs64;
                let lo = usize::try_from(b - first).unwrap_or(usize::MAX);
                let theirs = &client[lo..lo + data.len().div_ceil(bs)];
                self.compare_batch(b, data, theirs, zeros, &mut g);
                for h in g.hashes.drain(..) {
                    digest.push(&h);
                    if !self.estimate {
                        all.push(h);
                    }
                }
                for f in g.frames.drain(..) {
                    self.flush(Some(f));
                }
            })?;
            done += n;
        }
        self.flush(g.frame.take());
        self.out.blocking_send_raw(
            Message::WindowDone {
                stream: self.stream,
                first_block: first,
                count: u32::try_from(total).unwrap_or(u32::MAX),
                differing: g.differing,
                differing_bytes: g.differing_bytes,
            }
            .encode(),
        );
        Ok(())
    }

    /// Compares consecutive blocks starting at block `first` with the client's hashes and
    /// frames the ones that differ (the open run in `g.frame` continues across calls; full
    /// runs go to `g.frames`). A differing block is hashed once (for the compare, or as it is
    /// framed when the client reported zeros) and copied once, into the TLS record that
    /// carries it.
    fn compare_batch(
        &self,
        first: u64,
        data: &bytes::Bytes,
        theirs: &[Hash],
        zeros: &ZeroHashes,
        g: &mut Batch,
    ) {
        let bs = usize::try_from(self.block_size).unwrap_or(usize::MAX);
        let squeeze = self.squeeze();
        for (i, (block, their)) in data.chunks(bs).zip(theirs).enumerate() {
            let index = first + i as u64;
            let range = i * bs..i * bs + block.len();
            let zero_hash = zeros.get(block.len());
            let zero = block::is_zero(block);
            // A non-zero block differs from one the client reported as zeros (an empty or new
            // target) without being compared first; it is hashed once, as it is framed.
            let (hash, differs) = if zero {
                (Some(zero_hash), *their != zero_hash)
            } else if *their == zero_hash && !self.estimate {
                (None, true)
            } else {
                let h = *blake3::hash(block).as_bytes();
                (Some(h), h != *their)
            };
            if !differs || self.estimate {
                g.hashes.push(hash.unwrap_or(zero_hash));
                if differs {
                    g.differing += 1;
                    g.differing_bytes += block.len() as u64;
                }
                continue;
            }
            if g.frame
                .as_ref()
                .is_some_and(|f| f.next_block() != index || f.len() >= RUN_BYTES)
            {
                g.frames.extend(g.frame.take());
            }
            let f = g.frame.get_or_insert_with(|| {
                BlocksFrame::new(self.stream, index, RUN_BYTES.div_ceil(bs) + 1)
            });
            let sent = if zero {
                f.push(Encoding::Zero, &zero_hash, data, 0..0);
                zero_hash
            } else if let Some(h) = self.maybe_corrupt(f, block, hash) {
                h
            } else {
                f.push_hashed(data, range, hash, |b| match (squeeze, self.compression) {
                    (false, _) => None,
                    (true, Compression::Auto) => self.auto.borrow_mut().compress(b),
                    (true, _) => block::compress_if_smaller(b),
                })
            };
            g.hashes.push(sent);
            g.differing += 1;
            g.differing_bytes += block.len() as u64;
        }
    }

    /// Fault injection (tests only): when due, frames `block` as a raw copy with one byte
    /// flipped, under the hash of the intact block; returns that hash.
    #[cfg(feature = "fault-injection")]
    fn maybe_corrupt(
        &self,
        frame: &mut BlocksFrame,
        block: &[u8],
        hash: Option<Hash>,
    ) -> Option<Hash> {
        let f = self.fault.as_ref()?;
        if block.is_empty() || !f.take() {
            return None;
        }
        tracing::warn!(
            "fault injection: corrupting a block of stream {}",
            self.stream
        );
        let h = hash.unwrap_or_else(|| *blake3::hash(block).as_bytes());
        let mut bad = block.to_vec();
        bad[block.len() / 2] ^= 0xff;
        frame.push_owned(Encoding::Raw, &h, bad);
        Some(h)
    }

    #[cfg(not(feature = "fault-injection"))]
    fn maybe_corrupt(&self, _: &mut BlocksFrame, _: &[u8], _: Option<Hash>) -> Option<Hash> {
        None
    }

    /// Sends blocks `first..first + count` (already compared, so inside the disk) again, read
    /// afresh, in runs of at most [`RUN_BYTES`]; waits while [`REFETCH_IN_FLIGHT`] bytes of
    /// them are not yet written to the connection, so any range costs bounded memory.
    fn refetch(
        &self,
        first: u64,
        count: u64,
        zeros: &ZeroHashes,
        in_flight: &Arc<InFlight>,
        fresh: &mut Vec<(u64, Hash)>,
    ) -> Result<(), (ErrorCode, String)> {
        let bs = u64::from(self.block_size);
        let chunk = (RUN_BYTES as u64 / bs).max(1);
        let mut at = first;
        while at < first + count {
            let n = chunk.min(first + count - at);
            let len = usize::try_from(n * bs).unwrap_or(usize::MAX);
            in_flight.wait_below(REFETCH_IN_FLIGHT.saturating_sub(len));
            // A private copy: hashed after reading, so what is sent matches its hash even on a
            // disk that changes.
            let data = in_flight.track(self.read(at, n)?);
            if !self.flush(Some(self.refetch_run(at, &data, zeros, in_flight, fresh))) {
                break; // the connection is gone
            }
            at += n;
        }
        Ok(())
    }

    /// One run of refetched blocks from `data`, starting at block `first`.
    fn refetch_run(
        &self,
        first: u64,
        data: &bytes::Bytes,
        zeros: &ZeroHashes,
        in_flight: &Arc<InFlight>,
        fresh: &mut Vec<(u64, Hash)>,
    ) -> BlocksFrame {
        let bs = usize::try_from(self.block_size).unwrap_or(usize::MAX);
        let mut frame = BlocksFrame::new(self.stream, first, data.len().div_ceil(bs));
        let squeeze = self.squeeze();
        for (i, block) in data.chunks(bs).enumerate() {
            let (hash, zero) = block::hash_block(block, zeros);
            fresh.push((first + i as u64, hash));
            let (encoding, compressed) = match (zero, squeeze) {
                (false, false) => (Encoding::Raw, None),
                _ => block::choose_encoding(block, zero),
            };
            if self.maybe_corrupt(&mut frame, block, Some(hash)).is_some() {
                continue;
            }
            match (encoding, compressed) {
                (Encoding::Zero, _) => frame.push(Encoding::Zero, &hash, data, 0..0),
                (Encoding::Zstd, Some(z)) => {
                    let z = in_flight.track(z);
                    frame.push(Encoding::Zstd, &hash, &z, 0..z.len());
                }
                _ => frame.push(Encoding::Raw, &hash, data, i * bs..i * bs + block.len()),
            }
        }
        frame
    }

    /// Queues a run (if any); `false` when the connection is gone.
    fn flush(&self, run: Option<BlocksFrame>) -> bool {
        match run.filter(|f| !f.is_empty()) {
            Some(frame) => self.out.blocking_send_pieces(frame.finish()),
            None => true,
        }
    }
}

/// Bytes of refetched blocks one stream may have queued for the connection's writer and not
/// yet seen written (two runs: one being written while the next is read).
const REFETCH_IN_FLIGHT: usize = 2 * RUN_BYTES;

/// Payload bytes a stream has handed to the connection's writer that are not written yet.
#[derive(Debug, Default)]
struct InFlight {
    bytes: Mutex<usize>,
    written: Condvar,
}

impl InFlight {
    /// `data` as shared bytes that count as in flight until every slice of them is dropped.
    fn track(self: &Arc<Self>, data: Vec<u8>) -> bytes::Bytes {
        *self.bytes.lock().unwrap_or_else(|p| p.into_inner()) += data.len();
        bytes::Bytes::from_owner(Tracked {
            data,
            budget: self.clone(),
        })
    }

    /// Blocks until at most `limit` bytes are in flight.
    fn wait_below(&self, limit: usize) {
        let mut n = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        while *n > limit {
            n = self.written.wait(n).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Owner of tracked bytes (see [`InFlight::track`]); dropping it releases them (and the buffer
/// goes back to the frame pool).
struct Tracked {
    data: Vec<u8>,
    budget: Arc<InFlight>,
}

impl AsRef<[u8]> for Tracked {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let len = self.data.len();
        crate::pool::POOL.give(std::mem::take(&mut self.data));
        let mut n = self.budget.bytes.lock().unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_sub(len);
        self.budget.written.notify_all();
    }
}

#[cfg(test)]
mod auto_compression_tests {
    use super::*;

    #[test]
    fn auto_follows_the_data_and_the_link() {
        let text: Vec<u8> = b"Dec  3 10:00:01 host sshd[811]: Accepted publickey\n"
            .iter()
            .cycle()
            .take(65536)
            .copied()
            .collect();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut random = || -> Vec<u8> {
            (0..65536)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()[0]
                })
                .collect()
        };
        // A slow link (1 MB/s): the first text block is measured and compression turns on,
        // and stays on through random data (zstd is far faster than the link).
        let mut slow = AutoCompression {
            drain: Some(1e6),
            backlogged: true,
            ..AutoCompression::default()
        };
        assert!(slow.compress(&text).is_some());
        assert!(slow.on, "text through a slow link: {slow:?}");
        for _ in 0..60 {
            slow.compress(&random());
        }
        assert!(slow.on, "random data through a slow link: {slow:?}");
        // Off on data that zstd shrinks little and slowly (ratio 1, 1.2 × the link) ...
        let mut a = AutoCompression {
            drain: Some(1e6),
            backlogged: true,
            zin: 50.0 * 65536.0,
            zout: 50.0 * 65536.0,
            zsecs: 50.0 * 65536.0 / 1.2e6,
            ..AutoCompression::default()
        };
        assert!(!a.rule(), "{a:?}");
        // ... and on once sample blocks show text (samples: one block in Z_SAMPLE, within the
        // time budget; the stream has run for a while).
        a.started -= Duration::from_secs(10);
        let on = (0..200).position(|_| {
            a.compress(&text);
            a.on
        });
        assert!(on.is_some_and(|n| n < 100), "{on:?} {a:?}");
        // A link faster than zstd: off even for text (measured, then never on).
        let mut fast = AutoCompression {
            drain: Some(1e12),
            backlogged: true,
            ..AutoCompression::default()
        };
        fast.compress(&text);
        assert!(!fast.on, "{fast:?}");
    }

    /// The queue from which the writer lags: what a measured link drains while zstd
    /// compresses two batches, between 256 KiB and one run.
    #[test]
    fn lag_threshold_follows_the_link() {
        let with = |drain: Option<f64>| AutoCompression {
            drain,
            zin: 300e6,
            zout: 100e6,
            zsecs: 1.0,
            ..AutoCompression::default()
        };
        // 25 MB/s while zstd takes 14 ms per 4 MiB batch: 2 x 0.35 MB.
        let slow = with(Some(25e6)).lag_threshold();
        assert!((690_000..710_000).contains(&slow), "{slow}");
        assert_eq!(with(Some(1e9)).lag_threshold(), BACKLOG);
        assert_eq!(with(Some(1e3)).lag_threshold(), LAG_LEAST);
        assert_eq!(with(None).lag_threshold(), BACKLOG);
        assert_eq!(AutoCompression::default().lag_threshold(), BACKLOG);
    }

    /// What the link has carried since the first lag counts, less what may still be on the
    /// way; it is a lower bound (the time since the first lag is at least 100 ms here).
    #[test]
    fn carried_is_a_lower_bound_past_the_hidden_bytes() {
        let now = std::time::Instant::now();
        let first_lag = (now - Duration::from_millis(100), 0);
        assert_eq!(
            carried(first_lag, now, HIDDEN),
            None,
            "all of it may still be on the way"
        );
        let rate = carried(first_lag, now, HIDDEN + 10_000_000).expect("a rate");
        assert!(rate > 0.0 && rate <= 100e6, "{rate}");
        // A sample that reads far lower does not make the link that slow.
        let mut a = AutoCompression {
            first_lag: Some(first_lag),
            sampled: Some(1e6),
            ..AutoCompression::default()
        };
        let meter = SendMeter::default();
        meter.add_written(HIDDEN + 10_000_000);
        assert!(a.decide(BACKLOG, &meter));
        assert!(a.drain.is_some_and(|d| d > 1e6 && d <= 100e6), "{a:?}");
        // Before any lag nothing is decided.
        assert!(!AutoCompression::default().decide(0, &meter));
    }

    /// The writer's busy rate never counts a burst into buffers with room: the trace of a
    /// stream through 25 MB/s that sent 80 MB raw had 4 MiB written in 1.5 ms with something
    /// queued and no stall, read as 2.8 GB/s.
    #[test]
    fn a_burst_into_empty_buffers_is_not_the_link() {
        let t = std::time::Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        let mut a = AutoCompression::default();
        assert_eq!(a.measure_busy(t, 4 << 20, 0, false), None);
        assert_eq!(a.measure_busy(ms(2), 4 << 20, 4 << 20, false), None);
        // Past the hidden bytes it counts, less those: 4 MiB over 160 ms (the link's rate).
        let rate = a.measure_busy(ms(160), 4 << 20, HIDDEN + (4 << 20), false);
        assert!(
            rate.is_some_and(|r| (26e6..26.3e6).contains(&r)),
            "{rate:?}"
        );
        // A span that begins in a stall begins with the buffers full: all of it counts, and
        // later stalls do not restart it.
        assert_eq!(a.measure_busy(ms(200), 4 << 20, 100 << 20, true), None);
        for (t, mib, stalling) in [(360, 104, false), (520, 108, true)] {
            let rate = a.measure_busy(ms(t), 4 << 20, mib << 20, stalling);
            assert!(
                rate.is_some_and(|r| (26e6..26.3e6).contains(&r)),
                "{t}: {rate:?}"
            );
        }
        // A dry queue ends the span; the next one may begin with the buffers empty again.
        assert_eq!(a.measure_busy(ms(600), 0, 108 << 20, false), None);
        assert_eq!(a.measure_busy(ms(601), 1 << 20, 108 << 20, false), None);
        assert_eq!(a.measure_busy(ms(602), 1 << 20, 112 << 20, false), None);
        // Through a whole stream: decide() never takes the burst for the link.
        let meter = SendMeter::default();
        let mut a = AutoCompression::default();
        assert!(a.decide(BACKLOG, &meter));
        meter.add_written(4 << 20);
        assert!(a.decide(BACKLOG, &meter));
        assert_eq!(a.drain, None, "{a:?}");
        assert!(
            a.on,
            "unmeasured link, lagging writer: compress what shrinks"
        );
    }

    /// Before the link is measured a far path compresses what shrinks while the writer lags,
    /// a near one sends raw; once measured, both follow the rule.
    #[test]
    fn a_near_path_sends_raw_until_the_link_is_measured() {
        let meter = SendMeter::default();
        for (handshake, far) in [(1, false), (9, false), (10, true), (40, true)] {
            let mut a = AutoCompression::for_path(Duration::from_millis(handshake));
            assert_eq!(a.far, far, "{handshake} ms");
            assert!(a.decide(BACKLOG, &meter));
            assert_eq!(a.on, far, "{handshake} ms, nothing measured: {a:?}");
            // zstd measured on text (ratio 0.3): the same.
            (a.zin, a.zout, a.zsecs) = (1e6, 0.3e6, 1e6 / 300e6);
            assert_eq!(a.rule(), far, "{handshake} ms, zstd measured: {a:?}");
            // The link measured at 25 MB/s: on, whatever the path.
            a.drain = Some(25e6);
            assert!(a.rule(), "{handshake} ms, link measured: {a:?}");
        }
    }

    /// The rule as a table: (drain B/s, zstd input B/s, ratio out/in) -> on.
    #[test]
    fn auto_rule_table() {
        for (drain, rate, ratio, on) in [
            // zstd far faster than the link: on whatever the data.
            (25e6, 500e6, 1.0, true),
            (25e6, 500e6, 0.3, true),
            // zstd slower than the link: off even for text.
            (1e9, 500e6, 0.3, false),
            // zstd a little faster than the link: on only where the data shrinks.
            (300e6, 400e6, 0.3, true),
            (300e6, 400e6, 0.97, false),
            (300e6, 400e6, 1.0, false),
        ] {
            let mut a = AutoCompression {
                drain: Some(drain),
                backlogged: true,
                zin: 1e6,
                zout: 1e6 * ratio,
                zsecs: 1e6 / rate,
                ..AutoCompression::default()
            };
            assert_eq!(a.rule(), on, "drain {drain}, zstd {rate}, ratio {ratio}");
            // Raw whatever the rates while the writer keeps up: the link has room.
            a.backlogged = false;
            assert!(
                !a.rule(),
                "drain {drain}, zstd {rate}, ratio {ratio}, queue short"
            );
        }
        // The writer lags, the link's rate not measured yet: on where zstd shrinks the data
        // (or has not been measured), off where it does not.
        for (ratio, on) in [(0.3, true), (0.95, true), (0.96, false), (1.0, false)] {
            let mut a = AutoCompression {
                zin: 1e6,
                zout: 1e6 * ratio,
                zsecs: 1e-3,
                backlogged: true,
                ..AutoCompression::default()
            };
            assert_eq!(a.rule(), on, "link unmeasured, ratio {ratio}");
            // ... and raw once the writer keeps up again.
            a.backlogged = false;
            assert!(!a.rule(), "link unmeasured, ratio {ratio}, queue short");
        }
        let nothing = AutoCompression {
            backlogged: true,
            ..AutoCompression::default()
        };
        assert!(nothing.rule(), "nothing measured yet");
        // The link measured, zstd not yet: off (sample blocks measure it).
        let a = AutoCompression {
            drain: Some(25e6),
            backlogged: true,
            ..AutoCompression::default()
        };
        assert!(!a.rule());
    }
}
