//! Leases in the repository: `locks/<id>.json`, shared (backup, restore, verify, drill) or
//! exclusive (prune).
//!
//! The protocol does not need conditional writes, so it holds on stores that ignore them
//! (Garage): write your own lease first, then list. Of two contenders at least one sees the
//! other (the later lister sees the earlier writer); on any conflict the newcomer withdraws.
//!
//! Time comes from the store, not from hosts: a lease is live while its object's
//! `last-modified` (the store's clock) plus its `ttl` is after the `last-modified` of the
//! lister's own lease, just written. Hosts with skewed clocks therefore agree on expiry. A
//! lease of a dead process on this host is stale at once, so a crash never needs a manual
//! unlock. A holder refreshes its lease (never re-creating one someone deleted) and checks it,
//! by listing again, before every commit write.

use super::keys;
use super::store::Store;
use crate::error::{Error, Result};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LockKind {
    Shared,
    Exclusive,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Lease {
    pub kind: LockKind,
    pub host: String,
    pub pid: u32,
    pub command: String,
    /// The writer's clock, for people; expiry uses the store's clock and `ttl-seconds`.
    pub created: DateTime<Utc>,
    pub expires: DateTime<Utc>,
    #[serde(default = "default_ttl_secs")]
    pub ttl_seconds: u64,
}

fn default_ttl_secs() -> u64 {
    300
}

/// A lease as listed: its content and when the store last wrote it.
struct Listed {
    key: String,
    lease: Lease,
    stored: DateTime<Utc>,
}

impl Listed {
    fn is_live(&self, store_now: DateTime<Utc>, me: &str) -> bool {
        let until = self.stored + chrono::Duration::seconds(self.lease.ttl_seconds as i64);
        if until <= store_now {
            return false;
        }
        // A lease from this host whose process is gone is stale (kill -9, crash).
        self.lease.host != me || std::path::Path::new(&format!("/proc/{}", self.lease.pid)).exists()
    }
}

/// A held lock; dropping it stops the refresh; `release` deletes it.
pub struct LockGuard {
    store: Store,
    key: String,
    kind: LockKind,
    valid: Arc<AtomicBool>,
    stop: tokio::sync::watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub fn ttl() -> Duration {
    std::env::var("VEZA_DR_LOCK_TTL")
        .ok()
        .and_then(|s| humantime::parse_duration(&s).ok())
        .unwrap_or(Duration::from_secs(300))
}

pub fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "unknown".into())
}

fn new_lease(kind: LockKind, me: &str, command: &str) -> Lease {
    let now = Utc::now();
    Lease {
        kind,
        host: me.to_string(),
        pid: std::process::id(),
        command: command.to_string(),
        created: now,
        expires: now + chrono::Duration::from_std(ttl()).expect("ttl fits"),
        ttl_seconds: ttl().as_secs().max(1),
    }
}

/// Take a lock, waiting up to `wait` for conflicting holders to finish.
pub async fn acquire(store: &Store, kind: LockKind, command: &str, wait: Duration) -> Result<LockGuard> {
    let me = hostname();
    let id = hex::encode(rand::random::<[u8; 8]>());
    let key = keys::lock(&id);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let lease = new_lease(kind, &me, command);
        store.put(&key, Bytes::from(serde_json::to_vec(&lease).expect("serialisable"))).await?;
        match conflict(store, &key, kind, &me, true).await {
            Ok(None) => {
                let valid = Arc::new(AtomicBool::new(true));
                let (stop, rx) = tokio::sync::watch::channel(false);
                let task = tokio::spawn(refresh(store.clone(), key.clone(), lease, valid.clone(), rx));
                return Ok(LockGuard { store: store.clone(), key, kind, valid, stop, task: Some(task) });
            }
            Ok(Some(other)) => {
                store.delete(&key).await?;
                if tokio::time::Instant::now() >= deadline {
                    return Err(locked_by(store, &other));
                }
                let jitter = Duration::from_millis(200 + rand::random::<u64>() % 800);
                tokio::time::sleep(jitter).await;
            }
            Err(e) => {
                let _ = store.delete(&key).await;
                return Err(e);
            }
        }
    }
}

fn locked_by(store: &Store, other: &Listed) -> Error {
    let l = &other.lease;
    Error::locked(format!(
        "repository {} is locked by `{}` on {} (pid {}, {} lock, written {}, for {}s)",
        store.url,
        l.command,
        l.host,
        l.pid,
        if l.kind == LockKind::Exclusive { "exclusive" } else { "shared" },
        other.stored.format("%Y-%m-%d %H:%M:%SZ"),
        l.ttl_seconds
    ))
    .with_hint("wait for it to finish (or for the lease to expire if it crashed); --lock-wait waits for you")
}

/// Every lease in the store, and the store's "now" (the newest `last-modified` of `mine`).
async fn list(store: &Store, mine: &str) -> Result<(Vec<Listed>, Option<DateTime<Utc>>)> {
    let mut out = Vec::new();
    let mut now = None;
    for (k, _, stored) in store.list_meta(keys::LOCKS).await? {
        if k == mine {
            now = Some(stored);
            continue;
        }
        // A lease that does not parse is read again first (a short answer must not make a live
        // lease look absent); a removed one is skipped.
        let parse = |b: Bytes| {
            serde_json::from_slice::<Lease>(&b)
                .map_err(|e| Error::damaged(format!("lock object {k} is unreadable: {e}")))
        };
        match store.get_checked(&k, parse).await {
            Ok(lease) => out.push(Listed { key: k, lease, stored }),
            Err(e) if e.kind == crate::error::Kind::NotFound => {}
            Err(e) if e.kind == crate::error::Kind::Damaged => {
                tracing::warn!(lock = %k, "ignoring unreadable lock object")
            }
            Err(e) => return Err(e),
        }
    }
    Ok((out, now))
}

/// A live lease that conflicts with holding `kind` (removing stale ones when `clean`).
async fn conflict(store: &Store, mine: &str, kind: LockKind, me: &str, clean: bool) -> Result<Option<Listed>> {
    let (leases, now) = list(store, mine).await?;
    // Without our own lease in the listing the store's time is unknown: the newest lease
    // stands in (conservative: nothing looks older than it is).
    let now = now.or_else(|| leases.iter().map(|l| l.stored).max()).unwrap_or_else(Utc::now);
    for other in leases {
        if !other.is_live(now, me) {
            if clean {
                tracing::info!(lock = %other.key, holder = %other.lease.host, pid = other.lease.pid, "removing stale lock");
                store.delete(&other.key).await?;
            }
            continue;
        }
        if kind == LockKind::Exclusive || other.lease.kind == LockKind::Exclusive {
            return Ok(Some(other));
        }
    }
    Ok(None)
}

async fn refresh(
    store: Store,
    key: String,
    lease: Lease,
    valid: Arc<AtomicBool>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let period = ttl() / 3;
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.changed() => return,
        }
        // A lease someone deleted (a prune that judged it stale) is lost, never re-created:
        // whoever deleted it may be acting on that.
        match store.head_size(&key).await {
            Ok(None) => {
                tracing::warn!(lock = %key, "the repository lock was removed by someone else");
                valid.store(false, Ordering::SeqCst);
                return;
            }
            Ok(Some(_)) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot refresh repository lock");
                if last_ok.elapsed() >= ttl() {
                    valid.store(false, Ordering::SeqCst);
                }
                continue;
            }
        }
        let body =
            Bytes::from(serde_json::to_vec(&new_lease(lease.kind, &lease.host, &lease.command)).expect("serialisable"));
        match store.put(&key, body).await {
            Ok(()) => last_ok = tokio::time::Instant::now(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot refresh repository lock");
                if last_ok.elapsed() >= ttl() {
                    valid.store(false, Ordering::SeqCst);
                }
            }
        }
    }
}

impl LockGuard {
    /// Before a commit write: the lease was kept (refreshed, not removed), it is still in the
    /// store, and no conflicting live lease appeared (listing again, not a local flag).
    pub async fn check(&self) -> Result<()> {
        let lost = || {
            Error::locked(format!("lost the repository lock {}", self.key))
                .with_hint("another process removed it or the store was unreachable for longer than the lease; nothing was committed, run the command again")
        };
        if !self.valid.load(Ordering::SeqCst) || self.store.head_size(&self.key).await?.is_none() {
            return Err(lost());
        }
        if let Some(other) = conflict(&self.store, &self.key, self.kind, &hostname(), false).await? {
            return Err(locked_by(&self.store, &other).context("lost the repository lock"));
        }
        Ok(())
    }

    pub async fn release(mut self) -> Result<()> {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        self.store.delete(&self.key).await
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
