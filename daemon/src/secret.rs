//! References to secrets (`env:NAME`, `file:/path`): policies hold these, never the values.
//!
//! The value is read only when needed and is never formatted: `Debug` and `Display` show the
//! reference, so a secret cannot reach a log line or an error message by accident.

use crate::error::{Error, Result};
use serde::{Deserialize, Deserializer};
use std::fmt;

#[derive(Clone, PartialEq, Eq)]
pub enum SecretRef {
    Env(String),
    File(std::path::PathBuf),
}

impl SecretRef {
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(name) = s.strip_prefix("env:") {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("`env:{name}` is not a valid environment variable name"));
            }
            Ok(SecretRef::Env(name.to_string()))
        } else if let Some(path) = s.strip_prefix("file:") {
            if !path.starts_with('/') {
                return Err(format!("`file:{path}` must be an absolute path"));
            }
            Ok(SecretRef::File(path.into()))
        } else {
            Err("secrets must be references, `env:NAME` or `file:/path`, never literal values".into())
        }
    }

    /// Read the secret. The error names the reference, never the value.
    pub fn resolve(&self) -> Result<String> {
        match self {
            SecretRef::Env(name) => std::env::var(name).map_err(|_| {
                Error::policy(format!("secret env:{name} is not set"))
                    .with_hint(format!("export {name} in the environment of veza-dr"))
            }),
            SecretRef::File(path) => std::fs::read_to_string(path)
                .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
                .map_err(|e| Error::io("read secret", path, e)),
        }
    }
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Env(n) => write!(f, "env:{n}"),
            SecretRef::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

impl fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl<'de> Deserialize<'de> for SecretRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SecretRef::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_values_are_refused_and_references_print_as_references() {
        assert!(SecretRef::parse("hunter2").is_err());
        assert!(SecretRef::parse("file:relative").is_err());
        let r = SecretRef::parse("env:PG_PASS").unwrap();
        assert_eq!(format!("{r:?}"), "env:PG_PASS");
        std::env::set_var("VEZA_TEST_SECRET_X", "s3cr3t");
        let r = SecretRef::parse("env:VEZA_TEST_SECRET_X").unwrap();
        assert_eq!(r.resolve().unwrap(), "s3cr3t");
        assert!(!format!("{r} {r:?}").contains("s3cr3t"));
    }
}
