//! The process server's durable spool: every batch and tag an agent sends is appended,
//! as the exact frame bytes it arrived in, to a [`seglog`] log and fdatasynced before
//! it is acknowledged (rule 1); it is dropped only after the master target's durable
//! ack.
//!
//! # Layout
//! `<spool dir>/seg-<first lsn, 16 hex>.spool`: segments of a seglog log of kind
//! `PSPL` (segment and record headers, checksums and the fsync contract are seglog's).
//! Each record's payload is one whole Boomerang frame (with its own magic, length and
//! crc32). Segments are retired out of order ([`Retire::Any`]) as soon as every record
//! in them is acknowledged.
//!
//! # Writing
//! Appends go through one writer thread that writes everything queued, fdatasyncs
//! once and then acknowledges all of it (group commit). A record whose write fails is
//! cut back by the log before anything else is appended (so no record is ever placed
//! after partial bytes); the records of the group before it are synced and
//! acknowledged, the failed one and those after it are answered with the error.
//! Each disk's records are held in seq order, as the master target applies them: a
//! record arriving ahead of its predecessor waits for it a moment, and after ENOSPC
//! no later seq of that disk is placed before the one that met it (a later record
//! would take room that nothing can free while the forwarder waits at the gap).
//! A failed fdatasync poisons the spool: nothing more is acknowledged, and the process
//! server stops (see [`Spool::failed`]) so that its restart recovers from what is
//! durable, never from a retried fsync after Linux dropped the dirty pages.
//!
//! # Recovery
//! At open every record is read and checked. Only the active segment's tail may be
//! torn (never acknowledged) and is cut; damage anywhere else is corruption: the
//! spool refuses to open and names the segment and offset, because the records there
//! were acknowledged to agents that have since freed them.
//!
//! # Backpressure (rule 7)
//! Spool space is a semaphore of 4 KiB units sized by `spool_max_bytes`; an append
//! waits for space, so a full spool stops acknowledging agents, whose bounded
//! in-flight windows then stop them. Space returns when the master target
//! acknowledges. A file system that fills before the cap (ENOSPC) is the same:
//! the append waits until a record is freed (or a second passes) and tries again.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boomerang_common::message::Message;
use boomerang_common::seglog::{self, Log, LogConfig, LogError, Position, Retire, Segments};
use boomerang_common::wire::{HEADER_LEN, MAX_BODY};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch, Notify, Semaphore};
use tracing::{info, warn};

/// A segment is closed once the next record would take it past this size.
pub const SEGMENT_TARGET: u64 = 64 << 20;
/// Unit of spool space accounting.
const UNIT: u64 = 4096;
/// How long a record arriving ahead of its predecessor (by seq, in its disk and
/// generation) waits for it before it is appended anyway.
const ORDER_WAIT: Duration = Duration::from_secs(1);
/// Record kind of a spooled frame.
const KIND_FRAME: u8 = 1;
const SCOPE: &str = "spool";

/// A record's identity: `(disk, generation, seq)`.
pub type Key = (String, u64, u64);

#[derive(Debug, Clone, Copy)]
struct Entry {
    pos: Position,
    units: u32,
}

#[derive(Debug, Default)]
struct Index {
    entries: BTreeMap<Key, Entry>,
    /// Records counted in each segment (by its first lsn), held or being written.
    live: HashMap<u64, usize>,
    /// Records the master target refused (integrity); the agent must resend them.
    rejected: HashMap<String, BTreeSet<(u64, u64)>>,
    /// Per (disk, generation): one past the highest seq placed so far.
    next_seq: HashMap<(String, u64), u64>,
}

/// Per (disk, generation) the writer refuses records past one that met ENOSPC, until
/// that one is placed: the master target applies in seq order, so a later record
/// placed while an earlier one waits for room would hold space that nothing can free
/// (the forwarder stops at the gap), and on a small file system hold it for ever.
type Blocked = HashMap<(String, u64), (u64, Arc<LogError>)>;

struct Append {
    key: Key,
    frame: Bytes,
    done: oneshot::Sender<Result<(), Arc<LogError>>>,
}

impl std::fmt::Debug for Append {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Append({:?})", self.key)
    }
}

/// The spool.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    index: Mutex<Index>,
    segments: Segments,
    space: Arc<Semaphore>,
    total_units: u64,
    appends: mpsc::Sender<Append>,
    /// Woken whenever a record becomes available to forward.
    pub appended: Notify,
    /// Woken whenever a record is freed (room for a retry after ENOSPC).
    freed: Notify,
    /// Set once the spool is poisoned: why.
    failed: watch::Sender<Option<String>>,
}

/// Why an append failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The log failed (IO, damage, another version, poisoned); it names the file.
    #[error(transparent)]
    Log(#[from] LogError),
    /// Writing the record failed; every record of its group got the same error.
    #[error(transparent)]
    Append(Arc<LogError>),
    /// The record is larger than the whole spool.
    #[error("a record of {0} bytes does not fit the spool at all; raise spool_max_mib")]
    TooLarge(usize),
    /// The writer thread stopped.
    #[error("the spool writer stopped; see the log")]
    WriterGone,
}

fn key_of(msg: &Message) -> Option<Key> {
    match msg {
        Message::Batch(b) => Some((b.disk.clone(), b.generation, b.seq)),
        Message::Tag(t) => Some((t.disk.clone(), t.generation, t.seq)),
        _ => None,
    }
}

fn log_config() -> LogConfig {
    LogConfig {
        scope: SCOPE,
        kind: *b"PSPL",
        extension: "spool",
        segment_target: SEGMENT_TARGET,
        max_payload: HEADER_LEN + MAX_BODY,
        retire: Retire::Any,
        verify_closed: true,
        index: false,
    }
}

fn units_of(len: u64) -> u32 {
    u32::try_from(len.div_ceil(UNIT)).unwrap_or(u32::MAX)
}

impl Spool {
    /// Opens (and recovers) the spool in `dir`, capped at `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Arc<Self>, SpoolError> {
        // Every intact record's key and lsn, in lsn order; a frame that does not
        // decode is damage at that record.
        let mut found: Vec<(Key, u64, u64, u64)> = Vec::new();
        let (log, recovery) = Log::open(dir, log_config(), 1, |seen| {
            let Some(payload) = seen.payload else {
                return Ok(());
            };
            let msg = Message::decode_exact(&Bytes::copy_from_slice(payload))
                .map_err(|e| format!("frame: {e}"))?;
            if let Some(key) = key_of(&msg) {
                found.push((key, seen.lsn, seen.offset, seen.len));
            }
            Ok(())
        })?;
        let segments = log.segments().clone();
        let mut index = Index::default();
        let mut used_units = 0u64;
        let firsts: Vec<u64> = segments.list().iter().map(|s| s.first_lsn).collect();
        for (key, lsn, offset, len) in found {
            let at = firsts.partition_point(|&f| f <= lsn);
            let pos = Position {
                segment: firsts[at.saturating_sub(1)],
                offset,
                lsn,
                len,
            };
            let entry = Entry {
                pos,
                units: units_of(pos.len),
            };
            *index.live.entry(pos.segment).or_default() += 1;
            used_units += u64::from(entry.units);
            if let Some(old) = index.entries.insert(key, entry) {
                // A resend spooled twice: the later copy stands.
                used_units -= u64::from(old.units);
                if let Some(n) = index.live.get_mut(&old.pos.segment) {
                    *n -= 1;
                }
            }
        }
        // Segments holding nothing live are retired (the active one stays).
        for info in segments.list() {
            if index.live.get(&info.first_lsn).copied().unwrap_or(0) == 0 {
                segments.retire(info.first_lsn)?;
            }
        }
        let records = index.entries.len();
        let total_units = (max_bytes / UNIT).max(1);
        let free = total_units.saturating_sub(used_units);
        if records > 0 || recovery.cut.is_some() {
            info!(
                records,
                bytes = used_units * UNIT,
                torn_tail_cut = recovery.cut.is_some(),
                "spool recovered: forwarding what the master target has not acknowledged"
            );
        }
        let (tx, rx) = mpsc::channel(1024);
        let spool = Arc::new(Spool {
            dir: dir.to_path_buf(),
            index: Mutex::new(index),
            segments,
            space: Arc::new(Semaphore::new(
                usize::try_from(free).unwrap_or(usize::MAX >> 4),
            )),
            total_units,
            appends: tx,
            appended: Notify::new(),
            freed: Notify::new(),
            failed: watch::channel(None).0,
        });
        let writer = spool.clone();
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer.write_loop(log, rx))
            .map_err(|source| LogError::Io {
                log: SCOPE,
                step: "start writer thread",
                path: dir.to_path_buf(),
                source,
            })?;
        Ok(spool)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Resolves once the spool is poisoned (a failed fdatasync, or a failed append it
    /// could not cut back), with the cause: the process server must stop, and its
    /// restart recovers the spool from what is durable.
    pub async fn failed(&self) -> String {
        let mut rx = self.failed.subscribe();
        loop {
            if let Some(cause) = rx.borrow_and_update().clone() {
                return cause;
            }
            if rx.changed().await.is_err() {
                // The sender lives as long as the spool.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Appends a batch or tag frame durably; returns once it is fdatasynced. A record
    /// already held is not written twice. Waits while the spool (or the file system
    /// under it) is full.
    pub async fn append(&self, msg: &Message, frame: Bytes) -> Result<(), SpoolError> {
        let Some(key) = key_of(msg) else {
            return Ok(());
        };
        if self.lock().entries.contains_key(&key) {
            return Ok(()); // entries enter the index only once durable
        }
        let units = (seglog::RECORD_HEADER + frame.len() as u64).div_ceil(UNIT);
        if units > self.total_units {
            return Err(SpoolError::TooLarge(frame.len()));
        }
        let units = u32::try_from(units).map_err(|_| SpoolError::TooLarge(frame.len()))?;
        self.wait_for_predecessors(&key).await;
        if self.space.available_permits() < units as usize {
            warn!(disk = %key.0, "spool full: pushing back on agents until the master target catches up");
        }
        let permit = self
            .space
            .acquire_many(units)
            .await
            .map_err(|_| SpoolError::WriterGone)?;
        permit.forget(); // returned by `remove`
        let mut warned = false;
        loop {
            let freed = self.freed.notified();
            let (done, wait) = oneshot::channel();
            let sent = self
                .appends
                .send(Append {
                    key: key.clone(),
                    frame: frame.clone(),
                    done,
                })
                .await;
            let result = match sent {
                Ok(()) => wait.await.map_err(|_| SpoolError::WriterGone),
                Err(_) => Err(SpoolError::WriterGone),
            };
            match result {
                Ok(Ok(())) => {
                    if let Some(set) = self.lock().rejected.get_mut(&key.0) {
                        set.remove(&(key.1, key.2));
                    }
                    self.appended.notify_waiters();
                    return Ok(());
                }
                Ok(Err(e)) if e.is_out_of_space() => {
                    // The file system filled before the spool's cap: push back like a
                    // full spool until the master target frees something.
                    if !warned {
                        warn!(disk = %key.0, dir = %self.dir.display(), error = %e, "spool file system full: pushing back on agents until space is freed");
                        warned = true;
                    }
                    tokio::select! {
                        () = freed => {}
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                Ok(Err(e)) => {
                    self.space.add_permits(units as usize);
                    return Err(SpoolError::Append(e));
                }
                Err(e) => {
                    self.space.add_permits(units as usize);
                    return Err(e);
                }
            }
        }
    }

    /// Records of a disk arrive over concurrent streams, so now and then a seq before
    /// its predecessor: it waits (up to [`ORDER_WAIT`], for a predecessor that may
    /// never come) so that the spool holds each disk's records in seq order, which a
    /// full file system needs (see [`Blocked`]).
    async fn wait_for_predecessors(&self, key: &Key) {
        let deadline = tokio::time::Instant::now() + ORDER_WAIT;
        let stream = (key.0.clone(), key.1);
        loop {
            let placed = self.appended.notified();
            let ahead = self
                .lock()
                .next_seq
                .get(&stream)
                .is_some_and(|&next| key.2 > next);
            if !ahead || tokio::time::timeout_at(deadline, placed).await.is_err() {
                return;
            }
        }
    }

    fn write_loop(self: Arc<Self>, mut log: Log, mut rx: mpsc::Receiver<Append>) {
        let mut pending: Vec<Append> = Vec::new();
        let mut blocked = Blocked::new();
        while let Some(first) = rx.blocking_recv() {
            pending.push(first);
            let mut bytes: usize = pending[0].frame.len();
            while bytes < (64 << 20) {
                match rx.try_recv() {
                    Ok(a) => {
                        bytes += a.frame.len();
                        pending.push(a);
                    }
                    Err(_) => break,
                }
            }
            self.write_group(&mut log, &mut pending, &mut blocked);
            if let Some(cause) = log.segments().poisoned() {
                self.failed.send_if_modified(|f| {
                    if f.is_none() {
                        *f = Some(cause);
                        return true;
                    }
                    false
                });
            }
        }
    }

    /// Writes a group of records, fdatasyncs once, and only then enters them in the
    /// index and answers each. Each record counts as live in its segment from the
    /// moment it is placed, so no segment holding a record of this group can be
    /// retired by a concurrent `remove` while the group is still being written.
    fn write_group(&self, log: &mut Log, group: &mut Vec<Append>, blocked: &mut Blocked) {
        // Per record of the group: where it was placed, or why not.
        let mut outcome: Vec<Result<Position, Arc<LogError>>> = Vec::with_capacity(group.len());
        let mut failure: Option<Arc<LogError>> = None;
        let mut unblocked = false;
        for a in group.iter() {
            let stream = (a.key.0.clone(), a.key.1);
            if let Some(e) = &failure {
                // Later records wait for a retry (their senders get the same error).
                outcome.push(Err(e.clone()));
                continue;
            }
            if let Some((first, e)) = blocked.get(&stream) {
                if a.key.2 > *first {
                    outcome.push(Err(e.clone()));
                    continue;
                }
            }
            match log.append(KIND_FRAME, &[&a.frame]) {
                Ok(pos) => {
                    *self.lock().live.entry(pos.segment).or_default() += 1;
                    if blocked
                        .get(&stream)
                        .is_some_and(|(first, _)| *first == a.key.2)
                    {
                        blocked.remove(&stream);
                        unblocked = true;
                    }
                    outcome.push(Ok(pos));
                }
                Err(e) => {
                    // The log cut the failed record back before anything else.
                    let e = Arc::new(e);
                    if e.is_out_of_space() {
                        let first = blocked.entry(stream).or_insert((a.key.2, e.clone()));
                        if a.key.2 <= first.0 {
                            *first = (a.key.2, e.clone());
                        }
                    }
                    outcome.push(Err(e.clone()));
                    failure = Some(e);
                }
            }
        }
        let placed: Vec<Position> = outcome
            .iter()
            .filter_map(|o| o.as_ref().ok())
            .copied()
            .collect();
        // The group commit: one fdatasync makes every record placed above durable.
        let synced = if placed.is_empty() {
            Ok(0)
        } else {
            log.sync().map_err(Arc::new)
        };
        let mut retire = Vec::new();
        {
            let mut idx = self.lock();
            for (a, pos) in group
                .iter()
                .zip(&outcome)
                .filter_map(|(a, o)| Some((a, o.as_ref().ok()?)))
            {
                if synced.is_ok() {
                    let stream = (a.key.0.clone(), a.key.1);
                    if !idx.next_seq.contains_key(&stream) {
                        // A new generation: the disk's older ones are done with.
                        idx.next_seq
                            .retain(|(d, g), _| d != &stream.0 || *g > stream.1);
                    }
                    let next = idx.next_seq.entry(stream).or_default();
                    *next = (*next).max(a.key.2 + 1);
                    let entry = Entry {
                        pos: *pos,
                        units: units_of(pos.len),
                    };
                    if let Some(old) = idx.entries.insert(a.key.clone(), entry) {
                        // A resend raced its original: keep one copy, free the other.
                        if let Some(n) = idx.live.get_mut(&old.pos.segment) {
                            *n = n.saturating_sub(1);
                        }
                        self.space.add_permits(old.units as usize);
                        retire.push(old.pos.segment);
                    }
                } else if let Some(n) = idx.live.get_mut(&pos.segment) {
                    *n = n.saturating_sub(1);
                    retire.push(pos.segment);
                }
            }
        }
        // Segments closed by this group's rolls may hold nothing live any more.
        retire.extend(placed.iter().map(|p| p.segment));
        retire.sort_unstable();
        retire.dedup();
        for id in retire {
            self.retire_if_empty(id);
        }
        if failure.as_ref().is_some_and(|e| e.is_out_of_space()) {
            self.free_dead_active_segment(log);
        }
        if unblocked {
            self.freed.notify_waiters();
        }
        for (a, o) in group.drain(..).zip(outcome) {
            let r = match (o, &synced) {
                (Ok(_), Ok(_)) => Ok(()),
                (Ok(_), Err(e)) => Err(e.clone()),
                (Err(e), _) => Err(e),
            };
            let _ = a.done.send(r);
        }
    }

    /// After ENOSPC: when every record of the active segment is already released, the
    /// file system's space is held by that segment alone (only closed segments are
    /// retired), which on a file system smaller than a segment would stall the spool
    /// for good. Close it and retire it, so the waiting appends find room.
    fn free_dead_active_segment(&self, log: &mut Log) {
        let active = log.segments().active_segment();
        if self.lock().live.get(&active).copied().unwrap_or(0) > 0 {
            return;
        }
        match log.roll() {
            Ok(Some(closed)) => {
                info!(dir = %self.dir.display(), segment = closed, "spool file system full: closed the active segment, whose records are all delivered, to free its space");
                self.retire_if_empty(closed);
                self.freed.notify_waiters();
            }
            Ok(None) => {}
            // No room even for a new segment's header: the next retry tries again.
            Err(e) => {
                warn!(dir = %self.dir.display(), error = %e, "spool file system full: cannot close the active segment yet")
            }
        }
    }

    fn retire_if_empty(&self, id: u64) {
        if self.lock().live.get(&id).copied().unwrap_or(0) > 0 {
            return;
        }
        // Records are placed only in the active segment, which is never retired, and a
        // closed segment never becomes active again: nothing can be placed in `id` now.
        match self.segments.retire(id) {
            Ok(0) => {}
            Ok(_) => {
                self.lock().live.remove(&id);
            }
            // A retire lost in a crash only replays records the master target already
            // holds, which it acks as duplicates.
            Err(e) => {
                warn!(segment = id, error = %e, "spool: cannot retire an acknowledged segment; it is retried at the next start")
            }
        }
    }
    /// Up to `max` keys to forward next: not in `in_flight`, in order per disk,
    /// round-robin over disks, and never past a gap. `sent` holds, per disk, the
    /// highest `(generation, seq)` handed out so far; a key is eligible when it is at
    /// or below it (a resend), right after it, or the start (seq 0) of a newer
    /// generation. The master target applies strictly in order, so sending past a
    /// missing seq would only fill the window with records it must hold back while
    /// the missing one (still on its way from the agent) could not be sent.
    ///
    /// Disks in `held` are skipped this time (the master target could not take their
    /// records yet; the others go on).
    pub fn next_unsent(
        &self,
        in_flight: &BTreeSet<Key>,
        max: usize,
        sent: &mut HashMap<String, (u64, u64)>,
        held: &HashSet<String>,
    ) -> Vec<Key> {
        let idx = self.lock();
        let mut per_disk: BTreeMap<&str, Vec<&Key>> = BTreeMap::new();
        // Blocked per generation: a gap that will never fill (its agent moved on to a
        // new generation) must not hold back the newer generation's records.
        let mut blocked: BTreeSet<(&str, u64)> = BTreeSet::new();
        let mut frontier: HashMap<&str, (u64, u64)> = HashMap::new();
        for key in idx.entries.keys() {
            let disk = key.0.as_str();
            if held.contains(disk) || blocked.contains(&(disk, key.1)) {
                continue;
            }
            let here = (key.1, key.2);
            let last = frontier
                .get(disk)
                .copied()
                .or_else(|| sent.get(disk).copied());
            let eligible = match last {
                None => true,
                Some((g, s)) => here <= (g, s) || here == (g, s + 1) || (key.1 > g && key.2 == 0),
            };
            if !eligible {
                blocked.insert((disk, key.1));
                continue;
            }
            if last.is_none_or(|l| here > l) {
                frontier.insert(disk, here);
            }
            if in_flight.contains(key) {
                continue;
            }
            let v = per_disk.entry(disk).or_default();
            if v.len() < max {
                v.push(key);
            }
        }
        let mut out: Vec<Key> = Vec::with_capacity(max);
        let mut round = 0;
        while out.len() < max {
            let mut any = false;
            for keys in per_disk.values() {
                if let Some(k) = keys.get(round) {
                    out.push((*k).clone());
                    any = true;
                    if out.len() == max {
                        break;
                    }
                }
            }
            if !any {
                break;
            }
            round += 1;
        }
        for k in &out {
            let e = sent.entry(k.0.clone()).or_insert((k.1, k.2));
            if (k.1, k.2) > *e {
                *e = (k.1, k.2);
            }
        }
        out
    }

    /// The frame bytes of a held record (checksum verified).
    pub fn read(&self, key: &Key) -> Result<Option<Bytes>, SpoolError> {
        let Some(entry) = self.lock().entries.get(key).copied() else {
            return Ok(None);
        };
        Ok(Some(self.segments.read(entry.pos)?.payload))
    }

    /// Forgets a record the master target acknowledged; frees its space.
    pub fn remove(&self, key: &Key) {
        let segment = {
            let mut idx = self.lock();
            let Some(e) = idx.entries.remove(key) else {
                return;
            };
            if let Some(n) = idx.live.get_mut(&e.pos.segment) {
                *n = n.saturating_sub(1);
            }
            self.space.add_permits(e.units as usize);
            e.pos.segment
        };
        self.freed.notify_waiters();
        self.retire_if_empty(segment);
    }
    /// Drops a record the master target refused and remembers that the agent must
    /// send it again.
    pub fn reject(&self, key: &Key) {
        self.remove(key);
        self.lock()
            .rejected
            .entry(key.0.clone())
            .or_default()
            .insert((key.1, key.2));
    }

    /// Seqs of `disk` in `generation` the agent must send again.
    pub fn rejected(&self, disk: &str, generation: u64) -> Vec<u64> {
        self.lock()
            .rejected
            .get(disk)
            .map(|s| {
                s.iter()
                    .filter(|(g, _)| *g == generation)
                    .map(|(_, s)| *s)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Records held and bytes of space in use.
    pub fn usage(&self) -> (usize, u64) {
        let records = self.lock().entries.len();
        let free = self.space.available_permits() as u64;
        (records, self.total_units.saturating_sub(free) * UNIT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boomerang_common::message::{Tag, TagKind};
    use std::path::PathBuf;

    fn tag(seq: u64) -> Message {
        Message::Tag(Tag {
            disk: "d0".into(),
            generation: 1,
            seq,
            kind: TagKind::CrashConsistent,
            point_id: seq,
            time_ms: 0,
            group: "g".into(),
        })
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .expect("list")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "spool"))
            .collect();
        v.sort();
        v
    }

    fn key(seq: u64) -> Key {
        ("d0".to_string(), 1, seq)
    }

    fn held(spool: &Spool) -> Vec<u64> {
        spool
            .next_unsent(&BTreeSet::new(), 1000, &mut HashMap::new(), &HashSet::new())
            .iter()
            .map(|k| k.2)
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replay_keeps_unacked_records_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let spool = Spool::open(dir.path(), 64 << 20).expect("open");
            for seq in 0..4 {
                let m = tag(seq);
                spool.append(&m, m.encode()).await.expect("append");
            }
            spool.remove(&key(0));
            assert_eq!(spool.usage().0, 3);
        }
        // A torn append: half a frame at the end of the active segment.
        let newest = segment_files(dir.path()).pop().expect("a segment");
        let half = tag(9).encode();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&newest)
            .expect("open segment");
        std::io::Write::write_all(&mut f, &half[..half.len() / 2]).expect("write");
        drop(f);

        let spool = Spool::open(dir.path(), 64 << 20).expect("reopen");
        // Seq 0 was acknowledged, but its segment is still live: it comes back and the
        // master target acknowledges it again as a duplicate. The torn seq 9 never does.
        assert_eq!(held(&spool), vec![0, 1, 2, 3]);
        let frame = spool.read(&key(1)).expect("read").expect("held");
        assert_eq!(Message::decode_exact(&frame).expect("decodes"), tag(1));
        let whole: u64 = (0..4)
            .map(|s| seglog::RECORD_HEADER + tag(s).encode().len() as u64)
            .sum();
        assert_eq!(
            std::fs::metadata(&newest).expect("stat").len(),
            seglog::SEGMENT_HEADER + whole,
            "the torn tail was cut off"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_failed_mid_group_never_costs_an_acknowledged_record() {
        // Issue 8 defect 1: a short write left partial bytes, the next group was
        // placed after them and acknowledged, and the next start cut it away.
        use boomerang_common::faults;
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path(), 64 << 20).expect("open");
        let m = tag(0);
        spool.append(&m, m.encode()).await.expect("append");
        {
            // Half of seq 1 is stored, then ENOSPC: the append waits for space.
            let rule = faults::arm_under(dir.path(), "spool.write@1=short").expect("arm");
            let m = tag(1);
            tokio::time::timeout(Duration::from_secs(10), spool.append(&m, m.encode()))
                .await
                .expect("retried once the file system had room")
                .expect("append after the retry");
            assert_eq!(rule.fired(), 1);
        }
        {
            // EIO: this agent's record is refused (it resends), nothing is left.
            let _rule = faults::arm_under(dir.path(), "spool.write@1=eio").expect("arm");
            let m = tag(2);
            let err = spool.append(&m, m.encode()).await.expect_err("EIO");
            assert!(err.to_string().contains("append"), "{err}");
        }
        for seq in 2..4 {
            let m = tag(seq);
            spool.append(&m, m.encode()).await.expect("append");
        }
        drop(spool);
        let spool = Spool::open(dir.path(), 64 << 20).expect("reopen");
        assert_eq!(held(&spool), vec![0, 1, 2, 3], "every acknowledged record");
        for seq in 0..4 {
            let frame = spool.read(&key(seq)).expect("read").expect("held");
            assert_eq!(Message::decode_exact(&frame).expect("decodes"), tag(seq));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn damage_in_a_closed_segment_is_refused_not_cut() {
        // Issue 8 defect 1, second half: a closed segment's records were acknowledged.
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path(), 1 << 30).expect("open");
        let chunk = 8 << 20;
        let mut seq = 0;
        while segment_files(dir.path()).len() < 2 {
            let m = batch_of(seq, chunk);
            spool.append(&m, m.encode()).await.expect("append");
            seq += 1;
        }
        drop(spool);
        let first = segment_files(dir.path())[0].clone();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&first)
            .expect("open");
        std::os::unix::fs::FileExt::write_all_at(&f, b"rot", 4 << 20).expect("rot");
        drop(f);
        let err = Spool::open(dir.path(), 1 << 30).expect_err("refused");
        let text = err.to_string();
        assert!(
            matches!(err, SpoolError::Log(LogError::Corrupt { .. })),
            "{text}"
        );
        assert!(text.contains(&first.display().to_string()), "{text}");
        assert_eq!(
            segment_files(dir.path()).len(),
            2,
            "nothing was cut or removed"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_fdatasync_poisons_the_spool_until_it_is_reopened() {
        // Issue 8 defect 3: a later fsync may succeed after the dirty pages were dropped.
        use boomerang_common::faults;
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path(), 64 << 20).expect("open");
        let m = tag(0);
        spool.append(&m, m.encode()).await.expect("append");
        {
            let _rule = faults::arm_under(dir.path(), "spool.sync@1=eio").expect("arm");
            let m = tag(1);
            spool
                .append(&m, m.encode())
                .await
                .expect_err("fdatasync failed");
        }
        let cause = tokio::time::timeout(Duration::from_secs(5), spool.failed())
            .await
            .expect("the spool reports that it failed");
        assert!(cause.contains("fdatasync"), "{cause}");
        let m = tag(2);
        let err = spool.append(&m, m.encode()).await.expect_err("poisoned");
        assert!(err.to_string().contains("reopened"), "{err}");
        assert!(
            spool.read(&key(1)).expect("read").is_none(),
            "never acknowledged"
        );
        drop(spool);
        let spool = Spool::open(dir.path(), 64 << 20).expect("reopen");
        assert!(held(&spool).starts_with(&[0]), "{:?}", held(&spool));
        let m = tag(2);
        spool
            .append(&m, m.encode())
            .await
            .expect("append after reopen");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spool_files_and_directory_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let spool_dir = dir.path().join("spool");
        let spool = Spool::open(&spool_dir, 64 << 20).expect("open");
        let m = tag(0);
        spool.append(&m, m.encode()).await.expect("append");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&spool_dir), 0o700);
        for f in segment_files(&spool_dir) {
            assert_eq!(mode(&f), 0o600, "{}", f.display());
        }
    }

    fn batch_of(seq: u64, len: usize) -> Message {
        let data = vec![seq.to_le_bytes()[0]; len];
        let mut enc = boomerang_common::delta::ExtentEncoder::new(0).expect("zstd");
        Message::Batch(boomerang_common::Batch {
            disk: "d0".into(),
            generation: 1,
            seq,
            extents: vec![enc.encode(0, &data, boomerang_common::ChunkHash::of(&data))],
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_written_as_a_segment_closes_are_never_lost() {
        // Fill most of a segment, have the master target acknowledge all of it, then
        // append a group that crosses the segment boundary: the closing segment holds
        // acknowledged-to-the-agent records and must not be retired.
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path(), 1 << 30).expect("open");
        let chunk = 4 << 20;
        let mut seq = 0;
        while (seq + 1) * (chunk as u64) < SEGMENT_TARGET - (chunk as u64) / 2 {
            let m = batch_of(seq, chunk);
            spool.append(&m, m.encode()).await.expect("append");
            seq += 1;
        }
        for s in 0..seq {
            spool.remove(&("d0".to_string(), 1, s));
        }
        let (a, b) = (batch_of(seq, chunk), batch_of(seq + 1, chunk));
        let (ra, rb) = tokio::join!(spool.append(&a, a.encode()), spool.append(&b, b.encode()));
        ra.expect("append a");
        rb.expect("append b");
        for s in [seq, seq + 1] {
            assert!(
                spool
                    .read(&("d0".to_string(), 1, s))
                    .expect("readable")
                    .is_some(),
                "seq {s} lost"
            );
        }
        drop(spool);
        let spool = Spool::open(dir.path(), 1 << 30).expect("reopen");
        let keys = spool.next_unsent(&BTreeSet::new(), 100, &mut HashMap::new(), &HashSet::new());
        assert!(
            keys.iter().any(|k| k.2 == seq) && keys.iter().any(|k| k.2 == seq + 1),
            "{keys:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acknowledging_while_segments_roll_never_loses_a_held_record() {
        // The forwarder removes acknowledged records while the writer is rolling
        // segments; a segment must never be retired with records still held.
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path(), 1 << 30).expect("open");
        let chunk = 3 << 20;
        let total = 60u64;
        let remover = {
            let spool = spool.clone();
            tokio::spawn(async move {
                let mut sent = HashMap::new();
                let mut removed = 0u64;
                while removed < total - 4 {
                    for key in spool.next_unsent(&BTreeSet::new(), 8, &mut sent, &HashSet::new()) {
                        if key.2 < total - 4
                            && spool
                                .read(&key)
                                .expect("held records are readable")
                                .is_some()
                        {
                            spool.remove(&key);
                            removed += 1;
                        }
                    }
                    tokio::task::yield_now().await;
                }
            })
        };
        let mut appends = Vec::new();
        for seq in 0..total {
            let spool = spool.clone();
            appends.push(tokio::spawn(async move {
                let m = batch_of(seq, chunk);
                spool.append(&m, m.encode()).await.expect("append");
            }));
        }
        for a in appends {
            a.await.expect("join");
        }
        tokio::time::timeout(Duration::from_secs(60), remover)
            .await
            .expect("remover finished")
            .expect("join");
        for seq in total - 4..total {
            let key = ("d0".to_string(), 1, seq);
            assert!(
                spool.read(&key).expect("readable").is_some(),
                "seq {seq} lost"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forwarding_never_runs_past_a_gap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path(), 64 << 20).expect("open");
        for seq in [0u64, 1, 3, 4] {
            let m = tag(seq);
            spool.append(&m, m.encode()).await.expect("append");
        }
        let mut sent = HashMap::new();
        let seqs = |keys: Vec<Key>| keys.into_iter().map(|k| k.2).collect::<Vec<_>>();
        assert_eq!(
            seqs(spool.next_unsent(&BTreeSet::new(), 10, &mut sent, &HashSet::new())),
            vec![0, 1]
        );
        // 0 and 1 acknowledged; 3 and 4 must wait for 2.
        spool.remove(&("d0".to_string(), 1, 0));
        spool.remove(&("d0".to_string(), 1, 1));
        assert!(spool
            .next_unsent(&BTreeSet::new(), 10, &mut sent, &HashSet::new())
            .is_empty());
        let m = tag(2);
        spool.append(&m, m.encode()).await.expect("append");
        assert_eq!(
            seqs(spool.next_unsent(&BTreeSet::new(), 10, &mut sent, &HashSet::new())),
            vec![2, 3, 4]
        );
        // A record sent before and still held (its forward failed) is eligible again.
        assert_eq!(
            seqs(spool.next_unsent(&BTreeSet::new(), 10, &mut sent, &HashSet::new())),
            vec![2, 3, 4]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_gap_in_an_abandoned_generation_does_not_hold_back_the_next() {
        // The agent died with seq 1 of generation 1 unsent and restarted in generation
        // 2: generation 1's gap never fills, generation 2 must flow anyway.
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path(), 64 << 20).expect("open");
        let gen_tag = |generation: u64, seq: u64| {
            Message::Tag(Tag {
                disk: "d0".into(),
                generation,
                seq,
                kind: TagKind::CrashConsistent,
                point_id: seq,
                time_ms: 0,
                group: "g".into(),
            })
        };
        for (g, seq) in [(1u64, 0u64), (1, 2), (2, 0), (2, 1)] {
            let m = gen_tag(g, seq);
            spool.append(&m, m.encode()).await.expect("append");
        }
        let mut sent = HashMap::new();
        let keys: Vec<(u64, u64)> = spool
            .next_unsent(&BTreeSet::new(), 10, &mut sent, &HashSet::new())
            .into_iter()
            .map(|k| (k.1, k.2))
            .collect();
        assert_eq!(keys, vec![(1, 0), (2, 0), (2, 1)]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_waiting_for_space_is_never_overtaken_by_a_later_seq() {
        // Seq 1 meets ENOSPC; seq 2 of the same disk must not take the room first: the
        // master target applies in order, so seq 2 would hold space nothing can free.
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path(), 64 << 20).expect("open");
        let m = tag(0);
        spool.append(&m, m.encode()).await.expect("seq 0");
        let _full =
            boomerang_common::faults::arm_under(dir.path(), "spool.write@1=enospc*2").expect("arm");
        let first = {
            let spool = spool.clone();
            tokio::spawn(async move {
                let m = tag(1);
                spool.append(&m, m.encode()).await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let m = tag(2);
        tokio::time::timeout(Duration::from_secs(10), spool.append(&m, m.encode()))
            .await
            .expect("seq 2 goes in once seq 1 has")
            .expect("seq 2");
        first.await.expect("join").expect("seq 1");
        let idx = spool.lock();
        let lsn = |seq: u64| idx.entries[&("d0".to_string(), 1, seq)].pos.lsn;
        assert!(
            lsn(1) < lsn(2),
            "seq 2 (lsn {}) was placed before seq 1 (lsn {})",
            lsn(2),
            lsn(1)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn enospc_with_every_record_delivered_retires_the_active_segment() {
        // A file system smaller than a segment: once the master target has acked
        // everything, the space is held by the active segment alone. It must be closed
        // and retired, or the spool waits for ever.
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path(), 64 << 20).expect("open");
        for seq in 0..2 {
            let m = tag(seq);
            spool.append(&m, m.encode()).await.expect("append");
        }
        let before = segment_files(dir.path());
        assert_eq!(before.len(), 1, "{before:?}");
        for seq in 0..2 {
            spool.remove(&("d0".to_string(), 1, seq));
        }
        assert_eq!(
            segment_files(dir.path()),
            before,
            "the active segment stays"
        );
        let m = tag(2);
        {
            let _full = boomerang_common::faults::arm_under(dir.path(), "spool.write@1=enospc")
                .expect("arm");
            tokio::time::timeout(Duration::from_secs(5), spool.append(&m, m.encode()))
                .await
                .expect("the append goes through once the dead segment is gone")
                .expect("append");
        }
        let after = segment_files(dir.path());
        assert_eq!(after.len(), 1, "{after:?}");
        assert!(
            !after.contains(&before[0]),
            "{} was not retired",
            before[0].display()
        );
        drop(spool);
        let spool = Spool::open(dir.path(), 64 << 20).expect("reopen");
        let keys: Vec<u64> = spool
            .next_unsent(&BTreeSet::new(), 10, &mut HashMap::new(), &HashSet::new())
            .into_iter()
            .map(|k| k.2)
            .collect();
        assert_eq!(keys, vec![2], "only the undelivered record is left");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_spool_waits_until_space_is_freed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path(), 64 << 10).expect("open"); // 16 units of 4 KiB
        let big = |seq: u64| {
            let data = vec![seq.to_le_bytes()[0]; 30_000];
            let mut enc = boomerang_common::delta::ExtentEncoder::new(0).expect("zstd");
            Message::Batch(boomerang_common::Batch {
                disk: "d0".into(),
                generation: 1,
                seq,
                extents: vec![enc.encode(0, &data, boomerang_common::ChunkHash::of(&data))],
            })
        };
        for seq in 0..2 {
            let m = big(seq);
            spool.append(&m, m.encode()).await.expect("fits");
        }
        let m = big(2);
        let blocked =
            tokio::time::timeout(Duration::from_millis(300), spool.append(&m, m.encode())).await;
        assert!(blocked.is_err(), "third record must wait for space");
        spool.remove(&("d0".to_string(), 1, 0));
        tokio::time::timeout(Duration::from_secs(5), spool.append(&m, m.encode()))
            .await
            .expect("space was freed")
            .expect("append");
    }
}
