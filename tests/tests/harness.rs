//! Self-tests of the privileged half of the test harness on a real loop device: if
//! these fail, a failing replication test says nothing about Boomerang.
//!
//! Run for real with `BOOMERANG_PRIVILEGED_TESTS=1 cargo test -p boomerang-tests --test
//! harness` as root; without privileges they print `SKIPPED` and return.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use boomerang_tests::tree::content_hash;
use boomerang_tests::{
    assert_trees_equal, e2fsck_clean, hash_tree, mkfs_ext4, require_privileged, scratch_dir,
    write_tree, LoopDevice, Mount, Need,
};

const MIB: u64 = 1 << 20;
const ALL_NEEDS: &[Need] = &[
    Need::Root,
    Need::LoopDevices,
    Need::Ext4Tools,
    Need::Fsfreeze,
];

fn sparse_image(path: &Path, size: u64) {
    File::create(path)
        .and_then(|f| f.set_len(size))
        .unwrap_or_else(|e| panic!("create sparse image {}: {e}", path.display()));
}

/// Writes `name` under `dir` from another thread; the receiver gets `()` once done.
fn write_in_background(
    dir: &Path,
    name: &str,
    data: &'static [u8],
) -> (mpsc::Receiver<()>, thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let path: PathBuf = dir.join(name);
    let handle = thread::spawn(move || {
        std::fs::write(&path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        let _ = tx.send(());
    });
    (rx, handle)
}

#[test]
fn loop_ext4_tree_freeze_fsck_roundtrip() {
    if !require_privileged("loop_ext4_tree_freeze_fsck_roundtrip", ALL_NEEDS) {
        return;
    }
    let scratch = scratch_dir("harness-loop");
    let image = scratch.path().join("disk.img");
    let mnt = scratch.path().join("mnt");
    sparse_image(&image, 64 * MIB);

    let dev = LoopDevice::attach(&image);
    mkfs_ext4(dev.path());
    e2fsck_clean(dev.path()).expect("a fresh filesystem is clean");

    let payload: &'static [u8] = b"written while frozen, landed after thaw\n";
    let mount = Mount::new(dev.path(), &mnt, false);
    let mut expected = write_tree(mount.dir(), 1, 8 * MIB);
    assert!(
        expected.len() > 5,
        "write_tree wrote only {} files",
        expected.len()
    );
    assert_trees_equal(&expected, &hash_tree(mount.dir()));

    // While frozen, a writer blocks; thawing lets it finish.
    let frozen = mount.freeze();
    let (done, writer) = write_in_background(mount.dir(), "during-freeze.txt", payload);
    assert!(
        done.recv_timeout(Duration::from_millis(500)).is_err(),
        "a write completed on a frozen filesystem: fsfreeze did not freeze"
    );
    frozen.thaw();
    done.recv_timeout(Duration::from_secs(30))
        .expect("the blocked write completes after thaw");
    writer.join().expect("writer thread");
    expected.insert(
        PathBuf::from("during-freeze.txt"),
        content_hash(&mut &payload[..]).expect("hash memory"),
    );
    mount.unmount();

    e2fsck_clean(dev.path()).expect("filesystem clean after unmount");

    // Read-only remount sees exactly what was written.
    let ro = Mount::new(dev.path(), &mnt, true);
    assert_trees_equal(&expected, &hash_tree(ro.dir()));
    ro.unmount();
    dev.detach();

    // The backing file itself now holds the clean filesystem.
    e2fsck_clean(&image).expect("image file clean after detach");
}

#[test]
fn guards_undo_freeze_mount_and_loop_when_a_test_panics() {
    if !require_privileged(
        "guards_undo_freeze_mount_and_loop_when_a_test_panics",
        ALL_NEEDS,
    ) {
        return;
    }
    let scratch = scratch_dir("harness-unwind");
    let image = scratch.path().join("disk.img");
    let mnt = scratch.path().join("mnt");
    sparse_image(&image, 32 * MIB);
    let setup = LoopDevice::attach(&image);
    mkfs_ext4(setup.path());
    setup.detach();

    // Panic while frozen and mounted: unwinding must thaw, unmount and detach.
    let (image_in, mnt_in) = (image.clone(), mnt.clone());
    let unwound = std::panic::catch_unwind(move || {
        let dev = LoopDevice::attach(&image_in);
        let mount = Mount::new(dev.path(), &mnt_in, false);
        let _frozen = mount.freeze();
        panic!("deliberate panic while {} is frozen", dev.path().display());
    });
    assert!(unwound.is_err(), "the closure panics");

    // Not frozen and not mounted any more: a write into the (plain) mount-point
    // directory completes at once, and the image is free to attach and check.
    let (done, writer) = write_in_background(&mnt, "after-unwind.txt", b"x");
    done.recv_timeout(Duration::from_secs(10))
        .expect("write after the unwind did not block: the filesystem was thawed");
    writer.join().expect("writer thread");
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("read /proc/self/mounts");
    let mnt_str = mnt.to_string_lossy();
    assert!(
        !mounts
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(&*mnt_str)),
        "{mnt_str} is still mounted after the unwind"
    );
    let dev = LoopDevice::attach(&image);
    e2fsck_clean(dev.path()).expect("filesystem clean after an unwound freeze");
}
