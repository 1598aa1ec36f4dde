//! The scheduler: which job of which policy runs when.
//!
//! Each policy contributes up to four jobs (full, incremental, verify, prune), each with a cron
//! expression in UTC. The loop sleeps until the earliest due job, adds jitter, and hands it to a
//! runner. Rules an SRE expects:
//! - never two jobs of one policy at once: an incremental due while a full runs is skipped
//!   (the full covers it); any other job waits for the running one;
//! - a global limit on concurrent jobs;
//! - catch-up: a slot missed while the daemon was down runs once at start-up, not once per slot.
//!
//! Time comes from a [`Clock`], so tests run the loop under tokio's paused time.

use crate::policy::{CronExpr, Policy};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    Full,
    Incremental,
    Verify,
    Prune,
    Replicate,
    /// A drill of each replica, from the replica.
    DrillReplicas,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Full => "full",
            JobKind::Incremental => "incremental",
            JobKind::Verify => "verify",
            JobKind::Prune => "prune",
            JobKind::Replicate => "replicate",
            JobKind::DrillReplicas => "drill-replicas",
        }
    }
}

/// Wall time that follows tokio's clock: real in production, virtual under `time::pause()`.
#[derive(Clone)]
pub struct Clock {
    base_wall: DateTime<Utc>,
    base: tokio::time::Instant,
}

impl Clock {
    pub fn starting_at(wall: DateTime<Utc>) -> Clock {
        Clock { base_wall: wall, base: tokio::time::Instant::now() }
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.base_wall + chrono::Duration::from_std(self.base.elapsed()).unwrap_or_default()
    }

    pub fn instant_at(&self, t: DateTime<Utc>) -> tokio::time::Instant {
        let d = (t - self.base_wall).to_std().unwrap_or_default();
        self.base + d
    }
}

/// The jobs of one policy with their schedules.
pub fn jobs_of(p: &Policy) -> Vec<(JobKind, CronExpr)> {
    let s = &p.schedule;
    [
        (JobKind::Full, &s.full),
        (JobKind::Incremental, &s.incremental),
        (JobKind::Verify, &s.verify),
        (JobKind::Prune, &s.prune),
        (JobKind::Replicate, &s.replicate),
        (JobKind::DrillReplicas, &s.drill_replicas),
    ]
    .into_iter()
    .filter_map(|(k, c)| c.clone().map(|c| (k, c)))
    .collect()
}

/// The first slot of `cron` strictly after `t`.
pub fn next_after(cron: &CronExpr, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
    cron.next_after(t)
}

/// Whether a slot of `cron` fell in `(since, now]`: a run missed while the daemon was down.
pub fn missed(cron: &CronExpr, since: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    next_after(cron, since).is_some_and(|t| t <= now)
}

/// Pseudo-random delay in `[0, max)`, spread per policy and slot so that many policies with
/// the same schedule do not hit the store at the same second.
pub fn jitter(max: Duration, policy: &str, slot: DateTime<Utc>) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    let h = blake3::hash(format!("{policy}/{}", slot.timestamp()).as_bytes());
    let n = u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"));
    Duration::from_millis(n % max.as_millis().max(1) as u64)
}

/// What the loop decided for a due job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Run,
    /// Skipped because a full backup of the same policy is running.
    SkipCoveredByFull,
}

/// The no-overlap rule.
pub fn decide(due: JobKind, running: Option<JobKind>) -> Decision {
    match (due, running) {
        (JobKind::Incremental, Some(JobKind::Full)) => Decision::SkipCoveredByFull,
        _ => Decision::Run,
    }
}

/// Runs jobs; the daemon's runner calls the library, tests record calls.
pub trait Runner: Send + Sync + 'static {
    fn run(
        &self,
        policy: Policy,
        kind: JobKind,
        reason: &'static str,
    ) -> futures::future::BoxFuture<'static, crate::Result<()>>;
}

/// How many events the scheduler keeps for /status: a daemon that runs for months must not
/// grow without bound.
pub const MAX_EVENTS: usize = 500;

/// Something that happened, for logs, tests and /status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub at: DateTime<Utc>,
    pub policy: String,
    pub kind: JobKind,
    pub what: String,
}

/// State shared by the loop and the job tasks.
struct Inner<R: Runner> {
    clock: Clock,
    runner: R,
    global: tokio::sync::Semaphore,
    /// Per policy: the job running now, behind a lock that serialises the policy's jobs.
    per_policy: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    running: std::sync::Mutex<HashMap<String, JobKind>>,
    /// The newest [`MAX_EVENTS`] events (older ones are only in the log).
    events: std::sync::Mutex<std::collections::VecDeque<Event>>,
    next_runs: std::sync::Mutex<HashMap<(String, JobKind), DateTime<Utc>>>,
}

pub struct Scheduler<R: Runner> {
    inner: Arc<Inner<R>>,
}

impl<R: Runner> Clone for Scheduler<R> {
    fn clone(&self) -> Self {
        Scheduler { inner: self.inner.clone() }
    }
}

impl<R: Runner> Scheduler<R> {
    pub fn new(clock: Clock, runner: R, max_concurrent: usize) -> Self {
        Scheduler {
            inner: Arc::new(Inner {
                clock,
                runner,
                global: tokio::sync::Semaphore::new(max_concurrent.max(1)),
                per_policy: Default::default(),
                running: Default::default(),
                events: Default::default(),
                next_runs: Default::default(),
            }),
        }
    }

    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    pub fn runner(&self) -> &R {
        &self.inner.runner
    }

    pub fn events(&self) -> Vec<Event> {
        self.inner.events.lock().expect("not poisoned").iter().cloned().collect()
    }

    /// The next planned slot of every job.
    pub fn next_runs(&self) -> HashMap<(String, JobKind), DateTime<Utc>> {
        self.inner.next_runs.lock().expect("not poisoned").clone()
    }

    /// Jobs running now, by policy.
    pub fn running(&self) -> HashMap<String, JobKind> {
        self.inner.running.lock().expect("not poisoned").clone()
    }

    fn note(&self, policy: &str, kind: JobKind, what: String) {
        tracing::info!(policy, job = kind.as_str(), "{what}");
        let at = self.inner.clock.now();
        let mut events = self.inner.events.lock().expect("not poisoned");
        if events.len() >= MAX_EVENTS {
            events.pop_front();
        }
        events.push_back(Event { at, policy: policy.into(), kind, what });
    }

    /// Run jobs until `stop` is cancelled. `last_seen` is when a previous daemon was last
    /// alive (for catch-up). Job tasks go on `tracker`, so the caller can wait for them.
    pub async fn run(
        &self,
        mut policies: tokio::sync::watch::Receiver<Arc<Vec<Policy>>>,
        last_seen: Option<DateTime<Utc>>,
        stop: tokio_util::sync::CancellationToken,
        tracker: tokio_util::task::TaskTracker,
    ) {
        let start = self.inner.clock.now();
        if let Some(since) = last_seen {
            let current = policies.borrow().clone();
            for p in current.iter() {
                let mut kinds: Vec<JobKind> =
                    jobs_of(p).iter().filter(|(_, c)| missed(c, since, start)).map(|(k, _)| *k).collect();
                // One catch-up per job kind; a missed full covers a missed incremental.
                if kinds.contains(&JobKind::Full) {
                    kinds.retain(|k| *k != JobKind::Incremental);
                }
                for k in kinds {
                    self.note(
                        &p.name,
                        k,
                        format!("catching up a run missed while the daemon was down (last seen {since})"),
                    );
                    self.start(p.clone(), k, "catch-up", &tracker, None);
                }
            }
        }
        let mut cursor = start;
        loop {
            let current = policies.borrow().clone();
            let mut next: Option<DateTime<Utc>> = None;
            {
                let mut nr = self.inner.next_runs.lock().expect("not poisoned");
                nr.clear();
                for p in current.iter() {
                    for (k, c) in jobs_of(p) {
                        if let Some(t) = next_after(&c, cursor) {
                            nr.insert((p.name.clone(), k), t);
                            next = Some(next.map_or(t, |n: DateTime<Utc>| n.min(t)));
                        }
                    }
                }
            }
            let sleep = async {
                match next {
                    Some(t) => tokio::time::sleep_until(self.inner.clock.instant_at(t)).await,
                    None => futures::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                r = policies.changed() => {
                    if r.is_err() { return; }
                    continue; // re-plan from the same cursor with the new policies
                }
                _ = sleep => {}
            }
            let slot = next.expect("slept until a slot");
            cursor = slot;
            for p in current.iter() {
                for (k, c) in jobs_of(p) {
                    if next_after(&c, slot - chrono::Duration::milliseconds(1)) == Some(slot) {
                        let delay = jitter(p.schedule.jitter.map(|j| j.0).unwrap_or_default(), &p.name, slot);
                        self.start(p.clone(), k, "schedule", &tracker, Some(self.inner.clock.instant_at(slot) + delay));
                    }
                }
            }
        }
    }

    /// Start a job now or at `at`, honouring the no-overlap rule and the global limit.
    fn start(
        &self,
        p: Policy,
        k: JobKind,
        reason: &'static str,
        tracker: &tokio_util::task::TaskTracker,
        at: Option<tokio::time::Instant>,
    ) {
        let me = self.clone();
        tracker.spawn(async move {
            if let Some(at) = at {
                tokio::time::sleep_until(at).await;
            }
            let running = me.inner.running.lock().expect("not poisoned").get(&p.name).copied();
            if decide(k, running) == Decision::SkipCoveredByFull {
                me.note(&p.name, k, "skipped: a full backup of this policy is running and covers it".into());
                return;
            }
            if let Some(r) = running {
                me.note(&p.name, k, format!("queued behind the running {} job", r.as_str()));
            }
            let lock = me.inner.per_policy.lock().expect("not poisoned").entry(p.name.clone()).or_default().clone();
            let _policy = lock.lock().await;
            let Ok(_slot) = me.inner.global.acquire().await else { return };
            me.inner.running.lock().expect("not poisoned").insert(p.name.clone(), k);
            me.note(&p.name, k, format!("started ({reason})"));
            let result = me.inner.runner.run(p.clone(), k, reason).await;
            me.inner.running.lock().expect("not poisoned").remove(&p.name);
            match result {
                Ok(()) => me.note(&p.name, k, "succeeded".into()),
                Err(e) => me.note(&p.name, k, format!("failed: {}", e.message)),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn policy(name: &str, schedule: &str) -> Policy {
        let r = age::x25519::Identity::generate().to_public().to_string();
        let text = format!(
            "[source]\ntype = \"volume\"\npath = \"/srv\"\n[schedule]\n{schedule}\n[repository]\nurl = \"file:///tmp/x\"\n[encryption]\nrecipients = [\"{r}\"]\n"
        );
        Policy::parse(std::path::Path::new(&format!("{name}.toml")), &text).unwrap()
    }

    type Calls = Arc<std::sync::Mutex<Vec<(String, JobKind, DateTime<Utc>)>>>;

    #[derive(Clone)]
    struct Recorder {
        clock: Clock,
        calls: Calls,
        full_takes: Duration,
        now_running: Arc<AtomicUsize>,
        max_running: Arc<AtomicUsize>,
    }

    impl Runner for Recorder {
        fn run(
            &self,
            p: Policy,
            k: JobKind,
            _: &'static str,
        ) -> futures::future::BoxFuture<'static, crate::Result<()>> {
            let me = self.clone();
            Box::pin(async move {
                me.calls.lock().unwrap().push((p.name.clone(), k, me.clock.now()));
                let n = me.now_running.fetch_add(1, Ordering::SeqCst) + 1;
                me.max_running.fetch_max(n, Ordering::SeqCst);
                let d = if k == JobKind::Full { me.full_takes } else { Duration::from_secs(60) };
                tokio::time::sleep(d).await;
                me.now_running.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            })
        }
    }

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    async fn run_for(
        policies: Vec<Policy>,
        start: &str,
        last_seen: Option<&str>,
        full_takes: Duration,
        limit: usize,
        hours: u64,
    ) -> (Recorder, Scheduler<Recorder>) {
        let clock = Clock::starting_at(at(start));
        let rec = Recorder {
            clock: clock.clone(),
            calls: Default::default(),
            full_takes,
            now_running: Default::default(),
            max_running: Default::default(),
        };
        let sched = Scheduler::new(clock, rec.clone(), limit);
        let (_tx, rx) = tokio::sync::watch::channel(Arc::new(policies));
        let stop = tokio_util::sync::CancellationToken::new();
        let tracker = tokio_util::task::TaskTracker::new();
        let s2 = sched.clone();
        let (stop2, tracker2) = (stop.clone(), tracker.clone());
        let last_seen = last_seen.map(at);
        let h = tokio::spawn(async move { s2.run(rx, last_seen, stop2, tracker2).await });
        tokio::time::sleep(Duration::from_secs(hours * 3600)).await;
        stop.cancel();
        h.await.unwrap();
        tracker.close();
        tracker.wait().await;
        (rec, sched)
    }

    fn calls(r: &Recorder) -> Vec<(String, JobKind, String)> {
        r.calls.lock().unwrap().iter().map(|(p, k, t)| (p.clone(), *k, t.format("%d %H:%M:%S").to_string())).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn runs_on_cron_slots_and_catches_up_once() {
        let p = policy("db", "full = \"0 3 * * *\"\nincremental = \"0 * * * *\"");
        // Down from 02:00 to 10:30: the 03:00 full and six incrementals were missed.
        let (rec, _) =
            run_for(vec![p], "2026-11-21T10:30:00Z", Some("2026-11-21T02:00:00Z"), Duration::from_secs(600), 2, 3)
                .await;
        let c = calls(&rec);
        assert_eq!(c[0], ("db".into(), JobKind::Full, "21 10:30:00".into()), "one catch-up full at start: {c:?}");
        assert_eq!(
            c.iter().filter(|x| x.2 == "21 10:30:00").count(),
            1,
            "the catch-up full covers the missed incrementals: {c:?}"
        );
        let incs: Vec<&str> = c.iter().filter(|x| x.1 == JobKind::Incremental).map(|x| x.2.as_str()).collect();
        assert_eq!(incs, vec!["21 11:00:00", "21 12:00:00", "21 13:00:00"]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_incremental_due_during_a_full_is_skipped() {
        let p = policy("db", "full = \"0 3 * * *\"\nincremental = \"0 * * * *\"");
        // The full takes 90 minutes: the 04:00 incremental falls inside it.
        let (rec, sched) = run_for(vec![p], "2026-11-21T02:30:00Z", None, Duration::from_secs(90 * 60), 2, 3).await;
        let c = calls(&rec);
        let at_times: Vec<(JobKind, &str)> = c.iter().map(|x| (x.1, x.2.as_str())).collect();
        assert_eq!(at_times, vec![(JobKind::Full, "21 03:00:00"), (JobKind::Incremental, "21 05:00:00")], "{c:?}");
        let skipped: Vec<Event> = sched.events().into_iter().filter(|e| e.what.starts_with("skipped")).collect();
        assert_eq!(skipped.len(), 2, "03:00 and 04:00 incrementals: {skipped:?}");
        assert_eq!(rec.max_running.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_global_limit_holds_and_every_policy_runs() {
        let ps: Vec<Policy> = (0..4).map(|i| policy(&format!("p{i}"), "full = \"0 3 * * *\"")).collect();
        let (rec, _) = run_for(ps, "2026-11-21T02:59:00Z", None, Duration::from_secs(600), 2, 2).await;
        let c = calls(&rec);
        assert_eq!(c.len(), 4, "{c:?}");
        assert_eq!(rec.max_running.load(Ordering::SeqCst), 2);
        // Two at 03:00, two when the first pair finished.
        assert_eq!(c.iter().filter(|x| x.2 == "21 03:00:00").count(), 2, "{c:?}");
        assert_eq!(c.iter().filter(|x| x.2 == "21 03:10:00").count(), 2, "{c:?}");
    }

    #[test]
    fn schedules_follow_the_policy_timezone() {
        let p = policy("db", "full = \"0 3 * * *\"\ntimezone = \"Europe/Paris\"");
        let (_, full) = &jobs_of(&p)[0];
        // 03:00 in Paris is 02:00 UTC in winter and 01:00 UTC in summer.
        assert_eq!(next_after(full, at("2026-11-21T12:00:00Z")).unwrap(), at("2026-11-22T02:00:00Z"));
        assert_eq!(next_after(full, at("2026-07-01T12:00:00Z")).unwrap(), at("2026-07-02T01:00:00Z"));
        let r = age::x25519::Identity::generate().to_public().to_string();
        let text = format!("[source]\ntype = \"volume\"\npath = \"/srv\"\n[schedule]\nfull = \"0 3 * * *\"\ntimezone = \"Mars/Olympus\"\n[repository]\nurl = \"file:///tmp/x\"\n[encryption]\nrecipients = [\"{r}\"]\n");
        let e = Policy::parse(std::path::Path::new("p.toml"), &text).unwrap_err();
        assert!(e.message.starts_with("p.toml:6:1: unknown timezone `Mars/Olympus`"), "{}", e.message);
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_delays_within_its_bound() {
        let p = policy("db", "full = \"0 3 * * *\"\njitter = \"10m\"");
        let (rec, _) = run_for(vec![p], "2026-11-21T02:59:00Z", None, Duration::from_secs(60), 2, 1).await;
        let t = rec.calls.lock().unwrap()[0].2;
        let delay = t - at("2026-11-21T03:00:00Z");
        assert!(delay >= chrono::Duration::zero() && delay < chrono::Duration::minutes(10), "{delay}");
        let spread: std::collections::HashSet<Duration> =
            (0..20).map(|i| jitter(Duration::from_secs(600), &format!("p{i}"), at("2026-11-21T03:00:00Z"))).collect();
        assert!(spread.len() > 15, "jitter spreads policies apart");
    }
}
