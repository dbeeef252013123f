//! Inode numbers <-> paths under `data/`, and the per-open handles.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};

use fuser::{Errno, FileType};

use super::ROOT;

/// One file system object, by our inode number.
#[derive(Debug)]
pub(super) struct Node {
    /// Where it is under `data/`; `None` once unlinked (or gone in a cut).
    pub(super) path: Option<PathBuf>,
    pub(super) kind: FileType,
    /// Kept at `objects/<ino>` for a cut to bring back.
    pub(super) hidden: bool,
}

/// Inode numbers <-> paths relative to `data/`. Numbers are never reused, so the
/// kernel never mistakes a new object for an old one.
#[derive(Debug)]
pub(super) struct Tree {
    pub(super) nodes: HashMap<u64, Node>,
    pub(super) by_path: HashMap<PathBuf, u64>,
    pub(super) next_ino: u64,
}

impl Tree {
    pub(super) fn new() -> Tree {
        let mut tree = Tree {
            nodes: HashMap::new(),
            by_path: HashMap::new(),
            next_ino: ROOT + 1,
        };
        tree.nodes.insert(
            ROOT,
            Node {
                path: Some(PathBuf::new()),
                kind: FileType::Directory,
                hidden: false,
            },
        );
        tree.by_path.insert(PathBuf::new(), ROOT);
        tree
    }

    pub(super) fn node(&self, ino: u64) -> Result<&Node, Errno> {
        self.nodes.get(&ino).ok_or(Errno::ENOENT)
    }

    /// The inode of the object at `rel`, numbering it if new.
    pub(super) fn ino_for(&mut self, rel: &Path, kind: FileType) -> u64 {
        if let Some(&ino) = self.by_path.get(rel) {
            match self.nodes.get_mut(&ino) {
                Some(n) if n.kind == kind => return ino,
                // Another kind of object took the name: it is a new object.
                Some(n) => n.path = None,
                None => {}
            }
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(
            ino,
            Node {
                path: Some(rel.to_path_buf()),
                kind,
                hidden: false,
            },
        );
        self.by_path.insert(rel.to_path_buf(), ino);
        ino
    }

    /// The object at `rel` lost its name.
    pub(super) fn forget_path(&mut self, rel: &Path) {
        if let Some(ino) = self.by_path.remove(rel) {
            if let Some(n) = self.nodes.get_mut(&ino) {
                n.path = None;
            }
        }
    }

    /// The object at `from`, and everything under it, moved to `to`.
    pub(super) fn move_path(&mut self, from: &Path, to: &Path) {
        let moved: Vec<(PathBuf, u64)> = self
            .by_path
            .iter()
            .filter(|(p, _)| p.starts_with(from))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        for (old, _) in &moved {
            self.by_path.remove(old);
        }
        for (old, ino) in moved {
            let new = match old.strip_prefix(from) {
                Ok(rest) if !rest.as_os_str().is_empty() => to.join(rest),
                _ => to.to_path_buf(),
            };
            if let Some(n) = self.nodes.get_mut(&ino) {
                n.path = Some(new.clone());
            }
            self.by_path.insert(new, ino);
        }
    }
}

/// One entry of a directory listing.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub(super) ino: u64,
    pub(super) kind: FileType,
    pub(super) name: OsString,
}

#[derive(Debug)]
pub(super) struct OpenFile {
    pub(super) file: File,
    pub(super) append: bool,
    pub(super) sync: bool,
}

#[derive(Debug)]
pub(super) enum HandleKind {
    File(OpenFile),
    /// A directory stream: its listing at opendir.
    Dir(Vec<Entry>),
    /// Opened before a cut.
    Dead,
}

#[derive(Debug)]
pub(super) struct Handle {
    pub(super) ino: u64,
    pub(super) kind: HandleKind,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_moves_descendants_with_their_directory() {
        let mut t = Tree::new();
        let d = t.ino_for(Path::new("d"), FileType::Directory);
        let f = t.ino_for(Path::new("d/f"), FileType::RegularFile);
        let other = t.ino_for(Path::new("dd"), FileType::RegularFile);
        t.move_path(Path::new("d"), Path::new("e"));
        assert_eq!(
            t.node(d).ok().and_then(|n| n.path.clone()),
            Some("e".into())
        );
        assert_eq!(
            t.node(f).ok().and_then(|n| n.path.clone()),
            Some("e/f".into())
        );
        assert_eq!(
            t.node(other).ok().and_then(|n| n.path.clone()),
            Some("dd".into())
        );
        assert_eq!(t.by_path.get(Path::new("e/f")), Some(&f));
        assert!(!t.by_path.contains_key(Path::new("d/f")));
        // A new object at a freed name is a new inode.
        let again = t.ino_for(Path::new("d"), FileType::Directory);
        assert_ne!(again, d);
    }
}
