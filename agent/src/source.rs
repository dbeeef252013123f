//! The change-source seam. A source splits a disk into units of work for one pass and
//! builds the batch of each unit; unit `i` of a pass is shipped as seq `base + i`, so a
//! unit can be rebuilt with the same seq after a crash or a resend request.
//!
//! Only the scan source exists today (read the disk, compare chunk hashes with the
//! replica's manifest). The continuous sources of DESIGN.md (kernel write tracing and
//! the FUSE intercept) implement the same trait over their dirty sets.

use boomerang_common::delta::ExtentEncoder;
use boomerang_common::{ChunkHash, Extent};

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
