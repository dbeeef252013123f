//! The campaign's verifiable workload: stamped writes through the disk the agent
//! serves, and the check that a recovery point holds exactly a prefix of them.
//!
//! Every 4 KiB block a write puts down begins with [`MAGIC`] and the write's index
//! (1, 2, ...), the rest is seeded data or zeros. The writes go one at a time, each
//! returning before the next starts, so the agent's write-order journal sees them in
//! index order and every crash-consistent point is the disk after writes `1..=k` for
//! some `k`. The newest write of such a state is never overwritten, so `k` is the
//! highest index stamped anywhere in it: a point is right exactly when its bytes equal
//! the model replayed to that `k`. A lost acknowledged write, a torn batch, a point
//! made of two moments, or a before-image put back wrongly all fail this.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::rng::DataRng;

/// First bytes of every block a write stamps.
pub const MAGIC: [u8; 8] = *b"BMCHAOS1";
const BLOCK: usize = 4096;

/// One write: where, and its bytes.
#[derive(Debug, Clone)]
struct Write {
    index: u64,
    offset: u64,
    data: Vec<u8>,
}

/// The writes so far and the disk they make.
#[derive(Debug)]
pub struct Workload {
    size: u64,
    rng: DataRng,
    /// The disk after write `base_index` (the initial image for 0).
    base: Vec<u8>,
    base_index: u64,
    /// Writes after `base_index`, in order.
    history: Vec<Write>,
    /// The disk after every write so far.
    current: Vec<u8>,
    /// Wall time (ms) when the last write returned.
    last_write_ms: u64,
    /// A write that failed (the agent died under it): on the disk or not, so it is
    /// made again before any other.
    pending: Option<Write>,
}

impl Workload {
    /// Starts from the disk's initial bytes.
    pub fn new(initial: Vec<u8>, seed: u64) -> Workload {
        Workload {
            size: initial.len() as u64,
            rng: DataRng::new(seed ^ 0x5eed_c4a0_5eed),
            base: initial.clone(),
            base_index: 0,
            history: Vec::new(),
            current: initial,
            last_write_ms: 0,
            pending: None,
        }
    }

    /// Writes made so far (a pending one not counted).
    pub fn writes(&self) -> u64 {
        self.base_index + self.history.len() as u64
    }

    /// Wall time (ms) when the last write returned; a point cut after it holds all.
    pub fn last_write_ms(&self) -> u64 {
        self.last_write_ms
    }

    /// The disk as the writes so far left it.
    pub fn current(&self) -> &[u8] {
        &self.current
    }

    /// Makes `n` writes (4 to 64 KiB, 4 KiB aligned) to `disk`, the served file. A
    /// write that fails is left pending: one FUSE request the agent either applied to
    /// the disk or not, so both states are prefixes; [`Workload::retry`] makes it
    /// again once an agent serves the disk.
    pub fn write(&mut self, disk: &File, n: u64) -> std::io::Result<()> {
        for _ in 0..n {
            self.retry(disk)?;
            let blocks = self.rng.between(1, 16);
            let len = blocks * BLOCK as u64;
            let offset = self.rng.below(self.size / BLOCK as u64 - blocks + 1) * BLOCK as u64;
            let index = self.writes() + 1;
            let mut data = vec![0u8; usize::try_from(len).unwrap_or(BLOCK)];
            if self.rng.below(4) > 0 {
                self.rng.fill(&mut data);
            }
            for block in data.chunks_mut(BLOCK) {
                block[..8].copy_from_slice(&MAGIC);
                block[8..16].copy_from_slice(&index.to_le_bytes());
            }
            self.pending = Some(Write {
                index,
                offset,
                data,
            });
            self.retry(disk)?;
        }
        self.last_write_ms = boomerang_common::config::now_ms();
        Ok(())
    }

    /// Makes the pending write, if any.
    pub fn retry(&mut self, disk: &File) -> std::io::Result<()> {
        let Some(w) = self.pending.take() else {
            return Ok(());
        };
        if let Err(e) = disk.write_all_at(&w.data, w.offset) {
            self.pending = Some(w);
            return Err(e);
        }
        let at = usize::try_from(w.offset).unwrap_or(0);
        self.current[at..at + w.data.len()].copy_from_slice(&w.data);
        self.history.push(w);
        self.last_write_ms = boomerang_common::config::now_ms();
        Ok(())
    }

    /// Checks a point's bytes: `Ok(k)` when they are the disk after writes `1..=k`.
    pub fn check(&self, image: &[u8]) -> Result<u64, String> {
        if image.len() as u64 != self.size {
            return Err(format!("{} bytes, the disk has {}", image.len(), self.size));
        }
        let k = highest_stamp(image);
        if k < self.base_index {
            return Err(format!(
                "holds writes up to {k} only, but a point already checked held {}",
                self.base_index
            ));
        }
        if k > self.writes() {
            return Err(format!(
                "stamped with write {k}, only {} were made",
                self.writes()
            ));
        }
        let want = self.state_at(k);
        if want != image {
            let at = want
                .iter()
                .zip(image)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            let block = at / BLOCK * BLOCK;
            return Err(format!(
                "not the disk after writes 1..={k}: first difference at byte {at}, \
                 where the model has write {} and the point write {}",
                stamp(&want[block..]).unwrap_or(0),
                stamp(&image[block..]).unwrap_or(0)
            ));
        }
        Ok(k)
    }

    /// Forgets the writes up to `k` (points older than it are checked already and
    /// kept by their hashes), so the history stays bounded.
    pub fn forget_through(&mut self, k: u64) {
        if k <= self.base_index {
            return;
        }
        let keep_from = usize::try_from(k - self.base_index).unwrap_or(usize::MAX);
        for w in self.history.drain(..keep_from.min(self.history.len())) {
            let at = usize::try_from(w.offset).unwrap_or(0);
            self.base[at..at + w.data.len()].copy_from_slice(&w.data);
            self.base_index = w.index;
        }
    }

    fn state_at(&self, k: u64) -> Vec<u8> {
        let mut image = self.base.clone();
        for w in self.history.iter().take_while(|w| w.index <= k) {
            let at = usize::try_from(w.offset).unwrap_or(0);
            image[at..at + w.data.len()].copy_from_slice(&w.data);
        }
        image
    }
}

fn stamp(block: &[u8]) -> Option<u64> {
    (block.len() >= 16 && block[..8] == MAGIC)
        .then(|| u64::from_le_bytes(block[8..16].try_into().unwrap_or([0; 8])))
}

/// The highest write index stamped in `image` (0 when none is).
fn highest_stamp(image: &[u8]) -> u64 {
    image.chunks(BLOCK).filter_map(stamp).max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_passes_and_a_lost_or_torn_write_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk");
        let initial = vec![7u8; 1 << 20];
        std::fs::write(&path, &initial).expect("write the disk");
        let disk = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        let mut w = Workload::new(initial.clone(), 3);
        assert_eq!(w.check(&initial), Ok(0));
        w.write(&disk, 10).expect("writes");
        let after5 = w.state_at(5);
        assert_eq!(w.check(&after5), Ok(5));
        assert_eq!(w.check(w.current()), Ok(10));
        assert_eq!(std::fs::read(&path).expect("read"), w.current());
        // Write 4 lost: writes 1..=3 and 5.
        let mut lost = w.state_at(3);
        let w5 = &w.history[4];
        let at = usize::try_from(w5.offset).expect("small");
        lost[at..at + w5.data.len()].copy_from_slice(&w5.data);
        assert_ne!(lost, after5, "write 5 covers write 4 with this seed");
        assert!(w.check(&lost).is_err(), "a lost write passed");
        // A block of write 10 in the state after 5: a point of two moments.
        let mut mixed = after5.clone();
        let w10 = &w.history[9];
        let at = usize::try_from(w10.offset).expect("small");
        mixed[at..at + BLOCK].copy_from_slice(&w10.data[..BLOCK]);
        assert!(w.check(&mixed).is_err(), "a mixed point passed");
        // Forgetting keeps later checks working and refuses older states.
        w.forget_through(5);
        assert_eq!(w.check(w.current()), Ok(10));
        assert!(w.check(&w.state_at(5)).is_ok());
        assert!(w.check(&initial).is_err());
    }
}
