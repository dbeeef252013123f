//! The storage seam: the one small file abstraction through which every write, fsync,
//! truncate, create, rename, remove and directory fsync of Boomerang's durable state
//! goes (the three logs of [`crate::seglog`], [`crate::durable`]'s state files and
//! atomic replaces, and the master target's replicas). Each call names its *site*,
//! `<scope>.<op>`, where [`crate::faults`] can make it fail in tests; in a build without
//! the `faults` feature the check compiles away.
//!
//! Errors are plain `io::Error`s: the layer above names the file and the step.
//! Files and directories are created private to their owner (0600 / 0700) unless the
//! caller asks otherwise: replicas, logs and state hold the protected machines' data.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::faults::{self, Fault, Op};

/// Mode of files created for durable state.
pub const FILE_MODE: u32 = 0o600;
/// Mode of directories created for durable state.
pub const DIR_MODE: u32 = 0o700;

/// Runs the fault check for one call; returns the injected error, if any, or the
/// fault to pass to [`faults::after`].
fn gate(scope: &str, op: Op, path: &Path) -> Result<Option<Fault>, (Fault, io::Error)> {
    match faults::check(scope, op, path) {
        Some(f @ (Fault::NoSpace | Fault::Eio | Fault::Short)) => Err((f, f.error())),
        other => Ok(other),
    }
}

fn simple<T>(
    scope: &str,
    op: Op,
    path: &Path,
    call: impl FnOnce() -> io::Result<T>,
) -> io::Result<T> {
    let after = gate(scope, op, path).map_err(|(_, e)| e)?;
    let out = call()?;
    faults::after(after);
    Ok(out)
}

/// An open file of durable state, with the scope its sites are named after.
#[derive(Debug)]
pub struct File {
    file: fs::File,
    path: PathBuf,
    scope: &'static str,
}

impl File {
    /// Creates a new file (failing if anything exists at `path`, also a symlink),
    /// open for reading and writing, with `mode`.
    pub fn create_new(scope: &'static str, path: &Path, mode: u32) -> io::Result<Self> {
        let file = simple(scope, Op::Create, path, || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(path)
        })?;
        Ok(File {
            file,
            path: path.to_path_buf(),
            scope,
        })
    }

    /// Opens an existing file for reading and writing.
    pub fn open_rw(scope: &'static str, path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(File {
            file,
            path: path.to_path_buf(),
            scope,
        })
    }

    /// Opens an existing file for reading only.
    pub fn open_read(scope: &'static str, path: &Path) -> io::Result<Self> {
        let file = fs::File::open(path)?;
        Ok(File {
            file,
            path: path.to_path_buf(),
            scope,
        })
    }

    /// Opens `path` for reading and writing, creating it with `mode` when it does not
    /// exist (never following a symlink at the last component when creating); says
    /// whether it was created.
    pub fn open_or_create(scope: &'static str, path: &Path, mode: u32) -> io::Result<(Self, bool)> {
        match Self::open_rw(scope, path) {
            Ok(f) => Ok((f, false)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Self::create_new(scope, path, mode).map(|f| (f, true))
            }
            Err(e) => Err(e),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The scope its sites are named after.
    pub fn scope(&self) -> &'static str {
        self.scope
    }

    /// The underlying file, for reads, metadata and ioctls (never for writes or
    /// syncs, which must pass the seam).
    pub fn std(&self) -> &fs::File {
        &self.file
    }

    /// The file's length.
    pub fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Reads up to `buf.len()` bytes at `offset`; returns how many (fewer only at the
    /// end of the file).
    pub fn read_at_most(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    /// Writes all of `data` at `offset` (site `write`; not durable until a sync).
    pub fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.write_parts_at(&[data], offset)
    }

    /// Writes the concatenation of `parts` at `offset` with as few system calls as
    /// the kernel allows (`pwritev`), without copying them together first.
    pub fn write_parts_at(&self, parts: &[&[u8]], offset: u64) -> io::Result<()> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        match gate(self.scope, Op::Write, &self.path) {
            Ok(after) => {
                pwritev_all(&self.file, parts, offset, total)?;
                faults::after(after);
                Ok(())
            }
            Err((Fault::Short, e)) => {
                // A short write: the first half reaches the file, then the device is full.
                let _ = pwritev_all(&self.file, parts, offset, total / 2);
                Err(e)
            }
            Err((_, e)) => Err(e),
        }
    }

    /// Makes `[offset, offset + len)` read as zeros without allocating (site `write`);
    /// `Ok(false)` when the file system cannot punch holes.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        simple(self.scope, Op::Write, &self.path, || {
            let off = libc::off_t::try_from(offset).map_err(io::Error::other)?;
            let l = libc::off_t::try_from(len).map_err(io::Error::other)?;
            // SAFETY: plain syscall on an fd we own; no pointers involved.
            let rc = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off,
                    l,
                )
            };
            if rc == 0 {
                return Ok(true);
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::ENODEV) => Ok(false),
                _ => Err(err),
            }
        })
    }

    /// fdatasync (site `sync`): the data written so far, and the length, are durable.
    pub fn sync_data(&self) -> io::Result<()> {
        simple(self.scope, Op::Sync, &self.path, || self.file.sync_data())
    }

    /// fsync (site `sync`): data and all metadata are durable.
    pub fn sync_all(&self) -> io::Result<()> {
        simple(self.scope, Op::Sync, &self.path, || self.file.sync_all())
    }

    /// Sets the length (site `truncate`; not durable until a sync).
    pub fn set_len(&self, len: u64) -> io::Result<()> {
        simple(self.scope, Op::Truncate, &self.path, || {
            self.file.set_len(len)
        })
    }
}

fn pwritev_all(file: &fs::File, parts: &[&[u8]], mut offset: u64, limit: usize) -> io::Result<()> {
    // Skip what is written, then write the rest, up to `limit` bytes in all.
    let mut left = limit;
    let mut idx = 0;
    let mut skip = 0usize;
    while left > 0 {
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(parts.len() - idx);
        let mut room = left;
        for (i, p) in parts.iter().enumerate().skip(idx) {
            let start = if i == idx { skip } else { 0 };
            let n = (p.len() - start).min(room);
            if n == 0 {
                continue;
            }
            iov.push(libc::iovec {
                iov_base: p[start..].as_ptr() as *mut libc::c_void,
                iov_len: n,
            });
            room -= n;
            if room == 0 || iov.len() >= 1024 {
                break;
            }
        }
        let off = libc::off_t::try_from(offset).map_err(io::Error::other)?;
        let count = libc::c_int::try_from(iov.len()).map_err(io::Error::other)?;
        // SAFETY: every iovec points into a live slice of `parts` for at most its
        // length; pwritev only reads them, and they outlive the call.
        let rc = unsafe { libc::pwritev(file.as_raw_fd(), iov.as_ptr(), count, off) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        let mut wrote = usize::try_from(rc).map_err(io::Error::other)?;
        if wrote == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "pwritev wrote nothing",
            ));
        }
        left -= wrote;
        offset += wrote as u64;
        while wrote > 0 && idx < parts.len() {
            let avail = parts[idx].len() - skip;
            if wrote >= avail {
                wrote -= avail;
                idx += 1;
                skip = 0;
            } else {
                skip += wrote;
                wrote = 0;
            }
        }
        while idx < parts.len() && parts[idx].len() == skip {
            idx += 1;
            skip = 0;
        }
    }
    Ok(())
}

/// fsyncs a directory (site `dirsync`) so that entries created, renamed or removed in
/// it survive a crash.
pub fn fsync_dir(scope: &'static str, dir: &Path) -> io::Result<()> {
    simple(scope, Op::DirSync, dir, || fs::File::open(dir)?.sync_all())
}

/// Renames `from` to `to` (site `rename`; durable after [`fsync_dir`]).
pub fn rename(scope: &'static str, from: &Path, to: &Path) -> io::Result<()> {
    simple(scope, Op::Rename, to, || fs::rename(from, to))
}

/// Removes a file (site `remove`; durable after [`fsync_dir`]).
pub fn remove_file(scope: &'static str, path: &Path) -> io::Result<()> {
    simple(scope, Op::Remove, path, || fs::remove_file(path))
}

/// Creates `dir` and its missing parents with [`DIR_MODE`] (site `create`), then
/// fsyncs the parent of every directory created so the new entries survive a crash.
/// An existing directory keeps its mode.
pub fn create_dir_all(scope: &'static str, dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_all(scope, parent)?;
    }
    simple(scope, Op::Create, dir, || {
        match fs::DirBuilder::new().mode(DIR_MODE).create(dir) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
            other => other,
        }
    })?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fsync_dir(scope, &parent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_written_in_order_at_the_offset() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let f = File::create_new("t", &dir.path().join("f"), FILE_MODE)?;
        let big = vec![7u8; 3 << 20];
        f.write_parts_at(&[b"ab", b"", &big, b"cd"], 10)?;
        let bytes = fs::read(f.path())?;
        assert_eq!(bytes.len(), 10 + 2 + big.len() + 2);
        assert_eq!(&bytes[10..12], b"ab");
        assert!(bytes[12..12 + big.len()].iter().all(|&b| b == 7));
        assert_eq!(&bytes[bytes.len() - 2..], b"cd");
        Ok(())
    }

    #[test]
    fn created_files_and_directories_are_private() -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        let sub = dir.path().join("a/b");
        create_dir_all("t", &sub)?;
        for d in [dir.path().join("a"), sub.clone()] {
            assert_eq!(fs::metadata(&d)?.permissions().mode() & 0o777, DIR_MODE);
        }
        let f = File::create_new("t", &sub.join("f"), FILE_MODE)?;
        assert_eq!(
            fs::metadata(f.path())?.permissions().mode() & 0o777,
            FILE_MODE
        );
        // create_new never follows a planted symlink.
        std::os::unix::fs::symlink(dir.path().join("victim"), sub.join("link"))?;
        assert!(File::create_new("t", &sub.join("link"), FILE_MODE).is_err());
        assert!(!dir.path().join("victim").exists());
        Ok(())
    }

    #[cfg(feature = "faults")]
    #[test]
    fn a_short_write_stores_half_and_fails_with_enospc() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let f = File::create_new("t", &dir.path().join("f"), FILE_MODE)?;
        let _armed = faults::arm_under(dir.path(), "t.write@1=short").map_err(io::Error::other)?;
        let err = f.write_all_at(&[1u8; 1000], 0).expect_err("injected");
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(f.len()?, 500);
        f.write_all_at(&[2u8; 10], 0)?;
        Ok(())
    }
}
