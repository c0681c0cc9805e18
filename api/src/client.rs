//! The one typed HTTPS client of the DR-service API, used by the appliance client, the agent
//! and the admin CLI / mass failback.
//!
//! - Trust: only the pinned CA, and only a certificate with the service role
//!   ([`failback_trust::service_client_config`]); never system roots.
//! - Several service URLs (replicas of one service on one database): a request goes to the
//!   URL that answered last; on a *connection* failure (connect refused or timed out, TLS
//!   stream broken, request timed out, connection reset before an answer) it moves on to the
//!   next URL, in the order given and wrapping around, until each was tried once. An HTTP
//!   answer, 4xx or 5xx, is the service's word and never moves it; neither does a certificate
//!   that is not the pinned service's (retrying elsewhere would hide an attack or a mistake).
//! - One error type, [`Error`], naming the URL (and the HTTP method and status where there is
//!   one) and saying whether a retry can help ([`Error::is_retryable`]).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::types::ApiError;

pub use reqwest::Method;

/// A failed call of the DR-service API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad connection settings (URL, CA).
    #[error("{0}")]
    Usage(String),
    /// No service URL could be reached (retryable). `url` is the last one tried; `message`
    /// names the cause for each URL tried.
    #[error("DR service {url} unreachable: {message}")]
    Network { url: String, message: String },
    /// The server's certificate is not the pinned DR service's (not retried, not failed over).
    #[error("DR service {url} not trusted: {cause}")]
    Untrusted {
        url: String,
        cause: failback_trust::TlsCause,
    },
    /// The service answered with an error status; `url` is `METHOD URL`.
    #[error("DR service {url}: HTTP {status} {}: {}", .error.error, .error.message)]
    Api {
        url: String,
        status: u16,
        error: ApiError,
    },
    /// The answer was not what the API promises.
    #[error("DR service {url}: unexpected answer: {message}")]
    Decode { url: String, message: String },
}

impl Error {
    /// True for transport errors and 5xx answers: the same call may work later.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Network { .. } => true,
            Error::Api { status, .. } => *status >= 500,
            _ => false,
        }
    }

    /// The HTTP status of an [`Error::Api`].
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Time limits of one request to one URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect and TLS handshake.
    pub connect: Duration,
    /// The whole request, answer included.
    pub request: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            request: Duration::from_secs(30),
        }
    }
}

/// Parses service URLs: one or more `https://HOST:PORT` separated by commas or white space
/// (`--server a,b`, `FAILBACK_SERVER`, the seed's `server_url`). Trailing slashes are dropped;
/// a URL given twice counts once.
pub fn parse_urls(list: &str) -> Result<Vec<String>, Error> {
    let mut urls: Vec<String> = Vec::new();
    for u in list
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|u| !u.is_empty())
    {
        let u = u.trim_end_matches('/');
        if !u.starts_with("https://") || u.len() == "https://".len() {
            return Err(Error::Usage(format!(
                "DR service URL {u:?} must start with https:// and name a host"
            )));
        }
        if !urls.iter().any(|x| x == u) {
            urls.push(u.to_string());
        }
    }
    if urls.is_empty() {
        return Err(Error::Usage(format!(
            "no DR service URL in {list:?} (https://HOST:PORT, several separated by commas)"
        )));
    }
    Ok(urls)
}

/// A body to send.
#[derive(Debug, Clone)]
enum Body {
    None,
    Json(Vec<u8>),
    Text(String),
}

/// An HTTPS client of one DR service reachable at one or more URLs. Cheap to clone; clones
/// share the URL that answered last.
#[derive(Debug, Clone)]
pub struct ServiceClient {
    http: reqwest::Client,
    urls: Arc<[String]>,
    current: Arc<AtomicUsize>,
}

impl ServiceClient {
    /// `urls`: see [`parse_urls`] (each entry may itself be a comma-separated list);
    /// `ca_pem`: the service CA (pinned); `ca_source` names where it came from, for errors.
    pub fn new(
        urls: &[String],
        ca_pem: &[u8],
        ca_source: &Path,
        timeouts: Timeouts,
    ) -> Result<Self, Error> {
        let urls = parse_urls(&urls.join(","))?;
        let tls = failback_trust::service_client_config(ca_pem, ca_source)
            .map_err(|e| Error::Usage(format!("DR service CA: {e}")))?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(timeouts.request)
            .connect_timeout(timeouts.connect)
            .build()
            .map_err(|e| Error::Usage(format!("HTTP client: {e}")))?;
        Ok(ServiceClient {
            http,
            urls: urls.into(),
            current: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// All service URLs, in failover order.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// The URL the next request goes to first (the one that answered last).
    pub fn current_url(&self) -> &str {
        &self.urls[self.current.load(Ordering::Relaxed) % self.urls.len()]
    }

    /// `GET path` -> `R`.
    pub async fn get<R: DeserializeOwned>(&self, path: &str, bearer: &str) -> Result<R, Error> {
        self.call(Method::GET, path, Some(bearer), Body::None).await
    }

    /// `POST path` with a JSON body (no bearer when `None`) -> `R`.
    pub async fn post<B: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        path: &str,
        bearer: Option<&str>,
        body: &B,
    ) -> Result<R, Error> {
        self.call(Method::POST, path, bearer, json(body)?).await
    }

    /// `POST path` with a plain-text body -> `R`.
    pub async fn post_text<R: DeserializeOwned>(
        &self,
        path: &str,
        bearer: &str,
        text: String,
    ) -> Result<R, Error> {
        self.call(Method::POST, path, Some(bearer), Body::Text(text))
            .await
    }

    /// Any method with an optional JSON body -> `R`.
    pub async fn request<B: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        bearer: &str,
        body: Option<&B>,
    ) -> Result<R, Error> {
        let body = match body {
            Some(b) => json(b)?,
            None => Body::None,
        };
        self.call(method, path, Some(bearer), body).await
    }

    async fn call<R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        body: Body,
    ) -> Result<R, Error> {
        let (url, resp) = self.send(&method, path, bearer, &body).await?;
        decode(&method, url, resp).await
    }

    /// Sends to the current URL, then to the next ones on connection failure.
    async fn send(
        &self,
        method: &Method,
        path: &str,
        bearer: Option<&str>,
        body: &Body,
    ) -> Result<(String, reqwest::Response), Error> {
        let n = self.urls.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut failures: Vec<String> = Vec::new();
        let mut last_url = String::new();
        for k in 0..n {
            let i = (first + k) % n;
            let url = format!("{}{path}", self.urls[i]);
            let e = match self.attempt(method, &url, bearer, body).await {
                Ok(resp) => {
                    if k > 0 {
                        self.current.store(i, Ordering::Relaxed);
                        tracing::warn!(
                            "DR service: now using {} ({})",
                            self.urls[i],
                            failures.join("; ")
                        );
                    }
                    return Ok((url, resp));
                }
                Err(e) => e,
            };
            if let Some(cause) = failback_trust::tls_cause(&e) {
                return Err(Error::Untrusted { url, cause });
            }
            let message = failback_trust::describe(&e);
            if !moves_on(&e) {
                return Err(Error::Network { url, message });
            }
            failures.push(if n > 1 {
                format!("{}: {message}", self.urls[i])
            } else {
                message
            });
            last_url = url;
        }
        Err(Error::Network {
            url: last_url,
            message: failures.join("; "),
        })
    }

    async fn attempt(
        &self,
        method: &Method,
        url: &str,
        bearer: Option<&str>,
        body: &Body,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let mut rq = self.http.request(method.clone(), url);
        if let Some(b) = bearer {
            rq = rq.bearer_auth(b);
        }
        rq = match body {
            Body::None => rq,
            Body::Json(b) => rq
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b.clone()),
            Body::Text(t) => rq
                .header(reqwest::header::CONTENT_TYPE, "text/plain; charset=utf-8")
                .body(t.clone()),
        };
        rq.send().await
    }
}

/// Whether a failed send is a connection failure worth trying the next URL for: no HTTP
/// answer came (connect refused or timed out, the request timed out, the connection broke).
fn moves_on(e: &reqwest::Error) -> bool {
    e.is_connect() || e.is_timeout() || e.is_request()
}

fn json<B: Serialize + ?Sized>(body: &B) -> Result<Body, Error> {
    serde_json::to_vec(body)
        .map(Body::Json)
        .map_err(|e| Error::Usage(format!("encoding the request body: {e}")))
}

/// A success answer's JSON, or the error body as [`Error::Api`].
async fn decode<R: DeserializeOwned>(
    method: &Method,
    url: String,
    resp: reqwest::Response,
) -> Result<R, Error> {
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(|e| Error::Network {
        url: url.clone(),
        message: format!("reading the answer: {}", failback_trust::describe(&e)),
    })?;
    if status.is_success() {
        return serde_json::from_slice(&bytes).map_err(|e| Error::Decode {
            url,
            message: e.to_string(),
        });
    }
    let error = serde_json::from_slice::<ApiError>(&bytes).unwrap_or_else(|_| ApiError {
        error: "HTTP".into(),
        message: String::from_utf8_lossy(&bytes).into_owned(),
        field: None,
    });
    Err(Error::Api {
        url: format!("{method} {url}"),
        status: status.as_u16(),
        error,
    })
}

#[cfg(test)]
mod tests;
