//! The agent's link to its process server: one QUIC connection, redialled with
//! backoff when it breaks, and requests that are retried until they get a real answer
//! (a batch is held until the process server says it is durable, rule 1).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use boomerang_common::message::{ErrorCode, Message, Role};
use boomerang_common::transport::{self, Dialer, TransportError};
use bytes::Bytes;
use quinn::Endpoint;
use tracing::warn;

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
    /// A one-shot request got no answer (see [`PsLink::request_once`]).
    #[error("no answer from process server {addr}: {reason}")]
    NoAnswer {
        /// Address.
        addr: SocketAddr,
        /// What went wrong.
        reason: String,
    },
}

/// Link to the process server.
#[derive(Debug)]
pub struct PsLink {
    dialer: Dialer,
    retry_for: Duration,
}

impl PsLink {
    /// A link to `addr`; requests give up after `retry_for` without an answer.
    pub fn new(endpoint: Endpoint, addr: SocketAddr, hello: Message, retry_for: Duration) -> Self {
        PsLink {
            dialer: Dialer::new(endpoint, addr, Role::Ps, hello),
            retry_for,
        }
    }

    /// UDP bytes sent and received on every connection so far (QUIC and TLS overhead
    /// included): what crossed the wire.
    pub async fn wire_bytes(&self) -> (u64, u64) {
        self.dialer.wire_bytes().await
    }

    /// Sends `frame` until it gets an answer that is not "busy" or "unavailable";
    /// reconnects as needed.
    pub async fn request(&self, frame: Bytes) -> Result<Message, LinkError> {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(50);
        let mut warned = false;
        loop {
            let last = match self.dialer.connection().await {
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
                    addr: self.dialer.addr(),
                    secs: self.retry_for.as_secs(),
                    last,
                });
            }
            if !warned && start.elapsed() > Duration::from_secs(2) {
                warn!(addr = %self.dialer.addr(), error = %last, "process server not answering; retrying");
                warned = true;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Sends `frame` once and waits at most `timeout` for the answer, which is
    /// returned as it came (an error answer included): for periodic check-ins and
    /// point barriers, whose answer is worth nothing late, so they are never retried
    /// here.
    pub async fn request_once(
        &self,
        frame: Bytes,
        timeout: Duration,
    ) -> Result<Message, LinkError> {
        let attempt = async {
            let conn = self.dialer.connection().await.map_err(|e| e.to_string())?;
            transport::request_frame(&conn, frame)
                .await
                .map_err(|e| e.to_string())
        };
        let reason = match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(e)) => e,
            Err(_) => format!("no answer within {} ms", timeout.as_millis()),
        };
        Err(LinkError::NoAnswer {
            addr: self.dialer.addr(),
            reason,
        })
    }

    /// Closes the connection politely.
    pub async fn close(&self) {
        self.dialer.close("agent done").await;
    }
}
