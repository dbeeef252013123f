//! Replica storage: the trait the apply path writes through, and its file/block-device
//! implementation. Tests and later the retention journal can slot in other stores.
//!
//! Every write, sync, truncate and create of a [`FileReplica`] goes through
//! [`boomerang_common::storage`], whose sites are named `replica.<op>` for replicas
//! and `target.<op>` for the targets points are materialized into, so tests can make
//! them fail. What this module creates is private to its owner (files 0600,
//! directories 0700): it holds a protected machine's disk. A file or block device that
//! exists already (one the operator gave) keeps its mode.

use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use boomerang_common::storage;

/// Fault-injection scope of replicas.
pub const REPLICA_SCOPE: &str = "replica";
/// Fault-injection scope of the targets points are materialized into.
pub const TARGET_SCOPE: &str = "target";

/// Where a replica's bytes live.
pub trait Replica: Send + Sync + std::fmt::Debug {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Writes `data` at `offset` (not yet durable).
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes `[offset, offset + len)` read as zeros (not yet durable).
    fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Reads exactly `buf.len()` bytes at `offset`; past the end reads zeros.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Makes every completed write durable (fdatasync).
    fn flush(&self) -> io::Result<()>;
    /// Follows a resized source disk: an image file is grown or shrunk (durably); a
    /// block device must hold at least `size` bytes.
    fn resize(&self, size: u64) -> io::Result<()>;
}

/// A replica in an image file (created sparse) or on an existing block device.
#[derive(Debug)]
pub struct FileReplica {
    path: PathBuf,
    file: storage::File,
    size: AtomicU64,
    /// Bytes the block device holds (unused for image files).
    capacity: u64,
    block_device: bool,
}

impl FileReplica {
    /// Opens `path` as a disk's replica, creating a sparse image of `size` bytes (and
    /// its missing directories) when it does not exist. A block device must be at
    /// least `size` bytes; an image file is grown to `size`.
    pub fn open_or_create(path: &Path, size: u64) -> io::Result<Self> {
        Self::open_in(REPLICA_SCOPE, path, size)
    }

    /// Opens `path` as the target a point is materialized into, like
    /// [`FileReplica::open_or_create`].
    pub fn open_target(path: &Path, size: u64) -> io::Result<Self> {
        Self::open_in(TARGET_SCOPE, path, size)
    }

    fn open_in(scope: &'static str, path: &Path, size: u64) -> io::Result<Self> {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !path.exists() {
            storage::create_dir_all(scope, &dir).map_err(|e| {
                io::Error::new(e.kind(), format!("create directory {}: {e}", dir.display()))
            })?;
        }
        let (file, created) = storage::File::open_or_create(scope, path, storage::FILE_MODE)?;
        let block_device = file.std().metadata()?.file_type().is_block_device();
        // The length of a block device is only seen by seeking to its end.
        let mut actual = {
            let mut f = file.std();
            f.seek(SeekFrom::End(0))?
        };
        if block_device {
            if actual < size {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "block device {} holds {actual} bytes, the source disk needs {size}: give a larger device",
                        path.display()
                    ),
                ));
            }
        } else if actual != size {
            file.set_len(size)?;
            // The length must survive a crash before any record relies on it.
            file.sync_all()?;
            actual = size;
        }
        if created {
            // So must the new name.
            storage::fsync_dir(scope, &dir)?;
        }
        Ok(FileReplica {
            path: path.to_path_buf(),
            file,
            size: AtomicU64::new(if block_device {
                size.min(actual)
            } else {
                actual
            }),
            capacity: actual,
            block_device,
        })
    }

    /// The replica's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

static ZEROS: [u8; 1 << 20] = [0u8; 1 << 20];

impl Replica for FileReplica {
    fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }

    fn resize(&self, size: u64) -> io::Result<()> {
        if self.block_device {
            if size > self.capacity {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "block device {} holds {} bytes, the resized source needs {size}: give a larger device",
                        self.path.display(),
                        self.capacity
                    ),
                ));
            }
        } else {
            self.file.set_len(size)?;
            // The new length must survive a crash before the record says so.
            self.file.sync_all()?;
        }
        self.size.store(size, Ordering::SeqCst);
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.block_device && self.file.punch_hole(offset, len)? {
            return Ok(());
        }
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from((len - done).min(ZEROS.len() as u64)).unwrap_or(ZEROS.len());
            self.file.write_all_at(&ZEROS[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let n = self.file.read_at_most(buf, offset)?;
        buf[n..].fill(0);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_image_reads_back_writes_and_zeros() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let r = FileReplica::open_or_create(&dir.path().join("d.img"), 1 << 20)?;
        r.write_at(4096, &[7u8; 8192])?;
        r.write_zeros(8192, 4096)?;
        r.flush()?;
        let mut buf = vec![1u8; 12288];
        r.read_at(4096, &mut buf)?;
        assert!(buf[..4096].iter().all(|&b| b == 7));
        assert!(buf[4096..8192].iter().all(|&b| b == 0));
        assert!(buf[8192..].iter().all(|&b| b == 0));
        Ok(())
    }

    fn mode(path: &Path) -> io::Result<u32> {
        use std::os::unix::fs::PermissionsExt;
        Ok(std::fs::metadata(path)?.permissions().mode() & 0o777)
    }

    #[test]
    fn a_new_replica_and_its_directories_are_private_an_existing_file_keeps_its_mode(
    ) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        // SAFETY: umask only changes the process's file creation mask; a permissive
        // one makes the test show what the code asks for, not what the mask allows.
        unsafe { libc::umask(0o022) };
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("replicas/nested/d.img");
        let r = FileReplica::open_or_create(&path, 1 << 20)?;
        assert_eq!(r.size(), 1 << 20);
        assert_eq!(mode(&path)?, 0o600);
        assert_eq!(mode(&dir.path().join("replicas"))?, 0o700);
        assert_eq!(mode(&dir.path().join("replicas/nested"))?, 0o700);
        // An image the operator gave keeps the mode they chose.
        let given = dir.path().join("given.img");
        std::fs::write(&given, b"")?;
        std::fs::set_permissions(&given, std::fs::Permissions::from_mode(0o640))?;
        let r = FileReplica::open_or_create(&given, 1 << 20)?;
        assert_eq!(r.size(), 1 << 20);
        assert_eq!(mode(&given)?, 0o640);
        Ok(())
    }
}
