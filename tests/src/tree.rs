//! Directory trees on a mounted filesystem: [`write_tree`] fills one with nested
//! directories of random and text files, [`hash_tree`] reads one back, and
//! [`assert_trees_equal`] says precisely what differs.
//!
//! A file's hash is [`content_hash`]: blake3 ([`ChunkHash`]) over the per-MiB blake3
//! hashes and the length, so files of any size hash in bounded memory.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use boomerang_common::hash::ChunkHash;

use crate::disk::read_full;
use crate::rng::{fill_text, DataRng};

/// File path relative to the tree's root, mapped to its [`content_hash`].
pub type TreeHashes = BTreeMap<PathBuf, ChunkHash>;

const KIB: u64 = 1024;
const MAX_DEPTH: usize = 3;
const HASH_BLOCK: usize = 1 << 20;

/// Writes files under `dir` until about `total_bytes` are written (the last file is
/// cut to fit): nested directories up to three deep; mostly small files, some of
/// hundreds of KiB, a few of up to 2 MiB; random (`.bin`) or text (`.txt`) content;
/// all fixed by `seed`. Returns each file's hash. Nothing is fsynced: unmount or
/// freeze to make it durable.
pub fn write_tree(dir: &Path, seed: u64, total_bytes: u64) -> TreeHashes {
    let mut rng = DataRng::new(seed);
    let mut dirs: Vec<(PathBuf, usize)> = vec![(PathBuf::new(), 0)];
    let mut hashes = TreeHashes::new();
    let mut written = 0u64;
    let mut buf = Vec::new();
    let mut files = 0u64;
    while written < total_bytes {
        if rng.below(4) == 0 {
            let (parent, depth) = dirs[pick(&mut rng, dirs.len())].clone();
            if depth < MAX_DEPTH {
                let sub = parent.join(format!("d{}", dirs.len()));
                std::fs::create_dir_all(dir.join(&sub))
                    .unwrap_or_else(|e| panic!("create {}: {e}", dir.join(&sub).display()));
                dirs.push((sub, depth + 1));
            }
        }
        let size = match rng.below(10) {
            0..=5 => rng.between(0, 16 * KIB),
            6..=8 => rng.between(16 * KIB, 256 * KIB),
            _ => rng.between(256 * KIB, 2048 * KIB),
        }
        .min(total_bytes - written);
        buf.resize(usize::try_from(size).expect("file size under 2 MiB"), 0);
        let text = rng.below(2) == 0;
        if text {
            fill_text(&mut rng, &mut buf);
        } else {
            rng.fill(&mut buf);
        }
        let parent = &dirs[pick(&mut rng, dirs.len())].0;
        let rel = parent.join(format!("f{files}.{}", if text { "txt" } else { "bin" }));
        let path = dir.join(&rel);
        let mut file =
            File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        file.write_all(&buf)
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        hashes.insert(
            rel,
            content_hash(&mut buf.as_slice()).expect("hashing memory cannot fail"),
        );
        written += size;
        files += 1;
    }
    hashes
}

/// Hashes every regular file under `dir` (symlinks are not followed; `lost+found` at
/// the root is skipped).
pub fn hash_tree(dir: &Path) -> TreeHashes {
    let mut hashes = TreeHashes::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(rel_dir) = pending.pop() {
        let abs = dir.join(&rel_dir);
        let entries =
            std::fs::read_dir(&abs).unwrap_or_else(|e| panic!("list {}: {e}", abs.display()));
        for entry in entries {
            let entry = entry.unwrap_or_else(|e| panic!("list {}: {e}", abs.display()));
            let rel = rel_dir.join(entry.file_name());
            if rel == Path::new("lost+found") {
                continue;
            }
            let kind = entry
                .file_type()
                .unwrap_or_else(|e| panic!("stat {}: {e}", entry.path().display()));
            if kind.is_dir() {
                pending.push(rel);
            } else if kind.is_file() {
                let path = entry.path();
                let mut file =
                    File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
                let hash = content_hash(&mut file)
                    .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
                hashes.insert(rel, hash);
            }
        }
    }
    hashes
}

/// The hash of everything `reader` yields: blake3 over the concatenated blake3 hashes
/// of each MiB, followed by the total length (little-endian u64).
pub fn content_hash(reader: &mut impl Read) -> std::io::Result<ChunkHash> {
    let mut block = vec![0u8; HASH_BLOCK];
    let mut summary = Vec::new();
    let mut len = 0u64;
    loop {
        let n = read_full(reader, &mut block)?;
        if n == 0 {
            break;
        }
        summary.extend_from_slice(&ChunkHash::of(&block[..n]).0);
        len += n as u64;
        if n < block.len() {
            break;
        }
    }
    summary.extend_from_slice(&len.to_le_bytes());
    Ok(ChunkHash::of(&summary))
}

/// Panics unless the trees match, listing missing, unexpected and changed files.
pub fn assert_trees_equal(expected: &TreeHashes, actual: &TreeHashes) {
    const SHOW: usize = 20;
    let missing: Vec<_> = expected
        .keys()
        .filter(|p| !actual.contains_key(*p))
        .collect();
    let extra: Vec<_> = actual
        .keys()
        .filter(|p| !expected.contains_key(*p))
        .collect();
    let changed: Vec<_> = expected
        .iter()
        .filter(|(p, h)| actual.get(*p).is_some_and(|a| a != *h))
        .map(|(p, _)| p)
        .collect();
    if missing.is_empty() && extra.is_empty() && changed.is_empty() {
        return;
    }
    let list = |v: &[&PathBuf]| {
        let shown: Vec<String> = v
            .iter()
            .take(SHOW)
            .map(|p| p.display().to_string())
            .collect();
        format!(
            "{} {:?}{}",
            v.len(),
            shown,
            if v.len() > SHOW { " ..." } else { "" }
        )
    };
    panic!(
        "trees differ ({} files expected, {} found): missing {}; unexpected {}; changed {}",
        expected.len(),
        actual.len(),
        list(&missing),
        list(&extra),
        list(&changed)
    );
}

fn pick(rng: &mut DataRng, len: usize) -> usize {
    usize::try_from(rng.below(len as u64)).expect("index below a length fits in usize")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::scratch_dir;

    #[test]
    fn written_tree_reads_back_and_is_deterministic() {
        let (a, b) = (scratch_dir("tree-a"), scratch_dir("tree-b"));
        let total = 6 << 20;
        let written = write_tree(a.path(), 5, total);
        assert!(written.len() > 5, "{} files", written.len());
        assert!(
            written.keys().any(|p| p.components().count() > 2),
            "no nested files"
        );
        let on_disk: u64 = written
            .keys()
            .map(|p| {
                std::fs::metadata(a.path().join(p))
                    .expect("stat written file")
                    .len()
            })
            .sum();
        assert_eq!(on_disk, total);
        assert_eq!(hash_tree(a.path()), written);
        assert_eq!(write_tree(b.path(), 5, total), written);
        assert_trees_equal(&written, &hash_tree(b.path()));
    }

    #[test]
    fn differences_are_named() {
        let dir = scratch_dir("tree-diff");
        let written = write_tree(dir.path(), 9, 1 << 20);
        let victim = written.keys().next().expect("at least one file").clone();
        std::fs::write(dir.path().join(&victim), b"changed").expect("overwrite file");
        std::fs::write(dir.path().join("new.txt"), b"new").expect("write new file");
        let err = std::panic::catch_unwind(|| assert_trees_equal(&written, &hash_tree(dir.path())))
            .expect_err("trees differ");
        let msg = err
            .downcast_ref::<String>()
            .expect("panic message is a String");
        assert!(
            msg.contains("new.txt") && msg.contains(&victim.display().to_string()),
            "{msg}"
        );
    }

    #[test]
    fn content_hash_is_length_aware_and_streams() {
        let data = vec![7u8; 3 * HASH_BLOCK + 5];
        let whole = content_hash(&mut data.as_slice()).expect("hash memory");
        let mut reader = std::io::BufReader::with_capacity(4096, data.as_slice());
        assert_eq!(content_hash(&mut reader).expect("hash reader"), whole);
        let empty = content_hash(&mut [].as_slice()).expect("hash empty");
        let zero = content_hash(&mut [0u8].as_slice()).expect("hash one zero");
        assert_ne!(empty, zero);
    }
}
