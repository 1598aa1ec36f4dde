//! Replication: copy to a replica what it lacks of the primary, as ciphertext, byte for byte.
//! No key is needed. The order makes every state a crash can leave consistent: the config,
//! then chunk keys, packs (each checked against its BLAKE3 id on the way), indexes, manifests,
//! WAL and drill reports, and last the sidecars, each only once every pack, the manifest and
//! the chunk key it names are on the replica; so a snapshot appears there only when it is
//! complete there. A copy is a whole-object put: an interrupted run leaves nothing half
//! written, and the next run copies what is still missing.
//!
//! Nothing is ever deleted on the replica by replication, so a compromised primary cannot
//! empty it: each replica applies the policy's retention itself (`prune --repository NAME`,
//! and the daemon's scheduled prune), with the same two-phase grace. Replication copies only
//! what that retention keeps (the snapshots it retains, their packs, the WAL from the oldest
//! retained backup on), so what a replica's prune forgot is not copied back while the
//! primary still has it.

use super::format::{PackId, Sidecar, SnapshotId};
use super::lock::LockKind;
use super::store::Store;
use super::{keys, read_config, Repository};
use crate::error::{Error, Result};
use crate::policy::replica::Replica;
use bytes::Bytes;
use futures::StreamExt;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

/// Objects copied at once: memory is about this many packs.
const PARALLEL: usize = 8;

#[derive(Debug, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Copied {
    pub replica: String,
    pub objects_copied: u64,
    pub bytes_copied: u64,
    pub objects_present: u64,
    /// Snapshots present on the replica after the run, and those still waiting for a part.
    pub snapshots: u64,
    pub snapshots_waiting: Vec<String>,
    pub seconds: f64,
}

/// Bytes copied so far and bytes to copy, for a progress display.
#[derive(Clone, Default)]
pub struct Progress {
    pub done: std::sync::Arc<AtomicU64>,
    pub total: std::sync::Arc<AtomicU64>,
}

pub async fn replicate(
    primary: &Repository,
    replica: &Replica,
    retention: &crate::policy::Retention,
    progress: &Progress,
) -> Result<Copied> {
    let t = std::time::Instant::now();
    let dst = Store::open(&replica.repository, true)?;
    let src = &primary.store;
    // The same repository, or none yet: a replica holding another repository is refused.
    match read_config(&dst).await? {
        Some(c) if c.id != primary.config.id => {
            return Err(Error::usage(format!(
                "replica {} ({}) holds another repository (id {}, the primary's is {})",
                replica.name, dst.url, c.id, primary.config.id
            ))
            .with_hint("point the replica at an empty location, or at a copy of this repository"))
        }
        Some(_) => {}
        None => {
            let url = src.url.clone();
            let b = src.get_checked(keys::CONFIG, |b| super::parse_config(&url, &b).map(|_| b)).await?;
            dst.put(keys::CONFIG, b).await?
        }
    }
    let target = Repository::open_store(dst.clone(), &primary.policy).await?;
    // Readers' leases on both sides: a prune of either waits until the copy is done.
    let lease_src = primary.lock(LockKind::Shared, "replicate", std::time::Duration::ZERO).await?;
    let lease_dst = target.lock(LockKind::Shared, "replicate", std::time::Duration::ZERO).await?;
    let mut out = Copied { replica: replica.name.clone(), ..Default::default() };
    // What the retention keeps, as of now: the snapshots to copy (a snapshot committed after
    // this listing waits for the next run) and everything they need.
    let sidecars = primary.sidecars().await?;
    let mine: Vec<Sidecar> = sidecars.iter().filter(|s| s.policy == primary.policy).cloned().collect();
    let (_, forgotten) = crate::jobs::retention::select(&mine, retention, chrono::Utc::now());
    let to_copy: Vec<&Sidecar> = sidecars.iter().filter(|s| !forgotten.contains(&s.id)).collect();
    let packs: HashSet<PackId> = to_copy.iter().flat_map(|s| s.packs.iter().map(|p| p.id)).collect();
    let snapshots: HashSet<&SnapshotId> = to_copy.iter().map(|s| &s.id).collect();
    let oldest_wal = oldest_wal(&to_copy);
    let have: HashSet<String> = dst.list("").await?.into_iter().map(|(k, _)| k).collect();
    let listing = src.list("").await?;
    let wanted = |k: &str| {
        if k.starts_with(keys::KEYS) || k.starts_with(keys::REPORTS) {
            return true;
        }
        if let Some(id) = keys::parse_pack(k).or_else(|| keys::parse_index(k)) {
            return packs.contains(&id);
        }
        if let Some(id) = keys::parse_manifest(k) {
            return snapshots.contains(&id);
        }
        match keys::parse_wal(k) {
            Some((cluster, name, _)) => match (oldest_wal.get(&cluster), name.position()) {
                (Some(from), Some(pos)) => pos >= from.as_str(),
                _ => true,
            },
            None => false,
        }
    };
    let mut todo: Vec<(String, u64)> = Vec::new();
    for (k, size) in &listing {
        if !wanted(k) {
            continue;
        }
        if have.contains(k) {
            out.objects_present += 1;
        } else {
            todo.push((k.clone(), *size));
        }
    }
    progress.total.store(todo.iter().map(|(_, n)| n).sum(), Ordering::Relaxed);
    // Keys first, then packs, then the rest: nothing refers to what is not yet there.
    todo.sort_by_key(|(k, _)| {
        let rank = if k.starts_with(keys::KEYS) {
            0
        } else if k.starts_with(keys::DATA) {
            1
        } else {
            2
        };
        (rank, k.clone())
    });
    let copied: Vec<Result<(String, u64)>> = futures::stream::iter(todo)
        .map(|(k, size)| {
            let (src, dst) = (src.clone(), dst.clone());
            async move {
                // Checked inside the read, so a short answer is read again, not copied.
                let b = src.get_checked(&k, |b| check(&k, &b, size).map(|_| b)).await?;
                let n = b.len() as u64;
                dst.put(&k, b).await?;
                progress.done.fetch_add(n, Ordering::Relaxed);
                Ok((k, n))
            }
        })
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    let mut present = have;
    let mut first_error = None;
    for r in copied {
        match r {
            Ok((k, n)) => {
                out.objects_copied += 1;
                out.bytes_copied += n;
                present.insert(k);
            }
            Err(e) => {
                tracing::warn!(replica = %replica.name, "copy failed: {}", e.message);
                first_error.get_or_insert(e);
            }
        }
    }
    // Sidecars last, each once what it names is there; none after a failed copy (a chunk key
    // may be what failed).
    if let Some(e) = first_error {
        let _ = lease_dst.release().await;
        let _ = lease_src.release().await;
        return Err(e.with_hint("run replicate again: it copies only what is still missing"));
    }
    for s in to_copy {
        let key = keys::sidecar(&s.id);
        if present.contains(&key) {
            out.snapshots += 1;
            continue;
        }
        if !complete_on(s, &present) {
            out.snapshots_waiting.push(s.id.to_string());
            continue;
        }
        let b = src
            .get_checked(&key, |b| {
                serde_json::from_slice::<Sidecar>(&b)
                    .map(|_| b)
                    .map_err(|e| Error::damaged(format!("snapshot sidecar {key} is corrupted: {e}")))
            })
            .await?;
        let n = b.len() as u64;
        dst.put(&key, b).await?;
        out.objects_copied += 1;
        out.bytes_copied += n;
        out.snapshots += 1;
    }
    lease_dst.release().await?;
    lease_src.release().await?;
    out.seconds = t.elapsed().as_secs_f64();
    Ok(out)
}

/// WAL objects the sender copied to one replica, and the failure that stopped it.
#[derive(Debug, Default)]
pub struct SentWal {
    /// Keys now on the replica (copied, or already there), and keys the primary no longer
    /// has (pruned since they were queued): either way nothing is left to send.
    pub done: Vec<String>,
    pub copied: u64,
    pub error: Option<Error>,
}

/// Copy the named WAL objects to a replica that already holds this repository (only
/// `replicate` makes a replica; the sender never writes into an empty or foreign location).
pub async fn copy_wal(primary: &Repository, replica: &Replica, wanted: &[String]) -> Result<SentWal> {
    let dst = Store::open(&replica.repository, true)?;
    match read_config(&dst).await? {
        Some(c) if c.id == primary.config.id => {}
        Some(c) => {
            return Err(Error::usage(format!(
                "replica {} ({}) holds another repository (id {}): WAL is not sent there",
                replica.name, dst.url, c.id
            )))
        }
        None => {
            return Err(Error::not_found(format!("replica {} ({}) holds no repository yet", replica.name, dst.url))
                .with_hint(format!("run `veza-dr replicate {}` once: it creates the replica", primary.policy)))
        }
    }
    let src = &primary.store;
    let todo: Vec<String> = wanted.iter().filter(|k| keys::parse_wal(k).is_some()).cloned().collect();
    let results: Vec<(String, Result<bool>)> = futures::stream::iter(todo)
        .map(|k| {
            let (src, dst) = (src.clone(), dst.clone());
            async move {
                let r = copy_one(&src, &dst, &k).await;
                (k, r)
            }
        })
        .buffer_unordered(4)
        .collect()
        .await;
    let mut out = SentWal::default();
    for (k, r) in results {
        match r {
            Ok(copied) => {
                out.copied += copied as u64;
                out.done.push(k);
            }
            Err(e) => {
                out.error.get_or_insert(e);
            }
        }
    }
    Ok(out)
}

/// One WAL object to the replica unless it is there; `false` when nothing was copied (there
/// already, or pruned from the primary since it was queued).
async fn copy_one(src: &Store, dst: &Store, k: &str) -> Result<bool> {
    if dst.head_size(k).await?.is_some() {
        return Ok(false);
    }
    let Some(size) = src.head_size(k).await? else { return Ok(false) };
    let b = src.get_checked(k, |b| check(k, &b, size).map(|_| b)).await?;
    dst.put(k, b).await?;
    Ok(true)
}

/// What the primary serves must be what it listed, and a pack must hash to its id: a damaged
/// primary object is never spread to the replica.
fn check(key: &str, b: &Bytes, listed: u64) -> Result<()> {
    if b.len() as u64 != listed {
        return Err(Error::damaged(format!("{key}: read {} bytes, the listing says {listed}", b.len())));
    }
    if let Some(id) = keys::parse_pack(key) {
        if blake3::hash(b).as_bytes() != &id {
            return Err(Error::damaged(format!("pack {key} does not match its id: not copied")));
        }
    }
    Ok(())
}

/// Per cluster, the position of the oldest retained physical backup's first segment: older WAL
/// can no longer be replayed from any backup (prune's rule). A cluster without one: all.
fn oldest_wal(snaps: &[&Sidecar]) -> std::collections::HashMap<u64, String> {
    let mut oldest: std::collections::HashMap<u64, String> = Default::default();
    for s in snaps.iter().filter(|s| s.source == crate::policy::SourceKind::PostgresPhysical) {
        let Some(pg) = s.pg() else { continue };
        let (Ok(cluster), Some(pos)) = (pg.system_identifier.parse::<u64>(), pg.start_wal.position()) else { continue };
        let e = oldest.entry(cluster).or_insert_with(|| pos.to_string());
        if pos < e.as_str() {
            *e = pos.to_string();
        }
    }
    oldest
}

fn complete_on(s: &Sidecar, present: &HashSet<String>) -> bool {
    let packs = s.packs.iter().all(|p| present.contains(&keys::pack(&p.id)));
    let manifest = present.contains(&keys::manifest(&s.id));
    packs && manifest
}
