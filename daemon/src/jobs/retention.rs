//! Which snapshots a retention policy keeps (keep-last / hourly / daily / weekly / monthly /
//! yearly / within), restic's semantics: per rule, the newest snapshot of each of the last N
//! periods that have one. The newest snapshot is always kept.

use crate::policy::Retention;
use crate::repository::format::{Sidecar, SnapshotId};
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;

/// For each kept snapshot id, the rules that keep it; everything else is forgotten.
pub fn select(
    snaps: &[Sidecar],
    r: &Retention,
    now: DateTime<Utc>,
) -> (BTreeMap<String, Vec<String>>, Vec<SnapshotId>) {
    let mut newest_first: Vec<&Sidecar> = snaps.iter().collect();
    newest_first.sort_by(|a, b| b.started.cmp(&a.started).then(b.id.cmp(&a.id)));
    let mut keep: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let no_rules = r.keep_last.is_none()
        && r.keep_hourly.is_none()
        && r.keep_daily.is_none()
        && r.keep_weekly.is_none()
        && r.keep_monthly.is_none()
        && r.keep_yearly.is_none()
        && r.keep_within.is_none();
    for (i, s) in newest_first.iter().enumerate() {
        if no_rules {
            keep.entry(s.id.to_string()).or_default().push("no retention rules".into());
        } else if i == 0 {
            keep.entry(s.id.to_string()).or_default().push("newest".into());
        }
    }
    if let Some(n) = r.keep_last {
        for s in newest_first.iter().take(n as usize) {
            keep.entry(s.id.to_string()).or_default().push("last".into());
        }
    }
    let buckets: [(&str, Option<u32>, &str); 5] = [
        ("hourly", r.keep_hourly, "%Y-%m-%d %H"),
        ("daily", r.keep_daily, "%Y-%m-%d"),
        ("weekly", r.keep_weekly, "%G-%V"),
        ("monthly", r.keep_monthly, "%Y-%m"),
        ("yearly", r.keep_yearly, "%Y"),
    ];
    for (name, n, fmt) in buckets {
        let Some(n) = n else { continue };
        let mut last: Option<String> = None;
        let mut count = 0;
        for s in &newest_first {
            if count >= n {
                break;
            }
            let b = s.started.format(fmt).to_string();
            if last.as_ref() != Some(&b) {
                keep.entry(s.id.to_string()).or_default().push(name.into());
                last = Some(b);
                count += 1;
            }
        }
    }
    if let Some(w) = r.keep_within {
        let cutoff = now - chrono::Duration::from_std(w.0).unwrap_or(chrono::Duration::MAX);
        for s in newest_first.iter().filter(|s| s.started >= cutoff) {
            keep.entry(s.id.to_string()).or_default().push("within".into());
        }
    }
    let forget = newest_first.iter().filter(|s| !keep.contains_key(s.id.as_str())).map(|s| s.id.clone()).collect();
    (keep, forget)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repository::format::*;

    fn snap(t: &str) -> Sidecar {
        let started: DateTime<Utc> = t.parse().unwrap();
        Sidecar {
            format: 1,
            id: SnapshotId::parse(&started.format("%Y%m%dT%H%M%SZ").to_string()).unwrap(),
            policy: "p".into(),
            kind: SnapshotKind::Full,
            source: SourceKind::Volume,
            host: "h".into(),
            started,
            finished: started,
            parent: None,
            packs: vec![],
            manifest_size: 0,
            stats: Stats::default(),
            postgres: None,
            warnings: vec![],
            warning_count: 0,
            manifest_hash: None,
            key_hash: None,
            signature: None,
        }
    }

    #[test]
    fn daily_weekly_monthly_keep_the_newest_of_each_period() {
        // Hourly snapshots for 60 days.
        let start: DateTime<Utc> = "2026-01-01T00:30:00Z".parse().unwrap();
        let snaps: Vec<Sidecar> =
            (0..60 * 24).map(|h| snap(&(start + chrono::Duration::hours(h)).to_rfc3339())).collect();
        let now = start + chrono::Duration::days(60);
        let r = Retention { keep_daily: Some(30), keep_weekly: Some(12), keep_monthly: Some(24), ..Default::default() };
        let (keep, forget) = select(&snaps, &r, now);
        // 30 daily (the 23:30 of each of the last 30 days), plus older weekly and monthly ones.
        let daily: Vec<_> = keep.iter().filter(|(_, why)| why.contains(&"daily".to_string())).collect();
        assert_eq!(daily.len(), 30);
        assert!(daily.iter().all(|(id, _)| id.ends_with("233000Z")), "daily keeps the last of each day");
        let monthly = keep.iter().filter(|(_, why)| why.contains(&"monthly".to_string())).count();
        assert_eq!(monthly, 3, "January, February and March 1st");
        let weekly = keep.iter().filter(|(_, why)| why.contains(&"weekly".to_string())).count();
        assert_eq!(weekly, 9, "60 days starting on a Thursday span 9 ISO weeks");
        assert_eq!(keep.len() + forget.len(), snaps.len());
        assert!(keep.contains_key(snaps.last().unwrap().id.as_str()));
    }

    #[test]
    fn keep_last_and_within() {
        let start: DateTime<Utc> = "2026-03-01T00:00:00Z".parse().unwrap();
        let snaps: Vec<Sidecar> = (0..10).map(|h| snap(&(start + chrono::Duration::hours(h)).to_rfc3339())).collect();
        let now = start + chrono::Duration::hours(10);
        let r = Retention {
            keep_last: Some(2),
            keep_within: Some(crate::policy::Dur(std::time::Duration::from_secs(4 * 3600 + 1))),
            ..Default::default()
        };
        let (keep, forget) = select(&snaps, &r, now);
        assert_eq!(keep.len(), 4, "{keep:?}");
        assert_eq!(forget.len(), 6);
        let none = Retention::default();
        assert_eq!(select(&snaps, &none, now).1.len(), 0, "no rules forget nothing");
    }
}
