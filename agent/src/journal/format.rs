//! The payloads of the journal's records, with no IO: encoders give the bytes to
//! append, decoders take a payload and say what is wrong with it. Records, their
//! checksums and segments are [`boomerang_common::seglog`]'s; the payload layouts are
//! drawn in the [parent module's doc](super).

use boomerang_common::TagKind;
use bytes::Bytes;

/// Longest disk id a journal record may carry, in bytes.
pub const MAX_DISK_ID: usize = 128;
/// Largest write one journal record may carry (8 MiB; FUSE hands over at most 1 MiB
/// per write).
pub const MAX_WRITE: usize = 8 << 20;
/// Largest payload of any record: disk id length byte, disk id, offset, data.
pub(super) const MAX_PAYLOAD: usize = 1 + MAX_DISK_ID + 8 + MAX_WRITE;
pub(super) const KIND_WRITE: u8 = 1;
pub(super) const KIND_TAG: u8 = 2;
pub(super) const KIND_ZERO: u8 = 3;
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

/// The payload of a write record, less its data (which is appended after it
/// without a copy); the caller has checked `disk` against [`MAX_DISK_ID`].
pub(super) fn write_prefix(disk: &str, offset: u64) -> Vec<u8> {
    let mut buf = start(disk, 8);
    buf.extend_from_slice(&offset.to_le_bytes());
    buf
}

/// The payload of a tag record.
pub(super) fn tag_payload(disk: &str, kind: TagKind, point_id: u64, time_ms: u64) -> Vec<u8> {
    let mut buf = start(disk, TAG_BODY);
    buf.push(tag_code(kind));
    buf.extend_from_slice(&point_id.to_le_bytes());
    buf.extend_from_slice(&time_ms.to_le_bytes());
    buf
}

/// The payload of a zero record.
pub(super) fn zero_payload(disk: &str, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = start(disk, ZERO_BODY);
    buf.extend_from_slice(&offset.to_le_bytes());
    buf.extend_from_slice(&len.to_le_bytes());
    buf
}

fn start(disk: &str, body: usize) -> Vec<u8> {
    // Callers check disk ids against MAX_DISK_ID before encoding.
    let disk_len = u8::try_from(disk.len()).unwrap_or(u8::MAX);
    let mut buf = Vec::with_capacity(1 + disk.len() + body);
    buf.push(disk_len);
    buf.extend_from_slice(disk.as_bytes());
    buf
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

/// Decodes the payload of a record of `kind` (whose checksum the log verified).
pub(super) fn parse_entry(kind: u8, payload: &[u8]) -> Result<Parsed, String> {
    let disk_len = *payload
        .first()
        .ok_or_else(|| "empty record payload".to_string())? as usize;
    if disk_len > MAX_DISK_ID {
        return Err(format!("disk id of {disk_len} bytes exceeds {MAX_DISK_ID}"));
    }
    let disk = payload
        .get(1..1 + disk_len)
        .ok_or_else(|| "record shorter than its disk id".to_string())?;
    let disk = std::str::from_utf8(disk)
        .map_err(|_| "disk id is not UTF-8".to_string())?
        .to_string();
    let body = &payload[1 + disk_len..];
    match kind {
        KIND_WRITE => {
            if body.len() < 8 {
                return Err("write record without an offset".into());
            }
            Ok(Parsed::Write {
                disk,
                offset: le_u64(body),
                data_at: 1 + disk_len + 8,
            })
        }
        KIND_ZERO => {
            if body.len() != ZERO_BODY {
                return Err(format!(
                    "zero record body is {} bytes, {ZERO_BODY} expected",
                    body.len()
                ));
            }
            Ok(Parsed::Zero {
                disk,
                offset: le_u64(body),
                len: le_u64(&body[8..]),
            })
        }
        KIND_TAG => {
            if body.len() != TAG_BODY {
                return Err(format!(
                    "tag record body is {} bytes, {TAG_BODY} expected",
                    body.len()
                ));
            }
            let kind =
                tag_from_code(body[0]).ok_or_else(|| format!("unknown tag kind {}", body[0]))?;
            Ok(Parsed::Tag {
                disk,
                kind,
                point_id: le_u64(&body[1..9]),
                time_ms: le_u64(&body[9..17]),
            })
        }
        other => Err(format!("unknown record kind {other}")),
    }
}

/// Decodes the payload of a record of `kind` into an [`Entry`]; a write's data is a
/// slice of `payload`, not a copy.
pub(super) fn decode_entry(kind: u8, payload: &Bytes) -> Result<Entry, String> {
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

    fn round_trip(kind: u8, payload: Vec<u8>) -> Result<Entry, String> {
        decode_entry(kind, &Bytes::from(payload))
    }

    #[test]
    fn payloads_round_trip() {
        let mut w = write_prefix("vda", 4096);
        w.extend_from_slice(b"hello");
        assert_eq!(
            round_trip(KIND_WRITE, w),
            Ok(Entry::Write {
                disk: "vda".into(),
                offset: 4096,
                data: Bytes::from_static(b"hello"),
            })
        );
        assert_eq!(
            round_trip(
                KIND_TAG,
                tag_payload("vda", TagKind::AppConsistent, 42, 1_700_000)
            ),
            Ok(Entry::Tag {
                disk: "vda".into(),
                kind: TagKind::AppConsistent,
                point_id: 42,
                time_ms: 1_700_000,
            })
        );
        assert_eq!(
            round_trip(KIND_ZERO, zero_payload("vda", 1 << 20, 3 << 20)),
            Ok(Entry::Zero {
                disk: "vda".into(),
                offset: 1 << 20,
                len: 3 << 20,
            })
        );
    }

    #[test]
    fn malformed_payloads_are_refused() {
        assert!(round_trip(KIND_WRITE, vec![]).is_err());
        assert!(
            round_trip(KIND_WRITE, vec![200, b'a']).is_err(),
            "disk id past the end"
        );
        assert!(
            round_trip(KIND_WRITE, vec![1, b'a', 0, 0]).is_err(),
            "no offset"
        );
        assert!(round_trip(KIND_WRITE, vec![1, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        let mut tag = tag_payload("d", TagKind::CrashConsistent, 1, 1);
        tag[2] = 9;
        assert!(round_trip(KIND_TAG, tag).is_err(), "unknown tag kind");
        assert!(round_trip(KIND_ZERO, zero_payload("d", 0, 1)[..5].to_vec()).is_err());
        assert!(round_trip(9, tag_payload("d", TagKind::CrashConsistent, 1, 1)).is_err());
    }
}
