//! The DR region: a primary on Moto and a replica on Garage, two S3 servers as two regions.
//! `replicate` copies what the replica lacks; when the primary's server is gone, snapshots,
//! restores and PostgreSQL point-in-time recovery run from the replica alone. Interrupted
//! copies resume; tampering on the replica is caught there.

use crate::common::pg::{psql, switch_and_wait_archived, table_hashes, Restored};
use crate::common::*;

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

/// Flip one byte of the biggest pack on the replica, as a fault or an attacker would.
fn tamper_with_a_pack(garage: &Backend, prefix: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (_, recipient) = veza_dr::crypto::seal::generate_identity();
    let text = format!(
        "[source]\ntype = \"volume\"\npath = \"/srv\"\n{}\n[encryption]\nrecipients = [\"{recipient}\"]\n",
        garage.repository_toml_files(prefix, dir.path())
    );
    let p = veza_dr::policy::Policy::parse(&dir.path().join("raw.toml"), &text).unwrap();
    let store = veza_dr::repository::Store::open(&p.repository, false).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
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

#[test]
fn postgres_recovers_from_the_replica_to_the_last_replicated_wal() {
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
    let want = table_hashes(&dsn, &["orders"]);
    switch_and_wait_archived(&dsn);
    let c = fx.json(&["replicate", "db"]);
    assert_eq!(c[0]["snapshots"], 1, "{c}");

    moto.stop();
    let port = free_port();
    let target = fx.path("dr-data");
    let id = fx.identity.to_str().unwrap().to_string();
    let args = ["restore", "db", "--repository", "dr", "--target", target.to_str().unwrap(), "--start"];
    let mut a: Vec<&str> = args.to_vec();
    let p = port.to_string();
    a.extend(["--port", &p, "--identity", &id]);
    let out = fx.ok(&a);
    let srv = Restored { data: target.clone(), port };
    assert_eq!(table_hashes(&srv.dsn(), &["orders"]), want, "the replica did not reach the last replicated WAL");
    let conf = std::fs::read_to_string(target.join("postgresql.auto.conf")).unwrap();
    let rc = conf.lines().rfind(|l| l.starts_with("restore_command")).unwrap_or_default();
    assert!(rc.contains("--repository ''dr''"), "restore_command does not fetch from the replica: {rc}\n{out}");
}

#[test]
fn the_daemon_replicates_on_schedule_and_exports_what_the_replica_holds() {
    let backend = Backend::start(Kind::File);
    let fx = Fixture::new(&backend);
    let src = fx.path("src");
    tree::generate(&src, 2, 5);
    let replica = format!("[[replica]]\nname = \"dr\"\nurl = \"file://{}/vol-dr\"\n", backend.dir.path().display());
    let extra = format!(
        "[objectives]\nrpo = \"1h\"\n[schedule]\nfull = \"0 3 * * *\"\nreplicate = \"*/2 * * * * *\"\n{replica}"
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
    let body = loop {
        let (_, m) = http_full(daemon.port, "GET", "/metrics");
        if m.contains(metric) {
            break m;
        }
        assert!(t.elapsed().as_secs() < 150, "no replica metric:\n{m}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    drop(daemon);
    assert!(body.contains("veza_dr_job_runs_total{policy=\"vol\",kind=\"replicate\"}"), "{body}");
    let on_dr = fx.json(&["snapshots", "vol", "--repository", "dr"]);
    assert_eq!(on_dr[0]["id"], snap["id"], "{on_dr}");
    let st = fx.json(&["status", "vol", "--daemon", ""]);
    assert_eq!(st["ok"], true, "{st}");
    assert_eq!(st["policies"][0]["replicas"][0]["newest"]["id"], snap["id"], "{st}");
}
