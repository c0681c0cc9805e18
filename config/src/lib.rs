//! Typed configuration shared by every failback process.
//!
//! Everything two processes must agree on as configuration (seed file, client/agent/service
//! config, failback plans, the device mapping format) lives here, so that the client never has
//! to link server-only code; the DR-service API (bodies, routes, client) is `failback-api`. All structs use `deny_unknown_fields`: a typo in a config is an error, not a silent
//! default.
pub mod block_size;
pub mod mapping;
pub mod plan;
pub mod seed;
pub mod stdio;
