//! Prune: forget snapshots that retention no longer keeps, then two-phase deletion of
//! unreferenced objects: mark now, delete on a later run once the grace period has passed
//! and the object is still unreferenced. Needs no private key: it reads only sidecars.

use crate::crypto::Sealer;
use crate::error::Result;
use crate::policy::{Policy, SourceKind};
use crate::repository::format::*;
use crate::repository::lock::{self, LockKind};
use crate::repository::{keys, Repository, Writer};
use crate::source::postgres::wal::WalName;
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

#[derive(Debug, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Report {
    pub dry_run: bool,
    pub kept: BTreeMap<String, Vec<String>>,
    pub forgotten: Vec<String>,
    pub marked: Vec<String>,
    pub deleted: Vec<String>,
    pub unmarked: Vec<String>,
    pub bytes_deleted: u64,
    pub pending: usize,
}

pub async fn run(policy: &Policy, dry_run: bool, lock_wait: Duration) -> Result<Report> {
    let repo = Repository::open(policy).await?;
    let guard = if dry_run {
        None
    } else {
        Some(repo.lock(LockKind::Exclusive, &format!("prune {}", policy.name), lock_wait).await?)
    };
    let writer = repo.writer(Sealer::new(&policy.encryption.recipients));
    let r = run_locked(&writer, policy, dry_run, guard.as_ref()).await;
    if let Some(g) = guard {
        let _ = g.release().await;
    }
    r
}

async fn run_locked(repo: &Writer, policy: &Policy, dry_run: bool, guard: Option<&lock::LockGuard>) -> Result<Report> {
    let now = Utc::now();
    let grace = policy.retention.grace();
    let all = repo.sidecars().await?;
    let mine: Vec<Sidecar> = all.iter().filter(|s| s.policy == policy.name).cloned().collect();
    let (kept, forgotten) = super::retention::select(&mine, &policy.retention, now);
    let mut rep =
        Report { dry_run, kept, forgotten: forgotten.iter().map(|id| id.to_string()).collect(), ..Default::default() };

    if !dry_run {
        for id in &forgotten {
            // Uncommit first: once the sidecar is gone the snapshot no longer exists.
            repo.forget(id).await?;
        }
    }
    let forgotten: HashSet<&SnapshotId> = forgotten.iter().collect();
    let live: Vec<&Sidecar> = all.iter().filter(|s| !forgotten.contains(&s.id)).collect();
    let live_ids: HashSet<&SnapshotId> = live.iter().map(|s| &s.id).collect();
    let referenced: HashSet<PackId> = live.iter().flat_map(|s| s.packs.iter().map(|p| p.id)).collect();

    // Everything that could be garbage: packs, indexes, manifests.
    let packs = repo.packs().await?;
    let sizes: BTreeMap<String, u64> = packs.iter().map(|(id, n)| (keys::pack(id), *n)).collect();
    let mut candidates: Vec<String> = packs.keys().filter(|id| !referenced.contains(*id)).map(keys::pack).collect();
    for id in repo.indexes().await? {
        if !packs.contains_key(&id) {
            candidates.push(keys::index(&id));
        }
    }
    for id in repo.manifests().await? {
        if !live_ids.contains(&id) && !forgotten.contains(&id) {
            candidates.push(keys::manifest(&id));
        }
    }
    // WAL is kept per cluster, whatever the policy names: a segment older than the oldest
    // retained physical backup of its cluster (by any policy in this repository) can no longer
    // be replayed from any backup. A cluster with no retained backup keeps all its WAL.
    let mut oldest: HashMap<u64, WalName> = HashMap::new();
    for s in live.iter().filter(|s| s.source == SourceKind::PostgresPhysical) {
        let Some(pg) = s.pg() else { continue };
        let Ok(cluster) = pg.system_identifier.parse::<u64>() else { continue };
        let e = oldest.entry(cluster).or_insert_with(|| pg.start_wal.clone());
        if pg.start_wal.position() < e.position() {
            *e = pg.start_wal.clone();
        }
    }
    for (cluster, name, fp) in repo.wal_files().await? {
        let keep_from = oldest.get(&cluster).and_then(|o| o.position());
        if let (Some(from), Some(pos)) = (keep_from, name.position()) {
            if pos < from {
                candidates.push(keys::wal_object(cluster, &name, &fp));
            }
        }
    }
    let candidates: HashSet<String> = candidates.into_iter().collect();

    let mut marks = repo.marks().await?;
    let mut next: BTreeMap<String, DateTime<Utc>> = BTreeMap::new();
    // Phase 2: delete what was marked long enough ago and is still garbage.
    for (k, at) in &marks {
        if !candidates.contains(k) {
            if sizes.contains_key(k) || k.starts_with("snapshots/") {
                rep.unmarked.push(k.clone());
            }
            continue;
        }
        let due = now.signed_duration_since(*at).to_std().unwrap_or_default() >= grace;
        if !due {
            next.insert(k.clone(), *at);
            continue;
        }
        if !dry_run {
            if let Some(g) = guard {
                g.check().await?;
            }
            repo.delete_garbage(k).await?;
        }
        rep.bytes_deleted += sizes.get(k).copied().unwrap_or(0);
        rep.deleted.push(k.clone());
    }
    // Phase 1: mark new garbage.
    for k in &candidates {
        if !marks.contains_key(k) {
            next.insert(k.clone(), now);
            rep.marked.push(k.clone());
        }
    }
    rep.marked.sort();
    rep.pending = next.len();
    if !dry_run {
        marks.clear();
        marks.extend(next);
        repo.write_marks(&marks).await?;
    }
    Ok(rep)
}
