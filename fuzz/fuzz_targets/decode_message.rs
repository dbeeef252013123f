//! Fuzzes the frame and message decoders (`boomerang_common::message`): whatever the
//! bytes, `Message::decode` must return `Ok`, `Incomplete` or `Invalid`, never panic
//! and never allocate past the caps; whatever decodes must re-encode to the very same
//! bytes and decode back to the same message; and every extent of a decoded batch must
//! go through `Extent::decode_verified` without a panic.
//!
//! Each input is tried twice:
//! 1. as it comes, like bytes read off a stream (exercises header, length cap, crc);
//! 2. as `kind (1 byte) ++ body`, wrapped in a well-formed frame with the right crc,
//!    so the fuzzer reaches the body decoders instead of stalling on the checksum.

#![no_main]

use boomerang_common::hash::ChunkHash;
use boomerang_common::message::Message;
use boomerang_common::wire::{DecodeError, FrameBuilder};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    check(&Bytes::copy_from_slice(data));

    if let Some((&kind, body)) = data.split_first() {
        let mut frame = FrameBuilder::new(u16::from(kind), body.len());
        frame.body().raw(body);
        check(&frame.finish());
    }
});

fn check(buf: &Bytes) {
    let exact = Message::decode_exact(buf);
    let (msg, used) = match Message::decode(buf) {
        Ok(decoded) => decoded,
        Err(DecodeError::Incomplete { needed }) => {
            assert!(needed > 0, "Incomplete asks for 0 more bytes");
            assert!(
                exact.is_err(),
                "decode_exact accepted what decode calls incomplete"
            );
            return;
        }
        Err(DecodeError::Invalid(_)) => {
            assert!(
                exact.is_err(),
                "decode_exact accepted what decode calls invalid"
            );
            return;
        }
    };
    assert!(
        used > 0 && used <= buf.len(),
        "decode used {used} of {} bytes",
        buf.len()
    );
    assert_eq!(
        exact.is_ok(),
        used == buf.len(),
        "decode_exact disagrees with decode about trailing bytes"
    );

    // Round trip: the encoding is canonical, so the frame re-encodes byte for byte, and
    // the re-encoded frame decodes to the same message.
    let again = msg.encode();
    assert_eq!(
        &again[..],
        &buf[..used],
        "re-encoding {} gives other bytes",
        msg.name()
    );
    assert_eq!(
        Message::decode_exact(&again).as_ref(),
        Ok(&msg),
        "re-encoded {} does not decode to itself",
        msg.name()
    );

    // Payload verification must reject bad extents with an error, never a panic.
    if let Message::Batch(batch) = &msg {
        let mut scratch = Vec::new();
        for extent in &batch.extents {
            let result =
                extent.decode_verified(&mut scratch, |len| ChunkHash::of_zeros(len as usize));
            if let Ok(Some(raw)) = result {
                assert_eq!(
                    raw.len(),
                    extent.len as usize,
                    "verified extent has the wrong length"
                );
            }
        }
    }
}
