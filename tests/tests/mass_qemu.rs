//! End to end with real parts: vcsim (vCenter), the real DR service, three real recovery
//! agents on the host, the real appliance ISO booted by QEMU (TCG, 512 MiB) through our
//! hypervisor harness (tests/hypervisor: it boots QEMU when a vcsim VM powers on from an ISO
//! and powers the VM off when the guest does), and `failback mass run` for 3 VMs at once.
//! Asserts: each VM's disk equals its recovery instance's disk byte for byte, every VM ends
//! powered on with its ISOs detached and its boot options exactly as before, the results
//! file says succeeded (with matching digests), and each VM then boots its restored OS (a
//! real test OS disk, `failback_tests::testos`; the harness runs with `-boot-disks`): its
//! marker (generation v2, content checksum, root device) appears on that VM's console.

mod appliance_support;
mod mass_common;

use failback_api::TokenKind;
use failback_tests::vcsim::go_tool;
use failback_tests::KillOnDrop;
use mass_common::*;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The restored OS: BIOS test OS, 16 MiB of files on a 128 MiB disk.
const OS_DATA_MIB: u64 = 16;
const DISK: u64 = 128 << 20;

fn test_os(generation: u32) -> failback_tests::testos::TestOs {
    use failback_tests::testos::{self, Boot, Spec};
    testos::ensure(
        Spec {
            boot: Boot::Bios,
            generation,
            data_mib: OS_DATA_MIB,
            disk_mib: DISK >> 20,
        },
        &testos::default_cache(),
    )
    .unwrap_or_else(|e| panic!("building the test OS disk: {e:#}"))
}

/// The appliance ISO: `FAILBACK_APPLIANCE_ISO` if set, else built here from the Debian
/// inputs (`make setup`) and the static musl client.
fn appliance_iso(dir: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("FAILBACK_APPLIANCE_ISO") {
        return PathBuf::from(p);
    }
    let out = dir.join("failback.iso");
    failback_iso::appliance::build(
        &failback_iso::appliance::ApplianceOptions {
            inputs: appliance_support::inputs(),
            client: appliance_support::client(),
            extra_kernel_args: String::new(),
        },
        &out,
    )
    .expect("build appliance ISO");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mass_run_three_vms_in_qemu_restores_disks_and_vm_config() {
    let work = tempfile::tempdir().unwrap();
    let iso = appliance_iso(work.path());
    let vcsim = Vcsim::start(&["-vm", "2", "-host", "1"]);
    let dr = DrService::start(&["--san", "10.0.2.2", "--heartbeat-secs", "2"]);
    let vc = vcsim.client().await;
    let vms = non_template_vms(&vc).await;
    let vms = &vms[..3];
    let before = boot_options_by_moref(vms.iter());

    // Recovery side: a source disk and a real agent per VM, enrolled with the VM's BIOS UUID.
    let disks = work.path().join("vmdisks");
    std::fs::create_dir_all(&disks).unwrap();
    let mut agents = Vec::new();
    let mut sources = Vec::new();
    let (v1, v2) = (test_os(1), test_os(2));
    for (i, vm) in vms.iter().enumerate() {
        let src = work.path().join(format!("source-{i}.img"));
        std::fs::copy(&v2.path, &src).unwrap();
        // The VM's own disk: the stale generation v1 (delta) for the first, empty (full sync)
        // for the rest.
        let local = disks.join(format!("{}.img", vm.summary.name));
        if i == 0 {
            std::fs::copy(&v1.path, &local).unwrap();
        } else {
            std::fs::File::create(&local)
                .unwrap()
                .set_len(DISK)
                .unwrap();
        }
        let port = failback_tests::free_port();
        let token = dr.token(TokenKind::Agent, None).await;
        let state = work.path().join(format!("agent-{i}"));
        let child = Command::new(bin("failback-agent"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--advertise", &format!("10.0.2.2:{port}")])
            .arg("--disk")
            .arg(format!("disk0={}", src.display()))
            .args(["--server", &dr.url, "--ca"])
            .arg(&dr.ca_path)
            .args(["--enroll-token", &token, "--state-dir"])
            .arg(&state)
            .args([
                "--source-vmware-uuid",
                vm.summary.bios_uuid.as_deref().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(work.path().join(format!("agent-{i}.log"))).unwrap())
            .spawn()
            .expect("start failback-agent");
        agents.push(KillOnDrop(child));
        sources.push((src, local));
    }
    // Wait for the three enrollments.
    let t0 = Instant::now();
    loop {
        let r: serde_json::Value = dr
            .http()
            .get(format!("{}/v1/admin/instances", dr.url))
            .bearer_auth(&dr.admin_token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if r["items"].as_array().is_some_and(|a| a.len() == 3) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "agents did not enroll: {r}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The hypervisor harness.
    let hv_log = work.path().join("hypervisor.log");
    let mut hv = Command::new(go_tool("target/hypervisor/hypervisor"))
        .arg("-vcsim-env")
        .arg(&vcsim.env_file)
        .arg("-disk-dir")
        .arg(&disks)
        .arg("-exit-on-eof")
        .arg("-boot-disks")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(work.path().join("hypervisor.err")).unwrap())
        .spawn()
        .expect("start hypervisor harness");
    let out = hv.stdout.take().unwrap();
    let log_path = hv_log.clone();
    std::thread::spawn(move || {
        let mut f = std::fs::File::create(log_path).unwrap();
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = writeln!(f, "{line}");
        }
    });
    let _hv = KillOnDrop(hv);

    let mut env = vcsim.cli_env();
    env.extend(dr.cli_env());
    let plan_path = work.path().join("plan.toml");
    let (mut plan, out) = one_click_plan(&env, &plan_path, &[]);
    // vcsim has four VMs: three match an instance, the fourth is listed as skipped.
    assert_eq!(plan.vms.len(), 4, "{out}");
    let matched = plan.vms.iter().filter(|v| v.recovery_instance.is_some());
    assert_eq!(matched.count(), 3, "{out}");
    for v in &mut plan.vms {
        v.options.timeouts.pair_secs = 900;
        v.options.timeouts.sync_secs = 900;
        v.options.timeouts.complete_secs = 900;
    }
    save_plan(&plan, &plan_path);

    let results = work.path().join("results.json");
    let args: Vec<String> = [
        "mass",
        "run",
        plan_path.to_str().unwrap(),
        "--parallel",
        "3",
        "--poll-ms",
        "1000",
        "--appliance-iso",
        iso.to_str().unwrap(),
        "--seed-server-url",
        &format!("https://10.0.2.2:{}", dr.url.rsplit(':').next().unwrap()),
        "--results",
        results.to_str().unwrap(),
        "--progress",
        "plain",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let t_run = Instant::now();
    let (code, out, err) = failback_async(args, env.clone()).await;
    let wall = t_run.elapsed().as_secs_f64();
    let diag = || {
        let mut s = format!(
            "run: {out}\n{err}\nhypervisor: {}\n",
            std::fs::read_to_string(&hv_log).unwrap_or_default()
        );
        for vm in vms {
            let p = disks.join(format!("{}.serial.log", vm.summary.name));
            let t = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: String = t
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            s.push_str(&format!(
                "--- {} console (tail) ---\n{tail}\n",
                vm.summary.name
            ));
        }
        s
    };
    assert_eq!(code, 0, "{}", diag());
    let r = read_json(&results);
    assert_eq!(r["summary"]["succeeded"], 3, "{r:#}\n{}", diag());
    assert_eq!(r["summary"]["skipped"], 1, "{r:#}");
    for v in r["vms"].as_array().unwrap() {
        if v["status"] == "skipped" {
            let why = v["message"].as_str().unwrap_or_default();
            assert!(why.contains("no recovery instance"), "{v:#}");
            continue;
        }
        let d = v["digests"].as_array().unwrap();
        assert_eq!(d.len(), 1, "{v:#}");
        assert_eq!(d[0]["local_digest"], d[0]["agent_digest"]);
    }

    // Disks byte for byte.
    for (src, local) in &sources {
        let a = std::fs::read(src).unwrap();
        let b = std::fs::read(local).unwrap();
        assert!(
            a == b[..a.len()],
            "{} differs from {}",
            local.display(),
            src.display()
        );
    }
    // VMs on, ISOs detached, boot options as before.
    assert_vms_restored(&vc, &before).await;
    // The harness booted each VM once from the ISOs, and each guest's QEMU ended: the guest
    // rebooted by itself (exit 0), or the orchestrator's power-off ended its power-on first
    // (stop); which one comes first is a race between the client and the orchestrator's poll.
    // Then the power-on from disk boots the restored OS (harness -boot-disks): its marker
    // (v2, the content checksum its init computed, the root device) on its own console.
    let t_os = Instant::now();
    for vm in vms {
        let p = disks.join(format!("{}.disk.serial.log", vm.summary.name));
        let want = format!("{} root=/dev/vda2", v2.marker);
        loop {
            let t = std::fs::read_to_string(&p).unwrap_or_default();
            if t.contains(&want) {
                break;
            }
            assert!(
                t_os.elapsed() < Duration::from_secs(600),
                "{}: no restored-OS marker `{want}`; console:\n{t}\n{}",
                vm.summary.name,
                diag()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    println!(
        "mass: every restored OS printed its marker {:.1}s after `failback mass run` returned",
        t_os.elapsed().as_secs_f64()
    );
    let hl = std::fs::read_to_string(&hv_log).unwrap();
    for vm in vms {
        let name = &vm.summary.name;
        // Once from the ISOs, once from the disk.
        assert_eq!(hl.matches(&format!("boot {name} ")).count(), 2, "{hl}");
        assert!(hl.contains("-boot order=c"), "{hl}");
        assert!(
            hl.contains(&format!("exit {name} 0\n")) || hl.contains(&format!("stop {name}\n")),
            "{hl}"
        );
    }
    eprintln!("QEMU E2E: 3 VMs x 64 MiB (1 delta, 2 full) failed back in {wall:.0} s wall");
}

/// The harness's lines on stdout, one at a time (60 s each at most).
struct HarnessLines(std::sync::mpsc::Receiver<String>, Vec<String>);

impl HarnessLines {
    fn next(&mut self) -> String {
        let l = self
            .0
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("no line from the harness ({e}); so far: {:#?}", self.1));
        self.1.push(l.clone());
        l
    }

    fn expect(&mut self, want: &str) {
        let l = self.next();
        assert!(
            l == want || l.starts_with(&format!("{want} ")),
            "harness said {l:?}, expected {want:?}; so far: {:#?}",
            self.1
        );
    }
}

/// The harness ties a QEMU to one power-on (the race behind a flaky `VM powered on` above:
/// the orchestrator powered the appliance VM off, detached the ISOs, restored the boot
/// options and powered it on from disk between two polls; the guest's own power-off that
/// followed made the harness power off the VM in its new power-on). Deterministic: a fake
/// QEMU that exits when told, and a harness that polls only when asked (`-poll 1h`, "poll"
/// on stdin), so each interleaving is produced on purpose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_ties_each_qemu_to_one_power_on() {
    use failback_vcenter::{PowerOp, PowerState};
    let work = tempfile::tempdir().unwrap();
    let vcsim = Vcsim::start(&["-vm", "1", "-host", "1"]);
    let vc = vcsim.client().await;
    let vm = non_template_vms(&vc).await.remove(0);
    let r = vm.vmref.clone();
    let name = r.name.clone();
    if vc.power_state(&r).await.unwrap() == PowerState::PoweredOn {
        vc.power(&r, PowerOp::Off).await.unwrap();
    }
    let iso = vcsim.datastore_dir("LocalDS_0").join("isos/app.iso");
    std::fs::create_dir_all(iso.parent().unwrap()).unwrap();
    std::fs::write(&iso, vec![0u8; 64 << 10]).unwrap();
    let disks = work.path().join("disks");
    std::fs::create_dir_all(&disks).unwrap();
    std::fs::write(disks.join(format!("{name}.img")), b"").unwrap();
    // Fake QEMU (the harness stops it like QEMU, with SIGKILL): runs until `exit` exists.
    let flag = work.path().join("exit");
    let qemu = work.path().join("qemu.sh");
    std::fs::write(
        &qemu,
        format!(
            "#!/bin/sh\nwhile [ ! -e '{0}' ]; do sleep 0.05; done\nrm -f '{0}'\n",
            flag.display()
        ),
    )
    .unwrap();
    let mut perm = std::fs::metadata(&qemu).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&qemu, perm).unwrap();
    let boot_from_iso = || async {
        vc.attach_iso(&r, "LocalDS_0", "isos/app.iso")
            .await
            .unwrap();
        vc.set_boot_cdrom_first(&r).await.unwrap()
    };
    let saved = boot_from_iso().await;
    vc.power(&r, PowerOp::On).await.unwrap();

    let mut hv = Command::new(go_tool("target/hypervisor/hypervisor"))
        .arg("-vcsim-env")
        .arg(&vcsim.env_file)
        .arg("-disk-dir")
        .arg(&disks)
        .arg("-qemu")
        .arg(&qemu)
        .args(["-poll", "1h", "-exit-on-eof"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(work.path().join("hypervisor.err")).unwrap())
        .spawn()
        .expect("start hypervisor harness");
    let mut stdin = hv.stdin.take().unwrap();
    let out = hv.stdout.take().unwrap();
    let _hv = KillOnDrop(hv);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut hl = HarnessLines(rx, Vec::new());
    let mut poll = |hl: &mut HarnessLines, want: &[String]| {
        writeln!(stdin, "poll").unwrap();
        stdin.flush().unwrap();
        for w in want {
            hl.expect(w);
        }
        hl.expect("polled");
    };
    let exit_guest = || std::fs::write(&flag, b"").unwrap();
    let on = || async { vc.power_state(&r).await.unwrap() };

    // The first poll (at start) boots QEMU for the ISO power-on.
    hl.expect("ready");
    hl.expect(&format!("boot {name}"));

    // The reported race: off, ISOs detached, boot options restored, on from disk, all before
    // the next poll; then the old guest powers off. The new power-on must stay on.
    vc.power(&r, PowerOp::Off).await.unwrap();
    vc.detach_iso(&r, None).await.unwrap();
    vc.restore_boot_options(&r, &saved).await.unwrap();
    vc.power(&r, PowerOp::On).await.unwrap();
    exit_guest();
    hl.expect(&format!("exit {name} 0"));
    hl.expect(&format!("keep {name} powered on again since QEMU started"));
    assert_eq!(on().await, PowerState::PoweredOn, "{:#?}", hl.1);
    poll(&mut hl, &[]); // a disk power-on: no QEMU
    assert_eq!(on().await, PowerState::PoweredOn, "{:#?}", hl.1);

    // A new ISO power-on gets its QEMU; power-cycled between polls, that QEMU is stopped
    // (its power-on is over) without powering the VM off, and the new power-on gets a new one.
    boot_from_iso().await;
    vc.power(&r, PowerOp::Off).await.unwrap();
    vc.power(&r, PowerOp::On).await.unwrap();
    poll(&mut hl, &[format!("boot {name}")]);
    vc.power(&r, PowerOp::Reset).await.unwrap();
    poll(
        &mut hl,
        &[
            format!("stop {name}"),
            format!("exit {name} -1"),
            format!("boot {name}"),
        ],
    );
    assert_eq!(on().await, PowerState::PoweredOn, "{:#?}", hl.1);

    // The guest powers off in its own power-on: the VM goes off, and stays so.
    exit_guest();
    hl.expect(&format!("exit {name} 0"));
    hl.expect(&format!("poweroff {name}"));
    assert_eq!(on().await, PowerState::PoweredOff, "{:#?}", hl.1);
    poll(&mut hl, &[]);
    assert_eq!(on().await, PowerState::PoweredOff, "{:#?}", hl.1);
}
