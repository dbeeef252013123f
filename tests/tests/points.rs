//! Recovery points of continuous replication and failover to each kind of them, with
//! the intercept source (`boomerang-agent track --source intercept`): the agent
//! serves each disk, a plain image file, as `<serve dir>/<disk>/disk` through FUSE,
//! and the test writes straight into the served files (pwrite, then fsync) in phases
//! separated by quiet windows. Every tag of the intercept source is a cut of the write
//! order, so a point whose tag falls in the quiet window after phase k holds exactly
//! what the disks held after phase k; the test records the backing images' sha256
//! then (the served file's content is the backing image's). Points inside a write
//! phase are not checked.
//!
//! - Failover to an older point id, `latest-app` and `latest-processed` (as test
//!   failovers into scratch images), then `latest` with the agent running: the agent
//!   takes a final point after the last writes, runs its shutdown hook and exits 0,
//!   and the failover gives back exactly the final images. After `commit` the agent
//!   started again is told to forget the group.
//! - `latest` with the source unreachable (agent killed) fails after the drain
//!   timeout naming `latest-processed`, and changes nothing; `latest-processed` then
//!   gives back the newest point.
//! - Coordinated points of two agents: while one of them is stopped (SIGSTOP) the
//!   other abandons every point at the deadline (writes go on), no group point is
//!   listed, and points resume once it runs again.
//!
//! Privileged: needs root and `/dev/fuse` (no loop device or mount). Without them each
//! test prints `SKIPPED` and returns; with `BOOMERANG_PRIVILEGED_TESTS=1` a missing
//! prerequisite fails. Run:
//! `BOOMERANG_PRIVILEGED_TESTS=1 cargo test -p boomerang-tests --test points`.
//!
//! Cleanup order (locals drop in reverse): a SIGSTOP guard sends SIGCONT, the agents
//! are SIGKILLed if they still run, then [`Site`] lazily unmounts a FUSE mount a dead
//! agent left behind, then the cluster stops and its scratch goes.

#[path = "support/status.rs"]
#[allow(dead_code)] // the tracking tests' waits are not all used here
mod status;
#[allow(dead_code)] // the one-shot `sync` helpers are not used here
mod support;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use boomerang_common::config::now_ms;
use boomerang_tests::cli::{self, point_to_args, PointInfo};
use boomerang_tests::cluster::boomerang_command;
use boomerang_tests::loopdev::{is_mount_point, LazyUnmountGuard};
use boomerang_tests::privileged::{privileged_tests_required, PRIVILEGED_ENV};
use boomerang_tests::rng::DataRng;
use boomerang_tests::{
    make_mixed_image, require_privileged, sha256_file, Cluster, ClusterConfig, Need,
};
use serde_json::Value;

use support::{replica_path, AgentProcess, MIB};

const GROUP: &str = "g1";
const KIND_CRASH: &str = "crash-consistent";
const KIND_APP: &str = "app-consistent";
/// From the start of `track` to `serving <disk> at ...` on stdout (the initial scan
/// comes after).
const SERVE_TIMEOUT: Duration = Duration::from_secs(30);
/// Waits for points at the master target: generous, another test may load the host.
const POINT_TIMEOUT: Duration = Duration::from_secs(60);
/// A tracking agent's exit once it was told to (shut down, forget, SIGTERM).
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
/// Agent log lines (agent/src/track_intercept.rs, agent/src/track_trace.rs).
const LOG_COORDINATED_ABANDONED: &str = "coordinated point abandoned";
const LOG_FORGOT: &str = "forgot its state";
/// Master-target log line (master-target/src/groups.rs).
const LOG_MT_ABANDONED: &str = "multi-agent point abandoned";

/// The disks' sha256, by disk id.
type Hashes = BTreeMap<String, String>;

// ---------------------------------------------------------------------------------
// Gating and serialization

/// [`require_privileged`] (root) plus `/dev/fuse`, with the same skip-or-fail rule;
/// holds the lock that runs this binary's tests one at a time (each measures quiet
/// windows and deadlines that a second one on the same host would blur).
fn gate(test: &str) -> Option<MutexGuard<'static, ()>> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    if !require_privileged(test, &[Need::Root]) {
        return None;
    }
    if !Path::new("/dev/fuse").exists() {
        let why = "/dev/fuse missing (no FUSE support in this kernel or container)";
        if privileged_tests_required() {
            panic!("{test}: {PRIVILEGED_ENV}=1 but a prerequisite is missing: {why}");
        }
        let line = format!("SKIPPED {test}: {why} (set {PRIVILEGED_ENV}=1 to make this a failure)");
        println!("{line}");
        let _ = writeln!(std::io::stderr(), "{line}");
        return None;
    }
    Some(ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner))
}

// ---------------------------------------------------------------------------------
// The site: a cluster, image files, serve directories

/// A disk of the test: its backing image and, once an agent serves it, the file the
/// workload writes.
#[derive(Debug, Clone)]
struct Disk {
    id: String,
    backing: PathBuf,
    size: u64,
}

/// A cluster, the disks' backing images and the serve directories.
#[derive(Debug)]
struct Site {
    // Field order is drop order: unmount what a dead agent left, then stop the
    // daemons and remove the scratch.
    fuse_mounts: Vec<LazyUnmountGuard>,
    disks: Vec<Disk>,
    cluster: Cluster,
}

impl Site {
    /// A cluster and one mixed-content image per `(id, size)`.
    fn new(config: ClusterConfig, disks: &[(&str, u64)]) -> Site {
        let cluster = Cluster::start(config);
        let disks = disks
            .iter()
            .enumerate()
            .map(|(i, (id, size))| {
                let backing = cluster.root().join(format!("{id}.img"));
                make_mixed_image(&backing, *size, 70 + i as u64);
                Disk {
                    id: (*id).to_string(),
                    backing,
                    size: *size,
                }
            })
            .collect();
        Site {
            fuse_mounts: Vec::new(),
            disks,
            cluster,
        }
    }

    fn disk(&self, id: &str) -> &Disk {
        self.disks
            .iter()
            .find(|d| d.id == id)
            .unwrap_or_else(|| panic!("no disk {id}"))
    }

    /// Where agent `agent` serves its disks.
    fn serve_dir(&self, agent: &str) -> PathBuf {
        self.cluster.root().join(format!("serve-{agent}"))
    }

    /// `boomerang-agent track --source intercept --group g1 --json` (the JSON report as
    /// the last stdout line) for agent `agent`
    /// serving `disks` under [`Site::serve_dir`], plus `extra`.
    fn spawn_track(&mut self, agent: &str, disks: &[&str], extra: &[&str]) -> AgentProcess {
        let serve_dir = self.serve_dir(agent);
        std::fs::create_dir_all(&serve_dir)
            .unwrap_or_else(|e| panic!("mkdir {}: {e}", serve_dir.display()));
        let mut args = self.cluster.agent(agent).group(GROUP);
        for id in disks {
            args = args.disk(id, &self.disk(id).backing);
            let mountpoint = serve_dir.join(id);
            if !self.fuse_mounts.iter().any(|g| g.dir() == mountpoint) {
                self.fuse_mounts.push(LazyUnmountGuard::new(mountpoint));
            }
        }
        let mut argv = args.to_track_intercept_args(&serve_dir);
        argv.extend(extra.iter().map(OsString::from));
        AgentProcess::spawn_command(
            &self.cluster,
            agent,
            boomerang_command(cli::AGENT_BIN, argv),
        )
    }

    /// Waits for `serving <id> at <file>` for each of `disks`; returns the files.
    fn wait_serving(&self, agent: &mut AgentProcess, disks: &[&str]) -> Vec<PathBuf> {
        let deadline = Instant::now() + SERVE_TIMEOUT;
        loop {
            let out = agent.stdout_so_far();
            let files: Vec<Option<PathBuf>> = disks
                .iter()
                .map(|id| {
                    let prefix = format!("serving {id} at ");
                    out.lines()
                        .find_map(|l| l.strip_prefix(&prefix))
                        .map(|f| PathBuf::from(f.trim()))
                })
                .collect();
            if files.iter().all(Option::is_some) {
                return files.into_iter().flatten().collect();
            }
            if let Some(status) = agent.try_exit() {
                panic!(
                    "the agent exited ({status}) before serving {disks:?}\n--- stdout ---\n{out}\n{}",
                    agent.log_tail(40)
                );
            }
            assert!(
                Instant::now() < deadline,
                "{disks:?} not served within {SERVE_TIMEOUT:?}\n{}",
                agent.log_tail(40)
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The backing images' sha256 (what the served files hold).
    fn hashes(&self, disks: &[&str]) -> Hashes {
        disks
            .iter()
            .map(|id| (id.to_string(), sha256_file(&self.disk(id).backing)))
            .collect()
    }

    /// Scratch targets for a failover, one per disk of the group.
    fn targets(&self, label: &str) -> Vec<(String, PathBuf)> {
        self.disks
            .iter()
            .map(|d| {
                (
                    d.id.clone(),
                    self.cluster.root().join(format!("{label}-{}.img", d.id)),
                )
            })
            .collect()
    }

    /// The group's points, or none before the master target knows a disk of it.
    fn points(&self) -> Vec<PointInfo> {
        if self.group_state().is_none() {
            return Vec::new();
        }
        self.cluster.mt_points(GROUP)
    }

    fn group_state(&self) -> Option<String> {
        self.cluster.mt_status().group_state(GROUP)
    }

    /// Polls the points until `done` holds; panics (with the agents' logs) when an
    /// agent in `alive` exits or `timeout` passes.
    fn wait_points(
        &self,
        alive: &mut [&mut AgentProcess],
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&[PointInfo]) -> bool,
    ) -> Vec<PointInfo> {
        let deadline = Instant::now() + timeout;
        loop {
            for agent in alive.iter_mut() {
                if let Some(status) = agent.try_exit() {
                    panic!(
                        "an agent exited ({status}) while waiting for {what}\n{}",
                        agent.log_tail(60)
                    );
                }
            }
            let points = self.points();
            if done(&points) {
                return points;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {timeout:?}; points {}",
                describe_points(&points)
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// `OP --point POINT --to ... --json` (`failover` or `test-failover`): the point
    /// given back.
    fn give_back(&self, op: &str, point: &str, targets: &[(String, PathBuf)]) -> Given {
        let mut args = point_to_args(point, targets);
        args.push("--json".into());
        let out = self.cluster.mt_op(op, GROUP, &args);
        Given::parse(&out)
    }

    /// `test-failover --cleanup`: the scratch images must be gone.
    fn test_cleanup(&self, targets: &[(String, PathBuf)]) {
        self.cluster
            .mt_op("test-failover", GROUP, &["--cleanup".into()]);
        for (_, p) in targets {
            assert!(!p.exists(), "cleanup left {}", p.display());
        }
    }
}

/// The point a failover or test failover gave back (its `--json` result).
#[derive(Debug, Clone)]
struct Given {
    point_id: u64,
    kind: String,
    time_ms: u64,
    raw: Value,
}

impl Given {
    fn parse(stdout: &str) -> Given {
        let raw: Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("a failover printed invalid JSON ({e}):\n{stdout}"));
        let uint = |k: &str| {
            raw[k]
                .as_u64()
                .unwrap_or_else(|| panic!("failover --json: `{k}` is no unsigned integer: {raw}"))
        };
        Given {
            point_id: uint("point_id"),
            time_ms: uint("time_ms"),
            kind: raw["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("failover --json: `kind` is no string: {raw}"))
                .to_string(),
            raw: raw.clone(),
        }
    }
}

/// Panics unless each target's sha256 is the one in `want`.
fn assert_holds(targets: &[(String, PathBuf)], want: &Hashes, what: &str) {
    for (id, path) in targets {
        assert_eq!(
            sha256_file(path),
            want[id],
            "{what}: disk {id} ({}) does not hold the source's bytes at the point",
            path.display()
        );
    }
}

fn describe_points(points: &[PointInfo]) -> String {
    let lines: Vec<String> = points
        .iter()
        .map(|p| {
            format!(
                "{} {} t={} disks={}{}{}",
                p.id,
                p.kind,
                p.time_ms,
                p.disks.join(","),
                if p.latest_processed {
                    " latest-processed"
                } else {
                    ""
                },
                if p.latest_app { " latest-app" } else { "" }
            )
        })
        .collect();
    format!("[{}]", lines.join("; "))
}

/// The last JSON line a `track --json` agent printed: its report.
fn track_report(stdout: &str) -> Value {
    stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("track --json printed no JSON report:\n{stdout}"))
}

fn uint(report: &Value, key: &str) -> u64 {
    report[key]
        .as_u64()
        .unwrap_or_else(|| panic!("`{key}` is not an unsigned integer in {report}"))
}

/// The lines of `log` that contain `needle`.
fn lines_with<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(needle)).collect()
}

// ---------------------------------------------------------------------------------
// The workload and what the disks held when

/// Writes into served files: 4 KiB-aligned runs of random bytes (now and then a small
/// unaligned one), each file fsynced at the end of a phase.
#[derive(Debug)]
struct Workload {
    rng: DataRng,
    files: Vec<(File, u64)>,
    buf: Vec<u8>,
}

impl Workload {
    fn open(files: &[PathBuf], sizes: &[u64], seed: u64) -> Workload {
        let files = files
            .iter()
            .zip(sizes)
            .map(|(p, size)| {
                let f = OpenOptions::new()
                    .write(true)
                    .open(p)
                    .unwrap_or_else(|e| panic!("open the served file {}: {e}", p.display()));
                (f, *size)
            })
            .collect();
        Workload {
            rng: DataRng::new(seed),
            files,
            buf: Vec::new(),
        }
    }

    /// One write into file `i` (not synced).
    fn write_one(&mut self, i: usize) {
        let (file, size) = &self.files[i];
        let unaligned = self.rng.below(8) == 0;
        let (offset, len) = if unaligned {
            let len = self.rng.between(1, 3000);
            (self.rng.below(size - len), len)
        } else {
            let len = self.rng.between(1, 32) * 4096;
            (self.rng.below((size - len) / 4096 + 1) * 4096, len)
        };
        self.buf
            .resize(usize::try_from(len).expect("at most 128 KiB"), 0);
        self.rng.fill(&mut self.buf);
        file.write_all_at(&self.buf, offset)
            .unwrap_or_else(|e| panic!("pwrite {len} bytes at {offset} into a served file: {e}"));
    }

    fn sync(&self) {
        for (f, _) in &self.files {
            f.sync_all()
                .unwrap_or_else(|e| panic!("fsync a served file: {e}"));
        }
    }

    /// `rounds` rounds of 1-3 writes per file, `pause` apart, then fsync of every file.
    fn phase(&mut self, rounds: u32, pause: Duration) {
        for _ in 0..rounds {
            for i in 0..self.files.len() {
                for _ in 0..self.rng.between(1, 3) {
                    self.write_one(i);
                }
            }
            thread::sleep(pause);
        }
        self.sync();
    }
}

/// A stretch of time in which nobody wrote the disks, and what they held.
#[derive(Debug, Clone)]
struct Quiet {
    /// After the last write of the phase before returned (fsync included), ms.
    from_ms: u64,
    /// Before the first write of the next phase started, ms; open while it lasts.
    until_ms: Option<u64>,
    hashes: Hashes,
}

/// The quiet windows of a test, oldest first: the first one from the start.
#[derive(Debug)]
struct Timeline {
    windows: Vec<Quiet>,
}

impl Timeline {
    fn new(initial: Hashes) -> Timeline {
        Timeline {
            windows: vec![Quiet {
                from_ms: 0,
                until_ms: None,
                hashes: initial,
            }],
        }
    }

    /// Runs a write phase; `hashes` reads what the disks hold after it. Returns the
    /// index of the quiet window after it.
    fn phase(&mut self, write: impl FnOnce(), hashes: impl FnOnce() -> Hashes) -> usize {
        let start = now_ms();
        self.windows
            .last_mut()
            .expect("a timeline starts with a window")
            .until_ms = Some(start);
        write();
        let end = now_ms();
        self.windows.push(Quiet {
            from_ms: end,
            until_ms: None,
            hashes: hashes(),
        });
        self.windows.len() - 1
    }

    /// The quiet window holding a point: its id (the tag's time on the first disk
    /// tagged) after the window's start and its time (the last disk's tag) before the
    /// window's end. `None` for a point taken during a write phase.
    fn window_of(&self, point_id: u64, time_ms: u64) -> Option<usize> {
        self.windows
            .iter()
            .position(|w| point_id > w.from_ms && w.until_ms.is_none_or(|until| time_ms < until))
    }

    fn window_of_point(&self, p: &PointInfo) -> Option<usize> {
        self.window_of(p.id, p.time_ms)
    }

    /// What the disks held at a point given back, panicking for a point inside a
    /// write phase.
    fn content(&self, given: &Given, what: &str) -> (usize, &Hashes) {
        let w = self
            .window_of(given.point_id, given.time_ms)
            .unwrap_or_else(|| {
                panic!(
                    "{what} gave back point {} (time {}), which lies inside a write phase: {:?}",
                    given.point_id, given.time_ms, self.windows
                )
            });
        (w, &self.windows[w].hashes)
    }
}

// ---------------------------------------------------------------------------------
// Stopping an agent for a while

/// An agent stopped with SIGSTOP, sent SIGCONT when this drops (also while a test
/// unwinds), so no test leaves a stopped process, or a FUSE mount nobody answers,
/// behind. Borrowing the agent keeps it unreaped, so its pid is still its own.
#[derive(Debug)]
struct Stopped<'a> {
    agent: &'a AgentProcess,
}

impl<'a> Stopped<'a> {
    fn stop(agent: &'a AgentProcess) -> Stopped<'a> {
        agent.signal(libc::SIGSTOP);
        Stopped { agent }
    }

    /// SIGCONT now.
    fn resume(self) {}
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        let pid = libc::pid_t::try_from(self.agent.pid()).expect("pid fits in pid_t");
        // SAFETY: kill(2) only sends a signal; the agent is our unreaped child (borrowed
        // by this guard), so its pid cannot have been recycled.
        let rc = unsafe { libc::kill(pid, libc::SIGCONT) };
        if rc != 0 {
            let _ = writeln!(
                std::io::stderr(),
                "cleanup: SIGCONT to {pid}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

// ---------------------------------------------------------------------------------
// Tests

/// One agent, two disks in one group, crash-consistent points every second and
/// app-consistent ones (no-op hooks) every 4 s. Write phases with quiet windows; then
/// a test failover to an older point by id, to `latest-app` and to
/// `latest-processed` each give back exactly the bytes of the window the point lies
/// in; `failover --point latest` with the agent running and writes just before it
/// drains: the agent takes a final point, runs its shutdown hook, exits 0 with
/// `"stopped": "shut-down"`, and the targets hold the final images. After `commit` the
/// agent started again forgets the group and exits; the group is failed back.
#[test]
fn failover_to_each_kind_of_point_returns_the_bytes_at_its_tag() {
    let Some(_one) = gate("failover_to_each_kind_of_point_returns_the_bytes_at_its_tag") else {
        return;
    };
    const QUIET: Duration = Duration::from_secs(6);
    let started = Instant::now();
    let ids = ["d0", "d1"];
    let mut site = Site::new(
        ClusterConfig::default(),
        &[("d0", 64 * MIB), ("d1", 64 * MIB)],
    );
    let marker = site.cluster.root().join("shutdown-hook-ran");
    let hook = format!("touch '{}'", marker.display());
    let extra = [
        "--crash-interval",
        "1",
        "--app-interval",
        "4",
        "--freeze-hook",
        "true",
        "--thaw-hook",
        "true",
        "--shutdown-hook",
        hook.as_str(),
    ];
    let mut timeline = Timeline::new(site.hashes(&ids));
    let mut agent = site.spawn_track("agent1", &ids, &extra);
    let served = site.wait_serving(&mut agent, &ids);
    let sizes: Vec<u64> = ids.iter().map(|id| site.disk(id).size).collect();
    let mut work = Workload::open(&served, &sizes, 1);
    site.wait_points(
        &mut [&mut agent],
        POINT_TIMEOUT,
        "a first point after the initial sync",
        |p| !p.is_empty(),
    );
    eprintln!("first point after {:?}", started.elapsed());

    // Phases 1 and 2, each followed by a quiet window long enough for a crash- and an
    // app-consistent point.
    for _ in 0..2 {
        timeline.phase(
            || work.phase(20, Duration::from_millis(50)),
            || site.hashes(&ids),
        );
        thread::sleep(QUIET);
    }
    // Right after an app-consistent point is listed, the next one is some 4 s away: a
    // short phase 3 then, and a crash-consistent point after it, make the newest point
    // crash-consistent and newer than the newest app-consistent one.
    let since = now_ms();
    site.wait_points(
        &mut [&mut agent],
        POINT_TIMEOUT,
        "the next app-consistent point after the quiet window",
        |ps| ps.iter().any(|p| p.kind == KIND_APP && p.id > since),
    );
    let w3 = timeline.phase(
        || work.phase(2, Duration::from_millis(10)),
        || site.hashes(&ids),
    );
    let from3 = timeline.windows[w3].from_ms;
    let snapshot = site.wait_points(
        &mut [&mut agent],
        POINT_TIMEOUT,
        "a crash-consistent point after phase 3",
        |ps| ps.iter().any(|p| p.kind == KIND_CRASH && p.id > from3),
    );
    eprintln!(
        "after phase 3 ({:?} in): {} points {}",
        started.elapsed(),
        snapshot.len(),
        describe_points(&snapshot)
    );

    // Every point is listed with both disks; windows 1 and 2 each hold a crash- and
    // an app-consistent point.
    for p in &snapshot {
        assert_eq!(p.disks, ids, "point {} is not of both disks", p.id);
    }
    for w in 1..=2 {
        let kinds: Vec<&str> = snapshot
            .iter()
            .filter(|p| timeline.window_of_point(p) == Some(w))
            .map(|p| p.kind.as_str())
            .collect();
        assert!(
            kinds.contains(&KIND_CRASH) && kinds.contains(&KIND_APP),
            "quiet window {w} holds no crash- and app-consistent point: {kinds:?}\n{:?}\n{}",
            timeline.windows[w],
            describe_points(&snapshot)
        );
    }
    let newest = snapshot.last().expect("points listed");
    let app = snapshot
        .iter()
        .find(|p| p.latest_app)
        .expect("an app-consistent point is marked latest-app");
    assert!(
        newest.latest_processed,
        "the newest point is latest-processed"
    );
    assert_eq!(
        snapshot.iter().filter(|p| p.latest_processed).count(),
        1,
        "one latest-processed point"
    );
    if timeline.window_of_point(app) == Some(w3) {
        eprintln!(
            "note: an app-consistent point ({}) landed after phase 3 too: latest-app and latest-processed may coincide",
            app.id
        );
    } else {
        assert_eq!(newest.kind, KIND_CRASH, "{}", describe_points(&snapshot));
        assert_ne!(
            newest.id, app.id,
            "latest-processed is the crash-consistent point after phase 3, not latest-app"
        );
        assert!(newest.time_ms > app.time_ms);
    }

    // Test failovers: an older point by id (crash-consistent, after phase 1), the
    // newest app-consistent one, the newest one.
    let older = snapshot
        .iter()
        .find(|p| p.kind == KIND_CRASH && timeline.window_of_point(p) == Some(1))
        .expect("a crash-consistent point after phase 1");
    for (point, want_kind) in [
        (older.id.to_string(), None),
        ("latest-app".to_string(), Some(KIND_APP)),
        ("latest-processed".to_string(), None),
    ] {
        let before = site.points();
        let t = site.targets("test");
        let given = site.give_back("test-failover", &point, &t);
        let (w, want) = timeline.content(&given, &format!("test failover to {point}"));
        match point.as_str() {
            "latest-app" => {
                let marked = before.iter().find(|p| p.latest_app).expect("latest-app");
                assert!(given.point_id >= marked.id, "{given:?} vs {marked:?}");
            }
            "latest-processed" => {
                let marked = before.last().expect("points");
                assert!(given.point_id >= marked.id, "{given:?} vs {marked:?}");
            }
            id => assert_eq!(given.point_id.to_string(), id, "{given:?}"),
        }
        if let Some(kind) = want_kind {
            assert_eq!(given.kind, kind, "{:?}", given.raw);
        }
        assert_holds(&t, want, &format!("test failover to {point} (window {w})"));
        eprintln!(
            "test failover to {point}: point {} ({}) of window {w} holds the recorded bytes",
            given.point_id, given.kind
        );
        site.test_cleanup(&t);
    }

    // Phase 4, then `latest` at once: only the agent's final point holds phase 4.
    let w4 = timeline.phase(
        || work.phase(3, Duration::from_millis(10)),
        || site.hashes(&ids),
    );
    drop(work);
    let asked_ms = now_ms();
    let t = site.targets("final");
    let given = site.give_back("failover", "latest", &t);
    let drained = Duration::from_millis(now_ms() - asked_ms);
    let (status, stdout) = agent.wait(EXIT_TIMEOUT);
    let report = track_report(&stdout);
    eprintln!(
        "failover to latest took {drained:?}: {:?}\nagent report {report}",
        given.raw
    );
    assert!(
        status.success(),
        "the agent must exit 0 after the failover's shutdown: {status}\n{}",
        agent.log_tail(60)
    );
    assert_eq!(report["stopped"], "shut-down", "{report}");
    assert_eq!(report["shut_down_reported"], true, "{report}");
    assert_eq!(
        report["final_point_id"].as_u64(),
        Some(given.point_id),
        "latest is the agent's final point: {report} vs {:?}",
        given.raw
    );
    assert!(
        given.point_id > asked_ms,
        "the final point was taken after the failover asked for it"
    );
    assert!(marker.exists(), "the shutdown hook did not run");
    let (w, want) = timeline.content(&given, "failover to latest");
    assert_eq!(w, w4, "latest is after the last writes");
    assert_eq!(want, &site.hashes(&ids), "nobody wrote since phase 4");
    assert_holds(&t, want, "failover to latest, materialized");
    for id in ids {
        let mp = site.serve_dir("agent1").join(id);
        assert!(
            !is_mount_point(&mp),
            "the agent left {} mounted",
            mp.display()
        );
    }
    assert_eq!(site.group_state().as_deref(), Some("failover-pending"));

    // Commit; the old source started again is told to forget the group.
    site.cluster.mt_op("commit", GROUP, &[]);
    assert_eq!(site.group_state().as_deref(), Some("failed-back"));
    let log_from = std::fs::read_to_string(site.cluster.logs_dir().join("agent-agent1.log"))
        .map(|s| s.len())
        .unwrap_or(0);
    let mut again = site.spawn_track("agent1", &ids, &extra);
    let (status, stdout) = again.wait(EXIT_TIMEOUT);
    let log = std::fs::read_to_string(site.cluster.logs_dir().join("agent-agent1.log"))
        .unwrap_or_default();
    let said = &log[log_from.min(log.len())..];
    eprintln!(
        "the old source started after the commit: {status}\n{stdout}\n{}",
        lines_with(said, "group").join("\n")
    );
    assert!(
        status.success(),
        "after a committed failover the agent forgets the group and exits 0: {status}\n{said}"
    );
    let report = track_report(&stdout);
    assert_eq!(report["stopped"], "forgotten", "{report}");
    assert_eq!(report["stopped_for_failover"], true, "{report}");
    assert!(
        !stdout.contains("serving "),
        "the forgotten group's disks were served again:\n{stdout}"
    );
    assert!(
        said.contains(LOG_FORGOT) && said.contains(GROUP),
        "the agent's log does not say it forgot group {GROUP}:\n{said}"
    );
    let state_dir = site.cluster.agent("agent1").state_dir;
    for id in ids {
        let state = state_dir.join(format!("{id}.state"));
        assert!(!state.exists(), "{} survived the forget", state.display());
    }
    assert_eq!(site.group_state().as_deref(), Some("failed-back"));
    assert_holds(&t, want, "the failed-back disks are left alone");
    eprintln!(
        "failover_to_each_kind_of_point_returns_the_bytes_at_its_tag: took {:?}",
        started.elapsed()
    );
}

/// `failover --point latest` with the agent killed: the drain times out (short
/// `--drain-timeout-secs`), the error names `latest-processed`, the group stays
/// protected; `failover --point latest-processed` then gives back the newest point,
/// which holds the bytes written before the kill.
#[test]
fn latest_with_an_unreachable_source_fails_and_latest_processed_works() {
    let Some(_one) = gate("latest_with_an_unreachable_source_fails_and_latest_processed_works")
    else {
        return;
    };
    const DRAIN_SECS: u64 = 4;
    let started = Instant::now();
    let ids = ["d0", "d1"];
    let mut site = Site::new(
        ClusterConfig {
            mt_extra: ["--drain-timeout-secs", "4"].map(OsString::from).to_vec(),
            ..ClusterConfig::default()
        },
        &[("d0", 32 * MIB), ("d1", 32 * MIB)],
    );
    let mut timeline = Timeline::new(site.hashes(&ids));
    let mut agent = site.spawn_track("agent1", &ids, &["--crash-interval", "1"]);
    let served = site.wait_serving(&mut agent, &ids);
    let sizes: Vec<u64> = ids.iter().map(|id| site.disk(id).size).collect();
    let mut work = Workload::open(&served, &sizes, 2);
    site.wait_points(&mut [&mut agent], POINT_TIMEOUT, "a first point", |p| {
        !p.is_empty()
    });
    let w1 = timeline.phase(
        || work.phase(10, Duration::from_millis(20)),
        || site.hashes(&ids),
    );
    drop(work);
    // What the test records (the backing images) is what the workload sees.
    for (id, file) in ids.iter().zip(&served) {
        assert_eq!(
            sha256_file(file),
            timeline.windows[w1].hashes[*id],
            "the served file of {id} differs from its backing image"
        );
    }
    let from1 = timeline.windows[w1].from_ms;
    site.wait_points(
        &mut [&mut agent],
        POINT_TIMEOUT,
        "a point after the writes",
        |ps| ps.last().is_some_and(|p| p.id > from1),
    );
    agent.kill9();
    let before = site.points();

    let t = site.targets("final");
    let asked = Instant::now();
    let mut args = point_to_args("latest", &t);
    args.push("--json".into());
    let out = site.cluster.mt_op_output("failover", GROUP, &args);
    let took = asked.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "failover to latest with the agent killed: {} after {took:?}:\n{err}",
        out.status
    );
    assert!(
        !out.status.success(),
        "latest without a source succeeded:\n{err}"
    );
    assert!(
        err.contains("latest-processed"),
        "the error does not point to latest-processed:\n{err}"
    );
    assert!(
        took >= Duration::from_secs(DRAIN_SECS) && took < Duration::from_secs(DRAIN_SECS + 60),
        "the drain gave up after {took:?}, not after about {DRAIN_SECS} s"
    );
    assert_eq!(
        site.group_state().as_deref(),
        Some("protected"),
        "a failed drain changes nothing"
    );
    let after = site.points();
    assert_eq!(
        after.iter().map(|p| p.id).collect::<Vec<_>>(),
        before.iter().map(|p| p.id).collect::<Vec<_>>(),
        "a failed drain changes no point"
    );

    let given = site.give_back("failover", "latest-processed", &t);
    assert_eq!(
        Some(given.point_id),
        before.last().map(|p| p.id),
        "{:?}",
        given.raw
    );
    let (w, want) = timeline.content(&given, "failover to latest-processed");
    assert_eq!(w, w1);
    assert_holds(
        &t,
        want,
        "failover to latest-processed after a failed drain",
    );
    assert_eq!(site.group_state().as_deref(), Some("failover-pending"));
    eprintln!(
        "latest_with_an_unreachable_source_fails_and_latest_processed_works: took {:?}",
        started.elapsed()
    );
}

/// Two agents, one disk each, one group, coordinated points every 2 s with an 800 ms
/// deadline. While agent2 is stopped (SIGSTOP) agent1 abandons every point at the
/// deadline, naming the missing disk, and its writes go on; no group point is listed;
/// once agent2 runs again (reconnecting: it was stopped past the idle timeout),
/// points resume and hold both disks' bytes.
#[test]
fn a_multi_vm_point_missing_an_agent_is_abandoned_cleanly() {
    let Some(_one) = gate("a_multi_vm_point_missing_an_agent_is_abandoned_cleanly") else {
        return;
    };
    const INTERVAL_MS: u64 = 2000;
    const DEADLINE_MS: u64 = 800;
    // Longer than the QUIC idle timeout (10 s): agent2 also has to reconnect.
    const STOPPED_FOR: Duration = Duration::from_secs(14);
    let started = Instant::now();
    let mut site = Site::new(
        ClusterConfig {
            extra_peers: vec![("agent2".into(), "agent".into())],
            ..ClusterConfig::default()
        },
        &[("d0", 32 * MIB), ("d1", 32 * MIB)],
    );
    let interval = (INTERVAL_MS / 1000).to_string();
    let deadline = DEADLINE_MS.to_string();
    let extra = [
        "--coordinated-points",
        "--crash-interval",
        interval.as_str(),
        "--point-deadline-ms",
        deadline.as_str(),
    ];
    let mut agent1 = site.spawn_track("agent1", &["d0"], &extra);
    let mut agent2 = site.spawn_track("agent2", &["d1"], &extra);
    let d0 = site.wait_serving(&mut agent1, &["d0"]);
    site.wait_serving(&mut agent2, &["d1"]);
    let both = ["d0", "d1"];
    let first = site.wait_points(
        &mut [&mut agent1, &mut agent2],
        POINT_TIMEOUT,
        "two group points of both disks",
        |ps| ps.iter().filter(|p| p.disks == both).count() >= 2,
    );
    eprintln!(
        "group points after {:?}: {}",
        started.elapsed(),
        describe_points(&first)
    );
    let mut work = Workload::open(&d0, &[site.disk("d0").size], 3);
    let log1_path = site.cluster.logs_dir().join("agent-agent1.log");
    let log1_from = std::fs::read_to_string(&log1_path).map_or(0, |s| s.len());
    let mt_log_from = site.cluster.mt().log().len();

    // agent2 stopped: agent1 keeps writing d0 and abandons its points.
    let stopped = Stopped::stop(&agent2);
    let stopped_ms = now_ms();
    let until = Instant::now() + STOPPED_FOR;
    let mut slowest = Duration::ZERO;
    let mut writes = 0u32;
    while Instant::now() < until {
        let t0 = Instant::now();
        work.write_one(0);
        work.sync();
        slowest = slowest.max(t0.elapsed());
        writes += 1;
        if writes.is_multiple_of(5) {
            agent1.assert_running("while agent2 is stopped");
            let listed = site.points();
            let new: Vec<&PointInfo> = listed.iter().filter(|p| p.id > stopped_ms).collect();
            assert!(
                new.is_empty(),
                "a group point was listed while agent2 was stopped: {}",
                describe_points(&listed)
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
    let d0_line = status::status_line(&site.cluster, "d0").expect("d0 known");
    let d0_tags: Vec<u64> = d0_line
        .points
        .iter()
        .filter(|(_, id, _)| *id > stopped_ms)
        .map(|(_, id, _)| *id)
        .collect();
    let continued_ms = now_ms();
    stopped.resume();
    let log1 = std::fs::read_to_string(&log1_path).unwrap_or_default();
    let abandoned = lines_with(
        &log1[log1_from.min(log1.len())..],
        LOG_COORDINATED_ABANDONED,
    )
    .into_iter()
    .map(str::to_string)
    .collect::<Vec<_>>();
    let mt_log = site.cluster.mt().log();
    let mt_abandoned = lines_with(&mt_log[mt_log_from.min(mt_log.len())..], LOG_MT_ABANDONED)
        .into_iter()
        .map(str::to_string)
        .collect::<Vec<_>>();
    eprintln!(
        "agent2 stopped for {STOPPED_FOR:?}: {writes} writes into d0, slowest {slowest:?}; \
         d0's own tags in that time at the master target: {d0_tags:?}\n\
         agent1 abandoned:\n{}\nmaster target:\n{}",
        abandoned.join("\n"),
        mt_abandoned.join("\n")
    );
    let slots = (continued_ms - stopped_ms) / INTERVAL_MS;
    assert!(
        abandoned.len() as u64 >= slots.saturating_sub(1).max(1),
        "agent1 abandoned {} points in {slots} slots while agent2 was stopped",
        abandoned.len()
    );
    assert!(
        abandoned.iter().all(|l| l.contains("d1")),
        "an abandoned point's reason does not name the missing disk d1:\n{}",
        abandoned.join("\n")
    );
    assert!(
        !mt_abandoned.is_empty() && mt_abandoned.iter().all(|l| l.contains("d1")),
        "the master target did not log the abandoned points naming d1"
    );
    let bound = Duration::from_millis(DEADLINE_MS) + Duration::from_secs(2);
    assert!(
        slowest < bound,
        "a write into d0 was held {slowest:?} (deadline {DEADLINE_MS} ms)"
    );

    // agent2 runs again: points resume; none of the stopped time ever shows.
    let resumed = site.wait_points(
        &mut [&mut agent1, &mut agent2],
        POINT_TIMEOUT,
        "a group point after agent2 resumed",
        |ps| ps.iter().any(|p| p.id > continued_ms && p.disks == both),
    );
    eprintln!(
        "points resumed {:?} after SIGCONT",
        Duration::from_millis(now_ms() - continued_ms)
    );
    // The slot running at SIGCONT may still commit: agent2 prepares it late.
    let during: Vec<&PointInfo> = resumed
        .iter()
        .filter(|p| p.id > stopped_ms && p.id + INTERVAL_MS <= continued_ms)
        .collect();
    assert!(
        during.is_empty(),
        "points of the time agent2 was stopped are listed: {}",
        describe_points(&resumed)
    );

    // The resumed points hold both disks' bytes.
    work.sync();
    drop(work);
    let quiet_ms = now_ms();
    let hashes = site.hashes(&both);
    let after = site.wait_points(
        &mut [&mut agent1, &mut agent2],
        POINT_TIMEOUT,
        "a group point after the last write",
        |ps| ps.iter().any(|p| p.id > quiet_ms),
    );
    let point = after.iter().find(|p| p.id > quiet_ms).expect("found above");
    let t = site.targets("test");
    let given = site.give_back("test-failover", &point.id.to_string(), &t);
    assert_eq!(given.point_id, point.id);
    assert_holds(&t, &hashes, "a coordinated point after agent2 resumed");
    site.test_cleanup(&t);

    let (r1, _) = status::sigterm_track(&mut agent1, EXIT_TIMEOUT);
    let (r2, _) = status::sigterm_track(&mut agent2, EXIT_TIMEOUT);
    eprintln!("agent1 report {r1}\nagent2 report {r2}");
    let log1 = std::fs::read_to_string(&log1_path).unwrap_or_default();
    assert_eq!(
        uint(&r1, "points_abandoned"),
        lines_with(&log1, LOG_COORDINATED_ABANDONED).len() as u64,
        "points_abandoned and the abandoned points in agent1's log disagree"
    );
    assert!(uint(&r1, "points_abandoned") >= abandoned.len() as u64);
    eprintln!(
        "a_multi_vm_point_missing_an_agent_is_abandoned_cleanly: took {:?}",
        started.elapsed()
    );
}

/// A failover rolled back in place while the agent keeps running, then cancelled: the
/// agent is told at its next check-in that the replica no longer holds what it
/// shipped, starts a new generation and resyncs by scan while it goes on serving the
/// disk, and replication converges again: the replica equals the backing image at a
/// point after the next writes. Without that, everything the agent shipped in its old
/// generation would be obsolete at the master target, forever.
#[test]
fn a_running_agent_resyncs_after_a_cancelled_roll_back() {
    let Some(_one) = gate("a_running_agent_resyncs_after_a_cancelled_roll_back") else {
        return;
    };
    let ids = ["d0"];
    let mut site = Site::new(ClusterConfig::default(), &[("d0", 32 * MIB)]);
    let mut timeline = Timeline::new(site.hashes(&ids));
    let mut agent = site.spawn_track("agent1", &ids, &["--crash-interval", "1"]);
    let served = site.wait_serving(&mut agent, &ids);
    let sizes: Vec<u64> = ids.iter().map(|id| site.disk(id).size).collect();
    let mut work = Workload::open(&served, &sizes, 7);
    site.wait_points(&mut [&mut agent], POINT_TIMEOUT, "a first point", |p| {
        !p.is_empty()
    });
    let phase_and_point =
        |timeline: &mut Timeline, work: &mut Workload, agent: &mut AgentProcess, what: &str| {
            let w = timeline.phase(
                || work.phase(8, Duration::from_millis(20)),
                || site.hashes(&ids),
            );
            let from = timeline.windows[w].from_ms;
            site.wait_points(&mut [agent], POINT_TIMEOUT, what, |ps| {
                ps.last().is_some_and(|p| p.id > from)
            });
            (w, site.points().last().cloned().expect("a point"))
        };
    let (w1, p1) = phase_and_point(
        &mut timeline,
        &mut work,
        &mut agent,
        "a point after phase 1",
    );
    phase_and_point(
        &mut timeline,
        &mut work,
        &mut agent,
        "a point after phase 2",
    );

    // Roll the replica back to p1 with the agent still running, then cancel.
    site.cluster
        .mt_op("failover", GROUP, &point_to_args(&p1.id.to_string(), &[]));
    let replica = replica_path(&site.cluster, "d0");
    assert_eq!(
        sha256_file(&replica),
        timeline.windows[w1].hashes["d0"],
        "the replica rolled back in place holds point {}",
        p1.id
    );
    site.cluster.mt_op("failover", GROUP, &["--cancel".into()]);
    let cancelled_ms = boomerang_common::config::now_ms();

    // New writes; a point after them must show the replica equal to the disk.
    let (w3, p3) = phase_and_point(
        &mut timeline,
        &mut work,
        &mut agent,
        "a point after the cancel and phase 3",
    );
    assert!(p3.id > cancelled_ms);
    drop(work);
    let want = &timeline.windows[w3].hashes["d0"];
    let t0 = Instant::now();
    while sha256_file(&replica) != *want {
        assert!(
            t0.elapsed() < POINT_TIMEOUT,
            "the replica did not converge after the cancel\n{}",
            agent.log_tail(40)
        );
        thread::sleep(Duration::from_millis(200));
    }
    let log = agent.log_tail(100_000);
    assert!(
        !lines_with(&log, "rolled the replica back").is_empty()
            || !lines_with(&log, "asks for a new generation").is_empty(),
        "the agent was told to resync:\n{}",
        agent.log_tail(40)
    );
    let t = site.targets("after");
    site.give_back("test-failover", &p3.id.to_string(), &t);
    assert_holds(
        &t,
        &timeline.windows[w3].hashes,
        "the first point after the resync",
    );
    assert_eq!(site.group_state().as_deref(), Some("protected"));
}
