//! `veza-dr status`: are we OK? Per policy, the newest backups and WAL against the RPO, the
//! WAL archive's continuity, the newest drill against its schedule, the next jobs (from the
//! running daemon, else from the schedules) and the repository's size; every breach named.
//! Keyless and read-only, so the backup host can run it as a monitoring check.

use crate::daemon::scheduler::{jobs_of, next_after};
use crate::jobs::drill::Verdict;
use crate::policy::{Policy, SourceKind};
use crate::repository::format::{Sidecar, SnapshotKind};
use crate::repository::{trust, Repository};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::time::Duration;

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Status {
    pub checked_at: DateTime<Utc>,
    /// Every objective holds.
    pub ok: bool,
    /// Where the next jobs come from: `daemon` (its /status) or `schedule`.
    pub next_from: String,
    pub policies: Vec<PolicyStatus>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PolicyStatus {
    pub policy: String,
    pub source: SourceKind,
    pub repository: String,
    pub rpo_seconds: Option<f64>,
    pub full: Option<Backup>,
    pub incremental: Option<Backup>,
    /// PostgreSQL physical: the archive.
    pub wal: Option<Wal>,
    /// The newest point a restore reaches, and how old it is.
    pub recovery_point: Option<DateTime<Utc>>,
    pub recovery_point_age_seconds: Option<f64>,
    pub drill: Option<Drill>,
    /// How often drills run (from the schedule), if they are scheduled.
    pub drill_every_seconds: Option<f64>,
    pub next: Vec<NextJob>,
    pub repository_bytes: Option<u64>,
    pub repository_objects: Option<u64>,
    /// What each DR-region replica holds.
    pub replicas: Vec<ReplicaStatus>,
    /// Snapshots that no trusted writer signed (left out of everything above).
    pub untrusted_snapshots: usize,
    /// Each objective that does not hold, as one sentence.
    pub breaches: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Backup {
    pub id: String,
    pub started: DateTime<Utc>,
    pub finished: DateTime<Utc>,
    pub age_seconds: f64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ReplicaStatus {
    pub name: String,
    pub repository: String,
    pub newest: Option<Backup>,
    pub wal_stored_at: Option<DateTime<Utc>>,
    /// The newest point a restore from this replica reaches, and how old it is.
    pub recovery_point: Option<DateTime<Utc>>,
    pub recovery_point_age_seconds: Option<f64>,
    /// WAL segments stored on the primary and queued on this host for the replica.
    pub wal_queued: usize,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Wal {
    pub newest: Option<String>,
    pub cluster: Option<String>,
    pub stored_at: Option<DateTime<Utc>>,
    pub age_seconds: Option<f64>,
    /// Segments missing in the newest real gap (0: continuous).
    pub gap_segments: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Drill {
    pub id: String,
    pub verdict: Verdict,
    pub finished: DateTime<Utc>,
    pub age_seconds: f64,
    pub failure: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct NextJob {
    pub job: String,
    pub cron: String,
    pub at: Option<DateTime<Utc>>,
}

/// What a drill may be late by beyond its period before it counts as overdue: a drill runs
/// for hours on a large cluster, and a failed one is retried.
const DRILL_SLACK: Duration = Duration::from_secs(24 * 3600);

/// `state_dir` is this host's: its replica WAL spools are counted.
pub async fn run(policies: &[Policy], daemon: Option<&str>, state_dir: &std::path::Path) -> Status {
    let now = Utc::now();
    let from_daemon = match daemon {
        Some(url) => daemon_next(url).await,
        None => None,
    };
    let mut out = Vec::new();
    for p in policies {
        let mut st = policy(p, now, from_daemon.as_ref()).await;
        for (name, n) in crate::jobs::walsend::depths(p, state_dir) {
            if let Some(r) = st.replicas.iter_mut().find(|r| r.name == name) {
                r.wal_queued = n;
            }
        }
        out.push(st);
    }
    Status {
        checked_at: now,
        ok: out.iter().all(|p| p.breaches.is_empty()),
        next_from: if from_daemon.is_some() { "daemon" } else { "schedule" }.into(),
        policies: out,
    }
}

/// The daemon's next runs: `{policy: {job: next}}`, or `None` when it does not answer.
async fn daemon_next(url: &str) -> Option<serde_json::Value> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().ok()?;
    let body = client.get(format!("{}/status", url.trim_end_matches('/'))).send().await.ok()?.bytes().await.ok()?;
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    let mut m = serde_json::Map::new();
    for p in v.get("policies")?.as_array()? {
        m.insert(p.get("policy")?.as_str()?.to_string(), p.get("jobs")?.clone());
    }
    Some(serde_json::Value::Object(m))
}

fn age(now: DateTime<Utc>, t: DateTime<Utc>) -> f64 {
    (now - t).num_milliseconds().max(0) as f64 / 1000.0
}

fn backup(now: DateTime<Utc>, s: &Sidecar) -> Backup {
    Backup { id: s.id.to_string(), started: s.started, finished: s.finished, age_seconds: age(now, s.finished) }
}

async fn policy(p: &Policy, now: DateTime<Utc>, daemon: Option<&serde_json::Value>) -> PolicyStatus {
    let source = crate::source::of(p).kind();
    let mut st = PolicyStatus {
        policy: p.name.clone(),
        source,
        repository: p.repository.url.clone(),
        rpo_seconds: p.objectives.rpo.map(|d| d.0.as_secs_f64()),
        full: None,
        incremental: None,
        wal: None,
        recovery_point: None,
        recovery_point_age_seconds: None,
        drill: None,
        drill_every_seconds: p.schedule.verify.as_ref().and_then(|c| period(c, now)).map(|d| d.as_secs_f64()),
        next: next_jobs(p, now, daemon),
        repository_bytes: None,
        repository_objects: None,
        untrusted_snapshots: 0,
        replicas: Vec::new(),
        breaches: Vec::new(),
    };
    for r in &p.replicas {
        match replica(p, &r.name, source, now).await {
            Ok(rs) => {
                if let (Some(a), Some(rpo)) = (rs.recovery_point_age_seconds, p.objectives.rpo) {
                    if a > rpo.0.as_secs_f64() {
                        st.breaches.push(format!(
                            "replica {} is behind: its newest recovery point is {} old (RPO {}): run `veza-dr replicate {}`",
                            r.name,
                            human(a),
                            human(rpo.0.as_secs_f64()),
                            p.name
                        ));
                    }
                }
                if rs.recovery_point.is_none() {
                    st.breaches
                        .push(format!("replica {} holds no snapshot yet: run `veza-dr replicate {}`", r.name, p.name));
                }
                st.replicas.push(rs);
            }
            Err(e) => {
                st.breaches.push(format!("replica {} cannot be read: {}", r.name, e.message));
                st.replicas.push(ReplicaStatus {
                    name: r.name.clone(),
                    repository: r.repository.url.clone(),
                    newest: None,
                    wal_stored_at: None,
                    recovery_point: None,
                    recovery_point_age_seconds: None,
                    wal_queued: 0,
                });
            }
        }
    }
    let repo = match Repository::open(p).await {
        Ok(r) => r,
        Err(e) => {
            st.breaches.push(format!("the repository cannot be read: {}", e.message));
            return st;
        }
    };
    if let Err(e) = fill(&mut st, p, &repo, now).await {
        st.breaches.push(format!("the repository cannot be read: {}", e.message));
    }
    st
}

async fn fill(st: &mut PolicyStatus, p: &Policy, repo: &Repository, now: DateTime<Utc>) -> crate::Result<()> {
    let all = repo.sidecars().await?;
    let mut mine: Vec<&Sidecar> = all.iter().filter(|s| s.policy == p.name).collect();
    if !p.trust.writers.is_empty() {
        let before = mine.len();
        mine.retain(|s| trust::check_sidecar(s, &p.trust.writers).is_ok());
        st.untrusted_snapshots = before - mine.len();
    }
    st.full = mine.iter().rev().find(|s| s.kind == SnapshotKind::Full).map(|s| backup(now, s));
    st.incremental = mine.iter().rev().find(|s| s.kind == SnapshotKind::Incremental).map(|s| backup(now, s));
    // The newest consistent point of a snapshot: a dump or a tree as of its start; a physical
    // backup is consistent at its end, and its WAL carries it further.
    let mut point = mine.last().map(|s| if st.source == SourceKind::PostgresPhysical { s.finished } else { s.started });
    if st.source == SourceKind::PostgresPhysical {
        let segs = repo.wal_segments().await?;
        let newest = segs.iter().max_by_key(|(_, n, at)| (*at, n.to_string()));
        let gaps = crate::jobs::walcheck::check(repo, &all, &p.name).await?;
        let gap = gaps.iter().map(|c| c.newest_gap()).max().unwrap_or(0);
        if gap > 0 {
            st.breaches.push(format!(
                "the WAL archive has a gap of {gap} segments: recovery cannot cross it (`veza-dr verify {}` names it)",
                p.name
            ));
        }
        st.wal = Some(Wal {
            newest: newest.map(|(_, n, _)| n.to_string()),
            cluster: newest.map(|(c, _, _)| c.to_string()),
            stored_at: newest.map(|(_, _, at)| *at),
            age_seconds: newest.map(|(_, _, at)| age(now, *at)),
            gap_segments: gap,
        });
        if let (Some(pt), Some((_, _, at))) = (point, newest) {
            point = Some(pt.max(*at));
        }
    }
    st.recovery_point = point;
    st.recovery_point_age_seconds = point.map(|t| age(now, t));
    match (point, p.objectives.rpo) {
        (None, _) => st.breaches.push(format!("no backup yet: run `veza-dr backup {}`", p.name)),
        (Some(t), Some(rpo)) if age(now, t) > rpo.0.as_secs_f64() => st.breaches.push(format!(
            "RPO {} breached: the newest recovery point ({}) is {} old",
            human(rpo.0.as_secs_f64()),
            utc(t),
            human(age(now, t))
        )),
        _ => {}
    }
    let mut drills = crate::daemon::metrics::NewestDrills::default();
    if let Some(r) = drills.newest(repo, &p.name).await? {
        st.drill = Some(Drill {
            id: r.id.clone(),
            verdict: r.verdict,
            finished: r.finished,
            age_seconds: age(now, r.finished),
            failure: r.failure.clone(),
        });
    }
    let every = st.drill_every_seconds;
    match (&st.drill, every) {
        (Some(d), _) if d.verdict == Verdict::Fail => st.breaches.push(format!(
            "the newest drill ({}, {}) failed{}",
            d.id,
            utc(d.finished),
            d.failure.as_deref().map(|f| format!(": {f}")).unwrap_or_default()
        )),
        (Some(d), Some(e)) if d.age_seconds > e + DRILL_SLACK.as_secs_f64() => st.breaches.push(format!(
            "the newest drill is {} old; drills are scheduled every {}",
            human(d.age_seconds),
            human(e)
        )),
        // A drill is due once the oldest backup has been there for a drill period.
        (None, Some(e)) if mine.first().is_some_and(|s| age(now, s.finished) > e + DRILL_SLACK.as_secs_f64()) => {
            st.breaches.push(format!("no drill yet: run `veza-dr drill {}`", p.name))
        }
        _ => {}
    }
    let (objects, bytes) = repo.usage().await?;
    st.repository_objects = Some(objects);
    st.repository_bytes = Some(bytes);
    Ok(())
}

async fn replica(p: &Policy, name: &str, source: SourceKind, now: DateTime<Utc>) -> crate::Result<ReplicaStatus> {
    let view = p.on_repository(name)?;
    let repo = Repository::open(&view).await?;
    let mut snaps = repo.snapshots().await?;
    if !p.trust.writers.is_empty() {
        snaps.retain(|s| trust::check_sidecar(s, &p.trust.writers).is_ok());
    }
    let newest = snaps.last();
    let wal = if source == SourceKind::PostgresPhysical { repo.newest_wal().await? } else { None };
    let point = newest
        .map(|s| if source == SourceKind::PostgresPhysical { s.finished } else { s.started })
        .map(|t| wal.map_or(t, |w| t.max(w)));
    Ok(ReplicaStatus {
        name: name.to_string(),
        repository: view.repository.url.clone(),
        newest: newest.map(|s| backup(now, s)),
        wal_stored_at: wal,
        recovery_point: point,
        recovery_point_age_seconds: point.map(|t| age(now, t)),
        wal_queued: 0,
    })
}

/// The time between the next two slots of a schedule.
fn period(c: &crate::policy::types::CronExpr, now: DateTime<Utc>) -> Option<Duration> {
    let a = next_after(c, now)?;
    let b = next_after(c, a)?;
    (b - a).to_std().ok()
}

fn next_jobs(p: &Policy, now: DateTime<Utc>, daemon: Option<&serde_json::Value>) -> Vec<NextJob> {
    let from = daemon.and_then(|d| d.get(&p.name));
    jobs_of(p)
        .into_iter()
        .map(|(k, c)| {
            let at = match from {
                Some(jobs) => jobs
                    .get(k.as_str())
                    .and_then(|j| j.get("next"))
                    .and_then(|n| serde_json::from_value::<DateTime<Utc>>(n.clone()).ok()),
                None => next_after(&c, now),
            };
            NextJob { job: k.as_str().into(), cron: c.text.clone(), at }
        })
        .collect()
}

/// A time as the CLI shows it: UTC, the zone named.
pub fn utc(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// Seconds as `3d 4h`, `2h 5m`, `4m 10s`, `12s`.
pub fn human(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    let (d, h, m, sec) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{sec}s"),
        (0, 0, _) => format!("{m}m {sec}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_as_people_say_them() {
        assert_eq!(human(12.4), "12s");
        assert_eq!(human(250.0), "4m 10s");
        assert_eq!(human(7500.0), "2h 5m");
        assert_eq!(human(3.0 * 86400.0 + 4.0 * 3600.0 + 5.0), "3d 4h");
    }
}
