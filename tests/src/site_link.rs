//! The link between two sites as a test sees it: a UDP relay standing in front of a
//! process server that counts every datagram crossing it, so a test can say how many
//! bytes a replication step put on the wire, measured outside the binaries under test.
//!
//! Agents are pointed at [`SiteLink::addr`] instead of the process server's address
//! (QUIC does not mind: the server sees the relay's socket as the peer, the agent sees
//! the relay as the server, and certificates name roles, not addresses). Each client
//! address gets its own upstream socket, like a NAT, so the server keeps one path per
//! client. Counted: UDP payload bytes (QUIC packets) in each direction, and datagrams;
//! [`LinkBytes::with_headers`] adds the IPv4 and UDP headers.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// Largest datagram relayed (QUIC stays far below; a larger one would be cut and is
/// counted as relayed, which QUIC then rejects).
const MAX_DATAGRAM: usize = 65_535;
/// How often the relay threads look at the stop flag.
const POLL: Duration = Duration::from_millis(100);
/// IPv4 (20) plus UDP (8) header bytes per datagram.
const HEADER_BYTES: u64 = 28;

/// Bytes and datagrams that crossed a [`SiteLink`], per direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkBytes {
    /// UDP payload bytes from the clients to the server.
    pub up: u64,
    /// UDP payload bytes from the server to the clients.
    pub down: u64,
    /// Datagrams from the clients to the server.
    pub up_datagrams: u64,
    /// Datagrams from the server to the clients.
    pub down_datagrams: u64,
}

impl LinkBytes {
    /// Payload bytes in both directions.
    pub fn total(&self) -> u64 {
        self.up + self.down
    }

    /// Bytes in both directions with the IPv4 and UDP headers of each datagram.
    pub fn with_headers(&self) -> u64 {
        self.total() + HEADER_BYTES * (self.up_datagrams + self.down_datagrams)
    }

    /// What crossed since `earlier` (a snapshot of the same link).
    pub fn since(&self, earlier: &LinkBytes) -> LinkBytes {
        LinkBytes {
            up: self.up - earlier.up,
            down: self.down - earlier.down,
            up_datagrams: self.up_datagrams - earlier.up_datagrams,
            down_datagrams: self.down_datagrams - earlier.down_datagrams,
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    up: AtomicU64,
    down: AtomicU64,
    up_datagrams: AtomicU64,
    down_datagrams: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
enum Direction {
    Up,
    Down,
}

impl Counters {
    /// Counts a datagram of `len` bytes, then `send`s it, taking it back out when the
    /// send failed: whoever receives it can already see it counted.
    fn count(&self, direction: Direction, len: usize, send: impl FnOnce() -> bool) {
        let (bytes, datagrams) = match direction {
            Direction::Up => (&self.up, &self.up_datagrams),
            Direction::Down => (&self.down, &self.down_datagrams),
        };
        bytes.fetch_add(len as u64, Ordering::SeqCst);
        datagrams.fetch_add(1, Ordering::SeqCst);
        if !send() {
            bytes.fetch_sub(len as u64, Ordering::SeqCst);
            datagrams.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn snapshot(&self) -> LinkBytes {
        LinkBytes {
            up: self.up.load(Ordering::SeqCst),
            down: self.down.load(Ordering::SeqCst),
            up_datagrams: self.up_datagrams.load(Ordering::SeqCst),
            down_datagrams: self.down_datagrams.load(Ordering::SeqCst),
        }
    }
}

/// A counting UDP relay on `127.0.0.1` in front of `server`. Dropping it stops the
/// relay (open QUIC connections through it then time out).
#[derive(Debug)]
pub struct SiteLink {
    addr: SocketAddr,
    server: SocketAddr,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    threads: Arc<Mutex<Vec<thread::JoinHandle<()>>>>,
}

impl SiteLink {
    /// Starts relaying from a free localhost port to `server`.
    pub fn start(server: SocketAddr) -> SiteLink {
        let front = UdpSocket::bind("127.0.0.1:0").expect("bind the site link's front socket");
        front
            .set_read_timeout(Some(POLL))
            .expect("set the front socket's read timeout");
        let addr = front.local_addr().expect("the front socket's address");
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let threads = Arc::new(Mutex::new(Vec::new()));
        let front_thread = {
            let (counters, stop, threads) = (counters.clone(), stop.clone(), threads.clone());
            thread::spawn(move || relay_up(&front, server, &counters, &stop, &threads))
        };
        lock(&threads).push(front_thread);
        SiteLink {
            addr,
            server,
            counters,
            stop,
            threads,
        }
    }

    /// Where clients send: give this to the agents as their process server.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server behind the link.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// What crossed the link so far.
    pub fn bytes(&self) -> LinkBytes {
        self.counters.snapshot()
    }
}

impl Drop for SiteLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        loop {
            // The front thread may still add a session thread while we join: take
            // the list again until it stays empty.
            let pending: Vec<_> = lock(&self.threads).drain(..).collect();
            if pending.is_empty() {
                break;
            }
            for t in pending {
                let _ = t.join();
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn timed_out(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Client to server: one upstream socket per client address, each with a thread
/// carrying the server's answers back through the front socket.
fn relay_up(
    front: &UdpSocket,
    server: SocketAddr,
    counters: &Arc<Counters>,
    stop: &Arc<AtomicBool>,
    threads: &Mutex<Vec<thread::JoinHandle<()>>>,
) {
    let mut sessions: HashMap<SocketAddr, UdpSocket> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while !stop.load(Ordering::SeqCst) {
        let (n, client) = match front.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) if timed_out(e.kind()) || e.kind() == ErrorKind::Interrupted => continue,
            // ICMP errors of earlier sends to a client that went away show up here.
            Err(_) => continue,
        };
        let upstream = match sessions.entry(client) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let Some(s) = open_session(front, client, server, counters, stop, threads) else {
                    continue;
                };
                e.insert(s)
            }
        };
        counters.count(Direction::Up, n, || upstream.send(&buf[..n]).is_ok());
    }
}

/// A new upstream socket for `client`, with its thread relaying answers back.
fn open_session(
    front: &UdpSocket,
    client: SocketAddr,
    server: SocketAddr,
    counters: &Arc<Counters>,
    stop: &Arc<AtomicBool>,
    threads: &Mutex<Vec<thread::JoinHandle<()>>>,
) -> Option<UdpSocket> {
    let upstream = UdpSocket::bind("127.0.0.1:0").ok()?;
    upstream.connect(server).ok()?;
    upstream.set_read_timeout(Some(POLL)).ok()?;
    let back = upstream.try_clone().ok()?;
    let front = front.try_clone().ok()?;
    let (counters, stop) = (counters.clone(), stop.clone());
    let t = thread::spawn(move || {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        while !stop.load(Ordering::SeqCst) {
            match back.recv(&mut buf) {
                Ok(n) => {
                    counters.count(Direction::Down, n, || {
                        front.send_to(&buf[..n], client).is_ok()
                    });
                }
                Err(e) if timed_out(e.kind()) || e.kind() == ErrorKind::Interrupted => {}
                // The server's port was closed (ICMP): keep listening, it may restart.
                Err(_) => thread::sleep(POLL),
            }
        }
    });
    lock(threads).push(t);
    Some(upstream)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server behind the link: what goes up comes back down, counted twice.
    #[test]
    fn relays_both_ways_and_counts_every_datagram() {
        let server = UdpSocket::bind("127.0.0.1:0").expect("bind echo server");
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let server_addr = server.local_addr().expect("echo address");
        let echo = thread::spawn(move || {
            let mut buf = [0u8; 2048];
            for _ in 0..6 {
                let (n, from) = server.recv_from(&mut buf).expect("echo recv");
                server.send_to(&buf[..n], from).expect("echo send");
            }
        });
        let link = SiteLink::start(server_addr);
        assert_eq!(link.server(), server_addr);
        let before = link.bytes();
        for client_no in 0..2 {
            let client = UdpSocket::bind("127.0.0.1:0").expect("bind client");
            client
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            for len in [10usize, 1200, 300] {
                let msg = vec![u8::try_from(client_no).expect("small"); len];
                client.send_to(&msg, link.addr()).expect("client send");
                let mut buf = [0u8; 2048];
                let (n, from) = client.recv_from(&mut buf).expect("client recv");
                assert_eq!(from, link.addr(), "answers come from the link");
                assert_eq!(&buf[..n], &msg[..]);
            }
        }
        echo.join().expect("echo thread");
        let crossed = link.bytes().since(&before);
        assert_eq!(
            crossed,
            LinkBytes {
                up: 2 * 1510,
                down: 2 * 1510,
                up_datagrams: 6,
                down_datagrams: 6
            }
        );
        assert_eq!(crossed.total(), 4 * 1510);
        assert_eq!(crossed.with_headers(), 4 * 1510 + 12 * 28);
    }
}
