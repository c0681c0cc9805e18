//! The test OS disk builder (no QEMU; the boots are in appliance_restored_os.rs and
//! mass_qemu.rs): generations v1 and v2 differ in scattered blocks only, the build is
//! reproducible (same content checksum, same bytes outside file-system timestamps), images are
//! sparse, and the partition tables are what the firmwares need.

use failback_tests::testos::{self, Boot, Spec};

fn spec(boot: Boot, generation: u32) -> Spec {
    Spec {
        boot,
        generation,
        data_mib: 16,
        disk_mib: 128,
    }
}

#[test]
fn generations_differ_in_scattered_blocks_and_builds_are_reproducible() {
    let cache = tempfile::tempdir().unwrap();
    let v1 = testos::ensure(spec(Boot::Bios, 1), cache.path()).unwrap();
    let v2 = testos::ensure(spec(Boot::Bios, 2), cache.path()).unwrap();
    assert_ne!(v1.content, v2.content);
    assert!(v2
        .marker
        .starts_with("FAILBACK_TEST_OS generation=v2 content="));
    let (a, b) = (
        std::fs::read(&v1.path).unwrap(),
        std::fs::read(&v2.path).unwrap(),
    );
    assert_eq!(a.len(), 128 << 20);
    let differing: Vec<usize> = a
        .chunks(4096)
        .zip(b.chunks(4096))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i)
        .collect();
    let total = a.len() / 4096;
    assert!(!differing.is_empty());
    assert!(
        differing.len() * 20 < total,
        "{} of {total} blocks differ: not a delta",
        differing.len()
    );
    // Scattered: the differing blocks fall into many distinct MiB regions.
    let mut regions: Vec<usize> = differing.iter().map(|i| i / 256).collect();
    regions.dedup();
    assert!(regions.len() >= 3, "differing MiB regions: {regions:?}");

    // MBR: syslinux boot code, signature, partition 1 active FAT, partition 2 Linux.
    assert_eq!(&b[510..512], &[0x55, 0xaa]);
    assert_eq!(b[446], 0x80, "partition 1 not active");
    assert_eq!((b[446 + 4], b[462 + 4]), (0x0c, 0x83));
    // Sparse on the host.
    use std::os::unix::fs::MetadataExt;
    let blocks = std::fs::metadata(&v2.path).unwrap().blocks() * 512;
    assert!(
        blocks < 100 << 20,
        "{blocks} bytes allocated for a 128 MiB image"
    );

    // Rebuilt from scratch: the same content checksum.
    let other = tempfile::tempdir().unwrap();
    let again = testos::ensure(spec(Boot::Bios, 2), other.path()).unwrap();
    assert_eq!(again.content, v2.content);
    // Cached: the second call returns the same file without building.
    let cached = testos::ensure(spec(Boot::Bios, 2), cache.path()).unwrap();
    assert_eq!(cached.path, v2.path);

    // UEFI: protective MBR + GPT with the EFI system partition first.
    let u = testos::ensure(spec(Boot::Uefi, 2), cache.path()).unwrap();
    let g = std::fs::read(&u.path).unwrap();
    assert_eq!(&g[512..520], b"EFI PART");
    let esp_type = [
        0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9,
        0x3b,
    ];
    assert_eq!(&g[1024..1040], &esp_type);
    assert_eq!(u.content, v2.content);
}
