//! PostgreSQL physical backups: `pg_backup_start` … read PGDATA through the engine …
//! `pg_backup_stop` on one session, then wait until the WAL up to the stop LSN is in the
//! repository, then commit. The backup label goes into the encrypted manifest, never PGDATA.

pub mod logical;

use crate::backup::{commit, prepare_tree, Options};
use crate::error::{Error, Kind, Result};
use crate::policy::{PgSource, Policy};
use crate::repository::format::Sidecar;
use crate::repository::lock::LockGuard;
use crate::repository::Repo;
use std::sync::Arc;
use std::time::Duration;

/// What PostgreSQL's documentation says not to copy (contents only: the directories stay).
pub const EXCLUDES: &[&str] = &[
    "pg_wal/*",
    "pg_replslot/*",
    "pg_dynshmem/*",
    "pg_notify/*",
    "pg_serial/*",
    "pg_snapshots/*",
    "pg_stat_tmp/*",
    "pg_subtrans/*",
    "pgsql_tmp*",
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "backup_label.old",
    "tablespace_map",
    "backup_manifest",
    "veza-dr-restore",
];

/// Connect with the policy's DSN. Errors name the reference, never the DSN.
pub async fn connect(pg: &PgSource) -> Result<tokio_postgres::Client> {
    connect_ref(&pg.dsn).await
}

/// Connect with the DSN behind a secret reference. Errors name the reference, never the DSN.
pub async fn connect_ref(dsn_ref: &crate::secret::SecretRef) -> Result<tokio_postgres::Client> {
    let dsn = dsn_ref.resolve()?;
    let cfg: tokio_postgres::Config = dsn
        .parse()
        .map_err(|_| Error::policy(format!("the DSN in {dsn_ref} is not a valid PostgreSQL connection string")))?;
    let (client, conn) = tokio::time::timeout(Duration::from_secs(15), cfg.connect(tokio_postgres::NoTls))
        .await
        .map_err(|_| Error::new(Kind::Database, format!("connecting to PostgreSQL with {dsn_ref} timed out")))?
        .map_err(|e| db_error(&dsn_ref.to_string(), "connect to PostgreSQL", e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "postgres connection ended");
        }
    });
    Ok(client)
}

/// A PostgreSQL failure as one line with a hint for the common causes.
pub fn db_error(dsn_ref: &str, what: &str, e: tokio_postgres::Error) -> Error {
    let (msg, hint) = match e.as_db_error() {
        Some(db) => {
            let hint = match db.code().code() {
                "28P01" | "28000" => "check the user and password in the DSN secret",
                "42501" => {
                    "the user needs the superuser or REPLICATION role with EXECUTE on pg_backup_start/pg_backup_stop"
                }
                "3D000" => "the database in the DSN does not exist",
                "55000" => "check archive_mode/wal_level on the server",
                _ => "see the PostgreSQL server log",
            };
            (db.message().to_string(), hint)
        }
        None => {
            let t = e.to_string();
            let src = std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default();
            (
                format!("{t}{}", if src.is_empty() { String::new() } else { format!(": {src}") }),
                "check the host/port in the DSN and that the server is running",
            )
        }
    };
    Error::new(Kind::Database, format!("cannot {what} ({dsn_ref}): {msg}")).with_hint(hint)
}

async fn one_text(c: &tokio_postgres::Client, dsn: &str, sql: &str) -> Result<String> {
    let row = c.query_one(sql, &[]).await.map_err(|e| db_error(dsn, "query the server", e))?;
    Ok(row.get::<_, Option<String>>(0).unwrap_or_default())
}

/// WAL segment file name for an LSN on a timeline (16 MiB segments unless told).
pub fn wal_file_name(tli: u32, lsn: u64, seg_size: u64) -> String {
    let seg = lsn / seg_size;
    let per_log = 0x1_0000_0000 / seg_size;
    format!("{tli:08X}{:08X}{:08X}", seg / per_log, seg % per_log)
}

pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

pub fn format_lsn(l: u64) -> String {
    format!("{:X}/{:X}", l >> 32, l & 0xffff_ffff)
}

/// The next segment name after `name` (same timeline).
pub fn next_segment(name: &str, seg_size: u64) -> Option<String> {
    if name.len() != 24 {
        return None;
    }
    let tli = u32::from_str_radix(&name[0..8], 16).ok()?;
    let log = u64::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
    let per_log = 0x1_0000_0000 / seg_size;
    let (log, seg) = if seg + 1 >= per_log { (log + 1, 0) } else { (log, seg + 1) };
    Some(format!("{tli:08X}{log:08X}{seg:08X}"))
}

pub async fn backup_physical(
    policy: &Policy,
    pg: &PgSource,
    repo: &Arc<Repo>,
    opts: &Options,
    guard: &LockGuard,
) -> Result<Sidecar> {
    let dsn = pg.dsn.to_string();
    let data_dir = pg.data_dir.clone().expect("validated: physical needs data-dir");
    let meta = std::fs::metadata(&data_dir).map_err(|e| {
        Error::io("read data directory", &data_dir, e)
            .with_hint("veza-dr must run on the database host, as root or the postgres user")
    })?;
    if !meta.is_dir() {
        return Err(Error::policy(format!("data-dir {} is not a directory", data_dir.display())));
    }
    std::fs::read_dir(&data_dir).map_err(|e| {
        Error::io("read data directory", &data_dir, e)
            .with_hint("run the backup as root or as the data directory's owner")
    })?;
    // Tablespaces live outside PGDATA behind pg_tblspc/<oid> symlinks: read each location too,
    // and store it under pg_tblspc/<oid>/ in the snapshot.
    let mut tablespaces: Vec<(String, std::path::PathBuf)> = Vec::new();
    for e in
        std::fs::read_dir(data_dir.join("pg_tblspc")).map(|rd| rd.flatten().collect::<Vec<_>>()).unwrap_or_default()
    {
        if let Ok(loc) = std::fs::read_link(e.path()) {
            let loc = if loc.is_absolute() { loc } else { data_dir.join("pg_tblspc").join(loc) };
            tablespaces.push((format!("pg_tblspc/{}", e.file_name().to_string_lossy()), loc));
        }
    }
    let c = connect(pg).await?;
    let version: i32 = one_text(&c, &dsn, "SELECT current_setting('server_version_num')").await?.parse().unwrap_or(0);
    let archive_mode = one_text(&c, &dsn, "SELECT current_setting('archive_mode')").await?;
    if archive_mode == "off" {
        return Err(Error::new(Kind::Database, format!("archive_mode is off on the server of policy {}", policy.name))
            .with_hint(format!(
                "set archive_mode = on and archive_command = 'veza-dr wal-push {} %p', then restart PostgreSQL",
                policy.name
            )));
    }
    if one_text(&c, &dsn, "SELECT current_setting('wal_level')").await? == "minimal" {
        return Err(Error::new(Kind::Database, "wal_level is minimal: WAL cannot be archived for recovery")
            .with_hint("set wal_level = replica and restart PostgreSQL"));
    }
    let seg_size: u64 = one_text(&c, &dsn, "SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'")
        .await?
        .parse::<u64>()
        .map(|n| if n < 1 << 20 { n * 8192 } else { n })
        .unwrap_or(16 << 20);
    let sysid = one_text(&c, &dsn, "SELECT system_identifier::text FROM pg_control_system()").await?;
    let label = format!("veza-dr {} {}", policy.name, chrono::Utc::now().format("%Y%m%dT%H%M%SZ"));
    let start_sql = if version >= 150000 {
        "SELECT pg_backup_start($1, true)::text"
    } else {
        "SELECT pg_start_backup($1, true, false)::text"
    };
    let start_lsn: String =
        c.query_one(start_sql, &[&label]).await.map_err(|e| db_error(&dsn, "start the backup", e))?.get(0);
    let tli: i32 = c
        .query_one("SELECT timeline_id FROM pg_control_checkpoint()", &[])
        .await
        .map_err(|e| db_error(&dsn, "read the timeline", e))?
        .get(0);

    let excludes: Vec<String> = EXCLUDES.iter().map(|s| s.to_string()).collect();
    let mut pending = prepare_tree(policy, repo, opts, &data_dir, &excludes, &tablespaces).await?;

    // pg_backup_stop waits for the last segment to be archived; bound it.
    let stop_sql = if version >= 150000 {
        "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(true)"
    } else {
        "SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, true)"
    };
    let timeout = wal_timeout();
    let row = tokio::time::timeout(timeout, c.query_one(stop_sql, &[]))
        .await
        .map_err(|_| {
            Error::new(
                Kind::Database,
                format!("pg_backup_stop did not return within {}s: WAL archiving is not working", timeout.as_secs()),
            )
            .with_hint(format!("check archive_command (veza-dr wal-push {} %p) and the server log", policy.name))
        })?
        .map_err(|e| db_error(&dsn, "stop the backup", e))?;
    let stop_lsn: String = row.get(0);
    let labelfile: String = row.get(1);
    let spcmap: Option<String> = row.get(2);
    let stop_time = chrono::Utc::now();

    let (start, stop) = (parse_lsn(&start_lsn).unwrap_or(0), parse_lsn(&stop_lsn).unwrap_or(0));
    let first = wal_file_name(tli as u32, start, seg_size);
    let last = wal_file_name(tli as u32, stop, seg_size);
    crate::wal::wait_archived(&repo.store, &first, &last, seg_size, timeout).await?;

    pending.manifest.extra =
        serde_json::json!({ "backup_label": labelfile, "tablespace_map": spcmap.unwrap_or_default() });
    pending.sidecar.postgres = Some(serde_json::json!({
        "version": version,
        "system-identifier": sysid,
        "timeline": tli,
        "start-lsn": start_lsn,
        "stop-lsn": stop_lsn,
        "start-wal": first,
        "stop-wal": last,
        "stop-time": stop_time,
        "wal-segment-size": seg_size,
        "data-dir": data_dir,
    }));
    commit(repo, guard, pending).await
}

pub fn wal_timeout() -> Duration {
    std::env::var("VEZA_DR_WAL_TIMEOUT")
        .ok()
        .and_then(|s| humantime::parse_duration(&s).ok())
        .unwrap_or(Duration::from_secs(300))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_names_follow_postgres() {
        assert_eq!(wal_file_name(1, parse_lsn("0/3000028").unwrap(), 16 << 20), "000000010000000000000003");
        assert_eq!(wal_file_name(2, parse_lsn("1/FF000000").unwrap(), 16 << 20), "0000000200000001000000FF");
        assert_eq!(next_segment("0000000100000001000000FF", 16 << 20).unwrap(), "000000010000000200000000");
        assert_eq!(format_lsn(parse_lsn("16/B374D848").unwrap()), "16/B374D848");
    }
}
