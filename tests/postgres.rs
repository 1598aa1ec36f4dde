//! PostgreSQL 15 end to end: physical backups with WAL archiving and point-in-time restore,
//! logical round trip, and the faults an operator meets. Real clusters, real S3 servers.

mod common;
use common::pg::{psql, switch_and_wait_archived, table_hashes, Pg, Restored};
use common::*;

const TABLES: &[&str] = &["accounts", "events"];

fn load(dsn: &str) {
    psql(dsn, "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL, note text)");
    psql(dsn, "CREATE TABLE events (id bigserial PRIMARY KEY, at timestamptz DEFAULT now(), payload text)");
    psql(dsn, "INSERT INTO accounts SELECT g, g * 10, md5(g::text) FROM generate_series(1, 200000) g");
    psql(dsn, "INSERT INTO events (payload) SELECT repeat(md5(g::text), 4) FROM generate_series(1, 50000) g");
}

fn workload(dsn: &str, round: i32) {
    psql(dsn, &format!("UPDATE accounts SET balance = balance + {round} WHERE id % 97 = {}", round % 97));
    psql(dsn, &format!("INSERT INTO events (payload) SELECT 'round {round} ' || g FROM generate_series(1, 2000) g"));
    psql(dsn, &format!("DELETE FROM events WHERE id % 1000 = {round}"));
}

fn env_with(fx: &Fixture, pg: &Pg) -> Vec<(String, String)> {
    let mut e = fx.env.clone();
    e.push(("VEZA_PG_DSN".into(), pg.dsn()));
    e
}

fn pitr(kind: Kind) {
    let backend = Backend::start(kind);
    let mut fx = Fixture::new(&backend);
    pg_open(&fx);
    let pg = Pg::start(&fx.archive_command("db"), fx.env.clone());
    fx.env = env_with(&fx, &pg);
    fx.pg_policy("db", &backend, "db", "physical", &pg.data, "");
    let dsn = pg.dsn();
    load(&dsn);

    let full = fx.json(&["backup", "db", "--full"]);
    assert_eq!(full["kind"], "full");
    let info = &full["postgres"];
    assert!(
        info["start-lsn"].as_str().is_some() && info["timeline"] == 1 && info["version"].as_i64().unwrap() >= 150000,
        "{full}"
    );

    workload(&dsn, 1);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let at = psql(&dsn, "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')");
    let at_hashes = table_hashes(&dsn, TABLES);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    workload(&dsn, 2);

    let inc = fx.json(&["backup", "db"]);
    assert_eq!(inc["kind"], "incremental");
    assert!(
        inc["stats"]["files-read"].as_u64().unwrap() < full["stats"]["files-read"].as_u64().unwrap() / 2,
        "incremental re-read most files: {}",
        inc["stats"]
    );
    assert!(
        inc["stats"]["bytes-uploaded"].as_u64().unwrap() < full["stats"]["bytes-uploaded"].as_u64().unwrap(),
        "{}",
        inc["stats"]
    );

    workload(&dsn, 3);
    let final_hashes = table_hashes(&dsn, TABLES);
    switch_and_wait_archived(&dsn);

    // To the recorded time: picks the full backup (the incremental ends later) and replays WAL.
    let port = free_port();
    let r1 = fx.path("r1");
    let s = fx.json(&[
        "restore",
        "db",
        "--to-time",
        &at,
        "--target",
        r1.to_str().unwrap(),
        "--start",
        "--port",
        &port.to_string(),
        "--identity",
        fx.identity.to_str().unwrap(),
    ]);
    let srv = Restored { data: r1.clone(), port };
    assert_eq!(s["snapshot"], full["id"], "{s}");
    assert_eq!(table_hashes(&srv.dsn(), TABLES), at_hashes, "restored tables differ from the recorded state at {at}");
    assert_eq!(psql(&srv.dsn(), "SELECT pg_is_in_recovery()"), "f");
    // Archiving is off in the copy, and the owner and mode are right.
    assert_eq!(psql(&srv.dsn(), "SHOW archive_mode"), "off");
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(&r1).unwrap();
    assert_eq!(m.mode() & 0o777, 0o700);
    assert_eq!(m.uid(), std::fs::metadata(&pg.data).unwrap().uid());
    assert!(!r1.join("veza-dr-restore/identity").exists(), "the identity copy was not removed after recovery");
    drop(srv);

    // Latest: the incremental plus all archived WAL equals the live cluster.
    let port = free_port();
    let r2 = fx.path("r2");
    let s = fx.json(&[
        "restore",
        "db",
        "--target",
        r2.to_str().unwrap(),
        "--start",
        "--port",
        &port.to_string(),
        "--identity",
        fx.identity.to_str().unwrap(),
    ]);
    let srv = Restored { data: r2, port };
    assert_eq!(s["snapshot"], inc["id"], "{s}");
    assert_eq!(table_hashes(&srv.dsn(), TABLES), final_hashes);
    assert_eq!(table_hashes(&dsn, TABLES), final_hashes, "the live cluster moved");
    drop(srv);

    // wal-push: an identical re-push succeeds, a different file under the same name fails.
    let seg = psql(&dsn, "SELECT pg_walfile_name(pg_current_wal_lsn())");
    let prev = format!("{:024X}", u128::from_str_radix(&seg, 16).unwrap() - 1);
    let copy = fx.path(&prev);
    std::fs::copy(pg.data.join("pg_wal").join(&prev), &copy).unwrap();
    fx.ok(&["wal-push", "db", copy.to_str().unwrap()]);
    let mut bytes = std::fs::read(&copy).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&copy, bytes).unwrap();
    let o = fx.run(&["wal-push", "db", copy.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already archived with different content"), "{}", stderr(&o));
}

/// The fixture's files must be readable by the postgres user (archive_command, restore).
fn pg_open(fx: &Fixture) {
    common::pg::open_up(&fx.path("policies"));
}

#[test]
fn physical_pitr_on_moto() {
    pitr(Kind::Moto);
}

#[test]
fn physical_pitr_on_garage() {
    pitr(Kind::Garage);
}

#[test]
fn logical_round_trip() {
    let backend = Backend::start(Kind::Moto);
    let mut fx = Fixture::new(&backend);
    let src = Pg::start("", vec![]);
    fx.env = env_with(&fx, &src);
    fx.pg_policy("logical", &backend, "logical", "logical", &src.data, "");
    psql(&src.dsn(), "CREATE ROLE app_owner LOGIN PASSWORD 'x'");
    psql(&src.dsn(), "CREATE DATABASE app OWNER app_owner");
    let app = src.dsn_db("app");
    load(&app);
    psql(&app, "CREATE VIEW rich AS SELECT * FROM accounts WHERE balance > 1000000");
    let want = table_hashes(&app, TABLES);
    let s = fx.json(&["backup", "logical"]);
    assert_eq!(s["source"], "postgres-logical");
    let files: Vec<String> = fx.json(&["snapshots", "logical"])[0]["postgres"]["databases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect();
    assert!(files.contains(&"app".to_string()), "{files:?}");

    let dst = Pg::start("", vec![]);
    let mut c = fx.cmd(&[
        "restore",
        "logical",
        "--target-dsn",
        "env:VEZA_TARGET_DSN",
        "--identity",
        fx.identity.to_str().unwrap(),
        "--jobs",
        "2",
    ]);
    c.env("VEZA_TARGET_DSN", dst.dsn());
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let got = dst.dsn_db("app");
    assert_eq!(table_hashes(&got, TABLES), want);
    assert_eq!(psql(&got, "SELECT count(*) FROM rich"), psql(&app, "SELECT count(*) FROM rich"));
    assert_eq!(
        psql(&got, "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'app'"),
        "app_owner",
        "globals (roles) and ownership restored"
    );
}
