//! Jobs: what a command or the daemon asks for, from a policy to a result. A job opens the
//! repository with the handle it needs (read, write, unlocked), takes the lease, and hands the
//! kind-specific work to the policy's [`crate::source::Source`].

pub mod backup;
pub mod check;
pub mod drill;
pub mod prune;
pub mod restore;
pub mod retention;
pub mod status;
pub mod verify;
pub mod wal;
pub mod walahead;
pub mod walcheck;
pub mod walsend;
pub mod waltail;
