//! Prune: forget snapshots that retention no longer keeps, then two-phase deletion of
//! unreferenced objects: mark now, delete on a later run once the grace period has passed
//! and the object is still unreferenced. Needs no private key: it reads only sidecars.

use crate::error::Result;
use crate::policy::Policy;
use crate::repository::format::*;
use crate::repository::lock::{self, LockKind};
use crate::repository::Repo;
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashSet};
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

pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);

pub async fn run(repo: &Repo, policy: &Policy, dry_run: bool, lock_wait: Duration) -> Result<Report> {
    let guard = if dry_run {
        None
    } else {
        Some(lock::acquire(&repo.store, LockKind::Exclusive, &format!("prune {}", policy.name), lock_wait).await?)
    };
    let r = run_locked(repo, policy, dry_run, guard.as_ref()).await;
    if let Some(g) = guard {
        let _ = g.release().await;
    }
    r
}

async fn run_locked(repo: &Repo, policy: &Policy, dry_run: bool, guard: Option<&lock::LockGuard>) -> Result<Report> {
    let now = Utc::now();
    let grace = policy.retention.prune_grace.map(|d| d.0).unwrap_or(DEFAULT_GRACE);
    let all = repo.sidecars().await?;
    let mine: Vec<Sidecar> = all.iter().filter(|s| s.policy == policy.name).cloned().collect();
    let (kept, forgotten) = crate::retention::select(&mine, &policy.retention, now);
    let mut rep = Report { dry_run, kept, forgotten: forgotten.clone(), ..Default::default() };

    if !dry_run {
        for id in &forgotten {
            // Uncommit first: once the sidecar is gone the snapshot no longer exists.
            repo.store.delete(&sidecar_key(id)).await?;
            repo.store.delete(&manifest_key(id)).await?;
        }
    }
    let forgotten: HashSet<&String> = forgotten.iter().collect();
    let live: Vec<&Sidecar> = all.iter().filter(|s| !forgotten.contains(&s.id)).collect();
    let live_ids: HashSet<&str> = live.iter().map(|s| s.id.as_str()).collect();
    let referenced: HashSet<String> = live.iter().flat_map(|s| s.packs.iter().map(|p| pack_key_hex(&p.id))).collect();

    // Everything that could be garbage: packs, indexes, manifests.
    let packs = repo.store.list("data/").await?;
    let pack_ids: HashSet<String> =
        packs.iter().filter_map(|(k, _)| k.rsplit('/').next().map(str::to_string)).collect();
    let sizes: BTreeMap<String, u64> = packs.iter().cloned().collect();
    let mut candidates: Vec<String> =
        packs.iter().filter(|(k, _)| !referenced.contains(k)).map(|(k, _)| k.clone()).collect();
    for (k, _) in repo.store.list("index/").await? {
        if !pack_ids.contains(k.trim_start_matches("index/")) {
            candidates.push(k);
        }
    }
    for (k, _) in repo.store.list("snapshots/").await? {
        if let Some(id) = k.strip_prefix("snapshots/").and_then(|r| r.strip_suffix(".manifest")) {
            if !live_ids.contains(id) && !forgotten.contains(&id.to_string()) {
                candidates.push(k);
            }
        }
    }
    // WAL older than the oldest retained physical backup of this policy can no longer be
    // replayed from any backup: it becomes garbage like an unreferenced pack.
    let oldest_start = live
        .iter()
        .filter(|s| s.policy == policy.name && s.source == "postgres-physical")
        .filter_map(|s| s.postgres.as_ref()?.get("start-wal")?.as_str().map(str::to_string))
        .min_by(|a, b| a.get(8..).cmp(&b.get(8..)));
    if let Some(oldest) = oldest_start.filter(|o| o.len() == 24) {
        for (name, key) in crate::wal::list_names(&repo.store).await? {
            if name.len() >= 24 && !name.ends_with(".history") && name[8..24] < oldest[8..24] {
                candidates.push(key);
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
                g.check()?;
            }
            repo.store.delete(k).await?;
            if let Some(id) = k.strip_prefix("data/").and_then(|r| r.split('/').nth(1)) {
                repo.store.delete(&format!("index/{id}")).await?;
            }
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
