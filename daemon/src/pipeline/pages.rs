//! Page layers: a PostgreSQL relation file stored as a base plus the 8 KiB pages changed
//! since, found by the LSN PostgreSQL writes into every page header (`pd_lsn`).
//!
//! The backup side decides which files may be layered (`LayerJob`) and which pages of a file
//! changed (`Layering`); the restore side turns a layered entry into writes (`layout`): each
//! page from the newest layer that holds it, the rest from the base. Nothing here decrypts:
//! the backup host never reads its own repository's content back.

use super::restore::Target;
use crate::error::{Error, Result};
use crate::repository::format::*;
use crate::source::postgres::pagecheck::lsn;

/// PostgreSQL's page size.
pub const PAGE: usize = crate::source::postgres::pagecheck::BLCKSZ;
/// Page blobs are cut at this size: big enough for zstd to span many pages, small enough that
/// a restore fetches little it does not need.
pub const LAYER_BLOB: usize = 1 << 20;
/// A file gets a new base (is read as whole chunks again) once it has this many layers ...
pub const MAX_LAYERS: usize = 32;
/// ... or once its layers hold more pages than this share of the file (1 / N): a restore then
/// fetches at most (1 + 1/N) times the file.
pub const LAYER_SHARE: u64 = 2;

/// Bytes kept of a page's digest: half of its BLAKE3 chaining value.
pub const DIGEST: usize = 16;
/// Pages per fixed 1 MiB chunk of a relation file.
const CHUNK_PAGES: usize = (1 << 20) / PAGE;

fn page_cv(key: &[u8; 32], at: usize, page: &[u8]) -> blake3::hazmat::ChainingValue {
    use blake3::hazmat::HasherExt;
    let mut h = blake3::Hasher::new_keyed(key);
    h.set_input_offset((at * PAGE) as u64);
    h.update(page);
    h.finalize_non_root()
}

/// The digest of a page: its chaining value inside the keyed BLAKE3 of its 1 MiB chunk
/// (`at`: its place in the chunk), truncated. A delta restore compares pages with it.
pub fn page_digest(key: &[u8; 32], at: usize, page: &[u8]) -> [u8; DIGEST] {
    page_cv(key, at, page)[..DIGEST].try_into().expect("16 of 32 bytes")
}

/// A chunk's id (exactly `chunk_id`) and the digests of its pages, in one pass over the data:
/// an 8 KiB page at an aligned offset is a complete BLAKE3 subtree, so the chunk's hash is
/// the merge of its pages' chaining values, and the digests cost no second hash.
pub fn id_and_digests(key: &[u8; 32], data: &[u8], out: &mut Vec<u8>) -> ChunkId {
    use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, ChainingValue, Mode};
    if data.len() < 2 * PAGE || !data.len().is_multiple_of(PAGE) {
        for (i, page) in data.chunks(PAGE).enumerate() {
            out.extend_from_slice(&page_digest(key, i, page));
        }
        return super::chunk_id(key, data);
    }
    let cvs: Vec<ChainingValue> = data.chunks(PAGE).enumerate().map(|(i, p)| page_cv(key, i, p)).collect();
    for cv in &cvs {
        out.extend_from_slice(&cv[..DIGEST]);
    }
    // BLAKE3's tree: the left subtree holds the largest power of two of 1 KiB chunks below the
    // whole (whole pages, for two pages or more).
    fn split(cvs: &[ChainingValue]) -> (&[ChainingValue], &[ChainingValue]) {
        cvs.split_at(blake3::hazmat::left_subtree_len((cvs.len() * PAGE) as u64) as usize / PAGE)
    }
    fn merge(cvs: &[ChainingValue], key: &[u8; 32]) -> ChainingValue {
        if cvs.len() == 1 {
            return cvs[0];
        }
        let (l, r) = split(cvs);
        merge_subtrees_non_root(&merge(l, key), &merge(r, key), Mode::KeyedHash(key))
    }
    let (l, r) = split(&cvs);
    *merge_subtrees_root(&merge(l, key), &merge(r, key), Mode::KeyedHash(key)).as_bytes()
}

/// Which pages of `file` differ from `digests` (page `p`'s digest at `p * DIGEST`); a page
/// the file does not have, or a digest missing, counts as different.
pub fn differing_pages(file: &std::fs::File, key: &[u8; 32], size: u64, digests: &[u8]) -> std::io::Result<Vec<bool>> {
    let npages = size.div_ceil(PAGE as u64) as usize;
    let mut out = vec![true; npages];
    let mut buf = vec![0u8; 1 << 20];
    let mut p = 0usize;
    while p < npages {
        let want = ((npages - p) * PAGE).min(buf.len()).min((size - (p * PAGE) as u64) as usize);
        let n = read_full(file, &mut buf[..want], (p * PAGE) as u64)?;
        if n == 0 {
            break;
        }
        for (i, page) in buf[..n].chunks(PAGE).enumerate() {
            let q = p + i;
            let same = digests.get(q * DIGEST..(q + 1) * DIGEST).is_some_and(|d| {
                // A short read of a whole page is a different page.
                (page.len() == PAGE || (q * PAGE + page.len()) as u64 == size)
                    && page_digest(key, q % CHUNK_PAGES, page)[..] == *d
            });
            out[q] = !same;
        }
        p += n.div_ceil(PAGE);
    }
    Ok(out)
}

fn read_full(f: &std::fs::File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A target cut to the pages marked in `differ`: the runs of differing pages it covers.
pub fn only_pages(t: Target, whole_len: u32, differ: &[bool]) -> Vec<Target> {
    let (src, len) = t.part.unwrap_or((0, whole_len));
    let (start, end) = (t.offset, t.offset + len as u64);
    let page = PAGE as u64;
    let mut out = Vec::new();
    let mut p = start / page;
    while p * page < end {
        if !differ.get(p as usize).copied().unwrap_or(true) {
            p += 1;
            continue;
        }
        let run = p;
        while p * page < end && differ.get(p as usize).copied().unwrap_or(true) {
            p += 1;
        }
        let (a, b) = ((run * page).max(start), (p * page).min(end));
        out.push(Target {
            file: t.file,
            offset: a,
            part: Some((src + (a - start) as u32, (b - a) as u32)),
            piece: None,
        });
    }
    out
}

/// A chunk-table row, or damage naming the manifest.
pub fn chunk(m: &Manifest, c: u32) -> Result<&(String, u32, u64, u32, u32)> {
    m.chunks
        .get(c as usize)
        .ok_or_else(|| Error::damaged(format!("manifest of {} references chunk {c} beyond its table", m.snapshot)))
}

/// Page runs `[first, count]`.
pub type Runs = Vec<(u32, u32)>;
/// One layer in chunk ids: its blobs and the pages they hold.
pub type IdLayer = (Vec<ChunkId>, Runs);

/// What a file looked like in the parent, in chunk ids: its base and its layers.
#[derive(Debug, Clone, Default)]
pub struct Stored {
    /// The entry's length.
    pub size: u64,
    pub base: Vec<ChunkId>,
    /// `Some` for a layered file: the base's length and the layers (blob ids, page runs).
    pub layered: Option<(u64, Vec<IdLayer>)>,
    /// The blob of the file's page digests (`Entry::digests`).
    pub digests: Option<ChunkId>,
}

impl Stored {
    /// A parent entry in ids, `None` if the manifest does not resolve (then it is read whole).
    pub fn of(m: &Manifest, e: &Entry) -> Option<Stored> {
        let ids = |cs: &[u32]| -> Option<Vec<ChunkId>> {
            cs.iter().map(|&c| m.chunks.get(c as usize).and_then(|t| parse_hex32(&t.0))).collect()
        };
        let base = ids(&e.chunks)?;
        let layered = match &e.pages {
            None => None,
            Some(l) => Some((
                l.base_size,
                l.layers.iter().map(|x| Some((ids(&x.chunks)?, x.runs.clone()))).collect::<Option<Vec<_>>>()?,
            )),
        };
        let digests = match e.digests {
            Some(c) => Some(parse_hex32(&m.chunks.get(c as usize)?.0)?),
            None => None,
        };
        Some(Stored { size: e.size, base, layered, digests })
    }

    pub fn ids(&self) -> impl Iterator<Item = &ChunkId> {
        self.base
            .iter()
            .chain(self.layered.iter().flat_map(|(_, ls)| ls.iter().flat_map(|l| l.0.iter())))
            .chain(self.digests.iter())
    }

    /// This file now: the parent's form with the new layer on top, cut or grown to `size`.
    pub fn with_layer(self, size: u64, ids: Vec<ChunkId>, runs: Runs) -> Stored {
        let (base_size, mut layers) = self.layered.unwrap_or((self.size, vec![]));
        if !runs.is_empty() {
            layers.push((ids, runs));
        }
        // Nothing changed and the same length: the plain form says the same, more simply.
        let layered = (!layers.is_empty() || size != base_size).then_some((base_size, layers));
        Stored { size, base: self.base, layered, digests: None }
    }
}

/// A file to be read for its changed pages only.
#[derive(Debug, Clone)]
pub struct LayerJob {
    /// The parent's start: a page whose LSN is below it is the parent's.
    pub since_lsn: u64,
    /// The parent's length in pages: pages from here on are new.
    pub parent_pages: u64,
}

/// Whether a file may be stored as layers over its parent `pe` (whose stored form is `st`),
/// and with which rule. `None` means read it whole.
pub fn layer_job(rel: &str, pe: &Entry, now: &Entry, st: &Stored, since_lsn: u64) -> Option<LayerJob> {
    // Main forks only: the free-space map and visibility map are changed without their LSN
    // moving (visibilitymap_clear, FSM updates), so only their whole content is evidence.
    let main_fork = crate::source::postgres::pagecheck::relation(rel).is_some_and(|(_, main)| main);
    // The same file, not a new one at a reused path (a dropped relation's file number given
    // again, a database copied from a template with its pages' old LSNs).
    let same_file = pe.ino == now.ino && pe.ino != 0;
    let whole_pages = pe.size.is_multiple_of(PAGE as u64) && pe.size > 0;
    if !(main_fork && same_file && whole_pages) {
        return None;
    }
    let parent_pages = pe.size / PAGE as u64;
    if let Some((base_size, layers)) = &st.layered {
        let held: u64 = layers.iter().flat_map(|l| l.1.iter()).map(|r| r.1 as u64).sum();
        if !base_size.is_multiple_of(PAGE as u64) || layers.len() >= MAX_LAYERS || held * LAYER_SHARE > parent_pages {
            return None;
        }
    }
    Some(LayerJob { since_lsn, parent_pages })
}

/// Collects the changed pages of one file as it is read, chunk by chunk.
pub struct Layering {
    since_lsn: u64,
    parent_pages: u64,
    buf: Vec<u8>,
    pub runs: Runs,
}

impl Layering {
    pub fn new(job: &LayerJob) -> Layering {
        Layering { since_lsn: job.since_lsn, parent_pages: job.parent_pages, buf: Vec::new(), runs: Vec::new() }
    }

    /// Take the changed pages of `data`, read at file offset `off` (a page boundary). Calls
    /// `emit` with each full blob of pages.
    pub fn add(&mut self, data: &[u8], off: u64, mut emit: impl FnMut(Vec<u8>)) {
        let first = off / PAGE as u64;
        for (i, page) in data.chunks(PAGE).enumerate() {
            let p = first + i as u64;
            // New pages, pages never written (LSN 0: a new or re-extended page may hold
            // anything the parent did not), a short last page, and pages changed since the
            // parent started. Torn pages under write are fine: WAL replay from this backup's
            // start rewrites them, as for any page a physical backup copies.
            let changed = p >= self.parent_pages || page.len() < PAGE || lsn(page) == 0 || lsn(page) >= self.since_lsn;
            if !changed {
                continue;
            }
            let p = p as u32;
            match self.runs.last_mut() {
                Some((a, n)) if *a + *n == p => *n += 1,
                _ => self.runs.push((p, 1)),
            }
            self.buf.extend_from_slice(page);
            // A short last page is stored whole: the entry's size cuts it on restore.
            self.buf.resize(self.buf.len().next_multiple_of(PAGE), 0);
            if self.buf.len() >= LAYER_BLOB {
                emit(std::mem::take(&mut self.buf));
            }
        }
    }

    /// The last, partial blob.
    pub fn finish(&mut self, emit: impl FnOnce(Vec<u8>)) {
        if !self.buf.is_empty() {
            emit(std::mem::take(&mut self.buf));
        }
    }
}

/// The writes that rebuild a layered entry: every page from the newest layer holding it, the
/// other pages from the base, cut to the entry's size. A layout that leaves a page without a
/// source, or whose runs and blobs disagree, is a damaged (or crafted) manifest.
pub fn layout(m: &Manifest, e: &Entry, l: &PageLayers, file: usize) -> Result<Vec<(u32, Target)>> {
    let bad = |what: &str| {
        Error::damaged(format!("manifest of {}: the page layers of {} {what}", m.snapshot, e.display()))
            .with_hint("the repository was written by someone else or is damaged: run `veza-dr verify`")
    };
    let page = PAGE as u64;
    let npages = e.size.div_ceil(page);
    if npages > u32::MAX as u64 || !l.base_size.is_multiple_of(page) {
        return Err(bad("do not describe whole pages"));
    }
    // Bound the size by what is stored before sizing anything by it: base plus layer pages.
    let mut stored = 0u64;
    for &c in e.chunks.iter().chain(l.layers.iter().flat_map(|x| x.chunks.iter())) {
        stored += chunk(m, c)?.4 as u64;
    }
    if npages * page > stored + page {
        return Err(bad("describe a file larger than its base and layers"));
    }
    // Which layer blob (chunk index, byte offset in it) holds each page; u32::MAX = the base.
    const BASE: u32 = u32::MAX;
    let mut own: Vec<(u32, u32)> = vec![(BASE, 0); npages as usize];
    for layer in &l.layers {
        let mut blobs = Vec::with_capacity(layer.chunks.len());
        for &c in &layer.chunks {
            let raw = chunk(m, c)?.4;
            if raw == 0 || !(raw as usize).is_multiple_of(PAGE) {
                return Err(bad("hold a blob that is not whole pages"));
            }
            blobs.push((c, raw / PAGE as u32));
        }
        let held: u64 = blobs.iter().map(|b| b.1 as u64).sum();
        let listed: u64 = layer.runs.iter().map(|r| r.1 as u64).sum();
        if held != listed {
            return Err(bad("list other pages than their blobs hold"));
        }
        let (mut bi, mut at) = (0usize, 0u32);
        for &(first, count) in &layer.runs {
            let end = first.checked_add(count).ok_or_else(|| bad("run past the largest page number"))?;
            for p in first..end {
                while at == blobs[bi].1 {
                    bi += 1;
                    at = 0;
                }
                if (p as u64) < npages {
                    own[p as usize] = (blobs[bi].0, at * PAGE as u32);
                }
                at += 1;
            }
        }
    }
    let base_pages = l.base_size / page;
    if let Some(p) = (base_pages..npages).find(|&p| own[p as usize].0 == BASE) {
        return Err(bad(&format!("leave page {p} without a source")));
    }
    let mut out = Vec::new();
    // The base, without the pages a layer replaces and cut to the size.
    let mut off = 0u64;
    for &c in &e.chunks {
        let raw = chunk(m, c)?.4 as u64;
        if !raw.is_multiple_of(page) {
            return Err(bad("have a base chunk that is not whole pages"));
        }
        let (first, last) = (off / page, ((off + raw) / page).min(npages));
        let mut p = first;
        while p < last {
            if own[p as usize].0 != BASE {
                p += 1;
                continue;
            }
            let run = p;
            while p < last && own[p as usize].0 == BASE {
                p += 1;
            }
            let (a, b) = (run * page, (p * page).min(e.size));
            let part = (a != off || b != off + raw).then_some(((a - off) as u32, (b - a) as u32));
            out.push((c, Target { file, offset: a, part, piece: Some(off) }));
        }
        off += raw;
    }
    if off != l.base_size {
        return Err(bad("have a base of another length than recorded"));
    }
    // The layers' pages, neighbours in one blob written together.
    let mut p = 0u64;
    while p < npages {
        let (c, at) = own[p as usize];
        if c == BASE {
            p += 1;
            continue;
        }
        let run = p;
        p += 1;
        while p < npages && own[p as usize] == (c, at + ((p - run) * page) as u32) {
            p += 1;
        }
        let len = (p * page).min(e.size) - run * page;
        out.push((c, Target { file, offset: run * page, part: Some((at, len as u32)), piece: None }));
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn page(lsn: u64, fill: u8) -> Vec<u8> {
        let mut p = vec![fill; PAGE];
        p[0..4].copy_from_slice(&((lsn >> 32) as u32).to_le_bytes());
        p[4..8].copy_from_slice(&(lsn as u32).to_le_bytes());
        p
    }

    #[test]
    fn changed_new_and_unwritten_pages_are_taken() {
        let job = LayerJob { since_lsn: 1000, parent_pages: 4 };
        let mut l = Layering::new(&job);
        let mut data = Vec::new();
        for (lsn, fill) in [(10, 1), (2000, 2), (0, 0), (999, 4), (5, 5), (7, 6)] {
            data.extend(page(lsn, fill));
        }
        data.truncate(data.len() - 100); // a short last page
        let mut blobs = Vec::new();
        l.add(&data, 0, |b| blobs.push(b));
        l.finish(|b| blobs.push(b));
        // Page 1 (changed), 2 (LSN 0), 4 (new), 5 (new and short).
        assert_eq!(l.runs, vec![(1, 2), (4, 2)]);
        assert_eq!(blobs.len(), 1);
        assert_eq!(blobs[0].len(), 4 * PAGE, "pages are stored whole");
        assert_eq!(blobs[0][PAGE * 3 + 10], 6);
    }

    #[test]
    fn page_digests_come_with_the_chunk_id() {
        let key = [7u8; 32];
        let mut x: u64 = 1;
        for pages in [1usize, 2, 3, 5, 8, 100, 127, 128] {
            let data: Vec<u8> = (0..pages * PAGE)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let mut d = Vec::new();
            assert_eq!(id_and_digests(&key, &data, &mut d), crate::pipeline::chunk_id(&key, &data), "{pages} pages");
            assert_eq!(d.len(), pages * DIGEST);
            for (i, page) in data.chunks(PAGE).enumerate() {
                assert_eq!(d[i * DIGEST..(i + 1) * DIGEST], page_digest(&key, i, page), "page {i} of {pages}");
            }
            let short = &data[..data.len() - 100];
            let mut d2 = Vec::new();
            assert_eq!(id_and_digests(&key, short, &mut d2), crate::pipeline::chunk_id(&key, short));
        }
        assert_ne!(page_digest(&key, 0, &[1; PAGE]), page_digest(&key, 1, &[1; PAGE]), "the place counts");
    }

    #[test]
    fn a_target_is_cut_to_the_differing_pages() {
        let pg = PAGE as u32;
        let t = Target { file: 3, offset: 2 * PAGE as u64, part: Some((pg, 4 * pg)), piece: Some(0) };
        // Pages 2..6 are written; 3 and 5 differ.
        let differ = [false, false, false, true, false, true, false];
        let got = only_pages(t, 8 * pg, &differ);
        assert_eq!(
            got.iter().map(|t| (t.offset / PAGE as u64, t.part)).collect::<Vec<_>>(),
            vec![(3, Some((2 * pg, pg))), (5, Some((4 * pg, pg)))]
        );
        let whole = Target { file: 0, offset: 0, part: None, piece: Some(0) };
        assert!(only_pages(whole, 2 * pg, &[false, false]).is_empty());
        assert_eq!(only_pages(whole, 2 * pg, &[true, true])[0].part, Some((0, 2 * pg)));
    }

    fn manifest(rows: &[u32]) -> Manifest {
        manifest_of(&rows.iter().map(|&raw| ("00", raw)).collect::<Vec<_>>())
    }

    /// A manifest whose chunk table holds these (id byte in hex, plaintext length) rows.
    pub(crate) fn manifest_of(chunks: &[(&str, u32)]) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            snapshot: SnapshotId::parse("s").unwrap(),
            policy: "p".into(),
            key_id: "k".into(),
            source_path: "/".into(),
            packs: vec![],
            chunks: chunks.iter().map(|(id, raw)| (id.repeat(32), 0, 0, 1, *raw)).collect(),
            entries: vec![],
            extra: None,
            warnings: vec![],
            page_basis: None,
        }
    }

    #[test]
    fn a_layout_takes_each_page_from_its_newest_layer() {
        let pg = PAGE as u32;
        // Base: chunks 0 and 1, 4 pages each. Layer A (chunk 2): pages 1, 2, 9. Layer B
        // (chunk 3): pages 2, 8. The file is now 10 pages, the last one short by 100 bytes.
        let m = manifest(&[4 * pg, 4 * pg, 3 * pg, 2 * pg]);
        let layers = PageLayers {
            base_size: 8 * PAGE as u64,
            layers: vec![
                PageLayer { chunks: vec![2], runs: vec![(1, 2), (9, 1)] },
                PageLayer { chunks: vec![3], runs: vec![(2, 1), (8, 1)] },
            ],
        };
        let mut e = crate::pipeline::snapshot::dir_entry("base/5/1", 0);
        e.kind = EntryKind::File;
        e.size = 10 * PAGE as u64 - 100;
        e.chunks = vec![0, 1];
        let mut t = layout(&m, &e, &layers, 0).unwrap();
        t.sort_by_key(|(_, t)| t.offset);
        let got: Vec<(u32, u64, _)> = t.iter().map(|(c, t)| (*c, t.offset / PAGE as u64, t.part)).collect();
        assert_eq!(
            got,
            vec![
                (0, 0, Some((0, pg))),
                (2, 1, Some((0, pg))),
                (3, 2, Some((0, pg))),
                (0, 3, Some((3 * pg, pg))),
                (1, 4, None),
                (3, 8, Some((pg, pg))),
                (2, 9, Some((2 * pg, pg - 100))),
            ]
        );
        // A page beyond the base that no layer holds is refused.
        let mut gap = layers.clone();
        gap.layers[0].runs = vec![(1, 3)];
        gap.layers[1].runs = vec![(2, 2)];
        assert!(layout(&m, &e, &gap, 0).unwrap_err().message.contains("page 8 without a source"));
        // Runs that list more pages than the blobs hold are refused.
        let mut long = layers.clone();
        long.layers[0].runs = vec![(1, 4)];
        assert!(layout(&m, &e, &long, 0).is_err());
        let mut huge = layers;
        huge.layers[0].runs = vec![(u32::MAX, 3)];
        assert!(layout(&m, &e, &huge, 0).is_err());
    }
}
