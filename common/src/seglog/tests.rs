//! The log's contract under faults: torn tails, damage elsewhere, failed appends,
//! failed syncs, failed rolls, and simulated power cuts (a property test).

#![allow(clippy::cast_possible_truncation)]

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use proptest::prelude::*;

use super::*;
use crate::faults;

fn cfg(retire: Retire) -> LogConfig {
    LogConfig {
        scope: "testlog",
        kind: *b"TEST",
        extension: "tlog",
        segment_target: 4096,
        max_payload: 1 << 20,
        retire,
        verify_closed: true,
        index: true,
    }
}

type Seen = Vec<(u64, u8, Vec<u8>)>;

fn open(dir: &Path, retire: Retire, start: u64) -> Result<(Log, Recovery, Seen), LogError> {
    let mut seen = Vec::new();
    let (log, rec) = Log::open(dir, cfg(retire), start, |v| {
        seen.push((
            v.lsn,
            v.kind,
            v.payload.map(<[u8]>::to_vec).unwrap_or_default(),
        ));
        Ok(())
    })?;
    Ok((log, rec, seen))
}

fn payload(i: u64, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i as usize * 31 + j) as u8).collect()
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("list")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "tlog"))
        .collect();
    v.sort();
    v
}

#[test]
fn records_survive_reopen_across_segments_and_read_back_by_lsn() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut log, rec, _) = open(dir.path(), Retire::Prefix, 1).expect("open");
    assert_eq!(rec.next_lsn, 1);
    let mut positions = Vec::new();
    for i in 1..=40u64 {
        let p = payload(i, 300);
        positions.push(log.append(2, &[&p[..100], &p[100..]]).expect("append"));
    }
    assert_eq!(log.sync().expect("sync"), 41);
    assert!(segment_files(dir.path()).len() >= 3, "rolled");
    for (i, pos) in positions.iter().enumerate() {
        let r = log.segments().read(*pos).expect("read");
        assert_eq!((r.lsn, r.kind), (i as u64 + 1, 2));
        assert_eq!(&r.payload[..], &payload(i as u64 + 1, 300)[..]);
    }
    drop(log);
    let (log, rec, seen) = open(dir.path(), Retire::Prefix, 1).expect("reopen");
    assert_eq!(rec.cut, None);
    assert_eq!((rec.records, rec.next_lsn), (40, 41));
    assert_eq!(seen.len(), 40);
    for (i, (lsn, kind, p)) in seen.iter().enumerate() {
        assert_eq!((*lsn, *kind), (i as u64 + 1, 2));
        assert_eq!(p, &payload(*lsn, 300));
    }
    let r = log.segments().read_lsn(17).expect("read by lsn");
    assert_eq!(&r.payload[..], &payload(17, 300)[..]);
}

#[test]
fn a_torn_tail_of_the_active_segment_is_cut_and_its_lsns_reused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut log, _, _) = open(dir.path(), Retire::Prefix, 0).expect("open");
    for i in 0..3 {
        log.append(1, &[&payload(i, 50)]).expect("append");
    }
    log.sync().expect("sync");
    let last = segment_files(dir.path()).pop().expect("segment");
    let good = std::fs::metadata(&last).expect("meta").len();
    drop(log);
    // Half a record at the end, as a power cut mid-write leaves it.
    let header = format::encode_record_header(1, 3, &[&payload(3, 50)]);
    let f = OpenOptions::new().write(true).open(&last).expect("open");
    f.write_all_at(&header[..10], good).expect("write");
    drop(f);
    let (mut log, rec, seen) = open(dir.path(), Retire::Prefix, 0).expect("reopen");
    let cut = rec.cut.expect("a cut");
    assert_eq!((cut.offset, cut.lsn, cut.bytes_dropped), (good, 3, 10));
    assert_eq!(seen.len(), 3);
    assert_eq!(std::fs::metadata(&last).expect("meta").len(), good);
    assert_eq!(log.append(1, &[b"next"]).expect("append").lsn, 3);
}

#[test]
fn damage_in_a_closed_segment_is_corruption_and_nothing_is_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut log, _, _) = open(dir.path(), Retire::Prefix, 0).expect("open");
    for i in 0..30 {
        log.append(1, &[&payload(i, 400)]).expect("append");
    }
    log.sync().expect("sync");
    drop(log);
    let files = segment_files(dir.path());
    assert!(files.len() >= 3);
    let lens: Vec<u64> = files
        .iter()
        .map(|f| std::fs::metadata(f).expect("meta").len())
        .collect();
    // One flipped payload byte in the middle of the first (closed) segment.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&files[0])
        .expect("open");
    let at = SEGMENT_HEADER + RECORD_HEADER + 400 + RECORD_HEADER + 7;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).expect("read");
    f.write_all_at(&[b[0] ^ 0x40], at).expect("write");
    drop(f);
    let err = open(dir.path(), Retire::Prefix, 0).expect_err("refused");
    match &err {
        LogError::Corrupt { path, offset, .. } => {
            assert_eq!(path, &files[0]);
            assert_eq!(*offset, SEGMENT_HEADER + RECORD_HEADER + 400);
        }
        other => panic!("expected corruption, got {other}"),
    }
    assert!(err.to_string().contains("nothing was cut"), "{err}");
    let after: Vec<u64> = files
        .iter()
        .map(|f| std::fs::metadata(f).expect("meta").len())
        .collect();
    assert_eq!(lens, after, "no file was changed");
}

#[test]
fn a_missing_segment_is_corruption_in_a_prefix_log_and_a_retired_one_in_another() {
    for retire in [Retire::Prefix, Retire::Any] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, _, _) = open(dir.path(), retire, 0).expect("open");
        for i in 0..30 {
            log.append(1, &[&payload(i, 400)]).expect("append");
        }
        log.sync().expect("sync");
        drop(log);
        let files = segment_files(dir.path());
        std::fs::remove_file(&files[1]).expect("remove");
        let got = open(dir.path(), retire, 0);
        match retire {
            Retire::Prefix => assert!(
                matches!(&got, Err(LogError::Corrupt { reason, .. }) if reason.contains("missing")),
                "{got:?}"
            ),
            Retire::Any => {
                let (_, rec, _) = got.expect("a gap is a retired segment");
                assert_eq!(rec.segments, files.len() - 1);
            }
        }
    }
    // A prefix log whose owner still needs lsns before its first segment.
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut log, _, _) = open(dir.path(), Retire::Prefix, 10).expect("open");
    log.append(1, &[b"x"]).expect("append");
    log.sync().expect("sync");
    drop(log);
    assert!(matches!(
        open(dir.path(), Retire::Prefix, 5),
        Err(LogError::Corrupt { .. })
    ));
}

#[test]
fn a_skip_leaves_a_gap_that_is_no_loss_only_below_the_owners_floor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut log, _, _) = open(dir.path(), Retire::Prefix, 1).expect("open");
    for i in 0..3 {
        log.append(1, &[&payload(i, 10)]).expect("append");
    }
    log.skip_to(2).expect("a skip backwards does nothing");
    assert_eq!(log.next_lsn(), 4);
    log.skip_to(10).expect("skip");
    assert_eq!((log.next_lsn(), log.durable_lsn()), (10, 10));
    let pos = log.append(1, &[b"after"]).expect("append");
    assert_eq!((pos.lsn, pos.segment), (10, 10));
    log.sync().expect("sync");
    drop(log);
    let (log, rec, _) = open(dir.path(), Retire::Prefix, 10).expect("gap below the floor");
    assert_eq!(rec.next_lsn, 11);
    assert_eq!(
        log.segments().read_lsn(10).expect("read").payload.as_ref(),
        b"after"
    );
    drop(log);
    let got = open(dir.path(), Retire::Prefix, 5);
    assert!(
        matches!(&got, Err(LogError::Corrupt { reason, .. }) if reason.contains("missing")),
        "the owner needs lsn 5 to 9: {got:?}"
    );
}

#[test]
fn a_failed_append_is_cut_back_so_the_next_follows_the_last_good_record() {
    for fault in ["short", "enospc", "eio"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, _, _) = open(dir.path(), Retire::Prefix, 0).expect("open");
        log.append(1, &[&payload(0, 100)]).expect("append");
        let file = segment_files(dir.path()).pop().expect("segment");
        let good = std::fs::metadata(&file).expect("meta").len();
        {
            let _armed = faults::arm_under(dir.path(), &format!("testlog.write@1={fault}"))
                .expect("fault injection is compiled in for tests");
            let err = log.append(1, &[&payload(1, 100)]).expect_err("injected");
            assert_eq!(err.is_out_of_space(), fault != "eio", "{err}");
        }
        assert_eq!(
            std::fs::metadata(&file).expect("meta").len(),
            good,
            "{fault}: partial bytes cut back"
        );
        let pos = log.append(1, &[&payload(2, 100)]).expect("append after");
        assert_eq!((pos.lsn, pos.offset), (1, good));
        log.sync().expect("sync");
        drop(log);
        let (_, rec, seen) = open(dir.path(), Retire::Prefix, 0).expect("reopen");
        assert_eq!(rec.cut, None, "{fault}: nothing torn");
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[1].2, payload(2, 100));
    }
}

#[test]
fn a_failed_cut_back_or_sync_poisons_the_log_until_reopened() {
    // Append fails and so does the cut-back.
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut log, _, _) = open(dir.path(), Retire::Prefix, 0).expect("open");
    log.append(1, &[b"one"]).expect("append");
    log.sync().expect("sync");
    {
        let _w = faults::arm_under(dir.path(), "testlog.write@1=short").expect("arm");
        let _t = faults::arm_under(dir.path(), "testlog.truncate@1=eio").expect("arm");
        let err = log.append(1, &[&[7u8; 200]]).expect_err("injected");
        assert!(matches!(err, LogError::Poisoned { .. }), "{err}");
    }
    assert!(matches!(
        log.append(1, &[b"two"]),
        Err(LogError::Poisoned { .. })
    ));
    assert!(matches!(log.sync(), Err(LogError::Poisoned { .. })));
    drop(log);
    let (mut log, rec, seen) = open(dir.path(), Retire::Prefix, 0).expect("reopen");
    assert!(rec.cut.is_some(), "the half record is a torn tail");
    assert_eq!(seen.len(), 1);
    log.append(1, &[b"two"]).expect("a reopened log appends");

    // A failed fdatasync: never retried.
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut log, _, _) = open(dir.path(), Retire::Prefix, 0).expect("open");
    log.append(1, &[b"one"]).expect("append");
    {
        let _s = faults::arm_under(dir.path(), "testlog.sync@1=eio").expect("arm");
        assert!(matches!(log.sync(), Err(LogError::Poisoned { .. })));
    }
    assert_eq!(log.durable_lsn(), 0, "nothing was made durable");
    let err = log.sync().expect_err("a retry is refused");
    assert!(err.to_string().contains("fdatasync"), "{err}");
    assert!(log.segments().poisoned().is_some());
}

#[test]
fn a_failed_roll_leaves_no_segment_behind_and_is_retried() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut log, _, _) = open(dir.path(), Retire::Prefix, 0).expect("open");
    while segment_files(dir.path()).len() == 1 {
        let before = log.next_lsn();
        let _w = faults::arm_under(dir.path(), "testlog.create@1=enospc").expect("arm");
        match log.append(1, &[&[1u8; 500]]) {
            Ok(_) => {}
            Err(e) => {
                assert!(e.is_out_of_space(), "{e}");
                assert_eq!(log.next_lsn(), before);
                break;
            }
        }
    }
    assert_eq!(segment_files(dir.path()).len(), 1, "no half-made segment");
    // The header write of the new segment fails: the file is removed again.
    {
        let _w = faults::arm_under(dir.path(), "testlog.write@1=short").expect("arm");
        assert!(log.append(1, &[&[1u8; 500]]).is_err());
    }
    assert_eq!(segment_files(dir.path()).len(), 1);
    let pos = log.append(1, &[&[2u8; 500]]).expect("roll retried");
    assert_eq!(pos.offset, SEGMENT_HEADER);
    assert_eq!(segment_files(dir.path()).len(), 2);
    // Creation torn by a crash: a last segment with a partial header is removed.
    log.sync().expect("sync");
    let next = log.next_lsn();
    drop(log);
    let torn = dir.path().join(segment_name(next, "tlog"));
    std::fs::write(&torn, &format::encode_segment_header(*b"TEST", next)[..9]).expect("write");
    let (_, rec, _) = open(dir.path(), Retire::Prefix, 0).expect("reopen");
    assert_eq!(rec.torn_segment_removed, Some(torn.clone()));
    assert!(!torn.exists());
}

#[test]
fn retire_and_truncate_are_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut log, _, _) = open(dir.path(), Retire::Prefix, 0).expect("open");
    for i in 0..40 {
        log.append(1, &[&payload(i, 300)]).expect("append");
    }
    log.sync().expect("sync");
    let before = log.segments().list();
    let freed = log
        .segments()
        .retire_below(before[2].first_lsn)
        .expect("retire");
    assert_eq!(freed, before[0].bytes + before[1].bytes);
    assert_eq!(log.segments().first_lsn(), before[2].first_lsn);
    assert!(matches!(
        log.segments().read_lsn(0),
        Err(LogError::NotHeld { .. })
    ));
    let cut_at = before[2].first_lsn + 2;
    log.truncate_from(cut_at).expect("truncate");
    assert_eq!(log.next_lsn(), cut_at);
    log.append(1, &[b"after"]).expect("append");
    log.sync().expect("sync");
    drop(log);
    let (log, rec, seen) = open(dir.path(), Retire::Prefix, before[2].first_lsn).expect("reopen");
    assert_eq!(rec.next_lsn, cut_at + 1);
    assert_eq!(seen.last().map(|s| s.2.clone()), Some(b"after".to_vec()));
    assert_eq!(seen.first().map(|s| s.0), Some(before[2].first_lsn));
    assert!(
        log.segments()
            .retire(log.segments().active_segment())
            .expect("retire")
            == 0
    );
}

#[test]
fn another_format_version_is_refused_not_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut log, _, _) = open(dir.path(), Retire::Prefix, 0).expect("open");
    log.append(1, &[b"x"]).expect("append");
    log.sync().expect("sync");
    drop(log);
    let file = segment_files(dir.path()).pop().expect("segment");
    let mut h = format::encode_segment_header(*b"TEST", 0);
    h[4] = 2;
    let crc = crc32fast::hash(&h[..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    let f = OpenOptions::new().write(true).open(&file).expect("open");
    f.write_all_at(&h, 0).expect("write");
    let len = std::fs::metadata(&file).expect("meta").len();
    assert!(matches!(
        open(dir.path(), Retire::Prefix, 0),
        Err(LogError::Unsupported { .. })
    ));
    assert_eq!(std::fs::metadata(&file).expect("meta").len(), len);
}

#[derive(Debug, Clone)]
enum Step {
    Append(usize),
    Sync,
    FailedAppend(usize),
    /// Power cut keeping `keep` of the unsynced bytes, then `garbage` more.
    Cut {
        keep: u16,
        garbage: u8,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0usize..900).prop_map(Step::Append),
        3 => Just(Step::Sync),
        1 => (1usize..900).prop_map(Step::FailedAppend),
        1 => (any::<u16>(), any::<u8>()).prop_map(|(keep, garbage)| Step::Cut { keep, garbage }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever the order of appends, syncs, failed appends and power cuts: after every
    /// cut the log holds every synced record exactly, then a prefix of the unsynced
    /// ones, never a record that was not appended, and lsns stay contiguous.
    #[test]
    fn power_cuts_keep_every_synced_record(steps in proptest::collection::vec(step(), 1..60)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, _, _) = open(dir.path(), Retire::Prefix, 0).expect("open");
        // What the log should hold: (lsn, payload), and how many are synced.
        let mut model: Vec<Vec<u8>> = Vec::new();
        let mut synced = 0usize;
        let mut synced_len = SEGMENT_HEADER;
        let mut active = segment_files(dir.path()).pop().expect("segment");
        for (n, s) in steps.into_iter().enumerate() {
            match s {
                Step::Append(len) => {
                    let p = payload(n as u64, len);
                    log.append(1, &[&p]).expect("append");
                    model.push(p);
                }
                Step::Sync => {
                    log.sync().expect("sync");
                    synced = model.len();
                }
                Step::FailedAppend(len) => {
                    let _armed = faults::arm_under(dir.path(), "testlog.write@1=short").expect("arm");
                    // The first write is the record's, or a new segment's header when
                    // the append rolls: either way the append fails and leaves nothing.
                    prop_assert!(log.append(1, &[&payload(n as u64, len)]).is_err());
                }
                Step::Cut { keep, garbage } => {
                    // Closed segments are synced; cut the active one back to a point
                    // past its synced length and scribble after it.
                    let files = segment_files(dir.path());
                    let last = files.last().expect("segment").clone();
                    let len = std::fs::metadata(&last).expect("meta").len();
                    prop_assert_eq!(&last, &active);
                    let durable = synced_len;
                    let keep_to = durable + u64::from(keep) % (len - durable + 1);
                    drop(log);
                    let f = OpenOptions::new().write(true).open(&last).expect("open");
                    f.set_len(keep_to).expect("cut");
                    if garbage > 0 {
                        f.write_all_at(&vec![garbage; usize::from(garbage)], keep_to).expect("garbage");
                    }
                    drop(f);
                    let (l, _, seen) = open(dir.path(), Retire::Prefix, 0).expect("reopen after a cut");
                    prop_assert!(seen.len() >= synced, "{} records seen, {synced} were synced", seen.len());
                    prop_assert!(seen.len() <= model.len());
                    for (i, (lsn, _, p)) in seen.iter().enumerate() {
                        prop_assert_eq!(*lsn, i as u64);
                        prop_assert_eq!(p, &model[i]);
                    }
                    model.truncate(seen.len());
                    log = l;
                    log.sync().expect("sync");
                    synced = model.len();
                }
            }
            let files = segment_files(dir.path());
            let last = files.last().expect("segment").clone();
            if last != active {
                // A roll synced everything before the new segment.
                active = last.clone();
                synced = synced.max(usize::try_from(log.segments().active_segment()).unwrap_or(0));
                synced_len = SEGMENT_HEADER;
            }
            if !log.has_unsynced() {
                synced_len = std::fs::metadata(&active).expect("meta").len();
                synced = model.len();
            }
        }
    }
}

#[test]
fn a_record_at_the_last_lsn_is_damage_not_an_overflow() {
    // Found by the seglog_recovery fuzz target: a header lsn at u64::MAX made the
    // scan's next expected lsn overflow.
    let rules = recover::ScanRules {
        kind: *b"TEST",
        max_payload: 64,
        payloads: true,
    };
    let first = u64::MAX - 1;
    let mut seg = format::encode_segment_header(*b"TEST", first).to_vec();
    for lsn in [first, u64::MAX] {
        seg.extend_from_slice(&format::encode_record_header(1, lsn, &[b"x"]));
        seg.extend_from_slice(b"x");
    }
    let scan = recover::scan_segment(&seg[..], first, rules, |_| Ok(())).expect("scan");
    assert_eq!(scan.records, 1);
    assert_eq!(scan.end_lsn(), u64::MAX);
    let (at, reason) = scan.damage.expect("the second record is damage");
    assert_eq!(at, scan.valid_len);
    assert!(reason.contains("u64::MAX"), "{reason}");
}
