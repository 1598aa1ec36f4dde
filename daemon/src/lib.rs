//! veza-dr: backups of PostgreSQL and volumes to object storage, encrypted to public keys,
//! proven by restore drills.
//!
//! Data flow: policy → source → pipeline → repository; repository → restore / verify / prune.

pub mod backup;
pub mod cli;
pub mod crypto;
pub mod daemon;
pub mod drill;
pub mod error;
pub mod pgrestore;
pub mod pipeline;
pub mod policy;
pub mod prune;
pub mod repository;
pub mod restore;
pub mod retention;
pub mod runbook;
pub mod secret;
pub mod source;
pub mod verify;
pub mod wal;

pub use error::{Error, Kind, Result};
