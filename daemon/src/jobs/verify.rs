//! Verify: structure without a key (every object a snapshot needs exists with its recorded
//! size), manifests and chunk tables with an identity, and with `--read-data` the data itself
//! (pack hashes without a key; every chunk decrypted and checked against its id with one).
//! For PostgreSQL physical policies, the WAL archive too (`walcheck`).

use crate::crypto::signing::PublicKey;
use crate::crypto::Identity;
use crate::error::Result;
use crate::pipeline::restore::{self as fetcher, NullSink, Want};
use crate::repository::format::*;
use crate::repository::lock::LockKind;
use crate::repository::{keys, Repository};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

#[derive(Debug, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Report {
    pub snapshots: usize,
    pub packs_referenced: usize,
    pub packs_read: usize,
    pub chunks_checked: u64,
    /// Damage: each line names the object, what is wrong, and what is affected.
    pub damage: Vec<String>,
    /// Garbage left by interrupted backups: harmless, removed by `prune`.
    pub garbage: Vec<String>,
    pub garbage_bytes: u64,
    pub notes: Vec<String>,
    /// PostgreSQL physical: the WAL archive's continuity per cluster (keyless).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub wal: Vec<super::walcheck::Continuity>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.damage.is_empty()
    }
}

/// Verify under a shared lease: a concurrent prune waits instead of pulling objects away
/// (which verify would report as damage).
pub async fn run(
    repo: &Repository,
    identity: Option<Identity>,
    read_data: bool,
    sample_pct: f64,
    lock_wait: std::time::Duration,
    writers: &[PublicKey],
) -> Result<Report> {
    let guard = repo.lock(LockKind::Shared, &format!("verify {}", repo.policy()), lock_wait).await?;
    let r = run_leased(repo, identity, read_data, sample_pct, writers).await;
    if let Err(e) = guard.release().await {
        tracing::warn!(error = %e, "could not remove the lock object; it will expire");
    }
    r
}

async fn run_leased(
    repo: &Repository,
    identity: Option<Identity>,
    read_data: bool,
    sample_pct: f64,
    writers: &[PublicKey],
) -> Result<Report> {
    let mut rep = Report::default();
    let all = repo.sidecars().await?;
    let mine: Vec<&Sidecar> = all.iter().filter(|s| s.policy == repo.policy()).collect();
    rep.snapshots = mine.len();
    // Who wrote each snapshot (keyless: signatures need no identity).
    if writers.is_empty() {
        rep.notes.push("no [trust] writers pinned: who wrote the snapshots was not checked".into());
    }
    for s in &mine {
        if let Err(e) = crate::repository::trust::check_sidecar(s, writers) {
            rep.damage.push(e.message);
        }
    }
    rep.wal = super::walcheck::check(repo, &all, repo.policy()).await?;
    for c in &rep.wal {
        rep.damage.extend(c.damage());
    }
    let packs: HashMap<String, u64> =
        repo.packs().await?.into_iter().map(|(id, size)| (keys::pack(&id), size)).collect();
    let objects: HashSet<String> = repo.manifests().await?.iter().map(keys::manifest).collect();

    // Structure, keyless.
    let mut needed: HashMap<String, Vec<String>> = HashMap::new();
    for s in &mine {
        if !objects.contains(&keys::manifest(&s.id)) {
            rep.damage.push(format!("snapshot {}: object {} is missing", s.id, keys::manifest(&s.id)));
        }
        for p in &s.packs {
            let key = keys::pack(&p.id);
            match packs.get(&key) {
                None => rep.damage.push(format!("snapshot {}: pack {key} is missing", s.id)),
                Some(&size) if size != p.size => rep.damage.push(format!(
                    "snapshot {}: pack {key} is {size} bytes, expected {} (truncated or replaced)",
                    s.id, p.size
                )),
                _ => {}
            }
            needed.entry(key).or_default().push(s.id.to_string());
        }
    }
    rep.packs_referenced = needed.len();
    let referenced_anywhere: HashSet<String> =
        all.iter().flat_map(|s| s.packs.iter().map(|p| keys::pack(&p.id))).collect();
    for (k, size) in &packs {
        if !referenced_anywhere.contains(k) {
            rep.garbage.push(k.clone());
            rep.garbage_bytes += size;
        }
    }
    let live: HashSet<&SnapshotId> = all.iter().map(|s| &s.id).collect();
    for k in &objects {
        if keys::parse_manifest(k).is_some_and(|id| !live.contains(&id)) {
            rep.garbage.push(k.clone());
        }
    }
    rep.garbage.sort();

    // Which packs to read.
    let mut to_read: Vec<String> = needed.keys().filter(|k| packs.contains_key(*k)).cloned().collect();
    to_read.sort();
    if read_data && sample_pct < 100.0 {
        use rand::seq::SliceRandom;
        let n =
            ((to_read.len() as f64 * sample_pct / 100.0).ceil() as usize).clamp(1.min(to_read.len()), to_read.len());
        to_read.shuffle(&mut rand::rng());
        to_read.truncate(n);
    }
    let read_set: HashSet<String> = to_read.iter().cloned().collect();

    let Some(identity) = identity else {
        rep.notes.push("no identity given: manifests and chunks were not decrypted".into());
        if read_data {
            for k in &to_read {
                let Some(id) = keys::parse_pack(k) else { continue };
                rep.packs_read += 1;
                match repo.pack(&id).await {
                    Ok(_) => {}
                    Err(e) if e.kind == crate::error::Kind::Damaged => rep
                        .damage
                        .push(format!("pack {k} does not match its id (corrupted); used by {}", needed[k].join(", "))),
                    Err(e) => return Err(e),
                }
            }
        }
        return Ok(rep);
    };

    // With an identity: every manifest decrypts, every chunk lies inside its pack, and with
    // --read-data every chunk of the selected packs decrypts and matches its id.
    let repo = repo.unlock(identity).trusting(writers);
    let mut chunk_keys: HashMap<String, [u8; 32]> = HashMap::new();
    for s in &mine {
        if !objects.contains(&keys::manifest(&s.id)) {
            continue;
        }
        let m = match repo.manifest(s).await {
            Ok(m) => m,
            Err(e) if e.kind == crate::error::Kind::Crypto => return Err(e),
            Err(e) => {
                rep.damage.push(format!("snapshot {}: {}", s.id, e.message));
                continue;
            }
        };
        if !chunk_keys.contains_key(&m.key_id) {
            match repo.chunk_key(s, &m.key_id).await {
                Ok(k) => {
                    chunk_keys.insert(m.key_id.clone(), k);
                }
                Err(e) => {
                    rep.damage.push(format!("snapshot {}: {}", s.id, e.message));
                    continue;
                }
            }
        }
        let files: Vec<&Entry> = m.entries.iter().filter(|e| e.kind == EntryKind::File).collect();
        // What a restore writes, and the page digests a delta restore reads.
        let planned = crate::pipeline::tree::plan(&m, &files).and_then(|mut w| {
            w.extend(crate::pipeline::tree::plan_digests(&m, &files, &vec![true; files.len()])?);
            Ok(w)
        });
        let wants = match planned {
            Ok(w) => w,
            Err(e) => {
                rep.damage.push(format!("snapshot {}: {}", s.id, e.message));
                continue;
            }
        };
        let mut sel: Vec<Want> = Vec::new();
        for w in wants {
            let key = keys::pack(&w.loc.pack);
            let size = packs.get(&key).copied().unwrap_or(0);
            if w.loc.offset + w.loc.len as u64 > size && packs.contains_key(&key) {
                rep.damage.push(format!(
                    "snapshot {}: chunk at {}..{} lies beyond the end of {key}",
                    s.id,
                    w.loc.offset,
                    w.loc.offset + w.loc.len as u64
                ));
                continue;
            }
            if read_data && read_set.contains(&key) {
                sel.push(w);
            }
        }
        if !read_data || sel.is_empty() {
            continue;
        }
        rep.chunks_checked += sel.len() as u64;
        let damage =
            fetcher::fetch(&repo, chunk_keys[&m.key_id], sel, Arc::new(NullSink), 4, Default::default()).await?;
        if !damage.is_empty() {
            let e = crate::pipeline::tree::damage_error(s.id.as_str(), &damage, &|f| files[f].display());
            rep.damage.push(e.message);
        }
    }
    if read_data {
        rep.packs_read = to_read.len();
    }
    Ok(rep)
}
