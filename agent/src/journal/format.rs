//! Byte layout of the journal's segment headers and records, with no IO: encoders fill
//! a buffer, decoders take bytes and say what is wrong with them. The layout is drawn
//! in the [parent module's doc](super).
//!
//! Decoding is two-step, as in `boomerang_common::wire`: [`RecordHeader::parse`] checks
//! the magic and caps the payload length at [`MAX_PAYLOAD`] *before* the caller
//! allocates or reads the payload; [`RecordHeader::verify`] then checks the crc32.

use boomerang_common::TagKind;
use bytes::Bytes;

pub(super) const SEGMENT_MAGIC: [u8; 4] = *b"BMJS";
pub(super) const SEGMENT_VERSION: u16 = 1;
pub(super) const SEGMENT_HEADER_LEN: usize = 24;
pub(super) const RECORD_MAGIC: [u8; 4] = *b"BMJR";
/// Version of write and tag records (unchanged since the first journal, so a journal
/// without zero records stays readable by the builds before them).
pub(super) const RECORD_VERSION: u8 = 1;
/// Version of zero records (kind 3), the first version that has them: a build that
/// knows only version 1 refuses such a journal as unsupported instead of cutting it
/// at a kind it does not know.
pub(super) const ZERO_RECORD_VERSION: u8 = 2;
pub(super) const RECORD_HEADER_LEN: usize = 24;
/// Longest disk id a journal record may carry, in bytes.
pub const MAX_DISK_ID: usize = 128;
/// Largest write one journal record may carry (8 MiB; FUSE hands over at most 1 MiB
/// per write).
pub const MAX_WRITE: usize = 8 << 20;
/// Largest payload of any record: disk id length byte, disk id, offset, data.
pub(super) const MAX_PAYLOAD: usize = 1 + MAX_DISK_ID + 8 + MAX_WRITE;
const KIND_WRITE: u8 = 1;
const KIND_TAG: u8 = 2;
const KIND_ZERO: u8 = 3;
/// Payload of a tag after the disk id: kind u8, point id u64, time u64.
const TAG_BODY: usize = 1 + 8 + 8;
/// Payload of a zero record after the disk id: offset u64, length u64.
const ZERO_BODY: usize = 8 + 8;

/// What a journal record holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A write captured from the workload, in write order.
    Write {
        /// Disk id.
        disk: String,
        /// Byte offset on the disk.
        offset: u64,
        /// The bytes written.
        data: Bytes,
    },
    /// A range that reads back as zeros from now on (a discard or zero-out the
    /// workload issued, applied to the backing disk), in write order: shipped as zero
    /// extents.
    Zero {
        /// Disk id.
        disk: String,
        /// Byte offset on the disk.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A tag: every write journaled before it belongs to the cut.
    Tag {
        /// Disk id.
        disk: String,
        /// Kind of cut.
        kind: TagKind,
        /// Point id, shared by every disk of the group for the same cut.
        point_id: u64,
        /// Wall time of the cut, milliseconds since the Unix epoch.
        time_ms: u64,
    },
}

impl Entry {
    /// The disk the entry belongs to.
    pub fn disk(&self) -> &str {
        match self {
            Entry::Write { disk, .. } | Entry::Zero { disk, .. } | Entry::Tag { disk, .. } => disk,
        }
    }
}

/// A journal record: an entry and its journal seq (1, 2, 3, ... in append order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Journal seq.
    pub seq: u64,
    /// What was journaled.
    pub entry: Entry,
}

/// Why bytes are not a valid header or record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Bad {
    /// Torn, corrupt or not a journal at all: recovery cuts the journal here.
    Damaged(String),
    /// Intact but written by another format version: refuse rather than cut, the data
    /// may be good for the build that wrote it.
    Unsupported(String),
}

fn tag_code(kind: TagKind) -> u8 {
    // The same codes as the wire protocol's tag kinds.
    match kind {
        TagKind::SyncComplete => 1,
        TagKind::CrashConsistent => 2,
        TagKind::AppConsistent => 3,
    }
}

fn tag_from_code(code: u8) -> Option<TagKind> {
    match code {
        1 => Some(TagKind::SyncComplete),
        2 => Some(TagKind::CrashConsistent),
        3 => Some(TagKind::AppConsistent),
        _ => None,
    }
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

/// Encodes the header of a segment whose first record has seq `first_seq`.
pub(super) fn encode_segment_header(first_seq: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..4].copy_from_slice(&SEGMENT_MAGIC);
    h[4..6].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    h[8..16].copy_from_slice(&first_seq.to_le_bytes());
    let crc = crc32fast::hash(&h[..20]);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Decodes a segment header; returns the segment's first seq.
pub(super) fn decode_segment_header(h: &[u8]) -> Result<u64, Bad> {
    if h.len() < SEGMENT_HEADER_LEN {
        return Err(Bad::Damaged(format!(
            "segment header is {} bytes, {SEGMENT_HEADER_LEN} expected",
            h.len()
        )));
    }
    if h[0..4] != SEGMENT_MAGIC {
        return Err(Bad::Damaged("bad segment magic".into()));
    }
    if crc32fast::hash(&h[..20]) != le_u32(&h[20..24]) {
        return Err(Bad::Damaged("segment header checksum mismatch".into()));
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != SEGMENT_VERSION {
        return Err(Bad::Unsupported(format!(
            "segment format version {version} is not supported (this build writes \
             {SEGMENT_VERSION}); run the agent version that wrote it, or remove the journal \
             directory to start over with a resync"
        )));
    }
    Ok(le_u64(&h[8..16]))
}

/// A record header that passed [`RecordHeader::parse`]: magic right, length capped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RecordHeader {
    pub(super) version: u8,
    pub(super) kind: u8,
    pub(super) payload_len: usize,
    pub(super) seq: u64,
    crc: u32,
}

impl RecordHeader {
    /// Checks the magic and caps the payload length; nothing is allocated before this.
    pub(super) fn parse(h: &[u8; RECORD_HEADER_LEN]) -> Result<Self, Bad> {
        if h[0..4] != RECORD_MAGIC {
            return Err(Bad::Damaged("bad record magic".into()));
        }
        let payload_len = le_u32(&h[8..12]) as usize;
        if payload_len > MAX_PAYLOAD {
            return Err(Bad::Damaged(format!(
                "record length {payload_len} exceeds the cap of {MAX_PAYLOAD}"
            )));
        }
        Ok(RecordHeader {
            version: h[4],
            kind: h[5],
            payload_len,
            seq: le_u64(&h[12..20]),
            crc: le_u32(&h[20..24]),
        })
    }

    /// Checks the crc32 over header bytes 0..20 and the payload, then the version:
    /// 1 (writes and tags) or 2 (zero records as well).
    pub(super) fn verify(&self, h: &[u8; RECORD_HEADER_LEN], payload: &[u8]) -> Result<(), Bad> {
        let mut crc = crc32fast::Hasher::new();
        crc.update(&h[..20]);
        crc.update(payload);
        if crc.finalize() != self.crc {
            return Err(Bad::Damaged("record checksum mismatch".into()));
        }
        if !(RECORD_VERSION..=ZERO_RECORD_VERSION).contains(&self.version) {
            return Err(Bad::Unsupported(format!(
                "record format version {} is not supported (this build reads \
                 {RECORD_VERSION} to {ZERO_RECORD_VERSION})",
                self.version
            )));
        }
        if self.kind == KIND_ZERO && self.version < ZERO_RECORD_VERSION {
            return Err(Bad::Damaged(format!(
                "zero record of version {}: zero records exist from version \
                 {ZERO_RECORD_VERSION}",
                self.version
            )));
        }
        Ok(())
    }
}

/// Encoded size of a write record.
pub(super) fn write_record_len(disk: &str, data_len: usize) -> u64 {
    (RECORD_HEADER_LEN + 1 + disk.len() + 8 + data_len) as u64
}

/// Encoded size of a tag record.
pub(super) fn tag_record_len(disk: &str) -> u64 {
    (RECORD_HEADER_LEN + 1 + disk.len() + TAG_BODY) as u64
}

/// Encoded size of a zero record.
pub(super) fn zero_record_len(disk: &str) -> u64 {
    (RECORD_HEADER_LEN + 1 + disk.len() + ZERO_BODY) as u64
}

fn start(buf: &mut Vec<u8>, disk: &str, capacity: usize) {
    // Callers check disk ids against MAX_DISK_ID before encoding.
    let disk_len = u8::try_from(disk.len()).expect("disk id length checked by the caller");
    buf.clear();
    buf.reserve(capacity);
    buf.extend_from_slice(&[0u8; RECORD_HEADER_LEN]);
    buf.push(disk_len);
    buf.extend_from_slice(disk.as_bytes());
}

fn finish(buf: &mut [u8], kind: u8, seq: u64) {
    let payload_len = u32::try_from(buf.len() - RECORD_HEADER_LEN)
        .expect("payload lengths are checked against MAX_PAYLOAD by the caller");
    buf[0..4].copy_from_slice(&RECORD_MAGIC);
    buf[4] = if kind == KIND_ZERO {
        ZERO_RECORD_VERSION
    } else {
        RECORD_VERSION
    };
    buf[5] = kind;
    buf[8..12].copy_from_slice(&payload_len.to_le_bytes());
    buf[12..20].copy_from_slice(&seq.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&buf[..20]);
    crc.update(&buf[RECORD_HEADER_LEN..]);
    let crc = crc.finalize();
    buf[20..24].copy_from_slice(&crc.to_le_bytes());
}

/// Encodes a write record into `buf` (replacing its content). The caller has checked
/// `disk` against [`MAX_DISK_ID`] and `data` against [`MAX_WRITE`].
pub(super) fn encode_write(buf: &mut Vec<u8>, seq: u64, disk: &str, offset: u64, data: &[u8]) {
    start(buf, disk, 8 + data.len());
    buf.extend_from_slice(&offset.to_le_bytes());
    buf.extend_from_slice(data);
    finish(buf, KIND_WRITE, seq);
}

/// Encodes a tag record into `buf` (replacing its content).
pub(super) fn encode_tag(
    buf: &mut Vec<u8>,
    seq: u64,
    disk: &str,
    kind: TagKind,
    point_id: u64,
    time_ms: u64,
) {
    start(buf, disk, TAG_BODY);
    buf.push(tag_code(kind));
    buf.extend_from_slice(&point_id.to_le_bytes());
    buf.extend_from_slice(&time_ms.to_le_bytes());
    finish(buf, KIND_TAG, seq);
}

/// Encodes a zero record into `buf` (replacing its content).
pub(super) fn encode_zero(buf: &mut Vec<u8>, seq: u64, disk: &str, offset: u64, len: u64) {
    start(buf, disk, ZERO_BODY);
    buf.extend_from_slice(&offset.to_le_bytes());
    buf.extend_from_slice(&len.to_le_bytes());
    finish(buf, KIND_ZERO, seq);
}

/// An entry decoded without copying its data: a write's data is `payload[data_at..]`.
#[derive(Debug)]
pub(super) enum Parsed {
    Write {
        disk: String,
        offset: u64,
        data_at: usize,
    },
    Zero {
        disk: String,
        offset: u64,
        len: u64,
    },
    Tag {
        disk: String,
        kind: TagKind,
        point_id: u64,
        time_ms: u64,
    },
}

/// Decodes the payload of a record of `kind` (whose crc has been verified).
pub(super) fn parse_entry(kind: u8, payload: &[u8]) -> Result<Parsed, Bad> {
    let disk_len = *payload
        .first()
        .ok_or_else(|| Bad::Damaged("empty record payload".into()))? as usize;
    if disk_len > MAX_DISK_ID {
        return Err(Bad::Damaged(format!(
            "disk id of {disk_len} bytes exceeds {MAX_DISK_ID}"
        )));
    }
    let disk = payload
        .get(1..1 + disk_len)
        .ok_or_else(|| Bad::Damaged("record shorter than its disk id".into()))?;
    let disk = std::str::from_utf8(disk)
        .map_err(|_| Bad::Damaged("disk id is not UTF-8".into()))?
        .to_string();
    let body = &payload[1 + disk_len..];
    match kind {
        KIND_WRITE => {
            if body.len() < 8 {
                return Err(Bad::Damaged("write record without an offset".into()));
            }
            Ok(Parsed::Write {
                disk,
                offset: le_u64(body),
                data_at: 1 + disk_len + 8,
            })
        }
        KIND_ZERO => {
            if body.len() != ZERO_BODY {
                return Err(Bad::Damaged(format!(
                    "zero record body is {} bytes, {ZERO_BODY} expected",
                    body.len()
                )));
            }
            Ok(Parsed::Zero {
                disk,
                offset: le_u64(body),
                len: le_u64(&body[8..]),
            })
        }
        KIND_TAG => {
            if body.len() != TAG_BODY {
                return Err(Bad::Damaged(format!(
                    "tag record body is {} bytes, {TAG_BODY} expected",
                    body.len()
                )));
            }
            let kind = tag_from_code(body[0])
                .ok_or_else(|| Bad::Damaged(format!("unknown tag kind {}", body[0])))?;
            Ok(Parsed::Tag {
                disk,
                kind,
                point_id: le_u64(&body[1..9]),
                time_ms: le_u64(&body[9..17]),
            })
        }
        other => Err(Bad::Damaged(format!("unknown record kind {other}"))),
    }
}

/// Decodes the payload of a record of `kind` into an [`Entry`]; a write's data is a
/// slice of `payload`, not a copy.
pub(super) fn decode_entry(kind: u8, payload: &Bytes) -> Result<Entry, Bad> {
    Ok(match parse_entry(kind, payload)? {
        Parsed::Write {
            disk,
            offset,
            data_at,
        } => Entry::Write {
            disk,
            offset,
            data: payload.slice(data_at..),
        },
        Parsed::Zero { disk, offset, len } => Entry::Zero { disk, offset, len },
        Parsed::Tag {
            disk,
            kind,
            point_id,
            time_ms,
        } => Entry::Tag {
            disk,
            kind,
            point_id,
            time_ms,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(buf: &[u8]) -> [u8; RECORD_HEADER_LEN] {
        let mut h = [0u8; RECORD_HEADER_LEN];
        h.copy_from_slice(&buf[..RECORD_HEADER_LEN]);
        h
    }

    fn decode(buf: &[u8]) -> Result<(u64, Entry), Bad> {
        let h = header(buf);
        let rh = RecordHeader::parse(&h)?;
        let payload = Bytes::copy_from_slice(&buf[RECORD_HEADER_LEN..]);
        assert_eq!(rh.payload_len, payload.len());
        rh.verify(&h, &payload)?;
        Ok((rh.seq, decode_entry(rh.kind, &payload)?))
    }

    #[test]
    fn records_round_trip() {
        let mut buf = Vec::new();
        encode_write(&mut buf, 7, "vda", 4096, b"hello");
        assert_eq!(buf.len() as u64, write_record_len("vda", 5));
        assert_eq!(
            decode(&buf),
            Ok((
                7,
                Entry::Write {
                    disk: "vda".into(),
                    offset: 4096,
                    data: Bytes::from_static(b"hello"),
                }
            ))
        );
        encode_tag(&mut buf, 8, "vda", TagKind::AppConsistent, 42, 1_700_000);
        assert_eq!(buf.len() as u64, tag_record_len("vda"));
        assert_eq!(
            decode(&buf),
            Ok((
                8,
                Entry::Tag {
                    disk: "vda".into(),
                    kind: TagKind::AppConsistent,
                    point_id: 42,
                    time_ms: 1_700_000,
                }
            ))
        );
    }

    #[test]
    fn zero_records_round_trip_as_version_2() {
        let mut buf = Vec::new();
        encode_zero(&mut buf, 9, "vda", 1 << 20, 3 << 20);
        assert_eq!(buf.len() as u64, zero_record_len("vda"));
        assert_eq!(buf[4], ZERO_RECORD_VERSION, "zero records carry version 2");
        assert_eq!(
            decode(&buf),
            Ok((
                9,
                Entry::Zero {
                    disk: "vda".into(),
                    offset: 1 << 20,
                    len: 3 << 20,
                }
            ))
        );
        // Writes and tags stay version 1: older builds read a journal without zeros.
        encode_write(&mut buf, 1, "vda", 0, b"x");
        assert_eq!(buf[4], RECORD_VERSION);
        // A zero record claiming version 1 was never written by anyone.
        encode_zero(&mut buf, 9, "vda", 0, 4096);
        buf[4] = RECORD_VERSION;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&buf[..20]);
        crc.update(&buf[RECORD_HEADER_LEN..]);
        let crc = crc.finalize();
        buf[20..24].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(decode(&buf), Err(Bad::Damaged(_))));
    }

    #[test]
    fn damaged_records_are_refused() {
        let mut buf = Vec::new();
        encode_write(&mut buf, 1, "d", 0, b"data");
        let mut flipped = buf.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(
            decode(&flipped),
            Err(Bad::Damaged("record checksum mismatch".into()))
        );
        let mut magic = buf.clone();
        magic[0] = b'X';
        assert!(matches!(decode(&magic), Err(Bad::Damaged(_))));
        // A huge length is refused from the header alone, before any allocation.
        let mut huge = header(&buf);
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(RecordHeader::parse(&huge), Err(Bad::Damaged(r)) if r.contains("cap")));
    }

    #[test]
    fn other_versions_are_unsupported_not_damaged() {
        let mut buf = Vec::new();
        encode_tag(&mut buf, 1, "d", TagKind::CrashConsistent, 1, 1);
        buf[4] = 9;
        // Re-seal the crc so only the version differs.
        let mut crc = crc32fast::Hasher::new();
        crc.update(&buf[..20]);
        crc.update(&buf[RECORD_HEADER_LEN..]);
        let crc = crc.finalize();
        buf[20..24].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(decode(&buf), Err(Bad::Unsupported(_))));

        let mut seg = encode_segment_header(5);
        assert_eq!(decode_segment_header(&seg), Ok(5));
        seg[4] = 2;
        let crc = crc32fast::hash(&seg[..20]);
        seg[20..24].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            decode_segment_header(&seg),
            Err(Bad::Unsupported(_))
        ));
        seg[10] ^= 1;
        assert!(matches!(decode_segment_header(&seg), Err(Bad::Damaged(_))));
    }
}
