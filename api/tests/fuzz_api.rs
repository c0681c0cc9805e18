//! Structure-aware fuzzing of the DR-service request bodies, parsed by
//! `failback_api::parse_body`, the function dr-service/src/http.rs `parse` calls.
//!
//! proptest on stable, inside `cargo test` (see replication/tests/fuzz_wire.rs for why);
//! `FAILBACK_FUZZ_CASES=N` sets the number of cases. Inputs: JSON trees keyed by the real field
//! names, byte-level edits of valid bodies, arbitrary bytes. Asserted for every body type: no
//! panic; an error on well-formed JSON carries a path that exists in the body (an unknown
//! field's path ends at that field, a missing field's path is the object that lacks it); the
//! service's field name for the error is never empty; an accepted body re-encodes to a body
//! that parses to the same value.

// The generators are shared with config/tests/fuzz_parsers.rs.
#[path = "../../config/tests/fuzz_common/mod.rs"]
mod fuzz_common;

use std::fmt::Debug;

use failback_api::{
    parse_body, AgentEnrollRequest, AgentHeartbeat, BootReport, ClientReport, CreateTokenRequest,
    LaunchRequest, PairRequest, SetHintsRequest, UpdateReplicationConfig,
};
use fuzz_common::{arb_edit, arb_object, arb_value, config, edit};
use proptest::prelude::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use serde_path_to_error::{Path, Segment};

/// The error's path as serde_path_to_error reports it (to check it against the body), next to
/// what the service answers ([`parse_body`], used by dr-service/src/http.rs `parse`).
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, (Path, String, String)> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    let path = match serde_path_to_error::deserialize::<_, T>(de) {
        Ok(_) => None,
        Err(e) => Some(e.path().clone()),
    };
    match (parse_body::<T>(body), path) {
        (Ok(v), None) => Ok(v),
        (Err(e), Some(path)) => Err((path, e.message, e.field)),
        (Ok(_), Some(p)) => panic!("parse_body accepted a body refused at {p}"),
        (Err(e), None) => panic!("parse_body refused an accepted body: {e}"),
    }
}

/// The node of `v` that `path` names, if every segment exists.
fn resolve<'a>(v: &'a Value, path: &Path) -> Option<&'a Value> {
    let mut at = v;
    for seg in path.iter() {
        at = match (seg, at) {
            (Segment::Seq { index }, Value::Array(a)) => a.get(*index)?,
            (Segment::Map { key }, Value::Object(m)) => m.get(key)?,
            // Enum variants and unknown segments do not move within the JSON tree here.
            (Segment::Enum { .. } | Segment::Unknown, _) => at,
            _ => return None,
        };
    }
    Some(at)
}

/// Parses `body` as `T` and checks the error or the round trip.
fn check<T>(body: &[u8]) -> Result<(), TestCaseError>
where
    T: DeserializeOwned + Serialize + PartialEq + Debug,
{
    match parse::<T>(body) {
        Ok(v) => {
            let again = serde_json::to_vec(&v).unwrap();
            let back = parse::<T>(&again).map_err(|(_, m, f)| {
                TestCaseError::fail(format!("re-encoded body refused at {f}: {m}"))
            })?;
            // serde_json's default float parsing may be one ULP off (`last_round_secs`).
            let (a, b) = (
                serde_json::to_value(&back).unwrap(),
                serde_json::to_value(&v).unwrap(),
            );
            prop_assert!(
                same(&a, &b),
                "round trip changed the body: {v:?} -> {back:?}"
            );
        }
        Err((path, inner, field)) => {
            prop_assert!(!field.is_empty(), "empty field for {inner}");
            let Ok(tree) = serde_json::from_slice::<Value>(body) else {
                return Ok(()); // a syntax error: serde_json names line and column
            };
            if serde_json::from_slice::<NoDuplicateKeys>(body).is_err() {
                return Ok(()); // the tree keeps the last of two equal keys, serde met the first
            }
            let node = resolve(&tree, &path);
            prop_assert!(
                node.is_some(),
                "error path {path} is not in the body: {inner}"
            );
            if let (Some(name), Some(node)) = (inner.strip_prefix("missing field `"), node) {
                let name = name.split('`').next().unwrap_or("");
                prop_assert!(
                    node.as_object().is_some_and(|m| !m.contains_key(name)),
                    "missing field {name} at {path}, but the body has it there"
                );
            }
        }
    }
    Ok(())
}

/// Any JSON without an object that repeats a key.
struct NoDuplicateKeys;

impl<'de> serde::Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NoDuplicateKeys)
    }
}

impl<'de> serde::de::Visitor<'de> for NoDuplicateKeys {
    type Value = NoDuplicateKeys;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JSON without repeated keys")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Self, A::Error> {
        while a.next_element::<NoDuplicateKeys>()?.is_some() {}
        Ok(self)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Self, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(k) = a.next_key::<String>()? {
            if !seen.insert(k) {
                return Err(serde::de::Error::custom("repeated key"));
            }
            a.next_value::<NoDuplicateKeys>()?;
        }
        Ok(self)
    }
}

/// Equal JSON values, floats within a relative 1e-12.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (
                x.as_f64().unwrap_or(f64::NAN),
                y.as_f64().unwrap_or(f64::NAN),
            );
            x == y || (x - y).abs() <= 1e-12 * x.abs().max(y.abs())
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

/// Runs `check` for every body type the service parses.
fn check_all(body: &[u8]) -> Result<(), TestCaseError> {
    check::<AgentEnrollRequest>(body)?;
    check::<AgentHeartbeat>(body)?;
    check::<PairRequest>(body)?;
    check::<ClientReport>(body)?;
    check::<BootReport>(body)?;
    check::<SetHintsRequest>(body)?;
    check::<UpdateReplicationConfig>(body)?;
    check::<CreateTokenRequest>(body)?;
    check::<LaunchRequest>(body)?;
    Ok(())
}

/// One valid body of each type (the seeds of the edit-based cases).
const VALID: &[&str] = &[
    r#"{"token":"fbt_a","address":"10.0.0.5:7443","disks":[{"id":"vol-1","size_bytes":1048576,"logical_sector_size":512,"device":"/dev/xvdb"}],"hostname":"ri","source_hints":{"vmware_uuid":"4216a1b2-1234-5678-9abc-def012345678","mac_addresses":["00:50:56:aa:bb:cc"]}}"#,
    r#"{"address":"10.0.0.5:7443","private_address":"172.16.0.5:7443","disks":[{"id":"vol-1","size_bytes":4096}]}"#,
    r#"{"token":"fbt_a","inventory":{"smbios_uuid":"4216a1b2-1234-5678-9abc-def012345678","hostname":"web","mac_addresses":["00:50:56:aa:bb:cc"],"disks":[{"path":"/dev/sda","size_bytes":1048576,"serial":"S1"}],"cpus":[{"model":"x","cores":2}],"ram_bytes":1024},"recovery_instance_id":"ri-0001","device_mapping":[{"remote":"vol-1","local":"/dev/sda"}],"client_version":"0.1.0"}"#,
    r#"{"phase":"SYNCING","round":2,"disks":[{"remote_id":"vol-1","local_path":"/dev/sda","total_bytes":10,"replicated_bytes":5,"rescanned_bytes":5,"backlog_bytes":0}],"last_round_differing_bytes":3,"last_round_secs":1.5,"digests":[{"remote_id":"vol-1","local_path":"/dev/sda","local_digest":"ab","agent_digest":"ab"}],"error":null}"#,
    r#"{"token":"fbt_a","smbios_uuid":"4216a1b2-1234-5678-9abc-def012345678","stage":"pair","message":"refused","log":"line 1\nline 2","client_version":"0.1.0"}"#,
    r#"{"source_hints":{"vmware_uuid":"4216a1b2-1234-5678-9abc-def012345678","hostname":"web","fqdn":"web.example"}}"#,
    r#"{"bandwidth_throttling_mbps":100,"use_private_ip":true,"name":"web"}"#,
    r#"{"kind":"pairing","recovery_instance_id":"ri-0001","ttl_secs":3600}"#,
    r#"{"recovery_instance_ids":["ri-0001","ri-0002"]}"#,
];

#[test]
fn valid_bodies_parse() {
    let oks = [
        parse::<AgentEnrollRequest>(VALID[0].as_bytes()).is_ok(),
        parse::<AgentHeartbeat>(VALID[1].as_bytes()).is_ok(),
        parse::<PairRequest>(VALID[2].as_bytes()).is_ok(),
        parse::<ClientReport>(VALID[3].as_bytes()).is_ok(),
        parse::<BootReport>(VALID[4].as_bytes()).is_ok(),
        parse::<SetHintsRequest>(VALID[5].as_bytes()).is_ok(),
        parse::<UpdateReplicationConfig>(VALID[6].as_bytes()).is_ok(),
        parse::<CreateTokenRequest>(VALID[7].as_bytes()).is_ok(),
        parse::<LaunchRequest>(VALID[8].as_bytes()).is_ok(),
    ];
    assert_eq!(oks, [true; 9]);
}

/// The path of an error deep in a body names the exact place (as the service reports it).
#[test]
fn nested_errors_name_their_path() {
    // Regression (found by `bodies_from_trees`): an unknown empty key was reported as field
    // "", an answer naming nothing.
    let Err((_, _, field)) = parse::<LaunchRequest>(br#"{"":null}"#) else {
        panic!("empty key accepted")
    };
    assert_eq!(field, r#"[""]"#);
    let Err((_, _, field)) = parse::<PairRequest>(br#"{"token":"t"}"#) else {
        panic!("missing inventory accepted")
    };
    assert_eq!(field, "inventory");
    let Err((_, _, field)) = parse::<LaunchRequest>(b"[]") else {
        panic!("array accepted")
    };
    assert_eq!(field, ".");
    let body = br#"{"token":"t","inventory":{"disks":[{"path":"/dev/sda","size_bytes":-1}]}}"#;
    let Err((_, _, field)) = parse::<PairRequest>(body) else {
        panic!("negative size accepted")
    };
    assert_eq!(field, "inventory.disks[0].size_bytes");
    let body =
        br#"{"token":"t","inventory":{"disks":[{"path":"/dev/sda","size_bytes":1,"sise":2}]}}"#;
    let Err((_, _, field)) = parse::<PairRequest>(body) else {
        panic!("unknown field accepted")
    };
    assert_eq!(field, "inventory.disks[0].sise");
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn bodies_from_trees(v in arb_object()) {
        check_all(serde_json::to_string(&v).unwrap().as_bytes())?;
    }

    #[test]
    fn bodies_of_any_json(v in arb_value()) {
        check_all(serde_json::to_string(&v).unwrap().as_bytes())?;
    }

    #[test]
    fn edited_valid_bodies(which in 0..VALID.len(), edits in prop::collection::vec(arb_edit(), 1..6)) {
        check_all(edit(VALID[which], &edits).as_bytes())?;
    }

    /// A valid body with one value replaced by an arbitrary one, somewhere in the tree.
    #[test]
    fn valid_bodies_with_a_value_replaced(
        which in 0..VALID.len(),
        at in any::<prop::sample::Index>(),
        with in arb_value(),
    ) {
        let mut tree: Value = serde_json::from_str(VALID[which]).unwrap();
        replace_nth(&mut tree, at, with);
        check_all(serde_json::to_string(&tree).unwrap().as_bytes())?;
    }

    #[test]
    fn arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..200)) {
        check_all(&body)?;
    }
}

/// Replaces one node of `tree` (chosen by `at` among all nodes in pre-order) with `with`.
fn replace_nth(tree: &mut Value, at: prop::sample::Index, with: Value) {
    fn count(v: &Value) -> usize {
        1 + match v {
            Value::Array(a) => a.iter().map(count).sum(),
            Value::Object(m) => m.values().map(count).sum(),
            _ => 0,
        }
    }
    fn walk(v: &mut Value, n: &mut usize, with: &mut Option<Value>) {
        if *n == 0 {
            if let Some(w) = with.take() {
                *v = w;
            }
            return;
        }
        *n -= 1;
        match v {
            Value::Array(a) => a.iter_mut().for_each(|c| walk(c, n, with)),
            Value::Object(m) => m.values_mut().for_each(|c| walk(c, n, with)),
            _ => {}
        }
    }
    let mut n = at.index(count(tree));
    walk(tree, &mut n, &mut Some(with));
}
