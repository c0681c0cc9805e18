//! CD-ROM drives: reuse or add one, attach an ISO, detach, remove what we added.

use crate::client::Client;
use crate::error::{Error, Result};
use crate::vm::{Device, Vm, VmRef};
use crate::xml::Element;
use serde::{Deserialize, Serialize};

/// Units per IDE controller (master/slave).
const IDE_UNITS: i32 = 2;
/// Units per SATA (AHCI) controller.
const SATA_UNITS: i32 = 30;
/// SATA controllers per VM.
const SATA_CONTROLLERS: i32 = 4;

/// Children of `VirtualDevice` that come after `backing` / `connectable`, in schema order.
const AFTER_BACKING: &[&str] = &[
    "connectable",
    "slotInfo",
    "controllerKey",
    "unitNumber",
    "numaNode",
    "deviceGroupInfo",
];
const AFTER_CONNECTABLE: &[&str] = &[
    "slotInfo",
    "controllerKey",
    "unitNumber",
    "numaNode",
    "deviceGroupInfo",
];

/// What `attach_iso` did, so it can be undone precisely (serialisable for the orchestrator's
/// state file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CdromAttachment {
    pub vm: String,
    pub vm_moref: String,
    /// `[datastore] path`
    pub iso: String,
    pub device_key: i32,
    /// True when the CD-ROM drive was added by us (else an existing drive was reused).
    pub added_cdrom: bool,
    /// Key of the SATA controller we added for it, if any.
    pub added_controller_key: Option<i32>,
    /// A reused drive as it was before the ISO went in (vim25 XML of the whole device:
    /// backing, connectable flags, everything), put back exactly by [`Client::remove_added`].
    /// `None` for a drive we added, or when the drive already held the ISO (a caller that
    /// recorded the drive earlier fills it in, see [`device_to_stored`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original: Option<String>,
}

const XSI_DECL: &str = "xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" \
                        xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\"";

/// A device as text that survives a state file and [`device_from_stored`] (vim25 XML).
pub fn device_to_stored(dev: &Device) -> String {
    as_read_back(dev).to_xml(Some("device"))
}

/// The device element from [`device_to_stored`] text.
pub fn device_from_stored(text: &str) -> Result<Element> {
    let doc = format!("<stored {XSI_DECL}>{text}</stored>");
    let root = crate::xml::parse(&doc)
        .map_err(|e| Error::Config(format!("stored CD-ROM device is not vim25 XML: {e}")))?;
    root.children
        .into_iter()
        .next()
        .filter(|d| d.type_name() == "VirtualCdrom")
        .ok_or_else(|| Error::Config("stored device is not a VirtualCdrom".into()))
}

/// Where the ISO goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CdromPlan {
    /// A drive already holds this ISO and connects at power on.
    AlreadyAttached { key: i32 },
    /// Reuse a drive that holds no ISO.
    Reuse { key: i32 },
    /// Add a drive on an existing IDE or SATA controller.
    Add { controller_key: i32, unit: i32 },
    /// Add a SATA controller on this bus, and a drive on it.
    AddWithSataController { bus: i32 },
}

fn iso_backing(iso: &str) -> Element {
    Element::new("backing")
        .with_type("VirtualCdromIsoBackingInfo")
        .push(Element::leaf("fileName", iso))
}

fn connect_info(connected: bool) -> Element {
    Element::new("connectable")
        .push(Element::leaf("startConnected", connected.to_string()))
        .push(Element::leaf("allowGuestControl", "true"))
        .push(Element::leaf("connected", connected.to_string()))
}

/// The device as read back, with `deviceInfo` guaranteed (vcsim 0.24.2 drops the connection
/// on an edit without it; real vCenter accepts it).
fn as_read_back(dev: &Device) -> Element {
    let mut el = dev.raw.clone();
    if el.child("deviceInfo").is_none() {
        el.set_child(
            Element::new("deviceInfo")
                .push(Element::leaf("label", dev.label.clone()))
                .push(Element::leaf("summary", "")),
            &[
                "backing",
                "connectable",
                "slotInfo",
                "controllerKey",
                "unitNumber",
            ],
        );
    }
    el
}

pub(crate) fn device_change(op: &str, device: &Element) -> String {
    format!(
        "<deviceChange><operation>{op}</operation>{}</deviceChange>",
        device.to_xml(Some("device"))
    )
}

/// Decides where an ISO goes, from the VM's devices.
pub fn plan_cdrom(vm: &Vm, iso: &str) -> Result<CdromPlan> {
    let cdroms: Vec<&Device> = vm.devices.iter().filter(|d| d.is_cdrom()).collect();
    if let Some(d) = cdroms.iter().find(|d| d.iso() == Some(iso)) {
        let starts = d
            .raw
            .child("connectable")
            .and_then(|c| c.bool_child("startConnected"))
            .unwrap_or(false);
        return Ok(if starts {
            CdromPlan::AlreadyAttached { key: d.key }
        } else {
            CdromPlan::Reuse { key: d.key }
        });
    }
    if let Some(d) = cdroms.iter().find(|d| d.iso().is_none()) {
        return Ok(CdromPlan::Reuse { key: d.key });
    }
    let free_unit = |ctrl: &Device, units: i32| {
        let used: Vec<i32> = vm
            .devices
            .iter()
            .filter(|d| d.controller_key == Some(ctrl.key))
            .filter_map(|d| d.unit_number)
            .collect();
        // SATA unit numbers are per controller; an AHCI controller has no reserved unit.
        (0..units).find(|u| !used.contains(u))
    };
    for ctrl in vm.devices.iter().filter(|d| d.is_ide_controller()) {
        if let Some(unit) = free_unit(ctrl, IDE_UNITS) {
            return Ok(CdromPlan::Add {
                controller_key: ctrl.key,
                unit,
            });
        }
    }
    let sata: Vec<&Device> = vm
        .devices
        .iter()
        .filter(|d| d.is_sata_controller())
        .collect();
    for ctrl in &sata {
        if let Some(unit) = free_unit(ctrl, SATA_UNITS) {
            return Ok(CdromPlan::Add {
                controller_key: ctrl.key,
                unit,
            });
        }
    }
    let buses: Vec<i32> = sata.iter().filter_map(|d| d.bus_number()).collect();
    match (0..SATA_CONTROLLERS).find(|b| !buses.contains(b)) {
        Some(bus) if sata.len() < usize::try_from(SATA_CONTROLLERS).unwrap_or(4) => {
            Ok(CdromPlan::AddWithSataController { bus })
        }
        _ => Err(Error::NoCdromSlot {
            vm: vm.vmref.to_string(),
            detail: format!(
                "{} CD-ROM drive(s) all hold ISOs, IDE controllers full ({} units each), \
                 {} SATA controller(s) full ({} units each), at most {} SATA controllers",
                cdroms.len(),
                IDE_UNITS,
                sata.len(),
                SATA_UNITS,
                SATA_CONTROLLERS
            ),
        }),
    }
}

impl Client {
    /// Attaches `[datastore] path` to a CD-ROM that connects at power on: reuses a drive
    /// without an ISO, else adds one on IDE, else on SATA (adding a SATA controller if
    /// needed). The ISO must exist on the datastore (checked first: vCenter simulators do not).
    pub async fn attach_iso(
        &self,
        vm: &VmRef,
        datastore: &str,
        path: &str,
    ) -> Result<CdromAttachment> {
        self.require_datastore_file(datastore, path).await?;
        let iso = format!("[{datastore}] {path}");
        let current = self.vm(&vm.moref).await?;
        let plan = plan_cdrom(&current, &iso)?;
        tracing::info!(vm = %vm, iso = %iso, plan = ?plan, "attach ISO");
        let what = format!("attach ISO {iso}");
        let mut original = None;
        let (added_cdrom, key) = match plan {
            CdromPlan::AlreadyAttached { key } => (false, Some(key)),
            CdromPlan::Reuse { key } => {
                let dev = current.device(key).ok_or_else(|| Error::Device {
                    vm: vm.to_string(),
                    detail: format!("CD-ROM {key} vanished"),
                })?;
                if dev.iso() != Some(iso.as_str()) {
                    original = Some(device_to_stored(dev));
                }
                let mut el = as_read_back(dev);
                el.set_child(iso_backing(&iso), AFTER_BACKING);
                el.set_child(connect_info(true), AFTER_CONNECTABLE);
                self.reconfigure(vm, &device_change("edit", &el), &what)
                    .await?;
                (false, Some(key))
            }
            CdromPlan::Add {
                controller_key,
                unit,
            } => {
                self.reconfigure(
                    vm,
                    &device_change("add", &new_cdrom(&iso, controller_key, unit)),
                    &what,
                )
                .await?;
                (true, None)
            }
            CdromPlan::AddWithSataController { bus } => {
                let mut ctrl = Element::new("device")
                    .with_type("VirtualAHCIController")
                    .push(Element::leaf("key", "-200"));
                if let Some(pci) = current
                    .devices
                    .iter()
                    .find(|d| d.kind == "VirtualPCIController")
                {
                    ctrl = ctrl.push(Element::leaf("controllerKey", pci.key.to_string()));
                }
                ctrl = ctrl.push(Element::leaf("busNumber", bus.to_string()));
                let spec =
                    device_change("add", &ctrl) + &device_change("add", &new_cdrom(&iso, -200, 0));
                self.reconfigure(vm, &spec, &what).await?;
                (true, None)
            }
        };
        // Read back: find the drive and prove the ISO is on it.
        let after = self.vm(&vm.moref).await?;
        let (device_key, ctrl_key) = match (key, plan) {
            (Some(k), _) => (k, None),
            (
                None,
                CdromPlan::Add {
                    controller_key,
                    unit,
                },
            ) => (
                find_cdrom_at(&after, controller_key, unit).ok_or_else(|| Error::Device {
                    vm: vm.to_string(),
                    detail: format!(
                        "added CD-ROM not found on controller {controller_key} unit {unit}"
                    ),
                })?,
                None,
            ),
            (None, CdromPlan::AddWithSataController { bus }) => {
                let ctrl = after
                    .devices
                    .iter()
                    .find(|d| d.is_sata_controller() && d.bus_number() == Some(bus))
                    .ok_or_else(|| Error::Device {
                        vm: vm.to_string(),
                        detail: format!("added SATA controller on bus {bus} not found"),
                    })?;
                (
                    find_cdrom_at(&after, ctrl.key, 0).ok_or_else(|| Error::Device {
                        vm: vm.to_string(),
                        detail: format!("added CD-ROM not found on SATA controller {}", ctrl.key),
                    })?,
                    Some(ctrl.key),
                )
            }
            (None, _) => unreachable!("plans without a key always add"),
        };
        let dev = after.device(device_key);
        if dev.and_then(Device::iso) != Some(iso.as_str()) {
            return Err(Error::Device {
                vm: vm.to_string(),
                detail: format!("CD-ROM {device_key} does not show ISO {iso} after reconfigure"),
            });
        }
        Ok(CdromAttachment {
            vm: vm.name.clone(),
            vm_moref: vm.moref.value.clone(),
            iso,
            device_key,
            added_cdrom,
            added_controller_key: ctrl_key,
            original,
        })
    }

    /// Detaches ISOs: every CD-ROM holding `iso` (`[ds] path`), or holding any ISO when
    /// `iso` is None, gets a client-device backing and is disconnected. Returns the keys.
    pub async fn detach_iso(&self, vm: &VmRef, iso: Option<&str>) -> Result<Vec<i32>> {
        let current = self.vm(&vm.moref).await?;
        let targets: Vec<&Device> = current
            .devices
            .iter()
            .filter(|d| d.is_cdrom())
            .filter(|d| match (d.iso(), iso) {
                (Some(have), Some(want)) => have == want,
                (Some(_), None) => true,
                _ => false,
            })
            .collect();
        if targets.is_empty() {
            return match iso {
                Some(want) => Err(Error::Device {
                    vm: vm.to_string(),
                    detail: format!("no CD-ROM holds ISO {want}"),
                }),
                None => Ok(vec![]),
            };
        }
        let mut spec = String::new();
        for d in &targets {
            let mut el = as_read_back(d);
            el.set_child(
                Element::new("backing")
                    .with_type("VirtualCdromRemotePassthroughBackingInfo")
                    .push(Element::leaf("deviceName", ""))
                    .push(Element::leaf("exclusive", "false")),
                AFTER_BACKING,
            );
            el.set_child(connect_info(false), AFTER_CONNECTABLE);
            spec.push_str(&device_change("edit", &el));
        }
        self.reconfigure(vm, &spec, "detach ISO").await?;
        Ok(targets.iter().map(|d| d.key).collect())
    }

    /// Undoes an attachment: removes the CD-ROM (and SATA controller) we added; a reused
    /// drive gets back exactly the device it was ([`CdromAttachment::original`]), or, when
    /// that is unknown, is detached. Already-removed or already-restored devices are not an
    /// error.
    pub async fn remove_added(&self, att: &CdromAttachment) -> Result<()> {
        let vm = VmRef {
            moref: crate::MoRef::new("VirtualMachine", &att.vm_moref),
            name: att.vm.clone(),
        };
        let current = self.vm(&vm.moref).await?;
        if !att.added_cdrom {
            let Some(dev) = current
                .device(att.device_key)
                .filter(|d| d.iso() == Some(att.iso.as_str()))
            else {
                return Ok(());
            };
            match &att.original {
                Some(text) => {
                    let mut el = device_from_stored(text)?;
                    if el.parse_child::<i32>("key") != Some(att.device_key) {
                        return Err(Error::Device {
                            vm: vm.to_string(),
                            detail: format!(
                                "saved original of CD-ROM {} has another key",
                                att.device_key
                            ),
                        });
                    }
                    if el.child("deviceInfo").is_none() {
                        el = as_read_back(&Device {
                            raw: el,
                            ..dev.clone()
                        });
                    }
                    self.reconfigure(
                        &vm,
                        &device_change("edit", &el),
                        &format!("restore CD-ROM {} as it was", att.device_key),
                    )
                    .await?;
                }
                None => {
                    self.detach_iso(&vm, Some(&att.iso)).await?;
                }
            }
            return Ok(());
        }
        let mut spec = String::new();
        if let Some(d) = current.device(att.device_key).filter(|d| d.is_cdrom()) {
            spec.push_str(&device_change("remove", &as_read_back(d)));
        }
        if let Some(ck) = att.added_controller_key {
            let others = current
                .devices
                .iter()
                .any(|d| d.controller_key == Some(ck) && d.key != att.device_key);
            if let Some(c) = current.device(ck).filter(|c| c.is_sata_controller()) {
                if !others {
                    spec.push_str(&device_change("remove", &as_read_back(c)));
                }
            }
        }
        if !spec.is_empty() {
            self.reconfigure(&vm, &spec, "remove added CD-ROM").await?;
        }
        Ok(())
    }
}

fn new_cdrom(iso: &str, controller_key: i32, unit: i32) -> Element {
    Element::new("device")
        .with_type("VirtualCdrom")
        .push(Element::leaf("key", "-201"))
        .push(iso_backing(iso))
        .push(connect_info(true))
        .push(Element::leaf("controllerKey", controller_key.to_string()))
        .push(Element::leaf("unitNumber", unit.to_string()))
}

fn find_cdrom_at(vm: &Vm, controller_key: i32, unit: i32) -> Option<i32> {
    vm.devices
        .iter()
        .find(|d| {
            d.is_cdrom() && d.controller_key == Some(controller_key) && d.unit_number == Some(unit)
        })
        .map(|d| d.key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_always_carry_device_info_in_schema_order() {
        let raw = Element::new("VirtualDevice")
            .with_type("VirtualCdrom")
            .push(Element::leaf("key", "3000"))
            .push(Element::new("backing").with_type("VirtualCdromAtapiBackingInfo"))
            .push(Element::leaf("controllerKey", "200"))
            .push(Element::leaf("unitNumber", "0"));
        let dev = Device {
            key: 3000,
            kind: "VirtualCdrom".into(),
            label: "CD/DVD drive 1".into(),
            controller_key: Some(200),
            unit_number: Some(0),
            raw,
        };
        let mut el = as_read_back(&dev);
        el.set_child(iso_backing("[ds] a.iso"), AFTER_BACKING);
        el.set_child(connect_info(true), AFTER_CONNECTABLE);
        let names: Vec<&str> = el.children.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "key",
                "deviceInfo",
                "backing",
                "connectable",
                "controllerKey",
                "unitNumber"
            ]
        );
        let xml = device_change("edit", &el);
        assert!(xml.starts_with("<deviceChange><operation>edit</operation><device xsi:type=\"VirtualCdrom\"><key>3000</key><deviceInfo><label>CD/DVD drive 1</label>"), "{xml}");
        assert!(xml.contains("<backing xsi:type=\"VirtualCdromIsoBackingInfo\"><fileName>[ds] a.iso</fileName></backing>"), "{xml}");
    }
}
