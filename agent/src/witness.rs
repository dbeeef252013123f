//! A test aid: with `BOOMERANG_TAG_WITNESS_DIR=<dir>` set, every tag the intercept
//! source cuts writes, while it still holds the write-order locks, the blake3 (hex) of
//! each disk's backing image to `<dir>/<disk>/<point id>`: the bytes the source had at the
//! tag, for a test to compare with what the master target gives back for the point.
//! It reads every disk whole at every tag, stalling the workload's writes meanwhile:
//! never set it in production. Unset, nothing is registered and nothing is read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

use boomerang_common::ChunkHash;
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
    let Some(dir) = dir() else {
        return;
    };
    let Some(backing) = backings()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(disk)
        .cloned()
    else {
        return;
    };
    let write = || -> std::io::Result<()> {
        let bytes = std::fs::read(&backing)?;
        let to = dir.join(disk);
        std::fs::create_dir_all(&to)?;
        std::fs::write(
            to.join(point_id.to_string()),
            ChunkHash::of(&bytes).to_hex(),
        )
    };
    if let Err(e) = write() {
        warn!(disk, point_id, error = %e, "tag witness not written");
    }
}
