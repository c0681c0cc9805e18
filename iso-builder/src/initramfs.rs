//! The appliance initramfs: a reproducible newc cpio archive (sorted entries, mtime 0, uid/gid
//! 0, inode numbers by position), zstd-compressed (the Debian kernel has `CONFIG_RD_ZSTD`).
//!
//! Layout: `/init` -> `/bin/failback-client` (the client acts as init when it is PID 1),
//! `/bin/busybox` (+ `/bin/sh`), `/etc/udhcpc.script`, `/lib/modules/<release>/*.ko` with the
//! ordered [`crate::modules::LOAD_LIST`], `/dev/console` (char 5,1: without it the kernel has
//! no console for init and early output is lost), and empty mount points.

use crate::inputs::Inputs;
use crate::modules::{self, Module, APPLIANCE_MODULES, LOAD_LIST};
use crate::{read, Error};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// DHCP client hook for busybox udhcpc (busybox ships none). Configures the interface, the
/// default route and /etc/resolv.conf, and records the lease for the client to report.
pub const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
# udhcpc hook of the failback appliance: $1 is deconfig|bound|renew|leasefail|nak.
BB=/bin/busybox
case "$1" in
deconfig)
	$BB ip -4 addr flush dev "$interface"
	$BB ip link set "$interface" up
	;;
bound|renew)
	$BB ip -4 addr flush dev "$interface"
	$BB ip -4 addr add "$ip/${mask:-24}" dev "$interface"
	if [ -n "$router" ]; then
		for r in $router; do
			$BB ip -4 route replace default via "$r" dev "$interface" && break
		done
	fi
	: > /etc/resolv.conf.dhcp
	[ -n "$domain" ] && echo "search $domain" >> /etc/resolv.conf.dhcp
	for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf.dhcp; done
	echo "interface=$interface ip=$ip mask=${mask:-24} router=$router dns=$dns" > "/run/failback/lease.$interface"
	;;
esac
exit 0
"#;

/// One archive member.
#[derive(Debug, Clone)]
enum Member {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
    CharDev { major: u32, minor: u32, mode: u32 },
}

/// An initramfs under construction; paths are relative (`bin/busybox`), parents implied.
#[derive(Debug, Default)]
pub struct Archive {
    members: BTreeMap<String, Member>,
}

impl Archive {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    fn add(&mut self, path: &str, member: Member) {
        let path = path.trim_start_matches('/');
        let mut parent = String::new();
        for part in path.split('/').take(path.split('/').count() - 1) {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            self.members.entry(parent.clone()).or_insert(Member::Dir);
        }
        self.members.insert(path.to_string(), member);
    }

    /// Adds a directory.
    pub fn dir(&mut self, path: &str) {
        self.add(path, Member::Dir);
    }

    /// Adds a regular file with permission bits `mode`.
    pub fn file(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        self.add(path, Member::File { data, mode });
    }

    /// Adds a symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) {
        self.add(path, Member::Symlink(target.to_string()));
    }

    /// Adds a character device node (no root needed: it is only an archive entry).
    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32, mode: u32) {
        self.add(path, Member::CharDev { major, minor, mode });
    }

    /// Writes the uncompressed newc archive. Entries are sorted by path so that parents come
    /// before children and the output depends only on the content.
    pub fn write_cpio<W: Write>(&self, mut out: W) -> Result<W, Error> {
        let io = |e| Error::io(Path::new("<initramfs>"), e);
        for (i, (path, member)) in self.members.iter().enumerate() {
            let ino = u32::try_from(i + 1).map_err(|_| Error::TooLarge {
                what: "initramfs entry count".into(),
                size: i as u64,
                limit: u64::from(u32::MAX),
            })?;
            let b = cpio::newc::Builder::new(path)
                .ino(ino)
                .mtime(0)
                .uid(0)
                .gid(0);
            let (b, data): (_, &[u8]) = match member {
                Member::Dir => (b.mode(0o040755).nlink(2), &[]),
                Member::File { data, mode } => (b.mode(0o100000 | mode), data),
                Member::Symlink(t) => (b.mode(0o120777), t.as_bytes()),
                Member::CharDev { major, minor, mode } => (
                    b.mode(0o020000 | mode)
                        .rdev_major(*major)
                        .rdev_minor(*minor),
                    &[],
                ),
            };
            let size = u32::try_from(data.len()).map_err(|_| Error::TooLarge {
                what: format!("initramfs file {path}"),
                size: data.len() as u64,
                limit: u64::from(u32::MAX),
            })?;
            let mut w = b.write(out, size);
            w.write_all(data).map_err(io)?;
            out = w.finish().map_err(io)?;
        }
        cpio::newc::trailer(out).map_err(io)
    }

    /// Paths in the archive, sorted.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.members.keys().map(String::as_str)
    }
}

/// What went into an initramfs.
#[derive(Debug, Clone)]
pub struct InitramfsReport {
    /// Modules in load order.
    pub modules: Vec<Module>,
    /// Uncompressed cpio size in bytes.
    pub cpio_bytes: u64,
    /// Compressed size in bytes.
    pub compressed_bytes: u64,
}

/// Builds the zstd-compressed initramfs holding `client` (a static binary) and the inputs.
pub fn build(
    inputs: &Inputs,
    client: &Path,
    info: &str,
) -> Result<(Vec<u8>, InitramfsReport), Error> {
    let mut a = Archive::new();
    for d in [
        "proc", "sys", "dev", "run", "tmp", "mnt/seed", "root", "etc",
    ] {
        a.dir(d);
    }
    a.char_dev("dev/console", 5, 1, 0o600);
    a.char_dev("dev/null", 1, 3, 0o666);
    a.file("bin/failback-client", read(client)?, 0o755);
    a.symlink("init", "bin/failback-client");
    a.file("bin/busybox", read(&inputs.busybox)?, 0o755);
    a.symlink("bin/sh", "busybox");
    a.file(
        "etc/udhcpc.script",
        UDHCPC_SCRIPT.as_bytes().to_vec(),
        0o755,
    );
    a.file("etc/failback-appliance", info.as_bytes().to_vec(), 0o644);
    // musl's resolver reads these itself (no NSS); the client rewrites resolv.conf at boot.
    a.file(
        "etc/hosts",
        b"127.0.0.1 localhost\n::1 localhost\n".to_vec(),
        0o644,
    );
    a.file("etc/resolv.conf", Vec::new(), 0o644);

    let mods = modules::closure(&inputs.modules_dir, APPLIANCE_MODULES)?;
    let moddir = format!("lib/modules/{}", inputs.kernel_release);
    let mut list = String::new();
    for m in &mods {
        let file = format!("{}.ko", m.name);
        a.file(&format!("{moddir}/{file}"), read(&m.path)?, 0o644);
        list.push_str(&file);
        list.push('\n');
    }
    a.file(&format!("{moddir}/{LOAD_LIST}"), list.into_bytes(), 0o644);

    let cpio = a.write_cpio(Vec::new())?;
    let compressed =
        zstd::encode_all(&cpio[..], 19).map_err(|e| Error::io(Path::new("<initramfs zstd>"), e))?;
    let report = InitramfsReport {
        modules: mods,
        cpio_bytes: cpio.len() as u64,
        compressed_bytes: compressed.len() as u64,
    };
    Ok((compressed, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_is_sorted_reproducible_and_has_device_nodes() {
        let mut a = Archive::new();
        a.file("bin/b", b"hello".to_vec(), 0o755);
        a.char_dev("dev/console", 5, 1, 0o600);
        a.symlink("init", "bin/b");
        let one = a.write_cpio(Vec::new()).unwrap();
        let two = a.write_cpio(Vec::new()).unwrap();
        assert_eq!(one, two);
        let paths: Vec<_> = a.paths().collect();
        assert_eq!(paths, ["bin", "bin/b", "dev", "dev/console", "init"]);

        let mut seen = Vec::new();
        let mut rest = &one[..];
        loop {
            let r = cpio::newc::Reader::new(rest).unwrap();
            if r.entry().is_trailer() {
                break;
            }
            let e = r.entry();
            seen.push((
                e.name().to_string(),
                e.mode(),
                e.mtime(),
                e.uid(),
                e.rdev_major(),
                e.rdev_minor(),
            ));
            rest = r.finish().unwrap();
        }
        assert!(seen.iter().all(|s| s.2 == 0 && s.3 == 0));
        let console = seen.iter().find(|s| s.0 == "dev/console").unwrap();
        assert_eq!(
            (console.1 & 0o170000, console.4, console.5),
            (0o020000, 5, 1)
        );
        let init = seen.iter().find(|s| s.0 == "init").unwrap();
        assert_eq!(init.1 & 0o170000, 0o120000);
    }
}
