//! The data path. Backup: chunk → keyed hash → dedup → zstd → age → pack → parallel upload.
//! Restore: ranged fetch → age → zstd → check the keyed hash → write at offset.

pub mod backup;
pub mod chunker;
pub mod delta;
pub mod pages;
pub mod record;
pub mod restore;
pub mod safe_dir;
pub mod sink;
pub mod snapshot;
pub mod tree;
pub mod walk;

use crate::crypto::{BlobSealer, Identity};
use crate::error::{Error, Result};
use crate::repository::format::{ChunkId, BLOB_RAW, BLOB_ZSTD};

/// Keyed BLAKE3: a chunk's id.
pub fn chunk_id(key: &[u8; 32], data: &[u8]) -> ChunkId {
    *blake3::keyed_hash(key, data).as_bytes()
}

/// Compress (when it helps) and encrypt one chunk. `scratch` is the worker's compression
/// buffer, kept across chunks so each one does not allocate and fault in a fresh megabyte.
pub fn seal_blob(
    sealer: &mut BlobSealer,
    zc: &mut zstd::bulk::Compressor<'_>,
    scratch: &mut Vec<u8>,
    data: &[u8],
) -> Result<Vec<u8>> {
    scratch.clear();
    scratch.reserve(zstd::zstd_safe::compress_bound(data.len()));
    // Compress into the spare capacity: no zero-filling of the buffer.
    let mut cur = std::io::Cursor::new(std::mem::take(scratch));
    let n = zc.compress_to_buffer(data, &mut cur);
    *scratch = cur.into_inner();
    let n = n.map_err(|e| Error::failed(format!("zstd compression failed: {e}")))?;
    if n >= data.len() {
        return sealer.seal(&[BLOB_RAW], data);
    }
    sealer.seal(&[BLOB_ZSTD], scratch)
}

/// Decrypt, decompress and check one chunk against its id. `what` names it in errors. The
/// work goes through two buffers the caller keeps (the decrypted blob, the decompressed
/// chunk): a restore worker reuses them, where a fresh pair per chunk was allocated, faulted
/// in and freed again for every megabyte restored. Returns the chunk, borrowed from one of them.
#[allow(clippy::too_many_arguments)]
pub fn open_blob<'b>(
    opener: &Identity,
    dz: &mut zstd::bulk::Decompressor<'_>,
    key: &[u8; 32],
    id: &ChunkId,
    raw_len: u32,
    sealed: &[u8],
    what: &dyn std::fmt::Display,
    (framed, plain): &'b mut (Vec<u8>, Vec<u8>),
) -> Result<&'b [u8]> {
    opener.open_blob_into(sealed, what, framed)?;
    let data: &[u8] = match framed.first() {
        Some(&BLOB_RAW) => &framed[1..],
        Some(&BLOB_ZSTD) => {
            plain.clear();
            plain.reserve(raw_len as usize);
            // Into the buffer's capacity, never more: a blob that inflates past its recorded
            // length fails here or in the length check below.
            dz.decompress_to_buffer(&framed[1..], plain)
                .map_err(|e| Error::damaged(format!("{what} does not decompress: {e}")))?;
            plain
        }
        _ => return Err(Error::damaged(format!("{what} has an unknown blob framing"))),
    };
    if data.len() != raw_len as usize || &chunk_id(key, data) != id {
        return Err(Error::damaged(format!("{what} does not match its id (tampered or swapped)")));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_round_trip_and_swap_detection() {
        let id = age::x25519::Identity::generate();
        let r: crate::crypto::Recipient = id.to_public().to_string().parse().unwrap();
        let sealer = crate::crypto::Sealer::new(&[r]);
        let mut blobs = BlobSealer::new(sealer.clone());
        let mut scratch = Vec::new();
        let opener = Identity::from_x25519(id);
        let key = [7u8; 32];
        let mut zc = zstd::bulk::Compressor::new(3).unwrap();
        let mut dz = zstd::bulk::Decompressor::new().unwrap();
        let mut bufs = Default::default();
        let a = vec![b'a'; 10_000];
        let b: Vec<u8> = (0..10_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let (ia, ib) = (chunk_id(&key, &a), chunk_id(&key, &b));
        let sa = seal_blob(&mut blobs, &mut zc, &mut scratch, &a).unwrap();
        let sb = seal_blob(&mut blobs, &mut zc, &mut scratch, &b).unwrap();
        assert!(sa.len() < 1000, "compressible data was not compressed");
        assert_eq!(open_blob(&opener, &mut dz, &key, &ia, 10_000, &sa, &"a", &mut bufs).unwrap(), &a[..]);
        assert_eq!(open_blob(&opener, &mut dz, &key, &ib, 10_000, &sb, &"b", &mut bufs).unwrap(), &b[..]);
        // A swapped blob decrypts fine but fails its id check.
        let err = open_blob(&opener, &mut dz, &key, &ia, 10_000, &sb, &"a", &mut bufs).unwrap_err();
        assert!(err.message.contains("does not match its id"), "{}", err.message);
        // A blob as earlier versions sealed it, one age file of its own, still opens.
        let old = sealer.seal(&[&[BLOB_ZSTD][..], &zstd::bulk::compress(&a, 3).unwrap()].concat()).unwrap();
        assert_eq!(open_blob(&opener, &mut dz, &key, &ia, 10_000, &old, &"old", &mut bufs).unwrap(), &a[..]);
        // The buffers carry nothing from one chunk to the next: a short chunk after a longer
        // one, each way of framing, gives exactly its own bytes.
        let c = vec![b'c'; 100];
        let ic = chunk_id(&key, &c);
        let sc = seal_blob(&mut blobs, &mut zc, &mut scratch, &c).unwrap();
        assert_eq!(open_blob(&opener, &mut dz, &key, &ic, 100, &sc, &"c", &mut bufs).unwrap(), &c[..]);
        let d: Vec<u8> = b[..100].to_vec();
        let sd = seal_blob(&mut blobs, &mut zc, &mut scratch, &d).unwrap();
        let id_d = chunk_id(&key, &d);
        assert_eq!(open_blob(&opener, &mut dz, &key, &id_d, 100, &sd, &"d", &mut bufs).unwrap(), &d[..]);
        // A blob that inflates past its recorded length is refused, whatever room the buffer has.
        assert!(open_blob(&opener, &mut dz, &key, &ia, 100, &sa, &"a", &mut bufs).is_err());
    }
}
