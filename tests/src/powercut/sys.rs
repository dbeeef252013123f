//! Small system helpers: opening backing files, libc calls std lacks (utimensat,
//! futimens, umount2), time and size conversions.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use fuser::{Errno, FileType, TimeOrNow};

use super::tree::OpenFile;

/// Mode, owner and time changes of a `setattr`, applied at once (they are durable at
/// once here).
#[derive(Debug)]
pub(super) struct Change<'a> {
    pub(super) mode: Option<u32>,
    pub(super) uid: Option<u32>,
    pub(super) gid: Option<u32>,
    pub(super) times: Option<&'a [libc::timespec; 2]>,
}

impl Change<'_> {
    pub(super) fn is_empty(&self) -> bool {
        self.mode.is_none() && self.uid.is_none() && self.gid.is_none() && self.times.is_none()
    }

    /// To the object at `path` itself (a symlink, not its target).
    pub(super) fn apply_to_path(&self, path: &Path) -> io::Result<()> {
        if let Some(mode) = self.mode {
            fs::set_permissions(path, Permissions::from_mode(mode & 0o7777))?;
        }
        if self.uid.is_some() || self.gid.is_some() {
            std::os::unix::fs::lchown(path, self.uid, self.gid)?;
        }
        if let Some(times) = self.times {
            utimensat(path, times)?;
        }
        Ok(())
    }

    pub(super) fn apply_to_file(&self, file: &File) -> io::Result<()> {
        if let Some(mode) = self.mode {
            file.set_permissions(Permissions::from_mode(mode & 0o7777))?;
        }
        if self.uid.is_some() || self.gid.is_some() {
            std::os::unix::fs::fchown(file, self.uid, self.gid)?;
        }
        if let Some(times) = self.times {
            futimens(file, times)?;
        }
        Ok(())
    }
}

pub(super) fn kind_of(md: &fs::Metadata) -> Result<FileType, Errno> {
    FileType::from_std(md.file_type()).ok_or(Errno::EIO)
}

/// Opens a backing file read-write (fsync must write to it), read-only where that is
/// all the backing allows.
pub(super) fn open_backing(path: &Path) -> io::Result<File> {
    match OpenOptions::new().read(true).write(true).open(path) {
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EACCES | libc::EROFS | libc::ETXTBSY)
            ) =>
        {
            File::open(path)
        }
        other => other,
    }
}

pub(super) fn open_file(file: File, flags: i32) -> OpenFile {
    OpenFile {
        file,
        append: flags & libc::O_APPEND != 0,
        // O_SYNC includes the O_DSYNC bit.
        sync: flags & libc::O_DSYNC != 0,
    }
}

/// Removes a file, or a directory with whatever is in it.
pub(super) fn remove_any(path: &Path) -> io::Result<()> {
    if fs::symlink_metadata(path)?.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}

/// Empties directory `dir`.
pub(super) fn clear_dir(dir: &Path) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("list {}", dir.display()))?
            .path();
        remove_any(&path).with_context(|| format!("remove {}", path.display()))?;
    }
    Ok(())
}

pub(super) fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

pub(super) fn timespec(t: Option<TimeOrNow>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(TimeOrNow::SpecificTime(t)) => {
            let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
            libc::timespec {
                tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
                tv_nsec: libc::c_long::from(d.subsec_nanos()),
            }
        }
    }
}

/// Sets access and modification times of `path` itself (not a symlink's target).
pub(super) fn utimensat(path: &Path, times: &[libc::timespec; 2]) -> io::Result<()> {
    let c = cpath(path)?;
    // SAFETY: `c` is a NUL-terminated path and `times` two timespecs, both alive for
    // the call, which only reads them.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub(super) fn futimens(file: &File, times: &[libc::timespec; 2]) -> io::Result<()> {
    // SAFETY: a descriptor `file` owns and two timespecs alive for the call, which
    // only reads them.
    let rc = unsafe { libc::futimens(file.as_raw_fd(), times.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub(super) fn system_time(secs: i64, nsecs: i64) -> SystemTime {
    let nanos = u32::try_from(nsecs.clamp(0, 999_999_999)).unwrap_or(0);
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs.unsigned_abs(), nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nanos.into())
    }
}

/// Offsets inside in-memory buffers always fit a `usize` on the 64-bit hosts tests run on.
pub(super) fn to_usize(x: u64) -> usize {
    usize::try_from(x).unwrap_or(usize::MAX)
}
