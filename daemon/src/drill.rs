//! Restore drills: prove that a backup restores and measure the real RTO and RPO.
//!
//! PostgreSQL physical: restore the newest snapshot into a sandbox, start a throw-away server
//! on a free port (as the data directory's owner), replay archived WAL to the newest point,
//! run `pg_amcheck` on every database and the policy's checks, then stop the server and remove
//! the sandbox, also when a step fails. Every phase is timed. Measured RTO is the wall time
//! from the drill's start to a server that passes its checks; measured RPO is the time between
//! the drill's start and the newest transaction recovered.
//!
//! The report is signed (ed25519, key in the state directory) and stored in the repository
//! under `reports/<policy>/` and in the report directory, as JSON and Markdown.

use crate::crypto::Opener;
use crate::error::{Error, Result};
use crate::pgrestore::{PhysicalOptions, RecoveryTarget, Server};
use crate::policy::{PgMethod, Policy, Source};
use crate::repository::Repo;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Phase {
    pub name: String,
    pub seconds: f64,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckResult {
    pub name: String,
    /// The SQL, or the shell command of a command check.
    pub sql: String,
    pub expected: String,
    pub got: String,
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Objective {
    pub measured_seconds: Option<f64>,
    pub objective_seconds: Option<f64>,
    pub verdict: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Report {
    pub format: u32,
    pub id: String,
    pub policy: String,
    pub host: String,
    pub started: DateTime<Utc>,
    pub finished: DateTime<Utc>,
    /// pass, pass-with-warning or fail.
    pub verdict: String,
    pub failure: Option<String>,
    pub snapshot: Option<String>,
    pub wal_from: Option<String>,
    pub recovered_lsn: Option<String>,
    pub last_transaction: Option<String>,
    /// How the snapshot was chosen: `newest`, `random-older` or `named`.
    #[serde(default)]
    pub choice: String,
    pub phases: Vec<Phase>,
    pub checks: Vec<CheckResult>,
    pub rto: Objective,
    pub rpo: Objective,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<Signature>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Signature {
    pub algorithm: String,
    pub public_key: String,
    pub value: String,
}

pub struct Options {
    pub state_dir: PathBuf,
    pub report_dir: PathBuf,
    /// The restore-side identity; `None` gives a failed report that says so.
    pub identity_file: Option<PathBuf>,
    /// A snapshot id or prefix; default the newest (and, by policy, a random older one).
    pub snapshot: Option<String>,
    /// Runbook-step plugins, for `[verify] rehearse`.
    pub plugins_dir: PathBuf,
}

/// pass, pass-with-warning (within 20% of the objective) or fail.
pub fn judge(measured: Option<f64>, objective: Option<f64>) -> String {
    match (measured, objective) {
        (Some(m), Some(o)) if m > o => "fail".into(),
        (Some(m), Some(o)) if m > 0.8 * o => "pass-with-warning".into(),
        (Some(_), Some(_)) => "pass".into(),
        (None, Some(_)) => "fail".into(),
        _ => "not-set".into(),
    }
}

/// The drill's scratch space and the server running in it. Dropping it (also when the drill
/// is stopped at its time limit) stops the server and removes the directory.
struct Sandbox {
    dir: tempfile::TempDir,
    server: Option<Server>,
    /// The phase in progress, named when the time limit stops the drill.
    phase: &'static str,
}

impl Sandbox {
    fn new() -> Result<Sandbox> {
        let dir = tempfile::Builder::new()
            .prefix("veza-drill-")
            .tempdir()
            .map_err(|e| Error::failed(format!("cannot create the drill sandbox: {e}")))?;
        // Traversable by the database user that runs the throw-away server.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755));
        Ok(Sandbox { dir, server: None, phase: "setup" })
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.uid = owner_uid(&s.data);
            if s.data.join("postmaster.pid").exists() {
                s.stop();
            }
            let _ = std::fs::remove_dir_all(s.socket_dir());
        }
    }
}

/// Record a phase's outcome; the first failure becomes the report's failure.
fn phase(report: &mut Report, name: &str, t: Instant, r: &Result<String>) -> bool {
    let (ok, detail) = match r {
        Ok(d) => (true, d.clone()),
        Err(e) => (false, e.message.clone()),
    };
    report.phases.push(Phase { name: name.into(), seconds: t.elapsed().as_secs_f64(), ok, detail: detail.clone() });
    if !ok {
        report.failure.get_or_insert(format!("{name}: {detail}"));
    }
    ok
}

/// Drill a policy: the chosen (or newest) snapshot, and with `random-older` also a random
/// older one. Each drill gives its own signed report; a failing drill still returns one.
pub async fn run_all(repo: &Repo, policy: &Policy, o: &Options) -> Result<Vec<Report>> {
    let choice = if o.snapshot.is_some() { "named" } else { "newest" };
    let first = run(repo, policy, o, o.snapshot.clone(), choice).await?;
    let newest = first.snapshot.clone();
    let mut out = vec![first];
    if policy.verify.random_older && o.snapshot.is_none() {
        let snaps = repo.snapshots().await.unwrap_or_default();
        let older: Vec<String> = snaps
            .iter()
            .filter(|s| Some(&s.id) != newest.as_ref() && kind_matches(policy, s))
            .map(|s| s.id.clone())
            .collect();
        // The generator is not Send: pick before the next await.
        let pick = { rand::seq::IndexedRandom::choose(&older[..], &mut rand::rng()).cloned() };
        if let Some(id) = pick {
            out.push(run(repo, policy, o, Some(id), "random-older").await?);
        }
    }
    Ok(out)
}

fn kind_matches(policy: &Policy, s: &crate::repository::format::Sidecar) -> bool {
    match &policy.source {
        Source::Postgres(pg) if pg.method == PgMethod::Physical => s.postgres.is_some(),
        _ => true,
    }
}

/// One drill of one snapshot (`None`: the newest). Every failure ends up in the report.
pub async fn run(repo: &Repo, policy: &Policy, o: &Options, snapshot: Option<String>, choice: &str) -> Result<Report> {
    let t0 = Instant::now();
    let started = Utc::now();
    let mut rep = new_report(policy, started);
    rep.choice = choice.to_string();
    if choice == "random-older" {
        rep.id.push_str("-older");
    }
    let limit =
        policy.verify.time_limit.map(|d| d.0).unwrap_or_else(|| {
            policy.objectives.rto.map(|d| d.0 * 2).unwrap_or(std::time::Duration::from_secs(24 * 3600))
        });
    let mut sb = Sandbox::new()?;
    let work = drill_kind(repo, policy, o, snapshot, &mut rep, &mut sb);
    let recovered_at = match tokio::time::timeout(limit, work).await {
        Ok(r) => r,
        Err(_) => {
            let during = sb.phase;
            let limit = humantime::format_duration(limit);
            rep.phases.push(Phase {
                name: during.into(),
                seconds: 0.0,
                ok: false,
                detail: format!("stopped: the drill exceeded its time limit of {limit}"),
            });
            rep.failure = Some(format!("time limit: the drill exceeded its limit of {limit} during {during}"));
            None
        }
    };
    let elapsed = t0.elapsed();
    drop(sb);
    // Rehearse the runbooks (a dry run of each) once per drill, after the restore test, so
    // their time is not part of the measured RTO.
    if choice != "random-older" {
        for name in &policy.verify.rehearse {
            let t = Instant::now();
            let r = rehearse(policy, name, o).await;
            phase(&mut rep, &format!("rehearse runbook {name}"), t, &r);
        }
    }
    finish(repo, rep, elapsed, recovered_at, o).await
}

/// A dry run of a runbook: every step's `plan`, nothing changed.
async fn rehearse(policy: &Policy, name: &str, o: &Options) -> Result<String> {
    let dir = policy.path.parent().unwrap_or(Path::new("."));
    let rb = crate::runbook::find(dir, name)?;
    let opts = crate::runbook::Options {
        plugins_dir: o.plugins_dir.clone(),
        cache_dir: Some(o.state_dir.join("plugins")),
        audit_log: o.state_dir.join("runbooks").join("audit.log"),
        dry_run: true,
        from: None,
        who: format!("drill of policy {}", policy.name),
    };
    let rt = tokio::runtime::Handle::current();
    let report = tokio::task::spawn_blocking(move || crate::runbook::execute(&rb, &opts, &rt, |_| {}))
        .await
        .map_err(|e| Error::failed(format!("the rehearsal thread failed: {e}")))??;
    let steps: Vec<String> = report
        .steps
        .iter()
        .map(|s| match &s.error {
            Some(e) => format!("{}: {e}", s.name),
            None => format!("{}: {}", s.name, s.plan.join("; ")),
        })
        .collect();
    if report.ok {
        Ok(format!("{} steps planned: {}", steps.len(), steps.join(" | ")))
    } else {
        let failed: Vec<&String> =
            report.steps.iter().zip(&steps).filter(|(s, _)| s.error.is_some()).map(|(_, line)| line).collect();
        Err(Error::failed(format!(
            "cannot be planned: {}",
            failed.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" | ")
        )))
    }
}

/// The kind-specific part; returns the newest recovered point (for the RPO).
async fn drill_kind(
    repo: &Repo,
    policy: &Policy,
    o: &Options,
    snapshot: Option<String>,
    rep: &mut Report,
    sb: &mut Sandbox,
) -> Option<DateTime<Utc>> {
    sb.phase = "open identity";
    let t = Instant::now();
    let opened = match &o.identity_file {
        None => Err(Error::crypto(format!("a drill of policy {} needs the private identity", policy.name))),
        Some(f) => Opener::from_file(f),
    };
    let r = opened.as_ref().map(|_| "identity loaded".to_string()).map_err(|e| Error::new(e.kind, e.message.clone()));
    if !phase(rep, "open identity", t, &r) {
        return None;
    }
    let opener = opened.ok()?;
    let identity = o.identity_file.clone()?;
    sb.phase = "choose snapshot";
    let t = Instant::now();
    let snap = match snapshot.as_deref() {
        Some(id) => repo.find_snapshot(id).await,
        None => repo.snapshots().await.and_then(|all| {
            all.into_iter()
                .rev()
                .find(|s| kind_matches(policy, s))
                .ok_or_else(|| Error::not_found(format!("policy {} has no snapshot yet", policy.name)))
        }),
    };
    let r = snap
        .as_ref()
        .map(|s| format!("snapshot {} of {}", s.id, s.started.format("%Y-%m-%d %H:%M:%S UTC")))
        .map_err(|e| Error::new(e.kind, e.message.clone()));
    if !phase(rep, "choose snapshot", t, &r) {
        return None;
    }
    let snap = snap.ok()?;
    rep.snapshot = Some(snap.id.clone());
    match &policy.source {
        Source::Volume(_) => volume(repo, policy, &opener, &snap, rep, sb).await,
        Source::Postgres(pg) if pg.method == PgMethod::Physical => {
            physical(repo, policy, pg, &opener, &identity, &snap, rep, sb).await
        }
        Source::Postgres(pg) => logical(repo, policy, pg, &opener, &snap, rep, sb).await,
    }
}

fn new_report(policy: &Policy, started: DateTime<Utc>) -> Report {
    Report {
        format: 1,
        // Unique even for drills started in the same second (a report is never overwritten).
        id: format!("{}-{}", started.format("%Y%m%dT%H%M%SZ"), hex::encode(rand::random::<[u8; 3]>())),
        policy: policy.name.clone(),
        host: crate::repository::lock::hostname(),
        started,
        finished: started,
        verdict: "fail".into(),
        failure: None,
        snapshot: None,
        wal_from: None,
        recovered_lsn: None,
        last_transaction: None,
        choice: String::new(),
        phases: vec![],
        checks: vec![],
        rto: Objective {
            measured_seconds: None,
            objective_seconds: policy.objectives.rto.map(|d| d.0.as_secs_f64()),
            verdict: String::new(),
        },
        rpo: Objective {
            measured_seconds: None,
            objective_seconds: policy.objectives.rpo.map(|d| d.0.as_secs_f64()),
            verdict: String::new(),
        },
        signature: None,
    }
}

/// Measure RTO and RPO, judge, sign and store. RTO: start of the drill to a server (or tree)
/// that passed its checks; RPO: start of the drill to the newest recovered point.
async fn finish(
    repo: &Repo,
    mut rep: Report,
    elapsed: std::time::Duration,
    recovered_at: Option<DateTime<Utc>>,
    o: &Options,
) -> Result<Report> {
    if rep.failure.is_none() {
        rep.rto.measured_seconds = Some(elapsed.as_secs_f64());
    }
    let started = rep.started;
    rep.rpo.measured_seconds = recovered_at.map(|t| (started - t).num_milliseconds().max(0) as f64 / 1000.0);
    rep.rto.verdict = judge(rep.rto.measured_seconds, rep.rto.objective_seconds);
    rep.rpo.verdict = judge(rep.rpo.measured_seconds, rep.rpo.objective_seconds);
    rep.verdict = if rep.failure.is_some() || rep.rto.verdict == "fail" || rep.rpo.verdict == "fail" {
        "fail".into()
    } else if rep.rto.verdict == "pass-with-warning" || rep.rpo.verdict == "pass-with-warning" {
        "pass-with-warning".into()
    } else {
        "pass".into()
    };
    if rep.failure.is_none() && rep.verdict == "fail" {
        rep.failure = Some(format!("objectives missed: RTO {}, RPO {}", rep.rto.verdict, rep.rpo.verdict));
    }
    rep.finished = Utc::now();
    sign(&mut rep, &o.state_dir)?;
    store(repo, &rep, &o.report_dir).await?;
    Ok(rep)
}

fn drill_port(policy: &Policy) -> Result<u16> {
    match policy.verify.port {
        Some(p) => Ok(p),
        None => std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| Error::failed(format!("cannot find a free port for the drill server: {e}"))),
    }
}

/// PostgreSQL physical: restore into the sandbox, start, replay WAL to the newest point,
/// pg_amcheck, checks.
#[allow(clippy::too_many_arguments)]
async fn physical(
    repo: &Repo,
    policy: &Policy,
    pg: &crate::policy::PgSource,
    opener: &Opener,
    identity: &Path,
    snap: &crate::repository::format::Sidecar,
    rep: &mut Report,
    sb: &mut Sandbox,
) -> Option<DateTime<Utc>> {
    let pg_info = snap.postgres.as_ref();
    rep.wal_from = pg_info.and_then(|p| p.get("start-wal")?.as_str().map(String::from));
    let backup_end: Option<DateTime<Utc>> = pg_info.and_then(|p| p.get("stop-time")?.as_str()?.parse().ok());
    let target = sb.dir.path().join("data");
    sb.phase = "restore and recovery";
    let t = Instant::now();
    let port = match drill_port(policy) {
        Ok(p) => p,
        Err(e) => {
            phase(rep, "restore and recovery", t, &Err(e));
            return None;
        }
    };
    sb.server =
        Some(Server { bin_dir: pg.bin_dir.clone(), data: target.clone(), port, uid: 0, dsn: pg.dsn.resolve().ok() });
    let popts = PhysicalOptions {
        snapshot: Some(snap.id.clone()),
        target_dir: target.clone(),
        recovery: RecoveryTarget::default(),
        start: true,
        port,
        identity_file: Some(identity.to_path_buf()),
        bytes_done: Default::default(),
        bytes_total: Default::default(),
    };
    let s = match crate::pgrestore::restore_physical(repo, opener, policy, pg, &popts).await {
        Ok(s) => s,
        Err(e) => {
            phase(rep, "restore and recovery", t, &Err(e));
            return None;
        }
    };
    rep.phases.push(Phase {
        name: "fetch, decrypt, write".into(),
        seconds: s.seconds_restore,
        ok: true,
        detail: format!("{} files, {} bytes from snapshot {}", s.files, s.bytes, s.snapshot),
    });
    rep.phases.push(Phase {
        name: "server start and WAL replay".into(),
        seconds: s.seconds_recovery,
        ok: true,
        detail: format!(
            "recovered to {} on timeline {}",
            s.recovered_lsn.as_deref().unwrap_or("?"),
            s.timeline.unwrap_or(0)
        ),
    });
    rep.recovered_lsn = s.recovered_lsn.clone();
    rep.last_transaction = s.last_transaction.clone();
    if let Some(server) = sb.server.as_mut() {
        server.uid = owner_uid(&target);
    }
    if !server_checks(policy, pg, rep, sb).await {
        return None;
    }
    // The newest recovered transaction; without one replayed, the end of the backup.
    rep.last_transaction.as_deref().and_then(parse_pg_time).or(backup_end)
}

/// pg_amcheck and the policy's checks on the sandbox's running server.
async fn server_checks(policy: &Policy, pg: &crate::policy::PgSource, rep: &mut Report, sb: &mut Sandbox) -> bool {
    let Some(server) = sb.server.as_ref() else { return false };
    sb.phase = "pg_amcheck";
    let t = Instant::now();
    let r = amcheck(server, pg).await;
    if !phase(rep, "pg_amcheck", t, &r) {
        return false;
    }
    if policy.verify.check.is_empty() {
        return true;
    }
    sb.phase = "checks";
    let t = Instant::now();
    let r = checks(server, policy, rep, sb.dir.path()).await;
    phase(rep, "checks", t, &r)
}

/// PostgreSQL logical: a new throw-away cluster in the sandbox, the dumps loaded with
/// pg_restore, then pg_amcheck and the checks.
async fn logical(
    repo: &Repo,
    policy: &Policy,
    pg: &crate::policy::PgSource,
    opener: &Opener,
    snap: &crate::repository::format::Sidecar,
    rep: &mut Report,
    sb: &mut Sandbox,
) -> Option<DateTime<Utc>> {
    sb.phase = "create and start a cluster";
    let t = Instant::now();
    let made = scratch_cluster(policy, pg, sb).await;
    let r = made.as_ref().map(|_| "initdb and start".to_string()).map_err(|e| Error::new(e.kind, e.message.clone()));
    if !phase(rep, "create and start a cluster", t, &r) {
        return None;
    }
    let dsn = made.ok()?;
    sb.phase = "fetch, decrypt, pg_restore";
    let t = Instant::now();
    let r = crate::pgrestore::restore_logical(repo, opener, pg, &snap.id, &dsn, 2)
        .await
        .map(|(id, dbs)| format!("databases {} from snapshot {id}", dbs.join(", ")));
    if !phase(rep, "fetch, decrypt, pg_restore", t, &r) {
        return None;
    }
    // A dump is consistent as of its start.
    server_checks(policy, pg, rep, sb).await.then_some(snap.started)
}

/// initdb a new cluster in the sandbox as the database user (never root) and start it; returns
/// its DSN. Local connections are trusted: the socket directory is private to the server's
/// owner (and root), and restoring the globals may change the superuser's password. TCP on
/// 127.0.0.1 needs a random password nobody is told.
async fn scratch_cluster(policy: &Policy, pg: &crate::policy::PgSource, sb: &mut Sandbox) -> Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let data = sb.dir.path().join("data");
    let me = nix::unistd::geteuid();
    let uid = if me.is_root() {
        nix::unistd::User::from_name("postgres").ok().flatten().map(|u| u.uid.as_raw()).ok_or_else(|| {
            Error::failed("veza-dr runs as root and there is no `postgres` user to run the drill's server")
        })?
    } else {
        me.as_raw()
    };
    let password = hex::encode(rand::random::<[u8; 16]>());
    let pwfile = sb.dir.path().join("pw");
    std::fs::write(&pwfile, &password).map_err(|e| Error::io("write", &pwfile, e))?;
    std::fs::create_dir_all(&data).map_err(|e| Error::io("create", &data, e))?;
    for p in [&data, &pwfile] {
        let _ = std::os::unix::fs::chown(p, Some(uid), None);
    }
    let _ = std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700));
    let _ = std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o600));
    let port = drill_port(policy)?;
    let server = Server {
        bin_dir: pg.bin_dir.clone(),
        data: data.clone(),
        port,
        uid,
        dsn: Some(format!("user=postgres password={password}")),
    };
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
        return Err(Error::new(
            crate::error::Kind::Database,
            format!("initdb failed: {}", String::from_utf8_lossy(&out.stderr).trim().replace('\n', " ")),
        ));
    }
    let work = data.join("veza-dr-restore");
    std::fs::create_dir_all(&work).map_err(|e| Error::io("create", &work, e))?;
    let _ = std::os::unix::fs::chown(&work, Some(uid), None);
    let dsn =
        format!("host={} port={port} user=postgres password={password} dbname=postgres", server.socket_dir().display());
    let server = sb.server.insert(server);
    server.start().await?;
    Ok(dsn)
}

/// A volume drill: restore into the sandbox, compare every file with the snapshot's record,
/// then run the policy's check commands in the restored tree.
async fn volume(
    repo: &Repo,
    policy: &Policy,
    opener: &Opener,
    snap: &crate::repository::format::Sidecar,
    rep: &mut Report,
    sb: &mut Sandbox,
) -> Option<DateTime<Utc>> {
    let target = sb.dir.path().join("tree");
    sb.phase = "fetch, decrypt, write";
    let t = Instant::now();
    let ropts = crate::restore::Options {
        snapshot: snap.id.clone(),
        target: target.clone(),
        includes: vec![],
        overwrite: false,
        bytes_done: Default::default(),
        bytes_total: Default::default(),
    };
    let restored = crate::restore::run(repo, opener, &ropts)
        .await
        .map(|s| format!("{} files, {} bytes from snapshot {}", s.files, s.bytes, s.snapshot));
    if !phase(rep, "fetch, decrypt, write", t, &restored) {
        return None;
    }
    sb.phase = "compare with recorded hashes";
    let t = Instant::now();
    let compared = compare_tree(repo, opener, snap, &target).await;
    if !phase(rep, "compare with recorded hashes", t, &compared) {
        return None;
    }
    if !policy.verify.check.is_empty() {
        sb.phase = "checks";
        let t = Instant::now();
        let r = run_checks(policy, rep, &target, &[], None).await;
        if !phase(rep, "checks", t, &r) {
            return None;
        }
    }
    // The data is as of the snapshot's start.
    Some(snap.started)
}

async fn compare_tree(
    repo: &Repo,
    opener: &Opener,
    snap: &crate::repository::format::Sidecar,
    target: &Path,
) -> Result<String> {
    use crate::repository::format::EntryKind;
    let m = repo.manifest(snap, opener).await?;
    let key = repo.chunk_key(&m.key_id, opener).await?;
    let chunker = repo.config.chunker;
    let files: Vec<(PathBuf, u64, Option<String>, String)> = m
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::File)
        .map(|e| (target.join(e.rel_path()), e.size, e.hash.clone(), e.display()))
        .collect();
    let n = files.len();
    let bad = tokio::task::spawn_blocking(move || {
        let mut bad = Vec::new();
        for (path, size, hash, name) in files {
            match crate::pipeline::backup::hash_file(&path, &key, chunker, None) {
                Ok((s, h)) if s == size && hash.as_deref() == Some(hex::encode(h).as_str()) => {}
                Ok(_) => bad.push(format!("{name} differs")),
                Err(e) => bad.push(format!("{name}: {e}")),
            }
        }
        bad
    })
    .await
    .map_err(|e| Error::failed(format!("compare failed: {e}")))?;
    if bad.is_empty() {
        Ok(format!("{n} files match the snapshot's hashes"))
    } else {
        Err(Error::damaged(format!(
            "{} of {n} files differ from the snapshot: {}",
            bad.len(),
            bad.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
        )))
    }
}

fn owner_uid(p: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map(|m| m.uid()).unwrap_or(0)
}

/// `2026-11-21 22:24:36.450001+00` as written by PostgreSQL in its log.
fn parse_pg_time(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    let with_minutes =
        if s.len() > 3 && s[s.len() - 3..].starts_with(['+', '-']) { format!("{s}:00") } else { s.to_string() };
    DateTime::parse_from_str(&with_minutes, "%Y-%m-%d %H:%M:%S%.f%:z").ok().map(|d| d.with_timezone(&Utc))
}

async fn amcheck(server: &Server, pg: &crate::policy::PgSource) -> Result<String> {
    let cfg = server.config();
    let mut c = tokio::process::Command::new(pg.bin_dir.join("pg_amcheck"));
    c.arg("--all")
        .arg("--install-missing")
        .arg("--host")
        .arg(server.socket_dir())
        .arg("--port")
        .arg(server.port.to_string());
    c.arg("--username").arg(cfg.get_user().unwrap_or("postgres"));
    if let Some(p) = cfg.get_password() {
        c.env("PGPASSWORD", String::from_utf8_lossy(p).into_owned());
    }
    let out = c.kill_on_drop(true).output().await.map_err(|e| Error::failed(format!("cannot run pg_amcheck: {e}")))?;
    if out.status.success() {
        Ok("every database checked: no corruption".into())
    } else {
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        Err(Error::damaged(format!(
            "pg_amcheck found problems: {}",
            text.trim().lines().take(3).collect::<Vec<_>>().join(" | ")
        )))
    }
}

/// The policy's checks against a drill server: SQL over a connection, commands with the
/// server's PGHOST/PGPORT/PGUSER/PGPASSWORD, in `cwd`.
async fn checks(server: &Server, policy: &Policy, rep: &mut Report, cwd: &Path) -> Result<String> {
    let cfg = server.config();
    let mut clients = std::collections::BTreeMap::new();
    for db in
        policy.verify.check.iter().filter(|c| c.sql.is_some()).map(|c| c.database.as_deref().unwrap_or("postgres"))
    {
        if clients.contains_key(db) {
            continue;
        }
        let mut c = cfg.clone();
        c.dbname(db);
        let (client, conn) = c
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| crate::source::postgres::db_error(&format!("drill server, database {db}"), "connect", e))?;
        tokio::spawn(conn);
        clients.insert(db.to_string(), client);
    }
    let mut env = vec![
        ("PGHOST".to_string(), server.socket_dir().display().to_string()),
        ("PGPORT".to_string(), server.port.to_string()),
        ("PGUSER".to_string(), cfg.get_user().unwrap_or("postgres").to_string()),
        ("PGDATABASE".to_string(), "postgres".to_string()),
    ];
    if let Some(pw) = cfg.get_password() {
        env.push(("PGPASSWORD".into(), String::from_utf8_lossy(pw).into_owned()));
    }
    run_checks(policy, rep, cwd, &env, Some(&clients)).await
}

/// Run every check: `sql` on `client`, `command` through `sh -c` in `cwd` with `env`.
async fn run_checks(
    policy: &Policy,
    rep: &mut Report,
    cwd: &Path,
    env: &[(String, String)],
    clients: Option<&std::collections::BTreeMap<String, tokio_postgres::Client>>,
) -> Result<String> {
    let mut failed = Vec::new();
    for (i, c) in policy.verify.check.iter().enumerate() {
        let name = c.name.clone().unwrap_or_else(|| format!("check {}", i + 1));
        let client = clients.and_then(|m| m.get(c.database.as_deref().unwrap_or("postgres")));
        let (text, (expected, got, ok)) = match (&c.sql, &c.command, client) {
            (Some(sql), _, Some(client)) => (sql.clone(), sql_check(client, sql, c.expect.as_ref()).await),
            (Some(sql), _, None) => (sql.clone(), ("a result".into(), "no database in this drill".into(), false)),
            (None, Some(cmd), _) => (cmd.clone(), command_check(cmd, cwd, env).await),
            (None, None, _) => (String::new(), ("a check".into(), "neither sql nor command".into(), false)),
        };
        if !ok {
            failed.push(format!("{name} (expected {expected}, got {got})"));
        }
        rep.checks.push(CheckResult { name, sql: text, expected, got, ok });
    }
    if failed.is_empty() {
        Ok(format!("{} checks passed", rep.checks.len()))
    } else {
        Err(Error::failed(format!("{} of {} checks failed: {}", failed.len(), rep.checks.len(), failed.join("; "))))
    }
}

/// (expected, got, ok) of one SQL check.
async fn sql_check(client: &tokio_postgres::Client, sql: &str, expect: Option<&toml::Value>) -> (String, String, bool) {
    let msgs = match client.simple_query(sql).await {
        Err(e) => {
            let msg = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string());
            return ("a result".into(), format!("error: {msg}"), false);
        }
        Ok(m) => m,
    };
    let rows: Vec<&tokio_postgres::SimpleQueryRow> = msgs
        .iter()
        .filter_map(|m| if let tokio_postgres::SimpleQueryMessage::Row(r) = m { Some(r) } else { None })
        .collect();
    let first = rows.first().and_then(|r| r.get(0)).unwrap_or("").to_string();
    match expect {
        None => ("true".into(), first.clone(), first == "t" || first == "true"),
        Some(toml::Value::Table(t)) if t.contains_key("min-rows") => {
            let min = t.get("min-rows").and_then(|v| v.as_integer()).unwrap_or(1);
            (format!("at least {min} rows"), format!("{} rows", rows.len()), rows.len() as i64 >= min)
        }
        Some(v) => {
            let want = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Boolean(true) => "t".into(),
                toml::Value::Boolean(false) => "f".into(),
                other => other.to_string(),
            };
            (want.clone(), first.clone(), first == want)
        }
    }
}

/// (expected, got, ok) of one command check: it passes by exiting 0.
async fn command_check(cmd: &str, cwd: &Path, env: &[(String, String)]) -> (String, String, bool) {
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(cwd)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await;
    match out {
        Err(e) => ("exit 0".into(), format!("cannot run sh: {e}"), false),
        Ok(o) if o.status.success() => ("exit 0".into(), "exit 0".into(), true),
        Ok(o) => {
            let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            let last: String = text.trim().lines().last().unwrap_or("").chars().take(200).collect();
            let code = o.status.code().map(|c| c.to_string()).unwrap_or_else(|| "a signal".into());
            (
                "exit 0".into(),
                if last.is_empty() { format!("exit {code}") } else { format!("exit {code}: {last}") },
                false,
            )
        }
    }
}

fn signing_key(state_dir: &Path) -> Result<ed25519_dalek::SigningKey> {
    let path = state_dir.join("signing.key");
    if let Ok(hexkey) = std::fs::read_to_string(&path) {
        if let Some(b) = crate::repository::format::parse_hex32(hexkey.trim()) {
            return Ok(ed25519_dalek::SigningKey::from_bytes(&b));
        }
    }
    std::fs::create_dir_all(state_dir).map_err(|e| Error::io("create state directory", state_dir, e))?;
    let key = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::io("create signing key", &path, e))?;
    f.write_all(hex::encode(key.to_bytes()).as_bytes()).map_err(|e| Error::io("write", &path, e))?;
    Ok(key)
}

/// The public key that signs this host's drill reports (created on first use).
pub fn public_key(state_dir: &Path) -> Result<String> {
    Ok(hex::encode(signing_key(state_dir)?.verifying_key().to_bytes()))
}

fn signed_bytes(rep: &Report) -> Vec<u8> {
    let mut unsigned = rep.clone();
    unsigned.signature = None;
    serde_json::to_vec(&unsigned).expect("serialisable")
}

fn sign(rep: &mut Report, state_dir: &Path) -> Result<()> {
    use ed25519_dalek::Signer;
    let key = signing_key(state_dir)?;
    let sig = key.sign(&signed_bytes(rep));
    rep.signature = Some(Signature {
        algorithm: "ed25519".into(),
        public_key: hex::encode(key.verifying_key().to_bytes()),
        value: hex::encode(sig.to_bytes()),
    });
    Ok(())
}

/// Check a report's signature. Returns the signing public key.
pub fn verify_report(text: &str) -> Result<String> {
    let rep: Report =
        serde_json::from_str(text).map_err(|e| Error::damaged(format!("not a veza-dr drill report: {e}")))?;
    let sig = rep.signature.clone().ok_or_else(|| Error::damaged("the report is not signed"))?;
    let pk: [u8; 32] = crate::repository::format::parse_hex32(&sig.public_key)
        .ok_or_else(|| Error::damaged("malformed public key in the report"))?;
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&pk)
        .map_err(|e| Error::damaged(format!("malformed public key: {e}")))?;
    let sb: [u8; 64] = hex::decode(&sig.value)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| Error::damaged("malformed signature"))?;
    vk.verify_strict(&signed_bytes(&rep), &ed25519_dalek::Signature::from_bytes(&sb)).map_err(|_| {
        Error::damaged("the report's signature does not match its content: it was altered after signing")
    })?;
    Ok(sig.public_key)
}

pub fn markdown(rep: &Report) -> String {
    let secs = |v: Option<f64>| v.map(|s| format!("{s:.1} s")).unwrap_or_else(|| "—".into());
    let mut m = format!("# Restore drill of `{}`: **{}**\n\n", rep.policy, rep.verdict.to_uppercase());
    m += &format!(
        "Drill {} on {}, {} → {}.\n\n",
        rep.id,
        rep.host,
        rep.started.format("%Y-%m-%d %H:%M:%S UTC"),
        rep.finished.format("%H:%M:%S UTC")
    );
    if let Some(f) = &rep.failure {
        m += &format!("**Failure:** {f}\n\n");
    }
    m += "| objective | measured | target | verdict |\n|---|---|---|---|\n";
    m += &format!(
        "| RTO | {} | {} | {} |\n",
        secs(rep.rto.measured_seconds),
        secs(rep.rto.objective_seconds),
        rep.rto.verdict
    );
    m += &format!(
        "| RPO | {} | {} | {} |\n\n",
        secs(rep.rpo.measured_seconds),
        secs(rep.rpo.objective_seconds),
        rep.rpo.verdict
    );
    m += &format!(
        "Snapshot {}; WAL from {}; recovered to {}; last transaction {}.\n\n",
        rep.snapshot.as_deref().unwrap_or("—"),
        rep.wal_from.as_deref().unwrap_or("—"),
        rep.recovered_lsn.as_deref().unwrap_or("—"),
        rep.last_transaction.as_deref().unwrap_or("—")
    );
    m += "| phase | time | ok | detail |\n|---|---|---|---|\n";
    for p in &rep.phases {
        m += &format!(
            "| {} | {:.1} s | {} | {} |\n",
            p.name,
            p.seconds,
            if p.ok { "yes" } else { "**no**" },
            p.detail.replace('|', "\\|")
        );
    }
    if !rep.checks.is_empty() {
        m += "\n| check | expected | got | ok |\n|---|---|---|---|\n";
        for c in &rep.checks {
            m += &format!("| {} | {} | {} | {} |\n", c.name, c.expected, c.got, if c.ok { "yes" } else { "**no**" });
        }
    }
    m
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// An SVG chart of measured RTO and RPO over every drill, with the objectives as dashed lines.
fn chart(history: &[Report]) -> String {
    let (w, h, pad) = (640.0, 220.0, 40.0);
    let series = |f: &dyn Fn(&Report) -> Option<f64>| -> Vec<Option<f64>> { history.iter().map(f).collect() };
    let rto = series(&|r| r.rto.measured_seconds);
    let rpo = series(&|r| r.rpo.measured_seconds);
    let rto_obj = history.last().and_then(|r| r.rto.objective_seconds);
    let rpo_obj = history.last().and_then(|r| r.rpo.objective_seconds);
    let top =
        rto.iter().chain(rpo.iter()).flatten().copied().chain(rto_obj).chain(rpo_obj).fold(1.0f64, f64::max) * 1.1;
    let n = history.len().max(2) as f64;
    let x = |i: usize| pad + (w - 2.0 * pad) * i as f64 / (n - 1.0);
    let y = |v: f64| h - pad - (h - 2.0 * pad) * v / top;
    let line = |vals: &[Option<f64>], color: &str| {
        let pts: Vec<String> =
            vals.iter().enumerate().filter_map(|(i, v)| v.map(|v| format!("{:.1},{:.1}", x(i), y(v)))).collect();
        let dots: String = vals
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                v.map(|v| format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>", x(i), y(v)))
            })
            .collect();
        format!("<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>{dots}", pts.join(" "))
    };
    let objective = |v: Option<f64>, color: &str, label: &str| {
        v.map(|v| {
            format!(
                "<line x1=\"{pad}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"{color}\" stroke-dasharray=\"6 4\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" fill=\"{color}\">{label} {v:.0} s</text>",
                w - pad,
                w - pad - 110.0,
                y(v) - 4.0,
                y = y(v)
            )
        })
        .unwrap_or_default()
    };
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" role=\"img\" aria-label=\"measured RTO and RPO per drill\"><rect width=\"100%\" height=\"100%\" fill=\"#fff\"/><line x1=\"{pad}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#999\"/>{}{}{}{}<text x=\"{pad}\" y=\"16\" font-size=\"12\">seconds (top {top:.0}); blue RTO, orange RPO; {} drills</text></svg>",
        h - pad,
        w - pad,
        h - pad,
        objective(rto_obj, "#1f6feb", "RTO objective"),
        objective(rpo_obj, "#d97706", "RPO objective"),
        line(&rto, "#1f6feb"),
        line(&rpo, "#d97706"),
        history.len()
    )
}

/// The report as one self-contained HTML page: verdict first, then objectives, phases, checks,
/// the snapshot and WAL used, and the chart of every drill of the policy.
pub fn html(rep: &Report, history: &[Report]) -> String {
    let secs = |v: Option<f64>| v.map(|s| format!("{s:.1} s")).unwrap_or_else(|| "—".into());
    let color = match rep.verdict.as_str() {
        "pass" => "#1a7f37",
        "pass-with-warning" => "#9a6700",
        _ => "#cf222e",
    };
    let mut b = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>veza-dr drill {id} of {policy}: {verdict}</title><style>body{{font-family:system-ui,sans-serif;max-width:760px;margin:2em auto;color:#1f2328}}table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #d0d7de;padding:4px 8px;text-align:left}}.verdict{{font-size:2em;font-weight:bold;color:{color}}}.no{{color:#cf222e;font-weight:bold}}</style></head><body>",
        id = esc(&rep.id),
        policy = esc(&rep.policy),
        verdict = esc(&rep.verdict)
    );
    b += &format!("<p class=\"verdict\" id=\"verdict\">{}</p>", esc(&rep.verdict.to_uppercase()));
    b += &format!(
        "<h1>Restore drill of {}</h1><p>Drill {} on {}, {} to {}.</p>",
        esc(&rep.policy),
        esc(&rep.id),
        esc(&rep.host),
        rep.started.format("%Y-%m-%d %H:%M:%S UTC"),
        rep.finished.format("%H:%M:%S UTC")
    );
    if let Some(f) = &rep.failure {
        b += &format!("<p class=\"no\" id=\"failure\">Failure: {}</p>", esc(f));
    }
    b += "<table id=\"objectives\"><tr><th>objective</th><th>measured</th><th>target</th><th>verdict</th></tr>";
    for (name, o) in [("RTO", &rep.rto), ("RPO", &rep.rpo)] {
        b += &format!(
            "<tr><td>{name}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            secs(o.measured_seconds),
            secs(o.objective_seconds),
            esc(&o.verdict)
        );
    }
    b += "</table>";
    b += &format!(
        "<p>Snapshot {}; WAL from {}; recovered to {}; last transaction {}.</p>",
        esc(rep.snapshot.as_deref().unwrap_or("—")),
        esc(rep.wal_from.as_deref().unwrap_or("—")),
        esc(rep.recovered_lsn.as_deref().unwrap_or("—")),
        esc(rep.last_transaction.as_deref().unwrap_or("—"))
    );
    b += "<h2>Phases</h2><table id=\"phases\"><tr><th>phase</th><th>time</th><th>ok</th><th>detail</th></tr>";
    for p in &rep.phases {
        b += &format!(
            "<tr><td>{}</td><td>{:.1} s</td><td{}>{}</td><td>{}</td></tr>",
            esc(&p.name),
            p.seconds,
            if p.ok { "" } else { " class=\"no\"" },
            if p.ok { "yes" } else { "no" },
            esc(&p.detail)
        );
    }
    b += "</table>";
    if !rep.checks.is_empty() {
        b += "<h2>Checks</h2><table id=\"checks\"><tr><th>check</th><th>expected</th><th>got</th><th>ok</th></tr>";
        for c in &rep.checks {
            b += &format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td{}>{}</td></tr>",
                esc(&c.name),
                esc(&c.expected),
                esc(&c.got),
                if c.ok { "" } else { " class=\"no\"" },
                if c.ok { "yes" } else { "no" }
            );
        }
        b += "</table>";
    }
    b += &format!("<h2>Every drill of {}</h2>{}", esc(&rep.policy), chart(history));
    b += "<table id=\"history\"><tr><th>drill</th><th>verdict</th><th>RTO</th><th>RPO</th></tr>";
    for r in history.iter().rev() {
        b += &format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&r.id),
            esc(&r.verdict),
            secs(r.rto.measured_seconds),
            secs(r.rpo.measured_seconds)
        );
    }
    b += "</table>";
    if let Some(s) = &rep.signature {
        b += &format!("<p><small>Signed ({}) by {}; check with <code>veza-dr report verify</code> on the JSON report.</small></p>", esc(&s.algorithm), esc(&s.public_key));
    }
    b + "</body></html>\n"
}

async fn store(repo: &Repo, rep: &Report, dir: &Path) -> Result<()> {
    let json = serde_json::to_vec_pretty(rep).expect("serialisable");
    let md = markdown(rep);
    let mut past = history(repo, &rep.policy).await.unwrap_or_default();
    past.retain(|r| r.id != rep.id);
    past.push(rep.clone());
    let page = html(rep, &past);
    repo.store.put(&format!("reports/{}/{}.html", rep.policy, rep.id), bytes::Bytes::from(page.clone())).await?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create report directory", dir, e))?;
    let base = format!("{}-{}", rep.policy, rep.id);
    std::fs::write(dir.join(format!("{base}.json")), &json).map_err(|e| Error::io("write report", dir, e))?;
    std::fs::write(dir.join(format!("{base}.md")), &md).map_err(|e| Error::io("write report", dir, e))?;
    std::fs::write(dir.join(format!("{base}.html")), &page).map_err(|e| Error::io("write report", dir, e))?;
    repo.store.put(&format!("reports/{}/{}.json", rep.policy, rep.id), bytes::Bytes::from(json)).await?;
    repo.store.put(&format!("reports/{}/{}.md", rep.policy, rep.id), bytes::Bytes::from(md)).await?;
    Ok(())
}

/// Every drill report of a policy in the repository, oldest first.
pub async fn history(repo: &Repo, policy: &str) -> Result<Vec<Report>> {
    let mut keys: Vec<String> = repo
        .store
        .list(&format!("reports/{policy}/"))
        .await?
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.ends_with(".json"))
        .collect();
    keys.sort();
    let mut out = Vec::new();
    for k in keys {
        let b = repo.store.get(&k).await?;
        match serde_json::from_slice::<Report>(&b) {
            Ok(r) => out.push(r),
            Err(e) => tracing::warn!(report = %k, "unreadable drill report: {e}"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objectives_pass_warn_or_fail() {
        assert_eq!(judge(Some(10.0), Some(100.0)), "pass");
        assert_eq!(judge(Some(85.0), Some(100.0)), "pass-with-warning");
        assert_eq!(judge(Some(101.0), Some(100.0)), "fail");
        assert_eq!(judge(None, Some(100.0)), "fail");
        assert_eq!(
            parse_pg_time("2026-11-21 22:24:36.450001+00").unwrap().to_rfc3339(),
            "2026-11-21T22:24:36.450001+00:00"
        );
    }
}
