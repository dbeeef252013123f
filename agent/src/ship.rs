//! Shipping, for every source: the one place that cuts extents into batches, gives
//! batches and tags their seqs in the disk's current generation, keeps several in
//! flight at once (the send window, `in_flight`), counts the process server's
//! durable acknowledgements and records the stream's next seq once they are all in.
//!
//! The sources only say what changed: the scan pass builds units ([`crate::sync`]);
//! the continuous sources are [`ChangeStream`]s of [`Change`]s, batches and cuts in
//! the order they must land ([`Syncer::ship_stream`]); the trace source's point hands
//! its paused blocks and the cut to [`Syncer::ship_changes`] directly. A refused batch
//! is never resent here in continuous tracking: the master target asks for a new
//! generation (the check-in directive), which resyncs by scan.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail};
use boomerang_common::delta::MAX_EXTENT_LEN;
use boomerang_common::message::{Message, Tag, TagKind};
use boomerang_common::{Batch, ChunkHash, Codec, Extent};
use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::link::PsLink;
use crate::source::ChangeStream;
use crate::sync::{DiskCtx, Syncer};
use crate::track_trace::TrackReport;

/// What a source hands to shipping, in the order it must reach the master target:
/// a batch of extents, or the cut of a point after everything before it.
#[derive(Debug)]
pub(crate) enum Change {
    /// Extents of one batch (its seq is given at shipping).
    Batch(Vec<Extent>),
    /// A point: tagged after every change before it is held by the process server.
    Cut {
        /// Crash- or app-consistent.
        kind: TagKind,
        /// The point's id.
        point_id: u64,
        /// When the cut was taken (ms since the epoch).
        time_ms: u64,
    },
}

/// The send window: at most `in_flight` batches sent and not yet acknowledged, each
/// known by a token of the caller's (its unit or seq).
pub(crate) struct Window {
    link: Arc<PsLink>,
    slots: Arc<Semaphore>,
    sends: JoinSet<Result<u64, String>>,
    flying: Arc<AtomicU64>,
    peak: Arc<AtomicU64>,
}

impl Window {
    pub(crate) fn new(link: Arc<PsLink>, in_flight: usize) -> Self {
        Window {
            link,
            slots: Arc::new(Semaphore::new(in_flight.max(1))),
            sends: JoinSet::new(),
            flying: Arc::new(AtomicU64::new(0)),
            peak: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Waits for room in the window. The future holds no borrow of the window, so it
    /// can race [`Window::next`] in one `select!`; dropping it loses nothing.
    pub(crate) fn slot(
        &self,
    ) -> impl Future<Output = anyhow::Result<OwnedSemaphorePermit>> + Send + 'static {
        let slots = self.slots.clone();
        async move {
            slots
                .acquire_owned()
                .await
                .map_err(|e| anyhow!("the send window closed: {e}"))
        }
    }

    /// Sends `frame` (a batch) in the room `slot` holds, until it is acknowledged.
    pub(crate) fn send(&mut self, slot: OwnedSemaphorePermit, token: u64, frame: Bytes) {
        let link = self.link.clone();
        let (flying, peak) = (self.flying.clone(), self.peak.clone());
        self.sends.spawn(async move {
            peak.fetch_max(flying.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
            let r = match link.request(frame).await {
                Ok(Message::DurableAck { .. }) => Ok(token),
                Ok(other) => Err(format!("unexpected answer {} to a batch", other.name())),
                Err(e) => Err(e.to_string()),
            };
            flying.fetch_sub(1, Ordering::SeqCst);
            drop(slot);
            r
        });
    }

    /// Whether nothing is in flight.
    pub(crate) fn is_empty(&self) -> bool {
        self.sends.is_empty()
    }

    /// The next send to end: its token once the process server holds it durably, or
    /// why it failed. `None` when nothing is in flight. Cancel-safe.
    pub(crate) async fn next(&mut self) -> Option<Result<u64, String>> {
        let done = self.sends.join_next().await?;
        Some(done.unwrap_or_else(|e| Err(format!("send task failed: {e}"))))
    }

    /// Drops every send still in flight (they are sent again later, as unacknowledged).
    pub(crate) fn abort(&mut self) {
        self.sends.abort_all();
    }

    /// Most sends in flight at once so far.
    pub(crate) fn peak(&self) -> u64 {
        self.peak.load(Ordering::SeqCst)
    }
}

/// Cuts a source's extents, in order, into batches of at most `cap` raw bytes (one
/// extent bigger than that makes a batch of its own).
#[derive(Debug)]
pub(crate) struct Batches {
    cap: u64,
    raw: u64,
    done: Vec<Vec<Extent>>,
    open: Vec<Extent>,
}

impl Batches {
    pub(crate) fn new(cap: u64) -> Self {
        Batches {
            cap,
            raw: 0,
            done: Vec::new(),
            open: Vec::new(),
        }
    }

    /// Adds `extent` to the open batch, first closing it when it would grow past the cap.
    pub(crate) fn push(&mut self, extent: Extent) {
        if self.raw + u64::from(extent.len) > self.cap && !self.open.is_empty() {
            self.close();
        }
        self.raw += u64::from(extent.len);
        self.open.push(extent);
    }

    /// Closes the open batch (nothing after this point may share it: a tag follows).
    pub(crate) fn close(&mut self) {
        if !self.open.is_empty() {
            self.done.push(std::mem::take(&mut self.open));
        }
        self.raw = 0;
    }

    /// The batches closed so far, taken out.
    pub(crate) fn take_closed(&mut self) -> Vec<Vec<Extent>> {
        std::mem::take(&mut self.done)
    }

    /// Every batch, the open one closed.
    pub(crate) fn finish(mut self) -> Vec<Vec<Extent>> {
        self.close();
        self.done
    }
}

/// Zero extents for `[offset, offset + len)`: no payload, split to the wire's extent
/// cap. `hashes` remembers the hash of each zero length seen, as most repeat.
pub(crate) fn zero_extents(
    offset: u64,
    len: u64,
    hashes: &mut Vec<(u32, ChunkHash)>,
) -> Vec<Extent> {
    let end = offset.saturating_add(len);
    let mut out = Vec::new();
    let mut at = offset;
    while at < end {
        let n = u32::try_from((end - at).min(u64::from(MAX_EXTENT_LEN))).unwrap_or(MAX_EXTENT_LEN);
        let hash = match hashes.iter().find(|(l, _)| *l == n) {
            Some((_, h)) => *h,
            None => {
                let h = ChunkHash::of_zeros(n as usize);
                hashes.push((n, h));
                h
            }
        };
        out.push(Extent {
            offset: at,
            len: n,
            hash,
            codec: Codec::Zero,
            payload: Bytes::new(),
        });
        at += u64::from(n);
    }
    out
}

impl Syncer {
    /// Ships what `stream` has pending, step by step: each step's changes in order
    /// ([`Syncer::ship_changes`]), released once the process server holds them, put
    /// back when they could not be built or shipped. Returns the points tagged.
    pub(crate) async fn ship_stream(
        &self,
        disk: &mut DiskCtx,
        stream: &mut impl ChangeStream,
        report: &mut TrackReport,
    ) -> anyhow::Result<Vec<(TagKind, u64)>> {
        let mut tagged = Vec::new();
        loop {
            let step = match stream.next(self, disk).await {
                Ok(Some(step)) => step,
                Ok(None) => return Ok(tagged),
                Err(e) => {
                    stream.put_back();
                    return Err(e);
                }
            };
            match self.ship_changes(disk, step, report).await {
                Ok(t) => tagged.extend(t),
                Err(e) => {
                    stream.put_back();
                    return Err(e);
                }
            }
            stream.durable()?;
        }
    }

    /// Ships `changes` in order: the batches between two cuts together (several in
    /// flight), each cut's tag once the process server holds everything before it.
    /// Returns the points tagged.
    pub(crate) async fn ship_changes(
        &self,
        disk: &mut DiskCtx,
        changes: impl IntoIterator<Item = Change>,
        report: &mut TrackReport,
    ) -> anyhow::Result<Vec<(TagKind, u64)>> {
        let mut batches = Vec::new();
        let mut tagged = Vec::new();
        for change in changes {
            match change {
                Change::Batch(extents) => batches.push(extents),
                Change::Cut {
                    kind,
                    point_id,
                    time_ms,
                } => {
                    self.ship(disk, std::mem::take(&mut batches), report)
                        .await?;
                    self.tag(disk, kind, point_id, time_ms).await?;
                    tagged.push((kind, point_id));
                }
            }
        }
        self.ship(disk, batches, report).await?;
        Ok(tagged)
    }

    /// Ships built batches with the disk's next seqs, several in flight, and records
    /// the new next seq once the process server holds them all.
    pub(crate) async fn ship(
        &self,
        disk: &mut DiskCtx,
        batches: Vec<Vec<Extent>>,
        report: &mut TrackReport,
    ) -> anyhow::Result<()> {
        if batches.is_empty() {
            return Ok(());
        }
        let generation = disk.state.get().generation;
        let base = disk.state.get().next_seq;
        let count = batches.len() as u64;
        let mut window = Window::new(self.link.clone(), self.config.in_flight);
        for (i, extents) in batches.into_iter().enumerate() {
            let seq = base + i as u64;
            let batch = Batch {
                disk: disk.id.clone(),
                generation,
                seq,
                extents,
            };
            report.bytes_shipped += batch.raw_len();
            let frame = Message::Batch(batch).encode();
            let slot = window.slot().await?;
            window.send(slot, seq, frame);
        }
        while let Some(done) = window.next().await {
            if let Err(e) = done {
                bail!("disk {}: shipping failed: {e}", disk.id);
            }
        }
        report.batches += count;
        report.peak_in_flight = report.peak_in_flight.max(window.peak());
        let mut p = disk.state.get().clone();
        p.next_seq = base + count;
        disk.state.store(p)?;
        Ok(())
    }

    /// Tags the disk at its next seq (after everything shipped so far) for a cut taken
    /// at `time_ms`, and records the seq after it.
    async fn tag(
        &self,
        disk: &mut DiskCtx,
        kind: TagKind,
        point_id: u64,
        time_ms: u64,
    ) -> anyhow::Result<()> {
        let mut p = disk.state.get().clone();
        self.ship_tag(disk, p.next_seq, kind, point_id, time_ms)
            .await?;
        p.next_seq += 1;
        disk.state.store(p)?;
        Ok(())
    }

    /// Sends a tag at `seq` of the disk's current generation, for a cut taken at
    /// `time_ms`, and waits until the process server holds it durably.
    pub(crate) async fn ship_tag(
        &self,
        disk: &DiskCtx,
        seq: u64,
        kind: TagKind,
        point_id: u64,
        time_ms: u64,
    ) -> anyhow::Result<()> {
        let tag = Tag {
            disk: disk.id.clone(),
            generation: disk.state.get().generation,
            seq,
            kind,
            point_id,
            time_ms,
            group: self.config.group(),
        };
        match self.link.request(Message::Tag(tag).encode()).await? {
            Message::DurableAck { .. } => Ok(()),
            other => bail!(
                "tag for disk {}: unexpected answer {}",
                disk.id,
                other.name()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(offset: u64, len: u32) -> Extent {
        Extent {
            offset,
            len,
            hash: ChunkHash::of_zeros(0),
            codec: Codec::Raw,
            payload: Bytes::new(),
        }
    }

    #[test]
    fn batches_close_at_the_cap_and_at_a_tag() {
        let mut b = Batches::new(100);
        for i in 0..5 {
            b.push(data(i * 40, 40));
        }
        b.close(); // a tag
        assert_eq!(
            b.take_closed().iter().map(Vec::len).collect::<Vec<_>>(),
            [2, 2, 1]
        );
        b.push(data(0, 300)); // bigger than the cap: a batch of its own
        b.push(data(300, 10));
        assert_eq!(b.finish().iter().map(Vec::len).collect::<Vec<_>>(), [1, 1]);
    }

    #[test]
    fn zero_extents_split_at_the_wire_cap_and_cover_the_range() {
        let mut hashes = Vec::new();
        let len = 2 * u64::from(MAX_EXTENT_LEN) + 5;
        let z = zero_extents(7, len, &mut hashes);
        assert_eq!(z.len(), 3);
        assert_eq!(z[0].offset, 7);
        assert_eq!(z.iter().map(|e| u64::from(e.len)).sum::<u64>(), len);
        assert!(z
            .windows(2)
            .all(|w| w[0].offset + u64::from(w[0].len) == w[1].offset));
        assert!(z
            .iter()
            .all(|e| e.codec == Codec::Zero && e.payload.is_empty()));
        assert_eq!(z[2].hash, ChunkHash::of_zeros(5));
        assert_eq!(hashes.len(), 2, "one hash per zero length");
    }
}
