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
//! - `seg-<first seq, 16 hex digits>.jnl`: the segments of a
//!   [`seglog`](boomerang_common::seglog) log of kind `AJNL` (segment and record
//!   headers, checksums, torn-tail rules and the fsync contract are seglog's). A
//!   record's lsn is its journal seq.
//! - `released.state`: the released-through seq, a [`StateFile`] (two slots, crc,
//!   fdatasync).
//! - `damaged-<unix ms>/`: segments set aside when the journal was found damaged
//!   outside its torn tail (see Recovery); kept for inspection, never read again.
//!
//! ```text
//!  payload, kind 1 (write): disk id len u8 | disk id | offset u64 LE | data
//!  payload, kind 2 (tag):   disk id len u8 | disk id | tag kind u8 | point id u64 LE
//!                           | time ms u64 LE
//!  payload, kind 3 (zero):  disk id len u8 | disk id | offset u64 LE | len u64 LE
//! ```
//! Journal seqs start at 1 and are contiguous. A segment is closed once the next
//! record would take it past the segment target (an eighth of the capacity, between
//! 4 KiB and 64 MiB), so at most about an eighth of the capacity is held by released
//! records not yet retired. The log keeps the offset of every record in memory (8
//! bytes per record), so reads go straight to a seq.
//!
//! # fsync policy
//! Appends are written at once (page cache) and made durable by [`Journal::sync`],
//! one `fdatasync` of the active segment, which the intercept calls when the writer
//! issues flush/fsync and on a timer. Records appended but not synced may be lost in
//! a host crash (never in a process crash: they are in the page cache). The agent
//! treats a host crash as an unclean stop anyway (new generation and a resync by
//! scan), so a lost tail is never relied on. Records may be shipped before they are
//! synced; [`Journal::durable_seq`] says what is synced.
//!
//! A failed `fdatasync` is not retried (Linux may have dropped the dirty pages, and a
//! retry could succeed falsely): the journal then refuses appends and syncs with
//! [`JournalError::Poisoned`], and the agent reopens it and starts a new generation.
//! A failed append is cut back by the log before the error is returned; an append
//! that fails for want of space is [`AppendError::Full`] (bitmap mode), not an error.
//!
//! Releases are made durable one `fdatasync` per [`Journal::release_through`] in
//! `released.state`, *before* any segment is retired. If a crash brings a retired
//! segment back, [`Journal::open`] retires it again. So released records are never
//! shipped again after a restart, clean or not.
//!
//! # Recovery
//! [`Journal::open`] opens the log from the first seq not released: a torn tail of
//! the active segment is cut ([`Recovery::cut`]); segments wholly released are retired.
//! Damage anywhere else (a bad record in a closed segment, a missing segment) means
//! records the process server may never have received are gone: the journal's
//! segments are set aside in `damaged-<unix ms>/`, logged as an error, and the journal
//! starts empty at the same seq ([`Recovery::set_aside`]); the agent treats this as an
//! unclean stop (new generation, resync by scan). Segments of another format version
//! are refused as unsupported, never set aside or cut. When the released-through seq
//! is past what survived (records shipped and acked, then lost with the page cache),
//! the journal goes on from the seq after the release, never reusing a released seq.
//!
//! The journal has one owner: appends, syncs and releases take `&mut self`, reads
//! `&self`; the agent shares it behind a mutex.

mod bitmap;
mod error;
mod format;
mod mode;
#[cfg(test)]
mod tests;

pub use bitmap::{BitmapError, DirtyBitmap, BLOCK_SIZE};
pub use error::{AppendError, JournalError};
pub use format::{Entry, Record, MAX_DISK_ID, MAX_WRITE};
pub use mode::{CaptureState, Mode};

use std::path::{Path, PathBuf};

use boomerang_common::config::now_ms;
use boomerang_common::durable::{create_dir_durable, StateFile};
use boomerang_common::seglog::{self, Log, LogConfig, LogError, Retire};
use boomerang_common::{storage, TagKind};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

/// Smallest journal capacity accepted.
pub const MIN_CAPACITY: u64 = 4096;
/// Largest segment target.
pub const MAX_SEGMENT_TARGET: u64 = 64 << 20;
const MIN_SEGMENT_TARGET: u64 = 4096;
const SUBDIR: &str = "journal";
const RELEASE_STATE: &str = "released.state";
const SCOPE: &str = "journal";
const EXTENSION: &str = "jnl";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ReleaseState {
    /// Every record with a seq up to this one is released (0: none).
    released_through: u64,
}

/// What [`Journal::open`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Seq of the first record still held, to ship again from (the next seq to append
    /// when nothing is held).
    pub first_held: u64,
    /// Records held (not released).
    pub held_records: u64,
    /// Segments kept.
    pub segments: usize,
    /// Fully released segments retired at open.
    pub released_segments_deleted: usize,
    /// The torn tail of the active segment cut off, if any.
    pub cut: Option<seglog::Cut>,
    /// The journal was damaged outside its torn tail: where its segments were set
    /// aside, and what was wrong. Held records may be lost: treat it as an unclean stop.
    pub set_aside: Option<SetAside>,
}

/// A damaged journal's segments, moved out of the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetAside {
    /// The directory they were moved to.
    pub dir: PathBuf,
    /// The damage found.
    pub reason: String,
}

fn log_config(capacity: u64) -> LogConfig {
    LogConfig {
        scope: SCOPE,
        kind: *b"AJNL",
        extension: EXTENSION,
        segment_target: (capacity / 8).clamp(MIN_SEGMENT_TARGET, MAX_SEGMENT_TARGET),
        max_payload: format::MAX_PAYLOAD,
        retire: Retire::Prefix,
        verify_closed: true,
        index: true,
    }
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
    log: Log,
    released: StateFile<ReleaseState>,
    recovery: Recovery,
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
        let floor = released.get().released_through + 1;
        let cfg = log_config(capacity_bytes);
        let check = |seen: seglog::Visit<'_>| match seen.payload {
            Some(p) => format::parse_entry(seen.kind, p).map(|_| ()),
            None => Ok(()),
        };
        let (mut log, found, set_aside) = match Log::open(&dir, cfg.clone(), floor, check) {
            Ok((log, found)) => (log, found, None),
            Err(LogError::Corrupt {
                path,
                offset,
                reason,
                ..
            }) => {
                let reason = format!("{} at byte {offset}: {reason}", path.display());
                let aside = set_aside_segments(&dir)?;
                error!(journal = %dir.display(), damage = %reason, moved_to = %aside.display(), "journal damaged outside its torn tail: its segments are set aside and the disk is resynced in a new generation");
                let (log, found) = Log::open(&dir, cfg, floor, check)?;
                (log, found, Some(SetAside { dir: aside, reason }))
            }
            Err(e) => return Err(e.into()),
        };
        if log.next_lsn() < floor {
            // Released records were lost with the page cache: never reuse their seqs.
            warn!(journal = %dir.display(), lost_through = floor - 1, next = log.next_lsn(), "journal: released records past the durable end were lost; going on after the release");
            log.skip_to(floor)?;
        }
        let before = log.segments().list().len();
        log.segments().retire_below(floor)?;
        let segments = log.segments().list().len();
        let next_seq = log.next_lsn();
        let recovery = Recovery {
            first_held: floor,
            held_records: next_seq - floor,
            segments,
            released_segments_deleted: before - segments,
            cut: found.cut,
            set_aside,
        };
        info!(
            journal = %dir.display(),
            held = recovery.held_records,
            first_held = recovery.first_held,
            segments = recovery.segments,
            "journal opened"
        );
        Ok(Journal {
            dir,
            capacity: capacity_bytes,
            log,
            released,
            recovery,
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
        check_disk(disk)?;
        if data.len() > MAX_WRITE {
            return Err(JournalError::InvalidRecord(format!(
                "write of {} bytes (at most {MAX_WRITE})",
                data.len()
            ))
            .into());
        }
        let prefix = format::write_prefix(disk, offset);
        self.append(format::KIND_WRITE, &[&prefix, data])
    }

    /// Appends a zero record: `len` bytes at `offset` of `disk` read back as zeros from
    /// here on (a discard or zero-out applied to the backing disk); returns its seq.
    pub fn append_zero(&mut self, disk: &str, offset: u64, len: u64) -> Result<u64, AppendError> {
        check_disk(disk)?;
        let payload = format::zero_payload(disk, offset, len);
        self.append(format::KIND_ZERO, &[&payload])
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
        check_disk(disk)?;
        let payload = format::tag_payload(disk, kind, point_id, time_ms);
        self.append(format::KIND_TAG, &[&payload])
    }

    fn append(&mut self, kind: u8, parts: &[&[u8]]) -> Result<u64, AppendError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let needed = self.log.cost(len);
        let used = self.used_bytes();
        if used + needed > self.capacity {
            return Err(self.full(needed, used));
        }
        match self.log.append(kind, parts) {
            Ok(pos) => Ok(pos.lsn),
            Err(e) if e.is_out_of_space() => {
                // The log cut the failed append back; the disk goes to bitmap mode
                // rather than stopping.
                warn!(journal = %self.dir.display(), error = %e, "journal: file system full, treating the journal as full");
                Err(self.full(needed, used))
            }
            Err(e) => Err(JournalError::from(e).into()),
        }
    }

    fn full(&self, needed: u64, used: u64) -> AppendError {
        AppendError::Full {
            needed,
            free: self.capacity.saturating_sub(used),
            capacity: self.capacity,
        }
    }

    /// Makes every record appended so far durable (one `fdatasync` of the active
    /// segment, none when nothing new was appended); returns the durable seq. A
    /// failure poisons the journal (see the module doc).
    pub fn sync(&mut self) -> Result<u64, JournalError> {
        Ok(self.log.sync()? - 1)
    }

    /// Reads held records in seq order from `seq` (or from the first held record, if
    /// later), stopping before `max_bytes` of records (headers included) are exceeded;
    /// at least one record is returned when any is held from there.
    pub fn read_from(&self, seq: u64, max_bytes: u64) -> Result<Vec<Record>, JournalError> {
        let segments = self.log.segments();
        let mut records = Vec::new();
        let mut bytes = 0u64;
        for seq in seq.max(self.released_through() + 1)..self.log.next_lsn() {
            let pos = segments.position(seq)?;
            if !records.is_empty() && bytes + pos.len > max_bytes {
                break;
            }
            let rec = segments.read(pos)?;
            let entry = format::decode_entry(rec.kind, &rec.payload).map_err(|reason| {
                LogError::Corrupt {
                    log: SCOPE,
                    path: self
                        .dir
                        .join(format!("seg-{:016x}.{EXTENSION}", pos.segment)),
                    offset: pos.offset,
                    reason,
                }
            })?;
            records.push(Record { seq, entry });
            bytes += pos.len;
        }
        Ok(records)
    }

    /// Frees every record appended so far, shipped or not: for when a scan in a new
    /// generation covers what they hold.
    pub fn release_all(&mut self) -> Result<(), JournalError> {
        self.release_through(self.log.next_lsn() - 1)
    }

    /// Frees every record up to `seq` (after the process server's durable ack): the
    /// released-through seq is stored durably first, then every closed segment whose
    /// records are all released is retired. Records already released are ignored.
    pub fn release_through(&mut self, seq: u64) -> Result<(), JournalError> {
        if seq <= self.released_through() {
            return Ok(());
        }
        let last = self.log.next_lsn() - 1;
        if seq > last {
            return Err(JournalError::ReleaseBeyondEnd { seq, last });
        }
        self.released.store(ReleaseState {
            released_through: seq,
        })?;
        if let Err(e) = self.log.segments().retire_below(seq + 1) {
            // The release itself is durable; retiring is retried on the next release
            // or at open.
            warn!(journal = %self.dir.display(), error = %e, "journal: cannot retire released segments");
        }
        Ok(())
    }

    /// Every record up to this seq is released (0: none).
    pub fn released_through(&self) -> u64 {
        self.released.get().released_through
    }

    /// Every record up to this seq is durable.
    pub fn durable_seq(&self) -> u64 {
        self.log.durable_lsn() - 1
    }

    /// The seq the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.log.next_lsn()
    }

    /// Records held (appended and not released).
    pub fn held_records(&self) -> u64 {
        self.log.next_lsn() - 1 - self.released_through()
    }

    /// Bytes of segment files (headers, held records and released records in segments
    /// not yet retired).
    pub fn used_bytes(&self) -> u64 {
        self.log.segments().bytes()
    }

    /// The capacity.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity
    }

    /// Segment files.
    pub fn segment_count(&self) -> usize {
        self.log.segments().list().len()
    }

    /// The journal directory (`<state dir>/journal`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Moves every segment of the journal in `dir` into a new `damaged-<unix ms>`
/// directory beside them (durably: both directories fsynced).
fn set_aside_segments(dir: &Path) -> Result<PathBuf, JournalError> {
    let io = |step: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| JournalError::Io { step, path, source }
    };
    let mut aside = dir.join(format!("damaged-{}", now_ms()));
    let mut n = 0;
    while aside.exists() {
        n += 1;
        aside = dir.join(format!("damaged-{}-{n}", now_ms()));
    }
    storage::create_dir_all(SCOPE, &aside).map_err(io("create", &aside))?;
    for entry in std::fs::read_dir(dir).map_err(io("list", dir))? {
        let entry = entry.map_err(io("list", dir))?;
        let path = entry.path();
        if path.extension().is_some_and(|e| e == EXTENSION) && path.is_file() {
            let to = aside.join(entry.file_name());
            storage::rename(SCOPE, &path, &to).map_err(io("set aside", &path))?;
        }
    }
    storage::fsync_dir(SCOPE, &aside).map_err(io("fsync", &aside))?;
    storage::fsync_dir(SCOPE, dir).map_err(io("fsync", dir))?;
    Ok(aside)
}

/// Decodes the payload of a journal record of `kind` (1 write, 2 tag, 3 zero; see the
/// module doc) with the decoder [`Journal::open`] checks every record with and
/// [`Journal::read_from`] reads them with; a write's data is a slice of `payload`.
/// `Err` says what is wrong with the payload. Public for the `agent_journal_recovery`
/// fuzz target, which runs it inside seglog's recovery scan as `open` does.
pub fn decode_record_payload(kind: u8, payload: &bytes::Bytes) -> Result<Entry, String> {
    format::decode_entry(kind, payload)
}
