//! Builds the appliance ISO (kernel, initramfs, BIOS + UEFI/Secure Boot) and per-VM seed ISOs.
//!
//! Inputs are unpacked Debian packages (see `iso-builder/packages.lock` and
//! `iso-builder/fetch-inputs.sh`); nothing here runs external tools, so builds are
//! reproducible: the same inputs give the same bytes.

pub mod appliance;
pub mod esp;
pub mod initramfs;
pub mod inputs;
pub mod modules;
pub mod seed;

use std::path::{Path, PathBuf};

/// Everything that can go wrong while building an ISO; each names the path or item involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An input the ISO needs is not in the cache.
    #[error(
        "ISO input missing: {what} (looked for {path}); run `make iso-inputs` or pass --cache"
    )]
    InputMissing {
        /// What it is.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A kernel module could not be read.
    #[error("kernel module {path}: {reason}")]
    Module {
        /// The `.ko` file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A needed kernel module is not in the kernel package.
    #[error("kernel module `{0}` is not in the kernel package (nor built in)")]
    ModuleMissing(String),
    /// Module dependencies form a cycle.
    #[error("kernel module dependency cycle through `{0}`")]
    ModuleCycle(String),
    /// The FAT (EFI system partition) image could not be written.
    #[error("EFI system partition image: {0}")]
    Fat(String),
    /// The ISO writer refused the layout.
    #[error("ISO 9660 writer ({what}): {reason}")]
    Iso {
        /// Which image.
        what: &'static str,
        /// The writer's message.
        reason: String,
    },
    /// A file is larger than the format can hold.
    #[error("{what} is too large: {size} bytes (limit {limit})")]
    TooLarge {
        /// What.
        what: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The seed config is refused.
    #[error(transparent)]
    Seed(#[from] failback_config::seed::SeedError),
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Reads a file, naming it on failure.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}
