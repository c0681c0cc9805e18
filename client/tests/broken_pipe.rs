//! `failback-client run | head -1`: a closed stdout ends the client quietly with exit 141 at
//! its first console line, no panic (exit 101 before `failback_config::stdio`).

use std::process::{Command, Stdio};

use failback_tests::{closed_pipe, BROKEN_PIPE_EXIT};

#[test]
fn closed_stdout_exits_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let certs = failback_replication::tls::DevCerts::generate("dev").unwrap();
    certs.write_to(dir.path()).unwrap();
    // Port 1 on loopback: nothing listens; the first console line ("pairing with …") is
    // printed before the first request.
    let o = Command::new(env!("CARGO_BIN_EXE_failback-client"))
        .args([
            "run",
            "--server",
            "https://127.0.0.1:1",
            "--token",
            "t",
            "--ca",
        ])
        .arg(dir.path().join("ca.pem"))
        .args(["--retry-secs", "1", "--no-log-upload"])
        .stdout(closed_pipe(dir.path()))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(BROKEN_PIPE_EXIT), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
