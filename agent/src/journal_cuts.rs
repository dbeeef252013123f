//! Crash-consistent cuts of the intercept source, on schedule whatever the link.
//!
//! A cut is a tag appended to every served disk's journal between two writes; it
//! needs no process server and no master target, only the capture locks. So a thread
//! of its own appends them every interval, while the shipping loop may be stuck
//! retrying a link that is down: the tags wait in the journals with the writes and
//! become points when they arrive (issue 9 defect 4). They are cut on time, on a
//! fixed grid from the start, not an interval after whenever the loop came round.
//!
//! Rules:
//! - All capture locks are taken (in order) before any tag is appended, so the cut is
//!   one instant across the disks: no write to one disk can fall between the tags.
//! - No tag while a disk is in bitmap mode (write order lost until it caught up): the
//!   cut is skipped and counted.
//! - No tag while the loop rescans a disk in a new generation ([`JournalCuts::pause`]):
//!   a tag cut before the scan's blocks are all shipped would be no consistent cut.
//!   The pause flag is checked under the capture locks and set before the loop takes
//!   them to restart a journal, so a tag either lands before the restart (released
//!   with the old journal) or not at all.
//!
//! App-consistent and coordinated points stay with the shipping loop: they freeze
//! mounts or ask the group, which needs the link anyway.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use boomerang_common::config::now_ms;
use boomerang_common::message::TagKind;
use tracing::{error, warn};

use crate::intercept::{lock_capture, Capture};

/// The id of a point cut now: its time in ms, strictly above every id this process
/// gave before (two cuts in the same millisecond, a clock set back).
pub(crate) fn point_id() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = now_ms();
    let prev = LAST
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
            Some(now.max(last + 1))
        })
        .unwrap_or(0);
    now.max(prev + 1)
}

/// Longest sleep between two looks at the stop and cut-now flags.
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, Default)]
struct Flags {
    stop: AtomicBool,
    paused: AtomicBool,
    cut_now: AtomicBool,
    cut: AtomicU64,
    skipped: AtomicU64,
}

/// The cutting thread; stopped on drop.
#[derive(Debug)]
pub(crate) struct JournalCuts {
    flags: Arc<Flags>,
    thread: Option<JoinHandle<()>>,
}

/// While held, no cut is made (see the module doc).
pub(crate) struct CutsPaused<'a>(&'a JournalCuts);

impl Drop for CutsPaused<'_> {
    fn drop(&mut self) {
        self.0.flags.paused.store(false, Ordering::SeqCst);
    }
}

impl JournalCuts {
    /// Cuts the disks of `captures` every `every`, the first one at once.
    pub(crate) fn start(
        captures: Vec<(String, Arc<Mutex<Capture>>)>,
        every: Duration,
    ) -> std::io::Result<JournalCuts> {
        let flags = Arc::new(Flags::default());
        flags.cut_now.store(true, Ordering::SeqCst);
        let shared = flags.clone();
        let thread = std::thread::Builder::new()
            .name("journal-cuts".into())
            .spawn(move || run(&captures, every, &shared))?;
        Ok(JournalCuts {
            flags,
            thread: Some(thread),
        })
    }

    /// No cut until the guard is dropped.
    pub(crate) fn pause(&self) -> CutsPaused<'_> {
        self.flags.paused.store(true, Ordering::SeqCst);
        CutsPaused(self)
    }

    /// Cuts at once (after a resync), then on the grid again.
    pub(crate) fn cut_now(&self) {
        self.flags.cut_now.store(true, Ordering::SeqCst);
    }

    /// Stops the thread; returns the cuts made and the cuts skipped.
    pub(crate) fn stop(mut self) -> (u64, u64) {
        self.halt();
        (
            self.flags.cut.load(Ordering::SeqCst),
            self.flags.skipped.load(Ordering::SeqCst),
        )
    }

    fn halt(&mut self) {
        self.flags.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                error!("the journal cut thread panicked");
            }
        }
    }
}

impl Drop for JournalCuts {
    fn drop(&mut self) {
        self.halt();
    }
}

fn run(captures: &[(String, Arc<Mutex<Capture>>)], every: Duration, flags: &Flags) {
    let mut next = Instant::now() + every;
    loop {
        while !flags.stop.load(Ordering::SeqCst)
            && !flags.cut_now.load(Ordering::SeqCst)
            && Instant::now() < next
        {
            std::thread::sleep(POLL.min(next.saturating_duration_since(Instant::now())));
        }
        if flags.stop.load(Ordering::SeqCst) {
            return;
        }
        let now = Instant::now();
        if flags.cut_now.swap(false, Ordering::SeqCst) {
            next = now + every;
        } else {
            // On the grid; a grid point missed (a long stall) is not made up for.
            next += every;
            if next <= now {
                next = now + every;
            }
        }
        match cut(captures, flags) {
            Ok(true) => {
                flags.cut.fetch_add(1, Ordering::SeqCst);
            }
            Ok(false) => {}
            Err(why) => {
                flags.skipped.fetch_add(1, Ordering::SeqCst);
                warn!(%why, "crash-consistent point skipped");
            }
        }
    }
}

/// One cut across every disk; `Ok(false)` while paused.
fn cut(captures: &[(String, Arc<Mutex<Capture>>)], flags: &Flags) -> Result<bool, String> {
    let disks: Vec<(&str, &Mutex<Capture>)> =
        captures.iter().map(|(d, c)| (d.as_str(), &**c)).collect();
    tag_all(&disks, TagKind::CrashConsistent, || {
        flags.paused.load(Ordering::SeqCst)
    })
    .map(|id| id.is_some())
}

/// Appends a `kind` tag to the journal of every disk of `captures`, all their capture
/// locks taken first (in order, so the cut is one instant across the disks and no
/// write can switch a disk to bitmap mode in between); returns the point id, taken
/// once the locks are held ([`point_id`]). `None`, nothing appended, when `hold()`
/// says so under the locks. Fails, appending nothing more, when a disk is in bitmap
/// mode or a tag cannot be journaled.
pub(crate) fn tag_all(
    captures: &[(&str, &Mutex<Capture>)],
    kind: TagKind,
    hold: impl FnOnce() -> bool,
) -> Result<Option<u64>, String> {
    let mut locked: Vec<_> = captures
        .iter()
        .map(|(disk, c)| (*disk, lock_capture(c)))
        .collect();
    if hold() {
        return Ok(None);
    }
    if let Some((disk, _)) = locked
        .iter()
        .find(|(_, c)| !c.state.crash_consistent_tags_allowed())
    {
        return Err(format!(
            "disk {disk} is in bitmap mode (write order lost until it catches up)"
        ));
    }
    let id = point_id();
    for (disk, c) in &mut locked {
        if let Err(e) = c.journal.append_tag(disk, kind, id, id) {
            warn!(%disk, error = %e, ?kind, "cannot journal a tag");
            return Err(format!("disk {disk}: cannot journal the tag: {e}"));
        }
    }
    for (disk, _) in &locked {
        crate::witness::record(disk, id);
    }
    Ok(Some(id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{CaptureState, DirtyBitmap, Entry, Journal, BLOCK_SIZE};

    fn capture(dir: &std::path::Path) -> Arc<Mutex<Capture>> {
        let journal = Journal::open(dir, 1 << 20).expect("journal");
        Arc::new(Mutex::new(Capture::new(
            journal,
            CaptureState::new(DirtyBitmap::new(64 * BLOCK_SIZE)),
        )))
    }

    fn tags(c: &Mutex<Capture>) -> Vec<u64> {
        lock_capture(c)
            .journal
            .read_from(1, u64::MAX)
            .expect("read")
            .into_iter()
            .filter_map(|r| match r.entry {
                Entry::Tag { point_id, .. } => Some(point_id),
                _ => None,
            })
            .collect()
    }

    /// Cuts come on their own, the same ids in every disk, none while paused, and a
    /// disk in bitmap mode skips them.
    #[test]
    fn cuts_come_on_schedule_in_every_journal() {
        let (a, b) = (
            tempfile::tempdir().expect("a"),
            tempfile::tempdir().expect("b"),
        );
        let (ca, cb) = (capture(a.path()), capture(b.path()));
        let cuts = JournalCuts::start(
            vec![("a".into(), ca.clone()), ("b".into(), cb.clone())],
            Duration::from_millis(50),
        )
        .expect("start");
        std::thread::sleep(Duration::from_millis(400));
        let paused = cuts.pause();
        // A cut in progress has finished once its lock is free.
        drop(lock_capture(&ca));
        let before = tags(&ca);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(tags(&ca), before, "cut while paused");
        drop(paused);
        lock_capture(&cb).state.on_full();
        std::thread::sleep(Duration::from_millis(200));
        let (cut, skipped) = cuts.stop();
        let (ta, tb) = (tags(&ca), tags(&cb));
        assert!(ta.len() >= 4, "{ta:?}");
        assert_eq!(ta, tb, "the same cuts in both journals");
        assert_eq!(ta.len() as u64, cut);
        assert!(ta.windows(2).all(|w| w[0] < w[1]), "{ta:?}");
        assert!(skipped >= 1, "bitmap mode skipped no cut");
    }
}
