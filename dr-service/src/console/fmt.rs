//! Small text formats of the console: sizes, times, durations, names.

use failback_api::{FailbackState, RecoveryInstance, ReplicationState};

pub fn bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < U.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[u])
    }
}

/// A rate or estimate as whole units (`as` saturates: negative and NaN give 0).
#[allow(clippy::cast_possible_truncation)]
pub fn whole(v: f64) -> u64 {
    v as u64
}

pub fn duration(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60),
    }
}

/// UTC `YYYY-MM-DD HH:MM:SS`.
pub fn time(at: u64) -> String {
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp(i64::try_from(at).unwrap_or(0)) else {
        return at.to_string();
    };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

pub fn ago(at: Option<u64>, now: u64) -> String {
    match at {
        Some(t) => format!("{} ago", duration(now.saturating_sub(t))),
        None => "never".into(),
    }
}

/// `FAILBACK_READY_FOR_LAUNCH` → `READY FOR LAUNCH`.
pub fn state_label(s: FailbackState) -> String {
    let t = s.to_string();
    t.strip_prefix("FAILBACK_").unwrap_or(&t).replace('_', " ")
}

/// The name people know an instance by: its configured name, hostname or id.
pub fn name(i: &RecoveryInstance) -> &str {
    i.config
        .name
        .as_deref()
        .or(i.hostname.as_deref())
        .or(i.source_hints.hostname.as_deref())
        .unwrap_or(&i.recovery_instance_id)
}

/// Whether the disks are consistent with the recovery volumes (between delta rounds, or done).
pub fn consistent(i: &RecoveryInstance) -> bool {
    i.failback.state == FailbackState::FailbackCompleted
        || i.failback.replication_state == ReplicationState::Continuous
}

/// Bytes verified of all disks, of their total (0..=1); consistent disks count as 1.
pub fn progress(i: &RecoveryInstance) -> f64 {
    if consistent(i) {
        return 1.0;
    }
    let total: u64 = i.failback.disks.iter().map(|d| d.total_bytes).sum();
    let done: u64 = i.failback.disks.iter().map(|d| d.replicated_bytes).sum();
    if total == 0 {
        0.0
    } else {
        (done as f64 / total as f64).min(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(duration(3725), "1h02m");
        assert_eq!(time(0), "1970-01-01 00:00:00");
        assert_eq!(
            state_label(FailbackState::FailbackReadyForLaunch),
            "READY FOR LAUNCH"
        );
    }
}
