//! Structure-aware fuzzing of the protocol state machines, over real mutual TLS on 127.0.0.1.
//!
//! - Agent: one in-process agent serves a small disk for the whole run; each case opens a TLS
//!   connection, says hello and sends an arbitrary sequence of well-formed client messages
//!   (right and wrong streams, disks, block sizes, windows, refetch ranges up to 2^64, commands,
//!   messages only an agent may send). Asserted: nothing in the process panics, every frame the
//!   agent sends decodes and is an agent-to-client message, the agent ends the connection
//!   within a bound once the client stops, and a legitimate client still connects after every
//!   case and still syncs the disk exactly at the end.
//! - Client: a TLS proxy between the real client and the real agent passes the agent's frames
//!   through a fuzzed script (drop, duplicate, mutate bytes, inject arbitrary messages or
//!   garbage). Asserted: no panic, the sync ends within a bound, and it either succeeds with a
//!   target identical to the source or fails leaving the target untouched (the disk is within
//!   the held-back head, so an unfinished sync writes nothing).
//!
//! proptest (see fuzz_wire.rs for why); `FAILBACK_FUZZ_CASES=N` sets the number of cases.

mod common;
mod fuzz_common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use failback_replication::conn::FrameReader;
use failback_replication::record::{self, TlsReader, TlsWriter};
use failback_replication::server::ServeOptions;
use failback_replication::tls::AGENT_SERVER_NAME;
use failback_replication::wire::{ErrorCode, Hash, Message, PROTOCOL_VERSION};
use failback_replication::{ClientTls, Error, Mapping, NoProgress, Session, SyncOptions};
use fuzz_common::{arb_message, arb_mutation, config, edgy_u32, edgy_u64, mutate, Mutation};
use proptest::prelude::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// Disk size: 96 blocks of 4 KiB plus a partial one, inside the writer's held-back head.
const DISK: usize = 96 * 4096 + 1000;
/// Bound on one case's connection (the agent and client answer in milliseconds here).
const CASE_TIMEOUT: Duration = Duration::from_secs(20);

/// The tampering proxy closes the client's connection when the agent sent nothing for this
/// long (an untampered sync of the test disk never pauses for more than milliseconds).
const IDLE_CUT: Duration = Duration::from_secs(1);

/// Panics anywhere in this test process (agent tasks and worker threads included).
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            prev(info);
        }));
    });
}

/// The tests of this file run one at a time: the panic count is process-wide.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// One agent (and its certificates and disk) shared by every case of a test.
struct World {
    _serial: std::sync::MutexGuard<'static, ()>,
    env: common::Env,
    rt: tokio::runtime::Runtime,
    addr: String,
    data: Vec<u8>,
}

impl World {
    fn new() -> Self {
        let serial = SERIAL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        count_panics();
        PANICS.store(0, Ordering::SeqCst);
        let env = common::Env::new();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let src = env.path("src.img");
        let data = common::make_disk(&src, DISK, 7);
        let addr = rt.block_on(env.agent_with(&[("d0", &src)], None, ServeOptions::default()));
        World {
            _serial: serial,
            env,
            rt,
            addr,
            data,
        }
    }

    /// A legitimate client still gets the hello and the manifest.
    fn check_agent_serves(&self) -> Result<(), TestCaseError> {
        let tls = self.env.client_tls();
        let s = self.rt.block_on(async {
            tokio::time::timeout(CASE_TIMEOUT, Session::connect(&self.addr, &tls)).await
        });
        let s = s
            .map_err(|_| TestCaseError::fail("legit client: connect timed out"))?
            .map_err(|e| TestCaseError::fail(format!("legit client refused: {e}")))?;
        prop_assert_eq!(s.manifest().len(), 1);
        self.rt.block_on(s.close());
        Ok(())
    }

    /// A legitimate client syncs the disk exactly.
    fn check_full_sync(&self, target: &Path) {
        let tls = self.env.client_tls();
        let maps = [("d0", target)];
        let opts = SyncOptions {
            block_size: 4096,
            ..SyncOptions::default()
        };
        self.rt
            .block_on(common::sync(&self.addr, &tls, &maps, &opts))
            .unwrap();
        common::assert_same(target, &self.data);
    }
}

fn no_panics() -> Result<(), TestCaseError> {
    let n = PANICS.load(Ordering::SeqCst);
    prop_assert_eq!(
        n,
        0,
        "{} panic(s) in the agent or client (see the output above)",
        n
    );
    Ok(())
}

async fn tls_connect(addr: &str, tls: &ClientTls) -> (TlsReader, TlsWriter) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(AGENT_SERVER_NAME).unwrap();
    record::connect(tcp, tls.config(), name).await.unwrap()
}

// ---------------------------------------------------------------------------------------------
// Agent: arbitrary client message sequences.

/// Messages a client may send, aimed at the agent's disk and streams, plus anything else.
fn client_message() -> impl Strategy<Value = Message> {
    let stream = || prop_oneof![4 => 0u32..3, 1 => edgy_u32()];
    let block = || prop_oneof![4 => 0u64..120, 1 => edgy_u64()];
    let disk = prop_oneof![
        4 => Just("d0".to_string()),
        1 => fuzz_common::arb_string(),
    ];
    let bs = prop_oneof![
        4 => Just(4096u32),
        2 => Just(65536u32),
        1 => edgy_u32(),
    ];
    let hash = prop_oneof![Just([0u8; 32]), any::<[u8; 32]>()];
    prop_oneof![
        6 => (stream(), disk, bs, any::<bool>()).prop_map(|(stream, disk, block_size, estimate)| {
            Message::SyncStart { stream, disk, block_size, estimate, changes_since: None, compression: Default::default() }
        }),
        6 => (stream(), block(), prop::collection::vec(hash, 0..130)).prop_map(
            |(stream, first_block, hashes)| Message::Hashes { stream, first_block, hashes }
        ),
        3 => (stream(), block(), prop_oneof![3 => 0u32..8, 1 => edgy_u32()]).prop_map(
            |(stream, first_block, count)| Message::Refetch { stream, first_block, count }
        ),
        3 => stream().prop_map(|stream| Message::SyncEnd { stream }),
        1 => Just(Message::Quiesce),
        1 => Just(Message::Thaw),
        1 => arb_message(),
    ]
}

/// Agent-to-client message kinds.
fn from_agent(m: &Message) -> bool {
    matches!(
        m,
        Message::AgentHello { .. }
            | Message::Manifest { .. }
            | Message::Blocks { .. }
            | Message::WindowDone { .. }
            | Message::SyncDone { .. }
            | Message::SyncPlan { .. }
            | Message::ChangesDone { .. }
            | Message::CommandDone { .. }
            | Message::Error { .. }
    )
}

/// Sends hello + `msgs` + `Quiesce`, and once the agent has answered that (so the handshake
/// and everything before it are done) or has closed, closes the sending side; then reads every
/// reply until the agent closes. (Closing the instant the handshake ends makes the agent's
/// handshake fail with "peer closed the connection during the TLS handshake": see the report.)
async fn drive_agent(addr: &str, tls: &ClientTls, msgs: &[Message]) -> Result<(), String> {
    let (r, mut w) = tls_connect(addr, tls).await;
    let (answered_tx, answered) = tokio::sync::oneshot::channel::<()>();
    let reader = tokio::spawn(async move {
        let mut answered_tx = Some(answered_tx);
        let mut reader = FrameReader::new(r, "agent");
        let mut got = Vec::new();
        loop {
            match reader.read().await {
                Ok(Some((m, _))) => {
                    let command_answer = matches!(
                        m,
                        Message::CommandDone { .. }
                            | Message::Error {
                                code: ErrorCode::CommandFailed,
                                ..
                            }
                    );
                    if command_answer {
                        answered_tx.take().map(|tx| tx.send(()));
                    }
                    got.push(m);
                }
                Ok(None) => return Ok(got),
                // The agent may close without close_notify after an error frame.
                Err(Error::ConnectionLost { .. }) => return Ok(got),
                Err(e) => return Err(format!("agent sent an undecodable frame: {e}")),
            }
        }
    });
    let mut bytes = Message::ClientHello {
        version: PROTOCOL_VERSION,
    }
    .encode();
    for m in msgs {
        m.encode_into(&mut bytes);
    }
    Message::Quiesce.encode_into(&mut bytes);
    // The agent may close first (after a protocol error); a failed write is fine then.
    let _ = w.write_all(&bytes).await;
    let _ = w.flush().await;
    // An error (sender dropped) means the reader ended: the agent closed.
    let _ = tokio::time::timeout(CASE_TIMEOUT, answered).await;
    let _ = w.shutdown().await;
    let got = match tokio::time::timeout(CASE_TIMEOUT, reader).await {
        Ok(joined) => joined.map_err(|e| e.to_string())??,
        Err(_) => {
            return Err(format!(
                "agent did not end the connection within {CASE_TIMEOUT:?}"
            ))
        }
    };
    if !matches!(got.first(), Some(Message::AgentHello { .. })) {
        return Err(format!(
            "first reply is not AgentHello: {:?}",
            got.first().map(Message::name)
        ));
    }
    for m in &got {
        if !from_agent(m) {
            return Err(format!("agent sent a client message: {}", m.name()));
        }
        if let Message::Error { message, .. } = m {
            if message.is_empty() {
                return Err("agent sent an error frame without a message".into());
            }
        }
    }
    Ok(())
}

#[test]
fn agent_survives_arbitrary_client_sequences() {
    let world = World::new();
    let tls = world.env.client_tls();
    let mut runner = proptest::test_runner::TestRunner::new(config(48));
    let result = runner.run(&prop::collection::vec(client_message(), 0..12), |msgs| {
        world
            .rt
            .block_on(drive_agent(&world.addr, &tls, &msgs))
            .map_err(TestCaseError::fail)?;
        no_panics()?;
        world.check_agent_serves()
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    world.check_full_sync(&world.env.path("after.img"));
    assert_eq!(PANICS.load(Ordering::SeqCst), 0);
}

/// Regressions for sequences the fuzzer found or that the issue names (each must end with an
/// error frame or a clean close, never a panic or an abort).
#[test]
fn agent_edge_sequences() {
    let world = World::new();
    let tls = world.env.client_tls();
    let start = Message::SyncStart {
        stream: 1,
        disk: "d0".into(),
        block_size: 4096,
        estimate: false,
        changes_since: None,
        compression: Default::default(),
    };
    let window = Message::Hashes {
        stream: 1,
        first_block: 0,
        hashes: vec![[0; 32]; 97],
    };
    let cases: Vec<(&str, Vec<Message>)> = vec![
        (
            "hashes beyond the disk",
            vec![
                start.clone(),
                Message::Hashes {
                    stream: 1,
                    first_block: u64::MAX,
                    hashes: vec![[0; 32]],
                },
            ],
        ),
        ("stream reuse", vec![start.clone(), start.clone()]),
        (
            "sync end before the last window",
            vec![start.clone(), Message::SyncEnd { stream: 1 }],
        ),
        (
            "whole disk, then end",
            vec![
                start.clone(),
                window.clone(),
                Message::SyncEnd { stream: 1 },
            ],
        ),
        (
            "agent messages from a client",
            vec![Message::SyncDone {
                stream: 1,
                blocks: 1,
                digest: [0; 32],
            }],
        ),
    ];
    for (what, msgs) in cases {
        if let Err(e) = world.rt.block_on(drive_agent(&world.addr, &tls, &msgs)) {
            panic!("{what}: {e}");
        }
        assert_eq!(PANICS.load(Ordering::SeqCst), 0, "{what}: panicked");
    }
    world.check_full_sync(&world.env.path("after.img"));
}

/// Issue 14: one `Refetch` whose range wraps past 2^64 aborted the agent, and a whole-disk
/// refetch was buffered in memory. Each must end with an error frame or a clean close, and the
/// agent must go on serving. (Fails until the agent checks refetch ranges: server.rs.)
#[test]
fn agent_refetch_ranges_are_checked() {
    let world = World::new();
    let tls = world.env.client_tls();
    let start = Message::SyncStart {
        stream: 1,
        disk: "d0".into(),
        block_size: 4096,
        estimate: false,
        changes_since: None,
        compression: Default::default(),
    };
    let window = Message::Hashes {
        stream: 1,
        first_block: 0,
        hashes: vec![[0; 32]; 97],
    };
    let cases: Vec<(&str, Vec<Message>)> = vec![
        (
            // Issue 14: one Refetch whose range wraps past 2^64 aborted the agent.
            "refetch wrapping past 2^64",
            vec![
                start.clone(),
                window.clone(),
                Message::Refetch {
                    stream: 1,
                    first_block: u64::MAX - 1,
                    count: 4,
                },
            ],
        ),
        (
            "refetch of the whole disk and beyond",
            vec![
                start.clone(),
                window.clone(),
                Message::Refetch {
                    stream: 1,
                    first_block: 0,
                    count: u32::MAX,
                },
            ],
        ),
    ];
    for (what, msgs) in cases {
        if let Err(e) = world.rt.block_on(drive_agent(&world.addr, &tls, &msgs)) {
            panic!("{what}: {e}");
        }
        assert_eq!(PANICS.load(Ordering::SeqCst), 0, "{what}: panicked");
    }
    world.check_full_sync(&world.env.path("after.img"));
}

// ---------------------------------------------------------------------------------------------
// Client: the real agent's replies, tampered with by a proxy.

/// What the proxy does with one frame from the agent.
#[derive(Debug, Clone)]
enum Tamper {
    Pass,
    /// The agent dies here: nothing more is sent and the connection is closed.
    Cut,
    Duplicate,
    /// Re-encode after byte mutations of the frame body (the length prefix is recomputed, so
    /// the client sees a well-delimited but wrong frame).
    Mutate(Vec<Mutation>),
    /// Send this message first, then the frame.
    Inject(Message),
    /// Send raw bytes first (likely breaking the framing).
    Garbage(Vec<u8>),
}

fn tamper() -> impl Strategy<Value = Tamper> {
    prop_oneof![
        6 => Just(Tamper::Pass),
        1 => Just(Tamper::Cut),
        1 => Just(Tamper::Duplicate),
        3 => prop::collection::vec(arb_mutation(), 1..3).prop_map(Tamper::Mutate),
        2 => arb_message().prop_map(Tamper::Inject),
        1 => prop::collection::vec(any::<u8>(), 1..16).prop_map(Tamper::Garbage),
    ]
}

fn tampered(frame: &Message, t: &Tamper) -> Vec<u8> {
    let enc = frame.encode();
    match t {
        Tamper::Pass => enc,
        Tamper::Cut => Vec::new(),
        Tamper::Duplicate => [enc.clone(), enc].concat(),
        Tamper::Mutate(muts) => {
            let mut body = enc[4..].to_vec();
            for m in muts {
                mutate(&mut body, m);
            }
            if body.is_empty() {
                return Vec::new();
            }
            let mut out = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
            out.extend_from_slice(&body);
            out
        }
        Tamper::Inject(m) => [m.encode(), enc].concat(),
        Tamper::Garbage(g) => [g.clone(), enc].concat(),
    }
}

/// Accepts one client on `listener`, connects to the agent, forwards the client's bytes as
/// they are and the agent's frames through `script` (then untouched).
async fn proxy(listener: TcpListener, world_addr: String, certs: ProxyCerts, script: Vec<Tamper>) {
    let Ok((tcp, _)) = listener.accept().await else {
        return;
    };
    let Ok((mut cr, mut cw, _)) = record::accept(tcp, certs.server).await else {
        return;
    };
    let (ar, mut aw) = tls_connect(&world_addr, &certs.client).await;
    let up = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut cr, &mut aw).await;
        let _ = aw.shutdown().await;
    });
    let mut reader = FrameReader::new(ar, "agent");
    let mut script = script.into_iter();
    // A tampered frame can leave the client waiting for something the agent already sent
    // (a stream id changed: the client drops the frame); the real client would wait out its
    // 300 s idle timeout. The proxy plays an agent that dies when idle instead.
    while let Ok(Ok(Some((m, _)))) = tokio::time::timeout(IDLE_CUT, reader.read()).await {
        let t = script.next().unwrap_or(Tamper::Pass);
        if matches!(t, Tamper::Cut) {
            break;
        }
        let bytes = tampered(&m, &t);
        if cw.write_all(&bytes).await.is_err() || cw.flush().await.is_err() {
            break;
        }
    }
    let _ = cw.shutdown().await;
    up.abort();
}

#[derive(Clone)]
struct ProxyCerts {
    server: Arc<rustls::ServerConfig>,
    client: ClientTls,
}

/// One tampered sync: `Ok(true)` synced exactly, `Ok(false)` failed cleanly.
fn tampered_sync(
    world: &World,
    certs: &ProxyCerts,
    script: Vec<Tamper>,
    case: usize,
) -> Result<bool, TestCaseError> {
    let target = world.env.path(&format!("t{case}.img"));
    let before = vec![0x5au8; DISK];
    std::fs::write(&target, &before).unwrap();
    let tls = world.env.client_tls();
    let res = world.rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let p = tokio::spawn(proxy(listener, world.addr.clone(), certs.clone(), script));
        let maps = [("d0", target.as_path())];
        let opts = SyncOptions {
            block_size: 4096,
            max_block_retries: 2,
            ..SyncOptions::default()
        };
        let r = tokio::time::timeout(CASE_TIMEOUT, async {
            let s = Session::connect(&addr, &tls).await?;
            let maps: Vec<Mapping> = maps
                .iter()
                .map(|(r, l)| Mapping {
                    remote: r.to_string(),
                    local: l.to_path_buf(),
                })
                .collect();
            let r = s.sync(&maps, &opts, Arc::new(NoProgress)).await;
            s.close().await;
            r
        })
        .await;
        p.abort();
        r
    });
    // Only the disk's own bytes: a tampered manifest may announce a larger disk, and the client
    // grows an image-file target to the size it is told (sparse) before the sync fails.
    let mut after = Vec::with_capacity(DISK);
    std::io::Read::read_to_end(
        &mut std::io::Read::take(std::fs::File::open(&target).unwrap(), DISK as u64),
        &mut after,
    )
    .unwrap();
    let _ = std::fs::remove_file(&target);
    match res {
        Err(_) => Err(TestCaseError::fail(format!(
            "client sync did not end within {CASE_TIMEOUT:?}"
        ))),
        Ok(Ok(_)) => {
            prop_assert!(
                after == world.data,
                "sync reported success but the target differs from the source"
            );
            Ok(true)
        }
        Ok(Err(e)) => {
            prop_assert!(after == before, "failed sync ({e}) changed the target");
            Ok(false)
        }
    }
}

#[test]
fn client_survives_tampered_agent_replies() {
    let world = World::new();
    let certs = ProxyCerts {
        server: world.env.certs.server_tls(None).unwrap().config(),
        client: world.env.client_tls(),
    };
    let mut runner = proptest::test_runner::TestRunner::new(config(40));
    let case = AtomicUsize::new(0);
    let (ok, failed) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let result = runner.run(&prop::collection::vec(tamper(), 0..10), |script| {
        let n = case.fetch_add(1, Ordering::Relaxed);
        match tampered_sync(&world, &certs, script, n)? {
            true => ok.fetch_add(1, Ordering::Relaxed),
            false => failed.fetch_add(1, Ordering::Relaxed),
        };
        no_panics()
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    eprintln!(
        "tampered syncs: {} exact, {} refused",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    // The untampered path works through the same proxy.
    assert!(tampered_sync(&world, &certs, Vec::new(), usize::MAX).unwrap());
}

/// A block index near 2^64 in an unasked-for `Blocks` frame is refused by name (the client
/// computed the block's byte offset for the message with an overflowing multiplication).
#[test]
fn client_refuses_unasked_block_near_u64_max() {
    let world = World::new();
    let certs = ProxyCerts {
        server: world.env.certs.server_tls(None).unwrap().config(),
        client: world.env.client_tls(),
    };
    let bad = Message::Blocks {
        stream: 1,
        first_block: u64::MAX - 1,
        blocks: vec![failback_replication::wire::WireBlock::new(
            failback_replication::wire::Encoding::Zero,
            Hash::default(),
            bytes::Bytes::new(),
        )],
    };
    // hello, manifest pass; the bad frame goes before the first reply of stream 1.
    let script = vec![Tamper::Pass, Tamper::Pass, Tamper::Inject(bad)];
    assert!(!tampered_sync(&world, &certs, script, 0).unwrap());
    assert_eq!(PANICS.load(Ordering::SeqCst), 0);
}

/// Regression (found by `client_survives_tampered_agent_replies`, replayed here): a second
/// `Manifest` ends the client's reader; a disk job that registered its stream just after that
/// was never served and waited for the 300 s idle timeout instead of failing at once.
#[test]
fn client_fails_fast_when_its_reader_died() {
    let world = World::new();
    let certs = ProxyCerts {
        server: world.env.certs.server_tls(None).unwrap().config(),
        client: world.env.client_tls(),
    };
    let script = vec![
        Tamper::Pass,
        Tamper::Duplicate,
        Tamper::Mutate(vec![Mutation::Word(
            fuzz_common::Pos(16495630727366045177),
            3765236255,
        )]),
        Tamper::Cut,
    ];
    let started = std::time::Instant::now();
    assert!(!tampered_sync(&world, &certs, script, 0).unwrap());
    assert!(started.elapsed() < CASE_TIMEOUT);
    assert_eq!(PANICS.load(Ordering::SeqCst), 0);
}
