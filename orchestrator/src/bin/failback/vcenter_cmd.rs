//! `failback vcenter ...`: VMs, datastore upload, ISOs, boot order, power, snapshots.
//! Thin: parses, calls `failback_vcenter`, prints text or JSON, maps errors to exit codes.

use clap::{Args, Subcommand, ValueEnum};
use failback_orchestrator::vcenter_args::{exit, exit_code, VcenterArgs};
use failback_vcenter::{
    self as vc, Client, PowerOp, SavedBootOptions, TransferProgress, UploadOptions, VmQuery,
};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    #[default]
    Text,
    Json,
}

#[derive(Args, Debug)]
pub struct VcenterCmd {
    #[command(flatten)]
    conn: VcenterArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text, global = true)]
    output: Output,
    #[command(subcommand)]
    action: Action,
}

/// Which VM (exactly one of these).
#[derive(Args, Debug, Clone)]
#[group(required = true, multiple = false)]
struct VmSel {
    /// VM name (exact).
    #[arg(long)]
    vm: Option<String>,
    /// Inventory path, e.g. DC0/vm/web01.
    #[arg(long)]
    vm_path: Option<String>,
    /// BIOS or instance UUID.
    #[arg(long)]
    uuid: Option<String>,
    /// MAC address of any NIC (case-insensitive).
    #[arg(long)]
    mac: Option<String>,
    /// Managed object id, e.g. vm-63.
    #[arg(long)]
    moref: Option<String>,
}

impl VmSel {
    fn query(&self) -> VmQuery {
        if let Some(v) = &self.vm {
            VmQuery::Name(v.clone())
        } else if let Some(v) = &self.vm_path {
            VmQuery::InventoryPath(v.clone())
        } else if let Some(v) = &self.uuid {
            VmQuery::Uuid(v.clone())
        } else if let Some(v) = &self.mac {
            VmQuery::Mac(v.clone())
        } else {
            VmQuery::MoRef(self.moref.clone().unwrap_or_default())
        }
    }
}

#[derive(Subcommand, Debug)]
enum Action {
    /// List VMs: name, UUIDs, MACs, disks, power (DRSFA's "find servers in vCenter").
    Vms {
        /// Only names matching this (case-insensitive; `*` and `?` are wildcards, else substring).
        #[arg(long)]
        name: Option<String>,
        /// Also write the list to this file (same format as --output).
        #[arg(short = 'o', long = "out")]
        file: Option<PathBuf>,
    },
    /// List datastores.
    Datastores,
    /// Upload a file to the datastore (streamed), then check its size and SHA-256.
    Upload {
        /// Local file.
        local: PathBuf,
        /// Path on the datastore, e.g. isos/failback.iso.
        #[arg(long)]
        path: String,
        /// Skip reading the file back to compare SHA-256 (the size is always checked).
        #[arg(long)]
        no_verify: bool,
    },
    /// Attach an ISO on the datastore to the VM's CD-ROM (reused or added), connected at power on.
    AttachIso {
        #[command(flatten)]
        vm: VmSel,
        /// Path on the datastore (e.g. isos/failback.iso) or `[datastore] path`.
        #[arg(long)]
        iso: String,
        /// Write what was done, including the reused drive exactly as it was (backing,
        /// connected flags), to undo with `detach-iso --remove-added FILE`.
        #[arg(long)]
        state: Option<PathBuf>,
    },
    /// Undo an `attach-iso --state FILE` exactly (--remove-added FILE), or detach ISOs
    /// (empty client-device backing, disconnected: the drive's earlier backing is unknown).
    DetachIso {
        #[command(flatten)]
        vm: VmSel,
        /// Only this ISO (path or `[datastore] path`); default every ISO.
        #[arg(long)]
        iso: Option<String>,
        /// Undo an `attach-iso --state FILE`: remove the CD-ROM/controller it added, or put
        /// the reused drive back exactly as it was.
        #[arg(long, conflicts_with = "iso")]
        remove_added: Option<PathBuf>,
    },
    /// Show the boot order, set CD-ROM first (saving the old options), or restore them.
    BootOrder {
        #[command(flatten)]
        vm: VmSel,
        #[command(subcommand)]
        action: BootAction,
    },
    /// Power on / off (hard) / reset / guest shutdown.
    Power {
        #[command(flatten)]
        vm: VmSel,
        #[arg(value_enum)]
        op: PowerArg,
        /// For shutdown: seconds to wait for the guest to power off.
        #[arg(long, default_value_t = 300)]
        wait: u64,
    },
    /// Snapshots: create, revert, remove, list.
    Snapshot {
        #[command(flatten)]
        vm: VmSel,
        #[command(subcommand)]
        action: SnapAction,
    },
}

#[derive(Subcommand, Debug)]
enum BootAction {
    /// Print the complete boot options.
    Show,
    /// Put the CD-ROM first; the previous options are written to --save FILE.
    CdromFirst {
        #[arg(long)]
        save: PathBuf,
    },
    /// Restore options saved by `cdrom-first --save FILE`, exactly.
    Restore { file: PathBuf },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PowerArg {
    On,
    Off,
    Reset,
    /// Guest OS shutdown (needs VMware Tools running).
    Shutdown,
}

#[derive(Subcommand, Debug)]
enum SnapAction {
    Create {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
        /// Include memory.
        #[arg(long)]
        memory: bool,
        /// Quiesce the guest file systems (needs tools).
        #[arg(long)]
        quiesce: bool,
    },
    Revert {
        name: String,
    },
    Remove {
        name: String,
        #[arg(long)]
        remove_children: bool,
    },
    List,
}

/// Failure of a command: message and exit code.
struct Failure(u8, String);

impl From<vc::Error> for Failure {
    fn from(e: vc::Error) -> Self {
        Failure(exit_code(&e), e.to_string())
    }
}

pub async fn run(cmd: VcenterCmd) -> ExitCode {
    match run_inner(cmd).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(code)
        }
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<String, Failure> {
    serde_json::to_string_pretty(v).map_err(|e| Failure(1, format!("JSON: {e}")))
}

fn write_file(path: &Path, data: &str) -> Result<(), Failure> {
    std::fs::write(path, data)
        .map_err(|e| Failure(exit::USAGE, format!("write {}: {e}", path.display())))
}

/// Case-insensitive match: wildcards `*`/`?` when present, else substring.
fn name_matches(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.to_lowercase(), name.to_lowercase());
    if !p.contains(['*', '?']) {
        return n.contains(&p);
    }
    fn glob(p: &[char], n: &[char]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some('*'), _) => glob(&p[1..], n) || (!n.is_empty() && glob(p, &n[1..])),
            (Some('?'), Some(_)) => glob(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => glob(&p[1..], &n[1..]),
            _ => false,
        }
    }
    let (p, n): (Vec<char>, Vec<char>) = (p.chars().collect(), n.chars().collect());
    glob(&p, &n)
}

/// `[ds] path` -> (ds, path); a bare path uses the configured datastore.
fn split_iso<'a>(conn: &'a VcenterArgs, iso: &'a str) -> Result<(String, String), Failure> {
    if let Some(rest) = iso.strip_prefix('[') {
        if let Some((ds, path)) = rest.split_once(']') {
            return Ok((ds.to_string(), path.trim().to_string()));
        }
    }
    Ok((conn.datastore()?.to_string(), iso.to_string()))
}

fn gib(b: u64) -> String {
    // Display only: precision loss above 2^53 bytes is irrelevant.
    #[allow(clippy::cast_precision_loss)]
    let g = b as f64 / (1u64 << 30) as f64;
    format!("{g:.1}G")
}

fn vms_text(vms: &[vc::VmSummary]) -> String {
    let mut out = format!(
        "{:<24} {:<10} {:<36} {:<36} {:<20} {}\n",
        "NAME", "POWER", "BIOS UUID", "INSTANCE UUID", "MACS", "DISKS"
    );
    for v in vms {
        out.push_str(&format!(
            "{:<24} {:<10} {:<36} {:<36} {:<20} {}\n",
            v.name,
            v.power_state.to_string(),
            v.bios_uuid.as_deref().unwrap_or("-"),
            v.instance_uuid.as_deref().unwrap_or("-"),
            v.macs.join(","),
            v.disks
                .iter()
                .map(|d| gib(d.capacity_bytes))
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    out
}

/// Upload progress: a bar on a terminal, else a line per 10% (JSON lines with --output json).
struct CliProgress {
    bar: Option<indicatif::ProgressBar>,
    json: bool,
    last_decile: Mutex<u64>,
}

impl TransferProgress for CliProgress {
    fn progress(&self, done: u64, total: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(total);
            bar.set_position(done);
            return;
        }
        let decile = (done * 10).checked_div(total).unwrap_or(10);
        let mut last = self.last_decile.lock().unwrap_or_else(|e| e.into_inner());
        if decile > *last || done == total {
            *last = decile;
            if self.json {
                eprintln!(
                    "{}",
                    serde_json::json!({"event":"upload","done":done,"total":total})
                );
            } else {
                eprintln!("uploaded {done}/{total} bytes ({}%)", decile * 10);
            }
        }
    }
}

async fn vm_of(client: &Client, sel: &VmSel) -> Result<vc::VmRef, Failure> {
    Ok(client.find_vm(&sel.query()).await?.vmref)
}

async fn run_inner(cmd: VcenterCmd) -> Result<(), Failure> {
    let conn = &cmd.conn;
    let json = cmd.output == Output::Json;
    let client = conn.connect().await?;
    match &cmd.action {
        Action::Vms { name, file } => {
            let mut vms = client.vm_summaries().await?;
            if let Some(p) = name {
                vms.retain(|v| name_matches(p, &v.name));
            }
            let text = if json {
                print_json(&vms)? + "\n"
            } else {
                vms_text(&vms)
            };
            print!("{text}");
            if let Some(f) = file {
                write_file(f, &text)?;
                eprintln!("wrote {} VM(s) to {}", vms.len(), f.display());
            }
        }
        Action::Datastores => {
            let ds = client.datastores().await?;
            if json {
                println!("{}", print_json(&ds)?);
            } else {
                for d in ds {
                    println!(
                        "{:<24} capacity {:>8} free {:>8}",
                        d.name,
                        d.capacity_bytes.map(gib).unwrap_or_default(),
                        d.free_bytes.map(gib).unwrap_or_default()
                    );
                }
            }
        }
        Action::Upload {
            local,
            path,
            no_verify,
        } => {
            let ds = conn.datastore()?;
            let bar = (!json && std::io::stderr().is_terminal()).then(|| {
                indicatif::ProgressBar::new(0).with_style(
                    indicatif::ProgressStyle::with_template(
                        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                )
            });
            let progress = Arc::new(CliProgress {
                bar: bar.clone(),
                json,
                last_decile: Mutex::new(0),
            });
            let report = client
                .upload(
                    local,
                    ds,
                    path,
                    UploadOptions {
                        verify_sha256: !no_verify,
                    },
                    progress,
                )
                .await?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            if json {
                println!("{}", print_json(&report)?);
            } else {
                println!(
                    "uploaded {} to {} ({} bytes, sha256 {}{})",
                    local.display(),
                    report.datastore_path,
                    report.bytes,
                    report.sha256,
                    if report.sha256_verified {
                        ", read back and verified"
                    } else {
                        ", size verified"
                    }
                );
            }
        }
        Action::AttachIso { vm, iso, state } => {
            let vmref = vm_of(&client, vm).await?;
            let (ds, path) = split_iso(conn, iso)?;
            let att = client.attach_iso(&vmref, &ds, &path).await?;
            let j = print_json(&att)?;
            if let Some(f) = state {
                write_file(f, &j)?;
            }
            if json {
                println!("{j}");
            } else {
                println!(
                    "VM {vmref}: {} on CD-ROM {} ({}), connected at power on",
                    att.iso,
                    att.device_key,
                    if att.added_cdrom { "added" } else { "reused" }
                );
            }
        }
        Action::DetachIso {
            vm,
            iso,
            remove_added,
        } => {
            let vmref = vm_of(&client, vm).await?;
            if let Some(f) = remove_added {
                let text = std::fs::read_to_string(f)
                    .map_err(|e| Failure(exit::USAGE, format!("read {}: {e}", f.display())))?;
                let att: vc::CdromAttachment = serde_json::from_str(&text)
                    .map_err(|e| Failure(exit::USAGE, format!("{}: {e}", f.display())))?;
                if att.vm_moref != vmref.moref.value {
                    return Err(Failure(
                        exit::USAGE,
                        format!(
                            "{} belongs to VM '{}' ({}), not {vmref}",
                            f.display(),
                            att.vm,
                            att.vm_moref
                        ),
                    ));
                }
                client.remove_added(&att).await?;
                if json {
                    println!("{}", serde_json::json!({"vm": vmref.name, "removed": att}));
                } else {
                    println!("VM {vmref}: undid attachment of {}", att.iso);
                }
            } else {
                let iso = match iso {
                    Some(i) => {
                        let (ds, p) = split_iso(conn, i)?;
                        Some(format!("[{ds}] {p}"))
                    }
                    None => None,
                };
                let keys = client.detach_iso(&vmref, iso.as_deref()).await?;
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"vm": vmref.name, "detached_device_keys": keys})
                    );
                } else {
                    println!("VM {vmref}: detached CD-ROM(s) {keys:?}");
                }
            }
        }
        Action::BootOrder { vm, action } => {
            let vmref = vm_of(&client, vm).await?;
            match action {
                BootAction::Show => {
                    let saved = client.boot_options(&vmref).await?;
                    if json {
                        println!("{}", print_json(&saved)?);
                    } else {
                        println!("VM {vmref}: {:?}", saved.options);
                    }
                }
                BootAction::CdromFirst { save } => {
                    let before = client.boot_options(&vmref).await?;
                    // Save before changing anything: the file is the only way back.
                    write_file(save, &print_json(&before)?)?;
                    client.set_boot_cdrom_first(&vmref).await?;
                    let now = client.boot_options(&vmref).await?;
                    if json {
                        println!("{}", print_json(&now)?);
                    } else {
                        println!(
                            "VM {vmref}: boot order now {:?}; previous options saved to {}",
                            now.options.boot_order,
                            save.display()
                        );
                    }
                }
                BootAction::Restore { file } => {
                    let text = std::fs::read_to_string(file).map_err(|e| {
                        Failure(exit::USAGE, format!("read {}: {e}", file.display()))
                    })?;
                    let saved: SavedBootOptions = serde_json::from_str(&text)
                        .map_err(|e| Failure(exit::USAGE, format!("{}: {e}", file.display())))?;
                    client.restore_boot_options(&vmref, &saved).await?;
                    if json {
                        println!("{}", print_json(&client.boot_options(&vmref).await?)?);
                    } else {
                        println!("VM {vmref}: boot options restored from {}", file.display());
                    }
                }
            }
        }
        Action::Power { vm, op, wait } => {
            let vmref = vm_of(&client, vm).await?;
            match op {
                PowerArg::On => client.power(&vmref, PowerOp::On).await?,
                PowerArg::Off => client.power(&vmref, PowerOp::Off).await?,
                PowerArg::Reset => client.power(&vmref, PowerOp::Reset).await?,
                PowerArg::Shutdown => {
                    client
                        .shutdown_guest(&vmref, Duration::from_secs(*wait))
                        .await?
                }
            }
            let state = client.power_state(&vmref).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"vm": vmref.name, "moref": vmref.moref.value, "power_state": state})
                );
            } else {
                println!("VM {vmref}: {state}");
            }
        }
        Action::Snapshot { vm, action } => {
            let vmref = vm_of(&client, vm).await?;
            match action {
                SnapAction::Create {
                    name,
                    description,
                    memory,
                    quiesce,
                } => {
                    let m = client
                        .create_snapshot(&vmref, name, description, *memory, *quiesce)
                        .await?;
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"vm": vmref.name, "snapshot": name, "moref": m.value})
                        );
                    } else {
                        println!("VM {vmref}: snapshot '{name}' created ({})", m.value);
                    }
                }
                SnapAction::Revert { name } => {
                    client.revert_snapshot(&vmref, name).await?;
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"vm": vmref.name, "reverted_to": name})
                        );
                    } else {
                        println!("VM {vmref}: reverted to snapshot '{name}'");
                    }
                }
                SnapAction::Remove {
                    name,
                    remove_children,
                } => {
                    client
                        .remove_snapshot(&vmref, name, *remove_children)
                        .await?;
                    if json {
                        println!("{}", serde_json::json!({"vm": vmref.name, "removed": name}));
                    } else {
                        println!("VM {vmref}: snapshot '{name}' removed");
                    }
                }
                SnapAction::List => {
                    let all = client.snapshots(&vmref).await?;
                    if json {
                        println!("{}", print_json(&all)?);
                    } else {
                        for s in all {
                            println!(
                                "{}{}",
                                s.path.join(" / "),
                                if s.current { "  (current)" } else { "" }
                            );
                        }
                    }
                }
            }
        }
    }
    if let Err(e) = client.logout().await {
        tracing::debug!(error = %e, "logout failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::name_matches;

    #[test]
    fn name_filters() {
        assert!(name_matches("h0", "DC0_H0_VM1"));
        assert!(name_matches("dc0_*_vm0", "DC0_C0_RP0_VM0"));
        assert!(!name_matches("dc0_*_vm0", "DC0_C0_RP0_VM1"));
        assert!(name_matches("DC0_H0_VM?", "DC0_H0_VM1"));
        assert!(!name_matches("x", "DC0_H0_VM1"));
    }
}
