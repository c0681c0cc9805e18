//! Resource limits of the HTTPS transport: timeouts and connection caps ([`Limits`], used by
//! [`crate::conn`]) and per-route request body limits enforced while the body is read
//! ([`body_limit`]): a body over its route's limit is refused with 413 as soon as the limit
//! is passed (at once when `Content-Length` says so), never buffered whole.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use failback_api::{ApiError, BOOT_REPORT_MAX_BODY};
use http_body_util::{BodyExt, LengthLimitError, Limited};

use crate::service::{ApiFailure, Service};

/// Largest client log upload (`POST /v1/client/log`; read only after the client secret was
/// checked).
pub use failback_api::LOG_UPLOAD_MAX_BODY;
/// Pairing, enrollment and heartbeats (inventories and progress of up to 256 disks).
pub const PEER_MAX_BODY: usize = 256 << 10;
/// Every other route (admin requests).
pub const DEFAULT_MAX_BODY: usize = 64 << 10;

/// Timeouts and connection caps; defaults suit production, tests shorten them.
#[derive(Debug, Clone)]
pub struct Limits {
    /// A TLS handshake must finish within this.
    pub handshake_timeout: Duration,
    /// A request head must be complete this long after its first byte arrived.
    pub header_timeout: Duration,
    /// A connection with no request in progress is closed after this (keep-alive idle).
    pub idle_timeout: Duration,
    /// A request body must be read completely within this.
    pub body_timeout: Duration,
    /// Open connections in all (also capped below the process's open-file limit).
    pub max_connections: usize,
    /// Open connections per source address (IPv6: per /64), authenticated or not.
    pub max_connections_per_ip: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            body_timeout: Duration::from_secs(60),
            max_connections: 4096,
            max_connections_per_ip: 256,
        }
    }
}

/// Body limit of a route, by path.
pub fn max_body(path: &str) -> usize {
    use failback_api::routes as r;
    match path {
        r::CLIENT_LOG => LOG_UPLOAD_MAX_BODY,
        r::CLIENT_BOOT_REPORT => BOOT_REPORT_MAX_BODY,
        r::PAIR | r::CLIENT_HEARTBEAT | r::AGENT_ENROLL | r::AGENT_HEARTBEAT => PEER_MAX_BODY,
        _ => DEFAULT_MAX_BODY,
    }
}

/// Error answer that also closes the connection (the rest of the body is never read).
fn refuse(status: StatusCode, code: &str, message: String) -> Response {
    let mut r = (
        status,
        Json(ApiError {
            error: code.into(),
            message,
            field: None,
        }),
    )
        .into_response();
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

fn too_large(path: &str, max: usize, got: &str) -> Response {
    refuse(
        StatusCode::PAYLOAD_TOO_LARGE,
        "PAYLOAD_TOO_LARGE",
        format!("request body for {path}: {got}; at most {max} bytes"),
    )
}

/// Shared state of [`body_limit`].
#[derive(Debug, Clone)]
pub struct BodyLimit {
    pub service: Arc<Service>,
    pub timeout: Duration,
}

/// Middleware: reads the body under its route's limit and the body timeout, then hands the
/// buffered body on. Log uploads are read only after the client secret was checked.
pub async fn body_limit(State(st): State<BodyLimit>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let max = max_body(&path);
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|n| *n > max as u64) {
        return too_large(&path, max, &format!("Content-Length {n}"));
    }
    if max == LOG_UPLOAD_MAX_BODY {
        // A store look-up: on the blocking pool.
        let service = st.service.clone();
        let auth = req.headers().get(header::AUTHORIZATION).cloned();
        let checked =
            tokio::task::spawn_blocking(move || client_authorized(&service, auth.as_ref())).await;
        match checked {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return crate::http::failure_response(e),
            Err(e) => {
                return crate::http::failure_response(ApiFailure::Internal(format!(
                    "request task: {e}"
                )))
            }
        }
    }
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(st.timeout, Limited::new(body, max).collect()).await {
        Err(_) => refuse(
            StatusCode::REQUEST_TIMEOUT,
            "REQUEST_TIMEOUT",
            format!(
                "request body for {path} not received within {:?}",
                st.timeout
            ),
        ),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            too_large(&path, max, "more than that sent")
        }
        Ok(Err(e)) => refuse(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            format!("reading request body for {path}: {e}"),
        ),
        Ok(Ok(c)) => {
            let body: Bytes = c.to_bytes();
            next.run(Request::from_parts(parts, Body::from(body))).await
        }
    }
}

fn client_authorized(
    service: &Service,
    auth: Option<&axum::http::HeaderValue>,
) -> Result<(), ApiFailure> {
    let secret = auth
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| {
            ApiFailure::Unauthorized("missing Authorization: Bearer <client secret>".into())
        })?;
    service.check_client_secret(secret)
}
