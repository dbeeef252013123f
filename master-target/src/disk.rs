//! One replicated disk at the master target: the ordered, idempotent apply path and
//! its durable record.
//!
//! Records (batches and tags) of a disk are applied strictly in `(generation, seq)`
//! order, whatever order their streams arrive in: a record waits for its predecessor.
//! A record already applied is acknowledged again once durable and changes nothing
//! (rule 2); a record of an older generation is obsolete and acknowledged without
//! being applied; a newer generation starts at seq 0 and makes the replica
//! inconsistent until its first tag.
//!
//! Durability (rule 1): apply writes the replica without syncing; a flusher task per
//! disk snapshots the record, fdatasyncs the replica, then stores the record (one more
//! fdatasync), and only then advances `durable`. Every waiting ack covered by that
//! flush is released at once (group commit). Rule 3: extents are verified
//! (decompressed and hashed) before the record waits for its turn, so a corrupt
//! batch never touches the replica.
//!
//! Retention: once a disk holds a recovery point, every write first saves the bytes it
//! overwrites in the disk's undo journal (see [`crate::retention`]), made durable
//! before the replica is touched; a tag records the journal's end as its cut's lsn.
//! Before the first point nothing is worth keeping, so an initial sync costs no
//! journal. While its group is failing over, a disk is paused: nothing is applied.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boomerang_common::delta::ExtentError;
use boomerang_common::durable::StateFile;
use boomerang_common::message::{Tag, TagKind};
use boomerang_common::{Batch, ChunkHash, Codec};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use tracing::{error, info, warn};

use crate::replica::Replica;
use crate::retention::{History, RetentionError, UndoJournal, MAX_RECORD};

/// A position in a disk's stream: the next seq expected in a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    /// Generation.
    pub generation: u64,
    /// Next seq expected.
    pub next_seq: u64,
}

/// Generations per epoch. The agent numbers its generations one after the other from
/// what the master target reports; when the master target must refuse every
/// generation an agent may have begun so far (a replica rolled back in place, whose
/// stream no longer describes it), it moves the disk to the start of the next epoch
/// ([`Position::next_epoch`]): every older generation is then obsolete, whatever the
/// agent began while the disk was paused, and the agent's next one is above it.
pub const EPOCH: u64 = 1 << 32;

impl Position {
    /// The start of the epoch after `generation`'s: a durable generation floor. Every
    /// record of a generation below it is obsolete (answered, never applied), and no
    /// agent has used it, as an agent only goes one generation past what it was told.
    pub fn next_epoch(generation: u64) -> Position {
        Position {
            generation: (generation / EPOCH).saturating_add(1).saturating_mul(EPOCH),
            next_seq: 0,
        }
    }
}

/// The cut a consistent replica holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cut {
    /// Tag kind.
    pub kind: TagKind,
    /// Point id.
    pub point_id: u64,
    /// Wall time of the cut (ms since epoch).
    pub time_ms: u64,
    /// Generation of the tag.
    pub generation: u64,
    /// Seq of the tag.
    pub seq: u64,
    /// The retention journal's end when the tag was applied: writing back every record
    /// from here on, newest first, turns the replica into this cut.
    #[serde(default)]
    pub lsn: u64,
    /// The disk's size at the cut.
    #[serde(default)]
    pub size: u64,
}

/// What the master target remembers durably about a disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// Disk id.
    pub disk: String,
    /// Group.
    pub group: String,
    /// Replica size.
    pub size: u64,
    /// Replica path.
    pub replica: std::path::PathBuf,
    /// Applied and durable position.
    pub position: Position,
    /// Raw bytes applied over the disk's life.
    pub bytes_applied: u64,
    /// The cut the replica is consistent at, when it is.
    pub cut: Option<Cut>,
    /// The crash- and app-consistent cuts the retention journal can give back, oldest
    /// first (at most [`MAX_POINTS`]; the retention executor prunes them).
    #[serde(default)]
    pub points: Vec<Cut>,
    /// The agent must start a new generation (it is told so when it checks in): the
    /// replica was rolled back under the stream, or the stream has a hole nothing
    /// will fill (a batch refused for integrity, a gap that outlived the timeout).
    /// Cleared when one starts.
    #[serde(default)]
    pub resync_required: bool,
    /// Batches refused because an extent failed its hash.
    pub integrity_failures: u64,
    /// When the last record was applied (ms since epoch).
    pub last_apply_ms: u64,
    /// Why the disk stopped applying (a full retention file system, a failed write),
    /// until a record applies again: `status` shows it.
    #[serde(default)]
    pub apply_error: Option<String>,
    /// The undo journal's end when this record was stored. Records past it saved
    /// the before-images of writes this record does not count (their flush failed,
    /// or the power went first); the replica may hold some of those writes, so they
    /// are written back before the disk opens ([`Disk::undo_unrecorded`]). None in
    /// records of versions before it was kept.
    #[serde(default)]
    pub journal_end: Option<u64>,
}

impl DiskRecord {
    /// The record of a disk announced for the first time: nothing applied yet.
    pub fn new(disk: &str, group: &str, size: u64, replica: std::path::PathBuf) -> Self {
        DiskRecord {
            disk: disk.to_string(),
            group: group.to_string(),
            size,
            replica,
            position: Position {
                generation: 0,
                next_seq: 0,
            },
            bytes_applied: 0,
            cut: None,
            points: Vec::new(),
            resync_required: false,
            integrity_failures: 0,
            last_apply_ms: 0,
            apply_error: None,
            journal_end: None,
        }
    }
}

/// A batch whose extents passed verification, ready to write.
#[derive(Debug)]
pub struct VerifiedBatch {
    /// Raw bytes of the batch's data extents, back to back.
    data: Vec<u8>,
    /// Writes in order: offset, and either a range of `data` or a run of zeros.
    runs: Vec<(u64, Run)>,
    raw_len: u64,
}

#[derive(Debug)]
enum Run {
    Data(std::ops::Range<usize>),
    Zeros(u64),
}

/// Decompresses and checks every extent of `batch` (rule 3), coalescing adjacent
/// extents into single large writes.
pub fn verify_batch(batch: &Batch, replica_size: u64) -> Result<VerifiedBatch, ExtentError> {
    let mut data = Vec::with_capacity(
        batch
            .extents
            .iter()
            .filter(|e| e.codec != Codec::Zero)
            .map(|e| e.len as usize)
            .sum(),
    );
    let mut runs: Vec<(u64, Run)> = Vec::with_capacity(batch.extents.len());
    let mut scratch = Vec::new();
    let mut zero_hashes: Vec<(u32, ChunkHash)> = Vec::new();
    for e in &batch.extents {
        if e.offset + u64::from(e.len) > replica_size {
            return Err(ExtentError::Decompress {
                offset: e.offset,
                len: e.len,
                reason: format!("extent ends past the replica's {replica_size} bytes"),
            });
        }
        let raw = e.decode_verified(&mut scratch, |len| {
            if let Some((_, h)) = zero_hashes.iter().find(|(l, _)| *l == len) {
                return *h;
            }
            let h = ChunkHash::of_zeros(len as usize);
            zero_hashes.push((len, h));
            h
        })?;
        let end_of_last = runs.last().map(|(off, run)| match run {
            Run::Data(r) => (*off + r.len() as u64, true),
            Run::Zeros(n) => (*off + n, false),
        });
        match raw {
            Some(raw) => {
                let start = data.len();
                data.extend_from_slice(raw);
                match (runs.last_mut(), end_of_last) {
                    (Some((_, Run::Data(r))), Some((end, true))) if end == e.offset => {
                        r.end = data.len();
                    }
                    _ => runs.push((e.offset, Run::Data(start..data.len()))),
                }
            }
            None => match (runs.last_mut(), end_of_last) {
                (Some((_, Run::Zeros(n))), Some((end, false))) if end == e.offset => {
                    *n += u64::from(e.len);
                }
                _ => runs.push((e.offset, Run::Zeros(u64::from(e.len)))),
            },
        }
    }
    Ok(VerifiedBatch {
        data,
        runs,
        raw_len: batch.raw_len(),
    })
}

/// What happened to a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Applied now and durable.
    Applied,
    /// Applied before (a resend); durable, nothing changed.
    Duplicate,
    /// From an older generation; ignored.
    Obsolete,
}

/// Errors on the apply path.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The replica could not be written or synced.
    #[error("replica {disk}: {what}: {source}")]
    Io {
        /// Disk.
        disk: String,
        /// Step.
        what: &'static str,
        /// OS error.
        source: std::io::Error,
    },
    /// The predecessor of a record did not arrive in time.
    #[error("disk {disk}: waited {secs} s for seq {want} of generation {generation} before seq {seq}; the process server will resend")]
    Gap {
        /// Disk.
        disk: String,
        /// Generation.
        generation: u64,
        /// Seq waited for.
        want: u64,
        /// Seq that waited.
        seq: u64,
        /// Seconds waited.
        secs: u64,
    },
    /// The disk's group is failing over: replication waits for commit or cancel.
    #[error("disk {disk}: {reason}")]
    Paused {
        /// Disk.
        disk: String,
        /// Why.
        reason: String,
    },
    /// The retention journal failed.
    #[error("disk {disk}: {source}")]
    Retention {
        /// Disk.
        disk: String,
        /// What failed.
        source: RetentionError,
    },
    /// The disk's flusher failed; no more acks until restart.
    #[error("disk {0}: the last flush failed; see the log, fix the storage and restart")]
    FlushFailed(String),
}

/// One disk's live state.
#[derive(Debug)]
pub struct Disk {
    id: String,
    replica: Mutex<Arc<dyn Replica>>,
    record: Mutex<DiskRecord>,
    state: Arc<Mutex<StateFile<DiskRecord>>>,
    apply_lock: tokio::sync::Mutex<()>,
    flush_lock: tokio::sync::Mutex<()>,
    applied: watch::Sender<Position>,
    durable: watch::Sender<Position>,
    dirty: AtomicBool,
    flush_kick: Notify,
    flush_failed: AtomicBool,
    journal: Mutex<UndoJournal>,
    /// The journal's end when the record last stored was snapshotted: every point that
    /// record lists has its lsn at or below it.
    durable_lsn: AtomicU64,
    compressor: Mutex<Zstd>,
    paused: Mutex<Option<String>>,
}

/// Most points one disk record keeps, whatever the retention policy says.
pub const MAX_POINTS: usize = 4096;

/// How long a record waits for its predecessor before it is refused.
const GAP_TIMEOUT: Duration = Duration::from_secs(120);

impl Disk {
    /// Wraps a disk whose record was loaded from `state`; starts its flusher.
    pub fn start(
        replica: Arc<dyn Replica>,
        state: StateFile<DiskRecord>,
        journal: UndoJournal,
    ) -> Arc<Self> {
        let record = state.get().clone();
        let position = record.position;
        let durable_lsn = AtomicU64::new(journal.end_lsn());
        let disk = Arc::new(Disk {
            id: record.disk.clone(),
            replica: Mutex::new(replica),
            record: Mutex::new(record),
            state: Arc::new(Mutex::new(state)),
            apply_lock: tokio::sync::Mutex::new(()),
            flush_lock: tokio::sync::Mutex::new(()),
            applied: watch::Sender::new(position),
            durable: watch::Sender::new(position),
            dirty: AtomicBool::new(false),
            flush_kick: Notify::new(),
            flush_failed: AtomicBool::new(false),
            journal: Mutex::new(journal),
            durable_lsn,
            compressor: Mutex::new(Zstd(None)),
            paused: Mutex::new(None),
        });
        tokio::spawn(flusher(disk.clone()));
        disk
    }

    /// The disk id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Why this disk can apply nothing more until the master target restarts: its
    /// flush (the replica's fdatasync and the record's store) failed, or its undo
    /// journal is poisoned. A retried fsync after Linux dropped the dirty pages could
    /// succeed on lost data, so only a restart, recovering from what is durable, may
    /// go on.
    pub fn failed(&self) -> Option<String> {
        if self.flush_failed.load(Ordering::SeqCst) {
            return Some(format!(
                "disk {}: flushing the replica or storing its record failed (see the log above)",
                self.id
            ));
        }
        lock(&self.journal)
            .poisoned()
            .map(|cause| format!("disk {}: retention journal: {cause}", self.id))
    }

    /// The replica.
    pub fn replica(&self) -> Arc<dyn Replica> {
        lock(&self.replica).clone()
    }

    /// Replaces the replica store (a committed failover to a target makes the target
    /// the disk's replica). The caller has paused the disk and recorded the new path.
    pub fn swap_replica(&self, replica: Arc<dyn Replica>) {
        *lock(&self.replica) = replica;
    }

    /// A copy of the in-memory record (may be ahead of the durable one).
    pub fn record(&self) -> DiskRecord {
        lock(&self.record).clone()
    }

    /// The durable position.
    pub fn durable(&self) -> Position {
        *self.durable.borrow()
    }

    /// The seq a durable ack of record `seq` of `generation` names: the highest seq
    /// of that generation held durably, at or past `seq` (a resend of an old record
    /// tells the process server how far the disk already is).
    pub fn acked_through(&self, generation: u64, seq: u64) -> u64 {
        let d = self.durable();
        if d.generation == generation && d.next_seq > seq {
            d.next_seq - 1
        } else {
            seq
        }
    }

    /// The record as last stored (what a restart would find).
    pub fn durable_record(&self) -> DiskRecord {
        lock(&self.state).get().clone()
    }

    /// The retention journal's end: the lsn a tag applied now would get.
    pub fn journal_end(&self) -> u64 {
        lock(&self.journal).end_lsn()
    }

    /// Bytes the retention journal holds.
    pub fn journal_bytes(&self) -> u64 {
        lock(&self.journal).size_bytes()
    }

    /// Bytes of the retention journal's records from `lsn` on: what keeping a cut at
    /// `lsn` costs (0 when the journal cannot tell, e.g. history already pruned).
    pub fn journal_bytes_from(&self, lsn: u64) -> u64 {
        lock(&self.journal).bytes_from(lsn).unwrap_or(0)
    }

    /// Stops (with `reason`, told to senders) or resumes applying records; returns once
    /// a record being applied has finished. A record waiting for the apply lock checks
    /// the pause again once it has it, so nothing is applied after a pause returned.
    pub async fn set_paused(&self, reason: Option<String>) {
        *lock(&self.paused) = reason;
        drop(self.apply_lock.lock().await);
    }

    /// Why the disk is paused, when it is.
    pub fn paused(&self) -> Option<String> {
        lock(&self.paused).clone()
    }

    /// Stores `change` applied to the record, durably, right away (operator actions).
    /// Waits out a flush in progress, so that no older snapshot is stored after it.
    pub async fn update_record(
        &self,
        change: impl FnOnce(&mut DiskRecord),
    ) -> Result<(), ApplyError> {
        let _flush = self.flush_lock.lock().await;
        let _apply = self.apply_lock.lock().await;
        let mut record = {
            let mut rec = lock(&self.record);
            change(&mut rec);
            rec.clone()
        };
        // Nothing appends to the journal while the apply lock is held.
        let lsn = self.journal_end();
        record.journal_end = Some(lsn);
        let position = record.position;
        lock(&self.state)
            .store(record)
            .map_err(|e| ApplyError::Io {
                disk: self.id.clone(),
                what: "store disk record",
                source: std::io::Error::other(e),
            })?;
        self.durable_lsn.store(lsn, Ordering::SeqCst);
        // A new position (a stream restarted after a roll back) holds for the apply
        // path and for what the process server is told from now on.
        if *self.applied.borrow() != position {
            self.applied.send_replace(position);
            self.durable.send_replace(position);
        }
        Ok(())
    }

    /// Before the replica's hashes are read for a pass that ships in `generation`:
    /// moves the disk into that generation when it is newer than the one applying,
    /// so that no record of an older one (still in a process server's spool) lands
    /// after the read, then waits until everything applied is durable, so that the
    /// pass compares with what a restart keeps and never with a write that a failed
    /// flush or a power cut undoes. A paused disk stays where it is.
    pub async fn ready_for_manifest(&self, generation: u64) -> Result<(), ApplyError> {
        let at = {
            let _guard = self.apply_lock.lock().await;
            let cur = *self.applied.borrow();
            if generation > cur.generation && self.paused().is_none() {
                let next = Position {
                    generation,
                    next_seq: 0,
                };
                {
                    let mut rec = lock(&self.record);
                    self.enter_generation(&mut rec, generation, "its pass asked for the hashes");
                    rec.position = next;
                }
                self.applied.send_replace(next);
                self.dirty.store(true, Ordering::SeqCst);
                self.flush_kick.notify_one();
                next
            } else {
                // Whatever is applied and not yet durable has its flush kicked already.
                cur
            }
        };
        self.wait_durable(at).await
    }

    /// The record's side of a new generation starting (`why`): the replica holds no
    /// cut until the generation's first tag, and the resync asked for is under way.
    fn enter_generation(&self, rec: &mut DiskRecord, generation: u64, why: &str) {
        info!(disk = %self.id, from = rec.position.generation, to = generation, why, "new generation: older records are obsolete, replica inconsistent until its first tag");
        rec.cut = None;
        rec.resync_required = false;
    }

    /// Keeps the journal from being pruned until the returned guard drops.
    pub fn pin_history(self: &Arc<Self>) -> HistoryPin {
        lock(&self.journal).pin();
        HistoryPin { disk: self.clone() }
    }

    /// The history from `lsn` to the journal's current end.
    pub fn history(&self, lsn: u64) -> Result<History, ApplyError> {
        lock(&self.journal)
            .history(lsn)
            .map_err(|source| self.retention_error(source))
    }

    /// The oldest lsn whose history must be kept: the lowest lsn of the points in
    /// the record in memory *and* in the durable one (a point applied but not yet
    /// flushed, or dropped in memory but still listed on disk, keeps its history),
    /// and, with no point at all, no more than the journal's end as of the durable
    /// record. Points applied from now on get an lsn at or above this floor.
    pub fn history_floor(&self) -> u64 {
        // Read first: every point applied after this read has its lsn at or above it.
        let end = self.journal_end();
        let durable = self.durable_lsn.load(Ordering::SeqCst);
        let in_memory = lock(&self.record).points.iter().map(|c| c.lsn).min();
        let stored = lock(&self.state).get().points.iter().map(|c| c.lsn).min();
        [in_memory, stored]
            .into_iter()
            .flatten()
            .fold(end.min(durable), u64::min)
    }

    /// Deletes journal segments older than `lsn`, never past [`Disk::history_floor`];
    /// returns bytes freed.
    pub fn prune_journal_below(&self, lsn: u64) -> Result<u64, ApplyError> {
        let lsn = lsn.min(self.history_floor());
        lock(&self.journal)
            .prune_below(lsn)
            .map_err(|source| self.retention_error(source))
    }

    /// Discards the whole history (a committed failover: the disk went live), then
    /// stores the record with the journal's new end, so that a restart never takes
    /// the records appended from now on for ones the record counts.
    pub async fn clear_journal(&self) -> Result<(), ApplyError> {
        {
            let mut j = lock(&self.journal);
            let start = j.start_lsn();
            j.truncate_from(start)
                .map_err(|source| self.retention_error(source))?;
        }
        self.update_record(|_| {}).await
    }

    /// Before a disk opens: writes back, newest first, every record the journal holds
    /// past the end `record` was stored with, syncs the replica, and drops those
    /// records. They hold the before-images of writes the record does not count (a
    /// flush failed, or the power went, after they were applied); the replica may
    /// hold any of those writes, and applied again they would save them as
    /// before-images, so that a point taken between them gave back newer bytes.
    /// Returns how many records were undone.
    pub fn undo_unrecorded(
        record: &DiskRecord,
        replica: &dyn Replica,
        journal: &mut UndoJournal,
    ) -> Result<u64, RetentionError> {
        let Some(end) = record.journal_end else {
            return Ok(0);
        };
        if journal.end_lsn() <= end {
            return Ok(0);
        }
        let undone = journal.end_lsn() - end;
        let size = replica.size();
        journal
            .history(end)?
            .write_back(&mut crate::materialize::OnReplica { replica, size }, |_| {})?;
        replica.flush().map_err(|source| RetentionError::Io {
            path: record.replica.clone(),
            what: "fdatasync the replica after undoing writes past its record",
            source,
        })?;
        journal.truncate_from(end)?;
        warn!(disk = %record.disk, records = undone, journal_end = end, "undid writes the stored record does not count (a flush failed or the power went after they were applied): the replica is back at its record, and the process server sends them again");
        Ok(undone)
    }

    fn retention_error(&self, source: RetentionError) -> ApplyError {
        ApplyError::Retention {
            disk: self.id.clone(),
            source,
        }
    }

    /// Follows a resized source: resizes the replica, then durably records the new
    /// size. The agent starts a new generation after a resize, so the replica is
    /// consistent again only at that generation's first tag.
    pub fn resize(&self, size: u64) -> Result<(), ApplyError> {
        let io = |what, source| ApplyError::Io {
            disk: self.id.clone(),
            what,
            source,
        };
        self.replica().resize(size).map_err(|e| io("resize", e))?;
        let record = {
            let mut rec = lock(&self.record);
            info!(disk = %self.id, from = rec.size, to = size, "replica resized");
            if size < rec.size && !rec.points.is_empty() {
                warn!(disk = %self.id, dropped = rec.points.len(), "the disk shrank: its older points lost their tail and are dropped");
                rec.points.clear();
            }
            rec.size = size;
            rec.clone()
        };
        lock(&self.state)
            .store(record)
            .map_err(|e| io("store disk record", std::io::Error::other(e)))
    }

    /// Counts a batch of `generation` refused for integrity and persists the count.
    /// The process server drops a refused batch, and a continuous source cannot build
    /// it again, so a refusal in the current generation (or a newer one) also asks the
    /// agent for a new generation ([`DiskRecord::resync_required`]).
    pub fn count_integrity_failure(&self, generation: u64) {
        {
            let mut rec = lock(&self.record);
            rec.integrity_failures += 1;
            if generation >= rec.position.generation && !rec.resync_required {
                warn!(disk = %self.id, generation, "a batch was refused for integrity: the agent is asked for a new generation at its next check-in");
                rec.resync_required = true;
            }
        }
        self.dirty.store(true, Ordering::SeqCst);
        self.flush_kick.notify_one();
    }

    /// A gap in the stream did not fill within [`GAP_TIMEOUT`]: its record was
    /// refused and dropped, or lost with a process server's memory, and nothing will
    /// send it again; the agent is asked for a new generation at its next check-in.
    fn gap_never_filled(&self, generation: u64, want: u64) {
        {
            let mut rec = lock(&self.record);
            if generation < rec.position.generation || rec.resync_required {
                return;
            }
            warn!(disk = %self.id, generation, want, secs = GAP_TIMEOUT.as_secs(), "the stream has a gap that did not fill: the agent is asked for a new generation at its next check-in");
            rec.resync_required = true;
        }
        self.dirty.store(true, Ordering::SeqCst);
        self.flush_kick.notify_one();
    }

    /// Applies a verified batch in order; returns once it is durable.
    pub async fn apply_batch(
        &self,
        generation: u64,
        seq: u64,
        batch: VerifiedBatch,
    ) -> Result<Outcome, ApplyError> {
        self.apply_in_order(generation, seq, |disk| disk.write_batch(&batch))
            .await
    }

    /// Records a tag in order; returns once it is durable.
    pub async fn apply_tag(&self, tag: &Tag) -> Result<Outcome, ApplyError> {
        self.apply_in_order(tag.generation, tag.seq, |disk| {
            let lsn = lock(&disk.journal).end_lsn();
            let mut rec = lock(&disk.record);
            let cut = Cut {
                kind: tag.kind,
                point_id: tag.point_id,
                time_ms: tag.time_ms,
                generation: tag.generation,
                seq: tag.seq,
                lsn,
                size: rec.size,
            };
            // A scan taken under writes is a complete copy, not a point to go back to.
            if tag.kind != TagKind::SyncComplete {
                if rec.points.len() >= MAX_POINTS {
                    rec.points.remove(0);
                }
                rec.points.push(cut.clone());
            }
            rec.cut = Some(cut);
            if !tag.group.is_empty() {
                rec.group.clone_from(&tag.group);
            }
            info!(disk = %disk.id, kind = ?tag.kind, point = tag.point_id, generation = tag.generation, seq = tag.seq, "replica consistent at tag");
            Ok(())
        })
        .await
    }

    fn write_batch(&self, batch: &VerifiedBatch) -> Result<(), ApplyError> {
        if !lock(&self.record).points.is_empty() {
            self.save_before_images(batch)?;
        }
        let replica = self.replica();
        for (offset, run) in &batch.runs {
            let r = match run {
                Run::Data(range) => replica.write_at(*offset, &batch.data[range.clone()]),
                Run::Zeros(len) => replica.write_zeros(*offset, *len),
            };
            r.map_err(|source| ApplyError::Io {
                disk: self.id.clone(),
                what: "write",
                source,
            })?;
        }
        lock(&self.record).bytes_applied += batch.raw_len;
        Ok(())
    }

    /// Appends the bytes `batch` is about to overwrite to the undo journal and makes
    /// them durable: only then may the replica change.
    fn save_before_images(&self, batch: &VerifiedBatch) -> Result<(), ApplyError> {
        let mut journal = lock(&self.journal);
        let mut compressor = lock(&self.compressor);
        let compressor =
            match &mut compressor.0 {
                Some(c) => c,
                slot => slot.insert(zstd::bulk::Compressor::new(1).map_err(|source| {
                    ApplyError::Io {
                        disk: self.id.clone(),
                        what: "start zstd",
                        source,
                    }
                })?),
            };
        let mut before = Vec::new();
        let replica = self.replica();
        for (offset, run) in &batch.runs {
            let len = match run {
                Run::Data(r) => r.len() as u64,
                Run::Zeros(n) => *n,
            };
            let mut at = 0u64;
            while at < len {
                let n = (len - at).min(MAX_RECORD as u64);
                before.resize(usize::try_from(n).unwrap_or(MAX_RECORD), 0);
                replica
                    .read_at(offset + at, &mut before)
                    .map_err(|source| ApplyError::Io {
                        disk: self.id.clone(),
                        what: "read before-image",
                        source,
                    })?;
                journal
                    .append(offset + at, &before, compressor)
                    .map_err(|source| self.retention_error(source))?;
                at += n;
            }
        }
        journal
            .sync()
            .map_err(|source| self.retention_error(source))
    }

    async fn apply_in_order(
        &self,
        generation: u64,
        seq: u64,
        apply: impl FnOnce(&Self) -> Result<(), ApplyError>,
    ) -> Result<Outcome, ApplyError> {
        let mut rx = self.applied.subscribe();
        let deadline = tokio::time::Instant::now() + GAP_TIMEOUT;
        loop {
            let cur = *rx.borrow_and_update();
            if generation < cur.generation {
                return Ok(Outcome::Obsolete);
            }
            if generation == cur.generation && seq < cur.next_seq {
                self.wait_durable(Position {
                    generation,
                    next_seq: seq + 1,
                })
                .await?;
                return Ok(Outcome::Duplicate);
            }
            let my_turn = (generation == cur.generation && seq == cur.next_seq)
                || (generation > cur.generation && seq == 0);
            if let Some(reason) = self.paused() {
                return Err(ApplyError::Paused {
                    disk: self.id.clone(),
                    reason,
                });
            }
            if my_turn {
                let _guard = self.apply_lock.lock().await;
                if *self.applied.borrow() != cur {
                    continue; // someone else moved first (a resend of the same record)
                }
                // Again under the lock: a pause taken while this waited for it has
                // returned to its caller, which counts on nothing more being applied.
                if let Some(reason) = self.paused() {
                    return Err(ApplyError::Paused {
                        disk: self.id.clone(),
                        reason,
                    });
                }
                {
                    let mut rec = lock(&self.record);
                    if generation > rec.position.generation {
                        self.enter_generation(&mut rec, generation, "its first record");
                    }
                }
                if let Err(e) = apply(self) {
                    self.note_apply_error(&e);
                    return Err(e);
                }
                let next = Position {
                    generation,
                    next_seq: seq + 1,
                };
                {
                    let mut rec = lock(&self.record);
                    rec.position = next;
                    rec.last_apply_ms = boomerang_common::config::now_ms();
                    rec.apply_error = None;
                }
                self.applied.send_replace(next);
                self.dirty.store(true, Ordering::SeqCst);
                self.flush_kick.notify_one();
                drop(_guard);
                self.wait_durable(next).await?;
                return Ok(Outcome::Applied);
            }
            let want = if generation > cur.generation {
                0
            } else {
                cur.next_seq
            };
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    self.gap_never_filled(generation, want);
                    return Err(ApplyError::Gap {
                        disk: self.id.clone(),
                        generation,
                        want,
                        seq,
                        secs: GAP_TIMEOUT.as_secs(),
                    });
                }
            }
        }
    }

    /// Keeps why the disk stopped applying in its durable record, for `status`; stored
    /// once per new reason, not at every retry of the same batch.
    fn note_apply_error(&self, e: &ApplyError) {
        let text = e.to_string();
        let mut rec = lock(&self.record);
        if rec.apply_error.as_deref() != Some(text.as_str()) {
            rec.apply_error = Some(text);
            self.dirty.store(true, Ordering::SeqCst);
            self.flush_kick.notify_one();
        }
    }

    async fn wait_durable(&self, at_least: Position) -> Result<(), ApplyError> {
        let mut rx = self.durable.subscribe();
        loop {
            if *rx.borrow_and_update() >= at_least {
                return Ok(());
            }
            if self.flush_failed.load(Ordering::SeqCst) {
                return Err(ApplyError::FlushFailed(self.id.clone()));
            }
            if rx.changed().await.is_err() {
                return Err(ApplyError::FlushFailed(self.id.clone()));
            }
        }
    }
}

/// The compressor of before-images, made on first use.
struct Zstd(Option<zstd::bulk::Compressor<'static>>);

impl std::fmt::Debug for Zstd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Zstd")
    }
}

/// Keeps a disk's journal from being pruned while a point is materialized.
#[derive(Debug)]
pub struct HistoryPin {
    disk: Arc<Disk>,
}

impl Drop for HistoryPin {
    fn drop(&mut self) {
        lock(&self.disk.journal).unpin();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Group commit: whenever records were applied, snapshot the record, fdatasync the
/// replica (so every write the snapshot counts is on disk), store the record
/// (fdatasync of the state file), then release every ack up to the snapshot.
async fn flusher(disk: Arc<Disk>) {
    loop {
        disk.flush_kick.notified().await;
        while disk.dirty.swap(false, Ordering::SeqCst) {
            // Operator updates of the record wait for this whole flush.
            let _flush = disk.flush_lock.lock().await;
            // Snapshot under the apply lock so position and record agree.
            let (target, record, lsn) = {
                let _g = disk.apply_lock.lock().await;
                let lsn = disk.journal_end();
                let mut record = lock(&disk.record).clone();
                record.journal_end = Some(lsn);
                (*disk.applied.borrow(), record, lsn)
            };
            let d = disk.clone();
            let result = tokio::task::spawn_blocking(move || -> Result<(), String> {
                d.replica()
                    .flush()
                    .map_err(|e| format!("fdatasync replica: {e}"))?;
                lock(&d.state)
                    .store(record)
                    .map_err(|e| format!("store disk record: {e}"))
            })
            .await;
            match result {
                Ok(Ok(())) => {
                    disk.durable_lsn.store(lsn, Ordering::SeqCst);
                    disk.durable.send_replace(target);
                }
                Ok(Err(e)) => {
                    error!(disk = %disk.id, error = %e, "flush failed; no further acks for this disk");
                    disk.flush_failed.store(true, Ordering::SeqCst);
                    disk.durable.send_modify(|_| {});
                    return;
                }
                Err(e) => {
                    warn!(disk = %disk.id, error = %e, "flush task failed");
                    disk.flush_failed.store(true, Ordering::SeqCst);
                    disk.durable.send_modify(|_| {});
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::FileReplica;
    use boomerang_common::delta::ExtentEncoder;

    fn batch(seq: u64, generation: u64, offset: u64, fill: u8) -> Batch {
        let data = vec![fill; 65536];
        let mut enc = ExtentEncoder::new(1).expect("zstd");
        Batch {
            disk: "d0".into(),
            generation,
            seq,
            extents: vec![enc.encode(offset, &data, ChunkHash::of(&data))],
        }
    }

    fn open(dir: &std::path::Path) -> Arc<Disk> {
        let replica =
            Arc::new(FileReplica::open_or_create(&dir.join("d0.img"), 1 << 20).expect("replica"));
        let rec = DiskRecord::new("d0", "g", 1 << 20, dir.join("d0.img"));
        let st = StateFile::open_or_create(&dir.join("d0.state"), rec).expect("state");
        let journal = UndoJournal::open(
            &dir.join("retention"),
            crate::retention::SEGMENT_BYTES,
            None,
        )
        .expect("journal");
        Disk::start(replica, st, journal)
    }

    /// [`open`], then seq 0 (the first chunk all 1s) and an app-consistent point at
    /// seq 1: from here on every batch journals its before-images.
    async fn open_with_a_point(dir: &std::path::Path) -> Arc<Disk> {
        let disk = open(dir);
        let v = verify_batch(&batch(0, 1, 0, 1), 1 << 20).expect("verifies");
        disk.apply_batch(1, 0, v).await.expect("seq 0");
        let tag = Tag {
            disk: "d0".into(),
            generation: 1,
            seq: 1,
            kind: TagKind::AppConsistent,
            point_id: 7,
            time_ms: 1,
            group: "g".into(),
        };
        disk.apply_tag(&tag).await.expect("tag");
        disk
    }

    fn read(dir: &std::path::Path, offset: u64) -> u8 {
        let bytes = std::fs::read(dir.join("d0.img")).expect("read replica");
        bytes[usize::try_from(offset).expect("small")]
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn out_of_order_arrival_applies_in_seq_order_and_resends_change_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = open(dir.path());
        // seq 1 overwrites the chunk seq 0 wrote; it arrives first and must wait.
        let later = {
            let d = disk.clone();
            let v = verify_batch(&batch(1, 1, 0, 0xbb), 1 << 20).expect("verifies");
            tokio::spawn(async move { d.apply_batch(1, 1, v).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let v0 = verify_batch(&batch(0, 1, 0, 0xaa), 1 << 20).expect("verifies");
        assert_eq!(
            disk.apply_batch(1, 0, v0).await.expect("seq 0"),
            Outcome::Applied
        );
        assert_eq!(later.await.expect("join").expect("seq 1"), Outcome::Applied);
        assert_eq!(read(dir.path(), 0), 0xbb, "seq 1 applied after seq 0");
        // Resending seq 0 (as after a process-server crash) changes nothing.
        let again = verify_batch(&batch(0, 1, 0, 0xaa), 1 << 20).expect("verifies");
        assert_eq!(
            disk.apply_batch(1, 0, again).await.expect("resend"),
            Outcome::Duplicate
        );
        assert_eq!(
            disk.acked_through(1, 0),
            1,
            "its ack names the highest seq held, so a forwarder goes on after it"
        );
        assert_eq!(
            read(dir.path(), 0),
            0xbb,
            "the resend did not rewrite the chunk"
        );
        assert_eq!(
            disk.durable(),
            Position {
                generation: 1,
                next_seq: 2
            }
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_generation_obsoletes_the_old_and_clears_the_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = open(dir.path());
        let v = verify_batch(&batch(0, 1, 0, 1), 1 << 20).expect("verifies");
        disk.apply_batch(1, 0, v).await.expect("gen 1");
        let tag = Tag {
            disk: "d0".into(),
            generation: 1,
            seq: 1,
            kind: TagKind::SyncComplete,
            point_id: 7,
            time_ms: 1,
            group: "g".into(),
        };
        disk.apply_tag(&tag).await.expect("tag");
        assert!(disk.record().cut.is_some());
        assert!(
            disk.record().points.is_empty(),
            "a sync-complete cut is no recovery point"
        );
        let v = verify_batch(&batch(0, 2, 65536, 2), 1 << 20).expect("verifies");
        assert_eq!(
            disk.apply_batch(2, 0, v).await.expect("gen 2"),
            Outcome::Applied
        );
        assert!(
            disk.record().cut.is_none(),
            "a new generation is inconsistent until its tag"
        );
        let stale = verify_batch(&batch(1, 1, 0, 9), 1 << 20).expect("verifies");
        assert_eq!(
            disk.apply_batch(1, 1, stale).await.expect("stale"),
            Outcome::Obsolete
        );
        assert_eq!(read(dir.path(), 0), 1, "an obsolete batch is not written");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_retention_journal_stops_the_disk_and_says_why_until_it_applies_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = open_with_a_point(dir.path()).await;
        assert_eq!(disk.record().apply_error, None);
        {
            let _full = boomerang_common::faults::arm_under(dir.path(), "undo.write@1=enospc")
                .expect("arm");
            let v = verify_batch(&batch(2, 1, 0, 2), 1 << 20).expect("verifies");
            let err = disk
                .apply_batch(1, 2, v)
                .await
                .expect_err("the journal is full");
            assert!(err.to_string().contains("file system is full"), "{err}");
        }
        let shown = disk.record().apply_error.expect("the reason is kept");
        assert!(shown.contains("retention journal"), "{shown}");
        assert_eq!(read(dir.path(), 0), 1, "the replica is not written");
        // Retried with room again: applied, and the reason is gone.
        let v = verify_batch(&batch(2, 1, 0, 2), 1 << 20).expect("verifies");
        assert_eq!(
            disk.apply_batch(1, 2, v).await.expect("retry"),
            Outcome::Applied
        );
        assert_eq!(disk.record().apply_error, None);
        assert_eq!(disk.durable_record().apply_error, None);
        assert_eq!(read(dir.path(), 0), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_journal_sync_marks_the_disk_failed_until_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = open_with_a_point(dir.path()).await;
        assert_eq!(disk.failed(), None);
        {
            let _eio =
                boomerang_common::faults::arm_under(dir.path(), "undo.sync@1=eio").expect("arm");
            let v = verify_batch(&batch(2, 1, 0, 2), 1 << 20).expect("verifies");
            disk.apply_batch(1, 2, v)
                .await
                .expect_err("the sync failed");
        }
        let why = disk.failed().expect("the disk is failed");
        assert!(why.contains("retention journal"), "{why}");
        // Poisoned, not retried: room or not, nothing applies until a restart.
        let v = verify_batch(&batch(2, 1, 0, 2), 1 << 20).expect("verifies");
        disk.apply_batch(1, 2, v).await.expect_err("still poisoned");
        assert_eq!(read(dir.path(), 0), 1, "the replica is not written");
    }

    /// A pause taken while a batch waits for the apply lock (it passed the pause check
    /// just before) holds: the batch is refused once it has the lock, never applied
    /// after the pause returned.
    #[tokio::test(flavor = "current_thread")]
    async fn a_pause_taken_while_a_batch_waits_for_the_apply_lock_refuses_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = open(dir.path());
        let held = disk.apply_lock.lock().await;
        let apply = {
            let d = disk.clone();
            let v = verify_batch(&batch(0, 1, 0, 0xaa), 1 << 20).expect("verifies");
            tokio::spawn(async move { d.apply_batch(1, 0, v).await })
        };
        // The batch passes the pause check and queues on the lock first.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let pause = {
            let d = disk.clone();
            tokio::spawn(async move { d.set_paused(Some("failing over".into())).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(held);
        pause.await.expect("join pause");
        let result = apply.await.expect("join apply");
        assert!(
            matches!(result, Err(ApplyError::Paused { .. })),
            "applied after the pause: {result:?}"
        );
        assert_eq!(read(dir.path(), 0), 0, "the replica is not written");
    }

    /// A record that waited out the gap timeout for its predecessor (refused and
    /// dropped, or lost from a process server's memory with a restart) asks the agent
    /// for a new generation: nothing else would ever fill the gap.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_gap_that_never_fills_asks_for_a_resync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = open(dir.path());
        let v = verify_batch(&batch(0, 1, 0, 1), 1 << 20).expect("verifies");
        disk.apply_batch(1, 0, v).await.expect("seq 0");
        assert!(!disk.record().resync_required);
        let v = verify_batch(&batch(2, 1, 0, 2), 1 << 20).expect("verifies");
        let err = disk
            .apply_batch(1, 2, v)
            .await
            .expect_err("seq 1 never comes");
        assert!(matches!(err, ApplyError::Gap { .. }), "{err}");
        assert!(
            disk.record().resync_required,
            "the agent is not asked to resync"
        );
    }

    /// At open, the writes journaled past the record's `journal_end` are undone; a
    /// record of a version that kept no `journal_end` undoes nothing (it cannot say
    /// which writes it counts), so the replica keeps every byte.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_past_the_record_are_undone_at_open_and_an_old_record_undoes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (counted, record) = {
            let disk = open_with_a_point(dir.path()).await;
            let counted = disk.journal_end();
            let v = verify_batch(&batch(2, 1, 0, 2), 1 << 20).expect("verifies");
            disk.apply_batch(1, 2, v).await.expect("seq 2");
            (counted, disk.durable_record())
        };
        assert_eq!(read(dir.path(), 0), 2, "seq 2 applied");
        let replica =
            FileReplica::open_or_create(&dir.path().join("d0.img"), 1 << 20).expect("replica");
        let journal = |dir: &std::path::Path| {
            UndoJournal::open(
                &dir.join("retention"),
                crate::retention::SEGMENT_BYTES,
                Some(counted),
            )
            .expect("journal")
        };

        let old = DiskRecord {
            journal_end: None,
            ..record.clone()
        };
        let undone = Disk::undo_unrecorded(&old, &replica, &mut journal(dir.path())).expect("undo");
        assert_eq!(undone, 0);
        assert_eq!(
            read(dir.path(), 0),
            2,
            "a record without journal_end undid a write"
        );

        let stale = DiskRecord {
            journal_end: Some(counted),
            ..record
        };
        let undone =
            Disk::undo_unrecorded(&stale, &replica, &mut journal(dir.path())).expect("undo");
        assert_eq!(undone, 1, "the one batch past the record");
        assert_eq!(read(dir.path(), 0), 1, "the replica is back at its record");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_durable_record_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let disk = open(dir.path());
            for seq in 0..5 {
                let v = verify_batch(&batch(seq, 1, seq * 65536, 3), 1 << 20).expect("verifies");
                disk.apply_batch(1, seq, v).await.expect("apply");
            }
        }
        let st = StateFile::<DiskRecord>::open(&dir.path().join("d0.state")).expect("reopen");
        assert_eq!(
            st.get().position,
            Position {
                generation: 1,
                next_seq: 5
            }
        );
        assert_eq!(st.get().bytes_applied, 5 * 65536);
    }

    #[test]
    fn corrupt_and_out_of_range_extents_are_refused_before_any_write() {
        let mut b = batch(0, 1, 0, 5);
        let mut p = b.extents[0].payload.to_vec();
        p[3] ^= 0x40;
        b.extents[0].payload = bytes::Bytes::from(p);
        assert!(verify_batch(&b, 1 << 20).is_err());
        let past_end = batch(0, 1, (1 << 20) - 4096, 5);
        assert!(verify_batch(&past_end, 1 << 20).is_err());
    }

    #[test]
    fn adjacent_extents_coalesce_into_one_write() {
        let mut enc = ExtentEncoder::new(1).expect("zstd");
        let data = vec![7u8; 65536];
        let zeros = vec![0u8; 65536];
        let h = ChunkHash::of(&data);
        let hz = ChunkHash::of(&zeros);
        let b = Batch {
            disk: "d0".into(),
            generation: 1,
            seq: 0,
            extents: vec![
                enc.encode(0, &data, h),
                enc.encode(65536, &data, h),
                enc.encode(131072, &zeros, hz),
                enc.encode(196608, &zeros, hz),
                enc.encode(393216, &data, h),
            ],
        };
        let v = verify_batch(&b, 1 << 20).expect("verifies");
        assert_eq!(v.runs.len(), 3, "{:?}", v.runs);
    }
}
