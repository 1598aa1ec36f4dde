//! Prometheus metrics of the daemon.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub policy: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub policy: String,
}

type G = Family<JobLabels, Gauge<f64, AtomicU64>>;
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
            "veza_dr_wal_last_archived_timestamp_seconds",
            "Unix time of the newest WAL file in the repository (PostgreSQL physical policies)",
            m.wal_last_archived.clone(),
        );
        Metrics { registry, ..m }
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
