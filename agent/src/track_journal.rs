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

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use boomerang_common::config::now_ms;
use boomerang_common::delta::ExtentEncoder;
use boomerang_common::message::TagKind;
use boomerang_common::{ChunkHash, Extent};
use tracing::{info, warn};

use crate::freeze::FreezeGuard;
use crate::intercept::{lock_capture, Capture, Intercept, InterceptOptions, ServedDisk};
use crate::journal::{CaptureState, DirtyBitmap, Entry, Journal, Mode};
use crate::source::ChangeSource;
use crate::sync::{DiskCtx, Syncer};
use crate::trace::DirtySnapshot;
use crate::track::TrackReport;

/// Most journal bytes read per shipping step (the capture lock is held while reading).
const READ_BUDGET: u64 = 16 << 20;

struct Served {
    disk: DiskCtx,
    capture: Arc<Mutex<Capture>>,
    intercept: Option<Intercept>,
    bitmap_path: PathBuf,
}

/// One shipping step's worth of journal: batches and tags in journal order.
enum Item {
    Batch(Vec<Extent>),
    Tag(TagKind, u64, u64),
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
        let mut served = Vec::new();
        for d in &cfg.disks {
            let disk = self.open_disk(&d.id, &d.path).await?;
            let size = disk.source.geometry().size;
            let mut journal = Journal::open(
                &cfg.state_dir.join("journal").join(&d.id),
                cfg.journal_mib << 20,
            )
            .with_context(|| format!("opening the journal of disk {}", d.id))?;
            if disk.state.get().tracking {
                // After an unclean stop the journal may have lost its tail: replaying
                // what is left over the rescanned disk could bring back old data. The
                // new generation's scan ships the disk as it is.
                let last = journal.next_seq().saturating_sub(1);
                if last > journal.released_through() {
                    journal.release_through(last)?;
                }
            }
            let bitmap_path = cfg.state_dir.join(format!("{}.bitmap", d.id));
            let bitmap = if bitmap_path.exists() && !disk.state.get().tracking {
                DirtyBitmap::load(&bitmap_path)
                    .with_context(|| format!("loading {}", bitmap_path.display()))?
            } else {
                DirtyBitmap::new(size)
            };
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
            let unclean = crate::sync::unclean_tracking(&s.disk);
            let mine = s.disk.state.get().clone();
            let mut resume = !unclean
                && mine.generation > 0
                && mine.pass.is_none()
                && mine.size == s.disk.source.geometry().size;
            if resume {
                let remote = self.disk_state(&s.disk).await?;
                resume = remote.generation == mine.generation && remote.next_seq <= mine.next_seq;
            }
            set_tracking(&mut s.disk, true)?;
            if resume {
                info!(disk = %s.disk.id, generation = mine.generation, next_seq = mine.next_seq, "clean restart: continuing the generation without a rescan");
            } else {
                self.first_pass(&mut s.disk, now_ms(), unclean, false)
                    .await?;
            }
        }
        let ship_every = Duration::from_millis(cfg.ship_interval_ms);
        let crash_every = Duration::from_secs_f64(cfg.crash_interval_secs);
        let app_every = Duration::from_secs_f64(cfg.app_interval_secs);
        // The first tick tags a crash-consistent cut: the replica is consistent only
        // once the writes made during the scan are shipped (the scan has no tag).
        let mut next_crash = Instant::now();
        let mut next_app = Instant::now() + app_every;
        let mut shutdown = self.shutdown.clone();
        let result: anyhow::Result<()> = loop {
            tokio::select! {
                _ = tokio::time::sleep(ship_every) => {}
                _ = shutdown.changed() => {}
            }
            if *self.shutdown.borrow() {
                break Ok(());
            }
            let now = Instant::now();
            if now >= next_app {
                next_app = now + app_every;
                next_crash = now + crash_every;
                if let Err(e) = self.journal_point(&mut served, TagKind::AppConsistent, &mut report)
                {
                    warn!(error = %format!("{e:#}"), "app-consistent point abandoned");
                    report.points_abandoned += 1;
                }
            } else if now >= next_crash {
                next_crash = now + crash_every;
                if let Err(e) =
                    self.journal_point(&mut served, TagKind::CrashConsistent, &mut report)
                {
                    warn!(error = %format!("{e:#}"), "crash-consistent point skipped");
                    report.points_abandoned += 1;
                }
            }
            if let Err(e) = self.ship_journals(&mut served, &mut report).await {
                break Err(e);
            }
        };
        // Stop serving first (no more writes), then ship what is left.
        for s in &mut served {
            if let Some(i) = s.intercept.take() {
                if let Err(e) = i.stop() {
                    warn!(disk = %s.disk.id, error = %e, "unmounting the served disk");
                }
            }
        }
        let clean = result.is_ok() && self.ship_journals(&mut served, &mut report).await.is_ok();
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
        result.map(|()| report)
    }

    /// Appends a tag to every disk's journal, between two writes. App-consistent
    /// points freeze the configured mounts around the append.
    fn journal_point(
        &self,
        served: &mut [Served],
        kind: TagKind,
        report: &mut TrackReport,
    ) -> anyhow::Result<()> {
        let paused = Instant::now();
        let hooks = self.config.hooks();
        let quiesce = !self.config.freeze.is_empty() || hooks.freeze.is_some();
        let guard = if kind == TagKind::AppConsistent && quiesce {
            Some(
                FreezeGuard::freeze_with_hooks(
                    &self.config.freeze,
                    &hooks,
                    Duration::from_secs_f64(self.config.pause_deadline_secs),
                )
                .map_err(anyhow::Error::msg)?,
            )
        } else {
            None
        };
        let point_id = now_ms();
        let mut result = Ok(());
        for s in served.iter() {
            // Checked and appended under one lock: no write can switch the disk to
            // bitmap mode in between.
            let mut cap = lock_capture(&s.capture);
            if !cap.state.crash_consistent_tags_allowed() {
                result = Err(anyhow!(
                    "disk {} is in bitmap mode (write order lost until it catches up)",
                    s.disk.id
                ));
                break;
            }
            if let Err(e) = cap.journal.append_tag(&s.disk.id, kind, point_id, now_ms()) {
                result = Err(anyhow!("disk {}: cannot journal the tag: {e}", s.disk.id));
                break;
            }
        }
        if let Some(g) = guard {
            g.thaw();
            report
                .pauses_ms
                .push(paused.elapsed().as_secs_f64() * 1000.0);
        }
        result?;
        report.points += 1;
        Ok(())
    }

    /// Ships every disk's journal (then, in bitmap mode, its dirty blocks).
    async fn ship_journals(
        &self,
        served: &mut [Served],
        report: &mut TrackReport,
    ) -> anyhow::Result<()> {
        for s in served.iter_mut() {
            loop {
                let records = {
                    let cap = lock_capture(&s.capture);
                    let from = cap.journal.released_through() + 1;
                    cap.journal.read_from(from, READ_BUDGET)?
                };
                let Some(last) = records.last().map(|r| r.seq) else {
                    break;
                };
                let items = self.journal_items(records).await?;
                for item in items {
                    match item {
                        Item::Batch(extents) => {
                            self.ship(&mut s.disk, vec![extents], report).await?
                        }
                        Item::Tag(kind, point_id, time_ms) => {
                            self.tag(&mut s.disk, kind, point_id, time_ms).await?;
                            info!(disk = %s.disk.id, ?kind, point_id, "tag shipped");
                        }
                    }
                }
                lock_capture(&s.capture).journal.release_through(last)?;
            }
            if lock_capture(&s.capture).state.mode() == Mode::Bitmap {
                loop {
                    let runs = lock_capture(&s.capture).state.take_runs(READ_BUDGET);
                    if runs.is_empty() {
                        break;
                    }
                    let n = runs.len();
                    let snap = DirtySnapshot {
                        writes: runs,
                        ..DirtySnapshot::default()
                    };
                    let batches = match self.build(&s.disk, &snap).await {
                        Ok(b) => b,
                        Err(e) => {
                            lock_capture(&s.capture).state.requeue_in_flight();
                            return Err(e);
                        }
                    };
                    if let Err(e) = self.ship(&mut s.disk, batches, report).await {
                        lock_capture(&s.capture).state.requeue_in_flight();
                        return Err(e);
                    }
                    lock_capture(&s.capture).state.runs_durable(n);
                }
                if lock_capture(&s.capture).state.caught_up() {
                    info!(disk = %s.disk.id, "caught up: back to journal mode");
                }
            }
        }
        Ok(())
    }

    /// Turns journal records into batches (extents of at most a chunk, hashed and
    /// compressed, in journal order) and tags.
    async fn journal_items(
        &self,
        records: Vec<crate::journal::Record>,
    ) -> anyhow::Result<Vec<Item>> {
        let chunk = self.config.chunk_size() as usize;
        let batch_raw = u64::from(self.config.batch_mib) << 20;
        let level = self.config.compression_level;
        tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Item>> {
            let mut encoder = ExtentEncoder::new(level).map_err(|e| anyhow!("zstd: {e}"))?;
            let mut items = Vec::new();
            let mut batch: Vec<Extent> = Vec::new();
            let mut raw = 0u64;
            for record in records {
                match record.entry {
                    Entry::Write { offset, data, .. } => {
                        for (i, piece) in data.chunks(chunk).enumerate() {
                            if raw + piece.len() as u64 > batch_raw && !batch.is_empty() {
                                items.push(Item::Batch(std::mem::take(&mut batch)));
                                raw = 0;
                            }
                            let at = offset + (i * chunk) as u64;
                            batch.push(encoder.encode(at, piece, ChunkHash::of(piece)));
                            raw += piece.len() as u64;
                        }
                    }
                    Entry::Tag {
                        kind,
                        point_id,
                        time_ms,
                        ..
                    } => {
                        if !batch.is_empty() {
                            items.push(Item::Batch(std::mem::take(&mut batch)));
                            raw = 0;
                        }
                        items.push(Item::Tag(kind, point_id, time_ms));
                    }
                }
            }
            if !batch.is_empty() {
                items.push(Item::Batch(batch));
            }
            Ok(items)
        })
        .await
        .map_err(|e| anyhow!("encoder thread failed: {e}"))?
    }
}

fn set_tracking(disk: &mut DiskCtx, on: bool) -> anyhow::Result<()> {
    crate::track::set_tracking(disk, on)
}
