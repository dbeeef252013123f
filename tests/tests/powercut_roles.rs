//! Power cuts, one role at a time. The role's state lives on a power-cut FUSE mount
//! ([`boomerang_tests::powercut`]); the role is SIGKILLed mid-transfer, then every
//! write it had not made durable is dropped (all of them, or a seeded subset: the
//! seed is printed, `BOOMERANG_SEED` replays one), and it restarts on what survived.
//! The transfer must then finish on its own with the replica equal to the source:
//! whatever a role acknowledged was durable (rule 1), whatever it resent changed
//! nothing (rule 2). Unlike kill -9 alone, this catches a missing or misplaced fsync.
//!
//! Needs root and FUSE (privileged: with `BOOMERANG_PRIVILEGED_TESTS=1` a missing
//! prerequisite fails the test). Disks are image files.

#[allow(dead_code)] // the signal helpers are not used here
mod support;

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use boomerang_tests::powercut::{CutMode, PowerCutFs, PowerCutOptions};
use boomerang_tests::process::scratch_dir;
use boomerang_tests::{make_mixed_image, require_power_cut, sha256_file, Cluster, ClusterConfig};

use support::{disk_status, replica_path, AgentProcess, MIB};

const DISK: &str = "d0";
const DISK_SIZE: u64 = 256 * MIB;
/// A whole sync with a cut and a restart (the peer of a killed daemon notices only at
/// the QUIC idle timeout, 30 s).
const SYNC_TIMEOUT: Duration = Duration::from_secs(240);
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(120);

/// The seed of this run's `KeepSome` cuts: `BOOMERANG_SEED`, or the clock.
fn seed() -> u64 {
    boomerang_tests::rng::seed_from_env("power-cut", || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs() ^ u64::from(d.subsec_nanos()))
    })
}

/// A power-cut mount in a scratch directory; its guard unmounts on drop.
struct Mount {
    fs: PowerCutFs,
    _scratch: tempfile::TempDir,
}

impl Mount {
    fn new(label: &str) -> Mount {
        let scratch = scratch_dir(label);
        let backing = scratch.path().join("backing");
        let mountpoint = scratch.path().join("mnt");
        for d in [&backing, &mountpoint] {
            std::fs::create_dir_all(d).expect("create the mount directories");
        }
        let fs = PowerCutFs::mount(&backing, &mountpoint, PowerCutOptions::default())
            .expect("mount the power-cut file system");
        Mount {
            fs,
            _scratch: scratch,
        }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.fs.path(name)
    }

    /// Drops what was not synced: everything for even rounds, a seeded subset else.
    fn cut(&self, round: u64, seed: u64) {
        let mode = if round.is_multiple_of(2) {
            CutMode::DropAll
        } else {
            CutMode::KeepSome {
                seed: seed.wrapping_add(round),
            }
        };
        let report = self.fs.cut(mode).expect("cut power");
        eprintln!("power cut {round}: {report:?}");
    }
}

/// The bytes of the disk the master target has applied so far.
fn applied(cluster: &Cluster) -> u64 {
    disk_status(cluster, DISK).map_or(0, |s| s.bytes_applied)
}

/// Waits until the master target has applied more than `above` bytes of the disk while
/// the agent runs; returns the bytes applied.
fn wait_applied(cluster: &Cluster, agent: &mut AgentProcess, above: u64) -> u64 {
    let deadline = Instant::now() + PROGRESS_TIMEOUT;
    loop {
        agent.assert_running(&format!("while waiting for {above} applied bytes"));
        if let Some(s) = disk_status(cluster, DISK) {
            if s.bytes_applied > above {
                return s.bytes_applied;
            }
        }
        assert!(
            Instant::now() < deadline,
            "disk {DISK} did not pass {above} applied bytes within {PROGRESS_TIMEOUT:?}: {:?}\n{}",
            disk_status(cluster, DISK),
            agent.log_tail(40)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Bytes of spool segment files in `dir`.
fn spool_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|it| {
            it.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "spool"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn assert_replica_is_source(cluster: &Cluster, source: &Path, what: &str) {
    let status = disk_status(cluster, DISK).expect("the master target knows the disk");
    assert!(
        status.consistent,
        "{what}: replica not consistent: {status:?}"
    );
    assert_eq!(status.integrity_failures, 0, "{what}: {status:?}");
    assert_eq!(
        sha256_file(&replica_path(cluster, DISK)),
        sha256_file(source),
        "{what}: the replica differs from the source: something acknowledged was lost"
    );
}

#[test]
fn a_power_cut_of_the_process_server_loses_no_acknowledged_record() {
    if !require_power_cut("a_power_cut_of_the_process_server_loses_no_acknowledged_record") {
        return;
    }
    let seed = seed();
    let mount = Mount::new("powercut-ps");
    let mut cluster = Cluster::start(ClusterConfig {
        ps_spool_dir: Some(mount.dir("spool")),
        ..ClusterConfig::default()
    });
    let image = cluster.root().join("source.img");
    make_mixed_image(&image, DISK_SIZE, seed);
    let mut agent = AgentProcess::spawn(&cluster, &cluster.agent1().disk(DISK, &image));
    for round in 0..2u64 {
        // The master target stops taking records, so the spool holds what the process
        // server acknowledged and has not forwarded: that is what a cut could lose.
        wait_applied(&cluster, &mut agent, applied(&cluster) + 2 * MIB);
        cluster.mt().kill9();
        let spool = cluster.ps_spool_dir();
        let deadline = Instant::now() + PROGRESS_TIMEOUT;
        while spool_bytes(&spool) < 4 * MIB {
            agent.assert_running("while the spool filled");
            assert!(
                Instant::now() < deadline,
                "the spool did not fill while the master target was down: {} bytes",
                spool_bytes(&spool)
            );
            thread::sleep(Duration::from_millis(50));
        }
        cluster.ps().kill9();
        let held = spool_bytes(&spool);
        mount.cut(round, seed);
        eprintln!("round {round}: the spool held {held} bytes at the cut");
        cluster.restart_ps();
        cluster.restart_mt();
    }
    agent.wait_success(SYNC_TIMEOUT);
    assert_replica_is_source(&cluster, &image, "after process-server power cuts");
}

#[test]
fn a_power_cut_of_the_master_target_loses_nothing_it_acknowledged() {
    if !require_power_cut("a_power_cut_of_the_master_target_loses_nothing_it_acknowledged") {
        return;
    }
    let seed = seed();
    let mount = Mount::new("powercut-mt");
    let mut cluster = Cluster::start(ClusterConfig {
        mt_state_dir: Some(mount.dir("mt-state")),
        ..ClusterConfig::default()
    });
    let image = cluster.root().join("source.img");
    make_mixed_image(&image, DISK_SIZE, seed ^ 1);
    let mut agent = AgentProcess::spawn(&cluster, &cluster.agent1().disk(DISK, &image));
    for round in 0..2u64 {
        let at = wait_applied(&cluster, &mut agent, applied(&cluster) + 16 * MIB);
        cluster.mt().kill9();
        mount.cut(round, seed);
        eprintln!("round {round}: cut with {at} bytes applied");
        cluster.restart_mt();
    }
    agent.wait_success(SYNC_TIMEOUT);
    assert_replica_is_source(&cluster, &image, "after master-target power cuts");
}

#[test]
fn a_power_cut_of_the_agent_resumes_to_an_exact_replica() {
    if !require_power_cut("a_power_cut_of_the_agent_resumes_to_an_exact_replica") {
        return;
    }
    let seed = seed();
    let mount = Mount::new("powercut-agent");
    let cluster = Cluster::start(ClusterConfig::default());
    let image = cluster.root().join("source.img");
    make_mixed_image(&image, DISK_SIZE, seed ^ 2);
    let mut args = cluster.agent1().disk(DISK, &image);
    args.state_dir = mount.dir("agent-state");
    for round in 0..2u64 {
        let before = applied(&cluster);
        let mut agent = AgentProcess::spawn(&cluster, &args);
        wait_applied(&cluster, &mut agent, before + 16 * MIB);
        agent.kill9();
        mount.cut(round, seed);
    }
    let mut agent = AgentProcess::spawn(&cluster, &args);
    agent.wait_success(SYNC_TIMEOUT);
    assert_replica_is_source(&cluster, &image, "after agent power cuts");
}
