//! Errors of the replication engine. Every message names the peer, disk, path or offset.

use std::path::PathBuf;

use crate::tls::TlsError;
use crate::wire::{ErrorCode, FrameError};

/// Coarse class of an [`Error`], used by binaries to pick an exit code and by callers to decide
/// whether a retry can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Bad options or a mapping that names no disk: fix the invocation.
    Usage,
    /// Connecting, TLS handshake, or the connection dropped: retryable.
    Network,
    /// A block or the whole-disk digest did not match: bytes were not trusted.
    Verification,
    /// The peer broke the protocol or reported an error.
    Protocol,
    /// Local disk I/O failed, or the kernel refused exclusive access to a target
    /// ([`Error::TargetBusy`]).
    LocalIo,
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while connecting, syncing or serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// TLS material could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// TCP connect failed.
    #[error("cannot connect to agent {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed (wrong CA, certificate refused, not TLS).
    #[error("TLS handshake with {peer} failed: {source}")]
    Handshake {
        peer: String,
        #[source]
        source: std::io::Error,
    },
    /// The peer's certificate is not trusted for this connection (other CA, wrong role or
    /// instance, expired, key too small) or the peer refused ours: retrying cannot help.
    #[error("refusing TLS peer {peer}: {cause}")]
    Untrusted {
        peer: String,
        cause: failback_trust::TlsCause,
    },
    /// A frame could not be decoded: the connection is closed.
    #[error("garbage from {peer}: {source}; connection closed")]
    Frame {
        peer: String,
        #[source]
        source: FrameError,
    },
    /// The connection closed or failed mid-session.
    #[error("connection to {peer} lost: {reason}")]
    ConnectionLost { peer: String, reason: String },
    /// A step took longer than its timeout.
    #[error("timed out after {secs} s waiting for {what} from {peer}")]
    Timeout {
        peer: String,
        what: &'static str,
        secs: u64,
    },
    /// The two sides speak different protocol versions.
    #[error("protocol version mismatch: agent speaks protocol {agent}, client {client}")]
    VersionMismatch { agent: u16, client: u16 },
    /// The peer reported an error.
    #[error("{peer} reported {code}: {message}")]
    Remote {
        peer: String,
        code: ErrorCode,
        message: String,
    },
    /// The peer sent something valid but out of place (e.g. a block that was not asked for).
    #[error("protocol violation by {peer}: {message}; connection closed")]
    Protocol { peer: String, message: String },
    /// A mapping names a disk the agent does not serve, or options are invalid.
    #[error("{0}")]
    Usage(String),
    /// Reading or writing a local disk/file failed.
    #[error("{op} {path} at offset {offset}: {source}")]
    LocalIo {
        op: &'static str,
        path: PathBuf,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused exclusive access to a target block device.
    #[error("refusing target {path}: the kernel reports the device busy (mounted, held or opened exclusively by another program); nothing was written")]
    TargetBusy { path: PathBuf },
    /// A block kept failing verification after the allowed retries.
    #[error("block {block} (offset {offset}) of disk {disk} failed verification {attempts} times: {reason}; nothing of it was written to {path}")]
    Verification {
        disk: String,
        path: PathBuf,
        block: u64,
        offset: u64,
        attempts: u32,
        reason: String,
    },
    /// The whole-disk digests differ.
    #[error("whole-disk digest mismatch for disk {disk} -> {path}: local {local}, agent {agent}")]
    DigestMismatch {
        disk: String,
        path: PathBuf,
        local: String,
        agent: String,
    },
}

impl Error {
    /// The class, for exit codes and retry decisions.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Tls(_) | Error::Usage(_) => ErrorClass::Usage,
            Error::Connect { .. }
            | Error::Handshake { .. }
            | Error::ConnectionLost { .. }
            | Error::Timeout { .. } => ErrorClass::Network,
            Error::Frame { .. }
            | Error::VersionMismatch { .. }
            | Error::Remote { .. }
            | Error::Untrusted { .. }
            | Error::Protocol { .. } => ErrorClass::Protocol,
            Error::LocalIo { .. } => ErrorClass::LocalIo,
            Error::TargetBusy { .. } => ErrorClass::LocalIo,
            Error::Verification { .. } | Error::DigestMismatch { .. } => ErrorClass::Verification,
        }
    }

    /// Whether running the same sync again may succeed (network trouble).
    pub fn is_retryable(&self) -> bool {
        self.class() == ErrorClass::Network
    }
}
