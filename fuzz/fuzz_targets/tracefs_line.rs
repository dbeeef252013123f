//! Fuzzes the trace source's `trace_pipe` line parser
//! (`boomerang_agent::trace::parse_line`) and the sector arithmetic that turns a
//! parsed `block_bio_queue` event into a byte range (`DeviceTarget::byte_range`). Each
//! input is parsed as a whole line and again behind a kernel-style prefix ending in
//! `": block_bio_queue: "`, so the number parsing is reached at once. It must never
//! panic, and:
//!
//! - `Lost` only for a line starting `CPU:`; `Malformed` carries the whole line and
//!   only for a line naming the event; `Marker` is the text after
//!   `": tracing_mark_write: "`;
//! - a `Bio` event printed back the way the kernel prints it parses to the same event;
//! - its byte range, for a whole disk and for several partitions, is whole sectors
//!   (`len == sectors * 512`, the offset a multiple of 512), relative to the
//!   partition's start and inside it, and its end fits a `u64` (it did not: see
//!   README.md, fixed in `tracefs.rs` with a unit test).

#![no_main]

use boomerang_agent::trace::{parse_line, BioOp, DeviceTarget, Line};
use libfuzzer_sys::fuzz_target;

const BIO_TAG: &[u8] = b": block_bio_queue: ";
const MARK_TAG: &[u8] = b": tracing_mark_write: ";
const PREFIX: &[u8] = b"              dd-12150   [001] .....       2: block_bio_queue: ";

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut line = PREFIX.to_vec();
    line.extend_from_slice(data);
    check(&line);
});

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn rwbs(op: BioOp) -> &'static str {
    match op {
        BioOp::Write => "WS",
        BioOp::Discard => "D",
        BioOp::Other => "N",
        BioOp::NoChange => "R",
        BioOp::Zone => "ZA",
    }
}

fn check(line: &[u8]) {
    match parse_line(line) {
        Line::Lost(text) => {
            assert!(
                line.starts_with(b"CPU:"),
                "Lost for a line not from the kernel"
            );
            assert_eq!(text, line);
        }
        Line::Malformed(text) => {
            assert_eq!(text, line);
            assert!(
                contains(line, BIO_TAG),
                "Malformed for a line without the event"
            );
        }
        Line::Marker(text) => {
            assert!(line.ends_with(text));
            assert!(line[..line.len() - text.len()].ends_with(MARK_TAG));
        }
        Line::Other => {}
        Line::Bio {
            dev,
            op,
            sector,
            sectors,
        } => {
            assert!(contains(line, BIO_TAG), "Bio for a line without the event");
            let again = format!(
                "x-1 [000] ..... 9: block_bio_queue: {},{} {} {sector} + {sectors} [x]",
                dev.0,
                dev.1,
                rwbs(op)
            );
            assert_eq!(
                parse_line(again.as_bytes()),
                Line::Bio {
                    dev,
                    op,
                    sector,
                    sectors
                },
                "{again}"
            );
            ranges(dev, sector, sectors);
        }
    }
}

fn ranges(dev: (u32, u32), sector: u64, sectors: u32) {
    let partitions = [
        None,
        Some((0, u64::MAX)),
        Some((2048, 1000)),
        Some((sector, 1)),
        Some((sector.saturating_sub(7), 8)),
        Some((u64::MAX / 512 - 1, 2)),
        Some((u64::MAX - 1, 1)),
    ];
    for partition in partitions {
        let target = DeviceTarget {
            major: dev.0,
            minor: dev.1,
            event_dev: dev,
            partition,
        };
        let Some((offset, len)) = target.byte_range(sector, sectors) else {
            if partition.is_none() {
                assert!(
                    sector
                        .checked_mul(512)
                        .and_then(|o| o.checked_add(u64::from(sectors) * 512))
                        .is_none(),
                    "a range inside u64 refused"
                );
            }
            continue;
        };
        assert_eq!(len, u64::from(sectors) * 512, "not whole sectors");
        assert_eq!(offset % 512, 0, "offset not at a sector");
        assert!(offset.checked_add(len).is_some(), "range end past u64::MAX");
        let rel = match partition {
            None => sector,
            Some((start, size)) => {
                assert!(
                    sector >= start && sector - start < size,
                    "outside the partition"
                );
                sector - start
            }
        };
        assert_eq!(offset, rel * 512);
    }
}
