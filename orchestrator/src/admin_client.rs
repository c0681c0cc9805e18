//! HTTP client for the DR service's admin API (`/v1/admin/*`), used by the `failback` admin
//! commands and by mass failback. Pins the service CA when given (never system roots then),
//! authenticates with the bootstrap admin token or a credential secret (whose role decides
//! what the service allows; mass failback needs `operator`), and turns error bodies into [`AdminError::Api`] with
//! the service's code and message.

use std::path::Path;
use std::time::Duration;

use failback_api::*;
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Bad connection settings (URL, CA file).
    #[error("{0}")]
    Usage(String),
    /// The service could not be reached (retryable).
    #[error("DR service {url} unreachable: {message}")]
    Network { url: String, message: String },
    /// The server's certificate is not the pinned DR service's (not retried).
    #[error("DR service {url} not trusted: {cause}")]
    Untrusted {
        url: String,
        cause: failback_trust::TlsCause,
    },
    /// The service answered with an error.
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

impl AdminError {
    /// True for 5xx and transport errors.
    pub fn is_retryable(&self) -> bool {
        match self {
            AdminError::Network { .. } => true,
            AdminError::Api { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

/// An authenticated admin connection.
#[derive(Debug, Clone)]
pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

/// A certificate problem is [`AdminError::Untrusted`]; anything else is a network error,
/// described with its causes (reqwest alone says only "error sending request").
fn send_error(url: &str, e: reqwest::Error) -> AdminError {
    match failback_trust::tls_cause(&e) {
        Some(cause) => AdminError::Untrusted {
            url: url.to_owned(),
            cause,
        },
        None => AdminError::Network {
            url: url.to_owned(),
            message: failback_trust::describe(&e),
        },
    }
}

impl AdminClient {
    /// `server`: `https://host:port`; `ca`: PEM file of the service CA (pinned).
    pub fn new(server: &str, token: &str, ca: Option<&Path>) -> Result<Self, AdminError> {
        let pem = match ca {
            Some(p) => Some(std::fs::read(p).map_err(|e| {
                AdminError::Usage(format!("cannot read CA file {}: {e}", p.display()))
            })?),
            None => None,
        };
        Self::with_ca_pem(server, token, pem.as_deref())
    }

    /// Like [`new`](Self::new) with the CA as PEM bytes.
    pub fn with_ca_pem(
        server: &str,
        token: &str,
        ca_pem: Option<&[u8]>,
    ) -> Result<Self, AdminError> {
        let base = server.trim_end_matches('/').to_string();
        if !base.starts_with("https://") {
            return Err(AdminError::Usage(format!(
                "DR service URL {base:?} must start with https://"
            )));
        }
        if token.trim().is_empty() {
            return Err(AdminError::Usage(
                "admin token or credential secret is empty (--admin-token or FAILBACK_ADMIN_TOKEN)"
                    .into(),
            ));
        }
        let pem = ca_pem.ok_or_else(|| {
            AdminError::Usage(
                "the DR service's CA is required (--ca or FAILBACK_CA: its data-dir/ca.pem); \
                 the service's certificate is checked against it and its service role"
                    .into(),
            )
        })?;
        let tls = failback_trust::service_client_config(pem, Path::new("--ca"))
            .map_err(|e| AdminError::Usage(e.to_string()))?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| AdminError::Usage(format!("HTTP client: {e}")))?;
        Ok(AdminClient {
            http,
            base,
            token: token.trim().to_string(),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<R, AdminError> {
        let url = format!("{}{path}", self.base);
        let mut rq = self
            .http
            .request(method.clone(), &url)
            .bearer_auth(&self.token);
        if let Some(b) = body {
            rq = rq.json(b);
        }
        let resp = rq.send().await.map_err(|e| send_error(&url, e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| AdminError::Network {
            url: url.clone(),
            message: e.to_string(),
        })?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| AdminError::Decode {
                url,
                message: e.to_string(),
            });
        }
        let error = serde_json::from_slice::<ApiError>(&bytes).unwrap_or_else(|_| ApiError {
            error: "HTTP".into(),
            message: String::from_utf8_lossy(&bytes).into_owned(),
            field: None,
        });
        Err(AdminError::Api {
            url: format!("{method} {url}"),
            status: status.as_u16(),
            error,
        })
    }

    async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, AdminError> {
        self.call::<(), R>(reqwest::Method::GET, path, None).await
    }

    pub async fn list_instances(&self) -> Result<InstanceList, AdminError> {
        self.get("/v1/admin/instances").await
    }

    pub async fn describe(&self, id: &str) -> Result<RecoveryInstance, AdminError> {
        self.get(&format!("/v1/admin/instances/{id}")).await
    }

    pub async fn create_token(
        &self,
        req: &CreateTokenRequest,
    ) -> Result<CreateTokenResponse, AdminError> {
        self.call(reqwest::Method::POST, "/v1/admin/tokens", Some(req))
            .await
    }

    /// AWS `StartFailbackLaunch` for 1..=200 instances.
    pub async fn launch(
        &self,
        ids: &[String],
        verify: Option<failback_api::LaunchVerify>,
    ) -> Result<LaunchResponse, AdminError> {
        let req = LaunchRequest {
            recovery_instance_ids: ids.to_vec(),
            verify,
        };
        self.call(reqwest::Method::POST, "/v1/admin/launch", Some(&req))
            .await
    }

    pub async fn stop(&self, id: &str) -> Result<RecoveryInstance, AdminError> {
        self.call::<(), _>(
            reqwest::Method::POST,
            &format!("/v1/admin/instances/{id}/stop"),
            None,
        )
        .await
    }

    pub async fn get_config(&self, id: &str) -> Result<ReplicationConfig, AdminError> {
        self.get(&format!("/v1/admin/instances/{id}/config")).await
    }

    pub async fn update_config(
        &self,
        id: &str,
        req: &UpdateReplicationConfig,
    ) -> Result<ReplicationConfig, AdminError> {
        self.call(
            reqwest::Method::PUT,
            &format!("/v1/admin/instances/{id}/config"),
            Some(req),
        )
        .await
    }

    pub async fn set_hints(
        &self,
        id: &str,
        hints: &IdentificationHints,
    ) -> Result<RecoveryInstance, AdminError> {
        let req = SetHintsRequest {
            source_hints: hints.clone(),
        };
        self.call(
            reqwest::Method::PUT,
            &format!("/v1/admin/instances/{id}/hints"),
            Some(&req),
        )
        .await
    }

    pub async fn events(
        &self,
        instance: Option<&str>,
        after: u64,
        limit: u64,
    ) -> Result<EventList, AdminError> {
        let mut path = format!("/v1/admin/events?after={after}&limit={limit}");
        if let Some(i) = instance {
            path.push_str(&format!("&instance={i}"));
        }
        self.get(&path).await
    }

    pub async fn logs(&self, id: &str) -> Result<LogList, AdminError> {
        self.get(&format!("/v1/admin/instances/{id}/logs")).await
    }

    /// All admin credentials (role admin); never their secrets.
    pub async fn credentials(&self) -> Result<CredentialList, AdminError> {
        self.get("/v1/admin/credentials").await
    }

    /// A new credential (role admin); the answer holds its secret, shown once.
    pub async fn create_credential(
        &self,
        req: &CreateCredentialRequest,
    ) -> Result<CreateCredentialResponse, AdminError> {
        self.call(reqwest::Method::POST, "/v1/admin/credentials", Some(req))
            .await
    }

    /// Revokes a credential (role admin). The id is checked here first, so that no request
    /// text other than a well-formed id ends up in the URL path.
    pub async fn revoke_credential(&self, id: &str) -> Result<Credential, AdminError> {
        if !valid_credential_id(id) {
            return Err(AdminError::Usage(format!(
                "{id:?} is not a credential id (cred- followed by 16 lower-case hex digits)"
            )));
        }
        self.call::<(), _>(
            reqwest::Method::DELETE,
            &format!("/v1/admin/credentials/{id}"),
            None,
        )
        .await
    }
}
