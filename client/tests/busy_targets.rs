//! `failback-client sync` refuses real block devices that are in use: a loop device with a
//! mounted ext4 filesystem (rule `mounted`), in use as swap (rule `swap`), and one whose
//! partition is mounted or is swap (the refusal names the partition). Real kernel state, real
//! agent; exit code 3 and not one byte of the device changed. Image files in use are refused
//! too: the backing file (or device) of a loop device, mounted or not and under any name
//! (symlink, hard link; rule `loop-backing`), and a file or device another process holds open for writing
//! (rule `open-for-writing`, naming the pid). Needs root, losetup, partx,
//! swapon (util-linux), mkfs.ext4 (e2fsprogs) and sfdisk (fdisk): all in `make setup`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{run, text, Env, LoopDev, MIB};

/// The loop devices here are 16 MiB; the source disk is 6 MiB with 512-byte sectors, so the
/// size and sector-size rules pass and only the in-use rule can refuse.
const DEV_SIZE: usize = 16 * MIB;

/// Undoes what a test did to the kernel (umount, swapoff) in reverse order, even when an
/// assertion fails; declared after the `LoopDev` so it runs before the device is detached.
#[derive(Default)]
struct Undo(Vec<Vec<String>>);

impl Undo {
    fn push(&mut self, args: &[&str]) {
        self.0.push(args.iter().map(|a| (*a).to_owned()).collect());
    }
    /// Runs the most recent undo step now (so a later check sees the device released).
    fn pop_now(&mut self) {
        if let Some(step) = self.0.pop() {
            undo_step(&step);
        }
    }
}

fn undo_step(step: &[String]) {
    for attempt in 0..20 {
        match Command::new(&step[0]).args(&step[1..]).output() {
            Ok(o) if o.status.success() => return,
            Ok(o) if attempt == 19 => eprintln!("cleanup {step:?} failed: {}", text(&o)),
            Err(e) => {
                eprintln!("cleanup {step:?} failed: {e}");
                return;
            }
            _ => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        while let Some(step) = self.0.pop() {
            undo_step(&step);
        }
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// A 16 MiB image file (zeros) attached as a loop device.
fn loop_device(env: &Env, name: &str) -> (PathBuf, LoopDev) {
    let img = env.path(name);
    std::fs::File::create(&img)
        .unwrap()
        .set_len(DEV_SIZE as u64)
        .unwrap();
    let lo = LoopDev::attach(&img, &[]);
    (img, lo)
}

/// mkfs.ext4 on `dev` (all inode tables and the journal written now, so no background
/// initialisation writes later) and a read-only mount on a new directory under the temp dir.
/// Read-only so the filesystem itself never writes and the "unchanged" check is exact; a
/// read-only mount is just as much a mount to the rule.
fn mount_ext4(env: &Env, dev: &Path, dir_name: &str, undo: &mut Undo) -> PathBuf {
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg(dev));
    let mnt = env.path(dir_name);
    std::fs::create_dir(&mnt).unwrap();
    run(Command::new("mount")
        .args(["-t", "ext4", "-o", "ro"])
        .arg(dev)
        .arg(&mnt));
    undo.push(&["umount", s(&mnt)]);
    mnt
}

/// Syncs remote disk `d` onto `dev` and asserts the refusal: exit 3, the device and the rule
/// named, every `expect` string in the message.
fn assert_refused(env: &Env, dev: &Path, rule: &str, expect: &[&str]) {
    let o = env.sync(&[("d", dev)], &[]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("refusing target {}", dev.display())),
        "{}",
        text(&o)
    );
    assert!(err.contains(&format!("(rule {rule})")), "{}", text(&o));
    for e in expect {
        assert!(err.contains(e), "message lacks {e:?}: {}", text(&o));
    }
}

#[test]
fn mounted_device_is_refused_and_left_unchanged() {
    let env = Env::new(None);
    let (img, lo) = loop_device(&env, "mounted.img");
    let mut undo = Undo::default();
    let mnt = mount_ext4(&env, &lo.dev, "mnt", &mut undo);
    let before = std::fs::read(&img).unwrap();
    assert!(
        before.iter().any(|b| *b != 0),
        "mkfs.ext4 wrote nothing to {}",
        img.display()
    );

    assert_refused(&env, &lo.dev, "mounted", &[s(&mnt)]);
    // The plan-only run is refused by the same rule.
    let o = env.sync(&[("d", &lo.dev)], &["--dry-run"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(
        std::fs::read(&img).unwrap() == before,
        "refused device was written"
    );

    // Control: unmounted, the same device is accepted and receives the source disk, so the
    // refusal above came from the mount and nothing else.
    undo.pop_now();
    let o = env.sync(&[("d", &lo.dev)], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(std::fs::read(&img).unwrap()[..env.data.len()] == env.data[..]);
}

#[test]
fn swap_device_is_refused_and_left_unchanged() {
    let env = Env::new(None);
    let (img, lo) = loop_device(&env, "swap.img");
    let mut undo = Undo::default();
    // A 40 KiB swap area (the header page + 9 pages) on the 16 MiB device: the kernel may
    // page out into those 9 pages while the test runs, so the check below skips them and
    // compares every other byte.
    run(Command::new("mkswap").arg(&lo.dev).arg("40"));
    let o = Command::new("swapon").arg(&lo.dev).output().unwrap();
    assert!(
        o.status.success(),
        "swapon {} is not permitted here, so the swap rule cannot be tested on a real device: {}",
        lo.dev.display(),
        text(&o)
    );
    undo.push(&["swapoff", s(&lo.dev)]);
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap();
    assert!(swaps.contains(s(&lo.dev)), "{swaps}");
    let before = std::fs::read(&img).unwrap();

    assert_refused(&env, &lo.dev, "swap", &["is active swap"]);
    let after = std::fs::read(&img).unwrap();
    assert!(after[..4096] == before[..4096], "swap header was written");
    assert!(
        after[40 * 1024..] == before[40 * 1024..],
        "refused swap device was written"
    );
}

#[test]
fn device_with_a_mounted_or_swap_partition_is_refused_naming_it() {
    let env = Env::new(None);
    let img = env.path("parts.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(DEV_SIZE as u64)
        .unwrap();
    // p1: 8 MiB Linux, p2: 2 MiB swap.
    let mut sfdisk = Command::new("sfdisk")
        .args(["-q", s(&img)])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("sfdisk (fdisk) is needed");
    use std::io::Write;
    sfdisk
        .stdin
        .take()
        .unwrap()
        .write_all(
            b"label: dos\nstart=2048, size=16384, type=83\nstart=18432, size=4096, type=82\n",
        )
        .unwrap();
    assert!(sfdisk.wait().unwrap().success(), "sfdisk failed");
    let lo = LoopDev::attach(&img, &["--partscan"]);
    // Kernels built without partition-table parsers (CONFIG_MSDOS_PARTITION unset, as on
    // this CI's VM) scan nothing; partx adds the partitions through BLKPG either way.
    run(Command::new("partx").arg("-u").arg(&lo.dev));
    let p1 = PathBuf::from(format!("{}p1", lo.dev.display()));
    let p2 = PathBuf::from(format!("{}p2", lo.dev.display()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(p1.exists() && p2.exists()) {
        assert!(Instant::now() < deadline, "{} did not appear", p2.display());
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut undo = Undo::default();
    let mnt = mount_ext4(&env, &p1, "mnt-p1", &mut undo);
    run(Command::new("mkswap").arg(&p2).arg("40"));
    let before = std::fs::read(&img).unwrap();

    // The whole disk is refused because its partition p1 is mounted: the message names p1.
    assert_refused(&env, &lo.dev, "mounted", &[s(&p1), s(&mnt)]);
    assert!(
        std::fs::read(&img).unwrap() == before,
        "refused device was written"
    );

    // p1 unmounted, p2 active swap: refused naming p2.
    undo.pop_now();
    let o = Command::new("swapon").arg(&p2).output().unwrap();
    assert!(
        o.status.success(),
        "swapon {} is not permitted here: {}",
        p2.display(),
        text(&o)
    );
    undo.push(&["swapoff", s(&p2)]);
    let before = std::fs::read(&img).unwrap();
    assert_refused(
        &env,
        &lo.dev,
        "swap",
        &[&format!("{} on it is active swap", p2.display())],
    );
    let after = std::fs::read(&img).unwrap();
    // p2 starts at byte 18432 * 512; its 9 usable swap pages may be paged into meanwhile.
    let p2_pages = 18432 * 512 + 4096..18432 * 512 + 40 * 1024;
    assert!(after[..p2_pages.start] == before[..p2_pages.start]);
    assert!(
        after[p2_pages.end..] == before[p2_pages.end..],
        "refused device was written"
    );
}

/// Waits until no loop device is backed by `img` any more (`losetup -d` is lazy while udev
/// still has the device open).
fn wait_detached(img: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = run(Command::new("losetup").arg("--associated").arg(img));
        if o.stdout.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} still backs {}",
            img.display(),
            String::from_utf8_lossy(&o.stdout)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn image_backing_a_mounted_loop_device_is_refused_and_left_unchanged() {
    let env = Env::new(None);
    let (img, lo) = loop_device(&env, "fs.img");
    let mut undo = Undo::default();
    let mnt = mount_ext4(&env, &lo.dev, "mnt", &mut undo);
    let before = std::fs::read(&img).unwrap();

    // By its own path and through a symlink (another path, the same file).
    let link = env.path("link.img");
    std::os::unix::fs::symlink(&img, &link).unwrap();
    for target in [&img, &link] {
        assert_refused(&env, target, "loop-backing", &[s(&lo.dev), s(&mnt)]);
    }
    assert!(
        std::fs::read(&img).unwrap() == before,
        "image file under a mounted filesystem was written"
    );

    // Control: unmounted and detached, the same file is an ordinary image and is accepted.
    undo.pop_now();
    drop(lo);
    wait_detached(&img);
    let o = env.sync(&[("d", &img)], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(std::fs::read(&img).unwrap()[..env.data.len()] == env.data[..]);
}

#[test]
fn image_or_device_backing_an_unmounted_loop_device_is_refused_under_any_name() {
    let env = Env::new(None);
    let (img, lo) = loop_device(&env, "backing.img");
    std::fs::write(&img, failback_tests::random_bytes(7, DEV_SIZE)).unwrap();
    let before = std::fs::read(&img).unwrap();
    // A hard link: a different path string, the same inode.
    let hard = env.path("hard.img");
    std::fs::hard_link(&img, &hard).unwrap();
    assert_refused(&env, &hard, "loop-backing", &[s(&lo.dev), "not mounted"]);
    assert!(
        std::fs::read(&img).unwrap() == before,
        "refused image was written"
    );
    // A block device backing a loop device (a loop over the loop device) is refused too.
    let upper = LoopDev::attach(&lo.dev, &[]);
    assert_refused(&env, &lo.dev, "loop-backing", &[s(&upper.dev)]);
    drop(upper);
    assert!(
        std::fs::read(&img).unwrap() == before,
        "refused device was written"
    );
    // A copy with the same bytes is another file: accepted.
    let copy = env.path("copy.img");
    std::fs::copy(&img, &copy).unwrap();
    let o = env.sync(&[("d", &copy)], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// `sh -c 'exec 3<>TARGET; exec sleep 60'` (or `3<` for `read_only`), killed on drop.
struct Holder(std::process::Child);

impl Holder {
    /// Starts the holder and waits until its fd 3 is open on `target`.
    fn open(target: &Path, read_only: bool) -> Self {
        let redirect = if read_only { "3<" } else { "3<>" };
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("exec {redirect}\"$1\"; exec sleep 60"))
            .arg("sh")
            .arg(target)
            .spawn()
            .unwrap();
        let h = Holder(child);
        let want = std::fs::metadata(target).unwrap();
        let fd3 = PathBuf::from(format!("/proc/{}/fd/3", h.0.id()));
        let comm = PathBuf::from(format!("/proc/{}/comm", h.0.id()));
        let deadline = Instant::now() + Duration::from_secs(10);
        use std::os::unix::fs::MetadataExt;
        while !(std::fs::metadata(&fd3).is_ok_and(|m| m.ino() == want.ino())
            && std::fs::read_to_string(&comm).is_ok_and(|c| c.trim() == "sleep"))
        {
            assert!(
                Instant::now() < deadline,
                "holder did not open {}",
                target.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        h
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn target_open_for_writing_by_another_process_is_refused_naming_it() {
    let env = Env::new(None);
    let img = env.path("busy.img");
    std::fs::write(&img, failback_tests::random_bytes(9, DEV_SIZE)).unwrap();
    let before = std::fs::read(&img).unwrap();
    let writer = Holder::open(&img, false);
    let who = format!(
        "process {} (sleep) has it open for writing (fd 3)",
        writer.pid()
    );
    assert_refused(&env, &img, "open-for-writing", &[&who]);
    assert!(
        std::fs::read(&img).unwrap() == before,
        "refused image was written"
    );

    // A block device too: a loop device held open read-write.
    let (_dev_img, lo) = loop_device(&env, "dev.img");
    let dev_writer = Holder::open(&lo.dev, false);
    let who = format!("process {} (sleep)", dev_writer.pid());
    assert_refused(&env, &lo.dev, "open-for-writing", &[&who]);
    drop(dev_writer);

    // Control: writer gone, a reader only: the image is accepted and written.
    drop(writer);
    let _reader = Holder::open(&img, true);
    let o = env.sync(&[("d", &img)], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(std::fs::read(&img).unwrap()[..env.data.len()] == env.data[..]);
}
