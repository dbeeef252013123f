//! The master target's status line of one disk as the continuous-tracking tests read
//! it, polling it while an agent runs, and stopping a tracking agent cleanly. Included by the tests that need it with
//! `#[path = "support/status.rs"] mod status;` (so the other test binaries do not carry
//! unused code).

use std::thread;
use std::time::{Duration, Instant};

use boomerang_tests::Cluster;

use crate::support::AgentProcess;

/// One disk's line of `boomerang-mt status --json`, with the fields the tracking tests
/// read (the library's `MtDiskStatus` predates cuts and points).
#[derive(Debug, Clone)]
pub(crate) struct StatusLine {
    pub(crate) generation: u64,
    pub(crate) next_seq: u64,
    pub(crate) consistent: bool,
    pub(crate) cut: Option<String>,
    pub(crate) point_id: Option<u64>,
    // Read by the intercept tests only; the trace tests include this file too.
    #[allow(dead_code)]
    pub(crate) cut_time_ms: Option<u64>,
    /// Recent cuts of the current generation: (kind, point id, time ms), oldest first.
    pub(crate) points: Vec<(String, u64, u64)>,
    pub(crate) bytes_applied: u64,
    pub(crate) integrity_failures: u64,
}

impl StatusLine {
    /// Parses one element of the status' `disks` array; panics naming a bad field.
    pub(crate) fn parse(v: &serde_json::Value) -> StatusLine {
        let uint = |k: &str| {
            v[k].as_u64()
                .unwrap_or_else(|| panic!("mt status: `{k}` is not an unsigned integer in {v}"))
        };
        let points = v["points"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| {
                        let kind = p[0].as_str().unwrap_or_default().to_string();
                        match (p[1].as_u64(), p[2].as_u64()) {
                            (Some(id), Some(t)) => (kind, id, t),
                            _ => panic!("mt status: a point is not [kind, point_id, time_ms]: {p}"),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        StatusLine {
            generation: uint("generation"),
            next_seq: uint("next_seq"),
            consistent: v["consistent"]
                .as_bool()
                .unwrap_or_else(|| panic!("mt status: `consistent` is not a bool in {v}")),
            cut: v["cut"].as_str().map(str::to_string),
            point_id: v["point_id"].as_u64(),
            cut_time_ms: v["cut_time_ms"].as_u64(),
            points,
            bytes_applied: uint("bytes_applied"),
            integrity_failures: uint("integrity_failures"),
        }
    }
}

/// Disk `disk`'s status line, if the master target knows the disk.
pub(crate) fn status_line(cluster: &Cluster, disk: &str) -> Option<StatusLine> {
    let status = cluster.mt_status();
    status.raw["disks"]
        .as_array()
        .and_then(|disks| disks.iter().find(|d| d["disk"] == disk))
        .map(StatusLine::parse)
}

/// Polls disk `disk`'s status every 50 ms until `done` holds; panics (with the
/// agent's log) when the agent exits or `timeout` passes.
pub(crate) fn wait_status(
    cluster: &Cluster,
    disk: &str,
    agent: &mut AgentProcess,
    timeout: Duration,
    what: &str,
    mut done: impl FnMut(&StatusLine) -> bool,
) -> StatusLine {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Some(status) = agent.try_exit() {
            panic!(
                "the agent exited ({status}) while waiting for {what}; last status {last:?}\n{}",
                agent.log_tail(60)
            );
        }
        if let Some(line) = status_line(cluster, disk) {
            if done(&line) {
                return line;
            }
            last = Some(line);
        }
        assert!(
            Instant::now() < deadline,
            "no {what} within {timeout:?}; last status {last:?}\n{}",
            agent.log_tail(60)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERMs a `track --json` agent: it must exit 0 within `timeout` and print its
/// report, with every counter, as its last line. Returns the report and how long the
/// exit took.
pub(crate) fn sigterm_track(
    agent: &mut AgentProcess,
    timeout: Duration,
) -> (serde_json::Value, Duration) {
    agent.signal(libc::SIGTERM);
    let signalled = Instant::now();
    let (status, stdout) = agent.wait(timeout);
    let took = signalled.elapsed();
    assert!(
        status.success(),
        "track must exit 0 on SIGTERM: {status}\n--- stdout ---\n{stdout}\n{}",
        agent.log_tail(60)
    );
    let report: serde_json::Value = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("track --json printed no JSON report:\n{stdout}"));
    for key in [
        "batches",
        "bytes_shipped",
        "points",
        "points_abandoned",
        "resyncs",
    ] {
        assert!(report[key].is_u64(), "report field {key}: {report}");
    }
    assert!(report["pauses_ms"].is_array(), "{report}");
    (report, took)
}

/// Waits until the master target applied disk `disk` up to `(generation, next_seq)`
/// (what the agent's state says it shipped) and returns that status line.
pub(crate) fn wait_applied(
    cluster: &Cluster,
    disk: &str,
    generation: u64,
    next_seq: u64,
    timeout: Duration,
) -> StatusLine {
    let deadline = Instant::now() + timeout;
    loop {
        let line = status_line(cluster, disk).expect("the master target knows the disk");
        if line.generation == generation && line.next_seq == next_seq {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "the master target did not apply all the agent shipped (generation {generation}, next seq {next_seq}): {line:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}
