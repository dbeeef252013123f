//! Framing of every message Boomerang sends, and the bounded readers and writers the
//! message codecs are built from. No IO happens here: decoders take bytes and say
//! either "here is a frame", "need more bytes" ([`DecodeError::Incomplete`]) or "this
//! is not a frame" ([`DecodeError::Invalid`]).
//!
//! ```text
//!  0       4       6       8              12             16
//!  +-------+-------+-------+--------------+--------------+------------------+
//!  | magic | ver   | kind  | body length  | crc32        | body ...         |
//!  | BMRG  | u16LE | u16LE | u32 LE       | u32 LE       | (length bytes)   |
//!  +-------+-------+-------+--------------+--------------+------------------+
//! ```
//! The crc32 covers bytes 0..12 of the header and the whole body. The body length is
//! checked against [`MAX_BODY`] before anything is allocated. Version 1 is the only
//! version so far; a peer speaking another version is refused with a clear error, and
//! upgrades will be decoded beside the current version here.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"BMRG";
/// The protocol version this build speaks.
pub const VERSION: u16 = 2;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 16;
/// Largest body any frame may carry (64 MiB): a batch of up to 32 MiB of raw changes
/// plus its extent headers fits with room to spare.
pub const MAX_BODY: usize = 64 * 1024 * 1024;
/// Longest string (ids, names, reasons) in any message.
pub const MAX_STRING: usize = 1024;

/// Why bytes could not be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes so far are a valid prefix; at least `needed` more bytes are required.
    #[error("incomplete frame: {needed} more bytes needed")]
    Incomplete {
        /// How many more bytes are needed at least.
        needed: usize,
    },
    /// The bytes are not a valid frame; the connection should be closed.
    #[error("invalid frame: {0}")]
    Invalid(String),
}

impl DecodeError {
    pub(crate) fn invalid(reason: impl Into<String>) -> Self {
        DecodeError::Invalid(reason.into())
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Message kind code.
    pub kind: u16,
    /// Length of the body that follows.
    pub body_len: usize,
    /// crc32 of header bytes 0..12 and the body.
    pub crc: u32,
}

impl FrameHeader {
    /// Parses and checks the fixed header (magic, version, length cap).
    pub fn parse(buf: &[u8]) -> Result<Self, DecodeError> {
        if buf.len() < HEADER_LEN {
            return Err(DecodeError::Incomplete {
                needed: HEADER_LEN - buf.len(),
            });
        }
        if buf[0..4] != MAGIC {
            return Err(DecodeError::invalid("bad magic: not a Boomerang frame"));
        }
        let version = u16::from_le_bytes([buf[4], buf[5]]);
        if version != VERSION {
            return Err(DecodeError::Invalid(format!(
                "protocol version {version} is not supported (this build speaks {VERSION}); \
                 upgrade the older peer"
            )));
        }
        let kind = u16::from_le_bytes([buf[6], buf[7]]);
        let body_len = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
        if body_len > MAX_BODY {
            return Err(DecodeError::Invalid(format!(
                "body length {body_len} exceeds the cap of {MAX_BODY}"
            )));
        }
        let crc = u32::from_le_bytes([buf[12], buf[13], buf[14], buf[15]]);
        Ok(FrameHeader {
            kind,
            body_len,
            crc,
        })
    }
}

/// Splits one whole frame off the front of `buf`: returns the kind, the body (a cheap
/// slice of `buf`) and the number of bytes the frame used. Checks the crc.
pub fn split_frame(buf: &Bytes) -> Result<(u16, Bytes, usize), DecodeError> {
    let header = FrameHeader::parse(buf)?;
    let total = HEADER_LEN + header.body_len;
    if buf.len() < total {
        return Err(DecodeError::Incomplete {
            needed: total - buf.len(),
        });
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&buf[..12]);
    crc.update(&buf[HEADER_LEN..total]);
    if crc.finalize() != header.crc {
        return Err(DecodeError::invalid("frame checksum mismatch"));
    }
    Ok((header.kind, buf.slice(HEADER_LEN..total), total))
}

/// Builds a frame: reserve the header, write the body through [`Writer`], then
/// [`FrameBuilder::finish`] fills in length and crc.
#[derive(Debug)]
pub struct FrameBuilder {
    buf: BytesMut,
}

impl FrameBuilder {
    /// Starts a frame of `kind`, with room for `body_hint` body bytes.
    pub fn new(kind: u16, body_hint: usize) -> Self {
        let mut buf = BytesMut::with_capacity(HEADER_LEN + body_hint);
        buf.put_slice(&MAGIC);
        buf.put_u16_le(VERSION);
        buf.put_u16_le(kind);
        buf.put_u32_le(0);
        buf.put_u32_le(0);
        FrameBuilder { buf }
    }

    /// The body writer.
    pub fn body(&mut self) -> Writer<'_> {
        Writer { buf: &mut self.buf }
    }

    /// Fills in length and checksum and returns the encoded frame.
    ///
    /// # Panics
    /// If the body exceeds [`MAX_BODY`]: encoders are given bounded inputs, so this is a
    /// programming error, never a data error.
    pub fn finish(mut self) -> Bytes {
        let body_len = self.buf.len() - HEADER_LEN;
        assert!(body_len <= MAX_BODY, "frame body {body_len} over MAX_BODY");
        let len = u32::try_from(body_len).expect("MAX_BODY fits u32");
        self.buf[8..12].copy_from_slice(&len.to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&self.buf[..12]);
        crc.update(&self.buf[HEADER_LEN..]);
        let crc = crc.finalize();
        self.buf[12..16].copy_from_slice(&crc.to_le_bytes());
        self.buf.freeze()
    }
}

/// Appends little-endian fields to a frame body.
#[derive(Debug)]
pub struct Writer<'a> {
    buf: &'a mut BytesMut,
}

impl Writer<'_> {
    /// Writes a byte.
    pub fn u8(&mut self, v: u8) {
        self.buf.put_u8(v);
    }
    /// Writes a u16.
    pub fn u16(&mut self, v: u16) {
        self.buf.put_u16_le(v);
    }
    /// Writes a u32.
    pub fn u32(&mut self, v: u32) {
        self.buf.put_u32_le(v);
    }
    /// Writes a u64.
    pub fn u64(&mut self, v: u64) {
        self.buf.put_u64_le(v);
    }
    /// Writes raw bytes with no length prefix.
    pub fn raw(&mut self, v: &[u8]) {
        self.buf.put_slice(v);
    }
    /// Writes a u32 length and the bytes.
    pub fn bytes(&mut self, v: &[u8]) {
        self.u32(len_u32(v.len()));
        self.raw(v);
    }
    /// Writes a string (u16 length + UTF-8), truncated to [`MAX_STRING`] bytes at a
    /// character boundary so the frame always decodes.
    pub fn str(&mut self, v: &str) {
        let mut end = v.len().min(MAX_STRING);
        while !v.is_char_boundary(end) {
            end -= 1;
        }
        let s = &v.as_bytes()[..end];
        self.u16(u16::try_from(s.len()).expect("MAX_STRING fits u16"));
        self.raw(s);
    }
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).expect("lengths are capped below u32::MAX")
}

/// Reads little-endian fields from a frame body; every read is bounds-checked and every
/// length is capped before anything is allocated.
#[derive(Debug)]
pub struct Reader {
    buf: Bytes,
}

impl Reader {
    /// Reads from `body`.
    pub fn new(body: Bytes) -> Self {
        Reader { buf: body }
    }

    fn need(&self, n: usize, what: &str) -> Result<(), DecodeError> {
        if self.buf.remaining() < n {
            return Err(DecodeError::Invalid(format!(
                "body too short for {what}: need {n} bytes, {} left",
                self.buf.remaining()
            )));
        }
        Ok(())
    }

    /// Reads a byte.
    pub fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        self.need(1, what)?;
        Ok(self.buf.get_u8())
    }
    /// Reads a u16.
    pub fn u16(&mut self, what: &str) -> Result<u16, DecodeError> {
        self.need(2, what)?;
        Ok(self.buf.get_u16_le())
    }
    /// Reads a u32.
    pub fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        self.need(4, what)?;
        Ok(self.buf.get_u32_le())
    }
    /// Reads a u64.
    pub fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        self.need(8, what)?;
        Ok(self.buf.get_u64_le())
    }
    /// Reads exactly `N` raw bytes.
    pub fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], DecodeError> {
        self.need(N, what)?;
        let mut out = [0u8; N];
        self.buf.copy_to_slice(&mut out);
        Ok(out)
    }
    /// Reads a u32-length-prefixed byte string of at most `cap` bytes (zero copy).
    pub fn bytes(&mut self, cap: usize, what: &str) -> Result<Bytes, DecodeError> {
        let len = self.u32(what)? as usize;
        if len > cap {
            return Err(DecodeError::Invalid(format!(
                "{what} length {len} exceeds the cap of {cap}"
            )));
        }
        self.need(len, what)?;
        Ok(self.buf.split_to(len))
    }
    /// Reads a string of at most [`MAX_STRING`] bytes.
    pub fn str(&mut self, what: &str) -> Result<String, DecodeError> {
        let len = self.u16(what)? as usize;
        if len > MAX_STRING {
            return Err(DecodeError::Invalid(format!(
                "{what} length {len} exceeds the cap of {MAX_STRING}"
            )));
        }
        self.need(len, what)?;
        let raw = self.buf.split_to(len);
        String::from_utf8(raw.to_vec())
            .map_err(|_| DecodeError::Invalid(format!("{what} is not UTF-8")))
    }
    /// Reads a count prefix (u32) and checks it against `cap` and against the bytes
    /// left, given that each element takes at least `min_elem` bytes. Use before
    /// `Vec::with_capacity`.
    pub fn count(&mut self, cap: usize, min_elem: usize, what: &str) -> Result<usize, DecodeError> {
        let n = self.u32(what)? as usize;
        if n > cap {
            return Err(DecodeError::Invalid(format!(
                "{what} count {n} exceeds the cap of {cap}"
            )));
        }
        if n.saturating_mul(min_elem) > self.buf.remaining() {
            return Err(DecodeError::Invalid(format!(
                "{what} count {n} does not fit in the {} bytes left",
                self.buf.remaining()
            )));
        }
        Ok(n)
    }
    /// Fails unless every byte was consumed.
    pub fn finish(self, what: &str) -> Result<(), DecodeError> {
        if self.buf.has_remaining() {
            return Err(DecodeError::Invalid(format!(
                "{} trailing bytes after {what}",
                self.buf.remaining()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u16, body: &[u8]) -> Bytes {
        let mut b = FrameBuilder::new(kind, body.len());
        b.body().raw(body);
        b.finish()
    }

    /// A frame of wire version 1 (before a pass's manifest request named its
    /// generation) is refused with a reason that says what to do, never decoded as if
    /// its body had today's layout.
    #[test]
    fn a_version_1_frame_is_refused() {
        let mut old = frame(7, b"body").to_vec();
        old[4..6].copy_from_slice(&1u16.to_le_bytes());
        match split_frame(&Bytes::from(old)) {
            Err(DecodeError::Invalid(why)) => {
                assert!(
                    why.contains("version 1") && why.contains("upgrade"),
                    "{why}"
                );
            }
            other => panic!("a version-1 frame: {other:?}"),
        }
    }

    #[test]
    fn every_strict_prefix_is_incomplete() {
        let f = frame(7, b"hello world");
        for cut in 0..f.len() {
            match split_frame(&f.slice(..cut)) {
                Err(DecodeError::Incomplete { needed }) => assert!(needed > 0),
                other => panic!("cut {cut}: {other:?}"),
            }
        }
        let (kind, body, used) = split_frame(&f).expect("whole frame");
        assert_eq!((kind, &body[..], used), (7, &b"hello world"[..], f.len()));
    }

    #[test]
    fn any_flipped_bit_is_invalid() {
        let f = frame(3, b"payload bytes");
        for byte in 0..f.len() {
            let mut bad = f.to_vec();
            bad[byte] ^= 0x10;
            let r = split_frame(&Bytes::from(bad));
            assert!(
                matches!(
                    r,
                    Err(DecodeError::Invalid(_)) | Err(DecodeError::Incomplete { .. })
                ),
                "byte {byte}: {r:?}"
            );
            if !(8..12).contains(&byte) {
                assert!(
                    matches!(r, Err(DecodeError::Invalid(_))),
                    "byte {byte}: {r:?}"
                );
            }
        }
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let mut f = frame(1, b"").to_vec();
        f[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            FrameHeader::parse(&f),
            Err(DecodeError::Invalid(reason)) if reason.contains("exceeds the cap")
        ));
    }

    #[test]
    fn counts_larger_than_the_remaining_bytes_are_refused() {
        let mut buf = BytesMut::new();
        buf.put_u32_le(1_000_000);
        let mut r = Reader::new(buf.freeze());
        assert!(r.count(10_000_000, 8, "extents").is_err());
    }
}
