//! The restore-side identity: the one place that finds it (`--identity`, `VEZA_DR_IDENTITY`,
//! the policy's `identity = "file:…"|"env:…"`), parses it (age X25519 identities and
//! unencrypted SSH keys, so an `ssh-ed25519`/`ssh-rsa` recipient can be restored), and opens
//! sealed objects with it. Restore, drill, the daemon and restore_command all use this type.

use crate::error::{Error, Result};
use crate::policy::Encryption;
use crate::secret::SecretRef;
use age::secrecy::{ExposeSecret, SecretBox, SecretString};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Whether a restore-side identity is named for `enc` on this host: the policy's `identity`
/// or `VEZA_DR_IDENTITY`. The daemon drills such policies (and verifies the others keylessly).
pub fn is_named(enc: &Encryption) -> bool {
    enc.identity.is_some() || std::env::var_os("VEZA_DR_IDENTITY").is_some_and(|p| !p.is_empty())
}

/// Private keys that can open sealed objects, and where they came from (for messages).
#[derive(Clone)]
pub struct Identity {
    keys: Arc<Vec<Box<dyn age::Identity + Send + Sync>>>,
    /// The identity file's text, to hand a private copy to a restored server's restore_command.
    text: Arc<SecretString>,
    /// `file:/path`, `env:NAME` or `memory`: never the key.
    pub source: String,
    /// Blob keys already opened, by the BLAKE3 of their envelope: one key agreement per
    /// envelope, not per blob. Shared by the clones one restore hands its threads.
    blob_keys: Arc<Mutex<HashMap<[u8; 32], BlobKey>>>,
}

/// A blob key opened from its envelope; zeroed when the last clone drops.
type BlobKey = Arc<SecretBox<[u8; 32]>>;

/// Blob keys kept at most: a restore meets a few per pack it reads, so this spans hundreds of
/// packs; past it the cache starts again rather than grow.
const BLOB_KEYS_KEPT: usize = 4096;

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", self.source)
    }
}

impl Identity {
    /// Resolve the identity of a restore-side command: the flag, else `VEZA_DR_IDENTITY` (a
    /// path), else the policy's `identity`. `Ok(None)` when none is named anywhere.
    pub fn find(flag: Option<&Path>, enc: &Encryption) -> Result<Option<Identity>> {
        if let Some(f) = flag {
            return Identity::from_file(f).map(Some);
        }
        if let Some(p) = std::env::var_os("VEZA_DR_IDENTITY").filter(|p| !p.is_empty()) {
            return Identity::from_file(Path::new(&p)).map(Some);
        }
        match &enc.identity {
            Some(SecretRef::File(f)) => Identity::from_file(f).map(Some),
            Some(r @ SecretRef::Env(_)) => Identity::parse(&r.resolve()?, &r.to_string()).map(Some),
            None => Ok(None),
        }
    }

    /// As [`Identity::find`], but an identity is required: `policy` names it in the error.
    pub fn require(flag: Option<&Path>, enc: &Encryption, policy: &str) -> Result<Identity> {
        Identity::find(flag, enc)?.ok_or_else(|| {
            Error::crypto(format!("policy {policy} needs a private identity to read its backups")).with_hint(
                "pass --identity FILE (the key from `veza-dr keygen`), set VEZA_DR_IDENTITY, or set `identity` in [encryption]",
            )
        })
    }

    /// Load an identity file (as written by `veza-dr keygen`, `age-keygen` or `ssh-keygen`).
    /// A key only a holder of this identity can derive, for `context` over `salt`: it MACs host
    /// state that a backup host, which holds no identity, must not be able to forge.
    pub fn derive_key(&self, context: &str, salt: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key(context);
        h.update(self.text.expose_secret().trim().as_bytes());
        h.update(salt);
        *h.finalize().as_bytes()
    }

    pub fn from_file(path: &Path) -> Result<Identity> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::io("read identity", path, e)
                .with_hint("pass the private key written by `veza-dr keygen` with --identity FILE")
        })?;
        Identity::parse(&text, &format!("file:{}", path.display()))
    }

    /// Parse identity text: age identity lines (`AGE-SECRET-KEY-1…`, comments allowed) or one
    /// unencrypted OpenSSH private key. `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Identity> {
        let mut keys: Vec<Box<dyn age::Identity + Send + Sync>> = Vec::new();
        if text.contains("-----BEGIN") {
            let id = age::ssh::Identity::from_buffer(text.as_bytes(), None).map_err(|_| {
                Error::crypto(format!("identity {source} is not an SSH private key veza-dr can read"))
                    .with_hint("use an OpenSSH ed25519 or RSA key, or an age identity from `veza-dr keygen`")
            })?;
            match id {
                age::ssh::Identity::Unencrypted(_) => keys.push(Box::new(id)),
                age::ssh::Identity::Encrypted(_) => {
                    return Err(Error::crypto(format!("SSH identity {source} is protected by a passphrase")).with_hint(
                        "restores run unattended: use an unencrypted copy kept offline, or an age identity",
                    ))
                }
                age::ssh::Identity::Unsupported(_) => {
                    return Err(Error::crypto(format!("SSH identity {source} is of a kind age does not support"))
                        .with_hint("use an ed25519 or RSA SSH key"))
                }
            }
        } else {
            for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
                let id: age::x25519::Identity = line.parse().map_err(|_| {
                    Error::crypto(format!("identity {source} holds a line that is not an age identity"))
                        .with_hint("an identity line starts with AGE-SECRET-KEY-1")
                })?;
                keys.push(Box::new(id));
            }
        }
        if keys.is_empty() {
            return Err(Error::crypto(format!("identity {source} holds no identity")));
        }
        Ok(Identity::new(keys, text.to_string(), source.to_string()))
    }

    fn new(keys: Vec<Box<dyn age::Identity + Send + Sync>>, text: String, source: String) -> Self {
        Identity { keys: Arc::new(keys), text: Arc::new(text.into()), source, blob_keys: Arc::default() }
    }

    pub fn from_x25519(id: age::x25519::Identity) -> Self {
        let text = id.to_string().expose_secret().to_string();
        Identity::new(vec![Box::new(id)], text, "memory".into())
    }

    /// Write the identity into `f` (a new 0600 file at `path`, for errors): a copy for a restored server's
    /// restore_command, which the caller places outside the data directory and removes.
    pub fn write_copy(&self, f: &mut std::fs::File, path: &Path) -> Result<()> {
        use std::io::Write;
        f.write_all(self.text.expose_secret().as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| Error::io("write identity copy", path, e))
    }

    /// Decrypt one sealed object; `what` names it in the error.
    pub fn open(&self, sealed: &[u8], what: &dyn std::fmt::Display) -> Result<Vec<u8>> {
        let dec = age::Decryptor::new_buffered(sealed)
            .map_err(|e| Error::damaged(format!("{what} is not a valid encrypted object: {e}")))?;
        let mut r = dec.decrypt(self.keys.iter().map(|i| i.as_ref() as &dyn age::Identity)).map_err(|e| match e {
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

    /// Decrypt one blob of a pack: sealed under a blob key (`crypto::blob`), or, as earlier
    /// versions wrote them, as an age file of its own. `what` names it in the error.
    pub fn open_blob(&self, sealed: &[u8], what: &dyn std::fmt::Display) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.open_blob_into(sealed, what, &mut out)?;
        Ok(out)
    }

    /// `open_blob` into `out`, whose capacity a restore reuses from blob to blob.
    pub fn open_blob_into(&self, sealed: &[u8], what: &dyn std::fmt::Display, out: &mut Vec<u8>) -> Result<()> {
        if !sealed.starts_with(super::blob::MAGIC) {
            *out = self.open(sealed, what)?;
            return Ok(());
        }
        let p = super::blob::parse(sealed)
            .ok_or_else(|| Error::damaged(format!("{what} is cut short or has a malformed header")))?;
        let key = self.blob_key(p.envelope, what)?;
        super::blob::decrypt_payload_into(key.expose_secret(), p.nonce, p.payload, out)
            .ok_or_else(|| Error::damaged(format!("{what} is corrupted (authentication failed)")))
    }

    fn blob_key(&self, envelope: &[u8], what: &dyn std::fmt::Display) -> Result<BlobKey> {
        let id = *blake3::hash(envelope).as_bytes();
        if let Some(k) = self.blob_keys.lock().expect("not poisoned").get(&id) {
            return Ok(k.clone());
        }
        let opened = self.open(envelope, &format_args!("the key envelope of {what}"));
        let mut plain = match opened {
            // age cannot tell a damaged stanza from one sealed to someone else. Once this
            // identity has opened an envelope of the repository it is the right one, so the
            // failure is this blob's damage, not a reason to stop the whole restore.
            Err(e)
                if e.kind == crate::error::Kind::Crypto && !self.blob_keys.lock().expect("not poisoned").is_empty() =>
            {
                return Err(Error::damaged(format!(
                    "the key envelope of {what} does not open (damaged, or sealed to other recipients)"
                )))
            }
            r => r?,
        };
        let mut key = SecretBox::new(Box::new([0u8; 32]));
        let fits = plain.len() == 32;
        if fits {
            age::secrecy::ExposeSecretMut::expose_secret_mut(&mut key).copy_from_slice(&plain);
        }
        age::secrecy::zeroize::Zeroize::zeroize(&mut plain);
        if !fits {
            return Err(Error::damaged(format!("the key envelope of {what} holds no blob key")));
        }
        let key = Arc::new(key);
        let mut cache = self.blob_keys.lock().expect("not poisoned");
        if cache.len() >= BLOB_KEYS_KEPT {
            cache.clear();
        }
        cache.insert(id, key.clone());
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{Recipient, Sealer};

    #[test]
    fn seals_to_recipient_and_only_the_identity_opens() {
        let id = age::x25519::Identity::generate();
        let r: Recipient = id.to_public().to_string().parse().unwrap();
        let sealed = Sealer::new(&[r]).seal(b"hello").unwrap();
        assert_eq!(Identity::from_x25519(id).open(&sealed, &"x").unwrap(), b"hello");
        let other = Identity::from_x25519(age::x25519::Identity::generate());
        let err = other.open(&sealed, &"blob").unwrap_err();
        assert_eq!(err.kind, crate::error::Kind::Crypto);
        let mut bad = sealed.clone();
        let n = bad.len() - 3;
        bad[n] ^= 1;
        assert!(Identity::from_x25519(age::x25519::Identity::generate()).open(&bad, &"blob").is_err());
    }

    #[test]
    fn identity_text_errors_name_the_source_never_the_key() {
        let err = Identity::parse("AGE-SECRET-KEY-1NOTAKEY\n", "env:X").unwrap_err();
        assert!(err.message.contains("env:X"), "{}", err.message);
        assert!(!err.message.contains("NOTAKEY"), "{}", err.message);
        let err = Identity::parse("# nothing\n", "file:/k").unwrap_err();
        assert!(err.message.contains("holds no identity"), "{}", err.message);
    }
}
