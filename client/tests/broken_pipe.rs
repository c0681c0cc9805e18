//! `failback-client run | head -1`: a closed stdout ends the client quietly with exit 141 at
//! its first console line, no panic (exit 101 before `failback_config::stdio`).

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
