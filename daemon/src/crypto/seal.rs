//! Sealing to public recipients (age): what every writer does to every blob it stores.

use super::Recipient;
use crate::error::{Error, Result};
use std::io::Write;
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
        self.seal_after(0, plain)
    }

    /// `room` zero bytes, then `plain` sealed: a caller that puts a header in front (a WAL
    /// object's signature) fills them in place instead of copying the sealed bytes.
    pub fn seal_after(&self, room: usize, plain: &[u8]) -> Result<Vec<u8>> {
        let enc = age::Encryptor::with_recipients(self.recipients.iter().map(|r| r.as_ref() as &dyn age::Recipient))
            .map_err(|e| Error::crypto(format!("cannot encrypt: {e}")).with_cause(e))?;
        // The whole output at once (a tag of 16 bytes per 64 KiB, the header's stanzas):
        // growing a buffer of megabytes copies it into fresh memory.
        let cap = room + plain.len() + (plain.len() / 65536 + 1) * 16 + 512 + 256 * self.recipients.len();
        let mut out = Vec::with_capacity(cap);
        out.resize(room, 0);
        let mut w = enc.wrap_output(&mut out).map_err(|e| Error::crypto(format!("cannot encrypt: {e}")))?;
        w.write_all(plain).and_then(|_| w.finish()).map_err(|e| Error::crypto(format!("cannot encrypt: {e}")))?;
        Ok(out)
    }
}

/// A new age identity: returns (identity file text, public recipient).
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
