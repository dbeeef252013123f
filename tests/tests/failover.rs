//! Recovery points and the failover commands against image-file disks (no root
//! needed): points taken by `agent sync` with no-op freeze/thaw hooks are
//! app-consistent (nobody writes the images between the test's changes), and the test
//! records the sources' sha256 at each of them. Every way of giving a point back
//! (test failover, failover to targets, rolled in place) must return exactly those
//! bytes, also after the master target was SIGKILLed while applying or while
//! materializing, and also while replication goes on.

#[allow(dead_code)] // the signal and status helpers are not used here
mod support;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use boomerang_tests::cli::{point_to_args, AgentSyncArgs, PointInfo};
use boomerang_tests::{change_chunks, make_mixed_image, sha256_file, Cluster, ClusterConfig};

use support::{replica_path, AgentProcess, MIB};

const GROUP: &str = "g1";
const DISKS: [(&str, u64); 2] = [("d0", 48 * MIB), ("d1", 32 * MIB)];
const KIND_APP: &str = "app-consistent";

/// The sources' hashes at one point.
type Hashes = BTreeMap<String, String>;

struct Setup {
    cluster: Cluster,
    images: Vec<(String, PathBuf)>,
}

impl Setup {
    fn start(mt_extra: &[&str]) -> Setup {
        let cluster = Cluster::start(ClusterConfig {
            mt_extra: mt_extra.iter().map(OsString::from).collect(),
            ..ClusterConfig::default()
        });
        let images = DISKS
            .iter()
            .enumerate()
            .map(|(i, (id, size))| {
                let path = cluster.root().join(format!("{id}.img"));
                make_mixed_image(&path, *size, 40 + i as u64);
                (id.to_string(), path)
            })
            .collect();
        Setup { cluster, images }
    }

    fn args(&self, app: bool) -> AgentSyncArgs {
        let mut a = self.cluster.agent1().group(GROUP);
        for (id, path) in &self.images {
            a = a.disk(id, path);
        }
        if app {
            a.extra
                .extend(["--freeze-hook", "true", "--thaw-hook", "true"].map(OsString::from));
        }
        a
    }

    /// One sync; with `app` it ends in an app-consistent point. Returns the sources'
    /// hashes (nobody writes them meanwhile) and the point, when one was made.
    fn sync(&self, app: bool) -> (Hashes, Option<PointInfo>) {
        let known = self
            .cluster
            .mt_status()
            .disks
            .iter()
            .any(|d| d.disk == DISKS[0].0);
        let before = if known {
            self.cluster.mt_points(GROUP).len()
        } else {
            0
        };
        self.cluster.agent_sync(&self.args(app));
        let points = self.cluster.mt_points(GROUP);
        let made = if points.len() > before {
            points.last().cloned()
        } else {
            None
        };
        (self.hashes(), made)
    }

    fn hashes(&self) -> Hashes {
        self.images
            .iter()
            .map(|(id, p)| (id.clone(), sha256_file(p)))
            .collect()
    }

    fn change(&self, fraction: f64, seed: u64) {
        for (i, (_, p)) in self.images.iter().enumerate() {
            change_chunks(p, 64 * 1024, fraction, seed + i as u64);
        }
    }

    fn targets(&self, label: &str) -> Vec<(String, PathBuf)> {
        self.images
            .iter()
            .map(|(id, _)| {
                (
                    id.clone(),
                    self.cluster.root().join(format!("{label}-{id}.img")),
                )
            })
            .collect()
    }

    fn replicas(&self) -> Vec<(String, PathBuf)> {
        self.images
            .iter()
            .map(|(id, _)| (id.clone(), replica_path(&self.cluster, id)))
            .collect()
    }

    fn group_field(&self, field: &str) -> String {
        let status = self.cluster.mt_status();
        status.raw["groups"]
            .as_array()
            .and_then(|g| g.iter().find(|g| g["group"] == GROUP))
            .and_then(|g| g[field].as_str())
            .unwrap_or("unknown")
            .to_string()
    }

    fn group_state(&self) -> String {
        self.group_field("state")
    }
}

fn assert_holds(files: &[(String, PathBuf)], want: &Hashes, what: &str) {
    for (id, path) in files {
        assert_eq!(
            &sha256_file(path),
            &want[id],
            "{what}: disk {id} ({}) is not the source at the point",
            path.display()
        );
    }
}

fn ids(points: &[PointInfo]) -> Vec<u64> {
    points.iter().map(|p| p.id).collect()
}

#[test]
fn every_way_of_giving_a_point_back_returns_the_sources_bytes_at_its_tag() {
    let s = Setup::start(&["--drain-timeout-secs", "3"]);
    let (h1, p1) = s.sync(true);
    let p1 = p1.expect("the first app-consistent sync makes a point");
    assert_eq!(p1.kind, KIND_APP);
    s.change(0.05, 1);
    let (h2, p2) = s.sync(true);
    let p2 = p2.expect("second point");
    s.change(0.05, 2);
    let (h3, p3) = s.sync(false);
    assert!(
        p3.is_none(),
        "a sync without a pause is a complete copy, no point: {p3:?}"
    );
    let points = s.cluster.mt_points(GROUP);
    assert_eq!(ids(&points), vec![p1.id, p2.id]);
    assert!(points[1].latest_processed && points[1].latest_app && !points[0].latest_app);

    // An older point by id, latest-app and latest-processed, into scratch targets.
    for (point, want) in [
        (p1.id.to_string(), &h1),
        ("latest-app".into(), &h2),
        ("latest-processed".into(), &h2),
    ] {
        let t = s.targets("test");
        s.cluster
            .mt_op("test-failover", GROUP, &point_to_args(&point, &t));
        assert_holds(&t, want, &format!("test failover to {point}"));
        s.cluster
            .mt_op("test-failover", GROUP, &["--cleanup".into()]);
        assert!(
            t.iter().all(|(_, p)| !p.exists()),
            "cleanup removed the scratch images"
        );
    }
    assert_holds(&s.replicas(), &h3, "the replicas after test failovers");

    // latest needs the sources to drain; no tracking agent checks in here.
    let out = s
        .cluster
        .mt_op_output("failover", GROUP, &["--point".into(), "latest".into()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("latest-processed"),
        "latest without a reachable source: {err}"
    );
    assert_eq!(
        s.group_state(),
        "protected",
        "a failed drain changes nothing"
    );
    assert!(
        s.group_field("last_error").contains("latest-processed"),
        "status shows why the last action failed"
    );

    // Roll the replicas back in place to the older point, cancel, resync.
    s.cluster
        .mt_op("failover", GROUP, &point_to_args(&p1.id.to_string(), &[]));
    assert_holds(&s.replicas(), &h1, "replicas rolled back in place");
    assert_eq!(s.group_state(), "failover-pending");
    let refused = s.cluster.agent_sync_output(&s.args(false));
    assert!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains("failed over"),
        "replication waits while the failover is pending"
    );
    s.cluster.mt_op("failover", GROUP, &["--cancel".into()]);
    let report = s.cluster.agent_sync(&s.args(false));
    assert_holds(&s.replicas(), &h3, "resynced after the cancel");
    let disk_bytes: u64 = DISKS.iter().map(|(_, n)| n).sum();
    assert!(
        report.wire_tx_bytes < disk_bytes / 4,
        "the resync after a roll back moves only differing chunks: {} bytes sent for {disk_bytes}",
        report.wire_tx_bytes
    );
    let after = s.cluster.mt_points(GROUP);
    assert_eq!(
        ids(&after),
        vec![p1.id],
        "points after the roll-back target are gone; older ones stay"
    );
    let t = s.targets("again");
    s.cluster.mt_op(
        "test-failover",
        GROUP,
        &point_to_args(&p1.id.to_string(), &t),
    );
    assert_holds(
        &t,
        &h1,
        "the older point after roll back, cancel and resync",
    );

    // Fail over for good to targets, commit: the old source is turned away.
    let (h4, _) = s.sync(true);
    let t = s.targets("final");
    s.cluster
        .mt_op("failover", GROUP, &point_to_args("latest-app", &t));
    assert_holds(&t, &h4, "failover to latest-app, materialized");
    s.cluster.mt_op("commit", GROUP, &[]);
    assert_eq!(s.group_state(), "failed-back");
    assert!(
        s.cluster.mt_points(GROUP).is_empty(),
        "the disks are live now: no history leads back to any earlier point"
    );
    let refused = s.cluster.agent_sync_output(&s.args(false));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("failed back"),
        "the old source is refused: {err}"
    );
    assert_holds(&t, &h4, "the failed-back disks are left alone");
}

#[test]
fn a_master_target_killed_while_applying_or_materializing_keeps_every_point() {
    let mut s = Setup::start(&[]);
    let mut known = Vec::new();
    for round in 0..3 {
        s.change(0.10, 10 + round);
        let (h, p) = s.sync(true);
        known.push((p.expect("point").id, h));
    }
    // Kill while a large change is being applied.
    s.change(0.6, 20);
    let mut agent = AgentProcess::spawn(&s.cluster, &s.args(true));
    thread::sleep(Duration::from_millis(300));
    agent.assert_running("when the master target was killed during apply");
    s.cluster.restart_mt();
    let report = agent.wait_success(Duration::from_secs(180));
    assert!(!report.disks.is_empty());
    let hashes = s.hashes();
    let points = s.cluster.mt_points(GROUP);
    assert_eq!(
        &ids(&points)[..3],
        &known.iter().map(|(id, _)| *id).collect::<Vec<_>>()[..]
    );
    known.push((points.last().expect("new point").id, hashes));

    // Kill while the oldest point is being materialized (history of four rounds).
    let t = s.targets("cut");
    let mut mat = s.cluster.mt_op_child(
        "test-failover",
        GROUP,
        &point_to_args(&known[0].0.to_string(), &t),
    );
    let t0 = Instant::now();
    while !t[0].1.exists() && t0.elapsed() < Duration::from_secs(10) {
        thread::sleep(Duration::from_millis(2));
    }
    thread::sleep(Duration::from_millis(20));
    s.cluster.restart_mt();
    let _ = mat.wait();
    let after = s.cluster.mt_points(GROUP);
    assert_eq!(
        ids(&after),
        known.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        "the points list survives"
    );
    for (id, want) in &known {
        let t = s.targets(&format!("p{id}"));
        s.cluster
            .mt_op("test-failover", GROUP, &point_to_args(&id.to_string(), &t));
        assert_holds(&t, want, &format!("point {id} after the kills"));
        s.cluster
            .mt_op("test-failover", GROUP, &["--cleanup".into()]);
    }

    // Kill during an in-place roll back: the restart finishes it.
    let (id, want) = known[1].clone();
    let mut roll = s
        .cluster
        .mt_op_child("failover", GROUP, &point_to_args(&id.to_string(), &[]));
    let t0 = Instant::now();
    while s.group_state() == "protected" && t0.elapsed() < Duration::from_secs(10) {
        thread::sleep(Duration::from_millis(1));
    }
    let caught = s.group_state();
    s.cluster.restart_mt();
    let _ = roll.wait();
    eprintln!("the master target was killed with the group {caught}");
    let t0 = Instant::now();
    while s.group_state() != "failover-pending" {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the restarted master target finishes the roll back"
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert_holds(&s.replicas(), &want, "replicas rolled back across a kill");
}

#[test]
fn a_test_failover_runs_while_replication_goes_on() {
    let s = Arc::new(Setup::start(&[]));
    let (h1, p1) = s.sync(true);
    let p1 = p1.expect("point");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let s = s.clone();
        let stop = stop.clone();
        thread::spawn(move || {
            let mut syncs = 0u64;
            while !stop.load(Ordering::SeqCst) {
                s.change(0.05, 100 + syncs);
                s.cluster.agent_sync(&s.args(false));
                syncs += 1;
            }
            syncs
        })
    };
    thread::sleep(Duration::from_millis(500));
    let t = s.targets("scratch");
    let rounds = 3;
    for _ in 0..rounds {
        s.cluster.mt_op(
            "test-failover",
            GROUP,
            &point_to_args(&p1.id.to_string(), &t),
        );
        assert_holds(&t, &h1, "test failover under replication");
    }
    stop.store(true, Ordering::SeqCst);
    let syncs = writer.join().expect("the writer's syncs all succeeded");
    assert!(syncs >= 1, "replication ran during the test failovers");
    s.cluster.agent_sync(&s.args(false));
    let now = s.hashes();
    assert_holds(&s.replicas(), &now, "replication was not disturbed");
    assert_eq!(s.group_state(), "protected");
}
