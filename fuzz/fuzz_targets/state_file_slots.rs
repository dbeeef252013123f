//! Fuzzes the two-slot state file decoder (`boomerang_common::durable::decode_slots`,
//! the IO-free half of `StateFile::open`). It must never panic, and:
//!
//! - raw bytes (first byte's bit 0 clear): whatever it returns is a slot that decodes
//!   on its own with the other slot blanked, and the other slot is older (or, for a
//!   tie, slot 1: ties go to slot 0). Bit 1 fixes up each slot's crc32 so the JSON
//!   decoding behind it is reached; bit 2 leaves the image without a second slot.
//! - built images (bit 0 set): one or two valid slots are encoded as the module doc
//!   of `durable` draws them (magic, version, reserved, counter, len, crc32, JSON),
//!   with fuzz-chosen counters and states. Intact, the newer valid slot wins (slot 0 on
//!   a tie); with one slot damaged (a flipped byte, a torn tail, the file cut inside
//!   slot 1) the other slot still decodes, exactly as it was written.

#![no_main]

use boomerang_common::durable::{decode_slots, SlotState, SLOT_LEN};
use boomerang_fuzz::Input;
use libfuzzer_sys::fuzz_target;
use serde::{Deserialize, Serialize};

/// A state like the ones the daemons keep (a seq and a name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    seq: u64,
    name: String,
}

const HEADER: usize = 24;

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    if ctl & 1 == 0 {
        raw(ctl, rest);
    } else {
        built(ctl, rest);
    }
});

fn crc(counter: &[u8], len: &[u8], json: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(counter);
    h.update(len);
    h.update(json);
    h.finalize()
}

/// Encodes one slot as `durable`'s module doc draws it.
fn encode_slot(counter: u64, json: &[u8]) -> Vec<u8> {
    let len = u32::try_from(json.len()).expect("small").to_le_bytes();
    let counter = counter.to_le_bytes();
    let mut out = Vec::with_capacity(HEADER + json.len());
    out.extend_from_slice(b"BMST");
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&counter);
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc(&counter, &len, json).to_le_bytes());
    out.extend_from_slice(json);
    out
}

/// Rewrites a slot's crc32 for the length it announces, when that fits.
fn fix_crc(slot: &mut [u8]) {
    if slot.len() < HEADER {
        return;
    }
    let len = u32::from_le_bytes([slot[16], slot[17], slot[18], slot[19]]) as usize;
    let Some(json) = slot.get(HEADER..HEADER.saturating_add(len)) else {
        return;
    };
    let c = crc(&slot[8..16], &slot[16..20], json);
    slot[20..24].copy_from_slice(&c.to_le_bytes());
}

/// `image` with slot `slot` zeroed.
fn blank(image: &[u8], slot: u64) -> Vec<u8> {
    let mut out = image.to_vec();
    let start = if slot == 0 { 0 } else { SLOT_LEN };
    let end = (start + SLOT_LEN).min(out.len());
    if start < end {
        out[start..end].fill(0);
    }
    out
}

/// The invariants of any decode result on `image`.
fn check<T>(image: &[u8])
where
    T: serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let Some(got) = decode_slots::<T>(image) else {
        return;
    };
    assert!(got.slot < 2, "slot {}", got.slot);
    // The slot it took decodes on its own, to the same state.
    let alone = decode_slots::<T>(&blank(image, 1 - got.slot));
    assert_eq!(
        alone.as_ref(),
        Some(&got),
        "the chosen slot does not decode alone"
    );
    // The other slot, if valid, is older (or a tie lost by slot 1).
    if let Some(other) = decode_slots::<T>(&blank(image, got.slot)) {
        assert_eq!(other.slot, 1 - got.slot);
        if got.slot == 0 {
            assert!(other.counter <= got.counter, "an older slot won");
        } else {
            assert!(other.counter < got.counter, "slot 1 won a tie or was older");
        }
    }
}

fn raw(ctl: u8, rest: &[u8]) {
    let split = rest
        .first()
        .map_or(0, |&b| usize::from(b) * 16)
        .min(rest.len());
    let (first, second) = rest.split_at(split);
    let mut image = first.to_vec();
    if ctl & 4 == 0 {
        image.resize(SLOT_LEN, 0);
        image.extend_from_slice(second);
    }
    if ctl & 2 != 0 {
        let mid = image.len().min(SLOT_LEN);
        let (a, b) = image.split_at_mut(mid);
        fix_crc(a);
        fix_crc(b);
    }
    check::<State>(&image);
    check::<serde_json::Value>(&image);
}

/// A state of fuzz bytes: a seq and a name of up to 63 bytes.
fn state(input: &mut Input<'_>) -> State {
    let seq = input.u64();
    let n = usize::from(input.u8() % 64);
    State {
        seq,
        name: String::from_utf8_lossy(input.take(n)).into_owned(),
    }
}

fn built(ctl: u8, rest: &[u8]) {
    let mut input = Input(rest);
    let present = [ctl & 2 != 0 || ctl & 4 == 0, ctl & 4 != 0];
    let damaged = usize::from(ctl & 8 != 0);
    let how = (ctl >> 4) % 4;
    let counters = [input.u64(), input.u64()];
    let states = [state(&mut input), state(&mut input)];
    let pos = usize::from(input.u16());
    let flip = input.u8() | 1;

    let mut image = vec![0u8; 2 * SLOT_LEN];
    let mut lens = [0usize; 2];
    for i in 0..2 {
        if present[i] {
            let json = serde_json::to_vec(&states[i]).expect("a state encodes");
            let slot = encode_slot(counters[i], &json);
            image[i * SLOT_LEN..][..slot.len()].copy_from_slice(&slot);
            lens[i] = slot.len();
        }
    }
    let expect = |i: usize| SlotState {
        value: states[i].clone(),
        slot: i as u64,
        counter: counters[i],
    };

    // Intact: the newer valid slot, slot 0 on a tie.
    let want = match present {
        [true, true] if counters[1] > counters[0] => Some(expect(1)),
        [true, _] => Some(expect(0)),
        [false, true] => Some(expect(1)),
        [false, false] => None,
    };
    assert_eq!(decode_slots::<State>(&image), want, "intact image");
    check::<State>(&image);
    // Cut right after slot 1 (or inside slot 0's padding when there is no slot 1).
    let end = if present[1] {
        SLOT_LEN + lens[1]
    } else {
        lens[0]
    };
    assert_eq!(
        decode_slots::<State>(&image[..end]),
        want,
        "image cut after the last state"
    );

    // One slot damaged: the other one (if any) is what decodes.
    let d = damaged;
    if !present[d] {
        return;
    }
    let base = d * SLOT_LEN;
    let at = pos % lens[d];
    let image = match how {
        // A flipped byte anywhere the slot's checks cover (all but the reserved u16).
        0 | 1 => {
            let at = if (6..8).contains(&at) { 5 } else { at };
            let mut image = image;
            image[base + at] ^= flip;
            image
        }
        // A torn write: the tail of the slot from `at` never made it.
        2 => {
            let mut image = image;
            image[base + at..base + lens[d]].fill(0);
            image
        }
        // The file cut inside slot 1 (for slot 0, the same as a torn tail).
        _ => {
            if d == 1 {
                image[..base + at].to_vec()
            } else {
                let mut image = image;
                image[at..lens[0]].fill(0);
                image
            }
        }
    };
    let other = 1 - d;
    let want = present[other].then(|| expect(other));
    assert_eq!(
        decode_slots::<State>(&image),
        want,
        "slot {d} damaged ({how}, at {at}): the other slot must decode"
    );
    check::<State>(&image);
}
