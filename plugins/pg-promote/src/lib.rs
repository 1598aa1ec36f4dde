//! `pg-promote`: promote a PostgreSQL streaming standby. Checks the named connection is a
//! standby, calls `pg_promote()`, waits until it leaves recovery and reports the new timeline.
//! The host holds the DSN; this plugin only knows the connection's name.
//!
//! Config: `connection` (required: a connection name granted to the step), `wait` (60s).

wit_bindgen::generate!({ world: "runbook-step", path: "../../wit" });

use exports::veza::dr::step::Guest;
use veza::dr::host::{self, Level};
use veza::dr::types::{Context, Description, Grants, Outcome, StepError};

struct Plugin;
export!(Plugin);

struct Cfg {
    connection: String,
    wait_ms: u64,
}

fn parse(cfg: &kit::Config) -> Result<Cfg, StepError> {
    (|| -> Result<Cfg, String> {
        kit::known_keys(cfg, &["connection", "wait"])?;
        Ok(Cfg {
            connection: kit::require(cfg, "connection")?.to_string(),
            wait_ms: kit::duration_or(cfg, "wait", 60_000)?,
        })
    })()
    .map_err(StepError::InvalidConfig)
}

/// The single value of a one-row, one-column query.
fn scalar(conn: &str, sql: &str) -> Result<String, StepError> {
    let rows = host::sql(conn, sql)?;
    rows.into_iter()
        .next()
        .and_then(|r| r.into_iter().next().flatten())
        .ok_or_else(|| StepError::Failed(format!("`{sql}` on {conn} returned no value")))
}

fn in_recovery(conn: &str) -> Result<bool, StepError> {
    Ok(scalar(conn, "SELECT pg_is_in_recovery()")? == "t")
}

/// The server's timeline: on a standby the one of its last restartpoint, on a primary the one
/// it writes WAL on.
fn timeline(conn: &str, standby: bool) -> Result<u64, StepError> {
    if standby {
        let tl = scalar(conn, "SELECT timeline_id FROM pg_control_checkpoint()")?;
        return tl.parse().map_err(|_| StepError::Failed(format!("odd timeline `{tl}`")));
    }
    let name = scalar(conn, "SELECT pg_walfile_name(pg_current_wal_lsn())")?;
    u64::from_str_radix(name.get(..8).unwrap_or(""), 16)
        .map_err(|_| StepError::Failed(format!("odd WAL file name `{name}`")))
}

impl Guest for Plugin {
    fn describe() -> Description {
        Description {
            name: "pg-promote".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            summary: "Promote a PostgreSQL standby and wait until it accepts writes".into(),
            needs: Grants { http: vec![], connections: vec![], secrets: vec![] },
            verifies: true,
        }
    }

    fn needs_for(config: Vec<(String, String)>) -> Result<Grants, StepError> {
        let c = parse(&config)?;
        Ok(Grants { http: vec![], connections: vec![c.connection], secrets: vec![] })
    }

    fn validate(config: Vec<(String, String)>) -> Result<(), StepError> {
        parse(&config).map(|_| ())
    }

    fn plan(ctx: Context) -> Result<Vec<String>, StepError> {
        let c = parse(&ctx.config)?;
        if !in_recovery(&c.connection)? {
            return Err(StepError::Failed(format!(
                "connection `{}` is not a standby: it is not in recovery",
                c.connection
            )));
        }
        let lsn = scalar(&c.connection, "SELECT pg_last_wal_replay_lsn()::text")?;
        let tl = timeline(&c.connection, true)?;
        Ok(vec![
            format!(
                "promote the standby on connection `{}` (timeline {tl}, replayed up to {lsn}) with pg_promote()",
                c.connection
            ),
            format!(
                "wait up to {} ms until it leaves recovery, then report its new timeline",
                c.wait_ms.min(ctx.deadline_ms)
            ),
        ])
    }

    fn run(ctx: Context) -> Result<Outcome, StepError> {
        let c = parse(&ctx.config)?;
        let conn = c.connection.as_str();
        if !in_recovery(conn)? {
            return Err(StepError::Failed(format!(
                "connection `{conn}` is not a standby (not in recovery); refusing to promote"
            )));
        }
        let old_tl = timeline(conn, true)?;
        let wait_s = (c.wait_ms.min(ctx.deadline_ms) / 1000).max(1);
        host::log(Level::Info, &format!("promoting `{conn}` (timeline {old_tl})"));
        let start = host::now_ms();
        let promoted = scalar(conn, &format!("SELECT pg_promote(true, {wait_s})"))?;
        if promoted != "t" {
            return Err(StepError::Retryable(format!("pg_promote() on `{conn}` did not finish within {wait_s} s")));
        }
        // pg_promote(wait => true) returns once recovery ended; confirm from a fresh query.
        while in_recovery(conn)? {
            if host::now_ms() - start > c.wait_ms {
                return Err(StepError::Failed(format!("`{conn}` is still in recovery after {} ms", c.wait_ms)));
            }
            host::sleep_ms(200);
        }
        let new_tl = timeline(conn, false)?;
        let lsn = scalar(conn, "SELECT pg_current_wal_lsn()::text")?;
        Ok(Outcome {
            summary: format!(
                "`{conn}` promoted: timeline {old_tl} -> {new_tl} at {lsn}, in {} ms",
                host::now_ms() - start
            ),
            facts: vec![
                ("promoted-connection".into(), conn.into()),
                ("old-timeline".into(), old_tl.to_string()),
                ("new-timeline".into(), new_tl.to_string()),
                ("promoted-lsn".into(), lsn),
            ],
        })
    }

    fn verify(ctx: Context) -> Result<Outcome, StepError> {
        let c = parse(&ctx.config)?;
        if in_recovery(&c.connection)? {
            return Err(StepError::Failed(format!("`{}` is still a standby", c.connection)));
        }
        let ro = scalar(&c.connection, "SHOW transaction_read_only")?;
        if ro != "off" {
            return Err(StepError::Failed(format!("`{}` left recovery but sessions are read-only", c.connection)));
        }
        Ok(Outcome { summary: format!("`{}` is a primary and accepts writes", c.connection), facts: vec![] })
    }
}
