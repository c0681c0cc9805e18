//! What a path is: a block device (size, logical sector size, kernel name, serial, holders) or a
//! regular image file. Read from sysfs and the file itself.
//!
//! Hand-written over sysfs rather than a crate because we need exactly these few attributes,
//! without ioctls (the workspace denies `unsafe`) and without spawning `lsblk`.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Kind of local object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A block device node.
    BlockDevice,
    /// A regular file (disk image).
    File,
}

/// Facts about a device or image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub path: PathBuf,
    pub kind: Kind,
    /// Size in bytes.
    pub size: u64,
    /// Logical sector size (512 for files).
    pub logical_sector_size: u32,
    /// Kernel name (`sda`, `nvme0n1p2`) or the file name.
    pub name: String,
    /// Serial or WWID when sysfs has one.
    pub serial: Option<String>,
    /// (major, minor) of a block device.
    pub devnum: Option<(u32, u32)>,
}

/// Splits a Linux `dev_t` into (major, minor) (glibc's encoding).
pub fn split_dev(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (
        u32::try_from(major).unwrap_or(u32::MAX),
        u32::try_from(minor).unwrap_or(u32::MAX),
    )
}

/// The sysfs directory of a block device number (`/sys/dev/block/M:m`, resolved).
pub fn sysfs_dir(devnum: (u32, u32)) -> Option<PathBuf> {
    std::fs::canonicalize(format!("/sys/dev/block/{}:{}", devnum.0, devnum.1)).ok()
}

fn read_trim(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Inspects `path` (follows symlinks such as /dev/disk/by-id/...).
pub fn inspect(path: &Path) -> std::io::Result<DeviceInfo> {
    let meta = std::fs::metadata(path)?;
    let ft = meta.file_type();
    if ft.is_block_device() {
        let devnum = split_dev(meta.rdev());
        let mut f = File::open(path)?;
        let size = f.seek(SeekFrom::End(0))?;
        let sys = sysfs_dir(devnum);
        let name = sys
            .as_ref()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| path.display().to_string());
        // Partitions have no queue/ of their own: use the parent disk's.
        let sector = sys
            .as_ref()
            .and_then(|d| {
                read_trim(&d.join("queue/logical_block_size"))
                    .or_else(|| read_trim(&d.join("../queue/logical_block_size")))
            })
            .and_then(|s| s.parse().ok())
            .unwrap_or(512);
        let serial = sys.as_ref().and_then(|d| {
            ["device/serial", "serial", "device/wwid", "wwid"]
                .iter()
                .find_map(|rel| read_trim(&d.join(rel)))
        });
        Ok(DeviceInfo {
            path: path.to_owned(),
            kind: Kind::BlockDevice,
            size,
            logical_sector_size: sector,
            name,
            serial,
            devnum: Some(devnum),
        })
    } else if ft.is_file() {
        Ok(DeviceInfo {
            path: path.to_owned(),
            kind: Kind::File,
            size: meta.len(),
            logical_sector_size: 512,
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            serial: None,
            devnum: None,
        })
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "neither a block device nor a regular file",
        ))
    }
}
