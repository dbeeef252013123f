//! Freezing file systems for an app-consistent cut (FIFREEZE / FITHAW on the mount
//! point). A freeze is always undone: on drop (errors, panics), by a watchdog at the
//! deadline, and by the SIGTERM path through [`FreezeGuard::thaw`]. Mount points are
//! recorded in the agent's state before freezing, so a restart after a kill -9 thaws
//! what the killed agent left frozen.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

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
    let frozen = std::mem::take(&mut lock(inner).frozen);
    for m in frozen.iter().rev() {
        match thaw(m) {
            Ok(()) => info!(mount = %m.display(), "file system thawed"),
            Err(e) => {
                warn!(mount = %m.display(), error = %e, "thaw failed; run `fsfreeze -u` on it")
            }
        }
    }
}

impl FreezeGuard {
    /// Freezes every mount point in order; on failure thaws those already frozen.
    /// A watchdog thaws them all after `deadline`.
    pub fn freeze(mounts: &[PathBuf], deadline: Duration) -> Result<Self, String> {
        let guard = FreezeGuard {
            inner: Arc::new(Mutex::new(Inner {
                frozen: Vec::new(),
                deadline_hit: false,
            })),
        };
        for m in mounts {
            // On error `guard` drops here and thaws what is already frozen.
            ioctl(m, FIFREEZE).map_err(|e| {
                format!(
                    "cannot freeze {}: {e} (is it a mounted file system, and are we root?)",
                    m.display()
                )
            })?;
            lock(&guard.inner).frozen.push(m.clone());
            info!(mount = %m.display(), "file system frozen");
        }
        let watchdog = Arc::downgrade(&guard.inner);
        std::thread::Builder::new()
            .name("freeze-watchdog".into())
            .spawn(move || {
                std::thread::sleep(deadline);
                if let Some(inner) = watchdog.upgrade() {
                    if !lock(&inner).frozen.is_empty() {
                        error!(deadline_s = deadline.as_secs_f64(), "freeze deadline passed: thawing now, the app-consistent point is abandoned");
                        lock(&inner).deadline_hit = true;
                        thaw_all(&inner);
                    }
                }
            })
            .map_err(|e| format!("cannot start the freeze watchdog: {e}"))?;
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
