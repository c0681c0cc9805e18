//! Frame I/O over any async byte stream (TLS in production).
//!
//! Writes go through one writer task per connection; it flushes whenever its queue runs dry.
//! Neither side adds a buffer of its own: the TLS halves ([`crate::record`]) already gather
//! records into large socket writes and read the socket in large chunks, and a second buffer
//! would only add a copy of every byte.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::error::Error;
use crate::wire::{self, FrameError, Message};

/// Reads frames from a stream (a buffered one: prefixes are read 4 bytes at a time).
pub struct FrameReader<R> {
    inner: R,
    peer: String,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps a read half.
    pub fn new(r: R, peer: impl Into<String>) -> Self {
        FrameReader {
            inner: r,
            peer: peer.into(),
        }
    }

    /// The next message and its size on the wire; `Ok(None)` on a clean close between frames.
    /// A bad length, unknown tag, bad body or a close mid-frame is an [`Error::Frame`].
    pub async fn read(&mut self) -> Result<Option<(Message, usize)>, Error> {
        let mut prefix = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            let n = self
                .inner
                .read(&mut prefix[got..])
                .await
                .map_err(|e| self.lost(e))?;
            if n == 0 {
                if got == 0 {
                    return Ok(None);
                }
                return Err(self.frame(FrameError::Truncated("length prefix")));
            }
            got += n;
        }
        let len = wire::frame_len(prefix).map_err(|e| self.frame(e))?;
        let mut body = crate::pool::POOL.take_filled(len);
        if let Err(e) = self.inner.read_exact(&mut body).await {
            // A clean (TLS close_notify) close mid-frame is a truncated frame; a dropped TCP
            // connection (rustls reports the missing close_notify) is a network error.
            if e.kind() == std::io::ErrorKind::UnexpectedEof
                && !e.to_string().contains("close_notify")
            {
                return Err(self.frame(FrameError::Truncated(
                    "connection closed in the middle of a frame",
                )));
            }
            return Err(self.lost(e));
        }
        let msg =
            Message::decode_shared(&crate::pool::POOL.shared(body)).map_err(|e| self.frame(e))?;
        Ok(Some((msg, len + 4)))
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
    tx: mpsc::Sender<Vec<u8>>,
    /// Bytes queued for sending (for wire accounting).
    pub sent: Arc<AtomicU64>,
}

impl FrameSender {
    /// Queues an encoded frame; `false` if the connection is gone.
    pub async fn send_raw(&self, frame: Vec<u8>) -> bool {
        self.sent.fetch_add(frame.len() as u64, Ordering::Relaxed);
        self.tx.send(frame).await.is_ok()
    }
    /// Queues a message; `false` if the connection is gone.
    pub async fn send(&self, msg: &Message) -> bool {
        self.send_raw(msg.encode()).await
    }
    /// Blocking variant for worker threads.
    pub fn blocking_send_raw(&self, frame: Vec<u8>) -> bool {
        self.sent.fetch_add(frame.len() as u64, Ordering::Relaxed);
        self.tx.blocking_send(frame).is_ok()
    }
}

/// Spawns the writer task for a write half; it ends when every sender is dropped (after
/// flushing and shutting the stream down) or on a write error (recorded in `dead`).
pub fn spawn_writer<W>(w: W, dead: DeadSlot) -> (FrameSender, tokio::task::JoinHandle<()>)
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(32);
    let handle = tokio::spawn(async move {
        let mut w = w;
        while let Some(frame) = rx.recv().await {
            let mut res = w.write_all(&frame).await;
            crate::pool::POOL.give(frame);
            // Drain whatever is already queued before flushing: big TLS records, few syscalls.
            while res.is_ok() {
                match rx.try_recv() {
                    Ok(f) => {
                        res = w.write_all(&f).await;
                        crate::pool::POOL.give(f);
                    }
                    Err(_) => break,
                }
            }
            if res.is_ok() {
                res = w.flush().await;
            }
            if let Err(e) = res {
                dead.set(format!("write failed: {e}"));
                return;
            }
        }
        let _ = w.shutdown().await;
    });
    (
        FrameSender {
            tx,
            sent: Arc::new(AtomicU64::new(0)),
        },
        handle,
    )
}
