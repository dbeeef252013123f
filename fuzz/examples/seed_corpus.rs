//! Writes a seed corpus for the `decode_message` target: one valid frame of every
//! message kind, including batches whose extents really verify (zstd, raw and zero
//! codecs with the right blake3), so the fuzzer starts past the crc and the hash
//! checks. Each message is written both as a whole frame and as `kind ++ body`, the
//! two shapes the target reads.
//!
//! `cargo run --example seed_corpus [DIR]` (default `corpus/decode_message`).

use std::path::PathBuf;

use boomerang_common::delta::{Batch, ExtentEncoder};
use boomerang_common::hash::ChunkHash;
use boomerang_common::message::{DiskState, Message, Role, Tag, TagKind};
use boomerang_common::wire::HEADER_LEN;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "corpus/decode_message".into()),
    );
    std::fs::create_dir_all(&dir)?;

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
