//! Page-level incrementals of physical PostgreSQL backups: a chain of snapshots stored as
//! changed pages over a base restores byte-identical relation files and every table, PITR
//! runs over it, and prune keeps the bases that retained snapshots need. Real PostgreSQL 15,
//! file:// and a real S3 server.

use crate::common::pg::{psql, switch_and_wait_archived, table_hashes, Restored};
use crate::common::*;
use crate::postgres::{load, physical_with, restore_args};
use std::path::Path;

const TABLES: &[&str] = &["accounts", "events"];

/// An hour of traffic in small: a few scattered rows updated, some appended, one page's
/// worth deleted. Most pages stay as they were. (Appended rows are larger than the free
/// space the load left in each page: small ones would land in every page, through the free
/// space map, and change them all.)
fn hour(dsn: &str, round: i32) {
    psql(dsn, &format!("UPDATE accounts SET balance = balance + {round} WHERE id % 20011 = {round}"));
    psql(
        dsn,
        &format!("INSERT INTO events (payload) SELECT repeat(md5(g::text), 12) FROM generate_series(1, 3000) g WHERE {round} > 0"),
    );
    psql(dsn, &format!("DELETE FROM events WHERE id BETWEEN {} AND {}", round * 100, round * 100 + 20));
}

/// The main-fork files of the tables, as bytes.
fn relation_files(dsn: &str, data: &Path) -> Vec<(String, Vec<u8>)> {
    TABLES
        .iter()
        .map(|t| {
            let rel = psql(dsn, &format!("SELECT pg_relation_filepath('{t}')"));
            let bytes = std::fs::read(data.join(&rel)).unwrap();
            (rel, bytes)
        })
        .collect()
}

fn chain(kind: Kind) {
    let (backend, mut fx, pg) = physical_with(kind, "[retention]\nkeep-last = 2\nprune-grace = \"0s\"\n");
    if kind == Kind::File {
        // wal-push (as postgres) and the backups (as root) share the directory.
        fx.env.push(("VEZA_TEST_UMASK".into(), "000".into()));
        crate::common::pg::open_up(&backend.dir.path().join("db"));
    }
    let dsn = pg.dsn();
    load(&dsn);
    // Hint bits set once, before the base: afterwards only real changes move a page's LSN.
    psql(&dsn, "VACUUM (FREEZE, ANALYZE)");
    psql(&dsn, "CHECKPOINT");
    let full = fx.json(&["backup", "db", "--full"]);
    assert_eq!(full["stats"]["files-layered"], 0, "{full}");
    let accounts_pages: u64 = psql(&dsn, "SELECT pg_relation_size('accounts') / 8192").parse().unwrap();

    let mut snaps = Vec::new();
    let mut at = None;
    for round in 1..=4 {
        hour(&dsn, round);
        let hashes = table_hashes(&dsn, TABLES);
        psql(&dsn, "CHECKPOINT");
        let inc = fx.json(&["backup", "db"]);
        let files = relation_files(&dsn, &pg.data);
        assert_eq!(inc["kind"], "incremental", "{inc}");
        let st = &inc["stats"];
        assert!(st["files-layered"].as_u64().unwrap() >= 2, "the tables were not stored as pages: {st}");
        // A handful of pages per table, not the 1 MiB pieces around each of them.
        let pages = st["pages-stored"].as_u64().unwrap();
        assert!(pages > 0 && pages < accounts_pages / 4, "{pages} pages stored: {st}");
        assert!(st["bytes-new"].as_u64().unwrap() < (pages + 200) * 8192, "{st}");
        if round == 2 {
            // A point between the second and the third incremental, for PITR over the chain.
            std::thread::sleep(std::time::Duration::from_millis(1100));
            psql(&dsn, "UPDATE accounts SET note = 'between' WHERE id = 7");
            let time = psql(&dsn, "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')");
            at = Some((time, table_hashes(&dsn, TABLES), inc["id"].clone()));
            std::thread::sleep(std::time::Duration::from_millis(1100));
        }
        snaps.push((inc["id"].as_str().unwrap().to_string(), hashes, files));
    }

    // Every link of the chain restores its relation files byte for byte (files only).
    for (i, (id, _, files)) in snaps.iter().enumerate() {
        let dir = fx.path(&format!("files-{i}"));
        fx.ok(&[
            "restore",
            "db",
            "--snapshot",
            id,
            "--target",
            dir.to_str().unwrap(),
            "--identity",
            fx.identity.to_str().unwrap(),
        ]);
        for (rel, want) in files {
            let got = std::fs::read(dir.join(rel)).unwrap();
            assert_eq!(got.len(), want.len(), "{rel} of snapshot {id} has another length");
            let differ = (0..want.len() / 8192).filter(|p| got[p * 8192..][..8192] != want[p * 8192..][..8192]).count();
            assert_eq!(differ, 0, "{differ} pages of {rel} differ in the restore of snapshot {id}");
        }
    }

    // A delta restore of the newest link over a copy one link older rewrites only the pages
    // that differ, and yields the newest link's files byte for byte.
    let (last_id, _, last_files) = snaps.last().unwrap();
    let older = fx.path("files-2");
    let r = fx.json(&[
        "restore",
        "db",
        "--snapshot",
        last_id,
        "--target",
        older.to_str().unwrap(),
        "--delta",
        "--identity",
        fx.identity.to_str().unwrap(),
    ]);
    for (rel, want) in last_files {
        assert!(std::fs::read(older.join(rel)).unwrap() == *want, "{rel} differs after the delta restore: {r}");
    }
    let (fetched, total) = (r["delta"]["bytes-fetched"].as_u64().unwrap(), r["bytes"].as_u64().unwrap());
    assert!(fetched < total / 4, "the delta fetched {fetched} of {total} bytes: {r}");
    // That copy was restored by veza-dr: its layered files were compared by where each page
    // is restored from, unread, and still came out byte for byte.
    assert!(r["delta"]["files-known"].as_u64().unwrap() > 0, "{r}");
    println!("delta over the link before: fetched {fetched} of {total} bytes");

    // The newest link, started: every table as the source had it.
    let (last_id, last_hashes, _) = snaps.last().unwrap();
    let port = free_port();
    let r = fx.path("latest");
    let s = fx.json(&restore_args(&fx, &r, port, &["--immediate"]));
    assert_eq!(s["snapshot"].as_str(), Some(last_id.as_str()), "{s}");
    let srv = Restored { data: r, port };
    assert_eq!(&table_hashes(&srv.dsn(), TABLES), last_hashes);
    drop(srv);

    // PITR over the chain: the second incremental, then WAL to the recorded time.
    switch_and_wait_archived(&dsn);
    let (time, want, inc2) = at.unwrap();
    let port = free_port();
    let r = fx.path("pitr");
    let s = fx.json(&restore_args(&fx, &r, port, &["--to-time", &time]));
    assert_eq!(s["snapshot"], inc2, "{s}");
    let srv = Restored { data: r, port };
    assert_eq!(table_hashes(&srv.dsn(), TABLES), want, "PITR over the page chain to {time}");
    drop(srv);

    // Prune keeps two: the full and the first two incrementals are forgotten, and the base
    // chunks the retained ones are laid over stay. The oldest retained one restores.
    let p1 = fx.json(&["prune", "db"]);
    assert_eq!(p1["forgotten"].as_array().unwrap().len(), 3, "{p1}");
    fx.json(&["prune", "db"]);
    let v = fx.json(&["verify", "db", "--read-data", "--identity", fx.identity.to_str().unwrap()]);
    assert!(v["damage"].as_array().unwrap().is_empty(), "{v}");
    let (oldest, hashes, _) = &snaps[2];
    let port = free_port();
    let r = fx.path("oldest");
    let s = fx.json(&restore_args(&fx, &r, port, &["--snapshot", oldest, "--immediate"]));
    assert_eq!(s["snapshot"].as_str(), Some(oldest.as_str()), "{s}");
    let srv = Restored { data: r, port };
    assert_eq!(&table_hashes(&srv.dsn(), TABLES), hashes, "the oldest retained incremental after prune");
}

#[test]
fn a_chain_of_page_incrementals_restores_on_file() {
    chain(Kind::File);
}

#[test]
fn a_chain_of_page_incrementals_restores_on_moto() {
    chain(Kind::Moto);
}
