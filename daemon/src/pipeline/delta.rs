//! `restore --delta`: bring an existing directory (a failed primary, an old standby, an
//! earlier restore) to a snapshot, fetching only what differs. First everything the snapshot
//! does not hold, or holds as another kind, is removed. Then each file of the snapshot that is
//! there is read at the snapshot's chunk boundaries, and each piece is keyed-hashed as the
//! backup hashed it. Only the pieces whose id differs are fetched and written in place, and
//! the file is cut or extended to its size. For PostgreSQL relation files, a piece is 1 MiB of
//! pages. Files that are missing are created whole.
//!
//! Only a regular file with one link is rewritten in place. Anything else at a file's path
//! (a hard link planted to a file outside, a device, a FIFO) is unlinked and created anew,
//! so a delta restore never writes through a name into something it did not create.

use super::safe_dir::{Kind as OnDisk, SafeDir};
use crate::error::Result;
use crate::repository::format::*;
use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};

/// What a delta restore kept, rewrote and removed.
#[derive(Debug, Default, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DeltaStats {
    pub files_unchanged: u64,
    pub files_changed: u64,
    pub files_created: u64,
    pub bytes_kept: u64,
    pub bytes_fetched: u64,
    /// Entries of the target that the snapshot does not hold (removed, with what they held).
    pub removed: u64,
}

fn norm(p: &Path) -> PathBuf {
    p.components().filter(|c| !matches!(c, Component::CurDir)).collect()
}

fn same_kind(e: EntryKind, d: OnDisk) -> bool {
    matches!(
        (e, d),
        (EntryKind::Dir, OnDisk::Dir)
            | (EntryKind::File | EntryKind::Hardlink, OnDisk::File)
            | (EntryKind::Symlink, OnDisk::Symlink)
    )
}

/// A delta deletes what the snapshot does not hold, so a mistyped `--target` would be emptied:
/// a target that holds something, but none of the snapshot's top-level names, is refused.
pub fn check_target(dir: &SafeDir, entries: &[(usize, &Entry)], snapshot: &str) -> Result<()> {
    let top: HashSet<PathBuf> =
        entries.iter().map(|(_, e)| norm(&e.rel_path())).filter(|p| p.components().count() == 1).collect();
    let present = dir.list(Path::new(""))?;
    if !present.is_empty() && !present.iter().any(|(n, _)| top.contains(Path::new(n))) {
        return Err(crate::error::Error::usage(format!(
            "{} holds nothing of snapshot {snapshot}: a delta restore would delete all of it",
            dir.full(Path::new("")).display()
        ))
        .with_hint("check --target; to restore into it anyway, restore into an empty directory and move it"));
    }
    Ok(())
}

/// Remove from the target every entry the snapshot does not hold as the same kind.
pub fn clear_extras(dir: &SafeDir, entries: &[(usize, &Entry)], stats: &mut DeltaStats) -> Result<()> {
    let kinds: HashMap<PathBuf, EntryKind> = entries.iter().map(|(_, e)| (norm(&e.rel_path()), e.kind)).collect();
    let mut todo = vec![PathBuf::new()];
    while let Some(d) = todo.pop() {
        for (name, kind) in dir.list(&d)? {
            let rel = d.join(&name);
            match kinds.get(&rel) {
                Some(k) if same_kind(*k, kind) => {
                    if kind == OnDisk::Dir {
                        todo.push(rel);
                    }
                }
                _ => {
                    dir.remove_all(&rel)?;
                    stats.removed += 1;
                }
            }
        }
    }
    Ok(())
}

/// Which pieces of each file must be written: `None` for a file created whole, else the
/// offsets whose content differs. Makes every file the snapshot's length.
pub fn compare(
    dir: &SafeDir,
    manifest: &Manifest,
    files: &[&Entry],
    key: &[u8; 32],
    stats: &mut DeltaStats,
) -> Result<Vec<Option<HashSet<u64>>>> {
    let mut out = Vec::with_capacity(files.len());
    let mut buf = Vec::new();
    for e in files {
        let rel = e.rel_path();
        let Some(f) = dir.open_in_place(&rel)? else {
            dir.create_file(&rel, e.size, true)?;
            stats.files_created += 1;
            stats.bytes_fetched += e.size;
            out.push(None);
            continue;
        };
        let mut differ = HashSet::new();
        let mut off = 0u64;
        for &c in &e.chunks {
            let Some((id, _, _, _, raw)) = manifest.chunks.get(c as usize) else {
                // A bad index is reported by the fetch plan; here the piece is simply rewritten.
                differ.insert(off);
                continue;
            };
            buf.resize(*raw as usize, 0);
            let same = match std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, off) {
                Ok(()) => parse_hex32(id).is_some_and(|want| super::chunk_id(key, &buf) == want),
                Err(_) => false,
            };
            if same {
                stats.bytes_kept += *raw as u64;
            } else {
                differ.insert(off);
                stats.bytes_fetched += *raw as u64;
            }
            off += *raw as u64;
        }
        f.set_len(e.size).map_err(|err| crate::error::Error::io("resize", &dir.full(&rel), err))?;
        if differ.is_empty() {
            stats.files_unchanged += 1;
        } else {
            stats.files_changed += 1;
        }
        out.push(Some(differ));
    }
    Ok(out)
}
