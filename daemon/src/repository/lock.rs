//! Leases in the repository: `locks/<id>.json`, shared (backup) or exclusive (prune).
//!
//! The protocol does not need conditional writes, so it holds on stores that ignore them
//! (Garage): write your own lease first, then list. Of two contenders at least one sees the
//! other (the later lister sees the earlier writer); on any conflict the newcomer withdraws.
//! Leases expire, and a lease of a dead process on this host is stale at once, so a crash never
//! needs a manual unlock. A holder refreshes its lease and checks it before committing.

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
    pub created: DateTime<Utc>,
    pub expires: DateTime<Utc>,
}

impl Lease {
    fn is_live(&self, now: DateTime<Utc>, me: &str) -> bool {
        if self.expires <= now {
            return false;
        }
        // A lease from this host whose process is gone is stale (kill -9, crash).
        self.host != me || std::path::Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

/// A held lock; dropping it stops the refresh; `release` deletes it.
pub struct LockGuard {
    store: Store,
    key: String,
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

/// Take a lock, waiting up to `wait` for conflicting holders to finish.
pub async fn acquire(store: &Store, kind: LockKind, command: &str, wait: Duration) -> Result<LockGuard> {
    let me = hostname();
    let id = hex::encode(rand::random::<[u8; 8]>());
    let key = keys::lock(&id);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let now = Utc::now();
        let lease = Lease {
            kind,
            host: me.clone(),
            pid: std::process::id(),
            command: command.to_string(),
            created: now,
            expires: now + chrono::Duration::from_std(ttl()).expect("ttl fits"),
        };
        store.put(&key, Bytes::from(serde_json::to_vec(&lease).expect("serialisable"))).await?;
        match conflict(store, &key, kind, &me).await {
            Ok(None) => {
                let valid = Arc::new(AtomicBool::new(true));
                let (stop, rx) = tokio::sync::watch::channel(false);
                let task = tokio::spawn(refresh(store.clone(), key.clone(), lease, valid.clone(), rx));
                return Ok(LockGuard { store: store.clone(), key, valid, stop, task: Some(task) });
            }
            Ok(Some(other)) => {
                store.delete(&key).await?;
                if tokio::time::Instant::now() >= deadline {
                    return Err(Error::locked(format!(
                        "repository {} is locked by `{}` on {} (pid {}, {} lock, lease until {})",
                        store.url,
                        other.command,
                        other.host,
                        other.pid,
                        if other.kind == LockKind::Exclusive { "exclusive" } else { "shared" },
                        other.expires.format("%Y-%m-%d %H:%M:%SZ")
                    ))
                    .with_hint(
                        "wait for it to finish (or for the lease to expire if it crashed); --lock-wait waits for you",
                    ));
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

async fn conflict(store: &Store, mine: &str, kind: LockKind, me: &str) -> Result<Option<Lease>> {
    let now = Utc::now();
    for (k, _) in store.list(keys::LOCKS).await? {
        if k == mine {
            continue;
        }
        let Some(b) = store.get_opt(&k).await? else {
            continue;
        };
        let Ok(other) = serde_json::from_slice::<Lease>(&b) else {
            tracing::warn!(lock = %k, "ignoring unreadable lock object");
            continue;
        };
        if !other.is_live(now, me) {
            tracing::info!(lock = %k, holder = %other.host, pid = other.pid, "removing stale lock");
            store.delete(&k).await?;
            continue;
        }
        if kind == LockKind::Exclusive || other.kind == LockKind::Exclusive {
            return Ok(Some(other));
        }
    }
    Ok(None)
}

async fn refresh(
    store: Store,
    key: String,
    mut lease: Lease,
    valid: Arc<AtomicBool>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let period = ttl() / 3;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.changed() => return,
        }
        let now = Utc::now();
        let new_expiry = now + chrono::Duration::from_std(ttl()).expect("ttl fits");
        let body =
            Bytes::from(serde_json::to_vec(&Lease { expires: new_expiry, ..lease.clone() }).expect("serialisable"));
        match store.put(&key, body).await {
            Ok(()) => lease.expires = new_expiry,
            Err(e) => {
                tracing::warn!(error = %e, "cannot refresh repository lock");
                if Utc::now() >= lease.expires {
                    valid.store(false, Ordering::SeqCst);
                }
            }
        }
    }
}

impl LockGuard {
    /// Fails if the lease could not be kept (another process may have taken over).
    pub fn check(&self) -> Result<()> {
        if self.valid.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(Error::locked(format!("lost the repository lock {} (refresh failed until it expired)", self.key))
                .with_hint("the object store was unreachable for longer than the lease; run the command again"))
        }
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
