//! Giving back the bytes of a recovery point: into a target (image file or block
//! device), or into the replica itself (roll back in place).
//!
//! Materializing copies the replica as it is now, then writes the retention journal's
//! records from the point's lsn back over the copy, newest first (see
//! [`crate::retention`]). Replication may go on meanwhile: any write that lands in the
//! replica during the copy had its record appended before it, and the history is read
//! after the copy ends, so the copy's blocks are all put back. The journal is pinned
//! against pruning for the duration. Nothing here changes the replica or the records,
//! so a crash in the middle leaves every point intact; run it again.
//!
//! Rolling back in place writes the same records over the replica. A crash half way
//! leaves some blocks rolled: writing the records back again is idempotent, so the
//! roll is simply redone.

use std::io;
use std::path::Path;
use std::sync::Arc;

use crate::disk::{Cut, Disk};
use crate::replica::{FileReplica, Replica};
use crate::retention::UndoTarget;

/// Bytes copied per read.
const PIECE: usize = 4 << 20;

/// Progress of one disk: phase, done, total (bytes).
pub type Progress<'a> = &'a mut dyn FnMut(&'static str, u64, u64);

/// A replica (or target) as the place history is written back to, clipped to `size`.
pub(crate) struct OnReplica<'a> {
    pub(crate) replica: &'a dyn Replica,
    pub(crate) size: u64,
}

impl UndoTarget for OnReplica<'_> {
    fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        if offset >= self.size {
            return Ok(());
        }
        let n = usize::try_from((self.size - offset).min(data.len() as u64)).unwrap_or(0);
        self.replica.write_at(offset, &data[..n])
    }

    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if offset >= self.size {
            return Ok(());
        }
        self.replica
            .write_zeros(offset, len.min(self.size - offset))
    }
}

/// Errors giving back a point.
#[derive(Debug, thiserror::Error)]
pub enum MaterializeError {
    /// Reading the replica or writing the target failed.
    #[error("disk {disk}: {what} {path}: {source}")]
    Io {
        /// Disk.
        disk: String,
        /// Step.
        what: &'static str,
        /// Path concerned.
        path: String,
        /// OS error.
        source: io::Error,
    },
    /// The journal could not give the history.
    #[error("{0}")]
    History(String),
    /// The target is the replica itself.
    #[error("disk {disk}: target {path} is the replica itself; materialize elsewhere, or leave out --to to roll the replica in place")]
    TargetIsReplica {
        /// Disk.
        disk: String,
        /// Target.
        path: String,
    },
}

/// Materializes `cut` of `disk` into `target` (created sparse and private when
/// missing, with its missing directories); returns the blake3 of the target's bytes,
/// read back.
pub fn to_target(
    disk: &Arc<Disk>,
    cut: &Cut,
    target: &Path,
    progress: Progress<'_>,
) -> Result<String, MaterializeError> {
    let id = disk.id().to_string();
    let io = |what, source| MaterializeError::Io {
        disk: id.clone(),
        what,
        path: target.display().to_string(),
        source,
    };
    let replica_path = disk.record().replica;
    if let (Ok(a), Ok(b)) = (target.canonicalize(), replica_path.canonicalize()) {
        if a == b {
            return Err(MaterializeError::TargetIsReplica {
                disk: id,
                path: target.display().to_string(),
            });
        }
    }
    let _pin = disk.pin_history();
    // A target made here is private (0600, in 0700 directories); a given one keeps its mode.
    let out = FileReplica::open_target(target, cut.size).map_err(|e| io("open target", e))?;
    let mut buf = vec![0u8; PIECE];
    let mut at = 0u64;
    while at < cut.size {
        let n = usize::try_from((cut.size - at).min(PIECE as u64)).unwrap_or(PIECE);
        let b = &mut buf[..n];
        disk.replica()
            .read_at(at, b)
            .map_err(|e| io("read replica for", e))?;
        if b.iter().all(|&x| x == 0) {
            out.write_zeros(at, n as u64)
        } else {
            out.write_at(at, b)
        }
        .map_err(|e| io("write", e))?;
        at += n as u64;
        progress("copy", at, cut.size);
    }
    let history = disk
        .history(cut.lsn)
        .map_err(|e| MaterializeError::History(e.to_string()))?;
    let total = history.bytes();
    history
        .write_back(
            &mut OnReplica {
                replica: &out,
                size: cut.size,
            },
            |done| progress("rewind", done, total),
        )
        .map_err(|e| MaterializeError::History(e.to_string()))?;
    out.flush().map_err(|e| io("fdatasync", e))?;
    hash(&out, cut.size, progress).map_err(|e| io("read back", e))
}

/// Rolls the replica of `disk` back to `cut` in place and syncs it; returns the blake3
/// of its bytes. The caller has paused the disk.
pub fn in_place(
    disk: &Arc<Disk>,
    cut: &Cut,
    progress: Progress<'_>,
) -> Result<String, MaterializeError> {
    let id = disk.id().to_string();
    let path = disk.record().replica.display().to_string();
    let io = |what, source| MaterializeError::Io {
        disk: id.clone(),
        what,
        path: path.clone(),
        source,
    };
    let _pin = disk.pin_history();
    let history = disk
        .history(cut.lsn)
        .map_err(|e| MaterializeError::History(e.to_string()))?;
    let total = history.bytes();
    let replica = disk.replica();
    history
        .write_back(
            &mut OnReplica {
                replica: replica.as_ref(),
                size: cut.size.max(replica.size()),
            },
            |done| progress("rewind", done, total),
        )
        .map_err(|e| MaterializeError::History(e.to_string()))?;
    if replica.size() != cut.size {
        replica.resize(cut.size).map_err(|e| io("resize", e))?;
    }
    replica.flush().map_err(|e| io("fdatasync", e))?;
    hash(replica.as_ref(), cut.size, progress).map_err(|e| io("read back", e))
}

/// blake3 of the first `size` bytes of `store`, in hex.
fn hash(store: &dyn Replica, size: u64, progress: Progress<'_>) -> io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; PIECE];
    let mut at = 0u64;
    while at < size {
        let n = usize::try_from((size - at).min(PIECE as u64)).unwrap_or(PIECE);
        store.read_at(at, &mut buf[..n])?;
        hasher.update(&buf[..n]);
        at += n as u64;
        progress("verify", at, size);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::verify_batch;
    use crate::disks::Disks;
    use boomerang_common::delta::ExtentEncoder;
    use boomerang_common::message::{Tag, TagKind};
    use boomerang_common::{Batch, ChunkHash};
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_target_made_here_is_private_and_a_given_one_keeps_its_mode() {
        // SAFETY: umask only changes the process's file creation mask; a permissive
        // one makes the test show what the code asks for, not what the mask allows.
        unsafe { libc::umask(0o022) };
        let dir = tempfile::tempdir().expect("tempdir");
        let disks = Disks::open(
            &dir.path().join("state"),
            &dir.path().join("retention"),
            1 << 20,
            Default::default(),
        )
        .expect("disks");
        disks.open_disk("d0", 1 << 20, "g").expect("disk");
        let d = disks.get("d0").expect("disk");
        let data = vec![9u8; 65536];
        let mut enc = ExtentEncoder::new(1).expect("zstd");
        let batch = Batch {
            disk: "d0".into(),
            generation: 1,
            seq: 0,
            extents: vec![enc.encode(0, &data, ChunkHash::of(&data))],
        };
        let v = verify_batch(&batch, 1 << 20).expect("verifies");
        d.apply_batch(1, 0, v).await.expect("apply");
        let tag = Tag {
            disk: "d0".into(),
            generation: 1,
            seq: 1,
            kind: TagKind::CrashConsistent,
            point_id: 1,
            time_ms: 1,
            group: "g".into(),
        };
        d.apply_tag(&tag).await.expect("tag");
        let cut = d.durable_record().points[0].clone();

        let target = dir.path().join("scratch/test/d0.img");
        to_target(&d, &cut, &target, &mut |_, _, _| {}).expect("materialize to a new file");
        assert_eq!(mode(&target), 0o600);
        assert_eq!(mode(&dir.path().join("scratch")), 0o700);
        assert_eq!(mode(&dir.path().join("scratch/test")), 0o700);
        let bytes = std::fs::read(&target).expect("read");
        assert!(bytes[..65536].iter().all(|&b| b == 9));

        let given = dir.path().join("given.img");
        std::fs::write(&given, b"").expect("make");
        std::fs::set_permissions(&given, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        to_target(&d, &cut, &given, &mut |_, _, _| {}).expect("materialize to a given file");
        assert_eq!(
            mode(&given),
            0o644,
            "a target the operator gave keeps its mode"
        );
    }
}
