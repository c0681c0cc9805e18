//! The DR-service API over real HTTPS on 127.0.0.1:0 (in-process server, SQLite in a temp
//! dir): tokens, enrollment, pairing refusals, malformed bodies, restart persistence, launch
//! and stop validation. The agent and client here are plain HTTP calls; the end-to-end tests
//! with the real binaries are in tests/tests/service_e2e.rs. Every test runs twice: on SQLite
//! and on a real PostgreSQL (`--database postgres://...`, throwaway cluster).

use std::path::Path;

use failback_api::*;
use failback_server::{start, RunningServer, ServerConfig, Settings};
use serde_json::{json, Value};

/// The backend a test runs on: `None` is SQLite in the data dir, `Some(url)` a fresh
/// database on the shared throwaway PostgreSQL cluster.
type Db = Option<String>;

/// The CA sealing secret of the PostgreSQL runs (unused with SQLite).
static TEST_SECRET: std::sync::LazyLock<Option<std::sync::Arc<failback_server::sealed::SealKey>>> =
    std::sync::LazyLock::new(|| {
        Some(std::sync::Arc::new(
            failback_server::sealed::SealKey::parse(&"5e".repeat(32), "test").unwrap(),
        ))
    });

async fn server(dir: &Path, db: &Db) -> RunningServer {
    server_with(dir, db, CompressionMode::Auto).await
}

async fn server_with(dir: &Path, db: &Db, compression: CompressionMode) -> RunningServer {
    start(ServerConfig {
        data_dir: dir.to_path_buf(),
        database: db.clone(),
        ca_secret: TEST_SECRET.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        sans: vec!["10.0.2.2".into()],
        admin_token: None,
        settings: Settings {
            heartbeat_secs: 1,
            agent_timeout_secs: 600,
            client_timeout_secs: 600,
            compression,
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
    admin: String,
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
            admin: s.admin_token.clone(),
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        bearer: Option<&str>,
        body: Option<String>,
    ) -> (u16, Value) {
        let mut rq = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = bearer {
            rq = rq.bearer_auth(b);
        }
        if let Some(b) = body {
            rq = rq.header("content-type", "application/json").body(b);
        }
        let r = rq.send().await.expect("request");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn admin_get(&self, path: &str) -> (u16, Value) {
        self.send(reqwest::Method::GET, path, Some(&self.admin.clone()), None)
            .await
    }

    async fn admin_post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(
            reqwest::Method::POST,
            path,
            Some(&self.admin.clone()),
            Some(body.to_string()),
        )
        .await
    }

    async fn token(&self, kind: &str, instance: Option<&str>, ttl: Option<u64>) -> String {
        let mut b = json!({ "kind": kind });
        if let Some(i) = instance {
            b["recovery_instance_id"] = json!(i);
        }
        if let Some(t) = ttl {
            b["ttl_secs"] = json!(t);
        }
        let (st, v) = self.admin_post("/v1/admin/tokens", b).await;
        assert_eq!(st, 200, "{v}");
        v["token"].as_str().unwrap().to_string()
    }

    /// Enrolls a fake agent (HTTP only) and returns (instance id, agent secret).
    async fn enroll(&self, vmware_uuid: Option<&str>, size: u64) -> (String, String) {
        let t = self.token("agent", None, None).await;
        let mut body = json!({
            "token": t,
            "address": "127.0.0.1:1740",
            "disks": [{"id": "disk0", "size_bytes": size}],
        });
        if let Some(u) = vmware_uuid {
            body["source_hints"] = json!({ "vmware_uuid": u });
        }
        let (st, v) = self
            .send(
                reqwest::Method::POST,
                "/v1/agent/enroll",
                None,
                Some(body.to_string()),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        let r: AgentEnrollResponse = serde_json::from_value(v).unwrap();
        assert!(r.agent_cert_pem.contains("BEGIN CERTIFICATE"));
        (r.recovery_instance_id, r.agent_secret)
    }

    async fn pair(&self, token: &str, uuid: Option<&str>, instance: Option<&str>) -> (u16, Value) {
        let mut body = json!({
            "token": token,
            "inventory": {
                "smbios_uuid": uuid,
                "disks": [{"path": "/dev/sda", "size_bytes": 1u64 << 30}],
            },
        });
        if let Some(i) = instance {
            body["recovery_instance_id"] = json!(i);
        }
        self.send(
            reqwest::Method::POST,
            "/v1/pair",
            None,
            Some(body.to_string()),
        )
        .await
    }

    async fn counts(&self) -> (usize, usize) {
        let (_, l) = self.admin_get("/v1/admin/instances").await;
        let (_, e) = self.admin_get("/v1/admin/events?limit=10000").await;
        (
            l["items"].as_array().unwrap().len(),
            e["items"].as_array().unwrap().len(),
        )
    }
}

async fn pairing_by_scope_and_by_smbios_uuid_then_reuse_refused(db: Db) {
    let d = tempfile::tempdir().unwrap();
    let s = server(d.path(), &db).await;
    let c = C::new(&s);
    let uuid = "4221AAAA-BBBB-CCCC-DDDD-EEEEFFFF0001";
    let (a, _) = c.enroll(Some(uuid), 1 << 30).await;

    // Scoped token.
    let t = c.token("pairing", Some(&a), None).await;
    let (st, v) = c.pair(&t, None, None).await;
    assert_eq!(st, 200, "{v}");
    let p: PairResponse = serde_json::from_value(v).unwrap();
    assert_eq!(p.recovery_instance_id, a);
    assert_eq!(p.matched_by, MatchReason::TokenScope);
    assert_eq!(
        p.device_mapping,
        vec![DeviceMapping {
            remote: "disk0".into(),
            local: "/dev/sda".into()
        }]
    );
    assert!(p.client_cert_pem.contains("BEGIN CERTIFICATE"));
    assert!(p.client_key_pem.contains("PRIVATE KEY"));
    assert_eq!(p.compression, CompressionMode::Auto, "the default setting");

    // The same token again: refused, and nothing changes.
    let before = c.counts().await;
    let (st, v) = c.pair(&t, None, None).await;
    assert_eq!(st, 401, "{v}");
    assert_eq!(v["error"], "TOKEN_USED", "{v}");
    assert_eq!(c.counts().await, before);

    // Auto-match: SMBIOS UUID (case-insensitive) equals the source's VMware BIOS UUID.
    let t = c.token("pairing", None, None).await;
    let (st, v) = c.pair(&t, Some(&uuid.to_lowercase()), None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["matched_by"], "SMBIOS_UUID");
    assert_eq!(v["failback_to_original_server"], true);
    assert_eq!(v["recovery_instance_id"], a.as_str());

    // The describe shows the pairing state with AWS names.
    let (_, i) = c.admin_get(&format!("/v1/admin/instances/{a}")).await;
    assert_eq!(i["failback"]["state"], "FAILBACK_IN_PROGRESS");
    assert_eq!(i["failback"]["replication_state"], "INITIATING");
    s.shutdown().await;
}

async fn expired_wrong_kind_and_other_instance_tokens_refused(db: Db) {
    let d = tempfile::tempdir().unwrap();
    let s = server(d.path(), &db).await;
    let c = C::new(&s);
    let (a, _) = c.enroll(None, 1 << 30).await;
    let (b, _) = c.enroll(None, 1 << 30).await;
    assert_ne!(a, b);

    // Scoped to A, presented for B.
    let t = c.token("pairing", Some(&a), None).await;
    let (st, v) = c.pair(&t, None, Some(&b)).await;
    assert_eq!(st, 403, "{v}");
    assert_eq!(v["error"], "TOKEN_SCOPE");
    assert!(v["message"].as_str().unwrap().contains(&a), "{v}");
    // ...and it is not spent by the refusal.
    let (st, v) = c.pair(&t, None, Some(&a)).await;
    assert_eq!(st, 200, "{v}");

    // An agent token is not a pairing token.
    let at = c.token("agent", None, None).await;
    let (st, v) = c.pair(&at, None, Some(&a)).await;
    assert_eq!(st, 401, "{v}");
    assert_eq!(v["error"], "TOKEN_KIND");

    // Unknown token.
    let (st, v) = c.pair("fbp_nonsense", None, Some(&a)).await;
    assert_eq!((st, v["error"].as_str()), (401, Some("TOKEN_INVALID")));

    // Expired: 1 s lifetime, used well after.
    let t = c.token("pairing", Some(&b), Some(1)).await;
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let (st, v) = c.pair(&t, None, None).await;
    assert_eq!(st, 401, "{v}");
    assert_eq!(v["error"], "TOKEN_EXPIRED");
    let (_, i) = c.admin_get(&format!("/v1/admin/instances/{b}")).await;
    assert_eq!(i["failback"]["state"], "FAILBACK_NOT_STARTED");

    // No instance matches this SMBIOS UUID.
    let t = c.token("pairing", None, None).await;
    let (st, v) = c.pair(&t, Some("no-such-uuid"), None).await;
    assert_eq!((st, v["error"].as_str()), (409, Some("NO_MATCH")), "{v}");
    s.shutdown().await;
}

async fn malformed_requests_name_the_field_and_store_nothing(db: Db) {
    let d = tempfile::tempdir().unwrap();
    let s = server(d.path(), &db).await;
    let c = C::new(&s);
    let (a, _) = c.enroll(None, 1 << 30).await;
    let t = c.token("pairing", Some(&a), None).await;
    let before = c.counts().await;
    let admin = Some(c.admin.clone());
    let bad_size = format!(
        r#"{{"token":"{t}","inventory":{{"disks":[{{"path":"/dev/sda","size_bytes":"big"}}]}}}}"#
    );
    let bad_map = format!(
        r#"{{"token":"{t}","inventory":{{"disks":[{{"path":"/dev/sda","size_bytes":1073741824}}]}},"device_mapping":[{{"remote":"disk0","local":"/dev/sdz"}}]}}"#
    );
    let cases: Vec<(reqwest::Method, String, Option<String>, &str, &str)> = vec![
        (
            reqwest::Method::POST,
            "/v1/pair".into(),
            None,
            r#"{"token":"x","inventory":{},"bogus":1}"#,
            "bogus",
        ),
        (
            reqwest::Method::POST,
            "/v1/pair".into(),
            None,
            r#"{"inventory":{}}"#,
            "token",
        ),
        (
            reqwest::Method::POST,
            "/v1/pair".into(),
            None,
            &bad_size,
            "inventory.disks[0].size_bytes",
        ),
        (
            reqwest::Method::POST,
            "/v1/pair".into(),
            None,
            &bad_map,
            "device_mapping",
        ),
        (
            reqwest::Method::POST,
            "/v1/admin/tokens".into(),
            admin.clone(),
            r#"{"kind":"pairing","ttl_secs":0}"#,
            "ttl_secs",
        ),
        (
            reqwest::Method::POST,
            "/v1/admin/tokens".into(),
            admin.clone(),
            r#"{"kind":"wizard"}"#,
            "kind",
        ),
        (
            reqwest::Method::POST,
            "/v1/admin/launch".into(),
            admin.clone(),
            r#"{"recovery_instance_ids":[]}"#,
            "recovery_instance_ids",
        ),
        (
            reqwest::Method::POST,
            "/v1/admin/launch".into(),
            admin.clone(),
            r#"{"recovery_instance_ids":["i-0123456789abcdef","nope"]}"#,
            "recovery_instance_ids[1]",
        ),
        (
            reqwest::Method::PUT,
            format!("/v1/admin/instances/{a}/config"),
            admin.clone(),
            r#"{"bandwidth_throttling_mbps":-5}"#,
            "bandwidth_throttling_mbps",
        ),
        (
            reqwest::Method::POST,
            "/v1/agent/enroll".into(),
            None,
            r#"{"token":"t","address":"no-port","disks":[{"id":"d","size_bytes":1}]}"#,
            "address",
        ),
        (
            reqwest::Method::POST,
            "/v1/agent/enroll".into(),
            None,
            r#"{"token":"t","address":"1.2.3.4:5","disks":[{"id":"d","size_bytes":0}]}"#,
            "disks[0].size_bytes",
        ),
    ];
    for (m, path, bearer, body, field) in cases {
        let (st, v) = c
            .send(m.clone(), &path, bearer.as_deref(), Some(body.to_string()))
            .await;
        assert!(
            (400..500).contains(&st),
            "{m} {path} {body}: status {st} {v}"
        );
        assert_eq!(v["field"], field, "{m} {path} {body}: {v}");
        assert!(
            v["message"].as_str().unwrap().contains(field),
            "message must name {field}: {v}"
        );
    }
    assert_eq!(
        c.counts().await,
        before,
        "a refused request stored something"
    );
    // The pairing token survived the malformed attempts.
    let (st, v) = c.pair(&t, None, None).await;
    assert_eq!(st, 200, "{v}");
    // Admin routes need the admin token.
    let (st, _) = c
        .send(
            reqwest::Method::GET,
            "/v1/admin/instances",
            Some("wrong"),
            None,
        )
        .await;
    assert_eq!(st, 401);
    let (st, _) = c
        .send(reqwest::Method::GET, "/v1/admin/instances", None, None)
        .await;
    assert_eq!(st, 401);
    s.shutdown().await;
}

async fn state_ca_and_admin_token_survive_restart(db: Db) {
    let d = tempfile::tempdir().unwrap();
    let s = server(d.path(), &db).await;
    let c = C::new(&s);
    let (a, agent_secret) = c.enroll(None, 1 << 30).await;
    let t = c.token("pairing", Some(&a), None).await;
    let (st, p) = c.pair(&t, None, None).await;
    assert_eq!(st, 200);
    let secret = p["client_secret"].as_str().unwrap().to_string();
    let report = json!({"phase": "IDLE", "round": 1, "last_round_differing_bytes": 5});
    let (st, v) = c
        .send(
            reqwest::Method::POST,
            "/v1/client/heartbeat",
            Some(&secret),
            Some(report.to_string()),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["failback_state"], "FAILBACK_READY_FOR_LAUNCH");
    // Per-disk wire figures are checked: an unknown compression mode or a rate beyond any
    // link is refused, naming the field.
    let disk = json!({"remote_id": "vol-1", "local_path": "/dev/sda", "total_bytes": 10,
        "replicated_bytes": 5, "rescanned_bytes": 5, "backlog_bytes": 0, "wire_bytes": 9});
    for (k, bad) in [
        ("compression", json!("gzip")),
        ("link_bytes_per_sec", json!(1u64 << 50)),
    ] {
        let mut d = disk.clone();
        d[k] = bad;
        let r = json!({"phase": "IDLE", "round": 1, "disks": [d]});
        let (st, v) = c
            .send(
                reqwest::Method::POST,
                "/v1/client/heartbeat",
                Some(&secret),
                Some(r.to_string()),
            )
            .await;
        assert_eq!(st, 400, "{k}: {v}");
        assert!(v.to_string().contains(&format!("disks[0].{k}")), "{v}");
    }
    let (ca1, adm1) = (s.ca_pem.clone(), s.admin_token.clone());
    s.shutdown().await;

    let s = server(d.path(), &db).await;
    assert_eq!(s.ca_pem, ca1, "CA must be kept across restarts");
    assert_eq!(s.admin_token, adm1);
    let c = C::new(&s);
    let (_, i) = c.admin_get(&format!("/v1/admin/instances/{a}")).await;
    assert_eq!(i["failback"]["state"], "FAILBACK_READY_FOR_LAUNCH", "{i}");
    // Client and agent secrets still work; the used token is still used.
    let (st, v) = c
        .send(
            reqwest::Method::POST,
            "/v1/client/heartbeat",
            Some(&secret),
            Some(report.to_string()),
        )
        .await;
    assert_eq!((st, v["command"].as_str()), (200, Some("CONTINUE")), "{v}");
    let (st, v) = c
        .send(
            reqwest::Method::POST,
            "/v1/agent/heartbeat",
            Some(&agent_secret),
            Some(json!({"address": "127.0.0.1:1741"}).to_string()),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, _) = c.pair(&t, None, None).await;
    assert_eq!(st, 401);
    s.shutdown().await;
}

async fn launch_stop_and_config_drive_the_client_commands(db: Db) {
    let d = tempfile::tempdir().unwrap();
    let s = server(d.path(), &db).await;
    let c = C::new(&s);
    let (a, _) = c.enroll(None, 1 << 30).await;
    let (b, _) = c.enroll(None, 1 << 30).await;
    let t = c.token("pairing", Some(&a), None).await;
    let (_, p) = c.pair(&t, None, None).await;
    let secret = p["client_secret"].as_str().unwrap().to_string();
    let hb = |phase: &str| json!({"phase": phase, "round": 1}).to_string();

    // Not ready yet: launch refused per instance, unknown id reported.
    let (st, v) = c
        .admin_post(
            "/v1/admin/launch",
            json!({"recovery_instance_ids": [a, b, "i-00000000000000000"]}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let r: LaunchResponse = serde_json::from_value(v).unwrap();
    assert!(r.results.iter().all(|x| !x.accepted), "{r:?}");

    // Bandwidth limit reaches the client with the next heartbeat.
    let (st, _) = c
        .send(
            reqwest::Method::PUT,
            &format!("/v1/admin/instances/{a}/config"),
            Some(&c.admin.clone()),
            Some(json!({"bandwidth_throttling_mbps": 100}).to_string()),
        )
        .await;
    assert_eq!(st, 200);
    let (_, v) = c
        .send(
            reqwest::Method::POST,
            "/v1/client/heartbeat",
            Some(&secret),
            Some(hb("IDLE")),
        )
        .await;
    assert_eq!(v["failback_state"], "FAILBACK_READY_FOR_LAUNCH");
    assert_eq!(v["bandwidth_limit_mbps"], 100);
    assert_eq!(v["command"], "CONTINUE");

    let (_, v) = c
        .admin_post("/v1/admin/launch", json!({"recovery_instance_ids": [a]}))
        .await;
    assert_eq!(v["results"][0]["accepted"], true, "{v}");
    let (_, v) = c
        .send(
            reqwest::Method::POST,
            "/v1/client/heartbeat",
            Some(&secret),
            Some(hb("IDLE")),
        )
        .await;
    assert_eq!(v["command"], "LAUNCH");

    // Completion with a digest mismatch is an error, not COMPLETED.
    let bad = json!({"phase": "COMPLETED", "round": 2, "digests": [
        {"remote_id": "disk0", "local_path": "/dev/sda", "local_digest": "aa", "agent_digest": "bb"}]});
    let (_, v) = c
        .send(
            reqwest::Method::POST,
            "/v1/client/heartbeat",
            Some(&secret),
            Some(bad.to_string()),
        )
        .await;
    assert_eq!(v["failback_state"], "FAILBACK_ERROR", "{v}");

    // Stop: back to NOT_STARTED, the client is told to stop.
    let (st, v) = c
        .admin_post(&format!("/v1/admin/instances/{a}/stop"), json!(null))
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["failback"]["state"], "FAILBACK_NOT_STARTED");
    let (_, v) = c
        .send(
            reqwest::Method::POST,
            "/v1/client/heartbeat",
            Some(&secret),
            Some(hb("IDLE")),
        )
        .await;
    assert_eq!(v["command"], "STOP");
    let (_, e) = c.admin_get(&format!("/v1/admin/events?instance={a}")).await;
    let kinds: Vec<&str> = e["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["kind"].as_str().unwrap())
        .collect();
    for k in [
        "AGENT_ENROLLED",
        "PAIRED",
        "FAILBACK_STATE",
        "LAUNCH_REQUESTED",
        "STOP_REQUESTED",
        "CONFIG_UPDATED",
    ] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }
    s.shutdown().await;
}

/// An appliance that boots again on a failed-back machine presents its used token: for a
/// COMPLETED failback the service answers "completed" with the digests and the restored
/// disk's device on this boot (found by the serial it had at pairing, although a USB stick
/// now holds its old name), as an informational event; for a failback that did not complete
/// the used token is still refused (TOKEN_USED) and nothing is recorded.
async fn used_token_of_a_completed_failback_answers_completed(db: Db) {
    let d = tempfile::tempdir().unwrap();
    let s = server(d.path(), &db).await;
    let c = C::new(&s);
    let uuid = "4221AAAA-BBBB-CCCC-DDDD-EEEEFFFF0002";
    let (a, _) = c.enroll(Some(uuid), 1 << 30).await;
    let (b, _) = c.enroll(None, 1 << 30).await;
    let pair = |token: &str, disks: Value| {
        let body = json!({
            "token": token,
            "inventory": {"smbios_uuid": uuid, "disks": disks},
        });
        c.send(
            reqwest::Method::POST,
            "/v1/pair",
            None,
            Some(body.to_string()),
        )
    };
    let first = json!([{"path": "/dev/sda", "size_bytes": 1u64 << 30, "serial": "6000c29a"}]);
    let again = json!([
        {"path": "/dev/sda", "size_bytes": 8u64 << 30, "serial": "usb-stick-1"},
        {"path": "/dev/sdb", "size_bytes": 1u64 << 30, "serial": "6000c29a"},
    ]);
    let heartbeat = |secret: String, body: Value| {
        let c = &c;
        async move {
            let (st, v) = c
                .send(
                    reqwest::Method::POST,
                    "/v1/client/heartbeat",
                    Some(&secret),
                    Some(body.to_string()),
                )
                .await;
            assert_eq!(st, 200, "{v}");
            v
        }
    };

    // A: paired, launched, completed with equal digests.
    let ta = c.token("pairing", Some(&a), None).await;
    let (st, p) = pair(&ta, first.clone()).await;
    assert_eq!(st, 200, "{p}");
    assert_eq!(p["device_mapping"][0]["local"], "/dev/sda", "{p}");
    let secret = p["client_secret"].as_str().unwrap().to_string();
    let v = heartbeat(secret.clone(), json!({"phase": "IDLE", "round": 1})).await;
    assert_eq!(v["failback_state"], "FAILBACK_READY_FOR_LAUNCH", "{v}");
    let (_, v) = c
        .admin_post("/v1/admin/launch", json!({"recovery_instance_ids": [a]}))
        .await;
    assert_eq!(v["results"][0]["accepted"], true, "{v}");
    let digest = "ab".repeat(32);
    let done = json!({"phase": "COMPLETED", "round": 2, "digests": [{"remote_id": "disk0",
        "local_path": "/dev/sda", "local_digest": digest, "agent_digest": digest}]});
    let v = heartbeat(secret, done).await;
    assert_eq!(v["failback_state"], "FAILBACK_COMPLETED", "{v}");

    // The appliance boots again with the same token (a USB stick is /dev/sda now).
    let (st, v) = pair(&ta, again.clone()).await;
    assert_eq!(st, 200, "{v}");
    let answer: PairAnswer = serde_json::from_value(v.clone()).unwrap();
    let PairAnswer::Completed(PairCompleted {
        failback_completed: done,
    }) = answer
    else {
        panic!("not a completed answer: {v}");
    };
    assert_eq!(done.recovery_instance_id, a);
    assert!(done.completed_at.is_some(), "{v}");
    assert_eq!(
        done.disks,
        vec![CompletedDisk {
            remote_id: "disk0".into(),
            local_path: "/dev/sdb".into(),
            size_bytes: 1 << 30,
            digest: digest.clone(),
        }]
    );
    assert!(done.block_size > 0, "{v}");
    let (_, i) = c.admin_get(&format!("/v1/admin/instances/{a}")).await;
    assert_eq!(i["failback"]["state"], "FAILBACK_COMPLETED", "{i}");
    let (_, e) = c
        .admin_get(&format!("/v1/admin/events?instance={a}&limit=10000"))
        .await;
    let kinds: Vec<&str> = e["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"APPLIANCE_BOOTED_AFTER_COMPLETION"),
        "{kinds:?}"
    );
    assert!(!kinds.contains(&"CLIENT_BOOT_FAILED"), "{kinds:?}");

    // B: paired but not completed; its used token is refused as before, nothing recorded.
    let tb = c.token("pairing", Some(&b), None).await;
    let (st, v) = pair(&tb, first).await;
    assert_eq!(st, 200, "{v}");
    let before = c.counts().await;
    let (st, v) = pair(&tb, again).await;
    assert_eq!(st, 401, "{v}");
    assert_eq!(v["error"], "TOKEN_USED", "{v}");
    assert_eq!(c.counts().await, before);
    s.shutdown().await;
}

/// A lost connection to the recovery agent is one event per outage (the client reports it in
/// every heartbeat while it retries), and so is the reconnection.
async fn agent_outage_is_one_event_and_reconnection_another(db: Db) {
    let d = tempfile::tempdir().unwrap();
    let s = server(d.path(), &db).await;
    let c = C::new(&s);
    let (a, _) = c.enroll(None, 1 << 30).await;
    let t = c.token("pairing", Some(&a), None).await;
    let (_, p) = c.pair(&t, None, None).await;
    let secret = p["client_secret"].as_str().unwrap().to_string();
    let beat = |body: serde_json::Value| {
        let (c, secret) = (&c, secret.clone());
        async move {
            let (st, v) = c
                .send(
                    reqwest::Method::POST,
                    "/v1/client/heartbeat",
                    Some(&secret),
                    Some(body.to_string()),
                )
                .await;
            assert_eq!(st, 200, "{v}");
        }
    };
    beat(json!({"phase": "IDLE", "round": 1})).await;
    for _ in 0..3 {
        beat(json!({"phase": "AGENT_UNREACHABLE", "round": 1,
            "error": "agent 10.0.0.5:1500: connection reset by peer"}))
        .await;
    }
    let (_, v) = c.admin_get(&format!("/v1/admin/instances/{a}")).await;
    assert_eq!(v["failback"]["replication_state"], "DISCONNECTED", "{v}");
    beat(json!({"phase": "SYNCING", "round": 2})).await;
    beat(json!({"phase": "IDLE", "round": 2})).await;
    let (_, e) = c.admin_get(&format!("/v1/admin/events?instance={a}")).await;
    let items = e["items"].as_array().unwrap();
    let of = |k: &str| -> Vec<String> {
        items
            .iter()
            .filter(|x| x["kind"] == k)
            .map(|x| x["message"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        of("AGENT_DISCONNECTED"),
        ["agent 10.0.0.5:1500: connection reset by peer"],
        "{items:?}"
    );
    assert_eq!(
        of("AGENT_RECONNECTED"),
        ["replication resumed (round 2)"],
        "{items:?}"
    );
    s.shutdown().await;
}

async fn missed_agent_heartbeats_raise_agent_not_seen(db: Db) {
    let d = tempfile::tempdir().unwrap();
    let s = start(ServerConfig {
        data_dir: d.path().to_path_buf(),
        database: db.clone(),
        ca_secret: TEST_SECRET.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        sans: vec![],
        admin_token: Some("adm".into()),
        settings: Settings {
            heartbeat_secs: 1,
            agent_timeout_secs: 2,
            client_timeout_secs: 600,
            ..Settings::default()
        },
        limits: Default::default(),
    })
    .await
    .unwrap();
    let c = C::new(&s);
    let (a, agent_secret) = c.enroll(None, 1 << 30).await;
    let t = c.token("pairing", Some(&a), None).await;
    let (_, p) = c.pair(&t, None, None).await;
    let secret = p["client_secret"].as_str().unwrap().to_string();
    let idle = json!({"phase": "IDLE", "round": 1}).to_string();
    // Poll (no timing assertion): the agent stays silent, the monitor flags it.
    let mut seen = Value::Null;
    for _ in 0..120 {
        let _ = c
            .send(
                reqwest::Method::POST,
                "/v1/client/heartbeat",
                Some(&secret),
                Some(idle.clone()),
            )
            .await;
        let (_, i) = c.admin_get(&format!("/v1/admin/instances/{a}")).await;
        seen = i["failback"].clone();
        if seen["errors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e == "AGENT_NOT_SEEN")
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(
        seen["errors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e == "AGENT_NOT_SEEN"),
        "{seen}"
    );
    assert_eq!(seen["replication_state"], "DISCONNECTED");
    assert_eq!(seen["state"], "FAILBACK_NOT_READY_FOR_LAUNCH");
    // The agent is back: error cleared; the next client report makes it CONTINUOUS again.
    let (st, _) = c
        .send(
            reqwest::Method::POST,
            "/v1/agent/heartbeat",
            Some(&agent_secret),
            Some(json!({"address": "127.0.0.1:1740"}).to_string()),
        )
        .await;
    assert_eq!(st, 200);
    let (_, v) = c
        .send(
            reqwest::Method::POST,
            "/v1/client/heartbeat",
            Some(&secret),
            Some(idle.clone()),
        )
        .await;
    assert_eq!(v["replication_state"], "CONTINUOUS", "{v}");
    assert_eq!(v["failback_state"], "FAILBACK_READY_FOR_LAUNCH", "{v}");
    s.shutdown().await;
}

async fn boot_reports_are_filed_by_token_or_uuid_limited_and_validated(db: Db) {
    let d = tempfile::tempdir().unwrap();
    let s = server(d.path(), &db).await;
    let c = C::new(&s);
    let uuid = "4221AAAA-BBBB-CCCC-DDDD-EEEEFFFF0042";
    let (a, _) = c.enroll(Some(uuid), 1 << 30).await;
    let post = |body: String| {
        c.send(
            reqwest::Method::POST,
            "/v1/client/boot-report",
            None,
            Some(body),
        )
    };
    let cr = &c;
    let events = |inst: Option<String>| {
        let path = match inst {
            Some(i) => format!("/v1/admin/events?instance={i}&limit=10000"),
            None => "/v1/admin/events?limit=10000".into(),
        };
        async move {
            let (st, v) = cr.admin_get(&path).await;
            assert_eq!(st, 200, "{v}");
            v["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["kind"] == "CLIENT_BOOT_FAILED")
                .cloned()
                .collect::<Vec<Value>>()
        }
    };

    // A used pairing token (the usual failure: a VM booted twice) is still known: the report
    // lands on its instance, with the console log stored next to the uploaded logs.
    let t = c.token("pairing", Some(&a), None).await;
    assert_eq!(c.pair(&t, None, None).await.0, 200);
    let (st, v) = post(
        json!({
            "token": t,
            "stage": "pair",
            "message": "DR service refused: pairing token already used (TOKEN_USED)\nforged line",
            "log": "failback: FAILBACK_SEED_FOUND on /dev/sr1\nfailback: pairing with ...\n",
        })
        .to_string(),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let r: BootReportResponse = serde_json::from_value(v).unwrap();
    assert_eq!(r.recovery_instance_id.as_deref(), Some(a.as_str()));
    let stored = r.stored_as.expect("log stored");
    let ev = events(Some(a.clone())).await;
    assert_eq!(ev.len(), 1, "{ev:?}");
    let msg = ev[0]["message"].as_str().unwrap();
    assert!(
        msg.starts_with(
            "pair: DR service refused: pairing token already used (TOKEN_USED) forged line"
        ),
        "{msg}"
    );
    assert!(
        msg.contains("matched by pairing token") && msg.contains(&stored),
        "{msg}"
    );
    let (st, logs) = c.admin_get(&format!("/v1/admin/instances/{a}/logs")).await;
    assert_eq!(st, 200);
    assert!(
        logs["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["name"] == stored.as_str()),
        "{logs}"
    );
    let (st, text) = c
        .admin_get(&format!("/v1/admin/instances/{a}/logs/{stored}"))
        .await;
    assert_eq!(st, 200);
    assert!(text.to_string().contains("FAILBACK_SEED_FOUND"), "{text}");

    // No token, but the BIOS UUID of a known source server.
    let (st, v) = post(
        json!({"smbios_uuid": uuid.to_lowercase(), "stage": "setup", "message": "no disk"})
            .to_string(),
    )
    .await;
    assert_eq!(
        (st, v["recovery_instance_id"].as_str()),
        (200, Some(a.as_str())),
        "{v}"
    );

    // A token this service never issued: kept, but unattributed, marked, and without its log.
    let (st, v) = post(
        json!({"token": "fbp_typo", "stage": "pair", "message": "token not recognised", "log": "x"})
            .to_string(),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["recovery_instance_id"], Value::Null);
    assert_eq!(v["stored_as"], Value::Null);
    let all = events(None).await;
    let anon = all
        .iter()
        .find(|e| e["recovery_instance_id"].is_null())
        .expect("unattributed event");
    assert!(
        anon["message"]
            .as_str()
            .unwrap()
            .contains("unverified report"),
        "{anon}"
    );

    // Malformed or oversized: refused naming the field, nothing stored.
    let before = c.counts().await;
    for (body, field) in [
        (json!({"stage": "Pair Stage", "message": "m"}), "stage"),
        (json!({"stage": "pair", "message": " "}), "message"),
        (
            json!({"stage": "pair", "message": "m".repeat(BOOT_REPORT_MAX_MESSAGE + 1)}),
            "message",
        ),
        (
            json!({"stage": "pair", "message": "m", "log": "l".repeat(BOOT_REPORT_MAX_LOG + 1)}),
            "log",
        ),
        (
            json!({"stage": "pair", "message": "m", "extra": 1}),
            "extra",
        ),
    ] {
        let (st, v) = post(body.to_string()).await;
        assert_eq!(st, 400, "{v}");
        assert!(
            v["message"].as_str().unwrap().contains(field),
            "{field}: {v}"
        );
    }
    let huge = json!({"stage": "pair", "message": "m", "log": "l".repeat(BOOT_REPORT_MAX_BODY)});
    assert_eq!(post(huge.to_string()).await.0, 413);
    assert_eq!(c.counts().await, before);

    // Rate limit per key: 13 quick reports span at most two one-minute windows, so one
    // window sees more than the 6 allowed.
    let mut limited = false;
    for _ in 0..13 {
        let (st, v) =
            post(json!({"token": "fbp_loop", "stage": "pair", "message": "m"}).to_string()).await;
        if st == 429 {
            assert_eq!(v["error"], "RATE_LIMITED", "{v}");
            limited = true;
            break;
        }
        assert_eq!(st, 200, "{v}");
    }
    assert!(limited, "a looping client was never rate-limited");
    s.shutdown().await;
}

/// Client checkpoints (resume points after an appliance reboot): stored and fetched with the
/// client secret, cleared by an empty list; a malformed one is refused naming the field and
/// stores nothing; an unknown secret is refused.
async fn client_checkpoints_are_stored_fetched_and_checked(db: Db) {
    let d = tempfile::tempdir().unwrap();
    let s = server(d.path(), &db).await;
    let c = C::new(&s);
    let (a, _) = c.enroll(None, 1 << 30).await;
    let t = c.token("pairing", Some(&a), None).await;
    let (st, v) = c.pair(&t, None, None).await;
    assert_eq!(st, 200, "{v}");
    let secret = v["client_secret"].as_str().unwrap().to_string();
    let path = "/v1/client/checkpoint";
    let get = |bearer: String| {
        let c = &c;
        async move {
            c.send(reqwest::Method::GET, path, Some(&bearer), None)
                .await
        }
    };
    let post = |bearer: String, body: Value| {
        let c = &c;
        async move {
            c.send(
                reqwest::Method::POST,
                path,
                Some(&bearer),
                Some(body.to_string()),
            )
            .await
        }
    };
    let (st, v) = get(secret.clone()).await;
    assert_eq!((st, &v), (200, &json!({"disks": []})), "nothing stored yet");

    let disk = json!({
        "remote": "disk0", "disk_size": 1u64 << 30, "block_size": 65536,
        "local": "/dev/sda", "local_size": 1u64 << 30, "local_serial": "S1",
        "offset": 512u64 << 20, "cut": {"session": 7, "cut": 3},
        "window_bytes": 16u64 << 20, "digest": "ab".repeat(32),
    });
    let body = json!({ "disks": [disk.clone()] });
    let (st, v) = post(secret.clone(), body.clone()).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = get(secret.clone()).await;
    assert_eq!((st, &v), (200, &body), "fetched as stored");

    let bad = [
        ("offset", json!(512u64 << 20 | 1)),
        ("offset", json!(2u64 << 30)),
        ("block_size", json!(3000)),
        ("window_bytes", json!(1u64 << 40)),
        ("digest", json!("xyz")),
    ];
    for (field, value) in bad {
        let mut d = disk.clone();
        d[field] = value.clone();
        let (st, v) = post(secret.clone(), json!({ "disks": [d] })).await;
        assert_eq!(st, 400, "{field} = {value}: {v}");
        assert!(
            v.to_string().contains(&format!("disks[0].{field}")),
            "{field}: {v}"
        );
    }
    let many: Vec<Value> = (0..65).map(|_| disk.clone()).collect();
    let (st, v) = post(secret.clone(), json!({ "disks": many })).await;
    assert_eq!(st, 400, "{v}");
    let (_, v) = get(secret.clone()).await;
    assert_eq!(v, body, "a refused checkpoint stores nothing");

    let (st, _) = get("not-a-secret".into()).await;
    assert_eq!(st, 401);
    let (st, v) = post(secret.clone(), json!({"disks": []})).await;
    assert_eq!(st, 200, "{v}");
    let (_, v) = get(secret).await;
    assert_eq!(v, json!({"disks": []}), "an empty list clears them");
    s.shutdown().await;
}

/// The service's `--compression` reaches the client at pairing and in every heartbeat answer.
async fn the_compression_setting_reaches_the_client(db: Db) {
    let d = tempfile::tempdir().unwrap();
    let s = server_with(d.path(), &db, CompressionMode::Zstd).await;
    let c = C::new(&s);
    let (a, _) = c.enroll(None, 1 << 30).await;
    let t = c.token("pairing", Some(&a), None).await;
    let (st, v) = c.pair(&t, None, None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["compression"], "zstd", "{v}");
    let secret = v["client_secret"].as_str().unwrap().to_string();
    let report = json!({"phase": "SYNCING", "round": 1});
    let (st, v) = c
        .send(
            reqwest::Method::POST,
            "/v1/client/heartbeat",
            Some(&secret),
            Some(report.to_string()),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let r: ClientCommandResponse = serde_json::from_value(v).unwrap();
    assert_eq!(r.compression, CompressionMode::Zstd);
    s.shutdown().await;
}

/// Each test on both backends: `NAME::sqlite` and `NAME::postgres`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(None).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let url = tokio::task::spawn_blocking(|| {
                    failback_tests::pg::PgCluster::fresh_database(stringify!($name))
                })
                .await
                .unwrap();
                super::$name(Some(url)).await
            }
        }
    )*};
}

on_both_backends!(
    pairing_by_scope_and_by_smbios_uuid_then_reuse_refused,
    expired_wrong_kind_and_other_instance_tokens_refused,
    malformed_requests_name_the_field_and_store_nothing,
    state_ca_and_admin_token_survive_restart,
    launch_stop_and_config_drive_the_client_commands,
    agent_outage_is_one_event_and_reconnection_another,
    missed_agent_heartbeats_raise_agent_not_seen,
    boot_reports_are_filed_by_token_or_uuid_limited_and_validated,
    used_token_of_a_completed_failback_answers_completed,
    client_checkpoints_are_stored_fetched_and_checked,
    the_compression_setting_reaches_the_client,
);
