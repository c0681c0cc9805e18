//! Durable run state: one JSON file per run recording, per VM, the last step that completed
//! and what that step produced (token, seed digest, saved boot options, CD-ROMs added,
//! snapshot). Written atomically (temp file + fsync + rename + directory fsync) after every
//! step, so a killed orchestrator resumes each VM after its last completed step and never
//! repeats a destructive one. Locked (flock) while a run holds it, so two orchestrators
//! cannot drive the same VMs.

use super::backend::{AttachedCdrom, DevicesBefore, SavedBoot};
use failback_api::{DiskDigest, DiskProgress};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The steps of one VM's failback, in order. Their serialized names appear in the state file,
/// the results file and progress output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Check the instance and apply `--in-progress skip|restart`.
    Check,
    CreateToken,
    BuildSeed,
    UploadSeed,
    PowerOff,
    Snapshot,
    SaveBootOptions,
    AttachIsos,
    SetBootOrder,
    PowerOnAppliance,
    WaitPaired,
    WaitReady,
    Launch,
    WaitCompleted,
    PowerOffAppliance,
    DetachIsos,
    RestoreBootOptions,
    PowerOnFromDisk,
    /// The wave's readiness check (VMware Tools, TCP port, guest IP), if the plan has one.
    Readiness,
    /// Remove the protective snapshot (unless `keep_snapshot`) and the seed ISO (unless
    /// `--keep-seeds`).
    Cleanup,
}

impl Step {
    pub const ALL: [Step; 20] = [
        Step::Check,
        Step::CreateToken,
        Step::BuildSeed,
        Step::UploadSeed,
        Step::PowerOff,
        Step::Snapshot,
        Step::SaveBootOptions,
        Step::AttachIsos,
        Step::SetBootOrder,
        Step::PowerOnAppliance,
        Step::WaitPaired,
        Step::WaitReady,
        Step::Launch,
        Step::WaitCompleted,
        Step::PowerOffAppliance,
        Step::DetachIsos,
        Step::RestoreBootOptions,
        Step::PowerOnFromDisk,
        Step::Readiness,
        Step::Cleanup,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Step::Check => "check",
            Step::CreateToken => "create_token",
            Step::BuildSeed => "build_seed",
            Step::UploadSeed => "upload_seed",
            Step::PowerOff => "power_off",
            Step::Snapshot => "snapshot",
            Step::SaveBootOptions => "save_boot_options",
            Step::AttachIsos => "attach_isos",
            Step::SetBootOrder => "set_boot_order",
            Step::PowerOnAppliance => "power_on_appliance",
            Step::WaitPaired => "wait_paired",
            Step::WaitReady => "wait_ready",
            Step::Launch => "launch",
            Step::WaitCompleted => "wait_completed",
            Step::PowerOffAppliance => "power_off_appliance",
            Step::DetachIsos => "detach_isos",
            Step::RestoreBootOptions => "restore_boot_options",
            Step::PowerOnFromDisk => "power_on_from_disk",
            Step::Readiness => "readiness",
            Step::Cleanup => "cleanup",
        }
    }

    /// The step after `last` (`None` = start at the beginning); `None` when all are done.
    pub fn next_after(last: Option<Step>) -> Option<Step> {
        match last {
            None => Some(Step::Check),
            Some(s) => Step::ALL.iter().copied().find(|x| *x > s),
        }
    }

    /// One line for `--dry-run`.
    pub fn describe(self) -> &'static str {
        match self {
            Step::Check => "check the recovery instance's failback state (--in-progress)",
            Step::CreateToken => "create a one-time pairing token scoped to the instance",
            Step::BuildSeed => "build the VM's seed ISO (server URL, CA, token, network)",
            Step::UploadSeed => "upload the seed ISO and verify its SHA-256 on the datastore",
            Step::PowerOff => "power the VM off (guest shutdown first when VMware Tools run)",
            Step::Snapshot => "take a protective snapshot",
            Step::SaveBootOptions => "save the VM's complete boot options",
            Step::AttachIsos => "ensure two CD-ROMs, attach the appliance and seed ISOs",
            Step::SetBootOrder => "set CD-ROM first in the boot order",
            Step::PowerOnAppliance => "power on into the appliance",
            Step::WaitPaired => "wait for the client to pair with the DR service",
            Step::WaitReady => "wait for FAILBACK_READY_FOR_LAUNCH",
            Step::Launch => "launch the failback",
            Step::WaitCompleted => "wait for FAILBACK_COMPLETED",
            Step::PowerOffAppliance => "power the appliance off",
            Step::DetachIsos => "detach both ISOs, remove the CD-ROMs the run added",
            Step::RestoreBootOptions => "restore the saved boot options exactly",
            Step::PowerOnFromDisk => "power on from disk",
            Step::Readiness => "wait until the VM passes its wave's readiness check",
            Step::Cleanup => {
                "remove the protective snapshot (unless keep_snapshot) and the seed ISO (unless --keep-seeds)"
            }
        }
    }
}

/// Final or current status of one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmStatus {
    Pending,
    Running,
    Succeeded,
    Skipped,
    Failed,
}

impl VmStatus {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            VmStatus::Succeeded | VmStatus::Skipped | VmStatus::Failed
        )
    }
}

/// What became of a VM's protective snapshot (results file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotOutcome {
    /// Success: removed (the VM's current state kept).
    Removed,
    /// Success, `keep_snapshot = true`: still there.
    Kept,
    /// Failure, `on_failure = "revert"`: reverted to it, then removed.
    Reverted,
    /// Failure, `on_failure = "revert"`, `keep_snapshot = true`: reverted to it, kept.
    RevertedKept,
    /// Failure without revert (or the revert failed): left for the admin.
    Left,
}

/// Everything recorded for one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmState {
    /// Key: the plan entry's VM label.
    pub vm: String,
    pub recovery_instance: Option<String>,
    /// The runbook wave of the plan entry.
    #[serde(default)]
    pub wave: Option<String>,
    /// The plan's `[[vcenter]]` name of the VM's vCenter (`None`: the single-vCenter form).
    #[serde(default)]
    pub vcenter: Option<String>,
    /// The datastore of that vCenter the VM's seed ISO goes to.
    #[serde(default)]
    pub datastore: Option<String>,
    pub status: VmStatus,
    pub last_completed: Option<Step>,
    /// Step that failed and why (status `failed`), or why it was skipped.
    #[serde(default)]
    pub failed_step: Option<Step>,
    #[serde(default)]
    pub message: Option<String>,
    // Resolved VM identity.
    #[serde(default)]
    pub moref: Option<String>,
    #[serde(default)]
    pub vm_name: Option<String>,
    #[serde(default)]
    pub bios_uuid: Option<String>,
    #[serde(default)]
    pub instance_uuid: Option<String>,
    /// BIOS UUID of the original source server (the instance's hint), for the results.
    #[serde(default)]
    pub source_bios_uuid: Option<String>,
    /// Client id the instance had before this run (a new pairing shows as a different id).
    #[serde(default)]
    pub previous_client_id: Option<String>,
    /// Pairing token (one-time; the state file is mode 0600).
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub seed_path: Option<PathBuf>,
    #[serde(default)]
    pub seed_sha256: Option<String>,
    #[serde(default)]
    pub seed_ds_path: Option<String>,
    #[serde(default)]
    pub was_powered_on: Option<bool>,
    #[serde(default)]
    pub snapshot: Option<String>,
    #[serde(default)]
    pub snapshot_outcome: Option<SnapshotOutcome>,
    /// The seed ISO (pairing token + CA) was deleted from the datastore and the work dir.
    #[serde(default)]
    pub seed_deleted: bool,
    #[serde(default)]
    pub saved_boot: Option<SavedBoot>,
    /// The VM's devices before ISOs were attached (see `Hypervisor::devices_before`).
    #[serde(default)]
    pub devices_before: Option<DevicesBefore>,
    #[serde(default)]
    pub attached: Vec<AttachedCdrom>,
    #[serde(default)]
    pub digests: Vec<DiskDigest>,
    #[serde(default)]
    pub disk_bytes: u64,
    #[serde(default)]
    pub replicated_bytes: u64,
    /// Bytes that differed (and were written) over all disks, as the client counted them.
    #[serde(default)]
    pub differing_bytes: Option<u64>,
    /// Bytes the client fetched over all disks (after compression).
    #[serde(default)]
    pub fetched_bytes: Option<u64>,
    /// Per disk, as the client last reported it (sizes, bytes that differed, fetched).
    #[serde(default)]
    pub disks: Vec<DiskProgress>,
    /// Seconds spent in each step (summed over attempts and resumes).
    #[serde(default)]
    pub step_secs: BTreeMap<String, f64>,
    #[serde(default)]
    pub started_at: Option<u64>,
    #[serde(default)]
    pub finished_at: Option<u64>,
}

impl VmState {
    pub fn new(vm: &str, recovery_instance: Option<String>) -> Self {
        Self {
            vm: vm.to_string(),
            recovery_instance,
            wave: None,
            vcenter: None,
            datastore: None,
            status: VmStatus::Pending,
            last_completed: None,
            failed_step: None,
            message: None,
            moref: None,
            vm_name: None,
            bios_uuid: None,
            instance_uuid: None,
            source_bios_uuid: None,
            previous_client_id: None,
            token: None,
            seed_path: None,
            seed_sha256: None,
            seed_ds_path: None,
            was_powered_on: None,
            snapshot: None,
            snapshot_outcome: None,
            seed_deleted: false,
            saved_boot: None,
            devices_before: None,
            attached: vec![],
            digests: vec![],
            disk_bytes: 0,
            replicated_bytes: 0,
            differing_bytes: None,
            fetched_bytes: None,
            disks: vec![],
            step_secs: BTreeMap::new(),
            started_at: None,
            finished_at: None,
        }
    }

    /// Whether the VM's configuration is currently changed by the run (ISOs attached or boot
    /// order changed) and must be put back if the VM fails.
    pub fn needs_rollback(&self) -> bool {
        matches!(self.last_completed, Some(s) if s >= Step::SaveBootOptions && s < Step::RestoreBootOptions)
    }
}

/// Run-wide part of the state (`run.json` in the state directory).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunHeader {
    pub format: u32,
    pub run_id: String,
    /// SHA-256 of the plan file the run started from; `--resume` refuses another plan.
    pub plan_sha256: String,
    pub plan_path: PathBuf,
    /// The appliance ISO, once uploaded (or found) and verified, per vCenter + datastore.
    #[serde(default)]
    pub appliances: Vec<ApplianceCopy>,
    pub vm_count: usize,
}

/// A file the run put on a datastore (results: `left_behind`, `removed`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatastoreFile {
    /// The plan's `[[vcenter]]` name (absent in the single-vCenter form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcenter: Option<String>,
    pub datastore: String,
    /// Inside the datastore, e.g. `failback/failback.iso`.
    pub path: String,
}

/// The appliance ISO on one vCenter's datastore: uploaded once per run and vCenter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplianceCopy {
    #[serde(flatten)]
    pub file: DatastoreFile,
    pub sha256: String,
    /// Deleted at the end of the run (`--cleanup`).
    #[serde(default)]
    pub deleted: bool,
}

/// The whole state in memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    pub header: RunHeader,
    pub vms: Vec<VmState>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("state directory {path} is in use by another `failback mass run` (locked)")]
    Locked { path: PathBuf },
    #[error("state {path} was written for plan {recorded} (SHA-256 {recorded_sha}), not {plan} ({plan_sha}); resume with the same plan")]
    PlanChanged {
        path: PathBuf,
        recorded: PathBuf,
        recorded_sha: String,
        plan: PathBuf,
        plan_sha: String,
    },
    #[error("state {path} already holds a run: pass --resume to continue it, or choose another --state directory")]
    Exists { path: PathBuf },
    #[error("no run state in {path} to resume")]
    Missing { path: PathBuf },
}

pub const STATE_FORMAT: u32 = 1;

/// A state directory held locked by this process: `run.json` + one `vm-NNNNN.json` per VM,
/// so that recording a step rewrites one small file, not the state of 500 VMs.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    /// Held for the lock's lifetime.
    _lock: File,
}

impl StateDir {
    /// Create (if needed) and lock `dir` for this process.
    pub fn lock(dir: &Path) -> Result<Self, StateError> {
        let io = |source| StateError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .map_err(io)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StateError::Locked {
                    path: dir.to_path_buf(),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn has_run(&self) -> bool {
        self.dir.join("run.json").exists()
    }

    pub fn load(&self) -> Result<RunState, StateError> {
        load(&self.dir)
    }

    pub fn save_header(&self, h: &RunHeader) -> Result<(), StateError> {
        write_atomic(&self.dir.join("run.json"), h)
    }

    pub fn save_vm(&self, index: usize, vm: &VmState) -> Result<(), StateError> {
        write_atomic(&self.dir.join(vm_file(index)), vm)
    }

    pub fn save_all(&self, st: &RunState) -> Result<(), StateError> {
        for (i, vm) in st.vms.iter().enumerate() {
            self.save_vm(i, vm)?;
        }
        // Header last: a run exists only once every VM file is there.
        self.save_header(&st.header)
    }
}

fn vm_file(index: usize) -> String {
    format!("vm-{index:05}.json")
}

/// Atomic replace (temp file, fsync, rename, directory fsync): a crash leaves either the old
/// or the new content, never half of one. Mode 0600: the state holds pairing tokens.
fn write_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), StateError> {
    let io = |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    };
    let data = serde_json::to_vec_pretty(value).map_err(|e| StateError::Corrupt {
        path: path.to_path_buf(),
        source: e,
    })?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut opts = File::options();
        opts.create(true).truncate(true).write(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&tmp).map_err(io)?;
        f.write_all(&data).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, StateError> {
    let data = std::fs::read(path).map_err(|source| StateError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&data).map_err(|source| StateError::Corrupt {
        path: path.to_path_buf(),
        source,
    })
}

/// Read a state directory without locking it (status display, tests).
pub fn load(dir: &Path) -> Result<RunState, StateError> {
    let run = dir.join("run.json");
    if !run.exists() {
        return Err(StateError::Missing {
            path: dir.to_path_buf(),
        });
    }
    let header: RunHeader = read_json(&run)?;
    let mut vms = Vec::with_capacity(header.vm_count);
    for i in 0..header.vm_count {
        vms.push(read_json(&dir.join(vm_file(i)))?);
    }
    Ok(RunState { header, vms })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_ordered_and_next_after_walks_them_all() {
        let mut walked = vec![];
        let mut last = None;
        while let Some(s) = Step::next_after(last) {
            walked.push(s);
            last = Some(s);
        }
        assert_eq!(walked, Step::ALL.to_vec());
        for w in Step::ALL.windows(2) {
            assert!(w[0] < w[1]);
        }
        // Names are the serde names.
        for s in Step::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.name());
        }
    }

    #[test]
    fn rollback_window() {
        let mut v = VmState::new("a", None);
        assert!(!v.needs_rollback());
        v.last_completed = Some(Step::Snapshot);
        assert!(!v.needs_rollback());
        v.last_completed = Some(Step::SaveBootOptions);
        assert!(v.needs_rollback());
        v.last_completed = Some(Step::DetachIsos);
        assert!(v.needs_rollback());
        v.last_completed = Some(Step::RestoreBootOptions);
        assert!(!v.needs_rollback());
    }

    #[test]
    fn save_is_atomic_private_and_locked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/run-state");
        let sd = StateDir::lock(&path).unwrap();
        assert!(!sd.has_run());
        // A second holder is refused while the first lives.
        assert!(matches!(
            StateDir::lock(&path),
            Err(StateError::Locked { .. })
        ));
        let mut st = RunState {
            header: RunHeader {
                format: STATE_FORMAT,
                run_id: "r1".into(),
                plan_sha256: "ab".into(),
                plan_path: "p.toml".into(),
                appliances: vec![],
                vm_count: 2,
            },
            vms: vec![
                VmState::new("a", Some("i-1".into())),
                VmState::new("b", None),
            ],
        };
        st.vms[0].last_completed = Some(Step::AttachIsos);
        st.vms[0].saved_boot = Some(SavedBoot("{\"bootOrder\":[]}".into()));
        sd.save_all(&st).unwrap();
        assert!(sd.has_run());
        assert_eq!(sd.load().unwrap(), st);
        st.vms[1].last_completed = Some(Step::Check);
        sd.save_vm(1, &st.vms[1]).unwrap();
        assert_eq!(sd.load().unwrap(), st);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path.join("vm-00000.json"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        drop(sd);
        let sd2 = StateDir::lock(&path).unwrap();
        assert_eq!(
            sd2.load().unwrap().vms[0].last_completed,
            Some(Step::AttachIsos)
        );
        std::fs::write(path.join("vm-00001.json"), b"{not json").unwrap();
        let err = sd2.load().unwrap_err();
        assert!(matches!(err, StateError::Corrupt { .. }));
        assert!(err.to_string().contains("vm-00001.json"), "{err}");
    }
}
