//! Disk images for tests and benchmarks: deterministic mixed-content images, seeded
//! chunk rewrites, and comparisons (`sha256sum`, byte-wise streaming).
//!
//! Everything streams through buffers of [`MIB`]; no helper holds a disk in memory.
//! Paths may be regular files or block devices (sizes come from seeking to the end).

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::process::Command;

use crate::privileged::tool;
use crate::process::run_ok;
use crate::rng::{fill_text, DataRng};

/// One mebibyte, the unit of image regions and IO buffers.
pub const MIB: u64 = 1 << 20;
const BUF_LEN: usize = 1 << 20;

/// What a region of a mixed image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionKind {
    /// Random bytes: incompressible.
    Random,
    /// Log-like ASCII lines: compressible several-fold.
    Text,
    /// Zeros (a hole in a regular file): skipped by zero detection.
    Zero,
}

/// A run of one kind of content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Byte offset in the image.
    pub offset: u64,
    /// Length in bytes (whole MiB except possibly the last region).
    pub len: u64,
    /// Content kind.
    pub kind: RegionKind,
}

/// The content plan of a mixed image: contiguous regions covering `size` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageLayout {
    /// Image size in bytes.
    pub size: u64,
    /// Regions in offset order.
    pub regions: Vec<Region>,
}

impl ImageLayout {
    /// The layout [`make_mixed_image`] writes for `size` and `seed`: runs of 1-3 MiB,
    /// MiB-aligned, taking the three kinds in a shuffled order per round so each holds
    /// roughly a third of the image.
    pub fn plan(size: u64, seed: u64) -> ImageLayout {
        let mut rng = DataRng::new(seed ^ 0x1a70_u64);
        let mut regions = Vec::new();
        let mut offset = 0;
        let mut round: Vec<RegionKind> = Vec::new();
        while offset < size {
            if round.is_empty() {
                round = vec![RegionKind::Random, RegionKind::Text, RegionKind::Zero];
                // Fisher-Yates over three kinds.
                for i in (1..round.len()).rev() {
                    let j = usize::try_from(rng.below(i as u64 + 1)).expect("index fits in usize");
                    round.swap(i, j);
                }
            }
            let kind = round.pop().expect("round refilled above");
            let len = (rng.between(1, 3) * MIB).min(size - offset);
            regions.push(Region { offset, len, kind });
            offset += len;
        }
        ImageLayout { size, regions }
    }

    /// Bytes of `kind` in the image.
    pub fn bytes_of(&self, kind: RegionKind) -> u64 {
        self.regions
            .iter()
            .filter(|r| r.kind == kind)
            .map(|r| r.len)
            .sum()
    }
}

/// Writes a `size`-byte image at `path` (created or truncated; a block device is
/// overwritten in place) with interleaved random, text and zero regions fixed by
/// `seed`. Zero regions are holes in a regular file. Returns the layout written.
pub fn make_mixed_image(path: &Path, size: u64, seed: u64) -> ImageLayout {
    let layout = ImageLayout::plan(size, seed);
    let is_device = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
    let mut file = OpenOptions::new()
        .write(true)
        .create(!is_device)
        .truncate(!is_device)
        .open(path)
        .unwrap_or_else(|e| panic!("open image {}: {e}", path.display()));
    if is_device {
        let dev_size = byte_size(path);
        assert!(
            dev_size >= size,
            "{} holds {dev_size} bytes, image needs {size}",
            path.display()
        );
    } else {
        file.set_len(size)
            .unwrap_or_else(|e| panic!("size image {} to {size}: {e}", path.display()));
    }
    let mut rng = DataRng::new(seed);
    let mut buf = vec![0u8; BUF_LEN];
    for region in &layout.regions {
        if region.kind == RegionKind::Zero && !is_device {
            continue;
        }
        file.seek(SeekFrom::Start(region.offset))
            .unwrap_or_else(|e| panic!("seek {} to {}: {e}", path.display(), region.offset));
        let mut left = region.len;
        while left > 0 {
            let n = usize::try_from(left.min(MIB)).expect("at most a MiB");
            let chunk = &mut buf[..n];
            match region.kind {
                RegionKind::Random => rng.fill(chunk),
                RegionKind::Text => fill_text(&mut rng, chunk),
                RegionKind::Zero => chunk.fill(0),
            }
            file.write_all(chunk)
                .unwrap_or_else(|e| panic!("write image {}: {e}", path.display()));
            left -= n as u64;
        }
    }
    file.flush()
        .unwrap_or_else(|e| panic!("flush image {}: {e}", path.display()));
    layout
}

/// Overwrites a seeded random `fraction` (0.0-1.0) of the `chunk_size` chunks of
/// `path` with fresh random bytes (a partial last chunk counts as a chunk) and returns
/// the changed chunks' offsets in ascending order. A non-zero fraction changes at
/// least one chunk.
pub fn change_chunks(path: &Path, chunk_size: u64, fraction: f64, seed: u64) -> Vec<u64> {
    assert!(chunk_size > 0, "chunk_size must be positive");
    assert!(
        (0.0..=1.0).contains(&fraction),
        "fraction {fraction} outside 0..=1"
    );
    let size = byte_size(path);
    let chunks = size.div_ceil(chunk_size);
    // Rounded to the nearest whole chunk; chunk counts stay far below 2^52, so the
    // float round trip is exact.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let mut count = ((chunks as f64) * fraction).round() as u64;
    if fraction > 0.0 && chunks > 0 {
        count = count.max(1);
    }
    let count = count.min(chunks);

    // Floyd's algorithm: `count` distinct indices in 0..chunks, in O(count) draws.
    let mut rng = DataRng::new(seed);
    let mut picked = BTreeSet::new();
    for j in chunks - count..chunks {
        let t = rng.below(j + 1);
        if !picked.insert(t) {
            picked.insert(j);
        }
    }

    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for chunk rewrites: {e}", path.display()));
    let mut buf = vec![0u8; BUF_LEN];
    let offsets: Vec<u64> = picked.iter().map(|i| i * chunk_size).collect();
    for &offset in &offsets {
        let end = (offset + chunk_size).min(size);
        let mut at = offset;
        while at < end {
            let n = usize::try_from((end - at).min(MIB)).expect("at most a MiB");
            rng.fill(&mut buf[..n]);
            file.write_all_at(&buf[..n], at)
                .unwrap_or_else(|e| panic!("rewrite {} at {at}: {e}", path.display()));
            at += n as u64;
        }
    }
    offsets
}

/// The size of a file or block device in bytes.
pub fn byte_size(path: &Path) -> u64 {
    let mut file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    file.seek(SeekFrom::End(0))
        .unwrap_or_else(|e| panic!("seek to the end of {}: {e}", path.display()))
}

/// The lower-case hex SHA-256 of a file or device, computed by the system `sha256sum`
/// (an implementation independent of everything under test).
pub fn sha256_file(path: &Path) -> String {
    let out = run_ok(Command::new(tool("sha256sum")).arg(path));
    let digest = out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(
        digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
        "unexpected sha256sum output for {}: {out:?}",
        path.display()
    );
    digest
}

/// Whether two files or devices hold the same bytes (and are the same size).
pub fn files_equal(a: &Path, b: &Path) -> bool {
    first_difference(a, b).is_none()
}

/// The offset of the first differing byte of `a` and `b`, or the shorter length when
/// one is a prefix of the other; `None` when they are equal.
pub fn first_difference(a: &Path, b: &Path) -> Option<u64> {
    let open = |p: &Path| File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let (mut fa, mut fb) = (open(a), open(b));
    let (mut ba, mut bb) = (vec![0u8; BUF_LEN], vec![0u8; BUF_LEN]);
    let mut offset = 0u64;
    loop {
        let na =
            read_full(&mut fa, &mut ba).unwrap_or_else(|e| panic!("read {}: {e}", a.display()));
        let nb =
            read_full(&mut fb, &mut bb).unwrap_or_else(|e| panic!("read {}: {e}", b.display()));
        let n = na.min(nb);
        if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
            return Some(offset + i as u64);
        }
        if na != nb {
            return Some(offset + n as u64);
        }
        if na == 0 {
            return None;
        }
        offset += n as u64;
    }
}

/// Where two equally sized files or block devices differ, by 4 KiB block: `None`
/// when they hold the same bytes, else how many blocks differ and the first offsets.
/// Block devices are read with `O_DIRECT`, past the page cache, so what a filesystem
/// or a writer still holds in memory is not mistaken for what the device holds (the
/// kernel writes a block device's dirty cache back before a direct read of it).
pub fn block_differences(a: &Path, b: &Path) -> Option<String> {
    block_differences_ignoring(a, b, &[])
}

/// [`block_differences`], except that bytes inside the `ignore` ranges (absolute
/// offsets) may differ: a block counts as different only for a byte outside them.
pub fn block_differences_ignoring(a: &Path, b: &Path, ignore: &[Range<u64>]) -> Option<String> {
    const BLOCK: usize = 4096;
    const SHOWN: usize = 12;
    let (size_a, size_b) = (byte_size(a), byte_size(b));
    if size_a != size_b {
        return Some(format!(
            "sizes differ: {} holds {size_a} bytes, {} {size_b}",
            a.display(),
            b.display()
        ));
    }
    let (ra, rb) = (DirectReader::open(a), DirectReader::open(b));
    let (mut ba, mut bb) = (AlignedBuf::new(BUF_LEN), AlignedBuf::new(BUF_LEN));
    let mut first = Vec::new();
    let mut first_bytes = Vec::new();
    let mut count = 0u64;
    let mut at = 0u64;
    while at < size_a {
        let n = usize::try_from((size_a - at).min(BUF_LEN as u64)).expect("at most a MiB");
        ra.read_exact_at(ba.get(n), at);
        rb.read_exact_at(bb.get(n), at);
        for (i, (x, y)) in ba
            .get(n)
            .chunks(BLOCK)
            .zip(bb.get(n).chunks(BLOCK))
            .enumerate()
        {
            let block_at = at + (i * BLOCK) as u64;
            if x == y {
                continue;
            }
            let bytes: Vec<(u64, u8, u8)> = x
                .iter()
                .zip(y)
                .enumerate()
                .map(|(j, (p, q))| (block_at + j as u64, *p, *q))
                .filter(|(offset, p, q)| p != q && !ignore.iter().any(|r| r.contains(offset)))
                .collect();
            if !bytes.is_empty() {
                count += 1;
                if first.len() < SHOWN {
                    first.push(block_at);
                }
                if first_bytes.is_empty() {
                    first_bytes = bytes.into_iter().take(SHOWN).collect();
                }
            }
        }
        at += n as u64;
    }
    (count > 0).then(|| {
        format!(
            "{count} of {} 4 KiB blocks of {} and {} differ, first at offsets {first:?}; \
             in the first, (offset, byte of a, byte of b): {first_bytes:?}",
            size_a.div_ceil(BLOCK as u64),
            a.display(),
            b.display()
        )
    })
}

/// A file read at offsets; with `O_DIRECT` when it is a block device.
struct DirectReader {
    file: File,
    path: std::path::PathBuf,
}

impl DirectReader {
    fn open(path: &Path) -> DirectReader {
        use std::os::unix::fs::OpenOptionsExt;
        let is_block = std::fs::metadata(path)
            .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
            .file_type()
            .is_block_device();
        let mut options = OpenOptions::new();
        options.read(true);
        if is_block {
            options.custom_flags(libc::O_DIRECT);
        }
        let file = options
            .open(path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        DirectReader {
            file,
            path: path.to_path_buf(),
        }
    }

    fn read_exact_at(&self, buf: &mut [u8], at: u64) {
        self.file
            .read_exact_at(buf, at)
            .unwrap_or_else(|e| panic!("read {} at {at}: {e}", self.path.display()));
    }
}

/// A buffer whose start is aligned for `O_DIRECT` (4 KiB).
struct AlignedBuf {
    raw: Vec<u8>,
    skip: usize,
}

impl AlignedBuf {
    const ALIGN: usize = 4096;

    fn new(len: usize) -> AlignedBuf {
        let raw = vec![0u8; len + Self::ALIGN];
        let skip = raw.as_ptr().align_offset(Self::ALIGN);
        AlignedBuf { raw, skip }
    }

    fn get(&mut self, n: usize) -> &mut [u8] {
        &mut self.raw[self.skip..self.skip + n]
    }
}

/// Reads until `buf` is full or the end of input; returns the bytes read.
pub(crate) fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut at = 0;
    while at < buf.len() {
        match r.read(&mut buf[at..]) {
            Ok(0) => break,
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::scratch_dir;

    fn read_at(path: &Path, offset: u64, len: u64) -> Vec<u8> {
        let file = File::open(path).expect("open image");
        let mut buf = vec![0u8; usize::try_from(len).expect("small test length")];
        file.read_exact_at(&mut buf, offset)
            .expect("read image range");
        buf
    }

    #[test]
    fn block_differences_name_the_blocks() {
        let dir = scratch_dir("blockdiff");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        make_mixed_image(&a, 3 * MIB + 8192, 7);
        std::fs::copy(&a, &b).expect("copy image");
        assert_eq!(block_differences(&a, &b), None);
        let f = OpenOptions::new().write(true).open(&b).expect("open copy");
        f.write_all_at(&[0xa5; 2], 2 * MIB + 4097)
            .expect("write two bytes");
        f.write_all_at(&[0x5a; 3], 3 * MIB + 8189)
            .expect("write near the end");
        drop(f);
        let diff = block_differences(&a, &b).expect("the copies differ");
        assert!(
            diff.starts_with("2 of 770 4 KiB blocks") && diff.contains("[2101248, 3149824]"),
            "{diff}"
        );
        let both = [
            2 * MIB + 4097..2 * MIB + 4099,
            3 * MIB + 8189..3 * MIB + 8192,
        ];
        assert_eq!(block_differences_ignoring(&a, &b, &both), None);
        let diff = block_differences_ignoring(&a, &b, &both[..1]).expect("one block left");
        assert!(
            diff.starts_with("1 of 770") && diff.contains("[3149824]"),
            "{diff}"
        );
        f_set_len(&b, MIB);
        assert!(block_differences(&a, &b).is_some_and(|d| d.starts_with("sizes differ")));
    }

    fn f_set_len(path: &Path, len: u64) {
        OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(len))
            .expect("truncate");
    }

    #[test]
    fn layout_covers_the_image_in_thirds() {
        let size = 3 * 1024 * MIB + 12_345;
        let layout = ImageLayout::plan(size, 42);
        assert_eq!(layout, ImageLayout::plan(size, 42));
        assert_ne!(layout, ImageLayout::plan(size, 43));
        let mut next = 0;
        for r in &layout.regions {
            assert_eq!(r.offset, next);
            assert!(r.len > 0 && (r.len % MIB == 0 || r.offset + r.len == size));
            next += r.len;
        }
        assert_eq!(next, size);
        for kind in [RegionKind::Random, RegionKind::Text, RegionKind::Zero] {
            let share = layout.bytes_of(kind) as f64 / size as f64;
            assert!(
                (0.28..0.39).contains(&share),
                "{kind:?} is {share:.3} of the image"
            );
        }
    }

    #[test]
    fn mixed_image_is_deterministic_and_holds_its_layout() {
        let dir = scratch_dir("image");
        let (a, b, c) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("c"),
        );
        let size = 24 * MIB + 4097;
        let layout = make_mixed_image(&a, size, 7);
        make_mixed_image(&b, size, 7);
        make_mixed_image(&c, size, 8);
        assert_eq!(byte_size(&a), size);
        assert!(files_equal(&a, &b));
        assert_eq!(sha256_file(&a), sha256_file(&b));
        assert!(!files_equal(&a, &c));
        for kind in [RegionKind::Random, RegionKind::Text, RegionKind::Zero] {
            assert!(
                layout.bytes_of(kind) > 0,
                "{kind:?} missing from a 24 MiB image"
            );
        }
        for r in &layout.regions {
            let head = read_at(&a, r.offset, r.len.min(64 * 1024));
            match r.kind {
                RegionKind::Zero => assert!(head.iter().all(|&x| x == 0)),
                RegionKind::Text => {
                    assert!(head
                        .iter()
                        .all(|&x| x == b'\n' || (0x20..0x7f).contains(&x)));
                }
                RegionKind::Random => {
                    let distinct: BTreeSet<u8> = head.iter().copied().collect();
                    assert_eq!(
                        distinct.len(),
                        256,
                        "random region at {} looks non-random",
                        r.offset
                    );
                }
            }
        }
        // Rewriting over an existing, larger file gives the same image.
        make_mixed_image(&c, size + 10 * MIB, 1);
        make_mixed_image(&c, size, 7);
        assert!(files_equal(&a, &c));
    }

    #[test]
    fn change_chunks_rewrites_exactly_the_returned_chunks() {
        let dir = scratch_dir("change");
        let (orig, changed) = (dir.path().join("orig"), dir.path().join("changed"));
        let chunk = 64 * 1024;
        let size = 8 * MIB + 1000; // 129 chunks, the last one partial
        make_mixed_image(&orig, size, 3);
        std::fs::copy(&orig, &changed).expect("copy image");
        let offsets = change_chunks(&changed, chunk, 0.1, 11);
        assert_eq!(offsets.len(), 13); // round(129 * 0.1)
        assert!(offsets.windows(2).all(|w| w[0] < w[1]));
        assert!(offsets.iter().all(|o| o % chunk == 0 && *o < size));
        assert_eq!(byte_size(&changed), size);
        for i in 0..size.div_ceil(chunk) {
            let off = i * chunk;
            let len = chunk.min(size - off);
            let same = read_at(&orig, off, len) == read_at(&changed, off, len);
            assert_eq!(same, !offsets.contains(&off), "chunk at {off}");
        }

        // Same seed, same choice; fraction bounds.
        std::fs::copy(&orig, &changed).expect("copy image");
        assert_eq!(change_chunks(&changed, chunk, 0.1, 11), offsets);
        assert!(change_chunks(&changed, chunk, 0.0, 1).is_empty());
        assert_eq!(change_chunks(&changed, chunk, 0.0001, 1).len(), 1);
        assert_eq!(change_chunks(&changed, chunk, 1.0, 1).len(), 129);
    }

    #[test]
    fn sha256_matches_known_vectors() {
        let dir = scratch_dir("sha");
        let (empty, abc) = (dir.path().join("empty"), dir.path().join("abc"));
        std::fs::write(&empty, b"").expect("write empty file");
        std::fs::write(&abc, b"abc").expect("write abc file");
        assert_eq!(
            sha256_file(&empty),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256_file(&abc),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn first_difference_finds_offsets_and_length_mismatches() {
        let dir = scratch_dir("cmp");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let mut data = vec![5u8; 3 * BUF_LEN + 17];
        std::fs::write(&a, &data).expect("write a");
        std::fs::write(&b, &data).expect("write b");
        assert_eq!(first_difference(&a, &b), None);
        data[2 * BUF_LEN + 3] = 6;
        std::fs::write(&b, &data).expect("write b");
        assert_eq!(first_difference(&a, &b), Some(2 * MIB + 3));
        std::fs::write(&b, &data[..100]).expect("write b");
        assert_eq!(first_difference(&a, &b), Some(100));
        assert!(!files_equal(&b, &a));
    }
}
