//! Engine tests on a hand-made, in-memory hypervisor and DR service (named fakes: they exist
//! to provoke what the real vcsim/DR service cannot on demand: a kill between two exact
//! steps, N transient errors, a client that never pairs). The real backends are exercised
//! end to end in tests/tests/mass_*.rs.

use super::backend::*;
use super::progress::NoProgress;
use super::runner::{InProgress, RunSettings, Runner};
use super::state::{self, Step, VmStatus};
use async_trait::async_trait;
use failback_api::{
    DiskDigest, DiskProgress, FailbackState, IdentificationHints, RecoveryInstance,
};
use failback_config::plan::{Plan, VmOptions, VmPlan, VmTarget, PLAN_VERSION};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
struct FakeVm {
    info: VmInfo,
    boot: String,
    cdroms: Vec<(i32, Option<String>, bool)>,
    next_key: i32,
}

#[derive(Default)]
struct World {
    vms: HashMap<String, FakeVm>,
    files: HashMap<String, String>,
    ops: Vec<(String, String)>,
    instances: HashMap<String, RecoveryInstance>,
    /// polls since the appliance booted, per instance
    boots: HashMap<String, u32>,
    /// instances whose client never pairs
    never_pairs: Vec<String>,
    /// VMs whose appliance powers the VM off at boot, before pairing (it printed a failure)
    appliance_dies: Vec<String>,
    /// transient failures to inject per op name
    flaky: HashMap<String, u32>,
    /// VMs whose next attach adds a drive, then fails (connection lost mid-operation)
    attach_breaks: Vec<String>,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<World>>);

impl Fake {
    fn w(&self) -> std::sync::MutexGuard<'_, World> {
        self.0.lock().unwrap()
    }
    fn op(&self, name: &str, vm: &str) -> BResult<()> {
        let mut w = self.w();
        if let Some(n) = w.flaky.get_mut(name) {
            if *n > 0 {
                *n -= 1;
                return Err(BackendError::transient(format!(
                    "{name} {vm}: connection reset"
                )));
            }
        }
        w.ops.push((name.to_string(), vm.to_string()));
        Ok(())
    }
    fn count(&self, name: &str, vm: &str) -> usize {
        self.w()
            .ops
            .iter()
            .filter(|(n, v)| n == name && v == vm)
            .count()
    }
    fn instance_of_vm(w: &World, moref: &str) -> Option<String> {
        let bios = w.vms[moref].info.bios_uuid.clone();
        w.instances
            .values()
            .find(|r| r.source_hints.vmware_uuid == bios)
            .map(|r| r.recovery_instance_id.clone())
    }
}

#[async_trait]
impl Hypervisor for Fake {
    async fn list_vms(&self) -> BResult<Vec<VmInfo>> {
        self.op("list", "-")?;
        Ok(self.w().vms.values().map(|v| v.info.clone()).collect())
    }
    async fn vm(&self, moref: &str) -> BResult<VmInfo> {
        Ok(self.w().vms[moref].info.clone())
    }
    async fn upload(&self, _local: &Path, ds: &str, sha: &str) -> BResult<()> {
        self.op("upload", ds)?;
        self.w().files.insert(ds.to_string(), sha.to_string());
        Ok(())
    }
    async fn has_file(&self, ds: &str, _size: u64, sha: &str) -> BResult<bool> {
        Ok(self.w().files.get(ds).is_some_and(|s| s == sha))
    }
    async fn shutdown_guest(&self, moref: &str) -> BResult<()> {
        self.op("shutdown_guest", moref)?;
        self.w().vms.get_mut(moref).unwrap().info.power = Power::Off;
        Ok(())
    }
    async fn power_off(&self, moref: &str) -> BResult<()> {
        self.op("power_off", moref)?;
        let mut w = self.w();
        let vm = w.vms.get_mut(moref).unwrap();
        if vm.info.power == Power::Off {
            return Err(BackendError::permanent(format!(
                "{moref}: InvalidPowerState"
            )));
        }
        vm.info.power = Power::Off;
        Ok(())
    }
    async fn power_on(&self, moref: &str) -> BResult<()> {
        self.op("power_on", moref)?;
        let mut w = self.w();
        let vm = w.vms.get_mut(moref).unwrap();
        if vm.info.power == Power::On {
            return Err(BackendError::permanent(format!(
                "{moref}: InvalidPowerState"
            )));
        }
        vm.info.power = Power::On;
        let appliance = vm.boot.starts_with("cdrom,") && vm.cdroms.iter().any(|c| c.1.is_some());
        if appliance && w.appliance_dies.iter().any(|m| m == moref) {
            w.vms.get_mut(moref).unwrap().info.power = Power::Off;
            return Ok(());
        }
        if appliance {
            if let Some(id) = Self::instance_of_vm(&w, moref) {
                w.boots.insert(id, 0);
            }
        }
        Ok(())
    }
    async fn create_snapshot(&self, moref: &str, name: &str, _d: &str) -> BResult<String> {
        self.op("snapshot", moref)?;
        Ok(format!("snap-{name}"))
    }
    async fn revert_snapshot(&self, moref: &str, _snapshot: &str) -> BResult<()> {
        self.op("revert", moref)
    }
    async fn remove_snapshot(&self, moref: &str, _snapshot: &str) -> BResult<()> {
        self.op("remove_snapshot", moref)
    }
    async fn delete_file(&self, ds: &str) -> BResult<()> {
        self.op("delete", ds)?;
        self.w().files.remove(ds);
        Ok(())
    }
    async fn save_boot(&self, moref: &str) -> BResult<SavedBoot> {
        self.op("save_boot", moref)?;
        Ok(SavedBoot(self.w().vms[moref].boot.clone()))
    }
    async fn devices_before(&self, moref: &str) -> BResult<DevicesBefore> {
        Ok(DevicesBefore {
            keys: self.w().vms[moref].cdroms.iter().map(|c| c.0).collect(),
            cdroms: vec![],
        })
    }
    async fn attach_isos(
        &self,
        moref: &str,
        isos: &[String],
        devices_before: Option<&DevicesBefore>,
    ) -> BResult<Vec<AttachedCdrom>> {
        self.op("attach", moref)?;
        let mut w = self.w();
        let breaks = w.attach_breaks.iter().position(|m| m == moref);
        if let Some(i) = breaks {
            w.attach_breaks.remove(i);
        }
        let vm = w.vms.get_mut(moref).unwrap();
        let mut out = vec![];
        for iso in isos {
            // Reuse a CD-ROM already holding this ISO (idempotent on resume), else a free one,
            // else add. Like vCenter, a reused drive does not tell who added it...
            let slot = vm
                .cdroms
                .iter()
                .position(|c| c.1.as_deref() == Some(iso))
                .or_else(|| vm.cdroms.iter().position(|c| c.1.is_none()));
            let (key, added) = match slot {
                Some(i) => {
                    vm.cdroms[i].1 = Some(iso.clone());
                    (vm.cdroms[i].0, false)
                }
                None => {
                    vm.next_key += 1;
                    vm.cdroms.push((vm.next_key, Some(iso.clone()), true));
                    (vm.next_key, true)
                }
            };
            // ...so, like the vCenter adapter, a drive missing from the devices recorded
            // before the run counts as added by it.
            let added = added || devices_before.is_some_and(|b| !b.keys.contains(&key));
            if added && breaks.is_some() {
                return Err(BackendError::transient(format!(
                    "attach {moref}: connection reset after adding drive {key}"
                )));
            }
            out.push(AttachedCdrom {
                device_key: key,
                added,
                iso: iso.clone(),
                detail: None,
            });
        }
        Ok(out)
    }
    async fn set_cdrom_first(&self, moref: &str, saved: &SavedBoot) -> BResult<()> {
        self.op("set_boot", moref)?;
        self.w().vms.get_mut(moref).unwrap().boot = format!("cdrom,{}", saved.0);
        Ok(())
    }
    async fn detach_isos(&self, moref: &str, attached: &[AttachedCdrom]) -> BResult<()> {
        self.op("detach", moref)?;
        let mut w = self.w();
        let vm = w.vms.get_mut(moref).unwrap();
        for a in attached {
            if a.added {
                vm.cdroms.retain(|c| c.0 != a.device_key);
            } else if let Some(c) = vm.cdroms.iter_mut().find(|c| c.0 == a.device_key) {
                c.1 = None;
            }
        }
        Ok(())
    }
    async fn restore_boot(&self, moref: &str, saved: &SavedBoot) -> BResult<()> {
        self.op("restore_boot", moref)?;
        self.w().vms.get_mut(moref).unwrap().boot = saved.0.clone();
        Ok(())
    }
}

#[async_trait]
impl DrService for Fake {
    async fn instances(&self) -> BResult<Vec<RecoveryInstance>> {
        Ok(self.w().instances.values().cloned().collect())
    }
    async fn instance(&self, id: &str) -> BResult<RecoveryInstance> {
        self.op("instance", id)?;
        let mut w = self.w();
        // The simulated client: pairs 2 polls after the appliance boots, ready 2 polls later.
        let never = w.never_pairs.contains(&id.to_string());
        if let Some(n) = w.boots.get_mut(id) {
            *n += 1;
            let n = *n;
            let ri = w.instances.get_mut(id).unwrap();
            let new_client = format!("client-{id}");
            if !never && n >= 2 && ri.failback.client_id.as_ref() != Some(&new_client) {
                ri.failback.client_id = Some(new_client);
                ri.failback.state = FailbackState::FailbackInProgress;
                ri.failback.disks = vec![DiskProgress {
                    remote_id: "disk0".into(),
                    local_path: "/dev/sda".into(),
                    total_bytes: 1 << 20,
                    replicated_bytes: 0,
                    rescanned_bytes: 0,
                    backlog_bytes: 1 << 20,
                    ..Default::default()
                }];
            }
            if ri.failback.client_id.as_deref() == Some(&format!("client-{id}"))
                && n >= 4
                && ri.failback.state == FailbackState::FailbackInProgress
            {
                ri.failback.state = FailbackState::FailbackReadyForLaunch;
                ri.failback.disks[0].replicated_bytes = 1 << 20;
            }
            if ri.failback.launch_requested_at.is_some()
                && ri.failback.state == FailbackState::FailbackReadyForLaunch
            {
                ri.failback.state = FailbackState::FailbackCompleted;
                ri.failback.digests = vec![DiskDigest {
                    remote_id: "disk0".into(),
                    local_path: "/dev/sda".into(),
                    local_digest: "ab".repeat(32),
                    agent_digest: "ab".repeat(32),
                }];
            }
        }
        w.instances
            .get(id)
            .cloned()
            .ok_or_else(|| BackendError::permanent(format!("no recovery instance {id}")))
    }
    async fn create_pairing_token(&self, id: &str, _ttl: u64) -> BResult<String> {
        self.op("token", id)?;
        Ok(format!("tok-{id}"))
    }
    async fn launch(&self, id: &str) -> BResult<()> {
        self.op("launch", id)?;
        self.w()
            .instances
            .get_mut(id)
            .unwrap()
            .failback
            .launch_requested_at = Some(1);
        Ok(())
    }
    async fn stop(&self, id: &str) -> BResult<()> {
        self.op("stop", id)?;
        let mut w = self.w();
        let ri = w.instances.get_mut(id).unwrap();
        ri.failback.state = FailbackState::FailbackNotStarted;
        ri.failback.launch_requested_at = None;
        Ok(())
    }
}

impl SeedBuilder for Fake {
    fn build(&self, input: &SeedInput, out: &Path) -> BResult<()> {
        std::fs::write(
            out,
            format!("seed {} {}", input.recovery_instance_id, input.token),
        )
        .map_err(|e| BackendError::permanent(e.to_string()))
    }
}

fn uuid(n: usize) -> String {
    format!("42{n:06}-0000-0000-0000-000000000000")
}

fn world(n: usize) -> Fake {
    let f = Fake::default();
    {
        let mut w = f.w();
        for i in 0..n {
            let moref = format!("vm-{i}");
            w.vms.insert(
                moref.clone(),
                FakeVm {
                    info: VmInfo {
                        vcenter: None,
                        moref: moref.clone(),
                        name: format!("web-{i}"),
                        bios_uuid: Some(uuid(i)),
                        instance_uuid: None,
                        macs: vec![],
                        power: if i % 2 == 0 { Power::On } else { Power::Off },
                        tools_running: i % 4 == 0,
                        guest_ip: None,
                        disks: vec![],
                    },
                    boot: format!("disk:{i},net:4000"),
                    cdroms: vec![(3000, None, false)],
                    next_key: 3100,
                },
            );
            let id = format!("i-{i:08x}");
            w.instances.insert(
                id.clone(),
                RecoveryInstance {
                    recovery_instance_id: id,
                    hostname: None,
                    source_hints: IdentificationHints {
                        vmware_uuid: Some(uuid(i)),
                        ..Default::default()
                    },
                    agent: Default::default(),
                    failback: Default::default(),
                    config: Default::default(),
                    created_at: 0,
                },
            );
        }
    }
    f
}

fn plan_for(f: &Fake, snapshot: bool) -> Plan {
    let w = f.w();
    let mut vms: Vec<VmPlan> = w
        .instances
        .values()
        .map(|ri| {
            let vm = w
                .vms
                .values()
                .find(|v| v.info.bios_uuid == ri.source_hints.vmware_uuid)
                .unwrap();
            let mut options = VmOptions {
                protective_snapshot: snapshot,
                ..Default::default()
            };
            options.timeouts.pair_secs = 2;
            VmPlan {
                recovery_instance: Some(ri.recovery_instance_id.clone()),
                wave: None,
                vcenter: None,
                matched_by: None,
                target: VmTarget {
                    name: Some(vm.info.name.clone()),
                    ..Default::default()
                },
                network: Default::default(),
                device_mapping: vec![],
                options,
            }
        })
        .collect();
    vms.sort_by(|a, b| a.target.name.cmp(&b.target.name));
    Plan {
        version: PLAN_VERSION,
        unmatched_instances: vec!["i-deadbeef".into()],
        waves: vec![],
        vcenters: vec![],
        vms,
    }
}

struct Env {
    _dir: tempfile::TempDir,
    plan_path: PathBuf,
    settings: RunSettings,
}

fn env(plan: &Plan) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let plan_path = dir.path().join("plan.toml");
    std::fs::write(
        &plan_path,
        plan.encode(failback_config::plan::PlanFormat::Toml)
            .unwrap(),
    )
    .unwrap();
    let iso = dir.path().join("failback.iso");
    std::fs::write(&iso, b"appliance").unwrap();
    let settings = RunSettings {
        parallel: 3,
        folder: "failback".into(),
        appliance_iso: iso,
        seed_server_url: "https://10.0.2.2:8443".into(),
        in_progress: InProgress::Skip,
        launch: None,
        token_ttl_secs: 3600,
        poll_interval_ms: 10,
        attempts: 4,
        work_dir: dir.path().join("work"),
        state_dir: dir.path().join("state"),
        results_path: dir.path().join("results.json"),
        retry_failed: false,
        keep_seeds: false,
        cleanup: false,
        endpoints: serde_json::json!({}),
    };
    Env {
        _dir: dir,
        plan_path,
        settings,
    }
}

fn runner(f: &Fake, settings: RunSettings) -> Runner {
    Runner {
        vcenters: vec![VcenterConn {
            name: None,
            hv: Arc::new(f.clone()),
            datastore: "ds".into(),
            folder: "failback".into(),
        }],
        dr: Arc::new(f.clone()),
        seed: Arc::new(f.clone()),
        progress: Arc::new(NoProgress),
        ca_pem: "CA".into(),
        settings,
    }
}

fn assert_restored(f: &Fake, n: usize) {
    let w = f.w();
    for i in 0..n {
        let vm = &w.vms[&format!("vm-{i}")];
        assert_eq!(
            vm.boot,
            format!("disk:{i},net:4000"),
            "boot options of vm-{i}"
        );
        assert_eq!(vm.cdroms, vec![(3000, None, false)], "CD-ROMs of vm-{i}");
        assert_eq!(vm.info.power, Power::On, "vm-{i} powered on");
    }
}

#[tokio::test]
async fn all_vms_succeed_with_transient_errors_and_results_say_so() {
    let f = world(5);
    f.w().flaky.insert("attach".into(), 2);
    f.w().flaky.insert("power_on".into(), 1);
    let plan = plan_for(&f, true);
    let e = env(&plan);
    let out = runner(&f, e.settings.clone())
        .run(&plan, &e.plan_path, false)
        .await
        .unwrap();
    let r = &out.results;
    assert_eq!(r.summary.succeeded, 5, "{:#?}", r.vms);
    assert_eq!(r.summary.skipped, 1); // the unmatched instance
    assert!(!out.any_failed());
    assert_restored(&f, 5);
    for i in 0..5 {
        let m = format!("vm-{i}");
        assert_eq!(f.count("snapshot", &m), 1);
        assert_eq!(f.count("restore_boot", &m), 1);
        // guest shutdown used where tools run
        assert_eq!(f.count("shutdown_guest", &m), usize::from(i % 4 == 0));
    }
    assert_eq!(f.count("upload", "failback/failback.iso"), 1);
    let v = r.vms.iter().find(|v| v.vm == "web-1").unwrap();
    assert_eq!(v.digests.len(), 1);
    assert_eq!(v.disk_bytes, 1 << 20);
    assert_eq!(v.vm_bios_uuid.as_deref(), Some(uuid(1).as_str()));
    assert!(v.step_secs.contains_key("wait_ready"));
    // The results file on disk is the same.
    let on_disk: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&e.settings.results_path).unwrap()).unwrap();
    assert_eq!(on_disk["summary"]["succeeded"], 5);
    assert_eq!(on_disk["settings"]["parallel"], 3);
    // A second run on the same state refuses (resume or pick another state dir).
    let err = runner(&f, e.settings.clone())
        .run(&plan, &e.plan_path, false)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--resume"), "{err}");
}

#[tokio::test]
async fn never_pairing_client_fails_that_vm_only_and_rolls_back() {
    let f = world(3);
    f.w().never_pairs.push("i-00000001".into());
    let plan = plan_for(&f, false);
    let e = env(&plan);
    let out = runner(&f, e.settings.clone())
        .run(&plan, &e.plan_path, false)
        .await
        .unwrap();
    assert!(out.any_failed());
    let r = &out.results;
    assert_eq!(r.summary.succeeded, 2);
    assert_eq!(r.summary.failed, 1);
    let bad = r.vms.iter().find(|v| v.vm == "web-1").unwrap();
    assert_eq!(bad.status, VmStatus::Failed);
    assert_eq!(bad.failed_step, Some(Step::WaitPaired));
    let msg = bad.message.as_deref().unwrap();
    assert!(
        msg.contains("timeout") && msg.contains("i-00000001") && msg.contains("rolled back"),
        "{msg}"
    );
    // Rolled back: ISOs out, boot options back, VM was off before, stays off.
    let w = f.w();
    let vm = &w.vms["vm-1"];
    assert_eq!(vm.boot, "disk:1,net:4000");
    assert_eq!(vm.cdroms, vec![(3000, None, false)]);
    assert_eq!(vm.info.power, Power::Off);
}

#[tokio::test]
async fn an_appliance_that_powers_its_vm_off_fails_that_vm_without_waiting_pair_secs() {
    let f = world(2);
    f.w().never_pairs.push("i-00000001".into());
    f.w().appliance_dies.push("vm-1".into());
    let mut plan = plan_for(&f, false);
    for vm in &mut plan.vms {
        vm.options.timeouts.pair_secs = 600;
    }
    let e = env(&plan);
    let out = runner(&f, e.settings.clone())
        .run(&plan, &e.plan_path, false)
        .await
        .unwrap();
    let r = &out.results;
    assert_eq!((r.summary.succeeded, r.summary.failed), (1, 1));
    let bad = r.vms.iter().find(|v| v.vm == "web-1").unwrap();
    assert_eq!(bad.failed_step, Some(Step::WaitPaired));
    // Not the 600 s pair timeout's message: the watch saw the VM off.
    let msg = bad.message.as_deref().unwrap();
    assert!(
        msg.contains("powered off before its appliance paired") && msg.contains("vm-1"),
        "{msg}"
    );
}

#[tokio::test]
async fn killed_mid_run_resume_finishes_without_repeating_destructive_steps() {
    let n = 4;
    let f = world(n);
    let plan = plan_for(&f, true);
    let e = env(&plan);
    // "Kill" the orchestrator (drop its future) once two appliances are up.
    {
        let r = runner(&f, e.settings.clone());
        let f2 = f.clone();
        let run = r.run(&plan, &e.plan_path, false);
        tokio::select! {
            _ = run => panic!("run finished before the kill"),
            _ = async move {
                loop {
                    if f2.w().boots.len() >= 2 { break; }
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            } => {}
        }
    }
    let mid = state::load(&e.settings.state_dir).unwrap();
    assert!(
        mid.vms.iter().any(|v| v.status == VmStatus::Running),
        "{:#?}",
        mid.vms
    );
    let out = runner(&f, e.settings.clone())
        .run(&plan, &e.plan_path, true)
        .await
        .unwrap();
    assert_eq!(out.results.summary.succeeded, n, "{:#?}", out.results.vms);
    assert_restored(&f, n);
    // Exactly the operations of an uninterrupted run, none repeated.
    for i in 0..n {
        let m = format!("vm-{i}");
        for op in [
            "snapshot",
            "save_boot",
            "attach",
            "set_boot",
            "restore_boot",
            "detach",
        ] {
            assert_eq!(f.count(op, &m), 1, "{op} on {m}");
        }
        assert_eq!(f.count("token", &format!("i-{i:08x}")), 1, "token for {m}");
        assert_eq!(
            f.count("power_on", &m),
            2,
            "power on (appliance, then disk) of {m}"
        );
        let was_on = i % 2 == 0;
        let offs = f.count("power_off", &m) + f.count("shutdown_guest", &m);
        assert_eq!(offs, if was_on { 2 } else { 1 }, "power offs of {m}");
    }
    // Resuming a finished run is a no-op that reports the same results.
    let again = runner(&f, e.settings.clone())
        .run(&plan, &e.plan_path, true)
        .await
        .unwrap();
    assert_eq!(again.results.summary.succeeded, n);
    assert_eq!(f.count("power_on", "vm-0"), 2);
}

#[tokio::test]
async fn attach_interrupted_after_adding_a_drive_still_removes_it() {
    let n = 2;
    let f = world(n);
    f.w().attach_breaks.push("vm-1".into());
    let plan = plan_for(&f, true);
    let e = env(&plan);
    let out = runner(&f, e.settings.clone())
        .run(&plan, &e.plan_path, false)
        .await
        .unwrap();
    assert_eq!(out.results.summary.succeeded, n, "{:#?}", out.results.vms);
    assert_eq!(f.count("attach", "vm-1"), 2, "the attach was retried");
    // The retry found the seed ISO already in the drive the first attempt added; the
    // devices recorded before the run mark that drive as ours, so it is removed again.
    assert_restored(&f, n);
}

#[tokio::test]
async fn resume_refuses_another_plan() {
    let f = world(1);
    let plan = plan_for(&f, false);
    let e = env(&plan);
    runner(&f, e.settings.clone())
        .run(&plan, &e.plan_path, false)
        .await
        .unwrap();
    let mut other = plan.clone();
    other.vms[0].options.protective_snapshot = true;
    std::fs::write(
        &e.plan_path,
        other
            .encode(failback_config::plan::PlanFormat::Toml)
            .unwrap(),
    )
    .unwrap();
    let err = runner(&f, e.settings.clone())
        .run(&other, &e.plan_path, true)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("same plan"), "{err}");
}

#[tokio::test]
async fn in_progress_skip_and_restart() {
    let f = world(2);
    for ri in f.w().instances.values_mut() {
        ri.failback.state = FailbackState::FailbackInProgress;
        ri.failback.client_id = Some("old-client".into());
    }
    let plan = plan_for(&f, false);
    let e = env(&plan);
    let out = runner(&f, e.settings.clone())
        .run(&plan, &e.plan_path, false)
        .await
        .unwrap();
    assert_eq!(out.results.summary.skipped, 3);
    let v = &out.results.vms[0];
    assert!(
        v.message
            .as_deref()
            .unwrap()
            .contains("--in-progress restart"),
        "{v:?}"
    );
    assert_eq!(f.count("power_off", "vm-0"), 0);

    let f = world(2);
    for ri in f.w().instances.values_mut() {
        ri.failback.state = FailbackState::FailbackInProgress;
        ri.failback.client_id = Some("old-client".into());
    }
    // The old client id must not count as "paired": the sim pairs with a new id.
    let plan = plan_for(&f, false);
    let mut e = env(&plan);
    e.settings.in_progress = InProgress::Restart;
    let out = runner(&f, e.settings.clone())
        .run(&plan, &e.plan_path, false)
        .await
        .unwrap();
    assert_eq!(out.results.summary.succeeded, 2, "{:#?}", out.results.vms);
    assert_eq!(f.count("stop", "i-00000000"), 1);
}

#[tokio::test]
async fn manual_launch_waits_for_the_admin() {
    let f = world(1);
    let plan = plan_for(&f, false);
    let mut e = env(&plan);
    e.settings.launch = Some(failback_config::plan::LaunchMode::Manual);
    let f2 = f.clone();
    let admin = tokio::spawn(async move {
        loop {
            let ready = f2.w().instances["i-00000000"].failback.state
                == FailbackState::FailbackReadyForLaunch;
            if ready {
                f2.w()
                    .instances
                    .get_mut("i-00000000")
                    .unwrap()
                    .failback
                    .launch_requested_at = Some(9);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    });
    let out = runner(&f, e.settings.clone())
        .run(&plan, &e.plan_path, false)
        .await
        .unwrap();
    admin.await.unwrap();
    assert_eq!(out.results.summary.succeeded, 1);
    assert_eq!(
        f.count("launch", "i-00000000"),
        0,
        "manual mode must not launch"
    );
}

#[tokio::test]
async fn unresolvable_vm_fails_with_its_name() {
    let f = world(1);
    let mut plan = plan_for(&f, false);
    plan.vms[0].target.name = Some("ghost".into());
    let e = env(&plan);
    let out = runner(&f, e.settings.clone())
        .run(&plan, &e.plan_path, false)
        .await
        .unwrap();
    let v = &out.results.vms[0];
    assert_eq!(v.status, VmStatus::Failed);
    assert!(
        v.message.as_deref().unwrap().contains("name ghost"),
        "{v:?}"
    );
}
