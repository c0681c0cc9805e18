//! `failback version | head -0`: a closed stdout ends the admin CLI quietly with exit 141, no
//! panic (exit 101 before `failback_config::stdio`).

use std::process::{Command, Stdio};

use failback_tests::{closed_pipe, BROKEN_PIPE_EXIT};

#[test]
fn closed_stdout_exits_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_failback"))
        .arg("version")
        .stdout(closed_pipe(dir.path()))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(BROKEN_PIPE_EXIT), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
