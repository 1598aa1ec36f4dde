//! The ed25519 key that signs this host's drill reports: created on first use in the state
//! directory (0600), written as `ed25519:<hex>` wherever a public key is shown or trusted.

use crate::error::{Error, Result};
use ed25519_dalek::{Signer, SigningKey};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A detached signature as stored in a report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Signature {
    pub algorithm: String,
    pub public_key: String,
    pub value: String,
}

/// This host's report-signing key, creating it on first use.
pub fn host_key(state_dir: &Path) -> Result<SigningKey> {
    let path = state_dir.join("signing.key");
    if let Ok(hexkey) = std::fs::read_to_string(&path) {
        if let Some(b) = hex::decode(hexkey.trim()).ok().and_then(|v| <[u8; 32]>::try_from(v).ok()) {
            return Ok(SigningKey::from_bytes(&b));
        }
        return Err(Error::crypto(format!("signing key {} is malformed", path.display()))
            .with_hint("move it away: a new key is created on the next drill (trust the new key where the old was)"));
    }
    std::fs::create_dir_all(state_dir).map_err(|e| Error::io("create state directory", state_dir, e))?;
    let key = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::io("create signing key", &path, e))?;
    f.write_all(hex::encode(key.to_bytes()).as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io("write", &path, e))?;
    Ok(key)
}

/// The public half as the text policies and reports use.
pub fn public_text(key: &SigningKey) -> String {
    hex::encode(key.verifying_key().to_bytes())
}

pub fn sign(key: &SigningKey, bytes: &[u8]) -> Signature {
    Signature {
        algorithm: "ed25519".into(),
        public_key: public_text(key),
        value: hex::encode(key.sign(bytes).to_bytes()),
    }
}

/// Check `sig` over `bytes`; returns the signer's public key text.
pub fn verify(bytes: &[u8], sig: &Signature) -> Result<String> {
    let pk: [u8; 32] = hex::decode(&sig.public_key)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| Error::damaged("malformed public key in the signature"))?;
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&pk)
        .map_err(|e| Error::damaged(format!("malformed public key: {e}")))?;
    let sb: [u8; 64] = hex::decode(&sig.value)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| Error::damaged("malformed signature"))?;
    vk.verify_strict(bytes, &ed25519_dalek::Signature::from_bytes(&sb))
        .map_err(|_| Error::damaged("the signature does not match the content: it was altered after signing"))?;
    Ok(sig.public_key.clone())
}
