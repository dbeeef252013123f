//! A test aid: with `BOOMERANG_TAG_WITNESS_DIR=<dir>` set, every point a continuous
//! source cuts writes the blake3 (hex) of each disk's bytes at the point to
//! `<dir>/<disk>/<point id>`, for a test to compare with what the master target gives
//! back for the point. The intercept source hashes while it holds the write-order
//! locks, the trace source while the file systems are frozen (block devices are read
//! with O_DIRECT, past their page cache). It reads every disk whole at every point,
//! holding the workload's writes meanwhile: never set it in production. Unset,
//! nothing is registered and nothing is read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

use boomerang_common::ChunkHash;

use crate::source::ChangeSource as _;
use tracing::warn;

/// The variable naming the directory.
pub const ENV: &str = "BOOMERANG_TAG_WITNESS_DIR";

fn dir() -> Option<&'static PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| std::env::var_os(ENV).map(PathBuf::from))
        .as_ref()
}

fn backings() -> &'static Mutex<BTreeMap<String, PathBuf>> {
    static BACKINGS: OnceLock<Mutex<BTreeMap<String, PathBuf>>> = OnceLock::new();
    BACKINGS.get_or_init(|| Mutex::new(BTreeMap::new()))
}

/// Remembers where `disk`'s bytes live, when witnessing is on.
pub fn register(disk: &str, backing: &Path) {
    if dir().is_some() {
        backings()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(disk.to_string(), backing.to_path_buf());
    }
}

/// Writes the witness of `disk` at tag `point_id`; the caller holds the disk's
/// write-order lock. Failures are logged: the test then finds no witness.
pub fn record(disk: &str, point_id: u64) {
    if let Some(hash) = hash_now(disk) {
        write(disk, point_id, &hash);
    }
}

/// The blake3 (hex) of `disk`'s bytes now, when witnessing is on; the caller holds
/// its writes. `None` (logged) when it cannot be read.
pub fn hash_now(disk: &str) -> Option<String> {
    dir()?;
    let backing = backings()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(disk)
        .cloned()?;
    let read = || -> std::io::Result<Vec<u8>> {
        const STEP: u64 = 1 << 20;
        let source = crate::scan::ScanSource::open(&backing, 4096, STEP)?;
        let size = source.geometry().size;
        let mut all = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        let mut buf = Vec::new();
        let mut at = 0;
        while at < size {
            let n = usize::try_from(STEP.min(size - at)).unwrap_or(0);
            all.extend_from_slice(source.read_unit(at, n, &mut buf)?);
            at += STEP;
        }
        Ok(all)
    };
    match read() {
        Ok(bytes) => Some(ChunkHash::of(&bytes).to_hex()),
        Err(e) => {
            warn!(disk, error = %e, "tag witness: cannot read the disk");
            None
        }
    }
}

/// Writes `hash` as the witness of `disk` at `point_id`.
pub fn write(disk: &str, point_id: u64, hash: &str) {
    let Some(dir) = dir() else {
        return;
    };
    let to = dir.join(disk);
    if let Err(e) = std::fs::create_dir_all(&to)
        .and_then(|()| std::fs::write(to.join(point_id.to_string()), hash))
    {
        warn!(disk, point_id, error = %e, "tag witness not written");
    }
}
