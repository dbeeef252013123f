//! Groups at the master target: each group's durable failback state (protected,
//! failover pending, failed back, reprotecting), the agents that check in for it, the
//! directive they are answered, and the barrier of multi-agent points.
//!
//! Multi-agent points (two phases, through the process server): each agent pauses
//! its writes for the point and sends a prepare naming its disks; the barrier commits
//! once the prepares cover every disk of the group, and every waiting agent then tags
//! and resumes. When the deadline passes first, the point is abandoned: every agent is
//! told so, resumes without a tag, and no disk ever carries it, so it is never listed.
//! The decision is taken once per point and is the same for every agent.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use boomerang_common::config::now_ms;
use boomerang_common::durable::{create_dir_durable, DurableError, StateFile};
use boomerang_common::message::{Action, TagKind};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::disk::Cut;

/// Where a group stands in the failback workflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GroupState {
    /// Replicating into this master target.
    Protected,
    /// Failed over to a point; waiting for commit or cancel. Replication is stopped.
    FailoverPending,
    /// Committed: the group's disks here are the live disks now, unprotected.
    FailedBack,
    /// Committed and replicating the other way, from here to another site.
    Reprotecting,
}

/// A failover, pending or committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failover {
    /// The point.
    pub point_id: u64,
    /// Its kind.
    pub kind: TagKind,
    /// Its time (ms since epoch).
    pub time_ms: u64,
    /// Each disk's cut of the point.
    pub cuts: BTreeMap<String, Cut>,
    /// Where each disk was materialized; empty when the replicas were rolled in place.
    pub targets: BTreeMap<String, PathBuf>,
    /// Every disk holds the point's bytes (rolled or materialized, and synced).
    pub done: bool,
    /// When it started (ms since epoch).
    pub started_ms: u64,
    /// When it was committed.
    pub committed_ms: Option<u64>,
}

/// What a test failover made, so that `--cleanup` can remove it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestTarget {
    /// Disk.
    pub disk: String,
    /// Target path.
    pub path: PathBuf,
    /// The target is an image file this master target created (so it may delete it).
    pub created: bool,
}

/// Reverse replication set up by `reprotect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reprotect {
    /// The process server the on-premises agent ships to.
    pub process_server: String,
    /// The agent configurations written for it, one per machine.
    pub agent_configs: Vec<PathBuf>,
    /// When (ms since epoch).
    pub started_ms: u64,
}

/// A group's durable record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// Group name.
    pub group: String,
    /// Where the group stands.
    pub state: GroupState,
    /// The current or last failover.
    pub failover: Option<Failover>,
    /// Test failover targets not cleaned up yet.
    #[serde(default)]
    pub test_targets: Vec<TestTarget>,
    /// Reverse replication, once set up.
    pub reprotect: Option<Reprotect>,
    /// The agents that replicated the group, with their disks, as last seen: reprotect
    /// writes one agent configuration per machine.
    #[serde(default)]
    pub agents: BTreeMap<String, Vec<String>>,
    /// The last operator action that failed, and why.
    pub last_error: Option<String>,
}

impl GroupRecord {
    fn new(group: &str) -> Self {
        GroupRecord {
            group: group.to_string(),
            state: GroupState::Protected,
            failover: None,
            test_targets: Vec::new(),
            reprotect: None,
            agents: BTreeMap::new(),
            last_error: None,
        }
    }
}

/// Path of a group's record.
pub fn group_path(state_dir: &Path, group: &str) -> PathBuf {
    state_dir.join("groups").join(format!("{group}.state"))
}

/// Checks a group name before it names a file: the rules of disk ids.
pub fn validate_group(group: &str) -> Result<(), String> {
    boomerang_common::delta::validate_disk_id(group).map_err(|_| {
        format!(
            "group {group:?} must be 1-{} characters of A-Z a-z 0-9 . _ - and not start with a dot",
            boomerang_common::delta::MAX_DISK_ID
        )
    })
}

/// A group's record exists but cannot be read: damaged, or the file system refuses it.
/// The group is then *refused*: it may have failed back here (its disks live), so it is
/// treated as not protected: its disks stay paused, no operator action runs on it and
/// agents that check in for it are answered this error.
#[derive(Debug, thiserror::Error)]
#[error("group {group} is refused: its record {} {}; its disks stay paused and no action runs on it. Restore the file from a backup and restart boomerang-mt; remove it only if the group's disks here are replicas, not live disks (a group without a record is protected: replication into its disks resumes at the next start)", .path.display(), why(.cause))]
pub struct GroupRecordError {
    /// Group.
    pub group: String,
    /// The record's file.
    pub path: PathBuf,
    /// Why it cannot be read (worded in the message, not chained: its own advice
    /// does not fit a group record).
    pub cause: DurableError,
}

fn why(cause: &DurableError) -> String {
    match cause {
        DurableError::Damaged { .. } => {
            "is damaged (neither of its two slots passes its checksum)".to_string()
        }
        DurableError::Io { step, source, .. } => format!("cannot be read ({step}: {source})"),
        DurableError::Format { reason, .. } => format!("does not decode ({reason})"),
        other => format!("cannot be read ({other})"),
    }
}

/// Loads a group's record; a group never acted on has none and is protected. A record
/// that exists but cannot be read is an error, never a fresh protected record: a
/// damaged record of a failed-back group must not let its old source write the disks
/// that are live here now.
pub fn load_group(state_dir: &Path, group: &str) -> Result<GroupRecord, GroupRecordError> {
    if validate_group(group).is_err() {
        // No file can carry this name, so no action ever stored a record for it.
        return Ok(GroupRecord::new(group));
    }
    let path = group_path(state_dir, group);
    match StateFile::<GroupRecord>::open(&path) {
        Ok(st) => Ok(st.get().clone()),
        Err(DurableError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(GroupRecord::new(group))
        }
        Err(cause) => Err(GroupRecordError {
            group: group.to_string(),
            path,
            cause,
        }),
    }
}

/// An agent that checked in for a group.
#[derive(Debug, Clone)]
pub struct Member {
    /// Its disks.
    pub disks: Vec<String>,
    /// When it last checked in (ms since epoch).
    pub last_seen_ms: u64,
    /// It reported a finished shutdown.
    pub shut_down: bool,
}

#[derive(Debug)]
struct Barrier {
    disks: BTreeSet<String>,
    decided: watch::Sender<Option<(bool, String)>>,
    created_ms: u64,
}

#[derive(Debug, Default)]
struct Live {
    members: BTreeMap<String, Member>,
    /// `failover --point latest` asked the agents to shut down at this time.
    shutdown_requested_ms: Option<u64>,
    barriers: HashMap<u64, Barrier>,
}

/// Every group of this master target, as the daemon sees them.
#[derive(Debug)]
pub struct Groups {
    state_dir: PathBuf,
    live: Mutex<HashMap<String, Live>>,
    /// Serializes operator actions per master target (they are rare and long).
    pub action_lock: tokio::sync::Mutex<()>,
}

impl Groups {
    /// Opens the groups directory.
    pub fn open(state_dir: &Path) -> anyhow::Result<Self> {
        let dir = state_dir.join("groups");
        create_dir_durable(&dir).map_err(|e| anyhow::anyhow!("create {}: {e}", dir.display()))?;
        Ok(Groups {
            state_dir: state_dir.to_path_buf(),
            live: Mutex::new(HashMap::new()),
            action_lock: tokio::sync::Mutex::new(()),
        })
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The group's durable record; an error when it exists but cannot be read (the
    /// group is refused, see [`GroupRecordError`]).
    pub fn record(&self, group: &str) -> Result<GroupRecord, GroupRecordError> {
        load_group(&self.state_dir, group)
    }

    /// Stores `change` applied to the group's record, durably.
    pub fn update(
        &self,
        group: &str,
        change: impl FnOnce(&mut GroupRecord),
    ) -> anyhow::Result<GroupRecord> {
        validate_group(group).map_err(anyhow::Error::msg)?;
        let path = group_path(&self.state_dir, group);
        let mut st = StateFile::open_or_create(&path, GroupRecord::new(group))
            .map_err(|e| anyhow::anyhow!("open group record {}: {e}", path.display()))?;
        let mut rec = st.get().clone();
        change(&mut rec);
        st.store(rec.clone())
            .map_err(|e| anyhow::anyhow!("store group record {}: {e}", path.display()))?;
        Ok(rec)
    }

    /// An agent's check-in: remembers it and answers what the group wants of it; an
    /// error (for the agent, which keeps its data and checks in again) when the
    /// group's record cannot be read.
    pub fn check_in(
        &self,
        group: &str,
        agent: &str,
        disks: Vec<String>,
        shut_down: bool,
    ) -> Result<Action, GroupRecordError> {
        let state = self.record(group).map(|r| r.state);
        let mut live = self.live();
        let g = live.entry(group.to_string()).or_default();
        let m = g.members.entry(agent.to_string()).or_insert(Member {
            disks: Vec::new(),
            last_seen_ms: 0,
            shut_down: false,
        });
        m.disks = disks;
        m.last_seen_ms = now_ms();
        if shut_down && !m.shut_down {
            info!(group, agent, "agent shipped everything and shut down");
        }
        m.shut_down |= shut_down;
        Ok(match state? {
            GroupState::FailedBack | GroupState::Reprotecting => Action::Forget,
            _ if g.shutdown_requested_ms.is_some() => Action::ShutDown,
            _ => Action::Continue,
        })
    }

    /// Remembers the agents of `group` that checked in (their disks) in its record.
    pub fn remember_members(&self, group: &str) -> anyhow::Result<()> {
        let members = self.members(group);
        if members.is_empty() {
            return Ok(());
        }
        self.update(group, |r| {
            r.agents = members
                .into_iter()
                .map(|(agent, m)| (agent, m.disks))
                .collect();
        })?;
        Ok(())
    }

    /// The agents that checked in for `group`.
    pub fn members(&self, group: &str) -> BTreeMap<String, Member> {
        self.live()
            .get(group)
            .map(|g| g.members.clone())
            .unwrap_or_default()
    }

    /// Asks (or stops asking) the group's agents to shut down; returns the time asked.
    pub fn request_shutdown(&self, group: &str, on: bool) -> u64 {
        let now = now_ms();
        let mut live = self.live();
        let g = live.entry(group.to_string()).or_default();
        if on {
            for m in g.members.values_mut() {
                m.shut_down = false;
            }
            g.shutdown_requested_ms = Some(now);
        } else {
            g.shutdown_requested_ms = None;
        }
        now
    }

    /// Phase one of a multi-agent point: waits until every disk of the group (`all`)
    /// prepared `point_id`, or the deadline passed. Returns the decision and why.
    pub async fn prepare(
        &self,
        group: &str,
        point_id: u64,
        disks: Vec<String>,
        all: BTreeSet<String>,
        deadline_ms: u64,
    ) -> (bool, String) {
        let mut rx = {
            let mut live = self.live();
            let g = live.entry(group.to_string()).or_default();
            let now = now_ms();
            g.barriers
                .retain(|_, b| now.saturating_sub(b.created_ms) < 600_000);
            let b = g.barriers.entry(point_id).or_insert_with(|| Barrier {
                disks: BTreeSet::new(),
                decided: watch::Sender::new(None),
                created_ms: now,
            });
            if b.decided.borrow().is_none() {
                b.disks.extend(disks);
                if all.is_subset(&b.disks) {
                    info!(
                        group,
                        point_id,
                        disks = b.disks.len(),
                        "every disk of the group prepared: point committed"
                    );
                    b.decided.send_replace(Some((true, String::new())));
                }
            } else if let Some((false, why)) = b.decided.borrow().clone() {
                // Decided before this prepare arrived: say so, not the old reason.
                return (
                    false,
                    format!("this prepare of point {point_id} came after the point was abandoned ({why})"),
                );
            }
            b.decided.subscribe()
        };
        let wait = Duration::from_millis(deadline_ms.saturating_sub(now_ms()));
        let decided = tokio::time::timeout(wait, async {
            loop {
                if let Some(d) = rx.borrow_and_update().clone() {
                    return d;
                }
                if rx.changed().await.is_err() {
                    return (false, "the barrier went away".to_string());
                }
            }
        })
        .await;
        match decided {
            Ok(d) => d,
            Err(_) => {
                let mut live = self.live();
                let g = live.entry(group.to_string()).or_default();
                let Some(b) = g.barriers.get(&point_id) else {
                    return (false, "the barrier went away".into());
                };
                if let Some(d) = b.decided.borrow().clone() {
                    return d;
                }
                let missing: Vec<_> = all.difference(&b.disks).cloned().collect();
                let reason = format!(
                    "disks {} of group {group} did not prepare point {point_id} before the deadline: point abandoned",
                    missing.join(", ")
                );
                warn!(group, point_id, %reason, "multi-agent point abandoned");
                b.decided.send_replace(Some((false, reason.clone())));
                (false, reason)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_point_commits_when_every_disk_prepared_and_is_abandoned_otherwise() {
        let dir = tempfile::tempdir().expect("tempdir");
        let g = Arc::new(Groups::open(dir.path()).expect("open"));
        let all = set(&["a0", "b0"]);
        let deadline = now_ms() + 2000;
        let g2 = g.clone();
        let all2 = all.clone();
        let first =
            tokio::spawn(
                async move { g2.prepare("g", 7, vec!["a0".into()], all2, deadline).await },
            );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let second = g
            .prepare("g", 7, vec!["b0".into()], all.clone(), deadline)
            .await;
        assert!(second.0);
        assert!(first.await.expect("join").0, "both agents get commit");

        // One agent missing: abandoned at the deadline, the same answer for a late one.
        let t0 = std::time::Instant::now();
        let d = g
            .prepare("g", 8, vec!["a0".into()], all.clone(), now_ms() + 300)
            .await;
        assert!(!d.0 && d.1.contains("b0"), "{d:?}");
        assert!(t0.elapsed() >= Duration::from_millis(250));
        let late = g
            .prepare("g", 8, vec!["b0".into()], all, now_ms() + 300)
            .await;
        assert!(!late.0, "a late prepare gets the abandon decision");
        assert!(
            late.1.contains("came after"),
            "and is told it came late: {}",
            late.1
        );
    }

    #[test]
    fn check_in_answers_the_group_directive() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let g = Groups::open(dir.path())?;
        assert_eq!(
            g.check_in("g", "a", vec!["d".into()], false)?,
            Action::Continue
        );
        g.request_shutdown("g", true);
        assert_eq!(
            g.check_in("g", "a", vec!["d".into()], false)?,
            Action::ShutDown
        );
        assert!(!g.members("g")["a"].shut_down);
        g.check_in("g", "a", vec!["d".into()], true)?;
        assert!(g.members("g")["a"].shut_down);
        g.update("g", |r| r.state = GroupState::FailedBack)?;
        assert_eq!(g.check_in("g", "a", vec![], false)?, Action::Forget);
        assert_eq!(load_group(dir.path(), "g")?.state, GroupState::FailedBack);
        assert!(
            g.update("../etc", |_| {}).is_err(),
            "a group name never leaves the directory"
        );
        Ok(())
    }
}
