//! A real vcsim (govmomi's vCenter simulator, our launcher in `tests/vcsim`) per test, on
//! 127.0.0.1:0 with its datastores in a temporary directory; killed on drop.
//!
//! Process handling only, no vSphere types: the vcenter crate's own tests use it as a
//! dev-dependency (its library stays standalone) and each side builds its `Config` from
//! [`Vcsim::login`]. Binary: `$VCSIM_BIN`, else `target/vcsim/vcsim`, built with
//! `make target/vcsim/vcsim` if missing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

/// The workspace root (the parent of `tests/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A Go tool built by `make setup` (`target/vcsim/vcsim`, `target/hypervisor/hypervisor`),
/// relative to the workspace root; built here with `make REL` if missing.
pub fn go_tool(rel: &str) -> PathBuf {
    static BUILD: Mutex<()> = Mutex::new(());
    let root = workspace_root();
    let p = root.join(rel);
    let _g = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    if !p.exists() {
        let st = Command::new("make")
            .arg(rel)
            .current_dir(&root)
            .status()
            .unwrap_or_else(|e| {
                panic!("run make {rel} (needs golang-go and golang-github-vmware-govmomi-dev): {e}")
            });
        assert!(st.success() && p.exists(), "make {rel} failed");
    }
    p
}

/// The vcsim launcher: `$VCSIM_BIN`, else the workspace build.
pub fn vcsim_bin() -> PathBuf {
    std::env::var_os("VCSIM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| go_tool("target/vcsim/vcsim"))
}

/// A running vcsim. `env` holds the variables it wrote to `env_file` (`VCSIM_HOST`,
/// `VCSIM_PORT`, `VCSIM_USERNAME`, `VCSIM_PASSWORD`, `VCSIM_DATASTORE_<NAME>`); its datastore
/// directories live in `dir`.
#[derive(Debug)]
pub struct Vcsim {
    child: Child,
    pub env: HashMap<String, String>,
    pub env_file: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Vcsim {
    /// Starts vcsim with extra launcher flags (e.g. `-vm 2`, `-tools-running`) and waits up
    /// to 120 s for its env file.
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
        crate::wait_for_file(&env_file, &mut child, "vcsim");
        let env = std::fs::read_to_string(&env_file)
            .expect("read vcsim env file")
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Vcsim {
            child,
            env,
            env_file,
            dir,
        }
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

    /// URL, user name and password to log in with.
    pub fn login(&self) -> (String, &str, &str) {
        (
            self.url(),
            self.var("VCSIM_USERNAME"),
            self.var("VCSIM_PASSWORD"),
        )
    }

    /// Directory on disk behind a datastore (e.g. `LocalDS_0`).
    pub fn datastore_dir(&self, name: &str) -> PathBuf {
        PathBuf::from(self.var(&format!("VCSIM_DATASTORE_{}", name.to_uppercase())))
    }

    /// `[LocalDS_0] a/b.iso` -> the file on disk.
    pub fn ds_file(&self, ds_path: &str) -> Option<PathBuf> {
        let rest = ds_path.strip_prefix('[')?;
        let (ds, path) = rest.split_once(']')?;
        Some(self.datastore_dir(ds).join(path.trim_start()))
    }

    /// Environment for the `failback` CLI (DRSFA variable names), datastore `LocalDS_0`.
    pub fn cli_env(&self) -> Vec<(String, String)> {
        vec![
            ("VCENTER_HOST".into(), self.url()),
            ("VCENTER_USER".into(), self.var("VCSIM_USERNAME").into()),
            ("VCENTER_PASSWORD".into(), self.var("VCSIM_PASSWORD").into()),
            ("VCENTER_DATASTORE".into(), "LocalDS_0".into()),
            ("DISABLE_SSL_VERIFICATION".into(), "true".into()),
        ]
    }
}

impl Drop for Vcsim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
