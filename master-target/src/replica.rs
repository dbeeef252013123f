//! Replica storage: the trait the apply path writes through, and its file/block-device
//! implementation. Tests and later the retention journal can slot in other stores.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

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
    file: File,
    size: AtomicU64,
    /// Bytes the block device holds (unused for image files).
    capacity: u64,
    block_device: bool,
}

impl FileReplica {
    /// Opens `path`, creating a sparse image of `size` bytes when it does not exist.
    /// A block device must be at least `size` bytes; an image file is grown to `size`.
    pub fn open_or_create(path: &Path, size: u64) -> io::Result<Self> {
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(!existed)
            .truncate(false)
            .open(path)?;
        let block_device = file.metadata()?.file_type().is_block_device();
        let mut actual = file.seek(SeekFrom::End(0))?;
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
            file.sync_all()?;
            actual = size;
            if !existed {
                if let Some(dir) = path.parent() {
                    boomerang_common::durable::fsync_dir(dir).map_err(io::Error::other)?;
                }
            }
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
        if !self.block_device {
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
                return Ok(());
            }
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
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
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
}
