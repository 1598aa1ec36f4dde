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
        let p =
            prepare_tree(&self.policy, repo, opts, self.kind(), &self.cfg.path, &self.cfg.exclude, &[], None).await?;
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
            delta: req.delta,
            checksum: req.checksum,
            records: req.records.clone(),
            bytes_done: req.progress.done.clone(),
            bytes_total: req.progress.total.clone(),
            dir: None,
        };
        let mut s = tree::restore(repo, &opts).await?;
        crate::pipeline::record::save_or_warn(
            s.record.take(),
            &opts.target,
            None,
            req.records.as_deref(),
            &mut s.warnings,
        )
        .await;
        Ok(Restored::Tree(s))
    }

    async fn drill(&self, repo: &Unlocked, snap: &Sidecar, env: &mut dyn DrillEnv) -> Option<Drilled> {
        let target = env.dir().join("tree");
        let ropts = tree::Options {
            snapshot: snap.id.to_string(),
            target: target.clone(),
            includes: vec![],
            overwrite: false,
            delta: false,
            checksum: false,
            records: None,
            bytes_done: Default::default(),
            bytes_total: Default::default(),
            dir: None,
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
    let key = repo.chunk_key(snap, &m.key_id).await?;
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
