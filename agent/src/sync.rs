//! One sync of the agent's disks: announce each disk, choose its generation, run a
//! scan pass (resuming an interrupted one), end it with a tag, wait until the master
//! target holds it, and optionally run a final pass with the file systems frozen for
//! an app-consistent cut.
//!
//! Seqs: unit `i` of a pass with base `b` is seq `b + i`; the tag that ends the pass is
//! `b + units`. Every unit is shipped, even one with nothing changed (an empty batch),
//! so the master target sees no gaps and a unit can be rebuilt with its seq after a
//! crash (resume) or after the master target refused it (resend).

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use boomerang_common::config::{now_ms, Shutdown};
use boomerang_common::delta::ExtentEncoder;
use boomerang_common::durable::StateFile;
use boomerang_common::message::{DiskState, Message, TagKind};
use boomerang_common::{Batch, ChunkHash};
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::AgentConfig;
use crate::fault;
use crate::freeze::{self, FreezeGuard};
use crate::link::PsLink;
use crate::scan::ScanSource;
use crate::ship::Window;
use crate::source::{ChangeSource, Geometry, UnitOutput};
use crate::state::{self, DiskProgress, PassState};

/// Bytes of disk covered by one manifest request.
const MANIFEST_SPAN: u64 = 256 << 20;

/// What one disk's sync did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct DiskReport {
    /// Disk id.
    pub disk: String,
    /// Disk size.
    pub size: u64,
    /// Generation shipped in.
    pub generation: u64,
    /// Passes run.
    pub passes: u32,
    /// Raw bytes read from the disk.
    pub bytes_read: u64,
    /// Chunks examined.
    pub chunks_total: u64,
    /// Chunks that differed from the replica.
    pub chunks_changed: u64,
    /// Of those, all-zero chunks (shipped as zero extents).
    pub chunks_zero: u64,
    /// Raw bytes of the changed chunks.
    pub bytes_changed: u64,
    /// Encoded payload bytes shipped.
    pub bytes_payload: u64,
    /// Frame bytes sent (before QUIC/TLS).
    pub bytes_framed: u64,
    /// Batches the master target refused and that were sent again.
    pub resent: u64,
    /// Kind of the last tag.
    pub tag: Option<TagKind>,
    /// Seq of the last tag.
    pub tag_seq: Option<u64>,
}

impl DiskReport {
    fn add(&mut self, out: &UnitOutput) {
        self.bytes_read += out.bytes_read;
        self.chunks_total += out.chunks;
        self.chunks_changed += out.chunks_changed;
        self.chunks_zero += out.chunks_zero;
        self.bytes_changed += out.bytes_changed;
        self.bytes_payload += out.bytes_payload;
    }
}

/// What a whole sync did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct SyncReport {
    /// Per disk.
    pub disks: Vec<DiskReport>,
    /// UDP bytes sent to the process server.
    pub wire_tx_bytes: u64,
    /// UDP bytes received from it.
    pub wire_rx_bytes: u64,
    /// Wall time.
    pub seconds: f64,
}

pub(crate) struct DiskCtx {
    pub(crate) id: String,
    pub(crate) source: Arc<ScanSource>,
    pub(crate) state: StateFile<DiskProgress>,
    pub(crate) report: DiskReport,
    /// Passes shipped by this process: (base seq, geometry), to rebuild resend requests.
    passes: Vec<(u64, Geometry)>,
}

/// Runs syncs over one link.
#[derive(Debug)]
pub struct Syncer {
    pub(crate) config: AgentConfig,
    pub(crate) link: Arc<PsLink>,
    pub(crate) shutdown: Shutdown,
}

/// Whether the master target must hold a pass before `sync` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Return once the process server holds everything (durably).
    ProcessServer,
    /// Return once the master target applied the final tag.
    MasterTarget,
}

impl Syncer {
    /// A syncer for `config` over `link`.
    pub fn new(config: AgentConfig, link: Arc<PsLink>, shutdown: Shutdown) -> Self {
        Syncer {
            config,
            link,
            shutdown,
        }
    }

    /// One sync of every configured disk.
    pub async fn sync(&self, wait: Wait) -> anyhow::Result<SyncReport> {
        let started = Instant::now();
        let (tx0, rx0) = self.link.wire_bytes().await;
        let mut disks = Vec::new();
        for d in &self.config.disks {
            disks.push(self.open_disk(&d.id, &d.path).await?);
        }
        let group_point = now_ms();
        // Pass 1: bring each replica up to date (resuming an interrupted pass).
        // A disk whose continuous tracking stopped uncleanly may have missed writes:
        // new generation; once resynced it is trusted again.
        for disk in &mut disks {
            let unclean = unclean_tracking(disk);
            self.first_pass(disk, group_point, unclean, true).await?;
            if unclean {
                let mut p = disk.state.get().clone();
                p.tracking = false;
                disk.state.store(p)?;
            }
        }
        let freeze = !self.config.freeze.is_empty() || self.config.freeze_hook.is_some();
        if wait == Wait::MasterTarget || freeze {
            for disk in &mut disks {
                self.drain(disk).await?;
            }
        }
        let mut abandoned = None;
        if freeze {
            abandoned = self.frozen_pass(&mut disks, group_point + 1).await?;
            if wait == Wait::MasterTarget {
                for disk in &mut disks {
                    self.drain(disk).await?;
                }
            }
        }
        let (tx, rx) = self.link.wire_bytes().await;
        let report = SyncReport {
            disks: disks.into_iter().map(|d| d.report).collect(),
            wire_tx_bytes: tx - tx0,
            wire_rx_bytes: rx - rx0,
            seconds: started.elapsed().as_secs_f64(),
        };
        if let Some(why) = abandoned {
            bail!("{why}");
        }
        Ok(report)
    }

    pub(crate) async fn open_disk(&self, id: &str, path: &Path) -> anyhow::Result<DiskCtx> {
        std::fs::create_dir_all(&self.config.state_dir)
            .with_context(|| format!("creating state dir {}", self.config.state_dir.display()))?;
        let unit = u64::from(self.config.batch_mib) << 20;
        let source = ScanSource::open(path, self.config.chunk_size(), unit)
            .with_context(|| format!("opening disk {id} at {}", path.display()))?;
        let mut st = StateFile::open_or_create(
            &state::path(&self.config.state_dir, id),
            DiskProgress::new(id),
        )
        .with_context(|| format!("opening the state of disk {id}"))?;
        if !st.get().frozen.is_empty() {
            let mut p = st.get().clone();
            for m in &p.frozen {
                warn!(mount = %m.display(), "thawing a file system a previous agent left frozen");
                if let Err(e) = freeze::thaw(m) {
                    warn!(mount = %m.display(), error = %e, "thaw failed; run `fsfreeze -u` on it");
                }
            }
            p.frozen.clear();
            st.store(p)?;
        }
        let geometry = source.geometry();
        Ok(DiskCtx {
            id: id.to_string(),
            source: Arc::new(source),
            state: st,
            report: DiskReport {
                disk: id.to_string(),
                size: geometry.size,
                ..DiskReport::default()
            },
            passes: Vec::new(),
        })
    }

    pub(crate) async fn disk_state(&self, disk: &DiskCtx) -> anyhow::Result<DiskState> {
        let msg = Message::OpenDisk {
            disk: disk.id.clone(),
            size: disk.source.geometry().size,
            group: self.config.group(),
        };
        match self.link.request(msg.encode()).await? {
            Message::DiskState(s) => Ok(s),
            other => Err(anyhow!(
                "announcing disk {}: unexpected answer {}",
                disk.id,
                other.name()
            )),
        }
    }

    /// Chooses the generation and runs (or resumes) the first pass of this sync.
    /// `force_new_generation`: tracking was lost, so what the replica holds cannot be
    /// trusted to be a state the disk was in.
    ///
    /// `end_with_tag`: end the pass with a sync-complete tag. Continuous tracking
    /// passes `false` when it can take a real consistency point right after: a scan
    /// taken while writes go on is no consistent cut until the writes made during it
    /// are shipped too.
    pub(crate) async fn first_pass(
        &self,
        disk: &mut DiskCtx,
        point_id: u64,
        force_new_generation: bool,
        end_with_tag: bool,
    ) -> anyhow::Result<()> {
        let remote = self.disk_state(disk).await?;
        let mine = disk.state.get().clone();
        let geometry = disk.source.geometry();
        let pass_end = |p: &PassState| p.base_seq + p.geometry.units() + 1;
        let resized = mine.size != 0 && mine.size != geometry.size;
        if resized {
            warn!(disk = %disk.id, from = mine.size, to = geometry.size, "the disk was resized: new generation");
        }
        let continue_gen = !force_new_generation
            && !resized
            && mine.generation > 0
            && mine.generation >= remote.generation
            && match &mine.pass {
                // An interrupted pass can only resume with the same geometry, else its
                // unsent seqs would leave a gap.
                Some(p) => {
                    p.geometry == geometry
                        && (mine.generation > remote.generation || remote.next_seq <= pass_end(p))
                }
                None => mine.generation > remote.generation || remote.next_seq <= mine.next_seq,
            };
        let mut progress = mine.clone();
        if !continue_gen {
            let generation = mine.generation.max(remote.generation) + 1;
            info!(disk = %disk.id, generation, "starting a new generation: full resync against the replica's hashes");
            progress = DiskProgress {
                generation,
                next_seq: 0,
                pass: None,
                hole: false,
                ..progress
            };
        }
        let (pass, from) = match progress.pass.clone() {
            Some(mut p) => {
                info!(disk = %disk.id, unit = p.acked_units, of = p.geometry.units(), "resuming an interrupted pass");
                // A resumed pass lost its freeze, if it had one.
                p.kind = TagKind::SyncComplete;
                let from = p.acked_units;
                (p, from)
            }
            None => (
                PassState {
                    base_seq: progress.next_seq,
                    geometry,
                    acked_units: 0,
                    kind: TagKind::SyncComplete,
                    point_id,
                },
                0,
            ),
        };
        progress.pass = Some(pass.clone());
        progress.size = geometry.size;
        disk.state.store(progress)?;
        disk.report.generation = disk.state.get().generation;
        self.run_pass(disk, &pass, from).await?;
        if end_with_tag {
            return self.send_tag(disk, &pass).await;
        }
        let mut p = disk.state.get().clone();
        p.pass = None;
        p.next_seq = pass.base_seq + pass.geometry.units();
        disk.state.store(p)?;
        disk.passes.push((pass.base_seq, pass.geometry));
        Ok(())
    }

    /// Final pass with the file systems frozen; returns why the app-consistent point
    /// was abandoned, if it was.
    async fn frozen_pass(
        &self,
        disks: &mut [DiskCtx],
        point_id: u64,
    ) -> anyhow::Result<Option<String>> {
        let mounts = self.config.freeze.clone();
        for disk in disks.iter_mut() {
            let mut p = disk.state.get().clone();
            p.frozen.clone_from(&mounts);
            disk.state.store(p)?;
        }
        let deadline = Duration::from_secs_f64(self.config.freeze_deadline_secs);
        let guard = match FreezeGuard::freeze_with_hooks(&mounts, &self.config.hooks(), deadline) {
            Ok(g) => g,
            Err(e) => {
                // Nothing of ours is frozen: forget the mounts so the next start does
                // not thaw someone else's freeze.
                for disk in disks.iter_mut() {
                    let mut p = disk.state.get().clone();
                    p.frozen.clear();
                    disk.state.store(p)?;
                }
                return Err(anyhow::Error::msg(e));
            }
        };
        let frozen_at = Instant::now();
        // A signal thaws at once, even while a request is stuck waiting on the network.
        let on_signal = {
            let thaw = guard.handle();
            let mut shutdown = self.shutdown.clone();
            tokio::spawn(async move {
                if shutdown.wait_for(|stop| *stop).await.is_ok() {
                    thaw.thaw();
                }
            })
        };
        let mut passes = Vec::new();
        let mut result = Ok(());
        for disk in disks.iter_mut() {
            let p = disk.state.get().clone();
            let pass = PassState {
                base_seq: p.next_seq,
                geometry: disk.source.geometry(),
                acked_units: 0,
                kind: TagKind::AppConsistent,
                point_id,
            };
            disk.state.store(DiskProgress {
                pass: Some(pass.clone()),
                ..p
            })?;
            result = self.run_pass(disk, &pass, 0).await;
            passes.push(pass);
            if result.is_err() {
                break;
            }
        }
        guard.thaw();
        on_signal.abort();
        let held = frozen_at.elapsed();
        let deadline_hit = guard.deadline_hit();
        drop(guard);
        for disk in disks.iter_mut() {
            let mut p = disk.state.get().clone();
            p.frozen.clear();
            disk.state.store(p)?;
        }
        result?;
        info!(
            held_ms = held.as_millis(),
            "writes were paused for the app-consistent pass"
        );
        let abandoned = deadline_hit.then(|| {
            format!(
                "the freeze deadline of {:.1} s passed before the final pass finished: the app-consistent point was abandoned (the replica is complete but only sync-consistent); raise freeze_deadline_secs",
                self.config.freeze_deadline_secs
            )
        });
        for (disk, mut pass) in disks.iter_mut().zip(passes) {
            if deadline_hit {
                pass.kind = TagKind::SyncComplete;
            }
            self.send_tag(disk, &pass).await?;
        }
        Ok(abandoned)
    }

    pub(crate) async fn send_tag(
        &self,
        disk: &mut DiskCtx,
        pass: &PassState,
    ) -> anyhow::Result<()> {
        let generation = disk.state.get().generation;
        let seq = pass.base_seq + pass.geometry.units();
        self.ship_tag(disk, seq, pass.kind, pass.point_id, now_ms())
            .await?;
        let mut p = disk.state.get().clone();
        p.pass = None;
        p.next_seq = seq + 1;
        disk.state.store(p)?;
        disk.report.tag = Some(pass.kind);
        disk.report.tag_seq = Some(seq);
        disk.passes.push((pass.base_seq, pass.geometry));
        info!(disk = %disk.id, generation, seq, kind = ?pass.kind, "tag durable at the process server");
        Ok(())
    }

    /// Waits until the master target applied everything up to the disk's last tag,
    /// sending again any batch it refused.
    pub(crate) async fn drain(&self, disk: &mut DiskCtx) -> anyhow::Result<()> {
        let Some(tag_seq) = disk.report.tag_seq else {
            return Ok(());
        };
        let generation = disk.state.get().generation;
        // The next run starts a new generation when this gives up (`hole`).
        let stall = Duration::from_secs(self.config.drain_stall_secs);
        let started = Instant::now();
        let mut last_log = Instant::now();
        let mut progress = (None, Instant::now());
        loop {
            self.check_shutdown()?;
            let remote = self.disk_state(disk).await?;
            if remote.generation > generation
                || (remote.generation == generation && remote.next_seq > tag_seq)
            {
                info!(disk = %disk.id, secs = started.elapsed().as_secs_f64(), "master target holds the pass");
                return Ok(());
            }
            let at = Some((remote.generation, remote.next_seq));
            if at != progress.0 {
                progress = (at, Instant::now());
            } else if progress.1.elapsed() > stall {
                let mut p = disk.state.get().clone();
                p.hole = true;
                disk.state.store(p)?;
                bail!(
                    "the master target has not moved past seq {} of disk {} (generation {}) for {} s: a record it needs was refused or lost (a process server restart forgets refusals); run the sync again: it starts a new generation",
                    remote.next_seq,
                    disk.id,
                    remote.generation,
                    stall.as_secs()
                );
            }
            for seq in remote.resend {
                self.resend(disk, seq).await?;
            }
            if last_log.elapsed() > Duration::from_secs(5) {
                info!(disk = %disk.id, at = remote.next_seq, want = tag_seq + 1, "waiting for the master target to apply");
                last_log = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn resend(&self, disk: &mut DiskCtx, seq: u64) -> anyhow::Result<()> {
        let Some((base, geometry)) = disk
            .passes
            .iter()
            .copied()
            .find(|(base, g)| seq >= *base && seq < base + g.units())
        else {
            bail!(
                "the master target needs seq {seq} of disk {} again, which this agent run did not ship; run the sync again (a new generation resyncs)",
                disk.id
            );
        };
        warn!(disk = %disk.id, seq, "master target refused a batch: rebuilding and sending it again");
        let pass = PassState {
            base_seq: base,
            geometry,
            acked_units: 0,
            kind: TagKind::SyncComplete,
            point_id: 0,
        };
        let unit = seq - base;
        self.ship_units(disk, &pass, unit..unit + 1).await?;
        disk.report.resent += 1;
        Ok(())
    }

    fn check_shutdown(&self) -> anyhow::Result<()> {
        if *self.shutdown.borrow() {
            bail!("interrupted by a signal; the next sync resumes where this one stopped");
        }
        Ok(())
    }

    async fn run_pass(
        &self,
        disk: &mut DiskCtx,
        pass: &PassState,
        from: u64,
    ) -> anyhow::Result<()> {
        let units = pass.geometry.units();
        info!(disk = %disk.id, path = %disk.source.path().display(), generation = disk.state.get().generation, base_seq = pass.base_seq, units, from, kind = ?pass.kind, "pass started");
        disk.report.passes += 1;
        self.ship_units(disk, pass, from..units).await
    }

    /// Builds units `range` of `pass` on the worker threads and ships them with a
    /// bounded window, persisting the acknowledged prefix for resume.
    async fn ship_units(
        &self,
        disk: &mut DiskCtx,
        pass: &PassState,
        range: Range<u64>,
    ) -> anyhow::Result<()> {
        let geometry = pass.geometry;
        let generation = disk.state.get().generation;
        let (tx, mut rx) = mpsc::channel::<Built>(self.config.workers * 2);
        let cancel = Arc::new(AtomicBool::new(false));
        let producer = {
            let ctx = Producer {
                source: disk.source.clone(),
                link: self.link.clone(),
                disk: disk.id.clone(),
                generation,
                base_seq: pass.base_seq,
                geometry,
                workers: self.config.workers,
                level: self.config.compression_level,
                cancel: cancel.clone(),
            };
            let range = range.clone();
            tokio::spawn(async move { ctx.produce(range, tx).await })
        };
        let mut window = Window::new(self.link.clone(), self.config.in_flight);
        let mut shutdown = self.shutdown.clone();
        let mut acked = Acked::new(range.start);
        let mut producing = true;
        let started = Instant::now();
        let mut last_log = Instant::now();
        let mut last_store = Instant::now();
        let total = range.end - range.start;
        let mut failure: Option<anyhow::Error> = None;
        loop {
            if failure.is_none() && *shutdown.borrow() {
                failure = Some(anyhow!(
                    "interrupted by a signal; the next sync resumes where this one stopped"
                ));
            }
            if failure.is_some() || (!producing && window.is_empty()) {
                break;
            }
            let slot = window.slot();
            tokio::select! {
                // The receive is the last await, so a cancelled branch never loses a unit.
                (slot, built) = async { (slot.await, rx.recv().await) }, if producing => {
                    let Some(built) = built else {
                        producing = false;
                        continue;
                    };
                    disk.report.add(&built.stats);
                    disk.report.bytes_framed += built.frame.len() as u64;
                    window.send(slot?, built.unit, built.frame);
                }
                Some(done) = window.next() => {
                    match done {
                        Ok(unit) => acked.add(unit),
                        Err(e) => {
                            failure.get_or_insert_with(|| anyhow!("disk {}: shipping failed: {e}", disk.id));
                        }
                    }
                    if last_store.elapsed() > Duration::from_secs(1) {
                        self.store_acked(disk, acked.prefix)?;
                        last_store = Instant::now();
                    }
                }
                _ = shutdown.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            if last_log.elapsed() > Duration::from_secs(5) {
                let done = acked.count();
                let secs = started.elapsed().as_secs_f64();
                info!(
                    disk = %disk.id,
                    percent = format!("{:.0}", 100.0 * done as f64 / total.max(1) as f64),
                    read_mib = disk.report.bytes_read >> 20,
                    changed_mib = disk.report.bytes_changed >> 20,
                    mb_per_s = format!("{:.0}", disk.report.bytes_read as f64 / secs / 1e6),
                    "pass progress"
                );
                last_log = Instant::now();
            }
        }
        if let Some(e) = failure {
            // Stop everything at once: readers see the cancel flag or a closed channel,
            // unacknowledged sends are dropped (they are resent on resume).
            cancel.store(true, Ordering::SeqCst);
            rx.close();
            window.abort();
            producer.abort();
            let _ = producer.await;
            let _ = self.store_acked(disk, acked.prefix);
            return Err(e);
        }
        match producer.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(anyhow!("disk {}: reader task failed: {e}", disk.id)),
        }
        self.store_acked(disk, acked.prefix)?;
        Ok(())
    }

    fn store_acked(&self, disk: &mut DiskCtx, prefix: u64) -> anyhow::Result<()> {
        let mut p = disk.state.get().clone();
        if let Some(pass) = p.pass.as_mut() {
            if prefix > pass.acked_units {
                pass.acked_units = prefix;
                disk.state.store(p)?;
            }
        }
        Ok(())
    }
}

/// Whether continuous tracking of `disk` stopped uncleanly (the flag is set while it
/// runs): then writes may have been missed and a new generation must start.
pub(crate) fn unclean_tracking(disk: &DiskCtx) -> bool {
    let state = disk.state.get();
    if state.tracking {
        warn!(disk = %disk.id, "the agent stopped uncleanly while tracking writes: changes may have been missed, resyncing in a new generation");
    } else if state.hole {
        warn!(disk = %disk.id, "the last run left a hole in the stream that the master target could not get past: resyncing in a new generation");
    }
    state.tracking || state.hole
}

/// A task aborted when its handle is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Units acknowledged so far: the contiguous prefix and the ones beyond it.
struct Acked {
    start: u64,
    prefix: u64,
    beyond: BTreeSet<u64>,
}

impl Acked {
    fn new(start: u64) -> Self {
        Acked {
            start,
            prefix: start,
            beyond: BTreeSet::new(),
        }
    }

    fn add(&mut self, unit: u64) {
        self.beyond.insert(unit);
        while self.beyond.remove(&self.prefix) {
            self.prefix += 1;
        }
    }

    fn count(&self) -> u64 {
        self.prefix - self.start + self.beyond.len() as u64
    }
}

/// A built unit, encoded and ready to send.
struct Built {
    unit: u64,
    frame: Bytes,
    stats: UnitOutput,
}

/// Reads and builds units on worker threads, one manifest span at a time, fetching
/// the next span's manifest while the current one is processed.
struct Producer {
    source: Arc<ScanSource>,
    link: Arc<PsLink>,
    disk: String,
    generation: u64,
    base_seq: u64,
    geometry: Geometry,
    workers: usize,
    level: i32,
    cancel: Arc<AtomicBool>,
}

impl Producer {
    async fn produce(self, range: Range<u64>, tx: mpsc::Sender<Built>) -> anyhow::Result<()> {
        let span_units = (MANIFEST_SPAN / self.geometry.unit_size).max(1);
        let spans: Vec<Range<u64>> = {
            let mut v = Vec::new();
            let mut u = range.start;
            while u < range.end {
                let end = ((u / span_units + 1) * span_units).min(range.end);
                v.push(u..end);
                u = end;
            }
            v
        };
        let this = Arc::new(self);
        // Aborted when dropped, so a cancelled pass leaves no request behind.
        let fetch = |span: Range<u64>| {
            let this = this.clone();
            AbortOnDrop(tokio::spawn(async move { this.manifest(span).await }))
        };
        let mut next = spans.first().cloned().map(fetch);
        for (i, span) in spans.iter().enumerate() {
            let Some(mut pending) = next.take() else {
                break;
            };
            let manifest = (&mut pending.0)
                .await
                .map_err(|e| anyhow!("manifest task failed: {e}"))??;
            next = spans.get(i + 1).cloned().map(fetch);
            let this2 = this.clone();
            let tx2 = tx.clone();
            let span2 = span.clone();
            tokio::task::spawn_blocking(move || this2.build_span(span2, &manifest, &tx2))
                .await
                .map_err(|e| anyhow!("reader thread failed: {e}"))??;
            if this.cancel.load(Ordering::SeqCst) {
                break;
            }
        }
        Ok(())
    }

    async fn manifest(&self, units: Range<u64>) -> anyhow::Result<Vec<ChunkHash>> {
        let offset = units.start * self.geometry.unit_size;
        let end = (units.end * self.geometry.unit_size).min(self.geometry.size);
        let msg = Message::ManifestRequest {
            disk: self.disk.clone(),
            generation: self.generation,
            offset,
            len: end - offset,
            chunk_size: self.geometry.chunk_size,
        };
        match self.link.request(msg.encode()).await? {
            Message::ManifestResponse { hashes, .. } => Ok(hashes),
            other => Err(anyhow!(
                "manifest of disk {}: unexpected answer {}",
                self.disk,
                other.name()
            )),
        }
    }

    fn build_span(
        &self,
        span: Range<u64>,
        manifest: &[ChunkHash],
        tx: &mpsc::Sender<Built>,
    ) -> anyhow::Result<()> {
        let next = AtomicU64::new(span.start);
        let error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
        let per_unit = usize::try_from(self.geometry.chunks_per_unit()).unwrap_or(usize::MAX);
        std::thread::scope(|s| {
            for _ in 0..self.workers {
                s.spawn(|| {
                    let fail = |e: anyhow::Error| {
                        self.cancel.store(true, Ordering::SeqCst);
                        error
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .get_or_insert(e);
                    };
                    let mut encoder = match ExtentEncoder::new(self.level) {
                        Ok(e) => e,
                        Err(e) => return fail(anyhow!("zstd: {e}")),
                    };
                    let mut buf = Vec::new();
                    loop {
                        if self.cancel.load(Ordering::SeqCst) {
                            return;
                        }
                        let unit = next.fetch_add(1, Ordering::SeqCst);
                        if unit >= span.end {
                            return;
                        }
                        let at = usize::try_from(unit - span.start)
                            .unwrap_or(usize::MAX)
                            .saturating_mul(per_unit);
                        let replica = manifest.get(at..).map(|m| &m[..per_unit.min(m.len())]);
                        let mut out =
                            match self
                                .source
                                .build_unit(unit, replica, &mut encoder, &mut buf)
                            {
                                Ok(o) => o,
                                Err(e) => return fail(anyhow!("reading disk {}: {e}", self.disk)),
                            };
                        let mut batch = Batch {
                            disk: self.disk.clone(),
                            generation: self.generation,
                            seq: self.base_seq + unit,
                            extents: std::mem::take(&mut out.extents),
                        };
                        fault::maybe_corrupt(&mut batch);
                        let frame = Message::Batch(batch).encode();
                        if tx
                            .blocking_send(Built {
                                unit,
                                frame,
                                stats: out,
                            })
                            .is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        match error
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
