//! Sources: what a snapshot is made from, and how each kind is backed up, restored and drilled.
//!
//! [`of`] is the one place that looks at a policy's kind; everything else calls the
//! [`Source`] it returns. A source uses the pipeline and the repository and never a job: the
//! drill hands a source its sandbox as a [`DrillEnv`].

pub mod postgres;
pub mod volume;

use crate::error::Result;
use crate::pipeline::snapshot::Options as BackupOptions;
use crate::policy::{Policy, Source as SourceCfg, SourceKind};
use crate::repository::format::Sidecar;
use crate::repository::lock::LockGuard;
use crate::repository::{Unlocked, Writer};
use chrono::{DateTime, Utc};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// One kind of source, bound to its policy.
#[async_trait::async_trait]
pub trait Source: Send + Sync {
    fn kind(&self) -> SourceKind;

    /// Back up into the repository under the lease `guard`; returns the committed sidecar.
    async fn backup(&self, repo: &Writer, opts: &BackupOptions, guard: &LockGuard) -> Result<Sidecar>;

    /// Restore as `req` asks; flags that do not apply to this kind are a usage error.
    async fn restore(&self, repo: &Unlocked, req: &RestoreRequest) -> Result<Restored>;

    /// Restore `snap` into the drill's sandbox and bring it to where checks can run, recording
    /// each phase in `env`. `None` when a phase failed (the failure is recorded).
    async fn drill(&self, repo: &Unlocked, snap: &Sidecar, env: &mut dyn DrillEnv) -> Option<Drilled>;
}

/// The source a policy declares: the one match on the kind.
pub fn of(policy: &Policy) -> Box<dyn Source> {
    match &policy.source {
        SourceCfg::Volume(v) => Box::new(volume::Volume { policy: policy.clone(), cfg: v.clone() }),
        SourceCfg::Postgres(pg) => postgres::of(policy, pg),
    }
}

/// What a user asked to restore (the CLI's flags, validated by the source).
#[derive(Debug, Clone, Default)]
pub struct RestoreRequest {
    /// An id, a unique prefix or `latest`; `None`: the newest (for PostgreSQL physical: the
    /// newest that ends before the recovery target).
    pub snapshot: Option<String>,
    pub target: Option<PathBuf>,
    /// Logical PostgreSQL: the server to load the dumps into (a DSN, or a secret reference).
    pub target_dsn: Option<String>,
    pub includes: Vec<PathBuf>,
    pub overwrite: bool,
    /// Bring an existing target to the snapshot, fetching only what differs.
    pub delta: bool,
    /// With `delta`: read and hash every file, even those the last restore's record vouches for.
    pub checksum: bool,
    /// Where restore records live (`<state-dir>/restored`); `None`: none is read or written.
    pub records: Option<PathBuf>,
    pub recovery: postgres::RecoveryTarget,
    pub start: bool,
    pub port: u16,
    /// Where the started server puts its socket (default: a private directory).
    pub socket_dir: Option<PathBuf>,
    /// The started server's `listen_addresses` (default 127.0.0.1).
    pub listen: Option<String>,
    pub jobs: usize,
    pub progress: RestoreProgress,
}

/// Byte counters a progress display reads.
#[derive(Debug, Clone, Default)]
pub struct RestoreProgress {
    pub done: Arc<AtomicU64>,
    pub total: Arc<AtomicU64>,
}

/// What a restore did, per kind.
#[derive(Debug, serde::Serialize)]
#[serde(untagged)]
pub enum Restored {
    Tree(crate::pipeline::tree::Summary),
    Physical(postgres::PhysicalSummary),
    Logical { snapshot: String, databases: Vec<String> },
}

/// The sandbox a drill gives a source.
pub trait DrillEnv: Send {
    /// The sandbox directory (0700, removed when the drill ends).
    fn dir(&self) -> &Path;
    /// A free port for a throw-away server (or the policy's `[verify] port`).
    fn port(&self) -> Result<u16>;
    /// Name the phase in progress (the time limit names it when it stops the drill).
    fn begin(&mut self, phase: &'static str);
    /// Record a finished phase; false when it failed.
    fn record(&mut self, phase: &str, seconds: f64, outcome: &Result<String>) -> bool;
    /// Hand over a server before it first runs: the sandbox lets its user in and stops it on
    /// every exit, also at the time limit.
    fn adopt(&mut self, server: postgres::server::Server);
    /// Where WAL replay started and ended, for the report.
    fn note_recovery(&mut self, wal_from: Option<String>, lsn: Option<String>, last_transaction: Option<String>);
}

/// Where a drill's checks run after the source restored.
pub struct Drilled {
    /// The newest point the restored data holds (for the measured RPO).
    pub at: Option<DateTime<Utc>>,
    /// A restored tree (volumes: checks run in it); `None` for a server (the adopted one).
    pub tree: Option<PathBuf>,
}

/// Time a phase: run `f`, record it, return its value when it succeeded.
pub async fn phase<T, F>(env: &mut dyn DrillEnv, name: &'static str, f: F, detail: impl Fn(&T) -> String) -> Option<T>
where
    F: std::future::Future<Output = Result<T>>,
{
    env.begin(name);
    let t = std::time::Instant::now();
    let r = f.await;
    let outcome = r.as_ref().map(&detail).map_err(Clone::clone);
    env.record(name, t.elapsed().as_secs_f64(), &outcome).then_some(()).and(r.ok())
}
