//! The reader thread of a [`Tracer`](super::Tracer): follows the instance's
//! `trace_pipe`, folds each event into the shared dirty set in stream order, drains
//! the instance watch, checks the loss counters and settings ([`Health`]) every
//! health interval and after every sync marker, and publishes sync markers only after
//! that check passed. Any failure ends it with the reason recorded as lost tracking.
//!
//! A reader of an adopted instance (see [`Tracer::adopt`](super::Tracer::adopt)) first
//! expects the hand-over marker the previous agent wrote at its stop: a sync marker of
//! its own before it means the buffer no longer holds what was there at the stop
//! (cleared, or the instance replaced), which is lost tracking too.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::event::{self, BioOp, Line};
use super::tracefs::{parse_stats, pread_ctl, CpuStats, DeviceTarget, Watch, EVENT_DIR};
use super::{Shared, HANDOVER_MARKER, SYNC_MARKER};

/// A non-blocking eventfd that sync points and stop kick to wake the reader.
pub(super) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is checked and then owned.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Wakes the reader.
pub(super) fn kick(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd we own; a full counter
    // (EAGAIN) already means "wake up".
    unsafe { libc::write(fd.as_raw_fd(), std::ptr::from_ref(&one).cast(), 8) };
}

fn drain_eventfd(fd: &OwnedFd) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a live u64 from a non-blocking eventfd we own.
    unsafe { libc::read(fd.as_raw_fd(), std::ptr::from_mut(&mut v).cast(), 8) };
}

/// CPU time (user + system) of the calling thread.
fn thread_cpu_time() -> Duration {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; RUSAGE_THREAD is Linux's.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, ru.as_mut_ptr()) } != 0 {
        return Duration::ZERO;
    }
    // SAFETY: zero-initialised and filled by a successful getrusage.
    let ru = unsafe { ru.assume_init() };
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The instance's settings and loss counters, as the reader checks them.
#[derive(Debug)]
pub(super) struct Health {
    /// cpu, its `stats` file, its counters at start.
    pub(super) stats: Vec<(usize, File, CpuStats)>,
    /// The instance's `tracing_on`, held open (read with pread at 0).
    pub(super) tracing_on: File,
    /// The event's `enable`.
    pub(super) enable: File,
    /// The event's `filter`.
    pub(super) filter: File,
    /// The filter we set.
    pub(super) expected_filter: String,
    /// The instance directory.
    pub(super) dir: PathBuf,
    /// For messages.
    pub(super) buffer_size_kb: u32,
    /// Scratch space.
    pub(super) buf: Vec<u8>,
}

impl Health {
    fn read(f: &File, buf: &mut Vec<u8>, what: &str) -> Result<String, String> {
        pread_ctl(f, buf).map_err(|e| format!("cannot read {what}: {e}"))?;
        Ok(String::from_utf8_lossy(buf).trim_end().to_string())
    }

    /// `Err(reason)` when events were lost or the instance is not as we set it.
    pub(super) fn check(&mut self) -> Result<(), String> {
        let mut buf = std::mem::take(&mut self.buf);
        let result = self.check_with(&mut buf);
        self.buf = buf;
        result
    }

    fn check_with(&self, buf: &mut Vec<u8>) -> Result<(), String> {
        for (cpu, f, base) in &self.stats {
            let text = Self::read(f, buf, "per-cpu stats")?;
            let now = parse_stats(&text)
                .ok_or_else(|| format!("cpu{cpu} stats lost their overrun counter"))?;
            let kb = self.buffer_size_kb;
            if now.overrun > base.overrun {
                return Err(format!(
                    "cpu{cpu}: {} events overwritten before they were read (ring buffer \
                     overrun; buffer_size_kb = {kb})",
                    now.overrun - base.overrun
                ));
            }
            if now.commit_overrun > base.commit_overrun || now.dropped > base.dropped {
                return Err(format!(
                    "cpu{cpu}: ring buffer dropped events (commit overrun {}, dropped {}; \
                     buffer_size_kb = {kb})",
                    now.commit_overrun - base.commit_overrun.min(now.commit_overrun),
                    now.dropped - base.dropped.min(now.dropped)
                ));
            }
            if now.overrun < base.overrun || now.dropped < base.dropped {
                return Err(format!(
                    "cpu{cpu}: ring buffer counters went back (buffer reset)"
                ));
            }
        }
        if Self::read(&self.tracing_on, buf, "tracing_on")? != "1" {
            return Err(format!(
                "{}/tracing_on was switched off",
                self.dir.display()
            ));
        }
        if !Self::read(&self.enable, buf, "event enable")?.starts_with('1') {
            return Err(format!(
                "{}/{EVENT_DIR}/enable was switched off",
                self.dir.display()
            ));
        }
        let filter = Self::read(&self.filter, buf, "event filter")?;
        if filter != self.expected_filter {
            return Err(format!(
                "the event filter is {filter:?}, not {:?}",
                self.expected_filter
            ));
        }
        if !self.dir.is_dir() {
            return Err(format!("{} is gone", self.dir.display()));
        }
        Ok(())
    }
}

/// One reader step's effect, applied to the dirty set in stream order.
#[derive(Debug)]
enum Op {
    Write(u64, u64),
    Discard(u64, u64),
    NoChange,
    Marker(u64),
}

/// The reader thread: follows `trace_pipe`, the watch and the health checks.
pub(super) struct Reader {
    shared: Arc<Shared>,
    pipe: File,
    wake: Arc<OwnedFd>,
    watch: Watch,
    health: Health,
    target: DeviceTarget,
    marker_prefix: Vec<u8>,
    /// The hand-over marker still to be read, for an adopted instance.
    handover_marker: Option<Vec<u8>>,
    health_every: Duration,
    partial: Vec<u8>,
    ops: Vec<Op>,
}

/// What a reader leaves when it ends: for a hand-over, its health checks (with the
/// counters it started from) and whether it stopped inside a line.
#[derive(Debug)]
pub(super) struct ReaderEnd {
    /// Bytes of an unfinished line read from `trace_pipe` (consumed, not applied).
    pub(super) partial: usize,
    /// The reader's checks.
    pub(super) health: Health,
}

/// Longest line accepted without a newline before the reader gives up.
const MAX_LINE: usize = 64 * 1024;

/// Reads of `trace_pipe` (each at most a page of text) per turn of the reader loop.
const READS_PER_TURN: usize = 64;

/// How long the reader lets trickling events gather before its next read.
const BATCH_WAIT: Duration = Duration::from_millis(2);

/// What one turn of reading `trace_pipe` got.
#[derive(Debug)]
struct Drained {
    /// Bytes read.
    bytes: usize,
    /// Whether it stopped at [`READS_PER_TURN`] with more to read.
    backlog: bool,
    /// The highest sync token seen.
    marker: Option<u64>,
}

/// What a [`Reader`] follows.
#[derive(Debug)]
pub(super) struct ReaderParts {
    /// State shared with the tracer.
    pub(super) shared: Arc<Shared>,
    /// The instance's `trace_pipe`, opened non-blocking.
    pub(super) pipe: File,
    /// Kicked by sync points and stop.
    pub(super) wake: Arc<OwnedFd>,
    /// The instance watch.
    pub(super) watch: Watch,
    /// Settings and loss counters to check.
    pub(super) health: Health,
    /// The traced device.
    pub(super) target: DeviceTarget,
    /// The tracer's sync marker nonce.
    pub(super) nonce: u64,
    /// Adopted instance: the nonce of the hand-over marker to read first.
    pub(super) handover: Option<u64>,
    /// Time between health checks.
    pub(super) health_every: Duration,
}

impl Reader {
    pub(super) fn new(p: ReaderParts) -> Self {
        Reader {
            shared: p.shared,
            pipe: p.pipe,
            wake: p.wake,
            watch: p.watch,
            health: p.health,
            target: p.target,
            marker_prefix: format!("{SYNC_MARKER} {:016x} ", p.nonce).into_bytes(),
            handover_marker: p
                .handover
                .map(|n| format!("{HANDOVER_MARKER} {n:016x}").into_bytes()),
            health_every: p.health_every,
            partial: Vec::new(),
            ops: Vec::new(),
        }
    }

    pub(super) fn run(mut self) -> ReaderEnd {
        let result = self.follow();
        let cpu = thread_cpu_time();
        let stopped = self.shared.stop.load(Ordering::SeqCst);
        {
            let mut st = self.shared.lock();
            st.stats.reader_cpu = cpu;
        }
        match result {
            Err(reason) => self.shared.set_lost(reason),
            Ok(()) if !stopped => self.shared.set_lost("the trace reader ended".into()),
            Ok(()) => self.shared.changed.notify_all(),
        }
        ReaderEnd {
            partial: self.partial.len(),
            health: self.health,
        }
    }

    fn follow(&mut self) -> Result<(), String> {
        let mut next_health = Instant::now();
        let mut idle_wakeups = 0u32;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            if self.shared.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            let wait = next_health.saturating_duration_since(Instant::now());
            let ready = self.poll(wait, true);
            drain_eventfd(&self.wake);
            self.watch.drain()?;
            #[cfg(test)]
            if self.shared.pause.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            let drained = self.drain_pipe(&mut buf)?;
            if drained.marker.is_some() || Instant::now() >= next_health {
                // After a marker: anything that changed before it is visible now.
                self.watch.drain()?;
                self.health.check()?;
                self.publish(drained.marker);
                next_health = Instant::now() + self.health_every;
            }
            // trace_pipe said readable but had nothing for us: do not spin on it.
            idle_wakeups = if ready && drained.bytes == 0 {
                idle_wakeups + 1
            } else {
                0
            };
            if idle_wakeups > 3 {
                std::thread::sleep(Duration::from_millis(5));
            }
            // Events trickling in: let them gather for one read per batch instead of
            // a wakeup per bio. A sync point's kick, the watch or stop end the wait.
            if drained.bytes > 0 && !drained.backlog && drained.marker.is_none() {
                let left = next_health.saturating_duration_since(Instant::now());
                self.poll(BATCH_WAIT.min(left), false);
            }
        }
    }

    /// Waits for the watch, a kick, and (`with_pipe`) the pipe; `true` when the pipe
    /// polled readable.
    fn poll(&self, wait: Duration, with_pipe: bool) -> bool {
        let fd = |fd: i32| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let pipe = if with_pipe { self.pipe.as_raw_fd() } else { -1 };
        let mut fds = [fd(pipe), fd(self.watch.raw_fd()), fd(self.wake.as_raw_fd())];
        let ms = i32::try_from(wait.as_millis().max(1)).unwrap_or(i32::MAX);
        // SAFETY: `fds` is a live array of three pollfd for the duration of the call;
        // poll skips the negative fd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, ms) };
        n > 0 && fds[0].revents & libc::POLLIN != 0
    }

    /// Reads what `trace_pipe` has, at most [`READS_PER_TURN`] reads so the watch and
    /// the health check keep their pace.
    fn drain_pipe(&mut self, buf: &mut [u8]) -> Result<Drained, String> {
        let mut out = Drained {
            bytes: 0,
            backlog: true,
            marker: None,
        };
        for _ in 0..READS_PER_TURN {
            match self.pipe.read(buf) {
                Ok(0) => return Err("trace_pipe reached end of file".into()),
                Ok(n) => {
                    out.bytes += n;
                    self.parse_chunk(&buf[..n])?;
                    out.marker = self.apply().max(out.marker);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    out.backlog = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("reading trace_pipe failed: {e}")),
            }
        }
        Ok(out)
    }

    /// Splits a chunk into lines (keeping an unfinished one) and turns them into ops.
    fn parse_chunk(&mut self, chunk: &[u8]) -> Result<(), String> {
        let mut rest = chunk;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let (line, tail) = rest.split_at(nl);
            rest = &tail[1..];
            if self.partial.is_empty() {
                self.line(line)?;
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                whole.extend_from_slice(line);
                self.line(&whole)?;
            }
        }
        self.partial.extend_from_slice(rest);
        if self.partial.len() > MAX_LINE {
            return Err(format!(
                "trace_pipe gave {MAX_LINE} bytes without a newline"
            ));
        }
        Ok(())
    }

    fn line(&mut self, line: &[u8]) -> Result<(), String> {
        let op = match event::parse_line(line) {
            Line::Bio {
                dev,
                op,
                sector,
                sectors,
            } => {
                if dev != self.target.event_dev {
                    return Err(format!(
                        "event for device {}:{} (the filter was changed)",
                        dev.0, dev.1
                    ));
                }
                let range = || {
                    self.target.byte_range(sector, sectors).ok_or_else(|| {
                        format!("event for sector {sector} + {sectors}, outside the device")
                    })
                };
                match op {
                    BioOp::Zone => {
                        return Err(format!("zoned-device operation at sector {sector}"))
                    }
                    BioOp::NoChange => Op::NoChange,
                    _ if sectors == 0 => Op::NoChange,
                    BioOp::Write | BioOp::Other => {
                        let (o, l) = range()?;
                        Op::Write(o, l)
                    }
                    BioOp::Discard => {
                        let (o, l) = range()?;
                        Op::Discard(o, l)
                    }
                }
            }
            Line::Marker(text) if self.handover_marker.is_some() => {
                if Some(text.trim_ascii_end()) == self.handover_marker.as_deref() {
                    self.handover_marker = None;
                } else if text.starts_with(&self.marker_prefix) {
                    return Err(concat!(
                        "the hand-over marker of the previous agent is not in the trace ",
                        "buffer: it was cleared, or the instance replaced, while no agent read it"
                    )
                    .into());
                }
                return Ok(());
            }
            Line::Marker(text) => match text.strip_prefix(self.marker_prefix.as_slice()) {
                Some(token) => {
                    let token = std::str::from_utf8(token)
                        .ok()
                        .and_then(|t| t.trim().parse().ok())
                        .ok_or_else(|| "malformed sync marker".to_string())?;
                    Op::Marker(token)
                }
                None => return Ok(()),
            },
            Line::Lost(text) => {
                return Err(format!(
                    "the kernel reported lost events: {}",
                    String::from_utf8_lossy(text).trim()
                ))
            }
            Line::Other => return Ok(()),
            Line::Malformed(text) => {
                return Err(format!(
                    "cannot parse trace line {:?}",
                    String::from_utf8_lossy(text)
                ))
            }
        };
        self.ops.push(op);
        Ok(())
    }

    /// Applies the parsed ops under one lock; returns the highest sync token among them.
    fn apply(&mut self) -> Option<u64> {
        if self.ops.is_empty() {
            return None;
        }
        let mut marker = None;
        let mut st = self.shared.lock();
        let st = &mut *st;
        for op in self.ops.drain(..) {
            match op {
                Op::Write(o, l) => {
                    st.dirty.write(o, l);
                    st.stats.events += 1;
                    st.stats.write_events += 1;
                    st.stats.bytes_written += l;
                }
                Op::Discard(o, l) => {
                    st.dirty.discard(o, l);
                    st.stats.events += 1;
                    st.stats.discard_events += 1;
                    st.stats.bytes_discarded += l;
                }
                Op::NoChange => st.stats.events += 1,
                Op::Marker(t) => {
                    st.stats.markers += 1;
                    marker = marker.max(Some(t));
                }
            }
        }
        marker
    }

    /// Publishes a sync token (after the health check passed) and the CPU time.
    fn publish(&self, marker: Option<u64>) {
        let cpu = thread_cpu_time();
        let mut st = self.shared.lock();
        st.stats.reader_cpu = cpu;
        if let Some(t) = marker {
            st.marker_seen = st.marker_seen.max(t);
        }
        drop(st);
        if marker.is_some() {
            self.shared.changed.notify_all();
        }
    }
}
