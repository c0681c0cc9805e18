//! The appliance ISO: ISO 9660 (Rock Ridge + Joliet, label `FAILBACK`) with El Torito BIOS
//! (ISOLINUX, boot-info-table) and UEFI (FAT image: shim -> Debian-signed GRUB -> Debian-signed
//! kernel, so Secure Boot works), and a hybrid MBR/GPT so the same file boots as a CD and as a
//! USB disk. Written by hadris-iso; no external tools.

use crate::inputs::Inputs;
use crate::{esp, initramfs, read, Error};
use hadris_fs::{Content, Node, Tree};
use hadris_iso::{BootEntry, BootInfo, ElTorito, Hybrid, IsoId, IsoLevel, IsoOptions};
use std::path::{Path, PathBuf};

/// Volume label of the appliance ISO (the client uses it to find and eject its boot medium).
pub use failback_config::seed::APPLIANCE_LABEL;
/// Kernel arguments of every boot entry. `/dev/console` is the last `console=`: tty0, the VM
/// console an operator sees; the client also prints to and reads from the serial port.
pub const KERNEL_ARGS: &str = "console=ttyS0,115200 console=tty0 panic=-1 loglevel=4";

/// What to build.
#[derive(Debug, Clone)]
pub struct ApplianceOptions {
    /// Unpacked Debian inputs.
    pub inputs: Inputs,
    /// Static (musl) `failback-client` binary.
    pub client: PathBuf,
    /// Extra kernel arguments (e.g. `failback.no_prompt=1`), appended to [`KERNEL_ARGS`].
    pub extra_kernel_args: String,
}

/// What was built.
#[derive(Debug, Clone)]
pub struct ApplianceReport {
    /// Size of the ISO in bytes.
    pub iso_bytes: u64,
    /// Compressed initramfs size.
    pub initramfs_bytes: u64,
    /// Uncompressed initramfs size (RAM the root file system takes at boot).
    pub initramfs_unpacked_bytes: u64,
    /// Kernel modules in load order.
    pub modules: Vec<String>,
    /// Kernel release.
    pub kernel_release: String,
    /// Warnings from the ISO writer.
    pub warnings: Vec<String>,
}

fn iso_err(what: &'static str) -> impl Fn(String) -> Error {
    move |reason| Error::Iso { what, reason }
}

/// Builds the appliance ISO at `out`.
pub fn build(opts: &ApplianceOptions, out: &Path) -> Result<ApplianceReport, Error> {
    let inputs = &opts.inputs;
    let version = env!("CARGO_PKG_VERSION");
    let info = format!(
        "failback appliance {version}\nkernel {}\n{}",
        inputs.kernel_release,
        inputs.versions.clone().unwrap_or_default()
    );
    let (initrd, ir) = initramfs::build(inputs, &opts.client, &info)?;
    let esp = esp::build(inputs)?;
    let args = format!("{KERNEL_ARGS} {}", opts.extra_kernel_args)
        .trim()
        .to_string();

    let isolinux_cfg = format!(
        "SERIAL 0 115200\nDEFAULT failback\nPROMPT 0\nTIMEOUT 0\n\
         LABEL failback\n  KERNEL /boot/vmlinuz\n  INITRD /boot/initrd.img\n  APPEND {args}\n"
    );
    // Debian's CD GRUB finds the medium by /.disk/info, then sources /boot/grub/grub.cfg.
    let grub_cfg = format!(
        "set timeout=0\nset default=0\n\
         menuentry \"failback appliance {version}\" {{\n  linux /boot/vmlinuz {args}\n  initrd /boot/initrd.img\n}}\n"
    );

    let mut tree = Tree::new();
    let mut put = |path: &str, data: Vec<u8>| {
        tree.insert(path, Node::file(Content::bytes(data)))
            .map_err(|e| Error::Iso {
                what: "appliance tree",
                reason: format!("{path}: {e}"),
            })
    };
    put("isolinux/isolinux.bin", read(&inputs.isolinux_bin)?)?;
    put("isolinux/ldlinux.c32", read(&inputs.ldlinux_c32)?)?;
    put("isolinux/isolinux.cfg", isolinux_cfg.into_bytes())?;
    put("boot/vmlinuz", read(&inputs.kernel)?)?;
    put("boot/initrd.img", initrd)?;
    put("boot/grub/grub.cfg", grub_cfg.into_bytes())?;
    put("boot/efi.img", esp)?;
    put(".disk/info", info.into_bytes())?;

    let options = IsoOptions::default()
        .with_id(IsoId::Volume, APPLIANCE_LABEL)
        .with_id(IsoId::Application, "FAILBACK APPLIANCE")
        .with_level(IsoLevel::L3)
        .with_joliet()
        .with_rock_ridge()
        .with_el_torito(
            ElTorito::new()
                .with_entry(
                    BootEntry::bios("isolinux/isolinux.bin")
                        .with_load_size(4)
                        .with_boot_info(BootInfo::Table),
                )
                .with_entry(BootEntry::uefi("boot/efi.img"))
                .with_catalog_path("isolinux/boot.cat"),
        )
        .with_hybrid(Hybrid::gpt_hybrid_mbr().with_bootstrap(&read(&inputs.isohdpfx)?));
    let warnings = write_iso(out, &tree, &options, "appliance ISO")?;
    let iso_bytes = std::fs::metadata(out).map_err(|e| Error::io(out, e))?.len();
    Ok(ApplianceReport {
        iso_bytes,
        initramfs_bytes: ir.compressed_bytes,
        initramfs_unpacked_bytes: ir.cpio_bytes,
        modules: ir.modules.into_iter().map(|m| m.name).collect(),
        kernel_release: inputs.kernel_release.clone(),
        warnings,
    })
}

/// Writes `tree` as an ISO at `out` (via a temporary file renamed into place, so a failed
/// build never leaves a half-written ISO under the final name).
pub(crate) fn write_iso(
    out: &Path,
    tree: &Tree,
    options: &IsoOptions,
    what: &'static str,
) -> Result<Vec<String>, Error> {
    let tmp = out.with_extension("iso.partial");
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| Error::io(&tmp, e))?;
    let device = hadris_storage::host::FileDevice::new(file).map_err(|e| Error::io(&tmp, e))?;
    let report = hadris_iso::sync::write(device, tree, options).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        iso_err(what)(e.to_string())
    })?;
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    Ok(report.warnings().iter().map(|w| w.to_string()).collect())
}
