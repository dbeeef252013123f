//! Recovery of the journal at open: replay the segments in order, keep the longest
//! intact and gap-free run of records, cut at the first damage (see the
//! [parent module's doc](super#recovery)).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use tracing::info;

use super::format::{self, Bad, RecordHeader, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
use super::{io_err, parse_segment_name, JournalError, Segment, RECORD_HEADER, SEGMENT_HEADER};

/// What [`Journal::open`](super::Journal::open) found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Seq of the first record still held, to ship again from (the next seq to append
    /// when nothing is held).
    pub first_held: u64,
    /// Records held (not released).
    pub held_records: u64,
    /// Segments kept.
    pub segments: usize,
    /// Fully released segments deleted at open.
    pub released_segments_deleted: usize,
    /// The damaged tail cut off, if any.
    pub cut: Option<Cut>,
}

/// A torn or corrupt part of the journal dropped by recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    /// The segment where the damage is.
    pub segment: PathBuf,
    /// Byte offset of the damage in it.
    pub offset: u64,
    /// Seq the first dropped record would have had.
    pub seq: u64,
    /// What was wrong.
    pub reason: String,
    /// Bytes dropped, in that segment and after it.
    pub bytes_dropped: u64,
    /// Later segments deleted.
    pub segments_dropped: usize,
}

/// Segment files in `dir`, in seq order. Other files are left alone.
pub(super) fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        let name = entry.file_name();
        if let Some(first_seq) = name.to_str().and_then(parse_segment_name) {
            found.push((first_seq, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// A segment as far as it is intact.
struct Scanned {
    segment: Segment,
    /// Offset and reason of the first damage.
    damage: Option<(u64, String)>,
}

/// Replays the segments in order, cutting at the first damage (see the module doc).
pub(super) fn replay(
    found: Vec<(u64, PathBuf)>,
    released_through: u64,
) -> Result<(VecDeque<Segment>, Option<Cut>), JournalError> {
    let mut segments: VecDeque<Segment> = VecDeque::new();
    let mut cut: Option<Cut> = None;
    for (first_seq, path) in found {
        let file_len = std::fs::metadata(&path)
            .map_err(io_err("stat segment", &path))?
            .len();
        if file_len == 0 && cut.is_none() {
            // Created, and a crash came before its header was written: it never held
            // anything. (A segment that did is caught below by the next one's seq.)
            std::fs::remove_file(&path).map_err(io_err("delete empty segment", &path))?;
            info!(segment = %path.display(), "journal: deleted an empty segment");
            continue;
        }
        if let Some(cut) = &mut cut {
            std::fs::remove_file(&path).map_err(io_err("delete segment after a cut", &path))?;
            cut.segments_dropped += 1;
            cut.bytes_dropped += file_len;
            continue;
        }
        // Records may be missing only where they are released; segments never overlap.
        let prev_end = segments.back().map(Segment::end_seq);
        let floor = prev_end.unwrap_or(0).max(released_through + 1);
        if first_seq > floor || prev_end.is_some_and(|end| first_seq < end) {
            let expected = prev_end.unwrap_or(released_through + 1);
            std::fs::remove_file(&path).map_err(io_err("delete misplaced segment", &path))?;
            cut = Some(Cut {
                segment: path,
                offset: 0,
                seq: expected,
                reason: format!(
                    "segment starts at seq {first_seq} where seq {expected} was expected \
                     (a segment is missing or out of place)"
                ),
                bytes_dropped: file_len,
                segments_dropped: 0,
            });
            continue;
        }
        let scanned = scan_segment(&path, first_seq, file_len)?;
        let Some((offset, reason)) = scanned.damage else {
            segments.push_back(scanned.segment);
            continue;
        };
        let seg = scanned.segment;
        if offset < SEGMENT_HEADER {
            std::fs::remove_file(&path).map_err(io_err("delete damaged segment", &path))?;
        } else {
            let file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io_err("open damaged segment", &path))?;
            file.set_len(offset)
                .and_then(|()| file.sync_data())
                .map_err(io_err("truncate damaged segment", &path))?;
        }
        cut = Some(Cut {
            segment: path,
            offset,
            seq: seg.end_seq(),
            reason,
            bytes_dropped: file_len - offset,
            segments_dropped: 0,
        });
        if offset >= SEGMENT_HEADER {
            segments.push_back(seg);
        }
    }
    Ok((segments, cut))
}

/// Reads a segment record by record, checking each, until the end or the first damage.
fn scan_segment(path: &Path, first_seq: u64, file_len: u64) -> Result<Scanned, JournalError> {
    let file = File::open(path).map_err(io_err("open segment", path))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut segment = Segment {
        first_seq,
        path: path.to_path_buf(),
        len: 0,
        offsets: Vec::new(),
    };
    let damaged = |segment: Segment, reason: String| {
        let at = segment.len;
        Ok(Scanned {
            segment,
            damage: Some((at, reason)),
        })
    };
    if file_len < SEGMENT_HEADER {
        return damaged(segment, format!("segment header torn ({file_len} bytes)"));
    }
    let mut head = [0u8; SEGMENT_HEADER_LEN];
    reader
        .read_exact(&mut head)
        .map_err(io_err("read segment", path))?;
    match format::decode_segment_header(&head) {
        Ok(seq) if seq == first_seq => {}
        Ok(seq) => {
            return damaged(
                segment,
                format!("header says first seq {seq}, the file name {first_seq}"),
            )
        }
        Err(Bad::Damaged(reason)) => return damaged(segment, reason),
        Err(Bad::Unsupported(reason)) => {
            return Err(JournalError::Unsupported {
                path: path.to_path_buf(),
                reason,
            })
        }
    }
    segment.len = SEGMENT_HEADER;
    let mut payload = Vec::new();
    while segment.len < file_len {
        let left = file_len - segment.len;
        if left < RECORD_HEADER {
            return damaged(segment, format!("record header torn ({left} bytes)"));
        }
        let mut head = [0u8; RECORD_HEADER_LEN];
        reader
            .read_exact(&mut head)
            .map_err(io_err("read segment", path))?;
        let header = match RecordHeader::parse(&head) {
            Ok(h) => h,
            Err(Bad::Damaged(reason) | Bad::Unsupported(reason)) => {
                return damaged(segment, reason)
            }
        };
        let body_left = left - RECORD_HEADER;
        if (header.payload_len as u64) > body_left {
            return damaged(
                segment,
                format!(
                    "record torn: {} payload bytes announced, {body_left} present",
                    header.payload_len
                ),
            );
        }
        // Capped by RecordHeader::parse and by the file's length.
        payload.resize(header.payload_len, 0);
        reader
            .read_exact(&mut payload)
            .map_err(io_err("read segment", path))?;
        match header.verify(&head, &payload) {
            Ok(()) => {}
            Err(Bad::Damaged(reason)) => return damaged(segment, reason),
            Err(Bad::Unsupported(reason)) => {
                return Err(JournalError::Unsupported {
                    path: path.to_path_buf(),
                    reason,
                })
            }
        }
        let expected = segment.end_seq();
        if header.seq != expected {
            return damaged(
                segment,
                format!("record has seq {}, seq {expected} expected", header.seq),
            );
        }
        if let Err(Bad::Damaged(reason) | Bad::Unsupported(reason)) =
            format::parse_entry(header.kind, &payload)
        {
            return damaged(segment, reason);
        }
        segment.offsets.push(segment.len);
        segment.len += RECORD_HEADER + header.payload_len as u64;
    }
    Ok(Scanned {
        segment,
        damage: None,
    })
}
