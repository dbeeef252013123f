//! Micro benches of the per-chunk hot paths: blake3 chunk hashing, the zero test, zstd
//! compression through [`ExtentEncoder`], decompression plus blake3 verification
//! through [`Extent::decode_verified`], and framing a 4 MiB batch.
//!
//! All data comes from a fixed-seed `SmallRng`, so every run measures the same bytes.
//! Two kinds of 64 KiB chunk: `text` (words from a small vocabulary, compresses about
//! like logs or source files) and `random` (incompressible, so the encoder falls back
//! to the raw codec after trying zstd). Throughput is in bytes of the raw chunk, except
//! for `frame/*`, where it is bytes of the encoded frame.
//!
//! Run with `cargo bench -p boomerang-benches --bench micro`.

use std::hint::black_box;
use std::time::Duration;

use boomerang_common::delta::{Batch, Codec, Extent, ExtentEncoder};
use boomerang_common::hash::{is_zero, ChunkHash};
use boomerang_common::message::Message;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

/// Chunk size of every per-chunk bench (the agent's default chunk size).
const CHUNK: usize = 64 * 1024;
/// Extents in the framing bench's batch: 64 x 64 KiB = 4 MiB.
const BATCH_EXTENTS: usize = 64;
/// zstd levels compared.
const LEVELS: [i32; 2] = [1, 3];
/// Seed of every generator here.
const SEED: u64 = 0x00b0_0e4a_46c0_ffee;

/// Text-like bytes: words of a small vocabulary with spaces, punctuation and line
/// breaks, about as compressible as logs or source files.
fn text_chunk(rng: &mut SmallRng, len: usize) -> Vec<u8> {
    const WORDS: [&str; 48] = [
        "the",
        "block",
        "disk",
        "replica",
        "journal",
        "extent",
        "batch",
        "agent",
        "process",
        "server",
        "master",
        "target",
        "write",
        "read",
        "flush",
        "fsync",
        "offset",
        "length",
        "hash",
        "blake3",
        "zstd",
        "codec",
        "generation",
        "seq",
        "tag",
        "crash",
        "consistent",
        "app",
        "recovery",
        "point",
        "failover",
        "commit",
        "reprotect",
        "spool",
        "ack",
        "durable",
        "error:",
        "warn:",
        "info:",
        "0x7f3a",
        "4096",
        "65536",
        "ok",
        "and",
        "of",
        "to",
        "in",
        "=",
    ];
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        let word = WORDS[rng.random_range(0..WORDS.len())];
        out.extend_from_slice(word.as_bytes());
        out.push(match rng.random_range(0..16u8) {
            0 => b'\n',
            1 => b',',
            _ => b' ',
        });
    }
    out.truncate(len);
    out
}

/// Incompressible bytes.
fn random_chunk(rng: &mut SmallRng, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    rng.fill_bytes(&mut out);
    out
}

/// The two kinds of chunk, named as they appear in bench ids.
fn chunks() -> [(&'static str, Vec<u8>); 2] {
    let mut rng = SmallRng::seed_from_u64(SEED);
    [
        ("text", text_chunk(&mut rng, CHUNK)),
        ("random", random_chunk(&mut rng, CHUNK)),
    ]
}

fn chunk_bytes() -> u64 {
    u64::try_from(CHUNK).expect("chunk size fits u64")
}

fn encoder(level: i32) -> ExtentEncoder {
    ExtentEncoder::new(level).expect("zstd compressor context")
}

fn bench_hash(c: &mut Criterion) {
    let [(_, text), _] = chunks();
    let mut group = c.benchmark_group("hash");
    group.throughput(Throughput::Bytes(chunk_bytes()));
    group.bench_function("chunk=64KiB", |b| {
        b.iter(|| ChunkHash::of(black_box(&text)))
    });
    group.finish();
}

fn bench_is_zero(c: &mut Criterion) {
    // All zeros is the worst case: every byte is looked at.
    let zeros = vec![0u8; CHUNK];
    let mut group = c.benchmark_group("is_zero");
    group.throughput(Throughput::Bytes(chunk_bytes()));
    group.bench_function("64KiB", |b| b.iter(|| is_zero(black_box(&zeros))));
    group.finish();
}

fn bench_compress(c: &mut Criterion) {
    let chunks = chunks();
    for level in LEVELS {
        let mut enc = encoder(level);
        let mut group = c.benchmark_group(format!("compress/level={level}"));
        group.throughput(Throughput::Bytes(chunk_bytes()));
        for (name, data) in &chunks {
            // The hash is computed by the caller in the pipeline; leave it out here.
            let hash = ChunkHash::of(data);
            group.bench_function(*name, |b| {
                b.iter(|| enc.encode(0, black_box(data), hash));
            });
        }
        group.finish();
    }
}

fn bench_decompress_verify(c: &mut Criterion) {
    let chunks = chunks();
    for level in LEVELS {
        let mut enc = encoder(level);
        let mut group = c.benchmark_group(format!("decompress+verify/level={level}"));
        group.throughput(Throughput::Bytes(chunk_bytes()));
        for (name, data) in &chunks {
            let extent = enc.encode(0, data, ChunkHash::of(data));
            let expected = if *name == "text" {
                Codec::Zstd
            } else {
                Codec::Raw
            };
            assert_eq!(
                extent.codec, expected,
                "{name} chunk took an unexpected codec"
            );
            let mut scratch = Vec::with_capacity(CHUNK);
            group.bench_function(*name, |b| {
                b.iter(|| {
                    let raw = black_box(&extent)
                        .decode_verified(&mut scratch, |len| ChunkHash::of_zeros(len as usize))
                        .expect("extent verifies");
                    raw.map(<[u8]>::len)
                });
            });
        }
        group.finish();
    }
}

/// A batch of 64 raw (incompressible) 64 KiB extents: the largest frame per raw byte,
/// so framing cost is not hidden by compression.
fn four_mib_batch() -> Batch {
    let mut rng = SmallRng::seed_from_u64(SEED ^ 0xba7c);
    let mut enc = encoder(0);
    let extents: Vec<Extent> = (0..BATCH_EXTENTS)
        .map(|i| {
            let raw = random_chunk(&mut rng, CHUNK);
            let offset = u64::try_from(i * CHUNK).expect("offset fits u64");
            enc.encode(offset, &raw, ChunkHash::of(&raw))
        })
        .collect();
    Batch {
        disk: "bench-disk0".to_owned(),
        generation: 1,
        seq: 42,
        extents,
    }
}

fn bench_frame(c: &mut Criterion) {
    let msg = Message::Batch(four_mib_batch());
    let frame = msg.encode();
    let frame_bytes = u64::try_from(frame.len()).expect("frame length fits u64");
    let mut group = c.benchmark_group("frame");
    group.throughput(Throughput::Bytes(frame_bytes));
    group.bench_function("encode batch=4MiB", |b| b.iter(|| black_box(&msg).encode()));
    group.bench_function("decode batch=4MiB", |b| {
        b.iter(|| Message::decode(black_box(&frame)).expect("frame decodes"));
    });
    group.finish();
}

fn config() -> Criterion {
    // Quick on a 2-core machine: ~3 s per bench.
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = micro;
    config = config();
    targets = bench_hash, bench_is_zero, bench_compress, bench_decompress_verify, bench_frame
}
criterion_main!(micro);
