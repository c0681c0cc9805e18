//! `failback credentials create|list|revoke` (the built binary) against the real DR service
//! in-process on 127.0.0.1:0, and mass failback's DR adapter ([`DrHttp`]) running every call
//! it makes with an `operator` credential, then refused once that credential is revoked.

use std::process::{Command, Output};

use failback_api::*;
use failback_orchestrator::mass::adapters::DrHttp;
use failback_orchestrator::mass::backend::DrService;
use failback_server::{start, RunningServer, ServerConfig, Settings, BOOTSTRAP_ADMIN};

async fn server(dir: &std::path::Path) -> RunningServer {
    start(ServerConfig {
        data_dir: dir.to_path_buf(),
        database: None,
        ca_secret: None,
        listen: "127.0.0.1:0".parse().unwrap(),
        sans: vec![],
        admin_token: None,
        settings: Settings::default(),
        limits: Default::default(),
    })
    .await
    .expect("service starts")
}

/// Runs `failback ARGS --server URL --admin-token TOKEN --ca CA` off the runtime's threads.
async fn cli(s: &RunningServer, ca: &std::path::Path, token: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_failback"));
    cmd.args(args)
        .arg("--server")
        .arg(s.url())
        .arg("--admin-token")
        .arg(token)
        .arg("--ca")
        .arg(ca)
        .env_remove("FAILBACK_SERVER")
        .env_remove("FAILBACK_ADMIN_TOKEN")
        .env_remove("FAILBACK_CA");
    tokio::task::spawn_blocking(move || cmd.output().expect("failback runs"))
        .await
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Enrolls an agent through the service directly (set-up, not what is tested).
fn enrolled_instance(s: &RunningServer) -> String {
    let at = s
        .service
        .create_token(
            BOOTSTRAP_ADMIN,
            CreateTokenRequest {
                kind: TokenKind::Agent,
                recovery_instance_id: None,
                ttl_secs: None,
            },
        )
        .unwrap();
    let en: AgentEnrollRequest = serde_json::from_value(serde_json::json!({
        "token": at.token, "address": "127.0.0.1:1740",
        "disks": [{"id": "disk0", "size_bytes": 1u64 << 30}]}))
    .unwrap();
    s.service.enroll_agent(en).unwrap().recovery_instance_id
}

/// Pairs a client with `token` and reports a finished round: FAILBACK_READY_FOR_LAUNCH.
fn pair_until_ready(s: &RunningServer, token: &str) {
    let pr: PairRequest = serde_json::from_value(serde_json::json!({
        "token": token,
        "inventory": {"disks": [{"path": "/dev/sda", "size_bytes": 1u64 << 30}]}}))
    .unwrap();
    let p = s.service.pair(pr).unwrap();
    let rep: ClientReport =
        serde_json::from_value(serde_json::json!({"phase": "IDLE", "round": 1})).unwrap();
    let r = s.service.client_heartbeat(&p.client_secret, rep).unwrap();
    assert_eq!(r.failback_state, FailbackState::FailbackReadyForLaunch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_credential_runs_mass_failback_calls_until_revoked() {
    let d = tempfile::tempdir().unwrap();
    let s = server(d.path()).await;
    let ca = d.path().join("ca.pem");
    assert!(ca.exists(), "the service writes data-dir/ca.pem");
    let boot = s.admin_token.clone();

    // create: the secret alone on stdout, the id on stderr.
    let out = cli(
        &s,
        &ca,
        &boot,
        &[
            "credentials",
            "create",
            "--role",
            "operator",
            "--name",
            "mass",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let secret = text(&out.stdout).trim().to_string();
    assert!(secret.starts_with("fbcr_"), "{secret}");
    let err = text(&out.stderr);
    let id = err.split_whitespace().nth(1).unwrap().to_string();
    assert!(valid_credential_id(&id), "{err}");

    // list (json) shows it, never the secret; an operator may not list (exit 7, refused).
    let out = cli(&s, &ca, &boot, &["credentials", "list", "--output", "json"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let l: CredentialList = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(l.items.len(), 1);
    assert_eq!(
        (l.items[0].role, l.items[0].name.as_str()),
        (Role::Operator, "mass")
    );
    assert!(!text(&out.stdout).contains(&secret));
    let out = cli(&s, &ca, &secret, &["credentials", "list"]).await;
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("this needs admin"),
        "{}",
        text(&out.stderr)
    );

    // Every DR call of a mass failback, as the operator.
    let dr = DrHttp::new(&s.url(), &secret, &s.ca_pem).unwrap();
    let id_inst = enrolled_instance(&s);
    let token = dr
        .create_pairing_token(&id_inst, 600)
        .await
        .expect("operator creates a pairing token");
    pair_until_ready(&s, &token);
    let all = dr.instances().await.expect("operator lists instances");
    assert_eq!(all.len(), 1);
    dr.instance(&id_inst)
        .await
        .expect("operator reads an instance");
    dr.launch(&id_inst).await.expect("operator launches");
    dr.stop(&id_inst).await.expect("operator stops");
    let ev = s.service.events(Some(&id_inst), 0, 1000).unwrap().items;
    let by_op = format!("credential:{id}:mass");
    for kind in ["TOKEN_CREATED", "LAUNCH_REQUESTED", "STOP_REQUESTED"] {
        let e = ev.iter().find(|e| e.kind == kind).expect(kind);
        assert_eq!(e.actor.as_deref(), Some(by_op.as_str()), "{kind}");
    }

    // revoke: a malformed id is a usage error before any request; then the operator's next
    // call is refused, permanently (no retry).
    let out = cli(&s, &ca, &boot, &["credentials", "revoke", "../instances"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = cli(&s, &ca, &boot, &["credentials", "revoke", &id]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let e = dr
        .instances()
        .await
        .expect_err("revoked credential refused");
    assert!(!e.transient, "{}", e.message);
    assert!(
        e.message.contains("401") && e.message.contains("revoked"),
        "{}",
        e.message
    );
    let out = cli(&s, &ca, &secret, &["instances", "list"]).await;
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    let out = cli(&s, &ca, &boot, &["credentials", "list"]).await;
    assert!(
        text(&out.stdout).contains("revoked"),
        "{}",
        text(&out.stdout)
    );
    s.shutdown().await;
}
