//! Tests of the intercept on the real kernel parts: FUSE, loop devices, ext4. They need
//! root, `/dev/fuse` and `losetup`: without them each prints `SKIPPED <test>: <reason>`
//! and returns, or panics when `BOOMERANG_PRIVILEGED_TESTS=1`. Every mount and loop
//! device is undone by a guard, also when a test fails. Run:
//! `cargo test -p boomerang-agent intercept`; the throughput figures:
//! `cargo test -p boomerang-agent --release intercept_throughput -- --ignored --nocapture`.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::journal::{CaptureState, DirtyBitmap, Entry, Journal, Mode, BLOCK_SIZE as B};

const PRIVILEGED_ENV: &str = "BOOMERANG_PRIVILEGED_TESTS";
const MIB: u64 = 1 << 20;
const DISK: &str = "disk-0";
const FILE_NAME: &str = "disk.img";

fn tool(name: &str) -> Option<PathBuf> {
    [
        "/usr/local/sbin",
        "/usr/sbin",
        "/sbin",
        "/usr/local/bin",
        "/usr/bin",
        "/bin",
    ]
    .iter()
    .map(|d| Path::new(d).join(name))
    .find(|p| p.exists())
}

/// Whether the privileged prerequisites hold; prints SKIPPED or panics otherwise.
fn gate(test: &str, tools: &[&str]) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("not root".to_string());
    }
    if !Path::new("/dev/fuse").exists() {
        missing.push("no /dev/fuse (modprobe fuse)".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        missing.push("no /dev/loop-control (modprobe loop)".into());
    }
    for t in ["losetup", "umount"].iter().chain(tools) {
        if tool(t).is_none() {
            missing.push(format!("{t} not installed"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let reason = missing.join("; ");
    if std::env::var(PRIVILEGED_ENV).is_ok_and(|v| v.trim() == "1") {
        panic!("{test}: {PRIVILEGED_ENV}=1 but a prerequisite is missing: {reason}");
    }
    let line = format!("SKIPPED {test}: {reason}");
    println!("{line}");
    let _ = writeln!(std::io::stderr(), "{line}");
    false
}

/// Runs a system tool; panics with its stderr on failure; returns its stdout.
fn run(name: &str, args: &[&str]) -> String {
    let path = tool(name).unwrap_or_else(|| panic!("{name} not installed"));
    let out = Command::new(&path)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"));
    assert!(
        out.status.success(),
        "{name} {args:?}: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run_quiet(name: &str, args: &[&str]) {
    if let Some(path) = tool(name) {
        let _ = Command::new(path)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A loop device on a file; detached on drop.
struct LoopDev {
    dev: String,
}

impl LoopDev {
    fn attach(file: &Path) -> LoopDev {
        Self::attach_with(file, &[])
    }

    fn attach_with(file: &Path, options: &[&str]) -> LoopDev {
        let file = file.to_str().expect("utf-8 path");
        let mut args = vec!["--find", "--show"];
        args.extend_from_slice(options);
        args.push(file);
        let dev = run("losetup", &args).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup said {dev:?}");
        LoopDev { dev }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        run_quiet("losetup", &["-d", &self.dev]);
    }
}

/// A block device mounted on a directory; unmounted on drop (lazily if busy).
struct Mounted {
    dir: PathBuf,
}

impl Mounted {
    fn with_options(dev: &str, dir: &Path, options: &str) -> Mounted {
        fs::create_dir_all(dir).expect("create mount dir");
        let d = dir.to_str().expect("utf-8 path");
        run("mount", &["-o", options, dev, d]);
        Mounted {
            dir: dir.to_path_buf(),
        }
    }
}

impl Mounted {
    /// Unmounts now, failing the test if the file system is busy.
    fn unmount(mut self) {
        run("umount", &[self.dir.to_str().expect("utf-8 path")]);
        self.dir = PathBuf::new();
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.dir.as_os_str().is_empty() {
            return;
        }
        let d = self.dir.to_str().unwrap_or_default();
        if !Command::new("umount")
            .arg(d)
            .status()
            .is_ok_and(|s| s.success())
        {
            run_quiet("umount", &["-l", d]);
        }
    }
}

/// Lazily unmounts whatever is left on a directory (a dead FUSE mount) on drop.
struct LazyUnmount(PathBuf);

impl Drop for LazyUnmount {
    fn drop(&mut self) {
        if mounts::top_mount(&self.0).is_ok_and(|m| m.is_some()) {
            run_quiet("umount", &["-l", self.0.to_str().unwrap_or_default()]);
        }
    }
}

/// Deterministic bytes (xorshift64*), different for each seed.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `n` as `usize` (test sizes are small).
fn us(n: u64) -> usize {
    usize::try_from(n).expect("fits usize")
}

/// A backing image, a journal and a mount point in a temp dir. The guard that
/// lazily unmounts the mount point drops before the temp dir is removed.
struct Fixture {
    disk: ServedDisk,
    capture: Arc<Mutex<Capture>>,
    _lazy: LazyUnmount,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new(size: u64, journal_capacity: u64) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let backing = dir.path().join("backing.img");
        File::create(&backing)
            .and_then(|f| f.set_len(size))
            .expect("create backing image");
        let mountpoint = dir.path().join("mnt");
        fs::create_dir(&mountpoint).expect("mkdir mount point");
        let journal = Journal::open(&dir.path().join("state"), journal_capacity).expect("journal");
        let state = CaptureState::new(DirtyBitmap::new(size));
        Fixture {
            disk: ServedDisk {
                disk_id: DISK.into(),
                backing,
                mountpoint: mountpoint.clone(),
                file_name: FILE_NAME.into(),
            },
            capture: Arc::new(Mutex::new(Capture::new(journal, state))),
            _lazy: LazyUnmount(mountpoint),
            dir,
        }
    }

    fn start(&self, options: &InterceptOptions) -> Intercept {
        Intercept::start(&self.disk, Arc::clone(&self.capture), options).expect("start intercept")
    }

    /// Every journal record in seq order, checking seqs are contiguous from 1; a zero
    /// record comes as that many zero bytes.
    fn records(&self) -> Vec<(u64, Vec<u8>)> {
        let c = lock_capture(&self.capture);
        let mut out = Vec::new();
        let mut next = 1;
        loop {
            let batch = c.journal.read_from(next, 16 * MIB).expect("read journal");
            if batch.is_empty() {
                break;
            }
            for r in batch {
                assert_eq!(r.seq, next, "journal seqs are contiguous");
                next += 1;
                match r.entry {
                    Entry::Write { disk, offset, data } => {
                        assert_eq!(disk, DISK);
                        out.push((offset, data.to_vec()));
                    }
                    Entry::Zero { disk, offset, len } => {
                        assert_eq!(disk, DISK);
                        out.push((offset, vec![0u8; us(len)]));
                    }
                    Entry::Tag { .. } => panic!("the intercept appends no tags"),
                }
            }
        }
        assert_eq!(next, c.journal.next_seq(), "every record was read");
        out
    }
}

/// A copy of `data` at a 4 KiB-aligned address, for O_DIRECT.
fn aligned(data: &[u8]) -> (Vec<u8>, usize) {
    let mut buf = vec![0u8; data.len() + 4096];
    let at = buf.as_ptr().align_offset(4096);
    buf[at..at + data.len()].copy_from_slice(data);
    (buf, at)
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[test]
fn ext4_on_a_loop_device_over_the_file_replays_byte_for_byte() {
    let test = "ext4_on_a_loop_device_over_the_file_replays_byte_for_byte";
    if !gate(test, &["mkfs.ext4", "e2fsck", "mount"]) {
        return;
    }
    let fx = Fixture::new(64 * MIB, 256 * MIB);
    // Content before the intercept starts, so the replay has something to get wrong.
    {
        let f = OpenOptions::new()
            .write(true)
            .open(&fx.disk.backing)
            .expect("open backing");
        for (i, at) in [0, 5 * MIB + 512, 40 * MIB, 64 * MIB - 8192]
            .into_iter()
            .enumerate()
        {
            f.write_all_at(&pattern(100 + i as u64, 8192), at)
                .expect("seed backing");
        }
    }
    let initial = fs::read(&fx.disk.backing).expect("read backing");
    let intercept = fx.start(&InterceptOptions::default());
    {
        let lo = LoopDev::attach(intercept.file_path());
        // mkfs discards the whole device first, and `-o discard` discards what b
        // freed: both come as punched holes, journaled as zero records.
        run("mkfs.ext4", &["-F", "-q", &lo.dev]);
        let mnt = Mounted::with_options(&lo.dev, &fx.dir.path().join("ext4"), "discard");
        let files: [(&str, u64, usize); 4] = [
            ("a", 1, us(3 * MIB)),
            ("b", 2, us(MIB)),
            ("c", 3, us(MIB / 2) + 123),
            ("d", 4, 10),
        ];
        for (name, seed, len) in files {
            fs::write(mnt.dir.join(name), pattern(seed, len)).expect("write file");
        }
        // Rewrite the middle of a, drop b, and make it all reach the disk.
        let a = OpenOptions::new()
            .write(true)
            .open(mnt.dir.join("a"))
            .expect("open a");
        a.write_all_at(&pattern(9, us(MIB)), MIB + 100)
            .expect("rewrite a");
        a.sync_all().expect("fsync a");
        drop(a);
        fs::remove_file(mnt.dir.join("b")).expect("remove b");
        run("sync", &[]);
        mnt.unmount();
        drop(lo);
    }
    let stats = intercept.stats();
    intercept.stop().expect("clean stop");

    let records = fx.records();
    assert!(!records.is_empty());
    let mut replica = initial;
    for (offset, data) in &records {
        replica[us(*offset)..us(*offset) + data.len()].copy_from_slice(data);
    }
    let source = fs::read(&fx.disk.backing).expect("read backing");
    assert_eq!(replica.len(), source.len());
    if let Some(at) = first_difference(&replica, &source) {
        panic!("replayed journal differs from the backing disk at byte {at}");
    }
    let c = lock_capture(&fx.capture);
    assert_eq!(c.state.mode(), Mode::Journal);
    assert!(c.state.bitmap().is_empty());
    assert_eq!(
        c.journal.durable_seq() + 1,
        c.journal.next_seq(),
        "stop syncs the journal"
    );
    assert!(c.resync_reason().is_none());
    assert!(
        stats.discards > 0,
        "mkfs and -o discard punched holes: {stats:?}"
    );
    assert_eq!(stats.journaled, stats.writes + stats.discards);
    assert_eq!(stats.marked, 0);
    assert_eq!(records.len() as u64, stats.journaled);
    drop(c);
    let image = fx.disk.backing.to_str().expect("utf-8 path");
    run("e2fsck", &["-fn", image]);
    println!(
        "{test}: {} writes ({} bytes) and {} discards ({} bytes) journaled and replayed, {} syncs",
        stats.writes, stats.bytes_written, stats.discards, stats.bytes_discarded, stats.syncs
    );
}

/// fallocate(2) on the served file, `len` bytes at `offset`.
fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(at), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate on a descriptor open for the call, with plain integers.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, at, n) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
fn punched_holes_and_zeroed_ranges_are_applied_then_journaled_in_order() {
    let test = "punched_holes_and_zeroed_ranges_are_applied_then_journaled_in_order";
    if !gate(test, &[]) {
        return;
    }
    const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    let size = 8 * MIB;
    let fx = Fixture::new(size, 64 * MIB);
    let intercept = fx.start(&InterceptOptions::default());
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(intercept.file_path())
        .expect("open served file");
    let mut model = pattern(1, us(size));
    f.write_all_at(&model, 0).expect("fill");
    // A hole, a zeroed range, a write into the hole, and a punch past the end (kept
    // to the disk's size).
    fallocate(&f, PUNCH, MIB + 512, 3 * B).expect("punch");
    model[us(MIB) + 512..us(MIB) + 512 + us(3 * B)].fill(0);
    fallocate(
        &f,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        4 * MIB,
        MIB,
    )
    .expect("zero range");
    model[us(4 * MIB)..us(5 * MIB)].fill(0);
    f.write_all_at(b"inside the hole", MIB + 4096)
        .expect("write");
    model[us(MIB) + 4096..us(MIB) + 4096 + 15].copy_from_slice(b"inside the hole");
    fallocate(&f, PUNCH, size - B, 4 * B).expect("punch past the end");
    model[us(size - B)..].fill(0);
    // Modes that allocate, grow or shift the disk are refused; nothing is journaled.
    // (The kernel's FUSE refuses collapse and insert itself: two reach the agent.)
    let before = lock_capture(&fx.capture).journal.next_seq();
    for mode in [
        0,
        libc::FALLOC_FL_KEEP_SIZE,
        libc::FALLOC_FL_COLLAPSE_RANGE,
        libc::FALLOC_FL_INSERT_RANGE,
    ] {
        let err = fallocate(&f, mode, 0, B).expect_err("refused");
        assert_eq!(err.raw_os_error(), Some(libc::EOPNOTSUPP), "mode {mode:#x}");
    }
    // Zeroing past the end without KEEP_SIZE would grow the disk.
    let err = fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, size - B, 2 * B).expect_err("grow");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
    assert_eq!(lock_capture(&fx.capture).journal.next_seq(), before);
    let stats = intercept.stats();
    drop(f);
    intercept.stop().expect("clean stop");

    let source = fs::read(&fx.disk.backing).expect("read backing");
    if let Some(at) = first_difference(&model, &source) {
        panic!("the backing disk differs from the model at byte {at}");
    }
    // The journal replays to the same bytes from nothing: zero records in order.
    let mut replica = vec![0xeeu8; us(size)];
    let records = fx.records();
    for (offset, data) in &records {
        replica[us(*offset)..us(*offset) + data.len()].copy_from_slice(data);
    }
    if let Some(at) = first_difference(&replica, &source) {
        panic!("the replayed journal differs from the backing disk at byte {at}");
    }
    // The fill (in max_write pieces), punch, zero, write, punch.
    assert_eq!(records.len() as u64, stats.writes + stats.discards);
    assert_eq!(stats.journaled, stats.writes + stats.discards);
    assert_eq!(
        (
            stats.discards,
            stats.bytes_discarded,
            stats.fallocate_refused
        ),
        (3, 3 * B + MIB + B, 2),
        "{stats:?}"
    );
    println!("{test}: {stats:?}");
}

#[test]
fn reads_come_from_the_backing_disk_and_fsync_makes_the_journal_durable() {
    let test = "reads_come_from_the_backing_disk_and_fsync_makes_the_journal_durable";
    if !gate(test, &[]) {
        return;
    }
    let size = 8 * MIB;
    let fx = Fixture::new(size, 16 * MIB);
    let content = pattern(7, us(size));
    fs::write(&fx.disk.backing, &content).expect("fill backing");
    let options = InterceptOptions {
        journal_sync_interval: None,
        ..InterceptOptions::default()
    };
    let intercept = fx.start(&options);
    let file = intercept.file_path().to_path_buf();

    let meta = fs::metadata(&file).expect("stat served file");
    assert!(meta.is_file());
    assert_eq!(meta.len(), size);
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    let names: Vec<String> = fs::read_dir(intercept.mountpoint())
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, [FILE_NAME]);

    assert!(
        fs::read(&file).expect("read served file") == content,
        "whole-file read"
    );
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .expect("open served file");
    let mut part = vec![0u8; 100_000];
    f.read_exact_at(&mut part, 12_345).expect("unaligned read");
    assert!(part == content[12_345..112_345], "unaligned read");
    let mut tail = vec![0u8; 10];
    assert_eq!(f.read_at(&mut tail, size - 4).expect("read at end"), 4);

    // Straddles a page boundary, so the kernel may hand it over in more than one
    // request; each is journaled before the write returns.
    let data = pattern(8, 4096);
    f.write_all_at(&data, MIB + 512).expect("write");
    let appended = {
        let c = lock_capture(&fx.capture);
        assert_eq!(c.journal.durable_seq(), 0, "not durable before fsync");
        c.journal.next_seq() - 1
    };
    let mut replayed = vec![0u8; data.len()];
    let records = fx.records();
    assert_eq!(records.len() as u64, appended);
    for (offset, bytes) in records {
        let at = us(offset - (MIB + 512));
        replayed[at..at + bytes.len()].copy_from_slice(&bytes);
    }
    assert!(
        replayed == data,
        "the journal holds the write before write returned"
    );
    f.sync_data().expect("fdatasync served file");
    assert_eq!(
        lock_capture(&fx.capture).journal.durable_seq(),
        appended,
        "fsync syncs the journal"
    );
    let mut on_disk = vec![0u8; 4096];
    File::open(&fx.disk.backing)
        .and_then(|b| b.read_exact_at(&mut on_disk, MIB + 512))
        .expect("read backing");
    assert!(on_disk == data, "the write reached the backing disk");

    // What a single-disk mount refuses.
    let errno = |r: std::io::Result<()>| r.expect_err("must be refused").raw_os_error();
    assert_eq!(
        errno(f.write_all_at(&[1], size)),
        Some(libc::ENOSPC),
        "write past the end"
    );
    assert_eq!(errno(f.set_len(size / 2)), Some(libc::EPERM), "truncate");
    assert_eq!(errno(fs::remove_file(&file)), Some(libc::EPERM), "unlink");
    assert_eq!(
        errno(File::create(intercept.mountpoint().join("other")).map(drop)),
        Some(libc::EPERM),
        "create"
    );
    assert_eq!(
        errno(fs::create_dir(intercept.mountpoint().join("d"))),
        Some(libc::EPERM),
        "mkdir"
    );
    drop(f);

    // A second agent on the same mount point is refused.
    let err = Intercept::start_uncaptured(&fx.disk, &options).expect_err("already mounted");
    assert!(
        matches!(err, InterceptError::AlreadyMounted { .. }),
        "{err}"
    );
    println!("{test}: refused as expected: {err}");

    let stats = intercept.stats();
    assert_eq!((stats.writes, stats.journaled), (appended, appended));
    assert!(stats.syncs >= 1 && stats.reads >= 1);
    intercept.stop().expect("clean stop");
    assert!(
        mounts::top_mount(&fx.disk.mountpoint.canonicalize().expect("canonical"))
            .expect("mountinfo")
            .is_none(),
        "unmounted"
    );
}

#[test]
fn a_full_journal_drops_to_bitmap_mode_and_marks_every_later_write() {
    let test = "a_full_journal_drops_to_bitmap_mode_and_marks_every_later_write";
    if !gate(test, &[]) {
        return;
    }
    let size = 16 * MIB;
    // Room for about fifteen 4 KiB records.
    let fx = Fixture::new(size, 64 << 10);
    let intercept = fx.start(&InterceptOptions::default());
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(intercept.file_path())
        .expect("open served file with O_DIRECT");

    // (offset, data, journaled)
    let mut issued: Vec<(u64, Vec<u8>, bool)> = Vec::new();
    let blocks = size / B;
    for i in 0..60u64 {
        // 4 KiB writes, and a 64 KiB one now and then once the journal has filled.
        let len = if i >= 20 && i % 7 == 3 { 16 * B } else { B };
        let offset = ((i * 2_654_435_761) % (blocks - 16)) * B;
        let data = pattern(1000 + i, us(len));
        let (buf, at) = aligned(&data);
        let before = lock_capture(&fx.capture).journal.next_seq();
        f.write_all_at(&buf[at..at + data.len()], offset)
            .expect("direct write");
        let journaled = lock_capture(&fx.capture).journal.next_seq() > before;
        issued.push((offset, data, journaled));
    }
    let switch = issued
        .iter()
        .position(|(_, _, journaled)| !journaled)
        .expect("the journal filled up");
    assert!(switch > 0, "some writes fit before it was full");
    assert!(
        issued[switch..].iter().all(|(_, _, j)| !j),
        "no write is journaled after the switch to bitmap mode"
    );
    {
        let c = lock_capture(&fx.capture);
        assert_eq!(c.state.mode(), Mode::Bitmap);
        assert!(!c.state.crash_consistent_tags_allowed());
        for (offset, data, _) in &issued[switch..] {
            for block in (*offset..offset + data.len() as u64).step_by(us(B)) {
                assert!(
                    c.state.bitmap().is_dirty(block),
                    "block at {block} not marked"
                );
            }
        }
        assert!(c.resync_reason().is_none(), "a full journal is not a fault");
    }
    // The journal holds exactly the writes before the switch, in order.
    let journaled: Vec<(u64, Vec<u8>)> = issued[..switch]
        .iter()
        .map(|(o, d, _)| (*o, d.clone()))
        .collect();
    assert!(
        fx.records() == journaled,
        "journal holds the first writes in order"
    );
    // Every write reached the backing disk, journaled or not.
    let mut model = vec![0u8; us(size)];
    for (offset, data, _) in &issued {
        model[us(*offset)..us(*offset) + data.len()].copy_from_slice(data);
    }
    let stats = intercept.stats();
    assert_eq!(stats.marked, (issued.len() - switch) as u64);

    // The shipper catches up: journal released, bitmap drained and acked. New writes
    // go to the journal again and crash-consistent tags are allowed again.
    {
        let mut c = lock_capture(&fx.capture);
        let last = c.journal.next_seq() - 1;
        c.journal.release_through(last).expect("release");
        let runs = c.state.take_runs(u64::MAX);
        c.state.runs_durable(runs.len());
        assert!(c.state.caught_up());
        assert!(c.state.crash_consistent_tags_allowed());
    }
    let data = pattern(5000, us(B));
    let (buf, at) = aligned(&data);
    f.write_all_at(&buf[at..at + data.len()], 0)
        .expect("direct write");
    model[..data.len()].copy_from_slice(&data);
    {
        let c = lock_capture(&fx.capture);
        assert_eq!(c.state.mode(), Mode::Journal);
        assert_eq!(
            c.journal.held_records(),
            1,
            "journaled again once caught up"
        );
    }
    drop(f);
    intercept.stop().expect("clean stop");
    let source = fs::read(&fx.disk.backing).expect("read backing");
    if let Some(at) = first_difference(&model, &source) {
        panic!("backing disk differs from the writes issued at byte {at}");
    }
    println!(
        "{test}: {switch} writes journaled, {} marked in bitmap mode",
        issued.len() - switch
    );
}

/// Set by `a_dead_mount_is_refused_with_the_command_to_clear_it` for its helper
/// process: `<backing>\n<mountpoint>`.
const SERVE_ENV: &str = "BOOMERANG_INTERCEPT_TEST_SERVE";

/// The helper process: serves a disk until it is killed. Does nothing unless run by
/// `a_dead_mount_is_refused_with_the_command_to_clear_it`.
#[test]
#[ignore = "helper process of a_dead_mount_is_refused_with_the_command_to_clear_it"]
fn serve_until_killed() {
    let Ok(spec) = std::env::var(SERVE_ENV) else {
        return;
    };
    let (backing, mountpoint) = spec.split_once('\n').expect("backing\\nmountpoint");
    let disk = ServedDisk {
        disk_id: DISK.into(),
        backing: backing.into(),
        mountpoint: mountpoint.into(),
        file_name: FILE_NAME.into(),
    };
    let intercept =
        Intercept::start_uncaptured(&disk, &InterceptOptions::default()).expect("start");
    println!("SERVING {}", intercept.file_path().display());
    let _ = std::io::stdout().flush();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn a_dead_mount_is_refused_with_the_command_to_clear_it() {
    let test = "a_dead_mount_is_refused_with_the_command_to_clear_it";
    if !gate(test, &[]) {
        return;
    }
    let fx = Fixture::new(4 * MIB, 4 * MIB);
    // An agent serving the disk is killed with SIGKILL: its /dev/fuse descriptor is
    // closed by the kernel, the connection aborted, and the mount left behind, dead.
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "intercept::tests::serve_until_killed",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            SERVE_ENV,
            format!(
                "{}\n{}",
                fx.disk.backing.display(),
                fx.disk.mountpoint.display()
            ),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn helper");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // libtest prints `test <name> ... ` before the helper's own line.
        let serving = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains("SERVING "));
        let _ = tx.send(serving);
    });
    let serving = rx.recv_timeout(Duration::from_secs(60)).unwrap_or(false);
    child.kill().expect("SIGKILL the helper");
    let _ = child.wait();
    assert!(serving, "the helper never served the disk");

    let stat = fs::metadata(&fx.disk.mountpoint);
    assert_eq!(
        stat.expect_err("a dead mount cannot be stat'ed")
            .raw_os_error(),
        Some(libc::ENOTCONN)
    );
    let err = Intercept::start(
        &fx.disk,
        Arc::clone(&fx.capture),
        &InterceptOptions::default(),
    )
    .expect_err("must refuse a dead mount");
    let message = err.to_string();
    assert!(
        matches!(err, InterceptError::StaleMount { .. }),
        "{message}"
    );
    let hint = format!("umount -l {}", fx.disk.mountpoint.display());
    assert!(message.contains(&hint), "{message}");
    println!("{test}: refused: {message}");

    // Doing what the message says clears the way.
    run(
        "umount",
        &["-l", fx.disk.mountpoint.to_str().expect("utf-8")],
    );
    let intercept = fx.start(&InterceptOptions::default());
    intercept.stop().expect("clean stop");
}

#[test]
fn stop_aborts_a_file_still_in_use_after_the_grace() {
    let test = "stop_aborts_a_file_still_in_use_after_the_grace";
    if !gate(test, &[]) {
        return;
    }
    let fx = Fixture::new(4 * MIB, 4 * MIB);
    let options = InterceptOptions {
        unmount_grace: Duration::from_millis(300),
        ..InterceptOptions::default()
    };
    let intercept = fx.start(&options);
    let held = OpenOptions::new()
        .read(true)
        .write(true)
        .open(intercept.file_path())
        .expect("open served file");
    held.write_all_at(b"before stop", 0).expect("write");
    let started = Instant::now();
    let err = intercept.stop().expect_err("the file is still open");
    assert!(matches!(err, InterceptError::ForcedUnmount { .. }), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "stop did not hang"
    );
    assert!(
        mounts::top_mount(&fx.disk.mountpoint.canonicalize().expect("canonical"))
            .expect("mountinfo")
            .is_none(),
        "the mount is gone from the namespace"
    );
    assert!(
        held.write_all_at(b"after stop", 0).is_err(),
        "I/O on the aborted file fails"
    );
    drop(held);
    // The acknowledged write is in the journal.
    assert!(fx.records() == [(0, b"before stop".to_vec())]);
    println!("{test}: {err}");
}

/// Throughput of the same fio job on a raw loop device over the backing file, on a
/// loop device over the intercept's file uncaptured (FUSE passthrough) and captured.
#[test]
#[ignore = "throughput figures: cargo test -p boomerang-agent --release intercept_throughput -- --ignored --nocapture"]
fn intercept_throughput() {
    if !gate("intercept_throughput", &["fio"]) {
        return;
    }
    let runs = 3;
    let threads = std::env::var("BOOMERANG_INTERCEPT_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(1);
    // `BOOMERANG_LOOP_DIO=on`: loop devices do direct I/O on the file they use.
    let loop_dio = format!(
        "--direct-io={}",
        std::env::var("BOOMERANG_LOOP_DIO").unwrap_or_else(|_| "off".into())
    );
    let jobs: [(&str, &[&str], u64); 2] = [
        (
            "seq-write bs=1M psync qd1",
            &["--rw=write", "--bs=1M", "--ioengine=psync", "--iodepth=1"],
            512 * MIB,
        ),
        (
            "rand-write bs=4k libaio qd16",
            &[
                "--rw=randwrite",
                "--bs=4k",
                "--ioengine=libaio",
                "--iodepth=16",
            ],
            128 * MIB,
        ),
    ];
    let options = InterceptOptions {
        threads,
        ..InterceptOptions::default()
    };
    for (name, args, bytes) in jobs {
        let mut results = Vec::new();
        for target in ["raw loop", "FUSE passthrough", "intercept (captured)"] {
            let mut speeds = Vec::new();
            for _ in 0..runs {
                // Fresh backing and journal each run: same starting point, no Full.
                let fx = Fixture::new(1024 * MIB, 2 * bytes + 64 * MIB);
                let intercept = match target {
                    "raw loop" => None,
                    "FUSE passthrough" => {
                        Some(Intercept::start_uncaptured(&fx.disk, &options).expect("start"))
                    }
                    _ => Some(
                        Intercept::start(&fx.disk, Arc::clone(&fx.capture), &options)
                            .expect("start"),
                    ),
                };
                let file = intercept
                    .as_ref()
                    .map_or(fx.disk.backing.clone(), |i| i.file_path().to_path_buf());
                let lo = LoopDev::attach_with(&file, &[loop_dio.as_str()]);
                let size = format!("--size={bytes}");
                let filename = format!("--filename={}", lo.dev);
                let mut fio_args = vec![
                    "--name=w",
                    filename.as_str(),
                    size.as_str(),
                    "--direct=1",
                    "--end_fsync=1",
                    "--output-format=terse",
                ];
                fio_args.extend_from_slice(args);
                let t = Instant::now();
                run("fio", &fio_args);
                let secs = t.elapsed().as_secs_f64();
                speeds.push(bytes as f64 / secs / 1e6);
                drop(lo);
                if let Some(i) = intercept {
                    i.stop().expect("stop");
                }
            }
            speeds.sort_by(f64::total_cmp);
            results.push((target, speeds[speeds.len() / 2], speeds));
        }
        for (target, median, speeds) in results {
            println!(
                "THROUGHPUT {name} [{target}, threads={threads}, loop {loop_dio}]: median {median:.0} MB/s (runs {:?})",
                speeds.iter().map(|s| s.round()).collect::<Vec<_>>()
            );
        }
    }
}
