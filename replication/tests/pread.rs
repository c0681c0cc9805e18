//! The `pread` path (`--no-mmap`, and the fallback when a range cannot be mapped): full and
//! delta sync with mapping off. A test binary of its own because the switch is process-wide.

mod common;

use common::*;

const MIB: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_and_delta_sync_without_mmap() {
    failback_replication::mapped::set_enabled(false);
    let env = Env::new();
    let src = env.path("src.img");
    let dst = env.path("dst.img");
    // Odd size: the last block is short.
    let mut data = make_disk(&src, 9 * MIB + 1234, 7);
    let addr = env.agent(&[("disk0", &src)]).await;
    let tls = env.client_tls();
    let r = sync(&addr, &tls, &[("disk0", &dst)], &opts())
        .await
        .unwrap();
    assert_same(&dst, &data);
    assert_eq!(
        r.disks[0].digest.as_deref(),
        Some(r.disks[0].agent_digest.as_str())
    );

    scribble(&src, &mut data, 5 * 65536 + 17, 3000, 8);
    let r = sync(&addr, &tls, &[("disk0", &dst)], &opts())
        .await
        .unwrap();
    assert_same(&dst, &data);
    assert_eq!(r.disks[0].blocks_differing, 1);
    assert!(!failback_replication::mapped::enabled());
}
