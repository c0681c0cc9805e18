//! Shared pieces of the parser and API fuzz tests: case counts, JSON trees built from the
//! config's own field names and values, and text mutations.
#![allow(dead_code)]

use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{Map, Number, Value};

/// Environment variable that sets the number of cases of every fuzz test (a longer run than
/// the bounded one in `cargo test`): `FAILBACK_FUZZ_CASES=100000`.
pub const CASES_ENV: &str = "FAILBACK_FUZZ_CASES";

/// Proptest settings: `default` cases unless [`CASES_ENV`] says otherwise; no regression files
/// written into the source tree (findings become named regression tests instead).
pub fn config(default: u32) -> ProptestConfig {
    let cases = std::env::var(CASES_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Field names of the seed, plan and API types: objects built from these reach deep into the
/// structs instead of stopping at the first unknown field.
pub const FIELDS: &[&str] = &[
    "accepted",
    "address",
    "after",
    "agent_address",
    "bios_uuid",
    "block_size",
    "by_path",
    "ca_cert_pem",
    "cert_sans",
    "client_version",
    "complete_secs",
    "cores",
    "cpus",
    "device",
    "device_mapping",
    "dhcp_timeout_secs",
    "digests",
    "disks",
    "dns",
    "error",
    "fqdn",
    "gateway",
    "hostname",
    "id",
    "instance_id",
    "instance_uuid",
    "interface",
    "inventory",
    "ipv4",
    "ipv6",
    "kind",
    "last_consistent_at",
    "last_round_differing_bytes",
    "last_round_secs",
    "launch",
    "local",
    "local_digest",
    "local_path",
    "agent_digest",
    "log",
    "logical_sector_size",
    "mac_addresses",
    "map",
    "matched_by",
    "message",
    "mode",
    "model",
    "moref",
    "name",
    "network",
    "no_prompt",
    "no_proxy",
    "options",
    "pair_secs",
    "path",
    "phase",
    "private_address",
    "protective_snapshot",
    "proxy",
    "ram_bytes",
    "recovery_instance",
    "recovery_instance_id",
    "recovery_instance_ids",
    "remote",
    "remote_id",
    "replicated_bytes",
    "rescanned_bytes",
    "backlog_bytes",
    "round",
    "serial",
    "server_url",
    "shutdown_secs",
    "size_bytes",
    "smbios_uuid",
    "source_hints",
    "stage",
    "sync_secs",
    "target",
    "timeouts",
    "token",
    "total_bytes",
    "ttl_secs",
    "unmatched_instances",
    "url",
    "use_private_ip",
    "vcenter_secs",
    "version",
    "vm",
    "vmware_uuid",
    "wwn",
    "bandwidth_throttling_mbps",
];

/// String values the parsers and validators give meaning to, and some hostile ones.
pub const STRINGS: &[&str] = &[
    "",
    "static",
    "dhcp",
    "reboot",
    "poweroff",
    "auto",
    "manual",
    "bios_uuid",
    "instance_uuid",
    "name",
    "pairing",
    "agent",
    "SYNCING",
    "IDLE",
    "COMPLETED",
    "FAILED",
    "192.0.2.10/24",
    "192.0.2.1",
    "192.0.2.10/0",
    "192.0.2.10/33",
    "2001:db8::10/64",
    "2001:db8::1",
    "::/129",
    "https://dr.example.com:8443",
    "https://[::1]:0",
    "https://a@b",
    "http://proxy:3128",
    "https://",
    "vol-1=/dev/sda",
    "vol-1=EXCLUDE",
    "EXCLUDE",
    "/dev/sda",
    "ri-0001",
    "..",
    "../../etc/passwd",
    "%2e%2e%2f",
    "4216a1b2-1234-5678-9abc-def012345678",
    "fbt_abc",
    "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    "-----BEGIN CERTIFICATE-----",
    "é漢字\u{0}\u{202e}",
    "a\nb",
    "\"",
    "=",
    "[",
    "{",
];

pub fn arb_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        prop_oneof![
            any::<u64>(),
            Just(0u64),
            Just(1),
            Just(u64::from(u32::MAX) + 1),
            0u64..100_000
        ]
        .prop_map(|n| Value::Number(n.into())),
        any::<i64>().prop_map(|n| Value::Number(n.into())),
        any::<f64>().prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop::sample::select(STRINGS).prop_map(|s| Value::String(s.to_string())),
        ".{0,20}".prop_map(Value::String),
    ]
}

/// A key: mostly a known field name.
pub fn arb_key() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(FIELDS).prop_map(str::to_string),
        1 => "[a-z_]{1,10}",
        1 => ".{0,8}",
    ]
}

/// JSON trees a few levels deep, objects keyed mostly by known field names.
pub fn arb_value() -> impl Strategy<Value = Value> {
    arb_leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((arb_key(), inner), 0..7)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// An object at the top (what every config and body is).
pub fn arb_object() -> impl Strategy<Value = Value> {
    prop::collection::vec((arb_key(), arb_value()), 0..8)
        .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>()))
}

/// One edit of a text.
#[derive(Debug, Clone)]
pub enum Edit {
    /// Replace the byte at a position.
    Set(Index, u8),
    /// Insert a snippet.
    Insert(Index, &'static str),
    /// Remove up to n bytes.
    Remove(Index, u8),
    /// Duplicate a stretch (repeats keys, sections, brackets).
    Repeat(Index, u8),
}

/// Snippets of TOML/JSON syntax and values worth inserting anywhere.
const SNIPPETS: &[&str] = &[
    "\"",
    "'",
    "=",
    "[",
    "]",
    "{",
    "}",
    ",",
    ":",
    "\n",
    "#",
    "[[vm]]\n",
    "[network]\n",
    "\"\"\"",
    "0",
    "-1",
    "1e999",
    "18446744073709551616",
    "true",
    "null",
    "\\u0000",
    "\\",
    "x = 1\n",
    "\"x\": 1,",
    "[[map]]\n",
];

pub fn arb_edit() -> impl Strategy<Value = Edit> {
    let i = any::<Index>;
    prop_oneof![
        (i(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        (i(), prop::sample::select(SNIPPETS)).prop_map(|(i, s)| Edit::Insert(i, s)),
        (i(), 1u8..12).prop_map(|(i, n)| Edit::Remove(i, n)),
        (i(), 1u8..24).prop_map(|(i, n)| Edit::Repeat(i, n)),
    ]
}

/// Applies edits to `text`'s bytes; the result is read back lossily as UTF-8.
pub fn edit(text: &str, edits: &[Edit]) -> String {
    let mut b = text.as_bytes().to_vec();
    for e in edits {
        let len = b.len();
        match e {
            Edit::Set(i, v) if len > 0 => {
                let p = i.index(len);
                b[p] = *v;
            }
            Edit::Insert(i, s) => {
                let p = i.index(len + 1);
                b.splice(p..p, s.bytes());
            }
            Edit::Remove(i, n) if len > 0 => {
                let p = i.index(len);
                b.drain(p..(p + usize::from(*n)).min(len));
            }
            Edit::Repeat(i, n) if len > 0 => {
                let p = i.index(len);
                let stretch = b[p..(p + usize::from(*n)).min(len)].to_vec();
                b.splice(p..p, stretch);
            }
            _ => {}
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}
