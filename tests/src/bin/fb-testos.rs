//! Builds (or finds in the cache) a bootable test OS disk: `fb-testos --boot bios --generation 2`.
//! Prints the image path and the marker line its init prints on the serial console.

use clap::Parser;
use failback_tests::testos::{self, Boot, Spec};

#[derive(Parser, Debug)]
#[command(about = "Build a bootable test OS disk (cached under target/test-os)")]
struct Args {
    /// Firmware: bios (MBR + SYSLINUX) or uefi (GPT + ESP + GRUB).
    #[arg(long, value_parser = ["bios", "uefi"])]
    boot: String,
    /// Generation (1 = stale, 2 = current).
    #[arg(long, default_value_t = 2)]
    generation: u32,
    /// MiB of data files on the root file system.
    #[arg(long, default_value_t = 64)]
    data_mib: u64,
    /// Disk size in MiB (sparse).
    #[arg(long, default_value_t = 256)]
    disk_mib: u64,
    /// Cache directory (default target/test-os).
    #[arg(long)]
    cache: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let spec = Spec {
        boot: if a.boot == "bios" {
            Boot::Bios
        } else {
            Boot::Uefi
        },
        generation: a.generation,
        data_mib: a.data_mib,
        disk_mib: a.disk_mib,
    };
    let os = testos::ensure(spec, &a.cache.unwrap_or_else(testos::default_cache))?;
    println!("{}", os.path.display());
    println!("{}", os.marker);
    Ok(())
}
