//! Pacing of hash-compare rounds on disks the agent cannot track (`--scan-rate`): a token
//! bucket over the bytes read (governor's GCRA limiter, shared by every stream of the agent,
//! so several disks together stay under the rate) and idle I/O priority for the reading thread
//! while such a round runs. The final round after a quiesce is not paced (see
//! [`failback_replication::server::ScanPacer`]).

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// One token of the bucket.
const CELL: u64 = 4096;

/// Default `--scan-rate` in MB/s (10^6 bytes): 40 % of the slowest cloud volume's baseline
/// (125 MB/s), ~5 % of a fast one; a 2 TiB rescan then takes ~11 h, so set it higher (or 0)
/// where the volume has room.
pub const DEFAULT_RATE_MB: u64 = 50;
/// Default burst in MiB: a small disk's round runs at full speed; the average stays paced.
pub const DEFAULT_BURST_MIB: u64 = 256;

/// Paces reads to `rate` bytes per second with a bucket of `burst` bytes.
#[derive(Debug)]
pub struct Pacer {
    limiter: DefaultDirectRateLimiter,
    burst_cells: u32,
    clock: DefaultClock,
}

impl Pacer {
    /// A pacer for `rate_mb` MB/s with a `burst_mib` MiB bucket; `None` for rate 0 (no pacing).
    pub fn new(rate_mb: u64, burst_mib: u64) -> Option<Self> {
        let cells = |bytes: u64| {
            NonZeroU32::new(u32::try_from(bytes.div_ceil(CELL).max(1)).unwrap_or(u32::MAX))
        };
        let rate = cells(rate_mb.checked_mul(1_000_000)?).filter(|_| rate_mb > 0)?;
        // At least one read batch (4 MiB), so a batch always fits in the bucket.
        let burst = cells(burst_mib.saturating_mul(1 << 20).max(4 << 20))?;
        Some(Pacer {
            limiter: RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)),
            burst_cells: burst.get(),
            clock: DefaultClock::default(),
        })
    }

    /// Blocks until `bytes` more may be read (a request larger than the bucket waits for a
    /// full bucket per bucketful).
    pub fn wait_for(&self, bytes: u64) {
        let mut left = u32::try_from(bytes.div_ceil(CELL)).unwrap_or(u32::MAX);
        while left > 0 {
            let n = left.min(self.burst_cells);
            let Some(nz) = NonZeroU32::new(n) else { return };
            loop {
                match self.limiter.check_n(nz) {
                    Ok(Ok(())) => break,
                    Ok(Err(not_until)) => std::thread::sleep(
                        not_until
                            .wait_time_from(self.clock.now())
                            .max(Duration::from_millis(1)),
                    ),
                    Err(_) => return, // n <= burst: cannot happen
                }
            }
            left -= n;
        }
    }
}

impl failback_replication::server::ScanPacer for Pacer {
    fn begin(&self) -> Box<dyn std::any::Any> {
        Box::new(IdleIo::enter())
    }
    fn wait(&self, bytes: u64) {
        self.wait_for(bytes);
    }
}

/// Idle I/O priority for the calling thread while alive; the previous priority is restored on
/// drop (the thread belongs to a pool and serves other rounds later).
///
/// Hand-written with `libc::syscall`: libc has no ioprio wrappers and the crates that do
/// (`ioprio`) are small and unmaintained for years; it is two syscalls with fixed constants
/// from linux/ioprio.h.
#[derive(Debug)]
pub struct IdleIo {
    previous: Option<libc::c_long>,
}

const IOPRIO_WHO_PROCESS: libc::c_long = 1;
const IOPRIO_CLASS_SHIFT: u32 = 13;
const IOPRIO_CLASS_IDLE: libc::c_long = 3;

/// The calling thread's I/O priority (`ioprio_get(IOPRIO_WHO_PROCESS, 0)`), or -1.
#[allow(unsafe_code)]
fn ioprio_get() -> libc::c_long {
    // SAFETY: the syscall takes two integers and touches no memory of ours.
    unsafe { libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, 0) }
}

/// Sets the calling thread's I/O priority; 0 or -1 (errno set).
#[allow(unsafe_code)]
fn ioprio_set(value: libc::c_long) -> libc::c_long {
    // SAFETY: the syscall takes three integers and touches no memory of ours.
    unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, value) }
}

impl IdleIo {
    /// Lowers the calling thread to the idle I/O class (best effort: a failure is logged and
    /// the round runs, paced, at the normal priority).
    pub fn enter() -> Self {
        let previous = ioprio_get();
        let rc = ioprio_set(IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT);
        if rc != 0 || previous < 0 {
            tracing::warn!(
                "cannot set idle I/O priority for the rescan: {}",
                std::io::Error::last_os_error()
            );
            return IdleIo { previous: None };
        }
        IdleIo {
            previous: Some(previous),
        }
    }

    /// The calling thread's I/O priority class (0 none, 1 realtime, 2 best effort, 3 idle).
    pub fn current_class() -> libc::c_long {
        ioprio_get() >> IOPRIO_CLASS_SHIFT
    }
}

impl Drop for IdleIo {
    fn drop(&mut self) {
        if let Some(p) = self.previous {
            ioprio_set(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn rate_zero_means_no_pacer() {
        assert!(Pacer::new(0, 256).is_none());
        assert!(Pacer::new(50, 256).is_some());
    }

    /// What passes in a time never exceeds rate x time + burst (an upper bound: cannot flake).
    #[test]
    fn reads_stay_under_rate_times_time_plus_burst() {
        let (rate, burst) = (100u64, 4u64);
        let p = Pacer::new(rate, burst).unwrap();
        let t0 = Instant::now();
        let mut passed = 0u64;
        for _ in 0..12 {
            p.wait_for(1 << 20);
            passed += 1 << 20;
        }
        let bound = rate as f64 * 1e6 * t0.elapsed().as_secs_f64() + (burst << 20) as f64;
        assert!(
            passed as f64 <= bound + CELL as f64,
            "{passed} bytes passed, bound {bound}"
        );
    }

    #[test]
    fn idle_io_priority_is_set_and_restored() {
        let before = IdleIo::current_class();
        {
            let _g = IdleIo::enter();
            assert_eq!(IdleIo::current_class(), IOPRIO_CLASS_IDLE);
        }
        assert_eq!(IdleIo::current_class(), before);
    }
}
