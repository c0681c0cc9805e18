//! Request text checked against its format before anything uses it.
//!
//! - URL parameters ([`path_params`], a route layer): `{id}` under `/v1/admin/instances/` must
//!   be a recovery instance id, `{name}` a log name as the service creates them, any other
//!   parameter a short plain word; the `instance` query parameter an instance id. Axum has
//!   already percent-decoded the value once, so `..%2F`, `%2e%2e%2f`, `..%252F`, NUL,
//!   backslashes and absolute paths all fail the format (400 naming the parameter) before a
//!   handler, and so before any file path is built.
//! - Request bodies ([`Validate`], run by `http::parse` after deserializing): length limits
//!   for every string and list, reported as 400 with the JSON path of the field.

use std::collections::HashMap;

use axum::extract::path::ErrorKind;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request};
use axum::middleware::Next;
use axum::response::Response;
use failback_api::{self as api, *};

use crate::service::ApiFailure;

type R<T> = Result<T, ApiFailure>;

/// Longest id or name accepted anywhere in a URL.
pub const MAX_PARAM: usize = 128;
/// Host names (RFC 1035 limit) and `host:port` addresses.
pub const MAX_HOST: usize = 253;
pub const MAX_ADDRESS: usize = 300;
/// Volume ids, UUIDs, MAC addresses, serials, WWNs, names, versions.
pub const MAX_SHORT: usize = 256;
/// Device paths and by-path links.
pub const MAX_PATH: usize = 1024;
/// Tokens and secrets (ours are < 100 characters).
pub const MAX_TOKEN: usize = 256;
/// Free text (a client error message).
pub const MAX_TEXT: usize = 8 << 10;
/// Disks, MAC addresses, CPUs, mapping entries, digests per request.
pub const MAX_ITEMS: usize = 256;

fn too_long(field: &str, len: usize, max: usize) -> ApiFailure {
    ApiFailure::bad(field, format!("field {field}: {len} bytes, at most {max}"))
}

/// Checks a string's length, naming `field`.
pub fn len(field: &str, s: &str, max: usize) -> R<()> {
    if s.len() > max {
        return Err(too_long(field, s.len(), max));
    }
    Ok(())
}

fn opt(field: &str, s: &Option<String>, max: usize) -> R<()> {
    s.as_deref().map_or(Ok(()), |s| len(field, s, max))
}

fn count(field: &str, n: usize) -> R<()> {
    if n > MAX_ITEMS {
        return Err(ApiFailure::bad(
            field,
            format!("field {field}: {n} entries, at most {MAX_ITEMS}"),
        ));
    }
    Ok(())
}

/// Shows at most 40 characters of a refused value, escaped (it may hold control bytes).
fn shown(s: &str) -> String {
    let cut: String = s.chars().take(40).collect();
    let more = if cut.len() < s.len() { "..." } else { "" };
    format!("{cut:?}{more}")
}

/// A recovery instance id from a URL: `i-` + 8..=32 hex digits.
pub fn instance_id(field: &str, id: &str) -> R<()> {
    if api::valid_instance_id(id) {
        return Ok(());
    }
    Err(ApiFailure::bad(
        field,
        format!(
            "{field} {} is not a recovery instance id (i- followed by 8..32 hex digits)",
            shown(id)
        ),
    ))
}

fn all(s: &str, f: impl Fn(u8) -> bool) -> bool {
    !s.is_empty() && s.bytes().all(f)
}

fn hex(s: &str) -> bool {
    all(s, |b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// True for the names the service gives stored logs: `fc-<16 hex>-<unix>-<6 hex>.log`
/// (client uploads) and `boot-<unix>-<6 hex>.log` (boot reports).
pub fn is_log_name(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".log") else {
        return false;
    };
    let rest = match stem.strip_prefix("fc-") {
        Some(r) => match r.split_once('-') {
            Some((client, rest)) if client.len() == 16 && hex(client) => rest,
            _ => return false,
        },
        None => match stem.strip_prefix("boot-") {
            Some(r) => r,
            None => return false,
        },
    };
    match rest.split_once('-') {
        Some((secs, tag)) => {
            secs.len() <= 20 && all(secs, |b| b.is_ascii_digit()) && tag.len() == 6 && hex(tag)
        }
        None => false,
    }
}

/// A stored log's name from a URL.
pub fn log_name(field: &str, name: &str) -> R<()> {
    if is_log_name(name) {
        return Ok(());
    }
    Err(ApiFailure::bad(
        field,
        format!(
            "{field} {} is not a log name (fc-<client>-<time>-<tag>.log or boot-<time>-<tag>.log)",
            shown(name)
        ),
    ))
}

/// Any other URL parameter: 1..=128 of `A-Z a-z 0-9 _ -`, optionally with inner dots.
pub fn word(field: &str, s: &str) -> R<()> {
    let ok = s.len() <= MAX_PARAM
        && !s.starts_with('.')
        && !s.contains("..")
        && all(s, |b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
    if ok {
        return Ok(());
    }
    Err(ApiFailure::bad(
        field,
        format!("{field} {} is not a plain name", shown(s)),
    ))
}

fn param(route: &str, key: &str, value: &str) -> R<()> {
    match key {
        "id" if route.starts_with(failback_api::routes::ADMIN_INSTANCES_PREFIX) => {
            instance_id("id", value)
        }
        "name" if route.contains("/logs/") => log_name("name", value),
        _ => word(key, value),
    }
}

/// Route layer: checks every path parameter and the `instance` query parameter (400 naming
/// the parameter) before the handler runs.
pub async fn path_params(
    params: Result<Path<Vec<(String, String)>>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    req: Request,
    next: Next,
) -> Response {
    let route = req.uri().path();
    let checked = match params {
        Ok(Path(p)) => p.iter().try_for_each(|(k, v)| param(route, k, v)),
        Err(PathRejection::FailedToDeserializePathParams(e))
            if matches!(e.kind(), ErrorKind::WrongNumberOfParameters { got: 0, .. }) =>
        {
            Ok(())
        }
        // Undecodable parameters (invalid UTF-8 after percent-decoding, e.g. `%ff`).
        Err(e) => Err(ApiFailure::bad("path", format!("path parameter: {e}"))),
    };
    let checked = checked.and_then(
        |_| match query.as_ref().ok().and_then(|q| q.get("instance")) {
            Some(i) => instance_id("instance", i),
            None => Ok(()),
        },
    );
    match checked {
        Ok(()) => next.run(req).await,
        Err(e) => crate::http::failure_response(e),
    }
}

// ---------------------------------------------------------------- bodies

/// Length limits of a request body, checked after deserializing; errors name the field.
pub trait Validate {
    fn validate(&self) -> R<()>;
}

fn hints(f: &str, h: &IdentificationHints) -> R<()> {
    opt(&format!("{f}.vmware_uuid"), &h.vmware_uuid, MAX_SHORT)?;
    opt(&format!("{f}.instance_uuid"), &h.instance_uuid, MAX_SHORT)?;
    opt(&format!("{f}.hostname"), &h.hostname, MAX_HOST)?;
    opt(&format!("{f}.fqdn"), &h.fqdn, MAX_HOST)?;
    macs(&format!("{f}.mac_addresses"), &h.mac_addresses)
}

fn macs(f: &str, list: &[String]) -> R<()> {
    count(f, list.len())?;
    for (i, m) in list.iter().enumerate() {
        len(&format!("{f}[{i}]"), m, MAX_SHORT)?;
    }
    Ok(())
}

fn inventory(f: &str, inv: &Inventory) -> R<()> {
    opt(&format!("{f}.smbios_uuid"), &inv.smbios_uuid, MAX_SHORT)?;
    opt(&format!("{f}.hostname"), &inv.hostname, MAX_HOST)?;
    macs(&format!("{f}.mac_addresses"), &inv.mac_addresses)?;
    count(&format!("{f}.disks"), inv.disks.len())?;
    for (i, d) in inv.disks.iter().enumerate() {
        let p = format!("{f}.disks[{i}]");
        len(&format!("{p}.path"), &d.path, MAX_PATH)?;
        opt(&format!("{p}.serial"), &d.serial, MAX_SHORT)?;
        opt(&format!("{p}.wwn"), &d.wwn, MAX_SHORT)?;
        opt(&format!("{p}.by_path"), &d.by_path, MAX_PATH)?;
    }
    count(&format!("{f}.cpus"), inv.cpus.len())?;
    for (i, c) in inv.cpus.iter().enumerate() {
        len(&format!("{f}.cpus[{i}].model"), &c.model, MAX_SHORT)?;
    }
    Ok(())
}

fn agent_disks(f: &str, disks: &[AgentDisk]) -> R<()> {
    count(f, disks.len())?;
    for (i, d) in disks.iter().enumerate() {
        len(&format!("{f}[{i}].id"), &d.id, MAX_SHORT)?;
        opt(&format!("{f}[{i}].device"), &d.device, MAX_PATH)?;
    }
    Ok(())
}

fn mapping(f: &str, list: &[DeviceMapping]) -> R<()> {
    count(f, list.len())?;
    for (i, m) in list.iter().enumerate() {
        len(&format!("{f}[{i}].remote"), &m.remote, MAX_SHORT)?;
        len(&format!("{f}[{i}].local"), &m.local, MAX_PATH)?;
    }
    Ok(())
}

impl Validate for PairRequest {
    fn validate(&self) -> R<()> {
        len("token", &self.token, MAX_TOKEN)?;
        inventory("inventory", &self.inventory)?;
        opt(
            "recovery_instance_id",
            &self.recovery_instance_id,
            MAX_PARAM,
        )?;
        if let Some(m) = &self.device_mapping {
            mapping("device_mapping", m)?;
        }
        opt("client_version", &self.client_version, MAX_SHORT)
    }
}

impl Validate for ClientReport {
    fn validate(&self) -> R<()> {
        count("disks", self.disks.len())?;
        for (i, d) in self.disks.iter().enumerate() {
            len(&format!("disks[{i}].remote_id"), &d.remote_id, MAX_SHORT)?;
            len(&format!("disks[{i}].local_path"), &d.local_path, MAX_PATH)?;
            disk_wire(&format!("disks[{i}]"), d)?;
        }
        count("digests", self.digests.len())?;
        for (i, d) in self.digests.iter().enumerate() {
            let p = format!("digests[{i}]");
            len(&format!("{p}.remote_id"), &d.remote_id, MAX_SHORT)?;
            len(&format!("{p}.local_path"), &d.local_path, MAX_PATH)?;
            len(&format!("{p}.local_digest"), &d.local_digest, MAX_SHORT)?;
            len(&format!("{p}.agent_digest"), &d.agent_digest, MAX_SHORT)?;
        }
        opt("error", &self.error, MAX_TEXT)
    }
}

impl Validate for ClientCheckpoints {
    /// The form of each resume point (the client checks its content against its disk).
    fn validate(&self) -> R<()> {
        if self.disks.len() > MAX_CHECKPOINT_DISKS {
            let n = self.disks.len();
            let m = format!("field disks: {n} entries, at most {MAX_CHECKPOINT_DISKS}");
            return Err(ApiFailure::bad("disks", m));
        }
        for (i, d) in self.disks.iter().enumerate() {
            checkpoint(&format!("disks[{i}]"), d)?;
        }
        Ok(())
    }
}

fn checkpoint(p: &str, d: &DiskCheckpoint) -> R<()> {
    let bad = |f: &str, m: String| Err(ApiFailure::bad(format!("{p}.{f}"), m));
    len(&format!("{p}.remote"), &d.remote, MAX_SHORT)?;
    len(&format!("{p}.local"), &d.local, MAX_PATH)?;
    opt(&format!("{p}.local_serial"), &d.local_serial, MAX_SHORT)?;
    if d.remote.is_empty() || d.local.is_empty() {
        return bad("remote", "remote and local must not be empty".into());
    }
    let bs = u64::from(d.block_size);
    if !d.block_size.is_power_of_two() || !(4096..=4 << 20).contains(&d.block_size) {
        return bad("block_size", format!("{bs}: a power of two, 4 KiB..4 MiB"));
    }
    if d.offset == 0
        || !d.offset.is_multiple_of(bs)
        || d.offset >= d.disk_size
        || d.offset > d.local_size
    {
        let m = format!(
            "{}: a non-zero multiple of the block size {bs} inside the disk ({} bytes) and \
             the target ({} bytes)",
            d.offset, d.disk_size, d.local_size
        );
        return bad("offset", m);
    }
    if d.window_bytes < bs || !d.window_bytes.is_multiple_of(bs) || d.window_bytes > 64 << 20 {
        let m = format!(
            "{}: a multiple of the block size, at most 64 MiB",
            d.window_bytes
        );
        return bad("window_bytes", m);
    }
    if d.digest.len() != 64 || !hex(&d.digest) {
        return bad("digest", "64 hex digits".into());
    }
    Ok(())
}

/// Largest byte count accepted in a report (1 EiB: no failback moves more).
pub const MAX_REPORT_BYTES: u64 = 1 << 60;
/// Largest rate accepted in a report, bytes per second (1 TB/s: no link is faster).
pub const MAX_REPORT_RATE: u64 = 1 << 40;

fn at_most(field: &str, v: Option<u64>, max: u64) -> R<()> {
    match v {
        Some(v) if v > max => Err(ApiFailure::bad(
            field,
            format!("field {field}: {v}, at most {max}"),
        )),
        _ => Ok(()),
    }
}

/// The per-disk wire figures of a client report: bounded counts and rates (unsigned, so never
/// negative), and a known compression mode.
fn disk_wire(p: &str, d: &DiskProgress) -> R<()> {
    let bytes = [
        ("wire_bytes", d.wire_bytes),
        ("payload_bytes", d.payload_bytes),
        ("compressed_blocks", d.compressed_blocks),
        ("raw_blocks", d.raw_blocks),
    ];
    for (name, v) in bytes {
        at_most(&format!("{p}.{name}"), v, MAX_REPORT_BYTES)?;
    }
    let rates = [
        ("wire_bytes_per_sec", d.wire_bytes_per_sec),
        ("link_bytes_per_sec", d.link_bytes_per_sec),
    ];
    for (name, v) in rates {
        at_most(&format!("{p}.{name}"), v, MAX_REPORT_RATE)?;
    }
    match d.compression.as_deref() {
        None | Some("auto" | "zstd" | "none") => Ok(()),
        Some(other) => {
            let f = format!("{p}.compression");
            Err(ApiFailure::bad(
                &f,
                format!("field {f}: {}, expected auto, zstd or none", shown(other)),
            ))
        }
    }
}

impl Validate for BootReport {
    /// `message` and `log` have their own limits, checked by the boot-report logic.
    fn validate(&self) -> R<()> {
        opt("token", &self.token, MAX_TOKEN)?;
        opt("smbios_uuid", &self.smbios_uuid, MAX_SHORT)?;
        opt(
            "recovery_instance_id",
            &self.recovery_instance_id,
            MAX_PARAM,
        )?;
        opt("client_version", &self.client_version, MAX_SHORT)
    }
}

impl Validate for AgentEnrollRequest {
    fn validate(&self) -> R<()> {
        len("token", &self.token, MAX_TOKEN)?;
        len("address", &self.address, MAX_ADDRESS)?;
        opt("private_address", &self.private_address, MAX_ADDRESS)?;
        agent_disks("disks", &self.disks)?;
        opt("hostname", &self.hostname, MAX_HOST)?;
        if let Some(h) = &self.source_hints {
            hints("source_hints", h)?;
        }
        count("cert_sans", self.cert_sans.len())?;
        for (i, s) in self.cert_sans.iter().enumerate() {
            len(&format!("cert_sans[{i}]"), s, MAX_HOST)?;
        }
        Ok(())
    }
}

impl Validate for AgentHeartbeat {
    fn validate(&self) -> R<()> {
        len("address", &self.address, MAX_ADDRESS)?;
        opt("private_address", &self.private_address, MAX_ADDRESS)?;
        self.disks
            .as_ref()
            .map_or(Ok(()), |d| agent_disks("disks", d))
    }
}

impl Validate for SetHintsRequest {
    fn validate(&self) -> R<()> {
        hints("source_hints", &self.source_hints)
    }
}

impl Validate for UpdateReplicationConfig {
    fn validate(&self) -> R<()> {
        opt("name", &self.name, MAX_SHORT)
    }
}

impl Validate for CreateTokenRequest {
    fn validate(&self) -> R<()> {
        opt(
            "recovery_instance_id",
            &self.recovery_instance_id,
            MAX_PARAM,
        )
    }
}

impl Validate for LaunchRequest {
    /// The count (1..=200) is checked by the launch logic.
    fn validate(&self) -> R<()> {
        for (i, id) in self.recovery_instance_ids.iter().enumerate() {
            len(&format!("recovery_instance_ids[{i}]"), id, MAX_PARAM)?;
        }
        Ok(())
    }
}

impl Validate for CreateCredentialRequest {
    /// The name's format and length are checked by the credential logic.
    fn validate(&self) -> R<()> {
        len("name", &self.name, MAX_SHORT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_names_are_the_generated_ones_only() {
        assert!(is_log_name("fc-0123456789abcdef-1700000000-a1b2c3.log"));
        assert!(is_log_name("boot-1700000000-a1b2c3.log"));
        for bad in [
            "",
            "..",
            "../ca-key.pem",
            "ca-key.pem",
            "boot-1-a1b2c3.log/..",
            "boot-1-a1b2c3.log\0",
            "boot-1-A1B2C3.log",
            "fc-0123-1-a1b2c3.log",
            "boot--a1b2c3.log",
            "/etc/passwd",
            "..\\ca-key.pem",
        ] {
            assert!(!is_log_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn words_refuse_traversal() {
        assert!(word("x", "cred-1.a_b").is_ok());
        for bad in [
            "..",
            ".x",
            "a..b",
            "a/b",
            "a\\b",
            "a\0",
            "",
            &"a".repeat(129),
        ] {
            assert!(word("x", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn body_limits_name_the_field() {
        let mut r = AgentHeartbeat {
            address: "h:1".into(),
            private_address: None,
            disks: Some(vec![AgentDisk {
                id: "x".repeat(MAX_SHORT + 1),
                ..Default::default()
            }]),
        };
        let e = r.validate().unwrap_err();
        assert!(matches!(&e, ApiFailure::BadRequest { field, .. } if field == "disks[0].id"));
        r.disks = Some(vec![AgentDisk::default(); MAX_ITEMS + 1]);
        assert!(r.validate().is_err());
    }
}
