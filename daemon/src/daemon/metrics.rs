//! Prometheus metrics of the daemon.

use crate::jobs::drill::{Report, Verdict};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;

/// The newest drill report per policy, read again only when a newer one appears: each pass of
/// the metrics loop costs one listing per policy, not a read of every report.
#[derive(Default)]
pub struct NewestDrills {
    seen: HashMap<String, Report>,
}

impl NewestDrills {
    pub async fn newest(
        &mut self,
        repo: &crate::repository::Repository,
        policy: &str,
    ) -> crate::Result<Option<Report>> {
        let Some(id) = repo.report_ids(policy).await?.into_iter().next_back() else { return Ok(None) };
        if let Some(r) = self.seen.get(policy).filter(|r| r.id == id) {
            return Ok(Some(r.clone()));
        }
        let b = repo.report(policy, &id).await?;
        match serde_json::from_slice::<Report>(&b) {
            Ok(r) => {
                self.seen.insert(policy.to_string(), r.clone());
                Ok(Some(r))
            }
            Err(e) => {
                tracing::warn!(policy, report = %id, "unreadable drill report: {e}");
                Ok(self.seen.get(policy).cloned())
            }
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub policy: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabels {
    pub policy: String,
    pub replica: String,
}

type G = Family<JobLabels, Gauge<f64, AtomicU64>>;
type RG = Family<ReplicaLabels, Gauge<f64, AtomicU64>>;
type PG = Family<PolicyLabels, Gauge<f64, AtomicU64>>;

pub struct Metrics {
    pub registry: Registry,
    pub last_success: G,
    pub last_duration: G,
    pub last_bytes_read: G,
    pub last_bytes_stored: G,
    pub failures: Family<JobLabels, Counter>,
    pub runs: Family<JobLabels, Counter>,
    pub rpo: PG,
    pub rto: PG,
    pub wal_last_archived: PG,
    pub wal_gap: PG,
    pub drill_last: PG,
    pub drill_passed: PG,
    pub drill_rto: PG,
    pub drill_rpo: PG,
    pub replica_snapshot: RG,
    pub replica_wal: RG,
    pub replica_spool: RG,
    pub replica_drill_last: RG,
    pub replica_drill_passed: RG,
    pub page_checksum_failures: PG,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            last_success: G::default(),
            last_duration: G::default(),
            last_bytes_read: G::default(),
            last_bytes_stored: G::default(),
            failures: Default::default(),
            runs: Default::default(),
            rpo: PG::default(),
            rto: PG::default(),
            wal_last_archived: PG::default(),
            wal_gap: PG::default(),
            drill_last: PG::default(),
            drill_passed: PG::default(),
            drill_rto: PG::default(),
            drill_rpo: PG::default(),
            replica_snapshot: RG::default(),
            replica_wal: RG::default(),
            replica_spool: RG::default(),
            replica_drill_last: RG::default(),
            replica_drill_passed: RG::default(),
            page_checksum_failures: PG::default(),
            registry: Registry::default(),
        };
        registry.register(
            "veza_dr_last_success_timestamp_seconds",
            "Unix time of the last successful job",
            m.last_success.clone(),
        );
        registry.register("veza_dr_last_duration_seconds", "Wall time of the last job", m.last_duration.clone());
        registry.register("veza_dr_last_bytes_read", "Bytes read by the last job", m.last_bytes_read.clone());
        registry.register("veza_dr_last_bytes_stored", "Bytes uploaded by the last job", m.last_bytes_stored.clone());
        registry.register("veza_dr_job_failures", "Failed jobs", m.failures.clone());
        registry.register("veza_dr_job_runs", "Jobs run", m.runs.clone());
        registry.register("veza_dr_policy_rpo_seconds", "Recovery point objective of the policy", m.rpo.clone());
        registry.register("veza_dr_policy_rto_seconds", "Recovery time objective of the policy", m.rto.clone());
        registry.register(
            "veza_dr_drill_last_timestamp_seconds",
            "Unix time of the newest restore drill",
            m.drill_last.clone(),
        );
        registry.register(
            "veza_dr_drill_passed",
            "1 if the newest restore drill passed (with or without warning), else 0",
            m.drill_passed.clone(),
        );
        registry.register("veza_dr_drill_rto_seconds", "RTO measured by the newest passing drill", m.drill_rto.clone());
        registry.register("veza_dr_drill_rpo_seconds", "RPO measured by the newest drill", m.drill_rpo.clone());
        registry.register(
            "veza_dr_wal_gap_segments",
            "WAL segments missing in the newest gap of the archive (0: continuous from the oldest retained backup)",
            m.wal_gap.clone(),
        );
        registry.register(
            "veza_dr_wal_last_archived_timestamp_seconds",
            "Unix time of the newest WAL file in the repository (PostgreSQL physical policies)",
            m.wal_last_archived.clone(),
        );
        for (name, help, family) in [
            (
                "veza_dr_replica_last_snapshot_timestamp_seconds",
                "Unix time the newest snapshot on a replica finished",
                &m.replica_snapshot,
            ),
            (
                "veza_dr_replica_wal_last_archived_timestamp_seconds",
                "Unix time of the newest WAL file on a replica",
                &m.replica_wal,
            ),
            (
                "veza_dr_replica_wal_spool_segments",
                "WAL segments stored on the primary and queued on this host for a replica, not sent yet",
                &m.replica_spool,
            ),
            (
                "veza_dr_replica_drill_last_timestamp_seconds",
                "Unix time of the newest restore drill run from a replica",
                &m.replica_drill_last,
            ),
            (
                "veza_dr_replica_drill_passed",
                "1 if the newest drill from a replica passed (with or without warning), else 0",
                &m.replica_drill_passed,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "veza_dr_backup_page_checksum_failures",
            "Pages whose checksum failed in the newest physical backup (named in its warnings)",
            m.page_checksum_failures.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Export the newest drill of a policy.
    pub fn set_drill(&self, policy: &str, r: &Report) {
        let l = PolicyLabels { policy: policy.into() };
        self.drill_last.get_or_create(&l).set(r.finished.timestamp() as f64);
        self.drill_passed.get_or_create(&l).set(if r.verdict == Verdict::Fail { 0.0 } else { 1.0 });
        if let Some(v) = r.rto.measured_seconds {
            self.drill_rto.get_or_create(&l).set(v);
        }
        if let Some(v) = r.rpo.measured_seconds {
            self.drill_rpo.get_or_create(&l).set(v);
        }
    }

    /// Export each policy's objectives, so that alert rules can compare against them.
    pub fn set_objectives(&self, policies: &[crate::policy::Policy]) {
        self.rpo.clear();
        self.rto.clear();
        for p in policies {
            let l = PolicyLabels { policy: p.name.clone() };
            if let Some(d) = p.objectives.rpo {
                self.rpo.get_or_create(&l).set(d.0.as_secs_f64());
            }
            if let Some(d) = p.objectives.rto {
                self.rto.get_or_create(&l).set(d.0.as_secs_f64());
            }
        }
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
