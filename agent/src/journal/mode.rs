//! Journal mode and bitmap mode of one disk's capture, and what each allows.
//!
//! ```text
//!            on_full() / mark()
//!   Journal ────────────────────▶ Bitmap
//!      ▲                            │
//!      └────────────────────────────┘
//!   caught_up(): bitmap drained and every run taken from it durable at the process server
//! ```
//! - **Journal**: every write goes to the [`Journal`](super::Journal) in write order;
//!   any tag is a crash-consistent cut.
//! - **Bitmap**: the journal was full. New writes only mark their blocks in the
//!   [`DirtyBitmap`]; the records already in the journal stay there and are shipped as
//!   usual. Write order is lost, so no crash-consistent tag may be emitted
//!   ([`CaptureState::crash_consistent_tags_allowed`]) until the disk is back in order.
//!
//! Rules for the caller (the intercept and the shipper):
//! - Mark a write only once it has reached the backing disk, so a run read after the
//!   mark sees the write's bytes.
//! - Ship every record the journal held when it went full *before* the first run taken
//!   from the bitmap: a run carries the block's current content, which must land after
//!   every older journaled write of that block.
//! - Report the process server's durable acks of runs ([`CaptureState::runs_durable`]),
//!   and put unacknowledged runs back when the connection is lost
//!   ([`CaptureState::requeue_in_flight`]).

use std::collections::VecDeque;
use std::path::Path;

use tracing::{info, warn};

use super::bitmap::{BitmapError, DirtyBitmap};

/// Where a disk's captured writes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Into the journal, in write order.
    Journal,
    /// Into the dirty bitmap, order lost.
    Bitmap,
}

/// One disk's capture mode, its dirty bitmap and the runs taken from the bitmap that
/// the process server has not yet made durable.
#[derive(Debug)]
pub struct CaptureState {
    mode: Mode,
    bitmap: DirtyBitmap,
    in_flight: VecDeque<(u64, u64)>,
}

impl CaptureState {
    /// Starts from `bitmap` (a fresh one, or one [loaded](DirtyBitmap::load) after a
    /// clean shutdown): journal mode when it is clean, bitmap mode otherwise.
    pub fn new(bitmap: DirtyBitmap) -> Self {
        let mode = if bitmap.is_empty() {
            Mode::Journal
        } else {
            Mode::Bitmap
        };
        CaptureState {
            mode,
            bitmap,
            in_flight: VecDeque::new(),
        }
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The journal reported `Full`: switch to bitmap mode. The caller then marks the
    /// write that did not fit with [`CaptureState::mark`].
    pub fn on_full(&mut self) {
        if self.mode == Mode::Journal {
            warn!(
                disk_size = self.bitmap.disk_size(),
                "journal full: bitmap mode, no crash-consistent tags until caught up"
            );
            self.mode = Mode::Bitmap;
        }
    }

    /// Records a write of `len` bytes at `offset` that is not in the journal. A write
    /// kept only in the bitmap means write order is lost, so this enters bitmap mode
    /// if not there already.
    pub fn mark(&mut self, offset: u64, len: u64) {
        self.on_full();
        self.bitmap.mark(offset, len);
    }

    /// Takes dirty runs `(offset, len)` of about `max_bytes` for shipping (see
    /// [`DirtyBitmap::take_runs`]); they stay in flight until
    /// [`CaptureState::runs_durable`].
    pub fn take_runs(&mut self, max_bytes: u64) -> Vec<(u64, u64)> {
        let runs = self.bitmap.take_runs(max_bytes);
        self.in_flight.extend(runs.iter().copied());
        runs
    }

    /// The process server made the oldest `n` runs in flight durable.
    pub fn runs_durable(&mut self, n: usize) {
        let n = n.min(self.in_flight.len());
        self.in_flight.drain(..n);
    }

    /// The connection was lost: every run in flight is dirty again.
    pub fn requeue_in_flight(&mut self) {
        for (offset, len) in self.in_flight.drain(..) {
            self.bitmap.mark(offset, len);
        }
    }

    /// Runs taken and not yet durable.
    pub fn runs_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Returns to journal mode once the bitmap is drained and every run taken from it
    /// is durable; says whether the disk is in journal mode now.
    pub fn caught_up(&mut self) -> bool {
        if self.mode == Mode::Bitmap && self.bitmap.is_empty() && self.in_flight.is_empty() {
            info!("bitmap drained: back to journal mode");
            self.mode = Mode::Journal;
        }
        self.mode == Mode::Journal
    }

    /// Whether a crash-consistent tag may be emitted now: only in journal mode with no
    /// bitmap run left unshipped or unacknowledged.
    pub fn crash_consistent_tags_allowed(&self) -> bool {
        self.mode == Mode::Journal && self.bitmap.is_empty() && self.in_flight.is_empty()
    }

    /// The dirty bitmap.
    pub fn bitmap(&self) -> &DirtyBitmap {
        &self.bitmap
    }

    /// Saves the dirtiness durably for a clean restart: the bitmap plus every run still
    /// in flight (the process server may not have it).
    pub fn save(&self, path: &Path) -> Result<(), BitmapError> {
        if self.in_flight.is_empty() {
            return self.bitmap.save(path);
        }
        let mut all = self.bitmap.clone();
        for &(offset, len) in &self.in_flight {
            all.mark(offset, len);
        }
        all.save(path)
    }
}

#[cfg(test)]
mod tests {
    use super::super::bitmap::BLOCK_SIZE as B;
    use super::*;

    #[test]
    fn full_then_drained_then_journal_again() {
        let mut c = CaptureState::new(DirtyBitmap::new(100 * B));
        assert_eq!(c.mode(), Mode::Journal);
        assert!(c.crash_consistent_tags_allowed());
        c.on_full();
        c.mark(5 * B, 2 * B);
        assert_eq!(c.mode(), Mode::Bitmap);
        assert!(!c.crash_consistent_tags_allowed());
        assert!(!c.caught_up(), "bitmap not drained");

        let runs = c.take_runs(u64::MAX);
        assert_eq!(runs, vec![(5 * B, 2 * B)]);
        assert!(c.bitmap().is_empty());
        assert!(!c.caught_up(), "runs not durable yet");
        assert!(!c.crash_consistent_tags_allowed());

        // Connection lost: the runs are dirty again.
        c.requeue_in_flight();
        assert_eq!(c.bitmap().count(), 2);
        let runs = c.take_runs(u64::MAX);
        c.mark(50 * B, 1); // a write during shipping
        c.runs_durable(runs.len());
        assert!(!c.caught_up(), "a new write is still dirty");
        let runs = c.take_runs(u64::MAX);
        c.runs_durable(runs.len());
        assert!(c.caught_up());
        assert_eq!(c.mode(), Mode::Journal);
        assert!(c.crash_consistent_tags_allowed());
    }

    #[test]
    fn a_restored_dirty_bitmap_starts_in_bitmap_mode() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("bitmap");
        let mut c = CaptureState::new(DirtyBitmap::new(100 * B));
        c.mark(0, B);
        c.mark(10 * B, B);
        let _in_flight = c.take_runs(B);
        c.save(&path)?;
        let restored = CaptureState::new(DirtyBitmap::load(&path)?);
        assert_eq!(restored.mode(), Mode::Bitmap);
        assert_eq!(restored.bitmap().count(), 2, "in-flight runs are saved too");
        assert!(!restored.crash_consistent_tags_allowed());
        Ok(())
    }
}
