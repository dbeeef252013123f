//! Parsing of the trace instance's `trace_pipe` text, one line at a time.
//!
//! The instance has one event enabled, `block/block_bio_queue`, whose print format on
//! Linux 6.18 is `"%d,%d %s %llu + %u [%s]"`: major,minor, rwbs, start sector, sectors
//! (512-byte units) and the submitting task's comm. A line looks like
//!
//! ```text
//!               dd-12150   [001] .....       2: block_bio_queue: 7,0 WS 24 + 8 [dd]
//!             bash-12129   [001] ...1.       3: tracing_mark_write: boomerang-sync 5f 1
//! CPU:0 [LOST 204 EVENTS]
//! ```
//!
//! The prefix (task comm, pid, cpu, flags, timestamp) is not used. Task comms are
//! chosen by whoever runs the task and may hold spaces, brackets or even newlines, so
//! the event is found by its name (`": block_bio_queue: "`, longer than any comm can
//! be) and only the kernel-formatted numbers after it are trusted. A line that names
//! the event but does not parse is reported as malformed: the caller treats that as
//! lost tracking, never as "nothing happened".

/// What a bio does to the disk's content, from its rwbs string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BioOp {
    /// `W`: data written.
    Write,
    /// `D` (`DE` secure erase): content discarded.
    Discard,
    /// `N`: an operation the kernel has no letter for (REQ_OP_WRITE_ZEROES on this
    /// kernel prints `N`). It may change content, so its range counts as written; the
    /// agent then reads what is really there.
    Other,
    /// `R` or a flush: content unchanged.
    NoChange,
    /// `Z?`: zoned-device operations (zone append writes where the device chooses,
    /// zone reset empties a zone). Not supported: tracking is lost.
    Zone,
}

/// Classifies an rwbs string as printed by the kernel's `blk_fill_rwbs`: an optional
/// `F` (REQ_PREFLUSH), the operation (`W`, `D`/`DE`, `R`, `F` flush, `N`, `Z?`), then
/// flag letters (`F` FUA, `A`, `S`, `M`, `U`). `None` for a string it does not know.
pub(crate) fn classify_rwbs(rwbs: &str) -> Option<BioOp> {
    let b = rwbs.as_bytes();
    let is_op = |c: u8| matches!(c, b'W' | b'D' | b'R' | b'N' | b'Z' | b'F');
    let start = usize::from(b.len() > 1 && b[0] == b'F' && is_op(b[1]));
    let op = match b.get(start)? {
        b'W' => BioOp::Write,
        b'D' => BioOp::Discard,
        b'R' | b'F' => BioOp::NoChange,
        b'N' => BioOp::Other,
        b'Z' => BioOp::Zone,
        _ => return None,
    };
    // Every further letter must be a known flag (or the E of DE, the letter after Z).
    let rest = &b[start + 1..];
    let known = |c: &u8| matches!(c, b'F' | b'A' | b'S' | b'M' | b'U' | b'E');
    let rest_ok = match op {
        BioOp::Zone => rest.first().is_some_and(u8::is_ascii_uppercase),
        _ => rest.iter().all(known),
    };
    rest_ok.then_some(op)
}

/// One parsed line of `trace_pipe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line<'a> {
    /// A `block_bio_queue` event.
    Bio {
        /// Major and minor as printed (the kernel's `dev_t` split at bit 20).
        dev: (u32, u32),
        /// The operation.
        op: BioOp,
        /// First sector (512 bytes), of the whole disk for a partition.
        sector: u64,
        /// Sectors (512 bytes).
        sectors: u32,
    },
    /// A `tracing_mark_write` event (someone wrote to the instance's trace_marker).
    Marker(&'a [u8]),
    /// `CPU:N [LOST M EVENTS]`: the ring buffer overwrote events before we read them.
    Lost(&'a [u8]),
    /// Another event, or a fragment of a line split by a newline in a task comm.
    Other,
    /// Names `block_bio_queue` but does not parse.
    Malformed(&'a [u8]),
}

const BIO_TAG: &[u8] = b": block_bio_queue: ";
const MARK_TAG: &[u8] = b": tracing_mark_write: ";

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Parses one line (without its newline).
pub fn parse_line(line: &[u8]) -> Line<'_> {
    if line.starts_with(b"CPU:") && find(line, b"[LOST ").is_some() {
        return Line::Lost(line);
    }
    let bio = find(line, BIO_TAG);
    let mark = find(line, MARK_TAG);
    match (bio, mark) {
        // Whichever event name comes first is the event; the other is payload.
        (Some(b), m) if m.is_none_or(|m| b < m) => {
            parse_bio(&line[b + BIO_TAG.len()..]).unwrap_or(Line::Malformed(line))
        }
        (_, Some(m)) => Line::Marker(&line[m + MARK_TAG.len()..]),
        _ => Line::Other,
    }
}

fn parse_bio(body: &[u8]) -> Option<Line<'static>> {
    let body = std::str::from_utf8(body.get(..body.len().min(96))?)
        .or_else(|e| std::str::from_utf8(&body[..e.valid_up_to()]))
        .ok()?;
    let mut it = body.split_ascii_whitespace();
    let (major, minor) = it.next()?.split_once(',')?;
    let dev = (major.parse().ok()?, minor.parse().ok()?);
    let op = classify_rwbs(it.next()?)?;
    let sector = it.next()?.parse().ok()?;
    if it.next()? != "+" {
        return None;
    }
    let sectors = it.next()?.parse().ok()?;
    Some(Line::Bio {
        dev,
        op,
        sector,
        sectors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rwbs_strings_of_blk_fill_rwbs() {
        for (s, op) in [
            ("W", BioOp::Write),
            ("WS", BioOp::Write),
            ("FWS", BioOp::Write),
            ("WFS", BioOp::Write),
            ("FWFSM", BioOp::Write),
            ("WSMU", BioOp::Write),
            ("D", BioOp::Discard),
            ("DS", BioOp::Discard),
            ("DE", BioOp::Discard),
            ("R", BioOp::NoChange),
            ("RA", BioOp::NoChange),
            ("RSM", BioOp::NoChange),
            ("F", BioOp::NoChange),
            ("FF", BioOp::NoChange),
            ("FS", BioOp::NoChange),
            ("N", BioOp::Other),
            ("NS", BioOp::Other),
            ("ZA", BioOp::Zone),
            ("ZRA", BioOp::Zone),
            ("FZA", BioOp::Zone),
        ] {
            assert_eq!(classify_rwbs(s), Some(op), "{s}");
        }
        for s in ["", "X", "WX", "w", "Z", "W1"] {
            assert_eq!(classify_rwbs(s), None, "{s:?}");
        }
    }

    #[test]
    fn lines_as_the_kernel_prints_them() {
        let l = b"              dd-12150   [001] .....  3684.555370: block_bio_queue: 7,0 WS 24 + 8 [dd]";
        assert_eq!(
            parse_line(l),
            Line::Bio {
                dev: (7, 0),
                op: BioOp::Write,
                sector: 24,
                sectors: 8
            }
        );
        let l = b"      blkdiscard-12153   [001] .N...        17: block_bio_queue: 259,3 DS 2048 + 128 [blkdiscard]";
        assert_eq!(
            parse_line(l),
            Line::Bio {
                dev: (259, 3),
                op: BioOp::Discard,
                sector: 2048,
                sectors: 128
            }
        );
        let l = b"            bash-12129   [001] ...1.  3684.567297: tracing_mark_write: boomerang-sync ab 7";
        assert_eq!(parse_line(l), Line::Marker(b"boomerang-sync ab 7"));
        assert!(matches!(
            parse_line(b"CPU:0 [LOST 204 EVENTS]"),
            Line::Lost(_)
        ));
        assert_eq!(parse_line(b""), Line::Other);
        assert_eq!(
            parse_line(b"  kworker/0:1-9 [000] ..... 5: sched_switch: prev=a"),
            Line::Other
        );
    }

    #[test]
    fn hostile_comms_do_not_fake_or_hide_events() {
        // A comm with spaces and brackets in the prefix and at the end.
        let l = b"a [9] b: x-77 [000] ..... 9: block_bio_queue: 8,16 W 100 + 16 [a [9] b: x]";
        assert!(matches!(
            parse_line(l),
            Line::Bio {
                sector: 100,
                sectors: 16,
                ..
            }
        ));
        // A comm with a newline cut the line: the event part still parses, the tail
        // is a fragment.
        assert!(matches!(
            parse_line(b"tail] 1: block_bio_queue: 8,16 W 100 + 16 [x"),
            Line::Bio { .. }
        ));
        assert_eq!(parse_line(b"y]"), Line::Other);
        // A marker whose text names the bio event is still a marker.
        let l = b"sh-1 [000] ..... 9: tracing_mark_write: : block_bio_queue: 8,16 W 0 + 8 [x]";
        assert!(matches!(parse_line(l), Line::Marker(_)));
        // Non-UTF-8 comm bytes after the numbers do not matter.
        let mut l = b"x-1 [000] ..... 9: block_bio_queue: 8,16 W 8 + 8 [".to_vec();
        l.extend_from_slice(&[0xff, 0xfe, b']']);
        assert!(matches!(parse_line(&l), Line::Bio { sector: 8, .. }));
    }

    #[test]
    fn broken_bio_lines_are_malformed_not_ignored() {
        for l in [
            &b"x-1 [000] ..... 9: block_bio_queue: 8,16 W 8 - 8 [x]"[..],
            b"x-1 [000] ..... 9: block_bio_queue: 8,16 Q 8 + 8 [x]",
            b"x-1 [000] ..... 9: block_bio_queue: 8.16 W 8 + 8 [x]",
            b"x-1 [000] ..... 9: block_bio_queue: 8,16 W 99999999999999999999999 + 8 [x]",
            b"x-1 [000] ..... 9: block_bio_queue: 8,16 W 8 +",
        ] {
            assert!(
                matches!(parse_line(l), Line::Malformed(_)),
                "{}",
                String::from_utf8_lossy(l)
            );
        }
    }
}
