//! Finds the seed ISO (and the appliance's own boot medium) by ISO 9660 volume label: read the
//! primary volume descriptor (byte 32768, `\x01CD001`, label at 40..72) of every block device
//! in /sys/block. No blkid in the appliance, and no udev.

use std::io::{Read, Seek, SeekFrom};
use std::time::{Duration, Instant};

/// A block device and its ISO 9660 label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labelled {
    /// Kernel name (`sr0`, `sda`).
    pub name: String,
    /// Volume label, trimmed.
    pub label: String,
}

/// Reads the ISO 9660 label of `/dev/<name>`, if it has one.
pub fn iso_label(dev: &str) -> Option<String> {
    let mut f = std::fs::File::open(dev).ok()?;
    f.seek(SeekFrom::Start(32768)).ok()?;
    let mut pvd = [0u8; 72];
    f.read_exact(&mut pvd).ok()?;
    if &pvd[..6] != b"\x01CD001" {
        return None;
    }
    Some(String::from_utf8_lossy(&pvd[40..72]).trim_end().to_string())
}

/// Every whole block device with an ISO 9660 label.
pub fn scan() -> Vec<Labelled> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/sys/block") else {
        return out;
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| !n.starts_with("loop") && !n.starts_with("ram"))
        .collect();
    names.sort();
    for name in names {
        if let Some(label) = iso_label(&format!("/dev/{name}")) {
            out.push(Labelled { name, label });
        }
    }
    out
}

/// Waits for a device labelled `label` (SCSI/ATA scans are asynchronous). Gives up after
/// `timeout`, or earlier once a CD-ROM or the appliance medium is visible and the set of
/// block devices has not changed for `settle` (everything attached has been probed).
pub fn wait_for(label: &str, timeout: Duration, settle: Duration) -> Option<Labelled> {
    let start = Instant::now();
    let mut last_set = Vec::new();
    let mut stable_since = Instant::now();
    loop {
        let found = scan();
        if let Some(hit) = found.iter().find(|l| l.label == label) {
            return Some(hit.clone());
        }
        let set = block_devices();
        if set != last_set {
            last_set = set;
            stable_since = Instant::now();
        }
        let media_seen = last_set.iter().any(|n| n.starts_with("sr"))
            || found.iter().any(|l| l.label == super::APPLIANCE_LABEL);
        if start.elapsed() >= timeout || (media_seen && stable_since.elapsed() >= settle) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn block_devices() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/block")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// One line per local disk (not CD-ROM, loop or RAM): name, size, serial — printed on the
/// console so the operator sees what the appliance found.
pub fn describe_disks() -> Vec<String> {
    let read = |p: String| std::fs::read(p).unwrap_or_default();
    block_devices()
        .into_iter()
        .filter(|n| !n.starts_with("sr") && !n.starts_with("loop") && !n.starts_with("ram"))
        .map(|n| {
            let sectors: u64 = String::from_utf8_lossy(&read(format!("/sys/block/{n}/size")))
                .trim()
                .parse()
                .unwrap_or(0);
            // virtio: serial; NVMe: device/serial; SCSI (pvscsi): VPD page 0x80 after 4 bytes.
            let mut serial = read(format!("/sys/block/{n}/serial"));
            if serial.is_empty() {
                serial = read(format!("/sys/block/{n}/device/serial"));
            }
            if serial.is_empty() {
                serial = read(format!("/sys/block/{n}/device/vpd_pg80"))
                    .get(4..)
                    .unwrap_or_default()
                    .to_vec();
            }
            let serial = String::from_utf8_lossy(&serial)
                .trim_matches(|c: char| c.is_whitespace() || c == '\0')
                .to_string();
            format!(
                "{n} {} MiB serial {}",
                sectors * 512 / (1 << 20),
                if serial.is_empty() { "-" } else { &serial }
            )
        })
        .collect()
}
