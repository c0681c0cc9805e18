//! The DR service: pairing, certificate authority, failback state machine and admin API,
//! with its state in SQLite.
//!
//! Layers: [`store`] (persistence trait + SQLite), [`ca`] (rcgen CA), [`mapping`] (device
//! mapping rules), [`service`] (all logic, transport-free), [`http`] (HTTPS + JSON routes),
//! [`bench`] (simulated heartbeating clients for `failback-server bench`).

pub mod bench;
pub mod ca;
pub mod http;
pub mod mapping;
pub mod service;
pub mod store;
pub mod util;

pub use http::{start, RunningServer, ServerConfig, ServerError};
pub use service::{ApiFailure, Caller, Service, Settings, BOOTSTRAP_ADMIN};
