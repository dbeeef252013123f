//! The change-source seams, one per kind of source.
//!
//! [`ChangeSource`], the scan source's: it splits a disk into units of work for one
//! pass and builds the batch of each unit; unit `i` of a pass is shipped as seq
//! `base + i`, so a unit can be rebuilt with the same seq after a crash or when the
//! master target refused it (the only source that can resend a batch: it reads the
//! disk again; see [`crate::sync`]).
//!
//! [`ChangeStream`], the continuous sources': what changed, handed out a bounded step
//! at a time in the order it must land, batches with the cuts of points between
//! them; each step is released once the process server holds it and put back when it
//! could not be shipped (`Syncer::ship_stream` in [`crate::ship`]). The trace source's
//! dirty set ([`crate::track_trace`]), the intercept source's write-order journal and
//! its bitmap of dirty blocks when the journal overflowed
//! ([`crate::track_intercept`]). They cannot rebuild a refused batch, so a refusal
//! ends their generation: the master target asks for a resync (rule 2).
//!
//! Memory is bounded per step, whatever the backlog (rule 7): a scan unit, a 16 MiB
//! slice of the trace source's dirty set, 16 MiB of journal records or dirty bitmap
//! runs; the send window holds at most `in_flight` batches of at most `batch_mib`.

use std::future::Future;

use boomerang_common::delta::ExtentEncoder;
use boomerang_common::{ChunkHash, Extent};

use crate::ship::Change;
use crate::sync::{DiskCtx, Syncer};

/// How a pass is cut into units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Geometry {
    /// Disk size in bytes.
    pub size: u64,
    /// Chunk size (hash and ship granularity).
    pub chunk_size: u32,
    /// Bytes per unit (a multiple of the chunk size).
    pub unit_size: u64,
}

impl Geometry {
    /// Units in a pass.
    pub fn units(&self) -> u64 {
        self.size.div_ceil(self.unit_size)
    }

    /// Byte range of unit `i`.
    pub fn unit_range(&self, i: u64) -> (u64, u64) {
        let start = i * self.unit_size;
        (start, self.unit_size.min(self.size.saturating_sub(start)))
    }

    /// Chunks per unit.
    pub fn chunks_per_unit(&self) -> u64 {
        self.unit_size / u64::from(self.chunk_size)
    }
}

/// What building one unit found.
#[derive(Debug, Default)]
pub struct UnitOutput {
    /// Extents to ship, in disk order.
    pub extents: Vec<Extent>,
    /// Raw bytes read.
    pub bytes_read: u64,
    /// Chunks examined.
    pub chunks: u64,
    /// Chunks that differ from the replica.
    pub chunks_changed: u64,
    /// Changed chunks that are all zeros.
    pub chunks_zero: u64,
    /// Raw bytes of the changed chunks.
    pub bytes_changed: u64,
    /// Encoded payload bytes.
    pub bytes_payload: u64,
}

/// A source of changed data for one disk.
pub trait ChangeSource: Send + Sync {
    /// Short name for logs.
    fn name(&self) -> &'static str;
    /// The pass geometry.
    fn geometry(&self) -> Geometry;
    /// Builds unit `i`: the chunks whose content differs from `replica` (the replica's
    /// hashes for the unit's chunks; `None` ships every chunk). `buf` is scratch space
    /// reused across calls.
    fn build_unit(
        &self,
        i: u64,
        replica: Option<&[ChunkHash]>,
        encoder: &mut ExtentEncoder,
        buf: &mut Vec<u8>,
    ) -> std::io::Result<UnitOutput>;
}

/// A continuous source's pending changes, a bounded step at a time.
pub(crate) trait ChangeStream: Send {
    /// The next step: changes in the order they must land (batches, and the cuts of
    /// points at their place between them); `None` when nothing is pending. Reading
    /// and encoding run on a blocking thread.
    fn next(
        &mut self,
        syncer: &Syncer,
        disk: &DiskCtx,
    ) -> impl Future<Output = anyhow::Result<Option<Vec<Change>>>> + Send;
    /// The process server holds the last step durably: release it.
    fn durable(&mut self) -> anyhow::Result<()>;
    /// The last step was not shipped (or not built): hand it out again later.
    fn put_back(&mut self);
}
