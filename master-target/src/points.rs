//! Recovery points of a group, derived from its disks' durable records (rule 4): a
//! point is listed only when every disk of the group holds a cut with its id, and a
//! disk holds a cut only once the tag is durable. The kind is app-consistent only when
//! every disk's cut is.

use std::collections::BTreeSet;

use boomerang_common::message::TagKind;
use serde::Serialize;

use crate::disk::{Cut, DiskRecord};

/// One recovery point of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupPoint {
    /// Point id (shared by the tags of every disk of the group).
    pub id: u64,
    /// Crash- or app-consistent.
    pub kind: TagKind,
    /// Wall time of the point: the latest of its disks' tag times (ms since epoch).
    pub time_ms: u64,
    /// Each disk's cut, by disk id.
    pub cuts: Vec<(String, Cut)>,
}

/// Which point an operator asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointChoice {
    /// Drain the sources first, then the newest point.
    Latest,
    /// The newest point already durable here.
    LatestProcessed,
    /// The newest app-consistent point.
    LatestApp,
    /// A point by id.
    Id(u64),
}

impl std::str::FromStr for PointChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "latest" => Ok(PointChoice::Latest),
            "latest-processed" => Ok(PointChoice::LatestProcessed),
            "latest-app" => Ok(PointChoice::LatestApp),
            id => id.parse().map(PointChoice::Id).map_err(|_| {
                format!("{id:?} is no point: use latest, latest-processed, latest-app or a point id from `boomerang-mt points`")
            }),
        }
    }
}

impl std::fmt::Display for PointChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PointChoice::Latest => f.write_str("latest"),
            PointChoice::LatestProcessed => f.write_str("latest-processed"),
            PointChoice::LatestApp => f.write_str("latest-app"),
            PointChoice::Id(id) => write!(f, "{id}"),
        }
    }
}

/// The groups named by `records`, sorted.
pub fn groups(records: &[DiskRecord]) -> BTreeSet<String> {
    records.iter().map(|r| r.group.clone()).collect()
}

/// The points of `group`, oldest first.
pub fn group_points(records: &[DiskRecord], group: &str) -> Vec<GroupPoint> {
    let disks: Vec<&DiskRecord> = records.iter().filter(|r| r.group == group).collect();
    let Some(first) = disks.first() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for cut in &first.points {
        let mut cuts = vec![(first.disk.clone(), cut.clone())];
        for d in &disks[1..] {
            match d.points.iter().find(|c| c.point_id == cut.point_id) {
                Some(c) => cuts.push((d.disk.clone(), c.clone())),
                None => break,
            }
        }
        if cuts.len() != disks.len() {
            continue;
        }
        let kind = if cuts.iter().all(|(_, c)| c.kind == TagKind::AppConsistent) {
            TagKind::AppConsistent
        } else {
            TagKind::CrashConsistent
        };
        let time_ms = cuts.iter().map(|(_, c)| c.time_ms).max().unwrap_or(0);
        out.push(GroupPoint {
            id: cut.point_id,
            kind,
            time_ms,
            cuts,
        });
    }
    out.sort_by_key(|p| (p.time_ms, p.id));
    out
}

/// Picks the point `choice` names (`Latest` is the newest: draining comes first).
pub fn choose(points: &[GroupPoint], choice: PointChoice) -> Option<&GroupPoint> {
    match choice {
        PointChoice::Latest | PointChoice::LatestProcessed => points.last(),
        PointChoice::LatestApp => points
            .iter()
            .rev()
            .find(|p| p.kind == TagKind::AppConsistent),
        PointChoice::Id(id) => points.iter().find(|p| p.id == id),
    }
}

/// One line of `boomerang-mt points`.
#[derive(Debug, Serialize)]
pub struct PointLine {
    /// Point id.
    pub id: u64,
    /// Kind.
    pub kind: TagKind,
    /// Wall time (ms since epoch).
    pub time_ms: u64,
    /// Disks of the point.
    pub disks: Vec<String>,
    /// The newest point: what `latest` gives once the sources are drained.
    pub latest: bool,
    /// The newest point durable here now.
    pub latest_processed: bool,
    /// The newest app-consistent point.
    pub latest_app: bool,
}

/// The listing of a group's points, oldest first, with the markers set.
pub fn listing(points: &[GroupPoint]) -> Vec<PointLine> {
    let newest = points.last().map(|p| p.id);
    let app = choose(points, PointChoice::LatestApp).map(|p| p.id);
    points
        .iter()
        .map(|p| PointLine {
            id: p.id,
            kind: p.kind,
            time_ms: p.time_ms,
            disks: p.cuts.iter().map(|(d, _)| d.clone()).collect(),
            latest: Some(p.id) == newest,
            latest_processed: Some(p.id) == newest,
            latest_app: Some(p.id) == app,
        })
        .collect()
}

/// Text rendering of [`listing`].
pub fn render(group: &str, lines: &[PointLine]) -> String {
    use std::fmt::Write as _;
    let mut out = format!("group {group}: {} recovery point(s)\n", lines.len());
    for l in lines {
        let mut marks = Vec::new();
        if l.latest_processed {
            marks.push("latest-processed");
        }
        if l.latest_app {
            marks.push("latest-app");
        }
        let kind = match l.kind {
            TagKind::AppConsistent => "app-consistent",
            _ => "crash-consistent",
        };
        let _ = writeln!(
            out,
            "  {:>15}  {kind:<16}  {}  disks {}  {}",
            l.id,
            crate::status::format_time(l.time_ms),
            l.disks.join(","),
            marks.join(" ")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::DiskRecord;

    fn cut(id: u64, kind: TagKind) -> Cut {
        Cut {
            kind,
            point_id: id,
            time_ms: id,
            generation: 1,
            seq: id,
            lsn: id * 10,
            size: 1 << 20,
        }
    }

    fn rec(disk: &str, group: &str, cuts: Vec<Cut>) -> DiskRecord {
        let mut r = DiskRecord::new(disk, group, 1 << 20, format!("/r/{disk}").into());
        r.points = cuts;
        r
    }

    #[test]
    fn a_point_is_listed_only_when_every_disk_of_the_group_holds_it() {
        let app = TagKind::AppConsistent;
        let crash = TagKind::CrashConsistent;
        let records = vec![
            rec("a0", "g", vec![cut(1, app), cut(2, crash), cut(3, app)]),
            rec("b0", "g", vec![cut(1, app), cut(3, crash)]),
            rec("x", "other", vec![cut(2, crash)]),
        ];
        let pts = group_points(&records, "g");
        assert_eq!(pts.iter().map(|p| p.id).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(pts[0].kind, app);
        assert_eq!(pts[1].kind, crash, "app only when every disk's cut is app");
        assert_eq!(choose(&pts, PointChoice::LatestApp).map(|p| p.id), Some(1));
        assert_eq!(choose(&pts, PointChoice::Latest).map(|p| p.id), Some(3));
        assert_eq!(choose(&pts, PointChoice::Id(2)), None);
        let l = listing(&pts);
        assert!(l[1].latest && l[1].latest_processed && !l[1].latest_app);
        assert!(l[0].latest_app);
        assert_eq!("latest-app".parse(), Ok(PointChoice::LatestApp));
        assert!("yesterday".parse::<PointChoice>().is_err());
    }
}
