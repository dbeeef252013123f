//! Freezing file systems for an app-consistent cut (FIFREEZE / FITHAW on the mount
//! point). A freeze is always undone: on drop (errors, panics), by a watchdog at the
//! deadline, and by the SIGTERM path through [`FreezeGuard::thaw`]. Mount points are
//! recorded in the agent's state before freezing, so a restart after a kill -9 thaws
//! what the killed agent left frozen.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

// From <linux/fs.h>: _IOWR('X', 119, int) and _IOWR('X', 120, int).
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

fn ioctl(path: &Path, request: libc::c_ulong) -> std::io::Result<()> {
    let f = File::open(path)?;
    // SAFETY: FIFREEZE/FITHAW take no argument pointer; the fd is valid for the call.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), request, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Thaws `path`, ignoring "not frozen" (EINVAL).
pub fn thaw(path: &Path) -> std::io::Result<()> {
    match ioctl(path, FITHAW) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        other => other,
    }
}

#[derive(Debug)]
struct Inner {
    frozen: Vec<PathBuf>,
    deadline_hit: bool,
    /// The operator's thaw hook, still to run (its freeze hook ran).
    thaw_hook: Option<String>,
}

/// The operator's application quiesce commands, run with `sh -c` around the file
/// system freeze of an app-consistent point: `freeze` before (a non-zero exit
/// abandons the point), `thaw` after, always, once `freeze` was run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hooks {
    /// Run before freezing.
    pub freeze: Option<String>,
    /// Run after thawing.
    pub thaw: Option<String>,
}

/// Runs `command` with `sh -c` in its own process group, killing the group after
/// `timeout`. Its stdout and stderr are logged line by line (never mixed into the
/// agent's own stdout, which carries reports). Every operator hook runs through here:
/// freeze, thaw and shutdown.
pub(crate) fn run_hook(what: &str, command: &str, timeout: Duration) -> Result<(), String> {
    use std::os::unix::process::CommandExt as _;
    use std::process::Stdio;
    // Its own process group, so a timeout kills whatever the hook started too.
    let mut child = std::process::Command::new("sh")
        .args(["-c", command])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run the {what} hook `{command}`: {e}"))?;
    let mut loggers = Vec::new();
    if let Some(out) = child.stdout.take() {
        loggers.push(log_lines(what, "stdout", out));
    }
    if let Some(err) = child.stderr.take() {
        loggers.push(log_lines(what, "stderr", err));
    }
    let deadline = std::time::Instant::now() + timeout;
    let result = loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break Ok(()),
            Ok(Some(status)) => break Err(format!("the {what} hook `{command}` failed: {status}")),
            Ok(None) if std::time::Instant::now() >= deadline => {
                if let Ok(pid) = i32::try_from(child.id()) {
                    // SAFETY: signals the process group we created for the hook.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                }
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!(
                    "the {what} hook `{command}` ran past {timeout:?} and was killed"
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => break Err(format!("waiting for the {what} hook `{command}`: {e}")),
        }
    };
    // Let the last lines reach the log; a process the hook left running in the
    // background may keep the pipes open, so do not wait for it.
    let until = std::time::Instant::now() + Duration::from_millis(500);
    while loggers
        .iter()
        .any(|l| l.as_ref().is_some_and(|t| !t.is_finished()))
        && std::time::Instant::now() < until
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    result
}

/// Logs what a hook writes to `stream`, one line (at most 4 KiB) per event, on a
/// thread of its own; `None` when no thread could be started (the output is lost).
fn log_lines(
    what: &str,
    stream: &'static str,
    pipe: impl std::io::Read + Send + 'static,
) -> Option<std::thread::JoinHandle<()>> {
    use std::io::{BufRead as _, Read as _};
    let hook = what.to_string();
    std::thread::Builder::new()
        .name(format!("{what}-hook-{stream}"))
        .spawn(move || {
            let mut reader = std::io::BufReader::new(pipe);
            let mut line = Vec::new();
            loop {
                line.clear();
                match (&mut reader).take(4096).read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line);
                        info!(%hook, stream, "hook: {}", text.trim_end());
                    }
                }
            }
        })
        .inspect_err(|e| warn!(hook = %what, error = %e, "cannot log the hook's output"))
        .ok()
}

/// File systems frozen now; thawed when dropped.
#[derive(Debug)]
pub struct FreezeGuard {
    inner: Arc<Mutex<Inner>>,
}

/// A weak handle that can thaw a guard's file systems from elsewhere (watchdog,
/// signal handler) without keeping them frozen.
#[derive(Debug, Clone)]
pub struct ThawHandle {
    inner: Weak<Mutex<Inner>>,
}

impl ThawHandle {
    /// Thaws whatever the guard still holds frozen; no-op once the guard is gone.
    pub fn thaw(&self) {
        if let Some(inner) = self.inner.upgrade() {
            thaw_all(&inner);
        }
    }
}

fn lock(inner: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    inner
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn thaw_all(inner: &Mutex<Inner>) {
    let (frozen, hook) = {
        let mut g = lock(inner);
        (std::mem::take(&mut g.frozen), g.thaw_hook.take())
    };
    for m in frozen.iter().rev() {
        match thaw(m) {
            Ok(()) => info!(mount = %m.display(), "file system thawed"),
            Err(e) => {
                warn!(mount = %m.display(), error = %e, "thaw failed; run `fsfreeze -u` on it")
            }
        }
    }
    if let Some(hook) = hook {
        if let Err(e) = run_hook("thaw", &hook, Duration::from_secs(30)) {
            warn!(error = %e, "the applications may still be quiesced");
        }
    }
}

/// Starts the thread that thaws whatever `inner` still holds once `deadline` has
/// passed (the guard may be gone by then: nothing to do).
fn start_watchdog(inner: &Arc<Mutex<Inner>>, deadline: Duration) -> Result<(), String> {
    let watchdog = Arc::downgrade(inner);
    std::thread::Builder::new()
        .name("freeze-watchdog".into())
        .spawn(move || {
            std::thread::sleep(deadline);
            if let Some(inner) = watchdog.upgrade() {
                let held = {
                    let mut g = lock(&inner);
                    let held = !g.frozen.is_empty() || g.thaw_hook.is_some();
                    // Under the lock the freeze loop checks: a mount that finishes
                    // freezing after this is thawed by the loop itself.
                    g.deadline_hit |= held;
                    held
                };
                if held {
                    error!(deadline_s = deadline.as_secs_f64(), "freeze deadline passed: thawing now, the app-consistent point is abandoned");
                    thaw_all(&inner);
                }
            }
        })
        .map(drop)
        .map_err(|e| format!("cannot start the freeze watchdog: {e}"))
}

impl FreezeGuard {
    /// Freezes every mount point in order; on failure thaws those already frozen.
    /// A watchdog thaws them all once `deadline` has passed since the first freeze.
    pub fn freeze(mounts: &[PathBuf], deadline: Duration) -> Result<Self, String> {
        Self::freeze_with_hooks(mounts, &Hooks::default(), deadline)
    }

    /// Like [`FreezeGuard::freeze`], with the operator's quiesce hooks around it: the
    /// freeze hook runs first (within the deadline), the thaw hook after the thaw.
    pub fn freeze_with_hooks(
        mounts: &[PathBuf],
        hooks: &Hooks,
        deadline: Duration,
    ) -> Result<Self, String> {
        let guard = FreezeGuard {
            inner: Arc::new(Mutex::new(Inner {
                frozen: Vec::new(),
                deadline_hit: false,
                thaw_hook: None,
            })),
        };
        // The deadline counts from the first freeze (the hook's or the first mount's):
        // a slow hook or a slow mount must not keep what is already frozen past it.
        let until = Instant::now() + deadline;
        start_watchdog(&guard.inner, deadline)?;
        if let Some(hook) = &hooks.freeze {
            // The thaw hook undoes whatever part of the freeze hook ran, also when it
            // failed: it runs when `guard` drops.
            lock(&guard.inner).thaw_hook.clone_from(&hooks.thaw);
            run_hook("freeze", hook, deadline)?;
            info!(hook = %hook, "applications quiesced");
        }
        let past = |m: &Path| {
            format!(
                "the freeze deadline of {deadline:?} passed while freezing {}: everything is thawed, the point is abandoned",
                m.display()
            )
        };
        for m in mounts {
            if Instant::now() >= until {
                return Err(past(m));
            }
            // On error `guard` drops here and thaws what is already frozen.
            ioctl(m, FIFREEZE).map_err(|e| {
                format!(
                    "cannot freeze {}: {e} (is it a mounted file system, and are we root?)",
                    m.display()
                )
            })?;
            let mut g = lock(&guard.inner);
            if g.deadline_hit || Instant::now() >= until {
                // The watchdog thawed the others while this one froze: undo it too.
                drop(g);
                if let Err(e) = thaw(m) {
                    warn!(mount = %m.display(), error = %e, "thaw failed; run `fsfreeze -u` on it");
                }
                return Err(past(m));
            }
            g.frozen.push(m.clone());
            drop(g);
            info!(mount = %m.display(), "file system frozen");
        }
        Ok(guard)
    }

    /// A handle for the signal path.
    pub fn handle(&self) -> ThawHandle {
        ThawHandle {
            inner: Arc::downgrade(&self.inner),
        }
    }

    /// Thaws everything still frozen (idempotent).
    pub fn thaw(&self) {
        thaw_all(&self.inner);
    }

    /// Whether the watchdog had to thaw (the cut is not app-consistent then).
    pub fn deadline_hit(&self) -> bool {
        lock(&self.inner).deadline_hit
    }
}

impl Drop for FreezeGuard {
    fn drop(&mut self) {
        thaw_all(&self.inner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_run_around_the_pause_and_a_failed_freeze_hook_still_thaws() -> Result<(), String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let log = dir.path().join("log");
        let hooks = Hooks {
            freeze: Some(format!("echo freeze >> {}", log.display())),
            thaw: Some(format!("echo thaw >> {}", log.display())),
        };
        let guard = FreezeGuard::freeze_with_hooks(&[], &hooks, Duration::from_secs(5))?;
        guard.thaw();
        drop(guard);
        assert_eq!(
            std::fs::read_to_string(&log).map_err(|e| e.to_string())?,
            "freeze\nthaw\n"
        );

        let failing = Hooks {
            freeze: Some(format!("echo half >> {}; exit 3", log.display())),
            thaw: hooks.thaw.clone(),
        };
        let err = FreezeGuard::freeze_with_hooks(&[], &failing, Duration::from_secs(5))
            .expect_err("must fail");
        assert!(err.contains("failed"), "{err}");
        assert_eq!(
            std::fs::read_to_string(&log).map_err(|e| e.to_string())?,
            "freeze\nthaw\nhalf\nthaw\n",
            "a failed freeze hook is undone by the thaw hook"
        );
        Ok(())
    }

    /// The deadline counts from the start of the freeze, the hook's time included: a
    /// freeze hook that took most of it leaves only the rest before the thaw.
    #[test]
    fn the_deadline_counts_from_the_first_freeze() -> Result<(), String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let log = dir.path().join("thawed");
        let hooks = Hooks {
            freeze: Some("sleep 1.5".into()),
            thaw: Some(format!("touch {}", log.display())),
        };
        let started = std::time::Instant::now();
        let guard = FreezeGuard::freeze_with_hooks(&[], &hooks, Duration::from_secs(2))?;
        // Held, not thawed by us: the watchdog must thaw 2 s after the start, not 2 s
        // after the hook returned (3.5 s).
        while !log.exists() && started.elapsed() < Duration::from_secs(6) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let at = started.elapsed();
        assert!(log.exists(), "the watchdog never thawed");
        assert!(guard.deadline_hit());
        assert!(
            at < Duration::from_millis(3000),
            "thawed {at:?} after the start, past the 2 s deadline"
        );
        drop(guard);
        Ok(())
    }

    #[test]
    fn a_hook_past_the_deadline_is_killed() {
        let hooks = Hooks {
            freeze: Some("sleep 5".into()),
            thaw: None,
        };
        let started = std::time::Instant::now();
        let err = FreezeGuard::freeze_with_hooks(&[], &hooks, Duration::from_millis(200))
            .expect_err("must time out");
        assert!(err.contains("killed"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}
