//! The per-VM seed: `seed.toml` on a small ISO 9660 labelled [`SEED_LABEL`], attached to the
//! VM next to the appliance ISO. The appliance client reads it at boot to pair unattended.
//!
//! The same type is used by the builder (`failback seed build`, which refuses an incomplete or
//! inconsistent file) and by the client (which accepts a partial seed and asks on the console
//! for what is missing, unless `no_prompt` is set). Kernel command-line overrides
//! (`failback.KEY=VALUE`) are applied with [`SeedConfig::apply_override`].
//!
//! ```toml
//! server_url = "https://dr.example.com:8443"
//! token = "fbt_..."
//! instance_id = "ri-0123"          # optional: the recovery instance this VM fails back from
//! no_prompt = true                 # never ask on the console; fail instead
//! after = "reboot"                 # or "poweroff", once the failback completed
//! ca_cert_pem = """
//! -----BEGIN CERTIFICATE-----
//! ...
//! -----END CERTIFICATE-----
//! """
//!
//! [network]
//! mode = "static"                  # or "dhcp" (default)
//! interface = "eth0"               # optional; default: the first interface with a link
//! ipv4 = { address = "192.0.2.10/24", gateway = "192.0.2.1" }
//! ipv6 = { address = "2001:db8::10/64", gateway = "2001:db8::1" }
//! dns = ["192.0.2.53"]
//!
//! [proxy]
//! url = "http://proxy.example.com:3128"
//!
//! [[map]]                          # optional: otherwise the DR service proposes a mapping
//! remote = "vol-0a1b"
//! local = "/dev/disk/by-path/pci-0000:00:10.0-scsi-0:0:0:0"
//! ```

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// ISO 9660 volume label of the seed ISO. Not `CIDATA`: cloud-init in the restored OS must
/// not pick the seed up.
pub const SEED_LABEL: &str = "FBSEED";
/// ISO 9660 volume label of the appliance ISO itself: the ISO builder writes it, the client
/// finds (and ejects) its boot medium by it and refuses it as a target.
pub const APPLIANCE_LABEL: &str = "FAILBACK";
/// File name of the seed inside the seed ISO.
pub const SEED_FILE_NAME: &str = "seed.toml";
/// Longest accepted pairing token (tokens are short random strings; this bounds garbage).
const MAX_TOKEN_LEN: usize = 512;

/// A seed that is wrong, named by its field (`network.ipv4.gateway`, `token`, ...).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SeedError {
    /// The TOML does not parse or has unknown fields.
    #[error("seed.toml does not parse: {0}")]
    Parse(String),
    /// A field is missing while it is required (builder, or `no_prompt`).
    #[error("seed field `{field}` is required{why}")]
    Missing {
        /// Dotted field name.
        field: &'static str,
        /// Why it is required (empty, or a leading ": ...").
        why: &'static str,
    },
    /// A field has a value that cannot be right.
    #[error("seed field `{field}` is invalid: {reason}")]
    Invalid {
        /// Dotted field name.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> SeedError {
    SeedError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The seed file. Every field is optional at parse time so that the client can take a partial
/// seed and ask for the rest; [`SeedConfig::validate`] says what a complete seed needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedConfig {
    /// DR service base URL (`https://host[:port]`); several replicas of one service separated
    /// by commas (`https://dr1:8443,https://dr2:8443`): the client moves to the next when one
    /// cannot be reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_url: Option<String>,
    /// Pairing token issued by the DR service (`failback token create`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Recovery instance this VM fails back from; optional (the service may match by inventory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// Never ask on the console: a missing or wrong value is a clear failure instead.
    #[serde(default)]
    pub no_prompt: bool,
    /// What the appliance does once the failback completed.
    #[serde(default)]
    pub after: AfterCompletion,
    /// PEM of the CA that signed the DR service certificate. Pinned: system roots are never
    /// trusted by the appliance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert_pem: Option<String>,
    /// Network configuration; DHCP when absent.
    #[serde(default)]
    pub network: NetworkConfig,
    /// HTTP proxy for the DR service connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxyConfig>,
    /// Explicit device mapping (remote volume id -> local device path); optional.
    #[serde(default, rename = "map", skip_serializing_if = "Vec::is_empty")]
    pub mappings: Vec<DeviceMapping>,
}

/// Action once the failback completed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AfterCompletion {
    /// Eject the appliance media and reboot into the restored OS.
    #[default]
    Reboot,
    /// Eject the appliance media and power off.
    Poweroff,
}

/// How the appliance gets its address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetMode {
    /// DHCPv4 (busybox udhcpc) with a timeout.
    #[default]
    Dhcp,
    /// Static IPv4 and/or IPv6 from `network.ipv4` / `network.ipv6`.
    Static,
}

/// `[network]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// `dhcp` (default) or `static`.
    #[serde(default)]
    pub mode: NetMode,
    /// Interface name or MAC address (`00:50:56:..`); default: the first one with a link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// Static IPv4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<StaticV4>,
    /// Static IPv6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<StaticV6>,
    /// DNS servers (written to /etc/resolv.conf; with DHCP they add to the leased ones).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<IpAddr>,
    /// Seconds to wait for a DHCP lease (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp_timeout_secs: Option<u32>,
}

/// A static IPv4 address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticV4 {
    /// `a.b.c.d/prefix`.
    pub address: String,
    /// Default gateway; must be inside the address's subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
}

/// A static IPv6 address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticV6 {
    /// `addr/prefix`.
    pub address: String,
    /// Default gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv6Addr>,
}

/// `[proxy]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// `http://host:port` (HTTP CONNECT proxy).
    pub url: String,
    /// Hosts reached directly.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub no_proxy: Vec<String>,
}

/// `[[map]]`: one remote volume written to one local disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceMapping {
    /// Volume id on the recovery instance (as the agent's manifest names it).
    pub remote: String,
    /// Local block device, preferably a stable `/dev/disk/by-*` path.
    pub local: String,
}

/// How strict [`SeedConfig::validate`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completeness {
    /// Everything needed to pair unattended must be present (builder; `no_prompt` at boot).
    Complete,
    /// Missing values are fine (the console will ask); present values must still be valid.
    Partial,
}

/// Parses `addr/prefix` into an address and a prefix length no longer than `max`.
pub fn parse_cidr<A: std::str::FromStr>(s: &str, max: u8) -> Result<(A, u8), String> {
    let (a, p) = s
        .split_once('/')
        .ok_or_else(|| format!("`{s}` is not ADDRESS/PREFIX"))?;
    let addr = a
        .parse::<A>()
        .map_err(|_| format!("`{a}` is not an IP address of the right family"))?;
    let prefix = p
        .parse::<u8>()
        .ok()
        .filter(|p| (1..=max).contains(p))
        .ok_or_else(|| format!("prefix `{p}` is not within 1..={max}"))?;
    Ok((addr, prefix))
}

/// Checks `https://host[:port][/path]`; returns the host.
fn check_https_url(field: &str, url: &str) -> Result<(), SeedError> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| invalid(field, format!("`{url}` must start with https://")))?;
    let authority = rest.split('/').next().unwrap_or("");
    check_authority(field, url, authority)
}

fn check_authority(field: &str, url: &str, authority: &str) -> Result<(), SeedError> {
    if authority.is_empty() || authority.contains('@') || authority.contains(char::is_whitespace) {
        return Err(invalid(field, format!("`{url}` has no valid host")));
    }
    // [v6]:port, host:port or host
    let port = if let Some(v6) = authority.strip_prefix('[') {
        let (addr, tail) = v6
            .split_once(']')
            .ok_or_else(|| invalid(field, format!("`{url}`: unclosed [ in host")))?;
        addr.parse::<Ipv6Addr>()
            .map_err(|_| invalid(field, format!("`{url}`: `{addr}` is not an IPv6 address")))?;
        tail.strip_prefix(':')
    } else {
        authority.split_once(':').map(|(_, p)| p)
    };
    if let Some(port) = port {
        if port.parse::<u16>().ok().filter(|p| *p != 0).is_none() {
            return Err(invalid(field, format!("`{url}`: port `{port}` is invalid")));
        }
    }
    Ok(())
}

/// Minimal structural check of a PEM certificate bundle: at least one complete CERTIFICATE
/// block whose body is base64. Full X.509 parsing happens when rustls loads it.
fn check_pem(pem: &str) -> Result<(), SeedError> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut rest = pem;
    let mut count = 0;
    while let Some(start) = rest.find(BEGIN) {
        let after = &rest[start + BEGIN.len()..];
        let end = after
            .find(END)
            .ok_or_else(|| invalid("ca_cert_pem", "a BEGIN CERTIFICATE block has no END line"))?;
        let body: String = after[..end].split_whitespace().collect();
        let base64_ok = !body.is_empty()
            && body
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=');
        if !base64_ok {
            return Err(invalid(
                "ca_cert_pem",
                "a certificate body is empty or not base64",
            ));
        }
        count += 1;
        rest = &after[end + END.len()..];
    }
    if count == 0 {
        return Err(invalid(
            "ca_cert_pem",
            "no -----BEGIN CERTIFICATE----- block found",
        ));
    }
    Ok(())
}

impl SeedConfig {
    /// Parses a seed file (unknown fields are errors). Does not validate.
    pub fn from_toml(text: &str) -> Result<Self, SeedError> {
        toml::from_str(text).map_err(|e| SeedError::Parse(e.to_string()))
    }

    /// Serialises the seed as TOML (what the builder writes into the ISO).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| {
            // Only maps with non-string keys fail to serialise; SeedConfig has none.
            unreachable!("SeedConfig always serialises: {e}")
        })
    }

    /// Values missing for an unattended pairing, by field name (empty when complete).
    pub fn missing(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if self.server_url.as_deref().is_none_or(str::is_empty) {
            missing.push("server_url");
        }
        if self.token.as_deref().is_none_or(str::is_empty) {
            missing.push("token");
        }
        if self.ca_cert_pem.as_deref().is_none_or(str::is_empty) {
            missing.push("ca_cert_pem");
        }
        missing
    }

    /// Validates the seed; the error names the first wrong field.
    pub fn validate(&self, completeness: Completeness) -> Result<(), SeedError> {
        let complete = completeness == Completeness::Complete || self.no_prompt;
        if complete {
            if let Some(field) = self.missing().first() {
                return Err(SeedError::Missing {
                    field,
                    why: if self.no_prompt {
                        ": no_prompt is set, so nothing can be asked on the console"
                    } else {
                        ""
                    },
                });
            }
        }
        if let Some(urls) = &self.server_url {
            // Several replicas of one service: comma-separated, each checked.
            for url in urls.split(',') {
                check_https_url("server_url", url.trim())?;
            }
        }
        if let Some(token) = &self.token {
            if token.is_empty() || token.len() > MAX_TOKEN_LEN {
                return Err(invalid(
                    "token",
                    format!("length must be 1..={MAX_TOKEN_LEN}"),
                ));
            }
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid(
                    "token",
                    "only printable ASCII without spaces is allowed",
                ));
            }
        }
        if let Some(id) = &self.instance_id {
            let ok = !id.is_empty()
                && id.len() <= 128
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
            if !ok {
                return Err(invalid(
                    "instance_id",
                    format!("`{id}`: 1..=128 characters of A-Z a-z 0-9 - _ . :"),
                ));
            }
        }
        if let Some(pem) = &self.ca_cert_pem {
            check_pem(pem)?;
        }
        self.network.validate()?;
        if let Some(proxy) = &self.proxy {
            let rest = proxy.url.strip_prefix("http://").ok_or_else(|| {
                invalid(
                    "proxy.url",
                    format!("`{}` must start with http://", proxy.url),
                )
            })?;
            let authority = rest.trim_end_matches('/');
            if authority.contains('/') {
                return Err(invalid(
                    "proxy.url",
                    format!("`{}` must be http://host:port", proxy.url),
                ));
            }
            check_authority("proxy.url", &proxy.url, authority)?;
        }
        let mut remotes = BTreeSet::new();
        let mut locals = BTreeSet::new();
        for (i, m) in self.mappings.iter().enumerate() {
            if m.remote.trim().is_empty() {
                return Err(invalid(format!("map[{i}].remote"), "is empty"));
            }
            let excluded = m.local.eq_ignore_ascii_case(crate::mapping::EXCLUDE);
            if !m.local.starts_with("/dev/") && !excluded {
                return Err(invalid(
                    format!("map[{i}].local"),
                    format!("`{}` is not a /dev path (or EXCLUDE)", m.local),
                ));
            }
            if !remotes.insert(&m.remote) {
                return Err(invalid(
                    format!("map[{i}].remote"),
                    format!("`{}` is mapped twice", m.remote),
                ));
            }
            if !excluded && !locals.insert(&m.local) {
                return Err(invalid(
                    format!("map[{i}].local"),
                    format!("`{}` is the target of two volumes", m.local),
                ));
            }
        }
        Ok(())
    }

    /// Applies one kernel command-line override `failback.KEY=VALUE` (KEY without the
    /// prefix): a short key of [`OVERRIDE_KEYS`] or the seed field it sets
    /// (`failback.server_url=`, `failback.network.ipv4.gateway=`). A value that is wrong on
    /// its own is refused here, naming `failback.KEY`; combinations are checked by
    /// [`SeedConfig::apply_overrides`].
    pub fn apply_override(&mut self, key: &str, value: &str) -> Result<(), SeedError> {
        let field = |f: &str| format!("failback.{f}");
        let Some(short) = override_key(key) else {
            return Err(invalid(
                field(key),
                format!(
                    "unknown key (known: {})",
                    OVERRIDE_KEYS
                        .iter()
                        .map(|(k, _)| *k)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        };
        // Check a value on its own, naming the key the user typed.
        let named = |e: SeedError| match e {
            SeedError::Invalid { reason, .. } => invalid(field(key), reason),
            other => other,
        };
        let key = short;
        let net = &mut self.network;
        match key {
            "server" => {
                check_https_url(&field(key), value)?;
                self.server_url = Some(value.to_string())
            }
            "token" => {
                let probe = SeedConfig {
                    token: Some(value.to_string()),
                    ..Default::default()
                };
                probe.validate(Completeness::Partial).map_err(named)?;
                self.token = Some(value.to_string())
            }
            "instance" => {
                let probe = SeedConfig {
                    instance_id: Some(value.to_string()),
                    ..Default::default()
                };
                probe.validate(Completeness::Partial).map_err(named)?;
                self.instance_id = Some(value.to_string())
            }
            "ca" => {
                let pem = pem_from_cmdline(value);
                check_pem(&pem).map_err(named)?;
                self.ca_cert_pem = Some(pem);
            }
            "dhcp_timeout" => {
                let secs = value
                    .parse::<u32>()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| invalid(field(key), format!("`{value}` is not seconds > 0")))?;
                net.dhcp_timeout_secs = Some(secs);
            }
            "no_proxy" => {
                let hosts: Vec<String> = value
                    .split(',')
                    .map(str::trim)
                    .filter(|h| !h.is_empty())
                    .map(str::to_string)
                    .collect();
                match &mut self.proxy {
                    Some(p) => p.no_proxy = hosts,
                    None => return Err(invalid(field(key), "set failback.proxy first")),
                }
            }
            "map" => {
                let list = crate::mapping::parse_device_mapping(value)
                    .map_err(|e| invalid(field(key), format!("`{value}`: {e}")))?;
                if list.is_empty() {
                    return Err(invalid(field(key), "no REMOTE=LOCAL entry"));
                }
                let probe = SeedConfig {
                    mappings: list
                        .into_iter()
                        .map(|m| DeviceMapping {
                            remote: m.remote,
                            local: m.local,
                        })
                        .collect(),
                    ..Default::default()
                };
                probe.validate(Completeness::Partial).map_err(named)?;
                // Replaces the seed's mapping as a whole: a partial merge could map two
                // volumes onto one disk.
                self.mappings = probe.mappings;
            }
            "no_prompt" => {
                self.no_prompt = match value {
                    "1" | "true" | "yes" | "" => true,
                    "0" | "false" | "no" => false,
                    _ => return Err(invalid(field(key), format!("`{value}` is not 0/1"))),
                }
            }
            "after" => {
                self.after = match value {
                    "reboot" => AfterCompletion::Reboot,
                    "poweroff" => AfterCompletion::Poweroff,
                    _ => {
                        return Err(invalid(
                            field(key),
                            format!("`{value}` is not reboot|poweroff"),
                        ))
                    }
                }
            }
            "net" => {
                net.mode = match value {
                    // DHCP replaces the seed's static addresses.
                    "dhcp" => {
                        net.ipv4 = None;
                        net.ipv6 = None;
                        NetMode::Dhcp
                    }
                    "static" => NetMode::Static,
                    _ => return Err(invalid(field(key), format!("`{value}` is not dhcp|static"))),
                }
            }
            "ip" => {
                parse_cidr::<Ipv4Addr>(value, 32).map_err(|e| invalid(field(key), e))?;
                net.mode = NetMode::Static;
                net.dhcp_timeout_secs = None;
                let gateway = net.ipv4.as_ref().and_then(|v| v.gateway);
                net.ipv4 = Some(StaticV4 {
                    address: value.to_string(),
                    gateway,
                });
            }
            "gw" => {
                let gw = value
                    .parse()
                    .map_err(|_| invalid(field(key), format!("`{value}` is not IPv4")))?;
                match &mut net.ipv4 {
                    Some(v4) => v4.gateway = Some(gw),
                    None => return Err(invalid(field(key), "set failback.ip first")),
                }
            }
            "ip6" => {
                parse_cidr::<Ipv6Addr>(value, 128).map_err(|e| invalid(field(key), e))?;
                net.mode = NetMode::Static;
                net.dhcp_timeout_secs = None;
                let gateway = net.ipv6.as_ref().and_then(|v| v.gateway);
                net.ipv6 = Some(StaticV6 {
                    address: value.to_string(),
                    gateway,
                });
            }
            "gw6" => {
                let gw = value
                    .parse()
                    .map_err(|_| invalid(field(key), format!("`{value}` is not IPv6")))?;
                match &mut net.ipv6 {
                    Some(v6) => v6.gateway = Some(gw),
                    None => return Err(invalid(field(key), "set failback.ip6 first")),
                }
            }
            "dns" => {
                net.dns = value
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| {
                        s.parse()
                            .map_err(|_| invalid(field(key), format!("`{s}` is not an IP")))
                    })
                    .collect::<Result<_, _>>()?;
            }
            "iface" => net.interface = Some(value.to_string()),
            "proxy" => {
                let probe = SeedConfig {
                    proxy: Some(ProxyConfig {
                        url: value.to_string(),
                        no_proxy: Vec::new(),
                    }),
                    ..Default::default()
                };
                probe.validate(Completeness::Partial).map_err(named)?;
                let no_proxy = self.proxy.take().map(|p| p.no_proxy).unwrap_or_default();
                self.proxy = Some(ProxyConfig {
                    url: value.to_string(),
                    no_proxy,
                })
            }
            // Every key of OVERRIDE_KEYS has an arm above.
            _ => unreachable!("override key {key} without an arm"),
        }
        Ok(())
    }

    /// Applies kernel command-line overrides in order, then checks the combination; an
    /// inconsistency caused by an override (a gateway outside `failback.ip`'s subnet,
    /// `failback.net=static` without an address) names the `failback.KEY` that set it. One
    /// the seed ISO already had is left for [`SeedConfig::validate`] to report as a seed error.
    pub fn apply_overrides(&mut self, overrides: &[(String, String)]) -> Result<(), SeedError> {
        for (k, v) in overrides {
            self.apply_override(k, v)?;
        }
        let Err(SeedError::Invalid { field, reason }) = self.validate(Completeness::Partial) else {
            return Ok(());
        };
        let bad = field.split('[').next().unwrap_or(&field);
        let culprit = overrides.iter().rev().find(|(k, _)| {
            override_key(k)
                .and_then(|short| OVERRIDE_KEYS.iter().find(|(o, _)| *o == short))
                .is_some_and(|(_, f)| {
                    *f == bad
                        || f.starts_with(&format!("{bad}."))
                        || bad.starts_with(&format!("{f}."))
                })
        });
        match culprit {
            Some((k, v)) => Err(invalid(
                format!("failback.{k}"),
                format!("`{v}`: {reason} (seed field {field})"),
            )),
            None => Ok(()),
        }
    }
}

/// Kernel command-line keys (`failback.KEY=VALUE`) and the seed field each one sets; every
/// seed field has one (a unit test walks the seed's TOML to keep it so).
pub const OVERRIDE_KEYS: &[(&str, &str)] = &[
    ("server", "server_url"),
    ("token", "token"),
    ("instance", "instance_id"),
    ("no_prompt", "no_prompt"),
    ("after", "after"),
    ("ca", "ca_cert_pem"),
    ("net", "network.mode"),
    ("iface", "network.interface"),
    ("ip", "network.ipv4.address"),
    ("gw", "network.ipv4.gateway"),
    ("ip6", "network.ipv6.address"),
    ("gw6", "network.ipv6.gateway"),
    ("dns", "network.dns"),
    ("dhcp_timeout", "network.dhcp_timeout_secs"),
    ("proxy", "proxy.url"),
    ("no_proxy", "proxy.no_proxy"),
    ("map", "map"),
];

/// The short key for a short key or a seed field name.
fn override_key(key: &str) -> Option<&'static str> {
    OVERRIDE_KEYS
        .iter()
        .find(|(k, f)| *k == key || *f == key)
        .map(|(k, _)| *k)
}

/// A CA certificate on the kernel command line: a PEM cannot hold spaces or newlines there,
/// so `failback.ca=` takes the base64 body (what is between the BEGIN and END lines, joined)
/// and this wraps it back into PEM. A full PEM given through other means passes unchanged.
fn pem_from_cmdline(value: &str) -> String {
    if value.contains("-----BEGIN") {
        return value.to_string();
    }
    let body: String = value.split_whitespace().collect();
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(chunk));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// `failback.KEY=VALUE` parameters of a kernel command line (`/proc/cmdline`), KEY without
/// the prefix, in order. Splits like the kernel's own parser (lib/cmdline.c `next_arg`):
/// whitespace separates parameters except inside double quotes, and a quote that opens the
/// parameter or its value is dropped with its closing one, so
/// `failback.map="vol-1=/dev/sda, vol-2=EXCLUDE"` arrives whole.
pub fn kernel_overrides(cmdline: &str) -> Vec<(String, String)> {
    let mut params = Vec::new();
    let mut cur = String::new();
    let mut in_quote = false;
    for c in cmdline.chars() {
        if c.is_whitespace() && !in_quote {
            if !cur.is_empty() {
                params.push(std::mem::take(&mut cur));
            }
            continue;
        }
        if c == '"' {
            in_quote = !in_quote;
        }
        cur.push(c);
    }
    if !cur.is_empty() {
        params.push(cur);
    }
    let unquote = |s: &str| -> String {
        match s.strip_prefix('"') {
            Some(inner) => inner.strip_suffix('"').unwrap_or(inner).to_string(),
            None => s.to_string(),
        }
    };
    params
        .iter()
        .filter_map(|p| {
            let p = match p.strip_prefix('"') {
                Some(inner) => inner.strip_suffix('"').unwrap_or(inner),
                None => p.as_str(),
            };
            let kv = p.strip_prefix("failback.")?;
            Some(match kv.split_once('=') {
                Some((k, v)) => (k.to_string(), unquote(v)),
                None => (kv.to_string(), String::new()),
            })
        })
        .collect()
}

impl NetworkConfig {
    /// Checks static addresses, gateways and the mode/address consistency.
    pub fn validate(&self) -> Result<(), SeedError> {
        match self.mode {
            NetMode::Dhcp => {
                if self.ipv4.is_some() {
                    return Err(invalid(
                        "network.ipv4",
                        "set while network.mode is dhcp (use mode = \"static\")",
                    ));
                }
                if self.ipv6.is_some() {
                    return Err(invalid(
                        "network.ipv6",
                        "set while network.mode is dhcp (use mode = \"static\")",
                    ));
                }
                if self.dhcp_timeout_secs == Some(0) {
                    return Err(invalid("network.dhcp_timeout_secs", "must be > 0"));
                }
            }
            NetMode::Static => {
                if self.ipv4.is_none() && self.ipv6.is_none() {
                    return Err(invalid(
                        "network",
                        "mode is static but neither network.ipv4 nor network.ipv6 is set",
                    ));
                }
                if self.dhcp_timeout_secs.is_some() {
                    return Err(invalid(
                        "network.dhcp_timeout_secs",
                        "set while network.mode is static",
                    ));
                }
            }
        }
        if let Some(v4) = &self.ipv4 {
            let (addr, prefix) = parse_cidr::<Ipv4Addr>(&v4.address, 32)
                .map_err(|e| invalid("network.ipv4.address", e))?;
            if let Some(gw) = v4.gateway {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                if u32::from(gw) & mask != u32::from(addr) & mask {
                    return Err(invalid(
                        "network.ipv4.gateway",
                        format!("{gw} is outside {}", v4.address),
                    ));
                }
                if gw == addr {
                    return Err(invalid(
                        "network.ipv4.gateway",
                        format!("{gw} is the address itself"),
                    ));
                }
            }
        }
        if let Some(v6) = &self.ipv6 {
            parse_cidr::<Ipv6Addr>(&v6.address, 128)
                .map_err(|e| invalid("network.ipv6.address", e))?;
        }
        if let Some(iface) = &self.interface {
            if iface.is_empty() || iface.len() > 17 || iface.contains(['/', ' ']) {
                return Err(invalid(
                    "network.interface",
                    format!("`{iface}` is not an interface name or MAC"),
                ));
            }
        }
        Ok(())
    }

    /// DHCP timeout in seconds.
    pub fn dhcp_timeout(&self) -> u32 {
        self.dhcp_timeout_secs.unwrap_or(60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEM: &str =
        "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----\n";

    fn complete() -> SeedConfig {
        SeedConfig {
            server_url: Some("https://10.0.2.2:8443".into()),
            token: Some("fbt_abc".into()),
            ca_cert_pem: Some(PEM.into()),
            ..Default::default()
        }
    }

    fn field_of(e: SeedError) -> String {
        match e {
            SeedError::Missing { field, .. } => field.to_string(),
            SeedError::Invalid { field, .. } => field,
            SeedError::Parse(m) => format!("parse: {m}"),
        }
    }

    /// Several replicas of one service: each URL of the list is checked.
    #[test]
    fn server_url_takes_several_urls() {
        let mut s = complete();
        s.server_url = Some("https://dr1:8443, https://dr2:8443".into());
        s.validate(Completeness::Complete).unwrap();
        s.server_url = Some("https://dr1:8443,http://dr2:8443".into());
        let e = s.validate(Completeness::Complete).unwrap_err().to_string();
        assert!(
            e.contains("server_url") && e.contains("http://dr2:8443"),
            "{e}"
        );
    }

    #[test]
    fn complete_seed_round_trips_through_toml() {
        let mut s = complete();
        s.network.mode = NetMode::Static;
        s.network.ipv4 = Some(StaticV4 {
            address: "192.0.2.10/24".into(),
            gateway: Some(Ipv4Addr::new(192, 0, 2, 1)),
        });
        s.network.dns = vec!["192.0.2.53".parse().unwrap()];
        s.mappings.push(DeviceMapping {
            remote: "vol-1".into(),
            local: "/dev/sda".into(),
        });
        s.validate(Completeness::Complete).unwrap();
        let back = SeedConfig::from_toml(&s.to_toml()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn refusals_name_the_field() {
        type Mutate = Box<dyn Fn(&mut SeedConfig)>;
        let cases: Vec<(&str, Mutate)> = vec![
            ("server_url", Box::new(|s| s.server_url = None)),
            ("token", Box::new(|s| s.token = None)),
            ("ca_cert_pem", Box::new(|s| s.ca_cert_pem = None)),
            (
                "server_url",
                Box::new(|s| s.server_url = Some("http://x".into())),
            ),
            (
                "server_url",
                Box::new(|s| s.server_url = Some("https://h:99999".into())),
            ),
            ("token", Box::new(|s| s.token = Some("has space".into()))),
            (
                "instance_id",
                Box::new(|s| s.instance_id = Some("a/b".into())),
            ),
            (
                "ca_cert_pem",
                Box::new(|s| s.ca_cert_pem = Some("not a cert".into())),
            ),
            (
                "network.ipv4",
                Box::new(|s| {
                    s.network.ipv4 = Some(StaticV4 {
                        address: "10.0.0.2/8".into(),
                        gateway: None,
                    })
                }),
            ),
            ("network", Box::new(|s| s.network.mode = NetMode::Static)),
            (
                "network.ipv4.gateway",
                Box::new(|s| {
                    s.network.mode = NetMode::Static;
                    s.network.ipv4 = Some(StaticV4 {
                        address: "192.0.2.10/24".into(),
                        gateway: Some(Ipv4Addr::new(198, 51, 100, 1)),
                    })
                }),
            ),
            (
                "network.ipv4.address",
                Box::new(|s| {
                    s.network.mode = NetMode::Static;
                    s.network.ipv4 = Some(StaticV4 {
                        address: "192.0.2.10".into(),
                        gateway: None,
                    })
                }),
            ),
            (
                "network.ipv6.address",
                Box::new(|s| {
                    s.network.mode = NetMode::Static;
                    s.network.ipv6 = Some(StaticV6 {
                        address: "2001:db8::1/129".into(),
                        gateway: None,
                    })
                }),
            ),
            (
                "proxy.url",
                Box::new(|s| {
                    s.proxy = Some(ProxyConfig {
                        url: "https://p:1".into(),
                        no_proxy: vec![],
                    })
                }),
            ),
            (
                "map[1].local",
                Box::new(|s| {
                    s.mappings = vec![
                        DeviceMapping {
                            remote: "a".into(),
                            local: "/dev/sda".into(),
                        },
                        DeviceMapping {
                            remote: "b".into(),
                            local: "/dev/sda".into(),
                        },
                    ]
                }),
            ),
            (
                "map[0].local",
                Box::new(|s| {
                    s.mappings = vec![DeviceMapping {
                        remote: "a".into(),
                        local: "sda".into(),
                    }]
                }),
            ),
        ];
        for (want, mutate) in cases {
            let mut s = complete();
            mutate(&mut s);
            let err = s.validate(Completeness::Complete).unwrap_err();
            assert_eq!(field_of(err.clone()), want, "{err}");
            assert!(err.to_string().contains(want), "{err}");
        }
    }

    #[test]
    fn partial_seed_is_fine_unless_no_prompt() {
        let mut s = SeedConfig::default();
        s.validate(Completeness::Partial).unwrap();
        assert_eq!(s.missing(), vec!["server_url", "token", "ca_cert_pem"]);
        s.no_prompt = true;
        let e = s.validate(Completeness::Partial).unwrap_err();
        assert!(e.to_string().contains("no_prompt"), "{e}");
        assert!(e.to_string().contains("server_url"), "{e}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = SeedConfig::from_toml("server_url = \"https://x\"\ntokn = \"a\"\n").unwrap_err();
        assert!(e.to_string().contains("tokn"), "{e}");
        let e = SeedConfig::from_toml("[network]\nmode = \"dhcpp\"\n").unwrap_err();
        assert!(e.to_string().contains("dhcpp"), "{e}");
    }

    #[test]
    fn kernel_command_line_overrides() {
        let mut s = complete();
        s.apply_override("ip", "10.0.2.15/24").unwrap();
        s.apply_override("gw", "10.0.2.2").unwrap();
        s.apply_override("dns", "10.0.2.3,1.1.1.1").unwrap();
        s.apply_override("no_prompt", "1").unwrap();
        s.apply_override("after", "poweroff").unwrap();
        assert_eq!(s.network.mode, NetMode::Static);
        assert_eq!(s.network.dns.len(), 2);
        assert!(s.no_prompt);
        assert_eq!(s.after, AfterCompletion::Poweroff);
        s.validate(Completeness::Complete).unwrap();
        let e = s.apply_override("bogus", "1").unwrap_err();
        assert!(e.to_string().contains("failback.bogus"), "{e}");
        let e = s.apply_override("gw6", "::1").unwrap_err();
        assert!(e.to_string().contains("failback.ip6"), "{e}");
    }

    /// Dotted names of every leaf of a seed's TOML (`[[map]]` entries count as `map`).
    fn leaves(v: &toml::Value, prefix: &str, out: &mut Vec<String>) {
        match v {
            toml::Value::Table(t) if prefix != "map" => {
                for (k, x) in t {
                    let name = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    leaves(x, &name, out);
                }
            }
            _ => out.push(prefix.to_string()),
        }
    }

    #[test]
    fn every_seed_field_has_a_kernel_command_line_key() {
        let full = SeedConfig {
            instance_id: Some("i-0123456789abcdef".into()),
            no_prompt: true,
            network: NetworkConfig {
                mode: NetMode::Static,
                interface: Some("eth0".into()),
                ipv4: Some(StaticV4 {
                    address: "192.0.2.10/24".into(),
                    gateway: Some("192.0.2.1".parse().unwrap()),
                }),
                ipv6: Some(StaticV6 {
                    address: "2001:db8::10/64".into(),
                    gateway: Some("2001:db8::1".parse().unwrap()),
                }),
                dns: vec!["192.0.2.53".parse().unwrap()],
                dhcp_timeout_secs: Some(5),
            },
            proxy: Some(ProxyConfig {
                url: "http://proxy:3128".into(),
                no_proxy: vec!["a".into()],
            }),
            mappings: vec![DeviceMapping {
                remote: "vol-1".into(),
                local: "/dev/sda".into(),
            }],
            ..complete()
        };
        let v: toml::Value = toml::from_str(&full.to_toml()).unwrap();
        let mut names = Vec::new();
        leaves(&v, "", &mut names);
        assert!(names.len() >= 17, "{names:?}");
        for n in names {
            assert!(
                OVERRIDE_KEYS.iter().any(|(_, f)| *f == n),
                "seed field {n} cannot be set from the kernel command line"
            );
        }
    }

    #[test]
    fn every_key_sets_its_field() {
        let body: String = PEM.lines().filter(|l| !l.starts_with("-----")).collect();
        let cmdline = format!(
            "BOOT_IMAGE=/vmlinuz console=ttyS0 failback.server=https://dr.example:8443 \
             failback.token=fbt_x failback.instance=i-0123456789abcdef failback.no_prompt \
             failback.after=poweroff failback.ca={body} failback.iface=00:50:56:aa:bb:cc \
             failback.ip=192.0.2.10/24 failback.gw=192.0.2.1 failback.ip6=2001:db8::10/64 \
             failback.gw6=2001:db8::1 failback.dns=192.0.2.53,2001:db8::53 \
             failback.proxy=http://proxy:3128 failback.no_proxy=10.0.0.1,dr.local \
             \"failback.map=vol-1=/dev/sda, vol-2=EXCLUDE\" quiet -- init-arg"
        );
        let o = kernel_overrides(&cmdline);
        assert_eq!(o.len(), 15, "{o:?}");
        let mut s = SeedConfig::default();
        s.apply_overrides(&o).unwrap();
        assert_eq!(s.server_url.as_deref(), Some("https://dr.example:8443"));
        assert_eq!(s.token.as_deref(), Some("fbt_x"));
        assert_eq!(s.instance_id.as_deref(), Some("i-0123456789abcdef"));
        assert!(s.no_prompt);
        assert_eq!(s.after, AfterCompletion::Poweroff);
        let norm = |p: &str| p.split_whitespace().collect::<String>();
        assert_eq!(norm(s.ca_cert_pem.as_deref().unwrap()), norm(PEM));
        assert_eq!(s.network.interface.as_deref(), Some("00:50:56:aa:bb:cc"));
        assert_eq!(s.network.mode, NetMode::Static);
        let v4 = s.network.ipv4.clone().unwrap();
        assert_eq!(
            (v4.address.as_str(), v4.gateway),
            ("192.0.2.10/24", Some("192.0.2.1".parse().unwrap()))
        );
        let v6 = s.network.ipv6.clone().unwrap();
        assert_eq!(v6.gateway, Some("2001:db8::1".parse().unwrap()));
        assert_eq!(s.network.dns.len(), 2);
        let p = s.proxy.clone().unwrap();
        assert_eq!((p.url.as_str(), p.no_proxy.len()), ("http://proxy:3128", 2));
        assert_eq!(
            s.mappings,
            vec![
                DeviceMapping {
                    remote: "vol-1".into(),
                    local: "/dev/sda".into()
                },
                DeviceMapping {
                    remote: "vol-2".into(),
                    local: "EXCLUDE".into()
                },
            ]
        );
        s.validate(Completeness::Complete).unwrap();

        // DHCP with a timeout; seed field names work as keys too; JSON mapping format.
        let mut d = SeedConfig::default();
        d.apply_overrides(&kernel_overrides(
            r#"failback.server_url=https://h failback.network.dhcp_timeout_secs=7 failback.map={"vol-1":"/dev/sdb"}"#,
        ))
        .unwrap();
        assert_eq!(d.server_url.as_deref(), Some("https://h"));
        assert_eq!(d.network.dhcp_timeout_secs, Some(7));
        assert_eq!(d.mappings[0].local, "/dev/sdb");
        // net=dhcp drops a seed's static addresses.
        s.apply_override("net", "dhcp").unwrap();
        assert!(s.network.ipv4.is_none() && s.network.ipv6.is_none());
        s.validate(Completeness::Partial).unwrap();
    }

    #[test]
    fn override_errors_name_the_key() {
        let err = |cmdline: &str| {
            let mut s = complete();
            let e = s
                .apply_overrides(&kernel_overrides(cmdline))
                .expect_err(cmdline);
            (field_of(e.clone()), e.to_string())
        };
        for (cmdline, key, says) in [
            ("failback.map=vol-1", "failback.map", "REMOTE=LOCAL"),
            ("failback.map=vol-1=sda", "failback.map", "not a /dev path"),
            (
                "failback.map=vol-1=/dev/sda,vol-2=/dev/sda",
                "failback.map",
                "two volumes",
            ),
            (
                "failback.map=vol-1=/dev/sda,vol-1=/dev/sdb",
                "failback.map",
                "mapped twice",
            ),
            ("failback.map=", "failback.map", "no REMOTE=LOCAL"),
            ("failback.server=http://x", "failback.server", "https://"),
            ("failback.token=a\u{7f}b", "failback.token", "printable"),
            ("failback.instance=a/b", "failback.instance", "A-Z"),
            ("failback.ca=@@@", "failback.ca", "base64"),
            ("failback.ip=10.0.0.1", "failback.ip", "ADDRESS/PREFIX"),
            ("failback.ip6=10.0.0.1/24", "failback.ip6", "IP address"),
            ("failback.gw=10.0.0.1", "failback.gw", "failback.ip first"),
            (
                "failback.dhcp_timeout=0",
                "failback.dhcp_timeout",
                "seconds",
            ),
            (
                "failback.no_proxy=a",
                "failback.no_proxy",
                "failback.proxy first",
            ),
            ("failback.proxy=https://p:1", "failback.proxy", "http://"),
            ("failback.after=halt", "failback.after", "reboot|poweroff"),
            ("failback.no_prompt=maybe", "failback.no_prompt", "0/1"),
            ("failback.bogus=1", "failback.bogus", "unknown key"),
            // Combinations: blamed on the key that made them wrong.
            (
                "failback.ip=10.0.0.5/24 failback.gw=10.9.9.9",
                "failback.gw",
                "outside",
            ),
            ("failback.net=static", "failback.net", "neither"),
            (
                "failback.ip=10.0.0.5/24 failback.dhcp_timeout=5",
                "failback.dhcp_timeout",
                "static",
            ),
        ] {
            let (field, msg) = err(cmdline);
            assert_eq!(field, key, "{cmdline}: {msg}");
            assert!(msg.contains(says), "{cmdline}: {msg}");
        }
        // A seed problem the command line did not cause is left to validate().
        let mut s = complete();
        s.network.mode = NetMode::Static;
        s.apply_overrides(&kernel_overrides("failback.after=reboot"))
            .unwrap();
        assert_eq!(
            field_of(s.validate(Completeness::Partial).unwrap_err()),
            "network"
        );
    }

    #[test]
    fn kernel_command_line_splitting_follows_the_kernel() {
        let o = kernel_overrides(
            "ro failback.a=1 \"failback.b=x y\" failback.c=\"p q\" failback.d failback.e= notfailback.f=1",
        );
        let o: Vec<(&str, &str)> = o.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            o,
            vec![("a", "1"), ("b", "x y"), ("c", "p q"), ("d", ""), ("e", "")]
        );
    }
}
