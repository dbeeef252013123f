//! Chunk hashing (blake3) and the all-zero test used to skip empty chunks.

use std::fmt;

/// Length of a chunk hash in bytes.
pub const HASH_LEN: usize = 32;

/// The blake3 hash of a chunk's raw bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; HASH_LEN]);

impl ChunkHash {
    /// Hashes `data` with blake3.
    pub fn of(data: &[u8]) -> Self {
        ChunkHash(*blake3::hash(data).as_bytes())
    }

    /// The hash of `len` zero bytes, computed without allocating `len` bytes.
    pub fn of_zeros(len: usize) -> Self {
        static ZEROS: [u8; 64 * 1024] = [0u8; 64 * 1024];
        let mut hasher = blake3::Hasher::new();
        let mut left = len;
        while left > 0 {
            let n = left.min(ZEROS.len());
            hasher.update(&ZEROS[..n]);
            left -= n;
        }
        ChunkHash(*hasher.finalize().as_bytes())
    }

    /// Lower-case hex, for logs and `--json` output.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from(self.0).to_hex().to_string()
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({})", &self.to_hex()[..16])
    }
}

/// True when every byte of `data` is zero. Folds 64-byte blocks so the compiler can
/// vectorise, and stops at the first non-zero block.
pub fn is_zero(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(64);
    for block in &mut blocks {
        if block.iter().fold(0u8, |acc, b| acc | b) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_hash_matches_hash_of_zero_buffer() {
        for len in [0usize, 1, 4096, 65536, 65537, 200_000] {
            assert_eq!(ChunkHash::of_zeros(len), ChunkHash::of(&vec![0u8; len]));
        }
    }

    #[test]
    fn is_zero_finds_a_single_set_byte_anywhere() {
        let mut buf = vec![0u8; 1000];
        assert!(is_zero(&buf));
        for i in [0usize, 63, 64, 999] {
            buf[i] = 1;
            assert!(!is_zero(&buf), "byte {i}");
            buf[i] = 0;
        }
    }
}
