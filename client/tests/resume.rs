//! A dropped connection costs only what was in flight: `failback-client sync --reconnect`
//! through the WAN link emulator, which cuts every connection once a given share of a full
//! sync's bytes has reached the client. The round resumes from the verified and written prefix:
//! the bytes delivered after the cut stay within what was still unsent plus one hash window
//! (a restart from 0 would move the whole disk again), and the target equals the source.

mod common;

use std::sync::Arc;

use common::{random_bytes, text, Env, MIB};
use failback_tests::wanlink::{self, Link, LinkSpec};

/// Disk size: 6 hash windows of 16 MiB.
const SIZE: usize = 96 * MIB;
/// One hash window of disk data (the client's `WINDOW_BYTES`): at most this much of what had
/// arrived before the cut is sent again.
const WINDOW: u64 = 16 * MIB as u64;
/// Frames, plans and handshakes of the new connection.
const SLACK: u64 = MIB as u64;

/// Serves `link` in front of the agent on `rt`; returns the address clients use.
fn link_in_front(rt: &tokio::runtime::Runtime, agent: &str, link: Arc<Link>) -> String {
    let upstream = agent.parse().unwrap();
    rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(wanlink::serve(l, upstream, link));
        addr
    })
}

#[test]
fn a_cut_connection_resumes_from_the_verified_prefix() {
    // Random data: nothing compresses, so wire bytes track disk bytes.
    let mut env = Env::with_data(None, random_bytes(20, SIZE));
    let agent = env.addr.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let spec = LinkSpec::new(2, 4000).unwrap();

    // The whole sync, uncut: what a full sync delivers.
    let link = Link::new(spec);
    env.addr = link_in_front(&rt, &agent, link.clone());
    let full_dst = env.path("full.img");
    let o = env.sync(&[("d", &full_dst)], &["--compression", "none"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let full = link.delivered();
    assert!(
        full >= SIZE as u64,
        "a full sync delivered only {full} bytes"
    );
    std::fs::remove_file(&full_dst).unwrap();

    for share in [50u64, 90] {
        let link = Link::new(spec);
        env.addr = link_in_front(&rt, &agent, link.clone());
        let cut = full * share / 100;
        link.cut_at(cut);
        let dst = env.path(&format!("dst{share}.img"));
        let report = env.path(&format!("report{share}.json"));
        let o = env.sync(
            &[("d", &dst)],
            &[
                "--compression",
                "none",
                "--reconnect",
                "2",
                "--report",
                report.to_str().unwrap(),
            ],
        );
        let out = text(&o);
        assert_eq!(o.status.code(), Some(0), "cut at {share} %: {out}");
        assert!(
            out.contains("round interrupted") && out.contains("resuming"),
            "cut at {share} %: the round was not interrupted and resumed: {out}"
        );
        assert!(
            std::fs::read(&dst).unwrap() == env.data,
            "cut at {share} %: target differs from the source"
        );

        let after = link.delivered() - cut;
        let bound = (full - cut) + WINDOW + SLACK;
        eprintln!(
            "cut at {share} % ({cut} of {full} bytes): {after} bytes after the cut (bound {bound})"
        );
        assert!(
            after <= bound,
            "cut at {share} % ({cut} of {full} bytes): {after} bytes moved after the cut, more \
             than the unsent {} + one window {WINDOW} + {SLACK}",
            full - cut
        );

        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        let d = &r["disks"][0];
        assert_eq!(d["digest"], d["agent_digest"], "cut at {share} %");
        // The round trip is measured at the handshake, through the link's 2 ms, and sizes the
        // windows in flight (2 ms needs fewer than the floor of 8).
        let rtt = d["wire"]["rtt_ms"].as_f64().expect("rtt_ms in the report");
        assert!(
            (2.0..1000.0).contains(&rtt),
            "cut at {share} %: RTT {rtt} ms"
        );
        assert_eq!(d["wire"]["windows_ahead"], 8, "cut at {share} %: {d}");
        let resumed_at = d["resumed_at"].as_u64().expect("resumed_at in the report");
        // The verified prefix reaches the last window completed before the cut.
        let cut_data = cut * SIZE as u64 / full;
        assert!(
            resumed_at > 0 && resumed_at + WINDOW + SLACK >= cut_data,
            "cut at {share} % (~{cut_data} bytes of disk): resumed at byte {resumed_at}"
        );
        assert!(
            d["target_read"] == true && d["blocks_total"].as_u64() == Some((SIZE / 65536) as u64),
            "{d}"
        );
        std::fs::remove_file(&dst).unwrap();
    }
}

/// On an agent that tracks changes, a resumed round runs under the interrupted round's cut:
/// a write to the already verified prefix while the connection is down is not compared by the
/// resumed round, and the next round (a changes round from that cut) brings it.
#[test]
fn a_write_to_the_prefix_while_cut_arrives_with_the_next_round() {
    use failback_replication::cbt::DirtyMap;
    use failback_replication::server::{ServeOptions, SourceDisk};
    use failback_replication::tls::DevCerts;
    use failback_replication::{HashCache, Mapping, NoProgress, Session, SyncOptions};
    use std::os::unix::fs::FileExt;

    const SIZE: usize = 48 * MIB; // three hash windows
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let dst = dir.path().join("dst.img");
    let mut data = random_bytes(21, SIZE);
    std::fs::write(&src, &data).unwrap();
    let certs = DevCerts::generate("dev").unwrap();
    let map = Arc::new(DirtyMap::new(SIZE as u64));
    let mut disk = SourceDisk::open("d", &src).unwrap();
    disk.set_tracking(Some(map.clone()), "on");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let tls = certs.server_tls(None).unwrap();
    let agent = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(failback_replication::serve(
            l,
            vec![disk],
            tls,
            ServeOptions::default(),
        ));
        addr
    });
    let link = Link::new(LinkSpec::new(2, 4000).unwrap());
    let addr = link_in_front(&rt, &agent, link.clone());
    let client = certs.client_tls().unwrap();
    let maps = [Mapping {
        remote: "d".into(),
        local: dst.clone(),
    }];
    let opts = SyncOptions {
        compression: failback_replication::wire::Compression::None,
        ..SyncOptions::default()
    };
    let cache = Arc::new(HashCache::default());
    let round = |cache: &Arc<HashCache>| {
        rt.block_on(async {
            // Like the client's reconnect pause: the agent's worker of the cut connection
            // keeps its hashes of the prefix once it sees the connection gone.
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            let s = Session::connect(&addr, &client).await.unwrap();
            s.sync_cached(&maps, &opts, Arc::new(NoProgress), cache)
                .await
        })
    };

    // Round 1, cut at ~70 %: two windows verified and written.
    link.cut_at(SIZE as u64 * 7 / 10);
    let e = round(&cache).expect_err("the cut must interrupt the round");
    assert!(e.is_retryable(), "{e}");
    let points = cache.resume_points();
    assert_eq!(points.len(), 1, "{points:?}");
    let prefix = points[0].1;
    assert!(prefix >= 16 * MIB as u64, "resume point {prefix}");

    // While the connection is down the source changes inside the verified prefix.
    let at = 3 * MIB + 4096;
    data[at..at + 8192].fill(0x5a);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&src)
        .unwrap()
        .write_all_at(&data[at..at + 8192], at as u64)
        .unwrap();
    map.mark(at as u64, 8192);

    // The resumed round compares only from the prefix on: the change is not in it yet.
    let r = round(&cache).expect("resumed round");
    let d = &r.disks[0];
    assert_eq!(d.resumed_at, prefix, "{d:?}");
    assert!(
        d.bytes_on_wire < (SIZE as u64 - prefix) + 17 * MIB as u64,
        "resumed round moved {} bytes",
        d.bytes_on_wire
    );
    let target = std::fs::read(&dst).unwrap();
    assert_ne!(
        target[at..at + 8192],
        data[at..at + 8192],
        "the resumed round re-compared the prefix"
    );

    // The next round asks for the changes since the interrupted round's cut: it brings it.
    let r = round(&cache).expect("next round");
    let d = &r.disks[0];
    assert_eq!(d.round_kind, "changes", "{d:?}");
    assert!(d.blocks_differing >= 1, "{d:?}");
    assert!(
        std::fs::read(&dst).unwrap() == data,
        "target differs from the source after the changes round"
    );
}

/// After an appliance reboot: the checkpoint taken at the cut (to be stored at the DR service)
/// is checked against the target and the round resumes from it, fetching again only the
/// first MiB the writer had held back (it was never on the disk); a target whose sampled
/// blocks changed is refused, with the reason.
#[test]
fn a_checkpoint_resumes_after_a_restart_and_a_changed_target_is_refused() {
    use failback_replication::checkpoint::Checkpoint;
    use failback_replication::client::WINDOW_BYTES;
    use failback_replication::server::{ServeOptions, SourceDisk};
    use failback_replication::tls::DevCerts;
    use failback_replication::{HashCache, Mapping, NoProgress, Session, SyncOptions};
    use std::os::unix::fs::FileExt;

    const SIZE: usize = 48 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let dst = dir.path().join("dst.img");
    let data = random_bytes(22, SIZE);
    std::fs::write(&src, &data).unwrap();
    let certs = DevCerts::generate("dev").unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let tls = certs.server_tls(None).unwrap();
    let disk = SourceDisk::open("d", &src).unwrap();
    let agent = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(failback_replication::serve(
            l,
            vec![disk],
            tls,
            ServeOptions::default(),
        ));
        addr
    });
    let link = Link::new(LinkSpec::new(2, 4000).unwrap());
    let addr = link_in_front(&rt, &agent, link.clone());
    let client = certs.client_tls().unwrap();
    let maps = [Mapping {
        remote: "d".into(),
        local: dst.clone(),
    }];
    let opts = SyncOptions {
        compression: failback_replication::wire::Compression::None,
        ..SyncOptions::default()
    };
    let round = |cache: &Arc<HashCache>| {
        rt.block_on(async {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            let s = Session::connect(&addr, &client).await.unwrap();
            s.sync_cached(&maps, &opts, Arc::new(NoProgress), cache)
                .await
        })
    };

    link.cut_at(SIZE as u64 * 7 / 10);
    let cache = Arc::new(HashCache::default());
    round(&cache).expect_err("the cut must interrupt the round");
    let cps = cache.checkpoints(WINDOW_BYTES);
    assert_eq!(cps.len(), 1, "{cps:?}");
    // Through JSON, as stored at the service.
    let cp: Checkpoint = serde_json::from_str(&serde_json::to_string(&cps[0]).unwrap()).unwrap();
    assert!(cp.offset >= 16 * MIB as u64, "{cp:?}");
    let target = std::fs::read(&dst).unwrap();
    assert!(
        target[..MIB] != data[..MIB],
        "the first MiB is held back until a round commits"
    );

    // "Reboot": a new client process holds nothing but the checkpoint.
    let cache = Arc::new(HashCache::default());
    cache
        .restore(&cp)
        .expect("the checkpoint matches the target");
    let r = round(&cache).expect("round resumed from the checkpoint");
    let d = &r.disks[0];
    assert_eq!(d.resumed_at, cp.offset, "{d:?}");
    let unsent = SIZE as u64 - cp.offset;
    assert!(
        d.bytes_on_wire <= unsent + MIB as u64 + WINDOW_BYTES + MIB as u64,
        "resumed round moved {} bytes for {unsent} unsent",
        d.bytes_on_wire
    );
    assert!(
        std::fs::read(&dst).unwrap() == data,
        "target differs from the source after the resumed round"
    );

    // A target changed under a sampled block is refused.
    let f = std::fs::OpenOptions::new().write(true).open(&dst).unwrap();
    f.write_all_at(b"tampered", cp.offset - 4096).unwrap();
    let e = Arc::new(HashCache::default())
        .restore(&cp)
        .expect_err("a changed target must be refused");
    assert!(e.contains("changed since the checkpoint"), "{e}");
}
