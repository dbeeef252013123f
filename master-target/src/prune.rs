//! The retention executor: applies the planner's decision ([`crate::retention_plan`])
//! to each protected group, on an interval.
//!
//! Order (rule 4): first every disk record drops the pruned points and is stored, then
//! the journal segments older than the oldest point still held are deleted, the oldest
//! over the record in memory and the durable one ([`crate::disk::Disk::history_floor`]:
//! a point applied but not flushed yet is held too). A crash in between leaves segments
//! nobody needs, deleted on the next round; never a listed point without its history.
//! A cut a disk holds that never became a group point (the other disks did not tag it)
//! is dropped once a newer group point exists.

use std::collections::BTreeSet;
use std::sync::Arc;

use boomerang_common::config::now_ms;
use tracing::{info, warn};

use crate::failover::Site;
use crate::groups::GroupState;
use crate::retention_plan::{plan, PlanPoint, RetentionPolicy};

/// What one round did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pruned {
    /// Points dropped.
    pub points: usize,
    /// Journal bytes freed.
    pub bytes: u64,
}

/// Applies `policy` to every protected group once.
pub async fn prune_once(site: &Site, policy: &RetentionPolicy) -> anyhow::Result<Pruned> {
    let _one = site.groups.action_lock.lock().await;
    let mut total = Pruned::default();
    for group in site.groups() {
        match site.groups.record(&group) {
            Ok(rec) if rec.state == GroupState::Protected => {}
            Ok(_) => continue,
            Err(e) => {
                // Refused: nothing is pruned until its record is readable again.
                warn!(group = %group, error = %e, "retention skips the group");
                continue;
            }
        }
        let points = site.points(&group);
        let disks = site.group_disks(&group)?;
        let plan_points: Vec<PlanPoint> = points
            .iter()
            .map(|p| PlanPoint {
                id: p.id,
                kind: p.kind,
                time_ms: p.time_ms,
                journal_bytes: p
                    .cuts
                    .iter()
                    .map(|(disk, c)| {
                        disks
                            .iter()
                            .find(|d| d.id() == disk)
                            .map_or(0, |d| d.journal_bytes_from(c.lsn))
                    })
                    .sum(),
            })
            .collect();
        let decision = plan(&plan_points, policy, now_ms());
        let pruned: BTreeSet<u64> = decision.prune.iter().map(|(id, _)| *id).collect();
        let listed: BTreeSet<u64> = points.iter().map(|p| p.id).collect();
        let newest_listed = points.last().map_or(0, |p| p.time_ms);
        for d in &disks {
            let rec = d.durable_record();
            let drop_cut = |c: &crate::disk::Cut| {
                pruned.contains(&c.point_id)
                    || (!listed.contains(&c.point_id) && c.time_ms < newest_listed)
            };
            let dropped = rec.points.iter().filter(|c| drop_cut(c)).count();
            if dropped > 0 {
                d.update_record(|r| r.points.retain(|c| !drop_cut(c)))
                    .await?;
                total.points += dropped;
            }
            // Over the record in memory and the durable one: a point applied but not
            // flushed yet keeps its history too.
            total.bytes += d.prune_journal_below(d.history_floor())?;
        }
        if !pruned.is_empty() {
            info!(group = %group, pruned = pruned.len(), kept = decision.keep.len(), "retention: points pruned");
        }
    }
    Ok(total)
}

/// Runs [`prune_once`] every `interval` until the task is dropped.
pub fn spawn(
    site: Arc<Site>,
    policy: RetentionPolicy,
    interval: std::time::Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            match prune_once(&site, &policy).await {
                Ok(p) if p.bytes > 0 || p.points > 0 => {
                    info!(points = p.points, freed = p.bytes, "retention applied");
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "applying retention failed; retrying next round")
                }
            }
        }
    })
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::disk::verify_batch;
    use crate::disks::Disks;
    use crate::groups::Groups;
    use boomerang_common::delta::ExtentEncoder;
    use boomerang_common::message::{Tag, TagKind};
    use boomerang_common::{Batch, ChunkHash};
    use std::time::Duration;

    const SIZE: u64 = 8 << 20;
    const HOUR_MS: u64 = 3_600_000;

    /// A disk model and the master target's disk, written the same way.
    struct Rig {
        site: Site,
        model: Vec<u8>,
        seq: u64,
    }

    impl Rig {
        async fn write(&mut self, offset: u64, fill: u8) {
            // Incompressible, so that the journal spans several segments.
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(fill);
            let data: Vec<u8> = (0..1 << 20)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()[3]
                })
                .collect();
            let mut enc = ExtentEncoder::new(1).expect("zstd");
            let batch = Batch {
                disk: "d0".into(),
                generation: 1,
                seq: self.seq,
                extents: vec![enc.encode(offset, &data, ChunkHash::of(&data))],
            };
            let v = verify_batch(&batch, SIZE).expect("verifies");
            let d = self.site.disks.get("d0").expect("disk");
            d.apply_batch(1, self.seq, v).await.expect("apply");
            self.seq += 1;
            let o = usize::try_from(offset).expect("small");
            self.model[o..o + data.len()].copy_from_slice(&data);
        }

        async fn tag(&mut self, id: u64, kind: TagKind, time_ms: u64) -> Vec<u8> {
            let d = self.site.disks.get("d0").expect("disk");
            let tag = Tag {
                disk: "d0".into(),
                generation: 1,
                seq: self.seq,
                kind,
                point_id: id,
                time_ms,
                group: "g".into(),
            };
            d.apply_tag(&tag).await.expect("tag");
            self.seq += 1;
            self.model.clone()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_executor_frees_journal_space_and_never_drops_the_newest_points() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disks = Disks::open(
            &dir.path().join("state"),
            &dir.path().join("retention"),
            1 << 20,
            Default::default(),
        )
        .expect("disks");
        disks.open_disk("d0", SIZE, "g").expect("open disk");
        let site = Site {
            disks: Arc::new(disks),
            groups: Arc::new(Groups::open(&dir.path().join("state")).expect("groups")),
            drain_timeout: Duration::from_secs(1),
        };
        let mut rig = Rig {
            site,
            model: vec![0; SIZE as usize],
            seq: 0,
        };
        // The initial sync: before the first point, so not journaled.
        for k in 0..8u64 {
            rig.write(k << 20, 100 + k as u8).await;
        }
        assert_eq!(
            rig.site.disks.get("d0").expect("disk").journal_bytes(),
            boomerang_common::seglog::SEGMENT_HEADER,
            "only the empty active segment"
        );
        let now = now_ms();
        let mut expected = Vec::new();
        // Old points (outside a 1 h window), then recent ones; each followed by writes.
        for (i, (kind, age)) in [
            (TagKind::CrashConsistent, 5 * HOUR_MS),
            (TagKind::AppConsistent, 4 * HOUR_MS),
            (TagKind::CrashConsistent, 3 * HOUR_MS),
            (TagKind::CrashConsistent, 10 * 60_000),
            (TagKind::CrashConsistent, 60_000),
        ]
        .into_iter()
        .enumerate()
        {
            let i = i as u64;
            let content = rig.tag(i + 1, kind, now - age).await;
            expected.push((i + 1, content));
            for k in 0..3u64 {
                rig.write(((i * 3 + k) % 8) << 20, (i * 3 + k + 1) as u8)
                    .await;
            }
        }
        let d = rig.site.disks.get("d0").expect("disk");
        let before = d.journal_bytes();
        let policy = RetentionPolicy {
            window_secs: 3600,
            keep_all_secs: 1800,
            ..RetentionPolicy::default()
        };
        let pruned = prune_once(&rig.site, &policy).await.expect("prune");
        let kept: Vec<u64> = rig.site.points("g").iter().map(|p| p.id).collect();
        // 1 and 3 are outside the window; 2 is the newest app-consistent point.
        assert_eq!(kept, vec![2, 4, 5]);
        assert_eq!(pruned.points, 2);
        assert!(pruned.bytes > 0, "segments older than point 2 were deleted");
        assert_eq!(d.journal_bytes(), before - pruned.bytes);
        // Every point kept still gives back its exact bytes.
        for (id, want) in expected.iter().filter(|(id, _)| kept.contains(id)) {
            let cut = rig
                .site
                .points("g")
                .into_iter()
                .find(|p| p.id == *id)
                .map(|p| p.cuts[0].1.clone())
                .expect("cut");
            let target = dir.path().join(format!("p{id}.img"));
            crate::materialize::to_target(&d, &cut, &target, &mut |_, _, _| {})
                .expect("materialize");
            assert!(
                std::fs::read(&target).expect("read") == *want,
                "point {id} exact after pruning"
            );
        }
        // A second round changes nothing.
        assert_eq!(
            prune_once(&rig.site, &policy).await.expect("prune"),
            Pruned::default()
        );
    }

    /// A replica whose fdatasync waits while `hold` is set: the disk's record in
    /// memory runs ahead of the durable one for as long as the test wants.
    #[derive(Debug)]
    struct HeldFlush {
        inner: crate::replica::FileReplica,
        hold: Arc<std::sync::atomic::AtomicBool>,
    }

    impl crate::replica::Replica for HeldFlush {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.inner.write_at(offset, data)
        }
        fn write_zeros(&self, offset: u64, len: u64) -> std::io::Result<()> {
            self.inner.write_zeros(offset, len)
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            self.inner.read_at(offset, buf)
        }
        fn flush(&self) -> std::io::Result<()> {
            while self.hold.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            self.inner.flush()
        }
        fn resize(&self, size: u64) -> std::io::Result<()> {
            self.inner.resize(size)
        }
    }

    struct Release(Arc<std::sync::atomic::AtomicBool>);

    impl Drop for Release {
        fn drop(&mut self) {
            self.0.store(false, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_point_applied_but_not_yet_durable_keeps_its_history() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().expect("tempdir");
        let disks = Disks::open(
            &dir.path().join("state"),
            &dir.path().join("retention"),
            1 << 20,
            Default::default(),
        )
        .expect("disks");
        disks.open_disk("d0", SIZE, "g").expect("open disk");
        let site = Site {
            disks: Arc::new(disks),
            groups: Arc::new(Groups::open(&dir.path().join("state")).expect("groups")),
            drain_timeout: Duration::from_secs(1),
        };
        let mut rig = Rig {
            site,
            model: vec![0; SIZE as usize],
            seq: 0,
        };
        for k in 0..4u64 {
            rig.write(k << 20, 1 + k as u8).await;
        }
        let d = rig.site.disks.get("d0").expect("disk");
        let hold = Arc::new(std::sync::atomic::AtomicBool::new(true));
        // Let the flusher go also when an assertion fails: the runtime waits for it.
        let _release = Release(hold.clone());
        d.swap_replica(Arc::new(HeldFlush {
            inner: crate::replica::FileReplica::open_or_create(&d.record().replica, SIZE)
                .expect("replica"),
            hold: hold.clone(),
        }));
        // Point 1 is applied (in memory) but its flush waits, and so do the writes
        // after it, whose before-images fill several journal segments.
        let want = rig.model.clone();
        let tag = Tag {
            disk: "d0".into(),
            generation: 1,
            seq: rig.seq,
            kind: TagKind::CrashConsistent,
            point_id: 1,
            time_ms: now_ms(),
            group: "g".into(),
        };
        let mut waiting = Vec::new();
        {
            let d = d.clone();
            waiting.push(tokio::spawn(
                async move { d.apply_tag(&tag).await.map(|_| ()) },
            ));
        }
        for k in 0..3u64 {
            let seq = rig.seq + 1 + k;
            let mut x = 0x2545_f491_4f6c_dd1du64 ^ k;
            let data: Vec<u8> = (0..1 << 20)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()[5]
                })
                .collect();
            let mut enc = ExtentEncoder::new(1).expect("zstd");
            let batch = Batch {
                disk: "d0".into(),
                generation: 1,
                seq,
                extents: vec![enc.encode(k << 20, &data, ChunkHash::of(&data))],
            };
            let v = verify_batch(&batch, SIZE).expect("verifies");
            let d = d.clone();
            waiting.push(tokio::spawn(async move {
                d.apply_batch(1, seq, v).await.map(|_| ())
            }));
        }
        let applied = rig.seq + 4;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while d.record().position.next_seq < applied {
            assert!(
                std::time::Instant::now() < deadline,
                "the writes were not applied"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            d.durable_record().points.is_empty(),
            "point 1 is not durable yet"
        );
        assert!(
            d.journal_bytes() > 2 << 20,
            "the writes after point 1 were journaled"
        );

        let pruned = prune_once(&rig.site, &RetentionPolicy::default())
            .await
            .expect("prune");
        assert_eq!(pruned.bytes, 0, "the history of point 1 must stay");

        hold.store(false, Ordering::SeqCst);
        for w in waiting {
            w.await.expect("join").expect("applied and durable");
        }
        let cut = d.durable_record().points[0].clone();
        let target = dir.path().join("p1.img");
        crate::materialize::to_target(&d, &cut, &target, &mut |_, _, _| {})
            .expect("point 1 materializes");
        assert!(
            std::fs::read(&target).expect("read") == want,
            "point 1 gives back its exact bytes"
        );
    }
}
