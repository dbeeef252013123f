//! `seglog`: the one append-only, segmented, checksummed log behind the agent journal,
//! the process-server spool and the master target's undo journal (DESIGN.md rule 8).
//! Each owner keeps its own record payloads; durability lives here.
//!
//! # Layout
//! A log is a directory of segment files `seg-<first lsn, 16 hex digits>.<ext>`, each a
//! header and then records (see [`format`]). Every record has an lsn; lsns are
//! contiguous inside a segment and across segments, except where whole segments were
//! retired ([`Retire::Any`] logs only). Files are created 0600, directories 0700.
//!
//! # The fsync contract
//! - [`Log::append`] writes at the log's end (page cache): not durable yet.
//! - [`Log::sync`]: one `fdatasync` of the active segment makes every record appended
//!   before it durable ([`Log::durable_lsn`]). Only what a sync covered may be
//!   acknowledged to anyone.
//! - Rolling to a new segment (once the active one passes the segment target)
//!   `fdatasync`s the closing segment, then creates the new one (`O_EXCL`), writes and
//!   `fdatasync`s its header and fsyncs the directory, all before a record goes into
//!   it. So a closed segment is always durable whole, and only the active segment's
//!   tail can ever be torn.
//! - Open: a torn tail is cut and the segment `fdatasync`ed; the active segment is
//!   `fdatasync`ed anyway (what a killed process left in the page cache becomes durable
//!   before anything is appended after it); removed files are made durable by a
//!   directory fsync.
//! - Retiring segments and [`Log::truncate_from`] remove files, then fsync the
//!   directory. A retire lost in a crash brings a segment back; its owner's own state
//!   (released-through, acks, prune marks) retires it again.
//!
//! # When storage fails
//! - An append that fails (ENOSPC, EIO, a short write) is cut back: the file is
//!   truncated to the log's last good end before the error is returned, so the next
//!   append lands right after the last good record. If the cut-back fails too, or a
//!   new segment cannot be created and removed cleanly, the log is *poisoned*.
//! - A failed `fdatasync` poisons the log at once: Linux may have dropped the dirty
//!   pages, and a later fsync that succeeds would prove nothing ("fsyncgate"). A
//!   poisoned log refuses appends and syncs ([`LogError::Poisoned`]) until it is opened
//!   again, which recovers from what is durable.
//!
//! # Recovery ([`recover`])
//! Only the active (last) segment's tail may be torn: from its first bad record on it
//! is cut off and reported ([`Cut`]). Damage anywhere else — a bad record inside a
//! closed segment, a missing segment in a [`Retire::Prefix`] log, a bad header on a
//! segment that holds records — is corruption: the log is refused with the segment and
//! offset named ([`LogError::Corrupt`]), and nothing is cut. A last segment whose header
//! is torn and that holds nothing else was torn while being created and is removed.
//! Intact data of another format version is refused as unsupported, never cut.

pub mod format;
pub mod recover;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use thiserror::Error;
use tracing::{error, info, warn};

use crate::storage::{self, FILE_MODE};
use format::{RecordHeader, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
pub use recover::Retire;
use recover::{Action, Plan, ScanRules, Seen};

/// Bytes of a segment header.
pub const SEGMENT_HEADER: u64 = SEGMENT_HEADER_LEN as u64;
/// Bytes of a record header.
pub const RECORD_HEADER: u64 = RECORD_HEADER_LEN as u64;

/// What a log is and how it behaves.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Name in errors and logs, and the fault-injection scope of its sites.
    pub scope: &'static str,
    /// The log's kind in every segment header.
    pub kind: [u8; 4],
    /// Extension of segment files.
    pub extension: &'static str,
    /// A segment is closed once the next record would take it past this size.
    pub segment_target: u64,
    /// Largest payload of one record.
    pub max_payload: usize,
    /// Whether closed segments may be retired out of order.
    pub retire: Retire,
    /// Check every payload's checksum at open (otherwise only the active segment's;
    /// closed segments are walked header by header and checked when read).
    pub verify_closed: bool,
    /// Keep the offset of every record in memory (8 bytes a record), so any lsn can be
    /// read directly with [`Segments::read_lsn`].
    pub index: bool,
}

/// Errors of a log, naming the log, the file and the step.
#[derive(Debug, Error)]
pub enum LogError {
    /// A file-system step failed.
    #[error("{log} {path}: {step}: {source}")]
    Io {
        /// Which log.
        log: &'static str,
        /// What was being done.
        step: &'static str,
        /// Which file or directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Damage outside the active segment's tail: nothing was cut.
    #[error("{log} {path} at byte {offset}: {reason}; the log is damaged outside its torn tail and nothing was cut: restore it from backup, or remove it to start over")]
    Corrupt {
        /// Which log.
        log: &'static str,
        /// Which segment.
        path: PathBuf,
        /// Where in it.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// Intact data of another format version.
    #[error(
        "{log} {path}: {reason}: run the version that wrote it, or remove the log to start over"
    )]
    Unsupported {
        /// Which log.
        log: &'static str,
        /// Which segment.
        path: PathBuf,
        /// What is not supported.
        reason: String,
    },
    /// An earlier sync (or cut-back) failed; the log refuses more until reopened.
    #[error("{log} {dir}: refused: {cause}; what was appended since the last good sync may be lost, so the log takes nothing more until it is reopened (restart), which recovers from what is durable")]
    Poisoned {
        /// Which log.
        log: &'static str,
        /// Its directory.
        dir: PathBuf,
        /// The failure that poisoned it.
        cause: String,
    },
    /// A record larger than the log's cap (a caller bug).
    #[error("{log}: a record of {len} bytes exceeds the cap of {max}")]
    TooLarge {
        /// Which log.
        log: &'static str,
        /// Its length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// A record asked for is not in the log (retired, or never written).
    #[error("{log}: lsn {lsn} is not held (retired or not yet written)")]
    NotHeld {
        /// Which log.
        log: &'static str,
        /// The lsn.
        lsn: u64,
    },
}

impl LogError {
    /// Whether the cause is a full file system (ENOSPC or EDQUOT): the owner pushes
    /// back, or frees space, rather than failing.
    pub fn is_out_of_space(&self) -> bool {
        match self {
            LogError::Io { source, .. } => is_out_of_space(source),
            _ => false,
        }
    }
}

/// Whether an OS error means the file system is full.
pub fn is_out_of_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Where a record is: enough to read it back without a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    /// The first lsn of its segment (the segment's name).
    pub segment: u64,
    /// Byte offset in the segment.
    pub offset: u64,
    /// Its lsn.
    pub lsn: u64,
    /// Total bytes, header included.
    pub len: u64,
}

/// A record read back, checksum verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its lsn.
    pub lsn: u64,
    /// The owner's record type.
    pub kind: u8,
    /// The payload.
    pub payload: Bytes,
}

/// A record recovery met at open, handed to the owner's visitor.
pub type Visit<'a> = Seen<'a>;

/// A torn tail cut off at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    /// The segment.
    pub segment: PathBuf,
    /// Offset cut back to.
    pub offset: u64,
    /// Lsn the first dropped record would have had.
    pub lsn: u64,
    /// Bytes dropped.
    pub bytes_dropped: u64,
    /// Why the tail did not check out.
    pub reason: String,
}

/// What [`Log::open`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Segments kept.
    pub segments: usize,
    /// Records kept (in every segment, retired ones aside).
    pub records: u64,
    /// The lsn the next append gets.
    pub next_lsn: u64,
    /// The torn tail cut off, if any.
    pub cut: Option<Cut>,
    /// A last segment torn while being created, removed.
    pub torn_segment_removed: Option<PathBuf>,
}

/// One segment as the log knows it.
#[derive(Debug)]
struct Segment {
    file: Arc<storage::File>,
    first_lsn: u64,
    /// Lsn after its last record.
    end_lsn: u64,
    /// Bytes in use: the header and every whole record.
    len: u64,
    /// Offsets of its records, when the log keeps an index.
    offsets: Vec<u64>,
}

impl Segment {
    fn info(&self) -> SegmentInfo {
        SegmentInfo {
            path: self.file.path().to_path_buf(),
            first_lsn: self.first_lsn,
            end_lsn: self.end_lsn,
            bytes: self.len,
        }
    }
}

/// A segment's extent, for owners that plan retirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    /// The file.
    pub path: PathBuf,
    /// Lsn of its first record.
    pub first_lsn: u64,
    /// Lsn after its last record.
    pub end_lsn: u64,
    /// Bytes in use.
    pub bytes: u64,
}

#[derive(Debug)]
struct Table {
    segments: BTreeMap<u64, Segment>,
    /// First lsn of the active segment.
    active: u64,
    poisoned: Option<String>,
}

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    cfg: LogConfig,
    table: Mutex<Table>,
}

/// The shared side of a log: reading records, listing and retiring closed segments.
/// Cheap to clone; safe to use from other threads while the [`Log`] appends.
#[derive(Debug, Clone)]
pub struct Segments {
    shared: Arc<Shared>,
}

/// The writing side of a log: one owner appends, syncs, rolls and truncates.
#[derive(Debug)]
pub struct Log {
    segments: Segments,
    /// The active segment's file.
    active: Arc<storage::File>,
    active_first: u64,
    active_len: u64,
    next_lsn: u64,
    /// Every lsn below this is durable.
    durable: u64,
}

fn segment_name(first_lsn: u64, ext: &str) -> String {
    format!("seg-{first_lsn:016x}.{ext}")
}

fn parse_segment_name(name: &str, ext: &str) -> Option<u64> {
    let hex = name
        .strip_prefix("seg-")?
        .strip_suffix(ext)?
        .strip_suffix('.')?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn io(&self, step: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LogError {
        let (log, path) = (self.cfg.scope, path.to_path_buf());
        move |source| LogError::Io {
            log,
            step,
            path,
            source,
        }
    }

    fn poisoned(&self, cause: String) -> LogError {
        LogError::Poisoned {
            log: self.cfg.scope,
            dir: self.dir.clone(),
            cause,
        }
    }

    /// Marks the log poisoned (the first cause is kept) and returns the error to give.
    fn poison(&self, cause: String) -> LogError {
        error!(log = self.cfg.scope, dir = %self.dir.display(), %cause, "log poisoned: it takes nothing more until reopened");
        let mut t = self.lock();
        let cause = t.poisoned.get_or_insert(cause).clone();
        drop(t);
        self.poisoned(cause)
    }

    fn check_poisoned(&self) -> Result<(), LogError> {
        match &self.lock().poisoned {
            Some(cause) => Err(self.poisoned(cause.clone())),
            None => Ok(()),
        }
    }

    fn path_of(&self, first_lsn: u64) -> PathBuf {
        self.dir.join(segment_name(first_lsn, self.cfg.extension))
    }
}

impl Log {
    /// Opens (or creates) the log in `dir` and recovers it as the module doc says.
    /// `visit` sees every intact record in lsn order (payloads of closed segments only
    /// with `verify_closed`); returning `Err(reason)` marks that record damaged.
    /// `start_lsn` is the lsn of the first record of an empty log, and in
    /// [`Retire::Prefix`] logs the lowest lsn the owner still needs (records from it on
    /// must all be present).
    pub fn open(
        dir: &Path,
        cfg: LogConfig,
        start_lsn: u64,
        visit: impl FnMut(Visit<'_>) -> Result<(), String>,
    ) -> Result<(Log, Recovery), LogError> {
        Log::open_needing(dir, cfg, start_lsn, Some(start_lsn), visit)
    }

    /// [`Log::open`] for an owner whose lowest needed lsn is not the first lsn of an
    /// empty log: `needed` is the lowest lsn it still needs (`None`: it needs whatever
    /// the oldest segment holds; segments must still follow each other without gaps in
    /// a [`Retire::Prefix`] log).
    pub fn open_needing(
        dir: &Path,
        cfg: LogConfig,
        start_lsn: u64,
        needed: Option<u64>,
        mut visit: impl FnMut(Visit<'_>) -> Result<(), String>,
    ) -> Result<(Log, Recovery), LogError> {
        let shared = Shared {
            dir: dir.to_path_buf(),
            cfg: cfg.clone(),
            table: Mutex::new(Table {
                segments: BTreeMap::new(),
                active: 0,
                poisoned: None,
            }),
        };
        storage::create_dir_all(cfg.scope, dir).map_err(shared.io("create directory", dir))?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(shared.io("list", dir))? {
            let entry = entry.map_err(shared.io("list", dir))?;
            if let Some(lsn) = entry
                .file_name()
                .to_str()
                .and_then(|n| parse_segment_name(n, cfg.extension))
            {
                found.push(lsn);
            }
        }
        found.sort_unstable();

        // Scan every segment, collecting what the owner's visitor and the index need.
        let mut files = Vec::with_capacity(found.len());
        let mut scans = Vec::with_capacity(found.len());
        let mut offsets: Vec<Vec<u64>> = Vec::with_capacity(found.len());
        for (i, lsn) in found.iter().enumerate() {
            let path = shared.path_of(*lsn);
            let file = storage::File::open_rw(cfg.scope, &path)
                .map_err(shared.io("open segment", &path))?;
            let last = i + 1 == found.len();
            let rules = ScanRules {
                kind: cfg.kind,
                max_payload: cfg.max_payload,
                payloads: last || cfg.verify_closed,
            };
            let mut offs = Vec::new();
            let scan = recover::scan_segment(&file, *lsn, rules, |seen| {
                if cfg.index {
                    offs.push(seen.offset);
                }
                visit(seen)
            })
            .map_err(shared.io("read segment", &path))?;
            scans.push(scan);
            offsets.push(offs);
            files.push(file);
        }

        let mut recovery = Recovery::default();
        let actions = match recover::plan(&scans, cfg.retire, needed) {
            Plan::Recover(actions) => actions,
            Plan::Corrupt {
                segment,
                offset,
                reason,
            } => {
                let path = shared.path_of(found[segment]);
                error!(log = cfg.scope, segment = %path.display(), offset, %reason, "log damaged outside its torn tail: refusing it");
                return Err(LogError::Corrupt {
                    log: cfg.scope,
                    path,
                    offset,
                    reason,
                });
            }
            Plan::Unsupported { segment, reason } => {
                return Err(LogError::Unsupported {
                    log: cfg.scope,
                    path: shared.path_of(found[segment]),
                    reason,
                })
            }
        };
        let mut removed = false;
        let mut table = BTreeMap::new();
        for (((file, scan), mut offs), action) in
            files.into_iter().zip(scans).zip(offsets).zip(actions)
        {
            let path = file.path().to_path_buf();
            match action {
                Action::Keep => {}
                Action::DeleteTorn { reason } => {
                    warn!(log = cfg.scope, segment = %path.display(), %reason, "removing a segment torn while it was created (it held no record)");
                    storage::remove_file(cfg.scope, &path)
                        .map_err(shared.io("remove torn segment", &path))?;
                    recovery.torn_segment_removed = Some(path);
                    removed = true;
                    continue;
                }
                Action::CutTail { at, reason } => {
                    let cut = Cut {
                        segment: path.clone(),
                        offset: at,
                        lsn: scan.end_lsn(),
                        bytes_dropped: scan.file_len - at,
                        reason,
                    };
                    error!(log = cfg.scope, segment = %path.display(), offset = at, lsn = cut.lsn, bytes_dropped = cut.bytes_dropped, reason = %cut.reason, "cutting a torn tail off the active segment (never acknowledged)");
                    file.set_len(at)
                        .and_then(|()| file.sync_data())
                        .map_err(shared.io("cut torn tail", &path))?;
                    recovery.cut = Some(cut);
                }
            }
            offs.truncate(usize::try_from(scan.records).unwrap_or(usize::MAX));
            recovery.records += scan.records;
            let first_lsn = scan.header_lsn.unwrap_or(scan.name_lsn);
            table.insert(
                first_lsn,
                Segment {
                    file: Arc::new(file),
                    first_lsn,
                    end_lsn: scan.end_lsn(),
                    len: scan.valid_len,
                    offsets: offs,
                },
            );
        }
        if removed {
            storage::fsync_dir(cfg.scope, dir).map_err(shared.io("fsync directory", dir))?;
        }
        let segments = Segments {
            shared: Arc::new(shared),
        };
        let (active, active_first, active_len, next_lsn) = match table.values().next_back() {
            Some(seg) => {
                // What survived may sit in the page cache only (a killed process):
                // make it durable before anything new is appended after it.
                seg.file
                    .sync_data()
                    .map_err(segments.shared.io("fdatasync segment", seg.file.path()))?;
                (seg.file.clone(), seg.first_lsn, seg.len, seg.end_lsn)
            }
            None => {
                let seg = segments.create_segment(start_lsn)?;
                let out = (seg.file.clone(), start_lsn, seg.len, start_lsn);
                table.insert(start_lsn, seg);
                out
            }
        };
        {
            let mut t = segments.shared.lock();
            t.segments = table;
            t.active = active_first;
        }
        recovery.segments = segments.shared.lock().segments.len();
        recovery.next_lsn = next_lsn;
        if recovery.cut.is_none() {
            info!(log = cfg.scope, dir = %dir.display(), segments = recovery.segments, records = recovery.records, next_lsn, "log opened");
        }
        Ok((
            Log {
                segments,
                active,
                active_first,
                active_len,
                next_lsn,
                durable: next_lsn,
            },
            recovery,
        ))
    }

    /// The shared side, for readers and retirement.
    pub fn segments(&self) -> &Segments {
        &self.segments
    }

    /// The lsn the next append gets.
    pub fn next_lsn(&self) -> u64 {
        self.next_lsn
    }

    /// Every lsn below this is durable.
    pub fn durable_lsn(&self) -> u64 {
        self.durable
    }

    /// Whether records were appended since the last sync.
    pub fn has_unsynced(&self) -> bool {
        self.durable < self.next_lsn
    }

    /// Bytes a record with `payload_len` bytes of payload adds to the log, with a new
    /// segment's header when it would start one.
    pub fn cost(&self, payload_len: usize) -> u64 {
        let rec = RECORD_HEADER + payload_len as u64;
        if self.needs_roll(rec) {
            rec + SEGMENT_HEADER
        } else {
            rec
        }
    }

    fn needs_roll(&self, rec_len: u64) -> bool {
        self.active_len > SEGMENT_HEADER
            && self.active_len + rec_len > self.segments.shared.cfg.segment_target
    }

    /// Appends one record of `kind` whose payload is the concatenation of `parts`;
    /// returns where it is. Not durable until [`Log::sync`].
    pub fn append(&mut self, kind: u8, parts: &[&[u8]]) -> Result<Position, LogError> {
        let shared = self.segments.shared.clone();
        shared.check_poisoned()?;
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > shared.cfg.max_payload {
            return Err(LogError::TooLarge {
                log: shared.cfg.scope,
                len,
                max: shared.cfg.max_payload,
            });
        }
        let rec_len = RECORD_HEADER + len as u64;
        if self.needs_roll(rec_len) {
            self.begin_segment(self.next_lsn)?;
        }
        let lsn = self.next_lsn;
        let header = format::encode_record_header(kind, lsn, parts);
        let mut all: Vec<&[u8]> = Vec::with_capacity(parts.len() + 1);
        all.push(&header);
        all.extend_from_slice(parts);
        let at = self.active_len;
        if let Err(e) = self.active.write_parts_at(&all, at) {
            let err = shared.io("append", self.active.path())(e);
            // Cut back before anything else is appended: the next record must follow
            // the last good one, not partial bytes.
            if let Err(cut) = self.active.set_len(at) {
                return Err(shared.poison(format!(
                    "an append failed ({err}) and cutting it back failed too ({cut})"
                )));
            }
            return Err(err);
        }
        self.active_len += rec_len;
        self.next_lsn += 1;
        let mut t = shared.lock();
        if let Some(seg) = t.segments.get_mut(&self.active_first) {
            seg.end_lsn = self.next_lsn;
            seg.len = self.active_len;
            if shared.cfg.index {
                seg.offsets.push(at);
            }
        }
        Ok(Position {
            segment: self.active_first,
            offset: at,
            lsn,
            len: rec_len,
        })
    }

    /// Makes every record appended so far durable (one `fdatasync` of the active
    /// segment; none when nothing is new); returns [`Log::durable_lsn`]. A failure
    /// poisons the log.
    pub fn sync(&mut self) -> Result<u64, LogError> {
        let shared = self.segments.shared.clone();
        shared.check_poisoned()?;
        if self.has_unsynced() {
            if let Err(e) = self.active.sync_data() {
                return Err(shared.poison(format!(
                    "fdatasync {} failed: {e}",
                    self.active.path().display()
                )));
            }
            self.durable = self.next_lsn;
        }
        Ok(self.durable)
    }

    /// Closes the active segment (durably) and begins a new one at the next lsn;
    /// returns the closed segment's first lsn, `None` (and nothing done) when the
    /// active segment holds no record. Appends roll by themselves at the segment
    /// target; an owner rolls early to make a segment whose records are all released
    /// retirable (only a closed segment can be retired), e.g. to free space after
    /// ENOSPC on a file system smaller than a segment.
    pub fn roll(&mut self) -> Result<Option<u64>, LogError> {
        if self.active_len <= SEGMENT_HEADER {
            return Ok(None);
        }
        let closed = self.active_first;
        self.begin_segment(self.next_lsn)?;
        Ok(Some(closed))
    }

    /// Moves the log's end forward to `lsn`: the lsns between are never written, and
    /// the next record begins a new segment at `lsn`. For an owner whose own durable
    /// state is past what the log kept (records released, then lost with the page
    /// cache before a sync covered them). In a [`Retire::Prefix`] log the owner opens
    /// it again with a `start_lsn` of at least `lsn`, so the gap lies below what it
    /// needs. Nothing happens when `lsn` is not past the end.
    pub fn skip_to(&mut self, lsn: u64) -> Result<(), LogError> {
        self.segments.shared.check_poisoned()?;
        if lsn <= self.next_lsn {
            return Ok(());
        }
        self.begin_segment(lsn)
    }

    /// Makes the active segment durable and begins a new one at `first`.
    fn begin_segment(&mut self, first: u64) -> Result<(), LogError> {
        self.sync()?;
        let seg = self.segments.create_segment(first)?;
        let shared = &self.segments.shared;
        self.active = seg.file.clone();
        self.active_first = seg.first_lsn;
        self.active_len = seg.len;
        let mut t = shared.lock();
        t.active = seg.first_lsn;
        t.segments.insert(seg.first_lsn, seg);
        drop(t);
        self.next_lsn = first;
        self.durable = first;
        Ok(())
    }

    /// Discards every record from `lsn` on (durably): later segments are removed and
    /// the one holding `lsn` is cut before it. `lsn` must be at least the first lsn of
    /// the oldest segment held.
    pub fn truncate_from(&mut self, lsn: u64) -> Result<(), LogError> {
        let shared = self.segments.shared.clone();
        shared.check_poisoned()?;
        if lsn >= self.next_lsn {
            return Ok(());
        }
        let held = self.segments.first_lsn();
        if lsn < held {
            return Err(LogError::NotHeld {
                log: shared.cfg.scope,
                lsn,
            });
        }
        // Find where `lsn` starts before changing anything.
        let keeper = {
            let t = shared.lock();
            t.segments
                .range(..=lsn)
                .next_back()
                .map(|(first, s)| (*first, s.file.clone()))
        };
        let Some((keep_first, keep_file)) = keeper else {
            return Err(LogError::NotHeld {
                log: shared.cfg.scope,
                lsn,
            });
        };
        let at = if lsn == keep_first {
            SEGMENT_HEADER
        } else {
            self.segments
                .position_in(keep_first, &keep_file, lsn)?
                .offset
        };
        let later: Vec<Arc<storage::File>> = {
            let t = shared.lock();
            t.segments
                .range(keep_first + 1..)
                .map(|(_, s)| s.file.clone())
                .collect()
        };
        for f in later.iter().rev() {
            storage::remove_file(shared.cfg.scope, f.path())
                .map_err(shared.io("remove segment", f.path()))?;
            shared
                .lock()
                .segments
                .retain(|_, s| s.file.path() != f.path());
        }
        if let Err(e) = keep_file.set_len(at).and_then(|()| keep_file.sync_data()) {
            return Err(shared.poison(format!(
                "truncating {} failed: {e}",
                keep_file.path().display()
            )));
        }
        storage::fsync_dir(shared.cfg.scope, &shared.dir)
            .map_err(shared.io("fsync directory", &shared.dir))?;
        let mut t = shared.lock();
        if let Some(seg) = t.segments.get_mut(&keep_first) {
            seg.end_lsn = lsn;
            seg.len = at;
            let keep = usize::try_from(lsn - keep_first).unwrap_or(usize::MAX);
            seg.offsets.truncate(keep);
        }
        t.active = keep_first;
        drop(t);
        self.active = keep_file;
        self.active_first = keep_first;
        self.active_len = at;
        self.next_lsn = lsn;
        self.durable = lsn;
        Ok(())
    }
}

impl Segments {
    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The log's configuration.
    pub fn config(&self) -> &LogConfig {
        &self.shared.cfg
    }

    /// Why the log is poisoned, if it is.
    pub fn poisoned(&self) -> Option<String> {
        self.shared.lock().poisoned.clone()
    }

    /// Bytes of every segment held.
    pub fn bytes(&self) -> u64 {
        self.shared.lock().segments.values().map(|s| s.len).sum()
    }

    /// The first lsn of the oldest segment held.
    pub fn first_lsn(&self) -> u64 {
        self.shared
            .lock()
            .segments
            .keys()
            .next()
            .copied()
            .unwrap_or(0)
    }

    /// Every segment held, oldest first (the last is the active one).
    pub fn list(&self) -> Vec<SegmentInfo> {
        self.shared
            .lock()
            .segments
            .values()
            .map(Segment::info)
            .collect()
    }

    /// The first lsn of the active segment.
    pub fn active_segment(&self) -> u64 {
        self.shared.lock().active
    }

    fn create_segment(&self, first_lsn: u64) -> Result<Segment, LogError> {
        let shared = &self.shared;
        let path = shared.path_of(first_lsn);
        let scope = shared.cfg.scope;
        let file = storage::File::create_new(scope, &path, FILE_MODE)
            .map_err(shared.io("create segment", &path))?;
        let header = format::encode_segment_header(shared.cfg.kind, first_lsn);
        // The header and the directory entry are durable before any record goes in:
        // so only the active segment's tail can be torn.
        let made = file
            .write_all_at(&header, 0)
            .and_then(|()| file.sync_data())
            .and_then(|()| storage::fsync_dir(scope, &shared.dir));
        if let Err(e) = made {
            let err = shared.io("create segment", &path)(e);
            let undone = storage::remove_file(scope, &path)
                .and_then(|()| storage::fsync_dir(scope, &shared.dir));
            if let Err(undo) = undone {
                return Err(shared.poison(format!(
                    "creating segment {} failed ({err}) and removing it failed too ({undo})",
                    path.display()
                )));
            }
            return Err(err);
        }
        Ok(Segment {
            file: Arc::new(file),
            first_lsn,
            end_lsn: first_lsn,
            len: SEGMENT_HEADER,
            offsets: Vec::new(),
        })
    }

    /// Reads the record at `pos`, checking that it is the record expected there and
    /// that its checksum holds.
    pub fn read(&self, pos: Position) -> Result<Record, LogError> {
        let file = {
            let t = self.shared.lock();
            match t.segments.get(&pos.segment) {
                Some(s) if pos.offset + pos.len <= s.len => s.file.clone(),
                _ => {
                    return Err(LogError::NotHeld {
                        log: self.shared.cfg.scope,
                        lsn: pos.lsn,
                    })
                }
            }
        };
        self.read_in(&file, pos)
    }

    fn read_in(&self, file: &storage::File, pos: Position) -> Result<Record, LogError> {
        let corrupt = |reason: String| LogError::Corrupt {
            log: self.shared.cfg.scope,
            path: file.path().to_path_buf(),
            offset: pos.offset,
            reason,
        };
        let total = usize::try_from(pos.len)
            .ok()
            .filter(|&n| {
                n >= RECORD_HEADER_LEN && n - RECORD_HEADER_LEN <= self.shared.cfg.max_payload
            })
            .ok_or_else(|| corrupt(format!("a record of {} bytes cannot be", pos.len)))?;
        let mut buf = vec![0u8; total];
        file.read_exact_at(&mut buf, pos.offset)
            .map_err(|e| corrupt(format!("read: {e}")))?;
        let mut h = [0u8; RECORD_HEADER_LEN];
        h.copy_from_slice(&buf[..RECORD_HEADER_LEN]);
        let header = RecordHeader::parse(&h, self.shared.cfg.max_payload)
            .map_err(|b| corrupt(bad_reason(b)))?;
        if header.lsn != pos.lsn || header.total_len() != pos.len {
            return Err(corrupt(format!(
                "found lsn {} of {} bytes where lsn {} of {} bytes was written",
                header.lsn,
                header.total_len(),
                pos.lsn,
                pos.len
            )));
        }
        header
            .verify(&h, &buf[RECORD_HEADER_LEN..])
            .map_err(|b| corrupt(bad_reason(b)))?;
        let payload = Bytes::from(buf).slice(RECORD_HEADER_LEN..);
        Ok(Record {
            lsn: header.lsn,
            kind: header.kind,
            payload,
        })
    }

    /// The position of `lsn` (logs with an index, or any log by walking the headers of
    /// its segment).
    pub fn position(&self, lsn: u64) -> Result<Position, LogError> {
        let not_held = LogError::NotHeld {
            log: self.shared.cfg.scope,
            lsn,
        };
        let (first, file, indexed) = {
            let t = self.shared.lock();
            let Some((first, s)) = t.segments.range(..=lsn).next_back() else {
                return Err(not_held);
            };
            if lsn >= s.end_lsn {
                return Err(not_held);
            }
            let i = usize::try_from(lsn - first).unwrap_or(usize::MAX);
            let indexed = s.offsets.get(i).map(|&off| {
                let end = s.offsets.get(i + 1).copied().unwrap_or(s.len);
                Position {
                    segment: *first,
                    offset: off,
                    lsn,
                    len: end - off,
                }
            });
            (*first, s.file.clone(), indexed)
        };
        match indexed {
            Some(pos) => Ok(pos),
            None => self.position_in(first, &file, lsn),
        }
    }

    /// Reads the record with `lsn`.
    pub fn read_lsn(&self, lsn: u64) -> Result<Record, LogError> {
        self.read(self.position(lsn)?)
    }

    fn position_in(
        &self,
        first: u64,
        file: &storage::File,
        lsn: u64,
    ) -> Result<Position, LogError> {
        let mut found = None;
        self.walk_file(first, file, |pos| {
            if pos.lsn == lsn {
                found = Some(pos);
                return false;
            }
            true
        })?;
        found.ok_or(LogError::NotHeld {
            log: self.shared.cfg.scope,
            lsn,
        })
    }

    /// The positions of every record of the segment beginning at `first_lsn`, walking
    /// its headers (payloads are checked when read).
    pub fn walk(&self, first_lsn: u64) -> Result<Vec<Position>, LogError> {
        let file = {
            let t = self.shared.lock();
            t.segments.get(&first_lsn).map(|s| s.file.clone())
        };
        let Some(file) = file else {
            return Err(LogError::NotHeld {
                log: self.shared.cfg.scope,
                lsn: first_lsn,
            });
        };
        let mut out = Vec::new();
        self.walk_file(first_lsn, &file, |pos| {
            out.push(pos);
            true
        })?;
        Ok(out)
    }

    fn walk_file(
        &self,
        first: u64,
        file: &storage::File,
        mut each: impl FnMut(Position) -> bool,
    ) -> Result<(), LogError> {
        let (end_lsn, len) = {
            let t = self.shared.lock();
            match t.segments.get(&first) {
                Some(s) => (s.end_lsn, s.len),
                None => return Ok(()),
            }
        };
        let mut at = SEGMENT_HEADER;
        let mut lsn = first;
        while lsn < end_lsn && at < len {
            let corrupt = |reason: String| LogError::Corrupt {
                log: self.shared.cfg.scope,
                path: file.path().to_path_buf(),
                offset: at,
                reason,
            };
            let mut h = [0u8; RECORD_HEADER_LEN];
            file.read_exact_at(&mut h, at)
                .map_err(|e| corrupt(format!("read header: {e}")))?;
            let header = RecordHeader::parse(&h, self.shared.cfg.max_payload)
                .map_err(|b| corrupt(bad_reason(b)))?;
            if header.lsn != lsn {
                return Err(corrupt(format!("lsn {} where {lsn} was due", header.lsn)));
            }
            let pos = Position {
                segment: first,
                offset: at,
                lsn,
                len: header.total_len(),
            };
            if !each(pos) {
                break;
            }
            at += header.total_len();
            lsn += 1;
        }
        Ok(())
    }

    /// Retires every closed segment whose records all lie below `lsn` ([`Retire::Prefix`]
    /// logs: the oldest first); returns the bytes freed. The active segment stays.
    pub fn retire_below(&self, lsn: u64) -> Result<u64, LogError> {
        let victims: Vec<u64> = {
            let t = self.shared.lock();
            t.segments
                .values()
                .take_while(|s| s.end_lsn <= lsn && s.first_lsn != t.active)
                .map(|s| s.first_lsn)
                .collect()
        };
        self.remove_segments(&victims)
    }

    /// Retires the closed segment beginning at `first_lsn` ([`Retire::Any`] logs);
    /// returns the bytes freed (0 for the active segment, or one not held).
    pub fn retire(&self, first_lsn: u64) -> Result<u64, LogError> {
        let ok = {
            let t = self.shared.lock();
            t.active != first_lsn && t.segments.contains_key(&first_lsn)
        };
        if !ok {
            return Ok(0);
        }
        self.remove_segments(&[first_lsn])
    }

    fn remove_segments(&self, victims: &[u64]) -> Result<u64, LogError> {
        let shared = &self.shared;
        let mut freed = 0;
        for first in victims {
            let path = shared.path_of(*first);
            storage::remove_file(shared.cfg.scope, &path)
                .map_err(shared.io("retire segment", &path))?;
            if let Some(s) = shared.lock().segments.remove(first) {
                freed += s.len;
            }
        }
        if !victims.is_empty() {
            storage::fsync_dir(shared.cfg.scope, &shared.dir)
                .map_err(shared.io("fsync directory", &shared.dir))?;
        }
        Ok(freed)
    }
}

fn bad_reason(b: format::Bad) -> String {
    match b {
        format::Bad::Damaged(r) | format::Bad::Unsupported(r) => r,
    }
}
