//! The daemon as a real process against a real S3 server: scheduled backups happen, /metrics
//! and /status reflect them, SIGHUP picks up changed policies (keeping the previous version of
//! a broken one), SIGTERM mid-job exits cleanly with the repository consistent.

use crate::common::*;
use std::time::{Duration, Instant};

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(secs), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn metric(body: &str, name: &str, policy: &str, kind: &str) -> Option<f64> {
    let prefix = format!("{name}{{policy=\"{policy}\",kind=\"{kind}\"}} ");
    body.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
}

fn status(port: u16) -> serde_json::Value {
    let (code, body) = http_full(port, "GET", "/status");
    assert_eq!(code, 200);
    serde_json::from_str(&body).unwrap()
}

fn signal(child: &std::process::Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
}

#[test]
fn scheduled_backups_metrics_reload_and_graceful_stop() {
    let backend = Backend::start(Kind::Moto);
    let fx = Fixture::new(&backend);
    let src = fx.path("src");
    tree::generate(&src, 4, 1);
    let every_2s = "[schedule]\nfull = \"*/2 * * * * *\"\n";
    fx.volume_policy("vol", &backend, "vol", &src, every_2s);
    let port = free_port();
    let mut daemon = fx
        .cmd(&["daemon", "--listen", &format!("127.0.0.1:{port}"), "--grace", "120s"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();

    wait_for("/healthz", 30, || http(port, "GET", "/healthz") == 200);
    wait_for("two scheduled backups in /metrics", 30, || {
        let (_, m) = http_full(port, "GET", "/metrics");
        metric(&m, "veza_dr_job_runs_total", "vol", "full").unwrap_or(0.0) >= 2.0
    });
    let (_, m) = http_full(port, "GET", "/metrics");
    let last = metric(&m, "veza_dr_last_success_timestamp_seconds", "vol", "full").unwrap();
    assert!((chrono::Utc::now().timestamp() as f64 - last).abs() < 30.0, "{m}");
    assert!(metric(&m, "veza_dr_last_bytes_read", "vol", "full").unwrap() > 1e6, "{m}");
    assert!(fx.json(&["snapshots", "vol"]).as_array().unwrap().len() >= 2);
    let st = status(port);
    assert_eq!(st["policies"][0]["policy"], "vol");
    assert!(st["policies"][0]["jobs"]["full"]["next"].as_str().is_some(), "{st}");

    // SIGHUP: a new policy appears; a broken edit of `vol` keeps its previous version.
    let big = fx.path("big");
    std::fs::create_dir_all(&big).unwrap();
    let mut data = vec![0u8; 300 << 20];
    tree::Rng::new(3).fill(&mut data);
    std::fs::write(big.join("blob.bin"), &data).unwrap();
    drop(data);
    fx.volume_policy("big", &backend, "big", &big, "[schedule]\nfull = \"*/3 * * * * *\"\n");
    let good = std::fs::read_to_string(fx.path("policies/vol.toml")).unwrap();
    std::fs::write(fx.path("policies/vol.toml"), good.replace("[schedule]", "[schedule]\nbogus = 1")).unwrap();
    signal(&daemon, nix::sys::signal::Signal::SIGHUP);
    wait_for("the reload", 20, || status(port)["policies"].as_array().unwrap().len() == 2);
    let st = status(port);
    let errs = st["reload-errors"].as_array().unwrap();
    assert!(errs.iter().any(|e| e.as_str().unwrap().contains("vol.toml:") && e.as_str().unwrap().contains("unknown field `bogus`")), "{st}");
    let names: Vec<&str> = st["policies"].as_array().unwrap().iter().map(|p| p["policy"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["big", "vol"], "the broken policy keeps its previous version");

    // SIGTERM while the big backup runs: no new jobs, the running one finishes, exit 0.
    wait_for("the big backup to run", 60, || status(port)["policies"][0]["running"] == "full");
    signal(&daemon, nix::sys::signal::Signal::SIGTERM);
    let t = Instant::now();
    let code = loop {
        if let Some(st) = daemon.try_wait().unwrap() {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "daemon did not stop");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(code.success(), "daemon exit: {code}");
    let mut log = String::new();
    std::io::Read::read_to_string(daemon.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(log.contains("SIGTERM: no new jobs"), "{log}");
    std::fs::write(fx.path("policies/vol.toml"), good).unwrap();
    let v = fx.json(&["verify", "big"]);
    assert!(
        v["damage"].as_array().unwrap().is_empty() && v["garbage"].as_array().unwrap().is_empty(),
        "the job finished cleanly: {v}"
    );
    assert!(!fx.json(&["snapshots", "big"]).as_array().unwrap().is_empty());

    // History of every job, from the daemon's state.
    let h = fx.json(&["history", "vol"]);
    let jobs = h.as_array().unwrap();
    assert!(jobs.len() >= 2 && jobs.iter().all(|j| j["result"] == "ok" && j["snapshot"].as_str().is_some()), "{h}");
}

#[test]
fn start_up_errors_are_clear() {
    let backend = Backend::start(Kind::File);
    let fx = Fixture::new(&backend);
    // No policies.
    let o = fx.run(&["daemon", "--listen", "127.0.0.1:0"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no policies (*.toml)"), "{}", stderr(&o));
    // A bad cron expression names file, line and column.
    let src = fx.path("src");
    std::fs::create_dir_all(&src).unwrap();
    fx.volume_policy("vol", &backend, "vol", &src, "[schedule]\nfull = \"61 * * * *\"\n");
    let o = fx.run(&["daemon", "--listen", "127.0.0.1:0"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("vol.toml:") && stderr(&o).contains("cron expression `61 * * * *`"), "{}", stderr(&o));
    // A port already in use.
    fx.volume_policy("vol", &backend, "vol", &src, "");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let o = fx.run(&["daemon", "--listen", &addr]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains(&format!("cannot listen on {addr}")), "{}", stderr(&o));
}

#[test]
fn wal_archive_time_is_exported_for_postgres_policies() {
    use crate::common::pg::{psql, switch_and_wait_archived};
    let (backend, fx, pg) = archiving_cluster(Kind::Moto);
    fx.pg_policy(
        "db",
        &backend,
        "db",
        "physical",
        &pg.data,
        "[schedule]\nfull = \"0 3 * * *\"\n[objectives]\nrpo = \"1h\"\nrto = \"4h\"\n",
    );
    psql(&pg.dsn(), "CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g");
    switch_and_wait_archived(&pg.dsn());
    // A drill run by hand before the daemon starts: its result is exported too.
    fx.ok(&["backup", "db"]);
    fx.ok(&[
        "drill",
        "db",
        "--identity",
        fx.identity.to_str().unwrap(),
        "--report-dir",
        fx.path("reports").to_str().unwrap(),
    ]);
    let port = free_port();
    let mut daemon = fx
        .cmd(&["daemon", "--listen", &format!("127.0.0.1:{port}")])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut body = String::new();
    wait_for("the WAL metric", 60, || {
        body = http_full(port, "GET", "/metrics").1;
        body.contains("veza_dr_wal_last_archived_timestamp_seconds{policy=\"db\"}")
    });
    let line =
        body.lines().find(|l| l.starts_with("veza_dr_wal_last_archived_timestamp_seconds{policy=\"db\"}")).unwrap();
    let t: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((chrono::Utc::now().timestamp() as f64 - t).abs() < 120.0, "{line}");
    assert!(body.contains("veza_dr_policy_rpo_seconds{policy=\"db\"} 3600"), "{body}");
    assert!(body.contains("veza_dr_policy_rto_seconds{policy=\"db\"} 14400"), "{body}");
    assert!(body.contains("veza_dr_drill_passed{policy=\"db\"} 1"), "{body}");
    assert!(body.contains("veza_dr_drill_rto_seconds{policy=\"db\"}"), "{body}");
    signal(&daemon, nix::sys::signal::Signal::SIGTERM);
    assert!(daemon.wait().unwrap().success());
}
