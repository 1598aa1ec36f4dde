//! The drill report: what was drilled, each phase with its time, the checks, the measured RTO
//! and RPO against the objectives; signed with this host's key and stored in the repository
//! (`reports/<policy>/<id>.{json,md,html}`) and the report directory.

use crate::crypto::signing::{self, Signature};
use crate::error::{Error, Result};
use crate::policy::Policy;
use crate::repository::{Repository, Writer};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::path::Path;

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
    /// The SQL, or the shell command of a command check.
    pub sql: String,
    pub expected: String,
    pub got: String,
    pub ok: bool,
}

/// The outcome of a drill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Pass,
    PassWithWarning,
    Fail,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::PassWithWarning => "pass-with-warning",
            Verdict::Fail => "fail",
        }
    }
}

/// One objective's outcome; `not-set` when the policy names no objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Judged {
    Pass,
    PassWithWarning,
    Fail,
    NotSet,
}

impl Judged {
    pub fn as_str(self) -> &'static str {
        match self {
            Judged::Pass => "pass",
            Judged::PassWithWarning => "pass-with-warning",
            Judged::Fail => "fail",
            Judged::NotSet => "not-set",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Objective {
    pub measured_seconds: Option<f64>,
    pub objective_seconds: Option<f64>,
    pub verdict: Judged,
}

/// How the drilled snapshot was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Choice {
    #[default]
    Newest,
    RandomOlder,
    Named,
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
    pub verdict: Verdict,
    pub failure: Option<String>,
    pub snapshot: Option<String>,
    pub wal_from: Option<String>,
    pub recovered_lsn: Option<String>,
    pub last_transaction: Option<String>,
    #[serde(default)]
    pub choice: Choice,
    pub phases: Vec<Phase>,
    pub checks: Vec<CheckResult>,
    pub rto: Objective,
    pub rpo: Objective,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<Signature>,
}

/// pass, pass-with-warning (within 20% of the objective) or fail.
pub fn judge(measured: Option<f64>, objective: Option<f64>) -> Judged {
    match (measured, objective) {
        (Some(m), Some(o)) if m > o => Judged::Fail,
        (Some(m), Some(o)) if m > 0.8 * o => Judged::PassWithWarning,
        (Some(_), Some(_)) => Judged::Pass,
        (None, Some(_)) => Judged::Fail,
        _ => Judged::NotSet,
    }
}

impl Report {
    pub fn new(policy: &Policy, started: DateTime<Utc>, choice: Choice) -> Report {
        let objective = |d: Option<crate::policy::Dur>| Objective {
            measured_seconds: None,
            objective_seconds: d.map(|d| d.0.as_secs_f64()),
            verdict: Judged::NotSet,
        };
        let mut id = format!("{}-{}", started.format("%Y%m%dT%H%M%SZ"), hex::encode(rand::random::<[u8; 3]>()));
        if choice == Choice::RandomOlder {
            id.push_str("-older");
        }
        Report {
            format: 1,
            // Unique even for drills started in the same second (a report is never overwritten).
            id,
            policy: policy.name.clone(),
            host: crate::repository::lock::hostname(),
            started,
            finished: started,
            verdict: Verdict::Fail,
            failure: None,
            snapshot: None,
            wal_from: None,
            recovered_lsn: None,
            last_transaction: None,
            choice,
            phases: vec![],
            checks: vec![],
            rto: objective(policy.objectives.rto),
            rpo: objective(policy.objectives.rpo),
            signature: None,
        }
    }

    /// Record a phase's outcome; the first failure becomes the report's failure.
    pub fn phase(&mut self, name: &str, seconds: f64, r: &Result<String>) -> bool {
        let (ok, detail) = match r {
            Ok(d) => (true, d.clone()),
            Err(e) => (false, e.message.clone()),
        };
        self.phases.push(Phase { name: name.into(), seconds, ok, detail: detail.clone() });
        if !ok {
            self.failure.get_or_insert(format!("{name}: {detail}"));
        }
        ok
    }

    /// Measure, judge and decide the verdict.
    pub fn conclude(&mut self, elapsed: std::time::Duration, recovered_at: Option<DateTime<Utc>>) {
        if self.failure.is_none() {
            self.rto.measured_seconds = Some(elapsed.as_secs_f64());
        }
        let started = self.started;
        self.rpo.measured_seconds = recovered_at.map(|t| (started - t).num_milliseconds().max(0) as f64 / 1000.0);
        self.rto.verdict = judge(self.rto.measured_seconds, self.rto.objective_seconds);
        self.rpo.verdict = judge(self.rpo.measured_seconds, self.rpo.objective_seconds);
        let verdicts = [self.rto.verdict, self.rpo.verdict];
        self.verdict = if self.failure.is_some() || verdicts.contains(&Judged::Fail) {
            Verdict::Fail
        } else if verdicts.contains(&Judged::PassWithWarning) {
            Verdict::PassWithWarning
        } else {
            Verdict::Pass
        };
        if self.failure.is_none() && self.verdict == Verdict::Fail {
            self.failure = Some(format!(
                "objectives missed: RTO {}, RPO {}",
                self.rto.verdict.as_str(),
                self.rpo.verdict.as_str()
            ));
        }
        self.finished = Utc::now();
    }

    fn signed_bytes(&self) -> Vec<u8> {
        let mut unsigned = self.clone();
        unsigned.signature = None;
        serde_json::to_vec(&unsigned).expect("serialisable")
    }

    /// Sign with this host's report key (created on first use).
    pub fn sign(&mut self, state_dir: &Path) -> Result<()> {
        let key = signing::host_key(state_dir)?;
        self.signature = Some(signing::sign(&key, &self.signed_bytes()));
        Ok(())
    }
}

/// A report as read, before its signature is checked.
pub fn parse_report(text: &str) -> Result<Report> {
    serde_json::from_str(text).map_err(|e| Error::damaged(format!("not a veza-dr drill report: {e}")))
}

/// Check a report's signature against `trusted` keys. Returns the signer's key.
pub fn verify_report(text: &str, trusted: &[signing::PublicKey]) -> Result<signing::PublicKey> {
    let rep = parse_report(text)?;
    let sig = rep.signature.clone().ok_or_else(|| Error::damaged("the report is not signed"))?;
    signing::verify(&rep.signed_bytes(), &sig, trusted).map_err(|e| {
        if e.message.contains("altered") {
            Error::damaged("the report's signature does not match its content: it was altered after signing")
        } else {
            e.context(format!("drill report {} of policy {}", rep.id, rep.policy))
        }
    })
}

/// Store the report (JSON, Markdown, HTML with the history) in the repository and `dir`.
pub async fn store(repo: &Writer, rep: &Report, dir: &Path) -> Result<()> {
    let json = serde_json::to_vec_pretty(rep).expect("serialisable");
    let md = super::render::markdown(rep);
    let mut past = history(repo, &rep.policy).await.unwrap_or_default();
    past.retain(|r| r.id != rep.id);
    past.push(rep.clone());
    let page = super::render::html(rep, &past);
    repo.put_report(&rep.policy, &rep.id, "html", bytes::Bytes::from(page.clone())).await?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create report directory", dir, e))?;
    let base = format!("{}-{}", rep.policy, rep.id);
    std::fs::write(dir.join(format!("{base}.json")), &json).map_err(|e| Error::io("write report", dir, e))?;
    std::fs::write(dir.join(format!("{base}.md")), &md).map_err(|e| Error::io("write report", dir, e))?;
    std::fs::write(dir.join(format!("{base}.html")), &page).map_err(|e| Error::io("write report", dir, e))?;
    repo.put_report(&rep.policy, &rep.id, "json", bytes::Bytes::from(json)).await?;
    repo.put_report(&rep.policy, &rep.id, "md", bytes::Bytes::from(md)).await?;
    Ok(())
}

/// Every drill report of a policy in the repository, oldest first.
pub async fn history(repo: &Repository, policy: &str) -> Result<Vec<Report>> {
    let mut out = Vec::new();
    for (k, b) in repo.reports(policy).await? {
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
        assert_eq!(judge(Some(10.0), Some(100.0)), Judged::Pass);
        assert_eq!(judge(Some(85.0), Some(100.0)), Judged::PassWithWarning);
        assert_eq!(judge(Some(101.0), Some(100.0)), Judged::Fail);
        assert_eq!(judge(None, Some(100.0)), Judged::Fail);
        assert_eq!(judge(Some(1.0), None), Judged::NotSet);
    }
}
