//! The DR-service HTTP API in one place, shared by the service (`failback-server`), the
//! appliance client (`failback-client run`), the agent (`failback-agent serve --server`) and the
//! admin CLI / mass failback (`failback`):
//!
//! - [`types`]: every JSON body (re-exported at the crate root);
//! - [`routes`]: the paths, used by the service's router and by [`client`];
//! - [`names`]: names two programs must agree on (certificate names, media labels);
//! - [`client`]: the one typed HTTPS client (pinned CA, service role checked, several service
//!   URLs with failover on connection failure), with one error type naming the URL and status.
//!
//! Light on purpose: no server code (no axum, no store, no certificate issuing), so the
//! appliance client can link it.

pub mod client;
pub mod names;
pub mod routes;
pub mod types;

pub use client::{parse_urls, Error, Method, ServiceClient, Timeouts};
pub use types::*;
