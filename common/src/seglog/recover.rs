//! Recovery of a log at open, in two steps with no file-system changes in either:
//! [`scan_segment`] reads one segment through [`ReadAt`] and says how far it is intact;
//! [`plan`] decides from every segment's scan what is kept, what is a torn tail to cut,
//! what was a segment torn at creation, and what is corruption to report. The log then
//! carries the plan out (see the parent module). Both run on in-memory bytes in tests
//! and under the fuzzer.

use std::io::{self, BufRead, Read};

use super::format::{
    decode_segment_header, Bad, RecordHeader, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN,
};

/// Something a segment can be read from: a file, or bytes in memory.
pub trait ReadAt {
    /// Reads up to `buf.len()` bytes at `offset`; fewer only at the end.
    fn read_at_most(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Bytes in all.
    fn size(&self) -> io::Result<u64>;
}

impl ReadAt for [u8] {
    fn read_at_most(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.len());
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

impl ReadAt for crate::storage::File {
    fn read_at_most(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        crate::storage::File::read_at_most(self, buf, offset)
    }
    fn size(&self) -> io::Result<u64> {
        self.len()
    }
}

/// One intact record met by a scan.
#[derive(Debug)]
pub struct Seen<'a> {
    /// Its lsn.
    pub lsn: u64,
    /// The owning log's record type.
    pub kind: u8,
    /// Byte offset in the segment.
    pub offset: u64,
    /// Total bytes (header and payload).
    pub len: u64,
    /// The payload, when the scan read payloads.
    pub payload: Option<&'a [u8]>,
}

/// How far one segment is intact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentScan {
    /// First lsn from the segment's name.
    pub name_lsn: u64,
    /// The file's length.
    pub file_len: u64,
    /// First lsn from its header, when the header is intact.
    pub header_lsn: Option<u64>,
    /// Bytes intact from the start (the header and every whole, valid record).
    pub valid_len: u64,
    /// Records intact.
    pub records: u64,
    /// Offset and reason of the first damage, when the scan stopped early.
    pub damage: Option<(u64, String)>,
    /// Set when something intact is of another format version: refuse the log.
    pub unsupported: Option<String>,
}

impl SegmentScan {
    /// Lsn after the last intact record.
    pub fn end_lsn(&self) -> u64 {
        self.header_lsn.unwrap_or(self.name_lsn) + self.records
    }
}

/// What a scan checks.
#[derive(Debug, Clone, Copy)]
pub struct ScanRules {
    /// The log's kind, as in the segment header.
    pub kind: [u8; 4],
    /// Largest payload accepted.
    pub max_payload: usize,
    /// Read and checksum every payload (otherwise headers only: magic, lsn, length).
    pub payloads: bool,
}

struct Cursor<'a, R: ReadAt + ?Sized> {
    src: &'a R,
    pos: u64,
}

impl<R: ReadAt + ?Sized> Read for Cursor<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.src.read_at_most(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Scans one segment named for `name_lsn`, calling `visit` for every intact record
/// in order; a visitor's `Err(reason)` counts as damage at that record (a payload the
/// owning log cannot decode). Only IO errors of the source are errors.
pub fn scan_segment<R: ReadAt + ?Sized>(
    src: &R,
    name_lsn: u64,
    rules: ScanRules,
    mut visit: impl FnMut(Seen<'_>) -> Result<(), String>,
) -> io::Result<SegmentScan> {
    let file_len = src.size()?;
    let mut scan = SegmentScan {
        name_lsn,
        file_len,
        header_lsn: None,
        valid_len: 0,
        records: 0,
        damage: None,
        unsupported: None,
    };
    let mut head = [0u8; SEGMENT_HEADER_LEN];
    let n = src.read_at_most(&mut head, 0)?;
    match decode_segment_header(&head[..n], rules.kind) {
        Ok(lsn) if lsn == name_lsn => scan.header_lsn = Some(lsn),
        Ok(lsn) => {
            scan.damage = Some((
                0,
                format!("the header says first lsn {lsn}, the file name {name_lsn}"),
            ));
            return Ok(scan);
        }
        Err(Bad::Damaged(reason)) => {
            scan.damage = Some((0, reason));
            return Ok(scan);
        }
        Err(Bad::Unsupported(reason)) => {
            scan.unsupported = Some(reason);
            return Ok(scan);
        }
    }
    scan.valid_len = SEGMENT_HEADER_LEN as u64;
    // Up to 1 MiB at a time, no more than the segment holds.
    let buffer = usize::try_from(file_len)
        .unwrap_or(usize::MAX)
        .clamp(4096, 1 << 20);
    let mut reader = io::BufReader::with_capacity(
        buffer,
        Cursor {
            src,
            pos: SEGMENT_HEADER_LEN as u64,
        },
    );
    let mut payload = Vec::new();
    while scan.valid_len < file_len {
        let at = scan.valid_len;
        let left = file_len - at;
        let expected = scan.end_lsn();
        let step = next_record(&mut reader, left, expected, rules, &mut payload)?;
        let header = match step {
            Step::Record(header) => header,
            Step::Damaged(reason) => {
                scan.damage = Some((at, reason));
                break;
            }
            Step::Unsupported(reason) => {
                scan.unsupported = Some(reason);
                break;
            }
        };
        if header.lsn == u64::MAX {
            // Its successor's lsn would not fit: no log gets here honestly, and
            // `end_lsn` must stay a u64.
            scan.damage = Some((at, "record lsn u64::MAX leaves no next lsn".into()));
            break;
        }
        let seen = Seen {
            lsn: header.lsn,
            kind: header.kind,
            offset: at,
            len: header.total_len(),
            payload: rules.payloads.then_some(&payload[..]),
        };
        if let Err(reason) = visit(seen) {
            scan.damage = Some((at, reason));
            break;
        }
        scan.records += 1;
        scan.valid_len += header.total_len();
    }
    Ok(scan)
}

enum Step {
    Record(RecordHeader),
    Damaged(String),
    Unsupported(String),
}

/// Reads the record header at the reader's position (and the payload into `payload`
/// when the rules say so) and checks it; `left` bytes remain in the segment.
fn next_record(
    reader: &mut impl BufRead,
    left: u64,
    expected: u64,
    rules: ScanRules,
    payload: &mut Vec<u8>,
) -> io::Result<Step> {
    if left < RECORD_HEADER_LEN as u64 {
        return Ok(Step::Damaged(format!("record header torn ({left} bytes)")));
    }
    let mut h = [0u8; RECORD_HEADER_LEN];
    reader.read_exact(&mut h)?;
    let header = match RecordHeader::parse(&h, rules.max_payload) {
        Ok(header) => header,
        Err(Bad::Damaged(r) | Bad::Unsupported(r)) => return Ok(Step::Damaged(r)),
    };
    if header.total_len() > left {
        return Ok(Step::Damaged(format!(
            "record torn: {} payload bytes announced, {} present",
            header.payload_len,
            left - RECORD_HEADER_LEN as u64
        )));
    }
    if header.lsn != expected {
        return Ok(Step::Damaged(format!(
            "record has lsn {}, lsn {expected} expected",
            header.lsn
        )));
    }
    if !rules.payloads {
        skip(reader, header.payload_len as u64)?;
        return Ok(Step::Record(header));
    }
    // Capped by RecordHeader::parse and by the segment's length.
    payload.resize(header.payload_len, 0);
    reader.read_exact(payload)?;
    Ok(match header.verify(&h, payload) {
        Ok(()) => Step::Record(header),
        Err(Bad::Damaged(r)) => Step::Damaged(r),
        Err(Bad::Unsupported(r)) => Step::Unsupported(r),
    })
}

fn skip(reader: &mut impl BufRead, mut n: u64) -> io::Result<()> {
    while n > 0 {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let take = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
        reader.consume(take);
        n -= take as u64;
    }
    Ok(())
}

/// Whether segments may be retired out of order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retire {
    /// Only the oldest segments are retired: lsns are contiguous from the first
    /// segment to the last, and a gap is a missing segment (corruption).
    Prefix,
    /// Any closed segment may be retired: gaps between segments are retired ones.
    Any,
}

/// What recovery does with one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Kept whole.
    Keep,
    /// The last segment's torn tail: cut back to `at`.
    CutTail {
        /// Offset kept up to.
        at: u64,
        /// Why.
        reason: String,
    },
    /// The last segment, torn while it was being created (it never held a record).
    DeleteTorn {
        /// Why.
        reason: String,
    },
}

/// Recovery's verdict on a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// One action per segment, in order.
    Recover(Vec<Action>),
    /// Damage outside the active segment's tail, or a missing segment: nothing is
    /// cut, the log is refused.
    Corrupt {
        /// Index of the segment.
        segment: usize,
        /// Byte offset in it.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// Intact data of another format version.
    Unsupported {
        /// Index of the segment.
        segment: usize,
        /// What is not supported.
        reason: String,
    },
}

/// Decides recovery from the scans of every segment, in lsn order. `floor`: in
/// [`Retire::Prefix`] logs, the lowest lsn the owner still needs (the first segment
/// must start at or below it, else records are missing; a gap between segments is
/// missing records unless it lies wholly below it).
pub fn plan(scans: &[SegmentScan], retire: Retire, floor: Option<u64>) -> Plan {
    let mut actions = Vec::with_capacity(scans.len());
    let mut prev_end: Option<u64> = None;
    for (i, s) in scans.iter().enumerate() {
        let last = i + 1 == scans.len();
        let corrupt = |offset: u64, reason: String| Plan::Corrupt {
            segment: i,
            offset,
            reason,
        };
        if let Some(reason) = &s.unsupported {
            return Plan::Unsupported {
                segment: i,
                reason: reason.clone(),
            };
        }
        let Some(first) = s.header_lsn else {
            let reason = s
                .damage
                .as_ref()
                .map_or_else(|| "no header".to_string(), |(_, r)| r.clone());
            // A segment's header is made durable before any record goes into it, so
            // a bad header with nothing after it is a creation torn by a crash.
            if last && s.file_len <= SEGMENT_HEADER_LEN as u64 {
                actions.push(Action::DeleteTorn { reason });
                continue;
            }
            return corrupt(0, reason);
        };
        match (prev_end, retire) {
            (None, Retire::Prefix) => {
                if let Some(floor) = floor {
                    if first > floor {
                        return corrupt(
                            0,
                            format!(
                                "records {floor} to {} are missing (the segment holding them is gone)",
                                first - 1
                            ),
                        );
                    }
                }
            }
            // Lsns skipped below what the owner needs (`Log::skip_to`) are no loss.
            (Some(end), Retire::Prefix) if first > end && floor.is_some_and(|f| first <= f) => {}
            (Some(end), Retire::Prefix) if first != end => {
                return corrupt(
                    0,
                    format!(
                        "segment starts at lsn {first}, the one before ends at {end}: {}",
                        if first > end {
                            "a segment is missing"
                        } else {
                            "segments overlap"
                        }
                    ),
                );
            }
            (Some(end), Retire::Any) if first < end => {
                return corrupt(
                    0,
                    format!("segment starts at lsn {first} inside the one before (ends at {end})"),
                );
            }
            _ => {}
        }
        match &s.damage {
            None => actions.push(Action::Keep),
            Some((at, reason)) if last => actions.push(Action::CutTail {
                at: *at,
                reason: reason.clone(),
            }),
            Some((at, reason)) => return corrupt(*at, reason.clone()),
        }
        prev_end = Some(s.end_lsn());
    }
    Plan::Recover(actions)
}
