//! Helpers for the mass-failback end-to-end tests: a real vcsim, a real DR service
//! (`failback-server`), the `failback` CLI, and a simulated failback client.
//!
//! The simulated client is what "clients simulated against the real DR service" means in the
//! scale test: it plays the hypervisor + appliance for vcsim VMs that power on from an ISO
//! (reads the VM's real seed ISO from vcsim's datastore directory, pairs with the token in
//! it, reports sync progress and completion through the real client API, then powers the VM
//! off as the appliance does), without QEMU or disk data.
#![allow(dead_code)]

use failback_api::{
    AgentDisk, AgentEnrollRequest, AgentEnrollResponse, ClientCommand, ClientCommandResponse,
    ClientPhase, ClientReport, CreateTokenRequest, CreateTokenResponse, DiskDigest, DiskProgress,
    IdentificationHints, Inventory, InventoryDisk, PairRequest, PairResponse, TokenKind,
};
use failback_config::seed::SeedConfig;
use failback_vcenter::{Client, Config, PowerOp, TlsMode};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use failback_tests::bin;
use failback_tests::wait_for_file;

/// A running vcsim (killed on drop; datastores in its temp dir): `failback_tests::vcsim`
/// plus a vCenter `Config` for it.
pub struct Vcsim(failback_tests::vcsim::Vcsim);

impl Vcsim {
    pub fn start(extra: &[&str]) -> Vcsim {
        Vcsim(failback_tests::vcsim::Vcsim::start(extra))
    }

    pub fn config(&self) -> Config {
        let (url, user, password) = self.0.login();
        let mut c = Config::new(&url, user, password);
        c.tls = TlsMode::Insecure;
        c.task_timeout = Duration::from_secs(120);
        c
    }

    /// A logged-in vCenter client for this simulator.
    pub async fn client(&self) -> Client {
        Client::connect(self.config()).await.unwrap()
    }
}

impl std::ops::Deref for Vcsim {
    type Target = failback_tests::vcsim::Vcsim;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// The VMs (not templates) in vCenter, sorted by name.
pub async fn non_template_vms(vc: &Client) -> Vec<failback_vcenter::Vm> {
    let mut vms: Vec<_> = vc
        .list_vms()
        .await
        .unwrap()
        .into_iter()
        .filter(|v| !v.summary.template)
        .collect();
    vms.sort_by(|a, b| a.summary.name.cmp(&b.summary.name));
    vms
}

/// A VM's complete boot options as vim25 XML: what the orchestrator saves before it sets
/// CD-ROM first and must restore exactly.
pub fn boot_xml(v: &failback_vcenter::Vm) -> Option<String> {
    v.boot_options
        .as_ref()
        .map(|b| b.to_xml(Some("bootOptions")))
}

/// moref -> [`boot_xml`] for `vms`, taken before a run to compare with afterwards.
pub fn boot_options_by_moref<'a>(
    vms: impl IntoIterator<Item = &'a failback_vcenter::Vm>,
) -> HashMap<String, Option<String>> {
    vms.into_iter()
        .map(|v| (v.summary.moref.clone(), boot_xml(v)))
        .collect()
}

/// After a run, every VM in `before` (moref -> [`boot_xml`] from before the run) is powered
/// on, has no ISO on any CD-ROM and has exactly its boot options from before. One
/// `list_vms` call, so it stays cheap for the 500-VM run.
pub async fn assert_vms_restored(vc: &Client, before: &HashMap<String, Option<String>>) {
    let vms = vc.list_vms().await.unwrap();
    let mut seen = 0;
    for v in vms.iter().filter(|v| !v.summary.template) {
        let Some(boot) = before.get(&v.summary.moref) else {
            continue;
        };
        seen += 1;
        assert_eq!(
            v.summary.power_state,
            failback_vcenter::PowerState::PoweredOn,
            "{}",
            v.summary.name
        );
        assert!(
            v.summary.cdroms.iter().all(|c| c.iso.is_none()),
            "{}: {:?}",
            v.summary.name,
            v.summary.cdroms
        );
        assert_eq!(&boot_xml(v), boot, "boot options of {}", v.summary.name);
    }
    assert_eq!(seen, before.len(), "VMs missing from vCenter after the run");
}

/// A running DR service (`failback-server serve`), killed on drop.
pub struct DrService {
    child: Child,
    pub url: String,
    pub data_dir: tempfile::TempDir,
    pub admin_token: String,
    pub ca_pem: String,
    pub ca_path: PathBuf,
}

impl DrService {
    /// For simulated agents and clients: they never time out (a simulated client may wait
    /// long between reports), and clients heartbeat every second.
    pub fn start_for_simulation() -> DrService {
        Self::start(&[
            "--agent-timeout-secs",
            "86400",
            "--client-timeout-secs",
            "86400",
            "--heartbeat-secs",
            "1",
        ])
    }

    pub fn start(extra: &[&str]) -> DrService {
        let data_dir = tempfile::tempdir().expect("tempdir");
        let addr_file = data_dir.path().join("addr");
        let mut child = Command::new(bin("failback-server"))
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir.path())
            .args(["--listen", "127.0.0.1:0", "--addr-file"])
            .arg(&addr_file)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn failback-server");
        wait_for_file(&addr_file, &mut child, "failback-server");
        let addr = std::fs::read_to_string(&addr_file).expect("addr file");
        let port = addr.trim().rsplit(':').next().unwrap().to_string();
        let admin_token = std::fs::read_to_string(data_dir.path().join("admin-token"))
            .expect("admin-token")
            .trim()
            .to_string();
        let ca_path = data_dir.path().join("ca.pem");
        let ca_pem = std::fs::read_to_string(&ca_path).expect("ca.pem");
        DrService {
            child,
            url: format!("https://127.0.0.1:{port}"),
            data_dir,
            admin_token,
            ca_pem,
            ca_path,
        }
    }

    pub fn http(&self) -> reqwest::Client {
        http_pinned(&self.ca_pem)
    }

    pub fn cli_env(&self) -> Vec<(String, String)> {
        vec![
            ("FAILBACK_SERVER".into(), self.url.clone()),
            ("FAILBACK_ADMIN_TOKEN".into(), self.admin_token.clone()),
            ("FAILBACK_CA".into(), self.ca_path.display().to_string()),
        ]
    }

    pub async fn token(&self, kind: TokenKind, instance: Option<&str>) -> String {
        let r: CreateTokenResponse = self
            .http()
            .post(format!("{}/v1/admin/tokens", self.url))
            .bearer_auth(&self.admin_token)
            .json(&CreateTokenRequest {
                kind,
                recovery_instance_id: instance.map(str::to_string),
                ttl_secs: Some(3600),
            })
            .send()
            .await
            .expect("create token")
            .error_for_status()
            .expect("create token status")
            .json()
            .await
            .expect("token json");
        r.token
    }

    /// Enrolls a simulated recovery agent (no replication endpoint behind it) for a source
    /// VM with this BIOS UUID; returns the recovery instance id.
    pub async fn enroll_sim_agent(&self, bios_uuid: &str, disk_bytes: u64) -> String {
        let token = self.token(TokenKind::Agent, None).await;
        let r: AgentEnrollResponse = self
            .http()
            .post(format!("{}/v1/agent/enroll", self.url))
            .json(&AgentEnrollRequest {
                token,
                address: "127.0.0.1:9".into(),
                private_address: None,
                disks: vec![AgentDisk {
                    id: "disk0".into(),
                    size_bytes: disk_bytes,
                    logical_sector_size: 512,
                    device: Some("/dev/xvda".into()),
                }],
                hostname: None,
                source_hints: Some(IdentificationHints {
                    vmware_uuid: Some(bios_uuid.to_string()),
                    ..Default::default()
                }),
                cert_sans: vec![],
            })
            .send()
            .await
            .expect("enroll")
            .error_for_status()
            .expect("enroll status")
            .json()
            .await
            .expect("enroll json");
        r.recovery_instance_id
    }
}

impl Drop for DrService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn http_pinned(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("CA"))
        .timeout(Duration::from_secs(60))
        .build()
        .expect("http client")
}

/// Runs the `failback` CLI with env; returns (exit code, stdout, stderr).
pub fn failback(args: &[&str], env: &[(String, String)]) -> (i32, String, String) {
    let out = Command::new(bin("failback"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("NO_COLOR", "1")
        .output()
        .expect("run failback");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`failback`] on a blocking thread, so an async test's other tasks (simulated clients) run.
pub async fn failback_async(
    args: Vec<String>,
    env: Vec<(String, String)>,
) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        failback(&a, &env)
    })
    .await
    .unwrap()
}

/// Reads one file from the root directory of an ISO 9660 image (primary volume descriptor;
/// enough for our seed ISO, whose only file is `seed.toml`). Written here, in a test helper,
/// because the ISO crates we use write images and this needs 30 lines.
pub fn iso_root_file(iso: &Path, name: &str) -> Option<Vec<u8>> {
    let data = std::fs::read(iso).ok()?;
    let pvd = data.get(16 * 2048..17 * 2048)?;
    if &pvd[1..6] != b"CD001" {
        return None;
    }
    let root = &pvd[156..190];
    let lba = u32::from_le_bytes(root[2..6].try_into().ok()?) as usize;
    let len = u32::from_le_bytes(root[10..14].try_into().ok()?) as usize;
    let dir = data.get(lba * 2048..lba * 2048 + len)?;
    let mut off = 0;
    let want = name.to_ascii_uppercase();
    while off < dir.len() {
        let rl = dir[off] as usize;
        if rl == 0 {
            off = (off / 2048 + 1) * 2048;
            continue;
        }
        let rec = dir.get(off..off + rl)?;
        let nl = rec[32] as usize;
        let id = String::from_utf8_lossy(&rec[33..33 + nl]).to_ascii_uppercase();
        let id = id.split(';').next().unwrap_or("").to_string();
        if id == want {
            let flba = u32::from_le_bytes(rec[2..6].try_into().ok()?) as usize;
            let flen = u32::from_le_bytes(rec[10..14].try_into().ok()?) as usize;
            return data
                .get(flba * 2048..flba * 2048 + flen)
                .map(<[u8]>::to_vec);
        }
        off += rl;
    }
    None
}

/// What the simulated clients did (for assertions).
#[derive(Debug, Default)]
pub struct SimLog {
    pub paired: HashSet<String>,
    pub completed: HashSet<String>,
    pub errors: Vec<String>,
}

/// Simulated hypervisor + appliance for vcsim VMs (see module doc). VMs whose BIOS UUID is in
/// `never_pair` boot but their client never pairs. Runs until `stop` is set.
pub async fn simulate_clients(
    vcsim_cfg: Config,
    datastore_dirs: HashMap<String, PathBuf>,
    never_pair: HashSet<String>,
    log: Arc<Mutex<SimLog>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let client = Arc::new(Client::connect(vcsim_cfg).await.expect("sim: vcsim login"));
    let mut started: HashSet<String> = HashSet::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let vms = match client.list_vms().await {
            Ok(v) => v,
            Err(e) => {
                log.lock().unwrap().errors.push(format!("list: {e}"));
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        for vm in vms {
            if vm.summary.power_state != failback_vcenter::PowerState::PoweredOn {
                continue;
            }
            let cd_first = vm
                .boot_options
                .as_ref()
                .and_then(|b| b.children_named("bootOrder").next())
                .is_some_and(|b| b.type_name() == "VirtualMachineBootOptionsBootableCdromDevice");
            if !cd_first {
                continue;
            }
            // The seed ISO among the attached ones (by its volume label).
            let seed = vm
                .summary
                .cdroms
                .iter()
                .filter_map(|c| c.iso.as_deref())
                .find_map(|iso| {
                    let rest = iso.strip_prefix('[')?;
                    let (ds, path) = rest.split_once(']')?;
                    let file = datastore_dirs
                        .get(&ds.to_uppercase())?
                        .join(path.trim_start());
                    let text = iso_root_file(&file, "seed.toml")?;
                    SeedConfig::from_toml(&String::from_utf8_lossy(&text)).ok()
                });
            let Some(seed) = seed else { continue };
            let key = format!(
                "{}:{}",
                vm.summary.moref,
                seed.token.clone().unwrap_or_default()
            );
            if !started.insert(key) {
                continue;
            }
            let bios = vm.summary.bios_uuid.clone().unwrap_or_default();
            if never_pair.contains(&bios) {
                continue;
            }
            let client = client.clone();
            let log = log.clone();
            let vmref = vm.vmref.clone();
            tokio::spawn(async move {
                if let Err(e) = sim_client(&seed, &bios, &log).await {
                    log.lock()
                        .unwrap()
                        .errors
                        .push(format!("{}: {e}", vmref.name));
                    return;
                }
                // after = poweroff: the appliance powers the VM off.
                if let Err(e) = client.power(&vmref, PowerOp::Off).await {
                    log.lock()
                        .unwrap()
                        .errors
                        .push(format!("{} power off: {e}", vmref.name));
                }
            });
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn sim_client(seed: &SeedConfig, bios: &str, log: &Arc<Mutex<SimLog>>) -> Result<(), String> {
    let http = http_pinned(seed.ca_cert_pem.as_deref().ok_or("seed has no CA")?);
    let url = seed.server_url.clone().ok_or("seed has no server_url")?;
    let pair: PairResponse = http
        .post(format!("{url}/v1/pair"))
        .json(&PairRequest {
            token: seed.token.clone().ok_or("seed has no token")?,
            inventory: Inventory {
                smbios_uuid: Some(bios.to_string()),
                disks: vec![InventoryDisk {
                    path: "/dev/sda".into(),
                    size_bytes: 64 << 20,
                    logical_sector_size: 512,
                    ..Default::default()
                }],
                ..Default::default()
            },
            recovery_instance_id: seed.instance_id.clone(),
            device_mapping: None,
            client_version: Some("sim".into()),
        })
        .send()
        .await
        .map_err(|e| e.to_string())?
        .error_for_status()
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    log.lock()
        .unwrap()
        .paired
        .insert(pair.recovery_instance_id.clone());
    let disks = |done: u64| {
        pair.device_mapping
            .iter()
            .map(|m| DiskProgress {
                remote_id: m.remote.clone(),
                local_path: m.local.clone(),
                total_bytes: 64 << 20,
                replicated_bytes: done,
                rescanned_bytes: done,
                backlog_bytes: (64 << 20) - done,
                // As the real client counts them: a delta writes and fetches less than
                // the disk (here a quarter differed, compressed to a sixteenth).
                differing_bytes: Some(done / 4),
                fetched_bytes: Some(done / 16),
                ..Default::default()
            })
            .collect::<Vec<_>>()
    };
    let report = |phase, round, done, digests: Vec<DiskDigest>| ClientReport {
        phase,
        round,
        disks: disks(done),
        last_round_differing_bytes: None,
        last_round_secs: None,
        last_consistent_at: None,
        digests,
        error: None,
    };
    let hb = |r: ClientReport| {
        let http = http.clone();
        let url = url.clone();
        let secret = pair.client_secret.clone();
        async move {
            let resp: ClientCommandResponse = http
                .post(format!("{url}/v1/client/heartbeat"))
                .bearer_auth(secret)
                .json(&r)
                .send()
                .await
                .map_err(|e| e.to_string())?
                .error_for_status()
                .map_err(|e| e.to_string())?
                .json()
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(resp)
        }
    };
    hb(report(ClientPhase::Syncing, 1, 32 << 20, vec![])).await?;
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        let r = hb(report(ClientPhase::Idle, 1, 64 << 20, vec![])).await?;
        if r.command == ClientCommand::Launch {
            break;
        }
        if r.command == ClientCommand::Stop || Instant::now() > deadline {
            return Err(format!("told to stop ({:?})", r.failback_state));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    hb(report(ClientPhase::Finalizing, 2, 64 << 20, vec![])).await?;
    let digests = pair
        .device_mapping
        .iter()
        .map(|m| DiskDigest {
            remote_id: m.remote.clone(),
            local_path: m.local.clone(),
            local_digest: "5e".repeat(32),
            agent_digest: "5e".repeat(32),
        })
        .collect();
    hb(report(ClientPhase::Completed, 2, 64 << 20, digests)).await?;
    log.lock()
        .unwrap()
        .completed
        .insert(pair.recovery_instance_id.clone());
    Ok(())
}

/// Every VM's configuration as read by `tests/vm_config.py` (pyVmomi, not our `vcenter`
/// crate): name -> {moref, power, devices (every property), boot_options, snapshots}.
pub fn vm_config_dump(vcsim: &Vcsim) -> HashMap<String, serde_json::Value> {
    vm_config_cmd(vcsim, &["dump"])
        .and_then(|out| {
            serde_json::from_str::<Vec<serde_json::Value>>(&out).map_err(|e| e.to_string())
        })
        .expect("vm_config.py dump")
        .into_iter()
        .map(|v| (v["name"].as_str().unwrap().to_string(), v))
        .collect()
}

/// `tests/vm_config.py customise NAME`: a host-device CD-ROM (start-connected, connected, no
/// guest control) and boot options of its own.
pub fn vm_config_customise(vcsim: &Vcsim, name: &str) {
    vm_config_cmd(vcsim, &["customise", name]).expect("vm_config.py customise");
}

fn vm_config_cmd(vcsim: &Vcsim, args: &[&str]) -> Result<String, String> {
    let script = failback_tests::vcsim::workspace_root().join("tests/vm_config.py");
    // Debian's python3 (python3-pyvmomi), not whatever python3 is first on PATH.
    let out = Command::new("/usr/bin/python3")
        .arg(script)
        .args(args)
        .envs(vcsim.cli_env())
        .output()
        .map_err(|e| format!("run /usr/bin/python3: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "vm_config.py {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Each VM of `before` has exactly the same power state, devices (every property of every
/// device) and boot options in `after`; its snapshots too, except the VMs in `new_snapshots`,
/// which must have gained exactly one snapshot named `failback-protect-*`.
pub fn assert_same_config(
    before: &HashMap<String, serde_json::Value>,
    after: &HashMap<String, serde_json::Value>,
    new_snapshots: &[&str],
) {
    assert_eq!(before.len(), after.len(), "VM count changed");
    for (name, b) in before {
        let a = after
            .get(name)
            .unwrap_or_else(|| panic!("VM {name} is gone"));
        for key in ["moref", "power", "boot_options"] {
            assert_eq!(a[key], b[key], "{key} of VM {name} changed");
        }
        let (bd, ad) = (
            b["devices"].as_array().unwrap(),
            a["devices"].as_array().unwrap(),
        );
        for d in bd {
            let key = &d["key"];
            let now = ad.iter().find(|x| x["key"] == *key);
            assert_eq!(now, Some(d), "device {key} of VM {name} changed");
        }
        for d in ad {
            assert!(
                bd.iter().any(|x| x["key"] == d["key"]),
                "VM {name} gained device {d:#}"
            );
        }
        if new_snapshots.contains(&name.as_str()) {
            let s = a["snapshots"].as_array().unwrap();
            assert_eq!(s.len(), 1, "snapshots of {name}: {s:?}");
            assert!(
                s[0]["name"]
                    .as_str()
                    .unwrap()
                    .starts_with("failback-protect-"),
                "{s:?}"
            );
        } else {
            assert_eq!(a["snapshots"], b["snapshots"], "snapshots of VM {name}");
        }
    }
}

/// `tests/vm_config.py set NAME key=value...` (`uuid=`, `guest_ip=`).
pub fn vm_config_set(vcsim: &Vcsim, name: &str, fields: &[&str]) {
    let mut args = vec!["set", name];
    args.extend_from_slice(fields);
    vm_config_cmd(vcsim, &args).expect("vm_config.py set");
}

/// Simulated clients (see [`simulate_clients`]) for one vcsim's VMs on `LocalDS_0`, running
/// until [`Sim::finish`].
pub struct Sim {
    pub log: Arc<Mutex<SimLog>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Sim {
    /// VMs whose BIOS UUID is in `never_pair` boot, but their client never pairs.
    pub fn start(vcsim: &Vcsim, never_pair: HashSet<String>) -> Sim {
        let log = Arc::new(Mutex::new(SimLog::default()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let dirs = HashMap::from([("LOCALDS_0".to_string(), vcsim.datastore_dir("LocalDS_0"))]);
        let task = tokio::spawn(simulate_clients(
            vcsim.config(),
            dirs,
            never_pair,
            log.clone(),
            stop.clone(),
        ));
        Sim { log, stop, task }
    }

    /// Stops the simulation and returns what it did; asserts it met no error.
    pub async fn finish(self) -> SimLog {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.task.await;
        let log = std::mem::take(&mut *self.log.lock().unwrap());
        assert!(log.errors.is_empty(), "simulated clients: {:?}", log.errors);
        log
    }
}

/// A stand-in appliance ISO of 256 KiB in `dir` (the simulated clients never boot it).
pub fn stub_appliance(dir: &Path) -> PathBuf {
    let p = dir.join("failback.iso");
    if !p.exists() {
        std::fs::write(&p, vec![1u8; 256 << 10]).unwrap();
    }
    p
}

/// `failback mass run PLAN --appliance-iso (stub in dir) --parallel N --poll-ms 200
/// --progress plain EXTRA...`
pub fn mass_run_args(plan: &Path, dir: &Path, parallel: usize, extra: &[&str]) -> Vec<String> {
    let appliance = stub_appliance(dir);
    let mut a: Vec<String> = ["mass", "run", plan.to_str().unwrap(), "--parallel"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.push(parallel.to_string());
    for s in [
        "--poll-ms",
        "200",
        "--appliance-iso",
        appliance.to_str().unwrap(),
        "--progress",
        "plain",
    ] {
        a.push(s.to_string());
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// `failback mass plan --one-click -o PLAN EXTRA...`, which must succeed; the plan and the
/// command's output.
pub fn one_click_plan(
    env: &[(String, String)],
    plan: &Path,
    extra: &[&str],
) -> (failback_config::plan::Plan, String) {
    let mut args = vec!["mass", "plan", "--one-click", "-o", plan.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (code, out, err) = failback(&args, env);
    assert_eq!(code, 0, "mass plan: {out}\n{err}");
    (
        failback_config::plan::Plan::load(plan).expect("load the written plan"),
        out,
    )
}

/// Writes `plan` back to `path` (TOML).
pub fn save_plan(plan: &failback_config::plan::Plan, path: &Path) {
    let text = plan
        .encode(failback_config::plan::PlanFormat::Toml)
        .unwrap();
    std::fs::write(path, text).unwrap();
}

/// A results (or any JSON) file.
pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The results' VMs by `vm` label (`vcenter/name` in multi-vCenter plans), and also by
/// `vm_name` when that is unique.
pub fn results_by_vm(r: &serde_json::Value) -> HashMap<String, serde_json::Value> {
    let vms = r["vms"].as_array().unwrap();
    let mut out = HashMap::new();
    for v in vms {
        out.insert(v["vm"].as_str().unwrap().to_string(), v.clone());
        if let Some(n) = v["vm_name"].as_str() {
            if vms.iter().filter(|x| x["vm_name"] == n).count() == 1 {
                out.insert(n.to_string(), v.clone());
            }
        }
    }
    out
}

/// Starts `failback ARGS` and kills it with SIGKILL as soon as the state in `state_dir`
/// shows a VM whose last completed step is `step` or later; returns that step. Fails if the
/// run ends first or makes no progress for 120 s.
pub async fn kill_run_after(
    args: &[String],
    env: &[(String, String)],
    state_dir: &Path,
    step: failback_orchestrator::mass::state::Step,
) -> failback_orchestrator::mass::state::Step {
    let mut child = Command::new(bin("failback"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn failback mass run");
    let t0 = Instant::now();
    loop {
        let st = failback_orchestrator::mass::state::load(state_dir).ok();
        let past = st.as_ref().and_then(|s| {
            s.vms
                .iter()
                .filter_map(|v| v.last_completed)
                .find(|s| *s >= step)
        });
        if let Some(reached) = past {
            child.kill().unwrap();
            child.wait().unwrap();
            return reached;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "run finished before it could be killed"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "run made no progress"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A vcsim (started with `vcsim_args`), a DR service for simulated clients, a logged-in
/// vCenter client, the VMs (not templates, by name), the CLI environment for both and a work
/// directory.
pub struct World {
    pub vcsim: Vcsim,
    pub dr: DrService,
    pub vc: Client,
    pub vms: Vec<failback_vcenter::Vm>,
    pub env: Vec<(String, String)>,
    pub work: tempfile::TempDir,
}

impl World {
    pub async fn start(vcsim_args: &[&str]) -> World {
        let vcsim = Vcsim::start(vcsim_args);
        let dr = DrService::start_for_simulation();
        let vc = vcsim.client().await;
        let vms = non_template_vms(&vc).await;
        let mut env = vcsim.cli_env();
        env.extend(dr.cli_env());
        World {
            vcsim,
            dr,
            vc,
            vms,
            env,
            work: tempfile::tempdir().unwrap(),
        }
    }

    pub fn name(&self, i: usize) -> String {
        self.vms[i].summary.name.clone()
    }

    pub fn bios(&self, i: usize) -> String {
        self.vms[i].summary.bios_uuid.clone().unwrap()
    }
}
