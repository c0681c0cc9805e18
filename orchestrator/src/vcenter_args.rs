//! vCenter connection settings shared by `failback vcenter ...` and `failback mass ...`:
//! flags, or the environment variables AWS DRSFA uses (VCENTER_HOST, VCENTER_PORT,
//! VCENTER_USER, VCENTER_PASSWORD, VCENTER_DATASTORE, DISABLE_SSL_VERIFICATION), or a
//! govc-style URL (`--vcenter https://user:pass@host/sdk`, or GOVC_URL).

use clap::Args;
use failback_vcenter::{Client, Config, Error, TlsMode};
use std::path::PathBuf;
use std::time::Duration;

/// Exit codes for vCenter failures (README "vCenter" lists them).
pub mod exit {
    /// Usage/config error, or something named does not exist (VM, datastore, file, snapshot).
    pub const USAGE: u8 = 2;
    /// Network, TLS, HTTP 5xx, or a task that did not finish in time.
    pub const NETWORK: u8 = 4;
    /// Uploaded data does not match the local file.
    pub const VERIFY: u8 = 5;
    /// Unexpected response (not vim25 SOAP).
    pub const PROTOCOL: u8 = 6;
    /// Login refused, session could not be renewed, or no permission.
    pub const REFUSED: u8 = 7;
    /// vCenter refused the operation (fault, failed task, wrong power state, no CD-ROM slot).
    pub const OPERATION: u8 = 9;
}

/// Maps a vcenter error to its exit code.
pub fn exit_code(e: &Error) -> u8 {
    use failback_vcenter::FaultKind;
    match e {
        Error::Config(_)
        | Error::CaFile { .. }
        | Error::VmNotFound { .. }
        | Error::VmAmbiguous { .. }
        | Error::DatastoreNotFound { .. }
        | Error::DatastoreFileNotFound { .. }
        | Error::Datacenter { .. }
        | Error::SnapshotNotFound { .. }
        | Error::BootOptions(_)
        | Error::Io { .. } => exit::USAGE,
        Error::Http { .. } | Error::HttpStatus { .. } | Error::TaskTimeout { .. } => exit::NETWORK,
        Error::Verify { .. } => exit::VERIFY,
        Error::Protocol { .. } => exit::PROTOCOL,
        Error::InvalidLogin { .. } | Error::SessionExpired { .. } => exit::REFUSED,
        Error::Fault { fault, .. } | Error::TaskFailed { fault, .. } => match fault.kind {
            FaultKind::NoPermission { .. }
            | FaultKind::NotAuthenticated
            | FaultKind::InvalidLogin => exit::REFUSED,
            FaultKind::ManagedObjectNotFound { .. } | FaultKind::FileNotFound { .. } => exit::USAGE,
            _ => exit::OPERATION,
        },
        _ => exit::OPERATION,
    }
}

/// vCenter connection flags. Flatten into a clap command with `#[command(flatten)]`.
#[derive(Args, Debug, Clone)]
pub struct VcenterArgs {
    /// vCenter host, `host:port`, or govc-style URL `https://user:pass@host/sdk`.
    #[arg(long = "vcenter", env = "VCENTER_HOST")]
    pub host: Option<String>,
    /// HTTPS port, when --vcenter is a bare host.
    #[arg(long = "vcenter-port", env = "VCENTER_PORT")]
    pub port: Option<u16>,
    /// govc-style URL, used when --vcenter/VCENTER_HOST is not set.
    #[arg(long = "vcenter-url", env = "GOVC_URL", hide_env_values = true)]
    pub url: Option<String>,
    #[arg(long = "vcenter-user", env = "VCENTER_USER")]
    pub user: Option<String>,
    #[arg(
        long = "vcenter-password",
        env = "VCENTER_PASSWORD",
        hide_env_values = true
    )]
    pub password: Option<String>,
    /// Datastore for uploads and ISOs.
    #[arg(long = "datastore", env = "VCENTER_DATASTORE")]
    pub datastore: Option<String>,
    /// Datacenter (default: the only one).
    #[arg(long = "datacenter", env = "VCENTER_DATACENTER")]
    pub datacenter: Option<String>,
    /// CA certificate(s) (PEM) to verify vCenter with, instead of the public roots.
    #[arg(long = "vcenter-ca", env = "VCENTER_CA")]
    pub ca: Option<PathBuf>,
    /// Pin the vCenter certificate by SHA-256 (hex, colons allowed).
    #[arg(long = "vcenter-thumbprint", env = "VCENTER_THUMBPRINT")]
    pub thumbprint: Option<String>,
    /// Accept any vCenter certificate (DRSFA: DISABLE_SSL_VERIFICATION=true).
    #[arg(
        long = "vcenter-insecure",
        alias = "insecure",
        env = "DISABLE_SSL_VERIFICATION"
    )]
    pub insecure: bool,
    /// Seconds to wait for a vCenter task.
    #[arg(
        long = "task-timeout",
        env = "VCENTER_TASK_TIMEOUT",
        default_value_t = 600
    )]
    pub task_timeout_secs: u64,
}

impl Default for VcenterArgs {
    /// Nothing set, task time-out as the flag's default (a zero time-out would fail every task).
    fn default() -> Self {
        VcenterArgs {
            host: None,
            port: None,
            url: None,
            user: None,
            password: None,
            datastore: None,
            datacenter: None,
            ca: None,
            thumbprint: None,
            insecure: false,
            task_timeout_secs: 600,
        }
    }
}

impl VcenterArgs {
    /// Builds the library config; errors name the missing flag and its variable.
    pub fn config(&self) -> Result<Config, Error> {
        let raw = self
            .host
            .clone()
            .or_else(|| self.url.clone())
            .ok_or_else(|| {
                Error::Config("no vCenter: set --vcenter / VCENTER_HOST or GOVC_URL".into())
            })?;
        let url = if raw.contains("://") {
            raw
        } else {
            match self.port {
                Some(p) if !raw.contains(':') => format!("https://{raw}:{p}/sdk"),
                _ => format!("https://{raw}/sdk"),
            }
        };
        let mut cfg = Config::from_url(&url)?;
        if let Some(u) = &self.user {
            cfg.username = u.clone();
        }
        if let Some(p) = &self.password {
            cfg.password = p.clone();
        }
        if cfg.username.is_empty() {
            return Err(Error::Config(format!(
                "no user for {}: set --vcenter-user / VCENTER_USER",
                cfg.url
            )));
        }
        if cfg.password.is_empty() {
            return Err(Error::Config(format!(
                "no password for {}: set --vcenter-password / VCENTER_PASSWORD",
                cfg.url
            )));
        }
        let pins = [self.insecure, self.ca.is_some(), self.thumbprint.is_some()];
        if pins.iter().filter(|p| **p).count() > 1 {
            return Err(Error::Config(
                "choose one of --vcenter-insecure, --vcenter-ca, --vcenter-thumbprint".into(),
            ));
        }
        cfg.tls = if self.insecure {
            TlsMode::Insecure
        } else if let Some(ca) = &self.ca {
            TlsMode::CaFile(ca.clone())
        } else if let Some(tp) = &self.thumbprint {
            TlsMode::Thumbprint(tp.clone())
        } else {
            TlsMode::Verify
        };
        cfg.datacenter = self.datacenter.clone();
        cfg.task_timeout = Duration::from_secs(self.task_timeout_secs);
        Ok(cfg)
    }

    /// Connects and logs in.
    pub async fn connect(&self) -> Result<Client, Error> {
        Client::connect(self.config()?).await
    }

    /// The datastore from --datastore / VCENTER_DATASTORE.
    pub fn datastore(&self) -> Result<&str, Error> {
        self.datastore.as_deref().ok_or_else(|| {
            Error::Config("no datastore: set --datastore / VCENTER_DATASTORE".into())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_user_and_govc_url() {
        let a = VcenterArgs {
            host: Some("vc.example".into()),
            port: Some(8443),
            user: Some("admin".into()),
            password: Some("pw".into()),
            ..Default::default()
        };
        let c = a.config().unwrap();
        assert_eq!(c.url, "https://vc.example:8443/sdk");
        assert_eq!((c.username.as_str(), c.password.as_str()), ("admin", "pw"));
        assert_eq!(c.tls, TlsMode::Verify);
        assert_eq!(c.task_timeout, Duration::from_secs(600));

        let g = VcenterArgs {
            url: Some("https://u%40x:p@vc2/sdk".into()),
            insecure: true,
            ..Default::default()
        };
        let c = g.config().unwrap();
        assert_eq!(
            (c.url.as_str(), c.username.as_str()),
            ("https://vc2/sdk", "u@x")
        );
        assert_eq!(c.tls, TlsMode::Insecure);

        let none = VcenterArgs::default();
        assert!(none
            .config()
            .unwrap_err()
            .to_string()
            .contains("VCENTER_HOST"));
        let nopw = VcenterArgs {
            host: Some("vc".into()),
            user: Some("u".into()),
            ..Default::default()
        };
        assert!(nopw
            .config()
            .unwrap_err()
            .to_string()
            .contains("VCENTER_PASSWORD"));
        let both = VcenterArgs {
            insecure: true,
            thumbprint: Some("ab".repeat(32)),
            ..a
        };
        assert!(both.config().is_err());
    }
}
