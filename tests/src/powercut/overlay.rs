//! The overlay of one file's unsynced changes: an extent map of written bytes and
//! punched holes plus the pending length, merged over the backing file on reads and
//! written into it on fsync (or, in part, by a `KeepSome` cut).

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::time::SystemTime;

use super::sys::to_usize;

/// The bytes of one unsynced extent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Payload {
    /// Written data.
    Bytes(Vec<u8>),
    /// A punched hole or zeroed range of this length.
    Zeros(u64),
}

impl Payload {
    pub(super) fn len(&self) -> u64 {
        match self {
            Payload::Bytes(b) => b.len() as u64,
            Payload::Zeros(n) => *n,
        }
    }

    /// The part `from..to` (offsets into this payload, `from <= to <= len`).
    pub(super) fn part(&self, from: u64, to: u64) -> Payload {
        match self {
            Payload::Bytes(b) => Payload::Bytes(b[to_usize(from)..to_usize(to)].to_vec()),
            Payload::Zeros(_) => Payload::Zeros(to - from),
        }
    }
}

/// One file's unsynced changes. Invariants: extents do not overlap and end at or
/// before `len`; `floor <= len`; backing bytes below `floor` are still valid, those
/// at or past it read as zero unless an extent covers them.
#[derive(Debug, Clone)]
pub(super) struct Overlay {
    pub(super) extents: BTreeMap<u64, Payload>,
    /// Logical length.
    pub(super) len: u64,
    /// The smallest length the file was truncated to since its last fsync (the
    /// durable length if none).
    pub(super) floor: u64,
    pub(super) modified: SystemTime,
}

impl Overlay {
    pub(super) fn new(durable_len: u64) -> Overlay {
        Overlay {
            extents: BTreeMap::new(),
            len: durable_len,
            floor: durable_len,
            modified: SystemTime::now(),
        }
    }

    pub(super) fn write(&mut self, offset: u64, payload: Payload) {
        let n = payload.len();
        if n == 0 {
            return;
        }
        let end = offset.saturating_add(n);
        self.remove_range(offset, end);
        self.extents.insert(offset, payload);
        self.len = self.len.max(end);
        self.modified = SystemTime::now();
    }

    /// Drops overlay bytes in `start..end`, splitting extents that straddle it.
    pub(super) fn remove_range(&mut self, start: u64, end: u64) {
        // Extents are disjoint and sorted: walking back from the last one starting
        // before `end`, the first that ends at or before `start` ends the overlap.
        let overlapping: Vec<u64> = self
            .extents
            .range(..end)
            .rev()
            .take_while(|(s, p)| **s + p.len() > start)
            .map(|(s, _)| *s)
            .collect();
        for s in overlapping {
            let Some(p) = self.extents.remove(&s) else {
                continue;
            };
            let p_end = s + p.len();
            if s < start {
                self.extents.insert(s, p.part(0, start - s));
            }
            if p_end > end {
                self.extents.insert(end, p.part(end - s, p.len()));
            }
        }
    }

    pub(super) fn set_len(&mut self, new_len: u64) {
        if new_len < self.len {
            self.remove_range(new_len, self.len);
            self.floor = self.floor.min(new_len);
        }
        self.len = new_len;
        self.modified = SystemTime::now();
    }

    /// Copies overlay bytes over `buf`, which holds the file from `offset`.
    pub(super) fn copy_onto(&self, offset: u64, buf: &mut [u8]) {
        let end = offset + buf.len() as u64;
        for (s, p) in self
            .extents
            .range(..end)
            .rev()
            .take_while(|(s, p)| **s + p.len() > offset)
        {
            let from = (*s).max(offset);
            let to = (*s + p.len()).min(end);
            let dst = &mut buf[to_usize(from - offset)..to_usize(to - offset)];
            match p {
                Payload::Bytes(b) => dst.copy_from_slice(&b[to_usize(from - s)..to_usize(to - s)]),
                Payload::Zeros(_) => dst.fill(0),
            }
        }
    }

    pub(super) fn bytes(&self) -> u64 {
        self.extents.values().map(Payload::len).sum()
    }
}

/// Reads `size` bytes at `offset` of a file: `backing` merged with its overlay.
pub(super) fn read_merged(
    backing: &File,
    overlay: Option<&Overlay>,
    offset: u64,
    size: u32,
) -> io::Result<Vec<u8>> {
    let (len, valid) = match overlay {
        Some(o) => (o.len, o.floor),
        None => {
            let len = backing.metadata()?.len();
            (len, len)
        }
    };
    if offset >= len {
        return Ok(Vec::new());
    }
    let n = u64::from(size).min(len - offset);
    let mut buf = vec![0u8; to_usize(n)];
    if offset < valid {
        let from_backing = to_usize((valid - offset).min(n));
        read_full_at(backing, &mut buf[..from_backing], offset)?;
    }
    if let Some(o) = overlay {
        o.copy_onto(offset, &mut buf);
    }
    Ok(buf)
}

/// Writes `extents` of `overlay` into `file`; with `set_size`, also its truncates and
/// final length. Idempotent, so a failed fsync may be retried.
pub(super) fn apply<'a>(
    file: &File,
    overlay: &Overlay,
    extents: impl IntoIterator<Item = (u64, &'a Payload)>,
    set_size: bool,
) -> io::Result<()> {
    if set_size && file.metadata()?.len() > overlay.floor {
        file.set_len(overlay.floor)?;
    }
    for (offset, payload) in extents {
        match payload {
            Payload::Bytes(b) => file.write_all_at(b, offset)?,
            Payload::Zeros(n) => zero_range(file, offset, *n)?,
        }
    }
    if set_size && file.metadata()?.len() != overlay.len {
        file.set_len(overlay.len)?;
    }
    Ok(())
}

/// Punches `offset..offset+len` (keeping the size), or writes zeros where the backing
/// fs cannot punch.
pub(super) fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EFBIG));
    };
    // SAFETY: fallocate on a descriptor `file` owns; no memory of ours is involved.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            n,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(err);
    }
    // Past the end the file reads as zeros anyway; write zeros up to it.
    let end = offset.saturating_add(len).min(file.metadata()?.len());
    let zeros = vec![0u8; 1 << 20];
    let mut at = offset;
    while at < end {
        let n = (end - at).min(zeros.len() as u64);
        file.write_all_at(&zeros[..to_usize(n)], at)?;
        at += n;
    }
    Ok(())
}

pub(super) fn read_full_at(file: &File, buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset) {
            // Past the backing file's end: the rest stays zero (a sparse extend).
            Ok(0) => break,
            Ok(n) => {
                done += n;
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs::{self, OpenOptions};

    use super::*;

    fn bytes(s: &str) -> Payload {
        Payload::Bytes(s.as_bytes().to_vec())
    }

    /// The overlay's view of `0..len`, with backing bytes `backing` below `floor`.
    fn view(o: &Overlay, backing: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; to_usize(o.len)];
        let valid = to_usize(o.floor.min(backing.len() as u64));
        buf[..valid].copy_from_slice(&backing[..valid]);
        o.copy_onto(0, &mut buf);
        buf
    }

    #[test]
    fn overlapping_writes_keep_the_newest_bytes() {
        let mut o = Overlay::new(10);
        o.write(2, bytes("aaaa"));
        o.write(4, bytes("bbbb"));
        o.write(0, bytes("c"));
        o.write(3, bytes("d"));
        assert_eq!(view(&o, b"0123456789"), b"c1adbbbb89");
        // Disjoint extents, each a piece of one write.
        let starts: Vec<u64> = o.extents.keys().copied().collect();
        assert_eq!(starts, vec![0, 2, 3, 4]);
        assert_eq!(o.bytes(), 1 + 1 + 1 + 4);
    }

    #[test]
    fn a_write_inside_an_extent_splits_it() {
        let mut o = Overlay::new(0);
        o.write(0, bytes("xxxxxxxx"));
        o.write(3, bytes("yy"));
        assert_eq!(view(&o, b""), b"xxxyyxxx");
        assert_eq!(o.extents.len(), 3);
    }

    #[test]
    fn truncate_then_extend_reads_zeros_not_old_bytes() {
        let mut o = Overlay::new(8);
        o.write(6, bytes("zz"));
        o.set_len(2);
        o.set_len(6);
        o.write(8, bytes("q"));
        assert_eq!(o.floor, 2);
        assert_eq!(view(&o, b"abcdefgh"), b"ab\0\0\0\0\0\0q");
    }

    #[test]
    fn sparse_write_past_the_end_and_punch() {
        let mut o = Overlay::new(4);
        o.write(10, bytes("end"));
        o.write(1, Payload::Zeros(2));
        assert_eq!(o.len, 13);
        assert_eq!(view(&o, b"abcd"), b"a\0\0d\0\0\0\0\0\0end");
    }

    #[test]
    fn apply_makes_the_backing_file_what_reads_showed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        fs::write(&path, b"0123456789").expect("write backing");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open backing");
        let mut o = Overlay::new(10);
        o.write(8, bytes("XY"));
        o.set_len(5);
        o.write(7, bytes("w"));
        o.write(1, Payload::Zeros(1));
        let shown = read_merged(&file, Some(&o), 0, 100).expect("read merged");
        assert_eq!(shown, b"0\x00234\0\0w");
        apply(&file, &o, o.extents.iter().map(|(k, v)| (*k, v)), true).expect("apply");
        assert_eq!(fs::read(&path).expect("read backing"), shown);
        assert_eq!(
            read_merged(&file, None, 0, 100).expect("read backing through fd"),
            shown
        );
    }
}
