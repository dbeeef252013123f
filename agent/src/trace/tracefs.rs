//! The kernel side of the tracer: finding (or mounting) tracefs, naming the block
//! device as the `block_bio_queue` event sees it, the trace instance (its name, its
//! removal, its hand-over to the next agent), the per-cpu ring-buffer statistics, and
//! an inotify watch that notices anyone else touching the instance.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::TraceError;

/// Where tracefs is mounted when nobody has mounted it yet.
pub(crate) const DEFAULT_TRACEFS: &str = "/sys/kernel/tracing";

/// The event this tracer enables, relative to an instance.
pub(crate) const EVENT_DIR: &str = "events/block/block_bio_queue";

/// Prefix of our instance names: `boomerang-<major>-<minor>` (one per device, so the
/// next agent finds an instance handed over to it; agents before the hand-over named
/// theirs `boomerang-<pid>-<major>-<minor>`).
pub(crate) const INSTANCE_PREFIX: &str = "boomerang-";

/// The name of the instance tracing `target`: `boomerang-<major>-<minor>`.
pub(crate) fn instance_name(target: &DeviceTarget) -> String {
    format!("{INSTANCE_PREFIX}{}-{}", target.major, target.minor)
}

/// Maps an io error on `path` to [`TraceError::Io`].
pub(crate) fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> TraceError + 'a {
    move |source| TraceError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `value` to a tracefs control file in one write call, as the kernel wants.
pub(crate) fn write_ctl(path: &Path, value: &str) -> Result<(), TraceError> {
    let mut f = File::options()
        .write(true)
        .open(path)
        .map_err(io_err("open", path))?;
    f.write_all(value.as_bytes()).map_err(io_err("write", path))
}

/// Reads a tracefs control file (trailing whitespace trimmed).
pub(crate) fn read_ctl(path: &Path) -> Result<String, TraceError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end().to_string())
        .map_err(io_err("read", path))
}

/// Reads a control file held open, from offset 0 (tracefs regenerates it per read).
pub(crate) fn pread_ctl(f: &File, buf: &mut Vec<u8>) -> io::Result<usize> {
    buf.resize(4096, 0);
    let n = f.read_at(buf, 0)?;
    buf.truncate(n);
    Ok(n)
}

/// The tracefs mount point: `explicit`, else an existing tracefs mount (the usual
/// place first), else tracefs mounted at [`DEFAULT_TRACEFS`] now. A mount of ours is
/// left in place (never unmounted, so nobody else's is either): other tracers, of
/// this agent or anyone, may use it by then, and it costs nothing.
pub(crate) fn find_or_mount(explicit: Option<&Path>) -> Result<PathBuf, TraceError> {
    if let Some(p) = explicit {
        if p.join("instances").is_dir() {
            return Ok(p.to_path_buf());
        }
        return Err(TraceError::Tracefs(format!(
            "{} is not a tracefs mount (no instances/ directory)",
            p.display()
        )));
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err("read", Path::new("/proc/self/mountinfo")))?;
    let mut mounts = tracefs_mounts(&mountinfo);
    mounts.sort_by_key(|m| m != Path::new(DEFAULT_TRACEFS));
    if let Some(m) = mounts.into_iter().find(|m| m.join("instances").is_dir()) {
        return Ok(m);
    }
    let target = Path::new(DEFAULT_TRACEFS);
    if !target.is_dir() {
        return Err(TraceError::Tracefs(format!(
            "tracefs is not mounted and {DEFAULT_TRACEFS} does not exist (kernel without CONFIG_TRACING?)"
        )));
    }
    let c = |s: &[u8]| CString::new(s).map_err(|e| TraceError::Tracefs(e.to_string()));
    let (src, dst, fstype) = (
        c(b"nodev")?,
        c(target.as_os_str().as_bytes())?,
        c(b"tracefs")?,
    );
    // SAFETY: all pointers are valid NUL-terminated strings for the call; data is null.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(TraceError::Tracefs(format!(
            "cannot mount tracefs at {DEFAULT_TRACEFS}: {e} (are we root?)"
        )));
    }
    info!(mount = DEFAULT_TRACEFS, "mounted tracefs");
    Ok(target.to_path_buf())
}

/// The tracefs mount point (`explicit`, else a mounted one), never mounting it.
pub(crate) fn find_mounted(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return p.join("instances").is_dir().then(|| p.to_path_buf());
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    tracefs_mounts(&mountinfo)
        .into_iter()
        .find(|m| m.join("instances").is_dir())
}

/// Mount points of tracefs in a `/proc/self/mountinfo` text.
pub(crate) fn tracefs_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split(' ').next()? == "tracefs")
                .then(|| left.split(' ').nth(4).map(unescape_mount))
                .flatten()
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape_mount(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], oct) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
}

/// The protected block device as the `block_bio_queue` event reports it. Public (with
/// [`DeviceTarget::byte_range`]) for the `tracefs_line` fuzz target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTarget {
    /// Major and minor of the device given.
    pub major: u32,
    /// See `major`.
    pub minor: u32,
    /// Major and minor the event carries: the whole disk's (a partition's bios are
    /// remapped to the disk before the event fires).
    pub event_dev: (u32, u32),
    /// For a partition: its first sector and sector count on the disk.
    pub partition: Option<(u64, u64)>,
}

/// The kernel's internal dev_t, as the event's `dev` field holds it: MKDEV(major,
/// minor) = major << 20 | minor (include/linux/kdev_t.h, MINORBITS = 20).
pub(crate) fn kernel_dev(major: u32, minor: u32) -> u64 {
    (u64::from(major) << 20) | u64::from(minor)
}

impl DeviceTarget {
    /// Stats `device` (must be a block device) and reads its sysfs entry.
    pub(crate) fn of(device: &Path) -> Result<Self, TraceError> {
        let bad = |reason: String| TraceError::Device {
            path: device.to_path_buf(),
            reason,
        };
        let meta = std::fs::metadata(device).map_err(io_err("stat", device))?;
        if !meta.file_type().is_block_device() {
            return Err(bad(
                "not a block device: the trace source follows block devices only".into(),
            ));
        }
        let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
        let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        let sys = sys
            .canonicalize()
            .map_err(|e| bad(format!("no sysfs entry {}: {e}", sys.display())))?;
        let num = |p: PathBuf| -> Result<u64, TraceError> {
            read_ctl(&p)?
                .parse()
                .map_err(|e| bad(format!("{}: {e}", p.display())))
        };
        let (disk_sys, event_dev, partition) = if sys.join("partition").exists() {
            let disk = sys
                .parent()
                .ok_or_else(|| bad("partition without a parent disk in sysfs".into()))?
                .to_path_buf();
            let dev = read_ctl(&disk.join("dev"))?;
            let parsed = dev
                .split_once(':')
                .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
                .ok_or_else(|| bad(format!("disk dev {dev:?} not major:minor")))?;
            let range = (num(sys.join("start"))?, num(sys.join("size"))?);
            (disk, parsed, Some(range))
        } else {
            (sys.clone(), (major, minor), None)
        };
        let zoned = read_ctl(&disk_sys.join("queue/zoned")).unwrap_or_else(|_| "none".into());
        if zoned != "none" {
            return Err(bad(format!(
                "zoned device ({zoned}): zone append and zone reset cannot be tracked"
            )));
        }
        let holders: Vec<String> = std::fs::read_dir(sys.join("holders"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        if let Some(h) = holders.iter().find(|h| !h.starts_with("dm-")) {
            return Err(bad(format!(
                "held by {h}: a stacked driver other than device-mapper may remap its \
                 bios to this device without a block_bio_queue event for it; protect the \
                 device on top instead"
            )));
        }
        Ok(DeviceTarget {
            major,
            minor,
            event_dev,
            partition,
        })
    }

    /// The event filter that selects this device's bios.
    pub(crate) fn filter(&self) -> String {
        let dev = kernel_dev(self.event_dev.0, self.event_dev.1);
        match self.partition {
            None => format!("dev == {dev}"),
            Some((start, size)) => format!(
                "dev == {dev} && sector >= {start} && sector < {}",
                start.saturating_add(size)
            ),
        }
    }

    /// Byte range `(offset, len)` on the device of an event's sectors, `None` when it
    /// lies outside the device (the filter was changed under us) or its end is past
    /// the last byte offset a `u64` holds.
    pub fn byte_range(&self, sector: u64, sectors: u32) -> Option<(u64, u64)> {
        let sector = match self.partition {
            None => sector,
            Some((start, size)) => {
                let rel = sector.checked_sub(start)?;
                (rel < size).then_some(rel)?
            }
        };
        let offset = sector.checked_mul(512)?;
        let len = u64::from(sectors) * 512;
        // The end must be a byte offset too: the dirty set would otherwise clamp it.
        offset.checked_add(len)?;
        Some((offset, len))
    }
}

/// Loss counters of one cpu's ring buffer (`per_cpu/cpuN/stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CpuStats {
    /// `overrun:` events overwritten before anyone read them.
    pub overrun: u64,
    /// `commit overrun:` events lost while the buffer was being written.
    pub commit_overrun: u64,
    /// `dropped events:` events refused because the buffer was full (overwrite off).
    pub dropped: u64,
}

/// Parses a `stats` file; `None` when the loss counters are missing.
pub(crate) fn parse_stats(text: &str) -> Option<CpuStats> {
    let mut s = CpuStats::default();
    let mut seen_overrun = false;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let Ok(v) = value.trim().parse::<u64>() else {
            continue;
        };
        match key.trim() {
            "overrun" => {
                s.overrun = v;
                seen_overrun = true;
            }
            "commit overrun" => s.commit_overrun = v,
            "dropped events" => s.dropped = v,
            _ => {}
        }
    }
    seen_overrun.then_some(s)
}

/// Our trace instance; removed (event disabled, directory removed) on drop.
#[derive(Debug)]
pub(crate) struct Instance {
    dir: PathBuf,
    removed: bool,
}

impl Instance {
    /// Creates `instances/<name>`. An instance of that name that nobody holds open (an
    /// agent killed while tracing left it, or a clean stop handed it over and this
    /// start does not adopt it) is removed first; one held open is another live tracer
    /// of the device: [`TraceError::AlreadyTracing`].
    pub(crate) fn create(tracefs: &Path, name: &str) -> Result<Self, TraceError> {
        let dir = tracefs.join("instances").join(name);
        let mut replaced = false;
        loop {
            match std::fs::create_dir(&dir) {
                Ok(()) => {
                    return Ok(Instance {
                        dir,
                        removed: false,
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && !replaced => {
                    match remove_unused_instance(&dir) {
                        Ok(()) => {
                            warn!(instance = %dir.display(), "removed a trace instance nobody held (left by an agent killed while tracing, or handed over and not adopted)");
                            replaced = true;
                        }
                        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                            return Err(TraceError::AlreadyTracing(dir))
                        }
                        Err(e) => return Err(io_err("remove the unused trace instance", &dir)(e)),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(TraceError::AlreadyTracing(dir))
                }
                Err(e) => return Err(io_err("create trace instance", &dir)(e)),
            }
        }
    }

    /// Takes over an existing instance (handed over by a clean stop); removed on drop
    /// like one this process created.
    pub(crate) fn adopt(dir: PathBuf) -> Self {
        Instance {
            dir,
            removed: false,
        }
    }

    /// Lets the instance live on after this process (hand-over): never removed.
    pub(crate) fn keep(mut self) {
        self.removed = true;
    }

    /// The instance directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Disables the event and removes the instance. Files of the instance that are
    /// still open make the kernel refuse (EBUSY): retried for up to two seconds.
    pub(crate) fn remove(mut self) -> Result<(), TraceError> {
        self.removed = true;
        remove_instance(&self.dir)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if !self.removed {
            if let Err(e) = remove_instance(&self.dir) {
                warn!(error = %e, "trace instance left behind; remove it with rmdir");
            }
        }
    }
}

/// Removes an instance that should be unused with a bare rmdir: the kernel refuses
/// (EBUSY) while a file of the instance is open, so a live tracer is never disturbed,
/// and it disables the events of an unused one itself. EBUSY is retried for half a
/// second: a process forked meanwhile holds copies of its parent's files until it
/// execs (close-on-exec), which may briefly pin an instance nobody uses.
pub(crate) fn remove_unused_instance(dir: &Path) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_millis(500);
    loop {
        match std::fs::remove_dir(dir) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Disables our event in `dir` and removes the instance directory.
pub(crate) fn remove_instance(dir: &Path) -> Result<(), TraceError> {
    // Stop new events first; the directory may already be gone.
    let _ = write_ctl(&dir.join(EVENT_DIR).join("enable"), "0");
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(io_err("remove trace instance", dir)(e)),
        }
    }
}

/// The pid of an instance name of the older `boomerang-<pid>-<major>-<minor>` form;
/// `None` for any other name (today's `boomerang-<major>-<minor>` included).
pub(crate) fn legacy_instance_pid(name: &str) -> Option<u32> {
    let parts: Vec<&str> = name.strip_prefix(INSTANCE_PREFIX)?.split('-').collect();
    if parts.len() != 3 || parts.iter().any(|p| p.parse::<u32>().is_err()) {
        return None;
    }
    parts[0].parse().ok()
}

/// Removes instances of the older `boomerang-<pid>-<major>-<minor>` form whose process
/// is gone (left by an agent killed before the upgrade). Today's per-device instances
/// are only ever removed by a tracer of their own device ([`Instance::create`]): one
/// may be handed over to an agent that is not running right now.
pub(crate) fn remove_stale_instances(tracefs: &Path) {
    let Ok(dir) = std::fs::read_dir(tracefs.join("instances")) else {
        return;
    };
    for entry in dir.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(legacy_instance_pid) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        // A bare rmdir: the kernel disables the instance's events itself, and an
        // instance still in use (an agent in another pid namespace) refuses with EBUSY
        // and is left alone.
        match std::fs::remove_dir(entry.path()) {
            Ok(()) => {
                warn!(instance = %entry.path().display(), "removed the trace instance of a dead agent")
            }
            Err(e) => {
                info!(instance = %entry.path().display(), error = %e, "left a trace instance of another agent alone")
            }
        }
    }
}

/// An inotify watch on the instance's directories. Any write to a control file
/// (tracing_on, buffer size, event enable/filter/trigger, set_event, options, clearing
/// `trace`), any open of a consuming pipe, and the instance's removal are reported.
#[derive(Debug)]
pub(crate) struct Watch {
    fd: OwnedFd,
    dirs: Vec<(i32, PathBuf)>,
}

const WATCH_MASK: u32 = libc::IN_MODIFY
    | libc::IN_ATTRIB
    | libc::IN_OPEN
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_UNMOUNT;

impl Watch {
    /// Watches `dirs` (absolute). Call after our own setup writes are done.
    pub(crate) fn new(dirs: &[PathBuf]) -> Result<Self, TraceError> {
        // SAFETY: plain syscall; the returned fd is checked and then owned.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(io_err("create inotify for", Path::new("trace instance"))(
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: `raw` is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut watch = Watch {
            fd,
            dirs: Vec::new(),
        };
        for d in dirs {
            let c = CString::new(d.as_os_str().as_bytes())
                .map_err(|e| TraceError::Tracefs(e.to_string()))?;
            // SAFETY: valid fd and NUL-terminated path for the duration of the call.
            let wd =
                unsafe { libc::inotify_add_watch(watch.fd.as_raw_fd(), c.as_ptr(), WATCH_MASK) };
            if wd < 0 {
                return Err(io_err("watch", d)(io::Error::last_os_error()));
            }
            watch.dirs.push((wd, d.clone()));
        }
        Ok(watch)
    }

    /// The fd to poll.
    pub(crate) fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Reads pending events; `Err(reason)` at the first one that means lost tracking.
    pub(crate) fn drain(&self) -> Result<(), String> {
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: the buffer is valid for writes of its length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(()),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(format!("reading the instance watch failed: {e}")),
                };
            }
            let n = usize::try_from(n).unwrap_or(0);
            let mut off = 0;
            while off + 16 <= n {
                let word = |i: usize| {
                    let b = &buf[off + i..off + i + 4];
                    u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
                };
                let (wd, mask, len) = (word(0) as i32, word(4), word(12) as usize);
                let name_end = (off + 16 + len).min(n);
                let raw = &buf[off + 16..name_end];
                let name = String::from_utf8_lossy(
                    &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())],
                )
                .into_owned();
                off = name_end;
                self.judge(wd, mask, &name)?;
            }
        }
    }

    fn judge(&self, wd: i32, mask: u32, name: &str) -> Result<(), String> {
        let dir = self
            .dirs
            .iter()
            .find(|(w, _)| *w == wd)
            .map_or_else(|| "?".into(), |(_, d)| d.display().to_string());
        let what = format!("{dir}/{name}");
        if mask & libc::IN_Q_OVERFLOW != 0 {
            return Err(
                "the instance watch overflowed; changes to the instance may be unseen".into(),
            );
        }
        if mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF | libc::IN_IGNORED | libc::IN_UNMOUNT)
            != 0
        {
            return Err(format!("{dir} was removed or tracefs unmounted"));
        }
        if mask & libc::IN_OPEN != 0 && matches!(name, "trace_pipe" | "trace_pipe_raw") {
            return Err(format!(
                "someone else opened {what}: a second consuming reader takes events from us"
            ));
        }
        if mask & (libc::IN_MODIFY | libc::IN_ATTRIB) != 0
            && !matches!(name, "trace_marker" | "trace_marker_raw")
        {
            return Err(format!("{what} was changed by someone else"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_dev_encoding() {
        assert_eq!(kernel_dev(7, 0), 7_340_032);
        assert_eq!(kernel_dev(7, 2), 7_340_034);
        assert_eq!(kernel_dev(259, 1), (259 << 20) | 1);
    }

    #[test]
    fn filters_and_partition_ranges() {
        let disk = DeviceTarget {
            major: 8,
            minor: 16,
            event_dev: (8, 16),
            partition: None,
        };
        assert_eq!(disk.filter(), "dev == 8388624");
        assert_eq!(disk.byte_range(8, 8), Some((4096, 4096)));
        let part = DeviceTarget {
            major: 8,
            minor: 17,
            event_dev: (8, 16),
            partition: Some((2048, 1000)),
        };
        assert_eq!(
            part.filter(),
            "dev == 8388624 && sector >= 2048 && sector < 3048"
        );
        assert_eq!(part.byte_range(2048, 8), Some((0, 4096)));
        assert_eq!(part.byte_range(2047, 8), None);
        assert_eq!(part.byte_range(3048, 8), None);
        assert_eq!(disk.byte_range(u64::MAX, 8), None);
    }

    #[test]
    fn a_range_ending_past_u64_is_outside() {
        // Found by the tracefs_line fuzz target: the start fits a u64 byte offset, the
        // end does not (it used to come back as Some and the dirty set clamped it).
        let disk = DeviceTarget {
            major: 8,
            minor: 16,
            event_dev: (8, 16),
            partition: None,
        };
        let last = u64::MAX / 512;
        assert_eq!(disk.byte_range(last, 1), None);
        assert_eq!(disk.byte_range(last, u32::MAX), None);
        assert_eq!(disk.byte_range(last, 0), Some((last * 512, 0)));
        assert_eq!(disk.byte_range(last - 8, 8), Some(((last - 8) * 512, 4096)));
    }

    #[test]
    fn stats_files() {
        let text = "entries: 77\noverrun: 136\ncommit overrun: 2\nbytes: 4620\noldest event ts:   154.000\nnow ts: 308\ndropped events: 5\nread events: 0\n";
        assert_eq!(
            parse_stats(text),
            Some(CpuStats {
                overrun: 136,
                commit_overrun: 2,
                dropped: 5
            })
        );
        assert_eq!(parse_stats("entries: 1\n"), None);
    }

    #[test]
    fn instance_names_old_and_new() {
        let t = DeviceTarget {
            major: 7,
            minor: 3,
            event_dev: (7, 3),
            partition: None,
        };
        assert_eq!(instance_name(&t), "boomerang-7-3");
        // Only the older pid-carrying form is ever swept as stale by name.
        assert_eq!(legacy_instance_pid("boomerang-4242-7-3"), Some(4242));
        assert_eq!(legacy_instance_pid("boomerang-7-3"), None);
        assert_eq!(legacy_instance_pid("boomerang-a-7-3"), None);
        assert_eq!(legacy_instance_pid("other-1-7-3"), None);
    }

    #[test]
    fn mountinfo_tracefs_lines() {
        let mi = "22 1 0:20 / /sys rw,nosuid - sysfs sysfs rw\n\
                  40 22 0:12 / /sys/kernel/tracing rw,relatime - tracefs nodev rw\n\
                  41 22 0:12 / /mnt/my\\040trace rw - tracefs tracefs rw\n";
        assert_eq!(
            tracefs_mounts(mi),
            vec![
                PathBuf::from("/sys/kernel/tracing"),
                PathBuf::from("/mnt/my trace")
            ]
        );
    }
}
