//! Continuous WAL to the replicas. `wal-push` stores a segment on the primary (PostgreSQL's
//! acknowledgement waits for that, and only for that), then queues the object's key in a
//! local spool per replica and starts a detached sender unless one runs; the daemon drains the
//! spools too. The sender copies each queued object from the primary to the replica byte for
//! byte, so an unreachable replica never blocks or slows archiving: its entries wait.
//!
//! The spool is a hint, not the guarantee: it is bounded (`SPOOL_LIMIT` entries; past it a
//! segment is not queued, with a warning), not synced, and may be lost with the host. What it
//! drops or loses, the next `replicate` copies, since that copies every WAL object the replica
//! lacks. Entries are empty files named after the key (`/` as `+`); a name that is not a WAL
//! key is ignored, so nothing in the spool can name another object.

use crate::error::Result;
use crate::policy::replica::Replica;
use crate::policy::Policy;
use crate::repository::{keys, Repository};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Entries per replica spool.
pub const SPOOL_LIMIT: usize = 10_000;

fn policy_spool(state_dir: &Path, policy: &str) -> PathBuf {
    state_dir.join("replica-spool").join(policy)
}

pub fn spool_dir(state_dir: &Path, policy: &str, replica: &str) -> PathBuf {
    policy_spool(state_dir, policy).join(replica)
}

fn entry_name(key: &str) -> String {
    key.replace('/', "+")
}

fn entry_key(name: &str) -> Option<String> {
    let k = name.replace('+', "/");
    keys::parse_wal(&k).map(|_| k)
}

/// The queued keys of one replica, oldest name first.
pub fn queued(state_dir: &Path, policy: &str, replica: &str) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(spool_dir(state_dir, policy, replica)) else { return vec![] };
    let mut v: Vec<String> =
        rd.filter_map(|e| e.ok()).filter_map(|e| e.file_name().to_str().and_then(entry_key)).collect();
    v.sort();
    v
}

/// Queue a stored WAL object for every replica. Never fails the push: a spool that cannot be
/// written or is full is logged, and `replicate` copies the object later.
pub fn enqueue(state_dir: &Path, policy: &Policy, key: &str) {
    for r in &policy.replicas {
        let dir = spool_dir(state_dir, &policy.name, &r.name);
        let res = (|| -> std::io::Result<bool> {
            std::fs::create_dir_all(&dir)?;
            if std::fs::read_dir(&dir)?.count() >= SPOOL_LIMIT {
                return Ok(false);
            }
            std::fs::File::create(dir.join(entry_name(key)))?;
            Ok(true)
        })();
        match res {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                replica = %r.name,
                "the replica's WAL spool is full ({SPOOL_LIMIT} segments): {key} waits for the next replicate"
            ),
            Err(e) => tracing::warn!(replica = %r.name, "cannot queue {key} for the replica ({}): {e}", dir.display()),
        }
    }
}

/// The sender's lock: one sender per policy spool. `None` when another one holds it.
fn sender_lock(state_dir: &Path, policy: &str) -> Option<nix::fcntl::Flock<std::fs::File>> {
    let dir = policy_spool(state_dir, policy);
    std::fs::create_dir_all(&dir).ok()?;
    super::wal::try_lock(&dir.join(".sender"))
}

/// What one drain did for one replica.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Drained {
    pub replica: String,
    pub sent: u64,
    pub left: usize,
    pub error: Option<String>,
}

/// Send what is queued, per replica, until the spool holds only entries that failed this
/// time; `None` when another sender holds the spool. A push that finds the lock held starts
/// no sender, so the holder looks again before it lets go: nothing queued meanwhile waits.
pub async fn drain(policy: &Policy, state_dir: &Path) -> Result<Option<Vec<Drained>>> {
    let Some(_lock) = sender_lock(state_dir, &policy.name) else { return Ok(None) };
    let mut out: Vec<Drained> = Vec::new();
    let mut primary: Option<Repository> = None;
    let mut failed: std::collections::HashSet<String> = Default::default();
    loop {
        let mut sent_any = false;
        for r in &policy.replicas {
            if failed.contains(&r.name) {
                continue;
            }
            let keys = queued(state_dir, &policy.name, &r.name);
            if keys.is_empty() {
                continue;
            }
            if primary.is_none() {
                primary = Some(Repository::open(policy).await?);
            }
            let repo = primary.as_ref().expect("opened above");
            let d = drain_one(repo, r, state_dir, &policy.name, &keys).await;
            sent_any = true;
            if d.error.is_some() {
                failed.insert(r.name.clone());
            }
            match out.iter_mut().find(|o| o.replica == d.replica) {
                Some(o) => {
                    o.sent += d.sent;
                    o.left = d.left;
                    o.error = d.error;
                }
                None => out.push(d),
            }
        }
        if !sent_any {
            return Ok(Some(out));
        }
    }
}

async fn drain_one(primary: &Repository, r: &Replica, state_dir: &Path, policy: &str, keys: &[String]) -> Drained {
    let dir = spool_dir(state_dir, policy, &r.name);
    let mut d = Drained { replica: r.name.clone(), sent: 0, left: keys.len(), error: None };
    // In slices, so a long backlog shows progress. One entry that fails does not hold back
    // the others; a replica that cannot be opened stops the drain.
    for part in keys.chunks(64) {
        match crate::repository::replicate::copy_wal(primary, r, part).await {
            Ok(sent) => {
                for k in &sent.done {
                    let _ = std::fs::remove_file(dir.join(entry_name(k)));
                }
                d.sent += sent.copied;
                d.left -= sent.done.len();
                if let Some(e) = sent.error {
                    d.error.get_or_insert(e.message);
                }
            }
            Err(e) => {
                d.error = Some(e.message);
                break;
            }
        }
    }
    if let Some(e) = &d.error {
        tracing::warn!(replica = %r.name, left = d.left, "WAL not sent to the replica yet: {e}");
    }
    d
}

/// The hidden `wal-send`: drain, and while a replica fails, try again a few times with
/// growing pauses (a replica that is down for longer waits for the next push or the daemon).
pub async fn send(policy: &Policy, state_dir: &Path) -> Result<Vec<Drained>> {
    let mut last = Vec::new();
    for pause in [1u64, 4, 15, 0] {
        match drain(policy, state_dir).await? {
            None => return Ok(last),
            Some(d) => {
                let failed = d.iter().any(|d| d.error.is_some());
                last = d;
                if !failed || pause == 0 {
                    return Ok(last);
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(pause)).await;
    }
    Ok(last)
}

/// Start a detached sender unless one is already at work on this policy's spool.
pub fn spawn_sender(policy: &Policy, state_dir: &Path) {
    if sender_lock(state_dir, &policy.name).is_none() {
        return;
    }
    super::wal::spawn_detached(&[
        "--state-dir".as_ref(),
        state_dir.as_os_str(),
        "wal-send".as_ref(),
        policy.path.as_os_str(),
    ]);
}

/// Queued segments per replica, for metrics and `status`.
pub fn depths(policy: &Policy, state_dir: &Path) -> Vec<(String, usize)> {
    policy.replicas.iter().map(|r| (r.name.clone(), queued(state_dir, &policy.name, &r.name).len())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_name_only_wal_keys() {
        let k = "wal/7001234567890123456/00000001/000000010000000000000003/0123456789abcdef0123456789abcdef";
        assert_eq!(entry_key(&entry_name(k)).as_deref(), Some(k));
        for bad in ["..+..+config", "config", "data+ab+abcd", "wal+..+x", ".sender"] {
            assert_eq!(entry_key(bad), None, "{bad}");
        }
    }
}
