//! `failback mass find|plan|run`: fail back many vCenter VMs at once (the DRSFA equivalent).
//!
//! Exit codes: 0 every VM succeeded or was skipped · 1 internal error · 2 usage, config or
//! invalid plan · 4 cannot reach vCenter or the DR service · 10 at least one VM failed (see
//! the results file).

use clap::{Args, Subcommand, ValueEnum};
use failback_config::plan::{
    LaunchMode, OnFailure, Plan, PlanFormat, VcenterEntry, VcenterList, VmOptions,
};
use failback_orchestrator::mass::adapters::{DrHttp, IsoSeedBuilder, VcenterBackend};
use failback_orchestrator::mass::backend::{list_all, DrService, VcenterConn};
use failback_orchestrator::mass::planner;
use failback_orchestrator::mass::progress::{self, NoProgress, PlainProgress, RunProgress};
use failback_orchestrator::mass::runner::{now_secs, InProgress, RunSettings, Runner};
use failback_orchestrator::vcenter_args::{self, VcenterArgs};
use failback_vcenter as vc;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

const EXIT_INTERNAL: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_NETWORK: u8 = 4;
const EXIT_VM_FAILED: u8 = 10;

/// `failback mass ...`
#[derive(Subcommand, Debug)]
pub enum MassCommand {
    /// List vCenter VMs (UUIDs, MACs, disks, power) and the recovery instance each matches.
    Find(FindArgs),
    /// Write a plan: --one-click (match instances to VMs) or --generate (every VM, for editing).
    Plan(PlanArgs),
    /// Fail back every VM of a plan, N at a time.
    Run(RunArgs),
}

/// The vCenters a command works on, logged in.
struct Vcenters {
    conns: Vec<VcenterConn>,
    backends: Vec<Arc<VcenterBackend>>,
}

impl Vcenters {
    /// The plan's (or `--vcenters` file's) `[[vcenter]]` entries, each with its own
    /// credentials; with none, the one vCenter of the flags / `VCENTER_*` environment
    /// (`need_datastore`: `--datastore` is required then).
    async fn connect(
        flags: &VcenterArgs,
        entries: &[VcenterEntry],
        folder: &str,
        need_datastore: bool,
    ) -> Result<Vcenters, (u8, String)> {
        let fail = |what: &str, e: vc::Error| (vcenter_args::exit_code(&e), format!("{what}: {e}"));
        let mut out = Vcenters {
            conns: vec![],
            backends: vec![],
        };
        if entries.is_empty() {
            let datastore = match flags.datastore() {
                Ok(d) => d.to_string(),
                Err(e) if need_datastore => return Err((EXIT_USAGE, e.to_string())),
                Err(_) => String::new(),
            };
            let client = flags.connect().await.map_err(|e| fail("vCenter", e))?;
            out.push(None, client, datastore, folder.to_string());
            return Ok(out);
        }
        for e in entries {
            let cfg = vcenter_args::entry_config(e, flags.task_timeout_secs)
                .map_err(|err| (EXIT_USAGE, err.to_string()))?;
            let client = vc::Client::connect(cfg)
                .await
                .map_err(|err| fail(&format!("vCenter {} ({})", e.name, e.host), err))?;
            let folder = e.folder.clone().unwrap_or_else(|| folder.to_string());
            out.push(Some(e.name.clone()), client, e.datastore.clone(), folder);
        }
        Ok(out)
    }

    fn push(
        &mut self,
        name: Option<String>,
        client: vc::Client,
        datastore: String,
        folder: String,
    ) {
        let b = Arc::new(VcenterBackend {
            client,
            datastore: datastore.clone(),
        });
        self.backends.push(b.clone());
        self.conns.push(VcenterConn {
            name,
            hv: b,
            datastore,
            folder,
        });
    }

    async fn logout(&self) {
        for b in &self.backends {
            let _ = b.client.logout().await;
        }
    }
}

/// `--vcenters FILE` entries, or none.
fn vcenter_list(path: &Option<PathBuf>) -> Result<Vec<VcenterEntry>, (u8, String)> {
    match path {
        None => Ok(vec![]),
        Some(p) => VcenterList::load(p)
            .map(|l| l.vcenters)
            .map_err(|e| (EXIT_USAGE, e.to_string())),
    }
}

/// DR service admin connection (same flags/env as the other admin commands).
#[derive(Args, Debug, Clone)]
pub struct DrArgs {
    /// DR service URL, e.g. https://dr.example:8443; several replicas separated by commas
    /// (the appliances get the same list in their seed).
    #[arg(long = "server", env = "FAILBACK_SERVER")]
    pub server: String,
    /// Admin token or credential secret; role `operator` is enough for a mass failback.
    #[arg(
        long = "admin-token",
        env = "FAILBACK_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: String,
    /// CA certificate (PEM) of the DR service (pinned; also written into every seed ISO).
    #[arg(long = "ca", env = "FAILBACK_CA")]
    pub server_ca: PathBuf,
}

impl DrArgs {
    fn ca_pem(&self) -> Result<String, (u8, String)> {
        std::fs::read_to_string(&self.server_ca).map_err(|e| {
            (
                EXIT_USAGE,
                format!("cannot read --ca {}: {e}", self.server_ca.display()),
            )
        })
    }
    fn connect(&self) -> Result<DrHttp, (u8, String)> {
        DrHttp::new(&self.server, &self.admin_token, &self.ca_pem()?)
            .map_err(|e| (EXIT_USAGE, e.chain()))
    }
}

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum Output {
    #[default]
    Text,
    Json,
}

#[derive(Args, Debug)]
pub struct FindArgs {
    #[command(flatten)]
    vc: VcenterArgs,
    #[command(flatten)]
    dr: DrArgs,
    /// Search every vCenter of this file of `[[vcenter]]` entries (the plan's format)
    /// instead of the one given by --vcenter / VCENTER_HOST.
    #[arg(long, env = "FAILBACK_VCENTERS")]
    vcenters: Option<PathBuf>,
    /// Only VMs whose name contains this (case-insensitive).
    #[arg(long)]
    name: Option<String>,
    /// Also write the listing to this file (JSON if it ends in .json, else the table).
    #[arg(long)]
    export: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t)]
    output: Output,
}

#[derive(Args, Debug)]
#[group(id = "mode", required = true, multiple = false, args = ["one_click", "generate"])]
pub struct PlanArgs {
    #[command(flatten)]
    vc: VcenterArgs,
    #[command(flatten)]
    dr: DrArgs,
    /// Search every vCenter of this file of `[[vcenter]]` entries (the plan's format) instead
    /// of the one given by --vcenter / VCENTER_HOST; the entries are copied into the plan.
    #[arg(long, env = "FAILBACK_VCENTERS")]
    vcenters: Option<PathBuf>,
    /// Match every recovery instance to its VM (BIOS UUID, then instance UUID, then MAC).
    #[arg(long)]
    one_click: bool,
    /// Every VM (matched or not) with every field written out, for hand editing.
    #[arg(long)]
    generate: bool,
    /// With --generate: only VMs whose name contains this.
    #[arg(long)]
    name: Option<String>,
    /// Plan file to write (.json = JSON, else TOML).
    #[arg(short = 'o', long = "out", default_value = "failback-plan.toml")]
    out: PathBuf,
    /// Overwrite an existing plan file.
    #[arg(long)]
    force: bool,
    /// Protective snapshot before each VM's disks are overwritten (removed after success).
    #[arg(long)]
    snapshot: bool,
    /// With --snapshot: a VM that fails is reverted to its snapshot and powered on as it was
    /// (`on_failure = "revert"`).
    #[arg(long, requires = "snapshot")]
    revert_on_failure: bool,
    /// With --snapshot: keep the snapshot after success (`keep_snapshot = true`).
    #[arg(long, requires = "snapshot")]
    keep_snapshot: bool,
    /// Launch mode written into every entry.
    #[arg(long, value_enum, default_value = "auto")]
    launch: LaunchArg,
    #[arg(long, value_enum, default_value_t)]
    output: Output,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LaunchArg {
    Auto,
    Manual,
}

impl From<LaunchArg> for LaunchMode {
    fn from(l: LaunchArg) -> Self {
        match l {
            LaunchArg::Auto => LaunchMode::Auto,
            LaunchArg::Manual => LaunchMode::Manual,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum ProgressArg {
    /// Bars on a terminal, plain lines otherwise.
    #[default]
    Auto,
    Plain,
    None,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The plan file (from `failback mass plan`).
    plan: PathBuf,
    #[command(flatten)]
    vc: VcenterArgs,
    #[command(flatten)]
    dr: DrArgs,
    /// VMs processed at once (DRSFA's THREAD_POOL_SIZE).
    #[arg(long, env = "THREAD_POOL_SIZE", default_value_t = 10)]
    parallel: usize,
    /// Folder inside the datastore for the ISOs (without the datastore name).
    #[arg(long, env = "VCENTER_ISO_FOLDER", default_value = "failback")]
    folder: String,
    /// The appliance ISO (uploaded once, SHA-256 verified).
    #[arg(long, env = "FAILBACK_APPLIANCE_ISO", default_value = "failback.iso")]
    appliance_iso: PathBuf,
    /// DR service URL as the appliances reach it (default: --server).
    #[arg(long)]
    seed_server_url: Option<String>,
    /// Recovery instances already in failback: leave them, or stop and restart them.
    #[arg(long, value_enum, default_value = "skip")]
    in_progress: InProgress,
    /// Override every plan entry's launch mode.
    #[arg(long, value_enum)]
    launch: Option<LaunchArg>,
    /// State directory (default: PLAN.state next to the plan).
    #[arg(long)]
    state: Option<PathBuf>,
    /// Results file (default: failback-results/PLAN-STEM-UNIXTIME.json).
    #[arg(long)]
    results: Option<PathBuf>,
    /// Continue the run recorded in the state directory.
    #[arg(long)]
    resume: bool,
    /// With --resume: also retry VMs that failed.
    #[arg(long, requires = "resume")]
    retry_failed: bool,
    /// Keep each VM's seed ISO (it holds a one-time pairing token and the CA) on the
    /// datastore; by default it is deleted once its VM is done.
    #[arg(long)]
    keep_seeds: bool,
    /// Delete the appliance ISO from the datastore at the end of the run (default: kept for
    /// the next run; the results file lists what was left behind).
    #[arg(long)]
    cleanup: bool,
    /// Print every step per VM (and estimated bytes where the client already paired); change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Pairing token lifetime in seconds.
    #[arg(long, default_value_t = 24 * 3600)]
    token_ttl: u64,
    /// Poll interval for the DR service and vCenter, milliseconds.
    #[arg(long, default_value_t = 2000)]
    poll_ms: u64,
    /// Attempts per step for transient errors (backoff 1 s, 2 s, 4 s, ... 30 s).
    #[arg(long, default_value_t = 5)]
    attempts: u32,
    #[arg(long, value_enum, default_value_t)]
    progress: ProgressArg,
    #[arg(long, value_enum, default_value_t)]
    output: Output,
}

pub async fn run(cmd: MassCommand) -> ExitCode {
    let r = match cmd {
        MassCommand::Find(a) => find(a).await,
        MassCommand::Plan(a) => plan(a).await,
        MassCommand::Run(a) => run_plan(a).await,
    };
    match r {
        Ok(code) => ExitCode::from(code),
        Err((code, msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(code)
        }
    }
}

type CmdResult = Result<u8, (u8, String)>;

fn net(e: failback_orchestrator::mass::backend::BackendError) -> (u8, String) {
    (EXIT_NETWORK, e.chain())
}

async fn find(a: FindArgs) -> CmdResult {
    let dr = a.dr.connect()?;
    let entries = vcenter_list(&a.vcenters)?;
    let hv = Vcenters::connect(&a.vc, &entries, "", false).await?;
    let (rows, m) = planner::find(&hv.conns, &dr, a.name.as_deref())
        .await
        .map_err(net)?;
    let json = serde_json::to_string_pretty(&serde_json::json!({
        "vms": rows,
        "unmatched_instances": m.unmatched_instances.iter().map(|(id, why)| serde_json::json!({"recovery_instance": id, "reason": why})).collect::<Vec<_>>(),
    }))
    .map_err(|e| (EXIT_INTERNAL, e.to_string()))?;
    let table = planner::find_table(&rows);
    match a.output {
        Output::Json => println!("{json}"),
        Output::Text => {
            print!("{table}");
            for (id, why) in &m.unmatched_instances {
                println!("unmatched recovery instance {id}: {why}");
            }
        }
    }
    if let Some(path) = &a.export {
        let body = if PlanFormat::from_path(path) == PlanFormat::Json {
            json
        } else {
            table
        };
        std::fs::write(path, body)
            .map_err(|e| (EXIT_USAGE, format!("cannot write {}: {e}", path.display())))?;
        eprintln!("exported to {}", path.display());
    }
    hv.logout().await;
    Ok(0)
}

async fn plan(a: PlanArgs) -> CmdResult {
    if a.out.exists() && !a.force {
        return Err((
            EXIT_USAGE,
            format!("{} exists; pass --force to overwrite", a.out.display()),
        ));
    }
    let dr = a.dr.connect()?;
    let entries = vcenter_list(&a.vcenters)?;
    let hv = Vcenters::connect(&a.vc, &entries, "", false).await?;
    let vms = list_all(&hv.conns).await.map_err(net)?;
    let instances = dr.instances().await.map_err(net)?;
    let options = VmOptions {
        protective_snapshot: a.snapshot,
        on_failure: if a.revert_on_failure {
            OnFailure::Revert
        } else {
            OnFailure::Leave
        },
        keep_snapshot: a.keep_snapshot,
        launch: a.launch.into(),
        ..Default::default()
    };
    let (mut plan, unmatched) = if a.one_click {
        let (p, m) = planner::one_click(&instances, &vms, &options);
        (p, m.unmatched_instances)
    } else {
        let p = planner::generate(&instances, &vms, a.name.as_deref(), &options);
        let m = failback_orchestrator::mass::matching::match_instances(&instances, &vms);
        (p, m.unmatched_instances)
    };
    plan.vcenters = entries;
    plan.validate().map_err(|e| {
        (
            EXIT_INTERNAL,
            format!("generated plan is invalid (bug): {e}"),
        )
    })?;
    let text = plan
        .encode(PlanFormat::from_path(&a.out))
        .map_err(|e| (EXIT_INTERNAL, e.to_string()))?;
    std::fs::write(&a.out, text)
        .map_err(|e| (EXIT_USAGE, format!("cannot write {}: {e}", a.out.display())))?;
    let matched = plan
        .vms
        .iter()
        .filter(|v| v.recovery_instance.is_some())
        .count();
    match a.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({"plan": a.out, "vms": plan.vms.len(), "matched": matched,
                "unmatched_instances": unmatched.iter().map(|(id, why)| serde_json::json!({"recovery_instance": id, "reason": why})).collect::<Vec<_>>()})
        ),
        Output::Text => {
            println!(
                "wrote {} ({} VM entries, {matched} matched to a recovery instance)",
                a.out.display(),
                plan.vms.len()
            );
            for (id, why) in &unmatched {
                println!("unmatched recovery instance {id}: {why}");
            }
        }
    }
    hv.logout().await;
    Ok(0)
}

fn default_state(plan: &Path) -> PathBuf {
    let mut s = plan.as_os_str().to_owned();
    s.push(".state");
    PathBuf::from(s)
}

async fn run_plan(a: RunArgs) -> CmdResult {
    let plan = Plan::load(&a.plan).map_err(|e| (EXIT_USAGE, e.to_string()))?;
    if a.parallel == 0 {
        return Err((EXIT_USAGE, "--parallel must be at least 1".into()));
    }
    let ca_pem = a.dr.ca_pem()?;
    let dr = Arc::new(a.dr.connect()?);
    if !plan.vcenters.is_empty() && (a.vc.host.is_some() || a.vc.url.is_some()) {
        eprintln!(
            "note: {} has [[vcenter]] entries; --vcenter / VCENTER_HOST / GOVC_URL are not used",
            a.plan.display()
        );
    }
    let hv = Vcenters::connect(&a.vc, &plan.vcenters, &a.folder, true).await?;
    if a.dry_run {
        let rows = planner::dry_run(
            &hv.conns,
            dr.as_ref(),
            &plan,
            a.in_progress,
            a.launch.map(Into::into),
        )
        .await
        .map_err(net)?;
        match a.output {
            Output::Json => println!(
                "{}",
                serde_json::to_string_pretty(&rows).map_err(|e| (EXIT_INTERNAL, e.to_string()))?
            ),
            Output::Text => print!("{}", planner::dry_run_text(&rows)),
        }
        hv.logout().await;
        return Ok(0);
    }
    if !a.appliance_iso.is_file() {
        return Err((
            EXIT_USAGE,
            format!(
                "appliance ISO {} not found (--appliance-iso)",
                a.appliance_iso.display()
            ),
        ));
    }
    let state_dir = a.state.clone().unwrap_or_else(|| default_state(&a.plan));
    let stem = a
        .plan
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "plan".into());
    let results_path = a.results.clone().unwrap_or_else(|| {
        PathBuf::from("failback-results").join(format!("{stem}-{}.json", now_secs()))
    });
    let settings = RunSettings {
        parallel: a.parallel,
        folder: a.folder.clone(),
        appliance_iso: a.appliance_iso.clone(),
        seed_server_url: a
            .seed_server_url
            .clone()
            .unwrap_or_else(|| a.dr.server.clone()),
        in_progress: a.in_progress,
        launch: a.launch.map(Into::into),
        token_ttl_secs: a.token_ttl,
        poll_interval_ms: a.poll_ms,
        attempts: a.attempts,
        work_dir: state_dir.join("work"),
        state_dir,
        results_path: results_path.clone(),
        retry_failed: a.retry_failed,
        keep_seeds: a.keep_seeds,
        cleanup: a.cleanup,
        endpoints: if plan.vcenters.is_empty() {
            serde_json::json!({
                "vcenter": a.vc.host.as_deref().or(a.vc.url.as_deref()).and_then(|h| h.split('@').next_back()),
                "datastore": hv.conns[0].datastore,
                "dr_service": a.dr.server,
            })
        } else {
            serde_json::json!({
                "vcenters": hv.conns.iter().zip(&plan.vcenters).map(|(c, e)| serde_json::json!({
                    "name": e.name, "host": e.host, "datastore": c.datastore, "folder": c.folder,
                })).collect::<Vec<_>>(),
                "dr_service": a.dr.server,
            })
        },
    };
    let progress: Arc<dyn RunProgress> = match a.progress {
        ProgressArg::Auto => Arc::from(progress::auto()),
        ProgressArg::Plain => Arc::new(PlainProgress::default()),
        ProgressArg::None => Arc::new(NoProgress),
    };
    let runner = Runner {
        vcenters: hv.conns.clone(),
        dr,
        seed: Arc::new(IsoSeedBuilder),
        progress,
        ca_pem,
        settings,
    };
    let out = runner
        .run(&plan, &a.plan, a.resume)
        .await
        .map_err(|e| (EXIT_USAGE, e.to_string()))?;
    let s = &out.results.summary;
    match a.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&out.results)
                .map_err(|e| (EXIT_INTERNAL, e.to_string()))?
        ),
        Output::Text => {
            println!(
                "{} VM(s): {} succeeded, {} skipped, {} failed{}; results in {}",
                s.total,
                s.succeeded,
                s.skipped,
                s.failed,
                if s.unfinished > 0 {
                    format!(", {} unfinished", s.unfinished)
                } else {
                    String::new()
                },
                results_path.display()
            );
            for v in &out.results.vms {
                if let Some(m) = &v.message {
                    println!(
                        "  {}{} ({}): {:?}: {m}",
                        v.vm,
                        v.vcenter
                            .as_deref()
                            .map(|c| format!(" [vCenter {c}]"))
                            .unwrap_or_default(),
                        v.recovery_instance.as_deref().unwrap_or("-"),
                        v.status
                    );
                }
            }
        }
    }
    hv.logout().await;
    Ok(if out.any_failed() { EXIT_VM_FAILED } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser, Debug)]
    struct T {
        #[command(subcommand)]
        c: MassCommand,
    }

    #[test]
    fn cli_is_consistent_and_parses_drsfa_style_env_free_flags() {
        T::command().debug_assert();
        let t = T::try_parse_from([
            "mass",
            "run",
            "plan.toml",
            "--vcenter",
            "vc",
            "--vcenter-user",
            "u",
            "--vcenter-password",
            "p",
            "--datastore",
            "ds",
            "--server",
            "https://dr",
            "--admin-token",
            "t",
            "--ca",
            "ca.pem",
            "--parallel",
            "3",
            "--in-progress",
            "restart",
            "--launch",
            "manual",
            "--resume",
            "--retry-failed",
        ])
        .unwrap();
        let MassCommand::Run(r) = t.c else {
            panic!("not run")
        };
        assert_eq!(r.parallel, 3);
        assert_eq!(r.in_progress, InProgress::Restart);
        assert!(r.resume && r.retry_failed);
        assert_eq!(r.vc.datastore.as_deref(), Some("ds"));
        assert!(T::try_parse_from([
            "mass",
            "plan",
            "--one-click",
            "--generate",
            "--vcenter",
            "v",
            "--server",
            "s",
            "--admin-token",
            "t",
            "--ca",
            "c"
        ])
        .is_err());
    }
}
