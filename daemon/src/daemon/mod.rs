//! The daemon: one tokio process that schedules every policy's jobs, records them, and serves
//! `/metrics`, `/healthz` and `/status`. SIGHUP reloads policies (a policy that fails
//! validation is reported and its previous version kept); SIGTERM/SIGINT stop scheduling and
//! let running jobs finish within a grace period.

pub mod history;
pub mod metrics;
pub mod scheduler;

use crate::error::{Error, Result};
use crate::policy::Policy;
use history::{History, JobRecord};
use scheduler::{Clock, JobKind, Runner, Scheduler};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub struct Options {
    pub policies_dir: PathBuf,
    pub state_dir: PathBuf,
    /// Runbook-step plugins, for the runbook rehearsals of drills.
    pub plugins_dir: PathBuf,
    pub listen: std::net::SocketAddr,
    pub max_concurrent: usize,
    pub grace: Duration,
}

/// Runs jobs through the library, with retries for transient failures, and records them.
pub struct JobRunner {
    state_dir: PathBuf,
    plugins_dir: PathBuf,
    history: Arc<History>,
    metrics: Arc<metrics::Metrics>,
    retry_delays: Vec<Duration>,
}

impl Runner for JobRunner {
    fn run(&self, p: Policy, k: JobKind, reason: &'static str) -> futures::future::BoxFuture<'static, Result<()>> {
        let (state_dir, history, metrics, delays) =
            (self.state_dir.clone(), self.history.clone(), self.metrics.clone(), self.retry_delays.clone());
        let plugins_dir = self.plugins_dir.clone();
        Box::pin(async move {
            let started = chrono::Utc::now();
            let t = std::time::Instant::now();
            let mut attempts = 0u32;
            let outcome = loop {
                attempts += 1;
                let r = run_once(&p, k, &state_dir, &plugins_dir).await;
                match r {
                    Err(e) if e.kind.is_transient() && (attempts as usize) <= delays.len() => {
                        let d = delays[attempts as usize - 1];
                        tracing::warn!(policy = %p.name, job = k.as_str(), error = %e, "transient failure; retrying in {}s", d.as_secs());
                        tokio::time::sleep(d).await;
                    }
                    r => break r,
                }
            };
            let labels = metrics::JobLabels { policy: p.name.clone(), kind: k.as_str().into() };
            metrics.runs.get_or_create(&labels).inc();
            metrics.last_duration.get_or_create(&labels).set(t.elapsed().as_secs_f64());
            let mut rec = JobRecord {
                policy: p.name.clone(),
                kind: k.as_str().into(),
                reason: reason.into(),
                started,
                finished: chrono::Utc::now(),
                result: "ok".into(),
                error: None,
                snapshot: None,
                bytes_read: 0,
                bytes_stored: 0,
                attempts,
            };
            let r = match outcome {
                Ok(done) => {
                    rec.snapshot = done.snapshot;
                    rec.bytes_read = done.bytes_read;
                    rec.bytes_stored = done.bytes_stored;
                    metrics.last_success.get_or_create(&labels).set(chrono::Utc::now().timestamp() as f64);
                    metrics.last_bytes_read.get_or_create(&labels).set(done.bytes_read as f64);
                    metrics.last_bytes_stored.get_or_create(&labels).set(done.bytes_stored as f64);
                    if let Some(n) = done.page_checksum_failures {
                        let l = metrics::PolicyLabels { policy: p.name.clone() };
                        metrics.page_checksum_failures.get_or_create(&l).set(n as f64);
                    }
                    Ok(())
                }
                Err(e) => {
                    rec.result = "failed".into();
                    rec.error = Some(e.message.clone());
                    metrics.failures.get_or_create(&labels).inc();
                    Err(e)
                }
            };
            if let Err(e) = history.record(&rec) {
                tracing::warn!(error = %e, "cannot record job history");
            }
            r
        })
    }
}

#[derive(Default)]
struct Done {
    snapshot: Option<String>,
    bytes_read: u64,
    bytes_stored: u64,
    /// A physical backup's pages that failed their checksum.
    page_checksum_failures: Option<u64>,
}

async fn run_once(p: &Policy, k: JobKind, state_dir: &std::path::Path, plugins: &std::path::Path) -> Result<Done> {
    // A panic inside a job must not take the daemon down: run it as its own task.
    let (p2, sd, plugins_dir) = (p.clone(), state_dir.to_path_buf(), plugins.to_path_buf());
    let h = tokio::spawn(async move {
        match k {
            JobKind::Full | JobKind::Incremental => {
                let mode =
                    if k == JobKind::Full { crate::jobs::backup::Mode::Full } else { crate::jobs::backup::Mode::Auto };
                let opts = crate::jobs::backup::Options {
                    mode,
                    state_dir: sd,
                    lock_wait: Duration::from_secs(600),
                    progress: Arc::default(),
                };
                let s = crate::jobs::backup::run(&p2, &opts).await?;
                for w in &s.warnings {
                    tracing::warn!(policy = %p2.name, snapshot = %s.id, "{w}");
                }
                let physical = s.source == crate::policy::SourceKind::PostgresPhysical;
                Ok(Done {
                    snapshot: Some(s.id.to_string()),
                    bytes_read: s.stats.bytes_read,
                    bytes_stored: s.stats.bytes_uploaded,
                    page_checksum_failures: physical.then_some(s.stats.page_checksum_failures),
                })
            }
            JobKind::Replicate => {
                let primary = crate::repository::Repository::open(&p2).await?;
                let mut done = Done::default();
                for r in &p2.replicas {
                    let c = crate::repository::replicate::replicate(&primary, r, &p2.retention, &Default::default())
                        .await?;
                    tracing::info!(policy = %p2.name, replica = %r.name, objects = c.objects_copied, bytes = c.bytes_copied, "replicated");
                    done.bytes_read += c.bytes_copied;
                    done.bytes_stored += c.bytes_copied;
                }
                Ok(done)
            }
            JobKind::Prune => {
                let r = crate::jobs::prune::run(&p2, false, Duration::from_secs(600)).await?;
                // Each replica applies the retention itself (replication never deletes).
                let mut deleted = r.bytes_deleted;
                let mut first_error = None;
                for rep in &p2.replicas {
                    match crate::jobs::prune::run(&p2.on_repository(&rep.name)?, false, Duration::from_secs(600)).await
                    {
                        Ok(r) => deleted += r.bytes_deleted,
                        Err(e) if e.kind == crate::error::Kind::NotFound => {} // not replicated yet
                        Err(e) => {
                            first_error
                                .get_or_insert(Error::new(e.kind, format!("replica {}: {}", rep.name, e.message)));
                        }
                    }
                }
                first_error.map_or(Ok(Done { bytes_stored: deleted, ..Default::default() }), Err)
            }
            JobKind::Verify => drill_or_verify(&p2, &sd, &plugins_dir).await,
            JobKind::DrillReplicas => {
                // Each replica from itself alone, as a region failover would read it; one
                // failing replica does not keep the others from being drilled.
                let mut first_error = None;
                for r in &p2.replicas {
                    let view = p2.on_repository(&r.name)?;
                    if let Err(e) = drill_or_verify(&view, &sd, &plugins_dir).await {
                        tracing::error!(policy = %p2.name, replica = %r.name, "replica drill failed: {}", e.message);
                        first_error.get_or_insert(Error::new(e.kind, format!("replica {}: {}", r.name, e.message)));
                    }
                }
                first_error.map_or(Ok(Done::default()), Err)
            }
        }
    });
    h.await.unwrap_or_else(|e| Err(Error::failed(format!("job {} of policy {} crashed: {e}", k.as_str(), p.name))))
}

/// The scheduled verify: a drill when this host has a restore-side identity (a file, an env
/// variable, or VEZA_DR_IDENTITY), else the keyless structural verify.
async fn drill_or_verify(p2: &Policy, sd: &std::path::Path, plugins_dir: &std::path::Path) -> Result<Done> {
    if crate::crypto::identity::is_named(&p2.encryption) {
        let o = crate::jobs::drill::Options {
            state_dir: sd.to_path_buf(),
            report_dir: sd.join("drill-reports"),
            identity: None,
            snapshot: None,
            plugins_dir: plugins_dir.to_path_buf(),
            lock_wait: Duration::from_secs(600),
            phase: Default::default(),
        };
        let reports = crate::jobs::drill::run_all(p2, &o).await?;
        if let Some(r) = reports.iter().find(|r| r.verdict == crate::jobs::drill::Verdict::Fail) {
            return Err(Error::failed(format!(
                "drill of policy {} failed: {}",
                p2.name,
                r.failure.clone().unwrap_or_default()
            )));
        }
        return Ok(Done { snapshot: reports.into_iter().next().and_then(|r| r.snapshot), ..Default::default() });
    }
    // Otherwise (no key on this host) the keyless structural verify.
    let repo = crate::repository::Repository::open(p2).await?;
    let r = crate::jobs::verify::run(&repo, None, false, 100.0, Duration::from_secs(600), &p2.trust.writers).await?;
    if r.ok() {
        Ok(Done::default())
    } else {
        Err(Error::damaged(format!("verify of policy {} found damage: {}", p2.name, r.damage.join("; "))))
    }
}

/// Load every policy at start-up; any error stops the daemon before it schedules anything.
pub fn load_policies(dir: &std::path::Path) -> Result<Vec<Policy>> {
    let results = crate::policy::load_dir(dir)?;
    if results.is_empty() {
        return Err(Error::policy(format!("no policies (*.toml) in {}", dir.display()))
            .with_hint("add a policy or pass --policies DIR"));
    }
    let mut ok = Vec::new();
    for r in results {
        ok.push(r?);
    }
    Ok(ok)
}

pub async fn run(o: Options) -> Result<i32> {
    let policies = load_policies(&o.policies_dir)?;
    let history = Arc::new(History::open(&o.state_dir)?);
    let metrics = Arc::new(metrics::Metrics::new());
    metrics.set_objectives(&policies);
    let listener = tokio::net::TcpListener::bind(o.listen).await.map_err(|e| {
        Error::failed(format!("cannot listen on {}: {e}", o.listen))
            .with_hint("another process uses the port: pass --listen ADDR")
    })?;
    let last_seen = history.last_seen();
    let runner = JobRunner {
        state_dir: o.state_dir.clone(),
        plugins_dir: o.plugins_dir.clone(),
        history: history.clone(),
        metrics: metrics.clone(),
        retry_delays: retry_delays(),
    };
    let sched = Scheduler::new(Clock::starting_at(chrono::Utc::now()), runner, o.max_concurrent);
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(policies));
    let reload_errors: Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    tracing::info!(policies = rx.borrow().len(), listen = %o.listen, "veza-dr daemon started");

    // HTTP: /metrics, /healthz, /status.
    let app = http_app(sched.clone(), rx.clone(), metrics.clone(), reload_errors.clone());
    let server = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await;
        })
    };

    // Heartbeat for catch-up after downtime.
    {
        let (history, stop) = (history.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                history.set_last_seen(chrono::Utc::now());
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(30)) => {}
                }
            }
        });
    }

    // Every minute: the newest archived WAL per physical PostgreSQL policy (archive lag) and
    // the newest drill report per policy (from the repository, so drills run by hand count).
    {
        let (rx, metrics, stop) = (rx.clone(), metrics.clone(), stop.clone());
        let mut newest_drills = metrics::NewestDrills::default();
        tokio::spawn(async move {
            loop {
                let current = rx.borrow().clone();
                for p in current.iter() {
                    if let Ok(repo) = crate::repository::Repository::open(p).await {
                        if let Ok(Some(r)) = newest_drills.newest(&repo, &p.name).await {
                            metrics.set_drill(&p.name, &r);
                        }
                    }
                }
                let physical = |p: &&Policy| crate::source::of(p).kind() == crate::policy::SourceKind::PostgresPhysical;
                for p in current.iter().filter(physical) {
                    if let Err(e) = wal_metrics(p, &metrics).await {
                        tracing::warn!(policy = %p.name, "cannot read the WAL archive: {}", e.message);
                    }
                }
                for p in current.iter() {
                    for r in &p.replicas {
                        if let Err(e) = replica_metrics(p, &r.name, &metrics).await {
                            tracing::warn!(policy = %p.name, replica = %r.name, "cannot read the replica: {}", e.message);
                        }
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                }
            }
        });
    }

    // Every 5 s: send the WAL that wal-push queued for the replicas (when wal-push runs with
    // this state directory; its own detached sender does the same otherwise), and export how
    // much waits. An unreachable replica costs this loop a timeout, never archiving.
    {
        let (rx, metrics, stop, state) = (rx.clone(), metrics.clone(), stop.clone(), o.state_dir.clone());
        tokio::spawn(async move {
            loop {
                let current = rx.borrow().clone();
                for p in current.iter() {
                    if p.replicas.is_empty() {
                        continue;
                    }
                    let depths = crate::jobs::walsend::depths(p, &state);
                    if depths.iter().any(|(_, n)| *n > 0) {
                        if let Err(e) = crate::jobs::walsend::drain(p, &state).await {
                            tracing::warn!(policy = %p.name, "cannot send WAL to the replicas: {}", e.message);
                        }
                    }
                    for (r, n) in crate::jobs::walsend::depths(p, &state) {
                        let l = metrics::ReplicaLabels { policy: p.name.clone(), replica: r };
                        metrics.replica_spool.get_or_create(&l).set(n as f64);
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        });
    }

    // Signals.
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).map_err(|e| Error::failed(format!("cannot watch SIGHUP: {e}")))?;
        let mut term =
            signal(SignalKind::terminate()).map_err(|e| Error::failed(format!("cannot watch SIGTERM: {e}")))?;
        let mut int =
            signal(SignalKind::interrupt()).map_err(|e| Error::failed(format!("cannot watch SIGINT: {e}")))?;
        let (stop, dir, errors, metrics) =
            (stop.clone(), o.policies_dir.clone(), reload_errors.clone(), metrics.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = hup.recv() => {
                        let old = tx.borrow().clone();
                        match crate::policy::load_dir(&dir) {
                            Ok(results) => {
                                let mut new: Vec<Policy> = Vec::new();
                                let mut errs = Vec::new();
                                for r in results {
                                    match r { Ok(p) => new.push(p), Err(e) => { tracing::error!("reload: {}", e.message); errs.push(e.message) } }
                                }
                                // A policy whose file no longer validates keeps its previous version.
                                for o in old.iter() {
                                    let broken = errs.iter().any(|m| m.starts_with(&format!("{}:", o.path.display())));
                                    if broken && !new.iter().any(|p| p.name == o.name) {
                                        new.push(o.clone());
                                    }
                                }
                                new.sort_by(|a, b| a.name.cmp(&b.name));
                                tracing::info!(policies = new.len(), errors = errs.len(), "reloaded policies");
                                *errors.lock().expect("not poisoned") = errs;
                                metrics.set_objectives(&new);
                                let _ = tx.send(Arc::new(new));
                            }
                            Err(e) => {
                                tracing::error!("reload failed, keeping the current policies: {}", e.message);
                                *errors.lock().expect("not poisoned") = vec![e.message];
                            }
                        }
                    }
                    _ = term.recv() => { tracing::info!("SIGTERM: no new jobs; waiting for running ones"); stop.cancel(); return; }
                    _ = int.recv() => { tracing::info!("SIGINT: no new jobs; waiting for running ones"); stop.cancel(); return; }
                }
            }
        });
    }

    sched.run(rx, last_seen, stop.clone(), tracker.clone()).await;
    tracker.close();
    let finished = tokio::time::timeout(o.grace, tracker.wait()).await.is_ok();
    if !finished {
        // Jobs still running are dropped: an unfinished backup leaves only garbage, never a
        // snapshot that looks complete (commit last), and its lock lease expires.
        tracing::warn!("grace period of {}s over: stopping running jobs", o.grace.as_secs());
    }
    history.set_last_seen(chrono::Utc::now());
    let _ = server.await;
    tracing::info!("veza-dr daemon stopped");
    Ok(0)
}

/// The WAL archive of a physical policy as metrics: when the newest segment was stored, and
/// the size of the newest gap (segments missing, not merely still uploading).
async fn wal_metrics(p: &Policy, metrics: &metrics::Metrics) -> Result<()> {
    let repo = crate::repository::Repository::open(p).await?;
    let l = metrics::PolicyLabels { policy: p.name.clone() };
    if let Some(t) = repo.newest_wal().await? {
        metrics.wal_last_archived.get_or_create(&l).set(t.timestamp() as f64);
    }
    let snaps = repo.sidecars().await?;
    let gap = crate::jobs::walcheck::check(&repo, &snaps, &p.name).await?.iter().map(|c| c.newest_gap()).max();
    metrics.wal_gap.get_or_create(&l).set(gap.unwrap_or(0) as f64);
    Ok(())
}

/// What a replica holds, as metrics: when its newest snapshot of the policy finished and when
/// its newest WAL object was stored (its lag behind the primary, for the alert rules).
async fn replica_metrics(p: &Policy, replica: &str, metrics: &metrics::Metrics) -> Result<()> {
    let repo = crate::repository::Repository::open(&p.on_repository(replica)?).await?;
    let l = metrics::ReplicaLabels { policy: p.name.clone(), replica: replica.to_string() };
    if let Some(s) = repo.snapshots().await?.last() {
        metrics.replica_snapshot.get_or_create(&l).set(s.finished.timestamp() as f64);
    }
    if let Some(r) = metrics::NewestDrills::default().newest(&repo, &p.name).await? {
        metrics.replica_drill_last.get_or_create(&l).set(r.finished.timestamp() as f64);
        let passed = r.verdict != crate::jobs::drill::Verdict::Fail;
        metrics.replica_drill_passed.get_or_create(&l).set(if passed { 1.0 } else { 0.0 });
    }
    if let Some(t) = repo.newest_wal().await? {
        metrics.replica_wal.get_or_create(&l).set(t.timestamp() as f64);
    }
    Ok(())
}

fn retry_delays() -> Vec<Duration> {
    std::env::var("VEZA_DR_RETRY_DELAYS")
        .ok()
        .map(|s| s.split(',').filter_map(|d| humantime::parse_duration(d.trim()).ok()).collect())
        .unwrap_or_else(|| vec![Duration::from_secs(30), Duration::from_secs(300)])
}

fn http_app(
    sched: Scheduler<JobRunner>,
    policies: tokio::sync::watch::Receiver<Arc<Vec<Policy>>>,
    metrics: Arc<metrics::Metrics>,
    reload_errors: Arc<std::sync::Mutex<Vec<String>>>,
) -> axum::Router {
    use axum::routing::get;
    let m = metrics.clone();
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || {
                let m = m.clone();
                async move { ([("content-type", "text/plain; version=0.0.4")], m.render()) }
            }),
        )
        .route(
            "/status",
            get(move || {
                let (sched, policies, errors) = (sched.clone(), policies.clone(), reload_errors.clone());
                async move {
                    let next = sched.next_runs();
                    let running = sched.running();
                    let ps: Vec<serde_json::Value> = policies
                        .borrow()
                        .iter()
                        .map(|p| {
                            let mut jobs = serde_json::Map::new();
                            for (k, c) in scheduler::jobs_of(p) {
                                jobs.insert(
                                    k.as_str().into(),
                                    serde_json::json!({"cron": c.text, "next": next.get(&(p.name.clone(), k))}),
                                );
                            }
                            serde_json::json!({
                                "policy": p.name, "source": crate::source::of(p).kind().as_str(), "repository": p.repository.url,
                                "running": running.get(&p.name).map(|k| k.as_str()), "jobs": jobs,
                            })
                        })
                        .collect();
                    let recent: Vec<serde_json::Value> = sched
                        .events()
                        .into_iter()
                        .rev()
                        .take(50)
                        .map(|e| serde_json::json!({"at": e.at, "policy": e.policy, "job": e.kind.as_str(), "event": e.what}))
                        .collect();
                    let errs = errors.lock().expect("not poisoned").clone();
                    axum::Json(serde_json::json!({"policies": ps, "reload-errors": errs, "recent": recent}))
                }
            }),
        )
}
