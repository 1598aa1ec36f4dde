//! `veza-dr failover` and `veza-dr plugins`.

use super::{state_dir, Global};
use crate::error::{Error, Result};
use crate::runbook::{self, host::Host, RunReport, Status, StepReport};
use std::io::IsTerminal;
use std::path::PathBuf;

fn options(g: &Global, dry_run: bool, from: Option<String>, audit_log: Option<PathBuf>) -> runbook::Options {
    let state = state_dir(g);
    runbook::Options {
        plugins_dir: g.plugins.clone(),
        cache_dir: Some(state.join("plugins")),
        audit_log: audit_log.unwrap_or_else(|| state.join("runbooks").join("audit.log")),
        dry_run,
        from,
        who: runbook::who(),
        policies_dir: g.policies.clone(),
        state_dir: state,
    }
}

/// Run the runbook on a blocking thread (plugin calls block), printing steps as they finish.
async fn execute(g: &Global, rb: &crate::runbook::spec::RunbookSpec, opts: runbook::Options) -> Result<RunReport> {
    let rt = tokio::runtime::Handle::current();
    let (rb, json) = (rb.clone(), g.json);
    let total = rb.steps.len();
    tokio::task::spawn_blocking(move || {
        let mut n = 0;
        runbook::execute(&rb, &opts, &rt, |s| {
            n += 1;
            if !json {
                print_step(n, total, s);
            }
        })
    })
    .await
    .map_err(|e| Error::failed(format!("the runbook thread failed: {e}")))?
}

fn print_step(n: usize, total: usize, s: &StepReport) {
    let plugin =
        if s.plugin_version.is_empty() { s.plugin.clone() } else { format!("{} {}", s.plugin, s.plugin_version) };
    let head = format!("[{n}/{total}] {} ({plugin})", s.name);
    match s.status {
        Status::Planned => {
            crate::outln!("{head}: would");
            for line in &s.plan {
                crate::outln!("      - {line}");
            }
        }
        Status::Ok => {
            let tries = if s.attempts > 1 { format!(", {} attempts", s.attempts) } else { String::new() };
            crate::outln!("{head}: ok in {:.1}s{tries}: {}", s.seconds, s.summary);
        }
        Status::Failed => crate::outln!(
            "{head}: FAILED after {:.1}s ({} attempt(s), on-failure {}): {}",
            s.seconds,
            s.attempts,
            serde_json::to_value(s.on_failure).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
            s.error.as_deref().unwrap_or("")
        ),
        Status::NotRun | Status::Skipped => crate::outln!("{head}: {}", s.summary),
    }
}

pub async fn failover(
    g: &Global,
    name: &str,
    dry_run: bool,
    yes: bool,
    from: Option<String>,
    audit_log: Option<PathBuf>,
) -> Result<i32> {
    let rb = runbook::find(&g.policies, name)?;
    if !dry_run && !yes {
        if !std::io::stdin().is_terminal() || g.json {
            return Err(Error::usage(format!("runbook `{name}`: pass --dry-run to see the plan or --yes to run it"))
                .with_hint("without either, veza-dr asks for confirmation on a terminal"));
        }
        crate::outln!("Plan of runbook `{name}`:");
        let plan = execute(g, &rb, options(g, true, from.clone(), audit_log.clone())).await?;
        if !plan.ok {
            crate::outln!("the dry run failed; not asking to run it");
            return Ok(1);
        }
        eprint!("Type the runbook name (`{name}`) to run it now: ");
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer).map_err(|e| Error::failed(format!("cannot read the answer: {e}")))?;
        if answer.trim() != name {
            crate::outln!("not confirmed; nothing was run");
            return Ok(1);
        }
    }
    let report = execute(g, &rb, options(g, dry_run, from, audit_log)).await?;
    if g.json {
        crate::outln!("{}", serde_json::to_string_pretty(&report).expect("serialisable"));
    } else {
        let verdict = if report.dry_run {
            if report.ok {
                "dry run: every step planned, nothing changed"
            } else {
                "dry run: a step cannot be planned"
            }
        } else if report.ok {
            "done"
        } else {
            "FAILED"
        };
        let objective = match (report.objective_seconds, report.dry_run) {
            (Some(o), false) => format!(
                " (objective {}: {})",
                humantime::format_duration(std::time::Duration::from_secs_f64(o)),
                if report.within_objective == Some(true) { "met" } else { "MISSED" }
            ),
            _ => String::new(),
        };
        crate::outln!("runbook {}: {verdict} in {:.1}s{objective}", report.runbook, report.seconds);
        if !report.dry_run {
            let rpo = report.rpo_seconds.map(|r| format!("{r:.1}s (from the last recovered transaction to the start)"));
            crate::outln!(
                "measured: RTO {:.1}s, RPO {}",
                report.seconds,
                rpo.unwrap_or_else(|| "not measured (no restore step)".into())
            );
        }
    }
    match report.steps.iter().find(|s| s.status == Status::Failed) {
        None => Ok(0),
        Some(f) => {
            let err = Error::failed(format!(
                "runbook `{}` step `{}` ({}): {}",
                report.runbook,
                f.name,
                match f.plugin.strip_prefix("builtin:") {
                    Some(b) => format!("built-in `{b}`"),
                    None => format!("plugin `{}`", f.plugin),
                },
                f.error.as_deref().unwrap_or("failed")
            ));
            Err(if report.dry_run {
                err.with_hint("fix the step's configuration or its peer, then run the dry run again")
            } else {
                err.with_hint(format!("resume with: veza-dr failover {} --from {} --yes", report.runbook, f.name))
            })
        }
    }
}

/// Every plugin in the plugins directory: its description and load time (cold or cached).
pub async fn plugins(g: &Global) -> Result<i32> {
    let dir = g.plugins.clone();
    let cache = state_dir(g).join("plugins");
    let rows = tokio::task::spawn_blocking(move || -> Result<Vec<serde_json::Value>> {
        let host = Host::new(&dir, Some(&cache))?;
        let rd = std::fs::read_dir(&dir).map_err(|e| {
            Error::io("read plugins directory", &dir, e)
                .with_hint("build them with plugins/build.sh or pass --plugins DIR")
        })?;
        let mut files: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "wasm"))
            .collect();
        files.sort();
        let rt = tokio::runtime::Handle::current();
        let mut rows = Vec::new();
        for f in files {
            let name = f.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let row = match host.load(&name) {
                Ok(p) => {
                    let state = crate::runbook::host::StepState::new(
                        "-",
                        "-",
                        Default::default(),
                        Default::default(),
                        Default::default(),
                        std::time::Duration::from_secs(5),
                        crate::runbook::spec::DEFAULT_MEMORY,
                        true,
                        rt.clone(),
                    );
                    let t = std::time::Instant::now();
                    match host.instantiate(&p, state).and_then(|mut i| i.describe()) {
                        Ok(d) => serde_json::json!({
                            "plugin": name, "version": d.version, "summary": d.summary, "verifies": d.verifies,
                            "load-ms": p.load_time.as_secs_f64() * 1e3, "cached": p.cached,
                            "call-ms": t.elapsed().as_secs_f64() * 1e3, "hash": p.hash,
                        }),
                        Err(e) => serde_json::json!({"plugin": name, "error": e.to_string()}),
                    }
                }
                Err(e) => serde_json::json!({"plugin": name, "error": e.message}),
            };
            rows.push(row);
        }
        Ok(rows)
    })
    .await
    .map_err(|e| Error::failed(format!("the plugin thread failed: {e}")))??;
    if g.json {
        crate::outln!("{}", serde_json::to_string_pretty(&rows).expect("serialisable"));
        return Ok(0);
    }
    crate::outln!("{:<16} {:<8} {:>9} {:>9}  {}", "PLUGIN", "VERSION", "LOAD", "CALL", "WHAT IT DOES");
    for r in &rows {
        let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
        if let Some(e) = r["error"].as_str() {
            crate::outln!("{:<16} error: {e}", s("plugin"));
            continue;
        }
        let load =
            format!("{:.2}ms{}", r["load-ms"].as_f64().unwrap_or(0.0), if r["cached"] == true { "" } else { "*" });
        crate::outln!(
            "{:<16} {:<8} {:>9} {:>7.2}ms  {}",
            s("plugin"),
            s("version"),
            load,
            r["call-ms"].as_f64().unwrap_or(0.0),
            s("summary")
        );
    }
    crate::outln!("(* compiled now; later loads come from the cache in {})", state_dir(g).join("plugins").display());
    Ok(0)
}
