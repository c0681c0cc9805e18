//! How fast the link takes a connection's bytes, measured where the sender waits for it.
//!
//! A sender's write rate says little about the link on its own: after an idle spell the
//! socket buffers on the way (this host's send buffer, a proxy's or a VPN gateway's) take
//! megabytes at memory speed, so the first writes look many times faster than the link
//! (measured: 500 MB/s after 8 ms through a 25 MB/s emulated link). Only the bytes a full
//! socket accepts while the writer waits for it cross at the link's rate: [`StallClock`] counts
//! those bytes and the time they took ("stalled"), and nothing the socket took at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// A connection writer's counters, shared with whoever decides what to send.
#[derive(Debug, Default)]
pub struct SendMeter {
    /// Frame bytes written to the socket (blocks as each socket write of about 1 MiB goes
    /// out, messages once written).
    written: AtomicU64,
    /// Bytes the socket accepted after making the writer wait, and the time they took.
    stalled_bytes: AtomicU64,
    stalled_nanos: AtomicU64,
    /// Whether the writer is in a stall now (its time counts once bytes are accepted).
    in_stall: AtomicBool,
}

impl SendMeter {
    /// Frame bytes written so far.
    pub fn written(&self) -> u64 {
        self.written.load(Relaxed)
    }

    /// `n` more frame bytes went to the socket.
    pub fn add_written(&self, n: u64) {
        self.written.fetch_add(n, Relaxed);
    }

    /// Whether the writer is in a stall now.
    pub fn stalling(&self) -> bool {
        self.in_stall.load(Relaxed)
    }

    /// Bytes accepted while stalled, and the time they took.
    pub fn stalled(&self) -> (u64, Duration) {
        (
            self.stalled_bytes.load(Relaxed),
            Duration::from_nanos(self.stalled_nanos.load(Relaxed)),
        )
    }

    fn add_stalled(&self, bytes: u64, took: Duration) {
        self.stalled_bytes.fetch_add(bytes, Relaxed);
        self.stalled_nanos
            .fetch_add(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }
}

/// The writer's side of [`SendMeter`]: a stall starts when the socket refuses bytes (its
/// write returns `Pending`) and lasts while each write finds the socket full, i.e. takes less
/// than it was offered; the bytes accepted during a stall count with the time since the
/// previous mark (the writer's own work between writes included: the link went on draining).
#[derive(Debug, Default)]
pub struct StallClock {
    mark: Option<Instant>,
}

impl StallClock {
    /// The socket refused bytes at `now`.
    pub fn refused(&mut self, now: Instant, meter: &SendMeter) {
        self.mark.get_or_insert(now);
        meter.in_stall.store(true, Relaxed);
    }

    /// The socket accepted `n` of `offered` bytes at `now`.
    pub fn accepted(&mut self, n: usize, offered: usize, now: Instant, meter: &SendMeter) {
        if let Some(mark) = self.mark {
            meter.add_stalled(n as u64, now.saturating_duration_since(mark));
        }
        // Took all it was offered: there was room, the stall (if any) is over.
        self.mark = (n < offered).then_some(now);
        meter.in_stall.store(self.mark.is_some(), Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bytes_taken_by_a_full_socket_count() {
        let m = SendMeter::default();
        let mut c = StallClock::default();
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        // An idle socket takes 4 MiB at once: not counted.
        c.accepted(4 << 20, 4 << 20, t, &m);
        // It fills (takes 1 of 2 MiB: not counted, the stall starts), refuses, then takes the
        // rest 40 ms later (25 MiB/s): counted.
        c.accepted(1 << 20, 2 << 20, ms(1), &m);
        c.refused(ms(1), &m);
        assert!(m.stalling());
        c.accepted(1 << 20, 1 << 20, ms(41), &m);
        assert_eq!(m.stalled(), (1 << 20, Duration::from_millis(40)));
        // The next write after the writer's own work: what the socket takes at once was
        // drained during that work, which counts neither (bytes nor time); then a refusal
        // and the rest over 39 ms.
        c.accepted(25 << 10, 2 << 20, ms(42), &m);
        c.refused(ms(42), &m);
        c.accepted(1 << 20, 2 << 20, ms(81), &m);
        c.refused(ms(81), &m);
        c.accepted(1 << 20, 1 << 20, ms(121), &m);
        assert_eq!(m.stalled(), (3 << 20, Duration::from_millis(119)));
        assert!(!m.stalling());
        // Room again: writes taken whole, with no refusal, are not counted.
        c.accepted(1 << 20, 1 << 20, ms(200), &m);
        c.accepted(1 << 20, 1 << 20, ms(201), &m);
        assert_eq!(m.stalled(), (3 << 20, Duration::from_millis(119)));
    }
}
