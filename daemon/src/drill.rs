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
    pub identity_file: PathBuf,
    pub snapshot: Option<String>,
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

fn phase(report: &mut Report, name: &str, t: Instant, r: &Result<String>) {
    let (ok, detail) = match r {
        Ok(d) => (true, d.clone()),
        Err(e) => (false, e.message.clone()),
    };
    report.phases.push(Phase { name: name.into(), seconds: t.elapsed().as_secs_f64(), ok, detail });
}

/// Run a drill. A failing drill still returns its report (with verdict "fail").
pub async fn run(repo: &Repo, policy: &Policy, opener: &Opener, o: &Options) -> Result<Report> {
    let pg = match &policy.source {
        Source::Postgres(pg) if pg.method == PgMethod::Physical => pg.clone(),
        Source::Volume(_) => return run_volume(repo, policy, opener, o).await,
        _ => {
            return Err(Error::usage(format!(
                "policy {} is not a physical PostgreSQL policy: drills of logical policies are not built yet",
                policy.name
            )))
        }
    };
    let t0 = Instant::now();
    let started = Utc::now();
    let mut rep = new_report(policy, started);
    let sandbox = sandbox()?;
    let target = sandbox.path().join("data");
    let port = free_port()?;
    let popts = PhysicalOptions {
        snapshot: o.snapshot.clone(),
        target_dir: target.clone(),
        recovery: RecoveryTarget::default(),
        start: true,
        port,
        identity_file: Some(o.identity_file.clone()),
        bytes_done: Default::default(),
        bytes_total: Default::default(),
    };
    let t = Instant::now();
    let restored = crate::pgrestore::restore_physical(repo, opener, policy, &pg, &popts).await;
    let server = Server {
        bin_dir: pg.bin_dir.clone(),
        data: target.clone(),
        port,
        uid: owner_uid(&target),
        dsn: pg.dsn.resolve().ok(),
    };
    match &restored {
        Ok(s) => {
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
            rep.snapshot = Some(s.snapshot.clone());
            rep.recovered_lsn = s.recovered_lsn.clone();
            rep.last_transaction = s.last_transaction.clone();
        }
        Err(e) => {
            rep.phases.push(Phase {
                name: "restore and recovery".into(),
                seconds: t.elapsed().as_secs_f64(),
                ok: false,
                detail: e.message.clone(),
            });
            rep.failure = Some(format!("restore and recovery: {}", e.message));
        }
    }
    let mut backup_end: Option<DateTime<Utc>> = None;
    if let Ok(snaps) = repo.snapshots().await {
        let snap = rep.snapshot.as_ref().and_then(|id| snaps.iter().find(|s| &s.id == id));
        let pg_info = snap.and_then(|s| s.postgres.as_ref());
        rep.wal_from = pg_info.and_then(|p| p.get("start-wal")?.as_str().map(String::from));
        backup_end = pg_info.and_then(|p| p.get("stop-time")?.as_str()?.parse().ok());
    }

    if restored.is_ok() {
        let t = Instant::now();
        let r = amcheck(&server, &pg).await;
        phase(&mut rep, "pg_amcheck", t, &r);
        if let Err(e) = &r {
            rep.failure.get_or_insert(format!("pg_amcheck: {}", e.message));
        }
        let t = Instant::now();
        let r = checks(&server, policy, &mut rep).await;
        phase(&mut rep, "checks", t, &r);
        if let Err(e) = &r {
            rep.failure.get_or_insert(format!("checks: {}", e.message));
        }
    }
    server.stop();
    drop(sandbox);
    // Measured RPO: start of the drill to the newest recovered transaction; without a
    // replayed transaction the newest recovered point is the end of the backup.
    let recovered_at =
        rep.last_transaction.as_deref().and_then(parse_pg_time).or(backup_end.filter(|_| restored.is_ok()));
    finish(repo, rep, t0, recovered_at, o).await
}

fn new_report(policy: &Policy, started: DateTime<Utc>) -> Report {
    Report {
        format: 1,
        id: started.format("%Y%m%dT%H%M%SZ").to_string(),
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
    t0: Instant,
    recovered_at: Option<DateTime<Utc>>,
    o: &Options,
) -> Result<Report> {
    if rep.failure.is_none() {
        rep.rto.measured_seconds = Some(t0.elapsed().as_secs_f64());
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

/// A volume drill: restore into a sandbox and compare every file with the snapshot's record.
async fn run_volume(repo: &Repo, policy: &Policy, opener: &Opener, o: &Options) -> Result<Report> {
    let t0 = Instant::now();
    let started = Utc::now();
    let mut rep = new_report(policy, started);
    let sandbox = sandbox()?;
    let target = sandbox.path().join("tree");
    let snap = repo.find_snapshot(o.snapshot.as_deref().unwrap_or("latest")).await?;
    rep.snapshot = Some(snap.id.clone());
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
    phase(&mut rep, "fetch, decrypt, write", t, &restored);
    if let Err(e) = &restored {
        rep.failure = Some(format!("fetch, decrypt, write: {}", e.message));
    } else {
        let t = Instant::now();
        let compared = compare_tree(repo, opener, &snap, &target).await;
        phase(&mut rep, "compare with recorded hashes", t, &compared);
        if let Err(e) = &compared {
            rep.failure = Some(format!("compare with recorded hashes: {}", e.message));
        }
    }
    drop(sandbox);
    // The data is as of the snapshot's start.
    finish(repo, rep, t0, Some(snap.started), o).await
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

/// The drill's sandbox: removed when dropped, whatever happened; traversable by the database
/// user that runs the throw-away server.
fn sandbox() -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix("veza-drill-")
        .tempdir()
        .map_err(|e| Error::failed(format!("cannot create the drill sandbox: {e}")))?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755));
    Ok(dir)
}

fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::failed(format!("cannot find a free port for the drill server: {e}")))
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
    let out = c.output().await.map_err(|e| Error::failed(format!("cannot run pg_amcheck: {e}")))?;
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

async fn checks(server: &Server, policy: &Policy, rep: &mut Report) -> Result<String> {
    let (client, conn) = server
        .config()
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| crate::source::postgres::db_error("drill server", "connect", e))?;
    tokio::spawn(conn);
    let mut failed = Vec::new();
    for (i, c) in policy.verify.check.iter().enumerate() {
        let name = c.name.clone().unwrap_or_else(|| format!("check {}", i + 1));
        let (expected, got, ok) = match client.simple_query(&c.sql).await {
            Err(e) => (
                "a result".to_string(),
                format!("error: {}", e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string())),
                false,
            ),
            Ok(msgs) => {
                let rows: Vec<&tokio_postgres::SimpleQueryRow> = msgs
                    .iter()
                    .filter_map(|m| if let tokio_postgres::SimpleQueryMessage::Row(r) = m { Some(r) } else { None })
                    .collect();
                let first = rows.first().and_then(|r| r.get(0)).unwrap_or("").to_string();
                match &c.expect {
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
        };
        if !ok {
            failed.push(format!("{name} (expected {expected}, got {got})"));
        }
        rep.checks.push(CheckResult { name, sql: c.sql.clone(), expected, got, ok });
    }
    if failed.is_empty() {
        Ok(format!("{} checks passed", rep.checks.len()))
    } else {
        Err(Error::failed(format!("{} of {} checks failed: {}", failed.len(), rep.checks.len(), failed.join("; "))))
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
