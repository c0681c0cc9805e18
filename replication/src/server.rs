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
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::block::{self, DiskDigest, ZeroHashes};
use crate::conn::{spawn_writer, DeadSlot, FrameReader, FrameSender};
use crate::device;
use crate::error::{Error, Result};
use crate::scan::Scanner;
use crate::tls::{instance_id_from_cert, ServerTls};
use crate::wire::{
    BlocksFrame, DiskInfo, Encoding, ErrorCode, Hash, Message, CONNECTION_STREAM, PROTOCOL_VERSION,
};

/// How long a client may take to finish the TLS handshake and send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
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
        })
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
}

/// Serves `disks` on `listener` until the listener fails. Each connection runs in its own task;
/// a failing connection is logged and closed without affecting others.
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
        opts,
    });
    loop {
        let (tcp, addr) = listener.accept().await?;
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let peer = addr.to_string();
            tracing::info!(%peer, "client connected");
            match handle(tcp, peer.clone(), ctx).await {
                Ok(()) => tracing::info!(%peer, "client disconnected"),
                Err(e) => tracing::error!(%peer, "connection closed: {e}"),
            }
        });
    }
}

fn stream_of(m: &Message) -> Option<u32> {
    match m {
        Message::SyncStart { stream, .. }
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

async fn handle(tcp: TcpStream, peer: String, ctx: Arc<Ctx>) -> Result<()> {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(HELLO_TIMEOUT, crate::record::accept(tcp, ctx.tls.clone()))
        .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(Error::Handshake { peer, source }),
        Err(_) => {
            return Err(Error::Timeout {
                peer,
                what: "TLS handshake",
                secs: HELLO_TIMEOUT.as_secs(),
            })
        }
    };
    let (r, w, certs) = tls;
    let client_instance = certs.first().and_then(|c| instance_id_from_cert(c));
    let dead = DeadSlot::default();
    let (out, writer) = spawn_writer(w, dead);
    let mut reader = FrameReader::new(r, peer.clone());
    let res = session(&mut reader, &out, &peer, client_instance, &ctx).await;
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
    let _ = tokio::time::timeout(Duration::from_secs(10), writer).await;
    res
}

async fn session(
    reader: &mut FrameReader<crate::record::TlsReader>,
    out: &FrameSender,
    peer: &str,
    client_instance: Option<String>,
    ctx: &Arc<Ctx>,
) -> Result<()> {
    let first = match tokio::time::timeout(HELLO_TIMEOUT, reader.read()).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(Error::Timeout {
                peer: peer.to_owned(),
                what: "hello",
                secs: HELLO_TIMEOUT.as_secs(),
            })
        }
    };
    match first {
        Some((Message::ClientHello { version }, _)) if version == PROTOCOL_VERSION => {}
        Some((Message::ClientHello { version }, _)) => {
            return Err(Error::VersionMismatch {
                agent: PROTOCOL_VERSION,
                client: version,
            })
        }
        Some((other, _)) => {
            return Err(Error::Protocol {
                peer: peer.to_owned(),
                message: format!("expected ClientHello, got {}", other.name()),
            })
        }
        None => {
            return Err(Error::ConnectionLost {
                peer: peer.to_owned(),
                reason: "closed before hello".into(),
            })
        }
    }
    if let Some(want) = &ctx.instance {
        if client_instance.as_deref() != Some(want.as_str()) {
            let message = format!(
                "client certificate is for instance {}, but this agent serves instance {want}",
                client_instance.as_deref().unwrap_or("<none>")
            );
            return Err(Error::Remote {
                peer: peer.to_owned(),
                code: ErrorCode::NotAuthorized,
                message,
            });
        }
    }
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

    let mut streams: HashMap<u32, mpsc::Sender<Message>> = HashMap::new();
    loop {
        let Some((msg, _)) = reader.read().await? else {
            return Ok(());
        };
        match msg {
            Message::SyncStart {
                stream,
                disk,
                block_size,
                estimate,
            } => {
                if stream == CONNECTION_STREAM || streams.contains_key(&stream) {
                    return Err(Error::Protocol {
                        peer: peer.to_owned(),
                        message: format!("stream id {stream} reused"),
                    });
                }
                let Some(src) = ctx.disks.iter().find(|d| d.info.id == disk) else {
                    send_error(
                        out,
                        stream,
                        ErrorCode::UnknownDisk,
                        format!("this agent serves no disk {disk:?}"),
                    )
                    .await;
                    continue;
                };
                if let Err(m) = block::validate_block_size(block_size) {
                    send_error(out, stream, ErrorCode::BadRequest, m).await;
                    continue;
                }
                streams.retain(|_, tx| !tx.is_closed());
                let (tx, rx) = mpsc::channel(16);
                streams.insert(stream, tx);
                let worker = StreamWorker {
                    disk: src.clone(),
                    stream,
                    block_size,
                    estimate,
                    out: out.clone(),
                    #[cfg(feature = "fault-injection")]
                    fault: ctx.opts.fault.clone(),
                };
                tokio::task::spawn_blocking(move || worker.run(rx));
            }
            m @ (Message::Hashes { .. } | Message::Refetch { .. } | Message::SyncEnd { .. }) => {
                let stream = stream_of(&m).unwrap_or(CONNECTION_STREAM);
                match streams.get(&stream) {
                    Some(tx) => {
                        // A closed worker already reported its error; drop the message.
                        let _ = tx.send(m).await;
                    }
                    None => {
                        return Err(Error::Protocol {
                            peer: peer.to_owned(),
                            message: format!("{} for unknown stream {stream}", m.name()),
                        })
                    }
                }
            }
            Message::Quiesce | Message::Thaw => {
                let quiesce = matches!(msg, Message::Quiesce);
                let cmd = if quiesce {
                    ctx.opts.quiesce_cmd.clone()
                } else {
                    ctx.opts.thaw_cmd.clone()
                };
                let out = out.clone();
                tokio::spawn(async move {
                    let what = if quiesce { "quiesce" } else { "thaw" };
                    let reply = run_command(what, cmd).await;
                    let msg = match reply {
                        Ok(message) => Message::CommandDone { message },
                        Err(message) => Message::Error {
                            stream: CONNECTION_STREAM,
                            code: ErrorCode::CommandFailed,
                            message,
                        },
                    };
                    out.send(&msg).await;
                });
            }
            other => {
                return Err(Error::Protocol {
                    peer: peer.to_owned(),
                    message: format!("unexpected {} from client", other.name()),
                })
            }
        }
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
    out: FrameSender,
    #[cfg(feature = "fault-injection")]
    fault: Option<Arc<FaultInjection>>,
}

impl StreamWorker {
    fn run(self, mut rx: mpsc::Receiver<Message>) {
        let size = self.disk.info.size;
        let nblocks = block::block_count(size, self.block_size);
        let zeros = ZeroHashes::new(size, self.block_size);
        let mut digest = DiskDigest::new();
        let mut next = 0u64;
        let mut buf = Vec::new();
        let mut scanner = Scanner::new(self.block_size);
        while let Some(m) = rx.blocking_recv() {
            let res = match m {
                Message::Hashes {
                    first_block,
                    hashes,
                    ..
                } => {
                    if first_block != next || first_block + hashes.len() as u64 > nblocks {
                        Err((
                            ErrorCode::BadRequest,
                            format!(
                                "hash window {first_block}+{} out of order or beyond the {nblocks} blocks of disk {}",
                                hashes.len(),
                                self.disk.info.id
                            ),
                        ))
                    } else {
                        next += hashes.len() as u64;
                        self.window(first_block, &hashes, &zeros, &mut digest, &mut scanner)
                    }
                }
                Message::Refetch {
                    first_block, count, ..
                } => {
                    if first_block + u64::from(count) > next {
                        Err((
                            ErrorCode::BadRequest,
                            format!("refetch of blocks {first_block}+{count} not yet compared"),
                        ))
                    } else {
                        self.refetch(first_block, count, &zeros, &mut buf)
                    }
                }
                Message::SyncEnd { .. } => {
                    if next != nblocks {
                        Err((
                            ErrorCode::BadRequest,
                            format!("sync ended after {next} of {nblocks} blocks"),
                        ))
                    } else {
                        self.out.blocking_send_raw(
                            Message::SyncDone {
                                stream: self.stream,
                                blocks: digest.blocks(),
                                digest: digest.finish(),
                            }
                            .encode(),
                        );
                        return;
                    }
                }
                _ => Ok(()),
            };
            if let Err((code, message)) = res {
                tracing::error!(disk = %self.disk.info.id, "{message}");
                self.out.blocking_send_raw(
                    Message::Error {
                        stream: self.stream,
                        code,
                        message,
                    }
                    .encode(),
                );
                return;
            }
        }
    }

    fn read(&self, buf: &mut Vec<u8>, first: u64, count: u64) -> Result<(), (ErrorCode, String)> {
        let bs = u64::from(self.block_size);
        let offset = first * bs;
        let end = ((first + count) * bs).min(self.disk.info.size);
        let len = usize::try_from(end - offset).map_err(|_| (ErrorCode::Io, "batch".into()))?;
        buf.resize(len, 0);
        crate::scan::Source::read(&self.disk, buf, offset)
    }

    fn window(
        &self,
        first: u64,
        client: &[Hash],
        zeros: &ZeroHashes,
        digest: &mut DiskDigest,
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
            scanner.scan(&self.disk, offset, len, |at, data| {
                let b = at / bs64;
                let lo = usize::try_from(b - first).unwrap_or(usize::MAX);
                let theirs = &client[lo..lo + data.len().div_ceil(bs)];
                self.compare_batch(b, data, theirs, zeros, &mut g);
                for h in g.hashes.drain(..) {
                    digest.push(&h);
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
                f.push_hashed(data, range, hash, block::compress_if_smaller)
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

    fn refetch(
        &self,
        first: u64,
        count: u32,
        zeros: &ZeroHashes,
        buf: &mut Vec<u8>,
    ) -> Result<(), (ErrorCode, String)> {
        let bs = usize::try_from(self.block_size).unwrap_or(usize::MAX);
        self.read(buf, first, u64::from(count))?;
        // A private copy: hashed after reading, so what is sent matches its hash even on a
        // disk that changes.
        let data = bytes::Bytes::from(std::mem::take(buf));
        let mut frame = BlocksFrame::new(self.stream, first, data.len().div_ceil(bs));
        for (i, block) in data.chunks(bs).enumerate() {
            let (hash, zero) = block::hash_block(block, zeros);
            let (encoding, compressed) = block::choose_encoding(block, zero);
            if self.maybe_corrupt(&mut frame, block, Some(hash)).is_some() {
                continue;
            }
            match (encoding, compressed) {
                (Encoding::Zero, _) => frame.push(Encoding::Zero, &hash, &data, 0..0),
                (Encoding::Zstd, Some(z)) => frame.push_owned(Encoding::Zstd, &hash, z),
                _ => frame.push(Encoding::Raw, &hash, &data, i * bs..i * bs + block.len()),
            }
        }
        self.flush(Some(frame));
        Ok(())
    }

    fn flush(&self, run: Option<BlocksFrame>) {
        if let Some(frame) = run.filter(|f| !f.is_empty()) {
            self.out.blocking_send_pieces(frame.finish());
        }
    }
}
