//! The master target's network side: accepts process servers (and nobody else), and
//! answers each request stream: disk announcements, batches, tags and manifests.

use std::sync::Arc;

use boomerang_common::config::Shutdown;
use boomerang_common::message::{ErrorCode, Message, Role};
use boomerang_common::transport;
use tracing::{debug, info, warn};

use crate::config::MtConfig;
use crate::disk::{verify_batch, Outcome};
use crate::disks::Disks;

/// Runs the master target until `shutdown` flips. Prints `listening on ADDR` on stdout
/// once ready, for scripts and tests.
pub async fn run(config: MtConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    use anyhow::Context as _;
    config
        .validate()
        .map_err(anyhow::Error::msg)
        .context("invalid configuration")?;
    let disks = Arc::new(
        Disks::open(&config.state_dir, config.replicas.clone())
            .context("opening the state directory")?,
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
    let handler = move |msg: Message, _frame: bytes::Bytes| {
        let disks = disks.clone();
        async move { handle(&disks, msg).await }
    };
    transport::serve(&endpoint, &[Role::Ps], hello, shutdown, handler).await;
    info!("shutting down");
    endpoint.close(
        transport::CLOSE_SHUTDOWN.into(),
        b"master target shutting down",
    );
    endpoint.wait_idle().await;
    Ok(())
}

/// Answers one request.
pub async fn handle(disks: &Arc<Disks>, msg: Message) -> Message {
    match msg {
        Message::OpenDisk { disk, size, group } => {
            let d = disks.clone();
            blocking(move || d.open_disk(&disk, size, &group))
                .await
                .map(Message::DiskState)
                .unwrap_or_else(|e| Message::error(ErrorCode::UnknownDisk, e))
        }
        Message::ManifestRequest {
            disk,
            offset,
            len,
            chunk_size,
        } => {
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
                    disk.count_integrity_failure();
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
                        disk: id,
                        generation,
                        seq,
                    }
                }
                Err(e) => {
                    warn!(error = %e, "apply failed");
                    Message::error(ErrorCode::Unavailable, e.to_string())
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
                    disk: tag.disk,
                    generation: tag.generation,
                    seq: tag.seq,
                },
                Err(e) => Message::error(ErrorCode::Unavailable, e.to_string()),
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
