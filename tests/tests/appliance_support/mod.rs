//! Shared by the appliance tests: the static client, ISO builds (cached per test binary), the
//! DR service on 127.0.0.1, and QEMU (TCG) with a serial console the test can read and type on.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// The unpacked Debian inputs; `make setup` fetches them (never skipped: a clear failure).
pub fn inputs() -> failback_iso::inputs::Inputs {
    let cache = failback_iso::inputs::default_cache();
    failback_iso::inputs::Inputs::from_cache(&cache).unwrap_or_else(|e| {
        panic!("appliance ISO inputs missing ({e}); run `make setup` (iso-inputs step)")
    })
}

/// The static musl client, built once (stripped, as `make iso` builds it).
pub fn client() -> PathBuf {
    static CLIENT: OnceLock<PathBuf> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            let ws = workspace();
            let status = Command::new(cargo())
                .current_dir(&ws)
                .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
                .args([
                    "build",
                    "--release",
                    "--target",
                    "x86_64-unknown-linux-musl",
                    "-p",
                    "failback-client",
                ])
                .status()
                .expect("running cargo build for the musl client");
            assert!(status.success(), "building the static musl client failed");
            ws.join("target/x86_64-unknown-linux-musl/release/failback-client")
        })
        .clone()
}

/// A workspace binary from target/debug, built if `make test` did not build it yet.
pub fn bin(name: &str, package: &str) -> PathBuf {
    let ws = workspace();
    let path = ws.join("target/debug").join(name);
    if !path.exists() {
        let status = Command::new(cargo())
            .current_dir(&ws)
            .args(["build", "-p", package, "--bin", name])
            .status()
            .expect("running cargo build");
        assert!(status.success(), "building {name} failed");
    }
    path
}

/// Directory for built test ISOs (kept between runs: a cache, rebuilt by each test binary).
pub fn out_dir() -> PathBuf {
    let d = workspace().join("target/appliance-test");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Builds an appliance ISO with extra kernel arguments; `tag` names the file.
pub fn build_iso(tag: &str, extra: &str) -> (PathBuf, failback_iso::appliance::ApplianceReport) {
    let out = out_dir().join(format!("{tag}-{}.iso", std::process::id()));
    let report = failback_iso::appliance::build(
        &failback_iso::appliance::ApplianceOptions {
            inputs: inputs(),
            client: client(),
            extra_kernel_args: extra.into(),
        },
        &out,
    )
    .unwrap_or_else(|e| panic!("building {}: {e}", out.display()));
    (out, report)
}

/// The product ISO (no extra kernel arguments), built once per test binary.
pub fn product_iso() -> &'static (PathBuf, failback_iso::appliance::ApplianceReport) {
    static ISO: OnceLock<(PathBuf, failback_iso::appliance::ApplianceReport)> = OnceLock::new();
    ISO.get_or_init(|| build_iso("failback", ""))
}

/// A running DR service (failback-server) on 127.0.0.1 with SAN 10.0.2.2 for QEMU guests.
pub struct Server {
    pub child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Server {
    pub fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let addr_file = dir.path().join("addr");
        let child = Command::new(bin("failback-server", "failback-server"))
            .args(["serve", "--listen", "127.0.0.1:0", "--san", "10.0.2.2"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--addr-file")
            .arg(&addr_file)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("server.log")).unwrap())
            .spawn()
            .expect("starting failback-server");
        let start = Instant::now();
        let port = loop {
            if let Ok(text) = std::fs::read_to_string(&addr_file) {
                if let Some(p) = text.trim().rsplit(':').next().and_then(|p| p.parse().ok()) {
                    break p;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "failback-server did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        Server { child, port, dir }
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("data/ca.pem")).unwrap()
    }

    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("data/admin-token"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// URL as the QEMU guest sees it.
    pub fn guest_url(&self) -> String {
        format!("https://10.0.2.2:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    Bios,
    Uefi,
    SecureBoot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hardware {
    /// pvscsi disk + vmxnet3 NIC.
    VmwareLike,
    /// virtio-scsi disk + virtio-net NIC.
    Virtio,
}

/// Where the appliance ISO is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootFrom {
    /// An IDE/AHCI CD-ROM (El Torito).
    Cd,
    /// A read-only USB stick on an xHCI controller (the hybrid MBR/GPT).
    Usb,
}

/// A QEMU VM whose serial console is the test's stdin/stdout pipe.
pub struct Vm {
    child: Child,
    stdin: ChildStdin,
    out: Arc<Mutex<String>>,
    pub name: String,
    /// When QEMU was started.
    pub started: Instant,
    _vars: tempfile::TempDir,
}

pub struct VmConfig<'a> {
    pub name: &'a str,
    pub firmware: Firmware,
    pub hardware: Hardware,
    pub iso: &'a Path,
    pub seed: Option<&'a Path>,
    pub disks: Vec<(&'a Path, &'a str)>,
    /// QEMU `-rtc base=` (a wrong guest clock), if set.
    pub rtc_base: Option<&'a str>,
}

/// Less common VM options ([`Vm::start_with`]).
#[derive(Debug, Default, Clone)]
pub struct VmExtra {
    /// Let a guest reboot reset the VM (no `-no-reboot`): the same VM boots again.
    pub reboot: bool,
    /// OVMF variable store to use (and keep) instead of a fresh copy: NVRAM across runs.
    pub vars: Option<PathBuf>,
    /// Act as a hypervisor that honours the guest's eject of the appliance CD: when the
    /// guest opens the tray (DEVICE_TRAY_MOVED on QMP), remove the medium. QEMU alone keeps
    /// it (SeaBIOS loads and boots it again after the reset).
    pub honour_eject: bool,
}

/// QMP device id of the appliance CD drive.
pub const APPLIANCE_CD_ID: &str = "appcd";

/// Follows QMP events on `sock`; removes the appliance CD's medium when the guest opens its
/// tray. Runs until QEMU closes the socket.
fn honour_eject(sock: PathBuf, name: String) {
    use std::io::BufRead;
    let start = Instant::now();
    let stream = loop {
        match std::os::unix::net::UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(_) if start.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("{name}: QMP socket {}: {e}", sock.display()),
        }
    };
    let mut w = stream.try_clone().unwrap();
    let mut lines = std::io::BufReader::new(stream).lines();
    let _greeting = lines.next();
    writeln!(w, r#"{{"execute":"qmp_capabilities"}}"#).unwrap();
    for line in lines.map_while(Result::ok) {
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["event"] == "DEVICE_TRAY_MOVED"
            && v["data"]["id"] == APPLIANCE_CD_ID
            && v["data"]["tray-open"] == true
        {
            eprintln!(
                "{name}: guest ejected the appliance CD; removing the medium (hypervisor side)"
            );
            let _ = writeln!(
                w,
                r#"{{"execute":"blockdev-remove-medium","arguments":{{"id":"{APPLIANCE_CD_ID}"}}}}"#
            );
        }
    }
}

impl Vm {
    /// Boots `c.iso` from a CD-ROM.
    pub fn start(c: &VmConfig) -> Vm {
        Vm::start_from(c, BootFrom::Cd)
    }

    /// Boots `c.iso` from a CD-ROM or, as a disk, from a USB stick (the seed stays a CD).
    pub fn start_from(c: &VmConfig, from: BootFrom) -> Vm {
        Vm::start_with(c, from, &VmExtra::default())
    }

    /// [`Vm::start_from`] with [`VmExtra`] options.
    pub fn start_with(c: &VmConfig, from: BootFrom, extra: &VmExtra) -> Vm {
        let vars = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-m", "512", "-smp", "2", "-display", "none", "-monitor", "none",
        ]);
        cmd.args(["-serial", "stdio"]);
        if !extra.reboot {
            cmd.arg("-no-reboot");
        }
        let qmp = vars.path().join("qmp.sock");
        if extra.honour_eject {
            cmd.arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        }
        let ovmf = |code: &str, vars_src: &str| {
            let v = match &extra.vars {
                Some(keep) => {
                    if !keep.exists() {
                        std::fs::copy(vars_src, keep).unwrap();
                    }
                    keep.clone()
                }
                None => {
                    let v = vars.path().join("vars.fd");
                    std::fs::copy(vars_src, &v).unwrap();
                    v
                }
            };
            vec![
                "-drive".to_string(),
                format!("if=pflash,format=raw,unit=0,readonly=on,file={code}"),
                "-drive".to_string(),
                format!("if=pflash,format=raw,unit=1,file={}", v.display()),
            ]
        };
        let ide = match c.firmware {
            Firmware::Bios => {
                cmd.args(["-machine", "pc"]);
                ("ide.0", "ide.1")
            }
            Firmware::Uefi => {
                cmd.args(["-machine", "q35"]);
                cmd.args(ovmf(
                    "/usr/share/OVMF/OVMF_CODE_4M.fd",
                    "/usr/share/OVMF/OVMF_VARS_4M.fd",
                ));
                ("ide.0", "ide.1")
            }
            Firmware::SecureBoot => {
                cmd.args(["-machine", "q35,smm=on"]);
                cmd.args(["-global", "driver=cfi.pflash01,property=secure,value=on"]);
                cmd.args(ovmf(
                    "/usr/share/OVMF/OVMF_CODE_4M.ms.fd",
                    "/usr/share/OVMF/OVMF_VARS_4M.ms.fd",
                ));
                ("ide.0", "ide.1")
            }
        };
        match from {
            BootFrom::Cd => {
                cmd.arg("-drive").arg(format!(
                    "if=none,id=cd0,media=cdrom,readonly=on,file={}",
                    c.iso.display()
                ));
                cmd.arg("-device").arg(format!(
                    "ide-cd,drive=cd0,bus={},bootindex=0,id={APPLIANCE_CD_ID}",
                    ide.0
                ));
            }
            BootFrom::Usb => {
                // Read-only, like a write-protected stick: the ISO file is never changed.
                cmd.args(["-device", "qemu-xhci,id=xhci"]);
                cmd.arg("-drive").arg(format!(
                    "if=none,id=stick,format=raw,readonly=on,file={}",
                    c.iso.display()
                ));
                cmd.args([
                    "-device",
                    "usb-storage,bus=xhci.0,drive=stick,removable=on,bootindex=0",
                ]);
            }
        }
        if let Some(seed) = c.seed {
            cmd.arg("-drive").arg(format!(
                "if=none,id=cd1,media=cdrom,readonly=on,file={}",
                seed.display()
            ));
            cmd.arg("-device")
                .arg(format!("ide-cd,drive=cd1,bus={}", ide.1));
        }
        let (hba, nic) = match c.hardware {
            Hardware::VmwareLike => ("pvscsi", "vmxnet3"),
            Hardware::Virtio => ("virtio-scsi-pci", "virtio-net-pci"),
        };
        cmd.args(["-device", hba]);
        for (i, (disk, serial)) in c.disks.iter().enumerate() {
            cmd.arg("-drive").arg(format!(
                "if=none,id=d{i},format=raw,file={}",
                disk.display()
            ));
            cmd.arg("-device").arg(format!(
                "scsi-hd,drive=d{i},serial={serial},bootindex={}",
                i + 1
            ));
        }
        cmd.args(["-nic", &format!("user,model={nic}")]);
        if let Some(base) = c.rtc_base {
            cmd.args(["-rtc", &format!("base={base}")]);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("starting qemu-system-x86_64");
        if extra.honour_eject {
            let name = c.name.to_string();
            std::thread::spawn(move || honour_eject(qmp, name));
        }
        let stdin = child.stdin.take().unwrap();
        let out = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let out = Arc::clone(&out);
            let name = c.name.to_string();
            std::thread::spawn(move || {
                // Raw chunks, not lines: a prompt has no newline until it is answered.
                let mut r = stream;
                let mut buf = [0u8; 4096];
                let verbose = std::env::var_os("FAILBACK_TEST_VERBOSE").is_some();
                loop {
                    let n = match r.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let text = String::from_utf8_lossy(&buf[..n]).to_string();
                    if verbose {
                        eprint!("{text}");
                        let _ = &name;
                    }
                    out.lock().unwrap().push_str(&text);
                }
            });
        }
        Vm {
            child,
            stdin,
            out,
            name: c.name.to_string(),
            started: Instant::now(),
            _vars: vars,
        }
    }

    pub fn output(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    fn tail(&self) -> String {
        let out = self.output();
        let lines: Vec<&str> = out.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Waits until the console shows `needle`; panics with the console tail otherwise.
    pub fn expect(&mut self, needle: &str, timeout: Duration) -> Duration {
        self.expect_count(needle, 1, timeout)
    }

    /// Waits until the console shows `needle` at least `n` times.
    pub fn expect_count(&mut self, needle: &str, n: usize, timeout: Duration) -> Duration {
        let start = Instant::now();
        loop {
            if self.output().matches(needle).count() >= n {
                return start.elapsed();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(300));
                if self.output().matches(needle).count() >= n {
                    return start.elapsed();
                }
                panic!(
                    "{}: QEMU exited ({status}) before `{needle}`; console tail:\n{}",
                    self.name,
                    self.tail()
                );
            }
            if start.elapsed() > timeout {
                panic!(
                    "{}: no `{needle}` within {}s; console tail:\n{}",
                    self.name,
                    timeout.as_secs(),
                    self.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Types a line on the serial console.
    pub fn type_line(&mut self, line: &str) {
        self.stdin.write_all(line.as_bytes()).unwrap();
        self.stdin.write_all(b"\n").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Waits for QEMU to exit (power off, or reboot with -no-reboot).
    pub fn wait_exit(&mut self, timeout: Duration) {
        let start = Instant::now();
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            if start.elapsed() > timeout {
                panic!(
                    "{}: QEMU still running after {}s; console tail:\n{}",
                    self.name,
                    timeout.as_secs(),
                    self.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds a seed ISO for `server` into `dir`.
pub fn seed_iso(dir: &Path, seed: &failback_config::seed::SeedConfig) -> PathBuf {
    let out = dir.join("seed.iso");
    failback_iso::seed::build(seed, &out).unwrap();
    out
}

/// Runs the admin CLI (`failback ...`) against `server`; panics with its output on failure.
pub fn admin_cli(server: &Server, args: &[&str]) -> String {
    let out = Command::new(bin("failback", "failback-orchestrator"))
        .args(args)
        .env(
            "FAILBACK_SERVER",
            format!("https://127.0.0.1:{}", server.port),
        )
        .env("FAILBACK_ADMIN_TOKEN", server.admin_token())
        .env("FAILBACK_CA", server.dir.path().join("data/ca.pem"))
        .output()
        .expect("running the failback admin CLI");
    assert!(
        out.status.success(),
        "failback {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `failback instances describe ID --output json`.
pub fn describe_instance(server: &Server, id: &str) -> serde_json::Value {
    serde_json::from_str(&admin_cli(
        server,
        &["instances", "describe", id, "--output", "json"],
    ))
    .expect("instances describe: JSON")
}

/// Recovery instance ids the service knows.
pub fn instance_ids(server: &Server) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(&admin_cli(
        server,
        &["instances", "list", "--output", "json"],
    ))
    .expect("instances list: JSON");
    let mut out = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(id) = m.get("recovery_instance_id").and_then(|x| x.as_str()) {
                    out.push(id.to_string());
                    return;
                }
                m.values().for_each(|x| walk(x, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(&v, &mut out);
    out
}

/// A recovery agent process, killed on drop.
pub struct AgentProc(pub Child);

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts an agent on 127.0.0.1 (advertised to guests as 10.0.2.2) serving `disk` as `vol0`,
/// enrolled with `server`; returns it with its recovery instance id.
pub fn spawn_agent(server: &Server, disk: &Path, dir: &Path) -> (AgentProc, String) {
    spawn_agent_at(server, disk, dir, "10.0.2.2")
}

/// Same, advertising `host` to clients (10.0.2.2 for QEMU guests, 127.0.0.1 for a client run
/// on the host).
pub fn spawn_agent_at(server: &Server, disk: &Path, dir: &Path, host: &str) -> (AgentProc, String) {
    let before = instance_ids(server);
    let token = admin_cli(server, &["token", "create", "agent"])
        .trim()
        .to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(bin("failback-agent", "failback-agent"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--advertise",
            &format!("{host}:{port}"),
        ])
        .arg("--disk")
        .arg(format!("vol0={}", disk.display()))
        .args([
            "--server",
            &format!("https://127.0.0.1:{}", server.port),
            "--enroll-token",
            &token,
        ])
        .arg("--ca")
        .arg(server.dir.path().join("data/ca.pem"))
        .arg("--state-dir")
        .arg(dir.join(format!("agent-{port}")))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("agent-{port}.log"))).unwrap())
        .spawn()
        .expect("starting failback-agent");
    let agent = AgentProc(child);
    let start = Instant::now();
    loop {
        if let Some(id) = instance_ids(server)
            .into_iter()
            .find(|i| !before.contains(i))
        {
            return (agent, id);
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "agent on port {port} did not enroll with the DR service"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Writes a synthetic disk image with `fb-gendisk` (e.g. `["--size", "16M", "--seed", "3"]`).
pub fn gen_disk(out: &Path, args: &[&str]) {
    let st = Command::new(bin("fb-gendisk", "failback-tests"))
        .arg(out)
        .args(args)
        .status()
        .expect("running fb-gendisk");
    assert!(st.success(), "fb-gendisk {} {args:?} failed", out.display());
}

/// A pairing token for recovery instance `id`.
pub fn pairing_token(server: &Server, id: &str) -> String {
    admin_cli(server, &["token", "create", "pairing", "--instance", id])
        .trim()
        .to_string()
}

/// The seed of an unattended appliance: pairs with `server` as instance `id` using `token`,
/// never prompts, powers off when done.
pub fn unattended_seed(
    server: &Server,
    token: String,
    id: &str,
) -> failback_config::seed::SeedConfig {
    failback_config::seed::SeedConfig {
        server_url: Some(server.guest_url()),
        token: Some(token),
        instance_id: Some(id.to_string()),
        ca_cert_pem: Some(server.ca_pem()),
        no_prompt: true,
        after: failback_config::seed::AfterCompletion::Poweroff,
        ..Default::default()
    }
}

/// Polls `instances describe` until instance `id` is FAILBACK_READY_FOR_LAUNCH and returns
/// the description; panics with the console if `vm` shows FAILBACK_FAILED or after `timeout`.
pub fn wait_ready_for_launch(
    server: &Server,
    vm: &Vm,
    id: &str,
    timeout: Duration,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let v = describe_instance(server, id);
        if v.to_string().contains("FAILBACK_READY_FOR_LAUNCH") {
            return v;
        }
        assert!(
            !vm.output().contains("FAILBACK_FAILED"),
            "{}: the appliance failed:\n{}",
            vm.name,
            vm.output()
        );
        assert!(
            start.elapsed() < timeout,
            "{}: never READY_FOR_LAUNCH:\n{}",
            vm.name,
            vm.output()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}
