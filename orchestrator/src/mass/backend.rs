//! The three things a mass failback drives, as small traits: the hypervisor (vCenter), the DR
//! service, and the seed-ISO builder. The run engine only sees these traits, so its
//! step/resume/retry logic is tested on its own and the real implementations (vcenter crate,
//! admin HTTP client, iso-builder) are wired in by `adapters`.

use async_trait::async_trait;
use failback_api::RecoveryInstance;
use failback_config::plan::{DeviceMap, Network};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// An error from a backend, marked transient (worth retrying with backoff) or permanent.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    /// Names what failed: VM, datastore path, URL, instance.
    pub message: String,
    /// Timeouts, connection resets, 429/503, expired sessions: retry. Everything else: fail.
    pub transient: bool,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl BackendError {
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            transient: false,
            source: None,
        }
    }
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            transient: true,
            source: None,
        }
    }
    pub fn with_source(
        mut self,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        self.source = Some(source.into());
        self
    }
    /// The message with every source cause appended (for results files and consoles).
    pub fn chain(&self) -> String {
        let mut s = self.message.clone();
        let mut cur: Option<&(dyn std::error::Error + 'static)> =
            self.source.as_deref().map(|e| e as _);
        while let Some(e) = cur {
            let m = e.to_string();
            if !s.contains(&m) {
                s.push_str(": ");
                s.push_str(&m);
            }
            cur = e.source();
        }
        s
    }
}

pub type BResult<T> = Result<T, BackendError>;

/// Power state of a VM as vCenter reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Power {
    On,
    Off,
    Suspended,
}

/// One virtual disk of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDisk {
    pub label: String,
    pub size_bytes: u64,
    /// Backing file, e.g. `[LocalDS_0] vm1/vm1.vmdk`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// What the orchestrator needs to know about a vCenter VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// The plan's `[[vcenter]]` name of the vCenter the VM was listed from (`None` in the
    /// single-vCenter form). Morefs, names and even UUIDs repeat across vCenters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcenter: Option<String>,
    pub moref: String,
    pub name: String,
    pub bios_uuid: Option<String>,
    pub instance_uuid: Option<String>,
    pub macs: Vec<String>,
    pub power: Power,
    pub tools_running: bool,
    /// Guest IP address reported by VMware Tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_ip: Option<String>,
    pub disks: Vec<VmDisk>,
}

/// A CD-ROM the run attached an ISO to; `added` = the run created the device (remove it
/// afterwards), otherwise it existed and only its backing changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedCdrom {
    pub device_key: i32,
    pub added: bool,
    pub iso: String,
    /// Backend-specific record of the attachment (e.g. the vCenter crate's
    /// `CdromAttachment` as JSON) so it can be undone precisely after a resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The VM's devices before the run attached anything: every key (a drive or controller not
/// among them was added by the run) and, per existing CD-ROM, the backend's complete record
/// of it (opaque; vCenter: the device's vim25 XML), so a reused drive is put back exactly.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesBefore {
    pub keys: Vec<i32>,
    #[serde(default)]
    pub cdroms: Vec<(i32, String)>,
}

/// Saved VM configuration, opaque to the engine (the adapter decides the encoding, e.g. the
/// complete `VirtualMachineBootOptions` as JSON). Stored in the state file so a resumed run
/// restores exactly what the VM had.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedBoot(pub String);

/// The vCenter operations a mass failback needs.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    async fn list_vms(&self) -> BResult<Vec<VmInfo>>;
    async fn vm(&self, moref: &str) -> BResult<VmInfo>;
    /// Upload `local` to `ds_path` (inside the run's datastore, without the `[ds]` prefix),
    /// then verify size and SHA-256 on the datastore.
    async fn upload(&self, local: &Path, ds_path: &str, sha256_hex: &str) -> BResult<()>;
    /// Whether `ds_path` exists with this size and SHA-256 (lets a run skip a re-upload).
    async fn has_file(&self, ds_path: &str, size: u64, sha256_hex: &str) -> BResult<bool>;
    /// Ask the guest OS to shut down (VMware Tools); returns at once.
    async fn shutdown_guest(&self, moref: &str) -> BResult<()>;
    async fn power_off(&self, moref: &str) -> BResult<()>;
    async fn power_on(&self, moref: &str) -> BResult<()>;
    /// Returns the snapshot's moref.
    async fn create_snapshot(&self, moref: &str, name: &str, description: &str) -> BResult<String>;
    /// Revert the VM to the snapshot (`snapshot` = the moref `create_snapshot` returned).
    async fn revert_snapshot(&self, moref: &str, snapshot: &str) -> BResult<()>;
    /// Remove the snapshot, keeping the VM's current state; a snapshot already gone is fine.
    async fn remove_snapshot(&self, moref: &str, snapshot: &str) -> BResult<()>;
    /// Delete `ds_path` (inside the run's datastore); a file already gone is fine.
    async fn delete_file(&self, ds_path: &str) -> BResult<()>;
    async fn save_boot(&self, moref: &str) -> BResult<SavedBoot>;
    /// Ensure a CD-ROM per ISO (reuse free ones, else add) and attach the ISOs; a drive or
    /// controller whose key is not in `devices_before` counts as added by this run, and a
    /// reused drive carries its original from `devices_before` (`ds_path`s in the run's
    /// datastore), connected at power on.
    async fn attach_isos(
        &self,
        moref: &str,
        isos: &[String],
        devices_before: Option<&DevicesBefore>,
    ) -> BResult<Vec<AttachedCdrom>>;
    /// The VM's devices, recorded before ISOs are attached: a run resumed after a crash
    /// mid-attach finds its ISO already in a drive and must still know that it added that
    /// drive (and controller), or what the reused drive was, or it would leave them changed.
    async fn devices_before(&self, moref: &str) -> BResult<DevicesBefore>;
    /// Boot order: CD-ROM first, then what was there.
    async fn set_cdrom_first(&self, moref: &str, saved: &SavedBoot) -> BResult<()>;
    /// Detach the ISOs and remove the CD-ROMs the run added.
    async fn detach_isos(&self, moref: &str, attached: &[AttachedCdrom]) -> BResult<()>;
    /// Put back exactly the saved boot options.
    async fn restore_boot(&self, moref: &str, saved: &SavedBoot) -> BResult<()>;
}

/// One vCenter a run drives: its plan name (`None` in the single-vCenter form), its backend
/// and where its ISOs go.
#[derive(Clone)]
pub struct VcenterConn {
    pub name: Option<String>,
    pub hv: std::sync::Arc<dyn Hypervisor>,
    /// The datastore the backend uploads to (for messages and the results).
    pub datastore: String,
    /// Folder inside the datastore for the ISOs (no `[datastore]` prefix).
    pub folder: String,
}

impl VcenterConn {
    /// `name` or `vcenter` for the single-vCenter form (progress and messages).
    pub fn label(&self) -> &str {
        self.name.as_deref().unwrap_or("vcenter")
    }

    /// Path inside the datastore of a file in the ISO folder (`sub` may hold a `seeds/`).
    pub fn iso_path(&self, sub: &str) -> String {
        format!("{}/{sub}", self.folder.trim_end_matches('/'))
    }

    /// Every VM of this vCenter, tagged with its name.
    pub async fn list_vms(&self) -> BResult<Vec<VmInfo>> {
        let mut vms = self.hv.list_vms().await.map_err(|e| BackendError {
            message: format!("vCenter {}: {}", self.label(), e.message),
            ..e
        })?;
        for v in &mut vms {
            v.vcenter = self.name.clone();
        }
        Ok(vms)
    }
}

/// Every VM of every vCenter (each tagged with its vCenter), in the order of `conns`.
pub async fn list_all(conns: &[VcenterConn]) -> BResult<Vec<VmInfo>> {
    let mut all = vec![];
    for c in conns {
        all.extend(c.list_vms().await?);
    }
    Ok(all)
}

/// The DR-service operations a mass failback needs (admin API).
#[async_trait]
pub trait DrService: Send + Sync {
    async fn instances(&self) -> BResult<Vec<RecoveryInstance>>;
    async fn instance(&self, id: &str) -> BResult<RecoveryInstance>;
    /// A one-time pairing token scoped to this instance.
    async fn create_pairing_token(&self, id: &str, ttl_secs: u64) -> BResult<String>;
    async fn launch(&self, id: &str) -> BResult<()>;
    async fn stop(&self, id: &str) -> BResult<()>;
}

/// Everything a VM's seed ISO carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedInput {
    /// DR service URL as the appliance reaches it.
    pub server_url: String,
    /// CA certificate (PEM) the appliance pins for the DR service.
    pub ca_pem: String,
    pub token: String,
    pub recovery_instance_id: String,
    pub network: Network,
    pub device_mapping: Vec<DeviceMap>,
    /// Hostname-like label for the appliance console.
    pub vm_name: String,
}

/// Builds a seed ISO (label `FBSEED`).
pub trait SeedBuilder: Send + Sync {
    fn build(&self, input: &SeedInput, out: &Path) -> BResult<()>;
}
