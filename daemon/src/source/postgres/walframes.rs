//! A WAL segment as 1 MiB zstd frames, one per BLAKE3 subtree: how wal-push compresses a
//! segment, and the frames `wal-tail` compresses ahead while PostgreSQL is still writing it
//! (the "ahead" file), so that archive_command finds most of its work done.
//!
//! A segment of 2 MiB to 1 GiB (`wal_segment_size` is a power of two from 1 MiB to 1 GiB; a
//! 1 MiB segment is stored as two halves) is cut into 1 MiB chunks. Each chunk is an aligned subtree of BLAKE3's tree, so its chaining
//! value (CV) depends on its bytes and position alone, and the CVs merge into exactly
//! `blake3::hash(segment)`, the fingerprint that names the stored object. The tailer writes a
//! frame only after decoding it back to exactly the chunk it compressed, and seals the record
//! with the frame's BLAKE3; wal-push takes a chunk's frame only from an intact record whose CV
//! equals the file's CV for that chunk. The check on the round trip is done by the tailer,
//! while PostgreSQL is still writing the segment, not by archive_command, which PostgreSQL
//! waits for (decoding the frames was a quarter of a push's CPU).

use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// The chunk: one frame, one subtree.
pub const CHUNK: u64 = 1 << 20;
/// The largest segment PostgreSQL writes (`wal_segment_size` is at most 1 GB).
const MAX_SEGMENT: u64 = 1 << 30;
/// zstd level of WAL frames.
pub const LEVEL: i32 = 1;

/// Whether a file of `len` bytes is stored as chunk frames.
pub fn chunked(len: u64) -> bool {
    (2 * CHUNK..=MAX_SEGMENT).contains(&len) && len.is_power_of_two()
}

/// The CV of `part`, the subtree of a file that starts at byte `at`.
pub fn subtree(part: &[u8], at: u64) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(at);
    h.update(part);
    h.finalize_non_root()
}

/// The CV of a perfect subtree from the CVs of its chunks, in order (a power of two of them).
fn tree(cvs: &[ChainingValue]) -> ChainingValue {
    match cvs {
        [one] => *one,
        _ => {
            let (l, r) = cvs.split_at(cvs.len() / 2);
            merge_subtrees_non_root(&tree(l), &tree(r), Mode::Hash)
        }
    }
}

/// The hash of a chunked file from the CVs of all its chunks.
pub fn root(cvs: &[ChainingValue]) -> blake3::Hash {
    let (l, r) = cvs.split_at(cvs.len() / 2);
    merge_subtrees_root(&tree(l), &tree(r), Mode::Hash)
}

/// Frames compressed ahead for one segment: chunk index → (the CV of the chunk it was
/// compressed from, where its frame lies in `bytes`). The file is read once into `bytes`; the
/// frames are not copied out of it.
#[derive(Default)]
pub struct Ahead {
    bytes: Vec<u8>,
    frames: HashMap<u32, (ChainingValue, std::ops::Range<usize>)>,
    /// The length of the file's intact records (a record after a torn one is never read).
    pub intact: u64,
}

/// A record of the ahead file: index (u32 LE), frame length (u32 LE), the chunk's CV, BLAKE3
/// of the frame, the frame. The frame's own hash makes a record torn by a crash or a lost
/// write unusable rather than wrong.
pub fn record(index: u32, cv: &ChainingValue, frame: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(72 + frame.len());
    r.extend_from_slice(&index.to_le_bytes());
    r.extend_from_slice(&(frame.len() as u32).to_le_bytes());
    r.extend_from_slice(cv);
    r.extend_from_slice(blake3::hash(frame).as_bytes());
    r.extend_from_slice(frame);
    r
}

impl Ahead {
    /// The intact records of the ahead file at `path` (none when there is no file). Reading
    /// stops at the first record that is cut short or whose frame does not match its hash.
    /// Only a file of this user's, in a directory of this user's, that no one else can write
    /// is read: wal-push stores a frame from an intact record whose chaining value matches,
    /// so whoever writes the file decides what is stored for those chunks. That is the
    /// archiving user alone, who can write pg_wal itself.
    pub fn read(path: &Path) -> Ahead {
        use std::io::Read;
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let me = nix::unistd::geteuid().as_raw();
        let own = |m: &std::fs::Metadata| m.uid() == me && m.mode() & 0o022 == 0;
        let dir_ok = path.parent().and_then(|d| std::fs::metadata(d).ok()).is_some_and(|m| m.is_dir() && own(&m));
        let file = std::fs::OpenOptions::new().read(true).custom_flags(nix::libc::O_NOFOLLOW).open(path);
        let Ok(mut file) = file else { return Ahead::default() };
        let file_ok = file.metadata().is_ok_and(|m| m.is_file() && own(&m));
        let mut b = Vec::new();
        if !dir_ok || !file_ok || file.read_to_end(&mut b).is_err() {
            return Ahead::default();
        }
        Ahead::parse(b)
    }

    fn parse(bytes: Vec<u8>) -> Ahead {
        let (mut frames, mut at) = (HashMap::new(), 0usize);
        while let Some(r) = bytes.get(at..).filter(|r| r.len() >= 72) {
            let index = u32::from_le_bytes(r[0..4].try_into().expect("4 bytes"));
            let n = u32::from_le_bytes(r[4..8].try_into().expect("4 bytes")) as usize;
            let Some(frame) = r.get(72..72 + n) else { break };
            if blake3::hash(frame).as_bytes()[..] != r[40..72] {
                break;
            }
            let cv: ChainingValue = r[8..40].try_into().expect("32 bytes");
            frames.insert(index, (cv, at + 72..at + 72 + n));
            at += 72 + n;
        }
        Ahead { bytes, frames, intact: at as u64 }
    }

    /// The chunk indices held.
    pub fn indices(&self) -> impl Iterator<Item = u32> + '_ {
        self.frames.keys().copied()
    }

    fn frame(&self, index: u64, cv: &ChainingValue) -> Option<&[u8]> {
        let (want, frame) = self.frames.get(&u32::try_from(index).ok()?)?;
        (want == cv).then(|| &self.bytes[frame.clone()])
    }
}

/// One half of a chunked file, `[at, at + n)`: mapped, each chunk hashed and compressed (or
/// its frame taken from `ahead`). Returns the chunks' CVs, their frames
/// concatenated, the first bytes of the half (for the caller's check) and how many frames
/// came from `ahead`. The frames' buffer has room for the frames of `room` bytes (the whole
/// file for the left half, so the right half's frames join it without a move).
pub fn half(file: &std::fs::File, at: u64, n: u64, room: u64, ahead: &Ahead) -> std::io::Result<Half> {
    // A mapping past the end of the file would fault on first touch: the length is checked first.
    if file.metadata()?.len() < at + n {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the WAL file is shorter than it was"));
    }
    // The half is mapped from the page cache, where PostgreSQL just wrote it: read() into a
    // buffer cost as much as hashing it (the kernel zeroes every fresh page, then copies into
    // it). SAFETY: the mapping is read-only and private; PostgreSQL never writes or truncates
    // a segment it hands to archive_command. A process that truncated it under us would end
    // wal-push with SIGBUS, which PostgreSQL treats as a failed archive_command and retries:
    // nothing is acknowledged. One that rewrote it is caught by the caller's checks.
    let map = unsafe { memmap2::MmapOptions::new().offset(at).len(n as usize).populate().map(file)? };
    let buf: &[u8] = &map;
    let mut zc = zstd::bulk::Compressor::new(LEVEL)?;
    // Room for every frame at its bound, so appending never moves the frames already made; the
    // pages past what is written are never touched.
    let bound = zstd::zstd_safe::compress_bound(CHUNK as usize) * room.max(n).div_ceil(CHUNK) as usize;
    let z = Vec::with_capacity(bound);
    let mut out = Half { cvs: Vec::new(), z, head: buf[..buf.len().min(64)].to_vec(), reused: 0 };
    for (i, part) in buf.chunks(CHUNK as usize).enumerate() {
        let off = at + i as u64 * CHUNK;
        let cv = subtree(part, off);
        match ahead.frame(off / CHUNK, &cv) {
            Some(frame) => {
                out.z.extend_from_slice(frame);
                out.reused += 1;
            }
            None => {
                let mut cursor = std::io::Cursor::new(&mut out.z);
                cursor.set_position(cursor.get_ref().len() as u64);
                zc.compress_to_buffer(part, &mut cursor)?;
            }
        }
        out.cvs.push(cv);
    }
    Ok(out)
}

/// Whether `frame` is one zstd frame that decodes to exactly `part`. The tailer writes a
/// record only then, so a compressor that failed it (a bug, bad memory) costs the compression
/// the frame would have saved, never a stored object other than the chunk.
fn decodes_to(frame: &[u8], part: &[u8], d: &mut zstd::bulk::Decompressor, scratch: &mut Vec<u8>) -> bool {
    scratch.clear();
    scratch.reserve(part.len());
    zstd::zstd_safe::find_frame_compressed_size(frame).ok() == Some(frame.len())
        && d.decompress_to_buffer(frame, scratch).is_ok()
        && scratch[..] == *part
}

pub struct Half {
    pub cvs: Vec<ChainingValue>,
    pub z: Vec<u8>,
    pub head: Vec<u8>,
    pub reused: usize,
}

/// The tailer's buffers, kept from chunk to chunk.
pub struct Compressing {
    buf: Vec<u8>,
    scratch: Vec<u8>,
    zc: zstd::bulk::Compressor<'static>,
    zd: zstd::bulk::Decompressor<'static>,
}

impl Compressing {
    pub fn new() -> std::io::Result<Compressing> {
        Ok(Compressing {
            buf: vec![0u8; CHUNK as usize],
            scratch: Vec::with_capacity(CHUNK as usize),
            zc: zstd::bulk::Compressor::new(LEVEL)?,
            zd: zstd::bulk::Decompressor::new()?,
        })
    }
}

/// Compress chunk `index` of `file` and append its record to the ahead file `out`, once the
/// frame decodes back to exactly the chunk (`Ok(false)` and no record when it does not).
pub fn compress_ahead(
    c: &mut Compressing,
    file: &std::fs::File,
    index: u64,
    out: &mut std::fs::File,
) -> std::io::Result<bool> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(&mut c.buf, index * CHUNK)?;
    let cv = subtree(&c.buf, index * CHUNK);
    let frame = c.zc.compress(&c.buf)?;
    if !decodes_to(&frame, &c.buf, &mut c.zd, &mut c.scratch) {
        return Ok(false);
    }
    let index = u32::try_from(index).map_err(|_| std::io::Error::other("chunk index out of range"))?;
    out.write_all(&record(index, &cv, &frame))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_cvs_merge_into_the_file_hash_and_only_an_intact_matching_frame_is_reused() {
        let data: Vec<u8> = (0..(4u64 << 20)).map(|i| ((i * 2654435761) >> 13) as u8 & 0x3f).collect();
        let cvs: Vec<_> = data.chunks(CHUNK as usize).enumerate().map(|(i, c)| subtree(c, i as u64 * CHUNK)).collect();
        assert_eq!(root(&cvs), blake3::hash(&data));
        assert!(chunked(2 << 20) && chunked(16 << 20) && !chunked(1 << 20) && !chunked(3 << 20));

        let dir = tempfile::tempdir().unwrap();
        let seg = dir.path().join("seg");
        std::fs::write(&seg, &data).unwrap();
        let f = std::fs::File::open(&seg).unwrap();
        let ahead_path = dir.path().join("seg.frames");
        let mut out = std::fs::File::create(&ahead_path).unwrap();
        let mut c = Compressing::new().unwrap();
        assert!(compress_ahead(&mut c, &f, 1, &mut out).unwrap());
        assert!(compress_ahead(&mut c, &f, 2, &mut out).unwrap());
        // A record for chunk 3 made from other bytes: its CV does not match the file's.
        let other = vec![7u8; CHUNK as usize];
        out.write_all(&record(3, &subtree(&other, 3 * CHUNK), &zstd::bulk::compress(&other, 1).unwrap())).unwrap();
        drop(out);
        let ahead = Ahead::read(&ahead_path);
        let mut got: Vec<u32> = ahead.indices().collect();
        got.sort();
        assert_eq!(got, [1, 2, 3]);
        let h = half(&f, 0, 4 << 20, 4 << 20, &ahead).unwrap();
        assert_eq!(h.reused, 2, "chunks 1 and 2 reused, not the other bytes' chunk 3");
        assert_eq!(h.cvs, cvs);
        assert_eq!(zstd::stream::decode_all(&h.z[..]).unwrap(), data);
        // The right half on its own, and a half past the end of the file: an error, not a fault.
        let r = half(&f, 2 << 20, 2 << 20, 2 << 20, &Ahead::default()).unwrap();
        assert_eq!(r.cvs[..], cvs[2..]);
        assert_eq!(zstd::stream::decode_all(&r.z[..]).unwrap(), data[2 << 20..]);
        assert!(half(&f, 2 << 20, 4 << 20, 4 << 20, &ahead).is_err());

        // The tailer's round trip: a frame of other bytes, one frame and then more, and a cut
        // frame do not decode to the chunk, so no record is written for them.
        let (mut zd, mut scratch) = (zstd::bulk::Decompressor::new().unwrap(), Vec::new());
        let chunk0 = &data[..CHUNK as usize];
        let good = zstd::bulk::compress(chunk0, 1).unwrap();
        assert!(decodes_to(&good, chunk0, &mut zd, &mut scratch));
        let mut two = good.clone();
        two.extend(zstd::bulk::compress(b"more", 1).unwrap());
        for bad in [&zstd::bulk::compress(&other, 1).unwrap()[..], &two[..], &good[..good.len() - 1]] {
            assert!(!decodes_to(bad, chunk0, &mut zd, &mut scratch));
        }
        // A record forged with chunk 3's true chaining value over other bytes: only the
        // archiving user can write the file, and a file or directory others can write is not
        // read at all.
        let mut out = std::fs::OpenOptions::new().append(true).open(&ahead_path).unwrap();
        out.write_all(&record(3, &cvs[3], &zstd::bulk::compress(&other, 1).unwrap())).unwrap();
        drop(out);
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
        mode(&ahead_path, 0o622);
        assert_eq!(Ahead::read(&ahead_path).indices().count(), 0, "a file others can write is not read");
        mode(&ahead_path, 0o600);
        mode(dir.path(), 0o777);
        assert_eq!(Ahead::read(&ahead_path).indices().count(), 0, "nor one in a directory others can write");
        mode(dir.path(), 0o700);
        let link = dir.path().join("link.frames");
        std::os::unix::fs::symlink(&ahead_path, &link).unwrap();
        assert_eq!(Ahead::read(&link).indices().count(), 0, "nor a link");
        assert_eq!(Ahead::read(&ahead_path).indices().count(), 3);

        // A torn record (the file cut inside the second frame) keeps only the first; a flipped
        // byte in a frame drops it and what follows.
        let bytes = std::fs::read(&ahead_path).unwrap();
        let first = 72 + u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
        let torn = Ahead::parse(bytes[..first + 100].to_vec());
        assert_eq!(torn.indices().collect::<Vec<_>>(), [1]);
        assert_eq!(torn.intact, first as u64);
        let mut flipped = bytes.clone();
        flipped[80] ^= 1;
        assert_eq!(Ahead::parse(flipped).indices().count(), 0);
    }
}
