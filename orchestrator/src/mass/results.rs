//! The results file of a run (JSON): per VM the recovery instance, VM name and UUIDs, status
//! `succeeded | skipped | failed`, failed step and message, timings, bytes and whole-disk
//! digests; plus the exact settings and plan used (DRSFA keeps these in a separate
//! `failback_hosts_settings.json`; one file is easier to archive).

use super::state::{DatastoreFile, RunState, SnapshotOutcome, Step, VmStatus};
use failback_api::{DiskDigest, DiskProgress};
use failback_config::plan::Plan;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmResult {
    pub vm: String,
    pub recovery_instance: Option<String>,
    /// The runbook wave (plan `[[wave]]`), if the plan has waves.
    pub wave: Option<String>,
    /// The plan's `[[vcenter]]` name of the VM's vCenter (`null`: single-vCenter form).
    pub vcenter: Option<String>,
    pub vm_name: Option<String>,
    pub vm_moref: Option<String>,
    /// vCenter BIOS UUID of the VM failed back to.
    pub vm_bios_uuid: Option<String>,
    pub vm_instance_uuid: Option<String>,
    /// BIOS UUID of the original source server (from the instance's hints).
    pub source_bios_uuid: Option<String>,
    pub status: VmStatus,
    pub failed_step: Option<Step>,
    pub message: Option<String>,
    pub last_completed_step: Option<Step>,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    pub step_secs: BTreeMap<String, f64>,
    pub disk_bytes: u64,
    /// Bytes verified equal to the recovery volumes at the end (the whole disks).
    pub replicated_bytes: u64,
    /// Bytes that differed and were written, over all disks and rounds (the client's count;
    /// `null` from clients that do not report it). A delta failback shows its real size here.
    pub differing_bytes: Option<u64>,
    /// Bytes fetched over the network for them (after compression).
    pub fetched_bytes: Option<u64>,
    /// Per disk: size, bytes that differed, bytes fetched.
    pub disks: Vec<DiskProgress>,
    pub digests: Vec<DiskDigest>,
    pub snapshot: Option<String>,
    /// What became of the protective snapshot.
    pub snapshot_outcome: Option<SnapshotOutcome>,
    /// The VM's seed ISO was deleted (datastore and work dir).
    pub seed_deleted: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub total: usize,
    pub succeeded: usize,
    pub skipped: usize,
    pub failed: usize,
    /// Not finished (only in a results file written while the run is going).
    pub unfinished: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResults {
    pub run_id: String,
    pub started_at: u64,
    pub finished_at: Option<u64>,
    pub settings: serde_json::Value,
    pub plan: Plan,
    pub summary: Summary,
    /// Files the run left on datastores: the appliance ISO (one per vCenter) unless
    /// `--cleanup`, seed ISOs with `--keep-seeds` or whose deletion failed.
    pub left_behind: Vec<DatastoreFile>,
    /// Appliance ISOs `--cleanup` deleted. (Seed ISOs deleted: `seed_deleted` per VM.)
    pub removed: Vec<DatastoreFile>,
    pub vms: Vec<VmResult>,
}

impl RunResults {
    pub fn build(
        state: &RunState,
        plan: &Plan,
        settings: serde_json::Value,
        started_at: u64,
        finished_at: Option<u64>,
    ) -> Self {
        let mut summary = Summary {
            total: state.vms.len(),
            ..Default::default()
        };
        let vms = state
            .vms
            .iter()
            .map(|v| {
                match v.status {
                    VmStatus::Succeeded => summary.succeeded += 1,
                    VmStatus::Skipped => summary.skipped += 1,
                    VmStatus::Failed => summary.failed += 1,
                    VmStatus::Pending | VmStatus::Running => summary.unfinished += 1,
                }
                VmResult {
                    vm: v.vm.clone(),
                    recovery_instance: v.recovery_instance.clone(),
                    wave: v.wave.clone(),
                    vcenter: v.vcenter.clone(),
                    vm_name: v.vm_name.clone(),
                    vm_moref: v.moref.clone(),
                    vm_bios_uuid: v.bios_uuid.clone(),
                    vm_instance_uuid: v.instance_uuid.clone(),
                    source_bios_uuid: v.source_bios_uuid.clone(),
                    status: v.status,
                    failed_step: v.failed_step,
                    message: v.message.clone(),
                    last_completed_step: v.last_completed,
                    started_at: v.started_at,
                    finished_at: v.finished_at,
                    step_secs: v.step_secs.clone(),
                    disk_bytes: v.disk_bytes,
                    replicated_bytes: v.replicated_bytes,
                    differing_bytes: v.differing_bytes,
                    fetched_bytes: v.fetched_bytes,
                    disks: v.disks.clone(),
                    digests: v.digests.clone(),
                    snapshot: v.snapshot.clone(),
                    snapshot_outcome: v.snapshot_outcome,
                    seed_deleted: v.seed_deleted,
                }
            })
            .collect();
        let appliances = |deleted: bool| {
            state
                .header
                .appliances
                .iter()
                .filter(move |a| a.deleted == deleted)
                .map(|a| a.file.clone())
        };
        let mut left_behind: Vec<DatastoreFile> = appliances(false).collect();
        left_behind.extend(
            state
                .vms
                .iter()
                .filter(|v| !v.seed_deleted)
                .filter_map(|v| {
                    Some(DatastoreFile {
                        vcenter: v.vcenter.clone(),
                        datastore: v.datastore.clone().unwrap_or_default(),
                        path: v.seed_ds_path.clone()?,
                    })
                }),
        );
        Self {
            left_behind,
            removed: appliances(true).collect(),
            run_id: state.header.run_id.clone(),
            started_at,
            finished_at,
            settings,
            plan: plan.clone(),
            summary,
            vms,
        }
    }

    /// Write atomically (temp + rename) so readers never see half a file.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d)?;
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let data = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, data)?;
        std::fs::rename(&tmp, path)
    }
}
