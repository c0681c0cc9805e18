//! The appliance ISO and seed ISO, checked with xorriso as an oracle (no boot here; see
//! appliance_boot.rs): El Torito BIOS + UEFI, boot-info-table, hybrid MBR/GPT, label, the
//! files GRUB needs, size, reproducibility, initramfs contents; seed ISO contents and refusals.

mod appliance_support;

use appliance_support::*;
use failback_config::seed::{SeedConfig, SEED_LABEL};
use std::process::Command;

fn xorriso(args: &[&str]) -> String {
    let out = Command::new("xorriso")
        .args(args)
        .output()
        .expect("xorriso (apt package xorriso, installed by make setup)");
    assert!(
        out.status.success(),
        "xorriso {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn extract(iso: &std::path::Path, inner: &str, dir: &std::path::Path) -> Vec<u8> {
    let dest = dir.join(inner.trim_start_matches('/').replace('/', "_"));
    xorriso(&[
        "-osirrox",
        "on",
        "-indev",
        iso.to_str().unwrap(),
        "-extract",
        inner,
        dest.to_str().unwrap(),
    ]);
    std::fs::read(&dest).unwrap()
}

#[test]
fn appliance_iso_boot_records_layout_and_initramfs() {
    let (iso, report) = product_iso();
    let size = std::fs::metadata(iso).unwrap().len();
    assert!(
        size <= 32 << 20,
        "ISO is {size} bytes, over the 32 MiB target"
    );
    assert_eq!(size, report.iso_bytes);
    let isos = iso.to_str().unwrap();

    let pvd = xorriso(&["-indev", isos, "-pvd_info"]);
    assert!(pvd.contains("Volume Id    : FAILBACK"), "{pvd}");

    let et = xorriso(&["-indev", isos, "-report_el_torito", "plain"]);
    let bios = et
        .lines()
        .find(|l| l.contains("El Torito boot img") && l.contains("BIOS"));
    let uefi = et
        .lines()
        .find(|l| l.contains("El Torito boot img") && l.contains("UEFI"));
    assert!(
        bios.is_some() && uefi.is_some(),
        "need BIOS and UEFI boot entries:\n{et}"
    );
    assert!(
        et.contains("/isolinux/isolinux.bin") && et.contains("/boot/efi.img"),
        "{et}"
    );

    let sa = xorriso(&["-indev", isos, "-report_system_area", "plain"]);
    assert!(
        sa.contains("GPT") && sa.contains("MBR partition"),
        "hybrid MBR/GPT expected:\n{sa}"
    );
    assert!(sa.contains("EFI System Partition"), "{sa}");

    let files = xorriso(&["-indev", isos, "-find", "/", "-type", "f"]);
    for f in [
        "/.disk/info",
        "/boot/grub/grub.cfg",
        "/boot/vmlinuz",
        "/boot/initrd.img",
        "/isolinux/ldlinux.c32",
        "/isolinux/isolinux.cfg",
    ] {
        assert!(files.contains(&format!("'{f}'")), "{f} missing:\n{files}");
    }

    let dir = tempfile::tempdir().unwrap();
    // boot-info-table: isolinux.bin patched with the PVD LBA (16) and its own LBA.
    let bin = std::fs::read(&inputs().isolinux_bin).unwrap();
    let image = std::fs::read(iso).unwrap();
    let lba = (0..image.len() / 2048)
        .find(|i| {
            image[i * 2048..i * 2048 + 8] == bin[..8]
                && image[i * 2048 + 64..i * 2048 + 512] == bin[64..512]
        })
        .expect("isolinux.bin not found in the ISO");
    let at = lba * 2048;
    assert_eq!(
        u32::from_le_bytes(image[at + 8..at + 12].try_into().unwrap()),
        16
    );
    assert_eq!(
        u32::from_le_bytes(image[at + 12..at + 16].try_into().unwrap()) as usize,
        lba
    );
    // Hybrid MBR boot code from isohdpfx.bin, with the boot signature.
    let mbr = std::fs::read(&inputs().isohdpfx).unwrap();
    assert_eq!(&image[..400], &mbr[..400]);
    assert_eq!(&image[510..512], &[0x55, 0xaa]);

    let grub = String::from_utf8(extract(iso, "/boot/grub/grub.cfg", dir.path())).unwrap();
    assert!(
        grub.contains("linux /boot/vmlinuz") && grub.contains("console=ttyS0"),
        "{grub}"
    );

    // Initramfs: zstd newc with the client as /init, /dev/console, busybox, modules in order.
    let initrd = extract(iso, "/boot/initrd.img", dir.path());
    let cpio = zstd::decode_all(&initrd[..]).expect("initramfs is zstd");
    let mut entries = Vec::new();
    let mut rest = &cpio[..];
    loop {
        let mut r = cpio::newc::Reader::new(rest).unwrap();
        if r.entry().is_trailer() {
            break;
        }
        let e = r.entry();
        let (name, mode, rmaj, rmin, mtime, uid) = (
            e.name().to_string(),
            e.mode(),
            e.rdev_major(),
            e.rdev_minor(),
            e.mtime(),
            e.uid(),
        );
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut r, &mut data).unwrap();
        entries.push((name, mode, rmaj, rmin, mtime, uid, data));
        rest = r.finish().unwrap();
    }
    let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "entries must be sorted");
    assert!(
        entries.iter().all(|e| e.4 == 0 && e.5 == 0),
        "mtime 0 and uid 0"
    );
    let get = |n: &str| {
        entries
            .iter()
            .find(|e| e.0 == n)
            .unwrap_or_else(|| panic!("{n} missing"))
    };
    let console = get("dev/console");
    assert_eq!(
        (console.1 & 0o170000, console.2, console.3),
        (0o020000, 5, 1)
    );
    assert_eq!(get("init").6, b"bin/failback-client");
    assert!(get("bin/busybox").6.len() > 500_000);
    assert!(get("etc/udhcpc.script").1 & 0o111 != 0);
    let list_name = format!("lib/modules/{}/load.list", report.kernel_release);
    let list = String::from_utf8(get(&list_name).6.clone()).unwrap();
    let order: Vec<&str> = list.lines().collect();
    let pos = |m: &str| {
        order
            .iter()
            .position(|l| *l == format!("{m}.ko"))
            .unwrap_or_else(|| panic!("{m} not in {order:?}"))
    };
    for (dep, module) in [
        ("scsi_mod", "sd_mod"),
        ("scsi_mod", "vmw_pvscsi"),
        ("libata", "ata_piix"),
        ("cdrom", "sr_mod"),
        ("virtio", "virtio_pci"),
        ("virtio_ring", "virtio_net"),
        ("nvme_core", "nvme"),
        ("scsi_transport_spi", "mptspi"),
    ] {
        assert!(
            pos(dep) < pos(module),
            "{dep} must load before {module}: {order:?}"
        );
    }
    for m in &order {
        assert!(
            names.contains(&format!("lib/modules/{}/{m}", report.kernel_release).as_str()),
            "{m} listed but not in the archive"
        );
    }
}

#[test]
fn appliance_iso_build_is_reproducible() {
    let (first, _) = product_iso();
    let (second, _) = build_iso("repro", "");
    let a = std::fs::read(first).unwrap();
    let b = std::fs::read(&second).unwrap();
    let _ = std::fs::remove_file(&second);
    assert!(a == b, "two builds from the same inputs differ");
}

fn sample_seed(ca: &str) -> SeedConfig {
    SeedConfig::from_toml(&format!(
        "server_url = \"https://10.0.2.2:8443\"\ntoken = \"fbt_sample\"\nno_prompt = true\nca_cert_pem = \"\"\"\n{ca}\"\"\"\n\n[network]\nmode = \"static\"\nipv4 = {{ address = \"10.0.2.15/24\", gateway = \"10.0.2.2\" }}\ndns = [\"10.0.2.3\"]\n"
    ))
    .unwrap()
}

const CA: &str =
    "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUAAAA\n-----END CERTIFICATE-----\n";

#[test]
fn seed_iso_has_label_and_seed_and_refuses_bad_configs() {
    let dir = tempfile::tempdir().unwrap();
    let seed = sample_seed(CA);
    let iso = seed_iso(dir.path(), &seed);
    let isos = iso.to_str().unwrap();
    assert_eq!(
        failback_iso::seed::read_label(&iso).unwrap().as_deref(),
        Some(SEED_LABEL)
    );
    let pvd = xorriso(&["-indev", isos, "-pvd_info"]);
    assert!(pvd.contains("Volume Id    : FBSEED"), "{pvd}");
    let text = String::from_utf8(extract(&iso, "/seed.toml", dir.path())).unwrap();
    assert_eq!(SeedConfig::from_toml(&text).unwrap(), seed);

    // Refusals name the field, and write nothing.
    let out = dir.path().join("bad.iso");
    let mut no_token = seed.clone();
    no_token.token = None;
    let e = failback_iso::seed::build(&no_token, &out).unwrap_err();
    assert!(e.to_string().contains("`token`"), "{e}");
    let mut bad_gw = seed.clone();
    bad_gw.network.ipv4.as_mut().unwrap().gateway = Some("192.168.1.1".parse().unwrap());
    let e = failback_iso::seed::build(&bad_gw, &out).unwrap_err();
    assert!(e.to_string().contains("network.ipv4.gateway"), "{e}");
    assert!(!out.exists());
    // A partial seed (network only) is allowed when asked for, but not with no_prompt.
    let mut partial = SeedConfig {
        network: seed.network.clone(),
        ..Default::default()
    };
    failback_iso::seed::build_with(&partial, failback_config::seed::Completeness::Partial, &out)
        .unwrap();
    partial.no_prompt = true;
    let e = failback_iso::seed::build_with(
        &partial,
        failback_config::seed::Completeness::Partial,
        &out,
    )
    .unwrap_err();
    assert!(e.to_string().contains("no_prompt"), "{e}");
}

#[test]
fn seed_build_cli_refuses_with_the_field_and_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("seed.toml");
    std::fs::write(
        &cfg,
        "server_url = \"https://dr.example.com:8443\"\nno_prompt = true\n",
    )
    .unwrap();
    let out_iso = dir.path().join("seed.iso");
    let out = Command::new(bin("failback", "failback-orchestrator"))
        .args(["seed", "build", "--config"])
        .arg(&cfg)
        .arg("-o")
        .arg(&out_iso)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("`token`") && stderr.contains("no_prompt"),
        "{stderr}"
    );
    assert!(!out_iso.exists());

    std::fs::write(&cfg, sample_seed(CA).to_toml()).unwrap();
    let out = Command::new(bin("failback", "failback-orchestrator"))
        .args(["seed", "build", "--output", "json", "--config"])
        .arg(&cfg)
        .arg("-o")
        .arg(&out_iso)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["bytes"].as_u64(),
        Some(std::fs::metadata(&out_iso).unwrap().len())
    );
    assert_eq!(
        failback_iso::seed::read_label(&out_iso).unwrap().as_deref(),
        Some(SEED_LABEL)
    );
}
