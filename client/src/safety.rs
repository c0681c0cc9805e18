//! Target safety: before the first write, refuse any target that could destroy data we must not
//! touch, and say which rule refused it.
//!
//! Rules (checked in this order): the path must be a block device or a regular file (or a new
//! file outside /dev); it must not hold the running system or the boot medium (a mount of
//! `/`, `/boot`, a live medium, or the failback appliance medium itself: ISO 9660 volume label
//! `FAILBACK` at sector 16 of the target, of the disk under it or of one of its partitions,
//! which is what the hybrid ISO looks like when booted from a USB stick); nothing on it may
//! be mounted, used as swap, or held by another device (dm, md, LVM); it must not back an
//! attached loop device (mounted or not), nor be open for writing by another process; it must
//! not be smaller than the source; a block device must have the source's logical sector size.
//! Image files are allowed (tests, images): a missing or empty file is created/extended, but a
//! non-empty file smaller than the source is refused (probably the wrong file).
//!
//! Files are compared by identity (device + inode, or the device number of a block device),
//! never by path: a symlink, hard link or bind mount of a loop device's backing file is the
//! same file. Read straight from /proc/self/mountinfo, /proc/swaps, /proc/PID/fd + fdinfo and
//! sysfs (no subprocess, no ioctl); processes whose descriptors cannot be read (when not
//! running as root) are not seen.

use std::fmt;
use std::path::{Path, PathBuf};

use failback_replication::device::{self, DeviceInfo, Kind};
use failback_replication::DiskInfo;

/// The rule that refused a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Not a block device or regular file, or a new file under /dev.
    NotADisk,
    /// Holds the running system or the boot medium.
    BootDevice,
    /// It, or a partition on it, is mounted.
    Mounted,
    /// It, or a partition on it, is active swap.
    Swap,
    /// Another device (dm, md, LVM) holds it or one of its partitions.
    Held,
    /// An image file that backs an active loop device (mounted or not).
    LoopBacking,
    /// Another process has it (or, for a disk, one of its partitions) open for writing.
    OpenForWriting,
    /// Smaller than the source disk.
    TooSmall,
    /// Different logical sector size than the source.
    SectorSize,
}

impl Rule {
    /// Stable short name (JSON reports, tests).
    pub fn name(self) -> &'static str {
        match self {
            Rule::NotADisk => "not-a-disk",
            Rule::BootDevice => "boot-device",
            Rule::Mounted => "mounted",
            Rule::Swap => "swap",
            Rule::Held => "held",
            Rule::LoopBacking => "loop-backing",
            Rule::OpenForWriting => "open-for-writing",
            Rule::TooSmall => "too-small",
            Rule::SectorSize => "sector-size",
        }
    }
}

/// Why a target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refusing target {path} for remote disk {remote} (rule {rule}): {detail}")]
pub struct Refusal {
    pub path: PathBuf,
    pub remote: String,
    pub rule: Rule,
    pub detail: String,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A mount from /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub devnum: (u32, u32),
    pub mount_point: String,
    pub source: String,
}

/// The system facts the rules need (loaded from /proc; tests build their own).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SystemState {
    pub mounts: Vec<Mount>,
    /// Active swap areas (paths from /proc/swaps).
    pub swaps: Vec<PathBuf>,
    /// Block devices (whole disks and partitions) that hold `/` or the boot medium.
    pub boot_devices: Vec<(u32, u32)>,
    /// Active loop devices and their backing files (from sysfs).
    pub loops: Vec<LoopDevice>,
}

/// The identity of an open or named file: device + inode for a file, the device number for a
/// block device (its node may have many names: symlinks, bind mounts, hard links).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileId {
    Inode { dev: u64, ino: u64 },
    Block((u32, u32)),
}

impl FileId {
    /// The identity of what `meta` describes.
    pub fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        if meta.file_type().is_block_device() {
            FileId::Block(device::split_dev(meta.rdev()))
        } else {
            FileId::Inode {
                dev: meta.dev(),
                ino: meta.ino(),
            }
        }
    }

    /// The identity of the file `path` names (symlinks followed).
    pub fn of_path(path: &Path) -> Option<Self> {
        std::fs::metadata(path).ok().map(|m| Self::of(&m))
    }
}

/// An attached loop device: `/sys/block/loopN/loop/backing_file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub dev: PathBuf,
    pub devnum: (u32, u32),
    /// The backing file as the kernel names it.
    pub backing: PathBuf,
    /// The backing file's identity (None when its path does not resolve here, e.g. deleted).
    pub backing_id: Option<FileId>,
}

/// The attached loop devices (sysfs `loop/backing_file` exists only while one is attached).
pub fn loop_devices() -> Vec<LoopDevice> {
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .filter_map(|e| {
            let dir = e.path();
            let backing = std::fs::read_to_string(dir.join("loop/backing_file")).ok()?;
            let backing = PathBuf::from(backing.trim_end_matches('\n'));
            Some(LoopDevice {
                dev: Path::new("/dev").join(e.file_name()),
                devnum: devnum_of(&dir)?,
                backing_id: FileId::of_path(&backing),
                backing,
            })
        })
        .collect()
}

/// A process holding a file open for writing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writer {
    pub pid: u32,
    /// `/proc/PID/comm`.
    pub command: String,
    pub fd: u32,
}

/// Other processes (not this one) with an open file descriptor that `matches` and whose
/// access mode (`flags:` in /proc/PID/fdinfo/FD) is O_WRONLY or O_RDWR. Processes whose fds
/// cannot be read (not root) are skipped.
pub fn writers(matches: impl Fn(FileId) -> bool) -> Vec<Writer> {
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Some(n) = fd.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let same = std::fs::metadata(fd.path()).is_ok_and(|m| matches(FileId::of(&m)));
            if same && opened_for_writing(&p.path().join(format!("fdinfo/{n}"))) {
                let command = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                out.push(Writer {
                    pid,
                    command: command.trim().to_owned(),
                    fd: n,
                });
            }
        }
    }
    out
}

/// Whether an fdinfo file says the descriptor was opened O_WRONLY or O_RDWR (octal `flags:`).
fn opened_for_writing(fdinfo: &Path) -> bool {
    std::fs::read_to_string(fdinfo).is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .is_some_and(|flags| matches!(flags & 0o3, 0o1 | 0o2))
    })
}

/// "process 123 (sleep) has it open for writing (fd 3)", for every writer.
fn describe_writers(ws: &[Writer]) -> String {
    ws.iter()
        .map(|w| {
            format!(
                "process {} ({}) has it open for writing (fd {})",
                w.pid, w.command, w.fd
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// ISO 9660 volume label of the appliance medium (CD, or the hybrid image written to a USB stick).
pub const APPLIANCE_MEDIUM_LABEL: &str = crate::appliance::APPLIANCE_LABEL;

/// Byte offset of the ISO 9660 primary volume descriptor: sector 16 of 2048 bytes.
const PVD_OFFSET: u64 = 16 * 2048;

/// The ISO 9660 volume label of `path` (a whole disk, a partition or an image file): the
/// primary volume descriptor at byte 32768 starts `\x01CD001`, the label is bytes 40..72.
pub fn iso9660_label(path: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    f.seek(SeekFrom::Start(PVD_OFFSET)).ok()?;
    let mut pvd = [0u8; 72];
    f.read_exact(&mut pvd).ok()?;
    if &pvd[..6] != b"\x01CD001" {
        return None;
    }
    Some(String::from_utf8_lossy(&pvd[40..72]).trim_end().to_string())
}

/// Whether `path` carries the failback appliance medium (volume label `FAILBACK`).
pub fn carries_appliance_medium(path: &Path) -> bool {
    iso9660_label(path).is_some_and(|l| l == APPLIANCE_MEDIUM_LABEL)
}

/// The device node of a block device number: `/dev/<kernel name>` (devtmpfs names; the
/// appliance has no udev, so no `/dev/block/M:m` links).
fn dev_node(devnum: (u32, u32)) -> Option<PathBuf> {
    let dir = device::sysfs_dir(devnum)?;
    Some(Path::new("/dev").join(dir.file_name()?))
}

/// Mount points that hold the boot medium of common live systems (and ours).
const BOOT_MEDIUM_MOUNTS: &[&str] = &[
    "/",
    "/boot",
    "/boot/efi",
    "/run/initramfs/live",
    "/run/archiso/bootmnt",
    "/cdrom",
    "/lib/live/mount/medium",
    "/run/live/medium",
    "/media/cdrom",
    "/run/failback/media",
];

impl SystemState {
    /// Reads /proc/self/mountinfo and /proc/swaps.
    pub fn load() -> Self {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")
            .map(|s| parse_mountinfo(&s))
            .unwrap_or_default();
        let swaps = std::fs::read_to_string("/proc/swaps")
            .map(|s| parse_swaps(&s))
            .unwrap_or_default();
        let mut boot_devices = Vec::new();
        for m in &mounts {
            if BOOT_MEDIUM_MOUNTS.contains(&m.mount_point.as_str()) {
                for d in underlying_disks(m.devnum) {
                    if !boot_devices.contains(&d) {
                        boot_devices.push(d);
                    }
                }
            }
        }
        SystemState {
            mounts,
            swaps,
            boot_devices,
            loops: loop_devices(),
        }
    }
}

/// Parses /proc/self/mountinfo: field 3 is `major:minor`, field 5 the mount point, and the
/// source follows the ` - fstype ` separator.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let (maj, min) = fields.get(2)?.split_once(':')?;
            let sep = fields.iter().position(|f| *f == "-")?;
            Some(Mount {
                devnum: (maj.parse().ok()?, min.parse().ok()?),
                mount_point: unescape(fields.get(4)?),
                source: unescape(fields.get(sep + 2).unwrap_or(&"")),
            })
        })
        .collect()
}

/// Parses /proc/swaps (header line, then `path type size used prio`).
pub fn parse_swaps(text: &str) -> Vec<PathBuf> {
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .map(|p| PathBuf::from(unescape(p)))
        .collect()
}

/// Undoes the octal escapes (`\040` = space) of /proc files.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = u16::from(b[i + 1] - b'0') * 64
                + u16::from(b[i + 2] - b'0') * 8
                + u16::from(b[i + 3] - b'0');
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn devnum_of(p: &Path) -> Option<(u32, u32)> {
    let sys = std::fs::canonicalize(p).ok()?;
    let dev = std::fs::read_to_string(sys.join("dev")).ok()?;
    let (a, b) = dev.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// The whole disks (and the device itself) under a block device: follows `slaves/` (dm, md,
/// LVM) down and partitions up to their disk.
pub fn underlying_disks(devnum: (u32, u32)) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let mut todo = vec![devnum];
    while let Some(d) = todo.pop() {
        if out.contains(&d) || out.len() > 64 {
            continue;
        }
        out.push(d);
        let Some(dir) = device::sysfs_dir(d) else {
            continue;
        };
        if dir.join("partition").exists() {
            if let Some(parent) = dir.parent().and_then(devnum_of) {
                todo.push(parent);
            }
        }
        if let Ok(rd) = std::fs::read_dir(dir.join("slaves")) {
            for e in rd.flatten() {
                if let Some(s) = devnum_of(&e.path()) {
                    todo.push(s);
                }
            }
        }
    }
    out
}

/// The device and its partitions (from sysfs).
fn family(devnum: (u32, u32)) -> Vec<(u32, u32)> {
    let mut out = vec![devnum];
    if let Some(dir) = device::sysfs_dir(devnum) {
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let p = e.path();
                if p.join("partition").exists() {
                    if let Some(d) = devnum_of(&p) {
                        out.push(d);
                    }
                }
            }
        }
    }
    out
}

fn holders(devnum: (u32, u32)) -> Vec<String> {
    device::sysfs_dir(devnum)
        .and_then(|d| std::fs::read_dir(d.join("holders")).ok())
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// "it backs loop device /dev/loop3 (backing file …), mounted on /mnt; …".
fn loop_detail(l: &LoopDevice, sys: &SystemState) -> String {
    let fam = family(l.devnum);
    let mounted: Vec<&str> = sys
        .mounts
        .iter()
        .filter(|m| fam.contains(&m.devnum))
        .map(|m| m.mount_point.as_str())
        .collect();
    let state = if mounted.is_empty() {
        "not mounted".to_owned()
    } else {
        format!("mounted on {}", mounted.join(", "))
    };
    format!(
        "it backs loop device {} (backing file {}), {state}; writing it would corrupt whatever uses the loop device (detach it first: losetup -d {})",
        l.dev.display(),
        l.backing.display(),
        l.dev.display()
    )
}

/// What a target is, once accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetState {
    /// An existing block device.
    BlockDevice(DeviceInfo),
    /// An existing image file.
    File(DeviceInfo),
    /// A file that will be created.
    NewFile,
}

/// Checks `path` as a target for remote disk `source` against the live system.
pub fn check_target(path: &Path, source: &DiskInfo) -> Result<TargetState, Refusal> {
    check_target_with(path, source, &SystemState::load())
}

/// Checks `path` as a target for `source` against `sys`.
pub fn check_target_with(
    path: &Path,
    source: &DiskInfo,
    sys: &SystemState,
) -> Result<TargetState, Refusal> {
    let refuse = |rule: Rule, detail: String| Refusal {
        path: path.to_owned(),
        remote: source.id.clone(),
        rule,
        detail,
    };
    if !path.exists() {
        if path.starts_with("/dev") {
            return Err(refuse(
                Rule::NotADisk,
                "no such device (refusing to create a file under /dev)".into(),
            ));
        }
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(p) = parent {
            if !p.is_dir() {
                return Err(refuse(
                    Rule::NotADisk,
                    format!("directory {} does not exist", p.display()),
                ));
            }
        }
        return Ok(TargetState::NewFile);
    }
    let info = device::inspect(path).map_err(|e| refuse(Rule::NotADisk, e.to_string()))?;
    let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    for swap in &sys.swaps {
        let same = std::fs::canonicalize(swap).is_ok_and(|s| s == canon);
        if same {
            return Err(refuse(
                Rule::Swap,
                format!("{} is active swap", swap.display()),
            ));
        }
    }
    let medium = |p: &Path| {
        refuse(
            Rule::BootDevice,
            format!(
                "{} carries the failback appliance boot medium (ISO 9660 volume label {APPLIANCE_MEDIUM_LABEL} at byte {PVD_OFFSET}); never a target",
                p.display()
            ),
        )
    };
    match info.kind {
        Kind::File => {
            if carries_appliance_medium(path) {
                return Err(medium(path));
            }
            let id = FileId::of_path(path);
            if let Some(l) = sys
                .loops
                .iter()
                .find(|l| l.backing_id.is_some() && l.backing_id == id)
            {
                return Err(refuse(Rule::LoopBacking, loop_detail(l, sys)));
            }
            let ws = id.map(|id| writers(|f| f == id)).unwrap_or_default();
            if !ws.is_empty() {
                return Err(refuse(Rule::OpenForWriting, describe_writers(&ws)));
            }
            if info.size > 0 && info.size < source.size {
                return Err(refuse(
                    Rule::TooSmall,
                    format!(
                        "image file holds {} bytes but the source has {} (remove or truncate it to start a fresh image)",
                        info.size, source.size
                    ),
                ));
            }
            Ok(TargetState::File(info))
        }
        Kind::BlockDevice => {
            let devnum = info.devnum.unwrap_or((0, 0));
            let fam = family(devnum);
            // The stick the appliance booted from: the target itself, a partition on it, or
            // the disk it lies on carries the appliance ISO.
            if carries_appliance_medium(path) {
                return Err(medium(path));
            }
            for d in fam.iter().chain(underlying_disks(devnum).iter()) {
                if let Some(node) = dev_node(*d) {
                    if carries_appliance_medium(&node) {
                        return Err(medium(&node));
                    }
                }
            }
            if let Some(d) = fam.iter().find(|d| sys.boot_devices.contains(d)) {
                return Err(refuse(
                    Rule::BootDevice,
                    format!(
                        "device {}:{} holds the running system or the boot medium",
                        d.0, d.1
                    ),
                ));
            }
            // The disk under a target partition holding the system also counts.
            for d in underlying_disks(devnum) {
                if sys.boot_devices.contains(&d) && d != devnum {
                    return Err(refuse(
                        Rule::BootDevice,
                        format!("it lies on disk {}:{} which holds the running system or the boot medium", d.0, d.1),
                    ));
                }
            }
            if let Some(m) = sys.mounts.iter().find(|m| fam.contains(&m.devnum)) {
                return Err(refuse(
                    Rule::Mounted,
                    format!(
                        "{} ({}:{}) is mounted on {}",
                        m.source, m.devnum.0, m.devnum.1, m.mount_point
                    ),
                ));
            }
            for swap in &sys.swaps {
                if let Ok(meta) = std::fs::metadata(swap) {
                    use std::os::unix::fs::{FileTypeExt, MetadataExt};
                    if meta.file_type().is_block_device()
                        && fam.contains(&device::split_dev(meta.rdev()))
                    {
                        return Err(refuse(
                            Rule::Swap,
                            format!("{} on it is active swap", swap.display()),
                        ));
                    }
                }
            }
            for d in &fam {
                let h = holders(*d);
                if !h.is_empty() {
                    return Err(refuse(
                        Rule::Held,
                        format!("device {}:{} is held by {}", d.0, d.1, h.join(", ")),
                    ));
                }
            }
            let on_it = |f: FileId| matches!(f, FileId::Block(d) if fam.contains(&d));
            if let Some(l) = sys.loops.iter().find(|l| l.backing_id.is_some_and(on_it)) {
                return Err(refuse(Rule::LoopBacking, loop_detail(l, sys)));
            }
            let ws = writers(on_it);
            if !ws.is_empty() {
                return Err(refuse(Rule::OpenForWriting, describe_writers(&ws)));
            }
            if info.size < source.size {
                return Err(refuse(
                    Rule::TooSmall,
                    format!("{} bytes, but the source has {}", info.size, source.size),
                ));
            }
            if info.logical_sector_size != source.logical_sector_size {
                return Err(refuse(
                    Rule::SectorSize,
                    format!(
                        "logical sector size {} but the source's is {}",
                        info.logical_sector_size, source.logical_sector_size
                    ),
                ));
            }
            Ok(TargetState::BlockDevice(info))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(size: u64) -> DiskInfo {
        DiskInfo {
            id: "disk0".into(),
            size,
            logical_sector_size: 512,
            device: "vda".into(),
            serial: None,
        }
    }

    #[test]
    fn parses_proc_files() {
        let mi = "22 1 8:2 / / rw,relatime shared:1 - ext4 /dev/sda2 rw\n\
                  40 22 0:35 / /mnt/my\\040disk rw - tmpfs tmpfs rw\n";
        let m = parse_mountinfo(mi);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].devnum, (8, 2));
        assert_eq!(m[0].mount_point, "/");
        assert_eq!(m[0].source, "/dev/sda2");
        assert_eq!(m[1].mount_point, "/mnt/my disk");
        let s = parse_swaps(
            "Filename\tType\tSize\tUsed\tPriority\n/dev/sdb1 partition 1024 0 -2\n/swap\\040file file 1 0 -3\n",
        );
        assert_eq!(
            s,
            vec![PathBuf::from("/dev/sdb1"), PathBuf::from("/swap file")]
        );
    }

    #[test]
    fn file_rules() {
        let dir = tempfile::tempdir().unwrap();
        let sys = SystemState::default();
        let new = dir.path().join("new.img");
        assert_eq!(
            check_target_with(&new, &src(1 << 20), &sys).unwrap(),
            TargetState::NewFile
        );
        let small = dir.path().join("small.img");
        std::fs::write(&small, vec![1u8; 4096]).unwrap();
        let e = check_target_with(&small, &src(1 << 20), &sys).unwrap_err();
        assert_eq!(e.rule, Rule::TooSmall);
        assert!(e.to_string().contains("small.img"), "{e}");
        // An empty file is a fresh image.
        let empty = dir.path().join("empty.img");
        std::fs::write(&empty, b"").unwrap();
        assert!(check_target_with(&empty, &src(1 << 20), &sys).is_ok());
        // A file in use as swap.
        let sys = SystemState {
            swaps: vec![small.clone()],
            ..Default::default()
        };
        let e = check_target_with(&small, &src(10), &sys).unwrap_err();
        assert_eq!(e.rule, Rule::Swap);
        let e =
            check_target_with(Path::new("/dev/failback-nonexistent"), &src(10), &sys).unwrap_err();
        assert_eq!(e.rule, Rule::NotADisk);
        let e = check_target_with(Path::new("/nonexistent-dir/x.img"), &src(10), &sys).unwrap_err();
        assert_eq!(e.rule, Rule::NotADisk);
        let e = check_target_with(dir.path(), &src(10), &sys).unwrap_err();
        assert_eq!(e.rule, Rule::NotADisk);
    }

    /// A fake loop device `/dev/loop99` (7:99) backed by `img`.
    fn fake_loop(img: &Path) -> LoopDevice {
        LoopDevice {
            dev: "/dev/loop99".into(),
            devnum: (7, 99),
            backing: img.to_owned(),
            backing_id: FileId::of_path(img),
        }
    }

    #[test]
    fn loop_backing_file_is_refused_by_identity_not_path() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.img");
        std::fs::write(&img, vec![0u8; 8192]).unwrap();
        // Another name for the same inode, and a copy (another inode, same bytes).
        let link = dir.path().join("hardlink.img");
        std::fs::hard_link(&img, &link).unwrap();
        let copy = dir.path().join("copy.img");
        std::fs::copy(&img, &copy).unwrap();
        let mut sys = SystemState {
            loops: vec![fake_loop(&img)],
            ..Default::default()
        };
        for p in [&img, &link] {
            let e = check_target_with(p, &src(4096), &sys).unwrap_err();
            assert_eq!(e.rule, Rule::LoopBacking);
            let msg = e.to_string();
            assert!(
                msg.contains("rule loop-backing")
                    && msg.contains("loop device /dev/loop99")
                    && msg.contains("not mounted"),
                "{msg}"
            );
        }
        assert!(check_target_with(&copy, &src(4096), &sys).is_ok());
        sys.mounts.push(Mount {
            devnum: (7, 99),
            mount_point: "/mnt/x".into(),
            source: "/dev/loop99".into(),
        });
        let e = check_target_with(&link, &src(4096), &sys).unwrap_err();
        assert!(e.to_string().contains("mounted on /mnt/x"), "{e}");
    }

    #[test]
    fn fdinfo_access_mode() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        let fdinfo =
            |f: &std::fs::File| PathBuf::from(format!("/proc/self/fdinfo/{}", f.as_raw_fd()));
        let ro = std::fs::File::open(&p).unwrap();
        let rw = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let wo = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        assert!(!opened_for_writing(&fdinfo(&ro)));
        assert!(opened_for_writing(&fdinfo(&rw)));
        assert!(opened_for_writing(&fdinfo(&wo)));
        // This process never counts as a writer of its own targets.
        let id = FileId::of_path(&p).unwrap();
        assert!(writers(|f| f == id).is_empty());
    }

    /// An image with an ISO 9660 primary volume descriptor labelled `label` at sector 16.
    fn iso_image(path: &Path, label: &str, size: u64) {
        let mut data = vec![0u8; usize::try_from(size).unwrap()];
        let pvd = &mut data[32768..32768 + 2048];
        pvd[..6].copy_from_slice(b"\x01CD001");
        pvd[40..72].fill(b' ');
        pvd[40..40 + label.len()].copy_from_slice(label.as_bytes());
        std::fs::write(path, data).unwrap();
    }

    #[test]
    fn appliance_medium_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sys = SystemState::default();
        let stick = dir.path().join("stick.img");
        iso_image(&stick, "FAILBACK", 4 << 20);
        assert_eq!(iso9660_label(&stick).as_deref(), Some("FAILBACK"));
        let e = check_target_with(&stick, &src(1 << 20), &sys).unwrap_err();
        assert_eq!(e.rule, Rule::BootDevice);
        let msg = e.to_string();
        assert!(
            msg.contains("stick.img")
                && msg.contains("rule boot-device")
                && msg.contains("label FAILBACK"),
            "{msg}"
        );
        // Another ISO (a seed, any data CD) is not the boot medium: same size, accepted.
        let seed = dir.path().join("seed.img");
        iso_image(&seed, "FBSEED", 4 << 20);
        assert!(!carries_appliance_medium(&seed));
        assert!(check_target_with(&seed, &src(1 << 20), &sys).is_ok());
        // Too short to hold a volume descriptor: no label, no panic.
        let tiny = dir.path().join("tiny.img");
        std::fs::write(&tiny, b"x").unwrap();
        assert_eq!(iso9660_label(&tiny), None);
    }
}
