//! A backup job: lock, decide what to read, run the engine, commit the snapshot last.

use crate::error::{Error, Result};
use crate::pipeline::backup::{self as engine, EngineConfig, Input, Progress, ReadJob};
use crate::policy::{Policy, Source};
use crate::repository::cache::HostState;
use crate::repository::format::*;
use crate::repository::lock::{self, LockKind};
use crate::repository::Repo;
use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Incremental when a parent is known locally, else full.
    Auto,
    Full,
    Incremental,
}

pub struct Options {
    pub mode: Mode,
    pub state_dir: PathBuf,
    pub lock_wait: Duration,
    pub progress: Arc<Progress>,
}

pub fn engine_config(policy: &Policy, repo: &Repo) -> EngineConfig {
    EngineConfig {
        chunker: repo.config.chunker,
        pack_size: policy.repository.pack_size.0 as usize,
        level: policy.repository.compression_level,
        uploads: policy.repository.upload_concurrency,
        multipart_threshold: 32 << 20,
    }
}

/// Back up the policy's source and return the committed snapshot's sidecar.
pub async fn run(policy: &Policy, opts: &Options) -> Result<Sidecar> {
    let vol = match &policy.source {
        Source::Volume(v) => v.clone(),
        Source::Postgres(_) => {
            return Err(Error::failed(format!(
                "policy {}: postgres sources are not supported by this build yet",
                policy.name
            ))
            .with_hint("volume policies work; PostgreSQL backups land with the postgres work"))
        }
    };
    let repo = Arc::new(Repo::open(policy).await?);
    let guard =
        lock::acquire(&repo.store, LockKind::Shared, &format!("backup {}", policy.name), opts.lock_wait).await?;
    let r = run_locked(policy, &vol, &repo, opts, &guard).await;
    let released = guard.release().await;
    let sidecar = r?;
    if let Err(e) = released {
        tracing::warn!(error = %e, "could not remove the lock object; it will expire");
    }
    Ok(sidecar)
}

async fn run_locked(
    policy: &Policy,
    vol: &crate::policy::VolumeSource,
    repo: &Arc<Repo>,
    opts: &Options,
    guard: &lock::LockGuard,
) -> Result<Sidecar> {
    let started = chrono::Utc::now();
    let snap_id = new_snapshot_id(started);
    let state = HostState::open(&opts.state_dir, &repo.config.id)?;
    let (key_id, key) = state.chunk_key(repo).await?;

    let packs = repo.packs().await?;
    let marked: HashSet<PackId> =
        repo.marks().await?.keys().filter_map(|k| k.rsplit('/').next().and_then(parse_hex32)).collect();
    let cache = engine::reusable(state.load_chunks(), &packs, &marked);

    let all = repo.sidecars().await?;
    let snaps: Vec<&Sidecar> = all.iter().filter(|s| s.policy == policy.name).collect();
    let parent = match opts.mode {
        Mode::Full => None,
        _ => snaps.iter().rev().find_map(|s| state.load_manifest(&s.id)),
    };
    if opts.mode == Mode::Incremental && parent.is_none() {
        tracing::info!(policy = %policy.name, "no parent snapshot in the local state: reading everything");
    }
    let kind = if parent.is_some() { "incremental" } else { "full" };

    let root = vol.path.clone();
    let walked = tokio::task::spawn_blocking({
        let root = root.clone();
        let ex = vol.exclude.clone();
        move || crate::source::volume::walk(&root, &ex)
    })
    .await
    .map_err(|e| Error::failed(format!("walk failed: {e}")))??;
    let mut entries = walked.entries;
    let mut warnings = walked.warnings;

    // Parent lookup: unchanged files (size, mtime, inode, ctime) whose chunks are all still
    // reusable keep their chunk lists without being read.
    let parent_files: HashMap<String, (&Entry, &Manifest)> = parent
        .iter()
        .flat_map(|m| m.entries.iter().filter(|e| e.kind == EntryKind::File).map(move |e| (e.display(), (e, m))))
        .collect();
    let mut reused: HashMap<usize, Vec<ChunkId>> = HashMap::new();
    let mut jobs = Vec::new();
    let mut total = 0u64;
    for (i, e) in entries.iter_mut().enumerate() {
        if e.kind != EntryKind::File {
            continue;
        }
        if let Some((pe, pm)) = parent_files.get(&e.display()) {
            let same = pe.size == e.size
                && pe.mtime == e.mtime
                && pe.mtime_ns == e.mtime_ns
                && pe.ino == e.ino
                && pe.ctime == e.ctime;
            if same {
                let ids: Option<Vec<ChunkId>> =
                    pe.chunks.iter().map(|&c| parse_hex32(&pm.chunks[c as usize].0)).collect();
                if let Some(ids) = ids.filter(|ids| ids.iter().all(|id| cache.contains_key(id))) {
                    e.hash = pe.hash.clone();
                    reused.insert(i, ids);
                    continue;
                }
            }
        }
        total += e.size;
        jobs.push(ReadJob {
            idx: i,
            input: Input::Path(root.join(e.rel_path())),
            size: e.size,
            mtime_ns: e.mtime as i128 * 1_000_000_000 + e.mtime_ns as i128,
        });
    }
    opts.progress.bytes_total.store(total, std::sync::atomic::Ordering::Relaxed);

    let cfg = engine_config(policy, repo);
    let known: HashSet<ChunkId> = cache.keys().copied().collect();
    let out = {
        let (store, sealer, progress) = (repo.store.clone(), repo.sealer.clone(), opts.progress.clone());
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || engine::run(rt, store, sealer, cfg, key, known, jobs, progress))
            .await
            .map_err(|e| Error::failed(format!("backup engine failed: {e}")))??
    };

    let mut stats = Stats {
        files_read: out.results.len() as u64,
        chunks_new: out.chunks_new,
        bytes_new: out.bytes_new,
        bytes_uploaded: out.bytes_uploaded,
        skipped: walked.skipped,
        ..Default::default()
    };
    let mut per_file: HashMap<usize, Vec<ChunkId>> = reused;
    let mut drop_idx = HashSet::new();
    for r in out.results {
        let e = &mut entries[r.idx];
        if let Some(w) = r.skipped {
            warnings.push(w);
            stats.skipped += 1;
            drop_idx.insert(r.idx);
            continue;
        }
        stats.bytes_read += r.size;
        e.size = r.size;
        e.hash = Some(hex::encode(r.hash));
        if r.changed {
            e.changed = true;
            stats.files_changed_during_read += 1;
            warnings.push(format!("{} changed while it was read: its copy may be inconsistent", e.display()));
        }
        per_file.insert(r.idx, r.chunks);
    }

    // The chunk table: every chunk the tree references, with its location.
    let mut locs = cache;
    locs.extend(out.new_locs.iter().map(|(k, v)| (*k, *v)));
    let mut chunk_index: HashMap<ChunkId, u32> = HashMap::new();
    let mut pack_index: HashMap<PackId, u32> = HashMap::new();
    let mut table = Vec::new();
    let mut pack_list: Vec<PackId> = Vec::new();
    let mut kept = Vec::with_capacity(entries.len());
    for (i, mut e) in entries.into_iter().enumerate() {
        if drop_idx.contains(&i) {
            continue;
        }
        match e.kind {
            EntryKind::Dir => stats.dirs += 1,
            EntryKind::File | EntryKind::Hardlink => stats.files += 1,
            EntryKind::Symlink => {}
        }
        stats.bytes += e.size;
        if let Some(ids) = per_file.remove(&i) {
            for id in ids {
                let n = match chunk_index.get(&id) {
                    Some(n) => *n,
                    None => {
                        let loc = locs.get(&id).ok_or_else(|| {
                            Error::failed(format!("internal: chunk {} has no location", hex::encode(id)))
                        })?;
                        let p = *pack_index.entry(loc.pack).or_insert_with(|| {
                            pack_list.push(loc.pack);
                            (pack_list.len() - 1) as u32
                        });
                        table.push((hex::encode(id), p, loc.offset, loc.len, loc.raw_len));
                        chunk_index.insert(id, (table.len() - 1) as u32);
                        (table.len() - 1) as u32
                    }
                };
                e.chunks.push(n);
            }
        }
        kept.push(e);
    }
    let pack_sizes: HashMap<PackId, u64> = packs.into_iter().chain(out.packs.iter().copied()).collect();
    let manifest = Manifest {
        format: FORMAT_VERSION,
        snapshot: snap_id.clone(),
        policy: policy.name.clone(),
        key_id,
        source_path: root.display().to_string(),
        packs: pack_list.iter().map(hex::encode).collect(),
        chunks: table,
        entries: kept,
        extra: serde_json::Value::Null,
    };

    // Commit last: every pack and index is durable (the engine waited for them); now the
    // manifest, then the sidecar that makes the snapshot exist.
    guard.check()?;
    let manifest_size = repo.put_sealed_json(&manifest_key(&snap_id), &manifest).await?;
    let sidecar = Sidecar {
        format: FORMAT_VERSION,
        id: snap_id.clone(),
        policy: policy.name.clone(),
        kind: kind.into(),
        source: policy.source_type().into(),
        host: lock::hostname(),
        started,
        finished: chrono::Utc::now(),
        parent: parent.as_ref().map(|m| m.snapshot.clone()),
        packs: pack_list
            .iter()
            .map(|p| PackRef { id: hex::encode(p), size: pack_sizes.get(p).copied().unwrap_or(0) })
            .collect(),
        manifest_size,
        stats,
        postgres: None,
        warnings,
    };
    guard.check()?;
    repo.store
        .put(&sidecar_key(&snap_id), Bytes::from(serde_json::to_vec_pretty(&sidecar).expect("serialisable")))
        .await?;

    // Local state after the commit: losing it costs dedup only.
    if let Err(e) = state.save_chunks(&locs).and_then(|_| state.save_manifest(&manifest)) {
        tracing::warn!(error = %e, "could not update the local state; the next backup reads everything again");
    }
    let live: HashSet<String> = all.iter().map(|s| s.id.clone()).chain([snap_id]).collect();
    state.retain_manifests(&live);
    Ok(sidecar)
}
