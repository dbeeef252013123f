//! The campaign's agent: `boomerang-agent track --source intercept`, serving the disk
//! as a FUSE file the workload writes through, or `track` with the trace source (the
//! workload writes its own block device, `--freeze` pauses it for points).

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::cli::{self, AgentSyncArgs};
use crate::cluster::boomerang_command;
use crate::loopdev::is_mount_point;
use crate::privileged::find_tool;
use crate::process::signal;

/// From the start of `track` to `serving <disk> at ...`.
const SERVE_TIMEOUT: Duration = Duration::from_secs(30);

/// A tracking agent run.
#[derive(Debug)]
pub struct TrackingAgent {
    child: Child,
    stdout: Arc<Mutex<String>>,
    /// The served disk, open for the workload (closed before the agent stops, which
    /// waits for its users).
    disk: Option<File>,
    /// Where the served disk's file is (intercept source).
    served: Option<PathBuf>,
    /// The FUSE mount of the served disk (intercept source).
    mount: Option<PathBuf>,
}

impl TrackingAgent {
    /// Starts `track` for `args` (its disks, state and peers) serving under
    /// `serve_dir` with `env` added, and waits until it serves `disk`; the log goes
    /// to `log`.
    pub fn start(
        args: &AgentSyncArgs,
        disk: &str,
        serve_dir: &Path,
        env: &[(String, String)],
        log: &Path,
    ) -> anyhow::Result<TrackingAgent> {
        let mount = serve_dir.join(disk);
        // A killed agent leaves its FUSE mount dead; the next start refuses it.
        lazy_unmount(&mount);
        let mut argv = args.to_track_intercept_args(serve_dir);
        argv.extend(["--crash-interval", "1"].map(OsString::from));
        // From here on a failure drops the agent, which kills it.
        let mut agent = TrackingAgent::spawn(argv, env, log, Some(mount))?;
        let prefix = format!("serving {disk} at ");
        let deadline = Instant::now() + SERVE_TIMEOUT;
        let file = loop {
            let served = agent
                .stdout()
                .lines()
                .find_map(|l| l.strip_prefix(&prefix).map(|f| PathBuf::from(f.trim())));
            if let Some(file) = served {
                break file;
            }
            if let Some(status) = agent.child.try_wait().context("wait for the agent")? {
                bail!("the agent exited ({status}) before serving {disk}");
            }
            if Instant::now() > deadline {
                bail!("the agent did not serve {disk} within {SERVE_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        agent.disk = Some(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&file)
                .with_context(|| format!("open the served disk {}", file.display()))?,
        );
        agent.served = Some(file);
        Ok(agent)
    }

    /// Starts `track` with the trace source for `args` (its disks are block devices,
    /// its `--freeze` mount points pause them for points), a crash-consistent point
    /// every second, with `env` added; the log goes to `log`.
    pub fn start_trace(
        args: &AgentSyncArgs,
        env: &[(String, String)],
        log: &Path,
    ) -> anyhow::Result<TrackingAgent> {
        let mut argv = args.to_args();
        argv[0] = "track".into();
        argv.extend(["--crash-interval", "1"].map(OsString::from));
        TrackingAgent::spawn(argv, env, log, None)
    }

    fn spawn(
        argv: Vec<OsString>,
        env: &[(String, String)],
        log: &Path,
        mount: Option<PathBuf>,
    ) -> anyhow::Result<TrackingAgent> {
        let mut cmd: Command = boomerang_command(cli::AGENT_BIN, argv);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open {}", log.display()))?;
        let stderr = log.try_clone().context("clone the log handle")?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .context("start boomerang-agent track")?;
        let _ = writeln!(log, "=== agent pid {} started", child.id());
        let stdout = Arc::new(Mutex::new(String::new()));
        if let Some(mut out) = child.stdout.take() {
            let sink = Arc::clone(&stdout);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = out.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut s) = sink.lock() {
                        s.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            });
        }
        Ok(TrackingAgent {
            child,
            stdout,
            disk: None,
            served: None,
            mount,
        })
    }

    /// The served disk's file (intercept source).
    pub fn served(&self) -> Option<&Path> {
        self.served.as_deref()
    }

    /// The served disk.
    pub fn disk(&self) -> anyhow::Result<&File> {
        self.disk.as_ref().context("the served disk is closed")
    }

    /// Whether the agent still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `limit` for the agent to exit; whether it did.
    pub fn exited_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if !self.is_running() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, reap, and lazily unmount the dead FUSE mount it leaves.
    pub fn kill9(mut self) {
        self.disk = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.unmount();
    }

    /// `umount -l` of the served disk's dead FUSE mount, if any.
    fn unmount(&self) {
        if let Some(m) = &self.mount {
            lazy_unmount(m);
        }
    }

    /// SIGTERM and wait (SIGKILL after 30 s): the clean stop a service manager does.
    pub fn stop(mut self) {
        self.disk = None;
        signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                self.unmount();
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill9();
    }

    /// What it printed so far.
    pub fn stdout(&self) -> String {
        self.stdout.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for TrackingAgent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.unmount();
    }
}

/// `umount -l` of `dir` when something is mounted there.
fn lazy_unmount(dir: &Path) {
    if is_mount_point(dir) {
        let umount = find_tool("umount").unwrap_or_else(|| PathBuf::from("umount"));
        let _ = Command::new(umount).arg("-l").arg(dir).output();
    }
}
