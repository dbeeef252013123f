//! The process server's agent side: accepts agents (and nobody else), spools their
//! batches and tags durably before acknowledging, and relays their requests for the
//! master target (disk announcements, manifests, group check-ins and point
//! barriers) to it, answering with its answer.

use anyhow::Context as _;
use boomerang_common::config::Shutdown;
use boomerang_common::message::{ErrorCode, Message, Role};
use boomerang_common::transport;
use tracing::{error, info, warn};

use crate::config::PsConfig;
use crate::forward::{forward_loop, MasterLink};
use crate::spool::Spool;

/// Runs the process server until `shutdown` flips. Prints `listening on ADDR` on
/// stdout once ready.
pub async fn run(config: PsConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    config
        .validate()
        .map_err(anyhow::Error::msg)
        .context("invalid configuration")?;
    let _lock = boomerang_common::durable::lock_dir(&config.spool_dir, "process server")?;
    let spool = Spool::open(&config.spool_dir, config.spool_max_mib << 20)
        .with_context(|| format!("opening the spool in {}", config.spool_dir.display()))?;
    let endpoint = transport::server_endpoint(config.listen, &config.tls)
        .with_context(|| format!("starting QUIC on {}", config.listen))?;
    let addr = endpoint.local_addr().context("reading the bound address")?;
    let hello = Message::Hello {
        role: Role::Ps,
        name: config.name.clone(),
        software: env!("CARGO_PKG_VERSION").into(),
    };
    let link = MasterLink::new(endpoint.clone(), config.master_target, hello.clone());
    let forwarder = tokio::spawn(forward_loop(
        spool.clone(),
        link.clone(),
        config.forward_window,
        shutdown.clone(),
    ));
    println!("listening on {addr}");
    info!(%addr, master_target = %config.master_target, "process server ready");
    let poisoned = spool.clone();
    let handler = move |msg: Message, frame: bytes::Bytes| {
        let (spool, link) = (spool.clone(), link.clone());
        async move { handle(&spool, &link, msg, frame).await }
    };
    let outcome = tokio::select! {
        () = transport::serve(&endpoint, &[Role::Agent], hello, shutdown, handler) => Ok(()),
        cause = poisoned.failed() => {
            error!(%cause, "the spool failed to make records durable: stopping, so that a restart recovers it from what is on disk");
            Err(anyhow::anyhow!(
                "spool {}: {cause}; the process server stopped without acknowledging more; \
                 check the disk, then restart it (it recovers the spool from what is durable)",
                config.spool_dir.display()
            ))
        }
    };
    info!("shutting down");
    forwarder.abort();
    endpoint.close(
        transport::CLOSE_SHUTDOWN.into(),
        b"process server shutting down",
    );
    endpoint.wait_idle().await;
    outcome
}

async fn handle(spool: &Spool, link: &MasterLink, msg: Message, frame: bytes::Bytes) -> Message {
    match &msg {
        Message::Batch(_) | Message::Tag(_) => {
            let (disk, generation, seq) = match &msg {
                Message::Batch(b) => (b.disk.clone(), b.generation, b.seq),
                Message::Tag(t) => (t.disk.clone(), t.generation, t.seq),
                _ => unreachable!("matched above"),
            };
            match spool.append(&msg, frame).await {
                Ok(()) => Message::DurableAck {
                    disk,
                    generation,
                    seq,
                },
                Err(e) => {
                    warn!(%disk, seq, error = %e, "could not spool");
                    Message::error(ErrorCode::Busy, e.to_string())
                }
            }
        }
        Message::OpenDisk { .. } => match link.relay(&msg).await {
            Message::DiskState(mut state) => {
                state.resend = spool.rejected(&state.disk, state.generation);
                Message::DiskState(state)
            }
            other => other,
        },
        // Answered by the master target alone and never spooled: a check-in or a
        // point barrier is only worth its answer now. A PointPrepare's answer may take
        // until its deadline; the relay waits for it like for any other answer.
        Message::ManifestRequest { .. }
        | Message::Control { .. }
        | Message::PointPrepare { .. } => link.relay(&msg).await,
        other => Message::error(
            ErrorCode::BadRequest,
            format!(
                "a process server does not take {} messages from agents",
                other.name()
            ),
        ),
    }
}
