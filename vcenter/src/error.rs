//! Errors. Every message names what failed: the VM, datastore, path or URL.

use std::path::PathBuf;
use std::time::Duration;

/// A vSphere fault, decoded from a SOAP fault `detail`, a task's `info.error` or a
/// property collector `missingSet`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultKind {
    /// Wrong user name or password.
    InvalidLogin,
    /// The session is not (or no longer) valid.
    NotAuthenticated,
    /// The VM is not in the power state the operation needs.
    InvalidPowerState {
        requested: Option<String>,
        existing: Option<String>,
    },
    /// The managed object (VM, task, snapshot...) does not exist (any more).
    ManagedObjectNotFound { obj: Option<String> },
    /// The user lacks a privilege on an object.
    NoPermission {
        object: Option<String>,
        privilege: Option<String>,
    },
    /// A datastore file does not exist.
    FileNotFound { file: Option<String> },
    /// Any other fault, by its vim type name.
    Other(String),
}

impl FaultKind {
    /// Decodes a fault from its vim type name and the fault element (for its fields).
    pub(crate) fn from_element(type_name: &str, el: Option<&crate::xml::Element>) -> Self {
        let field = |n: &str| el.and_then(|e| e.text_of(n)).map(str::to_string);
        match type_name {
            "InvalidLogin" => FaultKind::InvalidLogin,
            "NotAuthenticated" => FaultKind::NotAuthenticated,
            "InvalidPowerState" => FaultKind::InvalidPowerState {
                requested: field("requestedState").filter(|s| !s.is_empty()),
                existing: field("existingState").filter(|s| !s.is_empty()),
            },
            "ManagedObjectNotFound" => FaultKind::ManagedObjectNotFound { obj: field("obj") },
            "NoPermission" => FaultKind::NoPermission {
                object: field("object"),
                privilege: field("privilegeId"),
            },
            "FileNotFound" => FaultKind::FileNotFound {
                file: field("file"),
            },
            other => FaultKind::Other(other.to_string()),
        }
    }
}

impl std::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "?".into());
        match self {
            FaultKind::InvalidLogin => write!(f, "InvalidLogin"),
            FaultKind::NotAuthenticated => write!(f, "NotAuthenticated"),
            FaultKind::InvalidPowerState {
                requested,
                existing,
            } => write!(
                f,
                "InvalidPowerState (requested {}, existing {})",
                opt(requested),
                opt(existing)
            ),
            FaultKind::ManagedObjectNotFound { obj } => {
                write!(f, "ManagedObjectNotFound ({})", opt(obj))
            }
            FaultKind::NoPermission { object, privilege } => write!(
                f,
                "NoPermission (privilege {} on {})",
                opt(privilege),
                opt(object)
            ),
            FaultKind::FileNotFound { file } => write!(f, "FileNotFound ({})", opt(file)),
            FaultKind::Other(t) => write!(f, "{t}"),
        }
    }
}

/// A decoded fault with the server's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    /// `faultstring` or `localizedMessage` as sent by the server (may be empty).
    pub message: String,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.message.is_empty() {
            write!(f, "{}", self.kind)
        } else {
            write!(f, "{}: {}", self.kind, self.message)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Connection settings are unusable (bad URL, unreadable CA file, bad thumbprint).
    #[error("vCenter settings: {0}")]
    Config(String),

    /// CA file could not be read.
    #[error("reading CA file {path}: {source}")]
    CaFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Transport error (connect, TLS, reset, timeout) talking to a URL.
    #[error("{what}: HTTP request to {url} failed: {}", crate::tls::describe(.source))]
    Http {
        what: String,
        url: String,
        #[source]
        source: reqwest::Error,
    },

    /// Unexpected HTTP status.
    #[error("{what}: {url} returned HTTP {status}: {body}")]
    HttpStatus {
        what: String,
        url: String,
        status: u16,
        body: String,
    },

    /// The response was not the XML we expected.
    #[error("{what}: bad response from {url}: {detail}")]
    Protocol {
        what: String,
        url: String,
        detail: String,
    },

    /// Login refused (wrong user name or password).
    #[error("login to {url} as '{user}' refused: {fault}")]
    InvalidLogin {
        url: String,
        user: String,
        fault: Box<Fault>,
    },

    /// The session expired and a fresh login did not help.
    #[error("{what}: session on {url} expired and re-login once did not help: {fault}")]
    SessionExpired {
        what: String,
        url: String,
        fault: Box<Fault>,
    },

    /// A SOAP call failed with a fault.
    #[error("{what}: {fault}")]
    Fault { what: String, fault: Box<Fault> },

    /// A task ended in state `error`.
    #[error("{what}: task {task} failed: {fault}")]
    TaskFailed {
        what: String,
        task: String,
        fault: Box<Fault>,
    },

    /// A task did not finish in time (it may still finish on the server).
    #[error("{what}: task {task} not finished after {waited:?} (last state {state})")]
    TaskTimeout {
        what: String,
        task: String,
        state: String,
        waited: Duration,
    },

    /// No VM matched.
    #[error("VM {query} not found on {url}")]
    VmNotFound { query: String, url: String },

    /// More than one VM matched a query that must be unique.
    #[error("VM {query} is ambiguous on {url}: {matches:?}")]
    VmAmbiguous {
        query: String,
        url: String,
        matches: Vec<String>,
    },

    /// No datastore of that name.
    #[error("datastore '{datastore}' not found on {url} (available: {available:?})")]
    DatastoreNotFound {
        datastore: String,
        url: String,
        available: Vec<String>,
    },

    /// Datacenter missing or ambiguous.
    #[error("datacenter: {detail} on {url}")]
    Datacenter { detail: String, url: String },

    /// A file is missing on a datastore (checked before attaching an ISO).
    #[error("file '[{datastore}] {path}' not found (checked {url})")]
    DatastoreFileNotFound {
        datastore: String,
        path: String,
        url: String,
    },

    /// Local file I/O.
    #[error("{what} {path}: {source}")]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Uploaded or downloaded data does not match the local file.
    #[error("verify {url}: {detail}")]
    Verify { url: String, detail: String },

    /// No CD-ROM could be reused or added.
    #[error("VM {vm}: no free CD-ROM and no room for one: {detail}")]
    NoCdromSlot { vm: String, detail: String },

    /// A device was expected but is not there.
    #[error("VM {vm}: {detail}")]
    Device { vm: String, detail: String },

    /// Guest shutdown needs VMware Tools running.
    #[error("VM {vm}: guest shutdown needs VMware Tools running (tools status {status})")]
    ToolsNotRunning { vm: String, status: String },

    /// Snapshot not found by name.
    #[error("VM {vm}: no snapshot named '{name}' (have: {available:?})")]
    SnapshotNotFound {
        vm: String,
        name: String,
        available: Vec<String>,
    },

    /// A saved boot-options file does not belong to this VM or is unreadable.
    #[error("boot options: {0}")]
    BootOptions(String),
}

impl Error {
    /// The vSphere fault behind this error, if any.
    pub fn fault(&self) -> Option<&Fault> {
        match self {
            Error::InvalidLogin { fault, .. }
            | Error::SessionExpired { fault, .. }
            | Error::Fault { fault, .. }
            | Error::TaskFailed { fault, .. } => Some(fault),
            _ => None,
        }
    }

    pub fn fault_kind(&self) -> Option<&FaultKind> {
        self.fault().map(|f| &f.kind)
    }

    pub(crate) fn is_not_authenticated(&self) -> bool {
        matches!(self, Error::Fault { fault, .. } if fault.kind == FaultKind::NotAuthenticated)
    }

    /// Worth retrying later: transport failures, 5xx/429, task time-outs. Everything else
    /// (bad input, refused login, wrong power state) fails the same way on retry.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Http { source, .. } => {
                source.is_timeout() || source.is_connect() || source.is_request()
            }
            Error::HttpStatus { status, .. } => {
                *status == 429 || *status == 502 || *status == 503 || *status == 504
            }
            Error::TaskTimeout { .. } => true,
            _ => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
