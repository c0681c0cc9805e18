//! Mass-failback plan files (`failback mass plan` writes them, `failback mass run` reads them).
//!
//! A plan has one `[[vm]]` entry per vCenter VM: which recovery instance it receives, how its
//! appliance reaches the network, an optional device mapping, and per-VM options (protective
//! snapshot, launch mode, timeouts per phase). TOML or JSON, chosen by file extension
//! (`.json` = JSON, anything else = TOML). Every struct denies unknown fields, and
//! [`Plan::validate`] checks the whole plan before anything runs, collecting *every* problem
//! with the VM and the field it concerns, so an admin fixes a 300-VM plan in one pass.
//!
//! ```toml
//! version = 1
//! unmatched_instances = ["ri-0042"]     # instances no VM matched (reported as skipped)
//!
//! # Optional: the vCenters the VMs live in (none: one vCenter from --vcenter / VCENTER_HOST).
//! [[vcenter]]
//! name = "east"
//! host = "vc-east.example"              # host, host:port or https://host:port/sdk
//! datastore = "ds-east-01"              # where the appliance and seed ISOs go
//! folder = "failback"                   # inside the datastore (default: --folder)
//! user_env = "VC_EAST_USER"             # credentials from these variables, or:
//! password_env = "VC_EAST_PASSWORD"     # credentials_file = "/etc/failback/east.cred" (0600)
//!
//! [[vm]]
//! recovery_instance = "ri-0001"         # omit: no instance for this VM (reported as skipped)
//! vcenter = "east"                      # required when the plan has several [[vcenter]]
//! matched_by = "bios_uuid"              # informational, written by `plan --one-click`
//! [vm.target]
//! name = "web-01"
//! moref = "vm-63"
//! bios_uuid = "4216a1b2-..."
//! [vm.network]
//! mode = "static"
//! address = "192.168.10.21/24"
//! gateway = "192.168.10.1"
//! dns = ["192.168.10.2"]
//! proxy = "http://proxy.example:3128"
//! [vm.options]
//! protective_snapshot = true
//! launch = "auto"
//! [vm.options.timeouts]
//! pair_secs = 900
//! ```

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::Path;

/// The plan format version this build reads and writes.
pub const PLAN_VERSION: u32 = 1;

/// A whole mass-failback plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Format version; must be [`PLAN_VERSION`].
    pub version: u32,
    /// Recovery instances that no VM matched; kept so the results report them as skipped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unmatched_instances: Vec<String>,
    /// Ordered runbook waves (e.g. databases, then app servers, then web). Empty: every VM
    /// in one wave. Wave N+1 starts when every VM of wave N is back on its own disks and
    /// passed the wave's readiness check.
    #[serde(default, rename = "wave", skip_serializing_if = "Vec::is_empty")]
    pub waves: Vec<Wave>,
    /// The vCenters the plan's VMs live in. Empty: one vCenter given by the command's
    /// `--vcenter` flags / `VCENTER_*` environment (the single-vCenter form).
    #[serde(default, rename = "vcenter", skip_serializing_if = "Vec::is_empty")]
    pub vcenters: Vec<VcenterEntry>,
    /// One entry per VM.
    #[serde(default, rename = "vm")]
    pub vms: Vec<VmPlan>,
}

/// One vCenter of a plan (`[[vcenter]]`). Credentials come from two environment variables
/// (`user_env`, `password_env`) or from a [`VcenterCredentials`] file that only its owner
/// may read (mode 0600); the plan itself never holds a password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcenterEntry {
    /// Named by `vcenter = "..."` in the VM entries, the dry run and the results.
    pub name: String,
    /// `host`, `host:port` or `https://host[:port]/sdk`.
    pub host: String,
    /// Datastore for the appliance ISO (uploaded once per vCenter) and the seed ISOs.
    pub datastore: String,
    /// Folder inside the datastore for the ISOs (default: the run's `--folder`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub folder: Option<String>,
    /// Datacenter (default: the only one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacenter: Option<String>,
    /// Environment variable holding the user name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_env: Option<String>,
    /// Environment variable holding the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// File with `user = "..."` and `password = "..."` (TOML), mode 0600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<String>,
    /// CA certificate(s) (PEM) to verify this vCenter with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    /// Pin this vCenter's certificate by SHA-256 (hex, colons allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbprint: Option<String>,
    /// Accept any certificate (test labs only).
    #[serde(default, skip_serializing_if = "is_default")]
    pub insecure: bool,
}

/// A `credentials_file` of a `[[vcenter]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcenterCredentials {
    pub user: String,
    pub password: String,
}

/// A file of `[[vcenter]]` entries (`failback mass find|plan --vcenters FILE`), in the plan's
/// format; `plan` copies them into the plan it writes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcenterList {
    #[serde(default, rename = "vcenter")]
    pub vcenters: Vec<VcenterEntry>,
}

impl VcenterList {
    /// Read (TOML, or JSON for `.json`) and check the entries like a plan's.
    pub fn load(path: &Path) -> Result<Self, PlanError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PlanError::Read {
            path: shown.clone(),
            source,
        })?;
        let list: VcenterList = match PlanFormat::from_path(path) {
            PlanFormat::Toml => toml::from_str(&text).map_err(|source| PlanError::Toml {
                path: shown.clone(),
                source,
            })?,
            PlanFormat::Json => serde_json::from_str(&text).map_err(|source| PlanError::Json {
                path: shown.clone(),
                source,
            })?,
        };
        let mut issues = vec![];
        if list.vcenters.is_empty() {
            issues.push(PlanIssue {
                vm: "plan".into(),
                field: "vcenter".into(),
                message: format!("{shown} has no [[vcenter]] entry"),
            });
        }
        let probe = Plan {
            version: PLAN_VERSION,
            unmatched_instances: vec![],
            waves: vec![],
            vcenters: list.vcenters.clone(),
            vms: vec![],
        };
        probe.validate_vcenters(&mut |vm: &str, field: String, message: String| {
            issues.push(PlanIssue {
                vm: vm.into(),
                field,
                message,
            })
        });
        if issues.is_empty() {
            Ok(list)
        } else {
            Err(PlanError::Invalid(issues))
        }
    }
}

/// One runbook wave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wave {
    /// Named by `wave = "..."` in the VM entries.
    pub name: String,
    /// When a VM of this wave fails: `stop` (default: later waves do not start; resume
    /// after fixing) or `continue`.
    #[serde(default)]
    pub on_failure: WavePolicy,
    /// What each VM of the wave must show once powered on from its own disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<Readiness>,
}

/// A wave's failure policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WavePolicy {
    #[default]
    Stop,
    Continue,
}

/// Readiness check of a wave's VMs, polled until every condition set holds or the time-out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Readiness {
    /// vCenter reports VMware Tools running in the guest.
    #[serde(default)]
    pub tools_running: bool,
    /// vCenter reports a guest IP address.
    #[serde(default)]
    pub guest_ip: bool,
    /// A TCP connection to this port of the guest IP succeeds (implies `guest_ip`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_port: Option<u16>,
    #[serde(default = "default_readiness")]
    pub timeout_secs: u64,
}

fn default_readiness() -> u64 {
    600
}

/// What to do with one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmPlan {
    /// The recovery instance whose disks this VM receives. `None`: nothing matched this VM;
    /// the run reports it as skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_instance: Option<String>,
    /// The runbook wave (a `[[wave]]` name); required when the plan has waves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave: Option<String>,
    /// The vCenter (a `[[vcenter]]` name) the VM lives in; required when the plan has
    /// several, optional with one, absent in the single-vCenter form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcenter: Option<String>,
    /// How the one-click matcher found this pair (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched_by: Option<MatchedBy>,
    /// The vCenter VM. A different VM than the original is allowed (the client then does a
    /// full sync because nothing matches).
    pub target: VmTarget,
    #[serde(default)]
    pub network: Network,
    /// Disk mapping passed to the appliance; empty = let the DR service suggest one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_mapping: Vec<DeviceMap>,
    #[serde(default)]
    pub options: VmOptions,
}

/// How a VM was matched to its recovery instance, in the order the matcher tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchedBy {
    BiosUuid,
    InstanceUuid,
    Mac,
    /// Written by hand.
    Manual,
}

/// Identifies the vCenter VM. At least one field must be set; when several are set the run
/// checks they all agree (so a stale moref cannot silently hit another VM).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmTarget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Managed object id, e.g. `vm-63` (opaque: never parsed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moref: Option<String>,
    /// VMware BIOS UUID (`config.uuid`, the guest's SMBIOS UUID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bios_uuid: Option<String>,
    /// vCenter instance UUID (`config.instanceUuid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_uuid: Option<String>,
}

impl VmTarget {
    /// A label for messages: the name, else the moref, else a UUID.
    pub fn label(&self) -> String {
        self.name
            .clone()
            .or_else(|| self.moref.clone())
            .or_else(|| self.bios_uuid.clone())
            .or_else(|| self.instance_uuid.clone())
            .unwrap_or_else(|| "<unnamed VM>".to_string())
    }
}

/// How the appliance configures its network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkMode {
    #[default]
    Dhcp,
    Static,
}

/// Appliance network settings (written into the VM's seed ISO).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    #[serde(default)]
    pub mode: NetworkMode,
    /// `ADDRESS/PREFIX` (IPv4 or IPv6); required for static.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
    /// HTTP(S) proxy URL for reaching the DR service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
}

/// One entry of a device mapping: recovery-instance volume -> local disk of the VM.
/// `local = "EXCLUDE"` leaves that remote volume out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceMap {
    pub remote: String,
    pub local: String,
}

/// When the failback is launched once the client is ready.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LaunchMode {
    /// The orchestrator launches as soon as the client reports ready.
    #[default]
    Auto,
    /// The admin launches (`failback launch`); the orchestrator waits for completion.
    Manual,
}

/// What happens to a VM that fails after the run changed it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Put its configuration back (ISOs, drives, boot options) and leave the disks as they
    /// are: powered off when the client had started writing them, else powered on again.
    #[default]
    Leave,
    /// Also revert to the protective snapshot (needs `protective_snapshot = true`) and power
    /// the VM on if it was on: the VM is as before the run.
    Revert,
}

/// Per-VM options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmOptions {
    /// Take a vCenter snapshot of the VM before its disks are overwritten.
    #[serde(default)]
    pub protective_snapshot: bool,
    /// On failure: `leave` (default) or `revert` to the protective snapshot.
    #[serde(default, skip_serializing_if = "is_default")]
    pub on_failure: OnFailure,
    /// Keep the protective snapshot after success (default: removed once the VM runs from
    /// its own disks and passed its wave's readiness check).
    #[serde(default, skip_serializing_if = "is_default")]
    pub keep_snapshot: bool,
    #[serde(default)]
    pub launch: LaunchMode,
    #[serde(default)]
    pub timeouts: Timeouts,
}

impl Default for VmOptions {
    fn default() -> Self {
        Self {
            protective_snapshot: false,
            on_failure: OnFailure::Leave,
            keep_snapshot: false,
            launch: LaunchMode::Auto,
            timeouts: Timeouts::default(),
        }
    }
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// Time limits per phase, in seconds. A phase that runs out fails that VM (only that VM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// Guest shutdown before a hard power-off.
    #[serde(default = "default_shutdown")]
    pub shutdown_secs: u64,
    /// Power-on of the appliance until the client has paired with the DR service.
    #[serde(default = "default_pair")]
    pub pair_secs: u64,
    /// Paired until `FAILBACK_READY_FOR_LAUNCH` (initial sync).
    #[serde(default = "default_sync")]
    pub sync_secs: u64,
    /// Launch until `FAILBACK_COMPLETED` (with `launch = "manual"` this includes the wait for
    /// the admin).
    #[serde(default = "default_complete")]
    pub complete_secs: u64,
    /// Each vCenter task (power, reconfigure, snapshot) and each upload.
    #[serde(default = "default_vcenter")]
    pub vcenter_secs: u64,
}

fn default_shutdown() -> u64 {
    120
}
fn default_pair() -> u64 {
    900
}
fn default_sync() -> u64 {
    24 * 3600
}
fn default_complete() -> u64 {
    4 * 3600
}
fn default_vcenter() -> u64 {
    600
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            shutdown_secs: default_shutdown(),
            pair_secs: default_pair(),
            sync_secs: default_sync(),
            complete_secs: default_complete(),
            vcenter_secs: default_vcenter(),
        }
    }
}

/// One problem found in a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanIssue {
    /// The VM label (name, moref or UUID), or `plan` for plan-wide fields.
    pub vm: String,
    /// Dotted field path, e.g. `vm[3].network.address`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for PlanIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VM {}: {}: {}", self.vm, self.field, self.message)
    }
}

/// Errors reading or validating a plan.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("cannot read plan {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("plan {path} is not valid TOML: {source}")]
    Toml {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("plan {path} is not valid JSON: {source}")]
    Json {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot encode plan: {0}")]
    Encode(String),
    #[error("plan has {} problem(s):\n  {}", .0.len(), .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    Invalid(Vec<PlanIssue>),
}

/// Plan file encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanFormat {
    Toml,
    Json,
}

impl PlanFormat {
    /// `.json` is JSON; everything else is TOML.
    pub fn from_path(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("json") => PlanFormat::Json,
            _ => PlanFormat::Toml,
        }
    }
}

impl Plan {
    /// Parse a plan from text (not yet validated).
    pub fn parse(text: &str, format: PlanFormat, path_for_errors: &str) -> Result<Self, PlanError> {
        match format {
            PlanFormat::Toml => toml::from_str(text).map_err(|source| PlanError::Toml {
                path: path_for_errors.to_string(),
                source,
            }),
            PlanFormat::Json => serde_json::from_str(text).map_err(|source| PlanError::Json {
                path: path_for_errors.to_string(),
                source,
            }),
        }
    }

    /// Read, parse and validate a plan file.
    pub fn load(path: &Path) -> Result<Self, PlanError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PlanError::Read {
            path: shown.clone(),
            source,
        })?;
        let plan = Self::parse(&text, PlanFormat::from_path(path), &shown)?;
        plan.validate()?;
        Ok(plan)
    }

    /// Encode in the given format.
    pub fn encode(&self, format: PlanFormat) -> Result<String, PlanError> {
        match format {
            PlanFormat::Toml => {
                toml::to_string_pretty(self).map_err(|e| PlanError::Encode(e.to_string()))
            }
            PlanFormat::Json => {
                serde_json::to_string_pretty(self).map_err(|e| PlanError::Encode(e.to_string()))
            }
        }
    }

    /// Check the whole plan; returns every problem found.
    pub fn validate(&self) -> Result<(), PlanError> {
        let mut issues = Vec::new();
        let mut push = |vm: &str, field: String, message: String| {
            issues.push(PlanIssue {
                vm: vm.to_string(),
                field,
                message,
            })
        };
        if self.version != PLAN_VERSION {
            push(
                "plan",
                "version".into(),
                format!(
                    "unsupported plan version {} (this build reads {PLAN_VERSION})",
                    self.version
                ),
            );
        }
        let mut wave_names: HashMap<&str, usize> = HashMap::new();
        for (i, w) in self.waves.iter().enumerate() {
            let f = |name: &str| format!("wave[{i}].{name}");
            if w.name.trim().is_empty() {
                push("plan", f("name"), "is empty".into());
            } else if wave_names.insert(w.name.as_str(), i).is_some() {
                push(
                    "plan",
                    f("name"),
                    format!("wave {} is defined twice", w.name),
                );
            }
            if let Some(r) = &w.readiness {
                if r.timeout_secs == 0 {
                    push(
                        "plan",
                        f("readiness.timeout_secs"),
                        "must be at least 1 second".into(),
                    );
                }
                if r.tcp_port == Some(0) {
                    push("plan", f("readiness.tcp_port"), "must be 1..65535".into());
                }
            }
        }
        self.validate_vcenters(&mut push);
        let mut instances: HashMap<&str, String> = HashMap::new();
        let mut targets: HashMap<String, String> = HashMap::new();
        for (i, vm) in self.vms.iter().enumerate() {
            let label = vm.target.label();
            let f = |name: &str| format!("vm[{i}].{name}");
            if let Some(ri) = &vm.recovery_instance {
                if ri.trim().is_empty() {
                    push(
                        &label,
                        f("recovery_instance"),
                        "is empty (omit the field for a VM without an instance)".into(),
                    );
                } else if let Some(other) = instances.insert(ri, label.clone()) {
                    push(
                        &label,
                        f("recovery_instance"),
                        format!("recovery instance {ri} is also planned for VM {other}"),
                    );
                }
                if self.unmatched_instances.iter().any(|u| u == ri) {
                    push(
                        &label,
                        f("recovery_instance"),
                        format!("{ri} is also listed in unmatched_instances"),
                    );
                }
            }
            match (&vm.wave, self.waves.is_empty()) {
                (Some(w), true) => push(
                    &label,
                    f("wave"),
                    format!("names wave {w} but the plan has no [[wave]]"),
                ),
                (Some(w), false) if !wave_names.contains_key(w.as_str()) => push(
                    &label,
                    f("wave"),
                    format!("wave {w} is not defined in [[wave]]"),
                ),
                (None, false) if vm.recovery_instance.is_some() => push(
                    &label,
                    f("wave"),
                    "is required: the plan has [[wave]] entries".into(),
                ),
                _ => {}
            }
            match (&vm.vcenter, self.vcenters.len()) {
                (Some(v), 0) => push(
                    &label,
                    f("vcenter"),
                    format!("names vCenter {v} but the plan has no [[vcenter]]"),
                ),
                (Some(v), _) if !self.vcenters.iter().any(|e| e.name == *v) => push(
                    &label,
                    f("vcenter"),
                    format!("vCenter {v} is not defined in [[vcenter]]"),
                ),
                (None, n) if n > 1 => push(
                    &label,
                    f("vcenter"),
                    format!("is required: the plan has {n} [[vcenter]] entries"),
                ),
                _ => {}
            }
            // The same name or moref may exist in two vCenters: targets are unique per vCenter.
            let scope = self.vcenter_of(vm).unwrap_or_default().to_string();
            let t = &vm.target;
            let ids = [
                ("name", &t.name),
                ("moref", &t.moref),
                ("bios_uuid", &t.bios_uuid),
                ("instance_uuid", &t.instance_uuid),
            ];
            if ids.iter().all(|(_, v)| v.is_none()) {
                push(
                    &label,
                    f("target"),
                    "names no VM: set name, moref, bios_uuid or instance_uuid".into(),
                );
            }
            for (key, value) in ids {
                let Some(v) = value else { continue };
                if v.trim().is_empty() {
                    push(&label, f(&format!("target.{key}")), "is empty".into());
                    continue;
                }
                if (key == "bios_uuid" || key == "instance_uuid") && !is_uuid(v) {
                    push(
                        &label,
                        f(&format!("target.{key}")),
                        format!("{v:?} is not a UUID (8-4-4-4-12 hex digits)"),
                    );
                }
                let k = format!("{scope}\0{key}={}", v.to_ascii_lowercase());
                if let Some(other) = targets.insert(k, label.clone()) {
                    push(
                        &label,
                        f(&format!("target.{key}")),
                        format!("{v} is also the target of the entry for VM {other}"),
                    );
                }
            }
            validate_network(&vm.network, &label, i, &mut push);
            let mut remotes = HashMap::new();
            let mut locals = HashMap::new();
            for (j, m) in vm.device_mapping.iter().enumerate() {
                let field = f(&format!("device_mapping[{j}]"));
                if m.remote.trim().is_empty() || m.local.trim().is_empty() {
                    push(
                        &label,
                        field.clone(),
                        "remote and local must both be set".into(),
                    );
                }
                if remotes.insert(m.remote.as_str(), j).is_some() {
                    push(
                        &label,
                        field.clone(),
                        format!("remote volume {} is mapped twice", m.remote),
                    );
                }
                if m.local != "EXCLUDE" && locals.insert(m.local.as_str(), j).is_some() {
                    push(
                        &label,
                        field,
                        format!("local disk {} receives two volumes", m.local),
                    );
                }
            }
            if vm.options.on_failure == OnFailure::Revert && !vm.options.protective_snapshot {
                push(
                    &label,
                    f("options.on_failure"),
                    "\"revert\" needs protective_snapshot = true".into(),
                );
            }
            let to = &vm.options.timeouts;
            for (name, v) in [
                ("shutdown_secs", to.shutdown_secs),
                ("pair_secs", to.pair_secs),
                ("sync_secs", to.sync_secs),
                ("complete_secs", to.complete_secs),
                ("vcenter_secs", to.vcenter_secs),
            ] {
                if v == 0 {
                    push(
                        &label,
                        f(&format!("options.timeouts.{name}")),
                        "must be at least 1 second".into(),
                    );
                }
            }
        }
        if issues.is_empty() {
            Ok(())
        } else {
            Err(PlanError::Invalid(issues))
        }
    }
}

impl Plan {
    /// The `[[vcenter]]` name of a VM entry: its `vcenter`, else the only entry's; `None` in
    /// the single-vCenter form (no `[[vcenter]]`).
    pub fn vcenter_of<'a>(&'a self, vm: &'a VmPlan) -> Option<&'a str> {
        match (&vm.vcenter, self.vcenters.as_slice()) {
            (Some(v), _) => Some(v.as_str()),
            (None, [only]) => Some(only.name.as_str()),
            _ => None,
        }
    }

    fn validate_vcenters(&self, push: &mut impl FnMut(&str, String, String)) {
        let mut names = HashMap::new();
        let mut hosts = HashMap::new();
        for (i, e) in self.vcenters.iter().enumerate() {
            let f = |name: &str| format!("vcenter[{i}].{name}");
            for (field, value) in [
                ("name", &e.name),
                ("host", &e.host),
                ("datastore", &e.datastore),
            ] {
                if value.trim().is_empty() {
                    push("plan", f(field), "is empty".into());
                }
            }
            if !e.name.trim().is_empty() && names.insert(e.name.as_str(), i).is_some() {
                push(
                    "plan",
                    f("name"),
                    format!("vCenter {} is defined twice", e.name),
                );
            }
            let host = e.host.trim().to_ascii_lowercase();
            if let Some(other) = hosts.insert(host, e.name.as_str()) {
                push(
                    "plan",
                    f("host"),
                    format!(
                        "{} is also the host of vCenter {other}: one [[vcenter]] per vCenter",
                        e.host
                    ),
                );
            }
            let env = e.user_env.is_some() || e.password_env.is_some();
            match (env, &e.credentials_file) {
                (true, Some(_)) => push(
                    "plan",
                    f("credentials_file"),
                    "set either user_env + password_env or credentials_file, not both".into(),
                ),
                (false, None) => push(
                    "plan",
                    f("credentials_file"),
                    "no credentials: set user_env + password_env, or credentials_file".into(),
                ),
                (true, None) if e.user_env.is_none() || e.password_env.is_none() => push(
                    "plan",
                    f(if e.user_env.is_none() {
                        "user_env"
                    } else {
                        "password_env"
                    }),
                    "user_env and password_env go together".into(),
                ),
                _ => {}
            }
            let pins = [e.insecure, e.ca.is_some(), e.thumbprint.is_some()];
            if pins.iter().filter(|p| **p).count() > 1 {
                push(
                    "plan",
                    f("insecure"),
                    "choose one of insecure, ca, thumbprint".into(),
                );
            }
        }
    }
}

fn validate_network(
    n: &Network,
    label: &str,
    i: usize,
    push: &mut impl FnMut(&str, String, String),
) {
    let f = |name: &str| format!("vm[{i}].network.{name}");
    match n.mode {
        NetworkMode::Dhcp => {
            // DRSFA keeps IP fields in DHCP entries and ignores them; we do the same but still
            // check their syntax so a later switch to static does not surprise.
        }
        NetworkMode::Static => {
            if n.address.is_none() {
                push(
                    label,
                    f("address"),
                    "is required when mode = \"static\"".into(),
                );
            }
        }
    }
    if let Some(a) = &n.address {
        if parse_cidr(a).is_none() {
            push(
                label,
                f("address"),
                format!("{a:?} is not ADDRESS/PREFIX (e.g. 192.168.1.10/24 or fd00::5/64)"),
            );
        }
    }
    if let Some(g) = &n.gateway {
        match g.parse::<IpAddr>() {
            Err(_) => push(label, f("gateway"), format!("{g:?} is not an IP address")),
            Ok(gw) => {
                if let Some((addr, _)) = n.address.as_deref().and_then(parse_cidr) {
                    if addr.is_ipv4() != gw.is_ipv4() {
                        push(
                            label,
                            f("gateway"),
                            format!("{g} is not the same IP family as the address"),
                        );
                    }
                }
            }
        }
    }
    for (j, d) in n.dns.iter().enumerate() {
        if d.parse::<IpAddr>().is_err() {
            push(
                label,
                f(&format!("dns[{j}]")),
                format!("{d:?} is not an IP address"),
            );
        }
    }
    if let Some(p) = &n.proxy {
        let ok = (p.starts_with("http://") || p.starts_with("https://"))
            && p.split("://").nth(1).is_some_and(|h| !h.is_empty());
        if !ok {
            push(
                label,
                f("proxy"),
                format!("{p:?} is not an http:// or https:// URL"),
            );
        }
    }
}

/// `ADDRESS/PREFIX` with a prefix that fits the family.
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (a, p) = s.split_once('/')?;
    let addr: IpAddr = a.parse().ok()?;
    let prefix: u8 = p.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some((addr, prefix))
}

/// 8-4-4-4-12 hex digits, any case.
pub fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, ri: Option<&str>) -> VmPlan {
        VmPlan {
            recovery_instance: ri.map(str::to_string),
            wave: None,
            vcenter: None,
            matched_by: Some(MatchedBy::Manual),
            target: VmTarget {
                name: Some(name.into()),
                ..Default::default()
            },
            network: Network::default(),
            device_mapping: vec![],
            options: VmOptions::default(),
        }
    }

    fn plan(vms: Vec<VmPlan>) -> Plan {
        Plan {
            version: PLAN_VERSION,
            unmatched_instances: vec![],
            waves: vec![],
            vcenters: vec![],
            vms,
        }
    }

    fn issues(p: &Plan) -> Vec<PlanIssue> {
        match p.validate() {
            Err(PlanError::Invalid(v)) => v,
            other => panic!("expected invalid plan, got {other:?}"),
        }
    }

    fn vcenter(name: &str, host: &str) -> VcenterEntry {
        VcenterEntry {
            name: name.into(),
            host: host.into(),
            datastore: "ds1".into(),
            folder: None,
            datacenter: None,
            user_env: Some("VC_USER".into()),
            password_env: Some("VC_PASSWORD".into()),
            credentials_file: None,
            ca: None,
            thumbprint: None,
            insecure: true,
        }
    }

    #[test]
    fn vcenters_are_checked_and_each_vm_names_one() {
        let mut p = plan(vec![vm("a", Some("ri-1")), vm("a", Some("ri-2"))]);
        // The same VM name in two vCenters is two VMs.
        p.vms[0].vcenter = Some("east".into());
        p.vms[1].vcenter = Some("west".into());
        p.vcenters = vec![vcenter("east", "vc1"), vcenter("west", "vc2")];
        p.validate().unwrap();
        assert_eq!(p.vcenter_of(&p.vms[1]), Some("west"));
        // One entry: VMs may leave `vcenter` out.
        let mut one = plan(vec![vm("a", Some("ri-1"))]);
        one.vcenters = vec![vcenter("only", "vc1")];
        one.validate().unwrap();
        assert_eq!(one.vcenter_of(&one.vms[0]), Some("only"));
        // No entries: the single-vCenter form.
        assert_eq!(plan(vec![vm("a", None)]).vcenter_of(&one.vms[0]), None);

        let mut bad = p.clone();
        bad.vms[1].vcenter = None; // several vCenters: required
        bad.vms[0].vcenter = Some("north".into());
        bad.vcenters[1].host = "VC1".into(); // same host twice
        bad.vcenters[1].credentials_file = Some("/x".into()); // both kinds
        bad.vcenters[0].password_env = None; // half of the env pair
        bad.vcenters[0].thumbprint = Some("ab".into()); // with insecure
        bad.vcenters.push(vcenter("east", "vc3")); // name twice
        bad.vcenters[2].datastore = " ".into();
        let got = issues(&bad);
        let has = |field: &str| got.iter().any(|i| i.field == field);
        for f in [
            "vm[0].vcenter",
            "vm[1].vcenter",
            "vcenter[1].host",
            "vcenter[1].credentials_file",
            "vcenter[0].password_env",
            "vcenter[0].insecure",
            "vcenter[2].name",
            "vcenter[2].datastore",
        ] {
            assert!(has(f), "{f}: {got:#?}");
        }
        let mut lone = plan(vec![vm("a", Some("ri-1"))]);
        lone.vms[0].vcenter = Some("east".into());
        assert!(issues(&lone).iter().any(|i| i.field == "vm[0].vcenter"));
        let mut nocred = one.clone();
        nocred.vcenters[0].user_env = None;
        nocred.vcenters[0].password_env = None;
        assert!(issues(&nocred)
            .iter()
            .any(|i| i.message.contains("no credentials")));
        // Unknown fields in [[vcenter]] are refused.
        let err = Plan::parse(
            "version = 1\n[[vcenter]]\nname = \"a\"\nhost = \"h\"\ndatastore = \"d\"\npasword = \"x\"\n",
            PlanFormat::Toml,
            "p.toml",
        )
        .unwrap_err();
        assert!(err.to_string().contains("pasword"), "{err}");
    }

    #[test]
    fn good_plan_round_trips_in_toml_and_json() {
        let mut a = vm("web-01", Some("ri-1"));
        a.target.bios_uuid = Some("4216A1B2-0000-1111-2222-333344445555".into());
        a.network = Network {
            mode: NetworkMode::Static,
            address: Some("192.168.1.10/24".into()),
            gateway: Some("192.168.1.1".into()),
            dns: vec!["192.168.1.2".into(), "fd00::53".into()],
            proxy: Some("http://proxy:3128".into()),
        };
        a.device_mapping = vec![DeviceMap {
            remote: "vol-1".into(),
            local: "/dev/sda".into(),
        }];
        a.options.launch = LaunchMode::Manual;
        a.options.protective_snapshot = true;
        a.wave = Some("web".into());
        a.vcenter = Some("east".into());
        let mut db = vm("db-01", None);
        db.wave = Some("db".into());
        db.vcenter = Some("west".into());
        let p = Plan {
            vcenters: vec![
                vcenter("east", "vc-east.example"),
                VcenterEntry {
                    user_env: None,
                    password_env: None,
                    credentials_file: Some("/etc/failback/west.cred".into()),
                    folder: Some("fb".into()),
                    thumbprint: Some("ab".repeat(32)),
                    insecure: false,
                    ..vcenter("west", "https://vc-west.example:8443/sdk")
                },
            ],
            version: 1,
            unmatched_instances: vec!["ri-9".into()],
            waves: vec![
                Wave {
                    name: "db".into(),
                    on_failure: WavePolicy::Stop,
                    readiness: Some(Readiness {
                        tools_running: true,
                        guest_ip: false,
                        tcp_port: Some(5432),
                        timeout_secs: 300,
                    }),
                },
                Wave {
                    name: "web".into(),
                    on_failure: WavePolicy::Continue,
                    readiness: None,
                },
            ],
            vms: vec![a, db],
        };
        p.validate().unwrap();
        for fmt in [PlanFormat::Toml, PlanFormat::Json] {
            let text = p.encode(fmt).unwrap();
            let back = Plan::parse(&text, fmt, "mem").unwrap();
            assert_eq!(back, p, "{fmt:?} round trip:\n{text}");
        }
    }

    #[test]
    fn minimal_toml_gets_defaults() {
        let p = Plan::parse(
            "version = 1\n[[vm]]\nrecovery_instance = \"ri-1\"\n[vm.target]\nname = \"a\"\n",
            PlanFormat::Toml,
            "mem",
        )
        .unwrap();
        p.validate().unwrap();
        assert_eq!(p.vms[0].network.mode, NetworkMode::Dhcp);
        assert_eq!(p.vms[0].options.timeouts, Timeouts::default());
        assert_eq!(p.vms[0].options.launch, LaunchMode::Auto);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = Plan::parse(
            "version = 1\n[[vm]]\n[vm.target]\nname = \"a\"\n[vm.options]\nsnapshot = true\n",
            PlanFormat::Toml,
            "p.toml",
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("p.toml") && msg.contains("snapshot"), "{msg}");
        let err = Plan::parse(
            r#"{"version":1,"vm":[{"target":{"name":"a","nmae":"b"}}]}"#,
            PlanFormat::Json,
            "p.json",
        )
        .unwrap_err();
        assert!(err.to_string().contains("nmae"), "{err}");
    }

    #[test]
    fn errors_name_vm_and_field_and_all_are_reported() {
        let mut a = vm("web-01", Some("ri-1"));
        a.network.mode = NetworkMode::Static; // no address
        a.network.dns = vec!["not-an-ip".into()];
        a.network.proxy = Some("proxy:3128".into());
        a.options.timeouts.pair_secs = 0;
        let mut b = vm("web-02", Some("ri-1")); // duplicate instance
        b.target.bios_uuid = Some("xyz".into());
        b.device_mapping = vec![
            DeviceMap {
                remote: "v1".into(),
                local: "/dev/sda".into(),
            },
            DeviceMap {
                remote: "v2".into(),
                local: "/dev/sda".into(),
            },
        ];
        let c = VmPlan {
            target: VmTarget::default(),
            ..vm("x", Some("ri-3"))
        };
        let mut p = plan(vec![a, b, c]);
        p.version = 7;
        let got = issues(&p);
        let has = |vm: &str, field: &str| got.iter().any(|i| i.vm == vm && i.field == field);
        assert!(has("plan", "version"), "{got:#?}");
        assert!(has("web-01", "vm[0].network.address"), "{got:#?}");
        assert!(has("web-01", "vm[0].network.dns[0]"), "{got:#?}");
        assert!(has("web-01", "vm[0].network.proxy"), "{got:#?}");
        assert!(
            has("web-01", "vm[0].options.timeouts.pair_secs"),
            "{got:#?}"
        );
        assert!(has("web-02", "vm[1].recovery_instance"), "{got:#?}");
        assert!(has("web-02", "vm[1].target.bios_uuid"), "{got:#?}");
        assert!(has("web-02", "vm[1].device_mapping[1]"), "{got:#?}");
        assert!(has("<unnamed VM>", "vm[2].target"), "{got:#?}");
        let text = PlanError::Invalid(got).to_string();
        assert!(
            text.contains("VM web-02: vm[1].recovery_instance"),
            "{text}"
        );
    }

    #[test]
    fn waves_are_named_once_and_every_vm_names_one() {
        let wave = |n: &str| Wave {
            name: n.into(),
            on_failure: WavePolicy::Stop,
            readiness: None,
        };
        let mut a = vm("a", Some("ri-1"));
        a.wave = Some("nope".into());
        let b = vm("b", Some("ri-2"));
        let mut p = plan(vec![a, b, vm("c", None)]);
        p.waves = vec![wave("db"), wave("db")];
        let got = issues(&p);
        let has = |field: &str| got.iter().any(|i| i.field == field);
        assert!(
            has("wave[1].name") && has("vm[0].wave") && has("vm[1].wave"),
            "{got:#?}"
        );
        assert!(
            !has("vm[2].wave"),
            "a VM without an instance needs no wave: {got:#?}"
        );
        let mut lone = vm("a", Some("ri-1"));
        lone.wave = Some("db".into());
        assert!(issues(&plan(vec![lone]))
            .iter()
            .any(|i| i.field == "vm[0].wave"));
    }

    #[test]
    fn same_vm_twice_is_refused() {
        let a = vm("web-01", Some("ri-1"));
        let b = vm("WEB-01", Some("ri-2"));
        let got = issues(&plan(vec![a, b]));
        assert!(
            got.iter().any(|i| i.field == "vm[1].target.name"),
            "{got:#?}"
        );
    }

    #[test]
    fn gateway_family_must_match_address() {
        let mut a = vm("a", Some("ri-1"));
        a.network.mode = NetworkMode::Static;
        a.network.address = Some("10.0.0.5/33".into());
        let got = issues(&plan(vec![a.clone()]));
        assert!(got.iter().any(|i| i.field == "vm[0].network.address"));
        a.network.address = Some("10.0.0.5/24".into());
        a.network.gateway = Some("fd00::1".into());
        let got = issues(&plan(vec![a]));
        assert!(got.iter().any(|i| i.field == "vm[0].network.gateway"));
    }

    #[test]
    fn load_picks_format_by_extension_and_validates() {
        let dir = std::env::temp_dir().join(format!("plan-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = plan(vec![vm("a", Some("ri-1"))]);
        let j = dir.join("p.json");
        std::fs::write(&j, p.encode(PlanFormat::Json).unwrap()).unwrap();
        assert_eq!(Plan::load(&j).unwrap(), p);
        let t = dir.join("p.toml");
        std::fs::write(&t, p.encode(PlanFormat::Toml).unwrap()).unwrap();
        assert_eq!(Plan::load(&t).unwrap(), p);
        let bad = plan(vec![vm("a", Some("ri-1")), vm("b", Some("ri-1"))]);
        std::fs::write(&t, bad.encode(PlanFormat::Toml).unwrap()).unwrap();
        assert!(matches!(Plan::load(&t), Err(PlanError::Invalid(_))));
        let missing = dir.join("nope.toml");
        let err = Plan::load(&missing).unwrap_err().to_string();
        assert!(err.contains("nope.toml"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
