//! `restore --delta`: bring an existing directory (a failed primary, an old standby, an
//! earlier restore) to a snapshot, fetching only what differs. First everything the snapshot
//! does not hold, or holds as another kind, is removed. Then each file of the snapshot that is
//! there is read at the snapshot's chunk boundaries, and each piece is keyed-hashed as the
//! backup hashed it. Only the pieces whose id differs are fetched and written in place, and
//! the file is cut or extended to its size. PostgreSQL relation files with page digests are
//! compared page by page instead: only the 8 KiB pages whose digest differs are written (their
//! blobs fetched). Files that are missing are created whole.
//!
//! Only a regular file with one link is rewritten in place. Anything else at a file's path
//! (a hard link planted to a file outside, a device, a FIFO) is unlinked and created anew,
//! so a delta restore never writes through a name into something it did not create.

use super::record::{same_content, Known, Prior, Stat};
use super::restore::{Sink, Target};
use super::safe_dir::{Kind as OnDisk, SafeDir};
use crate::error::Result;
use crate::repository::format::*;
use crate::repository::Unlocked;
use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

/// What a delta restore kept, rewrote and removed.
#[derive(Debug, Default, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DeltaStats {
    pub files_unchanged: u64,
    pub files_changed: u64,
    pub files_created: u64,
    pub bytes_kept: u64,
    pub bytes_fetched: u64,
    /// Files whose stat was still what the record of the last restore into this directory
    /// holds: compared by the two snapshots' manifests, not read.
    pub files_known: u64,
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

/// What of a file a delta restore writes.
#[derive(Debug)]
pub enum Differ {
    /// Created anew: everything.
    Whole,
    /// Known to hold the snapshot's bytes already: nothing.
    Nothing,
    /// The stored pieces (by file offset) whose content differs.
    Pieces(HashSet<u64>),
    /// The 8 KiB pages that differ (relation files with page digests).
    Pages(Vec<bool>),
}

impl Differ {
    /// The part of a planned write that must happen.
    pub fn keep(&self, t: Target, raw_len: u32) -> Vec<Target> {
        match self {
            Differ::Whole => vec![t],
            Differ::Nothing => vec![],
            Differ::Pieces(d) => match t.piece {
                Some(p) if !d.contains(&p) => vec![],
                _ => vec![t],
            },
            Differ::Pages(bits) => super::pages::only_pages(t, raw_len, bits),
        }
    }
}

/// Fetch the page digests of the files that have them and are marked in `need` (small
/// blobs, a restore-side read). A digest blob that cannot be read only costs precision: its
/// file is compared by pieces.
pub async fn fetch_digests(
    repo: &Unlocked,
    key: [u8; 32],
    manifest: &Manifest,
    files: &[&Entry],
    need: &[bool],
) -> Result<Vec<Option<Vec<u8>>>> {
    // A digest the manifest cannot place only costs precision: its file is compared by pieces.
    let wants = super::tree::plan_digests(manifest, files, need).unwrap_or_default();
    let sink = Arc::new(MemSink(files.iter().map(|_| Mutex::new(Vec::new())).collect()));
    let damage = super::restore::fetch(repo, key, wants, sink.clone(), 4, Default::default()).await?;
    let bad: HashSet<usize> = damage.iter().flat_map(|d| d.files.iter().copied()).collect();
    Ok(sink
        .0
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let v = std::mem::take(&mut *m.lock().unwrap_or_else(|e| e.into_inner()));
            (!v.is_empty() && !bad.contains(&i)).then_some(v)
        })
        .collect())
}

/// What the record of the last restore says of the target: the recorded snapshot's entry for
/// each file (when its stat still matches, that is what the file holds) and its digests.
pub struct Before<'a> {
    manifest: &'a Manifest,
    priors: Vec<Option<Prior<'a>>>,
    digests: Vec<Option<Vec<u8>>>,
}

impl<'a> Before<'a> {
    /// The priors of `files` (chunk key `key`), with the old page digests of the files whose
    /// content changed between the two snapshots.
    pub async fn fetch(repo: &Unlocked, known: &'a Known, key: &[u8; 32], files: &[&'a Entry]) -> Result<Before<'a>> {
        let priors = known.priors(key, files);
        let old: Vec<&Entry> = files.iter().zip(&priors).map(|(e, p)| p.as_ref().map_or(*e, |p| p.entry)).collect();
        let need: Vec<bool> = files
            .iter()
            .zip(&priors)
            // `record::differ` compares layered entries by page source, without digests.
            .map(|(e, p)| {
                p.as_ref().is_some_and(|p| {
                    let plain = p.entry.pages.is_none() && e.pages.is_none();
                    plain && p.entry.digests.is_some() && e.digests.is_some() && !same_content(p.entry, e)
                })
            })
            .collect();
        let digests = fetch_digests(repo, known.key, &known.manifest, &old, &need).await?;
        Ok(Before { manifest: &known.manifest, priors, digests })
    }

    /// Whether file `fi` is known unchanged between the snapshots (if its stat still matches):
    /// its new digests are then not needed.
    pub fn unchanged(&self, fi: usize, e: &Entry) -> bool {
        self.priors.get(fi).and_then(|p| p.as_ref()).is_some_and(|p| same_content(p.entry, e))
    }
}

/// Collects fetched bytes in memory, one buffer per file.
struct MemSink(Vec<Mutex<Vec<u8>>>);

impl Sink for MemSink {
    fn write(&self, file: usize, offset: u64, data: &[u8]) -> Result<()> {
        let mut b = self.0[file].lock().unwrap_or_else(|e| e.into_inner());
        let end = offset as usize + data.len();
        if b.len() < end {
            b.resize(end, 0);
        }
        b[offset as usize..end].copy_from_slice(data);
        Ok(())
    }
}

/// What of each file must be written. Makes every file the snapshot's length. Files are read
/// and hashed on every core: reading the whole target is most of a delta's work.
pub fn compare(
    dir: &SafeDir,
    manifest: &Manifest,
    files: &[&Entry],
    key: &[u8; 32],
    digests: &[Option<Vec<u8>>],
    before: Option<&Before>,
    stats: &mut DeltaStats,
) -> Result<Vec<Differ>> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).min(files.len().max(1));
    let done: Vec<Result<Vec<(usize, Differ, DeltaStats)>>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let fi = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(e) = files.get(fi) else { return Ok(out) };
                        let mut st = DeltaStats::default();
                        let digests = digests.get(fi).and_then(|d| d.as_deref());
                        let prior =
                            before.and_then(|b| Some((b, b.priors.get(fi)?.as_ref()?, b.digests[fi].as_deref())));
                        let d = compare_one(dir, manifest, e, key, digests, prior, &mut st)?;
                        out.push((fi, d, st));
                    }
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(crate::error::Error::failed("a delta compare thread panicked"))))
            .collect()
    });
    let mut out: Vec<Option<Differ>> = files.iter().map(|_| None).collect();
    for part in done {
        for (fi, d, st) in part? {
            out[fi] = Some(d);
            stats.files_unchanged += st.files_unchanged;
            stats.files_changed += st.files_changed;
            stats.files_created += st.files_created;
            stats.bytes_kept += st.bytes_kept;
            stats.bytes_fetched += st.bytes_fetched;
            stats.files_known += st.files_known;
        }
    }
    Ok(out.into_iter().map(|d| d.unwrap_or(Differ::Whole)).collect())
}

fn compare_one(
    dir: &SafeDir,
    manifest: &Manifest,
    e: &Entry,
    key: &[u8; 32],
    digests: Option<&[u8]>,
    prior: Option<(&Before, &Prior, Option<&[u8]>)>,
    stats: &mut DeltaStats,
) -> Result<Differ> {
    let rel = e.rel_path();
    let Some(f) = dir.open_in_place(&rel)? else {
        dir.create_file(&rel, e.size, true)?;
        stats.files_created += 1;
        stats.bytes_fetched += e.size;
        return Ok(Differ::Whole);
    };
    let io = |err| crate::error::Error::io("read", &dir.full(&rel), err);
    let resize =
        |f: &std::fs::File| f.set_len(e.size).map_err(|err| crate::error::Error::io("resize", &dir.full(&rel), err));
    if let Some((b, p, old_digests)) = prior {
        let now = nix::sys::stat::fstat(&f).map(|st| Stat::of(&st)).ok();
        let known = now
            .filter(|s| *s == p.stat)
            .and_then(|_| super::record::differ(b.manifest, p.entry, old_digests, manifest, e, digests));
        if let Some(d) = known {
            let fetched = fetched_bytes(manifest, e, &d);
            stats.files_known += 1;
            stats.bytes_fetched += fetched;
            stats.bytes_kept += e.size.saturating_sub(fetched);
            if fetched == 0 && p.entry.size == e.size {
                stats.files_unchanged += 1;
            } else {
                stats.files_changed += 1;
            }
            resize(&f)?;
            return Ok(d);
        }
    }
    if let Some(d) = digests {
        // Page by page: a page whose digest matches stays as it is.
        let bits = super::pages::differing_pages(&f, key, e.size, d).map_err(io)?;
        let n = bits.iter().filter(|b| **b).count() as u64;
        let fetched = (n * super::pages::PAGE as u64).min(e.size);
        stats.bytes_fetched += fetched;
        stats.bytes_kept += e.size - fetched;
        resize(&f)?;
        if n == 0 {
            stats.files_unchanged += 1;
        } else {
            stats.files_changed += 1;
        }
        return Ok(Differ::Pages(bits));
    }
    let mut differ = HashSet::new();
    let mut buf = Vec::new();
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
    resize(&f)?;
    if differ.is_empty() {
        stats.files_unchanged += 1;
    } else {
        stats.files_changed += 1;
    }
    Ok(Differ::Pieces(differ))
}

/// The bytes of `e` that a differ fetches.
fn fetched_bytes(manifest: &Manifest, e: &Entry, d: &Differ) -> u64 {
    match d {
        Differ::Whole => e.size,
        Differ::Nothing => 0,
        Differ::Pages(bits) => (bits.iter().filter(|b| **b).count() as u64 * super::pages::PAGE as u64).min(e.size),
        Differ::Pieces(set) => {
            let mut off = 0u64;
            let mut n = 0u64;
            for &c in &e.chunks {
                let raw = manifest.chunks.get(c as usize).map_or(0, |c| c.4 as u64);
                if set.contains(&off) {
                    n += raw;
                }
                off += raw;
            }
            n
        }
    }
}
