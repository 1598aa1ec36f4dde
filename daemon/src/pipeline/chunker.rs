//! Cutting a stream into chunks without copying them: the input is read in large buffers
//! straight into uninitialised capacity, and every chunk is a reference-counted slice of its
//! buffer (`Bytes`), so a chunk's bytes are never moved between the read and the compressor.
//! Only the tail of a buffer shorter than a maximal chunk is copied into the next one.
//!
//! Content-defined boundaries are FastCDC 2020's (`cut_gear` over at most `max` bytes, or over
//! what is left at the end), exactly as the crate's `StreamCDC` cuts them: chunk ids of
//! existing repositories stay the same, so deduplication against them still holds.

use bytes::Bytes;
use std::io::Read;

/// Bytes read per buffer: many chunks per read, and the copied tail a small share of it.
const BUFFER: usize = 16 << 20;

/// How the boundaries are found.
enum Cut {
    /// FastCDC with a keyed gear table (see `backup::gear_seed`).
    Cdc { min: u32, avg: u32, max: u32, seed: u64 },
    /// Fixed-size chunks (PostgreSQL relation files: page-aligned, never shifting).
    Fixed(u32),
}

/// An iterator of chunks over a reader.
pub struct Chunker {
    reader: Box<dyn Read + Send>,
    cut: Cut,
    buf: Bytes,
    pos: usize,
    eof: bool,
    failed: bool,
    /// The expected length (a file's size as walked): a small file gets a small buffer.
    hint: Option<u64>,
}

impl Chunker {
    pub fn cdc(reader: Box<dyn Read + Send>, min: u32, avg: u32, max: u32, seed: u64) -> Chunker {
        Chunker::new(reader, Cut::Cdc { min, avg, max, seed })
    }

    pub fn fixed(reader: Box<dyn Read + Send>, size: u32) -> Chunker {
        Chunker::new(reader, Cut::Fixed(size.max(1)))
    }

    fn new(reader: Box<dyn Read + Send>, cut: Cut) -> Chunker {
        Chunker { reader, cut, buf: Bytes::new(), pos: 0, eof: false, failed: false, hint: None }
    }

    /// Size the first buffer for `len` bytes (one more, so that the end is seen at once).
    pub fn size_hint(mut self, len: u64) -> Chunker {
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
        let mut cap = BUFFER.max(want * 4);
        if let Some(len) = self.hint.take() {
            cap = cap.min(len.saturating_add(1).try_into().unwrap_or(usize::MAX)).max(want);
        }
        let mut next = Vec::with_capacity(cap);
        next.extend_from_slice(&self.buf[self.pos..]);
        // read_to_end fills the spare capacity without zeroing it first (and retries when
        // interrupted); `take` stops it at the buffer's end, so a short buffer means the input
        // has ended.
        let room = (cap - next.len()) as u64;
        (&mut self.reader).take(room).read_to_end(&mut next)?;
        if next.len() < cap {
            self.eof = true;
        }
        self.buf = Bytes::from(next);
        self.pos = 0;
        Ok(())
    }
}

impl Iterator for Chunker {
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
            let got: Vec<Bytes> =
                Chunker::cdc(Box::new(Dribble(std::io::Cursor::new(d.clone()), step)), min, avg, max, seed)
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
            let got: Vec<Bytes> = Chunker::fixed(Box::new(Dribble(std::io::Cursor::new(d.clone()), 300_001)), 1 << 20)
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
            let got: Vec<Bytes> =
                Chunker::cdc(Box::new(std::io::Cursor::new(d.clone())), 256 << 10, 1 << 20, 4 << 20, 5)
                    .size_hint(hint)
                    .map(|c| c.unwrap())
                    .collect();
            let want: Vec<Bytes> =
                Chunker::cdc(Box::new(std::io::Cursor::new(d.clone())), 256 << 10, 1 << 20, 4 << 20, 5)
                    .map(|c| c.unwrap())
                    .collect();
            assert_eq!(got, want, "hint {hint}");
        }
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
        let got: Vec<_> = Chunker::fixed(Box::new(Broken(20 << 20)), 1 << 20).collect();
        assert!(got.last().unwrap().is_err());
        assert!(got.iter().filter(|c| c.is_err()).count() == 1);
    }
}
