//! `failback-server serve 2>&1 | head -0`: a closed stderr ends the server quietly with exit
//! 141 at its "listening on" line, no panic (exit 101 before `failback_config::stdio`).

use std::path::Path;
use std::process::{Command, Stdio};

/// Exit code of a program whose stdout/stderr reader has gone (128 + SIGPIPE).
const BROKEN_PIPE_EXIT: i32 = 141;

/// The writing end of a pipe whose reading end is already closed, as `| head -1` leaves it
/// once head has exited: every write fails with EPIPE. A FIFO opened for reading
/// (non-blocking), then for writing, then the reader closed, so there is no race with the
/// child's first write.
fn closed_pipe(dir: &Path) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    const O_NONBLOCK: i32 = 0o4000;
    let fifo = dir.join("fifo");
    let ok = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(ok.success(), "mkfifo {}", fifo.display());
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let writer = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    drop(reader);
    writer
}

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
