//! wal-tail: compresses the segment PostgreSQL is writing, 1 MiB at a time as each chunk is
//! written out, into the segment's "ahead" file of frames (`walframes`). archive_command then
//! still reads and hashes the whole segment, but takes each frame whose chunk is unchanged and
//! compresses only the rest: most of a push's CPU is done before PostgreSQL asks. wal-push
//! starts it detached after it acknowledges a segment; it follows the WAL from segment to
//! segment and leaves when no chunk was finished for `IDLE`.
//!
//! Nothing is acknowledged from what it writes. A frame only saves compressing a chunk whose
//! bytes, at that position, have the BLAKE3 chaining value the frame was compressed from, and
//! which the frame decodes to (`walframes`), so a chunk PostgreSQL wrote again after it was
//! compressed is simply compressed again. When a
//! chunk is finished is a guess that only decides how much work is saved: the first page of
//! the next chunk carries this segment's address (`xlp_pageaddr`), which a recycled or zeroed
//! file does not, and PostgreSQL writes WAL pages in order.

use crate::error::{Error, Result};
use crate::policy::Policy;
use crate::source::postgres::wal::{WalKind, WalName};
use crate::source::postgres::walframes::{self, Ahead, Compressing, CHUNK};
use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A tailer with no chunk to compress for this long leaves (the next push starts another).
const IDLE: Duration = Duration::from_secs(120);
/// How often the next chunk's first page is looked at (one 16-byte read).
const POLL: Duration = Duration::from_millis(20);
/// Segments with frames held at most (about 80 MiB of 16 MiB segments).
const MAX_FILES: usize = 16;
/// The tailer's niceness: it uses what CPU PostgreSQL and wal-push leave.
const NICE: i32 = 10;
/// Ahead files older than this are removed (their segment was archived or never will be).
const KEEP: Duration = Duration::from_secs(600);

fn dir(state_dir: &Path, policy: &str) -> PathBuf {
    state_dir.join("wal-tail").join(policy)
}

/// The ahead file of segment `name` (it may not exist).
pub fn ahead_file(state_dir: &Path, policy: &str, name: &str) -> PathBuf {
    dir(state_dir, policy).join(format!("{name}.frames"))
}

/// After segment `wal_path` was acknowledged: follow the WAL from the next segment, unless a
/// tailer is at work.
pub fn spawn(policy: &Policy, state_dir: &Path, wal_path: &Path) {
    let Some(name) = wal_path.file_name().and_then(|n| n.to_str()).and_then(WalName::parse) else { return };
    let Ok(len) = std::fs::metadata(wal_path).map(|m| m.len()) else { return };
    if name.kind() != WalKind::Segment || !walframes::chunked(len) {
        return;
    }
    let (Some(next), Some(parent)) = (name.next(len), wal_path.parent()) else { return };
    let wal_dir = if parent.is_absolute() {
        parent.to_path_buf()
    } else {
        match std::env::current_dir() {
            Ok(cwd) => cwd.join(parent),
            Err(_) => return,
        }
    };
    let d = dir(state_dir, &policy.name);
    if super::walahead::create_private(&d).is_err() || super::wal::try_lock(&d.join(".tail")).is_none() {
        return;
    }
    super::wal::spawn_detached(&[
        "--state-dir".as_ref(),
        state_dir.as_os_str(),
        "wal-tail".as_ref(),
        policy.path.as_os_str(),
        "--wal-dir".as_ref(),
        wal_dir.as_os_str(),
        "--from".as_ref(),
        next.as_str().as_ref(),
        "--segment-size".as_ref(),
        len.to_string().as_ref(),
    ]);
}

/// The hidden `wal-tail`: follow the WAL in `wal_dir` from segment `from`. Returns how many
/// chunks it compressed.
pub fn run(policy: &Policy, state_dir: &Path, wal_dir: &Path, from: &str, seg_size: u64) -> Result<usize> {
    let d = dir(state_dir, &policy.name);
    super::walahead::create_private(&d).map_err(|e| Error::io("create", &d, e))?;
    let Some(_lock) = super::wal::try_lock(&d.join(".tail")) else { return Ok(0) };
    // Work ahead yields to archive_command, which PostgreSQL waits for, and to PostgreSQL.
    // SAFETY: setpriority on this process only; a failure leaves the priority as it was.
    unsafe { nix::libc::setpriority(nix::libc::PRIO_PROCESS, 0, NICE) };
    let mut seg = WalName::parse(from)
        .filter(|n| n.kind() == WalKind::Segment && walframes::chunked(seg_size))
        .ok_or_else(|| Error::usage(format!("{} is not a segment wal-tail can follow", from.escape_debug())))?;
    let mut tail = Tail {
        dir: d,
        wal_dir: wal_dir.to_path_buf(),
        seg_size,
        idle: IDLE,
        last: Instant::now(),
        compressed: 0,
        zstd: None,
    };
    loop {
        tail.remove_old();
        if !tail.follow(&seg)? {
            return Ok(tail.compressed);
        }
        match seg.next(seg_size) {
            Some(n) => seg = n,
            None => return Ok(tail.compressed),
        }
    }
}

struct Tail {
    dir: PathBuf,
    wal_dir: PathBuf,
    seg_size: u64,
    /// How long to wait for a chunk before leaving.
    idle: Duration,
    /// When the last chunk was compressed or the last segment finished.
    last: Instant,
    compressed: usize,
    /// Buffers and zstd contexts, kept from chunk to chunk.
    zstd: Option<Compressing>,
}

impl Tail {
    /// Compress the chunks of `seg` as PostgreSQL finishes them. `Ok(true)`: the segment is
    /// finished, go on to the next; `Ok(false)`: idle for too long.
    fn follow(&mut self, seg: &WalName) -> Result<bool> {
        let out_path = self.dir.join(format!("{seg}.frames"));
        let held = Ahead::read(&out_path);
        let mut done: HashSet<u32> = held.indices().collect();
        let chunks = (self.seg_size / CHUNK) as u32;
        let next = seg.next(self.seg_size);
        let (Some(start), Some(next_start)) =
            (seg.start_lsn(self.seg_size), next.as_ref().and_then(|n| n.start_lsn(self.seg_size)))
        else {
            return Ok(false);
        };
        let (tli, status) = (seg.timeline(), self.wal_dir.join("archive_status"));
        let (mut file, mut out) = (None, None);
        loop {
            let next_begun = next.as_ref().is_some_and(|n| {
                std::fs::File::open(self.wal_dir.join(n.as_str())).is_ok_and(|f| page_at(&f, 0, next_start, tli))
            });
            let handed = ["ready", "done"].iter().any(|s| status.join(format!("{seg}.{s}")).exists());
            // The cluster is gone (dropped, moved): nothing to follow.
            if !self.wal_dir.is_dir() {
                return Ok(false);
            }
            if next_begun || handed {
                self.last = Instant::now();
                return Ok(true);
            }
            if file.is_none() {
                file = std::fs::File::open(self.wal_dir.join(seg.as_str())).ok();
            }
            // The last chunk is finished only with the segment: archive_command compresses it.
            let k = (0..chunks - 1).find(|k| !done.contains(k));
            if let (Some(f), Some(k)) = (&file, k) {
                let at = u64::from(k + 1) * CHUNK;
                if page_at(f, at, start + at, tli) && (out.is_some() || self.files() < MAX_FILES) {
                    if out.is_none() {
                        // Appended after the intact records: a record torn by a crash would
                        // hide every record after it.
                        let o = std::fs::OpenOptions::new().create(true).append(true).open(&out_path);
                        let o = o.and_then(|o| o.set_len(held.intact).map(|_| o));
                        out = Some(o.map_err(|e| Error::io("create", &out_path, e))?);
                    }
                    let o = out.as_mut().expect("opened above");
                    let c = match &mut self.zstd {
                        Some(c) => c,
                        None => self.zstd.insert(Compressing::new().map_err(|e| Error::io("compress", &out_path, e))?),
                    };
                    let made = walframes::compress_ahead(c, f, u64::from(k), o);
                    if made.map_err(|e| Error::io("write", &out_path, e))? {
                        self.compressed += 1;
                    }
                    done.insert(k);
                    self.last = Instant::now();
                    continue;
                }
            }
            if self.last.elapsed() > self.idle {
                return Ok(false);
            }
            std::thread::sleep(POLL);
        }
    }

    /// How many segments have frames held (an archiver that fell behind stops the tailer at
    /// `MAX_FILES`: wal-ahead catches up on a backlog, and the state directory stays small).
    fn files(&self) -> usize {
        let rd = std::fs::read_dir(&self.dir).into_iter().flatten().flatten();
        rd.filter(|e| e.file_name().to_string_lossy().ends_with(".frames")).count()
    }

    fn remove_old(&self) {
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let old = e.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok());
            if e.file_name().to_string_lossy().ends_with(".frames") && old.is_some_and(|a| a > KEEP) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Whether the WAL page at byte `at` of `f` was written for `lsn` on timeline `tli`: its header's
/// `xlp_tli` (bytes 4..8) and `xlp_pageaddr` (8..16) say so.
fn page_at(f: &std::fs::File, at: u64, lsn: u64, tli: u32) -> bool {
    let mut h = [0u8; 16];
    f.read_exact_at(&mut h, at).is_ok()
        && u32::from_le_bytes(h[4..8].try_into().expect("4 bytes")) == tli
        && u64::from_le_bytes(h[8..16].try_into().expect("8 bytes")) == lsn
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A segment being written: chunks are compressed as the next chunk's first page appears,
    /// the last chunk is left, and the push takes the frames and stores the same object.
    #[test]
    fn chunks_are_compressed_as_they_are_finished_and_the_push_takes_them() {
        let d = tempfile::tempdir().unwrap();
        let (wal, state) = (d.path().join("pg_wal"), d.path().join("state"));
        std::fs::create_dir_all(wal.join("archive_status")).unwrap();
        let seg_size = 4u64 << 20;
        let name = WalName::parse("000000010000000000000002").unwrap();
        let start = name.start_lsn(seg_size).unwrap();
        assert_eq!(start, 8 << 20);
        // A recycled file: pages of an older segment's addresses.
        let mut data = vec![0u8; seg_size as usize];
        let page = |data: &mut [u8], at: usize, lsn: u64| {
            data[at + 4..at + 8].copy_from_slice(&1u32.to_le_bytes());
            data[at + 8..at + 16].copy_from_slice(&lsn.to_le_bytes());
            for (i, b) in data[at + 16..at + 8192].iter_mut().enumerate() {
                *b = (i as u64 ^ lsn) as u8;
            }
        };
        for at in (0..seg_size as usize).step_by(8192) {
            page(&mut data, at, at as u64);
        }
        let path = wal.join(name.as_str());
        let write = |data: &[u8]| std::fs::write(&path, data).unwrap();
        // PostgreSQL has written 1.5 MiB: chunk 0 is finished, chunk 1 is not.
        for at in (0..(3 << 19)).step_by(8192) {
            page(&mut data, at, start + at as u64);
        }
        write(&data);
        let mut tail = Tail {
            dir: dir(&state, "db"),
            wal_dir: wal.clone(),
            seg_size,
            idle: Duration::from_millis(300),
            last: Instant::now(),
            compressed: 0,
            zstd: None,
        };
        std::fs::create_dir_all(&tail.dir).unwrap();
        assert!(!tail.follow(&name).unwrap(), "idle once nothing more is finished");
        assert_eq!(tail.compressed, 1);
        // The rest is written, and a chunk already compressed is written again (it must not be
        // reused); then the segment is handed to archive_command.
        for at in ((3 << 19)..seg_size as usize).step_by(8192) {
            page(&mut data, at, start + at as u64);
        }
        data[100] ^= 0xff;
        write(&data);
        // The first tailer died inside a record: the next one appends after the intact ones.
        let frames = ahead_file(&state, "db", name.as_str());
        let mut f = std::fs::OpenOptions::new().append(true).open(&frames).unwrap();
        std::io::Write::write_all(&mut f, &[1u8; 100]).unwrap();
        drop(f);
        (tail.idle, tail.last) = (Duration::from_secs(5), Instant::now());
        let ready = wal.join("archive_status").join(format!("{name}.ready"));
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(400));
            std::fs::write(ready, b"").unwrap();
        });
        assert!(tail.follow(&name).unwrap(), "finished once handed to archive_command");
        t.join().unwrap();
        assert_eq!(tail.compressed, 3, "chunks 1 and 2; the last chunk is left");
        let ahead = Ahead::read(&ahead_file(&state, "db", name.as_str()));
        let mut held: Vec<u32> = ahead.indices().collect();
        held.sort();
        assert_eq!(held, [0, 1, 2]);
        let head = data[..64].to_vec();
        let (fp, z, reused) = crate::source::postgres::archive::load(&path, &head, &ahead).unwrap();
        assert_eq!(reused, 2, "chunks 1 and 2 reused; chunk 0 changed after it was compressed");
        assert_eq!(fp, blake3::hash(&data).to_hex()[..32]);
        assert_eq!(zstd::stream::decode_all(&z[..]).unwrap(), data);
        let (fp0, z0, _) = crate::source::postgres::archive::load(&path, &head, &Ahead::default()).unwrap();
        assert_eq!((fp0, z0), (fp, z), "the same object as without the ahead file");
    }
}
