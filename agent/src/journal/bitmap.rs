//! The dirty bitmap of bitmap mode: which [`BLOCK_SIZE`] blocks of a disk were written
//! since they were last shipped, one bit per block (32 MiB of memory per TiB of disk).
//! Ordering is not kept: a run taken from the bitmap ships the block's content as it is
//! when the shipper reads it.
//!
//! Saved on a clean shutdown so a clean restart keeps its dirtiness, with
//! [`durable::write_atomic`](boomerang_common::durable::write_atomic):
//! ```text
//!  0       4       6       8               16              20      24
//!  +-------+-------+-------+---------------+---------------+-------+------------+-------+
//!  | magic | ver   | 0     | disk size     | block size    | 0     | words      | crc32 |
//!  | BMDB  | u16LE | u16LE | u64 LE        | u32 LE (4096) | u32   | u64 LE ... | u32LE |
//!  +-------+-------+-------+---------------+---------------+-------+------------+-------+
//! ```
//! `words` is `ceil(ceil(disk size / 4096) / 64)` little-endian u64s, bit `i % 64` of
//! word `i / 64` standing for block `i`; bits past the last block are zero. The crc32
//! covers everything before it. The file's length is checked against the length the
//! header implies before the words are read.

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use boomerang_common::durable::{write_atomic, DurableError};
use thiserror::Error;

/// Granularity of the dirty bitmap.
pub const BLOCK_SIZE: u64 = BLOCK_SIZE_U32 as u64;
const BLOCK_SIZE_U32: u32 = 4096;
const MAGIC: [u8; 4] = *b"BMDB";
const VERSION: u16 = 1;
const HEADER_LEN: usize = 24;
const CRC_LEN: usize = 4;

/// Errors of saving or loading a dirty bitmap.
#[derive(Debug, Error)]
pub enum BitmapError {
    /// An IO step failed.
    #[error("dirty bitmap {path}: {step}: {source}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// Which file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The file is not an intact dirty bitmap.
    #[error(
        "dirty bitmap {path} is damaged ({reason}); the disk's changes since the last \
         shipped point are unknown: remove the file and let the agent resync the disk"
    )]
    Damaged {
        /// Which file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Writing the file durably failed.
    #[error(transparent)]
    Durable(#[from] DurableError),
}

/// One bit per [`BLOCK_SIZE`] block of a disk: set when the block was written and not
/// yet taken for shipping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    disk_size: u64,
    blocks: u64,
    words: Vec<u64>,
    dirty: u64,
    /// Block where the next [`DirtyBitmap::take_runs`] starts looking, so blocks at
    /// high offsets are not starved by blocks at low ones being written again.
    cursor: u64,
}

/// `n` as `usize`: Boomerang runs on 64-bit hosts, and the numbers converted here are
/// bitmap word indexes and counts (at most `2^64 / 4096 / 64 = 2^46`) or the length of
/// a bitmap file already checked against its header.
#[allow(clippy::cast_possible_truncation)]
fn to_usize(n: u64) -> usize {
    n as usize
}

/// Index of the word holding `block`'s bit.
fn word(block: u64) -> usize {
    to_usize(block / 64)
}

fn words_for(blocks: u64) -> u64 {
    blocks.div_ceil(64)
}

/// The bits `from..to` (within one word, `from < to <= 64`).
fn mask(from: u64, to: u64) -> u64 {
    let high = if to == 64 { u64::MAX } else { (1u64 << to) - 1 };
    high & !((1u64 << from) - 1)
}

impl DirtyBitmap {
    /// A clean bitmap over a disk of `disk_size` bytes.
    pub fn new(disk_size: u64) -> Self {
        let blocks = disk_size.div_ceil(BLOCK_SIZE);
        DirtyBitmap {
            disk_size,
            blocks,
            words: vec![0; to_usize(words_for(blocks))],
            dirty: 0,
            cursor: 0,
        }
    }

    /// Size of the disk the bitmap covers.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// Marks the blocks touched by a write of `len` bytes at `offset` dirty. The part of
    /// a write past the end of the disk is ignored.
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / BLOCK_SIZE;
        let end = offset
            .saturating_add(len)
            .div_ceil(BLOCK_SIZE)
            .min(self.blocks);
        if first < end {
            self.set_range(first, end, true);
        }
    }

    /// Whether the block holding byte `offset` is dirty.
    pub fn is_dirty(&self, offset: u64) -> bool {
        let block = offset / BLOCK_SIZE;
        block < self.blocks && self.words[word(block)] & (1 << (block % 64)) != 0
    }

    /// No block is dirty.
    pub fn is_empty(&self) -> bool {
        self.dirty == 0
    }

    /// Number of dirty blocks.
    pub fn count(&self) -> u64 {
        self.dirty
    }

    /// Takes dirty blocks for shipping, cleaning them: returns runs `(offset, len)` of
    /// adjacent dirty blocks, about `max_bytes` in all (at least one block when any is
    /// dirty). A run ending at the last block is cut to the disk size. Runs come in
    /// disk order from where the last call stopped, wrapping around once.
    pub fn take_runs(&mut self, max_bytes: u64) -> Vec<(u64, u64)> {
        let budget = (max_bytes / BLOCK_SIZE).max(1);
        let mut runs = Vec::new();
        let mut taken = 0;
        let start = self.cursor.min(self.blocks);
        let mut pos = start;
        let mut limit = self.blocks;
        let mut wrapped = false;
        while self.dirty > 0 && taken < budget {
            let Some(first) = self.next_set(pos, limit) else {
                if wrapped {
                    break;
                }
                wrapped = true;
                pos = 0;
                limit = start;
                continue;
            };
            let end = self.next_clear(first, limit).min(first + (budget - taken));
            self.set_range(first, end, false);
            let offset = first * BLOCK_SIZE;
            let stop = (end * BLOCK_SIZE).min(self.disk_size);
            runs.push((offset, stop - offset));
            taken += end - first;
            pos = end;
        }
        self.cursor = if pos >= self.blocks { 0 } else { pos };
        runs
    }

    /// First set bit in `from..limit`.
    fn next_set(&self, from: u64, limit: u64) -> Option<u64> {
        let mut b = from;
        while b < limit {
            let w = self.words[word(b)] >> (b % 64);
            if w != 0 {
                let found = b + u64::from(w.trailing_zeros());
                return (found < limit).then_some(found);
            }
            b = (b / 64 + 1) * 64;
        }
        None
    }

    /// First clear bit in `from..limit`, or `limit`.
    fn next_clear(&self, from: u64, limit: u64) -> u64 {
        let mut b = from;
        while b < limit {
            let w = !self.words[word(b)] >> (b % 64);
            if w != 0 {
                return (b + u64::from(w.trailing_zeros())).min(limit);
            }
            b = (b / 64 + 1) * 64;
        }
        limit
    }

    fn set_range(&mut self, from: u64, to: u64, dirty: bool) {
        let mut b = from;
        while b < to {
            let word_end = ((b / 64 + 1) * 64).min(to);
            let m = mask(b % 64, word_end - (b / 64) * 64);
            let w = &mut self.words[word(b)];
            if dirty {
                self.dirty += u64::from((m & !*w).count_ones());
                *w |= m;
            } else {
                self.dirty -= u64::from((m & *w).count_ones());
                *w &= !m;
            }
            b = word_end;
        }
    }

    /// Saves the bitmap durably to `path` (on a clean shutdown).
    ///
    /// After [`DirtyBitmap::load`] at start-up, remove the file (and fsync its
    /// directory) before shipping goes on, so that a later unclean stop cannot bring
    /// back a stale bitmap; an unclean stop starts a new generation and a resync anyway.
    pub fn save(&self, path: &Path) -> Result<(), BitmapError> {
        let mut image = Vec::with_capacity(HEADER_LEN + self.words.len() * 8 + CRC_LEN);
        image.extend_from_slice(&MAGIC);
        image.extend_from_slice(&VERSION.to_le_bytes());
        image.extend_from_slice(&0u16.to_le_bytes());
        image.extend_from_slice(&self.disk_size.to_le_bytes());
        image.extend_from_slice(&BLOCK_SIZE_U32.to_le_bytes());
        image.extend_from_slice(&0u32.to_le_bytes());
        for w in &self.words {
            image.extend_from_slice(&w.to_le_bytes());
        }
        let crc = crc32fast::hash(&image);
        image.extend_from_slice(&crc.to_le_bytes());
        write_atomic(path, &image, 0o600)?;
        Ok(())
    }

    /// Loads a bitmap saved by [`DirtyBitmap::save`]. A file that is not an intact
    /// bitmap of this version is refused with [`BitmapError::Damaged`]; its length is
    /// checked against its header before anything else is read.
    pub fn load(path: &Path) -> Result<Self, BitmapError> {
        let io_err = |step| {
            move |source| BitmapError::Io {
                step,
                path: path.to_path_buf(),
                source,
            }
        };
        let damaged = |reason: String| BitmapError::Damaged {
            path: path.to_path_buf(),
            reason,
        };
        let mut file = std::fs::File::open(path).map_err(io_err("open"))?;
        let file_len = file.metadata().map_err(io_err("stat"))?.len();
        let mut header = [0u8; HEADER_LEN];
        if file_len < (HEADER_LEN + CRC_LEN) as u64 {
            return Err(damaged(format!("file is only {file_len} bytes")));
        }
        file.read_exact(&mut header).map_err(io_err("read"))?;
        if header[0..4] != MAGIC {
            return Err(damaged("bad magic: not a dirty bitmap".into()));
        }
        let version = u16::from_le_bytes([header[4], header[5]]);
        if version != VERSION {
            return Err(damaged(format!(
                "format version {version} is not supported (this build writes {VERSION})"
            )));
        }
        let mut size = [0u8; 8];
        size.copy_from_slice(&header[8..16]);
        let disk_size = u64::from_le_bytes(size);
        let block_size = u32::from_le_bytes([header[16], header[17], header[18], header[19]]);
        if u64::from(block_size) != BLOCK_SIZE {
            return Err(damaged(format!(
                "block size {block_size}, this build uses {BLOCK_SIZE}"
            )));
        }
        let nwords = words_for(disk_size.div_ceil(BLOCK_SIZE));
        let expected = nwords
            .checked_mul(8)
            .and_then(|n| n.checked_add((HEADER_LEN + CRC_LEN) as u64));
        if expected != Some(file_len) {
            return Err(damaged(format!(
                "file is {file_len} bytes, a bitmap of a {disk_size}-byte disk takes {}",
                expected.map_or_else(|| "more".to_string(), |n| n.to_string())
            )));
        }
        // Bounded by the length check above: the file holds exactly this much.
        let mut rest = vec![0u8; to_usize(file_len) - HEADER_LEN];
        file.read_exact(&mut rest).map_err(io_err("read"))?;
        let (body, crc) = rest.split_at(rest.len() - CRC_LEN);
        let mut h = crc32fast::Hasher::new();
        h.update(&header);
        h.update(body);
        if h.finalize() != u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) {
            return Err(damaged("checksum mismatch".into()));
        }
        let mut bitmap = DirtyBitmap::new(disk_size);
        for (w, bytes) in bitmap.words.iter_mut().zip(body.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(bytes);
            *w = u64::from_le_bytes(b);
        }
        let tail = bitmap.blocks % 64;
        if tail != 0 {
            if let Some(last) = bitmap.words.last() {
                if last & !mask(0, tail) != 0 {
                    return Err(damaged("bits set past the end of the disk".into()));
                }
            }
        }
        bitmap.dirty = bitmap.words.iter().map(|w| u64::from(w.count_ones())).sum();
        Ok(bitmap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: u64 = BLOCK_SIZE;

    #[test]
    fn marks_cover_every_touched_block() {
        let mut bm = DirtyBitmap::new(100 * B);
        bm.mark(B - 1, 2); // straddles blocks 0 and 1
        assert_eq!(bm.count(), 2);
        bm.mark(10 * B, B); // exactly block 10
        assert_eq!(bm.count(), 3);
        bm.mark(10 * B + 5, 1); // again: no change
        assert_eq!(bm.count(), 3);
        bm.mark(0, 0);
        assert_eq!(bm.count(), 3);
        bm.mark(99 * B, 10 * B); // runs past the end: clamped
        assert_eq!(bm.count(), 4);
        assert!(bm.is_dirty(99 * B) && bm.is_dirty(B) && !bm.is_dirty(2 * B));
        assert!(!bm.is_dirty(100 * B));
    }

    #[test]
    fn runs_coalesce_adjacent_blocks_across_words() {
        let mut bm = DirtyBitmap::new(1000 * B);
        bm.mark(60 * B, 10 * B); // blocks 60..70, across a word boundary
        bm.mark(70 * B, 1); // block 70: adjacent
        bm.mark(72 * B, B); // block 72: a gap before it
        bm.mark(128 * B, 128 * B); // two whole words
        assert_eq!(bm.count(), 11 + 1 + 128);
        let runs = bm.take_runs(u64::MAX);
        assert_eq!(
            runs,
            vec![(60 * B, 11 * B), (72 * B, B), (128 * B, 128 * B)]
        );
        assert!(bm.is_empty());
        assert!(bm.take_runs(u64::MAX).is_empty());
    }

    #[test]
    fn runs_respect_the_budget_and_resume_after_it() {
        let mut bm = DirtyBitmap::new(1000 * B);
        bm.mark(0, 10 * B);
        bm.mark(500 * B, 2 * B);
        assert_eq!(bm.take_runs(4 * B), vec![(0, 4 * B)]);
        assert_eq!(bm.take_runs(4 * B), vec![(4 * B, 4 * B)]);
        // Less than a block still takes one block.
        assert_eq!(bm.take_runs(1), vec![(8 * B, B)]);
        // Blocks dirtied behind the cursor are found after wrapping around.
        bm.mark(0, B);
        assert_eq!(
            bm.take_runs(100 * B),
            vec![(9 * B, B), (500 * B, 2 * B), (0, B)]
        );
        assert!(bm.is_empty());
    }

    #[test]
    fn the_last_run_is_cut_to_the_disk_size() {
        let size = 10 * B + 100;
        let mut bm = DirtyBitmap::new(size);
        bm.mark(size - 1, 1);
        bm.mark(9 * B, 1);
        assert_eq!(bm.take_runs(u64::MAX), vec![(9 * B, B + 100)]);
    }

    #[test]
    fn save_load_round_trip() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("vda.bitmap");
        let mut bm = DirtyBitmap::new(1000 * B + 7);
        bm.mark(3 * B, 5 * B);
        bm.mark(1000 * B, 7);
        bm.save(&path)?;
        let mut loaded = DirtyBitmap::load(&path)?;
        assert_eq!(loaded.count(), bm.count());
        assert_eq!(loaded.disk_size(), bm.disk_size());
        loaded.cursor = bm.cursor;
        assert_eq!(loaded, bm);
        assert_eq!(
            loaded.take_runs(u64::MAX),
            vec![(3 * B, 5 * B), (1000 * B, 7)]
        );
        let empty = DirtyBitmap::new(0);
        empty.save(&path)?;
        assert!(DirtyBitmap::load(&path)?.is_empty());
        Ok(())
    }

    #[test]
    fn damaged_files_are_refused_clearly() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("vda.bitmap");
        let mut bm = DirtyBitmap::new(64 * 1024 * B);
        bm.mark(12345 * B, B);
        bm.save(&path)?;
        let good = std::fs::read(&path)?;

        let check = |bytes: &[u8], what: &str| -> Result<(), Box<dyn std::error::Error>> {
            std::fs::write(&path, bytes)?;
            let err = DirtyBitmap::load(&path).expect_err("damaged bitmap must be refused");
            let msg = err.to_string();
            assert!(matches!(err, BitmapError::Damaged { .. }), "{msg}");
            assert!(msg.contains(what), "{msg} lacks {what}");
            assert!(msg.contains("resync"), "{msg}");
            Ok(())
        };
        let mut flipped = good.clone();
        flipped[HEADER_LEN + 100] ^= 0x10;
        check(&flipped, "checksum")?;
        check(&good[..good.len() - 1], "bytes")?;
        check(&good[..10], "only 10 bytes")?;
        let mut magic = good.clone();
        magic[0] = b'X';
        check(&magic, "magic")?;
        // A header claiming a huge disk is refused by length, before allocating.
        let mut huge = good.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        check(&huge, "bytes")?;
        Ok(())
    }
}
