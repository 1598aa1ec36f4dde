//! Runbook steps that are not plugins: `restore`, `drill` and `wait-sql`, declared with
//! `builtin = "…"` instead of `plugin = "…"`. They run in the host (a restore needs the
//! repository, the identity and the PostgreSQL binaries, which no sandbox should hold) but
//! keep the plugin steps' contract: their `with` table is checked before step 1 runs, a dry
//! run only reads (it lists the repository and resolves the identity, so a missing key shows
//! up in the rehearsal, not on the day), and each outcome goes to the audit log with facts.

use super::host::{CallError, StepError};
use super::spec::{RunbookSpec, StepSpec};
use crate::error::{Error, Kind, Result};
use crate::policy::{Dur, Policy, SourceKind};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The built-in step kinds, as `builtin = "…"` names them.
pub const NAMES: [&str; 3] = ["restore", "drill", "wait-sql"];

/// `builtin = "restore"`: restore a policy's snapshot (or a point in time) from a repository
/// into a data directory, start it and wait for recovery to finish.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RestoreCfg {
    policy: String,
    /// `primary` (default) or a `[[replica]]` name.
    repository: Option<String>,
    target: PathBuf,
    snapshot: Option<String>,
    to_time: Option<String>,
    to_lsn: Option<String>,
    to_xid: Option<String>,
    to_name: Option<String>,
    #[serde(default)]
    immediate: bool,
    /// PostgreSQL physical: start the restored server (default true).
    start: Option<bool>,
    port: Option<u16>,
    socket_dir: Option<PathBuf>,
    listen: Option<String>,
    identity: Option<PathBuf>,
    /// Bring an existing data directory (an old standby, the failed primary) to the snapshot.
    #[serde(default)]
    delta: bool,
}

/// `builtin = "drill"`: a restore drill of a policy, from a repository.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct DrillCfg {
    policy: String,
    repository: Option<String>,
    identity: Option<PathBuf>,
    report_dir: Option<PathBuf>,
}

/// `builtin = "wait-sql"`: poll a granted connection until a read-only query returns true.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct WaitSqlCfg {
    connection: String,
    query: String,
    within: Option<Dur>,
    interval: Option<Dur>,
}

#[derive(Debug, Clone)]
enum Cfg {
    Restore(Box<RestoreCfg>, Box<Policy>),
    Drill(DrillCfg, Box<Policy>),
    WaitSql(WaitSqlCfg),
}

/// A built-in step, its configuration checked.
#[derive(Debug, Clone)]
pub struct Builtin {
    cfg: Cfg,
}

/// What a built-in step may use of the host.
pub struct Env<'a> {
    pub rb: &'a RunbookSpec,
    pub st: &'a StepSpec,
    pub state_dir: &'a Path,
    pub plugins_dir: &'a Path,
    pub rt: &'a tokio::runtime::Handle,
    /// Facts of the earlier steps (and `started-at`).
    pub facts: &'a BTreeMap<String, String>,
}

pub struct Outcome {
    pub summary: String,
    pub facts: BTreeMap<String, String>,
}

fn invalid(m: impl Into<String>) -> CallError {
    CallError::Step(StepError::InvalidConfig(m.into()))
}

/// A job's error as a step error: storage and network trouble may pass, the rest will not.
fn step_failure(e: Error) -> CallError {
    let text = match &e.hint {
        Some(h) => format!("{} (hint: {h})", e.message),
        None => e.message.clone(),
    };
    match e.kind {
        Kind::Storage | Kind::Locked => CallError::Step(StepError::Retryable(text)),
        _ => CallError::Step(StepError::Failed(text)),
    }
}

fn policy_for(policies: &Path, name: &str, repository: Option<&str>) -> std::result::Result<Policy, CallError> {
    let p = crate::policy::find(policies, name).map_err(|e| invalid(e.message))?;
    match repository {
        Some(r) => p.on_repository(r).map_err(|e| invalid(format!("{} ({})", e.message, e.hint.unwrap_or_default()))),
        None => Ok(p),
    }
}

impl Builtin {
    /// Parse and check a step's `with` table against the policies in `policies`.
    pub fn prepare(
        name: &str,
        st: &StepSpec,
        rb: &RunbookSpec,
        policies: &Path,
    ) -> std::result::Result<Builtin, CallError> {
        let table = toml::Value::Table(st.with.clone());
        let parse = |e: toml::de::Error| invalid(e.message().to_string());
        let cfg = match name {
            "restore" => {
                let c: RestoreCfg = table.try_into().map_err(parse)?;
                let p = policy_for(policies, &c.policy, c.repository.as_deref())?;
                match crate::source::of(&p).kind() {
                    SourceKind::PostgresLogical => {
                        return Err(invalid(format!(
                            "policy {} is a logical PostgreSQL backup: restore it with `veza-dr restore --target-dsn`",
                            p.name
                        )))
                    }
                    SourceKind::Volume => {
                        let pg_only = [
                            ("to-time", c.to_time.is_some()),
                            ("to-lsn", c.to_lsn.is_some()),
                            ("to-xid", c.to_xid.is_some()),
                            ("to-name", c.to_name.is_some()),
                            ("immediate", c.immediate),
                            ("start", c.start.is_some()),
                            ("port", c.port.is_some()),
                            ("socket-dir", c.socket_dir.is_some()),
                            ("listen", c.listen.is_some()),
                        ];
                        if let Some((k, _)) = pg_only.iter().find(|(_, set)| *set) {
                            return Err(invalid(format!(
                                "`{k}` applies to PostgreSQL physical policies; {} is a volume",
                                p.name
                            )));
                        }
                    }
                    SourceKind::PostgresPhysical => {
                        let targets = [
                            c.to_time.is_some(),
                            c.to_lsn.is_some(),
                            c.to_xid.is_some(),
                            c.to_name.is_some(),
                            c.immediate,
                        ];
                        if targets.iter().filter(|t| **t).count() > 1 {
                            return Err(invalid(
                                "name at most one recovery target: to-time, to-lsn, to-xid, to-name or immediate",
                            ));
                        }
                        // A malformed target fails here, before step 1, not in the middle of the run.
                        recovery(&c).settings().map_err(|e| invalid(e.message))?;
                    }
                }
                Cfg::Restore(Box::new(c), Box::new(p))
            }
            "drill" => {
                let c: DrillCfg = table.try_into().map_err(parse)?;
                let p = policy_for(policies, &c.policy, c.repository.as_deref())?;
                Cfg::Drill(c, Box::new(p))
            }
            "wait-sql" => {
                let c: WaitSqlCfg = table.try_into().map_err(parse)?;
                if !rb.connections.contains_key(&c.connection) {
                    return Err(invalid(format!("connection `{}` is not declared by the runbook", c.connection)));
                }
                if !st.grants.connections.contains(&c.connection) {
                    return Err(invalid(format!(
                        "connection `{}` is not granted: add grants = {{ connections = [\"{}\"] }}",
                        c.connection, c.connection
                    )));
                }
                // A health check only reads, in a real run as in a dry run.
                super::readonly::check(&c.query).map_err(|why| invalid(format!("query: {why}")))?;
                Cfg::WaitSql(c)
            }
            other => {
                return Err(invalid(format!("there is no built-in step `{other}` (built in: {})", NAMES.join(", "))))
            }
        };
        Ok(Builtin { cfg })
    }

    /// The deadline of one attempt when the step sets none. A restore or a drill takes as long
    /// as the data does: cutting it at the objective would turn a late failover into a failed
    /// one, so it gets a day (the objective is judged on the whole run anyway).
    pub fn default_timeout(&self, _rb: &RunbookSpec) -> Duration {
        match &self.cfg {
            Cfg::Restore(..) | Cfg::Drill(..) => Duration::from_secs(24 * 3600),
            Cfg::WaitSql(c) => wait_within(c) + Duration::from_secs(30),
        }
    }

    /// The dry run: read only.
    pub fn plan(&self, env: &Env) -> std::result::Result<Vec<String>, CallError> {
        match &self.cfg {
            Cfg::Restore(c, p) => env.rt.block_on(plan_restore(c, p)),
            Cfg::Drill(c, p) => env.rt.block_on(plan_drill(c, p)),
            Cfg::WaitSql(c) => Ok(vec![format!(
                "poll connection `{}` every {} with `{}` until it returns true, for at most {}",
                c.connection,
                humantime::format_duration(wait_interval(c)),
                c.query,
                humantime::format_duration(wait_within(c))
            )]),
        }
    }

    pub fn run(&self, env: &Env, timeout: Duration) -> std::result::Result<Outcome, CallError> {
        let fut = async {
            match &self.cfg {
                Cfg::Restore(c, p) => run_restore(c, p, env).await,
                Cfg::Drill(c, p) => run_drill(c, p, env).await,
                Cfg::WaitSql(c) => run_wait_sql(c, env).await,
            }
        };
        let r = env.rt.block_on(async { tokio::time::timeout(timeout, fut).await.unwrap_or(Err(CallError::Timeout)) });
        match (&self.cfg, r) {
            // A restore that wrote part of its target cannot be tried again over it: keep its
            // own error, and say how to go on.
            (Cfg::Restore(c, _), Err(e)) => {
                let why = match e {
                    CallError::Timeout => format!("timed out after {}", humantime::format_duration(timeout)),
                    CallError::Step(StepError::Retryable(m) | StepError::Failed(m) | StepError::InvalidConfig(m)) => m,
                    other => other.to_string(),
                };
                Err(CallError::Step(StepError::Failed(format!(
                    "{why}; if {} was written to, empty it before running the step again",
                    c.target.display()
                ))))
            }
            (_, r) => r,
        }
    }
}

fn recovery(c: &RestoreCfg) -> crate::source::postgres::RecoveryTarget {
    crate::source::postgres::RecoveryTarget {
        time: c.to_time.clone(),
        lsn: c.to_lsn.clone(),
        xid: c.to_xid.clone(),
        name: c.to_name.clone(),
        immediate: c.immediate,
    }
}

fn repo_name(p: &Policy) -> &str {
    p.via.as_deref().unwrap_or(crate::policy::replica::PRIMARY)
}

async fn plan_restore(c: &RestoreCfg, p: &Policy) -> std::result::Result<Vec<String>, CallError> {
    let identity =
        crate::crypto::Identity::require(c.identity.as_deref(), &p.encryption, &p.name).map_err(step_failure)?;
    drop(identity);
    let repo = crate::repository::Repository::open(p).await.map_err(step_failure)?;
    let snaps = repo.snapshots().await.map_err(step_failure)?;
    let rec = recovery(c);
    let snap = match &c.snapshot {
        Some(s) => repo.find_snapshot(s).await.map_err(step_failure)?,
        None if crate::source::of(p).kind() == SourceKind::PostgresPhysical => {
            rec.choose(&snaps).map_err(step_failure)?
        }
        None => repo.find_snapshot("latest").await.map_err(step_failure)?,
    };
    if !c.delta && std::fs::read_dir(&c.target).map(|mut d| d.next().is_some()).unwrap_or(false) {
        return Err(CallError::Step(StepError::Failed(format!(
            "target {} is not empty: a restore would refuse it",
            c.target.display()
        ))));
    }
    let mut plan = vec![format!(
        "restore snapshot {} (finished {}) of policy {} from repository {} ({}) into {}",
        snap.id,
        snap.finished.format("%Y-%m-%d %H:%M:%S UTC"),
        p.name,
        repo_name(p),
        p.repository.url,
        c.target.display()
    )];
    if c.delta {
        plan.push(format!(
            "as a delta over what {} holds: fetch only what differs, remove what the snapshot does not hold",
            c.target.display()
        ));
    }
    if crate::source::of(p).kind() == SourceKind::PostgresPhysical {
        plan.push(format!("recover to {}", rec.describe()));
        if c.start.unwrap_or(true) {
            plan.push(format!("start it on port {} and wait until recovery has finished", c.port.unwrap_or(5432)));
        }
    }
    Ok(plan)
}

async fn run_restore(c: &RestoreCfg, p: &Policy, env: &Env<'_>) -> std::result::Result<Outcome, CallError> {
    let identity =
        crate::crypto::Identity::require(c.identity.as_deref(), &p.encryption, &p.name).map_err(step_failure)?;
    let physical = crate::source::of(p).kind() == SourceKind::PostgresPhysical;
    let req = crate::source::RestoreRequest {
        snapshot: c.snapshot.clone(),
        target: Some(c.target.clone()),
        target_dsn: None,
        includes: vec![],
        overwrite: false,
        delta: c.delta,
        checksum: false,
        records: Some(crate::pipeline::record::dir(env.state_dir)),
        recovery: recovery(c),
        start: physical && c.start.unwrap_or(true),
        port: c.port.unwrap_or(5432),
        socket_dir: c.socket_dir.clone(),
        listen: c.listen.clone(),
        jobs: 0,
        progress: Default::default(),
    };
    let t = Instant::now();
    let restored = crate::jobs::restore::run(p, identity, &req, Duration::from_secs(60)).await.map_err(step_failure)?;
    let mut facts = BTreeMap::new();
    facts.insert("repository".into(), repo_name(p).to_string());
    facts.insert("data-dir".into(), c.target.display().to_string());
    let started = env.facts.get("started-at").and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok());
    let summary = match restored {
        crate::source::Restored::Physical(s) => {
            facts.insert("snapshot".into(), s.snapshot.clone());
            facts.insert("restore-seconds".into(), format!("{:.1}", s.seconds_restore));
            if let Some(port) = s.port {
                facts.insert("port".into(), port.to_string());
            }
            for (k, v) in [
                ("socket-dir", &s.socket_dir),
                ("recovered-lsn", &s.recovered_lsn),
                ("last-transaction", &s.last_transaction),
            ] {
                if let Some(v) = v {
                    facts.insert(k.into(), v.clone());
                }
            }
            if let Some(tl) = s.timeline {
                facts.insert("timeline".into(), tl.to_string());
            }
            // The data lost at most: from the last transaction recovered to the failover's
            // start (the region was lost somewhere in between).
            let last = s.last_transaction.as_deref().and_then(crate::source::postgres::recovery::parse_time);
            if let (Some(start), Some(last)) = (started, last) {
                let rpo = (start.with_timezone(&chrono::Utc) - last).num_milliseconds().max(0) as f64 / 1000.0;
                facts.insert("rpo-seconds".into(), format!("{rpo:.1}"));
            }
            format!(
                "restored snapshot {} from {} into {} in {:.1}s{}",
                s.snapshot,
                repo_name(p),
                s.target,
                t.elapsed().as_secs_f64(),
                if s.started {
                    format!(
                        "; server on port {} recovered to {} on timeline {}{}",
                        s.port.unwrap_or(0),
                        s.recovered_lsn.as_deref().unwrap_or("?"),
                        s.timeline.unwrap_or(0),
                        s.last_transaction.as_deref().map(|t| format!(", last transaction at {t}")).unwrap_or_default()
                    )
                } else {
                    String::new()
                }
            )
        }
        crate::source::Restored::Tree(s) => {
            facts.insert("snapshot".into(), s.snapshot.clone());
            facts.insert("files".into(), s.files.to_string());
            let repo = crate::repository::Repository::open(p).await.map_err(step_failure)?;
            if let (Some(start), Ok(snap)) = (started, repo.find_snapshot(&s.snapshot).await) {
                let rpo = (start.with_timezone(&chrono::Utc) - snap.started).num_milliseconds().max(0) as f64 / 1000.0;
                facts.insert("rpo-seconds".into(), format!("{rpo:.1}"));
            }
            format!("restored snapshot {} from {} into {}: {} files", s.snapshot, repo_name(p), s.target, s.files)
        }
        crate::source::Restored::Logical { snapshot, .. } => format!("restored snapshot {snapshot}"),
    };
    Ok(Outcome { summary, facts })
}

fn drill_options(c: &DrillCfg, env: &Env) -> crate::jobs::drill::Options {
    crate::jobs::drill::Options {
        state_dir: env.state_dir.to_path_buf(),
        report_dir: c.report_dir.clone().unwrap_or_else(|| env.state_dir.join("drill-reports")),
        identity: c.identity.clone(),
        snapshot: None,
        plugins_dir: env.plugins_dir.to_path_buf(),
        lock_wait: Duration::from_secs(60),
        phase: Default::default(),
    }
}

async fn plan_drill(c: &DrillCfg, p: &Policy) -> std::result::Result<Vec<String>, CallError> {
    crate::crypto::Identity::require(c.identity.as_deref(), &p.encryption, &p.name).map_err(step_failure)?;
    let repo = crate::repository::Repository::open(p).await.map_err(step_failure)?;
    let snap = repo.find_snapshot("latest").await.map_err(step_failure)?;
    Ok(vec![format!(
        "drill policy {} from repository {}: restore snapshot {} into a sandbox, run its checks, measure RTO and RPO, store a signed report{}",
        p.name,
        repo_name(p),
        snap.id,
        c.report_dir.as_ref().map(|d| format!(" (and a copy in {})", d.display())).unwrap_or_default()
    )])
}

async fn run_drill(c: &DrillCfg, p: &Policy, env: &Env<'_>) -> std::result::Result<Outcome, CallError> {
    let reports = crate::jobs::drill::run_all(p, &drill_options(c, env)).await.map_err(step_failure)?;
    // The first report is the newest snapshot's; a failing one of any (random-older) fails.
    let r = reports
        .iter()
        .find(|r| r.verdict == crate::jobs::drill::report::Verdict::Fail)
        .or(reports.first())
        .ok_or_else(|| CallError::Step(StepError::Failed("the drill gave no report".into())))?;
    let mut facts = BTreeMap::new();
    facts.insert("drill-id".into(), r.id.clone());
    facts.insert("verdict".into(), r.verdict.as_str().to_string());
    for (k, o) in [("drill-rto-seconds", &r.rto), ("drill-rpo-seconds", &r.rpo)] {
        if let Some(m) = o.measured_seconds {
            facts.insert(k.into(), format!("{m:.1}"));
        }
    }
    let text = format!(
        "drill {} of policy {} from {}: {} (RTO {}, RPO {})",
        r.id,
        p.name,
        repo_name(p),
        r.verdict.as_str(),
        seconds(r.rto.measured_seconds),
        seconds(r.rpo.measured_seconds)
    );
    if r.verdict == crate::jobs::drill::report::Verdict::Fail {
        return Err(CallError::Step(StepError::Failed(format!(
            "{text}: {}",
            r.failure.as_deref().unwrap_or("see the report")
        ))));
    }
    Ok(Outcome { summary: text, facts })
}

fn seconds(s: Option<f64>) -> String {
    s.map(|s| format!("{s:.1}s")).unwrap_or_else(|| "not measured".into())
}

fn wait_within(c: &WaitSqlCfg) -> Duration {
    c.within.map(|d| d.0).unwrap_or(Duration::from_secs(300))
}

fn wait_interval(c: &WaitSqlCfg) -> Duration {
    c.interval.map(|d| d.0).unwrap_or(Duration::from_secs(2)).max(Duration::from_millis(100))
}

fn truthy(v: Option<&str>) -> bool {
    matches!(v.map(|s| s.trim().to_ascii_lowercase()).as_deref(), Some("t" | "true" | "1" | "on" | "yes"))
}

/// One poll: connect in a read-only session, run the query, read its first value.
async fn poll(dsn: &crate::source::postgres::Dsn, query: &str) -> Result<Option<String>> {
    let c = crate::source::postgres::connect_dsn(dsn).await?;
    c.batch_execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        .await
        .map_err(|e| crate::source::postgres::db_error(&dsn.to_string(), "set read-only", e))?;
    let msgs = c
        .simple_query(query)
        .await
        .map_err(|e| crate::source::postgres::db_error(&dsn.to_string(), "run the query", e))?;
    Ok(msgs
        .into_iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_string)),
            _ => None,
        })
        .flatten())
}

async fn run_wait_sql(c: &WaitSqlCfg, env: &Env<'_>) -> std::result::Result<Outcome, CallError> {
    let dsn = env.rb.connections.get(&c.connection).expect("checked at prepare");
    let (within, interval) = (wait_within(c), wait_interval(c));
    let t = Instant::now();
    let mut polls = 0u32;
    let last = loop {
        polls += 1;
        let r = tokio::time::timeout(interval.max(Duration::from_secs(5)), poll(dsn, &c.query)).await;
        let last = match r {
            Ok(Ok(v)) if truthy(v.as_deref()) => {
                let mut facts = BTreeMap::new();
                facts.insert(format!("{}-seconds", env.st.name), format!("{:.1}", t.elapsed().as_secs_f64()));
                return Ok(Outcome {
                    summary: format!(
                        "`{}` returned true on `{}` after {:.1}s ({polls} polls)",
                        c.query,
                        c.connection,
                        t.elapsed().as_secs_f64()
                    ),
                    facts,
                });
            }
            Ok(Ok(v)) => format!("it returned {}", v.as_deref().unwrap_or("NULL")),
            Ok(Err(e)) => e.message,
            Err(_) => "the poll timed out".into(),
        };
        if t.elapsed() + interval > within {
            break last;
        }
        tokio::time::sleep(interval).await;
    };
    Err(CallError::Step(StepError::Failed(format!(
        "`{}` on `{}` did not return true within {} ({polls} polls; last: {last})",
        c.query,
        c.connection,
        humantime::format_duration(within)
    ))))
}
