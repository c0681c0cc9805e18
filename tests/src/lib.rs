//! Helpers for end-to-end tests that run the real binaries (server, agent, client), vcsim
//! and QEMU on 127.0.0.1.

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
