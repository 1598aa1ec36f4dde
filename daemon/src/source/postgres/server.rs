//! The server supervisor: a PostgreSQL server run on a restored (or throw-away) data directory
//! as the directory's owner, on 127.0.0.1 and a private socket directory; started, waited on
//! until recovery ends, connected to with the source's roles, stopped.

use super::wal::{WalKind, WalName};
use crate::error::{Error, Kind, Result};
use crate::repository::Repository;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Default)]
pub struct Server {
    pub bin_dir: PathBuf,
    pub data: PathBuf,
    pub port: u16,
    pub uid: u32,
    /// The source's DSN: a physical copy has the same roles, so its user and password work.
    pub dsn: Option<tokio_postgres::Config>,
    /// Where the socket goes (default: a private directory, /tmp/.veza-dr-<port>).
    pub socket: Option<PathBuf>,
    /// `listen_addresses` (default 127.0.0.1).
    pub listen: Option<String>,
}

pub struct Recovered {
    pub lsn: String,
    pub timeline: i32,
    pub last_transaction: Option<String>,
    pub gap: Option<Error>,
}

impl Server {
    pub fn socket_dir(&self) -> PathBuf {
        self.socket.clone().unwrap_or_else(|| PathBuf::from(format!("/tmp/.veza-dr-{}", self.port)))
    }

    /// The address the server listens on over TCP.
    pub fn listen(&self) -> &str {
        self.listen.as_deref().unwrap_or("127.0.0.1")
    }

    /// The exact commands that reach the started server: over its socket (the private
    /// default is open to the server's owner and root: whoever ran the restore) and over TCP.
    pub fn psql(&self) -> Vec<String> {
        let user = self.dsn.as_ref().and_then(|c| c.get_user()).unwrap_or("postgres");
        let bin = self.bin_dir.join("psql");
        let mut out = vec![format!(
            "{} -h {} -p {} -U {user} -d postgres",
            bin.display(),
            self.socket_dir().display(),
            self.port
        )];
        let tcp = match self.listen() {
            "" => None,
            "*" | "0.0.0.0" => Some("127.0.0.1"),
            "::" => Some("::1"),
            l => l.split(',').next().map(str::trim),
        };
        if let Some(h) = tcp {
            out.push(format!("{} -h {h} -p {} -U {user} -d postgres", bin.display(), self.port));
        }
        out
    }

    fn log(&self) -> PathBuf {
        self.data.join("veza-dr-restore/server.log")
    }

    /// The last 4 MiB of a file the server's user writes in the data directory (the log, the
    /// spool's `missing`), read as root: through no-follow handles, regular files only, never
    /// all of it (a link to /dev/zero, a FIFO or a huge file cannot stall or exhaust us).
    fn read_own(&self, rel: &str) -> String {
        crate::pipeline::safe_dir::SafeDir::open(&self.data)
            .map(|d| d.read_tail(Path::new(rel), 4 << 20))
            .unwrap_or_default()
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
        if self.socket.is_none() {
            let _ = std::fs::remove_dir_all(self.socket_dir());
        }
    }

    /// Start the server on its port (127.0.0.1 and a socket in `socket_dir`) and wait until it
    /// accepts connections. Cancelling the future kills `pg_ctl`; the caller stops the server.
    pub async fn start(&self) -> Result<()> {
        let sock = self.socket_dir();
        if self.socket.is_none() {
            std::fs::create_dir_all(&sock).map_err(|e| Error::io("create", &sock, e))?;
            let _ = std::os::unix::fs::chown(&sock, Some(self.uid), None);
            // Restored data is production data: the socket is for the server's owner (and root).
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o700));
        } else if !sock.is_dir() {
            return Err(Error::usage(format!("--socket-dir {} is not a directory", sock.display())));
        }
        if self.listen().contains(['\'', '"', ' ']) {
            return Err(Error::usage(format!("--listen {:?} is not a list of addresses", self.listen())));
        }
        let opts = format!("-p {} -k {} -c listen_addresses='{}'", self.port, sock.display(), self.listen());
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
    pub async fn start_and_wait(&self, repo: &Repository) -> Result<Recovered> {
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
            .map_err(|e| super::db_error("restored server", "query", e))?;
        let log = self.read_own("veza-dr-restore/server.log");
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
        let src = self.dsn.as_ref();
        let mut cfg = tokio_postgres::Config::new();
        cfg.host_path(self.socket_dir()).port(self.port).dbname("postgres");
        cfg.user(src.and_then(|c| c.get_user()).unwrap_or("postgres"));
        if let Some(pw) = src.and_then(|c| c.get_password()) {
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
        Err(super::db_error("restored server", "connect", last.expect("tried")))
    }

    /// A WAL segment missing in the middle: recovery stopped early although later WAL exists.
    async fn gap(&self, repo: &Repository, log: &str) -> Option<Error> {
        // Recovery stopped at its target ("recovery stopping after/before/at …"): a segment it
        // asked for beyond that was the read-ahead (recovery_prefetch), not a hole in the path.
        if log.lines().any(|l| l.contains("LOG:  recovery stopping ")) {
            return None;
        }
        let missing = Some(self.read_own("veza-dr-restore/spool/missing")).filter(|m| !m.is_empty())?;
        let first = missing.lines().filter_map(WalName::parse).find(|n| n.kind() == WalKind::Segment)?;
        let names = repo.wal_files().await.ok()?;
        let later = names.iter().map(|(_, n, _)| n).rfind(|n| {
            n.kind() == WalKind::Segment && n.timeline() == first.timeline() && n.as_str() > first.as_str()
        })?;
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
        let log = self.read_own("veza-dr-restore/server.log");
        let fatal = log.lines().rfind(|l| l.contains("FATAL") || l.contains("PANIC")).unwrap_or("").trim().to_string();
        let missing = self.read_own("veza-dr-restore/spool/missing");
        let redo = log.lines().filter_map(|l| l.split("redo done at ").nth(1)).next_back().map(|s| s.to_string());
        if log.contains("could not bind") && log.contains("Address already in use") {
            return Error::new(
                Kind::Database,
                format!("{what}: port {} on 127.0.0.1 is already in use ({fatal})", self.port),
            )
            .with_hint("choose another port (restore --port, or [verify] port for drills; unset picks a free one)");
        }
        let mut msg = format!("{what}: {fatal}");
        if let Some(seg) = missing.lines().filter_map(WalName::parse).find(|n| n.kind() == WalKind::Segment) {
            msg += &format!("; WAL segment {seg} is not in the repository");
        }
        if let Some(r) = redo {
            msg += &format!("; last reachable point: {r}");
        }
        Error::new(Kind::Database, msg).with_hint(format!("see {}", self.log().display()))
    }
}
