//! A resume point that survives an appliance reboot: per disk, the offset below which an
//! interrupted round verified, wrote and flushed the target, with a digest of sampled blocks
//! of that prefix as read back from the local target, so a later client process can check the
//! prefix against the disk before it trusts it (re-reading a multi-TB prefix would defeat the
//! purpose).
//!
//! - Sampled: [`SPREAD`] blocks spread evenly over the prefix past the first MiB, plus every
//!   block of the last hash window below the offset (the last writes before the cut). A
//!   mismatch, another local size or serial, another remote disk, size or block size: the disk
//!   starts over at 0 and the reason is logged.
//! - The first MiB is held back by the writer until a round commits, so after a reboot it is
//!   not on the target: a round resumed from a checkpoint fetches those blocks again
//!   (unconditionally, verified like any block) before it ends.
//! - The hashes of the prefix are not stored (32 bytes per block: 1 GiB for 2 TiB); the round
//!   after a checkpoint resume therefore reads its target again (one hash compare).
//!
//! The record is what the client stores at the DR service; everything in it is checked again
//! when it comes back ([`Checkpoint::validate`]).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::block;
use crate::cbt::Token;
use crate::writer::HEAD_BYTES;

/// Blocks sampled evenly over the prefix (besides the last window's).
pub const SPREAD: u64 = 64;
/// Longest disk id accepted (as the agent's manifest).
const MAX_ID: usize = 200;

/// One disk's resume point (JSON at the DR service).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// The agent's disk id.
    pub remote: String,
    /// The source disk's size in bytes.
    pub disk_size: u64,
    /// The round's block size.
    pub block_size: u32,
    /// The local target.
    pub local: PathBuf,
    /// The local target's size when the checkpoint was taken.
    pub local_size: u64,
    /// The local target's serial or WWID, if it has one.
    pub local_serial: Option<String>,
    /// Everything below this byte offset is verified, written and flushed (except the first
    /// MiB: see the module documentation). A multiple of `block_size`, above the first MiB.
    pub offset: u64,
    /// The interrupted round's cut (the agent resumes only while it is still its last).
    pub cut: Option<Token>,
    /// Bytes of each hash window (the last one below `offset` is sampled whole).
    pub window_bytes: u64,
    /// BLAKE3 over `(block index u64 BE, BLAKE3 of the block)` of the sampled blocks, hex.
    pub digest: String,
}

impl Checkpoint {
    /// Checks every field as hostile input (sizes, alignment, lengths); names the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        block::validate_block_size(self.block_size)?;
        let bs = u64::from(self.block_size);
        if self.remote.is_empty() || self.remote.len() > MAX_ID {
            return Err(format!("remote disk id must be 1..{MAX_ID} characters"));
        }
        if self.local.as_os_str().is_empty() || self.local.as_os_str().len() > 4096 {
            return Err("local path must be 1..4096 bytes".into());
        }
        if self.local_serial.as_ref().is_some_and(|s| s.len() > 256) {
            return Err("local serial longer than 256 bytes".into());
        }
        if self.offset <= HEAD_BYTES || !self.offset.is_multiple_of(bs) {
            return Err(format!(
                "offset {} must be a multiple of the block size {bs} above the first MiB",
                self.offset
            ));
        }
        if self.offset >= self.disk_size || self.offset > self.local_size {
            return Err(format!(
                "offset {} must lie inside the disk ({} bytes) and the target ({} bytes)",
                self.offset, self.disk_size, self.local_size
            ));
        }
        if self.window_bytes < bs || !self.window_bytes.is_multiple_of(bs) {
            return Err(format!(
                "window of {} bytes must be a multiple of the block size {bs}",
                self.window_bytes
            ));
        }
        if self.window_bytes > 64 << 20 {
            return Err(format!(
                "window of {} bytes exceeds 64 MiB",
                self.window_bytes
            ));
        }
        if self.digest.len() != 64 || hex::decode(&self.digest).is_err() {
            return Err("digest must be 64 hex digits".into());
        }
        Ok(())
    }

    /// The first block past the prefix (where the round continues).
    pub fn start_block(&self) -> u64 {
        self.offset / u64::from(self.block_size)
    }

    /// The sampled block indexes: [`SPREAD`] spread evenly over the blocks past the first MiB,
    /// then every block of the last window below the offset; ascending, no repeats.
    pub fn sampled_blocks(offset: u64, block_size: u32, window_bytes: u64) -> Vec<u64> {
        let bs = u64::from(block_size);
        let (first, end) = (HEAD_BYTES.div_ceil(bs), offset / bs);
        if end <= first {
            return Vec::new();
        }
        let span = end - first;
        let mut out: Vec<u64> = (0..SPREAD.min(span))
            .map(|i| first + i * span / SPREAD.min(span))
            .collect();
        let last = end.saturating_sub(window_bytes / bs).max(first);
        out.extend(last..end);
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The digest of the sampled blocks of `target` (a file or block device).
    pub fn digest_of(
        target: &Path,
        offset: u64,
        block_size: u32,
        window_bytes: u64,
    ) -> std::io::Result<String> {
        let f = std::fs::File::open(target)?;
        let bs = u64::from(block_size);
        let mut buf = vec![0u8; usize::try_from(bs).unwrap_or(usize::MAX)];
        let mut d = blake3::Hasher::new();
        for b in Self::sampled_blocks(offset, block_size, window_bytes) {
            f.read_exact_at(&mut buf, b * bs)?;
            d.update(&b.to_be_bytes());
            d.update(blake3::hash(&buf).as_bytes());
        }
        Ok(d.finalize().to_hex().to_string())
    }

    /// Whether the local target still holds this checkpoint's prefix: same size and serial,
    /// same sampled blocks. `Err` says why not (the disk then starts over at 0).
    pub fn check_target(&self) -> Result<(), String> {
        self.validate()?;
        let path = self.local.display();
        let info = crate::device::inspect(&self.local)
            .map_err(|e| format!("cannot inspect {path}: {e}"))?;
        if info.size != self.local_size || info.serial != self.local_serial {
            return Err(format!(
                "{path} is {} bytes, serial {:?}; the checkpoint was taken on {} bytes, serial {:?}",
                info.size, info.serial, self.local_size, self.local_serial
            ));
        }
        let now = Self::digest_of(&self.local, self.offset, self.block_size, self.window_bytes)
            .map_err(|e| format!("cannot read the sampled blocks of {path}: {e}"))?;
        if now != self.digest {
            return Err(format!(
                "the sampled blocks of {path} below byte {} changed since the checkpoint",
                self.offset
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn checkpoint(dir: &Path, data: &[u8]) -> Checkpoint {
        let local = dir.join("t.img");
        std::fs::write(&local, data).unwrap();
        let (offset, bs, window) = (8 * MIB, 65536, 2 * MIB);
        Checkpoint {
            remote: "d".into(),
            disk_size: data.len() as u64,
            block_size: bs,
            local: local.clone(),
            local_size: data.len() as u64,
            local_serial: None,
            offset,
            cut: None,
            window_bytes: window,
            digest: Checkpoint::digest_of(&local, offset, bs, window).unwrap(),
        }
    }

    fn data() -> Vec<u8> {
        (0..12 * MIB).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn samples_spread_over_the_prefix_and_cover_the_last_window() {
        let s = Checkpoint::sampled_blocks(8 * MIB, 65536, 2 * MIB);
        assert_eq!(s.first(), Some(&16), "past the first MiB");
        assert_eq!(
            s.last(),
            Some(&127),
            "up to the last block below the offset"
        );
        assert!((96..128).all(|b| s.contains(&b)), "the last window whole");
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert!(Checkpoint::sampled_blocks(MIB, 65536, 2 * MIB).is_empty());
    }

    #[test]
    fn a_checkpoint_holds_until_a_sampled_block_changes() {
        let dir = tempfile::tempdir().unwrap();
        let cp = checkpoint(dir.path(), &data());
        cp.validate().unwrap();
        cp.check_target().unwrap();
        let json = serde_json::to_string(&cp).unwrap();
        assert_eq!(serde_json::from_str::<Checkpoint>(&json).unwrap(), cp);
        // A block of the last window changes: refused, with the reason.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&cp.local)
            .unwrap();
        f.write_all_at(b"x", 7 * MIB + 5).unwrap();
        let e = cp.check_target().unwrap_err();
        assert!(e.contains("changed since the checkpoint"), "{e}");
        // Another size: refused before reading.
        f.set_len(13 * MIB).unwrap();
        let e = cp.check_target().unwrap_err();
        assert!(e.contains("bytes"), "{e}");
    }

    #[test]
    fn hostile_checkpoints_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let good = checkpoint(dir.path(), &data());
        let bad: Vec<(Checkpoint, &str)> = vec![
            (
                Checkpoint {
                    offset: 8 * MIB + 1,
                    ..good.clone()
                },
                "multiple",
            ),
            (
                Checkpoint {
                    offset: 0,
                    ..good.clone()
                },
                "multiple",
            ),
            (
                Checkpoint {
                    offset: 64 * MIB,
                    ..good.clone()
                },
                "inside",
            ),
            (
                Checkpoint {
                    block_size: 3000,
                    ..good.clone()
                },
                "block size",
            ),
            (
                Checkpoint {
                    window_bytes: 1 << 40,
                    ..good.clone()
                },
                "window",
            ),
            (
                Checkpoint {
                    digest: "zz".into(),
                    ..good.clone()
                },
                "digest",
            ),
            (
                Checkpoint {
                    remote: String::new(),
                    ..good.clone()
                },
                "remote",
            ),
        ];
        for (cp, want) in bad {
            let e = cp.validate().unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        }
        let unknown = serde_json::to_string(&good)
            .unwrap()
            .replace("\"cut\"", "\"extra\":1,\"cut\"");
        assert!(serde_json::from_str::<Checkpoint>(&unknown).is_err());
    }
}
