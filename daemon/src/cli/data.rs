//! Subcommands on a policy's repository: init, backup, snapshots, restore, verify, prune.

use super::commands::print_json;
use super::output::{bytes, Bar};
use super::{state_dir, Global};
use crate::crypto::Identity;
use crate::error::Result;
use crate::jobs::backup::Mode;
use crate::jobs::restore::{RestoreRequest, Restored};
use crate::policy::Policy;
use crate::repository::Repository;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub async fn init(g: &Global, p: &Policy) -> Result<i32> {
    let (url, id, created) = crate::jobs::backup::init(p).await?;
    if g.json {
        print_json(&serde_json::json!({"repository": url, "id": id, "created": created}));
    } else if created {
        crate::outln!("created repository {id} at {url}");
    } else {
        crate::outln!("repository {id} at {url} already exists; nothing changed");
    }
    Ok(0)
}

pub async fn backup(g: &Global, p: &Policy, mode: Mode) -> Result<i32> {
    let progress: Arc<crate::pipeline::backup::Progress> = Arc::default();
    let bar = {
        let pr = progress.clone();
        Bar::start(!g.json, "backup", move || {
            (pr.bytes_read.load(Ordering::Relaxed), pr.bytes_total.load(Ordering::Relaxed))
        })
    };
    let opts = crate::jobs::backup::Options { mode, state_dir: state_dir(g), lock_wait: g.lock_wait, progress };
    let t = std::time::Instant::now();
    let r = crate::jobs::backup::run(p, &opts).await;
    bar.finish().await;
    let s = r?;
    if g.json {
        print_json(&s);
    } else {
        let st = &s.stats;
        crate::outln!(
            "snapshot {} ({}) of policy {}: {} files, {} dirs, {} in total; read {} in {} files, {} new, uploaded {}; {} packs referenced; {:.1}s",
            s.id,
            s.kind.as_str(),
            s.policy,
            st.files,
            st.dirs,
            bytes(st.bytes),
            bytes(st.bytes_read),
            st.files_read,
            bytes(st.bytes_new),
            bytes(st.bytes_uploaded),
            s.packs.len(),
            t.elapsed().as_secs_f64()
        );
        for w in &s.warnings {
            crate::outln!("warning: {w}");
        }
    }
    Ok(0)
}

pub async fn snapshots(g: &Global, p: &Policy) -> Result<i32> {
    let repo = Repository::open(p).await?;
    let snaps = repo.snapshots().await?;
    if g.json {
        print_json(&snaps);
        return Ok(0);
    }
    if snaps.is_empty() {
        crate::outln!("no snapshots for policy {} in {}", p.name, repo.url());
        return Ok(0);
    }
    crate::outln!(
        "{:<26} {:<12} {:<20} {:>8} {:>11} {:>11} {:>8}",
        "ID",
        "KIND",
        "STARTED (UTC)",
        "FILES",
        "SIZE",
        "NEW",
        "TIME"
    );
    for s in &snaps {
        let secs = (s.finished - s.started).num_milliseconds() as f64 / 1000.0;
        crate::outln!(
            "{:<26} {:<12} {:<20} {:>8} {:>11} {:>11} {:>7.1}s{}",
            s.id,
            s.kind.as_str(),
            s.started.format("%Y-%m-%d %H:%M:%S"),
            s.stats.files,
            bytes(s.stats.bytes),
            bytes(s.stats.bytes_new),
            secs,
            if s.warning_count == 0 { String::new() } else { format!("  ({} warnings)", s.warning_count) }
        );
    }
    Ok(0)
}

pub async fn restore(g: &Global, p: &Policy, identity: Option<&Path>, req: &RestoreRequest) -> Result<i32> {
    let identity = Identity::require(identity, &p.encryption, &p.name)?;
    let bar = {
        let (d, t) = (req.progress.done.clone(), req.progress.total.clone());
        Bar::start(!g.json, "restore", move || (d.load(Ordering::Relaxed), t.load(Ordering::Relaxed)))
    };
    let t = std::time::Instant::now();
    let r = crate::jobs::restore::run(p, identity, req, g.lock_wait).await;
    bar.finish().await;
    let r = r?;
    if g.json {
        print_json(&r);
        return Ok(0);
    }
    match &r {
        Restored::Tree(s) => {
            crate::outln!(
                "restored snapshot {} into {}: {} files, {} dirs, {} in {:.1}s",
                s.snapshot,
                s.target,
                s.files,
                s.dirs,
                bytes(s.bytes),
                t.elapsed().as_secs_f64()
            );
            print_delta(s.delta.as_ref(), s.bytes);
            for w in &s.warnings {
                crate::outln!("warning: {w}");
            }
        }
        Restored::Logical { snapshot, databases } => {
            crate::outln!("restored snapshot {snapshot}: databases {}", databases.join(", "));
        }
        Restored::Physical(s) => {
            crate::outln!(
                "restored snapshot {} into {}: {} files, {} in {:.1}s; recovery target: {}",
                s.snapshot,
                s.target,
                s.files,
                bytes(s.bytes),
                s.seconds_restore,
                s.recovery_target
            );
            print_delta(s.delta.as_ref(), s.bytes);
            if s.started {
                crate::outln!(
                    "server running on port {} (socket in {}): recovery finished in {:.1}s at {} on timeline {}{}",
                    s.port.unwrap_or(0),
                    s.socket_dir.as_deref().unwrap_or("?"),
                    s.seconds_recovery,
                    s.recovered_lsn.as_deref().unwrap_or("?"),
                    s.timeline.unwrap_or(0),
                    s.last_transaction.as_deref().map(|t| format!("; last transaction at {t}")).unwrap_or_default()
                );
                for c in &s.connect {
                    crate::outln!("connect: {c}");
                }
            }
            for w in &s.warnings {
                crate::outln!("note: {w}");
            }
        }
    }
    Ok(0)
}

fn print_delta(d: Option<&crate::pipeline::delta::DeltaStats>, total: u64) {
    if let Some(d) = d {
        crate::outln!(
            "delta: fetched {} of {}; {} files unchanged, {} changed, {} created; {} entries removed; {} files known from the last restore's record (not read)",
            bytes(d.bytes_fetched),
            bytes(total),
            d.files_unchanged,
            d.files_changed,
            d.files_created,
            d.removed,
            d.files_known
        );
    }
}

pub async fn verify(g: &Global, p: &Policy, identity: Option<&Path>, read_data: bool, sample: f64) -> Result<i32> {
    let identity = Identity::find(identity, &p.encryption)?;
    let repo = Repository::open(p).await?;
    let rep = crate::jobs::verify::run(&repo, identity, read_data, sample, g.lock_wait, &p.trust.writers).await?;
    if g.json {
        print_json(&rep);
    } else {
        crate::outln!(
            "verified {} snapshots of policy {}: {} packs referenced, {} read, {} chunks checked",
            rep.snapshots,
            p.name,
            rep.packs_referenced,
            rep.packs_read,
            rep.chunks_checked
        );
        for c in &rep.wal {
            let missing: u64 = c.gaps.iter().filter(|g| g.status == "missing").map(|g| g.segments).sum();
            let uploading: u64 = c.gaps.iter().filter(|g| g.status == "uploading").map(|g| g.segments).sum();
            crate::outln!(
                "WAL of cluster {} from {} to {}: {} found, {missing} missing, {uploading} still uploading",
                c.cluster,
                c.from,
                c.to,
                c.found
            );
        }
        for d in &rep.damage {
            crate::outln!("damage: {d}");
        }
        if !rep.garbage.is_empty() {
            crate::outln!(
                "garbage: {} unreferenced objects ({}), left by interrupted backups; `veza-dr prune {}` removes them",
                rep.garbage.len(),
                bytes(rep.garbage_bytes),
                p.name
            );
        }
        for n in &rep.notes {
            crate::outln!("note: {n}");
        }
        crate::outln!("{}", if rep.ok() { "no damage found" } else { "DAMAGE FOUND" });
    }
    Ok(if rep.ok() { 0 } else { 3 })
}

pub async fn prune(g: &Global, p: &Policy, dry_run: bool) -> Result<i32> {
    let rep = crate::jobs::prune::run(p, dry_run, g.lock_wait).await?;
    if g.json {
        print_json(&rep);
    } else {
        let would = if dry_run { "would " } else { "" };
        for (id, why) in &rep.kept {
            crate::outln!("keep   {id} ({})", why.join(", "));
        }
        for id in &rep.forgotten {
            crate::outln!("{would}forget {id}");
        }
        crate::outln!(
            "{}marked {} unreferenced objects, {}deleted {} ({}), {} pending deletion after the grace period",
            would,
            rep.marked.len(),
            would,
            rep.deleted.len(),
            bytes(rep.bytes_deleted),
            rep.pending
        );
    }
    Ok(0)
}

pub async fn replicate(g: &Global, p: &Policy, only: Option<&str>) -> Result<i32> {
    let replicas: Vec<_> = p.replicas.iter().filter(|r| only.is_none_or(|n| r.name == n)).collect();
    if replicas.is_empty() {
        return Err(match only {
            Some(n) => crate::Error::usage(format!("policy {} has no replica `{n}`", p.name)),
            None => crate::Error::usage(format!("policy {} declares no [[replica]]", p.name)),
        }
        .with_hint("declare one: [[replica]] name = \"dr\", url = \"s3://bucket-dr/prefix\", …"));
    }
    let primary = Repository::open(p).await?;
    let mut all = Vec::new();
    for r in replicas {
        let progress: crate::repository::replicate::Progress = Default::default();
        let bar = {
            let p = progress.clone();
            Bar::start(!g.json, "replicate", move || (p.done.load(Ordering::Relaxed), p.total.load(Ordering::Relaxed)))
        };
        let c = crate::repository::replicate::replicate(&primary, r, &p.retention, &progress).await;
        bar.finish().await;
        let c = c?;
        if !g.json {
            crate::outln!(
                "replica {}: copied {} objects ({}) in {:.1}s, {} already there; {} snapshots on the replica{}",
                c.replica,
                c.objects_copied,
                bytes(c.bytes_copied),
                c.seconds,
                c.objects_present,
                c.snapshots,
                if c.snapshots_waiting.is_empty() {
                    String::new()
                } else {
                    format!(", {} waiting for their parts", c.snapshots_waiting.len())
                }
            );
        }
        all.push(c);
    }
    if g.json {
        print_json(&all);
    }
    Ok(0)
}
