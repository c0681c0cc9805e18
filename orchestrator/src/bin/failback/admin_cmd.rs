//! DR-service admin commands, flattened at the top level of `failback`:
//! `instances list|describe`, `token create pairing|agent`, `launch`, `stop`,
//! `config get|set`, `events`, `credentials create|list|revoke`. Every command takes
//! `--server`, `--admin-token` (the bootstrap admin token or a credential secret), `--ca` (or
//! `FAILBACK_SERVER`, `FAILBACK_ADMIN_TOKEN`, `FAILBACK_CA`) and `--output text|json`.
//!
//! Exit codes: 0 ok, 1 internal, 2 usage, 4 service unreachable, 7 the service refused
//! (including a launch where some instance was not accepted).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use failback_api::*;
use failback_orchestrator::admin_client::{AdminClient, AdminError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// How to reach the DR service.
#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// DR service URL (https://HOST:PORT); several replicas separated by commas: a call
    /// moves to the next URL when one cannot be reached.
    #[arg(long, env = "FAILBACK_SERVER")]
    server: String,
    /// Admin token (the service's data-dir/admin-token) or a credential secret
    /// (`failback credentials create`); its role decides what the service allows.
    #[arg(long, env = "FAILBACK_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// CA certificate (PEM) of the service, pinned (the service's data-dir/ca.pem).
    #[arg(long, env = "FAILBACK_CA")]
    ca: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    output: Output,
}

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Recovery instances: list, describe.
    #[command(subcommand)]
    Instances(InstancesCmd),
    /// Create one-time pairing (client) or agent enrollment tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Start the failback launch for 1..200 instances in FAILBACK_READY_FOR_LAUNCH.
    Launch(LaunchArgs),
    /// Stop the failback of an instance (the client stops cleanly; state FAILBACK_NOT_STARTED).
    Stop(IdArgs),
    /// Failback replication configuration: bandwidth limit, private address.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Event log (every state transition and admin action, with who acted).
    Events(EventsArgs),
    /// Scoped admin credentials (viewer, operator, admin): create, list, revoke. Role admin.
    #[command(subcommand)]
    Credentials(CredentialsCmd),
}

#[derive(Subcommand, Debug)]
pub enum CredentialsCmd {
    /// Create a credential; its secret is printed once (stdout), the service keeps a hash.
    Create(CredentialCreateArgs),
    /// List credentials (never their secrets), revoked ones included.
    List(ConnOnly),
    /// Revoke a credential: its next request is refused.
    Revoke(CredentialIdArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    /// Read: instances, configuration, events, logs.
    Viewer,
    /// Day-to-day failback: tokens, hints, launch, stop (enough for mass failback).
    Operator,
    /// Everything: configuration and credentials too.
    Admin,
}

#[derive(Args, Debug)]
pub struct CredentialCreateArgs {
    #[arg(long, value_enum)]
    role: RoleArg,
    /// Who or what holds it (1..64 of A-Z a-z 0-9 . _ - @), e.g. ci-bot.
    #[arg(long)]
    name: String,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Args, Debug)]
pub struct CredentialIdArgs {
    /// Credential id (cred-...).
    id: String,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Subcommand, Debug)]
pub enum InstancesCmd {
    /// List instances with failback and replication state.
    List(ConnOnly),
    /// Everything about one instance: steps, disks, errors, digests.
    Describe(IdArgs),
}

#[derive(Args, Debug)]
pub struct ConnOnly {
    #[command(flatten)]
    conn: Conn,
}

#[derive(Args, Debug)]
pub struct IdArgs {
    /// Recovery instance id (i-...).
    id: String,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Create a token.
    Create(TokenCreateArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    Pairing,
    Agent,
}

#[derive(Args, Debug)]
pub struct TokenCreateArgs {
    /// pairing: for a failback client; agent: for a recovery agent's enrollment.
    #[arg(value_enum)]
    kind: Kind,
    /// Scope to this recovery instance (pairing: default auto-match by SMBIOS UUID; agent:
    /// enroll as this id, default a new one).
    #[arg(long)]
    instance: Option<String>,
    /// Lifetime in seconds (default 3600).
    #[arg(long)]
    ttl_secs: Option<u64>,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Args, Debug)]
pub struct LaunchArgs {
    /// Recovery instance ids (1..200).
    #[arg(required = true, num_args = 1..=200)]
    ids: Vec<String>,
    /// How the final round checks the disks: `changes` (quiesce, the blocks changed since the
    /// last round, whole-disk digests kept from cached hashes) or `full` (also re-read and
    /// re-hash both sides). Default: the service's `--launch-verify`.
    #[arg(long, value_enum)]
    verify: Option<VerifyArg>,
    #[command(flatten)]
    conn: Conn,
}

/// `failback launch --verify`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyArg {
    Changes,
    Full,
}

impl From<VerifyArg> for failback_api::LaunchVerify {
    fn from(v: VerifyArg) -> Self {
        match v {
            VerifyArg::Changes => Self::Changes,
            VerifyArg::Full => Self::Full,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Show the failback replication configuration.
    Get(IdArgs),
    /// Change it (fields left out keep their value).
    Set(ConfigSetArgs),
}

#[derive(Args, Debug)]
pub struct ConfigSetArgs {
    id: String,
    /// Bandwidth limit in Mbit/s (0 = unlimited).
    #[arg(long)]
    bandwidth_mbps: Option<u64>,
    /// Make clients dial the agent's private address.
    #[arg(long)]
    use_private_ip: Option<bool>,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Args, Debug)]
pub struct EventsArgs {
    /// Only this instance.
    #[arg(long)]
    instance: Option<String>,
    /// Only events after this sequence number.
    #[arg(long, default_value_t = 0)]
    after: u64,
    /// At most this many.
    #[arg(long, default_value_t = 1000)]
    limit: u64,
    #[command(flatten)]
    conn: Conn,
}

fn client(c: &Conn) -> Result<AdminClient, AdminError> {
    AdminClient::new(&c.server, &c.admin_token, c.ca.as_deref())
}

fn when(t: Option<u64>) -> String {
    match t {
        Some(s) => humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(s),
        )
        .to_string(),
        None => "never".into(),
    }
}

fn print_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("failback: cannot encode JSON: {e}"),
    }
}

fn progress_pct(i: &RecoveryInstance) -> String {
    let total: u64 = i.failback.disks.iter().map(|d| d.total_bytes).sum();
    let done: u64 = i.failback.disks.iter().map(|d| d.rescanned_bytes).sum();
    match done.saturating_mul(100).checked_div(total) {
        Some(p) => format!("{p}%"),
        None => "-".into(),
    }
}

fn describe_text(i: &RecoveryInstance) {
    let f = &i.failback;
    println!("recovery instance  {}", i.recovery_instance_id);
    println!(
        "hostname           {}",
        i.hostname.as_deref().unwrap_or("-")
    );
    println!(
        "source hints       vmware_uuid={} hostname={} macs={}",
        i.source_hints.vmware_uuid.as_deref().unwrap_or("-"),
        i.source_hints.hostname.as_deref().unwrap_or("-"),
        i.source_hints.mac_addresses.join(",")
    );
    println!(
        "agent              {} (last seen {})",
        i.agent.address.as_deref().unwrap_or("-"),
        when(i.agent.last_seen_at)
    );
    println!("failback state     {}", f.state);
    println!("replication state  {}", f.replication_state);
    println!(
        "client             {} (last seen {})",
        f.client_id.as_deref().unwrap_or("-"),
        when(f.client_last_seen_at)
    );
    println!(
        "round              {}  lag {}  eta {}",
        f.round,
        f.lag_secs
            .map(|l| format!("{l}s"))
            .unwrap_or_else(|| "-".into()),
        f.eta_at
            .map(|e| when(Some(e)))
            .unwrap_or_else(|| "-".into())
    );
    if let Some(s) = f.final_round_secs {
        println!("final round        {s:.3}s (launch downtime on the agent side)");
    }
    println!(
        "config             bandwidth {} Mbit/s, use_private_ip {}",
        if i.config.bandwidth_throttling_mbps == 0 {
            "unlimited".to_string()
        } else {
            i.config.bandwidth_throttling_mbps.to_string()
        },
        i.config.use_private_ip
    );
    if !f.errors.is_empty() {
        let e: Vec<String> = f.errors.iter().map(|e| e.to_string()).collect();
        println!("errors             {}", e.join(", "));
    }
    if let Some(m) = &f.last_error_message {
        println!("last error         {m}");
    }
    for s in &f.steps {
        println!("step               {:<50} {}", s.name.to_string(), s.status);
    }
    for d in &f.disks {
        println!(
            "disk               {} -> {}: total {} replicated {} rescanned {} backlog {} eta {}",
            d.remote_id,
            d.local_path,
            d.total_bytes,
            d.replicated_bytes,
            d.rescanned_bytes,
            d.backlog_bytes,
            d.eta_secs.map_or_else(|| "-".into(), |s| format!("{s}s"))
        );
        if let Some(w) = d.wire_summary() {
            println!("disk wire          {}: {w}", d.remote_id);
        }
    }
    for d in &f.digests {
        let ok = if d.local_digest == d.agent_digest {
            "equal"
        } else {
            "DIFFERENT"
        };
        println!(
            "digest             {} -> {}: local {} agent {} ({ok})",
            d.remote_id, d.local_path, d.local_digest, d.agent_digest
        );
    }
}

fn credential_line(c: &Credential) {
    println!(
        "{:<21} {:<24} {:<8} {:<20} {:<40} {}",
        c.id,
        c.name,
        c.role.as_str(),
        when(Some(c.created_at)),
        c.created_by,
        match (&c.revoked_at, &c.revoked_by) {
            (Some(at), by) => format!(
                "revoked {} by {}",
                when(Some(*at)),
                by.as_deref().unwrap_or("-")
            ),
            (None, _) => "active".into(),
        }
    );
}

async fn run_credentials(cmd: CredentialsCmd) -> Result<(), AdminError> {
    match cmd {
        CredentialsCmd::Create(a) => {
            let req = CreateCredentialRequest {
                role: match a.role {
                    RoleArg::Viewer => Role::Viewer,
                    RoleArg::Operator => Role::Operator,
                    RoleArg::Admin => Role::Admin,
                },
                name: a.name.clone(),
            };
            let r = client(&a.conn)?.create_credential(&req).await?;
            if a.conn.output == Output::Json {
                print_json(&r);
            } else {
                println!("{}", r.secret);
                eprintln!(
                    "credential {} '{}' role {} (secret shown once; the service keeps only its hash)",
                    r.credential.id, r.credential.name, r.credential.role
                );
            }
        }
        CredentialsCmd::List(a) => {
            let l = client(&a.conn)?.credentials().await?;
            if a.conn.output == Output::Json {
                print_json(&l);
            } else {
                println!(
                    "{:<21} {:<24} {:<8} {:<20} {:<40} STATE",
                    "ID", "NAME", "ROLE", "CREATED", "CREATED BY"
                );
                l.items.iter().for_each(credential_line);
            }
        }
        CredentialsCmd::Revoke(a) => {
            let c = client(&a.conn)?.revoke_credential(&a.id).await?;
            if a.conn.output == Output::Json {
                print_json(&c);
            } else {
                println!("{} '{}' revoked", c.id, c.name);
            }
        }
    }
    Ok(())
}

fn fail(e: AdminError) -> ExitCode {
    eprintln!("failback: error: {e}");
    ExitCode::from(match e {
        AdminError::Usage(_) => 2,
        AdminError::Network { .. } => 4,
        AdminError::Api { status, .. } if status < 500 => 7,
        AdminError::Untrusted { .. } => 7,
        _ => 1,
    })
}

pub async fn run(cmd: AdminCommand) -> ExitCode {
    match run_inner(cmd).await {
        Ok(code) => code,
        Err(e) => fail(e),
    }
}

async fn run_inner(cmd: AdminCommand) -> Result<ExitCode, AdminError> {
    match cmd {
        AdminCommand::Instances(InstancesCmd::List(a)) => {
            let l = client(&a.conn)?.list_instances().await?;
            if a.conn.output == Output::Json {
                print_json(&l);
            } else {
                println!(
                    "{:<22} {:<30} {:<14} {:>6} {:>5} {:<22} ERRORS",
                    "INSTANCE", "FAILBACK STATE", "REPLICATION", "DONE", "LAG", "AGENT"
                );
                for i in &l.items {
                    let f = &i.failback;
                    println!(
                        "{:<22} {:<30} {:<14} {:>6} {:>5} {:<22} {}",
                        i.recovery_instance_id,
                        f.state.to_string(),
                        f.replication_state.to_string(),
                        progress_pct(i),
                        f.lag_secs
                            .map(|l| format!("{l}s"))
                            .unwrap_or_else(|| "-".into()),
                        i.agent.address.as_deref().unwrap_or("-"),
                        f.errors
                            .iter()
                            .map(|e| e.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    );
                }
            }
        }
        AdminCommand::Instances(InstancesCmd::Describe(a)) => {
            let i = client(&a.conn)?.describe(&a.id).await?;
            if a.conn.output == Output::Json {
                print_json(&i);
            } else {
                describe_text(&i);
            }
        }
        AdminCommand::Token(TokenCmd::Create(a)) => {
            let req = CreateTokenRequest {
                kind: match a.kind {
                    Kind::Pairing => TokenKind::Pairing,
                    Kind::Agent => TokenKind::Agent,
                },
                recovery_instance_id: a.instance.clone(),
                ttl_secs: a.ttl_secs,
            };
            let t = client(&a.conn)?.create_token(&req).await?;
            if a.conn.output == Output::Json {
                print_json(&t);
            } else {
                println!("{}", t.token);
                eprintln!(
                    "{} token for {}, expires {} (shown once; the service keeps only its hash)",
                    t.kind,
                    t.recovery_instance_id.as_deref().unwrap_or("auto-match"),
                    when(Some(t.expires_at))
                );
            }
        }
        AdminCommand::Launch(a) => {
            let r = client(&a.conn)?
                .launch(&a.ids, a.verify.map(Into::into))
                .await?;
            let refused = r.results.iter().filter(|x| !x.accepted).count();
            if a.conn.output == Output::Json {
                print_json(&r);
            } else {
                println!("job {}", r.job_id);
                for x in &r.results {
                    println!(
                        "{:<22} {}",
                        x.recovery_instance_id,
                        if x.accepted {
                            "launch started".to_string()
                        } else {
                            format!("refused: {}", x.reason.as_deref().unwrap_or("-"))
                        }
                    );
                }
            }
            if refused > 0 {
                return Ok(ExitCode::from(7));
            }
        }
        AdminCommand::Stop(a) => {
            let i = client(&a.conn)?.stop(&a.id).await?;
            if a.conn.output == Output::Json {
                print_json(&i);
            } else {
                println!(
                    "{}: failback stopped ({} / {})",
                    i.recovery_instance_id, i.failback.state, i.failback.replication_state
                );
            }
        }
        AdminCommand::Config(ConfigCmd::Get(a)) => {
            let c = client(&a.conn)?.get_config(&a.id).await?;
            if a.conn.output == Output::Json {
                print_json(&c);
            } else {
                println!("bandwidth_throttling_mbps {}", c.bandwidth_throttling_mbps);
                println!("use_private_ip            {}", c.use_private_ip);
            }
        }
        AdminCommand::Config(ConfigCmd::Set(a)) => {
            let req = UpdateReplicationConfig {
                bandwidth_throttling_mbps: a.bandwidth_mbps,
                use_private_ip: a.use_private_ip,
                name: None,
            };
            let c = client(&a.conn)?.update_config(&a.id, &req).await?;
            if a.conn.output == Output::Json {
                print_json(&c);
            } else {
                println!("bandwidth_throttling_mbps {}", c.bandwidth_throttling_mbps);
                println!("use_private_ip            {}", c.use_private_ip);
            }
        }
        AdminCommand::Events(a) => {
            let l = client(&a.conn)?
                .events(a.instance.as_deref(), a.after, a.limit)
                .await?;
            if a.conn.output == Output::Json {
                print_json(&l);
            } else {
                for e in &l.items {
                    println!(
                        "{:>6} {} {:<20} {:<18} {} (by {})",
                        e.seq,
                        when(Some(e.at)),
                        e.recovery_instance_id.as_deref().unwrap_or("-"),
                        e.kind,
                        e.message,
                        e.actor.as_deref().unwrap_or("-")
                    );
                }
            }
        }
        AdminCommand::Credentials(c) => run_credentials(c).await?,
    }
    Ok(ExitCode::SUCCESS)
}
