//! The power cut: drop (or keep some of) the overlays, then (Strict) rebuild
//! `data/` as the disk would hold it, each unsynced directory back at its entries of
//! its last fsync.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::path::PathBuf;

use anyhow::Context;
use fuser::FileType;

use super::overlay::apply;
use super::state::State;
use super::sys::clear_dir;
use super::tree::HandleKind;
use super::{CutMode, CutReport, ROOT};
use crate::rng::DataRng;

impl State {
    pub(super) fn cut(&mut self, mode: CutMode) -> anyhow::Result<CutReport> {
        self.generation += 1;
        for handle in self.handles.values_mut() {
            // Closes our backing descriptors too.
            handle.kind = HandleKind::Dead;
        }
        let (mut rng, seed) = match mode {
            CutMode::DropAll => (None, None),
            CutMode::KeepSome { seed } => (Some(DataRng::new(seed)), Some(seed)),
        };
        let mut coin = move || rng.as_mut().is_some_and(|r| r.below(2) == 1);
        let mut report = CutReport {
            generation: self.generation,
            seed,
            ..CutReport::default()
        };

        // Data first, while every object is still where the tree says.
        let overlays = std::mem::take(&mut self.overlays);
        for (ino, overlay) in &overlays {
            let set_size = coin();
            let mut kept = Vec::new();
            for (offset, payload) in &overlay.extents {
                if coin() {
                    report.extents_kept += 1;
                    report.bytes_kept += payload.len();
                    kept.push((*offset, payload));
                } else {
                    report.extents_dropped += 1;
                    report.bytes_dropped += payload.len();
                }
            }
            if kept.is_empty() && !set_size {
                continue;
            }
            // An object no name and no handle holds is gone anyway.
            let Ok(path) = self.backing_path(*ino) else {
                continue;
            };
            let file = OpenOptions::new()
                .write(true)
                .open(&path)
                .with_context(|| format!("open {} to keep some writes", path.display()))?;
            apply(&file, overlay, kept, set_size)
                .with_context(|| format!("keep some writes in {}", path.display()))?;
        }

        if self.strict() {
            let revert: BTreeSet<u64> = self.dirty.keys().copied().filter(|_| !coin()).collect();
            report.dirs_reverted = revert.len();
            report.dirs_kept = self.dirty.len() - revert.len();
            if !revert.is_empty() {
                self.rebuild(&revert)?;
            }
            clear_dir(&self.objects)?;
            for ino in std::mem::take(&mut self.hidden) {
                if let Some(n) = self.tree.nodes.get_mut(&ino) {
                    n.hidden = false;
                }
            }
            self.dirty.clear();
            self.refs.clear();
        }
        Ok(report)
    }

    /// Rebuilds `data/` as the disk would hold it: directories in `revert` with their
    /// entries at their last fsync, all others with their current ones. Every object is
    /// first moved flat into `objects/<ino>`, then moved back where the durable view
    /// names it; what it does not name is deleted by the caller.
    pub(super) fn rebuild(&mut self, revert: &BTreeSet<u64>) -> anyhow::Result<()> {
        let mut current = HashMap::new();
        self.flatten(ROOT, PathBuf::new(), &mut current)?;

        let mut placed: HashMap<u64, PathBuf> = HashMap::from([(ROOT, PathBuf::new())]);
        let mut extra_names: Vec<(PathBuf, FileType)> = Vec::new();
        let mut pending = vec![(ROOT, PathBuf::new())];
        while let Some((dir, dir_rel)) = pending.pop() {
            let entries = if revert.contains(&dir) {
                self.dirty.get(&dir)
            } else {
                current.get(&dir)
            }
            .cloned()
            .unwrap_or_default();
            for (name, ino) in entries {
                let rel = dir_rel.join(&name);
                let Some(kind) = self.tree.nodes.get(&ino).map(|n| n.kind) else {
                    continue;
                };
                if let Some(first) = placed.get(&ino) {
                    // Named twice (a rename with only one side synced): a file gets
                    // both names; a directory cannot.
                    if kind != FileType::Directory {
                        fs::hard_link(self.abs(first), self.abs(&rel))
                            .with_context(|| format!("link {}", rel.display()))?;
                        extra_names.push((rel, kind));
                    }
                    continue;
                }
                let src = self.object_path(ino);
                match fs::rename(&src, self.abs(&rel)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        let _ = writeln!(
                            io::stderr(),
                            "powercut: object {ino} for {} is missing; skipped",
                            rel.display()
                        );
                        continue;
                    }
                    Err(e) => return Err(e).with_context(|| format!("restore {}", rel.display())),
                }
                placed.insert(ino, rel.clone());
                if kind == FileType::Directory {
                    pending.push((ino, rel));
                }
            }
        }

        for node in self.tree.nodes.values_mut() {
            node.path = None;
        }
        self.tree.by_path.clear();
        for (ino, rel) in placed {
            if let Some(n) = self.tree.nodes.get_mut(&ino) {
                n.path = Some(rel.clone());
            }
            self.tree.by_path.insert(rel, ino);
        }
        for (rel, kind) in extra_names {
            self.tree.ino_for(&rel, kind);
        }
        Ok(())
    }

    /// Moves everything under directory `dir_rel` (inode `dir`) to `objects/<ino>`,
    /// children before their directory, recording each directory's entries.
    pub(super) fn flatten(
        &mut self,
        dir: u64,
        dir_rel: PathBuf,
        current: &mut HashMap<u64, BTreeMap<OsString, u64>>,
    ) -> anyhow::Result<()> {
        let entries = self
            .list_dir(&dir_rel)
            .map_err(|e| anyhow::anyhow!("list {}: errno {}", dir_rel.display(), e.code()))?;
        current.insert(
            dir,
            entries.iter().map(|e| (e.name.clone(), e.ino)).collect(),
        );
        for entry in entries {
            let rel = dir_rel.join(&entry.name);
            if entry.kind == FileType::Directory {
                self.flatten(entry.ino, rel.clone(), current)?;
            }
            fs::rename(self.abs(&rel), self.object_path(entry.ino))
                .with_context(|| format!("set {} aside", rel.display()))?;
        }
        Ok(())
    }
}
