//! Bootable test OS disks for the restored-OS tests: a real (tiny) Linux system built from the
//! pinned Debian inputs of the appliance ISO (`target/iso-inputs`, see
//! `iso-builder/packages.lock`), no network.
//!
//! Layout (both firmwares): partition 1 = FAT boot partition (kernel, initramfs, boot loader),
//! partition 2 = ext4 root holding `etc/failback-test-os` (the generation) and `usr/share/testos/**`
//! (deterministic data files, half pseudo-random, half compressible text). BIOS: MBR with
//! syslinux's `mbr.bin`, the boot partition active, SYSLINUX on it. UEFI: GPT, the boot partition
//! is the EFI system partition with Debian's signed GRUB as `EFI/BOOT/BOOTX64.EFI`.
//!
//! The initramfs's init (busybox) loads the disk drivers and ext4, finds the root partition by
//! its marker file, computes the SHA-256 of its own content (`find . -type f | sort | xargs
//! sha256sum | sha256sum` over the root file system) and prints one line on the serial console:
//!
//! `FAILBACK_TEST_OS generation=v2 content=<sha256> root=/dev/sda2`
//!
//! then powers off (`poweroff -f`). Generations differ in scattered 4 KiB blocks of every 16th
//! data file and in the generation file, so a sync from v1 to v2 is a real delta.
//!
//! Built with mkfs.vfat, mtools, mkfs.ext4 (`-d`), sfdisk and the pinned `syslinux` installer
//! (all in the Makefile's `APT_PACKAGES`); the image is sparse. Images are cached under
//! `target/test-os/` keyed by the inputs and the spec, so tests build each once.

use anyhow::{bail, Context, Result};
use failback_iso::initramfs::Archive;
use failback_iso::inputs::Inputs;
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Bump when the layout or the init changes (part of the cache key).
const BUILDER_VERSION: u32 = 1;
/// Marker printed by the test OS's init.
pub const MARKER: &str = "FAILBACK_TEST_OS";
/// The boot partition: 1 MiB .. 65 MiB.
const BOOT_START_MIB: u64 = 1;
const BOOT_MIB: u64 = 64;
/// Kernel command line of the test OS.
const KERNEL_ARGS: &str = "console=tty0 console=ttyS0,115200 panic=-1 loglevel=3";
/// Modules the test OS loads (and their dependencies): disk controllers and ext4.
const MODULES: &[&str] = &[
    "vmw_pvscsi",
    "virtio_pci",
    "virtio_scsi",
    "virtio_blk",
    "ahci",
    "ata_piix",
    "nvme",
    "sd_mod",
    "crc32c_generic",
    "ext4",
];

/// Firmware the disk boots with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boot {
    /// MBR + SYSLINUX.
    Bios,
    /// GPT + EFI system partition + GRUB.
    Uefi,
}

impl Boot {
    fn name(self) -> &'static str {
        match self {
            Boot::Bios => "bios",
            Boot::Uefi => "uefi",
        }
    }
}

/// What to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    /// Firmware.
    pub boot: Boot,
    /// Generation (1 = stale, 2 = current); printed as `v<N>`.
    pub generation: u32,
    /// Data files on the root file system, in MiB.
    pub data_mib: u64,
    /// Size of the disk (sparse), in MiB.
    pub disk_mib: u64,
}

/// A built disk.
#[derive(Debug, Clone)]
pub struct TestOs {
    /// The image (cached; copy it before writing to it).
    pub path: PathBuf,
    /// SHA-256 the init prints as `content=`.
    pub content: String,
    /// The marker line without the root device: `FAILBACK_TEST_OS generation=vN content=X`.
    pub marker: String,
}

/// The default cache directory: `target/test-os` of this workspace.
pub fn default_cache() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-os")
}

/// Returns the cached disk for `spec`, building it first if needed.
pub fn ensure(spec: Spec, cache: &Path) -> Result<TestOs> {
    let inputs = Inputs::from_cache(&failback_iso::inputs::default_cache())
        .context("appliance inputs (run `make iso-inputs`)")?;
    let syslinux_dir = inputs_root(&inputs);
    std::fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    let key = cache_key(spec, &inputs)?;
    let stem = format!(
        "{}-v{}-{}M-{}",
        spec.boot.name(),
        spec.generation,
        spec.data_mib,
        &key[..16]
    );
    let path = cache.join(format!("{stem}.img"));
    let sum_file = cache.join(format!("{stem}.content"));
    if path.is_file() {
        if let Ok(content) = std::fs::read_to_string(&sum_file) {
            return Ok(made(spec, path, content.trim().to_string()));
        }
    }
    let tmp = tempfile::tempdir_in(cache)?;
    let img = tmp.path().join("disk.img");
    let content = build(spec, &inputs, &syslinux_dir, tmp.path(), &img)
        .with_context(|| format!("building test OS disk {stem}"))?;
    std::fs::write(&sum_file, &content)?;
    std::fs::rename(&img, &path)
        .with_context(|| format!("moving {} to {}", img.display(), path.display()))?;
    Ok(made(spec, path, content))
}

fn made(spec: Spec, path: PathBuf, content: String) -> TestOs {
    let marker = format!("{MARKER} generation=v{} content={content}", spec.generation);
    TestOs {
        path,
        content,
        marker,
    }
}

fn inputs_root(inputs: &Inputs) -> PathBuf {
    // <cache>/root/usr/lib/ISOLINUX/isolinux.bin -> <cache>/root
    inputs
        .isolinux_bin
        .ancestors()
        .nth(4)
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn cache_key(spec: Spec, inputs: &Inputs) -> Result<String> {
    let mut h = Sha256::new();
    h.update(format!(
        "{BUILDER_VERSION} {spec:?} {KERNEL_ARGS} {MODULES:?}\n"
    ));
    for p in [&inputs.kernel, &inputs.busybox, &inputs.grub] {
        let len = std::fs::metadata(p)
            .with_context(|| p.display().to_string())?
            .len();
        h.update(format!("{} {len}\n", p.display()));
    }
    h.update(inputs.versions.clone().unwrap_or_default());
    Ok(hex::encode(h.finalize()))
}

/// The initramfs's `/init`.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
while read -r m; do insmod "/lib/modules/$m" 2>/dev/null; done < /lib/modules/load.list
found=""
i=0
while [ -z "$found" ] && [ $i -lt 60 ]; do
	for d in /sys/class/block/*; do
		[ -f "$d/partition" ] || continue
		n=${d##*/}
		mount -t ext4 -o ro "/dev/$n" /root 2>/dev/null || continue
		if [ -f /root/etc/failback-test-os ]; then found=$n; break; fi
		umount /root
	done
	[ -n "$found" ] || { sleep 1; i=$((i+1)); }
done
if [ -z "$found" ]; then
	echo "FAILBACK_TEST_OS_FAILED no root file system with etc/failback-test-os"
	poweroff -f
fi
gen=$(cat /root/etc/failback-test-os)
sum=$(cd /root && find . -type f ! -path './lost+found/*' | sort | xargs sha256sum | sha256sum | cut -d' ' -f1)
umount /root
echo "FAILBACK_TEST_OS generation=$gen content=$sum root=/dev/$found"
poweroff -f
"#;

fn initramfs(inputs: &Inputs) -> Result<Vec<u8>> {
    let mut a = Archive::new();
    for d in ["proc", "sys", "dev", "root", "tmp"] {
        a.dir(d);
    }
    a.char_dev("dev/console", 5, 1, 0o600);
    a.file("bin/busybox", read(&inputs.busybox)?, 0o755);
    a.file("init", INIT.as_bytes().to_vec(), 0o755);
    let mods = failback_iso::modules::closure(&inputs.modules_dir, MODULES)?;
    let mut list = String::new();
    for m in &mods {
        let file = format!("{}.ko", m.name);
        a.file(&format!("lib/modules/{file}"), read(&m.path)?, 0o644);
        writeln!(list, "{file}")?;
    }
    a.file("lib/modules/load.list", list.into_bytes(), 0o644);
    Ok(a.write_cpio(Vec::new())?)
}

fn read(p: &Path) -> Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("reading {}", p.display()))
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("running {cmd:?} (see APT_PACKAGES in the Makefile)"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Deterministic data files under `root`; returns nothing (the content sum is computed from
/// the tree afterwards).
fn write_data(spec: Spec, root: &Path) -> Result<()> {
    std::fs::create_dir_all(root.join("etc"))?;
    std::fs::write(
        root.join("etc/failback-test-os"),
        format!("v{}\n", spec.generation),
    )?;
    let text: Vec<u8> = b"failback test OS: compressible text block. "
        .iter()
        .copied()
        .cycle()
        .take(4096)
        .collect();
    let total = spec.data_mib << 20;
    let (mut written, mut i) = (0u64, 0u64);
    while written < total {
        let seed = crate::random_bytes(i ^ 0xf11e, 8);
        let r = u64::from_le_bytes(seed[..8].try_into().unwrap_or_default());
        // 16 KiB .. 2 MiB, whole 4 KiB blocks.
        let size = ((16 << 10) + r % (2 << 20)).min(total - written).max(4096) / 4096 * 4096;
        let mut data = Vec::with_capacity(usize::try_from(size)?);
        for b in 0..size / 4096 {
            if (b + i) % 2 == 0 {
                data.extend_from_slice(&crate::random_bytes(i << 20 | b, 4096));
            } else {
                data.extend_from_slice(&text);
            }
        }
        if spec.generation > 1 && i % 16 == 5 {
            // One scattered block per 16th file changes between generations.
            let blocks = size / 4096;
            let b = usize::try_from((i * 7 + u64::from(spec.generation)) % blocks)? * 4096;
            let fresh = crate::random_bytes(i << 32 | u64::from(spec.generation), 4096);
            data[b..b + 4096].copy_from_slice(&fresh);
        }
        let dir = root.join(format!("usr/share/testos/d{:02}", i % 32));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("f{i:05}.bin")), &data)?;
        written += size;
        i += 1;
    }
    Ok(())
}

/// The SHA-256 the init computes: sha256sum lines (`<hex>  ./path`) of every file sorted by
/// path (bytewise, as busybox sort), hashed.
fn content_sum(root: &Path) -> Result<String> {
    let mut files = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                stack.push(e.path());
            } else {
                files.push(e.path());
            }
        }
    }
    let mut lines: Vec<String> = Vec::new();
    for f in files {
        let rel = f.strip_prefix(root)?.to_string_lossy().to_string();
        let sum = hex::encode(Sha256::digest(read(&f)?));
        lines.push(format!("./{rel}"));
        lines.push(sum);
    }
    let mut pairs: Vec<(String, String)> = lines
        .chunks(2)
        .map(|c| (c[0].clone(), c[1].clone()))
        .collect();
    pairs.sort();
    let mut all = String::new();
    for (p, s) in pairs {
        writeln!(all, "{s}  {p}")?;
    }
    Ok(hex::encode(Sha256::digest(all.as_bytes())))
}

fn build(spec: Spec, inputs: &Inputs, deb_root: &Path, work: &Path, img: &Path) -> Result<String> {
    let boot_bytes = BOOT_MIB << 20;
    let root_start = (BOOT_START_MIB + BOOT_MIB) << 20;
    if spec.disk_mib < BOOT_START_MIB + BOOT_MIB + spec.data_mib + spec.data_mib / 4 + 32 {
        bail!(
            "disk of {} MiB too small for {} MiB of data",
            spec.disk_mib,
            spec.data_mib
        );
    }
    let root_bytes = (spec.disk_mib << 20) - root_start - (1 << 20); // GPT backup at the end
    let rootdir = work.join("root");
    write_data(spec, &rootdir)?;
    let content = content_sum(&rootdir)?;

    std::fs::File::create(img)?.set_len(spec.disk_mib << 20)?;
    let s = |n: u64| n / 512;
    let table = match spec.boot {
        Boot::Bios => format!(
            "label: dos\nlabel-id: 0x46424b31\nstart={}, size={}, type=c, bootable\nstart={}, size={}, type=83\n",
            s(BOOT_START_MIB << 20), s(boot_bytes), s(root_start), s(root_bytes)
        ),
        Boot::Uefi => format!(
            "label: gpt\nlabel-id: 46424B31-0000-4000-8000-000000000001\n\
             start={}, size={}, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=46424B31-0000-4000-8000-000000000002, name=ESP\n\
             start={}, size={}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid=46424B31-0000-4000-8000-000000000003, name=root\n",
            s(BOOT_START_MIB << 20), s(boot_bytes), s(root_start), s(root_bytes)
        ),
    };
    let tbl = work.join("table");
    std::fs::write(&tbl, table)?;
    run(Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(img)
        .stdin(std::fs::File::open(&tbl)?))?;

    // Boot partition (FAT).
    run(Command::new("mkfs.vfat")
        .args(["-F", "16", "-i", "46424B31", "-n", "TESTBOOT"])
        .arg(format!("--offset={}", s(BOOT_START_MIB << 20)))
        .arg(img)
        .arg((boot_bytes >> 10).to_string()))?;
    let fat = format!("{}@@{}", img.display(), BOOT_START_MIB << 20);
    let files = work.join("boot");
    std::fs::create_dir_all(&files)?;
    std::fs::write(files.join("initrd.img"), initramfs(inputs)?)?;
    std::fs::copy(&inputs.kernel, files.join("vmlinuz"))?;
    match spec.boot {
        Boot::Bios => {
            std::fs::write(
                files.join("syslinux.cfg"),
                format!(
                    "SERIAL 0 115200\nDEFAULT testos\nPROMPT 0\nTIMEOUT 0\nLABEL testos\n  KERNEL /vmlinuz\n  INITRD /initrd.img\n  APPEND {KERNEL_ARGS}\n"
                ),
            )?;
            std::fs::copy(&inputs.ldlinux_c32, files.join("ldlinux.c32"))?;
        }
        Boot::Uefi => {
            std::fs::create_dir_all(files.join("EFI/BOOT"))?;
            std::fs::copy(&inputs.grub, files.join("EFI/BOOT/BOOTX64.EFI"))?;
            std::fs::create_dir_all(files.join("boot/grub"))?;
            std::fs::write(
                files.join("boot/grub/grub.cfg"),
                format!(
                    "set timeout=0\nset default=0\nmenuentry \"failback test OS v{}\" {{\n  linux /vmlinuz {KERNEL_ARGS}\n  initrd /initrd.img\n}}\n",
                    spec.generation
                ),
            )?;
        }
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&files)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    entries.sort();
    run(Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-s", "-Q", "-m", "-i", &fat])
        .args(&entries)
        .arg("::/"))?;

    if spec.boot == Boot::Bios {
        run(Command::new(deb_root.join("usr/bin/syslinux"))
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["--offset", &(BOOT_START_MIB << 20).to_string(), "--install"])
            .arg(img))?;
        let mbr = read(&deb_root.join("usr/lib/syslinux/mbr/mbr.bin"))?;
        write_at(img, 0, &mbr[..mbr.len().min(440)])?;
    }

    // Root partition (ext4, filled from the tree).
    run(Command::new("mkfs.ext4")
        .env("E2FSPROGS_FAKE_TIME", "1")
        .args([
            "-q",
            "-F",
            "-b",
            "4096",
            "-L",
            "FBTESTROOT",
            "-U",
            "46424b31-0000-4000-8000-000000000004",
        ])
        .arg(format!(
            "-Eoffset={root_start},hash_seed=46424b31-0000-4000-8000-000000000005,root_owner=0:0"
        ))
        .arg("-d")
        .arg(&rootdir)
        .arg(img)
        .arg(format!("{}k", root_bytes >> 10)))?;
    let len = std::fs::metadata(img)?.len();
    if len != spec.disk_mib << 20 {
        bail!(
            "{}: size {len} after mkfs, expected {}",
            img.display(),
            spec.disk_mib << 20
        );
    }
    Ok(content)
}

fn write_at(path: &Path, offset: u64, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.write_all_at(data, offset)
        .with_context(|| format!("writing {} at offset {offset}", path.display()))?;
    f.sync_all()?;
    Ok(())
}
