//! Job history in the local state (SQLite): what ran, when, how it ended. Also remembers when
//! the daemon was last alive, for catch-up after downtime.

use crate::error::{Error, Result};
use chrono::{DateTime, Utc};
use std::path::Path;
use std::sync::Mutex;

pub struct History {
    conn: Mutex<rusqlite::Connection>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobRecord {
    pub policy: String,
    pub kind: String,
    pub reason: String,
    pub started: DateTime<Utc>,
    pub finished: DateTime<Utc>,
    pub result: String,
    pub error: Option<String>,
    pub snapshot: Option<String>,
    pub bytes_read: u64,
    pub bytes_stored: u64,
    pub attempts: u32,
}

fn db_err(path: &Path, e: rusqlite::Error) -> Error {
    Error::failed(format!("job history {}: {e}", path.display()))
        .with_hint("check --state-dir; the history can be deleted, it holds no backup data")
}

impl History {
    pub fn open(state_dir: &Path) -> Result<History> {
        std::fs::create_dir_all(state_dir).map_err(|e| Error::io("create state directory", state_dir, e))?;
        let path = state_dir.join("history.sqlite");
        let conn = rusqlite::Connection::open(&path).map_err(|e| db_err(&path, e))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE IF NOT EXISTS jobs (
                id INTEGER PRIMARY KEY, policy TEXT NOT NULL, kind TEXT NOT NULL, reason TEXT NOT NULL,
                started TEXT NOT NULL, finished TEXT NOT NULL, result TEXT NOT NULL, error TEXT,
                snapshot TEXT, bytes_read INTEGER NOT NULL, bytes_stored INTEGER NOT NULL, attempts INTEGER NOT NULL);
             CREATE INDEX IF NOT EXISTS jobs_policy ON jobs (policy, started);
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
        )
        .map_err(|e| db_err(&path, e))?;
        Ok(History { conn: Mutex::new(conn) })
    }

    pub fn record(&self, r: &JobRecord) -> Result<()> {
        let c = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        c.execute(
            "INSERT INTO jobs (policy, kind, reason, started, finished, result, error, snapshot, bytes_read, bytes_stored, attempts)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            rusqlite::params![
                r.policy,
                r.kind,
                r.reason,
                r.started.to_rfc3339(),
                r.finished.to_rfc3339(),
                r.result,
                r.error,
                r.snapshot,
                r.bytes_read as i64,
                r.bytes_stored as i64,
                r.attempts
            ],
        )
        .map_err(|e| Error::failed(format!("cannot record job history: {e}")))?;
        Ok(())
    }

    /// The jobs of a policy, oldest first (all policies if `None`).
    pub fn list(&self, policy: Option<&str>) -> Result<Vec<JobRecord>> {
        let c = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let mut st = c
            .prepare(
                "SELECT policy, kind, reason, started, finished, result, error, snapshot, bytes_read, bytes_stored, attempts
                 FROM jobs WHERE ?1 IS NULL OR policy = ?1 ORDER BY started, id",
            )
            .map_err(|e| Error::failed(format!("cannot read job history: {e}")))?;
        let rows = st
            .query_map([policy], |r| {
                let t = |s: String| DateTime::parse_from_rfc3339(&s).map(|d| d.with_timezone(&Utc)).unwrap_or_default();
                Ok(JobRecord {
                    policy: r.get(0)?,
                    kind: r.get(1)?,
                    reason: r.get(2)?,
                    started: t(r.get(3)?),
                    finished: t(r.get(4)?),
                    result: r.get(5)?,
                    error: r.get(6)?,
                    snapshot: r.get(7)?,
                    bytes_read: r.get::<_, i64>(8)? as u64,
                    bytes_stored: r.get::<_, i64>(9)? as u64,
                    attempts: r.get(10)?,
                })
            })
            .map_err(|e| Error::failed(format!("cannot read job history: {e}")))?;
        rows.collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::failed(format!("cannot read job history: {e}")))
    }

    pub fn last_seen(&self) -> Option<DateTime<Utc>> {
        let c = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let v: Option<String> = c.query_row("SELECT value FROM meta WHERE key = 'last-seen'", [], |r| r.get(0)).ok();
        v.and_then(|s| DateTime::parse_from_rfc3339(&s).ok()).map(|d| d.with_timezone(&Utc))
    }

    pub fn set_last_seen(&self, t: DateTime<Utc>) {
        let c = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let _ = c.execute("INSERT INTO meta (key, value) VALUES ('last-seen', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value", [t.to_rfc3339()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_lists_jobs_and_remembers_last_seen() {
        let d = tempfile::tempdir().unwrap();
        let h = History::open(d.path()).unwrap();
        let now = Utc::now();
        let r = JobRecord {
            policy: "db".into(),
            kind: "full".into(),
            reason: "schedule".into(),
            started: now,
            finished: now,
            result: "ok".into(),
            error: None,
            snapshot: Some("s1".into()),
            bytes_read: 10,
            bytes_stored: 5,
            attempts: 1,
        };
        h.record(&r).unwrap();
        h.record(&JobRecord { policy: "other".into(), ..r.clone() }).unwrap();
        assert_eq!(h.list(Some("db")).unwrap().len(), 1);
        assert_eq!(h.list(None).unwrap().len(), 2);
        assert!(h.last_seen().is_none());
        h.set_last_seen(now);
        drop(h);
        let h = History::open(d.path()).unwrap();
        assert_eq!(h.last_seen().unwrap().timestamp(), now.timestamp());
        assert_eq!(h.list(Some("db")).unwrap()[0].snapshot.as_deref(), Some("s1"));
    }
}
