//! Forwarding to the master target: keeps one QUIC connection to it (reconnecting with
//! backoff), sends spooled records exactly as they were received (no recompression),
//! several in flight at once, in order per disk, and deletes each from the spool only
//! after the master target's durable ack. A disk whose record the master target cannot
//! take yet is held back on its own, with a doubling wait, while the others go on; a
//! record the master target answers `Gone` (its group was committed there) is dropped.
//! Also relays the agents' control requests.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use boomerang_common::config::Shutdown;
use boomerang_common::message::{ErrorCode, Message, Role};
use boomerang_common::transport::{self, Dialer};
use quinn::{Connection, Endpoint};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

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

/// First wait before a disk whose record the master target could not take yet is
/// tried again; it doubles at each refusal in a row, up to [`HOLD_MAX`].
const HOLD_FIRST: Duration = Duration::from_millis(200);
/// Longest wait between two tries of a refused disk.
const HOLD_MAX: Duration = Duration::from_secs(5);
/// Longest sleep of the forwarder with nothing to do (new records wake it at once).
const IDLE: Duration = Duration::from_millis(500);

/// Disks the master target could not take records of yet (paused by a failover, a
/// gap, a full retention journal), each held back on its own with a doubling wait,
/// so that one disk's refusals never slow the others.
#[derive(Debug, Default)]
struct Holds {
    /// Per disk: held until, and the wait the next refusal starts from.
    by_disk: HashMap<String, (Instant, Duration)>,
}

impl Holds {
    /// `disk` was refused: hold it back, twice as long as the last time (refusals
    /// of records sent together count once).
    fn refused(&mut self, disk: &str) {
        let now = Instant::now();
        let e = self
            .by_disk
            .entry(disk.to_string())
            .or_insert((now, HOLD_FIRST));
        if e.0 <= now {
            *e = (now + e.1, (e.1 * 2).min(HOLD_MAX));
        }
    }

    /// `disk` took a record: its next refusal waits from the start again.
    fn accepted(&mut self, disk: &str) {
        self.by_disk.remove(disk);
    }

    /// The disks still held back now.
    fn held(&self) -> HashSet<String> {
        let now = Instant::now();
        self.by_disk
            .iter()
            .filter(|(_, (until, _))| *until > now)
            .map(|(d, _)| d.clone())
            .collect()
    }

    /// How long the forwarder may sleep with nothing in flight: until the first held
    /// disk may go again, at most `IDLE`.
    fn sleep(&self) -> Duration {
        let now = Instant::now();
        self.by_disk
            .values()
            .map(|(until, _)| until.saturating_duration_since(now))
            .filter(|d| !d.is_zero())
            .min()
            .map_or(IDLE, |d| d.min(IDLE))
    }
}

/// The master target acknowledged `key` with the highest seq of its generation it
/// holds durably (`seq`, at or past the key's own): the disk may go on right after
/// it. After a restart the spool can hold an old record whose successors were
/// acknowledged and retired before the kill; without this the forwarder would wait
/// for a successor that no one will send again.
fn durable_through(sent: &mut HashMap<String, (u64, u64)>, key: &Key, generation: u64, seq: u64) {
    if generation != key.1 || seq < key.2 {
        return;
    }
    let e = sent.entry(key.0.clone()).or_insert((generation, seq));
    if (generation, seq) > *e {
        *e = (generation, seq);
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
    let mut holds = Holds::default();
    let mut gone_logged: HashSet<String> = HashSet::new();
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
            for key in spool.next_unsent(&in_flight, free, &mut sent, &holds.held()) {
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
                    Ok(Message::DurableAck { generation, seq, .. }) => {
                        holds.accepted(&key.0);
                        spool.remove(&key);
                        durable_through(&mut sent, &key, generation, seq);
                    }
                    Ok(Message::Error { code, reason }) if code == ErrorCode::IntegrityFailure as u16 => {
                        warn!(?key, %reason, "master target refused a record (integrity); dropped it, the agent will be asked to resend");
                        spool.reject(&key);
                    }
                    Ok(Message::Error { code, reason }) if code == ErrorCode::Gone as u16 => {
                        if gone_logged.insert(key.0.clone()) {
                            info!(disk = %key.0, %reason, "the master target no longer wants this disk's records: dropping them from the spool");
                        }
                        spool.remove(&key);
                    }
                    Ok(Message::Error { reason, .. }) => {
                        debug!(?key, %reason, "master target could not take a record yet; holding the disk back");
                        holds.refused(&key.0);
                    }
                    Ok(other) => warn!(?key, got = other.name(), "unexpected answer from the master target"),
                    Err(e) => {
                        debug!(?key, error = %e, "forward failed; will resend");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            _ = notified => {}
            _ = tokio::time::sleep(holds.sleep()) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boomerang_common::config::TlsPaths;
    use boomerang_common::pki;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn tag(disk: &str, seq: u64) -> Message {
        Message::Tag(boomerang_common::message::Tag {
            disk: disk.into(),
            generation: 1,
            seq,
            kind: boomerang_common::message::TagKind::CrashConsistent,
            point_id: seq,
            time_ms: 0,
            group: "g".into(),
        })
    }

    fn tls(dir: &std::path::Path, role: Role, name: &str) -> TlsPaths {
        pki::issue(dir, role, name, dir).expect("issue");
        TlsPaths::in_dir(dir, name)
    }

    /// What the test master target saw.
    #[derive(Default)]
    struct Seen {
        refused: AtomicU64,
        /// When each record of the other disks arrived.
        arrivals: std::sync::Mutex<Vec<std::time::Instant>>,
    }

    /// A master target on loopback answering each tag with `answer`.
    async fn serve_tags<F, Fut>(
        dir: &std::path::Path,
        answer: F,
    ) -> (SocketAddr, tokio::sync::watch::Sender<bool>)
    where
        F: Fn(boomerang_common::message::Tag) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = Message> + Send + 'static,
    {
        let endpoint = transport::server_endpoint(
            "127.0.0.1:0".parse().expect("addr"),
            &tls(dir, Role::Mt, "mt1"),
        )
        .expect("mt endpoint");
        let addr = endpoint.local_addr().expect("addr");
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let hello = Message::Hello {
            role: Role::Mt,
            name: "mt1".into(),
            software: "test".into(),
        };
        let handler = move |msg: Message, _frame: bytes::Bytes| {
            let answer = answer.clone();
            async move {
                match msg {
                    Message::Tag(t) => answer(t).await,
                    _ => Message::error(ErrorCode::BadRequest, "tags only"),
                }
            }
        };
        tokio::spawn(async move {
            transport::serve(&endpoint, &[Role::Ps], hello, shutdown, handler).await;
        });
        (addr, stop)
    }

    /// A process server's forwarder to `addr`, with a window of 8.
    fn forwarder(
        dir: &std::path::Path,
        spool: &Arc<Spool>,
        addr: SocketAddr,
    ) -> (
        tokio::task::JoinHandle<()>,
        tokio::sync::watch::Sender<bool>,
    ) {
        let endpoint = transport::client_endpoint(&tls(dir, Role::Ps, "ps1")).expect("ps endpoint");
        let hello = Message::Hello {
            role: Role::Ps,
            name: "ps1".into(),
            software: "test".into(),
        };
        let link = MasterLink::new(endpoint, addr, hello);
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        (
            tokio::spawn(forward_loop(spool.clone(), link, 8, shutdown)),
            stop,
        )
    }

    /// A master target on loopback that answers every record of disk `stuck` with
    /// `stuck_answer` (counting them) and acknowledges every other record.
    async fn master(
        dir: &std::path::Path,
        stuck_answer: ErrorCode,
        seen: Arc<Seen>,
    ) -> (SocketAddr, tokio::sync::watch::Sender<bool>) {
        serve_tags(dir, move |t| {
            let seen = seen.clone();
            async move {
                if t.disk == "stuck" {
                    seen.refused.fetch_add(1, Ordering::SeqCst);
                    return Message::error(stuck_answer, "paused: failing over");
                }
                seen.arrivals
                    .lock()
                    .expect("arrivals")
                    .push(std::time::Instant::now());
                Message::DurableAck {
                    disk: t.disk,
                    generation: t.generation,
                    seq: t.seq,
                }
            }
        })
        .await
    }

    /// Spools one record of disk `stuck` and `moving` records of disk `moving`, and
    /// forwards them to a master target that answers `stuck` with `answer`; returns
    /// once `moving` is drained (at most 60 s): the spool, how often `stuck` was
    /// refused meanwhile, and the longest wait between two records of `moving`.
    async fn forward_past_a_stuck_disk(
        answer: ErrorCode,
        moving: u64,
    ) -> (Arc<Spool>, u64, Duration) {
        let dir = tempfile::tempdir().expect("tempdir");
        pki::init_ca(dir.path()).expect("ca");
        let seen = Arc::new(Seen::default());
        let (addr, stop) = master(dir.path(), answer, seen.clone()).await;
        let spool = Spool::open(&dir.path().join("spool"), 64 << 20).expect("spool");
        let m = tag("stuck", 0);
        spool.append(&m, m.encode()).await.expect("append");
        for seq in 0..moving {
            let m = tag("moving", seq);
            spool.append(&m, m.encode()).await.expect("append");
        }
        let (forwarder, ps_stop) = forwarder(dir.path(), &spool, addr);
        let drained = |s: &Spool| {
            s.next_unsent(
                &BTreeSet::new(),
                10_000,
                &mut HashMap::new(),
                &Default::default(),
            )
            .iter()
            .all(|k| k.0 != "moving")
        };
        let until = tokio::time::Instant::now() + Duration::from_secs(60);
        while !drained(&spool) && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            drained(&spool),
            "disk `moving` was not forwarded within 60 s"
        );
        // One more moment for a final answer to `stuck` to be acted on.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = ps_stop.send(true);
        let _ = forwarder.await;
        let _ = stop.send(true);
        let arrivals = seen.arrivals.lock().expect("arrivals").clone();
        let longest = arrivals
            .windows(2)
            .map(|w| w[1].saturating_duration_since(w[0]))
            .max()
            .unwrap_or_default();
        (spool, seen.refused.load(Ordering::SeqCst), longest)
    }

    /// A disk the master target cannot take records of yet (paused by a failover)
    /// waits on its own: the other disks' records flow meanwhile (the forwarder never
    /// stops for the refusal: no wait of the 200 ms a refusal once cost every disk),
    /// and the stuck one is tried again later, its record kept.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_disk_backs_off_alone() {
        let (spool, refused, longest) =
            forward_past_a_stuck_disk(ErrorCode::Unavailable, 400).await;
        assert!(refused >= 1, "the stuck disk was tried");
        assert!(
            longest < Duration::from_millis(150),
            "the other disk's records stopped for {longest:?} (the stuck disk was refused {refused} times)"
        );
        let left = spool.next_unsent(
            &BTreeSet::new(),
            10,
            &mut HashMap::new(),
            &Default::default(),
        );
        assert_eq!(
            left,
            vec![("stuck".to_string(), 1, 0)],
            "the stuck record is kept"
        );
    }

    /// A record the master target will never want (its group was committed there) is
    /// dropped from the spool on that final answer instead of being held for ever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_answered_gone_leaves_the_spool() {
        let (spool, refused, _) = forward_past_a_stuck_disk(ErrorCode::Gone, 20).await;
        assert_eq!(refused, 1, "a final answer is not asked again");
        assert_eq!(spool.usage().0, 0, "nothing is left in the spool");
    }

    /// Found by the minute of process-server and master-target kills: after a restart
    /// the spool held seq 0 of a disk (its segment not yet retired) and then seq 5:
    /// seqs 1-4 had been acknowledged and their segment retired. The master target
    /// acknowledged the resent seq 0 as a duplicate, and the forwarder, counting only
    /// what it had sent itself, waited for a seq 1 that would never come: the disk
    /// stopped for good. The master target's ack names the highest seq it holds
    /// durably, and the forwarder goes on from there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_gap_the_master_target_already_holds_does_not_stop_the_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        pki::init_ca(dir.path()).expect("ca");
        // Durable at the master target: seqs 0-4.
        let next = Arc::new(AtomicU64::new(5));
        let (addr, stop) = serve_tags(dir.path(), {
            let next = next.clone();
            move |t| {
                let next = next.clone();
                async move {
                    let n = next.load(Ordering::SeqCst);
                    if t.seq > n {
                        // The real master target holds a record past a gap for minutes.
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        return Message::error(ErrorCode::Unavailable, "gap");
                    }
                    if t.seq == n {
                        next.store(n + 1, Ordering::SeqCst);
                    }
                    Message::DurableAck {
                        disk: t.disk,
                        generation: t.generation,
                        seq: next.load(Ordering::SeqCst) - 1,
                    }
                }
            }
        })
        .await;
        let spool = Spool::open(&dir.path().join("spool"), 64 << 20).expect("spool");
        for seq in [0, 5] {
            let m = tag("d", seq);
            spool.append(&m, m.encode()).await.expect("append");
        }
        let (forwarder, ps_stop) = forwarder(dir.path(), &spool, addr);
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        while spool.usage().0 > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let left = spool.usage().0;
        let _ = ps_stop.send(true);
        let _ = forwarder.await;
        let _ = stop.send(true);
        assert_eq!(left, 0, "seq 5 was never forwarded");
        assert_eq!(next.load(Ordering::SeqCst), 6, "seq 5 applied");
    }

    /// An ack names the highest durable seq of its own generation only: an ack of
    /// another generation, or one below the key's seq, never moves the disk on, and
    /// the highest seen is kept.
    #[test]
    fn a_durable_ack_moves_on_only_within_its_generation() {
        let mut sent = HashMap::new();
        let key: Key = ("d".into(), 2, 4);
        durable_through(&mut sent, &key, 1, 9);
        assert!(
            sent.is_empty(),
            "an ack of generation 1 moved a generation-2 record on"
        );
        durable_through(&mut sent, &key, 3, 9);
        assert!(
            sent.is_empty(),
            "an ack of generation 3 moved a generation-2 record on"
        );
        durable_through(&mut sent, &key, 2, 3);
        assert!(sent.is_empty(), "an ack below the record's own seq counted");
        durable_through(&mut sent, &key, 2, 7);
        assert_eq!(sent.get("d"), Some(&(2, 7)));
        durable_through(&mut sent, &key, 2, 5);
        assert_eq!(
            sent.get("d"),
            Some(&(2, 7)),
            "a lower ack moved the disk back"
        );
    }
}
