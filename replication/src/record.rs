//! TLS 1.3 for the data path: rustls authenticates both peers, this module protects the
//! records afterwards (RFC 8446 §5).
//!
//! Why not rustls' stream types: their buffered API copies every byte three or four times on
//! its way (socket → deframer → plaintext queue → caller, and back the other way), which cost
//! as much CPU per disk byte as AES-GCM and BLAKE3 together. The kernel TLS offload that
//! avoids those copies is not built into the kernels we run on (`CONFIG_TLS` off). rustls
//! supports exactly this split for such cases: the handshake runs in its unbuffered API, the
//! traffic secrets are handed over (`dangerous_into_kernel_connection`) and rustls keeps
//! deriving the secrets of later key updates. What goes over the wire is plain TLS 1.3 (stock
//! rustls peers interoperate; tested). Block payloads are not copied in user space at all:
//! [`TlsWriter::write_pieces`] encrypts them from where they lie into the records, and a read
//! that has room for a whole record decrypts it straight into the caller's buffer (aws-lc-rs
//! does AES-GCM out of place; ring, used for the handshake, only in place). Other writes are
//! copied into a record and encrypted there; a read without room for a whole record decrypts
//! it in place and copies out what fits.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use aws_lc_rs::aead;
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{ClientConfig, ConnectionTrafficSecrets, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::sendmeter::{SendMeter, StallClock};

/// Largest plaintext of one record (RFC 8446 §5.1).
const MAX_PLAINTEXT: usize = 16 * 1024;
/// Largest ciphertext of one record (RFC 8446 §5.2).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
const HEADER: usize = 5;
const TAG: usize = 16;
/// Record content types.
const APPLICATION_DATA: u8 = 23;
const HANDSHAKE: u8 = 22;
const ALERT: u8 = 21;
/// Handshake message types that may follow the handshake.
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;
/// Socket read size: large reads mean few system calls and few wake-ups.
const READ_BUFFER: usize = 1024 * 1024;
/// Encrypted bytes gathered before a write to the socket.
const WRITE_BUFFER: usize = 1024 * 1024;
/// A fresh key after this many records (16 GiB of full records): far below the AES-GCM
/// confidentiality limit (2^24.5 records, RFC 8446 §5.5), so a multi-terabyte disk never
/// gets near it on one key.
const KEY_UPDATE_RECORDS: u64 = 1 << 20;

/// Message of an EOF without close_notify; [`crate::conn::FrameReader`] tells a dropped
/// connection (network error) from a clean close mid-frame (truncated frame) by it.
const NO_CLOSE_NOTIFY: &str = "peer closed connection without sending TLS close_notify";

/// Bytes of a full record: header, plaintext, content type, tag.
const FULL_RECORD: usize = HEADER + MAX_PLAINTEXT + 1 + TAG;
/// Records sealed before they go to the socket together (~1 MiB): the socket copies them while
/// they are still in the L2 cache from being encrypted, and fewer, larger sends wake the
/// reader less often (measured: 16 alternating full-sync pairs, 64 faster than 16 in 11).
const SEAL_BATCH: usize = 64;
/// Pieces shorter than this are copied and gathered into shared records; longer ones get
/// records of their own, sealed straight from where they lie.
const GATHER_BELOW: usize = 4096;

/// A frame as a short head and payload pieces that stay where they are (a disk read buffer, a
/// memory map of the disk, a compressor's output) until [`TlsWriter::write_pieces`] encrypts
/// them straight into records. Copying a block into a record before encrypting it there was
/// 9 % of the agent's CPU in a 4 GiB full sync (2.4 GiB through memmove); AES-GCM reading the
/// source and writing the record does both in one pass.
#[derive(Debug, Default)]
pub struct Pieces {
    /// Bytes sent first (a frame's length prefix, tag and fixed fields).
    pub head: Vec<u8>,
    /// Bytes sent after the head, in order.
    pub pieces: Vec<bytes::Bytes>,
}

impl Pieces {
    /// Plaintext bytes in all.
    pub fn len(&self) -> usize {
        self.head.len() + self.pieces.iter().map(bytes::Bytes::len).sum::<usize>()
    }

    /// True when there is nothing to send.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The plaintext as one buffer (tests, and peers without a record layer).
    pub fn to_plain(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        v.extend_from_slice(&self.head);
        for p in &self.pieces {
            v.extend_from_slice(p);
        }
        v
    }

    /// Most records these pieces take (key updates are scheduled before a frame).
    fn max_records(&self) -> u64 {
        let n: usize = std::iter::once(self.head.len())
            .chain(self.pieces.iter().map(bytes::Bytes::len))
            .map(|l| l.div_ceil(MAX_PLAINTEXT).max(1))
            .sum();
        n as u64
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// One direction's AEAD key and record sequence number.
struct Protector {
    key: aead::LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Protector {
    fn new(seq: u64, secrets: &ConnectionTrafficSecrets) -> io::Result<Self> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(invalid("negotiated TLS cipher suite is not supported")),
        };
        let key = aead::UnboundKey::new(alg, key.as_ref())
            .map_err(|_| invalid("TLS traffic key has the wrong length"))?;
        let iv: [u8; 12] = iv
            .as_ref()
            .try_into()
            .map_err(|_| invalid("TLS traffic IV has the wrong length"))?;
        Ok(Protector {
            key: aead::LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The per-record nonce: the IV XOR the sequence number (RFC 8446 §5.3).
    fn next_nonce(&mut self) -> io::Result<aead::Nonce> {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| invalid("TLS record sequence number exhausted"))?;
        Ok(aead::Nonce::assume_unique_for_key(n))
    }

    /// Appends one record carrying `data` (at most [`MAX_PLAINTEXT`]) to `out`.
    fn seal(&mut self, out: &mut Vec<u8>, content_type: u8, data: &[u8]) -> io::Result<()> {
        let len = u16::try_from(data.len() + 1 + TAG)
            .ok()
            .filter(|&l| usize::from(l) <= MAX_CIPHERTEXT)
            .ok_or_else(|| invalid("TLS record payload too large"))?
            .to_be_bytes();
        let header = [APPLICATION_DATA, 3, 3, len[0], len[1]];
        out.extend_from_slice(&header);
        let start = out.len();
        out.extend_from_slice(data);
        out.push(content_type);
        let nonce = self.next_nonce()?;
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, aead::Aad::from(header), &mut out[start..])
            .map_err(|_| invalid("TLS record encryption failed"))?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Writes one application-data record carrying `data` (at most [`MAX_PLAINTEXT`]) at the
    /// start of `out`, encrypting `data` where it lies; returns the record's length.
    fn seal_into(&mut self, out: &mut [u8], data: &[u8]) -> io::Result<usize> {
        let n = data.len();
        let len = u16::try_from(n + 1 + TAG)
            .ok()
            .filter(|&l| usize::from(l) <= MAX_CIPHERTEXT)
            .ok_or_else(|| invalid("TLS record payload too large"))?
            .to_be_bytes();
        let header = [APPLICATION_DATA, 3, 3, len[0], len[1]];
        let rec = out
            .get_mut(..HEADER + n + 1 + TAG)
            .ok_or_else(|| invalid("TLS record buffer too small"))?;
        rec[..HEADER].copy_from_slice(&header);
        let (body, trailer) = rec[HEADER..].split_at_mut(n);
        let nonce = self.next_nonce()?;
        self.key
            .seal_out_of_place_scatter(
                nonce,
                aead::Aad::from(header),
                data,
                body,
                &[APPLICATION_DATA],
                trailer,
            )
            .map_err(|_| invalid("TLS record encryption failed"))?;
        Ok(HEADER + n + 1 + TAG)
    }
}

/// rustls' key schedule after the handshake (derives the secrets of key updates).
enum Keys {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Keys {
    fn update_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Keys::Client(k) => k.update_tx_secret(),
            Keys::Server(k) => k.update_tx_secret(),
        }
    }
    fn update_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Keys::Client(k) => k.update_rx_secret(),
            Keys::Server(k) => k.update_rx_secret(),
        }
    }
}

/// State both halves share: the key schedule, and whether the peer asked for our key update.
struct Shared {
    keys: Mutex<Keys>,
    /// The peer sent KeyUpdate(update_requested): ours goes out before our next record.
    update_requested: std::sync::atomic::AtomicBool,
}

type SharedKeys = Arc<Shared>;

fn lock(keys: &SharedKeys) -> std::sync::MutexGuard<'_, Keys> {
    keys.keys.lock().unwrap_or_else(|p| p.into_inner())
}

/// The content type of a decrypted record and where it lies: the last non-zero byte; zeros
/// after it are padding (RFC 8446 §5.4).
fn content_type(inner: &[u8]) -> io::Result<(u8, usize)> {
    let at = inner
        .iter()
        .rposition(|&b| b != 0)
        .ok_or_else(|| invalid("TLS record without a content type"))?;
    Ok((inner[at], at))
}

/// The read half: decrypts records into the caller's buffer when a whole record fits there,
/// otherwise in place in a large buffer.
pub struct TlsReader {
    sock: OwnedReadHalf,
    buf: Vec<u8>,
    /// Unprocessed (still encrypted) bytes: `buf[start..end]`.
    start: usize,
    end: usize,
    /// Decrypted bytes not yet handed out: `buf[plain.0..plain.1]` (before `start`).
    plain: (usize, usize),
    /// Plaintext that arrived with the handshake, handed out first.
    early: Vec<u8>,
    rx: Protector,
    keys: SharedKeys,
    /// close_notify received: reads return end of stream.
    closed: bool,
}

impl TlsReader {
    /// The next complete record in the buffer: its header and where its body lies; `None` if
    /// none is complete yet.
    fn next_record(&self) -> io::Result<Option<([u8; HEADER], usize, usize)>> {
        let avail = self.end - self.start;
        if avail < HEADER {
            return Ok(None);
        }
        let h: [u8; HEADER] = self.buf[self.start..self.start + HEADER]
            .try_into()
            .map_err(|_| invalid("TLS record header"))?;
        if h[0] != APPLICATION_DATA {
            return Err(invalid(format!(
                "unexpected unencrypted TLS record of type {} after the handshake",
                h[0]
            )));
        }
        let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
        if !(TAG + 1..=MAX_CIPHERTEXT).contains(&len) {
            return Err(invalid(format!(
                "TLS record of {len} bytes is out of bounds"
            )));
        }
        if avail < HEADER + len {
            return Ok(None);
        }
        Ok(Some((h, self.start + HEADER, len)))
    }

    /// Decrypts the next complete record in the buffer; `false` if none is complete yet.
    fn open_next(&mut self) -> io::Result<bool> {
        let Some((h, body, len)) = self.next_record()? else {
            return Ok(false);
        };
        self.start = body + len;
        let nonce = self.rx.next_nonce()?;
        let inner = self
            .rx
            .key
            .open_in_place(nonce, aead::Aad::from(h), &mut self.buf[body..body + len])
            .map_err(|_| invalid("TLS record failed authentication (corrupted or forged)"))?;
        let (typ, typ_at) = content_type(inner)?;
        if typ == APPLICATION_DATA {
            self.plain = (body, body + typ_at);
        } else {
            let inner = inner[..typ_at].to_vec();
            self.control(typ, &inner)?;
        }
        Ok(true)
    }

    /// Decrypts the next complete record straight into `out` when its plaintext (and content
    /// type byte) fits: no copy out of the read buffer. `None`: not done (no complete record,
    /// or it does not fit); `Some(n)`: `n` bytes of application data put into `out`.
    fn open_into(&mut self, out: &mut ReadBuf<'_>) -> io::Result<Option<usize>> {
        let Some((h, body, len)) = self.next_record()? else {
            return Ok(None);
        };
        let inner_len = len - TAG;
        if out.remaining() < inner_len {
            return Ok(None);
        }
        self.start = body + len;
        let nonce = self.rx.next_nonce()?;
        let dst = out.initialize_unfilled_to(inner_len);
        let (ct, tag) = self.buf[body..body + len].split_at(inner_len);
        self.rx
            .key
            .open_separate_gather(nonce, aead::Aad::from(h), ct, tag, dst)
            .map_err(|_| invalid("TLS record failed authentication (corrupted or forged)"))?;
        let (typ, typ_at) = content_type(dst)?;
        if typ == APPLICATION_DATA {
            out.advance(typ_at);
            return Ok(Some(typ_at));
        }
        // Not data (an alert or a handshake message): the bytes in `out` beyond what is filled
        // are scratch.
        let inner = dst[..typ_at].to_vec();
        self.control(typ, &inner)?;
        Ok(Some(0))
    }

    /// A record that is not application data: close_notify, a post-handshake message, or an
    /// error.
    fn control(&mut self, typ: u8, inner: &[u8]) -> io::Result<()> {
        match typ {
            ALERT => {
                if inner == [1, 0] || inner == [2, 0] {
                    self.closed = true;
                    Ok(())
                } else {
                    let desc = inner.get(1).copied().unwrap_or(0);
                    Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        format!("peer sent TLS alert {desc}"),
                    ))
                }
            }
            HANDSHAKE => self.handshake_messages(inner),
            other => Err(invalid(format!(
                "unexpected TLS content type {other} after the handshake"
            ))),
        }
    }

    /// Post-handshake messages: key updates are honoured (a requested one is answered before
    /// our next record, RFC 8446 §4.6.3), session tickets ignored (no resumption is used),
    /// anything else ends the connection.
    fn handshake_messages(&mut self, mut msgs: &[u8]) -> io::Result<()> {
        while !msgs.is_empty() {
            if msgs.len() < 4 {
                return Err(invalid("truncated TLS handshake message"));
            }
            let typ = msgs[0];
            let len = usize::from(msgs[1]) << 16 | usize::from(msgs[2]) << 8 | usize::from(msgs[3]);
            let body = msgs
                .get(4..4 + len)
                .ok_or_else(|| invalid("truncated TLS handshake message"))?;
            match (typ, body) {
                (NEW_SESSION_TICKET, _) => {}
                (KEY_UPDATE, [req @ (0 | 1)]) if msgs.len() == 4 + len => {
                    let (seq, secrets) = lock(&self.keys).update_rx().map_err(tls_error)?;
                    self.rx = Protector::new(seq, &secrets)?;
                    if *req == 1 {
                        self.keys
                            .update_requested
                            .store(true, std::sync::atomic::Ordering::Release);
                    }
                }
                _ => {
                    return Err(invalid(format!(
                        "unexpected TLS handshake message {typ} after the handshake"
                    )))
                }
            }
            msgs = &msgs[4 + len..];
        }
        Ok(())
    }

    /// Reads more bytes from the socket (after moving a partial record to the front).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.buf.len() - self.end < MAX_CIPHERTEXT + HEADER {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let mut rb = ReadBuf::new(&mut self.buf[self.end..]);
        ready!(Pin::new(&mut self.sock).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        if n == 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                NO_CLOSE_NOTIFY,
            )));
        }
        self.end += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for TlsReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.early.is_empty() {
            let n = this.early.len().min(out.remaining());
            out.put_slice(&this.early[..n]);
            this.early.drain(..n);
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.plain.0 < this.plain.1 {
                let n = (this.plain.1 - this.plain.0).min(out.remaining());
                out.put_slice(&this.buf[this.plain.0..this.plain.0 + n]);
                this.plain.0 += n;
                return Poll::Ready(Ok(()));
            }
            if this.closed || out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            match this.open_into(out)? {
                Some(0) => continue,
                Some(_) => return Poll::Ready(Ok(())),
                None => {}
            }
            if !this.open_next()? {
                ready!(this.poll_fill(cx))?;
            }
        }
    }
}

/// The write half: copies into records, encrypts in place, writes in large chunks.
pub struct TlsWriter {
    sock: OwnedWriteHalf,
    out: Vec<u8>,
    /// Bytes of `out` already written to the socket.
    sent: usize,
    tx: Protector,
    keys: SharedKeys,
    records: u64,
    update_every: u64,
    closing: bool,
    /// Records of [`Self::write_pieces`] on their way to the socket (reused).
    batch: Vec<u8>,
    /// Plaintext bytes of [`Self::write_pieces`] frames written to the socket (advanced at
    /// every socket write, about 1 MiB, not once per frame), and how fast the socket takes
    /// bytes while it makes the writer wait (see [`crate::sendmeter`]).
    meter: Arc<SendMeter>,
    stall: StallClock,
}

impl TlsWriter {
    /// Before `upcoming` more records: a KeyUpdate (update_not_requested, sealed into `out`
    /// under the old key) and the switch to the next key, when our interval is reached or the
    /// peer asked for one.
    fn update_key_if_due(&mut self, upcoming: u64) -> io::Result<()> {
        if self.records + upcoming > self.update_every
            || (self
                .keys
                .update_requested
                .load(std::sync::atomic::Ordering::Relaxed)
                && self
                    .keys
                    .update_requested
                    .swap(false, std::sync::atomic::Ordering::AcqRel))
        {
            self.tx
                .seal(&mut self.out, HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0])?;
            let (seq, secrets) = lock(&self.keys).update_tx().map_err(tls_error)?;
            self.tx = Protector::new(seq, &secrets)?;
            self.records = 0;
        }
        Ok(())
    }

    fn seal(&mut self, content_type: u8, data: &[u8]) -> io::Result<()> {
        self.update_key_if_due(1)?;
        self.records += 1;
        self.tx.seal(&mut self.out, content_type, data)
    }

    /// Writes everything gathered to the socket.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.out.len() {
            self.sent += ready!(poll_send(
                &mut self.sock,
                &mut self.stall,
                &self.meter,
                cx,
                &self.out[self.sent..]
            ))?;
        }
        self.out.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl TlsWriter {
    /// This writer's [`SendMeter`].
    pub fn meter(&self) -> Arc<SendMeter> {
        self.meter.clone()
    }

    /// Writes all of `buf` to the socket, timing the stalls.
    async fn send_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut at = 0;
        std::future::poll_fn(|cx| {
            while at < buf.len() {
                at += ready!(poll_send(
                    &mut self.sock,
                    &mut self.stall,
                    &self.meter,
                    cx,
                    &buf[at..]
                ))?;
            }
            Poll::Ready(Ok(()))
        })
        .await
    }

    /// Sends `frame` after whatever was written before: small pieces are gathered and sealed
    /// in place, large ones sealed straight from where they lie into their records.
    pub async fn write_pieces(&mut self, frame: Pieces) -> io::Result<()> {
        if frame.is_empty() {
            return Ok(());
        }
        self.update_key_if_due(frame.max_records())?;
        let mut batch = std::mem::take(&mut self.batch);
        if batch.len() < SEAL_BATCH * FULL_RECORD {
            batch.resize(SEAL_BATCH * FULL_RECORD, 0);
        }
        let res = self.write_pieces_with(&frame, &mut batch).await;
        self.batch = batch;
        res
    }

    async fn write_pieces_with(&mut self, frame: &Pieces, batch: &mut [u8]) -> io::Result<()> {
        // Small pieces are gathered (copied) and sealed together when a large piece or the
        // end comes, so the byte stream keeps its order.
        let mut at = 0;
        let mut sealed = 0u64;
        let mut plain = 0u64;
        let mut gathered: Vec<u8> = Vec::new();
        let parts = std::iter::once(&frame.head[..]).chain(frame.pieces.iter().map(|p| &p[..]));
        for part in parts {
            if part.len() < GATHER_BELOW {
                gathered.extend_from_slice(part);
                continue;
            }
            for chunk in gathered
                .chunks(MAX_PLAINTEXT)
                .chain(part.chunks(MAX_PLAINTEXT))
            {
                at += self.tx.seal_into(&mut batch[at..], chunk)?;
                sealed += 1;
                plain += chunk.len() as u64;
                if sealed.is_multiple_of(SEAL_BATCH as u64) {
                    std::future::poll_fn(|cx| self.poll_drain(cx)).await?;
                    self.send_all(&batch[..at]).await?;
                    self.meter.add_written(plain);
                    at = 0;
                    plain = 0;
                }
            }
            gathered.clear();
        }
        for chunk in gathered.chunks(MAX_PLAINTEXT) {
            at += self.tx.seal_into(&mut batch[at..], chunk)?;
            sealed += 1;
            plain += chunk.len() as u64;
        }
        self.records += sealed;
        std::future::poll_fn(|cx| self.poll_drain(cx)).await?;
        self.send_all(&batch[..at]).await?;
        self.meter.add_written(plain);
        Ok(())
    }
}

/// One socket write of (part of) `buf`, timed by `stall` into `meter`; never `Ok(0)`.
fn poll_send(
    sock: &mut OwnedWriteHalf,
    stall: &mut StallClock,
    meter: &SendMeter,
    cx: &mut Context<'_>,
    buf: &[u8],
) -> Poll<io::Result<usize>> {
    match Pin::new(sock).poll_write(cx, buf) {
        Poll::Ready(Ok(0)) => Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
        Poll::Ready(Ok(n)) => {
            stall.accepted(n, buf.len(), std::time::Instant::now(), meter);
            Poll::Ready(Ok(n))
        }
        Poll::Pending => {
            stall.refused(std::time::Instant::now(), meter);
            Poll::Pending
        }
        e => e,
    }
}

impl AsyncWrite for TlsWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.out.len() >= WRITE_BUFFER {
            ready!(this.poll_drain(cx))?;
        }
        let room = (WRITE_BUFFER - this.out.len()).max(MAX_PLAINTEXT);
        let n = buf.len().min(room);
        for chunk in buf[..n].chunks(MAX_PLAINTEXT) {
            this.seal(APPLICATION_DATA, chunk)?;
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.sock).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closing {
            this.closing = true;
            // close_notify (warning level, description 0)
            this.seal(ALERT, &[1, 0])?;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.sock).poll_shutdown(cx)
    }
}

/// The two connection types' common surface for the handshake driver.
trait Handshaking {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn handshaking(&self) -> bool;
}

/// rustls has the same methods on both connection types, not a shared trait.
macro_rules! handshaking {
    ($conn:ty, $data:ty) => {
        impl Handshaking for $conn {
            type Data = $data;
            fn process<'c, 'i>(
                &'c mut self,
                incoming: &'i mut [u8],
            ) -> UnbufferedStatus<'c, 'i, Self::Data> {
                self.process_tls_records(incoming)
            }
            fn handshaking(&self) -> bool {
                self.is_handshaking()
            }
        }
    };
}
handshaking!(UnbufferedClientConnection, ClientConnectionData);
handshaking!(UnbufferedServerConnection, ServerConnectionData);

/// What the handshake leaves behind: unprocessed bytes and plaintext that came with it.
struct Leftover {
    incoming: Vec<u8>,
    early: Vec<u8>,
}

/// Runs the handshake over `tcp` until rustls has authenticated the peer. On a TLS error the
/// alert rustls queued is sent (best effort) before the error is returned.
async fn drive<C: Handshaking>(conn: &mut C, tcp: &mut TcpStream) -> io::Result<Leftover> {
    let mut incoming = vec![0u8; 64 * 1024];
    let mut used = 0usize;
    let mut outgoing = vec![0u8; 16 * 1024];
    let mut out_used = 0usize;
    let mut early = Vec::new();
    let mut failed: Option<rustls::Error> = None;
    loop {
        let status = conn.process(&mut incoming[..used]);
        let mut discard = status.discard;
        let mut need_read = false;
        let mut traffic = false;
        match status.state {
            Err(e) => {
                // A second error after the first: no alert to send, give up.
                if let Some(first) = failed.take() {
                    return Err(tls_error(first));
                }
                failed = Some(e);
            }
            Ok(ConnectionState::EncodeTlsData(mut enc)) => loop {
                match enc.encode(&mut outgoing[out_used..]) {
                    Ok(n) => {
                        out_used += n;
                        break;
                    }
                    Err(EncodeError::InsufficientSize(s)) => {
                        outgoing.resize(out_used + s.required_size, 0);
                    }
                    Err(e) => return Err(invalid(format!("TLS handshake: {e}"))),
                }
            },
            Ok(ConnectionState::TransmitTlsData(t)) => {
                let res = tcp.write_all(&outgoing[..out_used]).await;
                out_used = 0;
                t.done();
                res?;
                if let Some(e) = failed.take() {
                    return Err(tls_error(e));
                }
            }
            Ok(ConnectionState::BlockedHandshake) => need_read = true,
            Ok(ConnectionState::WriteTraffic(_)) => traffic = true,
            Ok(ConnectionState::ReadTraffic(mut r)) => {
                while let Some(rec) = r.next_record() {
                    let rec = rec.map_err(tls_error)?;
                    discard += rec.discard;
                    early.extend_from_slice(rec.payload);
                }
            }
            Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed the connection during the TLS handshake",
                ))
            }
            Ok(_) => return Err(invalid("unexpected TLS state during the handshake")),
        }
        if discard > 0 {
            incoming.copy_within(discard..used, 0);
            used -= discard;
        }
        if failed.is_some() && (need_read || traffic) {
            // After an error only rustls' alert may still go out; never wait for the peer.
            if out_used > 0 {
                let _ = tcp.write_all(&outgoing[..out_used]).await;
            }
            return Err(tls_error(
                failed.take().unwrap_or(rustls::Error::HandshakeNotComplete),
            ));
        }
        if traffic {
            if !conn.handshaking() {
                incoming.truncate(used);
                return Ok(Leftover { incoming, early });
            }
            need_read = true;
        }
        if need_read {
            if used == incoming.len() {
                if incoming.len() >= 1 << 20 {
                    return Err(invalid("TLS handshake messages too large"));
                }
                incoming.resize(incoming.len() * 2, 0);
            }
            let n = tcp.read(&mut incoming[used..]).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed the connection during the TLS handshake",
                ));
            }
            used += n;
        }
    }
}

fn halves(
    tcp: TcpStream,
    secrets: rustls::ExtractedSecrets,
    keys: Keys,
    left: Leftover,
) -> io::Result<(TlsReader, TlsWriter)> {
    let (r, w) = tcp.into_split();
    let keys = Arc::new(Shared {
        keys: Mutex::new(keys),
        update_requested: false.into(),
    });
    let mut buf = vec![0u8; READ_BUFFER.max(left.incoming.len() + MAX_CIPHERTEXT + HEADER)];
    let end = left.incoming.len();
    buf[..end].copy_from_slice(&left.incoming);
    let reader = TlsReader {
        sock: r,
        buf,
        start: 0,
        end,
        plain: (0, 0),
        early: left.early,
        rx: Protector::new(secrets.rx.0, &secrets.rx.1)?,
        keys: keys.clone(),
        closed: false,
    };
    let writer = TlsWriter {
        sock: w,
        out: Vec::with_capacity(WRITE_BUFFER + MAX_CIPHERTEXT + HEADER),
        sent: 0,
        tx: Protector::new(secrets.tx.0, &secrets.tx.1)?,
        keys,
        records: 0,
        update_every: KEY_UPDATE_RECORDS,
        closing: false,
        batch: Vec::new(),
        meter: Arc::default(),
        stall: StallClock::default(),
    };
    Ok((reader, writer))
}

/// Client side: handshake with `name` over `tcp`, then the two halves.
pub async fn connect(
    mut tcp: TcpStream,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> io::Result<(TlsReader, TlsWriter)> {
    let mut conn = UnbufferedClientConnection::new(config, name).map_err(tls_error)?;
    let left = drive(&mut conn, &mut tcp).await?;
    let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(tls_error)?;
    halves(tcp, secrets, Keys::Client(kernel), left)
}

/// Server side: handshake over `tcp`, then the two halves and the client's certificate chain.
pub async fn accept(
    mut tcp: TcpStream,
    config: Arc<ServerConfig>,
) -> io::Result<(TlsReader, TlsWriter, Vec<CertificateDer<'static>>)> {
    let mut conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let left = drive(&mut conn, &mut tcp).await?;
    let certs = conn
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(tls_error)?;
    let (r, w) = halves(tcp, secrets, Keys::Server(kernel), left)?;
    Ok((r, w, certs))
}

#[cfg(test)]
impl TlsWriter {
    /// Tests: a key update after every `n` records.
    pub(crate) fn set_key_update_interval(&mut self, n: u64) {
        self.update_every = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{DevCerts, AGENT_SERVER_NAME};
    use tokio::net::TcpListener;

    fn name() -> ServerName<'static> {
        ServerName::try_from(AGENT_SERVER_NAME).unwrap()
    }

    fn payload(n: usize, seed: u64) -> Vec<u8> {
        failback_tests::random_bytes(seed, n)
    }

    /// Our client side: connects, sends `up` with a key update every `every` records, reads
    /// until the peer closes; returns what it read and the write half.
    async fn send_then_read_all(
        addr: std::net::SocketAddr,
        ct: &crate::tls::ClientTls,
        every: u64,
        up: &[u8],
    ) -> (Vec<u8>, TlsWriter) {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut r, mut w) = connect(tcp, ct.config(), name()).await.unwrap();
        w.set_key_update_interval(every);
        w.write_all(up).await.unwrap();
        w.flush().await.unwrap();
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        (got, w)
    }

    /// Our client and our agent side, both directions, with a key update every 7 records on
    /// each writer (KeyUpdate sent, received and both keys rotated many times).
    #[tokio::test]
    async fn round_trip_with_key_updates() {
        let certs = DevCerts::generate("i-1").unwrap();
        let (ct, st) = (certs.client_tls().unwrap(), certs.server_tls(None).unwrap());
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let up = payload(3 << 20, 1);
        let down = payload((2 << 20) + 12345, 2);
        let (up2, down2) = (up.clone(), down.clone());
        let server = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            let (mut r, mut w, certs) = accept(tcp, st.config()).await.unwrap();
            assert_eq!(certs.len(), 1, "client certificate chain");
            w.set_key_update_interval(7);
            let mut got = vec![0u8; up2.len()];
            r.read_exact(&mut got).await.unwrap();
            assert!(
                got == up2,
                "agent received other bytes than the client sent"
            );
            w.write_all(&down2).await.unwrap();
            w.shutdown().await.unwrap();
            assert_eq!(
                r.read(&mut [0u8; 1]).await.unwrap(),
                0,
                "clean end after close_notify"
            );
        });
        let (got, mut w) = send_then_read_all(addr, &ct, 7, &up).await;
        assert!(
            got == down,
            "client received other bytes than the agent sent"
        );
        w.shutdown().await.unwrap();
        server.await.unwrap();
    }

    /// Our halves against stock rustls streams: records, key updates and close_notify are
    /// standard TLS 1.3 in both directions.
    #[tokio::test]
    async fn interoperates_with_stock_rustls() {
        let certs = DevCerts::generate("i-1").unwrap();
        let (ct, st) = (certs.client_tls().unwrap(), certs.server_tls(None).unwrap());
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let up = payload(1 << 20, 3);
        let down = payload(1 << 20, 4);
        let (up2, down2) = (up.clone(), down.clone());
        // Stock rustls agent side; the peer (ours) rotates its key every 5 records, and the
        // stock side rotates its own once mid-stream.
        let server = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            let mut s = tokio_rustls::TlsAcceptor::from(st.config())
                .accept(tcp)
                .await
                .unwrap();
            let mut got = vec![0u8; up2.len()];
            s.read_exact(&mut got).await.unwrap();
            assert!(got == up2, "stock rustls received other bytes");
            s.write_all(&down2[..1000]).await.unwrap();
            s.get_mut().1.refresh_traffic_keys().unwrap();
            s.write_all(&down2[1000..]).await.unwrap();
            s.shutdown().await.unwrap();
        });
        let (got, _w) = send_then_read_all(addr, &ct, 5, &up).await;
        assert!(
            got == down,
            "ours received other bytes than stock rustls sent"
        );
        server.await.unwrap();

        // Stock rustls client against our agent side.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let st = certs.server_tls(None).unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            let (mut r, mut w, _) = accept(tcp, st.config()).await.unwrap();
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.unwrap();
            w.write_all(&got).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut s = stock_client(addr, &ct).await;
        s.write_all(&up).await.unwrap();
        s.shutdown().await.unwrap();
        let mut echo = Vec::new();
        s.read_to_end(&mut echo).await.unwrap();
        assert!(echo == up, "echo through our agent side differs");
        server.await.unwrap();
    }

    /// Frames sent as pieces (small ones gathered and sealed in place, large ones sealed
    /// straight from their buffers), mixed with ordinary writes and key updates (every 3
    /// records, so some fall right before or inside a frame), reach a stock rustls peer as
    /// the same byte stream.
    #[tokio::test]
    async fn pieces_interoperate_with_stock_rustls() {
        let certs = DevCerts::generate("i-1").unwrap();
        let (ct, st) = (certs.client_tls().unwrap(), certs.server_tls(None).unwrap());
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let sizes = [
            vec![1usize, 16384, 16385],
            vec![100_000],
            vec![0, 5, 3 * 16384, 4095, 4096, 7],
            vec![10, 20, 30],
            vec![GATHER_BELOW - 1; 40],
            vec![1 << 20, 3],
        ];
        let mut want = Vec::new();
        let mut frames = Vec::new();
        for (i, parts) in sizes.iter().enumerate() {
            let mut f = Pieces::default();
            for (j, n) in parts.iter().enumerate() {
                let p = payload(*n, 10 + (i * 100 + j) as u64);
                want.extend_from_slice(&p);
                if j == 0 {
                    f.head = p;
                } else {
                    f.pieces.push(p.into());
                }
            }
            frames.push(f);
        }
        let server = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            let (_r, mut w, _) = accept(tcp, st.config()).await.unwrap();
            w.set_key_update_interval(3);
            for (i, f) in frames.into_iter().enumerate() {
                if i % 3 == 1 {
                    w.write_all(&f.to_plain()).await.unwrap();
                } else {
                    w.write_pieces(f).await.unwrap();
                }
            }
            w.shutdown().await.unwrap();
        });
        let mut s = stock_client(addr, &ct).await;
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert!(
            got == want,
            "stock rustls received other bytes than were sent as pieces"
        );
        server.await.unwrap();
    }

    /// Our reader decrypts a record straight into the caller's buffer when it fits there and
    /// through its own buffer when not; any split of the reads gives the same bytes.
    #[tokio::test]
    async fn reads_of_any_size_get_the_same_bytes() {
        let ((mut r, _w), (_sr, mut sw)) = pair().await;
        let data = payload(300_000, 21);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            let mut f = Pieces::default();
            f.pieces.push(sent.into());
            sw.write_pieces(f).await.unwrap();
            sw.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        for want in [16384usize, 16385, 16383, 1, 40000, 65536, 100_000]
            .iter()
            .cycle()
        {
            let mut buf = vec![0u8; *want];
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got == data, "reads of mixed sizes reassemble other bytes");
        writer.await.unwrap();
    }

    /// A stock tokio-rustls client connected to `addr`.
    async fn stock_client(
        addr: std::net::SocketAddr,
        ct: &crate::tls::ClientTls,
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        tokio_rustls::TlsConnector::from(ct.config())
            .connect(name(), tcp)
            .await
            .unwrap()
    }

    async fn pair() -> ((TlsReader, TlsWriter), (TlsReader, TlsWriter)) {
        let certs = DevCerts::generate("i-1").unwrap();
        let (ct, st) = (certs.client_tls().unwrap(), certs.server_tls(None).unwrap());
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            let (r, w, _) = accept(tcp, st.config()).await.unwrap();
            (r, w)
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let client = connect(tcp, ct.config(), name()).await.unwrap();
        (client, server.await.unwrap())
    }

    /// A flipped bit in a record is refused, never handed out as data: decrypted straight
    /// into the caller's buffer (it fits) or through the reader's own (it does not).
    #[tokio::test]
    async fn tampered_record_is_refused() {
        for room in [64usize, 4] {
            let ((mut r, _w), (_sr, mut sw)) = pair().await;
            sw.seal(APPLICATION_DATA, b"hello, failback").unwrap();
            let at = sw.out.len() - TAG - 3;
            sw.out[at] ^= 1;
            sw.flush().await.unwrap();
            let mut buf = vec![0u8; room];
            let e = r.read(&mut buf).await.unwrap_err();
            assert!(e.to_string().contains("failed authentication"), "{e}");
        }
    }

    /// A TCP close without close_notify is an error naming it; with close_notify, end of data.
    #[tokio::test]
    async fn close_without_close_notify_is_an_error() {
        let ((mut r, _w), (sr, mut sw)) = pair().await;
        sw.write_all(b"partial").await.unwrap();
        sw.flush().await.unwrap();
        drop((sr, sw));
        let mut got = Vec::new();
        let e = r.read_to_end(&mut got).await.unwrap_err();
        assert_eq!(got, b"partial");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("close_notify"), "{e}");
    }
}
