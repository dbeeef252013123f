//! A power-cut file system for crash tests: a passthrough FUSE mount that remembers
//! what a real disk would still hold in its volatile cache, so a test can "cut the
//! power" and restart a daemon on what an fsync really made durable. `kill -9` alone
//! never tests that: the page cache outlives the process.
//!
//! ```text
//!  <backing>/data/                  the tree the mount shows. Its namespace is the
//!                                   current one; each file's bytes there are its
//!                                   DURABLE bytes (as of its last fsync)
//!  <backing>/.powercut/objects/<n>  Strict only: objects (files, sockets, empty
//!                                   directories) that were unlinked, rmdir'ed or
//!                                   renamed over while a not-yet-synced directory
//!                                   still names them; they come back on a cut
//!  memory, per inode                the overlay: an extent map of unsynced writes
//!                                   (and hole punches) plus the pending length of
//!                                   truncates and extends; reads merge it over the
//!                                   backing file
//!  memory, per dirty directory      Strict only: the entries it had at its last
//!                                   fsyncdir (taken at its first change since)
//! ```
//!
//! What is durable when (what survives [`PowerCutFs::cut`] with [`CutMode::DropAll`]):
//!
//! ```text
//!  operation                        seen on the mount   survives a cut once ...
//!  write, pwrite (sparse too),      at once             fsync/fdatasync of that file
//!    truncate, fallocate                                  (or the fd is O_SYNC/O_DSYNC)
//!  create, mkdir, mknod, symlink    at once             Strict: fsyncdir of the parent
//!  unlink, rmdir                    at once             Strict: fsyncdir of the parent;
//!                                                         until then a cut brings the
//!                                                         object back, durable bytes only
//!  rename                           at once             Strict: fsyncdir of both parents
//!                                                         (only the new one synced: the
//!                                                         object keeps both names)
//!  chmod, chown, utimes             at once             at once
//!  Lenient: every namespace op      at once             at once
//!
//!  write(f) ──► overlay[f] ──fsync(f)──► data/f ──────────────────► survives
//!      └──────────────── cut ──► dropped (KeepSome: each extent kept or not)
//!  create(d/f) ──► data/d/f, d dirty ──fsyncdir(d)──► d clean ─────► survives
//!      └──────────────── cut ──► d back to its entries at its last fsyncdir
//! ```
//!
//! [`Namespace::Strict`] is POSIX read literally: an entry survives only through an
//! fsync of its directory, even where ext4 would have committed it along with the
//! file's fsync. [`Namespace::Lenient`] makes every namespace change durable at once,
//! roughly ext4 `data=ordered`, whose journal commits renames in order within seconds;
//! only file data waits for fsync there. Code that survives Strict survives both.
//!
//! A cut ([`PowerCutFs::cut`]) also kills every file and directory handle opened
//! before it: each later operation on one (read, write, fsync, fdatasync, ftruncate,
//! fallocate, readdir, fsync of a directory, close) returns `EIO`, as for a process
//! that lost power with the disk (`fstat` still answers: the kernel asks for it by
//! inode, not by handle). New opens see the surviving state. The typical flow: start a daemon on the mount, let it work,
//! `kill -9` it, `cut`, start it again on the same mount, check that nothing it
//! acknowledged is lost.
//!
//! Fault hooks: [`PowerCutFs::fail_next_fsync`] makes one fsync fail with `EIO` and
//! drop that file's unsynced data (as Linux does after a writeback error), and
//! [`PowerCutFs::set_full`] makes writes and creates return `ENOSPC`.
//!
//! Kernel caching is off where it would hold data the fs is going to drop: files are
//! opened `FOPEN_DIRECT_IO` and entry and attribute TTLs are 0. Consequences: shared
//! writable `mmap` of a file fails (`ENODEV`); `sync(2)`/`syncfs` make nothing durable
//! (FUSE has no such request), only fsync does; hard links (`link`) are refused with
//! `EPERM` (the inode table maps one path to one inode; a cut that leaves a file two
//! names, after a half-synced cross-directory rename, makes them two inodes here, so
//! unsynced writes through one name do not show through the other). `fallocate`
//! allocation only sets the length; `PUNCH_HOLE | KEEP_SIZE` and `ZERO_RANGE` are
//! unsynced changes like writes; collapse and insert range return `EOPNOTSUPP`. Not
//! supported either: `RENAME_EXCHANGE`/`RENAME_WHITEOUT` (`EINVAL`), xattrs
//! (`EOPNOTSUPP` from the kernel). `flock` and POSIX locks are kept by the kernel,
//! locally, as on any FUSE mount without lock support. Unsynced data is held in
//! memory: fine for state directories, not for gigabytes.
//!
//! Inside: `overlay` (unsynced file data), `tree` (inodes and handles),
//! `state` (every request), `cut` (the power cut), `volume` (the FUSE adapter),
//! `sys` (libc calls std lacks).
//!
//! Callers gate on [`require_power_cut`] first (root and a usable `/dev/fuse`).

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use fuser::{BackgroundSession, Config, INodeNo, MountOption};

use crate::loopdev::is_mount_point;
use crate::privileged::{privileged_tests_required, require_privileged, Need, PRIVILEGED_ENV};

use overlay::Overlay;
use state::{Shared, State};
use sys::cpath;
use volume::Volume;

mod cut;
mod overlay;
mod state;
mod sys;
mod tree;
mod volume;

/// The kernel caches no entry or attribute: after a cut, names and sizes must come
/// from us again.
const TTL: Duration = Duration::ZERO;
/// The exposed tree inside the backing directory.
const DATA_DIR: &str = "data";
/// Private state inside the backing directory, never exposed.
const PRIVATE_DIR: &str = ".powercut";
/// Objects kept for a cut to bring back (under [`PRIVATE_DIR`]).
const OBJECTS_DIR: &str = "objects";
const ROOT: u64 = INodeNo::ROOT.0;
const FS_NAME: &str = "powercut";

/// How namespace changes (create, mkdir, mknod, symlink, unlink, rmdir, rename) become
/// durable; see the module doc.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Namespace {
    /// A change to a directory's entries survives a cut only if that directory was
    /// fsynced (`fsyncdir`) after it; otherwise the cut reverts the directory to its
    /// entries as of its last fsync: new names disappear, removed ones come back with
    /// their durable content, renames go back to the old name.
    #[default]
    Strict,
    /// Namespace changes are durable as soon as they return; only file data (and
    /// sizes) wait for fsync.
    Lenient,
}

/// Options of [`PowerCutFs::mount`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PowerCutOptions {
    /// Default: [`Namespace::Strict`].
    pub namespace: Namespace,
}

/// What a power cut keeps of what was not yet durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutMode {
    /// Drop every unsynced write and truncate; revert every directory not synced since
    /// its last change (Strict).
    DropAll,
    /// A disk cache that reorders: each unsynced write extent is kept or dropped
    /// independently (coin flips from `seed`), each file's pending size change too,
    /// and in Strict mode each unsynced directory either keeps its current entries or
    /// reverts. The seed is printed and returned in the [`CutReport`]. Of a byte
    /// written twice since the last fsync only the newest value can survive. A kept
    /// size change without its bytes leaves zeros (the tail of zeros ext4
    /// `data=writeback` or old XFS show after a crash): readers must check what they
    /// did not fsync.
    KeepSome {
        /// Seed of the coin flips; the same seed on the same history keeps the same.
        seed: u64,
    },
}

/// What a cut kept and dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CutReport {
    /// The generation after the cut (1 after the first).
    pub generation: u64,
    /// The seed of a [`CutMode::KeepSome`] cut.
    pub seed: Option<u64>,
    /// Unsynced write extents (and hole punches) kept.
    pub extents_kept: usize,
    /// Unsynced write extents dropped.
    pub extents_dropped: usize,
    /// Bytes of the kept extents.
    pub bytes_kept: u64,
    /// Bytes of the dropped extents.
    pub bytes_dropped: u64,
    /// Strict: unsynced directories put back to their entries at their last fsync.
    pub dirs_reverted: usize,
    /// Strict: unsynced directories that kept their current entries (KeepSome only).
    pub dirs_kept: usize,
}

/// What is not yet durable, as [`PowerCutFs::unsynced`] reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Unsynced {
    /// Files with unsynced writes or size changes.
    pub files: usize,
    /// Unsynced write extents.
    pub extents: usize,
    /// Bytes in them.
    pub bytes: u64,
    /// Strict: directories changed since their last fsync.
    pub dirty_dirs: usize,
}

/// Gates a power-cut test: root and a usable `/dev/fuse` (after trying `modprobe
/// fuse`). Returns `true` when both hold; otherwise prints `SKIPPED <test>: <reason>`
/// and returns `false`, or panics when `BOOMERANG_PRIVILEGED_TESTS=1`, like
/// [`require_privileged`].
pub fn require_power_cut(test: &str) -> bool {
    if !require_privileged(test, &[Need::Root]) {
        return false;
    }
    let Err(why) = fuse_usable() else {
        return true;
    };
    if privileged_tests_required() {
        panic!("{test}: {PRIVILEGED_ENV}=1 but a prerequisite is missing: Fuse: {why}");
    }
    let line =
        format!("SKIPPED {test}: Fuse: {why} (set {PRIVILEGED_ENV}=1 to make this a failure)");
    println!("{line}");
    let _ = writeln!(io::stderr(), "{line}");
    false
}

/// Whether FUSE mounts can be made here: `/dev/fuse` opens read-write and the kernel
/// knows the `fuse` file system type. The error says what is missing.
pub fn fuse_usable() -> Result<(), String> {
    let dev = Path::new("/dev/fuse");
    if !dev.exists() {
        if let Some(modprobe) = crate::privileged::find_tool("modprobe") {
            let _ = std::process::Command::new(modprobe)
                .arg("fuse")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .map_err(|e| format!("cannot open /dev/fuse read-write: {e}"))?;
    let known = fs::read_to_string("/proc/filesystems")
        .map_err(|e| format!("cannot read /proc/filesystems: {e}"))?;
    if !known
        .lines()
        .any(|l| l.split_whitespace().last() == Some("fuse"))
    {
        return Err("the kernel lists no `fuse` file system in /proc/filesystems".into());
    }
    Ok(())
}

/// A mounted power-cut file system; unmounts on drop (lazily if it is busy), also
/// while a test unwinds from a panic.
#[derive(Debug)]
pub struct PowerCutFs {
    mountpoint: PathBuf,
    data: PathBuf,
    shared: Arc<Shared>,
    session: Option<BackgroundSession>,
}

impl PowerCutFs {
    /// Mounts a power-cut view of `<backing>/data` (created if missing) on `mountpoint`
    /// (created if missing). Whatever `<backing>/data` holds at mount is durable;
    /// `<backing>/.powercut` is private and cleared of an earlier mount's leftovers.
    pub fn mount(
        backing: &Path,
        mountpoint: &Path,
        opts: PowerCutOptions,
    ) -> anyhow::Result<PowerCutFs> {
        let data = backing.join(DATA_DIR);
        fs::create_dir_all(&data).with_context(|| format!("create {}", data.display()))?;
        let objects = backing.join(PRIVATE_DIR).join(OBJECTS_DIR);
        if objects.exists() {
            fs::remove_dir_all(&objects)
                .with_context(|| format!("clear leftovers in {}", objects.display()))?;
        }
        fs::create_dir_all(&objects).with_context(|| format!("create {}", objects.display()))?;
        let data = data
            .canonicalize()
            .with_context(|| format!("resolve {}", data.display()))?;
        let objects = objects
            .canonicalize()
            .with_context(|| format!("resolve {}", objects.display()))?;
        fs::create_dir_all(mountpoint)
            .with_context(|| format!("create mount point {}", mountpoint.display()))?;
        let mountpoint = mountpoint
            .canonicalize()
            .with_context(|| format!("resolve {}", mountpoint.display()))?;
        if mountpoint.starts_with(&data) || data.starts_with(&mountpoint) {
            bail!(
                "mount point {} and backing {} must not contain each other",
                mountpoint.display(),
                data.display()
            );
        }

        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(data.clone(), objects, opts.namespace)),
        });
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName(FS_NAME.into()),
            // The kernel checks permissions from our modes, as on a real disk.
            MountOption::DefaultPermissions,
        ];
        config.n_threads = Some(2);
        let volume = Volume {
            shared: Arc::clone(&shared),
        };
        // mount(2) on /dev/fuse (no libfuse) and the INIT handshake happen here; the
        // request loop runs on fuser's background threads.
        let session = fuser::spawn_mount(volume, &mountpoint, &config)
            .with_context(|| format!("mount FUSE on {}", mountpoint.display()))?;
        let fs = PowerCutFs {
            mountpoint,
            data,
            shared,
            session: Some(session),
        };
        if !is_mount_point(&fs.mountpoint) {
            bail!(
                "mounted {} but /proc/self/mountinfo does not list it",
                fs.mountpoint.display()
            );
        }
        Ok(fs)
    }

    /// The (canonical) mount point.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// `rel` under the mount point.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.mountpoint.join(rel)
    }

    /// `<backing>/data`: the current namespace with each file's durable bytes. Read it
    /// only while no cut or daemon runs.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Cuts the power: see [`CutMode`]. Handles opened before return `EIO` from now on.
    /// A cut that fails halfway leaves the fs unusable (every operation `EIO`).
    pub fn cut(&self, mode: CutMode) -> anyhow::Result<CutReport> {
        let mut state = self.shared.lock();
        if let Some(why) = &state.poisoned {
            bail!("power-cut fs unusable since an earlier failure: {why}");
        }
        match state.cut(mode) {
            Ok(report) => {
                let line = format!("powercut: cut {mode:?} -> {report:?}");
                // Captured, so shown with a failing test's output.
                println!("{line}");
                if matches!(mode, CutMode::KeepSome { .. }) {
                    // A seed must be seen even where the output is not: past the capture.
                    let _ = writeln!(io::stderr(), "{line}");
                }
                Ok(report)
            }
            Err(e) => {
                state.poisoned = Some(format!("{e:#}"));
                Err(e.context(format!("power cut {mode:?}")))
            }
        }
    }

    /// The number of cuts so far (0 after mount).
    pub fn generation(&self) -> u64 {
        self.shared.lock().generation
    }

    /// Whether the fs still serves: mounted, its session running, no failed cut.
    pub fn usable(&self) -> bool {
        let serving = self
            .session
            .as_ref()
            .is_some_and(|s| !s.guard.is_finished());
        serving && self.shared.lock().poisoned.is_none() && is_mount_point(&self.mountpoint)
    }

    /// What a cut would drop now (with [`CutMode::DropAll`]).
    pub fn unsynced(&self) -> Unsynced {
        let state = self.shared.lock();
        Unsynced {
            files: state.overlays.len(),
            extents: state.overlays.values().map(|o| o.extents.len()).sum(),
            bytes: state.overlays.values().map(Overlay::bytes).sum(),
            dirty_dirs: state.dirty.len(),
        }
    }

    /// Makes the next fsync/fdatasync of a file whose path under the mount ends with
    /// `path_suffix` fail with `EIO` and lose that file's unsynced data, as Linux does
    /// after a writeback error: a retried fsync then succeeds with the data gone.
    pub fn fail_next_fsync(&self, path_suffix: &str) {
        self.shared
            .lock()
            .failing_fsyncs
            .push(path_suffix.to_string());
    }

    /// While `full`, writes, extending fallocates and creates return `ENOSPC`.
    pub fn set_full(&self, full: bool) {
        self.shared.lock().full = full;
    }

    /// Unmounts now; `Err` if the mount was busy (it is then detached lazily).
    pub fn unmount(mut self) -> anyhow::Result<()> {
        self.unmount_now()
    }

    fn unmount_now(&mut self) -> anyhow::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        // A clean umount ends the session, whose threads then exit and are joined.
        match session.umount_and_join() {
            Ok(()) => Ok(()),
            Err(e) if !is_mount_point(&self.mountpoint) => {
                Err(anyhow::Error::new(e).context("FUSE session ended with an error"))
            }
            Err(e) => {
                // Busy: something still has a file or its cwd here. Detach the mount;
                // the session ends when its last user lets go.
                let detached = lazy_unmount(&self.mountpoint);
                Err(anyhow::anyhow!(
                    "unmount {}: {e}; lazy unmount: {}",
                    self.mountpoint.display(),
                    match detached {
                        Ok(()) => "done".to_string(),
                        Err(e) => format!("failed too: {e}"),
                    }
                ))
            }
        }
    }
}

impl Drop for PowerCutFs {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_now() {
            // Never panic here: a second panic while unwinding would abort.
            let _ = writeln!(io::stderr(), "powercut: {e:#}");
        }
    }
}

fn lazy_unmount(dir: &Path) -> io::Result<()> {
    let c = cpath(dir)?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call; umount2 reads it
    // and touches no other memory of ours.
    let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
