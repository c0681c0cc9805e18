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
    /// DR service base URL (`https://host[:port]`).
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
        if let Some(url) = &self.server_url {
            check_https_url("server_url", url)?;
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
            if !m.local.starts_with("/dev/") {
                return Err(invalid(
                    format!("map[{i}].local"),
                    format!("`{}` is not a /dev path", m.local),
                ));
            }
            if !remotes.insert(&m.remote) {
                return Err(invalid(
                    format!("map[{i}].remote"),
                    format!("`{}` is mapped twice", m.remote),
                ));
            }
            if !locals.insert(&m.local) {
                return Err(invalid(
                    format!("map[{i}].local"),
                    format!("`{}` is the target of two volumes", m.local),
                ));
            }
        }
        Ok(())
    }

    /// Applies one kernel command-line override `failback.KEY=VALUE` (KEY without the
    /// prefix). Keys: server, token, instance, no_prompt, after, net (dhcp|static), ip, gw,
    /// ip6, gw6, dns (comma separated), iface, proxy.
    pub fn apply_override(&mut self, key: &str, value: &str) -> Result<(), SeedError> {
        let field = |f: &str| format!("failback.{f}");
        let net = &mut self.network;
        match key {
            "server" => self.server_url = Some(value.to_string()),
            "token" => self.token = Some(value.to_string()),
            "instance" => self.instance_id = Some(value.to_string()),
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
                    "dhcp" => NetMode::Dhcp,
                    "static" => NetMode::Static,
                    _ => return Err(invalid(field(key), format!("`{value}` is not dhcp|static"))),
                }
            }
            "ip" => {
                net.mode = NetMode::Static;
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
                net.mode = NetMode::Static;
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
                self.proxy = Some(ProxyConfig {
                    url: value.to_string(),
                    no_proxy: Vec::new(),
                })
            }
            _ => return Err(invalid(field(key), "unknown key")),
        }
        Ok(())
    }
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
}
