//! Restore drills on a real PostgreSQL 15 backup in a real S3 server: a passing drill with WAL
//! replay and user checks, a failing check named in the report, signatures that catch tampering.

mod common;
use common::pg::{psql, switch_and_wait_archived, Pg};
use common::*;

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

fn leftover_sandboxes() -> usize {
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("veza-drill-"))
        .count()
}

#[test]
fn drills_pass_fail_and_sign_their_reports() {
    let backend = Backend::start(Kind::Moto);
    let mut fx = Fixture::new(&backend);
    let pg = Pg::start(&fx.archive_command("db"), fx.env.clone());
    fx.env.push(("VEZA_PG_DSN".into(), pg.dsn()));
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
    let before = leftover_sandboxes();

    let reports = fx.path("reports");
    let o = drill(&fx, "db", &reports);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(r["verdict"], "pass", "{r}");
    let phases: Vec<&str> = r["phases"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(phases, vec!["fetch, decrypt, write", "server start and WAL replay", "pg_amcheck", "checks"]);
    assert!(r["checks"].as_array().unwrap().iter().all(|c| c["ok"] == true), "{r}");
    assert_eq!(r["checks"][1]["got"], "3 rows");
    let rto = r["rto"]["measured-seconds"].as_f64().unwrap();
    assert!(rto > 0.0 && rto < 600.0 && r["rto"]["objective-seconds"] == 14400.0, "{r}");
    let rpo = r["rpo"]["measured-seconds"].as_f64().unwrap();
    assert!((0.0..120.0).contains(&rpo), "the newest transaction (the events insert) was recovered: {r}");
    assert_eq!(leftover_sandboxes(), before, "the sandbox was not removed");

    // The report in the report directory verifies; an edited copy does not.
    let file = std::fs::read_dir(&reports)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "json"))
        .unwrap();
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
    assert_eq!(leftover_sandboxes(), before, "the sandbox was not removed after a failure");

    // The history lists both, from the repository.
    let h = fx.json(&["drills", "db"]);
    let verdicts: Vec<&str> = h.as_array().unwrap().iter().map(|d| d["verdict"].as_str().unwrap()).collect();
    assert_eq!(verdicts.len(), 2, "{h}");
    assert!(verdicts.contains(&"pass") && verdicts.contains(&"fail"));
}

#[test]
fn volume_drills_compare_every_file_and_name_damage() {
    let backend = Backend::start(Kind::File);
    let fx = Fixture::new(&backend);
    let src = fx.path("src");
    tree::generate(&src, 8, 4);
    fx.volume_policy("vol", &backend, "repo", &src, "[objectives]\nrpo = \"1h\"\nrto = \"4h\"\n");
    fx.ok(&["backup", "vol"]);
    let before = leftover_sandboxes();
    let reports = fx.path("reports");
    let o = drill(&fx, "vol", &reports);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(r["verdict"], "pass", "{r}");
    assert!(r["phases"][1]["detail"].as_str().unwrap().ends_with("files match the snapshot's hashes"), "{r}");
    assert!(r["rpo"]["measured-seconds"].as_f64().unwrap() < 600.0);

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
    assert_eq!(leftover_sandboxes(), before, "the sandbox was not removed");
}
