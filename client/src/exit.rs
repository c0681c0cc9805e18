//! Exit codes: one per error class, the same table for every mode (README "Exit codes").

use failback_replication::ErrorClass;

/// The process exit codes of `failback-client`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Success.
    Ok = 0,
    /// Internal error (a bug, or local I/O that failed unexpectedly).
    Internal = 1,
    /// Bad arguments or configuration.
    Usage = 2,
    /// A target disk was refused by a safety rule; nothing was written.
    UnsafeTarget = 3,
    /// Could not connect, TLS handshake failed, or the connection dropped.
    Network = 4,
    /// A block or a whole-disk digest did not verify.
    Verification = 5,
    /// The agent reported an error or broke the protocol (version mismatch, garbage, refusal).
    Agent = 6,
    /// The DR service refused (pairing token invalid/expired/used, not authorised).
    DrRefused = 7,
    /// Stopped by the operator (stop failback).
    Stopped = 8,
}

impl Exit {
    /// The numeric code.
    pub fn code(self) -> u8 {
        self as u8
    }
}

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> Self {
        std::process::ExitCode::from(e.code())
    }
}

/// Exit code for a replication error.
pub fn for_replication(e: &failback_replication::Error) -> Exit {
    if matches!(e, failback_replication::Error::TargetBusy { .. }) {
        return Exit::UnsafeTarget;
    }
    match e.class() {
        ErrorClass::Usage => Exit::Usage,
        ErrorClass::Network => Exit::Network,
        ErrorClass::Verification => Exit::Verification,
        ErrorClass::Protocol => Exit::Agent,
        ErrorClass::LocalIo => Exit::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_stable() {
        let all = [
            Exit::Ok,
            Exit::Internal,
            Exit::Usage,
            Exit::UnsafeTarget,
            Exit::Network,
            Exit::Verification,
            Exit::Agent,
            Exit::DrRefused,
            Exit::Stopped,
        ];
        for (i, e) in all.iter().enumerate() {
            assert_eq!(usize::from(e.code()), i);
        }
        let e = failback_replication::Error::VersionMismatch {
            agent: 1,
            client: 2,
        };
        assert_eq!(for_replication(&e), Exit::Agent);
    }
}
