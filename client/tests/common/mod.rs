//! Shared by the `failback-client` CLI tests: certificates and an in-process agent on
//! 127.0.0.1:0 serving a 6 MiB source disk, a runner for `failback-client sync`, loop devices.
#![allow(dead_code)] // each test file uses a subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use failback_replication::server::{ServeOptions, SourceDisk};
use failback_replication::tls::DevCerts;

pub const CLIENT: &str = env!("CARGO_BIN_EXE_failback-client");
pub const MIB: usize = 1024 * 1024;

pub use failback_tests::{output_text as text, random_bytes};

/// Runs a command to completion and panics (with its output) unless it succeeds.
pub fn run(cmd: &mut Command) -> Output {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(o.status.success(), "{cmd:?} failed: {}", text(&o));
    o
}

pub struct Env {
    pub dir: tempfile::TempDir,
    _rt: tokio::runtime::Runtime,
    pub addr: String,
    pub data: Vec<u8>,
}

impl Env {
    /// Certificates in the temp dir, a 6 MiB source disk `d` (512-byte sectors, MiB 2..3
    /// zero), an agent scoped to `instance`.
    pub fn new(instance: Option<&str>) -> Self {
        let mut data = random_bytes(1, 6 * MIB);
        data[2 * MIB..3 * MIB].fill(0);
        Self::with_data(instance, data)
    }

    /// Like [`Env::new`] with the given source disk contents.
    pub fn with_data(instance: Option<&str>, data: Vec<u8>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let certs = DevCerts::generate("dev").unwrap();
        certs.write_to(dir.path()).unwrap();
        let src = dir.path().join("src.img");
        std::fs::write(&src, &data).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let tls = certs.server_tls(instance.map(str::to_owned)).unwrap();
        let addr = rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap().to_string();
            let disk = SourceDisk::open("d", &src).unwrap();
            tokio::spawn(failback_agent::serve(
                l,
                vec![disk],
                tls,
                ServeOptions::default(),
            ));
            addr
        });
        Env {
            dir,
            _rt: rt,
            addr,
            data,
        }
    }

    pub fn path(&self, n: &str) -> PathBuf {
        self.dir.path().join(n)
    }

    /// `failback-client sync` against this agent with `--map REMOTE=LOCAL` per entry of `maps`
    /// (`--progress plain` unless `extra` says otherwise).
    pub fn sync(&self, maps: &[(&str, &Path)], extra: &[&str]) -> Output {
        let mut c = Command::new(CLIENT);
        c.arg("sync")
            .arg("--agent")
            .arg(&self.addr)
            .arg("--ca")
            .arg(self.path("ca.pem"))
            .arg("--cert")
            .arg(self.path("client.pem"))
            .arg("--key")
            .arg(self.path("client-key.pem"));
        if !extra.contains(&"--progress") {
            c.args(["--progress", "plain"]);
        }
        for (r, l) in maps {
            c.arg("--map").arg(format!("{r}={}", l.display()));
        }
        c.args(extra);
        c.output().unwrap()
    }
}

/// A loop device over a sparse file, detached on drop.
pub struct LoopDev {
    pub dev: PathBuf,
}

impl LoopDev {
    pub fn new(backing: &Path, size: usize, sector: u32) -> Self {
        let f = std::fs::File::create(backing).unwrap();
        f.set_len(size as u64).unwrap();
        Self::attach(backing, &["--sector-size", &sector.to_string()])
    }

    /// `losetup --find --show EXTRA.. BACKING` on an existing file.
    pub fn attach(backing: &Path, extra: &[&str]) -> Self {
        let o = Command::new("losetup")
            .args(["--find", "--show"])
            .args(extra)
            .arg(backing)
            .output()
            .expect("losetup (util-linux) is needed");
        assert!(o.status.success(), "losetup failed: {}", text(&o));
        let dev = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        LoopDev { dev }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}
