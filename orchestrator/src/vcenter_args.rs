//! vCenter connection settings shared by `failback vcenter ...` and `failback mass ...`:
//! flags, or the environment variables AWS DRSFA uses (VCENTER_HOST, VCENTER_PORT,
//! VCENTER_USER, VCENTER_PASSWORD, VCENTER_DATASTORE, DISABLE_SSL_VERIFICATION), or a
//! govc-style URL (`--vcenter https://user:pass@host/sdk`, or GOVC_URL).

use clap::Args;
use failback_config::plan::{VcenterCredentials, VcenterEntry};
use failback_vcenter::{Client, Config, Error, TlsMode};
use std::path::{Path, PathBuf};
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

/// The connection settings of a plan's `[[vcenter]]` entry: its host, datastore, datacenter
/// and TLS choice, and credentials from its two environment variables or its credentials
/// file, which must be readable by its owner only. `task_timeout_secs` as `--task-timeout`.
pub fn entry_config(e: &VcenterEntry, task_timeout_secs: u64) -> Result<Config, Error> {
    let (user, password) = entry_credentials(e)?;
    let args = VcenterArgs {
        host: Some(e.host.clone()),
        user: Some(user),
        password: Some(password),
        datastore: Some(e.datastore.clone()),
        datacenter: e.datacenter.clone(),
        ca: e.ca.as_ref().map(PathBuf::from),
        thumbprint: e.thumbprint.clone(),
        insecure: e.insecure,
        task_timeout_secs,
        ..Default::default()
    };
    args.config()
        .map_err(|err| Error::Config(format!("vCenter {}: {err}", e.name)))
}

/// User and password of a `[[vcenter]]` entry (see [`entry_config`]).
pub fn entry_credentials(e: &VcenterEntry) -> Result<(String, String), Error> {
    if let Some(path) = &e.credentials_file {
        return read_credentials_file(Path::new(path))
            .map(|c| (c.user, c.password))
            .map_err(|m| Error::Config(format!("vCenter {}: {m}", e.name)));
    }
    let var = |name: &Option<String>, what: &str| {
        let name = name.as_deref().ok_or_else(|| {
            Error::Config(format!(
                "vCenter {}: no {what}: set {what}_env or credentials_file",
                e.name
            ))
        })?;
        std::env::var(name)
            .ok()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                Error::Config(format!(
                    "vCenter {}: environment variable {name} ({what}_env) is not set",
                    e.name
                ))
            })
    };
    Ok((var(&e.user_env, "user")?, var(&e.password_env, "password")?))
}

/// Reads a credentials file (`user = "..."`, `password = "..."`), refusing one that its
/// group or others may read or write: it holds a password.
pub fn read_credentials_file(path: &Path) -> Result<VcenterCredentials, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("credentials file {}: {e}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "credentials file {} has mode {mode:04o}: it holds a password, so group and others must have no access (chmod 600 {})",
                path.display(),
                path.display()
            ));
        }
    }
    if !meta.is_file() {
        return Err(format!(
            "credentials file {} is not a regular file",
            path.display()
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("credentials file {}: {e}", path.display()))?;
    let c: VcenterCredentials = toml::from_str(&text).map_err(|e| {
        format!(
            "credentials file {} is not `user = \"...\"` and `password = \"...\"` (TOML): {e}",
            path.display()
        )
    })?;
    if c.user.is_empty() || c.password.is_empty() {
        return Err(format!(
            "credentials file {}: user and password must not be empty",
            path.display()
        ));
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str) -> VcenterEntry {
        VcenterEntry {
            name: name.into(),
            host: "vc.example:8443".into(),
            datastore: "ds1".into(),
            folder: None,
            datacenter: None,
            user_env: None,
            password_env: None,
            credentials_file: None,
            ca: None,
            thumbprint: None,
            insecure: true,
        }
    }

    #[test]
    fn entry_credentials_from_a_private_file_or_the_environment() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("east.cred");
        std::fs::write(
            &file,
            "user = \"admin@vsphere.local\"\npassword = \"s3cret\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut e = entry("east");
        e.credentials_file = Some(file.display().to_string());
        let err = entry_config(&e, 600).unwrap_err().to_string();
        assert!(
            err.contains("vCenter east")
                && err.contains(&file.display().to_string())
                && err.contains("mode 0644")
                && err.contains("chmod 600"),
            "{err}"
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(entry_config(&e, 600)
            .unwrap_err()
            .to_string()
            .contains("mode 0640"));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = entry_config(&e, 600).unwrap();
        assert_eq!(c.url, "https://vc.example:8443/sdk");
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("admin@vsphere.local", "s3cret")
        );
        assert_eq!(c.tls, TlsMode::Insecure);
        std::fs::write(&file, "user = \"a\"\npass = \"b\"\n").unwrap();
        let err = entry_config(&e, 600).unwrap_err().to_string();
        assert!(err.contains("pass"), "{err}");

        let mut e = entry("west");
        e.user_env = Some("FAILBACK_TEST_VC_WEST_USER".into());
        e.password_env = Some("FAILBACK_TEST_VC_WEST_PASSWORD_UNSET".into());
        std::env::set_var("FAILBACK_TEST_VC_WEST_USER", "u");
        let err = entry_config(&e, 600).unwrap_err().to_string();
        assert!(
            err.contains("vCenter west") && err.contains("FAILBACK_TEST_VC_WEST_PASSWORD_UNSET"),
            "{err}"
        );
        e.password_env = Some("FAILBACK_TEST_VC_WEST_USER".into());
        assert_eq!(
            entry_config(&e, 30).unwrap().task_timeout,
            Duration::from_secs(30)
        );
    }

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
