//! The delta model: a [`Batch`] is an ordered unit of change for one disk, identified
//! by `(disk, generation, seq)`, made of [`Extent`]s. Each extent carries the blake3
//! hash of its raw bytes and a payload in one of three codecs. The agent builds
//! extents with [`ExtentEncoder`]; the master target checks them with
//! [`Extent::decode_verified`] before a byte reaches a replica.

use bytes::Bytes;
use thiserror::Error;

use crate::hash::{is_zero, ChunkHash};
use crate::wire::{DecodeError, Reader, Writer, MAX_BODY};

/// Largest raw length of one extent (16 MiB).
pub const MAX_EXTENT_LEN: u32 = 16 * 1024 * 1024;
/// Most extents one batch may hold.
pub const MAX_EXTENTS: usize = 64 * 1024;
/// Most raw bytes one batch may describe (zero extents included).
pub const MAX_BATCH_RAW: u64 = 1 << 30;
/// Longest disk id.
pub const MAX_DISK_ID: usize = 128;

/// How an extent's payload is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Payload is the raw bytes.
    Raw,
    /// Payload is a zstd frame that decompresses to exactly `len` bytes.
    Zstd,
    /// No payload: the range is all zeros.
    Zero,
}

impl Codec {
    fn code(self) -> u8 {
        match self {
            Codec::Raw => 0,
            Codec::Zstd => 1,
            Codec::Zero => 2,
        }
    }

    fn from_code(code: u8) -> Result<Self, DecodeError> {
        match code {
            0 => Ok(Codec::Raw),
            1 => Ok(Codec::Zstd),
            2 => Ok(Codec::Zero),
            other => Err(DecodeError::Invalid(format!("unknown codec {other}"))),
        }
    }
}

/// One changed range of a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    /// Byte offset on the disk.
    pub offset: u64,
    /// Raw length in bytes.
    pub len: u32,
    /// blake3 of the raw bytes.
    pub hash: ChunkHash,
    /// Payload codec.
    pub codec: Codec,
    /// Encoded payload (empty for [`Codec::Zero`]).
    pub payload: Bytes,
}

/// Why an extent's payload could not be turned back into its raw bytes.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ExtentError {
    /// zstd refused the payload or it decompressed to the wrong length.
    #[error("extent at offset {offset}: payload does not decompress to {len} bytes: {reason}")]
    Decompress {
        /// Extent offset.
        offset: u64,
        /// Expected raw length.
        len: u32,
        /// What zstd said.
        reason: String,
    },
    /// The raw bytes do not hash to the extent's hash.
    #[error("extent at offset {offset} ({len} bytes): blake3 mismatch, payload corrupted in transit or at rest")]
    HashMismatch {
        /// Extent offset.
        offset: u64,
        /// Raw length.
        len: u32,
    },
}

impl Extent {
    /// Decodes the payload into `scratch` (reused between calls), checks the blake3 of
    /// the raw bytes and returns them. Zero extents return `None`: the caller writes
    /// zeros (or punches a hole) without materialising them; their hash is checked
    /// against the hash of `len` zeros through `zero_hash`.
    pub fn decode_verified<'a>(
        &'a self,
        scratch: &'a mut Vec<u8>,
        zero_hash: impl FnOnce(u32) -> ChunkHash,
    ) -> Result<Option<&'a [u8]>, ExtentError> {
        let raw: &[u8] = match self.codec {
            Codec::Zero => {
                if zero_hash(self.len) != self.hash {
                    return Err(ExtentError::HashMismatch {
                        offset: self.offset,
                        len: self.len,
                    });
                }
                return Ok(None);
            }
            Codec::Raw => &self.payload,
            Codec::Zstd => {
                let len = self.len as usize;
                if scratch.len() < len {
                    scratch.resize(len, 0);
                }
                let out = &mut scratch[..len];
                let n = zstd::bulk::decompress_to_buffer(&self.payload, out).map_err(|e| {
                    ExtentError::Decompress {
                        offset: self.offset,
                        len: self.len,
                        reason: e.to_string(),
                    }
                })?;
                if n != self.len as usize {
                    return Err(ExtentError::Decompress {
                        offset: self.offset,
                        len: self.len,
                        reason: format!("got {n} bytes"),
                    });
                }
                &scratch[..len]
            }
        };
        if raw.len() != self.len as usize || ChunkHash::of(raw) != self.hash {
            return Err(ExtentError::HashMismatch {
                offset: self.offset,
                len: self.len,
            });
        }
        Ok(Some(raw))
    }

    /// Bytes this extent takes on the wire.
    pub fn wire_len(&self) -> usize {
        EXTENT_HEADER_LEN + self.payload.len()
    }

    pub(crate) fn encode(&self, w: &mut Writer<'_>) {
        w.u64(self.offset);
        w.u32(self.len);
        w.raw(&self.hash.0);
        w.u8(self.codec.code());
        w.bytes(&self.payload);
    }

    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let offset = r.u64("extent offset")?;
        let len = r.u32("extent length")?;
        if len == 0 || len > MAX_EXTENT_LEN {
            return Err(DecodeError::Invalid(format!(
                "extent length {len} outside 1..={MAX_EXTENT_LEN}"
            )));
        }
        if offset.checked_add(u64::from(len)).is_none() {
            return Err(DecodeError::invalid("extent offset + length overflows"));
        }
        let hash = ChunkHash(r.array("extent hash")?);
        let codec = Codec::from_code(r.u8("extent codec")?)?;
        let payload = r.bytes(MAX_EXTENT_LEN as usize, "extent payload")?;
        match codec {
            Codec::Raw if payload.len() != len as usize => {
                return Err(DecodeError::Invalid(format!(
                    "raw extent payload is {} bytes, length says {len}",
                    payload.len()
                )))
            }
            Codec::Zero if !payload.is_empty() => {
                return Err(DecodeError::invalid("zero extent carries a payload"))
            }
            _ => {}
        }
        Ok(Extent {
            offset,
            len,
            hash,
            codec,
            payload,
        })
    }
}

/// Fixed bytes per extent on the wire besides its payload.
pub const EXTENT_HEADER_LEN: usize = 8 + 4 + 32 + 1 + 4;

/// An ordered unit of change for one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Stable disk id.
    pub disk: String,
    /// Generation the batch belongs to.
    pub generation: u64,
    /// Position in the disk's stream within the generation.
    pub seq: u64,
    /// Changed ranges, in the order they must be applied.
    pub extents: Vec<Extent>,
}

impl Batch {
    /// Raw bytes the batch describes (zero extents included).
    pub fn raw_len(&self) -> u64 {
        self.extents.iter().map(|e| u64::from(e.len)).sum()
    }

    /// Encoded body size, used to size buffers.
    pub fn body_len_hint(&self) -> usize {
        self.disk.len() + 32 + self.extents.iter().map(Extent::wire_len).sum::<usize>()
    }

    pub(crate) fn encode(&self, w: &mut Writer<'_>) {
        w.str(&self.disk);
        w.u64(self.generation);
        w.u64(self.seq);
        w.u32(u32::try_from(self.extents.len()).expect("batches hold at most MAX_EXTENTS"));
        for e in &self.extents {
            e.encode(w);
        }
    }

    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let disk = decode_disk_id(r)?;
        let generation = r.u64("generation")?;
        let seq = r.u64("seq")?;
        let n = r.count(MAX_EXTENTS, EXTENT_HEADER_LEN, "extents")?;
        let mut extents = Vec::with_capacity(n);
        let mut raw = 0u64;
        for _ in 0..n {
            let e = Extent::decode(r)?;
            raw += u64::from(e.len);
            extents.push(e);
        }
        if raw > MAX_BATCH_RAW {
            return Err(DecodeError::Invalid(format!(
                "batch describes {raw} raw bytes, over the cap of {MAX_BATCH_RAW}"
            )));
        }
        Ok(Batch {
            disk,
            generation,
            seq,
            extents,
        })
    }
}

/// Reads a disk id and checks it is a sane, bounded name.
pub(crate) fn decode_disk_id(r: &mut Reader) -> Result<String, DecodeError> {
    let disk = r.str("disk id")?;
    validate_disk_id(&disk).map_err(DecodeError::Invalid)?;
    Ok(disk)
}

/// Disk ids name files at the master target, so they are restricted to
/// `[A-Za-z0-9._-]`, 1 to [`MAX_DISK_ID`] bytes, not starting with a dot.
pub fn validate_disk_id(disk: &str) -> Result<(), String> {
    let ok = !disk.is_empty()
        && disk.len() <= MAX_DISK_ID
        && !disk.starts_with('.')
        && disk
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "disk id {disk:?} must be 1-{MAX_DISK_ID} characters of A-Z a-z 0-9 . _ - and not start with a dot"
        ))
    }
}

/// Turns raw chunks into extents: hash, zero test, zstd at the configured level, and
/// raw when compression saves less than 1/16 of the chunk. Holds a reusable zstd
/// context, so keep one per worker thread.
pub struct ExtentEncoder {
    compressor: zstd::bulk::Compressor<'static>,
    level: i32,
}

impl std::fmt::Debug for ExtentEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExtentEncoder")
            .field("level", &self.level)
            .finish()
    }
}

impl ExtentEncoder {
    /// An encoder at zstd `level` (0 disables compression).
    pub fn new(level: i32) -> std::io::Result<Self> {
        Ok(ExtentEncoder {
            compressor: zstd::bulk::Compressor::new(level.max(1))?,
            level,
        })
    }

    /// Encodes `raw` (at most [`MAX_EXTENT_LEN`] bytes) found at `offset`, whose hash
    /// the caller already computed.
    pub fn encode(&mut self, offset: u64, raw: &[u8], hash: ChunkHash) -> Extent {
        let len = u32::try_from(raw.len()).expect("chunks are at most MAX_EXTENT_LEN");
        if is_zero(raw) {
            return Extent {
                offset,
                len,
                hash,
                codec: Codec::Zero,
                payload: Bytes::new(),
            };
        }
        if self.level > 0 {
            if let Ok(compressed) = self.compressor.compress(raw) {
                if compressed.len() < raw.len() - raw.len() / 16 {
                    return Extent {
                        offset,
                        len,
                        hash,
                        codec: Codec::Zstd,
                        payload: Bytes::from(compressed),
                    };
                }
            }
        }
        Extent {
            offset,
            len,
            hash,
            codec: Codec::Raw,
            payload: Bytes::copy_from_slice(raw),
        }
    }
}

/// Largest batch body a sender should build: leaves headroom under [`MAX_BODY`].
pub const MAX_BATCH_WIRE: usize = MAX_BODY / 2;

#[cfg(test)]
mod tests {
    use super::*;

    fn zeros_hash(len: u32) -> ChunkHash {
        ChunkHash::of_zeros(len as usize)
    }

    #[test]
    fn encoder_picks_zero_zstd_and_raw() -> std::io::Result<()> {
        let mut enc = ExtentEncoder::new(1)?;
        let zero = vec![0u8; 65536];
        let text = b"boomerang ".repeat(6554)[..65536].to_vec();
        let mut noise = vec![0u8; 65536];
        let mut x = 0x9e3779b97f4a7c15u64;
        for b in &mut noise {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x.to_le_bytes()[0];
        }
        let mut scratch = Vec::new();
        for (data, codec) in [
            (&zero, Codec::Zero),
            (&text, Codec::Zstd),
            (&noise, Codec::Raw),
        ] {
            let e = enc.encode(4096, data, ChunkHash::of(data));
            assert_eq!(e.codec, codec);
            let raw = e
                .decode_verified(&mut scratch, zeros_hash)
                .expect("verifies");
            match raw {
                Some(raw) => assert_eq!(raw, &data[..]),
                None => assert_eq!(codec, Codec::Zero),
            }
        }
        Ok(())
    }

    #[test]
    fn tampered_payload_fails_verification() -> std::io::Result<()> {
        let mut enc = ExtentEncoder::new(0)?;
        let data = vec![7u8; 8192];
        let mut e = enc.encode(0, &data, ChunkHash::of(&data));
        let mut p = e.payload.to_vec();
        p[100] ^= 1;
        e.payload = Bytes::from(p);
        let mut scratch = Vec::new();
        assert!(matches!(
            e.decode_verified(&mut scratch, zeros_hash),
            Err(ExtentError::HashMismatch { .. })
        ));
        Ok(())
    }

    #[test]
    fn zstd_bomb_is_refused() -> std::io::Result<()> {
        let mut enc = ExtentEncoder::new(1)?;
        let data = vec![1u8; 1 << 20];
        let mut e = enc.encode(0, &data, ChunkHash::of(&data));
        assert_eq!(e.codec, Codec::Zstd);
        e.len = 4096; // claims far fewer raw bytes than the payload holds
        let mut scratch = Vec::new();
        assert!(matches!(
            e.decode_verified(&mut scratch, zeros_hash),
            Err(ExtentError::Decompress { .. })
        ));
        assert!(
            scratch.len() < 1 << 20,
            "never decompressed past the claimed length"
        );
        Ok(())
    }

    #[test]
    fn disk_ids_are_restricted() {
        assert!(validate_disk_id("vm1-disk0.img").is_ok());
        for bad in ["", ".hidden", "a/b", "../x", "a b", &"x".repeat(200)] {
            assert!(validate_disk_id(bad).is_err(), "{bad:?}");
        }
    }
}
