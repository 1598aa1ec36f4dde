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
        _ => {
            return Err(Error::usage(format!(
            "policy {} is not a physical PostgreSQL policy: drills of volume and logical policies are not built yet",
            policy.name
        )))
        }
    };
    let t0 = Instant::now();
    let started = Utc::now();
    let mut rep = Report {
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
    };
    // The sandbox: removed when this function returns, whatever happened.
    let sandbox = tempfile::Builder::new()
        .prefix("veza-drill-")
        .tempdir()
        .map_err(|e| Error::failed(format!("cannot create the drill sandbox: {e}")))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(sandbox.path(), std::fs::Permissions::from_mode(0o755));
    }
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
    if let Ok(snaps) = repo.snapshots().await {
        rep.wal_from = rep
            .snapshot
            .as_ref()
            .and_then(|id| snaps.iter().find(|s| &s.id == id))
            .and_then(|s| s.postgres.as_ref()?.get("start-wal")?.as_str().map(String::from));
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

    // Measured RTO: start of the drill to a server that passed its checks.
    if rep.failure.is_none() {
        rep.rto.measured_seconds = Some(t0.elapsed().as_secs_f64());
    }
    // Measured RPO: start of the drill to the newest recovered transaction.
    rep.rpo.measured_seconds = rep
        .last_transaction
        .as_deref()
        .and_then(parse_pg_time)
        .map(|t| (started - t).num_milliseconds().max(0) as f64 / 1000.0);
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

async fn store(repo: &Repo, rep: &Report, dir: &Path) -> Result<()> {
    let json = serde_json::to_vec_pretty(rep).expect("serialisable");
    let md = markdown(rep);
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create report directory", dir, e))?;
    let base = format!("{}-{}", rep.policy, rep.id);
    std::fs::write(dir.join(format!("{base}.json")), &json).map_err(|e| Error::io("write report", dir, e))?;
    std::fs::write(dir.join(format!("{base}.md")), &md).map_err(|e| Error::io("write report", dir, e))?;
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
