//! The DR service: pairing, certificate authority, failback state machine and admin API,
//! with its state in SQLite.
//!
//! Layers: [`store`] (persistence trait + SQLite), [`ca`] (rcgen CA), [`mapping`] (device
//! mapping rules), [`service`] (all logic, transport-free), [`http`] (HTTPS + JSON routes),
//! [`conn`] (accept loop, timeouts, connection caps), [`limits`] (transport limits, per-route
//! body limits), [`validate`] (URL parameters and body length limits), [`startup`] (data
//! directory checks), [`console`] (the web console under `/console`), [`bench`] (simulated heartbeating clients for `failback-server bench`).

pub mod bench;
pub mod ca;
pub mod conn;
pub mod console;
pub mod http;
pub mod limits;
pub mod mapping;
pub mod sealed;
pub mod service;
pub mod shared_ca;
pub mod startup;
pub mod store;
pub mod util;
pub mod validate;

pub use http::{start, RunningServer, ServerConfig, ServerError};
pub use limits::Limits;
pub use service::{ApiFailure, Caller, Service, Settings, BOOTSTRAP_ADMIN};
