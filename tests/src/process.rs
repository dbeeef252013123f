//! Child processes: locating the Boomerang binaries, supervising long-running daemons
//! ([`Daemon`]) and running one-shot commands ([`run`], [`run_ok`], [`run_json`]).
//!
//! Every helper panics with what a failing test needs to read: the command line, the
//! exit status, stdout and stderr (or the tail of a daemon's log).

use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::cli;

/// Overrides the directory the Boomerang binaries are taken from.
pub const BIN_DIR_ENV: &str = "BOOMERANG_BIN_DIR";
/// Set to `1` to keep scratch directories (images, state, logs) after a test.
pub const KEEP_DIRS_ENV: &str = "BOOMERANG_KEEP_TEST_DIRS";
/// Overrides [`DEFAULT_COMMAND_TIMEOUT`] (whole seconds).
pub const COMMAND_TIMEOUT_ENV: &str = "BOOMERANG_COMMAND_TIMEOUT_SECS";
/// How long a daemon may take to print its readiness line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Daemon::terminate`] waits after SIGTERM before SIGKILL.
pub const TERMINATE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a one-shot command may run before it is killed.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(600);
/// Lines of a daemon log quoted in panic messages.
const LOG_TAIL_LINES: usize = 60;

/// The path of Boomerang binary `name` (e.g. `boomerang-mt`): in `BOOMERANG_BIN_DIR`
/// if set, else in the cargo target directory of the running test
/// (`target/<profile>/deps/<test>` runs next to `target/<profile>/<name>`).
/// Panics when the binary is missing.
pub fn bin(name: &str) -> PathBuf {
    let dir = match std::env::var_os(BIN_DIR_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().expect("current_exe of the test process");
            bin_dir_for_exe(&exe)
        }
    };
    bin_in(&dir, name)
}

/// The binary directory for a test or bench executable at `exe`.
pub fn bin_dir_for_exe(exe: &Path) -> PathBuf {
    let dir = exe
        .parent()
        .expect("test executable has a parent directory");
    if dir.file_name() == Some(OsStr::new("deps")) {
        dir.parent()
            .expect("deps/ has a parent directory")
            .to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// `dir/name`, or a panic that says how to get it there.
pub fn bin_in(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    if !path.is_file() {
        panic!(
            "{} not found: build them first: cargo build --workspace --bins \
             (same profile as the tests, e.g. add --release for release tests), \
             or point {BIN_DIR_ENV} at the directory holding them",
            path.display()
        );
    }
    path
}

/// A fresh scratch directory `boomerang-<label>-XXXX` under `TMPDIR`. With
/// `BOOMERANG_KEEP_TEST_DIRS=1` it survives the test and its path is printed.
pub fn scratch_dir(label: &str) -> TempDir {
    let mut dir = tempfile::Builder::new()
        .prefix(&format!("boomerang-{label}-"))
        .tempdir()
        .expect("create scratch directory under TMPDIR");
    if std::env::var(KEEP_DIRS_ENV).is_ok_and(|v| v.trim() == "1") {
        dir.disable_cleanup(true);
        let _ = writeln!(
            std::io::stderr(),
            "{label}: keeping {}",
            dir.path().display()
        );
    }
    dir
}

/// A command line as a shell-like string, for messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion (stdin closed, output captured) within
/// [`DEFAULT_COMMAND_TIMEOUT`] or `BOOMERANG_COMMAND_TIMEOUT_SECS`. A non-zero exit is
/// returned, not a panic, for tests that expect failure; it panics only when the command
/// cannot start or runs past the deadline.
pub fn run(cmd: &mut Command) -> Output {
    run_with_timeout(cmd, command_timeout())
}

/// [`run`] with an explicit deadline; the command is SIGKILLed when it passes.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let what = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));
    let stdout = collect(child.stdout.take().expect("piped stdout"));
    let stderr = collect(child.stderr.take().expect("piped stderr"));
    let status = match wait_timeout(&mut child, timeout) {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            let out = joined_output(stdout, stderr);
            panic!(
                "`{what}` still running after {timeout:?}; killed it\n--- stdout ---\n{}\n--- stderr ---\n{}",
                String::from_utf8_lossy(&out.0),
                String::from_utf8_lossy(&out.1)
            );
        }
    };
    let (stdout, stderr) = joined_output(stdout, stderr);
    Output {
        status,
        stdout,
        stderr,
    }
}

/// Runs `cmd` and returns its stdout; panics with stdout and stderr unless it exits 0.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    if !out.status.success() {
        panic!("{}", failure_message(cmd, &out));
    }
    String::from_utf8(out.stdout)
        .unwrap_or_else(|e| panic!("`{}` printed non-UTF-8 stdout: {e}", describe(cmd)))
}

/// Runs `cmd` with [`run_ok`] and parses its stdout as one JSON value.
pub fn run_json(cmd: &mut Command) -> serde_json::Value {
    let stdout = run_ok(cmd);
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("`{}` printed invalid JSON ({e}):\n{stdout}", describe(cmd)))
}

/// The panic message for a command that exited unsuccessfully.
pub fn failure_message(cmd: &Command, out: &Output) -> String {
    format!(
        "`{}` failed: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        describe(cmd),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn command_timeout() -> Duration {
    std::env::var(COMMAND_TIMEOUT_ENV)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_COMMAND_TIMEOUT)
}

fn collect<R: Read + Send + 'static>(mut reader: R) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = reader.read_to_end(&mut buf);
        buf
    })
}

fn joined_output(
    stdout: thread::JoinHandle<Vec<u8>>,
    stderr: thread::JoinHandle<Vec<u8>>,
) -> (Vec<u8>, Vec<u8>) {
    (
        stdout.join().expect("stdout reader thread"),
        stderr.join().expect("stderr reader thread"),
    )
}

/// Waits for `child` up to `timeout`; `None` if it is still running.
fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait().expect("waitpid on a child") {
            return Some(status);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// How to start a [`Daemon`].
#[derive(Debug, Clone)]
pub struct DaemonSpec {
    label: String,
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    log_path: PathBuf,
    ready_prefix: String,
    ready_timeout: Duration,
}

/// The daemons' log filter: `info`, or `BOOMERANG_TEST_RUST_LOG` when set (e.g.
/// `info,boomerang_ps::forward=debug` to see every record the process server could
/// not forward yet, when a campaign stalls).
pub fn daemon_log_filter() -> String {
    std::env::var("BOOMERANG_TEST_RUST_LOG").unwrap_or_else(|_| "info".into())
}

impl DaemonSpec {
    /// Runs `program`, logging to `<log_dir>/<label>.log`, with `RUST_LOG` from
    /// [`daemon_log_filter`], `RUST_BACKTRACE=1`, and waiting up to [`READY_TIMEOUT`] for the readiness line
    /// [`cli::READY_PREFIX`]`<addr>` on stdout.
    pub fn new(label: &str, program: impl Into<PathBuf>, log_dir: &Path) -> Self {
        DaemonSpec {
            label: label.to_string(),
            program: program.into(),
            args: Vec::new(),
            env: vec![
                ("RUST_LOG".into(), daemon_log_filter().into()),
                ("RUST_BACKTRACE".into(), "1".into()),
            ],
            log_path: log_dir.join(format!("{label}.log")),
            ready_prefix: cli::READY_PREFIX.to_string(),
            ready_timeout: READY_TIMEOUT,
        }
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable (overriding the defaults).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Replaces the readiness timeout.
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// Replaces the arguments (for a restart with, e.g., the same port).
    pub fn with_args(mut self, args: Vec<OsString>) -> Self {
        self.args = args;
        self
    }

    /// The arguments.
    pub fn args_list(&self) -> &[OsString] {
        &self.args
    }

    /// The label used in messages and the log file name.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The log file (stdout and stderr, appended across restarts).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }
}

/// A running daemon: started from a [`DaemonSpec`], ready once it printed its address.
/// Dropping it SIGKILLs the process; a drop during a panic also prints its log tail.
#[derive(Debug)]
pub struct Daemon {
    spec: DaemonSpec,
    child: Child,
    addr: SocketAddr,
    exit: Option<ExitStatus>,
    stdout_lines: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    /// Starts the daemon and waits for its readiness line; panics (with the log tail)
    /// when it exits first, prints a malformed address or misses the deadline.
    pub fn start(spec: DaemonSpec) -> Daemon {
        let mut cmd = spec.command();
        let what = describe(&cmd);
        if let Some(dir) = spec.log_path.parent() {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|e| panic!("create log dir {}: {e}", dir.display()));
        }
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log_path)
            .unwrap_or_else(|e| panic!("open log {}: {e}", spec.log_path.display()));
        writeln!(log, "=== {}: starting `{what}`", spec.label).expect("write daemon log header");
        let stderr_log = log.try_clone().expect("clone daemon log handle");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr_log))
            .spawn()
            .unwrap_or_else(|e| panic!("{}: cannot start `{what}`: {e}", spec.label));

        let stdout_lines = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let stdout = child.stdout.take().expect("piped stdout");
        let prefix = spec.ready_prefix.clone();
        let lines = Arc::clone(&stdout_lines);
        thread::spawn(move || copy_stdout(stdout, log, &prefix, &lines, ready_tx));

        let line = match ready_rx.recv_timeout(spec.ready_timeout) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{}: no `{}<addr>` line on stdout within {:?} from `{what}`\n{}",
                    spec.label,
                    spec.ready_prefix,
                    spec.ready_timeout,
                    log_tail_message(&spec.log_path)
                );
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // stdout closed before the readiness line: the process (nearly) exited.
                let status = wait_timeout(&mut child, Duration::from_secs(5));
                if status.is_none() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                panic!(
                    "{}: exited ({}) before printing `{}<addr>`: `{what}`\n{}",
                    spec.label,
                    status.map_or_else(
                        || "closed stdout, still running".to_string(),
                        |s| s.to_string()
                    ),
                    spec.ready_prefix,
                    log_tail_message(&spec.log_path)
                );
            }
        };
        let addr = line[spec.ready_prefix.len()..]
            .trim()
            .parse()
            .unwrap_or_else(|e| {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{}: readiness line {line:?} has no socket address: {e}",
                    spec.label
                )
            });
        Daemon {
            spec,
            child,
            addr,
            exit: None,
            stdout_lines,
        }
    }

    /// The address from the readiness line.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The spec it was started from (clone it to restart).
    pub fn spec(&self) -> &DaemonSpec {
        &self.spec
    }

    /// The log file (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.spec.log_path
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.spec.log_path, lines)
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.spec.log_path).unwrap_or_default()
    }

    /// Every stdout line so far, the readiness line included.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout_lines
            .lock()
            .expect("stdout line buffer lock")
            .clone()
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().expect("waitpid on a daemon");
        }
        self.exit
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.try_exit_status().is_none()
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = wait_timeout(&mut self.child, timeout);
        }
        self.exit
    }

    /// SIGKILL (a crash, as far as the daemon can tell) and reap.
    pub fn kill9(&mut self) -> ExitStatus {
        if let Some(status) = self.try_exit_status() {
            return status;
        }
        let _ = self.child.kill();
        let status = self.child.wait().expect("wait for a killed daemon");
        self.exit = Some(status);
        status
    }

    /// SIGTERM, then SIGKILL if it is still running after [`TERMINATE_TIMEOUT`].
    pub fn terminate(&mut self) -> ExitStatus {
        self.terminate_within(TERMINATE_TIMEOUT)
    }

    /// SIGTERM, then SIGKILL if it is still running after `timeout`. A test that cares
    /// whether shutdown was clean checks the returned status.
    pub fn terminate_within(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(status) = self.try_exit_status() {
            return status;
        }
        signal(self.pid(), libc::SIGTERM);
        if let Some(status) = self.wait_exit(timeout) {
            return status;
        }
        let _ = writeln!(
            std::io::stderr(),
            "{}: still running {timeout:?} after SIGTERM; sending SIGKILL",
            self.spec.label
        );
        self.kill9()
    }

    /// Sends `sig` (e.g. `libc::SIGSTOP`) without waiting.
    pub fn signal(&self, sig: libc::c_int) {
        signal(self.pid(), sig);
    }

    /// The daemon's peak resident set size (`VmHWM`) in KiB, while it runs.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        peak_rss_kib(self.pid())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            let _ = writeln!(
                std::io::stderr(),
                "--- {} ({}) ---\n{}",
                self.spec.label,
                self.spec.log_path.display(),
                self.log_tail(LOG_TAIL_LINES)
            );
        }
    }
}

/// The peak resident set size (`VmHWM`) in KiB of a running process.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Sends `sig` to `pid`, which must be an unreaped child of this process.
pub fn signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits in pid_t");
    // SAFETY: kill(2) only sends a signal; `pid` is our own unreaped child, so the id
    // cannot have been recycled for another process.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        let _ = writeln!(std::io::stderr(), "kill({pid}, {sig}): {err}");
    }
}

/// Copies a daemon's stdout into its log, keeps the lines, and hands the first line
/// starting with `prefix` to the starter.
fn copy_stdout(
    stdout: impl Read,
    mut log: File,
    prefix: &str,
    lines: &Mutex<Vec<String>>,
    ready: mpsc::SyncSender<String>,
) {
    let mut ready = Some(ready);
    let mut reader = BufReader::new(stdout);
    let mut raw = Vec::new();
    loop {
        raw.clear();
        match reader.read_until(b'\n', &mut raw) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&raw)
            .trim_end_matches(['\n', '\r'])
            .to_string();
        let _ = writeln!(log, "{line}");
        if line.starts_with(prefix) {
            if let Some(tx) = ready.take() {
                let _ = tx.send(line.clone());
            }
        }
        lines.lock().expect("stdout line buffer lock").push(line);
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn log_tail_message(path: &Path) -> String {
    format!(
        "--- last {LOG_TAIL_LINES} lines of {} ---\n{}",
        path.display(),
        log_tail(path, LOG_TAIL_LINES)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(log_dir: &Path, label: &str, script: &str) -> DaemonSpec {
        DaemonSpec::new(label, "/bin/sh", log_dir).args(["-c", script])
    }

    #[test]
    fn daemon_reports_its_address_and_terminates() {
        let dir = scratch_dir("daemon-ok");
        let mut d = Daemon::start(sh(
            dir.path(),
            "fake",
            "trap 'exit 0' TERM; echo starting >&2; echo listening on 127.0.0.1:4242; echo more; \
             while :; do sleep 0.05; done",
        ));
        assert_eq!(d.addr(), "127.0.0.1:4242".parse().expect("literal address"));
        assert!(d.is_running());
        let status = d.terminate();
        assert!(status.success(), "{status}");
        let log = d.log();
        assert!(
            log.contains("starting") && log.contains("listening on 127.0.0.1:4242"),
            "{log}"
        );
        assert_eq!(d.stdout_lines()[0], "listening on 127.0.0.1:4242");
    }

    #[test]
    fn kill9_is_a_sigkill() {
        use std::os::unix::process::ExitStatusExt;
        let dir = scratch_dir("daemon-kill");
        let mut d = Daemon::start(sh(
            dir.path(),
            "fake",
            "echo listening on [::1]:1; exec sleep 30",
        ));
        assert_eq!(d.addr().port(), 1);
        assert!(d.peak_rss_kib().is_some_and(|k| k > 0));
        let status = d.kill9();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(!d.is_running());
    }

    #[test]
    fn terminate_escalates_to_sigkill() {
        use std::os::unix::process::ExitStatusExt;
        let dir = scratch_dir("daemon-stubborn");
        let mut d = Daemon::start(sh(
            dir.path(),
            "stubborn",
            "trap '' TERM; echo listening on 127.0.0.1:5; while :; do sleep 0.05; done",
        ));
        let status = d.terminate_within(Duration::from_millis(300));
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

    #[test]
    #[should_panic(expected = "exited (exit status: 3) before printing")]
    fn early_exit_panics_with_status() {
        let dir = scratch_dir("daemon-exit");
        let _ = Daemon::start(sh(
            dir.path(),
            "broken",
            "echo 'bad config: no --name' >&2; exit 3",
        ));
    }

    #[test]
    fn early_exit_message_quotes_the_log() {
        let dir = scratch_dir("daemon-exit-log");
        let spec = sh(
            dir.path(),
            "broken",
            "echo 'bad config: no --name' >&2; exit 3",
        );
        let err = std::panic::catch_unwind(|| Daemon::start(spec)).expect_err("start must panic");
        let msg = err
            .downcast_ref::<String>()
            .expect("panic message is a String");
        assert!(msg.contains("bad config: no --name"), "{msg}");
    }

    #[test]
    #[should_panic(expected = "no `listening on <addr>` line on stdout within")]
    fn silent_daemon_times_out() {
        let dir = scratch_dir("daemon-silent");
        let _ = Daemon::start(
            sh(dir.path(), "silent", "exec sleep 30").ready_timeout(Duration::from_millis(300)),
        );
    }

    #[test]
    fn run_helpers_capture_and_report() {
        let out = run(Command::new("/bin/sh").args(["-c", "echo out; echo err >&2; exit 2"]));
        assert_eq!(out.status.code(), Some(2));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(run_ok(Command::new("/bin/echo").arg("hi")), "hi\n");
        let v = run_json(Command::new("/bin/echo").arg(r#"{"a":[1,2]}"#));
        assert_eq!(v["a"][1], 2);
        let err = std::panic::catch_unwind(|| {
            run_ok(Command::new("/bin/sh").args(["-c", "echo why >&2; exit 1"]))
        })
        .expect_err("run_ok must panic");
        let msg = err
            .downcast_ref::<String>()
            .expect("panic message is a String");
        assert!(
            msg.contains("why") && msg.contains("exit status: 1"),
            "{msg}"
        );
    }

    #[test]
    #[should_panic(expected = "still running after")]
    fn run_kills_at_the_deadline() {
        run_with_timeout(
            Command::new("/bin/sleep").arg("30"),
            Duration::from_millis(200),
        );
    }

    #[test]
    fn binaries_sit_above_deps() {
        assert_eq!(
            bin_dir_for_exe(Path::new("/w/target/debug/deps/harness-0123")),
            Path::new("/w/target/debug")
        );
        assert_eq!(
            bin_dir_for_exe(Path::new("/w/target/release/bench")),
            Path::new("/w/target/release")
        );
        let err = std::panic::catch_unwind(|| bin_in(Path::new("/nonexistent"), "boomerang-mt"))
            .expect_err("missing");
        let msg = err
            .downcast_ref::<String>()
            .expect("panic message is a String");
        assert!(msg.contains("cargo build --workspace --bins"), "{msg}");
    }
}
