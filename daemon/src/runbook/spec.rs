//! `[[runbook]]` declarations in policy files.
//!
//! ```toml
//! [[runbook]]
//! name = "db-failover"
//! objective = "5m"
//! connections = { standby = "env:VEZA_STANDBY_DSN" }   # the host holds DSNs
//! secrets = { pdns-key = "file:/etc/veza-dr/pdns.key" }
//!
//! [[runbook.step]]
//! name = "promote"
//! plugin = "pg-promote"                 # plugins/dist/pg-promote.wasm, or a path
//! with = { connection = "standby" }
//! grants = { connections = ["standby"] }
//! timeout = "2m"
//! retries = 1
//! on-failure = "abort"                  # or "continue"
//!
//! [[runbook.step]]
//! name = "restore"
//! builtin = "restore"                   # a host step: restore, drill or wait-sql
//! with = { policy = "db", repository = "dr", target = "/var/lib/postgresql/15/dr" }
//! ```

use crate::policy::{Dur, Size};
use crate::secret::SecretRef;
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RunbookSpec {
    pub name: String,
    pub description: Option<String>,
    /// How long the whole runbook may take (the plan's RTO for this failure, e.g. `5m`).
    pub objective: Option<Dur>,
    /// Named database connections: name → DSN reference.
    #[serde(default)]
    pub connections: BTreeMap<String, crate::source::postgres::Dsn>,
    /// Named secrets: name → reference.
    #[serde(default)]
    pub secrets: BTreeMap<String, SecretRef>,
    #[serde(default, rename = "step")]
    pub steps: Vec<StepSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct StepSpec {
    pub name: String,
    /// A WASM plugin: `plugins/dist/<plugin>.wasm`, or a path.
    #[serde(default)]
    pub plugin: String,
    /// Or a step built into the host: `restore`, `drill` or `wait-sql`.
    pub builtin: Option<String>,
    #[serde(default)]
    pub with: toml::Table,
    #[serde(default)]
    pub grants: GrantSpec,
    /// Deadline of one attempt (default 60s).
    pub timeout: Option<Dur>,
    #[serde(default)]
    pub retries: u32,
    /// Pause between attempts (default 2s).
    pub retry_delay: Option<Dur>,
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Linear memory the plugin may use (default 64MiB).
    pub memory_limit: Option<Size>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GrantSpec {
    #[serde(default)]
    pub http: Vec<String>,
    #[serde(default)]
    pub connections: Vec<String>,
    #[serde(default)]
    pub secrets: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    #[default]
    Abort,
    Continue,
}

pub const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
pub const DEFAULT_RETRY_DELAY: std::time::Duration = std::time::Duration::from_secs(2);
pub const DEFAULT_MEMORY: u64 = 64 << 20;

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl RunbookSpec {
    /// Checks serde cannot express; the message is prefixed with the runbook by the caller.
    pub fn validate(&self) -> Result<(), String> {
        if !valid_name(&self.name) {
            return Err("runbook names are made of letters, digits, `-` and `_`".into());
        }
        if self.steps.is_empty() {
            return Err("has no steps; add [[runbook.step]] tables".into());
        }
        for (i, st) in self.steps.iter().enumerate() {
            if !valid_name(&st.name) {
                return Err(format!("step {}: names are made of letters, digits, `-` and `_`", i + 1));
            }
            if self.steps[..i].iter().any(|o| o.name == st.name) {
                return Err(format!("step `{}` is declared twice", st.name));
            }
            match (&st.builtin, st.plugin.is_empty()) {
                (None, true) => return Err(format!("step `{}`: name a `plugin` or a `builtin`", st.name)),
                (Some(_), false) => {
                    return Err(format!("step `{}`: `plugin` and `builtin` exclude each other", st.name))
                }
                (Some(b), true) if !super::builtin::NAMES.contains(&b.as_str()) => {
                    return Err(format!(
                        "step `{}`: there is no built-in step `{b}` (built in: {})",
                        st.name,
                        super::builtin::NAMES.join(", ")
                    ))
                }
                _ => {}
            }
            for c in &st.grants.connections {
                if !self.connections.contains_key(c) {
                    return Err(format!(
                        "step `{}` is granted connection `{c}`, which the runbook does not declare",
                        st.name
                    ));
                }
            }
            for s in &st.grants.secrets {
                if !self.secrets.contains_key(s) {
                    return Err(format!(
                        "step `{}` is granted secret `{s}`, which the runbook does not declare",
                        st.name
                    ));
                }
            }
            if let Some(t) = st.timeout {
                if t.0.is_zero() {
                    return Err(format!("step `{}`: timeout must be more than 0", st.name));
                }
            }
            if let Some(m) = st.memory_limit {
                if m.0 < 1 << 20 || m.0 > 4 << 30 {
                    return Err(format!("step `{}`: memory-limit must be between 1MiB and 4GiB", st.name));
                }
            }
        }
        Ok(())
    }
}

impl StepSpec {
    /// The `with` table as the plugin sees it: scalars as text, arrays and tables as JSON.
    pub fn config(&self) -> Vec<(String, String)> {
        self.with
            .iter()
            .map(|(k, v)| {
                let text = match v {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Integer(i) => i.to_string(),
                    toml::Value::Float(f) => f.to_string(),
                    toml::Value::Boolean(b) => b.to_string(),
                    toml::Value::Datetime(d) => d.to_string(),
                    other => serde_json::to_string(other).unwrap_or_default(),
                };
                (k.clone(), text)
            })
            .collect()
    }

    /// What runs the step, as reports name it: the plugin, or `builtin:<name>`.
    pub fn engine(&self) -> String {
        match &self.builtin {
            Some(b) => format!("builtin:{b}"),
            None => self.plugin.clone(),
        }
    }

    pub fn timeout(&self) -> std::time::Duration {
        self.timeout.map(|d| d.0).unwrap_or(DEFAULT_TIMEOUT)
    }
}
