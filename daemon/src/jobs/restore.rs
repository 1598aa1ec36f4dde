//! The restore job: open the repository (never create it), take a shared lease, unlock it
//! with the identity, and let the policy's source restore what the request names.

use crate::crypto::Identity;
use crate::error::Result;
use crate::policy::Policy;
use crate::repository::lock::LockKind;
use crate::repository::Repository;
pub use crate::source::{RestoreProgress, RestoreRequest, Restored};

/// Restore under a shared lease: prune waits for it, so nothing the restore reads goes away.
pub async fn run(
    policy: &Policy,
    identity: Identity,
    req: &RestoreRequest,
    lock_wait: std::time::Duration,
) -> Result<Restored> {
    let repo = Repository::open(policy).await?;
    let guard = repo.lock(LockKind::Shared, &format!("restore {}", policy.name), lock_wait).await?;
    let repo_u = repo.unlock(identity).trusting(&policy.trust.writers);
    let r = crate::source::of(policy).restore(&repo_u, req).await;
    if let Err(e) = guard.release().await {
        tracing::warn!(error = %e, "could not remove the lock object; it will expire");
    }
    r
}
