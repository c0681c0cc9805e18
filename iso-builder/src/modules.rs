//! Kernel module selection: the drivers the appliance needs plus their dependency closure,
//! computed from each module's `.modinfo` `depends=` field (the Debian kernel package ships no
//! `modules.dep`, and the build machine needs no kmod).

use crate::Error;
use object::{Object, ObjectSection};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Drivers for VMware (pvscsi, LSI Logic SPI/SAS, vmxnet3, e1000/e1000e, AHCI/PIIX CD-ROM),
/// QEMU/KVM (virtio), NVMe, plus the SCSI disk/CD layers and the ISO 9660 file system the seed
/// is read from.
///
/// USB comes first: host controllers (EHCI before its UHCI/OHCI companions, as the kernel
/// wants), mass storage (a seed on a USB stick; the appliance itself runs from the initramfs and
/// never needs its boot stick) and HID (loading a host controller ends the firmware's legacy
/// keyboard emulation, so a USB keyboard needs usbhid for the console prompts). USB
/// enumeration is asynchronous; loading it first lets it finish while the rest loads, so a
/// USB boot stick is visible (and excluded from the inventory by its `FAILBACK` label) before
/// the client pairs.
pub const APPLIANCE_MODULES: &[&str] = &[
    "ehci_pci",
    "xhci_pci",
    "uhci_hcd",
    "ohci_pci",
    "usb_storage",
    "uas",
    "usbhid",
    "hid_generic",
    "vmw_pvscsi",
    "mptspi",
    "mptsas",
    "ahci",
    "ata_piix",
    "nvme",
    "sd_mod",
    "sr_mod",
    "cdrom",
    "isofs",
    "vmxnet3",
    "e1000",
    "e1000e",
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "virtio_net",
    // UEFI boot variables (BootNext to the restored disk).
    "efivarfs",
];

/// File name (inside the initramfs module directory) of the ordered load list: one module
/// file name per line, dependencies first.
pub const LOAD_LIST: &str = "load.list";

/// One selected module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Canonical name (`-` replaced by `_`).
    pub name: String,
    /// The `.ko` file in the unpacked kernel package.
    pub path: PathBuf,
    /// Canonical names of the modules it depends on.
    pub depends: Vec<String>,
}

/// Canonical module name: the kernel treats `-` and `_` alike.
pub fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

/// Reads the `depends=` field of a module's `.modinfo` section.
pub fn read_depends(path: &Path) -> Result<Vec<String>, Error> {
    let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let file = object::File::parse(&*data).map_err(|e| Error::Module {
        path: path.to_path_buf(),
        reason: format!("not an ELF object: {e}"),
    })?;
    let section = file
        .section_by_name(".modinfo")
        .ok_or_else(|| Error::Module {
            path: path.to_path_buf(),
            reason: "no .modinfo section".into(),
        })?;
    let info = section.data().map_err(|e| Error::Module {
        path: path.to_path_buf(),
        reason: format!(".modinfo unreadable: {e}"),
    })?;
    let mut depends = Vec::new();
    for field in info.split(|b| *b == 0) {
        if let Some(list) = field.strip_prefix(b"depends=") {
            let list = std::str::from_utf8(list).map_err(|_| Error::Module {
                path: path.to_path_buf(),
                reason: "depends= is not UTF-8".into(),
            })?;
            depends.extend(list.split(',').filter(|s| !s.is_empty()).map(canonical));
        }
    }
    Ok(depends)
}

/// Indexes every `.ko` under `modules_dir` (`/lib/modules/<version>`) by canonical name.
fn index(modules_dir: &Path) -> Result<BTreeMap<String, PathBuf>, Error> {
    let mut out = BTreeMap::new();
    let mut stack = vec![modules_dir.join("kernel")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let entry = entry.map_err(|e| Error::io(&dir, e))?;
            let path = entry.path();
            let ft = entry.file_type().map_err(|e| Error::io(&path, e))?;
            if ft.is_dir() {
                stack.push(path);
            } else if let Some(stem) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".ko"))
            {
                out.insert(canonical(stem), path);
            }
        }
    }
    Ok(out)
}

/// The modules for `wanted` and everything they depend on, in load order (each module after
/// its dependencies). Modules built into the kernel (`modules.builtin`) are skipped.
pub fn closure(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<Module>, Error> {
    let index = index(modules_dir)?;
    let builtin: BTreeSet<String> = std::fs::read_to_string(modules_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next()?.strip_suffix(".ko").map(canonical))
        .collect();
    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    let mut visiting = BTreeSet::new();
    for name in wanted {
        visit(
            &canonical(name),
            &index,
            &builtin,
            &mut done,
            &mut visiting,
            &mut order,
        )?;
    }
    Ok(order)
}

fn visit(
    name: &str,
    index: &BTreeMap<String, PathBuf>,
    builtin: &BTreeSet<String>,
    done: &mut BTreeSet<String>,
    visiting: &mut BTreeSet<String>,
    order: &mut Vec<Module>,
) -> Result<(), Error> {
    if done.contains(name) || builtin.contains(name) {
        return Ok(());
    }
    if !visiting.insert(name.to_string()) {
        return Err(Error::ModuleCycle(name.to_string()));
    }
    let path = index
        .get(name)
        .ok_or_else(|| Error::ModuleMissing(name.to_string()))?;
    let mut depends = read_depends(path)?;
    depends.sort();
    for dep in &depends {
        visit(dep, index, builtin, done, visiting, order)?;
    }
    visiting.remove(name);
    done.insert(name.to_string());
    order.push(Module {
        name: name.to_string(),
        path: path.clone(),
        depends,
    });
    Ok(())
}
