//! `failback-client sync` as a process: --help, plan/--dry-run/--estimate, reports, JSON
//! progress, safety refusals and exit codes, against an in-process agent on 127.0.0.1:0.

mod common;

use std::process::Command;

use common::{text, Env, LoopDev, CLIENT, MIB};
use failback_replication::tls::DevCerts;

#[test]
fn help_and_usage_errors() {
    let o = Command::new(CLIENT).arg("--help").output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("sync"));
    let o = Command::new(CLIENT)
        .args(["sync", "--help"])
        .output()
        .unwrap();
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "--agent",
        "--map",
        "--dry-run",
        "--estimate",
        "--progress",
        "--report",
        "--bwlimit",
        "--block-size",
    ] {
        assert!(help.contains(flag), "sync --help lacks {flag}");
    }
    // No subcommand, missing flags, --estimate without --dry-run, bad block size: usage (2).
    for args in [
        vec![],
        vec!["sync", "--agent", "x"],
        vec![
            "sync",
            "--agent",
            "x",
            "--map",
            "a=b",
            "--ca",
            "c",
            "--cert",
            "c",
            "--key",
            "k",
            "--estimate",
        ],
        vec![
            "sync",
            "--agent",
            "x",
            "--map",
            "a=b",
            "--ca",
            "c",
            "--cert",
            "c",
            "--key",
            "k",
            "--block-size",
            "3K",
        ],
    ] {
        let o = Command::new(CLIENT).args(&args).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
    }
}

#[test]
fn sync_writes_target_report_and_json_progress() {
    let env = Env::new(None);
    let dst = env.path("dst.img");
    let report = env.path("report.json");
    let o = env.sync(
        &[("d", &dst)],
        &["--progress", "json", "--report", report.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(std::fs::read(&dst).unwrap(), env.data);
    // stdout is JSON lines only: plan, progress events, result.
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(kinds.first(), Some(&"plan"));
    assert!(kinds.contains(&"disk_started") && kinds.contains(&"disk_finished"));
    assert_eq!(kinds.last(), Some(&"result"));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let d = &r["disks"][0];
    assert_eq!(d["remote_id"], "d");
    assert_eq!(d["size"], 6 * MIB as u64);
    assert_eq!(
        d["blocks_differing"],
        96 - 16,
        "zero blocks are not fetched"
    );
    assert_eq!(d["digest"], d["agent_digest"]);
    assert_eq!(d["digest"].as_str().unwrap().len(), 64);

    // Plain mode prints per-disk bytes and matching digests on stdout; second run fetches 0.
    let o = env.sync(&[("d", &dst)], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("plan: agent"), "{out}");
    assert!(out.contains("0 of 96 blocks differed"), "{out}");
    assert!(out.contains("MATCH") && !out.contains("MISMATCH"), "{out}");
}

#[test]
fn dry_run_and_estimate_write_nothing() {
    let env = Env::new(None);
    let new = env.path("new.img");
    let o = env.sync(&[("d", &new)], &["--dry-run"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("d (src.img, 6.0 MiB") && out.contains("new.img"),
        "{out}"
    );
    assert!(
        out.contains("new image file") && out.contains("dry run"),
        "{out}"
    );
    assert!(!new.exists(), "dry run created the target");

    let stale = env.path("stale.img");
    let mut s = env.data.clone();
    s[4 * MIB..4 * MIB + 10].fill(1);
    std::fs::write(&stale, &s).unwrap();
    let o = env.sync(&[("d", &stale)], &["--dry-run", "--estimate"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("1 of 96 blocks differ, would fetch up to 64.0 KiB"),
        "{out}"
    );
    assert_eq!(
        std::fs::read(&stale).unwrap(),
        s,
        "estimate wrote to the target"
    );
}

#[test]
fn unsafe_targets_are_refused_with_the_rule() {
    let env = Env::new(None);
    let small = env.path("small.img");
    std::fs::write(&small, vec![7u8; MIB]).unwrap();
    let o = env.sync(&[("d", &small)], &[]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("rule too-small") && err.contains("small.img"),
        "{err}"
    );
    assert_eq!(std::fs::read(&small).unwrap(), vec![7u8; MIB]);

    // Block devices: a loop device with 4096-byte sectors (source has 512), and one too small.
    let big = LoopDev::new(&env.path("lo4k.img"), 8 * MIB, 4096);
    let o = env.sync(&[("d", &big.dev)], &[]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("rule sector-size"), "{err}");
    assert!(err.contains("4096") && err.contains("512"), "{err}");

    let tiny = LoopDev::new(&env.path("lotiny.img"), 2 * MIB, 512);
    let o = env.sync(&[("d", &tiny.dev)], &["--dry-run"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("rule too-small"));
    let backing = std::fs::read(env.path("lotiny.img")).unwrap();
    assert!(
        backing.iter().all(|b| *b == 0),
        "refused device was written"
    );

    // A suitable loop device is accepted and synced...
    let ok = LoopDev::new(&env.path("lo512.img"), 8 * MIB, 512);
    // ...but not while another program holds it exclusively (the kernel's EBUSY, as when
    // mounted): refused as unsafe, nothing written.
    {
        use std::os::unix::fs::OpenOptionsExt;
        let _held = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(&ok.dev)
            .unwrap();
        let o = env.sync(&[("d", &ok.dev)], &[]);
        assert_eq!(o.status.code(), Some(3), "{}", text(&o));
        assert!(String::from_utf8_lossy(&o.stderr).contains("busy"));
        let backing = std::fs::read(env.path("lo512.img")).unwrap();
        assert!(backing.iter().all(|b| *b == 0), "busy device was written");
    }
    let o = env.sync(&[("d", &ok.dev)], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let got = std::fs::read(env.path("lo512.img")).unwrap();
    assert_eq!(&got[..env.data.len()], &env.data[..]);
}

#[test]
fn network_tls_and_agent_errors_have_their_exit_codes() {
    let env = Env::new(Some("i-other"));
    let dst = env.path("dst.img");
    // Agent scoped to another instance: agent error (6), message names both instances.
    let o = env.sync(&[("d", &dst)], &[]);
    assert_eq!(o.status.code(), Some(6), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("instance dev") && err.contains("i-other"),
        "{err}"
    );
    assert!(!dst.exists());

    // Nothing listening: network (4).
    let mut c = Command::new(CLIENT);
    let o = c
        .args(["sync", "--agent", "127.0.0.1:1", "--map", "d=/tmp/x.img"])
        .arg("--ca")
        .arg(env.path("ca.pem"))
        .arg("--cert")
        .arg(env.path("client.pem"))
        .arg("--key")
        .arg(env.path("client-key.pem"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("127.0.0.1:1"));

    // A CA that did not sign the agent: network/TLS (4).
    let other = DevCerts::generate("x").unwrap();
    let other_ca = env.path("other-ca.pem");
    std::fs::write(&other_ca, other.ca).unwrap();
    let o = Command::new(CLIENT)
        .args(["sync", "--agent", &env.addr, "--map", "d=/tmp/x.img"])
        .arg("--ca")
        .arg(&other_ca)
        .arg("--cert")
        .arg(env.path("client.pem"))
        .arg("--key")
        .arg(env.path("client-key.pem"))
        .output()
        .unwrap();
    // A certificate problem is not retryable: agent error (6), naming the cause.
    assert_eq!(o.status.code(), Some(6), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not signed by the pinned CA"),
        "{}",
        text(&o)
    );

    // Missing certificate file: usage/config (2).
    let o = Command::new(CLIENT)
        .args(["sync", "--agent", &env.addr, "--map", "d=/tmp/x.img"])
        .args(["--ca", "/nonexistent/ca.pem", "--cert", "c", "--key", "k"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/ca.pem"));
}

#[test]
fn unknown_remote_disk_is_a_usage_error() {
    let env = Env::new(None);
    let o = env.sync(&[("nope", &env.path("x.img"))], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("serves no disk \"nope\""));
}
