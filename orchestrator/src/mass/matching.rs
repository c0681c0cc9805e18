//! Matching recovery instances to vCenter VMs: VMware BIOS UUID first, then vCenter instance
//! UUID, then MAC address. Each VM receives at most one instance; an ambiguous MAC match
//! (several VMs share it, as vcsim's model VMs do) is not a match.

use super::backend::VmInfo;
use failback_api::RecoveryInstance;
use failback_config::plan::MatchedBy;
use std::collections::{BTreeMap, HashSet};

/// Lower-case, no braces/spaces; dashes kept.
pub fn norm_uuid(s: &str) -> String {
    s.trim()
        .trim_matches(|c| c == '{' || c == '}')
        .to_ascii_lowercase()
}

/// The same UUID with its first three fields byte-swapped. VMware VMs of older hardware
/// versions expose the SMBIOS UUID in this mixed-endian form inside the guest, so an instance
/// whose hint was read from inside the guest may carry either form.
pub fn swapped_uuid(s: &str) -> Option<String> {
    let s = norm_uuid(s);
    let g: Vec<&str> = s.split('-').collect();
    if g.len() != 5 || g[0].len() != 8 || g[1].len() != 4 || g[2].len() != 4 {
        return None;
    }
    let rev = |h: &str| -> String {
        let bytes: Vec<&str> = (0..h.len()).step_by(2).map(|i| &h[i..i + 2]).collect();
        bytes.into_iter().rev().collect()
    };
    Some(format!(
        "{}-{}-{}-{}-{}",
        rev(g[0]),
        rev(g[1]),
        rev(g[2]),
        g[3],
        g[4]
    ))
}

fn uuid_eq(a: &str, b: &str) -> bool {
    let (a, b) = (norm_uuid(a), norm_uuid(b));
    a == b || swapped_uuid(&a).is_some_and(|s| s == b)
}

/// `00:50:56:AA:bb:cc` and `00-50-56-aa-bb-cc` compare equal.
pub fn norm_mac(s: &str) -> String {
    s.trim().to_ascii_lowercase().replace('-', ":")
}

/// One instance -> VM pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    pub instance_id: String,
    /// The VM's vCenter (plan `[[vcenter]]` name; `None` in the single-vCenter form).
    pub vm_vcenter: Option<String>,
    pub vm_moref: String,
    pub by: MatchedBy,
}

/// Outcome of matching every instance against every VM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Matching {
    pub matches: Vec<Match>,
    /// Instances without a VM, with the reason.
    pub unmatched_instances: Vec<(String, String)>,
}

impl Matching {
    /// Instance matched to this VM, if any.
    pub fn for_vm(&self, vm: &VmInfo) -> Option<&Match> {
        self.matches
            .iter()
            .find(|m| m.vm_moref == vm.moref && m.vm_vcenter == vm.vcenter)
    }
}

/// Match in three passes (BIOS UUID, instance UUID, MAC), so that a strong identifier always
/// wins over a weaker one regardless of the order of the input lists.
pub fn match_instances(instances: &[RecoveryInstance], vms: &[VmInfo]) -> Matching {
    // A VM is its vCenter + moref: morefs repeat across vCenters.
    let key = |vm: &'_ VmInfo| (vm.vcenter.clone(), vm.moref.clone());
    let mut taken_vm: HashSet<(Option<String>, String)> = HashSet::new();
    let mut done: BTreeMap<&str, Match> = BTreeMap::new();
    let mut ambiguous: BTreeMap<&str, String> = BTreeMap::new();
    // Pass 1 and 2: UUIDs.
    for by in [MatchedBy::BiosUuid, MatchedBy::InstanceUuid] {
        for ri in instances {
            let id = ri.recovery_instance_id.as_str();
            if done.contains_key(id) {
                continue;
            }
            let hint = match by {
                MatchedBy::BiosUuid => ri.source_hints.vmware_uuid.as_deref(),
                _ => ri.source_hints.instance_uuid.as_deref(),
            };
            let Some(hint) = hint.filter(|h| !h.trim().is_empty()) else {
                continue;
            };
            let found: Vec<&VmInfo> = vms
                .iter()
                .filter(|vm| !taken_vm.contains(&key(vm)))
                .filter(|vm| {
                    let v = match by {
                        MatchedBy::BiosUuid => vm.bios_uuid.as_deref(),
                        _ => vm.instance_uuid.as_deref(),
                    };
                    v.is_some_and(|v| uuid_eq(v, hint))
                })
                .collect();
            if let [vm] = found.as_slice() {
                taken_vm.insert(key(vm));
                done.insert(
                    id,
                    Match {
                        instance_id: id.to_string(),
                        vm_vcenter: vm.vcenter.clone(),
                        vm_moref: vm.moref.clone(),
                        by,
                    },
                );
            } else if found.len() > 1 {
                ambiguous.entry(id).or_insert_with(|| {
                    format!(
                        "{} {hint} is ambiguous: VMs {} carry it; add the VM to the plan by hand",
                        if by == MatchedBy::BiosUuid {
                            "BIOS UUID"
                        } else {
                            "instance UUID"
                        },
                        found
                            .iter()
                            .map(|v| vm_label(v))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                });
            }
        }
    }
    // Pass 3: MAC, only when exactly one free VM carries one of the instance's MACs.
    let mut reasons: BTreeMap<&str, String> = BTreeMap::new();
    for ri in instances {
        let id = ri.recovery_instance_id.as_str();
        if done.contains_key(id) {
            continue;
        }
        let macs: HashSet<String> = ri
            .source_hints
            .mac_addresses
            .iter()
            .map(|m| norm_mac(m))
            .collect();
        let found: Vec<&VmInfo> = vms
            .iter()
            .filter(|vm| !taken_vm.contains(&key(vm)))
            .filter(|vm| vm.macs.iter().any(|m| macs.contains(&norm_mac(m))))
            .collect();
        match found.as_slice() {
            [vm] => {
                taken_vm.insert(key(vm));
                done.insert(
                    id,
                    Match {
                        instance_id: id.to_string(),
                        vm_vcenter: vm.vcenter.clone(),
                        vm_moref: vm.moref.clone(),
                        by: MatchedBy::Mac,
                    },
                );
            }
            [] if ambiguous.contains_key(id) => {
                reasons.insert(id, ambiguous.remove(id).unwrap_or_default());
            }
            [] => {
                let h = &ri.source_hints;
                let mut have = Vec::new();
                if let Some(u) = &h.vmware_uuid {
                    have.push(format!("BIOS UUID {u}"));
                }
                if let Some(u) = &h.instance_uuid {
                    have.push(format!("instance UUID {u}"));
                }
                if !h.mac_addresses.is_empty() {
                    have.push(format!("MACs {}", h.mac_addresses.join(",")));
                }
                let msg = if have.is_empty() {
                    "the instance has no identification hints (BIOS UUID, instance UUID, MAC)"
                        .to_string()
                } else {
                    format!("no (free) vCenter VM has {}", have.join(" or "))
                };
                reasons.insert(id, msg);
            }
            many => {
                let names: Vec<String> = many.iter().map(|v| vm_label(v)).collect();
                reasons.insert(
                    id,
                    format!(
                        "MAC match is ambiguous: VMs {} share a MAC of this instance",
                        names.join(", ")
                    ),
                );
            }
        }
    }
    let mut out = Matching::default();
    for ri in instances {
        let id = ri.recovery_instance_id.as_str();
        if let Some(m) = done.remove(id) {
            out.matches.push(m);
        } else if let Some(r) = reasons.remove(id) {
            out.unmatched_instances.push((id.to_string(), r));
        }
    }
    out
}

/// `name` or `name (vcenter)`.
fn vm_label(vm: &VmInfo) -> String {
    match &vm.vcenter {
        Some(vc) => format!("{} ({vc})", vm.name),
        None => vm.name.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::backend::Power;
    use super::*;
    use failback_api::IdentificationHints;

    fn vm(moref: &str, bios: &str, inst: &str, macs: &[&str]) -> VmInfo {
        VmInfo {
            vcenter: None,
            moref: moref.into(),
            name: format!("name-{moref}"),
            bios_uuid: Some(bios.into()),
            instance_uuid: Some(inst.into()),
            macs: macs.iter().map(|m| m.to_string()).collect(),
            power: Power::On,
            tools_running: false,
            guest_ip: None,
            disks: vec![],
        }
    }

    fn ri(id: &str, bios: Option<&str>, inst: Option<&str>, macs: &[&str]) -> RecoveryInstance {
        RecoveryInstance {
            recovery_instance_id: id.into(),
            hostname: None,
            source_hints: IdentificationHints {
                vmware_uuid: bios.map(Into::into),
                instance_uuid: inst.map(Into::into),
                mac_addresses: macs.iter().map(|m| m.to_string()).collect(),
                hostname: None,
                fqdn: None,
            },
            agent: Default::default(),
            failback: Default::default(),
            config: Default::default(),
            created_at: 0,
        }
    }

    const U1: &str = "42161111-2222-3333-4444-555566667777";
    const U2: &str = "42162222-2222-3333-4444-555566667777";
    const I1: &str = "50161111-aaaa-bbbb-cccc-ddddeeeeffff";
    const I2: &str = "50162222-aaaa-bbbb-cccc-ddddeeeeffff";

    #[test]
    fn bios_then_instance_then_mac() {
        let vms = vec![
            vm("vm-1", U1, I1, &["00:50:56:00:00:01"]),
            vm("vm-2", U2, I2, &["00:50:56:00:00:02"]),
            vm(
                "vm-3",
                "42163333-2222-3333-4444-555566667777",
                "50163333-aaaa-bbbb-cccc-ddddeeeeffff",
                &["00:50:56:00:00:03"],
            ),
        ];
        let ris = vec![
            ri("i-mac", None, None, &["00-50-56-00-00-03"]),
            ri("i-inst", None, Some(&I2.to_uppercase()), &[]),
            ri("i-bios", Some(U1), None, &[]),
            ri(
                "i-none",
                Some("99999999-2222-3333-4444-555566667777"),
                None,
                &[],
            ),
        ];
        let m = match_instances(&ris, &vms);
        let get = |id: &str| m.matches.iter().find(|x| x.instance_id == id).cloned();
        assert_eq!(get("i-bios").unwrap().vm_moref, "vm-1");
        assert_eq!(get("i-bios").unwrap().by, MatchedBy::BiosUuid);
        assert_eq!(get("i-inst").unwrap().vm_moref, "vm-2");
        assert_eq!(get("i-inst").unwrap().by, MatchedBy::InstanceUuid);
        assert_eq!(get("i-mac").unwrap().vm_moref, "vm-3");
        assert_eq!(get("i-mac").unwrap().by, MatchedBy::Mac);
        assert_eq!(m.unmatched_instances.len(), 1);
        assert_eq!(m.unmatched_instances[0].0, "i-none");
        assert!(
            m.unmatched_instances[0].1.contains("99999999"),
            "{:?}",
            m.unmatched_instances
        );
        assert_eq!(m.for_vm(&vms[1]).unwrap().instance_id, "i-inst");
    }

    #[test]
    fn same_moref_in_two_vcenters_is_two_vms_and_a_shared_uuid_is_ambiguous() {
        let in_vc = |vc: &str, bios: &str| VmInfo {
            vcenter: Some(vc.into()),
            ..vm("vm-63", bios, I1, &[])
        };
        let vms = vec![in_vc("east", U1), in_vc("west", U2)];
        let m = match_instances(
            &[
                ri("i-w", Some(U2), None, &[]),
                ri("i-e", Some(U1), None, &[]),
            ],
            &vms,
        );
        assert_eq!(m.for_vm(&vms[0]).unwrap().instance_id, "i-e");
        assert_eq!(m.for_vm(&vms[1]).unwrap().instance_id, "i-w");
        assert_eq!(
            m.for_vm(&vms[1]).unwrap().vm_vcenter.as_deref(),
            Some("west")
        );
        // The same BIOS UUID in both vCenters (a cloned VM): not a match, and said so.
        let twins = vec![in_vc("east", U1), in_vc("west", U1)];
        let m = match_instances(&[ri("i-a", Some(U1), None, &[])], &twins);
        assert!(m.matches.is_empty());
        let reason = &m.unmatched_instances[0].1;
        assert!(
            reason.contains("ambiguous") && reason.contains("name-vm-63 (west)"),
            "{reason}"
        );
    }

    #[test]
    fn uuid_beats_mac_even_when_listed_later() {
        // i-a's MAC is on vm-1, but i-b's BIOS UUID is vm-1: the UUID must win.
        let vms = vec![
            vm("vm-1", U1, I1, &["00:50:56:00:00:01"]),
            vm("vm-2", U2, I2, &["00:50:56:00:00:02"]),
        ];
        let ris = vec![
            ri("i-a", None, None, &["00:50:56:00:00:01"]),
            ri("i-b", Some(U1), None, &[]),
        ];
        let m = match_instances(&ris, &vms);
        assert_eq!(m.matches.len(), 1);
        assert_eq!(m.matches[0].instance_id, "i-b");
        assert_eq!(m.unmatched_instances[0].0, "i-a");
    }

    #[test]
    fn ambiguous_mac_is_not_a_match() {
        let vms = vec![
            vm("vm-1", U1, I1, &["00:50:56:00:00:09"]),
            vm("vm-2", U2, I2, &["00:50:56:00:00:09"]),
        ];
        let m = match_instances(&[ri("i-a", None, None, &["00:50:56:00:00:09"])], &vms);
        assert!(m.matches.is_empty());
        let reason = &m.unmatched_instances[0].1;
        assert!(
            reason.contains("ambiguous") && reason.contains("name-vm-1"),
            "{reason}"
        );
    }

    #[test]
    fn byte_swapped_smbios_uuid_matches() {
        let vms = vec![vm("vm-1", "00112233-4455-6677-8899-aabbccddeeff", I1, &[])];
        let m = match_instances(
            &[ri(
                "i-a",
                Some("33221100-5544-7766-8899-AABBCCDDEEFF"),
                None,
                &[],
            )],
            &vms,
        );
        assert_eq!(m.matches.len(), 1);
        assert_eq!(m.matches[0].by, MatchedBy::BiosUuid);
    }

    #[test]
    fn one_vm_gets_one_instance() {
        let vms = vec![vm("vm-1", U1, I1, &[])];
        let m = match_instances(
            &[
                ri("i-a", Some(U1), None, &[]),
                ri("i-b", Some(U1), None, &[]),
            ],
            &vms,
        );
        assert_eq!(m.matches.len(), 1);
        assert_eq!(m.matches[0].instance_id, "i-a");
        assert_eq!(m.unmatched_instances[0].0, "i-b");
    }

    #[test]
    fn no_hints_reason() {
        let m = match_instances(&[ri("i-a", None, None, &[])], &[]);
        assert!(m.unmatched_instances[0]
            .1
            .contains("no identification hints"));
    }
}
