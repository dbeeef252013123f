//! The only module that touches sockets: QUIC endpoints (quinn) with TLS 1.3 and mutual
//! certificates from the deployment CA (rustls, ring provider), plus one-frame-per-
//! stream request/answer helpers.
//!
//! Every connection starts with a [`Message::Hello`] exchange on its first stream; the
//! role a peer claims there must match the role its certificate proves (the DNS name
//! `<role>.boomerang`, see [`crate::pki`]), and a server refuses roles it does not
//! serve. After that each request travels on its own bidirectional stream, so many
//! batches are in flight on one connection.

use std::future::Future;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, EndpointConfig, RecvStream, SendStream, VarInt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer, ServerName};
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::config::Shutdown;

use crate::config::TlsPaths;
use crate::message::{ErrorCode, Message, Role};
use crate::pki::role_dns_name;
use crate::wire::{HEADER_LEN, MAX_BODY};

/// ALPN protocol id.
pub const ALPN: &[u8] = b"boomerang/1";
/// UDP socket buffer size: with the 208 KiB default quinn drops thousands of packets
/// per GiB on loopback; 4 MiB drops none (kernels clamp to `rmem_max`).
pub const SOCKET_BUFFER: usize = 4 * 1024 * 1024;
/// Application close code: peer refused (role or hello).
pub const CLOSE_REFUSED: u32 = 1;
/// Application close code: malformed frame.
pub const CLOSE_PROTOCOL: u32 = 2;
/// Application close code: orderly shutdown.
pub const CLOSE_SHUTDOWN: u32 = 0;

/// Transport failures, each naming what failed.
#[derive(Debug, Error)]
pub enum TransportError {
    /// TLS material could not be loaded.
    #[error("TLS material {path}: {reason}")]
    Tls {
        /// File.
        path: String,
        /// Problem.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The UDP socket could not be bound.
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// OS error.
        source: std::io::Error,
    },
    /// Connecting failed (unreachable, handshake refused, ...).
    #[error("connect to {addr}: {reason}")]
    Connect {
        /// Address.
        addr: SocketAddr,
        /// What happened.
        reason: String,
    },
    /// The connection broke.
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// A stream failed mid-way.
    #[error("stream failed: {0}")]
    Stream(String),
    /// The peer sent a malformed frame.
    #[error("malformed frame from peer: {0}")]
    Protocol(String),
    /// The peer is not who it must be.
    #[error("peer refused: {0}")]
    Refused(String),
}

fn tls_err(path: &Path, reason: impl ToString) -> TransportError {
    TransportError::Tls {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

struct Material {
    roots: Arc<rustls::RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn load(tls: &TlsPaths) -> Result<Material, TransportError> {
    tls.validate().map_err(TransportError::Config)?;
    let mut roots = rustls::RootCertStore::empty();
    let ca: Vec<_> = CertificateDer::pem_file_iter(&tls.ca)
        .map_err(|e| tls_err(&tls.ca, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| tls_err(&tls.ca, e))?;
    if ca.is_empty() {
        return Err(tls_err(&tls.ca, "no certificate in file"));
    }
    for c in ca {
        roots.add(c).map_err(|e| tls_err(&tls.ca, e))?;
    }
    let chain: Vec<_> = CertificateDer::pem_file_iter(&tls.cert)
        .map_err(|e| tls_err(&tls.cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| tls_err(&tls.cert, e))?;
    if chain.is_empty() {
        return Err(tls_err(&tls.cert, "no certificate in file"));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| tls_err(&tls.key, e))?;
    Ok(Material {
        roots: Arc::new(roots),
        chain,
        key,
    })
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(256));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.stream_receive_window(VarInt::from_u32(8 << 20));
    t.receive_window(VarInt::from_u32(32 << 20));
    t.send_window(32 << 20);
    // A peer that vanished without a close is noticed within 10 s.
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    t.max_idle_timeout(Some(VarInt::from_u32(10_000).into()));
    Arc::new(t)
}

fn bind_socket(addr: SocketAddr) -> Result<UdpSocket, TransportError> {
    let sock = UdpSocket::bind(addr).map_err(|source| TransportError::Bind { addr, source })?;
    let size = libc::c_int::try_from(SOCKET_BUFFER).unwrap_or(libc::c_int::MAX);
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: the fd is a valid open socket owned by `sock`; the option value
        // points at a c_int that outlives the call, with its exact size.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                std::ptr::from_ref(&size).cast(),
                libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4),
            )
        };
        if rc != 0 {
            warn!(error = %std::io::Error::last_os_error(), "could not enlarge the UDP socket buffer; expect packet loss under load");
        }
    }
    Ok(sock)
}

/// What a node needs to answer its old connections after a restart, derived from its
/// private key so that it survives one: the stateless-reset key, and the key of the
/// connection-id generator (quinn's default generator hashes each id with a random
/// key, so a restarted process would take its own old ids for forged ones and drop
/// their packets without a reset). A process restarted on the same address then
/// answers packets of its old connections with a reset, and its peers reconnect at
/// once instead of waiting for the idle timeout.
struct RestartKeys {
    reset: Arc<dyn quinn::crypto::HmacKey>,
    cid: u64,
}

fn restart_keys(m: &Material) -> RestartKeys {
    let seed = blake3::derive_key(
        "boomerang 2026-11 QUIC stateless reset key",
        m.key.secret_der(),
    );
    let cid = blake3::derive_key(
        "boomerang 2026-12 QUIC connection id key",
        m.key.secret_der(),
    );
    let mut first = [0u8; 8];
    first.copy_from_slice(&cid[..8]);
    RestartKeys {
        reset: Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &seed)),
        cid: u64::from_le_bytes(first),
    }
}

fn endpoint(
    sock: UdpSocket,
    server: Option<quinn::ServerConfig>,
    keys: RestartKeys,
) -> Result<Endpoint, TransportError> {
    let addr = sock.local_addr().map_err(|source| TransportError::Bind {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| TransportError::Config("no async runtime for QUIC".into()))?;
    let mut config = EndpointConfig::new(keys.reset);
    let cid_key = keys.cid;
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    Endpoint::new(config, server, sock, runtime)
        .map_err(|source| TransportError::Bind { addr, source })
}

fn client_config(m: &Material) -> Result<quinn::ClientConfig, TransportError> {
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Config(e.to_string()))?
        .with_root_certificates(m.roots.clone())
        .with_client_auth_cert(m.chain.clone(), m.key.clone_key())
        .map_err(|e| TransportError::Config(e.to_string()))?;
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let quic =
        QuicClientConfig::try_from(crypto).map_err(|e| TransportError::Config(e.to_string()))?;
    let mut cc = quinn::ClientConfig::new(Arc::new(quic));
    cc.transport_config(transport_config());
    Ok(cc)
}

/// A QUIC server endpoint bound to `addr` that demands a client certificate from the
/// deployment CA. It can also dial out (a process server dials its master target).
pub fn server_endpoint(addr: SocketAddr, tls: &TlsPaths) -> Result<Endpoint, TransportError> {
    let m = load(tls)?;
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(m.roots.clone(), provider())
            .build()
            .map_err(|e| TransportError::Config(e.to_string()))?;
    let mut crypto = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.chain.clone(), m.key.clone_key())
        .map_err(|e| TransportError::Config(e.to_string()))?;
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let quic =
        QuicServerConfig::try_from(crypto).map_err(|e| TransportError::Config(e.to_string()))?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(quic));
    sc.transport_config(transport_config());
    let mut ep = endpoint(bind_socket(addr)?, Some(sc), restart_keys(&m))?;
    ep.set_default_client_config(client_config(&m)?);
    Ok(ep)
}

/// A client-only QUIC endpoint on an ephemeral port.
pub fn client_endpoint(tls: &TlsPaths) -> Result<Endpoint, TransportError> {
    let m = load(tls)?;
    let mut ep = endpoint(
        bind_socket(SocketAddr::from(([0, 0, 0, 0], 0)))?,
        None,
        restart_keys(&m),
    )?;
    ep.set_default_client_config(client_config(&m)?);
    Ok(ep)
}

/// The role the peer's certificate proves, if any.
pub fn peer_role(conn: &Connection) -> Option<Role> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let leaf = certs.first()?;
    let cert = webpki::EndEntityCert::try_from(leaf).ok()?;
    Role::ALL.into_iter().find(|role| {
        DnsName::try_from(role_dns_name(*role))
            .ok()
            .map(|dns| {
                cert.verify_is_valid_for_subject_name(&ServerName::DnsName(dns))
                    .is_ok()
            })
            .unwrap_or(false)
    })
}

/// Dials `addr`, which must prove `expected` in its certificate, then exchanges hellos.
pub async fn connect(
    ep: &Endpoint,
    addr: SocketAddr,
    expected: Role,
    my_hello: &Message,
) -> Result<Connection, TransportError> {
    let server_name = role_dns_name(expected);
    let connecting = ep
        .connect(addr, &server_name)
        .map_err(|e| TransportError::Connect {
            addr,
            reason: e.to_string(),
        })?;
    let conn = connecting.await.map_err(|e| {
        if is_tls_refusal(&e) {
            TransportError::Refused(format!(
                "{addr} refused the TLS handshake ({e}): are both certificates issued by this deployment's CA, and is it a {expected}?"
            ))
        } else {
            TransportError::Connect {
                addr,
                reason: e.to_string(),
            }
        }
    })?;
    let answer = match request(&conn, my_hello).await {
        Ok(a) => a,
        Err(e) => {
            // A server that refuses us closes the connection with its reason.
            if let Some(quinn::ConnectionError::ApplicationClosed(c)) = conn.close_reason() {
                if u64::from(c.error_code) == u64::from(CLOSE_REFUSED) {
                    return Err(TransportError::Refused(format!(
                        "{addr} refused us: {}",
                        String::from_utf8_lossy(&c.reason)
                    )));
                }
            }
            return Err(e);
        }
    };
    match answer {
        Message::Hello { role, .. } if role == expected => Ok(conn),
        Message::Hello { role, .. } => Err(TransportError::Refused(format!(
            "{addr} says it is a {role}, expected a {expected}"
        ))),
        Message::Error { reason, .. } => Err(TransportError::Refused(format!("{addr}: {reason}"))),
        other => Err(TransportError::Protocol(format!(
            "expected hello, got {}",
            other.name()
        ))),
    }
}

/// Whether a failed connection was refused by TLS (a certificate problem: retrying
/// will not help), as opposed to a network problem.
pub fn is_tls_refusal(e: &quinn::ConnectionError) -> bool {
    let code = match e {
        quinn::ConnectionError::TransportError(t) => u64::from(t.code),
        quinn::ConnectionError::ConnectionClosed(c) => u64::from(c.error_code),
        quinn::ConnectionError::ApplicationClosed(c) => {
            return u64::from(c.error_code) == u64::from(CLOSE_REFUSED);
        }
        _ => return false,
    };
    (0x100..0x200).contains(&code)
}

/// Server side of the handshake: checks the certificate's role is one of `allowed`
/// and matches the hello, answers with `my_hello`. On refusal the connection is closed
/// with a reason and the error says why (the caller logs it once).
pub async fn accept_hello(
    conn: &Connection,
    allowed: &[Role],
    my_hello: &Message,
) -> Result<(Role, String), TransportError> {
    let refuse = |why: String| {
        conn.close(VarInt::from_u32(CLOSE_REFUSED), why.as_bytes());
        TransportError::Refused(why)
    };
    let Some(role) = peer_role(conn) else {
        return Err(refuse("certificate names no Boomerang role".into()));
    };
    if !allowed.contains(&role) {
        return Err(refuse(format!(
            "role {role} may not connect here (allowed: {allowed:?})"
        )));
    }
    let (mut send, mut recv) = conn.accept_bi().await?;
    let hello = read_message(&mut recv).await?;
    match hello {
        Message::Hello {
            role: claimed,
            name,
            ..
        } if claimed == role => {
            write_message(&mut send, my_hello).await?;
            Ok((role, name))
        }
        Message::Hello { role: claimed, .. } => {
            let _ = write_message(
                &mut send,
                &Message::error(ErrorCode::BadRequest, "role mismatch"),
            )
            .await;
            Err(refuse(format!(
                "hello claims role {claimed}, certificate says {role}"
            )))
        }
        other => Err(refuse(format!(
            "first message was {}, expected hello",
            other.name()
        ))),
    }
}

/// Reads one whole frame (the rest of the stream) and decodes it.
pub async fn read_message(recv: &mut RecvStream) -> Result<Message, TransportError> {
    let buf = recv
        .read_to_end(HEADER_LEN + MAX_BODY)
        .await
        .map_err(|e| TransportError::Stream(e.to_string()))?;
    decode(Bytes::from(buf)).map(|(m, _)| m)
}

/// Reads one whole frame and returns the message together with the exact bytes it
/// came in (a process server spools and forwards those bytes untouched).
pub async fn read_message_raw(recv: &mut RecvStream) -> Result<(Message, Bytes), TransportError> {
    let buf = recv
        .read_to_end(HEADER_LEN + MAX_BODY)
        .await
        .map_err(|e| TransportError::Stream(e.to_string()))?;
    decode(Bytes::from(buf))
}

fn decode(buf: Bytes) -> Result<(Message, Bytes), TransportError> {
    let msg = Message::decode_exact(&buf).map_err(|e| TransportError::Protocol(e.to_string()))?;
    Ok((msg, buf))
}

/// Writes one frame and finishes the stream.
pub async fn write_message(send: &mut SendStream, msg: &Message) -> Result<(), TransportError> {
    write_frame(send, msg.encode()).await
}

/// Writes already-encoded frame bytes and finishes the stream.
pub async fn write_frame(send: &mut SendStream, frame: Bytes) -> Result<(), TransportError> {
    send.write_chunk(frame)
        .await
        .map_err(|e| TransportError::Stream(e.to_string()))?;
    send.finish()
        .map_err(|e| TransportError::Stream(e.to_string()))
}

/// Sends `msg` on a new stream and waits for the one-frame answer.
pub async fn request(conn: &Connection, msg: &Message) -> Result<Message, TransportError> {
    request_frame(conn, msg.encode()).await
}

/// Sends pre-encoded frame bytes on a new stream and waits for the one-frame answer.
pub async fn request_frame(conn: &Connection, frame: Bytes) -> Result<Message, TransportError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(&mut send, frame).await?;
    read_message(&mut recv).await
}

/// Closes `conn` because the peer sent something malformed, with the reason on the wire.
pub fn close_protocol_error(conn: &Connection, reason: &str) {
    conn.close(VarInt::from_u32(CLOSE_PROTOCOL), reason.as_bytes());
}

/// A peer this role dials: one connection, redialled when it breaks, and the wire
/// bytes of every connection it made (QUIC and TLS overhead included).
#[derive(Debug)]
pub struct Dialer {
    endpoint: Endpoint,
    addr: SocketAddr,
    role: Role,
    hello: Message,
    conn: tokio::sync::RwLock<Option<Connection>>,
    closed_bytes: std::sync::Mutex<(u64, u64)>,
    closing: std::sync::atomic::AtomicBool,
}

impl Dialer {
    /// A dialer for the `role` at `addr`, introducing itself with `hello`.
    pub fn new(endpoint: Endpoint, addr: SocketAddr, role: Role, hello: Message) -> Self {
        Dialer {
            endpoint,
            addr,
            role,
            hello,
            conn: tokio::sync::RwLock::new(None),
            closed_bytes: std::sync::Mutex::new((0, 0)),
            closing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The peer's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The current connection, dialling (and saying hello) if there is none.
    pub async fn connection(&self) -> Result<Connection, TransportError> {
        if let Some(c) = self.conn.read().await.as_ref() {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let mut slot = self.conn.write().await;
        if let Some(old) = slot.take() {
            if old.close_reason().is_none() {
                *slot = Some(old.clone());
                return Ok(old);
            }
            let s = old.stats();
            let mut closed = self
                .closed_bytes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            closed.0 += s.udp_tx.bytes;
            closed.1 += s.udp_rx.bytes;
        }
        if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(TransportError::Refused(format!(
                "shutting down: not dialling {} again",
                self.addr
            )));
        }
        let c = connect(&self.endpoint, self.addr, self.role, &self.hello).await?;
        info!(addr = %self.addr, role = %self.role, "connected");
        *slot = Some(c.clone());
        Ok(c)
    }

    /// UDP bytes sent and received over every connection so far.
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

    /// Closes the connection politely (no new one is dialled after this) and waits a
    /// moment for the peer to hear it.
    pub async fn close(&self, reason: &str) {
        self.closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(c) = self.conn.read().await.as_ref() {
            c.close(CLOSE_SHUTDOWN.into(), reason.as_bytes());
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

/// Serves `endpoint` until `shutdown` flips: completes each TLS handshake, admits only
/// peers whose certificate proves one of `allowed` roles, then answers every request
/// stream with `handler(message, exact frame bytes)`. A malformed frame closes that
/// peer's connection with the reason logged; other peers are not affected.
pub async fn serve<H, F>(
    endpoint: &Endpoint,
    allowed: &'static [Role],
    hello: Message,
    mut shutdown: Shutdown,
    handler: H,
) where
    H: Fn(Message, Bytes) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Message> + Send + 'static,
{
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = shutdown.changed() => return,
        };
        let Some(incoming) = incoming else { return };
        let (hello, handler) = (hello.clone(), handler.clone());
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    warn!(%remote, error = %e, "refused connection: TLS handshake failed (certificate not from this deployment's CA?)");
                    return;
                }
            };
            match accept_hello(&conn, allowed, &hello).await {
                Ok((role, name)) => {
                    info!(%remote, %role, peer = %name, "peer connected");
                    serve_streams(conn, handler).await;
                }
                Err(e) => warn!(%remote, error = %e, "refused connection"),
            }
        });
    }
}

async fn serve_streams<H, F>(conn: Connection, handler: H)
where
    H: Fn(Message, Bytes) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Message> + Send + 'static,
{
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                info!(remote = %conn.remote_address(), reason = %e, "peer disconnected");
                return;
            }
        };
        let (conn, handler) = (conn.clone(), handler.clone());
        tokio::spawn(async move {
            let (msg, frame) = match read_message_raw(&mut recv).await {
                Ok(m) => m,
                Err(TransportError::Protocol(reason)) => {
                    warn!(remote = %conn.remote_address(), %reason, "malformed frame: closing the connection");
                    close_protocol_error(&conn, &reason);
                    return;
                }
                Err(e) => {
                    debug!(error = %e, "stream ended early");
                    return;
                }
            };
            let answer = handler(msg, frame).await;
            if let Err(e) = write_message(&mut send, &answer).await {
                debug!(error = %e, "could not answer");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki;

    fn tls(dir: &std::path::Path, role: Role, name: &str) -> TlsPaths {
        pki::issue(dir, role, name, dir).expect("issue");
        TlsPaths::in_dir(dir, name)
    }

    fn hello(role: Role, name: &str) -> Message {
        Message::Hello {
            role,
            name: name.into(),
            software: "test".into(),
        }
    }

    /// A server on its own runtime, answering every request with its hello.
    fn start_server(addr: SocketAddr, tls: &TlsPaths) -> (tokio::runtime::Runtime, SocketAddr) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("server runtime");
        // The killed runtime's socket may linger a moment: retry the bind.
        let until = std::time::Instant::now() + Duration::from_secs(10);
        let ep = loop {
            match rt.block_on(async { server_endpoint(addr, tls) }) {
                Ok(ep) => break ep,
                Err(TransportError::Bind { .. }) if std::time::Instant::now() < until => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("server endpoint: {e}"),
            }
        };
        let bound = ep.local_addr().expect("addr");
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        rt.spawn(async move {
            let _stop = stop;
            serve(
                &ep,
                &[Role::Ps],
                hello(Role::Mt, "mt1"),
                shutdown,
                |_m, _f| async { hello(Role::Mt, "mt1") },
            )
            .await;
        });
        (rt, bound)
    }

    /// A server killed without a close and started again on the same address answers
    /// its old connections' packets with a stateless reset (its reset key comes from
    /// its private key), so a client learns at once that the connection is gone
    /// instead of waiting out the idle timeout.
    #[test]
    fn a_restarted_server_resets_its_old_connections() {
        let dir = tempfile::tempdir().expect("tempdir");
        pki::init_ca(dir.path()).expect("ca");
        let server_tls = tls(dir.path(), Role::Mt, "mt1");
        let client_tls = tls(dir.path(), Role::Ps, "ps1");
        let (server, addr) = start_server("127.0.0.1:0".parse().expect("addr"), &server_tls);
        let client = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("client runtime");
        let conn = client.block_on(async {
            let ep = client_endpoint(&client_tls).expect("client endpoint");
            let conn = connect(&ep, addr, Role::Mt, &hello(Role::Ps, "ps1"))
                .await
                .expect("connect");
            request(&conn, &hello(Role::Ps, "ps1"))
                .await
                .expect("request");
            conn
        });
        // Killed: its tasks and socket go without a word to the client.
        server.shutdown_background();
        let (_again, _) = start_server(addr, &server_tls);
        let reason = client.block_on(async {
            // The next packet the client sends (a request, a keep-alive) meets the
            // new process.
            let _ = tokio::time::timeout(
                Duration::from_millis(500),
                request(&conn, &hello(Role::Ps, "ps1")),
            )
            .await;
            tokio::time::timeout(Duration::from_secs(30), conn.closed())
                .await
                .expect("the connection ends")
        });
        assert!(
            matches!(reason, quinn::ConnectionError::Reset),
            "the old connection ended with {reason:?}, not a stateless reset"
        );
    }
}
