//! The trace source's change tracking: which 4 KiB blocks of an existing Linux block
//! device were written or discarded, learned from the kernel's `block/block_bio_queue`
//! tracepoint, so the workload keeps using its own disk.
//!
//! [`Tracer::start`] creates a tracefs instance `instances/boomerang-<major>-<minor>`
//! (mounting tracefs first if nobody has), sets its per-cpu ring buffer size, the
//! `counter` trace clock (one global order over all cpus), an event filter on the
//! device's `dev` (the kernel's MKDEV, major << 20 | minor; for a partition the whole
//! disk's dev and the partition's sector range), and enables the event. A reader thread
//! follows the instance's `trace_pipe` and folds every event into a
//! [`DirtySnapshot`]-shaped set that [`Tracer::take`] swaps out.
//!
//! Lost events are detected, never guessed ([`Tracer::lost`]); tracking is lost for
//! good once any of these is seen:
//! - the ring buffer lost events: a per-cpu `stats` counter (`overrun`, `commit
//!   overrun`, `dropped events`) rose above its value at start, or `trace_pipe` printed
//!   `CPU:N [LOST M EVENTS]`;
//! - someone else touched the instance: a write to any of its control files (event
//!   enable, filter or trigger, `tracing_on`, `set_event`, buffer size, options,
//!   clearing `trace`), an open of a consuming pipe, the instance's removal (an inotify
//!   watch sees each of these even when undone at once), or, polled every
//!   `health_interval_ms`, `tracing_on`, the event's `enable` or `filter` not as set;
//! - the reader failed: `trace_pipe` error or end of file, a line naming the event that
//!   does not parse, an event for another device or outside the partition, a zoned
//!   operation, or the reader thread ending for any other reason.
//!
//! [`Tracer::sync_point`] makes sure every event of a bio submitted before the call is
//! in the set: it writes a marker into the instance's `trace_marker` and waits until the
//! reader has read it. With the counter clock every event that was committed before
//! the marker sorts before it in `trace_pipe`'s merge of the per-cpu buffers, and a
//! bio's event is committed inside `submit_bio`, before the bio can complete. After the
//! marker the reader checks the watch and the loss counters once more, so a loss that
//! happened before the marker is reported by that call.
//!
//! Not seen by this tracepoint (documented limits): SCSI/NVMe passthrough writes
//! (SG_IO, uring_cmd), writes to a loop device's backing file, and bios a stacked
//! driver remaps into the device in place (devices with non-dm holders are refused).
//!
//! # Stopping, and handing the instance over
//! [`Tracer::stop`] (and drop) stops the reader, disables the event and removes the
//! instance. [`Tracer::hand_over`] instead leaves the instance tracing the device with
//! nobody reading it, for the next agent: the reader stops consuming (every event it
//! consumed is in the dirty set it returns, to be shipped), a hand-over marker is
//! written into the buffer, the loss counters are checked once more, and the
//! [`Handover`] record (instance, device, filter, buffer size, clock, marker, counters)
//! is returned for the caller to keep durably. While nobody reads, each cpu's ring
//! buffer holds about 17 block events per KiB of `buffer_size_kb` (60 bytes an event,
//! measured on Linux 6.18), one event per bio whatever its size, the bios of reads
//! included. [`Tracer::adopt`] takes the instance over at the next start if
//! it checks out: the same device and filter, the instance still there with tracing
//! and the event on, the same buffer size, clock and overwrite mode, and every loss
//! counter where it was at the stop (more overruns: the buffer was too small for the
//! writes made meanwhile). Its reader must then read the hand-over marker before its
//! own first sync marker (else the buffer was cleared or the instance replaced), and
//! the events buffered since the stop become the first dirty set. What cannot be seen
//! while nobody watches: tracing switched off and on again, or the event disabled and
//! enabled again, without the counters moving; only root can do that, and the
//! agent's own processes never do.
//!
//! An instance nobody holds open under the device's name (an agent killed while
//! tracing, or a hand-over not adopted) is removed when the next tracer of the device
//! starts; instances of the older `boomerang-<pid>-<major>-<minor>` naming are
//! removed once their process is gone. A tracefs mount made by the tracer stays: other
//! tracers may use it.

mod dirty;
mod event;
mod reader;
#[cfg(test)]
mod tests;
mod tracefs;

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use boomerang_common::config::now_ms;
use serde::{Deserialize, Serialize};

use self::dirty::DirtySet;
use self::reader::{eventfd, kick, Health, Reader, ReaderEnd, ReaderParts};
pub use self::tracefs::CpuStats;
// Public for the `tracefs_line` fuzz target: the line parser and the sector arithmetic.
pub use self::event::{parse_line, BioOp, Line};
pub use self::tracefs::DeviceTarget;
use self::tracefs::{
    instance_name, io_err, parse_stats, read_ctl, write_ctl, Instance, Watch, EVENT_DIR,
    INSTANCE_PREFIX,
};

/// Tracking granularity in bytes (a 4 KiB block).
pub const TRACE_BLOCK: u64 = dirty::BLOCK;

/// Text of the tracer's sync markers: `boomerang-sync <nonce> <token>`.
const SYNC_MARKER: &str = "boomerang-sync";
/// Text of the marker a hand-over leaves: `boomerang-handover <nonce>`.
const HANDOVER_MARKER: &str = "boomerang-handover";
/// Longest an adoption may take to read what the buffer held since the stop.
const ADOPT_SYNC: Duration = Duration::from_secs(30);

/// Tracer settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TraceOptions {
    /// Ring buffer size per cpu in KiB (4 to 1048576). Bursts larger than this between
    /// two reads lose events (then the generation is resynced). It also bounds how
    /// much a cleanly stopped agent may miss while it is down before its next start
    /// must rescan instead of adopting the handed-over instance: a block event takes
    /// about 60 bytes, one per bio (reads included) whatever its size, so the default
    /// holds about 70,000 bios per cpu: several GiB of large sequential writes, some
    /// 250 MiB of scattered 4 KiB ones (per cpu that submits them). The memory is the
    /// kernel's, per cpu, for as long as the device is tracked.
    /// Default: 4096.
    pub buffer_size_kb: u32,
    /// How often the reader polls the loss counters and the instance's settings, in
    /// milliseconds (10 to 60000). Sync points check them in any case.
    /// Default: 250.
    pub health_interval_ms: u64,
    /// Most dirty runs held (about 40 bytes each); beyond it tracking coarsens (64 KiB,
    /// 1 MiB, ... granules) until the next take, shipping more but never less.
    /// Default: 1048576.
    pub max_runs: usize,
    /// tracefs mount point.
    /// Default: found in /proc/self/mountinfo, else mounted at /sys/kernel/tracing.
    pub tracefs: Option<PathBuf>,
    /// On a clean stop (SIGTERM) leave the trace instance tracing the device for the
    /// next start to adopt, so it goes on without a rescan (see the module doc); the
    /// kernel keeps the ring buffers allocated while the agent is down. Off: the
    /// instance is removed and the next start rescans the disk against the replica.
    /// Default: true.
    pub hand_over: bool,
}

impl Default for TraceOptions {
    fn default() -> Self {
        TraceOptions {
            buffer_size_kb: 4096,
            health_interval_ms: 250,
            max_runs: 1 << 20,
            tracefs: None,
            hand_over: true,
        }
    }
}

impl TraceOptions {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), String> {
        if !(4..=1 << 20).contains(&self.buffer_size_kb) {
            return Err(format!(
                "buffer_size_kb = {} must be 4 to 1048576",
                self.buffer_size_kb
            ));
        }
        if !(10..=60_000).contains(&self.health_interval_ms) {
            return Err(format!(
                "health_interval_ms = {} must be 10 to 60000",
                self.health_interval_ms
            ));
        }
        if self.max_runs < 16 {
            return Err(format!("max_runs = {} must be at least 16", self.max_runs));
        }
        Ok(())
    }
}

/// What the tracer failed to do.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The device cannot be traced.
    #[error("cannot trace {path}: {reason}")]
    Device {
        /// The device given.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A tracefs file operation failed.
    #[error("cannot {op} {path}: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// tracefs is missing or did not accept a setting.
    #[error("tracefs: {0}")]
    Tracefs(String),
    /// This process already traces the device (the instance exists).
    #[error("trace instance {0} already exists: the device is already traced by this process")]
    AlreadyTracing(PathBuf),
    /// Invalid [`TraceOptions`].
    #[error("invalid trace options: {0}")]
    Options(String),
    /// Tracking was lost; the dirty set is incomplete.
    #[error("tracking lost: {0}")]
    Lost(String),
    /// A sync point was not reached in time.
    #[error("sync point not reached within {0:?}")]
    Timeout(Duration),
    /// A handed-over instance cannot be adopted (the caller rescans instead).
    #[error("cannot adopt the handed-over trace instance: {0}")]
    NotAdopted(String),
}

/// What a clean stop leaves for the next agent when it hands its trace instance over
/// ([`Tracer::hand_over`]), kept in the disk's durable state until
/// [`Tracer::adopt`] checks it against the instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    /// Instance name under tracefs `instances/`.
    pub instance: String,
    /// Major and minor of the traced device.
    pub device: (u32, u32),
    /// The event filter set.
    pub filter: String,
    /// Ring buffer size per cpu configured, KiB.
    pub buffer_size_kb: u32,
    /// The instance's `buffer_size_kb` as read at the stop (the kernel rounds the
    /// configured size up to whole pages).
    pub buffer_size_read: String,
    /// The trace clock.
    pub clock: String,
    /// Nonce of the hand-over marker written into the buffer at the stop.
    pub marker: u64,
    /// Each cpu's loss counters at the stop.
    pub counters: Vec<(usize, CpuStats)>,
    /// Wall time of the hand-over, ms since the Unix epoch.
    pub time_ms: u64,
}

/// Dirty ranges swapped out of a tracer by [`Tracer::take`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtySnapshot {
    /// Written ranges `(offset, len)` in bytes: 4 KiB aligned (coarser after the set
    /// outgrew `max_runs`), coalesced, in disk order. Ship their current content.
    pub writes: Vec<(u64, u64)>,
    /// Discarded ranges, disjoint from `writes`: ship as zero extents.
    pub discards: Vec<(u64, u64)>,
    /// Why tracking was lost, as of this take; when set the snapshot is incomplete
    /// (start a new generation and resync).
    pub lost: Option<String>,
}

/// Counters of a tracer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TraceStats {
    /// `block_bio_queue` events of the device read.
    pub events: u64,
    /// Of those, writes (including write-zeroes and other data-changing operations).
    pub write_events: u64,
    /// Of those, discards.
    pub discard_events: u64,
    /// Bytes the write events covered.
    pub bytes_written: u64,
    /// Bytes the discard events covered.
    pub bytes_discarded: u64,
    /// Sync markers read.
    pub markers: u64,
    /// Dirty runs held now.
    pub dirty_runs: usize,
    /// Written bytes held now (to ship).
    pub pending_write_bytes: u64,
    /// Discarded bytes held now (to ship as zeros).
    pub pending_discard_bytes: u64,
    /// Current tracking granule in bytes.
    pub granule: u64,
    /// CPU time of the reader thread (user + system, the kernel's text formatting
    /// included), as of its last health check.
    pub reader_cpu: Duration,
}

#[derive(Debug)]
struct State {
    dirty: DirtySet,
    lost: Option<String>,
    marker_seen: u64,
    stats: TraceStats,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
    /// Test hook: the reader stops reading while set (to overflow the buffer).
    #[cfg(test)]
    pause: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_lost(&self, reason: String) {
        let mut st = self.lock();
        if st.lost.is_none() {
            tracing::debug!(%reason, "trace tracking lost");
            st.lost = Some(reason);
        }
        drop(st);
        self.changed.notify_all();
    }
}

/// Dirty-block tracking of one block device from the kernel's block tracepoint.
/// `Send + Sync`: share it (`Arc`) between the shipping and consistency-point tasks.
#[derive(Debug)]
pub struct Tracer {
    device: PathBuf,
    instance_dir: PathBuf,
    shared: Arc<Shared>,
    wake: Arc<OwnedFd>,
    marker: Option<File>,
    nonce: u64,
    next_token: AtomicU64,
    reader: Option<JoinHandle<ReaderEnd>>,
    instance: Option<Instance>,
    target: DeviceTarget,
    buffer_size_kb: u32,
    clock: String,
}

impl Tracer {
    /// Starts tracing `device` (a block device). Every bio submitted after this
    /// returns is tracked; on error nothing is left behind.
    pub fn start(device: &Path, opts: TraceOptions) -> Result<Tracer, TraceError> {
        opts.validate().map_err(TraceError::Options)?;
        let target = DeviceTarget::of(device)?;
        Self::start_target(device, target, opts)
    }

    fn start_target(
        device: &Path,
        target: DeviceTarget,
        opts: TraceOptions,
    ) -> Result<Tracer, TraceError> {
        let tracefs = tracefs::find_or_mount(opts.tracefs.as_deref())?;
        tracefs::remove_stale_instances(&tracefs);
        // From here on, dropping `instance` on an error removes it again.
        let instance = Instance::create(&tracefs, &instance_name(&target))?;
        let dir = instance.dir().to_path_buf();
        let ev = dir.join(EVENT_DIR);
        write_ctl(&dir.join("tracing_on"), "0")?;
        write_ctl(
            &dir.join("buffer_size_kb"),
            &opts.buffer_size_kb.to_string(),
        )?;
        let clock = set_clock(&dir)?;
        write_ctl(&dir.join("options/overwrite"), "1")?;
        let filter = target.filter();
        write_ctl(&ev.join("filter"), &filter).map_err(|e| {
            let log = read_ctl(&dir.join("error_log")).unwrap_or_default();
            TraceError::Tracefs(format!("event filter {filter:?} refused: {e} {log}"))
        })?;
        let counters = read_counters(&dir)?;
        write_ctl(&ev.join("enable"), "1")?;
        write_ctl(&dir.join("tracing_on"), "1")?;
        Self::follow(
            device,
            target,
            &opts,
            Following {
                instance,
                counters,
                clock,
                handover: None,
            },
        )
    }

    /// Takes over the instance a clean stop handed over (see the module doc): checks it
    /// against `handover`, starts reading it, and reads up to a first sync point, so
    /// the events buffered since the stop are in the dirty set when this returns.
    /// [`TraceError::NotAdopted`] (or another error) when anything does not check out;
    /// the instance is then left for [`Tracer::start`] to replace.
    pub fn adopt(
        device: &Path,
        opts: TraceOptions,
        handover: &Handover,
    ) -> Result<Tracer, TraceError> {
        opts.validate().map_err(TraceError::Options)?;
        let target = DeviceTarget::of(device)?;
        let refuse = |why: String| Err(TraceError::NotAdopted(why));
        let h = handover;
        if (target.major, target.minor) != h.device {
            return refuse(format!(
                "{} is device {}:{} now, the instance traced {}:{}",
                device.display(),
                target.major,
                target.minor,
                h.device.0,
                h.device.1
            ));
        }
        let name = instance_name(&target);
        if h.instance != name {
            return refuse(format!(
                "instance {} was handed over, this device's is {name}",
                h.instance
            ));
        }
        let filter = target.filter();
        if filter != h.filter {
            return refuse(format!(
                "the device's filter is {filter:?} now, the instance has {:?}",
                h.filter
            ));
        }
        if opts.buffer_size_kb != h.buffer_size_kb {
            return refuse(format!(
                "trace.buffer_size_kb changed from {} to {}",
                h.buffer_size_kb, opts.buffer_size_kb
            ));
        }
        let tracefs = tracefs::find_or_mount(opts.tracefs.as_deref())?;
        let dir = tracefs.join("instances").join(&name);
        if !dir.is_dir() {
            return refuse(format!(
                "{} is gone (the host restarted, or someone removed it)",
                dir.display()
            ));
        }
        let ev = dir.join(EVENT_DIR);
        let setting = |file: PathBuf, ok: &dyn Fn(&str) -> bool, what: &str| {
            let value = read_ctl(&file)?;
            if ok(&value) {
                Ok(())
            } else {
                Err(TraceError::NotAdopted(format!(
                    "{what} is {value:?} ({})",
                    file.display()
                )))
            }
        };
        setting(dir.join("tracing_on"), &|v| v == "1", "tracing_on")?;
        setting(
            ev.join("enable"),
            &|v| v.starts_with('1'),
            "the event's enable",
        )?;
        setting(ev.join("filter"), &|v| v == h.filter, "the event filter")?;
        setting(
            dir.join("buffer_size_kb"),
            &|v| v == h.buffer_size_read,
            "buffer_size_kb",
        )?;
        let clock = format!("[{}]", h.clock);
        setting(
            dir.join("trace_clock"),
            &|v| v.contains(&clock),
            "trace_clock",
        )?;
        setting(
            dir.join("options/overwrite"),
            &|v| v == "1",
            "options/overwrite",
        )?;
        let counters = read_counters(&dir)?;
        let cpus = |c: &[(usize, CpuStats)]| c.iter().map(|(n, _)| *n).collect::<Vec<_>>();
        if cpus(&counters) != cpus(&h.counters) {
            return refuse(format!(
                "the instance has cpus {:?}, {:?} at the stop",
                cpus(&counters),
                cpus(&h.counters)
            ));
        }
        for ((cpu, now), (_, then)) in counters.iter().zip(&h.counters) {
            if let Some(why) = loss_between(*cpu, then, now, h.buffer_size_kb) {
                return refuse(format!("{why} while no agent read it"));
            }
        }
        let tracer = Self::follow(
            device,
            target,
            &opts,
            Following {
                instance: Instance::adopt(dir),
                counters,
                clock: h.clock.clone(),
                handover: Some(h.marker),
            },
        )?;
        // On error the tracer drops here and removes the instance.
        tracer
            .sync_point(ADOPT_SYNC)
            .map_err(|e| TraceError::NotAdopted(format!("reading it: {e}")))?;
        tracing::info!(
            device = %device.display(),
            instance = %tracer.instance_dir.display(),
            handed_over_ms = h.time_ms,
            "adopted the trace instance handed over at the last stop"
        );
        Ok(tracer)
    }

    /// Reads an instance set up by [`Tracer::start_target`] or checked by
    /// [`Tracer::adopt`]: opens its pipe and control files, watches it, checks it, and
    /// starts the reader thread.
    fn follow(
        device: &Path,
        target: DeviceTarget,
        opts: &TraceOptions,
        f: Following,
    ) -> Result<Tracer, TraceError> {
        let Following {
            instance,
            counters,
            clock,
            handover,
        } = f;
        let dir = instance.dir().to_path_buf();
        let ev = dir.join(EVENT_DIR);
        let open_ro = |p: &Path| File::open(p).map_err(io_err("open", p));
        let pipe_path = dir.join("trace_pipe");
        // One reader at a time: EBUSY while another holds it. Retried briefly, for a
        // process forked meanwhile that still holds a copy of the previous holder's
        // file until it execs.
        let deadline = Instant::now() + Duration::from_millis(500);
        let pipe = loop {
            match File::options()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&pipe_path)
            {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => break other.map_err(io_err("open", &pipe_path))?,
            }
        };
        let marker_path = dir.join("trace_marker");
        let marker = File::options()
            .write(true)
            .open(&marker_path)
            .map_err(io_err("open", &marker_path))?;
        let mut health = Health {
            stats: Vec::new(),
            tracing_on: open_ro(&dir.join("tracing_on"))?,
            enable: open_ro(&ev.join("enable"))?,
            filter: open_ro(&ev.join("filter"))?,
            expected_filter: target.filter(),
            dir: dir.clone(),
            buffer_size_kb: opts.buffer_size_kb,
            buf: Vec::new(),
        };
        let mut watch_dirs = vec![
            dir.clone(),
            dir.join("events"),
            dir.join("events/block"),
            ev.clone(),
            dir.join("options"),
        ];
        for (cpu, base) in counters {
            let cpu_dir = dir.join("per_cpu").join(format!("cpu{cpu}"));
            health
                .stats
                .push((cpu, open_ro(&cpu_dir.join("stats"))?, base));
            watch_dirs.push(cpu_dir);
        }
        // Changes from now on are seen by the watch; the check covers those before.
        let watch = Watch::new(&watch_dirs)?;
        health.check().map_err(TraceError::Tracefs)?;
        let wake = Arc::new(eventfd().map_err(io_err("create eventfd for", &dir))?);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                dirty: DirtySet::new(opts.max_runs),
                lost: None,
                marker_seen: 0,
                stats: TraceStats::default(),
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            #[cfg(test)]
            pause: AtomicBool::new(false),
        });
        let nonce = nonce();
        let reader = Reader::new(ReaderParts {
            shared: Arc::clone(&shared),
            pipe,
            wake: Arc::clone(&wake),
            watch,
            health,
            target: target.clone(),
            nonce,
            handover,
            health_every: Duration::from_millis(opts.health_interval_ms),
        });
        let thread_name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .map_or("trace", |n| n.trim_start_matches(INSTANCE_PREFIX))
            .to_string();
        let handle = std::thread::Builder::new()
            .name(format!("trace-{thread_name}"))
            .spawn(move || reader.run())
            .map_err(io_err("start the reader thread for", &dir))?;
        tracing::info!(device = %device.display(), instance = %dir.display(), "tracing block writes");
        Ok(Tracer {
            device: device.to_path_buf(),
            instance_dir: dir,
            shared,
            wake,
            marker: Some(marker),
            nonce,
            next_token: AtomicU64::new(0),
            reader: Some(handle),
            instance: Some(instance),
            target,
            buffer_size_kb: opts.buffer_size_kb,
            clock,
        })
    }

    /// The traced device.
    pub fn device(&self) -> &Path {
        &self.device
    }

    /// The tracefs instance directory.
    pub fn instance_dir(&self) -> &Path {
        &self.instance_dir
    }

    /// Swaps the dirty set out: written and discarded ranges since the last take.
    ///
    /// Without a [`Tracer::sync_point`] just before, events still in the ring buffer
    /// are missing (they come with a later take), and a loss the reader has not found
    /// yet is not in `lost`: only a successful sync point certifies a cut.
    pub fn take(&self) -> DirtySnapshot {
        let mut st = self.shared.lock();
        let (writes, discards) = st.dirty.take();
        DirtySnapshot {
            writes,
            discards,
            lost: st.lost.clone(),
        }
    }

    /// Puts a snapshot taken with [`Tracer::take`] back, for a point that could not
    /// use it (another disk failed its sync point, a block could not be read): its
    /// ranges are shipped with the next take. Discards come back as writes, so that a
    /// write made since is never overridden by zeros (the content is read at shipping:
    /// still zeros where the discard holds).
    pub fn put_back(&self, snap: &DirtySnapshot) {
        let mut st = self.shared.lock();
        for &(offset, len) in snap.writes.iter().chain(&snap.discards) {
            st.dirty.write(offset, len);
        }
    }

    /// Declares tracking lost from outside (the replica no longer holds what was
    /// shipped): the owner resyncs as for lost events.
    pub fn mark_lost(&self, reason: &str) {
        self.shared.set_lost(reason.to_string());
    }

    /// Why tracking was lost, if it was. Lost is final for this tracer.
    pub fn lost(&self) -> Option<String> {
        self.shared.lock().lost.clone()
    }

    /// Counters.
    pub fn stats(&self) -> TraceStats {
        let st = self.shared.lock();
        let mut s = st.stats.clone();
        s.dirty_runs = st.dirty.runs();
        (s.pending_write_bytes, s.pending_discard_bytes) = st.dirty.bytes();
        s.granule = st.dirty.granule();
        s
    }

    /// Returns once every bio submitted before this call is in the dirty set, and no
    /// loss happened up to then; `Lost` or `Timeout` otherwise.
    pub fn sync_point(&self, timeout: Duration) -> Result<(), TraceError> {
        let deadline = Instant::now() + timeout;
        if let Some(reason) = self.lost() {
            return Err(TraceError::Lost(reason));
        }
        let Some(mut marker) = self.marker.as_ref() else {
            return Err(TraceError::Lost("the tracer is stopped".into()));
        };
        let token = self.next_token.fetch_add(1, Ordering::SeqCst) + 1;
        let text = format!("{SYNC_MARKER} {:016x} {token}\n", self.nonce);
        if let Err(e) = marker.write_all(text.as_bytes()) {
            let reason = format!("cannot write a sync marker: {e} (was tracing switched off?)");
            self.shared.set_lost(reason.clone());
            return Err(TraceError::Lost(reason));
        }
        kick(&self.wake);
        let mut st = self.shared.lock();
        loop {
            if let Some(reason) = &st.lost {
                return Err(TraceError::Lost(reason.clone()));
            }
            if st.marker_seen >= token {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(TraceError::Timeout(timeout));
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Stops tracing: joins the reader, disables the event, removes the instance.
    pub fn stop(mut self) -> Result<(), TraceError> {
        self.shutdown()
    }

    /// Stops tracing without consuming the tracer (so a replacement can be started
    /// in its place under the same instance name); idempotent.
    pub fn stop_in_place(&mut self) -> Result<(), TraceError> {
        self.shutdown()
    }

    /// Stops reading but leaves the instance tracing the device for the next agent
    /// (see the module doc). Returns the record to keep durably and the dirty set the
    /// reader gathered, which the caller must still ship: the events it consumed are no
    /// longer in the buffer. Any failure (tracking already lost, a loss found now, a
    /// line cut in two) removes the instance and says why; the next start rescans.
    pub fn hand_over(mut self) -> Result<(Handover, DirtySnapshot), TraceError> {
        // Stop consuming: from here on the events stay in the ring buffer.
        self.shared.stop.store(true, Ordering::SeqCst);
        kick(&self.wake);
        let end = match self.reader.take().map(JoinHandle::join) {
            Some(Ok(end)) => end,
            Some(Err(_)) => return Err(TraceError::Lost("the trace reader panicked".into())),
            None => return Err(TraceError::Lost("the tracer is stopped".into())),
        };
        if let Some(reason) = self.lost() {
            return Err(TraceError::Lost(reason));
        }
        if end.partial > 0 {
            return Err(TraceError::Lost(format!(
                "the reader stopped {} bytes into a trace line",
                end.partial
            )));
        }
        let mut marker = self
            .marker
            .take()
            .ok_or_else(|| TraceError::Lost("the tracer is stopped".into()))?;
        let token = nonce();
        marker
            .write_all(format!("{HANDOVER_MARKER} {token:016x}\n").as_bytes())
            .map_err(|e| TraceError::Lost(format!("cannot write the hand-over marker: {e}")))?;
        drop(marker);
        // Nothing lost up to and including the marker.
        let mut health = end.health;
        health.check().map_err(TraceError::Lost)?;
        let snapshot = self.take();
        let buffer_size_read = read_ctl(&self.instance_dir.join("buffer_size_kb"))
            .map_err(|e| TraceError::Lost(format!("cannot read the buffer size: {e}")))?;
        let handover = Handover {
            instance: instance_name(&self.target),
            device: (self.target.major, self.target.minor),
            filter: health.expected_filter.clone(),
            buffer_size_kb: self.buffer_size_kb,
            buffer_size_read,
            clock: self.clock.clone(),
            marker: token,
            counters: health.stats.iter().map(|(cpu, _, c)| (*cpu, *c)).collect(),
            time_ms: now_ms(),
        };
        // Our files of the instance close here; the instance lives on.
        drop(health);
        if let Some(instance) = self.instance.take() {
            instance.keep();
        }
        tracing::info!(
            device = %self.device.display(),
            instance = %self.instance_dir.display(),
            "trace instance left tracing for the next start"
        );
        Ok((handover, snapshot))
    }

    fn shutdown(&mut self) -> Result<(), TraceError> {
        self.shared.stop.store(true, Ordering::SeqCst);
        kick(&self.wake);
        if let Some(h) = self.reader.take() {
            if h.join().is_err() {
                tracing::warn!(device = %self.device.display(), "trace reader thread panicked");
            }
        }
        // Our open files of the instance would make its removal fail with EBUSY.
        self.marker = None;
        match self.instance.take() {
            Some(instance) => instance.remove(),
            None => Ok(()),
        }
    }

    #[cfg(test)]
    fn pause_reader(&self, pause: bool) {
        self.shared.pause.store(pause, Ordering::SeqCst);
        kick(&self.wake);
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(device = %self.device.display(), error = %e, "trace cleanup failed");
        }
    }
}

/// Sets the instance's trace clock to `counter` (a global atomic count: one strict
/// order over all cpus), else `global`; returns the one set.
fn set_clock(dir: &Path) -> Result<String, TraceError> {
    let path = dir.join("trace_clock");
    for clock in ["counter", "global"] {
        if write_ctl(&path, clock).is_ok() && read_ctl(&path)?.contains(&format!("[{clock}]")) {
            return Ok(clock.to_string());
        }
    }
    Err(TraceError::Tracefs(format!(
        "{} accepts neither the counter nor the global clock",
        path.display()
    )))
}

/// An instance to read, as [`Tracer::follow`] takes it.
struct Following {
    instance: Instance,
    /// Each cpu's loss counters to compare with from now on.
    counters: Vec<(usize, CpuStats)>,
    clock: String,
    /// Adopted: the nonce of the hand-over marker.
    handover: Option<u64>,
}

/// Each cpu's loss counters of the instance in `dir`.
fn read_counters(dir: &Path) -> Result<Vec<(usize, CpuStats)>, TraceError> {
    let mut out = Vec::new();
    for (cpu, cpu_dir) in per_cpu_dirs(dir)? {
        let stats = cpu_dir.join("stats");
        let counters = parse_stats(&read_ctl(&stats)?).ok_or_else(|| {
            TraceError::Tracefs(format!("{} has no overrun counter", stats.display()))
        })?;
        out.push((cpu, counters));
    }
    Ok(out)
}

/// Why the counters of `cpu` went from `then` to `now` other than by nothing lost.
fn loss_between(cpu: usize, then: &CpuStats, now: &CpuStats, kb: u32) -> Option<String> {
    if now.overrun > then.overrun {
        return Some(format!(
            "cpu{cpu}: {} events were overwritten unread (ring buffer overrun; \
             buffer_size_kb = {kb}: raise trace.buffer_size_kb to cover longer stops)",
            now.overrun - then.overrun
        ));
    }
    if now.commit_overrun > then.commit_overrun || now.dropped > then.dropped {
        return Some(format!(
            "cpu{cpu}: the ring buffer dropped events (commit overrun {} -> {}, dropped {} -> {})",
            then.commit_overrun, now.commit_overrun, then.dropped, now.dropped
        ));
    }
    if now.overrun < then.overrun
        || now.commit_overrun < then.commit_overrun
        || now.dropped < then.dropped
    {
        return Some(format!(
            "cpu{cpu}: the ring buffer's counters went back (the buffer was reset)"
        ));
    }
    None
}

/// Removes a handed-over instance that will not be adopted (the disk's state is
/// forgotten), unless someone holds it open. Best effort: logged.
pub fn discard_handover(handover: &Handover, tracefs: Option<&Path>) {
    // Not mounted: the host restarted, and the instance with it.
    let Some(root) = tracefs::find_mounted(tracefs) else {
        return;
    };
    let dir = root.join("instances").join(&handover.instance);
    match tracefs::remove_unused_instance(&dir) {
        Ok(()) => {
            tracing::info!(instance = %dir.display(), "removed the handed-over trace instance")
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(instance = %dir.display(), error = %e, "cannot remove the handed-over trace instance; remove it with rmdir")
        }
    }
}

/// `per_cpu/cpuN` directories of an instance, with N.
fn per_cpu_dirs(dir: &Path) -> Result<Vec<(usize, PathBuf)>, TraceError> {
    let per_cpu = dir.join("per_cpu");
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(&per_cpu)
        .map_err(io_err("list", &per_cpu))?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let n = e.file_name().to_str()?.strip_prefix("cpu")?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    out.sort();
    if out.is_empty() {
        return Err(TraceError::Tracefs(format!(
            "{} lists no cpus",
            per_cpu.display()
        )));
    }
    Ok(out)
}

fn nonce() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let x = t.as_secs().wrapping_mul(1_000_000_007)
        ^ u64::from(t.subsec_nanos())
        ^ (u64::from(std::process::id()) << 32);
    // splitmix64 finaliser.
    let x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}
