//! Attacks on the agent (issue 14, item 3), each against a real agent on 127.0.0.1 with real
//! TLS: a peer without credentials, or with a certificate for another instance, or a client
//! that breaks the protocol's rules, must neither crash the agent nor starve other clients.
//! (Memory of a separate agent process is measured in the agent crate's `attacks` tests.)

mod common;
#[path = "common/raw.rs"]
mod raw;

use std::path::Path;
use std::time::Duration;

use common::{assert_same, make_disk, opts, sync, Env};
use failback_replication::server::{Limits, ServeOptions, SourceDisk};
use failback_replication::tls::DevCa;
use failback_replication::wire::{ErrorCode, Hash, Message, CONNECTION_STREAM};
use failback_replication::{ClientTls, Error, ServerTls, Session, TlsFiles};
use raw::Raw;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

const MIB: usize = 1024 * 1024;
const BS: u32 = 64 * 1024;

fn with_limits(f: impl FnOnce(&mut Limits)) -> ServeOptions {
    let mut o = ServeOptions::default();
    f(&mut o.limits);
    o
}

/// A 4 MiB disk `d` served with `opts`; returns the env, the agent address and the disk bytes.
async fn agent(opts: ServeOptions) -> (Env, String, Vec<u8>) {
    let env = Env::new();
    let src = env.path("src.img");
    let data = make_disk(&src, 4 * MIB, 1);
    let addr = env.agent_with(&[("d", &src)], None, opts).await;
    (env, addr, data)
}

/// A legitimate client syncs disk `d` completely.
async fn legit_sync(env: &Env, addr: &str, data: &[u8], name: &str) {
    let dst = env.path(name);
    sync(addr, &env.client_tls(), &[("d", &dst)], &opts())
        .await
        .expect("legitimate sync");
    assert_same(&dst, data);
}

/// Whether the agent closes `tcp` within `wait` (EOF or reset).
async fn closed_within(mut tcp: TcpStream, wait: Duration) -> bool {
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(wait, tcp.read(&mut b)).await,
        Ok(Ok(0) | Err(_))
    )
}

fn sync_start(stream: u32) -> Message {
    Message::SyncStart {
        stream,
        disk: "d".into(),
        block_size: BS,
        estimate: true,
        changes_since: None,
        compression: Default::default(),
    }
}

fn hashes(stream: u32, first_block: u64, n: usize) -> Message {
    Message::Hashes {
        stream,
        first_block,
        hashes: vec![[0u8; 32]; n],
    }
}

fn error_of(m: &Message) -> Option<(u32, ErrorCode, &str)> {
    match m {
        Message::Error {
            stream,
            code,
            message,
        } => Some((*stream, *code, message)),
        _ => None,
    }
}

/// Before: every connection got a task and a 30 s handshake, however many there were.
/// Now at most `max_unauthenticated` wait in the handshake; the rest are closed at once, and
/// once the flood ends a client syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excess_unauthenticated_connections_are_closed_at_once() {
    let o = with_limits(|l| {
        l.max_unauthenticated = 4;
        l.handshake_timeout = Duration::from_secs(60);
    });
    let (env, addr, data) = agent(o).await;
    let mut flood = Vec::new();
    for _ in 0..20 {
        flood.push(TcpStream::connect(&addr).await.unwrap());
    }
    let wait = Duration::from_secs(3);
    let closed = futures_closed(flood, wait).await;
    assert_eq!(
        closed, 16,
        "all but the 4 allowed in the handshake are closed"
    );
    legit_sync(&env, &addr, &data, "dst.img").await;
}

/// Reads every connection at once; counts those the agent closed within `wait`.
async fn futures_closed(conns: Vec<TcpStream>, wait: Duration) -> usize {
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|c| tokio::spawn(closed_within(c, wait)))
        .collect();
    let mut n = 0;
    for t in tasks {
        n += usize::from(t.await.unwrap());
    }
    n
}

/// The handshake timeout covers a peer that sends nothing at all and one that completes TLS
/// but never says hello (before: 30 s each, hard-coded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_timeout_closes_silent_peers() {
    let o = with_limits(|l| l.handshake_timeout = Duration::from_secs(1));
    let (env, addr, data) = agent(o).await;
    let silent = TcpStream::connect(&addr).await.unwrap();
    let mut no_hello = Raw::tls(&addr, &env.client_tls()).await.unwrap();
    assert!(closed_within(silent, Duration::from_secs(10)).await);
    let got = no_hello.until(|_| false).await;
    assert!(
        got.iter()
            .any(|m| error_of(m).is_some_and(|(_, _, t)| t.contains("hello"))),
        "{got:?}"
    );
    legit_sync(&env, &addr, &data, "dst.img").await;
}

/// An authorized client that goes quiet is closed after the idle timeout (before: never).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_authorized_connection_is_closed() {
    let o = with_limits(|l| l.idle_timeout = Duration::from_secs(1));
    let (env, addr, _) = agent(o).await;
    let (mut raw, _) = Raw::connect(&addr, &env.client_tls()).await;
    let got = raw.until(|_| false).await;
    let e = got.iter().find_map(error_of);
    assert!(
        e.is_some_and(|(s, _, t)| s == CONNECTION_STREAM && t.contains("idle connection")),
        "{got:?}"
    );
}

/// A frame longer than any client message is refused from its length prefix, before the agent
/// reserves memory for it (before: 16 MiB per frame, and the agent waited for the body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_is_refused_from_its_prefix() {
    let (env, addr, _) = agent(ServeOptions::default()).await;
    let (mut raw, _) = Raw::connect(&addr, &env.client_tls()).await;
    raw.send_bytes((16u32 << 20).to_be_bytes().to_vec()).await;
    let got = raw.until(|m| error_of(m).is_some()).await;
    let e = got.iter().find_map(error_of);
    assert!(
        e.is_some_and(|(_, _, t)| t.contains("16777216") && t.contains("exceeds")),
        "{got:?}"
    );
}

/// Compares all of disk `d` on `stream` (estimate: nothing sent back but `WindowDone`).
/// (Protocol 4: the whole disk compared, `SyncDone` follows the last `WindowDone` at once.)
async fn compare_all(raw: &mut Raw, stream: u32, nblocks: u64) {
    raw.send(sync_start(stream)).await;
    raw.send(hashes(stream, 0, usize::try_from(nblocks).unwrap()))
        .await;
    let got = raw
        .until(|m| matches!(m, Message::SyncDone { stream: s, .. } if *s == stream))
        .await;
    assert!(
        matches!(
            &got[got.len().saturating_sub(2)..],
            [Message::WindowDone { .. }, Message::SyncDone { blocks, .. }] if *blocks == nblocks
        ),
        "{got:?}"
    );
}

/// A `Refetch` whose range wraps past 2^64, or reaches past what was compared, is answered
/// with an error naming the disk and the range; the agent goes on serving (before: the worker
/// died on the overflow, or allocated 1.8e16 bytes in a release build and aborted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrapping_or_out_of_range_refetch_is_refused() {
    let (env, addr, data) = agent(ServeOptions::default()).await;
    let (mut raw, disks) = Raw::connect(&addr, &env.client_tls()).await;
    let nblocks = disks[0].size / u64::from(BS);
    let cases = [
        (1, u64::MAX - 1, 4, "beyond 2^64"),
        (2, 10, u32::MAX, "outside the 64 blocks compared"),
        (3, nblocks, 1, "outside the 64 blocks compared"),
    ];
    for (stream, first_block, count, want) in cases {
        compare_all(&mut raw, stream, nblocks).await;
        raw.send(Message::Refetch {
            stream,
            first_block,
            count,
        })
        .await;
        let got = raw.until(|m| error_of(m).is_some()).await;
        let (s, code, text) = got.iter().find_map(error_of).expect("an error");
        assert_eq!((s, code), (stream, ErrorCode::BadRequest), "{text}");
        assert!(
            text.contains("disk d") && text.contains(&format!("block {first_block}")),
            "{text}"
        );
        assert!(text.contains(want), "{text}");
    }
    legit_sync(&env, &addr, &data, "dst.img").await;
}

/// A whole-disk refetch comes back in runs of at most 4 MiB of payload (before: one frame of
/// the whole range, buffered whole, here larger than a frame may be).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_disk_refetch_comes_in_bounded_runs() {
    let env = Env::new();
    let src = env.path("src.img");
    let data = common::random_bytes(7, 24 * MIB);
    std::fs::write(&src, &data).unwrap();
    let addr = env.agent(&[("d", &src)]).await;
    let (mut raw, _) = Raw::connect(&addr, &env.client_tls()).await;
    let nblocks = 24 * MIB as u64 / u64::from(BS);
    compare_all(&mut raw, 1, nblocks).await;
    let count = u32::try_from(nblocks).unwrap();
    raw.send(Message::Refetch {
        stream: 1,
        first_block: 0,
        count,
    })
    .await;
    let mut next = 0u64;
    while next < nblocks {
        match raw.next().await {
            Some(Message::Blocks {
                first_block,
                blocks,
                ..
            }) => {
                assert_eq!(first_block, next, "runs in order");
                let payload: usize = blocks.iter().map(|b| b.payload.len()).sum();
                assert!(payload <= 4 * MIB, "a run of {payload} bytes");
                for (i, b) in blocks.iter().enumerate() {
                    let at = usize::try_from(first_block).unwrap() * BS as usize + i * BS as usize;
                    let want: Hash = *blake3::hash(&data[at..at + BS as usize]).as_bytes();
                    assert_eq!(b.hash, want, "block {}", first_block + i as u64);
                }
                next += blocks.len() as u64;
            }
            other => panic!("expected blocks from {next}, got {other:?}"),
        }
    }
    assert_eq!(next, nblocks);
}

/// One connection starting 200 syncs gets `limit` of them; the rest are refused with `Busy`
/// naming the limit, and a legitimate client on another connection still syncs (before: one
/// blocking thread per stream, up to tokio's 512, and other clients' syncs waited).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_flood_on_one_connection_is_refused() {
    let o = with_limits(|l| {
        l.max_streams_per_connection = 4;
        l.max_streams = 6;
    });
    let (env, addr, data) = agent(o).await;
    let (mut raw, _) = Raw::connect(&addr, &env.client_tls()).await;
    for stream in 1..=200 {
        raw.send(sync_start(stream)).await;
    }
    let busy = refused(&mut raw, 196).await;
    assert_eq!(busy, (5..=200).collect::<Vec<_>>(), "streams 5.. refused");
    legit_sync(&env, &addr, &data, "dst.img").await;
}

/// Collects `n` error frames; returns their streams, checking each is `Busy` naming a limit.
async fn refused(raw: &mut Raw, n: usize) -> Vec<u32> {
    let mut streams = Vec::new();
    while streams.len() < n {
        let m = raw.next().await.expect("connection open");
        if matches!(m, Message::SyncPlan { .. }) {
            continue; // an accepted stream's plan
        }
        let (s, code, text) = error_of(&m).unwrap_or_else(|| panic!("{m:?}"));
        assert_eq!(code, ErrorCode::Busy, "{text}");
        assert!(text.contains("limit max-streams"), "{text}");
        streams.push(s);
    }
    streams
}

/// The agent-wide limit holds over connections, and a closed connection's syncs free their
/// slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_wide_stream_limit_and_release() {
    let o = with_limits(|l| {
        l.max_streams_per_connection = 4;
        l.max_streams = 6;
    });
    let (env, addr, data) = agent(o).await;
    let tls = env.client_tls();
    let (a, _) = Raw::connect(&addr, &tls).await;
    for stream in 1..=4 {
        a.send(sync_start(stream)).await;
    }
    let (mut b, disks) = Raw::connect(&addr, &tls).await;
    for stream in 1..=4 {
        b.send(sync_start(stream)).await;
    }
    let m = loop {
        let m = b.next().await.unwrap();
        if !matches!(m, Message::SyncPlan { .. }) {
            break m; // skipped: an accepted stream's plan
        }
    };
    let (s, code, text) = error_of(&m).unwrap_or_else(|| panic!("{m:?}"));
    assert_eq!((s, code), (3, ErrorCode::Busy));
    assert!(text.contains("limit max-streams 6"), "{text}");
    assert_eq!(refused(&mut b, 1).await, [4]);
    // b's two streams work; a's close frees four slots for a new connection.
    let nblocks = disks[0].size / u64::from(BS);
    b.send(hashes(1, 0, usize::try_from(nblocks).unwrap()))
        .await;
    b.send(Message::SyncEnd { stream: 1 }).await;
    let got = b.until(|m| matches!(m, Message::SyncDone { .. })).await;
    assert!(
        matches!(got.last(), Some(Message::SyncDone { stream: 1, .. })),
        "{got:?}"
    );
    drop(a);
    legit_sync(&env, &addr, &data, "dst.img").await;
}

/// An agent for instance `i-a` and a client with a certificate for `i-b` from the same CA.
async fn scoped_agent(dir: &Path, src: &Path) -> (String, ClientTls) {
    let ca = DevCa::generate("attack CA").unwrap();
    let (cert, key) = ca.issue_agent("i-a", &[]).unwrap();
    let tls = ServerTls::from_pem(
        ca.cert_pem().as_bytes(),
        cert.as_bytes(),
        key.as_bytes(),
        Some("i-a".into()),
    )
    .unwrap();
    // A client of instance i-b that expects the agent of i-a (`sync --instance i-a`).
    let (c, k) = ca.issue_client("i-b").unwrap();
    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("client-b.pem"),
        key: dir.join("client-b-key.pem"),
    };
    std::fs::write(&files.ca, ca.cert_pem()).unwrap();
    std::fs::write(&files.cert, c).unwrap();
    std::fs::write(&files.key, k).unwrap();
    let client = ClientTls::from_files_for(&files, Some("i-a".into())).unwrap();
    let disks = vec![SourceDisk::open("d", src).unwrap()];
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(failback_replication::serve(
        listener,
        disks,
        tls,
        ServeOptions::default(),
    ));
    (addr, client)
}

/// Another instance's certificate is refused right after the TLS handshake, naming both
/// instances, before any frame is read: a 16 MiB length prefix in place of the hello gets the
/// refusal at once (before: the agent reserved 16 MiB for it and waited for its body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_instance_is_refused_before_any_frame() {
    let env = Env::new();
    let src = env.path("src.img");
    make_disk(&src, MIB, 3);
    let (addr, other) = scoped_agent(env.dir.path(), &src).await;
    match Session::connect(&addr, &other).await {
        Err(Error::Remote { code, message, .. }) => {
            assert_eq!(code, ErrorCode::NotAuthorized);
            assert!(
                message.contains("instance i-b") && message.contains("instance i-a"),
                "{message}"
            );
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    let mut raw = Raw::tls(&addr, &other).await.unwrap();
    raw.send_bytes((16u32 << 20).to_be_bytes().to_vec()).await;
    let got = raw.until(|m| error_of(m).is_some()).await;
    let e = got.iter().find_map(error_of);
    assert!(
        e.is_some_and(|(_, c, t)| c == ErrorCode::NotAuthorized && t.contains("i-b")),
        "{got:?}"
    );
}

fn sync_resume(stream: u32, offset: u64, cut: Option<failback_replication::cbt::Token>) -> Message {
    Message::SyncResume {
        stream,
        disk: "d".into(),
        block_size: BS,
        compression: Default::default(),
        offset,
        cut,
    }
}

/// `SyncResume` offsets are hostile input: zero, unaligned, at or past the disk's end, or near
/// 2^64 each get a `BadRequest` on their stream (nothing is allocated from them) and the
/// connection goes on; a legitimate sync follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_resume_offsets_are_checked() {
    let (env, addr, data) = agent(ServeOptions::default()).await;
    let (mut raw, _) = Raw::connect(&addr, &env.client_tls()).await;
    let bs = u64::from(BS);
    let bad = [0, 100, bs + 1, 4 * MIB as u64, u64::MAX - (bs - 1)];
    for (i, offset) in bad.into_iter().enumerate() {
        let stream = u32::try_from(i).unwrap() + 1;
        raw.send(sync_resume(stream, offset, None)).await;
        let m = raw.next().await.expect("an answer");
        let (s, code, message) = error_of(&m).unwrap_or_else(|| panic!("offset {offset}: {m:?}"));
        assert_eq!(
            (s, code),
            (stream, ErrorCode::BadRequest),
            "offset {offset}: {message}"
        );
        assert!(message.contains(&offset.to_string()), "{message}");
    }
    // A good offset on an untracked disk: a hash-compare plan without a token.
    raw.send(sync_resume(9, 2 * bs, None)).await;
    let m = raw.next().await.expect("a plan");
    assert!(
        matches!(&m, Message::SyncPlan { stream: 9, changes: false, token: None, note, .. } if note.contains("resumed at byte 131072")),
        "{m:?}"
    );
    drop(raw);
    legit_sync(&env, &addr, &data, "dst.img").await;
}

/// On a tracked disk a resume is accepted only under the agent's last cut: after another
/// round took a cut (writes to the prefix since the interrupted round's cut would be owed to
/// the wrong round), or with a cut of another tracking session, it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_resume_needs_the_last_cut_of_a_tracked_disk() {
    let env = Env::new();
    let src = env.path("src.img");
    make_disk(&src, 4 * MIB, 1);
    let mut disk = SourceDisk::open("d", &src).unwrap();
    let map = std::sync::Arc::new(failback_replication::cbt::DirtyMap::new(4 * MIB as u64));
    disk.set_tracking(Some(map), "on");
    let certs = failback_replication::tls::DevCerts::generate("dev").unwrap();
    let client_tls = certs.client_tls().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let tls = certs.server_tls(None).unwrap();
    tokio::spawn(failback_replication::serve(
        listener,
        vec![disk],
        tls,
        ServeOptions::default(),
    ));
    let (mut raw, _) = Raw::connect(&addr, &client_tls).await;
    let start = |stream| Message::SyncStart {
        stream,
        disk: "d".into(),
        block_size: BS,
        estimate: false,
        changes_since: None,
        compression: Default::default(),
    };
    let token_of = |m: &Message| match m {
        Message::SyncPlan { token, .. } => *token,
        other => panic!("expected a plan, got {other:?}"),
    };
    raw.send(start(1)).await;
    let cut1 = token_of(&raw.next().await.unwrap()).expect("a tracked round has a cut");
    let bs = u64::from(BS);
    raw.send(sync_resume(2, bs, Some(cut1))).await;
    let m = raw.next().await.unwrap();
    assert_eq!(
        token_of(&m),
        Some(cut1),
        "a resume runs under the interrupted cut"
    );
    let foreign = failback_replication::cbt::Token {
        session: cut1.session ^ 1,
        cut: cut1.cut,
    };
    raw.send(sync_resume(3, bs, Some(foreign))).await;
    let m = raw.next().await.unwrap();
    assert_eq!(
        error_of(&m).map(|e| e.1),
        Some(ErrorCode::ResumeRefused),
        "{m:?}"
    );
    raw.send(sync_resume(4, bs, None)).await;
    let m = raw.next().await.unwrap();
    assert_eq!(
        error_of(&m).map(|e| e.1),
        Some(ErrorCode::ResumeRefused),
        "{m:?}"
    );
    // Another round takes a cut: the first round's cut is no longer the last.
    raw.send(start(5)).await;
    let cut2 = token_of(&raw.next().await.unwrap()).unwrap();
    assert_ne!(cut1, cut2);
    raw.send(sync_resume(6, bs, Some(cut1))).await;
    let m = raw.next().await.unwrap();
    let (_, code, message) = error_of(&m).unwrap_or_else(|| panic!("{m:?}"));
    assert_eq!(code, ErrorCode::ResumeRefused, "{message}");
    assert!(message.contains("no longer this agent's last"), "{message}");
}
