//! The scan source: reads the disk with large sequential reads, hashes fixed chunks
//! with blake3 and keeps the chunks whose hash differs from the replica's. Block
//! devices are read with O_DIRECT so a pass after a freeze sees what the file system
//! wrote, not stale pages of the device's cache.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use boomerang_common::delta::ExtentEncoder;
use boomerang_common::ChunkHash;

use crate::source::{ChangeSource, Geometry, UnitOutput};

/// Alignment O_DIRECT needs for buffers, offsets and lengths.
const DIRECT_ALIGN: usize = 4096;

/// A disk read by scanning.
#[derive(Debug)]
pub struct ScanSource {
    path: PathBuf,
    file: File,
    direct: bool,
    geometry: Geometry,
}

impl ScanSource {
    /// Opens `path` read-only (O_DIRECT for block devices).
    pub fn open(path: &Path, chunk_size: u32, unit_size: u64) -> io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        let direct = meta.file_type().is_block_device();
        let mut opts = OpenOptions::new();
        opts.read(true);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let mut file = opts.open(path)?;
        let size = file.seek(SeekFrom::End(0))?;
        if !direct {
            // SAFETY: plain syscall on an fd we own; advisory only.
            unsafe {
                libc::posix_fadvise(
                    std::os::fd::AsRawFd::as_raw_fd(&file),
                    0,
                    0,
                    libc::POSIX_FADV_SEQUENTIAL,
                );
            }
        }
        Ok(ScanSource {
            path: path.to_path_buf(),
            file,
            direct,
            geometry: Geometry {
                size,
                chunk_size,
                unit_size,
            },
        })
    }

    /// The disk's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads `len` bytes at `offset` (4 KiB aligned for block devices) into `buf`
    /// (scratch space, grown as needed) and returns them.
    pub fn read_unit<'b>(
        &self,
        offset: u64,
        len: usize,
        buf: &'b mut Vec<u8>,
    ) -> io::Result<&'b [u8]> {
        // Over-allocate so an aligned window of `len` (rounded up) fits.
        let padded = len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        if buf.len() < padded + DIRECT_ALIGN {
            buf.resize(padded + DIRECT_ALIGN, 0);
        }
        let start = if self.direct {
            buf.as_ptr().align_offset(DIRECT_ALIGN)
        } else {
            0
        };
        let want = if self.direct { padded } else { len };
        let window = &mut buf[start..start + want];
        let mut done = 0;
        while done < len {
            match self.file.read_at(&mut window[done..], offset + done as u64) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "{} ended at {} while reading {len} bytes at {offset}: did the disk shrink?",
                            self.path.display(),
                            offset + done as u64
                        ),
                    ))
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(&buf[start..start + len])
    }
}

impl ChangeSource for ScanSource {
    fn name(&self) -> &'static str {
        "scan"
    }

    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn build_unit(
        &self,
        i: u64,
        replica: Option<&[ChunkHash]>,
        encoder: &mut ExtentEncoder,
        buf: &mut Vec<u8>,
    ) -> io::Result<UnitOutput> {
        let (offset, len) = self.geometry.unit_range(i);
        let len = usize::try_from(len).map_err(io::Error::other)?;
        let data = self.read_unit(offset, len, buf)?;
        let mut out = UnitOutput {
            bytes_read: len as u64,
            ..UnitOutput::default()
        };
        let cs = self.geometry.chunk_size as usize;
        for (j, chunk) in data.chunks(cs).enumerate() {
            out.chunks += 1;
            let hash = ChunkHash::of(chunk);
            if replica.and_then(|r| r.get(j)) == Some(&hash) {
                continue;
            }
            let extent = encoder.encode(offset + (j * cs) as u64, chunk, hash);
            out.chunks_changed += 1;
            out.bytes_changed += chunk.len() as u64;
            if extent.codec == boomerang_common::Codec::Zero {
                out.chunks_zero += 1;
            }
            out.bytes_payload += extent.payload.len() as u64;
            out.extents.push(extent);
        }
        Ok(out)
    }
}
