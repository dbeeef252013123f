//! The power-cut file system ([`boomerang_tests::powercut`]) held to the rules its
//! module doc draws: unsynced data and (Strict) unsynced directory changes are gone
//! after a cut, what fsync and fsyncdir covered survives, handles from before a cut
//! fail with `EIO`, `KeepSome` is a pure function of its seed, and programs nobody
//! here wrote (`dd`, `cp`, `sync`, `sha256sum`) work on the mount.
//!
//! Privileged: needs root and `/dev/fuse`. Without them each test prints `SKIPPED`
//! and returns; with `BOOMERANG_PRIVILEGED_TESTS=1` a missing prerequisite fails. Run:
//! `BOOMERANG_PRIVILEGED_TESTS=1 cargo test -p boomerang-tests --test powercut_fs`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use boomerang_tests::powercut::{CutReport, Namespace, Unsynced};
use boomerang_tests::privileged::tool;
use boomerang_tests::rng::DataRng;
use boomerang_tests::{
    require_power_cut, run_ok, scratch_dir, sha256_file, CutMode, PowerCutFs, PowerCutOptions,
};
use tempfile::TempDir;

/// A mounted power-cut fs over a scratch directory. `fs` is declared first so it
/// unmounts before the scratch directory is removed.
struct Rig {
    fs: PowerCutFs,
    scratch: TempDir,
}

impl Rig {
    /// `None` (after printing why) when the test must skip.
    fn new(test: &str, namespace: Namespace) -> Option<Rig> {
        if !require_power_cut(test) {
            return None;
        }
        let scratch = scratch_dir(test);
        let fs = PowerCutFs::mount(
            &scratch.path().join("backing"),
            &scratch.path().join("mnt"),
            PowerCutOptions { namespace },
        )
        .unwrap_or_else(|e| panic!("{test}: mount: {e:#}"));
        assert!(fs.usable(), "{test}: fresh mount not usable");
        Some(Rig { fs, scratch })
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.fs.path(rel)
    }

    fn cut(&self, mode: CutMode) -> CutReport {
        self.fs
            .cut(mode)
            .unwrap_or_else(|e| panic!("cut {mode:?}: {e:#}"))
    }
}

fn fsync_dir(dir: &Path) {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .unwrap_or_else(|e| panic!("fsync directory {}: {e}", dir.display()));
}

fn parent(path: &Path) -> &Path {
    path.parent().expect("test paths have a parent")
}

/// Creates or replaces `path` in place with `data`, fsyncs it, then its directory.
fn write_durable(path: &Path, data: &[u8]) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .unwrap_or_else(|e| panic!("write+fsync {}: {e}", path.display()));
    drop(f);
    fsync_dir(parent(path));
}

/// Replaces `path` like `durable::write_atomic`: temp file, fsync, rename over, and
/// the directory fsync only when `sync_dir`.
fn replace_atomically(path: &Path, data: &[u8], sync_dir: bool) {
    let tmp = parent(path).join(".tmp-replace");
    let mut f = File::create(&tmp).unwrap_or_else(|e| panic!("create {}: {e}", tmp.display()));
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .unwrap_or_else(|e| panic!("write+fsync {}: {e}", tmp.display()));
    drop(f);
    fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename over {}: {e}", path.display()));
    if sync_dir {
        fsync_dir(parent(path));
    }
}

fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn exists(path: &Path) -> bool {
    match fs::symlink_metadata(path) {
        Ok(_) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => panic!("stat {}: {e}", path.display()),
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .map(|e| {
            e.unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

fn assert_eio<T: std::fmt::Debug>(what: &str, res: io::Result<T>) {
    match res {
        Err(e) if e.raw_os_error() == Some(libc::EIO) => {}
        other => panic!("{what} on a handle from before the cut: want EIO, got {other:?}"),
    }
}

fn assert_errno<T: std::fmt::Debug>(what: &str, res: io::Result<T>, errno: i32) {
    match res {
        Err(e) if e.raw_os_error() == Some(errno) => {}
        other => panic!("{what}: want errno {errno}, got {other:?}"),
    }
}

#[test]
fn unsynced_writes_are_dropped_strict() {
    let Some(rig) = Rig::new("unsynced_writes_are_dropped_strict", Namespace::Strict) else {
        return;
    };
    let state = rig.p("state");
    write_durable(&state, b"durable v1");
    // In place, longer, never fsynced.
    fs::write(&state, b"unsynced v2, longer than v1").expect("overwrite state");
    // A new file whose data is fsynced but whose directory never is.
    let fresh = rig.p("fresh");
    let mut f = File::create(&fresh).expect("create fresh");
    f.write_all(b"fresh data").expect("write fresh");
    f.sync_all().expect("fsync fresh");
    drop(f);

    assert_eq!(
        read(&state),
        b"unsynced v2, longer than v1",
        "reads see unsynced bytes"
    );
    let pending = rig.fs.unsynced();
    assert_eq!(
        (pending.files, pending.bytes, pending.dirty_dirs),
        (1, 27, 1),
        "{pending:?}"
    );

    let report = rig.cut(CutMode::DropAll);
    assert_eq!(
        (report.extents_dropped, report.extents_kept),
        (1, 0),
        "{report:?}"
    );
    assert_eq!(report.dirs_reverted, 1, "{report:?}");
    assert_eq!(
        read(&state),
        b"durable v1",
        "the overwrite was never fsynced"
    );
    assert!(!exists(&fresh), "fresh's directory was never fsynced");
    assert_eq!(names(rig.fs.mountpoint()), ["state"]);
    assert_eq!(read(&rig.fs.data_dir().join("state")), b"durable v1");
    assert_eq!(rig.fs.unsynced(), Unsynced::default());
}

#[test]
fn unsynced_writes_are_dropped_lenient() {
    let Some(rig) = Rig::new("unsynced_writes_are_dropped_lenient", Namespace::Lenient) else {
        return;
    };
    let state = rig.p("state");
    write_durable(&state, b"durable v1");
    fs::write(&state, b"unsynced v2").expect("overwrite state");
    let fresh = rig.p("fresh");
    let mut f = File::create(&fresh).expect("create fresh");
    f.write_all(b"fresh data").expect("write fresh");
    f.sync_data().expect("fdatasync fresh");
    drop(f);
    fs::write(rig.p("never-synced"), b"lost").expect("write never-synced");
    assert_eq!(
        rig.fs.unsynced().dirty_dirs,
        0,
        "Lenient tracks no directories"
    );

    rig.cut(CutMode::DropAll);
    assert_eq!(read(&state), b"durable v1");
    // Lenient: names are durable at once, data only through fsync.
    assert_eq!(read(&fresh), b"fresh data");
    assert_eq!(read(&rig.p("never-synced")), b"", "a name without data");
    assert_eq!(
        names(rig.fs.mountpoint()),
        ["fresh", "never-synced", "state"]
    );
}

#[test]
fn fsynced_data_and_directories_survive() {
    let Some(rig) = Rig::new("fsynced_data_and_directories_survive", Namespace::Strict) else {
        return;
    };
    let db = rig.p("db");
    fs::create_dir(&db).expect("mkdir db");
    fsync_dir(rig.fs.mountpoint());

    // A log with a sparse record far past its end, fdatasync'ed.
    let log_path = db.join("log");
    let log = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&log_path)
        .expect("create log");
    log.write_all_at(b"record-1;", 0).expect("write 1");
    log.write_all_at(b"record-2;", 9).expect("write 2");
    log.write_all_at(b"far", 1 << 20).expect("sparse write");
    log.sync_data().expect("fdatasync log");
    // After the fsync: never made durable.
    log.write_all_at(b"record-3;", 18).expect("write 3");
    drop(log);

    // A truncate made durable.
    let cut_path = db.join("truncated");
    let mut rng = DataRng::new(5);
    let mut content = vec![0u8; 8192];
    rng.fill(&mut content);
    write_durable(&cut_path, &content);
    let t = OpenOptions::new()
        .write(true)
        .open(&cut_path)
        .expect("open truncated");
    t.set_len(1000).expect("truncate");
    t.sync_all().expect("fsync truncated");
    drop(t);
    fsync_dir(&db);

    let report = rig.cut(CutMode::DropAll);
    assert_eq!(
        report.dirs_reverted, 0,
        "every directory was synced: {report:?}"
    );
    assert_eq!(
        report.bytes_dropped, 9,
        "only record-3 was pending: {report:?}"
    );

    let log = read(&log_path);
    assert_eq!(log.len(), (1 << 20) + 3);
    assert_eq!(&log[..18], b"record-1;record-2;");
    assert!(
        log[18..1 << 20].iter().all(|b| *b == 0),
        "the hole reads as zeros"
    );
    assert_eq!(&log[1 << 20..], b"far");
    assert_eq!(read(&cut_path), &content[..1000]);
}

#[test]
fn rename_and_unlink_are_durable_only_with_their_directory() {
    let Some(rig) = Rig::new(
        "rename_and_unlink_are_durable_only_with_their_directory",
        Namespace::Strict,
    ) else {
        return;
    };
    let config = rig.p("config");
    write_durable(&config, b"config v1");
    write_durable(&rig.p("victim"), b"victim's durable bytes");
    fs::create_dir(rig.p("sub")).expect("mkdir sub");
    fsync_dir(rig.fs.mountpoint());
    write_durable(&rig.p("sub/gone"), b"unlinked and synced");

    // The full protocol survives.
    replace_atomically(&config, b"config v2", true);
    rig.cut(CutMode::DropAll);
    assert_eq!(read(&config), b"config v2");
    assert!(!exists(&rig.p(".tmp-replace")));

    // Everything below skips the fsync of the root directory.
    replace_atomically(&config, b"config v3", false);
    fs::write(rig.p("victim"), b"overwritten, unsynced").expect("overwrite victim");
    fs::remove_file(rig.p("victim")).expect("unlink victim");
    fs::create_dir(rig.p("newdir")).expect("mkdir newdir");
    write_durable(&rig.p("newdir/inside"), b"synced inside an unsynced dir");
    // ... but sub's own change is synced.
    fs::remove_file(rig.p("sub/gone")).expect("unlink sub/gone");
    fsync_dir(&rig.p("sub"));
    assert_eq!(read(&config), b"config v3");
    assert_eq!(names(rig.fs.mountpoint()), ["config", "newdir", "sub"]);

    let report = rig.cut(CutMode::DropAll);
    assert!(report.dirs_reverted >= 1, "{report:?}");
    assert_eq!(read(&config), b"config v2", "the rename was reverted");
    assert_eq!(
        read(&rig.p("victim")),
        b"victim's durable bytes",
        "the unlinked file is back, with its durable content"
    );
    assert!(
        !exists(&rig.p("newdir")),
        "mkdir without fsync of the parent"
    );
    assert!(
        !exists(&rig.p("sub/gone")),
        "unlink + fsync of its directory"
    );
    assert_eq!(names(rig.fs.mountpoint()), ["config", "sub", "victim"]);
    // The private copies are gone once the cut has settled them.
    assert!(names(&rig.scratch.path().join("backing/.powercut/objects")).is_empty());
}

#[test]
fn cross_directory_rename_needs_both_directories() {
    let Some(rig) = Rig::new(
        "cross_directory_rename_needs_both_directories",
        Namespace::Strict,
    ) else {
        return;
    };
    for d in ["a", "b"] {
        fs::create_dir(rig.p(d)).expect("mkdir");
    }
    fsync_dir(rig.fs.mountpoint());
    write_durable(&rig.p("a/x"), b"x");
    write_durable(&rig.p("a/y"), b"y");

    fs::rename(rig.p("a/x"), rig.p("b/x")).expect("rename x");
    fsync_dir(&rig.p("b"));
    fs::rename(rig.p("a/y"), rig.p("b/y")).expect("rename y");
    fsync_dir(&rig.p("b"));
    fsync_dir(&rig.p("a"));
    // x and y moved with both directories synced since. z moves with only its new
    // directory synced: it keeps both names.
    fs::create_dir(rig.p("c")).expect("mkdir c");
    fsync_dir(rig.fs.mountpoint());
    write_durable(&rig.p("b/z"), b"z");
    fs::rename(rig.p("b/z"), rig.p("c/z")).expect("rename z");
    fsync_dir(&rig.p("c"));

    rig.cut(CutMode::DropAll);
    assert!(names(&rig.p("a")).is_empty());
    assert_eq!(
        names(&rig.p("b")),
        ["x", "y", "z"],
        "b was not synced after z left"
    );
    assert_eq!(names(&rig.p("c")), ["z"], "c was synced after z arrived");
    assert_eq!(read(&rig.p("b/z")), b"z");
    assert_eq!(read(&rig.p("c/z")), b"z");
}

#[test]
fn handles_from_before_a_cut_fail_with_eio() {
    let Some(rig) = Rig::new("handles_from_before_a_cut_fail_with_eio", Namespace::Strict) else {
        return;
    };
    let path = rig.p("f");
    write_durable(&path, b"before the cut");
    let old = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open before");
    old.write_all_at(b"BEFORE", 0)
        .expect("write before the cut");
    let old_dir = File::open(rig.fs.mountpoint()).expect("open dir before");
    let mut old_listing = fs::read_dir(rig.fs.mountpoint()).expect("opendir before");
    assert_eq!(rig.fs.generation(), 0);

    rig.cut(CutMode::DropAll);
    assert_eq!(rig.fs.generation(), 1);
    assert!(rig.fs.usable(), "the fs serves on after a cut");

    let mut buf = [0u8; 4];
    assert_eio("read", old.read_at(&mut buf, 0));
    assert_eio("write", old.write_at(b"x", 0));
    assert_eio("fsync", old.sync_all());
    assert_eio("fdatasync", old.sync_data());
    assert_eio("ftruncate", old.set_len(1));
    assert_eio("fsync of a directory", old_dir.sync_all());
    match old_listing.next() {
        Some(Err(e)) if e.raw_os_error() == Some(libc::EIO) => {}
        other => panic!("readdir on a stream from before the cut: want EIO, got {other:?}"),
    }
    drop((old, old_dir, old_listing));

    // New opens see what survived and work as usual.
    assert_eq!(read(&path), b"before the cut");
    let new = OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open after");
    new.write_all_at(b"after!", 0).expect("write after");
    new.sync_all().expect("fsync after");
    drop(new);
    rig.cut(CutMode::DropAll);
    assert_eq!(rig.fs.generation(), 2);
    assert_eq!(read(&path), b"after! the cut");
}

/// One KeepSome run: 64 unsynced block writes over a durable file, then a cut; which
/// blocks survived.
fn keep_some_run(test: &str, seed: u64) -> Option<(CutReport, Vec<bool>)> {
    const BLOCK: usize = 4096;
    const BLOCKS: usize = 64;
    let rig = Rig::new(test, Namespace::Lenient)?;
    let path = rig.p("blocks");
    write_durable(&path, &vec![0xEE; BLOCK * BLOCKS]);
    let f = OpenOptions::new().write(true).open(&path).expect("open");
    for i in 0..BLOCKS {
        let fill = u8::try_from(i).expect("64 blocks");
        f.write_all_at(&[fill; BLOCK], (i * BLOCK) as u64)
            .expect("block write");
    }
    drop(f);
    let report = rig.cut(CutMode::KeepSome { seed });
    let data = read(&path);
    assert_eq!(data.len(), BLOCK * BLOCKS);
    let kept = data
        .chunks(BLOCK)
        .enumerate()
        .map(|(i, block)| {
            let fill = u8::try_from(i).expect("64 blocks");
            if block.iter().all(|b| *b == fill) {
                true
            } else {
                assert!(
                    block.iter().all(|b| *b == 0xEE),
                    "block {i} is neither old nor new: a write was torn inside"
                );
                false
            }
        })
        .collect();
    Some((report, kept))
}

#[test]
fn keep_some_is_deterministic_per_seed() {
    let test = "keep_some_is_deterministic_per_seed";
    let Some((first, kept)) = keep_some_run(test, 7) else {
        return;
    };
    let Some((again, kept_again)) = keep_some_run(test, 7) else {
        return;
    };
    assert_eq!(first, again, "same seed, same history: same report");
    assert_eq!(kept, kept_again, "same seed, same history: same blocks");
    let survivors = kept.iter().filter(|k| **k).count();
    assert_eq!(first.seed, Some(7));
    assert_eq!(first.extents_kept, survivors, "{first:?}");
    assert_eq!(first.extents_kept + first.extents_dropped, 64, "{first:?}");
    assert!(
        survivors > 0 && survivors < 64,
        "seed 7 should keep some and drop some, kept {survivors}"
    );
    let Some((_, other)) = keep_some_run(test, 8) else {
        return;
    };
    assert_ne!(kept, other, "another seed keeps other blocks");
}

#[test]
fn real_programs_work_on_the_mount() {
    let Some(rig) = Rig::new("real_programs_work_on_the_mount", Namespace::Strict) else {
        return;
    };
    let src = rig.scratch.path().join("src.bin");
    let mut data = vec![0u8; (1 << 20) + 123];
    DataRng::new(42).fill(&mut data);
    fs::write(&src, &data).expect("write source");
    let want = sha256_file(&src);

    let dd = rig.p("dd.bin");
    run_ok(
        Command::new(tool("dd"))
            .arg(format!("if={}", src.display()))
            .arg(format!("of={}", dd.display()))
            .args(["bs=64k", "conv=fsync", "status=none"]),
    );
    let copy = rig.p("copy.bin");
    run_ok(Command::new(tool("cp")).arg(&src).arg(&copy));
    assert_eq!(sha256_file(&dd), want);
    assert_eq!(sha256_file(&copy), want, "reads see cp's unsynced data");
    assert!(
        rig.fs.unsynced().bytes >= data.len() as u64,
        "cp did not fsync"
    );
    // `sync DIR` fsyncs the directory: both names become durable, cp's data not.
    run_ok(Command::new(tool("sync")).arg(rig.fs.mountpoint()));
    assert_eq!(rig.fs.unsynced().dirty_dirs, 0);

    rig.cut(CutMode::DropAll);
    assert_eq!(
        sha256_file(&dd),
        want,
        "dd conv=fsync made its data durable"
    );
    assert_eq!(
        fs::metadata(&copy).expect("copy's name is durable").len(),
        0,
        "cp never fsynced: the name survives with no data"
    );
    run_ok(Command::new(tool("cp")).arg(&dd).arg(&copy));
    assert_eq!(sha256_file(&copy), want, "cp from the mount to the mount");
}

#[test]
fn fault_hooks_fail_an_fsync_and_fill_the_disk() {
    let Some(rig) = Rig::new(
        "fault_hooks_fail_an_fsync_and_fill_the_disk",
        Namespace::Lenient,
    ) else {
        return;
    };
    let journal = rig.p("journal");
    write_durable(&journal, b"v1");
    let f = OpenOptions::new().write(true).open(&journal).expect("open");
    f.write_all_at(b"v2", 0).expect("write v2");
    rig.fs.fail_next_fsync("journal");
    assert_errno("injected fsync failure", f.sync_all(), libc::EIO);
    // Like Linux after a writeback error: the retry succeeds, the data is gone.
    f.sync_all().expect("second fsync");
    assert_eq!(read(&journal), b"v1");
    drop(f);

    rig.fs.set_full(true);
    assert_errno(
        "create on a full disk",
        File::create(rig.p("new")),
        libc::ENOSPC,
    );
    let f = OpenOptions::new().write(true).open(&journal).expect("open");
    assert_errno("write on a full disk", f.write_at(b"v3", 0), libc::ENOSPC);
    rig.fs.set_full(false);
    f.write_all_at(b"v3", 0).expect("write once space is back");
    f.sync_all().expect("fsync v3");
    drop(f);
    rig.cut(CutMode::DropAll);
    assert_eq!(read(&journal), b"v3");
}

/// Boomerang's own `durable` module, as its daemons use it: whatever it acknowledged
/// survives every kind of cut, and its directory lock works again afterwards.
#[test]
fn boomerang_durable_files_keep_what_they_acknowledge() {
    use boomerang_common::durable::{create_dir_durable, lock_dir, write_atomic, StateFile};
    let Some(rig) = Rig::new(
        "boomerang_durable_files_keep_what_they_acknowledge",
        Namespace::Strict,
    ) else {
        return;
    };
    let dir = rig.p("state/agent");
    create_dir_durable(&dir).expect("create state dir");
    let lock = lock_dir(&dir, "test daemon").expect("lock");
    let config = dir.join("config.json");
    write_atomic(&config, br#"{"v":1}"#, 0o600).expect("write_atomic");
    let seq_path = dir.join("seq");
    let mut seq = StateFile::open_or_create(&seq_path, 0u64).expect("state file");
    for v in 1..=5u64 {
        seq.store(v).expect("store");
    }
    // Work nobody acknowledged: a write and a temp file, no fsync.
    fs::write(dir.join("scratch"), b"unsynced").expect("write scratch");
    drop((seq, lock));

    for (round, mode) in [
        CutMode::DropAll,
        CutMode::KeepSome { seed: 11 },
        CutMode::KeepSome { seed: 12 },
    ]
    .into_iter()
    .enumerate()
    {
        rig.cut(mode);
        let acked = 5 + round as u64;
        let _lock = lock_dir(&dir, "test daemon").expect("lock after the cut");
        assert_eq!(read(&config), br#"{"v":1}"#, "after {mode:?}");
        let mode_bits = fs::metadata(&config).expect("stat config").permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode_bits) & 0o777,
            0o600
        );
        let mut seq = StateFile::<u64>::open(&seq_path).expect("reopen state file");
        assert_eq!(*seq.get(), acked, "after {mode:?}");
        seq.store(acked + 1).expect("store after the cut");
        // Unacknowledged again before the next cut.
        fs::write(dir.join("scratch"), b"unsynced again").expect("write scratch");
    }
}

/// What else a daemon's state directory needs: a Unix socket (the master target's
/// control socket), symlinks, modes and times, O_APPEND, hole punching, renameat2.
#[test]
fn sockets_links_metadata_append_and_holes() {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::time::{Duration, UNIX_EPOCH};

    let Some(rig) = Rig::new("sockets_links_metadata_append_and_holes", Namespace::Strict) else {
        return;
    };
    let sock = rig.p("control.sock");
    let listener = UnixListener::bind(&sock).expect("bind a socket on the mount");
    let mut client = UnixStream::connect(&sock).expect("connect");
    let (mut server, _) = listener.accept().expect("accept");
    client.write_all(b"ping").expect("send");
    let mut got = [0u8; 4];
    server.read_exact(&mut got).expect("receive");
    assert_eq!(&got, b"ping");

    std::os::unix::fs::symlink("config.json", rig.p("current")).expect("symlink");
    assert_eq!(
        fs::read_link(rig.p("current")).expect("readlink"),
        Path::new("config.json")
    );

    let file = rig.p("f");
    write_durable(&file, &[b'x'; 3 * 4096]);
    fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).expect("chmod");
    let when = UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    File::options()
        .write(true)
        .open(&file)
        .and_then(|f| f.set_modified(when))
        .expect("set mtime");
    let md = fs::metadata(&file).expect("stat");
    assert_eq!(md.permissions().mode() & 0o777, 0o640);
    assert_eq!(md.modified().expect("mtime"), when);

    // A durable hole in the middle, then an unsynced one at the start.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .expect("open f");
    let punch = |offset: i64| {
        // SAFETY: fallocate on a descriptor `f` owns; no memory of ours is involved.
        let rc = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                4096,
            )
        };
        assert_eq!(rc, 0, "punch at {offset}: {}", io::Error::last_os_error());
    };
    punch(4096);
    f.sync_all().expect("fsync the hole");
    punch(0);
    // SAFETY: as above.
    let collapse =
        unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_COLLAPSE_RANGE, 0, 4096) };
    assert_eq!(
        (collapse, io::Error::last_os_error().raw_os_error()),
        (-1, Some(libc::EOPNOTSUPP))
    );
    drop(f);

    // Two appenders interleave whole records.
    let log = rig.p("append.log");
    let a = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .expect("open a");
    let b = OpenOptions::new().append(true).open(&log).expect("open b");
    for i in 0..3 {
        (&a).write_all(format!("a{i};").as_bytes())
            .expect("append a");
        (&b).write_all(format!("b{i};").as_bytes())
            .expect("append b");
    }
    a.sync_all().expect("fsync log");
    drop((a, b));
    assert_eq!(read(&log), b"a0;b0;a1;b1;a2;b2;");

    // RENAME_NOREPLACE refuses to replace.
    let c_from = std::ffi::CString::new(rig.p("append.log").into_os_string().into_encoded_bytes())
        .expect("path");
    let c_to =
        std::ffi::CString::new(file.clone().into_os_string().into_encoded_bytes()).expect("path");
    // SAFETY: two NUL-terminated paths alive for the call, which only reads them.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c_from.as_ptr(),
            libc::AT_FDCWD,
            c_to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    assert_eq!(
        (rc, io::Error::last_os_error().raw_os_error()),
        (-1, Some(libc::EEXIST))
    );

    fsync_dir(rig.fs.mountpoint());
    drop((client, server, listener));
    rig.cut(CutMode::DropAll);
    let data = read(&file);
    assert_eq!(data.len(), 3 * 4096);
    assert!(
        data[..4096].iter().all(|b| *b == b'x'),
        "the unsynced punch is gone"
    );
    assert!(
        data[4096..8192].iter().all(|b| *b == 0),
        "the synced punch stays"
    );
    assert!(data[8192..].iter().all(|b| *b == b'x'));
    assert_eq!(read(&log), b"a0;b0;a1;b1;a2;b2;");
    assert!(fs::symlink_metadata(rig.p("current"))
        .expect("link")
        .is_symlink());
    assert!(
        exists(&sock),
        "the socket's name was synced with its directory"
    );
    let stat = run_ok(
        Command::new(tool("stat"))
            .args(["-f", "-c", "%b"])
            .arg(rig.fs.mountpoint()),
    );
    assert!(
        stat.trim().parse::<u64>().expect("block count") > 0,
        "statfs: {stat}"
    );
}

/// A mount still in use when the guard goes is detached, not leaked; open files keep
/// working until they are closed.
#[test]
fn a_busy_mount_is_detached_on_unmount() {
    use boomerang_tests::loopdev::is_mount_point;
    let Some(Rig {
        fs: powercut,
        scratch,
    }) = Rig::new("a_busy_mount_is_detached_on_unmount", Namespace::Strict)
    else {
        return;
    };
    let mountpoint = powercut.mountpoint().to_path_buf();
    let path = powercut.path("held");
    write_durable(&path, b"held open");
    let held = File::open(&path).expect("open");
    let err = powercut
        .unmount()
        .expect_err("unmount must report the mount was busy");
    assert!(format!("{err:#}").contains("lazy unmount: done"), "{err:#}");
    assert!(!is_mount_point(&mountpoint), "the busy mount was detached");
    let mut buf = [0u8; 9];
    held.read_at(&mut buf, 0).expect("an open file still reads");
    assert_eq!(&buf, b"held open");
    drop(held);
    drop(scratch);
}

/// The flow the fs is for: a writer in another process acknowledges records only after
/// `dd conv=fsync` and `sync DIR`; it is killed with SIGKILL mid-stream, the power is
/// cut with a random subset of the rest kept, and every acknowledged record is there
/// for the restarted writer.
#[test]
fn a_killed_writer_loses_nothing_it_acknowledged() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    let Some(rig) = Rig::new(
        "a_killed_writer_loses_nothing_it_acknowledged",
        Namespace::Strict,
    ) else {
        return;
    };
    let dir = rig.p("records");
    fs::create_dir(&dir).expect("mkdir records");
    fsync_dir(rig.fs.mountpoint());
    // Each round: a draft never fsynced (always pending), the record file and a log
    // line made durable, then the ack.
    let script = r#"
        cd "$1" || exit 1
        i=$2
        while :; do
            i=$((i + 1))
            printf 'draft %d\n' "$i" > draft || exit 1
            printf 'record %d\n' "$i" | dd of="r$i" conv=fsync status=none || exit 1
            sync . || exit 1
            printf 'log %d\n' "$i" | dd of=log oflag=append conv=notrunc,fsync status=none || exit 1
            echo "ack $i"
        done
    "#;
    let start_writer = |from: u64| {
        Command::new(tool("sh"))
            .args(["-c", script, "writer"])
            .arg(&dir)
            .arg(from.to_string())
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("start writer")
    };
    let mut writer = start_writer(0);
    let mut acks = BufReader::new(writer.stdout.take().expect("stdout"));
    let mut acked = 0u64;
    let mut line = String::new();
    while acked < 25 {
        line.clear();
        let n = acks.read_line(&mut line).expect("read ack");
        assert!(n > 0, "writer died after {acked} acks");
        acked = line
            .trim()
            .strip_prefix("ack ")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("unexpected writer output {line:?}"));
    }
    // kill -9 the whole group (sh and its dd or sync), mid-record.
    let pgid = libc::pid_t::try_from(writer.id()).expect("pid fits pid_t");
    // SAFETY: kill has no memory effects; -pgid names the group the writer leads.
    assert_eq!(unsafe { libc::kill(-pgid, libc::SIGKILL) }, 0);
    writer.wait().expect("reap writer");
    let deadline = Instant::now() + Duration::from_secs(10);
    // SAFETY: signal 0 only checks that some process of the group still exists.
    while unsafe { libc::kill(-pgid, 0) } == 0 {
        assert!(
            Instant::now() < deadline,
            "the writer's group outlived SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let pending = rig.fs.unsynced();
    assert!(
        pending.files >= 1,
        "the draft is never fsynced: {pending:?}"
    );
    let report = rig.cut(CutMode::KeepSome { seed: 2024 });
    for i in 1..=acked {
        assert_eq!(
            read(&dir.join(format!("r{i}"))),
            format!("record {i}\n").as_bytes(),
            "acknowledged record {i} of {acked} lost ({report:?})"
        );
    }
    let log = String::from_utf8(read(&dir.join("log"))).expect("log is text");
    let expected: String = (1..=acked).map(|i| format!("log {i}\n")).collect();
    assert!(
        log.starts_with(&expected),
        "acknowledged log lines lost: {log:?} ({report:?})"
    );
    // Its name was synced with the first record; its bytes never were: nothing, one
    // whole draft (each is a single write), or only its new size (zeros) may survive.
    let draft = read(&dir.join("draft"));
    let text = String::from_utf8_lossy(&draft);
    let draft_no = text
        .strip_prefix("draft ")
        .and_then(|d| d.strip_suffix('\n'))
        .and_then(|d| d.parse::<u64>().ok());
    assert!(
        draft.iter().all(|b| *b == 0) || draft_no.is_some_and(|n| n > acked),
        "draft after the cut: {text:?} ({report:?})"
    );

    // The restarted writer carries on from its last acknowledged record.
    let mut writer = start_writer(acked);
    let mut acks = BufReader::new(writer.stdout.take().expect("stdout"));
    line.clear();
    acks.read_line(&mut line).expect("read ack after restart");
    assert_eq!(line.trim(), format!("ack {}", acked + 1));
    let pgid = libc::pid_t::try_from(writer.id()).expect("pid fits pid_t");
    // SAFETY: as above.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    writer.wait().expect("reap writer");
    while unsafe { libc::kill(-pgid, 0) } == 0 {
        std::thread::sleep(Duration::from_millis(10));
    }
}
