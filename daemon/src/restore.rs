//! Restoring a volume snapshot into a directory.

use crate::crypto::Opener;
use crate::error::{Error, Result};
use crate::pipeline::restore::{self as fetcher, Damage, FileSink, Want};
use crate::repository::format::*;
use crate::repository::Repo;
use crate::source::volume;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

pub struct Options {
    pub snapshot: String,
    pub target: PathBuf,
    pub includes: Vec<PathBuf>,
    pub overwrite: bool,
    pub bytes_done: Arc<AtomicU64>,
    pub bytes_total: Arc<AtomicU64>,
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
    /// Source-specific data from the manifest (a PostgreSQL backup label).
    #[serde(skip)]
    pub extra: serde_json::Value,
    /// Owner of the source root, for restores that must hand the tree to a service user.
    #[serde(skip)]
    pub owner: (u32, u32),
}

/// Chunk wants for a set of (file index, entry): each chunk with every offset it lands at.
pub fn plan(manifest: &Manifest, files: &[&Entry]) -> Result<Vec<Want>> {
    let packs: Vec<PackId> = manifest
        .packs
        .iter()
        .map(|p| {
            parse_hex32(p)
                .ok_or_else(|| Error::damaged(format!("manifest of {} names a malformed pack id", manifest.snapshot)))
        })
        .collect::<Result<_>>()?;
    let mut wants: HashMap<u32, Want> = HashMap::new();
    for (fi, e) in files.iter().enumerate() {
        let mut off = 0u64;
        for &c in &e.chunks {
            let (id, p, o, len, raw) = manifest.chunks.get(c as usize).ok_or_else(|| {
                Error::damaged(format!("manifest of {} references chunk {c} beyond its table", manifest.snapshot))
            })?;
            let w = match wants.entry(c) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let id = parse_hex32(id).ok_or_else(|| {
                        Error::damaged(format!("manifest of {} holds a malformed chunk id", manifest.snapshot))
                    })?;
                    let pack = *packs.get(*p as usize).ok_or_else(|| {
                        Error::damaged(format!("manifest of {} references pack {p} beyond its list", manifest.snapshot))
                    })?;
                    v.insert(Want { id, loc: BlobLoc { pack, offset: *o, len: *len, raw_len: *raw }, targets: vec![] })
                }
            };
            w.targets.push((fi, off));
            off += *raw as u64;
        }
    }
    Ok(wants.into_values().collect())
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
                (EntryKind::Hardlink, Some(first)) if !volume::included(&first.rel_path(), includes) => {
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

pub async fn run(repo: &Repo, opener: &Opener, opts: &Options) -> Result<Summary> {
    let snap = repo.find_snapshot(&opts.snapshot).await?;
    let manifest = repo.manifest(&snap, opener).await?;
    let key = repo.chunk_key(&manifest.key_id, opener).await?;

    let target = &opts.target;
    if target.exists() && !opts.overwrite {
        let non_empty = std::fs::read_dir(target).map_err(|e| Error::io("read", target, e))?.next().is_some();
        if non_empty {
            return Err(Error::usage(format!("restore target {} is not empty", target.display()))
                .with_hint("restore into an empty or new directory, or pass --overwrite"));
        }
    }
    std::fs::create_dir_all(target).map_err(|e| Error::io("create restore target", target, e))?;

    let entries = detach_hardlinks(&manifest.entries, &opts.includes);
    let selected: Vec<(usize, &Entry)> =
        entries.iter().enumerate().filter(|(_, e)| volume::included(&e.rel_path(), &opts.includes)).collect();
    if !opts.includes.is_empty() && selected.iter().all(|(_, e)| e.rel_path() == Path::new(".")) {
        return Err(Error::not_found(format!("no path in snapshot {} matches --include", snap.id)));
    }
    let paths = volume::prepare(target, &selected)?;
    let files: Vec<&Entry> = selected.iter().filter(|(_, e)| e.kind == EntryKind::File).map(|(_, e)| *e).collect();
    let wants = plan(&manifest, &files)?;
    let total: u64 = files.iter().map(|e| e.size).sum();
    opts.bytes_total.store(total, std::sync::atomic::Ordering::Relaxed);
    let sink = Arc::new(FileSink::new(paths));
    let damage = fetcher::fetch(&repo.store, opener, key, wants, sink, 4, opts.bytes_done.clone()).await?;

    let mut warnings = Vec::new();
    volume::finish(target, &selected, &mut warnings)?;
    if !damage.is_empty() {
        return Err(damage_error(&snap.id, &damage, &|f| files[f].display()));
    }
    Ok(Summary {
        snapshot: snap.id.clone(),
        target: target.display().to_string(),
        files: files.len() as u64,
        dirs: selected.iter().filter(|(_, e)| e.kind == EntryKind::Dir).count() as u64,
        bytes: total,
        warnings,
        owner: manifest.entries.iter().find(|e| e.path == ".").map(|e| (e.uid, e.gid)).unwrap_or((0, 0)),
        extra: manifest.extra.clone(),
    })
}
