//! The master target's network side: accepts process servers (and nobody else), and
//! answers each request stream: disk announcements, batches, tags, manifests, agents'
//! check-ins and multi-agent point prepares. Beside it run the control socket for the
//! operator's commands and the retention executor.

use std::sync::Arc;

use boomerang_common::config::Shutdown;
use boomerang_common::message::{Action, ErrorCode, Message, Role};
use boomerang_common::transport;
use tracing::{debug, error, info, warn};

use crate::config::MtConfig;
use crate::disk::{verify_batch, ApplyError, Disk, Outcome};
use crate::disks::Disks;
use crate::failover::Site;
use crate::groups::{GroupState, Groups};
use std::time::Duration;

/// Runs the master target until `shutdown` flips. Prints `listening on ADDR` on stdout
/// once ready, for scripts and tests.
pub async fn run(config: MtConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    use anyhow::Context as _;
    config
        .validate()
        .map_err(anyhow::Error::msg)
        .context("invalid configuration")?;
    let _lock = boomerang_common::durable::lock_dir(&config.state_dir, "master target")?;
    let disks = Arc::new(
        Disks::open(
            &config.state_dir,
            &config.retention_dir(),
            config.journal_segment_mib << 20,
            config.replicas.clone(),
        )
        .context("opening the state directory")?,
    );
    let groups = Arc::new(Groups::open(&config.state_dir)?);
    let site = Arc::new(Site {
        disks,
        groups,
        drain_timeout: Duration::from_secs(config.drain_timeout_secs),
    });
    site.resume().await;
    let control = crate::control::serve(&config.state_dir, site.clone()).await?;
    let pruner = crate::prune::spawn(
        site.clone(),
        config.retention.clone(),
        Duration::from_secs(config.prune_interval_secs),
    );
    let endpoint = transport::server_endpoint(config.listen, &config.tls)
        .with_context(|| format!("starting QUIC on {}", config.listen))?;
    let addr = endpoint.local_addr().context("reading the bound address")?;
    println!("listening on {addr}");
    info!(%addr, name = %config.name, "master target ready");
    let hello = Message::Hello {
        role: Role::Mt,
        name: config.name.clone(),
        software: env!("CARGO_PKG_VERSION").into(),
    };
    let disks = site.disks.clone();
    let handler = move |msg: Message, _frame: bytes::Bytes| {
        let site = site.clone();
        async move { handle(&site, msg).await }
    };
    let failed = tokio::select! {
        () = transport::serve(&endpoint, &[Role::Ps], hello, shutdown, handler) => None,
        cause = disks.failed() => Some(cause),
    };
    if let Some(cause) = &failed {
        error!(%cause, "stopping: a restart recovers from what is durable (nothing unsynced is trusted)");
    }
    info!("shutting down");
    control.abort();
    pruner.abort();
    let _ = std::fs::remove_file(crate::control::socket_path(&config.state_dir));
    endpoint.close(
        transport::CLOSE_SHUTDOWN.into(),
        b"master target shutting down",
    );
    endpoint.wait_idle().await;
    match failed {
        Some(cause) => Err(anyhow::anyhow!(
            "{cause}; stopped so that a restart recovers from what is durable: check the storage, then start the master target again"
        )),
        None => Ok(()),
    }
}

/// The answer to a record `disk` could not apply: `Gone` when it never will (the
/// disk is paused because its group was committed here: its disks are live, or
/// replicate the other way), so the process server drops it instead of holding it for
/// ever; else `Unavailable` (kept and sent again: a pending failover may be cancelled,
/// a full journal pruned).
fn refusal(site: &Site, disk: &Disk, e: &ApplyError) -> Message {
    let committed = matches!(e, ApplyError::Paused { .. })
        && site
            .groups
            .record(&disk.record().group)
            .is_ok_and(|g| matches!(g.state, GroupState::FailedBack | GroupState::Reprotecting));
    if committed {
        Message::error(
            ErrorCode::Gone,
            format!("{e}: the group was committed here; its records are no longer wanted"),
        )
    } else {
        Message::error(ErrorCode::Unavailable, e.to_string())
    }
}

/// Answers one request.
pub async fn handle(site: &Arc<Site>, msg: Message) -> Message {
    let disks = &site.disks;
    match msg {
        Message::OpenDisk { disk, size, group } => {
            if let Some(reason) = disks.get(&disk).ok().and_then(|d| d.paused()) {
                return Message::error(ErrorCode::UnknownDisk, reason);
            }
            let d = disks.clone();
            blocking(move || d.open_disk(&disk, size, &group))
                .await
                .map(Message::DiskState)
                .unwrap_or_else(|e| Message::error(ErrorCode::UnknownDisk, e))
        }
        Message::ManifestRequest {
            disk,
            generation,
            offset,
            len,
            chunk_size,
        } => {
            match disks.get(&disk) {
                Ok(d) => {
                    if let Err(e) = d.ready_for_manifest(generation).await {
                        return Message::error(ErrorCode::Unavailable, e.to_string());
                    }
                }
                Err(e) => return Message::error(ErrorCode::UnknownDisk, e.to_string()),
            }
            let d = disks.clone();
            let name = disk.clone();
            blocking(move || d.manifest(&name, offset, len, chunk_size))
                .await
                .map(|hashes| Message::ManifestResponse {
                    disk,
                    offset,
                    chunk_size,
                    hashes,
                })
                .unwrap_or_else(|e| Message::error(ErrorCode::UnknownDisk, e))
        }
        Message::Batch(batch) => {
            let disk = match disks.get(&batch.disk) {
                Ok(d) => d,
                Err(e) => return Message::error(ErrorCode::UnknownDisk, e.to_string()),
            };
            let (generation, seq, id) = (batch.generation, batch.seq, batch.disk.clone());
            let size = disk.replica().size();
            let verified = match tokio::task::spawn_blocking(move || verify_batch(&batch, size))
                .await
            {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    disk.count_integrity_failure(generation);
                    warn!(disk = %id, generation, seq, error = %e, "batch refused: integrity check failed; nothing written, the sender will resend");
                    return Message::error(ErrorCode::IntegrityFailure, e.to_string());
                }
                Err(e) => return Message::error(ErrorCode::Internal, e.to_string()),
            };
            match disk.apply_batch(generation, seq, verified).await {
                Ok(outcome) => {
                    if outcome != Outcome::Applied {
                        debug!(disk = %id, generation, seq, ?outcome, "batch not applied again");
                    }
                    Message::DurableAck {
                        seq: disk.acked_through(generation, seq),
                        disk: id,
                        generation,
                    }
                }
                Err(e) => {
                    warn!(error = %e, "apply failed");
                    refusal(site, &disk, &e)
                }
            }
        }
        Message::Tag(tag) => {
            let disk = match disks.get(&tag.disk) {
                Ok(d) => d,
                Err(e) => return Message::error(ErrorCode::UnknownDisk, e.to_string()),
            };
            match disk.apply_tag(&tag).await {
                Ok(_) => Message::DurableAck {
                    seq: disk.acked_through(tag.generation, tag.seq),
                    disk: tag.disk,
                    generation: tag.generation,
                },
                Err(e) => refusal(site, &disk, &e),
            }
        }
        Message::Control {
            group,
            agent,
            disks: agent_disks,
            shut_down,
        } => {
            let resync = agent_disks.iter().any(|d| {
                disks
                    .get(d)
                    .is_ok_and(|d| d.paused().is_none() && d.record().resync_required)
            });
            let action = match site.groups.check_in(&group, &agent, agent_disks, shut_down) {
                Ok(Action::Continue) if resync => Action::Resync,
                Ok(action) => action,
                // The agent keeps its data and checks in again; the disks stay paused.
                Err(e) => return Message::error(ErrorCode::Unavailable, e.to_string()),
            };
            Message::Directive { action }
        }
        Message::PointPrepare {
            group,
            agent,
            point_id,
            kind,
            disks: agent_disks,
            deadline_ms,
        } => {
            let all = disks
                .all()
                .iter()
                .map(|d| d.record())
                .filter(|r| r.group == group)
                .map(|r| r.disk)
                .collect();
            debug!(group, agent, point_id, ?kind, "point prepare");
            // Never hold a stream longer than a minute, whatever the agent asked.
            let deadline_ms = deadline_ms.min(boomerang_common::config::now_ms() + 60_000);
            let (commit, reason) = site
                .groups
                .prepare(&group, point_id, agent_disks, all, deadline_ms)
                .await;
            Message::PointDecision {
                point_id,
                commit,
                reason,
            }
        }
        other => Message::error(
            ErrorCode::BadRequest,
            format!("a master target does not take {} messages", other.name()),
        ),
    }
}

async fn blocking<T: Send + 'static, E: std::fmt::Display + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(format!("internal task failed: {e}")),
    }
}
