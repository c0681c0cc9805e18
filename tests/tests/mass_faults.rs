//! Mass failback fault cases against a real vcsim, the real DR service and the real
//! `failback` CLI, with simulated clients (mass_common): a VM with no recovery instance and an
//! instance with no VM (both skipped and reported), a client that never pairs (timeout ->
//! that VM fails and is rolled back, the others succeed), and an orchestrator killed mid-run
//! that `--resume` finishes without repeating destructive steps.

mod mass_common;

use failback_config::plan::{Plan, PlanFormat};
use mass_common::*;
use std::collections::{HashMap, HashSet};
use std::path::Path;

fn run_args(w: &World, plan: &Path, extra: &[&str]) -> Vec<String> {
    mass_run_args(plan, w.work.path(), 3, extra)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_skipped_and_never_pairing_vm_times_out_while_others_succeed() {
    let w = World::start(&["-vm", "2", "-host", "1"]).await; // 4 VMs
    let before = boot_options_by_moref(&w.vms);
    let bios = |i: usize| w.vms[i].summary.bios_uuid.clone().unwrap();
    // VMs 0..3 get instances; VM 3 none; one instance matches no VM.
    for i in 0..3 {
        w.dr.enroll_sim_agent(&bios(i), 64 << 20).await;
    }
    let orphan =
        w.dr.enroll_sim_agent("deadbeef-0000-0000-0000-000000000000", 64 << 20)
            .await;

    let plan_path = w.work.path().join("plan.toml");
    let (code, out, err) = failback(
        &[
            "mass",
            "plan",
            "--generate",
            "-o",
            plan_path.to_str().unwrap(),
        ],
        &w.env,
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains(&orphan),
        "unmatched instance reported by plan: {out}"
    );
    let mut plan = Plan::load(&plan_path).unwrap();
    assert_eq!(plan.vms.len(), 4);
    assert_eq!(plan.unmatched_instances, vec![orphan.clone()]);
    // Only the VM whose client never pairs gets a short pairing timeout, so a slow, loaded
    // machine cannot make the others time out too.
    let never = w.vms[2].summary.bios_uuid.clone();
    for v in &mut plan.vms {
        v.options.timeouts.pair_secs = if v.target.bios_uuid == never { 15 } else { 600 };
    }
    std::fs::write(&plan_path, plan.encode(PlanFormat::Toml).unwrap()).unwrap();

    // `find` shows every VM and which instance matches.
    let (code, out, _) = failback(&["mass", "find", "--output", "json"], &w.env);
    assert_eq!(code, 0);
    let found: serde_json::Value = serde_json::from_str(&out).unwrap();
    let matched = found["vms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["recovery_instance"].is_string())
        .count();
    assert_eq!(matched, 3, "{out}");

    // Dry run changes nothing and lists every step.
    let (code, out, err) =
        failback_async(run_args(&w, &plan_path, &["--dry-run"]), w.env.clone()).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("power_on_appliance") && out.contains("no recovery instance"),
        "{out}"
    );
    assert!(
        !w.work.path().join("plan.toml.state").exists(),
        "dry run wrote state"
    );

    let sim = Sim::start(&w.vcsim, [bios(2)].into_iter().collect());
    let results = w.work.path().join("results.json");
    let (code, out, err) = failback_async(
        run_args(&w, &plan_path, &["--results", results.to_str().unwrap()]),
        w.env.clone(),
    )
    .await;
    sim.finish().await;
    assert_eq!(code, 10, "exit code says a VM failed:\n{out}\n{err}");
    let r = read_json(&results);
    let s = &r["summary"];
    assert_eq!(
        (
            s["succeeded"].as_u64(),
            s["failed"].as_u64(),
            s["skipped"].as_u64()
        ),
        (Some(2), Some(1), Some(2)),
        "{r:#}"
    );
    let by_name = |name: &str| {
        r["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["vm_name"] == name || v["vm"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no result for {name}"))
    };
    let failed = by_name(&w.vms[2].summary.name);
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["failed_step"], "wait_paired");
    let msg = failed["message"].as_str().unwrap();
    assert!(
        msg.contains("timeout") && msg.contains("rolled back"),
        "{msg}"
    );
    assert_eq!(by_name(&w.vms[3].summary.name)["status"], "skipped");
    let orphan_r = r["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["recovery_instance"] == orphan.as_str())
        .unwrap();
    assert_eq!(orphan_r["status"], "skipped");
    for i in 0..2 {
        let v = by_name(&w.vms[i].summary.name);
        assert_eq!(v["status"], "succeeded", "{v:#}");
        assert_eq!(v["vm_bios_uuid"], bios(i));
        assert_eq!(v["digests"].as_array().unwrap().len(), 1);
    }

    // Every VM (the failed one too, rolled back) is on, without ISOs, boot options as before.
    assert_vms_restored(&w.vc, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_orchestrator_resumes_without_repeating_destructive_steps() {
    let w = World::start(&["-vm", "2", "-host", "1"]).await;
    let before = boot_options_by_moref(&w.vms);
    let cdroms_before: HashMap<String, usize> = w
        .vms
        .iter()
        .map(|v| (v.summary.moref.clone(), v.summary.cdroms.len()))
        .collect();
    for v in &w.vms {
        w.dr.enroll_sim_agent(v.summary.bios_uuid.as_deref().unwrap(), 64 << 20)
            .await;
    }
    let plan_path = w.work.path().join("plan.json");
    one_click_plan(&w.env, &plan_path, &["--snapshot", "--keep-snapshot"]);
    let config_before = vm_config_dump(&w.vcsim);
    let sim = Sim::start(&w.vcsim, HashSet::new());
    let state = w.work.path().join("state");
    let results = w.work.path().join("results.json");
    let args = run_args(
        &w,
        &plan_path,
        &[
            "--state",
            state.to_str().unwrap(),
            "--results",
            results.to_str().unwrap(),
        ],
    );

    // Kill -9 the orchestrator once some VM is past "attach ISOs + boot order" (its VM
    // reconfigured, appliance booting): the worst moment to lose the saved boot options.
    let killed_at = kill_run_after(
        &args,
        &w.env,
        &state,
        failback_orchestrator::mass::state::Step::SetBootOrder,
    )
    .await;
    let mid = failback_orchestrator::mass::state::load(&state).unwrap();
    assert!(
        mid.vms
            .iter()
            .any(|v| v.status == failback_orchestrator::mass::state::VmStatus::Running),
        "killed after {killed_at:?} but nothing was running"
    );

    // A plain second run refuses to clobber the state; --resume finishes.
    let (code, _, err) = failback_async(args.clone(), w.env.clone()).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--resume"), "{err}");
    let mut resume = args.clone();
    resume.push("--resume".into());
    let (code, out, err) = failback_async(resume, w.env.clone()).await;
    let log = sim.finish().await;
    assert_eq!(code, 0, "{out}\n{err}");
    let r = read_json(&results);
    assert_eq!(
        r["summary"]["succeeded"].as_u64(),
        Some(w.vms.len() as u64),
        "{r:#}"
    );

    // On, no ISOs; saving boot options again after the kill would have saved "CD-ROM first".
    assert_vms_restored(&w.vc, &before).await;
    for v in
        w.vc.list_vms()
            .await
            .unwrap()
            .iter()
            .filter(|v| !v.summary.template)
    {
        assert_eq!(
            v.summary.cdroms.len(),
            cdroms_before[&v.summary.moref],
            "CD-ROM count of {}",
            v.summary.name
        );
        // One protective snapshot, not two.
        let snaps = w.vc.snapshots(&v.vmref).await.unwrap();
        assert_eq!(snaps.len(), 1, "snapshots of {}: {snaps:?}", v.summary.name);
    }
    // Read by pyVmomi: every device and boot option as before the run (the reused CD-ROMs
    // put back from the originals recorded before the kill), one kept snapshot each.
    let names: Vec<String> = w.vms.iter().map(|v| v.summary.name.clone()).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_same_config(&config_before, &vm_config_dump(&w.vcsim), &names);
    // One pairing per instance: tokens were not re-issued for VMs past that step.
    assert_eq!(log.paired.len(), w.vms.len());
}
