//! What SQL a dry run may send: one `SELECT` that calls only functions and reads only views
//! on an allow-list of side-effect-free ones. A READ ONLY transaction is not enough:
//! `pg_promote()` succeeds inside one, and a plugin could send `SET SESSION CHARACTERISTICS …
//! READ WRITE` first. The statement is parsed (sqlparser, PostgreSQL dialect) and refused
//! unless every function and relation in it is listed here; the session stays READ ONLY as a
//! second wall.

use sqlparser::ast::{visit_expressions, visit_relations, Expr, ObjectName, SetExpr, Statement};
use sqlparser::dialect::PostgreSqlDialect;
use std::ops::ControlFlow;

/// Functions a plan may call: they read state and change nothing.
pub const FUNCTIONS: &[&str] = &[
    "pg_is_in_recovery",
    "pg_is_wal_replay_paused",
    "pg_get_wal_replay_pause_state",
    "pg_last_wal_receive_lsn",
    "pg_last_wal_replay_lsn",
    "pg_last_xact_replay_timestamp",
    "pg_current_wal_lsn",
    "pg_current_wal_insert_lsn",
    "pg_current_wal_flush_lsn",
    "pg_walfile_name",
    "pg_wal_lsn_diff",
    "pg_control_checkpoint",
    "pg_control_system",
    "pg_control_recovery",
    "pg_postmaster_start_time",
    "pg_conf_load_time",
    "pg_database_size",
    "pg_size_pretty",
    "pg_backend_pid",
    "current_setting",
    "current_database",
    "version",
    "now",
    "inet_server_addr",
    "inet_server_port",
    "age",
    "to_char",
    "extract",
    "count",
    "sum",
    "min",
    "max",
    "coalesce",
    "greatest",
    "least",
];

/// Views and table functions a plan may read.
pub const RELATIONS: &[&str] = &[
    "pg_stat_replication",
    "pg_stat_wal_receiver",
    "pg_stat_archiver",
    "pg_replication_slots",
    "pg_stat_activity",
    "pg_settings",
    "pg_database",
    "pg_control_checkpoint",
    "pg_control_system",
    "pg_control_recovery",
];

/// The last part of a possibly schema-qualified name, lower-cased; `pg_catalog.` is allowed.
fn base(name: &ObjectName) -> Result<String, String> {
    let parts: Vec<String> = name.0.iter().map(|p| p.to_string().trim_matches('"').to_ascii_lowercase()).collect();
    match parts.as_slice() {
        [one] => Ok(one.clone()),
        [schema, one] if schema == "pg_catalog" => Ok(one.clone()),
        _ => Err(name.to_string()),
    }
}

/// `Ok` when `sql` is safe to run in a dry run; else why not (naming what is refused).
pub fn check(sql: &str) -> Result<(), String> {
    let statements = sqlparser::parser::Parser::parse_sql(&PostgreSqlDialect {}, sql)
        .map_err(|e| format!("plan-mode SQL must be one SELECT veza-dr can read ({e})"))?;
    let [stmt] = statements.as_slice() else {
        return Err(format!("plan-mode SQL must be one statement, not {}", statements.len()));
    };
    let Statement::Query(q) = stmt else {
        return Err("plan-mode SQL must be a SELECT".into());
    };
    if q.with.is_some() || !q.locks.is_empty() || !matches!(*q.body, SetExpr::Select(_)) {
        return Err("plan-mode SQL must be a plain SELECT (no WITH, FOR UPDATE or set operations)".into());
    }
    if let SetExpr::Select(s) = &*q.body {
        if s.into.is_some() {
            return Err("plan-mode SQL must not SELECT INTO".into());
        }
    }
    let mut refused: Option<String> = None;
    let _ = visit_expressions(stmt, |e: &Expr| {
        if let Expr::Function(f) = e {
            match base(&f.name) {
                Ok(n) if FUNCTIONS.contains(&n.as_str()) => {}
                Ok(n) | Err(n) => {
                    refused = Some(format!("function `{n}`"));
                    return ControlFlow::Break(());
                }
            }
        }
        ControlFlow::Continue(())
    });
    if refused.is_none() {
        let _ = visit_relations(stmt, |r: &ObjectName| {
            match base(r) {
                Ok(n) if RELATIONS.contains(&n.as_str()) || FUNCTIONS.contains(&n.as_str()) => {}
                Ok(n) | Err(n) => {
                    refused = Some(format!("relation `{n}`"));
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        });
    }
    match refused {
        Some(what) => Err(format!("{what} is not on the dry-run allow-list")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn only_side_effect_free_selects_pass() {
        for ok in [
            "SELECT pg_is_in_recovery()",
            "select timeline_id from pg_control_checkpoint()",
            "SELECT pg_walfile_name(pg_current_wal_lsn())",
            "SELECT pg_current_wal_lsn()::text",
            "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
            "SELECT pg_catalog.pg_is_in_recovery()",
            "SELECT 1",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
        for bad in [
            "select pg_promote()",
            "SELECT pg_catalog.pg_promote(true, 60)",
            "select pg_terminate_backend(42)",
            "select pg_switch_wal()",
            "SELECT PG_PROMOTE()",
            "SELECT \"pg_promote\"()",
            "SELECT * FROM (SELECT pg_promote()) x",
            "SELECT 1 WHERE pg_promote()",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
            "SELECT 1; SELECT pg_promote()",
            "WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x",
            "insert into t values (1)",
            "SELECT * FROM accounts",
            "SELECT nextval('s')",
            "SELECT * INTO t2 FROM pg_settings",
            "SELECT set_config('transaction_read_only', 'off', false)",
            "SELECT dblink_exec('x', 'y')",
            "COPY t FROM PROGRAM 'id'",
        ] {
            assert!(check(bad).is_err(), "{bad} passed");
        }
    }
}
