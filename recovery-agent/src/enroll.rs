//! `failback-agent serve --server URL --enroll-token T`: the agent enrolls with the DR service
//! instead of being given certificates by hand.
//!
//! It reports its volumes and reachable address, receives its recovery instance id, an agent
//! certificate (DNS `failback-agent`) and the CA, serves only clients whose certificate names
//! that instance, and heartbeats (with its current address, which may change on restart).
//! With `--state-dir` the enrollment is kept (key mode 0600), so a restarted agent comes back
//! as the same instance without a new token.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use failback_api::{
    routes, AgentDisk, AgentEnrollRequest, AgentEnrollResponse, AgentHeartbeat,
    AgentHeartbeatResponse, IdentificationHints, ServiceClient, Timeouts,
};
use failback_replication::allow::ClientAllowlist;
use failback_replication::ServerTls;
use serde::{Deserialize, Serialize};

use crate::{AgentError, AgentOptions};

/// Flags of `failback-agent serve` for DR-service enrollment (flattened into `serve`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct EnrollArgs {
    /// DR service URL (https://HOST:PORT): enroll there instead of using --cert/--key.
    /// Several replicas separated by commas: the agent moves to the next when one cannot be
    /// reached. `--ca` then pins the service's CA.
    #[arg(long)]
    pub server: Option<String>,
    /// One-time agent enrollment token (from `failback token create agent`).
    #[arg(long, env = "FAILBACK_ENROLL_TOKEN", hide_env_values = true)]
    pub enroll_token: Option<String>,
    /// Keep the enrollment here; a restart reuses it (no new token needed).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Address clients should dial (default: the bound address; required with 0.0.0.0).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Private address, used when the instance's config says use_private_ip.
    #[arg(long)]
    pub private_address: Option<String>,
    /// Identification hint: VMware BIOS UUID of the original source server.
    #[arg(long)]
    pub source_vmware_uuid: Option<String>,
    /// Identification hint: hostname of the original source server.
    #[arg(long)]
    pub source_hostname: Option<String>,
    /// Identification hint: MAC address of the original source server (repeatable).
    #[arg(long = "source-mac")]
    pub source_macs: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("{0}")]
    Usage(String),
    #[error("DR service {url} refused: {message}")]
    Refused { url: String, message: String },
    #[error("DR service {url} unreachable: {message}")]
    Network { url: String, message: String },
    #[error("DR service {url} not trusted: {cause}")]
    Untrusted {
        url: String,
        cause: failback_trust::TlsCause,
    },
    #[error("enrollment state {path}: {message}")]
    State { path: PathBuf, message: String },
    #[error("TLS material from the DR service: {0}")]
    Tls(String),
}

impl EnrollError {
    /// Exit code per the shared table.
    pub fn exit_code(&self) -> u8 {
        match self {
            EnrollError::Usage(_) => 2,
            EnrollError::Network { .. } => 4,
            EnrollError::Refused { .. } | EnrollError::Untrusted { .. } => 7,
            EnrollError::Agent(AgentError::Listen { .. }) => 4,
            EnrollError::Agent(
                AgentError::DiskSpec(_) | AgentError::DuplicateDisk(_) | AgentError::NoDisks,
            ) => 2,
            _ => 1,
        }
    }
}

/// Saved enrollment (`enrollment.json` in `--state-dir`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Saved {
    server: String,
    enrollment: AgentEnrollResponse,
}

/// Everything [`run`] needs besides the enrollment flags.
#[derive(Debug, Clone)]
pub struct EnrollServe {
    pub args: EnrollArgs,
    pub listen: String,
    pub disks: Vec<(String, PathBuf)>,
    /// Pinned CA of the DR service (PEM file).
    pub ca: Option<PathBuf>,
    pub agent: AgentOptions,
}

/// The DR service's HTTPS client ([`ServiceClient`]): only the pinned CA, and only a
/// certificate with the service role (an agent's or client's certificate from the same CA is
/// refused).
fn service_client(urls: &[String], ca: Option<&Path>) -> Result<ServiceClient, EnrollError> {
    let p = ca.ok_or_else(|| {
        EnrollError::Usage("--ca is required with --server: the DR service's CA (ca.pem)".into())
    })?;
    let pem = std::fs::read(p)
        .map_err(|e| EnrollError::Usage(format!("cannot read --ca {}: {e}", p.display())))?;
    ServiceClient::new(urls, &pem, p, Timeouts::default()).map_err(|e| match e {
        failback_api::Error::Usage(m) => EnrollError::Usage(format!("--ca: {m}")),
        e => e.into(),
    })
}

/// The API client's errors in the agent's terms: a 4xx answer is a refusal, a 5xx answer or
/// a bad answer is worth retrying like a network error.
impl From<failback_api::Error> for EnrollError {
    fn from(e: failback_api::Error) -> Self {
        use failback_api::Error as E;
        match e {
            E::Usage(m) => EnrollError::Usage(m),
            E::Network { url, message } => EnrollError::Network { url, message },
            E::Untrusted { url, cause } => EnrollError::Untrusted { url, cause },
            E::Api { url, status, error } if status >= 500 => EnrollError::Network {
                url,
                message: format!("HTTP {status}: {} ({})", error.message, error.error),
            },
            E::Api { url, error, .. } => EnrollError::Refused {
                url,
                message: format!("{} ({})", error.message, error.error),
            },
            E::Decode { url, message } => EnrollError::Network {
                url,
                message: format!("bad answer: {message}"),
            },
        }
    }
}

async fn post<T: Serialize, R: serde::de::DeserializeOwned>(
    svc: &ServiceClient,
    path: &str,
    bearer: Option<&str>,
    body: &T,
) -> Result<R, EnrollError> {
    Ok(svc.post(path, bearer, body).await?)
}

/// Whether a saved enrollment's certificate carries the agent role and its instance.
fn agent_cert_current(e: &AgentEnrollResponse) -> bool {
    failback_trust::pem::certs(
        "agent certificate",
        Path::new("<saved>"),
        e.agent_cert_pem.as_bytes(),
    )
    .ok()
    .and_then(|c| failback_trust::Identity::from_der(&c[0]).ok())
    .is_some_and(|id| {
        id.expect(failback_trust::Role::Agent, Some(&e.recovery_instance_id))
            .is_ok()
    })
}

fn load_saved(dir: &Path, server: &str) -> Result<Option<Saved>, EnrollError> {
    let path = dir.join("enrollment.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(EnrollError::State {
                path,
                message: e.to_string(),
            })
        }
    };
    let saved: Saved = serde_json::from_str(&text).map_err(|e| EnrollError::State {
        path: path.clone(),
        message: e.to_string(),
    })?;
    // Saved with the URL list of that time: still ours if it shares a URL with today's.
    let now: Vec<&str> = server.split(',').collect();
    let same = saved.server.split(',').any(|u| now.contains(&u));
    Ok(same.then_some(saved))
}

fn save(dir: &Path, saved: &Saved) -> Result<(), EnrollError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("enrollment.json");
    let err = |e: std::io::Error| EnrollError::State {
        path: path.clone(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    let tmp = dir.join("enrollment.json.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    let text = serde_json::to_string_pretty(saved).map_err(|e| EnrollError::State {
        path: path.clone(),
        message: e.to_string(),
    })?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)
}

/// Enrolls (or reuses a saved enrollment), heartbeats, and serves until the listener fails.
pub async fn run(o: EnrollServe) -> Result<(), EnrollError> {
    let server = o
        .args
        .server
        .clone()
        .ok_or_else(|| EnrollError::Usage("--server is required for enrollment".into()))?;
    let urls = failback_api::parse_urls(&server)
        .map_err(|e| EnrollError::Usage(format!("--server: {e}")))?;
    let base = urls.join(",");
    let disks = crate::open_disks(&o.disks)?;
    let listener = tokio::net::TcpListener::bind(&o.listen)
        .await
        .map_err(|source| AgentError::Listen {
            addr: o.listen.clone(),
            source,
        })?;
    let bound = listener.local_addr().map_err(|source| AgentError::Listen {
        addr: o.listen.clone(),
        source,
    })?;
    let address = match &o.args.advertise {
        Some(a) => a.clone(),
        None if bound.ip().is_unspecified() => {
            return Err(EnrollError::Usage(format!(
                "listening on {bound}: pass --advertise HOST:PORT so clients know where to dial"
            )))
        }
        None => bound.to_string(),
    };
    println!("listening on {bound}");
    let http = service_client(&urls, o.ca.as_deref())?;
    let agent_disks: Vec<AgentDisk> = disks
        .iter()
        .map(|d| AgentDisk {
            id: d.info.id.clone(),
            size_bytes: d.info.size,
            logical_sector_size: d.info.logical_sector_size,
            device: Some(d.path.to_string_lossy().into_owned()),
        })
        .collect();
    let hb = AgentHeartbeat {
        address: address.clone(),
        private_address: o.args.private_address.clone(),
        disks: Some(agent_disks.clone()),
    };

    let mut enrollment = None;
    if let Some(dir) = &o.args.state_dir {
        if let Some(saved) = load_saved(dir, &base)? {
            // Check the saved secret still works (and report the new address).
            match post::<_, AgentHeartbeatResponse>(
                &http,
                routes::AGENT_HEARTBEAT,
                Some(&saved.enrollment.agent_secret),
                &hb,
            )
            .await
            {
                Ok(_) if !agent_cert_current(&saved.enrollment) => {
                    if o.args.enroll_token.is_none() {
                        return Err(EnrollError::Usage(format!(
                            "the saved enrollment in {} holds an agent certificate without the \
                             agent role (issued before role checks); enroll again with a new \
                             --enroll-token",
                            dir.display()
                        )));
                    }
                    tracing::warn!("saved agent certificate has no agent role; enrolling again");
                }
                Ok(_) => enrollment = Some(saved.enrollment),
                Err(EnrollError::Refused { message, .. }) if o.args.enroll_token.is_some() => {
                    tracing::warn!("saved enrollment refused ({message}); enrolling again");
                }
                Err(e) => return Err(e),
            }
        }
    }
    let enrollment = match enrollment {
        Some(e) => e,
        None => {
            let token = o.args.enroll_token.clone().ok_or_else(|| {
                EnrollError::Usage("--enroll-token is required (no saved enrollment)".into())
            })?;
            let hints = IdentificationHints {
                vmware_uuid: o.args.source_vmware_uuid.clone(),
                instance_uuid: None,
                mac_addresses: o.args.source_macs.clone(),
                hostname: o.args.source_hostname.clone(),
                fqdn: None,
            };
            let req = AgentEnrollRequest {
                token,
                address: address.clone(),
                private_address: o.args.private_address.clone(),
                disks: agent_disks,
                hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|s| s.trim().to_string()),
                source_hints: (hints != IdentificationHints::default()).then_some(hints),
                cert_sans: Vec::new(),
            };
            let e: AgentEnrollResponse = post(&http, routes::AGENT_ENROLL, None, &req).await?;
            if let Some(dir) = &o.args.state_dir {
                save(
                    dir,
                    &Saved {
                        server: base.clone(),
                        enrollment: e.clone(),
                    },
                )?;
            }
            e
        }
    };
    println!(
        "enrolled with {base} as recovery instance {}",
        enrollment.recovery_instance_id
    );
    let tls = ServerTls::from_pem(
        enrollment.ca_pem.as_bytes(),
        enrollment.agent_cert_pem.as_bytes(),
        enrollment.agent_key_pem.as_bytes(),
        Some(enrollment.recovery_instance_id.clone()),
    )
    .map_err(|e| EnrollError::Tls(e.to_string()))?;

    let allow = Arc::new(ClientAllowlist::default());
    let hb_task = tokio::spawn(heartbeats(
        http,
        enrollment.agent_secret.clone(),
        AgentHeartbeat { disks: None, ..hb },
        enrollment.heartbeat_interval_secs.max(1),
        allow.clone(),
    ));
    let mut agent = o.agent;
    agent.allow = Some(allow);
    let r = crate::serve(listener, disks, tls, agent).await;
    hb_task.abort();
    Ok(r?)
}

/// Heartbeats the DR service every `interval` seconds, and at once (at most once a second)
/// when a connection presents a client certificate the allow list does not know. Each answer
/// replaces the allow list: revocation reaches the agent within one interval.
async fn heartbeats(
    http: ServiceClient,
    secret: String,
    hb: AgentHeartbeat,
    interval: u64,
    allow: Arc<ClientAllowlist>,
) {
    let mut failing = false;
    loop {
        let asked = Instant::now();
        match post::<_, AgentHeartbeatResponse>(&http, routes::AGENT_HEARTBEAT, Some(&secret), &hb)
            .await
        {
            Ok(r) => {
                if failing {
                    tracing::info!("DR service heartbeat OK again");
                }
                failing = false;
                if let Some(list) = r.allowed_clients {
                    allow.set(list);
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!("heartbeat: {e}");
                }
                failing = true;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(interval)) => {}
            _ = allow.refresh_requested() => {
                // Unknown certificates cannot make the agent hammer the service.
                tokio::time::sleep_until((asked + Duration::from_secs(1)).into()).await;
            }
        }
    }
}

/// Entry for `failback-agent serve --server ...` (own runtime; maps errors to exit codes).
pub fn main(o: EnrollServe) -> ExitCode {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("failback-agent: error: tokio runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(o)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("failback-agent: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
