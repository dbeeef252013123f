//! The retention journal: an undo journal of before-images, one per disk, in the
//! retention directory (`<retention_dir>/<disk>/<first lsn>.undo`).
//!
//! Why undo and not redo: the replica stays at the newest applied state, so manifests,
//! resyncs and the newest point cost nothing extra; history is only read when a point
//! older than the newest is materialized or the replica is rolled back.
//!
//! How: before the apply path overwrites a range of the replica, it reads the range's
//! current bytes and appends them here as one record, then fdatasyncs this journal, and
//! only then writes the replica. A record's lsn is its byte position in the disk's
//! journal (segments follow each other without gaps). A tag applied when the journal
//! ends at `L` makes a cut at lsn `L`; the cut is remembered by the disk record, which is
//! stored only after the replica's own fdatasync. To give the bytes of a cut at `L`:
//! start from the replica (or a copy of it taken at any time later), then write back
//! every record with lsn ≥ `L`, newest first. Each block ends with the before-image of
//! the first write after `L` that touched it, which is its content at the cut.
//!
//! Crash safety: a record is durable before the write it protects starts, so every
//! write the replica may hold has its record. A record whose write never happened
//! restores bytes equal to what the replica already holds at that time. A batch applied
//! again after a crash appends a second record whose before-image may already be the
//! new data; the older, true record comes later in the newest-first order and wins.
//!
//! Record format (little endian): magic `BUND`, version, codec (0 raw, 1 zstd, 2 zeros),
//! 2 reserved bytes, lsn u64, replica offset u64, raw length u64, payload length u32,
//! crc32 u32 over the 36 header bytes before it and the payload. At open, the last
//! segment is scanned and a torn tail (short or failing its checksum) is cut off and
//! never applied; earlier segments were synced before the next one began, so damage
//! there is reported as corruption and nothing is guessed.

use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use boomerang_common::durable::{create_dir_durable, fsync_dir};
use tracing::warn;

const MAGIC: [u8; 4] = *b"BUND";
const VERSION: u8 = 1;
/// Header bytes of a record.
pub const HEADER: usize = 40;
/// Largest raw range one record holds; the apply path splits larger writes.
pub const MAX_RECORD: usize = 4 << 20;
/// A segment is closed and a new one begun once it passes this size (by default):
/// pruning frees whole segments.
pub const SEGMENT_BYTES: u64 = 64 << 20;

const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;
const CODEC_ZERO: u8 = 2;

/// Errors of the retention journal.
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    /// The file system failed.
    #[error("retention journal {path}: {what}: {source}")]
    Io {
        /// File or directory.
        path: PathBuf,
        /// Step.
        what: &'static str,
        /// OS error.
        source: io::Error,
    },
    /// A record that was made durable does not read back.
    #[error("retention journal {path}: damaged record at byte {at}: {reason}; the points older than this record cannot be rebuilt: restore the retention directory from backup or prune those points")]
    Corrupt {
        /// Segment.
        path: PathBuf,
        /// Byte position in the segment.
        at: u64,
        /// What is wrong.
        reason: String,
    },
    /// Asked for history the journal no longer holds.
    #[error("retention journal {path}: lsn {lsn} is older than the oldest record kept ({oldest}); that point was pruned")]
    Pruned {
        /// Directory.
        path: PathBuf,
        /// Wanted lsn.
        lsn: u64,
        /// Oldest lsn held.
        oldest: u64,
    },
}

#[derive(Debug, Clone)]
struct Segment {
    base: u64,
    len: u64,
    path: PathBuf,
}

/// One disk's undo journal.
#[derive(Debug)]
pub struct UndoJournal {
    dir: PathBuf,
    segments: Vec<Segment>,
    current: File,
    unsynced: bool,
    pins: usize,
    segment_bytes: u64,
}

/// One decoded record header.
#[derive(Debug, Clone, Copy)]
struct Header {
    codec: u8,
    lsn: u64,
    offset: u64,
    raw_len: u64,
    payload_len: u32,
    crc: u32,
}

fn parse_header(b: &[u8; HEADER]) -> Result<Header, String> {
    if b[0..4] != MAGIC {
        return Err("bad magic".into());
    }
    if b[4] != VERSION {
        return Err(format!("unknown version {}", b[4]));
    }
    let u64_at = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(a)
    };
    let u32_at = |i: usize| {
        let mut a = [0u8; 4];
        a.copy_from_slice(&b[i..i + 4]);
        u32::from_le_bytes(a)
    };
    let h = Header {
        codec: b[5],
        lsn: u64_at(8),
        offset: u64_at(16),
        raw_len: u64_at(24),
        payload_len: u32_at(32),
        crc: u32_at(36),
    };
    if h.codec > CODEC_ZERO {
        return Err(format!("unknown codec {}", h.codec));
    }
    if h.raw_len == 0 || h.raw_len > MAX_RECORD as u64 {
        return Err(format!("raw length {} out of range", h.raw_len));
    }
    let max_payload = match h.codec {
        CODEC_RAW => h.raw_len,
        CODEC_ZSTD => h.raw_len + 1024,
        _ => 0,
    };
    if u64::from(h.payload_len) > max_payload {
        return Err(format!("payload length {} out of range", h.payload_len));
    }
    Ok(h)
}

fn encode_record(lsn: u64, offset: u64, raw_len: u64, codec: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(codec);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&raw_len.to_le_bytes());
    let plen = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&plen.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out);
    crc.update(payload);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn checksum(header: &[u8; HEADER], payload: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[..36]);
    crc.update(payload);
    crc.finalize()
}

fn segment_name(base: u64) -> String {
    format!("{base:020}.undo")
}

/// Where a record's bytes go when history is written back.
pub trait UndoTarget {
    /// Writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes `[offset, offset + len)` zeros.
    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()>;
}

impl UndoJournal {
    /// Opens (or creates) the journal in `dir`, cutting a torn tail off its last
    /// segment.
    pub fn open(dir: &Path) -> Result<Self, RetentionError> {
        let io_err = |path: &Path, what, source| RetentionError::Io {
            path: path.to_path_buf(),
            what,
            source,
        };
        create_dir_durable(dir)
            .map_err(|e| io_err(dir, "create directory", io::Error::other(e)))?;
        let mut bases = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| io_err(dir, "list", e))? {
            let entry = entry.map_err(|e| io_err(dir, "list", e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(stem) = name.strip_suffix(".undo") {
                if let Ok(base) = stem.parse::<u64>() {
                    bases.push(base);
                }
            }
        }
        bases.sort_unstable();
        let mut segments = Vec::new();
        for (i, base) in bases.iter().enumerate() {
            let path = dir.join(segment_name(*base));
            let last = i + 1 == bases.len();
            let len = scan_segment(&path, *base, last)?;
            if let Some(prev) = segments.last() {
                let prev: &Segment = prev;
                if prev.base + prev.len != *base {
                    return Err(RetentionError::Corrupt {
                        path: path.clone(),
                        at: 0,
                        reason: format!(
                            "segment starts at lsn {base} but the one before ends at {}",
                            prev.base + prev.len
                        ),
                    });
                }
            }
            segments.push(Segment {
                base: *base,
                len,
                path,
            });
        }
        if segments.is_empty() {
            let path = dir.join(segment_name(0));
            File::create(&path).map_err(|e| io_err(&path, "create segment", e))?;
            fsync_dir(dir).map_err(|e| io_err(dir, "fsync", io::Error::other(e)))?;
            segments.push(Segment {
                base: 0,
                len: 0,
                path,
            });
        }
        let last = segments.last().map(|s| s.path.clone()).unwrap_or_default();
        let current = OpenOptions::new()
            .append(true)
            .open(&last)
            .map_err(|e| io_err(&last, "open segment", e))?;
        Ok(UndoJournal {
            dir: dir.to_path_buf(),
            segments,
            current,
            unsynced: false,
            pins: 0,
            segment_bytes: SEGMENT_BYTES,
        })
    }

    /// Sets the size past which a new segment begins.
    pub fn with_segment_bytes(mut self, bytes: u64) -> Self {
        self.segment_bytes = bytes.max(1);
        self
    }

    /// The lsn the next record will get: a cut taken now is at this lsn.
    pub fn end_lsn(&self) -> u64 {
        self.segments.last().map_or(0, |s| s.base + s.len)
    }

    /// The oldest lsn still held.
    pub fn start_lsn(&self) -> u64 {
        self.segments.first().map_or(0, |s| s.base)
    }

    /// Bytes the journal holds on disk.
    pub fn size_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// The journal's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends the before-image `before` of the replica range at `offset` (at most
    /// [`MAX_RECORD`] bytes). Not durable until [`sync`](Self::sync).
    pub fn append(
        &mut self,
        offset: u64,
        before: &[u8],
        compressor: &mut zstd::bulk::Compressor<'_>,
    ) -> Result<(), RetentionError> {
        debug_assert!(!before.is_empty() && before.len() <= MAX_RECORD);
        if self
            .segments
            .last()
            .is_some_and(|s| s.len >= self.segment_bytes)
        {
            self.roll()?;
        }
        let lsn = self.end_lsn();
        let raw_len = before.len() as u64;
        let compressed;
        let (codec, payload): (u8, &[u8]) = if before.iter().all(|&b| b == 0) {
            (CODEC_ZERO, &[])
        } else {
            compressed = compressor.compress(before).unwrap_or_default();
            if !compressed.is_empty() && compressed.len() < before.len() {
                (CODEC_ZSTD, &compressed)
            } else {
                (CODEC_RAW, before)
            }
        };
        let rec = encode_record(lsn, offset, raw_len, codec, payload);
        let path = self.current_path();
        self.current
            .write_all(&rec)
            .map_err(|source| RetentionError::Io {
                path,
                what: "append",
                source,
            })?;
        if let Some(s) = self.segments.last_mut() {
            s.len += rec.len() as u64;
        }
        self.unsynced = true;
        Ok(())
    }

    /// Makes every appended record durable (one fdatasync).
    pub fn sync(&mut self) -> Result<(), RetentionError> {
        if self.unsynced {
            let path = self.current_path();
            self.current
                .sync_data()
                .map_err(|source| RetentionError::Io {
                    path,
                    what: "fdatasync",
                    source,
                })?;
            self.unsynced = false;
        }
        Ok(())
    }

    fn current_path(&self) -> PathBuf {
        self.segments
            .last()
            .map(|s| s.path.clone())
            .unwrap_or_default()
    }

    fn roll(&mut self) -> Result<(), RetentionError> {
        self.sync()?;
        let base = self.end_lsn();
        let path = self.dir.join(segment_name(base));
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(|source| RetentionError::Io {
                path: path.clone(),
                what: "create segment",
                source,
            })?;
        fsync_dir(&self.dir).map_err(|e| RetentionError::Io {
            path: self.dir.clone(),
            what: "fsync",
            source: io::Error::other(e),
        })?;
        self.current = file;
        self.segments.push(Segment { base, len: 0, path });
        Ok(())
    }

    /// Holds history while a point is being materialized: pruning waits.
    pub fn pin(&mut self) {
        self.pins += 1;
    }

    /// Releases a [`pin`](Self::pin).
    pub fn unpin(&mut self) {
        self.pins = self.pins.saturating_sub(1);
    }

    /// Deletes whole segments that hold only records older than `lsn` (the oldest
    /// point kept). The segment being written is always kept. Returns bytes freed.
    pub fn prune_below(&mut self, lsn: u64) -> Result<u64, RetentionError> {
        if self.pins > 0 {
            return Ok(0);
        }
        let mut freed = 0;
        while self.segments.len() > 1 && self.segments[0].base + self.segments[0].len <= lsn {
            let s = self.segments.remove(0);
            std::fs::remove_file(&s.path).map_err(|source| RetentionError::Io {
                path: s.path.clone(),
                what: "delete segment",
                source,
            })?;
            freed += s.len;
        }
        if freed > 0 {
            fsync_dir(&self.dir).map_err(|e| RetentionError::Io {
                path: self.dir.clone(),
                what: "fsync",
                source: io::Error::other(e),
            })?;
        }
        Ok(freed)
    }

    /// Discards every record from `lsn` on (a committed failover: history after the
    /// point is gone). `lsn` must be a record boundary (a cut's lsn).
    pub fn truncate_from(&mut self, lsn: u64) -> Result<(), RetentionError> {
        if lsn >= self.end_lsn() {
            return Ok(());
        }
        if lsn < self.start_lsn() {
            return Err(RetentionError::Pruned {
                path: self.dir.clone(),
                lsn,
                oldest: self.start_lsn(),
            });
        }
        while self.segments.len() > 1 && self.segments.last().is_some_and(|s| s.base > lsn) {
            if let Some(s) = self.segments.pop() {
                std::fs::remove_file(&s.path).map_err(|source| RetentionError::Io {
                    path: s.path.clone(),
                    what: "delete segment",
                    source,
                })?;
            }
        }
        let Some(last) = self.segments.last_mut() else {
            return Ok(());
        };
        let keep = lsn - last.base;
        let file = OpenOptions::new()
            .append(true)
            .open(&last.path)
            .map_err(|source| RetentionError::Io {
                path: last.path.clone(),
                what: "open segment",
                source,
            })?;
        file.set_len(keep)
            .and_then(|()| file.sync_all())
            .map_err(|source| RetentionError::Io {
                path: last.path.clone(),
                what: "truncate",
                source,
            })?;
        last.len = keep;
        self.current = file;
        self.unsynced = false;
        fsync_dir(&self.dir).map_err(|e| RetentionError::Io {
            path: self.dir.clone(),
            what: "fsync",
            source: io::Error::other(e),
        })
    }

    /// A reader over the records in `[from, end_lsn())`, for writing history back
    /// without holding the journal. Records appended later are not seen.
    pub fn history(&self, from: u64) -> Result<History, RetentionError> {
        if from < self.start_lsn() {
            return Err(RetentionError::Pruned {
                path: self.dir.clone(),
                lsn: from,
                oldest: self.start_lsn(),
            });
        }
        let end = self.end_lsn();
        let segments = self
            .segments
            .iter()
            .filter(|s| s.base + s.len > from)
            .cloned()
            .collect();
        Ok(History {
            segments,
            from,
            end,
        })
    }
}

/// The records of a range of a journal, to be written back newest first.
#[derive(Debug)]
pub struct History {
    segments: Vec<Segment>,
    from: u64,
    end: u64,
}

impl History {
    /// Bytes of journal this history spans.
    pub fn bytes(&self) -> u64 {
        self.end.saturating_sub(self.from)
    }

    /// Writes every record back into `target`, newest first. `progress` gets the
    /// journal bytes done so far. Each record is checked again before use.
    pub fn write_back(
        &self,
        target: &mut dyn UndoTarget,
        mut progress: impl FnMut(u64),
    ) -> Result<(), RetentionError> {
        let mut done = 0u64;
        let mut raw = Vec::new();
        let mut payload = Vec::new();
        let mut decompressor = zstd::bulk::Decompressor::new().map_err(|e| RetentionError::Io {
            path: PathBuf::new(),
            what: "start zstd",
            source: e,
        })?;
        for seg in self.segments.iter().rev() {
            let file = File::open(&seg.path).map_err(|source| RetentionError::Io {
                path: seg.path.clone(),
                what: "open segment",
                source,
            })?;
            let stop = (self.end.min(seg.base + seg.len)) - seg.base;
            let mut index = Vec::new();
            let mut at = 0u64;
            while at < stop {
                let h = read_header(&file, &seg.path, at)?;
                if seg.base + at >= self.from {
                    index.push((at, h));
                }
                at += HEADER as u64 + u64::from(h.payload_len);
            }
            for (at, h) in index.into_iter().rev() {
                let corrupt = |reason: String| RetentionError::Corrupt {
                    path: seg.path.clone(),
                    at,
                    reason,
                };
                payload.resize(h.payload_len as usize, 0);
                file.read_exact_at(&mut payload, at + HEADER as u64)
                    .map_err(|e| corrupt(format!("read payload: {e}")))?;
                let mut hb = [0u8; HEADER];
                file.read_exact_at(&mut hb, at)
                    .map_err(|e| corrupt(format!("read header: {e}")))?;
                if checksum(&hb, &payload) != h.crc {
                    return Err(corrupt("checksum mismatch".into()));
                }
                let raw_len = usize::try_from(h.raw_len).unwrap_or(MAX_RECORD);
                let io = |source| RetentionError::Io {
                    path: PathBuf::from("<target>"),
                    what: "write back",
                    source,
                };
                match h.codec {
                    CODEC_ZERO => target.zero(h.offset, h.raw_len).map_err(io)?,
                    CODEC_RAW => target.write(h.offset, &payload).map_err(io)?,
                    _ => {
                        raw.resize(raw_len, 0);
                        let n = decompressor
                            .decompress_to_buffer(&payload, &mut raw)
                            .map_err(|e| corrupt(format!("zstd: {e}")))?;
                        if n != raw_len {
                            return Err(corrupt(format!(
                                "zstd gave {n} bytes, the header says {raw_len}"
                            )));
                        }
                        target.write(h.offset, &raw).map_err(io)?;
                    }
                }
                done += HEADER as u64 + u64::from(h.payload_len);
                progress(done);
            }
        }
        Ok(())
    }
}

fn read_header(file: &File, path: &Path, at: u64) -> Result<Header, RetentionError> {
    let mut hb = [0u8; HEADER];
    file.read_exact_at(&mut hb, at)
        .map_err(|e| RetentionError::Corrupt {
            path: path.to_path_buf(),
            at,
            reason: format!("read header: {e}"),
        })?;
    parse_header(&hb).map_err(|reason| RetentionError::Corrupt {
        path: path.to_path_buf(),
        at,
        reason,
    })
}

/// Checks a segment's records; returns its valid length. In the last segment a torn
/// or damaged tail is cut off (it protects no write: a write starts only after its
/// record is durable); anywhere else damage is an error.
fn scan_segment(path: &Path, base: u64, last: bool) -> Result<u64, RetentionError> {
    let io_err = |what, source| RetentionError::Io {
        path: path.to_path_buf(),
        what,
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| io_err("open segment", e))?;
    let len = file.seek(SeekFrom::End(0)).map_err(|e| io_err("seek", e))?;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| io_err("seek", e))?;
    let mut reader = io::BufReader::with_capacity(1 << 20, &mut file);
    let mut at = 0u64;
    let mut payload = Vec::new();
    let bad: Option<String> = loop {
        if at == len {
            break None;
        }
        let mut hb = [0u8; HEADER];
        if let Err(e) = reader.read_exact(&mut hb) {
            break Some(format!("short header: {e}"));
        }
        let h = match parse_header(&hb) {
            Ok(h) => h,
            Err(e) => break Some(e),
        };
        if h.lsn != base + at {
            break Some(format!("lsn {} where {} was due", h.lsn, base + at));
        }
        if last {
            payload.resize(h.payload_len as usize, 0);
            if let Err(e) = reader.read_exact(&mut payload) {
                break Some(format!("short payload: {e}"));
            }
            if checksum(&hb, &payload) != h.crc {
                break Some("checksum mismatch".into());
            }
        } else if let Err(e) = reader.seek_relative(i64::from(h.payload_len)) {
            break Some(format!("seek: {e}"));
        }
        let next = at + HEADER as u64 + u64::from(h.payload_len);
        if next > len {
            break Some("record runs past the end of the segment".into());
        }
        at = next;
    };
    drop(reader);
    if let Some(reason) = bad {
        if !last {
            return Err(RetentionError::Corrupt {
                path: path.to_path_buf(),
                at,
                reason,
            });
        }
        warn!(segment = %path.display(), at, dropped = len - at, %reason, "torn tail of the retention journal dropped (it protected no write)");
        file.set_len(at).map_err(|e| io_err("truncate", e))?;
        file.sync_all().map_err(|e| io_err("fsync", e))?;
    }
    Ok(at)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    /// An in-memory disk for write-back.
    struct Mem(Vec<u8>);

    impl UndoTarget for Mem {
        fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
            let o = usize::try_from(offset).map_err(io::Error::other)?;
            self.0[o..o + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
            let o = usize::try_from(offset).map_err(io::Error::other)?;
            let l = usize::try_from(len).map_err(io::Error::other)?;
            self.0[o..o + l].fill(0);
            Ok(())
        }
    }

    fn write(j: &mut UndoJournal, disk: &mut [u8], offset: usize, data: &[u8]) {
        let mut c = zstd::bulk::Compressor::new(1).expect("zstd");
        j.append(offset as u64, &disk[offset..offset + data.len()], &mut c)
            .expect("append");
        j.sync().expect("sync");
        disk[offset..offset + data.len()].copy_from_slice(data);
    }

    fn noise(seed: u8, n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 7) as u8)
            .collect()
    }

    #[test]
    fn writing_back_from_a_cut_gives_the_bytes_at_the_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut j = UndoJournal::open(dir.path()).expect("open");
        let mut disk = vec![0u8; 1 << 16];
        write(&mut j, &mut disk, 0, &noise(1, 8192));
        let cut1 = (j.end_lsn(), disk.clone());
        write(&mut j, &mut disk, 4096, &noise(2, 8192));
        write(&mut j, &mut disk, 40000, &[0u8; 3000]);
        let cut2 = (j.end_lsn(), disk.clone());
        write(&mut j, &mut disk, 0, &noise(3, 20000));
        write(&mut j, &mut disk, 4096, &noise(4, 100));
        for (lsn, want) in [cut1, cut2] {
            let mut m = Mem(disk.clone());
            j.history(lsn)
                .expect("history")
                .write_back(&mut m, |_| {})
                .expect("write back");
            assert!(m.0 == want, "content at lsn {lsn} rebuilt exactly");
        }
    }

    #[test]
    fn a_torn_tail_is_dropped_at_open_and_never_applied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut disk = vec![0u8; 1 << 16];
        let (cut, want) = {
            let mut j = UndoJournal::open(dir.path()).expect("open");
            write(&mut j, &mut disk, 0, &noise(1, 4096));
            let cut = (j.end_lsn(), disk.clone());
            write(&mut j, &mut disk, 0, &noise(2, 4096));
            cut
        };
        // A record whose write never happened, torn halfway.
        let seg = dir.path().join(segment_name(0));
        let len = std::fs::metadata(&seg).expect("meta").len();
        let rec = encode_record(len, 8192, 4096, CODEC_RAW, &noise(9, 4096));
        let mut f = OpenOptions::new().append(true).open(&seg).expect("open");
        f.write_all(&rec[..rec.len() / 2]).expect("torn write");
        drop(f);
        let j = UndoJournal::open(dir.path()).expect("reopen");
        assert_eq!(j.end_lsn(), len, "the torn record is cut off");
        let mut m = Mem(disk.clone());
        j.history(cut)
            .expect("history")
            .write_back(&mut m, |_| {})
            .expect("back");
        assert!(m.0 == want);
        // A flipped payload bit in the last record is a torn tail too.
        drop(j);
        let mut bytes = std::fs::read(&seg).expect("read");
        let last = bytes.len() - 10;
        bytes[last] ^= 1;
        std::fs::write(&seg, &bytes).expect("write");
        let j = UndoJournal::open(dir.path()).expect("reopen");
        assert!(j.end_lsn() < len, "a damaged last record is dropped");
    }

    #[test]
    fn a_damaged_record_in_an_older_segment_fails_the_write_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut j = UndoJournal::open(dir.path())
            .expect("open")
            .with_segment_bytes(1024);
        // Non-zero before-images, so the first record carries a payload.
        let mut disk = noise(77, 1 << 20);
        for i in 0..4 {
            write(&mut j, &mut disk, i * 65536, &noise(i as u8 + 1, 65536));
            write(&mut j, &mut disk, i * 65536, &noise(i as u8 + 9, 65536));
        }
        assert!(j.segments.len() >= 3, "several segments");
        let first = j.segments[0].path.clone();
        drop(j);
        // Flip one payload byte of the first record of a closed segment: open does not
        // read closed payloads, but giving history back checks every record it uses.
        let mut bytes = std::fs::read(&first).expect("read");
        bytes[HEADER + 10] ^= 0x20;
        std::fs::write(&first, &bytes).expect("write");
        let j = UndoJournal::open(dir.path()).expect("reopen");
        let mut m = Mem(disk.clone());
        let err = j
            .history(0)
            .expect("history")
            .write_back(&mut m, |_| {})
            .expect_err("a damaged record is refused");
        assert!(matches!(err, RetentionError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn segments_roll_prune_and_truncate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut j = UndoJournal::open(dir.path()).expect("open");
        let mut c = zstd::bulk::Compressor::new(1).expect("zstd");
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let big: Vec<u8> = (0..MAX_RECORD)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        // Incompressible: stored raw, so 20 records pass one segment.
        let mut cuts = Vec::new();
        for i in 0..20u64 {
            cuts.push(j.end_lsn());
            let mut rec = big.clone();
            rec[0] = i as u8;
            j.append(i * 4096, &rec, &mut c).expect("append");
        }
        j.sync().expect("sync");
        assert!(j.segments.len() >= 2, "rolled into a second segment");
        let before = j.size_bytes();
        let freed = j.prune_below(cuts[19]).expect("prune");
        assert!(freed > 0 && j.size_bytes() == before - freed);
        assert!(j.history(cuts[0]).is_err(), "pruned history is refused");
        let end = j.end_lsn();
        drop(j);
        let mut j = UndoJournal::open(dir.path()).expect("reopen");
        assert_eq!(j.end_lsn(), end);
        j.truncate_from(cuts[19]).expect("truncate");
        assert_eq!(j.end_lsn(), cuts[19]);
        drop(j);
        let j = UndoJournal::open(dir.path()).expect("reopen");
        assert_eq!(j.end_lsn(), cuts[19], "truncation is durable");
    }
}
