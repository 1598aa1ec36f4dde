//! The dispatch of subcommands, and the ones that touch no repository: policy check,
//! keygen, history, drills and report verification.

use super::output::bytes;
use super::{data, load_policy, primary_only, state_dir, Cli, Command, Global, PolicyCmd, ReportCmd};
use crate::error::{Error, Result};
use std::path::Path;

pub async fn dispatch(cli: Cli) -> Result<i32> {
    let g = cli.global;
    match cli.command {
        Command::Policy { cmd: PolicyCmd::Check { dir } } => policy_check(&g, dir.as_deref().unwrap_or(&g.policies)),
        Command::Keygen { signing: true, .. } => {
            let key = crate::crypto::signing::host_key(&state_dir(&g))?;
            crate::outln!("{}", crate::crypto::signing::public_text(&key));
            Ok(0)
        }
        Command::Keygen { output, .. } => keygen(&g, output.as_deref()),
        Command::Status { names, daemon } => super::health::status(&g, &names, &daemon).await,
        Command::Check { policy, timeout } => super::health::check(&g, &policy, timeout).await,
        Command::Completions { shell } => super::health::completions(shell),
        Command::Man { dir } => super::health::man(&dir),
        Command::Replicate { policy, replica } => {
            primary_only(&g, "replicate")?;
            data::replicate(&g, &load_policy(&g, &policy)?, replica.as_deref()).await
        }
        Command::Init { policy } => {
            primary_only(&g, "init")?;
            data::init(&g, &load_policy(&g, &policy)?).await
        }
        Command::Drill { policy, identity, snapshot, report_dir } => {
            let p = load_policy(&g, &policy)?;
            let o = crate::jobs::drill::Options {
                state_dir: state_dir(&g),
                report_dir,
                identity,
                snapshot: snapshot.filter(|s| s != "latest"),
                plugins_dir: g.plugins.clone(),
                lock_wait: g.lock_wait,
                phase: Default::default(),
            };
            let spin = {
                let (phase, name) = (o.phase.clone(), p.name.clone());
                super::output::spinner(!g.json, move || format!("drill of {name}: {}", phase.get()))
            };
            let reports = crate::jobs::drill::run_all(&p, &o).await;
            spin.finish().await;
            let reports = reports?;
            for r in &reports {
                if g.json {
                    crate::outln!("{}", serde_json::to_string(r).expect("serialisable"));
                } else {
                    crate::out!("{}", crate::jobs::drill::render::markdown(r));
                }
            }
            Ok(if reports.iter().any(|r| r.verdict == crate::jobs::drill::Verdict::Fail) { 1 } else { 0 })
        }
        Command::Drills { policy } => drills(&g, &load_policy(&g, &policy)?).await,
        Command::Failover { runbook, dry_run, yes, from, audit_log } => {
            super::failover::failover(&g, &runbook, dry_run, yes, from, audit_log).await
        }
        Command::Plugins => super::failover::plugins(&g).await,
        Command::Report { cmd: ReportCmd::Verify { file } } => {
            let text = std::fs::read_to_string(&file).map_err(|e| Error::io("read report", &file, e))?;
            // Trusted: this host's key, and the signers the report's policy lists.
            let mut trusted: Vec<_> = crate::crypto::signing::host_public(&state_dir(&g)).into_iter().collect();
            if let Ok(p) = crate::jobs::drill::parse_report(&text).and_then(|r| load_policy(&g, &r.policy)) {
                trusted.extend(p.trust.report_signers.iter().cloned());
            }
            let key = crate::jobs::drill::verify_report(&text, &trusted)?;
            crate::outln!("signature ok: signed by {key}, a trusted signer");
            Ok(0)
        }
        Command::Backup { policy, full, incremental } => {
            primary_only(&g, "backup")?;
            let mode = match (full, incremental) {
                (true, _) => crate::jobs::backup::Mode::Full,
                (_, true) => crate::jobs::backup::Mode::Incremental,
                _ => crate::jobs::backup::Mode::Auto,
            };
            data::backup(&g, &load_policy(&g, &policy)?, mode).await
        }
        Command::Snapshots { policy } => data::snapshots(&g, &load_policy(&g, &policy)?).await,
        Command::Restore {
            policy,
            snapshot,
            target,
            target_dsn,
            include,
            identity,
            overwrite,
            delta,
            checksum,
            to_time,
            to_lsn,
            to_xid,
            to_name,
            immediate,
            start,
            port,
            socket_dir,
            listen,
            jobs,
        } => {
            let p = load_policy(&g, &policy)?;
            let req = crate::jobs::restore::RestoreRequest {
                snapshot,
                target,
                target_dsn,
                includes: include,
                overwrite,
                delta,
                checksum,
                records: Some(crate::pipeline::record::dir(&state_dir(&g))),
                recovery: crate::source::postgres::RecoveryTarget {
                    time: to_time,
                    lsn: to_lsn,
                    xid: to_xid,
                    name: to_name,
                    immediate,
                },
                start,
                port,
                socket_dir,
                listen,
                jobs,
                progress: Default::default(),
            };
            data::restore(&g, &p, identity.as_deref(), &req).await
        }
        Command::Verify { policy, read_data, sample, identity } => {
            if !(0.0..=100.0).contains(&sample) || sample == 0.0 {
                return Err(Error::usage("--sample must be a percentage in (0, 100]"));
            }
            data::verify(&g, &load_policy(&g, &policy)?, identity.as_deref(), read_data, sample).await
        }
        Command::Prune { policy, dry_run } => data::prune(&g, &load_policy(&g, &policy)?, dry_run).await,
        Command::Demo { dir } => super::demo::run(&g, &dir).await,
        Command::Daemon { listen, max_jobs, grace } => {
            primary_only(&g, "the daemon")?;
            crate::daemon::run(crate::daemon::Options {
                policies_dir: g.policies.clone(),
                state_dir: state_dir(&g),
                plugins_dir: g.plugins.clone(),
                listen,
                max_concurrent: max_jobs,
                grace,
            })
            .await
        }
        Command::History { policy } => history(&g, &policy),
        Command::WalPush { policy, path } => {
            primary_only(&g, "wal-push")?;
            crate::jobs::wal::push(&load_policy(&g, &policy)?, &path, &state_dir(&g)).await?;
            Ok(0)
        }
        Command::WalFetch { policy, segment, dest, identity, spool, prefetch, cluster } => {
            let req = crate::jobs::wal::FetchRequest {
                segment: &segment,
                dest: &dest,
                identity: identity.as_deref(),
                spool: spool.as_deref(),
                prefetch,
                cluster,
            };
            let r = match load_policy(&g, &policy) {
                Ok(p) => crate::jobs::wal::fetch(&p, &req).await,
                Err(e) => Err(e),
            };
            match &r {
                Ok(false) => eprintln!("veza-dr: WAL file {} is not in the repository", segment.escape_debug()),
                Err(e) => {
                    super::report(e);
                }
                Ok(true) => {}
            }
            Ok(crate::jobs::wal::restore_command_exit(&r))
        }
        Command::WalPrefetch { policy, after, spool, identity, cluster, count } => {
            let p = load_policy(&g, &policy)?;
            crate::jobs::wal::prefetch(&p, cluster, &after, &spool, &identity, count).await.map(|_| 0)
        }
        Command::WalAhead { policy, status_dir, after } => {
            primary_only(&g, "wal-ahead")?;
            crate::jobs::walahead::run(&load_policy(&g, &policy)?, &state_dir(&g), &status_dir, &after).await.map(|_| 0)
        }
        Command::WalTail { policy, wal_dir, from, segment_size } => {
            primary_only(&g, "wal-tail")?;
            let (p, state) = (load_policy(&g, &policy)?, state_dir(&g));
            let run = move || crate::jobs::waltail::run(&p, &state, &wal_dir, &from, segment_size);
            let n = tokio::task::spawn_blocking(run)
                .await
                .map_err(|e| crate::error::Error::failed(format!("wal-tail: {e}")))??;
            tracing::debug!("wal-tail compressed {n} chunks ahead");
            Ok(0)
        }
        Command::WalSend { policy } => {
            primary_only(&g, "wal-send")?;
            let d = crate::jobs::walsend::send(&load_policy(&g, &policy)?, &state_dir(&g)).await?;
            if g.json {
                print_json(&d);
            }
            Ok(if d.iter().any(|d| d.error.is_some()) { 1 } else { 0 })
        }
    }
}

pub(super) fn print_json<T: serde::Serialize>(v: &T) {
    crate::outln!("{}", serde_json::to_string_pretty(v).expect("serialisable"));
}

async fn drills(g: &Global, p: &crate::policy::Policy) -> Result<i32> {
    let repo = crate::repository::Repository::open(p).await?;
    let all = crate::jobs::drill::history(&repo, &p.name).await?;
    if g.json {
        print_json(&all);
        return Ok(0);
    }
    crate::outln!(
        "{:<18} {:<20} {:<18} {:>10} {:>10}  {}",
        "DRILL",
        "FINISHED (UTC)",
        "VERDICT",
        "RTO",
        "RPO",
        "FAILURE"
    );
    for r in &all {
        let s = |v: Option<f64>| v.map(|x| format!("{x:.1}s")).unwrap_or_else(|| "-".into());
        crate::outln!(
            "{:<18} {:<20} {:<18} {:>10} {:>10}  {}",
            r.id,
            r.finished.format("%Y-%m-%d %H:%M:%S"),
            r.verdict.as_str(),
            s(r.rto.measured_seconds),
            s(r.rpo.measured_seconds),
            r.failure.clone().unwrap_or_default()
        );
    }
    Ok(0)
}

fn policy_check(g: &Global, dir: &Path) -> Result<i32> {
    let docs = crate::policy::load_documents(dir)?;
    if docs.is_empty() {
        return Err(Error::policy(format!("no policies (*.toml) in {}", dir.display()))
            .with_hint("add a policy, e.g. copy policies/uploads.toml"));
    }
    let mut bad = 0;
    let mut rows = Vec::new();
    for (path, doc) in &docs {
        match doc {
            Ok(d) => {
                if let Some(p) = &d.policy {
                    rows.push(serde_json::json!({"policy": p.name, "file": path, "ok": true}));
                    if !g.json {
                        crate::outln!(
                            "ok    {} ({}, {})",
                            p.name,
                            crate::source::of(p).kind().as_str(),
                            p.repository.url
                        );
                    }
                }
                for rb in &d.runbooks {
                    rows.push(
                        serde_json::json!({"runbook": rb.name, "file": path, "ok": true, "steps": rb.steps.len()}),
                    );
                    if !g.json {
                        let steps: Vec<String> =
                            rb.steps.iter().map(|s| format!("{} ({})", s.name, s.engine())).collect();
                        crate::outln!("ok    runbook {}: {}", rb.name, steps.join(" -> "));
                    }
                }
            }
            Err(e) => {
                bad += 1;
                rows.push(serde_json::json!({"file": path, "ok": false, "error": e.message, "hint": e.hint}));
                if !g.json {
                    crate::outln!("error {}", e.message);
                    if let Some(h) = &e.hint {
                        crate::outln!("      hint: {h}");
                    }
                }
            }
        }
    }
    if g.json {
        print_json(&rows);
    }
    Ok(if bad > 0 { 2 } else { 0 })
}

fn keygen(g: &Global, output: Option<&Path>) -> Result<i32> {
    let (text, public) = crate::crypto::seal::generate_identity();
    match output {
        Some(path) => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f =
                std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| {
                    Error::io("create identity file", path, e)
                        .with_hint("choose a new file name; an existing key is never overwritten")
                })?;
            f.write_all(text.as_bytes()).map_err(|e| Error::io("write", path, e))?;
            if g.json {
                print_json(&serde_json::json!({"identity-file": path, "recipient": public}));
            } else {
                eprintln!("identity written to {} (keep it off the backup host)", path.display());
                crate::outln!("{public}");
            }
        }
        None => {
            crate::out!("{text}");
            eprintln!("public key: {public}");
        }
    }
    Ok(0)
}

fn history(g: &Global, policy: &str) -> Result<i32> {
    let h = crate::daemon::history::History::open(&state_dir(g))?;
    let jobs = h.list(Some(policy))?;
    if g.json {
        print_json(&jobs);
        return Ok(0);
    }
    if jobs.is_empty() {
        crate::outln!("no jobs recorded for policy {policy} in {}", state_dir(g).display());
        return Ok(0);
    }
    crate::outln!(
        "{:<20} {:<12} {:<9} {:>8} {:>11} {:>11}  {}",
        "STARTED (UTC)",
        "JOB",
        "RESULT",
        "TIME",
        "READ",
        "STORED",
        "SNAPSHOT / ERROR"
    );
    for j in &jobs {
        let secs = (j.finished - j.started).num_milliseconds() as f64 / 1000.0;
        crate::outln!(
            "{:<20} {:<12} {:<9} {:>7.1}s {:>11} {:>11}  {}",
            j.started.format("%Y-%m-%d %H:%M:%S"),
            j.kind,
            j.result,
            secs,
            bytes(j.bytes_read),
            bytes(j.bytes_stored),
            j.error.clone().or_else(|| j.snapshot.clone()).unwrap_or_default()
        );
    }
    Ok(0)
}
