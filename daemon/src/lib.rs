//! veza-dr: backups of PostgreSQL and volumes to object storage, encrypted to public keys,
//! proven by restore drills. docs/ARCHITECTURE.md draws the data flow and says where each
//! piece lives; imports point down this list.

pub mod cli;
pub mod crypto;
pub mod daemon;
pub mod error;
pub mod fuzz;
pub mod jobs;
pub mod pipeline;
pub mod policy;
pub mod repository;
pub mod runbook;
pub mod secret;
pub mod source;

pub use error::{Error, Kind, Result};
