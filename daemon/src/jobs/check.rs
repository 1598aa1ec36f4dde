//! `veza-dr check <policy>`: prove the set-up before the first night. The repository is
//! reachable and writable, the recipients are usable (and the identity, where this host has
//! one, opens what is sealed to them), PostgreSQL is reachable with the privileges the
//! method needs and is configured to archive to this policy, and archiving works end to end:
//! a switched segment arrives in the repository within the timeout.

use crate::crypto::{Identity, Sealer};
use crate::policy::{PgMethod, Policy, Source};
use crate::repository::lock::LockKind;
use crate::repository::Repository;
use crate::source::postgres::wal::WalName;
use serde::Serialize;
use std::time::Duration;

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Line {
    pub check: String,
    pub ok: bool,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Checked {
    pub policy: String,
    pub ok: bool,
    pub checks: Vec<Line>,
}

struct Lines(Vec<Line>);

impl Lines {
    fn ok(&mut self, check: &str, detail: impl Into<String>) {
        self.0.push(Line { check: check.into(), ok: true, detail: detail.into(), hint: None });
    }
    fn failed(&mut self, check: &str, detail: impl Into<String>, hint: impl Into<String>) {
        self.0.push(Line { check: check.into(), ok: false, detail: detail.into(), hint: Some(hint.into()) });
    }
    fn error(&mut self, check: &str, e: &crate::Error) {
        let hint = e.hint.clone().unwrap_or_else(|| "see the message".into());
        self.failed(check, e.message.clone(), hint);
    }
}

pub struct Options {
    /// How long archiving may take to bring a switched segment into the repository.
    pub timeout: Duration,
    /// The policy file, for the archive_command this policy expects.
    pub policy_path: String,
}

pub async fn run(p: &Policy, o: &Options) -> Checked {
    let mut l = Lines(Vec::new());
    let repo = repository(p, &mut l).await;
    recipients(p, &mut l);
    match &p.source {
        Source::Volume(v) => match std::fs::read_dir(&v.path) {
            Ok(_) => l.ok("source readable", format!("{} can be listed", v.path.display())),
            Err(e) => l.failed(
                "source readable",
                format!("{}: {e}", v.path.display()),
                "run veza-dr as a user that can read the whole volume (root, or its owner)",
            ),
        },
        Source::Postgres(pg) => postgres(p, pg, repo.as_ref(), o, &mut l).await,
    }
    Checked { policy: p.name.clone(), ok: l.0.iter().all(|c| c.ok), checks: l.0 }
}

async fn repository(p: &Policy, l: &mut Lines) -> Option<Repository> {
    let repo = match Repository::open(p).await {
        Ok(r) => r,
        Err(e) => {
            l.error("repository reachable", &e);
            return None;
        }
    };
    l.ok("repository reachable", format!("{} (repository {})", repo.url(), repo.id()));
    // A lease is a write and a delete: what every backup does first.
    match repo.lock(LockKind::Shared, "check", Duration::ZERO).await {
        Ok(g) => match g.release().await {
            Ok(()) => l.ok("repository writable", "a lease was written and removed"),
            Err(e) => l.error("repository writable", &e),
        },
        Err(e) => l.error("repository writable", &e),
    }
    Some(repo)
}

fn recipients(p: &Policy, l: &mut Lines) {
    let probe = b"veza-dr check";
    let sealed = match Sealer::new(&p.encryption.recipients).seal(probe) {
        Ok(s) => s,
        Err(e) => return l.error("recipients", &e),
    };
    l.ok(
        "recipients",
        format!("{} recipients; the backup host holds no key to read backups", p.encryption.recipients.len()),
    );
    // Where this host has the identity (a restore-side host), it must open what is sealed.
    match Identity::find(None, &p.encryption) {
        Ok(Some(id)) => match id.open(&sealed, &"a probe sealed to the policy's recipients") {
            Ok(b) if b == probe => l.ok("identity", "the identity opens what is sealed to the recipients"),
            _ => l.failed(
                "identity",
                "the identity is not one of the policy's recipients",
                "add its recipient (`age-keygen -y`, or the `keygen` output) to [encryption] recipients",
            ),
        },
        Ok(None) => {}
        Err(e) => l.error("identity", &e),
    }
}

async fn postgres(p: &Policy, pg: &crate::policy::PgSource, repo: Option<&Repository>, o: &Options, l: &mut Lines) {
    let c = match crate::source::postgres::connect(pg).await {
        Ok(c) => c,
        Err(e) => return l.error("PostgreSQL reachable", &e),
    };
    let q = |sql: &'static str| {
        let c = &c;
        async move { c.query_one(sql, &[]).await.map(|r| r.get::<_, Option<String>>(0).unwrap_or_default()) }
    };
    let version = q("SELECT current_setting('server_version')").await.unwrap_or_default();
    l.ok("PostgreSQL reachable", format!("{} (PostgreSQL {version})", pg.dsn));
    let privs = q("SELECT concat_ws(',', CASE WHEN rolsuper THEN 'superuser' END, CASE WHEN rolreplication THEN 'replication' END, \
         CASE WHEN pg_has_role(current_user, 'pg_read_all_data', 'member') THEN 'pg_read_all_data' END) \
         FROM pg_roles WHERE rolname = current_user")
    .await
    .unwrap_or_default();
    let physical = pg.method == PgMethod::Physical;
    let enough = privs.contains("superuser")
        || if physical { privs.contains("replication") } else { privs.contains("pg_read_all_data") };
    if enough {
        l.ok("privileges", format!("the user has {privs}"));
    } else {
        l.failed(
            "privileges",
            format!("the user has {}", if privs.is_empty() { "no special role" } else { &privs }),
            if physical {
                "a physical backup needs a superuser, or a user WITH REPLICATION granted EXECUTE on pg_backup_start, pg_backup_stop and pg_switch_wal"
            } else {
                "a logical backup needs a superuser or a member of pg_read_all_data"
            },
        );
    }
    if !physical {
        return;
    }
    let wal_level = q("SELECT current_setting('wal_level')").await.unwrap_or_default();
    if wal_level == "minimal" {
        l.failed("wal_level", "wal_level = minimal", "set wal_level = replica in postgresql.conf and restart");
    } else {
        l.ok("wal_level", format!("wal_level = {wal_level}"));
    }
    let mode = q("SELECT current_setting('archive_mode')").await.unwrap_or_default();
    if mode == "on" || mode == "always" {
        l.ok("archive_mode", format!("archive_mode = {mode}"));
    } else {
        l.failed(
            "archive_mode",
            format!("archive_mode = {mode}"),
            "set archive_mode = on in postgresql.conf and restart",
        );
    }
    let want = format!(
        "{} wal-push {} %p",
        std::env::current_exe().map(|e| e.display().to_string()).unwrap_or_else(|_| "veza-dr".into()),
        o.policy_path
    );
    let cmd = q("SELECT current_setting('archive_command')").await.unwrap_or_default();
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let names_policy = words.iter().any(|w| {
        let w = w.trim_matches(['\'', '"']);
        w == p.name || w == o.policy_path || std::path::Path::new(w).file_stem().is_some_and(|s| s == p.name.as_str())
    });
    if words.contains(&"wal-push") && names_policy && cmd.contains("%p") {
        l.ok("archive_command", format!("archive_command = '{cmd}'"));
    } else {
        l.failed(
            "archive_command",
            format!("archive_command = '{cmd}' does not push to policy {}", p.name),
            format!("set archive_command = '{want}' and reload"),
        );
    }
    let Some(repo) = repo else {
        return l.failed("archiving works", "not tried: the repository cannot be read", "fix the repository first");
    };
    match archives(&c, repo, o.timeout).await {
        Ok(detail) => l.ok("archiving works", detail),
        Err((detail, hint)) => l.failed("archiving works", detail, hint),
    }
}

/// Switch a segment and wait until the repository has it.
async fn archives(
    c: &tokio_postgres::Client,
    repo: &Repository,
    timeout: Duration,
) -> std::result::Result<String, (String, String)> {
    let row = c
        .query_one(
            "SELECT pg_walfile_name(pg_switch_wal()), (SELECT system_identifier FROM pg_control_system())::text",
            &[],
        )
        .await
        .map_err(|e| {
            (
                format!("cannot switch a WAL segment: {}", e.as_db_error().map(|d| d.message()).unwrap_or("")),
                "the user needs EXECUTE on pg_switch_wal()".to_string(),
            )
        })?;
    let (seg, sysid): (String, String) = (row.get(0), row.get(1));
    let name = WalName::parse(&seg).ok_or_else(|| (format!("the server named segment {seg}"), String::new()))?;
    let cluster: u64 = sysid.parse().unwrap_or(0);
    let t = std::time::Instant::now();
    loop {
        match repo.wal_fingerprints(cluster, &name).await {
            Ok(f) if !f.is_empty() => {
                return Ok(format!(
                    "segment {seg} of cluster {cluster} reached the repository in {:.1}s",
                    t.elapsed().as_secs_f64()
                ))
            }
            Ok(_) => {}
            Err(e) => return Err((e.message.clone(), e.hint.clone().unwrap_or_default())),
        }
        if t.elapsed() > timeout {
            let failed = c
                .query_one("SELECT coalesce(last_failed_wal, ''), failed_count::text FROM pg_stat_archiver", &[])
                .await
                .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
                .unwrap_or_default();
            return Err((
                format!(
                    "segment {seg} did not reach the repository within {}s (archiver: {} failures, last failed {})",
                    timeout.as_secs(),
                    failed.1,
                    if failed.0.is_empty() { "none" } else { &failed.0 }
                ),
                "see the PostgreSQL server log for the archive_command's errors".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
