//! The recovery target of a physical restore (`--to-time`, `--to-lsn`, `--to-xid`, `--to-name`,
//! `--immediate`), the settings it becomes, and the choice of the backup to start from.

use super::wal::parse_lsn;
use crate::error::{Error, Result};
use crate::repository::format::{Sidecar, SourceKind};
use chrono::{DateTime, Utc};

#[derive(Debug, Clone, Default)]
pub struct RecoveryTarget {
    pub time: Option<String>,
    pub lsn: Option<String>,
    pub xid: Option<String>,
    pub name: Option<String>,
    pub immediate: bool,
}

/// The forms `--to-time` accepts, named in its error.
pub const TIME_FORMS: &str = "RFC 3339 (2026-11-21T03:15:00Z) or PostgreSQL's timestamptz text \
(2026-11-21 03:15:00.123456+00, +05:30 or UTC; space or T)";

/// Parse a point in time as a DBA copies it: RFC 3339, or what psql and the server log print
/// (`2026-12-01 10:02:10.269957+00`, `… +05:30`, `… UTC`), with a space or `T`.
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    let t = s.trim();
    if let Ok(d) = DateTime::parse_from_rfc3339(t) {
        return Some(d.with_timezone(&Utc));
    }
    // Every accepted form is ASCII: checking it first makes the slicing below char-safe (the
    // fuzzer found an offset with a two-byte character in it, which sliced inside it).
    if !t.is_ascii() {
        return None;
    }
    // Only a `T` right after the date separates.
    let t = match t.get(10..11) {
        Some("T") => format!("{} {}", &t[..10], &t[11..]),
        _ => t.to_string(),
    };
    let (body, zone) = match t.strip_suffix(" UTC").or_else(|| t.strip_suffix(" GMT")) {
        Some(b) => (b.to_string(), "+00:00".to_string()),
        None => {
            let at = t.rfind(['+', '-']).filter(|&i| i > 10)?;
            let (b, z) = t.split_at(at);
            let z = match z.len() {
                3 => format!("{z}:00"),
                5 if !z.contains(':') => format!("{}:{}", &z[..3], &z[3..]),
                _ => z.to_string(),
            };
            (b.trim_end().to_string(), z)
        }
    };
    DateTime::parse_from_str(&format!("{body}{zone}"), "%Y-%m-%d %H:%M:%S%.f%:z").ok().map(|d| d.with_timezone(&Utc))
}

impl RecoveryTarget {
    pub fn describe(&self) -> String {
        match self {
            RecoveryTarget { time: Some(t), .. } => format!("time {t}"),
            RecoveryTarget { lsn: Some(l), .. } => format!("lsn {l}"),
            RecoveryTarget { xid: Some(x), .. } => format!("xid {x}"),
            RecoveryTarget { name: Some(n), .. } => format!("restore point {n}"),
            RecoveryTarget { immediate: true, .. } => "the end of the backup (immediate)".into(),
            _ => "the newest archived WAL (latest)".into(),
        }
    }

    pub fn is_set(&self) -> bool {
        self.time.is_some() || self.lsn.is_some() || self.xid.is_some() || self.name.is_some() || self.immediate
    }

    fn time(&self) -> Result<Option<DateTime<Utc>>> {
        self.time
            .as_deref()
            .map(|t| {
                parse_time(t).ok_or_else(|| {
                    Error::usage(format!("--to-time {t} is not a time veza-dr understands"))
                        .with_hint(format!("write {TIME_FORMS}"))
                })
            })
            .transpose()
    }

    /// The `recovery_target_*` settings for postgresql.auto.conf.
    pub fn settings(&self) -> Result<Vec<(String, String)>> {
        let mut v = Vec::new();
        if let Some(utc) = self.time()? {
            // PostgreSQL reads microseconds and a numeric offset.
            v.push(("recovery_target_time".into(), utc.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string()));
        } else if let Some(l) = &self.lsn {
            parse_lsn(l).ok_or_else(|| Error::usage(format!("--to-lsn {l} is not an LSN like 0/3000060")))?;
            v.push(("recovery_target_lsn".into(), l.clone()));
        } else if let Some(x) = &self.xid {
            x.parse::<u64>().map_err(|_| Error::usage(format!("--to-xid {x} is not a transaction id")))?;
            v.push(("recovery_target_xid".into(), x.clone()));
        } else if let Some(n) = &self.name {
            v.push(("recovery_target_name".into(), n.clone()));
        } else if self.immediate {
            v.push(("recovery_target".into(), "immediate".into()));
        }
        v.push(("recovery_target_action".into(), "promote".into()));
        Ok(v)
    }

    /// The newest physical backup that ends before the target.
    pub fn choose(&self, snaps: &[Sidecar]) -> Result<Sidecar> {
        let phys: Vec<&Sidecar> = snaps.iter().filter(|s| s.source == SourceKind::PostgresPhysical).collect();
        let newest = phys.last().copied().cloned();
        let pick = if let Some(want) = self.time()? {
            phys.iter().rev().find(|s| s.pg().is_some_and(|p| p.stop_time <= want)).copied().cloned()
        } else if let Some(l) = &self.lsn {
            let want = parse_lsn(l).ok_or_else(|| Error::usage(format!("--to-lsn {l} is not an LSN")))?;
            phys.iter()
                .rev()
                .find(|s| s.pg().and_then(|p| parse_lsn(&p.stop_lsn)).is_some_and(|stop| stop <= want))
                .copied()
                .cloned()
        } else {
            newest.clone()
        };
        pick.ok_or_else(|| match phys.first() {
            None => Error::not_found("no physical backup of this policy yet")
                .with_hint("run `veza-dr backup <policy>` first"),
            Some(oldest) => Error::not_found(format!(
                "no physical backup ends before {}: the oldest ends at {}",
                self.describe(),
                oldest.pg().map(|p| p.stop_time.to_rfc3339()).unwrap_or_else(|| "?".into())
            ))
            .with_hint("choose a later target"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_as_psql_and_the_server_log_print_them() {
        let want = "2026-12-01T10:02:10.269957+00:00";
        for t in [
            "2026-12-01 10:02:10.269957+00",
            "2026-12-01T10:02:10.269957Z",
            "2026-12-01 10:02:10.269957 UTC",
            "2026-12-01 15:32:10.269957+05:30",
            "2026-12-01 15:32:10.269957+0530",
            "2026-12-01T10:02:10.269957+00:00",
        ] {
            assert_eq!(parse_time(t).map(|d| d.to_rfc3339()).as_deref(), Some(want), "{t}");
        }
        assert_eq!(parse_time("2026-12-01 05:02:10-05").unwrap().to_rfc3339(), "2026-12-01T10:02:10+00:00");
        for bad in ["yesterday", "2026-12-01", "2026-13-01 00:00:00+00", "10:02:10+00", "2026-12-01 10:02:10+0\u{183}0"]
        {
            assert!(parse_time(bad).is_none(), "{bad}");
        }
        let e = RecoveryTarget { time: Some("soon".into()), ..Default::default() }.settings().unwrap_err();
        assert!(e.hint.unwrap().contains("PostgreSQL's timestamptz"));
    }
}
