//! Scale test without QEMU: 500 VMs in vcsim, 500 recovery instances in the real DR service
//! (simulated agents), simulated clients (see mass_common) pairing and reporting through the
//! real client API, and the real `failback mass plan --one-click` + `failback mass run`.
//! Asserts every VM succeeded and ends powered on with its ISOs detached and its boot options
//! exactly as before; prints the orchestration overhead (timings are reported, not asserted).
//! `FAILBACK_SCALE_VMS` overrides the VM count (even number).

mod mass_common;

use mass_common::*;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mass_run_500_vms_with_simulated_clients() {
    let n: usize = std::env::var("FAILBACK_SCALE_VMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    // One standalone host + one cluster = two resource pools.
    let per_pool = (n / 2).to_string();
    let vcsim = Vcsim::start(&["-vm", &per_pool, "-host", "1"]);
    let dr = DrService::start_for_simulation();
    let vc = vcsim.client().await;
    let vms = non_template_vms(&vc).await;
    assert_eq!(vms.len(), n, "vcsim VM count");
    let before = boot_options_by_moref(vms.iter());
    let bios: Vec<String> = vms
        .iter()
        .map(|v| v.summary.bios_uuid.clone().unwrap())
        .collect();
    assert_eq!(
        bios.iter().collect::<HashSet<_>>().len(),
        n,
        "unique BIOS UUIDs"
    );

    // Recovery instances, one per VM, matched by BIOS UUID.
    let t0 = Instant::now();
    let dr = Arc::new(dr);
    let mut ids = Vec::new();
    for chunk in bios.chunks(25) {
        let futs = chunk.iter().map(|b| {
            let dr = dr.clone();
            let b = b.clone();
            async move { dr.enroll_sim_agent(&b, 64 << 20).await }
        });
        ids.extend(futures::future::join_all(futs).await);
    }
    eprintln!(
        "enrolled {n} simulated agents in {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    let work = tempfile::tempdir().unwrap();
    let plan = work.path().join("plan.toml");
    let mut env = vcsim.cli_env();
    env.extend(dr.cli_env());
    let (_, out) = one_click_plan(&env, &plan, &[]);
    assert!(out.contains(&format!("{n} matched")), "{out}");

    let appliance = work.path().join("failback.iso");
    std::fs::write(&appliance, vec![7u8; 1 << 20]).unwrap();
    let results = work.path().join("results.json");

    let sim = Sim::start(&vcsim, HashSet::new());

    let t_run = Instant::now();
    let args: Vec<String> = [
        "mass",
        "run",
        plan.to_str().unwrap(),
        "--parallel",
        "50",
        "--poll-ms",
        "500",
        "--appliance-iso",
        appliance.to_str().unwrap(),
        "--results",
        results.to_str().unwrap(),
        "--progress",
        "none",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (code, out, err) = failback_async(args, env.clone()).await;
    let wall = t_run.elapsed().as_secs_f64();
    let log = sim.finish().await;
    assert_eq!(code, 0, "run: {out}\n{err}");

    let r = read_json(&results);
    assert_eq!(r["summary"]["succeeded"], n, "{}", r["summary"]);
    assert_eq!(r["summary"]["failed"], 0);
    assert_eq!(log.completed.len(), n);

    // Every VM: powered on, no ISO attached, boot options exactly as before.
    assert_vms_restored(&vc, &before).await;

    // Orchestration overhead: time in the orchestrator's own steps (vCenter, DR service,
    // seed ISO), i.e. everything except waiting for the clients.
    let mut own = Vec::new();
    for v in r["vms"].as_array().unwrap() {
        let s: f64 = v["step_secs"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| !k.starts_with("wait_"))
            .map(|(_, x)| x.as_f64().unwrap())
            .sum();
        own.push(s);
    }
    own.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mean = own.iter().sum::<f64>() / own.len() as f64;
    let p95 = own[(own.len() * 95 / 100).min(own.len() - 1)];
    eprintln!(
        "SCALE: {n} VMs, parallel 50: wall {wall:.1} s ({:.0} VMs/min); orchestrator steps per VM (excluding waits for the client): mean {mean:.2} s, p95 {p95:.2} s",
        n as f64 / wall * 60.0
    );
}
