//! The backup job: open (or create) the repository, take a shared lease, let the source make
//! and commit its snapshot, release.

use crate::crypto::Sealer;
use crate::error::Result;
use crate::policy::Policy;
use crate::repository::format::Sidecar;
use crate::repository::lock::LockKind;
use crate::repository::Repository;

pub use crate::pipeline::snapshot::{Mode, Options};

/// Back up the policy's source and return the committed snapshot's sidecar.
pub async fn run(policy: &Policy, opts: &Options) -> Result<Sidecar> {
    let (repo, _) = Repository::open_or_init(policy).await?;
    let key = crate::crypto::signing::host_key(&opts.state_dir)?;
    let writer = repo.writer(Sealer::new(&policy.encryption.recipients)).signing(key);
    let guard = repo.lock(LockKind::Shared, &format!("backup {}", policy.name), opts.lock_wait).await?;
    let r = crate::source::of(policy).backup(&writer, opts, &guard).await;
    let released = guard.release().await;
    let sidecar = r?;
    if let Err(e) = released {
        tracing::warn!(error = %e, "could not remove the lock object; it will expire");
    }
    Ok(sidecar)
}

/// `veza-dr init`: create the policy's repository. Returns (repository url, id, created).
pub async fn init(policy: &Policy) -> Result<(String, String, bool)> {
    let (repo, created) = Repository::open_or_init(policy).await?;
    Ok((repo.url().to_string(), repo.id().to_string(), created))
}
