//! What the charts draw: every `console_sample_secs` the service samples each instance's
//! per-disk progress and the fleet's count of instances per failback state, kept in memory
//! for the last [`WINDOW_SECS`] (a restart starts the charts afresh; the event log, which
//! is stored, keeps the history).

use std::collections::{HashMap, VecDeque};

use failback_api::{FailbackState, RecoveryInstance};

/// How far back the charts look.
pub const WINDOW_SECS: u64 = 6 * 3600;

/// Every failback state, in the order the console shows them.
pub const STATES: [FailbackState; 6] = [
    FailbackState::FailbackNotStarted,
    FailbackState::FailbackInProgress,
    FailbackState::FailbackNotReadyForLaunch,
    FailbackState::FailbackReadyForLaunch,
    FailbackState::FailbackCompleted,
    FailbackState::FailbackError,
];

pub fn state_index(s: FailbackState) -> usize {
    STATES.iter().position(|x| *x == s).unwrap_or(0)
}

/// One instance at one time: its round and, per disk, bytes compared and backlog.
#[derive(Debug, Clone)]
pub struct InstSample {
    pub at: u64,
    pub round: u64,
    pub rescanned: Vec<u64>,
    pub backlog: u64,
}

#[derive(Debug, Clone)]
pub struct FleetSample {
    pub at: u64,
    pub counts: [u32; 6],
}

/// One point of an instance's chart: bytes per second compared and the backlog.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RatePoint {
    pub at: u64,
    pub rate: f64,
    pub backlog: u64,
}

#[derive(Debug, Default)]
pub struct Samples {
    per: HashMap<String, VecDeque<InstSample>>,
    fleet: VecDeque<FleetSample>,
}

fn trim<T>(q: &mut VecDeque<T>, at: impl Fn(&T) -> u64, oldest: u64) {
    while q.front().is_some_and(|s| at(s) < oldest) {
        q.pop_front();
    }
}

impl Samples {
    pub fn record(&mut self, now: u64, items: &[RecoveryInstance]) {
        let oldest = now.saturating_sub(WINDOW_SECS);
        let mut counts = [0u32; 6];
        for i in items {
            counts[state_index(i.failback.state)] += 1;
            let f = &i.failback;
            let q = self.per.entry(i.recovery_instance_id.clone()).or_default();
            q.push_back(InstSample {
                at: now,
                round: f.round,
                rescanned: f.disks.iter().map(|d| d.rescanned_bytes).collect(),
                backlog: f.disks.iter().map(|d| d.backlog_bytes).sum(),
            });
            trim(q, |s| s.at, oldest);
        }
        // A set, not a scan of `items` per entry: 10,000 instances made that 10^8 comparisons
        // (seconds of CPU every sample, seen as heartbeat latency).
        let present: std::collections::HashSet<&str> = items
            .iter()
            .map(|i| i.recovery_instance_id.as_str())
            .collect();
        self.per.retain(|id, _| present.contains(id.as_str()));
        self.fleet.push_back(FleetSample { at: now, counts });
        trim(&mut self.fleet, |s| s.at, oldest);
    }

    pub fn fleet(&self) -> Vec<FleetSample> {
        self.fleet.iter().cloned().collect()
    }

    /// Rate and backlog points of one instance (summed over its disks).
    pub fn rates(&self, id: &str) -> Vec<RatePoint> {
        let Some(q) = self.per.get(id) else {
            return Vec::new();
        };
        q.iter()
            .zip(q.iter().skip(1))
            .map(|(a, b)| RatePoint {
                at: b.at,
                rate: (0..b.rescanned.len())
                    .map(|d| disk_rate(a, b, d))
                    .sum::<f64>(),
                backlog: b.backlog,
            })
            .collect()
    }

    /// Latest bytes per second compared on disk `d` of an instance, if two samples exist.
    pub fn disk_rate(&self, id: &str, d: usize) -> Option<f64> {
        let q = self.per.get(id)?;
        let n = q.len();
        (n >= 2).then(|| disk_rate(&q[n - 2], &q[n - 1], d))
    }
}

/// Bytes per second compared on disk `d` between two samples; a new round starts at zero.
fn disk_rate(a: &InstSample, b: &InstSample, d: usize) -> f64 {
    let dt = b.at.saturating_sub(a.at);
    let now = b.rescanned.get(d).copied().unwrap_or(0);
    let before = a.rescanned.get(d).copied().unwrap_or(0);
    if dt == 0 {
        return 0.0;
    }
    let moved = if a.round == b.round && now >= before {
        now - before
    } else {
        now
    };
    moved as f64 / dt as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(id: &str, state: FailbackState, round: u64, done: u64) -> RecoveryInstance {
        let mut i: RecoveryInstance = serde_json::from_value(serde_json::json!({
            "recovery_instance_id": id, "hostname": null, "source_hints": {},
            "agent": {"address": null, "disks": [], "last_seen_at": null, "enrolled_at": null},
            "failback": {
                "state": "FAILBACK_NOT_STARTED", "replication_state": "NOT_STARTED",
                "client_id": null, "client_last_seen_at": null, "initiated_at": null,
                "failback_to_original_server": false, "launch_requested_at": null,
                "launch_job_id": null, "completed_at": null, "first_byte_at": null,
                "steps": [], "disks": [], "device_mapping": [], "round": 0, "lag_secs": null,
                "eta_at": null, "last_consistent_at": null, "errors": [],
                "last_error_message": null, "digests": [], "client_inventory": null
            },
            "config": {}, "created_at": 0
        }))
        .unwrap();
        i.failback.state = state;
        i.failback.round = round;
        i.failback.disks = vec![failback_api::DiskProgress {
            remote_id: "d".into(),
            local_path: "/dev/x".into(),
            total_bytes: 1000,
            replicated_bytes: done,
            rescanned_bytes: done,
            backlog_bytes: 7,
            ..Default::default()
        }];
        i
    }

    #[test]
    fn rates_restart_with_each_round_and_fleet_counts_states() {
        let mut s = Samples::default();
        s.record(10, &[inst("a", FailbackState::FailbackInProgress, 1, 100)]);
        s.record(20, &[inst("a", FailbackState::FailbackInProgress, 1, 600)]);
        s.record(
            30,
            &[inst("a", FailbackState::FailbackReadyForLaunch, 2, 200)],
        );
        let r = s.rates("a");
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].rate, r[1].rate, r[1].backlog), (50.0, 20.0, 7));
        assert_eq!(s.disk_rate("a", 0), Some(20.0));
        let f = s.fleet();
        assert_eq!(
            f[2].counts[state_index(FailbackState::FailbackReadyForLaunch)],
            1
        );
        // Samples older than the window go; vanished instances go.
        s.record(30 + WINDOW_SECS + 1, &[]);
        assert!(s.rates("a").is_empty());
        assert_eq!(s.fleet().len(), 1);
    }
}
