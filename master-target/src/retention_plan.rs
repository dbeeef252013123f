//! Retention planning for one group's recovery points: given the points, a
//! [`RetentionPolicy`] and the current time, [`plan`] decides which points to keep
//! and why each other one is pruned. Pure: no IO, no clock reads; an executor applies
//! the [`Plan`] elsewhere.
//!
//! Ages are `now_ms - time_ms`; a point stamped in the future has age 0. "Newest"
//! orders by time, then id. `SyncComplete` is never a recovery point, but if one is
//! passed it counts as crash-consistent. The rules, applied in this order:
//!
//! 1. **Protected**: the newest crash-consistent and the newest app-consistent point
//!    are never pruned, whatever rules 2-5 say (so the newest point overall is kept).
//! 2. **Window**: a point with age > `window_secs` is pruned ([`PruneReason::OutsideWindow`]).
//! 3. **Thinning**: every point with age <= `keep_all_secs` is kept. Older points are
//!    grouped into buckets of `thin_every_secs` aligned on the Unix epoch
//!    (`time_ms / (thin_every_secs * 1000)`); per bucket, the newest crash-consistent
//!    and the newest app-consistent point are kept (the two kinds are thinned apart,
//!    so an hourly app point does not lose to a crash point of the same hour). The
//!    others are pruned ([`PruneReason::Thinned`]).
//! 4. **Size cap**: while the oldest kept point needs more than `max_journal_bytes`,
//!    it is pruned ([`PruneReason::SizeCap`]). This stops at the first protected
//!    point: the journal must reach back to it anyway, so pruning newer points would
//!    free nothing.
//! 5. **Count**: beyond `max_points` kept points, the oldest unprotected ones are
//!    pruned ([`PruneReason::TooMany`]).
//!
//! Every input point ends up exactly once in [`Plan::keep`] or [`Plan::prune`]. Point
//! ids are expected to be unique; the planner does not check. [`plan`] never panics,
//! even for a policy that [`RetentionPolicy::validate`] rejects.

use boomerang_common::message::TagKind;
use serde::{Deserialize, Serialize};

const MS_PER_SEC: u64 = 1000;

/// How long, and how densely, a group's recovery points are kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionPolicy {
    /// Points older than this many seconds are pruned.
    /// Default: 86400 (24 h).
    pub window_secs: u64,
    /// Every point younger than this many seconds (or exactly this old) is kept.
    /// Default: 7200 (2 h).
    pub keep_all_secs: u64,
    /// Beyond `keep_all_secs`, keep one point of each kind per this many seconds.
    /// Default: 3600.
    pub thin_every_secs: u64,
    /// Cap on undo-journal bytes: the oldest points are pruned until the oldest kept
    /// point needs at most this many bytes. Default: none (no cap).
    pub max_journal_bytes: Option<u64>,
    /// Most points kept per group; the oldest are pruned beyond it.
    /// Default: 1024.
    pub max_points: usize,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        RetentionPolicy {
            window_secs: 24 * 3600,
            keep_all_secs: 2 * 3600,
            thin_every_secs: 3600,
            max_journal_bytes: None,
            max_points: 1024,
        }
    }
}

impl RetentionPolicy {
    /// Checks the policy at start-up; the message names the field and the fix.
    pub fn validate(&self) -> Result<(), String> {
        if self.window_secs == 0 {
            return Err(
                "window_secs is 0: set it to how long recovery points are kept, \
                 in seconds (e.g. 86400 for a day)"
                    .into(),
            );
        }
        if self.thin_every_secs == 0 {
            return Err(
                "thin_every_secs is 0: set it to the spacing of points kept \
                 beyond keep_all_secs, in seconds (e.g. 3600 for one per hour)"
                    .into(),
            );
        }
        if self.keep_all_secs > self.window_secs {
            return Err(format!(
                "keep_all_secs ({}) is greater than window_secs ({}): lower \
                 keep_all_secs or raise window_secs",
                self.keep_all_secs, self.window_secs
            ));
        }
        if self.max_points < 2 {
            return Err(format!(
                "max_points is {}: set it to at least 2 (the newest crash-consistent \
                 and app-consistent points are always kept)",
                self.max_points
            ));
        }
        if self.max_journal_bytes == Some(0) {
            return Err(
                "max_journal_bytes is 0: it would prune every point but the \
                 newest of each kind; remove it for no cap, or set a byte count"
                    .into(),
            );
        }
        Ok(())
    }
}

/// One recovery point, as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanPoint {
    /// Point id, shared by every disk of the group for the same cut.
    pub id: u64,
    /// What kind of cut (`SyncComplete` counts as crash-consistent).
    pub kind: TagKind,
    /// Wall time of the cut, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Undo-journal bytes needed to keep this point: the history from this point up
    /// to now. Older points normally need more; the planner does not rely on it.
    pub journal_bytes: u64,
}

/// Why a point is pruned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PruneReason {
    /// Older than `window_secs`.
    OutsideWindow,
    /// A newer point of the same kind is kept in its thinning bucket.
    Thinned,
    /// Keeping it would need more than `max_journal_bytes`.
    SizeCap,
    /// More than `max_points` would be kept.
    TooMany,
}

/// The planner's decision for every point of a group.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Ids of the points kept, oldest first (by time, then id).
    pub keep: Vec<u64>,
    /// Ids of the points pruned, with the reason, oldest first (by time, then id).
    pub prune: Vec<(u64, PruneReason)>,
}

/// The two kinds thinned apart, as an index into per-kind arrays.
fn kind_slot(kind: TagKind) -> usize {
    match kind {
        TagKind::SyncComplete | TagKind::CrashConsistent => 0,
        TagKind::AppConsistent => 1,
    }
}

/// Decides which points to keep under `policy` at wall time `now_ms` (see the module
/// doc for the rules). `points` may come in any order.
pub fn plan(points: &[PlanPoint], policy: &RetentionPolicy, now_ms: u64) -> Plan {
    let mut order: Vec<&PlanPoint> = points.iter().collect();
    order.sort_by_key(|p| (p.time_ms, p.id));

    // Rule 1: the newest point of each kind, found walking newest first.
    let mut protected = vec![false; order.len()];
    let mut seen_kind = [false; 2];
    for (i, p) in order.iter().enumerate().rev() {
        let slot = kind_slot(p.kind);
        if !seen_kind[slot] {
            seen_kind[slot] = true;
            protected[i] = true;
        }
    }

    // `None` while the point is kept.
    let mut verdict: Vec<Option<PruneReason>> = vec![None; order.len()];

    // Rules 2 and 3, newest first: the first point of a kind met in a bucket is the
    // newest there and is kept. Time only decreases along the walk, so remembering the
    // last bucket per kind is enough. A protected point in the thinning range is the
    // newest of its kind, so it is always the one its bucket keeps.
    let window_ms = policy.window_secs.saturating_mul(MS_PER_SEC);
    let keep_all_ms = policy.keep_all_secs.saturating_mul(MS_PER_SEC);
    // A zero spacing (rejected by `validate`) degrades to 1 ms buckets: no thinning.
    let bucket_ms = policy.thin_every_secs.saturating_mul(MS_PER_SEC).max(1);
    let mut last_bucket: [Option<u64>; 2] = [None; 2];
    for (i, p) in order.iter().enumerate().rev() {
        let age_ms = now_ms.saturating_sub(p.time_ms);
        let reason = if age_ms > window_ms {
            Some(PruneReason::OutsideWindow)
        } else if age_ms <= keep_all_ms {
            None
        } else {
            let slot = kind_slot(p.kind);
            let bucket = p.time_ms / bucket_ms;
            if last_bucket[slot] == Some(bucket) {
                Some(PruneReason::Thinned)
            } else {
                last_bucket[slot] = Some(bucket);
                None
            }
        };
        if !protected[i] {
            verdict[i] = reason;
        }
    }

    // Rule 4: trim the oldest kept points until the journal fits, up to the first
    // protected one.
    if let Some(cap) = policy.max_journal_bytes {
        for (i, p) in order.iter().enumerate() {
            if verdict[i].is_some() {
                continue;
            }
            if protected[i] || p.journal_bytes <= cap {
                break;
            }
            verdict[i] = Some(PruneReason::SizeCap);
        }
    }

    // Rule 5: the oldest unprotected points beyond the count.
    let kept = verdict.iter().filter(|v| v.is_none()).count();
    let mut excess = kept.saturating_sub(policy.max_points);
    for (v, &is_protected) in verdict.iter_mut().zip(&protected) {
        if excess == 0 {
            break;
        }
        if v.is_none() && !is_protected {
            *v = Some(PruneReason::TooMany);
            excess -= 1;
        }
    }

    let mut out = Plan {
        keep: Vec::with_capacity(kept),
        prune: Vec::with_capacity(order.len() - kept),
    };
    for (p, v) in order.iter().zip(verdict) {
        match v {
            None => out.keep.push(p.id),
            Some(reason) => out.prune.push((p.id, reason)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    const M: u64 = 60 * 1000;
    const H: u64 = 60 * M;
    /// An hour boundary, so ages in whole hours land on bucket boundaries.
    const NOW: u64 = 500_000 * H;

    use PruneReason::{OutsideWindow, SizeCap, Thinned, TooMany};

    fn point(id: u64, kind: TagKind, age_ms: u64, journal_bytes: u64) -> PlanPoint {
        PlanPoint {
            id,
            kind,
            time_ms: NOW - age_ms,
            journal_bytes,
        }
    }

    fn crash(id: u64, age_ms: u64) -> PlanPoint {
        point(id, TagKind::CrashConsistent, age_ms, 0)
    }

    fn app(id: u64, age_ms: u64) -> PlanPoint {
        point(id, TagKind::AppConsistent, age_ms, 0)
    }

    fn expect(keep: &[u64], prune: &[(u64, PruneReason)]) -> Plan {
        Plan {
            keep: keep.to_vec(),
            prune: prune.to_vec(),
        }
    }

    #[test]
    fn no_points_no_plan() {
        assert_eq!(plan(&[], &RetentionPolicy::default(), NOW), Plan::default());
    }

    #[test]
    fn window_prunes_points_older_than_it() {
        let points = [
            crash(1, 30 * H),
            crash(2, 25 * H),
            crash(3, 23 * H),
            crash(4, H),
        ];
        assert_eq!(
            plan(&points, &RetentionPolicy::default(), NOW),
            expect(&[3, 4], &[(1, OutsideWindow), (2, OutsideWindow)])
        );
    }

    #[test]
    fn window_edge_is_inclusive() {
        let points = [crash(1, 24 * H + 1), crash(2, 24 * H), crash(3, 0)];
        assert_eq!(
            plan(&points, &RetentionPolicy::default(), NOW),
            expect(&[2, 3], &[(1, OutsideWindow)])
        );
    }

    #[test]
    fn newest_of_each_kind_survives_outside_the_window() {
        let points = [crash(1, 50 * H), app(2, 40 * H), crash(3, 30 * H)];
        assert_eq!(
            plan(&points, &RetentionPolicy::default(), NOW),
            expect(&[2, 3], &[(1, OutsideWindow)])
        );
    }

    #[test]
    fn keep_all_range_keeps_everything_up_to_its_edge() {
        // One point every 10 minutes for the last 2 h, edge included.
        let points: Vec<PlanPoint> = (0..=12).map(|i| crash(i, i * 10 * M)).collect();
        let mut keep: Vec<u64> = (0..=12).collect();
        keep.reverse();
        assert_eq!(
            plan(&points, &RetentionPolicy::default(), NOW),
            expect(&keep, &[])
        );
    }

    #[test]
    fn keep_all_edge_is_inclusive() {
        // Two points exactly keep_all old share a bucket: thinning would drop one.
        let points = [crash(1, 2 * H), crash(2, 2 * H), crash(3, 0)];
        assert_eq!(
            plan(&points, &RetentionPolicy::default(), NOW),
            expect(&[1, 2, 3], &[])
        );
    }

    #[test]
    fn thinning_keeps_the_newest_point_per_bucket() {
        let points = [
            crash(1, 4 * H + 50 * M),
            crash(2, 4 * H + 30 * M),
            crash(3, 4 * H + 10 * M),
            crash(4, 3 * H + 50 * M),
            crash(9, 0),
        ];
        assert_eq!(
            plan(&points, &RetentionPolicy::default(), NOW),
            expect(&[3, 4, 9], &[(1, Thinned), (2, Thinned)])
        );
    }

    #[test]
    fn thinning_keeps_an_app_and_a_crash_point_in_the_same_bucket() {
        let points = [
            app(4, 4 * H + 50 * M),
            app(1, 4 * H + 40 * M),
            crash(3, 4 * H + 30 * M),
            crash(2, 4 * H + 20 * M),
            app(11, H),
            crash(10, 0),
        ];
        assert_eq!(
            plan(&points, &RetentionPolicy::default(), NOW),
            expect(&[1, 2, 11, 10], &[(4, Thinned), (3, Thinned)])
        );
    }

    #[test]
    fn sync_complete_is_thinned_and_protected_as_crash_consistent() {
        let points = [
            point(1, TagKind::SyncComplete, 4 * H + 40 * M, 0),
            crash(2, 4 * H + 20 * M),
            point(3, TagKind::SyncComplete, 30 * H, 0),
        ];
        // 3 is outside the window but is not the newest crash-class point.
        assert_eq!(
            plan(&points, &RetentionPolicy::default(), NOW),
            expect(&[2], &[(3, OutsideWindow), (1, Thinned)])
        );
        let only_sync = [point(7, TagKind::SyncComplete, 30 * H, 0)];
        assert_eq!(
            plan(&only_sync, &RetentionPolicy::default(), NOW),
            expect(&[7], &[])
        );
    }

    #[test]
    fn buckets_align_on_the_epoch_not_on_now() {
        let now = NOW + 30 * M;
        let at = |id, time_ms| PlanPoint {
            id,
            kind: TagKind::CrashConsistent,
            time_ms,
            journal_bytes: 0,
        };
        let h95 = NOW - 5 * H;
        let points = [
            at(1, h95 + 10 * M),
            at(2, h95 + 50 * M),
            // 20 minutes after 2, but in the next hour: kept too.
            at(3, h95 + H + 10 * M),
            at(4, now),
        ];
        assert_eq!(
            plan(&points, &RetentionPolicy::default(), now),
            expect(&[2, 3, 4], &[(1, Thinned)])
        );
    }

    #[test]
    fn thinning_ignores_keep_all_points_sharing_a_bucket() {
        // Both points are in the same hour bucket, one on each side of keep_all.
        let points = [crash(1, 2 * H + 10 * M), crash(2, H + 50 * M), crash(3, 0)];
        assert_eq!(
            plan(&points, &RetentionPolicy::default(), NOW),
            expect(&[1, 2, 3], &[])
        );
    }

    #[test]
    fn same_time_is_ordered_by_id() {
        let points = [crash(8, 5 * H), crash(5, 5 * H), crash(9, 0)];
        assert_eq!(
            plan(&points, &RetentionPolicy::default(), NOW),
            expect(&[8, 9], &[(5, Thinned)])
        );
    }

    #[test]
    fn future_points_count_as_age_zero() {
        let now = NOW - 10 * H;
        let points = [crash(1, 0), crash(2, M), crash(3, 20 * H)];
        assert_eq!(
            plan(&points, &RetentionPolicy::default(), now),
            expect(&[3, 2, 1], &[])
        );
    }

    #[test]
    fn size_cap_prunes_oldest_until_the_journal_fits() {
        // 0 is already gone (window); the cap looks past it at what is still kept.
        let points = [
            point(0, TagKind::CrashConsistent, 30 * H, 3000),
            point(1, TagKind::CrashConsistent, 10 * H, 1000),
            point(2, TagKind::CrashConsistent, 6 * H, 800),
            point(3, TagKind::CrashConsistent, 3 * H, 500),
            point(4, TagKind::CrashConsistent, H, 200),
            point(5, TagKind::CrashConsistent, 0, 0),
        ];
        let policy = RetentionPolicy {
            max_journal_bytes: Some(600),
            ..RetentionPolicy::default()
        };
        assert_eq!(
            plan(&points, &policy, NOW),
            expect(
                &[3, 4, 5],
                &[(0, OutsideWindow), (1, SizeCap), (2, SizeCap)]
            )
        );
    }

    #[test]
    fn size_cap_counts_only_points_still_kept() {
        // 1 is thinned by 2 before the cap looks; 2 fits, so the cap prunes nothing.
        let points = [
            point(1, TagKind::CrashConsistent, 5 * H + 50 * M, 2000),
            point(2, TagKind::CrashConsistent, 5 * H + 10 * M, 500),
            point(3, TagKind::CrashConsistent, 0, 0),
        ];
        let policy = RetentionPolicy {
            max_journal_bytes: Some(600),
            ..RetentionPolicy::default()
        };
        assert_eq!(
            plan(&points, &policy, NOW),
            expect(&[2, 3], &[(1, Thinned)])
        );
    }

    #[test]
    fn size_cap_stops_at_the_first_protected_point() {
        let points = [
            point(1, TagKind::CrashConsistent, 10 * H, 1000),
            point(2, TagKind::AppConsistent, 8 * H, 900),
            point(3, TagKind::CrashConsistent, 6 * H, 700),
            point(4, TagKind::CrashConsistent, 0, 0),
        ];
        let policy = RetentionPolicy {
            max_journal_bytes: Some(600),
            ..RetentionPolicy::default()
        };
        // 3 still needs more than the cap, but the journal must reach back to 2.
        assert_eq!(
            plan(&points, &policy, NOW),
            expect(&[2, 3, 4], &[(1, SizeCap)])
        );
    }

    #[test]
    fn newest_of_each_kind_survives_the_size_cap() {
        let points = [
            point(1, TagKind::AppConsistent, 3 * H, 5000),
            point(2, TagKind::CrashConsistent, H, 4000),
        ];
        let policy = RetentionPolicy {
            max_journal_bytes: Some(10),
            ..RetentionPolicy::default()
        };
        assert_eq!(plan(&points, &policy, NOW), expect(&[1, 2], &[]));
    }

    #[test]
    fn max_points_prunes_the_oldest_unprotected() {
        let points = [
            app(1, 20 * H),
            crash(2, 10 * H),
            crash(3, 8 * H),
            crash(4, 6 * H),
            crash(5, 4 * H),
            crash(6, 0),
        ];
        let policy = RetentionPolicy {
            max_points: 3,
            ..RetentionPolicy::default()
        };
        assert_eq!(
            plan(&points, &policy, NOW),
            expect(&[1, 5, 6], &[(2, TooMany), (3, TooMany), (4, TooMany)])
        );
    }

    #[test]
    fn max_points_below_the_protected_count_keeps_the_protected() {
        let points = [app(1, 5 * H), crash(2, 3 * H), crash(3, 0)];
        let policy = RetentionPolicy {
            max_points: 1,
            ..RetentionPolicy::default()
        };
        assert_eq!(
            plan(&points, &policy, NOW),
            expect(&[1, 3], &[(2, TooMany)])
        );
    }

    #[test]
    fn plan_does_not_depend_on_input_order() {
        let mut points = vec![
            app(4, 4 * H + 50 * M),
            crash(7, 30 * H),
            app(1, 4 * H + 40 * M),
            crash(3, 4 * H + 30 * M),
            crash(2, 4 * H + 20 * M),
            crash(10, 0),
        ];
        let first = plan(&points, &RetentionPolicy::default(), NOW);
        points.reverse();
        assert_eq!(plan(&points, &RetentionPolicy::default(), NOW), first);
        assert_eq!(
            first,
            expect(
                &[1, 2, 10],
                &[(7, OutsideWindow), (4, Thinned), (3, Thinned)]
            )
        );
    }

    #[test]
    fn degenerate_policies_do_not_panic() {
        let points = [crash(1, 3 * H), crash(2, 3 * H + 1), app(3, 0)];
        let zero = RetentionPolicy {
            window_secs: 0,
            keep_all_secs: 0,
            thin_every_secs: 0,
            max_journal_bytes: Some(0),
            max_points: 0,
        };
        assert_eq!(
            plan(&points, &zero, NOW),
            expect(&[1, 3], &[(2, OutsideWindow)])
        );
        let huge = RetentionPolicy {
            window_secs: u64::MAX,
            keep_all_secs: u64::MAX,
            thin_every_secs: u64::MAX,
            max_journal_bytes: Some(u64::MAX),
            max_points: usize::MAX,
        };
        assert_eq!(plan(&points, &huge, NOW), expect(&[2, 1, 3], &[]));
    }

    #[test]
    fn default_policy_is_valid_and_bad_ones_name_the_field() {
        assert_eq!(RetentionPolicy::default().validate(), Ok(()));
        let cases = [
            (
                RetentionPolicy {
                    window_secs: 0,
                    keep_all_secs: 0,
                    ..RetentionPolicy::default()
                },
                "window_secs",
            ),
            (
                RetentionPolicy {
                    thin_every_secs: 0,
                    ..RetentionPolicy::default()
                },
                "thin_every_secs",
            ),
            (
                RetentionPolicy {
                    keep_all_secs: 90_000,
                    ..RetentionPolicy::default()
                },
                "keep_all_secs",
            ),
            (
                RetentionPolicy {
                    max_points: 1,
                    ..RetentionPolicy::default()
                },
                "max_points",
            ),
            (
                RetentionPolicy {
                    max_journal_bytes: Some(0),
                    ..RetentionPolicy::default()
                },
                "max_journal_bytes",
            ),
        ];
        for (policy, field) in cases {
            let err = policy.validate().err().unwrap_or_default();
            assert!(err.starts_with(field), "{field}: {err:?}");
        }
    }

    #[test]
    fn policy_reads_from_toml_with_defaults() -> Result<(), String> {
        let p: RetentionPolicy =
            toml::from_str("window_secs = 3600\nmax_journal_bytes = 1000000\n")
                .map_err(|e| e.to_string())?;
        assert_eq!(
            p,
            RetentionPolicy {
                window_secs: 3600,
                max_journal_bytes: Some(1_000_000),
                ..RetentionPolicy::default()
            }
        );
        assert_eq!(toml::from_str(""), Ok(RetentionPolicy::default()));
        assert!(toml::from_str::<RetentionPolicy>("windowsecs = 1\n").is_err());
        Ok(())
    }

    #[test]
    fn prune_reasons_serialize_kebab_case() -> Result<(), String> {
        let json = serde_json::to_string(&[OutsideWindow, Thinned, SizeCap, TooMany])
            .map_err(|e| e.to_string())?;
        assert_eq!(
            json,
            r#"["outside-window","thinned","size-cap","too-many"]"#
        );
        Ok(())
    }

    fn arb_policy() -> impl Strategy<Value = RetentionPolicy> {
        (
            0u64..48 * 3600,
            0u64..72 * 3600,
            0u64..4 * 3600,
            proptest::option::of(0u64..200_000_000),
            0usize..30,
        )
            .prop_map(
                |(window_secs, keep_all_secs, thin_every_secs, max_journal_bytes, max_points)| {
                    RetentionPolicy {
                        window_secs,
                        keep_all_secs,
                        thin_every_secs,
                        max_journal_bytes,
                        max_points,
                    }
                },
            )
    }

    /// Up to 40 points over the last 60 h and the next hour, on minute marks so times
    /// and buckets collide; journal bytes grow with age at a per-case rate.
    fn arb_points() -> impl Strategy<Value = Vec<PlanPoint>> {
        (
            proptest::collection::vec((0u8..3, 0u64..61 * 60), 0..40),
            0u64..1000,
        )
            .prop_map(|(raw, bytes_per_sec)| {
                raw.into_iter()
                    .zip(0u64..)
                    .map(|((kind, minutes_back), id)| {
                        let time_ms = NOW + H - minutes_back * M;
                        PlanPoint {
                            id,
                            kind: [
                                TagKind::SyncComplete,
                                TagKind::CrashConsistent,
                                TagKind::AppConsistent,
                            ][usize::from(kind)],
                            time_ms,
                            journal_bytes: NOW.saturating_sub(time_ms) / 1000 * bytes_per_sec,
                        }
                    })
                    .collect()
            })
    }

    proptest! {
        #[test]
        fn plan_invariants_hold(points in arb_points(), policy in arb_policy()) {
            let out = plan(&points, &policy, NOW);
            let by_id: BTreeMap<u64, &PlanPoint> = points.iter().map(|p| (p.id, p)).collect();
            let key = |id: &u64| by_id.get(id).map(|p| (p.time_ms, p.id));
            let age = |p: &PlanPoint| NOW.saturating_sub(p.time_ms);
            let window_ms = policy.window_secs * MS_PER_SEC;
            let keep_all_ms = policy.keep_all_secs * MS_PER_SEC;
            let bucket_ms = (policy.thin_every_secs * MS_PER_SEC).max(1);

            // Partition, each list oldest first.
            let pruned: Vec<u64> = out.prune.iter().map(|&(id, _)| id).collect();
            let mut all: Vec<u64> = out.keep.iter().chain(&pruned).copied().collect();
            all.sort_unstable();
            let mut input: Vec<u64> = points.iter().map(|p| p.id).collect();
            input.sort_unstable();
            prop_assert_eq!(&all, &input);
            prop_assert!(out.keep.windows(2).all(|w| key(&w[0]) < key(&w[1])));
            prop_assert!(pruned.windows(2).all(|w| key(&w[0]) < key(&w[1])));

            // The newest of each kind is kept.
            let mut newest: [Option<&PlanPoint>; 2] = [None; 2];
            for p in &points {
                let slot = &mut newest[kind_slot(p.kind)];
                if slot.is_none_or(|n| (n.time_ms, n.id) < (p.time_ms, p.id)) {
                    *slot = Some(p);
                }
            }
            let protected: BTreeSet<u64> = newest.iter().flatten().map(|p| p.id).collect();
            for id in &protected {
                prop_assert!(out.keep.contains(id), "protected {} pruned", id);
            }

            let kept: Vec<&PlanPoint> = out.keep.iter().filter_map(|id| by_id.get(id).copied()).collect();
            let unprotected_kept = || kept.iter().filter(|p| !protected.contains(&p.id));

            // Nothing unprotected kept outside the window; one per kind and bucket
            // beyond keep_all.
            let mut buckets = BTreeSet::new();
            for p in unprotected_kept() {
                prop_assert!(age(p) <= window_ms);
                if age(p) > keep_all_ms {
                    prop_assert!(buckets.insert((kind_slot(p.kind), p.time_ms / bucket_ms)));
                }
            }

            // Count.
            let limit = policy.max_points.max(protected.len());
            prop_assert!(out.keep.len() <= limit);

            // Size cap: bytes grow with age, so the oldest kept point fits or is protected.
            if let (Some(cap), Some(oldest)) = (policy.max_journal_bytes, kept.first()) {
                prop_assert!(oldest.journal_bytes <= cap || protected.contains(&oldest.id));
            }

            // Every prune reason is justified.
            for &(id, reason) in &out.prune {
                let p = by_id[&id];
                match reason {
                    OutsideWindow => prop_assert!(age(p) > window_ms),
                    Thinned => {
                        prop_assert!(age(p) > keep_all_ms && age(p) <= window_ms);
                        let newer_in_bucket = points.iter().any(|q| {
                            kind_slot(q.kind) == kind_slot(p.kind)
                                && q.time_ms / bucket_ms == p.time_ms / bucket_ms
                                && (q.time_ms, q.id) > (p.time_ms, p.id)
                                && age(q) > keep_all_ms
                        });
                        prop_assert!(newer_in_bucket);
                    }
                    SizeCap => {
                        prop_assert!(policy.max_journal_bytes.is_some_and(|cap| p.journal_bytes > cap));
                        prop_assert!(kept.iter().all(|k| (k.time_ms, k.id) > (p.time_ms, p.id)));
                    }
                    TooMany => {
                        prop_assert_eq!(out.keep.len(), limit);
                        prop_assert!(unprotected_kept().all(|k| (k.time_ms, k.id) > (p.time_ms, p.id)));
                    }
                }
            }

            // Input order does not matter.
            let reversed: Vec<PlanPoint> = points.iter().rev().cloned().collect();
            prop_assert_eq!(plan(&reversed, &policy, NOW), out);
        }
    }
}
