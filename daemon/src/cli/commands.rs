//! One function per subcommand: load the policy, call the library, print the result.

use super::output::{bytes, Bar};
use super::{load_policy, state_dir, Cli, Command, Global, PolicyCmd, ReportCmd};
use crate::crypto::Opener;
use crate::error::{Error, Result};
use crate::policy::Policy;
use crate::repository::Repo;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub async fn dispatch(cli: Cli) -> Result<i32> {
    let g = cli.global;
    match cli.command {
        Command::Policy { cmd: PolicyCmd::Check { dir } } => policy_check(&g, dir.as_deref().unwrap_or(&g.policies)),
        Command::Keygen { signing: true, .. } => {
            crate::outln!("{}", crate::drill::public_key(&state_dir(&g))?);
            Ok(0)
        }
        Command::Keygen { output, .. } => keygen(&g, output.as_deref()),
        Command::Drill { policy, identity, snapshot, report_dir } => {
            let p = load_policy(&g, &policy)?;
            // A missing identity still gives a (failed) report, so the month's drill is on record.
            let identity_file = identity.clone().or_else(|| p.encryption.identity_file().map(Path::to_path_buf));
            let repo = Repo::open(&p).await?;
            let o = crate::drill::Options {
                state_dir: state_dir(&g),
                report_dir,
                identity_file,
                snapshot: snapshot.filter(|s| s != "latest"),
                plugins_dir: g.plugins.clone(),
            };
            let reports = crate::drill::run_all(&repo, &p, &o).await?;
            for r in &reports {
                if g.json {
                    crate::outln!("{}", serde_json::to_string(r).expect("serialisable"));
                } else {
                    crate::out!("{}", crate::drill::markdown(r));
                }
            }
            Ok(if reports.iter().any(|r| r.verdict == "fail") { 1 } else { 0 })
        }
        Command::Drills { policy } => {
            let p = load_policy(&g, &policy)?;
            let repo = Repo::open(&p).await?;
            let all = crate::drill::history(&repo, &p.name).await?;
            if g.json {
                print_json(&all);
            } else {
                crate::outln!("{:<18} {:<18} {:>10} {:>10}  {}", "DRILL", "VERDICT", "RTO", "RPO", "FAILURE");
                for r in &all {
                    let s = |v: Option<f64>| v.map(|x| format!("{x:.1}s")).unwrap_or_else(|| "-".into());
                    crate::outln!(
                        "{:<18} {:<18} {:>10} {:>10}  {}",
                        r.id,
                        r.verdict,
                        s(r.rto.measured_seconds),
                        s(r.rpo.measured_seconds),
                        r.failure.clone().unwrap_or_default()
                    );
                }
            }
            Ok(0)
        }
        Command::Failover { runbook, dry_run, yes, from, audit_log } => {
            super::failover::failover(&g, &runbook, dry_run, yes, from, audit_log).await
        }
        Command::Plugins => super::failover::plugins(&g).await,
        Command::Report { cmd: ReportCmd::Verify { file } } => {
            let text = std::fs::read_to_string(&file).map_err(|e| Error::io("read report", &file, e))?;
            let key = crate::drill::verify_report(&text)?;
            crate::outln!("signature ok: signed by ed25519 key {key}");
            Ok(0)
        }
        Command::Backup { policy, full, incremental } => {
            let mode = match (full, incremental) {
                (true, _) => crate::backup::Mode::Full,
                (_, true) => crate::backup::Mode::Incremental,
                _ => crate::backup::Mode::Auto,
            };
            backup(&g, &load_policy(&g, &policy)?, mode).await
        }
        Command::Snapshots { policy } => snapshots(&g, &load_policy(&g, &policy)?).await,
        Command::Restore {
            policy,
            snapshot,
            target,
            target_dsn,
            include,
            identity,
            overwrite,
            to_time,
            to_lsn,
            to_xid,
            to_name,
            immediate,
            start,
            port,
            jobs,
        } => {
            let p = load_policy(&g, &policy)?;
            let opener = opener(&p, identity.as_deref())?;
            let recovery =
                crate::pgrestore::RecoveryTarget { time: to_time, lsn: to_lsn, xid: to_xid, name: to_name, immediate };
            match &p.source {
                crate::policy::Source::Postgres(pg) if pg.method == crate::policy::PgMethod::Physical => {
                    let target = target.ok_or_else(|| Error::usage("a physical restore needs --target DIR"))?;
                    let identity_file = identity.or_else(|| p.encryption.identity_file().map(Path::to_path_buf));
                    let o = crate::pgrestore::PhysicalOptions {
                        snapshot,
                        target_dir: target,
                        recovery,
                        start,
                        port,
                        identity_file,
                        bytes_done: Arc::default(),
                        bytes_total: Arc::default(),
                    };
                    restore_physical(&g, &p, pg, &opener, &o).await
                }
                crate::policy::Source::Postgres(pg) => {
                    let dsn = target_dsn.ok_or_else(|| Error::usage("a logical restore needs --target-dsn DSN"))?;
                    let dsn = match crate::secret::SecretRef::parse(&dsn) {
                        Ok(r) => r.resolve()?,
                        Err(_) => dsn,
                    };
                    let repo = Repo::open(&p).await?;
                    let snap = snapshot.unwrap_or_else(|| "latest".into());
                    let (id, dbs) = crate::pgrestore::restore_logical(&repo, &opener, pg, &snap, &dsn, jobs).await?;
                    if g.json {
                        print_json(&serde_json::json!({"snapshot": id, "databases": dbs}));
                    } else {
                        crate::outln!("restored snapshot {id}: databases {}", dbs.join(", "));
                    }
                    Ok(0)
                }
                crate::policy::Source::Volume(_) => {
                    if recovery.time.is_some()
                        || recovery.lsn.is_some()
                        || recovery.xid.is_some()
                        || recovery.name.is_some()
                        || recovery.immediate
                        || start
                    {
                        return Err(Error::usage(
                            "--to-*, --immediate and --start apply to PostgreSQL physical restores only",
                        ));
                    }
                    let target = target.ok_or_else(|| Error::usage("restore needs --target DIR"))?;
                    restore(&g, &p, &opener, snapshot.unwrap_or_else(|| "latest".into()), target, include, overwrite)
                        .await
                }
            }
        }
        Command::Verify { policy, read_data, sample, identity } => {
            let p = load_policy(&g, &policy)?;
            let opener = match (&identity, &p.encryption.identity) {
                (None, None) => None,
                _ => Some(opener(&p, identity.as_deref())?),
            };
            if !(0.0..=100.0).contains(&sample) || sample == 0.0 {
                return Err(Error::usage("--sample must be a percentage in (0, 100]"));
            }
            verify(&g, &p, opener.as_ref(), read_data, sample).await
        }
        Command::Prune { policy, dry_run } => prune(&g, &load_policy(&g, &policy)?, dry_run).await,
        Command::Demo { dir } => super::demo::run(&g, &dir).await,
        Command::Daemon { listen, max_jobs, grace } => {
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
            let p = load_policy(&g, &policy)?;
            let store = crate::repository::Store::open(&p.repository)?;
            crate::wal::push(&store, &crate::crypto::Sealer::new(&p.encryption.recipients), &path).await?;
            Ok(0)
        }
        Command::WalFetch { policy, segment, dest, identity, spool, prefetch } => {
            wal_fetch(&g, &policy, &segment, &dest, identity.as_deref(), spool.as_deref(), prefetch).await
        }
        Command::WalPrefetch { policy, after, spool, identity, count } => {
            let p = load_policy(&g, &policy)?;
            let store = crate::repository::Store::open(&p.repository)?;
            let opener = Opener::from_file(&identity)?;
            let lock = spool.join(".prefetch");
            let r = crate::wal::prefetch(&store, &opener, &after, count, &spool, 16 << 20).await;
            let _ = std::fs::remove_file(lock);
            r.map(|_| 0)
        }
    }
}

/// The identity for restore-side commands: --identity, else the policy's `identity`.
pub fn opener(p: &Policy, flag: Option<&Path>) -> Result<Opener> {
    if let Some(f) = flag {
        return Opener::from_file(f);
    }
    match &p.encryption.identity {
        Some(crate::secret::SecretRef::File(f)) => Opener::from_file(f),
        Some(r @ crate::secret::SecretRef::Env(_)) => {
            let text = r.resolve()?;
            let id: age::x25519::Identity =
                text.trim().parse().map_err(|_| Error::crypto(format!("{r} does not hold an age identity")))?;
            Ok(Opener::from_identity(id))
        }
        None => Err(Error::crypto(format!("policy {} needs a private identity to read its backups", p.name))
            .with_hint("pass --identity FILE (the key from `veza-dr keygen`), or set VEZA_DR_IDENTITY")),
    }
}

fn print_json<T: serde::Serialize>(v: &T) {
    crate::outln!("{}", serde_json::to_string_pretty(v).expect("serialisable"));
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
                        crate::outln!("ok    {} ({}, {})", p.name, p.source_type(), p.repository.url);
                    }
                }
                for rb in &d.runbooks {
                    rows.push(
                        serde_json::json!({"runbook": rb.name, "file": path, "ok": true, "steps": rb.steps.len()}),
                    );
                    if !g.json {
                        let steps: Vec<String> =
                            rb.steps.iter().map(|s| format!("{} ({})", s.name, s.plugin)).collect();
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
    let (text, public) = crate::crypto::generate_identity();
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

pub async fn backup(g: &Global, p: &Policy, mode: crate::backup::Mode) -> Result<i32> {
    let progress: Arc<crate::pipeline::backup::Progress> = Arc::default();
    let bar = {
        let pr = progress.clone();
        Bar::start(!g.json, "backup", move || {
            (pr.bytes_read.load(Ordering::Relaxed), pr.bytes_total.load(Ordering::Relaxed))
        })
    };
    let opts = crate::backup::Options { mode, state_dir: state_dir(g), lock_wait: g.lock_wait, progress };
    let t = std::time::Instant::now();
    let r = crate::backup::run(p, &opts).await;
    bar.finish().await;
    let s = r?;
    if g.json {
        print_json(&s);
    } else {
        let st = &s.stats;
        crate::outln!(
            "snapshot {} ({}) of policy {}: {} files, {} dirs, {} in total; read {} in {} files, {} new, uploaded {}; {} packs referenced; {:.1}s",
            s.id,
            s.kind,
            s.policy,
            st.files,
            st.dirs,
            bytes(st.bytes),
            bytes(st.bytes_read),
            st.files_read,
            bytes(st.bytes_new),
            bytes(st.bytes_uploaded),
            s.packs.len(),
            t.elapsed().as_secs_f64()
        );
        for w in &s.warnings {
            crate::outln!("warning: {w}");
        }
    }
    Ok(0)
}

async fn snapshots(g: &Global, p: &Policy) -> Result<i32> {
    let repo = Repo::open(p).await?;
    let snaps = repo.snapshots().await?;
    if g.json {
        print_json(&snaps);
        return Ok(0);
    }
    if snaps.is_empty() {
        crate::outln!("no snapshots for policy {} in {}", p.name, repo.store.url);
        return Ok(0);
    }
    crate::outln!(
        "{:<26} {:<12} {:<20} {:>8} {:>11} {:>11} {:>8}",
        "ID",
        "KIND",
        "STARTED (UTC)",
        "FILES",
        "SIZE",
        "NEW",
        "TIME"
    );
    for s in &snaps {
        let secs = (s.finished - s.started).num_milliseconds() as f64 / 1000.0;
        crate::outln!(
            "{:<26} {:<12} {:<20} {:>8} {:>11} {:>11} {:>7.1}s{}",
            s.id,
            s.kind,
            s.started.format("%Y-%m-%d %H:%M:%S"),
            s.stats.files,
            bytes(s.stats.bytes),
            bytes(s.stats.bytes_new),
            secs,
            if s.warnings.is_empty() { String::new() } else { format!("  ({} warnings)", s.warnings.len()) }
        );
    }
    Ok(0)
}

pub async fn restore(
    g: &Global,
    p: &Policy,
    opener: &Opener,
    snapshot: String,
    target: PathBuf,
    includes: Vec<PathBuf>,
    overwrite: bool,
) -> Result<i32> {
    let repo = Repo::open(p).await?;
    let opts = crate::restore::Options {
        snapshot,
        target,
        includes,
        overwrite,
        bytes_done: Arc::default(),
        bytes_total: Arc::default(),
    };
    let bar = {
        let (d, t) = (opts.bytes_done.clone(), opts.bytes_total.clone());
        Bar::start(!g.json, "restore", move || (d.load(Ordering::Relaxed), t.load(Ordering::Relaxed)))
    };
    let t = std::time::Instant::now();
    let r = crate::restore::run(&repo, opener, &opts).await;
    bar.finish().await;
    let s = r?;
    if g.json {
        print_json(&s);
    } else {
        crate::outln!(
            "restored snapshot {} into {}: {} files, {} dirs, {} in {:.1}s",
            s.snapshot,
            s.target,
            s.files,
            s.dirs,
            bytes(s.bytes),
            t.elapsed().as_secs_f64()
        );
        for w in &s.warnings {
            crate::outln!("warning: {w}");
        }
    }
    Ok(0)
}

async fn verify(g: &Global, p: &Policy, opener: Option<&Opener>, read_data: bool, sample: f64) -> Result<i32> {
    let repo = Repo::open(p).await?;
    let rep = crate::verify::run(&repo, opener, read_data, sample).await?;
    if g.json {
        print_json(&rep);
    } else {
        crate::outln!(
            "verified {} snapshots of policy {}: {} packs referenced, {} read, {} chunks checked",
            rep.snapshots,
            p.name,
            rep.packs_referenced,
            rep.packs_read,
            rep.chunks_checked
        );
        for d in &rep.damage {
            crate::outln!("damage: {d}");
        }
        if !rep.garbage.is_empty() {
            crate::outln!(
                "garbage: {} unreferenced objects ({}), left by interrupted backups; `veza-dr prune {}` removes them",
                rep.garbage.len(),
                bytes(rep.garbage_bytes),
                p.name
            );
        }
        for n in &rep.notes {
            crate::outln!("note: {n}");
        }
        crate::outln!("{}", if rep.ok() { "no damage found" } else { "DAMAGE FOUND" });
    }
    Ok(if rep.ok() { 0 } else { 3 })
}

async fn prune(g: &Global, p: &Policy, dry_run: bool) -> Result<i32> {
    let repo = Repo::open(p).await?;
    let rep = crate::prune::run(&repo, p, dry_run, g.lock_wait).await?;
    if g.json {
        print_json(&rep);
    } else {
        let would = if dry_run { "would " } else { "" };
        for (id, why) in &rep.kept {
            crate::outln!("keep   {id} ({})", why.join(", "));
        }
        for id in &rep.forgotten {
            crate::outln!("{would}forget {id}");
        }
        crate::outln!(
            "{}marked {} unreferenced objects, {}deleted {} ({}), {} pending deletion after the grace period",
            would,
            rep.marked.len(),
            would,
            rep.deleted.len(),
            bytes(rep.bytes_deleted),
            rep.pending
        );
    }
    Ok(0)
}

async fn restore_physical(
    g: &Global,
    p: &Policy,
    pg: &crate::policy::PgSource,
    opener: &Opener,
    o: &crate::pgrestore::PhysicalOptions,
) -> Result<i32> {
    let repo = Repo::open(p).await?;
    let bar = {
        let (d, t) = (o.bytes_done.clone(), o.bytes_total.clone());
        Bar::start(!g.json, "restore", move || (d.load(Ordering::Relaxed), t.load(Ordering::Relaxed)))
    };
    let r = crate::pgrestore::restore_physical(&repo, opener, p, pg, o).await;
    bar.finish().await;
    let s = r?;
    if g.json {
        print_json(&s);
        return Ok(0);
    }
    crate::outln!(
        "restored snapshot {} into {}: {} files, {} in {:.1}s; recovery target: {}",
        s.snapshot,
        s.target,
        s.files,
        bytes(s.bytes),
        s.seconds_restore,
        s.recovery_target
    );
    if s.started {
        crate::outln!(
            "server running on port {}: recovery finished in {:.1}s at {} on timeline {}{}",
            s.port.unwrap_or(0),
            s.seconds_recovery,
            s.recovered_lsn.as_deref().unwrap_or("?"),
            s.timeline.unwrap_or(0),
            s.last_transaction.as_deref().map(|t| format!("; last transaction at {t}")).unwrap_or_default()
        );
    }
    for w in &s.warnings {
        crate::outln!("note: {w}");
    }
    Ok(0)
}

/// restore_command. Exit 1 means "not in the repository" (PostgreSQL then ends recovery);
/// any other failure exits 255 so that PostgreSQL stops instead of promoting early.
async fn wal_fetch(
    g: &Global,
    policy: &str,
    segment: &str,
    dest: &Path,
    identity: Option<&Path>,
    spool: Option<&Path>,
    prefetch: usize,
) -> Result<i32> {
    let run = async {
        let p = load_policy(g, policy)?;
        let opener = opener(&p, identity)?;
        let store = crate::repository::Store::open(&p.repository)?;
        let found = crate::wal::fetch_with_spool(&store, &opener, segment, dest, spool).await?;
        Ok::<_, Error>((found, p))
    };
    match run.await {
        Ok((true, p)) => {
            if let (Some(spool), Some(id), true) = (spool, identity, prefetch > 0 && segment.len() == 24) {
                spawn_prefetch(&p, segment, spool, id, prefetch);
            }
            Ok(0)
        }
        Ok((false, _)) => {
            eprintln!("veza-dr: WAL file {segment} is not in the repository");
            Ok(1)
        }
        Err(e) => {
            super::report(&e);
            Ok(255)
        }
    }
}

/// Start a detached prefetcher unless one is already running for this spool.
fn spawn_prefetch(p: &Policy, after: &str, spool: &Path, identity: &Path, count: usize) {
    let lock = spool.join(".prefetch");
    if std::fs::OpenOptions::new().write(true).create_new(true).open(&lock).is_err() {
        let stale = lock
            .metadata()
            .and_then(|m| m.modified())
            .map(|t| t.elapsed().unwrap_or_default().as_secs() > 60)
            .unwrap_or(true);
        if !stale {
            return;
        }
    }
    let Ok(exe) = std::env::current_exe() else { return };
    use std::os::unix::process::CommandExt;
    let _ = std::process::Command::new(exe)
        .arg("wal-prefetch")
        .arg(&p.path)
        .arg(after)
        .arg("--spool")
        .arg(spool)
        .arg("--identity")
        .arg(identity)
        .arg("--count")
        .arg(count.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn();
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
