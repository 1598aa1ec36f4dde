//! Repository leases on real stores: moto (atomic conditional writes) and Garage (which
//! ignores them). The protocol must exclude conflicts on both.

use crate::common::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use veza_dr::repository::lock::{self, LockKind};
use veza_dr::repository::Store;

fn store_for(backend: &Backend, dir: &std::path::Path) -> Store {
    let recipient = age::x25519::Identity::generate().to_public().to_string();
    let text = format!(
        "[source]\ntype = \"volume\"\npath = \"/srv\"\n{}\n[encryption]\nrecipients = [\"{recipient}\"]\n",
        backend.repository_toml_files("locktest", dir)
    );
    let p = veza_dr::policy::Policy::parse(&dir.join("l.toml"), &text).unwrap();
    Store::open(&p.repository, true).unwrap()
}

async fn exclusion(kind: Kind) {
    let backend = Backend::start(kind);
    let dir = tempfile::tempdir().unwrap();
    let store = store_for(&backend, dir.path());
    let exclusive = Arc::new(AtomicUsize::new(0));
    let shared = Arc::new(AtomicUsize::new(0));
    let violations = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..4 {
        let (store, exclusive, shared, violations, done) =
            (store.clone(), exclusive.clone(), shared.clone(), violations.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let kind = if w < 2 { LockKind::Exclusive } else { LockKind::Shared };
            for _ in 0..6 {
                let g = lock::acquire(&store, kind, "test", Duration::from_secs(120)).await.unwrap();
                let (mine, other) =
                    if kind == LockKind::Exclusive { (&exclusive, &shared) } else { (&shared, &exclusive) };
                let n = mine.fetch_add(1, Ordering::SeqCst) + 1;
                if other.load(Ordering::SeqCst) > 0 || (kind == LockKind::Exclusive && n > 1) {
                    violations.fetch_add(1, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(40)).await;
                mine.fetch_sub(1, Ordering::SeqCst);
                g.release().await.unwrap();
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(done.load(Ordering::SeqCst), 24);
    assert_eq!(violations.load(Ordering::SeqCst), 0, "two holders overlapped on {kind:?}");
    assert!(store.list("locks/").await.unwrap().is_empty(), "released locks remain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_exclude_on_moto() {
    exclusion(Kind::Moto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_exclude_on_garage_without_conditional_writes() {
    exclusion(Kind::Garage).await;
}

/// A prune started while a backup writes is refused (or waits with --lock-wait), on both.
fn prune_during_backup(kind: Kind) {
    let backend = Backend::start(kind);
    let fx = Fixture::new(&backend);
    let src = fx.path("src");
    std::fs::create_dir_all(&src).unwrap();
    let mut big = vec![0u8; 400 << 20];
    tree::Rng::new(5).fill(&mut big);
    std::fs::write(src.join("big.bin"), &big).unwrap();
    drop(big);
    fx.volume_policy("vol", &backend, "repo", &src, "[retention]\nkeep-last = 1\nprune-grace = \"0s\"\n");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = {
        let text = std::fs::read_to_string(fx.path("policies/vol.toml"))
            .unwrap()
            .replace(&backend.repository_toml("repo"), &backend.repository_toml_files("repo", dir.path()));
        let p = veza_dr::policy::Policy::parse(&dir.path().join("vol.toml"), &text).unwrap();
        Store::open(&p.repository, true).unwrap()
    };

    let mut backup = fx.cmd(&["backup", "vol"]).stdout(std::process::Stdio::null()).spawn().unwrap();
    let t = std::time::Instant::now();
    while rt.block_on(store.list("locks/")).unwrap().is_empty() {
        assert!(t.elapsed() < Duration::from_secs(30), "backup took no lock");
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = fx.run(&["prune", "vol"]);
    assert!(backup.try_wait().unwrap().is_none(), "backup ended before the prune ran: the test proves nothing");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("is locked by `backup vol`"), "{}", stderr(&o));
    // With --lock-wait, prune waits for the backup and then runs.
    let waiting = fx.cmd(&["prune", "vol", "--lock-wait", "300s", "--json"]).output().unwrap();
    let backup_status = backup.wait().unwrap();
    assert!(backup_status.success());
    assert!(waiting.status.success(), "{}", stderr(&waiting));
    let snaps = fx.json(&["snapshots", "vol"]);
    assert_eq!(snaps.as_array().unwrap().len(), 1, "the backup committed");
    let v = fx.json(&["verify", "vol", "--read-data", "--identity", fx.identity.to_str().unwrap()]);
    assert!(v["damage"].as_array().unwrap().is_empty(), "{v}");
}

#[test]
fn prune_during_backup_on_moto() {
    prune_during_backup(Kind::Moto);
}

#[test]
fn prune_during_backup_on_garage() {
    prune_during_backup(Kind::Garage);
}
