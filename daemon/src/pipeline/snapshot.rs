//! Making a snapshot from a tree or from streams: decide what to read, run the engine, build
//! the manifest, commit last.
//!
//! Every source goes through the same two steps: `prepare_*` uploads all data and builds the
//! manifest; `commit` writes the manifest and then the sidecar that makes the snapshot exist.
//! A physical PostgreSQL backup waits between the two for its WAL to be archived.

use super::backup::{self as engine, EngineConfig, Input, Progress, ReadJob};
use super::pages::{self, Stored};
use crate::error::{Error, Result};
use crate::policy::{Policy, SourceKind};
use crate::repository::format::*;
use crate::repository::lock::{self, LockGuard};
use crate::repository::state::HostState;
use crate::repository::Writer;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
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

pub fn engine_config(policy: &Policy, kind: SourceKind, repo: &Writer) -> EngineConfig {
    EngineConfig {
        chunker: repo.chunker(),
        pack_size: policy.repository.pack_size.0 as usize,
        level: policy.repository.compression_level,
        uploads: policy.repository.upload_concurrency,
        multipart_threshold: 32 << 20,
        // Page-structured relation files never shift: fixed chunks, no CDC cost.
        fixed_chunks: (kind == SourceKind::PostgresPhysical).then_some(1 << 20),
        strict_reads: kind == SourceKind::PostgresPhysical,
        page_check_lsn: None,
    }
}

/// Everything of a snapshot but the two commit writes.
pub struct Pending {
    pub state: HostState,
    pub manifest: Manifest,
    pub sidecar: Sidecar,
    locs: HashMap<ChunkId, BlobLoc>,
    live: HashSet<SnapshotId>,
    started_wall: std::time::SystemTime,
    lock_wait: std::time::Duration,
    grace: std::time::Duration,
}

/// The host's view of the repository at the start of a backup.
struct Context {
    state: HostState,
    key_id: String,
    key: [u8; 32],
    cache: HashMap<ChunkId, BlobLoc>,
    packs: HashMap<PackId, u64>,
    parent: Option<Manifest>,
    /// When the parent started: files changed since shortly before are never reused.
    parent_started: Option<chrono::DateTime<chrono::Utc>>,
    live: HashSet<SnapshotId>,
    started: chrono::DateTime<chrono::Utc>,
    started_wall: std::time::SystemTime,
}

async fn context(policy: &Policy, repo: &Writer, opts: &Options) -> Result<Context> {
    let started = chrono::Utc::now();
    let started_wall = std::time::SystemTime::now();
    let state = HostState::open(&opts.state_dir, repo.id())?;
    let (key_id, key) = state.chunk_key(repo, opts.lock_wait).await?;
    let packs = repo.packs().await?;
    let marked: HashSet<PackId> =
        repo.marks().await?.keys().filter_map(|k| crate::repository::keys::parse_pack(k)).collect();
    let cache = engine::reusable(state.load_chunks(&key_id), &packs, &marked);
    let all = repo.sidecars().await?;
    let parent = match opts.mode {
        Mode::Full => None,
        _ => all
            .iter()
            .rev()
            .filter(|s| s.policy == policy.name)
            .find_map(|s| state.load_manifest(&s.id).map(|m| (m, s.started)))
            // Chunk ids made under another key mean nothing under this one.
            .filter(|(m, _)| m.key_id == key_id),
    };
    if opts.mode == Mode::Incremental && parent.is_none() {
        tracing::info!(policy = %policy.name, "no parent snapshot under this host's key in the local state: reading everything");
    }
    let live = all.iter().map(|s| s.id.clone()).collect();
    let (parent, parent_started) = parent.map(|(m, t)| (Some(m), Some(t))).unwrap_or((None, None));
    Ok(Context { state, key_id, key, cache, packs, parent, parent_started, live, started, started_wall })
}

/// Whether a file may keep its parent's chunks unread: same metadata, and not changed since
/// shortly before the parent started. A write in the same clock tick as the parent's read
/// leaves size and times equal (racy-clean), so such files are read again, as git and
/// pgBackRest do.
pub fn unchanged(parent: &Entry, now: &Entry, parent_started: chrono::DateTime<chrono::Utc>) -> bool {
    let same = parent.size == now.size
        && parent.mtime == now.mtime
        && parent.mtime_ns == now.mtime_ns
        && parent.ino == now.ino
        && parent.ctime == now.ctime;
    let settled_ns =
        (parent_started.timestamp() - 1) as i128 * 1_000_000_000 + parent_started.timestamp_subsec_nanos() as i128;
    let mtime_ns = parent.mtime as i128 * 1_000_000_000 + parent.mtime_ns as i128;
    same && mtime_ns < settled_ns && (parent.ctime as i128) < settled_ns
}

/// How a physical backup reads: the position its pages are as new as, and whether the
/// cluster has data checksums (then pages are checked as they are read).
#[derive(Debug, Clone)]
pub struct PgRead {
    pub basis: PageBasis,
    pub checksums: bool,
}

/// Walk `root` and upload what changed since the parent.
#[allow(clippy::too_many_arguments)]
pub async fn prepare_tree(
    policy: &Policy,
    repo: &Writer,
    opts: &Options,
    kind: SourceKind,
    root: &Path,
    exclude: &[String],
    extra_roots: &[(String, PathBuf)],
    pg: Option<PgRead>,
) -> Result<Pending> {
    let ctx = context(policy, repo, opts).await?;
    let page_check = pg.as_ref().filter(|p| p.checksums).map(|p| p.basis.start_lsn);
    // Page layers over the parent need the same cluster on the same timeline, moving forward:
    // only then does a page LSN below the parent's start mean "as the parent has it". After a
    // promotion, a restore or a new initdb, LSNs say nothing about the parent: read whole.
    let since_lsn = match (pg.as_ref(), ctx.parent.as_ref().and_then(|m| m.page_basis.as_ref())) {
        (Some(now), Some(then))
            if now.basis.system_identifier == then.system_identifier
                && now.basis.timeline == then.timeline
                && now.basis.start_lsn >= then.start_lsn =>
        {
            Some(then.start_lsn)
        }
        _ => None,
    };
    // PostgreSQL's data directory is read strictly: only a file that vanished is tolerated.
    let strict = kind == SourceKind::PostgresPhysical;
    // Extra roots (PostgreSQL tablespaces) are stored under a prefix of the tree, in place of
    // the entry at that path (the pg_tblspc/<oid> symlink). `sources` says where each entry is read.
    let (walked, sources) = tokio::task::spawn_blocking({
        let root = root.to_path_buf();
        let ex = exclude.to_vec();
        let extra = extra_roots.to_vec();
        move || -> Result<(super::walk::Walked, Vec<PathBuf>)> {
            let mut w = super::walk::walk(&root, &ex, strict)?;
            w.entries.retain(|e| !extra.iter().any(|(prefix, _)| e.display() == *prefix));
            let mut sources: Vec<PathBuf> = w.entries.iter().map(|e| root.join(e.rel_path())).collect();
            for (prefix, xroot) in &extra {
                let xw = super::walk::walk(xroot, &ex, strict)?;
                for mut e in xw.entries {
                    let rel = e.rel_path();
                    sources.push(xroot.join(&rel));
                    let path = if rel == Path::new(".") { PathBuf::from(prefix) } else { Path::new(prefix).join(&rel) };
                    e.set_path(&path);
                    w.entries.push(e);
                }
                w.warnings.extend(xw.warnings);
                w.skipped += xw.skipped;
            }
            Ok((w, sources))
        }
    })
    .await
    .map_err(|e| Error::failed(format!("walk failed: {e}")))??;
    let mut entries = walked.entries;

    // Unchanged files (size, mtime, inode, ctime) whose chunks can all be reused keep their
    // chunk lists without being read.
    let parent_files: HashMap<String, &Entry> = ctx
        .parent
        .iter()
        .flat_map(|m| m.entries.iter().filter(|e| e.kind == EntryKind::File).map(|e| (e.display(), e)))
        .collect();
    // What a file was in the parent: kept as is when unchanged, the base of its page layers
    // when only its pages are read.
    let mut parents: HashMap<usize, Stored> = HashMap::new();
    let mut jobs = Vec::new();
    for (i, e) in entries.iter_mut().enumerate() {
        if e.kind != EntryKind::File {
            continue;
        }
        let rel = e.display();
        let parent = match (parent_files.get(&rel), ctx.parent.as_ref()) {
            // Only a parent whose every chunk may still be referenced serves.
            (Some(pe), Some(pm)) => {
                Stored::of(pm, pe).filter(|st| st.ids().all(|id| ctx.cache.contains_key(id))).map(|st| (*pe, st))
            }
            _ => None,
        };
        let mut layer = None;
        if let Some((pe, st)) = parent {
            if ctx.parent_started.is_some_and(|at| unchanged(pe, e, at)) {
                e.hash = pe.hash.clone();
                parents.insert(i, st);
                continue;
            }
            layer = since_lsn.and_then(|lsn| pages::layer_job(&rel, pe, e, &st, lsn));
            if layer.is_some() {
                parents.insert(i, st);
            }
        }
        let mtime_ns = e.mtime as i128 * 1_000_000_000 + e.mtime_ns as i128;
        let segment = pg.as_ref().and_then(|_| crate::source::postgres::pagecheck::first_block(&rel));
        // Relation files of a cluster with data checksums have their pages checked as read.
        let first_block = page_check.and(segment);
        jobs.push(ReadJob {
            idx: i,
            input: Input::Path(sources[i].clone()),
            size: e.size,
            mtime_ns,
            first_block,
            layer,
            // Files of one chunk are compared whole by a delta restore: no digests needed.
            digests: segment.is_some() && e.size > 1 << 20,
        });
    }
    let extra = Tree {
        kind,
        root: root.display().to_string(),
        warnings: walked.warnings,
        skipped: walked.skipped,
        page_check,
        basis: pg.map(|p| p.basis),
    };
    build(policy, repo, opts, ctx, entries, jobs, parents, extra).await
}

/// Upload named streams (e.g. pg_dump output) as the files of a snapshot.
pub async fn prepare_streams(
    policy: &Policy,
    repo: &Writer,
    opts: &Options,
    kind: SourceKind,
    label: &str,
    streams: Vec<(String, Box<dyn std::io::Read + Send>)>,
) -> Result<Pending> {
    let ctx = context(policy, repo, opts).await?;
    let now = chrono::Utc::now().timestamp();
    let mut entries = vec![dir_entry(".", now)];
    let mut jobs = Vec::new();
    for (name, r) in streams {
        let mut e = dir_entry(&name, now);
        e.kind = EntryKind::File;
        e.mode = 0o600;
        jobs.push(ReadJob {
            idx: entries.len(),
            input: Input::Stream(r),
            size: 0,
            mtime_ns: 0,
            first_block: None,
            layer: None,
            digests: false,
        });
        entries.push(e);
    }
    let extra = Tree { kind, root: label.to_string(), warnings: vec![], skipped: 0, page_check: None, basis: None };
    build(policy, repo, opts, ctx, entries, jobs, HashMap::new(), extra).await
}

pub(crate) fn dir_entry(path: &str, mtime: i64) -> Entry {
    Entry {
        path: path.to_string(),
        path_hex: None,
        kind: EntryKind::Dir,
        mode: 0o700,
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
        mtime,
        mtime_ns: 0,
        size: 0,
        chunks: vec![],
        target: None,
        hash: None,
        changed: false,
        pages: None,
        digests: None,
        ino: 0,
        ctime: 0,
    }
}

/// One line per file: its failing blocks (the first ten, then how many more).
fn page_warning(path: &str, blocks: &[u64]) -> String {
    let shown: Vec<String> = blocks.iter().take(10).map(|b| b.to_string()).collect();
    let more = if blocks.len() > 10 { format!(" and {} more", blocks.len() - 10) } else { String::new() };
    format!(
        "page checksum mismatch in {path}: block{} {}{more} (not written since the backup started: damaged on disk; the snapshot holds the damaged copy)",
        if blocks.len() == 1 { "" } else { "s" },
        shown.join(", ")
    )
}

struct Tree {
    kind: SourceKind,
    root: String,
    warnings: Vec<String>,
    skipped: u64,
    /// The backup's start LSN when pages are checked (PostgreSQL with data checksums).
    page_check: Option<u64>,
    /// A physical backup's position, recorded for the page layers of the next one.
    basis: Option<PageBasis>,
}

#[allow(clippy::too_many_arguments)]
async fn build(
    policy: &Policy,
    repo: &Writer,
    opts: &Options,
    ctx: Context,
    mut entries: Vec<Entry>,
    jobs: Vec<ReadJob>,
    mut parents: HashMap<usize, Stored>,
    tree: Tree,
) -> Result<Pending> {
    let total: u64 = jobs.iter().map(|j| j.size).sum();
    opts.progress.bytes_total.store(total, std::sync::atomic::Ordering::Relaxed);
    let cfg = EngineConfig { page_check_lsn: tree.page_check, ..engine_config(policy, tree.kind, repo) };
    let known: HashSet<ChunkId> = ctx.cache.keys().copied().collect();
    let out = {
        let (writer, progress, key) = (repo.clone(), opts.progress.clone(), ctx.key);
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || engine::run(rt, writer, cfg, key, known, jobs, progress))
            .await
            .map_err(|e| Error::failed(format!("backup engine failed: {e}")))??
    };

    let mut warnings = tree.warnings;
    let mut stats = Stats {
        files_read: out.results.len() as u64,
        chunks_new: out.chunks_new,
        bytes_new: out.bytes_new,
        bytes_uploaded: out.bytes_uploaded,
        skipped: tree.skipped,
        ..Default::default()
    };
    // Files not read keep their parent's form.
    let read: HashSet<usize> = out.results.iter().map(|r| r.idx).collect();
    let mut per_file: HashMap<usize, Stored> =
        parents.iter().filter(|(i, _)| !read.contains(i)).map(|(i, st)| (*i, st.clone())).collect();
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
        if !r.bad_pages.is_empty() {
            stats.page_checksum_failures += r.bad_pages.len() as u64;
            warnings.push(page_warning(&e.display(), &r.bad_pages));
        }
        if r.changed {
            e.changed = true;
            stats.files_changed_during_read += 1;
            warnings.push(format!("{} changed while it was read: its copy may be inconsistent", e.display()));
        }
        let stored = match r.layer {
            Some((ids, runs)) => match parents.remove(&r.idx) {
                Some(parent) if runs.is_empty() => parent.with_layer(r.size, ids, runs),
                Some(parent) => {
                    stats.files_layered += 1;
                    stats.pages_stored += runs.iter().map(|r| r.1 as u64).sum::<u64>();
                    parent.with_layer(r.size, ids, runs)
                }
                None => {
                    return Err(Error::failed(format!("internal: {} was read as pages without a parent", e.display())))
                }
            },
            None => Stored { size: r.size, base: r.chunks, layered: None, digests: None },
        };
        per_file.insert(r.idx, Stored { digests: r.digests, ..stored });
    }

    // The chunk table: every chunk the tree references, with its location.
    let mut locs = ctx.cache;
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
        let mut index = |id: &ChunkId| -> Result<u32> {
            if let Some(n) = chunk_index.get(id) {
                return Ok(*n);
            }
            let loc = locs
                .get(id)
                .ok_or_else(|| Error::failed(format!("internal: chunk {} has no location", hex::encode(id))))?;
            let p = *pack_index.entry(loc.pack).or_insert_with(|| {
                pack_list.push(loc.pack);
                (pack_list.len() - 1) as u32
            });
            table.push((hex::encode(id), p, loc.offset, loc.len, loc.raw_len));
            chunk_index.insert(*id, (table.len() - 1) as u32);
            Ok((table.len() - 1) as u32)
        };
        let st = per_file.remove(&i).unwrap_or_default();
        e.chunks = st.base.iter().map(&mut index).collect::<Result<_>>()?;
        e.digests = st.digests.as_ref().map(&mut index).transpose()?;
        e.pages = match st.layered {
            None => None,
            Some((base_size, layers)) => Some(PageLayers {
                base_size,
                layers: layers
                    .into_iter()
                    .map(|(ids, runs)| {
                        Ok(PageLayer { chunks: ids.iter().map(&mut index).collect::<Result<_>>()?, runs })
                    })
                    .collect::<Result<_>>()?,
            }),
        };
        kept.push(e);
    }
    let snap_id = SnapshotId::new(ctx.started);
    let pack_sizes: HashMap<PackId, u64> = ctx.packs.into_iter().chain(out.packs.iter().copied()).collect();
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        snapshot: snap_id.clone(),
        policy: policy.name.clone(),
        key_id: ctx.key_id,
        source_path: tree.root,
        packs: pack_list.iter().map(hex::encode).collect(),
        chunks: table,
        entries: kept,
        extra: None,
        warnings: warnings.clone(),
        page_basis: tree.basis,
    };
    let sidecar = Sidecar {
        format: FORMAT_VERSION,
        id: snap_id,
        policy: policy.name.clone(),
        kind: if ctx.parent.is_some() { SnapshotKind::Incremental } else { SnapshotKind::Full },
        source: tree.kind,
        host: lock::hostname(),
        started: ctx.started,
        finished: ctx.started,
        parent: ctx.parent.as_ref().map(|m| m.snapshot.clone()),
        packs: pack_list.iter().map(|p| PackRef { id: *p, size: pack_sizes.get(p).copied().unwrap_or(0) }).collect(),
        manifest_size: 0,
        stats,
        postgres: None,
        warning_count: warnings.len() as u64,
        warnings,
        manifest_hash: None,
        key_hash: None,
        signature: None,
    };
    Ok(Pending {
        state: ctx.state,
        manifest,
        sidecar,
        locs,
        live: ctx.live,
        started_wall: ctx.started_wall,
        lock_wait: opts.lock_wait,
        grace: policy.retention.grace(),
    })
}

/// Commit last: every pack and index is durable (the engine waited for them); now the
/// manifest, then the sidecar that makes the snapshot exist.
pub async fn commit(repo: &Writer, guard: &LockGuard, mut p: Pending) -> Result<Sidecar> {
    // Prune deletes what it marked once the grace has passed: a backup older than that may
    // reuse a pack that is gone by now, so it must not commit. (A zero grace, below the floor,
    // is for tests only: prune then relies on leases alone.)
    let age = p.started_wall.elapsed().unwrap_or_default();
    if !p.grace.is_zero() && age >= p.grace {
        return Err(Error::failed(format!(
            "backup {} ran for {}, longer than the prune grace of {}: it is not committed",
            p.sidecar.id,
            humantime::format_duration(Duration::from_secs(age.as_secs())),
            humantime::format_duration(p.grace)
        ))
        .with_hint("raise [retention] prune-grace above the longest backup, or run it again"));
    }
    let z = repo.commit(&p.manifest, &mut p.sidecar, guard).await?;
    // Local state after the commit: losing it costs dedup only.
    let key_id = p.manifest.key_id.clone();
    let saved = tokio::task::block_in_place(|| {
        p.state.save_chunks(&key_id, &p.locs, p.lock_wait).and_then(|_| p.state.save_manifest(&p.manifest.snapshot, &z))
    });
    if let Err(e) = saved {
        tracing::warn!(error = %e, "could not update the local state; the next backup reads everything again");
    }
    p.live.insert(p.sidecar.id.clone());
    p.state.retain_manifests(&p.live, p.started_wall);
    Ok(p.sidecar)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(mtime: i64, ctime_s: i64) -> Entry {
        Entry {
            path: "f".into(),
            path_hex: None,
            kind: EntryKind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime,
            mtime_ns: 0,
            size: 10,
            chunks: vec![],
            target: None,
            hash: None,
            changed: false,
            pages: None,
            digests: None,
            ino: 7,
            ctime: ctime_s * 1_000_000_000,
        }
    }

    #[test]
    fn files_changed_near_the_parents_start_are_read_again() {
        let start: chrono::DateTime<chrono::Utc> = "2026-12-01T10:00:00Z".parse().unwrap();
        let t = start.timestamp();
        // Settled long before the parent: reused.
        assert!(unchanged(&file(t - 60, t - 60), &file(t - 60, t - 60), start));
        // Written in the parent's second (or during it): the same times can hide a new content.
        assert!(!unchanged(&file(t, t), &file(t, t), start));
        assert!(!unchanged(&file(t - 60, t), &file(t - 60, t), start));
        assert!(!unchanged(&file(t + 30, t + 30), &file(t + 30, t + 30), start));
        // Different metadata: read, as always.
        assert!(!unchanged(&file(t - 60, t - 60), &file(t - 59, t - 59), start));
    }
}
