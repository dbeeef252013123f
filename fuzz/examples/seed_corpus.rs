//! Writes the seed corpora of the fuzz targets, one directory per target under ROOT
//! (default `corpus`), so each target starts from valid inputs:
//!
//! - `decode_message`: one valid frame of every message kind, including batches whose
//!   extents really verify (zstd, raw and zero codecs with the right blake3), so the
//!   fuzzer starts past the crc and the hash checks; each message both as a whole frame
//!   and as `kind ++ body`, the two shapes the target reads.
//! - `seglog_recovery`: segments encoded with seglog's own encoders, in the raw shape
//!   (one to four segments, length-prefixed) and the round-trip shape.
//! - `state_file_slots`: the bytes of real state files written by `StateFile`, and
//!   built-image parameters.
//! - `agent_journal_recovery`: the segments of a real agent journal (writes, tags and
//!   zero records appended by `Journal`), and framed records of every kind.
//! - `tracefs_line`: `trace_pipe` lines as the kernel prints them.
//! - `control_request`: every control request and reply, as JSON lines.
//!
//! `cargo run --release --example seed_corpus [ROOT]`.

use std::path::{Path, PathBuf};

use boomerang_agent::journal::Journal;
use boomerang_common::delta::{Batch, ExtentEncoder};
use boomerang_common::durable::{StateFile, SLOT_LEN};
use boomerang_common::hash::ChunkHash;
use boomerang_common::message::{DiskState, Message, Role, Tag, TagKind};
use boomerang_common::seglog::format::{encode_record_header, encode_segment_header};
use boomerang_common::wire::HEADER_LEN;

fn main() -> std::io::Result<()> {
    let root = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "corpus".into()));
    let scratch = std::env::temp_dir().join(format!("boomerang-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let result = (|| {
        decode_message(&root.join("decode_message"))?;
        seglog_recovery(&root.join("seglog_recovery"))?;
        state_file_slots(&root.join("state_file_slots"), &scratch)?;
        agent_journal_recovery(&root.join("agent_journal_recovery"), &scratch)?;
        tracefs_line(&root.join("tracefs_line"))?;
        control_request(&root.join("control_request"))
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// Writes `seeds` as `dir/seed-NN-<name>`.
fn write_seeds(dir: &Path, seeds: &[(String, Vec<u8>)]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (i, (name, bytes)) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:02}-{name}")), bytes)?;
    }
    println!("wrote {} seeds to {}", seeds.len(), dir.display());
    Ok(())
}

fn other<E: std::fmt::Display>(e: E) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

fn decode_message(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;

    let mut enc = ExtentEncoder::new(1)?;
    let text = b"boomerang block ".repeat(64); // 1 KiB, compresses
    let noise: Vec<u8> = (0u32..512)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let zeros = vec![0u8; 4096];
    let extents = vec![
        enc.encode(0, &text, ChunkHash::of(&text)),
        enc.encode(4096, &noise, ChunkHash::of(&noise)),
        enc.encode(8192, &zeros, ChunkHash::of(&zeros)),
    ];
    let batch = |extents| Batch {
        disk: "vm1-disk0".into(),
        generation: 3,
        seq: 7,
        extents,
    };

    let messages = [
        Message::Hello {
            role: Role::Agent,
            name: "host-a".into(),
            software: "0.1.0".into(),
        },
        Message::OpenDisk {
            disk: "vm1-disk0".into(),
            size: 1 << 30,
            group: "g1".into(),
        },
        Message::DiskState(DiskState {
            disk: "vm1-disk0".into(),
            size: 1 << 30,
            generation: 3,
            next_seq: 8,
            resend: vec![5, 6],
        }),
        Message::Batch(batch(Vec::new())),
        Message::Batch(batch(extents.clone())),
        Message::Batch(batch(extents[..1].to_vec())),
        Message::Tag(Tag {
            disk: "vm1-disk0".into(),
            generation: 3,
            seq: 8,
            kind: TagKind::AppConsistent,
            point_id: 11,
            time_ms: 1_700_000_000_000,
            group: "g1".into(),
        }),
        Message::DurableAck {
            disk: "vm1-disk0".into(),
            generation: 3,
            seq: 8,
        },
        Message::ManifestRequest {
            disk: "vm1-disk0".into(),
            generation: 3,
            offset: 0,
            len: 1 << 20,
            chunk_size: 65536,
        },
        Message::ManifestResponse {
            disk: "vm1-disk0".into(),
            offset: 0,
            chunk_size: 65536,
            hashes: vec![ChunkHash::of(b"a"), ChunkHash::of_zeros(65536)],
        },
        Message::Error {
            code: 2,
            reason: "extent at offset 0: blake3 mismatch".into(),
        },
    ];

    for (i, msg) in messages.iter().enumerate() {
        let frame = msg.encode();
        std::fs::write(
            dir.join(format!("seed-{i:02}-{}-frame", msg.name())),
            &frame,
        )?;
        let kind = u8::try_from(msg.kind()).expect("message kinds fit a byte");
        let mut body = vec![kind];
        body.extend_from_slice(&frame[HEADER_LEN..]);
        std::fs::write(dir.join(format!("seed-{i:02}-{}-body", msg.name())), &body)?;
    }
    println!("wrote {} seeds to {}", messages.len() * 2, dir.display());
    Ok(())
}

/// A segment of log `kind` from `first_lsn` holding `records` (kind, payload).
fn segment(kind: [u8; 4], first_lsn: u64, records: &[(u8, &[u8])]) -> Vec<u8> {
    let mut out = encode_segment_header(kind, first_lsn).to_vec();
    for (i, (k, payload)) in records.iter().enumerate() {
        out.extend_from_slice(&encode_record_header(*k, first_lsn + i as u64, &[payload]));
        out.extend_from_slice(payload);
    }
    out
}

/// The raw shape of the segment targets: `segments` with u16 length prefixes (none
/// before the last). The caller writes the control bytes before.
fn length_prefixed(segments: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, s) in segments.iter().enumerate() {
        if i + 1 < segments.len() {
            out.extend_from_slice(&u16::try_from(s.len()).expect("small").to_le_bytes());
        }
        out.extend_from_slice(s);
    }
    out
}

fn seglog_recovery(dir: &Path) -> std::io::Result<()> {
    let hello = b"hello, segment".as_slice();
    let big = vec![7u8; 300];
    let a = segment(*b"TEST", 1, &[(1, hello), (2, b""), (3, &big)]);
    let b = segment(*b"TEST", 4, &[(1, b"four"), (1, b"five")]);
    let c = segment(*b"TEST", 6, &[]);
    let gap = segment(*b"TEST", 9, &[(5, b"after a gap")]);
    let mut seeds = Vec::new();
    // Raw: ctl (mode 0, segments - 1 in bits 1-2, fix-ups in bits 3-4), small cap,
    // refused kind, floor.
    for (name, ctl, segs, floor) in [
        ("one", 0u8, vec![a.clone()], 1u64),
        ("three", 2 << 1, vec![a.clone(), b.clone(), c.clone()], 1),
        ("gap", 1 << 1, vec![b.clone(), gap], 4),
        ("fixup", (1 << 1) | 8 | 16, vec![a.clone(), b.clone()], 0),
        (
            "torn",
            1 << 1,
            vec![a.clone(), b[..b.len() - 3].to_vec()],
            1,
        ),
    ] {
        let mut v = vec![ctl, 16, 2];
        v.extend_from_slice(&floor.to_le_bytes());
        v.extend_from_slice(&length_prefixed(&segs));
        seeds.push((format!("raw-{name}"), v));
    }
    // Round trip: ctl (mode 1, segments - 1), cut segment, cut u16, flip segment, flip
    // offset u16, flip xor, first lsn u64, then records (d: bit 7 new segment, low
    // nibble length multiplier; u8 length; payload; kind).
    for (name, ctl, first_lsn, records) in [
        (
            "small",
            1u8,
            1u64,
            vec![(0x01u8, 5u8, b"hello".to_vec(), 1u8), (0x00, 0, vec![], 2)],
        ),
        (
            "segments",
            1 | (3 << 1),
            1000,
            vec![
                (0x02, 8, vec![0xab; 16], 1),
                (0x81, 3, b"abc".to_vec(), 2),
                (0x81, 4, b"defg".to_vec(), 3),
                (0x80, 0, vec![], 4),
            ],
        ),
    ] {
        let mut v = vec![ctl, 1, 40, 0, 0, 36, 0, 0x10];
        v.extend_from_slice(&first_lsn.to_le_bytes());
        for (d, len, payload, kind) in records {
            v.extend_from_slice(&[d, len]);
            v.extend_from_slice(&payload);
            v.push(kind);
        }
        seeds.push((format!("round-trip-{name}"), v));
    }
    write_seeds(dir, &seeds)
}

#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct State {
    seq: u64,
    name: String,
}

fn state_file_slots(dir: &Path, scratch: &Path) -> std::io::Result<()> {
    let path = scratch.join("state");
    let mut st = StateFile::open_or_create(
        &path,
        State {
            seq: 0,
            name: "vm1-disk0".into(),
        },
    )
    .map_err(other)?;
    let mut seeds = Vec::new();
    for seq in 1..=3 {
        st.store(State {
            seq,
            name: "vm1-disk0".into(),
        })
        .map_err(other)?;
        // Raw shape: ctl 0, then slot 0 in the first `b * 16` bytes (b is the first
        // byte, 'B' of the magic: 1056 bytes), then slot 1.
        let image = std::fs::read(&path)?;
        let used = |slot: &[u8]| slot.len() - slot.iter().rev().take_while(|&&b| b == 0).count();
        let (s0, s1) = image.split_at(SLOT_LEN);
        let mut v = vec![0u8];
        v.extend_from_slice(&s0[..usize::from(b'B') * 16]);
        v.extend_from_slice(&s1[..used(s1)]);
        assert_eq!(
            used(s0) <= usize::from(b'B') * 16,
            true,
            "slot 0 fits the seed"
        );
        seeds.push((format!("image-{seq}"), v));
    }
    // Built shape: ctl (bit 0 set; slots present in bits 1-2; damaged slot bit 3;
    // damage kind bits 4-5), counters, two states (seq, name length, name), position,
    // xor.
    for ctl in [0x03u8, 0x07, 0x05, 0x0f, 0x27, 0x2f, 0x37, 0x3f] {
        let mut v = vec![ctl];
        v.extend_from_slice(&5u64.to_le_bytes());
        v.extend_from_slice(&6u64.to_le_bytes());
        for (seq, name) in [(5u64, "vm1-disk0"), (6, "vm1-disk0")] {
            v.extend_from_slice(&seq.to_le_bytes());
            v.push(u8::try_from(name.len()).expect("short"));
            v.extend_from_slice(name.as_bytes());
        }
        v.extend_from_slice(&30u16.to_le_bytes());
        v.push(0x20);
        seeds.push((format!("built-{ctl:02x}"), v));
    }
    write_seeds(dir, &seeds)
}

fn agent_journal_recovery(dir: &Path, scratch: &Path) -> std::io::Result<()> {
    let state = scratch.join("agent");
    let mut journal = Journal::open(&state, 1 << 20).map_err(other)?;
    journal
        .append_write("vm1-disk0", 4096, b"block data")
        .map_err(other)?;
    journal
        .append_tag("vm1-disk0", TagKind::CrashConsistent, 7, 1_700_000_000_000)
        .map_err(other)?;
    journal
        .append_zero("vm1-disk0", 1 << 20, 65536)
        .map_err(other)?;
    journal.append_write("d", 0, &[]).map_err(other)?;
    journal
        .append_tag("d", TagKind::AppConsistent, 8, 1_700_000_000_001)
        .map_err(other)?;
    journal.sync().map_err(other)?;
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(journal.dir())? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "jnl") {
            segments.push(std::fs::read(&path)?);
        }
    }
    drop(journal);
    let mut seeds = Vec::new();
    // Raw shape: ctl 0 (one segment), floor u64, the segment.
    for (name, floor) in [("journal", 1u64), ("released", 3)] {
        let mut v = vec![0u8];
        v.extend_from_slice(&floor.to_le_bytes());
        v.extend_from_slice(&length_prefixed(&segments));
        seeds.push((format!("raw-{name}"), v));
    }
    // The same records split over two segments.
    let seg = segments.first().cloned().unwrap_or_default();
    let split = 32 + 24 + (1 + 9 + 8 + 10);
    let second = {
        let mut s = encode_segment_header(*b"AJNL", 2).to_vec();
        s.extend_from_slice(&seg[split..]);
        s
    };
    let mut v = vec![1 << 1];
    v.extend_from_slice(&1u64.to_le_bytes());
    v.extend_from_slice(&length_prefixed(&[seg[..split].to_vec(), second]));
    seeds.push(("raw-two-segments".into(), v));
    // Framed shape: ctl 1 | segments, floor, first lsn, then (kind, u8 len, payload).
    let mut v = vec![1 | (2 << 1)];
    v.extend_from_slice(&1u64.to_le_bytes());
    v.extend_from_slice(&1u64.to_le_bytes());
    let mut write = vec![3];
    write.extend_from_slice(b"vda");
    write.extend_from_slice(&512u64.to_le_bytes());
    write.extend_from_slice(b"data");
    let mut tag = vec![3];
    tag.extend_from_slice(b"vda");
    tag.push(1);
    tag.extend_from_slice(&9u64.to_le_bytes());
    tag.extend_from_slice(&10u64.to_le_bytes());
    let mut zero = vec![3];
    zero.extend_from_slice(b"vda");
    zero.extend_from_slice(&0u64.to_le_bytes());
    zero.extend_from_slice(&4096u64.to_le_bytes());
    for (kind, payload) in [(1u8, &write), (0x82, &tag), (0x83, &zero), (1, &write)] {
        v.push(kind);
        v.push(u8::try_from(payload.len()).expect("short"));
        v.extend_from_slice(payload);
    }
    seeds.push(("framed".into(), v));
    write_seeds(dir, &seeds)
}

fn tracefs_line(dir: &Path) -> std::io::Result<()> {
    let lines: [&[u8]; 9] = [
        b"              dd-12150   [001] .....  3684.555370: block_bio_queue: 7,0 WS 24 + 8 [dd]",
        b"      blkdiscard-12153   [001] .N...        17: block_bio_queue: 259,3 DS 2048 + 128 [blkdiscard]",
        b"  kworker/u8:2-77   [000] .....       5: block_bio_queue: 8,16 FWFSM 36028797018963967 + 4294967295 [kworker/u8:2]",
        b"            bash-12129   [001] ...1.  3684.567297: tracing_mark_write: boomerang-sync ab 7",
        b"CPU:0 [LOST 204 EVENTS]",
        b"a [9] b: x-77 [000] ..... 9: block_bio_queue: 8,16 W 100 + 16 [a [9] b: x]",
        b"sh-1 [000] ..... 9: tracing_mark_write: : block_bio_queue: 8,16 W 0 + 8 [x]",
        b"7,0 NS 0 + 0 [x]",
        b"8,16 ZA 4096 + 8 [x]",
    ];
    let seeds: Vec<_> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| (format!("line-{i}"), l.to_vec()))
        .collect();
    write_seeds(dir, &seeds)
}

fn control_request(dir: &Path) -> std::io::Result<()> {
    use boomerang_mt::control::{Reply, Request};
    use std::collections::BTreeMap;
    let to: BTreeMap<String, PathBuf> =
        [("vm1-disk0".to_string(), PathBuf::from("/dev/vdb"))].into();
    let group = || "g1".to_string();
    let requests = [
        Request::Failover {
            group: group(),
            point: "latest-app".into(),
            to: to.clone(),
        },
        Request::Cancel { group: group() },
        Request::TestFailover {
            group: group(),
            point: "42".into(),
            to,
        },
        Request::TestCleanup { group: group() },
        Request::Commit { group: group() },
        Request::Reprotect {
            group: group(),
            process_server: "10.0.0.2:7443".into(),
            agent_name: "host-b".into(),
        },
        Request::Protect { group: group() },
    ];
    let mut seeds = Vec::new();
    for r in &requests {
        let mut v = serde_json::to_vec(r).map_err(other)?;
        v.push(b'\n');
        seeds.push((format!("request-{}", r.group().len() + seeds.len()), v));
    }
    let replies: Vec<Reply> = vec![
        serde_json::from_str(
            r#"{"event":{"progress":{"disk":"d","phase":"copy","done":1,"total":2}}}"#,
        )
        .map_err(other)?,
        serde_json::from_str(r#"{"event":{"line":"rolled back"}}"#).map_err(other)?,
        Reply::Done(
            serde_json::json!({"group": "g1", "state": "protected", "n": [1, -2.5e10, null, true]}),
        ),
        Reply::Failed("unknown group g9".into()),
    ];
    for r in &replies {
        let mut v = serde_json::to_vec(r).map_err(other)?;
        v.push(b'\n');
        seeds.push((format!("reply-{}", seeds.len()), v));
    }
    write_seeds(dir, &seeds)
}
