//! Locates the unpacked Debian packages (the ISO's inputs) in the cache directory written by
//! `iso-builder/fetch-inputs.sh` (`<cache>/root` is the `dpkg -x` target).

use crate::Error;
use std::path::{Path, PathBuf};

/// Environment variable that overrides the default cache directory.
pub const CACHE_ENV: &str = "FAILBACK_ISO_INPUTS";

/// Paths of every input file, all inside the unpacked package root.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// Debian-signed kernel (`/boot/vmlinuz-*`).
    pub kernel: PathBuf,
    /// Kernel release, e.g. `6.1.0-56-amd64`.
    pub kernel_release: String,
    /// `/lib/modules/<release>`.
    pub modules_dir: PathBuf,
    /// Static busybox.
    pub busybox: PathBuf,
    /// ISOLINUX boot image.
    pub isolinux_bin: PathBuf,
    /// 432-byte isohybrid MBR boot code.
    pub isohdpfx: PathBuf,
    /// ISOLINUX's core module.
    pub ldlinux_c32: PathBuf,
    /// Microsoft-signed shim (first stage under Secure Boot).
    pub shim: PathBuf,
    /// Debian-signed GRUB for CDs (`gcdx64.efi.signed`), loaded by shim.
    pub grub: PathBuf,
    /// `name version` lines of the packages used (from the fetch script), if present.
    pub versions: Option<String>,
}

/// The default cache: `$FAILBACK_ISO_INPUTS`, else `target/iso-inputs` of the workspace
/// this crate was built in (what `make setup` fills).
pub fn default_cache() -> PathBuf {
    if let Some(dir) = std::env::var_os(CACHE_ENV) {
        return PathBuf::from(dir);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/iso-inputs")
}

fn need(root: &Path, rel: &str, what: &'static str) -> Result<PathBuf, Error> {
    let path = root.join(rel);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::InputMissing { what, path })
    }
}

impl Inputs {
    /// Finds every input in `cache` (the directory holding `root/`).
    pub fn from_cache(cache: &Path) -> Result<Self, Error> {
        let root = cache.join("root");
        let boot = root.join("boot");
        let mut kernels: Vec<PathBuf> = std::fs::read_dir(&boot)
            .map_err(|_| Error::InputMissing {
                what: "kernel package (boot/)",
                path: boot.clone(),
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmlinuz-"))
            })
            .collect();
        kernels.sort();
        let kernel = kernels.pop().ok_or(Error::InputMissing {
            what: "kernel (boot/vmlinuz-*)",
            path: boot.clone(),
        })?;
        let kernel_release = kernel
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .unwrap_or_default()
            .to_string();
        let modules_dir = root.join("lib/modules").join(&kernel_release);
        if !modules_dir.join("kernel").is_dir() {
            return Err(Error::InputMissing {
                what: "kernel modules",
                path: modules_dir,
            });
        }
        Ok(Inputs {
            kernel,
            kernel_release,
            modules_dir,
            busybox: need(&root, "bin/busybox", "busybox-static")?,
            isolinux_bin: need(&root, "usr/lib/ISOLINUX/isolinux.bin", "isolinux.bin")?,
            isohdpfx: need(&root, "usr/lib/ISOLINUX/isohdpfx.bin", "isohdpfx.bin")?,
            ldlinux_c32: need(
                &root,
                "usr/lib/syslinux/modules/bios/ldlinux.c32",
                "ldlinux.c32 (syslinux-common)",
            )?,
            shim: need(&root, "usr/lib/shim/shimx64.efi.signed", "shim-signed")?,
            grub: need(
                &root,
                "usr/lib/grub/x86_64-efi-signed/gcdx64.efi.signed",
                "grub-efi-amd64-signed",
            )?,
            versions: std::fs::read_to_string(cache.join("versions.txt")).ok(),
        })
    }
}
