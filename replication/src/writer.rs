//! The local target: opened once per sync, read for hashing, written only with verified runs.
//!
//! The first [`HEAD_BYTES`] of the disk (MBR/GPT, boot loader) are held back in memory and written
//! last, after everything else is written and flushed, so an interrupted sync never leaves a disk
//! that boots half-written data.
//!
//! Runs are written with `O_DIRECT` where the target takes it (block devices, ext4, XFS) and
//! the blocks sit page-aligned in memory (the frame reader reads long runs' payloads there, see
//! [`crate::conn::FrameReader::align_blocks`]; [`crate::block::verify_run`] copies what is not):
//! the bytes go from that buffer to the device, with none of the page-cache copy, dirty-page
//! accounting and later writeback a buffered write costs (a third of the client's CPU in a
//! 4 GiB full sync, measured), and a whole-disk restore does not evict everything else from
//! the appliance's small memory. Otherwise (tmpfs, short delta runs, an odd-sized image's tail,
//! the held-back head) writes are buffered. `finish` flushes with `fdatasync` (which covers the
//! direct writes too: same inode or device) before the head goes out.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::block::{Piece, VerifiedRun, MAX_BLOCK_SIZE};
use crate::device::{self, Kind};
use crate::error::{Error, Result};
use crate::pool::{is_direct_aligned, DIRECT_ALIGN};

/// Bytes at the start of the disk written last.
pub const HEAD_BYTES: u64 = 1024 * 1024;
/// Pieces of the first [`HEAD_BYTES`] held back in memory: `(offset, bytes)`.
pub type Head = Vec<(u64, Vec<u8>)>;
/// Writeback window: every this many bytes written, `sync_file_range(WRITE)` starts writeback of
/// the new range and the range one window earlier (by then written back) is dropped from the page
/// cache with `posix_fadvise(DONTNEED)`. Like nbdcopy: the writer never blocks on dirty-page
/// throttling, the page cache is not flooded, and the final flush has little left to do.
const WRITEBACK_WINDOW: u64 = 32 * 1024 * 1024;

/// A local target disk or image file.
#[derive(Debug)]
pub struct Target {
    path: PathBuf,
    file: File,
    /// Bytes that exist locally before the sync (beyond: reads as zeros).
    local_len: u64,
}

fn io_err(op: &'static str, path: &Path, offset: u64) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::LocalIo {
        op,
        path,
        offset,
        source,
    }
}

impl Target {
    /// Opens `path` for reading (estimate) or reading and writing. A missing file is created
    /// (write mode only); a file shorter than `size` is extended (sparse). Block devices are
    /// never resized. Safety checks (size, mounts, ...) are the caller's job and happen first.
    pub fn open(path: &Path, size: u64, write: bool) -> Result<Self> {
        let exists = path.exists();
        if !exists && !write {
            // Estimating against a target that does not exist yet: everything differs.
            let file = File::open("/dev/null").map_err(io_err("open", path, 0))?;
            return Ok(Target {
                path: path.to_owned(),
                file,
                local_len: 0,
            });
        }
        let before = if exists {
            Some(device::inspect(path).map_err(io_err("inspect", path, 0))?)
        } else {
            None
        };
        let is_block = before.as_ref().is_some_and(|i| i.kind == Kind::BlockDevice);
        let mut oo = OpenOptions::new();
        oo.read(true)
            .write(write)
            .create(write && !exists)
            .truncate(false);
        if write && is_block {
            // O_EXCL on a block device: the kernel refuses (EBUSY) while it is mounted or held,
            // a last line of defence behind the target safety checks.
            oo.custom_flags(libc::O_EXCL);
        }
        let file = oo.open(path).map_err(|source| {
            if source.raw_os_error() == Some(libc::EBUSY) {
                Error::TargetBusy {
                    path: path.to_owned(),
                }
            } else {
                Error::LocalIo {
                    op: "open",
                    path: path.to_owned(),
                    offset: 0,
                    source,
                }
            }
        })?;
        let info = device::inspect(path).map_err(io_err("inspect", path, 0))?;
        let local_len = info.size;
        if write && info.kind == Kind::File && info.size < size {
            file.set_len(size).map_err(io_err("extend", path, size))?;
        }
        Ok(Target {
            path: path.to_owned(),
            file,
            local_len,
        })
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads `buf.len()` bytes at `offset`; bytes beyond the pre-sync local length read as zero.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let have = self.local_len.saturating_sub(offset);
        let n = usize::try_from(have.min(buf.len() as u64)).unwrap_or(buf.len());
        self.file
            .read_exact_at(&mut buf[..n], offset)
            .map_err(io_err("read", &self.path, offset))?;
        buf[n..].fill(0);
        Ok(())
    }

    /// True when `offset` lies beyond what existed locally (no read needed).
    pub fn is_beyond_local(&self, offset: u64) -> bool {
        offset >= self.local_len
    }

    /// A writer for this target (a second handle to the same file, and one opened with
    /// `O_DIRECT` if the target takes it).
    pub fn writer(&self) -> Result<DiskWriter> {
        let file = self
            .file
            .try_clone()
            .map_err(io_err("dup", &self.path, 0))?;
        Ok(DiskWriter {
            direct: open_direct(&self.path),
            path: self.path.clone(),
            file,
            head: Vec::new(),
            written: 0,
            pending: Vec::new(),
            pending_bytes: 0,
            started: Vec::new(),
            // Only regular files and block devices take the hints (not /dev/null etc.).
            hints: matches!(
                device::inspect(&self.path).map(|i| i.kind),
                Ok(Kind::File | Kind::BlockDevice)
            ),
        })
    }
}

/// A second handle with `O_DIRECT`; `None` when the target refuses it (tmpfs, pipes). No
/// `O_EXCL`: the first handle already holds a block device exclusively.
fn open_direct(path: &Path) -> Option<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| tracing::debug!("no O_DIRECT on {}: {e}", path.display()))
        .ok()
}

/// Writes verified runs to one disk; one per disk, driven by one task.
#[derive(Debug)]
pub struct DiskWriter {
    path: PathBuf,
    file: File,
    /// The `O_DIRECT` handle, if the target takes it.
    direct: Option<File>,
    head: Head,
    written: u64,
    /// Extents written since writeback was last started (start, end), adjacent ones merged;
    /// exact extents, so a delta round never drops pages it did not write.
    pending: Vec<(u64, u64)>,
    /// Bytes in `pending`.
    pending_bytes: u64,
    /// Extents whose writeback was started last; dropped from the cache at the next window.
    started: Vec<(u64, u64)>,
    /// False when the target does not support the hints (tmpfs, pipes): skip them.
    hints: bool,
}

/// The client reads its targets with cache-sized `pread`s, never through a memory map: the
/// map looked cheaper in the hashing thread's own CPU time, but the client's other threads
/// (receiving, verifying, writing) share its address space, every unmapped batch interrupts them
/// to flush their TLBs, and hashing straight from DRAM suffered most from the agent streaming
/// its disk at the same time (measured on a 1 % delta of 4 GiB, seven runs each: 1.06-1.13 s
/// reading against 1.03-1.38 s mapping, and the agent used less CPU beside the reading client).
impl crate::scan::Source for Target {
    type Error = Error;
    fn map(&self, _offset: u64, _len: usize) -> Option<crate::mapped::Mapped> {
        None
    }
    fn mappable(&self) -> bool {
        false
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_at(buf, offset)
    }
}

impl DiskWriter {
    /// True when runs can go to the disk with `O_DIRECT` (then verify them `aligned`).
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Writes a verified run (the part inside the first MiB is held back for [`finish`]).
    ///
    /// [`finish`]: DiskWriter::finish
    pub fn write(&mut self, run: VerifiedRun) -> Result<()> {
        let mut offset = run.offset();
        let zeros = zero_block();
        let mut slices: Vec<&[u8]> = Vec::with_capacity(run.pieces().len());
        for p in run.pieces() {
            match p {
                Piece::Data(b) => slices.push(b),
                Piece::Zero(n) => {
                    let mut left = *n;
                    while left > 0 {
                        let k = left.min(zeros.len());
                        slices.push(&zeros[..k]);
                        left -= k;
                    }
                }
            }
        }
        // Hold back whatever falls into the head.
        let mut first = 0;
        while first < slices.len() && offset < HEAD_BYTES {
            let s = slices[first];
            let head_len = usize::try_from(HEAD_BYTES - offset)
                .unwrap_or(usize::MAX)
                .min(s.len());
            self.head.push((offset, s[..head_len].to_vec()));
            offset += head_len as u64;
            if head_len == s.len() {
                first += 1;
            } else {
                slices[first] = &s[head_len..];
            }
        }
        let slices = &slices[first..];
        let len: u64 = slices.iter().map(|s| s.len() as u64).sum();
        if len > 0
            && offset.is_multiple_of(DIRECT_ALIGN as u64)
            && slices.iter().all(|s| is_direct_aligned(s))
        {
            if let Some(d) = &self.direct {
                match write_all_vectored_at(d, slices, offset) {
                    Ok(()) => {
                        self.written += len;
                        return Ok(());
                    }
                    // A target with stricter alignment rules: buffered from now on.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        tracing::debug!("O_DIRECT write to {} refused: {e}", self.path.display());
                        self.direct = None;
                    }
                    Err(e) => return Err(io_err("write", &self.path, offset)(e)),
                }
            }
        }
        if len > 0 {
            write_all_vectored_at(&self.file, slices, offset)
                .map_err(io_err("write", &self.path, offset))?;
            self.written += len;
            let end = offset + len;
            match self.pending.last_mut() {
                Some(last) if last.1 == offset => last.1 = end,
                _ => self.pending.push((offset, end)),
            }
            self.pending_bytes += len;
            if self.pending_bytes >= WRITEBACK_WINDOW {
                self.writeback();
            }
        }
        Ok(())
    }

    /// Starts writeback of what was written since the last call and drops the previous
    /// batch (written back by now) from the page cache, so a full sync neither floods the
    /// cache nor leaves all the flushing to the final `fsync`.
    fn writeback(&mut self) {
        use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
        let older = std::mem::replace(&mut self.started, std::mem::take(&mut self.pending));
        self.pending_bytes = 0;
        if !self.hints {
            return;
        }
        for &(s, e) in self.started.iter().chain(&older) {
            let (Ok(off), Ok(len)) = (i64::try_from(s), i64::try_from(e - s)) else {
                continue;
            };
            if let Err(e) = posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&self.file),
                off,
                len,
                PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            ) {
                tracing::debug!("posix_fadvise on {} unsupported: {e}", self.path.display());
                self.hints = false;
                return;
            }
        }
    }

    /// The held-back head, taken out (a round that stops without committing keeps it for a
    /// resume: it was verified but is not on the disk).
    pub fn take_head(&mut self) -> Head {
        std::mem::take(&mut self.head)
    }

    /// Holds back `head` (from an interrupted round) as if its pieces had been written first.
    pub fn hold_head(&mut self, head: Head) {
        let mut head = head;
        head.append(&mut self.head);
        self.head = head;
    }

    pub fn finish(mut self) -> Result<u64> {
        self.file
            .sync_data()
            .map_err(io_err("flush", &self.path, 0))?;
        for (offset, data) in std::mem::take(&mut self.head) {
            self.file
                .write_all_at(&data, offset)
                .map_err(io_err("write", &self.path, offset))?;
            self.written += data.len() as u64;
        }
        self.file
            .sync_all()
            .map_err(io_err("sync", &self.path, 0))?;
        Ok(self.written)
    }
}

/// A block of zeros to write zero blocks from (allocated once, page-aligned for `O_DIRECT`;
/// untouched pages cost nothing).
fn zero_block() -> &'static [u8] {
    static ZEROS: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    static ALIGNED_ZEROS: std::sync::OnceLock<Option<memmap2::Mmap>> = std::sync::OnceLock::new();
    if let Some(m) = ALIGNED_ZEROS.get_or_init(|| {
        memmap2::MmapMut::map_anon(MAX_BLOCK_SIZE as usize)
            .and_then(|m| m.make_read_only())
            .ok()
    }) {
        return m;
    }
    ZEROS.get_or_init(|| vec![0u8; MAX_BLOCK_SIZE as usize])
}

/// `pwritev` until every slice is written: the blocks of a run go to the disk straight from the
/// received frame, without first being copied into one buffer.
fn write_all_vectored_at(
    file: &File,
    mut slices: &[&[u8]],
    mut offset: u64,
) -> std::io::Result<()> {
    use std::io::IoSlice;
    /// Stay under IOV_MAX (1024 on Linux).
    const MAX_IOV: usize = 512;
    let mut skip = 0usize; // bytes of slices[0] already written
    while !slices.is_empty() {
        let iov: Vec<IoSlice<'_>> = slices
            .iter()
            .take(MAX_IOV)
            .enumerate()
            .map(|(i, s)| IoSlice::new(if i == 0 { &s[skip..] } else { s }))
            .collect();
        let off = i64::try_from(offset)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "offset"))?;
        let mut n = match nix::sys::uio::pwritev(file, &iov, off) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        offset += n as u64;
        while n > 0 {
            let left = slices[0].len() - skip;
            if n >= left {
                n -= left;
                slices = &slices[1..];
                skip = 0;
            } else {
                skip += n;
                n = 0;
            }
        }
    }
    Ok(())
}
