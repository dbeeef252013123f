//! Crash tests: the process server and the master target are SIGKILLed in the middle
//! of an agent's sync and restarted on the same address and state. The sync must
//! finish on its own (the agent retries), and the replica must be the source byte for
//! byte: nothing acknowledged was lost (rule 1) and batches that were sent again after
//! the crash changed nothing the second time (rule 2).
//!
//! No root needed: disks are image files.
//!
//! Timing: a daemon restarted on the same address is reachable at once, but its peer
//! notices that its old connection is dead only at the QUIC idle timeout (30 s; no
//! stateless reset reaches it from the new process), so each test that kills a daemon
//! spends about 30 s waiting for that.

mod support;

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use boomerang_tests::cli::{MtDiskStatus, SyncReport, CUT_SYNC_COMPLETE};
use boomerang_tests::{make_mixed_image, sha256_file, Cluster, ClusterConfig};

use support::{disk_status, replica_path, AgentProcess, MIB};

const DISK: &str = "d0";
const DISK_SIZE: u64 = 256 * MIB;
/// How long one whole sync, kills and restarts included, may take.
const SYNC_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the first bytes may take to reach the replica.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a crashed daemon stays down.
const DOWNTIME: Duration = Duration::from_secs(1);
/// The process server closes a spool segment once it passes 64 MiB
/// (`process-server/src/spool.rs`, `SEGMENT_TARGET`); a record is at most a 4 MiB
/// batch plus framing. So one open segment is at most this large.
const MAX_OPEN_SEGMENT: u64 = 64 * MIB + 8 * MIB;

/// A cluster, a 256 MiB mixed image and an agent syncing it, already started.
fn start_sync(seed: u64) -> (Cluster, PathBuf, AgentProcess) {
    let cluster = Cluster::start(ClusterConfig::default());
    let image = cluster.root().join("source.img");
    make_mixed_image(&image, DISK_SIZE, seed);
    let args = cluster.agent1().disk(DISK, &image);
    let agent = AgentProcess::spawn(&cluster, &args);
    (cluster, image, agent)
}

/// Checks what a completed first sync must leave behind: the replica is the source,
/// the status is a consistent sync-complete cut of generation 1 whose next seq
/// follows the agent's tag, and no batch failed its hash check.
fn assert_replicated(cluster: &Cluster, source: &Path, report: &SyncReport) -> MtDiskStatus {
    let replica = replica_path(cluster, DISK);
    assert_eq!(
        sha256_file(&replica),
        sha256_file(source),
        "replica {} differs from the source {}",
        replica.display(),
        source.display()
    );
    let status = disk_status(cluster, DISK).expect("the master target knows the disk");
    assert!(status.consistent, "replica not consistent: {status:?}");
    assert_eq!(status.cut.as_deref(), Some(CUT_SYNC_COMPLETE), "{status:?}");
    assert_eq!(status.size, DISK_SIZE, "{status:?}");
    assert_eq!(
        status.generation, 1,
        "a first sync is generation 1: {status:?}"
    );
    assert_eq!(status.integrity_failures, 0, "{status:?}");
    let line = &report.raw["disks"][0];
    assert_eq!(line["generation"], 1, "agent report: {}", report.raw);
    let tag_seq = line["tag_seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("agent report has no tag_seq: {}", report.raw));
    assert_eq!(
        status.next_seq,
        tag_seq + 1,
        "the master target should expect the seq after the agent's final tag: {status:?}, report {}",
        report.raw
    );
    status
}

/// Polls the master target's status every 50 ms until disk `id` has applied more than
/// `above` bytes, while `agent` still runs; returns the bytes applied. Panics when the
/// agent exits first (the sync finished before the test could interfere) or after
/// `timeout`.
fn wait_for_applied(
    cluster: &Cluster,
    agent: &mut AgentProcess,
    id: &str,
    above: u64,
    timeout: Duration,
) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        agent.assert_running(&format!(
            "while waiting for disk {id} to pass {above} applied bytes"
        ));
        if let Some(s) = disk_status(cluster, id) {
            if s.bytes_applied > above {
                return s.bytes_applied;
            }
        }
        assert!(
            Instant::now() < deadline,
            "disk {id} did not pass {above} applied bytes within {timeout:?}: {:?}\n{}",
            disk_status(cluster, id),
            agent.log_tail(40)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// The spool's segment files and their sizes.
fn spool_segments(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut segments: Vec<(PathBuf, u64)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("list the spool {}: {e}", dir.display()))
        .map(|e| e.expect("spool directory entry"))
        .filter(|e| e.file_name().to_string_lossy().ends_with(".spool"))
        .map(|e| {
            let len = e.metadata().expect("stat a spool segment").len();
            (e.path(), len)
        })
        .collect();
    segments.sort();
    segments
}

/// Waits until the spool holds nothing the master target has not acknowledged, as far
/// as it can be seen from outside: the process server deletes a segment file once
/// every record in it is acknowledged, and keeps only the segment it appends to. (The
/// acknowledged records inside that open segment are not visible on disk: deletion
/// is per segment, and a replay after a crash resends them as harmless duplicates.)
fn assert_spool_drained(cluster: &Cluster) {
    let dir = cluster.ps_spool_dir();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let segments = spool_segments(&dir);
        if segments.len() == 1 && segments[0].1 <= MAX_OPEN_SEGMENT {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the spool still holds closed segments after the sync (unacknowledged records?): {segments:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn process_server_killed_mid_transfer() {
    let (mut cluster, image, mut agent) = start_sync(101);
    let applied = wait_for_applied(&cluster, &mut agent, DISK, 0, PROGRESS_TIMEOUT);

    agent.assert_running("when the process server was to be killed");
    cluster.ps().kill9();
    let at_kill = disk_status(&cluster, DISK).expect("disk known");
    thread::sleep(DOWNTIME);
    cluster.restart_ps();
    assert!(
        at_kill.next_seq > 0 && !at_kill.consistent,
        "the kill should land mid-transfer (applied {applied} bytes): {at_kill:?}"
    );

    let report = agent.wait_success(SYNC_TIMEOUT);
    let status = assert_replicated(&cluster, &image, &report);
    assert!(
        status.bytes_applied >= at_kill.bytes_applied,
        "{status:?} vs {at_kill:?}"
    );
    assert_spool_drained(&cluster);
}

#[test]
fn master_target_killed_mid_transfer() {
    let (mut cluster, image, mut agent) = start_sync(102);
    wait_for_applied(&cluster, &mut agent, DISK, 0, PROGRESS_TIMEOUT);

    agent.assert_running("when the master target was to be killed");
    cluster.mt().kill9();
    let at_kill = disk_status(&cluster, DISK).expect("disk known");
    assert!(!at_kill.consistent, "killed mid-transfer: {at_kill:?}");
    thread::sleep(DOWNTIME);
    cluster.restart_mt();
    // What the master target holds after a crash never goes backwards.
    let after_restart = disk_status(&cluster, DISK).expect("disk known");
    assert_eq!(after_restart.generation, 1, "{after_restart:?}");
    assert!(
        after_restart.next_seq >= at_kill.next_seq,
        "{after_restart:?} vs {at_kill:?}"
    );

    let report = agent.wait_success(SYNC_TIMEOUT);
    assert_replicated(&cluster, &image, &report);
    assert_spool_drained(&cluster);
}

#[test]
fn repeated_kills() {
    const ROUNDS: usize = 3;
    // A restarted daemon is reachable at once, but the peer's connection to the
    // killed one only fails at the QUIC idle timeout (30 s), so waiting for fresh
    // progress before every kill would cost half a minute per kill. Each kill waits
    // for progress at most this long after the previous restart, then lands anyway:
    // what it hits then is recovery itself (spool replay, reconnects, resends).
    const PROGRESS_GRACE: Duration = Duration::from_millis(1500);
    let started = Instant::now();
    let (mut cluster, image, mut agent) = start_sync(103);
    let mut applied = wait_for_applied(&cluster, &mut agent, DISK, 0, PROGRESS_TIMEOUT);
    let mut kills = Vec::new();
    for round in 0..ROUNDS {
        for victim in ["ps", "mt"] {
            if !kills.is_empty() {
                applied = applied_within(&cluster, applied, PROGRESS_GRACE);
            }
            agent.assert_running(&format!("before killing the {victim} in round {round}"));
            let status = disk_status(&cluster, DISK).expect("disk known");
            assert!(!status.consistent, "the sync is still running: {status:?}");
            if victim == "ps" {
                cluster.ps().kill9();
            } else {
                cluster.mt().kill9();
            }
            kills.push((victim, applied, started.elapsed()));
            thread::sleep(Duration::from_millis(200));
            if victim == "ps" {
                cluster.restart_ps();
            } else {
                cluster.restart_mt();
            }
        }
    }
    let report = agent.wait_success(SYNC_TIMEOUT);
    eprintln!(
        "kills (victim, bytes applied, at): {kills:?}; sync done after {:?}",
        started.elapsed()
    );
    assert_replicated(&cluster, &image, &report);
    assert_spool_drained(&cluster);
}

/// Bytes applied to the disk once they pass `above`, or after `grace` whatever they
/// are then.
fn applied_within(cluster: &Cluster, above: u64, grace: Duration) -> u64 {
    let deadline = Instant::now() + grace;
    loop {
        let applied = disk_status(cluster, DISK).map_or(0, |s| s.bytes_applied);
        if applied > above || Instant::now() >= deadline {
            return applied;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn agent_terminated_mid_transfer_exits_promptly_and_the_next_sync_resumes() {
    let (cluster, image, mut agent) = start_sync(104);
    wait_for_applied(&cluster, &mut agent, DISK, 0, PROGRESS_TIMEOUT);

    agent.assert_running("when it was to get SIGTERM");
    agent.signal(libc::SIGTERM);
    let signalled = Instant::now();
    // An operator's SIGTERM (systemd stop) ends the sync within seconds, resumable.
    let (status, stdout) = agent.wait(Duration::from_secs(15));
    assert!(
        !status.success(),
        "a sync interrupted by SIGTERM must not report success: {status}, {stdout}"
    );
    eprintln!("the agent exited {:?} after SIGTERM", signalled.elapsed());

    let args = cluster.agent1().disk(DISK, &image);
    let report = AgentProcess::spawn(&cluster, &args).wait_success(SYNC_TIMEOUT);
    assert_replicated(&cluster, &image, &report);
}
