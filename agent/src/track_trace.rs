//! Continuous replication with the trace source: the workload keeps using its own
//! block device, the kernel's `block_bio_queue` tracepoint marks the 4 KiB blocks it
//! writes (see [`crate::trace`]), and the agent ships their current content every
//! `ship_interval`. Tracking starts before the first scan pass, so writes made while
//! the disk is being scanned are shipped afterwards and the replica becomes
//! consistent at the first tag after the scan.
//!
//! Consistency points need writes paused for an instant: freeze the configured mount
//! points (hard deadline, always thawed), wait until the tracer has read every event
//! queued before the freeze, take the dirty set, read those blocks, thaw, ship, tag.
//! Lost trace events are never guessed around: the disk starts a new generation and
//! is resynced by scan. An unclean stop while tracking is found at the next start by
//! the `tracking` flag of the disk's state, with the same consequence.
//!
//! A clean stop (SIGTERM) ships what is still dirty and then hands each trace
//! instance over ([`Tracer::hand_over`]): it keeps tracing the device while the agent
//! is down, and the disk's state records it only once everything the reader took out
//! of it is durable at the process server. The next start adopts it
//! ([`Tracer::adopt`]) when it and the master target's view of the disk check out,
//! ships what it buffered meanwhile and goes on in the same generation without a
//! scan; otherwise (instance gone, events overwritten while down, settings changed,
//! the replica elsewhere) it says why and rescans against the replica's hashes as a
//! start without a hand-over does.
//!
//! The master target's directives ([`crate::session`]) end the loop: a failover's
//! shutdown takes one final point this same way (pause, capture, tag) before the
//! shutdown hook; a committed failover stops the tracers and forgets the disks'
//! state. Coordinated points ask the group between capture and thaw, writes still
//! paused, and tag only on its commit.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use boomerang_common::config::now_ms;
use boomerang_common::delta::ExtentEncoder;
use boomerang_common::message::{Action, TagKind};
use boomerang_common::{ChunkHash, Extent};
use serde::Serialize;
use tracing::{error, info, warn};

use crate::freeze::FreezeGuard;
use crate::session::{PointSchedule, Tick, Ticker, TrackStop};
use crate::ship::{zero_extents, Batches, Change};
use crate::source::{ChangeSource, ChangeStream};
use crate::sync::{DiskCtx, Syncer};
use crate::trace::{DirtySnapshot, Tracer};

/// Most bytes a consistency point reads while writes are paused; above it the point
/// is postponed and the dirty blocks shipped first without a pause.
const MAX_PAUSED_BYTES: u64 = 64 << 20;
/// Most raw bytes of dirty blocks read and encoded at a time outside a pause (rule 7):
/// a larger dirty set (a backlog after a restart, a burst between two ticks) is built
/// and shipped slice after slice, so the agent's memory does not grow with it.
const BUILD_SLICE: u64 = 16 << 20;

/// Figures of a tracking session, printed at the end.
#[derive(Debug, Default, Serialize)]
pub struct TrackReport {
    /// Batches shipped after the first pass.
    pub batches: u64,
    /// Most batches of one disk in flight at once (awaiting the process server's ack).
    pub peak_in_flight: u64,
    /// Raw bytes of dirty blocks shipped.
    pub bytes_shipped: u64,
    /// Consistency points tagged.
    pub points: u64,
    /// Points abandoned (deadline, or too much dirty to read while paused).
    pub points_abandoned: u64,
    /// Writes held by each pause, in milliseconds.
    pub pauses_ms: Vec<f64>,
    /// New generations started because tracking was lost.
    pub resyncs: u64,
    /// Why tracking ended.
    pub stopped: TrackStop,
    /// Tracking ended for a failover of the group: shut down for it, or stopped and
    /// forgotten after its commit.
    pub stopped_for_failover: bool,
    /// Shut down for a failover: the id of the final point (none if it could not be
    /// taken; the failover then uses the group's previous point).
    pub final_point_id: Option<u64>,
    /// Shut down for a failover: the master target heard that this agent shut down.
    pub shut_down_reported: bool,
    /// Raw bytes read from the disks by scan passes (first passes and resyncs) of this
    /// session; 0 when no disk was scanned.
    pub scan_bytes_read: u64,
    /// Trace source: disks whose trace instance, handed over at the last clean stop,
    /// was adopted at start, without a scan.
    pub adopted: u64,
    /// Trace source: why a handed-over instance was not adopted (that disk was
    /// rescanned instead), one line per disk.
    pub not_adopted: Vec<String>,
    /// Trace source: raw bytes of the blocks the adopted instances saw written while
    /// the agent was down, shipped at start.
    pub backlog_bytes: u64,
    /// Trace source: milliseconds from start until that backlog was durable at the
    /// process server (none when nothing was adopted).
    pub resume_ms: Option<f64>,
    /// Trace source: instances handed over at the stop, for the next start.
    pub handed_over: u64,
    /// Intercept source: discards and zero-outs of the workload served (journaled as
    /// zero records, shipped as zero extents).
    pub discards: u64,
    /// Intercept source: bytes those zeroed.
    pub bytes_discarded: u64,
}

impl TrackReport {
    /// Records why tracking ended.
    pub(crate) fn set_stopped(&mut self, why: TrackStop) {
        self.stopped = why;
        self.stopped_for_failover = why != TrackStop::Signal;
    }
}

/// How often a final point is tried before the shutdown goes on without one.
pub(crate) const FINAL_POINT_ATTEMPTS: u32 = 3;

struct Tracked {
    disk: DiskCtx,
    tracer: Tracer,
}

impl Syncer {
    /// Replicates every configured disk continuously until SIGTERM, or until the
    /// master target's directive stops it (see [`crate::session`]).
    pub async fn track(&self) -> anyhow::Result<TrackReport> {
        let cfg = &self.config;
        let mut report = TrackReport::default();
        let mut directives = self.start_check_ins().await;
        if directives.current() == Action::Forget {
            self.forget(&mut report)?;
            return Ok(report);
        }
        let started = Instant::now();
        let mut disks = Vec::new();
        let mut adopted = Vec::new();
        for d in &cfg.disks {
            let mut disk = self.open_disk(&d.id, &d.path).await?;
            // Out of the state first: an instance is adopted at most once, and one not
            // adopted is replaced by the tracer started below.
            let handover = take_handover(&mut disk)?;
            let mut tracer = None;
            if let Some(h) = handover {
                match self.adopt(&disk, &d.path, h).await {
                    Ok(t) => tracer = Some(t),
                    Err(why) => {
                        warn!(disk = %d.id, reason = %why, "not adopting the trace instance handed over at the last stop: rescanning against the replica");
                        report.not_adopted.push(format!("{}: {why}", d.id));
                    }
                }
            }
            adopted.push(tracer.is_some());
            let tracer = match tracer {
                Some(t) => t,
                // Track first, then scan: writes during the scan are caught.
                None => Tracer::start(&d.path, cfg.trace.clone()).with_context(|| {
                    format!("tracing writes of disk {} ({})", d.id, d.path.display())
                })?,
            };
            crate::witness::register(&d.id, &d.path);
            disks.push(Tracked { disk, tracer });
        }
        // With a way to pause writes, the replica becomes consistent at a real point
        // taken right after the scan (the first tick); without one, the scan ends with
        // a sync-complete tag as a plain sync does.
        let can_pause = !cfg.freeze.is_empty();
        for (t, &adopted) in disks.iter_mut().zip(&adopted) {
            // Set before the scan: a crash during it must not resume this pass in the
            // same generation, since writes to units already sent die with the tracer.
            let unclean = crate::sync::unclean_tracking(&t.disk);
            set_tracking(&mut t.disk, true)?;
            if adopted {
                info!(disk = %t.disk.id, generation = t.disk.state.get().generation, next_seq = t.disk.state.get().next_seq, "clean restart: continuing the generation from the handed-over trace instance, no rescan");
                continue;
            }
            self.first_pass(&mut t.disk, now_ms(), unclean, !can_pause)
                .await?;
        }
        if adopted.iter().any(|a| *a) {
            // What the instances buffered while the agent was down.
            let before = report.bytes_shipped;
            self.ship_dirty(&mut disks, &mut report).await?;
            report.adopted = adopted.iter().filter(|a| **a).count() as u64;
            report.backlog_bytes = report.bytes_shipped - before;
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            report.resume_ms = Some(ms);
            info!(
                backlog_bytes = report.backlog_bytes,
                resume_ms = format!("{ms:.0}"),
                "the changes made while the agent was down are durable at the process server"
            );
        }
        info!(disks = disks.len(), "tracking writes");
        let ship_every = Duration::from_millis(cfg.ship_interval_ms);
        let mut schedule = PointSchedule::new(cfg, can_pause);
        let mut ticker = Ticker::new(self.shutdown.clone(), &directives);
        let result: anyhow::Result<TrackStop> = loop {
            let rolled_back = match ticker
                .tick(&mut directives, schedule.sleep(ship_every))
                .await
            {
                Tick::Stop(why) => break Ok(why),
                Tick::Resync => true,
                Tick::Go => false,
            };
            let resyncs = report.resyncs;
            if rolled_back {
                for t in disks.iter_mut() {
                    t.tracer
                        .mark_lost("the master target rolled the replica back");
                }
            }
            if let Err(e) = self.resync_lost(&mut disks, &mut report).await {
                break Err(e);
            }
            if report.resyncs > resyncs && can_pause {
                schedule.crash_now();
            }
            let step = match schedule.due() {
                Some(due) => self
                    .point(&mut disks, due.kind, due.slot, &mut report)
                    .await
                    .map(|_| ()),
                None => self.ship_dirty(&mut disks, &mut report).await,
            };
            if let Err(e) = step {
                break Err(e);
            }
        };
        drop(directives);
        report.scan_bytes_read = disks.iter().map(|t| t.disk.report.bytes_read).sum();
        let why = match result {
            Ok(why) => why,
            Err(e) => {
                // Not clean: the next start resyncs. The loop's error is the one told.
                let _ = self.stop_tracking(disks, &mut report, false, false).await;
                return Err(e);
            }
        };
        match why {
            TrackStop::Signal => {}
            TrackStop::Forgotten => {
                // Nothing more is shipped: the replicas belong to the failover now.
                for t in disks {
                    if let Err(e) = t.tracer.stop() {
                        warn!(disk = %t.disk.id, error = %e, "stopping the tracer");
                    }
                }
                self.forget(&mut report)?;
                return Ok(report);
            }
            TrackStop::ShutDown => {
                if let Err(e) = self.final_point(&mut disks, &mut report).await {
                    let _ = self.stop_tracking(disks, &mut report, false, false).await;
                    return Err(e);
                }
                if let Err(e) = self.run_shutdown_hook().await {
                    // Stopped cleanly, but the workload may still run: no shutdown is
                    // reported.
                    if let Err(stop) = self.stop_tracking(disks, &mut report, true, false).await {
                        warn!(error = %format!("{stop:#}"), "stopping after the failed shutdown hook");
                    }
                    return Err(e);
                }
            }
        }
        self.stop_tracking(disks, &mut report, true, why == TrackStop::Signal)
            .await?;
        report.set_stopped(why);
        if why == TrackStop::ShutDown {
            report.shut_down_reported = self.report_shut_down().await;
        }
        Ok(report)
    }

    /// The stop after the loop: on a clean stop ships what is still dirty and, when
    /// nothing was missed, records it in the disks' state (else the next start
    /// resyncs). With `hand_over` (a SIGTERM, not a failover: the source is being
    /// replaced then) the trace instances of a clean stop are handed over to the next
    /// start (see `Syncer::hand_over`, unless `trace.hand_over` is off); otherwise, and
    /// when that fails, the tracers are stopped.
    async fn stop_tracking(
        &self,
        mut disks: Vec<Tracked>,
        report: &mut TrackReport,
        mut clean: bool,
        hand_over: bool,
    ) -> anyhow::Result<()> {
        for t in &disks {
            // Everything queued before the stop must be in the last dirty sets.
            if let Err(e) = t.tracer.sync_point(Duration::from_secs(2)) {
                warn!(disk = %t.disk.id, error = %e, "could not drain the tracer at stop; the next start resyncs");
                clean = false;
            }
        }
        if clean {
            if let Err(e) = self.ship_dirty(&mut disks, report).await {
                warn!(error = %format!("{e:#}"), "could not ship the last changes; the next start resyncs");
                clean = false;
            }
        }
        let hand_over = hand_over && clean && self.config.trace.hand_over;
        for t in disks {
            let Tracked { mut disk, tracer } = t;
            if hand_over && tracer.lost().is_none() {
                if self.hand_over(&mut disk, tracer, report).await? {
                    report.handed_over += 1;
                }
                continue;
            }
            let lost = tracer.lost();
            if let Err(e) = tracer.stop() {
                warn!(disk = %disk.id, error = %e, "stopping the tracer");
            }
            if clean && lost.is_none() {
                set_tracking(&mut disk, false)?;
            }
        }
        Ok(())
    }

    /// Hands the disk's trace instance over to the next start: the reader stops, what
    /// it gathered since the last take is shipped, and only once that is durable at
    /// the process server is the hand-over recorded in the disk's state, with the
    /// tracking flag cleared in the same store. Returns whether it was handed over;
    /// when not, the instance is gone and the state says why the next start rescans
    /// (a loss keeps the tracking flag: new generation).
    async fn hand_over(
        &self,
        disk: &mut DiskCtx,
        tracer: Tracer,
        report: &mut TrackReport,
    ) -> anyhow::Result<bool> {
        let (handover, rest) = match tracer.hand_over() {
            Ok(h) => h,
            Err(e) => {
                warn!(disk = %disk.id, error = %e, "could not hand the trace instance over; the next start rescans");
                if !matches!(e, crate::trace::TraceError::Lost(_)) {
                    set_tracking(disk, false)?;
                }
                return Ok(false);
            }
        };
        if let Err(e) = self.ship_snapshot(disk, rest, report).await {
            warn!(disk = %disk.id, error = %format!("{e:#}"), "could not ship the last changes before the hand-over; the next start resyncs");
            crate::trace::discard_handover(&handover, self.config.trace.tracefs.as_deref());
            return Ok(false);
        }
        let mut p = disk.state.get().clone();
        p.tracking = false;
        p.trace_handover = Some(handover);
        disk.state.store(p)?;
        info!(disk = %disk.id, "trace instance handed over to the next start");
        Ok(true)
    }

    /// Adopts the trace instance handed over at the last stop, if the disk's state
    /// and the master target agree that the replica is where the stop left it; the
    /// reason otherwise.
    async fn adopt(
        &self,
        disk: &DiskCtx,
        path: &std::path::Path,
        handover: crate::trace::Handover,
    ) -> Result<Tracer, String> {
        let mine = disk.state.get().clone();
        let size = disk.source.geometry().size;
        if mine.tracking {
            return Err("the last stop was not clean".into());
        }
        if mine.generation == 0 || mine.pass.is_some() {
            return Err("a pass was in progress".into());
        }
        if mine.size != size {
            return Err(format!(
                "the disk was resized from {} to {size} bytes",
                mine.size
            ));
        }
        let remote = self
            .disk_state(disk)
            .await
            .map_err(|e| format!("asking for the replica's state: {e:#}"))?;
        if remote.generation != mine.generation || remote.next_seq > mine.next_seq {
            return Err(format!(
                "the replica is at generation {} seq {}, this agent shipped generation {} up to seq {}",
                remote.generation, remote.next_seq, mine.generation, mine.next_seq
            ));
        }
        let path = path.to_path_buf();
        let opts = self.config.trace.clone();
        tokio::task::spawn_blocking(move || Tracer::adopt(&path, opts, &handover))
            .await
            .map_err(|e| format!("adopting thread failed: {e}"))?
            .map_err(|e| e.to_string())
    }

    /// The failover's final point: a crash-consistent point taken the usual way
    /// (pause, capture, tag), durable at the process server when this returns. A
    /// point abandoned (pause refused, deadline) is tried again a few times; after
    /// that the shutdown goes on without one.
    async fn final_point(
        &self,
        disks: &mut [Tracked],
        report: &mut TrackReport,
    ) -> anyhow::Result<()> {
        for attempt in 1..=FINAL_POINT_ATTEMPTS {
            if let Some(id) = self
                .point(disks, TagKind::CrashConsistent, None, report)
                .await?
            {
                info!(
                    point_id = id,
                    "final point before the failover is durable at the process server"
                );
                report.final_point_id = Some(id);
                return Ok(());
            }
            warn!(
                attempt,
                of = FINAL_POINT_ATTEMPTS,
                "the final point was abandoned"
            );
        }
        error!("no final point could be taken: the failover uses the group's previous point");
        Ok(())
    }

    /// After a committed failover: deletes the disks' state (see
    /// [`crate::session::forget_disk_state`]).
    pub(crate) fn forget(&self, report: &mut TrackReport) -> anyhow::Result<()> {
        crate::session::forget_disk_state(
            &self.config.state_dir,
            &self.config.disk_ids(),
            self.config.trace.tracefs.as_deref(),
        )?;
        info!(
            "failover committed at the master target: stopped replicating group {} and forgot its state",
            self.config.group()
        );
        report.set_stopped(TrackStop::Forgotten);
        Ok(())
    }

    /// Starts a new generation (and a scan resync) for every disk whose tracer lost
    /// events, with a fresh tracer started before the scan.
    async fn resync_lost(
        &self,
        disks: &mut [Tracked],
        report: &mut TrackReport,
    ) -> anyhow::Result<()> {
        for t in disks.iter_mut() {
            let Some(why) = t.tracer.lost() else { continue };
            warn!(disk = %t.disk.id, reason = %why, "write tracking lost events: new generation, resync by scan");
            let path = t.disk.source.path().to_path_buf();
            // The lost tracer's instance must go before a new one can take its name;
            // writes between the two are covered by the resync below.
            if let Err(e) = t.tracer.stop_in_place() {
                warn!(disk = %t.disk.id, error = %e, "stopping the lost tracer");
            }
            t.tracer = Tracer::start(&path, self.config.trace.clone())
                .with_context(|| format!("restarting the tracer of disk {}", t.disk.id))?;
            self.first_pass(&mut t.disk, now_ms(), true, self.config.freeze.is_empty())
                .await?;
            report.resyncs += 1;
        }
        Ok(())
    }

    /// Ships every disk's dirty set as it is now; a set that could not be shipped
    /// goes back to its tracer.
    async fn ship_dirty(
        &self,
        disks: &mut [Tracked],
        report: &mut TrackReport,
    ) -> anyhow::Result<()> {
        for t in disks.iter_mut() {
            let snap = t.tracer.take();
            if snap.lost.is_some() {
                continue; // resynced at the next tick
            }
            let mut stream = DirtyStream::new(snap, Some(&t.tracer));
            self.ship_stream(&mut t.disk, &mut stream, report).await?;
        }
        Ok(())
    }

    /// Reads, encodes and ships the dirty blocks of `snap`, [`BUILD_SLICE`] bytes at a
    /// time. On a failure what was shipped already is durable or will be resent; the
    /// caller puts the whole set back or gives up on the generation.
    async fn ship_snapshot(
        &self,
        disk: &mut DiskCtx,
        snap: DirtySnapshot,
        report: &mut TrackReport,
    ) -> anyhow::Result<()> {
        let mut stream = DirtyStream::new(snap, None);
        self.ship_stream(disk, &mut stream, report).await?;
        Ok(())
    }

    /// One consistency point across all disks: pause, capture, resume, ship, tag.
    /// With `slot` (a coordinated point) the group decides, while writes are still
    /// paused, whether the point is tagged, with `slot` as its id. Returns the id of
    /// the point tagged, `None` when it was abandoned.
    async fn point(
        &self,
        disks: &mut [Tracked],
        kind: TagKind,
        slot: Option<u64>,
        report: &mut TrackReport,
    ) -> anyhow::Result<Option<u64>> {
        // Ship the bulk first so the pause only covers what changes meanwhile.
        self.ship_dirty(disks, report).await?;
        let deadline = Duration::from_secs_f64(self.config.pause_deadline_secs);
        let mounts = self.config.freeze.clone();
        if mounts.is_empty() {
            bail!("consistency points of the trace source need a pause: configure freeze mount points (--freeze)");
        }
        for t in disks.iter_mut() {
            let mut p = t.disk.state.get().clone();
            p.frozen.clone_from(&mounts);
            t.disk.state.store(p)?;
        }
        let paused = Instant::now();
        let hooks = if kind == TagKind::AppConsistent {
            self.config.hooks()
        } else {
            crate::freeze::Hooks::default()
        };
        let guard = match FreezeGuard::freeze_with_hooks(&mounts, &hooks, deadline) {
            Ok(g) => g,
            Err(e) => {
                // Nothing of ours is frozen: forget the mounts (the next start must
                // not thaw someone else's freeze) and try again at the next point.
                for t in disks.iter_mut() {
                    let mut p = t.disk.state.get().clone();
                    p.frozen.clear();
                    t.disk.state.store(p)?;
                }
                warn!(error = %e, "consistency point abandoned: cannot pause writes");
                report.points_abandoned += 1;
                return Ok(None);
            }
        };
        let cut_ms = now_ms();
        let captured = self.capture(disks, deadline).await;
        // Tests only (unset: nothing): each disk's bytes at the cut, writes still held.
        let witnessed: Vec<Option<String>> = disks
            .iter()
            .map(|t| crate::witness::hash_now(&t.disk.id))
            .collect();
        // Phase one of a coordinated point, still paused: every disk of the group
        // must be paused at the same id before any of them is tagged.
        let decision = match slot {
            Some(id) if captured.is_ok() && !guard.deadline_hit() => {
                Some(self.prepare_point(id, kind).await)
            }
            _ => None,
        };
        guard.thaw();
        let held = paused.elapsed();
        let deadline_hit = guard.deadline_hit();
        drop(guard);
        for t in disks.iter_mut() {
            let mut p = t.disk.state.get().clone();
            p.frozen.clear();
            t.disk.state.store(p)?;
        }
        let captured = match captured {
            Ok(c) if !deadline_hit => c,
            Ok(c) => {
                // Ship what was captured (still correct data), but no tag: the pause
                // did not hold to the end.
                warn!(
                    held_ms = held.as_millis(),
                    "pause deadline passed: consistency point abandoned"
                );
                report.points_abandoned += 1;
                for (t, frames) in disks.iter_mut().zip(c) {
                    self.ship(&mut t.disk, frames, report).await?;
                }
                return Ok(None);
            }
            Err(e) => {
                warn!(error = %format!("{e:#}"), "consistency point abandoned");
                report.points_abandoned += 1;
                return Ok(None);
            }
        };
        report.pauses_ms.push(held.as_secs_f64() * 1000.0);
        if let Some(crate::session::Decision::Abandon(reason)) = decision {
            warn!(?kind, point_id = ?slot, %reason, "the group did not commit the point: resumed without a tag");
            report.points_abandoned += 1;
            for (t, frames) in disks.iter_mut().zip(captured) {
                self.ship(&mut t.disk, frames, report).await?;
            }
            return Ok(None);
        }
        let (point_id, time_ms) = match slot {
            Some(id) => (id, cut_ms),
            None => {
                let id = now_ms();
                (id, id)
            }
        };
        for ((t, frames), witness) in disks.iter_mut().zip(captured).zip(&witnessed) {
            if let Some(hash) = witness {
                crate::witness::write(&t.disk.id, point_id, hash);
            }
            let cut = Change::Cut {
                kind,
                point_id,
                time_ms,
            };
            let changes = frames.into_iter().map(Change::Batch).chain([cut]);
            self.ship_changes(&mut t.disk, changes, report).await?;
        }
        report.points += 1;
        info!(
            ?kind,
            point_id,
            coordinated = slot.is_some(),
            pause_ms = held.as_millis(),
            "consistency point tagged"
        );
        Ok(Some(point_id))
    }

    /// While paused: wait for the tracers to read everything queued, take the dirty
    /// sets, read the blocks. Fails (the point is abandoned) on a lost tracer or when
    /// too much is dirty to read within the pause. Nothing taken is ever dropped: every
    /// tracer reaches its sync point before any set is taken, and the sets taken go
    /// back to their tracers when a block cannot be read (shipped at the next step).
    async fn capture(
        &self,
        disks: &mut [Tracked],
        deadline: Duration,
    ) -> anyhow::Result<Vec<Vec<Vec<Extent>>>> {
        for t in disks.iter() {
            t.tracer
                .sync_point(deadline / 2)
                .map_err(|e| anyhow!("disk {}: {e}", t.disk.id))?;
        }
        let snaps: Vec<DirtySnapshot> = disks.iter().map(|t| t.tracer.take()).collect();
        let put_back = |disks: &[Tracked]| {
            for (t, snap) in disks.iter().zip(&snaps) {
                t.tracer.put_back(snap);
            }
        };
        let dirty: u64 = snaps
            .iter()
            .flat_map(|s| s.writes.iter())
            .map(|(_, l)| l)
            .sum();
        if dirty > MAX_PAUSED_BYTES {
            // Ship it all now, without a tag; on a failure every set goes back (what
            // was shipped already is only shipped again).
            for (t, snap) in disks.iter_mut().zip(&snaps) {
                let mut scratch = TrackReport::default();
                if let Err(e) = self
                    .ship_snapshot(&mut t.disk, snap.clone(), &mut scratch)
                    .await
                {
                    put_back(disks);
                    return Err(e);
                }
            }
            bail!(
                "{} MiB dirty at the pause, more than {} MiB: point postponed",
                dirty >> 20,
                MAX_PAUSED_BYTES >> 20
            );
        }
        let mut out = Vec::new();
        for (t, snap) in disks.iter().zip(&snaps) {
            match self.build(&t.disk, snap, "capture").await {
                Ok(frames) => out.push(frames),
                Err(e) => {
                    put_back(disks);
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// Reads and encodes the dirty blocks of `snap` into the extents of each batch
    /// (seqs are given at shipping). Runs on a blocking thread. `site` names the reads
    /// for fault injection ([`crate::fault::read`]): `source`, or `capture` in a pause.
    pub(crate) async fn build(
        &self,
        disk: &DiskCtx,
        snap: &DirtySnapshot,
        site: &'static str,
    ) -> anyhow::Result<Vec<Vec<Extent>>> {
        if snap.writes.is_empty() && snap.discards.is_empty() {
            return Ok(Vec::new());
        }
        let source = disk.source.clone();
        let snap = snap.clone();
        let chunk = u64::from(self.config.chunk_size());
        let batch_raw = u64::from(self.config.batch_mib) << 20;
        let level = self.config.compression_level;
        let id = disk.id.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Vec<Extent>>> {
            let mut encoder = ExtentEncoder::new(level).map_err(|e| anyhow!("zstd: {e}"))?;
            let mut buf = Vec::new();
            let mut batches = Batches::new(batch_raw);
            let size = source.geometry().size;
            for &(offset, len) in &snap.writes {
                let end = (offset + len).min(size);
                let mut at = offset;
                while at < end {
                    let n = chunk.min(end - at);
                    crate::fault::read(site, source.path())
                        .with_context(|| format!("reading disk {id} at {at}"))?;
                    let data = source
                        .read_unit(at, usize::try_from(n).unwrap_or(0), &mut buf)
                        .with_context(|| format!("reading disk {id} at {at}"))?;
                    batches.push(encoder.encode(at, data, ChunkHash::of(data)));
                    at += n;
                }
            }
            let mut zero_hashes = Vec::new();
            for &(offset, len) in &snap.discards {
                let end = (offset + len).min(size);
                for e in zero_extents(offset, end.saturating_sub(offset), &mut zero_hashes) {
                    batches.push(e);
                }
            }
            Ok(batches.finish())
        })
        .await
        .map_err(|e| anyhow!("reader thread failed: {e}"))?
    }
}

/// The trace source's dirty set as a [`ChangeStream`]: read and encoded
/// [`BUILD_SLICE`] bytes a step. Put back, the whole set goes back to its tracer
/// (when it has one; what was shipped already is only shipped again) and the stream
/// ends.
struct DirtyStream<'t> {
    whole: DirtySnapshot,
    slices: std::collections::VecDeque<DirtySnapshot>,
    tracer: Option<&'t Tracer>,
}

impl<'t> DirtyStream<'t> {
    fn new(whole: DirtySnapshot, tracer: Option<&'t Tracer>) -> Self {
        let slices = slices(&whole, BUILD_SLICE).into();
        DirtyStream {
            whole,
            slices,
            tracer,
        }
    }
}

impl ChangeStream for DirtyStream<'_> {
    async fn next(
        &mut self,
        syncer: &Syncer,
        disk: &DiskCtx,
    ) -> anyhow::Result<Option<Vec<Change>>> {
        let Some(slice) = self.slices.pop_front() else {
            return Ok(None);
        };
        let batches = syncer.build(disk, &slice, "source").await?;
        Ok(Some(batches.into_iter().map(Change::Batch).collect()))
    }

    fn durable(&mut self) -> anyhow::Result<()> {
        Ok(())
    }

    fn put_back(&mut self) {
        if let Some(tracer) = self.tracer.take() {
            tracer.put_back(&self.whole);
        }
        self.slices.clear();
    }
}

/// `snap`'s writes cut into slices of at most `max` bytes (a multiple of 4 KiB), in
/// disk order; its discards (zero extents, nothing to read) go with the last slice,
/// after the writes, as [`Syncer::build`] orders them.
fn slices(snap: &DirtySnapshot, max: u64) -> Vec<DirtySnapshot> {
    let mut out = vec![DirtySnapshot::default()];
    let mut filled = 0;
    for &(offset, len) in &snap.writes {
        let mut at = offset;
        let end = offset + len;
        while at < end {
            if filled == max {
                out.push(DirtySnapshot::default());
                filled = 0;
            }
            let n = (end - at).min(max - filled);
            if let Some(last) = out.last_mut() {
                last.writes.push((at, n));
            }
            filled += n;
            at += n;
        }
    }
    if let Some(last) = out.last_mut() {
        last.discards.clone_from(&snap.discards);
    }
    out
}

/// Takes the trace hand-over out of the disk's state (durably), if there is one.
fn take_handover(disk: &mut DiskCtx) -> anyhow::Result<Option<crate::trace::Handover>> {
    let mut p = disk.state.get().clone();
    let Some(h) = p.trace_handover.take() else {
        return Ok(None);
    };
    disk.state.store(p)?;
    Ok(Some(h))
}

pub(crate) fn set_tracking(disk: &mut DiskCtx, on: bool) -> anyhow::Result<()> {
    let mut p = disk.state.get().clone();
    if p.tracking != on {
        p.tracking = on;
        disk.state.store(p)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slices cover exactly the snapshot's writes, in order, none over the bound;
    /// the discards come once, last.
    #[test]
    fn slices_cover_the_dirty_set_in_order_within_the_bound() {
        let snap = DirtySnapshot {
            writes: vec![(0, 4096), (8192, 40 << 12), (1 << 30, 3 << 12)],
            discards: vec![(1 << 20, 8192)],
            lost: None,
        };
        let max = 16 << 12;
        let parts = slices(&snap, max);
        assert!(parts
            .iter()
            .all(|p| p.writes.iter().map(|w| w.1).sum::<u64>() <= max));
        let mut joined: Vec<(u64, u64)> = Vec::new();
        for (o, l) in parts.iter().flat_map(|p| p.writes.iter().copied()) {
            match joined.last_mut() {
                Some(last) if last.0 + last.1 == o => last.1 += l,
                _ => joined.push((o, l)),
            }
        }
        assert_eq!(joined, snap.writes);
        let with_discards: Vec<usize> = (0..parts.len())
            .filter(|&i| !parts[i].discards.is_empty())
            .collect();
        assert_eq!(with_discards, vec![parts.len() - 1]);
        assert_eq!(parts.len(), 3, "44 blocks in slices of 16");
        assert_eq!(slices(&DirtySnapshot::default(), max).len(), 1);
    }
}
