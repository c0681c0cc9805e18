//! A throwaway PostgreSQL cluster for tests: Debian's `initdb` + `pg_ctl` (package
//! `postgresql`, installed by `make setup`) in a temporary directory, on a free port of
//! 127.0.0.1, run as an unprivileged user (`nobody` when the tests run as root, since
//! PostgreSQL refuses to run as root). Stopped (`pg_ctl stop -m immediate`) and removed on
//! drop. Every test gets its own database ([`PgCluster::database`]), so tests run in parallel
//! on one cluster.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A running cluster; trust authentication on 127.0.0.1 for user `failback`.
#[derive(Debug)]
pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    as_nobody: bool,
}

/// The newest `/usr/lib/postgresql/<major>/bin` with `initdb` (panics naming the package if
/// there is none, so a test never skips silently).
fn pg_bin() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((major, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, b)| b)
        .expect("no /usr/lib/postgresql/*/bin/initdb: install Debian's postgresql (make setup)")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .expect("id -u")
}

/// A server certificate and key (PEM) for [`PgCluster::start_tls`].
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
}

/// `pg_hba.conf` of a TLS-only cluster: TLS connections on loopback are trusted, every
/// plaintext TCP connection is rejected (the Unix socket in the cluster directory stays open
/// for the helper's own `psql`).
const TLS_ONLY_HBA: &str = "local all all trust\n\
hostssl all all 127.0.0.1/32 trust\n\
hostssl all all ::1/128 trust\n\
hostnossl all all 0.0.0.0/0 reject\n\
hostnossl all all ::/0 reject\n";

impl PgCluster {
    /// initdb + start; panics with the server log on failure.
    pub fn start() -> PgCluster {
        PgCluster::start_with(None)
    }

    /// initdb + start with `ssl=on` (the given certificate and key) and only TLS connections
    /// accepted over TCP (`hostssl` trust, `hostnossl` reject).
    pub fn start_tls(tls: &ServerTls) -> PgCluster {
        PgCluster::start_with(Some(tls))
    }

    fn start_with(tls: Option<&ServerTls>) -> PgCluster {
        let bin = pg_bin();
        let dir = tempfile::Builder::new()
            .prefix("failback-pg-")
            .tempdir()
            .expect("temp dir");
        let as_nobody = is_root();
        if as_nobody {
            // nobody:nogroup must own the cluster directory and reach it.
            std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).expect("chown");
            let mut perm = std::fs::metadata(dir.path()).unwrap().permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o700);
            std::fs::set_permissions(dir.path(), perm).unwrap();
        }
        let c = PgCluster {
            dir,
            bin,
            port: crate::free_port(),
            as_nobody,
        };
        let data = c.data();
        c.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "failback",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        );
        let mut opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=200",
            c.port,
            c.dir.path().display()
        );
        if let Some(tls) = tls {
            c.write_owned(&data.join("server.crt"), &tls.cert_pem);
            c.write_owned(&data.join("server.key"), &tls.key_pem);
            c.write_owned(&data.join("pg_hba.conf"), TLS_ONLY_HBA);
            opts.push_str(" -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key");
        }
        let log = c.dir.path().join("server.log");
        c.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-o",
                &opts,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        c
    }

    /// Writes a file the server reads, mode 0600, owned by the server's user (PostgreSQL
    /// refuses a key readable by others).
    fn write_owned(&self, path: &Path, text: &str) {
        std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut perm = std::fs::metadata(path).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o600);
        std::fs::set_permissions(path, perm).unwrap();
        if self.as_nobody {
            std::os::unix::fs::chown(path, Some(65534), Some(65534)).expect("chown");
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        if self.as_nobody {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self
            .command(tool)
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("{tool}: {e}"));
        if !out.status.success() {
            let log =
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
            panic!(
                "{tool} {args:?} failed ({}):\n{}\n{}\nserver log:\n{log}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// The cluster's directory (data, socket, server.log).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// URL of the `postgres` maintenance database.
    pub fn admin_url(&self) -> String {
        format!("postgres://failback@127.0.0.1:{}/postgres", self.port)
    }

    /// Creates a fresh database and returns its URL.
    pub fn database(&self, name: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                self.dir.path().to_str().unwrap(),
                "-p",
                &self.port.to_string(),
                "-U",
                "failback",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                &format!("CREATE DATABASE \"{name}\""),
            ])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "CREATE DATABASE {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        format!("postgres://failback@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates a fresh database and returns its name (for URLs a test writes itself).
    pub fn database_name(&self, name: &str) -> String {
        self.database(name);
        name.to_string()
    }
}

impl PgCluster {
    /// One cluster for the whole test process, started on first use. Statics are never
    /// dropped, so a reaper shell started with it stops the cluster and removes its
    /// directory once the test process has exited (however it exited).
    pub fn shared() -> &'static PgCluster {
        static SHARED: std::sync::OnceLock<PgCluster> = std::sync::OnceLock::new();
        SHARED.get_or_init(|| {
            let c = PgCluster::start();
            c.reap_on_exit();
            c
        })
    }

    /// For a cluster kept in a static (never dropped): a reaper shell stops the cluster and
    /// removes its directory once the test process has exited (however it exited).
    pub fn reap_on_exit(&self) {
        let c = self;
        let stop = if c.as_nobody {
            "setpriv --reuid=65534 --regid=65534 --clear-groups --"
        } else {
            ""
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; \
                 {stop} {pg_ctl} -D {data} -m immediate -w stop >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            pg_ctl = c.bin.join("pg_ctl").display(),
            data = c.data().display(),
            dir = c.dir.path().display(),
        );
        // Not waited for: it outlives this process on purpose (reaped by init).
        #[allow(clippy::zombie_processes)]
        let _reaper = Command::new("sh")
            .args(["-c", &script])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("reaper shell");
    }

    /// A fresh database on the shared cluster, named after the test (plus a counter).
    pub fn fresh_database(test: &str) -> String {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name: String = format!("{test}_{n}")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(60)
            .collect();
        PgCluster::shared().database(&name)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self
            .command("pg_ctl")
            .args([
                "-D",
                data.to_str().unwrap_or(""),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .output();
    }
}
