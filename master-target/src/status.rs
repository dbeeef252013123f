//! `boomerang-mt status`: what each group and each replicated disk looks like, read
//! straight from the durable records (works whether or not the daemon runs).

use std::path::Path;

use serde::Serialize;

use crate::disk::DiskRecord;
use crate::disks::load_records;
use crate::groups::{load_group, GroupState};
use crate::points::{group_points, groups};

/// One group's status line.
#[derive(Debug, Serialize)]
pub struct GroupStatus {
    /// Group.
    pub group: String,
    /// syncing, protected, failing-over (giving the point back), failover-pending
    /// (waiting for commit or cancel), failed-back, reprotecting, or refused (its
    /// record cannot be read: `last_error` says why and what to do).
    pub state: String,
    /// Age of the newest recovery point in seconds (the recovery point objective met
    /// now), while protected.
    pub rpo_seconds: Option<u64>,
    /// Recovery points kept.
    pub points: usize,
    /// The newest point's id.
    pub newest_point: Option<u64>,
    /// Bytes the group's retention journals hold.
    pub journal_bytes: u64,
    /// The failover pending or committed, by point id.
    pub failover_point: Option<u64>,
    /// The last operator action that failed, and why.
    pub last_error: Option<String>,
    /// The group's disks.
    pub disks: Vec<String>,
}

/// Reads the status of every group in `state_dir`.
pub fn collect_groups(state_dir: &Path, retention_dir: &Path) -> anyhow::Result<Vec<GroupStatus>> {
    let now = boomerang_common::config::now_ms();
    let records = load_records(state_dir)?;
    let mut out = Vec::new();
    for g in groups(&records) {
        let points = group_points(&records, &g);
        let newest = points.last();
        let disks: Vec<String> = records
            .iter()
            .filter(|r| r.group == g)
            .map(|r| r.disk.clone())
            .collect();
        let journal_bytes = disks
            .iter()
            .map(|d| dir_bytes(&retention_dir.join(d)))
            .sum();
        let mut status = GroupStatus {
            group: g.clone(),
            state: String::new(),
            rpo_seconds: None,
            points: points.len(),
            newest_point: newest.map(|p| p.id),
            journal_bytes,
            failover_point: None,
            last_error: None,
            disks,
        };
        let rec = match load_group(state_dir, &g) {
            Ok(rec) => rec,
            Err(e) => {
                // Not protected, whatever it was: the daemon keeps its disks paused.
                status.state = "refused".into();
                status.last_error = Some(e.to_string());
                out.push(status);
                continue;
            }
        };
        status.state = match rec.state {
            GroupState::Protected if newest.is_none() => "syncing",
            GroupState::Protected => "protected",
            GroupState::FailoverPending if rec.failover.as_ref().is_some_and(|f| !f.done) => {
                "failing-over"
            }
            GroupState::FailoverPending => "failover-pending",
            GroupState::FailedBack => "failed-back",
            GroupState::Reprotecting => "reprotecting",
        }
        .into();
        status.rpo_seconds = newest
            .filter(|_| rec.state == GroupState::Protected)
            .map(|p| now.saturating_sub(p.time_ms) / 1000);
        status.failover_point = rec.failover.as_ref().map(|f| f.point_id);
        status.last_error = rec.last_error;
        out.push(status);
    }
    Ok(out)
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Renders the groups as a table for people.
pub fn render_groups(groups: &[GroupStatus]) -> String {
    let mut out = format!(
        "{:<16} {:<17} {:>8} {:>7} {:>11} {}\n",
        "GROUP", "STATE", "RPO", "POINTS", "JOURNAL", "LAST ERROR"
    );
    for g in groups {
        let rpo = g.rpo_seconds.map_or("-".to_string(), |s| format!("{s}s"));
        out.push_str(&format!(
            "{:<16} {:<17} {:>8} {:>7} {:>11} {}\n",
            g.group,
            g.state,
            rpo,
            g.points,
            human(g.journal_bytes),
            g.last_error.as_deref().unwrap_or("-")
        ));
    }
    out
}

/// A wall time (ms since the epoch) as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn format_time(ms: u64) -> String {
    let secs = ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// One disk's status line.
#[derive(Debug, Serialize)]
pub struct DiskStatus {
    /// Disk id.
    pub disk: String,
    /// Group.
    pub group: String,
    /// Replica size in bytes.
    pub size: u64,
    /// Replica path.
    pub replica: String,
    /// Current generation.
    pub generation: u64,
    /// Next seq expected.
    pub next_seq: u64,
    /// Raw bytes applied so far.
    pub bytes_applied: u64,
    /// Whether the replica holds a complete cut of the current generation.
    pub consistent: bool,
    /// Kind of that cut.
    pub cut: Option<String>,
    /// Point id of that cut.
    pub point_id: Option<u64>,
    /// Wall time of that cut (ms since epoch).
    pub cut_time_ms: Option<u64>,
    /// Recovery points the disk holds: (kind, point id, time ms), oldest first.
    pub points: Vec<(String, u64, u64)>,
    /// Seconds since the last record was applied.
    pub lag_seconds: Option<u64>,
    /// Batches refused for a failed hash check.
    pub integrity_failures: u64,
    /// Why the disk stopped applying, until a record applies again.
    pub last_error: Option<String>,
}

impl DiskStatus {
    fn from_record(r: DiskRecord, now_ms: u64) -> Self {
        let consistent = r
            .cut
            .as_ref()
            .is_some_and(|c| c.generation == r.position.generation);
        DiskStatus {
            disk: r.disk,
            group: r.group,
            size: r.size,
            replica: r.replica.display().to_string(),
            generation: r.position.generation,
            next_seq: r.position.next_seq,
            bytes_applied: r.bytes_applied,
            consistent,
            cut: r.cut.as_ref().map(|c| kind_name(c.kind)),
            point_id: r.cut.as_ref().map(|c| c.point_id),
            cut_time_ms: r.cut.as_ref().map(|c| c.time_ms),
            points: r
                .points
                .iter()
                .map(|c| (kind_name(c.kind), c.point_id, c.time_ms))
                .collect(),
            lag_seconds: (r.last_apply_ms > 0)
                .then(|| now_ms.saturating_sub(r.last_apply_ms) / 1000),
            integrity_failures: r.integrity_failures,
            last_error: r.apply_error,
        }
    }
}

fn kind_name(kind: boomerang_common::message::TagKind) -> String {
    serde_json::to_value(kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Reads the status of every disk in `state_dir`.
pub fn collect(state_dir: &Path) -> anyhow::Result<Vec<DiskStatus>> {
    let now = boomerang_common::config::now_ms();
    Ok(load_records(state_dir)?
        .into_iter()
        .map(|r| DiskStatus::from_record(r, now))
        .collect())
}

/// Renders the status as a table for people.
pub fn render(disks: &[DiskStatus]) -> String {
    if disks.is_empty() {
        return "no disks replicated yet\n".into();
    }
    let mut out = format!(
        "{:<20} {:>10} {:>12} {:>5} {:>8} {:<26} {:>8} {:>6}\n",
        "DISK", "SIZE", "APPLIED", "GEN", "SEQ", "STATE", "LAG", "BAD"
    );
    for d in disks {
        let state = if d.last_error.is_some() {
            "stopped (see below)".to_string()
        } else if d.consistent {
            format!("consistent ({})", d.cut.as_deref().unwrap_or("?"))
        } else {
            "syncing".to_string()
        };
        let lag = d.lag_seconds.map_or("-".to_string(), |s| format!("{s}s"));
        out.push_str(&format!(
            "{:<20} {:>10} {:>12} {:>5} {:>8} {:<26} {:>8} {:>6}\n",
            d.disk,
            human(d.size),
            human(d.bytes_applied),
            d.generation,
            d.next_seq,
            state,
            lag,
            d.integrity_failures
        ));
        if let Some(e) = &d.last_error {
            out.push_str(&format!("  {}: not applying: {e}\n", d.disk));
        }
    }
    out
}

/// Bytes in binary units.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_utc_dates() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_time(1_795_694_400_000), "2026-11-26 12:00:00 UTC");
        assert_eq!(format_time(951_782_400_000), "2000-02-29 00:00:00 UTC");
    }
}
