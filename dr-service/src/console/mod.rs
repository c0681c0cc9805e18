//! The web console under `/console` on the service's HTTPS port: server-rendered HTML
//! ([`maud`]: templates are Rust, checked at compile time, every value escaped), one small
//! script and one style sheet embedded in the binary (no CDN, no fonts), live updates by
//! short polling, charts as inline SVG.
//!
//! Security: login with a scoped admin credential (or the bootstrap token); a session cookie
//! `Secure; HttpOnly; SameSite=Strict` with a fixed lifetime; every POST needs the session's
//! CSRF token and an `Origin` equal to the service's own; every answer carries a strict
//! Content-Security-Policy (scripts and styles only from `/console/assets`, no inline code,
//! no framing). Actions call the same service functions as the admin API, with the same
//! role checks (viewer sees; operator launches, stops, creates tokens; admin sets bandwidth).

// Handlers return an axum `Response` as their early-exit error (a page or a redirect): it is
// large, and boxing it would only add noise to every handler.
#![allow(clippy::result_large_err)]

mod chart;
mod fmt;
mod pages;
mod samples;
mod session;

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use failback_api::{
    valid_instance_id, CreateTokenRequest, LaunchRequest, Role, TokenKind, UpdateReplicationConfig,
};
use serde::Deserialize;
use tokio::sync::watch;

use crate::http::AppState;
use crate::service::{ApiFailure, Caller, Service, Settings};
use crate::util::{now_secs, secret_hash};

pub use samples::{Samples, STATES};

/// Content-Security-Policy of every console answer.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                       connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
                       base-uri 'none'";

const JS: &str = include_str!("assets/console.js");
const CSS: &str = include_str!("assets/console.css");

/// Console state kept by the running service.
#[derive(Debug)]
pub struct Console {
    sessions: session::Sessions,
    samples: Mutex<Samples>,
    session_secs: u64,
    sample_secs: u64,
    agent_timeout_secs: u64,
}

impl Console {
    pub fn new(s: &Settings) -> Console {
        Console {
            sessions: session::Sessions::default(),
            samples: Mutex::new(Samples::default()),
            session_secs: s.console_session_secs.max(1),
            sample_secs: s.console_sample_secs.max(1),
            agent_timeout_secs: s.agent_timeout_secs,
        }
    }

    fn samples(&self) -> std::sync::MutexGuard<'_, Samples> {
        self.samples.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Samples progress and state counts every `console_sample_secs` until shutdown.
pub(crate) fn spawn_sampler(c: Arc<Console>, svc: Arc<Service>, mut stop: watch::Receiver<bool>) {
    tokio::spawn(async move {
        let mut iv = tokio::time::interval(std::time::Duration::from_secs(c.sample_secs));
        loop {
            tokio::select! {
                _ = iv.tick() => {
                    let (c, svc) = (c.clone(), svc.clone());
                    let r = tokio::task::spawn_blocking(move || {
                        let t = std::time::Instant::now();
                        let items = svc.list()?.items;
                        c.samples().record(now_secs(), &items);
                        tracing::debug!(
                            "console sample: {} instances in {} ms",
                            items.len(),
                            t.elapsed().as_millis()
                        );
                        Ok::<_, ApiFailure>(())
                    })
                    .await;
                    match r {
                        Ok(Err(e)) => tracing::warn!("console sample: {e}"),
                        Err(e) => tracing::warn!("console sample task: {e}"),
                        Ok(Ok(())) => {}
                    }
                }
                _ = stop.changed() => break,
            }
        }
    });
}

type St = State<Arc<AppState>>;

/// The logged-in user of a request.
pub(crate) struct Ctx {
    pub caller: Caller,
    pub csrf: String,
}

impl Ctx {
    pub fn can(&self, r: Role) -> bool {
        self.caller.role >= r
    }
}

/// Adds the security headers to every console answer.
async fn headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    for (k, v) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "same-origin"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    r
}

pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/console",
            get(|| async { Redirect::to("/console/instances") }),
        )
        .route(
            "/console/",
            get(|| async { Redirect::to("/console/instances") }),
        )
        .route("/console/login", get(login_page).post(login))
        .route("/console/logout", post(logout))
        .route("/console/instances", get(instances))
        .route("/console/instances/{id}", get(instance))
        .route("/console/instances/{id}/logs/{name}", get(log))
        .route("/console/instances/{id}/bandwidth", post(bandwidth))
        .route("/console/agents", get(agents))
        .route("/console/tokens", get(tokens).post(token_create))
        .route("/console/tokens/revoke", post(token_revoke))
        .route("/console/actions", post(actions))
        .route("/console/assets/console.js", get(js))
        .route("/console/assets/console.css", get(css))
        .layer(axum::middleware::map_response(headers))
}

async fn js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        JS,
    )
        .into_response()
}

async fn css() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], CSS).into_response()
}

/// Polls of the live region carry this header: they get 401 instead of a redirect.
const POLL_HEADER: &str = "x-console-poll";

fn to_login(h: &HeaderMap, why: &str) -> Response {
    if h.contains_key(POLL_HEADER) {
        return (StatusCode::UNAUTHORIZED, "session ended").into_response();
    }
    Redirect::to(&format!("/console/login?{why}=1")).into_response()
}

/// The session of the request, with its credential checked again; else the login page.
fn session(st: &AppState, h: &HeaderMap) -> Result<Ctx, Response> {
    let id = h
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(session::cookie_value);
    let Some(id) = id else {
        return Err(to_login(h, "login"));
    };
    let Some(s) = st.console.sessions.get(&id, now_secs()) else {
        return Err(to_login(h, "expired"));
    };
    match crate::http::caller_by_hash(st, &s.secret_hash) {
        Ok(caller) => Ok(Ctx {
            caller,
            csrf: s.csrf,
        }),
        Err(_) => {
            st.console.sessions.remove(&id);
            Err(to_login(h, "expired"))
        }
    }
}

/// A form body as name/value pairs.
struct Form(Vec<(String, String)>);

impl Form {
    fn parse(b: &Bytes) -> Form {
        Form(form_urlencoded::parse(b).into_owned().collect())
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }
    fn all(&self, k: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

fn refused(status: StatusCode, msg: &str) -> Response {
    (status, pages::message("Refused", msg)).into_response()
}

/// `Origin` must be this service (`https://` + `Host`): a form posted from another site is
/// refused even before the CSRF token is looked at.
fn check_origin(h: &HeaderMap) -> Result<(), Response> {
    let host = h.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin = h.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    match (host, origin) {
        (Some(host), Some(o)) if o == format!("https://{host}") => Ok(()),
        (_, o) => Err(refused(
            StatusCode::FORBIDDEN,
            &format!(
                "request refused: Origin {} is not this service",
                o.unwrap_or("(missing)")
            ),
        )),
    }
}

/// A POST from a logged-in user: session, Origin and CSRF token, then the role.
fn post_ctx(st: &AppState, h: &HeaderMap, f: &Form, need: Role) -> Result<Ctx, Response> {
    check_origin(h)?;
    let ctx = session(st, h)?;
    let sent = f.get("csrf").unwrap_or("");
    // Compare hashes: equal length, no early exit on the first differing byte.
    if sent.is_empty() || secret_hash(sent) != secret_hash(&ctx.csrf) {
        return Err(refused(
            StatusCode::FORBIDDEN,
            "request refused: missing or wrong CSRF token (reload the page)",
        ));
    }
    if let Err(e) = ctx.caller.require(need) {
        return Err(refused(StatusCode::FORBIDDEN, &e.to_string()));
    }
    Ok(ctx)
}

fn failure(e: ApiFailure) -> Response {
    let status = match &e {
        ApiFailure::BadRequest { .. } => StatusCode::BAD_REQUEST,
        ApiFailure::NotFound(_) => StatusCode::NOT_FOUND,
        ApiFailure::Forbidden(_) | ApiFailure::Token { .. } => StatusCode::FORBIDDEN,
        ApiFailure::Conflict { .. } => StatusCode::CONFLICT,
        ApiFailure::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, pages::message("Error", &e.to_string())).into_response()
}

#[derive(Deserialize, Default)]
struct LoginQuery {
    expired: Option<String>,
    login: Option<String>,
}

async fn login_page(q: Result<Query<LoginQuery>, QueryRejection>) -> Response {
    let q = q.map(|Query(q)| q).unwrap_or_default();
    let note = if q.expired.is_some() {
        Some("Your session ended; log in again.")
    } else if q.login.is_some() {
        Some("Log in to continue.")
    } else {
        None
    };
    pages::login(note, None).into_response()
}

async fn login(State(st): St, h: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = check_origin(&h) {
        return r;
    }
    let f = Form::parse(&body);
    let secret = f.get("secret").unwrap_or("").trim();
    let hash = secret_hash(secret);
    if secret.is_empty() || crate::http::caller_by_hash(&st, &hash).is_err() {
        return (
            StatusCode::UNAUTHORIZED,
            pages::login(None, Some("Credential not recognised or revoked.")),
        )
            .into_response();
    }
    let ttl = st.console.session_secs;
    let id = st.console.sessions.create(hash, now_secs(), ttl);
    (
        [(header::SET_COOKIE, session::set_cookie(&id, ttl))],
        Redirect::to("/console/instances"),
    )
        .into_response()
}

async fn logout(State(st): St, h: HeaderMap, body: Bytes) -> Response {
    let f = Form::parse(&body);
    if let Err(r) = post_ctx(&st, &h, &f, Role::Viewer) {
        return r;
    }
    if let Some(id) = h
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(session::cookie_value)
    {
        st.console.sessions.remove(&id);
    }
    (
        [(header::SET_COOKIE, session::clear_cookie())],
        Redirect::to("/console/login"),
    )
        .into_response()
}

/// Filter and sort of the instance list.
#[derive(Deserialize, Default, Debug, Clone)]
pub(crate) struct ListQuery {
    pub state: Option<String>,
    pub q: Option<String>,
    pub sort: Option<String>,
    pub partial: Option<String>,
}

async fn instances(
    State(st): St,
    h: HeaderMap,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    let ctx = match session(&st, &h) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let q = q.map(|Query(q)| q).unwrap_or_default();
    let items = match st.service.list() {
        Ok(l) => l.items,
        Err(e) => return failure(e),
    };
    let fleet = st.console.samples().fleet();
    let now = now_secs();
    let live = pages::instances_live(&ctx, &items, &q, &fleet, now, st.console.agent_timeout_secs);
    if q.partial.is_some() {
        return live.into_response();
    }
    pages::layout(&ctx, "Instances", pages::instances(&ctx, &q, live)).into_response()
}

#[derive(Deserialize, Default)]
struct PartialQuery {
    partial: Option<String>,
}

fn check_id(id: &str) -> Result<(), Response> {
    if valid_instance_id(id) {
        Ok(())
    } else {
        Err(failure(ApiFailure::bad(
            "id",
            format!(
                "{:?} is not a recovery instance id",
                id.chars().take(40).collect::<String>()
            ),
        )))
    }
}

async fn instance(
    State(st): St,
    h: HeaderMap,
    Path(id): Path<String>,
    q: Result<Query<PartialQuery>, QueryRejection>,
) -> Response {
    let ctx = match session(&st, &h) {
        Ok(c) => c,
        Err(r) => return r,
    };
    if let Err(r) = check_id(&id) {
        return r;
    }
    let data = (|| {
        let inst = st.service.describe(&id)?;
        let events = st.service.events(Some(&id), 0, 10_000)?.items;
        let logs = st.service.list_logs(&id)?.items;
        Ok::<_, ApiFailure>((inst, events, logs))
    })();
    let (inst, events, logs) = match data {
        Ok(d) => d,
        Err(e) => return failure(e),
    };
    let (rates, disk_rates) = {
        let s = st.console.samples();
        let dr: Vec<Option<f64>> = (0..inst.failback.disks.len())
            .map(|d| s.disk_rate(&id, d))
            .collect();
        (s.rates(&id), dr)
    };
    let now = now_secs();
    let view = pages::InstanceView {
        inst: &inst,
        events: &events,
        logs: &logs,
        rates: &rates,
        disk_rates: &disk_rates,
        now,
        agent_timeout: st.console.agent_timeout_secs,
    };
    let live = pages::instance_live(&view);
    if q.is_ok_and(|Query(q)| q.partial.is_some()) {
        return live.into_response();
    }
    let title = fmt::name(&inst).to_string();
    pages::layout(&ctx, &title, pages::instance(&ctx, &inst, live)).into_response()
}

async fn log(State(st): St, h: HeaderMap, Path((id, name)): Path<(String, String)>) -> Response {
    if let Err(r) = session(&st, &h) {
        return r;
    }
    match st.service.read_log(&id, &name) {
        Ok(b) => (
            [
                (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                (header::CONTENT_DISPOSITION, "inline"),
            ],
            b,
        )
            .into_response(),
        Err(e) => failure(e),
    }
}

async fn bandwidth(State(st): St, h: HeaderMap, Path(id): Path<String>, body: Bytes) -> Response {
    let f = Form::parse(&body);
    let ctx = match post_ctx(&st, &h, &f, Role::Admin) {
        Ok(c) => c,
        Err(r) => return r,
    };
    if let Err(r) = check_id(&id) {
        return r;
    }
    let Some(mbps) = f.get("mbps").and_then(|v| v.trim().parse::<u64>().ok()) else {
        return failure(ApiFailure::bad(
            "mbps",
            "bandwidth: not a whole number of Mbit/s",
        ));
    };
    let req = UpdateReplicationConfig {
        bandwidth_throttling_mbps: Some(mbps),
        ..Default::default()
    };
    match st.service.update_config(&ctx.caller.actor, &id, req) {
        Ok(_) => Redirect::to(&format!("/console/instances/{id}")).into_response(),
        Err(e) => failure(e),
    }
}

async fn agents(
    State(st): St,
    h: HeaderMap,
    q: Result<Query<PartialQuery>, QueryRejection>,
) -> Response {
    let ctx = match session(&st, &h) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let items = match st.service.list() {
        Ok(l) => l.items,
        Err(e) => return failure(e),
    };
    let live = pages::agents_live(&items, now_secs(), st.console.agent_timeout_secs);
    if q.is_ok_and(|Query(q)| q.partial.is_some()) {
        return live.into_response();
    }
    pages::layout(&ctx, "Agents", pages::live_region(live)).into_response()
}

fn tokens_page(st: &AppState, ctx: &Ctx, created: Option<pages::Created>) -> Response {
    let data = st
        .service
        .tokens()
        .and_then(|t| Ok((t, st.service.list()?.items)));
    match data {
        Ok((t, items)) => pages::layout(
            ctx,
            "Tokens",
            pages::tokens(ctx, &t, &items, created, now_secs()),
        )
        .into_response(),
        Err(e) => failure(e),
    }
}

async fn tokens(State(st): St, h: HeaderMap) -> Response {
    match session(&st, &h) {
        Ok(ctx) => tokens_page(&st, &ctx, None),
        Err(r) => r,
    }
}

async fn token_create(State(st): St, h: HeaderMap, body: Bytes) -> Response {
    let f = Form::parse(&body);
    let ctx = match post_ctx(&st, &h, &f, Role::Operator) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let kind = match f.get("kind") {
        Some("agent") => TokenKind::Agent,
        _ => TokenKind::Pairing,
    };
    let instance = f
        .get("instance")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    let ttl = f.get("ttl_secs").and_then(|v| v.trim().parse::<u64>().ok());
    let req = CreateTokenRequest {
        kind,
        recovery_instance_id: instance,
        ttl_secs: ttl,
    };
    match st.service.create_token(&ctx.caller.actor, req) {
        Ok(t) => tokens_page(
            &st,
            &ctx,
            Some(pages::Created {
                token: t.token,
                kind: t.kind,
                scope: t.recovery_instance_id,
            }),
        ),
        Err(e) => failure(e),
    }
}

async fn token_revoke(State(st): St, h: HeaderMap, body: Bytes) -> Response {
    let f = Form::parse(&body);
    let ctx = match post_ctx(&st, &h, &f, Role::Operator) {
        Ok(c) => c,
        Err(r) => return r,
    };
    match st
        .service
        .revoke_token(&ctx.caller.actor, f.get("id").unwrap_or(""))
    {
        Ok(_) => Redirect::to("/console/tokens").into_response(),
        Err(e) => failure(e),
    }
}

/// Launch or stop of the selected instances: without `confirm` a page names them and asks;
/// with it the service acts and the page shows each instance's result.
async fn actions(State(st): St, h: HeaderMap, body: Bytes) -> Response {
    let f = Form::parse(&body);
    let ctx = match post_ctx(&st, &h, &f, Role::Operator) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let action = match f.get("action") {
        Some(a @ ("launch" | "stop")) => a.to_string(),
        other => {
            return failure(ApiFailure::bad(
                "action",
                format!("action {:?}: launch or stop", other.unwrap_or("")),
            ))
        }
    };
    let ids = f.all("id");
    if ids.is_empty() {
        return failure(ApiFailure::bad("id", "select at least one instance"));
    }
    if let Some(bad) = ids.iter().find(|i| !valid_instance_id(i)) {
        return check_id(bad)
            .err()
            .unwrap_or_else(|| failure(ApiFailure::bad("id", "")));
    }
    if f.get("confirm") != Some("yes") {
        let named: Vec<(String, String)> = ids
            .iter()
            .map(|id| {
                let n = st
                    .service
                    .describe(id)
                    .map(|i| fmt::name(&i).to_string())
                    .unwrap_or_else(|_| "(not found)".into());
                (id.clone(), n)
            })
            .collect();
        return pages::layout(&ctx, "Confirm", pages::confirm(&ctx, &action, &named))
            .into_response();
    }
    let results: Vec<(String, bool, String)> = if action == "launch" {
        match st.service.launch(
            &ctx.caller.actor,
            LaunchRequest {
                recovery_instance_ids: ids,
                verify: None,
            },
        ) {
            Ok(r) => r
                .results
                .into_iter()
                .map(|x| {
                    let why = x.reason.unwrap_or_else(|| format!("job {}", r.job_id));
                    (x.recovery_instance_id, x.accepted, why)
                })
                .collect(),
            Err(e) => return failure(e),
        }
    } else {
        ids.into_iter()
            .map(|id| match st.service.stop(&ctx.caller.actor, &id) {
                Ok(_) => (id, true, "stop requested".to_string()),
                Err(e) => (id, false, e.to_string()),
            })
            .collect()
    };
    pages::layout(&ctx, "Result", pages::results(&action, &results)).into_response()
}
