//! Gating of tests that need privileges or system tools.
//!
//! A test calls [`require_privileged`] first and returns early when it says `false`.
//! Missing prerequisites are never passed over silently: the test prints
//! `SKIPPED <test>: <reason>` (also past libtest's output capture), and when
//! `BOOMERANG_PRIVILEGED_TESTS=1` is set (a runner that is meant to run them) the test
//! panics instead, naming what is missing.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Set to `1` to turn a skipped privileged test into a failure.
pub const PRIVILEGED_ENV: &str = "BOOMERANG_PRIVILEGED_TESTS";

/// Directories searched for system tools besides `PATH` (a non-login root shell often
/// lacks the sbin directories).
const SBIN_DIRS: &[&str] = &["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// A prerequisite of a privileged test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Effective uid 0.
    Root,
    /// Attachable loop devices: root, `losetup`, `/dev/loop-control` (after trying
    /// `modprobe loop`) and a free device.
    LoopDevices,
    /// `mkfs.ext4` and `e2fsck`.
    Ext4Tools,
    /// `fsfreeze`, and root to use it.
    Fsfreeze,
    /// A tracefs the agent's trace source can use (see [`crate::tracefs::usable`]).
    Tracefs,
}

impl Need {
    /// Whether this prerequisite holds; the error says what is missing.
    pub fn check(self) -> Result<(), String> {
        match self {
            Need::Root => check_root(),
            Need::LoopDevices => check_loop_devices(),
            Need::Ext4Tools => {
                require_tool("mkfs.ext4")?;
                require_tool("e2fsck").map(|_| ())
            }
            Need::Fsfreeze => {
                check_root().map_err(|e| format!("fsfreeze needs root: {e}"))?;
                require_tool("fsfreeze").map(|_| ())
            }
            Need::Tracefs => crate::tracefs::usable(),
        }
    }
}

/// Checks `needs` for `test`. Returns `true` when all hold. Otherwise prints
/// `SKIPPED <test>: <reasons>` and returns `false`, or panics when
/// `BOOMERANG_PRIVILEGED_TESTS=1`.
pub fn require_privileged(test: &str, needs: &[Need]) -> bool {
    let missing: Vec<String> = needs
        .iter()
        .filter_map(|need| need.check().err().map(|why| format!("{need:?}: {why}")))
        .collect();
    if missing.is_empty() {
        return true;
    }
    let reason = missing.join("; ");
    if privileged_tests_required() {
        panic!("{test}: {PRIVILEGED_ENV}=1 but a prerequisite is missing: {reason}");
    }
    let line = format!("SKIPPED {test}: {reason} (set {PRIVILEGED_ENV}=1 to make this a failure)");
    println!("{line}");
    // Straight to fd 2, past libtest's capture, so a skip shows in every run's output.
    let _ = writeln!(std::io::stderr(), "{line}");
    false
}

/// Whether `BOOMERANG_PRIVILEGED_TESTS=1` is set.
pub fn privileged_tests_required() -> bool {
    std::env::var(PRIVILEGED_ENV).is_ok_and(|v| v.trim() == "1")
}

/// Whether the process runs with effective uid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions, cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() == 0 }
}

/// Finds an executable named `name` on `PATH` or in the usual sbin directories.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(SBIN_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// The path of system tool `name`; panics when it is not installed.
pub fn tool(name: &str) -> PathBuf {
    find_tool(name)
        .unwrap_or_else(|| panic!("system tool {name} not found on PATH or in {SBIN_DIRS:?}"))
}

fn require_tool(name: &str) -> Result<PathBuf, String> {
    find_tool(name).ok_or_else(|| format!("{name} not installed (not on PATH or in {SBIN_DIRS:?})"))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn check_root() -> Result<(), String> {
    if is_root() {
        Ok(())
    } else {
        Err("not running as root".to_string())
    }
}

fn check_loop_devices() -> Result<(), String> {
    check_root().map_err(|e| format!("loop devices need root: {e}"))?;
    let losetup = require_tool("losetup")?;
    let control = Path::new("/dev/loop-control");
    if !control.exists() {
        // The loop module may just not be loaded; loading it is harmless if allowed.
        if let Some(modprobe) = find_tool("modprobe") {
            let _ = Command::new(modprobe)
                .arg("loop")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if !control.exists() {
            return Err("/dev/loop-control missing (even after `modprobe loop`)".to_string());
        }
    }
    // `losetup --find` only names the first free device: it proves one can be had.
    let out = Command::new(&losetup)
        .arg("--find")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", losetup.display()))?;
    if !out.status.success() {
        return Err(format!(
            "no free loop device: losetup --find: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_needs_always_pass() {
        assert!(require_privileged("no_needs", &[]));
    }

    #[test]
    fn tools_are_found_or_named() {
        assert!(find_tool("sh").is_some(), "sh must exist on any test host");
        assert!(find_tool("definitely-not-a-boomerang-tool").is_none());
        let err =
            require_tool("definitely-not-a-boomerang-tool").expect_err("tool must be missing");
        assert!(err.contains("definitely-not-a-boomerang-tool"), "{err}");
    }

    #[test]
    fn root_check_agrees_with_is_root() {
        assert_eq!(Need::Root.check().is_ok(), is_root());
    }
}
