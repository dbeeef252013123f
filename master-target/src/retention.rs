//! The retention journal: an undo journal of before-images, one per disk, in the
//! retention directory (`<retention_dir>/<disk>/`), kept in a [`seglog`] log.
//!
//! Why undo and not redo: the replica stays at the newest applied state, so manifests,
//! resyncs and the newest point cost nothing extra; history is only read when a point
//! older than the newest is materialized or the replica is rolled back.
//!
//! How: before the apply path overwrites a range of the replica, it reads the range's
//! current bytes and appends them here as one record, then fdatasyncs this journal, and
//! only then writes the replica. A record's lsn is its number in the disk's journal
//! (0, 1, 2, ...; contiguous). A tag applied when the journal's next lsn is `L` makes
//! a cut at lsn `L`; the cut is remembered by the disk record, which is stored only
//! after the replica's own fdatasync. To give the bytes of a cut at `L`: start from the
//! replica (or a copy of it taken at any time later), then write back every record
//! with lsn ≥ `L`, newest first. Each block ends with the before-image of the first
//! write after `L` that touched it, which is its content at the cut.
//!
//! Crash safety: a record is durable before the write it protects starts, so every
//! write the replica may hold has its record. A record whose write never happened
//! restores bytes equal to what the replica already holds at that time. A batch applied
//! again after a crash appends a second record whose before-image may already be the
//! new data; the older, true record comes later in the newest-first order and wins.
//!
//! Storage faults (seglog's rules): an append that fails is cut back before the error
//! is returned, so the next record follows the last good one and no restart can cut
//! off a record whose replica write happened; a failed fdatasync poisons the journal:
//! the disk applies nothing more that needs history until the master target is
//! restarted, which recovers the journal from what is durable. A full file system is
//! [`RetentionError::Full`]: the disk stops applying (the process server keeps the
//! batches) until points are pruned or space is given.
//!
//! Layout: segments `seg-<first lsn, 16 hex>.undo` of a seglog log of kind `MUND`;
//! the record kind is the codec (1 raw, 2 zstd, 3 zeros) and the payload is
//! `replica offset u64 LE | raw length u64 LE | data`. Only the last segment's tail
//! may be torn (cut at open: it protected no write); damage elsewhere is corruption,
//! found at open (segment headers, lsns) or when history is read (checksums), and
//! nothing is guessed. Segments of the first format (`<byte lsn, 20 digits>.undo`,
//! lsns as byte positions) are refused with what to do.

use std::io;
use std::path::{Path, PathBuf};

use boomerang_common::seglog::{self, Log, LogConfig, LogError, Retire, SegmentInfo, Segments};

/// Largest raw range one record holds; the apply path splits larger writes.
pub const MAX_RECORD: usize = 4 << 20;
/// A segment is closed and a new one begun once it passes this size (by default):
/// pruning frees whole segments.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// Bytes of a record's payload before its data.
const PAYLOAD_HEAD: usize = 16;

const CODEC_RAW: u8 = 1;
const CODEC_ZSTD: u8 = 2;
const CODEC_ZERO: u8 = 3;
const SCOPE: &str = "undo";

/// Errors of the retention journal.
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    /// A step outside the log failed (writing history back into its target).
    #[error("retention journal {path}: {what}: {source}")]
    Io {
        /// File or directory.
        path: PathBuf,
        /// Step.
        what: &'static str,
        /// OS error.
        source: io::Error,
    },
    /// The log failed (IO, damage, another version); it names the file.
    #[error("retention journal: {0}")]
    Log(LogError),
    /// An fdatasync failed: the journal takes nothing more until restart.
    #[error("retention journal {dir}: {cause}; the disk applies nothing more until the master target is restarted (it recovers the journal from what is durable): check the disk first")]
    Poisoned {
        /// Directory.
        dir: PathBuf,
        /// The failure.
        cause: String,
    },
    /// The file system holding the journal is full.
    #[error("retention journal {dir}: the file system is full ({source}); the disk stops applying (the process server keeps its batches) until there is room: give the retention directory more space, or cap the journal (`max_journal_bytes` under `[retention]` in the master target's config, then restart it) so that the oldest points are pruned")]
    Full {
        /// Directory.
        dir: PathBuf,
        /// The OS error.
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
    /// Segments of the first format, whose lsns were byte positions.
    #[error("retention journal {dir}: {file} is of the first journal format (lsns were byte positions), which this version does not read: the points it backs cannot be rebuilt by this version; move {dir} away (the disk's older points are then lost; newer ones are taken from here on) or run the version that wrote it")]
    OldFormat {
        /// Directory.
        dir: PathBuf,
        /// One old segment.
        file: String,
    },
}

fn log_error(dir: &Path, e: LogError) -> RetentionError {
    match e {
        LogError::Poisoned { cause, .. } => RetentionError::Poisoned {
            dir: dir.to_path_buf(),
            cause,
        },
        LogError::Io { source, .. } if seglog::is_out_of_space(&source) => RetentionError::Full {
            dir: dir.to_path_buf(),
            source,
        },
        LogError::Corrupt {
            path,
            offset,
            reason,
            ..
        } => RetentionError::Corrupt {
            path,
            at: offset,
            reason,
        },
        e => RetentionError::Log(e),
    }
}

/// One disk's undo journal.
#[derive(Debug)]
pub struct UndoJournal {
    dir: PathBuf,
    log: Log,
    pins: usize,
}

/// Where a record's bytes go when history is written back.
pub trait UndoTarget {
    /// Writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes `[offset, offset + len)` zeros.
    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()>;
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// A decoded record: codec, replica offset, raw length, data.
fn parse_record(kind: u8, payload: &[u8]) -> Result<(u8, u64, u64, &[u8]), String> {
    if payload.len() < PAYLOAD_HEAD {
        return Err(format!("record payload of {} bytes", payload.len()));
    }
    let (offset, raw_len) = (le_u64(payload), le_u64(&payload[8..]));
    let data = &payload[PAYLOAD_HEAD..];
    if raw_len == 0 || raw_len > MAX_RECORD as u64 {
        return Err(format!("raw length {raw_len} out of range"));
    }
    let fits = match kind {
        CODEC_RAW => data.len() as u64 == raw_len,
        CODEC_ZSTD => data.len() as u64 <= raw_len + 1024,
        CODEC_ZERO => data.is_empty(),
        other => return Err(format!("unknown codec {other}")),
    };
    if !fits {
        return Err(format!(
            "{} data bytes for {raw_len} raw bytes in codec {kind}",
            data.len()
        ));
    }
    Ok((kind, offset, raw_len, data))
}

impl UndoJournal {
    /// Opens (or creates) the journal in `dir` with segments of about `segment_bytes`,
    /// cutting a torn tail off its last segment. `oldest_needed`: the lsn of the oldest
    /// cut the disk keeps, if any; history from it on must all be there.
    pub fn open(
        dir: &Path,
        segment_bytes: u64,
        oldest_needed: Option<u64>,
    ) -> Result<Self, RetentionError> {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let old = name.strip_suffix(".undo").is_some_and(|stem| {
                    stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit())
                });
                if old {
                    return Err(RetentionError::OldFormat {
                        dir: dir.to_path_buf(),
                        file: name,
                    });
                }
            }
        }
        let cfg = LogConfig {
            scope: SCOPE,
            kind: *b"MUND",
            extension: "undo",
            segment_target: segment_bytes.max(1),
            max_payload: PAYLOAD_HEAD + MAX_RECORD + 1024,
            retire: Retire::Prefix,
            verify_closed: false,
            index: false,
        };
        let check = |seen: seglog::Visit<'_>| match seen.payload {
            Some(p) => parse_record(seen.kind, p).map(|_| ()),
            None => Ok(()),
        };
        let (log, _) =
            Log::open_needing(dir, cfg, oldest_needed.unwrap_or(0), oldest_needed, check)
                .map_err(|e| log_error(dir, e))?;
        Ok(UndoJournal {
            dir: dir.to_path_buf(),
            log,
            pins: 0,
        })
    }

    /// Why the journal refuses everything until the master target restarts (a failed
    /// fdatasync, or a failed append it could not cut back), if it does.
    pub fn poisoned(&self) -> Option<String> {
        self.log.segments().poisoned()
    }

    /// The lsn the next record will get: a cut taken now is at this lsn.
    pub fn end_lsn(&self) -> u64 {
        self.log.next_lsn()
    }

    /// The oldest lsn still held.
    pub fn start_lsn(&self) -> u64 {
        self.log.segments().first_lsn()
    }

    /// Bytes the journal holds on disk.
    pub fn size_bytes(&self) -> u64 {
        self.log.segments().bytes()
    }

    /// Bytes of the records from `lsn` on (what keeping a cut at `lsn` costs).
    pub fn bytes_from(&self, lsn: u64) -> Result<u64, RetentionError> {
        let mut total = 0;
        for seg in self.log.segments().list() {
            if seg.end_lsn <= lsn {
                continue;
            }
            if seg.first_lsn >= lsn {
                total += seg.bytes;
            } else {
                let pos = self
                    .log
                    .segments()
                    .position(lsn)
                    .map_err(|e| log_error(&self.dir, e))?;
                total += seg.bytes - pos.offset;
            }
        }
        Ok(total)
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
        let raw_len = before.len() as u64;
        let compressed;
        let (codec, data): (u8, &[u8]) = if before.iter().all(|&b| b == 0) {
            (CODEC_ZERO, &[])
        } else {
            compressed = compressor.compress(before).unwrap_or_default();
            if !compressed.is_empty() && compressed.len() < before.len() {
                (CODEC_ZSTD, &compressed)
            } else {
                (CODEC_RAW, before)
            }
        };
        let mut head = [0u8; PAYLOAD_HEAD];
        head[..8].copy_from_slice(&offset.to_le_bytes());
        head[8..].copy_from_slice(&raw_len.to_le_bytes());
        self.log
            .append(codec, &[&head, data])
            .map(|_| ())
            .map_err(|e| log_error(&self.dir, e))
    }

    /// Makes every appended record durable (one fdatasync). A failure poisons the
    /// journal.
    pub fn sync(&mut self) -> Result<(), RetentionError> {
        self.log
            .sync()
            .map(|_| ())
            .map_err(|e| log_error(&self.dir, e))
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
        self.log
            .segments()
            .retire_below(lsn)
            .map_err(|e| log_error(&self.dir, e))
    }

    /// Discards every record from `lsn` on (a committed failover: history after the
    /// point is gone). `lsn` must be a record boundary (a cut's lsn).
    pub fn truncate_from(&mut self, lsn: u64) -> Result<(), RetentionError> {
        if lsn >= self.end_lsn() {
            return Ok(());
        }
        if lsn < self.start_lsn() {
            return Err(self.pruned(lsn));
        }
        self.log
            .truncate_from(lsn)
            .map_err(|e| log_error(&self.dir, e))
    }

    fn pruned(&self, lsn: u64) -> RetentionError {
        RetentionError::Pruned {
            path: self.dir.clone(),
            lsn,
            oldest: self.start_lsn(),
        }
    }

    /// A reader over the records in `[from, end_lsn())`, for writing history back
    /// without holding the journal. Records appended later are not seen.
    pub fn history(&self, from: u64) -> Result<History, RetentionError> {
        if from < self.start_lsn() {
            return Err(self.pruned(from));
        }
        let segments = self.log.segments();
        Ok(History {
            dir: self.dir.clone(),
            infos: segments
                .list()
                .into_iter()
                .filter(|s| s.end_lsn > from)
                .collect(),
            segments: segments.clone(),
            from,
            end: self.end_lsn(),
            bytes: self.bytes_from(from)?,
        })
    }
}

/// The records of a range of a journal, to be written back newest first.
#[derive(Debug)]
pub struct History {
    dir: PathBuf,
    segments: Segments,
    infos: Vec<SegmentInfo>,
    from: u64,
    end: u64,
    bytes: u64,
}

impl History {
    /// Bytes of journal this history spans.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Writes every record back into `target`, newest first. `progress` gets the
    /// journal bytes done so far. Each record's checksum is checked before use.
    pub fn write_back(
        &self,
        target: &mut dyn UndoTarget,
        mut progress: impl FnMut(u64),
    ) -> Result<(), RetentionError> {
        let mut done = 0u64;
        let mut raw = Vec::new();
        let mut decompressor = zstd::bulk::Decompressor::new().map_err(|e| RetentionError::Io {
            path: PathBuf::new(),
            what: "start zstd",
            source: e,
        })?;
        for seg in self.infos.iter().rev() {
            let positions = self
                .segments
                .walk(seg.first_lsn)
                .map_err(|e| log_error(&self.dir, e))?;
            for pos in positions
                .into_iter()
                .rev()
                .filter(|p| p.lsn >= self.from && p.lsn < self.end)
            {
                let rec = self
                    .segments
                    .read(pos)
                    .map_err(|e| log_error(&self.dir, e))?;
                let corrupt = |reason: String| RetentionError::Corrupt {
                    path: seg.path.clone(),
                    at: pos.offset,
                    reason,
                };
                let (codec, offset, raw_len, data) =
                    parse_record(rec.kind, &rec.payload).map_err(corrupt)?;
                let io = |source| RetentionError::Io {
                    path: PathBuf::from("<target>"),
                    what: "write back",
                    source,
                };
                match codec {
                    CODEC_ZERO => target.zero(offset, raw_len).map_err(io)?,
                    CODEC_RAW => target.write(offset, data).map_err(io)?,
                    _ => {
                        let raw_len = usize::try_from(raw_len).unwrap_or(MAX_RECORD);
                        raw.resize(raw_len, 0);
                        let n = decompressor
                            .decompress_to_buffer(data, &mut raw)
                            .map_err(|e| corrupt(format!("zstd: {e}")))?;
                        if n != raw_len {
                            return Err(corrupt(format!(
                                "zstd gave {n} bytes, the header says {raw_len}"
                            )));
                        }
                        target.write(offset, &raw).map_err(io)?;
                    }
                }
                done += pos.len;
                progress(done);
            }
        }
        Ok(())
    }
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
        let mut j = UndoJournal::open(dir.path(), SEGMENT_BYTES, None).expect("open");
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

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .expect("list")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "undo"))
            .collect();
        v.sort();
        v
    }

    fn rebuilt(j: &UndoJournal, disk: &[u8], lsn: u64) -> Vec<u8> {
        let mut m = Mem(disk.to_vec());
        j.history(lsn)
            .expect("history")
            .write_back(&mut m, |_| {})
            .expect("write back");
        m.0
    }

    #[test]
    fn a_torn_tail_is_dropped_at_open_and_never_applied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut disk = vec![0u8; 1 << 16];
        let (cut, want, end) = {
            let mut j = UndoJournal::open(dir.path(), SEGMENT_BYTES, None).expect("open");
            write(&mut j, &mut disk, 0, &noise(1, 4096));
            let cut = (j.end_lsn(), disk.clone());
            write(&mut j, &mut disk, 0, &noise(2, 4096));
            (cut.0, cut.1, j.end_lsn())
        };
        // A record whose write never happened, torn halfway.
        let seg = segment_files(dir.path()).pop().expect("a segment");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&seg)
            .expect("open");
        std::io::Write::write_all(&mut f, &noise(9, 300)).expect("torn write");
        drop(f);
        let j = UndoJournal::open(dir.path(), SEGMENT_BYTES, None).expect("reopen");
        assert_eq!(j.end_lsn(), end, "the torn record is cut off");
        assert!(rebuilt(&j, &disk, cut) == want);
        // A flipped payload bit in the last record is a torn tail too.
        drop(j);
        let mut bytes = std::fs::read(&seg).expect("read");
        let last = bytes.len() - 10;
        bytes[last] ^= 1;
        std::fs::write(&seg, &bytes).expect("write");
        let j = UndoJournal::open(dir.path(), SEGMENT_BYTES, None).expect("reopen");
        assert!(j.end_lsn() < end, "a damaged last record is dropped");
    }

    #[test]
    fn a_damaged_record_in_an_older_segment_fails_the_write_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut j = UndoJournal::open(dir.path(), 1024, None).expect("open");
        // Non-zero before-images, so the first record carries a payload.
        let mut disk = noise(77, 1 << 20);
        for i in 0..4 {
            write(&mut j, &mut disk, i * 65536, &noise(i as u8 + 1, 65536));
            write(&mut j, &mut disk, i * 65536, &noise(i as u8 + 9, 65536));
        }
        let files = segment_files(dir.path());
        assert!(files.len() >= 3, "several segments");
        drop(j);
        // Flip one payload byte of the first record of a closed segment: open does not
        // read closed payloads, but giving history back checks every record it uses.
        let mut bytes = std::fs::read(&files[0]).expect("read");
        let at = (seglog::SEGMENT_HEADER + seglog::RECORD_HEADER) as usize + PAYLOAD_HEAD + 10;
        bytes[at] ^= 0x20;
        std::fs::write(&files[0], &bytes).expect("write");
        let j = UndoJournal::open(dir.path(), 1024, None).expect("reopen");
        let mut m = Mem(disk.clone());
        let err = j
            .history(0)
            .expect("history")
            .write_back(&mut m, |_| {})
            .expect_err("a damaged record is refused");
        assert!(matches!(err, RetentionError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn a_failed_append_never_costs_a_record_whose_write_happened() {
        // Issue 8 defect 2: a short write left bytes not counted in the segment's
        // length; the next record went after them (O_APPEND) and was synced, the
        // replica written; a restart cut the segment at the counted length and the
        // older point came back with newer bytes.
        use boomerang_common::faults;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut j = UndoJournal::open(dir.path(), SEGMENT_BYTES, None).expect("open");
        let mut disk = noise(5, 1 << 16);
        let mut c = zstd::bulk::Compressor::new(1).expect("zstd");
        let cut = (j.end_lsn(), disk.clone());
        write(&mut j, &mut disk, 0, &noise(1, 8192));
        {
            let _rule = faults::arm_under(dir.path(), "undo.write@1=short").expect("arm");
            let err = j
                .append(4096, &disk[4096..12288], &mut c)
                .expect_err("the short write fails");
            assert!(matches!(err, RetentionError::Full { .. }), "{err}");
            // The apply path stops here: the replica is not written.
        }
        write(&mut j, &mut disk, 8192, &noise(2, 8192));
        write(&mut j, &mut disk, 100, &noise(3, 50));
        drop(j);
        let j = UndoJournal::open(dir.path(), SEGMENT_BYTES, None).expect("reopen");
        assert_eq!(j.end_lsn(), 3, "three records, no gap, nothing cut");
        assert!(
            rebuilt(&j, &disk, cut.0) == cut.1,
            "the point's bytes exactly"
        );
    }

    #[test]
    fn a_failed_fdatasync_poisons_the_journal_until_reopened() {
        use boomerang_common::faults;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut j = UndoJournal::open(dir.path(), SEGMENT_BYTES, None).expect("open");
        let mut c = zstd::bulk::Compressor::new(1).expect("zstd");
        j.append(0, &noise(1, 4096), &mut c).expect("append");
        {
            let _rule = faults::arm_under(dir.path(), "undo.sync@1=eio").expect("arm");
            let err = j.sync().expect_err("fdatasync fails");
            assert!(matches!(err, RetentionError::Poisoned { .. }), "{err}");
        }
        // No later sync may succeed on pages Linux may have dropped.
        assert!(matches!(j.sync(), Err(RetentionError::Poisoned { .. })));
        assert!(matches!(
            j.append(0, &noise(2, 4096), &mut c),
            Err(RetentionError::Poisoned { .. })
        ));
        drop(j);
        let mut j = UndoJournal::open(dir.path(), SEGMENT_BYTES, None).expect("reopen");
        j.append(0, &noise(3, 4096), &mut c)
            .expect("append after reopen");
        j.sync().expect("sync after reopen");
    }

    #[test]
    fn the_first_format_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(format!("{:020}.undo", 0)), b"BUND").expect("write");
        let err = UndoJournal::open(dir.path(), SEGMENT_BYTES, None).expect_err("refused");
        assert!(matches!(err, RetentionError::OldFormat { .. }), "{err}");
        assert!(err.to_string().contains("move"), "{err}");
    }

    #[test]
    fn journal_files_and_directory_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let jdir = dir.path().join("d0");
        let mut j = UndoJournal::open(&jdir, SEGMENT_BYTES, None).expect("open");
        let mut disk = noise(1, 8192);
        write(&mut j, &mut disk, 0, &noise(2, 4096));
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&jdir), 0o700);
        for f in segment_files(&jdir) {
            assert_eq!(mode(&f), 0o600);
        }
    }

    #[test]
    fn segments_roll_prune_and_truncate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut j = UndoJournal::open(dir.path(), SEGMENT_BYTES, None).expect("open");
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
        assert!(
            segment_files(dir.path()).len() >= 2,
            "rolled into a second segment"
        );
        let before = j.size_bytes();
        let freed = j.prune_below(cuts[19]).expect("prune");
        assert!(freed > 0 && j.size_bytes() == before - freed);
        assert!(j.history(cuts[0]).is_err(), "pruned history is refused");
        let end = j.end_lsn();
        drop(j);
        let mut j = UndoJournal::open(dir.path(), SEGMENT_BYTES, None).expect("reopen");
        assert_eq!(j.end_lsn(), end);
        j.truncate_from(cuts[19]).expect("truncate");
        assert_eq!(j.end_lsn(), cuts[19]);
        drop(j);
        let j = UndoJournal::open(dir.path(), SEGMENT_BYTES, None).expect("reopen");
        assert_eq!(j.end_lsn(), cuts[19], "truncation is durable");
    }
}
