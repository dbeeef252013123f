//! The intercept capture source (DESIGN.md source 3, issue 3 item 2): the agent serves
//! the protected disk to the workload itself, as the one file of a FUSE mount, and a
//! loop device or a hypervisor uses that file. Every write is applied to the backing
//! disk and captured into the agent's [`Journal`](crate::journal::Journal) *before* it
//! is acknowledged, in the order it was applied, so any tag appended to the journal is
//! a crash-consistent cut without pausing writes.
//!
//! ```text
//!  workload ─▶ ext4 ─▶ /dev/loopN ─▶ <mountpoint>/<file> ─FUSE─▶ Intercept
//!                                                                 │ capture lock:
//!                                                                 │ 1. pwrite backing disk
//!                                                                 │ 2. journal (or bitmap)
//!                                                                 ▼ 3. reply "written"
//! ```
//!
//! # Write order: backing disk first, then the journal
//! Both steps happen under one lock, the [`Capture`] mutex, so the journal's order is
//! the order the writes reached the backing disk. A single mutex serializes writes;
//! both steps are page-cache copies, and the FUSE round trip dominates: measured through
//! a loop device (fio, `intercept_throughput` in the tests, 2 shared cores), 4 KiB
//! random writes lose 0 to 15% against the uncaptured passthrough, and 1 MiB
//! sequential writes about a quarter, to the journal's extra copy, crc and write-back.
//! The backing disk comes first because:
//! - A write that fails on the backing disk is never journaled: the writer gets the
//!   error and the replica never receives bytes the source does not have. Had the
//!   journal come first, a record could not be taken back, and the replica would hold
//!   a write the source refused. (Blocks a failed write may have partly changed are
//!   marked in the bitmap, so they ship as they are on the disk.)
//! - Bitmap mode reads a dirty block's content from the backing disk when it ships
//!   it; a block is marked only after the write is on the disk (the rule of
//!   [`CaptureState`](crate::journal::CaptureState)).
//! - A crash between the two steps leaves a write on the disk that the journal lacks.
//!   That write was never acknowledged, and the agent treats any unclean stop as a new
//!   generation with a resync by scan, which reads it from the disk. Journal-first
//!   would instead leave a journaled write the disk may lack, which the same resync
//!   also repairs: the crash case does not decide, the error case does.
//!
//! A journal that is full drops the disk to bitmap mode ([`Capture::record_write`]):
//! the write is still applied and acknowledged, only its order is lost, and no
//! crash-consistent tag may be emitted until the shipper has caught up. A journal that
//! fails otherwise does the same and sets [`Capture::resync_reason`].
//!
//! # Discards and zero-outs
//! A loop device over the served file turns the file system's discards (mount `-o
//! discard`, `fstrim`) into `fallocate(PUNCH_HOLE | KEEP_SIZE)` and its write-zeroes
//! into `fallocate(ZERO_RANGE)` or a punch. Both are served like a write, under the
//! capture lock: the same fallocate on the backing disk (a block device zeroes the
//! range out; where the backing disk has no such fallocate, zeros are written), then a
//! zero record in the journal ([`Capture::record_zero`]), in order with the writes,
//! shipped as zero extents; only then is the writer answered. Other fallocate modes
//! (allocate, grow, collapse, insert) are refused with EOPNOTSUPP.
//!
//! # Flush and fsync
//! flush, fsync and fsyncdir from the writer fdatasync the backing disk and then sync
//! the journal ([`Capture::sync`]); a timer also syncs the journal
//! ([`InterceptOptions::journal_sync_interval`]). The writer's result is the backing
//! disk's: its data is where it asked. The kernel side stays write-through: fuser asks
//! for no writeback cache, so the kernel never acknowledges a write before we have.
//! Reads are served from the backing disk.
//!
//! # Mount lifecycle
//! [`Intercept::start`] refuses a mount point holding a dead FUSE mount (`stat` fails
//! with `ENOTCONN`: a killed agent's mount) with the `umount -l` to run, and one
//! already serving a FUSE file system (another agent). [`Intercept::stop`] (and
//! `Drop`, on the SIGTERM path) unmounts, waits for the FUSE session to end, and syncs
//! the backing disk and the journal. While a loop device or a process still holds the
//! file, the unmount is retried for [`InterceptOptions::unmount_grace`] (a detached
//! loop device lets go of the file asynchronously); after that the connection is
//! aborted (`MNT_FORCE`, further I/O on the file fails) and the mount lazily detached,
//! and `stop` reports [`InterceptError::ForcedUnmount`]. Every acknowledged write is in
//! the journal or the bitmap either way. The mount table is read from
//! `/proc/self/mountinfo`, never by `stat`ing the mount, so a stuck session cannot
//! hang the agent's stop, and only our own mount (by mount id) is ever unmounted.

mod capture;
mod fs;
mod mounts;
#[cfg(test)]
mod tests;

pub use capture::{lock_capture, Capture, Captured};

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::{self, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use fuser::{BackgroundSession, Config, MountOption};
use thiserror::Error;
use tracing::{error, info, warn};

use crate::journal::{JournalError, MAX_DISK_ID};
use fs::{Counters, DiskFs, Served};
use mounts::MountEntry;

/// Mount source shown in the mount table (`fsname`).
pub const FSNAME: &str = "boomerang";
/// Largest `max_write` accepted (the journal takes up to 8 MiB per record, fuser 16).
pub const MAX_MAX_WRITE: u32 = 8 << 20;
/// How long `stop` waits for the FUSE session to end once unmounted.
const SESSION_END_WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);

/// The disk an intercept serves, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedDisk {
    /// Stable disk id, carried by every journal record (1 to 128 bytes).
    pub disk_id: String,
    /// The protected disk: an image file or a block device. Its size is fixed while
    /// served.
    pub backing: PathBuf,
    /// Existing directory the file system is mounted on.
    pub mountpoint: PathBuf,
    /// Name of the one file of the mount (the workload uses `<mountpoint>/<file_name>`).
    pub file_name: String,
}

/// Tuning of the intercept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterceptOptions {
    /// Largest write the kernel hands over in one request, in bytes (4 KiB to 8 MiB;
    /// the kernel caps it at `fs.fuse.max_pages_limit` pages, 1 MiB by default).
    /// Default: 1 MiB.
    pub max_write: u32,
    /// FUSE request threads. Writes are serialized by the capture lock whatever the
    /// count; more threads let reads and syncs overlap writes. Default: 1.
    pub threads: usize,
    /// Interval of the journal sync timer (`None`: sync only on the writer's flush and
    /// fsync). Default: 1 s.
    pub journal_sync_interval: Option<Duration>,
    /// How long `stop` retries an unmount while the file is still in use before it
    /// aborts the connection. Default: 5 s.
    pub unmount_grace: Duration,
}

impl Default for InterceptOptions {
    fn default() -> Self {
        InterceptOptions {
            max_write: 1 << 20,
            threads: 1,
            journal_sync_interval: Some(Duration::from_secs(1)),
            unmount_grace: Duration::from_secs(5),
        }
    }
}

/// Errors of starting and stopping an intercept, naming the step.
#[derive(Debug, Error)]
pub enum InterceptError {
    /// A killed agent's mount is still there.
    #[error(
        "mount point {} still has a dead FUSE mount (its server is gone): run \
         `umount -l {}` and start again",
        mountpoint.display(),
        mountpoint.display()
    )]
    StaleMount {
        /// The mount point.
        mountpoint: PathBuf,
    },
    /// A live FUSE file system is mounted there already.
    #[error(
        "mount point {} already serves a FUSE file system (source `{source_name}`): is \
         another agent serving it? Stop it, or unmount it with `umount {}`",
        mountpoint.display(),
        mountpoint.display()
    )]
    AlreadyMounted {
        /// The mount point.
        mountpoint: PathBuf,
        /// The mount's source.
        source_name: String,
    },
    /// The configuration cannot work.
    #[error("intercept: {0}")]
    Invalid(String),
    /// The capture's bitmap covers another size than the backing disk has.
    #[error(
        "backing disk {} is {size} bytes but the capture's bitmap covers {bitmap_size}: \
         the disk was resized, start a new generation",
        backing.display()
    )]
    SizeMismatch {
        /// The backing disk.
        backing: PathBuf,
        /// Its size.
        size: u64,
        /// The size the bitmap covers.
        bitmap_size: u64,
    },
    /// An IO step failed.
    #[error("intercept {}: {step}: {source}", path.display())]
    Io {
        /// What was being done.
        step: &'static str,
        /// Which file or directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The journal could not be synced when stopping (the capture keeps it as a
    /// resync reason too).
    #[error("intercept: final journal sync: {0}")]
    JournalSync(#[source] JournalError),
    /// The file was still in use when the grace ran out: the connection was aborted.
    #[error(
        "{} was still in use {grace:?} after stop began (a loop device or a process \
         holds it; `losetup -j {}` lists loop devices): the FUSE connection was aborted \
         and the mount detached; I/O on the file now fails",
        file.display(),
        file.display()
    )]
    ForcedUnmount {
        /// The served file.
        file: PathBuf,
        /// The grace that ran out.
        grace: Duration,
    },
}

fn io_err<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> InterceptError + 'a {
    move |source| InterceptError::Io {
        step,
        path: path.to_path_buf(),
        source,
    }
}

/// Counters of an intercept since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InterceptStats {
    /// Write requests.
    pub writes: u64,
    /// Bytes written to the backing disk.
    pub bytes_written: u64,
    /// Writes (and discards) appended to the journal.
    pub journaled: u64,
    /// Writes (and discards) marked in the bitmap instead.
    pub marked: u64,
    /// Writes the backing disk refused.
    pub write_errors: u64,
    /// Read requests.
    pub reads: u64,
    /// Bytes read from the backing disk.
    pub bytes_read: u64,
    /// flush, fsync and fsyncdir requests.
    pub syncs: u64,
    /// Discards and zero-outs (fallocate `PUNCH_HOLE | KEEP_SIZE`, `ZERO_RANGE`)
    /// applied; each is journaled as a zero record (or marked, in bitmap mode) and
    /// counted in `journaled` or `marked` too.
    pub discards: u64,
    /// Bytes those zeroed on the backing disk.
    pub bytes_discarded: u64,
    /// fallocate requests of other modes, refused with EOPNOTSUPP.
    pub fallocate_refused: u64,
}

/// The journal sync timer thread.
#[derive(Debug)]
struct Syncer {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

/// A disk served through FUSE with its writes captured; unmounted by
/// [`Intercept::stop`] or on drop.
#[derive(Debug)]
pub struct Intercept {
    served: Arc<Served>,
    /// Canonical mount point.
    mountpoint: PathBuf,
    file: PathBuf,
    /// Our mount, as the mount table showed it right after mounting.
    mount: MountEntry,
    session: Option<BackgroundSession>,
    syncer: Option<Syncer>,
    grace: Duration,
}

impl Intercept {
    /// Serves `disk` and captures its writes into `capture`, whose bitmap must cover
    /// the backing disk's size. Returns once the file is usable.
    pub fn start(
        disk: &ServedDisk,
        capture: Arc<Mutex<Capture>>,
        options: &InterceptOptions,
    ) -> Result<Intercept, InterceptError> {
        Self::start_inner(disk, Some(capture), options)
    }

    /// Serves `disk` without capturing its writes: the FUSE passthrough baseline that
    /// the cost of capture is measured against. Writes are not tracked at all, so a
    /// protected disk served this way needs a resync; never use it in production.
    pub fn start_uncaptured(
        disk: &ServedDisk,
        options: &InterceptOptions,
    ) -> Result<Intercept, InterceptError> {
        Self::start_inner(disk, None, options)
    }

    fn start_inner(
        disk: &ServedDisk,
        capture: Option<Arc<Mutex<Capture>>>,
        options: &InterceptOptions,
    ) -> Result<Intercept, InterceptError> {
        validate(disk, options)?;
        let mountpoint = check_mountpoint(&disk.mountpoint)?;
        let mut backing = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk.backing)
            .map_err(io_err("open backing disk", &disk.backing))?;
        // The end, not the metadata's length: a block device's length reads 0.
        let size = backing
            .seek(SeekFrom::End(0))
            .map_err(io_err("find backing disk size", &disk.backing))?;
        if let Some(capture) = &capture {
            let bitmap_size = lock_capture(capture).state.bitmap().disk_size();
            if bitmap_size != size {
                return Err(InterceptError::SizeMismatch {
                    backing: disk.backing.clone(),
                    size,
                    bitmap_size,
                });
            }
        }
        // SAFETY: geteuid and getegid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let served = Arc::new(Served {
            disk_id: disk.disk_id.clone(),
            file_name: OsString::from(&disk.file_name),
            backing,
            backing_path: disk.backing.clone(),
            size,
            capture: capture.clone(),
            max_write: options.max_write,
            uid,
            gid,
            started: SystemTime::now(),
            counters: Counters::default(),
        });

        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName(FSNAME.into()),
            MountOption::DefaultPermissions,
            MountOption::NoSuid,
            MountOption::NoDev,
            MountOption::NoExec,
            MountOption::NoAtime,
        ];
        config.n_threads = Some(options.threads);
        let fs = DiskFs {
            served: Arc::clone(&served),
        };
        // Mounts (mount(2) on /dev/fuse as root, no libfuse) and answers the kernel's
        // INIT here; the request loop runs on fuser's background thread.
        let session = fuser::spawn_mount(fs, &mountpoint, &config)
            .map_err(io_err("mount FUSE file system", &mountpoint))?;
        let mount = match mounts::top_mount(&mountpoint) {
            Ok(Some(m)) if m.fstype == "fuse" && m.source == FSNAME => m,
            found => {
                // Dropping the session unmounts what it mounted.
                drop(session);
                let found = match found {
                    Ok(m) => format!("{m:?}"),
                    Err(e) => e.to_string(),
                };
                return Err(InterceptError::Invalid(format!(
                    "mounted {} but the mount table shows {found} there",
                    mountpoint.display()
                )));
            }
        };
        let mut intercept = Intercept {
            file: mountpoint.join(&disk.file_name),
            mountpoint,
            mount,
            served,
            session: Some(session),
            syncer: None,
            grace: options.unmount_grace,
        };
        if let (Some(capture), Some(every)) = (capture, options.journal_sync_interval) {
            // On error `intercept` drops here and unmounts.
            intercept.syncer = Some(
                spawn_syncer(capture, every)
                    .map_err(io_err("start journal sync timer", &intercept.file))?,
            );
        }
        crate::witness::register(&disk.disk_id, &disk.backing);
        info!(
            disk = %disk.disk_id,
            backing = %disk.backing.display(),
            file = %intercept.file.display(),
            size,
            captured = intercept.served.capture.is_some(),
            "intercept: serving the disk"
        );
        Ok(intercept)
    }

    /// The served file (`<mountpoint>/<file_name>`), for the loop device or hypervisor.
    pub fn file_path(&self) -> &Path {
        &self.file
    }

    /// The canonical mount point.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Size of the served disk in bytes.
    pub fn disk_size(&self) -> u64 {
        self.served.size
    }

    /// Counters since start.
    pub fn stats(&self) -> InterceptStats {
        self.served.counters.snapshot()
    }

    /// Stops serving: unmounts (see the module doc for a file still in use), waits for
    /// the FUSE session to end, and syncs the backing disk and the journal. Every
    /// acknowledged write is in the journal or the bitmap afterwards, also on error.
    pub fn stop(mut self) -> Result<(), InterceptError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), InterceptError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let unmounted = self.unmount();
        self.end_session(session);
        if let Some(syncer) = self.syncer.take() {
            drop(syncer.stop);
            if syncer.thread.join().is_err() {
                error!("intercept: the journal sync timer panicked");
            }
        }
        let synced = self.final_sync();
        info!(file = %self.file.display(), stats = ?self.stats(), "intercept: stopped");
        unmounted.and(synced)
    }

    /// Unmounts our mount: plain `umount`, retried through the grace while busy, then
    /// forced (see the module doc).
    fn unmount(&self) -> Result<(), InterceptError> {
        let deadline = Instant::now() + self.grace;
        loop {
            if !self.still_mounted()? {
                return Ok(());
            }
            match mounts::umount2(&self.mountpoint, 0) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    if Instant::now() >= deadline {
                        break;
                    }
                    std::thread::sleep(POLL);
                }
                // Not mounted any more (someone unmounted it meanwhile).
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(()),
                Err(e) => return Err(io_err("unmount", &self.mountpoint)(e)),
            }
        }
        error!(file = %self.file.display(), grace = ?self.grace, "intercept: the file is still in use; aborting the FUSE connection");
        // MNT_FORCE makes FUSE abort the connection (pending and later requests fail,
        // the session's read returns ENODEV), then fails with EBUSY as the mount is in
        // use; MNT_DETACH then takes it out of the namespace.
        if self.still_mounted()? {
            if let Err(e) = mounts::umount2(&self.mountpoint, libc::MNT_FORCE) {
                if e.raw_os_error() != Some(libc::EBUSY) {
                    warn!(mountpoint = %self.mountpoint.display(), error = %e, "intercept: forced unmount failed");
                }
            }
        }
        if self.still_mounted()? {
            mounts::umount2(&self.mountpoint, libc::MNT_DETACH)
                .map_err(io_err("detach mount", &self.mountpoint))?;
        }
        Err(InterceptError::ForcedUnmount {
            file: self.file.clone(),
            grace: self.grace,
        })
    }

    /// Whether our mount (same mount id) is still on top of the mount point.
    fn still_mounted(&self) -> Result<bool, InterceptError> {
        let top = mounts::top_mount(&self.mountpoint).map_err(io_err(
            "read the mount table",
            Path::new("/proc/self/mountinfo"),
        ))?;
        Ok(top.is_some_and(|m| m.id == self.mount.id))
    }

    /// Waits for fuser's session thread to end (it does once the kernel drops the
    /// connection) and joins it, giving up after a bound rather than hanging a stop.
    fn end_session(&self, session: BackgroundSession) {
        let until = Instant::now() + SESSION_END_WAIT;
        while !session.guard.is_finished() && Instant::now() < until {
            std::thread::sleep(POLL);
        }
        if !session.guard.is_finished() {
            error!(file = %self.file.display(), "intercept: the FUSE session did not end after the unmount; leaving its thread behind");
            return;
        }
        match session.join() {
            Ok(()) => {}
            Err(e) => {
                warn!(file = %self.file.display(), error = %e, "intercept: the FUSE session ended with an error")
            }
        }
    }

    fn final_sync(&self) -> Result<(), InterceptError> {
        let backing = self
            .served
            .backing
            .sync_data()
            .map_err(io_err("fdatasync backing disk", &self.served.backing_path));
        if let Some(capture) = &self.served.capture {
            let mut capture = lock_capture(capture);
            if let Err(e) = &backing {
                capture.lost_trust(e.to_string());
            }
            capture.sync().map_err(InterceptError::JournalSync)?;
        }
        backing
    }
}

impl Drop for Intercept {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            error!(error = %e, "intercept: stop on drop");
        }
    }
}

fn validate(disk: &ServedDisk, options: &InterceptOptions) -> Result<(), InterceptError> {
    let invalid = |m: String| Err(InterceptError::Invalid(m));
    if disk.disk_id.is_empty() || disk.disk_id.len() > MAX_DISK_ID {
        return invalid(format!(
            "disk id {:?} must be 1 to {MAX_DISK_ID} bytes",
            disk.disk_id
        ));
    }
    let name = disk.file_name.as_str();
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.len() > 255
        || name.contains(['/', '\0'])
    {
        return invalid(format!(
            "file name {name:?} must be one path component of 1 to 255 bytes"
        ));
    }
    if !(4096..=MAX_MAX_WRITE).contains(&options.max_write) {
        return invalid(format!(
            "max_write {} must be 4096 to {MAX_MAX_WRITE}",
            options.max_write
        ));
    }
    if options.threads == 0 {
        return invalid("threads must be at least 1".into());
    }
    if options.journal_sync_interval == Some(Duration::ZERO) {
        return invalid("journal_sync_interval must be above 0 (or off)".into());
    }
    Ok(())
}

/// Checks that `mountpoint` is a directory with no dead or live FUSE mount on it;
/// returns its canonical path.
fn check_mountpoint(mountpoint: &Path) -> Result<PathBuf, InterceptError> {
    match std::fs::metadata(mountpoint) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(InterceptError::StaleMount {
                mountpoint: mountpoint.to_path_buf(),
            });
        }
        Err(e) => return Err(io_err("stat mount point", mountpoint)(e)),
        Ok(m) if !m.is_dir() => {
            return Err(InterceptError::Invalid(format!(
                "mount point {} is not a directory",
                mountpoint.display()
            )));
        }
        Ok(_) => {}
    }
    let canonical = mountpoint
        .canonicalize()
        .map_err(io_err("resolve mount point", mountpoint))?;
    let top = mounts::top_mount(&canonical).map_err(io_err(
        "read the mount table",
        Path::new("/proc/self/mountinfo"),
    ))?;
    if let Some(m) = top.filter(|m| m.fstype == "fuse" || m.fstype.starts_with("fuse.")) {
        return Err(InterceptError::AlreadyMounted {
            mountpoint: canonical,
            source_name: m.source,
        });
    }
    Ok(canonical)
}

fn spawn_syncer(capture: Arc<Mutex<Capture>>, every: Duration) -> io::Result<Syncer> {
    let (stop, stopped) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("intercept-sync".into())
        .spawn(move || loop {
            match stopped.recv_timeout(every) {
                Err(RecvTimeoutError::Timeout) => {
                    // A failure is logged and kept by the capture as a resync reason.
                    let _ = lock_capture(&capture).sync();
                }
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            }
        })?;
    Ok(Syncer { stop, thread })
}
