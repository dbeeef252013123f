//! The process server's durable spool: every batch and tag an agent sends is appended,
//! as the exact frame bytes it arrived in, to a segment file and fdatasynced before it
//! is acknowledged (rule 1); it is deleted only after the master target's durable ack.
//!
//! Segment file layout:
//! ```text
//!  header: magic "BMSP" | version u16 | 0 u16 | segment id u64 | crc32 u32 (of the 16 bytes before)
//!  records: whole Boomerang frames (each with its own magic, length and crc32)
//! ```
//! Appends go through one writer thread that writes everything queued, fdatasyncs
//! once and then acknowledges all of it (group commit). After a crash the segments
//! are replayed in order; a torn or corrupt tail is cut off, never forwarded.
//!
//! Backpressure (rule 7): spool space is a semaphore of 4 KiB units sized by
//! `spool_max_bytes`; an append waits for space, so a full spool stops acknowledging
//! agents, whose bounded in-flight windows then stop them. Space returns when the
//! master target acknowledges.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
#[cfg(test)]
use std::time::Duration;

use boomerang_common::durable::{create_dir_durable, fsync_dir};
use boomerang_common::message::Message;
use boomerang_common::wire::{FrameHeader, HEADER_LEN};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tracing::{info, warn};

const SEGMENT_MAGIC: [u8; 4] = *b"BMSP";
const SEGMENT_VERSION: u16 = 1;
const SEGMENT_HEADER_LEN: usize = 20;
const SEGMENT_HEADER: u64 = SEGMENT_HEADER_LEN as u64;
/// A segment is closed once it passes this size.
pub const SEGMENT_TARGET: u64 = 64 << 20;
/// Unit of spool space accounting.
const UNIT: u64 = 4096;

/// A record's identity: `(disk, generation, seq)`.
pub type Key = (String, u64, u64);

#[derive(Debug, Clone, Copy)]
struct Entry {
    segment: u64,
    offset: u64,
    len: u32,
    units: u32,
}

#[derive(Debug)]
struct Segment {
    file: Arc<File>,
    path: PathBuf,
    live: usize,
}

#[derive(Debug, Default)]
struct Index {
    entries: BTreeMap<Key, Entry>,
    segments: BTreeMap<u64, Segment>,
    active: u64,
    /// Records the master target refused (integrity); the agent must resend them.
    rejected: HashMap<String, BTreeSet<(u64, u64)>>,
}

struct Append {
    key: Key,
    frame: Bytes,
    units: u32,
    done: oneshot::Sender<io::Result<()>>,
}

/// The spool.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    index: Mutex<Index>,
    space: Arc<Semaphore>,
    total_units: u64,
    appends: mpsc::Sender<Append>,
    /// Woken whenever a record becomes available to forward.
    pub appended: Notify,
}

impl std::fmt::Debug for Append {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Append({:?})", self.key)
    }
}

/// Why an append failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Storage failed.
    #[error("spool {path}: {what}: {source}")]
    Io {
        /// Step.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
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

impl Spool {
    /// Opens (and replays) the spool in `dir`, capped at `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Arc<Self>, SpoolError> {
        create_dir_durable(dir).map_err(|e| SpoolError::Io {
            what: "create",
            path: dir.to_path_buf(),
            source: io::Error::other(e),
        })?;
        let mut index = Index::default();
        let mut used_units = 0u64;
        let mut ids: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
            .map_err(|source| SpoolError::Io {
                what: "list",
                path: dir.to_path_buf(),
                source,
            })?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let id = name.strip_prefix("seg-")?.strip_suffix(".spool")?;
                u64::from_str_radix(id, 16).ok().map(|id| (id, e.path()))
            })
            .collect();
        ids.sort();
        for (id, path) in &ids {
            let replayed = replay_segment(*id, path, &mut index)?;
            used_units += replayed;
        }
        let active = ids.last().map_or(1, |(id, _)| id + 1);
        let active_path = segment_path(dir, active);
        let file = create_segment(&active_path, active)?;
        index.segments.insert(
            active,
            Segment {
                file: Arc::new(file),
                path: active_path,
                live: 0,
            },
        );
        index.active = active;
        // Drop replayed segments that hold nothing live.
        let empty: Vec<u64> = index
            .segments
            .iter()
            .filter(|(id, s)| s.live == 0 && **id != active)
            .map(|(id, _)| *id)
            .collect();
        for id in empty {
            if let Some(s) = index.segments.remove(&id) {
                let _ = std::fs::remove_file(&s.path);
            }
        }
        let records = index.entries.len();
        let total_units = (max_bytes / UNIT).max(1);
        let free = total_units.saturating_sub(used_units);
        if records > 0 {
            info!(
                records,
                bytes = used_units * UNIT,
                "spool replayed: forwarding what the master target has not acknowledged"
            );
        }
        let (tx, rx) = mpsc::channel(1024);
        let spool = Arc::new(Spool {
            dir: dir.to_path_buf(),
            index: Mutex::new(index),
            space: Arc::new(Semaphore::new(
                usize::try_from(free).unwrap_or(usize::MAX >> 4),
            )),
            total_units,
            appends: tx,
            appended: Notify::new(),
        });
        let writer = spool.clone();
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer.write_loop(rx))
            .map_err(|source| SpoolError::Io {
                what: "start writer thread",
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

    /// Appends a batch or tag frame durably; returns once it is fdatasynced. A record
    /// already held is not written twice. Waits while the spool is full.
    pub async fn append(&self, msg: &Message, frame: Bytes) -> Result<(), SpoolError> {
        let Some(key) = key_of(msg) else {
            return Ok(());
        };
        if self.lock().entries.contains_key(&key) {
            return Ok(()); // entries enter the index only once durable
        }
        let units = (frame.len() as u64).div_ceil(UNIT);
        if units > self.total_units {
            return Err(SpoolError::TooLarge(frame.len()));
        }
        let units = u32::try_from(units).map_err(|_| SpoolError::TooLarge(frame.len()))?;
        if self.space.available_permits() < units as usize {
            warn!(disk = %key.0, "spool full: pushing back on agents until the master target catches up");
        }
        let permit = self
            .space
            .acquire_many(units)
            .await
            .map_err(|_| SpoolError::WriterGone)?;
        permit.forget(); // returned by `remove`
        let (done, wait) = oneshot::channel();
        let sent = self
            .appends
            .send(Append {
                key: key.clone(),
                frame,
                units,
                done,
            })
            .await;
        let result = match sent {
            Ok(()) => wait.await.map_err(|_| SpoolError::WriterGone)?,
            Err(_) => Err(io::Error::other("writer stopped")),
        };
        match result {
            Ok(()) => {
                if let Some(set) = self.lock().rejected.get_mut(&key.0) {
                    set.remove(&(key.1, key.2));
                }
                self.appended.notify_waiters();
                Ok(())
            }
            Err(source) => {
                self.space.add_permits(units as usize);
                Err(SpoolError::Io {
                    what: "append",
                    path: self.dir.clone(),
                    source,
                })
            }
        }
    }

    fn write_loop(self: Arc<Self>, mut rx: mpsc::Receiver<Append>) {
        let mut pending: Vec<Append> = Vec::new();
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
            let result = self.write_group(&pending);
            for a in pending.drain(..) {
                let r = match &result {
                    Ok(placed) => {
                        let _ = placed;
                        Ok(())
                    }
                    Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                };
                let _ = a.done.send(r);
            }
        }
    }

    /// Writes a group of records, rolling segments as needed, fdatasyncs, and only then
    /// enters them in the index. Each record counts as live in its segment from the
    /// moment it is placed, so no segment holding a record of this group can be
    /// retired by a concurrent `remove` while the group is still being written.
    fn write_group(&self, group: &[Append]) -> io::Result<()> {
        let (mut active, mut file, mut offset) = {
            let idx = self.lock();
            let seg = &idx.segments[&idx.active];
            (idx.active, seg.file.clone(), seg.file.metadata()?.len())
        };
        let mut placed: Vec<Entry> = Vec::with_capacity(group.len());
        let mut closed: Vec<u64> = Vec::new();
        let result = (|| -> io::Result<()> {
            for a in group {
                if offset >= SEGMENT_TARGET {
                    // Records in the closing segment must be durable before we ack them.
                    file.sync_data()?;
                    let next = active + 1;
                    let path = segment_path(&self.dir, next);
                    let f = Arc::new(create_segment(&path, next).map_err(io::Error::other)?);
                    let mut idx = self.lock();
                    idx.segments.insert(
                        next,
                        Segment {
                            file: f.clone(),
                            path,
                            live: 0,
                        },
                    );
                    idx.active = next;
                    drop(idx);
                    closed.push(active);
                    active = next;
                    file = f;
                    offset = SEGMENT_HEADER;
                }
                let entry = Entry {
                    segment: active,
                    offset,
                    len: u32::try_from(a.frame.len()).map_err(io::Error::other)?,
                    units: a.units,
                };
                if let Some(seg) = self.lock().segments.get_mut(&active) {
                    seg.live += 1;
                }
                placed.push(entry);
                file.write_all_at(&a.frame, offset)?;
                offset += a.frame.len() as u64;
            }
            // The group commit: one fdatasync makes every record above durable.
            file.sync_data()
        })();
        let mut retire = closed;
        {
            let mut idx = self.lock();
            match &result {
                Ok(()) => {
                    for (a, entry) in group.iter().zip(&placed) {
                        if let Some(old) = idx.entries.insert(a.key.clone(), *entry) {
                            // A resend raced its original: keep one copy, free the other.
                            if let Some(seg) = idx.segments.get_mut(&old.segment) {
                                seg.live = seg.live.saturating_sub(1);
                            }
                            self.space.add_permits(old.units as usize);
                            retire.push(old.segment);
                        }
                    }
                }
                Err(_) => {
                    for entry in &placed {
                        if let Some(seg) = idx.segments.get_mut(&entry.segment) {
                            seg.live = seg.live.saturating_sub(1);
                        }
                    }
                }
            }
        }
        for id in retire {
            self.retire_if_empty(id);
        }
        result
    }

    fn retire_if_empty(&self, id: u64) {
        let mut idx = self.lock();
        let retire = idx.active != id && idx.segments.get(&id).is_some_and(|s| s.live == 0);
        if retire {
            if let Some(s) = idx.segments.remove(&id) {
                // No fsync of the directory: a deletion lost in a crash only replays
                // records the master target already holds, which it acks as duplicates.
                let _ = std::fs::remove_file(&s.path);
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
    pub fn next_unsent(
        &self,
        in_flight: &BTreeSet<Key>,
        max: usize,
        sent: &mut HashMap<String, (u64, u64)>,
    ) -> Vec<Key> {
        let idx = self.lock();
        let mut per_disk: BTreeMap<&str, Vec<&Key>> = BTreeMap::new();
        // Blocked per generation: a gap that will never fill (its agent moved on to a
        // new generation) must not hold back the newer generation's records.
        let mut blocked: BTreeSet<(&str, u64)> = BTreeSet::new();
        let mut frontier: HashMap<&str, (u64, u64)> = HashMap::new();
        for key in idx.entries.keys() {
            let disk = key.0.as_str();
            if blocked.contains(&(disk, key.1)) {
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

    /// The frame bytes of a held record.
    pub fn read(&self, key: &Key) -> io::Result<Option<Bytes>> {
        let (entry, file) = {
            let idx = self.lock();
            let Some(e) = idx.entries.get(key).copied() else {
                return Ok(None);
            };
            let Some(seg) = idx.segments.get(&e.segment) else {
                return Err(io::Error::other(format!(
                    "record {key:?} points at segment {} which is gone: the spool is damaged",
                    e.segment
                )));
            };
            (e, seg.file.clone())
        };
        let mut buf = vec![0u8; entry.len as usize];
        file.read_exact_at(&mut buf, entry.offset)?;
        Ok(Some(Bytes::from(buf)))
    }

    /// Forgets a record the master target acknowledged; frees its space.
    pub fn remove(&self, key: &Key) {
        let segment = {
            let mut idx = self.lock();
            let Some(e) = idx.entries.remove(key) else {
                return;
            };
            if let Some(seg) = idx.segments.get_mut(&e.segment) {
                seg.live = seg.live.saturating_sub(1);
            }
            self.space.add_permits(e.units as usize);
            e.segment
        };
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

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("seg-{id:016x}.spool"))
}

fn segment_header(id: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..4].copy_from_slice(&SEGMENT_MAGIC);
    h[4..6].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    h[8..16].copy_from_slice(&id.to_le_bytes());
    let crc = crc32fast::hash(&h[..16]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

fn create_segment(path: &Path, id: u64) -> Result<File, SpoolError> {
    let io = |what| {
        move |source| SpoolError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    };
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io("create segment"))?;
    f.write_all(&segment_header(id))
        .map_err(io("write segment header"))?;
    // The header and the new directory entry must be durable before any record in
    // this segment is acknowledged.
    f.sync_all().map_err(io("fsync segment"))?;
    if let Some(dir) = path.parent() {
        fsync_dir(dir).map_err(|e| SpoolError::Io {
            what: "fsync spool directory",
            path: dir.to_path_buf(),
            source: io::Error::other(e),
        })?;
    }
    Ok(f)
}

/// Replays one segment into the index; returns the space units its records use.
fn replay_segment(id: u64, path: &Path, index: &mut Index) -> Result<u64, SpoolError> {
    let io = |what| {
        move |source| SpoolError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io("open segment"))?;
    let len = file.metadata().map_err(io("stat segment"))?.len();
    let mut header = [0u8; SEGMENT_HEADER_LEN];
    if len < SEGMENT_HEADER
        || file.read_exact_at(&mut header, 0).is_err()
        || header != segment_header(id)
    {
        warn!(segment = %path.display(), "spool segment has no valid header (torn at creation): removing it");
        let _ = std::fs::remove_file(path);
        return Ok(0);
    }
    let mut offset = SEGMENT_HEADER;
    let mut units = 0u64;
    let mut live = 0usize;
    let mut hdr = [0u8; HEADER_LEN];
    while offset < len {
        let torn = |why: String| {
            warn!(segment = %path.display(), offset, %why, "torn or corrupt spool tail: cutting it off (those records were never acknowledged)");
        };
        if offset + HEADER_LEN as u64 > len || file.read_exact_at(&mut hdr, offset).is_err() {
            torn("short header".into());
            break;
        }
        let h = match FrameHeader::parse(&hdr) {
            Ok(h) => h,
            Err(e) => {
                torn(e.to_string());
                break;
            }
        };
        let total = HEADER_LEN as u64 + h.body_len as u64;
        if offset + total > len {
            torn("short record".into());
            break;
        }
        let mut buf = vec![0u8; usize::try_from(total).unwrap_or(0)];
        if file.read_exact_at(&mut buf, offset).is_err() {
            torn("unreadable record".into());
            break;
        }
        let buf = Bytes::from(buf);
        let msg = match Message::decode_exact(&buf) {
            Ok(m) => m,
            Err(e) => {
                torn(e.to_string());
                break;
            }
        };
        if let Some(key) = key_of(&msg) {
            let u = total.div_ceil(UNIT);
            let entry = Entry {
                segment: id,
                offset,
                len: u32::try_from(total).unwrap_or(u32::MAX),
                units: u32::try_from(u).unwrap_or(u32::MAX),
            };
            if let Some(old) = index.entries.insert(key, entry) {
                units -= u64::from(old.units);
                if old.segment == id {
                    live -= 1;
                } else if let Some(s) = index.segments.get_mut(&old.segment) {
                    s.live = s.live.saturating_sub(1);
                }
            }
            units += u;
            live += 1;
        }
        offset += total;
    }
    if offset < len {
        file.set_len(offset).map_err(io("truncate torn tail"))?;
        file.sync_all().map_err(io("fsync segment"))?;
    }
    index.segments.insert(
        id,
        Segment {
            file: Arc::new(file),
            path: path.to_path_buf(),
            live,
        },
    );
    Ok(units)
}

#[cfg(test)]
mod tests {
    use super::*;
    use boomerang_common::message::{Tag, TagKind};

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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replay_keeps_unacked_records_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let spool = Spool::open(dir.path(), 64 << 20).expect("open");
            for seq in 0..4 {
                let m = tag(seq);
                spool.append(&m, m.encode()).await.expect("append");
            }
            spool.remove(&("d0".to_string(), 1, 0));
            assert_eq!(spool.usage().0, 3);
        }
        // A torn append: half a frame at the end of the newest segment.
        let newest = std::fs::read_dir(dir.path())
            .expect("list")
            .flatten()
            .map(|e| e.path())
            .max()
            .expect("a segment");
        let half = tag(9).encode();
        let mut f = OpenOptions::new()
            .append(true)
            .open(&newest)
            .expect("open segment");
        f.write_all(&half[..half.len() / 2]).expect("write");
        drop(f);

        let spool = Spool::open(dir.path(), 64 << 20).expect("reopen");
        let keys = spool.next_unsent(&BTreeSet::new(), 10, &mut HashMap::new());
        let seqs: Vec<u64> = keys.iter().map(|k| k.2).collect();
        // Seq 0 was acknowledged, but its segment is still live: it comes back and the
        // master target acknowledges it again as a duplicate. The torn seq 9 never does.
        assert_eq!(seqs, vec![0, 1, 2, 3]);
        let frame = spool.read(&keys[1]).expect("read").expect("held");
        assert_eq!(Message::decode_exact(&frame).expect("decodes"), tag(1));
        let whole: u64 = (0..4).map(|s| tag(s).encode().len() as u64).sum();
        assert_eq!(
            std::fs::metadata(&newest).expect("stat").len(),
            SEGMENT_HEADER + whole,
            "the torn tail was cut off"
        );
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
        let keys = spool.next_unsent(&BTreeSet::new(), 100, &mut HashMap::new());
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
                    for key in spool.next_unsent(&BTreeSet::new(), 8, &mut sent) {
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
            seqs(spool.next_unsent(&BTreeSet::new(), 10, &mut sent)),
            vec![0, 1]
        );
        // 0 and 1 acknowledged; 3 and 4 must wait for 2.
        spool.remove(&("d0".to_string(), 1, 0));
        spool.remove(&("d0".to_string(), 1, 1));
        assert!(spool
            .next_unsent(&BTreeSet::new(), 10, &mut sent)
            .is_empty());
        let m = tag(2);
        spool.append(&m, m.encode()).await.expect("append");
        assert_eq!(
            seqs(spool.next_unsent(&BTreeSet::new(), 10, &mut sent)),
            vec![2, 3, 4]
        );
        // A record sent before and still held (its forward failed) is eligible again.
        assert_eq!(
            seqs(spool.next_unsent(&BTreeSet::new(), 10, &mut sent)),
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
            .next_unsent(&BTreeSet::new(), 10, &mut sent)
            .into_iter()
            .map(|k| (k.1, k.2))
            .collect();
        assert_eq!(keys, vec![(1, 0), (2, 0), (2, 1)]);
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
