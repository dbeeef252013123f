//! The master target's set of replicated disks: loading their records at start-up,
//! creating replicas when an agent first announces a disk, and serving manifests
//! (chunk hashes of a replica range) for differential sync.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use boomerang_common::durable::{create_dir_durable, StateFile};
use boomerang_common::message::DiskState;
use boomerang_common::ChunkHash;
use tracing::info;

use crate::disk::{Disk, DiskRecord};
use crate::replica::{FileReplica, Replica};
use crate::retention::UndoJournal;

/// Errors opening or describing disks.
#[derive(Debug, thiserror::Error)]
pub enum DisksError {
    /// Storage failed.
    #[error("{what} {path}: {reason}")]
    Storage {
        /// Step.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Problem.
        reason: String,
    },
    /// Unknown disk.
    #[error("disk {0} is not known here; the agent must announce it first")]
    Unknown(String),
    /// A request does not fit the disk.
    #[error("disk {disk}: {reason}")]
    Bad {
        /// Disk.
        disk: String,
        /// Problem.
        reason: String,
    },
}

/// All disks of this master target.
#[derive(Debug)]
pub struct Disks {
    state_dir: PathBuf,
    retention_dir: PathBuf,
    segment_bytes: u64,
    overrides: BTreeMap<String, PathBuf>,
    disks: Mutex<HashMap<String, Arc<Disk>>>,
}

/// Path of a disk's record in `state_dir`.
pub fn record_path(state_dir: &Path, disk: &str) -> PathBuf {
    state_dir.join("disks").join(format!("{disk}.state"))
}

/// Loads every disk record found in `state_dir` (for `status`, no replica opened).
pub fn load_records(state_dir: &Path) -> Result<Vec<DiskRecord>, DisksError> {
    let dir = state_dir.join("disks");
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => {
            return Err(DisksError::Storage {
                what: "list",
                path: dir,
                reason: e.to_string(),
            })
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|x| x == "state") {
            let st = StateFile::<DiskRecord>::open(&path).map_err(|e| DisksError::Storage {
                what: "load disk record",
                path: path.clone(),
                reason: e.to_string(),
            })?;
            out.push(st.get().clone());
        }
    }
    out.sort_by(|a, b| a.disk.cmp(&b.disk));
    Ok(out)
}

impl Disks {
    /// Opens the state directory and every disk recorded in it.
    pub fn open(
        state_dir: &Path,
        retention_dir: &Path,
        segment_bytes: u64,
        overrides: BTreeMap<String, PathBuf>,
    ) -> Result<Self, DisksError> {
        for d in [
            state_dir.to_path_buf(),
            state_dir.join("disks"),
            state_dir.join("replicas"),
            retention_dir.to_path_buf(),
        ] {
            create_dir_durable(&d).map_err(|e| DisksError::Storage {
                what: "create",
                path: d.clone(),
                reason: e.to_string(),
            })?;
        }
        let disks = Disks {
            state_dir: state_dir.to_path_buf(),
            retention_dir: retention_dir.to_path_buf(),
            segment_bytes,
            overrides,
            disks: Mutex::new(HashMap::new()),
        };
        for rec in load_records(state_dir)? {
            let replica = open_replica(&rec.replica, rec.size)?;
            let st = StateFile::open(&record_path(state_dir, &rec.disk)).map_err(|e| {
                DisksError::Storage {
                    what: "open disk record",
                    path: record_path(state_dir, &rec.disk),
                    reason: e.to_string(),
                }
            })?;
            let oldest = rec.points.iter().map(|c| c.lsn).min();
            let mut journal = disks.open_journal(&rec.disk, oldest)?;
            Disk::undo_unrecorded(&rec, replica.as_ref(), &mut journal).map_err(|e| {
                DisksError::Storage {
                    what: "undo the writes past the stored record of",
                    path: rec.replica.clone(),
                    reason: format!(
                        "{e}; the replica may hold writes its record does not count, so the disk is not opened: check the storage under it and start again"
                    ),
                }
            })?;
            info!(disk = %rec.disk, generation = rec.position.generation, next_seq = rec.position.next_seq, points = rec.points.len(), journal_bytes = journal.size_bytes(), "disk loaded");
            disks
                .lock()
                .insert(rec.disk.clone(), Disk::start(replica, st, journal));
        }
        Ok(disks)
    }

    /// Opens a disk's undo journal; `oldest_needed` is the lsn of its oldest point.
    fn open_journal(
        &self,
        disk: &str,
        oldest_needed: Option<u64>,
    ) -> Result<UndoJournal, DisksError> {
        let dir = self.retention_dir.join(disk);
        UndoJournal::open(&dir, self.segment_bytes, oldest_needed).map_err(|e| {
            DisksError::Storage {
                what: "open retention journal",
                path: dir,
                reason: e.to_string(),
            }
        })
    }

    /// Resolves once some disk can apply nothing more until a restart
    /// ([`Disk::failed`]), with why.
    pub async fn failed(&self) -> String {
        loop {
            if let Some(cause) = self.all().iter().find_map(|d| d.failed()) {
                return cause;
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }

    /// Every disk, sorted by id.
    pub fn all(&self) -> Vec<Arc<Disk>> {
        let mut v: Vec<_> = self.lock().values().cloned().collect();
        v.sort_by(|a, b| a.id().cmp(b.id()));
        v
    }

    /// The disks of `group` (as their in-memory records say), sorted by id.
    pub fn of_group(&self, group: &str) -> Vec<Arc<Disk>> {
        self.all()
            .into_iter()
            .filter(|d| d.record().group == group)
            .collect()
    }

    /// Opens the replica the disk's record names now and makes it the disk's store
    /// (after a committed failover to a target).
    pub fn reload(&self, disk: &str) -> Result<(), DisksError> {
        let d = self.get(disk)?;
        let rec = d.record();
        let replica = open_replica(&rec.replica, rec.size)?;
        d.swap_replica(replica);
        info!(disk, replica = %rec.replica.display(), "replica is now the failed-back disk");
        Ok(())
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Disk>>> {
        self.disks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The disk, if known.
    pub fn get(&self, disk: &str) -> Result<Arc<Disk>, DisksError> {
        self.lock()
            .get(disk)
            .cloned()
            .ok_or_else(|| DisksError::Unknown(disk.to_string()))
    }

    /// Handles an agent's announcement of a disk: creates the replica the first time,
    /// and answers with the master target's position for it.
    pub fn open_disk(&self, disk: &str, size: u64, group: &str) -> Result<DiskState, DisksError> {
        if let Ok(d) = self.get(disk) {
            let rec = d.record();
            if rec.size != size {
                d.resize(size).map_err(|e| DisksError::Bad {
                    disk: disk.to_string(),
                    reason: e.to_string(),
                })?;
            }
            let pos = d.durable();
            return Ok(DiskState {
                disk: disk.to_string(),
                size,
                generation: pos.generation,
                next_seq: pos.next_seq,
                resend: Vec::new(),
            });
        }
        let path = self
            .overrides
            .get(disk)
            .cloned()
            .unwrap_or_else(|| self.state_dir.join("replicas").join(format!("{disk}.img")));
        let replica = open_replica(&path, size)?;
        let record = DiskRecord::new(disk, group, size, path.clone());
        let rp = record_path(&self.state_dir, disk);
        let st = StateFile::open_or_create(&rp, record).map_err(|e| DisksError::Storage {
            what: "create disk record",
            path: rp,
            reason: e.to_string(),
        })?;
        info!(disk, size, replica = %path.display(), "new disk: replica ready");
        let oldest = st.get().points.iter().map(|c| c.lsn).min();
        let journal = self.open_journal(disk, oldest)?;
        let d = Disk::start(replica, st, journal);
        self.lock().entry(disk.to_string()).or_insert(d);
        Ok(DiskState {
            disk: disk.to_string(),
            size,
            generation: 0,
            next_seq: 0,
            resend: Vec::new(),
        })
    }

    /// Chunk hashes of the replica over `[offset, offset + len)`, clipped to its size.
    pub fn manifest(
        &self,
        disk: &str,
        offset: u64,
        len: u64,
        chunk_size: u32,
    ) -> Result<Vec<ChunkHash>, DisksError> {
        let d = self.get(disk)?;
        let cs = u64::from(chunk_size);
        if !offset.is_multiple_of(cs) {
            return Err(DisksError::Bad {
                disk: disk.to_string(),
                reason: format!(
                    "manifest offset {offset} is not a multiple of the chunk size {chunk_size}"
                ),
            });
        }
        let size = d.replica().size();
        let end = offset.saturating_add(len).min(size);
        let mut hashes = Vec::new();
        let piece = (4 << 20) / cs * cs;
        let mut buf =
            vec![0u8; usize::try_from(piece.min(end.saturating_sub(offset))).unwrap_or(0)];
        let mut at = offset;
        while at < end {
            let n = piece.min(end - at);
            let b = &mut buf[..usize::try_from(n).unwrap_or(0)];
            d.replica()
                .read_at(at, b)
                .map_err(|e| DisksError::Storage {
                    what: "read replica",
                    path: PathBuf::from(disk),
                    reason: e.to_string(),
                })?;
            hashes.extend(b.chunks(chunk_size as usize).map(ChunkHash::of));
            at += n;
        }
        Ok(hashes)
    }
}

fn open_replica(path: &Path, size: u64) -> Result<Arc<dyn Replica>, DisksError> {
    FileReplica::open_or_create(path, size)
        .map(|r| Arc::new(r) as Arc<dyn Replica>)
        .map_err(|e| DisksError::Storage {
            what: "open replica",
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}
