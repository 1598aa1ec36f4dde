//! Who wrote an object. Encrypting to public keys hides data but proves nothing about its
//! author: anyone with write access to the bucket (a compromised backup host included) can
//! add a key, a manifest and a sidecar, or a WAL segment. So each writer signs what it
//! creates with its host's ed25519 key (the one `veza-dr keygen --signing` prints):
//! - a sidecar is signed as stored; it carries the BLAKE3 of its sealed manifest and of its
//!   chunk-key object, so the signature covers both (and binds the manifest to the snapshot);
//!   packs are covered by the chunk ids in the manifest;
//! - a WAL object starts with `VZWS`, the signer's key and a signature over its cluster,
//!   name, fingerprint and the BLAKE3 of the sealed content.
//!
//! A restore-side policy pins the writers it trusts (`[trust] writers`). Then restore, drill
//! and wal-fetch refuse anything unsigned or signed by another key, naming the key; `latest`
//! means the newest trusted snapshot. Without pinned writers everything is accepted (and
//! `verify` says so). Signing needs no decryption key: encrypt-only still holds.

use super::format::Sidecar;
use crate::crypto::signing::{self, PublicKey, Signature};
use crate::error::{Error, Result};
use crate::source::postgres::wal::WalName;
use ed25519_dalek::{Signer, SigningKey};

fn signed_bytes(s: &Sidecar) -> Vec<u8> {
    let unsigned = Sidecar { signature: None, warnings: vec![], ..s.clone() };
    serde_json::to_vec(&unsigned).expect("serialisable")
}

pub fn sign_sidecar(s: &mut Sidecar, key: &SigningKey) {
    s.signature = None;
    s.signature = Some(signing::sign(key, &signed_bytes(s)));
}

/// The sidecar's signer if its signature holds; `None` when it is unsigned.
pub fn sidecar_signer(s: &Sidecar) -> Result<Option<PublicKey>> {
    let Some(sig) = &s.signature else { return Ok(None) };
    let key = PublicKey::parse(&sig.public_key)
        .ok_or_else(|| Error::damaged(format!("snapshot {} carries a malformed signature", s.id)))?;
    signing::verify(&signed_bytes(s), sig, std::slice::from_ref(&key)).map(Some).map_err(|_| {
        Error::damaged(format!("snapshot {}'s sidecar does not match its signature: it was altered", s.id))
    })
}

fn untrusted(what: String, signer: Option<PublicKey>) -> Error {
    let by = signer.map(|k| format!("signed by {k}")).unwrap_or_else(|| "not signed".into());
    Error::damaged(format!("{what} is {by}, not by a trusted writer: refused")).with_hint(
        "if that host is yours, add its key (`veza-dr keygen --signing` there) to [trust] writers of the policy",
    )
}

/// With `writers` pinned, the sidecar must be signed by one of them.
pub fn check_sidecar(s: &Sidecar, writers: &[PublicKey]) -> Result<()> {
    if writers.is_empty() {
        return Ok(());
    }
    match sidecar_signer(s)? {
        Some(k) if writers.contains(&k) => Ok(()),
        other => Err(untrusted(format!("snapshot {}", s.id), other)),
    }
}

const WAL_MAGIC: &[u8; 4] = b"VZWS";
/// The length of a signed WAL object's header: magic, the signer's key, the signature.
pub const WAL_HEAD: usize = 4 + 32 + 64;

fn wal_message(cluster: u64, name: &WalName, fp: &str, sealed: &[u8]) -> Vec<u8> {
    let mut m = b"veza-dr wal\0".to_vec();
    m.extend_from_slice(&cluster.to_le_bytes());
    m.extend_from_slice(name.as_str().as_bytes());
    m.push(0);
    m.extend_from_slice(fp.as_bytes());
    m.extend_from_slice(blake3::hash(sealed).as_bytes());
    m
}

/// A WAL object's body: the signature header, then the sealed content.
pub fn sign_wal(sealed: Vec<u8>, key: &SigningKey, cluster: u64, name: &WalName, fp: &str) -> Vec<u8> {
    let mut out = vec![0u8; WAL_HEAD];
    out.extend_from_slice(&sealed);
    sign_wal_in_place(&mut out, key, cluster, name, fp);
    out
}

/// `sign_wal` on a buffer whose first `WAL_HEAD` bytes were left for the header (the sealed
/// content follows them): no copy of the content.
pub fn sign_wal_in_place(body: &mut [u8], key: &SigningKey, cluster: u64, name: &WalName, fp: &str) {
    let sig = key.sign(&wal_message(cluster, name, fp, &body[WAL_HEAD..]));
    body[..4].copy_from_slice(WAL_MAGIC);
    body[4..36].copy_from_slice(&key.verifying_key().to_bytes());
    body[36..WAL_HEAD].copy_from_slice(&sig.to_bytes());
}

/// The sealed content of a WAL object, after its signature is checked; with `writers`
/// pinned, the signer must be one of them.
pub fn open_wal<'a>(body: &'a [u8], writers: &[PublicKey], cluster: u64, name: &WalName, fp: &str) -> Result<&'a [u8]> {
    let what = format!("WAL file {name}");
    if !body.starts_with(WAL_MAGIC) || body.len() < WAL_HEAD {
        return match writers.is_empty() {
            true => Ok(body),
            false => Err(untrusted(what, None)),
        };
    }
    let pk: [u8; 32] = body[4..36].try_into().expect("32 bytes");
    let sealed = &body[WAL_HEAD..];
    let sig =
        Signature { algorithm: "ed25519".into(), public_key: hex::encode(pk), value: hex::encode(&body[36..WAL_HEAD]) };
    let key = PublicKey(pk);
    signing::verify(&wal_message(cluster, name, fp, sealed), &sig, std::slice::from_ref(&key))
        .map_err(|_| Error::damaged(format!("{what} does not match its signature: it was altered")))?;
    if !writers.is_empty() && !writers.contains(&key) {
        return Err(untrusted(what, Some(key)));
    }
    Ok(sealed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_signatures_bind_name_content_and_signer() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let other = SigningKey::from_bytes(&[4; 32]);
        let me = PublicKey(key.verifying_key().to_bytes());
        let pinned = std::slice::from_ref(&me);
        let n = WalName::parse("000000010000000000000003").unwrap();
        let fp = "0123456789abcdef0123456789abcdef";
        let body = sign_wal(b"sealed".to_vec(), &key, 7, &n, fp);
        assert_eq!(open_wal(&body, pinned, 7, &n, fp).unwrap(), b"sealed");
        assert!(open_wal(&body, pinned, 8, &n, fp).is_err(), "another cluster");
        let n2 = WalName::parse("000000010000000000000004").unwrap();
        assert!(open_wal(&body, pinned, 7, &n2, fp).is_err(), "another name");
        let mut bad = body.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(open_wal(&bad, pinned, 7, &n, fp).is_err(), "altered content");
        let theirs = sign_wal(b"sealed".to_vec(), &other, 7, &n, fp);
        let e = open_wal(&theirs, pinned, 7, &n, fp).unwrap_err();
        assert!(e.message.contains("not by a trusted writer"), "{}", e.message);
        assert!(open_wal(&theirs, &[], 7, &n, fp).is_ok(), "nothing pinned: accepted");
        assert!(open_wal(b"legacy", pinned, 7, &n, fp).is_err(), "unsigned with writers pinned");
    }
}
