//! Restore drills on a real PostgreSQL 15 backup in a real S3 server: a passing drill with WAL
//! replay and user checks, a failing check named in the report, signatures that catch tampering.

use crate::common::pg::{psql, switch_and_wait_archived, Pg};
use crate::common::*;

fn drill_policy_extra(check_sql: &str, expect: &str) -> String {
    format!(
        "[objectives]\nrpo = \"1h\"\nrto = \"4h\"\n\n[[verify.check]]\nname = \"accounts loaded\"\nsql = \"select count(*) = 20000 from accounts\"\n\n[[verify.check]]\nname = \"some events\"\nsql = \"select id from events limit 3\"\nexpect = {{ min-rows = 3 }}\n\n[[verify.check]]\nname = \"the user check\"\nsql = \"{check_sql}\"\n{expect}\n"
    )
}

/// The DOM of a local page as headless Chromium renders it.
fn chromium_dom(page: &std::path::Path) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("chromium is not installed: run scripts/setup.sh (Debian package chromium)");
    assert!(out.status.success(), "chromium: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `veza-dr drill POLICY --identity … --report-dir REPORTS --json`.
fn drill(fx: &Fixture, policy: &str, reports: &std::path::Path) -> std::process::Output {
    fx.run(&[
        "drill",
        policy,
        "--identity",
        fx.identity.to_str().unwrap(),
        "--report-dir",
        reports.to_str().unwrap(),
        "--json",
    ])
}

/// Give the fixture's veza-dr its own TMPDIR, so sandboxes and servers can be counted per test.
fn own_tmp(fx: &mut Fixture) {
    let tmp = fx.path("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    crate::common::pg::open_up(&tmp);
    fx.env.push(("TMPDIR".into(), tmp.display().to_string()));
}

/// Sandboxes left in the fixture's TMPDIR, and drill servers still running from it.
fn leftovers(fx: &Fixture) -> (usize, String) {
    let tmp = fx.path("tmp");
    let dirs = std::fs::read_dir(&tmp)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("veza-drill-"))
        .count();
    let ps = std::process::Command::new("pgrep").arg("-af").arg(tmp.join("veza-drill-")).output().unwrap();
    (dirs, stdout(&ps).trim().to_string())
}

/// A moto repository, a fixture with its own TMPDIR, and a cluster archiving to policy `db`.
fn drill_cluster() -> (Backend, Fixture, Pg) {
    let (backend, mut fx, pg) = archiving_cluster(Kind::Moto);
    own_tmp(&mut fx);
    (backend, fx, pg)
}

#[test]
fn drills_pass_fail_and_sign_their_reports() {
    let (backend, fx, pg) = drill_cluster();
    fx.pg_policy(
        "db",
        &backend,
        "db",
        "physical",
        &pg.data,
        &drill_policy_extra("select max(id) from accounts", "expect = 20000"),
    );
    let dsn = pg.dsn();
    psql(&dsn, "CREATE TABLE accounts AS SELECT g AS id, g * 10 AS balance FROM generate_series(1, 20000) g");
    psql(&dsn, "CREATE TABLE events AS SELECT g AS id FROM generate_series(1, 10) g");
    fx.ok(&["backup", "db"]);
    psql(&dsn, "INSERT INTO events SELECT g FROM generate_series(11, 20) g");
    switch_and_wait_archived(&dsn);

    let reports = fx.path("reports");
    let o = drill(&fx, "db", &reports);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(r["verdict"], "pass", "{r}");
    let phases: Vec<&str> = r["phases"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(
        phases,
        vec![
            "open identity",
            "choose snapshot",
            "fetch, decrypt, write",
            "server start and WAL replay",
            "pg_amcheck",
            "checks"
        ]
    );
    assert!(r["checks"].as_array().unwrap().iter().all(|c| c["ok"] == true), "{r}");
    assert_eq!(r["checks"][1]["got"], "3 rows");
    let rto = r["rto"]["measured-seconds"].as_f64().unwrap();
    assert!(rto > 0.0 && rto < 600.0 && r["rto"]["objective-seconds"] == 14400.0, "{r}");
    let rpo = r["rpo"]["measured-seconds"].as_f64().unwrap();
    assert!((0.0..120.0).contains(&rpo), "the newest transaction (the events insert) was recovered: {r}");
    assert_eq!(leftovers(&fx), (0, String::new()), "the sandbox was not removed");

    // The report in the report directory verifies; an edited copy does not.
    let file = json_report(&reports);
    let md = file.with_extension("md");
    assert!(std::fs::read_to_string(&md).unwrap().contains("**PASS**"));
    fx.ok(&["report", "verify", file.to_str().unwrap()]);
    let forged = std::fs::read_to_string(&file).unwrap().replace("\"verdict\": \"pass\"", "\"verdict\": \"fail\"");
    let forged_path = fx.path("forged.json");
    std::fs::write(&forged_path, forged).unwrap();
    let o = fx.run(&["report", "verify", forged_path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("altered after signing"), "{}", stderr(&o));

    // The HTML page renders in a real browser and says what happened.
    let page = file.with_extension("html");
    let dom = chromium_dom(&page);
    assert!(dom.contains("id=\"verdict\">PASS<"), "{dom}");
    assert!(dom.contains("accounts loaded") && dom.contains("the user check") && dom.contains("pg_amcheck"), "{dom}");
    assert!(dom.contains(&format!("{rto:.1} s")) && dom.contains("14400.0 s"), "measured and objective RTO shown");
    assert!(dom.contains("<svg") && dom.contains("<polyline"), "the history chart is drawn");
    assert!(
        !std::fs::read_to_string(&page).unwrap().contains("http://")
            || !std::fs::read_to_string(&page).unwrap().contains("src=\"http"),
        "self-contained"
    );

    // A check that cannot pass fails the drill, and the report says which and why.
    fx.pg_policy(
        "db",
        &backend,
        "db",
        "physical",
        &pg.data,
        &drill_policy_extra("select count(*) from accounts where balance < 0", "expect = 1"),
    );
    let o = drill(&fx, "db", &reports);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(r["verdict"], "fail");
    let failure = r["failure"].as_str().unwrap();
    assert!(failure.contains("the user check (expected 1, got 0)"), "{failure}");
    assert!(r["rto"]["measured-seconds"].is_null(), "no RTO without a server that passes its checks");
    assert_eq!(leftovers(&fx), (0, String::new()), "the sandbox was not removed after a failure");

    // The history lists both, from the repository.
    let h = fx.json(&["drills", "db"]);
    let verdicts: Vec<&str> = h.as_array().unwrap().iter().map(|d| d["verdict"].as_str().unwrap()).collect();
    assert_eq!(verdicts.len(), 2, "{h}");
    assert!(verdicts.contains(&"pass") && verdicts.contains(&"fail"));
}

#[test]
fn volume_drills_compare_every_file_and_name_damage() {
    let backend = Backend::start(Kind::File);
    let mut fx = Fixture::new(&backend);
    own_tmp(&mut fx);
    let src = fx.path("src");
    tree::generate(&src, 8, 4);
    let checks = "[[verify.check]]\nname = \"tree is not empty\"\ncommand = \"test -n \\\"$(ls -A)\\\"\"\n";
    fx.volume_policy("vol", &backend, "repo", &src, &format!("[objectives]\nrpo = \"1h\"\nrto = \"4h\"\n\n{checks}"));
    fx.ok(&["backup", "vol"]);
    let reports = fx.path("reports");
    let o = drill(&fx, "vol", &reports);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(r["verdict"], "pass", "{r}");
    let phases: Vec<&str> = r["phases"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(
        phases,
        ["open identity", "choose snapshot", "fetch, decrypt, write", "compare with recorded hashes", "checks"]
    );
    assert!(r["phases"][3]["detail"].as_str().unwrap().ends_with("files match the snapshot's hashes"), "{r}");
    assert_eq!(
        (r["checks"][0]["name"].as_str(), r["checks"][0]["ok"].as_bool()),
        (Some("tree is not empty"), Some(true))
    );
    assert!(r["rpo"]["measured-seconds"].as_f64().unwrap() < 600.0);

    // A check command that fails names its exit status and last line of output.
    let failing = format!("{checks}\n[[verify.check]]\nname = \"config present\"\ncommand = \"ls config/app.yaml\"\n");
    fx.volume_policy("vol", &backend, "repo", &src, &failing);
    let o = drill(&fx, "vol", &reports);
    assert_eq!(o.status.code(), Some(1));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let failure = r["failure"].as_str().unwrap();
    assert!(
        failure.starts_with("checks: 1 of 2 checks failed: config present (expected exit 0, got exit 2: ls:"),
        "{failure}"
    );
    fx.volume_policy("vol", &backend, "repo", &src, checks);

    // A flipped byte in the biggest pack: the drill fails and names the damage.
    let pack = walkdir::WalkDir::new(backend.file_path("repo", "data"))
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .max_by_key(|e| e.metadata().unwrap().len())
        .unwrap()
        .into_path();
    let mut data = std::fs::read(&pack).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 1;
    std::fs::write(&pack, data).unwrap();
    let o = drill(&fx, "vol", &reports);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(r["verdict"], "fail");
    let failure = r["failure"].as_str().unwrap();
    assert!(
        failure.starts_with("fetch, decrypt, write: snapshot")
            && failure.contains(pack.file_name().unwrap().to_str().unwrap()),
        "{failure}"
    );
    assert_eq!(leftovers(&fx), (0, String::new()), "the sandbox was not removed");
}

/// Faults inside a PostgreSQL drill: each fails the drill with the phase and cause in the
/// report, and leaves no server running and no sandbox on disk.
#[test]
fn drill_faults_are_named_and_leave_nothing_behind() {
    let (backend, fx, pg) = drill_cluster();
    let policy = |extra: &str| {
        fx.pg_policy(
            "db",
            &backend,
            "db",
            "physical",
            &pg.data,
            &format!("[verify]\n{extra}\n[[verify.check]]\nsql = \"select count(*) = 1000 from t\"\n"),
        );
    };
    let dsn = pg.dsn();
    psql(&dsn, "CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 1000) g");
    policy("");
    fx.ok(&["backup", "db"]);
    let gap = psql(&dsn, "SELECT pg_walfile_name(pg_switch_wal())").trim().to_string();
    psql(&dsn, "INSERT INTO t SELECT g FROM generate_series(1001, 1100) g");
    switch_and_wait_archived(&dsn);
    let reports = fx.path("reports");
    let nothing_left = |what: &str| {
        assert_eq!(leftovers(&fx), (0, String::new()), "{what}: a sandbox or a server was left behind");
    };
    let failed = |what: &str| -> serde_json::Value {
        let o = drill(&fx, "db", &reports);
        assert_eq!(o.status.code(), Some(1), "{what}: {}\n{}", stdout(&o), stderr(&o));
        let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert_eq!(r["verdict"], "fail", "{what}: {r}");
        nothing_left(what);
        r
    };

    // The port is taken.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    policy(&format!("port = {port}"));
    let r = failed("port collision");
    let f = r["failure"].as_str().unwrap();
    assert!(
        f.starts_with("restore and recovery:") && f.contains(&format!("port {port} on 127.0.0.1 is already in use")),
        "{f}"
    );
    drop(held);

    // A check that outlives the time limit: stopped, with the phase named.
    fx.pg_policy("db", &backend, "db", "physical", &pg.data, "[verify]\ntime-limit = \"20s\"\n[[verify.check]]\nname = \"slow\"\nsql = \"select pg_sleep(120) is not null\"\n");
    let t = std::time::Instant::now();
    let r = failed("time limit");
    assert!(t.elapsed() < std::time::Duration::from_secs(90), "the time limit did not stop the drill");
    assert_eq!(r["failure"], "time limit: the drill exceeded its limit of 20s during checks", "{r}");
    assert!(r["rto"]["measured-seconds"].is_null());

    // No identity: a failed report that says so.
    policy("");
    let o = fx.run(&["drill", "db", "--report-dir", reports.to_str().unwrap(), "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(
        r["failure"].as_str().unwrap().starts_with("open identity: a drill of policy db needs the private identity"),
        "{r}"
    );
    nothing_left("no identity");

    let (rt, store, _dir) = fx.raw_store(&backend, "db", "db");

    // A flipped bit in the biggest pack: named in the report.
    let packs = rt.block_on(store.list("data/")).unwrap();
    let (pack, _) = packs.iter().max_by_key(|(_, n)| *n).unwrap().clone();
    let original = rt.block_on(store.get(&pack)).unwrap();
    let mut bad = original.to_vec();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    rt.block_on(store.put(&pack, bad.into())).unwrap();
    let r = failed("flipped bit");
    let f = r["failure"].as_str().unwrap();
    let pack_id = pack.rsplit('/').next().unwrap();
    assert!(f.starts_with("restore and recovery:") && f.contains(pack_id), "{f}");
    rt.block_on(store.put(&pack, original)).unwrap();

    // A WAL segment after the backup is deleted: the drill names it.
    // wal/<system identifier>/<timeline>/<name>/<fingerprint>
    let objs: Vec<(String, u64)> = rt
        .block_on(store.list("wal/"))
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.contains(&format!("/{}/{gap}/", &gap[..8])))
        .collect();
    assert_eq!(objs.len(), 1, "{gap}");
    rt.block_on(store.delete(&objs[0].0)).unwrap();
    let r = failed("missing WAL segment");
    let f = r["failure"].as_str().unwrap();
    assert!(f.starts_with("restore and recovery:") && f.contains(&format!("WAL segment {gap} is")), "{f}");
    assert!(f.contains("is missing from the repository") || f.contains("is not in the repository"), "{f}");

    // Every failure is in the history.
    let h = fx.json(&["drills", "db"]);
    assert_eq!(h.as_array().unwrap().iter().filter(|d| d["verdict"] == "fail").count(), 5, "{h}");
}

/// Logical policies: the dumps are loaded into a new throw-away cluster and checked; with
/// `random-older` a second, older snapshot is drilled too. No snapshot yet is a failed report.
#[test]
fn logical_drills_use_a_throwaway_cluster() {
    let backend = Backend::start(Kind::Moto);
    let mut fx = Fixture::new(&backend);
    own_tmp(&mut fx);
    let pg = Pg::start("", fx.env.clone());
    fx.env.push(("VEZA_PG_DSN".into(), pg.dsn()));
    let extra = "[objectives]\nrpo = \"1h\"\nrto = \"4h\"\n[verify]\nrandom-older = true\n[[verify.check]]\nname = \"rows\"\ndatabase = \"app\"\nsql = \"select id from items where id > 495\"\nexpect = { min-rows = 5 }\n[[verify.check]]\nname = \"psql sees the data\"\ncommand = \"/usr/lib/postgresql/15/bin/psql -XAt -d app -c 'select count(*) from items' | grep -qx 500\"\n";
    fx.pg_policy("lg", &backend, "lg", "logical", &pg.data, extra);
    let reports = fx.path("reports");
    // A drill never creates a repository (it would fail with the init hint): create it first.
    fx.ok(&["init", "lg"]);
    let o = drill(&fx, "lg", &reports);
    assert_eq!(o.status.code(), Some(1));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(r["failure"], "choose snapshot: policy lg has no snapshot yet", "{r}");

    let dsn = pg.dsn();
    psql(&dsn, "CREATE DATABASE app");
    psql(&pg.dsn_db("app"), "CREATE TABLE items AS SELECT g AS id FROM generate_series(1, 500) g");
    fx.ok(&["backup", "lg"]);
    fx.ok(&["backup", "lg"]);
    let o = drill(&fx, "lg", &reports);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    let rs: Vec<serde_json::Value> = stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rs.len(), 2, "the newest and a random older snapshot");
    assert_eq!((rs[0]["choice"].as_str(), rs[1]["choice"].as_str()), (Some("newest"), Some("random-older")));
    assert_ne!(rs[0]["snapshot"], rs[1]["snapshot"]);
    for r in &rs {
        assert_eq!(r["verdict"], "pass", "{r}");
        let phases: Vec<&str> = r["phases"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
        assert_eq!(
            phases,
            [
                "open identity",
                "choose snapshot",
                "create and start a cluster",
                "fetch, decrypt, pg_restore",
                "pg_amcheck",
                "checks"
            ]
        );
        assert!(r["phases"][3]["detail"].as_str().unwrap().contains("app"), "{r}");
        assert!(r["checks"].as_array().unwrap().iter().all(|c| c["ok"] == true), "{r}");
    }
    assert_eq!(leftovers(&fx), (0, String::new()), "the sandbox was not removed");
}
