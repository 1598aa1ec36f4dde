//! Where restored bytes go. A fresh restore writes files of 1 MiB or more past the page cache
//! (`O_DIRECT`): on this project's machines, putting a page into the cache cost more than the
//! disk took to write it (2 GiB: 6.3 s through the cache with an fsync, 1.1 s direct), and the
//! cache only held bytes nothing would read again soon. Each write's aligned middle goes
//! straight to disk; the partial blocks at its ends wait in memory for the neighbouring
//! chunk's bytes and go out whole, so no block is written both ways. Smaller files, and
//! `--delta` (which writes parts of existing files), go through the page cache.

use super::safe_dir::SafeDir;
use crate::error::{Error, Result};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Where restored bytes go: a file path per index, or a sink for verification only.
pub trait Sink: Send + Sync {
    fn write(&self, file: usize, offset: u64, data: &[u8]) -> Result<()>;
    /// After the last write: anything the sink still holds is written out.
    fn finish(&self) -> Result<()> {
        Ok(())
    }
}

/// Discards the bytes: used by `verify --read-data`, which only needs the checks.
pub struct NullSink;

impl Sink for NullSink {
    fn write(&self, _: usize, _: u64, _: &[u8]) -> Result<()> {
        Ok(())
    }
}

/// The alignment of direct writes, in offset, length and memory: a page, which the logical
/// block size of the disks this runs on divides (`SafeDir::open_direct` checks the file).
pub(crate) const ALIGN: usize = 4096;
/// Files below this go through the page cache: their bytes are mostly partial blocks, and a
/// directory of small files costs file creations, not page copies.
const MIN_DIRECT: u64 = 1 << 20;
/// A worker thread's aligned scratch, which the middle of a write is copied through.
const SCRATCH_BLOCKS: usize = 256;
/// Partial blocks one file may hold in memory: past this the oldest goes out as it is (its
/// missing bytes are the sparse file's zeroes, and a later write reads it back first), so a
/// crafted layout of tiny chunks cannot make a restore hold a block per byte.
const MAX_PENDING: usize = 1024;

#[repr(C, align(4096))]
#[derive(Clone)]
struct Block([u8; ALIGN]);

/// A partial block waiting for the rest of its bytes, and which of them it has.
struct Pending {
    block: Box<Block>,
    filled: [u64; ALIGN / 64],
}

enum State {
    /// Nothing written yet: the first write decides.
    New,
    Buffered,
    Direct(Direct),
}

/// A file written past the page cache.
struct Direct {
    pending: BTreeMap<u64, Pending>,
    /// Blocks already on disk, as ranges `start..end` by start.
    written: BTreeMap<u64, u64>,
    /// The file's length once restored: its recorded size, or the end of a write beyond it.
    len: u64,
    /// A last block written whole made the file longer than `len`; it is cut back at the end.
    padded: bool,
}

/// Writes into files under a target directory, through its no-follow handles.
pub struct FileSink {
    dir: Arc<SafeDir>,
    /// Each file's path relative to the target.
    paths: Vec<PathBuf>,
    /// Each file's size where its writes may go direct (files created fresh); empty: none do.
    sizes: Vec<u64>,
    /// One writer per file at a time: concurrent pwrites into one large file make the kernel
    /// spin on its inode lock (a 2.7 GB PostgreSQL restore spent twice its time in the kernel).
    files: Vec<Mutex<State>>,
}

impl FileSink {
    /// Every write through the page cache (`--delta` rewrites parts of files in place).
    pub fn new(dir: Arc<SafeDir>, paths: Vec<PathBuf>) -> FileSink {
        FileSink::fresh(dir, paths, Vec::new())
    }

    /// Files just created with these sizes: the large ones are written direct (a size of 0
    /// keeps a file in the page cache).
    pub fn fresh(dir: Arc<SafeDir>, paths: Vec<PathBuf>, sizes: Vec<u64>) -> FileSink {
        let files = paths.iter().map(|_| Mutex::new(State::New)).collect();
        FileSink { dir, paths, sizes, files }
    }

    fn direct_file(&self, file: usize) -> Result<std::fs::File> {
        self.dir.open_direct(&self.paths[file], ALIGN)?.ok_or_else(|| {
            Error::failed(format!("{} no longer takes direct writes", self.dir.full(&self.paths[file]).display()))
        })
    }

    fn io(&self, file: usize, e: std::io::Error) -> Error {
        Error::io("write", &self.dir.full(&self.paths[file]), e)
    }
}

impl Sink for FileSink {
    fn write(&self, file: usize, offset: u64, data: &[u8]) -> Result<()> {
        let mut st = self.files[file].lock().unwrap_or_else(|e| e.into_inner());
        // The first write decides, and the handle it opened serves that write too.
        let mut opened = None;
        if let State::New = *st {
            let size = self.sizes.get(file).copied().filter(|&s| s >= MIN_DIRECT);
            opened = match size {
                Some(_) => self.dir.open_direct(&self.paths[file], ALIGN)?,
                None => None,
            };
            *st = match (size, &opened) {
                (Some(len), Some(_)) => {
                    State::Direct(Direct { pending: BTreeMap::new(), written: BTreeMap::new(), len, padded: false })
                }
                _ => State::Buffered,
            };
        }
        match &mut *st {
            State::Direct(d) => {
                let f = match opened {
                    Some(f) => f,
                    None => self.direct_file(file)?,
                };
                d.write(&f, offset, data).map_err(|e| self.io(file, e))
            }
            _ => self.dir.write_at(&self.paths[file], offset, data),
        }
    }

    fn finish(&self) -> Result<()> {
        for (i, st) in self.files.iter().enumerate() {
            let mut st = st.lock().unwrap_or_else(|e| e.into_inner());
            if let State::Direct(d) = &mut *st {
                if !d.pending.is_empty() || d.padded {
                    let f = self.direct_file(i)?;
                    d.finish(&f).map_err(|e| self.io(i, e))?;
                }
            }
        }
        Ok(())
    }
}

thread_local! {
    static SCRATCH: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

impl Direct {
    fn write(&mut self, f: &std::fs::File, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let a = ALIGN as u64;
        if data.is_empty() {
            return Ok(());
        }
        let end = offset.checked_add(data.len() as u64).filter(|&e| e <= u64::MAX - a).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "a write beyond the largest file offset")
        })?;
        self.len = self.len.max(end);
        let (first, last) = (offset.next_multiple_of(a), end / a * a);
        if first < last {
            let (head, rest) = data.split_at((first - offset) as usize);
            let (middle, tail) = rest.split_at((last - first) as usize);
            write_aligned(f, first, middle)?;
            // A block waiting there (bytes written twice) would go out later over these.
            let stale: Vec<u64> = self.pending.range(first / a..last / a).map(|(&k, _)| k).collect();
            for k in stale {
                self.pending.remove(&k);
            }
            self.mark(first / a, last / a);
            self.merge(f, offset, head)?;
            self.merge(f, last, tail)
        } else {
            self.merge(f, offset, data)
        }
    }

    /// Put `bytes` (at file offset `at`, within at most two blocks) into their pending
    /// blocks, and write out each block that is then complete.
    fn merge(&mut self, f: &std::fs::File, mut at: u64, mut bytes: &[u8]) -> std::io::Result<()> {
        let a = ALIGN as u64;
        while !bytes.is_empty() {
            let k = at / a;
            let from = (at % a) as usize;
            let n = bytes.len().min(ALIGN - from);
            if !self.pending.contains_key(&k) {
                let mut p = Pending { block: Box::new(Block([0; ALIGN])), filled: [0; ALIGN / 64] };
                // A block already on disk (a crafted manifest writing the same bytes twice) is
                // read back first, so the rewrite changes only the bytes written now.
                if self.is_written(k) {
                    // One aligned read: a short one is the end of the file (the rest stays zero),
                    // and reading on from a ragged offset is not allowed past the page cache.
                    f.read_at(&mut p.block.0, k * a)?;
                    p.filled = [u64::MAX; ALIGN / 64];
                }
                if self.pending.len() >= MAX_PENDING {
                    let oldest = *self.pending.keys().next().expect("not empty");
                    self.flush(f, oldest)?;
                }
                self.pending.insert(k, p);
            }
            let p = self.pending.get_mut(&k).expect("inserted above");
            p.block.0[from..from + n].copy_from_slice(&bytes[..n]);
            fill(&mut p.filled, from, from + n);
            let want = (self.len - k * a).min(a) as usize;
            if filled(&p.filled, want) {
                self.flush(f, k)?;
            }
            at += n as u64;
            bytes = &bytes[n..];
        }
        Ok(())
    }

    fn flush(&mut self, f: &std::fs::File, k: u64) -> std::io::Result<()> {
        let a = ALIGN as u64;
        let Some(p) = self.pending.remove(&k) else { return Ok(()) };
        f.write_all_at(&p.block.0, k * a)?;
        self.padded |= (k + 1) * a > self.len;
        self.mark(k, k + 1);
        Ok(())
    }

    /// Write out every block still pending (bytes never written are zeroes, as they read in
    /// the new sparse file), then cut the file to its length.
    fn finish(&mut self, f: &std::fs::File) -> std::io::Result<()> {
        let ks: Vec<u64> = self.pending.keys().copied().collect();
        for k in ks {
            self.flush(f, k)?;
        }
        if self.padded {
            f.set_len(self.len)?;
            self.padded = false;
        }
        Ok(())
    }

    fn is_written(&self, k: u64) -> bool {
        self.written.range(..=k).next_back().is_some_and(|(_, &end)| k < end)
    }

    /// Record blocks `start..end` as on disk, merging touching ranges.
    fn mark(&mut self, mut start: u64, mut end: u64) {
        if let Some((&s, &e)) = self.written.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        while let Some((&s, &e)) = self.written.range(start..).next() {
            if s > end {
                break;
            }
            end = end.max(e);
            self.written.remove(&s);
        }
        self.written.insert(start, end);
    }
}

/// Write `bytes` (a whole number of blocks, at an aligned offset) through the thread's
/// aligned scratch: the decompressed chunk itself sits at whatever address its buffer has.
pub(crate) fn write_aligned(f: &std::fs::File, at: u64, bytes: &[u8]) -> std::io::Result<()> {
    SCRATCH.with_borrow_mut(|scratch| {
        if scratch.is_empty() {
            *scratch = vec![Block([0; ALIGN]); SCRATCH_BLOCKS];
        }
        // SAFETY: Block is repr(C) around [u8; ALIGN]: the Vec's blocks are one contiguous,
        // initialised run of `len * ALIGN` bytes, borrowed mutably here and nowhere else.
        let buf = unsafe { std::slice::from_raw_parts_mut(scratch.as_mut_ptr().cast::<u8>(), scratch.len() * ALIGN) };
        let mut done = 0;
        for piece in bytes.chunks(buf.len()) {
            buf[..piece.len()].copy_from_slice(piece);
            f.write_all_at(&buf[..piece.len()], at + done)?;
            done += piece.len() as u64;
        }
        Ok(())
    })
}

fn fill(bits: &mut [u64; ALIGN / 64], from: usize, to: usize) {
    for i in from..to {
        bits[i / 64] |= 1 << (i % 64);
    }
}

/// Whether bytes `0..want` are all there.
fn filled(bits: &[u64; ALIGN / 64], want: usize) -> bool {
    (0..want).all(|i| bits[i / 64] >> (i % 64) & 1 == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes in any order and split anywhere, through the direct path, give the bytes a plain
    /// write would: the partial blocks meet in memory, the last block is cut back.
    #[test]
    fn direct_writes_in_pieces_rebuild_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Arc::new(SafeDir::open(tmp.path()).unwrap());
        let size = (3 << 20) + 1234;
        let data: Vec<u8> = (0..size).map(|i| (i * 7 + i / 4099) as u8).collect();
        for (name, cuts) in [
            ("aligned", vec![0, 1 << 20, 2 << 20, 3 << 20]),
            ("ragged", vec![0, 5, 4095, 4097, 700_001, 1_000_000, 1_000_003, 2_999_999, size - 1]),
        ] {
            let rel = PathBuf::from(name);
            dir.create_file(&rel, size as u64, false).unwrap();
            let direct = dir.open_direct(&rel, ALIGN).unwrap().is_some();
            let sink = FileSink::fresh(dir.clone(), vec![rel.clone()], vec![size as u64]);
            let mut bounds = cuts.clone();
            bounds.push(size);
            let mut pieces: Vec<(usize, usize)> = bounds.windows(2).map(|w| (w[0], w[1])).collect();
            pieces.reverse();
            let mid = pieces.len() / 2;
            pieces.swap(0, mid);
            for (a, b) in pieces {
                sink.write(0, a as u64, &data[a..b]).unwrap();
            }
            sink.finish().unwrap();
            let got = std::fs::read(tmp.path().join(name)).unwrap();
            assert_eq!(got.len(), size, "{name}: length (direct: {direct})");
            assert!(got == data, "{name}: the bytes differ (direct: {direct})");
        }
    }

    /// A crafted layout writing some bytes twice rewrites only those bytes, as a plain write does.
    #[test]
    fn a_block_written_twice_keeps_its_other_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Arc::new(SafeDir::open(tmp.path()).unwrap());
        let rel = PathBuf::from("f");
        let size = 2 << 20;
        dir.create_file(&rel, size, false).unwrap();
        let sink = FileSink::fresh(dir.clone(), vec![rel], vec![size]);
        sink.write(0, 0, &vec![1u8; size as usize]).unwrap();
        sink.write(0, 10, &[9u8; 5]).unwrap();
        sink.finish().unwrap();
        let got = std::fs::read(tmp.path().join("f")).unwrap();
        let mut want = vec![1u8; size as usize];
        want[10..15].fill(9);
        assert!(got == want);
    }

    /// Writes as `writes`, through the direct path, give the bytes of the same plain writes.
    fn same_as_plain(size: u64, writes: &[(u64, Vec<u8>)]) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Arc::new(SafeDir::open(tmp.path()).unwrap());
        let rel = PathBuf::from("f");
        dir.create_file(&rel, size, false).unwrap();
        let sink = FileSink::fresh(dir.clone(), vec![rel], vec![size]);
        let mut want = vec![0u8; size as usize];
        for (at, bytes) in writes {
            sink.write(0, *at, bytes).unwrap();
            // A plain write of nothing does not lengthen a file either.
            if bytes.is_empty() {
                continue;
            }
            let end = *at as usize + bytes.len();
            if want.len() < end {
                want.resize(end, 0);
            }
            want[*at as usize..end].copy_from_slice(bytes);
        }
        sink.finish().unwrap();
        let got = std::fs::read(tmp.path().join("f")).unwrap();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "the bytes differ");
    }

    /// A partial block waiting in memory does not go out later over a direct write of it.
    #[test]
    fn a_pending_block_rewritten_direct_is_dropped() {
        same_as_plain(2 << 20, &[(4096, vec![5; 10]), (4096, vec![6; 8192])]);
    }

    /// An empty write (a zero-length chunk past the end) does not lengthen the file.
    #[test]
    fn an_empty_write_past_the_end_changes_nothing() {
        let size = (1 << 20) + 100;
        same_as_plain(size, &[(0, vec![3; size as usize]), (2 << 20, vec![])]);
    }

    /// More partial blocks than a file may hold: the oldest go out early and are read back
    /// when the rest of their bytes arrive.
    #[test]
    fn pending_blocks_beyond_the_cap_still_rebuild_the_file() {
        let n = MAX_PENDING as u64 * 2;
        let mut writes: Vec<(u64, Vec<u8>)> = (0..n).map(|k| (k * 4096, vec![k as u8 ^ 0x55])).collect();
        writes.extend((0..n).map(|k| (k * 4096 + 1, vec![k as u8; 4095])));
        same_as_plain(n * 4096, &writes);
    }

    #[test]
    fn written_ranges_merge() {
        let mut d = Direct { pending: BTreeMap::new(), written: BTreeMap::new(), len: 0, padded: false };
        d.mark(5, 7);
        d.mark(1, 2);
        d.mark(2, 5);
        d.mark(9, 10);
        assert_eq!(d.written.iter().map(|(&s, &e)| (s, e)).collect::<Vec<_>>(), vec![(1, 7), (9, 10)]);
        assert!(d.is_written(1) && d.is_written(6) && !d.is_written(7) && d.is_written(9) && !d.is_written(0));
    }
}
