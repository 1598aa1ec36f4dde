//! Cutting a stream into chunks without copying them: the input is read in large buffers
//! straight into uninitialised capacity, and every chunk is a reference-counted slice of its
//! buffer (`Bytes`), so a chunk's bytes are never moved between the read and the compressor.
//! Only the tail of a buffer shorter than a maximal chunk is copied into the next one. Full
//! buffers come from a small pool shared by the files of a backup and are reused once every
//! chunk cut from them is done: fresh ones would each be faulted in and zeroed by the kernel
//! (14 % of a volume backup's CPU, measured).
//!
//! Content-defined boundaries are FastCDC 2020's (`cut_gear` over at most `max` bytes, or over
//! what is left at the end), exactly as the crate's `StreamCDC` cuts them: chunk ids of
//! existing repositories stay the same, so deduplication against them still holds.

use bytes::Bytes;
use std::io::Read;

/// Bytes read per buffer for content-defined chunks: many chunks per read, and the copied
/// tail a small share of it. Fixed chunks need no tail: four per buffer.
const BUFFER: usize = 16 << 20;

/// How many full buffers the pool keeps for reuse (more in flight are allocated afresh).
const POOLED: usize = 4;

/// Read buffers that outlive one file. A buffer is free again when no chunk cut from it is
/// alive (the pool then holds its only reference).
#[derive(Default)]
pub struct Pool(Vec<std::sync::Arc<Vec<u8>>>);

/// Lets `Bytes` slice a pooled buffer while the pool keeps a handle on it.
struct Shared(std::sync::Arc<Vec<u8>>);

impl AsRef<[u8]> for Shared {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Pool {
    /// An empty buffer of `cap` bytes' capacity: a free pooled one when there is one.
    fn take(&mut self, cap: usize) -> (Vec<u8>, bool) {
        if let Some(i) = self.0.iter().position(|b| std::sync::Arc::strong_count(b) == 1 && b.capacity() >= cap) {
            let arc = self.0.swap_remove(i);
            if let Ok(mut v) = std::sync::Arc::try_unwrap(arc) {
                v.clear();
                return (v, true);
            }
        }
        (Vec::with_capacity(cap), self.0.len() < POOLED)
    }

    /// Make `v` shareable as chunks; a pooled buffer is kept for later reuse.
    fn share(&mut self, v: Vec<u8>, pooled: bool) -> Bytes {
        if !pooled {
            return Bytes::from(v);
        }
        let arc = std::sync::Arc::new(v);
        self.0.push(arc.clone());
        Bytes::from_owner(Shared(arc))
    }
}

/// How the boundaries are found.
enum Cut {
    /// FastCDC with a keyed gear table (see `backup::gear_seed`).
    Cdc { min: u32, avg: u32, max: u32, seed: u64 },
    /// Fixed-size chunks (PostgreSQL relation files: page-aligned, never shifting).
    Fixed(u32),
}

/// An iterator of chunks over a reader.
pub struct Chunker<'p> {
    pool: &'p mut Pool,
    reader: Box<dyn Read + Send>,
    cut: Cut,
    buf: Bytes,
    pos: usize,
    eof: bool,
    failed: bool,
    /// The expected length (a file's size as walked): a small file gets a small buffer.
    hint: Option<u64>,
}

impl<'p> Chunker<'p> {
    pub fn cdc(pool: &'p mut Pool, reader: Box<dyn Read + Send>, min: u32, avg: u32, max: u32, seed: u64) -> Self {
        Chunker::new(pool, reader, Cut::Cdc { min, avg, max, seed })
    }

    pub fn fixed(pool: &'p mut Pool, reader: Box<dyn Read + Send>, size: u32) -> Self {
        Chunker::new(pool, reader, Cut::Fixed(size.max(1)))
    }

    fn new(pool: &'p mut Pool, reader: Box<dyn Read + Send>, cut: Cut) -> Self {
        Chunker { pool, reader, cut, buf: Bytes::new(), pos: 0, eof: false, failed: false, hint: None }
    }

    /// Size the first buffer for `len` bytes (one more, so that the end is seen at once).
    pub fn size_hint(mut self, len: u64) -> Self {
        self.hint = Some(len);
        self
    }

    fn max_chunk(&self) -> usize {
        match self.cut {
            Cut::Cdc { max, .. } => max as usize,
            Cut::Fixed(size) => size as usize,
        }
    }

    /// Make sure at least a maximal chunk is buffered, unless the input ends first.
    fn fill(&mut self) -> std::io::Result<()> {
        let want = self.max_chunk();
        if self.eof || self.buf.len() - self.pos >= want {
            return Ok(());
        }
        let full = match self.cut {
            Cut::Cdc { .. } => BUFFER.max(want * 4),
            Cut::Fixed(_) => want * 4,
        };
        let mut cap = full;
        if let Some(len) = self.hint.take() {
            cap = cap.min(len.saturating_add(1).try_into().unwrap_or(usize::MAX)).max(want);
        }
        // A small file gets a buffer of its own size, not a pooled one it would pin whole.
        let (mut next, pooled) = if cap == full { self.pool.take(cap) } else { (Vec::with_capacity(cap), false) };
        next.extend_from_slice(&self.buf[self.pos..]);
        // read_to_end fills the spare capacity without zeroing it first (and retries when
        // interrupted); `take` stops it at the buffer's end, so a short buffer means the input
        // has ended.
        let room = (cap - next.len()) as u64;
        (&mut self.reader).take(room).read_to_end(&mut next)?;
        if next.len() < cap {
            self.eof = true;
        }
        self.buf = self.pool.share(next, pooled);
        self.pos = 0;
        Ok(())
    }
}

impl Iterator for Chunker<'_> {
    type Item = std::io::Result<Bytes>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        if let Err(e) = self.fill() {
            self.failed = true;
            return Some(Err(e));
        }
        let left = self.buf.len() - self.pos;
        if left == 0 {
            return None;
        }
        let len = match self.cut {
            Cut::Fixed(size) => left.min(size as usize),
            Cut::Cdc { min, avg, max, seed } => {
                let window = &self.buf[self.pos..self.pos + left.min(max as usize)];
                cdc_cut(window, min, avg, max, seed)
            }
        };
        let chunk = self.buf.slice(self.pos..self.pos + len);
        self.pos += len;
        Some(Ok(chunk))
    }
}

/// The length of the next content-defined chunk at the start of `window` (at most `max`
/// bytes, or all that is left of the input).
fn cdc_cut(window: &[u8], min: u32, avg: u32, max: u32, seed: u64) -> usize {
    let cdc = fastcdc::v2020::FastCDC::with_level_and_seed(
        window,
        min,
        avg,
        max,
        fastcdc::v2020::Normalization::Level1,
        seed,
    );
    let (_, end) = cdc.cut(0, window.len());
    end.max(1).min(window.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that returns at most `step` bytes per call, to cross buffer edges anywhere.
    struct Dribble(std::io::Cursor<Vec<u8>>, usize);

    impl Read for Dribble {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.1);
            self.0.read(&mut buf[..n])
        }
    }

    fn data(len: usize) -> Vec<u8> {
        let mut x: u64 = 99;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 7) as u8 * 31
            })
            .collect()
    }

    #[test]
    fn content_defined_cuts_equal_the_crates_stream_chunker() {
        let d = data(40 << 20);
        let (min, avg, max, seed) = (256 << 10, 1 << 20, 4 << 20, 0x1234_5678_9abc_def1);
        let want: Vec<Vec<u8>> = fastcdc::v2020::StreamCDC::with_level_and_seed(
            std::io::Cursor::new(d.clone()),
            min,
            avg,
            max,
            fastcdc::v2020::Normalization::Level1,
            seed,
        )
        .map(|c| c.unwrap().data)
        .collect();
        assert!(want.len() > 20);
        for step in [usize::MAX, 1 << 20, 65_537] {
            let got: Vec<Bytes> = Chunker::cdc(
                &mut Pool::default(),
                Box::new(Dribble(std::io::Cursor::new(d.clone()), step)),
                min,
                avg,
                max,
                seed,
            )
            .map(|c| c.unwrap())
            .collect();
            assert_eq!(got.len(), want.len(), "read step {step}");
            assert!(got.iter().zip(&want).all(|(a, b)| a[..] == b[..]), "read step {step}");
        }
    }

    #[test]
    fn fixed_chunks_cover_the_input_and_end_short() {
        for len in [0, 1, 8192, (17 << 20) + 5] {
            let d = data(len);
            let got: Vec<Bytes> = Chunker::fixed(
                &mut Pool::default(),
                Box::new(Dribble(std::io::Cursor::new(d.clone()), 300_001)),
                1 << 20,
            )
            .map(|c| c.unwrap())
            .collect();
            assert_eq!(got.concat(), d);
            assert!(got.iter().rev().skip(1).all(|c| c.len() == 1 << 20));
        }
    }

    #[test]
    fn a_wrong_size_hint_changes_nothing() {
        let d = data(9 << 20);
        for hint in [0, 1000, 9 << 20, 10 << 20, u64::MAX] {
            let got: Vec<Bytes> = Chunker::cdc(
                &mut Pool::default(),
                Box::new(std::io::Cursor::new(d.clone())),
                256 << 10,
                1 << 20,
                4 << 20,
                5,
            )
            .size_hint(hint)
            .map(|c| c.unwrap())
            .collect();
            let want: Vec<Bytes> = Chunker::cdc(
                &mut Pool::default(),
                Box::new(std::io::Cursor::new(d.clone())),
                256 << 10,
                1 << 20,
                4 << 20,
                5,
            )
            .map(|c| c.unwrap())
            .collect();
            assert_eq!(got, want, "hint {hint}");
        }
    }

    #[test]
    fn pooled_buffers_are_reused_only_once_their_chunks_are_gone() {
        let mut pool = Pool::default();
        let d = data(12 << 20);
        let held: Vec<Bytes> =
            Chunker::fixed(&mut pool, Box::new(std::io::Cursor::new(d.clone())), 1 << 20).map(|c| c.unwrap()).collect();
        // Every chunk still alive: the next file gets new buffers, and the old bytes stay.
        let again: Vec<Bytes> = Chunker::fixed(&mut pool, Box::new(std::io::Cursor::new(vec![9u8; 12 << 20])), 1 << 20)
            .map(|c| c.unwrap())
            .collect();
        assert_eq!(held.concat(), d);
        assert!(again.iter().all(|c| c.iter().all(|&b| b == 9)));
        drop(again);
        // Those buffers are free now: reused, and what was held is still intact.
        let third: Vec<Bytes> = Chunker::fixed(&mut pool, Box::new(std::io::Cursor::new(vec![5u8; 12 << 20])), 1 << 20)
            .map(|c| c.unwrap())
            .collect();
        assert_eq!(held.concat(), d);
        assert!(third.iter().all(|c| c.iter().all(|&b| b == 5)));
        assert!(pool.0.len() <= POOLED);
    }

    #[test]
    fn a_read_error_ends_the_chunks() {
        struct Broken(usize);
        impl Read for Broken {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.0 == 0 {
                    return Err(std::io::Error::other("disk on fire"));
                }
                let n = buf.len().min(self.0);
                buf[..n].fill(7);
                self.0 -= n;
                Ok(n)
            }
        }
        let got: Vec<_> = Chunker::fixed(&mut Pool::default(), Box::new(Broken(20 << 20)), 1 << 20).collect();
        assert!(got.last().unwrap().is_err());
        assert!(got.iter().filter(|c| c.is_err()).count() == 1);
    }
}
