//! Attacks on the real `failback-agent` binary (issue 14, item 3) whose damage shows in the
//! process itself: it must not exit when it runs out of file descriptors, and its memory
//! (`RssAnon` in /proc/PID/status) must not grow with what a refused peer announces or with
//! the size of a range a client asks for again.

#[path = "../../replication/tests/common/raw.rs"]
mod raw;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use failback_replication::wire::{ErrorCode, Message};
use failback_replication::{ClientTls, Mapping, NoProgress, Session, SyncOptions};
use failback_tests::{random_bytes, KillOnDrop};
use raw::Raw;
use tokio::net::TcpStream;

const AGENT: &str = env!("CARGO_BIN_EXE_failback-agent");
const MIB: usize = 1024 * 1024;
const BS: u32 = 64 * 1024;

/// A running agent: the process, its address and its stderr lines.
struct Agent {
    child: KillOnDrop,
    addr: String,
    log: mpsc::Receiver<String>,
}

impl Agent {
    /// `failback-agent serve` on 127.0.0.1:0 with dev certificates from `dir`, disk `d`,
    /// `extra` arguments, and at most `nofile` open files when given.
    fn start(dir: &Path, disk: &Path, extra: &[&str], nofile: Option<u32>) -> Agent {
        let mut cmd = match nofile {
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(AGENT);
                c
            }
            None => Command::new(AGENT),
        };
        cmd.arg("serve").arg("--listen").arg("127.0.0.1:0");
        for (flag, file) in [("--ca", "ca.pem"), ("--cert", "agent.pem")] {
            cmd.arg(flag).arg(dir.join(file));
        }
        cmd.arg("--key").arg(dir.join("agent-key.pem"));
        cmd.arg("--disk").arg(format!("d={}", disk.display()));
        cmd.args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start failback-agent");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected agent output {line:?}"))
            .to_owned();
        Agent {
            child: KillOnDrop(child),
            addr,
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.0.id()
    }

    fn alive(&mut self) -> bool {
        self.child.0.try_wait().unwrap().is_none()
    }

    /// Waits (at most 20 s) for a log line containing `text`.
    fn wait_for_log(&self, text: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(text) => return line,
                Ok(_) => {}
                Err(e) => panic!("no agent log line with {text:?}: {e}"),
            }
        }
    }
}

/// Dev certificates (client for instance `dev`) and a random disk of `size` bytes.
fn setup(size: usize) -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(AGENT)
        .arg("dev-certs")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let disk = dir.path().join("src.img");
    let data = random_bytes(11, size);
    std::fs::write(&disk, &data).unwrap();
    (dir, disk, data)
}

fn client_tls(dir: &Path) -> ClientTls {
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    ClientTls::from_pem(
        &read("ca.pem"),
        &read("client.pem"),
        &read("client-key.pem"),
    )
    .unwrap()
}

/// Anonymous resident memory of process `pid`, in bytes.
fn rss_anon(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("RssAnon in /proc/PID/status");
    kb * 1024
}

/// Samples `pid`'s anonymous RSS every 2 ms until dropped; `peak()` is the largest seen.
struct Peak {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Peak {
    fn start(pid: u32) -> Peak {
        let peak = Arc::new(AtomicU64::new(rss_anon(pid)));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss_anon(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Peak { peak, stop }
    }
    fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for Peak {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

async fn sync_disk(addr: &str, tls: &ClientTls, local: &Path) {
    let s = Session::connect(addr, tls).await.expect("connect");
    let map = Mapping {
        remote: "d".into(),
        local: local.to_owned(),
    };
    s.sync(&[map], &SyncOptions::default(), Arc::new(NoProgress))
        .await
        .expect("legitimate sync");
    s.close().await;
}

/// Before: with its file descriptors used up by a plain TCP flood the agent exited ("Too many
/// open files"). Now it logs, backs off and goes on; once the flood ends a client syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_does_not_stop_the_agent() {
    let (dir, disk, data) = setup(4 * MIB);
    let mut agent = Agent::start(dir.path(), &disk, &[], Some(32));
    let mut flood = Vec::new();
    for _ in 0..100 {
        // Refused once the agent is gone (the old agent exited here).
        flood.extend(TcpStream::connect(&agent.addr).await.ok());
    }
    let line = agent.wait_for_log("Too many open files");
    assert!(agent.alive(), "agent exited after: {line}");
    drop(flood);
    let dst = dir.path().join("dst.img");
    sync_disk(&agent.addr, &client_tls(dir.path()), &dst).await;
    assert!(std::fs::read(&dst).unwrap() == data, "synced bytes differ");
    assert!(agent.alive(), "agent exited");
}

/// Before: each connection with another instance's certificate could announce a 16 MiB frame
/// and the agent reserved (and zeroed) 16 MiB for it before checking the instance: 40 such
/// connections took 640 MiB, and most stayed taken after they closed. Now the peer is refused
/// right after the handshake, naming its instance, and the agent's memory does not grow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_instance_peers_cannot_make_the_agent_reserve_memory() {
    let (dir, disk, _) = setup(MIB);
    let agent = Agent::start(dir.path(), &disk, &["--instance", "i-a"], None);
    let tls = client_tls(dir.path());
    let before = rss_anon(agent.pid());
    let peak = Peak::start(agent.pid());
    let mut conns = Vec::new();
    for _ in 0..40 {
        let raw = Raw::tls(&agent.addr, &tls).await.unwrap();
        let mut frame = (16u32 << 20).to_be_bytes().to_vec();
        frame.push(0x11);
        raw.send_bytes(frame).await;
        conns.push(raw);
    }
    let mut refusals = Vec::new();
    for raw in &mut conns {
        let read = tokio::time::timeout(Duration::from_secs(5), raw.reader.read()).await;
        refusals.push(match read {
            Ok(Ok(Some((Message::Error { code, message, .. }, _)))) => Some((code, message)),
            _ => None,
        });
    }
    let grew = peak.peak().saturating_sub(before);
    drop(conns);
    eprintln!(
        "refused peers: agent anonymous memory grew by {} MiB",
        grew >> 20
    );
    assert!(
        grew < 64 * MIB as u64,
        "agent memory grew by {} MiB for 40 refused peers",
        grew >> 20
    );
    for r in refusals {
        let (code, message) = r.expect("each peer is told why it is refused");
        assert_eq!(code, ErrorCode::NotAuthorized);
        assert!(
            message.contains("instance dev") && message.contains("i-a"),
            "{message}"
        );
    }
}

/// Before: a refetch of a whole disk read the range into one buffer (4 streams on a 64 MiB
/// disk: +256 MiB). Now it is read and sent in runs with a bounded amount in flight per
/// stream: the agent's memory grows by less than the disk's size for four such streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_disk_refetch_does_not_buffer_the_disk() {
    let size = 64 * MIB;
    let (dir, disk, _) = setup(size);
    let agent = Agent::start(dir.path(), &disk, &[], None);
    let (mut raw, _) = Raw::connect(&agent.addr, &client_tls(dir.path())).await;
    let nblocks = u32::try_from(size / BS as usize).unwrap();
    for stream in 1..=4 {
        raw.send(Message::SyncStart {
            stream,
            disk: "d".into(),
            block_size: BS,
            estimate: true,
            changes_since: None,
            compression: Default::default(),
        })
        .await;
        raw.send(Message::Hashes {
            stream,
            first_block: 0,
            hashes: vec![[0; 32]; nblocks as usize],
        })
        .await;
    }
    let mut windows = 0;
    let got = raw.until(|m| {
        windows += usize::from(matches!(m, Message::WindowDone { .. }));
        windows == 4
    });
    let got: Vec<_> = got
        .await
        .into_iter()
        // Protocol 4: a stream's SyncDone follows its last window (its digest is final then).
        .filter(|m| !matches!(m, Message::SyncPlan { .. } | Message::SyncDone { .. }))
        .collect();
    assert_eq!(
        got.len(),
        4,
        "four windows compared, nothing else (besides the plans and SyncDone): {got:?}"
    );
    let before = rss_anon(agent.pid());
    let peak = Peak::start(agent.pid());
    for stream in 1..=4 {
        raw.send(Message::Refetch {
            stream,
            first_block: 0,
            count: nblocks,
        })
        .await;
    }
    let mut blocks = 0u64;
    while blocks < 4 * u64::from(nblocks) {
        match raw.reader.read().await {
            Ok(Some((Message::Blocks { blocks: b, .. }, _))) => blocks += b.len() as u64,
            Ok(Some((Message::SyncDone { .. }, _))) => {}
            _ => break,
        }
    }
    let grew = peak.peak().saturating_sub(before);
    eprintln!("refetch: agent anonymous memory grew by {} MiB", grew >> 20);
    assert!(
        grew < size as u64,
        "agent memory grew by {} MiB refetching a 64 MiB disk on 4 streams",
        grew >> 20
    );
    assert_eq!(blocks, 4 * u64::from(nblocks), "every block sent again");
}
