//! Booting the restored disk next: on UEFI, a `Boot####` load option for the disk's EFI
//! system partition and `BootNext` naming it, written through efivarfs; the firmware boots it
//! once on the next boot whatever the persistent `BootOrder` says (the appliance CD or USB
//! stick may still be first). BIOS has no such variable: see `super::finish`.
//!
//! Formats (UEFI 2.10): a variable file in efivarfs is 4 attribute bytes (little-endian)
//! followed by the value. `EFI_LOAD_OPTION` = attributes (u32, `LOAD_OPTION_ACTIVE`), length
//! of the device path list (u16), UCS-2 description (NUL-terminated), device path: a
//! short-form hard-drive node (partition number, start and size in LBAs, GPT partition GUID),
//! a file path node (`\EFI\BOOT\BOOTX64.EFI`, the removable-media path every UEFI OS
//! installs or the firmware falls back to) and the end node. Firmware expands a short-form
//! hard-drive path by finding the partition with that GUID. When NVRAM already holds a load
//! option naming the partition's GUID (the restored OS's own entry, e.g. `debian` or
//! `Windows Boot Manager`), that one is used instead: it starts the OS's own boot chain.
//!
//! Hand-written: a few dozen lines of byte layout; the crates for EFI variables either wrap
//! a C library or need a newer toolchain feature set than the appliance's static build.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// The EFI global variable vendor GUID (efivarfs file name suffix).
const GLOBAL: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";
/// Where efivarfs is mounted.
pub const EFIVARS: &str = "/sys/firmware/efi/efivars";
/// Non-volatile, boot-service and runtime access.
const ATTRS: u32 = 0x7;
/// The load option the appliance writes when NVRAM has none for the disk.
const OUR_OPTION: u16 = 0x0FB0;
/// ESP partition type GUID C12A7328-F81F-11D2-BA4B-00A0C93EC93B, as stored in a GPT entry.
const ESP_TYPE: [u8; 16] = [
    0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b,
];
const LOADER: &str = "\\EFI\\BOOT\\BOOTX64.EFI";

/// The EFI system partition of a GPT disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Esp {
    /// 1-based partition number.
    pub number: u32,
    /// First LBA.
    pub start: u64,
    /// Size in LBAs.
    pub size: u64,
    /// Unique partition GUID as stored on disk (mixed-endian).
    pub guid: [u8; 16],
}

/// True when the machine booted with UEFI.
pub fn is_uefi() -> bool {
    Path::new("/sys/firmware/efi").is_dir()
}

fn err(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from(u32_at(b, o)) | (u64::from(u32_at(b, o + 4)) << 32)
}

/// Finds the EFI system partition in the GPT of `disk` (512-byte logical sectors).
pub fn find_esp(disk: &Path) -> std::io::Result<Esp> {
    let mut f = std::fs::File::open(disk)?;
    let mut hdr = [0u8; 512];
    f.seek(SeekFrom::Start(512))?;
    f.read_exact(&mut hdr)?;
    if &hdr[..8] != b"EFI PART" {
        return Err(err(format!("{}: no GPT header at LBA 1", disk.display())));
    }
    let (table, count, size) = (u64_at(&hdr, 72), u32_at(&hdr, 80), u32_at(&hdr, 84));
    if !(128..=4096).contains(&size) || count > 1024 {
        return Err(err(format!(
            "{}: GPT header with {count} entries of {size} bytes refused",
            disk.display()
        )));
    }
    let mut entries = vec![0u8; count as usize * size as usize];
    f.seek(SeekFrom::Start(table * 512))?;
    f.read_exact(&mut entries)?;
    for (i, e) in entries.chunks(size as usize).enumerate() {
        if e[..16] == ESP_TYPE {
            let (first, last) = (u64_at(e, 32), u64_at(e, 40));
            let mut guid = [0u8; 16];
            guid.copy_from_slice(&e[16..32]);
            return Ok(Esp {
                number: u32::try_from(i + 1).unwrap_or(u32::MAX),
                start: first,
                size: last.saturating_sub(first) + 1,
                guid,
            });
        }
    }
    Err(err(format!(
        "{}: no EFI system partition in its GPT",
        disk.display()
    )))
}

fn ucs2(s: &str) -> Vec<u8> {
    s.encode_utf16()
        .chain(std::iter::once(0))
        .flat_map(u16::to_le_bytes)
        .collect()
}

/// The `EFI_LOAD_OPTION` booting `\EFI\BOOT\BOOTX64.EFI` from `esp`.
pub fn load_option(esp: &Esp, description: &str) -> Vec<u8> {
    let mut path = vec![0x04, 0x01, 42, 0];
    path.extend_from_slice(&esp.number.to_le_bytes());
    path.extend_from_slice(&esp.start.to_le_bytes());
    path.extend_from_slice(&esp.size.to_le_bytes());
    path.extend_from_slice(&esp.guid);
    path.extend_from_slice(&[0x02, 0x02]); // GPT, GUID signature
    let file = ucs2(LOADER);
    let len = u16::try_from(4 + file.len()).unwrap_or(u16::MAX);
    path.extend_from_slice(&[0x04, 0x04]);
    path.extend_from_slice(&len.to_le_bytes());
    path.extend_from_slice(&file);
    path.extend_from_slice(&[0x7f, 0xff, 0x04, 0x00]);
    let mut opt = 1u32.to_le_bytes().to_vec(); // LOAD_OPTION_ACTIVE
    opt.extend_from_slice(&u16::try_from(path.len()).unwrap_or(u16::MAX).to_le_bytes());
    opt.extend_from_slice(&ucs2(description));
    opt.extend_from_slice(&path);
    opt
}

fn var_path(name: &str) -> PathBuf {
    Path::new(EFIVARS).join(format!("{name}-{GLOBAL}"))
}

/// efivarfs marks existing variables immutable; clear that before rewriting one.
#[allow(unsafe_code)]
fn clear_immutable(path: &Path) {
    use std::os::fd::AsRawFd;
    // `Ioctl` is c_ulong on glibc and c_int on musl; the request numbers are bit patterns.
    #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
    const FS_IOC_GETFLAGS: libc::Ioctl = 0x8008_6601_u32 as libc::Ioctl;
    #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
    const FS_IOC_SETFLAGS: libc::Ioctl = 0x4008_6602_u32 as libc::Ioctl;
    const FS_IMMUTABLE_FL: libc::c_long = 0x10;
    let Ok(f) = std::fs::File::open(path) else {
        return;
    };
    let mut flags: libc::c_long = 0;
    // SAFETY: valid fd and a pointer to a c_long the ioctls read/write.
    unsafe {
        if libc::ioctl(f.as_raw_fd(), FS_IOC_GETFLAGS, &mut flags) == 0 {
            flags &= !FS_IMMUTABLE_FL;
            libc::ioctl(f.as_raw_fd(), FS_IOC_SETFLAGS, &flags);
        }
    }
}

/// Writes variable `name` (one write: efivarfs takes the whole value at once).
fn write_var(name: &str, value: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let path = var_path(name);
    clear_immutable(&path);
    let mut data = ATTRS.to_le_bytes().to_vec();
    data.extend_from_slice(value);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    f.write_all(&data)
        .map_err(|e| std::io::Error::new(e.kind(), format!("writing {}: {e}", path.display())))
}

/// An existing `Boot####` whose device path names the partition GUID `guid`.
fn existing_option(guid: &[u8; 16]) -> Option<u16> {
    let mut found: Vec<u16> = std::fs::read_dir(EFIVARS)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let num = name
                .strip_prefix("Boot")?
                .strip_suffix(&format!("-{GLOBAL}"))?;
            let n = u16::from_str_radix(num, 16)
                .ok()
                .filter(|_| num.len() == 4)?;
            let data = std::fs::read(e.path()).ok()?;
            data.windows(16).any(|w| w == guid).then_some(n)
        })
        .collect();
    found.sort();
    found.into_iter().find(|n| *n != OUR_OPTION)
}

/// Mounts efivarfs (module loaded at boot) if needed.
fn mount_efivars() -> std::io::Result<()> {
    if Path::new(EFIVARS).read_dir()?.next().is_some() {
        return Ok(());
    }
    super::system::mount("efivarfs", EFIVARS, "efivarfs", 0)
}

/// Makes the firmware boot `disk`'s EFI system partition on the next boot (`BootNext`).
/// Returns a line for the console naming the entry used.
pub fn boot_disk_next(disk: &Path) -> std::io::Result<String> {
    if !is_uefi() {
        return Err(err("not booted with UEFI".into()));
    }
    mount_efivars()?;
    let esp = find_esp(disk)?;
    let (num, how) = match existing_option(&esp.guid) {
        Some(n) => (n, "its existing boot entry"),
        None => {
            let opt = load_option(&esp, &format!("restored disk {}", disk.display()));
            write_var(&format!("Boot{OUR_OPTION:04X}"), &opt)?;
            (OUR_OPTION, "a new boot entry for its EFI system partition")
        }
    };
    write_var("BootNext", &num.to_le_bytes())?;
    Ok(format!(
        "BootNext = Boot{num:04X}: {} (partition {}, {LOADER} or the OS's own loader) via {how}",
        disk.display(),
        esp.number
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_option_layout() {
        let esp = Esp {
            number: 1,
            start: 2048,
            size: 131072,
            guid: [7; 16],
        };
        let o = load_option(&esp, "x");
        assert_eq!(&o[..4], &[1, 0, 0, 0]);
        let plen = u16::from_le_bytes([o[4], o[5]]) as usize;
        // attributes + length + "x\0" in UCS-2, then the device path list.
        assert_eq!(o.len(), 6 + 4 + plen);
        let p = &o[10..];
        assert_eq!(&p[..4], &[4, 1, 42, 0]);
        assert_eq!(u32_at(p, 4), 1);
        assert_eq!(u64_at(p, 8), 2048);
        assert_eq!(u64_at(p, 16), 131072);
        assert_eq!(&p[24..40], &[7; 16]);
        assert_eq!(&p[40..42], &[2, 2]);
        assert_eq!(&p[42..44], &[4, 4]);
        assert_eq!(&p[p.len() - 4..], &[0x7f, 0xff, 4, 0]);
    }

    #[test]
    fn finds_the_esp_of_a_gpt_image() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.img");
        let mut d = vec![0u8; 64 * 512];
        d[512..520].copy_from_slice(b"EFI PART");
        d[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
        d[512 + 80..512 + 84].copy_from_slice(&4u32.to_le_bytes());
        d[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        let e = 1024 + 128; // second entry
        d[e..e + 16].copy_from_slice(&ESP_TYPE);
        d[e + 16..e + 32].copy_from_slice(&[9; 16]);
        d[e + 32..e + 40].copy_from_slice(&2048u64.to_le_bytes());
        d[e + 40..e + 48].copy_from_slice(&4095u64.to_le_bytes());
        std::fs::write(&img, &d).unwrap();
        let esp = find_esp(&img).unwrap();
        assert_eq!(
            esp,
            Esp {
                number: 2,
                start: 2048,
                size: 2048,
                guid: [9; 16]
            }
        );
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        assert!(find_esp(&img).unwrap_err().to_string().contains("no GPT"));
    }
}
