//! The FUSE file system of the intercept: a root directory holding one regular file,
//! the served disk. Reads go to the backing disk; writes go to the backing disk and
//! then to the capture, under the capture lock, before they are acknowledged; so do
//! discards and zero-outs (`fallocate` with `PUNCH_HOLE | KEEP_SIZE` or `ZERO_RANGE`,
//! what a loop device sends for a file system's discards and write-zeroes), which
//! are journaled as zero records; flush, fsync and fsyncdir reach the backing disk and
//! the journal. Everything else that would change the namespace or the file's size
//! is refused.

use std::cell::RefCell;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};
use tracing::{error, warn};

use super::capture::{lock_capture, Capture, Captured};
use super::InterceptStats;

/// Inode of the served file (the root directory is [`INodeNo::ROOT`]).
const FILE: INodeNo = INodeNo(2);
/// The file's size and the directory never change while mounted.
const TTL: Duration = Duration::from_secs(60);
const BLKSIZE: u32 = 4096;

thread_local! {
    /// Read buffer of each FUSE thread, reused across reads (at most `max_write`, which
    /// also bounds the kernel's reads through `max_pages`).
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// What the file system serves, shared with the [`Intercept`](super::Intercept) handle.
#[derive(Debug)]
pub(super) struct Served {
    pub(super) disk_id: String,
    pub(super) file_name: OsString,
    pub(super) backing: File,
    pub(super) backing_path: PathBuf,
    pub(super) size: u64,
    /// `None`: the uncaptured baseline.
    pub(super) capture: Option<Arc<Mutex<Capture>>>,
    pub(super) max_write: u32,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) started: SystemTime,
    pub(super) counters: Counters,
}

/// Counters behind [`InterceptStats`].
#[derive(Debug, Default)]
pub(super) struct Counters {
    writes: AtomicU64,
    bytes_written: AtomicU64,
    journaled: AtomicU64,
    marked: AtomicU64,
    write_errors: AtomicU64,
    reads: AtomicU64,
    bytes_read: AtomicU64,
    syncs: AtomicU64,
    discards: AtomicU64,
    bytes_discarded: AtomicU64,
    fallocate_refused: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

impl Counters {
    pub(super) fn snapshot(&self) -> InterceptStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        InterceptStats {
            writes: get(&self.writes),
            bytes_written: get(&self.bytes_written),
            journaled: get(&self.journaled),
            marked: get(&self.marked),
            write_errors: get(&self.write_errors),
            reads: get(&self.reads),
            bytes_read: get(&self.bytes_read),
            syncs: get(&self.syncs),
            discards: get(&self.discards),
            bytes_discarded: get(&self.bytes_discarded),
            fallocate_refused: get(&self.fallocate_refused),
        }
    }
}

fn errno(e: &io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

impl Served {
    fn attr(&self, ino: INodeNo) -> FileAttr {
        let (kind, perm, size, nlink) = if ino == FILE {
            (FileType::RegularFile, 0o600, self.size, 1)
        } else {
            (FileType::Directory, 0o700, 0, 2)
        };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            flags: 0,
            blksize: BLKSIZE,
        }
    }

    /// Applies a write to the backing disk, then records it, both under the capture
    /// lock (see the [module doc](super) for why in this order).
    pub(super) fn write(&self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let len = data.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            // A disk has a fixed size: growing it would be a resize (a new generation).
            return Err(Errno::ENOSPC);
        }
        bump(&self.counters.writes, 1);
        if data.is_empty() {
            return Ok(());
        }
        let Some(capture) = &self.capture else {
            return self.apply(offset, data);
        };
        let mut capture = lock_capture(capture);
        if let Err(e) = self.apply(offset, data) {
            // Part of it may have landed: ship those blocks as they are on the disk.
            capture.mark_unknown(offset, len);
            return Err(e);
        }
        match capture.record_write(&self.disk_id, offset, data) {
            Captured::Journaled(_) => bump(&self.counters.journaled, 1),
            Captured::Marked => bump(&self.counters.marked, 1),
        }
        Ok(())
    }

    fn apply(&self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        match self.backing.write_all_at(data, offset) {
            Ok(()) => {
                bump(&self.counters.bytes_written, data.len() as u64);
                Ok(())
            }
            Err(e) => {
                bump(&self.counters.write_errors, 1);
                error!(backing = %self.backing_path.display(), offset, len = data.len(), error = %e, "intercept: write to the backing disk failed");
                Err(errno(&e))
            }
        }
    }

    /// A discard or zero-out from the writer (`fallocate`): `PUNCH_HOLE | KEEP_SIZE`
    /// or `ZERO_RANGE` (with or without `KEEP_SIZE`) of a range inside the disk is
    /// applied to the backing disk and then recorded as a zero range, both under the
    /// capture lock like a write; the part of a `KEEP_SIZE` range past the end is
    /// ignored, as the kernel does. Any other mode is refused with EOPNOTSUPP: it
    /// would allocate, grow, collapse or shift the disk.
    pub(super) fn fallocate(&self, offset: u64, length: u64, mode: i32) -> Result<(), Errno> {
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let zero_range = mode & !libc::FALLOC_FL_KEEP_SIZE == libc::FALLOC_FL_ZERO_RANGE;
        if mode != PUNCH && !zero_range {
            bump(&self.counters.fallocate_refused, 1);
            static LOGGED: AtomicBool = AtomicBool::new(false);
            if !LOGGED.swap(true, Ordering::Relaxed) {
                warn!(mode = format!("{mode:#x}"), "intercept: fallocate refused (only PUNCH_HOLE|KEEP_SIZE and ZERO_RANGE are served: other modes allocate, grow or shift the disk)");
            }
            return Err(Errno::EOPNOTSUPP);
        }
        let end = offset.checked_add(length).ok_or(Errno::EINVAL)?;
        if end > self.size && !keep_size {
            // Zeroing past the end without KEEP_SIZE grows the file: a resize.
            return Err(Errno::ENOSPC);
        }
        let end = end.min(self.size);
        if offset >= end {
            return Ok(());
        }
        let len = end - offset;
        bump(&self.counters.discards, 1);
        let Some(capture) = &self.capture else {
            return self.apply_zero(offset, len, zero_range);
        };
        let mut capture = lock_capture(capture);
        if let Err(e) = self.apply_zero(offset, len, zero_range) {
            // Part of it may have been zeroed: ship those blocks as they are.
            capture.mark_unknown(offset, len);
            return Err(e);
        }
        match capture.record_zero(&self.disk_id, offset, len) {
            Captured::Journaled(_) => bump(&self.counters.journaled, 1),
            Captured::Marked => bump(&self.counters.marked, 1),
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` of the backing disk read back as zeros: the same
    /// fallocate on it (a file system punches or zeroes, a block device zeroes out),
    /// else, where it has no such fallocate, by writing zeros.
    fn apply_zero(&self, offset: u64, len: u64, zero_range: bool) -> Result<(), Errno> {
        let mode = libc::FALLOC_FL_KEEP_SIZE
            | if zero_range {
                libc::FALLOC_FL_ZERO_RANGE
            } else {
                libc::FALLOC_FL_PUNCH_HOLE
            };
        let (Ok(at), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(Errno::EINVAL);
        };
        // SAFETY: fallocate(2) on a descriptor we own for the call, with plain integers.
        let rc = unsafe { libc::fallocate(self.backing.as_raw_fd(), mode, at, n) };
        let result = if rc == 0 {
            Ok(())
        } else {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EOPNOTSUPP | libc::ENOSYS) => self.write_zeros(offset, len),
                _ => Err(e),
            }
        };
        match result {
            Ok(()) => {
                bump(&self.counters.bytes_discarded, len);
                Ok(())
            }
            Err(e) => {
                bump(&self.counters.write_errors, 1);
                error!(backing = %self.backing_path.display(), offset, len, error = %e, "intercept: zeroing a range of the backing disk failed");
                Err(errno(&e))
            }
        }
    }

    fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        static ZEROS: [u8; 64 * 1024] = [0u8; 64 * 1024];
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = usize::try_from((end - at).min(ZEROS.len() as u64)).unwrap_or(ZEROS.len());
            self.backing.write_all_at(&ZEROS[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    /// A flush or fsync from the writer: fdatasync of the backing disk, then a sync of
    /// the journal. The backing disk's result is the writer's; a journal failure is the
    /// agent's (kept in the capture as a resync reason), not the writer's.
    pub(super) fn sync(&self) -> Result<(), Errno> {
        bump(&self.counters.syncs, 1);
        let backing = self.backing.sync_data();
        if let Some(capture) = &self.capture {
            let mut capture = lock_capture(capture);
            if let Err(e) = &backing {
                // Linux may have dropped the dirty pages: what the disk holds is unknown.
                capture.lost_trust(format!(
                    "fdatasync of the backing disk {} failed: {e}",
                    self.backing_path.display()
                ));
            }
            // A failure is logged and kept by the capture.
            let _ = capture.sync();
        }
        backing.map_err(|e| {
            error!(backing = %self.backing_path.display(), error = %e, "intercept: fdatasync of the backing disk failed");
            errno(&e)
        })
    }

    /// Reads up to `size` bytes at `offset` from the backing disk (short at the end).
    fn read(&self, offset: u64, size: u32, reply: ReplyData) {
        let want = u64::from(size).min(self.size.saturating_sub(offset));
        let Ok(want) = usize::try_from(want) else {
            reply.error(Errno::EINVAL);
            return;
        };
        READ_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            if buf.len() < want {
                buf.resize(want, 0);
            }
            match self.backing.read_exact_at(&mut buf[..want], offset) {
                Ok(()) => {
                    bump(&self.counters.reads, 1);
                    bump(&self.counters.bytes_read, want as u64);
                    reply.data(&buf[..want]);
                }
                Err(e) => {
                    warn!(backing = %self.backing_path.display(), offset, len = want, error = %e, "intercept: read from the backing disk failed");
                    reply.error(errno(&e));
                }
            }
        });
    }
}

/// The [`Filesystem`] handed to fuser.
#[derive(Debug)]
pub(super) struct DiskFs {
    pub(super) served: Arc<Served>,
}

impl Filesystem for DiskFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // fuser asks for neither FUSE_WRITEBACK_CACHE nor anything else that would let
        // the kernel acknowledge a write before it reaches us: writes stay write-through.
        config
            .set_max_write(self.served.max_write)
            .map_err(|max| io::Error::other(format!("max_write above fuser's {max}")))?;
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match parent {
            INodeNo::ROOT if name == self.served.file_name => {
                reply.entry(&TTL, &self.served.attr(FILE), Generation(0));
            }
            INodeNo::ROOT => reply.error(Errno::ENOENT),
            FILE => reply.error(Errno::ENOTDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match ino {
            INodeNo::ROOT | FILE => reply.attr(&TTL, &self.served.attr(ino)),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if ino != INodeNo::ROOT && ino != FILE {
            reply.error(Errno::ENOENT);
            return;
        }
        let attr = self.served.attr(ino);
        // Ownership and mode are fixed, and so is the disk's size (truncating or growing
        // it would destroy or resize the disk). Times are accepted and not kept.
        if mode.is_some() || uid.is_some() || gid.is_some() || size.is_some_and(|s| s != attr.size)
        {
            reply.error(Errno::EPERM);
            return;
        }
        reply.attr(&TTL, &attr);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match ino {
            FILE => reply.opened(FileHandle(0), FopenFlags::empty()),
            INodeNo::ROOT => reply.error(Errno::EISDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match ino {
            FILE => self.served.read(offset, size, reply),
            INodeNo::ROOT => reply.error(Errno::EISDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != FILE {
            reply.error(Errno::EBADF);
            return;
        }
        let Ok(written) = u32::try_from(data.len()) else {
            reply.error(Errno::EINVAL);
            return;
        };
        match self.served.write(offset, data) {
            Ok(()) => reply.written(written),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply_sync(self.served.sync(), reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_sync(self.served.sync(), reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match ino {
            INodeNo::ROOT => reply.opened(FileHandle(0), FopenFlags::empty()),
            FILE => reply.error(Errno::ENOTDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, OsStr::new(".")),
            (INodeNo::ROOT, FileType::Directory, OsStr::new("..")),
            (
                FILE,
                FileType::RegularFile,
                self.served.file_name.as_os_str(),
            ),
        ];
        for (next, (ino, kind, name)) in (1u64..).zip(entries).skip_while(|(n, _)| *n <= offset) {
            if reply.add(ino, next, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_sync(self.served.sync(), reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.served.size.div_ceil(u64::from(BLKSIZE));
        reply.statfs(blocks, 0, 0, 1, 0, BLKSIZE, 255, BLKSIZE);
    }

    // The mount serves one fixed file: nothing may be created, removed or renamed.

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EPERM);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EPERM);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EOPNOTSUPP);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::EOPNOTSUPP);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::EOPNOTSUPP);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EOPNOTSUPP);
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    /// Discards and zero-outs, captured (see [`Served::fallocate`]).
    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match ino {
            FILE => reply_sync(self.served.fallocate(offset, length, mode), reply),
            INodeNo::ROOT => reply.error(Errno::EISDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    /// ENOSYS: the kernel then copies with reads and writes, which are captured.
    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::ENOSYS);
    }
}

fn reply_sync(result: Result<(), Errno>, reply: ReplyEmpty) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}
