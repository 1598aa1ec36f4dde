//! Restoring a snapshot's tree into a directory: the skeleton (directories, files of their
//! length, links), the chunks fetched into place, then owners, modes and times. Every source
//! restores through this: volumes into their target, PostgreSQL into a data directory,
//! logical dumps into a scratch directory.

use super::restore::{self as fetcher, Damage, FileSink, Sink, Target, Want};
use super::safe_dir::SafeDir;
use crate::error::{Error, Result};
use crate::repository::format::*;
use crate::repository::Unlocked;
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

pub struct Options {
    pub snapshot: String,
    pub target: PathBuf,
    pub includes: Vec<PathBuf>,
    pub overwrite: bool,
    /// Bring an existing target to the snapshot, fetching only what differs (`delta`).
    pub delta: bool,
    /// With `delta`: read every file, even those the last restore's record vouches for.
    pub checksum: bool,
    /// Where restore records live (the state directory's `restored/`); `None`: no record is
    /// read, and the summary's `record` is still returned for the caller to save.
    pub records: Option<PathBuf>,
    pub bytes_done: Arc<AtomicU64>,
    pub bytes_total: Arc<AtomicU64>,
    /// The target, opened by the caller (`SafeDir::open_target`) for steps of its own after
    /// the restore: used instead of opening `target` by path.
    pub dir: Option<Arc<SafeDir>>,
}

#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Summary {
    pub snapshot: String,
    pub target: String,
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    pub warnings: Vec<String>,
    /// What `--delta` kept, rewrote and removed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<super::delta::DeltaStats>,
    /// A physical PostgreSQL backup's label, from the manifest.
    #[serde(skip)]
    pub label: Option<PgLabel>,
    /// Owner of the source root, for restores that must hand the tree to a service user.
    #[serde(skip)]
    pub owner: (u32, u32),
    /// The record to save once the caller's last change to the target is synced (whole
    /// restores only).
    #[serde(skip)]
    pub record: Option<super::record::Pending>,
}

/// Chunk wants for a set of (file index, entry): each chunk with every place it lands.
pub fn plan(manifest: &Manifest, files: &[&Entry]) -> Result<Vec<Want>> {
    let mut wants: HashMap<u32, Want> = HashMap::new();
    for (fi, e) in files.iter().enumerate() {
        match &e.pages {
            None => {
                let mut off = 0u64;
                for &c in &e.chunks {
                    let raw = super::pages::chunk(manifest, c)?.4;
                    want(&mut wants, manifest, c, Target { file: fi, offset: off, part: None, piece: Some(off) })?;
                    off += raw as u64;
                }
            }
            Some(layers) => {
                for (c, t) in super::pages::layout(manifest, e, layers, fi)? {
                    want(&mut wants, manifest, c, t)?;
                }
            }
        }
    }
    Ok(wants.into_values().collect())
}

/// The blobs of the files' page digests (`Entry::digests`), each fetched whole for its file.
pub fn plan_digests(manifest: &Manifest, files: &[&Entry], need: &[bool]) -> Result<Vec<Want>> {
    let mut wants: HashMap<u32, Want> = HashMap::new();
    for (fi, e) in files.iter().enumerate() {
        if let Some(c) = e.digests.filter(|_| need.get(fi).copied().unwrap_or(false)) {
            want(&mut wants, manifest, c, Target { file: fi, offset: 0, part: None, piece: None })?;
        }
    }
    Ok(wants.into_values().collect())
}

/// Add target `t` to chunk `c`'s want, resolving the chunk's id and place the first time.
fn want(wants: &mut HashMap<u32, Want>, manifest: &Manifest, c: u32, t: Target) -> Result<()> {
    let w = match wants.entry(c) {
        std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
        std::collections::hash_map::Entry::Vacant(v) => {
            let snap = &manifest.snapshot;
            let (id, p, o, len, raw) = super::pages::chunk(manifest, c)?;
            let id = parse_hex32(id)
                .ok_or_else(|| Error::damaged(format!("manifest of {snap} holds a malformed chunk id")))?;
            let pack = manifest
                .packs
                .get(*p as usize)
                .ok_or_else(|| Error::damaged(format!("manifest of {snap} references pack {p} beyond its list")))?;
            let pack = parse_hex32(pack)
                .ok_or_else(|| Error::damaged(format!("manifest of {snap} names a malformed pack id")))?;
            v.insert(Want { id, loc: BlobLoc { pack, offset: *o, len: *len, raw_len: *raw }, targets: vec![] })
        }
    };
    w.targets.push(t);
    Ok(())
}

/// A one-line summary of damage: the objects and the files they affect.
pub fn damage_error(snap: &str, damage: &[Damage], names: &dyn Fn(usize) -> String) -> Error {
    let mut objects: Vec<&str> = damage.iter().map(|d| d.object.as_str()).collect();
    objects.sort();
    objects.dedup();
    let mut files: Vec<String> = damage.iter().flat_map(|d| d.files.iter().map(|&f| names(f))).collect();
    files.sort();
    files.dedup();
    let shown: Vec<&str> = files.iter().take(5).map(String::as_str).collect();
    let more = if files.len() > 5 { format!(" and {} more", files.len() - 5) } else { String::new() };
    Error::damaged(format!(
        "snapshot {snap}: {} damaged chunk(s) in {} ({}); affected files: {}{more}",
        damage.len(),
        objects.join(", "),
        damage[0].reason,
        shown.join(", ")
    ))
    .with_hint("everything else was restored; restore these files from an older snapshot, and run `veza-dr verify`")
}

/// A hard link whose first name is not being restored becomes a plain copy of that file.
fn detach_hardlinks(entries: &[Entry], includes: &[PathBuf]) -> Vec<Entry> {
    if includes.is_empty() {
        return entries.to_vec();
    }
    let by_path: HashMap<String, &Entry> = entries.iter().map(|e| (encode_os(e.rel_path().as_os_str()), e)).collect();
    entries
        .iter()
        .map(|e| {
            let target = e.target.as_deref().unwrap_or("");
            match (e.kind, by_path.get(target)) {
                (EntryKind::Hardlink, Some(first)) if !included(&first.rel_path(), includes) => {
                    let mut copy = (*first).clone();
                    copy.path = e.path.clone();
                    copy.path_hex = e.path_hex.clone();
                    copy
                }
                _ => e.clone(),
            }
        })
        .collect()
}

/// Restore snapshot `opts.snapshot` (an id, a prefix or `latest`) into `opts.target`.
pub async fn restore(repo: &Unlocked, opts: &Options) -> Result<Summary> {
    let snap = repo.find_snapshot(&opts.snapshot).await?;
    let manifest = repo.manifest(&snap).await?;
    let key = repo.chunk_key(&snap, &manifest.key_id).await?;

    let target = &opts.target;
    if opts.delta && !opts.includes.is_empty() {
        return Err(Error::usage("--delta restores the whole snapshot: it cannot be combined with --include")
            .with_hint("restore the paths into an empty directory instead"));
    }
    let non_empty = || -> Result<bool> {
        Ok(match &opts.dir {
            Some(d) => !d.list(Path::new(""))?.is_empty(),
            None => {
                target.exists() && std::fs::read_dir(target).map_err(|e| Error::io("read", target, e))?.next().is_some()
            }
        })
    };
    if !opts.overwrite && !opts.delta && non_empty()? {
        return Err(Error::usage(format!("restore target {} is not empty", target.display()))
            .with_hint("restore into an empty or new directory, or pass --overwrite"));
    }
    let dir = match &opts.dir {
        Some(d) => d.clone(),
        None => {
            create_private(target)?;
            Arc::new(SafeDir::open(target)?)
        }
    };
    check_tree(&manifest)?;

    let entries = detach_hardlinks(&manifest.entries, &opts.includes);
    let selected: Vec<(usize, &Entry)> =
        entries.iter().enumerate().filter(|(_, e)| included(&e.rel_path(), &opts.includes)).collect();
    if !opts.includes.is_empty() && selected.iter().all(|(_, e)| e.rel_path() == Path::new(".")) {
        return Err(Error::not_found(format!("no path in snapshot {} matches --include", snap.id)));
    }
    let files: Vec<&Entry> = selected.iter().filter(|(_, e)| e.kind == EntryKind::File).map(|(_, e)| *e).collect();
    // The target's record is read (a delta compares by it) and removed before anything in the
    // target changes: a restore cut short leaves none behind.
    let known = match (opts.delta, &opts.records, opts.checksum) {
        (true, Some(r), false) => super::record::load(repo, r, target).await,
        _ => None,
    };
    if let Some(r) = &opts.records {
        super::record::remove(r, target);
    }
    let mut delta = None;
    let (paths, wants) = if opts.delta {
        let mut stats = super::delta::DeltaStats::default();
        super::delta::check_target(&dir, &selected, snap.id.as_str())?;
        super::delta::clear_extras(&dir, &selected, &mut stats)?;
        let skeleton: Vec<(usize, &Entry)> =
            selected.iter().filter(|(_, e)| e.kind != EntryKind::File).map(|(i, e)| (*i, *e)).collect();
        prepare(&dir, &skeleton, true)?;
        // Old digests that cannot be fetched only mean the files are read.
        let before = match &known {
            Some(k) => super::delta::Before::fetch(repo, k, &key, &files).await.ok(),
            None => None,
        };
        let need: Vec<bool> =
            files.iter().enumerate().map(|(i, e)| !before.as_ref().is_some_and(|b| b.unchanged(i, e))).collect();
        let digests = super::delta::fetch_digests(repo, key, &manifest, &files, &need).await?;
        // Reading the target happens before any fetch starts: nothing else waits on this task.
        let differ = super::delta::compare(&dir, &manifest, &files, &key, &digests, before.as_ref(), &mut stats)?;
        let mut wants = plan(&manifest, &files)?;
        for w in &mut wants {
            let raw = w.loc.raw_len;
            w.targets = std::mem::take(&mut w.targets).into_iter().flat_map(|t| differ[t.file].keep(t, raw)).collect();
        }
        wants.retain(|w| !w.targets.is_empty());
        delta = Some(stats);
        (files.iter().map(|e| e.rel_path()).collect(), wants)
    } else {
        (prepare(&dir, &selected, opts.overwrite)?, plan(&manifest, &files)?)
    };
    let total: u64 = files.iter().map(|e| e.size).sum();
    opts.bytes_total.store(total, std::sync::atomic::Ordering::Relaxed);
    let sink = Arc::new(match opts.delta {
        true => FileSink::new(dir.clone(), paths),
        // A file rebuilt from page layers is written 8 KiB at a time, and a direct write waits
        // for the disk: those go through the page cache (a 2.4 GB PostgreSQL restore from an
        // incremental took 9 s instead of 6 s when they went direct).
        false => {
            let sizes = files.iter().map(|e| if e.pages.is_some() { 0 } else { e.size }).collect();
            FileSink::fresh(dir.clone(), paths, sizes)
        }
    });
    let flushing = dir.flush_behind();
    let damage = fetcher::fetch(repo, key, wants, sink.clone(), 4, opts.bytes_done.clone()).await?;
    sink.finish()?;

    let mut warnings = Vec::new();
    finish(&dir, &selected, opts.overwrite || opts.delta, &mut warnings)?;
    drop(flushing);
    // Synced before damage is reported too: what could be restored is then on disk.
    dir.sync()?;
    if !damage.is_empty() {
        return Err(damage_error(snap.id.as_str(), &damage, &|f| files[f].display()));
    }
    Ok(Summary {
        snapshot: snap.id.to_string(),
        target: target.display().to_string(),
        files: files.len() as u64,
        dirs: selected.iter().filter(|(_, e)| e.kind == EntryKind::Dir).count() as u64,
        bytes: total,
        warnings,
        delta,
        owner: manifest.entries.iter().find(|e| e.path == ".").map(|e| (e.uid, e.gid)).unwrap_or((0, 0)),
        label: manifest.extra.clone(),
        record: opts.includes.is_empty().then(|| {
            super::record::Pending::new(snap.id.as_str(), super::record::mac_key(repo.identity(), &key), &selected)
        }),
    })
}

/// A restore-side path must stay inside the target.
pub fn safe_rel(p: &Path) -> Result<&Path> {
    if p.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)) {
        Ok(p)
    } else {
        Err(Error::damaged(format!("manifest holds an unsafe path {}", p.display())))
    }
}

/// Whether `rel` is selected by `--include` prefixes (or is a parent directory of one).
pub fn included(rel: &Path, includes: &[PathBuf]) -> bool {
    includes.is_empty() || rel == Path::new(".") || includes.iter().any(|i| rel.starts_with(i) || i.starts_with(rel))
}

/// The target directory, created 0700 when it is new: restored data is private until the
/// recorded modes are applied at the end.
fn create_private(target: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if target.is_dir() {
        return Ok(());
    }
    if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io("create restore target", parent, e))?;
    }
    std::fs::DirBuilder::new().mode(0o700).create(target).map_err(|e| Error::io("create restore target", target, e))
}

/// A manifest's tree must be a tree: safe relative paths, each once, each below a directory
/// of the snapshot, hard links naming a file restored before them. Anything else is a crafted
/// or damaged manifest and nothing is restored.
pub fn check_tree(m: &Manifest) -> Result<()> {
    let mut kinds: HashMap<PathBuf, EntryKind> = HashMap::with_capacity(m.entries.len());
    let bad = |what: String| {
        Error::damaged(format!("the manifest of snapshot {} {what}: nothing was restored", m.snapshot))
            .with_hint("the repository was written by someone else or is damaged: run `veza-dr verify`")
    };
    for e in &m.entries {
        let rel = e.rel_path();
        safe_rel(&rel)?;
        let norm: PathBuf = rel.components().filter(|c| !matches!(c, Component::CurDir)).collect();
        if !norm.as_os_str().is_empty() {
            let parent = norm.parent().map(Path::to_path_buf).unwrap_or_default();
            if !parent.as_os_str().is_empty() && kinds.get(&parent) != Some(&EntryKind::Dir) {
                return Err(bad(format!(
                    "puts {} below {}, which is not one of its directories",
                    rel.display(),
                    parent.display()
                )));
            }
        }
        if e.kind == EntryKind::Hardlink {
            let first = PathBuf::from(decode_os(e.target.as_deref().unwrap_or("")));
            let ok = safe_rel(&first).is_ok() && kinds.get(&first) == Some(&EntryKind::File);
            if !ok {
                return Err(bad(format!(
                    "links {} to {}, which is not a file before it",
                    rel.display(),
                    first.display()
                )));
            }
        }
        if kinds.insert(norm, e.kind).is_some() {
            return Err(bad(format!("lists {} twice", rel.display())));
        }
    }
    Ok(())
}

/// Create the skeleton: directories, empty files of the right length, symlinks.
/// Returns the file paths (relative to the target) in entry order, for chunk targets.
pub fn prepare(dir: &SafeDir, entries: &[(usize, &Entry)], overwrite: bool) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for (_, e) in entries {
        let rel = e.rel_path();
        match e.kind {
            EntryKind::Dir => dir.mkdir(&rel, overwrite)?,
            EntryKind::File => {
                dir.create_file(&rel, e.size, overwrite)?;
                files.push(rel);
            }
            EntryKind::Symlink => dir.symlink(&rel, &decode_os(e.target.as_deref().unwrap_or("")), overwrite)?,
            EntryKind::Hardlink => {}
        }
    }
    Ok(files)
}

/// After the data: hard links, then owners, modes and times (directories last, deepest first,
/// so that writing into them does not move their mtime again).
pub fn finish(dir: &SafeDir, entries: &[(usize, &Entry)], overwrite: bool, warnings: &mut Vec<String>) -> Result<()> {
    let root = nix::unistd::geteuid().is_root();
    for (_, e) in entries.iter().filter(|(_, e)| e.kind == EntryKind::Hardlink) {
        let first = PathBuf::from(decode_os(e.target.as_deref().unwrap_or("")));
        if let Err(err) = dir.hardlink(&e.rel_path(), &first, overwrite) {
            warnings.push(format!("cannot restore hard link {}: {}", e.display(), err.message));
        }
    }
    let mut owner_warned = false;
    let mut apply = |e: &Entry| -> Result<()> {
        let owned = dir.set_meta(
            &e.rel_path(),
            e.kind == EntryKind::Symlink,
            (e.uid, e.gid),
            e.mode,
            (e.mtime, e.mtime_ns),
            root,
        )?;
        if !owned && !owner_warned {
            warnings.push("not running as root: file owners were not restored".into());
            owner_warned = true;
        }
        Ok(())
    };
    for (_, e) in entries.iter().filter(|(_, e)| e.kind != EntryKind::Dir && e.kind != EntryKind::Hardlink) {
        apply(e)?;
    }
    let mut dirs: Vec<&Entry> = entries.iter().filter(|(_, e)| e.kind == EntryKind::Dir).map(|(_, e)| *e).collect();
    dirs.sort_by_key(|e| std::cmp::Reverse(e.rel_path().components().count()));
    for e in dirs {
        apply(e)?;
    }
    Ok(())
}
