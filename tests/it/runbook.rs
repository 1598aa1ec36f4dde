//! Runbooks and the WASM plugin host, with real peers: a PostgreSQL 15 streaming standby, a
//! PowerDNS authoritative server, a local HTTP server, and the plugins built from `plugins/`.

use crate::common::pg::{self, Pg};
use crate::common::{bin, free_port, stderr, stdout};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The shipped plugins (plugins/dist) and the test fixture (plugins/test, never shipped) in one
/// directory, as `--plugins` takes them.
pub fn plugins_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins").canonicalize().unwrap();
        let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugins");
        std::fs::create_dir_all(&d).unwrap();
        for (p, from) in [
            ("fixture", "test"),
            ("http-check", "dist"),
            ("webhook-notify", "dist"),
            ("pg-promote", "dist"),
            ("dns-switch", "dist"),
        ] {
            let src = root.join(from).join(format!("{p}.wasm"));
            assert!(src.is_file(), "{} is missing: run plugins/build.sh (scripts/test.sh does)", src.display());
            std::fs::copy(&src, d.join(format!("{p}.wasm"))).unwrap();
        }
        d
    })
    .clone()
}

/// A policies directory with one runbook file, a state directory, and the real binary.
pub(crate) struct Books {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl Books {
    pub(crate) fn new(runbooks: &str) -> Books {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("policies")).unwrap();
        std::fs::write(dir.path().join("policies/runbooks.toml"), runbooks).unwrap();
        Books { dir, env: vec![] }
    }

    pub(crate) fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub(crate) fn run(&self, args: &[&str]) -> Output {
        let mut c = Command::new(bin());
        c.arg("--policies").arg(self.path("policies")).arg("--state-dir").arg(self.path("state"));
        c.arg("--plugins").arg(plugins_dir());
        c.args(args);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c.output().unwrap()
    }

    pub(crate) fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "veza-dr {args:?} failed ({}):\n{}\n{}", out.status, stdout(&out), stderr(&out));
        stdout(&out)
    }

    pub(crate) fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.path("state/runbooks/audit.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn one_step(runbook: &str, step: &str, extra: &str) -> String {
    format!("[[runbook]]\nname = \"{runbook}\"\n[[runbook.step]]\nname = \"{step}\"\nplugin = \"fixture\"\n{extra}\n\n")
}

#[test]
fn sandbox_stops_loops_hogs_traps_and_ungranted_requests_with_clear_errors() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    // A core module is not a component; a component built against another interface version.
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let future = dir.path().join("future.wasm");
    let bytes = std::fs::read(plugins_dir().join("fixture.wasm")).unwrap();
    let replaced = String::from_utf8_lossy(&bytes).contains("veza:dr/step@0.1.0");
    assert!(replaced, "the fixture exports veza:dr/step@0.1.0");
    let mut fut = bytes.clone();
    for (from, to) in [
        (&b"veza:dr/step@0.1.0"[..], &b"veza:dr/step@0.9.0"[..]),
        (b"veza:dr/host@0.1.0", b"veza:dr/host@0.9.0"),
        (b"veza:dr/types@0.1.0", b"veza:dr/types@0.9.0"),
    ] {
        let mut i = 0;
        while i + from.len() <= fut.len() {
            if &fut[i..i + from.len()] == from {
                fut[i..i + from.len()].copy_from_slice(to);
            }
            i += 1;
        }
    }
    std::fs::write(&future, &fut).unwrap();
    // One that imports a WASI interface (a filesystem, a socket...) the host does not give.
    let wasi = dir.path().join("wasi.wasm");
    let mut w = bytes.clone();
    let (from, to) = (&b"veza:dr/host@0.1.0"[..], &b"wasi:io/strm@0.1.0"[..]);
    for i in 0..w.len().saturating_sub(from.len()) {
        if &w[i..i + from.len()] == from {
            w[i..i + from.len()].copy_from_slice(to);
        }
    }
    std::fs::write(&wasi, &w).unwrap();

    let text = [
        one_step("spin", "forever", "with = { mode = \"loop\" }\ntimeout = \"1s\""),
        one_step("hog", "grow", "with = { mode = \"alloc\" }\nmemory-limit = \"16MiB\""),
        one_step("crash", "boom", "with = { mode = \"trap\" }"),
        one_step("snoop", "peek", &format!("with = {{ mode = \"http\", url = \"http://127.0.0.1:{port}/\" }}\ngrants = {{ http = [\"example.org\"] }}")),
        one_step("needy", "wants", "with = { mode = \"ok\", needs-http = \"10.0.0.1:80\" }"),
        one_step("typo", "t", "with = { mode = \"lop\" }"),
        one_step("flaky", "f", "with = { mode = \"flaky\" }\nretries = 1\nretry-delay = \"100ms\""),
        format!("[[runbook]]\nname = \"core\"\n[[runbook.step]]\nname = \"c\"\nplugin = \"{}\"\n\n", core.display()),
        format!("[[runbook]]\nname = \"future\"\n[[runbook.step]]\nname = \"f\"\nplugin = \"{}\"\n\n", future.display()),
        format!("[[runbook]]\nname = \"wasi\"\n[[runbook.step]]\nname = \"w\"\nplugin = \"{}\"\n\n", wasi.display()),
    ]
    .concat();
    let b = Books::new(&text);
    assert!(b.ok(&["policy", "check"]).contains("ok    runbook spin: forever (fixture)"));

    let t = Instant::now();
    let out = b.run(&["failover", "spin", "--yes"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("forever (fixture 0.1.0): FAILED") && stdout(&out).contains("timed out"),
        "{}",
        stdout(&out)
    );
    assert!(t.elapsed() < Duration::from_secs(30), "the deadline did not stop the loop: {:?}", t.elapsed());

    let out = b.run(&["failover", "hog", "--yes"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("ran out of memory: it tried to grow past its limit of 16 MiB"), "{}", stdout(&out));

    let out = b.run(&["failover", "crash", "--yes"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("trapped: wasm `unreachable` instruction executed"), "{}", stdout(&out));

    let out = b.run(&["failover", "snoop", "--yes"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out)
            .contains(&format!("HTTP to `127.0.0.1:{port}` is not granted to step `peek` (granted: example.org)")),
        "{}",
        stdout(&out)
    );

    // Refused before anything runs, as bad configuration (exit 2), naming runbook, step and plugin.
    let out = b.run(&["failover", "needy", "--yes"]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert!(
        stderr(&out).contains(
            "runbook `needy` step `wants` (plugin `fixture`): needs grants it was not given: http `10.0.0.1:80`"
        ),
        "{}",
        stderr(&out)
    );
    let out = b.run(&["failover", "typo", "--dry-run"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out)
            .contains("runbook `typo` step `t` (plugin `fixture`): validate: invalid config: `mode` lop is not one of"),
        "{}",
        stderr(&out)
    );
    let out = b.run(&["failover", "core", "--yes"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("is a core WebAssembly module, not a component"), "{}", stderr(&out));
    let out = b.run(&["failover", "future", "--yes"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("runbook `future` step `f`")
            && stderr(&out).contains("was built for another interface")
            && stderr(&out).contains("veza:dr@0.1.0"),
        "{}",
        stderr(&out)
    );
    let out = b.run(&["failover", "wasi", "--yes"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("imports `wasi:io/strm@0.1.0`, which this host does not provide"),
        "{}",
        stderr(&out)
    );
    let out = b.run(&["failover", "nope", "--yes"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("runbook `nope` not found") && stderr(&out).contains("known runbooks: spin, hog"),
        "{}",
        stderr(&out)
    );
    let out = b.run(&["failover", "spin"]);
    assert_eq!(out.status.code(), Some(2), "no terminal and no --yes: refuse");

    // Two runs of one runbook at once: the second is refused (a dry run is not).
    std::fs::create_dir_all(b.path("state/runbooks")).unwrap();
    let held = std::fs::File::create(b.path("state/runbooks/flaky.lock")).unwrap();
    held.try_lock().unwrap();
    let out = b.run(&["failover", "flaky", "--yes"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("runbook `flaky` is already running on this host"), "{}", stderr(&out));
    b.ok(&["failover", "flaky", "--dry-run"]);
    drop(held);

    let out = b.ok(&["failover", "flaky", "--yes"]);
    assert!(
        out.contains("f (fixture 0.1.0): ok")
            && out.contains("2 attempts")
            && out.contains("flaky passed on attempt 2"),
        "{out}"
    );

    // The audit log has a line per step and per runbook, with who, the config hash and the outcome.
    let audit = b.audit();
    let spin = audit.iter().find(|r| r["runbook"] == "spin" && r["step"] == "forever").unwrap();
    assert_eq!(spin["outcome"], "failed");
    assert!(spin["error"].as_str().unwrap().contains("timed out"));
    assert_eq!(spin["config-hash"].as_str().unwrap().len(), 16);
    assert!(!spin["who"].as_str().unwrap().is_empty());
    let flaky = audit.iter().find(|r| r["runbook"] == "flaky" && r["step"] == "f" && r["mode"] == "run").unwrap();
    assert_eq!((flaky["outcome"].as_str(), flaky["attempts"].as_u64()), (Some("ok"), Some(2)));
    assert!(audit.iter().any(|r| r["runbook"] == "flaky" && r["step"] == "*" && r["outcome"] == "ok"));
}

/// The same faults inside one process: each fails its step, and the process goes on to run a
/// healthy step afterwards (this is what keeps the daemon up).
#[test]
fn one_process_survives_every_fault_and_caches_compiled_plugins() {
    use veza_dr::runbook::{self, spec::RunbookSpec, Status};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let state = tempfile::tempdir().unwrap();
    let text = [
        one_step("spin", "forever", "with = { mode = \"loop\" }\ntimeout = \"500ms\""),
        one_step("hog", "grow", "with = { mode = \"alloc\" }\nmemory-limit = \"8MiB\""),
        one_step("crash", "boom", "with = { mode = \"trap\" }"),
        one_step("fine", "ok", "with = { mode = \"ok\", answer = 42 }"),
    ]
    .concat();
    let path = state.path().join("rb.toml");
    let doc = veza_dr::policy::parse_document(&path, &text).unwrap();
    let by = |n: &str| -> RunbookSpec { doc.runbooks.iter().find(|r| r.name == n).unwrap().clone() };
    let opts = runbook::Options {
        plugins_dir: plugins_dir(),
        cache_dir: Some(state.path().join("cache")),
        audit_log: state.path().join("audit.log"),
        dry_run: false,
        from: None,
        who: "test".into(),
        policies_dir: state.path().to_path_buf(),
        state_dir: state.path().to_path_buf(),
    };
    for (name, want) in
        [("spin", "timed out"), ("hog", "ran out of memory"), ("crash", "trapped"), ("spin", "timed out")]
    {
        let r = runbook::execute(&by(name), &opts, rt.handle(), |_| {}).unwrap();
        assert!(!r.ok);
        assert_eq!(r.steps[0].status, Status::Failed);
        assert!(r.steps[0].error.as_deref().unwrap().contains(want), "{name}: {:?}", r.steps[0].error);
    }
    let r = runbook::execute(&by("fine"), &opts, rt.handle(), |_| {}).unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!(r.steps[0].facts.get("answer").map(String::as_str), Some("42"));

    // Cold load compiles and fills the cache; a warm load deserializes; a damaged cache file is
    // ignored and replaced.
    let cache = state.path().join("cache2");
    let host = runbook::host::Host::new(&plugins_dir(), Some(&cache)).unwrap();
    let cold = host.load("http-check").unwrap();
    assert!(!cold.cached);
    let warm = host.load("http-check").unwrap();
    assert!(warm.cached, "the second load must come from the cache");
    let files: Vec<PathBuf> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1);
    let mut damaged = std::fs::read(&files[0]).unwrap();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0xff;
    std::fs::write(&files[0], damaged).unwrap();
    let again = host.load("http-check").unwrap();
    assert!(!again.cached, "a damaged cache file must not be used");
    assert!(host.load("http-check").unwrap().cached);
}

/// A small HTTP server: `/health` answers 503 twice then 200 "status: ready"; `/hook` records
/// POST bodies; `/echo` returns the X-Token header.
pub(crate) struct Web {
    pub(crate) port: u16,
    pub(crate) hooks: Arc<Mutex<Vec<String>>>,
    health_calls: Arc<Mutex<u32>>,
    _rt: tokio::runtime::Runtime,
}

pub(crate) fn web(port: u16) -> Web {
    use axum::routing::{get, post};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let hooks: Arc<Mutex<Vec<String>>> = Arc::default();
    let health_calls: Arc<Mutex<u32>> = Arc::default();
    let (h, c) = (hooks.clone(), health_calls.clone());
    let app = axum::Router::new()
        .route(
            "/health",
            get(move || {
                let c = c.clone();
                async move {
                    let mut n = c.lock().unwrap();
                    *n += 1;
                    if *n <= 2 {
                        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "starting".to_string())
                    } else {
                        (axum::http::StatusCode::OK, "status: ready".to_string())
                    }
                }
            }),
        )
        .route(
            "/hook",
            post(move |body: String| {
                let h = h.clone();
                async move {
                    h.lock().unwrap().push(body);
                    "ok"
                }
            }),
        )
        .route(
            "/echo",
            get(|headers: axum::http::HeaderMap| async move {
                format!("token={}", headers.get("x-token").and_then(|v| v.to_str().ok()).unwrap_or("-"))
            }),
        );
    rt.spawn(async move {
        let l = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        axum::serve(l, app).await.unwrap();
    });
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    Web { port, hooks, health_calls, _rt: rt }
}

#[test]
fn http_check_and_webhook_against_a_local_server_with_dry_run_resume_and_secrets() {
    let port = free_port();
    let text = format!(
        r#"
[[runbook]]
name = "region-failover"
objective = "2m"
secrets = {{ hook = "env:TEST_HOOK_URL", token = "env:TEST_TOKEN" }}

[[runbook.step]]
name = "learn"
plugin = "fixture"
with = {{ mode = "ok", new-timeline = "7" }}

[[runbook.step]]
name = "app-healthy"
plugin = "http-check"
with = {{ url = "http://127.0.0.1:{port}/health", body-contains = "ready", within = "20s", interval = "200ms" }}
grants = {{ http = ["127.0.0.1:{port}"] }}

[[runbook.step]]
name = "notify"
plugin = "webhook-notify"
with = {{ url = "${{secret:hook}}", text = "Failover {{{{runbook}}}} done: timeline {{{{new-timeline}}}}", username = "veza-dr" }}
grants = {{ http = ["127.0.0.1"], secrets = ["hook"] }}

[[runbook]]
name = "leak"
secrets = {{ token = "env:TEST_TOKEN" }}
[[runbook.step]]
name = "echo"
plugin = "fixture"
with = {{ mode = "http", url = "http://127.0.0.1:{port}/echo", header = "X-Token: ${{secret:token}}" }}
grants = {{ http = ["127.0.0.1"], secrets = ["token"] }}
"#
    );
    let mut b = Books::new(&text);
    b.env.push(("TEST_HOOK_URL".into(), format!("http://127.0.0.1:{port}/hook")));
    b.env.push(("TEST_TOKEN".into(), "tok-9f8e7d6c5b".into()));

    // The server is down: the dry run plans every step and touches nothing; the real run
    // fails at the health check and does not notify.
    let plan = b.ok(&["failover", "region-failover", "--dry-run"]);
    assert!(plan.contains(&format!("GET http://127.0.0.1:{port}/health every 200 ms until it answers status 200 and a body containing \"ready\"")), "{plan}");
    assert!(
        plan.contains(
            "POST to the webhook in secret `hook`: \"Failover region-failover done: timeline {{new-timeline}}\""
        ),
        "{plan}"
    );
    assert!(plan.contains("dry run: every step planned, nothing changed"), "{plan}");
    let b_short = text.replace("within = \"20s\"", "within = \"1s\"");
    std::fs::write(b.path("policies/runbooks.toml"), &b_short).unwrap();
    let out = b.run(&["failover", "region-failover", "--yes"]);
    assert_eq!(out.status.code(), Some(1));
    let o = stdout(&out);
    assert!(o.contains("app-healthy (http-check 0.1.0): FAILED") && o.contains("did not answer status 200"), "{o}");
    assert!(o.contains("notify (webhook-notify 0.1.0): not run: an earlier step failed"), "{o}");
    let e = stderr(&out);
    assert!(e.contains("error: runbook `region-failover` step `app-healthy` (plugin `http-check`): failed:"), "{e}");
    assert!(e.contains("hint: resume with: veza-dr failover region-failover --from app-healthy --yes"), "{e}");

    // The server comes up; resume at the failed step: the first step's facts come from the
    // audit log, the check retries through two 503s, and the webhook body carries the facts.
    std::fs::write(b.path("policies/runbooks.toml"), &text).unwrap();
    let w = web(port);
    let o = b.ok(&["failover", "region-failover", "--yes", "--from", "app-healthy"]);
    assert!(o.contains("learn (fixture): skipped (--from app-healthy)"), "{o}");
    assert!(o.contains("answered status 200 and a body containing \"ready\" after 3 attempt(s)"), "{o}");
    assert!(o.contains("(objective 2m: met)"), "{o}");
    assert_eq!(*w.health_calls.lock().unwrap(), 3);
    // The plugin's own log lines are in the audit log, for the post-mortem.
    let check = b.audit().into_iter().rfind(|r| r["step"] == "app-healthy" && r["mode"] == "run").unwrap();
    let logs: Vec<&str> = check["logs"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
    assert_eq!(logs.len(), 2, "{logs:?}");
    assert!(logs[0].starts_with("info: attempt 1: status 503; want status 200"), "{logs:?}");
    let hooks = w.hooks.lock().unwrap().clone();
    assert_eq!(hooks.len(), 1, "{hooks:?}");
    let body: serde_json::Value = serde_json::from_str(&hooks[0]).unwrap();
    assert_eq!(body, serde_json::json!({"text": "Failover region-failover done: timeline 7", "username": "veza-dr"}));

    // A dry run with the server up still sends nothing.
    let calls = *w.health_calls.lock().unwrap();
    b.ok(&["failover", "region-failover", "--dry-run"]);
    assert_eq!(w.hooks.lock().unwrap().len(), 1);
    assert_eq!(*w.health_calls.lock().unwrap(), calls);

    // A server that echoes the secret header does not hand the secret to the plugin.
    let o = b.ok(&["failover", "leak", "--yes"]);
    assert!(o.contains("status 200: token=[secret:token]"), "{o}");
    let everything = format!("{o}{}", std::fs::read_to_string(b.path("state/runbooks/audit.log")).unwrap());
    assert!(!everything.contains("tok-9f8e7d6c5b") && !everything.contains("/hook"), "a secret leaked: {everything}");
    let _ = w.port;
}

#[test]
fn pg_promote_promotes_a_real_streaming_standby() {
    let primary = Pg::start("", vec![]);
    pg::psql(&primary.dsn(), "CREATE TABLE t(id int); INSERT INTO t SELECT generate_series(1, 100)");
    let standby = primary.standby();
    let t = Instant::now();
    while pg::psql(&standby.dsn(), "SELECT count(*) FROM t").trim() != "100" {
        assert!(t.elapsed() < Duration::from_secs(60), "the standby did not catch up");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(pg::psql(&standby.dsn(), "SELECT pg_is_in_recovery()").trim(), "t");
    let mut b = Books::new(
        r#"
[[runbook]]
name = "db-failover"
objective = "5m"
connections = { standby = "env:TEST_STANDBY_DSN" }
[[runbook.step]]
name = "promote"
plugin = "pg-promote"
with = { connection = "standby", wait = "60s" }
grants = { connections = ["standby"] }
timeout = "2m"
"#,
    );
    b.env.push(("TEST_STANDBY_DSN".into(), standby.dsn()));

    let plan = b.ok(&["failover", "db-failover", "--dry-run"]);
    assert!(plan.contains("promote the standby on connection `standby` (timeline 1"), "{plan}");
    assert_eq!(pg::psql(&standby.dsn(), "SELECT pg_is_in_recovery()").trim(), "t", "a dry run must not promote");

    let out = b.ok(&["failover", "db-failover", "--yes"]);
    assert!(out.contains("`standby` promoted: timeline 1 -> 2"), "{out}");
    assert!(out.contains("verified: `standby` is a primary and accepts writes"), "{out}");
    assert_eq!(pg::psql(&standby.dsn(), "SELECT pg_is_in_recovery()").trim(), "f");
    pg::psql(&standby.dsn(), "INSERT INTO t VALUES (101)");
    assert_eq!(pg::psql(&standby.dsn(), "SELECT count(*) FROM t").trim(), "101");
    let audit = std::fs::read_to_string(b.path("state/runbooks/audit.log")).unwrap();
    assert!(audit.contains("\"new-timeline\":\"2\""), "{audit}");
    assert!(!audit.contains(pg::PASSWORD) && !out.contains(pg::PASSWORD), "the DSN's password leaked");

    // Running it again is refused: the server is no longer a standby.
    let out = b.run(&["failover", "db-failover", "--yes"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("is not a standby (not in recovery); refusing to promote"), "{}", stdout(&out));
}

/// A dry run could promote: `pg_promote()` succeeds inside a READ ONLY transaction, and a
/// plugin could switch the session to READ WRITE. The fixture tries both, and a write, in its
/// `plan`, against a real standby and its primary: nothing changes.
#[test]
fn a_dry_run_cannot_promote_or_write_even_when_the_plugin_tries() {
    let primary = Pg::start("", vec![]);
    pg::psql(&primary.dsn(), "CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 10) g");
    let standby = primary.standby();
    let t = Instant::now();
    while pg::psql(&standby.dsn(), "SELECT count(*) FROM t").trim() != "10" {
        assert!(t.elapsed() < Duration::from_secs(60), "the standby did not catch up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let attempts = [
        ("standby", "select pg_promote()"),
        ("standby", "SELECT pg_catalog.pg_promote(true, 60)"),
        ("standby", "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE; select pg_promote()"),
        ("primary", "insert into t values (11)"),
        ("primary", "select pg_switch_wal()"),
    ];
    for (conn, stmt) in attempts {
        let mut b = Books::new(&format!(
            "[[runbook]]\nname = \"sneaky\"\nconnections = {{ standby = \"env:TEST_STANDBY_DSN\", primary = \"env:TEST_PRIMARY_DSN\" }}\n[[runbook.step]]\nname = \"peek\"\nplugin = \"fixture\"\nwith = {{ mode = \"sql\", in-plan = \"true\", connection = \"{conn}\", statement = \"{stmt}\", needs-connection = \"{conn}\" }}\ngrants = {{ connections = [\"{conn}\"] }}\n"
        ));
        b.env.push(("TEST_STANDBY_DSN".into(), standby.dsn()));
        b.env.push(("TEST_PRIMARY_DSN".into(), primary.dsn()));
        let out = b.run(&["failover", "sneaky", "--dry-run"]);
        assert_eq!(out.status.code(), Some(1), "{stmt}: {}", stdout(&out));
        assert!(stdout(&out).contains("a dry run may only read"), "{stmt}: {}{}", stdout(&out), stderr(&out));
        assert_eq!(pg::psql(&standby.dsn(), "SELECT pg_is_in_recovery()").trim(), "t", "{stmt} promoted the standby");
        assert_eq!(pg::psql(&primary.dsn(), "SELECT count(*) FROM t").trim(), "10", "{stmt} wrote");
    }
    // Reading is what a plan is for, and still works.
    let mut b = Books::new("[[runbook]]\nname = \"look\"\nconnections = { standby = \"env:TEST_STANDBY_DSN\" }\n[[runbook.step]]\nname = \"peek\"\nplugin = \"fixture\"\nwith = { mode = \"sql\", in-plan = \"true\", connection = \"standby\", statement = \"SELECT pg_is_in_recovery()\", needs-connection = \"standby\" }\ngrants = { connections = [\"standby\"] }\n");
    b.env.push(("TEST_STANDBY_DSN".into(), standby.dsn()));
    let out = b.ok(&["failover", "look", "--dry-run"]);
    assert!(out.contains("1 row(s), first: Some([Some(\"t\")])"), "{out}");
}

/// Plugin-side attacks on the host: a secret in the URL's host (the refusal used to quote the
/// substituted host back), a granted name that resolves to loopback, an answer too large to
/// hold, a query with too many rows.
#[test]
fn plugins_cannot_read_secrets_reach_loopback_by_name_or_exhaust_the_host() {
    let port = free_port();
    let big = "x".repeat(5 << 20);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let app = axum::Router::new().route(
        "/big",
        axum::routing::get(move || {
            let b = big.clone();
            async move { b }
        }),
    );
    rt.spawn(async move {
        let l = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        axum::serve(l, app).await.unwrap();
    });
    let pg = Pg::start("", vec![]);
    let step = |name: &str, with: &str, grants: &str| {
        format!("[[runbook.step]]\nname = \"{name}\"\nplugin = \"fixture\"\nwith = {{ {with} }}\ngrants = {{ {grants} }}\non-failure = \"continue\"\n")
    };
    let text = format!(
        "[[runbook]]\nname = \"hostile\"\nsecrets = {{ token = \"env:TEST_TOKEN\" }}\nconnections = {{ db = \"env:TEST_DSN\" }}\n{}{}{}{}",
        step("steal", "mode = \"http\", url = \"http://${secret:token}.example.org/\", needs-secret = \"token\"", "http = [\"example.org\"], secrets = [\"token\"]"),
        step("by-name", &format!("mode = \"http\", url = \"http://localhost:{port}/big\""), "http = [\"localhost\"]"),
        step("big", &format!("mode = \"http\", url = \"http://127.0.0.1:{port}/big\""), "http = [\"127.0.0.1\"]"),
        step("rows", "mode = \"sql\", connection = \"db\", statement = \"SELECT generate_series(1, 20000)\", needs-connection = \"db\"", "connections = [\"db\"]"),
    );
    let mut b = Books::new(&text);
    b.env.push(("TEST_TOKEN".into(), "tok-secret-4242".into()));
    b.env.push(("TEST_DSN".into(), pg.dsn()));
    let out = b.run(&["failover", "hostile", "--yes"]);
    let o = format!(
        "{}{}{}",
        stdout(&out),
        stderr(&out),
        std::fs::read_to_string(b.path("state/runbooks/audit.log")).unwrap_or_default()
    );
    assert!(o.contains("secrets are not allowed in a URL's host, port or user info"), "{o}");
    assert!(!o.contains("tok-secret-4242"), "the secret reached the plugin or the log: {o}");
    assert!(o.contains("`localhost` resolves to 127.0.0.1, a loopback, link-local or metadata address"), "{o}");
    assert!(o.contains(&format!("is larger than {} bytes", 4 << 20)), "{o}");
    assert!(o.contains("returned more than 10000 rows"), "{o}");
    drop(rt);
}

/// A PowerDNS authoritative server with the sqlite backend and the HTTP API on 127.0.0.1.
pub(crate) struct Pdns {
    _dir: tempfile::TempDir,
    child: std::process::Child,
    pub(crate) dns_port: u16,
    pub(crate) api_port: u16,
}

impl Drop for Pdns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) const PDNS_KEY: &str = "pdns-test-key-31337";

pub(crate) fn pdns() -> Pdns {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = d.join("pdns.sqlite3");
    let schema = std::fs::read_to_string("/usr/share/pdns-backend-sqlite3/schema/schema.sqlite3.sql")
        .expect("pdns-backend-sqlite3 is not installed: run scripts/setup.sh");
    let st = Command::new("sqlite3").arg(&db).stdin(std::process::Stdio::piped()).spawn().and_then(|mut c| {
        use std::io::Write;
        c.stdin.take().unwrap().write_all(schema.as_bytes())?;
        c.wait()
    });
    assert!(st.unwrap().success());
    let (dns_port, api_port) = (free_port(), free_port());
    std::fs::write(
        d.join("pdns.conf"),
        format!(
            "launch=gsqlite3\ngsqlite3-database={}\nlocal-address=127.0.0.1\nlocal-port={dns_port}\napi=yes\napi-key={PDNS_KEY}\nwebserver=yes\nwebserver-address=127.0.0.1\nwebserver-port={api_port}\nwebserver-allow-from=127.0.0.0/8\nsocket-dir={}\ndaemon=no\nguardian=no\ndisable-syslog=yes\n",
            db.display(),
            d.display()
        ),
    )
    .unwrap();
    let cfg = format!("--config-dir={}", d.display());
    for args in [
        vec!["create-zone", "example.org", "ns1.example.org"],
        vec!["add-record", "example.org", "db", "A", "60", "10.0.0.1"],
    ] {
        let out = Command::new("pdnsutil").arg(&cfg).args(&args).output().unwrap();
        assert!(out.status.success(), "pdnsutil {args:?}: {}", stderr(&out));
    }
    let log = std::fs::File::create(d.join("pdns.log")).unwrap();
    let child = Command::new("pdns_server").arg(&cfg).stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap();
    let p = Pdns { _dir: dir, child, dns_port, api_port };
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", api_port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(20), "pdns_server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    p
}

pub(crate) fn dig(port: u16, name: &str) -> String {
    let out = Command::new("dig").args(["@127.0.0.1", "-p", &port.to_string(), name, "A", "+short"]).output().unwrap();
    stdout(&out).trim().to_string()
}

#[test]
fn dns_switch_changes_a_record_on_a_real_powerdns() {
    let p = pdns();
    assert_eq!(dig(p.dns_port, "db.example.org"), "10.0.0.1");
    let text = format!(
        r#"
[[runbook]]
name = "dns"
secrets = {{ pdns = "env:TEST_PDNS_KEY" }}
[[runbook.step]]
name = "switch"
plugin = "dns-switch"
with = {{ api = "http://127.0.0.1:{}", zone = "example.org", name = "db.example.org", type = "A", content = "10.0.0.2", ttl = 30, api-key = "pdns" }}
grants = {{ http = ["127.0.0.1:{}"], secrets = ["pdns"] }}
"#,
        p.api_port, p.api_port
    );
    let mut b = Books::new(&text);
    b.env.push(("TEST_PDNS_KEY".into(), PDNS_KEY.into()));
    let plan = b.ok(&["failover", "dns", "--dry-run"]);
    assert!(
        plan.contains("change db.example.org. A in zone example.org. from 10.0.0.1 to 10.0.0.2 (ttl 30)"),
        "{plan}"
    );
    assert_eq!(dig(p.dns_port, "db.example.org"), "10.0.0.1", "a dry run must not change DNS");

    let out = b.ok(&["failover", "dns", "--yes"]);
    assert!(out.contains("db.example.org. A now points at 10.0.0.2 (was 10.0.0.1); verified"), "{out}");
    assert_eq!(dig(p.dns_port, "db.example.org"), "10.0.0.2");

    // A wrong API key is a clear failure that names the secret, never its value.
    b.env[0].1 = "wrong-key".into();
    let out = b.run(&["failover", "dns", "--dry-run"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("PowerDNS refused the API key in secret `pdns` (401)"), "{}", stdout(&out));
    assert!(!stdout(&out).contains("wrong-key"));
    // Without the secret grant the step is refused before it runs.
    std::fs::write(b.path("policies/runbooks.toml"), text.replace("secrets = [\"pdns\"]", "secrets = []")).unwrap();
    let out = b.run(&["failover", "dns", "--dry-run"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(
            "runbook `dns` step `switch` (plugin `dns-switch`): needs grants it was not given: secrets `pdns`"
        ),
        "{}",
        stderr(&out)
    );
}

/// A drill rehearses runbooks (their dry run). In the daemon, plugins that hang, hog memory or
/// trap during the rehearsal fail the drill, are named in its report, and the daemon goes on.
#[test]
fn drills_rehearse_runbooks_and_the_daemon_survives_misbehaving_plugins() {
    use crate::common::{http, http_full, tree, Backend, Fixture, Kind};
    let backend = Backend::start(Kind::File);
    let fx = Fixture::new(&backend);
    let src = fx.path("src");
    tree::generate(&src, 2, 1);
    let extra = format!(
        "identity = \"file:{}\"\n\n[schedule]\nverify = \"*/3 * * * * *\"\n\n[verify]\nrehearse = [\"hang\", \"hog\", \"crash\", \"fine\"]\n",
        fx.identity.display()
    );
    fx.volume_policy("vol", &backend, "vol", &src, &extra);
    let books = [
        one_step("hang", "spin", "with = { mode = \"loop\", in-plan = true }\ntimeout = \"1s\""),
        one_step("hog", "grow", "with = { mode = \"alloc\", in-plan = true }\nmemory-limit = \"8MiB\""),
        one_step("crash", "boom", "with = { mode = \"trap\", in-plan = true }"),
        one_step("fine", "ok", "with = { mode = \"ok\" }"),
    ]
    .concat();
    std::fs::write(fx.path("policies/failover.toml"), books).unwrap();
    fx.ok(&["backup", "vol"]);

    let port = free_port();
    let mut daemon = fx
        .cmd(&["daemon", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--plugins")
        .arg(plugins_dir())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let report = loop {
        assert!(t.elapsed() < Duration::from_secs(120), "no drill report from the daemon");
        if let Some(r) = fx.json(&["drills", "vol"]).as_array().and_then(|a| a.first().cloned()) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(report["verdict"], "fail", "{report}");
    let phase = |name: &str| {
        report["phases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name}: {report}"))
    };
    assert_eq!(phase("compare with recorded hashes")["ok"], true);
    let hang = phase("rehearse runbook hang");
    assert!(hang["detail"].as_str().unwrap().contains("spin: timed out"), "{hang}");
    assert!(phase("rehearse runbook hog")["detail"].as_str().unwrap().contains("grow: ran out of memory"));
    assert!(phase("rehearse runbook crash")["detail"].as_str().unwrap().contains("boom: trapped"));
    let fine = phase("rehearse runbook fine");
    assert_eq!(fine["ok"], true, "{fine}");
    assert!(fine["detail"].as_str().unwrap().contains("fixture step would run mode `ok`"), "{fine}");
    assert!(report["failure"].as_str().unwrap().starts_with("rehearse runbook hang: cannot be planned"), "{report}");
    // The restore test itself passed, so its RTO was measured; only the verdict fails.
    assert_eq!(phase("fetch, decrypt, write")["ok"], true);

    // The daemon is still up and keeps scheduling.
    assert_eq!(http(port, "GET", "/healthz"), 200);
    let runs = |m: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix("veza_dr_job_runs_total{policy=\"vol\",kind=\"verify\"} "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let first = runs(&http_full(port, "GET", "/metrics").1);
    let t = Instant::now();
    while runs(&http_full(port, "GET", "/metrics").1) <= first {
        assert!(t.elapsed() < Duration::from_secs(60), "the daemon stopped scheduling");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(daemon.try_wait().unwrap(), None, "the daemon died");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(daemon.wait().unwrap().success());
}

/// Without --dry-run or --yes, on a terminal: the plan, then a question; only the runbook's
/// name runs it. (`script` from util-linux gives the command a pseudo-terminal.)
#[test]
fn on_a_terminal_failover_asks_before_running() {
    let b = Books::new(&one_step("fine", "ok", "with = { mode = \"ok\", answer = 42 }"));
    let ask = |answer: &str| -> (Option<i32>, String) {
        let cmd = format!(
            "{} --policies {} --state-dir {} --plugins {} failover fine",
            bin().display(),
            b.path("policies").display(),
            b.path("state").display(),
            plugins_dir().display()
        );
        let mut child = Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("script (util-linux)");
        // Answer once the question is on the terminal.
        std::thread::sleep(Duration::from_millis(1500));
        use std::io::Write;
        child.stdin.take().unwrap().write_all(format!("{answer}\n").as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        (out.status.code(), stdout(&out))
    };
    let (code, out) = ask("nope");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("fixture step would run mode `ok`") && out.contains("Type the runbook name"), "{out}");
    assert!(out.contains("not confirmed; nothing was run"), "{out}");
    assert!(!b.audit().iter().any(|r| r["mode"] == "run"), "nothing may run without the answer");
    let (code, out) = ask("fine");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("ok (fixture 0.1.0): ok in") && out.contains("runbook fine: done"), "{out}");
    let ran = b.audit().into_iter().find(|r| r["mode"] == "run" && r["step"] == "ok").unwrap();
    assert_eq!(ran["facts"]["answer"], "42");
}
