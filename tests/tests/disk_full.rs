//! Disk full for real: the process server's spool, the master target's retention
//! journal on small ext4 file systems (loop devices), filled to ENOSPC by real data.
//!
//! - **Spool file system full**: the spool on a 48 MiB file system, its cap far above
//!   it, the master target stopped while an agent syncs a larger incompressible disk.
//!   The process server stays up, logs that the file system is full, and acknowledges
//!   no more than it holds (the agent's acknowledged prefix stays within what the
//!   master target applied plus what fits the spool); the agent waits instead of
//!   failing, and the process server does not spin. Once the master target is back the
//!   spool drains, the sync completes and the replica is the source byte for byte;
//!   then a second sync of more changed data than the file system holds goes through
//!   the (still small) spool.
//! - **Retention file system full**: the master target's retention journal on a
//!   32 MiB file system, two app-consistent points kept, then more rewritten than the
//!   journal can hold. The disk stops applying (its seq stays put) with a master-target
//!   log line naming the retention journal and the full file system; the agent waits;
//!   both points still materialize to exactly the bytes they had. The operator caps the
//!   journal (`[retention] max_journal_bytes`, the policy mechanism the master target
//!   offers: it has no `prune` command) and restarts it: the older point is pruned, the
//!   apply resumes, the sync completes, the replica equals the source and the newer
//!   point is still exact.
//! - **Agent journal file system full**: the agent's state on a 24 MiB file system,
//!   its journal cap far above it, the intercept source serving a 64 MiB disk. With
//!   the process server down, 40 MiB are written through the served file: every
//!   write succeeds, the journal drops the disk to bitmap mode and says so; once the
//!   process server is back a point after the last write comes and the replica is the
//!   disk byte for byte.
//!
//! Privileged: needs root, loop devices and the ext4 tools (and FUSE for the agent
//! journal's test). Without them each test
//! prints `SKIPPED` and returns; with `BOOMERANG_PRIVILEGED_TESTS=1` a missing
//! prerequisite fails. Run: `BOOMERANG_PRIVILEGED_TESTS=1 cargo test -p
//! boomerang-tests --test disk_full -- --nocapture`.
//!
//! Cleanup (also when a test panics): locals drop in reverse order, so the cluster
//! (daemons killed, scratch removed) goes before the small file system, whose guard
//! unmounts it, detaches the loop device and removes the image.

#[allow(dead_code)] // not every helper of the shared support module is used here
mod support;

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use boomerang_tests::cli::{PointInfo, CUT_APP_CONSISTENT, CUT_SYNC_COMPLETE};
use boomerang_tests::privileged::tool;
use boomerang_tests::process::run_ok;
use boomerang_tests::rng::DataRng;
use boomerang_tests::{
    mkfs_ext4, require_privileged, scratch_dir, sha256_file, Cluster, ClusterConfig, LoopDevice,
    Mount, Need,
};
use tempfile::TempDir;

use support::{disk_status, log_tail, replica_path, AgentProcess, MIB};

const NEEDS: &[Need] = &[Need::Root, Need::LoopDevices, Need::Ext4Tools];
const DISK: &str = "d0";
const GROUP: &str = "g1";
/// The agent ships a disk in units of this many bytes, one batch each (its default
/// `batch_mib`); an incompressible unit is a spool record and an undo record this big.
const UNIT: u64 = 4 * MIB;
/// Process-server log line when an append meets ENOSPC (process-server/src/spool.rs).
const PS_FS_FULL: &str = "spool file system full";
/// Master-target log line of a batch it could not apply (master-target/src/server.rs).
const MT_APPLY_FAILED: &str = "apply failed";
/// How long a whole sync may take, a restart of a daemon included.
const SYNC_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a file system may take to fill, or an error to show.
const FILL_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------
// Gating, small file systems, images

/// [`require_privileged`] plus a lock running this binary's tests one at a time: each
/// fills a file system at a moment it chooses and measures how the daemons behave
/// while it is full, which a second test loading the same two cores would blur.
fn gate(test: &str) -> Option<MutexGuard<'static, ()>> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    if !require_privileged(test, NEEDS) {
        return None;
    }
    Some(ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner))
}

/// A fresh ext4 file system of `size` bytes on a loop device over a sparse image,
/// mounted read-write. Fields drop in declaration order: unmount, detach, remove the
/// image and mount point.
#[derive(Debug)]
struct SmallFs {
    mount: Mount,
    dev: LoopDevice,
    scratch: TempDir,
}

impl SmallFs {
    fn new(label: &str, size: u64) -> SmallFs {
        let scratch = scratch_dir(label);
        let image = scratch.path().join("fs.img");
        File::create(&image)
            .and_then(|f| f.set_len(size))
            .unwrap_or_else(|e| panic!("create sparse image {}: {e}", image.display()));
        let dev = LoopDevice::attach(&image);
        mkfs_ext4(dev.path());
        let mount = Mount::new(dev.path(), &scratch.path().join("mnt"), false);
        SmallFs {
            mount,
            dev,
            scratch,
        }
    }

    /// The mount point.
    fn dir(&self) -> &Path {
        self.mount.dir()
    }

    /// A directory beside the mount point (not on the small file system) for the
    /// test's own files.
    fn beside(&self) -> &Path {
        self.scratch.path()
    }

    /// Bytes free for root (the daemons run as root, so the reserved blocks count).
    fn free_bytes(&self) -> u64 {
        let out = run_ok(
            Command::new(tool("stat"))
                .args(["-f", "--format=%f %S"])
                .arg(self.dir()),
        );
        let v: Vec<u64> = out
            .split_whitespace()
            .map(|s| {
                s.parse()
                    .unwrap_or_else(|e| panic!("stat -f printed {out:?}: {e}"))
            })
            .collect();
        assert_eq!(v.len(), 2, "stat -f printed {out:?}");
        v[0] * v[1]
    }
}

/// Writes `size` bytes of seeded random (incompressible) data to a new file.
fn random_image(path: &Path, size: u64, seed: u64) {
    let file = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    write_random(&file, path, 0, size, seed);
}

/// Overwrites `[offset, offset + len)` of an existing file with seeded random data.
fn rewrite_random(path: &Path, offset: u64, len: u64, seed: u64) {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    write_random(&file, path, offset, len, seed);
}

fn write_random(file: &File, path: &Path, offset: u64, len: u64, seed: u64) {
    let mut rng = DataRng::new(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = usize::try_from((len - at).min(MIB)).expect("at most a MiB");
        rng.fill(&mut buf[..n]);
        file.write_all_at(&buf[..n], offset + at)
            .unwrap_or_else(|e| panic!("write {} at {}: {e}", path.display(), offset + at));
        at += n as u64;
    }
    file.sync_all()
        .unwrap_or_else(|e| panic!("fsync {}: {e}", path.display()));
}

/// Calls `poll` every `every` until it returns `Ok`; panics with `what` and the last
/// `Err` (what the poll saw) after `timeout`.
fn wait_for<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut poll: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let seen = match poll() {
            Ok(v) => return v,
            Err(seen) => seen,
        };
        assert!(
            Instant::now() < deadline,
            "no {what} within {timeout:?}: {seen}"
        );
        thread::sleep(every);
    }
}

/// The lines of `text` that contain every one of `needles`.
fn lines_with<'a>(text: &'a str, needles: &[&str]) -> Vec<&'a str> {
    text.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .collect()
}

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat`.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/stat: {e}"));
    // Fields after the command name (which may hold spaces) start at `state`;
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after it.
    let rest = &stat[stat.rfind(')').expect("/proc/<pid>/stat has a comm field") + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    let hz: u64 = run_ok(Command::new("getconf").arg("CLK_TCK"))
        .trim()
        .parse()
        .expect("CLK_TCK is a number");
    Duration::from_millis(ticks * 1000 / hz.max(1))
}

/// The agent's durable progress of disk `d0` (its state file, read the way the agent
/// reads it): `(base seq of the pass in progress, units of it the process server
/// acknowledged)`, or `None` when no pass is in progress.
fn agent_acked(cluster: &Cluster) -> Option<(u64, u64)> {
    let path = cluster
        .root()
        .join("agent-agent1")
        .join(format!("{DISK}.state"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let state = boomerang_common::durable::decode_slots::<serde_json::Value>(&bytes)
        .unwrap_or_else(|| panic!("{} holds no valid state slot", path.display()))
        .value;
    let pass = state.get("pass").filter(|p| !p.is_null())?;
    let uint = |k: &str| {
        pass[k]
            .as_u64()
            .unwrap_or_else(|| panic!("agent state: pass.{k} is not a number: {state}"))
    };
    Some((uint("base_seq"), uint("acked_units")))
}

/// Bytes in the spool's segment files.
fn spool_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".spool"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

/// Panics unless the replica of `d0` holds `want` (the source's sha256) and its
/// status is a consistent `cut` with no refused batch.
fn assert_replica(cluster: &Cluster, want: &str, cut: &str) {
    let replica = replica_path(cluster, DISK);
    assert_eq!(
        sha256_file(&replica),
        want,
        "replica {} differs from the source",
        replica.display()
    );
    let status = disk_status(cluster, DISK).expect("the master target knows the disk");
    assert!(status.consistent, "{status:?}");
    assert_eq!(status.cut.as_deref(), Some(cut), "{status:?}");
    assert_eq!(status.integrity_failures, 0, "{status:?}");
}

// ---------------------------------------------------------------------------------
// Spool file system full

/// The spool's file system: 48 MiB (about 40 MiB free, ten incompressible units).
const SPOOL_FS: u64 = 48 * MIB;
/// The disk synced through it: four times what the spool file system holds.
const SPOOL_SOURCE: u64 = 192 * MIB;

#[test]
fn a_full_spool_file_system_pushes_back_on_the_agent_and_loses_nothing() {
    let Some(_one) = gate("a_full_spool_file_system_pushes_back_on_the_agent_and_loses_nothing")
    else {
        return;
    };
    let started = Instant::now();
    let fs = SmallFs::new("diskfull-spool", SPOOL_FS);
    let spool_dir = fs.dir().join("spool");
    let capacity = fs.free_bytes();
    let mut cluster = Cluster::start(ClusterConfig {
        ps_spool_dir: Some(spool_dir.clone()),
        // Far above the file system: the file system, not the cap, is the limit.
        spool_max_mib: Some(16 * 1024),
        ..ClusterConfig::default()
    });
    eprintln!(
        "spool on {} ({:.1} MiB free), cap 16 GiB",
        fs.dev.path().display(),
        mib(capacity)
    );
    let source = cluster.root().join("source.img");
    random_image(&source, SPOOL_SOURCE, 501);
    let want = sha256_file(&source);
    let total_units = SPOOL_SOURCE / UNIT;

    let args = cluster.agent1().disk(DISK, &source);
    let mut agent = AgentProcess::spawn(&cluster, &args);
    // Batches reach the spool only after the agent has the replica's manifest from
    // the master target: stop the master target as soon as the first one is there.
    wait_for(
        "first record in the spool",
        FILL_TIMEOUT,
        Duration::from_millis(2),
        || {
            agent.assert_running("before the spool held a record");
            let held = spool_bytes(&spool_dir);
            if held > MIB {
                Ok(())
            } else {
                Err(format!("{held} bytes in the spool"))
            }
        },
    );
    let mt_exit = cluster.mt().terminate();
    let applied_at_stop = disk_status(&cluster, DISK).map_or(0, |s| s.next_seq);
    eprintln!(
        "[{:?}] master target stopped ({mt_exit}) with {applied_at_stop} of {total_units} units applied",
        started.elapsed()
    );
    let spool_records = capacity / UNIT;
    assert!(
        total_units.saturating_sub(applied_at_stop) > spool_records + 2,
        "the master target applied {applied_at_stop} of {total_units} units before it stopped: \
         too few left to fill a spool of {spool_records} units"
    );

    // The spool fills to ENOSPC; the process server says so and stays up.
    let mut min_free = u64::MAX;
    wait_for(
        "full spool file system",
        FILL_TIMEOUT,
        Duration::from_millis(100),
        || {
            agent.assert_running("while the spool filled");
            assert!(
                cluster.ps().is_running(),
                "the process server exited:\n{}",
                cluster.ps().log_tail(30)
            );
            let free = fs.free_bytes();
            min_free = min_free.min(free);
            let said = !lines_with(&cluster.ps().log(), &[PS_FS_FULL]).is_empty();
            if said && free < UNIT {
                Ok(())
            } else {
                Err(format!(
                    "{:.2} MiB free at least, `{PS_FS_FULL}` logged: {said}\n{}",
                    mib(min_free),
                    cluster.ps().log_tail(20)
                ))
            }
        },
    );
    let full_at = started.elapsed();
    eprintln!(
        "[{full_at:?}] spool file system full: {:.2} MiB free, spool segments {:.1} MiB; the process server says:\n{}",
        mib(fs.free_bytes()),
        mib(spool_bytes(&spool_dir)),
        lines_with(&cluster.ps().log(), &[PS_FS_FULL])[0]
    );

    // Held full: the process server does not spin, the agent waits, and what the
    // agent was told is durable fits what the spool can hold.
    let ps_pid = cluster.ps().pid();
    let cpu_before = cpu_time(ps_pid);
    let hold = Duration::from_secs(5);
    thread::sleep(hold);
    let cpu = cpu_time(ps_pid).saturating_sub(cpu_before);
    agent.assert_running("while the spool was full (it must wait, not fail)");
    assert!(
        cluster.ps().is_running(),
        "the process server exited while its spool was full:\n{}",
        cluster.ps().log_tail(30)
    );
    assert!(
        cpu < hold / 4,
        "the process server used {cpu:?} of CPU in {hold:?} with a full spool: it spins"
    );
    let (base, acked) = agent_acked(&cluster).expect("the agent's first pass is in progress");
    eprintln!(
        "held {hold:?}: process server CPU {cpu:?}; agent acknowledged {acked} units (base seq {base}), \
         the master target applied {applied_at_stop}, the spool holds at most {spool_records}"
    );
    assert!(
        base + acked <= applied_at_stop + spool_records,
        "the agent was told {acked} units are durable, more than the {applied_at_stop} applied \
         plus the {spool_records} the spool file system can hold"
    );
    assert!(
        acked < total_units,
        "the sync cannot be done with the master target down"
    );
    let warnings = lines_with(&cluster.ps().log(), &[PS_FS_FULL]).len();
    assert!(
        warnings <= 64,
        "{warnings} `{PS_FS_FULL}` lines in {:?}: the log is flooded",
        started.elapsed() - full_at
    );

    // The master target returns: the spool drains, the sync completes.
    cluster.restart_mt_with(|spec| spec);
    let back = Instant::now();
    eprintln!("[{:?}] master target restarted", started.elapsed());
    let report = agent.wait_success(SYNC_TIMEOUT);
    eprintln!(
        "[{:?}] sync done {:?} after the restart: {}",
        started.elapsed(),
        back.elapsed(),
        report.raw
    );
    assert_replica(&cluster, &want, CUT_SYNC_COMPLETE);

    // The spool keeps working on its small file system: a change larger than the file
    // system goes through it with the master target up.
    let changed = boomerang_tests::change_chunks(&source, MIB, 0.3, 502);
    let want = sha256_file(&source);
    eprintln!(
        "second sync: {} MiB changed, {:.1} MiB free on the spool file system",
        changed.len(),
        mib(fs.free_bytes())
    );
    let again = Instant::now();
    let report = AgentProcess::spawn(&cluster, &args).wait_success(SYNC_TIMEOUT);
    assert!(
        report.bytes_changed() > capacity,
        "the second sync shipped {} bytes, not more than the spool file system holds",
        report.bytes_changed()
    );
    assert_replica(&cluster, &want, CUT_SYNC_COMPLETE);
    eprintln!(
        "a_full_spool_file_system_pushes_back_on_the_agent_and_loses_nothing: second sync {:?}, took {:?}",
        again.elapsed(),
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------
// Retention file system full

/// The retention journal's file system: 32 MiB (about 25 MiB free, six undo records
/// of an incompressible unit).
const RETENTION_FS: u64 = 32 * MIB;
/// The disk: 16 units of random data.
const RETENTION_SOURCE: u64 = 64 * MIB;
/// Rewritten between the first and the second point: 3 units (12 MiB of history).
const CHANGE_A: (u64, u64) = (0, 3 * UNIT);
/// Rewritten after the second point: 5 units. With 12 MiB kept for the first point,
/// only 3 of them fit; once that point is pruned the other 2 do.
const CHANGE_B: (u64, u64) = (8 * UNIT, 5 * UNIT);
/// The journal cap the operator sets once the file system is full.
const RETENTION_CAP: u64 = 22 * MIB;

/// The master target's configuration: small journal segments (pruning frees whole
/// segments), pruning every second, and `policy` as its `[retention]` table.
fn mt_config(path: &Path, policy: &str) {
    std::fs::write(
        path,
        format!("journal_segment_mib = 1\nprune_interval_secs = 1\n[retention]\n{policy}"),
    )
    .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// The group's points.
fn points(cluster: &Cluster) -> Vec<PointInfo> {
    cluster.mt_points(GROUP)
}

/// Materializes point `id` into a scratch image with `test-failover` and returns the
/// image's sha256 (the image is removed again with `--cleanup`).
fn materialized_sha(cluster: &Cluster, id: u64) -> String {
    let target = cluster.root().join(format!("point-{id}.img"));
    let mut args =
        boomerang_tests::cli::point_to_args(&id.to_string(), &[(DISK.to_string(), target.clone())]);
    args.push("--json".into());
    cluster.mt_op("test-failover", GROUP, &args);
    let sha = sha256_file(&target);
    cluster.mt_op("test-failover", GROUP, &["--cleanup".into()]);
    assert!(!target.exists(), "cleanup left {}", target.display());
    sha
}

#[test]
fn a_full_retention_file_system_stops_the_disk_until_a_point_is_pruned() {
    let Some(_one) = gate("a_full_retention_file_system_stops_the_disk_until_a_point_is_pruned")
    else {
        return;
    };
    let started = Instant::now();
    let fs = SmallFs::new("diskfull-retention", RETENTION_FS);
    let retention = fs.dir().join("retention");
    let config = fs.beside().join("mt.toml");
    // The default policy keeps every point of the last two hours.
    mt_config(&config, "");
    let mut cluster = Cluster::start(ClusterConfig {
        mt_extra: vec![
            "--retention-dir".into(),
            retention.clone().into(),
            "--config".into(),
            config.clone().into(),
        ],
        ..ClusterConfig::default()
    });
    eprintln!(
        "retention journal on {} ({:.1} MiB free)",
        fs.dev.path().display(),
        mib(fs.free_bytes())
    );
    let source = cluster.root().join("source.img");
    random_image(&source, RETENTION_SOURCE, 601);
    // No-op hooks: each sync ends with an app-consistent point.
    let mut args = cluster.agent1().disk(DISK, &source).group(GROUP);
    args.extra
        .extend(["--freeze-hook", "true", "--thaw-hook", "true"].map(OsString::from));
    let keep_copy = |label: &str| -> (PathBuf, String) {
        let copy = cluster.root().join(format!("{label}.img"));
        std::fs::copy(&source, &copy).unwrap_or_else(|e| panic!("copy the source: {e}"));
        let sha = sha256_file(&copy);
        (copy, sha)
    };

    // Point 1: the initial sync (no history needed before the first point).
    cluster.agent_sync(&args);
    let (_, sha_p1) = keep_copy("at-p1");
    let p1 = points(&cluster);
    assert!(
        p1.len() == 1 && p1[0].kind == CUT_APP_CONSISTENT,
        "one app-consistent point after the first sync: {p1:?}"
    );
    let p1 = p1[0].id;

    // Point 2: 12 MiB rewritten, whose before-images point 1 needs.
    rewrite_random(&source, CHANGE_A.0, CHANGE_A.1, 602);
    cluster.agent_sync(&args);
    let (_, sha_p2) = keep_copy("at-p2");
    let listed = points(&cluster);
    let p2 = listed
        .last()
        .map(|p| p.id)
        .expect("a point after the second sync");
    assert!(
        listed.len() == 2 && p2 > p1,
        "two points after the second sync: {listed:?}"
    );
    let free_before = fs.free_bytes();
    eprintln!(
        "[{:?}] points {p1} and {p2} kept; {:.1} MiB free for history",
        started.elapsed(),
        mib(free_before)
    );

    // 20 MiB more rewritten: history for both points does not fit.
    rewrite_random(&source, CHANGE_B.0, CHANGE_B.1, 603);
    let want = sha256_file(&source);
    let mt_log_from = cluster.mt().log().len();
    let mut agent = AgentProcess::spawn(&cluster, &args);
    let full_line = wait_for(
        "master-target error naming the full retention journal",
        FILL_TIMEOUT,
        Duration::from_millis(200),
        || {
            agent.assert_running("while the retention journal filled");
            let log = cluster.mt().log();
            lines_with(
                &log[mt_log_from.min(log.len())..],
                &["retention journal", "is full"],
            )
            .first()
            .map(|l| l.to_string())
            .ok_or_else(|| {
                format!(
                    "{:.2} MiB free\n{}",
                    mib(fs.free_bytes()),
                    cluster.mt().log_tail(20)
                )
            })
        },
    );
    eprintln!(
        "[{:?}] the master target says:\n{full_line}",
        started.elapsed()
    );
    assert!(
        full_line.contains(MT_APPLY_FAILED)
            && full_line.contains(DISK)
            && full_line.contains(&retention.display().to_string()),
        "the error names neither the failed apply, the disk nor the retention directory {}: {full_line}",
        retention.display()
    );

    // Held: the disk applies nothing more, the agent waits, nobody spins.
    let held_from = disk_status(&cluster, DISK).expect("disk known");
    let lines_from = lines_with(&cluster.mt().log(), &[MT_APPLY_FAILED]).len();
    let hold = Duration::from_secs(4);
    let mt_pid = cluster.mt().pid();
    let cpu_before = cpu_time(mt_pid);
    thread::sleep(hold);
    let cpu = cpu_time(mt_pid).saturating_sub(cpu_before);
    let held = disk_status(&cluster, DISK).expect("disk known");
    let retries = lines_with(&cluster.mt().log(), &[MT_APPLY_FAILED]).len() - lines_from;
    let free = fs.free_bytes();
    agent.assert_running("while the retention journal was full (it must wait, not fail)");
    eprintln!(
        "held {hold:?}: {retries} failed applies logged, master target CPU {cpu:?}, {:.2} MiB free; \
         disk at seq {} ({} bytes applied)",
        mib(free),
        held.next_seq,
        held.bytes_applied,
    );
    assert_eq!(
        (held.next_seq, held.bytes_applied),
        (held_from.next_seq, held_from.bytes_applied),
        "the disk went on applying with its retention journal full"
    );
    let stuck_unit = held.next_seq;
    assert!(
        free < UNIT,
        "{:.2} MiB free: the retention file system is not full",
        mib(free)
    );
    assert!(
        cpu < hold / 4,
        "the master target used {cpu:?} of CPU in {hold:?} with its journal full: it spins"
    );
    assert!(
        retries as f64 / hold.as_secs_f64() < 20.0,
        "{retries} failed applies in {hold:?}: the process server retries in a hot loop"
    );
    let status = cluster.mt_status();
    eprintln!(
        "what `boomerang-mt status --json` shows meanwhile: group {}, disk {}",
        status.raw["groups"][0], status.raw["disks"][0]
    );
    let shown = status.raw["disks"][0]["last_error"].as_str().unwrap_or("");
    assert!(
        shown.contains("retention journal") && shown.contains("file system is full"),
        "`status` does not say why the disk stopped applying: {}",
        status.raw["disks"][0]
    );

    // Nothing older was damaged: both points give back exactly their bytes.
    assert_eq!(
        materialized_sha(&cluster, p1),
        sha_p1,
        "point {p1} is not the source at point 1"
    );
    assert_eq!(
        materialized_sha(&cluster, p2),
        sha_p2,
        "point {p2} is not the source at point 2"
    );
    eprintln!("[{:?}] points {p1} and {p2} still exact", started.elapsed());

    // The operator caps the journal: the oldest point is pruned, the apply resumes.
    // The cap is below what the full journal holds (about 24 MiB: point 1's 12 MiB
    // and the part of point 2's history that fitted) but above point 2's whole
    // history (CHANGE_B, 20 MiB), so point 2 stays once the sync's new point is the
    // newest.
    mt_config(&config, &format!("max_journal_bytes = {}\n", RETENTION_CAP));
    let log_from = cluster.mt().log().len();
    cluster.mt().terminate();
    cluster.restart_mt_with(|spec| spec);
    let resumed = Instant::now();
    let report = agent.wait_success(SYNC_TIMEOUT);
    eprintln!(
        "[{:?}] sync done {:?} after the policy change: {}",
        started.elapsed(),
        resumed.elapsed(),
        report.raw
    );
    let log = cluster.mt().log();
    let pruned = lines_with(&log[log_from.min(log.len())..], &["points pruned"]);
    assert!(
        !pruned.is_empty(),
        "no `points pruned` line after the cap:\n{}",
        log_tail(cluster.mt().log_path(), 30)
    );
    eprintln!("{}", pruned[0]);
    let after = points(&cluster);
    let ids: Vec<u64> = after.iter().map(|p| p.id).collect();
    assert!(
        !ids.contains(&p1) && ids.contains(&p2) && ids.last().is_some_and(|&p3| p3 > p2),
        "point {p1} pruned, {p2} kept and a newer one taken: {after:?}"
    );
    let done = disk_status(&cluster, DISK).expect("disk known");
    assert!(done.next_seq > stuck_unit, "{done:?}");
    let status = cluster.mt_status();
    assert!(
        status.raw["disks"][0]["last_error"].is_null(),
        "`status` still shows an error once the disk applies again: {}",
        status.raw["disks"][0]
    );
    assert_replica(&cluster, &want, CUT_APP_CONSISTENT);
    assert_eq!(
        materialized_sha(&cluster, p2),
        sha_p2,
        "point {p2} is not the source at point 2 after the prune"
    );
    eprintln!(
        "a_full_retention_file_system_stops_the_disk_until_a_point_is_pruned: took {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------
// The agent journal's file system full

/// The agent's state (its write-order journal) lives here; the journal's own cap is
/// far above it, so the file system fills first.
const JOURNAL_FS: u64 = 24 * MIB;
/// The protected disk, served through the intercept source.
const JOURNAL_SOURCE: u64 = 64 * MIB;
/// Written while the process server is down: more than the file system holds.
const JOURNAL_WRITES: u64 = 40 * MIB;
/// Agent log lines (agent/src/journal/mode.rs).
const LOG_JOURNAL_FULL: &str = "journal full: bitmap mode";

#[test]
fn a_full_agent_journal_file_system_drops_to_bitmap_mode_and_loses_nothing() {
    let test = "a_full_agent_journal_file_system_drops_to_bitmap_mode_and_loses_nothing";
    let Some(_one) = gate(test) else {
        return;
    };
    if !boomerang_tests::require_power_cut(test) {
        return; // the intercept source needs /dev/fuse too
    }
    let fs = SmallFs::new("diskfull-journal", JOURNAL_FS);
    let mut cluster = Cluster::start(ClusterConfig::default());
    let backing = cluster.root().join("disk.img");
    random_image(&backing, JOURNAL_SOURCE, 701);
    let mut args = cluster.agent1().disk(DISK, &backing).group(GROUP);
    args.state_dir = fs.dir().join("agent1");
    args.json = false;
    args.extra
        .extend(["--journal-mib", "4096"].map(OsString::from));
    let serve = cluster.root().join("serve");
    std::fs::create_dir_all(&serve).expect("create the serve directory");
    let log = cluster.logs_dir().join("agent-journal.log");
    std::fs::create_dir_all(cluster.logs_dir()).expect("create the logs directory");
    let agent = boomerang_tests::chaos::agent::TrackingAgent::start(&args, DISK, &serve, &[], &log)
        .expect("the agent serves the disk");
    let cut_after = |cluster: &Cluster, ms: u64| {
        let status = cluster.mt_status();
        let d = &status.raw["disks"][0];
        d["cut"] == boomerang_tests::cli::CUT_CRASH_CONSISTENT
            && d["point_id"].as_u64().is_some_and(|p| p > ms)
    };
    let started = boomerang_common::config::now_ms();
    wait_for(
        "the first point",
        SYNC_TIMEOUT,
        Duration::from_millis(200),
        || {
            if cut_after(&cluster, started) {
                Ok(())
            } else {
                Err(format!("{:?}", disk_status(&cluster, DISK)))
            }
        },
    );

    // The process server down: nothing leaves the journal, which fills the file
    // system. Every write must still succeed.
    cluster.ps().terminate();
    let disk = agent.disk().expect("the served disk");
    let chunk = MIB;
    let mut written = 0;
    while written < JOURNAL_WRITES {
        let at = (written * 7) % (JOURNAL_SOURCE - chunk);
        write_random(disk, &backing, at & !4095, chunk, 702 + written);
        written += chunk;
    }
    let free = fs.free_bytes();
    let agent_log = std::fs::read_to_string(&log).unwrap_or_default();
    let full = lines_with(&agent_log, &[LOG_JOURNAL_FULL]);
    eprintln!(
        "{} MiB written with the process server down; {:.2} MiB free on the journal's file system; the agent says: {}",
        JOURNAL_WRITES / MIB,
        mib(free),
        full.first().copied().unwrap_or("(nothing)")
    );
    assert!(
        !full.is_empty(),
        "no `{LOG_JOURNAL_FULL}` in the agent's log although the file system filled ({:.2} MiB free)",
        mib(free)
    );

    // Back: the bitmap drains, a point after the last write comes, the replica is
    // the disk byte for byte.
    let last = boomerang_common::config::now_ms();
    cluster.restart_ps();
    wait_for(
        "a point after the last write",
        SYNC_TIMEOUT,
        Duration::from_millis(200),
        || {
            if cut_after(&cluster, last) {
                Ok(())
            } else {
                Err(format!("{:?}", disk_status(&cluster, DISK)))
            }
        },
    );
    let want = sha256_file(&backing);
    assert_replica(&cluster, &want, boomerang_tests::cli::CUT_CRASH_CONSISTENT);
    agent.stop();
}
