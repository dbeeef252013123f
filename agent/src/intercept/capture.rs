//! What the intercept captures into: one disk's [`Journal`] and [`CaptureState`],
//! shared with the shipper behind one mutex, and the step that records a write once it
//! has reached the backing disk ([`Capture::record_write`]).
//!
//! The mutex is the write-order lock: the intercept holds it across "write to the
//! backing disk, then record", so the journal's order is the order the writes were
//! applied, and a tag appended under it (by the agent) cuts between two writes, never
//! through one. Whoever holds it stalls the workload's writes, so the shipper should
//! hold it only for short steps (a bounded `read_from`, a `release_through`).

use std::sync::{Mutex, MutexGuard, PoisonError};

use tracing::error;

use crate::journal::{AppendError, CaptureState, DirtyBitmap, Journal, JournalError, Mode};

/// Where one captured write went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Captured {
    /// Appended to the journal, with this journal seq.
    Journaled(u64),
    /// Marked dirty in the bitmap (bitmap mode: write order is lost).
    Marked,
}

/// One disk's capture: the journal its writes go to in write order, and its journal or
/// bitmap mode. Shared as `Arc<Mutex<Capture>>` by the intercept (writes, syncs) and the
/// shipper (reads, releases, bitmap runs, tags).
#[derive(Debug)]
pub struct Capture {
    /// The journal. The shipper reads it with [`Journal::read_from`] and frees what the
    /// process server made durable with [`Journal::release_through`].
    pub journal: Journal,
    /// Journal or bitmap mode, and the dirty bitmap of bitmap mode.
    pub state: CaptureState,
    /// Why this generation can no longer be trusted, first reason only.
    resync_reason: Option<String>,
}

impl Capture {
    /// A capture over `journal` and `state` (whose bitmap must cover the served disk).
    pub fn new(journal: Journal, state: CaptureState) -> Self {
        Capture {
            journal,
            state,
            resync_reason: None,
        }
    }

    /// Records a write of `data` at `offset` on `disk` that has reached the backing
    /// disk. In journal mode it is appended to the journal; when the journal is full the
    /// disk drops to bitmap mode and the write is marked instead; in bitmap mode it is
    /// only marked. Never fails: a journal error other than `Full` also falls back to
    /// the bitmap (tracking stays exact, only order is lost) and is kept as
    /// [`Capture::resync_reason`] for the agent.
    pub fn record_write(&mut self, disk: &str, offset: u64, data: &[u8]) -> Captured {
        self.record(offset, data.len() as u64, |j| {
            j.append_write(disk, offset, data)
        })
    }

    /// Records that `len` bytes at `offset` of `disk` read back as zeros, now that a
    /// discard or zero-out has been applied to the backing disk: a zero record in
    /// journal mode (shipped as zero extents, in order with the writes), else the
    /// blocks are marked like a write's (shipped as read from the disk: zeros). Never
    /// fails, as [`Capture::record_write`].
    pub fn record_zero(&mut self, disk: &str, offset: u64, len: u64) -> Captured {
        self.record(offset, len, |j| j.append_zero(disk, offset, len))
    }

    /// Journals a change of `[offset, offset + len)` with `append` in journal mode,
    /// or marks its blocks (bitmap mode, a full journal, a failed append).
    fn record(
        &mut self,
        offset: u64,
        len: u64,
        append: impl FnOnce(&mut Journal) -> Result<u64, AppendError>,
    ) -> Captured {
        if self.state.mode() == Mode::Bitmap {
            self.state.mark(offset, len);
            return Captured::Marked;
        }
        match append(&mut self.journal) {
            Ok(seq) => Captured::Journaled(seq),
            Err(AppendError::Full { .. }) => {
                self.state.on_full();
                self.state.mark(offset, len);
                Captured::Marked
            }
            Err(AppendError::Journal(e)) => {
                self.lost_trust(format!("journal append failed: {e}"));
                self.state.mark(offset, len);
                Captured::Marked
            }
        }
    }

    /// Marks `len` bytes at `offset` whose content on the backing disk is unknown (a
    /// write that failed part way): they are shipped from the disk as they are now.
    pub fn mark_unknown(&mut self, offset: u64, len: u64) {
        self.state.mark(offset, len);
    }

    /// Makes every journaled write durable ([`Journal::sync`]); returns the durable
    /// seq. A failure is also kept as [`Capture::resync_reason`].
    pub fn sync(&mut self) -> Result<u64, JournalError> {
        self.journal.sync().inspect_err(|e| {
            self.lost_trust(format!("journal sync failed: {e}"));
        })
    }

    /// Set once something happened that the journal and the bitmap cannot account for
    /// (a failed journal append or sync, a failed fdatasync of the backing disk): the
    /// agent should reopen the journal, start a new generation and resync by scan.
    pub fn resync_reason(&self) -> Option<&str> {
        self.resync_reason.as_deref()
    }

    /// Starts the capture over after a loss of trust: `journal` (reopened, everything
    /// in it released) replaces the old one, the disk is back in journal mode over
    /// `bitmap` (a clean one), and the reason is cleared. The caller then resyncs the
    /// disk by scan in a new generation: the scan reads every block, so what the old
    /// journal and bitmap held is not needed, and writes from here on are journaled.
    pub fn start_over(&mut self, journal: Journal, bitmap: DirtyBitmap) {
        self.journal = journal;
        self.state = CaptureState::new(bitmap);
        self.resync_reason = None;
    }

    /// Records why the generation cannot be trusted (the first reason is kept and
    /// logged; later ones are logged only).
    pub fn lost_trust(&mut self, reason: String) {
        error!(%reason, "capture: this generation needs a resync");
        if self.resync_reason.is_none() {
            self.resync_reason = Some(reason);
        }
    }
}

/// Locks the capture. A panic while it was held cannot have left a write half-recorded
/// in a way that matters: the journal cuts a torn record at recovery and the bitmap is
/// only ever set, so the guard is taken over rather than propagating the poison.
pub fn lock_capture(capture: &Mutex<Capture>) -> MutexGuard<'_, Capture> {
    capture.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Entry, BLOCK_SIZE as B};

    fn capture(dir: &std::path::Path, capacity: u64) -> Capture {
        let journal = Journal::open(dir, capacity).expect("open journal");
        Capture::new(journal, CaptureState::new(DirtyBitmap::new(1024 * B)))
    }

    #[test]
    fn writes_are_journaled_in_order_then_marked_once_full() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = capture(dir.path(), 64 << 10);
        let block = vec![7u8; 4096];
        let mut journaled = Vec::new();
        let mut first_marked = None;
        for i in 0..64u64 {
            match c.record_write("d", i * B, &block) {
                Captured::Journaled(seq) => {
                    assert!(first_marked.is_none(), "journaled after the switch");
                    journaled.push((seq, i * B));
                }
                Captured::Marked => {
                    first_marked.get_or_insert(i);
                }
            }
        }
        let first_marked = first_marked.expect("a 64 KiB journal fills up");
        assert_eq!(c.state.mode(), Mode::Bitmap);
        assert!(!c.state.crash_consistent_tags_allowed());
        for i in first_marked..64 {
            assert!(c.state.bitmap().is_dirty(i * B), "block {i} not marked");
        }
        for i in 0..first_marked {
            assert!(
                !c.state.bitmap().is_dirty(i * B),
                "block {i} journaled and marked"
            );
        }
        let records = c.journal.read_from(1, u64::MAX).expect("read");
        let got: Vec<(u64, u64)> = records
            .iter()
            .map(|r| match &r.entry {
                Entry::Write { offset, .. } => (r.seq, *offset),
                Entry::Tag { .. } | Entry::Zero { .. } => panic!("only writes appended"),
            })
            .collect();
        assert_eq!(got, journaled);
        assert!(c.resync_reason().is_none(), "Full is not a fault");
    }

    #[test]
    fn zeros_are_journaled_in_order_with_the_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = capture(dir.path(), 64 << 10);
        assert_eq!(c.record_write("d", 0, &[1u8; 4096]), Captured::Journaled(1));
        assert_eq!(c.record_zero("d", 0, 8 * B), Captured::Journaled(2));
        assert_eq!(c.record_write("d", B, &[2u8; 10]), Captured::Journaled(3));
        let records = c.journal.read_from(1, u64::MAX).expect("read");
        assert!(matches!(
            records[1].entry,
            Entry::Zero { offset: 0, len, .. } if len == 8 * B
        ));
        // In bitmap mode a zeroed range is marked: shipped as read (zeros).
        c.state.on_full();
        assert_eq!(c.record_zero("d", 16 * B, 2 * B), Captured::Marked);
        assert!(c.state.bitmap().is_dirty(17 * B));
    }

    #[test]
    fn bitmap_mode_keeps_marking_until_caught_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = capture(dir.path(), 64 << 10);
        c.state.on_full();
        // Room in the journal does not matter: order was lost, so writes stay in the
        // bitmap until the shipper has caught up.
        assert_eq!(c.record_write("d", 3 * B, &[1u8; 10]), Captured::Marked);
        assert!(c.state.bitmap().is_dirty(3 * B));
        let runs = c.state.take_runs(u64::MAX);
        c.state.runs_durable(runs.len());
        assert!(c.state.caught_up());
        assert_eq!(c.record_write("d", 0, &[2u8; 10]), Captured::Journaled(1));
    }

    #[test]
    fn a_journal_fault_falls_back_to_the_bitmap_and_asks_for_a_resync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = capture(dir.path(), 64 << 10);
        // An invalid disk id makes the append fail with an error other than Full.
        let id = "x".repeat(crate::journal::MAX_DISK_ID + 1);
        assert_eq!(c.record_write(&id, 5 * B, &[1u8; 100]), Captured::Marked);
        assert!(c.state.bitmap().is_dirty(5 * B));
        assert_eq!(c.state.mode(), Mode::Bitmap);
        assert!(c.resync_reason().is_some_and(|r| r.contains("append")));
    }

    #[test]
    fn a_failed_sync_poisons_until_the_capture_starts_over() {
        use boomerang_common::faults;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = capture(dir.path(), 64 << 10);
        assert_eq!(c.record_write("d", 0, &[1u8; 100]), Captured::Journaled(1));
        let rule = faults::arm_under(dir.path(), "journal.sync@1=eio").expect("arm");
        assert!(c.sync().is_err());
        drop(rule);
        assert!(c.resync_reason().is_some_and(|r| r.contains("sync")));
        // Poisoned: every later write only marks its blocks, and no tag can be cut.
        assert_eq!(c.record_write("d", 2 * B, &[2u8; 100]), Captured::Marked);
        assert!(!c.state.crash_consistent_tags_allowed());
        let mut reopened = Journal::open(dir.path(), 64 << 10).expect("reopen");
        reopened.release_all().expect("release");
        c.start_over(reopened, DirtyBitmap::new(1024 * B));
        assert!(c.resync_reason().is_none());
        assert_eq!(c.state.mode(), Mode::Journal);
        assert!(c.state.crash_consistent_tags_allowed());
        assert!(matches!(
            c.record_write("d", 3 * B, &[3u8; 100]),
            Captured::Journaled(_)
        ));
        assert!(c.sync().is_ok());
        let held = c.journal.read_from(1, u64::MAX).expect("read");
        assert_eq!(held.len(), 1, "only the write after the start over is held");
    }
}
