//! The appliance boot flow: `failback-client` is the initramfs's `/init`. As PID 1 it mounts
//! /proc /sys /dev /run, loads the kernel modules in the order the ISO builder computed, finds
//! the seed ISO by label, applies `failback.KEY=VALUE` kernel arguments, asks on the console
//! for whatever is missing (unless `no_prompt`), brings the network up, checks the clock
//! against the DR service, then pairs, syncs and waits for launch (`crate::run`). When the
//! failback completed it flushes, ejects the appliance CD and reboots (or powers off).
//!
//! Every step prints one line on every console (`failback: ...`); a failure prints its cause
//! and, unless `no_prompt`, offers a retry. Markers that tests wait for start with `FAILBACK_`.

pub mod bootnext;
pub mod console;
pub mod media;
pub mod net;
pub mod probe;
pub mod system;

use console::Console;
use failback_config::seed::{
    AfterCompletion, Completeness, NetMode, SeedConfig, StaticV4, SEED_FILE_NAME, SEED_LABEL,
};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

/// Label of the appliance ISO itself (ejected at the end).
pub use failback_config::seed::APPLIANCE_LABEL;
/// Where the seed ISO is mounted (read-only) while it is read.
const SEED_MOUNT: &str = "/mnt/seed";
/// Clock difference to the DR service above which the clock is set from its Date header.
const MAX_SKEW: Duration = Duration::from_secs(30);

/// A failed boot step; the message names what failed and why.
#[derive(Debug, thiserror::Error)]
pub enum ApplianceError {
    /// Mounting or another system call failed.
    #[error("system: {0}")]
    System(String),
    /// The seed is missing values or wrong, and nothing may be asked.
    #[error("seed: {0}")]
    Seed(String),
    /// The network did not come up.
    #[error("network: {0}")]
    Network(String),
    /// The DR service is unreachable or its certificate is not from the pinned CA.
    #[error("DR service: {0}")]
    Service(String),
    /// Pairing/sync/launch failed.
    #[error("failback: {0}")]
    Run(String),
}

/// Where the seed came from, for the console.
#[derive(Debug, Clone)]
struct SeedSource {
    seed: SeedConfig,
    found_on: Option<String>,
    stop_after: Option<String>,
    /// The kernel command line configured the network.
    net_from_cmdline: bool,
}

/// Entry point when `failback-client` runs as PID 1. Never returns.
pub fn init_main() -> ! {
    if let Err(e) = system::mount_basics() {
        // Without /dev there is no console but the kernel's; say it there.
        eprintln!("failback: FAILED mounting /proc /sys /dev /run: {e}");
    }
    let console = Console::system();
    console.say(&format!("appliance {} starting", env!("CARGO_PKG_VERSION")));
    let boot_started = Instant::now();
    load_modules(&console);
    loop {
        match boot(&console, boot_started) {
            Ok(end) => finish(&console, end),
            Err((e, no_prompt)) => {
                console.say(&format!("FAILBACK_FAILED {e}"));
                if no_prompt {
                    console.say("no_prompt is set: powering off");
                    let err = system::reboot(true);
                    console.say(&format!("power off failed: {err}"));
                    loop {
                        std::thread::sleep(Duration::from_secs(3600));
                    }
                }
                match console
                    .ask("Retry? (y = retry, n = power off)", Some("y"), None)
                    .as_deref()
                {
                    Some("n") | Some("N") => {
                        let err = system::reboot(true);
                        console.say(&format!("power off failed: {err}"));
                    }
                    _ => console.say("retrying"),
                }
            }
        }
    }
}

fn load_modules(console: &Console) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let dir = Path::new("/lib/modules").join(release.trim());
    let list = match std::fs::read_to_string(dir.join("load.list")) {
        Ok(l) => l,
        Err(e) => {
            console.say(&format!(
                "WARNING: no module list in {}: {e}",
                dir.display()
            ));
            return;
        }
    };
    let (mut loaded, mut skipped) = (0, 0);
    for name in list.lines().filter(|l| !l.is_empty()) {
        match system::load_module(&dir.join(name)) {
            system::ModuleLoad::Loaded | system::ModuleLoad::Already => loaded += 1,
            system::ModuleLoad::NotForThisMachine => skipped += 1,
            system::ModuleLoad::Failed(e) => console.say(&format!("WARNING: module {e}")),
        }
    }
    console.say(&format!(
        "loaded {loaded} kernel modules ({skipped} not for this machine)"
    ));
}

/// `failback.KEY=VALUE` arguments from /proc/cmdline (quotes handled as the kernel does).
fn cmdline_overrides() -> Vec<(String, String)> {
    failback_config::seed::kernel_overrides(
        &std::fs::read_to_string("/proc/cmdline").unwrap_or_default(),
    )
}

/// Keys the client consumes itself (not seed fields).
const CLIENT_KEYS: [&str; 2] = ["seed_wait", "stop_after"];
/// Keys that configure the network: given on the command line, the console does not ask.
const NETWORK_KEYS: [&str; 8] = [
    "net",
    "ip",
    "gw",
    "ip6",
    "gw6",
    "dns",
    "iface",
    "dhcp_timeout",
];

/// Finds, mounts and parses the seed; then applies the kernel command line.
fn read_seed(console: &Console) -> Result<SeedSource, ApplianceError> {
    let overrides = cmdline_overrides();
    let wait = overrides
        .iter()
        .find(|(k, _)| k == "seed_wait")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(20);
    let mut src = SeedSource {
        seed: SeedConfig::default(),
        found_on: None,
        stop_after: None,
        net_from_cmdline: false,
    };
    let searched = Instant::now();
    match media::wait_for(
        SEED_LABEL,
        Duration::from_secs(wait),
        Duration::from_secs(4),
    ) {
        Some(dev) => {
            let devpath = format!("/dev/{}", dev.name);
            system::mount(&devpath, SEED_MOUNT, "iso9660", libc::MS_RDONLY)
                .map_err(|e| ApplianceError::Seed(format!("mounting seed ISO {devpath}: {e}")))?;
            let path = format!("{SEED_MOUNT}/{SEED_FILE_NAME}");
            let text = std::fs::read_to_string(&path);
            let _ = system::umount(SEED_MOUNT);
            let text = text.map_err(|e| {
                ApplianceError::Seed(format!("{devpath}: reading {SEED_FILE_NAME}: {e}"))
            })?;
            src.seed = SeedConfig::from_toml(&text)
                .map_err(|e| ApplianceError::Seed(format!("{devpath}: {e}")))?;
            console.say(&format!(
                "FAILBACK_SEED_FOUND on {devpath} (label {SEED_LABEL})"
            ));
            src.found_on = Some(devpath);
        }
        None => console.say(&format!(
            "no seed ISO (label {SEED_LABEL}) found (searched {:.1}s)",
            searched.elapsed().as_secs_f64()
        )),
    }
    let (own, seed_keys): (Vec<_>, Vec<_>) = overrides
        .into_iter()
        .partition(|(k, _)| CLIENT_KEYS.contains(&k.as_str()));
    src.stop_after = own
        .into_iter()
        .filter(|(k, _)| k == "stop_after")
        .map(|(_, v)| v)
        .next_back();
    src.net_from_cmdline = seed_keys
        .iter()
        .any(|(k, _)| NETWORK_KEYS.contains(&k.as_str()) || k.starts_with("network."));
    src.seed
        .apply_overrides(&seed_keys)
        .map_err(|e| ApplianceError::Seed(format!("kernel command line: {e}")))?;
    if !seed_keys.is_empty() {
        let keys: Vec<&str> = seed_keys.iter().map(|(k, _)| k.as_str()).collect();
        console.say(&format!(
            "kernel command line overrides: {}",
            keys.join(", ")
        ));
    }
    Ok(src)
}

/// Asks for the network if there was no seed at all.
fn prompt_network(console: &Console, seed: &mut SeedConfig) -> Result<(), ApplianceError> {
    let gone = || ApplianceError::Seed("console closed while asking for the network".into());
    loop {
        let mode = console
            .ask("Network configuration (dhcp or static)", Some("dhcp"), None)
            .ok_or_else(gone)?;
        match mode.as_str() {
            "dhcp" => {
                seed.network.mode = NetMode::Dhcp;
                seed.network.ipv4 = None;
            }
            "static" => {
                let address = console
                    .ask("IPv4 address/prefix (e.g. 192.0.2.10/24)", None, None)
                    .ok_or_else(gone)?;
                let gateway = console
                    .ask("Default gateway (empty for none)", Some(""), None)
                    .ok_or_else(gone)?;
                let dns = console
                    .ask(
                        "DNS servers (comma separated, empty for none)",
                        Some(""),
                        None,
                    )
                    .ok_or_else(gone)?;
                seed.network.mode = NetMode::Static;
                seed.network.ipv4 = Some(StaticV4 {
                    address,
                    gateway: None,
                });
                let mut ok = Ok(());
                if !gateway.is_empty() {
                    ok = seed.apply_override("gw", &gateway);
                }
                if ok.is_ok() && !dns.is_empty() {
                    ok = seed.apply_override("dns", &dns);
                }
                if let Err(e) = ok.and_then(|()| seed.network.validate()) {
                    console.say(&format!("{e}; please try again"));
                    continue;
                }
            }
            other => {
                console.say(&format!("`{other}` is neither dhcp nor static"));
                continue;
            }
        }
        return Ok(());
    }
}

/// Asks for the DR service values the seed lacks; re-asks until each one validates.
fn prompt_service(console: &Console, seed: &mut SeedConfig) -> Result<(), ApplianceError> {
    let gone = || ApplianceError::Seed("console closed while asking for the DR service".into());
    while let Some(field) = seed.missing().first().copied() {
        let mut trial = seed.clone();
        match field {
            "server_url" => trial.server_url = Some(console.ask("DR service URL (https://host:port)", None, None).ok_or_else(gone)?),
            "token" => trial.token = Some(console.ask("Pairing token", None, None).ok_or_else(gone)?),
            _ => {
                trial.ca_cert_pem = Some(
                    console
                        .ask_block("DR service CA certificate (paste the PEM, end with -----END CERTIFICATE-----)", "-----END CERTIFICATE-----")
                        .ok_or_else(gone)?,
                )
            }
        }
        match trial.validate(Completeness::Partial) {
            Ok(()) => *seed = trial,
            Err(e) => console.say(&format!("{e}; please try again")),
        }
    }
    Ok(())
}

/// How the boot flow ended: what to do, and the restored disks to boot next (UEFI).
#[derive(Debug, Clone)]
struct Ending {
    after: AfterCompletion,
    boot_disks: Vec<String>,
}

impl From<AfterCompletion> for Ending {
    fn from(after: AfterCompletion) -> Self {
        Ending {
            after,
            boot_disks: Vec::new(),
        }
    }
}

/// The whole boot flow up to completion. The error carries `no_prompt`.
fn boot(console: &Console, started: Instant) -> Result<Ending, (ApplianceError, bool)> {
    let SeedSource {
        mut seed,
        found_on,
        stop_after,
        net_from_cmdline,
    } = read_seed(console).map_err(|e| (e, false))?;
    let np = seed.no_prompt;
    let fail = |e: ApplianceError| (e, np);
    let missing = seed.missing();
    if !missing.is_empty() && seed.no_prompt {
        return Err(fail(ApplianceError::Seed(format!(
            "{} missing ({}) and no_prompt is set; attach a seed ISO built with `failback seed build` or pass failback.KEY=VALUE kernel arguments",
            missing.join(", "),
            found_on.as_deref().map_or("no seed ISO found".to_string(), |d| format!("seed on {d}"))
        ))));
    }
    if found_on.is_none() && !seed.no_prompt && !net_from_cmdline {
        prompt_network(console, &mut seed).map_err(fail)?;
    }
    seed.validate(Completeness::Partial)
        .map_err(|e| fail(ApplianceError::Seed(e.to_string())))?;

    console.say("bringing up the network");
    let (state, _dhcp) = net::bring_up(&seed.network).map_err(fail)?;
    console.say(&format!("FAILBACK_NETWORK_UP {}", state.summary));
    let disks = media::describe_disks();
    console.say(&format!(
        "FAILBACK_DISKS {}",
        if disks.is_empty() {
            "none".to_string()
        } else {
            disks.join("; ")
        }
    ));
    if stop_after.as_deref() == Some("network") {
        return Ok(AfterCompletion::Poweroff.into());
    }

    if !seed.no_prompt {
        prompt_service(console, &mut seed).map_err(fail)?;
    }
    seed.validate(Completeness::Complete)
        .map_err(|e| fail(ApplianceError::Seed(e.to_string())))?;
    let url = seed.server_url.clone().unwrap_or_default();
    check_service(console, &seed).map_err(fail)?;
    console.say(&format!(
        "FAILBACK_SERVICE_REACHABLE {url} after {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    if stop_after.as_deref() == Some("probe") {
        return Ok(AfterCompletion::Poweroff.into());
    }

    let after = seed.after;
    match run_failback(console, seed).map_err(fail)? {
        Next::Completed(boot_disks) => Ok(Ending { after, boot_disks }),
        Next::Stopped => Ok(AfterCompletion::Poweroff.into()),
        Next::AlreadyCompleted(done) => already_completed(console, &done).map_err(fail),
    }
}

/// The appliance booted on a machine whose failback already completed (the service said so
/// for our used token). If the local disks still hold exactly what the failback wrote, boot
/// them: UEFI via `BootNext`; BIOS has no such variable and the appliance medium is still
/// first in the boot order, so say what to detach and power off. A disk that differs is an
/// error (something changed it since; nothing is booted or written).
fn already_completed(
    console: &Console,
    done: &failback_api::CompletedFailback,
) -> Result<Ending, ApplianceError> {
    let bs = u32::try_from(done.block_size).unwrap_or(0);
    let mut disks = Vec::new();
    for d in &done.disks {
        console.say(&format!(
            "checking local disk {} against the completed failback of {} ({} bytes)",
            d.local_path, d.remote_id, d.size_bytes
        ));
        let local =
            failback_replication::block::file_digest(Path::new(&d.local_path), d.size_bytes, bs)
                .map_err(|e| {
                    ApplianceError::Run(format!("reading local disk {}: {e}", d.local_path))
                })?;
        let local: String = local.iter().map(|b| format!("{b:02x}")).collect();
        if local != d.digest {
            return Err(ApplianceError::Run(format!(
                "recovery instance {}: the failback completed, but local disk {} now differs from what it wrote (blake3 {local}, expected {}); not booting it: check the disk, or pair with a new token to fail back again",
                done.recovery_instance_id, d.local_path, d.digest
            )));
        }
        disks.push(d.local_path.clone());
    }
    console.say(&format!(
        "FAILBACK_ALREADY_COMPLETED_VERIFIED local disk(s) {} equal the completed failback of recovery instance {}",
        disks.join(", "),
        done.recovery_instance_id
    ));
    if bootnext::is_uefi() {
        return Ok(Ending {
            after: AfterCompletion::Reboot,
            boot_disks: disks,
        });
    }
    console.say(&format!(
        "FAILBACK_DETACH_APPLIANCE the failback of recovery instance {} has completed and {} holds the restored system, but this BIOS machine booted the failback appliance again because its boot medium is still attached: detach the appliance ISO (or remove the USB stick) and power the machine on again. Powering off.",
        done.recovery_instance_id,
        disks.join(", ")
    ));
    Ok(AfterCompletion::Poweroff.into())
}

/// Probes the DR service with retries (the network may need a moment), and sets the clock
/// from its Date header when ours is off by more than [`MAX_SKEW`].
fn check_service(console: &Console, seed: &SeedConfig) -> Result<(), ApplianceError> {
    let urls: Vec<&str> = seed
        .server_url
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .collect();
    let ca = seed.ca_cert_pem.as_deref().unwrap_or_default();
    let proxy = seed.proxy.as_ref().map(|p| p.url.as_str());
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut delay = Duration::from_secs(1);
    // Several service URLs (replicas): the first that answers; each in turn when none does.
    let mut tried = 0;
    let (url, probe) = loop {
        let url = urls[tried % urls.len()];
        tried += 1;
        match probe::probe(url, ca, proxy) {
            Ok(p) => break (url, p),
            Err(e) if e.transient && tried % urls.len() != 0 => {
                console.say(&format!(
                    "DR service not reachable ({e}); trying the next URL"
                ));
            }
            Err(e) if e.transient && Instant::now() < deadline => {
                console.say(&format!(
                    "DR service not reachable yet ({e}); retrying in {}s",
                    delay.as_secs()
                ));
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(ApplianceError::Service(e.message)),
        }
    };
    if let Some(server) = probe.server_time {
        let now = SystemTime::now();
        let skew = server
            .duration_since(now)
            .or_else(|_| now.duration_since(server))
            .unwrap_or_default();
        if skew > MAX_SKEW || probe.clock_suspect {
            console.say(&format!(
                "WARNING: clock is off by {}s from the DR service; setting it to {}",
                skew.as_secs(),
                httpdate::fmt_http_date(server)
            ));
            system::set_clock(server)
                .map_err(|e| ApplianceError::System(format!("setting the clock: {e}")))?;
        }
    } else if probe.clock_suspect {
        return Err(ApplianceError::Service(format!(
            "{url}: certificate not valid at our clock and the service sent no Date header to correct it"
        )));
    }
    console.say(&format!(
        "DR service {url} answered: {}",
        probe.status.trim()
    ));
    Ok(())
}

/// How [`run_failback`] ended.
enum Next {
    /// Completed; the restored local disks.
    Completed(Vec<String>),
    /// Stopped by the operator: the local disks are incomplete, power off.
    Stopped,
    /// The token's failback had already completed (the appliance booted again).
    AlreadyCompleted(failback_api::CompletedFailback),
}

/// Pairs, syncs and waits for launch: the DR-service client's [`crate::run::run`]. Returns
/// what to do next.
fn run_failback(console: &Console, seed: SeedConfig) -> Result<Next, ApplianceError> {
    use crate::run::{run, RunOptions, RunOutcome};
    if let Some(proxy) = &seed.proxy {
        // reqwest takes its proxy from the environment; the process is single-purpose.
        std::env::set_var("HTTPS_PROXY", &proxy.url);
        std::env::set_var("HTTP_PROXY", &proxy.url);
        if !proxy.no_proxy.is_empty() {
            std::env::set_var("NO_PROXY", proxy.no_proxy.join(","));
        }
    }
    let mut opts = RunOptions::new(
        seed.server_url.clone().unwrap_or_default(),
        seed.token.clone().unwrap_or_default(),
    );
    opts.ca_pem = seed.ca_cert_pem.clone();
    opts.instance = seed.instance_id.clone();
    if !seed.mappings.is_empty() {
        opts.mapping = Some(
            seed.mappings
                .iter()
                .map(|m| failback_api::DeviceMapping {
                    remote: m.remote.clone(),
                    local: m.local.clone(),
                })
                .collect(),
        );
    }
    opts.log_file = Some(console::LOG_FILE.into());
    match run(opts) {
        Ok(RunOutcome::Completed {
            recovery_instance_id,
            digests,
        }) => {
            console.say(&format!(
                "failback from recovery instance {recovery_instance_id} completed"
            ));
            Ok(Next::Completed(
                digests.into_iter().map(|d| d.local_path).collect(),
            ))
        }
        Ok(RunOutcome::AlreadyCompleted(done)) => Ok(Next::AlreadyCompleted(done)),
        Ok(RunOutcome::Stopped {
            recovery_instance_id,
        }) => {
            console.say(&format!(
                "failback from {recovery_instance_id} stopped by the operator; local disks are incomplete, powering off"
            ));
            Ok(Next::Stopped)
        }
        Err(e) => Err(ApplianceError::Run(e.to_string())),
    }
}

/// Flushes, ejects the appliance CD, reboots or powers off. Before a reboot on UEFI the
/// restored disk becomes `BootNext`: a guest-side eject does not survive a reset on every
/// hypervisor (QEMU/SeaBIOS/OVMF load the medium again), and a USB stick cannot be ejected.
fn finish(console: &Console, end: Ending) -> ! {
    let after = end.after;
    system::sync();
    if after == AfterCompletion::Reboot && bootnext::is_uefi() {
        match end.boot_disks.iter().find_map(|d| bootnext::boot_disk_next(Path::new(d)).ok()) {
            Some(line) => console.say(&format!("FAILBACK_BOOT_NEXT {line}")),
            None if !end.boot_disks.is_empty() => console.say(&format!(
                "WARNING: could not make {} the next boot (no EFI system partition or no efivarfs); the firmware's boot order decides",
                end.boot_disks.join(", ")
            )),
            None => {}
        }
    }
    if let Some(kib) = system::peak_rss_kib() {
        console.say(&format!("peak client memory {} MiB", kib.div_ceil(1024)));
    }
    for dev in media::scan()
        .into_iter()
        .filter(|d| d.label == APPLIANCE_LABEL && d.name.starts_with("sr"))
    {
        match system::eject(&format!("/dev/{}", dev.name)) {
            Ok(()) => console.say(&format!("ejected the appliance CD /dev/{}", dev.name)),
            Err(e) => console.say(&format!("WARNING: ejecting /dev/{}: {e}", dev.name)),
        }
    }
    let poweroff = after == AfterCompletion::Poweroff;
    console.say(&format!(
        "FAILBACK_DONE {}",
        if poweroff {
            "powering off"
        } else {
            "rebooting"
        }
    ));
    let err = system::reboot(poweroff);
    console.say(&format!("FAILBACK_FAILED reboot: {err}"));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
