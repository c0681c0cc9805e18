//! Many vCenters in one plan: two real vcsim instances (same inventory names and morefs, as
//! two sites built from one template would have), one DR service, the real `failback` CLI and
//! simulated clients (no QEMU). `[[vcenter]]` entries with credentials from environment
//! variables and from a 0600 file (a group-readable one is refused, naming path and mode);
//! `mass find` / `mass plan --one-click --vcenters` search both; the run uploads the appliance
//! once per vCenter datastore, is killed with SIGKILL mid-run and finished with `--resume
//! --cleanup`; every VM of both vCenters is compared before/after with pyVmomi.

mod mass_common;

use failback_orchestrator::mass::state::{self, Step, VmStatus};
use mass_common::*;
use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_vcenters_one_plan_killed_and_resumed() {
    let east = Vcsim::start(&["-vm", "1", "-host", "1"]); // 2 VMs each
    let west = Vcsim::start(&["-vm", "1", "-host", "1"]);
    let dr = DrService::start_for_simulation();
    let work = tempfile::tempdir().unwrap();
    let vms_east = non_template_vms(&east.client().await).await;
    let vms_west = non_template_vms(&west.client().await).await;
    // vcsim derives BIOS UUIDs from inventory paths: give west's VMs their own.
    for (i, v) in vms_west.iter().enumerate() {
        let uuid = format!("5e5e5e5e-0000-4000-8000-00000000000{i}");
        vm_config_set(&west, &v.summary.name, &[&format!("uuid={uuid}")]);
    }
    let vms_west = non_template_vms(&west.client().await).await;
    for v in vms_east.iter().chain(&vms_west) {
        dr.enroll_sim_agent(v.summary.bios_uuid.as_deref().unwrap(), 64 << 20)
            .await;
    }

    // east: credentials from environment variables; west: from a credentials file.
    let cred = work.path().join("west.cred");
    std::fs::write(
        &cred,
        format!(
            "user = \"{}\"\npassword = \"{}\"\n",
            west.var("VCSIM_USERNAME"),
            west.var("VCSIM_PASSWORD")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o640)).unwrap();
    let vcenters = work.path().join("vcenters.toml");
    std::fs::write(
        &vcenters,
        format!(
            "[[vcenter]]\nname = \"east\"\nhost = \"{}\"\ndatastore = \"LocalDS_0\"\n\
             user_env = \"VC_EAST_USER\"\npassword_env = \"VC_EAST_PASSWORD\"\ninsecure = true\n\n\
             [[vcenter]]\nname = \"west\"\nhost = \"{}\"\ndatastore = \"LocalDS_0\"\n\
             folder = \"fb-west\"\ncredentials_file = \"{}\"\ninsecure = true\n",
            east.url(),
            west.url(),
            cred.display()
        ),
    )
    .unwrap();
    // No VCENTER_* variables: everything comes from the [[vcenter]] entries.
    let mut env = dr.cli_env();
    env.push(("VC_EAST_USER".into(), east.var("VCSIM_USERNAME").into()));
    env.push(("VC_EAST_PASSWORD".into(), east.var("VCSIM_PASSWORD").into()));
    let vcs = vcenters.to_str().unwrap();

    // A credentials file others may read is refused, naming the file and its mode.
    let (code, out, err) = failback(&["mass", "find", "--vcenters", vcs], &env);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(
        err.contains(&cred.display().to_string()) && err.contains("mode 0640"),
        "{err}"
    );
    std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o600)).unwrap();

    // find searches both vCenters; the same names and morefs are two VMs each.
    let (code, out, err) = failback(
        &["mass", "find", "--vcenters", vcs, "--output", "json"],
        &env,
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let found: serde_json::Value = serde_json::from_str(&out).unwrap();
    let found = found["vms"].as_array().unwrap();
    assert_eq!(found.len(), 4, "{out}");
    for vc in ["east", "west"] {
        let mine: Vec<_> = found.iter().filter(|v| v["vcenter"] == vc).collect();
        assert_eq!(mine.len(), 2, "{out}");
        assert!(
            mine.iter().all(|v| v["recovery_instance"].is_string()),
            "{out}"
        );
    }

    let plan_path = work.path().join("plan.toml");
    let (plan, _) = one_click_plan(
        &env,
        &plan_path,
        &["--vcenters", vcs, "--snapshot", "--keep-snapshot"],
    );
    assert_eq!(plan.vcenters.len(), 2, "{plan:#?}");
    assert_eq!(plan.vms.len(), 4);
    for vc in ["east", "west"] {
        let n = plan.vms.iter().filter(|v| v.vcenter.as_deref() == Some(vc));
        assert_eq!(n.count(), 2, "{plan:#?}");
    }

    let state_dir = work.path().join("state");
    let results = work.path().join("results.json");
    let args = mass_run_args(
        &plan_path,
        work.path(),
        4,
        &[
            "--state",
            state_dir.to_str().unwrap(),
            "--results",
            results.to_str().unwrap(),
        ],
    );
    // The dry run names each VM's vCenter.
    let mut dry = args.clone();
    dry.push("--dry-run".into());
    let (code, out, err) = failback_async(dry, env.clone()).await;
    assert_eq!(code, 0, "{out}\n{err}");
    for v in &vms_east {
        assert!(
            out.contains(&format!("{} [vCenter east] <- ", v.summary.name)),
            "{out}"
        );
    }
    assert_eq!(out.matches("[vCenter west]").count(), 2, "{out}");

    let before_east = vm_config_dump(&east);
    let before_west = vm_config_dump(&west);
    let sim_east = Sim::start(&east, HashSet::new());
    let sim_west = Sim::start(&west, HashSet::new());

    // kill -9 once a VM is past "attach ISOs + boot order".
    kill_run_after(&args, &env, &state_dir, Step::SetBootOrder).await;
    let mid = state::load(&state_dir).unwrap();
    assert!(mid.vms.iter().any(|v| v.status == VmStatus::Running));
    // The state knows each VM's vCenter, and the appliance went to each vCenter's datastore.
    for v in &mid.vms {
        assert!(
            v.vm.starts_with(&format!("{}/", v.vcenter.as_deref().unwrap())),
            "{v:?}"
        );
    }
    let copies: Vec<_> = mid
        .header
        .appliances
        .iter()
        .map(|a| (a.file.vcenter.clone().unwrap(), a.file.path.clone()))
        .collect();
    assert_eq!(
        copies,
        vec![
            ("east".to_string(), "failback/failback.iso".to_string()),
            ("west".to_string(), "fb-west/failback.iso".to_string())
        ]
    );
    assert!(east
        .datastore_dir("LocalDS_0")
        .join("failback/failback.iso")
        .exists());
    assert!(west
        .datastore_dir("LocalDS_0")
        .join("fb-west/failback.iso")
        .exists());

    let mut resume = args.clone();
    resume.extend(["--resume".to_string(), "--cleanup".to_string()]);
    let (code, out, err) = failback_async(resume, env.clone()).await;
    let log_east = sim_east.finish().await;
    let log_west = sim_west.finish().await;
    assert_eq!(code, 0, "{out}\n{err}");
    // One pairing per instance: no token re-issued after the kill.
    assert_eq!((log_east.paired.len(), log_west.paired.len()), (2, 2));

    let r = read_json(&results);
    assert_eq!(r["summary"]["succeeded"], 4, "{r:#}");
    let by = results_by_vm(&r);
    for (vc, vms) in [("east", &vms_east), ("west", &vms_west)] {
        for v in vms.iter() {
            let got = &by[&format!("{vc}/{}", v.summary.name)];
            assert_eq!(got["vcenter"], vc, "{got:#}");
            assert_eq!(got["vm_bios_uuid"], v.summary.bios_uuid.as_deref().unwrap());
            assert_eq!(got["snapshot_outcome"], "kept");
            assert_eq!(got["seed_deleted"], true);
        }
    }
    // --cleanup removed both appliance copies and says so; nothing is left behind.
    assert_eq!(r["left_behind"], serde_json::json!([]), "{r:#}");
    assert_eq!(
        r["removed"],
        serde_json::json!([
            {"vcenter": "east", "datastore": "LocalDS_0", "path": "failback/failback.iso"},
            {"vcenter": "west", "datastore": "LocalDS_0", "path": "fb-west/failback.iso"},
        ])
    );
    assert!(!east
        .datastore_dir("LocalDS_0")
        .join("failback/failback.iso")
        .exists());
    assert!(!west
        .datastore_dir("LocalDS_0")
        .join("fb-west/failback.iso")
        .exists());

    // pyVmomi, on both vCenters: every device and boot option as before, one kept snapshot.
    for (vcsim, before, vms) in [
        (&east, &before_east, &vms_east),
        (&west, &before_west, &vms_west),
    ] {
        let names: Vec<&str> = vms.iter().map(|v| v.summary.name.as_str()).collect();
        assert_same_config(before, &vm_config_dump(vcsim), &names);
    }
}
