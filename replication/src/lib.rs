//! Versioned wire protocol and the block-sync engine shared by the client and the recovery agent.
//!
//! - [`wire`]: framing and the byte encoding of every message (protocol v1).
//! - [`tls`]: mutual TLS 1.3 pinned to one CA; client certificates scoped to an instance.
//! - [`client`]: [`Session::connect`] / [`Session::sync`] (delta sync by fixed-block hash compare).
//! - [`server`]: the agent side ([`server::serve`]).
//! - [`block`]: hashing, wire encoding, and verification into [`block::VerifiedRun`] (the only
//!   thing the disk writer in [`writer`] accepts).

pub mod allow;
pub mod block;
pub mod cbt;
pub mod checkpoint;
pub mod client;
pub mod conn;
pub mod device;
pub mod error;
mod hashing;
pub mod mapped;
pub mod pool;
pub mod progress;
pub mod record;
pub mod report;
pub mod resume;
pub mod scan;
pub mod sendmeter;
pub mod server;
pub mod tls;
pub mod wire;
pub mod wirestats;
pub mod writer;

pub use client::{HashCache, Mapping, Session, SyncOptions};
pub use error::{Error, ErrorClass, Result};
pub use progress::{NoProgress, Progress, RoundPlan};
pub use report::{DiskReport, SyncReport};
pub use server::{serve, ServeOptions, SourceDisk};
pub use tls::{ClientTls, ServerTls, TlsFiles};
pub use wire::{DiskInfo, PROTOCOL_VERSION};
