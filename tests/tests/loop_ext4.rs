//! An ext4 filesystem on a loop device, replicated while mounted, with the agent's
//! `--freeze` taking an app-consistent cut; and the freeze always being undone when the
//! agent fails inside the frozen window (SIGTERM, a dead process server, SIGKILL and
//! the next start).
//!
//! Privileged: needs root, loop devices, ext4 tools and fsfreeze. Without them each
//! test prints `SKIPPED` and returns; with `BOOMERANG_PRIVILEGED_TESTS=1` a missing
//! prerequisite fails. Run: `BOOMERANG_PRIVILEGED_TESTS=1 cargo test -p
//! boomerang-tests --test loop_ext4`.
//!
//! A frozen filesystem is seen from outside as a write that blocks: a [`Probe`] thread
//! writes a small file over and over. To act inside the agent's frozen window without
//! racing it, a test stops the agent there (SIGSTOP) once a probe write blocks, checks
//! that the write stays blocked, and only then injects the failure.

mod support;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use boomerang_common::hash::ChunkHash;
use boomerang_tests::cli::{AgentSyncArgs, CUT_APP_CONSISTENT};
use boomerang_tests::privileged::find_tool;
use boomerang_tests::rng::DataRng;
use boomerang_tests::tree::content_hash;
use boomerang_tests::{
    assert_trees_equal, e2fsck_clean, hash_tree, mkfs_ext4, require_privileged, write_tree,
    Cluster, ClusterConfig, LoopDevice, Mount, Need, TreeHashes,
};

use support::{disk_status, replica_path, AgentProcess, MIB};

const NEEDS: &[Need] = &[
    Need::Root,
    Need::LoopDevices,
    Need::Ext4Tools,
    Need::Fsfreeze,
];
const DISK: &str = "d0";
/// Where the churn writer puts its files, beside the fixed tree.
const CHURN_DIR: &str = "churn";
/// Where the probe writes.
const PROBE_DIR: &str = "probe";
/// A probe write blocked this long means the filesystem is (very likely) frozen.
const BLOCKED: Duration = Duration::from_millis(30);
/// "Writable again right after": a fresh write completes within this.
const WRITABLE_WITHIN: Duration = Duration::from_secs(3);
/// How long one sync may take.
const SYNC_TIMEOUT: Duration = Duration::from_secs(90);

/// A sparse image file of `size` bytes.
fn sparse_image(path: &Path, size: u64) {
    File::create(path)
        .and_then(|f| f.set_len(size))
        .unwrap_or_else(|e| panic!("create sparse image {}: {e}", path.display()));
}

/// `fsfreeze -u` on drop, whatever happened: declared after the mount and before the
/// threads writing to it, so a failing test never leaves a frozen filesystem (and
/// never joins a writer blocked on one).
#[derive(Debug)]
struct ThawOnDrop(PathBuf);

impl Drop for ThawOnDrop {
    fn drop(&mut self) {
        // Not frozen (the normal case) makes fsfreeze -u fail with EINVAL: ignored.
        let tool = find_tool("fsfreeze").unwrap_or_else(|| PathBuf::from("fsfreeze"));
        let _ = Command::new(tool).arg("-u").arg(&self.0).output();
    }
}

/// A thread writing a 4 KiB file on the filesystem over and over, so the test can see
/// whether writes go through (thawed) or block (frozen).
#[derive(Debug)]
struct Probe {
    stop: Arc<AtomicBool>,
    /// Writes completed so far.
    completed: Arc<AtomicU64>,
    /// When the write in progress started, if one is.
    in_write_since: Arc<Mutex<Option<Instant>>>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Probe {
    fn start(mountpoint: &Path) -> Probe {
        let dir = mountpoint.join(PROBE_DIR);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let stop = Arc::new(AtomicBool::new(false));
        let completed = Arc::new(AtomicU64::new(0));
        let in_write_since = Arc::new(Mutex::new(None));
        let handle = {
            let (stop, completed, since) =
                (stop.clone(), completed.clone(), in_write_since.clone());
            thread::spawn(move || {
                let block = [0x5au8; 4096];
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    *since.lock().expect("probe lock") = Some(Instant::now());
                    let path = dir.join(format!("p{}", n % 8));
                    File::create(&path)
                        .and_then(|mut f| f.write_all(&block))
                        .unwrap_or_else(|e| panic!("probe write {}: {e}", path.display()));
                    *since.lock().expect("probe lock") = None;
                    completed.fetch_add(1, Ordering::SeqCst);
                    n += 1;
                    thread::sleep(Duration::from_millis(5));
                }
            })
        };
        Probe {
            stop,
            completed,
            in_write_since,
            handle: Some(handle),
        }
    }

    /// How long the write in progress has been blocked, if one is.
    fn blocked_for(&self) -> Option<Duration> {
        self.in_write_since
            .lock()
            .expect("probe lock")
            .map(|t| t.elapsed())
    }

    /// Whether a write that starts now completes within `timeout`.
    fn writable_within(&self, timeout: Duration) -> bool {
        // Two more completions: at least one whole write started after this call.
        let target = self.completed.load(Ordering::SeqCst) + 2;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.completed.load(Ordering::SeqCst) >= target {
                return true;
            }
            thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// Panics unless the probe write in progress stays blocked for `hold` more.
    fn assert_blocked_for(&self, hold: Duration, why: &str) {
        let before = self.completed.load(Ordering::SeqCst);
        thread::sleep(hold);
        assert!(
            self.completed.load(Ordering::SeqCst) == before && self.blocked_for().is_some(),
            "{why}: a write completed, so the filesystem is not frozen"
        );
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A thread creating files under `churn/` while a sync runs, so the first pass scans
/// a filesystem that changes under it. It records every file it completed, and the
/// name of the one it was writing when stopped.
#[derive(Debug)]
struct Churn {
    stop: Arc<AtomicBool>,
    completed: Arc<Mutex<BTreeMap<u64, ChunkHash>>>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Churn {
    /// Total bytes the writer writes at most (then it idles).
    const BUDGET: u64 = 40 * MIB;

    fn start(mountpoint: &Path, seed: u64) -> Churn {
        let dir = mountpoint.join(CHURN_DIR);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let stop = Arc::new(AtomicBool::new(false));
        let completed = Arc::new(Mutex::new(BTreeMap::new()));
        let handle = {
            let (stop, completed) = (stop.clone(), completed.clone());
            thread::spawn(move || {
                let mut rng = DataRng::new(seed);
                let mut written = 0u64;
                let mut n = 0u64;
                let mut buf = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    if written >= Self::BUDGET {
                        thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    let len = rng.between(16 << 10, 256 << 10);
                    buf.resize(usize::try_from(len).expect("under 256 KiB"), 0);
                    rng.fill(&mut buf);
                    let path = dir.join(churn_name(n));
                    File::create(&path)
                        .and_then(|mut f| f.write_all(&buf))
                        .unwrap_or_else(|e| panic!("churn write {}: {e}", path.display()));
                    let hash = content_hash(&mut buf.as_slice()).expect("hash memory");
                    completed.lock().expect("churn lock").insert(n, hash);
                    written += len;
                    n += 1;
                    thread::sleep(Duration::from_millis(10));
                }
            })
        };
        Churn {
            stop,
            completed,
            handle: Some(handle),
        }
    }

    fn completed_count(&self) -> usize {
        self.completed.lock().expect("churn lock").len()
    }

    /// Stops the writer and returns the hashes of the files it completed, by number.
    fn finish(mut self) -> BTreeMap<u64, ChunkHash> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            h.join().expect("churn writer thread");
        }
        std::mem::take(&mut *self.completed.lock().expect("churn lock"))
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn churn_name(n: u64) -> String {
    format!("c{n:05}.bin")
}

/// Splits a tree's hashes into the churn files (by number) and the rest.
fn split_churn(tree: TreeHashes) -> (BTreeMap<u64, (PathBuf, ChunkHash)>, TreeHashes) {
    let mut churn = BTreeMap::new();
    let mut rest = TreeHashes::new();
    for (path, hash) in tree {
        let number = path
            .strip_prefix(CHURN_DIR)
            .ok()
            .and_then(|p| p.to_str())
            .and_then(|name| name.strip_prefix('c')?.strip_suffix(".bin")?.parse().ok());
        match number {
            Some(n) => {
                churn.insert(n, (path, hash));
            }
            None => {
                rest.insert(path, hash);
            }
        }
    }
    (churn, rest)
}

/// A cluster plus an ext4 filesystem on a loop device over a sparse image of `size`,
/// mounted read-write at `<root>/mnt`.
struct SourceFs {
    mount: Mount,
    dev: LoopDevice,
    cluster: Cluster,
}

impl SourceFs {
    fn new(size: u64) -> SourceFs {
        let cluster = Cluster::start(ClusterConfig::default());
        let image = cluster.root().join("source.img");
        sparse_image(&image, size);
        let dev = LoopDevice::attach(&image);
        mkfs_ext4(dev.path());
        let mount = Mount::new(dev.path(), &cluster.root().join("mnt"), false);
        SourceFs {
            mount,
            dev,
            cluster,
        }
    }

    /// `agent sync --disk d0=/dev/loopN --freeze <mnt>` plus `extra`.
    fn agent_args(&self, extra: &[&str]) -> AgentSyncArgs {
        let mut args = self
            .cluster
            .agent1()
            .disk(DISK, self.dev.path())
            .freeze(self.mount.dir());
        args.extra.extend(extra.iter().map(Into::into));
        args
    }
}

impl std::fmt::Debug for SourceFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SourceFs({:?} on {:?})", self.dev, self.mount)
    }
}

/// Checks the replica of `d0`: an app-consistent cut, `e2fsck -fn` clean, and, mounted
/// read-only without journal replay, the tree `expected` (plus whatever `churn_check`
/// accepts under `churn/`; probe files are ignored).
fn check_replica(
    src: &SourceFs,
    expected: &TreeHashes,
    churn_check: impl FnOnce(BTreeMap<u64, (PathBuf, ChunkHash)>),
) {
    let status = disk_status(&src.cluster, DISK).expect("the master target knows d0");
    assert!(status.consistent, "{status:?}");
    assert_eq!(
        status.cut.as_deref(),
        Some(CUT_APP_CONSISTENT),
        "the frozen final pass makes an app-consistent cut: {status:?}"
    );
    assert_eq!(status.integrity_failures, 0, "{status:?}");
    let replica = replica_path(&src.cluster, DISK);
    let dev = LoopDevice::attach_read_only(&replica);
    if let Err(e) = e2fsck_clean(dev.path()) {
        panic!("the replica's filesystem is not clean:\n{e}");
    }
    let mount = Mount::with_options(
        dev.path(),
        &src.cluster.root().join("replica-mnt"),
        "ro,noload",
    );
    let (churn, mut rest) = split_churn(hash_tree(mount.dir()));
    rest.retain(|p, _| !p.starts_with(PROBE_DIR));
    assert_trees_equal(expected, &rest);
    churn_check(churn);
    mount.unmount();
    dev.detach();
}

#[test]
fn ext4_on_loop_with_freeze_replicates_files_exactly() {
    if !require_privileged("ext4_on_loop_with_freeze_replicates_files_exactly", NEEDS) {
        return;
    }
    let src = SourceFs::new(256 * MIB);
    let _thaw = ThawOnDrop(src.mount.dir().to_path_buf());
    let expected = write_tree(src.mount.dir(), 7, 40 * MIB);

    // Files keep being created while the first pass scans; the frozen final pass
    // must still give a cut where every file the writer finished before the freeze is
    // whole and nothing after it exists.
    let churn = Churn::start(src.mount.dir(), 70);
    let deadline = Instant::now() + Duration::from_secs(10);
    while churn.completed_count() < 3 {
        assert!(Instant::now() < deadline, "the churn writer does not write");
        thread::sleep(Duration::from_millis(10));
    }
    let started = Instant::now();
    let mut agent = AgentProcess::spawn(&src.cluster, &src.agent_args(&[]));
    let report = agent.wait_success(SYNC_TIMEOUT);
    let sync_secs = started.elapsed();
    let written = churn.finish();
    let line = &report.raw["disks"][0];
    assert_eq!(line["tag"], CUT_APP_CONSISTENT, "{}", report.raw);
    assert!(
        line["passes"].as_u64().is_some_and(|p| p >= 2),
        "a first pass and a frozen final pass: {}",
        report.raw
    );

    // The fixed tree is intact on the source too (nothing above touched it).
    let (_, mut source_rest) = split_churn(hash_tree(src.mount.dir()));
    source_rest.retain(|p, _| !p.starts_with(PROBE_DIR));
    assert_trees_equal(&expected, &source_rest);

    check_replica(&src, &expected, |churn| {
        // The cut is a prefix of the writer's history: files 0..k whole, then at most
        // the one being written at the freeze (created, its data not yet written).
        let k = (0u64..)
            .take_while(|n| {
                written
                    .get(n)
                    .is_some_and(|hash| churn.get(n).is_some_and(|(_, h)| h == hash))
            })
            .count() as u64;
        assert!(k >= 3, "files finished before the sync started are missing: {k} whole churn files in the replica");
        let beyond: Vec<_> = churn.range(k..).collect();
        match beyond.as_slice() {
            [] => {}
            [(n, (path, hash))] if **n == k => {
                let empty = content_hash(&mut [].as_slice()).expect("hash memory");
                assert!(
                    *hash == empty,
                    "{} is in the cut but neither whole nor empty",
                    path.display()
                );
            }
            _ => panic!(
                "the replica's churn files are not a prefix of what the writer wrote: {k} whole, then {:?}",
                beyond.iter().map(|(_, (p, _))| p).collect::<Vec<_>>()
            ),
        }
        eprintln!(
            "sync took {sync_secs:?}; the cut holds {k} of {} churn files",
            written.len()
        );
    });
}

/// Runs syncs of `src` with `extra` arguments (and a probe on the filesystem) until one
/// is caught inside its frozen window: a probe write blocks, the agent is stopped
/// there (SIGSTOP), and the write stays blocked. Returns that agent, stopped. A sync
/// whose window passes before it is caught runs to its end and the next one tries
/// again (each sync freezes once).
fn catch_agent_in_freeze_window(src: &SourceFs, probe: &Probe, extra: &[&str]) -> AgentProcess {
    const ATTEMPTS: usize = 4;
    for attempt in 1..=ATTEMPTS {
        let mut agent = AgentProcess::spawn(&src.cluster, &src.agent_args(extra));
        let deadline = Instant::now() + SYNC_TIMEOUT;
        loop {
            if agent.try_exit().is_some() {
                let (status, _) = agent.wait(Duration::ZERO);
                assert!(
                    status.success(),
                    "attempt {attempt}: the sync failed on its own: {status}\n{}",
                    agent.log_tail(40)
                );
                eprintln!("attempt {attempt}: the frozen window passed uncaught; syncing again");
                break;
            }
            if probe.blocked_for().is_some_and(|d| d >= BLOCKED) {
                agent.signal(libc::SIGSTOP);
                let before = probe.completed.load(Ordering::SeqCst);
                thread::sleep(Duration::from_millis(300));
                if probe.completed.load(Ordering::SeqCst) == before && probe.blocked_for().is_some()
                {
                    return agent;
                }
                // A slow write, or the agent thawed just before it stopped.
                agent.signal(libc::SIGCONT);
            }
            assert!(
                Instant::now() < deadline,
                "attempt {attempt}: the sync did not end within {SYNC_TIMEOUT:?}\n{}",
                agent.log_tail(40)
            );
            thread::sleep(Duration::from_millis(5));
        }
    }
    panic!("no sync was caught inside its frozen window in {ATTEMPTS} attempts");
}

/// A mounted 256 MiB source holding a fixed 16 MiB tree (a 256 MiB disk makes the
/// frozen pass long enough to be caught in a few attempts).
fn frozen_window_setup(seed: u64) -> (SourceFs, TreeHashes) {
    let src = SourceFs::new(256 * MIB);
    let expected = write_tree(src.mount.dir(), seed, 16 * MIB);
    (src, expected)
}

/// After a failed sync, a plain sync with `--freeze` works again and gives an
/// app-consistent replica of the fixed tree.
fn sync_again_app_consistent(src: &SourceFs, expected: &TreeHashes) {
    let mut agent = AgentProcess::spawn(&src.cluster, &src.agent_args(&[]));
    let report = agent.wait_success(SYNC_TIMEOUT);
    assert_eq!(
        report.raw["disks"][0]["tag"], CUT_APP_CONSISTENT,
        "{}",
        report.raw
    );
    check_replica(src, expected, |_| {});
}

#[test]
fn frozen_filesystem_is_thawed_when_the_agent_is_terminated_in_the_freeze_window() {
    if !require_privileged(
        "frozen_filesystem_is_thawed_when_the_agent_is_terminated_in_the_freeze_window",
        NEEDS,
    ) {
        return;
    }
    let (src, expected) = frozen_window_setup(11);
    let probe = Probe::start(src.mount.dir());
    let _thaw = ThawOnDrop(src.mount.dir().to_path_buf());
    let mut agent = catch_agent_in_freeze_window(&src, &probe, &[]);

    agent.signal(libc::SIGTERM);
    agent.signal(libc::SIGCONT);
    let signalled = Instant::now();
    let (status, stdout) = agent.wait(Duration::from_secs(15));
    let exited_after = signalled.elapsed();
    assert!(
        !status.success(),
        "a sync interrupted in its frozen pass must not report success: {status}, {stdout}"
    );
    assert!(
        probe.writable_within(WRITABLE_WITHIN),
        "the filesystem is still frozen after the agent exited on SIGTERM"
    );
    assert!(
        exited_after < Duration::from_secs(10),
        "the agent took {exited_after:?} to thaw and exit after SIGTERM"
    );
    sync_again_app_consistent(&src, &expected);
}

#[test]
fn frozen_filesystem_is_thawed_when_the_process_server_dies_in_the_freeze_window() {
    if !require_privileged(
        "frozen_filesystem_is_thawed_when_the_process_server_dies_in_the_freeze_window",
        NEEDS,
    ) {
        return;
    }
    let (mut src, _) = frozen_window_setup(12);
    let probe = Probe::start(src.mount.dir());
    let _thaw = ThawOnDrop(src.mount.dir().to_path_buf());
    let mut agent = catch_agent_in_freeze_window(&src, &probe, &["--retry-secs", "2"]);

    src.cluster.ps().kill9();
    agent.signal(libc::SIGCONT);
    let killed = Instant::now();
    // The agent sees the dead connection at the QUIC idle timeout (30 s), then its
    // retries (--retry-secs 2) are long used up.
    let (status, stdout) = agent.wait(Duration::from_secs(60));
    let exited_after = killed.elapsed();
    assert!(
        !status.success(),
        "the process server never came back, so the sync must fail: {status}, {stdout}"
    );
    assert!(
        probe.writable_within(WRITABLE_WITHIN),
        "the filesystem is still frozen after the agent gave up on the process server\n{}",
        agent.log_tail(20)
    );
    eprintln!("the agent gave up {exited_after:?} after the process server died");
}

#[test]
fn frozen_filesystem_left_by_a_killed_agent_is_thawed_by_the_next_start() {
    if !require_privileged(
        "frozen_filesystem_left_by_a_killed_agent_is_thawed_by_the_next_start",
        NEEDS,
    ) {
        return;
    }
    let (src, expected) = frozen_window_setup(13);
    let probe = Probe::start(src.mount.dir());
    let _thaw = ThawOnDrop(src.mount.dir().to_path_buf());
    let mut agent = catch_agent_in_freeze_window(&src, &probe, &[]);

    agent.kill9();
    probe.assert_blocked_for(
        Duration::from_secs(1),
        "after SIGKILL of the agent in its frozen window nothing can thaw",
    );
    // The next agent thaws what its state says a previous one left frozen, at start.
    let mut next = AgentProcess::spawn(&src.cluster, &src.agent_args(&[]));
    assert!(
        probe.writable_within(WRITABLE_WITHIN),
        "the next agent did not thaw the filesystem the killed one left frozen\n{}",
        next.log_tail(20)
    );
    let report = next.wait_success(SYNC_TIMEOUT);
    assert_eq!(
        report.raw["disks"][0]["tag"], CUT_APP_CONSISTENT,
        "{}",
        report.raw
    );
    check_replica(&src, &expected, |_| {});
}

#[test]
fn freeze_deadline_thaws_while_the_agent_is_stuck_in_the_freeze_window() {
    if !require_privileged(
        "freeze_deadline_thaws_while_the_agent_is_stuck_in_the_freeze_window",
        NEEDS,
    ) {
        return;
    }
    const DEADLINE_SECS: u64 = 3;
    let (mut src, expected) = frozen_window_setup(14);
    let config = src.cluster.root().join("agent.toml");
    std::fs::write(
        &config,
        format!("freeze_deadline_secs = {DEADLINE_SECS}.0\n"),
    )
    .expect("write the agent config");
    let config_arg = config.to_str().expect("UTF-8 scratch path");
    let probe = Probe::start(src.mount.dir());
    let _thaw = ThawOnDrop(src.mount.dir().to_path_buf());
    let mut agent = catch_agent_in_freeze_window(&src, &probe, &["--config", config_arg]);

    // The process server stops answering: the frozen pass cannot finish, and only the
    // deadline can give the writes back.
    src.cluster.ps().signal(libc::SIGSTOP);
    agent.signal(libc::SIGCONT);
    let resumed = Instant::now();
    let thawed = probe.writable_within(Duration::from_secs(DEADLINE_SECS + 3));
    let thawed_after = resumed.elapsed();
    src.cluster.ps().signal(libc::SIGCONT);
    assert!(
        thawed,
        "still frozen {thawed_after:?} after the agent resumed, past the {DEADLINE_SECS} s freeze deadline\n{}",
        agent.log_tail(20)
    );
    agent.assert_running("when the deadline thawed: the watchdog, not the agent's exit, thawed");

    // The sync then completes its data but says the app-consistent point was lost.
    let (status, stdout) = agent.wait(SYNC_TIMEOUT);
    assert!(
        !status.success(),
        "an abandoned app-consistent point must not report success: {status}, {stdout}"
    );
    let st = disk_status(&src.cluster, DISK).expect("disk known");
    assert!(st.consistent, "{st:?}");
    assert_eq!(
        st.cut.as_deref(),
        Some(boomerang_tests::cli::CUT_SYNC_COMPLETE),
        "a pass whose freeze was cut short is only sync-complete: {st:?}"
    );
    sync_again_app_consistent(&src, &expected);
}
