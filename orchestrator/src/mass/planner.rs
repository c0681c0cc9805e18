//! `find`, `plan --one-click`, `plan --generate` and `run --dry-run`: everything that looks
//! but does not touch.

use super::backend::{list_all, BResult, DrService, Power, VcenterConn, VmInfo};
use super::matching::{match_instances, Matching};
use super::progress::human;
use super::runner::{resolve_vm, InProgress};
use super::state::Step;
use failback_api::{FailbackState, RecoveryInstance};
use failback_config::plan::{
    LaunchMode, MatchedBy, Network, Plan, VmOptions, VmPlan, VmTarget, PLAN_VERSION,
};
use serde::{Deserialize, Serialize};

/// One row of `failback mass find`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FoundVm {
    #[serde(flatten)]
    pub vm: VmInfo,
    pub recovery_instance: Option<String>,
    pub matched_by: Option<MatchedBy>,
}

/// `find`: VMs (optionally filtered by a case-insensitive name substring) with the recovery
/// instance each matches.
pub async fn find(
    vcenters: &[VcenterConn],
    dr: &dyn DrService,
    name_filter: Option<&str>,
) -> BResult<(Vec<FoundVm>, Matching)> {
    let vms = list_all(vcenters).await?;
    let instances = dr.instances().await?;
    let m = match_instances(&instances, &vms);
    let filter = name_filter.map(str::to_lowercase);
    let mut out: Vec<FoundVm> = vms
        .into_iter()
        .filter(|v| {
            filter
                .as_ref()
                .is_none_or(|f| v.name.to_lowercase().contains(f))
        })
        .map(|vm| {
            let hit = m.for_vm(&vm);
            FoundVm {
                recovery_instance: hit.map(|h| h.instance_id.clone()),
                matched_by: hit.map(|h| h.by),
                vm,
            }
        })
        .collect();
    out.sort_by(|a, b| (&a.vm.vcenter, &a.vm.name).cmp(&(&b.vm.vcenter, &b.vm.name)));
    Ok((out, m))
}

/// Render `find` rows as a text table.
pub fn find_table(rows: &[FoundVm]) -> String {
    let vc_width = rows
        .iter()
        .filter_map(|r| r.vm.vcenter.as_deref())
        .map(str::len)
        .max();
    let vc = |v: Option<&str>| match vc_width {
        Some(w) => format!("{:<w$} ", v.unwrap_or("-"), w = w.max(7)),
        None => String::new(),
    };
    let mut s = vc(Some("VCENTER"));
    s += &format!(
        "{:<24} {:<10} {:<36} {:<36} {:<5} {:<20} {:<18} {}\n",
        "NAME",
        "MOREF",
        "BIOS UUID",
        "INSTANCE UUID",
        "POWER",
        "RECOVERY INSTANCE",
        "MACS",
        "DISKS"
    );
    for r in rows {
        let disks: Vec<String> =
            r.vm.disks
                .iter()
                .map(|d| format!("{}={}", d.label, human(d.size_bytes)))
                .collect();
        let power = match r.vm.power {
            Power::On => "on",
            Power::Off => "off",
            Power::Suspended => "susp",
        };
        s.push_str(&vc(r.vm.vcenter.as_deref()));
        s.push_str(&format!(
            "{:<24} {:<10} {:<36} {:<36} {:<5} {:<20} {:<18} {}\n",
            r.vm.name,
            r.vm.moref,
            r.vm.bios_uuid.as_deref().unwrap_or("-"),
            r.vm.instance_uuid.as_deref().unwrap_or("-"),
            power,
            match (&r.recovery_instance, r.matched_by) {
                (Some(i), Some(b)) => format!("{i} ({})", matched_name(b)),
                (Some(i), None) => i.clone(),
                _ => "-".into(),
            },
            r.vm.macs.join(","),
            disks.join(" ")
        ));
    }
    s
}

fn matched_name(b: MatchedBy) -> &'static str {
    match b {
        MatchedBy::BiosUuid => "bios uuid",
        MatchedBy::InstanceUuid => "instance uuid",
        MatchedBy::Mac => "mac",
        MatchedBy::Manual => "manual",
    }
}

fn target_of(vm: &VmInfo) -> VmTarget {
    VmTarget {
        name: Some(vm.name.clone()),
        moref: Some(vm.moref.clone()),
        bios_uuid: vm.bios_uuid.clone(),
        instance_uuid: vm.instance_uuid.clone(),
    }
}

/// `plan --one-click`: one entry per matched instance (DHCP, default options), then one
/// entry without an instance per VM nothing matched, plus the unmatched instances, so the
/// results report both kinds as skipped.
pub fn one_click(
    instances: &[RecoveryInstance],
    vms: &[VmInfo],
    options: &VmOptions,
) -> (Plan, Matching) {
    let m = match_instances(instances, vms);
    let mut plan = Plan {
        version: PLAN_VERSION,
        unmatched_instances: m
            .unmatched_instances
            .iter()
            .map(|(id, _)| id.clone())
            .collect(),
        waves: vec![],
        vcenters: vec![],
        vms: vec![],
    };
    for hit in &m.matches {
        let Some(vm) = vms
            .iter()
            .find(|v| v.moref == hit.vm_moref && v.vcenter == hit.vm_vcenter)
        else {
            continue;
        };
        plan.vms.push(VmPlan {
            recovery_instance: Some(hit.instance_id.clone()),
            wave: None,
            vcenter: vm.vcenter.clone(),
            matched_by: Some(hit.by),
            target: target_of(vm),
            network: Network::default(),
            device_mapping: vec![],
            options: options.clone(),
        });
    }
    let mut unmatched: Vec<&VmInfo> = vms.iter().filter(|v| m.for_vm(v).is_none()).collect();
    unmatched.sort_by(|a, b| (&a.vcenter, &a.name).cmp(&(&b.vcenter, &b.name)));
    for vm in unmatched {
        plan.vms.push(VmPlan {
            recovery_instance: None,
            wave: None,
            vcenter: vm.vcenter.clone(),
            matched_by: None,
            target: target_of(vm),
            network: Network::default(),
            device_mapping: vec![],
            options: options.clone(),
        });
    }
    (plan, m)
}

/// `plan --generate`: every VM (optionally filtered), with the matched instance where there
/// is one and every field written out, for hand editing.
pub fn generate(
    instances: &[RecoveryInstance],
    vms: &[VmInfo],
    name_filter: Option<&str>,
    options: &VmOptions,
) -> Plan {
    let m = match_instances(instances, vms);
    let filter = name_filter.map(str::to_lowercase);
    let mut plan = Plan {
        version: PLAN_VERSION,
        unmatched_instances: m
            .unmatched_instances
            .iter()
            .map(|(id, _)| id.clone())
            .collect(),
        waves: vec![],
        vcenters: vec![],
        vms: vec![],
    };
    let mut sorted: Vec<&VmInfo> = vms
        .iter()
        .filter(|v| {
            filter
                .as_ref()
                .is_none_or(|f| v.name.to_lowercase().contains(f))
        })
        .collect();
    sorted.sort_by(|a, b| (&a.vcenter, &a.name).cmp(&(&b.vcenter, &b.name)));
    for vm in sorted {
        let hit = m.for_vm(vm);
        plan.vms.push(VmPlan {
            recovery_instance: hit.map(|h| h.instance_id.clone()),
            wave: None,
            vcenter: vm.vcenter.clone(),
            matched_by: hit.map(|h| h.by),
            target: target_of(vm),
            network: Network::default(),
            device_mapping: vec![],
            options: options.clone(),
        });
    }
    plan
}

/// One VM in a dry run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DryRunVm {
    pub vm: String,
    /// `N/M name (on_failure ..., readiness ...)` when the plan has waves.
    pub wave: Option<String>,
    /// The plan's `[[vcenter]]` name (`None`: single-vCenter form).
    pub vcenter: Option<String>,
    pub recovery_instance: Option<String>,
    pub vm_moref: Option<String>,
    pub power: Option<Power>,
    pub failback_state: Option<FailbackState>,
    /// What would happen: `run`, `skip: ...` or `fail: ...`.
    pub verdict: String,
    pub steps: Vec<String>,
    /// Where the client has already paired: bytes still to fetch per disk (remote id -> bytes).
    pub estimated_bytes: Option<Vec<(String, u64)>>,
}

/// `run --dry-run`: resolve every VM and instance, print every step, change nothing.
pub async fn dry_run(
    vcenters: &[VcenterConn],
    dr: &dyn DrService,
    plan: &Plan,
    in_progress: InProgress,
    launch: Option<LaunchMode>,
) -> BResult<Vec<DryRunVm>> {
    let vms = list_all(vcenters).await?;
    let instances = dr.instances().await?;
    let mut out = vec![];
    for p in &plan.vms {
        let vcenter = plan.vcenter_of(p);
        let mut d = DryRunVm {
            wave: wave_line(plan, p),
            vcenter: vcenter.map(str::to_string),
            vm: p.target.label(),
            recovery_instance: p.recovery_instance.clone(),
            vm_moref: None,
            power: None,
            failback_state: None,
            verdict: "run".into(),
            steps: vec![],
            estimated_bytes: None,
        };
        let Some(id) = &p.recovery_instance else {
            d.verdict = "skip: no recovery instance matches this VM".into();
            out.push(d);
            continue;
        };
        let mine: Vec<VmInfo> = vms
            .iter()
            .filter(|v| v.vcenter.as_deref() == vcenter)
            .cloned()
            .collect();
        let vm = match resolve_vm(p, &mine) {
            Ok(vm) => vm,
            Err(e) => {
                d.verdict = format!("fail: {e}");
                out.push(d);
                continue;
            }
        };
        d.vm_moref = Some(vm.moref.clone());
        d.power = Some(vm.power);
        let Some(ri) = instances.iter().find(|r| r.recovery_instance_id == *id) else {
            d.verdict = format!("fail: the DR service has no recovery instance {id}");
            out.push(d);
            continue;
        };
        d.failback_state = Some(ri.failback.state);
        if !ri.failback.disks.is_empty() {
            d.estimated_bytes = Some(
                ri.failback
                    .disks
                    .iter()
                    .map(|x| {
                        (
                            x.remote_id.clone(),
                            x.backlog_bytes
                                .max(x.total_bytes.saturating_sub(x.replicated_bytes)),
                        )
                    })
                    .collect(),
            );
        }
        if ri.failback.state != FailbackState::FailbackNotStarted && in_progress == InProgress::Skip
        {
            d.verdict = format!("skip: already in failback ({})", ri.failback.state);
            out.push(d);
            continue;
        }
        for s in Step::ALL {
            let line = match s {
                Step::Check if ri.failback.state != FailbackState::FailbackNotStarted => {
                    format!(
                        "{}: stop the running failback ({}) and restart",
                        s.name(),
                        ri.failback.state
                    )
                }
                Step::PowerOff => match vm.power {
                    Power::Off => format!("{}: already off", s.name()),
                    _ if vm.tools_running => format!(
                        "{}: guest shutdown, then power off after {} s",
                        s.name(),
                        p.options.timeouts.shutdown_secs
                    ),
                    _ => format!("{}: power off (no VMware Tools)", s.name()),
                },
                Step::Snapshot if !p.options.protective_snapshot => {
                    format!("{}: none (protective_snapshot = false)", s.name())
                }
                Step::Launch if launch.unwrap_or(p.options.launch) == LaunchMode::Manual => {
                    format!("{}: manual (wait for `failback launch {id}`)", s.name())
                }
                Step::WaitPaired => {
                    format!("{}: within {} s", s.name(), p.options.timeouts.pair_secs)
                }
                Step::WaitReady => {
                    format!("{}: within {} s", s.name(), p.options.timeouts.sync_secs)
                }
                Step::WaitCompleted => format!(
                    "{}: within {} s",
                    s.name(),
                    p.options.timeouts.complete_secs
                ),
                _ => format!("{}: {}", s.name(), s.describe()),
            };
            d.steps.push(line);
        }
        out.push(d);
    }
    for id in &plan.unmatched_instances {
        out.push(DryRunVm {
            wave: None,
            vcenter: None,
            vm: format!("(no VM for {id})"),
            recovery_instance: Some(id.clone()),
            vm_moref: None,
            power: None,
            failback_state: None,
            verdict: "skip: no vCenter VM matches this recovery instance".into(),
            steps: vec![],
            estimated_bytes: None,
        });
    }
    // Waves in order (stable: plan order inside a wave); instances without a VM last.
    out.sort_by_key(|d| {
        plan.vms
            .iter()
            .find(|p| p.target.label() == d.vm && plan.vcenter_of(p) == d.vcenter.as_deref())
            .map(|p| super::runner::wave_index(plan, p))
            .unwrap_or(usize::MAX)
    });
    Ok(out)
}

fn wave_line(plan: &Plan, p: &VmPlan) -> Option<String> {
    let name = p.wave.as_ref()?;
    let i = plan.waves.iter().position(|w| w.name == *name)?;
    let w = &plan.waves[i];
    let ready = match &w.readiness {
        None => "no readiness check".to_string(),
        Some(r) => {
            let mut c = vec![];
            if r.tools_running {
                c.push("VMware Tools running".to_string());
            }
            if r.guest_ip {
                c.push("guest IP".to_string());
            }
            if let Some(port) = r.tcp_port {
                c.push(format!("TCP port {port}"));
            }
            format!("readiness: {} within {} s", c.join(" + "), r.timeout_secs)
        }
    };
    Some(format!(
        "wave {}/{} {} (on_failure {}, {ready})",
        i + 1,
        plan.waves.len(),
        w.name,
        match w.on_failure {
            failback_config::plan::WavePolicy::Stop => "stop",
            failback_config::plan::WavePolicy::Continue => "continue",
        }
    ))
}

/// Text rendering of a dry run.
pub fn dry_run_text(rows: &[DryRunVm]) -> String {
    let mut s = String::new();
    let mut wave: Option<&str> = None;
    for d in rows {
        if d.wave.is_some() && d.wave.as_deref() != wave {
            wave = d.wave.as_deref();
            s.push_str(&format!("== {} ==\n", wave.unwrap_or_default()));
        }
        s.push_str(&format!(
            "{}{} <- {}: {}{}\n",
            d.vm,
            d.vcenter
                .as_deref()
                .map(|v| format!(" [vCenter {v}]"))
                .unwrap_or_default(),
            d.recovery_instance.as_deref().unwrap_or("-"),
            d.verdict,
            d.failback_state
                .map(|f| format!(" (instance {f})"))
                .unwrap_or_default()
        ));
        for st in &d.steps {
            s.push_str(&format!("    {st}\n"));
        }
        if let Some(e) = &d.estimated_bytes {
            for (disk, b) in e {
                s.push_str(&format!("    estimate: {disk}: {} to fetch\n", human(*b)));
            }
        }
    }
    s
}
