//! Data safety (issue 11): each test shows a way to lose or silently corrupt data that the
//! code used to allow. Real servers, the real binary.

use crate::common::pg::{psql, switch_and_wait_archived, Pg, Restored};
use crate::common::*;
use std::path::PathBuf;

fn repo_state_dir(fx: &Fixture) -> PathBuf {
    let repos = fx.path("state/repos");
    std::fs::read_dir(&repos).unwrap().flatten().next().expect("a repository state").path()
}

/// Losing `chunk-key` used to make the next incremental reuse ids made under the old key while
/// naming the new one: restore then called every unchanged file damaged.
#[test]
fn a_lost_chunk_key_never_corrupts_the_next_incremental() {
    let backend = Backend::start(Kind::File);
    let fx = Fixture::new(&backend);
    let src = fx.path("src");
    tree::generate(&src, 3, 11);
    fx.volume_policy("vol", &backend, "vol", &src, "");
    fx.ok(&["backup", "vol"]);
    let state = repo_state_dir(&fx);
    std::fs::remove_file(state.join("chunk-key")).unwrap();
    let changed = std::fs::read_dir(&src).unwrap().flatten().find(|e| e.path().is_file()).unwrap().path();
    std::fs::write(&changed, b"changed after the key was lost\n").unwrap();
    fx.ok(&["backup", "vol", "--incremental"]);
    let target = fx.path("restored");
    fx.ok(&["restore", "vol", "--target", target.to_str().unwrap(), "--identity", fx.identity.to_str().unwrap()]);
    tree::assert_same(&src, &target);
    fx.ok(&["verify", "vol", "--read-data", "--identity", fx.identity.to_str().unwrap()]);
}

/// Two first backups of two policies sharing one repository and one state directory, at once:
/// one chunk-id key, and every snapshot restores.
#[test]
fn concurrent_first_backups_share_one_key_and_both_restore() {
    let backend = Backend::start(Kind::Moto);
    let fx = Fixture::new(&backend);
    let (a, b) = (fx.path("a"), fx.path("b"));
    tree::generate(&a, 8, 21);
    tree::generate(&b, 8, 22);
    fx.volume_policy("a", &backend, "shared", &a, "");
    fx.volume_policy("b", &backend, "shared", &b, "");
    for _ in 0..2 {
        let ca = fx.cmd(&["--lock-wait", "60s", "backup", "a"]).spawn().unwrap();
        let cb = fx.cmd(&["--lock-wait", "60s", "backup", "b"]).spawn().unwrap();
        for mut c in [ca, cb] {
            assert!(c.wait().unwrap().success());
        }
    }
    let state = repo_state_dir(&fx);
    let keys: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("chunk"))
        .collect();
    assert!(keys.iter().any(|e| e.file_name() == "chunk-key"));
    for (p, src) in [("a", &a), ("b", &b)] {
        let t = fx.path(&format!("r-{p}"));
        fx.ok(&["restore", p, "--target", t.to_str().unwrap(), "--identity", fx.identity.to_str().unwrap()]);
        tree::assert_same(src, &t);
    }
    fx.ok(&["verify", "a", "--read-data", "--identity", fx.identity.to_str().unwrap()]);
}

/// A flipped byte in the chunk cache used to send the next snapshot to a wrong offset.
#[test]
fn a_damaged_chunk_cache_is_detected_and_rebuilt() {
    let backend = Backend::start(Kind::File);
    let fx = Fixture::new(&backend);
    let src = fx.path("src");
    tree::generate(&src, 3, 12);
    fx.volume_policy("vol", &backend, "vol", &src, "");
    fx.ok(&["backup", "vol"]);
    let state = repo_state_dir(&fx);
    let cache = std::fs::read_dir(&state)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("chunks"))
        .expect("a chunk cache");
    let mut b = std::fs::read(&cache).unwrap();
    // An offset field of a record in the middle.
    let at = b.len() / 2;
    b[at] ^= 0x40;
    std::fs::write(&cache, &b).unwrap();
    tree::generate(&src.join("more"), 1, 13);
    fx.ok(&["backup", "vol", "--full"]);
    let target = fx.path("restored");
    fx.ok(&["restore", "vol", "--target", target.to_str().unwrap(), "--identity", fx.identity.to_str().unwrap()]);
    tree::assert_same(&src, &target);
}

/// Two policies of one cluster in one repository (a renamed policy, or an hourly and a monthly
/// one): prune under one name used to delete the WAL the other's snapshots need.
#[test]
fn wal_retention_counts_every_policy_of_the_cluster() {
    let (backend, fx, pg) = archiving_cluster(Kind::Moto);
    let dsn = pg.dsn();
    fx.pg_policy("db", &backend, "db", "physical", &pg.data, "");
    fx.pg_policy("monthly", &backend, "db", "physical", &pg.data, "[retention]\nkeep-last = 1\nprune-grace = \"0s\"\n");
    psql(&dsn, "CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 5000) g");
    let old = fx.json(&["backup", "db", "--full"]);
    psql(&dsn, "INSERT INTO t SELECT g FROM generate_series(5001, 6000) g");
    for _ in 0..3 {
        psql(&dsn, "SELECT pg_switch_wal()");
    }
    fx.json(&["backup", "monthly", "--full"]);
    fx.json(&["backup", "monthly", "--full"]);
    switch_and_wait_archived(&dsn);
    fx.json(&["prune", "monthly"]);
    let p2 = fx.json(&["prune", "monthly"]);
    // Only WAL older than the oldest live backup of the cluster (policy db's) may go.
    let keep_from = old["postgres"]["start-wal"].as_str().unwrap()[8..24].to_string();
    let deleted: Vec<&str> = p2["deleted"].as_array().unwrap().iter().filter_map(|k| k.as_str()).collect();
    assert!(
        deleted.iter().filter(|k| k.starts_with("wal/")).all(|k| k.split('/').nth(3).unwrap()[8..24] < *keep_from),
        "WAL that policy db's snapshot needs was deleted: {p2}"
    );
    // The old policy's snapshot still recovers to consistency.
    let port = free_port();
    let r = fx.path("r");
    let id = old["id"].as_str().unwrap();
    fx.ok(&[
        "restore",
        "db",
        "--snapshot",
        id,
        "--immediate",
        "--target",
        r.to_str().unwrap(),
        "--start",
        "--port",
        &port.to_string(),
        "--identity",
        fx.identity.to_str().unwrap(),
    ]);
    let srv = Restored { data: r, port };
    assert_eq!(psql(&srv.dsn(), "SELECT count(*) FROM t"), "5000");
}

/// Another cluster's segment used to satisfy "archived up to the stop LSN": a second cluster
/// pointed at the same repository is refused at its first wal-push and its first backup,
/// naming both system identifiers.
#[test]
fn a_second_cluster_in_one_repository_is_refused_naming_both() {
    let (backend, fx, pg) = archiving_cluster(Kind::Moto);
    fx.pg_policy("db", &backend, "db", "physical", &pg.data, "");
    fx.ok(&["backup", "db"]);
    let mut env = fx.env.clone();
    let other = Pg::start("true", env.clone());
    env.retain(|(k, _)| k != "VEZA_PG_DSN");
    let text = std::fs::read_to_string(fx.path("policies/db.toml"))
        .unwrap()
        .replace(&format!("data-dir = \"{}\"", pg.data.display()), &format!("data-dir = \"{}\"", other.data.display()));
    std::fs::write(fx.path("policies/other.toml"), text).unwrap();
    let sysid = |p: &Pg| psql(&p.dsn(), "SELECT system_identifier::text FROM pg_control_system()");
    let (mine, theirs) = (sysid(&pg), sysid(&other));
    let segment = other.data.join("pg_wal/000000010000000000000001");
    let o = fx.run(&["wal-push", "other", segment.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains(&mine) && e.contains(&theirs), "{e}");
    let mut c = fx.cmd(&["backup", "other"]);
    c.env("VEZA_PG_DSN", other.dsn());
    let o = c.output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains(&mine) && e.contains(&theirs), "{e}");
}

/// A broken archive_command used to keep a backup waiting 300 s; it now fails within seconds,
/// naming the segment and when archiving last failed.
#[test]
fn a_failing_archive_command_fails_the_backup_within_seconds() {
    let backend = Backend::start(Kind::Moto);
    let mut fx = Fixture::new(&backend);
    let pg = Pg::start("false", fx.env.clone());
    fx.env.push(("VEZA_PG_DSN".into(), pg.dsn()));
    fx.pg_policy("db", &backend, "db", "physical", &pg.data, "");
    let t = std::time::Instant::now();
    let o = fx.run(&["backup", "db"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(t.elapsed() < std::time::Duration::from_secs(60), "took {:?}", t.elapsed());
    let e = stderr(&o);
    assert!(e.contains("WAL archiving is failing: segment 0000000100000000000000") && e.contains("(last at 20"), "{e}");
    assert!(e.contains("the snapshot is not committed"), "{e}");
    assert!(fx.json(&["snapshots", "db"]).as_array().unwrap().is_empty());
}

/// A prefetched segment cut short (a crash, a full disk) used to be served as it was, which can
/// end recovery early; it is checked against its fingerprint and fetched again.
#[test]
fn a_damaged_prefetched_segment_is_never_served() {
    let (backend, fx, pg) = archiving_cluster(Kind::Moto);
    fx.pg_policy("db", &backend, "db", "physical", &pg.data, "");
    let dsn = pg.dsn();
    psql(&dsn, "CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g");
    switch_and_wait_archived(&dsn);
    let name = "000000010000000000000001";
    let good = fx.path("good");
    let id = fx.identity.to_str().unwrap();
    fx.ok(&["wal-fetch", "db", name, good.to_str().unwrap(), "--identity", id, "--prefetch", "0"]);
    let bytes = std::fs::read(&good).unwrap();
    let (rt, store, _d) = fx.raw_store(&backend, "db", "db");
    let key = rt
        .block_on(store.list("wal/"))
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .find(|k| k.contains(&format!("/{name}/")))
        .unwrap();
    let fp = key.rsplit('/').next().unwrap().to_string();
    let spool = fx.path("spool");
    std::fs::create_dir_all(&spool).unwrap();
    // Half a segment under both the old spool name and the new one.
    std::fs::write(spool.join(name), &bytes[..bytes.len() / 2]).unwrap();
    std::fs::write(spool.join(format!("{name}.{fp}")), &bytes[..bytes.len() / 2]).unwrap();
    let dest = fx.path("dest");
    fx.ok(&[
        "wal-fetch",
        "db",
        name,
        dest.to_str().unwrap(),
        "--identity",
        id,
        "--spool",
        spool.to_str().unwrap(),
        "--prefetch",
        "0",
    ]);
    assert!(std::fs::read(&dest).unwrap() == bytes, "a damaged spooled segment was served");
}

/// `standby.signal` in the source used to be copied: a backup taken from a standby restored as
/// a standby that never ends recovery.
#[test]
fn standby_and_recovery_signals_are_not_backed_up() {
    let (backend, fx, pg) = archiving_cluster(Kind::Moto);
    fx.pg_policy("db", &backend, "db", "physical", &pg.data, "");
    for f in ["standby.signal", "recovery.signal"] {
        std::fs::write(pg.data.join(f), b"").unwrap();
    }
    fx.ok(&["backup", "db"]);
    for f in ["standby.signal", "recovery.signal"] {
        std::fs::remove_file(pg.data.join(f)).unwrap();
    }
    let r = fx.path("r");
    fx.ok(&["restore", "db", "--target", r.to_str().unwrap(), "--identity", fx.identity.to_str().unwrap()]);
    assert!(!r.join("standby.signal").exists(), "standby.signal was restored");
}
