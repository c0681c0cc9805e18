//! Builds the appliance ISO (kernel, initramfs, BIOS + UEFI boot) and per-VM seed ISOs.
