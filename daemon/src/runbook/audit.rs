//! The runbook audit log: one JSON line per step outcome and one for the runbook as a whole
//! (with its measured RTO and RPO), appended and synced; `--from` reads earlier facts back.

use super::{RunReport, Status, StepReport};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// The audit log: one JSON line per step outcome and one per runbook, appended and synced.
pub(super) struct Audit<'a> {
    pub path: &'a Path,
    pub who: &'a str,
    pub runbook: &'a str,
    pub dry_run: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct AuditRecord {
    pub time: chrono::DateTime<chrono::Utc>,
    pub who: String,
    pub host: String,
    pub runbook: String,
    /// The step, or `*` for the runbook as a whole.
    pub step: String,
    pub mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    pub outcome: Status,
    pub duration_ms: u64,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub summary: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub facts: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objective_seconds: Option<f64>,
    /// For the runbook as a whole (`*`), in a real run: its measured RTO (start to end of the
    /// last step), the data lost at most (from a restore step) and whether it met the objective.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rto_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpo_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within_objective: Option<bool>,
    /// What the plugin logged during the step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logs: Vec<String>,
}

impl Audit<'_> {
    fn record(&self, step: &str) -> AuditRecord {
        AuditRecord {
            time: chrono::Utc::now(),
            who: self.who.into(),
            host: nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default(),
            runbook: self.runbook.into(),
            step: step.into(),
            mode: if self.dry_run { "dry-run" } else { "run" }.into(),
            plugin: None,
            plugin_hash: None,
            config_hash: None,
            outcome: Status::Ok,
            duration_ms: 0,
            attempts: 0,
            summary: String::new(),
            error: None,
            facts: BTreeMap::new(),
            objective_seconds: None,
            rto_seconds: None,
            rpo_seconds: None,
            within_objective: None,
            logs: vec![],
        }
    }

    pub(super) fn append(&self, r: &StepReport, hash: &str, config: &[(String, String)]) {
        let mut rec = self.record(&r.name);
        rec.plugin = Some(format!("{}@{}", r.plugin, r.plugin_version));
        rec.plugin_hash = Some(hash.to_string());
        rec.config_hash =
            Some(blake3::hash(serde_json::to_string(config).unwrap_or_default().as_bytes()).to_hex()[..16].to_string());
        rec.outcome = r.status.clone();
        rec.duration_ms = (r.seconds * 1000.0) as u64;
        rec.attempts = r.attempts;
        rec.summary = if r.plan.is_empty() { r.summary.clone() } else { r.plan.join("; ") };
        rec.error = r.error.clone();
        rec.facts = r.facts.clone();
        rec.logs = r.logs.clone();
        self.write(&rec);
    }

    pub(super) fn finish(&self, r: &RunReport) {
        let mut rec = self.record("*");
        rec.outcome = if r.ok {
            if r.dry_run {
                Status::Planned
            } else {
                Status::Ok
            }
        } else {
            Status::Failed
        };
        rec.duration_ms = (r.seconds * 1000.0) as u64;
        rec.objective_seconds = r.objective_seconds;
        if !r.dry_run {
            rec.rto_seconds = Some(r.seconds);
            rec.rpo_seconds = r.rpo_seconds;
            rec.within_objective = r.within_objective;
        }
        rec.summary = format!(
            "{} of {} steps ok",
            r.steps.iter().filter(|s| matches!(s.status, Status::Ok | Status::Planned)).count(),
            r.steps.len()
        );
        self.write(&rec);
    }

    /// Writing the audit log must not stop a failover: a failure is logged loudly instead.
    fn write(&self, rec: &AuditRecord) {
        let res = (|| -> std::io::Result<()> {
            if let Some(d) = self.path.parent() {
                std::fs::create_dir_all(d)?;
            }
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(self.path)?;
            let mut line = serde_json::to_vec(rec).map_err(std::io::Error::other)?;
            line.push(b'\n');
            f.write_all(&line)?;
            f.sync_data()
        })();
        if let Err(e) = res {
            tracing::error!(file = %self.path.display(), error = %e, "cannot append to the runbook audit log");
        }
    }

    /// The facts of the newest successful real run of `step` of this runbook.
    pub(super) fn last_facts(&self, step: &str) -> BTreeMap<String, String> {
        read_audit(self.path)
            .into_iter()
            .rev()
            .find(|r| r.runbook == self.runbook && r.step == step && r.mode == "run" && r.outcome == Status::Ok)
            .map(|r| r.facts)
            .unwrap_or_default()
    }
}

/// Every record of an audit log (unreadable lines are skipped).
pub fn read_audit(path: &Path) -> Vec<AuditRecord> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}
