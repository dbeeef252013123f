//! What the fuzz targets share: a reader of fuzz bytes, and the fix-up that rewrites
//! seglog checksums so mutations reach past them.

use boomerang_common::seglog::format::{RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};

/// Reads fuzz bytes front to back; past the end everything is zero.
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    /// The next `n` bytes, fewer at the end.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }
    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(usize::MAX)
    }
    /// Whether nothing is left.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The next byte.
    pub fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }
    /// The next two bytes, little-endian.
    pub fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | (u16::from(self.u8()) << 8)
    }
    /// The next eight bytes, little-endian.
    pub fn u64(&mut self) -> u64 {
        let mut a = [0u8; 8];
        let b = self.take(8);
        a[..b.len()].copy_from_slice(b);
        u64::from_le_bytes(a)
    }
}

/// The little-endian u32 at the start of `b` (at least 4 bytes).
pub fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// The little-endian u64 at the start of `b` (at least 8 bytes).
pub fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// crc32 of the parts, back to back.
pub fn crc32(parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

/// The first lsn a segment's header names (bytes 16..24), 0 when it is too short.
pub fn header_lsn(bytes: &[u8]) -> u64 {
    if bytes.len() >= 24 {
        le_u64(&bytes[16..24])
    } else {
        0
    }
}

/// Rewrites the checksums (and, with `lsns`, the record lsns, contiguous from the
/// header's) of whatever parses as a seglog segment and its records, so mutations
/// reach past them. The layout is `common/src/seglog/format.rs`'s, read independently.
pub fn fix_up(bytes: &mut [u8], lsns: bool) {
    if bytes.len() < SEGMENT_HEADER_LEN {
        return;
    }
    let crc = crc32(&[&bytes[..28]]);
    bytes[28..32].copy_from_slice(&crc.to_le_bytes());
    let mut lsn = le_u64(&bytes[16..24]);
    let mut at = SEGMENT_HEADER_LEN;
    while at + RECORD_HEADER_LEN <= bytes.len() {
        let len = le_u32(&bytes[at + 8..]) as usize;
        let Some(end) = (at + RECORD_HEADER_LEN)
            .checked_add(len)
            .filter(|&e| e <= bytes.len())
        else {
            break;
        };
        if lsns {
            bytes[at + 12..at + 20].copy_from_slice(&lsn.to_le_bytes());
            lsn = lsn.wrapping_add(1);
        }
        let crc = crc32(&[&bytes[at..at + 20], &bytes[at + RECORD_HEADER_LEN..end]]);
        bytes[at + 20..at + 24].copy_from_slice(&crc.to_le_bytes());
        at = end;
    }
}
