//! PostgreSQL physical: `pg_backup_start` … read PGDATA through the engine … `pg_backup_stop`
//! on one session, wait until the WAL up to the stop LSN is in the repository, then commit.
//! The backup label goes into the encrypted manifest, never PGDATA. Restore writes PGDATA,
//! `backup_label`, `recovery.signal` and the recovery settings (restore_command is
//! `veza-dr wal-fetch`, archiving off in the copy), hands the tree to the data directory's
//! owner and, with `--start`, runs the server until recovery has finished.

use super::archive;
use super::handover::{self, IdentityCopy};
use super::recovery::RecoveryTarget;
use super::server::{Recovered, Server};
use super::wal::{parse_lsn, WalName};
use super::{connect, db_error, one_text, wal_timeout};
use crate::error::{Error, Kind, Result};
use crate::pipeline::safe_dir::SafeDir;
use crate::pipeline::snapshot::{commit, prepare_tree, Options as BackupOptions, PgRead};
use crate::pipeline::tree;
use crate::policy::{PgSource, Policy, SourceKind};
use crate::repository::format::{PageBasis, PgInfo, PgLabel, PgMeta, Sidecar};
use crate::repository::lock::LockGuard;
use crate::repository::{Unlocked, Writer};
use crate::source::{DrillEnv, Drilled, RestoreProgress, RestoreRequest, Restored, Source};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct Physical {
    pub policy: Policy,
    pub pg: PgSource,
}

#[async_trait::async_trait]
impl Source for Physical {
    fn kind(&self) -> SourceKind {
        SourceKind::PostgresPhysical
    }

    async fn backup(&self, repo: &Writer, opts: &BackupOptions, guard: &LockGuard) -> Result<Sidecar> {
        backup_physical(&self.policy, &self.pg, repo, opts, guard).await
    }

    async fn restore(&self, repo: &Unlocked, req: &RestoreRequest) -> Result<Restored> {
        if req.target_dsn.is_some() {
            return Err(Error::usage("--target-dsn applies to logical PostgreSQL restores only"));
        }
        if !req.includes.is_empty() || req.overwrite {
            return Err(Error::usage("--include and --overwrite apply to volume restores only"));
        }
        let target = req.target.clone().ok_or_else(|| Error::usage("a physical restore needs --target DIR"))?;
        let snap = match &req.snapshot {
            Some(id) => repo.find_snapshot(id).await?,
            None => req.recovery.choose(&repo.snapshots().await?)?,
        };
        let t0 = std::time::Instant::now();
        let delta = Delta { on: req.delta, checksum: req.checksum, records: req.records.clone() };
        let prepared = prepare(&self.policy, repo, &snap, &target, &req.recovery, &req.progress, &delta).await?;
        let mut out = prepared.summary(&snap, &target, &req.recovery, t0);
        if !req.start {
            out.warnings.push(format!(
                "start the server as the data directory's owner; once recovery has finished, delete {} (it holds a copy of the identity)",
                prepared.identity.dir.display()
            ));
            prepared.identity.keep();
            return Ok(Restored::Physical(out));
        }
        let mut server = self.server(&target, req.port, prepared.uid);
        server.socket = req.socket_dir.clone();
        server.listen = req.listen.clone();
        let t1 = std::time::Instant::now();
        let rec = server.start_and_wait(repo).await;
        out.seconds_recovery = t1.elapsed().as_secs_f64();
        let rec = rec?;
        drop(prepared.identity);
        // Through the handle: the running server's user could have put a link in the way.
        let _ = prepared.dir.remove_all(&Path::new(handover::WORK).join("spool"));
        out.started = true;
        out.port = Some(req.port);
        out.socket_dir = Some(server.socket_dir().display().to_string());
        out.connect = server.psql();
        out.recovered_lsn = Some(rec.lsn);
        out.timeline = Some(rec.timeline);
        out.last_transaction = rec.last_transaction;
        match rec.gap {
            Some(gap) => Err(gap),
            None => Ok(Restored::Physical(out)),
        }
    }

    async fn drill(&self, repo: &Unlocked, snap: &Sidecar, env: &mut dyn DrillEnv) -> Option<Drilled> {
        // One phase while it runs (a failure names "restore and recovery"), two in the report.
        const PHASE: &str = "restore and recovery";
        let pg_info = snap.pg();
        let target = env.dir().join("data");
        env.begin(PHASE);
        let t0 = std::time::Instant::now();
        let fail = |env: &mut dyn DrillEnv, e: Error| {
            env.record(PHASE, t0.elapsed().as_secs_f64(), &Err(e));
            None
        };
        let port = match env.port() {
            Ok(p) => p,
            Err(e) => return fail(env, e),
        };
        let recovery = RecoveryTarget::default();
        let prepared =
            match prepare(&self.policy, repo, snap, &target, &recovery, &RestoreProgress::default(), &Delta::default())
                .await
            {
                Ok(p) => p,
                Err(e) => return fail(env, e),
            };
        let restored = t0.elapsed().as_secs_f64();
        let server = self.server(&target, port, prepared.uid);
        env.adopt(server.clone());
        let t1 = std::time::Instant::now();
        let rec = match server.start_and_wait(repo).await {
            Ok(Recovered { gap: Some(gap), .. }) | Err(gap) => return fail(env, gap),
            Ok(r) => r,
        };
        drop(prepared.identity);
        let detail = format!("{} files, {} bytes from snapshot {}", prepared.files, prepared.bytes, snap.id);
        env.record("fetch, decrypt, write", restored, &Ok(detail));
        let detail = format!("recovered to {} on timeline {}", rec.lsn, rec.timeline);
        env.record("server start and WAL replay", t1.elapsed().as_secs_f64(), &Ok(detail));
        env.note_recovery(
            pg_info.map(|p| p.start_wal.to_string()),
            Some(rec.lsn.clone()),
            rec.last_transaction.clone(),
        );
        // The newest recovered transaction; without one replayed, the end of the backup.
        let at = rec.last_transaction.as_deref().and_then(super::recovery::parse_time).or(pg_info.map(|p| p.stop_time));
        Some(Drilled { at, tree: None })
    }
}

/// The WAL a backup needs: from the segment of its start to the segment holding the last
/// byte before its stop LSN. A stop exactly on a segment boundary ends in the segment before
/// (waiting for the next one, which may never fill, hung the backup).
pub fn backup_wal_range(tli: u32, start: u64, stop: u64, seg_size: u64) -> (WalName, WalName) {
    let first = WalName::for_lsn(tli, start, seg_size);
    let last = WalName::for_lsn(tli, stop.saturating_sub(1).max(start), seg_size);
    (first, last)
}

/// What `pg_stat_archiver` says.
struct Archiver {
    failed_count: i64,
    last_failed_wal: Option<String>,
    last_failed_time: Option<String>,
}

async fn archiver(c: &tokio_postgres::Client, dsn: &str) -> Result<Archiver> {
    let row = c
        .query_one("SELECT failed_count, last_failed_wal, last_failed_time::text FROM pg_stat_archiver", &[])
        .await
        .map_err(|e| db_error(dsn, "read pg_stat_archiver", e))?;
    Ok(Archiver { failed_count: row.get(0), last_failed_wal: row.get(1), last_failed_time: row.get(2) })
}

/// Wait until the repository holds every segment of `range`. Three new archiver failures
/// (PostgreSQL's own retry count before it pauses a minute) fail the backup at once, naming
/// the segment and when it last failed.
#[allow(clippy::too_many_arguments)]
async fn wait_archived(
    c: &tokio_postgres::Client,
    dsn: &str,
    repo: &Writer,
    cluster: u64,
    range: (&WalName, &WalName),
    seg_size: u64,
    failed_before: i64,
    timeout: std::time::Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let Some(missing) = archive::first_missing(repo, cluster, range.0, range.1, seg_size).await? else {
            return Ok(());
        };
        let a = archiver(c, dsn).await?;
        if a.failed_count >= failed_before + 3 {
            return Err(Error::database(format!(
                "WAL archiving is failing: segment {} failed to archive (last at {}); {missing} is not in the repository, so the snapshot is not committed",
                a.last_failed_wal.unwrap_or_else(|| "?".into()),
                a.last_failed_time.unwrap_or_else(|| "?".into()),
            ))
            .with_hint("check archive_command (veza-dr wal-push <policy> %p) and the PostgreSQL server log"));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::database(format!(
                "WAL segment {missing} was not archived within {}s: the snapshot is not committed",
                timeout.as_secs()
            ))
            .with_hint(
                "WAL archiving is not working: check archive_command (veza-dr wal-push <policy> %p) and the server log",
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

impl Physical {
    fn server(&self, data: &Path, port: u16, uid: u32) -> Server {
        Server {
            bin_dir: self.pg.bin_dir.clone(),
            data: data.to_path_buf(),
            port,
            uid,
            dsn: self.pg.dsn.config().ok(),
            ..Server::default()
        }
    }
}

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
    // A backup taken from a standby must restore as a server that recovers and promotes.
    "standby.signal",
    "recovery.signal",
    "veza-dr-restore",
];

async fn backup_physical(
    policy: &Policy,
    pg: &PgSource,
    repo: &Writer,
    opts: &BackupOptions,
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
    let cluster: u64 = sysid.parse().map_err(|_| {
        Error::database(format!("the server reports a system identifier `{sysid}` veza-dr cannot read"))
    })?;
    archive::check_cluster(repo, cluster).await?;
    let failed_before = archiver(&c, &dsn).await?.failed_count;
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
    let kind = SourceKind::PostgresPhysical;
    // With data checksums, pages are checked as they are read.
    let checksums = one_text(&c, &dsn, "SELECT current_setting('data_checksums')").await? == "on";
    let basis = PageBasis {
        system_identifier: sysid.clone(),
        timeline: tli as u32,
        start_lsn: parse_lsn(&start_lsn)
            .ok_or_else(|| Error::database(format!("pg_backup_start returned `{start_lsn}`, not an LSN")))?,
    };
    let read = PgRead { basis, checksums };
    let mut pending = prepare_tree(policy, repo, opts, kind, &data_dir, &excludes, &tablespaces, Some(read)).await?;

    // pg_backup_stop switches to a new segment; veza-dr then waits for the repository itself,
    // watching pg_stat_archiver, so a broken archive_command is named within seconds.
    let stop_sql = if version >= 150000 {
        "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)"
    } else {
        "SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, false)"
    };
    let timeout = wal_timeout();
    let row = tokio::time::timeout(timeout, c.query_one(stop_sql, &[]))
        .await
        .map_err(|_| {
            Error::database(format!("pg_backup_stop did not return within {}s", timeout.as_secs()))
                .with_hint("see the PostgreSQL server log")
        })?
        .map_err(|e| db_error(&dsn, "stop the backup", e))?;
    let stop_lsn: String = row.get(0);
    let labelfile: String = row.get(1);
    let spcmap: Option<String> = row.get(2);
    let stop_time = chrono::Utc::now();

    let (start, stop) = (parse_lsn(&start_lsn).unwrap_or(0), parse_lsn(&stop_lsn).unwrap_or(0));
    let (first, last) = backup_wal_range(tli as u32, start, stop, seg_size);
    wait_archived(&c, &dsn, repo, cluster, (&first, &last), seg_size, failed_before, timeout).await?;

    pending.manifest.extra = Some(PgLabel { backup_label: labelfile, tablespace_map: spcmap.unwrap_or_default() });
    pending.sidecar.postgres = Some(PgMeta::Physical(PgInfo {
        version,
        system_identifier: sysid,
        timeline: tli as u32,
        start_lsn,
        stop_lsn,
        start_wal: first,
        stop_wal: last,
        stop_time,
        wal_segment_size: seg_size,
        data_dir,
    }));
    commit(repo, guard, pending).await
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
    /// Where the started server's socket is, and the commands that reach it.
    pub socket_dir: Option<String>,
    pub connect: Vec<String>,
    pub recovered_lsn: Option<String>,
    pub timeline: Option<i32>,
    pub last_transaction: Option<String>,
    pub seconds_restore: f64,
    pub seconds_recovery: f64,
    /// With `--delta`: what was kept, rewritten and removed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<crate::pipeline::delta::DeltaStats>,
    pub warnings: Vec<String>,
}

/// A restored data directory, ready for the server to start and recover.
struct Prepared {
    files: u64,
    bytes: u64,
    warnings: Vec<String>,
    uid: u32,
    identity: IdentityCopy,
    delta: Option<crate::pipeline::delta::DeltaStats>,
    /// The target's handle, opened once at the start (`SafeDir::open_target`).
    dir: Arc<SafeDir>,
}

impl Prepared {
    fn summary(
        &self,
        snap: &Sidecar,
        target: &Path,
        recovery: &RecoveryTarget,
        t0: std::time::Instant,
    ) -> PhysicalSummary {
        PhysicalSummary {
            snapshot: snap.id.to_string(),
            target: target.display().to_string(),
            recovery_target: recovery.describe(),
            files: self.files,
            bytes: self.bytes,
            started: false,
            port: None,
            socket_dir: None,
            connect: vec![],
            recovered_lsn: None,
            timeline: None,
            last_transaction: None,
            seconds_restore: t0.elapsed().as_secs_f64(),
            delta: self.delta.clone(),
            seconds_recovery: 0.0,
            warnings: self.warnings.clone(),
        }
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn conf_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// How `prepare` treats an existing target, and where it records what it restored.
#[derive(Default)]
struct Delta {
    on: bool,
    checksum: bool,
    records: Option<PathBuf>,
}

/// Restore `snap` into `target` and write what recovery needs.
async fn prepare(
    policy: &Policy,
    repo: &Unlocked,
    snap: &Sidecar,
    target: &Path,
    recovery: &RecoveryTarget,
    progress: &RestoreProgress,
    d: &Delta,
) -> Result<Prepared> {
    let settings = recovery.settings()?;
    let delta = d.on;
    // Opened once: the target's parent may be the server user's, who could put a link in
    // the target's place; every step below goes through this handle.
    let dir = Arc::new(SafeDir::open_target(target)?);
    if delta {
        // Never under a running server; a stale pid file from a crash is the operator's call.
        if dir.list(Path::new(""))?.iter().any(|(n, _)| n == "postmaster.pid") {
            return Err(Error::usage(format!(
                "{} holds postmaster.pid: a server may be running on it",
                target.display()
            ))
            .with_hint("stop it (pg_ctl -D DIR stop); if it crashed, remove the stale postmaster.pid, then run the delta restore again"));
        }
        // Tablespaces an earlier restore moved beside the target are compared in place.
        handover::bring_back_tablespaces(&dir, target)?;
    }
    handover::check_tablespace_home(target)?;
    let opts = tree::Options {
        snapshot: snap.id.to_string(),
        target: target.to_path_buf(),
        includes: vec![],
        overwrite: false,
        delta,
        checksum: d.checksum,
        records: d.records.clone(),
        bytes_done: progress.done.clone(),
        bytes_total: progress.total.clone(),
        dir: Some(dir.clone()),
    };
    let mut summary = tree::restore(repo, &opts).await?;
    let label = summary.label.as_ref().map(|l| l.backup_label.as_str()).unwrap_or("");
    if label.is_empty() {
        return Err(Error::damaged(format!("snapshot {} has no backup_label: it is not a physical backup", snap.id)));
    }
    let io = |what: &str, p: &Path, e: std::io::Error| Error::io(what, p, e);
    let tablespaces = handover::link_tablespaces(&dir, target)?;

    // What wal-fetch needs: the policy (references only) and a spool inside the restored
    // cluster; the identity outside it.
    let (uid, gid) = summary.owner;
    let identity = IdentityCopy::create(repo.identity(), target, uid, gid)?;
    let policy_copy = target.join(handover::WORK).join(format!("{}.toml", policy.name));
    let policy_bytes = std::fs::read(&policy.path).map_err(|e| io("read policy", &policy.path, e))?;
    let exe = std::env::current_exe().map_err(|e| Error::failed(format!("cannot find the veza-dr binary: {e}")))?;
    let cluster = snap.pg().map(|p| p.system_identifier.clone()).unwrap_or_default();
    // A restore from a replica fetches its WAL from the same replica.
    let via = policy.via.as_deref().map(|r| format!(" --repository {}", shell_quote(r))).unwrap_or_default();
    let restore_command = format!(
        "{} wal-fetch {} %f %p --identity {} --spool {} --cluster {}{via}",
        shell_quote(&exe.display().to_string()),
        shell_quote(&policy_copy.display().to_string()),
        shell_quote(&identity.file.display().to_string()),
        shell_quote(&archive::spool_dir(target).display().to_string()),
        shell_quote(&cluster)
    );
    let mut conf = format!("\n# added by veza-dr restore of snapshot {} ({})\n", snap.id, recovery.describe());
    conf += &format!("restore_command = {}\n", conf_quote(&restore_command));
    conf += "archive_mode = 'off'\narchive_command = ''\n";
    for (k, v) in &settings {
        conf += &format!("{k} = {}\n", conf_quote(v));
    }
    handover::write_recovery(&dir, label, &policy.name, &policy_bytes, &conf)?;

    // Hand the tree to the data directory's owner, 0700 as PostgreSQL requires, through the
    // handles (never `chown -R` by name: a link in the tree or in the target's place is the
    // server user's to plant).
    let kept = dir.chown_tree(uid, gid) + tablespaces.as_ref().map_or(0, |h| h.chown_tree(uid, gid));
    if kept > 0 && nix::unistd::geteuid().is_root() {
        summary.warnings.push(format!("{kept} entries of the restored tree could not be given to uid {uid}"));
    }
    dir.chmod_root(0o700)?;
    // backup_label, recovery.signal and the recovery settings came after the tree's own sync:
    // without them the copy is no valid recovery, so they are on disk before "done" too.
    dir.sync()?;
    // Recorded after the hand-over (chown moves every file's ctime), without the files written
    // here: they no longer hold the snapshot's bytes.
    let mut record = summary.record.take();
    if let Some(r) = record.as_mut() {
        r.forget(&["backup_label", "postgresql.auto.conf", "recovery.signal", "tablespace_map"]);
    }
    crate::pipeline::record::save_or_warn(
        record,
        target,
        Some(dir.clone()),
        d.records.as_deref(),
        &mut summary.warnings,
    )
    .await;
    Ok(Prepared {
        files: summary.files,
        bytes: summary.bytes,
        warnings: summary.warnings,
        uid,
        identity,
        delta: summary.delta,
        dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_on_a_segment_boundary_ends_in_the_segment_before() {
        let seg = 16u64 << 20;
        let (first, last) = backup_wal_range(1, parse_lsn("0/3000028").unwrap(), parse_lsn("0/5000000").unwrap(), seg);
        assert_eq!((first.as_str(), last.as_str()), ("000000010000000000000003", "000000010000000000000004"));
        let (_, last) = backup_wal_range(1, parse_lsn("0/3000028").unwrap(), parse_lsn("0/5000100").unwrap(), seg);
        assert_eq!(last.as_str(), "000000010000000000000005");
        let (first, last) = backup_wal_range(1, parse_lsn("0/3000028").unwrap(), parse_lsn("0/3000028").unwrap(), seg);
        assert_eq!(first, last);
    }
}
