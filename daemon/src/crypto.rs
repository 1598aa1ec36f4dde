//! age encryption to public recipients, decryption with an identity file, and key generation.
//!
//! The backup host holds only recipients; identities are read only by restore-side commands.

use crate::error::{Error, Result};
use crate::policy::Recipient;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

/// The recipients every blob is encrypted to.
#[derive(Clone)]
pub struct Sealer {
    recipients: Arc<Vec<Box<dyn age::Recipient + Send + Sync>>>,
}

impl Sealer {
    pub fn new(recipients: &[Recipient]) -> Self {
        Sealer { recipients: Arc::new(recipients.iter().map(|r| r.to_age()).collect()) }
    }

    pub fn seal(&self, plain: &[u8]) -> Result<Vec<u8>> {
        let enc = age::Encryptor::with_recipients(self.recipients.iter().map(|r| r.as_ref() as &dyn age::Recipient))
            .map_err(|e| Error::crypto(format!("cannot encrypt: {e}")))?;
        let mut out = Vec::with_capacity(plain.len() + 256);
        let mut w = enc.wrap_output(&mut out).map_err(|e| Error::crypto(format!("cannot encrypt: {e}")))?;
        w.write_all(plain).and_then(|_| w.finish()).map_err(|e| Error::crypto(format!("cannot encrypt: {e}")))?;
        Ok(out)
    }
}

/// Private identities that can open blobs.
#[derive(Clone)]
pub struct Opener {
    identities: Arc<Vec<Box<dyn age::Identity + Send + Sync>>>,
    pub source: String,
}

impl Opener {
    /// Load an age identity file (as written by `veza-dr keygen` or `age-keygen`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::io("read identity", path, e)
                .with_hint("pass the private key written by `veza-dr keygen` with --identity FILE")
        })?;
        let mut ids: Vec<Box<dyn age::Identity + Send + Sync>> = Vec::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let id: age::x25519::Identity = line.parse().map_err(|_| {
                Error::crypto(format!("identity file {} holds a line that is not an age identity", path.display()))
                    .with_hint("an identity line starts with AGE-SECRET-KEY-1")
            })?;
            ids.push(Box::new(id));
        }
        if ids.is_empty() {
            return Err(Error::crypto(format!("identity file {} holds no identity", path.display())));
        }
        Ok(Opener { identities: Arc::new(ids), source: path.display().to_string() })
    }

    pub fn from_identity(id: age::x25519::Identity) -> Self {
        Opener { identities: Arc::new(vec![Box::new(id)]), source: "memory".into() }
    }

    /// Decrypt one blob; `what` names it in the error.
    pub fn open(&self, sealed: &[u8], what: &dyn std::fmt::Display) -> Result<Vec<u8>> {
        let dec = age::Decryptor::new_buffered(sealed)
            .map_err(|e| Error::damaged(format!("{what} is not a valid encrypted object: {e}")))?;
        let mut r =
            dec.decrypt(self.identities.iter().map(|i| i.as_ref() as &dyn age::Identity)).map_err(|e| match e {
                age::DecryptError::NoMatchingKeys => {
                    Error::crypto(format!("identity {} cannot decrypt {what}", self.source))
                        .with_hint("this repository was encrypted to other recipients: pass the matching --identity")
                }
                e => Error::damaged(format!("{what} cannot be decrypted: {e}")),
            })?;
        // The plaintext is shorter than the ciphertext: one allocation, no regrowth.
        let mut out = Vec::with_capacity(sealed.len());
        r.read_to_end(&mut out)
            .map_err(|e| Error::damaged(format!("{what} is corrupted (authentication failed: {e})")))?;
        Ok(out)
    }
}

/// A new identity: returns (identity file text, public recipient).
pub fn generate_identity() -> (String, String) {
    use age::secrecy::ExposeSecret;
    let id = age::x25519::Identity::generate();
    let public = id.to_public().to_string();
    let text = format!(
        "# created: {}\n# public key: {public}\n{}\n",
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        id.to_string().expose_secret()
    );
    (text, public)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_to_recipient_and_only_the_identity_opens() {
        let id = age::x25519::Identity::generate();
        let r: Recipient = id.to_public().to_string().parse().unwrap();
        let sealed = Sealer::new(&[r]).seal(b"hello").unwrap();
        assert_eq!(Opener::from_identity(id).open(&sealed, &"x").unwrap(), b"hello");
        let other = Opener::from_identity(age::x25519::Identity::generate());
        let err = other.open(&sealed, &"blob").unwrap_err();
        assert_eq!(err.kind, crate::error::Kind::Crypto);
        let mut bad = sealed.clone();
        let n = bad.len() - 3;
        bad[n] ^= 1;
        let err = Opener::from_identity(age::x25519::Identity::generate()).open(&bad, &"blob");
        assert!(err.is_err());
    }
}
