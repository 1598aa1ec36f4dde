//! What a DBA types at 3 a.m.: `check` before the first night, `status` as a monitoring check,
//! literal DSNs completed from ~/.pgpass, a started restore that prints how to reach it, shell
//! completions and man pages. Real PostgreSQL, real S3 server, the real binary.

use crate::common::pg::{psql, switch_and_wait_archived, Pg, Restored, PASSWORD};
use crate::common::*;

/// Point policy `name` (written by `pg_policy`) at `pg` with a literal DSN holding no password.
fn literal_dsn(fx: &Fixture, name: &str, pg: &Pg) {
    let path = fx.path(&format!("policies/{name}.toml"));
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "dsn = \"env:VEZA_PG_DSN\"",
        &format!("dsn = \"host={} port={} user=postgres dbname=postgres\"", pg.sock.display(), pg.port),
    );
    std::fs::write(&path, text).unwrap();
}

fn lines_of(out: &std::process::Output) -> String {
    format!("{}{}", stdout(out), stderr(out))
}

#[test]
fn check_proves_the_set_up_and_status_reports_it_with_a_literal_dsn_and_pgpass() {
    let backend = Backend::start(Kind::Moto);
    let mut fx = Fixture::new(&backend);
    let pg = Pg::start(&fx.archive_command("db"), fx.env.clone());
    fx.pg_policy("db", &backend, "db", "physical", &pg.data, "[objectives]\nrpo = \"1h\"\n");
    fx.pg_policy("other", &backend, "other", "physical", &pg.data, "");
    literal_dsn(&fx, "db", &pg);
    literal_dsn(&fx, "other", &pg);

    // Without the password file the password is nowhere: the check says so, naming the DSN.
    let o = fx.run(&["check", "db", "--timeout", "5s"]);
    assert_eq!(o.status.code(), Some(1), "{}", lines_of(&o));
    let out = stdout(&o);
    assert!(out.contains("FAILED  repository reachable: there is no veza-dr repository"), "{out}");
    assert!(out.contains("run `veza-dr init <policy>`"), "{out}");
    assert!(out.contains("FAILED  PostgreSQL reachable") && out.contains("put it in ~/.pgpass"), "{out}");

    // ~/.pgpass (here PGPASSFILE), 0600 as libpq wants it, gives the password.
    let pass = fx.path("pgpass");
    std::fs::write(&pass, format!("# host:port:db:user:password\n*:*:*:postgres:{PASSWORD}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
    fx.env.push(("PGPASSFILE".into(), pass.display().to_string()));
    fx.ok(&["init", "db"]);
    fx.ok(&["init", "other"]);
    let out = fx.ok(&["check", "db", "--timeout", "60s"]);
    for line in [
        "ok      repository reachable",
        "ok      repository writable",
        "ok      recipients",
        "ok      PostgreSQL reachable: DSN `host=",
        "ok      privileges: the user has superuser",
        "ok      wal_level: wal_level = replica",
        "ok      archive_mode: archive_mode = on",
        "ok      archive_command",
        "ok      archiving works: segment",
        "all checks passed",
    ] {
        assert!(out.contains(line), "missing `{line}` in:\n{out}");
    }
    // A second policy of the same cluster that the archive_command does not push to: both
    // the configuration and the end-to-end test fail, with the command to set.
    let o = fx.run(&["check", "other", "--timeout", "3s"]);
    assert_eq!(o.status.code(), Some(1), "{}", lines_of(&o));
    let out = stdout(&o);
    assert!(out.contains("FAILED  archive_command: archive_command = '"), "{out}");
    assert!(out.contains("does not push to policy other"), "{out}");
    assert!(out.contains("wal-push") && out.contains("other.toml %p"), "{out}");
    assert!(out.contains("FAILED  archiving works: segment") && out.contains("did not reach the repository"), "{out}");

    // The backup runs on the literal DSN; status is green, and reports what it saw.
    let full = fx.json(&["backup", "db", "--full"]);
    let dsn = pg.dsn();
    psql(&dsn, "CREATE TABLE t AS SELECT 1 AS x");
    switch_and_wait_archived(&dsn);
    let o = fx.run(&["status", "db", "--daemon", "", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", lines_of(&o));
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let p = &st["policies"][0];
    assert_eq!(st["ok"], true, "{st}");
    assert_eq!(p["full"]["id"], full["id"], "{st}");
    assert_eq!(p["wal"]["gap-segments"], 0, "{st}");
    assert!(p["wal"]["newest"].as_str().is_some_and(|n| n.len() == 24), "{st}");
    assert!(p["recovery-point-age-seconds"].as_f64().unwrap() < 60.0, "{st}");
    assert!(p["repository-bytes"].as_u64().unwrap() > 1 << 20, "{st}");
    let text = fx.ok(&["status", "db", "--daemon", ""]);
    assert!(text.contains("OK: every objective holds") && text.contains(" UTC "), "{text}");
}

#[test]
fn status_names_each_breach_and_asks_the_daemon_for_the_next_jobs() {
    let backend = Backend::start(Kind::File);
    let fx = Fixture::new(&backend);
    let src = fx.path("src");
    tree::generate(&src, 1, 3);
    let extra = "[objectives]\nrpo = \"3s\"\n[schedule]\nfull = \"0 3 * * *\"\nincremental = \"0 * * * *\"\n";
    fx.volume_policy("vol", &backend, "vol", &src, extra);

    // Nothing there yet: a breach, not a crash, so a monitoring check sees it.
    let o = fx.run(&["status", "--daemon", ""]);
    assert_eq!(o.status.code(), Some(1), "{}", lines_of(&o));
    assert!(
        stdout(&o).contains("BREACHED     the repository cannot be read: there is no veza-dr repository"),
        "{}",
        stdout(&o)
    );

    let snap = fx.json(&["backup", "vol"]);
    let o = fx.run(&["status", "--daemon", ""]);
    assert_eq!(o.status.code(), Some(0), "{}", lines_of(&o));
    let out = stdout(&o);
    assert!(out.contains(&format!("full         {}", snap["id"].as_str().unwrap())), "{out}");
    assert!(out.contains("next         full 20") && out.contains("03:00:00 UTC"), "{out}");

    std::thread::sleep(std::time::Duration::from_millis(3500));
    let o = fx.run(&["status", "vol", "--daemon", "", "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", lines_of(&o));
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(st["ok"], false);
    let breaches = st["policies"][0]["breaches"].to_string();
    assert!(breaches.contains("RPO 3s breached: the newest recovery point"), "{breaches}");

    // With the daemon up, its next runs are the ones shown.
    let daemon = Daemon::start(&fx);
    let (_, body) = http_full(daemon.port, "GET", "/status");
    let d: serde_json::Value = serde_json::from_str(&body).unwrap();
    let o = fx.run(&["status", "vol", "--daemon", &daemon.url(), "--json"]);
    drop(daemon);
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(st["next-from"], "daemon", "{st}");
    let next = &st["policies"][0]["next"];
    let inc = next.as_array().unwrap().iter().find(|n| n["job"] == "incremental").unwrap();
    assert_eq!(inc["at"], d["policies"][0]["jobs"]["incremental"]["next"], "{st} {d}");
}

#[test]
fn a_started_restore_prints_commands_that_reach_it() {
    let (backend, fx, pg) = archiving_cluster(Kind::Moto);
    fx.pg_policy("db", &backend, "db", "physical", &pg.data, "");
    let dsn = pg.dsn();
    psql(&dsn, "CREATE TABLE marker AS SELECT 42 AS answer");
    fx.ok(&["backup", "db", "--full"]);
    switch_and_wait_archived(&dsn);

    let sock = fx.path("sock");
    std::fs::create_dir_all(&sock).unwrap();
    std::process::Command::new("chown").arg("postgres").arg(&sock).status().unwrap();
    for (i, extra) in [vec![], vec!["--socket-dir", sock.to_str().unwrap(), "--listen", ""]].into_iter().enumerate() {
        let port = free_port();
        let target = fx.path(&format!("r{i}"));
        let mut args: Vec<String> = ["restore", "db", "--start", "--port", &port.to_string(), "--target"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(target.display().to_string());
        args.extend(["--identity".to_string(), fx.identity.display().to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let out = fx.ok(&args);
        let _srv = Restored { data: target.clone(), port };
        let connect: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix("connect: ")).collect();
        assert_eq!(connect.len(), if i == 0 { 2 } else { 1 }, "{out}");
        let want_sock = if i == 0 { format!("/tmp/.veza-dr-{port}") } else { sock.display().to_string() };
        assert!(connect[0].contains(&format!("-h {want_sock} -p {port}")), "{out}");
        // Each printed command, run as printed, reaches the restored server.
        for c in connect {
            let o = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("{c} -Atc 'SELECT answer FROM marker'"))
                .env("PGPASSWORD", PASSWORD)
                .output()
                .unwrap();
            assert_eq!(stdout(&o).trim(), "42", "`{c}`: {}", stderr(&o));
        }
    }
}

#[test]
fn completions_and_man_pages_come_from_the_command_line_definition() {
    for (shell, marker) in [("bash", "complete -F"), ("zsh", "#compdef veza-dr"), ("fish", "complete -c veza-dr")] {
        let o = std::process::Command::new(bin()).args(["completions", shell]).output().unwrap();
        assert!(o.status.success(), "{shell}: {}", stderr(&o));
        let s = stdout(&o);
        assert!(s.contains(marker) && s.contains("status") && s.contains("restore"), "{shell}:\n{s}");
    }
    // bash accepts the script and completes a subcommand from it.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("veza-dr.bash");
    let o = std::process::Command::new(bin()).args(["completions", "bash"]).output().unwrap();
    std::fs::write(&script, &o.stdout).unwrap();
    let probe = format!(
        "source {}; COMP_WORDS=(veza-dr sta); COMP_CWORD=1; _veza__dr veza-dr sta veza-dr; echo \"${{COMPREPLY[@]}}\"",
        script.display()
    );
    let o = std::process::Command::new("bash").arg("-c").arg(probe).output().unwrap();
    assert!(stdout(&o).split_whitespace().any(|w| w == "status"), "{} {}", stdout(&o), stderr(&o));

    let man = dir.path().join("man");
    let o = std::process::Command::new(bin()).arg("man").arg(&man).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    for page in ["veza-dr.1", "veza-dr-status.1", "veza-dr-check.1", "veza-dr-restore.1"] {
        let text = std::fs::read_to_string(man.join(page)).unwrap_or_default();
        assert!(text.contains(".TH"), "{page} is not a man page");
    }
    let restore = std::fs::read_to_string(man.join("veza-dr-restore.1")).unwrap();
    assert!(restore.contains("socket\\-dir") && restore.contains("timestamptz"), "the restore page lacks its options");
}
