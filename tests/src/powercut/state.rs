//! The state behind the mount and every request that changes it: the inode table,
//! the overlays, (Strict) the entries each unsynced directory had at its last fsync,
//! and the kept objects those entries still name. Requests return `Errno`; the FUSE
//! side ([`super::volume`]) only locks, calls and replies.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write as _};
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::UNIX_EPOCH;

use fuser::{Errno, FileAttr, FileType, INodeNo, RenameFlags, Request, TimeOrNow};

use super::overlay::{apply, read_merged, Overlay, Payload};
use super::sys::{
    cpath, kind_of, open_backing, open_file, remove_any, system_time, timespec, to_usize, Change,
};
use super::tree::{Entry, Handle, HandleKind, OpenFile, Tree};
use super::{Namespace, ROOT};

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) state: Mutex<State>,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic in one request must not take every later request down with it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug)]
pub(super) struct State {
    pub(super) data: PathBuf,
    pub(super) objects: PathBuf,
    pub(super) namespace: Namespace,
    pub(super) tree: Tree,
    pub(super) overlays: BTreeMap<u64, Overlay>,
    /// Strict: directories changed since their last fsyncdir, with the entries they
    /// had then (name -> inode).
    pub(super) dirty: BTreeMap<u64, BTreeMap<OsString, u64>>,
    /// How many entries of `dirty` name each inode.
    pub(super) refs: HashMap<u64, usize>,
    /// Inodes kept at `objects/<ino>`.
    pub(super) hidden: BTreeSet<u64>,
    pub(super) handles: HashMap<u64, Handle>,
    pub(super) next_fh: u64,
    pub(super) generation: u64,
    pub(super) full: bool,
    pub(super) failing_fsyncs: Vec<String>,
    /// Set by a cut that failed halfway: the backing tree is in no known state.
    pub(super) poisoned: Option<String>,
}

impl State {
    pub(super) fn new(data: PathBuf, objects: PathBuf, namespace: Namespace) -> State {
        State {
            data,
            objects,
            namespace,
            tree: Tree::new(),
            overlays: BTreeMap::new(),
            dirty: BTreeMap::new(),
            refs: HashMap::new(),
            hidden: BTreeSet::new(),
            handles: HashMap::new(),
            next_fh: 1,
            generation: 0,
            full: false,
            failing_fsyncs: Vec::new(),
            poisoned: None,
        }
    }

    pub(super) fn strict(&self) -> bool {
        self.namespace == Namespace::Strict
    }

    pub(super) fn abs(&self, rel: &Path) -> PathBuf {
        if rel.as_os_str().is_empty() {
            self.data.clone()
        } else {
            self.data.join(rel)
        }
    }

    pub(super) fn object_path(&self, ino: u64) -> PathBuf {
        self.objects.join(ino.to_string())
    }

    /// Where `ino` is in the backing tree now.
    pub(super) fn backing_path(&self, ino: u64) -> Result<PathBuf, Errno> {
        let node = self.tree.node(ino)?;
        match &node.path {
            Some(rel) => Ok(self.abs(rel)),
            None if node.hidden => Ok(self.object_path(ino)),
            None => Err(Errno::ENOENT),
        }
    }

    /// `name` in directory `parent`, relative to `data/`.
    pub(super) fn child(&self, parent: u64, name: &OsStr) -> Result<PathBuf, Errno> {
        let node = self.tree.node(parent)?;
        if node.kind != FileType::Directory {
            return Err(Errno::ENOTDIR);
        }
        let Some(dir) = &node.path else {
            return Err(Errno::ENOENT);
        };
        if name.is_empty() || name == "." || name == ".." || name.as_bytes().contains(&b'/') {
            return Err(Errno::EINVAL);
        }
        Ok(dir.join(name))
    }

    pub(super) fn live(&self, fh: u64) -> Result<&Handle, Errno> {
        match self.handles.get(&fh) {
            None => Err(Errno::EBADF),
            Some(Handle {
                kind: HandleKind::Dead,
                ..
            }) => Err(Errno::EIO),
            Some(h) => Ok(h),
        }
    }

    pub(super) fn live_file(&self, fh: u64) -> Result<&OpenFile, Errno> {
        match &self.live(fh)?.kind {
            HandleKind::File(f) => Ok(f),
            _ => Err(Errno::EBADF),
        }
    }

    pub(super) fn any_open_file(&self, ino: u64) -> Option<&File> {
        self.handles.values().find_map(|h| match &h.kind {
            HandleKind::File(f) if h.ino == ino => Some(&f.file),
            _ => None,
        })
    }

    pub(super) fn add_handle(&mut self, ino: u64, kind: HandleKind) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, Handle { ino, kind });
        fh
    }

    pub(super) fn metadata(&self, ino: u64, fh: Option<u64>) -> Result<fs::Metadata, Errno> {
        if let Some(fh) = fh {
            if let HandleKind::File(f) = &self.live(fh)?.kind {
                return Ok(f.file.metadata()?);
            }
        }
        match self.backing_path(ino) {
            Ok(path) => Ok(fs::symlink_metadata(path)?),
            // Unlinked but still open somewhere.
            Err(e) => match self.any_open_file(ino) {
                Some(f) => Ok(f.metadata()?),
                None => Err(e),
            },
        }
    }

    pub(super) fn attr(&self, ino: u64, md: &fs::Metadata) -> Result<FileAttr, Errno> {
        let kind = kind_of(md)?;
        let linked = self.tree.nodes.get(&ino).is_some_and(|n| n.path.is_some());
        let mut attr = FileAttr {
            ino: INodeNo(ino),
            size: md.len(),
            blocks: md.blocks(),
            atime: md.accessed().unwrap_or(UNIX_EPOCH),
            mtime: md.modified().unwrap_or(UNIX_EPOCH),
            ctime: system_time(md.ctime(), md.ctime_nsec()),
            crtime: UNIX_EPOCH,
            kind,
            perm: u16::try_from(md.mode() & 0o7777).unwrap_or(0),
            nlink: if linked || kind == FileType::Directory {
                u32::try_from(md.nlink()).unwrap_or(u32::MAX)
            } else {
                0
            },
            uid: md.uid(),
            gid: md.gid(),
            rdev: u32::try_from(md.rdev()).unwrap_or(0),
            blksize: u32::try_from(md.blksize()).unwrap_or(4096),
            flags: 0,
        };
        if let Some(o) = self.overlays.get(&ino) {
            attr.size = o.len;
            attr.blocks = attr.blocks.max(o.len.div_ceil(512));
            attr.mtime = o.modified;
            attr.ctime = o.modified;
        }
        Ok(attr)
    }

    pub(super) fn overlay(&mut self, ino: u64, fh: Option<u64>) -> Result<&mut Overlay, Errno> {
        if !self.overlays.contains_key(&ino) {
            let durable = self.metadata(ino, fh)?.len();
            self.overlays.insert(ino, Overlay::new(durable));
        }
        self.overlays.get_mut(&ino).ok_or(Errno::EIO)
    }

    /// Lists directory `rel` (sorted by name), numbering new entries.
    pub(super) fn list_dir(&mut self, rel: &Path) -> Result<Vec<Entry>, Errno> {
        let mut found = Vec::new();
        for entry in fs::read_dir(self.abs(rel))? {
            let entry = entry?;
            let kind = FileType::from_std(entry.file_type()?).ok_or(Errno::EIO)?;
            found.push((entry.file_name(), kind));
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(found
            .into_iter()
            .map(|(name, kind)| Entry {
                ino: self.tree.ino_for(&rel.join(&name), kind),
                kind,
                name,
            })
            .collect())
    }

    /// Strict: before the first change to directory `dir` since its last fsyncdir,
    /// remember its entries.
    pub(super) fn touch_dir(&mut self, dir: u64) -> Result<(), Errno> {
        if !self.strict() || self.dirty.contains_key(&dir) {
            return Ok(());
        }
        let rel = self.tree.node(dir)?.path.clone().ok_or(Errno::ENOENT)?;
        let entries: BTreeMap<OsString, u64> = self
            .list_dir(&rel)?
            .into_iter()
            .map(|e| (e.name, e.ino))
            .collect();
        for ino in entries.values() {
            *self.refs.entry(*ino).or_default() += 1;
        }
        self.dirty.insert(dir, entries);
        Ok(())
    }

    /// Strict: directory `dir` is synced; drop what only its old entries kept.
    pub(super) fn dir_synced(&mut self, dir: u64) {
        if let Some(entries) = self.dirty.remove(&dir) {
            self.unref(entries.values());
        }
        self.collect_garbage();
    }

    pub(super) fn unref<'a>(&mut self, inos: impl IntoIterator<Item = &'a u64>) {
        for ino in inos {
            if let Some(n) = self.refs.get_mut(ino) {
                *n -= 1;
                if *n == 0 {
                    self.refs.remove(ino);
                }
            }
        }
    }

    /// Deletes kept objects no unsynced directory names any more.
    pub(super) fn collect_garbage(&mut self) {
        loop {
            let garbage: Vec<u64> = self
                .hidden
                .iter()
                .filter(|i| !self.refs.contains_key(i))
                .copied()
                .collect();
            if garbage.is_empty() {
                return;
            }
            for ino in garbage {
                self.hidden.remove(&ino);
                if let Some(n) = self.tree.nodes.get_mut(&ino) {
                    n.hidden = false;
                }
                let path = self.object_path(ino);
                if let Err(e) = remove_any(&path) {
                    // Harmless: the next cut clears the objects directory.
                    let _ = writeln!(io::stderr(), "powercut: remove {}: {e}", path.display());
                }
                // A removed directory's own old entries keep nothing alive either.
                if let Some(entries) = self.dirty.remove(&ino) {
                    self.unref(entries.values());
                }
            }
        }
    }

    /// Removes the object `ino` at `abs`, or (Strict) keeps it for a cut if an
    /// unsynced directory still names it.
    pub(super) fn remove_object(
        &mut self,
        ino: u64,
        abs: &Path,
        is_dir: bool,
    ) -> Result<(), Errno> {
        if self.strict() && self.refs.contains_key(&ino) {
            self.hide(ino, abs)?;
        } else if is_dir {
            fs::remove_dir(abs)?;
        } else {
            fs::remove_file(abs)?;
        }
        Ok(())
    }

    pub(super) fn hide(&mut self, ino: u64, abs: &Path) -> Result<(), Errno> {
        fs::rename(abs, self.object_path(ino))?;
        self.hidden.insert(ino);
        if let Some(n) = self.tree.nodes.get_mut(&ino) {
            n.hidden = true;
        }
        Ok(())
    }

    /// Sets owner and mode of the object just made at `rel` and numbers it.
    pub(super) fn adopt(
        &mut self,
        rel: &Path,
        perm: Option<u32>,
        req: &Request,
    ) -> Result<FileAttr, Errno> {
        let abs = self.abs(rel);
        if let Some(perm) = perm {
            // Our own umask applied at creation; the caller's mode is the one wanted.
            fs::set_permissions(&abs, Permissions::from_mode(perm))?;
        }
        std::os::unix::fs::lchown(&abs, Some(req.uid()), Some(req.gid()))?;
        let md = fs::symlink_metadata(&abs)?;
        let ino = self.tree.ino_for(rel, kind_of(&md)?);
        self.attr(ino, &md)
    }

    // --- requests ---------------------------------------------------------------

    pub(super) fn lookup(&mut self, parent: u64, name: &OsStr) -> Result<FileAttr, Errno> {
        let rel = self.child(parent, name)?;
        let md = fs::symlink_metadata(self.abs(&rel))?;
        let ino = self.tree.ino_for(&rel, kind_of(&md)?);
        self.attr(ino, &md)
    }

    pub(super) fn getattr(&self, ino: u64, fh: Option<u64>) -> Result<FileAttr, Errno> {
        let md = self.metadata(ino, fh)?;
        self.attr(ino, &md)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn setattr(
        &mut self,
        ino: u64,
        fh: Option<u64>,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
    ) -> Result<FileAttr, Errno> {
        if let Some(fh) = fh {
            self.live(fh)?;
        }
        let kind = self.tree.node(ino)?.kind;
        if let Some(size) = size {
            match kind {
                FileType::RegularFile => {}
                FileType::Directory => return Err(Errno::EISDIR),
                _ => return Err(Errno::EINVAL),
            }
            if self.full && size > self.overlay(ino, fh)?.len {
                return Err(Errno::ENOSPC);
            }
            self.overlay(ino, fh)?.set_len(size);
        }
        let times = [timespec(atime), timespec(mtime)];
        let change = Change {
            mode,
            uid,
            gid,
            times: (atime.is_some() || mtime.is_some()).then_some(&times),
        };
        if !change.is_empty() {
            let own = fh.and_then(|fh| match &self.handles.get(&fh)?.kind {
                HandleKind::File(f) => Some(&f.file),
                _ => None,
            });
            match (own, self.backing_path(ino)) {
                (Some(file), _) => change.apply_to_file(file)?,
                (None, Ok(path)) => change.apply_to_path(&path)?,
                // Unlinked: through a descriptor someone still has open.
                (None, Err(e)) => change.apply_to_file(self.any_open_file(ino).ok_or(e)?)?,
            }
        }
        self.getattr(ino, fh)
    }

    pub(super) fn readlink(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        let target = fs::read_link(self.backing_path(ino)?)?;
        Ok(target.into_os_string().into_vec())
    }

    pub(super) fn mknod(
        &mut self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> Result<FileAttr, Errno> {
        if self.full {
            return Err(Errno::ENOSPC);
        }
        let rel = self.child(parent, name)?;
        self.touch_dir(parent)?;
        let c = cpath(&self.abs(&rel))?;
        // SAFETY: `c` is a NUL-terminated path that outlives the call; mknod reads it
        // and touches no other memory of ours.
        let rc = unsafe { libc::mknod(c.as_ptr(), mode & !umask, libc::dev_t::from(rdev)) };
        if rc != 0 {
            return Err(io::Error::last_os_error().into());
        }
        self.adopt(&rel, Some(mode & !umask & 0o7777), req)
    }

    pub(super) fn mkdir(
        &mut self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> Result<FileAttr, Errno> {
        if self.full {
            return Err(Errno::ENOSPC);
        }
        let rel = self.child(parent, name)?;
        self.touch_dir(parent)?;
        fs::create_dir(self.abs(&rel))?;
        let attr = self.adopt(&rel, Some(mode & !umask & 0o7777), req)?;
        if self.strict() {
            // A new directory's durable entries: none yet.
            self.dirty.insert(attr.ino.0, BTreeMap::new());
        }
        Ok(attr)
    }

    pub(super) fn symlink(
        &mut self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        target: &Path,
    ) -> Result<FileAttr, Errno> {
        if self.full {
            return Err(Errno::ENOSPC);
        }
        let rel = self.child(parent, name)?;
        self.touch_dir(parent)?;
        std::os::unix::fs::symlink(target, self.abs(&rel))?;
        self.adopt(&rel, None, req)
    }

    pub(super) fn create(
        &mut self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> Result<(FileAttr, u64), Errno> {
        if self.full {
            return Err(Errno::ENOSPC);
        }
        let rel = self.child(parent, name)?;
        let abs = self.abs(&rel);
        self.touch_dir(parent)?;
        let perm = mode & !umask & 0o7777;
        let created = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(perm)
            .open(&abs);
        let (file, attr) = match created {
            Ok(file) => {
                let attr = self.adopt(&rel, Some(perm), req)?;
                (file, attr)
            }
            // O_CREAT without O_EXCL on a name that exists: open it.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && flags & libc::O_EXCL == 0 => {
                let file = open_backing(&abs)?;
                let md = file.metadata()?;
                let ino = self.tree.ino_for(&rel, kind_of(&md)?);
                if flags & libc::O_TRUNC != 0 {
                    self.overlays
                        .entry(ino)
                        .or_insert_with(|| Overlay::new(md.len()))
                        .set_len(0);
                }
                (file, self.attr(ino, &md)?)
            }
            Err(e) => return Err(e.into()),
        };
        let fh = self.add_handle(attr.ino.0, HandleKind::File(open_file(file, flags)));
        Ok((attr, fh))
    }

    pub(super) fn unlink(&mut self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let rel = self.child(parent, name)?;
        let abs = self.abs(&rel);
        let md = fs::symlink_metadata(&abs)?;
        if md.is_dir() {
            return Err(Errno::EISDIR);
        }
        let ino = self.tree.ino_for(&rel, kind_of(&md)?);
        self.touch_dir(parent)?;
        self.remove_object(ino, &abs, false)?;
        self.tree.forget_path(&rel);
        Ok(())
    }

    pub(super) fn rmdir(&mut self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let rel = self.child(parent, name)?;
        let abs = self.abs(&rel);
        let md = fs::symlink_metadata(&abs)?;
        if !md.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        if fs::read_dir(&abs)?.next().is_some() {
            return Err(Errno::ENOTEMPTY);
        }
        let ino = self.tree.ino_for(&rel, FileType::Directory);
        self.touch_dir(parent)?;
        self.remove_object(ino, &abs, true)?;
        self.tree.forget_path(&rel);
        Ok(())
    }

    pub(super) fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        if !(flags - RenameFlags::RENAME_NOREPLACE).is_empty() {
            return Err(Errno::EINVAL);
        }
        let from = self.child(parent, name)?;
        let to = self.child(new_parent, new_name)?;
        let (from_abs, to_abs) = (self.abs(&from), self.abs(&to));
        let from_md = fs::symlink_metadata(&from_abs)?;
        if from == to {
            return Ok(());
        }
        if to.starts_with(&from) {
            // A directory into itself.
            return Err(Errno::EINVAL);
        }
        let to_md = match fs::symlink_metadata(&to_abs) {
            Ok(md) => Some(md),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        if let Some(to_md) = &to_md {
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            if to_md.dev() == from_md.dev() && to_md.ino() == from_md.ino() {
                // Two names of one object: POSIX says do nothing.
                return Ok(());
            }
            match (from_md.is_dir(), to_md.is_dir()) {
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                (true, true) if fs::read_dir(&to_abs)?.next().is_some() => {
                    return Err(Errno::ENOTEMPTY)
                }
                _ => {}
            }
        }
        self.touch_dir(parent)?;
        self.touch_dir(new_parent)?;
        // Strict: a replaced object an unsynced directory still names is kept aside
        // for a cut; otherwise the rename replaces it, atomically.
        let mut set_aside = None;
        if let Some(to_md) = &to_md {
            let target = self.tree.ino_for(&to, kind_of(to_md)?);
            if self.strict() && self.refs.contains_key(&target) {
                self.hide(target, &to_abs)?;
                set_aside = Some(target);
            }
        }
        if let Err(e) = fs::rename(&from_abs, &to_abs) {
            if let Some(target) = set_aside {
                if fs::rename(self.object_path(target), &to_abs).is_ok() {
                    self.hidden.remove(&target);
                    if let Some(n) = self.tree.nodes.get_mut(&target) {
                        n.hidden = false;
                    }
                }
            }
            return Err(e.into());
        }
        if to_md.is_some() {
            self.tree.forget_path(&to);
        }
        self.tree.move_path(&from, &to);
        Ok(())
    }

    pub(super) fn open(&mut self, ino: u64, flags: i32) -> Result<u64, Errno> {
        match self.tree.node(ino)?.kind {
            FileType::RegularFile => {}
            FileType::Directory => return Err(Errno::EISDIR),
            _ => return Err(Errno::EINVAL),
        }
        let file = match self.backing_path(ino) {
            Ok(path) => open_backing(&path)?,
            // Unlinked but open elsewhere (e.g. reopened through /proc/<pid>/fd).
            Err(e) => match self.any_open_file(ino) {
                Some(f) => open_backing(Path::new(&format!("/proc/self/fd/{}", f.as_raw_fd())))?,
                None => return Err(e),
            },
        };
        Ok(self.add_handle(ino, HandleKind::File(open_file(file, flags))))
    }

    pub(super) fn read(&self, ino: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let f = self.live_file(fh)?;
        Ok(read_merged(&f.file, self.overlays.get(&ino), offset, size)?)
    }

    pub(super) fn write(
        &mut self,
        ino: u64,
        fh: u64,
        offset: u64,
        data: &[u8],
        flags: i32,
    ) -> Result<u32, Errno> {
        let f = self.live_file(fh)?;
        let (append, sync) = (f.append, f.sync || flags & libc::O_DSYNC != 0);
        if self.full {
            return Err(Errno::ENOSPC);
        }
        let written = u32::try_from(data.len()).map_err(|_| Errno::EINVAL)?;
        let overlay = self.overlay(ino, Some(fh))?;
        let offset = if append { overlay.len } else { offset };
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > i64::MAX as u64)
        {
            return Err(Errno::EFBIG);
        }
        overlay.write(offset, Payload::Bytes(data.to_vec()));
        if sync {
            self.fsync(ino, fh, true)?;
        }
        Ok(written)
    }

    pub(super) fn fsync(&mut self, ino: u64, fh: u64, datasync: bool) -> Result<(), Errno> {
        self.live_file(fh)?;
        let path = self
            .tree
            .node(ino)?
            .path
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned());
        if let Some(path) = path {
            if let Some(i) = self
                .failing_fsyncs
                .iter()
                .position(|suffix| path.ends_with(suffix.as_str()))
            {
                self.failing_fsyncs.remove(i);
                // What Linux does after a writeback error: the dirty data is gone.
                self.overlays.remove(&ino);
                return Err(Errno::EIO);
            }
        }
        let f = self.live_file(fh)?;
        if let Some(o) = self.overlays.get(&ino) {
            apply(&f.file, o, o.extents.iter().map(|(k, v)| (*k, v)), true)?;
        }
        if datasync {
            f.file.sync_data()?;
        } else {
            f.file.sync_all()?;
        }
        self.overlays.remove(&ino);
        Ok(())
    }

    pub(super) fn fallocate(
        &mut self,
        ino: u64,
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<(), Errno> {
        self.live_file(fh)?;
        let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        let known =
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !known != 0 || (punch && (zero || !keep_size)) {
            return Err(Errno::EOPNOTSUPP);
        }
        let full = self.full;
        let overlay = self.overlay(ino, Some(fh))?;
        if punch || zero {
            let end = if keep_size { end.min(overlay.len) } else { end };
            if end > offset {
                overlay.write(offset, Payload::Zeros(end - offset));
            }
        } else if full {
            return Err(Errno::ENOSPC);
        } else if !keep_size && end > overlay.len {
            overlay.set_len(end);
        }
        Ok(())
    }

    pub(super) fn opendir(&mut self, ino: u64) -> Result<u64, Errno> {
        let node = self.tree.node(ino)?;
        if node.kind != FileType::Directory {
            return Err(Errno::ENOTDIR);
        }
        let rel = node.path.clone().ok_or(Errno::ENOENT)?;
        let parent = rel
            .parent()
            .and_then(|p| self.tree.by_path.get(p).copied())
            .unwrap_or(ROOT);
        let mut entries = vec![
            Entry {
                ino,
                kind: FileType::Directory,
                name: ".".into(),
            },
            Entry {
                ino: parent,
                kind: FileType::Directory,
                name: "..".into(),
            },
        ];
        entries.extend(self.list_dir(&rel)?);
        Ok(self.add_handle(ino, HandleKind::Dir(entries)))
    }

    pub(super) fn readdir(&self, fh: u64, offset: u64) -> Result<Vec<Entry>, Errno> {
        match &self.live(fh)?.kind {
            HandleKind::Dir(entries) => {
                Ok(entries.iter().skip(to_usize(offset)).cloned().collect())
            }
            _ => Err(Errno::EBADF),
        }
    }

    pub(super) fn fsyncdir(&mut self, ino: u64, fh: u64) -> Result<(), Errno> {
        self.live(fh)?;
        File::open(self.backing_path(ino)?)?.sync_all()?;
        if self.strict() {
            self.dir_synced(ino);
        }
        Ok(())
    }

    pub(super) fn statfs(&self) -> Result<libc::statvfs, Errno> {
        let c = cpath(&self.data)?;
        let mut st = MaybeUninit::<libc::statvfs>::zeroed();
        // SAFETY: `c` is a NUL-terminated path and `st` points to writable memory of
        // the type statvfs fills; neither is used by it after the call.
        let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: zero is a valid statvfs, and statvfs returned 0, so it filled `st`.
        Ok(unsafe { st.assume_init() })
    }
}
