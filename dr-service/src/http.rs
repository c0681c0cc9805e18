//! HTTPS transport: axum routes over hyper + tokio-rustls (ring provider). Bodies are parsed
//! with `serde_path_to_error`, so a malformed request answers 400 with the JSON path of the
//! offending field (`inventory.disks[0].size_bytes`), before anything is stored.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use failback_api::*;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::ca::Ca;
use crate::limits::{self, BodyLimit, Limits};
use crate::service::{ApiFailure, Caller, Service, Settings};
use crate::util::{random_hex, secret_hash};
use crate::validate::Validate;

/// How to run the service.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    /// `postgres://...` (or `postgresql://...`): state in that PostgreSQL database; a path:
    /// that SQLite file; `None`: SQLite `failback.db` in the data directory.
    pub database: Option<String>,
    /// Seals the CA key stored in a PostgreSQL database (required with PostgreSQL).
    pub ca_secret: Option<std::sync::Arc<crate::sealed::SealKey>>,
    pub listen: SocketAddr,
    /// Extra subject alternative names for the HTTPS certificate (IPs or DNS names).
    pub sans: Vec<String>,
    /// Admin token; `None` = read `data_dir/admin-token`, creating it on first start.
    pub admin_token: Option<String>,
    pub settings: Settings,
    /// Timeouts and connection caps of the HTTPS transport.
    pub limits: Limits,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Ca(#[from] crate::ca::CaError),
    #[error(transparent)]
    SharedCa(#[from] crate::shared_ca::SharedCaError),
    /// A file in the data directory is unusable (garbage, empty, mismatched).
    #[error(transparent)]
    Startup(#[from] crate::startup::StartupError),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running service (in-process): its address, CA and admin token, and a shutdown handle.
#[derive(Debug)]
pub struct RunningServer {
    pub addr: SocketAddr,
    pub ca_pem: String,
    pub admin_token: String,
    pub service: Arc<Service>,
    /// Open HTTPS connections (for tests and diagnostics).
    pub connections: Arc<crate::conn::Conns>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningServer {
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Stops accepting, ends the monitor, waits for the accept loop to finish.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }

    /// Resolves when the server stops (Ctrl-C handling is the binary's job).
    pub async fn wait(self) {
        let _ = self.task.await;
    }

    pub fn shutdown_sender(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }
}

pub(crate) struct AppState {
    pub(crate) service: Arc<Service>,
    pub(crate) admin_hash: String,
    /// Web console sessions and samples.
    pub(crate) console: Arc<crate::console::Console>,
}

type St = State<Arc<AppState>>;

pub(crate) fn failure_response(e: ApiFailure) -> Response {
    let (status, code, field) = match &e {
        ApiFailure::BadRequest { field, .. } => {
            (StatusCode::BAD_REQUEST, "BAD_REQUEST", Some(field.clone()))
        }
        ApiFailure::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED", None),
        ApiFailure::Forbidden(_) => (StatusCode::FORBIDDEN, "FORBIDDEN", None),
        ApiFailure::Token { code, .. } => {
            let s = if *code == "TOKEN_SCOPE" {
                StatusCode::FORBIDDEN
            } else {
                StatusCode::UNAUTHORIZED
            };
            (s, *code, Some("token".to_string()))
        }
        ApiFailure::NotFound(_) => (StatusCode::NOT_FOUND, "NOT_FOUND", None),
        ApiFailure::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED", None),
        ApiFailure::Conflict { code, .. } => (StatusCode::CONFLICT, *code, None),
        ApiFailure::Store(_) | ApiFailure::Ca(_) | ApiFailure::Internal(_) => {
            tracing::error!("internal error: {e}");
            (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", None)
        }
    };
    (
        status,
        Json(ApiError {
            error: code.to_string(),
            message: e.to_string(),
            field,
        }),
    )
        .into_response()
}

fn reply<T: serde::Serialize>(r: Result<T, ApiFailure>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => failure_response(e),
    }
}

/// Parses a JSON body and checks its length limits, naming the offending field path on error.
fn parse<T: DeserializeOwned + Validate>(body: &Bytes) -> Result<T, ApiFailure> {
    let v: T = parse_json(body)?;
    v.validate()?;
    Ok(v)
}

/// Parses a JSON body, naming the offending field path on error (see [`parse_body`]).
fn parse_json<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiFailure> {
    parse_body(body).map_err(|e| ApiFailure::bad(e.field.clone(), e.to_string()))
}

fn bearer(h: &HeaderMap) -> Option<&str> {
    h.get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// The caller behind the bearer: the bootstrap admin token (data-dir `admin-token`) or a
/// credential, looked up on every request (a revoked one is refused at once).
fn caller(st: &AppState, h: &HeaderMap) -> Result<Caller, ApiFailure> {
    let Some(t) = bearer(h) else {
        return Err(ApiFailure::Unauthorized(
            "missing Authorization: Bearer <admin token or credential secret>".into(),
        ));
    };
    caller_by_hash(st, &secret_hash(t))
}

/// The caller whose secret hashes to `hash` (the bootstrap token or a live credential).
pub(crate) fn caller_by_hash(st: &AppState, hash: &str) -> Result<Caller, ApiFailure> {
    // Compare hashes: equal-length strings, so no early-exit length leak.
    if hash == st.admin_hash {
        return Ok(Caller::bootstrap());
    }
    st.service.credential_caller(hash)
}

/// Authenticates the caller and requires at least role `need` (401 / 403 otherwise).
fn require(st: &AppState, h: &HeaderMap, need: Role) -> Result<Caller, ApiFailure> {
    let c = caller(st, h)?;
    c.require(need)?;
    Ok(c)
}

fn need_bearer(h: &HeaderMap, what: &str) -> Result<String, ApiFailure> {
    bearer(h)
        .map(str::to_string)
        .ok_or_else(|| ApiFailure::Unauthorized(format!("missing Authorization: Bearer <{what}>")))
}

async fn health() -> &'static str {
    "ok\n"
}

/// Service calls running at once on the blocking pool. More would only wait there for a store
/// connection (or the SQLite writer) as parked OS threads, woken one by one at each release;
/// under a burst that crowd grows and its context switches eat the CPU the work needs (seen on
/// PostgreSQL with 10,000 clients: p50 3 s). Beyond this many, requests wait as tasks, in
/// arrival order (the semaphore is fair).
const BLOCKING_SLOTS: usize = 2 * crate::store::PG_POOL_SIZE as usize;

static SLOTS: std::sync::LazyLock<tokio::sync::Semaphore> =
    std::sync::LazyLock::new(|| tokio::sync::Semaphore::new(BLOCKING_SLOTS));

/// Runs a request's service call on the blocking pool (store calls and certificate
/// generation block) and turns its result into a response.
async fn off<T, F>(f: F) -> Response
where
    T: serde::Serialize + Send + 'static,
    F: FnOnce() -> Result<T, ApiFailure> + Send + 'static,
{
    // Never closed, so acquiring cannot fail.
    let Ok(_slot) = SLOTS.acquire().await else {
        return failure_response(ApiFailure::Internal("request slots closed".into()));
    };
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => reply(r),
        Err(e) => failure_response(ApiFailure::Internal(format!("request task: {e}"))),
    }
}

async fn enroll(State(st): St, body: Bytes) -> Response {
    off(move || st.service.enroll_agent(parse(&body)?)).await
}

async fn agent_hb(State(st): St, h: HeaderMap, body: Bytes) -> Response {
    off(move || {
        let s = need_bearer(&h, "agent secret")?;
        st.service.agent_heartbeat(&s, parse(&body)?)
    })
    .await
}

async fn pair(State(st): St, body: Bytes) -> Response {
    off(move || st.service.pair_answer(parse(&body)?)).await
}

async fn client_hb(State(st): St, h: HeaderMap, body: Bytes) -> Response {
    off(move || {
        let s = need_bearer(&h, "client secret")?;
        st.service.client_heartbeat(&s, parse(&body)?)
    })
    .await
}

async fn client_checkpoint_put(State(st): St, h: HeaderMap, body: Bytes) -> Response {
    off(move || {
        let s = need_bearer(&h, "client secret")?;
        st.service.put_checkpoints(&s, parse(&body)?)
    })
    .await
}

async fn client_checkpoint_get(State(st): St, h: HeaderMap) -> Response {
    off(move || {
        let s = need_bearer(&h, "client secret")?;
        st.service.checkpoints(&s)
    })
    .await
}

async fn client_log(State(st): St, h: HeaderMap, body: Bytes) -> Response {
    off(move || {
        let s = need_bearer(&h, "client secret")?;
        st.service.upload_log(&s, &body)
    })
    .await
}

/// Unauthenticated: its body limit is [`BOOT_REPORT_MAX_BODY`] (see [`crate::limits`]), its
/// rate budget per source address unless it names a pairing token the service issued.
async fn boot_report(
    State(st): St,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Response {
    off(move || st.service.boot_report_from(parse(&body)?, Some(peer.ip()))).await
}

async fn list(State(st): St, h: HeaderMap) -> Response {
    off(move || {
        require(&st, &h, Role::Viewer)?;
        st.service.list()
    })
    .await
}

async fn describe(State(st): St, h: HeaderMap, Path(id): Path<String>) -> Response {
    off(move || {
        require(&st, &h, Role::Viewer)?;
        st.service.describe(&id)
    })
    .await
}

async fn set_hints(State(st): St, h: HeaderMap, Path(id): Path<String>, body: Bytes) -> Response {
    off(move || {
        let c = require(&st, &h, Role::Operator)?;
        st.service.set_hints(&c.actor, &id, parse(&body)?)
    })
    .await
}

async fn stop(State(st): St, h: HeaderMap, Path(id): Path<String>) -> Response {
    off(move || {
        let c = require(&st, &h, Role::Operator)?;
        st.service.stop(&c.actor, &id)
    })
    .await
}

async fn get_config(State(st): St, h: HeaderMap, Path(id): Path<String>) -> Response {
    off(move || {
        require(&st, &h, Role::Viewer)?;
        st.service.get_config(&id)
    })
    .await
}

async fn put_config(State(st): St, h: HeaderMap, Path(id): Path<String>, body: Bytes) -> Response {
    off(move || {
        let c = require(&st, &h, Role::Admin)?;
        st.service.update_config(&c.actor, &id, parse(&body)?)
    })
    .await
}

async fn logs(State(st): St, h: HeaderMap, Path(id): Path<String>) -> Response {
    off(move || {
        require(&st, &h, Role::Viewer)?;
        st.service.list_logs(&id)
    })
    .await
}

async fn log_get(
    State(st): St,
    h: HeaderMap,
    Path((id, name)): Path<(String, String)>,
) -> Response {
    let r = tokio::task::spawn_blocking(move || {
        require(&st, &h, Role::Viewer)?;
        st.service.read_log(&id, &name)
    })
    .await;
    match r {
        Ok(Ok(b)) => b.into_response(),
        Ok(Err(e)) => failure_response(e),
        Err(e) => failure_response(ApiFailure::Internal(format!("request task: {e}"))),
    }
}

async fn tokens(State(st): St, h: HeaderMap, body: Bytes) -> Response {
    off(move || {
        let c = require(&st, &h, Role::Operator)?;
        st.service.create_token(&c.actor, parse(&body)?)
    })
    .await
}

async fn launch(State(st): St, h: HeaderMap, body: Bytes) -> Response {
    off(move || {
        let c = require(&st, &h, Role::Operator)?;
        st.service.launch(&c.actor, parse(&body)?)
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventQuery {
    instance: Option<String>,
    #[serde(default)]
    after: u64,
    limit: Option<u64>,
}

async fn events(
    State(st): St,
    h: HeaderMap,
    q: Result<Query<EventQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return failure_response(ApiFailure::bad("query", format!("query string: {e}"))),
    };
    off(move || {
        require(&st, &h, Role::Viewer)?;
        st.service
            .events(q.instance.as_deref(), q.after, q.limit.unwrap_or(1000))
    })
    .await
}

async fn credentials(State(st): St, h: HeaderMap) -> Response {
    off(move || {
        require(&st, &h, Role::Admin)?;
        st.service.credentials()
    })
    .await
}

async fn credential_create(State(st): St, h: HeaderMap, body: Bytes) -> Response {
    off(move || {
        let c = require(&st, &h, Role::Admin)?;
        st.service.create_credential(&c.actor, parse(&body)?)
    })
    .await
}

/// The service checks the id's format (`cred-` + 16 hex) before any lookup.
async fn credential_revoke(State(st): St, h: HeaderMap, Path(id): Path<String>) -> Response {
    off(move || {
        let c = require(&st, &h, Role::Admin)?;
        st.service.revoke_credential(&c.actor, &id)
    })
    .await
}

async fn fallback() -> Response {
    failure_response(ApiFailure::NotFound("no such API route".into()))
}

fn router(state: Arc<AppState>, body: BodyLimit) -> Router {
    use failback_api::routes as r;
    Router::new()
        .route(r::HEALTH, get(health))
        .route(r::AGENT_ENROLL, post(enroll))
        .route(r::AGENT_HEARTBEAT, post(agent_hb))
        .route(r::PAIR, post(pair))
        .route(r::CLIENT_HEARTBEAT, post(client_hb))
        .route(r::CLIENT_LOG, post(client_log))
        .route(
            r::CLIENT_CHECKPOINT,
            post(client_checkpoint_put).get(client_checkpoint_get),
        )
        .route(r::CLIENT_BOOT_REPORT, post(boot_report))
        .route(r::ADMIN_INSTANCES, get(list))
        .route(r::ADMIN_INSTANCE, get(describe))
        .route(r::ADMIN_INSTANCE_HINTS, axum::routing::put(set_hints))
        .route(r::ADMIN_INSTANCE_STOP, post(stop))
        .route(r::ADMIN_INSTANCE_CONFIG, get(get_config).put(put_config))
        .route(r::ADMIN_INSTANCE_LOGS, get(logs))
        .route(r::ADMIN_INSTANCE_LOG, get(log_get))
        .route(r::ADMIN_TOKENS, post(tokens))
        .route(r::ADMIN_LAUNCH, post(launch))
        .route(r::ADMIN_EVENTS, get(events))
        .route(
            r::ADMIN_CREDENTIALS,
            get(credentials).post(credential_create),
        )
        .route(
            r::ADMIN_CREDENTIAL,
            axum::routing::delete(credential_revoke),
        )
        .route_layer(axum::middleware::from_fn(crate::validate::path_params))
        .merge(crate::console::routes())
        .fallback(fallback)
        .layer(axum::middleware::from_fn_with_state(
            body,
            limits::body_limit,
        ))
        .layer(DefaultBodyLimit::max(limits::LOG_UPLOAD_MAX_BODY))
        .with_state(state)
}

fn admin_token(cfg: &ServerConfig) -> Result<String, ServerError> {
    if let Some(t) = &cfg.admin_token {
        return Ok(crate::startup::admin_token_flag(t)?);
    }
    let path = cfg.data_dir.join("admin-token");
    let dd = |source| ServerError::DataDir {
        path: path.clone(),
        source,
    };
    if path.exists() {
        let t = std::fs::read_to_string(&path).map_err(dd)?;
        return Ok(crate::startup::admin_token_file(&path, &t)?);
    }
    let t = format!("fbadm_{}", random_hex(24));
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    o.mode(0o600);
    let mut f = o.open(&path).map_err(dd)?;
    f.write_all(format!("{t}\n").as_bytes()).map_err(dd)?;
    Ok(t)
}

fn tls_config(ca: &Ca, sans: &[String]) -> Result<rustls::ServerConfig, ServerError> {
    let issued = ca.server_cert(sans)?;
    let here = std::path::Path::new("<issued service certificate>");
    let certs = failback_trust::pem::certs("certificate", here, issued.cert_pem.as_bytes())
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    let key = failback_trust::pem::private_key(here, issued.key_pem.as_bytes())
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Opens the data directory (SQLite, CA, admin token), binds and serves until shutdown.
pub async fn start(cfg: ServerConfig) -> Result<RunningServer, ServerError> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|source| ServerError::DataDir {
        path: cfg.data_dir.clone(),
        source,
    })?;
    crate::startup::check_data_dir(
        &cfg.data_dir,
        cfg.database
            .as_deref()
            .is_some_and(crate::store::is_postgres),
    )?;
    // Opening the store (migrations) and the CA (key generation on first start) block.
    let (store, ca, tls) = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || -> Result<_, ServerError> {
            let store = crate::store::open(cfg.database.as_deref(), &cfg.data_dir)?;
            let ca = match cfg.database.as_deref() {
                Some(d) if crate::store::is_postgres(d) => crate::shared_ca::load_or_store(
                    &*store,
                    cfg.ca_secret.as_deref(),
                    &cfg.data_dir,
                )?,
                _ => Ca::load_or_create(&cfg.data_dir)?,
            };
            let tls = Arc::new(tls_config(&ca, &cfg.sans)?);
            Ok((store, ca, tls))
        })
        .await
        .map_err(|e| ServerError::Tls(format!("start-up task: {e}")))??
    };
    let token = admin_token(&cfg)?;
    let mut settings = cfg.settings.clone();
    if settings.log_dir.is_relative() {
        settings.log_dir = cfg.data_dir.join(&settings.log_dir);
    }
    let service = Arc::new(Service::new(store, ca, settings));
    let console = Arc::new(crate::console::Console::new(&cfg.settings));
    let state = Arc::new(AppState {
        service: service.clone(),
        admin_hash: secret_hash(&token),
        console: console.clone(),
    });
    let body = BodyLimit {
        service: service.clone(),
        timeout: cfg.limits.body_timeout,
    };
    let app = router(state, body);
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServerError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ServerError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let (tx, rx) = watch::channel(false);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let monitor_service = service.clone();
    let tick_ms = (cfg
        .settings
        .agent_timeout_secs
        .min(cfg.settings.client_timeout_secs)
        * 1000
        / 4)
    .clamp(200, 5000);
    let mut monitor_rx = rx.clone();
    tokio::spawn(async move {
        let mut iv = tokio::time::interval(std::time::Duration::from_millis(tick_ms));
        loop {
            tokio::select! {
                _ = iv.tick() => {
                    let s = monitor_service.clone();
                    match tokio::task::spawn_blocking(move || s.periodic()).await {
                        Ok(Err(e)) => tracing::error!("monitor: {e}"),
                        Err(e) => tracing::error!("monitor task: {e}"),
                        Ok(Ok(_)) => {}
                    }
                }
                _ = monitor_rx.changed() => break,
            }
        }
    });
    crate::console::spawn_sampler(console, service.clone(), rx.clone());
    let connections = crate::conn::Conns::new(
        crate::conn::connection_budget(cfg.limits.max_connections),
        cfg.limits.max_connections_per_ip,
    );
    let transport = crate::conn::Transport {
        acceptor,
        app,
        conns: connections.clone(),
        limits: cfg.limits.clone(),
    };
    let task = tokio::spawn(crate::conn::accept_loop(listener, transport, rx));
    tracing::info!("DR service listening on https://{addr}");
    Ok(RunningServer {
        addr,
        ca_pem: service.ca_pem().to_string(),
        admin_token: token,
        service,
        connections,
        shutdown: tx,
        task,
    })
}
