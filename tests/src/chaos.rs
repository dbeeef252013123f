//! A seeded fault campaign over the three real roles.
//!
//! The agent tracks one disk with the intercept source (`track --source intercept`,
//! a crash-consistent point every second) and serves it as a FUSE file; the campaign's
//! [`workload`] writes stamped blocks through it, one write at a time. Each role's
//! state lives on its own power-cut mount ([`crate::powercut`]): the agent's journal
//! and state, the process server's spool, the master target's replica, undo journal
//! and records. Round after round the seed picks one [`faults::Fault`]: a storage
//! fault at a site of any role (ENOSPC, EIO, a short write, a crash before or after
//! the call, armed through `BOOMERANG_FAULTS`), kill -9 of any role, a power cut of
//! any role (kill -9, then its unsynced writes dropped, all or a seeded subset), or a
//! process-server restart with records in flight. The campaign writes, breaks, writes
//! again, restarts what the fault stopped (as a service manager would), stops
//! writing and waits for a point cut after the last write. Then:
//!
//! - every point listed and not yet checked is materialized (`test-failover`) and
//!   must be exactly the disk after writes `1..=k` for some `k` (see [`workload`]),
//!   with `k` never going back from one point to the next; its blake3 is kept;
//! - the newest point holds every write made (nothing acknowledged was lost), and the
//!   replica equals the disk;
//! - one earlier point, still listed, is materialized again and must give the same
//!   bytes as when it was first checked (later faults must not damage it); at the end
//!   every listed point is;
//! - each role's peak RSS stays under its bound.
//!
//! Counted apart: *stalls*, rounds that needed more than restarting what the fault
//! stopped (a restart of all three roles); they are reported, never hidden.
//!
//! The last line reads `chaos: seed S, N faults (F fired), P points checked, W wrong,
//! T stalls`. Replay a run with the same seed: `cargo run --release -p
//! boomerang-tests --bin chaos -- --seed 7 --faults 250` (build the daemons first with
//! `cargo build --release --workspace --bins`, so they carry fault injection). Needs
//! root and FUSE.

pub mod agent;
pub mod faults;
pub mod minute;
pub mod workload;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tempfile::TempDir;

use self::agent::TrackingAgent;
use self::faults::{Fault, Role};
use self::workload::Workload;
use crate::cli::{self, AgentSyncArgs};
use crate::powercut::{CutMode, PowerCutFs, PowerCutOptions};
use crate::process::{peak_rss_kib, scratch_dir};
use crate::rng::DataRng;
use crate::{make_mixed_image, Cluster, ClusterConfig, DaemonSpec};

/// What a campaign found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The seed.
    pub seed: u64,
    /// Faults injected.
    pub faults: u64,
    /// Faults that took effect (a storage rule whose call came; kills and cuts always).
    pub fired: u64,
    /// Points materialized and checked (first checks and re-checks).
    pub checked: u64,
    /// Points whose bytes were wrong, or that could not be materialized.
    pub wrong: u64,
    /// Rounds that needed all three roles restarted to go on.
    pub stalls: u64,
    /// Faults per kind (`storage`, `kill`, `power-cut`, `ps-restart`).
    pub kinds: BTreeMap<&'static str, u64>,
    /// Faults per role.
    pub roles: BTreeMap<&'static str, u64>,
    /// Highest peak RSS seen per role, KiB.
    pub peak_rss_kib: BTreeMap<&'static str, u64>,
    /// Writes the workload made (all acknowledged by the agent's FUSE file).
    pub writes: u64,
}

impl Summary {
    /// The per-kind, per-role and memory figures, one line.
    pub fn details(&self) -> String {
        let list = |m: &BTreeMap<&'static str, u64>| {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "faults by kind: {}; by role: {}; peak RSS KiB: {}; {} writes",
            list(&self.kinds),
            list(&self.roles),
            list(&self.peak_rss_kib),
            self.writes
        )
    }
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
const GROUP: &str = "g1";
const MIB: u64 = 1 << 20;
/// A point cut after the last write must reach the master target within this.
const POINT_WAIT: Duration = Duration::from_secs(40);
/// The same after all three roles were restarted.
const STALL_WAIT: Duration = Duration::from_secs(90);
/// Peak RSS bounds, KiB (rule 7: memory is bounded whatever the faults).
const RSS_BOUND_KIB: [(Role, u64); 3] = [
    (Role::Agent, 1024 * 1024),
    (Role::Ps, 1024 * 1024),
    (Role::Mt, 1024 * 1024),
];
/// Faults injected in one round, each after some writes.
const FAULTS_PER_ROUND: u64 = 2;
/// Points the master target keeps (so a materialization stays quick).
const MAX_POINTS: u64 = 48;

/// A power-cut mount in its own scratch directory.
struct CutMount {
    fs: PowerCutFs,
    /// Holds the mount's backing and mount point, and room for files beside them.
    scratch: TempDir,
}

impl CutMount {
    fn new(label: &str) -> anyhow::Result<CutMount> {
        let scratch = scratch_dir(label);
        let backing = scratch.path().join("backing");
        let mnt = scratch.path().join("mnt");
        for d in [&backing, &mnt] {
            std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
        let fs = PowerCutFs::mount(&backing, &mnt, PowerCutOptions::default())
            .context("mount a power-cut file system (needs root and /dev/fuse)")?;
        Ok(CutMount { fs, scratch })
    }
}

/// A point checked once: what it held.
#[derive(Debug, Clone)]
struct Checked {
    writes: u64,
    blake3: String,
}

/// Everything a campaign runs. Field order is drop order: the agent (and its FUSE
/// mount) first, then the daemons, then the power-cut mounts.
struct Campaign {
    agent: Option<TrackingAgent>,
    cluster: Cluster,
    agent_fs: CutMount,
    ps_fs: CutMount,
    mt_fs: CutMount,
    args: AgentSyncArgs,
    serve_dir: PathBuf,
    workload: Workload,
    rng: DataRng,
    summary: Summary,
    checked: BTreeMap<u64, Checked>,
    /// `BOOMERANG_FAULTS` the agent runs with.
    agent_rule: String,
    /// Faults chosen by the caller, injected in this order before the seed picks any.
    planned: VecDeque<Fault>,
}

/// Runs `faults` rounds from `seed` with a disk of `disk_mib` MiB, printing a line per
/// round on stderr.
pub fn run(seed: u64, faults: u64, disk_mib: u64) -> anyhow::Result<Summary> {
    run_planned(seed, Vec::new(), faults, disk_mib)
}

/// Runs the campaign with `planned` as its first faults, in that order, then the
/// seed's picks up to `faults` in all (at least as many as planned): for a test that
/// needs one fault for sure.
pub fn run_planned(
    seed: u64,
    planned: Vec<Fault>,
    faults: u64,
    disk_mib: u64,
) -> anyhow::Result<Summary> {
    let faults = faults.max(planned.len() as u64);
    let mut c = Campaign::start(seed, disk_mib)?;
    c.planned = planned.into();
    let outcome = c.rounds(faults);
    if outcome.is_err() || c.summary.wrong > 0 {
        let kept = c.keep_logs();
        eprintln!("chaos: seed {seed}: logs kept in {}", kept.display());
    }
    outcome?;
    Ok(c.summary.clone())
}

impl Campaign {
    fn start(seed: u64, disk_mib: u64) -> anyhow::Result<Campaign> {
        let agent_fs = CutMount::new("chaos-agent")?;
        let ps_fs = CutMount::new("chaos-ps")?;
        let mt_fs = CutMount::new("chaos-mt")?;
        // Beside the master target's power-cut mount, not on it: cuts leave it alone.
        let config = mt_fs.scratch.path().join("mt.toml");
        std::fs::write(
            &config,
            format!("prune_interval_secs = 5\n[retention]\nmax_points = {MAX_POINTS}\n"),
        )
        .context("write the master target's config")?;
        let cluster = Cluster::start(ClusterConfig {
            mt_state_dir: Some(mt_fs.fs.path("mt")),
            ps_spool_dir: Some(ps_fs.fs.path("spool")),
            mt_extra: vec!["--config".into(), config.into()],
            ..ClusterConfig::default()
        });
        let backing = cluster.root().join("disk.img");
        make_mixed_image(&backing, disk_mib * MIB, seed);
        let initial = std::fs::read(&backing).context("read the initial disk")?;
        let mut args = cluster.agent1().disk(DISK, &backing).group(GROUP);
        args.state_dir = agent_fs.fs.path("agent1");
        args.json = false;
        let serve_dir = cluster.root().join("serve");
        std::fs::create_dir_all(&serve_dir).context("create the serve directory")?;
        let mut c = Campaign {
            agent: None,
            cluster,
            agent_fs,
            ps_fs,
            mt_fs,
            args,
            serve_dir,
            workload: Workload::new(initial, seed),
            rng: DataRng::new(seed),
            summary: Summary {
                seed,
                ..Summary::default()
            },
            checked: BTreeMap::new(),
            agent_rule: String::new(),
            planned: VecDeque::new(),
        };
        c.start_agent("")?;
        Ok(c)
    }

    fn rounds(&mut self, faults: u64) -> anyhow::Result<()> {
        let mut left = faults;
        let mut round = 0;
        while left > 0 {
            let n = left.min(FAULTS_PER_ROUND);
            self.round(round, n)?;
            left -= n;
            round += 1;
        }
        // Writes stop: the newest point holds them all, every listed point is right.
        self.wait_point_after_writes(round_label(round))?;
        self.check_new_points(round_label(round));
        let ids: Vec<u64> = self.listed()?.into_iter().collect();
        for id in ids {
            self.recheck(id);
        }
        self.sample_rss();
        for (role, bound) in RSS_BOUND_KIB {
            let peak = self
                .summary
                .peak_rss_kib
                .get(role.name())
                .copied()
                .unwrap_or(0);
            if peak > bound {
                bail!(
                    "{}: peak RSS {peak} KiB, over its bound of {bound} KiB",
                    role.name()
                );
            }
        }
        self.summary.writes = self.workload.writes();
        Ok(())
    }

    /// One round: `n` faults, each after some writes, then more writes, the
    /// restarts a service manager would do, a point after the last write, and checks.
    fn round(&mut self, round: u64, n: u64) -> anyhow::Result<()> {
        let label = round_label(round);
        let started = Instant::now();
        let mut done: Vec<(Fault, bool)> = Vec::new();
        let mut last_fired_before = 0;
        for _ in 0..n {
            let fault = match self.planned.pop_front() {
                Some(f) => f,
                None => faults::choose(&mut self.rng),
            };
            self.summary.faults += 1;
            *self.summary.kinds.entry(fault.kind()).or_default() += 1;
            *self.summary.roles.entry(fault.role().name()).or_default() += 1;
            let writes = self.rng.between(10, 60);
            self.write(writes)?;
            self.sample_rss();
            let fired_before = self.fired_lines(fault.role());
            last_fired_before = fired_before;
            self.inject(&fault, round)?;
            let writes = self.rng.between(10, 60);
            self.write(writes)?;
            let fired = match &fault {
                Fault::Storage { role, .. } => self.fired_lines(*role) > fired_before,
                _ => true,
            };
            done.push((fault, fired));
        }
        self.settle()?;
        let stalled = self.wait_point_after_writes(label.clone())?;
        // The last rule may fire only while the point is awaited: that counts too.
        if let Some((Fault::Storage { role, .. }, fired)) = done.last_mut() {
            *fired = *fired || self.fired_lines(*role) > last_fired_before;
        }
        self.summary.fired += done.iter().filter(|(_, f)| *f).count() as u64;
        // A storage rule stays armed until the role restarts: start it clean, so the
        // checks (which need the master target) meet no fault.
        for (fault, _) in &done {
            if let Fault::Storage { role, .. } = fault {
                self.restart(*role, true)?;
            }
        }
        let (new, wrong) = self.check_new_points(label.clone());
        // One earlier point again: later faults must not have changed it.
        let old: Vec<u64> = self.checked.keys().copied().collect();
        if old.len() > new {
            let pick = old[usize::try_from(self.rng.below((old.len() - new) as u64)).unwrap_or(0)];
            if self.listed()?.contains(&pick) {
                self.recheck(pick);
            }
        }
        let faults: Vec<String> = done
            .iter()
            .map(|(f, fired)| format!("{f}{}", if *fired { " (fired)" } else { "" }))
            .collect();
        eprintln!(
            "{label} ({:.1} s): {}{}: {new} new points checked{}",
            started.elapsed().as_secs_f64(),
            faults.join("; "),
            if stalled { ", STALLED" } else { "" },
            if wrong > 0 {
                format!(", {wrong} WRONG")
            } else {
                String::new()
            }
        );
        Ok(())
    }

    /// Makes `n` writes. A write fails only when the agent died under it (a crash
    /// rule in the agent): it is restarted and the write made again.
    fn write(&mut self, n: u64) -> anyhow::Result<()> {
        for attempt in 0..3 {
            let agent = self.agent.as_mut().context("no agent runs")?;
            let result = match agent.disk() {
                Ok(disk) => self.workload.write(disk, n),
                Err(e) => return Err(e),
            };
            let Err(e) = result else {
                return Ok(());
            };
            if !agent.exited_within(Duration::from_secs(5)) {
                bail!("a write to the served disk failed while the agent runs: {e}");
            }
            eprintln!("the agent died under a write ({e}); restarted, write made again (attempt {attempt})");
            self.restart(Role::Agent, true)?;
        }
        bail!("the agent died under a write three times in a row")
    }

    fn inject(&mut self, fault: &Fault, round: u64) -> anyhow::Result<()> {
        match fault {
            Fault::Storage { role, rule } => self.arm(*role, rule),
            Fault::Kill(role) => {
                self.kill(*role);
                self.restart(*role, false)
            }
            Fault::PowerCut { role, keep_some } => {
                self.kill(*role);
                let mode = if *keep_some {
                    CutMode::KeepSome {
                        seed: self.summary.seed.wrapping_mul(1000).wrapping_add(round),
                    }
                } else {
                    CutMode::DropAll
                };
                let fs = match role {
                    Role::Agent => &self.agent_fs,
                    Role::Ps => &self.ps_fs,
                    Role::Mt => &self.mt_fs,
                };
                fs.fs.cut(mode).context("cut power")?;
                self.restart(*role, false)
            }
            Fault::PsRestart => {
                self.cluster.ps().terminate();
                self.restart(Role::Ps, false)
            }
        }
    }

    /// Restarts `role` with `rule` armed (the agent stopped cleanly first).
    fn arm(&mut self, role: Role, rule: &str) -> anyhow::Result<()> {
        if role == Role::Agent {
            if let Some(a) = self.agent.take() {
                a.stop();
            }
        }
        if !self.start_armed(role, Some(rule)) {
            self.restart(role, true)?;
        }
        Ok(())
    }

    fn kill(&mut self, role: Role) {
        match role {
            Role::Agent => {
                if let Some(a) = self.agent.take() {
                    a.kill9();
                }
            }
            Role::Ps => {
                self.cluster.ps().kill9();
            }
            Role::Mt => {
                self.cluster.mt().kill9();
            }
        }
    }

    /// Starts `role` again (SIGKILLing it if it still runs), without fault rules when
    /// `clean`, else with the ones it had. A rule that fires while the role recovers
    /// its state makes it refuse to start, as it should: then it starts clean.
    fn restart(&mut self, role: Role, clean: bool) -> anyhow::Result<()> {
        if !clean && self.start_armed(role, None) {
            return Ok(());
        }
        let clean_rules = |spec: DaemonSpec| spec.env(boomerang_common::faults::ENV, "");
        match role {
            Role::Agent => {
                if let Some(a) = self.agent.take() {
                    a.kill9();
                }
                self.start_agent("")
            }
            Role::Ps => {
                self.cluster.restart_ps_with(clean_rules);
                Ok(())
            }
            Role::Mt => {
                self.cluster.restart_mt_with(clean_rules);
                Ok(())
            }
        }
    }

    /// Starts `role` again (SIGKILLing it if it still runs) with `rule` armed, or
    /// with the rules it had when `None`; whether it started. A rule that fires while
    /// the role recovers its state makes it refuse to start, as it should.
    fn start_armed(&mut self, role: Role, rule: Option<&str>) -> bool {
        let set = |spec: DaemonSpec| match rule {
            Some(r) => spec.env(boomerang_common::faults::ENV, r),
            None => spec,
        };
        match role {
            Role::Agent => {
                if let Some(a) = self.agent.take() {
                    a.kill9();
                }
                let rule = rule.map_or_else(|| self.agent_rule.clone(), str::to_string);
                match self.start_agent(&rule) {
                    Ok(()) => true,
                    Err(e) => {
                        eprintln!(
                            "the agent did not start with `{rule}` ({e:#}): starting it clean"
                        );
                        false
                    }
                }
            }
            Role::Ps | Role::Mt => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if role == Role::Ps {
                    self.cluster.restart_ps_with(set);
                } else {
                    self.cluster.restart_mt_with(set);
                }
            }))
            .is_ok(),
        }
    }

    fn start_agent(&mut self, rule: &str) -> anyhow::Result<()> {
        let env = [(boomerang_common::faults::ENV.to_string(), rule.to_string())];
        let log = self.cluster.logs_dir().join("agent-chaos.log");
        std::fs::create_dir_all(self.cluster.logs_dir()).context("create the logs directory")?;
        self.agent = Some(TrackingAgent::start(
            &self.args,
            DISK,
            &self.serve_dir,
            &env,
            &log,
        )?);
        self.agent_rule = rule.to_string();
        Ok(())
    }

    /// Restarts whatever a fault stopped: a daemon that exited (a crash rule, a
    /// poisoned log), an agent that exited.
    fn settle(&mut self) -> anyhow::Result<()> {
        if !self.cluster.ps().is_running() {
            self.restart(Role::Ps, true)?;
        }
        if !self.cluster.mt().is_running() {
            self.restart(Role::Mt, true)?;
        }
        if !self.agent.as_mut().is_some_and(TrackingAgent::is_running) {
            self.restart(Role::Agent, true)?;
        }
        Ok(())
    }

    /// Waits for a point cut after the last write to reach the master target; when it
    /// does not come, restarts what stopped, then all three roles clean (a stall).
    /// Returns whether it stalled.
    fn wait_point_after_writes(&mut self, label: String) -> anyhow::Result<bool> {
        let after = self.workload.last_write_ms();
        if self.wait_cut_after(after, POINT_WAIT) {
            return Ok(false);
        }
        self.settle()?;
        for role in [Role::Mt, Role::Ps, Role::Agent] {
            self.restart(role, true)?;
        }
        self.summary.stalls += 1;
        eprintln!("{label}: no point after the last write within {POINT_WAIT:?}: all three roles restarted (a stall)");
        if self.wait_cut_after(after, STALL_WAIT) {
            return Ok(true);
        }
        bail!(
            "{label}: no point after the last write even {STALL_WAIT:?} after restarting all three roles"
        )
    }

    fn wait_cut_after(&mut self, ms: u64, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let status = self.cluster.mt_status();
            let cut_after = status
                .raw
                .get("disks")
                .and_then(|d| d.as_array())
                .and_then(|d| d.iter().find(|x| x["disk"] == DISK))
                .is_some_and(|d| {
                    d["consistent"] == true
                        && d["cut"] == cli::CUT_CRASH_CONSISTENT
                        && d["point_id"].as_u64().is_some_and(|p| p > ms)
                });
            if cut_after
                && self
                    .listed()
                    .is_ok_and(|l| l.last().is_some_and(|&p| p > ms))
            {
                return true;
            }
            // A crash rule may stop a daemon while the point is awaited: a service
            // manager starts it again.
            if self.settle().is_err() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    /// The group's points, oldest first.
    fn listed(&self) -> anyhow::Result<Vec<u64>> {
        let out = self
            .cluster
            .mt_op_output("points", GROUP, &["--json".into()]);
        if !out.status.success() {
            bail!(
                "boomerang-mt points: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let json: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("points --json")?;
        Ok(cli::parse_points(&json).iter().map(|p| p.id).collect())
    }

    /// Checks every listed point not checked yet; returns (checked, wrong).
    fn check_new_points(&mut self, label: String) -> (usize, u64) {
        let listed = match self.listed() {
            Ok(l) => l,
            Err(e) => {
                self.summary.wrong += 1;
                eprintln!("{label}: WRONG: cannot list the points: {e:#}");
                return (0, 1);
            }
        };
        let newest_checked = self.checked.keys().next_back().copied().unwrap_or(0);
        let mut new = 0;
        let mut wrong = 0;
        let mut floor = self.checked.values().map(|c| c.writes).max().unwrap_or(0);
        let newest = listed.last().copied();
        for id in listed.into_iter().filter(|&id| id > newest_checked) {
            new += 1;
            self.summary.checked += 1;
            let verdict = self.materialize(id).and_then(|image| {
                let k = self.workload.check(&image)?;
                if k < floor {
                    return Err(format!("holds writes 1..={k}, an older point held 1..={floor}"));
                }
                if Some(id) == newest && k != self.workload.writes() {
                    return Err(format!(
                        "the newest point, cut after the last write, holds writes 1..={k} of {}: acknowledged writes lost",
                        self.workload.writes()
                    ));
                }
                Ok((k, blake3_hex(&image)))
            });
            match verdict {
                Ok((k, sha)) => {
                    floor = k;
                    self.checked.insert(
                        id,
                        Checked {
                            writes: k,
                            blake3: sha,
                        },
                    );
                }
                Err(why) => {
                    wrong += 1;
                    self.summary.wrong += 1;
                    eprintln!("{label}: point {id} WRONG: {why}");
                }
            }
        }
        self.workload.forget_through(floor);
        (new, wrong)
    }

    /// Materializes a point checked before and compares it with what it held then.
    fn recheck(&mut self, id: u64) {
        let Some(was) = self.checked.get(&id).cloned() else {
            return;
        };
        self.summary.checked += 1;
        let verdict = self.materialize(id).and_then(|image| {
            let sha = blake3_hex(&image);
            if sha == was.blake3 {
                Ok(())
            } else {
                Err(format!(
                    "blake3 {sha}, it held writes 1..={} with blake3 {} when first checked",
                    was.writes, was.blake3
                ))
            }
        });
        if let Err(why) = verdict {
            // The retention policy may have pruned it since it was listed: a point
            // no longer listed owes nothing.
            if self.listed().is_ok_and(|l| !l.contains(&id)) {
                self.summary.checked -= 1;
                self.checked.remove(&id);
                return;
            }
            self.summary.wrong += 1;
            eprintln!("point {id} WRONG on a second look: {why}");
        }
    }

    /// The point's disk, by `test-failover` to a scratch file (cleaned up after).
    fn materialize(&mut self, id: u64) -> Result<Vec<u8>, String> {
        // The cleanup goes through the running master target.
        self.settle().map_err(|e| format!("{e:#}"))?;
        let target = self.cluster.root().join("point.img");
        let mut args = cli::point_to_args(&id.to_string(), &[(DISK.to_string(), target.clone())]);
        args.push("--json".into());
        let out = self.cluster.mt_op_output("test-failover", GROUP, &args);
        let image = if out.status.success() {
            std::fs::read(&target).map_err(|e| format!("read {}: {e}", target.display()))
        } else {
            Err(format!(
                "test-failover of point {id} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        };
        let cleanup = self
            .cluster
            .mt_op_output("test-failover", GROUP, &["--cleanup".into()]);
        if !cleanup.status.success() {
            return Err(format!(
                "test-failover --cleanup: {}",
                String::from_utf8_lossy(&cleanup.stderr).trim()
            ));
        }
        image
    }

    /// "fault injection fired" lines in `role`'s log so far.
    fn fired_lines(&mut self, role: Role) -> usize {
        let needle = "fault injection fired";
        match role {
            Role::Agent => std::fs::read_to_string(self.cluster.logs_dir().join("agent-chaos.log"))
                .unwrap_or_default()
                .matches(needle)
                .count(),
            Role::Ps => self.cluster.ps().log().matches(needle).count(),
            Role::Mt => self.cluster.mt().log().matches(needle).count(),
        }
    }

    fn sample_rss(&mut self) {
        let agent = self.agent.as_ref().and_then(|a| peak_rss_kib(a.pid()));
        let ps = self.cluster.ps().peak_rss_kib();
        let mt = self.cluster.mt().peak_rss_kib();
        for (role, kib) in [(Role::Agent, agent), (Role::Ps, ps), (Role::Mt, mt)] {
            if let Some(kib) = kib {
                let peak = self.summary.peak_rss_kib.entry(role.name()).or_default();
                *peak = (*peak).max(kib);
            }
        }
    }

    /// Copies the roles' logs out of the cluster's scratch directory (removed with
    /// it) to `<tmp>/boomerang-chaos-<seed>-logs`.
    fn keep_logs(&self) -> PathBuf {
        let to = std::env::temp_dir().join(format!("boomerang-chaos-{}-logs", self.summary.seed));
        let _ = std::fs::create_dir_all(&to);
        if let Ok(entries) = std::fs::read_dir(self.cluster.logs_dir()) {
            for e in entries.flatten() {
                let _ = std::fs::copy(e.path(), to.join(e.file_name()));
            }
        }
        to
    }
}

fn round_label(round: u64) -> String {
    format!("chaos round {round}")
}

fn blake3_hex(data: &[u8]) -> String {
    boomerang_common::hash::ChunkHash::of(data).to_hex()
}
