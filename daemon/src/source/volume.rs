//! The volume source: a directory tree with its metadata (modes, owners, times, symlinks,
//! hard links, empty directories): walked for a backup, restored through the pipeline's
//! tree restore, drilled by restoring into the sandbox and comparing every file's hash.

use super::{phase, DrillEnv, Drilled, RestoreRequest, Restored, Source};
use crate::error::{Error, Result};
use crate::pipeline::snapshot::{commit, prepare_tree, Options as BackupOptions};
use crate::pipeline::tree;
use crate::policy::{Policy, SourceKind, VolumeSource};
use crate::repository::format::*;
use crate::repository::lock::LockGuard;
use crate::repository::{Unlocked, Writer};
use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

pub struct Volume {
    pub policy: Policy,
    pub cfg: VolumeSource,
}

#[async_trait::async_trait]
impl Source for Volume {
    fn kind(&self) -> SourceKind {
        SourceKind::Volume
    }

    async fn backup(&self, repo: &Writer, opts: &BackupOptions, guard: &LockGuard) -> Result<Sidecar> {
        let p = prepare_tree(&self.policy, repo, opts, self.kind(), &self.cfg.path, &self.cfg.exclude, &[]).await?;
        commit(repo, guard, p).await
    }

    async fn restore(&self, repo: &Unlocked, req: &RestoreRequest) -> Result<Restored> {
        let r = &req.recovery;
        if r.time.is_some() || r.lsn.is_some() || r.xid.is_some() || r.name.is_some() || r.immediate || req.start {
            return Err(Error::usage("--to-*, --immediate and --start apply to PostgreSQL physical restores only"));
        }
        if req.target_dsn.is_some() {
            return Err(Error::usage("--target-dsn applies to logical PostgreSQL restores only"));
        }
        let target = req.target.clone().ok_or_else(|| Error::usage("restore needs --target DIR"))?;
        let opts = tree::Options {
            snapshot: req.snapshot.clone().unwrap_or_else(|| "latest".into()),
            target,
            includes: req.includes.clone(),
            overwrite: req.overwrite,
            bytes_done: req.progress.done.clone(),
            bytes_total: req.progress.total.clone(),
        };
        tree::restore(repo, &opts).await.map(Restored::Tree)
    }

    async fn drill(&self, repo: &Unlocked, snap: &Sidecar, env: &mut dyn DrillEnv) -> Option<Drilled> {
        let target = env.dir().join("tree");
        let ropts = tree::Options {
            snapshot: snap.id.to_string(),
            target: target.clone(),
            includes: vec![],
            overwrite: false,
            bytes_done: Default::default(),
            bytes_total: Default::default(),
        };
        let restore = tree::restore(repo, &ropts);
        phase(env, "fetch, decrypt, write", restore, |s| {
            format!("{} files, {} bytes from snapshot {}", s.files, s.bytes, s.snapshot)
        })
        .await?;
        phase(env, "compare with recorded hashes", compare_tree(repo, snap, &target), |d| d.clone()).await?;
        // The data is as of the snapshot's start.
        Some(Drilled { at: Some(snap.started), tree: Some(target) })
    }
}

/// Hash every restored file as a backup does and compare with the snapshot's record.
async fn compare_tree(repo: &Unlocked, snap: &Sidecar, target: &Path) -> Result<String> {
    let m = repo.manifest(snap).await?;
    let key = repo.chunk_key(&m.key_id).await?;
    let chunker = repo.chunker();
    let files: Vec<(PathBuf, u64, Option<String>, String)> = m
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::File)
        .map(|e| (target.join(e.rel_path()), e.size, e.hash.clone(), e.display()))
        .collect();
    let n = files.len();
    let bad = tokio::task::spawn_blocking(move || {
        let mut bad = Vec::new();
        for (path, size, hash, name) in files {
            match crate::pipeline::backup::hash_file(&path, &key, chunker, None) {
                Ok((s, h)) if s == size && hash.as_deref() == Some(hex::encode(h).as_str()) => {}
                Ok(_) => bad.push(format!("{name} differs")),
                Err(e) => bad.push(format!("{name}: {e}")),
            }
        }
        bad
    })
    .await
    .map_err(|e| Error::failed(format!("compare failed: {e}")))?;
    if bad.is_empty() {
        Ok(format!("{n} files match the snapshot's hashes"))
    } else {
        Err(Error::damaged(format!(
            "{} of {n} files differ from the snapshot: {}",
            bad.len(),
            bad.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
        )))
    }
}

/// The tree as walked: entries in walk order (parents before children), and warnings.
pub struct Walked {
    pub entries: Vec<Entry>,
    pub warnings: Vec<String>,
    pub skipped: u64,
}

pub fn walk(root: &Path, exclude: &[String]) -> Result<Walked> {
    let meta = std::fs::metadata(root).map_err(|e| Error::io("read volume", root, e))?;
    if !meta.is_dir() {
        return Err(Error::policy(format!("volume path {} is not a directory", root.display())));
    }
    let mut gs = globset::GlobSetBuilder::new();
    for g in exclude {
        gs.add(globset::Glob::new(g).map_err(|e| Error::policy(format!("exclude pattern `{g}` is invalid: {e}")))?);
    }
    let excl = gs.build().map_err(|e| Error::policy(format!("exclude patterns are invalid: {e}")))?;
    let mut out = Walked { entries: Vec::new(), warnings: Vec::new(), skipped: 0 };
    let mut first_link: HashMap<(u64, u64), String> = HashMap::new();
    let it = walkdir::WalkDir::new(root).follow_links(false).sort_by_file_name().into_iter();
    let it = it.filter_entry(|e| {
        let rel = e.path().strip_prefix(root).unwrap_or(e.path());
        rel.as_os_str().is_empty() || !(excl.is_match(rel) || excl.is_match(e.file_name()))
    });
    for item in it {
        let de = match item {
            Ok(d) => d,
            Err(e) => {
                // Vanished or unreadable: warn and go on, as an SRE expects from a file backup.
                out.warnings.push(format!("skipped {}", e.to_string().replace('\n', " ")));
                out.skipped += 1;
                continue;
            }
        };
        let rel = de.path().strip_prefix(root).unwrap_or(de.path());
        let rel = if rel.as_os_str().is_empty() { Path::new(".") } else { rel };
        let m = match de.path().symlink_metadata() {
            Ok(m) => m,
            Err(e) => {
                out.warnings.push(format!("skipped {}: {e}", rel.display()));
                out.skipped += 1;
                continue;
            }
        };
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            EntryKind::Dir
        } else if ft.is_symlink() {
            EntryKind::Symlink
        } else if ft.is_file() {
            EntryKind::File
        } else {
            let what = if ft.is_socket() {
                "socket"
            } else if ft.is_fifo() {
                "fifo"
            } else if ft.is_block_device() || ft.is_char_device() {
                "device"
            } else {
                "special file"
            };
            tracing::warn!(path = %rel.display(), "skipping {what}");
            out.warnings.push(format!("skipped {what} {}", rel.display()));
            out.skipped += 1;
            continue;
        };
        let mut e = Entry {
            path: String::new(),
            path_hex: None,
            kind,
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            mtime: m.mtime(),
            mtime_ns: m.mtime_nsec() as u32,
            size: if kind == EntryKind::File { m.len() } else { 0 },
            chunks: vec![],
            target: None,
            hash: None,
            changed: false,
            ino: m.ino(),
            ctime: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
        };
        e.set_path(rel);
        if kind == EntryKind::Symlink {
            match std::fs::read_link(de.path()) {
                Ok(t) => e.target = Some(encode_os(t.as_os_str())),
                Err(err) => {
                    out.warnings.push(format!("skipped symlink {}: {err}", rel.display()));
                    continue;
                }
            }
        }
        if kind == EntryKind::File && m.nlink() > 1 {
            let k = (m.dev(), m.ino());
            match first_link.get(&k) {
                Some(first) => {
                    e.kind = EntryKind::Hardlink;
                    e.target = Some(first.clone());
                    e.size = 0;
                }
                None => {
                    first_link.insert(k, encode_os(rel.as_os_str()));
                }
            }
        }
        out.entries.push(e);
    }
    Ok(out)
}
