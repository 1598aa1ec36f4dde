//! The operator's questions: `status` (are we OK?), `check` (is the set-up right?), and the
//! shell completions and man pages generated from the command-line definition.

use super::commands::print_json;
use super::output::bytes;
use super::{load_policy, Global};
use crate::error::{Error, Result};
use crate::jobs::status::{human, utc};
use std::path::Path;

pub async fn status(g: &Global, names: &[String], daemon: &str) -> Result<i32> {
    let mut policies = Vec::new();
    let mut invalid = Vec::new();
    if names.is_empty() {
        for p in crate::policy::load_dir(&g.policies)? {
            match p {
                Ok(p) => policies.push(p),
                Err(e) => invalid.push(e.message),
            }
        }
    } else {
        for n in names {
            policies.push(load_policy(g, n)?);
        }
    }
    if policies.is_empty() && invalid.is_empty() {
        return Err(Error::not_found(format!("no policy in {}", g.policies.display()))
            .with_hint("pass --policies DIR or set VEZA_DR_POLICIES"));
    }
    let daemon = (!daemon.is_empty()).then_some(daemon);
    let st = crate::jobs::status::run(&policies, daemon, &super::state_dir(g)).await;
    let ok = st.ok && invalid.is_empty();
    if g.json {
        let mut v = serde_json::to_value(&st).expect("serialisable");
        v["ok"] = ok.into();
        v["invalid-policies"] = invalid.clone().into();
        crate::outln!("{}", serde_json::to_string_pretty(&v).expect("serialisable"));
        return Ok(if ok { 0 } else { 1 });
    }
    crate::outln!("status at {} (next jobs from the {})", utc(st.checked_at), st.next_from);
    for p in &st.policies {
        crate::outln!();
        crate::outln!("{} ({}) in {}", p.policy, p.source.as_str(), p.repository);
        let rpo = p.rpo_seconds.map(|r| format!(" (RPO {})", human(r))).unwrap_or_default();
        for (label, b) in [("full", &p.full), ("incremental", &p.incremental)] {
            match b {
                Some(b) => crate::outln!("  {label:<12} {}  {}  {} ago", b.id, utc(b.finished), human(b.age_seconds)),
                None => crate::outln!("  {label:<12} none"),
            }
        }
        if let Some(w) = &p.wal {
            match (&w.newest, w.stored_at, w.age_seconds) {
                (Some(n), Some(at), Some(a)) => crate::outln!(
                    "  {:<12} {n}  {}  {} ago; {}",
                    "WAL",
                    utc(at),
                    human(a),
                    if w.gap_segments == 0 {
                        "continuous".into()
                    } else {
                        format!("GAP of {} segments", w.gap_segments)
                    }
                ),
                _ => crate::outln!("  {:<12} nothing archived yet", "WAL"),
            }
        }
        if let (Some(t), Some(a)) = (p.recovery_point, p.recovery_point_age_seconds) {
            crate::outln!("  {:<12} {}  {} ago{rpo}", "recoverable", utc(t), human(a));
        }
        let every = p.drill_every_seconds.map(|e| format!(" (scheduled every {})", human(e))).unwrap_or_default();
        match &p.drill {
            Some(d) => crate::outln!(
                "  {:<12} {}  {}  {}  {} ago{every}",
                "drill",
                d.verdict.as_str(),
                d.id,
                utc(d.finished),
                human(d.age_seconds)
            ),
            None => crate::outln!("  {:<12} none yet{every}", "drill"),
        }
        let next: Vec<String> =
            p.next.iter().map(|n| format!("{} {}", n.job, n.at.map(utc).unwrap_or_else(|| "never".into()))).collect();
        crate::outln!(
            "  {:<12} {}",
            "next",
            if next.is_empty() { "nothing scheduled".into() } else { next.join(", ") }
        );
        if let (Some(b), Some(o)) = (p.repository_bytes, p.repository_objects) {
            crate::outln!("  {:<12} {} in {o} objects", "repository", bytes(b));
        }
        for r in &p.replicas {
            match (&r.recovery_point, r.recovery_point_age_seconds) {
                (Some(t), Some(a)) => crate::outln!(
                    "  {:<12} {}: recoverable {}  {} ago ({})",
                    "replica",
                    r.name,
                    utc(*t),
                    human(a),
                    r.repository
                ),
                _ => crate::outln!("  {:<12} {}: no snapshot yet ({})", "replica", r.name, r.repository),
            }
            if r.wal_queued > 0 {
                crate::outln!(
                    "  {:<12} {}: {} WAL segments queued on this host, not sent yet",
                    "",
                    r.name,
                    r.wal_queued
                );
            }
        }
        if p.untrusted_snapshots > 0 {
            crate::outln!(
                "  {:<12} {} snapshots signed by no trusted writer (ignored)",
                "untrusted",
                p.untrusted_snapshots
            );
        }
        for b in &p.breaches {
            crate::outln!("  BREACHED     {b}");
        }
    }
    for e in &invalid {
        crate::outln!("\ninvalid policy: {e}");
    }
    crate::outln!();
    let breached: usize = st.policies.iter().map(|p| p.breaches.len()).sum::<usize>() + invalid.len();
    if ok {
        crate::outln!("OK: every objective holds");
    } else {
        crate::outln!("BREACHED: {breached} objectives do not hold");
    }
    Ok(if ok { 0 } else { 1 })
}

pub async fn check(g: &Global, name: &str, timeout: std::time::Duration) -> Result<i32> {
    let p = load_policy(g, name)?;
    let policy_path = if name.ends_with(".toml") {
        std::fs::canonicalize(name).unwrap_or_else(|_| name.into())
    } else {
        std::fs::canonicalize(g.policies.join(format!("{name}.toml"))).unwrap_or_else(|_| g.policies.join(name))
    };
    let o = crate::jobs::check::Options { timeout, policy_path: policy_path.display().to_string() };
    let r = crate::jobs::check::run(&p, &o).await;
    if g.json {
        print_json(&r);
    } else {
        for c in &r.checks {
            crate::outln!("{:<7} {}: {}", if c.ok { "ok" } else { "FAILED" }, c.check, c.detail);
            if let Some(h) = &c.hint {
                crate::outln!("        hint: {h}");
            }
        }
        crate::outln!("{}", if r.ok { "all checks passed" } else { "SOME CHECKS FAILED" });
    }
    Ok(if r.ok { 0 } else { 1 })
}

pub fn completions(shell: clap_complete::Shell) -> Result<i32> {
    let mut cmd = <super::Cli as clap::CommandFactory>::command();
    clap_complete::generate(shell, &mut cmd, "veza-dr", &mut std::io::stdout());
    Ok(0)
}

/// One man page per command (`veza-dr.1`, `veza-dr-backup.1`, …) into `dir`.
pub fn man(dir: &Path) -> Result<i32> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
    let cmd = <super::Cli as clap::CommandFactory>::command();
    clap_mangen::generate_to(cmd, dir).map_err(|e| Error::io("write man pages in", dir, e))?;
    Ok(0)
}
