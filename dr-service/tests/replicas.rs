//! Two `failback-server` replicas (the real binary) on one PostgreSQL (throwaway cluster):
//! a failback in progress survives `kill -9` of a replica and completes through the other.
//! The agent and client are plain HTTP calls (as in api.rs) that move to the other replica's
//! URL after the kill.
//!
//! - `killing_the_replica_the_client_talks_to`: the client and agent use the replica that
//!   does not hold the lease; it is killed; the failback completes through the lease holder.
//! - `killing_the_lease_holder`: they use the lease holder; it is killed; the other replica
//!   takes the lease (its log says so) and its monitor raises `AGENT_NOT_SEEN` (actor
//!   `monitor`) while the agent is silent; the failback then completes through it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use failback_tests::pg::PgCluster;
use serde_json::{json, Value};

const ADMIN: &str = "fbadm_replicas_test_token_0123456789";

struct Replica {
    child: Child,
    url: String,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Replica {
    fn start(db: &str, secret_file: &Path) -> Replica {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stderr.log");
        let addr_file = dir.path().join("addr");
        let child = Command::new(failback_tests::bin("failback-server"))
            .args(["serve", "--listen", "127.0.0.1:0", "--database", db])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--ca-secret-file")
            .arg(secret_file)
            .arg("--addr-file")
            .arg(&addr_file)
            .args(["--admin-token", ADMIN, "--heartbeat-secs", "1"])
            .args(["--agent-timeout-secs", "2", "--client-timeout-secs", "600"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("failback-server starts");
        let t = Instant::now();
        while !addr_file.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "replica did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let addr = std::fs::read_to_string(&addr_file).unwrap();
        Replica {
            child,
            url: format!("https://{}", addr.trim()),
            log,
            dir,
        }
    }

    fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("data/ca.pem")).unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn holds_lease(&self) -> bool {
        self.log().contains("lease acquired")
    }

    fn kill9(&mut self) {
        // SIGKILL: no shutdown code runs; PostgreSQL sees the connections drop.
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two replicas on a fresh database; returns (lease holder, the other).
fn two_replicas(test: &str) -> (Replica, Replica, tempfile::TempDir) {
    let db = PgCluster::fresh_database(test);
    let sd = tempfile::tempdir().unwrap();
    let secret = sd.path().join("ca-secret");
    std::fs::write(&secret, "7f".repeat(32)).unwrap();
    let a = Replica::start(&db, &secret);
    let b = Replica::start(&db, &secret);
    assert_eq!(a.ca_pem(), b.ca_pem(), "replicas share one CA");
    assert!(
        !a.dir.path().join("data/ca-key.pem").exists(),
        "the CA key is never written in clear"
    );
    let t = Instant::now();
    loop {
        match (a.holds_lease(), b.holds_lease()) {
            (true, false) => return (a, b, sd),
            (false, true) => return (b, a, sd),
            (true, true) => panic!("both replicas hold the lease"),
            (false, false) => {}
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no replica took the lease"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// HTTP calls of the admin, agent and client, to one replica at a time.
struct Api {
    http: reqwest::Client,
    url: String,
}

impl Api {
    fn new(ca_pem: &str, url: &str) -> Api {
        Api {
            http: reqwest::Client::builder()
                .use_rustls_tls()
                .tls_built_in_root_certs(false)
                .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            url: url.to_string(),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, bearer: &str, body: Value) -> Value {
        let mut rq = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(bearer);
        if !body.is_null() {
            rq = rq.json(&body);
        }
        let r = rq.send().await.expect("request");
        let st = r.status();
        let v: Value = r.json().await.unwrap();
        assert!(st.is_success(), "{path}: {st} {v}");
        v
    }

    async fn post(&self, path: &str, bearer: &str, body: Value) -> Value {
        self.call(reqwest::Method::POST, path, bearer, body).await
    }

    async fn get(&self, path: &str) -> Value {
        self.call(reqwest::Method::GET, path, ADMIN, Value::Null)
            .await
    }

    async fn agent_hb(&self, secret: &str) -> Value {
        self.post(
            "/v1/agent/heartbeat",
            secret,
            json!({"address": "127.0.0.1:1740"}),
        )
        .await
    }

    async fn client_hb(&self, secret: &str, body: Value) -> Value {
        self.post("/v1/client/heartbeat", secret, body).await
    }
}

/// Enrolls an agent and pairs a client through `api`; the first round runs. Returns
/// (instance, agent secret, client secret).
async fn start_failback(api: &Api) -> (String, String, String) {
    let t = api
        .post("/v1/admin/tokens", ADMIN, json!({"kind": "agent"}))
        .await;
    let en = api
        .post(
            "/v1/agent/enroll",
            "",
            json!({"token": t["token"], "address": "127.0.0.1:1740",
                   "disks": [{"id": "disk0", "size_bytes": 1u64 << 30}]}),
        )
        .await;
    let id = en["recovery_instance_id"].as_str().unwrap().to_string();
    let t = api
        .post(
            "/v1/admin/tokens",
            ADMIN,
            json!({"kind": "pairing", "recovery_instance_id": id}),
        )
        .await;
    let p = api
        .post(
            "/v1/pair",
            "",
            json!({"token": t["token"], "inventory": {"disks": [{"path": "/dev/sda", "size_bytes": 1u64 << 30}]}}),
        )
        .await;
    let client = p["client_secret"].as_str().unwrap().to_string();
    let v = api
        .client_hb(&client, json!({"phase": "SYNCING", "round": 1}))
        .await;
    assert_eq!(v["failback_state"], "FAILBACK_IN_PROGRESS", "{v}");
    (id, en["agent_secret"].as_str().unwrap().to_string(), client)
}

/// The rest of the failback through `api`: round done, launch, verified completion.
async fn finish_failback(api: &Api, id: &str, agent: &str, client: &str) {
    api.agent_hb(agent).await;
    let v = api
        .client_hb(client, json!({"phase": "IDLE", "round": 1}))
        .await;
    assert_eq!(v["failback_state"], "FAILBACK_READY_FOR_LAUNCH", "{v}");
    let l = api
        .post(
            "/v1/admin/launch",
            ADMIN,
            json!({"recovery_instance_ids": [id]}),
        )
        .await;
    assert_eq!(l["results"][0]["accepted"], true, "{l}");
    let v = api
        .client_hb(client, json!({"phase": "IDLE", "round": 2}))
        .await;
    assert_eq!(v["command"], "LAUNCH", "{v}");
    let done = json!({"phase": "COMPLETED", "round": 2, "digests": [
        {"remote_id": "disk0", "local_path": "/dev/sda", "local_digest": "ab", "agent_digest": "ab"}]});
    let v = api.client_hb(client, done).await;
    assert_eq!(v["failback_state"], "FAILBACK_COMPLETED", "{v}");
    let i = api.get(&format!("/v1/admin/instances/{id}")).await;
    assert_eq!(i["failback"]["state"], "FAILBACK_COMPLETED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_replica_the_client_talks_to() {
    let (holder, mut other, _s) = tokio::task::spawn_blocking(|| two_replicas("kill_client_side"))
        .await
        .unwrap();
    let ca = holder.ca_pem();
    let api = Api::new(&ca, &other.url);
    let (id, agent, client) = start_failback(&api).await;
    other.kill9();
    // The client and agent move to the next URL.
    let api = Api::new(&ca, &holder.url);
    finish_failback(&api, &id, &agent, &client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_lease_holder() {
    let (mut holder, other, _s) = tokio::task::spawn_blocking(|| two_replicas("kill_lease_holder"))
        .await
        .unwrap();
    let ca = holder.ca_pem();
    let api = Api::new(&ca, &holder.url);
    let (id, agent, client) = start_failback(&api).await;
    holder.kill9();
    let api = Api::new(&ca, &other.url);
    // The other replica takes the lease and runs the monitor: the silent agent (timeout 2 s)
    // is flagged by it.
    let t = Instant::now();
    loop {
        let i = api.get(&format!("/v1/admin/instances/{id}")).await;
        let errors = i["failback"]["errors"].to_string();
        if errors.contains("AGENT_NOT_SEEN") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "AGENT_NOT_SEEN never raised: {i}\n{}",
            other.log()
        );
        // The client keeps heartbeating (it is not the silent one).
        api.client_hb(&client, json!({"phase": "SYNCING", "round": 1}))
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(other.holds_lease(), "{}", other.log());
    let ev = api
        .get(&format!("/v1/admin/events?instance={id}&limit=1000"))
        .await;
    assert!(
        ev["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "ERROR_RAISED" && e["actor"] == "monitor"),
        "{ev}"
    );
    // The agent is back: the failback completes through the surviving replica.
    finish_failback(&api, &id, &agent, &client).await;
}
