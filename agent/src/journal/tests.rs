//! Journal tests: round trips, space accounting, full → bitmap mode, recovery from torn
//! and corrupt tails, durable releases, and a property test over random operation
//! sequences with reopens and damage.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use boomerang_common::seglog::{RECORD_HEADER, SEGMENT_HEADER};
use bytes::Bytes;
use proptest::prelude::*;

use super::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const KIB: u64 = 1024;

fn fill(len: usize, seed: u8) -> Vec<u8> {
    (0u8..251)
        .cycle()
        .take(len)
        .map(|b| seed.wrapping_add(b))
        .collect()
}

fn write_entry(disk: &str, offset: u64, data: &[u8]) -> Entry {
    Entry::Write {
        disk: disk.into(),
        offset,
        data: Bytes::copy_from_slice(data),
    }
}

fn all(j: &Journal) -> Vec<Record> {
    j.read_from(0, u64::MAX).expect("read the journal")
}

fn seqs(records: &[Record]) -> Vec<u64> {
    records.iter().map(|r| r.seq).collect()
}

fn segment_files(state: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(state.join(SUBDIR))
        .expect("list the journal")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jnl"))
        .collect();
    files.sort();
    files
}

fn last_segment(state: &Path) -> PathBuf {
    segment_files(state).pop().expect("a segment file")
}

/// Appends `n` writes of `len` bytes to disk "vda" and returns their entries.
fn append_writes(j: &mut Journal, n: u64, len: usize) -> Vec<Entry> {
    (0..n)
        .map(|i| {
            let data = fill(len, i.to_le_bytes()[0]);
            j.append_write("vda", i * 4096, &data).expect("append");
            write_entry("vda", i * 4096, &data)
        })
        .collect()
}

#[test]
fn writes_and_tags_round_trip_in_order_and_survive_reopen() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut j = Journal::open(dir.path(), 1 << 20)?;
    assert_eq!(j.next_seq(), 1);
    let a = fill(1000, 1);
    let b = fill(4096, 2);
    assert_eq!(j.append_write("vda", 0, &a)?, 1);
    assert_eq!(j.append_tag("vda", TagKind::CrashConsistent, 7, 1_000)?, 2);
    assert_eq!(j.append_write("vdb", 8192, &b)?, 3);
    assert_eq!(j.append_tag("vdb", TagKind::AppConsistent, 8, 2_000)?, 4);
    assert_eq!(j.append_write("vda", 1 << 40, b"")?, 5);
    assert_eq!(j.durable_seq(), 0);
    assert_eq!(j.sync()?, 5);
    assert_eq!(j.durable_seq(), 5);
    let expected = vec![
        write_entry("vda", 0, &a),
        Entry::Tag {
            disk: "vda".into(),
            kind: TagKind::CrashConsistent,
            point_id: 7,
            time_ms: 1_000,
        },
        write_entry("vdb", 8192, &b),
        Entry::Tag {
            disk: "vdb".into(),
            kind: TagKind::AppConsistent,
            point_id: 8,
            time_ms: 2_000,
        },
        write_entry("vda", 1 << 40, b""),
    ];
    let records = all(&j);
    assert_eq!(seqs(&records), vec![1, 2, 3, 4, 5]);
    assert_eq!(
        records.into_iter().map(|r| r.entry).collect::<Vec<_>>(),
        expected
    );
    assert_eq!(seqs(&j.read_from(3, u64::MAX)?), vec![3, 4, 5]);
    assert!(j.read_from(6, u64::MAX)?.is_empty());

    // The byte budget: at least one record, never more than the budget after it.
    let first_len = RECORD_HEADER + (1 + 3 + 8 + a.len()) as u64;
    let tag_len = RECORD_HEADER + 1 + 3 + 17;
    assert_eq!(seqs(&j.read_from(1, 1)?), vec![1]);
    assert_eq!(seqs(&j.read_from(1, first_len + tag_len)?), vec![1, 2]);
    assert_eq!(seqs(&j.read_from(1, first_len + tag_len + 1)?), vec![1, 2]);

    drop(j);
    let j = Journal::open(dir.path(), 1 << 20)?;
    let rec = j.recovery();
    assert_eq!(
        (rec.first_held, rec.held_records, rec.cut.clone()),
        (1, 5, None)
    );
    assert_eq!(
        all(&j).into_iter().map(|r| r.entry).collect::<Vec<_>>(),
        expected
    );
    assert_eq!(j.next_seq(), 6);
    assert_eq!(j.durable_seq(), 5);
    Ok(())
}

#[test]
fn release_frees_space_and_deletes_whole_segments() -> TestResult {
    let dir = tempfile::tempdir()?;
    // 64 KiB: 8 KiB segments, 7 records of 1 KiB each.
    let mut j = Journal::open(dir.path(), 64 * KIB)?;
    append_writes(&mut j, 40, 1000);
    let segments = j.segment_count();
    assert!(segments >= 5, "{segments} segments");
    assert_eq!(segment_files(dir.path()).len(), segments);
    let used = j.used_bytes();

    j.release_through(20)?;
    assert_eq!(j.released_through(), 20);
    assert_eq!(j.held_records(), 20);
    assert!(j.segment_count() < segments);
    assert!(j.used_bytes() < used);
    assert_eq!(segment_files(dir.path()).len(), j.segment_count());
    let held = all(&j);
    assert_eq!(seqs(&held), (21..=40).collect::<Vec<_>>());
    // Reading from a released seq starts at the first held one.
    assert_eq!(j.read_from(3, 1)?[0].seq, 21);
    // Releasing again or backwards changes nothing.
    j.release_through(20)?;
    j.release_through(5)?;
    assert_eq!(j.released_through(), 20);

    j.release_through(40)?;
    assert_eq!(j.held_records(), 0);
    assert!(all(&j).is_empty());
    assert_eq!(j.segment_count(), 1, "only the active segment is kept");
    assert!(j.used_bytes() <= 8 * KIB + SEGMENT_HEADER);
    assert_eq!(j.append_write("vda", 0, b"after")?, 41);

    let err = j.release_through(42).expect_err("42 was never appended");
    assert!(matches!(
        err,
        JournalError::ReleaseBeyondEnd { seq: 42, last: 41 }
    ));
    Ok(())
}

#[test]
fn full_is_reported_before_the_capacity_is_exceeded_then_bitmap_mode() -> TestResult {
    let dir = tempfile::tempdir()?;
    let capacity = 16 * KIB;
    let mut j = Journal::open(dir.path(), capacity)?;
    let mut capture = CaptureState::new(DirtyBitmap::new(1 << 30));
    let data = fill(1000, 9);
    let mut offset = 0;
    let (needed, free) = loop {
        match j.append_write("vda", offset, &data) {
            Ok(_) => {
                assert!(j.used_bytes() <= capacity);
                offset += 4096;
            }
            Err(AppendError::Full {
                needed,
                free,
                capacity: c,
            }) => {
                assert_eq!(c, capacity);
                break (needed, free);
            }
            Err(e) => return Err(e.into()),
        }
    };
    assert!(needed > free);
    assert_eq!(free, capacity - j.used_bytes());
    let on_disk: u64 = segment_files(dir.path())
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    assert_eq!(on_disk, j.used_bytes(), "accounting matches the files");
    assert!(on_disk <= capacity);
    let held = j.held_records();

    // The intercept drops to bitmap mode and keeps the write that did not fit.
    capture.on_full();
    capture.mark(offset, data.len() as u64);
    assert_eq!(capture.mode(), Mode::Bitmap);
    assert!(!capture.crash_consistent_tags_allowed());
    // Still full for the next write: it goes to the bitmap too.
    assert!(matches!(
        j.append_write("vda", offset + 4096, &data),
        Err(AppendError::Full { .. })
    ));
    capture.mark(offset + 4096, data.len() as u64);

    // The shipper sends the journal first, then the bitmap; the process server acks.
    let records = j.read_from(0, u64::MAX)?;
    assert_eq!(records.len() as u64, held);
    let last = records.last().map(|r| r.seq).expect("records");
    j.release_through(last)?;
    let runs = capture.take_runs(1 << 20);
    assert_eq!(runs, vec![(offset, 2 * 4096)]);
    assert!(!capture.caught_up());
    capture.runs_durable(runs.len());
    assert!(capture.caught_up());
    assert!(capture.crash_consistent_tags_allowed());
    assert_eq!(j.append_write("vda", 0, &data)?, last + 1);
    Ok(())
}

/// Damages the last segment with `damage`, reopens, and checks the first `keep`
/// records of `entries` survive and nothing else.
fn reopen_after_damage(
    damage: impl FnOnce(&Path) -> std::io::Result<()>,
    keep: usize,
    reason: &str,
) -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut j = Journal::open(dir.path(), 1 << 20)?;
    let entries = append_writes(&mut j, 5, 500);
    j.sync()?;
    drop(j);
    damage(&last_segment(dir.path()))?;

    let mut j = Journal::open(dir.path(), 1 << 20)?;
    let cut = j.recovery().cut.clone().expect("a cut");
    assert!(cut.reason.contains(reason), "{}", cut.reason);
    assert_eq!(cut.lsn, keep as u64 + 1);
    let records = all(&j);
    assert_eq!(
        records.into_iter().map(|r| r.entry).collect::<Vec<_>>(),
        entries[..keep].to_vec()
    );
    // The journal goes on after the cut, and the next reopen is clean.
    let seq = j.append_write("vda", 0, b"new")?;
    assert_eq!(seq, keep as u64 + 1);
    j.sync()?;
    drop(j);
    let j = Journal::open(dir.path(), 1 << 20)?;
    assert_eq!(j.recovery().cut, None);
    let records = all(&j);
    assert_eq!(records.len(), keep + 1);
    assert_eq!(
        records.last().map(|r| r.entry.clone()),
        Some(write_entry("vda", 0, b"new"))
    );
    Ok(())
}

fn truncate_by(n: u64) -> impl FnOnce(&Path) -> std::io::Result<()> {
    move |path| {
        let f = OpenOptions::new().write(true).open(path)?;
        let len = f.metadata()?.len();
        f.set_len(len - n)
    }
}

fn flip_byte_from_end(n: u64) -> impl FnOnce(&Path) -> std::io::Result<()> {
    move |path| {
        let f = OpenOptions::new().read(true).write(true).open(path)?;
        let at = f.metadata()?.len() - n;
        let mut b = [0u8];
        f.read_exact_at(&mut b, at)?;
        f.write_all_at(&[b[0] ^ 0x40], at)
    }
}

#[test]
fn a_last_record_truncated_mid_way_is_cut_at_reopen() -> TestResult {
    reopen_after_damage(truncate_by(200), 4, "torn")
}

#[test]
fn a_last_record_truncated_in_its_header_is_cut_at_reopen() -> TestResult {
    // Record 5 is 24 + 1 + 3 + 8 + 500 bytes: leave 10 bytes of its header.
    reopen_after_damage(truncate_by(536 - 10), 4, "header torn")
}

#[test]
fn a_flipped_byte_in_the_last_record_is_cut_at_reopen() -> TestResult {
    reopen_after_damage(flip_byte_from_end(7), 4, "checksum mismatch")
}

#[test]
fn a_flipped_magic_is_cut_at_reopen() -> TestResult {
    reopen_after_damage(flip_byte_from_end(536), 4, "magic")
}

#[test]
fn an_empty_segment_left_by_a_crash_right_after_its_creation_is_not_a_cut() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut j = Journal::open(dir.path(), 1 << 20)?;
    let entries = append_writes(&mut j, 3, 100);
    drop(j);
    let empty = dir.path().join(SUBDIR).join("seg-0000000000000004.jnl");
    std::fs::File::create(&empty)?;
    let mut j = Journal::open(dir.path(), 1 << 20)?;
    assert_eq!(j.recovery().cut, None);
    assert!(!empty.exists());
    assert_eq!(
        all(&j).into_iter().map(|r| r.entry).collect::<Vec<_>>(),
        entries
    );
    assert_eq!(j.append_write("vda", 0, b"x")?, 4);
    Ok(())
}

#[test]
fn a_damaged_closed_segment_is_set_aside_never_cut_silently() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut j = Journal::open(dir.path(), 64 * KIB)?;
    append_writes(&mut j, 30, 1000);
    j.sync()?;
    j.release_through(3)?;
    drop(j);
    let files = segment_files(dir.path());
    assert!(files.len() >= 4);
    // Bit rot in a record of the second segment: held records there and after it
    // are not the active segment's torn tail.
    let f = OpenOptions::new().read(true).write(true).open(&files[1])?;
    let at = SEGMENT_HEADER + RECORD_HEADER + 20;
    let mut b = [0u8];
    f.read_exact_at(&mut b, at)?;
    f.write_all_at(&[b[0] ^ 1], at)?;
    let mut j = Journal::open(dir.path(), 64 * KIB)?;
    let aside = j.recovery().set_aside.clone().expect("set aside");
    assert!(aside.reason.contains("checksum"), "{}", aside.reason);
    assert!(
        aside.reason.contains(&files[1].display().to_string()),
        "names the segment: {}",
        aside.reason
    );
    assert_eq!(j.recovery().cut, None);
    assert!(all(&j).is_empty(), "nothing damaged is ever read");
    // Every segment is kept for inspection, none is left in the journal.
    let kept = std::fs::read_dir(&aside.dir)?.count();
    assert_eq!(kept, files.len());
    assert_eq!(segment_files(dir.path()).len(), 1, "a new active segment");
    // Seqs go on after the release.
    assert_eq!(j.append_write("vda", 0, b"x")?, 4);
    j.sync()?;
    drop(j);
    let j = Journal::open(dir.path(), 64 * KIB)?;
    assert_eq!(j.recovery().set_aside, None);
    assert_eq!(seqs(&all(&j)), vec![4]);
    Ok(())
}

#[test]
fn a_failed_append_is_cut_back_and_a_full_file_system_is_full() -> TestResult {
    use boomerang_common::faults;
    let dir = tempfile::tempdir()?;
    let mut j = Journal::open(dir.path(), 1 << 20)?;
    let entries = append_writes(&mut j, 3, 500);
    // A short write (half stored, then ENOSPC): the disk goes to bitmap mode.
    let short = faults::arm_under(dir.path(), "journal.write@1=short")?;
    assert!(matches!(
        j.append_write("vda", 0, &fill(500, 9)),
        Err(AppendError::Full { .. })
    ));
    assert_eq!(short.fired(), 1);
    drop(short);
    // EIO on a write: an error, and nothing of it stays behind.
    let eio = faults::arm_under(dir.path(), "journal.write@1=eio")?;
    assert!(matches!(
        j.append_write("vda", 0, &fill(500, 9)),
        Err(AppendError::Journal(JournalError::Log(_)))
    ));
    drop(eio);
    // The next record follows the last good one, and a reopen finds every record.
    assert_eq!(j.append_write("vda", 4096, b"next")?, 4);
    j.sync()?;
    drop(j);
    let j = Journal::open(dir.path(), 1 << 20)?;
    assert_eq!(j.recovery().cut, None, "no partial bytes were left to cut");
    let mut expected = entries;
    expected.push(write_entry("vda", 4096, b"next"));
    assert_eq!(
        all(&j).into_iter().map(|r| r.entry).collect::<Vec<_>>(),
        expected
    );
    Ok(())
}

#[test]
fn a_failed_fdatasync_poisons_the_journal_until_reopened() -> TestResult {
    use boomerang_common::faults;
    let dir = tempfile::tempdir()?;
    let mut j = Journal::open(dir.path(), 1 << 20)?;
    append_writes(&mut j, 2, 100);
    let rule = faults::arm_under(dir.path(), "journal.sync@1=eio")?;
    assert!(matches!(j.sync(), Err(JournalError::Poisoned { .. })));
    drop(rule);
    // No retry may claim durability after a failed fdatasync.
    assert!(matches!(j.sync(), Err(JournalError::Poisoned { .. })));
    assert!(matches!(
        j.append_write("vda", 0, b"x"),
        Err(AppendError::Journal(JournalError::Poisoned { .. }))
    ));
    assert_eq!(j.durable_seq(), 0);
    drop(j);
    let mut j = Journal::open(dir.path(), 1 << 20)?;
    assert_eq!(seqs(&all(&j)), vec![1, 2], "reopened from what is on disk");
    assert_eq!(j.append_write("vda", 0, b"x")?, 3);
    assert_eq!(j.sync()?, 3);
    Ok(())
}

#[test]
fn releases_survive_reopen() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut j = Journal::open(dir.path(), 64 * KIB)?;
    let entries = append_writes(&mut j, 20, 1000);
    j.release_through(12)?;
    drop(j);

    let mut j = Journal::open(dir.path(), 64 * KIB)?;
    assert_eq!(j.released_through(), 12);
    assert_eq!(j.recovery().first_held, 13);
    assert_eq!(j.recovery().held_records, 8);
    let records = all(&j);
    assert_eq!(seqs(&records), (13..=20).collect::<Vec<_>>());
    assert_eq!(
        records.into_iter().map(|r| r.entry).collect::<Vec<_>>(),
        entries[12..].to_vec()
    );

    // Everything released: a reopen retires every closed segment, and seqs go on.
    j.release_through(20)?;
    drop(j);
    let mut j = Journal::open(dir.path(), 64 * KIB)?;
    assert!(all(&j).is_empty());
    assert_eq!(j.segment_count(), 1, "only the active segment");
    assert_eq!(segment_files(dir.path()).len(), 1);
    assert!(j.used_bytes() <= 8 * KIB + SEGMENT_HEADER);
    assert_eq!(j.append_write("vda", 0, b"x")?, 21);
    Ok(())
}

#[test]
fn a_tail_lost_after_its_release_does_not_reuse_released_seqs() -> TestResult {
    // Records shipped and released before they were synced, then lost in a host crash.
    let dir = tempfile::tempdir()?;
    let mut j = Journal::open(dir.path(), 1 << 20)?;
    append_writes(&mut j, 5, 500);
    j.release_through(5)?;
    drop(j);
    let seg = last_segment(dir.path());
    OpenOptions::new()
        .write(true)
        .open(&seg)?
        .set_len(SEGMENT_HEADER + 536)?;
    let mut j = Journal::open(dir.path(), 1 << 20)?;
    assert_eq!(j.held_records(), 0);
    assert_eq!(j.append_write("vda", 0, b"x")?, 6);
    assert_eq!(seqs(&all(&j)), vec![6]);
    Ok(())
}

#[test]
fn bad_records_and_configurations_are_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    assert!(matches!(
        Journal::open(dir.path(), 100),
        Err(JournalError::Capacity { capacity: 100 })
    ));
    let mut j = Journal::open(dir.path(), 1 << 20)?;
    let long = "d".repeat(MAX_DISK_ID + 1);
    for result in [
        j.append_write(&long, 0, b"x"),
        j.append_write("", 0, b"x"),
        j.append_tag(&long, TagKind::CrashConsistent, 1, 1),
        j.append_write("vda", 0, &vec![0u8; MAX_WRITE + 1]),
    ] {
        assert!(matches!(
            result,
            Err(AppendError::Journal(JournalError::InvalidRecord(_)))
        ));
    }
    assert_eq!(j.next_seq(), 1, "nothing was appended");
    assert_eq!(j.append_write(&"d".repeat(MAX_DISK_ID), 0, b"x")?, 1);
    Ok(())
}

#[test]
fn a_segment_of_another_version_is_refused_not_cut() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut j = Journal::open(dir.path(), 1 << 20)?;
    append_writes(&mut j, 2, 100);
    drop(j);
    let seg = last_segment(dir.path());
    let mut header = boomerang_common::seglog::format::encode_segment_header(*b"AJNL", 1);
    header[4] = 9;
    let crc = crc32fast::hash(&header[..header.len() - 4]);
    let n = header.len();
    header[n - 4..].copy_from_slice(&crc.to_le_bytes());
    OpenOptions::new()
        .write(true)
        .open(&seg)?
        .write_all_at(&header, 0)?;
    let err = Journal::open(dir.path(), 1 << 20).expect_err("version 2 refused");
    assert!(
        matches!(err, JournalError::Log(LogError::Unsupported { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("version 9"), "{err}");
    assert!(seg.exists(), "nothing deleted");
    Ok(())
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        disk: u8,
        offset: u64,
        len: usize,
        seed: u8,
    },
    Tag {
        point_id: u64,
    },
    Release(u16),
    Sync,
    Reopen,
    /// Host crash: the last segment loses this many bytes at its end.
    Tear(u16),
    /// Bit rot: a byte this far from the end of the last segment flips.
    Flip(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u8..3, 0u64..(1 << 30), 0usize..3000, any::<u8>())
            .prop_map(|(disk, offset, len, seed)| Op::Write { disk, offset, len, seed }),
        2 => any::<u64>().prop_map(|point_id| Op::Tag { point_id }),
        3 => any::<u16>().prop_map(Op::Release),
        1 => Just(Op::Sync),
        2 => Just(Op::Reopen),
        1 => (1u16..3000).prop_map(Op::Tear),
        1 => (1u16..3000).prop_map(Op::Flip),
    ]
}

const PROP_CAPACITY: u64 = 12 * KIB;

/// Applies damage to the last segment, if any, and reopens.
fn damage_and_reopen(state: &Path, j: Journal, op: &Op) -> Journal {
    drop(j);
    if let Some(seg) = segment_files(state).pop() {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&seg)
            .expect("open segment");
        let len = f.metadata().expect("stat segment").len();
        match *op {
            Op::Tear(n) => f
                .set_len(len.saturating_sub(u64::from(n)))
                .expect("truncate"),
            Op::Flip(n) if len > 0 => {
                let at = len - 1 - (u64::from(n) % len);
                let mut b = [0u8];
                f.read_exact_at(&mut b, at).expect("read byte");
                f.write_all_at(&[b[0] ^ 0x01], at).expect("flip byte");
            }
            _ => {}
        }
    }
    Journal::open(state, PROP_CAPACITY).expect("reopen after damage")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Random appends, releases, syncs, reopens and damage never return a released or
    /// damaged record and always return the held ones in order (after damage: a prefix
    /// of them).
    #[test]
    fn random_operations_keep_held_records_in_order(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path();
        let mut j = Journal::open(state, PROP_CAPACITY).expect("open");
        let mut held: Vec<Record> = Vec::new();
        let mut released = 0u64;
        for op in &ops {
            match *op {
                Op::Write { disk, offset, len, seed } => {
                    let disk = format!("disk{disk}");
                    let data = fill(len, seed);
                    match j.append_write(&disk, offset, &data) {
                        Ok(seq) => {
                            prop_assert_eq!(seq, j.next_seq() - 1);
                            prop_assert!(held.last().is_none_or(|r| r.seq + 1 == seq));
                            held.push(Record { seq, entry: write_entry(&disk, offset, &data) });
                        }
                        Err(AppendError::Full { needed, free, .. }) => prop_assert!(needed > free),
                        Err(e) => prop_assert!(false, "append failed: {}", e),
                    }
                }
                Op::Tag { point_id } => match j.append_tag("disk0", TagKind::CrashConsistent, point_id, 5) {
                    Ok(seq) => held.push(Record {
                        seq,
                        entry: Entry::Tag {
                            disk: "disk0".into(),
                            kind: TagKind::CrashConsistent,
                            point_id,
                            time_ms: 5,
                        },
                    }),
                    Err(AppendError::Full { .. }) => {}
                    Err(e) => prop_assert!(false, "append failed: {}", e),
                },
                Op::Release(k) => {
                    if !held.is_empty() {
                        let seq = held[usize::from(k) % held.len()].seq;
                        j.release_through(seq).expect("release");
                        held.retain(|r| r.seq > seq);
                        released = seq;
                    }
                }
                Op::Sync => {
                    j.sync().expect("sync");
                }
                Op::Reopen => {
                    drop(j);
                    j = Journal::open(state, PROP_CAPACITY).expect("reopen");
                    prop_assert_eq!(&j.recovery().cut, &None);
                }
                Op::Tear(_) | Op::Flip(_) => {
                    j = damage_and_reopen(state, j, op);
                    let survived = all(&j);
                    prop_assert!(survived.len() <= held.len());
                    prop_assert_eq!(&survived[..], &held[..survived.len()], "not a prefix of the held records");
                    held = survived;
                }
            }
            prop_assert_eq!(j.released_through(), released);
            prop_assert_eq!(all(&j), held.clone());
            prop_assert_eq!(j.held_records(), held.len() as u64);
            prop_assert!(j.used_bytes() <= PROP_CAPACITY);
            prop_assert!(held.iter().all(|r| r.seq > released));
        }
    }
}
