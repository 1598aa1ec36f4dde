//! Test harness: real S3-compatible servers on 127.0.0.1 (moto, Garage), fixtures that write
//! policies and run the real `veza-dr` binary, and tree generation and comparison.

pub mod pg;
pub mod proxy;
pub mod tree;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_veza-dr"))
}

/// Find a server binary: an env override, PATH, or where `scripts/setup.sh` installs it.
fn find_tool(env: &str, name: &str, extra: &[&str]) -> PathBuf {
    if let Ok(p) = std::env::var(env) {
        return p.into();
    }
    let mut cands: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect()).unwrap_or_default();
    cands.extend(extra.iter().map(PathBuf::from));
    cands.into_iter().find(|p| p.is_file()).unwrap_or_else(|| {
        panic!("{name} is not installed: run scripts/setup.sh (or set {env}); tests use the real server and never skip")
    })
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_port(port: u16, child: &mut Child, what: &str) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(60) {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{what} exited early: {st}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not listen on {port} within 60 s");
}

/// Send one raw HTTP request and return the status code.
pub fn http(port: u16, method: &str, path: &str) -> u16 {
    http_full(port, method, path).0
}

/// Send one raw HTTP request; (status, body). Status 0 when the server is not there.
pub fn http_full(port: u16, method: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    // 0 when the server is not ready yet (refused or reset while starting).
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return (0, String::new()) };
    let req =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let code = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, body)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Moto,
    Garage,
}

/// A running object store (or a directory for file://). Killed on drop.
pub struct Backend {
    pub kind: Kind,
    pub port: u16,
    child: Option<Child>,
    /// How to start the server again on the same port and data (Garage persists; moto does not).
    respawn: Option<Box<dyn Fn() -> Child + Send>>,
    pub dir: tempfile::TempDir,
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub const GARAGE_KEY: &str = "GK0123456789abcdef01234567";
pub const GARAGE_SECRET: &str = "4f0e1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7";

impl Backend {
    pub fn start(kind: Kind) -> Backend {
        let dir = tempfile::tempdir().unwrap();
        match kind {
            Kind::File => Backend {
                kind,
                port: 0,
                child: None,
                respawn: None,
                dir,
                bucket: String::new(),
                key_id: String::new(),
                secret: String::new(),
            },
            Kind::Moto => {
                let moto = find_tool("VEZA_MOTO_SERVER", "moto_server", &["/opt/veza-dr-ci/venv/bin/moto_server"]);
                let port = free_port();
                let mut child = Command::new(moto)
                    .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start moto_server");
                wait_port(port, &mut child, "moto_server");
                let t = Instant::now();
                while http(port, "PUT", "/veza") != 200 {
                    assert!(t.elapsed() < Duration::from_secs(20), "cannot create the bucket on moto");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Backend {
                    kind,
                    port,
                    child: Some(child),
                    respawn: None,
                    dir,
                    bucket: "veza".into(),
                    key_id: "testing".into(),
                    secret: "testing".into(),
                }
            }
            Kind::Garage => {
                let garage = find_tool(
                    "VEZA_GARAGE",
                    "garage",
                    &[&format!("{}/.cargo/bin/garage", std::env::var("HOME").unwrap_or_default())],
                );
                let port = free_port();
                let rpc = free_port();
                let d = dir.path();
                let cfg = d.join("garage.toml");
                std::fs::write(
                    &cfg,
                    format!(
                        "metadata_dir = \"{m}\"\ndata_dir = \"{dd}\"\ndb_engine = \"sqlite\"\nreplication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{s}\"\n[s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{port}\"\n",
                        m = d.join("meta").display(),
                        dd = d.join("data").display(),
                        s = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
                    ),
                )
                .unwrap();
                let spawn = {
                    let (garage, cfg, logp) = (garage.clone(), cfg.clone(), d.join("garage.log"));
                    move || {
                        let log = std::fs::OpenOptions::new().create(true).append(true).open(&logp).unwrap();
                        Command::new(&garage)
                            .args(["-c", cfg.to_str().unwrap(), "server", "--single-node", "--default-bucket"])
                            .env("GARAGE_DEFAULT_ACCESS_KEY", GARAGE_KEY)
                            .env("GARAGE_DEFAULT_SECRET_KEY", GARAGE_SECRET)
                            .env("GARAGE_DEFAULT_BUCKET", "veza")
                            .env("RUST_LOG", "warn")
                            .stdout(Stdio::null())
                            .stderr(log)
                            .spawn()
                            .expect("start garage")
                    }
                };
                let mut child = spawn();
                wait_port(port, &mut child, "garage");
                // The default bucket and key appear shortly after the port opens.
                let t = Instant::now();
                while http(port, "GET", "/veza") == 0 && t.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Backend {
                    kind,
                    port,
                    child: Some(child),
                    respawn: Some(Box::new(spawn)),
                    dir,
                    bucket: "veza".into(),
                    key_id: GARAGE_KEY.into(),
                    secret: GARAGE_SECRET.into(),
                }
            }
        }
    }

    /// The `[repository]` table for a repository at `prefix`.
    pub fn repository_toml(&self, prefix: &str) -> String {
        match self.kind {
            Kind::File => format!("[repository]\nurl = \"file://{}/{prefix}\"\n", self.dir.path().display()),
            Kind::Moto | Kind::Garage => format!(
                "[repository]\nurl = \"s3://{b}/{prefix}\"\nendpoint = \"http://127.0.0.1:{p}\"\nregion = \"{r}\"\naccess-key-id = \"env:VEZA_TEST_S3_KEY\"\nsecret-access-key = \"env:VEZA_TEST_S3_SECRET\"\n",
                b = self.bucket,
                p = self.port,
                r = if self.kind == Kind::Garage { "garage" } else { "us-east-1" }
            ),
        }
    }

    /// Like `repository_toml`, with credentials as `file:` references (no process env needed).
    pub fn repository_toml_files(&self, prefix: &str, dir: &Path) -> String {
        let (k, s) = (dir.join("s3-key"), dir.join("s3-secret"));
        std::fs::write(&k, &self.key_id).unwrap();
        std::fs::write(&s, &self.secret).unwrap();
        self.repository_toml(prefix)
            .replace("env:VEZA_TEST_S3_KEY", &format!("file:{}", k.display()))
            .replace("env:VEZA_TEST_S3_SECRET", &format!("file:{}", s.display()))
    }

    /// Where a repository object lives on disk, for file:// (tests that damage objects).
    pub fn file_path(&self, prefix: &str, key: &str) -> PathBuf {
        self.dir.path().join(prefix).join(key)
    }

    /// Start a stopped server again with the same port and data.
    pub fn restart(&mut self) {
        let spawn = self.respawn.as_ref().expect("only Garage keeps its data across restarts");
        let mut child = spawn();
        wait_port(self.port, &mut child, "garage");
        self.child = Some(child);
    }

    /// Stop the server (a dead endpoint), keeping its data directory.
    pub fn stop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.child = None;
    }
}

/// A repository on `kind`, a fixture, and a PostgreSQL cluster archiving to policy `db`, with
/// `VEZA_PG_DSN` set for the fixture's commands.
pub fn archiving_cluster(kind: Kind) -> (Backend, Fixture, pg::Pg) {
    let backend = Backend::start(kind);
    let mut fx = Fixture::new(&backend);
    let pg = pg::Pg::start(&fx.archive_command("db"), fx.env.clone());
    fx.env.push(("VEZA_PG_DSN".into(), pg.dsn()));
    (backend, fx, pg)
}

/// A working directory with policies, state, an identity and a source tree.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub identity: PathBuf,
    pub recipient: String,
    pub env: Vec<(String, String)>,
}

impl Fixture {
    pub fn new(backend: &Backend) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("policies")).unwrap();
        // The identity lives outside the state directory: the backup side never sees it.
        let identity = dir.path().join("restore-side/restore.key");
        std::fs::create_dir_all(identity.parent().unwrap()).unwrap();
        let out = Command::new(bin()).args(["keygen", "-o", identity.to_str().unwrap()]).output().unwrap();
        assert!(out.status.success(), "keygen: {}", String::from_utf8_lossy(&out.stderr));
        let recipient = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert!(recipient.starts_with("age1"), "{recipient}");
        let env = vec![
            ("VEZA_TEST_S3_KEY".into(), backend.key_id.clone()),
            ("VEZA_TEST_S3_SECRET".into(), backend.secret.clone()),
            // Tests prune with `prune-grace = "0s"` to see phase two at once.
            ("VEZA_DR_MIN_PRUNE_GRACE".into(), "0s".into()),
        ];
        Fixture { dir, identity, recipient, env }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Write `policies/<name>.toml` for a volume at `source` in `backend` under `prefix`.
    pub fn volume_policy(&self, name: &str, backend: &Backend, prefix: &str, source: &Path, extra: &str) {
        let text = format!(
            "[source]\ntype = \"volume\"\npath = \"{}\"\nexclude = [\"*.tmp\"]\n\n{}\n[encryption]\nrecipients = [\"{}\"]\n\n{extra}\n",
            source.display(),
            backend.repository_toml(prefix),
            self.recipient
        );
        std::fs::write(self.path(&format!("policies/{name}.toml")), text).unwrap();
    }

    /// Write `policies/<name>.toml` for a PostgreSQL source.
    pub fn pg_policy(&self, name: &str, backend: &Backend, prefix: &str, method: &str, data_dir: &Path, extra: &str) {
        let text = format!(
            "[source]\ntype = \"postgres\"\nmethod = \"{method}\"\ndsn = \"env:VEZA_PG_DSN\"\ndata-dir = \"{}\"\n\n{}\n[encryption]\nrecipients = [\"{}\"]\n\n{extra}\n",
            data_dir.display(),
            backend.repository_toml(prefix),
            self.recipient
        );
        std::fs::write(self.path(&format!("policies/{name}.toml")), text).unwrap();
        pg::open_up(&self.path("policies"));
    }

    /// The archive_command for a policy of this fixture.
    pub fn archive_command(&self, policy: &str) -> String {
        format!("{} wal-push {} %p", bin().display(), self.path(&format!("policies/{policy}.toml")).display())
    }

    pub fn cmd<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Command {
        // VEZA_TEST_UMASK: run under this umask, for a file:// repository that root (backups)
        // and the postgres user (wal-push) both write, as two services sharing one would be set up.
        let mut c = match self.env.iter().find(|(k, _)| k == "VEZA_TEST_UMASK") {
            Some((_, m)) => {
                let mut c = Command::new("sh");
                c.args(["-c", &format!("umask {m}; exec \"$0\" \"$@\""), bin().to_str().unwrap()]);
                c
            }
            None => Command::new(bin()),
        };
        c.arg("--policies").arg(self.path("policies")).arg("--state-dir").arg(self.path("state"));
        c.args(args);
        c.env_remove("VEZA_DR_IDENTITY");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    pub fn run<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Run and require success; returns stdout.
    pub fn ok<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(&self, args: &[S]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "veza-dr {args:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The repository of policy `policy` (stored under `prefix`) opened directly, to damage it
    /// the way a real fault would.
    pub fn raw_store(
        &self,
        backend: &Backend,
        policy: &str,
        prefix: &str,
    ) -> (tokio::runtime::Runtime, veza_dr::repository::Store, tempfile::TempDir) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let text = std::fs::read_to_string(self.path(&format!("policies/{policy}.toml")))
            .unwrap()
            .replace(&backend.repository_toml(prefix), &backend.repository_toml_files(prefix, dir.path()));
        let p = veza_dr::policy::Policy::parse(&dir.path().join(format!("{policy}.toml")), &text).unwrap();
        let store = veza_dr::repository::Store::open(&p.repository, true).unwrap();
        (rt, store, dir)
    }

    pub fn json<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(&self, args: &[S]) -> serde_json::Value {
        let mut a: Vec<&std::ffi::OsStr> = args.iter().map(|s| s.as_ref()).collect();
        a.push("--json".as_ref());
        serde_json::from_str(&self.ok(&a)).unwrap()
    }
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A fixture's `veza-dr daemon` on a free port, up (its /healthz answers) once `start` returns;
/// killed on drop.
pub struct Daemon {
    pub port: u16,
    child: std::process::Child,
}

impl Daemon {
    pub fn start(fx: &Fixture) -> Daemon {
        let port = free_port();
        let child = fx
            .cmd(&["daemon", "--listen", &format!("127.0.0.1:{port}")])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let d = Daemon { port, child };
        let t = std::time::Instant::now();
        while http(port, "GET", "/healthz") != 200 {
            assert!(t.elapsed().as_secs() < 30, "the daemon did not come up");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        d
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The JSON drill report a `drill --report-dir DIR` wrote.
pub fn json_report(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "json"))
        .unwrap_or_else(|| panic!("no JSON report in {}", dir.display()))
}
