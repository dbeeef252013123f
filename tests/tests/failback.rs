//! The failback workflow of `FAILBACK-SEED.md`, end to end, twice in a row, with real
//! ext4 file systems on loop devices and two machines in one group.
//!
//! Two sites, each a master target plus a process server ([`Site`]): the
//! *on-premises* site and the *cloud* site. The group `g1` is two "VMs", each one
//! ext4 disk on a loop device tracked by its own agent (`agent1` has `d0`, `agent2`
//! has `d1`) with the trace source, fsfreeze pauses and coordinated points (crash every
//! second, app-consistent every three). Agents reach a site's process server through
//! a [`SiteLink`], a counting UDP relay standing for the link between the sites: the
//! bytes a step put on the wire are measured outside the binaries under test.
//!
//! One round trip:
//! 1. **Protected into on-premises.** Round 1: the cloud disks get ext4 and a base tree
//!    of files (most of the disk's data), then the agents start (the full initial
//!    sync, the reference for what an unseeded copy costs). Round 2: `protect` at the
//!    on-premises site, `reprotect` at the cloud site, agents from the configurations
//!    it wrote (a seeded sync: only differing chunks may cross the link).
//! 2. **Points and more writes.** Write phase 1; wait for an app-consistent point
//!    after it; write phase 2 ("more writes"); `failover --point latest-app`
//!    materialized to fresh loop devices. Which files a point holds is known from the
//!    write phases: a point holds phase k when phase k ended by the point's slot (its
//!    id: the agents pause at or after it, and the freeze flushes what was written)
//!    and phase k+1 started after its cut time (writes then block on the freeze, or
//!    come after the thaw). The targets must pass `e2fsck -fn` and, mounted, hold
//!    exactly the files recorded for that phase.
//! 3. **Commit** at the on-premises site: the cloud agents are told to forget the
//!    group and exit; the cloud file systems are unmounted.
//! 4. **Reprotect back.** Round 1 starts the cloud site with the old cloud disks as
//!    its replicas (`--replica`); round 2 runs `protect` there. `reprotect` at the
//!    on-premises site writes one agent configuration per machine; the agents run
//!    from them while the workload writes. The first sync must move far less than
//!    the disks hold: under a quarter of the two disks and under half of the full
//!    initial sync, on the wire.
//! 5. **Failover again, to latest**, at the cloud site, replicas rolled in place. The
//!    writes stop first; the agents get the shutdown directive, take a final point,
//!    ship it and run their shutdown hook, which records that it ran and freezes the
//!    file system (the "VM" is off: nothing can write after the final point). The
//!    old cloud disks must then equal the on-premises disks byte for byte, except
//!    for the ext4 superblock's write time, write counter and checksum, which the
//!    thaw ending the final point's pause and the hook's freeze rewrite
//!    ([`ext4_superblock_bookkeeping`]); pass `e2fsck -fn`; and, mounted again in the
//!    next round, hold the same files. Commit at the cloud site.
//!
//! Measured outside the product: sizes of the four syncs on the links (the initial
//! one and three seeded reprotects), the failover durations; printed at the end.
//!
//! A second, ignored test shows a product bug: the points of the history before a
//! failback are still offered after `protect`, and giving one back yields the
//! failed-back disks' later files
//! ([`points_from_before_a_failback_give_their_own_bytes_or_are_not_offered`]).
//!
//! Privileged: needs root, loop devices, ext4 tools, fsfreeze and a usable tracefs.
//! Without them the test prints `SKIPPED` and returns; with
//! `BOOMERANG_PRIVILEGED_TESTS=1` a missing prerequisite fails. Run:
//! `BOOMERANG_PRIVILEGED_TESTS=1 cargo test -p boomerang-tests --test failback`.
//!
//! Cleanup order (locals drop in reverse): agents (SIGKILL if still running), file
//! systems (thawed, then unmounted), the sites (relays, then daemons), the trace
//! instances of killed agents, the loop devices, the scratch directory.

#[allow(dead_code)] // only the status line is read here
#[path = "support/status.rs"]
mod status;
#[allow(dead_code)] // the one-shot `sync` helpers are not used here
mod support;

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use boomerang_common::config::now_ms;
use boomerang_tests::cli::{self, PointInfo};
use boomerang_tests::cluster::boomerang_command;
use boomerang_tests::privileged::tool;
use boomerang_tests::rng::DataRng;
use boomerang_tests::tracefs::SweepInstances;
use boomerang_tests::{
    assert_trees_equal, block_differences_ignoring, e2fsck_clean, hash_tree, mkfs_ext4,
    require_privileged, scratch_dir, write_tree, Cluster, ClusterConfig, LinkBytes, LoopDevice,
    Mount, Need, SiteLink, TreeHashes,
};
use serde_json::Value;

use support::{AgentProcess, MIB};

const TEST: &str = "failback_round_trip_twice_with_ext4_on_loop_devices";
const NEEDS: &[Need] = &[
    Need::Root,
    Need::LoopDevices,
    Need::Ext4Tools,
    Need::Fsfreeze,
    Need::Tracefs,
];
const GROUP: &str = "g1";
/// The group's machines: agent name and its one disk. Two machines make the points
/// coordinated and `reprotect` write one configuration each.
const MACHINES: [(&str, &str); 2] = [("agent1", "d0"), ("agent2", "d1")];
/// Each disk. Big enough that the base tree is most of the data and the writes of
/// four legs still fit; small enough that scans and materializing stay quick.
const DISK_SIZE: u64 = 192 * MIB;
/// Files on each cloud disk before it is protected: what an unseeded copy must move.
const BASE_BYTES: u64 = 96 * MIB;
/// New files per disk in each write phase (plus some deletes and overwrites).
const PHASE_BYTES: u64 = 6 * MIB;
const CRASH_INTERVAL: &str = "1";
const APP_INTERVAL: &str = "3";
/// `APP_INTERVAL` in ms: coordinated app-consistent points fall on its multiples.
const APP_INTERVAL_MS: u64 = 3_000;
/// Phase 2 starts only this early in an app interval, so that it ends well before the
/// next app-consistent slot and that point, if chosen, holds phase 2 whole.
const PHASE_START_LATEST_MS: u64 = APP_INTERVAL_MS / 2;
/// Check-ins with the master target (the default is 2 s): a failover's directive
/// reaches the agents sooner.
const CONTROL_INTERVAL: &str = "1";
/// How long `failover --point latest` waits for the agents to drain.
const DRAIN_TIMEOUT_SECS: &str = "90";
/// The first sync of two agents (scans of both disks, under writes). Generous: other
/// disk-heavy tests may run beside this one on two cores.
const FIRST_POINT_WAIT: Duration = Duration::from_secs(120);
/// Longest wait for a consistency point while tracking.
const POINT_WAIT: Duration = Duration::from_secs(60);
/// An agent's exit after a directive (check-in interval, final point, hook).
const AGENT_EXIT_WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);
/// A reprotect's first sync must put less than this share of the two disks on the
/// wire...
const SEEDED_MAX_SHARE_OF_DISKS: f64 = 0.25;
/// ... and less than this share of the unseeded initial sync.
const SEEDED_MAX_SHARE_OF_FULL_SYNC: f64 = 0.5;
const KIND_APP: &str = "app-consistent";
const KIND_CRASH: &str = "crash-consistent";

// ---------------------------------------------------------------------------------
// Sites, file systems, agents

/// One site: a master target and a process server, and the link the agents reach
/// its process server through.
struct Site {
    label: &'static str,
    // Field order is drop order: the relay goes before the daemons behind it.
    link: SiteLink,
    cluster: Cluster,
}

impl Site {
    fn start(label: &'static str, replicas: Vec<(String, PathBuf)>) -> Site {
        let cluster = Cluster::start(ClusterConfig {
            replicas,
            mt_extra: os(&["--drain-timeout-secs", DRAIN_TIMEOUT_SECS]),
            extra_peers: vec![(MACHINES[1].0.to_string(), "agent".to_string())],
            ..ClusterConfig::default()
        });
        let link = SiteLink::start(cluster.ps_addr());
        eprintln!(
            "{label} site: master target {}, process server {} behind link {}",
            cluster.mt_addr(),
            cluster.ps_addr(),
            link.addr()
        );
        Site {
            label,
            link,
            cluster,
        }
    }

    /// `boomerang-mt OP --group g1 MORE...`; panics unless it exits 0.
    fn op(&self, op: &str, more: &[&str]) -> String {
        eprintln!(
            "{}: boomerang-mt {}",
            self.label,
            [&[op, "--group", GROUP], more].concat().join(" ")
        );
        self.cluster.mt_op(op, GROUP, &os(more))
    }

    /// [`Site::op`] with `--json`, parsed.
    fn op_json(&self, op: &str, more: &[&str]) -> Value {
        let mut args = more.to_vec();
        args.push("--json");
        let out = self.op(op, &args);
        serde_json::from_str(out.trim()).unwrap_or_else(|e| {
            panic!("`boomerang-mt {op} --json` printed invalid JSON ({e}):\n{out}")
        })
    }

    /// The group's points; none while the master target does not know the group yet
    /// (`points` refuses an unknown group).
    fn points(&self) -> Vec<PointInfo> {
        if self.group_state() == "unknown" {
            return Vec::new();
        }
        self.cluster.mt_points(GROUP)
    }

    fn group_state(&self) -> String {
        let status = self.cluster.mt_status();
        status.raw["groups"]
            .as_array()
            .and_then(|g| g.iter().find(|g| g["group"] == GROUP))
            .and_then(|g| g["state"].as_str())
            .unwrap_or("unknown")
            .to_string()
    }

    fn assert_state(&self, want: &str, when: &str) {
        let state = self.group_state();
        assert_eq!(
            state,
            want,
            "{}: group {GROUP} {when}: {}",
            self.label,
            self.cluster.mt_status().raw
        );
    }

    /// Polls the group's points until one satisfies `done`; panics when an agent
    /// exits or `timeout` passes.
    fn wait_point(
        &self,
        agents: &mut [AgentProcess],
        timeout: Duration,
        what: &str,
        done: impl Fn(&PointInfo) -> bool,
    ) -> PointInfo {
        let deadline = Instant::now() + timeout;
        loop {
            for a in agents.iter_mut() {
                if let Some(status) = a.try_exit() {
                    panic!(
                        "{}: an agent exited ({status}) while waiting for {what}\n{}",
                        self.label,
                        a.log_tail(60)
                    );
                }
            }
            let points = self.points();
            if let Some(p) = points.iter().rev().find(|p| done(p)) {
                return p.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{}: no {what} within {timeout:?}; points {:?}\nstatus {}",
                self.label,
                summary(&points),
                self.cluster.mt_status().raw
            );
            thread::sleep(POLL);
        }
    }

    /// The crossing bytes of this site's link so far.
    fn wire(&self) -> LinkBytes {
        self.link.bytes()
    }
}

/// One disk's file system, mounted as the "VM" using it. Field order is drop order:
/// thawed (a shutdown hook freezes it) before it is unmounted.
struct Volume {
    thaw: ThawOnDrop,
    mount: Mount,
}

impl Volume {
    fn mount(dev: &Path, dir: &Path) -> Volume {
        // noatime: reading the files back to check them must not write.
        let mount = Mount::with_options(dev, dir, "rw,noatime");
        Volume {
            thaw: ThawOnDrop(dir.to_path_buf()),
            mount,
        }
    }

    fn dir(&self) -> &Path {
        self.mount.dir()
    }

    /// Thaws (if frozen) and unmounts now.
    fn unmount(self) {
        let Volume { thaw, mount } = self;
        drop(thaw);
        mount.unmount();
    }
}

/// `fsfreeze -u` on drop, whatever happened ("not frozen" is ignored).
struct ThawOnDrop(PathBuf);

impl Drop for ThawOnDrop {
    fn drop(&mut self) {
        let fsfreeze =
            boomerang_tests::privileged::find_tool("fsfreeze").unwrap_or_else(|| "fsfreeze".into());
        let _ = Command::new(fsfreeze).arg("-u").arg(&self.0).output();
    }
}

/// How a tracking agent gets its disk and process server.
enum Setup<'a> {
    /// By hand, for the first protection: `--ps --name --disk --group
    /// --coordinated-points`.
    Manual { disk: &'a str, dev: &'a Path },
    /// From the configuration `reprotect` wrote.
    Config(&'a Path),
}

/// Starts `boomerang-agent track` as agent `name` shipping to `site` (through its
/// link, with the site's PKI and a fresh `state_dir`), with the test's intervals, `--freeze` of its volume and a shutdown hook that touches
/// `marker` and freezes the volume.
fn spawn_agent(
    site: &Site,
    name: &str,
    setup: &Setup<'_>,
    volume: &Path,
    state_dir: &Path,
    marker: &Path,
) -> AgentProcess {
    let mut args: Vec<OsString> = os(&["track"]);
    match setup {
        Setup::Manual { disk, dev } => {
            args.extend(os(&["--ps", &site.link.addr().to_string(), "--name", name]));
            args.extend(["--disk".into(), id_eq_path(disk, dev)]);
            args.extend(os(&["--group", GROUP, "--coordinated-points"]));
        }
        Setup::Config(path) => args.extend(["--config".into(), path.as_os_str().to_owned()]),
    }
    let hook = format!(
        "touch '{}' && '{}' -f '{}'",
        marker.display(),
        tool("fsfreeze").display(),
        volume.display()
    );
    args.extend([
        "--pki-dir".into(),
        site.cluster.pki().dir().as_os_str().to_owned(),
        "--state-dir".into(),
        state_dir.as_os_str().to_owned(),
        "--freeze".into(),
        volume.as_os_str().to_owned(),
    ]);
    args.extend(os(&[
        "--source",
        "trace",
        "--crash-interval",
        CRASH_INTERVAL,
        "--app-interval",
        APP_INTERVAL,
        "--control-interval",
        CONTROL_INTERVAL,
        "--shutdown-hook",
        &hook,
        "--json",
    ]));
    AgentProcess::spawn_command(&site.cluster, name, boomerang_command(cli::AGENT_BIN, args))
}

/// Waits for every agent to exit 0 and returns their JSON reports (last stdout line).
fn wait_agents_exit(agents: &mut [AgentProcess], why: &str) -> Vec<Value> {
    agents
        .iter_mut()
        .map(|a| {
            let (status, stdout) = a.wait(AGENT_EXIT_WAIT);
            assert!(
                status.success(),
                "an agent {why} exited with {status}\n--- stdout ---\n{stdout}\n{}",
                a.log_tail(60)
            );
            stdout
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .and_then(|l| serde_json::from_str(l).ok())
                .unwrap_or_else(|| panic!("track --json printed no report:\n{stdout}"))
        })
        .collect()
}

// ---------------------------------------------------------------------------------
// The workload and what each point holds

/// One write phase: when it ran and the files each disk held right after.
#[derive(Debug)]
struct Phase {
    label: String,
    start_ms: u64,
    end_ms: u64,
    trees: Vec<TreeHashes>,
}

impl Phase {
    /// What the volumes hold now, with nothing written (e.g. right after mounting).
    fn observe(label: &str, volumes: &[Volume]) -> Phase {
        let at = now_ms();
        Phase {
            label: label.to_string(),
            start_ms: at,
            end_ms: at,
            trees: volumes.iter().map(|v| hash_tree(v.dir())).collect(),
        }
    }

    /// Writes a new tree of `bytes` per volume under `<label>/`; with `churn`, also
    /// deletes every 9th file the volume held and overwrites the start of every 9th
    /// other one.
    fn write(label: &str, volumes: &[Volume], seed: u64, bytes: u64, churn: bool) -> Phase {
        let before: Vec<TreeHashes> = if churn {
            volumes.iter().map(|v| hash_tree(v.dir())).collect()
        } else {
            vec![TreeHashes::new(); volumes.len()]
        };
        let start_ms = now_ms();
        for (i, v) in volumes.iter().enumerate() {
            let dir = v.dir().join(label);
            std::fs::create_dir_all(&dir)
                .unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
            write_tree(&dir, seed * 10 + i as u64, bytes);
            change_some(v.dir(), &before[i], seed * 10 + i as u64);
        }
        let end_ms = now_ms();
        let trees = volumes.iter().map(|v| hash_tree(v.dir())).collect();
        Phase {
            label: label.to_string(),
            start_ms,
            end_ms,
            trees,
        }
    }
}

/// Deletes every 9th file of `tree` and overwrites 8 KiB at the start of every 9th
/// other one, under `root`.
fn change_some(root: &Path, tree: &TreeHashes, seed: u64) {
    let mut rng = DataRng::new(seed ^ 0x5eed);
    let mut buf = vec![0u8; 8 << 10];
    for (n, rel) in tree.keys().enumerate() {
        let path = root.join(rel);
        match n % 9 {
            0 => std::fs::remove_file(&path)
                .unwrap_or_else(|e| panic!("delete {}: {e}", path.display())),
            4 => {
                rng.fill(&mut buf);
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.write_all_at(&buf, 0))
                    .unwrap_or_else(|e| panic!("overwrite {}: {e}", path.display()));
            }
            _ => {}
        }
    }
}

/// The phase whose files a point holds: phase k ended by the point's slot (its id)
/// and phase k+1 started after its cut (its time). `None`: the point overlaps a phase.
fn phase_at(phases: &[Phase], id: u64, time_ms: u64) -> Option<&Phase> {
    phases.iter().enumerate().find_map(|(k, p)| {
        let next_start = phases.get(k + 1).map_or(u64::MAX, |n| n.start_ms);
        (p.end_ms <= id && time_ms <= next_start).then_some(p)
    })
}

fn summary(points: &[PointInfo]) -> String {
    let app = points.iter().filter(|p| p.kind == KIND_APP).count();
    format!(
        "{} points ({app} app-consistent, {} crash-consistent), newest {:?}",
        points.len(),
        points.len() - app,
        points.last().map(|p| (p.id, p.kind.as_str(), p.time_ms))
    )
}

// ---------------------------------------------------------------------------------
// Small helpers

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

fn id_eq_path(id: &str, path: &Path) -> OsString {
    let mut s = OsString::from(format!("{id}="));
    s.push(path);
    s
}

/// A loop device over a new sparse image of `DISK_SIZE`.
fn new_disk(dir: &Path, name: &str) -> LoopDevice {
    let image = dir.join(format!("{name}.img"));
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(DISK_SIZE))
        .unwrap_or_else(|e| panic!("create sparse image {}: {e}", image.display()));
    LoopDevice::attach(&image)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

/// The `agent_configs` of a `reprotect --json` result, checked against the machines:
/// one per agent, naming its disk on `devices` and the process server `ps`.
fn agent_configs(result: &Value, devices: &[LoopDevice], ps: &str) -> Vec<PathBuf> {
    let paths: Vec<PathBuf> = result["agent_configs"]
        .as_array()
        .unwrap_or_else(|| panic!("reprotect --json has no agent_configs: {result}"))
        .iter()
        .map(|p| PathBuf::from(p.as_str().unwrap_or_default()))
        .collect();
    assert_eq!(
        paths.len(),
        MACHINES.len(),
        "one configuration per machine: {result}"
    );
    MACHINES
        .iter()
        .zip(devices)
        .map(|((agent, disk), dev)| {
            let path = paths
                .iter()
                .find(|p| p.ends_with(format!("{GROUP}-{agent}.toml")))
                .unwrap_or_else(|| panic!("no configuration for {agent}: {paths:?}"))
                .clone();
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            for want in [
                format!("name = \"{agent}\""),
                format!("group = \"{GROUP}\""),
                format!("process_server = \"{ps}\""),
                "coordinated_points = true".to_string(),
                format!("id = \"{disk}\""),
                format!("path = \"{}\"", dev.path().display()),
            ] {
                assert!(
                    text.contains(&want),
                    "{} lacks `{want}`:\n{text}",
                    path.display()
                );
            }
            path
        })
        .collect()
}

// ---------------------------------------------------------------------------------
// The test

/// Figures printed at the end.
#[derive(Debug, Default)]
struct Figures {
    lines: Vec<String>,
}

impl Figures {
    fn note(&mut self, line: String) {
        eprintln!("figure: {line}");
        self.lines.push(line);
    }
}

#[test]
fn failback_round_trip_twice_with_ext4_on_loop_devices() {
    if require_privileged(TEST, NEEDS) {
        round_trips(TEST, false);
    }
}

/// Rule 4 for the points of the history before a failback: once the failed-back disks
/// were used as the live disks and the group is protected again, a point from before
/// the failback can no longer be given back from the replica plus its journal. The
/// master target must stop offering such points, or give back exactly their bytes.
/// Runs round 1 of the workflow, then `protect` and the reprotect from the cloud, and
/// test-fails over to round 1's latest-app point.
#[test]
fn points_from_before_a_failback_give_their_own_bytes_or_are_not_offered() {
    const NAME: &str = "points_from_before_a_failback_give_their_own_bytes_or_are_not_offered";
    if require_privileged(NAME, NEEDS) {
        round_trips(NAME, true);
    }
}

/// The workflow of the module docs, twice; with `probe_old_points`, stops in round 2
/// after the first point of the reprotected stream to check round 1's latest-app
/// point (see [`check_old_point`]).
fn round_trips(test: &str, probe_old_points: bool) {
    let started = Instant::now();
    let scratch = scratch_dir("failback");
    let root = scratch.path();
    // The cloud VMs' disks, and per round trip the fresh on-premises disks the
    // failover to latest-app materializes to.
    let cloud: Vec<LoopDevice> = MACHINES
        .iter()
        .map(|(_, d)| new_disk(root, &format!("cloud-{d}")))
        .collect();
    let onprem: Vec<Vec<LoopDevice>> = (1..=2)
        .map(|round| {
            MACHINES
                .iter()
                .map(|(_, d)| new_disk(root, &format!("onprem{round}-{d}")))
                .collect()
        })
        .collect();
    let mut sweep = SweepInstances::new();
    for dev in cloud.iter().chain(onprem.iter().flatten()) {
        sweep.add(dev.path());
    }
    let on_site = Site::start("on-prem", Vec::new());
    let mut cloud_site: Option<Site> = None;
    let mut figures = Figures::default();

    // The cloud VMs before protection: ext4 with a base tree of files.
    for dev in &cloud {
        mkfs_ext4(dev.path());
    }
    let mut cloud_volumes: Vec<Volume> = mount_all(&cloud, root, "cloud");
    let base = Phase::write("base", &cloud_volumes, 1, BASE_BYTES, false);
    eprintln!(
        "base tree: {} + {} files",
        base.trees[0].len(),
        base.trees[1].len()
    );
    let mut first_phase = Some(base);
    let mut full_sync_wire: Option<LinkBytes> = None;
    // Round 1's latest-app point and the files it holds.
    let mut old_point: Option<(u64, Vec<TreeHashes>)> = None;

    for round in 1..=2u64 {
        let seed = round * 100;
        let prem_devs = &onprem[usize::try_from(round - 1).expect("round 1 or 2")];

        // 1. Protected into the on-premises site.
        let leg = Instant::now();
        let leg_ms = now_ms();
        let wire_before = on_site.wire();
        let mut agents: Vec<AgentProcess> = if round == 1 {
            MACHINES
                .iter()
                .zip(&cloud)
                .zip(&cloud_volumes)
                .map(|(((agent, disk), dev), vol)| {
                    let setup = Setup::Manual {
                        disk,
                        dev: dev.path(),
                    };
                    let state = root.join(format!("state-r{round}-cloud-{agent}"));
                    let marker = root.join(format!("r{round}-cloud-{agent}.shutdown"));
                    spawn_agent(&on_site, agent, &setup, vol.dir(), &state, &marker)
                })
                .collect()
        } else {
            on_site.op("protect", &[]);
            let state = on_site.group_state();
            assert!(
                state == "syncing" || state == "protected",
                "on-prem: group {GROUP} after protect is {state}"
            );
            eprintln!(
                "on-prem after protect: {state}, points still listed: {}",
                summary(&on_site.points())
            );
            let cs = cloud_site
                .as_ref()
                .expect("the cloud site runs since round 1");
            let result = cs.op_json(
                "reprotect",
                &["--process-server", &on_site.link.addr().to_string()],
            );
            cs.assert_state("reprotecting", "after reprotect");
            let configs = agent_configs(&result, &cloud, &on_site.link.addr().to_string());
            MACHINES
                .iter()
                .zip(&configs)
                .zip(&cloud_volumes)
                .map(|(((agent, _), config), vol)| {
                    let state = root.join(format!("state-r{round}-cloud-{agent}"));
                    let marker = root.join(format!("r{round}-cloud-{agent}.shutdown"));
                    spawn_agent(
                        &on_site,
                        agent,
                        &Setup::Config(config),
                        vol.dir(),
                        &state,
                        &marker,
                    )
                })
                .collect()
        };
        let first = on_site.wait_point(
            &mut agents,
            FIRST_POINT_WAIT,
            "first point of the group",
            |p| p.id >= leg_ms,
        );
        let sync_wire = on_site.wire().since(&wire_before);
        let took = leg.elapsed();
        if round == 1 {
            figures.note(format!(
                "round 1: initial (unseeded) sync cloud -> on-prem: {:.1} MiB up, {:.1} MiB down on the link ({:.1} % of the two disks), first point after {took:.1?}",
                mib(sync_wire.up),
                mib(sync_wire.down),
                100.0 * sync_wire.total() as f64 / (2 * DISK_SIZE) as f64
            ));
            full_sync_wire = Some(sync_wire);
        } else {
            check_seeded(
                &mut figures,
                &format!("round {round}: reprotect sync cloud -> on-prem"),
                &sync_wire,
                full_sync_wire.as_ref().expect("measured in round 1"),
                took,
            );
        }
        on_site.assert_state("protected", "with a first point");
        if probe_old_points && round == 2 {
            let (id, trees) = old_point.as_ref().expect("recorded in round 1");
            check_old_point(&on_site, root, *id, trees);
            return;
        }

        // 2. Points and more writes; failover to latest-app onto fresh disks.
        let phase0 = first_phase
            .take()
            .expect("the cloud volumes' files are known");
        assert!(
            phase0.end_ms <= first.id,
            "the files before protection end by the first point"
        );
        let phase1 = Phase::write(
            &format!("r{round}-cloud-1"),
            &cloud_volumes,
            seed + 1,
            PHASE_BYTES,
            true,
        );
        let mut seen = 0;
        let app = loop {
            let p = on_site.wait_point(
                &mut agents,
                POINT_WAIT,
                "an app-consistent point after write phase 1",
                |p| p.kind == KIND_APP && p.id >= phase1.end_ms && p.id > seen,
            );
            if now_ms() < p.id + PHASE_START_LATEST_MS {
                break p;
            }
            seen = p.id; // too late in its interval to start phase 2: the next one
        };
        let points: Vec<PointInfo> = on_site
            .points()
            .into_iter()
            .filter(|p| p.id >= leg_ms)
            .collect();
        assert!(
            points.iter().any(|p| p.kind == KIND_CRASH)
                && points.iter().any(|p| p.kind == KIND_APP),
            "app-consistent and crash-consistent points: {}",
            summary(&points)
        );
        let phase2 = Phase::write(
            &format!("r{round}-cloud-2"),
            &cloud_volumes,
            seed + 2,
            PHASE_BYTES,
            true,
        );
        let phases = [phase0, phase1, phase2];
        let targets: Vec<String> = MACHINES
            .iter()
            .zip(prem_devs)
            .flat_map(|((_, disk), dev)| {
                [
                    "--to".to_string(),
                    format!("{disk}={}", dev.path().display()),
                ]
            })
            .collect();
        let mut args = vec!["--point", "latest-app"];
        args.extend(targets.iter().map(String::as_str));
        let t = Instant::now();
        let result = on_site.op_json("failover", &args);
        figures.note(format!(
            "round {round}: failover to latest-app materialized onto fresh loop devices: {:.1?}",
            t.elapsed()
        ));
        on_site.assert_state("failover-pending", "after the failover");
        let point_id = result["point_id"]
            .as_u64()
            .expect("failover result point_id");
        let point_time = result["time_ms"].as_u64().expect("failover result time_ms");
        assert_eq!(result["kind"], KIND_APP, "{result}");
        assert!(
            point_id >= app.id,
            "latest-app is at least the point seen: {result}"
        );
        let held = phase_at(&phases, point_id, point_time).unwrap_or_else(|| {
            panic!(
                "the chosen point {point_id} (cut at {point_time}) overlaps a write phase, so what it holds is not known: phases {:?}",
                phases.iter().map(|p| (&p.label, p.start_ms, p.end_ms)).collect::<Vec<_>>()
            )
        });
        eprintln!(
            "round {round}: latest-app is point {point_id}: it holds the files after {} (the later writes are lost by choosing it)",
            held.label
        );
        if round == 1 {
            old_point = Some((point_id, held.trees.clone()));
        }
        let mut prem_volumes = Vec::new();
        for (i, dev) in prem_devs.iter().enumerate() {
            if let Err(e) = e2fsck_clean(dev.path()) {
                panic!(
                    "the failover target of {} is not clean:\n{e}",
                    MACHINES[i].1
                );
            }
        }
        for (i, dev) in prem_devs.iter().enumerate() {
            let dir = root.join(format!("mnt/onprem{round}-{}", MACHINES[i].1));
            let vol = Volume::mount(dev.path(), &dir);
            assert_trees_equal(&held.trees[i], &hash_tree(vol.dir()));
            prem_volumes.push(vol);
        }

        // 3. Commit: the cloud agents forget the group and stop.
        on_site.op("commit", &[]);
        on_site.assert_state("failed-back", "after commit");
        for report in wait_agents_exit(&mut agents, "told to forget the group") {
            assert_eq!(report["stopped"], "forgotten", "{report}");
        }
        for vol in cloud_volumes.drain(..) {
            vol.unmount();
        }

        // 4. Reprotect back to the cloud, seeded by the old cloud disks.
        let cs = match &cloud_site {
            Some(cs) => {
                cs.op("protect", &[]);
                eprintln!(
                    "cloud after protect: {}, points still listed: {}",
                    cs.group_state(),
                    summary(&cs.points())
                );
                cs
            }
            None => cloud_site.insert(Site::start(
                "cloud",
                MACHINES
                    .iter()
                    .zip(&cloud)
                    .map(|((_, disk), dev)| (disk.to_string(), dev.path().to_path_buf()))
                    .collect(),
            )),
        };
        let leg = Instant::now();
        let leg_ms = now_ms();
        let wire_before = cs.wire();
        let ps = cs.link.addr().to_string();
        let result = on_site.op_json("reprotect", &["--process-server", &ps]);
        on_site.assert_state("reprotecting", "after reprotect");
        let configs = agent_configs(&result, prem_devs, &ps);
        let markers: Vec<PathBuf> = MACHINES
            .iter()
            .map(|(agent, _)| root.join(format!("r{round}-onprem-{agent}.shutdown")))
            .collect();
        let mut agents: Vec<AgentProcess> = MACHINES
            .iter()
            .enumerate()
            .map(|(i, (agent, _))| {
                let state = root.join(format!("state-r{round}-onprem-{agent}"));
                spawn_agent(
                    cs,
                    agent,
                    &Setup::Config(&configs[i]),
                    prem_volumes[i].dir(),
                    &state,
                    &markers[i],
                )
            })
            .collect();
        // The on-premises workload writes while the first sync runs.
        Phase::write(
            &format!("r{round}-onprem-1"),
            &prem_volumes,
            seed + 3,
            PHASE_BYTES,
            true,
        );
        cs.wait_point(
            &mut agents,
            FIRST_POINT_WAIT,
            "first point of the group",
            |p| p.id >= leg_ms,
        );
        check_seeded(
            &mut figures,
            &format!("round {round}: reprotect sync on-prem -> cloud"),
            &cs.wire().since(&wire_before),
            full_sync_wire.as_ref().expect("measured in round 1"),
            leg.elapsed(),
        );
        let more = Phase::write(
            &format!("r{round}-onprem-2"),
            &prem_volumes,
            seed + 4,
            PHASE_BYTES,
            true,
        );
        cs.wait_point(&mut agents, POINT_WAIT, "a point after more writes", |p| {
            p.id >= more.end_ms
        });

        // 5. Failover to latest at the cloud site: drain, shut down, roll in place.
        let t = Instant::now();
        let result = cs.op_json("failover", &["--point", "latest"]);
        figures.note(format!(
            "round {round}: failover to latest (drain, shutdown hooks, roll in place): {:.1?}",
            t.elapsed()
        ));
        cs.assert_state("failover-pending", "after the failover to latest");
        let reports = wait_agents_exit(&mut agents, "told to shut down");
        for (i, report) in reports.iter().enumerate() {
            let (agent, disk) = MACHINES[i];
            assert_eq!(report["stopped"], "shut-down", "{agent}: {report}");
            assert_eq!(report["shut_down_reported"], true, "{agent}: {report}");
            let final_point = report["final_point_id"]
                .as_u64()
                .unwrap_or_else(|| panic!("{agent} took no final point: {report}"));
            assert!(markers[i].exists(), "{agent}'s shutdown hook did not run");
            let line =
                status::status_line(&cs.cluster, disk).expect("the cloud site knows the disk");
            assert_eq!(
                line.point_id,
                Some(final_point),
                "{disk} was rolled to {agent}'s final point: {line:?} {result}"
            );
        }
        for (i, (prem, old_cloud)) in prem_devs.iter().zip(&cloud).enumerate() {
            let ignore = ext4_superblock_bookkeeping();
            if let Some(diff) = block_differences_ignoring(prem.path(), old_cloud.path(), &ignore) {
                panic!(
                    "after the failover to latest, the cloud replica of {} differs from the frozen on-premises disk: {diff}",
                    MACHINES[i].1
                );
            }
            if let Err(e) = e2fsck_clean(old_cloud.path()) {
                panic!("the cloud replica of {} is not clean:\n{e}", MACHINES[i].1);
            }
        }
        eprintln!(
            "round {round}: the cloud disks equal the on-premises disks byte for byte (but for the superblock's write time, write counter and checksum)"
        );
        let shut_down = Phase::observe(&format!("r{round}-onprem-shutdown"), &prem_volumes);
        for vol in prem_volumes {
            vol.unmount();
        }
        cs.op("commit", &[]);
        cs.assert_state("failed-back", "after commit");

        // The cloud VMs start from their disks: the files of the on-premises shutdown.
        cloud_volumes = mount_all(&cloud, root, "cloud");
        let boot = Phase::observe(&format!("r{round}-cloud-boot"), &cloud_volumes);
        for (i, tree) in shut_down.trees.iter().enumerate() {
            assert_trees_equal(tree, &boot.trees[i]);
        }
        first_phase = Some(boot);
        eprintln!("round {round} done after {:.1?}", started.elapsed());
    }
    drop(cloud_volumes);
    eprintln!("--- {test}: figures ---");
    for line in &figures.lines {
        eprintln!("{line}");
    }
    eprintln!("{test} took {:.1?}", started.elapsed());
}

/// The bytes of an ext4 device that change after the final point although nothing
/// writes files: every commit of the primary superblock (at 1024) stores the time of
/// the last write (`s_wtime`, offset 0x30, 4 bytes, and `s_wtime_hi`, 0x274, 1 byte),
/// the lifetime kilobytes written (`s_kbytes_written`, 0x178, 8 bytes) and the
/// superblock's checksum (`s_checksum`, 0x3fc, 4 bytes). The thaw that ends the final
/// point's pause commits it (setting the journal's needs-recovery flag) and the
/// shutdown hook's freeze commits it again (clearing the flag as the point's freeze
/// did), so these fields are all that may differ from the point; `e2fsck -fn` of the
/// replica checks its checksum.
fn ext4_superblock_bookkeeping() -> [std::ops::Range<u64>; 4] {
    const SUPERBLOCK: u64 = 1024;
    [
        SUPERBLOCK + 0x30..SUPERBLOCK + 0x34,
        SUPERBLOCK + 0x178..SUPERBLOCK + 0x180,
        SUPERBLOCK + 0x274..SUPERBLOCK + 0x275,
        SUPERBLOCK + 0x3fc..SUPERBLOCK + 0x400,
    ]
}

/// Mounts each device at `<root>/mnt/<label>-<disk>`.
fn mount_all(devices: &[LoopDevice], root: &Path, label: &str) -> Vec<Volume> {
    devices
        .iter()
        .zip(MACHINES)
        .map(|(dev, (_, disk))| {
            Volume::mount(dev.path(), &root.join(format!("mnt/{label}-{disk}")))
        })
        .collect()
}

/// The point `id` of the history before the failback, still listed at `site` after
/// `protect`: a test failover to it must be refused, or give file systems that are
/// clean and hold exactly `trees` (what the test recorded for it).
fn check_old_point(site: &Site, root: &Path, id: u64, trees: &[TreeHashes]) {
    let listed = site.points();
    eprintln!(
        "{}: after protect and a first point: {}; probing point {id} of round 1",
        site.label,
        summary(&listed)
    );
    let targets: Vec<(String, PathBuf)> = MACHINES
        .iter()
        .map(|(_, disk)| (disk.to_string(), root.join(format!("old-point-{disk}.img"))))
        .collect();
    let out = site.cluster.mt_op_output(
        "test-failover",
        GROUP,
        &cli::point_to_args(&id.to_string(), &targets),
    );
    if !out.status.success() {
        eprintln!(
            "the old point is refused: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return;
    }
    for (i, (disk, image)) in targets.iter().enumerate() {
        let dev = LoopDevice::attach_read_only(image);
        if let Err(e) = e2fsck_clean(dev.path()) {
            panic!("point {id} of {disk} (test failover after the failback) is not clean:\n{e}");
        }
        let mount = Mount::with_options(
            dev.path(),
            &root.join(format!("mnt/old-point-{disk}")),
            "ro,noload",
        );
        assert_trees_equal(&trees[i], &hash_tree(mount.dir()));
        mount.unmount();
        dev.detach();
    }
}

/// Records and checks what a reprotect's first sync put on the link.
fn check_seeded(
    figures: &mut Figures,
    what: &str,
    wire: &LinkBytes,
    full: &LinkBytes,
    took: Duration,
) {
    let disks = 2 * DISK_SIZE;
    figures.note(format!(
        "{what}: {:.1} MiB up, {:.1} MiB down on the link = {:.1} % of the two disks, {:.1} % of the unseeded initial sync; first point after {took:.1?}",
        mib(wire.up),
        mib(wire.down),
        100.0 * wire.total() as f64 / disks as f64,
        100.0 * wire.total() as f64 / full.total() as f64
    ));
    assert!(
        (wire.with_headers() as f64) < SEEDED_MAX_SHARE_OF_DISKS * disks as f64,
        "{what}: {} bytes crossed the link, not far below the {disks} bytes of the disks",
        wire.with_headers()
    );
    assert!(
        (wire.total() as f64) < SEEDED_MAX_SHARE_OF_FULL_SYNC * full.total() as f64,
        "{what}: {} bytes crossed the link, not far below the {} bytes of the unseeded initial sync",
        wire.total(),
        full.total()
    );
}
