//! Device mapping: which recovery-instance volume goes to which local disk. Given by the
//! operator (`failback-client run --map`, the seed's `mappings`) and sent to the DR service in
//! the pairing request (`failback_api::PairRequest::device_mapping`).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One mapping entry: a recovery-instance volume to a local device, or `EXCLUDE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceMapping {
    /// Volume id on the recovery instance.
    pub remote: String,
    /// Local device path, or [`EXCLUDE`].
    pub local: String,
}

/// Marker for a recovery volume that must not be replicated.
pub const EXCLUDE: &str = "EXCLUDE";

impl DeviceMapping {
    pub fn is_excluded(&self) -> bool {
        self.local.eq_ignore_ascii_case(EXCLUDE)
    }
}

/// Mapping override error: names the entry that failed to parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MappingParseError {
    #[error("device mapping entry {entry:?}: expected REMOTE=LOCAL (or REMOTE=EXCLUDE)")]
    BadEntry { entry: String },
    #[error("device mapping: remote volume {remote:?} is mapped twice")]
    DuplicateRemote { remote: String },
    #[error("device mapping: local device {local:?} is the target of two volumes")]
    DuplicateLocal { local: String },
    #[error("device mapping JSON: {0}")]
    Json(String),
}

/// Parses a device mapping in any of the three formats the AWS client accepts:
/// - CSV: `remote=local,remote2=EXCLUDE`
/// - JSON object: `{"remote": "local", "remote2": "EXCLUDE"}`
/// - API list: `[{"remote": "...", "local": "..."}, ...]` (also accepts AWS-style
///   `recoveryInstanceDevice` / `failbackClientDevice` keys)
pub fn parse_device_mapping(s: &str) -> Result<Vec<DeviceMapping>, MappingParseError> {
    let t = s.trim();
    let list: Vec<DeviceMapping> = if t.starts_with('{') {
        let m: BTreeMap<String, String> =
            serde_json::from_str(t).map_err(|e| MappingParseError::Json(e.to_string()))?;
        m.into_iter()
            .map(|(remote, local)| DeviceMapping { remote, local })
            .collect()
    } else if t.starts_with('[') {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Entry {
            #[serde(alias = "recoveryInstanceDevice", alias = "remote_id")]
            remote: String,
            #[serde(alias = "failbackClientDevice", alias = "local_path")]
            local: String,
        }
        let v: Vec<Entry> =
            serde_json::from_str(t).map_err(|e| MappingParseError::Json(e.to_string()))?;
        v.into_iter()
            .map(|e| DeviceMapping {
                remote: e.remote,
                local: e.local,
            })
            .collect()
    } else {
        let mut out = Vec::new();
        for entry in t.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (r, l) = entry
                .split_once('=')
                .ok_or_else(|| MappingParseError::BadEntry {
                    entry: entry.to_string(),
                })?;
            let (r, l) = (r.trim(), l.trim());
            if r.is_empty() || l.is_empty() {
                return Err(MappingParseError::BadEntry {
                    entry: entry.to_string(),
                });
            }
            out.push(DeviceMapping {
                remote: r.to_string(),
                local: l.to_string(),
            });
        }
        out
    };
    validate_mapping(&list)?;
    Ok(list)
}

/// Checks that no remote volume and no local device appears twice.
pub fn validate_mapping(list: &[DeviceMapping]) -> Result<(), MappingParseError> {
    let mut remotes = std::collections::BTreeSet::new();
    let mut locals = std::collections::BTreeSet::new();
    for m in list {
        if m.remote.is_empty() || m.local.is_empty() {
            return Err(MappingParseError::BadEntry {
                entry: format!("{}={}", m.remote, m.local),
            });
        }
        if !remotes.insert(m.remote.clone()) {
            return Err(MappingParseError::DuplicateRemote {
                remote: m.remote.clone(),
            });
        }
        if !m.is_excluded() && !locals.insert(m.local.clone()) {
            return Err(MappingParseError::DuplicateLocal {
                local: m.local.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_three_formats_agree() {
        let csv = parse_device_mapping("vol-a=/dev/sda, vol-b=EXCLUDE").unwrap();
        let obj = parse_device_mapping(r#"{"vol-a":"/dev/sda","vol-b":"EXCLUDE"}"#).unwrap();
        let list = parse_device_mapping(
            r#"[{"recoveryInstanceDevice":"vol-a","failbackClientDevice":"/dev/sda"},{"remote":"vol-b","local":"EXCLUDE"}]"#,
        )
        .unwrap();
        assert_eq!(csv, obj);
        assert_eq!(csv, list);
        assert!(csv[1].is_excluded());
    }

    #[test]
    fn mapping_errors_name_entry() {
        let e = parse_device_mapping("vol-a/dev/sda").unwrap_err();
        assert!(e.to_string().contains("vol-a/dev/sda"));
        let e = parse_device_mapping("a=/dev/x,b=/dev/x").unwrap_err();
        assert_eq!(
            e,
            MappingParseError::DuplicateLocal {
                local: "/dev/x".into()
            }
        );
        assert!(parse_device_mapping("a=EXCLUDE,b=EXCLUDE").is_ok());
    }
}
