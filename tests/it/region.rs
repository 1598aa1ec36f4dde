//! The DR region: a primary on Moto and a replica on Garage, two S3 servers as two regions.
//! `replicate` copies what the replica lacks; when the primary's server is gone, snapshots,
//! restores and PostgreSQL point-in-time recovery run from the replica alone. Interrupted
//! copies resume; tampering on the replica is caught there.

use crate::common::pg::{psql, switch_and_wait_archived, table_hashes, Restored};
use crate::common::*;
use std::path::Path;

/// A `[[replica]]` named `dr` on `garage` under `prefix`, its keys in DR_KEY / DR_SECRET.
fn replica_toml(garage: &Backend, prefix: &str) -> String {
    garage
        .repository_toml(prefix)
        .replace("[repository]", "[[replica]]\nname = \"dr\"")
        .replace("VEZA_TEST_S3_KEY", "DR_KEY")
        .replace("VEZA_TEST_S3_SECRET", "DR_SECRET")
}

fn with_replica_keys(fx: &mut Fixture, garage: &Backend) {
    fx.env.push(("DR_KEY".into(), garage.key_id.clone()));
    fx.env.push(("DR_SECRET".into(), garage.secret.clone()));
}

/// The raw object store under `prefix` of a backend, and a runtime to drive it.
fn raw_store(b: &Backend, prefix: &str) -> (veza_dr::repository::Store, tokio::runtime::Runtime) {
    let dir = tempfile::tempdir().unwrap();
    let (_, recipient) = veza_dr::crypto::seal::generate_identity();
    let text = format!(
        "[source]\ntype = \"volume\"\npath = \"/srv\"\n{}\n[encryption]\nrecipients = [\"{recipient}\"]\n",
        b.repository_toml_files(prefix, dir.path())
    );
    let p = veza_dr::policy::Policy::parse(&dir.path().join("raw.toml"), &text).unwrap();
    (veza_dr::repository::Store::open(&p.repository, false).unwrap(), tokio::runtime::Runtime::new().unwrap())
}

/// The WAL object keys a backend holds under `prefix`.
fn wal_keys(b: &Backend, prefix: &str) -> std::collections::BTreeSet<String> {
    let (store, rt) = raw_store(b, prefix);
    rt.block_on(store.list("wal/")).unwrap().into_iter().map(|(k, _)| k).collect()
}

/// Flip one byte of the biggest pack on the replica, as a fault or an attacker would.
fn tamper_with_a_pack(garage: &Backend, prefix: &str) {
    let (store, rt) = raw_store(garage, prefix);
    rt.block_on(async {
        let packs = store.list("data/").await.unwrap();
        let (key, _) = packs.iter().max_by_key(|(_, n)| *n).unwrap().clone();
        let mut b = store.get(&key).await.unwrap().to_vec();
        let at = b.len() / 2;
        b[at] ^= 0x40;
        store.put(&key, b.into()).await.unwrap();
    });
}

#[test]
fn a_volume_replica_in_another_region_restores_when_the_primary_is_gone() {
    let mut moto = Backend::start(Kind::Moto);
    let garage = Backend::start(Kind::Garage);
    let mut fx = Fixture::new(&moto);
    with_replica_keys(&mut fx, &garage);
    let src = fx.path("src");
    tree::generate(&src, 8, 1);
    fx.volume_policy("vol", &moto, "vol", &src, &replica_toml(&garage, "vol"));

    // A replica is refused where the primary is, with its position.
    let same = moto.repository_toml("vol").replace("[repository]", "[[replica]]\nname = \"dr\"");
    fx.volume_policy("bad", &moto, "vol", &src, &same);
    let o = fx.run(&["snapshots", "bad"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("bad.toml:") && stderr(&o).contains("has the primary's url"), "{}", stderr(&o));
    std::fs::remove_file(fx.path("policies/bad.toml")).unwrap();

    fx.ok(&["backup", "vol"]);
    tree::generate(&src.join("more"), 2, 2);
    fx.ok(&["backup", "vol"]);
    // Nothing is on the replica before replicate; reading it says so.
    let o = fx.run(&["snapshots", "vol", "--repository", "dr"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("there is no veza-dr repository"), "{}", stderr(&o));

    let c = fx.json(&["replicate", "vol"]);
    assert_eq!(c[0]["replica"], "dr");
    assert_eq!(c[0]["snapshots"], 2, "{c}");
    assert!(c[0]["bytes-copied"].as_u64().unwrap() > 4 << 20, "{c}");
    // Idempotent: a second run copies nothing.
    let again = fx.json(&["replicate", "vol"]);
    assert_eq!(again[0]["objects-copied"], 0, "{again}");
    // A writer never writes to a replica.
    let o = fx.run(&["backup", "vol", "--repository", "dr"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));

    // kill -9 during a copy, then again: the replica completes and verifies clean.
    tree::generate(&src.join("third"), 16, 3);
    fx.ok(&["backup", "vol"]);
    let mut child = fx.cmd(&["replicate", "vol"]).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let _ = child.kill();
    let _ = child.wait();
    let listed = fx.json(&["snapshots", "vol", "--repository", "dr"]);
    assert!(listed.as_array().unwrap().len() >= 2, "a killed copy lost snapshots: {listed}");
    fx.ok(&["replicate", "vol"]);
    let id = fx.identity.to_str().unwrap().to_string();
    fx.ok(&["verify", "vol", "--repository", "dr", "--read-data", "--identity", &id]);

    // The primary region is gone: everything runs from the replica.
    moto.stop();
    let snaps = fx.json(&["snapshots", "vol", "--repository", "dr"]);
    assert_eq!(snaps.as_array().unwrap().len(), 3, "{snaps}");
    let out = fx.path("restored");
    fx.ok(&["restore", "vol", "--repository", "dr", "--target", out.to_str().unwrap(), "--identity", &id]);
    tree::assert_same(&src, &out);
    // The drill proves the region path: from the replica alone, its report stored there.
    let reports = fx.path("reports");
    let o = fx.run(&[
        "drill",
        "vol",
        "--repository",
        "dr",
        "--identity",
        &id,
        "--report-dir",
        reports.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let r: serde_json::Value = serde_json::from_str(stdout(&o).lines().next().unwrap()).unwrap();
    assert_eq!(r["verdict"], "pass", "{r}");
    let drills = fx.json(&["drills", "vol", "--repository", "dr"]);
    assert_eq!(drills[0]["id"], r["id"], "{drills}");

    // Tampering on the replica is caught by verify and by restore there.
    tamper_with_a_pack(&garage, "vol");
    let o = fx.run(&["verify", "vol", "--repository", "dr", "--read-data", "--identity", &id]);
    assert_eq!(o.status.code(), Some(3), "{}{}", stdout(&o), stderr(&o));
    let out2 = fx.path("restored2");
    let o = fx.run(&["restore", "vol", "--repository", "dr", "--target", out2.to_str().unwrap(), "--identity", &id]);
    assert_eq!(o.status.code(), Some(3), "{}{}", stdout(&o), stderr(&o));
}

/// The region-failover runbook of the seeds, as `policies/failover.toml` ships it: restore
/// from the replica into the DR cluster and start it (built-in `restore`), wait until it takes
/// reads (built-in `wait-sql`), switch DNS on a real PowerDNS, notify a real webhook.
fn region_runbook(target: &Path, port: u16, identity: &str, pdns_api: u16, hook_port: u16) -> String {
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../policies/failover.toml")).unwrap();
    let at = shipped.find("[[runbook]]\nname = \"region-failover\"").expect("the shipped region-failover runbook");
    shipped[at..]
        .replace("/var/lib/postgresql/15/dr", target.to_str().unwrap())
        .replace("port = 5432", &format!("port = {port}, identity = \"{identity}\""))
        .replace("127.0.0.1:8081", &format!("127.0.0.1:{pdns_api}"))
        .replace("${secret:chat-webhook}", &format!("http://127.0.0.1:{hook_port}/hook"))
        .replace("\"hooks.slack.com\"", &format!("\"127.0.0.1:{hook_port}\""))
        .replace("\"10.20.0.5\"", "\"10.0.0.2\"")
}

#[test]
fn the_region_failover_runbook_brings_up_postgres_from_the_replica_to_the_last_replicated_wal() {
    let mut moto = Backend::start(Kind::Moto);
    let garage = Backend::start(Kind::Garage);
    let mut fx = Fixture::new(&moto);
    with_replica_keys(&mut fx, &garage);
    let pg = crate::common::pg::Pg::start(&fx.archive_command("db"), fx.env.clone());
    fx.env.push(("VEZA_PG_DSN".into(), pg.dsn()));
    fx.pg_policy("db", &moto, "db", "physical", &pg.data, &replica_toml(&garage, "db"));
    let dsn = pg.dsn();
    psql(&dsn, "CREATE TABLE orders (id int PRIMARY KEY, note text)");
    psql(&dsn, "INSERT INTO orders SELECT g, md5(g::text) FROM generate_series(1, 50000) g");
    fx.ok(&["backup", "db", "--full"]);
    psql(&dsn, "UPDATE orders SET note = 'after the backup' WHERE id % 7 = 0");
    psql(&dsn, "INSERT INTO orders SELECT g, 'late' FROM generate_series(50001, 60000) g");
    // The last transaction committed before this instant: the RPO is at least the time from
    // here to the failover's start.
    let last_write = std::time::SystemTime::now();
    let want = table_hashes(&dsn, &["orders"]);
    switch_and_wait_archived(&dsn);
    let c = fx.json(&["replicate", "db"]);
    assert_eq!(c[0]["snapshots"], 1, "{c}");

    // The region is lost: its object store and its database.
    moto.stop();
    drop(pg);
    let dns = crate::runbook::pdns();
    let hooks = crate::runbook::web(free_port());
    let port = free_port();
    let target = fx.path("dr-data");
    let id = fx.identity.to_str().unwrap().to_string();
    let srv = Restored { data: target.clone(), port };
    fx.env.push(("VEZA_DR_DB_DSN".into(), srv.dsn()));
    fx.env.push(("VEZA_PDNS_API_KEY".into(), crate::runbook::PDNS_KEY.into()));
    fx.env.push(("VEZA_CHAT_WEBHOOK".into(), "unused: the test points notify at its own server".into()));
    std::fs::write(fx.path("policies/failover.toml"), region_runbook(&target, port, &id, dns.api_port, hooks.port))
        .unwrap();
    let plugins = crate::runbook::plugins_dir();
    let plugins = plugins.to_str().unwrap();

    // The dry run reads the replica (it names the snapshot it would restore) and changes nothing.
    let plan = fx.ok(&["--plugins", plugins, "failover", "region-failover", "--dry-run"]);
    assert!(plan.contains("of policy db from repository dr"), "{plan}");
    assert!(plan.contains("change db.example.org. A in zone example.org. from 10.0.0.1 to 10.0.0.2"), "{plan}");
    assert!(!target.exists(), "a dry run created the target");
    assert_eq!(crate::runbook::dig(dns.dns_port, "db.example.org"), "10.0.0.1");

    let lost_for = last_write.elapsed().unwrap().as_secs_f64();
    let out = fx.ok(&["--plugins", plugins, "failover", "region-failover", "--yes"]);
    assert!(out.contains("runbook region-failover: done"), "{out}");
    assert!(out.contains("(objective 4h: met)"), "{out}");
    assert_eq!(table_hashes(&srv.dsn(), &["orders"]), want, "the replica did not reach the last replicated WAL");
    assert_eq!(crate::runbook::dig(dns.dns_port, "db.example.org"), "10.0.0.2");
    let hook = hooks.hooks.lock().unwrap().join("\n");
    assert!(hook.contains("restored from repository dr") && hook.contains("10.0.0.2"), "{hook}");
    let conf = std::fs::read_to_string(target.join("postgresql.auto.conf")).unwrap();
    let rc = conf.lines().rfind(|l| l.starts_with("restore_command")).unwrap_or_default();
    assert!(rc.contains("--repository ''dr''"), "restore_command does not fetch from the replica: {rc}\n{out}");

    // The audit log holds the measured RTO and RPO of the run.
    let audit: Vec<serde_json::Value> = std::fs::read_to_string(fx.path("state/runbooks/audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let whole = audit.iter().rfind(|r| r["step"] == "*" && r["mode"] == "run").expect("a record of the run");
    let (rto, rpo) = (whole["rto-seconds"].as_f64().unwrap(), whole["rpo-seconds"].as_f64().unwrap());
    assert!(rto > 0.0 && rto < 4.0 * 3600.0, "{whole}");
    assert!(rpo > 0.0 && rpo < 600.0, "{whole}");
    // Measured, not truncated: a start time cut to whole seconds made it up to 1 s short.
    assert!(rpo + 0.06 >= lost_for, "RPO {rpo} s, but the last write was {lost_for:.3} s before the failover: {whole}");
    assert_eq!(whole["within-objective"], true, "{whole}");
    let restore = audit.iter().rfind(|r| r["step"] == "restore" && r["mode"] == "run").unwrap();
    assert_eq!(restore["plugin"], format!("builtin:restore@{}", env!("CARGO_PKG_VERSION")), "{restore}");
    assert_eq!(restore["facts"]["repository"], "dr", "{restore}");
    assert!(rto * 1000.0 >= restore["duration-ms"].as_f64().unwrap(), "the RTO covers the restore: {whole}");
    assert!(out.contains(&format!("measured: RTO {rto:.1}s, RPO {rpo:.1}s")), "{out}");
}

#[test]
fn the_daemon_replicates_and_drills_the_replica_on_schedule_and_exports_what_it_holds() {
    let backend = Backend::start(Kind::File);
    let mut fx = Fixture::new(&backend);
    // The daemon has the restore-side identity, so its scheduled drills run.
    fx.env.push(("VEZA_DR_IDENTITY".into(), fx.identity.to_str().unwrap().into()));
    let src = fx.path("src");
    tree::generate(&src, 2, 5);
    let replica = format!("[[replica]]\nname = \"dr\"\nurl = \"file://{}/vol-dr\"\n", backend.dir.path().display());
    let extra = format!(
        "[objectives]\nrpo = \"1h\"\n[schedule]\nfull = \"0 3 * * *\"\nreplicate = \"*/2 * * * * *\"\ndrill-replicas = \"*/3 * * * * *\"\nprune = \"*/4 * * * * *\"\n{replica}"
    );
    fx.volume_policy("vol", &backend, "vol", &src, &extra);
    let snap = fx.json(&["backup", "vol"]);
    // Before any copy, status names the empty replica.
    let o = fx.run(&["status", "vol", "--daemon", ""]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).contains("replica dr cannot be read") || stdout(&o).contains("replica dr holds no snapshot"),
        "{}",
        stdout(&o)
    );

    let daemon = Daemon::start(&fx);
    let t = std::time::Instant::now();
    let metric = "veza_dr_replica_last_snapshot_timestamp_seconds{policy=\"vol\",replica=\"dr\"}";
    let drilled = "veza_dr_replica_drill_passed{policy=\"vol\",replica=\"dr\"} 1";
    let body = loop {
        let (_, m) = http_full(daemon.port, "GET", "/metrics");
        if m.contains(metric) && m.contains(drilled) {
            break m;
        }
        assert!(t.elapsed().as_secs() < 150, "no replica metric:\n{m}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    drop(daemon);
    assert!(body.contains("veza_dr_job_runs_total{policy=\"vol\",kind=\"replicate\"}"), "{body}");
    // The scheduled prune runs on the primary and on the replica, without failing.
    assert!(body.contains("veza_dr_job_runs_total{policy=\"vol\",kind=\"prune\"}"), "{body}");
    let failed = |kind: &str| {
        body.lines()
            .filter(|l| l.starts_with(&format!("veza_dr_job_failures_total{{policy=\"vol\",kind=\"{kind}\"}}")))
            .any(|l| !l.ends_with(" 0"))
    };
    // (A replica drill that runs before the first copy fails, rightly: nothing is there yet.)
    assert!(!failed("prune") && !failed("replicate"), "{body}");
    // The WAL queue depth of each replica is exported (nothing queued here: a volume policy).
    assert!(body.contains("veza_dr_replica_wal_spool_segments{policy=\"vol\",replica=\"dr\"} 0"), "{body}");
    let on_dr = fx.json(&["snapshots", "vol", "--repository", "dr"]);
    assert_eq!(on_dr[0]["id"], snap["id"], "{on_dr}");
    // The replica's drill ran from the replica and its report is stored there.
    let drills = fx.json(&["drills", "vol", "--repository", "dr"]);
    assert_eq!(drills[0]["snapshot"], snap["id"], "{drills}");
    assert_eq!(drills[0]["verdict"], "pass", "{drills}");
    let st = fx.json(&["status", "vol", "--daemon", ""]);
    assert_eq!(st["ok"], true, "{st}");
    assert_eq!(st["policies"][0]["replicas"][0]["newest"]["id"], snap["id"], "{st}");
}

/// WAL reaches the replica continuously, not at the next replicate: wal-push stores on the
/// primary, queues the segment and a detached sender copies it. A replica that is down
/// never blocks or fails archiving; its queue grows and drains when it returns.
#[test]
fn wal_reaches_the_replica_continuously_and_a_dead_replica_never_blocks_archiving() {
    let moto = Backend::start(Kind::Moto);
    let mut garage = Backend::start(Kind::Garage);
    let mut fx = Fixture::new(&moto);
    with_replica_keys(&mut fx, &garage);
    // wal-push runs as the server's user: its state (and so its spool) where the test sees it.
    let pg_state = fx.path("pg-state");
    std::fs::create_dir_all(&pg_state).unwrap();
    std::process::Command::new("chown").arg("postgres").arg(&pg_state).status().unwrap();
    let mut env = fx.env.clone();
    env.push(("VEZA_DR_STATE_DIR".into(), pg_state.to_str().unwrap().into()));
    let pg = crate::common::pg::Pg::start(&fx.archive_command("db"), env);
    fx.env.push(("VEZA_PG_DSN".into(), pg.dsn()));
    fx.pg_policy("db", &moto, "db", "physical", &pg.data, &replica_toml(&garage, "db"));
    let dsn = pg.dsn();
    psql(&dsn, "CREATE TABLE t (id int)");
    fx.ok(&["backup", "db", "--full"]);
    fx.ok(&["replicate", "db"]);
    let spool = pg_state.join("replica-spool/db/dr");
    let queued = || std::fs::read_dir(&spool).map(|d| d.count()).unwrap_or(0);

    // Each segment is on the replica within seconds of being archived: the lag, measured.
    let mut lags = Vec::new();
    for i in 0..5 {
        psql(&dsn, &format!("INSERT INTO t SELECT g FROM generate_series(1, {}) g", 1000 * (i + 1)));
        switch_and_wait_archived(&dsn);
        let archived = std::time::Instant::now();
        let want = wal_keys(&moto, "db");
        loop {
            if wal_keys(&garage, "db").is_superset(&want) {
                break;
            }
            assert!(archived.elapsed().as_secs() < 30, "WAL did not reach the replica; {} queued", queued());
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        lags.push(archived.elapsed().as_secs_f64());
    }
    lags.sort_by(f64::total_cmp);
    println!("WAL replication lag after archiving: median {:.2}s, max {:.2}s", lags[2], lags[4]);
    assert_eq!(queued(), 0);

    // The replica's region goes down: archiving goes on at its usual pace, nothing fails.
    garage.stop();
    let failed = |dsn: &str| psql(dsn, "SELECT failed_count FROM pg_stat_archiver");
    let failed_before = failed(&dsn);
    let t = std::time::Instant::now();
    for _ in 0..4 {
        psql(&dsn, "INSERT INTO t SELECT g FROM generate_series(1, 1000) g");
        switch_and_wait_archived(&dsn);
    }
    assert!(t.elapsed().as_secs() < 30, "archiving slowed down with the replica gone: {:?}", t.elapsed());
    assert_eq!(failed(&dsn), failed_before, "archiving failed because the replica is down");
    assert!(queued() >= 4, "the segments were not queued for the replica: {}", queued());
    let mut status = std::process::Command::new(bin());
    status.arg("--policies").arg(fx.path("policies")).arg("--state-dir").arg(&pg_state);
    let o = status.args(["status", "db", "--daemon", "", "--json"]).envs(fx.env.iter().cloned()).output().unwrap();
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(st["policies"][0]["replicas"][0]["wal-queued"].as_u64().unwrap() >= 4, "{st}");

    // It returns: the next push's sender drains the queue, and the replica has every segment.
    garage.restart();
    psql(&dsn, "INSERT INTO t SELECT g FROM generate_series(1, 10) g");
    switch_and_wait_archived(&dsn);
    let t = std::time::Instant::now();
    while queued() > 0 {
        assert!(t.elapsed().as_secs() < 60, "the queue did not drain: {} left", queued());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let (primary, replica) = (wal_keys(&moto, "db"), wal_keys(&garage, "db"));
    assert!(replica.is_superset(&primary), "missing on the replica: {:?}", primary.difference(&replica));
}

/// Each replica applies the policy's retention itself (replication never deletes, so a
/// compromised primary cannot empty it), and replicate copies only what that retention keeps:
/// what the replica's prune forgot is not copied back while the primary, not pruned yet,
/// still holds it.
#[test]
fn a_replica_prunes_itself_and_replicate_does_not_copy_back_what_it_forgot() {
    let backend = Backend::start(Kind::File);
    let fx = Fixture::new(&backend);
    let src = fx.path("src");
    tree::generate(&src, 4, 11);
    let replica = format!("[[replica]]\nname = \"dr\"\nurl = \"file://{}/vol-dr\"\n", backend.dir.path().display());
    let extra = format!("[retention]\nkeep-last = 1\nprune-grace = \"0s\"\n{replica}");
    fx.volume_policy("vol", &backend, "vol", &src, &extra);
    fx.ok(&["backup", "vol"]);
    std::fs::remove_dir_all(&src).unwrap();
    tree::generate(&src, 4, 12);
    fx.ok(&["backup", "vol"]);
    let c = fx.json(&["replicate", "vol"]);
    // Retention keeps one: the older snapshot (and the packs only it needs) are not copied.
    assert_eq!(c[0]["snapshots"], 1, "{c}");
    let count = |repo: &str| fx.json(&["snapshots", "vol", "--repository", repo]).as_array().unwrap().len();
    assert_eq!((count("primary"), count("dr")), (2, 1));
    let bytes_first = c[0]["bytes-copied"].as_u64().unwrap();

    // A third backup; the replica's prune forgets the second there (twice: mark, then delete).
    std::fs::remove_dir_all(&src).unwrap();
    tree::generate(&src, 4, 13);
    fx.ok(&["backup", "vol"]);
    let c = fx.json(&["replicate", "vol"]);
    assert!(c[0]["bytes-copied"].as_u64().unwrap() < bytes_first * 2, "{c}");
    fx.ok(&["prune", "vol", "--repository", "dr"]);
    fx.ok(&["prune", "vol", "--repository", "dr"]);
    assert_eq!((count("primary"), count("dr")), (3, 1), "the replica's prune touched the primary");
    let again = fx.json(&["replicate", "vol"]);
    assert_eq!(again[0]["objects-copied"], 0, "replicate copied back what the replica pruned: {again}");
    assert_eq!(count("dr"), 1);
    // What the replica keeps is whole.
    let id = fx.identity.to_str().unwrap().to_string();
    fx.ok(&["verify", "vol", "--repository", "dr", "--read-data", "--identity", &id]);
    let out = fx.path("restored");
    fx.ok(&["restore", "vol", "--repository", "dr", "--target", out.to_str().unwrap(), "--identity", &id]);
    tree::assert_same(&src, &out);
}
