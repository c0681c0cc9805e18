//! Sync engine end to end: in-process agent on 127.0.0.1:0, real certificates, real files.

mod common;

use common::*;
use failback_replication::server::ServeOptions;
use failback_replication::{Mapping, NoProgress, Session, SyncOptions};
use std::sync::Arc;

const MIB: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_sync_then_delta_sync() {
    let env = Env::new();
    let src = env.path("src.img");
    let dst = env.path("dst.img");
    let mut data = make_disk(&src, 24 * MIB, 1);
    let addr = env.agent(&[("disk0", &src)]).await;
    let tls = env.client_tls();

    // Full sync into a target that does not exist yet.
    let r = sync(&addr, &tls, &[("disk0", &dst)], &opts())
        .await
        .unwrap();
    assert_same(&dst, &data);
    let d = &r.disks[0];
    assert_eq!(d.size, data.len() as u64);
    assert_eq!(d.blocks_total, 24 * 16);
    assert_eq!(d.digest.as_deref(), Some(d.agent_digest.as_str()));
    // Zero blocks are not fetched (the new file reads as zeros), everything else is.
    assert!(d.blocks_differing > 200 && d.blocks_differing < 24 * 16);
    let full_digest = d.agent_digest.clone();

    // Change three separate 64 KiB blocks and a range crossing a block boundary.
    scribble(&src, &mut data, 3 * 65536, 100, 10);
    scribble(&src, &mut data, 100 * 65536 + 5, 65536, 11); // touches blocks 100 and 101
    scribble(&src, &mut data, 300 * 65536, 65536, 12);
    let r = sync(&addr, &tls, &[("disk0", &dst)], &opts())
        .await
        .unwrap();
    assert_same(&dst, &data);
    let d = &r.disks[0];
    assert_eq!(d.blocks_differing, 4, "only the changed blocks are fetched");
    assert_eq!(d.bytes_differing, 4 * 65536);
    assert!(d.bytes_fetched <= 4 * 65536);
    assert_ne!(d.agent_digest, full_digest);
    assert_eq!(d.digest.as_deref(), Some(d.agent_digest.as_str()));

    // Nothing changed: nothing fetched.
    let r = sync(&addr, &tls, &[("disk0", &dst)], &opts())
        .await
        .unwrap();
    assert_eq!(r.disks[0].blocks_differing, 0);
    assert_eq!(r.disks[0].bytes_fetched, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_heavy_disk_travels_as_markers() {
    let env = Env::new();
    let src = env.path("src.img");
    let dst = env.path("dst.img");
    // 32 MiB of zeros with a little data; the stale target is full of random bytes.
    let mut data = vec![0u8; 32 * MIB];
    data[5 * MIB..5 * MIB + 1000].copy_from_slice(&random_bytes(3, 1000));
    std::fs::write(&src, &data).unwrap();
    std::fs::write(&dst, random_bytes(4, 32 * MIB)).unwrap();
    let addr = env.agent(&[("z", &src)]).await;
    let r = sync(&addr, &env.client_tls(), &[("z", &dst)], &opts())
        .await
        .unwrap();
    assert_same(&dst, &data);
    let d = &r.disks[0];
    assert_eq!(d.blocks_differing, 512);
    assert!(
        d.bytes_fetched < 70_000,
        "zero blocks must cost no payload, fetched {}",
        d.bytes_fetched
    );
    assert!(d.bytes_on_wire < 200_000, "wire bytes {}", d.bytes_on_wire);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_disks_at_once_with_odd_sizes() {
    let env = Env::new();
    let sizes = [5 * MIB + 1234, 3 * MIB, 17 * 4096 + 1];
    let mut datas = Vec::new();
    let mut srcs = Vec::new();
    let mut dsts = Vec::new();
    for (i, s) in sizes.iter().enumerate() {
        let src = env.path(&format!("src{i}.img"));
        datas.push(make_disk(&src, *s, 20 + i as u64));
        srcs.push(src);
        dsts.push(env.path(&format!("dst{i}.img")));
    }
    // One stale target already has part of the data.
    std::fs::write(&dsts[1], &datas[1][..MIB]).unwrap();
    let ids = ["a", "b", "c"];
    let disks: Vec<(&str, &std::path::Path)> = ids
        .iter()
        .zip(&srcs)
        .map(|(i, p)| (*i, p.as_path()))
        .collect();
    let addr = env.agent(&disks).await;
    let maps: Vec<(&str, &std::path::Path)> = ids
        .iter()
        .zip(&dsts)
        .map(|(i, p)| (*i, p.as_path()))
        .collect();
    for bs in [65536u32, 4096] {
        let o = SyncOptions {
            block_size: bs,
            ..opts()
        };
        let r = sync(&addr, &env.client_tls(), &maps, &o).await.unwrap();
        assert_eq!(r.disks.len(), 3);
        for (i, d) in r.disks.iter().enumerate() {
            assert_same(&dsts[i], &datas[i]);
            assert_eq!(d.remote_id, ids[i]);
            assert_eq!(d.size, sizes[i] as u64);
            assert_eq!(d.blocks_total, (sizes[i] as u64).div_ceil(u64::from(bs)));
            assert_eq!(d.digest.as_deref(), Some(d.agent_digest.as_str()));
            // The file is exactly the source size (extended, never padded past it).
            assert_eq!(std::fs::metadata(&dsts[i]).unwrap().len(), sizes[i] as u64);
        }
    }
}

/// Several hashing threads per target split each window between them: the hashes must come
/// out in block order, so exactly the changed blocks are fetched, across window and share
/// boundaries, in a short local target (its missing end hashes as zeros) and an odd tail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_hash_threads_find_exactly_the_changed_blocks() {
    let env = Env::new();
    let src = env.path("src.img");
    let dst = env.path("dst.img");
    let size = 45 * MIB + 12345;
    let mut data = make_disk(&src, size, 21);
    // The target holds the first 40 MiB.
    std::fs::write(&dst, &data[..40 * MIB]).unwrap();
    let addr = env.agent(&[("d", &src)]).await;
    // Blocks in window 0 (two shares), window 1 and window 2 (the 16 MiB windows).
    let changed = [0usize, 5 * MIB, 11 * MIB + 65536, 17 * MIB, 39 * MIB];
    for (i, at) in changed.iter().enumerate() {
        scribble(&src, &mut data, *at, 65536, 100 + i as u64);
    }
    let tail_blocks = (size - 40 * MIB).div_ceil(65536) as u64;
    for threads in [3usize, 2, 1] {
        let o = SyncOptions {
            hash_threads: Some(threads),
            ..opts()
        };
        let r = sync(&addr, &env.client_tls(), &[("d", &dst)], &o)
            .await
            .unwrap();
        let d = &r.disks[0];
        assert_same(&dst, &data);
        assert_eq!(d.digest.as_deref(), Some(d.agent_digest.as_str()));
        if threads == 3 {
            // Non-zero source blocks beyond the old local end differ too.
            let beyond = (40 * MIB..size)
                .step_by(65536)
                .filter(|&o| data[o..(o + 65536).min(size)].iter().any(|&b| b != 0))
                .count() as u64;
            assert!(beyond <= tail_blocks);
            assert_eq!(
                d.blocks_differing,
                changed.len() as u64 + beyond,
                "{threads} threads"
            );
        } else {
            assert_eq!(d.blocks_differing, 0, "{threads} threads: in sync");
        }
        // Change one block for the next round.
        scribble(&src, &mut data, 33 * MIB, 4096, 200 + threads as u64);
        let r2 = sync(&addr, &env.client_tls(), &[("d", &dst)], &o)
            .await
            .unwrap();
        assert_eq!(r2.disks[0].blocks_differing, 1, "{threads} threads");
        assert_same(&dst, &data);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn estimate_only_writes_nothing() {
    let env = Env::new();
    let src = env.path("src.img");
    let dst = env.path("dst.img");
    let mut data = make_disk(&src, 8 * MIB, 5);
    std::fs::write(&dst, &data).unwrap();
    scribble(&src, &mut data, 2 * MIB, 3 * 65536, 6);
    let before = std::fs::read(&dst).unwrap();
    let addr = env.agent(&[("d", &src)]).await;
    let o = SyncOptions {
        estimate_only: true,
        ..opts()
    };
    let r = sync(&addr, &env.client_tls(), &[("d", &dst)], &o)
        .await
        .unwrap();
    let d = &r.disks[0];
    assert!(d.estimate_only);
    assert_eq!(d.blocks_differing, 3);
    assert_eq!(d.bytes_differing, 3 * 65536);
    assert_eq!(d.bytes_fetched, 0);
    assert_eq!(d.digest, None);
    assert_eq!(
        std::fs::read(&dst).unwrap(),
        before,
        "estimate wrote to the target"
    );
    // A target that does not exist is estimated as empty and is not created.
    let missing = env.path("missing.img");
    let r = sync(&addr, &env.client_tls(), &[("d", &missing)], &o)
        .await
        .unwrap();
    assert!(r.disks[0].blocks_differing > 0);
    assert!(!missing.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_disk_and_bad_block_size_are_usage_errors() {
    let env = Env::new();
    let src = env.path("src.img");
    make_disk(&src, MIB, 7);
    let addr = env.agent(&[("d", &src)]).await;
    let s = Session::connect(&addr, &env.client_tls()).await.unwrap();
    assert_eq!(s.manifest().len(), 1);
    assert_eq!(s.manifest()[0].id, "d");
    assert_eq!(s.manifest()[0].size, MIB as u64);
    assert_eq!(s.manifest()[0].logical_sector_size, 512);
    assert_eq!(s.manifest()[0].device, "src.img");
    let m = |r: &str| {
        vec![Mapping {
            remote: r.into(),
            local: env.path("x.img"),
        }]
    };
    let e = s
        .sync(&m("nope"), &opts(), Arc::new(NoProgress))
        .await
        .unwrap_err();
    assert_eq!(e.class(), failback_replication::ErrorClass::Usage);
    assert!(e.to_string().contains("serves no disk \"nope\""), "{e}");
    let bad = SyncOptions {
        block_size: 3000,
        ..opts()
    };
    let e = s
        .sync(&m("d"), &bad, Arc::new(NoProgress))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("power of two"), "{e}");
    assert!(!env.path("x.img").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiesce_and_thaw_run_agent_commands() {
    let env = Env::new();
    let src = env.path("src.img");
    make_disk(&src, MIB, 8);
    let marker = env.path("frozen");
    // (`fault` exists only when the fault-injection feature is unified into this build.)
    #[allow(clippy::needless_update)]
    let o = ServeOptions {
        quiesce_cmd: Some(format!("touch {} && echo frozen", marker.display())),
        thaw_cmd: Some("echo thawed; exit 3".into()),
        ..Default::default()
    };
    let addr = env.agent_with(&[("d", &src)], None, o).await;
    let s = Session::connect(&addr, &env.client_tls()).await.unwrap();
    let msg = s.quiesce().await.unwrap();
    assert!(msg.contains("frozen"), "{msg}");
    assert!(marker.exists());
    let e = s.thaw().await.unwrap_err();
    assert!(e.to_string().contains("thawed"), "{e}");
    // The session is still usable after a failed command.
    let r = s
        .sync(
            &[Mapping {
                remote: "d".into(),
                local: env.path("t.img"),
            }],
            &opts(),
            Arc::new(NoProgress),
        )
        .await
        .unwrap();
    assert_eq!(
        r.disks[0].digest.as_deref(),
        Some(r.disks[0].agent_digest.as_str())
    );
}

/// A TCP proxy that counts the bytes it forwards in each direction (agent→client, client→agent).
async fn counting_proxy(
    agent: String,
) -> (
    String,
    Arc<std::sync::atomic::AtomicU64>,
    Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let (down, up) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let counters = (down.clone(), up.clone());
    tokio::spawn(async move {
        let (client, _) = l.accept().await.unwrap();
        let upstream = tokio::net::TcpStream::connect(&agent).await.unwrap();
        let (cr, cw) = client.into_split();
        let (ur, uw) = upstream.into_split();
        async fn pump(
            mut r: tokio::net::tcp::OwnedReadHalf,
            mut w: tokio::net::tcp::OwnedWriteHalf,
            n: Arc<AtomicU64>,
        ) {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(k) = r.read(&mut buf).await {
                if k == 0 || w.write_all(&buf[..k]).await.is_err() {
                    break;
                }
                n.fetch_add(k as u64, Ordering::SeqCst);
            }
            let _ = w.shutdown().await;
        }
        let a = tokio::spawn(pump(ur, cw, counters.0));
        let b = tokio::spawn(pump(cr, uw, counters.1));
        let _ = tokio::join!(a, b);
    });
    (addr, down, up)
}

/// The per-disk wire figures match what crossed the socket (frames + TLS records + one
/// handshake) and the compression ratio matches the payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_report_matches_the_socket() {
    use failback_replication::wire::Compression;
    use std::sync::atomic::Ordering;
    let env = Env::new();
    let src = env.path("src.img");
    let dst = env.path("dst.img");
    // Half random, half repeated text (compressible), no zero block.
    let mut data = random_bytes(5, 4 * MIB);
    let text = b"Dec  3 10:00:01 host sshd[811]: Accepted publickey for root from 10.0.0.7\n";
    data.extend(text.iter().cycle().take(4 * MIB));
    std::fs::write(&src, &data).unwrap();
    let agent = env.agent(&[("disk0", &src)]).await;
    let (addr, down, up) = counting_proxy(agent).await;
    let o = SyncOptions {
        compression: Compression::Zstd,
        ..opts()
    };
    let r = sync(&addr, &env.client_tls(), &[("disk0", &dst)], &o)
        .await
        .unwrap();
    assert_same(&dst, &data);
    let d = &r.disks[0];
    let w = &d.wire;
    assert_eq!(w.compression, Compression::Zstd);
    // Wait for the proxy to forward the last bytes (close_notify) before reading its counts.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let (down, up) = (down.load(Ordering::SeqCst), up.load(Ordering::SeqCst));
    assert_eq!(w.received_bytes + w.sent_bytes, d.bytes_on_wire);
    // TLS adds ~22 bytes per 16 KiB record, the handshake and hello a few KiB.
    let slack = |n: u64| n / 100 + 32 * 1024;
    assert!(
        w.received_bytes <= down && down - w.received_bytes <= slack(down),
        "received {} frame bytes, {down} on the socket",
        w.received_bytes
    );
    assert!(
        w.sent_bytes <= up && up - w.sent_bytes <= slack(up),
        "sent {} frame bytes, {up} on the socket",
        w.sent_bytes
    );
    assert_eq!(w.blocks_zero, 0);
    assert_eq!(w.blocks_raw + w.blocks_zstd, d.blocks_differing);
    assert_eq!(w.payload_bytes, d.bytes_differing);
    assert_eq!(w.payload_wire_bytes, d.bytes_fetched);
    let ratio = w.compression_ratio.unwrap();
    let want = d.bytes_differing as f64 / d.bytes_fetched as f64;
    assert!((ratio - want).abs() < 1e-9 && ratio > 1.5, "ratio {ratio}");
    // The text half compresses, the random half does not.
    let share = w.compressed_share.unwrap();
    assert!((0.4..=0.6).contains(&share), "compressed share {share}");
    assert!(w.rate_bytes_per_sec > 0.0);
    // The link's capacity needs 10 ms of receiving to be measured (a loaded machine takes
    // longer, a quick one may not): when given, the disk's share of it is a fraction.
    assert!(w.link_share.is_none_or(|s| s > 0.0 && s <= 1.0), "{w:?}");
}
