//! Typed configuration shared by every failback process.
//!
//! Everything two processes must agree on (seed file, client/agent/service config, failback
//! plans, DR-service API bodies) lives here, so that the client never has to link server-only
//! code. All structs use `deny_unknown_fields`: a typo in a config is an error, not a silent
//! default.
pub mod api;
pub mod block_size;
pub mod plan;
pub mod seed;
pub mod stdio;
