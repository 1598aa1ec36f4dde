//! wal-push look-ahead (pgBackRest's archive-push async): after it acknowledges a segment,
//! wal-push starts a detached `wal-ahead`. That process pushes the segments PostgreSQL has
//! finished but not yet handed to archive_command (`pg_wal/archive_status/*.ready`). Each one
//! is stored first; only then does a marker record the file's identity (device, inode, size,
//! times). When archive_command asks for that segment, wal-push acknowledges it from the
//! marker, without reading or sending it again.
//!
//! A segment is still acknowledged only once it is stored. The marker is written after the
//! store's put has returned (on file://, after fsync), and it is used once. It serves only if
//! the file is the one that was pushed, for the same repository, and no older than
//! `MARKER_TTL`. In every other case the segment is pushed then and there, as without the
//! look-ahead. PostgreSQL never writes into a segment it has marked `.ready`, so the identity
//! of the file stands for its content.

use crate::error::Result;
use crate::policy::Policy;
use futures::StreamExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Segments pushed ahead at most (more would only hold memory of work not yet asked for).
const AHEAD: usize = 16;
/// A marker older than this is not trusted: the repository may have changed under it.
const MARKER_TTL: Duration = Duration::from_secs(600);

#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Marker {
    repository: String,
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Marker {
    fn of(repository: &str, m: &std::fs::Metadata) -> Marker {
        Marker {
            repository: repository.to_string(),
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            ctime_ns: m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
        }
    }
}

fn marker_dir(state_dir: &Path, policy: &str) -> PathBuf {
    state_dir.join("wal-ahead").join(policy)
}

/// The marker directory, private to the archiving user: a marker acknowledges WAL.
pub(super) fn create_private(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Whether `path` (a WAL file name checked by the caller) was stored ahead and is unchanged
/// since: then it may be acknowledged as it is. The marker is removed either way.
pub fn take(state_dir: &Path, policy: &Policy, path: &Path) -> bool {
    let Some(name) = path.file_name() else { return false };
    let marker = marker_dir(state_dir, &policy.name).join(name);
    let Ok(meta_marker) = std::fs::metadata(&marker) else { return false };
    let text = std::fs::read(&marker);
    let _ = std::fs::remove_file(&marker);
    let fresh = meta_marker.modified().ok().and_then(|t| t.elapsed().ok()).is_some_and(|age| age < MARKER_TTL);
    let (Ok(text), Ok(now)) = (text, std::fs::metadata(path)) else { return false };
    let Ok(m) = serde_json::from_slice::<Marker>(&text) else { return false };
    fresh && m == Marker::of(&policy.repository.url, &now)
}

/// Start the look-ahead for the segments waiting in `status_dir`, unless one is at work.
pub fn spawn(policy: &Policy, state_dir: &Path, wal_path: &Path) {
    let Some(status) = status_dir(wal_path) else { return };
    // Nothing waiting beyond the segment just acknowledged: no process to start.
    if ready(&status).len() <= 1 {
        return;
    }
    let dir = marker_dir(state_dir, &policy.name);
    if create_private(&dir).is_err() || super::wal::try_lock(&dir.join(".ahead")).is_none() {
        return;
    }
    let Some(name) = wal_path.file_name() else { return };
    super::wal::spawn_detached(&[
        "--state-dir".as_ref(),
        state_dir.as_os_str(),
        "wal-ahead".as_ref(),
        policy.path.as_os_str(),
        "--status-dir".as_ref(),
        status.as_os_str(),
        "--after".as_ref(),
        name,
    ]);
}

/// `pg_wal/archive_status` beside a segment PostgreSQL passed (`%p` is relative to the data
/// directory, which is archive_command's working directory).
fn status_dir(wal_path: &Path) -> Option<PathBuf> {
    let dir = wal_path.parent()?.join("archive_status");
    let dir = if dir.is_absolute() { dir } else { std::env::current_dir().ok()?.join(dir) };
    dir.is_dir().then_some(dir)
}

/// The WAL files waiting for archive_command, oldest first.
fn ready(status: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(status)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".ready")).map(str::to_string))
                .filter(|n| crate::source::postgres::wal::WalName::parse(n).is_some())
                .collect()
        })
        .unwrap_or_default();
    // Timeline history files first (PostgreSQL archives them before the segments of a timeline).
    names.sort_by_key(|n| (!n.ends_with(".history"), n.clone()));
    names
}

/// The hidden `wal-ahead`: push what waits in `status` (but `after`, just acknowledged), up to
/// `AHEAD` segments ahead, then
/// drop the markers of segments that are no longer waiting. Returns how many it stored.
pub async fn run(policy: &Policy, state_dir: &Path, status: &Path, after: &str) -> Result<usize> {
    let dir = marker_dir(state_dir, &policy.name);
    create_private(&dir).map_err(|e| crate::error::Error::io("create", &dir, e))?;
    let Some(_lock) = super::wal::try_lock(&dir.join(".ahead")) else { return Ok(0) };
    let writer = super::wal::writer(policy, state_dir).await?;
    let data_dir = super::wal::data_dir(policy);
    let mut stored = 0;
    // The segment just acknowledged may still be listed as waiting: it is not pushed again.
    let mut tried: std::collections::HashSet<String> = [after.to_string()].into();
    loop {
        // The oldest waiting segment is archive_command's next: racing it would only push it
        // twice. The look-ahead takes the ones after it, two at a time, so it gets ahead.
        let waiting: Vec<String> = ready(status)
            .into_iter()
            .filter(|n| !dir.join(n).exists() && !tried.contains(n))
            .skip(1)
            .take(AHEAD)
            .collect();
        let held = std::fs::read_dir(&dir).map(|rd| rd.count()).unwrap_or(0);
        if waiting.is_empty() || held > AHEAD || stored >= 4 * AHEAD {
            break;
        }
        tried.extend(waiting.iter().cloned());
        let results: Vec<Result<bool>> = futures::stream::iter(waiting)
            .map(|name| {
                let (writer, dir, data_dir) = (&writer, &dir, data_dir.as_deref());
                async move {
                    let path = status.parent().unwrap_or(status).join(&name);
                    let Ok(before) = std::fs::metadata(&path) else { return Ok(false) };
                    let ahead = super::waltail::ahead_file(state_dir, &policy.name, &name);
                    let (_, key) = crate::source::postgres::archive::push(writer, &path, data_dir, Some(&ahead))
                        .await
                        .map_err(|e| e.context(format!("wal-ahead stops at {name}")))?;
                    let _ = std::fs::remove_file(&ahead);
                    if !policy.replicas.is_empty() {
                        super::walsend::enqueue(state_dir, policy, &key);
                    }
                    // Stored. The marker only if the file is still the one that was read.
                    let Ok(after) = std::fs::metadata(&path) else { return Ok(false) };
                    let m = Marker::of(&policy.repository.url, &after);
                    if m != Marker::of(&policy.repository.url, &before) {
                        return Ok(false);
                    }
                    // Written whole, then renamed: a marker is never read half-written.
                    let tmp = dir.join(format!(".{name}.tmp"));
                    let ok = std::fs::write(&tmp, serde_json::to_vec(&m).expect("serialisable"))
                        .and_then(|_| std::fs::rename(&tmp, dir.join(&name)));
                    Ok(ok.is_ok())
                }
            })
            .buffer_unordered(2)
            .collect()
            .await;
        let mut failed = false;
        for r in results {
            match r {
                Ok(true) => stored += 1,
                Ok(false) => {}
                // archive_command's own call will push it and report what is wrong.
                Err(e) => {
                    tracing::warn!("{}", e.message);
                    failed = true;
                }
            }
        }
        if failed {
            break;
        }
    }
    // Markers of segments no longer waiting were consumed by a push of their own.
    let waiting: std::collections::HashSet<String> = ready(status).into_iter().collect();
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if !n.starts_with('.') && !waiting.contains(&n) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    if stored > 0 && !policy.replicas.is_empty() {
        super::walsend::spawn_sender(policy, state_dir);
    }
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_stands_only_for_the_same_file() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("000000010000000000000007");
        std::fs::write(&f, b"segment").unwrap();
        let m = Marker::of("file:///r", &std::fs::metadata(&f).unwrap());
        assert_eq!(m, Marker::of("file:///r", &std::fs::metadata(&f).unwrap()));
        assert_ne!(m, Marker::of("file:///other", &std::fs::metadata(&f).unwrap()), "another repository");
        // Replaced by another file of the same name and length: another inode.
        let g = d.path().join("new");
        std::fs::write(&g, b"SEGMENT").unwrap();
        std::fs::rename(&g, &f).unwrap();
        assert_ne!(m, Marker::of("file:///r", &std::fs::metadata(&f).unwrap()));
    }
}
