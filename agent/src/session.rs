//! The agent's session with the master target in continuous tracking (`track`, both
//! sources), kept apart from the drivers that ship the changes: check-ins, the
//! failover shutdown, coordinated points and the point schedule.
//!
//! **Check-ins.** Every `control_interval_secs` the agent sends
//! [`Message::Control`] (its group, name and disks) through the process server and
//! gets the group's [`Action`]. A check-in that gets no directive (process server or
//! master target unreachable, an older master target answering an error) is logged
//! once and counts as `Continue`: replication never stops because control is down.
//! The tracking loops ([`crate::track_trace`], [`crate::track_intercept`]) read the latest
//! directive from [`Directives`] at every tick:
//! - `ShutDown` (failover to `latest`): no more interval points; one final
//!   crash-consistent point the way the source takes one, shipped until the process
//!   server holds every record up to its tag; then the operator's shutdown hook
//!   ([`Syncer::run_shutdown_hook`]); then the usual clean stop, and
//!   `Control { shut_down: true }` ([`Syncer::report_shut_down`]). The command exits 0
//!   with [`TrackStop::ShutDown`] in its report.
//! - `Forget` (failover committed): tracking stops without shipping more, the disks'
//!   state is deleted ([`forget_disk_state`]) so a later start begins a new generation
//!   with a full scan, and the command exits 0 with [`TrackStop::Forgotten`].
//!
//! **Coordinated points** (`coordinated_points`, several agents in one group). The
//! interval points fall on wall-clock multiples of the interval ([`PointSchedule`]);
//! the multiple is the point id ([`slot_id`]), so every agent of the group cuts the
//! same id. With writes paused, the agent sends [`Message::PointPrepare`] and waits
//! at most `point_deadline_ms` (plus a margin) for the master target's
//! [`Message::PointDecision`] ([`Syncer::prepare_point`]): on commit it tags and
//! resumes, otherwise it resumes without a tag (what it captured is still shipped)
//! and counts the point as abandoned.

use std::path::Path;
use std::time::{Duration, Instant};

use boomerang_common::config::{now_ms, Shutdown};
use boomerang_common::message::{Action, Message, TagKind};
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::config::AgentConfig;
use crate::link::PsLink;
use crate::sync::Syncer;

/// Longest a check-in waits for its answer.
const CHECK_IN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the final shutdown report is tried before giving up.
const SHUT_DOWN_ATTEMPTS: u32 = 10;
/// Added to the point deadline for the decision's trip back.
pub(crate) const DECISION_MARGIN: Duration = Duration::from_millis(500);

/// Why a tracking session ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrackStop {
    /// SIGTERM or SIGINT.
    #[default]
    Signal,
    /// The master target asked the group to shut down for a failover: the final point
    /// is durable at the process server, the shutdown hook ran.
    ShutDown,
    /// The group's failover was committed: replication stopped and the disks' state
    /// was deleted.
    Forgotten,
}

/// The group's answer to a coordinated point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Every disk of the group is paused at the point: tag it.
    Commit,
    /// Resume without a tag, for this reason.
    Abandon(String),
}

/// The latest directive of the group, kept fresh by a task checking in every
/// `control_interval_secs`; the task stops when this is dropped.
#[derive(Debug)]
pub(crate) struct Directives {
    rx: watch::Receiver<Action>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Directives {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Directives {
    /// The latest directive.
    pub(crate) fn current(&self) -> Action {
        *self.rx.borrow()
    }

    /// Returns once the directive changed (never, once the task is gone).
    pub(crate) async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// What a tracking loop does at a tick, as the session sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tick {
    /// Go on: ship what changed, cut the points that are due.
    Go,
    /// The master target rolled the replica back (or lost the stream): resync every
    /// disk in a new generation, once per request.
    Resync,
    /// End the loop.
    Stop(TrackStop),
}

/// Paces a tracking loop (both sources): waits for the next tick, a signal or a new
/// directive, and says what to do. A resync asked for is done once; the master target
/// answers Continue again once it sees the new generation.
#[derive(Debug)]
pub(crate) struct Ticker {
    shutdown: Shutdown,
    resynced: bool,
}

impl Ticker {
    /// A ticker for a loop starting now; a Resync already in force was done by the
    /// start (a rolled-back replica made it begin a new generation).
    pub(crate) fn new(shutdown: Shutdown, directives: &Directives) -> Ticker {
        Ticker {
            shutdown,
            resynced: directives.current() == Action::Resync,
        }
    }

    /// Waits at most `sleep` (less on a signal or a new directive) and says what to do.
    pub(crate) async fn tick(&mut self, directives: &mut Directives, sleep: Duration) -> Tick {
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = self.shutdown.changed() => {}
            () = directives.changed() => {}
        }
        if *self.shutdown.borrow() {
            return Tick::Stop(TrackStop::Signal);
        }
        match directives.current() {
            Action::Continue => {
                self.resynced = false;
                Tick::Go
            }
            Action::Resync if !self.resynced => {
                self.resynced = true;
                Tick::Resync
            }
            Action::Resync => Tick::Go,
            Action::ShutDown => Tick::Stop(TrackStop::ShutDown),
            Action::Forget => Tick::Stop(TrackStop::Forgotten),
        }
    }
}

/// Logs failed check-ins once per outage.
#[derive(Debug, Default)]
struct CheckInLog {
    failing: bool,
}

impl CheckInLog {
    fn answered(&mut self, group: &str) {
        if self.failing {
            info!(%group, "the master target answers check-ins again");
        }
        self.failing = false;
    }

    fn failed(&mut self, group: &str, why: &str) {
        if self.failing {
            debug!(%group, error = %why, "check-in failed");
        } else {
            warn!(%group, error = %why, "cannot check in with the master target; replication goes on and check-ins are retried");
            self.failing = true;
        }
    }
}

/// One check-in: the group's directive, or why there is none.
async fn check_in(link: &PsLink, frame: Bytes, timeout: Duration) -> Result<Action, String> {
    match link.request_once(frame, timeout).await {
        Ok(Message::Directive { action }) => Ok(action),
        Ok(Message::Error { reason, .. }) => Err(format!("the check-in was not taken: {reason}")),
        Ok(other) => Err(format!("unexpected answer {} to a check-in", other.name())),
        Err(e) => Err(e.to_string()),
    }
}

fn log_directive(group: &str, action: Action) {
    match action {
        Action::Continue => info!(%group, "the master target's directive: continue replicating"),
        Action::ShutDown => {
            warn!(%group, "the master target is failing the group over: shutting down after a final point")
        }
        Action::Forget => {
            warn!(%group, "the master target committed the group's failover: stopping replication")
        }
        Action::Resync => {
            warn!(%group, "the master target asks for a new generation (a replica was rolled back, or the stream has a record it will never get): resync by scan")
        }
    }
}

/// Returns once `shutdown` flips (never, if its sender is gone).
pub(crate) async fn signalled(shutdown: &mut Shutdown) {
    if shutdown.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl Syncer {
    fn control_frame(&self, shut_down: bool) -> Bytes {
        Message::Control {
            group: self.config.group(),
            agent: self.config.name.clone(),
            disks: self.config.disk_ids(),
            shut_down,
        }
        .encode()
    }

    /// Checks in once now, then every `control_interval_secs` on a task of its own.
    /// Failures count as `Continue` and are logged once per outage.
    pub(crate) async fn start_check_ins(&self) -> Directives {
        let group = self.config.group();
        let frame = self.control_frame(false);
        let mut log = CheckInLog::default();
        let first = match check_in(&self.link, frame.clone(), CHECK_IN_TIMEOUT).await {
            Ok(action) => {
                if action != Action::Continue {
                    log_directive(&group, action);
                }
                action
            }
            Err(e) => {
                log.failed(&group, &e);
                Action::Continue
            }
        };
        let (tx, rx) = watch::channel(first);
        let link = self.link.clone();
        let every = Duration::from_secs_f64(self.config.control_interval_secs);
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match check_in(&link, frame.clone(), CHECK_IN_TIMEOUT.max(every)).await {
                    Ok(action) => {
                        log.answered(&group);
                        tx.send_if_modified(|current| {
                            if *current == action {
                                return false;
                            }
                            log_directive(&group, action);
                            *current = action;
                            true
                        });
                    }
                    Err(e) => log.failed(&group, &e),
                }
            }
        });
        Directives { rx, task }
    }

    /// Tells the master target the agent has shut down (`Control { shut_down: true }`),
    /// trying a few times until a directive answers; returns whether one did.
    pub(crate) async fn report_shut_down(&self) -> bool {
        let group = self.config.group();
        let frame = self.control_frame(true);
        for attempt in 1..=SHUT_DOWN_ATTEMPTS {
            match check_in(&self.link, frame.clone(), CHECK_IN_TIMEOUT).await {
                Ok(action) => {
                    info!(%group, ?action, "reported to the master target: this agent shipped its final point, ran its shutdown hook and stopped replicating");
                    return true;
                }
                Err(e) => {
                    warn!(%group, attempt, of = SHUT_DOWN_ATTEMPTS, error = %e, "cannot report the shutdown to the master target yet");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        error!(%group, "the master target never heard that this agent shut down: the failover waits for it; the workload is stopped and the final point is durable at the process server");
        false
    }

    /// Runs the operator's shutdown hook (stops the workload). Without one, logs that
    /// the operator must stop the workload.
    pub(crate) async fn run_shutdown_hook(&self) -> anyhow::Result<()> {
        let Some(hook) = self.config.shutdown_hook.clone() else {
            warn!(group = %self.config.group(), "no shutdown hook configured: the operator must stop the workload now (writes after the final point are not part of the failover)");
            return Ok(());
        };
        let timeout = Duration::from_secs_f64(self.config.shutdown_hook_timeout_secs);
        info!(%hook, "running the shutdown hook");
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            crate::freeze::run_hook("shutdown", &hook, timeout)
        })
        .await
        .map_err(|e| anyhow::anyhow!("the shutdown hook's thread failed: {e}"))?;
        match result {
            Ok(()) => {
                info!(
                    secs = started.elapsed().as_secs_f64(),
                    "shutdown hook done: the workload is stopped"
                );
                Ok(())
            }
            Err(e) => Err(anyhow::anyhow!(
                "{e}; the workload may still be running: stop it, then start the agent again to finish the shutdown"
            )),
        }
    }

    /// Phase one of a coordinated point: tells the master target this agent's writes
    /// are paused at `point_id` and waits for the group's decision, at most
    /// `point_deadline_ms` plus a margin (less on a signal).
    pub(crate) async fn prepare_point(&self, point_id: u64, kind: TagKind) -> Decision {
        let wait = Duration::from_millis(self.config.point_deadline_ms);
        let msg = Message::PointPrepare {
            group: self.config.group(),
            agent: self.config.name.clone(),
            point_id,
            kind,
            disks: self.config.disk_ids(),
            deadline_ms: now_ms().saturating_add(self.config.point_deadline_ms),
        };
        let mut shutdown = self.shutdown.clone();
        let answer = tokio::select! {
            a = self.link.request_once(msg.encode(), wait + DECISION_MARGIN) => a,
            () = signalled(&mut shutdown) => return Decision::Abandon("stopping on a signal".into()),
        };
        match answer {
            Ok(Message::PointDecision {
                point_id: id,
                commit,
                reason,
            }) if id == point_id => {
                if commit {
                    Decision::Commit
                } else {
                    Decision::Abandon(reason)
                }
            }
            Ok(Message::PointDecision { point_id: id, .. }) => {
                Decision::Abandon(format!("the decision that came was for point {id}"))
            }
            Ok(Message::Error { reason, .. }) => {
                Decision::Abandon(format!("the prepare was not taken: {reason}"))
            }
            Ok(other) => Decision::Abandon(format!("unexpected answer {}", other.name())),
            Err(e) => Decision::Abandon(e.to_string()),
        }
    }
}

/// Deletes what the agent keeps per disk in `state_dir` (state file, intercept
/// journal, dirty bitmap, a trace instance handed over to the next start, found
/// under `tracefs` or the mounted tracefs) for `disks`, so their next start is a new
/// generation with a full scan. Missing files are fine.
pub(crate) fn forget_disk_state(
    state_dir: &Path,
    disks: &[String],
    tracefs: Option<&Path>,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let gone_ok = |r: std::io::Result<()>, what: &Path| match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("deleting {}", what.display()))
        }
        _ => Ok(()),
    };
    for disk in disks {
        let journal = state_dir.join("journal").join(disk);
        gone_ok(std::fs::remove_dir_all(&journal), &journal)?;
        let bitmap = state_dir.join(format!("{disk}.bitmap"));
        gone_ok(std::fs::remove_file(&bitmap), &bitmap)?;
        // Last: while the state file is there, the disk is still known.
        let state = crate::state::path(state_dir, disk);
        // An unreadable state names no instance; one left behind is replaced by the
        // next tracer of its device.
        let handover =
            boomerang_common::durable::StateFile::<crate::state::DiskProgress>::open(&state)
                .ok()
                .and_then(|s| s.get().trace_handover.clone());
        if let Some(h) = handover {
            crate::trace::discard_handover(&h, tracefs);
        }
        gone_ok(std::fs::remove_file(&state), &state)?;
    }
    if state_dir.exists() {
        boomerang_common::durable::fsync_dir(state_dir)
            .with_context(|| format!("syncing {}", state_dir.display()))?;
    }
    Ok(())
}

/// The id of the coordinated point in the slot holding `now_ms`: the start of the
/// slot, a multiple of `interval_ms`. Agents whose clocks agree pick the same id.
pub(crate) fn slot_id(now_ms: u64, interval_ms: u64) -> u64 {
    let width = interval_ms.max(1);
    now_ms / width * width
}

/// Start of the slot after the one holding `now_ms`.
fn next_slot(now_ms: u64, interval_ms: u64) -> u64 {
    slot_id(now_ms, interval_ms).saturating_add(interval_ms.max(1))
}

/// An interval point that fell due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DuePoint {
    /// Its kind.
    pub(crate) kind: TagKind,
    /// Coordinated points: the group's point id (the slot).
    pub(crate) slot: Option<u64>,
}

/// When the interval points of a tracking loop fall due.
#[derive(Debug)]
pub(crate) enum PointSchedule {
    /// Each agent on its own: every interval from start (monotonic clock).
    Own {
        crash_every: Duration,
        app_every: Duration,
        next_crash: Instant,
        next_app: Instant,
    },
    /// Coordinated: at wall-clock multiples of the intervals (ms since the epoch).
    Slots {
        crash_ms: u64,
        app_ms: u64,
        next_crash: u64,
        next_app: u64,
    },
}

impl PointSchedule {
    /// The schedule of `config`; `crash_now`: the first crash-consistent point is due
    /// at once (uncoordinated only; coordinated points wait for the next slot).
    pub(crate) fn new(config: &AgentConfig, crash_now: bool) -> Self {
        if config.coordinated_points {
            let (crash_ms, app_ms) = (
                config.interval_ms(TagKind::CrashConsistent),
                config.interval_ms(TagKind::AppConsistent),
            );
            let now = now_ms();
            PointSchedule::Slots {
                crash_ms,
                app_ms,
                next_crash: next_slot(now, crash_ms),
                next_app: next_slot(now, app_ms),
            }
        } else {
            let crash_every = Duration::from_secs_f64(config.crash_interval_secs);
            let app_every = Duration::from_secs_f64(config.app_interval_secs);
            let now = Instant::now();
            PointSchedule::Own {
                crash_every,
                app_every,
                next_crash: if crash_now { now } else { now + crash_every },
                next_app: now + app_every,
            }
        }
    }

    /// Makes a crash-consistent point due at once (after a resync), unless the points
    /// are coordinated: those only fall on their slots.
    pub(crate) fn crash_now(&mut self) {
        if let PointSchedule::Own { next_crash, .. } = self {
            *next_crash = Instant::now();
        }
    }

    /// How long the loop may sleep before its next tick.
    pub(crate) fn sleep(&self, ship_every: Duration) -> Duration {
        self.sleep_at(now_ms(), ship_every)
    }

    fn sleep_at(&self, now_ms: u64, ship_every: Duration) -> Duration {
        match self {
            PointSchedule::Own { .. } => ship_every,
            PointSchedule::Slots {
                next_crash,
                next_app,
                ..
            } => {
                let until = (*next_crash).min(*next_app).saturating_sub(now_ms).max(1);
                ship_every.min(Duration::from_millis(until))
            }
        }
    }

    /// The point due now, if any; an app-consistent one takes the place of a
    /// crash-consistent one due at the same time.
    pub(crate) fn due(&mut self) -> Option<DuePoint> {
        self.due_at(Instant::now(), now_ms())
    }

    fn due_at(&mut self, now: Instant, wall_ms: u64) -> Option<DuePoint> {
        match self {
            PointSchedule::Own {
                crash_every,
                app_every,
                next_crash,
                next_app,
            } => {
                if now >= *next_app {
                    *next_app = now + *app_every;
                    *next_crash = now + *crash_every;
                    Some(DuePoint {
                        kind: TagKind::AppConsistent,
                        slot: None,
                    })
                } else if now >= *next_crash {
                    *next_crash = now + *crash_every;
                    Some(DuePoint {
                        kind: TagKind::CrashConsistent,
                        slot: None,
                    })
                } else {
                    None
                }
            }
            PointSchedule::Slots {
                crash_ms,
                app_ms,
                next_crash,
                next_app,
            } => {
                // A clock set back by more than a slot would stall the points.
                if *next_crash > wall_ms.saturating_add(*crash_ms) {
                    *next_crash = next_slot(wall_ms, *crash_ms);
                }
                if *next_app > wall_ms.saturating_add(*app_ms) {
                    *next_app = next_slot(wall_ms, *app_ms);
                }
                if wall_ms >= *next_app {
                    *next_app = next_slot(wall_ms, *app_ms);
                    *next_crash = next_slot(wall_ms, *crash_ms);
                    Some(DuePoint {
                        kind: TagKind::AppConsistent,
                        slot: Some(slot_id(wall_ms, *app_ms)),
                    })
                } else if wall_ms >= *next_crash {
                    *next_crash = next_slot(wall_ms, *crash_ms);
                    Some(DuePoint {
                        kind: TagKind::CrashConsistent,
                        slot: Some(slot_id(wall_ms, *crash_ms)),
                    })
                } else {
                    None
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slot_is_the_start_of_the_interval_holding_now() {
        assert_eq!(slot_id(12_345, 5_000), 10_000);
        assert_eq!(slot_id(10_000, 5_000), 10_000);
        assert_eq!(slot_id(9_999, 5_000), 5_000);
        assert_eq!(slot_id(7, 0), 7, "a zero width is taken as 1 ms");
        assert_eq!(next_slot(12_345, 5_000), 15_000);
        assert_eq!(next_slot(15_000, 5_000), 20_000);
        // Two agents firing at different moments of the same slot agree.
        assert_eq!(slot_id(1_700_000_100_004, 300_000), 1_700_000_100_000);
        assert_eq!(slot_id(1_700_000_399_000, 300_000), 1_700_000_100_000);
    }

    fn slots(crash_ms: u64, app_ms: u64, at: u64) -> PointSchedule {
        PointSchedule::Slots {
            crash_ms,
            app_ms,
            next_crash: next_slot(at, crash_ms),
            next_app: next_slot(at, app_ms),
        }
    }

    #[test]
    fn coordinated_points_fall_on_slots_and_app_wins_a_shared_slot() {
        let t = Instant::now();
        let mut s = slots(5_000, 20_000, 101_234);
        assert_eq!(s.due_at(t, 104_999), None);
        assert_eq!(
            s.sleep_at(103_000, Duration::from_secs(1)),
            Duration::from_secs(1)
        );
        assert_eq!(
            s.sleep_at(104_700, Duration::from_secs(1)),
            Duration::from_millis(300)
        );
        assert_eq!(
            s.due_at(t, 105_020),
            Some(DuePoint {
                kind: TagKind::CrashConsistent,
                slot: Some(105_000)
            })
        );
        assert_eq!(s.due_at(t, 105_900), None, "one point per slot");
        // Late by more than a slot: the slot the tick falls in, nothing owed.
        assert_eq!(
            s.due_at(t, 116_500),
            Some(DuePoint {
                kind: TagKind::CrashConsistent,
                slot: Some(115_000)
            })
        );
        assert_eq!(
            s.due_at(t, 120_003),
            Some(DuePoint {
                kind: TagKind::AppConsistent,
                slot: Some(120_000)
            })
        );
        assert_eq!(
            s.due_at(t, 121_000),
            None,
            "the crash point of the app slot is not taken twice"
        );
        assert_eq!(
            s.due_at(t, 125_000),
            Some(DuePoint {
                kind: TagKind::CrashConsistent,
                slot: Some(125_000)
            })
        );
    }

    #[test]
    fn a_clock_set_back_does_not_stall_coordinated_points() {
        let t = Instant::now();
        let mut s = slots(5_000, 60_000, 1_000_000);
        assert_eq!(s.due_at(t, 400_100), None);
        assert_eq!(
            s.due_at(t, 405_000),
            Some(DuePoint {
                kind: TagKind::CrashConsistent,
                slot: Some(405_000)
            })
        );
    }

    #[test]
    fn uncoordinated_points_keep_their_own_intervals() {
        let config = AgentConfig {
            crash_interval_secs: 5.0,
            app_interval_secs: 20.0,
            ..AgentConfig::default()
        };
        let mut s = PointSchedule::new(&config, true);
        let t = Instant::now();
        assert_eq!(
            s.due_at(t, 0),
            Some(DuePoint {
                kind: TagKind::CrashConsistent,
                slot: None
            })
        );
        assert_eq!(s.due_at(t + Duration::from_secs(4), 0), None);
        assert_eq!(
            s.sleep_at(0, Duration::from_millis(700)),
            Duration::from_millis(700)
        );
        assert_eq!(
            s.due_at(t + Duration::from_secs(21), 0).map(|p| p.kind),
            Some(TagKind::AppConsistent)
        );
        assert_eq!(s.due_at(t + Duration::from_secs(22), 0), None);
        s.crash_now();
        assert_eq!(
            s.due_at(Instant::now(), 0).map(|p| p.kind),
            Some(TagKind::CrashConsistent)
        );
    }

    #[test]
    fn forgetting_removes_a_handed_over_trace_instance() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        // A stand-in tracefs: an instance is a directory under instances/.
        let tracefs = d.join("tracefs");
        std::fs::create_dir_all(tracefs.join("instances/boomerang-7-3"))?;
        std::fs::create_dir_all(tracefs.join("instances/boomerang-7-4"))?;
        let mut progress = crate::state::DiskProgress::new("d0");
        progress.trace_handover = Some(crate::trace::Handover {
            instance: "boomerang-7-3".into(),
            device: (7, 3),
            filter: "dev == 7340035".into(),
            buffer_size_kb: 4096,
            buffer_size_read: "4096".into(),
            clock: "counter".into(),
            marker: 1,
            counters: Vec::new(),
            time_ms: 1,
        });
        boomerang_common::durable::StateFile::open_or_create(
            &crate::state::path(d, "d0"),
            progress,
        )?;
        forget_disk_state(d, &["d0".to_string()], Some(&tracefs))?;
        assert!(!crate::state::path(d, "d0").exists());
        assert!(!tracefs.join("instances/boomerang-7-3").exists());
        assert!(
            tracefs.join("instances/boomerang-7-4").exists(),
            "other devices' instances are kept"
        );
        Ok(())
    }

    #[test]
    fn forgetting_deletes_every_kind_of_disk_state() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        std::fs::create_dir_all(d.join("journal/d0/journal"))?;
        std::fs::write(d.join("journal/d0/journal/seg-0000000000000001.jnl"), b"x")?;
        std::fs::write(d.join("d0.bitmap"), b"x")?;
        std::fs::write(d.join("d0.state"), b"x")?;
        std::fs::write(d.join("other.state"), b"x")?;
        forget_disk_state(d, &["d0".to_string(), "d1".to_string()], None)?;
        assert!(!d.join("journal/d0").exists());
        assert!(!d.join("d0.bitmap").exists());
        assert!(!d.join("d0.state").exists());
        assert!(d.join("other.state").exists(), "other disks are kept");
        Ok(())
    }
}
