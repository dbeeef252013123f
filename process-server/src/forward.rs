//! Forwarding to the master target: keeps one QUIC connection to it (reconnecting with
//! backoff), sends spooled records exactly as they were received (no recompression),
//! several in flight at once, in order per disk, and deletes each from the spool only
//! after the master target's durable ack. Also relays the agents' control requests.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use boomerang_common::config::Shutdown;
use boomerang_common::message::{ErrorCode, Message, Role};
use boomerang_common::transport::{self, Dialer};
use quinn::{Connection, Endpoint};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::spool::{Key, Spool};

/// The link to the master target.
#[derive(Debug)]
pub struct MasterLink {
    dialer: Dialer,
}

impl MasterLink {
    /// A link to `addr`, dialled from `endpoint`.
    pub fn new(endpoint: Endpoint, addr: SocketAddr, hello: Message) -> Arc<Self> {
        Arc::new(MasterLink {
            dialer: Dialer::new(endpoint, addr, Role::Mt, hello),
        })
    }

    /// The current connection, dialling if there is none.
    pub async fn connection(&self) -> Result<Connection, String> {
        self.dialer
            .connection()
            .await
            .map_err(|e| format!("master target {} unreachable: {e}", self.dialer.addr()))
    }

    /// Relays a request for the master target (disk announcement, manifest, group
    /// check-in, point prepare) and returns its answer, however long it takes (a
    /// point prepare is answered at its deadline at the latest).
    pub async fn relay(&self, msg: &Message) -> Message {
        match self.connection().await {
            Ok(c) => match transport::request(&c, msg).await {
                Ok(answer) => answer,
                Err(e) => Message::error(ErrorCode::Unavailable, format!("master target: {e}")),
            },
            Err(e) => Message::error(ErrorCode::Unavailable, e),
        }
    }
}

/// Forwards the spool to the master target until shutdown, with at most `window`
/// records in flight.
pub async fn forward_loop(
    spool: Arc<Spool>,
    link: Arc<MasterLink>,
    window: usize,
    mut shutdown: Shutdown,
) {
    let mut backoff = Duration::from_millis(100);
    let mut in_flight: BTreeSet<Key> = BTreeSet::new();
    let mut sent: HashMap<String, (u64, u64)> = HashMap::new();
    let mut tasks: JoinSet<(Key, Result<Message, String>)> = JoinSet::new();
    let mut warned = false;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let conn = match link.connection().await {
            Ok(c) => {
                backoff = Duration::from_millis(100);
                warned = false;
                c
            }
            Err(e) => {
                if !warned {
                    warn!(error = %e, "cannot forward: will keep retrying");
                    warned = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        // Fill the window.
        let free = window.saturating_sub(in_flight.len());
        if free > 0 {
            for key in spool.next_unsent(&in_flight, free, &mut sent) {
                let frame = match spool.read(&key) {
                    Ok(Some(f)) => f,
                    Ok(None) => continue,
                    Err(e) => {
                        warn!(?key, error = %e, "cannot read spooled record; will retry");
                        continue;
                    }
                };
                in_flight.insert(key.clone());
                let c = conn.clone();
                tasks.spawn(async move {
                    let r = transport::request_frame(&c, frame)
                        .await
                        .map_err(|e| e.to_string());
                    (key, r)
                });
            }
        }
        let notified = spool.appended.notified();
        tokio::select! {
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                let Ok((key, result)) = done else { continue };
                in_flight.remove(&key);
                match result {
                    Ok(Message::DurableAck { .. }) => spool.remove(&key),
                    Ok(Message::Error { code, reason }) if code == ErrorCode::IntegrityFailure as u16 => {
                        warn!(?key, %reason, "master target refused a record (integrity); dropped it, the agent will be asked to resend");
                        spool.reject(&key);
                    }
                    Ok(Message::Error { reason, .. }) => {
                        debug!(?key, %reason, "master target could not take a record yet; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Ok(other) => warn!(?key, got = other.name(), "unexpected answer from the master target"),
                    Err(e) => {
                        debug!(?key, error = %e, "forward failed; will resend");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            _ = notified => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.changed() => return,
        }
    }
}
