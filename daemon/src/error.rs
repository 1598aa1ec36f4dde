//! The one error type of the library.
//!
//! Rules (pgBackRest / rustic style):
//! - messages are lowercase, one line, no final period, and name the object (policy, file, key);
//! - a `hint` says what the operator can do about it;
//! - the `kind` decides the process exit code: 2 bad usage or policy, 3 damage found, 1 otherwise;
//! - secrets never appear in a message: callers pass references (`env:NAME`), never values.

use std::fmt;

/// What class of failure this is; decides the exit code and whether a retry may help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The command line was wrong.
    Usage,
    /// A policy file failed to parse or validate.
    Policy,
    /// A thing the user named (snapshot, policy, file) does not exist.
    NotFound,
    /// The repository holds damaged or missing data.
    Damaged,
    /// A key or identity problem: wrong key, no identity, bad recipient.
    Crypto,
    /// The object store failed (network, credentials, server error).
    Storage,
    /// A local filesystem operation failed.
    Io,
    /// The repository is locked by another process.
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

/// A failure with a one-line message and an optional hint.
#[derive(Debug)]
pub struct Error {
    pub kind: Kind,
    pub message: String,
    pub hint: Option<String>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        let message: String = message.into();
        // Keep the promise of one line even when a source error spans several.
        let message = message.replace('\n', " ");
        Error { kind, message, hint: None }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
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
            _ if e.raw_os_error() == Some(28) => {
                Some("the disk is full: free space on the target or restore elsewhere")
            }
            _ => None,
        };
        let err = Self::new(Kind::Io, format!("cannot {what} {}: {e}", path.display()));
        match hint {
            Some(h) => err.with_hint(h),
            None => err,
        }
    }

    /// Prefix the message with context, keeping kind and hint.
    pub fn context(mut self, ctx: impl fmt::Display) -> Self {
        self.message = format!("{ctx}: {}", self.message);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// Attach context to results of foreign errors in one call.
pub trait ResultExt<T> {
    fn or_kind(self, kind: Kind, ctx: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: fmt::Display> ResultExt<T> for std::result::Result<T, E> {
    fn or_kind(self, kind: Kind, ctx: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::new(kind, format!("{}: {e}", ctx())))
    }
}
