//! DR service end to end with the real binaries on 127.0.0.1: `failback-server`,
//! `failback-agent serve --server`, `failback-client run`, and the `failback` admin CLI.
//! Short heartbeat/timeout flags; every wait polls with a generous deadline (no timing
//! assertions).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use failback_tests::bin;
use serde_json::Value;

const MIB: usize = 1 << 20;
const DEADLINE: Duration = Duration::from_secs(180);

/// A child process killed on drop, output in a log file.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(cmd: &mut Command, log: &Path) -> Proc {
        let f = std::fs::File::create(log).unwrap();
        let child = cmd
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Proc {
            child,
            log: log.to_path_buf(),
        }
    }
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    /// Waits for exit; panics (with the log) after the deadline.
    fn wait_exit(&mut self, what: &str) -> i32 {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            assert!(
                t.elapsed() < DEADLINE,
                "{what}: still running after {DEADLINE:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Env {
    dir: tempfile::TempDir,
    server: Option<Proc>,
    addr: String,
    admin: String,
}

impl Env {
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Starts (or restarts on the same port) the service.
    fn start_server(&mut self) {
        let data = self.path("data");
        let addr_file = self.path("addr");
        let _ = std::fs::remove_file(&addr_file);
        let listen = if self.addr.is_empty() {
            "127.0.0.1:0".to_string()
        } else {
            self.addr.clone()
        };
        let n = std::fs::read_dir(self.dir.path()).unwrap().count();
        let p = Proc::spawn(
            Command::new(bin("failback-server")).args([
                "serve",
                "--data-dir",
                data.to_str().unwrap(),
                "--listen",
                &listen,
                "--addr-file",
                addr_file.to_str().unwrap(),
                "--admin-token",
                &self.admin,
                "--heartbeat-secs",
                "1",
                "--agent-timeout-secs",
                "3",
                "--client-timeout-secs",
                "15",
                "--block-size",
                "65536",
            ]),
            &self.path(&format!("server-{n}.log")),
        );
        let t = Instant::now();
        while !addr_file.exists() {
            assert!(t.elapsed() < DEADLINE, "server did not start: {}", p.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        self.addr = std::fs::read_to_string(&addr_file).unwrap();
        self.server = Some(p);
    }

    fn new() -> Env {
        let mut e = Env {
            dir: tempfile::tempdir().unwrap(),
            server: None,
            addr: String::new(),
            admin: "test-admin-token".into(),
        };
        e.start_server();
        e
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn ca(&self) -> PathBuf {
        self.path("data/ca.pem")
    }

    /// Runs the `failback` admin CLI with `--output json`.
    fn cli(&self, args: &[&str]) -> (i32, Value) {
        let out = Command::new(bin("failback"))
            .args(args)
            .args(["--output", "json"])
            .env("FAILBACK_SERVER", self.url())
            .env("FAILBACK_ADMIN_TOKEN", &self.admin)
            .env("FAILBACK_CA", self.ca())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (
            out.status.code().unwrap_or(-1),
            serde_json::from_str(&text).unwrap_or_else(|_| {
                Value::String(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
            }),
        )
    }

    /// Runs the CLI with its text output: (exit code, stdout).
    fn cli_text(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(bin("failback"))
            .args(args)
            .env("FAILBACK_SERVER", self.url())
            .env("FAILBACK_ADMIN_TOKEN", &self.admin)
            .env("FAILBACK_CA", self.ca())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    fn token(&self, kind: &str, instance: Option<&str>) -> String {
        let mut a = vec!["token", "create", kind];
        if let Some(i) = instance {
            a.extend(["--instance", i]);
        }
        let (code, v) = self.cli(&a);
        assert_eq!(code, 0, "{v}");
        v["token"].as_str().unwrap().to_string()
    }

    fn describe(&self, id: &str) -> Option<Value> {
        let (code, v) = self.cli(&["instances", "describe", id]);
        (code == 0).then_some(v)
    }

    fn agent(&self, name: &str, disk: &Path, token: Option<&str>) -> Proc {
        self.agent_at(name, disk, token, None)
    }

    /// An agent that registers `advertise` as the address clients dial (`--advertise`), e.g.
    /// a link emulator in front of it; `None`: its own bound address.
    fn agent_at(
        &self,
        name: &str,
        disk: &Path,
        token: Option<&str>,
        advertise: Option<&str>,
    ) -> Proc {
        let mut c = Command::new(bin("failback-agent"));
        c.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--disk",
            &format!("disk0={}", disk.display()),
            "--server",
            &self.url(),
            "--ca",
            self.ca().to_str().unwrap(),
            "--state-dir",
            self.path(&format!("{name}-state")).to_str().unwrap(),
        ]);
        if let Some(t) = token {
            c.args(["--enroll-token", t]);
        }
        if let Some(a) = advertise {
            c.args(["--advertise", a]);
        }
        let n = std::fs::read_dir(self.dir.path()).unwrap().count();
        Proc::spawn(&mut c, &self.path(&format!("{name}-{n}.log")))
    }

    /// Waits for the agent to print its instance id.
    fn agent_instance(&self, p: &Proc) -> String {
        let t = Instant::now();
        loop {
            let log = p.log();
            if let Some(l) = log.lines().find(|l| l.contains("as recovery instance ")) {
                return l.rsplit(' ').next().unwrap().trim().to_string();
            }
            assert!(t.elapsed() < DEADLINE, "agent did not enroll: {log}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn client(&self, name: &str, token: &str, local: &Path) -> Proc {
        let n = std::fs::read_dir(self.dir.path()).unwrap().count();
        Proc::spawn(
            Command::new(bin("failback-client")).args([
                "run",
                "--server",
                &self.url(),
                "--token",
                token,
                "--ca",
                self.ca().to_str().unwrap(),
                "--map",
                &format!("disk0={}", local.display()),
                "--delta-interval-secs",
                "1",
                "--retry-secs",
                "1",
            ]),
            &self.path(&format!("{name}-{n}.log")),
        )
    }

    /// Polls `describe` until `pred` holds; panics with the last state and the logs.
    fn wait_state(
        &self,
        id: &str,
        what: &str,
        procs: &[&Proc],
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let t = Instant::now();
        let mut last = Value::Null;
        while t.elapsed() < DEADLINE {
            if let Some(v) = self.describe(id) {
                if pred(&v) {
                    return v;
                }
                last = v;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let logs: Vec<String> = procs.iter().map(|p| p.log()).collect();
        panic!(
            "waiting for {what}: last state {}\nlogs:\n{}",
            last["failback"],
            logs.join("\n----\n")
        );
    }
}

fn states(v: &Value) -> (String, String) {
    (
        v["failback"]["state"].as_str().unwrap_or("").to_string(),
        v["failback"]["replication_state"]
            .as_str()
            .unwrap_or("")
            .to_string(),
    )
}

fn ready(v: &Value) -> bool {
    states(v) == ("FAILBACK_READY_FOR_LAUNCH".into(), "CONTINUOUS".into())
}

/// Deterministic pseudo-random image (xorshift), with a zero region to exercise sparse blocks.
fn write_image(path: &Path, size: usize, seed: u64) {
    let mut x = seed | 1;
    let mut buf = vec![0u8; size];
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        if (4 * MIB..5 * MIB).contains(&(i * 8)) {
            continue;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(path, buf).unwrap();
}

fn overwrite(path: &Path, offset: u64, len: usize, byte: u8) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&vec![byte; len]).unwrap();
    f.sync_all().unwrap();
}

fn read_all(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    std::fs::File::open(path)
        .unwrap()
        .read_to_end(&mut v)
        .unwrap();
    v
}

/// Bytes fetched in the first round of a client run, from its console line
/// `round 1 done in 0.4s: 64.0 MiB differed, 64.0 MiB fetched`.
fn round1_differed_mib(log: &str) -> f64 {
    let l = log
        .lines()
        .find(|l| l.contains("round 1 done"))
        .unwrap_or_else(|| panic!("no round 1 in:\n{log}"));
    let after = l.split(": ").nth(2).unwrap_or_else(|| panic!("{l}"));
    after
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("{l}: {e}"))
}

#[test]
fn service_full_failback_survives_agent_and_service_restarts_then_launches() {
    let mut env = Env::new();
    let remote = env.path("remote.img");
    let local = env.path("local.img");
    write_image(&remote, 24 * MIB, 7);
    std::fs::write(&local, vec![0u8; 24 * MIB]).unwrap();

    let at = env.token("agent", None);
    let mut agent = env.agent("agent", &remote, Some(&at));
    let id = env.agent_instance(&agent);
    let pt = env.token("pairing", Some(&id));
    let mut client = env.client("client", &pt, &local);

    let v = env.wait_state(&id, "READY + CONTINUOUS", &[&client, &agent], ready);
    assert_eq!(v["failback"]["disks"][0]["total_bytes"], 24 * MIB);
    let steps = v["failback"]["steps"].as_array().unwrap();
    assert!(
        steps.iter().all(|s| s["status"] == "SUCCEEDED"),
        "{steps:?}"
    );

    // Agent killed -> DISCONNECTED (AGENT_NOT_SEEN); restarted from its saved enrollment
    // (no token) -> CONTINUOUS again.
    agent.kill();
    let v = env.wait_state(&id, "DISCONNECTED + AGENT_NOT_SEEN", &[&client], |v| {
        states(v).1 == "DISCONNECTED"
            && v["failback"]["errors"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e == "AGENT_NOT_SEEN")
    });
    assert_eq!(states(&v).0, "FAILBACK_NOT_READY_FOR_LAUNCH");
    let agent = env.agent("agent", &remote, None);
    assert_eq!(env.agent_instance(&agent), id);
    env.wait_state(
        &id,
        "CONTINUOUS after agent restart",
        &[&client, &agent],
        ready,
    );

    // Service restart mid-failback: the client keeps going and the state is kept.
    let round_before = env.describe(&id).unwrap()["failback"]["round"]
        .as_u64()
        .unwrap();
    env.server.as_mut().unwrap().kill();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        client.running(),
        "client died with the service: {}",
        client.log()
    );
    env.start_server();
    let v = env.wait_state(
        &id,
        "rounds continue after service restart",
        &[&client, &agent],
        |v| ready(v) && v["failback"]["round"].as_u64().unwrap() > round_before + 1,
    );
    assert!(v["failback"]["client_id"].as_str().is_some());

    // New writes on the recovery instance reach the client before launch.
    overwrite(&remote, 3 * MIB as u64 + 123, 200_000, 0xAB);

    // Launch from the CLI.
    let (code, v) = env.cli(&["launch", &id]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["results"][0]["accepted"], true);
    assert_eq!(
        client.wait_exit("client after launch"),
        0,
        "{}",
        client.log()
    );
    let v = env.describe(&id).unwrap();
    assert_eq!(states(&v).0, "FAILBACK_COMPLETED", "{}", v["failback"]);
    let d = &v["failback"]["digests"][0];
    assert_eq!(d["local_digest"], d["agent_digest"], "{d}");
    assert_eq!(d["local_digest"].as_str().unwrap().len(), 64);
    assert!(
        read_all(&local) == read_all(&remote),
        "local image differs from the recovery volume"
    );
    assert!(client.log().contains("FAILBACK_COMPLETED"));
    // The client's log was uploaded.
    let (_, ev) = env.cli(&["events", "--instance", &id]);
    let kinds: Vec<&str> = ev["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"LOG_UPLOADED"), "{kinds:?}");
    assert!(kinds.contains(&"LAUNCH_REQUESTED"), "{kinds:?}");
    // The final round's duration (the downtime on the agent side): in the client's log, the
    // instance and a FINAL_ROUND event, the same figure, plausible for a 24 MiB disk.
    let secs = v["failback"]["final_round_secs"]
        .as_f64()
        .unwrap_or_else(|| panic!("no final_round_secs: {}", v["failback"]));
    assert!(secs > 0.0 && secs < 60.0, "final round {secs}s");
    let line = format!("final round took {secs:.3}s");
    assert!(
        client.log().contains(&line),
        "{line} not in:\n{}",
        client.log()
    );
    let event = ev["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "FINAL_ROUND")
        .unwrap_or_else(|| panic!("no FINAL_ROUND event: {kinds:?}"));
    assert!(
        event["message"].as_str().unwrap().contains(&line),
        "{event}"
    );
    let (_, text) = env.cli_text(&["instances", "describe", &id]);
    assert!(text.contains("final round "), "{text}");
    // The per-disk wire figures reached the service: wire bytes cover the payload received,
    // the decoded payload is at least that (ratio >= 1), a rate and a mode are set.
    let disk = &v["failback"]["disks"][0];
    let n = |k: &str| disk[k].as_u64().unwrap_or_else(|| panic!("no {k}: {disk}"));
    let (wire, fetched, payload) = (n("wire_bytes"), n("fetched_bytes"), n("payload_bytes"));
    assert!(
        fetched > 0 && wire >= fetched && payload >= fetched,
        "{disk}"
    );
    assert!(
        n("wire_bytes_per_sec") > 0 && disk["compression"] == "auto",
        "{disk}"
    );
    assert!(text.contains("disk wire          disk0: "), "{text}");
}

#[test]
fn service_stop_stops_the_client_and_a_restart_fetches_only_the_delta() {
    let env = Env::new();
    let remote = env.path("remote.img");
    let local = env.path("local.img");
    write_image(&remote, 16 * MIB, 11);
    std::fs::write(&local, vec![0u8; 16 * MIB]).unwrap();
    let at = env.token("agent", None);
    let agent = env.agent("agent", &remote, Some(&at));
    let id = env.agent_instance(&agent);

    let mut client = env.client("client", &env.token("pairing", Some(&id)), &local);
    env.wait_state(&id, "READY", &[&client, &agent], ready);
    let first = round1_differed_mib(&client.log());
    assert!(
        first > 10.0,
        "initial sync should copy most of 16 MiB: {first}"
    );

    let (code, v) = env.cli(&["stop", &id]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(client.wait_exit("client after stop"), 8, "{}", client.log());
    let v = env.describe(&id).unwrap();
    assert_eq!(
        states(&v),
        ("FAILBACK_NOT_STARTED".into(), "STOPPED".into())
    );

    // 100 KiB change on the recovery volume; a new run fetches about that, not 16 MiB.
    overwrite(&remote, 5 * MIB as u64, 100 * 1024, 0x5A);
    let mut client = env.client("client2", &env.token("pairing", Some(&id)), &local);
    env.wait_state(&id, "READY again", &[&client, &agent], ready);
    let delta = round1_differed_mib(&client.log());
    assert!(
        delta > 0.0 && delta < 1.0,
        "restart must fetch only the delta, got {delta} MiB"
    );
    let (code, _) = env.cli(&["stop", &id]);
    assert_eq!(code, 0);
    assert_eq!(client.wait_exit("second client after stop"), 8);
}

#[test]
fn service_reused_token_makes_the_client_exit_7() {
    let env = Env::new();
    let remote = env.path("remote.img");
    let local = env.path("local.img");
    write_image(&remote, 2 * MIB, 3);
    std::fs::write(&local, vec![0u8; 2 * MIB]).unwrap();
    let agent = env.agent("agent", &remote, Some(&env.token("agent", None)));
    let id = env.agent_instance(&agent);
    let t = env.token("pairing", Some(&id));
    let mut c1 = env.client("c1", &t, &local);
    env.wait_state(&id, "READY", &[&c1, &agent], ready);
    let mut c2 = env.client("c2", &t, &local);
    assert_eq!(c2.wait_exit("client with a used token"), 7, "{}", c2.log());
    assert!(c2.log().contains("TOKEN_USED"), "{}", c2.log());
    c1.kill();
}

#[test]
fn service_client_cert_for_instance_a_is_refused_by_agent_b() {
    let env = Env::new();
    let remote = env.path("remote.img");
    write_image(&remote, MIB, 5);
    let a = env.agent("agent-a", &remote, Some(&env.token("agent", None)));
    let b = env.agent("agent-b", &remote, Some(&env.token("agent", None)));
    let (ia, ib) = (env.agent_instance(&a), env.agent_instance(&b));
    assert_ne!(ia, ib);
    let (addr_a, addr_b) = (agent_addr(&a), agent_addr(&b));

    // Pair for A over the API (the client certificate it returns names instance A).
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tls = client_tls(&pair_over_api(&env, &rt, &ia));
    rt.block_on(async {
        let ok = failback_replication::Session::connect(&addr_a, &tls).await;
        assert!(ok.is_ok(), "agent A must accept its own client: {ok:?}");
        assert_eq!(ok.unwrap().agent_instance(), Some(ia.as_str()));
        let refused = failback_replication::Session::connect(&addr_b, &tls).await;
        let e = refused.expect_err("agent B must refuse a client certificate for instance A");
        let msg = e.to_string();
        assert!(
            msg.contains(&ia) || msg.contains(&ib) || msg.to_lowercase().contains("instance"),
            "error should say why: {msg}"
        );
    });
}

// ---------------------------------------------------------------- trust (issue 14)

/// Pairs for `instance` over the API; returns the pairing answer (client certificate + key).
fn pair_over_api(
    env: &Env,
    rt: &tokio::runtime::Runtime,
    instance: &str,
) -> failback_api::PairResponse {
    let ca_pem = std::fs::read(env.ca()).unwrap();
    let token = env.token("pairing", Some(instance));
    rt.block_on(async {
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(
                failback_trust::service_client_config(&ca_pem, Path::new("ca.pem")).unwrap(),
            )
            .build()
            .unwrap();
        let body = serde_json::json!({
            "token": token,
            "inventory": {"disks": [{"path": "/dev/sdx", "size_bytes": 1u64 << 30}]},
        });
        let r = http
            .post(format!("{}/v1/pair", env.url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{:?}", r.text().await);
        r.json().await.unwrap()
    })
}

fn client_tls(p: &failback_api::PairResponse) -> failback_replication::ClientTls {
    failback_replication::ClientTls::from_pem(
        p.ca_pem.as_bytes(),
        p.client_cert_pem.as_bytes(),
        p.client_key_pem.as_bytes(),
    )
    .unwrap()
}

fn agent_addr(p: &Proc) -> String {
    let t = Instant::now();
    loop {
        if let Some(a) = p
            .log()
            .lines()
            .find_map(|l| l.strip_prefix("listening on ").map(str::to_string))
        {
            return a;
        }
        assert!(t.elapsed() < DEADLINE, "agent did not listen: {}", p.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls `f` until it returns true, at most `bound`; panics naming `what`.
fn within(bound: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < bound, "{what}: not within {bound:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Issue 14, item 6: stop, a new pairing and completion end the old client certificate at the
/// agent. Bound: the agent heartbeats every `--heartbeat-secs` (1 s here) and asks at once
/// about certificates it does not know, so a revoked certificate is refused, and its open
/// connections closed, within one heartbeat interval plus a request (asserted: 10 s).
#[test]
fn service_stop_and_new_pairing_revoke_the_old_client_certificate() {
    let env = Env::new();
    let remote = env.path("remote.img");
    write_image(&remote, MIB, 9);
    let agent = env.agent("agent", &remote, Some(&env.token("agent", None)));
    let id = env.agent_instance(&agent);
    let addr = agent_addr(&agent);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let bound = Duration::from_secs(10);

    // A fresh pairing is served at once (the agent asks the service about the new certificate).
    let first = client_tls(&pair_over_api(&env, &rt, &id));
    let open = rt
        .block_on(failback_replication::Session::connect(&addr, &first))
        .unwrap_or_else(|e| panic!("first pairing refused: {e}\n{}", agent.log()));

    // A new pairing replaces the first: its certificate is refused from now on.
    let second = client_tls(&pair_over_api(&env, &rt, &id));
    rt.block_on(failback_replication::Session::connect(&addr, &second))
        .map(drop)
        .unwrap_or_else(|e| panic!("second pairing refused: {e}"));
    within(
        bound,
        "first certificate refused after a new pairing",
        || match rt.block_on(failback_replication::Session::connect(&addr, &first)) {
            Ok(s) => {
                drop(s);
                false
            }
            Err(e) => {
                let m = e.to_string();
                assert!(
                    m.contains("no longer") || m.contains("not authorized"),
                    "{m}"
                );
                true
            }
        },
    );
    // The connection opened with the first certificate was closed by the agent.
    let mappings = [failback_replication::Mapping {
        remote: "disk0".into(),
        local: env.path("never-written.img"),
    }];
    std::fs::write(env.path("never-written.img"), vec![0u8; MIB]).unwrap();
    let r = rt.block_on(open.sync(
        &mappings,
        &failback_replication::SyncOptions::default(),
        std::sync::Arc::new(failback_replication::NoProgress),
    ));
    assert!(
        r.is_err(),
        "a revoked certificate's open connection still syncs"
    );
    assert_eq!(read_all(&env.path("never-written.img")), vec![0u8; MIB]);

    // Stop ends the second pairing's certificate too.
    let (code, v) = env.cli(&["stop", &id]);
    assert_eq!(code, 0, "{v}");
    within(bound, "certificate refused after stop", || {
        rt.block_on(failback_replication::Session::connect(&addr, &second))
            .map(drop)
            .is_err()
    });
}

/// A certificate with another role, issued by the service's own CA for the service's address
/// (what an agent enrollment token could buy before: `cert_sans` chosen by the caller), and a
/// fake HTTPS server presenting it. Before: `failback instances list` and `failback-client run`
/// trusted it and sent it the admin token and the pairing token. Now both refuse at the
/// handshake (exit 7, naming the cause, at once: no retries), and the fake server receives
/// no request at all.
#[test]
fn service_impostor_with_a_certificate_from_the_same_ca_gets_no_secrets() {
    let env = Env::new();
    // Enrollment cannot choose certificate names any more.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ca_pem = std::fs::read(env.ca()).unwrap();
    let token = env.token("agent", None);
    let status = rt.block_on(async {
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(
                failback_trust::service_client_config(&ca_pem, Path::new("ca.pem")).unwrap(),
            )
            .build()
            .unwrap();
        let body = serde_json::json!({
            "token": token, "address": "127.0.0.1:1740",
            "disks": [{"id": "disk0", "size_bytes": 1048576, "logical_sector_size": 512}],
            "cert_sans": ["127.0.0.1", "*.example.com"],
        });
        let r = http
            .post(format!("{}/v1/agent/enroll", env.url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    });
    assert_eq!(status.0, 400, "{}", status.1);
    assert!(status.1.contains("cert_sans"), "{}", status.1);

    // The impostor: an agent-role certificate for 127.0.0.1 signed by the service's CA key.
    let key_pem = std::fs::read_to_string(env.path("data/ca-key.pem")).unwrap();
    let (cert, key) = impostor_cert(&key_pem);
    let (fake_addr, got_bytes) = fake_https_server(&rt, cert, key);
    let fake_url = format!("https://{fake_addr}");

    let out = Command::new(bin("failback"))
        .args(["instances", "list", "--server", &fake_url])
        .env("FAILBACK_ADMIN_TOKEN", &env.admin)
        .env("FAILBACK_CA", env.ca())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert!(err.contains("not a failback service certificate"), "{err}");

    let local = env.path("local.img");
    std::fs::write(&local, vec![0u8; MIB]).unwrap();
    let out = Command::new(bin("failback-client"))
        .args([
            "run",
            "--server",
            &fake_url,
            "--token",
            "fbp_secret_pairing_token",
        ])
        .args(["--ca", env.ca().to_str().unwrap(), "--map"])
        .arg(format!("disk0={}", local.display()))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(7), "{text}");
    assert!(
        text.contains("not a failback service certificate"),
        "{text}"
    );
    assert!(
        !text.contains("retrying"),
        "retried a certificate error: {text}"
    );
    assert_eq!(
        got_bytes.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the impostor received request bytes (tokens)"
    );

    // A wrong CA pin names the cause.
    let other = failback_trust::dev::DevCa::generate("another CA").unwrap();
    std::fs::write(env.path("other-ca.pem"), other.cert_pem()).unwrap();
    let out = Command::new(bin("failback"))
        .args(["instances", "list", "--server", &env.url()])
        .env("FAILBACK_ADMIN_TOKEN", &env.admin)
        .env("FAILBACK_CA", env.path("other-ca.pem"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert!(err.contains("not signed by the pinned CA"), "{err}");
}

/// An agent-role certificate for 127.0.0.1, signed with the DR service's CA key (rebuilt the
/// way the service rebuilds its issuer: same subject, same key).
fn impostor_cert(ca_key_pem: &str) -> (String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::from_pem(ca_key_pem).unwrap();
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "failback private CA");
    ca.distinguished_name
        .push(DnType::OrganizationName, "failback");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let issuer = ca.self_signed(&ca_key).unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![
        SanType::URI("urn:failback:role:agent".try_into().unwrap()),
        SanType::URI("urn:failback:instance:i-0123".try_into().unwrap()),
        SanType::IpAddress("127.0.0.1".parse().unwrap()),
        SanType::DnsName("localhost".try_into().unwrap()),
    ];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &issuer, &ca_key).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// An HTTPS server presenting `cert`; counts the application bytes it receives.
fn fake_https_server(
    rt: &tokio::runtime::Runtime,
    cert: String,
    key: String,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::AsyncReadExt;
    let got = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let here = Path::new("<impostor>");
    let certs = failback_trust::pem::certs("c", here, cert.as_bytes()).unwrap();
    let key = failback_trust::pem::private_key(here, key.as_bytes()).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let counter = got.clone();
    rt.spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, counter) = (acceptor.clone(), counter.clone());
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let mut buf = vec![0u8; 4096];
                    while let Ok(n) = tls.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        counter.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            });
        }
    });
    (addr, got)
}

// ---------------------------------------------------------------- appliance reboot mid-round

/// `fb-wanlink` on `listen` in front of `upstream`: 2 ms RTT, 48 Mbit/s (6 MB/s: a 48 MiB round
/// takes about 8 s), printing what it delivered to the client every 50 ms.
fn wanlink(env: &Env, listen: &str, upstream: &str) -> Proc {
    let n = std::fs::read_dir(env.dir.path()).unwrap().count();
    let p = Proc::spawn(
        Command::new(bin("fb-wanlink")).args([
            "--listen",
            listen,
            "--upstream",
            upstream,
            "--rtt-ms",
            "2",
            "--mbit",
            "48",
            "--report-ms",
            "50",
        ]),
        &env.path(&format!("wanlink-{n}.log")),
    );
    wait_line(&p, "fb-wanlink listening", |l| {
        l.starts_with("listening on ")
    });
    p
}

/// The last `delivered N bytes` of an `fb-wanlink --report-ms` log (0 before the first).
fn delivered(p: &Proc) -> u64 {
    p.log()
        .lines()
        .rev()
        .find_map(|l| {
            l.strip_prefix("delivered ")?
                .strip_suffix(" bytes")?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Cuts the link: SIGTERM makes `fb-wanlink` print its final count and exit, which closes
/// every connection through it (as a pulled cable would, both sides see the connection end
/// mid-stream). Returns the bytes it delivered to the client in all.
fn cut_link(p: &mut Proc) -> u64 {
    let pid = p.child.id().to_string();
    let st = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(st.success(), "kill -TERM {pid}");
    p.wait_exit("fb-wanlink after SIGTERM");
    delivered(p)
}

/// Polls `p`'s log for a line matching `pred`; returns it, or panics with the log.
fn wait_line(p: &Proc, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let t = Instant::now();
    loop {
        let log = p.log();
        if let Some(l) = log.lines().find(|l| pred(l)) {
            return l.to_string();
        }
        assert!(t.elapsed() < DEADLINE, "waiting for {what}; log:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The number after `key` in `line` (`"... at byte 123 ..."`).
fn number_after(line: &str, key: &str) -> u64 {
    line.split_once(key)
        .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {key:?} in {line:?}"))
}

/// The whole appliance reboot path through `failback-client run`: the client reaches the agent
/// through a WAN link emulator; the link is cut when about half of the disk has crossed, the
/// client stores its checkpoint at the service and is killed (the appliance reboots); a new
/// client on the same disk resumes from the checkpoint, completes the round, and moves no more
/// than what was still unsent plus one hash window (a restart from 0 would move it all again).
///
/// The pairing token is one-time: the rebooted appliance's token is refused (`TOKEN_USED`,
/// `service_reused_token_makes_the_client_exit_7`), so the operator gives it a new one for the
/// same instance. Checkpoints are kept per instance, so the new pairing finds them.
#[test]
fn service_client_reboot_resumes_from_its_checkpoint() {
    const SIZE: usize = 48 * MIB;
    /// The client's hash window: at most this much of what crossed before the cut comes again.
    const WINDOW: u64 = 16 * MIB as u64;
    /// The first MiB the writer held back (never on the target, fetched again after a reboot),
    /// frames, hashes and handshakes.
    const SLACK: u64 = MIB as u64;
    let env = Env::new();
    let remote = env.path("remote.img");
    let local = env.path("local.img");
    // Random: nothing compresses, so the link's bytes track the disk's.
    let data = failback_tests::random_bytes(48, SIZE);
    std::fs::write(&remote, &data).unwrap();
    std::fs::File::create(&local)
        .unwrap()
        .set_len(SIZE as u64)
        .unwrap();

    // The agent registers the link's address: that is what the service gives the client.
    // A free address: the link listens there, and the agent registers it before the link starts.
    let link_addr = format!("127.0.0.1:{}", failback_tests::free_port());
    let agent = env.agent_at(
        "agent",
        &remote,
        Some(&env.token("agent", None)),
        Some(&link_addr),
    );
    let id = env.agent_instance(&agent);
    let upstream = agent_addr(&agent);
    let mut link = wanlink(&env, &link_addr, &upstream);
    let mut client = env.client("client", &env.token("pairing", Some(&id)), &local);
    wait_line(&client, "pairing with the link as the agent", |l| {
        l.contains("paired with recovery instance") && l.ends_with(&format!("agent {link_addr}"))
    });

    // The first round crosses the link; cut it at about half of the disk.
    within(DEADLINE, "half of the disk across the link", || {
        delivered(&link) >= SIZE as u64 * 45 / 100
    });
    let before = cut_link(&mut link);
    assert!(
        !client.log().contains("round 1 done"),
        "the round finished before the cut ({before} bytes): {}",
        client.log()
    );
    wait_line(&client, "round interrupted", |l| {
        l.contains("round interrupted")
    });
    let stored = wait_line(&client, "the checkpoint stored at the service", |l| {
        l.contains("checkpoint at byte") && l.contains("stored at the DR service")
    });
    let stored_at = number_after(&stored, "checkpoint at byte ");

    // The appliance reboots: nothing of the client survives but the disk it wrote.
    client.kill();
    let mut link = wanlink(&env, &link_addr, &upstream);
    let client = env.client("client-rebooted", &env.token("pairing", Some(&id)), &local);
    let resumed = wait_line(&client, "the resume from the checkpoint", |l| {
        l.contains("resuming at byte") || l.contains("checkpoint not used")
    });
    assert!(
        resumed.contains("(checkpoint; sampled blocks match)"),
        "the checkpoint was not used: {resumed}"
    );
    let resumed_at = number_after(&resumed, "resuming at byte ");
    // Not a start over: the round continues where the checkpoint says.
    assert!(
        resumed_at > 0 && resumed_at == stored_at,
        "resumed at byte {resumed_at}, checkpoint at byte {stored_at}"
    );
    let done = wait_line(&client, "round 1 after the reboot", |l| {
        l.contains("round 1 done")
    });
    assert!(
        read_all(&local) == data,
        "local image differs from the recovery volume after the resumed round"
    );
    env.wait_state(&id, "READY after the reboot", &[&client, &agent], ready);
    // Everything the new link delivered: the connection, the resumed round and whatever
    // followed until READY showed (a little more than the round itself, so the bound below
    // is, if anything, strict). The link's counter rather than the client's report: it is
    // what crossed the "WAN", frames, TLS and handshakes included.
    let after = cut_link(&mut link);
    let unsent = (SIZE as u64).saturating_sub(before);
    let bound = unsent + WINDOW + SLACK;
    eprintln!(
        "disk {SIZE} bytes; cut after {before} bytes; checkpoint at byte {stored_at}; \
         {after} bytes after the reboot (bound {bound}); {done}"
    );
    assert!(
        after <= bound,
        "{after} bytes after the reboot, more than the unsent {unsent} + one window {WINDOW} \
         + {SLACK}"
    );
    assert!(
        resumed_at + WINDOW + SLACK >= before.min(SIZE as u64),
        "the checkpoint (byte {resumed_at}) lags the cut ({before} bytes) by more than a window"
    );
}
