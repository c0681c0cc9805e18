//! The failback state machine in one place: every change of `FailbackStatus::state` and
//! `FailbackStatus::replication_state` goes through [`set_failback`] / [`set_replication`],
//! which accept only the transitions listed in [`FAILBACK_TRANSITIONS`] and
//! [`REPLICATION_TRANSITIONS`]. A refused transition changes nothing and is logged: the
//! callers only ask for transitions their own checks allow, so a refusal is a bug to see,
//! not a request to fail.
//!
//! Staying in the same state is always allowed (a no-op).

use failback_api::{FailbackState, FailbackStatus, ReplicationState};

use FailbackState as F;
use ReplicationState as Rs;

/// `(from, allowed successors)` for the failback state:
/// - pairing (re)starts a failback from any state: `* -> IN_PROGRESS`;
/// - a finished round makes it launchable: `IN_PROGRESS | NOT_READY -> READY_FOR_LAUNCH`;
/// - a lost agent (or client) makes it not launchable: `READY -> NOT_READY`;
/// - a verified completion after launch: `running -> COMPLETED`;
/// - a client failure or digest mismatch: `running -> ERROR`;
/// - stop (admin, or the client reporting it stopped): `* -> NOT_STARTED`.
pub const FAILBACK_TRANSITIONS: &[(FailbackState, &[FailbackState])] = &[
    (F::FailbackNotStarted, &[F::FailbackInProgress]),
    (
        F::FailbackInProgress,
        &[
            F::FailbackReadyForLaunch,
            F::FailbackCompleted,
            F::FailbackError,
            F::FailbackNotStarted,
        ],
    ),
    (
        F::FailbackReadyForLaunch,
        &[
            F::FailbackNotReadyForLaunch,
            F::FailbackInProgress,
            F::FailbackCompleted,
            F::FailbackError,
            F::FailbackNotStarted,
        ],
    ),
    (
        F::FailbackNotReadyForLaunch,
        &[
            F::FailbackReadyForLaunch,
            F::FailbackInProgress,
            F::FailbackCompleted,
            F::FailbackError,
            F::FailbackNotStarted,
        ],
    ),
    (
        F::FailbackCompleted,
        &[F::FailbackInProgress, F::FailbackNotStarted],
    ),
    (
        F::FailbackError,
        &[F::FailbackInProgress, F::FailbackNotStarted],
    ),
];

/// `(from, allowed successors)` for the replication state: pairing starts `INITIATING` from
/// any state; a running replication moves freely between its states except back to
/// `INITIATING` (only a new pairing does that) and may stop; a stopped one only restarts by
/// pairing.
pub const REPLICATION_TRANSITIONS: &[(ReplicationState, &[ReplicationState])] = &[
    (Rs::NotStarted, &[Rs::Initiating, Rs::Stopped]),
    (Rs::Stopped, &[Rs::Initiating]),
    (
        Rs::Initiating,
        &[
            Rs::InitialSync,
            Rs::Rescan,
            Rs::Continuous,
            Rs::Backlog,
            Rs::Stalled,
            Rs::Disconnected,
            Rs::Stopped,
        ],
    ),
    (Rs::InitialSync, RUNNING_SUCCESSORS),
    (Rs::Rescan, RUNNING_SUCCESSORS),
    (Rs::Continuous, RUNNING_SUCCESSORS),
    (Rs::Backlog, RUNNING_SUCCESSORS),
    (Rs::Stalled, RUNNING_SUCCESSORS),
    (Rs::Disconnected, RUNNING_SUCCESSORS),
];

/// Successors of every running state but `INITIATING`: any running state, `INITIATING`
/// (re-pairing), or `STOPPED`.
const RUNNING_SUCCESSORS: &[ReplicationState] = &[
    Rs::Initiating,
    Rs::InitialSync,
    Rs::Rescan,
    Rs::Continuous,
    Rs::Backlog,
    Rs::Stalled,
    Rs::Disconnected,
    Rs::Stopped,
];

fn allowed<S: PartialEq + Copy>(table: &[(S, &[S])], from: S, to: S) -> bool {
    from == to
        || table
            .iter()
            .any(|(f, succ)| *f == from && succ.contains(&to))
}

/// True when the failback state may go from `from` to `to`.
pub fn failback_allowed(from: FailbackState, to: FailbackState) -> bool {
    allowed(FAILBACK_TRANSITIONS, from, to)
}

/// True when the replication state may go from `from` to `to`.
pub fn replication_allowed(from: ReplicationState, to: ReplicationState) -> bool {
    allowed(REPLICATION_TRANSITIONS, from, to)
}

/// Moves the failback state to `to` if the table allows it; returns whether it did.
pub fn set_failback(f: &mut FailbackStatus, to: FailbackState) -> bool {
    if failback_allowed(f.state, to) {
        f.state = to;
        true
    } else {
        tracing::warn!("refused failback state transition {} -> {to}", f.state);
        false
    }
}

/// Moves the replication state to `to` if the table allows it; returns whether it did.
pub fn set_replication(f: &mut FailbackStatus, to: ReplicationState) -> bool {
    if replication_allowed(f.replication_state, to) {
        f.replication_state = to;
        true
    } else {
        tracing::warn!(
            "refused replication state transition {} -> {to}",
            f.replication_state
        );
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_F: [FailbackState; 6] = [
        F::FailbackNotStarted,
        F::FailbackInProgress,
        F::FailbackReadyForLaunch,
        F::FailbackCompleted,
        F::FailbackError,
        F::FailbackNotReadyForLaunch,
    ];

    const ALL_R: [ReplicationState; 9] = [
        Rs::NotStarted,
        Rs::Stopped,
        Rs::Initiating,
        Rs::InitialSync,
        Rs::Rescan,
        Rs::Continuous,
        Rs::Backlog,
        Rs::Stalled,
        Rs::Disconnected,
    ];

    /// Every failback transition the service makes, each with the event causing it, and the
    /// ones it must never make; written independently of [`FAILBACK_TRANSITIONS`].
    #[test]
    fn failback_transitions_table() {
        let accepted = [
            (F::FailbackNotStarted, F::FailbackInProgress, "pair"),
            (F::FailbackCompleted, F::FailbackInProgress, "pair again"),
            (F::FailbackError, F::FailbackInProgress, "pair after error"),
            (F::FailbackReadyForLaunch, F::FailbackInProgress, "re-pair"),
            (
                F::FailbackInProgress,
                F::FailbackReadyForLaunch,
                "round done",
            ),
            (
                F::FailbackNotReadyForLaunch,
                F::FailbackReadyForLaunch,
                "agent back",
            ),
            (
                F::FailbackReadyForLaunch,
                F::FailbackNotReadyForLaunch,
                "agent lost",
            ),
            (F::FailbackReadyForLaunch, F::FailbackCompleted, "verified"),
            (
                F::FailbackNotReadyForLaunch,
                F::FailbackCompleted,
                "verified late",
            ),
            (F::FailbackInProgress, F::FailbackError, "client failed"),
            (
                F::FailbackReadyForLaunch,
                F::FailbackError,
                "digest mismatch",
            ),
            (F::FailbackInProgress, F::FailbackNotStarted, "stop"),
            (F::FailbackError, F::FailbackNotStarted, "stop after error"),
            (
                F::FailbackCompleted,
                F::FailbackNotStarted,
                "stop after done",
            ),
        ];
        let refused = [
            (F::FailbackNotStarted, F::FailbackReadyForLaunch),
            (F::FailbackNotStarted, F::FailbackCompleted),
            (F::FailbackNotStarted, F::FailbackError),
            (F::FailbackNotStarted, F::FailbackNotReadyForLaunch),
            (F::FailbackInProgress, F::FailbackNotReadyForLaunch),
            (F::FailbackCompleted, F::FailbackError),
            (F::FailbackCompleted, F::FailbackReadyForLaunch),
            (F::FailbackCompleted, F::FailbackNotReadyForLaunch),
            (F::FailbackError, F::FailbackCompleted),
            (F::FailbackError, F::FailbackReadyForLaunch),
        ];
        for (from, to, why) in accepted {
            let mut f = FailbackStatus {
                state: from,
                ..Default::default()
            };
            assert!(set_failback(&mut f, to), "{why}: {from} -> {to} refused");
            assert_eq!(f.state, to, "{why}");
        }
        for (from, to) in refused {
            let mut f = FailbackStatus {
                state: from,
                ..Default::default()
            };
            assert!(!set_failback(&mut f, to), "{from} -> {to} accepted");
            assert_eq!(f.state, from, "a refused transition changed the state");
        }
        // Staying is always fine; every state has a row.
        for s in ALL_F {
            assert!(failback_allowed(s, s));
            assert!(FAILBACK_TRANSITIONS.iter().any(|(f, _)| *f == s), "{s}");
        }
    }

    #[test]
    fn replication_transitions_table() {
        let accepted = [
            (Rs::NotStarted, Rs::Initiating, "pair"),
            (Rs::Stopped, Rs::Initiating, "pair after stop"),
            (Rs::Continuous, Rs::Initiating, "re-pair"),
            (Rs::Initiating, Rs::InitialSync, "first round"),
            (
                Rs::Initiating,
                Rs::Rescan,
                "first round to the original server",
            ),
            (Rs::Initiating, Rs::Disconnected, "agent never reached"),
            (Rs::InitialSync, Rs::Continuous, "idle"),
            (Rs::Continuous, Rs::Backlog, "big round"),
            (Rs::Backlog, Rs::Rescan, "round without backlog"),
            (Rs::Disconnected, Rs::Continuous, "agent back"),
            (Rs::Continuous, Rs::Disconnected, "agent lost"),
            (Rs::Continuous, Rs::Stopped, "completed / stop"),
            (Rs::Initiating, Rs::Stopped, "stop early"),
            (Rs::NotStarted, Rs::Stopped, "stop before pairing"),
        ];
        let refused = [
            (Rs::NotStarted, Rs::Continuous),
            (Rs::NotStarted, Rs::Disconnected),
            (Rs::Stopped, Rs::Continuous),
            (Rs::Stopped, Rs::Disconnected),
            (Rs::Stopped, Rs::InitialSync),
            (Rs::Continuous, Rs::NotStarted),
            (Rs::Initiating, Rs::NotStarted),
        ];
        for (from, to, why) in accepted {
            let mut f = FailbackStatus {
                replication_state: from,
                ..Default::default()
            };
            assert!(set_replication(&mut f, to), "{why}: {from} -> {to} refused");
            assert_eq!(f.replication_state, to, "{why}");
        }
        for (from, to) in refused {
            let mut f = FailbackStatus {
                replication_state: from,
                ..Default::default()
            };
            assert!(!set_replication(&mut f, to), "{from} -> {to} accepted");
            assert_eq!(f.replication_state, from);
        }
        for s in ALL_R {
            assert!(replication_allowed(s, s));
            assert!(REPLICATION_TRANSITIONS.iter().any(|(f, _)| *f == s), "{s}");
            // Nothing ever goes back to NOT_STARTED.
            if s != Rs::NotStarted {
                assert!(!replication_allowed(s, Rs::NotStarted), "{s}");
            }
        }
    }
}
