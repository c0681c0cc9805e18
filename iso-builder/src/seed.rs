//! The per-VM seed ISO: ISO 9660 (Rock Ridge + Joliet) labelled
//! [`failback_config::seed::SEED_LABEL`] holding `seed.toml`. Refuses an incomplete or
//! inconsistent seed (the error names the field) unless a partial seed is asked for.

use crate::appliance::write_iso;
use crate::Error;
use failback_config::seed::{Completeness, SeedConfig, SEED_FILE_NAME, SEED_LABEL};
use hadris_fs::{Content, Node, Tree};
use hadris_iso::{IsoId, IsoLevel, IsoOptions};
use std::path::Path;

/// Builds a seed ISO at `out` from a complete seed (server URL, token, CA certificate).
pub fn build(seed: &SeedConfig, out: &Path) -> Result<u64, Error> {
    build_with(seed, Completeness::Complete, out)
}

/// Builds a seed ISO; with [`Completeness::Partial`], missing values are left for the
/// appliance to ask on the console (still refused when `no_prompt` is set).
pub fn build_with(seed: &SeedConfig, completeness: Completeness, out: &Path) -> Result<u64, Error> {
    seed.validate(completeness)?;
    let mut tree = Tree::new();
    tree.insert(
        SEED_FILE_NAME,
        Node::file(Content::bytes(seed.to_toml().into_bytes())),
    )
    .map_err(|e| Error::Iso {
        what: "seed tree",
        reason: e.to_string(),
    })?;
    let options = IsoOptions::default()
        .with_id(IsoId::Volume, SEED_LABEL)
        .with_id(IsoId::Application, "FAILBACK SEED")
        .with_level(IsoLevel::L3)
        .with_joliet()
        .with_rock_ridge();
    write_iso(out, &tree, &options, "seed ISO")?;
    Ok(std::fs::metadata(out).map_err(|e| Error::io(out, e))?.len())
}

/// Reads the volume label of an ISO 9660 image or device (bytes 40..72 of sector 16, the
/// primary volume descriptor), trimmed. `None` when it is not ISO 9660.
pub fn read_label(path: &Path) -> Result<Option<String>, Error> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut pvd = [0u8; 2048];
    f.seek(SeekFrom::Start(32768))
        .map_err(|e| Error::io(path, e))?;
    if f.read_exact(&mut pvd).is_err() || &pvd[..6] != b"\x01CD001" {
        return Ok(None);
    }
    Ok(Some(
        String::from_utf8_lossy(&pvd[40..72]).trim_end().to_string(),
    ))
}
