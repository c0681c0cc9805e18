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

/// Waits up to `timeout` for a device labelled `label` (SCSI/ATA scans are asynchronous).
pub fn wait_for(label: &str, timeout: Duration) -> Option<Labelled> {
    let start = Instant::now();
    loop {
        if let Some(found) = scan().into_iter().find(|l| l.label == label) {
            return Some(found);
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}
