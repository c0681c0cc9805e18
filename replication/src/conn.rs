//! Frame I/O over any async byte stream (TLS in production).
//!
//! Writes go through one writer task per connection; it flushes whenever its queue runs dry.
//! Neither side adds a buffer of its own: the TLS halves ([`crate::record`]) already gather
//! records into large socket writes and read the socket in large chunks, and a second buffer
//! would only add a copy of every byte.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::error::Error;
use crate::record::{Pieces, TlsWriter};
use crate::sendmeter::SendMeter;
use crate::wire::{self, FrameError, Message};

/// Bodies of frames capped below [`wire::MAX_FRAME`] (see [`FrameReader::max_frame`]) are read
/// into a buffer of at most this size first, grown as more bytes arrive.
const GROW_FROM: usize = 64 * 1024;

/// Reads frames from a stream (a buffered one: prefixes are read 4 bytes at a time).
///
/// [`Self::read`] is cancel-safe until a frame has begun: a timeout around it that fires while
/// no byte of the next frame has arrived loses nothing ([`Self::mid_frame`] tells).
pub struct FrameReader<R> {
    inner: R,
    peer: String,
    /// Place raw payloads of large `Blocks` frames page-aligned (see [`Self::align_blocks`]).
    align_blocks: bool,
    /// Largest frame accepted (see [`Self::max_frame`]).
    max_frame: usize,
    /// Length prefix read so far (kept across a cancelled read).
    prefix: [u8; 4],
    got: usize,
    /// A frame's body is being read (a cancelled read leaves this set: the stream is unusable).
    in_body: bool,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps a read half.
    pub fn new(r: R, peer: impl Into<String>) -> Self {
        FrameReader {
            inner: r,
            peer: peer.into(),
            align_blocks: false,
            max_frame: wire::MAX_FRAME,
            prefix: [0; 4],
            got: 0,
            in_body: false,
        }
    }

    /// Accepts frames of at most `max` bytes (tag and body) from now on; a longer one is an
    /// [`Error::Frame`] ([`FrameError::TooLarge`]) before anything is allocated for it. Below
    /// [`wire::MAX_FRAME`], a body's buffer starts small and grows only as its bytes arrive, so
    /// a peer that announces a large frame and sends little holds little memory.
    pub fn max_frame(mut self, max: usize) -> Self {
        self.set_max_frame(max);
        self
    }

    /// See [`Self::max_frame`].
    pub fn set_max_frame(&mut self, max: usize) {
        self.max_frame = max.min(wire::MAX_FRAME);
    }

    /// True after a read was cancelled with part of a frame consumed: the stream can no longer
    /// be parsed and must be closed.
    pub fn mid_frame(&self) -> bool {
        self.got > 0 || self.in_body
    }

    /// Reads the raw payloads of `Blocks` frames of at least [`block::DIRECT_MIN_RUN`] bytes
    /// straight into page-aligned memory (one copy out of the TLS record, none after): the
    /// client verifies them there and writes them to the disk with `O_DIRECT`.
    ///
    /// [`block::DIRECT_MIN_RUN`]: crate::block::DIRECT_MIN_RUN
    pub fn align_blocks(mut self) -> Self {
        self.align_blocks = true;
        self
    }

    /// Fills `buf` from the stream; a close mid-frame is an error (see [`Self::read`]).
    async fn fill(&mut self, buf: &mut [u8]) -> Result<(), Error> {
        if let Err(e) = self.inner.read_exact(buf).await {
            // A clean (TLS close_notify) close mid-frame is a truncated frame; a dropped TCP
            // connection (no close_notify) is a network error.
            if e.kind() == std::io::ErrorKind::UnexpectedEof
                && !e.to_string().contains("close_notify")
            {
                return Err(self.frame(FrameError::Truncated(
                    "connection closed in the middle of a frame",
                )));
            }
            return Err(self.lost(e));
        }
        Ok(())
    }

    /// The rest of a `Blocks` frame of `len` bytes (tag already read), with the same checks
    /// as [`Message::decode_shared`]; raw payloads of whole pages land page-aligned, read
    /// straight into place by the TLS layer a group at a time and hashed while in cache.
    async fn read_blocks(&mut self, len: usize) -> Result<Message, Error> {
        use crate::pool::{ALIGNED, DIRECT_ALIGN};
        use crate::wire::{Encoding, WireBlock, BLOCK_ENTRY};
        /// Raw payloads read (and decrypted) in one go before they are hashed: large, so that
        /// most records are decrypted straight into the slab (the last record of a read that
        /// ends exactly on a record boundary has no room for its content type byte and goes
        /// through the TLS buffer), small enough to stay in the core's L2 cache for hashing.
        const GROUP: usize = 512 * 1024;
        let mut left = len - 1;
        let mut head = [0u8; 16];
        if left < head.len() {
            return Err(self.frame(FrameError::Truncated("blocks header")));
        }
        self.fill(&mut head).await?;
        left -= head.len();
        let word = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let stream = word(&head[0..4]);
        let first_block = u64::from(word(&head[4..8])) << 32 | u64::from(word(&head[8..12]));
        let count = usize::try_from(word(&head[12..16])).unwrap_or(usize::MAX);
        if count > left / BLOCK_ENTRY {
            return Err(self.frame(FrameError::Truncated("block table")));
        }
        let mut table = vec![0u8; count * BLOCK_ENTRY];
        self.fill(&mut table).await?;
        left -= table.len();
        let mut entries = Vec::with_capacity(count);
        let (mut payloads, mut aligned) = (0usize, 0usize);
        for e in table.chunks(BLOCK_ENTRY) {
            let encoding = Encoding::from_u8(e[0]).map_err(|e| self.frame(e))?;
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&e[1..33]);
            let plen = usize::try_from(word(&e[33..37])).unwrap_or(usize::MAX);
            if encoding == Encoding::Zero && plen > 0 {
                return Err(self.frame(FrameError::Malformed(
                    "zero-marker block carries a payload".into(),
                )));
            }
            payloads = payloads.saturating_add(plen);
            if payloads > left {
                return Err(self.frame(FrameError::Truncated("block payload")));
            }
            let in_slab = encoding == Encoding::Raw && plen > 0 && plen % DIRECT_ALIGN == 0;
            if in_slab {
                aligned += plen;
            }
            entries.push((encoding, hash, plen, in_slab));
        }
        if payloads < left {
            return Err(self.frame(FrameError::Trailing(left - payloads)));
        }
        let mut slab =
            match aligned {
                0 => None,
                n => Some(ALIGNED.take(n).ok_or_else(|| {
                    self.lost(std::io::Error::other("cannot map memory for blocks"))
                })?),
            };
        /// Where a block's payload went: the aligned slab, or a buffer of its own.
        enum At {
            Slab(std::ops::Range<usize>),
            Own(bytes::Bytes),
        }
        let mut placed: Vec<(At, Option<[u8; 32]>)> = Vec::with_capacity(count);
        let mut fill = 0usize;
        let mut i = 0;
        while i < count {
            let (_, _, plen, in_slab) = entries[i];
            match slab.as_mut().filter(|_| in_slab) {
                Some(slab) => {
                    let mut j = i;
                    let mut end = fill;
                    while j < count
                        && entries[j].3
                        && (j == i || end - fill + entries[j].2 <= GROUP)
                    {
                        end += entries[j].2;
                        j += 1;
                    }
                    self.fill(&mut slab[fill..end]).await?;
                    for (_, _, plen, _) in &entries[i..j] {
                        // Hashed now, while the bytes just decrypted are in cache:
                        // verification later would read them from memory again (measured: a
                        // third of the client's hashing time in a full sync).
                        let arrived = *blake3::hash(&slab[fill..fill + plen]).as_bytes();
                        placed.push((At::Slab(fill..fill + plen), Some(arrived)));
                        fill += plen;
                    }
                    i = j;
                }
                None => {
                    let mut own = vec![0u8; plen];
                    self.fill(&mut own).await?;
                    placed.push((At::Own(bytes::Bytes::from(own)), None));
                    i += 1;
                }
            }
        }
        let shared = slab.map(|s| ALIGNED.shared(s));
        let blocks = entries
            .into_iter()
            .zip(placed)
            .map(|((encoding, hash, _, _), (at, arrived))| WireBlock {
                encoding,
                hash,
                payload: match at {
                    At::Slab(r) => shared.as_ref().map(|s| s.slice(r)).unwrap_or_default(),
                    At::Own(b) => b,
                },
                arrived,
            })
            .collect();
        Ok(Message::Blocks {
            stream,
            first_block,
            blocks,
        })
    }

    /// The next message and its size on the wire; `Ok(None)` on a clean close between frames.
    /// A bad length, unknown tag, bad body or a close mid-frame is an [`Error::Frame`].
    pub async fn read(&mut self) -> Result<Option<(Message, usize)>, Error> {
        if self.in_body {
            return Err(self.frame(FrameError::Truncated("frame abandoned by a cancelled read")));
        }
        while self.got < 4 {
            let got = self.got;
            let n = self
                .inner
                .read(&mut self.prefix[got..])
                .await
                .map_err(|e| self.lost(e))?;
            if n == 0 {
                if got == 0 {
                    return Ok(None);
                }
                return Err(self.frame(FrameError::Truncated("length prefix")));
            }
            self.got += n;
        }
        self.got = 0;
        let len = wire::frame_len(self.prefix).map_err(|e| self.frame(e))?;
        if len > self.max_frame {
            let max = self.max_frame;
            return Err(self.frame(FrameError::TooLarge { len, max }));
        }
        self.in_body = true;
        let msg = self.read_body(len).await?;
        self.in_body = false;
        Ok(Some((msg, len + 4)))
    }

    /// The tag and body of a frame of `len` bytes, decoded.
    async fn read_body(&mut self, len: usize) -> Result<Message, Error> {
        let mut tag = [0u8; 1];
        self.fill(&mut tag).await?;
        if self.align_blocks && len >= crate::block::DIRECT_MIN_RUN && tag[0] == wire::T_BLOCKS {
            return self.read_blocks(len).await;
        }
        let mut body = if self.max_frame < wire::MAX_FRAME && len > GROW_FROM {
            self.grow_into(len).await?
        } else {
            let mut body = crate::pool::POOL.take_filled(len);
            self.fill(&mut body[1..]).await?;
            body
        };
        body[0] = tag[0];
        Message::decode_shared(&crate::pool::POOL.shared(body)).map_err(|e| self.frame(e))
    }

    /// A buffer of `len` bytes whose bytes after the first are read from the stream, grown
    /// (doubling) as they arrive rather than reserved up front.
    async fn grow_into(&mut self, len: usize) -> Result<Vec<u8>, Error> {
        let mut body = Vec::new();
        let mut have = 1;
        while have < len {
            let want = (have * 2).clamp(GROW_FROM, len);
            body.resize(want, 0);
            self.fill(&mut body[have..want]).await?;
            have = want;
        }
        Ok(body)
    }

    fn frame(&self, source: FrameError) -> Error {
        Error::Frame {
            peer: self.peer.clone(),
            source,
        }
    }
    fn lost(&self, e: std::io::Error) -> Error {
        Error::ConnectionLost {
            peer: self.peer.clone(),
            reason: e.to_string(),
        }
    }
}

/// Shared "why is this connection dead" slot.
#[derive(Debug, Clone, Default)]
pub struct DeadSlot(Arc<Mutex<Option<String>>>);

impl DeadSlot {
    /// Records the first reason.
    pub fn set(&self, reason: impl Into<String>) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(reason.into());
        }
    }
    /// The recorded reason.
    pub fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Handle to a connection's writer task.
#[derive(Clone)]
pub struct FrameSender {
    tx: mpsc::Sender<Out>,
    /// Bytes queued for sending (for wire accounting).
    pub sent: Arc<AtomicU64>,
    /// What the writer task has written, and how fast the link takes it
    /// ([`crate::sendmeter`]).
    pub meter: Arc<SendMeter>,
}

impl FrameSender {
    /// Queues an encoded frame; `false` if the connection is gone.
    pub async fn send_raw(&self, frame: Vec<u8>) -> bool {
        self.sent.fetch_add(frame.len() as u64, Ordering::Relaxed);
        self.tx.send(Out::Plain(frame)).await.is_ok()
    }
    /// Queues a message; `false` if the connection is gone.
    pub async fn send(&self, msg: &Message) -> bool {
        self.send_raw(msg.encode()).await
    }
    /// Blocking variant for worker threads.
    pub fn blocking_send_raw(&self, frame: Vec<u8>) -> bool {
        self.sent.fetch_add(frame.len() as u64, Ordering::Relaxed);
        self.tx.blocking_send(Out::Plain(frame)).is_ok()
    }
    /// Blocking: queues a frame whose payloads stay in their buffers (see [`Pieces`]).
    pub fn blocking_send_pieces(&self, frame: Pieces) -> bool {
        self.sent.fetch_add(frame.len() as u64, Ordering::Relaxed);
        self.tx.blocking_send(Out::Pieces(frame)).is_ok()
    }
}

/// What the writer task sends: an encoded frame, or a head and pieces.
enum Out {
    Plain(Vec<u8>),
    Pieces(Pieces),
}

/// Spawns the writer task for a write half; it ends when every sender is dropped (after
/// flushing and shutting the stream down) or on a write error (recorded in `dead`).
pub fn spawn_writer(w: TlsWriter, dead: DeadSlot) -> (FrameSender, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Out>(32);
    // Pieces frames (blocks) are counted by the writer as each socket write goes out; plain
    // frames (messages) once written.
    let meter = w.meter();
    let counter = meter.clone();
    let handle = tokio::spawn(async move {
        let mut w = w;
        let mut next = rx.recv().await;
        while let Some(out) = next.take() {
            let res = match out {
                Out::Plain(frame) => {
                    let res = w.write_all(&frame).await;
                    counter.add_written(frame.len() as u64);
                    crate::pool::POOL.give(frame);
                    res
                }
                Out::Pieces(p) => w.write_pieces(p).await,
            };
            // Drain whatever is already queued before flushing: big TLS records, few syscalls.
            let res = match res {
                Ok(()) => match rx.try_recv() {
                    Ok(out) => {
                        next = Some(out);
                        continue;
                    }
                    Err(_) => w.flush().await,
                },
                e => e,
            };
            if let Err(e) = res {
                dead.set(format!("write failed: {e}"));
                return;
            }
            next = rx.recv().await;
        }
        let _ = w.shutdown().await;
    });
    (
        FrameSender {
            tx,
            sent: Arc::new(AtomicU64::new(0)),
            meter,
        },
        handle,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::is_direct_aligned;
    use crate::wire::{Encoding, WireBlock};
    use tokio::io::AsyncWriteExt;

    /// A `Blocks` frame large enough for the aligned path: 17 raw 64 KiB blocks, a zstd one
    /// and a zero marker.
    fn frame() -> (Message, Vec<u8>) {
        let mut blocks: Vec<WireBlock> = (0..17)
            .map(|i| {
                WireBlock::new(
                    Encoding::Raw,
                    [u8::try_from(i).unwrap(); 32],
                    failback_tests::random_bytes(i, 65536).into(),
                )
            })
            .collect();
        blocks.push(WireBlock::new(
            Encoding::Zstd,
            [1; 32],
            vec![9u8; 100].into(),
        ));
        blocks.push(WireBlock::new(Encoding::Zero, [2; 32], bytes::Bytes::new()));
        let m = Message::Blocks {
            stream: 3,
            first_block: 1 << 33,
            blocks,
        };
        let bytes = m.encode();
        (m, bytes)
    }

    async fn read_aligned(bytes: Vec<u8>) -> Result<Option<(Message, usize)>, Error> {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let w = tokio::spawn(async move {
            let _ = a.write_all(&bytes).await;
        });
        let r = FrameReader::new(b, "test").align_blocks().read().await;
        w.abort();
        r
    }

    /// A capped reader refuses a frame from its length prefix, and reads one within the cap
    /// into a buffer grown as the bytes arrive.
    #[tokio::test]
    async fn capped_reader_refuses_long_frames_and_reads_the_rest() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let hashes = Message::Hashes {
            stream: 1,
            first_block: 0,
            hashes: vec![[7; 32]; 4096],
        };
        let bytes = hashes.encode();
        let w = tokio::spawn(async move {
            a.write_all(&bytes).await.unwrap();
            a.write_all(&(2_000_000u32).to_be_bytes()).await.unwrap();
            a
        });
        let mut r = FrameReader::new(b, "test").max_frame(wire::MAX_CLIENT_FRAME);
        let (got, _) = r.read().await.unwrap().unwrap();
        assert_eq!(got, hashes);
        let e = r.read().await.unwrap_err();
        assert!(
            e.to_string()
                .contains("frame length 2000000 exceeds the 1048640 bytes"),
            "{e}"
        );
        drop(w.await);
    }

    /// A read cancelled before a frame began, or within its length prefix, loses nothing.
    #[tokio::test]
    async fn read_is_cancel_safe_until_the_body() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut r = FrameReader::new(b, "test");
        let wait = std::time::Duration::from_millis(20);
        assert!(tokio::time::timeout(wait, r.read()).await.is_err());
        assert!(!r.mid_frame());
        let frame = Message::SyncEnd { stream: 9 }.encode();
        a.write_all(&frame[..2]).await.unwrap();
        assert!(tokio::time::timeout(wait, r.read()).await.is_err());
        assert!(r.mid_frame(), "half a prefix was read");
        a.write_all(&frame[2..]).await.unwrap();
        let (got, _) = r.read().await.unwrap().unwrap();
        assert_eq!(got, Message::SyncEnd { stream: 9 });
        assert!(!r.mid_frame());
    }

    #[tokio::test]
    async fn large_blocks_frames_land_aligned_and_decode_the_same() {
        let (m, bytes) = frame();
        assert!(bytes.len() >= crate::block::DIRECT_MIN_RUN);
        let (mut got, len) = read_aligned(bytes.clone()).await.unwrap().unwrap();
        assert_eq!(len, bytes.len());
        let Message::Blocks { blocks, .. } = &mut got else {
            unreachable!()
        };
        assert!(blocks[..17].iter().all(|b| is_direct_aligned(&b.payload)));
        // Raw blocks were hashed as they arrived; the others were not.
        for (i, b) in blocks.iter_mut().enumerate() {
            let want = (i < 17).then(|| *blake3::hash(&b.payload).as_bytes());
            assert_eq!(b.arrived.take(), want, "block {i}");
        }
        assert_eq!(got, m, "streaming parse decodes like decode_shared");
    }

    #[tokio::test]
    async fn malformed_large_blocks_frames_are_refused() {
        let (_, good) = frame();
        let body = 4 + 1 + 16; // prefix, tag, stream + first block + count
        let payload_len_at = body + 1 + 32;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("unknown block encoding", {
                let mut b = good.clone();
                b[body] = 7;
                b
            }),
            ("block payload", {
                let mut b = good.clone();
                b[payload_len_at..payload_len_at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
                b
            }),
            ("trailing", {
                let mut b = good.clone();
                b.extend_from_slice(&[0; 5]);
                let n = u32::try_from(b.len() - 4).unwrap();
                b[..4].copy_from_slice(&n.to_be_bytes());
                b
            }),
            ("zero-marker block carries a payload", {
                let mut b = good.clone();
                b[body] = 0;
                b
            }),
            ("middle of a frame", good[..good.len() - 10].to_vec()),
        ];
        for (want, bytes) in cases {
            let e = read_aligned(bytes).await.unwrap_err();
            assert!(
                matches!(e, Error::Frame { .. }) && e.to_string().contains(want),
                "{want}: {e}"
            );
        }
    }
}
