//! The ed25519 key that signs this host's drill reports: created on first use in the state
//! directory (0600), written as `ed25519:<hex>` wherever a public key is shown or trusted.
//! A signature proves who signed only against a key the reader already trusts: `verify`
//! takes the trusted keys, never the key the signed document carries.

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

/// A trusted public key, `ed25519:<64 hex digits>` (bare hex is read too).
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn parse(s: &str) -> Option<PublicKey> {
        let h = s.trim().strip_prefix("ed25519:").unwrap_or(s.trim());
        let b: [u8; 32] = hex::decode(h).ok()?.try_into().ok()?;
        ed25519_dalek::VerifyingKey::from_bytes(&b).ok()?;
        Some(PublicKey(b))
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ed25519:{}", hex::encode(self.0))
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PublicKey::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!("`{s}` is not an ed25519 public key (`ed25519:` and 64 hex digits)"))
        })
    }
}

/// This host's report-signing public key, if it has one (never created here).
pub fn host_public(state_dir: &Path) -> Option<PublicKey> {
    let text = std::fs::read_to_string(state_dir.join("signing.key")).ok()?;
    let b: [u8; 32] = hex::decode(text.trim()).ok()?.try_into().ok()?;
    Some(PublicKey(SigningKey::from_bytes(&b).verifying_key().to_bytes()))
}

/// This host's signing key, creating it on first use. Two processes creating it at once end
/// up with one key: it is written to a temporary file and linked into place, and the loser
/// of the link reads the winner's.
pub fn host_key(state_dir: &Path) -> Result<SigningKey> {
    let path = state_dir.join("signing.key");
    let read = || -> Option<Result<SigningKey>> {
        let hexkey = std::fs::read_to_string(&path).ok()?;
        Some(match hex::decode(hexkey.trim()).ok().and_then(|v| <[u8; 32]>::try_from(v).ok()) {
            Some(b) => Ok(SigningKey::from_bytes(&b)),
            None => Err(Error::crypto(format!("signing key {} is malformed", path.display()))
                .with_hint("move it away: a new key is created on next use (trust the new key where the old was)")),
        })
    };
    if let Some(k) = read() {
        return k;
    }
    std::fs::create_dir_all(state_dir).map_err(|e| Error::io("create state directory", state_dir, e))?;
    let key = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let tmp = state_dir.join(format!(".signing.key.{}.{}", std::process::id(), rand::random::<u32>()));
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(hex::encode(key.to_bytes()).as_bytes()).and_then(|_| f.sync_all()));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io("create signing key", &path, e));
    }
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(key),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            read().unwrap_or_else(|| Err(Error::io("read", &path, e)))
        }
        Err(e) => Err(Error::io("create signing key", &path, e)),
    }
}

/// The public half as the text policies and reports use: `ed25519:<hex>`.
pub fn public_text(key: &SigningKey) -> String {
    PublicKey(key.verifying_key().to_bytes()).to_string()
}

pub fn sign(key: &SigningKey, bytes: &[u8]) -> Signature {
    Signature {
        algorithm: "ed25519".into(),
        public_key: public_text(key),
        value: hex::encode(key.sign(bytes).to_bytes()),
    }
}

/// Check `sig` over `bytes` and that its key is one of `trusted`; returns the signer's key.
/// A valid signature by a key nobody trusts is refused, naming the key found.
pub fn verify(bytes: &[u8], sig: &Signature, trusted: &[PublicKey]) -> Result<PublicKey> {
    let pk =
        PublicKey::parse(&sig.public_key).ok_or_else(|| Error::damaged("malformed public key in the signature"))?;
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&pk.0)
        .map_err(|e| Error::damaged(format!("malformed public key: {e}")))?;
    let sb: [u8; 64] = hex::decode(&sig.value)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| Error::damaged("malformed signature"))?;
    vk.verify_strict(bytes, &ed25519_dalek::Signature::from_bytes(&sb))
        .map_err(|_| Error::damaged("the signature does not match the content: it was altered after signing"))?;
    if !trusted.contains(&pk) {
        return Err(Error::damaged(format!("signed by {pk}, which is not a trusted signer"))
            .with_hint("trust it by adding it to [trust] report-signers of the report's policy (`veza-dr keygen --signing` on the signing host prints its key)"));
    }
    Ok(pk)
}
