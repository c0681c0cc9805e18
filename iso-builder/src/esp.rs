//! The EFI system partition image (FAT): `EFI/BOOT/BOOTX64.EFI` = Microsoft-signed shim,
//! `EFI/BOOT/grubx64.efi` = Debian-signed GRUB (which shim loads and verifies). This is the
//! only chain that boots with Secure Boot on and stock firmware keys.
//!
//! Reproducible: fatfs without its `chrono` feature stamps every entry 1980-01-01 and uses a
//! fixed volume id.

use crate::inputs::Inputs;
use crate::{read, Error};
use std::io::{Cursor, Write};

/// El Torito counts the image in 16 bits of 512-byte sectors: the image must stay below this.
pub const MAX_ESP_BYTES: u64 = 0xffff * 512;

fn fat(e: std::io::Error) -> Error {
    Error::Fat(e.to_string())
}

/// Builds the FAT image holding shim and GRUB.
pub fn build(inputs: &Inputs) -> Result<Vec<u8>, Error> {
    let files = [
        ("BOOTX64.EFI", read(&inputs.shim)?),
        ("grubx64.efi", read(&inputs.grub)?),
    ];
    let payload: u64 = files.iter().map(|(_, d)| d.len() as u64).sum();
    // Payload + FAT/directory overhead + slack, rounded up to 1 MiB.
    let size = (payload + payload / 8 + (512 << 10)).div_ceil(1 << 20) * (1 << 20);
    if size > MAX_ESP_BYTES {
        return Err(Error::TooLarge {
            what: "EFI system partition image".into(),
            size,
            limit: MAX_ESP_BYTES,
        });
    }
    let len = usize::try_from(size).map_err(|_| Error::Fat("image size overflows usize".into()))?;
    let mut disk = Cursor::new(vec![0u8; len]);
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new()
            .volume_label(*b"FAILBACKEFI")
            .volume_id(0x4642_4b31),
    )
    .map_err(fat)?;
    {
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).map_err(fat)?;
        {
            let boot = fs
                .root_dir()
                .create_dir("EFI")
                .and_then(|d| d.create_dir("BOOT"))
                .map_err(fat)?;
            for (name, data) in &files {
                let mut f = boot.create_file(name).map_err(fat)?;
                f.truncate().map_err(fat)?;
                f.write_all(data).map_err(fat)?;
                f.flush().map_err(fat)?;
            }
        }
        fs.unmount().map_err(fat)?;
    }
    Ok(disk.into_inner())
}
