//! The DR service's admin API (`/v1/admin/*`) on the API crate's typed client
//! ([`failback_api::ServiceClient`]), used by the `failback` admin commands and by mass
//! failback. Pins the service CA (never system roots), moves to the next service URL on
//! connection failure, authenticates with the bootstrap admin token or a credential secret
//! (whose role decides what the service allows; mass failback needs `operator`), and turns
//! error bodies into [`AdminError::Api`] with the service's code and message.

use std::path::Path;
use std::time::Duration;

use failback_api::routes;
use failback_api::*;

/// The error of every admin call: the API crate's one client error.
pub use failback_api::Error as AdminError;

/// An authenticated admin connection.
#[derive(Debug, Clone)]
pub struct AdminClient {
    svc: ServiceClient,
    token: String,
}

impl AdminClient {
    /// `server`: `https://host:port`, or several separated by commas (replicas of one
    /// service: the client moves to the next on connection failure); `ca`: PEM file of the
    /// service CA (pinned).
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
        let urls = parse_urls(server)?;
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
        let timeouts = Timeouts {
            connect: Duration::from_secs(10),
            request: Duration::from_secs(60),
        };
        let svc = ServiceClient::new(&urls, pem, Path::new("--ca"), timeouts)?;
        Ok(AdminClient {
            svc,
            token: token.trim().to_string(),
        })
    }

    /// The service URL the next call goes to first.
    pub fn base(&self) -> &str {
        self.svc.current_url()
    }

    async fn call<B: serde::Serialize, R: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<R, AdminError> {
        self.svc.request(method, path, &self.token, body).await
    }

    async fn get<R: serde::de::DeserializeOwned>(&self, path: &str) -> Result<R, AdminError> {
        self.svc.get(path, &self.token).await
    }

    pub async fn list_instances(&self) -> Result<InstanceList, AdminError> {
        self.get(routes::ADMIN_INSTANCES).await
    }

    pub async fn describe(&self, id: &str) -> Result<RecoveryInstance, AdminError> {
        self.get(&routes::instance(id)).await
    }

    pub async fn create_token(
        &self,
        req: &CreateTokenRequest,
    ) -> Result<CreateTokenResponse, AdminError> {
        self.call(Method::POST, routes::ADMIN_TOKENS, Some(req))
            .await
    }

    /// AWS `StartFailbackLaunch` for 1..=200 instances.
    pub async fn launch(
        &self,
        ids: &[String],
        verify: Option<LaunchVerify>,
    ) -> Result<LaunchResponse, AdminError> {
        let req = LaunchRequest {
            recovery_instance_ids: ids.to_vec(),
            verify,
        };
        self.call(Method::POST, routes::ADMIN_LAUNCH, Some(&req))
            .await
    }

    pub async fn stop(&self, id: &str) -> Result<RecoveryInstance, AdminError> {
        self.call::<(), _>(Method::POST, &routes::instance_stop(id), None)
            .await
    }

    pub async fn get_config(&self, id: &str) -> Result<ReplicationConfig, AdminError> {
        self.get(&routes::instance_config(id)).await
    }

    pub async fn update_config(
        &self,
        id: &str,
        req: &UpdateReplicationConfig,
    ) -> Result<ReplicationConfig, AdminError> {
        self.call(Method::PUT, &routes::instance_config(id), Some(req))
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
        self.call(Method::PUT, &routes::instance_hints(id), Some(&req))
            .await
    }

    pub async fn events(
        &self,
        instance: Option<&str>,
        after: u64,
        limit: u64,
    ) -> Result<EventList, AdminError> {
        self.get(&routes::events(instance, after, limit)).await
    }

    pub async fn logs(&self, id: &str) -> Result<LogList, AdminError> {
        self.get(&routes::instance_logs(id)).await
    }

    /// All admin credentials (role admin); never their secrets.
    pub async fn credentials(&self) -> Result<CredentialList, AdminError> {
        self.get(routes::ADMIN_CREDENTIALS).await
    }

    /// A new credential (role admin); the answer holds its secret, shown once.
    pub async fn create_credential(
        &self,
        req: &CreateCredentialRequest,
    ) -> Result<CreateCredentialResponse, AdminError> {
        self.call(Method::POST, routes::ADMIN_CREDENTIALS, Some(req))
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
        self.call::<(), _>(Method::DELETE, &routes::credential(id), None)
            .await
    }
}
