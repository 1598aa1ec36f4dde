//! A drill's checks on what was restored: `pg_amcheck` on every database of a drill server,
//! the policy's SQL checks over connections to it, and command checks through `sh -c`.

use super::report::{CheckResult, Report};
use crate::error::{Error, Result};
use crate::policy::Policy;
use crate::source::postgres::server::Server;
use std::path::Path;

pub async fn amcheck(server: &Server) -> Result<String> {
    let cfg = server.config();
    let mut c = tokio::process::Command::new(server.bin_dir.join("pg_amcheck"));
    c.arg("--all")
        .arg("--install-missing")
        .arg("--host")
        .arg(server.socket_dir())
        .arg("--port")
        .arg(server.port.to_string());
    c.arg("--username").arg(cfg.get_user().unwrap_or("postgres"));
    if let Some(p) = cfg.get_password() {
        c.env("PGPASSWORD", String::from_utf8_lossy(p).into_owned());
    }
    let out = c.kill_on_drop(true).output().await.map_err(|e| Error::failed(format!("cannot run pg_amcheck: {e}")))?;
    if out.status.success() {
        Ok("every database checked: no corruption".into())
    } else {
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        Err(Error::damaged(format!(
            "pg_amcheck found problems: {}",
            text.trim().lines().take(3).collect::<Vec<_>>().join(" | ")
        )))
    }
}

/// The policy's checks against a drill server: SQL over a connection, commands with the
/// server's PGHOST/PGPORT/PGUSER/PGPASSWORD, in `cwd`.
pub async fn on_server(server: &Server, policy: &Policy, rep: &mut Report, cwd: &Path) -> Result<String> {
    let cfg = server.config();
    let mut clients = std::collections::BTreeMap::new();
    for db in
        policy.verify.check.iter().filter(|c| c.sql.is_some()).map(|c| c.database.as_deref().unwrap_or("postgres"))
    {
        if clients.contains_key(db) {
            continue;
        }
        let mut c = cfg.clone();
        c.dbname(db);
        let (client, conn) = c
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| crate::source::postgres::db_error(&format!("drill server, database {db}"), "connect", e))?;
        tokio::spawn(conn);
        clients.insert(db.to_string(), client);
    }
    let mut env = vec![
        ("PGHOST".to_string(), server.socket_dir().display().to_string()),
        ("PGPORT".to_string(), server.port.to_string()),
        ("PGUSER".to_string(), cfg.get_user().unwrap_or("postgres").to_string()),
        ("PGDATABASE".to_string(), "postgres".to_string()),
    ];
    if let Some(pw) = cfg.get_password() {
        env.push(("PGPASSWORD".into(), String::from_utf8_lossy(pw).into_owned()));
    }
    run_checks(policy, rep, cwd, &env, Some(&clients)).await
}

/// Run every check: `sql` on `client`, `command` through `sh -c` in `cwd` with `env`.
pub async fn run_checks(
    policy: &Policy,
    rep: &mut Report,
    cwd: &Path,
    env: &[(String, String)],
    clients: Option<&std::collections::BTreeMap<String, tokio_postgres::Client>>,
) -> Result<String> {
    let mut failed = Vec::new();
    for (i, c) in policy.verify.check.iter().enumerate() {
        let name = c.name.clone().unwrap_or_else(|| format!("check {}", i + 1));
        let client = clients.and_then(|m| m.get(c.database.as_deref().unwrap_or("postgres")));
        let (text, (expected, got, ok)) = match (&c.sql, &c.command, client) {
            (Some(sql), _, Some(client)) => (sql.clone(), sql_check(client, sql, c.expect.as_ref()).await),
            (Some(sql), _, None) => (sql.clone(), ("a result".into(), "no database in this drill".into(), false)),
            (None, Some(cmd), _) => (cmd.clone(), command_check(cmd, cwd, env).await),
            (None, None, _) => (String::new(), ("a check".into(), "neither sql nor command".into(), false)),
        };
        if !ok {
            failed.push(format!("{name} (expected {expected}, got {got})"));
        }
        rep.checks.push(CheckResult { name, sql: text, expected, got, ok });
    }
    if failed.is_empty() {
        Ok(format!("{} checks passed", rep.checks.len()))
    } else {
        Err(Error::failed(format!("{} of {} checks failed: {}", failed.len(), rep.checks.len(), failed.join("; "))))
    }
}

/// (expected, got, ok) of one SQL check.
async fn sql_check(client: &tokio_postgres::Client, sql: &str, expect: Option<&toml::Value>) -> (String, String, bool) {
    let msgs = match client.simple_query(sql).await {
        Err(e) => {
            let msg = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string());
            return ("a result".into(), format!("error: {msg}"), false);
        }
        Ok(m) => m,
    };
    let rows: Vec<&tokio_postgres::SimpleQueryRow> = msgs
        .iter()
        .filter_map(|m| if let tokio_postgres::SimpleQueryMessage::Row(r) = m { Some(r) } else { None })
        .collect();
    let first = rows.first().and_then(|r| r.get(0)).unwrap_or("").to_string();
    match expect {
        None => ("true".into(), first.clone(), first == "t" || first == "true"),
        Some(toml::Value::Table(t)) if t.contains_key("min-rows") => {
            let min = t.get("min-rows").and_then(|v| v.as_integer()).unwrap_or(1);
            (format!("at least {min} rows"), format!("{} rows", rows.len()), rows.len() as i64 >= min)
        }
        Some(v) => {
            let want = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Boolean(true) => "t".into(),
                toml::Value::Boolean(false) => "f".into(),
                other => other.to_string(),
            };
            (want.clone(), first.clone(), first == want)
        }
    }
}

/// (expected, got, ok) of one command check: it passes by exiting 0.
async fn command_check(cmd: &str, cwd: &Path, env: &[(String, String)]) -> (String, String, bool) {
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(cwd)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await;
    match out {
        Err(e) => ("exit 0".into(), format!("cannot run sh: {e}"), false),
        Ok(o) if o.status.success() => ("exit 0".into(), "exit 0".into(), true),
        Ok(o) => {
            let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            let last: String = text.trim().lines().last().unwrap_or("").chars().take(200).collect();
            let code = o.status.code().map(|c| c.to_string()).unwrap_or_else(|| "a signal".into());
            (
                "exit 0".into(),
                if last.is_empty() { format!("exit {code}") } else { format!("exit {code}: {last}") },
                false,
            )
        }
    }
}
