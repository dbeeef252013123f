//! The agent's durable state per disk: generation, next seq, the pass in progress (so
//! an interrupted sync resumes where it stopped), file systems it froze, and the trace
//! instance a clean stop handed over to the next start.

use std::path::{Path, PathBuf};

use boomerang_common::message::TagKind;
use serde::{Deserialize, Serialize};

use crate::source::Geometry;

/// A pass in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassState {
    /// Seq of unit 0.
    pub base_seq: u64,
    /// Geometry the pass was planned with.
    pub geometry: Geometry,
    /// Every unit below this one is acknowledged by the process server.
    pub acked_units: u64,
    /// Kind of the tag that ends the pass.
    pub kind: TagKind,
    /// Point id of that tag.
    pub point_id: u64,
}

/// What the agent remembers about one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskProgress {
    /// Disk id.
    pub disk: String,
    /// Generation the agent ships in (0: none yet).
    pub generation: u64,
    /// Seq of the next pass's first unit.
    pub next_seq: u64,
    /// The pass in progress, if any.
    pub pass: Option<PassState>,
    /// Mount points frozen right now (thawed at start-up after a crash).
    pub frozen: Vec<PathBuf>,
    /// Continuous tracking is running; found set at start-up, the agent stopped
    /// uncleanly and writes may have been missed (new generation, resync).
    #[serde(default)]
    pub tracking: bool,
    /// Disk size when last shipped (0: unknown); a change starts a new generation.
    #[serde(default)]
    pub size: u64,
    /// Trace source: the tracefs instance a clean stop left tracing the disk, after
    /// every change it had read was durable at the process server. The next `track`
    /// adopts it (and goes on without a rescan) if it checks out; taken out of the
    /// state before anything else happens, so it is adopted at most once.
    #[serde(default)]
    pub trace_handover: Option<crate::trace::Handover>,
    /// The master target stopped at a hole in this generation's stream that nothing
    /// will fill (a record refused or lost): the next run starts a new generation.
    #[serde(default)]
    pub hole: bool,
}

impl DiskProgress {
    /// A disk the agent has never shipped.
    pub fn new(disk: &str) -> Self {
        DiskProgress {
            disk: disk.to_string(),
            generation: 0,
            next_seq: 0,
            pass: None,
            frozen: Vec::new(),
            tracking: false,
            size: 0,
            trace_handover: None,
            hole: false,
        }
    }
}

/// Path of a disk's state file.
pub fn path(state_dir: &Path, disk: &str) -> PathBuf {
    state_dir.join(format!("{disk}.state"))
}
