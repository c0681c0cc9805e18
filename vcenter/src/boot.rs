//! Boot order: save the complete `VirtualMachineBootOptions`, put the CD-ROM first,
//! restore exactly what was saved.
//!
//! vcsim replaces `bootOptions` wholesale while real vCenter merges fields, so we always
//! send the complete object. Known limit on real vCenter: an originally *empty* boot order
//! cannot be expressed in SOAP (an empty array is the same as "unset"), so restoring it
//! leaves the order we set; the saved file still records that it was empty.

use crate::client::Client;
use crate::error::{Error, Result};
use crate::vm::{Vm, VmRef};
use crate::xml::{self, Element};
use serde::{Deserialize, Serialize};

/// Children of `VirtualMachineBootOptions` that follow `bootOrder`, in schema order.
const AFTER_BOOT_ORDER: &[&str] = &["networkBootProtocol"];

/// One entry of the boot order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum BootDevice {
    Cdrom,
    Disk { device_key: i32 },
    Ethernet { device_key: i32 },
    Floppy,
    Other { xsi_type: String },
}

/// Readable view of `VirtualMachineBootOptions` (the XML is the source of truth).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BootOptionsView {
    pub boot_delay_ms: Option<i64>,
    pub enter_bios_setup: Option<bool>,
    pub efi_secure_boot_enabled: Option<bool>,
    pub boot_retry_enabled: Option<bool>,
    pub boot_retry_delay_ms: Option<i64>,
    pub boot_order: Vec<BootDevice>,
    pub network_boot_protocol: Option<String>,
}

impl BootOptionsView {
    pub fn from_element(el: &Element) -> Self {
        BootOptionsView {
            boot_delay_ms: el.parse_child("bootDelay"),
            enter_bios_setup: el.bool_child("enterBIOSSetup"),
            efi_secure_boot_enabled: el.bool_child("efiSecureBootEnabled"),
            boot_retry_enabled: el.bool_child("bootRetryEnabled"),
            boot_retry_delay_ms: el.parse_child("bootRetryDelay"),
            boot_order: el
                .children_named("bootOrder")
                .map(|b| {
                    let key = b.parse_child("deviceKey").unwrap_or(0);
                    match b.type_name() {
                        "VirtualMachineBootOptionsBootableCdromDevice" => BootDevice::Cdrom,
                        "VirtualMachineBootOptionsBootableDiskDevice" => {
                            BootDevice::Disk { device_key: key }
                        }
                        "VirtualMachineBootOptionsBootableEthernetDevice" => {
                            BootDevice::Ethernet { device_key: key }
                        }
                        "VirtualMachineBootOptionsBootableFloppyDevice" => BootDevice::Floppy,
                        t => BootDevice::Other {
                            xsi_type: t.to_string(),
                        },
                    }
                })
                .collect(),
            network_boot_protocol: el.text_of("networkBootProtocol").map(str::to_string),
        }
    }
}

/// Saved boot options of one VM; written to a file by `failback vcenter boot-order`
/// and read back to restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedBootOptions {
    pub vm: String,
    pub vm_moref: String,
    pub bios_uuid: Option<String>,
    /// For people; ignored on restore.
    pub options: BootOptionsView,
    /// The complete `VirtualMachineBootOptions` as read back, as `<bootOptions>` XML.
    pub xml: String,
}

impl SavedBootOptions {
    fn from_vm(vm: &Vm) -> Self {
        let el = vm
            .boot_options
            .clone()
            .unwrap_or_else(|| Element::new("bootOptions").with_type("VirtualMachineBootOptions"));
        SavedBootOptions {
            vm: vm.vmref.name.clone(),
            vm_moref: vm.vmref.moref.value.clone(),
            bios_uuid: vm.summary.bios_uuid.clone(),
            options: BootOptionsView::from_element(&el),
            xml: el.to_xml(Some("bootOptions")),
        }
    }

    /// The saved XML as an element.
    pub fn element(&self) -> Result<Element> {
        let doc = format!(
            "<w xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\">{}</w>",
            self.xml
        );
        let w = xml::parse(&doc)
            .map_err(|e| Error::BootOptions(format!("saved XML for VM '{}': {e}", self.vm)))?;
        w.children
            .into_iter()
            .find(|c| c.name == "bootOptions")
            .ok_or_else(|| {
                Error::BootOptions(format!(
                    "saved XML for VM '{}' has no <bootOptions>",
                    self.vm
                ))
            })
    }
}

/// The boot options with the CD-ROM first: any CD-ROM entry moves to the front; an empty
/// order becomes CD-ROM then every disk (so the VM still boots its disk when the ISO is gone).
pub fn cdrom_first(vm: &Vm, current: &Element) -> Element {
    let mut el = current.clone();
    el.name = "bootOptions".into();
    if el.xsi_type.is_none() {
        el.xsi_type = Some("VirtualMachineBootOptions".into());
    }
    let mut rest: Vec<Element> = el
        .children
        .iter()
        .filter(|c| {
            c.name == "bootOrder" && c.type_name() != "VirtualMachineBootOptionsBootableCdromDevice"
        })
        .cloned()
        .collect();
    if rest.is_empty() {
        rest = vm
            .devices
            .iter()
            .filter(|d| d.kind == "VirtualDisk")
            .map(|d| {
                Element::new("bootOrder")
                    .with_type("VirtualMachineBootOptionsBootableDiskDevice")
                    .push(Element::leaf("deviceKey", d.key.to_string()))
            })
            .collect();
    }
    let pos = el
        .children
        .iter()
        .position(|c| c.name == "bootOrder" || AFTER_BOOT_ORDER.contains(&c.name.as_str()))
        .unwrap_or(el.children.len());
    el.children.retain(|c| c.name != "bootOrder");
    let mut order =
        vec![Element::new("bootOrder").with_type("VirtualMachineBootOptionsBootableCdromDevice")];
    order.extend(rest);
    let pos = pos.min(el.children.len());
    el.children.splice(pos..pos, order);
    el
}

impl Client {
    /// The VM's complete boot options.
    pub async fn boot_options(&self, vm: &VmRef) -> Result<SavedBootOptions> {
        Ok(SavedBootOptions::from_vm(&self.vm(&vm.moref).await?))
    }

    /// Sets the CD-ROM first; returns what was there before (save it to restore later).
    pub async fn set_boot_cdrom_first(&self, vm: &VmRef) -> Result<SavedBootOptions> {
        let current = self.vm(&vm.moref).await?;
        let saved = SavedBootOptions::from_vm(&current);
        let new = cdrom_first(&current, &saved.element()?);
        self.reconfigure(
            vm,
            &new.to_xml(Some("bootOptions")),
            "set CD-ROM first in boot order",
        )
        .await?;
        Ok(saved)
    }

    /// Sends the saved boot options back unchanged. Refuses options saved from another VM
    /// (different moref and BIOS UUID).
    pub async fn restore_boot_options(&self, vm: &VmRef, saved: &SavedBootOptions) -> Result<()> {
        let current = self.vm(&vm.moref).await?;
        let same_uuid = saved.bios_uuid.is_some() && saved.bios_uuid == current.summary.bios_uuid;
        if saved.vm_moref != vm.moref.value && !same_uuid {
            return Err(Error::BootOptions(format!(
                "saved for VM '{}' ({}), not for VM {vm}",
                saved.vm, saved.vm_moref
            )));
        }
        let el = saved.element()?;
        self.reconfigure(vm, &el.to_xml(Some("bootOptions")), "restore boot options")
            .await
    }
}
