//! Logical backups: `pg_dump -Fc` per database plus `pg_dumpall --globals-only`, each streamed
//! through the pipeline as one file of the snapshot; restore with `pg_restore -j`.

use super::server::Server;
use super::{connect, db_error};
use crate::error::{Error, Kind, Result};
use crate::pipeline::snapshot::{commit, prepare_streams, Options};
use crate::pipeline::tree;
use crate::policy::{PgSource, Policy, SourceKind};
use crate::repository::format::{DumpInfo, PgMeta, Sidecar};
use crate::repository::lock::LockGuard;
use crate::repository::{Unlocked, Writer};
use crate::source::{phase, DrillEnv, Drilled, RestoreRequest, Restored, Source};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub struct Logical {
    pub policy: Policy,
    pub pg: PgSource,
}

#[async_trait::async_trait]
impl Source for Logical {
    fn kind(&self) -> SourceKind {
        SourceKind::PostgresLogical
    }

    async fn backup(&self, repo: &Writer, opts: &Options, guard: &LockGuard) -> Result<Sidecar> {
        backup(&self.policy, &self.pg, repo, opts, guard).await
    }

    async fn restore(&self, repo: &Unlocked, req: &RestoreRequest) -> Result<Restored> {
        if req.recovery.is_set() || req.start || req.target.is_some() || !req.includes.is_empty() {
            return Err(Error::usage(
                "a logical restore loads the dumps into a server: give --target-dsn DSN (not --target, --include, --to-* or --start)",
            ));
        }
        let dsn = req.target_dsn.clone().ok_or_else(|| Error::usage("a logical restore needs --target-dsn DSN"))?;
        let dsn = super::Dsn::parse(&dsn).map_err(|e| Error::usage(format!("--target-dsn: {e}")))?.config()?;
        let snap = req.snapshot.clone().unwrap_or_else(|| "latest".into());
        let (snapshot, databases) = restore_dumps(repo, &self.pg, &snap, &dsn, req.jobs).await?;
        Ok(Restored::Logical { snapshot, databases })
    }

    async fn drill(&self, repo: &Unlocked, snap: &Sidecar, env: &mut dyn DrillEnv) -> Option<Drilled> {
        env.begin("create and start a cluster");
        let t = std::time::Instant::now();
        let started = match scratch_cluster(&self.pg, env).await {
            Ok((server, dsn)) => server.start().await.map(|_| dsn),
            Err(e) => Err(e),
        };
        let ok = started.as_ref().map(|_| "initdb and start".to_string()).map_err(Clone::clone);
        if !env.record("create and start a cluster", t.elapsed().as_secs_f64(), &ok) {
            return None;
        }
        let dsn = started.ok()?;
        let load = restore_dumps(repo, &self.pg, snap.id.as_str(), &dsn, 2);
        phase(env, "fetch, decrypt, pg_restore", load, |(id, dbs)| {
            format!("databases {} from snapshot {id}", dbs.join(", "))
        })
        .await?;
        // A dump is consistent as of its start.
        Some(Drilled { at: Some(snap.started), tree: None })
    }
}

/// Restore a snapshot's dumps into a scratch directory and load them into `target_dsn`.
pub async fn restore_dumps(
    repo: &Unlocked,
    pg: &PgSource,
    snapshot: &str,
    target_dsn: &tokio_postgres::Config,
    jobs: usize,
) -> Result<(String, Vec<String>)> {
    let tmp = tempfile::tempdir().map_err(|e| Error::failed(format!("cannot create a temporary directory: {e}")))?;
    let dir = tmp.path().join("dumps");
    let opts = tree::Options {
        delta: false,
        checksum: false,
        records: None,
        snapshot: snapshot.to_string(),
        target: dir.clone(),
        includes: vec![],
        overwrite: false,
        bytes_done: Default::default(),
        bytes_total: Default::default(),
        dir: None,
    };
    let s = tree::restore(repo, &opts).await?;
    let loaded = load(pg, &dir, target_dsn, jobs).await?;
    Ok((s.snapshot, loaded))
}

/// initdb a new cluster in the sandbox as the database user (never root); returns the server
/// (not yet started) and its DSN. Local connections are trusted: the socket directory is
/// private to the server's owner (and root), and restoring the globals may change the
/// superuser's password. TCP on 127.0.0.1 needs a random password nobody is told.
async fn scratch_cluster(pg: &PgSource, env: &mut dyn DrillEnv) -> Result<(Server, tokio_postgres::Config)> {
    use std::os::unix::fs::PermissionsExt;
    let data = env.dir().join("data");
    let me = nix::unistd::geteuid();
    let uid = if me.is_root() {
        nix::unistd::User::from_name("postgres").ok().flatten().map(|u| u.uid.as_raw()).ok_or_else(|| {
            Error::failed("veza-dr runs as root and there is no `postgres` user to run the drill's server")
        })?
    } else {
        me.as_raw()
    };
    let password = hex::encode(rand::random::<[u8; 16]>());
    let pwfile = env.dir().join("pw");
    std::fs::write(&pwfile, &password).map_err(|e| Error::io("write", &pwfile, e))?;
    std::fs::create_dir_all(&data).map_err(|e| Error::io("create", &data, e))?;
    for p in [&data, &pwfile] {
        let _ = std::os::unix::fs::chown(p, Some(uid), None);
    }
    let _ = std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700));
    let _ = std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o600));
    let port = env.port()?;
    let server = Server {
        bin_dir: pg.bin_dir.clone(),
        data: data.clone(),
        port,
        uid,
        dsn: Some({
            let mut c = tokio_postgres::Config::new();
            c.user("postgres").password(password.clone());
            c
        }),
        ..Server::default()
    };
    env.adopt(server.clone());
    let out = server
        .as_owner(&pg.bin_dir.join("initdb"))
        .args(["--no-sync", "-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8"])
        .arg("--locale=C.UTF-8")
        .arg(format!("--pwfile={}", pwfile.display()))
        .arg("-D")
        .arg(&data)
        .output()
        .map_err(|e| Error::failed(format!("cannot run initdb: {e}")))?;
    let _ = std::fs::remove_file(&pwfile);
    if !out.status.success() {
        return Err(Error::database(format!(
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr).trim().replace('\n', " ")
        )));
    }
    let work = data.join("veza-dr-restore");
    std::fs::create_dir_all(&work).map_err(|e| Error::io("create", &work, e))?;
    let _ = std::os::unix::fs::chown(&work, Some(uid), None);
    let mut dsn = tokio_postgres::Config::new();
    dsn.host_path(server.socket_dir()).port(port).user("postgres").password(password).dbname("postgres");
    Ok((server, dsn))
}

/// A libpq connection string without the password (which goes in PGPASSWORD, never argv).
pub struct ConnInfo {
    pub conninfo: String,
    pub password: Option<String>,
}

pub fn conninfo(cfg: &tokio_postgres::Config, dbname: Option<&str>) -> ConnInfo {
    let mut parts = Vec::new();
    let q = |s: &str| format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"));
    let hosts: Vec<String> = cfg
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(s) => s.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    if !hosts.is_empty() {
        parts.push(format!("host={}", q(&hosts.join(","))));
    }
    if !cfg.get_ports().is_empty() {
        let ports: Vec<String> = cfg.get_ports().iter().map(|p| p.to_string()).collect();
        parts.push(format!("port={}", ports.join(",")));
    }
    if let Some(u) = cfg.get_user() {
        parts.push(format!("user={}", q(u)));
    }
    if let Some(d) = dbname.or(cfg.get_dbname()) {
        parts.push(format!("dbname={}", q(d)));
    }
    let password = cfg.get_password().map(|p| String::from_utf8_lossy(p).into_owned());
    ConnInfo { conninfo: parts.join(" "), password }
}

/// A child's stdout that reports the child's failure (with its stderr) at end of stream.
/// Stderr is drained by a thread of its own from the start: a child that writes more than a
/// pipe buffer of warnings would otherwise block on stderr while we wait on stdout.
struct ChildOutput {
    what: String,
    child: Child,
    stderr: Option<std::thread::JoinHandle<String>>,
    done: bool,
}

/// Keep the last 64 KiB of a stream (what an error message can use), reading all of it.
fn drain_tail(mut r: impl Read) -> String {
    const KEEP: usize = 64 << 10;
    let mut tail: Vec<u8> = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 2 * KEEP {
                    tail.drain(..tail.len() - KEEP);
                }
            }
        }
    }
    let start = tail.len().saturating_sub(KEEP);
    String::from_utf8_lossy(&tail[start..]).into_owned()
}

impl Read for ChildOutput {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.child.stdout.as_mut().map(|o| o.read(buf)).transpose()?.unwrap_or(0);
        if n == 0 && !self.done {
            self.done = true;
            let err = self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default();
            let st = self.child.wait()?;
            if !st.success() {
                let last: String = err
                    .trim()
                    .lines()
                    .rev()
                    .take(3)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join(" ");
                return Err(std::io::Error::other(format!("{} failed ({st}): {last}", self.what)));
            }
        }
        Ok(n)
    }
}

/// Starts the command on first read, so that dumps run one after the other.
struct Lazy {
    cmd: Option<Command>,
    what: String,
    out: Option<ChildOutput>,
}

impl Read for Lazy {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.out.is_none() {
            let mut cmd = self.cmd.take().expect("started once");
            let mut child = cmd
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .stdin(Stdio::null())
                .spawn()
                .map_err(|e| std::io::Error::other(format!("cannot start {}: {e}", self.what)))?;
            let stderr = child.stderr.take().map(|e| std::thread::spawn(move || drain_tail(e)));
            self.out = Some(ChildOutput { what: self.what.clone(), child, stderr, done: false });
        }
        self.out.as_mut().expect("started").read(buf)
    }
}

fn tool(pg: &PgSource, name: &str, ci: &ConnInfo) -> Command {
    let mut c = Command::new(pg.bin_dir.join(name));
    if let Some(p) = &ci.password {
        c.env("PGPASSWORD", p);
    }
    c
}

async fn backup(policy: &Policy, pg: &PgSource, repo: &Writer, opts: &Options, guard: &LockGuard) -> Result<Sidecar> {
    let dsn_ref = pg.dsn.to_string();
    let c = connect(pg).await?;
    let version: String = c
        .query_one("SELECT current_setting('server_version')", &[])
        .await
        .map_err(|e| db_error(&dsn_ref, "query the server", e))?
        .get(0);
    let databases: Vec<String> = if pg.databases.is_empty() {
        c.query("SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1", &[])
            .await
            .map_err(|e| db_error(&dsn_ref, "list databases", e))?
            .iter()
            .map(|r| r.get(0))
            .collect()
    } else {
        pg.databases.clone()
    };
    drop(c);
    let dsn = pg.dsn.config()?;
    let mut streams: Vec<(String, Box<dyn Read + Send>)> = Vec::new();
    let ci = conninfo(&dsn, Some("postgres"));
    let mut g = tool(pg, "pg_dumpall", &ci);
    g.arg("--globals-only").arg(format!("--dbname={}", ci.conninfo));
    streams.push((
        "globals.sql".into(),
        Box::new(Lazy { cmd: Some(g), what: "pg_dumpall --globals-only".into(), out: None }),
    ));
    for db in &databases {
        let ci = conninfo(&dsn, Some(db));
        let mut d = tool(pg, "pg_dump", &ci);
        d.args(["-Fc", "--create", "--no-sync"]).arg(format!("--dbname={}", ci.conninfo));
        streams.push((
            dump_name(db),
            Box::new(Lazy { cmd: Some(d), what: format!("pg_dump of database {db}"), out: None }),
        ));
    }
    let mut pending =
        prepare_streams(policy, repo, opts, SourceKind::PostgresLogical, "postgres-logical", streams).await?;
    pending.sidecar.postgres = Some(PgMeta::Logical(DumpInfo { version, databases }));
    commit(repo, guard, pending).await
}

/// File name of a database's dump in the snapshot (hex when the name is not a plain word).
pub fn dump_name(db: &str) -> String {
    if db.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        format!("{db}.dump")
    } else {
        format!("hex-{}.dump", hex::encode(db))
    }
}

pub fn db_of_dump(file: &str) -> Option<String> {
    let stem = file.strip_suffix(".dump")?;
    match stem.strip_prefix("hex-") {
        Some(h) => hex::decode(h).ok().and_then(|b| String::from_utf8(b).ok()),
        None => Some(stem.to_string()),
    }
}

/// Load restored dump files from `dir` into the server at `dsn`.
pub async fn load(pg: &PgSource, dir: &Path, dsn: &tokio_postgres::Config, jobs: usize) -> Result<Vec<String>> {
    let admin = conninfo(dsn, Some("postgres"));
    let globals = dir.join("globals.sql");
    if globals.exists() {
        let out = tool(pg, "psql", &admin)
            .args(["-q", "-X", "-v", "ON_ERROR_STOP=0", "-f"])
            .arg(&globals)
            .arg(format!("--dbname={}", admin.conninfo))
            .output()
            .map_err(|e| Error::failed(format!("cannot run psql: {e}")))?;
        if !out.status.success() {
            return Err(Error::new(
                Kind::Database,
                format!("restoring globals failed: {}", String::from_utf8_lossy(&out.stderr).trim()),
            ));
        }
    }
    let (client, conn) = dsn
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| db_error("--target-dsn", "connect to the target server", e))?;
    tokio::spawn(conn);
    let mut dumps: Vec<PathBuf> =
        std::fs::read_dir(dir).map_err(|e| Error::io("read", dir, e))?.flatten().map(|e| e.path()).collect();
    dumps.sort();
    let mut loaded = Vec::new();
    for f in dumps {
        let Some(db) = f.file_name().and_then(|n| n.to_str()).and_then(db_of_dump) else { continue };
        let exists = client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&db])
            .await
            .map_err(|e| db_error("--target-dsn", "query the target server", e))?
            .is_some();
        // A missing database is created by pg_restore with its owner and settings (the dump
        // was taken with --create); an existing one is loaded into.
        let ci = if exists { conninfo(dsn, Some(&db)) } else { conninfo(dsn, Some("postgres")) };
        let out = tool(pg, "pg_restore", &ci)
            .args(["--exit-on-error", "-j", &jobs.max(1).to_string()])
            .args(if exists { &[][..] } else { &["--create"][..] })
            .arg(format!("--dbname={}", ci.conninfo))
            .arg(&f)
            .output()
            .map_err(|e| Error::failed(format!("cannot run pg_restore: {e}")))?;
        if !out.status.success() {
            return Err(Error::new(
                Kind::Database,
                format!(
                    "pg_restore of database {db} failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim().replace('\n', " ")
                ),
            )
            .with_hint("restore into an empty database (objects that already exist make pg_restore fail)"));
        }
        loaded.push(db);
    }
    Ok(loaded)
}
