//! PostgreSQL 15 clusters for tests: initdb and postgres run as the `postgres` user (they refuse
//! root), with short socket directories, password authentication and optional archiving.

use std::path::{Path, PathBuf};
use std::process::Command;

pub const BIN: &str = "/usr/lib/postgresql/15/bin";
pub const PASSWORD: &str = "s3cret-pw";

pub struct Pg {
    _dir: tempfile::TempDir,
    pub data: PathBuf,
    pub port: u16,
    pub sock: PathBuf,
    env: Vec<(String, String)>,
}

fn as_postgres(args: &[&str], env: &[(String, String)]) -> std::process::Output {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--", "env"]);
    for (k, v) in env {
        c.arg(format!("{k}={v}"));
    }
    c.args(args);
    c.output().expect("runuser")
}

/// Make `p` and its parents traversable by the postgres user.
pub fn open_up(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut cur = Some(p);
    while let Some(d) = cur {
        if d == Path::new("/") || d == Path::new("/tmp") {
            break;
        }
        if let Ok(m) = d.metadata() {
            let mode = m.permissions().mode();
            let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o755));
        }
        cur = d.parent();
    }
}

/// A directory owned by the postgres user for a new cluster, a free port, and a socket
/// directory for it.
fn cluster_dirs() -> (tempfile::TempDir, PathBuf, u16, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    open_up(dir.path());
    let data = dir.path().join("data");
    let port = super::free_port();
    let sock = PathBuf::from(format!("/tmp/vzpg-{port}"));
    std::fs::create_dir_all(&sock).unwrap();
    for p in [dir.path(), sock.as_path()] {
        Command::new("chown").args(["-R", "postgres"]).arg(p).status().unwrap();
    }
    (dir, data, port, sock)
}

fn append_conf(data: &Path, conf: &str) {
    std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, conf.as_bytes()))
        .unwrap();
}

impl Pg {
    /// A new cluster; `archive_command` empty means archiving off.
    pub fn start(archive_command: &str, env: Vec<(String, String)>) -> Pg {
        let (dir, data, port, sock) = cluster_dirs();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, PASSWORD).unwrap();
        Command::new("chown").arg("postgres").arg(&pw).status().unwrap();
        let out = as_postgres(
            &[
                &format!("{BIN}/initdb"),
                "--no-sync",
                // Data checksums on: every physical backup in the tests checks real pages.
                "--data-checksums",
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "-A",
                "scram-sha-256",
                "--pwfile",
                pw.to_str().unwrap(),
            ],
            &[],
        );
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        let archive = if archive_command.is_empty() {
            "archive_mode = off\n".to_string()
        } else {
            format!("archive_mode = on\narchive_command = '{}'\n", archive_command.replace('\'', "''"))
        };
        let conf = format!(
            "port = {port}\nunix_socket_directories = '{}'\nlisten_addresses = ''\nwal_level = replica\nfsync = off\nmax_wal_size = 256MB\ntrack_commit_timestamp = on\n{archive}",
            sock.display()
        );
        append_conf(&data, &conf);
        let pg = Pg { _dir: dir, data, port, sock, env };
        pg.ctl(&["start", "-w", "-l", pg.data.parent().unwrap().join("server.log").to_str().unwrap()]);
        pg
    }

    /// A streaming-replication standby of this cluster: `pg_basebackup -R`, started on its own
    /// port and socket directory.
    pub fn standby(&self) -> Pg {
        let (dir, data, port, sock) = cluster_dirs();
        let out = as_postgres(
            &[
                &format!("{BIN}/pg_basebackup"),
                "-D",
                data.to_str().unwrap(),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "-d",
                &self.dsn(),
            ],
            &[],
        );
        assert!(out.status.success(), "pg_basebackup: {}", String::from_utf8_lossy(&out.stderr));
        append_conf(
            &data,
            &format!("\nport = {port}\nunix_socket_directories = '{}'\narchive_mode = off\n", sock.display()),
        );
        let pg = Pg { _dir: dir, data, port, sock, env: vec![] };
        pg.ctl(&["start", "-w", "-l", pg.data.parent().unwrap().join("server.log").to_str().unwrap()]);
        pg
    }

    pub fn ctl(&self, args: &[&str]) {
        let mut a = vec![format!("{BIN}/pg_ctl"), "-D".into(), self.data.display().to_string()];
        a.extend(args.iter().map(|s| s.to_string()));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let out = as_postgres(&a, &self.env);
        assert!(
            out.status.success(),
            "pg_ctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn dsn(&self) -> String {
        format!("host={} port={} user=postgres password={PASSWORD} dbname=postgres", self.sock.display(), self.port)
    }

    pub fn dsn_db(&self, db: &str) -> String {
        self.dsn().replace("dbname=postgres", &format!("dbname={db}"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.parent().unwrap().join("server.log")).unwrap_or_default()
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let _ =
            as_postgres(&[&format!("{BIN}/pg_ctl"), "-D", self.data.to_str().unwrap(), "-m", "immediate", "stop"], &[]);
        let _ = std::fs::remove_dir_all(&self.sock);
    }
}

/// Run SQL with psql and return the unaligned output.
pub fn psql(dsn: &str, sql: &str) -> String {
    let out = Command::new(format!("{BIN}/psql"))
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-c", sql])
        .output()
        .unwrap();
    assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Row count and a content hash per table.
pub fn table_hashes(dsn: &str, tables: &[&str]) -> Vec<String> {
    tables
        .iter()
        .map(|t| {
            psql(
                dsn,
                &format!(
                    "SELECT count(*) || ':' || coalesce(md5(string_agg(x::text, ',' ORDER BY x::text)), '') FROM {t} x"
                ),
            )
        })
        .collect()
}

/// A server started by `veza-dr restore --start`: stopped on drop.
pub struct Restored {
    pub data: PathBuf,
    pub port: u16,
}

impl Restored {
    pub fn dsn(&self) -> String {
        format!("host=/tmp/.veza-dr-{} port={} user=postgres password={PASSWORD} dbname=postgres", self.port, self.port)
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        let _ =
            as_postgres(&[&format!("{BIN}/pg_ctl"), "-D", self.data.to_str().unwrap(), "-m", "immediate", "stop"], &[]);
    }
}

/// Wait until the server has archived everything up to its current segment.
pub fn switch_and_wait_archived(dsn: &str) {
    let seg = psql(dsn, "SELECT pg_walfile_name(pg_switch_wal())");
    let t = std::time::Instant::now();
    loop {
        let last = psql(dsn, "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver");
        if last.as_str() >= seg.as_str() {
            return;
        }
        assert!(t.elapsed().as_secs() < 60, "segment {seg} not archived (last {last})");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
