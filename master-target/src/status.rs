//! `boomerang-mt status`: what each replicated disk looks like, read straight from the
//! durable records (works whether or not the daemon runs).

use std::path::Path;

use serde::Serialize;

use crate::disk::DiskRecord;
use crate::disks::load_records;

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
    /// Recent cuts of the current generation: (kind, point id, time ms), oldest first.
    pub points: Vec<(String, u64, u64)>,
    /// Seconds since the last record was applied.
    pub lag_seconds: Option<u64>,
    /// Batches refused for a failed hash check.
    pub integrity_failures: u64,
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
                .recent_cuts
                .iter()
                .map(|c| (kind_name(c.kind), c.point_id, c.time_ms))
                .collect(),
            lag_seconds: (r.last_apply_ms > 0)
                .then(|| now_ms.saturating_sub(r.last_apply_ms) / 1000),
            integrity_failures: r.integrity_failures,
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
        let state = if d.consistent {
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
