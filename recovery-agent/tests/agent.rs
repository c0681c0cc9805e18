//! The agent: the real `failback-agent` binary (dev-certs, serve) and the fault-injection switch
//! (compiled into test builds only) that corrupts blocks in transit.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use failback_replication::server::{FaultInjection, ServeOptions, SourceDisk};
use failback_replication::tls::DevCerts;
use failback_replication::{ClientTls, ErrorClass, Mapping, NoProgress, Session, SyncOptions};
use failback_tests::{random_bytes, KillOnDrop};

const AGENT: &str = env!("CARGO_BIN_EXE_failback-agent");
const MIB: usize = 1024 * 1024;

/// Starts `failback-agent serve` on 127.0.0.1:0 and returns it with the address it printed.
fn spawn_agent(dir: &Path, disks: &[(&str, &Path)], env: &[(&str, &str)]) -> (KillOnDrop, String) {
    let mut cmd = Command::new(AGENT);
    cmd.arg("serve")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--ca")
        .arg(dir.join("ca.pem"))
        .arg("--cert")
        .arg(dir.join("agent.pem"))
        .arg("--key")
        .arg(dir.join("agent-key.pem"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (id, p) in disks {
        cmd.arg("--disk").arg(format!("{id}={}", p.display()));
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start failback-agent");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected agent output {line:?}"))
        .to_owned();
    (KillOnDrop(child), addr)
}

fn dev_certs(dir: &Path) {
    let out = Command::new(AGENT)
        .arg("dev-certs")
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    for f in [
        "ca.pem",
        "ca-key.pem",
        "agent.pem",
        "agent-key.pem",
        "client.pem",
        "client-key.pem",
    ] {
        assert!(dir.join(f).exists(), "dev-certs did not write {f}");
    }
}

fn client_tls(dir: &Path) -> ClientTls {
    ClientTls::from_pem(
        &std::fs::read(dir.join("ca.pem")).unwrap(),
        &std::fs::read(dir.join("client.pem")).unwrap(),
        &std::fs::read(dir.join("client-key.pem")).unwrap(),
    )
    .unwrap()
}

async fn sync_one(
    addr: &str,
    tls: &ClientTls,
    remote: &str,
    local: &Path,
) -> failback_replication::Result<failback_replication::SyncReport> {
    let s = Session::connect(addr, tls).await?;
    let r = s
        .sync(
            &[Mapping {
                remote: remote.into(),
                local: local.to_owned(),
            }],
            &SyncOptions::default(),
            Arc::new(NoProgress),
        )
        .await;
    s.close().await;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_disks_with_dev_certs() {
    let dir = tempfile::tempdir().unwrap();
    dev_certs(dir.path());
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    let da = random_bytes(1, 6 * MIB + 512);
    let mut db = vec![0u8; 3 * MIB];
    db[MIB..MIB + 4096].copy_from_slice(&random_bytes(2, 4096));
    std::fs::write(&a, &da).unwrap();
    std::fs::write(&b, &db).unwrap();
    let (_agent, addr) = spawn_agent(dir.path(), &[("a", &a), ("b", &b)], &[]);
    let tls = client_tls(dir.path());
    let s = Session::connect(&addr, &tls).await.unwrap();
    let ids: Vec<_> = s.manifest().iter().map(|d| d.id.clone()).collect();
    assert_eq!(ids, ["a", "b"]);
    assert_eq!(s.manifest()[0].size, da.len() as u64);
    s.close().await;
    let ta = dir.path().join("ta.img");
    let r = sync_one(&addr, &tls, "a", &ta).await.unwrap();
    assert_eq!(std::fs::read(&ta).unwrap(), da);
    assert_eq!(
        r.disks[0].digest.as_deref(),
        Some(r.disks[0].agent_digest.as_str())
    );
    db[0] = 1; // make sure the agent reads the live file, not a cached copy
    std::fs::write(&b, &db).unwrap();
    let tb = dir.path().join("tb.img");
    sync_one(&addr, &tls, "b", &tb).await.unwrap();
    assert_eq!(std::fs::read(&tb).unwrap(), db);
}

#[test]
fn binary_usage_errors() {
    let out = Command::new(AGENT).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("serve") && text.contains("dev-certs"),
        "{text}"
    );
    let out = Command::new(AGENT)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args([
            "--disk", "nonsense", "--ca", "x", "--cert", "y", "--key", "z",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NAME=PATH"));
    let dir = tempfile::tempdir().unwrap();
    dev_certs(dir.path());
    let d = dir.path();
    let out = Command::new(AGENT)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--disk",
            "d=/nonexistent/disk.img",
        ])
        .arg("--ca")
        .arg(d.join("ca.pem"))
        .arg("--cert")
        .arg(d.join("agent.pem"))
        .arg("--key")
        .arg(d.join("agent-key.pem"))
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/disk.img"),
        "{out:?}"
    );
}

async fn in_process_agent(certs: &DevCerts, src: &Path, corrupt: u64) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let opts = ServeOptions {
        fault: Some(FaultInjection::corrupt(corrupt)),
        ..Default::default()
    };
    tokio::spawn(failback_agent::serve(
        listener,
        vec![SourceDisk::open("d", src).unwrap()],
        certs.server_tls(None).unwrap(),
        opts,
    ));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_blocks_in_transit_are_detected_and_fetched_again() {
    let dir = tempfile::tempdir().unwrap();
    let certs = DevCerts::generate("dev").unwrap();
    let src = dir.path().join("src.img");
    let data = random_bytes(5, 8 * MIB);
    std::fs::write(&src, &data).unwrap();
    let addr = in_process_agent(&certs, &src, 3).await;
    let dst = dir.path().join("dst.img");
    let r = sync_one(&addr, &certs.client_tls().unwrap(), "d", &dst)
        .await
        .unwrap();
    let d = &r.disks[0];
    assert_eq!(
        d.blocks_refetched, 3,
        "three corrupted blocks fetched again"
    );
    assert_eq!(d.blocks_differing, 128);
    assert_eq!(std::fs::read(&dst).unwrap(), data);
    assert_eq!(d.digest.as_deref(), Some(d.agent_digest.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_corrupted_every_time_is_a_verification_failure() {
    let dir = tempfile::tempdir().unwrap();
    let certs = DevCerts::generate("dev").unwrap();
    let src = dir.path().join("src.img");
    std::fs::write(&src, random_bytes(6, 2 * MIB)).unwrap();
    let addr = in_process_agent(&certs, &src, u64::MAX).await;
    let dst = dir.path().join("dst.img");
    std::fs::write(&dst, vec![0x5a; 2 * MIB]).unwrap();
    let e = sync_one(&addr, &certs.client_tls().unwrap(), "d", &dst)
        .await
        .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Verification, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("failed verification 4 times") && msg.contains("disk d"),
        "{msg}"
    );
    assert!(
        std::fs::read(&dst).unwrap().iter().all(|b| *b == 0x5a),
        "an unverified block was written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_fault_switch_corrupts_blocks_in_transit() {
    let dir = tempfile::tempdir().unwrap();
    dev_certs(dir.path());
    let src = dir.path().join("src.img");
    let data = random_bytes(7, 4 * MIB);
    std::fs::write(&src, &data).unwrap();
    let (_agent, addr) = spawn_agent(dir.path(), &[("d", &src)], &[(FaultInjection::ENV, "2")]);
    let dst = dir.path().join("dst.img");
    let r = sync_one(&addr, &client_tls(dir.path()), "d", &dst)
        .await
        .unwrap();
    assert_eq!(r.disks[0].blocks_refetched, 2);
    assert_eq!(std::fs::read(&dst).unwrap(), data);
}
