//! The restore job: open the repository (never create it), unlock it with the identity, and
//! let the policy's source restore what the request names.

use crate::crypto::Identity;
use crate::error::Result;
use crate::policy::Policy;
use crate::repository::Repository;
pub use crate::source::{RestoreProgress, RestoreRequest, Restored};

pub async fn run(policy: &Policy, identity: Identity, req: &RestoreRequest) -> Result<Restored> {
    let repo = Repository::open(policy).await?.unlock(identity);
    crate::source::of(policy).restore(&repo, req).await
}
