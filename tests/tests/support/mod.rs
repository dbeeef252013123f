//! What the crash and loop-device tests share beyond the library: an agent sync run as
//! a child process that a test can watch, signal and kill mid-flight
//! ([`AgentProcess`]), and one disk's line of the master target's status.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use boomerang_tests::cli::{AgentSyncArgs, MtDiskStatus, SyncReport};
use boomerang_tests::process::describe;
use boomerang_tests::Cluster;

/// One mebibyte.
pub(crate) const MIB: u64 = 1 << 20;

/// An `agent sync` running as a child of the test: stdout (the JSON report) is
/// collected, stderr is appended to `logs/agent-<name>.log`. Dropping it SIGKILLs the
/// agent if it still runs, and prints the log tail when the test is panicking.
#[derive(Debug)]
pub(crate) struct AgentProcess {
    child: Child,
    what: String,
    log: PathBuf,
    /// Everything the agent printed on stdout so far (filled while it runs).
    stdout_buf: Arc<Mutex<Vec<u8>>>,
    stdout: Option<thread::JoinHandle<()>>,
    exit: Option<ExitStatus>,
}

impl AgentProcess {
    /// Starts `boomerang-agent` with `args` (from [`Cluster::agent`]).
    pub(crate) fn spawn(cluster: &Cluster, args: &AgentSyncArgs) -> AgentProcess {
        AgentProcess::spawn_command(cluster, &args.name, cluster.agent_command(args))
    }

    /// Starts an agent command line of any subcommand (e.g. `track`) for agent
    /// `name`, logging like [`AgentProcess::spawn`].
    pub(crate) fn spawn_command(cluster: &Cluster, name: &str, mut cmd: Command) -> AgentProcess {
        let what = describe(&cmd);
        let log = cluster.logs_dir().join(format!("agent-{name}.log"));
        std::fs::create_dir_all(cluster.logs_dir()).expect("create the logs directory");
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
        writeln!(file, "=== starting `{what}`").expect("write the agent log header");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));
        let mut out = child.stdout.take().expect("piped stdout");
        let stdout_buf = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&stdout_buf);
        let stdout = Some(thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            loop {
                match out.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => sink
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .extend_from_slice(&chunk[..n]),
                }
            }
        }));
        AgentProcess {
            child,
            what,
            log,
            stdout_buf,
            stdout,
            exit: None,
        }
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if it has exited, without waiting.
    pub(crate) fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().expect("waitpid on the agent");
        }
        self.exit
    }

    /// Panics (with the log tail) unless the agent still runs: a kill that lands after
    /// the sync finished would test nothing.
    pub(crate) fn assert_running(&mut self, when: &str) {
        if let Some(status) = self.try_exit() {
            panic!(
                "the agent already exited ({status}) {when}: the transfer was not in flight\n{}",
                self.log_tail(40)
            );
        }
    }

    /// Sends `sig` to the agent.
    pub(crate) fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.pid()).expect("pid fits in pid_t");
        // SAFETY: kill(2) only sends a signal; the agent is our unreaped child, so its
        // pid cannot have been recycled.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {sig}): {}",
            std::io::Error::last_os_error()
        );
    }

    /// SIGKILLs the agent and reaps it.
    pub(crate) fn kill9(&mut self) -> ExitStatus {
        if let Some(status) = self.try_exit() {
            return status;
        }
        let _ = self.child.kill();
        let status = self.child.wait().expect("wait for the killed agent");
        self.exit = Some(status);
        status
    }

    /// Waits up to `timeout` for the agent to exit; returns its status and stdout.
    /// Panics (killing it) when it is still running at the deadline.
    pub(crate) fn wait(&mut self, timeout: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.try_exit() {
                break status;
            }
            if Instant::now() >= deadline {
                self.kill9();
                panic!(
                    "`{}` still running after {timeout:?}; killed it\n{}",
                    self.what,
                    self.log_tail(60)
                );
            }
            thread::sleep(Duration::from_millis(50));
        };
        if let Some(h) = self.stdout.take() {
            h.join().expect("agent stdout reader");
        }
        (status, self.stdout_so_far())
    }

    /// What the agent printed on stdout so far (all of it once it has exited and
    /// [`AgentProcess::wait`] returned).
    pub(crate) fn stdout_so_far(&self) -> String {
        let buf = self
            .stdout_buf
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Waits up to `timeout`, panics unless the agent exited 0, returns its report.
    pub(crate) fn wait_success(&mut self, timeout: Duration) -> SyncReport {
        let (status, stdout) = self.wait(timeout);
        assert!(
            status.success(),
            "`{}` failed: {status}\n--- stdout ---\n{stdout}\n{}",
            self.what,
            self.log_tail(60)
        );
        let json = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("agent printed invalid JSON ({e}):\n{stdout}"));
        SyncReport::from_json(&json)
    }

    /// The last `lines` lines of the agent's log.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            let _ = writeln!(std::io::stderr(), "--- agent ---\n{}", self.log_tail(60));
        }
    }
}

/// The last `lines` lines of the file at `path`, headed by its name.
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    format!(
        "--- last {lines} lines of {} ---\n{}",
        path.display(),
        all[all.len().saturating_sub(lines)..].join("\n")
    )
}

/// Disk `id`'s line of `boomerang-mt status`, or `None` before the master target
/// knows the disk.
pub(crate) fn disk_status(cluster: &Cluster, id: &str) -> Option<MtDiskStatus> {
    cluster.mt_status().disks.into_iter().find(|d| d.disk == id)
}

/// The replica path the master target reports for disk `id`.
pub(crate) fn replica_path(cluster: &Cluster, id: &str) -> PathBuf {
    let status = cluster.mt_status();
    let line = status
        .raw
        .get("disks")
        .and_then(|d| d.as_array())
        .and_then(|disks| disks.iter().find(|d| d["disk"] == id))
        .unwrap_or_else(|| panic!("mt status has no disk {id:?}: {}", status.raw));
    PathBuf::from(
        line["replica"]
            .as_str()
            .unwrap_or_else(|| panic!("mt status: `replica` is not a string in {line}")),
    )
}
