//! The agent's bounded on-disk journal of captured writes and tags, and the dirty
//! bitmap it falls back to when full (DESIGN.md rule 1 and 7, issue 3 item 3).
//!
//! The intercept appends every write in write order, and every tag, to the
//! [`Journal`]; the shipper reads records from it ([`Journal::read_from`]) and frees
//! them only after the process server's durable ack ([`Journal::release_through`]).
//! When the journal is full an append returns [`AppendError::Full`] and the disk drops
//! to bitmap mode ([`CaptureState`], [`DirtyBitmap`]) until it has caught up.
//!
//! # On-disk layout
//! In `<state dir>/journal/`:
//! - `seg-<first seq, 16 hex digits>.jnl`: segment files, replayed in name order.
//! - `released.state`: the released-through seq, a [`StateFile`] (two slots, crc,
//!   fdatasync).
//!
//! ```text
//!  segment header (24 bytes):
//!   0       4       6       8               16      20      24
//!   | magic | ver   | 0     | first seq     | 0     | crc32 |    crc32 over bytes 0..20
//!   | BMJS  | u16LE | u16LE | u64 LE        | u32   | u32LE |
//!
//!  record (24-byte header, then payload):
//!   0       4     5      6       8             12            20      24
//!   | magic | ver | kind | 0     | payload len | journal seq | crc32 | payload ...
//!   | BMJR  | u8  | u8   | u16   | u32 LE      | u64 LE      | u32LE |
//!   crc32 over header bytes 0..20 and the payload; payload length capped at
//!   1 + 128 + 8 + 8 MiB before anything is allocated.
//!
//!  payload, kind 1 (write): disk id len u8 | disk id | offset u64 LE | data
//!  payload, kind 2 (tag):   disk id len u8 | disk id | tag kind u8 | point id u64 LE
//!                           | time ms u64 LE
//!  payload, kind 3 (zero):  disk id len u8 | disk id | offset u64 LE | len u64 LE
//! ```
//! Record versions: writes and tags are version 1; zero records (a discard or
//! zero-out the workload issued: the range reads back as zeros) were added with
//! version 2 and are written as version 2, so a build that knows only version 1
//! refuses a journal holding one as unsupported rather than cutting it, and reads
//! every journal without one as before.
//! Journal seqs start at 1 and are contiguous: record `i` of a segment has seq
//! `first seq + i`. A segment is closed once the next record would take it past the
//! segment target (an eighth of the capacity, between 4 KiB and 64 MiB), so at most
//! about an eighth of the capacity is held by released records not yet deleted.
//! In memory the journal keeps, per segment, the offset of each record (8 bytes per
//! record: under 2% of the capacity for writes of 512 bytes or more), so reads seek
//! straight to a seq. Upgrades of either header are decoded beside version 1 in
//! `format.rs`; another version with a valid crc is refused with
//! [`JournalError::Unsupported`], never cut.
//!
//! # fsync policy
//! Appends are written to the active segment at once (`pwrite`, page cache) and are
//! made durable by [`Journal::sync`], one `fdatasync` of the active segment, which the
//! intercept calls when the writer issues flush/fsync and on a timer. Closing a segment
//! fdatasyncs it, and creating one fsyncs the directory, so `sync` of the active
//! segment covers every record appended before it. Consequence: records appended but
//! not synced may be lost in a host crash (never in a process crash: they are in the
//! page cache). The agent treats a host crash as an unclean stop anyway (new
//! generation and a resync by scan), so a lost tail is never relied on. Records may be
//! shipped before they are synced; [`Journal::durable_seq`] says what is synced.
//!
//! A failed `fdatasync` is not retried (Linux may have dropped the dirty pages, and a
//! retry could succeed falsely): the journal then refuses appends and syncs with
//! [`JournalError::Poisoned`], and the agent reopens it and starts a new generation.
//!
//! Releases are made durable one `fdatasync` per [`Journal::release_through`] in
//! `released.state`, *before* any segment is deleted. Deleting a fully released
//! segment is not fsynced: if a crash brings it back, [`Journal::open`] deletes it
//! again. So released records are never shipped again after a restart, clean or not.
//!
//! # Recovery
//! [`Journal::open`] replays the segments in order and keeps the longest intact,
//! gap-free run of records. At the first damage (short header or record, bad magic,
//! bad crc, a seq out of place, a missing segment) the journal is cut: the damaged
//! segment is truncated to its last whole record (or deleted, when its header is
//! damaged), later segments are deleted, and [`Recovery::cut`] says what was dropped;
//! nothing past a cut is ever returned. Segments whose records are all released are
//! deleted. The records still held are those after the released-through seq; the agent
//! ships them again from [`Recovery::first_held`] with [`Journal::read_from`] (not
//! returned as one list from `open`: the journal may hold gigabytes). After a cut,
//! seqs past it may be reused: a cut means an unclean stop, hence a new generation.
//!
//! The journal has one owner: appends, syncs and releases take `&mut self`, reads
//! `&self`; the agent shares it behind a mutex.

mod bitmap;
mod error;
mod format;
mod mode;
mod recover;
#[cfg(test)]
mod tests;

pub use bitmap::{BitmapError, DirtyBitmap, BLOCK_SIZE};
pub use error::{AppendError, JournalError};
pub use format::{Entry, Record, MAX_DISK_ID, MAX_WRITE};
pub use mode::{CaptureState, Mode};
pub use recover::{Cut, Recovery};

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use boomerang_common::durable::{create_dir_durable, fsync_dir, StateFile};
use boomerang_common::TagKind;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use format::{Bad, RecordHeader, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};

/// Smallest journal capacity accepted.
pub const MIN_CAPACITY: u64 = 4096;
/// Largest segment target.
pub const MAX_SEGMENT_TARGET: u64 = 64 << 20;
const MIN_SEGMENT_TARGET: u64 = 4096;
const SEGMENT_HEADER: u64 = SEGMENT_HEADER_LEN as u64;
const RECORD_HEADER: u64 = RECORD_HEADER_LEN as u64;
const SUBDIR: &str = "journal";
const RELEASE_STATE: &str = "released.state";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ReleaseState {
    /// Every record with a seq up to this one is released (0: none).
    released_through: u64,
}

#[derive(Debug)]
struct Segment {
    first_seq: u64,
    path: PathBuf,
    /// Bytes in use: the header and every whole record.
    len: u64,
    /// Offset of each record; record `i` has seq `first_seq + i`.
    offsets: Vec<u64>,
}

impl Segment {
    /// Seq after the last record.
    fn end_seq(&self) -> u64 {
        self.first_seq + self.offsets.len() as u64
    }

    /// Byte range of record `i`.
    fn record(&self, i: usize) -> (u64, u64) {
        let start = self.offsets[i];
        let end = self.offsets.get(i + 1).copied().unwrap_or(self.len);
        (start, end)
    }
}

fn io_err<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> JournalError + 'a {
    move |source| JournalError::Io {
        step,
        path: path.to_path_buf(),
        source,
    }
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("seg-{first_seq:016x}.jnl"))
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("seg-")?.strip_suffix(".jnl")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

fn is_out_of_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

fn check_disk(disk: &str) -> Result<(), JournalError> {
    if disk.is_empty() || disk.len() > MAX_DISK_ID {
        return Err(JournalError::InvalidRecord(format!(
            "disk id of {} bytes (1 to {MAX_DISK_ID} allowed)",
            disk.len()
        )));
    }
    Ok(())
}

/// The bounded on-disk journal (see the module doc).
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    capacity: u64,
    segment_target: u64,
    /// In seq order; the last one is the active segment when `active` is set.
    segments: VecDeque<Segment>,
    /// The last segment, open for appending.
    active: Option<File>,
    /// Bytes of all segments.
    used: u64,
    next_seq: u64,
    durable_seq: u64,
    released: StateFile<ReleaseState>,
    recovery: Recovery,
    scratch: Vec<u8>,
    /// An fdatasync failed: no more appends or syncs.
    poisoned: bool,
}

impl Journal {
    /// Opens (or creates) the journal in `<dir>/journal` with room for
    /// `capacity_bytes` of segments, recovering it as the module doc says.
    pub fn open(dir: &Path, capacity_bytes: u64) -> Result<Journal, JournalError> {
        if capacity_bytes < MIN_CAPACITY {
            return Err(JournalError::Capacity {
                capacity: capacity_bytes,
            });
        }
        let dir = dir.join(SUBDIR);
        create_dir_durable(&dir)?;
        let released =
            StateFile::open_or_create(&dir.join(RELEASE_STATE), ReleaseState::default())?;
        let released_through = released.get().released_through;
        let found = recover::list_segments(&dir)?;
        let (mut segments, cut) = recover::replay(found, released_through)?;

        let mut deleted = 0;
        while let Some(front) = segments.front() {
            if front.end_seq() > released_through + 1 {
                break;
            }
            std::fs::remove_file(&front.path)
                .map_err(io_err("delete released segment", &front.path))?;
            segments.pop_front();
            deleted += 1;
        }
        if deleted > 0 || cut.is_some() {
            fsync_dir(&dir)?;
        }
        let active = match segments.back() {
            Some(seg) => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&seg.path)
                    .map_err(io_err("open segment for appending", &seg.path))?;
                // What survived recovery may sit in the page cache only (a process
                // crash); make it durable before anything new is appended after it.
                file.sync_data()
                    .map_err(io_err("fdatasync segment", &seg.path))?;
                Some(file)
            }
            None => None,
        };
        let next_seq = segments
            .back()
            .map_or(0, Segment::end_seq)
            .max(released_through + 1);
        let recovery = Recovery {
            first_held: released_through + 1,
            held_records: next_seq - (released_through + 1),
            segments: segments.len(),
            released_segments_deleted: deleted,
            cut,
        };
        match &recovery.cut {
            Some(cut) => error!(
                journal = %dir.display(),
                segment = %cut.segment.display(),
                offset = cut.offset,
                seq = cut.seq,
                bytes_dropped = cut.bytes_dropped,
                segments_dropped = cut.segments_dropped,
                reason = %cut.reason,
                "journal: cut off a torn or corrupt tail"
            ),
            None => info!(
                journal = %dir.display(),
                held = recovery.held_records,
                first_held = recovery.first_held,
                segments = recovery.segments,
                "journal opened"
            ),
        }
        Ok(Journal {
            used: segments.iter().map(|s| s.len).sum(),
            segment_target: (capacity_bytes / 8).clamp(MIN_SEGMENT_TARGET, MAX_SEGMENT_TARGET),
            dir,
            capacity: capacity_bytes,
            segments,
            active,
            next_seq,
            durable_seq: next_seq - 1,
            released,
            recovery,
            scratch: Vec::new(),
            poisoned: false,
        })
    }

    /// What [`Journal::open`] found.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// Appends a write of `data` at `offset` on `disk`; returns its journal seq. The
    /// record is written at once and durable after the next [`Journal::sync`].
    pub fn append_write(
        &mut self,
        disk: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<u64, AppendError> {
        self.check_poisoned()?;
        check_disk(disk)?;
        if data.len() > MAX_WRITE {
            return Err(JournalError::InvalidRecord(format!(
                "write of {} bytes (at most {MAX_WRITE})",
                data.len()
            ))
            .into());
        }
        self.reserve(format::write_record_len(disk, data.len()))?;
        format::encode_write(&mut self.scratch, self.next_seq, disk, offset, data);
        self.write_record()
    }

    /// Appends a zero record: `len` bytes at `offset` of `disk` read back as zeros from
    /// here on (a discard or zero-out applied to the backing disk); returns its seq.
    pub fn append_zero(&mut self, disk: &str, offset: u64, len: u64) -> Result<u64, AppendError> {
        self.check_poisoned()?;
        check_disk(disk)?;
        self.reserve(format::zero_record_len(disk))?;
        format::encode_zero(&mut self.scratch, self.next_seq, disk, offset, len);
        self.write_record()
    }

    /// Appends a tag; returns its journal seq. Every write appended before it belongs
    /// to the cut.
    pub fn append_tag(
        &mut self,
        disk: &str,
        kind: TagKind,
        point_id: u64,
        time_ms: u64,
    ) -> Result<u64, AppendError> {
        self.check_poisoned()?;
        check_disk(disk)?;
        self.reserve(format::tag_record_len(disk))?;
        format::encode_tag(
            &mut self.scratch,
            self.next_seq,
            disk,
            kind,
            point_id,
            time_ms,
        );
        self.write_record()
    }

    /// Makes every record appended so far durable (one `fdatasync` of the active
    /// segment, none when nothing new was appended); returns the durable seq.
    pub fn sync(&mut self) -> Result<u64, JournalError> {
        self.check_poisoned()?;
        if self.durable_seq + 1 < self.next_seq {
            self.sync_active("fdatasync segment")?;
        }
        Ok(self.durable_seq)
    }

    /// fdatasyncs the active segment. A failure poisons the journal: Linux may have
    /// dropped the dirty pages, and a retried fdatasync could then succeed falsely.
    fn sync_active(&mut self, step: &'static str) -> Result<(), JournalError> {
        if let (Some(file), Some(seg)) = (&self.active, self.segments.back()) {
            if let Err(e) = file.sync_data() {
                self.poisoned = true;
                return Err(io_err(step, &seg.path)(e));
            }
        }
        self.durable_seq = self.next_seq - 1;
        Ok(())
    }

    fn check_poisoned(&self) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned {
                dir: self.dir.clone(),
            });
        }
        Ok(())
    }

    /// Reads held records in seq order from `seq` (or from the first held record, if
    /// later), stopping before `max_bytes` of records (headers included) are exceeded;
    /// at least one record is returned when any is held from there.
    pub fn read_from(&self, seq: u64, max_bytes: u64) -> Result<Vec<Record>, JournalError> {
        let mut seq = seq.max(self.released_through() + 1);
        let mut records = Vec::new();
        let mut bytes = 0u64;
        let first = self.segments.partition_point(|s| s.end_seq() <= seq);
        for seg in self.segments.iter().skip(first) {
            if seq >= self.next_seq {
                break;
            }
            let file = File::open(&seg.path).map_err(io_err("open segment", &seg.path))?;
            // Contiguous seqs: `seq` is in this segment from here on.
            seq = seq.max(seg.first_seq);
            let Ok(start) = usize::try_from(seq - seg.first_seq) else {
                break;
            };
            for i in start..seg.offsets.len() {
                let (from, to) = seg.record(i);
                if !records.is_empty() && bytes + (to - from) > max_bytes {
                    return Ok(records);
                }
                records.push(read_record(&file, &seg.path, from, to, seq)?);
                bytes += to - from;
                seq += 1;
            }
        }
        Ok(records)
    }

    /// Frees every record appended so far, shipped or not: for when a scan in a new
    /// generation covers what they hold.
    pub fn release_all(&mut self) -> Result<(), JournalError> {
        self.release_through(self.next_seq.saturating_sub(1))
    }

    /// Frees every record up to `seq` (after the process server's durable ack): the
    /// released-through seq is stored durably first, then every segment whose records
    /// are all released, except the active one, is deleted. Records already released
    /// are ignored.
    pub fn release_through(&mut self, seq: u64) -> Result<(), JournalError> {
        if seq <= self.released_through() {
            return Ok(());
        }
        let last = self.next_seq - 1;
        if seq > last {
            return Err(JournalError::ReleaseBeyondEnd { seq, last });
        }
        self.released.store(ReleaseState {
            released_through: seq,
        })?;
        while self.segments.len() > 1 {
            let Some(front) = self.segments.front() else {
                break;
            };
            if front.end_seq() > seq + 1 {
                break;
            }
            if let Err(e) = std::fs::remove_file(&front.path) {
                if e.kind() != io::ErrorKind::NotFound {
                    // The release itself is durable; deletion is retried on the next
                    // release or at open.
                    warn!(segment = %front.path.display(), error = %e, "journal: cannot delete a released segment");
                    break;
                }
            }
            self.used -= front.len;
            self.segments.pop_front();
        }
        Ok(())
    }

    /// Every record up to this seq is released (0: none).
    pub fn released_through(&self) -> u64 {
        self.released.get().released_through
    }

    /// Every record up to this seq is durable.
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    /// The seq the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Records held (appended and not released).
    pub fn held_records(&self) -> u64 {
        self.next_seq - 1 - self.released_through()
    }

    /// Bytes of segment files (headers, held records and released records in segments
    /// not yet deleted).
    pub fn used_bytes(&self) -> u64 {
        self.used
    }

    /// The capacity.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity
    }

    /// Segment files.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// The journal directory (`<state dir>/journal`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Checks that a record of `len` bytes fits, and opens a new segment if it is due.
    fn reserve(&mut self, len: u64) -> Result<(), AppendError> {
        let roll = match (self.segments.back(), &self.active) {
            (Some(seg), Some(_)) => !seg.offsets.is_empty() && seg.len + len > self.segment_target,
            _ => true,
        };
        let needed = len + if roll { SEGMENT_HEADER } else { 0 };
        if self.used + needed > self.capacity {
            return Err(self.full(needed));
        }
        if roll {
            self.roll(needed)?;
        }
        Ok(())
    }

    fn full(&self, needed: u64) -> AppendError {
        AppendError::Full {
            needed,
            free: self.capacity.saturating_sub(self.used),
            capacity: self.capacity,
        }
    }

    /// Closes the active segment (fdatasync, so [`Journal::sync`] need only sync the
    /// new one) and starts a new one whose first seq is the next seq.
    fn roll(&mut self, needed: u64) -> Result<(), AppendError> {
        if self.active.is_some() {
            self.sync_active("fdatasync closed segment")?;
            self.active = None;
        }
        let first_seq = self.next_seq;
        let path = segment_path(&self.dir, first_seq);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("create segment", &path))?;
        if let Err(e) = file.write_all_at(&format::encode_segment_header(first_seq), 0) {
            let _ = std::fs::remove_file(&path);
            return Err(self.append_io(e, needed, "write segment header", &path));
        }
        // The new name must survive a crash for the records synced into it to be found.
        fsync_dir(&self.dir).map_err(JournalError::from)?;
        self.used += SEGMENT_HEADER;
        self.segments.push_back(Segment {
            first_seq,
            path,
            len: SEGMENT_HEADER,
            offsets: Vec::new(),
        });
        self.active = Some(file);
        Ok(())
    }

    /// Writes the record in `scratch` at the end of the active segment.
    fn write_record(&mut self) -> Result<u64, AppendError> {
        let (Some(file), Some(seg)) = (&self.active, self.segments.back_mut()) else {
            return Err(JournalError::InvalidRecord("no active segment".into()).into());
        };
        let at = seg.len;
        if let Err(e) = file.write_all_at(&self.scratch, at) {
            // Cut a partial record off again, so the next append starts clean; if even
            // that fails, recovery cuts it (its crc cannot match).
            if let Err(e) = file.set_len(at) {
                warn!(segment = %seg.path.display(), error = %e, "journal: cannot truncate a failed append");
            }
            let path = seg.path.clone();
            let needed = self.scratch.len() as u64;
            return Err(self.append_io(e, needed, "append record", &path));
        }
        let len = self.scratch.len() as u64;
        seg.offsets.push(at);
        seg.len += len;
        self.used += len;
        let seq = self.next_seq;
        self.next_seq += 1;
        Ok(seq)
    }

    /// An IO error of an append: out of space on the file system is `Full` (the disk
    /// goes to bitmap mode rather than stopping), anything else an error.
    fn append_io(&self, e: io::Error, needed: u64, step: &'static str, path: &Path) -> AppendError {
        if is_out_of_space(&e) {
            warn!(journal = %self.dir.display(), error = %e, "journal: file system full, treating the journal as full");
            return self.full(needed);
        }
        io_err(step, path)(e).into()
    }
}

fn read_record(
    file: &File,
    path: &Path,
    from: u64,
    to: u64,
    seq: u64,
) -> Result<Record, JournalError> {
    let corrupt = |reason: String| JournalError::Corrupt {
        path: path.to_path_buf(),
        offset: from,
        reason,
    };
    let len = usize::try_from(to - from).map_err(|_| corrupt("record too long".into()))?;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, from)
        .map_err(io_err("read record", path))?;
    let mut head = [0u8; RECORD_HEADER_LEN];
    head.copy_from_slice(&buf[..RECORD_HEADER_LEN]);
    let bad = |b: Bad| match b {
        Bad::Damaged(r) | Bad::Unsupported(r) => corrupt(r),
    };
    let header = RecordHeader::parse(&head).map_err(bad)?;
    let payload = Bytes::from(buf).slice(RECORD_HEADER_LEN..);
    if header.payload_len != payload.len() || header.seq != seq {
        return Err(corrupt(format!(
            "record (seq {}, {} bytes) is not the one recovery indexed (seq {seq}, {} bytes)",
            header.seq,
            header.payload_len,
            payload.len()
        )));
    }
    header.verify(&head, &payload).map_err(bad)?;
    let entry = format::decode_entry(header.kind, &payload).map_err(bad)?;
    Ok(Record { seq, entry })
}
