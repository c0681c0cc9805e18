//! Scoped admin credentials over real HTTPS on 127.0.0.1:0 (in-process server, SQLite in a
//! temp dir): what each role may do, that refusals name the role needed and store nothing,
//! that a revoked credential is refused on its very next request, that the secret is shown
//! once and stored only as a hash, and that events name the credential that acted.

use std::path::Path;

use failback_api::*;
use failback_server::{start, RunningServer, ServerConfig, Settings};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

async fn server(dir: &Path) -> RunningServer {
    start(ServerConfig {
        data_dir: dir.to_path_buf(),
        database: None,
        ca_secret: None,
        listen: "127.0.0.1:0".parse().unwrap(),
        sans: vec![],
        admin_token: None,
        settings: Settings {
            heartbeat_secs: 1,
            agent_timeout_secs: 600,
            client_timeout_secs: 600,
            ..Settings::default()
        },
        limits: Default::default(),
    })
    .await
    .expect("service starts")
}

struct C {
    http: reqwest::Client,
    base: String,
    bootstrap: String,
}

impl C {
    fn new(s: &RunningServer) -> C {
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(s.ca_pem.as_bytes()).unwrap())
            .build()
            .unwrap();
        C {
            http,
            base: s.url(),
            bootstrap: s.admin_token.clone(),
        }
    }

    async fn send(&self, m: Method, path: &str, bearer: Option<&str>, body: Value) -> (u16, Value) {
        let mut rq = self.http.request(m, format!("{}{path}", self.base));
        if let Some(b) = bearer {
            rq = rq.bearer_auth(b);
        }
        if !body.is_null() {
            rq = rq
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let r = rq.send().await.expect("request");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Creates a credential with the bootstrap admin token; returns (id, secret).
    async fn credential(&self, role: &str, name: &str) -> (String, String) {
        let (st, v) = self
            .send(
                Method::POST,
                "/v1/admin/credentials",
                Some(&self.bootstrap),
                json!({"role": role, "name": name}),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        let r: CreateCredentialResponse = serde_json::from_value(v).unwrap();
        assert_eq!(r.credential.role.as_str(), role);
        (r.credential.id, r.secret)
    }

    /// Enrolls a fake agent with an agent token created by `who`; returns the instance id.
    async fn enroll(&self, who: &str) -> String {
        let (st, v) = self
            .send(
                Method::POST,
                "/v1/admin/tokens",
                Some(who),
                json!({"kind": "agent"}),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        let body = json!({
            "token": v["token"],
            "address": "127.0.0.1:1740",
            "disks": [{"id": "disk0", "size_bytes": 1u64 << 30}],
        });
        let (st, v) = self
            .send(Method::POST, "/v1/agent/enroll", None, body)
            .await;
        assert_eq!(st, 200, "{v}");
        v["recovery_instance_id"].as_str().unwrap().to_string()
    }

    async fn events(&self) -> Vec<Event> {
        let (st, v) = self
            .send(
                Method::GET,
                "/v1/admin/events?limit=10000",
                Some(&self.bootstrap),
                Value::Null,
            )
            .await;
        assert_eq!(st, 200, "{v}");
        serde_json::from_value::<EventList>(v).unwrap().items
    }
}

fn assert_forbidden(st: u16, v: &Value, role: &str, needs: &str) {
    assert_eq!(st, 403, "{v}");
    assert_eq!(v["error"], "FORBIDDEN", "{v}");
    let m = v["message"].as_str().unwrap();
    assert!(
        m.contains(&format!("has role {role}; this needs {needs}")),
        "{m}"
    );
}

/// A viewer reads everything but changes nothing; each refusal names the role needed and
/// stores nothing (no event, no token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_reads_but_every_change_is_refused_naming_the_role() {
    let d = tempfile::tempdir().unwrap();
    let s = server(d.path()).await;
    let c = C::new(&s);
    let boot = c.bootstrap.clone();
    let id = c.enroll(&boot).await;
    let (_, viewer) = c.credential("viewer", "dashboard").await;
    let v = Some(viewer.as_str());

    for path in [
        "/v1/admin/instances".to_string(),
        format!("/v1/admin/instances/{id}"),
        format!("/v1/admin/instances/{id}/config"),
        format!("/v1/admin/instances/{id}/logs"),
        "/v1/admin/events".to_string(),
    ] {
        let (st, body) = c.send(Method::GET, &path, v, Value::Null).await;
        assert_eq!(st, 200, "GET {path}: {body}");
    }
    let before = c.events().await.len();
    let refused = [
        (
            Method::POST,
            "/v1/admin/launch".to_string(),
            json!({"recovery_instance_ids": [id]}),
            "operator",
        ),
        (
            Method::POST,
            format!("/v1/admin/instances/{id}/stop"),
            Value::Null,
            "operator",
        ),
        (
            Method::POST,
            "/v1/admin/tokens".to_string(),
            json!({"kind": "pairing", "recovery_instance_id": id}),
            "operator",
        ),
        (
            Method::PUT,
            format!("/v1/admin/instances/{id}/hints"),
            json!({"source_hints": {}}),
            "operator",
        ),
        (
            Method::PUT,
            format!("/v1/admin/instances/{id}/config"),
            json!({"bandwidth_throttling_mbps": 5}),
            "admin",
        ),
        (
            Method::POST,
            "/v1/admin/credentials".to_string(),
            json!({"role": "admin", "name": "escalate"}),
            "admin",
        ),
        (
            Method::GET,
            "/v1/admin/credentials".to_string(),
            Value::Null,
            "admin",
        ),
    ];
    for (m, path, body, needs) in refused {
        let (st, body) = c.send(m.clone(), &path, v, body).await;
        assert_forbidden(st, &body, "viewer", needs);
        assert!(
            body["message"].as_str().unwrap().contains("'dashboard'"),
            "{m} {path}: {body}"
        );
    }
    assert_eq!(
        c.events().await.len(),
        before,
        "a refused request stored events"
    );
    s.shutdown().await;
}

/// An operator does a whole failback (the calls a mass failback makes: list, describe, pairing
/// token, launch, stop) and the events name it; configuration and credentials need admin,
/// which an admin credential has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_runs_a_failback_and_events_name_it_but_only_admin_manages() {
    let d = tempfile::tempdir().unwrap();
    let s = server(d.path()).await;
    let c = C::new(&s);
    let (op_id, op) = c.credential("operator", "ci-bot").await;
    let o = Some(op.as_str());
    let id = c.enroll(&op).await;

    let (st, v) = c
        .send(Method::GET, "/v1/admin/instances", o, Value::Null)
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["items"][0]["recovery_instance_id"], id.as_str());
    let (st, v) = c
        .send(
            Method::POST,
            "/v1/admin/tokens",
            o,
            json!({"kind": "pairing", "recovery_instance_id": id, "ttl_secs": 600}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let pair = json!({"token": v["token"], "inventory": {
        "disks": [{"path": "/dev/sda", "size_bytes": 1u64 << 30}]}});
    let (st, p) = c.send(Method::POST, "/v1/pair", None, pair).await;
    assert_eq!(st, 200, "{p}");
    let secret = p["client_secret"].as_str().unwrap();
    let (_, v) = c
        .send(
            Method::POST,
            "/v1/client/heartbeat",
            Some(secret),
            json!({"phase": "IDLE", "round": 1}),
        )
        .await;
    assert_eq!(v["failback_state"], "FAILBACK_READY_FOR_LAUNCH", "{v}");
    let (st, v) = c
        .send(
            Method::PUT,
            &format!("/v1/admin/instances/{id}/hints"),
            o,
            json!({"source_hints": {"hostname": "web1"}}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = c
        .send(
            Method::POST,
            "/v1/admin/launch",
            o,
            json!({"recovery_instance_ids": [id]}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["results"][0]["accepted"], true, "{v}");
    let (st, v) = c
        .send(
            Method::GET,
            &format!("/v1/admin/instances/{id}"),
            o,
            Value::Null,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert!(v["failback"]["launch_requested_at"].is_u64(), "{v}");
    let (st, v) = c
        .send(
            Method::POST,
            &format!("/v1/admin/instances/{id}/stop"),
            o,
            Value::Null,
        )
        .await;
    assert_eq!(st, 200, "{v}");

    // Who did what.
    let ev = c.events().await;
    let actor = |kind: &str| {
        ev.iter()
            .find(|e| e.kind == kind)
            .unwrap_or_else(|| panic!("no {kind} in {ev:?}"))
            .actor
            .clone()
    };
    let me = format!("credential:{op_id}:ci-bot");
    for kind in [
        "TOKEN_CREATED",
        "HINTS_UPDATED",
        "LAUNCH_REQUESTED",
        "STOP_REQUESTED",
    ] {
        assert_eq!(actor(kind).as_deref(), Some(me.as_str()), "{kind}");
    }
    assert_eq!(actor("AGENT_ENROLLED"), Some(format!("agent:{id}")));
    let client = p["client_id"].as_str().unwrap();
    assert_eq!(actor("PAIRED"), Some(format!("client:{client}")));
    assert_eq!(
        actor("CREDENTIAL_CREATED").as_deref(),
        Some("bootstrap-admin")
    );
    assert!(ev.iter().all(|e| e.actor.is_some()), "{ev:?}");

    // Configuration and credentials: operator refused, an admin credential allowed.
    let cfg = json!({"bandwidth_throttling_mbps": 50});
    let path = format!("/v1/admin/instances/{id}/config");
    let (st, v) = c.send(Method::PUT, &path, o, cfg.clone()).await;
    assert_forbidden(st, &v, "operator", "admin");
    let newcred = json!({"role": "viewer", "name": "x"});
    let (st, v) = c
        .send(Method::POST, "/v1/admin/credentials", o, newcred.clone())
        .await;
    assert_forbidden(st, &v, "operator", "admin");
    let (_, adm) = c.credential("admin", "alice").await;
    let a = Some(adm.as_str());
    let (st, v) = c.send(Method::PUT, &path, a, cfg).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["bandwidth_throttling_mbps"], 50);
    let (st, v) = c
        .send(Method::POST, "/v1/admin/credentials", a, newcred)
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        v["credential"]["created_by"]
            .as_str()
            .unwrap()
            .split(':')
            .nth(2),
        Some("alice")
    );
    s.shutdown().await;
}

/// Revocation refuses the very next request (401 naming the credential); the list keeps
/// the revoked credential with who revoked it; ids in the route are checked strictly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_credential_is_refused_on_its_next_request() {
    let d = tempfile::tempdir().unwrap();
    let s = server(d.path()).await;
    let c = C::new(&s);
    let (id, op) = c.credential("operator", "ci-bot").await;
    let (_, adm) = c.credential("admin", "alice").await;
    let list = "/v1/admin/instances";
    let (st, _) = c.send(Method::GET, list, Some(&op), Value::Null).await;
    assert_eq!(st, 200);

    let path = format!("/v1/admin/credentials/{id}");
    let (st, v) = c.send(Method::DELETE, &path, Some(&op), Value::Null).await;
    assert_forbidden(st, &v, "operator", "admin");
    let (st, v) = c.send(Method::DELETE, &path, Some(&adm), Value::Null).await;
    assert_eq!(st, 200, "{v}");
    assert!(v["revoked_at"].is_u64(), "{v}");
    let (st, v) = c.send(Method::GET, list, Some(&op), Value::Null).await;
    assert_eq!(st, 401, "{v}");
    assert_eq!(v["error"], "UNAUTHORIZED");
    let m = v["message"].as_str().unwrap();
    assert!(m.contains("'ci-bot'") && m.contains("revoked"), "{m}");
    let (st, v) = c.send(Method::DELETE, &path, Some(&adm), Value::Null).await;
    assert_eq!(
        (st, v["error"].as_str()),
        (409, Some("CREDENTIAL_REVOKED")),
        "{v}"
    );

    let (_, v) = c
        .send(
            Method::GET,
            "/v1/admin/credentials",
            Some(&adm),
            Value::Null,
        )
        .await;
    let l: CredentialList = serde_json::from_value(v).unwrap();
    let r = l.items.iter().find(|x| x.id == id).unwrap();
    assert!(r.revoked_at.is_some());
    assert!(
        r.revoked_by.as_deref().unwrap().ends_with(":alice"),
        "{r:?}"
    );
    // The name is free again once revoked; a second active one is refused.
    let (_, new) = c.credential("operator", "ci-bot").await;
    let (st, v) = c
        .send(
            Method::POST,
            "/v1/admin/credentials",
            Some(&adm),
            json!({"role": "viewer", "name": "ci-bot"}),
        )
        .await;
    assert_eq!(
        (st, v["error"].as_str()),
        (409, Some("CREDENTIAL_NAME_TAKEN")),
        "{v}"
    );
    let (st, _) = c.send(Method::GET, list, Some(&new), Value::Null).await;
    assert_eq!(st, 200);

    for bad in [
        "..%2F..%2Fca-key.pem",
        "%252e%252e%252fca-key.pem",
        "cred-0123456789ABCDEF",
        "cred-0123456789abcdef0",
        "cred-%30123456789abcde",
    ] {
        let (st, v) = c
            .send(
                Method::DELETE,
                &format!("/v1/admin/credentials/{bad}"),
                Some(&adm),
                Value::Null,
            )
            .await;
        assert_eq!(st, 400, "{bad}: {v}");
        assert_eq!(v["field"], "id", "{bad}: {v}");
    }
    let (st, v) = c
        .send(
            Method::DELETE,
            "/v1/admin/credentials/cred-0123456789abcdef",
            Some(&adm),
            Value::Null,
        )
        .await;
    assert_eq!(st, 404, "{v}");
    for (body, field) in [
        (json!({"role": "root", "name": "x"}), "role"),
        (json!({"role": "viewer", "name": "a b"}), "name"),
        (json!({"role": "viewer", "name": "x".repeat(65)}), "name"),
    ] {
        let (st, v) = c
            .send(Method::POST, "/v1/admin/credentials", Some(&adm), body)
            .await;
        assert_eq!((st, v["field"].as_str()), (400, Some(field)), "{v}");
    }
    let (st, _) = c
        .send(
            Method::GET,
            list,
            Some("fbcr_not-a-credential"),
            Value::Null,
        )
        .await;
    assert_eq!(st, 401);
    s.shutdown().await;
}

/// The secret is in the create answer only: the list never shows it, no file in the data
/// directory contains it (the database holds its SHA-256), and after a restart the
/// credential still works while a revoked one stays refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_is_shown_once_and_stored_only_as_a_hash() {
    let d = tempfile::tempdir().unwrap();
    let s = server(d.path()).await;
    let c = C::new(&s);
    let (_, secret) = c.credential("viewer", "dashboard").await;
    let (gone, old) = c.credential("viewer", "old").await;
    let (st, _) = c
        .send(
            Method::DELETE,
            &format!("/v1/admin/credentials/{gone}"),
            Some(&c.bootstrap),
            Value::Null,
        )
        .await;
    assert_eq!(st, 200);
    assert!(secret.starts_with("fbcr_") && secret.len() > 60, "{secret}");
    let (_, v) = c
        .send(
            Method::GET,
            "/v1/admin/credentials",
            Some(&c.bootstrap),
            Value::Null,
        )
        .await;
    assert_eq!(v["items"].as_array().unwrap().len(), 2, "{v}");
    assert!(!v.to_string().contains(&secret), "{v}");
    s.shutdown().await;

    // failback.db plus its WAL: whatever SQLite wrote.
    let mut bytes = Vec::new();
    for e in std::fs::read_dir(d.path()).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            bytes.extend(std::fs::read(&p).unwrap());
        }
    }
    let contains = |needle: &str| bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
    let hash = hex::encode(Sha256::digest(secret.as_bytes()));
    assert!(
        contains(&hash),
        "the hash is not stored: the test reads the wrong files"
    );
    assert!(!contains(&secret), "the secret is stored in clear");
    assert!(!contains(&secret["fbcr_".len()..]));

    let s = server(d.path()).await;
    let c = C::new(&s);
    let (st, _) = c
        .send(
            Method::GET,
            "/v1/admin/instances",
            Some(&secret),
            Value::Null,
        )
        .await;
    assert_eq!(st, 200);
    let (st, _) = c
        .send(Method::GET, "/v1/admin/instances", Some(&old), Value::Null)
        .await;
    assert_eq!(st, 401);
    s.shutdown().await;
}
