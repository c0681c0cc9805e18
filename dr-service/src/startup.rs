//! Start-up checks of the data directory: the service refuses to start on a `ca.pem` that is
//! not a certificate, a `ca-key.pem` that is not a key, a certificate that does not belong to
//! the key, one of the two without the other (a new CA would silently replace the one every
//! agent and client pinned), or an empty `admin-token`; each error names the file. Secret
//! files readable by group or others are warned about.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("{path}: {problem}")]
    BadFile { path: PathBuf, problem: String },
    /// `--admin-token` / `FAILBACK_ADMIN_TOKEN` is empty: `Bearer ` alone would be admin.
    #[error("--admin-token (FAILBACK_ADMIN_TOKEN) is empty")]
    EmptyAdminToken,
}

fn bad(path: &Path, problem: impl Into<String>) -> StartupError {
    StartupError::BadFile {
        path: path.to_owned(),
        problem: problem.into(),
    }
}

const RESTORE: &str = "restore it from a backup (removing ca.pem and ca-key.pem creates a new \
                       CA that enrolled agents and paired clients do not trust)";

/// Checks `ca.pem`, `ca-key.pem` and the mode of the secret files in `dir`, if present.
/// `ca_in_database`: the CA lives in a shared database (PostgreSQL replicas) and `ca.pem`
/// is only a copy written at start, so the pair is not checked.
pub fn check_data_dir(dir: &Path, ca_in_database: bool) -> Result<(), StartupError> {
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca-key.pem");
    let files = (cert_path.exists(), key_path.exists());
    match if ca_in_database {
        (false, false)
    } else {
        files
    } {
        (false, false) => {}
        (true, false) => {
            return Err(bad(
                &key_path,
                format!("missing while ca.pem exists; {RESTORE}"),
            ))
        }
        (false, true) => {
            return Err(bad(
                &cert_path,
                format!("missing while ca-key.pem exists; {RESTORE}"),
            ))
        }
        (true, true) => check_ca(&cert_path, &key_path)?,
    }
    for f in [key_path, dir.join("admin-token")] {
        warn_if_shared(&f);
    }
    Ok(())
}

fn read(path: &Path) -> Result<String, StartupError> {
    std::fs::read_to_string(path).map_err(|e| bad(path, format!("cannot read: {e}")))
}

fn check_ca(cert_path: &Path, key_path: &Path) -> Result<(), StartupError> {
    let cert_pem = read(cert_path)?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| bad(cert_path, format!("not a PEM certificate ({e}); {RESTORE}")))?;
    if pem.label != "CERTIFICATE" {
        return Err(bad(
            cert_path,
            format!("holds a PEM {:?}, not a CERTIFICATE; {RESTORE}", pem.label),
        ));
    }
    let cert = pem.parse_x509().map_err(|e| {
        bad(
            cert_path,
            format!("not an X.509 certificate ({e}); {RESTORE}"),
        )
    })?;
    let key = rcgen::KeyPair::from_pem(&read(key_path)?)
        .map_err(|e| bad(key_path, format!("not a PEM private key ({e}); {RESTORE}")))?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(bad(
            cert_path,
            format!(
                "its public key is not the one of {} (the files belong to different CAs); {RESTORE}",
                key_path.display()
            ),
        ));
    }
    Ok(())
}

/// Warns when a secret file is readable or writable by group or others.
fn warn_if_shared(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(md) = std::fs::metadata(path) {
            let mode = md.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    "{}: mode {mode:o} lets other users read a secret; chmod 600 it",
                    path.display()
                );
            }
        }
    }
}

/// The admin token as read from `path`: refused when empty.
pub fn admin_token_file(path: &Path, text: &str) -> Result<String, StartupError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(bad(
            path,
            "empty admin token; write a token into it or remove the file to have a new one \
             generated",
        ));
    }
    if t.chars().any(char::is_whitespace) {
        return Err(bad(path, "the admin token contains whitespace"));
    }
    Ok(t.to_string())
}

/// The admin token given by flag or environment: refused when empty.
pub fn admin_token_flag(text: &str) -> Result<String, StartupError> {
    match text.trim() {
        "" => Err(StartupError::EmptyAdminToken),
        t => Ok(t.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_or_spaced_tokens_are_refused() {
        let p = Path::new("/x/admin-token");
        assert!(admin_token_file(p, " \n")
            .unwrap_err()
            .to_string()
            .contains("/x/admin-token"));
        assert!(admin_token_file(p, "a b").is_err());
        assert_eq!(admin_token_file(p, "fbadm_1\n").unwrap(), "fbadm_1");
        assert!(admin_token_flag(" ").is_err());
    }
}
