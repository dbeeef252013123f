//! Fault injection for tests, driven by environment variables so the real binaries
//! can be exercised. Each hook fires at most once per process.
//!
//! - `BOOMERANG_FAULT_CORRUPT_SEQ=N`: after hashing, flip one payload byte of the batch
//!   with seq N (its first non-zero extent), so the master target's end-to-end check
//!   must refuse it and the agent must send it again.

use std::sync::atomic::{AtomicBool, Ordering};

use boomerang_common::{Batch, Codec};
use bytes::Bytes;

static CORRUPTED: AtomicBool = AtomicBool::new(false);

/// Applies `BOOMERANG_FAULT_CORRUPT_SEQ` to `batch`, once.
pub fn maybe_corrupt(batch: &mut Batch) {
    let Some(seq) = std::env::var("BOOMERANG_FAULT_CORRUPT_SEQ")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    if batch.seq != seq || CORRUPTED.load(Ordering::SeqCst) {
        return;
    }
    if let Some(e) = batch.extents.iter_mut().find(|e| e.codec != Codec::Zero) {
        let mut p = e.payload.to_vec();
        if let Some(b) = p.get_mut(0) {
            *b ^= 0xff;
        }
        e.payload = Bytes::from(p);
        CORRUPTED.store(true, Ordering::SeqCst);
        tracing::warn!(
            seq,
            offset = e.offset,
            "fault injection: corrupted one payload byte"
        );
    }
}
