//! The backup engine: reads files on one thread, compresses and encrypts on a worker per
//! core, gathers blobs into packs, and uploads packs in parallel. Memory is bounded by the
//! channel depths and the number of packs in flight (`upload-concurrency` × `pack-size`).

use super::{chunk_id, seal_blob};
use crate::error::{Error, Result};
use crate::repository::format::*;
use crate::repository::Writer;
use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    pub chunker: ChunkerParams,
    pub pack_size: usize,
    pub level: i32,
    pub uploads: usize,
    /// Packs larger than this go up as multipart uploads.
    pub multipart_threshold: usize,
    /// Cut fixed-size chunks instead of content-defined ones (page-structured files such as
    /// PostgreSQL relations never shift, so CDC's cost buys nothing there).
    pub fixed_chunks: Option<u32>,
    /// Fail on a file that cannot be read (PostgreSQL: a copy missing one is no backup);
    /// only a file that vanished is skipped. Otherwise unreadable files are warnings.
    pub strict_reads: bool,
    /// PostgreSQL with data checksums: the backup's start LSN. Pages of relation files older
    /// than it are checked (`source::postgres::pagecheck`).
    pub page_check_lsn: Option<u64>,
}

/// The FastCDC gear seed of a chunk-id key. Boundaries then depend on a secret: chunk (and so
/// blob) sizes in a pack no longer reveal which known file was backed up, as unkeyed
/// content-defined chunking would (a confirmation-of-file attack despite keyed ids).
pub fn gear_seed(key: &[u8; 32]) -> u64 {
    let h = blake3::keyed_hash(key, b"veza-dr fastcdc gear seed");
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes")) | 1
}

/// Cuts a reader into chunks: content-defined (FastCDC, its gear table keyed by `key`) or
/// fixed-size. Each chunk is a slice of a large read buffer: no copy (`chunker`).
pub fn chunks<'p>(
    pool: &'p mut super::chunker::Pool,
    reader: Box<dyn Read + Send>,
    p: ChunkerParams,
    fixed: Option<u32>,
    key: &[u8; 32],
) -> super::chunker::Chunker<'p> {
    match fixed {
        None => super::chunker::Chunker::cdc(pool, reader, p.min, p.avg, p.max, gear_seed(key)),
        Some(size) => super::chunker::Chunker::fixed(pool, reader, size),
    }
}

/// Counters read by the progress display and the job history.
#[derive(Debug, Default)]
pub struct Progress {
    pub bytes_total: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_uploaded: AtomicU64,
    pub files_read: AtomicU64,
}

/// Something to read: a file on disk, or a stream (e.g. pg_dump output).
pub enum Input {
    Path(PathBuf),
    Stream(Box<dyn Read + Send>),
}

pub struct ReadJob {
    pub idx: usize,
    pub input: Input,
    /// The file's metadata as walked, to detect change while reading.
    pub size: u64,
    pub mtime_ns: i128,
    /// A relation segment's first block number, when its pages are to be checked.
    pub first_block: Option<u64>,
    /// Store only the pages changed since the parent (`pages`), not changed chunks.
    pub layer: Option<super::pages::LayerJob>,
    /// Record a digest per 8 KiB page (relation files), for page-level delta restores.
    pub digests: bool,
}

#[derive(Debug, Default)]
pub struct ReadResult {
    pub idx: usize,
    pub chunks: Vec<ChunkId>,
    pub hash: [u8; 32],
    pub size: u64,
    pub changed: bool,
    /// The file could not be read (vanished, permission): a warning, not a failure.
    pub skipped: Option<String>,
    /// Blocks whose page checksum failed.
    pub bad_pages: Vec<u64>,
    /// For a layer job: the blobs of the changed pages and their page runs (`chunks` is then
    /// empty: the parent's base and layers stand for the rest).
    pub layer: Option<super::pages::IdLayer>,
    /// The blob of the file's page digests, when they were asked for.
    pub digests: Option<ChunkId>,
}

#[derive(Debug)]
pub struct EngineOutput {
    pub results: Vec<ReadResult>,
    pub new_locs: HashMap<ChunkId, BlobLoc>,
    pub chunks_new: u64,
    pub bytes_new: u64,
    pub bytes_uploaded: u64,
    pub packs: Vec<(PackId, u64)>,
}

struct Work {
    id: ChunkId,
    data: Bytes,
}

struct Sealed {
    id: ChunkId,
    raw_len: u32,
    blob: Vec<u8>,
}

/// Run the engine on `jobs`. Blocking: call from a blocking thread; uploads run on `rt`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    rt: tokio::runtime::Handle,
    writer: Writer,
    cfg: EngineConfig,
    key: [u8; 32],
    known: HashSet<ChunkId>,
    jobs: Vec<ReadJob>,
    progress: Arc<Progress>,
) -> Result<EngineOutput> {
    let sealer = writer.sealer().clone();
    let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).max(1);
    let (work_tx, work_rx) = crossbeam_channel::bounded::<Work>(workers * 2);
    let (sealed_tx, sealed_rx) = crossbeam_channel::bounded::<Sealed>(workers * 2);
    let failed = Arc::new(AtomicBool::new(false));
    let first_error: Arc<Mutex<Option<Error>>> = Arc::default();
    let fail = {
        let failed = failed.clone();
        let first_error = first_error.clone();
        move |e: Error| {
            failed.store(true, Ordering::SeqCst);
            let mut g = first_error.lock().expect("not poisoned");
            if g.is_none() {
                *g = Some(e);
            }
        }
    };

    let out = std::thread::scope(|s| {
        let mut worker_handles = Vec::new();
        for _ in 0..workers {
            let rx = work_rx.clone();
            let tx = sealed_tx.clone();
            let mut sealer = crate::crypto::BlobSealer::new(sealer.clone());
            let fail = fail.clone();
            worker_handles.push(s.spawn(move || {
                let mut scratch = Vec::new();
                let mut zc = match zstd::bulk::Compressor::new(cfg.level) {
                    Ok(z) => z,
                    Err(e) => return fail(Error::failed(format!("cannot start zstd: {e}"))),
                };
                for w in rx {
                    match seal_blob(&mut sealer, &mut zc, &mut scratch, &w.data) {
                        Ok(blob) => {
                            if tx.send(Sealed { id: w.id, raw_len: w.data.len() as u32, blob }).is_err() {
                                return;
                            }
                        }
                        Err(e) => return fail(e),
                    }
                }
            }));
        }
        drop(work_rx);
        drop(sealed_tx);

        let packer = {
            let fail = fail.clone();
            let failed = failed.clone();
            let progress = progress.clone();
            s.spawn(move || pack_and_upload(rt, writer, cfg, sealed_rx, progress, failed, fail))
        };

        let results = read_all(jobs, &key, known, &cfg, &work_tx, &progress, &failed, &fail);
        drop(work_tx);
        for h in worker_handles {
            let _ = h.join();
        }
        let packed = packer.join().unwrap_or_default();
        (results, packed)
    });

    if let Some(e) = first_error.lock().expect("not poisoned").take() {
        return Err(e);
    }
    let (results, packed) = out;
    Ok(EngineOutput { results, ..packed })
}

#[allow(clippy::too_many_arguments)]
fn read_all(
    jobs: Vec<ReadJob>,
    key: &[u8; 32],
    mut known: HashSet<ChunkId>,
    cfg: &EngineConfig,
    tx: &crossbeam_channel::Sender<Work>,
    progress: &Progress,
    failed: &AtomicBool,
    fail: &(impl Fn(Error) + Clone),
) -> Vec<ReadResult> {
    let mut results = Vec::with_capacity(jobs.len());
    let mut pool = super::chunker::Pool::default();
    for job in jobs {
        if failed.load(Ordering::SeqCst) {
            break;
        }
        let mut r = ReadResult { idx: job.idx, ..Default::default() };
        let (reader, path): (Box<dyn Read + Send>, Option<PathBuf>) = match job.input {
            Input::Path(p) => match std::fs::File::open(&p) {
                Ok(f) => (Box::new(f), Some(p)),
                Err(e) if cfg.strict_reads && e.kind() != std::io::ErrorKind::NotFound => {
                    fail(Error::io("read", &p, e).with_hint(
                        "a physical backup needs every file of the data directory: run it as root or the data directory's owner",
                    ));
                    break;
                }
                Err(e) => {
                    r.skipped = Some(format!("cannot read {}: {e}", p.display()));
                    results.push(r);
                    continue;
                }
            },
            Input::Stream(s) => (s, None),
        };
        // The file's hash is BLAKE3 over its chunk ids: it pins the content (each id is a keyed
        // hash of its chunk) without a second pass over the data.
        let mut hasher = blake3::Hasher::new();
        let mut ok = true;
        let mut layering = job.layer.as_ref().map(super::pages::Layering::new);
        let mut layer_ids = Vec::new();
        let mut digests = Vec::new();
        // A blob of changed pages goes to the workers like a chunk.
        let send = |data: Vec<u8>, ids: &mut Vec<ChunkId>, known: &mut HashSet<ChunkId>| -> bool {
            let id = chunk_id(key, &data);
            ids.push(id);
            !known.insert(id) || tx.send(Work { id, data: Bytes::from(data) }).is_ok()
        };
        for c in chunks(&mut pool, reader, cfg.chunker, cfg.fixed_chunks, key).size_hint(job.size) {
            let c = match c {
                Ok(c) => c,
                Err(e) => {
                    match &path {
                        Some(p) if cfg.strict_reads => fail(Error::io("read", p, e)),
                        Some(p) => r.skipped = Some(format!("cannot read {}: {e}", p.display())),
                        None => fail(Error::failed(format!("cannot read stream: {e}"))),
                    }
                    ok = false;
                    break;
                }
            };
            if let (Some(first), Some(lsn)) = (job.first_block, cfg.page_check_lsn) {
                // Chunks are fixed and page-aligned for relation files: block = offset / 8 KiB.
                let at = first + r.size / crate::source::postgres::pagecheck::BLCKSZ as u64;
                r.bad_pages.extend(crate::source::postgres::pagecheck::failing_pages(&c, at, lsn));
            }
            let id = if job.digests { super::pages::id_and_digests(key, &c, &mut digests) } else { chunk_id(key, &c) };
            hasher.update(&id);
            let off = r.size;
            r.size += c.len() as u64;
            progress.bytes_read.fetch_add(c.len() as u64, Ordering::Relaxed);
            if let Some(l) = layering.as_mut() {
                let mut sent = true;
                l.add(&c, off, |blob| sent &= send(blob, &mut layer_ids, &mut known));
                if !sent {
                    ok = false;
                    break;
                }
                continue;
            }
            r.chunks.push(id);
            if known.insert(id) && tx.send(Work { id, data: c }).is_err() {
                ok = false;
                break;
            }
        }
        if let Some(mut l) = layering.filter(|_| ok) {
            let mut sent = true;
            l.finish(|blob| sent = send(blob, &mut layer_ids, &mut known));
            ok &= sent;
            r.layer = Some((std::mem::take(&mut layer_ids), l.runs));
        }
        if ok && !digests.is_empty() {
            let mut ids = Vec::with_capacity(1);
            ok &= send(digests, &mut ids, &mut known);
            r.digests = ids.pop();
        }
        if !ok && r.skipped.is_none() {
            break;
        }
        r.hash = *hasher.finalize().as_bytes();
        if let Some(p) = &path {
            // Changed while read: size or mtime moved, or we read a different length.
            r.changed = match std::fs::symlink_metadata(p) {
                Ok(m) => m.len() != job.size || mtime_ns(&m) != job.mtime_ns || r.size != job.size,
                Err(_) => true,
            };
        }
        progress.files_read.fetch_add(1, Ordering::Relaxed);
        results.push(r);
    }
    results
}

pub fn mtime_ns(m: &std::fs::Metadata) -> i128 {
    m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128
}

#[derive(Default)]
struct Packed {
    new_locs: HashMap<ChunkId, BlobLoc>,
    chunks_new: u64,
    bytes_new: u64,
    bytes_uploaded: u64,
    packs: Vec<(PackId, u64)>,
}

impl From<Packed> for EngineOutput {
    fn from(p: Packed) -> Self {
        EngineOutput {
            new_locs: p.new_locs,
            chunks_new: p.chunks_new,
            bytes_new: p.bytes_new,
            bytes_uploaded: p.bytes_uploaded,
            packs: p.packs,
            results: vec![],
        }
    }
}

impl Default for EngineOutput {
    fn default() -> Self {
        Packed::default().into()
    }
}

#[allow(clippy::too_many_arguments)]
fn pack_and_upload(
    rt: tokio::runtime::Handle,
    writer: Writer,
    cfg: EngineConfig,
    rx: crossbeam_channel::Receiver<Sealed>,
    progress: Arc<Progress>,
    failed: Arc<AtomicBool>,
    fail: impl Fn(Error) + Clone + Send + 'static,
) -> EngineOutput {
    let sem = Arc::new(tokio::sync::Semaphore::new(cfg.uploads));
    let mut tasks = Vec::new();
    let mut out = Packed::default();
    // A pack is kept as its list of blobs: no copy into one buffer before the upload.
    let mut buf: Vec<Bytes> = Vec::new();
    let mut buf_len = 0u64;
    let mut hasher = blake3::Hasher::new();
    let mut entries: Vec<(ChunkId, u64, u32, u32)> = Vec::new();

    let mut flush = |buf: &mut Vec<Bytes>,
                     buf_len: &mut u64,
                     hasher: &mut blake3::Hasher,
                     entries: &mut Vec<(ChunkId, u64, u32, u32)>,
                     out: &mut Packed| {
        if buf.is_empty() {
            return;
        }
        let data = std::mem::take(buf);
        let size = std::mem::take(buf_len);
        let pack: PackId = *std::mem::take(hasher).finalize().as_bytes();
        let index = PackIndex {
            chunks: entries
                .iter()
                .map(|(id, off, len, raw)| IndexEntry { id: hex::encode(id), off: *off, len: *len, raw: *raw })
                .collect(),
        };
        for (id, offset, len, raw_len) in entries.drain(..) {
            out.new_locs.insert(id, BlobLoc { pack, offset, len, raw_len });
        }
        out.packs.push((pack, size));
        let index_blob = zstd::bulk::compress(&serde_json::to_vec(&index).expect("serialisable"), 3)
            .map_err(|e| Error::failed(format!("cannot compress pack index: {e}")))
            .and_then(|z| writer.sealer().seal(&z));
        let index_blob = match index_blob {
            Ok(b) => Bytes::from(b),
            Err(e) => return fail(e),
        };
        // Waiting for a permit here is what bounds memory: at most `uploads` packs in flight.
        let permit = match rt.block_on(sem.clone().acquire_owned()) {
            Ok(p) => p,
            Err(_) => return,
        };
        let writer = writer.clone();
        let fail = fail.clone();
        let progress = progress.clone();
        let threshold = cfg.multipart_threshold as u64;
        tasks.push(rt.spawn(async move {
            let _permit = permit;
            let r = match writer.put_pack(&pack, data, size, threshold).await {
                Ok(()) => writer.put_index(&pack, index_blob).await,
                Err(e) => Err(e),
            };
            match r {
                Ok(()) => {
                    progress.bytes_uploaded.fetch_add(size, Ordering::Relaxed);
                }
                Err(e) => fail(e),
            }
        }));
    };

    for s in rx.iter() {
        if failed.load(Ordering::SeqCst) {
            continue; // drain so that producers never block
        }
        entries.push((s.id, buf_len, s.blob.len() as u32, s.raw_len));
        out.chunks_new += 1;
        out.bytes_new += s.raw_len as u64;
        hasher.update(&s.blob);
        buf_len += s.blob.len() as u64;
        buf.push(Bytes::from(s.blob));
        if buf_len >= cfg.pack_size as u64 {
            flush(&mut buf, &mut buf_len, &mut hasher, &mut entries, &mut out);
        }
    }
    if !failed.load(Ordering::SeqCst) {
        flush(&mut buf, &mut buf_len, &mut hasher, &mut entries, &mut out);
    }
    for t in tasks {
        if rt.block_on(t).is_err() {
            fail(Error::failed("a pack upload task panicked"));
        }
    }
    out.bytes_uploaded = out.packs.iter().map(|p| p.1).sum();
    out.into()
}

/// Size and hash of a file as a backup computes them (BLAKE3 over the keyed chunk ids): a drill
/// compares restored files with the snapshot this way.
pub fn hash_file(
    path: &std::path::Path,
    key: &[u8; 32],
    p: ChunkerParams,
    fixed: Option<u32>,
) -> std::io::Result<(u64, [u8; 32])> {
    let f = std::fs::File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    for c in chunks(&mut super::chunker::Pool::default(), Box::new(f), p, fixed, key) {
        let c = c?;
        size += c.len() as u64;
        hasher.update(&chunk_id(key, &c));
    }
    Ok((size, *hasher.finalize().as_bytes()))
}

/// Chunks from earlier backups that may be reused: in the local cache, in a pack that still
/// exists with the recorded size, and not marked for deletion by prune.
pub fn reusable(
    cache: HashMap<ChunkId, BlobLoc>,
    packs: &HashMap<PackId, u64>,
    marked: &HashSet<PackId>,
) -> HashMap<ChunkId, BlobLoc> {
    cache
        .into_iter()
        .filter(|(_, l)| {
            packs.get(&l.pack).is_some_and(|&size| l.offset + l.len as u64 <= size) && !marked.contains(&l.pack)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_boundaries_depend_on_the_key() {
        let mut x: u64 = 7;
        let data: Vec<u8> = (0..8 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b"abcdefgh \n"[(x % 10) as usize]
            })
            .collect();
        let sizes = |key: [u8; 32]| -> Vec<usize> {
            chunks(
                &mut crate::pipeline::chunker::Pool::default(),
                Box::new(std::io::Cursor::new(data.clone())),
                ChunkerParams::default(),
                None,
                &key,
            )
            .map(|c| c.unwrap().len())
            .collect()
        };
        let (a, b) = (sizes([1; 32]), sizes([2; 32]));
        assert_eq!(a.iter().sum::<usize>(), data.len());
        assert_eq!(a, sizes([1; 32]), "the same key cuts the same way (dedup)");
        assert_ne!(a, b, "another key cuts elsewhere: boundaries do not reveal the content");
    }
}
