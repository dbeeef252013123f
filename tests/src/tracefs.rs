//! The kernel's tracefs as the trace-source tests need it: whether the agent can trace
//! block writes here ([`usable`], behind [`crate::Need::Tracefs`]), and a guard that
//! removes the trace instances that killed agents leave behind ([`SweepInstances`]).
//!
//! The agent makes one instance per traced device, named `boomerang-<major>-<minor>`
//! (older agents: `boomerang-<pid>-<major>-<minor>`), and removes it when it stops
//! cleanly; an agent killed by SIGKILL (by a test, or by a failing test's cleanup)
//! cannot. The kernel refuses to remove an instance whose files are open (`EBUSY`), so
//! a sweep never takes one from a running agent.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Where tracefs lives when nobody mounted it (the agent mounts it there).
pub const DEFAULT_TRACEFS: &str = "/sys/kernel/tracing";
/// Prefix of the agent's trace instances.
pub const INSTANCE_PREFIX: &str = "boomerang-";

/// The first tracefs mount with an `instances/` directory, from `/proc/self/mountinfo`.
pub fn mount_point() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .filter_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            (fs.split_whitespace().next()? == "tracefs")
                .then(|| PathBuf::from(mount.split_whitespace().nth(4).unwrap_or_default()))
        })
        .find(|p| p.join("instances").is_dir())
}

/// Whether the agent can trace block writes: a tracefs with the `block_bio_queue`
/// tracepoint where instances can be made, or none mounted yet but the directory the
/// agent mounts it on. The error says what is missing.
pub fn usable() -> Result<(), String> {
    let Some(root) = mount_point() else {
        return if Path::new(DEFAULT_TRACEFS).is_dir() {
            Ok(()) // the agent mounts it itself
        } else {
            Err(format!(
                "not mounted and {DEFAULT_TRACEFS} does not exist (kernel without CONFIG_TRACING?)"
            ))
        };
    };
    let event = root.join("events/block/block_bio_queue");
    if !event.is_dir() {
        return Err(format!(
            "{} missing (kernel without block tracepoints?)",
            event.display()
        ));
    }
    // Instances are what the agent uses: make one and remove it again.
    static PROBES: AtomicU64 = AtomicU64::new(0);
    let probe = root.join("instances").join(format!(
        "btest-probe-{}-{}",
        std::process::id(),
        PROBES.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir(&probe)
        .map_err(|e| format!("cannot create a trace instance {}: {e}", probe.display()))?;
    std::fs::remove_dir(&probe)
        .map_err(|e| format!("cannot remove the trace instance {}: {e}", probe.display()))
}

/// The trace instances of agent process `pid` (named the older way, with the pid).
pub fn instances_of(pid: u32) -> Vec<PathBuf> {
    let Some(root) = mount_point() else {
        return Vec::new();
    };
    let prefix = format!("{INSTANCE_PREFIX}{pid}-");
    std::fs::read_dir(root.join("instances"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// `(major, minor)` of a block device node (glibc's `gnu_dev_major`/`gnu_dev_minor`).
pub fn major_minor(dev: &Path) -> (u64, u64) {
    let rdev = std::fs::metadata(dev)
        .unwrap_or_else(|e| panic!("stat {}: {e}", dev.display()))
        .rdev();
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major, minor)
}

/// Removes, on drop, the trace instances that dead agents left for the given devices
/// (those in use stay: the kernel refuses). Declare it before the agents so that it
/// drops after them, and after the loop devices so that it drops before they are
/// detached (another test may get the same device numbers then).
#[derive(Debug, Default)]
pub struct SweepInstances {
    devices: Vec<(u64, u64)>,
}

impl SweepInstances {
    /// A sweeper for no device yet.
    pub fn new() -> SweepInstances {
        SweepInstances::default()
    }

    /// A sweeper for `dev`.
    pub fn for_device(dev: &Path) -> SweepInstances {
        let mut s = SweepInstances::new();
        s.add(dev);
        s
    }

    /// Sweeps `dev`'s instances too.
    pub fn add(&mut self, dev: &Path) {
        self.devices.push(major_minor(dev));
    }

    /// Removes the left-over instances of these devices now; returns how many.
    pub fn sweep(&self) -> usize {
        let Some(root) = mount_point() else { return 0 };
        let Ok(dir) = std::fs::read_dir(root.join("instances")) else {
            return 0;
        };
        let mut removed = 0;
        for entry in dir.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(INSTANCE_PREFIX) else {
                continue;
            };
            let ours = self.devices.iter().any(|(major, minor)| {
                let device = format!("{major}-{minor}");
                // Today's per-device name, or the older one of an agent that is gone.
                rest == device
                    || rest.strip_suffix(&format!("-{device}")).is_some_and(|pid| {
                        pid.bytes().all(|b| b.is_ascii_digit())
                            && !Path::new("/proc").join(pid).exists()
                    })
            });
            if ours && std::fs::remove_dir(entry.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }
}

impl Drop for SweepInstances {
    fn drop(&mut self) {
        self.sweep();
    }
}
