//! `failback-server serve 2>&1 | head -0`: a closed stderr ends the server quietly with exit
//! 141 at its "listening on" line, no panic (exit 101 before `failback_config::stdio`).

use std::process::{Command, Stdio};

use failback_tests::{closed_pipe, BROKEN_PIPE_EXIT};

#[test]
fn closed_stderr_exits_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_failback-server"))
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "off")
        .stdout(Stdio::piped())
        .stderr(closed_pipe(dir.path()))
        .output()
        .unwrap();
    // stderr is gone, so a panic message could not be seen: the exit code tells (101 = panic).
    assert_eq!(
        o.status.code(),
        Some(BROKEN_PIPE_EXIT),
        "stdout: {}",
        String::from_utf8_lossy(&o.stdout)
    );
}
