//! Acceptance: the appliance ISO boots in QEMU (BIOS, pvscsi + vmxnet3, 512 MiB RAM) with a
//! seed ISO, pairs unattended with the real DR service, pulls a 256 MiB disk from a real
//! recovery agent on the host (10.0.2.2 from the guest), reaches READY_FOR_LAUNCH; the test
//! launches through the admin CLI; the client completes, ejects the CD and powers off; the
//! VM's disk must equal the source byte for byte. A second VM starts from a stale copy of
//! another source and must fetch only the blocks that differ. A third VM boots without a seed
//! ISO: the test answers the console prompts (network, service URL, token, CA) over the
//! serial port and the same failback must follow.

mod appliance_support;

use appliance_support::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const SLOW: Duration = Duration::from_secs(600);

/// One QEMU at a time in this binary: TCG on 2 shared cores is slow enough already.
fn qemu_slot() -> std::sync::MutexGuard<'static, ()> {
    static SLOT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SLOT.lock().unwrap_or_else(|p| p.into_inner())
}

fn failback_one(server: &Server, dir: &Path, name: &str, id: &str, target: &Path) -> String {
    let seed = unattended_seed(server, pairing_token(server, id), id);
    let seed_dir = dir.join(name);
    std::fs::create_dir_all(&seed_dir).unwrap();
    let seed = seed_iso(&seed_dir, &seed);
    let mut vm = Vm::start(&VmConfig {
        name,
        firmware: Firmware::Bios,
        hardware: Hardware::VmwareLike,
        iso: &product_iso().0,
        seed: Some(&seed),
        disks: vec![(target, "FBTARGET0")],
        rtc_base: None,
    });
    launch_and_finish(server, &mut vm, id)
}

/// From boot to power-off: paired, READY_FOR_LAUNCH, launched through the admin CLI,
/// completed, VM gone. Returns the console.
fn launch_and_finish(server: &Server, vm: &mut Vm, id: &str) -> String {
    let name = vm.name.clone();
    vm.expect("FAILBACK_SERVICE_REACHABLE", SLOW);
    vm.expect(&format!("paired with recovery instance {id}"), SLOW);
    // Figure for the README (boot-to-paired under TCG); not asserted: timing is for bench.
    println!(
        "{name}: paired {:.1}s after QEMU start",
        vm.started.elapsed().as_secs_f64()
    );
    wait_ready_for_launch(server, vm, id, SLOW);
    admin_cli(server, &["launch", id]);
    vm.expect("FAILBACK_COMPLETED", SLOW);
    vm.expect("FAILBACK_DONE", SLOW);
    vm.wait_exit(Duration::from_secs(120));
    vm.output()
}

#[test]
fn appliance_pairs_syncs_launches_and_restores_disks_byte_for_byte() {
    let server = Server::start();
    let _slot = qemu_slot();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // Full copy onto an empty disk.
    let source = d.join("source.img");
    gen_disk(&source, &["--size", "256M", "--seed", "7"]);
    let target = d.join("target.img");
    std::fs::File::create(&target)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let (_agent, id) = spawn_agent(&server, &source, d);
    let out = failback_one(&server, d, "full", &id, &target);
    assert!(
        std::fs::read(&source).unwrap() == std::fs::read(&target).unwrap(),
        "restored disk differs from the source:\n{out}"
    );
    assert!(out.contains("peak client memory"), "{out}");

    // Stale local disk: only the differing blocks travel.
    let source2 = d.join("source2.img");
    gen_disk(&source2, &["--size", "256M", "--seed", "8"]);
    let stale = d.join("stale.img");
    gen_disk(
        &stale,
        &[
            "--stale-from",
            source2.to_str().unwrap(),
            "--change-pct",
            "2",
        ],
    );
    let (_agent2, id2) = spawn_agent(&server, &source2, d);
    let out2 = failback_one(&server, d, "delta", &id2, &stale);
    assert!(
        std::fs::read(&source2).unwrap() == std::fs::read(&stale).unwrap(),
        "delta-restored disk differs:\n{out2}"
    );
    // Fetched payload of round 1 ("round 1 done in Xs: A MiB differed, B MiB fetched").
    let fetched = |out: &str| -> f64 {
        let line = out
            .lines()
            .find(|l| l.contains("round 1 done"))
            .unwrap_or_else(|| panic!("no round 1 summary:\n{out}"));
        let part = line.rsplit(", ").next().unwrap_or_default();
        part.split_whitespace()
            .next()
            .unwrap_or_default()
            .parse()
            .unwrap_or(f64::MAX)
    };
    let (full_mib, delta_mib) = (fetched(&out), fetched(&out2));
    assert!(
        delta_mib < full_mib * 0.25,
        "the stale disk should save transfer: fetched {delta_mib} MiB vs {full_mib} MiB onto an empty disk:\n{out2}"
    );
}

/// No seed ISO: everything the seed would hold is typed on the serial console (static
/// network, a wrongly typed URL that must be asked again, the URL, a token, the CA), then
/// the unattended flow runs as with a seed: pair, pull, READY, launch, byte-equal disk.
#[test]
fn appliance_without_seed_prompts_then_pairs_syncs_and_restores_the_disk() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let source = d.join("source.img");
    gen_disk(&source, &["--size", "64M", "--seed", "11"]);
    let target = d.join("target.img");
    std::fs::File::create(&target)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let (_agent, id) = spawn_agent(&server, &source, d);
    let token = pairing_token(&server, &id);
    let _slot = qemu_slot();
    let mut vm = Vm::start(&VmConfig {
        name: "noseed",
        firmware: Firmware::Bios,
        hardware: Hardware::Virtio,
        iso: &product_iso().0,
        seed: None,
        disks: vec![(&target, "FBTARGET0")],
        rtc_base: None,
    });
    vm.expect("no seed ISO (label FBSEED) found", SLOW);
    vm.expect("FAILBACK_PROMPT Network configuration", SLOW);
    vm.type_line("static");
    // QEMU user networking: the guest is 10.0.2.15, the host 10.0.2.2, DNS 10.0.2.3.
    vm.expect("FAILBACK_PROMPT IPv4 address/prefix", SLOW);
    vm.type_line("10.0.2.15/24");
    vm.expect("FAILBACK_PROMPT Default gateway", SLOW);
    vm.type_line("10.0.2.2");
    vm.expect("FAILBACK_PROMPT DNS servers", SLOW);
    vm.type_line("10.0.2.3");
    vm.expect("FAILBACK_NETWORK_UP eth0 (", SLOW);
    // The console line may arrive in pieces: wait for its end before reading it.
    vm.expect("; dns ", SLOW);
    assert!(
        vm.output().contains("): static 10.0.2.15/24"),
        "static address not applied:\n{}",
        vm.output()
    );
    vm.expect("FAILBACK_PROMPT DR service URL", SLOW);
    vm.type_line("http://wrong-scheme");
    vm.expect("must start with https://", SLOW);
    vm.expect_count("FAILBACK_PROMPT DR service URL", 2, SLOW);
    vm.type_line(&server.guest_url());
    vm.expect("FAILBACK_PROMPT Pairing token", SLOW);
    vm.type_line(&token);
    vm.expect("FAILBACK_PROMPT DR service CA certificate", SLOW);
    for line in server.ca_pem().lines() {
        vm.type_line(line);
    }
    let out = launch_and_finish(&server, &mut vm, &id);
    assert!(
        std::fs::read(&source).unwrap() == std::fs::read(&target).unwrap(),
        "restored disk differs from the source:\n{out}"
    );
    assert!(out.contains("volume vol0 (64.0 MiB) -> /dev/"), "{out}");
    assert!(!out.contains("FAILBACK_FAILED"), "{out}");
}

/// `CLIENT_BOOT_FAILED` / `CLIENT_FAILED` events of one instance (via `failback events`).
fn failure_events(server: &Server, id: &str) -> Vec<(String, String)> {
    let v: serde_json::Value = serde_json::from_str(&admin_cli(
        server,
        &["events", "--instance", id, "--output", "json"],
    ))
    .unwrap();
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "CLIENT_BOOT_FAILED" || e["kind"] == "CLIENT_FAILED")
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_string(),
                e["message"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Runs `failback-client run` (the same `run()` the appliance calls) against the service;
/// killed after two minutes (a failure must end the run, not leave it retrying).
fn client_run(server: &Server, dir: &Path, token: &str, map: &str) -> (i32, String) {
    let log = dir.join(format!(
        "client-{}.log",
        &token[token.len().saturating_sub(6)..]
    ));
    let mut child = Command::new(bin("failback-client", "failback-client"))
        .args([
            "run",
            "--server",
            &format!("https://127.0.0.1:{}", server.port),
        ])
        .args(["--token", token, "--map", map, "--retry-secs", "1"])
        .arg("--ca")
        .arg(server.dir.path().join("data/ca.pem"))
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::options().append(true).open(&log).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "failback-client run still running after 120 s:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    (status.code().unwrap_or(-1), text)
}

/// Every failure after the service is known is printed with its cause and reaches the
/// service's event log: an expired token (before the client holds a secret: boot report),
/// a local disk too small for its volume (after pairing: CLIENT_FAILED + FAILBACK_ERROR), and
/// in QEMU an appliance whose kernel command line maps the volume to a missing disk (boot
/// report with the appliance's console log, then power-off because of no_prompt).
#[test]
fn appliance_and_client_failures_reach_the_service_event_log() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 1 GiB recovery volume (sparse); a 48 MiB local image is "fractional GiB rounded up"
    // for the service's mapping rule, but the client's safety check must refuse it.
    let source = d.join("source.img");
    std::fs::File::create(&source)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    // Advertised as 127.0.0.1: `failback-client run` dials it from the host; the QEMU part
    // below is refused at pairing and never dials the agent.
    let (_agent, id) = spawn_agent_at(&server, &source, d, "127.0.0.1");
    let small = d.join("small.img");
    std::fs::File::create(&small)
        .unwrap()
        .set_len(48 << 20)
        .unwrap();
    let map = format!("vol0={}", small.display());

    // Expired token: refused at pairing (exit 7), cause on the console and in the events.
    let expired = admin_cli(
        &server,
        &[
            "token",
            "create",
            "pairing",
            "--instance",
            &id,
            "--ttl-secs",
            "1",
        ],
    )
    .trim()
    .to_string();
    std::thread::sleep(Duration::from_millis(2500));
    let (code, out) = client_run(&server, d, &expired, &map);
    assert_eq!(code, 7, "{out}");
    assert!(out.contains("TOKEN_EXPIRED"), "{out}");
    assert!(
        out.contains(&format!(
            "failure reported to the DR service (recovery instance {id})"
        )),
        "{out}"
    );
    let ev = failure_events(&server, &id);
    assert!(
        ev.iter().any(|(k, m)| k == "CLIENT_BOOT_FAILED"
            && m.starts_with("pair: ")
            && m.contains("TOKEN_EXPIRED")),
        "{ev:?}"
    );

    // Too small a local disk: pairs, then refused before any write (exit 3).
    let token = pairing_token(&server, &id);
    let (code, out) = client_run(&server, d, &token, &map);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("image file holds"), "{out}");
    let ev = failure_events(&server, &id);
    assert!(
        ev.iter().any(|(k, m)| k == "CLIENT_FAILED"
            && m.contains("image file holds")
            && m.contains(&small.display().to_string())),
        "{ev:?}"
    );
    assert_eq!(
        std::fs::metadata(&small).unwrap().len(),
        48 << 20,
        "the refused image was written to"
    );

    // The appliance in QEMU, booted with a device mapping on the kernel command line that
    // names a disk the VM does not have: cause on the console, boot report (filed by the now
    // used token) with the appliance's own console lines, power-off (no_prompt).
    let iso = build_iso("badmap", "failback.map=vol0=/dev/sdb").0;
    let seed = seed_iso(d, &unattended_seed(&server, token, &id));
    let target = d.join("target.img");
    std::fs::File::create(&target)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let _slot = qemu_slot();
    let mut vm = Vm::start(&VmConfig {
        name: "badmap",
        firmware: Firmware::Bios,
        hardware: Hardware::VmwareLike,
        iso: &iso,
        seed: Some(&seed),
        disks: vec![(&target, "FBTARGET0")],
        rtc_base: None,
    });
    vm.expect("FAILBACK_FAILED", SLOW);
    vm.expect("no_prompt is set: powering off", SLOW);
    vm.wait_exit(Duration::from_secs(120));
    let out = vm.output();
    assert!(out.contains("kernel command line overrides: map"), "{out}");
    assert!(out.contains("mapped local device /dev/sdb"), "{out}");
    assert!(
        out.contains(&format!(
            "failure reported to the DR service (recovery instance {id})"
        )),
        "{out}"
    );
    let ev = failure_events(&server, &id);
    let (_, msg) = ev
        .iter()
        .find(|(k, m)| k == "CLIENT_BOOT_FAILED" && m.contains("mapped local device /dev/sdb"))
        .unwrap_or_else(|| panic!("{ev:?}"));
    // The console log shipped with it holds the appliance's boot steps.
    let log = msg
        .rsplit("console log ")
        .next()
        .unwrap()
        .trim_end_matches(')');
    let logs = server.dir.path().join("data/logs").join(&id).join(log);
    let text = std::fs::read_to_string(&logs).unwrap_or_else(|e| panic!("{}: {e}", logs.display()));
    assert!(
        text.contains("FAILBACK_SEED_FOUND") && text.contains("/dev/sdb"),
        "{text}"
    );
}
