//! Starts a real vcsim (govmomi's vCenter simulator, our launcher in tests/vcsim) per test,
//! on 127.0.0.1:0 with its datastores in a temporary directory.
//! Binary: $VCSIM_BIN, else <workspace>/target/vcsim/vcsim, built with `make target/vcsim/vcsim`
//! if missing.
#![allow(dead_code)]

use failback_vcenter::{Config, TlsMode};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static BUILD: Mutex<()> = Mutex::new(());

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crate dir has a parent")
        .to_path_buf()
}

/// The vcsim launcher binary, built on first use if missing.
pub fn vcsim_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("VCSIM_BIN") {
        return PathBuf::from(p);
    }
    let root = workspace_root();
    let bin = root.join("target/vcsim/vcsim");
    let _g = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    if !bin.exists() {
        let status = Command::new("make")
            .arg("target/vcsim/vcsim")
            .current_dir(&root)
            .status()
            .expect("run make target/vcsim/vcsim (needs golang-go and golang-github-vmware-govmomi-dev)");
        assert!(status.success(), "building vcsim failed");
        assert!(bin.exists(), "make did not produce {}", bin.display());
    }
    bin
}

/// A running vcsim. Killed on drop; its datastore directories live in `dir`.
pub struct Vcsim {
    child: Child,
    pub env: HashMap<String, String>,
    pub dir: tempfile::TempDir,
}

impl Vcsim {
    /// Starts vcsim with extra launcher flags (e.g. `-tools-running`).
    pub fn start(extra: &[&str]) -> Vcsim {
        let dir = tempfile::tempdir().expect("tempdir");
        let env_file = dir.path().join("vcsim.env");
        let mut child = Command::new(vcsim_bin())
            .args(["-l", "127.0.0.1:0", "-exit-on-eof", "-env-file"])
            .arg(&env_file)
            .args(extra)
            .env("TMPDIR", dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vcsim");
        let start = Instant::now();
        while !env_file.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                if let Some(mut s) = child.stderr.take() {
                    let _ = s.read_to_string(&mut err);
                }
                panic!("vcsim exited early ({status}): {err}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "vcsim did not write {} within 60 s",
                env_file.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let text = std::fs::read_to_string(&env_file).expect("read vcsim env file");
        let env = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Vcsim { child, env, dir }
    }

    pub fn var(&self, k: &str) -> &str {
        self.env
            .get(k)
            .unwrap_or_else(|| panic!("vcsim env has no {k}"))
    }

    /// `https://127.0.0.1:PORT/sdk`
    pub fn url(&self) -> String {
        format!(
            "https://{}:{}/sdk",
            self.var("VCSIM_HOST"),
            self.var("VCSIM_PORT")
        )
    }

    /// Settings for this simulator: its self-signed certificate is accepted explicitly.
    pub fn config(&self) -> Config {
        let mut c = Config::new(
            &self.url(),
            self.var("VCSIM_USERNAME"),
            self.var("VCSIM_PASSWORD"),
        );
        c.tls = TlsMode::Insecure;
        c.task_timeout = Duration::from_secs(120);
        c
    }

    /// Directory on disk behind a datastore (e.g. `LocalDS_0`).
    pub fn datastore_dir(&self, name: &str) -> PathBuf {
        PathBuf::from(self.var(&format!("VCSIM_DATASTORE_{}", name.to_uppercase())))
    }
}

impl Drop for Vcsim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
