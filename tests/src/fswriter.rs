//! A file-system workload for the tests: a thread that creates files of random or
//! text content under `<mount point>/work/`, overwrites parts of them, deletes some
//! and fsyncs now and then, until stopped. Seeded, so a run can be replayed.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

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
}

/// A thread changing files under `work/` until stopped: creates files of random or
/// text content, overwrites parts of them, deletes some, fsyncs now and then.
#[derive(Debug)]
pub struct Writer {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<WriterStats>>,
}

impl Writer {
    /// Starts writing; an IO error panics the writer unless `tolerate_errors` (then
    /// it is recorded and the writer stops).
    pub fn start(mountpoint: &Path, seed: u64, tolerate_errors: bool) -> Writer {
        let dir = mountpoint.join(WORK_DIR);
        for sub in 0..4 {
            let d = dir.join(format!("d{sub}"));
            std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let stop = stop.clone();
            thread::spawn(move || write_loop(&dir, seed, &stop, tolerate_errors))
        };
        Writer {
            stop,
            handle: Some(handle),
        }
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
            let _ = h.join();
        }
    }
}

fn write_loop(dir: &Path, seed: u64, stop: &AtomicBool, tolerate_errors: bool) -> WriterStats {
    let mut rng = DataRng::new(seed);
    let mut stats = WriterStats::default();
    let mut live: Vec<(PathBuf, u64)> = Vec::new();
    let mut live_bytes = 0u64;
    let mut buf = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
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
            if tolerate_errors {
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
