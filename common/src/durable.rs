//! Durable small files: every fsync Boomerang relies on outside the logs
//! ([`crate::seglog`]) and the replicas happens here, and each says why. All IO goes
//! through [`crate::storage`], so failure points reach it.
//!
//! - [`write_atomic`]: whole-file replace (configs, certificates, manifests).
//! - [`StateFile`]: small state that changes often (a replica's durable seq, an
//!   agent's sync cursor), updated in place with one `fdatasync` per update.
//!
//! State file layout: two slots of [`SLOT_LEN`] bytes; an update writes the slot the
//! last good state is *not* in (the file is created with its state in slot 1, so the
//! first update goes to slot 0), so a torn write can only destroy the new state, never
//! the old one. A failed update may be retried: it rewrites the whole other slot.
//! ```text
//!  slot: magic "BMST" | version u16 | 0 u16 | counter u64 | len u32 | crc32 u32 | json
//! ```
//! The crc32 covers the counter, the length and the JSON. Reading takes the valid slot
//! with the higher counter ([`decode_slots`], with no IO).

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::storage;
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

/// Size of one state slot; a state's JSON must fit in it.
pub const SLOT_LEN: usize = 64 * 1024;
const SLOT_HEADER: usize = 24;
const STATE_MAGIC: [u8; 4] = *b"BMST";
const STATE_VERSION: u16 = 1;
/// Fault-injection scope of state files.
const STATE_SCOPE: &str = "state";
/// Fault-injection scope of atomic replaces.
const ATOMIC_SCOPE: &str = "atomic";
/// Fault-injection scope of directory creation and fsyncs.
const DIR_SCOPE: &str = "dir";

/// Errors of durable file operations, naming the file and the step.
#[derive(Debug, Error)]
pub enum DurableError {
    /// An IO step failed.
    #[error("{step} {path}: {source}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// Which file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Neither slot of a state file holds a valid state.
    #[error("state file {path} is damaged (no slot passes its checksum); restore it from backup or remove it to start over")]
    Damaged {
        /// Which file.
        path: PathBuf,
    },
    /// Another process holds the directory's lock.
    #[error("{path} is in use by another {what} (pid {holder}): stop it first, or give this one a directory of its own")]
    Locked {
        /// The directory.
        path: PathBuf,
        /// Which role.
        what: String,
        /// The holder's pid, as it wrote it.
        holder: String,
    },
    /// The state does not (de)serialise.
    #[error("state file {path}: {reason}")]
    Format {
        /// Which file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

fn io_err<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> DurableError + 'a {
    move |source| DurableError::Io {
        step,
        path: path.to_path_buf(),
        source,
    }
}

/// fsyncs a directory so that entries created, renamed or removed in it survive a crash.
pub fn fsync_dir(dir: &Path) -> Result<(), DurableError> {
    storage::fsync_dir(DIR_SCOPE, dir).map_err(io_err("fsync directory", dir))
}

/// Replaces `path` with `data` atomically and durably: write a temp file beside it,
/// fsync it (the data must be on disk before the name points at it), rename over
/// `path`, fsync the directory (so the rename itself survives a crash). `mode` sets
/// the permissions of the new file (0o600 for keys).
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), DurableError> {
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    static TEMP: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{name}.tmp.{}.{}",
        std::process::id(),
        TEMP.fetch_add(1, Ordering::Relaxed)
    ));
    // O_EXCL: never write through something planted at the temp name (a symlink).
    // A leftover of a crashed run with the same name is removed (unlinking a symlink
    // removes the link, not its target), once.
    let f = match storage::File::create_new(ATOMIC_SCOPE, &tmp, mode) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            storage::remove_file(ATOMIC_SCOPE, &tmp).map_err(io_err("remove stale", &tmp))?;
            storage::File::create_new(ATOMIC_SCOPE, &tmp, mode)
        }
        other => other,
    }
    .map_err(io_err("create", &tmp))?;
    let written = f
        .write_all_at(data, 0)
        .map_err(io_err("write", &tmp))
        // The data must be on disk before the name points at it.
        .and_then(|()| f.sync_all().map_err(io_err("fsync", &tmp)));
    drop(f);
    let renamed = written.and_then(|()| {
        storage::rename(ATOMIC_SCOPE, &tmp, path).map_err(io_err("rename into place", path))
    });
    if let Err(e) = renamed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // The rename itself survives a crash only once the directory is synced.
    fsync_dir(&dir)
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Creates `dir` and its parents if needed (mode 0700: they hold protected machines'
/// data), and fsyncs each parent so the new directories survive a crash.
pub fn create_dir_durable(dir: &Path) -> Result<(), DurableError> {
    storage::create_dir_all(DIR_SCOPE, dir).map_err(io_err("create directory", dir))
}

/// An exclusive lock on a state directory, held while this value lives: two daemons
/// (or agents) writing the same state would break every rule the state keeps. It is
/// an `flock` on `<dir>/lock`, so the kernel releases it when the process dies, also by
/// kill -9; the file holds the holder's pid for the error message.
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
}

/// Creates `dir` if needed and takes its lock, or says who holds it.
pub fn lock_dir(dir: &Path, what: &str) -> Result<DirLock, DurableError> {
    use std::io::{Read, Seek};
    use std::os::fd::AsRawFd;
    create_dir_durable(dir)?;
    let path = dir.join("lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(storage::FILE_MODE)
        .open(&path)
        .map_err(io_err("open", &path))?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(DurableError::Io {
                step: "lock",
                path,
                source: err,
            });
        }
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        return Err(DurableError::Locked {
            path: dir.to_path_buf(),
            what: what.to_string(),
            holder: holder.trim().chars().take(20).collect(),
        });
    }
    file.set_len(0).map_err(io_err("truncate", &path))?;
    file.rewind().map_err(io_err("rewind", &path))?;
    write!(file, "{}", std::process::id()).map_err(io_err("write", &path))?;
    Ok(DirLock { _file: file })
}

/// A small, often-updated state `T`, stored as JSON in a two-slot file (see the module
/// doc). One `fdatasync` per [`StateFile::store`].
#[derive(Debug)]
pub struct StateFile<T> {
    path: PathBuf,
    file: storage::File,
    counter: u64,
    /// The slot holding `value`; the next store writes the other one.
    slot: u64,
    value: T,
}

impl<T: Serialize + DeserializeOwned + Clone> StateFile<T> {
    /// Opens the state at `path`, or creates it holding `initial` when it does not
    /// exist yet.
    pub fn open_or_create(path: &Path, initial: T) -> Result<Self, DurableError> {
        if path.exists() {
            return Self::open(path);
        }
        let mut image = vec![0u8; 2 * SLOT_LEN];
        let slot = encode_slot(path, 1, &initial)?;
        // Slot 1, so that the first store goes to slot 0 and leaves this one intact.
        image[SLOT_LEN..SLOT_LEN + slot.len()].copy_from_slice(&slot);
        // write_atomic fsyncs the file and its directory: a crash leaves either no
        // state file or a complete one.
        write_atomic(path, &image, 0o600)?;
        Self::open(path)
    }

    /// Opens an existing state file; fails if neither slot is valid.
    pub fn open(path: &Path) -> Result<Self, DurableError> {
        let file =
            storage::File::open_rw(STATE_SCOPE, path).map_err(io_err("open state file", path))?;
        let mut image = vec![0u8; 2 * SLOT_LEN];
        let n = file
            .read_at_most(&mut image, 0)
            .map_err(io_err("read state file", path))?;
        let SlotState {
            value,
            slot,
            counter,
        } = decode_slots(&image[..n]).ok_or_else(|| DurableError::Damaged {
            path: path.to_path_buf(),
        })?;
        Ok(StateFile {
            path: path.to_path_buf(),
            file,
            counter,
            slot,
            value,
        })
    }

    /// The current state.
    pub fn get(&self) -> &T {
        &self.value
    }

    /// Writes `value` into the slot the current state is not in and fdatasyncs: when
    /// this returns, `value` survives a crash. On an error the current state is still
    /// the one on disk, and a retry is safe (it rewrites that whole slot).
    pub fn store(&mut self, value: T) -> Result<(), DurableError> {
        let counter = self.counter + 1;
        let slot = encode_slot(&self.path, counter, &value)?;
        let other = 1 - self.slot;
        let at = other * SLOT_LEN as u64;
        self.file
            .write_all_at(&slot, at)
            .map_err(io_err("write state file", &self.path))?;
        self.file
            .sync_data()
            .map_err(io_err("fdatasync state file", &self.path))?;
        self.counter = counter;
        self.slot = other;
        self.value = value;
        Ok(())
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn encode_slot<T: Serialize>(
    path: &Path,
    counter: u64,
    value: &T,
) -> Result<Vec<u8>, DurableError> {
    let json = serde_json::to_vec(value).map_err(|e| DurableError::Format {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if json.len() > SLOT_LEN - SLOT_HEADER {
        return Err(DurableError::Format {
            path: path.to_path_buf(),
            reason: format!(
                "state of {} bytes does not fit a {SLOT_LEN}-byte slot",
                json.len()
            ),
        });
    }
    let len = u32::try_from(json.len()).expect("fits in a slot");
    let mut crc = crc32fast::Hasher::new();
    crc.update(&counter.to_le_bytes());
    crc.update(&len.to_le_bytes());
    crc.update(&json);
    let mut out = Vec::with_capacity(SLOT_HEADER + json.len());
    out.extend_from_slice(&STATE_MAGIC);
    out.extend_from_slice(&STATE_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&counter.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// The state [`decode_slots`] found in a state file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotState<T> {
    /// The state.
    pub value: T,
    /// The slot it was in (0 or 1); the next store writes the other one.
    pub slot: u64,
    /// Its update counter (the higher of two valid slots is the newer state).
    pub counter: u64,
}

/// Decodes a state file's bytes, read from offset 0 (at most `2 * SLOT_LEN` are
/// looked at; a short image simply leaves a slot torn), with no IO: the valid slot
/// with the higher counter, slot 0 on a tie; `None` when neither slot is valid. A slot
/// is valid when its magic, version and crc32 hold and its JSON decodes as `T`.
/// [`StateFile::open`] reads the file and calls this; the fuzz target
/// `state_file_slots` calls it on arbitrary bytes.
pub fn decode_slots<T: DeserializeOwned>(image: &[u8]) -> Option<SlotState<T>> {
    let mut best: Option<SlotState<T>> = None;
    for (bytes, slot) in image.chunks(SLOT_LEN).zip(0..2u64) {
        if let Some((counter, value)) = decode_slot::<T>(bytes) {
            if best.as_ref().is_none_or(|b| counter > b.counter) {
                best = Some(SlotState {
                    value,
                    slot,
                    counter,
                });
            }
        }
    }
    best
}

fn decode_slot<T: DeserializeOwned>(buf: &[u8]) -> Option<(u64, T)> {
    if buf.len() < SLOT_HEADER || buf[0..4] != STATE_MAGIC {
        return None;
    }
    if u16::from_le_bytes([buf[4], buf[5]]) != STATE_VERSION {
        return None;
    }
    let counter = u64::from_le_bytes(buf[8..16].try_into().ok()?);
    let len = u32::from_le_bytes(buf[16..20].try_into().ok()?);
    let crc = u32::from_le_bytes(buf[20..24].try_into().ok()?);
    let json = buf.get(SLOT_HEADER..SLOT_HEADER + len as usize)?;
    let mut h = crc32fast::Hasher::new();
    h.update(&counter.to_le_bytes());
    h.update(&len.to_le_bytes());
    h.update(json);
    if h.finalize() != crc {
        return None;
    }
    serde_json::from_slice(json).ok().map(|v| (counter, v))
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_state_directory_has_one_holder_at_a_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let held = lock_dir(dir.path(), "master target").expect("first lock");
        let err = lock_dir(dir.path(), "master target").expect_err("second lock refused");
        let msg = err.to_string();
        assert!(
            msg.contains("in use by another master target")
                && msg.contains(&std::process::id().to_string()),
            "{msg}"
        );
        drop(held);
        lock_dir(dir.path(), "master target").expect("free again once released");
    }

    use super::*;
    use std::os::unix::fs::FileExt;

    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    struct S {
        seq: u64,
        name: String,
    }

    #[test]
    fn state_survives_reopen_and_a_torn_newest_slot() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("state");
        let mut st = StateFile::open_or_create(
            &path,
            S {
                seq: 0,
                name: "a".into(),
            },
        )?;
        for seq in 1..=5 {
            st.store(S {
                seq,
                name: "a".into(),
            })?;
        }
        drop(st);
        assert_eq!(StateFile::<S>::open(&path)?.get().seq, 5);
        // Tear the newest slot (counter 6 lives in slot 0): the older one (seq 4) wins.
        let f = OpenOptions::new().write(true).open(&path)?;
        f.write_all_at(b"garbage", 30)?;
        assert_eq!(StateFile::<S>::open(&path)?.get().seq, 4);
        // Tear both: damaged, with a message saying what to do.
        f.write_all_at(b"garbage", SLOT_LEN as u64 + 30)?;
        let err = StateFile::<S>::open(&path).expect_err("both slots torn");
        assert!(err.to_string().contains("damaged"), "{err}");
        Ok(())
    }

    #[test]
    fn decode_slots_takes_the_newer_valid_slot() -> Result<(), Box<dyn std::error::Error>> {
        let path = Path::new("state");
        let s = |seq| S {
            seq,
            name: "a".into(),
        };
        let mut image = vec![0u8; 2 * SLOT_LEN];
        let old = encode_slot(path, 4, &s(4))?;
        let new = encode_slot(path, 5, &s(5))?;
        image[..new.len()].copy_from_slice(&new);
        image[SLOT_LEN..SLOT_LEN + old.len()].copy_from_slice(&old);
        let got = decode_slots::<S>(&image).ok_or("both slots valid")?;
        assert_eq!((got.value, got.slot, got.counter), (s(5), 0, 5));
        // The newer slot torn: the older one wins.
        image[SLOT_HEADER + 3] ^= 0x40;
        let got = decode_slots::<S>(&image).ok_or("slot 1 valid")?;
        assert_eq!((got.value, got.slot, got.counter), (s(4), 1, 4));
        // A short image holds slot 0 at most; slot 1 cut short is torn.
        image[SLOT_HEADER + 3] ^= 0x40;
        assert_eq!(
            decode_slots::<S>(&image[..SLOT_LEN]).map(|g| g.slot),
            Some(0)
        );
        let cut = SLOT_LEN + old.len() - 1;
        image[..SLOT_LEN].fill(0);
        assert!(decode_slots::<S>(&image[..cut]).is_none());
        assert!(decode_slots::<S>(&[]).is_none());
        // Valid bytes that are not a T are not a state.
        assert!(decode_slots::<Vec<String>>(&image).is_none());
        Ok(())
    }

    #[test]
    fn write_atomic_replaces_and_sets_mode() -> Result<(), Box<dyn std::error::Error>> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("key.pem");
        write_atomic(&path, b"one", 0o600)?;
        write_atomic(&path, b"two", 0o600)?;
        assert_eq!(std::fs::read(&path)?, b"two");
        assert_eq!(
            std::fs::metadata(&path)?.permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::read_dir(dir.path())?.count(),
            1,
            "no temp file left"
        );
        Ok(())
    }
}

#[cfg(test)]
mod fault_tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    struct S {
        seq: u64,
    }

    #[test]
    fn a_torn_first_store_keeps_the_initial_state() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("state");
        let mut st = StateFile::open_or_create(&path, S { seq: 1 })?;
        {
            let _torn = crate::faults::arm_under(dir.path(), "state.write@1=short")?;
            st.store(S { seq: 2 }).expect_err("injected short write");
        }
        drop(st);
        assert_eq!(StateFile::<S>::open(&path)?.get(), &S { seq: 1 });
        Ok(())
    }

    #[test]
    fn a_failed_atomic_replace_keeps_the_old_file_and_no_temp(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("cfg");
        write_atomic(&path, b"old", 0o600)?;
        for rule in [
            "atomic.write@1=short",
            "atomic.sync@1=eio",
            "atomic.rename@1=eio",
        ] {
            let _armed = crate::faults::arm_under(dir.path(), rule)?;
            let err = write_atomic(&path, b"new content", 0o600).expect_err(rule);
            assert!(err.to_string().contains("cfg"), "{rule}: {err}");
            assert_eq!(std::fs::read(&path)?, b"old", "{rule}");
            assert_eq!(
                std::fs::read_dir(dir.path())?.count(),
                1,
                "{rule}: no temp left"
            );
        }
        Ok(())
    }
}
