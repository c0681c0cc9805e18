//! Every operation of the vcenter crate against a real vcsim (one simulator per test).

mod common;

use common::Vcsim;
use failback_vcenter::{
    BootDevice, Client, Error, FaultKind, PowerOp, PowerState, SavedBootOptions, TlsMode,
    TransferProgress, UploadOptions, VmQuery,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const VM: &str = "DC0_H0_VM0";
const DS: &str = "LocalDS_0";

async fn connect(sim: &Vcsim) -> Client {
    Client::connect(sim.config())
        .await
        .expect("connect to vcsim")
}

async fn upload_bytes(client: &Client, sim: &Vcsim, path: &str, data: &[u8]) {
    let local = sim.dir.path().join(path.replace('/', "_"));
    std::fs::write(&local, data).unwrap();
    client
        .upload(
            &local,
            DS,
            path,
            UploadOptions::default(),
            Arc::new(failback_vcenter::NoProgress),
        )
        .await
        .expect("upload");
}

#[tokio::test]
async fn login_about_logout() {
    let sim = Vcsim::start(&[]);
    let client = connect(&sim).await;
    assert_eq!(client.about().api_version, "6.5");
    assert!(
        client.about().full_name.contains("vCenter"),
        "{:?}",
        client.about()
    );
    let cookie = client.session_cookie().expect("session cookie set");
    assert!(
        !cookie.is_empty() && !cookie.starts_with('"'),
        "vcsim cookie is unquoted: {cookie}"
    );
    assert_eq!(client.login_count(), 1);
    client.logout().await.unwrap();
    let err = client.list_vms().await.unwrap_err();
    assert_eq!(
        err.fault_kind(),
        Some(&FaultKind::NotAuthenticated),
        "{err}"
    );
    assert_eq!(
        client.login_count(),
        1,
        "no silent re-login after an explicit logout"
    );
}

#[tokio::test]
async fn wrong_password_is_invalid_login() {
    let sim = Vcsim::start(&["-username", "admin", "-password", "right"]);
    let mut cfg = sim.config();
    cfg.password = "wrong".into();
    let err = Client::connect(cfg).await.unwrap_err();
    assert!(matches!(err, Error::InvalidLogin { .. }), "{err:?}");
    assert_eq!(err.fault_kind(), Some(&FaultKind::InvalidLogin));
    let msg = err.to_string();
    assert!(msg.contains(&sim.url()) && msg.contains("'admin'"), "{msg}");
    assert!(!err.is_transient());
}

#[tokio::test]
async fn list_vms_with_properties() {
    let sim = Vcsim::start(&[]);
    let client = connect(&sim).await;
    let vms = client.vm_summaries().await.unwrap();
    let names: Vec<&str> = vms.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "DC0_C0_RP0_VM0",
            "DC0_C0_RP0_VM1",
            "DC0_H0_VM0",
            "DC0_H0_VM1"
        ]
    );
    for v in &vms {
        assert!(v.moref.starts_with("vm-"), "{v:?}");
        assert_eq!(v.bios_uuid.as_ref().map(String::len), Some(36), "{v:?}");
        assert_eq!(v.instance_uuid.as_ref().map(String::len), Some(36), "{v:?}");
        assert_ne!(v.bios_uuid, v.instance_uuid);
        assert_eq!(v.power_state, PowerState::PoweredOn, "autostart");
        assert!(!v.macs.is_empty(), "{v:?}");
        assert!(v
            .macs
            .iter()
            .all(|m| m.len() == 17 && m == &m.to_lowercase()));
        assert!(
            !v.disks.is_empty() && v.disks.iter().all(|d| d.capacity_bytes > 0),
            "{v:?}"
        );
        assert!(
            v.disks[0].file.as_deref().unwrap_or("").ends_with(".vmdk"),
            "{v:?}"
        );
        assert_eq!(v.cdroms.len(), 1, "{v:?}");
        assert!(v.guest_os.is_some(), "{v:?}");
        assert!(!v.template);
    }
    // The JSON the orchestrator consumes round-trips.
    let json = serde_json::to_string(&vms).unwrap();
    assert!(json.contains("\"power_state\":\"poweredOn\""), "{json}");
    let back: Vec<failback_vcenter::VmSummary> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, vms);
}

#[tokio::test]
async fn find_vm_every_way() {
    let sim = Vcsim::start(&[]);
    let client = connect(&sim).await;
    let vm = client.find_vm(&VmQuery::Name(VM.into())).await.unwrap();
    assert_eq!(vm.summary.name, VM);
    let s = &vm.summary;
    let by_path = client
        .find_vm(&VmQuery::InventoryPath(format!("DC0/vm/{VM}")))
        .await
        .unwrap();
    assert_eq!(by_path.vmref, vm.vmref);
    let bios = s.bios_uuid.clone().unwrap();
    let inst = s.instance_uuid.clone().unwrap();
    for q in [
        VmQuery::BiosUuid(bios.clone()),
        VmQuery::InstanceUuid(inst.clone()),
        VmQuery::Uuid(bios.clone()),
        VmQuery::Uuid(inst.clone()),
        VmQuery::MoRef(s.moref.clone()),
    ] {
        assert_eq!(client.find_vm(&q).await.unwrap().vmref, vm.vmref, "{q}");
    }
    // BIOS UUID is not an instance UUID.
    let err = client
        .find_vm(&VmQuery::InstanceUuid(bios))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::VmNotFound { .. }), "{err}");

    // Model VMs share MACs: ambiguous until we give one a unique MAC.
    let shared = s.macs[0].clone();
    let err = client
        .find_vm(&VmQuery::Mac(shared.clone()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::VmAmbiguous { .. }), "{err}");
    let nic = vm.devices.iter().find(|d| d.mac().is_some()).unwrap();
    let mut el = nic.raw.clone();
    el.set_child(
        failback_vcenter::xml::Element::leaf("addressType", "manual"),
        &["macAddress"],
    );
    el.set_child(
        failback_vcenter::xml::Element::leaf("macAddress", "00:50:56:3F:00:01"),
        &[],
    );
    let spec = format!(
        "<deviceChange><operation>edit</operation>{}</deviceChange>",
        el.to_xml(Some("device"))
    );
    client
        .reconfigure(&vm.vmref, &spec, "set MAC")
        .await
        .unwrap();
    for mac in ["00:50:56:3f:00:01", "00-50-56-3F-00-01"] {
        let found = client.find_vm(&VmQuery::Mac(mac.into())).await.unwrap();
        assert_eq!(found.vmref, vm.vmref, "{mac}");
    }

    // Unknown VM, each way, names what was asked.
    for q in [
        VmQuery::Name("no-such-vm".into()),
        VmQuery::InventoryPath("DC0/vm/no-such-vm".into()),
        VmQuery::Uuid("00000000-0000-0000-0000-000000000000".into()),
        VmQuery::Mac("00:11:22:33:44:55".into()),
        VmQuery::MoRef("vm-999999".into()),
    ] {
        let err = client.find_vm(&q).await.unwrap_err();
        assert!(matches!(err, Error::VmNotFound { .. }), "{q}: {err:?}");
        let msg = err.to_string();
        let needle = match &q {
            VmQuery::Name(n)
            | VmQuery::InventoryPath(n)
            | VmQuery::Uuid(n)
            | VmQuery::Mac(n)
            | VmQuery::MoRef(n) => n.clone(),
            _ => unreachable!(),
        };
        assert!(msg.contains(&needle), "{msg}");
    }
}

struct Recorder(AtomicU64, AtomicU64);
impl TransferProgress for Recorder {
    fn progress(&self, done: u64, total: u64) {
        self.0.store(done, Ordering::SeqCst);
        self.1.store(total, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn upload_verify_and_bad_datastore() {
    let sim = Vcsim::start(&[]);
    let client = connect(&sim).await;
    let data: Vec<u8> = (0..(3 * 1024 * 1024 + 4321u32))
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let local = sim.dir.path().join("appliance.iso");
    std::fs::write(&local, &data).unwrap();
    let rec = Arc::new(Recorder(AtomicU64::new(0), AtomicU64::new(0)));
    let report = client
        .upload(
            &local,
            DS,
            "isos/failback/appliance.iso",
            UploadOptions {
                verify_sha256: true,
            },
            rec.clone(),
        )
        .await
        .unwrap();
    let n = data.len() as u64;
    assert_eq!((report.bytes, report.remote_size), (n, n));
    assert!(report.sha256_verified);
    use sha2::Digest;
    assert_eq!(report.sha256, hex::encode(sha2::Sha256::digest(&data)));
    assert_eq!(
        report.datastore_path,
        "[LocalDS_0] isos/failback/appliance.iso"
    );
    assert_eq!(
        (rec.0.load(Ordering::SeqCst), rec.1.load(Ordering::SeqCst)),
        (n, n)
    );
    // The bytes really are on the datastore.
    let on_disk = std::fs::read(sim.datastore_dir(DS).join("isos/failback/appliance.iso")).unwrap();
    assert!(
        on_disk == data,
        "datastore file differs from the local file"
    );
    assert_eq!(
        client
            .datastore_file_size(DS, "isos/failback/appliance.iso")
            .await
            .unwrap(),
        Some(n)
    );
    assert_eq!(
        client
            .datastore_file_size(DS, "isos/none.iso")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        client
            .datastore_file_sha256(DS, "isos/failback/appliance.iso")
            .await
            .unwrap(),
        report.sha256
    );
    // MakeDirectory with parents; an existing directory is fine.
    client.make_directory("DC0", DS, "a/b/c").await.unwrap();
    client.make_directory("DC0", DS, "a/b/c").await.unwrap();
    assert!(sim.datastore_dir(DS).join("a/b/c").is_dir());
    // A name with a space and unicode survives URL encoding.
    upload_bytes(&client, &sim, "isos/seed één.iso", b"seed").await;
    assert!(sim.datastore_dir(DS).join("isos/seed één.iso").exists());

    // Unknown datastore: named, with the ones that exist.
    let err = client
        .upload(
            &local,
            "NoSuchDS",
            "x.iso",
            UploadOptions::default(),
            Arc::new(failback_vcenter::NoProgress),
        )
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::DatastoreNotFound { .. }), "{err:?}");
    assert!(msg.contains("NoSuchDS") && msg.contains(DS), "{msg}");
    // Missing local file: named.
    let err = client
        .upload(
            &sim.dir.path().join("missing.iso"),
            DS,
            "x.iso",
            UploadOptions::default(),
            Arc::new(failback_vcenter::NoProgress),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("missing.iso"), "{err}");
}

#[tokio::test]
async fn attach_detach_remove_cdroms() {
    let sim = Vcsim::start(&[]);
    let client = connect(&sim).await;
    let vm = client
        .find_vm(&VmQuery::Name(VM.into()))
        .await
        .unwrap()
        .vmref;
    for i in 0..7 {
        upload_bytes(
            &client,
            &sim,
            &format!("isos/{i}.iso"),
            format!("iso {i}").as_bytes(),
        )
        .await;
    }

    // Missing ISO and unknown datastore are refused before touching the VM.
    let err = client
        .attach_iso(&vm, DS, "isos/missing.iso")
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::DatastoreFileNotFound { .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("[LocalDS_0] isos/missing.iso"),
        "{err}"
    );
    let err = client
        .attach_iso(&vm, "NoSuchDS", "isos/0.iso")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DatastoreNotFound { .. }), "{err:?}");

    // 1: the model VM's CD-ROM holds no ISO: reused.
    let a0 = client.attach_iso(&vm, DS, "isos/0.iso").await.unwrap();
    assert!(
        !a0.added_cdrom && a0.added_controller_key.is_none(),
        "{a0:?}"
    );
    let again = client.attach_iso(&vm, DS, "isos/0.iso").await.unwrap();
    assert_eq!(
        again.device_key, a0.device_key,
        "same ISO twice is idempotent"
    );
    // 2..5: IDE 200 and 201, two units each.
    let mut ide = Vec::new();
    for i in 1..5 {
        let a = client
            .attach_iso(&vm, DS, &format!("isos/{i}.iso"))
            .await
            .unwrap();
        assert!(a.added_cdrom && a.added_controller_key.is_none(), "{a:?}");
        ide.push(a);
    }
    let v = client.vm(&vm.moref).await.unwrap();
    let mut slots: Vec<(i32, i32)> = ide
        .iter()
        .map(|a| {
            let d = v.device(a.device_key).unwrap();
            (d.controller_key.unwrap(), d.unit_number.unwrap())
        })
        .collect();
    slots.sort();
    assert_eq!(slots, [(200, 0), (200, 1), (201, 0), (201, 1)]);
    // 6: IDE full: a SATA controller is added for it.
    let sata = client.attach_iso(&vm, DS, "isos/5.iso").await.unwrap();
    assert!(sata.added_cdrom, "{sata:?}");
    let ck = sata.added_controller_key.expect("SATA controller added");
    let v = client.vm(&vm.moref).await.unwrap();
    assert_eq!(v.device(ck).unwrap().kind, "VirtualAHCIController");
    let d = v.device(sata.device_key).unwrap();
    assert_eq!((d.controller_key, d.unit_number), (Some(ck), Some(0)));
    let cd = v
        .summary
        .cdroms
        .iter()
        .find(|c| c.key == sata.device_key)
        .unwrap();
    assert_eq!(cd.iso.as_deref(), Some("[LocalDS_0] isos/5.iso"));
    assert!(cd.start_connected);
    // 7: the SATA controller has room: no second controller.
    let sata2 = client.attach_iso(&vm, DS, "isos/6.iso").await.unwrap();
    assert_eq!(sata2.added_controller_key, None);
    assert_eq!(
        client
            .vm(&vm.moref)
            .await
            .unwrap()
            .device(sata2.device_key)
            .unwrap()
            .controller_key,
        Some(ck)
    );

    // Detach one ISO: client device backing, disconnected; the drive stays.
    let keys = client
        .detach_iso(&vm, Some("[LocalDS_0] isos/1.iso"))
        .await
        .unwrap();
    assert_eq!(keys, [ide[0].device_key]);
    let v = client.vm(&vm.moref).await.unwrap();
    let d = v.device(ide[0].device_key).unwrap();
    assert_eq!(
        d.raw.child("backing").unwrap().type_name(),
        "VirtualCdromRemotePassthroughBackingInfo"
    );
    assert_eq!(
        d.raw.path(&["connectable", "startConnected"]).unwrap().text,
        "false"
    );
    assert_eq!(
        d.raw.path(&["connectable", "connected"]).unwrap().text,
        "false"
    );
    let err = client
        .detach_iso(&vm, Some("[LocalDS_0] isos/1.iso"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains(VM), "{err}");

    // Remove what we added; the reused drive is only detached.
    client.remove_added(&sata2).await.unwrap();
    client.remove_added(&sata).await.unwrap();
    for a in &ide {
        client.remove_added(a).await.unwrap();
    }
    client.remove_added(&a0).await.unwrap();
    client.remove_added(&a0).await.unwrap(); // idempotent
    let v = client.vm(&vm.moref).await.unwrap();
    assert!(v.device(ck).is_none(), "added SATA controller removed");
    assert_eq!(v.summary.cdroms.len(), 1, "{:?}", v.summary.cdroms);
    assert_eq!(v.summary.cdroms[0].key, a0.device_key);
    assert_eq!(v.summary.cdroms[0].iso, None);
    // The serialised attachment (orchestrator state) round-trips.
    let j = serde_json::to_string(&sata).unwrap();
    assert_eq!(
        serde_json::from_str::<failback_vcenter::CdromAttachment>(&j).unwrap(),
        sata
    );
}

#[tokio::test]
async fn no_free_cdrom_and_no_room_for_a_controller() {
    let sim = Vcsim::start(&[]);
    let client = connect(&sim).await;
    let vm = client.find_vm(&VmQuery::Name(VM.into())).await.unwrap();
    upload_bytes(&client, &sim, "isos/full.iso", b"x").await;
    upload_bytes(&client, &sim, "isos/new.iso", b"y").await;
    // Fill the VM: the model CD-ROM gets an ISO, both IDE controllers are full, and four
    // full SATA controllers (the maximum) are added.
    let iso = "<backing xsi:type=\"VirtualCdromIsoBackingInfo\"><fileName>[LocalDS_0] isos/full.iso</fileName></backing>";
    let cd = |key: i32, ctrl: i32, unit: i32| {
        format!("<deviceChange><operation>add</operation><device xsi:type=\"VirtualCdrom\"><key>{key}</key>{iso}<controllerKey>{ctrl}</controllerKey><unitNumber>{unit}</unitNumber></device></deviceChange>")
    };
    let mut spec = String::new();
    let model_cd = vm.devices.iter().find(|d| d.is_cdrom()).unwrap();
    let mut el = model_cd.raw.clone();
    el.set_child(
        failback_vcenter::xml::parse(&format!(
            "<w xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\">{iso}</w>"
        ))
        .unwrap()
        .children
        .remove(0),
        &["connectable", "controllerKey"],
    );
    spec.push_str(&format!(
        "<deviceChange><operation>edit</operation>{}</deviceChange>",
        el.to_xml(Some("device"))
    ));
    let mut key = -1000;
    for (ctrl, unit) in [(200, 0), (200, 1), (201, 0), (201, 1)] {
        spec.push_str(&cd(key, ctrl, unit));
        key -= 1;
    }
    for bus in 0..4 {
        let ck = -300 - bus;
        spec.push_str(&format!("<deviceChange><operation>add</operation><device xsi:type=\"VirtualAHCIController\"><key>{ck}</key><busNumber>{bus}</busNumber></device></deviceChange>"));
        for unit in 0..30 {
            spec.push_str(&cd(key, ck, unit));
            key -= 1;
        }
    }
    client
        .reconfigure(&vm.vmref, &spec, "fill CD-ROM slots")
        .await
        .unwrap();
    let full = client.vm(&vm.vmref.moref).await.unwrap();
    assert_eq!(
        full.devices
            .iter()
            .filter(|d| d.is_sata_controller())
            .count(),
        4
    );
    assert_eq!(full.summary.cdroms.len(), 1 + 4 + 120);

    let err = client
        .attach_iso(&vm.vmref, DS, "isos/new.iso")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NoCdromSlot { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(VM) && msg.contains("SATA"), "{msg}");
    // Nothing changed.
    let after = client.vm(&vm.vmref.moref).await.unwrap();
    assert_eq!(after.devices.len(), full.devices.len());
}

#[tokio::test]
async fn boot_options_cdrom_first_and_exact_restore() {
    let sim = Vcsim::start(&[]);
    let client = connect(&sim).await;
    let vm = client.find_vm(&VmQuery::Name(VM.into())).await.unwrap();
    let disk = vm.summary.disks[0].key;
    let nic = vm.devices.iter().find(|d| d.mac().is_some()).unwrap().key;
    // A non-trivial starting point: every field set.
    let original = format!(
        "<bootOptions><bootDelay>1500</bootDelay><enterBIOSSetup>false</enterBIOSSetup><efiSecureBootEnabled>false</efiSecureBootEnabled><bootRetryEnabled>true</bootRetryEnabled><bootRetryDelay>20000</bootRetryDelay>\
         <bootOrder xsi:type=\"VirtualMachineBootOptionsBootableDiskDevice\"><deviceKey>{disk}</deviceKey></bootOrder>\
         <bootOrder xsi:type=\"VirtualMachineBootOptionsBootableEthernetDevice\"><deviceKey>{nic}</deviceKey></bootOrder>\
         <networkBootProtocol>ipv4</networkBootProtocol></bootOptions>"
    );
    client
        .reconfigure(&vm.vmref, &original, "set boot options")
        .await
        .unwrap();

    let saved = client.set_boot_cdrom_first(&vm.vmref).await.unwrap();
    assert_eq!(saved.options.boot_delay_ms, Some(1500));
    assert_eq!(saved.options.boot_retry_enabled, Some(true));
    assert_eq!(
        saved.options.boot_order,
        [
            BootDevice::Disk { device_key: disk },
            BootDevice::Ethernet { device_key: nic }
        ]
    );
    let now = client.boot_options(&vm.vmref).await.unwrap();
    assert_eq!(
        now.options.boot_order,
        [
            BootDevice::Cdrom,
            BootDevice::Disk { device_key: disk },
            BootDevice::Ethernet { device_key: nic }
        ]
    );
    // Only the order changed.
    let mut expect = saved.options.clone();
    expect.boot_order = now.options.boot_order.clone();
    assert_eq!(now.options, expect);
    // Setting it twice keeps one CD-ROM entry.
    client.set_boot_cdrom_first(&vm.vmref).await.unwrap();
    assert_eq!(
        client.boot_options(&vm.vmref).await.unwrap().options,
        now.options
    );

    // Through a file, as the CLI does, then restore: the XML read back is identical.
    let file = sim.dir.path().join("boot.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&saved).unwrap()).unwrap();
    let loaded: SavedBootOptions = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    client
        .restore_boot_options(&vm.vmref, &loaded)
        .await
        .unwrap();
    let restored = client.boot_options(&vm.vmref).await.unwrap();
    assert_eq!(restored.xml, saved.xml, "boot options restored exactly");
    assert_eq!(restored.options, saved.options);
    assert_eq!(restored, saved);

    // A VM with empty boot options: CD-ROM then its disks; restore gives empty again.
    let other = client
        .find_vm(&VmQuery::Name("DC0_H0_VM1".into()))
        .await
        .unwrap();
    let empty = client.set_boot_cdrom_first(&other.vmref).await.unwrap();
    assert!(empty.options.boot_order.is_empty(), "{empty:?}");
    let set = client
        .boot_options(&other.vmref)
        .await
        .unwrap()
        .options
        .boot_order;
    assert_eq!(set[0], BootDevice::Cdrom);
    assert_eq!(
        set[1..],
        other
            .summary
            .disks
            .iter()
            .map(|d| BootDevice::Disk { device_key: d.key })
            .collect::<Vec<_>>()[..]
    );
    client
        .restore_boot_options(&other.vmref, &empty)
        .await
        .unwrap();
    assert_eq!(client.boot_options(&other.vmref).await.unwrap(), empty);

    // Saved options of one VM are refused for another.
    let err = client
        .restore_boot_options(&other.vmref, &saved)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(VM) && err.to_string().contains("DC0_H0_VM1"),
        "{err}"
    );
}

#[tokio::test]
async fn power_operations_and_invalid_power_state() {
    let sim = Vcsim::start(&[]);
    let client = connect(&sim).await;
    let vm = client
        .find_vm(&VmQuery::Name(VM.into()))
        .await
        .unwrap()
        .vmref;
    assert_eq!(
        client.power_state(&vm).await.unwrap(),
        PowerState::PoweredOn
    );
    let err = client.power(&vm, PowerOp::On).await.unwrap_err();
    assert!(matches!(err, Error::TaskFailed { .. }), "{err:?}");
    assert!(
        matches!(err.fault_kind(), Some(FaultKind::InvalidPowerState { existing: Some(e), .. }) if e == "poweredOn"),
        "{err:?}"
    );
    assert!(err.to_string().contains(VM), "{err}");
    client.power(&vm, PowerOp::Reset).await.unwrap();
    client.power(&vm, PowerOp::Off).await.unwrap();
    assert_eq!(
        client.power_state(&vm).await.unwrap(),
        PowerState::PoweredOff
    );
    let err = client.power(&vm, PowerOp::Off).await.unwrap_err();
    assert!(
        matches!(err.fault_kind(), Some(FaultKind::InvalidPowerState { .. })),
        "{err:?}"
    );
    let err = client.power(&vm, PowerOp::Reset).await.unwrap_err();
    assert!(
        matches!(err.fault_kind(), Some(FaultKind::InvalidPowerState { .. })),
        "{err:?}"
    );
    client.power(&vm, PowerOp::On).await.unwrap();
    assert_eq!(
        client.power_state(&vm).await.unwrap(),
        PowerState::PoweredOn
    );

    // Tools are not running in the model VMs: guest shutdown refused, fallback powers off.
    let err = client
        .shutdown_guest(&vm, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::ToolsNotRunning { .. }) && err.to_string().contains(VM),
        "{err:?}"
    );
    assert!(!client
        .shutdown_or_power_off(&vm, Duration::from_secs(5))
        .await
        .unwrap());
    assert_eq!(
        client.power_state(&vm).await.unwrap(),
        PowerState::PoweredOff
    );

    // An object that does not exist: ManagedObjectNotFound, named.
    let ghost = failback_vcenter::VmRef {
        moref: failback_vcenter::MoRef::new("VirtualMachine", "vm-424242"),
        name: "ghost".into(),
    };
    let err = client.power(&ghost, PowerOp::On).await.unwrap_err();
    assert!(
        matches!(
            err.fault_kind(),
            Some(FaultKind::ManagedObjectNotFound { .. })
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("vm-424242"), "{err}");
}

#[tokio::test]
async fn guest_shutdown_when_tools_run() {
    let sim = Vcsim::start(&["-tools-running"]);
    let client = connect(&sim).await;
    let vm = client.find_vm(&VmQuery::Name(VM.into())).await.unwrap();
    assert!(vm.summary.tools_running);
    client
        .shutdown_guest(&vm.vmref, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        client.power_state(&vm.vmref).await.unwrap(),
        PowerState::PoweredOff
    );
    let other = client
        .find_vm(&VmQuery::Name("DC0_H0_VM1".into()))
        .await
        .unwrap()
        .vmref;
    assert!(client
        .shutdown_or_power_off(&other, Duration::from_secs(60))
        .await
        .unwrap());
}

#[tokio::test]
async fn snapshots_create_revert_remove() {
    let sim = Vcsim::start(&[]);
    let client = connect(&sim).await;
    let vm = client
        .find_vm(&VmQuery::Name(VM.into()))
        .await
        .unwrap()
        .vmref;
    let s1 = client
        .create_snapshot(&vm, "pre-failback", "protective", false, false)
        .await
        .unwrap();
    assert_eq!(s1.kind, "VirtualMachineSnapshot");
    client
        .create_snapshot(&vm, "second", "", false, false)
        .await
        .unwrap();
    let all = client.snapshots(&vm).await.unwrap();
    let names: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["pre-failback", "second"]);
    assert_eq!(all[1].path, ["pre-failback", "second"]);
    assert!(all[1].current && !all[0].current);
    assert_eq!(all[0].description, "protective");

    client.revert_snapshot(&vm, "pre-failback").await.unwrap();
    let all = client.snapshots(&vm).await.unwrap();
    assert!(
        all.iter()
            .find(|s| s.name == "pre-failback")
            .unwrap()
            .current,
        "{all:?}"
    );

    client.remove_snapshot(&vm, "second", false).await.unwrap();
    client
        .remove_snapshot(&vm, "pre-failback", false)
        .await
        .unwrap();
    assert!(client.snapshots(&vm).await.unwrap().is_empty());
    let err = client
        .revert_snapshot(&vm, "pre-failback")
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::SnapshotNotFound { .. }) && err.to_string().contains(VM),
        "{err:?}"
    );
}

#[tokio::test]
async fn session_expired_mid_run_relogs_in_once() {
    let sim = Vcsim::start(&["-session-idle-timeout", "3s"]);
    let client = connect(&sim).await;
    assert_eq!(client.vm_summaries().await.unwrap().len(), 4);
    let before = client.session_cookie().unwrap();
    let logins = client.login_count();
    // Idle long enough for vcsim to drop the session (it checks every 3 s, so an idle
    // session is gone after at most 6 s). Generous margins: CI has 2 slow cores.
    tokio::time::sleep(Duration::from_secs(9)).await;
    let vms = client.vm_summaries().await.unwrap();
    assert_eq!(vms.len(), 4);
    assert_eq!(client.login_count(), logins + 1, "exactly one re-login");
    assert_ne!(client.session_cookie().unwrap(), before, "a new session");
}

#[tokio::test]
async fn tls_verify_ca_file_thumbprint_insecure() {
    // A private CA and a server certificate for 127.0.0.1, given to vcsim.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test vCenter CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let srv_key = rcgen::KeyPair::generate().unwrap();
    let mut srv_params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    srv_params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let srv = srv_params.signed_by(&srv_key, &ca, &ca_key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ca_pem, cert_pem, key_pem) = (
        dir.path().join("ca.pem"),
        dir.path().join("srv.pem"),
        dir.path().join("srv-key.pem"),
    );
    std::fs::write(&ca_pem, ca.pem()).unwrap();
    std::fs::write(&cert_pem, srv.pem()).unwrap();
    std::fs::write(&key_pem, srv_key.serialize_pem()).unwrap();
    let sim = Vcsim::start(&[
        "-tlscert",
        cert_pem.to_str().unwrap(),
        "-tlskey",
        key_pem.to_str().unwrap(),
    ]);

    let with = |tls: TlsMode| {
        let mut c = sim.config();
        c.tls = tls;
        c
    };
    // Default: verify against public roots: refused, and the error names the URL.
    let err = Client::connect(with(TlsMode::Verify)).await.unwrap_err();
    assert!(
        matches!(err, Error::Http { .. }) && err.to_string().contains(&sim.url()),
        "{err:?}"
    );
    // Our CA: accepted.
    Client::connect(with(TlsMode::CaFile(ca_pem.clone())))
        .await
        .unwrap();
    // Another CA: refused.
    let other_key = rcgen::KeyPair::generate().unwrap();
    let mut other = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    other.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other_pem = dir.path().join("other.pem");
    std::fs::write(&other_pem, other.self_signed(&other_key).unwrap().pem()).unwrap();
    let err = Client::connect(with(TlsMode::CaFile(other_pem)))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("not signed by a trusted CA"),
        "{err}"
    );
    // Thumbprint pinning: the right SHA-256 (colon form), then a wrong one.
    let tp = failback_vcenter::tls::thumbprint_of(srv.der());
    let colons = tp
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap().to_uppercase())
        .collect::<Vec<_>>()
        .join(":");
    Client::connect(with(TlsMode::Thumbprint(colons)))
        .await
        .unwrap();
    let err = Client::connect(with(TlsMode::Thumbprint("00".repeat(32))))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Http { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains(&format!("SHA-256 {tp} does not match pinned thumbprint")),
        "{err}"
    );
    // Unreadable CA file: named.
    let err = Client::connect(with(TlsMode::CaFile(dir.path().join("nope.pem"))))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("nope.pem"), "{err}");
    // Explicit insecure switch: accepted.
    Client::connect(with(TlsMode::Insecure)).await.unwrap();
}

/// vcsim's built-in certificate (a self-signed CA certificate with a 1024-bit RSA key) is
/// refused both ways, and the error says why instead of "error sending request for url".
#[tokio::test]
async fn vcsim_builtin_certificate_errors_name_the_cause() {
    let sim = Vcsim::start(&[]);
    let cert = std::path::PathBuf::from(sim.var("VCSIM_CERT"));
    let with = |tls: TlsMode| {
        let mut c = sim.config();
        c.tls = tls;
        c
    };
    let err = Client::connect(with(TlsMode::CaFile(cert.clone())))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("is a CA certificate used as the server's own"),
        "{err}"
    );
    let pem = std::fs::read(&cert).unwrap();
    let der = rustls::pki_types::pem::PemObject::from_pem_slice(&pem)
        .map(|c: rustls::pki_types::CertificateDer<'_>| c.to_vec())
        .unwrap();
    let tp = failback_vcenter::tls::thumbprint_of(&der);
    let err = Client::connect(with(TlsMode::Thumbprint(tp)))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("1024-bit RSA key"), "{err}");
}

#[tokio::test]
async fn several_datacenters_need_a_choice() {
    let sim = Vcsim::start(&["-dc", "2"]);
    let client = connect(&sim).await;
    assert_eq!(client.datacenters().await.unwrap(), ["DC0", "DC1"]);
    let local = sim.dir.path().join("x.iso");
    std::fs::write(&local, b"x").unwrap();
    let none = Arc::new(failback_vcenter::NoProgress);
    let err = client
        .upload(&local, DS, "x.iso", UploadOptions::default(), none.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Datacenter { .. }), "{err:?}");
    assert!(
        err.to_string().contains("DC1") && err.to_string().contains("--datacenter"),
        "{err}"
    );

    let mut cfg = sim.config();
    cfg.datacenter = Some("DC1".into());
    let dc1 = Client::connect(cfg.clone()).await.unwrap();
    let rep = dc1
        .upload(
            &local,
            DS,
            "isos/x.iso",
            UploadOptions {
                verify_sha256: true,
            },
            none.clone(),
        )
        .await
        .unwrap();
    assert!(rep.url.contains("dcPath=DC1"), "{}", rep.url);
    cfg.datacenter = Some("DC9".into());
    let dc9 = Client::connect(cfg).await.unwrap();
    let err = dc9
        .upload(&local, DS, "x.iso", UploadOptions::default(), none)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("'DC9' not found"), "{err}");
}
