//! What crossed the link for one disk, and the link's measured capacity: the per-disk wire
//! figures of [`crate::report::DiskReport::wire`].
//!
//! Bytes are counted as protocol frames (length prefix, tag and body), where the client reads
//! them; TLS adds its record headers and tags on top (about 0.2 % of a bulk transfer) and a
//! handshake per connection, which belong to no disk.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::block;
use crate::wire::{Compression, Encoding, WireBlock};

/// Length of the intervals over which [`LinkMeter`] measures the receive rate.
pub const METER_INTERVAL: Duration = Duration::from_millis(500);

/// Shortest span from which a partial interval's rate is reported.
pub const METER_SHORTEST: Duration = Duration::from_millis(10);

/// One disk's wire figures for one round.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WireReport {
    /// The compression mode the client asked for (`auto`, `zstd`, `none`).
    pub compression: Compression,
    /// Frame bytes received from the agent for this disk (blocks after compression, plans,
    /// window answers, frame headers).
    pub received_bytes: u64,
    /// Frame bytes sent to the agent for this disk (hash windows, refetches).
    pub sent_bytes: u64,
    /// Blocks received as they are.
    pub blocks_raw: u64,
    /// Blocks received zstd-compressed.
    pub blocks_zstd: u64,
    /// All-zero blocks received as markers (no payload).
    pub blocks_zero: u64,
    /// Decoded size of the raw and zstd blocks received (payload before compression).
    pub payload_bytes: u64,
    /// Their size as received (payload after compression).
    pub payload_wire_bytes: u64,
    /// `payload_bytes / payload_wire_bytes` (≥ 1); `None` without payload.
    pub compression_ratio: Option<f64>,
    /// Share of the payload blocks that came compressed (what `auto` chose), 0..=1.
    pub compressed_share: Option<f64>,
    /// `received_bytes` over the disk's wall time, bytes per second.
    pub rate_bytes_per_sec: f64,
    /// The link's measured capacity: the best receive rate of the whole connection over any
    /// [`METER_INTERVAL`] so far in the session (all disks together), bytes per second. A lower
    /// bound: when the agent, the disks or the CPU were slower than the link, it is their rate.
    pub link_bytes_per_sec: Option<f64>,
    /// `rate_bytes_per_sec / link_bytes_per_sec`.
    pub link_share: Option<f64>,
    /// The session's round trip measured at its protocol handshake, in milliseconds.
    #[serde(default)]
    pub rtt_ms: Option<f64>,
    /// Hash windows this disk ran ahead for that round trip (how far a compare round may run
    /// ahead of its answers).
    #[serde(default)]
    pub windows_ahead: u32,
}

impl WireReport {
    /// One line for logs and summaries, e.g. `4.2 MB received, 50 % of blocks zstd (auto),
    /// ratio 2.00, 504 Mbit/s = 98 % of the link's measured 514 Mbit/s, RTT 40.2 ms (20 windows
    /// ahead)`.
    pub fn summary(&self) -> String {
        let mode = match self.compression {
            Compression::Auto => "auto",
            Compression::Zstd => "zstd",
            Compression::None => "none",
        };
        let mbit = |b: f64| b * 8.0 / 1e6;
        let mut s = format!("{:.1} MB received", self.received_bytes as f64 / 1e6);
        if let (Some(share), Some(ratio)) = (self.compressed_share, self.compression_ratio) {
            s += &format!(
                ", {:.0} % of blocks zstd ({mode}), ratio {ratio:.2}",
                share * 100.0
            );
        } else {
            s += &format!(", no payload ({mode})");
        }
        s += &format!(", {:.0} Mbit/s", mbit(self.rate_bytes_per_sec));
        if let (Some(link), Some(share)) = (self.link_bytes_per_sec, self.link_share) {
            s += &format!(
                " = {:.0} % of the link's measured {:.0} Mbit/s",
                share * 100.0,
                mbit(link)
            );
        }
        if let Some(rtt) = self.rtt_ms {
            s += &format!(", RTT {rtt:.1} ms ({} windows ahead)", self.windows_ahead);
        }
        s
    }
}

/// Counts one disk's frames and blocks during a round.
#[derive(Debug, Default)]
pub struct WireTally {
    received: u64,
    raw: u64,
    zstd: u64,
    zero: u64,
    payload: u64,
    payload_wire: u64,
}

impl WireTally {
    /// A frame of `len` bytes arrived for this disk.
    pub fn frame(&mut self, len: usize) {
        self.received += len as u64;
    }

    /// Frame bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// The blocks of a `Blocks` frame starting at `first_block` (before verification: what
    /// arrived, refetches included). `size` and `bs` give each block's decoded length.
    pub fn blocks(&mut self, first_block: u64, blocks: &[WireBlock], size: u64, bs: u32) {
        for (i, b) in blocks.iter().enumerate() {
            let decoded = block::block_len(size, bs, first_block.saturating_add(i as u64));
            match b.encoding {
                Encoding::Zero => self.zero += 1,
                Encoding::Raw => {
                    self.raw += 1;
                    self.payload += b.payload.len() as u64;
                }
                Encoding::Zstd => {
                    self.zstd += 1;
                    self.payload += decoded;
                }
            }
            if b.encoding != Encoding::Zero {
                self.payload_wire += b.payload.len() as u64;
            }
        }
    }

    /// The round's figures: `sent` frame bytes to the agent, `elapsed` the disk's wall time.
    pub fn report(
        &self,
        compression: Compression,
        sent: u64,
        elapsed: Duration,
        link: Option<f64>,
    ) -> WireReport {
        let blocks = self.raw + self.zstd;
        let rate = self.received as f64 / elapsed.as_secs_f64().max(1e-6);
        WireReport {
            compression,
            received_bytes: self.received,
            sent_bytes: sent,
            blocks_raw: self.raw,
            blocks_zstd: self.zstd,
            blocks_zero: self.zero,
            payload_bytes: self.payload,
            payload_wire_bytes: self.payload_wire,
            compression_ratio: (self.payload_wire > 0)
                .then(|| self.payload as f64 / self.payload_wire as f64),
            compressed_share: (blocks > 0).then(|| self.zstd as f64 / blocks as f64),
            rate_bytes_per_sec: rate,
            link_bytes_per_sec: link,
            link_share: link.filter(|l| *l > 0.0).map(|l| (rate / l).min(1.0)),
            rtt_ms: None,
            windows_ahead: 0,
        }
    }
}

/// The receive rate of a connection, measured over consecutive [`METER_INTERVAL`]s; keeps the
/// best. Intervals start at the first byte after an idle gap longer than one interval, so
/// waiting for the next round does not dilute a measurement.
#[derive(Debug, Default)]
pub struct LinkMeter {
    state: Mutex<MeterState>,
}

#[derive(Debug, Default)]
struct MeterState {
    /// Start of the current interval, bytes so far in it, time of the last bytes.
    current: Option<(Instant, u64, Instant)>,
    best: Option<f64>,
}

impl LinkMeter {
    /// `len` bytes arrived now.
    pub fn add(&self, len: usize) {
        self.add_at(len, Instant::now());
    }

    fn add_at(&self, len: usize, now: Instant) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match s.current {
            Some((start, bytes, last)) if now - last <= METER_INTERVAL => {
                let bytes = bytes + len as u64;
                let span = now - start;
                if span >= METER_INTERVAL {
                    let rate = bytes as f64 / span.as_secs_f64();
                    s.best = Some(s.best.map_or(rate, |b| b.max(rate)));
                    s.current = Some((now, 0, now));
                } else {
                    s.current = Some((start, bytes, now));
                }
            }
            // The first bytes after a gap arrived over an unknown time: they only mark the
            // start of an interval.
            _ => s.current = Some((now, 0, now)),
        }
    }

    /// The best rate over a whole interval so far, bytes per second; while no interval has
    /// completed (a session shorter than one), the rate of the current one once it spans
    /// [`METER_SHORTEST`].
    pub fn best(&self) -> Option<f64> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.best.or_else(|| {
            let (start, bytes, last) = s.current?;
            let span = last - start;
            (span >= METER_SHORTEST).then(|| bytes as f64 / span.as_secs_f64())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::WireBlock;

    #[test]
    fn tally_counts_payload_before_and_after_compression() {
        let bs = 4096u32;
        let size = 3 * 4096 + 100; // last block is 100 bytes
        let z = block::compress_if_smaller(&vec![7u8; 4096]).unwrap();
        let blocks = vec![
            WireBlock::new(Encoding::Raw, [0; 32], vec![1u8; 4096].into()),
            WireBlock::new(Encoding::Zstd, [0; 32], z.clone().into()),
            WireBlock::new(Encoding::Zero, [0; 32], bytes::Bytes::new()),
            WireBlock::new(Encoding::Raw, [0; 32], vec![1u8; 100].into()),
        ];
        let mut t = WireTally::default();
        t.blocks(0, &blocks, size, bs);
        t.frame(10_000);
        let r = t.report(
            Compression::Auto,
            500,
            Duration::from_secs(2),
            Some(10_000.0),
        );
        assert_eq!((r.blocks_raw, r.blocks_zstd, r.blocks_zero), (2, 1, 1));
        assert_eq!(r.payload_bytes, 4096 + 4096 + 100);
        assert_eq!(r.payload_wire_bytes, 4096 + z.len() as u64 + 100);
        let ratio = r.compression_ratio.unwrap();
        assert!((ratio - 8292.0 / (4196 + z.len()) as f64).abs() < 1e-9);
        assert!(ratio > 1.0);
        assert!((r.compressed_share.unwrap() - 1.0 / 3.0).abs() < 1e-9);
        assert_eq!(r.received_bytes, 10_000);
        assert_eq!(r.sent_bytes, 500);
        assert!((r.rate_bytes_per_sec - 5000.0).abs() < 1e-6);
        assert!((r.link_share.unwrap() - 0.5).abs() < 1e-9);
        let empty = WireTally::default().report(Compression::None, 0, Duration::ZERO, None);
        assert_eq!(empty.compression_ratio, None);
        assert_eq!(empty.compressed_share, None);
        assert_eq!(empty.link_share, None);
    }

    #[test]
    fn meter_keeps_the_best_interval_and_skips_idle_gaps() {
        let m = LinkMeter::default();
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        assert_eq!(m.best(), None);
        // 1 MB every 100 ms: 10 MB/s once the first 500 ms interval completes.
        for i in 0..=6 {
            m.add_at(1_000_000, ms(i * 100));
        }
        let first = m.best().unwrap();
        assert!((first - 10_000_000.0).abs() < 1.0, "{first}");
        // A long idle gap, then a slower stretch: the best stays.
        for i in 0..=6 {
            m.add_at(100_000, ms(5_000 + i * 100));
        }
        assert_eq!(m.best(), Some(first));
        // A faster stretch replaces it.
        for i in 0..=6 {
            m.add_at(3_000_000, ms(10_000 + i * 100));
        }
        assert!(m.best().unwrap() > first * 2.0);
    }
}
