//! A file-system workload for the tests: a thread that creates files of random or
//! text content under `<mount point>/work/`, overwrites parts of them, deletes some
//! and fsyncs now and then, until stopped; it can be held between two operations
//! ([`WriterPause`]) and run `fstrim` once. Seeded, so a run can be replayed.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::privileged::find_tool;
use crate::process::run;
use crate::rng::{fill_text, DataRng};

/// Where the writer works, under the mount point.
pub const WORK_DIR: &str = "work";
/// Live bytes the writer keeps at most (fits the smallest file system it is used on).
const WRITER_LIVE_LIMIT: u64 = 48 << 20;

/// What the writer did.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub created: u64,
    pub overwritten: u64,
    pub deleted: u64,
    pub fsyncs: u64,
    pub bytes: u64,
    /// The first error, when errors are tolerated (the writer stops there).
    pub error: Option<String>,
    /// `fstrim` outcome, when it was run.
    pub trim: Option<String>,
}

/// How a [`Writer`] runs, beyond its seed.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriterOptions {
    /// Record the first IO error and stop, instead of panicking.
    pub tolerate_errors: bool,
    /// Run `fstrim` once this long after the start (discards must ship as zeros).
    pub trim_after: Option<Duration>,
}

/// Holds a [`Writer`] between two operations: `wanted` asks, `holding` answers once
/// the writer has finished its operation (and its fsync) and waits.
#[derive(Debug, Default)]
pub struct WriterPause {
    wanted: AtomicBool,
    holding: AtomicBool,
}

impl WriterPause {
    /// Asks the writer to pause and waits until it does; false if it did not within
    /// `timeout`.
    pub fn hold(&self, timeout: Duration) -> bool {
        self.wanted.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + timeout;
        while !self.holding.load(Ordering::SeqCst) {
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_micros(200));
        }
        true
    }

    /// Lets the writer go on.
    pub fn release(&self) {
        self.wanted.store(false, Ordering::SeqCst);
    }

    /// The writer's side: waits here while a pause is wanted.
    fn wait_if_wanted(&self, stop: &AtomicBool) {
        while self.wanted.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
            self.holding.store(true, Ordering::SeqCst);
            thread::sleep(Duration::from_micros(200));
        }
        self.holding.store(false, Ordering::SeqCst);
    }
}

/// A thread changing files under `work/` until stopped: creates files of random or
/// text content, overwrites parts of them, deletes some, fsyncs now and then.
#[derive(Debug)]
pub struct Writer {
    mountpoint: PathBuf,
    stop: Arc<AtomicBool>,
    pause: Arc<WriterPause>,
    handle: Option<thread::JoinHandle<WriterStats>>,
}

impl Writer {
    /// Starts writing; an IO error panics the writer unless `tolerate_errors` (then
    /// it is recorded and the writer stops).
    pub fn start(mountpoint: &Path, seed: u64, tolerate_errors: bool) -> Writer {
        let opts = WriterOptions {
            tolerate_errors,
            ..WriterOptions::default()
        };
        Writer::start_with(mountpoint, seed, opts)
    }

    /// Starts writing as `opts` says.
    pub fn start_with(mountpoint: &Path, seed: u64, opts: WriterOptions) -> Writer {
        let dir = mountpoint.join(WORK_DIR);
        for sub in 0..4 {
            let d = dir.join(format!("d{sub}"));
            std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(WriterPause::default());
        let handle = {
            let (stop, pause) = (stop.clone(), pause.clone());
            let mountpoint = mountpoint.to_path_buf();
            thread::spawn(move || write_loop(&mountpoint, &dir, seed, opts, &stop, &pause))
        };
        Writer {
            mountpoint: mountpoint.to_path_buf(),
            stop,
            pause,
            handle: Some(handle),
        }
    }

    /// The writer's pause control, for another thread.
    pub fn pause_control(&self) -> Arc<WriterPause> {
        self.pause.clone()
    }

    pub fn is_running(&self) -> bool {
        self.handle.as_ref().is_some_and(|h| !h.is_finished())
    }

    /// Stops the writer and returns what it did (re-raising its panic).
    pub fn finish(mut self) -> WriterStats {
        self.stop.store(true, Ordering::SeqCst);
        let handle = self.handle.take().expect("the writer runs until finished");
        match handle.join() {
            Ok(stats) => stats,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            // A panicking test may have left the file system frozen under the writer.
            thaw_if_frozen(&self.mountpoint);
            let _ = h.join();
        }
    }
}

/// `fsfreeze -u MOUNTPOINT`: whether it thawed something (false when not frozen).
pub fn thaw_if_frozen(mountpoint: &Path) -> bool {
    let tool = find_tool("fsfreeze").unwrap_or_else(|| PathBuf::from("fsfreeze"));
    Command::new(tool)
        .arg("-u")
        .arg(mountpoint)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `fstrim -v MOUNTPOINT`: its output, or why it did not work (a loop device without
/// discard support is not an error of the agent).
pub fn fstrim(mountpoint: &Path) -> String {
    let Some(tool) = find_tool("fstrim") else {
        return "fstrim not installed".to_string();
    };
    let mut cmd = Command::new(tool);
    cmd.arg("-v").arg(mountpoint);
    let out = run(&mut cmd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    if out.status.success() {
        text
    } else {
        format!("fstrim failed ({}): {text}", out.status)
    }
}

fn write_loop(
    mountpoint: &Path,
    dir: &Path,
    seed: u64,
    opts: WriterOptions,
    stop: &AtomicBool,
    pause: &WriterPause,
) -> WriterStats {
    let mut rng = DataRng::new(seed);
    let mut stats = WriterStats::default();
    let mut live: Vec<(PathBuf, u64)> = Vec::new();
    let mut live_bytes = 0u64;
    let mut buf = Vec::new();
    let started = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        pause.wait_if_wanted(stop);
        if stats.trim.is_none() && opts.trim_after.is_some_and(|t| started.elapsed() >= t) {
            stats.trim = Some(fstrim(mountpoint));
        }
        let result = write_step(
            dir,
            &mut rng,
            &mut stats,
            &mut live,
            &mut live_bytes,
            &mut buf,
            &mut n,
        );
        if let Err(e) = result {
            if opts.tolerate_errors {
                stats.error = Some(e);
                break;
            }
            panic!("writer: {e}");
        }
        thread::sleep(Duration::from_millis(rng.between(2, 8)));
    }
    stats
}

fn write_step(
    dir: &Path,
    rng: &mut DataRng,
    stats: &mut WriterStats,
    live: &mut Vec<(PathBuf, u64)>,
    live_bytes: &mut u64,
    buf: &mut Vec<u8>,
    n: &mut u64,
) -> Result<(), String> {
    let op = rng.below(10);
    let fsync = rng.below(3) == 0;
    if live.len() < 4 || (op < 5 && *live_bytes < WRITER_LIVE_LIMIT) {
        let len = rng.between(4 << 10, 384 << 10);
        buf.resize(usize::try_from(len).expect("under 384 KiB"), 0);
        let text = rng.below(2) == 0;
        if text {
            fill_text(rng, buf);
        } else {
            rng.fill(buf);
        }
        let path = dir
            .join(format!("d{}", *n % 4))
            .join(format!("f{n:05}.{}", if text { "txt" } else { "bin" }));
        *n += 1;
        let mut f = File::create(&path).map_err(|e| format!("create {}: {e}", path.display()))?;
        f.write_all(buf)
            .map_err(|e| format!("write {}: {e}", path.display()))?;
        if fsync {
            f.sync_all()
                .map_err(|e| format!("fsync {}: {e}", path.display()))?;
            stats.fsyncs += 1;
        }
        live.push((path, len));
        *live_bytes += len;
        stats.created += 1;
        stats.bytes += len;
    } else if op < 8 {
        let i = usize::try_from(rng.below(live.len() as u64)).expect("index fits");
        let (path, len) = &mut live[i];
        let at = rng.below(*len);
        let wlen = rng.between(512, 64 << 10);
        buf.resize(usize::try_from(wlen).expect("under 64 KiB"), 0);
        rng.fill(buf);
        let f = OpenOptions::new()
            .write(true)
            .open(&*path)
            .map_err(|e| format!("open {}: {e}", path.display()))?;
        f.write_all_at(buf, at)
            .map_err(|e| format!("overwrite {}: {e}", path.display()))?;
        if fsync {
            f.sync_data()
                .map_err(|e| format!("fdatasync {}: {e}", path.display()))?;
            stats.fsyncs += 1;
        }
        let end = at + wlen;
        if end > *len {
            *live_bytes += end - *len;
            *len = end;
        }
        stats.overwritten += 1;
        stats.bytes += wlen;
    } else {
        let i = usize::try_from(rng.below(live.len() as u64)).expect("index fits");
        let (path, len) = live.swap_remove(i);
        std::fs::remove_file(&path).map_err(|e| format!("delete {}: {e}", path.display()))?;
        *live_bytes -= len;
        stats.deleted += 1;
    }
    Ok(())
}
