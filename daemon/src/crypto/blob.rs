//! Blob sealing: one age key agreement per 16 MiB of blobs, and agead for each blob.
//!
//! A blob used to be its own age file, so every chunk paid an X25519 key agreement on backup
//! and on restore: 17 % of a volume backup's CPU. Now a worker draws a random 32-byte blob key
//! `k`, seals it once as an ordinary age file (the *envelope*), and seals each blob's payload
//! with agead (c2sp.org/agead, age's own payload construction) under `k` and a fresh random
//! nonce. Every blob carries the envelope's bytes, so each blob still opens on its own; a
//! reader decrypts each distinct envelope once and keeps `k` for the blobs that follow.
//!
//! Blob layout: `MAGIC || u32 LE envelope length || envelope || nonce (16) || agead payload`.

use super::Sealer;
use crate::error::{Error, Result};
use age::secrecy::{zeroize::Zeroize, ExposeSecret, ExposeSecretMut, SecretBox};
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce, Tag};
use rand::TryRngCore;

/// The first bytes of a blob sealed under a shared blob key. An age file starts with
/// `age-encryption.org/`, so the two never collide.
pub const MAGIC: &[u8; 8] = b"vzblob1\n";
/// Plaintext one blob key seals at most (one larger blob has a key of its own): about a pack.
pub const KEY_LIMIT: usize = 16 << 20;
/// An envelope is an age file of 32 bytes: a few hundred bytes per recipient. Anything much
/// larger was not written by veza-dr.
const MAX_ENVELOPE: usize = 64 << 10;
const CHUNK: usize = 64 << 10;
const TAG: usize = 16;
const NONCE: usize = 16;

/// A blob key and its envelope.
struct BlobKey {
    key: SecretBox<[u8; 32]>,
    envelope: Vec<u8>,
    used: usize,
}

/// Seals blobs for one worker thread. It holds the current blob key in memory, which the
/// backup host may: it already holds the plaintext it seals.
pub struct BlobSealer {
    sealer: Sealer,
    current: Option<BlobKey>,
}

impl BlobSealer {
    pub fn new(sealer: Sealer) -> Self {
        BlobSealer { sealer, current: None }
    }

    /// Seal `head || body` (the framing flag, then the payload) as one blob.
    pub fn seal(&mut self, head: &[u8], body: &[u8]) -> Result<Vec<u8>> {
        let len = head.len() + body.len();
        if self.current.as_ref().is_none_or(|k| k.used > 0 && k.used + len > KEY_LIMIT) {
            // Drawn straight into its box: no copy of the key is left on the stack.
            let mut key = SecretBox::new(Box::new([0u8; 32]));
            fill_random(key.expose_secret_mut())?;
            let envelope = self.sealer.seal(key.expose_secret())?;
            // Readers refuse larger envelopes as damage: refuse to write blobs none could read.
            if envelope.len() > MAX_ENVELOPE {
                return Err(Error::crypto(format!(
                    "a blob key sealed to the policy's recipients takes {} bytes, more than the {MAX_ENVELOPE} a reader accepts",
                    envelope.len()
                ))
                .with_hint("use fewer recipients, or X25519 (age1…) ones, which take about 100 bytes each"));
            }
            self.current = Some(BlobKey { key, envelope, used: 0 });
        }
        let k = self.current.as_mut().expect("drawn above");
        let mut nonce = [0u8; NONCE];
        fill_random(&mut nonce)?;
        let mut out = Vec::with_capacity(MAGIC.len() + 4 + k.envelope.len() + NONCE + sealed_len(len));
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(k.envelope.len() as u32).to_le_bytes());
        out.extend_from_slice(&k.envelope);
        out.extend_from_slice(&nonce);
        encrypt_payload(k.key.expose_secret(), &nonce, head, body, &mut out);
        k.used += len;
        Ok(out)
    }
}

fn fill_random(buf: &mut [u8]) -> Result<()> {
    rand::rngs::OsRng.try_fill_bytes(buf).map_err(|e| Error::crypto(format!("cannot draw random bytes: {e}")))
}

/// A blob's parts, before its envelope is opened.
pub struct Parsed<'a> {
    pub envelope: &'a [u8],
    pub nonce: &'a [u8; NONCE],
    pub payload: &'a [u8],
}

/// Split a blob sealed by [`BlobSealer`]; `None` when it is not one (an age blob, or bytes
/// someone else wrote: the caller names it).
pub fn parse(sealed: &[u8]) -> Option<Parsed<'_>> {
    let rest = sealed.strip_prefix(MAGIC)?;
    let (len, rest) = rest.split_first_chunk::<4>()?;
    let len = u32::from_le_bytes(*len) as usize;
    if len > MAX_ENVELOPE || rest.len() < len + NONCE {
        return None;
    }
    let (envelope, rest) = rest.split_at(len);
    let (nonce, payload) = rest.split_first_chunk::<NONCE>()?;
    Some(Parsed { envelope, nonce, payload })
}

/// The sealed size of `n` plaintext bytes: a tag per 64 KiB chunk, and one for an empty payload.
fn sealed_len(n: usize) -> usize {
    n + TAG * n.div_ceil(CHUNK).max(1)
}

fn payload_cipher(ikm: &[u8], nonce: &[u8; NONCE]) -> ChaCha20Poly1305 {
    let mut key = age_core::primitives::hkdf(nonce, b"payload", ikm);
    let c = ChaCha20Poly1305::new(&key.into());
    key.zeroize();
    c
}

/// STREAM's chunk nonce: an 11-byte big-endian counter, then 1 for the final chunk.
fn chunk_nonce(counter: usize, last: bool) -> Nonce {
    let mut n = [0u8; 12];
    n[3..11].copy_from_slice(&(counter as u64).to_be_bytes());
    n[11] = last as u8;
    n.into()
}

/// Append agead(ikm, nonce, head || body) to `out`: each chunk is copied once into `out` and
/// encrypted there.
pub(crate) fn encrypt_payload(ikm: &[u8], nonce: &[u8; NONCE], head: &[u8], body: &[u8], out: &mut Vec<u8>) {
    let c = payload_cipher(ikm, nonce);
    let total = head.len() + body.len();
    let chunks = total.div_ceil(CHUNK).max(1);
    for i in 0..chunks {
        let (a, b) = (i * CHUNK, ((i + 1) * CHUNK).min(total));
        let start = out.len();
        if a < head.len() {
            out.extend_from_slice(&head[a..b.min(head.len())]);
        }
        if b > head.len() {
            out.extend_from_slice(&body[a.max(head.len()) - head.len()..b - head.len()]);
        }
        let tag = c
            .encrypt_in_place_detached(&chunk_nonce(i, i + 1 == chunks), b"", &mut out[start..])
            .expect("a 64 KiB chunk is within ChaCha20-Poly1305's limits");
        out.extend_from_slice(&tag);
    }
}

/// Open agead(ikm, nonce, …) into `out` (cleared first; a restore reuses its capacity): `None`
/// when any chunk fails, the stream was cut at a chunk boundary (the new last chunk is not
/// marked final), or the final chunk is empty after others.
pub(crate) fn decrypt_payload_into(ikm: &[u8], nonce: &[u8; NONCE], sealed: &[u8], out: &mut Vec<u8>) -> Option<()> {
    out.clear();
    if sealed.len() < TAG {
        return None;
    }
    let c = payload_cipher(ikm, nonce);
    let chunks = sealed.len().div_ceil(CHUNK + TAG);
    out.reserve(sealed.len());
    for (i, piece) in sealed.chunks(CHUNK + TAG).enumerate() {
        let last = i + 1 == chunks;
        let (ct, tag) = piece.split_at_checked(piece.len().checked_sub(TAG)?)?;
        if last && ct.is_empty() && i > 0 {
            return None;
        }
        let start = out.len();
        out.extend_from_slice(ct);
        c.decrypt_in_place_detached(&chunk_nonce(i, last), b"", &mut out[start..], Tag::from_slice(tag)).ok()?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{Identity, Recipient};
    use age::secrecy::ExposeSecret;
    use std::collections::HashSet;
    use std::io::{Read, Write};
    use std::sync::Mutex;

    /// Wraps a real recipient and keeps a copy of the file key age hands it: the only way to
    /// check our payload code against age's own, byte for byte.
    struct Capture(age::x25519::Recipient, Mutex<Option<[u8; 16]>>);
    impl age::Recipient for Capture {
        fn wrap_file_key(
            &self,
            fk: &age_core::format::FileKey,
        ) -> std::result::Result<(Vec<age_core::format::Stanza>, HashSet<String>), age::EncryptError> {
            *self.1.lock().unwrap() = Some(*fk.expose_secret());
            self.0.wrap_file_key(fk)
        }
    }

    fn age_file(r: &age::x25519::Recipient, plain: &[u8]) -> (Vec<u8>, [u8; 16]) {
        let cap = Capture(r.clone(), Mutex::new(None));
        let enc = age::Encryptor::with_recipients(std::iter::once(&cap as &dyn age::Recipient)).unwrap();
        let mut out = Vec::new();
        let mut w = enc.wrap_output(&mut out).unwrap();
        w.write_all(plain).unwrap();
        w.finish().unwrap();
        let fk = cap.1.lock().unwrap().unwrap();
        (out, fk)
    }

    fn sizes() -> Vec<usize> {
        vec![0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 7]
    }

    /// The payload code is age's payload, both ways: age opens what we seal under its file key
    /// and header, and we open what age seals. Any slip in chunking, counters or the final
    /// flag fails here.
    #[test]
    fn payload_is_ages_payload() {
        let id = age::x25519::Identity::generate();
        let r = id.to_public();
        for n in sizes() {
            let plain: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
            let (file, fk) = age_file(&r, &plain);
            let hdr = file.len() - NONCE - sealed_len(n);
            let nonce: [u8; NONCE] = file[hdr..hdr + NONCE].try_into().unwrap();
            let mut out = Vec::new();
            decrypt_payload_into(&fk, &nonce, &file[hdr + NONCE..], &mut out).unwrap();
            assert_eq!(out, plain, "n={n}");
            // Ours, under age's header and a new nonce, split between head and body.
            let mut ours = file[..hdr].to_vec();
            let nonce2 = [9u8; NONCE];
            ours.extend_from_slice(&nonce2);
            let cut = n.min(3);
            encrypt_payload(&fk, &nonce2, &plain[..cut], &plain[cut..], &mut ours);
            assert_eq!(ours.len(), file.len(), "n={n}");
            let mut back = Vec::new();
            age::Decryptor::new(&ours[..])
                .unwrap()
                .decrypt(std::iter::once(&id as &dyn age::Identity))
                .unwrap()
                .read_to_end(&mut back)
                .unwrap();
            assert_eq!(back, plain, "n={n}");
        }
    }

    fn pair() -> (BlobSealer, Identity) {
        let id = age::x25519::Identity::generate();
        let r: Recipient = id.to_public().to_string().parse().unwrap();
        (BlobSealer::new(Sealer::new(&[r])), Identity::from_x25519(id))
    }

    #[test]
    fn blobs_round_trip_and_share_one_envelope_until_the_limit() {
        let (mut s, id) = pair();
        let body = vec![5u8; 3 * CHUNK + 11];
        let a = s.seal(&[1], &body).unwrap();
        let b = s.seal(&[1], &body).unwrap();
        let (pa, pb) = (parse(&a).unwrap(), parse(&b).unwrap());
        assert_eq!(pa.envelope, pb.envelope, "one key agreement for both");
        assert_ne!(pa.nonce, pb.nonce);
        assert_ne!(pa.payload, pb.payload, "same plaintext, other nonce, other ciphertext");
        let mut want = vec![1u8];
        want.extend_from_slice(&body);
        assert_eq!(id.open_blob(&a, &"a").unwrap(), want);
        assert_eq!(id.open_blob(&b, &"b").unwrap(), want);
        // Up to the limit the key holds; the blob that would pass it gets a new one.
        let used = 2 * (body.len() + 1);
        let c = s.seal(&[], &vec![0u8; KEY_LIMIT - used]).unwrap();
        assert_eq!(parse(&c).unwrap().envelope, pa.envelope);
        let d = s.seal(&[1], &body).unwrap();
        assert_ne!(parse(&d).unwrap().envelope, pa.envelope);
        assert_eq!(id.open_blob(&d, &"d").unwrap(), want);
        assert_eq!(id.open_blob(&c, &"c").unwrap(), vec![0u8; KEY_LIMIT - used]);
        // A blob larger than the limit seals under a key of its own.
        let e = s.seal(&[1], &vec![3u8; KEY_LIMIT + 1]).unwrap();
        assert_ne!(parse(&e).unwrap().envelope, parse(&d).unwrap().envelope);
        let f = s.seal(&[1], &body).unwrap();
        assert_ne!(parse(&f).unwrap().envelope, parse(&e).unwrap().envelope);
    }

    #[test]
    fn tampered_cut_or_hostile_blobs_are_damage_and_a_stranger_is_a_crypto_error() {
        let (mut s, id) = pair();
        let body = vec![7u8; 2 * CHUNK + 100];
        let blob = s.seal(&[0], &body).unwrap();
        let damaged = |b: &[u8]| {
            let e = id.open_blob(b, &"blob x").unwrap_err();
            assert_eq!(e.kind, crate::error::Kind::Damaged, "{}", e.message);
            assert!(e.message.contains("blob x"), "{}", e.message);
        };
        let mut flipped = blob.clone();
        *flipped.last_mut().unwrap() ^= 1;
        damaged(&flipped);
        // Cut at a chunk boundary: the new last chunk was not sealed as final.
        let p = blob.len() - sealed_len(body.len() + 1);
        damaged(&blob[..p + 2 * (CHUNK + TAG)]);
        damaged(&blob[..p + CHUNK + TAG + 3]);
        // A hostile envelope length, and bytes that are no blob at all.
        let mut long = blob.clone();
        long[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        damaged(&long);
        damaged(&blob[..10]);
        damaged(b"vzblob1\n");
        damaged(b"not a blob");
        let (_, stranger) = pair();
        assert_eq!(stranger.open_blob(&blob, &"b").unwrap_err().kind, crate::error::Kind::Crypto);
        // A damaged envelope, once the identity has opened another one of this repository,
        // is damage to that blob, not a wrong identity that stops the restore. The byte
        // changed is the first of the X25519 stanza's body, so age finds no stanza it opens.
        let mut other = BlobSealer::new(s.sealer.clone()).seal(&[0], &body).unwrap();
        let at = MAGIC.len() + 4 + b"age-encryption.org/v1\n".len() + b"-> X25519 ".len() + 43 + 1;
        assert!(other[at - 1] == b'\n' && other[at].is_ascii_alphanumeric());
        other[at] = if other[at] == b'A' { b'B' } else { b'A' };
        damaged(&other);
        assert_eq!(stranger.open_blob(&other, &"b").unwrap_err().kind, crate::error::Kind::Crypto);
        // A blob sealed as one age file, as earlier versions wrote them, still opens.
        let old = s.sealer.seal(b"\x00old").unwrap();
        assert_eq!(id.open_blob(&old, &"old").unwrap(), b"\x00old");
    }
}
