//! Fuzzes the agent journal's recovery at open: seglog's `scan_segment` over 1 to 4
//! `AJNL` segments with the journal's rules (payloads always checksummed, the
//! journal's payload cap), each intact record's payload decoded by
//! `boomerang_agent::journal::decode_record_payload` (the decoder `Journal::open`
//! checks records with), then `recover::plan` as a `Retire::Prefix` log from a
//! fuzz-chosen floor. It must never panic, and:
//!
//! - a record counts as intact exactly when its payload decodes; the scan stops at
//!   the first one that does not, with the damage at its offset;
//! - a decoded write's data is a slice of the payload (not a copy, not past its end),
//!   exactly what follows the disk id and offset;
//! - every decoded entry re-encodes (as the layout in `journal.rs`'s module doc draws
//!   it) to the very payload it came from: the decoder accepts one spelling of each
//!   entry, with no trailing bytes;
//! - the plan has one action per segment, and only the last may be cut.
//!
//! The first byte picks the shape: bit 0 clear, the rest is segment bytes (u16 length
//! prefixes) with checksums and lsns fixed up; bit 0 set, the rest is records
//! (kind, u8 length, payload) that are framed into valid segments, so every payload
//! reaches the decoder.

#![no_main]

use boomerang_agent::journal::{decode_record_payload, Entry, MAX_DISK_ID, MAX_WRITE};
use boomerang_common::seglog::format::{encode_record_header, encode_segment_header};
use boomerang_common::seglog::recover::{plan, scan_segment, Action, Plan, Retire, ScanRules};
use boomerang_common::TagKind;
use boomerang_fuzz::{fix_up, header_lsn, Input};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

const KIND: [u8; 4] = *b"AJNL";
/// The journal's payload cap: disk id length byte, disk id, offset, data.
const MAX_PAYLOAD: usize = 1 + MAX_DISK_ID + 8 + MAX_WRITE;
/// Highest first lsn of framed segments, so that the harness's own lsn arithmetic
/// stays clear of overflow (raw segments go up to `u64::MAX`).
const LSN_LIMIT: u64 = u64::MAX - (1 << 32);

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let mut input = Input(rest);
    let nsegs = usize::from((ctl >> 1) & 3) + 1;
    let floor = input.u64();
    let segments = if ctl & 1 == 0 {
        raw_segments(&mut input, nsegs)
    } else {
        framed_segments(&mut input, nsegs)
    };
    recover(&segments, floor);
});

/// Segment bytes as given, with the segment header's crc and every record's lsn and
/// crc rewritten so mutations reach the payload decoder. Returns (bytes, name lsn).
fn raw_segments(input: &mut Input<'_>, nsegs: usize) -> Vec<(Vec<u8>, u64)> {
    let mut out = Vec::new();
    for i in 0..nsegs {
        let n = if i + 1 == nsegs {
            usize::MAX
        } else {
            usize::from(input.u16())
        };
        let mut bytes = input.take(n).to_vec();
        fix_up(&mut bytes, true);
        let name = header_lsn(&bytes);
        out.push((bytes, name));
    }
    out
}

/// Records (kind, u8 length, payload; bit 7 of the kind byte starts a new segment)
/// framed into valid segments with contiguous lsns.
fn framed_segments(input: &mut Input<'_>, nsegs: usize) -> Vec<(Vec<u8>, u64)> {
    let mut lsn = input.u64().min(LSN_LIMIT);
    let mut out = vec![(encode_segment_header(KIND, lsn).to_vec(), lsn)];
    while !input.is_empty() {
        let k = input.u8();
        if k & 0x80 != 0 && out.len() < nsegs {
            out.push((encode_segment_header(KIND, lsn).to_vec(), lsn));
        }
        let kind = k & 0x7f;
        let n = usize::from(input.u8());
        let payload = input.take(n);
        let seg = &mut out.last_mut().expect("one segment").0;
        seg.extend_from_slice(&encode_record_header(kind, lsn, &[payload]));
        seg.extend_from_slice(payload);
        lsn += 1;
    }
    out
}

fn tag_code(kind: TagKind) -> u8 {
    match kind {
        TagKind::SyncComplete => 1,
        TagKind::CrashConsistent => 2,
        TagKind::AppConsistent => 3,
    }
}

/// The payload layout of `journal.rs`'s module doc, written independently.
fn encode_entry(entry: &Entry) -> (u8, Vec<u8>) {
    let start = |disk: &str| {
        let mut v = vec![u8::try_from(disk.len()).expect("checked")];
        v.extend_from_slice(disk.as_bytes());
        v
    };
    match entry {
        Entry::Write { disk, offset, data } => {
            let mut v = start(disk);
            v.extend_from_slice(&offset.to_le_bytes());
            v.extend_from_slice(data);
            (1, v)
        }
        Entry::Tag {
            disk,
            kind,
            point_id,
            time_ms,
        } => {
            let mut v = start(disk);
            v.push(tag_code(*kind));
            v.extend_from_slice(&point_id.to_le_bytes());
            v.extend_from_slice(&time_ms.to_le_bytes());
            (2, v)
        }
        Entry::Zero { disk, offset, len } => {
            let mut v = start(disk);
            v.extend_from_slice(&offset.to_le_bytes());
            v.extend_from_slice(&len.to_le_bytes());
            (3, v)
        }
    }
}

/// Decodes one payload as the journal does and checks the entry.
fn decode(kind: u8, payload: &[u8]) -> Result<(), String> {
    let bytes = Bytes::copy_from_slice(payload);
    let entry = decode_record_payload(kind, &bytes)?;
    assert!(entry.disk().len() <= MAX_DISK_ID, "disk id past the cap");
    if let Entry::Write { disk, data, .. } = &entry {
        let data_at = 1 + disk.len() + 8;
        assert_eq!(
            data.len(),
            payload.len() - data_at,
            "write data not the rest"
        );
        if !data.is_empty() {
            let (start, end) = (
                bytes.as_ptr() as usize,
                bytes.as_ptr() as usize + bytes.len(),
            );
            let p = data.as_ptr() as usize;
            assert!(
                p >= start && p + data.len() <= end,
                "write data outside the payload"
            );
            assert_eq!(p - start, data_at, "write data not after the offset");
        }
    }
    assert_eq!(
        encode_entry(&entry),
        (kind, payload.to_vec()),
        "{entry:?} does not re-encode to its payload"
    );
    Ok(())
}

fn recover(segments: &[(Vec<u8>, u64)], floor: u64) {
    let rules = ScanRules {
        kind: KIND,
        max_payload: MAX_PAYLOAD,
        payloads: true,
    };
    let mut scans = Vec::new();
    for (bytes, name) in segments {
        let mut visited = Vec::new();
        let scan = scan_segment(&bytes[..], *name, rules, |seen| {
            let payload = seen.payload.expect("payloads are read");
            let r = decode(seen.kind, payload);
            visited.push((
                seen.offset,
                seen.len,
                seen.kind,
                payload.to_vec(),
                r.is_ok(),
            ));
            r
        })
        .expect("reading memory cannot fail");
        assert!(scan.valid_len <= scan.file_len);
        // Every record visited decoded, but the last one visited may have been refused.
        let ok = visited.iter().take_while(|v| v.4).count();
        assert_eq!(scan.records, ok as u64, "{scan:?}");
        assert!(visited.len() <= ok + 1);
        if let Some(refused) = visited.get(ok) {
            assert_eq!(
                scan.damage.as_ref().map(|d| d.0),
                Some(refused.0),
                "refused record not the damage"
            );
            assert_eq!(scan.valid_len, refused.0);
        }
        if let Some(first) = scan.header_lsn {
            assert_eq!(scan.end_lsn(), first + scan.records);
        }
        scans.push(scan);
    }
    match plan(&scans, Retire::Prefix, Some(floor)) {
        Plan::Recover(actions) => {
            assert_eq!(actions.len(), scans.len());
            for (i, (a, s)) in actions.iter().zip(&scans).enumerate() {
                let last = i + 1 == scans.len();
                match a {
                    Action::Keep => assert!(s.damage.is_none(), "Keep for a damaged segment"),
                    Action::CutTail { .. } | Action::DeleteTorn { .. } => {
                        assert!(last, "segment {i} of {} cut", scans.len())
                    }
                }
            }
        }
        Plan::Corrupt { segment, .. } | Plan::Unsupported { segment, .. } => {
            assert!(segment < scans.len());
        }
    }
}
