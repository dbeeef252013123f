//! Continuous replication with the intercept source: the agent serves each disk as a
//! file through FUSE (see [`crate::intercept`]), every write lands in the disk's
//! journal in write order before the writer hears back, and this module ships the
//! journal: writes become batches in journal order, tag records become tags at exactly
//! their place between two writes, and records are released once the process server
//! holds them. Any tag is a crash-consistent cut without pausing writes; app-consistent
//! points freeze the configured mounts only for the instant it takes to append the tag.
//!
//! When the journal is full the disk is in bitmap mode: the journal is shipped first
//! (it holds the older writes), then the dirty blocks' current content; no
//! crash-consistent tag is emitted until the bitmap is drained and acknowledged.
//!
//! The master target's directives ([`crate::session`]) end the loop: a failover's
//! shutdown appends one final tag and ships the journals up to it before the shutdown
//! hook, then stops as on SIGTERM (unmount, ship the rest); a committed failover
//! unmounts and forgets the disks' state, journal and bitmap included. A coordinated
//! point holds the writes (the capture locks, the same write-order lock a tag is
//! appended under) while the group decides, and appends its tag before letting them
//! go, only on commit.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use boomerang_common::config::now_ms;
use boomerang_common::delta::ExtentEncoder;
use boomerang_common::message::{Action, TagKind};
use boomerang_common::ChunkHash;
use tracing::{error, info, warn};

use crate::freeze::FreezeGuard;
use crate::intercept::{lock_capture, Capture, Intercept, InterceptOptions, ServedDisk};
use crate::journal::{CaptureState, DirtyBitmap, Entry, Journal, Mode};
use crate::journal_cuts::JournalCuts;
use crate::session::{Decision, DuePoint, PointSchedule, Tick, Ticker, TrackStop, DECISION_MARGIN};
use crate::ship::{zero_extents, Batches, Change};
use crate::source::{ChangeSource, ChangeStream};
use crate::sync::{DiskCtx, Syncer};
use crate::trace::DirtySnapshot;
use crate::track_trace::{set_tracking, TrackReport, FINAL_POINT_ATTEMPTS};

/// Most journal bytes read per shipping step (the capture lock is held while reading).
const READ_BUDGET: u64 = 16 << 20;

struct Served {
    disk: DiskCtx,
    /// The last run stopped uncleanly (its tracking flag was set), as found before
    /// this run set the flag again.
    unclean: bool,
    capture: Arc<Mutex<Capture>>,
    intercept: Option<Intercept>,
    bitmap_path: PathBuf,
}

impl Syncer {
    /// Serves every configured disk through FUSE under `serve_dir/<disk id>/disk` and
    /// replicates its journal continuously until SIGTERM.
    pub async fn track_intercept(&self) -> anyhow::Result<TrackReport> {
        let cfg = &self.config;
        let serve_dir = cfg.serve_dir.clone().ok_or_else(|| {
            anyhow!(
                "the intercept source needs serve_dir (--serve-dir): where the disks are served"
            )
        })?;
        let mut report = TrackReport::default();
        let mut directives = self.start_check_ins().await;
        if directives.current() == Action::Forget {
            self.forget(&mut report)?;
            return Ok(report);
        }
        let mut served = Vec::new();
        for d in &cfg.disks {
            let mut disk = self.open_disk(&d.id, &d.path).await?;
            let size = disk.source.geometry().size;
            let mut journal = self.open_journal(&d.id)?;
            if journal.recovery().set_aside.is_some() && !disk.state.get().tracking {
                // Held records may be gone with the damage: the same as an unclean
                // stop, so the disk is resynced in a new generation.
                set_tracking(&mut disk, true)?;
            }
            if disk.state.get().tracking {
                // After an unclean stop the journal may have lost its tail: replaying
                // what is left over the rescanned disk could bring back old data. The
                // new generation's scan ships the disk as it is.
                journal.release_all()?;
            }
            let bitmap_path = cfg.state_dir.join(format!("{}.bitmap", d.id));
            let bitmap = if bitmap_path.exists() && !disk.state.get().tracking {
                DirtyBitmap::load(&bitmap_path)
                    .with_context(|| format!("loading {}", bitmap_path.display()))?
            } else {
                DirtyBitmap::new(size)
            };
            // Stored before the disk is served: a write accepted from then on may live
            // only in memory (the bitmap), so a stop from here on is unclean until a
            // clean one clears the flag.
            let unclean = crate::sync::unclean_tracking(&disk);
            set_tracking(&mut disk, true)?;
            let capture = Arc::new(Mutex::new(Capture::new(journal, CaptureState::new(bitmap))));
            let mountpoint = serve_dir.join(&d.id);
            std::fs::create_dir_all(&serve_dir)
                .with_context(|| format!("creating {}", serve_dir.display()))?;
            // A dead FUSE mount left by a killed agent also answers "exists": the
            // intercept then explains how to clear it.
            match std::fs::create_dir(&mountpoint) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("creating {}", mountpoint.display()))
                }
            }
            let intercept = Intercept::start(
                &ServedDisk {
                    disk_id: d.id.clone(),
                    backing: d.path.clone(),
                    mountpoint: mountpoint.clone(),
                    file_name: "disk".into(),
                },
                capture.clone(),
                &InterceptOptions::default(),
            )
            .with_context(|| format!("serving disk {} at {}", d.id, mountpoint.display()))?;
            info!(disk = %d.id, file = %intercept.file_path().display(), "serving the disk: point the workload at this file");
            println!("serving {} at {}", d.id, intercept.file_path().display());
            served.push(Served {
                disk,
                unclean,
                capture,
                intercept: Some(intercept),
                bitmap_path,
            });
        }
        // Writes are captured from here on; a scan brings the replica up to date with
        // what was there before, the journal replays everything since.
        // After a clean stop nothing can have written the disk behind our back (only
        // the agent serves it), so the generation goes on without a rescan, provided
        // the master target agrees on where it stands.
        for s in &mut served {
            let unclean = s.unclean;
            let mine = s.disk.state.get().clone();
            let mut resume = !unclean
                && mine.generation > 0
                && mine.pass.is_none()
                && mine.size == s.disk.source.geometry().size;
            if resume {
                let remote = self.disk_state(&s.disk).await?;
                resume = remote.generation == mine.generation && remote.next_seq <= mine.next_seq;
            }
            if resume {
                info!(disk = %s.disk.id, generation = mine.generation, next_seq = mine.next_seq, "clean restart: continuing the generation without a rescan");
            } else {
                self.first_pass(&mut s.disk, now_ms(), unclean, false)
                    .await?;
            }
        }
        let ship_every = Duration::from_millis(cfg.ship_interval_ms);
        // The first tick tags a crash-consistent cut: the replica is consistent only
        // once the writes made during the scan are shipped (the scan has no tag).
        // Coordinated points wait for the group's next slot instead.
        let mut schedule = PointSchedule::new(cfg, true);
        // Uncoordinated crash-consistent cuts are made by a thread of their own, on
        // time whatever the link (see `journal_cuts`); the loop keeps the others.
        let cuts = if cfg.coordinated_points {
            None
        } else {
            let captures = served
                .iter()
                .map(|s| (s.disk.id.clone(), s.capture.clone()))
                .collect();
            Some(
                JournalCuts::start(captures, Duration::from_secs_f64(cfg.crash_interval_secs))
                    .context("starting the crash-consistent cut thread")?,
            )
        };
        let mut ticker = Ticker::new(self.shutdown.clone(), &directives);
        let mut hook_failed = false;
        let mut result: anyhow::Result<TrackStop> = loop {
            match ticker
                .tick(&mut directives, schedule.sleep(ship_every))
                .await
            {
                Tick::Stop(why) => break Ok(why),
                Tick::Resync => {
                    let paused = cuts.as_ref().map(JournalCuts::pause);
                    if let Err(e) = self.resync_served(&mut served, &mut report).await {
                        break Err(e);
                    }
                    drop(paused);
                    cut_now(&mut schedule, cuts.as_ref());
                }
                Tick::Go => {}
            }
            // Paused only when a disk will start over: a cut skipped for nothing
            // would leave a gap of an interval.
            let untrusted = if served
                .iter()
                .any(|s| lock_capture(&s.capture).resync_reason().is_some())
            {
                let _paused = cuts.as_ref().map(JournalCuts::pause);
                self.resync_untrusted(&mut served, &mut report).await
            } else {
                Ok(false)
            };
            match untrusted {
                Ok(true) => cut_now(&mut schedule, cuts.as_ref()),
                Ok(false) => {}
                Err(e) => break Err(e),
            }
            match schedule.due() {
                // The cut thread makes these.
                Some(DuePoint {
                    kind: TagKind::CrashConsistent,
                    slot: None,
                }) if cuts.is_some() => {}
                Some(DuePoint {
                    kind,
                    slot: Some(point_id),
                }) => {
                    self.coordinated_journal_point(&served, kind, point_id, &mut report)
                        .await
                }
                Some(DuePoint { kind, slot: None }) => {
                    if let Err(e) = self.journal_point(&mut served, kind, &mut report) {
                        if kind == TagKind::AppConsistent {
                            warn!(error = %format!("{e:#}"), "app-consistent point abandoned");
                        } else {
                            warn!(error = %format!("{e:#}"), "crash-consistent point skipped");
                        }
                        report.points_abandoned += 1;
                    }
                }
                None => {}
            }
            if let Err(e) = self.ship_journals(&mut served, &mut report).await {
                break Err(e);
            }
        };
        drop(directives);
        if let Some(c) = cuts {
            let (cut, skipped) = c.stop();
            report.points += cut;
            report.points_abandoned += skipped;
        }
        report.scan_bytes_read = served.iter().map(|s| s.disk.report.bytes_read).sum();
        match result {
            Ok(TrackStop::Forgotten) => {
                // Nothing more is shipped: the replicas belong to the failover now.
                for s in &mut served {
                    if let Some(i) = s.intercept.take() {
                        if let Err(e) = i.stop() {
                            warn!(disk = %s.disk.id, error = %e, "unmounting the served disk");
                        }
                    }
                }
                // Closes the journals before their files go.
                drop(served);
                self.forget(&mut report)?;
                return Ok(report);
            }
            Ok(TrackStop::ShutDown) => {
                // The workload still writes until the hook stops it: the served disks
                // stay mounted until then.
                if let Err(e) = self.final_journal_point(&mut served, &mut report).await {
                    result = Err(e);
                } else if let Err(e) = self.run_shutdown_hook().await {
                    // Stopped cleanly, but the workload may still run: no shutdown
                    // is reported.
                    result = Err(e);
                    hook_failed = true;
                }
            }
            _ => {}
        }
        // Stop serving first (no more writes), then ship what is left.
        for s in &mut served {
            if let Some(i) = s.intercept.take() {
                let stats = i.stats();
                report.discards += stats.discards;
                report.bytes_discarded += stats.bytes_discarded;
                if let Err(e) = i.stop() {
                    warn!(disk = %s.disk.id, error = %e, "unmounting the served disk");
                }
            }
        }
        let clean = (result.is_ok() || hook_failed)
            && self.ship_journals(&mut served, &mut report).await.is_ok();
        for s in &mut served {
            let cap = lock_capture(&s.capture);
            let trusted = cap.resync_reason().is_none();
            if let Err(e) = cap.state.save(&s.bitmap_path) {
                warn!(disk = %s.disk.id, error = %e, "saving the dirty bitmap");
                continue;
            }
            drop(cap);
            if clean && trusted {
                set_tracking(&mut s.disk, false)?;
            }
        }
        let why = result?;
        report.set_stopped(why);
        if why == TrackStop::ShutDown {
            report.shut_down_reported = self.report_shut_down().await;
        }
        Ok(report)
    }

    /// The application quiesce of an app-consistent point (freeze mounts and hooks),
    /// when there is one to do.
    fn quiesce(&self, kind: TagKind) -> anyhow::Result<Option<FreezeGuard>> {
        let hooks = self.config.hooks();
        let quiesce = !self.config.freeze.is_empty() || hooks.freeze.is_some();
        if kind != TagKind::AppConsistent || !quiesce {
            return Ok(None);
        }
        FreezeGuard::freeze_with_hooks(
            &self.config.freeze,
            &hooks,
            Duration::from_secs_f64(self.config.pause_deadline_secs),
        )
        .map(Some)
        .map_err(anyhow::Error::msg)
    }

    /// Appends a tag to every disk's journal, between two writes; returns its point
    /// id. App-consistent points freeze the configured mounts around the append.
    fn journal_point(
        &self,
        served: &mut [Served],
        kind: TagKind,
        report: &mut TrackReport,
    ) -> anyhow::Result<u64> {
        let paused = Instant::now();
        let guard = self.quiesce(kind)?;
        let disks: Vec<(&str, &Mutex<Capture>)> = served
            .iter()
            .map(|s| (s.disk.id.as_str(), &*s.capture))
            .collect();
        let result = crate::journal_cuts::tag_all(&disks, kind, || false);
        if let Some(g) = guard {
            g.thaw();
            report
                .pauses_ms
                .push(paused.elapsed().as_secs_f64() * 1000.0);
        }
        let point_id = result
            .map_err(anyhow::Error::msg)?
            .ok_or_else(|| anyhow!("the tag was held back"))?;
        report.points += 1;
        Ok(point_id)
    }

    /// The failover's final point: a tag in every journal, shipped until the process
    /// server holds every record up to it. A disk in bitmap mode cannot take a tag
    /// until it caught up: shipping and trying again a few times, then the shutdown
    /// goes on without a final point.
    async fn final_journal_point(
        &self,
        served: &mut [Served],
        report: &mut TrackReport,
    ) -> anyhow::Result<()> {
        for attempt in 1..=FINAL_POINT_ATTEMPTS {
            match self.journal_point(served, TagKind::CrashConsistent, report) {
                Ok(id) => {
                    self.ship_journals(served, report).await?;
                    info!(
                        point_id = id,
                        "final point before the failover is durable at the process server"
                    );
                    report.final_point_id = Some(id);
                    return Ok(());
                }
                Err(e) => {
                    warn!(attempt, of = FINAL_POINT_ATTEMPTS, error = %format!("{e:#}"), "the final point could not be taken yet");
                    self.ship_journals(served, report).await?;
                }
            }
        }
        error!("no final point could be taken: the failover uses the group's previous point");
        Ok(())
    }

    /// A coordinated point: the writes of every served disk are held while the group
    /// decides, and the tags with the group's `point_id` are appended before they go
    /// on, only on commit. Abandoned points are counted and logged; the writes are
    /// journaled and shipped either way.
    async fn coordinated_journal_point(
        &self,
        served: &[Served],
        kind: TagKind,
        point_id: u64,
        report: &mut TrackReport,
    ) {
        let paused = Instant::now();
        let guard = match self.quiesce(kind) {
            Ok(g) => g,
            Err(e) => {
                warn!(?kind, point_id, error = %format!("{e:#}"), "coordinated point abandoned: cannot quiesce");
                report.points_abandoned += 1;
                return;
            }
        };
        let result = self
            .hold_and_decide(served, kind, point_id, guard.as_ref())
            .await;
        if let Some(g) = guard {
            g.thaw();
        }
        let held = paused.elapsed();
        report.pauses_ms.push(held.as_secs_f64() * 1000.0);
        match result {
            Ok(()) => {
                report.points += 1;
                info!(
                    ?kind,
                    point_id,
                    pause_ms = held.as_millis(),
                    "coordinated point tagged"
                );
            }
            Err(reason) => {
                warn!(?kind, point_id, %reason, "coordinated point abandoned: resumed without a tag");
                report.points_abandoned += 1;
            }
        }
    }

    /// Holds the writes (see [`hold_writes`]), asks the group, and has the tags
    /// appended on commit; the hold ends in every case.
    async fn hold_and_decide(
        &self,
        served: &[Served],
        kind: TagKind,
        point_id: u64,
        quiesced: Option<&FreezeGuard>,
    ) -> Result<(), String> {
        let wait = Duration::from_millis(self.config.point_deadline_ms);
        let bound = wait + 2 * DECISION_MARGIN;
        let captures: Vec<(String, Arc<Mutex<Capture>>)> = served
            .iter()
            .map(|s| (s.disk.id.clone(), s.capture.clone()))
            .collect();
        let (held_tx, held_rx) = tokio::sync::oneshot::channel();
        let (decide_tx, decide_rx) = std::sync::mpsc::channel();
        let holder = tokio::task::spawn_blocking(move || {
            hold_writes(&captures, kind, point_id, bound, held_tx, &decide_rx)
        });
        let outcome = async {
            match tokio::time::timeout(wait, held_rx).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => return Err(e),
                Ok(Err(_)) => return Err("the write hold ended early".to_string()),
                Err(_) => {
                    return Err(format!(
                        "writes could not be held within {} ms",
                        wait.as_millis()
                    ))
                }
            }
            match self.prepare_point(point_id, kind).await {
                Decision::Commit if quiesced.is_some_and(FreezeGuard::deadline_hit) => {
                    Err("the pause deadline passed before the group committed".to_string())
                }
                Decision::Commit => decide_tx
                    .send(())
                    .map_err(|_| "the write hold ended before the group committed".to_string()),
                Decision::Abandon(reason) => Err(format!("the group did not commit: {reason}")),
            }
        }
        .await;
        // Ends the hold at once if it still waits.
        drop(decide_tx);
        let appended = match tokio::time::timeout(bound, holder).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(format!("the write hold thread failed: {e}")),
            Err(_) => Err("the write hold thread is stuck taking a capture lock".to_string()),
        };
        outcome.and(appended)
    }

    /// The master target asks for a new generation (a replica rolled back under the
    /// stream by a cancelled failover, or a record refused or lost that nothing will
    /// send again): every disk starts a new generation with a scan. What the journal
    /// holds so far is on the disk the scan reads, and its tags are no cuts of the new
    /// generation, so it is released unshipped; writes from here on are journaled and
    /// shipped after the scan, and the next crash-consistent tag makes the replica
    /// consistent again.
    async fn resync_served(
        &self,
        served: &mut [Served],
        report: &mut TrackReport,
    ) -> anyhow::Result<()> {
        for s in served.iter_mut() {
            lock_capture(&s.capture).journal.release_all()?;
            warn!(disk = %s.disk.id, "the master target asks for a new generation: resync by scan");
            self.first_pass(&mut s.disk, now_ms(), true, false).await?;
            report.resyncs += 1;
        }
        Ok(())
    }

    /// Opens (recovering it) the journal of disk `id`.
    fn open_journal(&self, id: &str) -> anyhow::Result<Journal> {
        let cfg = &self.config;
        Journal::open(
            &cfg.state_dir.join("journal").join(id),
            cfg.journal_mib << 20,
        )
        .with_context(|| format!("opening the journal of disk {id}"))
    }

    /// Starts over every disk whose capture lost trust ([`Capture::resync_reason`]: a
    /// failed journal fdatasync, which poisons the journal, a failed append, a failed
    /// fdatasync of the backing disk): its journal is reopened from what is on disk
    /// and released whole, the capture goes back to journal mode, and the disk is
    /// resynced by scan in a new generation, as after an unclean stop. Without this
    /// a poisoned journal keeps the disk in bitmap mode and no point is cut until the
    /// agent restarts. A journal that cannot be reopened yet (the file system still
    /// failing) is tried again on the next tick; the writes meanwhile go on in bitmap
    /// mode. Returns whether any disk started over.
    async fn resync_untrusted(
        &self,
        served: &mut [Served],
        report: &mut TrackReport,
    ) -> anyhow::Result<bool> {
        let mut any = false;
        for s in served.iter_mut() {
            let Some(reason) = lock_capture(&s.capture).resync_reason().map(str::to_owned) else {
                continue;
            };
            let bitmap = DirtyBitmap::new(s.disk.source.geometry().size);
            // Under the capture lock: no write lands in either journal meanwhile.
            let reopened = {
                let mut cap = lock_capture(&s.capture);
                self.open_journal(&s.disk.id)
                    .and_then(|mut j| {
                        j.release_all()
                            .context("releasing the reopened journal's records")?;
                        Ok(j)
                    })
                    .map(|j| cap.start_over(j, bitmap))
            };
            if let Err(e) = reopened {
                warn!(disk = %s.disk.id, %reason, error = %format!("{e:#}"), "the capture lost trust and its journal cannot be reopened yet: writes go on in bitmap mode, trying again on the next tick");
                continue;
            }
            warn!(disk = %s.disk.id, %reason, "the capture lost trust: journal reopened, new generation, resync by scan");
            self.first_pass(&mut s.disk, now_ms(), true, false).await?;
            report.resyncs += 1;
            any = true;
        }
        Ok(any)
    }

    /// Ships every disk's journal (then, in bitmap mode, its dirty blocks).
    async fn ship_journals(
        &self,
        served: &mut [Served],
        report: &mut TrackReport,
    ) -> anyhow::Result<()> {
        for s in served.iter_mut() {
            let mut journal = JournalStream {
                capture: &s.capture,
                last: None,
            };
            for (kind, point_id) in self.ship_stream(&mut s.disk, &mut journal, report).await? {
                info!(disk = %s.disk.id, ?kind, point_id, "tag shipped");
            }
            if lock_capture(&s.capture).state.mode() == Mode::Bitmap {
                let mut bitmap = BitmapStream {
                    capture: &s.capture,
                    taken: 0,
                };
                self.ship_stream(&mut s.disk, &mut bitmap, report).await?;
                if lock_capture(&s.capture).state.caught_up() {
                    info!(disk = %s.disk.id, "caught up: back to journal mode");
                }
            }
        }
        Ok(())
    }

    /// Turns journal records into changes in journal order: batches (extents of at
    /// most a chunk, hashed and compressed; zero records as zero extents) and the cuts
    /// of tag records, at exactly their place between two writes.
    async fn journal_changes(
        &self,
        records: Vec<crate::journal::Record>,
    ) -> anyhow::Result<Vec<Change>> {
        let chunk = self.config.chunk_size() as usize;
        let batch_raw = u64::from(self.config.batch_mib) << 20;
        let level = self.config.compression_level;
        tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Change>> {
            let mut encoder = ExtentEncoder::new(level).map_err(|e| anyhow!("zstd: {e}"))?;
            let mut zero_hashes = Vec::new();
            let mut items = Vec::new();
            let mut batches = Batches::new(batch_raw);
            for record in records {
                match record.entry {
                    Entry::Write { offset, data, .. } => {
                        for (i, piece) in data.chunks(chunk).enumerate() {
                            let at = offset + (i * chunk) as u64;
                            batches.push(encoder.encode(at, piece, ChunkHash::of(piece)));
                        }
                    }
                    Entry::Zero { offset, len, .. } => {
                        for e in zero_extents(offset, len, &mut zero_hashes) {
                            batches.push(e);
                        }
                    }
                    Entry::Tag {
                        kind,
                        point_id,
                        time_ms,
                        ..
                    } => {
                        batches.close();
                        items.extend(batches.take_closed().into_iter().map(Change::Batch));
                        items.push(Change::Cut {
                            kind,
                            point_id,
                            time_ms,
                        });
                    }
                }
            }
            items.extend(batches.finish().into_iter().map(Change::Batch));
            Ok(items)
        })
        .await
        .map_err(|e| anyhow!("encoder thread failed: {e}"))?
    }
}

/// A disk's write-order journal as a [`ChangeStream`]: the records after the last
/// released one, [`READ_BUDGET`] bytes a step, released once durable at the process
/// server. Put back, they simply stay in the journal.
struct JournalStream<'c> {
    capture: &'c Arc<Mutex<Capture>>,
    /// The last record of the step handed out.
    last: Option<u64>,
}

impl ChangeStream for JournalStream<'_> {
    async fn next(
        &mut self,
        syncer: &Syncer,
        _disk: &DiskCtx,
    ) -> anyhow::Result<Option<Vec<Change>>> {
        let records = {
            let cap = lock_capture(self.capture);
            let from = cap.journal.released_through() + 1;
            cap.journal.read_from(from, READ_BUDGET)?
        };
        let Some(last) = records.last().map(|r| r.seq) else {
            return Ok(None);
        };
        self.last = Some(last);
        Ok(Some(syncer.journal_changes(records).await?))
    }

    fn durable(&mut self) -> anyhow::Result<()> {
        if let Some(last) = self.last.take() {
            lock_capture(self.capture).journal.release_through(last)?;
        }
        Ok(())
    }

    fn put_back(&mut self) {
        self.last = None;
    }
}

/// A disk's dirty bitmap (bitmap mode) as a [`ChangeStream`]: the current content of
/// [`READ_BUDGET`] bytes of dirty runs a step. Put back, the runs are marked dirty
/// again.
struct BitmapStream<'c> {
    capture: &'c Arc<Mutex<Capture>>,
    /// Runs taken for the step handed out.
    taken: usize,
}

impl ChangeStream for BitmapStream<'_> {
    async fn next(
        &mut self,
        syncer: &Syncer,
        disk: &DiskCtx,
    ) -> anyhow::Result<Option<Vec<Change>>> {
        let runs = lock_capture(self.capture).state.take_runs(READ_BUDGET);
        if runs.is_empty() {
            return Ok(None);
        }
        self.taken = runs.len();
        let snap = DirtySnapshot {
            writes: runs,
            ..DirtySnapshot::default()
        };
        let batches = syncer.build(disk, &snap, "source").await?;
        Ok(Some(batches.into_iter().map(Change::Batch).collect()))
    }

    fn durable(&mut self) -> anyhow::Result<()> {
        lock_capture(self.capture)
            .state
            .runs_durable(std::mem::take(&mut self.taken));
        Ok(())
    }

    fn put_back(&mut self) {
        lock_capture(self.capture).state.requeue_in_flight();
        self.taken = 0;
    }
}

/// Holds the writes of every disk of `captures` by taking their capture locks (in
/// order; nobody else ever holds two), then says so on `held` and waits for the
/// decision on `decided`, at most `bound`: on commit appends the tag, cut at the time
/// the writes were held, to every journal before letting go. Runs on a blocking
/// thread; a dropped `decided` (abandoned) ends the hold at once. Returns whether
/// every tag was appended.
fn hold_writes(
    captures: &[(String, Arc<Mutex<Capture>>)],
    kind: TagKind,
    point_id: u64,
    bound: Duration,
    held: tokio::sync::oneshot::Sender<Result<(), String>>,
    decided: &std::sync::mpsc::Receiver<()>,
) -> Result<(), String> {
    let mut locked = Vec::with_capacity(captures.len());
    for (disk, capture) in captures {
        let cap = lock_capture(capture);
        if !cap.state.crash_consistent_tags_allowed() {
            let why =
                format!("disk {disk} is in bitmap mode (write order lost until it catches up)");
            let _ = held.send(Err(why.clone()));
            return Err(why);
        }
        locked.push((disk, cap));
    }
    let cut_ms = now_ms();
    if held.send(Ok(())).is_err() {
        return Err("abandoned before the writes were held".into());
    }
    match decided.recv_timeout(bound) {
        Ok(()) => {}
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            return Err(format!(
                "no decision within {} ms: writes resumed",
                bound.as_millis()
            ))
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Err("abandoned".into()),
    }
    for (disk, cap) in &mut locked {
        cap.journal
            .append_tag(disk, kind, point_id, cut_ms)
            .map_err(|e| format!("disk {disk}: cannot journal the tag: {e}"))?;
    }
    Ok(())
}

/// A crash-consistent cut at once (after a resync): by the cut thread when there is
/// one, else at the loop's next tick.
fn cut_now(schedule: &mut PointSchedule, cuts: Option<&JournalCuts>) {
    match cuts {
        Some(c) => c.cut_now(),
        None => schedule.crash_now(),
    }
}
