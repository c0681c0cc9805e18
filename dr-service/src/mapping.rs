//! Device mapping: which local disk of the failback client receives which recovery volume.
//!
//! Suggestion rules (as the AWS client): for the original source server, identity (the i-th
//! volume of the recovery instance to the i-th disk of the client); otherwise by size (local
//! size at least the remote size), where a remote volume may be the next whole GiB above a
//! fractional local size (clouds round volumes up, so a 10.5 GiB disk comes back as an 11 GiB
//! volume). Overrides from the client are checked with the same size rule.

use failback_api::{AgentDisk, DeviceMapping, InventoryDisk};

const GIB: u64 = 1 << 30;

/// A mapping that cannot be used, naming the volume or device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MappingError {
    #[error("no local disk is large enough for recovery volume {remote} ({size} bytes); pass a device mapping (remote=local or remote=EXCLUDE)")]
    NoFit { remote: String, size: u64 },
    #[error("device mapping names recovery volume {remote:?}, which the recovery instance does not have (volumes: {known})")]
    UnknownRemote { remote: String, known: String },
    #[error("device mapping names local device {local:?}, which is not in the client's inventory")]
    UnknownLocal { local: String },
    #[error("local device {local} ({local_size} bytes) is smaller than recovery volume {remote} ({remote_size} bytes)")]
    TooSmall {
        remote: String,
        local: String,
        remote_size: u64,
        local_size: u64,
    },
    #[error("recovery volume {remote} is not in the device mapping; map it or mark it EXCLUDE")]
    Unmapped { remote: String },
    #[error("device mapping: {0}")]
    Invalid(String),
}

/// True if a local disk of `local` bytes can receive a remote volume of `remote` bytes.
pub fn fits(local: u64, remote: u64) -> bool {
    local >= remote || (!local.is_multiple_of(GIB) && remote == local.div_ceil(GIB) * GIB)
}

/// Suggests a complete mapping; `original` selects the identity rule first.
pub fn suggest(
    remote: &[AgentDisk],
    local: &[InventoryDisk],
    original: bool,
) -> Result<Vec<DeviceMapping>, MappingError> {
    if original && remote.len() <= local.len() {
        let identity: Vec<_> = remote
            .iter()
            .zip(local)
            .map(|(r, l)| (r, l, fits(l.size_bytes, r.size_bytes)))
            .collect();
        if identity.iter().all(|(_, _, ok)| *ok) {
            return Ok(identity
                .into_iter()
                .map(|(r, l, _)| DeviceMapping {
                    remote: r.id.clone(),
                    local: l.path.clone(),
                })
                .collect());
        }
    }
    // Largest volume first, each to the smallest unused disk that fits it.
    let mut order: Vec<&AgentDisk> = remote.iter().collect();
    order.sort_by(|a, b| b.size_bytes.cmp(&a.size_bytes).then(a.id.cmp(&b.id)));
    let mut used = vec![false; local.len()];
    let mut chosen = Vec::new();
    for r in order {
        let best = local
            .iter()
            .enumerate()
            .filter(|(i, l)| !used[*i] && fits(l.size_bytes, r.size_bytes))
            .min_by_key(|(i, l)| (l.size_bytes, *i));
        let Some((i, l)) = best else {
            return Err(MappingError::NoFit {
                remote: r.id.clone(),
                size: r.size_bytes,
            });
        };
        used[i] = true;
        chosen.push((r.id.clone(), l.path.clone()));
    }
    // Report in the agent's volume order.
    Ok(remote
        .iter()
        .filter_map(|r| {
            chosen
                .iter()
                .find(|(id, _)| *id == r.id)
                .map(|(_, l)| DeviceMapping {
                    remote: r.id.clone(),
                    local: l.clone(),
                })
        })
        .collect())
}

fn find_local<'a>(local: &'a [InventoryDisk], name: &str) -> Option<&'a InventoryDisk> {
    local
        .iter()
        .find(|l| l.path == name || l.by_path.as_deref() == Some(name))
}

/// Checks a client's override against the volumes and the inventory.
pub fn check_override(
    remote: &[AgentDisk],
    local: &[InventoryDisk],
    list: &[DeviceMapping],
) -> Result<Vec<DeviceMapping>, MappingError> {
    failback_api::validate_mapping(list).map_err(|e| MappingError::Invalid(e.to_string()))?;
    for m in list {
        let Some(r) = remote.iter().find(|r| r.id == m.remote) else {
            return Err(MappingError::UnknownRemote {
                remote: m.remote.clone(),
                known: remote
                    .iter()
                    .map(|r| r.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        if m.is_excluded() {
            continue;
        }
        let l = find_local(local, &m.local).ok_or_else(|| MappingError::UnknownLocal {
            local: m.local.clone(),
        })?;
        if !fits(l.size_bytes, r.size_bytes) {
            return Err(MappingError::TooSmall {
                remote: r.id.clone(),
                local: m.local.clone(),
                remote_size: r.size_bytes,
                local_size: l.size_bytes,
            });
        }
    }
    for r in remote {
        if !list.iter().any(|m| m.remote == r.id) {
            return Err(MappingError::Unmapped {
                remote: r.id.clone(),
            });
        }
    }
    Ok(list.to_vec())
}

/// Where a restored disk is on this boot of an already failed-back machine: device names
/// (`/dev/sda`) can change between boots (a USB stick, another controller order), so the disk
/// is found as the pairing found it, by what is stable. In order: the device the client's
/// override (the seed's mapping) names for the volume; the one disk of `now` with the serial,
/// WWN or `/dev/disk/by-path` link that the disk at `recorded` had in `then` (the inventory of
/// the pairing that completed); the disk the normal suggestion rules pick on `now`
/// (`suggested`); else `recorded` unchanged. The client checks the disk's digest before it
/// boots anything, so a wrong guess ends in a clear refusal, never in booting another disk.
pub fn locate_restored(
    remote: &str,
    recorded: &str,
    then: &[InventoryDisk],
    now: &[InventoryDisk],
    requested: Option<&[DeviceMapping]>,
    suggested: &[DeviceMapping],
) -> String {
    if let Some(m) = requested
        .into_iter()
        .flatten()
        .find(|m| m.remote == remote && !m.is_excluded())
    {
        return m.local.clone();
    }
    if let Some(old) = find_local(then, recorded) {
        type Key = fn(&InventoryDisk) -> Option<&str>;
        let keys: [Key; 3] = [
            |d| d.serial.as_deref(),
            |d| d.wwn.as_deref(),
            |d| d.by_path.as_deref(),
        ];
        for key in keys {
            let Some(want) = key(old).map(str::trim).filter(|k| !k.is_empty()) else {
                continue;
            };
            let mut hits = now.iter().filter(|d| key(d).map(str::trim) == Some(want));
            if let (Some(d), None) = (hits.next(), hits.next()) {
                return d.path.clone();
            }
        }
    }
    suggested
        .iter()
        .find(|m| m.remote == remote && !m.is_excluded())
        .map_or_else(|| recorded.to_string(), |m| m.local.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(id: &str, size: u64) -> AgentDisk {
        AgentDisk {
            id: id.into(),
            size_bytes: size,
            logical_sector_size: 512,
            device: None,
        }
    }
    fn l(path: &str, size: u64) -> InventoryDisk {
        InventoryDisk {
            path: path.into(),
            size_bytes: size,
            logical_sector_size: 512,
            ..Default::default()
        }
    }

    #[test]
    fn fractional_gib_rounding_rule() {
        assert!(fits(11 * GIB, 11 * GIB));
        assert!(fits(10 * GIB + GIB / 2, 11 * GIB));
        assert!(!fits(10 * GIB, 11 * GIB));
        assert!(!fits(9 * GIB + 1, 11 * GIB));
    }

    #[test]
    fn identity_for_original_server() {
        let m = suggest(
            &[r("a", 10 * GIB), r("b", 20 * GIB)],
            &[l("/dev/sda", 10 * GIB), l("/dev/sdb", 30 * GIB)],
            true,
        )
        .unwrap();
        assert_eq!(m[0].local, "/dev/sda");
        assert_eq!(m[1].local, "/dev/sdb");
    }

    #[test]
    fn by_size_smallest_fitting() {
        let m = suggest(
            &[r("a", 10 * GIB), r("b", 20 * GIB)],
            &[
                l("/dev/big", 50 * GIB),
                l("/dev/mid", 20 * GIB),
                l("/dev/s", 12 * GIB),
            ],
            false,
        )
        .unwrap();
        assert_eq!(
            m[0],
            DeviceMapping {
                remote: "a".into(),
                local: "/dev/s".into()
            }
        );
        assert_eq!(
            m[1],
            DeviceMapping {
                remote: "b".into(),
                local: "/dev/mid".into()
            }
        );
        let e = suggest(&[r("a", 10 * GIB)], &[l("/dev/s", 9 * GIB)], false).unwrap_err();
        assert!(e.to_string().contains("recovery volume a"));
    }

    #[test]
    fn override_checked() {
        let remote = [r("a", 10 * GIB), r("b", GIB)];
        let local = [l("/dev/sda", 10 * GIB), l("/dev/sdb", GIB / 2)];
        let ok = [
            DeviceMapping {
                remote: "a".into(),
                local: "/dev/sda".into(),
            },
            DeviceMapping {
                remote: "b".into(),
                local: "EXCLUDE".into(),
            },
        ];
        assert!(check_override(&remote, &local, &ok).is_ok());
        let small = [
            DeviceMapping {
                remote: "a".into(),
                local: "/dev/sdb".into(),
            },
            DeviceMapping {
                remote: "b".into(),
                local: "EXCLUDE".into(),
            },
        ];
        assert!(matches!(
            check_override(&remote, &local, &small),
            Err(MappingError::TooSmall { .. })
        ));
        let partial = [DeviceMapping {
            remote: "a".into(),
            local: "/dev/sda".into(),
        }];
        assert_eq!(
            check_override(&remote, &local, &partial),
            Err(MappingError::Unmapped { remote: "b".into() })
        );
    }

    fn ld(path: &str, serial: Option<&str>, by_path: Option<&str>) -> InventoryDisk {
        InventoryDisk {
            serial: serial.map(str::to_string),
            by_path: by_path.map(str::to_string),
            ..l(path, GIB)
        }
    }

    fn dm(remote: &str, local: &str) -> DeviceMapping {
        DeviceMapping {
            remote: remote.into(),
            local: local.into(),
        }
    }

    #[test]
    fn restored_disk_found_by_serial_when_its_name_changed() {
        // At pairing the restored disk was /dev/sda; now a USB stick is /dev/sda.
        let then = [ld("/dev/sda", Some("6000c29a"), None)];
        let now = [
            ld("/dev/sda", Some("usb-stick"), None),
            ld("/dev/sdb", Some("6000c29a"), None),
        ];
        let suggested = [dm("disk0", "/dev/sda")];
        assert_eq!(
            locate_restored("disk0", "/dev/sda", &then, &now, None, &suggested),
            "/dev/sdb"
        );
        // No serial: the by-path link.
        let then = [ld(
            "/dev/sda",
            None,
            Some("/dev/disk/by-path/pci-0000:00:10.0-scsi-0:0:0:0"),
        )];
        let now = [
            ld(
                "/dev/sda",
                None,
                Some("/dev/disk/by-path/pci-0000:00:14.0-usb-0:1:1.0-scsi-0:0:0:0"),
            ),
            ld(
                "/dev/sdb",
                None,
                Some("/dev/disk/by-path/pci-0000:00:10.0-scsi-0:0:0:0"),
            ),
        ];
        assert_eq!(
            locate_restored("disk0", "/dev/sda", &then, &now, None, &suggested),
            "/dev/sdb"
        );
    }

    #[test]
    fn restored_disk_mapping_wins_and_ambiguity_falls_back_to_the_suggestion() {
        let then = [ld("/dev/sda", Some("same"), None)];
        let now = [
            ld("/dev/sda", Some("same"), None),
            ld("/dev/sdb", Some("same"), None),
        ];
        let suggested = [dm("disk0", "/dev/sdb")];
        // Two disks with the recorded serial: not a match; the normal suggestion decides.
        assert_eq!(
            locate_restored("disk0", "/dev/sda", &then, &now, None, &suggested),
            "/dev/sdb"
        );
        // The seed's mapping names the device: it wins.
        let req = [dm("disk0", "/dev/vdc")];
        assert_eq!(
            locate_restored("disk0", "/dev/sda", &then, &now, Some(&req), &suggested),
            "/dev/vdc"
        );
        // Nothing known at all: the recorded path.
        assert_eq!(
            locate_restored("disk0", "/dev/sda", &[], &[], None, &[]),
            "/dev/sda"
        );
    }
}
