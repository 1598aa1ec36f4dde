//! PostgreSQL 15 end to end: physical backups with WAL archiving and point-in-time restore,
//! logical round trip, and the faults an operator meets. Real clusters, real S3 servers.

use crate::common::pg::{psql, switch_and_wait_archived, table_hashes, Pg, Restored};
use crate::common::*;

const TABLES: &[&str] = &["accounts", "events"];

pub(crate) fn load(dsn: &str) {
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

/// A backend, a fixture with a physical policy `db`, and its archiving cluster.
fn physical(kind: Kind) -> (Backend, Fixture, Pg) {
    physical_with(kind, "")
}

/// The same with `extra` policy text (retention, for one).
pub(crate) fn physical_with(kind: Kind, extra: &str) -> (Backend, Fixture, Pg) {
    physical_logging(kind, extra, None)
}

/// The same with `VEZA_DR_LOG` set for archive_command too (its lines go to the server's log).
fn physical_logging(kind: Kind, extra: &str, log: Option<&str>) -> (Backend, Fixture, Pg) {
    let backend = Backend::start(kind);
    let mut fx = Fixture::new(&backend);
    pg_open(&fx);
    if let Some(filter) = log {
        fx.env.push(("VEZA_DR_LOG".into(), filter.into()));
    }
    let pg = Pg::start(&fx.archive_command("db"), fx.env.clone());
    fx.env = env_with(&fx, &pg);
    fx.pg_policy("db", &backend, "db", "physical", &pg.data, extra);
    (backend, fx, pg)
}

fn pitr(kind: Kind) {
    let (_backend, fx, pg) = physical(kind);
    let dsn = pg.dsn();
    load(&dsn);
    // A file written less than a second before a backup starts is read again by the next one
    // (racy-clean, `snapshot::unchanged`). initdb wrote every file of the cluster moments ago:
    // on a fast machine a backup taken now would leave all of them to the incremental.
    std::thread::sleep(std::time::Duration::from_millis(1100));

    let full = fx.json(&["backup", "db", "--full"]);
    assert_eq!(full["kind"], "full");
    // The test clusters have data checksums: every real page read passes.
    assert_eq!(full["stats"]["page-checksum-failures"], 0, "{full}");
    let info = &full["postgres"];
    assert!(
        info["start-lsn"].as_str().is_some() && info["timeline"] == 1 && info["version"].as_i64().unwrap() >= 150000,
        "{full}"
    );

    workload(&dsn, 1);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    // On Garage the time is given as a DBA copies it from psql (`2026-12-01 10:02:10.269957+00`).
    let at = if matches!(kind, Kind::Garage) {
        psql(&dsn, "SELECT now()::text")
    } else {
        psql(&dsn, "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
    };
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
    let s = fx.json(&restore_args(&fx, &r1, port, &["--to-time", &at]));
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
    let s = fx.json(&restore_args(&fx, &r2, port, &[]));
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

/// `restore db --target T --start --port P --identity …` plus `extra`.
pub(crate) fn restore_args<'a>(
    fx: &'a Fixture,
    target: &'a std::path::Path,
    port: u16,
    extra: &[&'a str],
) -> Vec<String> {
    let mut a: Vec<String> = ["restore", "db"].iter().chain(extra.iter()).map(|s| s.to_string()).collect();
    a.extend(["--target".into(), target.display().to_string(), "--start".into(), "--port".into(), port.to_string()]);
    a.extend(["--identity".into(), fx.identity.display().to_string()]);
    a
}

/// The fixture's files must be readable by the postgres user (archive_command, restore).
fn pg_open(fx: &Fixture) {
    crate::common::pg::open_up(&fx.path("policies"));
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

fn one_line_error(o: &std::process::Output) -> String {
    let e = stderr(o);
    assert!(
        e.starts_with("veza-dr: error: ") && e.lines().count() <= 2 && !e.contains("panicked"),
        "not a one-line error:\n{e}"
    );
    e
}

#[test]
fn bad_dsn_password_privileges_and_data_dir_are_clear_errors() {
    let backend = Backend::start(Kind::Moto);
    let mut fx = Fixture::new(&backend);
    let pg = Pg::start(&fx.archive_command("db"), fx.env.clone());
    fx.pg_policy("db", &backend, "db", "physical", &pg.data, "");

    // The DSN reference is not set.
    let o = fx.run(&["backup", "db"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(one_line_error(&o).contains("secret env:VEZA_PG_DSN is not set"));

    let try_dsn = |dsn: String| {
        let mut c = fx.cmd(&["backup", "db"]);
        c.env("VEZA_PG_DSN", &dsn);
        c.output().unwrap()
    };
    // Nothing listens there.
    let o = try_dsn(pg.dsn().replace(&format!("port={}", pg.port), "port=1"));
    assert_eq!(o.status.code(), Some(1));
    let e = one_line_error(&o);
    assert!(e.contains("cannot connect to PostgreSQL (env:VEZA_PG_DSN)") && e.contains("check the host/port"), "{e}");
    // Wrong password: named as such, and the password never printed.
    let o = try_dsn(pg.dsn().replace(crate::common::pg::PASSWORD, "not-the-password"));
    let e = one_line_error(&o);
    assert!(e.contains("password authentication failed") && e.contains("check the user and password"), "{e}");
    assert!(!e.contains("not-the-password") && !e.contains(crate::common::pg::PASSWORD), "a password leaked: {e}");
    // A user without backup privileges.
    psql(&pg.dsn(), "CREATE ROLE plain LOGIN PASSWORD 'plainpw'");
    let o = try_dsn(pg.dsn().replace("user=postgres", "user=plain").replace(crate::common::pg::PASSWORD, "plainpw"));
    let e = one_line_error(&o);
    assert!(
        e.contains("permission denied for function pg_backup_start") && e.contains("superuser or REPLICATION"),
        "{e}"
    );

    // A data directory that is not there.
    fx.env = env_with(&fx, &pg);
    fx.pg_policy("gone", &backend, "db", "physical", std::path::Path::new("/nonexistent/pgdata"), "");
    let o = fx.run(&["backup", "gone"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(one_line_error(&o).contains("cannot read data directory /nonexistent/pgdata"));
    // No snapshot was committed by any of these.
    assert_eq!(fx.json(&["snapshots", "db"]).as_array().unwrap().len(), 0);
}

#[test]
fn archive_mode_off_is_refused() {
    let backend = Backend::start(Kind::Moto);
    let mut fx = Fixture::new(&backend);
    let pg = Pg::start("", vec![]);
    fx.env = env_with(&fx, &pg);
    fx.pg_policy("db", &backend, "db", "physical", &pg.data, "");
    let o = fx.run(&["backup", "db"]);
    assert_eq!(o.status.code(), Some(1));
    let e = one_line_error(&o);
    assert!(e.contains("archive_mode is off") && e.contains("veza-dr wal-push db %p"), "{e}");
}

#[test]
fn wal_push_with_the_store_down_fails_and_loses_nothing() {
    let (mut backend, fx, pg) = archiving_cluster(Kind::Garage);
    fx.pg_policy("db", &backend, "db", "physical", &pg.data, "");
    let dsn = pg.dsn();
    load(&dsn);
    fx.json(&["backup", "db"]);

    backend.stop();
    psql(&dsn, "INSERT INTO events (payload) SELECT 'while the store was down ' || g FROM generate_series(1, 5000) g");
    let seg = psql(&dsn, "SELECT pg_walfile_name(pg_switch_wal())");
    let t = std::time::Instant::now();
    while psql(&dsn, "SELECT failed_count FROM pg_stat_archiver") == "0" {
        assert!(t.elapsed().as_secs() < 60, "wal-push did not fail while the store was down");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(psql(&dsn, "SELECT last_failed_wal FROM pg_stat_archiver"), seg);
    // The archiver's stderr reaches the server log asynchronously to the counter.
    let t = std::time::Instant::now();
    while !pg.log().contains("the endpoint is unreachable") {
        assert!(t.elapsed().as_secs() < 20, "the server log should carry wal-push's error and hint:\n{}", pg.log());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    backend.restart();
    switch_and_wait_archived(&dsn);
    let want = table_hashes(&dsn, TABLES);
    let port = free_port();
    let r = fx.path("r");
    fx.ok(&restore_args(&fx, &r, port, &[]));
    let srv = Restored { data: r, port };
    assert_eq!(table_hashes(&srv.dsn(), TABLES), want, "rows written while the store was down were lost");
}

#[test]
fn a_missing_wal_segment_is_named_with_the_last_reachable_point() {
    let (backend, fx, pg) = archiving_cluster(Kind::Moto);
    fx.pg_policy("db", &backend, "db", "physical", &pg.data, "");
    let dsn = pg.dsn();
    load(&dsn);
    let full = fx.json(&["backup", "db"]);
    let stop_wal = full["postgres"]["stop-wal"].as_str().unwrap().to_string();
    workload(&dsn, 1);
    let gap = psql(&dsn, "SELECT pg_walfile_name(pg_switch_wal())");
    workload(&dsn, 2);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let at = psql(&dsn, "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')");
    switch_and_wait_archived(&dsn);
    assert!(gap > stop_wal, "the deleted segment must lie after the backup");

    // Delete the segment from the repository.
    let (rt, store, _dir) = fx.raw_store(&backend, "db", "db");
    // wal/<system identifier>/<timeline>/<name>/<fingerprint>
    let objs: Vec<(String, u64)> = rt
        .block_on(store.list("wal/"))
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.contains(&format!("/{}/{gap}/", &gap[..8])))
        .collect();
    assert_eq!(objs.len(), 1);
    rt.block_on(store.delete(&objs[0].0)).unwrap();

    // A target beyond the gap: the server refuses to promote, and we say why.
    let port = free_port();
    let r1 = fx.path("r1");
    let o = fx.run(&restore_args(&fx, &r1, port, &["--to-time", &at]));
    let _srv = Restored { data: r1, port };
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains(&format!("WAL segment {gap} is not in the repository")) && e.contains("last reachable point"),
        "{e}"
    );

    // Latest: PostgreSQL would promote at the gap; veza-dr reports the gap as damage.
    let port = free_port();
    let r2 = fx.path("r2");
    let o = fx.run(&restore_args(&fx, &r2, port, &[]));
    let _srv = Restored { data: r2.clone(), port };
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains(&format!("WAL segment {gap} is missing from the repository"))
            && e.contains("although WAL continues"),
        "{e}"
    );

    // A target before the gap: the last record before it, where that recovery stopped. The
    // server's WAL read-ahead asks for the missing segment all the same; the target is
    // reached, so that is no gap and the restore succeeds.
    let log = std::fs::read_to_string(r2.join("veza-dr-restore/server.log")).unwrap();
    let reached = log.lines().filter_map(|l| l.split("redo done at ").nth(1)).next_back().unwrap();
    let reached = reached.split_whitespace().next().unwrap().to_string();
    let port = free_port();
    let r3 = fx.path("r3");
    let o = fx.run(&restore_args(&fx, &r3, port, &["--to-lsn", &reached]));
    let _srv = Restored { data: r3, port };
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn wal_retention_follows_the_oldest_retained_backup() {
    let (backend, fx, pg) = archiving_cluster(Kind::Moto);
    fx.pg_policy("db", &backend, "db", "physical", &pg.data, "[retention]\nkeep-last = 1\nprune-grace = \"0s\"\n");
    let dsn = pg.dsn();
    load(&dsn);
    let first = fx.json(&["backup", "db", "--full"]);
    for round in 1..4 {
        workload(&dsn, round);
        psql(&dsn, "SELECT pg_switch_wal()");
    }
    let second = fx.json(&["backup", "db", "--full"]);
    workload(&dsn, 9);
    let want = table_hashes(&dsn, TABLES);
    switch_and_wait_archived(&dsn);
    let keep_from = second["postgres"]["start-wal"].as_str().unwrap().to_string();
    let first_start = first["postgres"]["start-wal"].as_str().unwrap().to_string();
    assert!(first_start < keep_from);

    let p1 = fx.json(&["prune", "db"]);
    assert_eq!(p1["forgotten"].as_array().unwrap().len(), 1);
    let marked_wal: Vec<String> = p1["marked"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|k| k.as_str())
        .filter(|k| k.starts_with("wal/"))
        .map(String::from)
        .collect();
    assert!(marked_wal.iter().any(|k| k.contains(&first_start)), "the first backup's WAL is marked: {marked_wal:?}");
    assert!(
        marked_wal.iter().all(|k| k.split('/').nth(3).unwrap()[8..24] < keep_from[8..24]),
        "WAL the kept backup needs was marked: {marked_wal:?}"
    );
    let p2 = fx.json(&["prune", "db"]);
    assert_eq!(
        p2["deleted"].as_array().unwrap().iter().filter(|k| k.as_str().unwrap().starts_with("wal/")).count(),
        marked_wal.len()
    );

    let port = free_port();
    let r = fx.path("r");
    fx.ok(&restore_args(&fx, &r, port, &[]));
    let srv = Restored { data: r, port };
    assert_eq!(table_hashes(&srv.dsn(), TABLES), want);
}

#[test]
fn tablespaces_are_backed_up_and_restored_beside_the_copy() {
    let (backend, fx, pg) = archiving_cluster(Kind::Moto);
    fx.pg_policy("db", &backend, "db", "physical", &pg.data, "");
    let ts = fx.path("tablespace-location");
    std::fs::create_dir_all(&ts).unwrap();
    crate::common::pg::open_up(&ts);
    std::process::Command::new("chown").arg("postgres").arg(&ts).status().unwrap();
    let dsn = pg.dsn();
    psql(&dsn, &format!("CREATE TABLESPACE fast LOCATION '{}'", ts.display()));
    psql(&dsn, "CREATE TABLE hot (id int PRIMARY KEY, v text) TABLESPACE fast");
    psql(&dsn, "INSERT INTO hot SELECT g, md5(g::text) FROM generate_series(1, 50000) g");
    let s = fx.json(&["backup", "db"]);
    assert!(s["stats"]["files"].as_u64().unwrap() > 0);
    psql(&dsn, "INSERT INTO hot SELECT g, 'after the backup' FROM generate_series(50001, 60000) g");
    let want = table_hashes(&dsn, &["hot"]);
    switch_and_wait_archived(&dsn);
    let source_files = walkdir::WalkDir::new(&ts).into_iter().count();

    let port = free_port();
    let r = fx.path("r");
    fx.ok(&restore_args(&fx, &r, port, &[]));
    let srv = Restored { data: r.clone(), port };
    assert_eq!(table_hashes(&srv.dsn(), &["hot"]), want, "the tablespace's table was not restored");
    let loc = psql(&srv.dsn(), "SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'fast'");
    assert!(loc.starts_with(&format!("{}-tablespaces/", r.display())), "restored tablespace points at {loc}");
    drop(srv);
    // The source's own tablespace was not touched.
    assert_eq!(walkdir::WalkDir::new(&ts).into_iter().count(), source_files);
    assert_eq!(psql(&dsn, "SELECT count(*) FROM hot"), "60000");

    // A delta restore over that copy, drifted inside its tablespace, brings it to a newer
    // snapshot: the tablespace is compared in place and linked beside the copy again.
    psql(&dsn, "UPDATE hot SET v = 'changed' WHERE id % 100 = 0");
    fx.ok(&["backup", "db"]);
    let want = table_hashes(&dsn, &["hot"]);
    switch_and_wait_archived(&dsn);
    let rel = psql(&dsn, "SELECT pg_relation_filepath('hot')");
    assert!(rel.starts_with("pg_tblspc/"), "{rel}");
    std::fs::remove_file(r.join(&rel)).unwrap();
    let port = free_port();
    let d = fx.json(&restore_args(&fx, &r, port, &["--delta"]));
    let srv = Restored { data: r.clone(), port };
    assert_eq!(table_hashes(&srv.dsn(), &["hot"]), want, "{d}");
    let again = psql(&srv.dsn(), "SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'fast'");
    assert_eq!(again, loc, "the tablespace moved");
    assert!(d["delta"]["files-unchanged"].as_u64().unwrap() > 0, "{d}");
    drop(srv);
    assert_eq!(table_hashes(&dsn, &["hot"]), want, "the source's own tablespace changed");
}

#[test]
fn restore_to_a_named_point_a_transaction_or_the_backup_end() {
    let (backend, fx, pg) = archiving_cluster(Kind::Moto);
    fx.pg_policy("db", &backend, "db", "physical", &pg.data, "");
    let dsn = pg.dsn();
    psql(&dsn, "CREATE TABLE steps (n int)");
    psql(&dsn, "INSERT INTO steps VALUES (1)");
    fx.ok(&["backup", "db"]);
    psql(&dsn, "INSERT INTO steps VALUES (2)");
    psql(&dsn, "SELECT pg_create_restore_point('before_three')");
    let xid = psql(&dsn, "BEGIN; INSERT INTO steps VALUES (3); SELECT txid_current(); COMMIT;");
    let xid = xid.lines().find(|l| l.chars().all(|c| c.is_ascii_digit()) && !l.is_empty()).unwrap().to_string();
    psql(&dsn, "INSERT INTO steps VALUES (4)");
    switch_and_wait_archived(&dsn);

    for (extra, want) in [
        (vec!["--to-name", "before_three"], "1,2"),
        (vec!["--to-xid", xid.as_str()], "1,2,3"),
        (vec!["--immediate"], "1"),
    ] {
        let port = free_port();
        let r = fx.path(&format!("r-{}", extra[0].trim_start_matches('-')));
        fx.ok(&restore_args(&fx, &r, port, &extra));
        let srv = Restored { data: r, port };
        assert_eq!(psql(&srv.dsn(), "SELECT string_agg(n::text, ',' ORDER BY n) FROM steps"), want, "{extra:?}");
    }
}

/// A page damaged on disk (one byte, with the server stopped, so its LSN is older than the
/// backup's start) is reported by path and block in the backup's warnings and stats; the
/// backup itself succeeds, and the undamaged pages raise nothing.
#[test]
fn a_page_that_fails_its_checksum_is_reported_by_path_and_block() {
    let (_backend, fx, pg) = physical(Kind::Moto);
    let dsn = pg.dsn();
    psql(&dsn, "CREATE TABLE t (id int, note text)");
    psql(&dsn, "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 20000) g");
    psql(&dsn, "CHECKPOINT");
    let rel = psql(&dsn, "SELECT pg_relation_filepath('t')");
    let clean = fx.json(&["backup", "db", "--full"]);
    assert_eq!(clean["stats"]["page-checksum-failures"], 0, "{clean}");

    let log = pg.data.parent().unwrap().join("server.log");
    pg.ctl(&["stop", "-m", "fast"]);
    let file = pg.data.join(&rel);
    let mut bytes = std::fs::read(&file).unwrap();
    assert!(bytes.len() >= 8 * 8192, "{rel} is too small: {}", bytes.len());
    bytes[3 * 8192 + 4000] ^= 0x5a;
    std::fs::write(&file, &bytes).unwrap();
    pg.ctl(&["start", "-w", "-l", log.to_str().unwrap()]);

    let o = fx.run(&["backup", "db", "--full", "--json"]);
    assert!(o.status.success(), "a damaged page must not fail the backup: {}", stderr(&o));
    let snap: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(snap["stats"]["page-checksum-failures"], 1, "{snap}");
    let warnings: Vec<&str> = snap["warnings"].as_array().unwrap().iter().filter_map(|w| w.as_str()).collect();
    let want = format!("page checksum mismatch in {rel}: block 3 (");
    assert!(warnings.iter().any(|w| w.starts_with(&want)), "{warnings:?}");
    assert_eq!(warnings.iter().filter(|w| w.contains("page checksum")).count(), 1, "{warnings:?}");
}

/// `restore --delta` over an old copy of the cluster (restored, run and promoted, then
/// drifted: a relation file deleted, a page changed, junk added) brings it to a newer
/// snapshot: every table matches the source, and only what differs is fetched.
#[test]
fn delta_restore_brings_an_old_data_directory_to_a_newer_snapshot() {
    let (_backend, fx, pg) = physical(Kind::Moto);
    let dsn = pg.dsn();
    load(&dsn);
    fx.ok(&["backup", "db", "--full"]);
    let old = fx.path("old-copy");
    let port = free_port();
    fx.ok(&restore_args(&fx, &old, port, &[]));
    let copy = Restored { data: old.clone(), port };
    psql(&copy.dsn(), "CREATE TABLE only_in_the_copy AS SELECT 1 AS x");
    drop(copy); // stopped

    workload(&dsn, 1);
    workload(&dsn, 2);
    let want = table_hashes(&dsn, TABLES);
    switch_and_wait_archived(&dsn);
    fx.ok(&["backup", "db"]);
    // Drift on top of the copy's own divergence.
    let rel = psql(&dsn, "SELECT pg_relation_filepath('events')");
    std::fs::remove_file(old.join(&rel)).unwrap();
    let acc = old.join(psql(&dsn, "SELECT pg_relation_filepath('accounts')"));
    let mut b = std::fs::read(&acc).unwrap();
    b[5 * 8192 + 1000] ^= 0x33;
    std::fs::write(&acc, &b).unwrap();
    std::fs::write(old.join("base/junk"), "not PostgreSQL's").unwrap();

    let port2 = free_port();
    let r = fx.json(&restore_args(&fx, &old, port2, &["--delta"]));
    let srv = Restored { data: old.clone(), port: port2 };
    assert_eq!(table_hashes(&srv.dsn(), TABLES), want, "{r}");
    let gone = psql(&srv.dsn(), "SELECT count(*) FROM pg_class WHERE relname = 'only_in_the_copy'");
    assert_eq!(gone, "0", "the copy's own table survived the delta restore");
    assert!(!old.join("base/junk").exists());
    let d = &r["delta"];
    let (fetched, total) = (d["bytes-fetched"].as_u64().unwrap(), r["bytes"].as_u64().unwrap());
    assert!(fetched < total, "{r}");
    assert!(d["files-unchanged"].as_u64().unwrap() > 0 && d["removed"].as_u64().unwrap() > 0, "{r}");
    println!("delta restore: fetched {fetched} of {total} bytes; {d}");
    // The copy was restored by veza-dr: the files its server did not write since are
    // compared by the record of that restore, unread; the drifted ones were read.
    assert!(d["files-known"].as_u64().unwrap() > 0, "{r}");

    // A running server is never restored over.
    let o = fx.run(&restore_args(&fx, &old, free_port(), &["--delta"]));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("holds postmaster.pid"), "{}", stderr(&o));
}

/// wal-push's look-ahead: with a backlog of finished segments (here: built while the store was
/// down), segments are stored ahead of archive_command and acknowledged from their marker;
/// none is lost (a restore to the end of the archive matches the source).
#[test]
fn wal_pushed_ahead_is_acknowledged_once_stored_and_none_is_lost() {
    let (mut backend, fx, pg) = physical_logging(Kind::Garage, "", Some("veza_dr=debug"));
    let dsn = pg.dsn();
    load(&dsn);
    fx.ok(&["backup", "db", "--full"]);
    backend.stop();
    for round in 1..=8 {
        psql(
            &dsn,
            &format!("INSERT INTO events (payload) SELECT 'backlog {round} ' || g FROM generate_series(1, 3000) g"),
        );
        psql(&dsn, "SELECT pg_switch_wal()");
    }
    let t = std::time::Instant::now();
    while psql(&dsn, "SELECT failed_count FROM pg_stat_archiver") == "0" {
        assert!(t.elapsed().as_secs() < 60, "wal-push did not fail while the store was down");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let want = table_hashes(&dsn, TABLES);
    backend.restart();
    switch_and_wait_archived(&dsn);
    let ahead = pg.log().matches("was stored ahead: acknowledged").count();
    assert!(ahead > 0, "no segment was acknowledged from the look-ahead:\n{}", pg.log());
    println!("{ahead} segments acknowledged from the look-ahead");
    let port = free_port();
    let r = fx.path("r");
    fx.ok(&restore_args(&fx, &r, port, &[]));
    let srv = Restored { data: r, port };
    assert_eq!(table_hashes(&srv.dsn(), TABLES), want, "a segment pushed ahead is missing or wrong");
}

/// wal-tail: segments written while archive_command keeps up are compressed ahead, 1 MiB at a
/// time, and archive_command stores those frames for the chunks that did not change since; a
/// restore through that WAL matches the source.
#[test]
fn wal_compressed_ahead_restores_exactly() {
    let (_backend, fx, pg) = physical_logging(Kind::Moto, "", Some("veza_dr=debug"));
    let dsn = pg.dsn();
    load(&dsn);
    fx.ok(&["backup", "db", "--full"]);
    // About 10 segments at a pace the archiver keeps up with, and updates that rewrite pages.
    for round in 0..40 {
        psql(&dsn, &format!("INSERT INTO events (payload) SELECT repeat(md5((g + {round})::text), 4) FROM generate_series(1, 20000) g"));
        psql(&dsn, &format!("UPDATE accounts SET balance = balance + 1 WHERE id % 40 = {round}"));
    }
    let want = table_hashes(&dsn, TABLES);
    switch_and_wait_archived(&dsn);
    let log = pg.log();
    let reused: usize = log
        .lines()
        .filter(|l| l.contains("were compressed ahead"))
        .filter_map(|l| l.split(" frames of ").next()?.rsplit(' ').next()?.parse::<usize>().ok())
        .sum();
    assert!(reused > 0, "no frame compressed ahead was stored:\n{log}");
    println!("{reused} frames compressed ahead were stored");
    let port = free_port();
    let r = fx.path("r");
    fx.ok(&restore_args(&fx, &r, port, &[]));
    let srv = Restored { data: r, port };
    assert_eq!(table_hashes(&srv.dsn(), TABLES), want, "WAL stored from frames compressed ahead is wrong");
}
