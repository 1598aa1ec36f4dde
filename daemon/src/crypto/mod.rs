//! Keys and what is done with them: recipients that backups are sealed to, the restore-side
//! identity that opens them, and the ed25519 key that signs this host's drill reports.
//!
//! The backup host holds only recipients; an identity is loaded only by restore-side commands.

pub mod blob;
pub mod identity;
pub mod recipient;
pub mod seal;
pub mod signing;

pub use blob::BlobSealer;
pub use identity::Identity;
pub use recipient::Recipient;
pub use seal::Sealer;
