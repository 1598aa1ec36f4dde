//! PostgreSQL sources: physical (PGDATA read between `pg_backup_start` and `pg_backup_stop`,
//! WAL archived by `wal-push`, point-in-time restore) and logical (`pg_dump`). This module
//! holds what both use: connecting (errors name the DSN's reference, never the DSN), the
//! recovery target of a restore, and the choice of backup for it.

pub mod archive;
pub mod dsn;
pub mod handover;
pub mod logical;
pub mod pagecheck;
pub mod physical;
pub mod recovery;
pub mod server;
pub mod wal;
pub mod walframes;

use crate::error::{Error, Kind, Result};
use crate::policy::{PgMethod, PgSource, Policy};
use std::time::Duration;

pub use dsn::Dsn;
pub use physical::PhysicalSummary;
pub use recovery::RecoveryTarget;

/// The source object of a PostgreSQL policy.
pub fn of(policy: &Policy, pg: &PgSource) -> Box<dyn super::Source> {
    match pg.method {
        PgMethod::Physical => Box::new(physical::Physical { policy: policy.clone(), pg: pg.clone() }),
        PgMethod::Logical => Box::new(logical::Logical { policy: policy.clone(), pg: pg.clone() }),
    }
}

/// Connect with the policy's DSN. Errors name the reference, never the DSN.
pub async fn connect(pg: &PgSource) -> Result<tokio_postgres::Client> {
    connect_dsn(&pg.dsn).await
}

/// Connect as libpq would with this DSN (see [`Dsn::config`]). Errors name a reference,
/// never what it holds.
pub async fn connect_dsn(dsn_ref: &Dsn) -> Result<tokio_postgres::Client> {
    let cfg = dsn_ref.config()?;
    let (client, conn) = tokio::time::timeout(Duration::from_secs(15), cfg.connect(tokio_postgres::NoTls))
        .await
        .map_err(|_| Error::new(Kind::Database, format!("connecting to PostgreSQL with {dsn_ref} timed out")))?
        .map_err(|e| db_error(&dsn_ref.to_string(), "connect to PostgreSQL", e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "postgres connection ended");
        }
    });
    Ok(client)
}

/// A PostgreSQL failure as one line with a hint for the common causes.
pub fn db_error(dsn_ref: &str, what: &str, e: tokio_postgres::Error) -> Error {
    let (msg, hint) = match e.as_db_error() {
        Some(db) => {
            let hint = match db.code().code() {
                "28P01" | "28000" => "check the user and password in the DSN secret",
                "42501" => {
                    "the user needs the superuser or REPLICATION role with EXECUTE on pg_backup_start/pg_backup_stop"
                }
                "3D000" => "the database in the DSN does not exist",
                "55000" => "check archive_mode/wal_level on the server",
                _ => "see the PostgreSQL server log",
            };
            (db.message().to_string(), hint)
        }
        None => {
            let t = e.to_string();
            let src = std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default();
            let hint = if src.contains("password missing") || t.contains("password missing") {
                "the server asks for a password: put it in ~/.pgpass (or the file PGPASSFILE names, mode 0600), \
                 in PGPASSWORD, or in a DSN behind env:/file:"
            } else {
                "check the host/port in the DSN and that the server is running"
            };
            (format!("{t}{}", if src.is_empty() { String::new() } else { format!(": {src}") }), hint)
        }
    };
    Error::new(Kind::Database, format!("cannot {what} ({dsn_ref}): {msg}")).with_hint(hint)
}

pub(crate) async fn one_text(c: &tokio_postgres::Client, dsn: &str, sql: &str) -> Result<String> {
    let row = c.query_one(sql, &[]).await.map_err(|e| db_error(dsn, "query the server", e))?;
    Ok(row.get::<_, Option<String>>(0).unwrap_or_default())
}

/// How long to wait for WAL to reach the repository (`VEZA_DR_WAL_TIMEOUT`, default 300s).
pub fn wal_timeout() -> Duration {
    std::env::var("VEZA_DR_WAL_TIMEOUT")
        .ok()
        .and_then(|s| humantime::parse_duration(&s).ok())
        .unwrap_or(Duration::from_secs(300))
}
