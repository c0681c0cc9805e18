//! Hardware inventory sent at pairing: SMBIOS UUID, MAC addresses, disks (size, logical
//! sector size, serial, WWN, `/dev/disk/by-path` link), CPU and RAM. Every source is optional:
//! a missing or unreadable file leaves the field empty instead of failing, because the live
//! appliance runs on anything from a VMware VM to bare metal with half of sysfs missing.
//!
//! A disk carrying the appliance medium (the hybrid ISO booted from a USB stick: ISO 9660
//! label `FAILBACK` on the disk or one of its partitions) is left out, so the DR service never
//! maps a volume onto it; the safety check refuses it as a target anyway.

use std::path::{Path, PathBuf};

use failback_api::{Inventory, InventoryCpu, InventoryDisk};

/// Where to read from; tests point it at a fake tree.
#[derive(Debug, Clone)]
pub struct InventoryRoots {
    pub sys: PathBuf,
    pub dev: PathBuf,
}

impl Default for InventoryRoots {
    fn default() -> Self {
        InventoryRoots {
            sys: PathBuf::from("/sys"),
            dev: PathBuf::from("/dev"),
        }
    }
}

fn read_trim(p: &Path) -> Option<String> {
    let s = std::fs::read_to_string(p).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// Collects the inventory of this machine.
pub fn collect() -> Inventory {
    let mut inv = collect_from(&InventoryRoots::default());
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    sys.refresh_cpu_all();
    inv.ram_bytes = sys.total_memory();
    let cpus = sys.cpus();
    if let Some(first) = cpus.first() {
        inv.cpus = vec![InventoryCpu {
            model: first.brand().trim().to_string(),
            cores: u32::try_from(cpus.len()).unwrap_or(u32::MAX),
        }];
    }
    inv.hostname = sysinfo::System::host_name().or(inv.hostname);
    inv
}

/// The file-based part of [`collect`] (SMBIOS, NICs, disks), from `roots`.
pub fn collect_from(roots: &InventoryRoots) -> Inventory {
    Inventory {
        smbios_uuid: read_trim(&roots.sys.join("class/dmi/id/product_uuid"))
            .map(|u| u.to_ascii_lowercase()),
        hostname: read_trim(Path::new("/proc/sys/kernel/hostname")),
        mac_addresses: macs(&roots.sys.join("class/net")),
        disks: disks(roots),
        cpus: Vec::new(),
        ram_bytes: 0,
    }
}

fn macs(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    let mut names: Vec<_> = rd.flatten().map(|e| e.file_name()).collect();
    names.sort();
    for n in names {
        if n == "lo" {
            continue;
        }
        if let Some(mac) = read_trim(&dir.join(&n).join("address")) {
            if mac != "00:00:00:00:00:00" && !out.contains(&mac) {
                out.push(mac.to_ascii_lowercase());
            }
        }
    }
    out
}

/// Virtual or removable devices that can never be failback targets.
fn skip_disk(name: &str) -> bool {
    ["loop", "ram", "zram", "sr", "fd", "dm-", "md", "nbd"]
        .iter()
        .any(|p| name.starts_with(p))
}

fn disks(roots: &InventoryRoots) -> Vec<InventoryDisk> {
    let block = roots.sys.join("block");
    let Ok(rd) = std::fs::read_dir(&block) else {
        return Vec::new();
    };
    let by_path = by_path_links(&roots.dev.join("disk/by-path"));
    let mut names: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !skip_disk(n))
        .collect();
    names.sort();
    let mut out = Vec::new();
    for n in names {
        let d = block.join(&n);
        // `size` is always in 512-byte units, whatever the logical sector size.
        let Some(sectors) = read_trim(&d.join("size")).and_then(|s| s.parse::<u64>().ok()) else {
            continue;
        };
        if sectors == 0 {
            continue;
        }
        if let Some(medium) = appliance_medium(roots, &n) {
            tracing::warn!(
                "{}: left out of the inventory: it carries the failback appliance boot medium (ISO 9660 label {})",
                medium.display(),
                crate::safety::APPLIANCE_MEDIUM_LABEL
            );
            continue;
        }
        let sector = read_trim(&d.join("queue/logical_block_size"))
            .and_then(|s| s.parse().ok())
            .unwrap_or(512);
        let serial = read_trim(&d.join("device/serial")).or_else(|| read_trim(&d.join("serial")));
        let wwn = read_trim(&d.join("device/wwid")).or_else(|| read_trim(&d.join("wwid")));
        let path = roots.dev.join(&n).to_string_lossy().into_owned();
        out.push(InventoryDisk {
            by_path: by_path
                .iter()
                .find(|(_, target)| *target == n)
                .map(|(link, _)| link.clone()),
            path,
            size_bytes: sectors.saturating_mul(512),
            logical_sector_size: sector,
            serial,
            wwn,
        });
    }
    out
}

/// The device node (the disk or one of its partitions) of disk `name` that carries the
/// appliance medium, if any.
fn appliance_medium(roots: &InventoryRoots, name: &str) -> Option<PathBuf> {
    let mut nodes = vec![name.to_string()];
    if let Ok(rd) = std::fs::read_dir(roots.sys.join("block").join(name)) {
        let mut parts: Vec<String> = rd
            .flatten()
            .filter(|e| e.path().join("partition").exists())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        parts.sort();
        nodes.extend(parts);
    }
    nodes
        .into_iter()
        .map(|n| roots.dev.join(n))
        .find(|p| crate::safety::carries_appliance_medium(p))
}

/// `(link path, target device name)` for whole-disk links in `/dev/disk/by-path`.
fn by_path_links(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.contains("-part") {
            continue;
        }
        if let Ok(t) = std::fs::read_link(e.path()) {
            if let Some(dev) = t.file_name() {
                out.push((
                    e.path().to_string_lossy().into_owned(),
                    dev.to_string_lossy().into_owned(),
                ));
            }
        }
    }
    out.sort();
    out
}

/// An image file or device given on the command line, added to the inventory so the service
/// can check its size (tests and hand-made mappings use image files).
pub fn disk_from_path(path: &Path) -> std::io::Result<InventoryDisk> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    // Works for regular files and block devices alike.
    let size = f.seek(SeekFrom::End(0))?;
    Ok(InventoryDisk {
        path: path.to_string_lossy().into_owned(),
        size_bytes: size,
        logical_sector_size: 512,
        serial: None,
        wwn: None,
        by_path: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_sysfs_tree() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path().join("sys");
        let dev = t.path().join("dev");
        let w = |p: &str, s: &str| write_under(&sys, p, s);
        w(
            "class/dmi/id/product_uuid",
            "4221A1B2-0000-1111-2222-333344445555\n",
        );
        w("class/net/eth0/address", "00:50:56:AA:BB:CC\n");
        w("class/net/lo/address", "00:00:00:00:00:00\n");
        w("block/sda/size", "2097152\n");
        w("block/sda/queue/logical_block_size", "4096\n");
        w("block/sda/device/serial", "6000c29\n");
        w("block/sda/device/wwid", "naa.6000c29\n");
        w("block/sr0/size", "100\n");
        w("block/sdb/size", "garbage\n");
        std::fs::create_dir_all(dev.join("disk/by-path")).unwrap();
        std::os::unix::fs::symlink(
            "../../sda",
            dev.join("disk/by-path/pci-0000:00:10.0-scsi-0:0:0:0"),
        )
        .unwrap();
        let inv = collect_from(&InventoryRoots {
            sys: sys.clone(),
            dev: dev.clone(),
        });
        assert_eq!(
            inv.smbios_uuid.as_deref(),
            Some("4221a1b2-0000-1111-2222-333344445555")
        );
        assert_eq!(inv.mac_addresses, vec!["00:50:56:aa:bb:cc".to_string()]);
        assert_eq!(inv.disks.len(), 1, "{:?}", inv.disks);
        let d = &inv.disks[0];
        assert_eq!(d.size_bytes, 1 << 30);
        assert_eq!(d.logical_sector_size, 4096);
        assert_eq!(d.serial.as_deref(), Some("6000c29"));
        assert_eq!(d.wwn.as_deref(), Some("naa.6000c29"));
        assert!(d.by_path.as_deref().unwrap().ends_with("scsi-0:0:0:0"));
    }

    /// Writes `content` to `root/rel`, creating directories (a fake sysfs file).
    fn write_under(root: &Path, rel: &str, content: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    /// Writes an image with an ISO 9660 primary volume descriptor labelled `label`.
    fn iso_image(path: &Path, label: &str) {
        let mut data = vec![0u8; 64 << 10];
        data[32768..32774].copy_from_slice(b"\x01CD001");
        data[32768 + 40..32768 + 72].fill(b' ');
        data[32768 + 40..32768 + 40 + label.len()].copy_from_slice(label.as_bytes());
        std::fs::write(path, data).unwrap();
    }

    #[test]
    fn disk_carrying_the_appliance_medium_is_left_out() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path().join("sys");
        let dev = t.path().join("dev");
        let w = |p: &str, s: &str| write_under(&sys, p, s);
        std::fs::create_dir_all(&dev).unwrap();
        // sda: the local disk; sdb: the USB stick the appliance booted from (label on the
        // whole disk, as the hybrid ISO is written); sdc: a stick whose partition holds it;
        // sdd: a seed-like ISO with another label, which stays.
        for n in ["sda", "sdb", "sdc", "sdd"] {
            w(&format!("block/{n}/size"), "131072\n");
        }
        w("block/sdc/sdc1/partition", "1\n");
        std::fs::write(dev.join("sda"), vec![0u8; 64 << 10]).unwrap();
        iso_image(&dev.join("sdb"), "FAILBACK");
        std::fs::write(dev.join("sdc"), vec![0u8; 64 << 10]).unwrap();
        iso_image(&dev.join("sdc1"), "FAILBACK");
        iso_image(&dev.join("sdd"), "FBSEED");
        let inv = collect_from(&InventoryRoots { sys, dev });
        let paths: Vec<&str> = inv.disks.iter().map(|d| d.path.as_str()).collect();
        assert_eq!(paths.len(), 2, "{paths:?}");
        assert!(
            paths[0].ends_with("/sda") && paths[1].ends_with("/sdd"),
            "{paths:?}"
        );
    }

    #[test]
    fn missing_everything_is_empty_not_an_error() {
        let inv = collect_from(&InventoryRoots {
            sys: "/nonexistent/sys".into(),
            dev: "/nonexistent/dev".into(),
        });
        assert!(inv.smbios_uuid.is_none() && inv.disks.is_empty() && inv.mac_addresses.is_empty());
    }
}
