//! PostgreSQL restores. Physical: choose the backup for the recovery target, restore PGDATA,
//! write `backup_label`, `recovery.signal` and the recovery settings (restore_command is
//! `veza-dr wal-fetch`, archiving off in the copy), hand the tree to the data directory's
//! owner, and with `--start` run the server until recovery has finished. Logical: restore the
//! dumps and load them with `pg_restore -j`.

use crate::crypto::Opener;
use crate::error::{Error, Kind, Result};
use crate::policy::{PgSource, Policy};
use crate::repository::format::Sidecar;
use crate::repository::Repo;
use crate::source::postgres::parse_lsn;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Default)]
pub struct RecoveryTarget {
    pub time: Option<String>,
    pub lsn: Option<String>,
    pub xid: Option<String>,
    pub name: Option<String>,
    pub immediate: bool,
}

impl RecoveryTarget {
    pub fn describe(&self) -> String {
        match self {
            RecoveryTarget { time: Some(t), .. } => format!("time {t}"),
            RecoveryTarget { lsn: Some(l), .. } => format!("lsn {l}"),
            RecoveryTarget { xid: Some(x), .. } => format!("xid {x}"),
            RecoveryTarget { name: Some(n), .. } => format!("restore point {n}"),
            RecoveryTarget { immediate: true, .. } => "the end of the backup (immediate)".into(),
            _ => "the newest archived WAL (latest)".into(),
        }
    }

    fn settings(&self) -> Result<Vec<(String, String)>> {
        let mut v = Vec::new();
        if let Some(t) = &self.time {
            let at = chrono::DateTime::parse_from_rfc3339(t).map_err(|e| {
                Error::usage(format!("--to-time {t} is not an RFC 3339 time: {e}"))
                    .with_hint("write e.g. 2026-11-21T03:15:00Z")
            })?;
            // PostgreSQL reads microseconds and a numeric offset, not RFC 3339's nanoseconds and Z.
            let utc = at.with_timezone(&chrono::Utc);
            v.push(("recovery_target_time".into(), utc.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string()));
        } else if let Some(l) = &self.lsn {
            parse_lsn(l).ok_or_else(|| Error::usage(format!("--to-lsn {l} is not an LSN like 0/3000060")))?;
            v.push(("recovery_target_lsn".into(), l.clone()));
        } else if let Some(x) = &self.xid {
            x.parse::<u64>().map_err(|_| Error::usage(format!("--to-xid {x} is not a transaction id")))?;
            v.push(("recovery_target_xid".into(), x.clone()));
        } else if let Some(n) = &self.name {
            v.push(("recovery_target_name".into(), n.clone()));
        } else if self.immediate {
            v.push(("recovery_target".into(), "immediate".into()));
        }
        v.push(("recovery_target_action".into(), "promote".into()));
        Ok(v)
    }
}

pub struct PhysicalOptions {
    pub snapshot: Option<String>,
    pub target_dir: PathBuf,
    pub recovery: RecoveryTarget,
    pub start: bool,
    pub port: u16,
    pub identity_file: Option<PathBuf>,
    pub bytes_done: Arc<AtomicU64>,
    pub bytes_total: Arc<AtomicU64>,
}

#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PhysicalSummary {
    pub snapshot: String,
    pub target: String,
    pub recovery_target: String,
    pub files: u64,
    pub bytes: u64,
    pub started: bool,
    pub port: Option<u16>,
    pub recovered_lsn: Option<String>,
    pub timeline: Option<i32>,
    pub last_transaction: Option<String>,
    pub seconds_restore: f64,
    pub seconds_recovery: f64,
    pub warnings: Vec<String>,
}

fn pg_info<'a>(s: &'a Sidecar, key: &str) -> Option<&'a serde_json::Value> {
    s.postgres.as_ref().and_then(|p| p.get(key))
}

/// The newest physical backup that ends before the recovery target.
pub fn choose(snaps: &[Sidecar], t: &RecoveryTarget) -> Result<Sidecar> {
    let phys: Vec<&Sidecar> = snaps.iter().filter(|s| s.source == "postgres-physical").collect();
    let newest = phys.last().copied().cloned();
    let pick = if let Some(ts) = &t.time {
        let want =
            chrono::DateTime::parse_from_rfc3339(ts).map_err(|e| Error::usage(format!("--to-time {ts}: {e}")))?;
        phys.iter()
            .rev()
            .find(|s| {
                pg_info(s, "stop-time")
                    .and_then(|v| v.as_str())
                    .and_then(|v| chrono::DateTime::parse_from_rfc3339(v).ok())
                    .is_some_and(|stop| stop <= want)
            })
            .copied()
            .cloned()
    } else if let Some(l) = &t.lsn {
        let want = parse_lsn(l).ok_or_else(|| Error::usage(format!("--to-lsn {l} is not an LSN")))?;
        phys.iter()
            .rev()
            .find(|s| {
                pg_info(s, "stop-lsn").and_then(|v| v.as_str()).and_then(parse_lsn).is_some_and(|stop| stop <= want)
            })
            .copied()
            .cloned()
    } else {
        newest.clone()
    };
    pick.ok_or_else(|| match (&newest, phys.first()) {
        (None, _) => {
            Error::not_found("no physical backup of this policy yet").with_hint("run `veza-dr backup <policy>` first")
        }
        (_, Some(oldest)) => Error::not_found(format!(
            "no physical backup ends before {}: the oldest ends at {}",
            t.describe(),
            pg_info(oldest, "stop-time").and_then(|v| v.as_str()).unwrap_or("?")
        ))
        .with_hint("choose a later target"),
        _ => unreachable!(),
    })
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn conf_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

pub async fn restore_physical(
    repo: &Repo,
    opener: &Opener,
    policy: &Policy,
    pg: &PgSource,
    o: &PhysicalOptions,
) -> Result<PhysicalSummary> {
    let t0 = std::time::Instant::now();
    let snap = match &o.snapshot {
        Some(id) => repo.find_snapshot(id).await?,
        None => choose(&repo.snapshots().await?, &o.recovery)?,
    };
    let settings = o.recovery.settings()?;
    let target = &o.target_dir;
    let summary = crate::restore::run(
        repo,
        opener,
        &crate::restore::Options {
            snapshot: snap.id.clone(),
            target: target.clone(),
            includes: vec![],
            overwrite: false,
            bytes_done: o.bytes_done.clone(),
            bytes_total: o.bytes_total.clone(),
        },
    )
    .await?;
    let io = |what: &str, p: &Path, e: std::io::Error| Error::io(what, p, e);
    let label = summary.extra.get("backup_label").and_then(|v| v.as_str()).unwrap_or("");
    if label.is_empty() {
        return Err(Error::damaged(format!("snapshot {} has no backup_label: it is not a physical backup", snap.id)));
    }
    std::fs::write(target.join("backup_label"), label).map_err(|e| io("write", &target.join("backup_label"), e))?;
    // Tablespaces come back as directories under pg_tblspc/<oid>: move each beside the data
    // directory and link it, as PostgreSQL expects (never onto the source's own locations).
    // With the links in place, tablespace_map is not needed.
    let mut tablespace_dirs = Vec::new();
    if let Ok(rd) = std::fs::read_dir(target.join("pg_tblspc")) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                let home = PathBuf::from(format!("{}-tablespaces", target.display())).join(e.file_name());
                std::fs::create_dir_all(home.parent().unwrap_or(target)).map_err(|err| io("create", &home, err))?;
                std::fs::rename(e.path(), &home).map_err(|err| io("move tablespace to", &home, err))?;
                std::os::unix::fs::symlink(&home, e.path()).map_err(|err| io("link tablespace", &e.path(), err))?;
                tablespace_dirs.push(home);
            }
        }
    }
    std::fs::create_dir_all(target.join("pg_wal/archive_status")).map_err(|e| io("create", target, e))?;

    // What wal-fetch needs inside the restored cluster, readable by the server's user only.
    let work = target.join("veza-dr-restore");
    std::fs::create_dir_all(crate::wal::spool_dir(target)).map_err(|e| io("create", &work, e))?;
    let id_copy = work.join("identity");
    let id_src = o.identity_file.clone().ok_or_else(|| {
        Error::crypto("a physical restore needs --identity FILE: the restored server fetches WAL with it")
    })?;
    std::fs::copy(&id_src, &id_copy).map_err(|e| io("copy identity", &id_src, e))?;
    let policy_copy = work.join(format!("{}.toml", policy.name));
    std::fs::copy(&policy.path, &policy_copy).map_err(|e| io("copy policy", &policy.path, e))?;
    let exe = std::env::current_exe().map_err(|e| Error::failed(format!("cannot find the veza-dr binary: {e}")))?;
    let restore_command = format!(
        "{} wal-fetch {} %f %p --identity {} --spool {}",
        shell_quote(&exe.display().to_string()),
        shell_quote(&policy_copy.display().to_string()),
        shell_quote(&id_copy.display().to_string()),
        shell_quote(&crate::wal::spool_dir(target).display().to_string())
    );
    let mut conf = format!("\n# added by veza-dr restore of snapshot {} ({})\n", snap.id, o.recovery.describe());
    conf += &format!("restore_command = {}\n", conf_quote(&restore_command));
    conf += "archive_mode = 'off'\narchive_command = ''\n";
    for (k, v) in &settings {
        conf += &format!("{k} = {}\n", conf_quote(v));
    }
    let auto = target.join("postgresql.auto.conf");
    let mut text = std::fs::read_to_string(&auto).unwrap_or_default();
    text += &conf;
    std::fs::write(&auto, text).map_err(|e| io("write", &auto, e))?;
    std::fs::write(target.join("recovery.signal"), "").map_err(|e| io("write", target, e))?;

    // Hand the tree to the data directory's owner, 0700 as PostgreSQL requires.
    let (uid, gid) = summary.owner;
    let tablespace_parent: Vec<PathBuf> =
        tablespace_dirs.iter().filter_map(|d| d.parent().map(Path::to_path_buf)).take(1).collect();
    for root in std::iter::once(target.clone()).chain(tablespace_parent) {
        for e in walkdir::WalkDir::new(&root).into_iter().flatten() {
            let _ = std::os::unix::fs::lchown(e.path(), Some(uid), Some(gid));
        }
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(target, std::fs::Permissions::from_mode(0o700)).map_err(|e| io("chmod", target, e))?;
    std::fs::set_permissions(&id_copy, std::fs::Permissions::from_mode(0o600)).map_err(|e| io("chmod", &id_copy, e))?;

    let mut out = PhysicalSummary {
        snapshot: snap.id.clone(),
        target: target.display().to_string(),
        recovery_target: o.recovery.describe(),
        files: summary.files,
        bytes: summary.bytes,
        started: false,
        port: None,
        recovered_lsn: None,
        timeline: None,
        last_transaction: None,
        seconds_restore: t0.elapsed().as_secs_f64(),
        seconds_recovery: 0.0,
        warnings: summary.warnings,
    };
    if !o.start {
        out.warnings.push(format!(
            "start the server as the data directory's owner; once recovery has finished, delete {} (it holds a copy of the identity)",
            work.display()
        ));
        return Ok(out);
    }
    let t1 = std::time::Instant::now();
    let server =
        Server { bin_dir: pg.bin_dir.clone(), data: target.clone(), port: o.port, uid, dsn: pg.dsn.resolve().ok() };
    let rec = server.start_and_wait(repo).await;
    out.seconds_recovery = t1.elapsed().as_secs_f64();
    let rec = rec?;
    out.started = true;
    out.port = Some(o.port);
    out.recovered_lsn = Some(rec.lsn);
    out.timeline = Some(rec.timeline);
    out.last_transaction = rec.last_transaction;
    let _ = std::fs::remove_file(&id_copy);
    let _ = std::fs::remove_dir_all(crate::wal::spool_dir(target));
    if let Some(gap) = rec.gap {
        return Err(gap);
    }
    Ok(out)
}

pub struct Server {
    pub bin_dir: PathBuf,
    pub data: PathBuf,
    pub port: u16,
    pub uid: u32,
    /// The source's DSN: a physical copy has the same roles, so its user and password work.
    pub dsn: Option<String>,
}

pub struct Recovered {
    pub lsn: String,
    pub timeline: i32,
    pub last_transaction: Option<String>,
    pub gap: Option<Error>,
}

impl Server {
    pub fn socket_dir(&self) -> PathBuf {
        PathBuf::from(format!("/tmp/.veza-dr-{}", self.port))
    }

    fn log(&self) -> PathBuf {
        self.data.join("veza-dr-restore/server.log")
    }

    /// A PostgreSQL program run as the owner of the data directory (PostgreSQL refuses root).
    pub fn as_owner(&self, program: &Path) -> std::process::Command {
        let me = nix::unistd::geteuid().as_raw();
        if me == self.uid {
            return std::process::Command::new(program);
        }
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(self.uid)).ok().flatten();
        let mut c = std::process::Command::new("runuser");
        c.arg("-u").arg(user.map(|u| u.name).unwrap_or_else(|| self.uid.to_string())).arg("--").arg(program);
        c
    }

    /// `pg_ctl` as the owner of the data directory.
    fn pg_ctl(&self, args: &[&str]) -> std::process::Command {
        let mut c = self.as_owner(&self.bin_dir.join("pg_ctl"));
        c.args(args);
        c
    }

    pub fn stop(&self) {
        let _ = self.pg_ctl(&["-D", &self.data.display().to_string(), "-m", "fast", "-w", "stop"]).output();
        let _ = std::fs::remove_dir_all(self.socket_dir());
    }

    /// Start the server on its port (127.0.0.1 and a socket in `socket_dir`) and wait until it
    /// accepts connections. Cancelling the future kills `pg_ctl`; the caller stops the server.
    pub async fn start(&self) -> Result<()> {
        let sock = self.socket_dir();
        std::fs::create_dir_all(&sock).map_err(|e| Error::io("create", &sock, e))?;
        let _ = std::os::unix::fs::chown(&sock, Some(self.uid), None);
        // Restored data is production data: the socket is for the server's owner (and root).
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o700));
        let opts = format!("-p {} -k {} -c listen_addresses='127.0.0.1'", self.port, sock.display());
        let cmd = self.pg_ctl(&[
            "-D",
            &self.data.display().to_string(),
            "-l",
            &self.log().display().to_string(),
            "-o",
            &opts,
            "-w",
            "-t",
            "3600",
            "start",
        ]);
        let out = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| Error::failed(format!("cannot run pg_ctl: {e}")))?;
        if !out.status.success() {
            return Err(self.failure("the server did not start"));
        }
        Ok(())
    }

    /// Start, wait for the end of recovery, report where it ended.
    pub async fn start_and_wait(&self, repo: &Repo) -> Result<Recovered> {
        self.start().await?;
        let client = self.connect().await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3600);
        loop {
            let r = client.query_one("SELECT pg_is_in_recovery()", &[]).await;
            match r {
                Ok(row) if !row.get::<_, bool>(0) => break,
                Ok(_) => {}
                Err(_) => return Err(self.failure("the restored server stopped during recovery")),
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Error::failed("recovery did not finish within an hour"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let row = client
            .query_one("SELECT pg_current_wal_lsn()::text, (SELECT timeline_id FROM pg_control_checkpoint())", &[])
            .await
            .map_err(|e| crate::source::postgres::db_error("restored server", "query", e))?;
        let log = std::fs::read_to_string(self.log()).unwrap_or_default();
        let last_transaction = log
            .lines()
            .filter_map(|l| l.split("last completed transaction was at log time ").nth(1))
            .next_back()
            .map(|s| s.trim().to_string());
        let gap = self.gap(repo, &log).await;
        Ok(Recovered { lsn: row.get(0), timeline: row.get(1), last_transaction, gap })
    }

    /// A connection to the restored server over its socket, with the source's credentials.
    pub fn config(&self) -> tokio_postgres::Config {
        let src: Option<tokio_postgres::Config> = self.dsn.as_deref().and_then(|d| d.parse().ok());
        let mut cfg = tokio_postgres::Config::new();
        cfg.host_path(self.socket_dir()).port(self.port).dbname("postgres");
        cfg.user(src.as_ref().and_then(|c| c.get_user()).unwrap_or("postgres"));
        if let Some(pw) = src.as_ref().and_then(|c| c.get_password()) {
            cfg.password(pw);
        }
        cfg
    }

    async fn connect(&self) -> Result<tokio_postgres::Client> {
        let mut last = None;
        let cfg = self.config();
        for _ in 0..100 {
            match cfg.connect(tokio_postgres::NoTls).await {
                Ok((c, conn)) => {
                    tokio::spawn(conn);
                    return Ok(c);
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(crate::source::postgres::db_error("restored server", "connect", last.expect("tried")))
    }

    /// A WAL segment missing in the middle: recovery stopped early although later WAL exists.
    async fn gap(&self, repo: &Repo, log: &str) -> Option<Error> {
        let missing = std::fs::read_to_string(crate::wal::spool_dir(&self.data).join("missing")).ok()?;
        let first = missing.lines().find(|n| n.len() == 24)?.to_string();
        let names = crate::wal::list_names(&repo.store).await.ok()?;
        let later = names
            .iter()
            .map(|(n, _)| n)
            .rfind(|n| n.len() == 24 && n[..8] == first[..8] && n.as_str() > first.as_str())?;
        let reached = log
            .lines()
            .filter_map(|l| l.split("redo done at ").nth(1))
            .next_back()
            .map(|s| s.split_whitespace().next().unwrap_or("").to_string());
        Some(
            Error::damaged(format!(
                "WAL segment {first} is missing from the repository: recovery stopped at {} although WAL continues to {later}",
                reached.unwrap_or_else(|| "an earlier point".into())
            ))
            .with_hint("the server is running at that earlier point; restore from a newer backup or recover the segment"),
        )
    }

    fn failure(&self, what: &str) -> Error {
        let log = std::fs::read_to_string(self.log()).unwrap_or_default();
        let fatal = log.lines().rfind(|l| l.contains("FATAL") || l.contains("PANIC")).unwrap_or("").trim().to_string();
        let missing = std::fs::read_to_string(crate::wal::spool_dir(&self.data).join("missing")).unwrap_or_default();
        let redo = log.lines().filter_map(|l| l.split("redo done at ").nth(1)).next_back().map(|s| s.to_string());
        if log.contains("could not bind") && log.contains("Address already in use") {
            return Error::new(
                Kind::Database,
                format!("{what}: port {} on 127.0.0.1 is already in use ({fatal})", self.port),
            )
            .with_hint("choose another port (restore --port, or [verify] port for drills; unset picks a free one)");
        }
        let mut msg = format!("{what}: {fatal}");
        if let Some(seg) = missing.lines().find(|n| n.len() == 24) {
            msg += &format!("; WAL segment {seg} is not in the repository");
        }
        if let Some(r) = redo {
            msg += &format!("; last reachable point: {r}");
        }
        Error::new(Kind::Database, msg).with_hint(format!("see {}", self.log().display()))
    }
}

pub async fn restore_logical(
    repo: &Repo,
    opener: &Opener,
    pg: &PgSource,
    snapshot: &str,
    target_dsn: &str,
    jobs: usize,
) -> Result<(String, Vec<String>)> {
    let tmp = tempfile::tempdir().map_err(|e| Error::failed(format!("cannot create a temporary directory: {e}")))?;
    let dir = tmp.path().join("dumps");
    let s = crate::restore::run(
        repo,
        opener,
        &crate::restore::Options {
            snapshot: snapshot.to_string(),
            target: dir.clone(),
            includes: vec![],
            overwrite: false,
            bytes_done: Arc::default(),
            bytes_total: Arc::default(),
        },
    )
    .await?;
    let loaded = crate::source::postgres::logical::load(pg, &dir, target_dsn, jobs).await?;
    Ok((s.snapshot, loaded))
}
