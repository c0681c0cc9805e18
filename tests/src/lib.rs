//! Helpers for end-to-end tests that run the real binaries (server, agent, client), vcsim
//! and QEMU on 127.0.0.1.

pub mod pg;
pub mod testos;
pub mod vcsim;
pub mod wanlink;

/// Path of a workspace binary in `target/debug` (`make test` builds `--bins` before the
/// tests run). Panics with the build command if it is missing, so a test never skips silently.
pub fn bin(name: &str) -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let p = target.join("debug").join(name);
    assert!(
        p.exists(),
        "{} is not built: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

/// A free TCP port on 127.0.0.1 (bound and released; whoever listens there next gets it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port on 127.0.0.1")
}

/// Deterministic pseudo-random bytes (xorshift64*), so tests need no RNG crate: the same seed
/// gives the same bytes in every test crate.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Exit code, stdout and stderr of a finished process, for assertion messages.
pub fn output_text(o: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A child process killed (and reaped) on drop, so a failing test leaves nothing running.
#[derive(Debug)]
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits up to 120 s for `child` (a server starting up, named `what`) to write `path`;
/// panics with its stderr if it exits first.
pub fn wait_for_file(path: &std::path::Path, child: &mut std::process::Child, what: &str) {
    use std::io::Read;
    let start = std::time::Instant::now();
    while !path.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut s) = child.stderr.take() {
                let _ = s.read_to_string(&mut err);
            }
            panic!("{what} exited early ({st}): {err}");
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(120),
            "{what} did not write {} within 120 s",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Exit code of a program whose stdout/stderr reader has gone (128 + SIGPIPE).
pub const BROKEN_PIPE_EXIT: i32 = 141;

/// The writing end of a pipe whose reading end is already closed, as `| head -1` leaves it
/// once head has exited: every write fails with EPIPE. A FIFO opened for reading
/// (non-blocking), then for writing, then the reader closed, so there is no race with the
/// child's first write.
pub fn closed_pipe(dir: &std::path::Path) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    const O_NONBLOCK: i32 = 0o4000;
    let fifo = dir.join("fifo");
    let ok = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
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
