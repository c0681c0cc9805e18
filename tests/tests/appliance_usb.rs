//! The appliance ISO written to a USB stick: the same file (hybrid MBR/GPT) boots as a disk on
//! BIOS (SeaBIOS: isohdpfx MBR -> ISOLINUX), UEFI and UEFI with Secure Boot (OVMF: GPT EFI
//! system partition -> shim -> GRUB -> kernel), with the seed ISO on a CD-ROM and no appliance CD at all, in QEMU (TCG). The guest
//! must pair with the real DR service, pull a disk from a real agent, and complete the
//! failback the test launches.
//!
//! Safety: the initramfs loads USB host and mass-storage drivers, so the guest sees its boot
//! stick as a SCSI disk. The stick is larger than the source disk and smaller than the real
//! target, so the DR service's best-fit mapping would pick it if it were offered: the test
//! checks the console listed the stick, the inventory the service received does not, and the
//! data landed on the real target. A stick mapped by hand (seed `[[map]]`) is refused by the
//! client's target safety check before any write.

mod appliance_support;

use appliance_support::*;
use failback_config::seed::SeedConfig;
use std::time::Duration;

const SLOW: Duration = Duration::from_secs(600);

/// One QEMU at a time in this binary: TCG on 2 shared cores is slow enough already.
fn qemu_slot() -> std::sync::MutexGuard<'static, ()> {
    static SLOT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SLOT.lock().unwrap_or_else(|p| p.into_inner())
}
const SOURCE_MIB: u64 = 16;
const TARGET_MIB: u64 = 64;

/// Every `client_inventory` object in the instance description.
fn inventory_disks(v: &serde_json::Value) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<(String, u64)>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(disks) = m
                    .get("client_inventory")
                    .and_then(|i| i.get("disks"))
                    .and_then(|d| d.as_array())
                {
                    for d in disks {
                        out.push((
                            d["path"].as_str().unwrap_or_default().to_string(),
                            d["size_bytes"].as_u64().unwrap_or_default(),
                        ));
                    }
                }
                m.values().for_each(|x| walk(x, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(v, &mut out);
    out
}

/// Name of the disk the console's `FAILBACK_DISKS` line lists with `mib` MiB (`sda 19 MiB ...`).
fn disk_with_size(console: &str, mib: u64) -> Option<String> {
    let line = console.lines().find(|l| l.contains("FAILBACK_DISKS"))?;
    let list = line.split("FAILBACK_DISKS").nth(1)?;
    list.split(';').find_map(|entry| {
        let mut w = entry.split_whitespace();
        let name = w.next()?;
        (w.next()? == mib.to_string() && w.next()? == "MiB").then(|| name.to_string())
    })
}

#[test]
fn appliance_boots_from_usb_stick_on_bios_and_uefi_and_never_offers_the_stick() {
    let _slot = qemu_slot();
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (iso, report) = product_iso();
    let stick_mib = report.iso_bytes / (1 << 20);
    assert!(
        stick_mib > SOURCE_MIB && stick_mib < TARGET_MIB,
        "the test needs a stick ({stick_mib} MiB) between the source ({SOURCE_MIB} MiB) and the target ({TARGET_MIB} MiB)"
    );

    // The initramfs drives USB (so the guest sees its stick: what the safety rules are for),
    // EHCI before its UHCI/OHCI companions, as the kernel asks.
    let pos = |m: &str| {
        report
            .modules
            .iter()
            .position(|x| x == m)
            .unwrap_or_else(|| panic!("module {m} not in the initramfs: {:?}", report.modules))
    };
    for m in ["xhci_pci", "usb_storage", "uas", "usbhid", "hid_generic"] {
        pos(m);
    }
    assert!(pos("ehci_pci") < pos("uhci_hcd") && pos("ehci_pci") < pos("ohci_pci"));

    let cases = [
        ("usb-bios-vmware", Firmware::Bios, Hardware::VmwareLike),
        ("usb-uefi-virtio", Firmware::Uefi, Hardware::Virtio),
        (
            "usb-secureboot-vmware",
            Firmware::SecureBoot,
            Hardware::VmwareLike,
        ),
    ];
    for (i, (name, firmware, hardware)) in cases.into_iter().enumerate() {
        let source = d.join(format!("{name}-source.img"));
        gen_disk(
            &source,
            &[
                "--size",
                &format!("{SOURCE_MIB}M"),
                "--seed",
                &(11 + i).to_string(),
            ],
        );
        let target = d.join(format!("{name}-target.img"));
        std::fs::File::create(&target)
            .unwrap()
            .set_len(TARGET_MIB << 20)
            .unwrap();
        let (_agent, id) = spawn_agent(&server, &source, d);
        let seed_dir = d.join(name);
        std::fs::create_dir_all(&seed_dir).unwrap();
        let seed = seed_iso(
            &seed_dir,
            &unattended_seed(&server, pairing_token(&server, &id), &id),
        );
        let mut vm = Vm::start_from(
            &VmConfig {
                name,
                firmware,
                hardware,
                iso,
                seed: Some(&seed),
                disks: vec![(&target, "FBTARGET0")],
                rtc_base: None,
            },
            BootFrom::Usb,
        );
        if firmware == Firmware::Bios {
            // No appliance CD is attached: ISOLINUX can only come from the stick's MBR.
            vm.expect("ISOLINUX", SLOW);
        } else {
            // OVMF names the boot option it started: the USB disk, not a CD.
            vm.expect("USB HARDDRIVE", SLOW);
        }
        if firmware == Firmware::SecureBoot {
            vm.expect("Secure Boot is enabled", SLOW);
        }
        vm.expect("FAILBACK_SEED_FOUND on /dev/sr", SLOW);
        vm.expect("FAILBACK_DISKS", SLOW);
        let console = vm.output();
        let stick = disk_with_size(&console, stick_mib).unwrap_or_else(|| {
            panic!("{name}: the USB stick ({stick_mib} MiB) is not in FAILBACK_DISKS:\n{console}")
        });
        vm.expect("FAILBACK_SERVICE_REACHABLE", SLOW);
        let reachable = vm.started.elapsed().as_secs_f64();
        vm.expect(&format!("paired with recovery instance {id}"), SLOW);
        // Figures for the README; not asserted (timing belongs in `make bench`).
        println!(
            "{name}: service reachable {reachable:.1}s, paired {:.1}s after QEMU start (stick = /dev/{stick})",
            vm.started.elapsed().as_secs_f64()
        );

        let described = wait_ready_for_launch(&server, &vm, &id, SLOW);
        let disks = inventory_disks(&described);
        assert!(
            disks
                .iter()
                .any(|(p, s)| p.starts_with("/dev/") && *s == TARGET_MIB << 20),
            "{name}: the target disk is missing from the inventory: {disks:?}"
        );
        assert!(
            !disks
                .iter()
                .any(|(p, s)| *p == format!("/dev/{stick}") || *s / (1 << 20) == stick_mib),
            "{name}: the boot stick /dev/{stick} was offered to the DR service: {disks:?}"
        );

        admin_cli(&server, &["launch", &id]);
        vm.expect("FAILBACK_COMPLETED", SLOW);
        vm.expect("FAILBACK_DONE", SLOW);
        vm.wait_exit(Duration::from_secs(120));
        let out = vm.output();
        assert!(!out.contains("FAILBACK_FAILED"), "{name}:\n{out}");
        let src = std::fs::read(&source).unwrap();
        let dst = std::fs::read(&target).unwrap();
        assert!(
            dst[..src.len()] == src[..],
            "{name}: restored disk differs from the source:\n{out}"
        );
    }
}

/// The operator maps the volume onto the boot stick by hand (the only disk, so `/dev/sda`):
/// the service accepts the mapping (it cannot know), the client's safety check refuses the
/// target before any write, naming the rule and the device, and the VM powers off.
#[test]
fn stick_mapped_by_hand_is_refused_as_a_target() {
    let _slot = qemu_slot();
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let source = d.join("source.img");
    gen_disk(&source, &["--size", "8M", "--seed", "21"]);
    let (_agent, id) = spawn_agent(&server, &source, d);
    let seed = seed_iso(
        d,
        &SeedConfig {
            mappings: vec![failback_config::seed::DeviceMapping {
                remote: "vol0".into(),
                local: "/dev/sda".into(),
            }],
            ..unattended_seed(&server, pairing_token(&server, &id), &id)
        },
    );
    let mut vm = Vm::start_from(
        &VmConfig {
            name: "usb-bios-stick-mapped",
            firmware: Firmware::Bios,
            hardware: Hardware::VmwareLike,
            iso: &product_iso().0,
            seed: Some(&seed),
            disks: vec![],
            rtc_base: None,
        },
        BootFrom::Usb,
    );
    vm.expect(&format!("paired with recovery instance {id}"), SLOW);
    vm.expect("FAILBACK_FAILED", SLOW);
    vm.wait_exit(Duration::from_secs(120));
    let out = vm.output();
    assert!(
        out.contains("refusing target /dev/sda for remote disk vol0 (rule boot-device)")
            && out.contains("/dev/sda carries the failback appliance boot medium"),
        "the stick was not refused by the boot-device rule:\n{out}"
    );
    assert!(!out.contains("FAILBACK_COMPLETED"), "{out}");
}
