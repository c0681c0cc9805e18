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
//! - `host_client_and_agent_move_to_the_other_replica`: the real `failback-agent` and
//!   `failback-client run` binaries, each given both replicas' URLs (the replica without the
//!   lease first); a real sync runs; that replica is killed with `kill -9`; the rounds go on
//!   through the other replica, the launch completes, the local image equals the recovery
//!   volume, and the client says it moved.

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

/// A real agent or client process, killed on drop; output in a file.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(cmd: &mut Command, log: PathBuf) -> Proc {
        let f = std::fs::File::create(&log).unwrap();
        let child = cmd
            .env("RUST_LOG", "info")
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Proc { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls the instance through `api` until `pred` holds (deadline 120 s; panics with the logs).
async fn wait_instance(
    api: &Api,
    id: &str,
    what: &str,
    procs: &[&Proc],
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let t = Instant::now();
    loop {
        let v = api.get(&format!("/v1/admin/instances/{id}")).await;
        if pred(&v) {
            return v;
        }
        if t.elapsed() > Duration::from_secs(120) {
            let logs: Vec<String> = procs.iter().map(|p| p.log()).collect();
            panic!(
                "waiting for {what}: {}\n{}",
                v["failback"],
                logs.join("\n----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn image(path: &Path, len: usize, seed: u64) {
    std::fs::write(path, failback_tests::random_bytes(seed, len)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_client_and_agent_move_to_the_other_replica() {
    let (holder, mut other, _s) =
        tokio::task::spawn_blocking(|| two_replicas("kill_host_client_side"))
            .await
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, holder.ca_pem()).unwrap();
    // The replica without the lease first: the agent and the client talk to it.
    let urls = format!("{},{}", other.url, holder.url);
    let admin = Api::new(&holder.ca_pem(), &holder.url);
    let (remote, local) = (dir.path().join("remote.img"), dir.path().join("local.img"));
    image(&remote, 16 << 20, 11);
    image(&local, 16 << 20, 12);

    let t = admin
        .post("/v1/admin/tokens", ADMIN, json!({"kind": "agent"}))
        .await;
    let agent = Proc::spawn(
        Command::new(failback_tests::bin("failback-agent"))
            .args(["serve", "--listen", "127.0.0.1:0", "--server", &urls])
            .arg("--disk")
            .arg(format!("disk0={}", remote.display()))
            .arg("--ca")
            .arg(&ca)
            .args(["--enroll-token", t["token"].as_str().unwrap()]),
        dir.path().join("agent.log"),
    );
    let started = Instant::now();
    let id = loop {
        let log = agent.log();
        if let Some(l) = log.lines().find(|l| l.contains("as recovery instance ")) {
            break l.rsplit(' ').next().unwrap().trim().to_string();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "agent did not enroll: {log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let t = admin
        .post(
            "/v1/admin/tokens",
            ADMIN,
            json!({"kind": "pairing", "recovery_instance_id": id}),
        )
        .await;
    // Both URLs as repeated flags (the agent got them as one comma-separated list).
    let mut client = Proc::spawn(
        Command::new(failback_tests::bin("failback-client"))
            .args(["run", "--server", &other.url, "--server", &holder.url])
            .args(["--token", t["token"].as_str().unwrap()])
            .arg("--ca")
            .arg(&ca)
            .arg("--map")
            .arg(format!("disk0={}", local.display()))
            .args(["--delta-interval-secs", "1", "--retry-secs", "1"]),
        dir.path().join("client.log"),
    );
    let ready = |v: &Value| {
        v["failback"]["state"] == "FAILBACK_READY_FOR_LAUNCH"
            && v["failback"]["replication_state"] == "CONTINUOUS"
    };
    let v = wait_instance(&admin, &id, "READY + CONTINUOUS", &[&agent, &client], ready).await;
    let round = v["failback"]["round"].as_u64().unwrap();
    assert!(
        client
            .log()
            .contains(&format!("pairing with {}", other.url)),
        "{}",
        client.log()
    );

    other.kill9();
    // Rounds go on (reported through the survivor), the instance stays ready.
    wait_instance(
        &admin,
        &id,
        "rounds after the kill",
        &[&agent, &client],
        |v| v["failback"]["round"].as_u64().unwrap() >= round + 2 && ready(v),
    )
    .await;
    let l = admin
        .post(
            "/v1/admin/launch",
            ADMIN,
            json!({"recovery_instance_ids": [id]}),
        )
        .await;
    assert_eq!(l["results"][0]["accepted"], true, "{l}");
    let t = Instant::now();
    let code = loop {
        if let Some(st) = client.child.try_wait().unwrap() {
            break st.code();
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "client did not finish: {}",
            client.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(code, Some(0), "{}", client.log());
    let v = admin.get(&format!("/v1/admin/instances/{id}")).await;
    assert_eq!(
        v["failback"]["state"], "FAILBACK_COMPLETED",
        "{}",
        v["failback"]
    );
    assert!(
        std::fs::read(&local).unwrap() == std::fs::read(&remote).unwrap(),
        "local image differs from the recovery volume"
    );
    // The client said where it went (the API client's failover message).
    assert!(
        client.log().contains(&format!("now using {}", holder.url)),
        "{}",
        client.log()
    );
}
