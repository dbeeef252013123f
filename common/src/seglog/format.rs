//! The segmented log's bytes on disk, with no IO: segment headers, record headers,
//! their checksums and the caps applied before anything is allocated.
//!
//! ```text
//!  segment header (32 bytes)
//!   0      4      6      8      12     16               24     28      32
//!   | BSEG | ver  | 0    | kind | 0    | first lsn      | 0    | crc32 |
//!   | 4 B  | u16  | u16  | 4 B  | u32  | u64            | u32  | u32   |   crc32 of bytes 0..28
//!
//!  record (24-byte header, then the payload)
//!   0      4     5      6      8             12           20      24
//!   | BREC | ver | kind | 0    | payload len | lsn        | crc32 | payload ...
//!   | 4 B  | u8  | u8   | u16  | u32         | u64        | u32   |   crc32 of bytes 0..20 and the payload
//! ```
//! All integers little endian. `kind` in the segment header names the log (`AJNL`
//! agent journal, `SPOL` spool, `UNDO` undo journal), so one log's segment is never
//! read as another's; `kind` in a record is the owning log's record type. Record lsns
//! are contiguous within a segment: record `i` has lsn `first lsn + i`.
//!
//! Versions: segment and record format 1. A header whose checksum holds but whose
//! version is another is *unsupported* (written by another build: refuse, never cut);
//! anything else that does not check out is *damaged*.

/// Bytes of a segment header.
pub const SEGMENT_HEADER_LEN: usize = 32;
/// Bytes of a record header.
pub const RECORD_HEADER_LEN: usize = 24;
/// Segment format version this build writes and reads.
pub const SEGMENT_VERSION: u16 = 1;
/// Record format version this build writes and reads.
pub const RECORD_VERSION: u8 = 1;
const SEGMENT_MAGIC: [u8; 4] = *b"BSEG";
const RECORD_MAGIC: [u8; 4] = *b"BREC";

/// Why bytes do not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bad {
    /// Torn, corrupt, or not this log's at all.
    Damaged(String),
    /// Intact but of another format version.
    Unsupported(String),
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// Encodes the header of a segment of log `kind` whose first record has `first_lsn`.
pub fn encode_segment_header(kind: [u8; 4], first_lsn: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..4].copy_from_slice(&SEGMENT_MAGIC);
    h[4..6].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    h[8..12].copy_from_slice(&kind);
    h[16..24].copy_from_slice(&first_lsn.to_le_bytes());
    let crc = crc32fast::hash(&h[..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Decodes a segment header of log `kind`; returns its first lsn.
pub fn decode_segment_header(h: &[u8], kind: [u8; 4]) -> Result<u64, Bad> {
    if h.len() < SEGMENT_HEADER_LEN {
        return Err(Bad::Damaged(format!(
            "segment header torn ({} of {SEGMENT_HEADER_LEN} bytes)",
            h.len()
        )));
    }
    if h[0..4] != SEGMENT_MAGIC {
        return Err(Bad::Damaged("bad segment magic".into()));
    }
    if crc32fast::hash(&h[..28]) != le_u32(&h[28..32]) {
        return Err(Bad::Damaged("segment header checksum mismatch".into()));
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != SEGMENT_VERSION {
        return Err(Bad::Unsupported(format!(
            "segment format version {version} (this build reads {SEGMENT_VERSION})"
        )));
    }
    if h[8..12] != kind {
        return Err(Bad::Damaged(format!(
            "segment of log {:?}, not {:?}",
            String::from_utf8_lossy(&h[8..12]),
            String::from_utf8_lossy(&kind)
        )));
    }
    Ok(le_u64(&h[16..24]))
}

/// A record header whose magic holds and whose length is within the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Format version.
    pub version: u8,
    /// The owning log's record type.
    pub kind: u8,
    /// Payload bytes after the header.
    pub payload_len: usize,
    /// The record's lsn.
    pub lsn: u64,
    crc: u32,
}

impl RecordHeader {
    /// Checks the magic and caps the payload length at `max_payload`: nothing is
    /// allocated for a record before this passes.
    pub fn parse(h: &[u8; RECORD_HEADER_LEN], max_payload: usize) -> Result<Self, Bad> {
        if h[0..4] != RECORD_MAGIC {
            return Err(Bad::Damaged("bad record magic".into()));
        }
        let payload_len = le_u32(&h[8..12]) as usize;
        if payload_len > max_payload {
            return Err(Bad::Damaged(format!(
                "record length {payload_len} exceeds the cap of {max_payload}"
            )));
        }
        Ok(RecordHeader {
            version: h[4],
            kind: h[5],
            payload_len,
            lsn: le_u64(&h[12..20]),
            crc: le_u32(&h[20..24]),
        })
    }

    /// Total bytes of the record.
    pub fn total_len(&self) -> u64 {
        (RECORD_HEADER_LEN + self.payload_len) as u64
    }

    /// Checks the checksum over the header and `payload`, then the version.
    pub fn verify(&self, h: &[u8; RECORD_HEADER_LEN], payload: &[u8]) -> Result<(), Bad> {
        let mut crc = crc32fast::Hasher::new();
        crc.update(&h[..20]);
        crc.update(payload);
        if crc.finalize() != self.crc {
            return Err(Bad::Damaged("record checksum mismatch".into()));
        }
        if self.version != RECORD_VERSION {
            return Err(Bad::Unsupported(format!(
                "record format version {} (this build reads {RECORD_VERSION})",
                self.version
            )));
        }
        Ok(())
    }
}

/// Encodes the header of a record of `kind` at `lsn` whose payload is the
/// concatenation of `parts`. The caller has checked the length against the log's cap.
pub fn encode_record_header(kind: u8, lsn: u64, parts: &[&[u8]]) -> [u8; RECORD_HEADER_LEN] {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[0..4].copy_from_slice(&RECORD_MAGIC);
    h[4] = RECORD_VERSION;
    h[5] = kind;
    h[8..12].copy_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    h[12..20].copy_from_slice(&lsn.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[..20]);
    for p in parts {
        crc.update(p);
    }
    h[20..24].copy_from_slice(&crc.finalize().to_le_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_refuse_damage() {
        let seg = encode_segment_header(*b"TEST", 77);
        assert_eq!(decode_segment_header(&seg, *b"TEST"), Ok(77));
        assert!(matches!(
            decode_segment_header(&seg, *b"UNDO"),
            Err(Bad::Damaged(r)) if r.contains("not")
        ));
        assert!(matches!(
            decode_segment_header(&seg[..10], *b"TEST"),
            Err(Bad::Damaged(_))
        ));
        let mut other = seg;
        other[4] = 9;
        let crc = crc32fast::hash(&other[..28]);
        other[28..32].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            decode_segment_header(&other, *b"TEST"),
            Err(Bad::Unsupported(_))
        ));
        other[17] ^= 1;
        assert!(matches!(
            decode_segment_header(&other, *b"TEST"),
            Err(Bad::Damaged(_))
        ));

        let payload = b"hello world";
        let h = encode_record_header(3, 9, &[&payload[..5], &payload[5..]]);
        let rh = RecordHeader::parse(&h, 64).expect("parses");
        assert_eq!((rh.kind, rh.lsn, rh.payload_len), (3, 9, payload.len()));
        rh.verify(&h, payload).expect("verifies");
        assert!(rh.verify(&h, b"hello worle").is_err());
        assert!(matches!(RecordHeader::parse(&h, 4), Err(Bad::Damaged(r)) if r.contains("cap")));
        let mut bad = h;
        bad[0] = b'X';
        assert!(RecordHeader::parse(&bad, 64).is_err());
    }
}
