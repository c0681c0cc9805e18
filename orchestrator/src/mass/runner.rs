//! The run engine: every VM of a plan through the failback steps, at most N at a time, with
//! durable per-step state, retries for transient errors, per-phase timeouts, rollback of a
//! failed VM's configuration, and a results file. One VM's failure never stops the others.

use super::backend::{
    BackendError, DrService, Hypervisor, Power, SeedBuilder, SeedInput, VcenterConn, VmInfo,
};
use super::matching::{norm_mac, norm_uuid};
use super::progress::RunProgress;
use super::results::RunResults;
use super::state::{
    ApplianceCopy, DatastoreFile, RunHeader, RunState, SnapshotOutcome, StateDir, StateError, Step,
    VmState, VmStatus, STATE_FORMAT,
};
use failback_api::{FailbackState, RecoveryInstance};
use failback_config::plan::{LaunchMode, OnFailure, Plan, Readiness, VmPlan, Wave, WavePolicy};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What to do with recovery instances already in failback (DRSFA asks the same question).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum InProgress {
    /// Leave them alone; reported as skipped.
    Skip,
    /// Stop their failback and start over.
    Restart,
}

/// Settings of a run (recorded verbatim in the results file).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSettings {
    pub parallel: usize,
    /// Default folder inside a datastore for the ISOs (no `[datastore]` prefix); a plan's
    /// `[[vcenter]]` entry may name its own.
    pub folder: String,
    pub appliance_iso: PathBuf,
    /// DR service URL written into seed ISOs (as the appliances reach it).
    pub seed_server_url: String,
    pub in_progress: InProgress,
    /// Overrides every plan entry's launch mode when set.
    pub launch: Option<LaunchMode>,
    pub token_ttl_secs: u64,
    pub poll_interval_ms: u64,
    /// Attempts per step for transient errors.
    pub attempts: u32,
    /// Where seed ISOs are built.
    pub work_dir: PathBuf,
    pub state_dir: PathBuf,
    pub results_path: PathBuf,
    /// Continue failed VMs too when resuming.
    pub retry_failed: bool,
    /// Keep each VM's seed ISO (one-time token + CA) on the datastore and in the work dir.
    #[serde(default)]
    pub keep_seeds: bool,
    /// Delete the appliance ISO from the datastore at the end of the run.
    #[serde(default)]
    pub cleanup: bool,
    /// Free-form description of the endpoints (vCenter, DR service) for the results file.
    pub endpoints: serde_json::Value,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot read appliance ISO {path}: {source}")]
    Appliance {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read plan {path}: {source}")]
    Plan {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write results file {path}: {source}")]
    Results {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot list vCenter VMs: {0}")]
    ListVms(String),
    #[error("the plan's VM {vm} names vCenter {vcenter}, which this run is not connected to")]
    UnknownVcenter { vm: String, vcenter: String },
}

/// Outcome of a run (the results are also in the results file).
#[derive(Debug)]
pub struct RunOutcome {
    pub results: RunResults,
}

impl RunOutcome {
    pub fn any_failed(&self) -> bool {
        self.results.summary.failed > 0 || self.results.summary.unfinished > 0
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Find the plan entry's VM in the inventory; every identifier given must agree.
pub fn resolve_vm<'a>(p: &VmPlan, vms: &'a [VmInfo]) -> Result<&'a VmInfo, String> {
    let t = &p.target;
    let fits = |vm: &VmInfo| {
        t.moref.as_ref().is_none_or(|m| *m == vm.moref)
            && t.name.as_ref().is_none_or(|n| *n == vm.name)
            && t.bios_uuid
                .as_ref()
                .is_none_or(|u| vm.bios_uuid.as_deref().map(norm_uuid) == Some(norm_uuid(u)))
            && t.instance_uuid
                .as_ref()
                .is_none_or(|u| vm.instance_uuid.as_deref().map(norm_uuid) == Some(norm_uuid(u)))
    };
    let found: Vec<&VmInfo> = vms.iter().filter(|v| fits(v)).collect();
    match found.as_slice() {
        [one] => Ok(one),
        [] => Err(format!("no vCenter VM has {}", describe_target(p))),
        many => Err(format!(
            "{} vCenter VMs have {} ({}); add moref or a UUID to the plan",
            many.len(),
            describe_target(p),
            many.iter()
                .map(|v| v.moref.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn describe_target(p: &VmPlan) -> String {
    let t = &p.target;
    let mut parts = vec![];
    if let Some(v) = &t.name {
        parts.push(format!("name {v}"));
    }
    if let Some(v) = &t.moref {
        parts.push(format!("moref {v}"));
    }
    if let Some(v) = &t.bios_uuid {
        parts.push(format!("BIOS UUID {v}"));
    }
    if let Some(v) = &t.instance_uuid {
        parts.push(format!("instance UUID {v}"));
    }
    parts.join(" and ")
}

fn safe_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A step's failure: what went wrong, and whether retrying could help.
type StepResult<T> = Result<T, BackendError>;

/// The engine.
pub struct Runner {
    /// Every vCenter of the plan (one, unnamed, in the single-vCenter form).
    pub vcenters: Vec<VcenterConn>,
    pub dr: Arc<dyn DrService>,
    pub seed: Arc<dyn SeedBuilder>,
    pub progress: Arc<dyn RunProgress>,
    /// CA certificate (PEM) of the DR service, written into every seed.
    pub ca_pem: String,
    pub settings: RunSettings,
}

struct Shared {
    state: Mutex<RunState>,
    dir: StateDir,
    /// File name of the appliance ISO inside each vCenter's ISO folder.
    appliance_file: String,
    waves: Vec<Wave>,
}

/// The wave of a plan entry: its index in `[[wave]]` (0 for a plan without waves).
pub fn wave_index(plan: &Plan, p: &VmPlan) -> usize {
    p.wave
        .as_ref()
        .and_then(|w| plan.waves.iter().position(|x| x.name == *w))
        .unwrap_or(0)
}

impl Shared {
    fn vm(&self, i: usize) -> VmState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).vms[i].clone()
    }
    /// Record a VM's state in memory and on disk.
    fn put(&self, i: usize, vm: VmState) -> Result<(), StateError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.vms[i] = vm;
        self.dir.save_vm(i, &st.vms[i])
    }
}

impl Runner {
    /// The VM's label in progress, state and results: the target's label, prefixed with its
    /// vCenter (`east/web-01`) when the plan has several (names repeat across vCenters).
    fn label(plan: &Plan, p: &VmPlan) -> String {
        match plan.vcenter_of(p) {
            Some(vc) if plan.vcenters.len() > 1 => format!("{vc}/{}", p.target.label()),
            _ => p.target.label(),
        }
    }

    /// The connection of a VM's vCenter (`run` checked every plan entry has one).
    fn conn(&self, vcenter: Option<&str>) -> &VcenterConn {
        self.vcenters
            .iter()
            .find(|c| c.name.as_deref() == vcenter)
            .unwrap_or(&self.vcenters[0])
    }

    fn hv(&self, vcenter: Option<&str>) -> &dyn Hypervisor {
        self.conn(vcenter).hv.as_ref()
    }

    /// Every plan entry's vCenter must be one this run is connected to.
    fn check_vcenters(&self, plan: &Plan) -> Result<(), RunError> {
        for p in &plan.vms {
            let want = plan.vcenter_of(p);
            if !self.vcenters.iter().any(|c| c.name.as_deref() == want) {
                return Err(RunError::UnknownVcenter {
                    vm: p.target.label(),
                    vcenter: want.unwrap_or("(flags)").to_string(),
                });
            }
        }
        Ok(())
    }

    /// Run (or resume) `plan`. Never returns early because one VM failed.
    pub async fn run(
        &self,
        plan: &Plan,
        plan_path: &Path,
        resume: bool,
    ) -> Result<RunOutcome, RunError> {
        let started_at = now_secs();
        self.check_vcenters(plan)?;
        let plan_sha = sha256_file(plan_path).map_err(|source| RunError::Plan {
            path: plan_path.to_path_buf(),
            source,
        })?;
        let dir = StateDir::lock(&self.settings.state_dir)?;
        let mut state = if resume {
            let st = dir.load()?;
            if st.header.plan_sha256 != plan_sha {
                return Err(StateError::PlanChanged {
                    path: dir.path().to_path_buf(),
                    recorded: st.header.plan_path.clone(),
                    recorded_sha: st.header.plan_sha256.clone(),
                    plan: plan_path.to_path_buf(),
                    plan_sha,
                }
                .into());
            }
            st
        } else {
            if dir.has_run() {
                return Err(StateError::Exists {
                    path: dir.path().to_path_buf(),
                }
                .into());
            }
            let mut vms: Vec<VmState> = plan
                .vms
                .iter()
                .map(|p| {
                    let mut v = VmState::new(&Self::label(plan, p), p.recovery_instance.clone());
                    v.wave = p.wave.clone();
                    v.vcenter = plan.vcenter_of(p).map(str::to_string);
                    v.datastore = Some(self.conn(v.vcenter.as_deref()).datastore.clone());
                    v
                })
                .collect();
            for id in &plan.unmatched_instances {
                let mut v = VmState::new(&format!("(no VM for {id})"), Some(id.clone()));
                v.status = VmStatus::Skipped;
                v.message = Some(format!("no vCenter VM matches recovery instance {id}"));
                vms.push(v);
            }
            let st = RunState {
                header: RunHeader {
                    format: STATE_FORMAT,
                    run_id: format!("run-{}-{}", started_at, std::process::id()),
                    plan_sha256: plan_sha,
                    plan_path: plan_path.to_path_buf(),
                    appliances: vec![],
                    vm_count: vms.len(),
                },
                vms,
            };
            dir.save_all(&st)?;
            st
        };
        let labels: Vec<String> = state.vms.iter().map(|v| v.vm.clone()).collect();
        self.progress.start(&labels);

        // Which VMs still have work.
        let mut todo: Vec<usize> = vec![];
        for (i, v) in state.vms.iter_mut().enumerate() {
            if i >= plan.vms.len() {
                continue; // unmatched instances: already final
            }
            let again = match v.status {
                VmStatus::Pending | VmStatus::Running => true,
                VmStatus::Failed => resume && self.settings.retry_failed,
                VmStatus::Succeeded | VmStatus::Skipped => false,
            };
            if !again {
                continue;
            }
            if v.status == VmStatus::Failed {
                v.status = VmStatus::Running;
                v.failed_step = None;
                v.message = None;
            }
            if plan.vms[i].recovery_instance.is_none() {
                v.status = VmStatus::Skipped;
                v.message = Some("no recovery instance matches this VM".into());
                v.finished_at = Some(now_secs());
                dir.save_vm(i, v)?;
                self.progress
                    .finished(&v.vm, v.status, v.message.as_deref());
                continue;
            }
            todo.push(i);
        }
        for (i, v) in state.vms.iter().enumerate() {
            if !todo.contains(&i)
                && v.status.is_final()
                && i < plan.vms.len()
                && v.message.as_deref() != Some("no recovery instance matches this VM")
            {
                self.progress
                    .finished(&v.vm, v.status, v.message.as_deref());
            }
        }

        // Appliance ISO: once per run and vCenter, before any of its VMs needs it.
        let appliance_file = self
            .settings
            .appliance_iso
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "failback.iso".into());
        let mut appliance_err: HashMap<Option<String>, String> = HashMap::new();
        let mut inventory: HashMap<Option<String>, Vec<VmInfo>> = HashMap::new();
        for conn in &self.vcenters {
            let mine: Vec<usize> = todo
                .iter()
                .copied()
                .filter(|&i| state.vms[i].vcenter == conn.name)
                .collect();
            let needs_appliance = mine.iter().any(|&i| {
                state.vms[i]
                    .last_completed
                    .is_none_or(|s| s < Step::AttachIsos)
            });
            let have = state
                .header
                .appliances
                .iter()
                .any(|a| a.file.vcenter == conn.name && !a.deleted);
            if needs_appliance && !have {
                let path = conn.iso_path(&appliance_file);
                match self.upload_appliance(conn, &path).await {
                    Ok(sha256) => {
                        state
                            .header
                            .appliances
                            .retain(|a| a.file.vcenter != conn.name);
                        state.header.appliances.push(ApplianceCopy {
                            file: DatastoreFile {
                                vcenter: conn.name.clone(),
                                datastore: conn.datastore.clone(),
                                path,
                            },
                            sha256,
                            deleted: false,
                        });
                        dir.save_header(&state.header)?;
                    }
                    Err(e) => {
                        appliance_err.insert(conn.name.clone(), e);
                    }
                }
            }
            if mine.is_empty() {
                continue;
            }
            // VM list once per vCenter; each VM re-reads its own VM when it needs fresh facts.
            match self
                .retry("list VMs", conn.label(), || conn.list_vms())
                .await
            {
                Ok(v) => {
                    inventory.insert(conn.name.clone(), v);
                }
                Err(e) => {
                    let msg = format!(
                        "cannot list the VMs of vCenter {}: {}",
                        conn.label(),
                        e.chain()
                    );
                    for &i in &mine {
                        let v = &mut state.vms[i];
                        v.status = VmStatus::Failed;
                        v.failed_step = Some(Step::Check);
                        v.message = Some(msg.clone());
                        dir.save_vm(i, v)?;
                        self.progress.finished(&v.vm, v.status, Some(&msg));
                    }
                    todo.retain(|i| !mine.contains(i));
                }
            }
        }

        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            dir,
            appliance_file,
            waves: plan.waves.clone(),
        });
        let waves = plan.waves.len().max(1);
        for w in 0..waves {
            let these: Vec<usize> = todo
                .iter()
                .copied()
                .filter(|&i| wave_index(plan, &plan.vms[i]) == w)
                .collect();
            if let Some(wave) = plan.waves.get(w) {
                self.progress.note(
                    "run",
                    &format!(
                        "wave {}/{waves} {}: {} VM(s)",
                        w + 1,
                        wave.name,
                        these.len()
                    ),
                );
            }
            self.run_wave(plan, &shared, these, &inventory, &appliance_err, started_at)
                .await?;
            let Some(wave) = plan.waves.get(w) else { break };
            let failed = {
                let st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
                (0..plan.vms.len())
                    .filter(|&i| wave_index(plan, &plan.vms[i]) == w)
                    .filter(|&i| plan.vms[i].recovery_instance.is_some())
                    .filter(|&i| st.vms[i].status != VmStatus::Succeeded)
                    .filter(|&i| st.vms[i].status != VmStatus::Skipped)
                    .count()
            };
            if failed > 0 && wave.on_failure == WavePolicy::Stop && w + 1 < waves {
                let msg = format!(
                    "not started: wave {} has {failed} VM(s) that did not succeed and its on_failure is \"stop\"; fix them, then --resume --retry-failed",
                    wave.name
                );
                self.progress.note("run", &msg);
                let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
                for &i in todo.iter().filter(|&&i| wave_index(plan, &plan.vms[i]) > w) {
                    st.vms[i].message = Some(msg.clone());
                    shared.dir.save_vm(i, &st.vms[i])?;
                }
                break;
            }
        }
        self.finish(plan, &shared, started_at).await
    }

    /// Runs one wave's VMs, at most `parallel` at a time, until each is final.
    async fn run_wave(
        &self,
        plan: &Plan,
        shared: &Arc<Shared>,
        todo: Vec<usize>,
        inventory: &HashMap<Option<String>, Vec<VmInfo>>,
        appliance_err: &HashMap<Option<String>, String>,
        started_at: u64,
    ) -> Result<(), RunError> {
        let sem = Arc::new(tokio::sync::Semaphore::new(self.settings.parallel.max(1)));
        let mut futs = futures::stream::FuturesUnordered::new();
        for i in todo {
            let sem = sem.clone();
            let shared = shared.clone();
            let vmplan = &plan.vms[i];
            let vcenter = plan.vcenter_of(vmplan).map(str::to_string);
            let resolved = resolve_vm(
                vmplan,
                inventory
                    .get(&vcenter)
                    .map(Vec::as_slice)
                    .unwrap_or_default(),
            )
            .cloned();
            let appliance_err = appliance_err.get(&vcenter).cloned();
            futs.push(async move {
                let _permit = sem.acquire().await;
                self.run_vm(&shared, i, vmplan, resolved, appliance_err)
                    .await
            });
        }
        use futures::StreamExt;
        let mut last_results = Instant::now();
        while let Some(r) = futs.next().await {
            if let Err(e) = r {
                // Only state-file errors get here: the run cannot record progress any more.
                return Err(e.into());
            }
            // Keep a results file of the VMs finished so far (at most every 5 s), so a run
            // that is killed still leaves one behind.
            if last_results.elapsed() >= Duration::from_secs(5) {
                let st = shared
                    .state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let partial = RunResults::build(
                    &st,
                    plan,
                    serde_json::to_value(&self.settings).unwrap_or_default(),
                    started_at,
                    None,
                );
                if let Err(e) = partial.write(&self.settings.results_path) {
                    self.progress.note(
                        "run",
                        &format!(
                            "cannot write results file {}: {e}",
                            self.settings.results_path.display()
                        ),
                    );
                }
                last_results = Instant::now();
            }
        }
        Ok(())
    }

    /// Appliance clean-up and the final results file.
    async fn finish(
        &self,
        plan: &Plan,
        shared: &Shared,
        started_at: u64,
    ) -> Result<RunOutcome, RunError> {
        self.cleanup_appliance(shared).await?;
        let state = shared
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let results = RunResults::build(
            &state,
            plan,
            serde_json::to_value(&self.settings).unwrap_or_default(),
            started_at,
            Some(now_secs()),
        );
        results
            .write(&self.settings.results_path)
            .map_err(|source| RunError::Results {
                path: self.settings.results_path.clone(),
                source,
            })?;
        Ok(RunOutcome { results })
    }

    /// `--cleanup`: delete each vCenter's appliance ISO once no VM of the run can still need
    /// it there.
    async fn cleanup_appliance(&self, shared: &Shared) -> Result<(), StateError> {
        if !self.settings.cleanup {
            return Ok(());
        }
        let copies: Vec<(usize, DatastoreFile)> = {
            let st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            st.header
                .appliances
                .iter()
                .enumerate()
                .filter(|(_, a)| !a.deleted)
                .filter(|(_, a)| {
                    !st.vms
                        .iter()
                        .any(|v| v.vcenter == a.file.vcenter && !v.status.is_final())
                })
                .map(|(i, a)| (i, a.file.clone()))
                .collect()
        };
        for (i, file) in copies {
            let conn = self.conn(file.vcenter.as_deref());
            match self
                .retry("delete appliance ISO", conn.label(), || {
                    conn.hv.delete_file(&file.path)
                })
                .await
            {
                Ok(()) => {
                    let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
                    st.header.appliances[i].deleted = true;
                    shared.dir.save_header(&st.header)?;
                }
                Err(e) => self.progress.note(
                    conn.label(),
                    &format!(
                        "cannot delete appliance ISO [{}] {}: {}",
                        file.datastore,
                        file.path,
                        e.chain()
                    ),
                ),
            }
        }
        Ok(())
    }

    /// Delete the VM's seed ISO (it holds a pairing token and the CA) from the datastore and
    /// the work dir, unless `--keep-seeds`. Returns a problem, if any.
    async fn delete_seed(&self, v: &mut VmState) -> Option<String> {
        if self.settings.keep_seeds || v.seed_deleted {
            return None;
        }
        let hv = self.hv(v.vcenter.as_deref());
        if let Some(ds) = v.seed_ds_path.clone() {
            if let Err(e) = self
                .retry("delete seed ISO", &v.vm.clone(), || hv.delete_file(&ds))
                .await
            {
                return Some(format!("delete seed ISO {ds}: {}", e.chain()));
            }
        }
        if let Some(local) = &v.seed_path {
            match std::fs::remove_file(local) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Some(format!("delete {}: {e}", local.display())),
            }
        }
        v.seed_deleted = v.seed_ds_path.is_some() || v.seed_path.is_some();
        None
    }

    async fn upload_appliance(&self, conn: &VcenterConn, ds_path: &str) -> Result<String, String> {
        let hv = conn.hv.as_ref();
        let path = &self.settings.appliance_iso;
        let p2 = path.clone();
        let (sha, size) = tokio::task::spawn_blocking(move || {
            let size = std::fs::metadata(&p2)?.len();
            Ok::<_, std::io::Error>((sha256_file(&p2)?, size))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot read appliance ISO {}: {e}", path.display()))?;
        let have = self
            .retry("check appliance ISO", conn.label(), || {
                hv.has_file(ds_path, size, &sha)
            })
            .await
            .map_err(|e| e.chain())?;
        if !have {
            self.retry("upload appliance ISO", conn.label(), || {
                hv.upload(path, ds_path, &sha)
            })
            .await
            .map_err(|e| {
                format!(
                    "upload of appliance ISO {} to [{}] {ds_path} on vCenter {} failed: {}",
                    path.display(),
                    conn.datastore,
                    conn.label(),
                    e.chain()
                )
            })?;
        }
        Ok(sha)
    }

    /// Retry transient errors with exponential backoff (1 s, 2 s, 4 s, ... capped at 30 s).
    async fn retry<T, F, Fut>(&self, what: &str, vm: &str, mut f: F) -> StepResult<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = StepResult<T>>,
    {
        let mut delay = Duration::from_millis(self.settings.poll_interval_ms.clamp(10, 1000));
        let attempts = self.settings.attempts.max(1);
        let mut attempt = 1;
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) if e.transient && attempt < attempts => {
                    self.progress.note(
                        vm,
                        &format!(
                            "{what}: {} (attempt {attempt}/{attempts}, retrying in {:?})",
                            e.chain(),
                            delay
                        ),
                    );
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn run_vm(
        &self,
        shared: &Shared,
        i: usize,
        p: &VmPlan,
        resolved: Result<VmInfo, String>,
        appliance_err: Option<String>,
    ) -> Result<(), StateError> {
        let mut v = shared.vm(i);
        v.status = VmStatus::Running;
        if v.started_at.is_none() {
            v.started_at = Some(now_secs());
        }
        let fail = |mut v: VmState, step: Step, msg: String| -> Result<(), StateError> {
            v.status = VmStatus::Failed;
            v.failed_step = Some(step);
            v.message = Some(msg.clone());
            v.finished_at = Some(now_secs());
            self.progress
                .finished(&v.vm.clone(), VmStatus::Failed, Some(&msg));
            shared.put(i, v)
        };
        let info = match resolved {
            Ok(info) => info,
            Err(msg) => return fail(v, Step::Check, msg),
        };
        // Identity from the live inventory; a resumed run must still be talking about the
        // same VM (a moref reused by another VM would be a disaster).
        if let Some(m) = &v.moref {
            if *m != info.moref {
                let msg = format!(
                    "VM {} is now {} but the run started on {m}; refusing to continue",
                    info.name, info.moref
                );
                return fail(v, Step::Check, msg);
            }
        }
        v.moref = Some(info.moref.clone());
        v.vm_name = Some(info.name.clone());
        v.bios_uuid = info.bios_uuid.clone();
        v.instance_uuid = info.instance_uuid.clone();
        shared.put(i, v.clone())?;
        let next = Step::next_after(v.last_completed);
        if next.is_some_and(|s| s <= Step::AttachIsos) {
            if let Some(e) = &appliance_err {
                return fail(v, Step::UploadSeed, e.clone());
            }
        }
        let mut step = next;
        while let Some(s) = step {
            self.progress.step(&v.vm, s);
            let t0 = Instant::now();
            let r = self.exec(shared, i, p, &mut v, s).await;
            *v.step_secs.entry(s.name().to_string()).or_insert(0.0) += t0.elapsed().as_secs_f64();
            match r {
                Ok(Flow::Next) => {
                    v.last_completed = Some(s);
                    shared.put(i, v.clone())?;
                    step = Step::next_after(Some(s));
                }
                Ok(Flow::Skip(msg)) => {
                    v.status = VmStatus::Skipped;
                    v.message = Some(msg.clone());
                    v.finished_at = Some(now_secs());
                    self.progress.finished(&v.vm, VmStatus::Skipped, Some(&msg));
                    return shared.put(i, v);
                }
                Err(e) => {
                    let mut msg = format!("{}: {}", s.name(), e.chain());
                    let revert = p.options.on_failure == OnFailure::Revert && v.snapshot.is_some();
                    if revert
                        || v.needs_rollback()
                        || s == Step::AttachIsos
                        || s == Step::SetBootOrder
                    {
                        msg.push_str(&self.rollback(p, &mut v).await);
                    } else {
                        if v.snapshot.is_some() {
                            v.snapshot_outcome = Some(SnapshotOutcome::Left);
                        }
                        if let Some(problem) = self.delete_seed(&mut v).await {
                            msg.push_str(&format!(" ({problem})"));
                        }
                    }
                    return fail(v, s, msg);
                }
            }
        }
        v.status = VmStatus::Succeeded;
        v.finished_at = Some(now_secs());
        self.progress.finished(&v.vm, VmStatus::Succeeded, None);
        shared.put(i, v)
    }

    /// Put a failed VM's configuration back: appliance off, ISOs detached, devices removed,
    /// boot options restored, seed deleted; with `on_failure = "revert"` also reverted to the
    /// protective snapshot and powered on as it was. A complete rollback returns the VM to
    /// "not started", so `--resume --retry-failed` starts it over. Returns a sentence for the
    /// results message.
    async fn rollback(&self, p: &VmPlan, v: &mut VmState) -> String {
        let Some(moref) = v.moref.clone() else {
            return String::new();
        };
        let mut done = vec![];
        let mut problems = vec![];
        let label = v.vm.clone();
        let hv = self.hv(v.vcenter.as_deref());
        match self.retry("power off", &label, || hv.vm(&moref)).await {
            Ok(info) if info.power == Power::On => {
                match self
                    .retry("power off", &label, || hv.power_off(&moref))
                    .await
                {
                    Ok(()) => done.push("powered off"),
                    Err(e) => problems.push(format!("power off: {}", e.chain())),
                }
            }
            Ok(_) => {}
            Err(e) => problems.push(format!("read VM: {}", e.chain())),
        }
        if !v.attached.is_empty() {
            let att = v.attached.clone();
            match self
                .retry("detach ISOs", &label, || hv.detach_isos(&moref, &att))
                .await
            {
                Ok(()) => {
                    v.attached.clear();
                    done.push("ISOs detached");
                }
                Err(e) => problems.push(format!("detach ISOs: {}", e.chain())),
            }
        }
        if let Some(saved) = v.saved_boot.clone() {
            match self
                .retry("restore boot options", &label, || {
                    hv.restore_boot(&moref, &saved)
                })
                .await
            {
                Ok(()) => done.push("boot options restored"),
                Err(e) => problems.push(format!("restore boot options: {}", e.chain())),
            }
        }
        let mut reverted = false;
        if let (OnFailure::Revert, Some(snap)) = (p.options.on_failure, v.snapshot.clone()) {
            match self
                .retry("revert to snapshot", &label, || {
                    hv.revert_snapshot(&moref, &snap)
                })
                .await
            {
                Ok(()) => {
                    reverted = true;
                    done.push("reverted to the protective snapshot");
                    if p.options.keep_snapshot {
                        v.snapshot_outcome = Some(SnapshotOutcome::RevertedKept);
                    } else {
                        match self
                            .retry("remove snapshot", &label, || {
                                hv.remove_snapshot(&moref, &snap)
                            })
                            .await
                        {
                            Ok(()) => v.snapshot_outcome = Some(SnapshotOutcome::Reverted),
                            Err(e) => {
                                v.snapshot_outcome = Some(SnapshotOutcome::RevertedKept);
                                problems.push(format!("remove snapshot: {}", e.chain()));
                            }
                        }
                    }
                }
                Err(e) => {
                    v.snapshot_outcome = Some(SnapshotOutcome::Left);
                    problems.push(format!("revert to snapshot: {}", e.chain()));
                }
            }
        } else if v.snapshot.is_some() {
            v.snapshot_outcome = Some(SnapshotOutcome::Left);
        }
        if let Some(problem) = self.delete_seed(v).await {
            problems.push(problem);
        }
        // Disks are untouched until the client pairs: then the VM may go back to how it was.
        let paired = v.last_completed.is_some_and(|s| s >= Step::WaitPaired);
        let power_back = (!paired || reverted) && problems.is_empty();
        if power_back && v.was_powered_on == Some(true) {
            if self
                .retry("power on", &label, || hv.power_on(&moref))
                .await
                .is_ok()
            {
                done.push(if reverted {
                    "powered on again"
                } else {
                    "powered on again (disks untouched)"
                });
            }
        } else if paired && !reverted {
            if let Some(id) = &v.recovery_instance {
                let _ = self.dr.stop(id).await;
            }
            done.push("left powered off: its disks may be partly written");
        }
        if problems.is_empty() {
            // Back to "not started": a retry starts over with a new token and seed.
            v.last_completed = None;
            v.token = None;
            v.seed_path = None;
            v.seed_sha256 = None;
            v.seed_ds_path = None;
            v.saved_boot = None;
            v.devices_before = None;
            v.attached.clear();
        }
        let mut s = String::new();
        if !done.is_empty() {
            s.push_str(&format!(" (rolled back: {})", done.join(", ")));
        }
        if !problems.is_empty() {
            s.push_str(&format!(" (rollback incomplete: {})", problems.join("; ")));
        }
        s
    }

    fn instance_id(v: &VmState) -> StepResult<String> {
        v.recovery_instance
            .clone()
            .ok_or_else(|| BackendError::permanent("no recovery instance"))
    }

    async fn exec(
        &self,
        shared: &Shared,
        i: usize,
        p: &VmPlan,
        v: &mut VmState,
        s: Step,
    ) -> StepResult<Flow> {
        let id = Self::instance_id(v)?;
        let moref = v.moref.clone().unwrap_or_default();
        let label = v.vm.clone();
        let to = &p.options.timeouts;
        let conn = self.conn(v.vcenter.as_deref());
        let hv = conn.hv.as_ref();
        match s {
            Step::Check => {
                let ri = self
                    .retry("read instance", &label, || self.dr.instance(&id))
                    .await?;
                v.source_bios_uuid = ri.source_hints.vmware_uuid.clone();
                let state = ri.failback.state;
                if state != FailbackState::FailbackNotStarted {
                    match self.settings.in_progress {
                        InProgress::Skip => {
                            return Ok(Flow::Skip(format!(
                                "recovery instance {id} is already in failback ({state}); use --in-progress restart to restart it"
                            )))
                        }
                        InProgress::Restart => {
                            self.progress.note(&label, &format!("{id} is in {state}: stopping its failback to restart"));
                            self.retry("stop failback", &label, || self.dr.stop(&id)).await?;
                            let deadline = Instant::now() + Duration::from_secs(120);
                            loop {
                                let ri = self.dr.instance(&id).await;
                                if let Ok(ri) = ri {
                                    if ri.failback.state == FailbackState::FailbackNotStarted {
                                        v.previous_client_id = ri.failback.client_id.clone();
                                        break;
                                    }
                                }
                                if Instant::now() > deadline {
                                    return Err(BackendError::permanent(format!(
                                        "stop failback of {id} did not return it to FAILBACK_NOT_STARTED within 120 s"
                                    )));
                                }
                                self.poll_sleep().await;
                            }
                            return Ok(Flow::Next);
                        }
                    }
                }
                v.previous_client_id = ri.failback.client_id.clone();
                Ok(Flow::Next)
            }
            Step::CreateToken => {
                let tok = self
                    .retry("create pairing token", &label, || {
                        self.dr
                            .create_pairing_token(&id, self.settings.token_ttl_secs)
                    })
                    .await?;
                v.token = Some(tok);
                Ok(Flow::Next)
            }
            Step::BuildSeed => {
                let out = self.settings.work_dir.join("seeds").join(format!(
                    "{}-{}.iso",
                    safe_name(&id),
                    safe_name(&label)
                ));
                let input = SeedInput {
                    server_url: self.settings.seed_server_url.clone(),
                    ca_pem: self.ca_pem.clone(),
                    token: v.token.clone().unwrap_or_default(),
                    recovery_instance_id: id.clone(),
                    network: p.network.clone(),
                    device_mapping: p.device_mapping.clone(),
                    vm_name: v.vm_name.clone().unwrap_or_else(|| label.clone()),
                };
                let seed = self.seed.clone();
                let out2 = out.clone();
                let sha = tokio::task::spawn_blocking(move || {
                    if let Some(d) = out2.parent() {
                        std::fs::create_dir_all(d).map_err(|e| {
                            BackendError::permanent(format!("cannot create {}: {e}", d.display()))
                        })?;
                    }
                    seed.build(&input, &out2)?;
                    sha256_file(&out2).map_err(|e| {
                        BackendError::permanent(format!(
                            "cannot read seed ISO {}: {e}",
                            out2.display()
                        ))
                    })
                })
                .await
                .map_err(|e| BackendError::permanent(format!("seed build task: {e}")))??;
                v.seed_path = Some(out);
                v.seed_sha256 = Some(sha);
                v.seed_deleted = false;
                Ok(Flow::Next)
            }
            Step::UploadSeed => {
                let path = v.seed_path.clone().unwrap_or_default();
                let sha = v.seed_sha256.clone().unwrap_or_default();
                let ds = conn.iso_path(&format!(
                    "seeds/{}",
                    path.file_name()
                        .map(|n| n.to_string_lossy().to_string())
                        .unwrap_or_default()
                ));
                self.retry("upload seed ISO", &label, || hv.upload(&path, &ds, &sha))
                    .await?;
                v.seed_ds_path = Some(ds);
                Ok(Flow::Next)
            }
            Step::PowerOff => {
                let info = self.retry("read VM", &label, || hv.vm(&moref)).await?;
                if v.was_powered_on.is_none() {
                    // Recorded before acting, so a resumed run knows the original state.
                    v.was_powered_on = Some(info.power == Power::On);
                    shared
                        .put(i, v.clone())
                        .map_err(|e| BackendError::permanent(e.to_string()))?;
                }
                if info.power == Power::Off {
                    return Ok(Flow::Next);
                }
                if info.power == Power::On && info.tools_running {
                    self.progress
                        .note(&label, "guest shutdown (VMware Tools running)");
                    if self
                        .retry("guest shutdown", &label, || hv.shutdown_guest(&moref))
                        .await
                        .is_ok()
                    {
                        let deadline = Instant::now() + Duration::from_secs(to.shutdown_secs);
                        while Instant::now() < deadline {
                            if let Ok(i) = hv.vm(&moref).await {
                                if i.power == Power::Off {
                                    return Ok(Flow::Next);
                                }
                            }
                            self.poll_sleep().await;
                        }
                        self.progress.note(
                            &label,
                            &format!(
                                "guest did not shut down within {} s: powering off",
                                to.shutdown_secs
                            ),
                        );
                    }
                }
                self.power_off_if_on(hv, &moref, &label).await?;
                Ok(Flow::Next)
            }
            Step::Snapshot => {
                if p.options.protective_snapshot {
                    let run_id = shared
                        .state
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .header
                        .run_id
                        .clone();
                    let name = format!("failback-protect-{run_id}");
                    let desc =
                        format!("Protective snapshot before failback of recovery instance {id}");
                    let snap = self
                        .retry("snapshot", &label, || {
                            hv.create_snapshot(&moref, &name, &desc)
                        })
                        .await?;
                    v.snapshot = Some(snap);
                }
                Ok(Flow::Next)
            }
            Step::SaveBootOptions => {
                if v.devices_before.is_none() {
                    v.devices_before = Some(
                        self.retry("read devices", &label, || hv.devices_before(&moref))
                            .await?,
                    );
                }
                if v.saved_boot.is_none() {
                    v.saved_boot = Some(
                        self.retry("save boot options", &label, || hv.save_boot(&moref))
                            .await?,
                    );
                }
                Ok(Flow::Next)
            }
            Step::AttachIsos => {
                let isos = vec![
                    conn.iso_path(&shared.appliance_file),
                    v.seed_ds_path.clone().unwrap_or_default(),
                ];
                let before = v.devices_before.clone();
                let att = self
                    .retry("attach ISOs", &label, || {
                        hv.attach_isos(&moref, &isos, before.as_ref())
                    })
                    .await?;
                v.attached = att;
                Ok(Flow::Next)
            }
            Step::SetBootOrder => {
                let saved = v
                    .saved_boot
                    .clone()
                    .ok_or_else(|| BackendError::permanent("no saved boot options"))?;
                self.retry("set boot order", &label, || {
                    hv.set_cdrom_first(&moref, &saved)
                })
                .await?;
                Ok(Flow::Next)
            }
            Step::PowerOnAppliance => {
                let info = self.retry("read VM", &label, || hv.vm(&moref)).await?;
                if info.power != Power::On {
                    self.retry("power on", &label, || hv.power_on(&moref))
                        .await?;
                }
                Ok(Flow::Next)
            }
            Step::WaitPaired => {
                let prev = v.previous_client_id.clone();
                let paired = |ri: &RecoveryInstance| {
                    ri.failback.client_id.is_some() && ri.failback.client_id != prev
                };
                let wait = self.wait(&id, &label, "pair", to.pair_secs, v, paired);
                tokio::select! {
                    r = wait => { r?; }
                    e = self.watch_powered_on(hv, &moref, &label) => return Err(e),
                }
                Ok(Flow::Next)
            }
            Step::WaitReady => {
                self.wait(
                    &id,
                    &label,
                    "reach FAILBACK_READY_FOR_LAUNCH",
                    to.sync_secs,
                    v,
                    |ri| {
                        matches!(
                            ri.failback.state,
                            FailbackState::FailbackReadyForLaunch
                                | FailbackState::FailbackCompleted
                        ) || ri.failback.launch_requested_at.is_some()
                    },
                )
                .await?;
                Ok(Flow::Next)
            }
            Step::Launch => {
                let mode = self.settings.launch.unwrap_or(p.options.launch);
                if mode == LaunchMode::Manual {
                    self.progress.note(
                        &label,
                        &format!("ready: waiting for the admin to run `failback launch {id}`"),
                    );
                    return Ok(Flow::Next);
                }
                let ri = self
                    .retry("read instance", &label, || self.dr.instance(&id))
                    .await?;
                if ri.failback.launch_requested_at.is_none()
                    && ri.failback.state != FailbackState::FailbackCompleted
                {
                    self.retry("launch", &label, || self.dr.launch(&id)).await?;
                }
                Ok(Flow::Next)
            }
            Step::WaitCompleted => {
                let ri = self
                    .wait(
                        &id,
                        &label,
                        "reach FAILBACK_COMPLETED",
                        to.complete_secs,
                        v,
                        |ri| ri.failback.state == FailbackState::FailbackCompleted,
                    )
                    .await?;
                v.digests = ri.failback.digests.clone();
                v.disk_bytes = ri.failback.disks.iter().map(|d| d.total_bytes).sum();
                v.replicated_bytes = ri.failback.disks.iter().map(|d| d.replicated_bytes).sum();
                let sum = |f: fn(&failback_api::DiskProgress) -> Option<u64>| {
                    ri.failback.disks.iter().map(f).sum::<Option<u64>>()
                };
                v.differing_bytes = sum(|d| d.differing_bytes);
                v.fetched_bytes = sum(|d| d.fetched_bytes);
                v.disks = ri.failback.disks.clone();
                if let Some(bad) = v.digests.iter().find(|d| d.local_digest != d.agent_digest) {
                    return Err(BackendError::permanent(format!(
                        "digest mismatch on {} -> {}: local {} agent {}",
                        bad.remote_id, bad.local_path, bad.local_digest, bad.agent_digest
                    )));
                }
                Ok(Flow::Next)
            }
            Step::PowerOffAppliance => {
                self.power_off_if_on(hv, &moref, &label).await?;
                Ok(Flow::Next)
            }
            Step::DetachIsos => {
                let att = v.attached.clone();
                self.retry("detach ISOs", &label, || hv.detach_isos(&moref, &att))
                    .await?;
                Ok(Flow::Next)
            }
            Step::RestoreBootOptions => {
                let saved = v
                    .saved_boot
                    .clone()
                    .ok_or_else(|| BackendError::permanent("no saved boot options"))?;
                self.retry("restore boot options", &label, || {
                    hv.restore_boot(&moref, &saved)
                })
                .await?;
                Ok(Flow::Next)
            }
            Step::PowerOnFromDisk => {
                let info = self.retry("read VM", &label, || hv.vm(&moref)).await?;
                if info.power != Power::On {
                    self.retry("power on", &label, || hv.power_on(&moref))
                        .await?;
                }
                Ok(Flow::Next)
            }
            Step::Readiness => {
                let ready = p
                    .wave
                    .as_ref()
                    .and_then(|w| shared.waves.iter().find(|x| x.name == *w))
                    .and_then(|w| w.readiness);
                if let Some(r) = ready {
                    self.wait_ready(hv, &moref, &label, &r).await?;
                }
                Ok(Flow::Next)
            }
            Step::Cleanup => {
                self.cleanup_vm(p, v).await?;
                Ok(Flow::Next)
            }
        }
    }

    /// Success: remove the protective snapshot unless `keep_snapshot`, delete the seed ISO.
    async fn cleanup_vm(&self, p: &VmPlan, v: &mut VmState) -> StepResult<()> {
        let moref = v.moref.clone().unwrap_or_default();
        let label = v.vm.clone();
        let hv = self.hv(v.vcenter.as_deref());
        if let Some(snap) = v.snapshot.clone() {
            if p.options.keep_snapshot {
                v.snapshot_outcome = Some(SnapshotOutcome::Kept);
            } else {
                self.retry("remove snapshot", &label, || {
                    hv.remove_snapshot(&moref, &snap)
                })
                .await?;
                v.snapshot_outcome = Some(SnapshotOutcome::Removed);
            }
        }
        if let Some(problem) = self.delete_seed(v).await {
            return Err(BackendError::transient(problem));
        }
        Ok(())
    }

    /// Poll the VM until the wave's readiness check holds (VMware Tools running, a guest IP,
    /// a TCP port answering on it) or its time-out; the error says which condition failed.
    async fn wait_ready(
        &self,
        hv: &dyn Hypervisor,
        moref: &str,
        label: &str,
        r: &Readiness,
    ) -> StepResult<()> {
        let deadline = Instant::now() + Duration::from_secs(r.timeout_secs);
        loop {
            let missing = match hv.vm(moref).await {
                Ok(info) => self.not_ready(&info, r).await,
                Err(e) if e.transient => Some(format!("cannot read VM: {}", e.chain())),
                Err(e) => return Err(e),
            };
            let Some(missing) = missing else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                return Err(BackendError::permanent(format!(
                    "VM {label} not ready within {} s: {missing}",
                    r.timeout_secs
                )));
            }
            self.poll_sleep().await;
        }
    }

    /// `None` when ready, else what is missing.
    async fn not_ready(&self, info: &VmInfo, r: &Readiness) -> Option<String> {
        if r.tools_running && !info.tools_running {
            return Some("VMware Tools are not running".into());
        }
        if !(r.guest_ip || r.tcp_port.is_some()) {
            return None;
        }
        let Some(ip) = info.guest_ip.as_deref() else {
            return Some("vCenter reports no guest IP address".into());
        };
        let port = r.tcp_port?;
        let addr = match ip.parse::<std::net::IpAddr>() {
            Ok(a) => std::net::SocketAddr::new(a, port),
            Err(_) => return Some(format!("guest IP {ip:?} is not an IP address")),
        };
        match tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(addr))
            .await
        {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(format!("TCP {addr}: {e}")),
            Err(_) => Some(format!("TCP {addr}: no answer within 3 s")),
        }
    }

    async fn power_off_if_on(
        &self,
        hv: &dyn Hypervisor,
        moref: &str,
        label: &str,
    ) -> StepResult<()> {
        let info = self.retry("read VM", label, || hv.vm(moref)).await?;
        if info.power != Power::Off {
            self.retry("power off", label, || hv.power_off(moref))
                .await?;
        }
        Ok(())
    }

    /// Returns (an error) only when the VM is found powered off: while it waits to pair, the
    /// appliance is running, so a VM that went off means the appliance stopped (a failure it
    /// printed on its console, or a boot that never reached it) — no use waiting `pair_secs`.
    async fn watch_powered_on(
        &self,
        hv: &dyn Hypervisor,
        moref: &str,
        label: &str,
    ) -> BackendError {
        loop {
            // Read errors are not this watch's business: the wait reports timeouts.
            if let Ok(info) = hv.vm(moref).await {
                if info.power == Power::Off {
                    return BackendError::permanent(format!(
                        "VM {label} ({moref}) powered off before its appliance paired: the \
                         appliance stopped; see the VM's console"
                    ));
                }
            }
            tokio::time::sleep(Duration::from_millis(
                self.settings.poll_interval_ms.max(10).saturating_mul(4),
            ))
            .await;
        }
    }

    async fn poll_sleep(&self) {
        tokio::time::sleep(Duration::from_millis(
            self.settings.poll_interval_ms.max(10),
        ))
        .await;
    }

    /// Poll the instance until `done`; fail on `FAILBACK_ERROR` or after `secs`.
    async fn wait(
        &self,
        id: &str,
        label: &str,
        what: &str,
        secs: u64,
        v: &VmState,
        done: impl Fn(&RecoveryInstance) -> bool,
    ) -> StepResult<RecoveryInstance> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut last_err: Option<String>;
        loop {
            match self.dr.instance(id).await {
                Ok(ri) => {
                    let total: u64 = ri.failback.disks.iter().map(|d| d.total_bytes).sum();
                    if total > 0 {
                        let rep: u64 = ri.failback.disks.iter().map(|d| d.replicated_bytes).sum();
                        self.progress.bytes(label, rep, total);
                    }
                    if done(&ri) {
                        return Ok(ri);
                    }
                    if ri.failback.state == FailbackState::FailbackError {
                        return Err(BackendError::permanent(format!(
                            "recovery instance {id} is in FAILBACK_ERROR: {}",
                            ri.failback
                                .last_error_message
                                .as_deref()
                                .unwrap_or("no message")
                        )));
                    }
                    last_err = None;
                }
                Err(e) if e.transient => last_err = Some(e.chain()),
                Err(e) => return Err(e),
            }
            if Instant::now() >= deadline {
                let hint = if what == "pair" {
                    format!(
                        "; is VM {} booting the appliance ISO and can it reach {}?",
                        v.vm_name.as_deref().unwrap_or(label),
                        self.settings.seed_server_url
                    )
                } else {
                    String::new()
                };
                return Err(BackendError::permanent(format!(
                    "timeout: the client of recovery instance {id} did not {what} within {secs} s{hint}{}",
                    last_err.map(|e| format!(" (last error: {e})")).unwrap_or_default()
                )));
            }
            self.poll_sleep().await;
        }
    }
}

enum Flow {
    Next,
    Skip(String),
}

/// MACs of a VM, normalised (for find output).
pub fn vm_macs(vm: &VmInfo) -> Vec<String> {
    vm.macs.iter().map(|m| norm_mac(m)).collect()
}
