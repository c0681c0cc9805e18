//! "Every VM exactly as before", read by an independent client: a mass failback against a
//! real vcsim, the real DR service and the real `failback` CLI (simulated clients, no QEMU),
//! with every device and boot option of every VM dumped by pyVmomi (tests/vm_config.py)
//! before and after and compared whole. Covers the VM's own CD-ROM (host-device backing,
//! start-connected, connected) reused for the appliance ISO and put back exactly, the same
//! through `failback vcenter attach-iso --state` / `detach-iso --remove-added`, the
//! protective-snapshot lifecycle (removed on success, kept with `keep_snapshot`, reverted on
//! failure with `on_failure = "revert"`), one-click plans listing VMs without an instance as
//! skipped, and seed ISOs deleted once their VM is done (the results say what was left).

mod mass_common;

use failback_config::plan::{OnFailure, Plan};
use mass_common::*;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_device_boot_option_and_snapshot_is_as_before() {
    let w = World::start(&["-vm", "2", "-host", "1"]).await; // 4 VMs
    let (vcsim, dr, env, work) = (&w.vcsim, &w.dr, &w.env, &w.work);
    let (name, bios) = (|i| w.name(i), |i| w.bios(i));

    // VM 0: a CD-ROM and boot options of its own (the others keep vcsim's: an ATAPI drive,
    // start-connected and connected, and empty boot options).
    vm_config_customise(vcsim, &name(0));
    let before = vm_config_dump(vcsim);

    // `failback vcenter attach-iso --state` then `detach-iso --remove-added` on VM 3 (which
    // no instance matches, so the mass run leaves it alone): the reused drive comes back
    // exactly (checked with everything else at the end).
    let ds = vcsim.datastore_dir("LocalDS_0");
    std::fs::create_dir_all(ds.join("isos")).unwrap();
    std::fs::write(ds.join("isos/tool.iso"), vec![7u8; 64 << 10]).unwrap();
    let att = work.path().join("att.json");
    let (code, out, err) = failback(
        &[
            "vcenter",
            "attach-iso",
            "--vm",
            &name(3),
            "--iso",
            "isos/tool.iso",
            "--state",
            att.to_str().unwrap(),
        ],
        env,
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("reused"), "{out}");
    let mid = vm_config_dump(vcsim);
    assert!(
        mid[&name(3)]["devices"]
            .to_string()
            .contains("[LocalDS_0] isos/tool.iso"),
        "ISO not attached: {:#}",
        mid[&name(3)]
    );
    let (code, out, err) = failback(
        &[
            "vcenter",
            "detach-iso",
            "--vm",
            &name(3),
            "--remove-added",
            att.to_str().unwrap(),
        ],
        env,
    );
    assert_eq!(code, 0, "{out}\n{err}");

    // Instances for VMs 0..3; VM 3 has none.
    for i in 0..3 {
        dr.enroll_sim_agent(&bios(i), 64 << 20).await;
    }
    let plan_path = work.path().join("plan.toml");
    let (mut plan, _) = one_click_plan(env, &plan_path, &["--snapshot"]);
    // One-click lists the VM without an instance too (as an entry without one).
    assert_eq!(plan.vms.len(), 4, "{plan:#?}");
    let entry = |p: &mut Plan, i: usize| {
        let n = name(i);
        p.vms
            .iter()
            .position(|v| v.target.name.as_deref() == Some(n.as_str()))
            .unwrap()
    };
    let e3 = entry(&mut plan, 3);
    assert!(plan.vms[e3].recovery_instance.is_none());
    let e1 = entry(&mut plan, 1);
    plan.vms[e1].options.keep_snapshot = true;
    let e2 = entry(&mut plan, 2);
    plan.vms[e2].options.on_failure = OnFailure::Revert;
    plan.vms[e2].options.timeouts.pair_secs = 8;
    save_plan(&plan, &plan_path);

    // VM 2's client never pairs: it fails and is reverted.
    let sim = Sim::start(vcsim, HashSet::from([bios(2)]));
    let results = work.path().join("results.json");
    let state = work.path().join("state");
    let args = mass_run_args(
        &plan_path,
        work.path(),
        4,
        &[
            "--state",
            state.to_str().unwrap(),
            "--results",
            results.to_str().unwrap(),
        ],
    );
    let (code, out, err) = failback_async(args, env.clone()).await;
    sim.finish().await;
    assert_eq!(code, 10, "VM 2 failed:\n{out}\n{err}");

    let r = read_json(&results);
    let by = results_by_vm(&r);
    assert_eq!(by[&name(0)]["status"], "succeeded", "{r:#}");
    assert_eq!(by[&name(0)]["snapshot_outcome"], "removed");
    assert_eq!(by[&name(1)]["status"], "succeeded");
    // Bytes as the client reported them per disk, not the disk size.
    for i in 0..2 {
        let v = &by[&name(i)];
        assert_eq!(v["disk_bytes"], 64 << 20, "{v:#}");
        assert_eq!(v["differing_bytes"], 16 << 20, "{v:#}");
        assert_eq!(v["fetched_bytes"], 4 << 20, "{v:#}");
        assert_eq!(v["disks"][0]["differing_bytes"], 16 << 20, "{v:#}");
        assert_eq!(v["disks"][0]["fetched_bytes"], 4 << 20, "{v:#}");
    }
    assert_eq!(by[&name(1)]["snapshot_outcome"], "kept");
    let failed = &by[&name(2)];
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["snapshot_outcome"], "reverted");
    let msg = failed["message"].as_str().unwrap();
    assert!(
        msg.contains("reverted to the protective snapshot") && msg.contains("powered on again"),
        "{msg}"
    );
    assert_eq!(by[&name(3)]["status"], "skipped");
    assert!(
        by[&name(3)]["message"]
            .as_str()
            .unwrap()
            .contains("no recovery instance"),
        "{:#}",
        by[&name(3)]
    );

    // Seeds (one-time token + CA) are gone from the datastore and the work dir; only the
    // shared appliance ISO is left, and the results say so.
    for i in 0..3 {
        assert_eq!(by[&name(i)]["seed_deleted"], true, "{:#}", by[&name(i)]);
    }
    let seeds: Vec<_> = std::fs::read_dir(ds.join("failback/seeds"))
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(seeds.is_empty(), "seeds left on the datastore: {seeds:?}");
    let local: Vec<_> = std::fs::read_dir(state.join("work/seeds"))
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(local.is_empty(), "seeds left in the work dir: {local:?}");
    assert_eq!(
        r["left_behind"],
        serde_json::json!([{"datastore": "LocalDS_0", "path": "failback/failback.iso"}])
    );
    assert_eq!(r["removed"], serde_json::json!([]));
    assert!(ds.join("failback/failback.iso").exists());

    // Every VM, read by pyVmomi: same power state, every device and boot option as before;
    // only VM 1 (keep_snapshot) has gained its protective snapshot.
    let after = vm_config_dump(vcsim);
    assert_same_config(&before, &after, &[&name(1)]);
}

/// Runbook waves: wave N+1 starts only when wave N's VMs are back on their own disks and
/// passed its readiness check; a wave whose VM fails with `on_failure = "stop"` keeps the
/// later waves from starting, also after `--resume --retry-failed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waves_run_in_order_and_a_failed_wave_stops_the_next() {
    use failback_config::plan::{Readiness, Wave, WavePolicy};
    let w = World::start(&["-vm", "2", "-host", "1"]).await; // 4 VMs, no VMware Tools
    let (vcsim, dr, env, work) = (&w.vcsim, &w.dr, &w.env, &w.work);
    let name = |i| w.name(i);
    for i in 0..w.vms.len() {
        dr.enroll_sim_agent(&w.bios(i), 64 << 20).await;
    }
    let plan_path = work.path().join("plan.toml");
    let (mut plan, _) = one_click_plan(env, &plan_path, &[]);
    let wave = |n: &str, readiness| Wave {
        name: n.into(),
        on_failure: WavePolicy::Stop,
        readiness,
    };
    plan.waves = vec![
        wave("db", None),
        // vcsim reports no VMware Tools: this wave's VM never gets ready.
        wave(
            "app",
            Some(Readiness {
                tools_running: true,
                guest_ip: false,
                tcp_port: None,
                timeout_secs: 2,
            }),
        ),
        wave("web", None),
    ];
    for v in &mut plan.vms {
        let n = v.target.name.clone().unwrap();
        v.wave = Some(
            if n == name(0) || n == name(1) {
                "db"
            } else if n == name(2) {
                "app"
            } else {
                "web"
            }
            .into(),
        );
    }
    // Plan order is not wave order: the run must not depend on it.
    plan.vms.reverse();
    save_plan(&plan, &plan_path);

    let results = work.path().join("results.json");
    let state = work.path().join("state");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a = vec![
            "--state",
            state.to_str().unwrap(),
            "--results",
            results.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        mass_run_args(&plan_path, work.path(), 4, &a)
    };

    // The dry run shows the waves in order.
    let (code, out, err) = failback_async(args(&["--dry-run"]), env.clone()).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let at = |s: &str| out.find(s).unwrap_or_else(|| panic!("{s} not in:\n{out}"));
    assert!(at("== wave 1/3 db") < at(&name(0)) && at(&name(1)) < at("== wave 2/3 app"));
    assert!(at("== wave 2/3 app") < at(&name(2)) && at(&name(2)) < at("== wave 3/3 web"));
    assert!(at("readiness: VMware Tools running within 2 s") > 0);
    assert!(at("== wave 3/3 web") < at(&name(3)));

    let sim = Sim::start(vcsim, HashSet::new());
    let check = |r: &serde_json::Value| {
        let by = results_by_vm(r);
        for i in 0..2 {
            assert_eq!(by[&name(i)]["status"], "succeeded", "{r:#}");
            assert_eq!(by[&name(i)]["wave"], "db");
        }
        let app = &by[&name(2)];
        assert_eq!(app["status"], "failed", "{app:#}");
        assert_eq!(app["failed_step"], "readiness");
        assert!(
            app["message"]
                .as_str()
                .unwrap()
                .contains("VMware Tools are not running"),
            "{app:#}"
        );
        let db_done = (0..2)
            .map(|i| by[&name(i)]["finished_at"].as_u64().unwrap())
            .max()
            .unwrap();
        assert!(app["started_at"].as_u64().unwrap() >= db_done, "{r:#}");
        let web = &by[&name(3)];
        assert_eq!(web["status"], "pending", "{web:#}");
        assert!(web["started_at"].is_null(), "{web:#}");
        assert!(
            web["message"].as_str().unwrap().contains("wave app"),
            "{web:#}"
        );
    };
    let (code, out, err) = failback_async(args(&[]), env.clone()).await;
    assert_eq!(code, 10, "{out}\n{err}");
    check(&read_json(&results));
    // Resume (retrying the failed VM): still not ready, so wave 3 still does not start.
    let (code, out, err) = failback_async(args(&["--resume", "--retry-failed"]), env.clone()).await;
    sim.finish().await;
    assert_eq!(code, 10, "{out}\n{err}");
    check(&read_json(&results));
}

/// Readiness checks against what vcsim reports for the guest: wave 1's VM has a guest IP and
/// a TCP port that answers (it passes); wave 2's port is closed, so it fails after the
/// wave's time-out, and as the wave's policy is `continue`, wave 3 still runs. With
/// `--cleanup` the appliance ISO is deleted from the datastore and listed as removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_tcp_port_and_guest_ip_with_continue_policy_and_cleanup() {
    use failback_config::plan::{Readiness, Wave, WavePolicy};
    let w = World::start(&["-vm", "2", "-host", "1"]).await; // 4 VMs
    let (vcsim, dr, env, work) = (&w.vcsim, &w.dr, &w.env, &w.work);
    let name = |i| w.name(i);
    // VMs 0..3 get instances; VM 3 none (skipped). VMs 0 and 1 report a guest IP.
    for i in 0..3 {
        dr.enroll_sim_agent(&w.bios(i), 64 << 20).await;
    }
    for i in 0..2 {
        vm_config_set(vcsim, &name(i), &["guest_ip=127.0.0.1"]);
    }
    let open = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let open_port = open.local_addr().unwrap().port();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let acc = accepted.clone();
    tokio::spawn(async move {
        while open.accept().await.is_ok() {
            acc.fetch_add(1, Ordering::Relaxed);
        }
    });
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port(); // dropped: nothing listens there

    let plan_path = work.path().join("plan.toml");
    let (mut plan, _) = one_click_plan(env, &plan_path, &[]);
    let ready = |port: u16, timeout_secs| {
        Some(Readiness {
            tools_running: false,
            guest_ip: true,
            tcp_port: Some(port),
            timeout_secs,
        })
    };
    plan.waves = vec![
        Wave {
            name: "db".into(),
            on_failure: WavePolicy::Stop,
            readiness: ready(open_port, 60),
        },
        Wave {
            name: "app".into(),
            on_failure: WavePolicy::Continue,
            readiness: ready(closed_port, 3),
        },
        Wave {
            name: "web".into(),
            on_failure: WavePolicy::Stop,
            readiness: None,
        },
    ];
    for v in plan
        .vms
        .iter_mut()
        .filter(|v| v.recovery_instance.is_some())
    {
        let n = v.target.name.clone().unwrap();
        let w = ["db", "app", "web"][(0..3).find(|&i| name(i) == n).unwrap()];
        v.wave = Some(w.into());
    }
    save_plan(&plan, &plan_path);

    let results = work.path().join("results.json");
    let args = mass_run_args(
        &plan_path,
        work.path(),
        4,
        &["--results", results.to_str().unwrap(), "--cleanup"],
    );
    let mut dry = args.clone();
    dry.push("--dry-run".into());
    let (code, out, err) = failback_async(dry, env.clone()).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains(&format!(
            "== wave 2/3 app (on_failure continue, readiness: guest IP + TCP port {closed_port} within 3 s) =="
        )),
        "{out}"
    );
    let sim = Sim::start(vcsim, HashSet::new());
    let (code, out, err) = failback_async(args, env.clone()).await;
    sim.finish().await;
    assert_eq!(code, 10, "the app VM failed:\n{out}\n{err}");

    let r = read_json(&results);
    let by = results_by_vm(&r);
    assert_eq!(by[&name(0)]["status"], "succeeded", "{r:#}");
    assert!(
        accepted.load(Ordering::Relaxed) >= 1,
        "port {open_port} never probed"
    );
    let app = &by[&name(1)];
    assert_eq!(app["status"], "failed", "{app:#}");
    assert_eq!(app["failed_step"], "readiness");
    let msg = app["message"].as_str().unwrap();
    assert!(
        msg.contains("not ready within 3 s")
            && msg.contains(&format!("TCP 127.0.0.1:{closed_port}")),
        "{msg}"
    );
    // `continue`: the next wave ran although wave 2 failed.
    let web = &by[&name(2)];
    assert_eq!(web["status"], "succeeded", "{web:#}");
    assert!(
        web["started_at"].as_u64() >= app["finished_at"].as_u64(),
        "{r:#}"
    );
    assert_eq!(by[&name(3)]["status"], "skipped");
    // --cleanup: the appliance ISO is gone from the datastore and the results list it.
    let ds = vcsim.datastore_dir("LocalDS_0");
    assert!(!ds.join("failback/failback.iso").exists());
    assert_eq!(
        r["removed"],
        serde_json::json!([{"datastore": "LocalDS_0", "path": "failback/failback.iso"}])
    );
    assert_eq!(r["left_behind"], serde_json::json!([]), "{r:#}");
}
