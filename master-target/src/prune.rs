//! The retention executor: applies the planner's decision ([`crate::retention_plan`])
//! to each protected group, on an interval.
//!
//! Order (rule 4): first every disk record drops the pruned points and is stored, then
//! the journal segments older than the oldest point still listed are deleted. A crash
//! in between leaves segments nobody needs, deleted on the next round; never a listed
//! point without its history. A cut a disk holds that never became a group point (the
//! other disks did not tag it) is dropped once a newer group point exists.

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
    let groups: BTreeSet<String> = site
        .disks
        .all()
        .iter()
        .map(|d| d.durable_record().group)
        .collect();
    for group in groups {
        if site.groups.record(&group).state != GroupState::Protected {
            continue;
        }
        let points = site.points(&group);
        let disks: Vec<_> = site
            .disks
            .all()
            .into_iter()
            .filter(|d| d.durable_record().group == group)
            .collect();
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
                            .map_or(0, |d| d.journal_end().saturating_sub(c.lsn))
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
            let oldest = d
                .durable_record()
                .points
                .first()
                .map_or_else(|| d.journal_end(), |c| c.lsn);
            total.bytes += d.prune_journal_below(oldest)?;
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
