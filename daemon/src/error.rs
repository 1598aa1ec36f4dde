//! The one error type of the library.
//!
//! Rules (pgBackRest / rustic style):
//! - messages are lowercase, one line, no final period, and name the object (policy, file, key);
//! - a `hint` says what the operator can do about it;
//! - the `kind` decides the process exit code: 2 bad usage or policy, 3 damage found, 1 otherwise;
//! - the foreign error that caused it is kept as `source()`, and classification (kind, hint)
//!   comes from that error's type (object_store variants, SQLSTATEs, io kinds), never from text;
//! - errors are `Clone`, so a drill can put the same error in its report and return it;
//! - secrets never appear in a message: callers pass references (`env:NAME`), never values.

use std::fmt;
use std::sync::Arc;

/// What class of failure this is; decides the exit code and whether a retry may help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The command line was wrong.
    Usage,
    /// A policy file failed to parse or validate.
    Policy,
    /// A thing the user named (snapshot, policy, file, repository) does not exist.
    NotFound,
    /// The repository holds damaged or missing data.
    Damaged,
    /// A key or identity problem: wrong key, no identity, bad recipient.
    Crypto,
    /// The object store failed (network, credentials, server error).
    Storage,
    /// A local filesystem operation failed.
    Io,
    /// The repository (or the local state) is locked by another process.
    Locked,
    /// PostgreSQL refused or failed.
    Database,
    /// Anything else.
    Failed,
}

impl Kind {
    pub fn exit_code(self) -> i32 {
        match self {
            Kind::Usage | Kind::Policy => 2,
            Kind::Damaged => 3,
            _ => 1,
        }
    }

    /// Whether trying again later can help (the daemon retries these).
    pub fn is_transient(self) -> bool {
        matches!(self, Kind::Storage | Kind::Locked)
    }
}

type Cause = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// A failure with a one-line message, an optional hint and the error that caused it.
#[derive(Debug, Clone)]
pub struct Error {
    pub kind: Kind,
    pub message: String,
    pub hint: Option<String>,
    cause: Option<Cause>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        let message: String = message.into();
        // Keep the promise of one line even when a source error spans several.
        let message = message.replace('\n', " ");
        Error { kind, message, hint: None, cause: None }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Keep the error that caused this one (reachable through `source()`).
    pub fn with_cause(mut self, cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.cause = Some(Arc::new(cause));
        self
    }

    pub fn usage(m: impl Into<String>) -> Self {
        Self::new(Kind::Usage, m)
    }
    pub fn policy(m: impl Into<String>) -> Self {
        Self::new(Kind::Policy, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(Kind::NotFound, m)
    }
    pub fn damaged(m: impl Into<String>) -> Self {
        Self::new(Kind::Damaged, m)
    }
    pub fn crypto(m: impl Into<String>) -> Self {
        Self::new(Kind::Crypto, m)
    }
    pub fn storage(m: impl Into<String>) -> Self {
        Self::new(Kind::Storage, m)
    }
    pub fn locked(m: impl Into<String>) -> Self {
        Self::new(Kind::Locked, m)
    }
    pub fn database(m: impl Into<String>) -> Self {
        Self::new(Kind::Database, m)
    }
    pub fn failed(m: impl Into<String>) -> Self {
        Self::new(Kind::Failed, m)
    }

    /// A local I/O failure on `path`, with a hint for the common causes.
    pub fn io(what: &str, path: &std::path::Path, e: std::io::Error) -> Self {
        let hint = match e.kind() {
            std::io::ErrorKind::PermissionDenied => {
                Some("check the ownership and mode of the path, or run as a user that can access it")
            }
            std::io::ErrorKind::NotFound => Some("check that the path exists"),
            std::io::ErrorKind::StorageFull => Some("the disk is full: free space on the target or restore elsewhere"),
            _ => None,
        };
        let err = Self::new(Kind::Io, format!("cannot {what} {}: {e}", path.display()));
        let err = match hint {
            Some(h) => err.with_hint(h),
            None => err,
        };
        err.with_cause(e)
    }

    /// Prefix the message with context, keeping kind, hint and cause.
    pub fn context(mut self, ctx: impl fmt::Display) -> Self {
        self.message = format!("{ctx}: {}", self.message);
        self
    }

    /// The first error of type `E` in the cause chain.
    pub fn find_cause<E: std::error::Error + 'static>(&self) -> Option<&E> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = self.cause.as_deref().map(|c| c as _);
        while let Some(e) = cur {
            if let Some(hit) = e.downcast_ref::<E>() {
                return Some(hit);
            }
            cur = e.source();
        }
        None
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause.as_deref().map(|c| c as _)
    }
}

/// Attach context to results of foreign errors in one call, keeping them as the cause.
pub trait ResultExt<T> {
    fn or_kind(self, kind: Kind, ctx: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> ResultExt<T> for std::result::Result<T, E> {
    fn or_kind(self, kind: Kind, ctx: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::new(kind, format!("{}: {e}", ctx())).with_cause(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_their_cause_through_clones() {
        let io = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied");
        let e = Error::io("read", std::path::Path::new("/x"), io);
        let c = e.clone();
        assert_eq!(c.kind, Kind::Io);
        assert!(c.hint.as_deref().unwrap().contains("ownership"));
        let inner = c.find_cause::<std::io::Error>().expect("cause kept");
        assert_eq!(inner.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(std::error::Error::source(&c).is_some());
    }
}
