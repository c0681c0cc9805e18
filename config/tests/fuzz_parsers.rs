//! Structure-aware fuzzing of the seed, kernel-command-line and plan parsers (the appliance
//! client's configuration is the seed plus `failback.KEY=VALUE` overrides; the agent and the
//! service take flags only, their request bodies are covered by fuzz_api.rs).
//!
//! proptest on stable, inside `cargo test` (see replication/tests/fuzz_wire.rs for why);
//! `FAILBACK_FUZZ_CASES=N` sets the number of cases. Inputs: TOML and JSON written from JSON
//! trees keyed by the real field names, and byte-level edits of valid example files.
//! Asserted: no panic; a syntax or type error names its line; a validation error names its
//! field; whatever parses and validates survives encode → parse unchanged.

mod fuzz_common;

use failback_config::plan::{Plan, PlanError, PlanFormat};
use failback_config::seed::{kernel_overrides, Completeness, SeedConfig, SeedError, OVERRIDE_KEYS};
use fuzz_common::{arb_edit, arb_object, arb_value, config, edit, STRINGS};
use proptest::prelude::*;

const SEED: &str = r#"server_url = "https://dr.example.com:8443"
token = "fbt_abc"
instance_id = "ri-0123"
no_prompt = true
after = "reboot"
ca_cert_pem = """
-----BEGIN CERTIFICATE-----
MIIBszCCAVmgAwIBAgIU
-----END CERTIFICATE-----
"""

[network]
mode = "static"
interface = "eth0"
ipv4 = { address = "192.0.2.10/24", gateway = "192.0.2.1" }
ipv6 = { address = "2001:db8::10/64", gateway = "2001:db8::1" }
dns = ["192.0.2.53"]

[proxy]
url = "http://proxy.example.com:3128"
no_proxy = ["10.0.0.1"]

[[map]]
remote = "vol-0a1b"
local = "/dev/disk/by-path/pci-0000:00:10.0-scsi-0:0:0:0"
"#;

const PLAN: &str = r#"version = 1
unmatched_instances = ["ri-0042"]

[[vm]]
recovery_instance = "ri-0001"
matched_by = "bios_uuid"
[vm.target]
name = "web-01"
moref = "vm-63"
bios_uuid = "4216a1b2-1234-5678-9abc-def012345678"
[vm.network]
mode = "static"
address = "192.168.10.21/24"
gateway = "192.168.10.1"
dns = ["192.168.10.2"]
proxy = "http://proxy.example:3128"
[[vm.device_mapping]]
remote = "vol-1"
local = "/dev/sdb"
[vm.options]
protective_snapshot = true
launch = "auto"
[vm.options.timeouts]
pair_secs = 900

[[vm]]
[vm.target]
moref = "vm-64"
"#;

/// Top-level seed fields: a validation error must name one of them (or a path below one).
const SEED_FIELDS: &[&str] = &[
    "server_url",
    "token",
    "instance_id",
    "no_prompt",
    "after",
    "ca_cert_pem",
    "network",
    "proxy",
    "map",
];

/// TOML text of a JSON tree, if TOML can express it (no nulls, a table at the top).
fn to_toml(v: &serde_json::Value) -> Option<String> {
    toml::to_string(v).ok()
}

fn check_seed_text(text: &str) -> Result<(), TestCaseError> {
    let seed = match SeedConfig::from_toml(text) {
        Ok(s) => s,
        Err(SeedError::Parse(msg)) => {
            prop_assert!(msg.contains("line "), "parse error without a line: {msg}");
            return Ok(());
        }
        Err(e) => return Err(TestCaseError::fail(format!("from_toml returned {e:?}"))),
    };
    for c in [Completeness::Partial, Completeness::Complete] {
        if let Err(e) = seed.validate(c) {
            check_seed_error(&e, "")?;
        }
    }
    let again = SeedConfig::from_toml(&seed.to_toml());
    prop_assert_eq!(again, Ok(seed), "seed does not survive to_toml → from_toml");
    Ok(())
}

/// A validation error names a seed field (or, for overrides, `failback.KEY`).
fn check_seed_error(e: &SeedError, prefix: &str) -> Result<(), TestCaseError> {
    let field = match e {
        SeedError::Missing { field, .. } => field.to_string(),
        SeedError::Invalid { field, .. } => field.clone(),
        SeedError::Parse(m) => {
            return Err(TestCaseError::fail(format!(
                "parse error from validate: {m}"
            )))
        }
    };
    // Overrides name the key as typed (`failback.` + key, even an empty or unknown one).
    let named = if prefix.is_empty() {
        SEED_FIELDS.iter().any(|f| {
            field == *f
                || field.starts_with(&format!("{f}."))
                || field.starts_with(&format!("{f}["))
        })
    } else {
        field.starts_with(prefix)
    };
    prop_assert!(named, "error does not name a field: {e}");
    Ok(())
}

fn check_plan_text(text: &str, format: PlanFormat) -> Result<(), TestCaseError> {
    let plan = match Plan::parse(text, format, "fuzz.plan") {
        Ok(p) => p,
        Err(e @ (PlanError::Toml { .. } | PlanError::Json { .. })) => {
            let msg = e.to_string();
            prop_assert!(msg.contains("fuzz.plan") && msg.contains("line "), "{msg}");
            return Ok(());
        }
        Err(e) => return Err(TestCaseError::fail(format!("parse returned {e}"))),
    };
    match plan.validate() {
        Ok(()) => {}
        Err(PlanError::Invalid(issues)) => {
            prop_assert!(!issues.is_empty());
            for i in &issues {
                prop_assert!(
                    !i.field.is_empty() && !i.vm.is_empty() && !i.message.is_empty(),
                    "{i}"
                );
            }
        }
        Err(e) => return Err(TestCaseError::fail(format!("validate returned {e}"))),
    }
    for f in [PlanFormat::Toml, PlanFormat::Json] {
        let text = plan
            .encode(f)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let again =
            Plan::parse(&text, f, "again").map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(
            &again,
            &plan,
            "plan does not survive encode → parse ({:?})",
            f
        );
    }
    Ok(())
}

#[test]
fn examples_are_valid() {
    let seed = SeedConfig::from_toml(SEED).unwrap();
    seed.validate(Completeness::Complete).unwrap();
    let plan = Plan::parse(PLAN, PlanFormat::Toml, "example").unwrap();
    plan.validate().unwrap();
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn seed_from_trees(v in arb_object()) {
        if let Some(text) = to_toml(&v) {
            check_seed_text(&text)?;
        }
    }

    #[test]
    fn seed_from_edited_example(edits in prop::collection::vec(arb_edit(), 1..6)) {
        check_seed_text(&edit(SEED, &edits))?;
    }

    /// Kernel command-line overrides on a valid seed: each refusal names `failback.KEY`, and
    /// what is accepted still validates as a partial seed or names its culprit.
    #[test]
    fn overrides_on_a_valid_seed(
        pairs in prop::collection::vec((
            prop_oneof![
                4 => prop::sample::select(OVERRIDE_KEYS).prop_map(|(k, _)| k.to_string()),
                1 => prop::sample::select(OVERRIDE_KEYS).prop_map(|(_, f)| f.to_string()),
                1 => "[a-z_.]{0,12}",
            ],
            prop_oneof![
                3 => prop::sample::select(STRINGS).prop_map(str::to_string),
                1 => ".{0,30}",
            ],
        ), 0..5)
    ) {
        let mut seed = SeedConfig::from_toml(SEED).unwrap();
        match seed.apply_overrides(&pairs) {
            Ok(()) => check_seed_text(&seed.to_toml())?,
            Err(e) => check_seed_error(&e, "failback.")?,
        }
    }

    /// The kernel command-line splitter: no panic, every key it returns was on the line.
    #[test]
    fn kernel_cmdline(
        words in prop::collection::vec(prop_oneof![
            "failback\\.[a-z_]{0,10}=[a-z0-9/=,\" .:-]{0,20}",
            "\"?failback\\.map=\"?[a-z0-9=/, ]{0,20}\"?",
            "[a-z=\"]{0,10}",
            ".{0,10}",
        ], 0..6),
        sep in prop_oneof![Just(" "), Just("  "), Just("\t"), Just("\n")],
    ) {
        let line = words.join(sep);
        for (k, _) in kernel_overrides(&line) {
            prop_assert!(line.contains(&format!("failback.{k}")), "key {k:?} not on {line:?}");
        }
    }

    #[test]
    fn plan_from_trees(v in arb_value(), top in arb_object()) {
        // A plan tree: a real version and [[vm]] entries built from the generated values.
        let mut top = top;
        if let serde_json::Value::Object(m) = &mut top {
            m.insert("version".into(), 1.into());
            m.entry("vm").or_insert_with(|| serde_json::Value::Array(vec![v]));
        }
        check_plan_text(&serde_json::to_string(&top).unwrap(), PlanFormat::Json)?;
        if let Some(text) = to_toml(&top) {
            check_plan_text(&text, PlanFormat::Toml)?;
        }
    }

    #[test]
    fn plan_from_edited_example(edits in prop::collection::vec(arb_edit(), 1..6), json in any::<bool>()) {
        if json {
            let plan = Plan::parse(PLAN, PlanFormat::Toml, "example").unwrap();
            let text = plan.encode(PlanFormat::Json).unwrap();
            check_plan_text(&edit(&text, &edits), PlanFormat::Json)?;
        } else {
            check_plan_text(&edit(PLAN, &edits), PlanFormat::Toml)?;
        }
    }

    /// `--map` / `failback.map=` text, as a list or as JSON.
    #[test]
    fn device_mapping_text(
        text in prop_oneof![
            "[a-z0-9/=, -]{0,40}",
            arb_value().prop_map(|v| v.to_string()),
            ".{0,40}",
        ]
    ) {
        if let Ok(list) = failback_config::mapping::parse_device_mapping(&text) {
            prop_assert!(failback_config::mapping::validate_mapping(&list).is_ok(), "{text:?} parsed to an invalid mapping");
        }
    }
}
