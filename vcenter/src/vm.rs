//! VM inventory: listing, finding, and the serialisable summary.

use crate::client::{request, Client, MoRef};
use crate::error::{Error, Result};
use crate::property::ObjectContent;
use crate::xml::{escape, Element};
use serde::{Deserialize, Serialize};

/// Properties read for every VM.
const VM_PATHS: &[&str] = &[
    "name",
    "config.uuid",
    "config.instanceUuid",
    "config.hardware.device",
    "runtime.powerState",
    "config.bootOptions",
    "config.firmware",
    "config.guestId",
    "config.guestFullName",
    "config.template",
    "guest.toolsRunningStatus",
    "guest.ipAddress",
];

/// VM power state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PowerState {
    PoweredOn,
    PoweredOff,
    Suspended,
    Unknown,
}

impl PowerState {
    pub(crate) fn parse(s: &str) -> Self {
        match s {
            "poweredOn" => PowerState::PoweredOn,
            "poweredOff" => PowerState::PoweredOff,
            "suspended" => PowerState::Suspended,
            _ => PowerState::Unknown,
        }
    }
}

impl std::fmt::Display for PowerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PowerState::PoweredOn => "poweredOn",
            PowerState::PoweredOff => "poweredOff",
            PowerState::Suspended => "suspended",
            PowerState::Unknown => "unknown",
        })
    }
}

/// A virtual disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSummary {
    pub key: i32,
    pub label: String,
    pub capacity_bytes: u64,
    /// Backing file, `[datastore] path.vmdk`.
    pub file: Option<String>,
    pub controller_key: Option<i32>,
    pub unit_number: Option<i32>,
}

/// A CD-ROM drive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CdromSummary {
    pub key: i32,
    pub label: String,
    /// `[datastore] path` when an ISO is attached.
    pub iso: Option<String>,
    pub start_connected: bool,
    pub controller_key: Option<i32>,
    pub unit_number: Option<i32>,
}

/// What the orchestrator and `failback vcenter vms` need to know about a VM.
/// JSON field names are stable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSummary {
    pub name: String,
    /// Managed object id (e.g. `vm-63`).
    pub moref: String,
    /// `config.uuid` (SMBIOS UUID the guest sees).
    pub bios_uuid: Option<String>,
    /// `config.instanceUuid` (vCenter's own id).
    pub instance_uuid: Option<String>,
    /// MAC addresses of all NICs, lowercase.
    pub macs: Vec<String>,
    pub power_state: PowerState,
    pub disks: Vec<DiskSummary>,
    pub cdroms: Vec<CdromSummary>,
    /// `bios` or `efi`.
    pub firmware: Option<String>,
    /// vSphere guest id (e.g. `otherGuest64`).
    pub guest_os: Option<String>,
    pub guest_full_name: Option<String>,
    pub tools_running: bool,
    /// The guest's primary IP address as VMware Tools report it (`guest.ipAddress`).
    #[serde(default)]
    pub guest_ip: Option<String>,
    pub template: bool,
}

/// A device as read back, with its raw XML (sent back unchanged on edit/remove).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub key: i32,
    /// vim type, e.g. `VirtualCdrom`, `VirtualIDEController`.
    pub kind: String,
    pub label: String,
    pub controller_key: Option<i32>,
    pub unit_number: Option<i32>,
    pub raw: Element,
}

impl Device {
    fn parse(el: &Element) -> Option<Device> {
        Some(Device {
            key: el.parse_child("key")?,
            kind: el.type_name().to_string(),
            label: el
                .path(&["deviceInfo", "label"])
                .map(|l| l.text.clone())
                .unwrap_or_default(),
            controller_key: el.parse_child("controllerKey"),
            unit_number: el.parse_child("unitNumber"),
            raw: el.clone(),
        })
    }

    pub fn is_cdrom(&self) -> bool {
        self.kind == "VirtualCdrom"
    }

    pub fn is_ide_controller(&self) -> bool {
        self.kind == "VirtualIDEController"
    }

    /// AHCI is the only concrete SATA controller type.
    pub fn is_sata_controller(&self) -> bool {
        self.kind == "VirtualAHCIController" || self.kind == "VirtualSATAController"
    }

    /// ISO path if the backing is an ISO file.
    pub fn iso(&self) -> Option<&str> {
        let b = self.raw.child("backing")?;
        (b.type_name() == "VirtualCdromIsoBackingInfo")
            .then(|| b.text_of("fileName"))
            .flatten()
    }

    pub fn mac(&self) -> Option<String> {
        self.raw
            .text_of("macAddress")
            .filter(|m| !m.is_empty())
            .map(normalize_mac)
    }

    pub fn bus_number(&self) -> Option<i32> {
        self.raw.parse_child("busNumber")
    }
}

/// Lowercase, `:`-separated.
pub fn normalize_mac(m: &str) -> String {
    m.trim().to_ascii_lowercase().replace('-', ":")
}

/// A VM reference with its name, for messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRef {
    pub moref: MoRef,
    pub name: String,
}

impl std::fmt::Display for VmRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "'{}' ({})", self.name, self.moref.value)
    }
}

/// A VM with everything we read: summary, devices, boot options.
#[derive(Debug, Clone)]
pub struct Vm {
    pub vmref: VmRef,
    pub summary: VmSummary,
    pub devices: Vec<Device>,
    /// `config.bootOptions` as read back (a `VirtualMachineBootOptions`).
    pub boot_options: Option<Element>,
}

impl Vm {
    fn from_object(oc: &ObjectContent) -> Vm {
        let text = |p: &str| oc.text(p).map(str::to_string).filter(|s| !s.is_empty());
        let devices: Vec<Device> = oc
            .get("config.hardware.device")
            .map(|v| v.children.iter().filter_map(Device::parse).collect())
            .unwrap_or_default();
        let name = text("name").unwrap_or_default();
        let disks = devices
            .iter()
            .filter(|d| d.kind == "VirtualDisk")
            .map(|d| DiskSummary {
                key: d.key,
                label: d.label.clone(),
                capacity_bytes: d
                    .raw
                    .parse_child::<u64>("capacityInBytes")
                    .filter(|b| *b > 0)
                    .or_else(|| {
                        d.raw
                            .parse_child::<u64>("capacityInKB")
                            .map(|k| k.saturating_mul(1024))
                    })
                    .unwrap_or(0),
                file: d.raw.path(&["backing", "fileName"]).map(|f| f.text.clone()),
                controller_key: d.controller_key,
                unit_number: d.unit_number,
            })
            .collect();
        let cdroms = devices
            .iter()
            .filter(|d| d.is_cdrom())
            .map(|d| CdromSummary {
                key: d.key,
                label: d.label.clone(),
                iso: d.iso().map(str::to_string),
                start_connected: d
                    .raw
                    .child("connectable")
                    .and_then(|c| c.bool_child("startConnected"))
                    .unwrap_or(false),
                controller_key: d.controller_key,
                unit_number: d.unit_number,
            })
            .collect();
        let summary = VmSummary {
            name: name.clone(),
            moref: oc.obj.value.clone(),
            bios_uuid: text("config.uuid"),
            instance_uuid: text("config.instanceUuid"),
            macs: devices.iter().filter_map(Device::mac).collect(),
            power_state: PowerState::parse(oc.text("runtime.powerState").unwrap_or("")),
            disks,
            cdroms,
            firmware: text("config.firmware"),
            guest_os: text("config.guestId"),
            guest_full_name: text("config.guestFullName"),
            tools_running: oc.text("guest.toolsRunningStatus") == Some("guestToolsRunning"),
            guest_ip: text("guest.ipAddress").filter(|ip| !ip.is_empty()),
            template: oc.text("config.template") == Some("true"),
        };
        Vm {
            vmref: VmRef {
                moref: oc.obj.clone(),
                name,
            },
            summary,
            devices,
            boot_options: oc.get("config.bootOptions").cloned(),
        }
    }

    pub fn device(&self, key: i32) -> Option<&Device> {
        self.devices.iter().find(|d| d.key == key)
    }
}

/// How to find a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmQuery {
    /// Exact name (must be unique).
    Name(String),
    /// Inventory path, `DC0/vm/folder/name`.
    InventoryPath(String),
    /// BIOS UUID (`config.uuid`).
    BiosUuid(String),
    /// Instance UUID (`config.instanceUuid`).
    InstanceUuid(String),
    /// BIOS UUID first, then instance UUID.
    Uuid(String),
    /// MAC address of any NIC, case-insensitive.
    Mac(String),
    /// Managed object id, e.g. `vm-63`.
    MoRef(String),
}

impl std::fmt::Display for VmQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmQuery::Name(n) => write!(f, "named '{n}'"),
            VmQuery::InventoryPath(p) => write!(f, "at inventory path '{p}'"),
            VmQuery::BiosUuid(u) => write!(f, "with BIOS UUID {u}"),
            VmQuery::InstanceUuid(u) => write!(f, "with instance UUID {u}"),
            VmQuery::Uuid(u) => write!(f, "with UUID {u}"),
            VmQuery::Mac(m) => write!(f, "with MAC {m}"),
            VmQuery::MoRef(m) => write!(f, "{m}"),
        }
    }
}

impl Client {
    /// Every VM (templates included) with all properties.
    pub async fn list_vms(&self) -> Result<Vec<Vm>> {
        let objs = self
            .retrieve_all("list VMs", "VirtualMachine", VM_PATHS)
            .await?;
        let mut vms: Vec<Vm> = objs.iter().map(Vm::from_object).collect();
        vms.sort_by(|a, b| a.vmref.name.cmp(&b.vmref.name));
        Ok(vms)
    }

    /// Summaries of every VM, sorted by name.
    pub async fn vm_summaries(&self) -> Result<Vec<VmSummary>> {
        Ok(self
            .list_vms()
            .await?
            .into_iter()
            .map(|v| v.summary)
            .collect())
    }

    /// Reads one VM fresh.
    pub async fn vm(&self, moref: &MoRef) -> Result<Vm> {
        let oc = self
            .retrieve_one(&format!("read VM {}", moref.value), moref, VM_PATHS)
            .await
            .map_err(|e| match e.fault_kind() {
                Some(crate::FaultKind::ManagedObjectNotFound { .. }) => Error::VmNotFound {
                    query: moref.value.clone(),
                    url: self.url().to_string(),
                },
                _ => e,
            })?;
        Ok(Vm::from_object(&oc))
    }

    /// Finds exactly one VM.
    pub async fn find_vm(&self, query: &VmQuery) -> Result<Vm> {
        let not_found = || Error::VmNotFound {
            query: query.to_string(),
            url: self.url().to_string(),
        };
        match query {
            VmQuery::Name(name) => {
                let objs = self
                    .retrieve_all(&format!("find VM {query}"), "VirtualMachine", &["name"])
                    .await?;
                let hits: Vec<&ObjectContent> = objs
                    .iter()
                    .filter(|o| o.text("name") == Some(name))
                    .collect();
                match hits.as_slice() {
                    [] => Err(not_found()),
                    [one] => self.vm(&one.obj).await,
                    many => Err(Error::VmAmbiguous {
                        query: query.to_string(),
                        url: self.url().to_string(),
                        matches: many.iter().map(|o| o.obj.value.clone()).collect(),
                    }),
                }
            }
            VmQuery::InventoryPath(path) => {
                let body = request(
                    "FindByInventoryPath",
                    &self.inner.sc.search_index,
                    &format!("<inventoryPath>{}</inventoryPath>", escape(path)),
                );
                let resp = self.call(&format!("find VM {query}"), &body).await?;
                match resp.child("returnval").and_then(MoRef::from_element) {
                    Some(m) if m.kind == "VirtualMachine" => self.vm(&m).await,
                    _ => Err(not_found()),
                }
            }
            VmQuery::BiosUuid(u) => self.find_by_uuid(u, false).await?.ok_or_else(not_found),
            VmQuery::InstanceUuid(u) => self.find_by_uuid(u, true).await?.ok_or_else(not_found),
            VmQuery::Uuid(u) => match self.find_by_uuid(u, false).await? {
                Some(vm) => Ok(vm),
                None => self.find_by_uuid(u, true).await?.ok_or_else(not_found),
            },
            VmQuery::Mac(mac) => {
                let want = normalize_mac(mac);
                let vms = self.list_vms().await?;
                let hits: Vec<Vm> = vms
                    .into_iter()
                    .filter(|v| v.summary.macs.contains(&want))
                    .collect();
                match hits.len() {
                    0 => Err(not_found()),
                    1 => Ok(hits.into_iter().next().ok_or_else(not_found)?),
                    _ => Err(Error::VmAmbiguous {
                        query: query.to_string(),
                        url: self.url().to_string(),
                        matches: hits.iter().map(|v| v.vmref.to_string()).collect(),
                    }),
                }
            }
            VmQuery::MoRef(id) => self.vm(&MoRef::new("VirtualMachine", id)).await,
        }
    }

    async fn find_by_uuid(&self, uuid: &str, instance: bool) -> Result<Option<Vm>> {
        let body = request(
            "FindByUuid",
            &self.inner.sc.search_index,
            &format!(
                "<uuid>{}</uuid><vmSearch>true</vmSearch><instanceUuid>{instance}</instanceUuid>",
                escape(uuid)
            ),
        );
        let resp = self
            .call(&format!("find VM with UUID {uuid}"), &body)
            .await?;
        match resp.child("returnval").and_then(MoRef::from_element) {
            Some(m) => Ok(Some(self.vm(&m).await?)),
            None => Ok(None),
        }
    }

    /// Reconfigures a VM with a raw `VirtualMachineConfigSpec` body (the children of
    /// `<spec>`), for changes this crate has no helper for. Waits for the task.
    pub async fn reconfigure(&self, vm: &VmRef, spec_children: &str, what: &str) -> Result<()> {
        let body = request(
            "ReconfigVM_Task",
            &vm.moref,
            &format!("<spec>{spec_children}</spec>"),
        );
        self.run_task(&format!("{what} on VM {vm}"), &body).await?;
        Ok(())
    }
}
