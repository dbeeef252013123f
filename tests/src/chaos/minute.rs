//! The minute of kills (issue 9): the agent tracks one disk holding a live ext4, a
//! crash-consistent point every second, while the process server and the master
//! target are killed -9 at seeded moments every 1-5 s (one, the other, or both) and
//! started again at once, as a service manager does. Two sources:
//!
//! - `intercept`: ext4 on a loop device over the file the agent serves through FUSE;
//! - `trace`: ext4 on a loop device the agent traces, frozen for each point.
//!
//! The agent writes each point's blake3 while it holds the writes
//! (`BOOMERANG_TAG_WITNESS_DIR`). Afterwards every crash-consistent point the master
//! target lists is materialized (`test-failover`) and must be exactly its witness,
//! and its file system must recover clean (`e2fsck` journal replay, then `-fn`). The
//! report gives the gaps between consecutive points over the minute (its edges
//! count): the test of the intercept source requires none above 2 s.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use boomerang_common::config::now_ms;

use super::agent::TrackingAgent;
use crate::fswriter::{Writer, WriterStats};
use crate::privileged::tool;
use crate::process::run_ok;
use crate::rng::DataRng;
use crate::{cli, e2fsck_recovers_clean, mkfs_ext4, Cluster, ClusterConfig, LoopDevice, Mount};

const DISK: &str = "d0";
const AGENT: &str = "agent1";
/// The agent's variable for tag witnesses (agent/src/witness.rs).
const WITNESS_ENV: &str = "BOOMERANG_TAG_WITNESS_DIR";
/// From the agent's start to its first point (the trace source scans first).
const FIRST_POINT: Duration = Duration::from_secs(120);
/// From the end of the writes to a point that holds them all.
const LAST_POINT: Duration = Duration::from_secs(60);

/// Which continuous source the agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// FUSE, write-order journal.
    Intercept,
    /// Kernel block tracepoints, fsfreeze for points.
    Trace,
}

impl Source {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Source::Intercept => "intercept",
            Source::Trace => "trace",
        }
    }
}

impl FromStr for Source {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "intercept" => Ok(Source::Intercept),
            "trace" => Ok(Source::Trace),
            _ => Err(format!("unknown source `{s}`: intercept or trace")),
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct MinuteOptions {
    /// Picks the kills and the workload.
    pub seed: u64,
    /// The agent's source.
    pub source: Source,
    /// How long the kills go on (a minute by default).
    pub duration: Duration,
    /// Disk size, MiB.
    pub disk_mib: u64,
}

impl MinuteOptions {
    /// A minute of `source` with `seed` on a 64 MiB disk.
    pub fn new(source: Source, seed: u64) -> MinuteOptions {
        MinuteOptions {
            seed,
            source,
            duration: Duration::from_secs(60),
            disk_mib: 64,
        }
    }
}

/// What the minute found.
#[derive(Debug)]
pub struct MinuteReport {
    /// The options run.
    pub seed: u64,
    /// The source.
    pub source: Source,
    /// The kills, in order: `ps`, `mt` or `both`.
    pub kills: Vec<&'static str>,
    /// What the workload did.
    pub writer: WriterStats,
    /// Crash-consistent points whose time falls inside the minute.
    pub points_in_window: usize,
    /// Gaps between consecutive points over the minute, its edges included, ms.
    pub gaps_ms: Vec<u64>,
    /// The longest gap: where it began and ended (ms since the epoch).
    pub longest: (u64, u64),
    /// Points materialized and checked.
    pub checked: u64,
    /// What was wrong, one line per point.
    pub wrong: Vec<String>,
}

impl MinuteReport {
    /// The median gap, ms.
    pub fn gap_median_ms(&self) -> u64 {
        let mut g = self.gaps_ms.clone();
        g.sort_unstable();
        g.get(g.len() / 2).copied().unwrap_or(0)
    }

    /// The longest gap, ms.
    pub fn gap_max_ms(&self) -> u64 {
        self.gaps_ms.iter().copied().max().unwrap_or(0)
    }
}

impl MinuteReport {
    /// Prints the report and panics (for a test) unless every point was exact, no
    /// gap between points was above `max_gap_ms`, and at least `min_checked` points
    /// were checked.
    pub fn assert_kept(&self, max_gap_ms: u64, min_checked: u64) {
        eprintln!("{self}\nwriter: {:?}; kills: {:?}", self.writer, self.kills);
        assert!(
            self.wrong.is_empty(),
            "wrong points (BOOMERANG_KEEP_TEST_DIRS=1 keeps the logs):\n{}",
            self.wrong.join("\n")
        );
        assert!(
            self.gap_max_ms() <= max_gap_ms,
            "no point between {} and {} ({} ms); kills {:?}",
            self.longest.0,
            self.longest.1,
            self.gap_max_ms(),
            self.kills
        );
        assert!(
            self.checked >= min_checked,
            "only {} points to check",
            self.checked
        );
    }
}

impl std::fmt::Display for MinuteReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "minute: seed {}, source {}, {} kills, {} points in the minute (gaps median {} ms, max {} ms), {} points checked, {} wrong",
            self.seed,
            self.source.name(),
            self.kills.len(),
            self.points_in_window,
            self.gap_median_ms(),
            self.gap_max_ms(),
            self.checked,
            self.wrong.len()
        )
    }
}

/// The disk, its file system and the agent; dropped in field order: unmount, detach
/// (which also sweeps a trace instance left behind), stop the agent, the daemons.
struct Rig {
    mount: Option<Mount>,
    dev: Option<LoopDevice>,
    agent: Option<TrackingAgent>,
    cluster: Cluster,
}

impl Rig {
    fn agent(&mut self) -> anyhow::Result<&mut TrackingAgent> {
        self.agent.as_mut().context("the agent was stopped")
    }

    fn mount_dir(&self) -> anyhow::Result<PathBuf> {
        Ok(self
            .mount
            .as_ref()
            .context("unmounted")?
            .dir()
            .to_path_buf())
    }

    /// The crash-consistent points listed now.
    fn crash_points(&self) -> Vec<cli::PointInfo> {
        self.cluster
            .mt_points(AGENT)
            .into_iter()
            .filter(|p| p.kind == cli::CUT_CRASH_CONSISTENT)
            .collect()
    }

    /// Waits up to `limit` for a crash-consistent point later than `after_ms`.
    fn wait_point_after(
        &mut self,
        after_ms: u64,
        limit: Duration,
        what: &str,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if self.crash_points().iter().any(|p| p.time_ms > after_ms) {
                return Ok(());
            }
            if !self.agent()?.is_running() {
                bail!("the agent exited while waiting for {what}");
            }
            if Instant::now() > deadline {
                bail!("no {what} within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Runs the minute. An error is a failure to run it (a daemon that would not start,
/// the agent exiting); wrong points are in the report.
pub fn run(opts: &MinuteOptions) -> anyhow::Result<MinuteReport> {
    let cluster = Cluster::start(ClusterConfig::default());
    let root = cluster.root().to_path_buf();
    let witness = root.join("witness");
    let env = vec![(WITNESS_ENV.to_string(), witness.display().to_string())];
    let log = cluster.logs_dir().join(format!("agent-{AGENT}.log"));
    let size = opts.disk_mib << 20;
    let image = root.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(size))
        .with_context(|| format!("create the sparse image {}", image.display()))?;
    let mut rig = Rig {
        mount: None,
        dev: None,
        agent: None,
        cluster,
    };
    let result = run_on(&mut rig, opts, &image, &env, &log);
    result.map_err(|e| {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        e.context(format!("the last lines of {}:\n{tail}", log.display()))
    })
}

fn run_on(
    rig: &mut Rig,
    opts: &MinuteOptions,
    image: &std::path::Path,
    env: &[(String, String)],
    log: &std::path::Path,
) -> anyhow::Result<MinuteReport> {
    let root = rig.cluster.root().to_path_buf();
    let witness = root.join("witness");
    match opts.source {
        Source::Intercept => {
            let serve_dir = root.join("serve");
            std::fs::create_dir_all(&serve_dir).context("create the serve directory")?;
            let args = rig.cluster.agent(AGENT).disk(DISK, image);
            let agent = TrackingAgent::start(&args, DISK, &serve_dir, env, log)?;
            let served = agent.served().context("no served file")?.to_path_buf();
            rig.agent = Some(agent);
            let dev = LoopDevice::attach(&served);
            mkfs_ext4(dev.path());
            rig.mount = Some(Mount::new(dev.path(), &root.join("mnt"), false));
            rig.dev = Some(dev);
        }
        Source::Trace => {
            let dev = LoopDevice::attach(image);
            mkfs_ext4(dev.path());
            let mount = Mount::new(dev.path(), &root.join("mnt"), false);
            let args = rig
                .cluster
                .agent(AGENT)
                .disk(DISK, dev.path())
                .freeze(mount.dir());
            rig.mount = Some(mount);
            rig.dev = Some(dev);
            rig.agent = Some(TrackingAgent::start_trace(&args, env, log)?);
            rig.wait_point_after(0, FIRST_POINT, "first point after the scan")?;
        }
    }

    let writer = Writer::start(&rig.mount_dir()?, opts.seed, false);
    let mut rng = DataRng::new(opts.seed);
    let from = now_ms();
    let until = Instant::now() + opts.duration;
    let mut kills = Vec::new();
    loop {
        let next = Instant::now() + Duration::from_millis(rng.between(1000, 5000));
        if next >= until {
            break;
        }
        while Instant::now() < next {
            if !rig.agent()?.is_running() {
                bail!("the agent exited under the kills ({kills:?})");
            }
            if !writer.is_running() {
                bail!("the workload stopped early");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        match rng.below(3) {
            0 => {
                rig.cluster.restart_ps();
                kills.push("ps");
            }
            1 => {
                rig.cluster.restart_mt();
                kills.push("mt");
            }
            _ => {
                rig.cluster.restart_mt();
                rig.cluster.restart_ps();
                kills.push("both");
            }
        }
    }
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    let to = now_ms();
    let stats = writer.finish();
    run_ok(&mut std::process::Command::new(tool("sync")));
    let synced = now_ms();
    rig.wait_point_after(synced, LAST_POINT, "point after the writes")?;
    match opts.source {
        Source::Intercept => {
            // The served file's users go first: the agent's stop waits for them.
            rig.mount = None;
            rig.dev = None;
            if let Some(a) = rig.agent.take() {
                a.stop();
            }
        }
        Source::Trace => {
            if let Some(a) = rig.agent.take() {
                a.stop();
            }
            rig.mount = None;
            rig.dev = None;
        }
    }

    let points = rig.crash_points();
    let mut edges = vec![from];
    edges.extend(
        points
            .iter()
            .map(|p| p.time_ms)
            .filter(|&t| t > from && t < to),
    );
    edges.push(to);
    let gaps_ms: Vec<u64> = edges.windows(2).map(|w| w[1] - w[0]).collect();
    let longest = edges
        .windows(2)
        .max_by_key(|w| w[1] - w[0])
        .map_or((from, to), |w| (w[0], w[1]));

    let target = root.join("point.img");
    let mut wrong = Vec::new();
    let mut checked = 0;
    for p in &points {
        checked += 1;
        let Ok(want) = std::fs::read_to_string(witness.join(DISK).join(p.id.to_string())) else {
            wrong.push(format!(
                "point {}: no witness (the agent did not cut it)",
                p.id
            ));
            continue;
        };
        let mut args = cli::point_to_args(&p.id.to_string(), &[(DISK.to_string(), target.clone())]);
        args.push("--json".into());
        let out = rig.cluster.mt_op_output("test-failover", AGENT, &args);
        if !out.status.success() {
            wrong.push(format!(
                "point {}: test-failover failed: {}",
                p.id,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            continue;
        }
        let image = std::fs::read(&target).context("read the materialized point")?;
        let got = boomerang_common::ChunkHash::of(&image).to_hex();
        drop(image);
        if got != want.trim() {
            wrong.push(format!(
                "point {}: not the bytes the source had at its tag",
                p.id
            ));
        } else if let Err(e) = e2fsck_recovers_clean(&target) {
            wrong.push(format!(
                "point {}: the file system does not recover clean: {e}",
                p.id
            ));
        }
        let cleanup = rig
            .cluster
            .mt_op_output("test-failover", AGENT, &["--cleanup".into()]);
        if !cleanup.status.success() {
            bail!(
                "test-failover --cleanup: {}",
                String::from_utf8_lossy(&cleanup.stderr).trim()
            );
        }
    }
    Ok(MinuteReport {
        seed: opts.seed,
        source: opts.source,
        kills,
        writer: stats,
        points_in_window: edges.len() - 2,
        gaps_ms,
        longest,
        checked,
        wrong,
    })
}
