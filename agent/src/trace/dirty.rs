//! The dirty set: which byte ranges of the disk were written and which were discarded
//! since the last [`DirtySet::take`], at 4 KiB granularity, as coalesced runs.
//!
//! A write marks its 4 KiB blocks written (and no longer discarded). A discard marks the
//! blocks it covers completely as discarded (and no longer written); a block it covers
//! only in part counts as written, so the agent reads what the device now holds there.
//!
//! Memory is bounded by [`DirtySet::new`]'s `max_runs`, not by the disk size: when the
//! runs outgrow it the granule grows 16-fold (4 KiB, 64 KiB, 1 MiB, ...). Written runs
//! round outwards, discarded runs inwards with their cut-off edges becoming written;
//! both only ever add data to ship, never drop any.

use std::collections::BTreeMap;

/// Tracking granularity: a disk block as the agent ships it.
pub(crate) const BLOCK: u64 = 4096;

/// Byte runs `(offset, len)` in disk order.
pub(crate) type Extents = Vec<(u64, u64)>;

/// Growth of the granule per coarsening step (as a shift).
const COARSEN_STEP: u32 = 4;

/// Disjoint, non-adjacent byte runs `[start, end)`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct RunSet {
    runs: BTreeMap<u64, u64>,
}

impl RunSet {
    /// Adds `[s, e)`, merging with overlapping and adjacent runs.
    pub(crate) fn insert(&mut self, mut s: u64, mut e: u64) {
        if s >= e {
            return;
        }
        if let Some((&ps, &pe)) = self.runs.range(..=s).next_back() {
            if pe >= e {
                return;
            }
            if pe >= s {
                self.runs.remove(&ps);
                s = ps;
            }
        }
        while let Some((&ns, &ne)) = self.runs.range(s..=e).next() {
            self.runs.remove(&ns);
            e = e.max(ne);
        }
        self.runs.insert(s, e);
    }

    /// Removes `[s, e)`, splitting runs that stick out.
    pub(crate) fn remove(&mut self, s: u64, e: u64) {
        if s >= e {
            return;
        }
        if let Some((&ps, &pe)) = self.runs.range(..s).next_back() {
            if pe > s {
                self.runs.insert(ps, s);
                if pe > e {
                    self.runs.insert(e, pe);
                    return;
                }
            }
        }
        while let Some((&ns, &ne)) = self.runs.range(s..e).next() {
            self.runs.remove(&ns);
            if ne > e {
                self.runs.insert(e, ne);
                break;
            }
        }
    }

    /// Number of runs.
    pub(crate) fn len(&self) -> usize {
        self.runs.len()
    }

    /// Runs in disk order as `(offset, len)`.
    pub(crate) fn extents(&self) -> Extents {
        self.runs.iter().map(|(&s, &e)| (s, e - s)).collect()
    }

    /// Bytes covered.
    pub(crate) fn bytes(&self) -> u64 {
        self.runs.iter().map(|(&s, &e)| e - s).sum()
    }
}

fn floor(x: u64, g: u64) -> u64 {
    x / g * g
}

fn ceil(x: u64, g: u64) -> u64 {
    x.div_ceil(g).saturating_mul(g)
}

/// Written and discarded runs of one disk.
#[derive(Debug, Clone)]
pub(crate) struct DirtySet {
    writes: RunSet,
    discards: RunSet,
    /// log2 of the granule in blocks (0 = 4 KiB).
    shift: u32,
    max_runs: usize,
}

impl DirtySet {
    /// An empty set that keeps at most about `max_runs` runs (at least 16).
    pub(crate) fn new(max_runs: usize) -> Self {
        DirtySet {
            writes: RunSet::default(),
            discards: RunSet::default(),
            shift: 0,
            max_runs: max_runs.max(16),
        }
    }

    /// Current granule in bytes.
    pub(crate) fn granule(&self) -> u64 {
        BLOCK << self.shift
    }

    /// Records a write of `len` bytes at `offset`.
    pub(crate) fn write(&mut self, offset: u64, len: u64) {
        let g = self.granule();
        let (s, e) = (floor(offset, g), ceil(offset.saturating_add(len), g));
        self.writes.insert(s, e);
        self.discards.remove(s, e);
        self.bound();
    }

    /// Records a discard of `len` bytes at `offset`.
    pub(crate) fn discard(&mut self, offset: u64, len: u64) {
        let g = self.granule();
        let end = offset.saturating_add(len);
        let (inner_s, inner_e) = (ceil(offset, g), floor(end, g));
        if inner_s >= inner_e {
            self.write(offset, len);
            return;
        }
        self.discards.insert(inner_s, inner_e);
        self.writes.remove(inner_s, inner_e);
        // Partly discarded edge granules: their content is now part old, part gone.
        if offset < inner_s {
            self.write(offset, inner_s - offset);
        }
        if end > inner_e {
            self.write(inner_e, end - inner_e);
        }
        self.bound();
    }

    /// Total runs held.
    pub(crate) fn runs(&self) -> usize {
        self.writes.len() + self.discards.len()
    }

    /// Written and discarded bytes held.
    pub(crate) fn bytes(&self) -> (u64, u64) {
        (self.writes.bytes(), self.discards.bytes())
    }

    /// Takes the runs out, leaving the set empty at 4 KiB granularity.
    pub(crate) fn take(&mut self) -> (Extents, Extents) {
        let out = (self.writes.extents(), self.discards.extents());
        self.writes = RunSet::default();
        self.discards = RunSet::default();
        self.shift = 0;
        out
    }

    /// Coarsens until the runs fit in half of `max_runs` (hysteresis).
    fn bound(&mut self) {
        if self.runs() <= self.max_runs {
            return;
        }
        while self.runs() > self.max_runs / 2 && self.shift < 40 {
            self.shift += COARSEN_STEP;
            let g = self.granule();
            let writes = std::mem::take(&mut self.writes);
            let discards = std::mem::take(&mut self.discards);
            for (s, len) in writes.extents() {
                self.writes.insert(floor(s, g), ceil(s + len, g));
            }
            for (s, len) in discards.extents() {
                let (is, ie) = (ceil(s, g), floor(s + len, g));
                if is < ie {
                    self.discards.insert(is, ie);
                    self.writes.insert(floor(s, g), is);
                    self.writes.insert(ie, ceil(s + len, g));
                } else {
                    self.writes.insert(floor(s, g), ceil(s + len, g));
                }
            }
            for (s, len) in self.discards.extents() {
                self.writes.remove(s, s + len);
            }
        }
        tracing::warn!(
            granule_kib = self.granule() / 1024,
            runs = self.runs(),
            "dirty set outgrew its run limit: tracking coarser until the next take"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 1024;

    fn set(runs: &[(u64, u64)]) -> RunSet {
        let mut r = RunSet::default();
        for &(s, e) in runs {
            r.insert(s, e);
        }
        r
    }

    #[test]
    fn insert_merges_overlapping_and_adjacent() {
        let mut r = set(&[(10, 20), (30, 40)]);
        r.insert(20, 30);
        assert_eq!(r.extents(), vec![(10, 30)]);
        r.insert(0, 5);
        r.insert(50, 60);
        r.insert(5, 55);
        assert_eq!(r.extents(), vec![(0, 60)]);
        r.insert(1, 2);
        assert_eq!(r.extents(), vec![(0, 60)]);
        r.insert(7, 7);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn remove_splits() {
        let mut r = set(&[(0, 100)]);
        r.remove(10, 20);
        assert_eq!(r.extents(), vec![(0, 10), (20, 80)]);
        r.remove(0, 10);
        r.remove(90, 200);
        assert_eq!(r.extents(), vec![(20, 70)]);
        let mut r = set(&[(0, 10), (20, 30), (40, 50)]);
        r.remove(5, 45);
        assert_eq!(r.extents(), vec![(0, 5), (45, 5)]);
    }

    fn idx(b: u64) -> usize {
        usize::try_from(b).expect("small block number")
    }

    /// A model of the set: one state per 4 KiB block, 0 clean, 1 written, 2 discarded.
    fn model_apply(m: &mut [u8], discard: bool, off: u64, len: u64) {
        let (s, e) = (off / BLOCK, (off + len).div_ceil(BLOCK));
        for b in s..e {
            let full = b * BLOCK >= off && (b + 1) * BLOCK <= off + len;
            m[idx(b)] = if discard && full { 2 } else { 1 };
        }
    }

    fn model_of(d: &DirtySet, blocks: usize) -> Vec<u8> {
        let (w, dis) = d.clone().take();
        let mut m = vec![0u8; blocks];
        for (runs, v) in [(w, 1u8), (dis, 2u8)] {
            for (s, len) in runs {
                for b in s / BLOCK..(s + len) / BLOCK {
                    assert_eq!(m[idx(b)], 0, "block {b} in both sets");
                    m[idx(b)] = v;
                }
            }
        }
        m
    }

    #[test]
    fn matches_a_block_model_on_random_ops() {
        // A small deterministic generator; the sequence is fixed so failures repeat.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let blocks = 256usize;
        let mut d = DirtySet::new(1 << 20);
        let mut m = vec![0u8; blocks];
        for _ in 0..5000 {
            let total = blocks as u64 * BLOCK;
            let off = next() % (total / 512 - 1) * 512;
            let len = (512 * (1 + next() % 64)).min(total - off);
            let discard = next() % 3 == 0;
            if discard {
                d.discard(off, len);
            } else {
                d.write(off, len);
            }
            model_apply(&mut m, discard, off, len);
        }
        assert_eq!(model_of(&d, blocks), m);
    }

    #[test]
    fn unaligned_writes_cover_whole_blocks() {
        let mut d = DirtySet::new(100);
        d.write(512, 512);
        d.write(3 * BLOCK + 3584, 1024);
        assert_eq!(d.take().0, vec![(0, BLOCK), (3 * BLOCK, 2 * BLOCK)]);
    }

    #[test]
    fn discard_edges_are_writes_and_writes_undo_discards() {
        let mut d = DirtySet::new(100);
        d.discard(2 * K, 20 * K);
        let (w, dis) = d.clone().take();
        assert_eq!(dis, vec![(4 * K, 16 * K)]);
        assert_eq!(w, vec![(0, 4 * K), (20 * K, 4 * K)]);
        d.write(8 * K, 4 * K);
        let (w, dis) = d.take();
        assert_eq!(dis, vec![(4 * K, 4 * K), (12 * K, 8 * K)]);
        assert_eq!(w, vec![(0, 4 * K), (8 * K, 4 * K), (20 * K, 4 * K)]);
    }

    #[test]
    fn coarsening_keeps_every_written_byte_and_bounds_runs() {
        let mut d = DirtySet::new(64);
        let mut written = Vec::new();
        for i in 0..1000u64 {
            let off = i * 3 * BLOCK;
            d.write(off, BLOCK);
            written.push(off);
        }
        d.discard(10_000 * BLOCK, 1000 * BLOCK);
        assert!(d.runs() <= 64, "{} runs", d.runs());
        assert!(d.granule() > BLOCK);
        let (w, dis) = d.take();
        let covered = |o: u64| w.iter().any(|&(s, l)| o >= s && o + BLOCK <= s + l);
        assert!(written.iter().all(|&o| covered(o)));
        // The discard survived, narrowed to whole granules, its edges written.
        let dbytes: u64 = dis.iter().map(|e| e.1).sum();
        assert!(dbytes > 0 && dbytes <= 1000 * BLOCK);
        for &(s, l) in &dis {
            assert!(s >= 10_000 * BLOCK && s + l <= 11_000 * BLOCK);
        }
        let discarded = |o: u64| dis.iter().any(|&(s, l)| o >= s && o + BLOCK <= s + l);
        for b in 10_000..11_000 {
            assert!(
                covered(b * BLOCK) || discarded(b * BLOCK),
                "block {b} dropped"
            );
        }
        // After take the set is fine-grained again.
        assert_eq!(d.granule(), BLOCK);
    }
}
