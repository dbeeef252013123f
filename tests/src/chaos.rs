//! A seeded fault campaign over the real daemons: round after round the source disk
//! changes, one storage fault (chosen by the seed: a site of the process server's
//! spool or of the master target's undo journal, replica, state files and atomic
//! writes; the n-th call; ENOSPC, EIO, a short write, a crash before or after the
//! call) is armed in one daemon through `BOOMERANG_FAULTS`, and an agent syncs. A
//! fault that fires while the daemon opens its state makes it refuse to start (as it
//! should); the campaign counts it and starts the daemon clean. When
//! the fault stops a daemon (a crash, a poisoned log) or wedges it (a failed flush
//! waits for a restart), the campaign restarts both daemons without faults, as a
//! service manager would, and lets the same agent run go on. Each round ends with a
//! check of the point the sync made: the replica must equal the source as it was
//! when the sync began, its status consistent, no integrity failure.
//!
//! Counted apart: *stalls*, rounds where the agent's run could not finish even after
//! the restarts and a new sync was needed (that new sync compares hashes, so it would
//! mend a lost record: a stall is reported, never hidden in a pass).
//!
//! The last line reads `chaos: seed S, N faults, P points checked, W wrong, T stalls`.
//! Replay a run with the same seed. `cargo run --release -p boomerang-tests --bin
//! chaos -- --seed 7 --faults 250` (build the daemons first with `cargo build
//! --release --workspace --bins`, so they carry fault injection).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::rng::DataRng;
use crate::{make_mixed_image, sha256_file, Cluster, ClusterConfig};

/// What a campaign found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The seed.
    pub seed: u64,
    /// Faults armed.
    pub faults: u64,
    /// Points (completed syncs) checked against the source.
    pub checked: u64,
    /// Points whose replica differed from the source, or whose status was wrong.
    pub wrong: u64,
    /// Rounds whose agent run could not finish, even after restarts.
    pub stalls: u64,
    /// Faults that fired (the daemon reached the n-th call of the site).
    pub fired: u64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "chaos: seed {}, {} faults ({} fired), {} points checked, {} wrong, {} stalls",
            self.seed, self.faults, self.fired, self.checked, self.wrong, self.stalls
        )
    }
}

const DISK: &str = "d0";
const MIB: u64 = 1 << 20;
/// How long an agent run gets before the daemons are restarted clean.
const FIRST_WAIT: Duration = Duration::from_secs(20);
/// How long it gets after that.
const SECOND_WAIT: Duration = Duration::from_secs(90);

// Sites every round reaches. The undo journal's are left out: a one-shot sync takes
// no point, so nothing is journaled (its faults are covered by the retention unit
// tests); rarer sites (renames, directory creation) by the storage unit tests.
const PS_SITES: &[&str] = &["spool.write", "spool.sync", "spool.remove", "spool.create"];
const MT_SITES: &[&str] = &["replica.write", "replica.sync", "state.write", "state.sync"];
const FAULTS: &[&str] = &["enospc", "eio", "short", "crash", "crash-after"];

fn pick<'a>(rng: &mut DataRng, from: &[&'a str]) -> &'a str {
    from[usize::try_from(rng.below(from.len() as u64)).unwrap_or(0)]
}

/// Runs `faults` rounds from `seed` with a disk of `disk_mib` MiB, printing a line per
/// round on stderr.
pub fn run(seed: u64, faults: u64, disk_mib: u64) -> anyhow::Result<Summary> {
    let mut rng = DataRng::new(seed);
    let mut summary = Summary {
        seed,
        ..Summary::default()
    };
    let mut cluster = Cluster::start(ClusterConfig::default());
    let source = cluster.root().join("source.img");
    make_mixed_image(&source, disk_mib * MIB, seed);
    let args = cluster.agent1().disk(DISK, &source);
    for round in 0..faults {
        if round > 0 {
            mutate(&source, disk_mib * MIB, &mut rng)?;
        }
        let want = sha256_file(&source);
        let (role, sites) = if rng.below(2) == 0 {
            ("ps", PS_SITES)
        } else {
            ("mt", MT_SITES)
        };
        let site = pick(&mut rng, sites);
        // A round changes a few MiB: a handful of calls at each site.
        let nth = if site.ends_with(".write") || site.ends_with(".sync") {
            rng.between(1, 6)
        } else {
            rng.between(1, 2)
        };
        let rule = format!("{site}@{nth}={}", pick(&mut rng, FAULTS));
        let fired_before = fired(&mut cluster);
        if !arm(&mut cluster, role, &rule) {
            // The fault stopped the daemon while it started (recovering its state):
            // it refused to run, as it should; a service manager starts it again.
            summary.faults += 1;
            summary.fired += 1;
            eprintln!("chaos round {round}: {role} {rule}: refused to start (fired at open)");
            restart_clean(&mut cluster);
            continue;
        }
        summary.faults += 1;
        let mut agent = spawn(&cluster, cluster.agent_command(&args))?;
        let mut outcome = wait(&mut agent, FIRST_WAIT);
        let mut restarted = false;
        if outcome.is_none() || !cluster.ps().is_running() || !cluster.mt().is_running() {
            restart_clean(&mut cluster);
            restarted = true;
            if outcome.is_none() {
                outcome = wait(&mut agent, SECOND_WAIT);
            }
        }
        if outcome != Some(true) {
            let _ = agent.kill();
            let _ = agent.wait();
            summary.stalls += 1;
            eprintln!("chaos round {round}: {role} {rule}: the agent run did not finish; a new sync mends it (counted as a stall)");
            if !restarted {
                restart_clean(&mut cluster);
            }
            let mut again = spawn(&cluster, cluster.agent_command(&args))?;
            if wait(&mut again, SECOND_WAIT) != Some(true) {
                let _ = again.kill();
                let kept = keep_logs(&cluster, seed);
                bail!(
                    "round {round} ({role} {rule}): even a new sync after clean restarts failed; logs kept in {}",
                    kept.display()
                );
            }
        }
        let hit = fired(&mut cluster) > fired_before;
        summary.fired += u64::from(hit);
        let rule = if hit { format!("{rule} (fired)") } else { rule };
        let verdict = check(&cluster, &want);
        summary.checked += 1;
        match &verdict {
            Ok(()) => eprintln!("chaos round {round}: {role} {rule}: point checked"),
            Err(why) => {
                summary.wrong += 1;
                eprintln!("chaos round {round}: {role} {rule}: WRONG: {why}");
            }
        }
        // Every round starts from daemons without faults.
        restart_clean(&mut cluster);
    }
    Ok(summary)
}

/// Copies the daemons' and the agent's logs out of the cluster's scratch directory
/// (removed with the cluster) to `<tmp>/boomerang-chaos-<seed>-logs`.
fn keep_logs(cluster: &Cluster, seed: u64) -> std::path::PathBuf {
    let to = std::env::temp_dir().join(format!("boomerang-chaos-{seed}-logs"));
    let _ = std::fs::create_dir_all(&to);
    if let Ok(entries) = std::fs::read_dir(cluster.logs_dir()) {
        for e in entries.flatten() {
            let _ = std::fs::copy(e.path(), to.join(e.file_name()));
        }
    }
    to
}

/// "fault injection fired" lines in both daemons' logs so far.
fn fired(cluster: &mut Cluster) -> usize {
    let needle = "fault injection fired";
    cluster.ps().log().matches(needle).count() + cluster.mt().log().matches(needle).count()
}

/// Restarts `role` with `rule` armed; `false` when it did not come up (the fault
/// fired while it opened its state).
fn arm(cluster: &mut Cluster, role: &str, rule: &str) -> bool {
    let set = |spec: crate::DaemonSpec| spec.env(boomerang_common::faults::ENV, rule);
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if role == "ps" {
            cluster.restart_ps_with(set);
        } else {
            cluster.restart_mt_with(set);
        }
    }))
    .is_ok()
}

fn restart_clean(cluster: &mut Cluster) {
    let clear = |spec: crate::DaemonSpec| spec.env(boomerang_common::faults::ENV, "");
    cluster.restart_mt_with(clear);
    cluster.restart_ps_with(clear);
}

fn spawn(cluster: &Cluster, mut cmd: Command) -> anyhow::Result<Child> {
    let logs = cluster.logs_dir();
    std::fs::create_dir_all(&logs).context("create the logs directory")?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(logs.join("agent-chaos.log"))
        .context("open the agent log")?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .context("start the agent")
}

/// Waits up to `limit` for the agent: `Some(success)` once it exited.
fn wait(child: &mut Child, limit: Duration) -> Option<bool> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status.success()),
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(_) => return Some(false),
        }
    }
    None
}

fn check(cluster: &Cluster, want: &str) -> Result<(), String> {
    let status = cluster.mt_status();
    let disk = status
        .disks
        .iter()
        .find(|d| d.disk == DISK)
        .ok_or("the master target does not list the disk")?;
    if !disk.consistent || disk.integrity_failures > 0 {
        return Err(format!("status {disk:?}"));
    }
    let replica = status
        .raw
        .get("disks")
        .and_then(|d| d.as_array())
        .and_then(|d| d.iter().find(|x| x["disk"] == DISK))
        .and_then(|x| x["replica"].as_str())
        .ok_or("status has no replica path")?
        .to_string();
    let got = sha256_file(Path::new(&replica));
    if got != want {
        return Err(format!("replica sha256 {got}, source {want}"));
    }
    Ok(())
}

/// Rewrites a few seeded regions of the source (64 KiB to 1 MiB each).
fn mutate(source: &Path, size: u64, rng: &mut DataRng) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt as _;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(source)
        .with_context(|| format!("open {}", source.display()))?;
    for _ in 0..rng.between(2, 8) {
        let len = rng.between(64 << 10, MIB);
        let at = rng.below(size - len) & !4095;
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
        if rng.below(4) > 0 {
            rng.fill(&mut buf);
        }
        f.write_all_at(&buf, at).context("change the source")?;
    }
    f.sync_all().context("sync the source")?;
    Ok(())
}
