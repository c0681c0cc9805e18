//! Network bring-up with busybox `ip` and `udhcpc` (static IPv4/IPv6, DHCPv4 with a timeout,
//! DNS in /etc/resolv.conf, which musl's resolver reads itself: no NSS).

use super::ApplianceError;
use failback_config::seed::{parse_cidr, NetMode, NetworkConfig};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BUSYBOX: &str = "/bin/busybox";

/// A network interface seen in sysfs.
#[derive(Debug, Clone)]
pub struct Interface {
    /// Kernel name (`eth0`, `ens192`).
    pub name: String,
    /// MAC address.
    pub mac: String,
    /// Driver name (`vmxnet3`, `virtio_net`).
    pub driver: String,
}

/// What the network ended up as.
#[derive(Debug, Clone)]
pub struct NetState {
    /// The interface used.
    pub interface: Interface,
    /// Human-readable summary (addresses, gateway, DNS).
    pub summary: String,
}

fn ip(args: &[&str]) -> Result<(), ApplianceError> {
    let out = Command::new(BUSYBOX)
        .arg("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            ApplianceError::Network(format!("running busybox ip {}: {e}", args.join(" ")))
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ApplianceError::Network(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn read_sys(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Ethernet interfaces, sorted by name.
pub fn interfaces() -> Vec<Interface> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name == "lo" || read_sys(&format!("/sys/class/net/{name}/type")) != "1" {
            continue;
        }
        let driver = std::fs::read_link(format!("/sys/class/net/{name}/device/driver"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
            .unwrap_or_default();
        out.push(Interface {
            mac: read_sys(&format!("/sys/class/net/{name}/address")),
            name,
            driver,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn carrier(name: &str) -> bool {
    read_sys(&format!("/sys/class/net/{name}/carrier")) == "1"
}

/// Picks the interface: the configured one (name or MAC), else the first with a link.
/// Waits up to `timeout` for NICs to appear and links to come up.
pub fn choose(config: &NetworkConfig, timeout: Duration) -> Result<Interface, ApplianceError> {
    let _ = ip(&["link", "set", "lo", "up"]);
    let start = Instant::now();
    let mut brought_up = std::collections::BTreeSet::new();
    loop {
        let ifaces = interfaces();
        for i in &ifaces {
            if brought_up.insert(i.name.clone()) {
                let _ = ip(&["link", "set", &i.name, "up"]);
            }
        }
        let pick = match &config.interface {
            Some(want) => ifaces
                .iter()
                .find(|i| i.name == *want || i.mac.eq_ignore_ascii_case(want))
                .filter(|i| carrier(&i.name))
                .cloned(),
            None => ifaces.iter().find(|i| carrier(&i.name)).cloned(),
        };
        if let Some(i) = pick {
            return Ok(i);
        }
        if start.elapsed() >= timeout {
            let seen: Vec<String> = ifaces
                .iter()
                .map(|i| {
                    format!(
                        "{} ({}, {}, link {})",
                        i.name,
                        i.mac,
                        i.driver,
                        if carrier(&i.name) { "up" } else { "down" }
                    )
                })
                .collect();
            return Err(ApplianceError::Network(match &config.interface {
                Some(want) => format!(
                    "interface `{want}` not found or without link after {}s; interfaces: [{}]",
                    timeout.as_secs(),
                    seen.join(", ")
                ),
                None => format!(
                    "no network interface with a link after {}s; interfaces: [{}]",
                    timeout.as_secs(),
                    seen.join(", ")
                ),
            }));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Starts udhcpc on `iface` (it stays running to renew the lease) and waits up to `timeout`
/// for the lease.
pub fn dhcp(iface: &Interface, timeout: Duration) -> Result<(Child, String), ApplianceError> {
    let lease = format!("/run/failback/lease.{}", iface.name);
    let _ = std::fs::remove_file(&lease);
    let mut child = Command::new(BUSYBOX)
        .args([
            "udhcpc",
            "-f",
            "-i",
            &iface.name,
            "-s",
            "/etc/udhcpc.script",
            "-t",
            "1000",
            "-T",
            "2",
            "-A",
            "2",
        ])
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| ApplianceError::Network(format!("starting udhcpc on {}: {e}", iface.name)))?;
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Ok(text) = std::fs::read_to_string(&lease) {
            return Ok((child, text.trim().to_string()));
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(ApplianceError::Network(format!(
                "udhcpc on {} exited: {status}",
                iface.name
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(ApplianceError::Network(format!(
        "no DHCP lease on {} ({}) within {}s",
        iface.name,
        iface.mac,
        timeout.as_secs()
    )))
}

/// Applies static addresses.
pub fn static_config(iface: &Interface, config: &NetworkConfig) -> Result<String, ApplianceError> {
    let mut summary = Vec::new();
    if let Some(v4) = &config.ipv4 {
        parse_cidr::<Ipv4Addr>(&v4.address, 32)
            .map_err(|e| ApplianceError::Network(format!("network.ipv4.address: {e}")))?;
        ip(&["-4", "addr", "add", &v4.address, "dev", &iface.name])?;
        summary.push(v4.address.clone());
        if let Some(gw) = v4.gateway {
            ip(&[
                "-4",
                "route",
                "replace",
                "default",
                "via",
                &gw.to_string(),
                "dev",
                &iface.name,
            ])?;
            summary.push(format!("gw {gw}"));
        }
    }
    if let Some(v6) = &config.ipv6 {
        parse_cidr::<Ipv6Addr>(&v6.address, 128)
            .map_err(|e| ApplianceError::Network(format!("network.ipv6.address: {e}")))?;
        ip(&["-6", "addr", "add", &v6.address, "dev", &iface.name])?;
        summary.push(v6.address.clone());
        if let Some(gw) = v6.gateway {
            ip(&[
                "-6",
                "route",
                "replace",
                "default",
                "via",
                &gw.to_string(),
                "dev",
                &iface.name,
            ])?;
            summary.push(format!("gw6 {gw}"));
        }
    }
    Ok(summary.join(" "))
}

/// Writes /etc/resolv.conf: the configured DNS servers, then the DHCP ones.
pub fn write_resolv_conf(config: &NetworkConfig) -> std::io::Result<String> {
    let mut text = String::new();
    for d in &config.dns {
        text.push_str(&format!("nameserver {d}\n"));
    }
    if let Ok(dhcp) = std::fs::read_to_string("/etc/resolv.conf.dhcp") {
        text.push_str(&dhcp);
    }
    std::fs::write("/etc/resolv.conf", &text)?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver "))
        .collect::<Vec<_>>()
        .join(","))
}

/// Brings the network up as configured. Returns the udhcpc child (kept running) if any.
pub fn bring_up(config: &NetworkConfig) -> Result<(NetState, Option<Child>), ApplianceError> {
    let iface = choose(config, Duration::from_secs(30))?;
    let (summary, child) = match config.mode {
        NetMode::Dhcp => {
            let (child, lease) = dhcp(
                &iface,
                Duration::from_secs(u64::from(config.dhcp_timeout())),
            )?;
            (format!("DHCP {lease}"), Some(child))
        }
        NetMode::Static => (format!("static {}", static_config(&iface, config)?), None),
    };
    let dns = write_resolv_conf(config)
        .map_err(|e| ApplianceError::Network(format!("writing /etc/resolv.conf: {e}")))?;
    let summary = format!(
        "{} ({}, {}): {summary}; dns {dns}",
        iface.name, iface.mac, iface.driver
    );
    Ok((
        NetState {
            interface: iface,
            summary,
        },
        child,
    ))
}
