//! Boots the appliance ISO in QEMU (TCG) on BIOS (SeaBIOS), UEFI (OVMF) and UEFI with Secure
//! Boot (Microsoft keys), with VMware-like (pvscsi + vmxnet3) and virtio hardware, against a
//! real DR service on the host (10.0.2.2 from the guest): seed found by label, modules loaded,
//! DHCP, service reached over TLS pinned to the seed's CA.
//!
//! The ISO here stops after the service probe (`failback.stop_after=probe`) and powers off;
//! pairing, the disk transfer and the boot without a seed (console prompts answered over the
//! serial port) are covered by appliance_failback.rs.

mod appliance_support;

use appliance_support::*;
use failback_config::seed::{AfterCompletion, SeedConfig};
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(240);

fn probe_iso() -> &'static std::path::PathBuf {
    static ISO: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    ISO.get_or_init(|| build_iso("probe", "failback.stop_after=probe").0)
}

#[test]
fn appliance_boots_bios_uefi_and_secure_boot() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let seed = SeedConfig {
        server_url: Some(server.guest_url()),
        token: Some("fbt_probe_only".into()),
        ca_cert_pem: Some(server.ca_pem()),
        no_prompt: true,
        after: AfterCompletion::Poweroff,
        ..Default::default()
    };
    let seed_iso = seed_iso(dir.path(), &seed);
    let disk = dir.path().join("disk0.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();

    let cases = [
        (
            "bios-vmware",
            Firmware::Bios,
            Hardware::VmwareLike,
            "vmxnet3",
        ),
        (
            "uefi-virtio",
            Firmware::Uefi,
            Hardware::Virtio,
            "virtio_net",
        ),
        (
            "secureboot-vmware",
            Firmware::SecureBoot,
            Hardware::VmwareLike,
            "vmxnet3",
        ),
    ];
    for (name, firmware, hardware, driver) in cases {
        let mut vm = Vm::start(&VmConfig {
            name,
            firmware,
            hardware,
            iso: probe_iso(),
            seed: Some(&seed_iso),
            disks: vec![(&disk, "DISK0")],
            // BIOS case: the VM's clock is years off; the appliance must fix it from the
            // service's Date header before TLS-verifying anything else.
            rtc_base: (firmware == Firmware::Bios).then_some("2020-01-01"),
        });
        if firmware == Firmware::SecureBoot {
            vm.expect("Secure Boot is enabled", BOOT);
        }
        vm.expect("FAILBACK_SEED_FOUND on /dev/sr", BOOT);
        vm.expect("FAILBACK_NETWORK_UP eth0 (", BOOT);
        // The console line may arrive in pieces: wait for its end before reading it.
        vm.expect("; dns ", BOOT);
        assert!(
            vm.output().contains(&format!(", {driver}): DHCP")),
            "{name}: NIC driver {driver} expected:\n{}",
            vm.output()
        );
        vm.expect(
            &format!("FAILBACK_SERVICE_REACHABLE {}", server.guest_url()),
            BOOT,
        );
        vm.expect("ejected the appliance CD", BOOT);
        if firmware == Firmware::Bios {
            assert!(
                vm.output().contains("WARNING: clock is off by"),
                "{name}: clock not corrected:\n{}",
                vm.output()
            );
        }
        vm.wait_exit(Duration::from_secs(60));
        let out = vm.output();
        assert!(
            !out.contains("WARNING: module"),
            "{name}: a module failed to load:\n{out}"
        );
        assert!(!out.contains("FAILBACK_FAILED"), "{name}:\n{out}");
        // The kernel saw the pvscsi / virtio-scsi disk.
        assert!(
            out.contains("sd 0:0:0:0") || out.contains("[sda]") || out.contains("sda"),
            "{name}: no disk seen:\n{out}"
        );
    }
}
