//! The built `failback vcenter ...` against a real vcsim.

#[path = "../../vcenter/tests/common/mod.rs"]
mod common;

use common::Vcsim;
use failback_vcenter::VmSummary;
use std::process::{Command, Output};

fn failback(sim: &Vcsim, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_failback"));
    for k in [
        "VCENTER_HOST",
        "VCENTER_PORT",
        "VCENTER_USER",
        "VCENTER_PASSWORD",
        "VCENTER_CA",
        "VCENTER_THUMBPRINT",
        "VCENTER_DATACENTER",
    ] {
        cmd.env_remove(k);
    }
    cmd.env("GOVC_URL", sim.var("VCSIM_URL"))
        .env("DISABLE_SSL_VERIFICATION", "true")
        .env("VCENTER_DATASTORE", "LocalDS_0")
        .arg("vcenter")
        .args(args)
        .output()
        .expect("run failback")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn vms_json_to_stdout_and_file() {
    let sim = Vcsim::start(&[]);
    let file = sim.dir.path().join("vms.json");
    let out = ok(&failback(
        &sim,
        &["vms", "--output", "json", "-o", file.to_str().unwrap()],
    ));
    let vms: Vec<VmSummary> = serde_json::from_str(&out).expect("stdout is the JSON list");
    assert_eq!(vms.len(), 4);
    assert!(vms
        .iter()
        .all(|v| v.bios_uuid.is_some() && !v.macs.is_empty() && !v.disks.is_empty()));
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        out,
        "file holds the same export"
    );

    let out = ok(&failback(
        &sim,
        &["vms", "--name", "*h0*", "--output", "json"],
    ));
    let vms: Vec<VmSummary> = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = vms.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["DC0_H0_VM0", "DC0_H0_VM1"]);

    let text = ok(&failback(&sim, &["vms"]));
    assert!(
        text.starts_with("NAME") && text.contains("DC0_C0_RP0_VM1"),
        "{text}"
    );
}

#[test]
fn iso_boot_power_snapshot_flow_and_exit_codes() {
    let sim = Vcsim::start(&[]);
    let dir = sim.dir.path();
    let iso = dir.join("appliance.iso");
    std::fs::write(&iso, vec![7u8; 300_000]).unwrap();
    let out = ok(&failback(
        &sim,
        &[
            "upload",
            iso.to_str().unwrap(),
            "--path",
            "isos/appliance.iso",
            "--output",
            "json",
        ],
    ));
    let rep: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rep["bytes"], 300_000);
    assert_eq!(rep["sha256_verified"], true);

    let state = dir.join("att.json");
    ok(&failback(
        &sim,
        &[
            "attach-iso",
            "--vm",
            "DC0_H0_VM1",
            "--iso",
            "[LocalDS_0] isos/appliance.iso",
            "--state",
            state.to_str().unwrap(),
        ],
    ));
    let att: failback_vcenter::CdromAttachment =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert_eq!(att.iso, "[LocalDS_0] isos/appliance.iso");

    let boot = dir.join("boot.json");
    let out = ok(&failback(
        &sim,
        &[
            "boot-order",
            "--vm",
            "DC0_H0_VM1",
            "cdrom-first",
            "--save",
            boot.to_str().unwrap(),
            "--output",
            "json",
        ],
    ));
    let now: failback_vcenter::SavedBootOptions = serde_json::from_str(&out).unwrap();
    assert_eq!(
        now.options.boot_order[0],
        failback_vcenter::BootDevice::Cdrom
    );
    let out = ok(&failback(
        &sim,
        &[
            "boot-order",
            "--vm",
            "DC0_H0_VM1",
            "restore",
            boot.to_str().unwrap(),
            "--output",
            "json",
        ],
    ));
    let restored: failback_vcenter::SavedBootOptions = serde_json::from_str(&out).unwrap();
    let saved: failback_vcenter::SavedBootOptions =
        serde_json::from_str(&std::fs::read_to_string(&boot).unwrap()).unwrap();
    assert_eq!(restored, saved);

    // Already on: vCenter refuses (exit 9), naming the VM.
    let out = failback(&sim, &["power", "--vm", "DC0_H0_VM1", "on"]);
    assert_eq!(out.status.code(), Some(9));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("DC0_H0_VM1") && err.contains("InvalidPowerState"),
        "{err}"
    );
    let out = ok(&failback(
        &sim,
        &["power", "--vm", "DC0_H0_VM1", "off", "--output", "json"],
    ));
    assert!(out.contains("\"poweredOff\""), "{out}");

    ok(&failback(
        &sim,
        &["snapshot", "--vm", "DC0_H0_VM1", "create", "pre-failback"],
    ));
    let out = ok(&failback(
        &sim,
        &["snapshot", "--vm", "DC0_H0_VM1", "list", "--output", "json"],
    ));
    assert!(out.contains("pre-failback"), "{out}");
    ok(&failback(
        &sim,
        &["snapshot", "--vm", "DC0_H0_VM1", "revert", "pre-failback"],
    ));
    ok(&failback(
        &sim,
        &["snapshot", "--vm", "DC0_H0_VM1", "remove", "pre-failback"],
    ));

    ok(&failback(
        &sim,
        &[
            "detach-iso",
            "--vm",
            "DC0_H0_VM1",
            "--remove-added",
            state.to_str().unwrap(),
        ],
    ));
    let out = ok(&failback(
        &sim,
        &["vms", "--name", "DC0_H0_VM1", "--output", "json"],
    ));
    let vms: Vec<VmSummary> = serde_json::from_str(&out).unwrap();
    assert!(vms[0].cdroms.iter().all(|c| c.iso.is_none()), "{vms:?}");

    // Bad inputs: exit codes and messages naming what is wrong.
    let out = failback(
        &sim,
        &[
            "attach-iso",
            "--vm",
            "DC0_H0_VM1",
            "--iso",
            "isos/missing.iso",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("[LocalDS_0] isos/missing.iso"));
    let out = failback(&sim, &["power", "--vm", "no-such-vm", "on"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-vm"));
    let strict = Vcsim::start(&["-username", "admin", "-password", "right"]);
    let out = failback(&strict, &["--vcenter-password", "wrong", "vms"]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("InvalidLogin"));
}
