//! Shared helpers: real certificates (rcgen), sample disks, an in-process agent on 127.0.0.1:0.
#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use failback_replication::server::{ServeOptions, SourceDisk};
use failback_replication::tls::DevCerts;
use failback_replication::{ClientTls, Mapping, NoProgress, Session, SyncOptions, SyncReport};
use tokio::net::TcpListener;

pub use failback_tests::random_bytes;

/// A disk image shaped like a real one: random data, zero runs, repeated text.
pub fn make_disk(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    let mut data = random_bytes(seed, size);
    let mut off = 0usize;
    let mut i = 0u64;
    while off < size {
        let len = (1 << 16) * (1 + (i % 5) as usize);
        let end = (off + len).min(size);
        match i % 4 {
            1 => data[off..end].fill(0),
            3 => {
                let text = b"the quick brown fox jumps over the lazy failback disk. ";
                for (k, b) in data[off..end].iter_mut().enumerate() {
                    *b = text[k % text.len()];
                }
            }
            _ => {}
        }
        off = end + (1 << 16);
        i += 1;
    }
    std::fs::write(path, &data).unwrap();
    data
}

/// Overwrites `len` bytes at `offset` with fresh random data (in the file and in `data`).
pub fn scribble(path: &Path, data: &mut [u8], offset: usize, len: usize, seed: u64) {
    let new = random_bytes(seed, len);
    data[offset..offset + len].copy_from_slice(&new);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&new, offset as u64).unwrap();
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub certs: DevCerts,
}

impl Env {
    pub fn new() -> Self {
        Env {
            dir: tempfile::tempdir().unwrap(),
            certs: DevCerts::generate("dev").unwrap(),
        }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    pub fn client_tls(&self) -> ClientTls {
        self.certs.client_tls().unwrap()
    }
    /// Starts an in-process agent serving `disks` (id, path); returns its address.
    pub async fn agent(&self, disks: &[(&str, &Path)]) -> String {
        self.agent_with(disks, None, ServeOptions::default()).await
    }
    pub async fn agent_with(
        &self,
        disks: &[(&str, &Path)],
        instance: Option<&str>,
        opts: ServeOptions,
    ) -> String {
        let disks: Vec<SourceDisk> = disks
            .iter()
            .map(|(id, p)| SourceDisk::open(id, p).unwrap())
            .collect();
        let tls = self.certs.server_tls(instance.map(str::to_owned)).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(failback_replication::serve(listener, disks, tls, opts));
        addr
    }
}

pub fn opts() -> SyncOptions {
    SyncOptions::default()
}

/// Connects and syncs `maps` (remote id, local path) once.
pub async fn sync(
    addr: &str,
    tls: &ClientTls,
    maps: &[(&str, &Path)],
    opts: &SyncOptions,
) -> failback_replication::Result<SyncReport> {
    let session = Session::connect(addr, tls).await?;
    let mappings: Vec<Mapping> = maps
        .iter()
        .map(|(r, l)| Mapping {
            remote: r.to_string(),
            local: l.to_path_buf(),
        })
        .collect();
    let report = session.sync(&mappings, opts, Arc::new(NoProgress)).await;
    session.close().await;
    report
}

/// Asserts the target holds exactly `want` in its first `want.len()` bytes.
pub fn assert_same(target: &Path, want: &[u8]) {
    let got = std::fs::read(target).unwrap();
    assert!(
        got.len() >= want.len(),
        "target {} too short",
        target.display()
    );
    if got[..want.len()] != *want {
        let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
        panic!(
            "target {} differs from source at byte {first}",
            target.display()
        );
    }
}
