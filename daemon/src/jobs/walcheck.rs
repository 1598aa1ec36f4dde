//! Keyless checks of the WAL archive, as WAL-G's `wal-verify integrity` does: every physical
//! snapshot has each segment from its start to its stop in the repository, and the archive is
//! continuous from the oldest retained backup of the cluster to the newest archived segment.
//! A gap is `missing` (damage: recovery cannot cross it) unless every segment after it was
//! stored within the last few minutes (`uploading`: archiving is catching up).

use crate::error::Result;
use crate::policy::SourceKind;
use crate::repository::format::Sidecar;
use crate::repository::Repository;
use crate::source::postgres::wal::{WalKind, WalName};
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashMap};

/// Gaps whose later segments are all this fresh are still being uploaded (five minutes;
/// `VEZA_DR_WAL_UPLOADING` sets another window, tests use 0s).
fn uploading_window() -> chrono::Duration {
    std::env::var("VEZA_DR_WAL_UPLOADING")
        .ok()
        .and_then(|s| humantime::parse_duration(&s).ok())
        .and_then(|d| chrono::Duration::from_std(d).ok())
        .unwrap_or(chrono::Duration::minutes(5))
}
/// A gap listed in full only up to this many segments (a long gap is named by its ends).
const SHOWN: usize = 8;

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Gap {
    /// First and last missing segment names.
    pub from: String,
    pub to: String,
    pub segments: u64,
    /// `missing` or `uploading`.
    pub status: String,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Continuity {
    pub cluster: String,
    /// The oldest retained backup's first segment and the newest archived one.
    pub from: String,
    pub to: String,
    pub found: u64,
    pub gaps: Vec<Gap>,
    /// Segments missing from a snapshot's own range (start to stop): that snapshot cannot
    /// reach consistency.
    pub snapshots_missing: Vec<String>,
}

impl Continuity {
    /// Segments in the newest gap that is really missing (0 without one): the daemon's metric.
    pub fn newest_gap(&self) -> u64 {
        self.gaps.iter().rev().find(|g| g.status == "missing").map(|g| g.segments).unwrap_or(0)
    }

    pub fn damage(&self) -> impl Iterator<Item = String> + '_ {
        let gaps = self.gaps.iter().filter(|g| g.status == "missing").map(move |g| {
            format!(
                "WAL of cluster {}: {} segment(s) missing from {} to {}: recovery past {} is impossible",
                self.cluster, g.segments, g.from, g.to, g.from
            )
        });
        gaps.chain(self.snapshots_missing.iter().cloned())
    }
}

/// A position (log, segment) as one number, and back.
fn pos(n: &WalName, seg_size: u64) -> Option<u64> {
    let p = n.position()?;
    let log = u64::from_str_radix(&p[..8], 16).ok()?;
    let seg = u64::from_str_radix(&p[8..], 16).ok()?;
    Some(log * (0x1_0000_0000 / seg_size) + seg)
}

fn name_at(tli: u32, p: u64, seg_size: u64) -> WalName {
    let per_log = 0x1_0000_0000 / seg_size;
    WalName::segment(tli, p / per_log, p % per_log)
}

/// Check the WAL of every cluster that `snaps` (all live sidecars) back up physically.
pub async fn check(repo: &Repository, snaps: &[Sidecar], policy: &str) -> Result<Vec<Continuity>> {
    let physical: Vec<&Sidecar> = snaps.iter().filter(|s| s.source == SourceKind::PostgresPhysical).collect();
    if physical.is_empty() {
        return Ok(vec![]);
    }
    // Every segment of every cluster: position → (timeline, stored at).
    let mut stored: HashMap<u64, BTreeMap<u64, (u32, DateTime<Utc>)>> = HashMap::new();
    let seg_size = physical.iter().find_map(|s| s.pg().map(|p| p.wal_segment_size)).unwrap_or(16 << 20);
    for (cluster, name, at) in repo.wal_segments().await? {
        if name.kind() != WalKind::Segment {
            continue;
        }
        if let Some(p) = pos(&name, seg_size) {
            let e = stored.entry(cluster).or_default().entry(p).or_insert((name.timeline(), at));
            // The highest timeline of a position is the one recovery follows.
            if name.timeline() > e.0 {
                *e = (name.timeline(), at);
            }
        }
    }
    let now = Utc::now();
    let window = uploading_window();
    let mut out = Vec::new();
    let mut clusters: Vec<u64> = physical.iter().filter_map(|s| s.pg()?.system_identifier.parse().ok()).collect();
    clusters.sort();
    clusters.dedup();
    for cluster in clusters {
        let of_cluster: Vec<&Sidecar> = physical
            .iter()
            .copied()
            .filter(|s| s.pg().is_some_and(|p| p.system_identifier == cluster.to_string()))
            .collect();
        let segs = stored.remove(&cluster).unwrap_or_default();
        let Some(from) = of_cluster.iter().filter_map(|s| pos(&s.pg()?.start_wal, seg_size)).min() else { continue };
        let newest = segs.keys().next_back().copied().unwrap_or(from);
        let tli = |p: u64| segs.range(..=p).next_back().map(|(_, v)| v.0).unwrap_or(1);
        let mut c = Continuity {
            cluster: cluster.to_string(),
            from: name_at(tli(from), from, seg_size).to_string(),
            to: name_at(tli(newest), newest, seg_size).to_string(),
            found: segs.range(from..=newest).count() as u64,
            gaps: vec![],
            snapshots_missing: vec![],
        };
        let mut p = from;
        while p <= newest {
            if segs.contains_key(&p) {
                p += 1;
                continue;
            }
            let start = p;
            while p <= newest && !segs.contains_key(&p) {
                p += 1;
            }
            let fresh = segs.range(p..).all(|(_, (_, at))| now - *at < window);
            c.gaps.push(Gap {
                from: name_at(tli(start), start, seg_size).to_string(),
                to: name_at(tli(start), p - 1, seg_size).to_string(),
                segments: p - start,
                status: if fresh { "uploading" } else { "missing" }.into(),
            });
        }
        for s in of_cluster.iter().filter(|s| s.policy == policy) {
            let Some(pg) = s.pg() else { continue };
            let (Some(a), Some(b)) = (pos(&pg.start_wal, seg_size), pos(&pg.stop_wal, seg_size)) else { continue };
            let missing: Vec<String> = (a..=b)
                .filter(|p| !segs.contains_key(p))
                .map(|p| name_at(pg.timeline, p, seg_size).to_string())
                .collect();
            if !missing.is_empty() {
                let shown: Vec<&str> = missing.iter().take(SHOWN).map(String::as_str).collect();
                c.snapshots_missing.push(format!(
                    "snapshot {}: WAL segment(s) {} between its start and stop are not in the repository: it cannot reach consistency",
                    s.id,
                    shown.join(", ")
                ));
            }
        }
        out.push(c);
    }
    Ok(out)
}
