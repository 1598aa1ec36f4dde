//! DR runbooks: ordered steps, each a WASM component plugin run by the sandboxed host.
//!
//! Before anything runs, every step from the first one to run is prepared: its plugin loaded,
//! its configuration validated by the plugin, and the grants the plugin needs for that
//! configuration compared with what the runbook grants. A runbook that would fail on step 3
//! for a typo therefore fails before step 1 promotes anything.
//!
//! A dry run calls each step's `plan` (reads only: the host allows GET/HEAD and read-only SQL).
//! A run calls `run`, with retries for retryable failures and timeouts, then `verify` when the
//! plugin offers it. Every step's outcome is appended to the audit log (JSON lines).

mod audit;
pub mod builtin;
pub mod host;
pub mod readonly;
pub mod spec;

use crate::error::{Error, Kind, Result};
use audit::Audit;
pub use audit::{read_audit, AuditRecord};
use host::{CallError, Context, Host, Plugin, StepState};
use serde::{Deserialize, Serialize};
use spec::{OnFailure, RunbookSpec, StepSpec};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How to execute a runbook.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where `<plugin>.wasm` files are looked up.
    pub plugins_dir: PathBuf,
    /// Compiled-plugin cache (`None`: compile every time).
    pub cache_dir: Option<PathBuf>,
    /// The audit log (JSON lines), appended to.
    pub audit_log: PathBuf,
    pub dry_run: bool,
    /// Start at this step (after a failed run); earlier steps' facts come from the audit log.
    pub from: Option<String>,
    /// Who runs it, for the audit log.
    pub who: String,
    /// Where built-in steps find the policies they name, and veza-dr's state.
    pub policies_dir: PathBuf,
    pub state_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// The dry run planned the step.
    Planned,
    Ok,
    Failed,
    /// Not reached: an earlier step failed with `on-failure = "abort"`.
    NotRun,
    /// Before `--from`.
    Skipped,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct StepReport {
    pub name: String,
    pub plugin: String,
    pub plugin_version: String,
    pub status: Status,
    pub attempts: u32,
    pub seconds: f64,
    pub summary: String,
    pub error: Option<String>,
    pub plan: Vec<String>,
    pub facts: BTreeMap<String, String>,
    pub on_failure: OnFailure,
    /// What the plugin logged, `level: message`, at most 200 lines.
    #[serde(default)]
    pub logs: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RunReport {
    pub runbook: String,
    pub dry_run: bool,
    pub started: chrono::DateTime<chrono::Utc>,
    pub seconds: f64,
    pub objective_seconds: Option<f64>,
    /// Whether the run finished within the objective (`None` for dry runs or no objective).
    pub within_objective: Option<bool>,
    /// The data lost at most, as the steps measured it (`rpo-seconds`: the failover's start
    /// minus the last transaction recovered).
    #[serde(default)]
    pub rpo_seconds: Option<f64>,
    pub ok: bool,
    pub steps: Vec<StepReport>,
}

/// Find a runbook by name in any policy file of `dir`. Files that fail to parse are skipped
/// (an unrelated broken policy must not block a failover) but named if the runbook is missing.
pub fn find(dir: &Path, name: &str) -> Result<RunbookSpec> {
    let (mut known, mut broken) = (Vec::new(), Vec::new());
    for (p, doc) in crate::policy::load_documents(dir)? {
        match doc {
            Ok(doc) => {
                for rb in doc.runbooks {
                    if rb.name == name {
                        return Ok(rb);
                    }
                    known.push(rb.name);
                }
            }
            Err(e) => {
                tracing::warn!(file = %p.display(), error = %e.message, "skipping a policy file that does not parse");
                broken.push(e.message);
            }
        }
    }
    let mut hint = if known.is_empty() {
        "declare it as [[runbook]] in a policy file".to_string()
    } else {
        format!("known runbooks: {}", known.join(", "))
    };
    if !broken.is_empty() {
        hint.push_str(&format!("; files that do not parse: {}", broken.join(" | ")));
    }
    Err(Error::not_found(format!("runbook `{name}` not found in {}", dir.display())).with_hint(hint))
}

/// A step ready to run: plugin loaded (or built-in step checked), config validated, grants
/// checked.
struct Prepared<'a> {
    spec: &'a StepSpec,
    engine: Engine,
    version: String,
    config: Vec<(String, String)>,
    /// The deadline of one attempt.
    timeout: Duration,
}

enum Engine {
    Wasm { plugin: Plugin, verifies: bool },
    Builtin(builtin::Builtin),
}

impl Engine {
    /// What the audit log records as the code that ran.
    fn hash(&self) -> String {
        match self {
            Engine::Wasm { plugin, .. } => plugin.hash.clone(),
            Engine::Builtin(_) => format!("veza-dr {}", env!("CARGO_PKG_VERSION")),
        }
    }
}

fn step_error(rb: &RunbookSpec, st: &StepSpec, kind: Kind, msg: impl std::fmt::Display) -> Error {
    let what = match &st.builtin {
        Some(b) => format!("built-in `{b}`"),
        None => format!("plugin `{}`", st.plugin),
    };
    Error::new(kind, format!("runbook `{}` step `{}` ({what}): {msg}", rb.name, st.name))
}

impl Options {
    fn state(
        &self,
        rb: &RunbookSpec,
        st: &StepSpec,
        timeout: Duration,
        plan: bool,
        rt: &tokio::runtime::Handle,
    ) -> StepState {
        StepState::new(
            &rb.name,
            &st.name,
            st.grants.clone(),
            rb.connections.clone(),
            rb.secrets.clone(),
            timeout,
            st.memory_limit.map(|m| m.0).unwrap_or(spec::DEFAULT_MEMORY),
            plan,
            rt.clone(),
        )
    }
}

/// Load, validate and grant-check one step.
fn prepare<'a>(
    host: &Host,
    rb: &RunbookSpec,
    st: &'a StepSpec,
    opts: &Options,
    rt: &tokio::runtime::Handle,
) -> Result<Prepared<'a>> {
    if let Some(name) = &st.builtin {
        let b = builtin::Builtin::prepare(name, st, rb, &opts.policies_dir).map_err(|e| {
            let kind = if matches!(e, CallError::Step(host::StepError::InvalidConfig(_))) {
                Kind::Policy
            } else {
                Kind::Failed
            };
            step_error(rb, st, kind, format!("validate: {e}"))
        })?;
        let timeout = st.timeout.map(|d| d.0).unwrap_or_else(|| b.default_timeout(rb));
        return Ok(Prepared {
            spec: st,
            engine: Engine::Builtin(b),
            version: env!("CARGO_PKG_VERSION").into(),
            config: st.config(),
            timeout,
        });
    }
    let plugin = host.load(&st.plugin).map_err(|e| {
        let hint = e.hint.clone();
        let mut err = step_error(rb, st, e.kind, &e.message);
        err.hint = hint;
        err
    })?;
    let config = st.config();
    let call = |what: &str, e: CallError| {
        let kind = match e {
            CallError::Step(host::StepError::InvalidConfig(_)) | CallError::Interface(_) => Kind::Policy,
            _ => Kind::Failed,
        };
        step_error(rb, st, kind, format!("{what}: {e}"))
    };
    let mut inst = host
        .instantiate(&plugin, opts.state(rb, st, Duration::from_secs(10), true, rt))
        .map_err(|e| call("load", e))?;
    let desc = inst.describe().map_err(|e| call("describe", e))?;
    inst.validate(&config).map_err(|e| call("validate", e))?;
    let needs = inst.needs_for(&config).map_err(|e| call("needs-for", e))?;
    let g = &st.grants;
    // What the plugin always needs (`describe`) plus what this configuration needs.
    let missing = [
        ("http", &desc.needs.http, &needs.http, &g.http),
        ("connections", &desc.needs.connections, &needs.connections, &g.connections),
        ("secrets", &desc.needs.secrets, &needs.secrets, &g.secrets),
    ]
    .into_iter()
    .flat_map(|(kind, always, this, have)| {
        always.iter().chain(this).filter(|n| !have.contains(n)).map(move |n| format!("{kind} `{n}`"))
    })
    .collect::<Vec<_>>();
    if !missing.is_empty() {
        return Err(step_error(rb, st, Kind::Policy, format!("needs grants it was not given: {}", missing.join(", ")))
            .with_hint(format!(
                "add them to the step's `grants` in the policy, e.g. grants = {{ {} }}",
                grant_example(&missing)
            )));
    }
    let engine = Engine::Wasm { plugin, verifies: desc.verifies };
    Ok(Prepared { spec: st, engine, version: desc.version, config, timeout: st.timeout() })
}

fn grant_example(missing: &[String]) -> String {
    let mut by: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for m in missing {
        if let Some((k, v)) = m.split_once(' ') {
            by.entry(k).or_default().push(v.trim_matches('`').to_string());
        }
    }
    by.iter().map(|(k, v)| format!("{k} = {:?}", v)).collect::<Vec<_>>().join(", ")
}

/// Execute (or dry-run) a runbook. Blocking: call it from a blocking thread; `rt` serves the
/// host's HTTP and SQL calls. `progress` sees each step's report as it completes.
pub fn execute(
    rb: &RunbookSpec,
    opts: &Options,
    rt: &tokio::runtime::Handle,
    mut progress: impl FnMut(&StepReport),
) -> Result<RunReport> {
    let started_at = chrono::Utc::now();
    let start = Instant::now();
    let first = match &opts.from {
        None => 0,
        Some(f) => rb.steps.iter().position(|s| &s.name == f).ok_or_else(|| {
            Error::usage(format!("runbook `{}` has no step `{f}`", rb.name)).with_hint(format!(
                "steps: {}",
                rb.steps.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
            ))
        })?,
    };
    // One real run of a runbook at a time on this host (dry runs do not change anything).
    let _lock = if opts.dry_run { None } else { Some(lock(rb, opts)?) };
    let host = Host::new(&opts.plugins_dir, opts.cache_dir.as_deref())?;
    let prepared = rb.steps[first..].iter().map(|st| prepare(&host, rb, st, opts, rt)).collect::<Result<Vec<_>>>()?;

    let mut facts: BTreeMap<String, String> = BTreeMap::new();
    facts.insert("runbook".into(), rb.name.clone());
    // Milliseconds: the RPO is measured from it, and whole seconds cut up to 1 s off it.
    facts.insert("started-at".into(), started_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    facts.insert("mode".into(), if opts.dry_run { "dry-run" } else { "run" }.into());
    let audit = Audit { path: &opts.audit_log, who: &opts.who, runbook: &rb.name, dry_run: opts.dry_run };
    let mut steps: Vec<StepReport> = Vec::new();
    for st in &rb.steps[..first] {
        let earlier = audit.last_facts(&st.name);
        let report = StepReport {
            name: st.name.clone(),
            plugin: st.engine(),
            plugin_version: String::new(),
            status: Status::Skipped,
            attempts: 0,
            seconds: 0.0,
            summary: format!("skipped (--from {})", rb.steps[first].name),
            error: None,
            plan: vec![],
            facts: earlier.clone(),
            on_failure: st.on_failure,
            logs: vec![],
        };
        facts.extend(earlier);
        progress(&report);
        steps.push(report);
    }
    let mut aborted = false;
    for p in &prepared {
        let st = p.spec;
        let mut report = StepReport {
            name: st.name.clone(),
            plugin: st.engine(),
            plugin_version: p.version.clone(),
            status: Status::NotRun,
            attempts: 0,
            seconds: 0.0,
            summary: String::new(),
            error: None,
            plan: vec![],
            facts: BTreeMap::new(),
            on_failure: st.on_failure,
            logs: vec![],
        };
        if aborted {
            report.summary = "not run: an earlier step failed".into();
            progress(&report);
            steps.push(report);
            continue;
        }
        let t = Instant::now();
        let fact_list: Vec<(String, String)> = facts.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let ctx = |attempt: u32| Context {
            runbook: rb.name.clone(),
            step: st.name.clone(),
            config: p.config.clone(),
            facts: fact_list.clone(),
            deadline_ms: p.timeout.as_millis() as u64,
            attempt,
        };
        let result = if opts.dry_run {
            report.attempts = 1;
            let planned = match &p.engine {
                Engine::Wasm { plugin, .. } => {
                    let state = opts.state(rb, st, p.timeout, true, rt);
                    call(&host, plugin, state, &mut report.logs, |i| i.plan(&ctx(1)))
                }
                Engine::Builtin(b) => b.plan(&builtin_env(rb, st, opts, rt, &facts)),
            };
            planned.map(|plan| {
                report.plan = plan;
                String::new()
            })
        } else {
            run_with_retries(&host, rb, p, opts, rt, &ctx, &facts, &mut report)
        };
        report.seconds = t.elapsed().as_secs_f64();
        match result {
            Ok(summary) => {
                report.status = if opts.dry_run { Status::Planned } else { Status::Ok };
                report.summary = summary;
                facts.extend(report.facts.clone());
            }
            Err(e) => {
                report.status = Status::Failed;
                report.error = Some(e.to_string());
                aborted = st.on_failure == OnFailure::Abort;
            }
        }
        audit.append(&report, &p.engine.hash(), &p.config);
        progress(&report);
        steps.push(report);
    }
    let seconds = start.elapsed().as_secs_f64();
    let objective_seconds = rb.objective.map(|d| d.0.as_secs_f64());
    let ok = steps.iter().all(|s| s.status != Status::Failed);
    let rpo_seconds = if opts.dry_run {
        None
    } else {
        steps.iter().rev().find_map(|s| s.facts.get("rpo-seconds").and_then(|v| v.parse::<f64>().ok()))
    };
    let report = RunReport {
        runbook: rb.name.clone(),
        dry_run: opts.dry_run,
        started: started_at,
        seconds,
        within_objective: if opts.dry_run { None } else { objective_seconds.map(|o| ok && seconds <= o) },
        objective_seconds,
        rpo_seconds,
        ok,
        steps,
    };
    audit.finish(&report);
    Ok(report)
}

/// An exclusive lock beside the audit log, held for the run; released when the process ends.
fn lock(rb: &RunbookSpec, opts: &Options) -> Result<std::fs::File> {
    let dir = opts.audit_log.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
    let path = dir.join(format!("{}.lock", rb.name));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io("open runbook lock", &path, e))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::new(
            Kind::Locked,
            format!("runbook `{}` is already running on this host (lock {})", rb.name, path.display()),
        )
        .with_hint("wait for it to finish; its steps are in the audit log")),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io("lock", &path, e)),
    }
}

/// Instantiate, make one call, and keep what the plugin logged (bounded) for the report.
fn call<T>(
    host: &Host,
    plugin: &Plugin,
    state: StepState,
    logs: &mut Vec<String>,
    f: impl FnOnce(&mut host::Instance) -> Result<T, CallError>,
) -> Result<T, CallError> {
    let mut inst = host.instantiate(plugin, state)?;
    let r = f(&mut inst);
    for (level, msg) in inst.logs() {
        if logs.len() < 200 {
            let level = match level {
                host::Level::Debug => "debug",
                host::Level::Info => "info",
                host::Level::Warn => "warn",
                host::Level::Error => "error",
            };
            logs.push(format!("{level}: {msg}"));
        }
    }
    r
}

fn builtin_env<'a>(
    rb: &'a RunbookSpec,
    st: &'a StepSpec,
    opts: &'a Options,
    rt: &'a tokio::runtime::Handle,
    facts: &'a BTreeMap<String, String>,
) -> builtin::Env<'a> {
    builtin::Env { rb, st, state_dir: &opts.state_dir, plugins_dir: &opts.plugins_dir, rt, facts }
}

/// Run a step's attempts; `Ok` carries the summary and fills the report's facts.
#[allow(clippy::too_many_arguments)]
fn run_with_retries(
    host: &Host,
    rb: &RunbookSpec,
    p: &Prepared,
    opts: &Options,
    rt: &tokio::runtime::Handle,
    ctx: &dyn Fn(u32) -> Context,
    facts: &BTreeMap<String, String>,
    report: &mut StepReport,
) -> Result<String, CallError> {
    let st = p.spec;
    let attempts = st.retries + 1;
    for attempt in 1..=attempts {
        report.attempts = attempt;
        let out = match &p.engine {
            Engine::Wasm { plugin, .. } => {
                let state = opts.state(rb, st, p.timeout, false, rt);
                call(host, plugin, state, &mut report.logs, |i| i.run(&ctx(attempt)))
                    .map(|o| (o.summary, o.facts.into_iter().collect::<BTreeMap<_, _>>()))
            }
            Engine::Builtin(b) => b.run(&builtin_env(rb, st, opts, rt, facts), p.timeout).map(|o| (o.summary, o.facts)),
        };
        match out {
            Ok((summary, facts)) => {
                report.facts = facts;
                let Engine::Wasm { plugin, verifies: true } = &p.engine else { return Ok(summary) };
                let mut vctx = ctx(attempt);
                vctx.facts.extend(report.facts.clone());
                let state = opts.state(rb, st, p.timeout, false, rt);
                let v = call(host, plugin, state, &mut report.logs, |i| i.verify(&vctx));
                return match v {
                    Ok(v) => Ok(format!("{summary}; verified: {}", v.summary)),
                    Err(e) => Err(CallError::Step(host::StepError::Failed(format!("ran, but verify {e}")))),
                };
            }
            Err(e) if e.retryable() && attempt < attempts => {
                let delay = st.retry_delay.map(|d| d.0).unwrap_or(spec::DEFAULT_RETRY_DELAY);
                tracing::warn!(runbook = %rb.name, step = %st.name, attempt, error = %e, "step failed; retrying in {delay:?}");
                std::thread::sleep(delay);
            }
            Err(e) => return Err(e),
        }
    }
    unreachable!("the loop returns on the last attempt")
}

/// Who is running this, for the audit log: the invoking user behind sudo, else the user.
pub fn who() -> String {
    let uid = nix::unistd::getuid();
    let name = nix::unistd::User::from_uid(uid).ok().flatten().map(|u| u.name).unwrap_or_else(|| uid.to_string());
    match std::env::var("SUDO_USER") {
        Ok(s) if !s.is_empty() => format!("{s} (as {name})"),
        _ => name,
    }
}
