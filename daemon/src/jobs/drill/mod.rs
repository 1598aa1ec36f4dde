//! Restore drills: prove that a backup restores and measure the real RTO and RPO.
//!
//! A drill opens the identity, chooses a snapshot, and lets the policy's source restore it
//! into a private sandbox (PostgreSQL physical: restore, start a throw-away server, replay WAL
//! to the newest point; logical: a new cluster loaded with pg_restore; volume: the tree,
//! compared file by file with the recorded hashes). Then `pg_amcheck` and the policy's checks
//! run, the sandbox goes, also when a step fails or the time limit hits, and the runbooks the
//! policy names are rehearsed (a dry run each). Measured RTO is the wall time from the drill's
//! start to restored data that passes its checks; measured RPO is the time between the drill's
//! start and the newest point recovered. The report is signed and stored (see `report`).

pub mod checks;
pub mod render;
pub mod report;
pub mod sandbox;

use crate::crypto::{Identity, Sealer};
use crate::error::{Error, Result};
use crate::policy::Policy;
use crate::repository::format::Sidecar;
use crate::repository::lock::LockKind;
use crate::repository::{Repository, Unlocked};
use chrono::{DateTime, Utc};
pub use report::{history, parse_report, verify_report, Choice, Report, Verdict};
use sandbox::{Env, Sandbox};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct Options {
    pub state_dir: PathBuf,
    pub report_dir: PathBuf,
    /// `--identity`; without it, `VEZA_DR_IDENTITY` or the policy's `identity`. None found
    /// gives a failed report that says so.
    pub identity: Option<PathBuf>,
    /// A snapshot id or prefix; default the newest (and, by policy, a random older one).
    pub snapshot: Option<String>,
    /// Runbook-step plugins, for `[verify] rehearse`.
    pub plugins_dir: PathBuf,
    /// How long to wait for the repository's lease (a prune holding it).
    pub lock_wait: std::time::Duration,
    /// The phase in progress, for a progress display.
    pub phase: sandbox::Phase,
}

/// Drill a policy: the chosen (or newest) snapshot, and with `random-older` also a random
/// older one. Each drill gives its own signed report; a failing drill still returns one.
pub async fn run_all(policy: &Policy, o: &Options) -> Result<Vec<Report>> {
    let repo = Repository::open(policy).await?;
    // A shared lease for the whole drill: prune waits, so the snapshot cannot go mid-restore.
    let guard = repo.lock(LockKind::Shared, &format!("drill {}", policy.name), o.lock_wait).await?;
    let r = run_leased(&repo, policy, o).await;
    if let Err(e) = guard.release().await {
        tracing::warn!(error = %e, "could not remove the lock object; it will expire");
    }
    r
}

async fn run_leased(repo: &Repository, policy: &Policy, o: &Options) -> Result<Vec<Report>> {
    let choice = if o.snapshot.is_some() { Choice::Named } else { Choice::Newest };
    let first = run(repo, policy, o, o.snapshot.clone(), choice).await?;
    let newest = first.snapshot.clone();
    let mut out = vec![first];
    if policy.verify.random_older && o.snapshot.is_none() {
        let kind = crate::source::of(policy).kind();
        let snaps = repo.snapshots().await.unwrap_or_default();
        let older: Vec<String> = snaps
            .iter()
            .filter(|s| Some(s.id.as_str()) != newest.as_deref() && s.source == kind)
            .map(|s| s.id.to_string())
            .collect();
        // The generator is not Send: pick before the next await.
        let pick = { rand::seq::IndexedRandom::choose(&older[..], &mut rand::rng()).cloned() };
        if let Some(id) = pick {
            out.push(run(repo, policy, o, Some(id), Choice::RandomOlder).await?);
        }
    }
    Ok(out)
}

/// One drill of one snapshot (`None`: the newest). Every failure ends up in the report.
async fn run(
    repo: &Repository,
    policy: &Policy,
    o: &Options,
    snapshot: Option<String>,
    choice: Choice,
) -> Result<Report> {
    let t0 = Instant::now();
    let mut rep = Report::new(policy, Utc::now(), choice);
    let limit =
        policy.verify.time_limit.map(|d| d.0).unwrap_or_else(|| {
            policy.objectives.rto.map(|d| d.0 * 2).unwrap_or(std::time::Duration::from_secs(24 * 3600))
        });
    let mut sb = Sandbox::new(o.phase.clone())?;
    let work = drill(repo, policy, o, snapshot, &mut rep, &mut sb);
    let recovered_at = match tokio::time::timeout(limit, work).await {
        Ok(r) => r,
        Err(_) => {
            let during = sb.phase.get();
            let limit = humantime::format_duration(limit);
            let stopped = Err(Error::failed(format!("stopped: the drill exceeded its time limit of {limit}")));
            rep.phase(during, 0.0, &stopped);
            rep.failure = Some(format!("time limit: the drill exceeded its limit of {limit} during {during}"));
            None
        }
    };
    let elapsed = t0.elapsed();
    drop(sb);
    // Rehearse the runbooks (a dry run of each) once per drill, after the restore test, so
    // their time is not part of the measured RTO.
    if choice != Choice::RandomOlder {
        for name in &policy.verify.rehearse {
            let t = Instant::now();
            let r = rehearse(policy, name, o).await;
            rep.phase(&format!("rehearse runbook {name}"), t.elapsed().as_secs_f64(), &r);
        }
    }
    rep.conclude(elapsed, recovered_at);
    rep.sign(&o.state_dir)?;
    let writer = repo.writer(Sealer::new(&policy.encryption.recipients));
    report::store(&writer, &rep, &o.report_dir).await?;
    Ok(rep)
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
        policies_dir: dir.to_path_buf(),
        state_dir: o.state_dir.clone(),
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

/// Timed in the report: returns the value when `f` succeeded.
fn timed<T>(rep: &mut Report, name: &str, t: Instant, r: Result<T>, detail: impl Fn(&T) -> String) -> Option<T> {
    let outcome = r.as_ref().map(&detail).map_err(Clone::clone);
    rep.phase(name, t.elapsed().as_secs_f64(), &outcome).then_some(()).and(r.ok())
}

/// Identity, snapshot, the source's restore, the checks; returns the newest recovered point.
async fn drill(
    repo: &Repository,
    policy: &Policy,
    o: &Options,
    snapshot: Option<String>,
    rep: &mut Report,
    sb: &mut Sandbox,
) -> Option<DateTime<Utc>> {
    sb.phase.set("open identity");
    let t = Instant::now();
    let identity = Identity::find(o.identity.as_deref(), &policy.encryption).and_then(|id| {
        id.ok_or_else(|| Error::crypto(format!("a drill of policy {} needs the private identity", policy.name)))
    });
    let identity = timed(rep, "open identity", t, identity, |_| "identity loaded".to_string())?;
    let repo: Unlocked = repo.unlock(identity).trusting(&policy.trust.writers);
    let source = crate::source::of(policy);

    sb.phase.set("choose snapshot");
    let t = Instant::now();
    let snap = match snapshot.as_deref() {
        Some(id) => repo.find_snapshot(id).await,
        None => repo.snapshots().await.and_then(|all| {
            all.into_iter()
                .rev()
                .find(|s| s.source == source.kind())
                .ok_or_else(|| Error::not_found(format!("policy {} has no snapshot yet", policy.name)))
        }),
    };
    let snap: Sidecar = timed(rep, "choose snapshot", t, snap, |s| {
        format!("snapshot {} of {}", s.id, s.started.format("%Y-%m-%d %H:%M:%S UTC"))
    })?;
    rep.snapshot = Some(snap.id.to_string());

    let drilled = {
        let mut env = Env { sandbox: &mut *sb, report: &mut *rep, port: policy.verify.port };
        source.drill(&repo, &snap, &mut env).await?
    };
    match (&drilled.tree, sb.server()) {
        (Some(tree), _) => {
            if !policy.verify.check.is_empty() {
                sb.phase.set("checks");
                let t = Instant::now();
                let r = checks::run_checks(policy, rep, tree, &[], None).await;
                timed(rep, "checks", t, r, Clone::clone)?;
            }
        }
        (None, Some(server)) => {
            let server = server.clone();
            sb.phase.set("pg_amcheck");
            let t = Instant::now();
            let r = checks::amcheck(&server).await;
            timed(rep, "pg_amcheck", t, r, Clone::clone)?;
            if !policy.verify.check.is_empty() {
                sb.phase.set("checks");
                let t = Instant::now();
                let cwd = sb.path().to_path_buf();
                let r = checks::on_server(&server, policy, rep, &cwd).await;
                timed(rep, "checks", t, r, Clone::clone)?;
            }
        }
        (None, None) => {}
    }
    drilled.at
}
