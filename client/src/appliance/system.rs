//! The few system calls the appliance init needs: mounts, module loading, clock, eject,
//! reboot. libc directly: the appliance has no other init system and these have no
//! well-kept safe wrapper we already depend on.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

fn cstr(s: &str) -> CString {
    // Callers pass literal paths and sysfs names, which never contain NUL.
    CString::new(s).unwrap_or_default()
}

/// Mounts `fstype` at `target` (created if needed). EBUSY (already mounted) is fine.
pub fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
) -> std::io::Result<()> {
    std::fs::create_dir_all(target)?;
    let (s, t, f) = (cstr(source), cstr(target), cstr(fstype));
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call; data is NULL.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, std::ptr::null()) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EBUSY) {
        Ok(())
    } else {
        Err(std::io::Error::new(
            err.kind(),
            format!("mount {fstype} {source} on {target}: {err}"),
        ))
    }
}

/// Unmounts `target`.
pub fn umount(target: &str) -> std::io::Result<()> {
    let t = cstr(target);
    // SAFETY: valid NUL-terminated path.
    if unsafe { libc::umount(t.as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Mounts /proc, /sys, /dev (devtmpfs: built in but not auto-mounted), /run and /tmp.
pub fn mount_basics() -> std::io::Result<()> {
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount("proc", "/proc", "proc", nosuid)?;
    mount("sysfs", "/sys", "sysfs", nosuid)?;
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID)?;
    mount("tmpfs", "/run", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV)?;
    mount("tmpfs", "/tmp", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV)?;
    std::fs::create_dir_all("/run/failback")?;
    Ok(())
}

/// Result of loading one module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleLoad {
    /// Loaded now.
    Loaded,
    /// Already loaded (EEXIST).
    Already,
    /// No such hardware/CPU feature (ENODEV): not for this machine, not an error.
    NotForThisMachine,
    /// Failed with this error.
    Failed(String),
}

/// Loads one module file with finit_module(2).
pub fn load_module(path: &Path) -> ModuleLoad {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) => return ModuleLoad::Failed(format!("{}: {e}", path.display())),
    };
    let params = cstr("");
    // SAFETY: fd is open for the duration of the call; params is a valid empty C string.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    if rc == 0 {
        return ModuleLoad::Loaded;
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EEXIST) => ModuleLoad::Already,
        Some(libc::ENODEV) => ModuleLoad::NotForThisMachine,
        _ => ModuleLoad::Failed(format!("{}: {err}", path.display())),
    }
}

/// Sets the system clock.
pub fn set_clock(t: std::time::SystemTime) -> std::io::Result<()> {
    let d = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| std::io::Error::other("time before 1970"))?;
    let ts = libc::timespec {
        tv_sec: d
            .as_secs()
            .try_into()
            .map_err(|_| std::io::Error::other("time out of range"))?,
        tv_nsec: libc::c_long::from(d.subsec_nanos()),
    };
    // SAFETY: ts is a valid timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Flushes every file system buffer.
pub fn sync() {
    // SAFETY: no arguments.
    unsafe { libc::sync() };
}

/// Unlocks and ejects a CD-ROM (`/dev/sr0`).
pub fn eject(dev: &str) -> std::io::Result<()> {
    const CDROMEJECT: libc::Ioctl = 0x5309;
    const CDROM_LOCKDOOR: libc::Ioctl = 0x5329;
    let f = File::options()
        .read(true)
        .custom_flags_nonblock()
        .open(dev)?;
    // SAFETY: ioctls on an open CD-ROM fd with an integer argument.
    unsafe { libc::ioctl(f.as_raw_fd(), CDROM_LOCKDOOR, 0) };
    // SAFETY: as above.
    if unsafe { libc::ioctl(f.as_raw_fd(), CDROMEJECT, 0) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}
impl NonBlock for std::fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NONBLOCK)
    }
}

/// Reboots (`poweroff = false`) or powers off. Never returns on success.
pub fn reboot(poweroff: bool) -> std::io::Error {
    sync();
    let cmd = if poweroff {
        libc::RB_POWER_OFF
    } else {
        libc::RB_AUTOBOOT
    };
    // SAFETY: reboot(2) with a valid command; we are PID 1 with CAP_SYS_BOOT.
    unsafe { libc::reboot(cmd) };
    std::io::Error::last_os_error()
}

/// Peak resident memory of this process (VmHWM), in KiB.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Redirects stdout and stderr into a pipe whose contents a thread copies to every console.
pub fn tee_stdio(outs: Arc<Mutex<Vec<File>>>) {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return;
    }
    // SAFETY: fds[0] was just returned by pipe2 and is owned by nobody else.
    let mut reader = unsafe { File::from_raw_fd(fds[0]) };
    // SAFETY: duplicating a valid fd onto 1 and 2 (dup2 clears CLOEXEC on the copies).
    unsafe {
        libc::dup2(fds[1], 1);
        libc::dup2(fds[1], 2);
        libc::close(fds[1]);
    }
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // The consoles are ttys with ONLCR: they turn \n into \r\n themselves.
            if let Ok(mut outs) = outs.lock() {
                for o in outs.iter_mut() {
                    let _ = o.write_all(&buf[..n]);
                }
            }
        }
    });
}
