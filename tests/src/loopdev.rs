//! Loop devices, ext4, mounts and fsfreeze for privileged tests. Each resource is a
//! guard that undoes itself on drop, also while a test unwinds from a panic, so a
//! failing test leaves no frozen filesystem, mount or attached loop device behind.
//!
//! Declare guards in the order they are made (image, [`LoopDevice`], [`Mount`],
//! [`FreezeGuard`]): Rust drops them in reverse, thawing before unmounting before
//! detaching. A `FreezeGuard` made with [`Mount::freeze`] borrows its mount, so the
//! compiler enforces that order.
//!
//! Callers gate on [`crate::require_privileged`] first; these helpers panic on failure.

use std::io::Write;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::privileged::{find_tool, tool};
use crate::process::{describe, failure_message, run, run_ok};

/// An attached loop device (`losetup --find --show`), detached on drop.
#[derive(Debug)]
pub struct LoopDevice {
    device: PathBuf,
    backing: PathBuf,
    attached: bool,
}

impl LoopDevice {
    /// Attaches `image` read-write to the first free loop device.
    pub fn attach(image: &Path) -> LoopDevice {
        LoopDevice::attach_with(image, &[])
    }

    /// Attaches `image` read-only (`losetup --read-only`).
    pub fn attach_read_only(image: &Path) -> LoopDevice {
        LoopDevice::attach_with(image, &["--read-only"])
    }

    fn attach_with(image: &Path, flags: &[&str]) -> LoopDevice {
        let out = run_ok(
            Command::new(tool("losetup"))
                .args(["--find", "--show"])
                .args(flags)
                .arg(image),
        );
        let device = PathBuf::from(out.trim());
        assert!(
            device.starts_with("/dev"),
            "losetup --find --show {} printed {out:?}, not a device",
            image.display()
        );
        LoopDevice {
            device,
            backing: image.to_path_buf(),
            attached: true,
        }
    }

    /// The device node, e.g. `/dev/loop3`.
    pub fn path(&self) -> &Path {
        &self.device
    }

    /// The backing image file.
    pub fn backing_file(&self) -> &Path {
        &self.backing
    }

    /// Writes the device's dirty page cache through to the backing file, so the file
    /// can be read directly while the device stays attached.
    pub fn flush(&self) {
        let file = std::fs::File::open(&self.device)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.device.display()));
        file.sync_all()
            .unwrap_or_else(|e| panic!("fsync {}: {e}", self.device.display()));
    }

    /// Detaches now, panicking if `losetup -d` fails.
    pub fn detach(mut self) {
        self.attached = false;
        run_ok(Command::new(tool("losetup")).arg("-d").arg(&self.device));
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if self.attached {
            // A trace agent stopped cleanly hands its trace instance over to the next
            // start; nobody will start again on this device, and the next test may
            // get the same device numbers.
            crate::tracefs::SweepInstances::for_device(&self.device).sweep();
            let mut cmd = Command::new(cleanup_tool("losetup"));
            cmd.arg("-d").arg(&self.device);
            warn_unless_ok(&mut cmd);
        }
    }
}

/// Makes an ext4 filesystem on `dev`, with inode tables and journal initialised up
/// front (no `ext4lazyinit` writes behind the test's back after mount) and no discard.
pub fn mkfs_ext4(dev: &Path) {
    run_ok(
        Command::new(tool("mkfs.ext4"))
            .args([
                "-q",
                "-F",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
            ])
            .arg(dev),
    );
}

/// `e2fsck -fn`: a forced, read-only check. `Err` carries the status and output when
/// the filesystem is not clean.
pub fn e2fsck_clean(dev: &Path) -> Result<(), String> {
    let mut cmd = Command::new(tool("e2fsck"));
    cmd.arg("-fn").arg(dev);
    let out = run(&mut cmd);
    if out.status.success() {
        Ok(())
    } else {
        Err(failure_message(&cmd, &out))
    }
}

/// Whether the ext4 image `image` (a crash-consistent copy, its journal possibly
/// holding committed transactions) recovers clean: its journal is replayed
/// (`e2fsck -E journal_only -y`, as a mount would), then `e2fsck -fn` must find
/// nothing. Changes `image`: give it a scratch copy.
pub fn e2fsck_recovers_clean(image: &Path) -> Result<(), String> {
    let mut replay = Command::new(tool("e2fsck"));
    replay.args(["-E", "journal_only", "-y"]).arg(image);
    let out = run(&mut replay);
    if out.status.code().is_none_or(|c| c > 1) {
        return Err(failure_message(&replay, &out));
    }
    e2fsck_clean(image)
}

/// A mounted filesystem, unmounted on drop (lazily if a plain umount fails).
#[derive(Debug)]
pub struct Mount {
    device: PathBuf,
    dir: PathBuf,
    mounted: bool,
}

impl Mount {
    /// Mounts `dev` on `dir` (created if missing), read-only if asked. A read-only ext4
    /// mount still replays a dirty journal unless the device is read-only: use
    /// [`Mount::with_options`] with `ro,noload` to leave the device untouched.
    pub fn new(dev: &Path, dir: &Path, read_only: bool) -> Mount {
        Mount::with_options(dev, dir, if read_only { "ro" } else { "rw" })
    }

    /// Mounts `dev` on `dir` with `-o options`.
    pub fn with_options(dev: &Path, dir: &Path, options: &str) -> Mount {
        std::fs::create_dir_all(dir)
            .unwrap_or_else(|e| panic!("create mount point {}: {e}", dir.display()));
        run_ok(
            Command::new(tool("mount"))
                .args(["-o", options])
                .arg(dev)
                .arg(dir),
        );
        Mount {
            device: dev.to_path_buf(),
            dir: dir.to_path_buf(),
            mounted: true,
        }
    }

    /// The mount point.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The mounted device.
    pub fn device(&self) -> &Path {
        &self.device
    }

    /// Freezes this filesystem until the guard drops.
    pub fn freeze(&self) -> FreezeGuard<'_> {
        FreezeGuard::freeze_dir(&self.dir)
    }

    /// Unmounts now, panicking if `umount` fails.
    pub fn unmount(mut self) {
        self.mounted = false;
        run_ok(Command::new(tool("umount")).arg(&self.dir));
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        let mut cmd = Command::new(cleanup_tool("umount"));
        cmd.arg(&self.dir);
        if !warn_unless_ok(&mut cmd) {
            let mut lazy = Command::new(cleanup_tool("umount"));
            lazy.arg("-l").arg(&self.dir);
            warn_unless_ok(&mut lazy);
        }
    }
}

/// Whether `/proc/self/mountinfo` lists a mount on `dir`. Reads the table instead of
/// `stat`ing `dir`, which fails on a dead FUSE mount and hangs on one whose server is
/// stopped.
pub fn is_mount_point(dir: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .any(|m| Path::new(m) == dir)
}

/// Lazily unmounts (`umount -l`) whatever is still mounted on a directory when
/// dropped: for mounts a test does not make itself, such as the FUSE mount of a disk
/// an agent serves, which a killed agent leaves behind dead.
#[derive(Debug)]
pub struct LazyUnmountGuard(PathBuf);

impl LazyUnmountGuard {
    /// Guards `dir` (it need not be mounted yet, or ever).
    pub fn new(dir: impl Into<PathBuf>) -> LazyUnmountGuard {
        LazyUnmountGuard(dir.into())
    }

    /// The guarded directory.
    pub fn dir(&self) -> &Path {
        &self.0
    }
}

impl Drop for LazyUnmountGuard {
    fn drop(&mut self) {
        if is_mount_point(&self.0) {
            let mut cmd = Command::new(cleanup_tool("umount"));
            cmd.arg("-l").arg(&self.0);
            warn_unless_ok(&mut cmd);
        }
    }
}

/// A frozen filesystem (`fsfreeze -f`), thawed (`fsfreeze -u`) on drop.
#[derive(Debug)]
pub struct FreezeGuard<'m> {
    dir: PathBuf,
    frozen: bool,
    _mount: PhantomData<&'m Mount>,
}

impl FreezeGuard<'static> {
    /// Freezes the filesystem mounted at `mountpoint` (one not owned by a [`Mount`]).
    pub fn freeze(mountpoint: &Path) -> FreezeGuard<'static> {
        FreezeGuard::freeze_dir(mountpoint)
    }
}

impl FreezeGuard<'_> {
    fn freeze_dir<'m>(dir: &Path) -> FreezeGuard<'m> {
        run_ok(Command::new(tool("fsfreeze")).arg("-f").arg(dir));
        FreezeGuard {
            dir: dir.to_path_buf(),
            frozen: true,
            _mount: PhantomData,
        }
    }

    /// The frozen mount point.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Thaws now, panicking if `fsfreeze -u` fails.
    pub fn thaw(mut self) {
        self.frozen = false;
        run_ok(Command::new(tool("fsfreeze")).arg("-u").arg(&self.dir));
    }
}

impl Drop for FreezeGuard<'_> {
    fn drop(&mut self) {
        if self.frozen {
            let mut cmd = Command::new(cleanup_tool("fsfreeze"));
            cmd.arg("-u").arg(&self.dir);
            warn_unless_ok(&mut cmd);
        }
    }
}

/// A tool's path for a `Drop`: never panics, falling back to a `PATH` lookup.
fn cleanup_tool(name: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| PathBuf::from(name))
}

/// Runs a cleanup command from a `Drop`: never panics (a second panic while unwinding
/// would abort and hide the first), reports failure on stderr, returns success.
fn warn_unless_ok(cmd: &mut Command) -> bool {
    match cmd.output() {
        Ok(out) if out.status.success() => true,
        Ok(out) => {
            let _ = writeln!(
                std::io::stderr(),
                "cleanup `{}` failed: {}: {}",
                describe(cmd),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            false
        }
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "cleanup `{}` could not run: {e}",
                describe(cmd)
            );
            false
        }
    }
}
