//! The agent's link to its process server: one QUIC connection, redialled with
//! backoff when it breaks, and requests that are retried until they get a real answer
//! (a batch is held until the process server says it is durable, rule 1).

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use boomerang_common::message::{ErrorCode, Message, Role};
use boomerang_common::transport::{self, TransportError};
use bytes::Bytes;
use quinn::{Connection, Endpoint};
use tokio::sync::RwLock;
use tracing::{info, warn};

/// Why a request could not be completed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The process server stayed unreachable past the retry limit.
    #[error("process server {addr} unreachable for {secs} s (last error: {last}); check it runs and the network between us")]
    Unreachable {
        /// Address.
        addr: SocketAddr,
        /// Seconds tried.
        secs: u64,
        /// Last error.
        last: String,
    },
    /// The far side answered with an error that retrying will not fix.
    #[error("{0}")]
    Refused(String),
}

/// Link to the process server.
#[derive(Debug)]
pub struct PsLink {
    endpoint: Endpoint,
    addr: SocketAddr,
    hello: Message,
    conn: RwLock<Option<Connection>>,
    retry_for: Duration,
    /// Bytes sent and received on connections that are closed now.
    closed_bytes: Mutex<(u64, u64)>,
}

impl PsLink {
    /// A link to `addr`; requests give up after `retry_for` without an answer.
    pub fn new(endpoint: Endpoint, addr: SocketAddr, hello: Message, retry_for: Duration) -> Self {
        PsLink {
            endpoint,
            addr,
            hello,
            conn: RwLock::new(None),
            retry_for,
            closed_bytes: Mutex::new((0, 0)),
        }
    }

    async fn connection(&self) -> Result<Connection, TransportError> {
        if let Some(c) = self.conn.read().await.as_ref() {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let mut slot = self.conn.write().await;
        if let Some(c) = slot.as_ref() {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
            let s = c.stats();
            let mut closed = self
                .closed_bytes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            closed.0 += s.udp_tx.bytes;
            closed.1 += s.udp_rx.bytes;
        }
        *slot = None;
        let c = transport::connect(&self.endpoint, self.addr, Role::Ps, &self.hello).await?;
        info!(addr = %self.addr, "connected to the process server");
        *slot = Some(c.clone());
        Ok(c)
    }

    /// UDP bytes sent and received on every connection so far (QUIC and TLS overhead
    /// included): what crossed the wire.
    pub async fn wire_bytes(&self) -> (u64, u64) {
        let (mut tx, mut rx) = *self
            .closed_bytes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = self.conn.read().await.as_ref() {
            let s = c.stats();
            tx += s.udp_tx.bytes;
            rx += s.udp_rx.bytes;
        }
        (tx, rx)
    }

    /// Sends `frame` until it gets an answer that is not "busy" or "unavailable";
    /// reconnects as needed.
    pub async fn request(&self, frame: Bytes) -> Result<Message, LinkError> {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(50);
        let mut warned = false;
        loop {
            let last = match self.connection().await {
                Ok(conn) => match transport::request_frame(&conn, frame.clone()).await {
                    Ok(Message::Error { code, reason })
                        if code == ErrorCode::Busy as u16
                            || code == ErrorCode::Unavailable as u16 =>
                    {
                        reason
                    }
                    Ok(Message::Error { reason, .. }) => return Err(LinkError::Refused(reason)),
                    Ok(answer) => return Ok(answer),
                    Err(TransportError::Refused(r)) => return Err(LinkError::Refused(r)),
                    Err(e) => e.to_string(),
                },
                Err(TransportError::Refused(r)) => return Err(LinkError::Refused(r)),
                Err(e) => e.to_string(),
            };
            if start.elapsed() > self.retry_for {
                return Err(LinkError::Unreachable {
                    addr: self.addr,
                    secs: self.retry_for.as_secs(),
                    last,
                });
            }
            if !warned && start.elapsed() > Duration::from_secs(2) {
                warn!(addr = %self.addr, error = %last, "process server not answering; retrying");
                warned = true;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Closes the connection politely.
    pub async fn close(&self) {
        if let Some(c) = self.conn.read().await.as_ref() {
            c.close(transport::CLOSE_SHUTDOWN.into(), b"agent done");
        }
        self.endpoint.wait_idle().await;
    }
}
