//! `make bench` (scripts/bench.sh): failback downtime, from `failback launch` to the restored
//! OS's marker on the VM's console, per test OS size. Real parts: the DR service, a recovery
//! agent serving the v2 test OS (`failback_tests::testos`, UEFI, GPT + ESP + GRUB), the
//! product appliance ISO in QEMU (TCG, UEFI, virtio; 512 MiB) over an empty local disk with
//! the seed's `after = "reboot"`. Once the initial sync is done (READY_FOR_LAUNCH and
//! CONTINUOUS) the clock starts at `failback launch`: the client's final round (delta of the
//! whole disk, digests on both sides), completion, `BootNext` to the restored disk, reboot,
//! firmware, GRUB, the test OS's kernel, and its init's SHA-256 over its own files, which
//! then prints `FAILBACK_TEST_OS generation=v2 content=<sha256> root=/dev/sda2`.
//!
//! Sizes: `BENCH_DOWNTIME_MIB` (default "16 64 256": MiB of files on the root file system;
//! the disk is twice that plus 128 MiB, sparse). Output: a table on stdout and one JSON line
//! per size (`{"downtime": ...}`). Timing only here, never asserted in tests; the marker and
//! its content checksum are checked (a wrong restored OS is a failure, not a figure).

#[path = "../tests/appliance_support/mod.rs"]
mod appliance_support;

use appliance_support::*;
use failback_config::seed::AfterCompletion;
use failback_tests::testos::{self, Boot, Spec};
use std::time::{Duration, Instant};

const SLOW: Duration = Duration::from_secs(1200);

struct Row {
    data_mib: u64,
    disk_mib: u64,
    /// `failback launch` -> FAILBACK_COMPLETED on the console.
    to_completed: f64,
    /// FAILBACK_COMPLETED -> the restored OS's marker (reboot, firmware, kernel, checksum).
    to_marker: f64,
}

fn wait_continuous(server: &Server, vm: &Vm, id: &str) {
    let start = Instant::now();
    loop {
        let v = wait_ready_for_launch(server, vm, id, SLOW);
        if v["failback"]["replication_state"] == "CONTINUOUS" {
            return;
        }
        assert!(start.elapsed() < SLOW, "{id}: never CONTINUOUS: {v}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn one(data_mib: u64) -> Row {
    let disk_mib = data_mib * 2 + 128;
    let v2 = testos::ensure(
        Spec {
            boot: Boot::Uefi,
            generation: 2,
            data_mib,
            disk_mib,
        },
        &testos::default_cache(),
    )
    .unwrap_or_else(|e| panic!("building the test OS disk: {e:#}"));
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let source = d.join("v2.img");
    let st = std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(&v2.path)
        .arg(&source)
        .status()
        .unwrap();
    assert!(st.success(), "cp {}", v2.path.display());
    let local = d.join("local.img");
    std::fs::File::create(&local)
        .unwrap()
        .set_len(disk_mib << 20)
        .unwrap();
    let (_agent, id) = spawn_agent(&server, &source, d);
    let mut seed = unattended_seed(&server, pairing_token(&server, &id), &id);
    seed.after = AfterCompletion::Reboot;
    let seed = seed_iso(d, &seed);
    let mut vm = Vm::start_with(
        &VmConfig {
            name: "downtime",
            firmware: Firmware::Uefi,
            hardware: Hardware::Virtio,
            iso: &product_iso().0,
            seed: Some(&seed),
            disks: vec![(&local, "FBTARGET0")],
            rtc_base: None,
        },
        BootFrom::Cd,
        &VmExtra {
            reboot: true,
            vars: Some(d.join("OVMF_VARS.fd")),
            honour_eject: false,
        },
    );
    vm.expect(&format!("paired with recovery instance {id}"), SLOW);
    wait_continuous(&server, &vm, &id);
    let launched = Instant::now();
    admin_cli(&server, &["launch", &id]);
    vm.expect("FAILBACK_COMPLETED", SLOW);
    let to_completed = launched.elapsed().as_secs_f64();
    // The whole marker (generation, checksum, root device: the end of its line).
    vm.expect(&format!("{} root=/dev/sda2", v2.marker), SLOW);
    let total = launched.elapsed().as_secs_f64();
    vm.wait_exit(Duration::from_secs(120));
    Row {
        data_mib,
        disk_mib,
        to_completed,
        to_marker: total - to_completed,
    }
}

fn main() {
    // `cargo test --benches` passes harness flags; this bench takes none.
    let sizes: Vec<u64> = std::env::var("BENCH_DOWNTIME_MIB")
        .unwrap_or_else(|_| "16 64 256".into())
        .split([' ', ','])
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("BENCH_DOWNTIME_MIB: {s:?} is not a number of MiB"))
        })
        .collect();
    let mut rows = Vec::new();
    for &mib in &sizes {
        let r = one(mib);
        println!(
            "{}",
            serde_json::json!({"downtime": {
                "firmware": "uefi", "data_mib": r.data_mib, "disk_mib": r.disk_mib,
                "launch_to_completed_secs": r.to_completed,
                "completed_to_marker_secs": r.to_marker,
                "launch_to_marker_secs": r.to_completed + r.to_marker,
            }})
        );
        rows.push(r);
    }
    println!("failback downtime (QEMU TCG, UEFI + virtio, 512 MiB guest): `failback launch` -> restored OS marker");
    println!(
        "{:>10} {:>10} {:>22} {:>24} {:>10}",
        "files MiB", "disk MiB", "launch->COMPLETED s", "COMPLETED->marker s", "total s"
    );
    for r in &rows {
        println!(
            "{:>10} {:>10} {:>22.1} {:>24.1} {:>10.1}",
            r.data_mib,
            r.disk_mib,
            r.to_completed,
            r.to_marker,
            r.to_completed + r.to_marker
        );
    }
}
