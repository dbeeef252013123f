//! Fuzzes seglog's recovery (`boomerang_common::seglog::recover`): `scan_segment` on
//! arbitrary segment bytes under several `ScanRules`, and `plan` over 1 to 4 such scans
//! for both `Retire` modes and several floors. Besides "no panic" it checks what
//! recovery promises:
//!
//! - a scan: `valid_len <= file_len`; the records it reports are the ones it visited,
//!   contiguous in lsn from the header's and in offset from byte 32, so `end_lsn` and
//!   `valid_len` follow from them; damage and "unsupported" never both; no damage means
//!   the whole file is intact; a stricter scan (payload checksums, a smaller cap, a
//!   visitor that refuses a record) sees a prefix of what a laxer one sees;
//! - a plan: `Recover` has one action per segment, only the last segment may be cut
//!   (`CutTail` at the scan's damage) or deleted (`DeleteTorn`, a header with nothing
//!   after it), `Keep` never for a damaged scan; `Corrupt` and `Unsupported` name a
//!   segment that is damaged or unsupported; a plan a `Prefix` log accepts an `Any` log
//!   accepts too, and `Any` ignores the floor.
//!
//! The first input byte picks the mode:
//! - raw (bit 0 clear): the rest is 1 to 4 segments (u16 length prefixes), optionally
//!   with their checksums (and record lsns) fixed up so the fuzzer gets past them;
//! - round trip (bit 0 set): records with fuzz-chosen kinds and payloads are encoded
//!   with `format::encode_segment_header` / `encode_record_header` into 1 to 4
//!   segments, scanned back (every record seen with its lsn, kind and payload, every
//!   segment kept), then one segment is cut at a fuzz-chosen point (exactly the whole
//!   records before the cut survive, and the plan says what recovery must do) and,
//!   separately, one byte is flipped (the scan stops at the record holding it).

#![no_main]

use boomerang_common::seglog::format::{
    encode_record_header, encode_segment_header, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use boomerang_common::seglog::recover::{
    plan, scan_segment, Action, Plan, Retire, ScanRules, SegmentScan,
};
use boomerang_fuzz::{fix_up, header_lsn, le_u32, Input};
use libfuzzer_sys::fuzz_target;

const KIND: [u8; 4] = *b"TEST";
/// The cap of the laxest rules; round-trip payloads stay below it.
const CAP: usize = 4096;
/// Highest first lsn the round trip gives a segment, so that its own lsn arithmetic
/// stays clear of overflow (raw segments go up to `u64::MAX`).
const LSN_LIMIT: u64 = u64::MAX - (1 << 32);
const SEG: u64 = SEGMENT_HEADER_LEN as u64;
const REC: u64 = RECORD_HEADER_LEN as u64;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let ctl = input.u8();
    if ctl & 1 == 0 {
        raw(ctl, &mut input);
    } else {
        round_trip(ctl, &mut input);
    }
});

/// What a scan visited: (lsn, kind, offset, len, payload).
type Visited = Vec<(u64, u8, u64, u64, Option<Vec<u8>>)>;

fn scan(
    bytes: &[u8],
    name_lsn: u64,
    rules: ScanRules,
    refuse: Option<u8>,
) -> (SegmentScan, Visited) {
    let mut seen = Vec::new();
    let scan = scan_segment(bytes, name_lsn, rules, |s| {
        if refuse == Some(s.kind) {
            return Err(format!("kind {} refused", s.kind));
        }
        seen.push((
            s.lsn,
            s.kind,
            s.offset,
            s.len,
            s.payload.map(<[u8]>::to_vec),
        ));
        Ok(())
    })
    .expect("reading memory cannot fail");
    check_scan(bytes, &scan, &seen, rules);
    (scan, seen)
}

/// The invariants of one scan.
fn check_scan(bytes: &[u8], s: &SegmentScan, seen: &Visited, rules: ScanRules) {
    assert_eq!(s.file_len, bytes.len() as u64);
    assert!(s.valid_len <= s.file_len, "{s:?}");
    assert_eq!(s.records, seen.len() as u64, "{s:?}");
    assert!(
        s.damage.is_none() || s.unsupported.is_none(),
        "damage and unsupported both: {s:?}"
    );
    let Some(first) = s.header_lsn else {
        assert_eq!((s.valid_len, s.records), (0, 0), "{s:?}");
        assert!(s.damage.is_some() || s.unsupported.is_some(), "{s:?}");
        if let Some((at, _)) = &s.damage {
            assert_eq!(*at, 0);
        }
        return;
    };
    assert_eq!(first, s.name_lsn, "header lsn kept though the name differs");
    let mut at = SEG;
    for (i, (lsn, _kind, offset, len, payload)) in seen.iter().enumerate() {
        assert_eq!(*lsn, first + i as u64, "record lsns not contiguous");
        assert_eq!(*offset, at, "record offsets not contiguous");
        assert!(*len >= REC && *len - REC <= rules.max_payload as u64);
        let whole =
            &bytes[usize::try_from(at).expect("fits")..][..usize::try_from(*len).expect("fits")];
        match payload {
            Some(p) => assert_eq!(
                &p[..],
                &whole[RECORD_HEADER_LEN..],
                "payload is not the bytes"
            ),
            None => assert!(!rules.payloads, "payload missing"),
        }
        at += len;
    }
    assert_eq!(
        s.valid_len, at,
        "valid_len is not the header and the records"
    );
    assert_eq!(s.end_lsn(), first + s.records);
    match &s.damage {
        Some((off, _)) => assert_eq!(*off, s.valid_len, "damage not where the scan stopped"),
        None if s.unsupported.is_none() => {
            assert_eq!(
                s.valid_len, s.file_len,
                "undamaged but not intact to the end"
            )
        }
        None => {}
    }
}

/// `short` saw a prefix of what `long` saw.
fn assert_prefix(short: &Visited, long: &Visited, what: &str) {
    assert!(short.len() <= long.len(), "{what}: saw more records");
    for (a, b) in short.iter().zip(long) {
        assert_eq!(
            (a.0, a.1, a.2, a.3),
            (b.0, b.1, b.2, b.3),
            "{what}: other records"
        );
    }
}

/// The invariants of a plan over `scans`.
fn check_plan(scans: &[SegmentScan], retire: Retire, floor: Option<u64>) -> Plan {
    let p = plan(scans, retire, floor);
    match &p {
        Plan::Recover(actions) => {
            assert_eq!(actions.len(), scans.len(), "one action per segment");
            for (i, (a, s)) in actions.iter().zip(scans).enumerate() {
                let last = i + 1 == scans.len();
                assert!(s.unsupported.is_none(), "recovering an unsupported segment");
                match a {
                    Action::Keep => {
                        assert!(s.damage.is_none(), "Keep for a damaged segment {i}: {s:?}");
                        assert!(s.header_lsn.is_some());
                    }
                    Action::CutTail { at, .. } => {
                        assert!(last, "CutTail for segment {i} of {}", scans.len());
                        assert_eq!(Some(*at), s.damage.as_ref().map(|d| d.0));
                        assert!(s.header_lsn.is_some() && *at <= s.file_len);
                    }
                    Action::DeleteTorn { .. } => {
                        assert!(last, "DeleteTorn for segment {i} of {}", scans.len());
                        assert!(s.header_lsn.is_none() && s.file_len <= SEG);
                    }
                }
            }
            // The kept segments' lsns follow each other as the retire mode says.
            let kept: Vec<&SegmentScan> = scans.iter().filter(|s| s.header_lsn.is_some()).collect();
            for w in kept.windows(2) {
                let (end, first) = (w[0].end_lsn(), w[1].name_lsn);
                match retire {
                    Retire::Any => assert!(first >= end, "segments overlap"),
                    Retire::Prefix => assert!(
                        first == end || (first > end && floor.is_some_and(|f| first <= f)),
                        "gap or overlap kept: {end} then {first}"
                    ),
                }
            }
            if let (Retire::Prefix, Some(f), Some(s)) = (retire, floor, kept.first()) {
                assert!(s.name_lsn <= f, "first segment starts above the floor");
            }
        }
        Plan::Corrupt {
            segment, offset, ..
        } => {
            let s = &scans[*segment];
            assert!(*offset <= s.file_len, "{p:?}");
            assert!(s.unsupported.is_none());
        }
        Plan::Unsupported { segment, .. } => {
            assert!(scans[*segment].unsupported.is_some(), "{p:?}");
        }
    }
    p
}

fn check_plans(scans: &[SegmentScan], fuzz_floor: u64) {
    let first = scans.first().map_or(0, |s| s.name_lsn);
    let end = scans.last().map_or(0, SegmentScan::end_lsn);
    let any = check_plan(scans, Retire::Any, None);
    for floor in [
        None,
        Some(0),
        Some(first),
        Some(end),
        Some(fuzz_floor),
        Some(u64::MAX),
    ] {
        assert_eq!(
            check_plan(scans, Retire::Any, floor),
            any,
            "Any looked at the floor"
        );
        let prefix = check_plan(scans, Retire::Prefix, floor);
        if matches!(prefix, Plan::Recover(_)) {
            assert_eq!(prefix, any, "Prefix recovers what Any refuses");
        }
    }
}

fn raw(ctl: u8, input: &mut Input<'_>) {
    let nsegs = usize::from((ctl >> 1) & 3) + 1;
    let (fix, lsns, rename) = (ctl & 8 != 0, ctl & 16 != 0, ctl & 32 != 0);
    let small_cap = usize::from(input.u8());
    let refuse = input.u8();
    let fuzz_floor = input.u64();
    let mut segments = Vec::with_capacity(nsegs);
    for i in 0..nsegs {
        let bytes = if i + 1 == nsegs {
            input.rest()
        } else {
            let n = usize::from(input.u16());
            input.take(n)
        };
        let mut bytes = bytes.to_vec();
        if fix {
            fix_up(&mut bytes, lsns);
        }
        let mut name_lsn = header_lsn(&bytes);
        if rename {
            name_lsn ^= 1;
        }
        segments.push((bytes, name_lsn));
    }

    let lax = ScanRules {
        kind: KIND,
        max_payload: CAP,
        payloads: true,
    };
    let headers = ScanRules {
        payloads: false,
        ..lax
    };
    let small = ScanRules {
        max_payload: small_cap,
        ..lax
    };
    let other_log = ScanRules {
        kind: *b"UNDO",
        ..lax
    };
    let mut scans = Vec::new();
    let mut header_scans = Vec::new();
    for (bytes, name_lsn) in &segments {
        let (full, seen) = scan(bytes, *name_lsn, lax, None);
        let (hdr, hdr_seen) = scan(bytes, *name_lsn, headers, None);
        assert_prefix(&seen, &hdr_seen, "checksummed scan vs headers-only scan");
        assert_eq!(full.header_lsn, hdr.header_lsn);
        let (_, small_seen) = scan(bytes, *name_lsn, small, None);
        assert_prefix(&small_seen, &seen, "smaller cap vs larger cap");
        let (refused, refused_seen) = scan(bytes, *name_lsn, lax, Some(refuse));
        assert_prefix(&refused_seen, &seen, "refusing visitor vs accepting one");
        if let Some(i) = seen.iter().position(|r| r.1 == refuse) {
            assert_eq!(refused.records, i as u64);
            assert_eq!(refused.damage.as_ref().map(|d| d.0), Some(seen[i].2));
        } else {
            assert_eq!(
                refused, full,
                "a visitor that refused nothing changed the scan"
            );
        }
        let (other, _) = scan(bytes, *name_lsn, other_log, None);
        if full.header_lsn.is_some() {
            assert!(
                other.header_lsn.is_none() && other.damage.is_some(),
                "a segment of log TEST read as UNDO's"
            );
        }
        scans.push(full);
        header_scans.push(hdr);
    }
    check_plans(&scans, fuzz_floor);
    check_plans(&header_scans, fuzz_floor);
}

/// Records per segment: (kind, payload).
type Log = Vec<Vec<(u8, Vec<u8>)>>;

fn encode(log: &Log, first_lsn: u64) -> Vec<(Vec<u8>, u64)> {
    let mut lsn = first_lsn;
    let mut out = Vec::new();
    for records in log {
        let mut bytes = encode_segment_header(KIND, lsn).to_vec();
        let name = lsn;
        for (kind, payload) in records {
            // Split the payload in two parts, as owners append prefix ++ data.
            let (a, b) = payload.split_at(payload.len() / 2);
            bytes.extend_from_slice(&encode_record_header(*kind, lsn, &[a, b]));
            bytes.extend_from_slice(payload);
            lsn += 1;
        }
        out.push((bytes, name));
    }
    out
}

fn round_trip(ctl: u8, input: &mut Input<'_>) {
    let nsegs = usize::from((ctl >> 1) & 3) + 1;
    let cut_pick = usize::from(input.u8());
    let cut = input.u16();
    let flip_pick = usize::from(input.u8());
    let flip_at = input.u16();
    let flip = input.u8() | 1;
    let first_lsn = input.u64().min(LSN_LIMIT);
    let mut log: Log = vec![Vec::new()];
    while !input.is_empty() {
        let d = input.u8();
        if d & 0x80 != 0 && log.len() < nsegs {
            log.push(Vec::new());
        }
        let len = usize::from(input.u8()) * usize::from(d & 0x0f);
        let payload = input.take(len.min(CAP)).to_vec();
        log.last_mut()
            .expect("one segment at least")
            .push((input.u8(), payload));
    }
    let segments = encode(&log, first_lsn);
    // Fewer segments than asked for when the input marked fewer starts.
    let (cut_seg, flip_seg) = (cut_pick % segments.len(), flip_pick % segments.len());
    let rules = ScanRules {
        kind: KIND,
        max_payload: CAP,
        payloads: true,
    };

    // Everything comes back, every segment is kept.
    let mut scans = Vec::new();
    let mut lsn = first_lsn;
    for ((bytes, name), records) in segments.iter().zip(&log) {
        let (s, seen) = scan(bytes, *name, rules, None);
        assert_eq!(
            (s.damage.as_ref(), s.unsupported.as_ref()),
            (None, None),
            "{s:?}"
        );
        assert_eq!(seen.len(), records.len(), "records lost");
        for ((l, kind, _, _, payload), (k, p)) in seen.iter().zip(records) {
            assert_eq!((*l, *kind, payload.as_deref()), (lsn, *k, Some(&p[..])));
            lsn += 1;
        }
        let (hdr, _) = scan(
            bytes,
            *name,
            ScanRules {
                payloads: false,
                ..rules
            },
            None,
        );
        assert_eq!(hdr, s, "headers-only scan differs on an intact segment");
        scans.push(s);
    }
    let keep_all = Plan::Recover(vec![Action::Keep; scans.len()]);
    assert_eq!(
        check_plan(&scans, Retire::Prefix, Some(first_lsn)),
        keep_all
    );
    assert_eq!(check_plan(&scans, Retire::Prefix, None), keep_all);
    assert_eq!(check_plan(&scans, Retire::Any, None), keep_all);
    if first_lsn > 0 {
        assert!(matches!(
            check_plan(&scans, Retire::Prefix, Some(first_lsn - 1)),
            Plan::Corrupt {
                segment: 0,
                offset: 0,
                ..
            }
        ));
    }

    // Cut one segment: exactly the whole records before the cut survive.
    let (bytes, name) = &segments[cut_seg];
    let cut = usize::from(cut) % (bytes.len() + 1);
    let (s, seen) = scan(&bytes[..cut], *name, rules, None);
    let last = cut_seg + 1 == segments.len();
    let mut cut_scans = scans.clone();
    cut_scans[cut_seg] = s.clone();
    let prefix = check_plan(&cut_scans, Retire::Prefix, Some(first_lsn));
    let any = check_plan(&cut_scans, Retire::Any, None);
    if (cut as u64) < SEG {
        assert_eq!((s.header_lsn, s.records), (None, 0));
        assert!(s.damage.is_some());
        for p in [&prefix, &any] {
            if last {
                let reason = s.damage.clone().expect("torn header").1;
                let mut actions = vec![Action::Keep; scans.len()];
                actions[cut_seg] = Action::DeleteTorn { reason };
                assert_eq!(p, &Plan::Recover(actions));
            } else {
                assert!(
                    matches!(p, Plan::Corrupt { segment, offset: 0, .. } if *segment == cut_seg),
                    "{p:?}"
                );
            }
        }
    } else {
        check_cut(&scans, &s, &seen, bytes, cut, cut_seg, &prefix, &any);
    }
    flip_one(&segments, flip_seg, flip_at, flip, rules);
}

/// What a segment cut at `cut` (past its header) scans and plans as.
#[allow(clippy::too_many_arguments)]
fn check_cut(
    scans: &[SegmentScan],
    s: &SegmentScan,
    seen: &Visited,
    bytes: &[u8],
    cut: usize,
    cut_seg: usize,
    prefix: &Plan,
    any: &Plan,
) {
    let ends = record_ends(bytes);
    let kept = ends.iter().take_while(|&&e| e <= cut as u64).count();
    let last = cut_seg + 1 == scans.len();
    let keep_all = Plan::Recover(vec![Action::Keep; scans.len()]);
    assert_eq!(
        seen.len(),
        kept,
        "not exactly the whole records before the cut"
    );
    let boundary = if kept == 0 { SEG } else { ends[kept - 1] };
    assert_eq!(s.valid_len, boundary);
    let torn = boundary != cut as u64;
    assert_eq!(s.damage.as_ref().map(|d| d.0), torn.then_some(boundary));
    let lost = kept < ends.len();
    if last {
        let mut actions = vec![Action::Keep; scans.len()];
        if torn {
            let reason = s.damage.clone().expect("torn").1;
            actions[cut_seg] = Action::CutTail {
                at: boundary,
                reason,
            };
        }
        assert_eq!(prefix, &Plan::Recover(actions.clone()));
        assert_eq!(any, &Plan::Recover(actions));
    } else if torn {
        for p in [prefix, any] {
            assert!(
                matches!(p, Plan::Corrupt { segment, offset, .. } if *segment == cut_seg && *offset == boundary),
                "{p:?}"
            );
        }
    } else if lost {
        // A closed segment cut at a record boundary: the next one starts after a gap.
        assert!(
            matches!(prefix, Plan::Corrupt { segment, offset: 0, .. } if *segment == cut_seg + 1),
            "{prefix:?}"
        );
        assert_eq!(any, &keep_all);
    } else {
        assert_eq!((prefix, any), (&keep_all, &keep_all));
    }
}

/// Flips one byte of an intact segment: the checksummed scan stops at the record
/// holding it (at 0 for the header).
fn flip_one(
    segments: &[(Vec<u8>, u64)],
    flip_seg: usize,
    flip_at: u16,
    flip: u8,
    rules: ScanRules,
) {
    let (bytes, name) = &segments[flip_seg];
    let mut bytes = bytes.clone();
    let at = usize::from(flip_at) % bytes.len();
    bytes[at] ^= flip;
    let (s, _) = scan(&bytes, *name, rules, None);
    if at < SEGMENT_HEADER_LEN {
        assert!(s.header_lsn.is_none() && s.damage.is_some(), "{s:?}");
    } else {
        let ends = record_ends(&segments[flip_seg].0);
        let hit = ends.iter().take_while(|&&e| e <= at as u64).count();
        assert_eq!(
            s.records, hit as u64,
            "flip at {at} not caught at its record"
        );
        let start = if hit == 0 { SEG } else { ends[hit - 1] };
        assert_eq!(s.damage.as_ref().map(|d| d.0), Some(start), "{s:?}");
    }
}

/// End offsets of the records of an intact segment.
fn record_ends(bytes: &[u8]) -> Vec<u64> {
    let mut ends = Vec::new();
    let mut at = SEGMENT_HEADER_LEN;
    while at < bytes.len() {
        at += RECORD_HEADER_LEN + le_u32(&bytes[at + 8..]) as usize;
        ends.push(at as u64);
    }
    ends
}
