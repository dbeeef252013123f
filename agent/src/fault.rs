//! Fault injection in the agent, through the same seam as the storage faults
//! ([`boomerang_common::faults`]).
//!
//! Reads of a source disk: sites `source.read` (dirty blocks read while writes go on)
//! and `capture.read` (read while a consistency point holds writes paused), path the
//! disk's device; any fault kind but a crash makes the read fail with its error.
//!
//! The wire: site `batch.write`, called once per batch the agent
//! builds (path `<disk>/seq-<seq>`), so `BOOMERANG_FAULTS=batch.write@3=eio` flips one
//! payload byte of the third batch built, after hashing: the master target's
//! end-to-end check must refuse it and the agent must send it again. Any fault kind
//! means "corrupt" here; a crash fault kills the agent as at any other site. Compiled
//! to nothing without the `faults` feature.

use std::path::{Path, PathBuf};

use boomerang_common::faults::{self, Fault, Op};
use boomerang_common::{Batch, Codec};
use bytes::Bytes;

/// Flips one payload byte of `batch` (its first non-zero extent) when a
/// `batch.write` rule fires.
pub fn maybe_corrupt(batch: &mut Batch) {
    let path = PathBuf::from(format!("{}/seq-{}", batch.disk, batch.seq));
    if faults::check("batch", Op::Write, &path).is_none() {
        return;
    }
    if let Some(e) = batch.extents.iter_mut().find(|e| e.codec != Codec::Zero) {
        let mut p = e.payload.to_vec();
        if let Some(b) = p.get_mut(0) {
            *b ^= 0xff;
        }
        e.payload = Bytes::from(p);
        tracing::warn!(
            seq = batch.seq,
            offset = e.offset,
            "fault injection: corrupted one payload byte"
        );
    }
}

/// Fails one read of the source disk at `path` when a `<scope>.read` rule fires.
pub fn read(scope: &str, path: &Path) -> std::io::Result<()> {
    let fault = faults::check(scope, Op::Read, path);
    match fault {
        Some(f @ (Fault::NoSpace | Fault::Eio | Fault::Short)) => Err(f.error()),
        other => {
            faults::after(other);
            Ok(())
        }
    }
}
