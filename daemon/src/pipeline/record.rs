//! The record of a restore: how each file looked (device, inode, size, mtime, ctime) when
//! veza-dr left it, so the next `restore --delta` into the same directory compares the files
//! untouched since by their two snapshots' manifests instead of reading them.
//!
//! Why a matching stat is enough: the kernel moves a file's ctime on every write, truncate,
//! chmod, chown and utimes, and no call sets it back; device and inode pin the file itself
//! (a file deleted and created anew is another inode with a new ctime). A file whose stat is
//! exactly what the record holds therefore holds what that restore wrote, the recorded
//! snapshot's entry. What it cannot see: writes below the file system (the block device, bit
//! rot) and a clock set back to the same nanosecond; `--checksum` reads every file for those.
//! A crash of the kernel can lose a change's new ctime while its data reached the disk, so a
//! record serves only the boot it was made in, and every restore removes the target's record
//! before it writes. The record is MACed under a key derived from the restore identity, so
//! only its holder can write one a delta believes (a backup host holds no identity).

use super::safe_dir::SafeDir;
use crate::error::{Error, Result};
use crate::repository::format::{parse_hex32, Entry, EntryKind, Manifest};
use crate::repository::Unlocked;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A file's identity and change times as `fstat` gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stat {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl Stat {
    pub fn of(st: &nix::sys::stat::FileStat) -> Stat {
        Stat {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime_ns: st.st_mtime.saturating_mul(1_000_000_000).saturating_add(st.st_mtime_nsec),
            ctime_ns: st.st_ctime.saturating_mul(1_000_000_000).saturating_add(st.st_ctime_nsec),
        }
    }
}

/// A file is recorded only if the kernel's clock has moved on since its last change, by more
/// than the file system's time granularity: a later write must get another ctime. File times
/// come from the coarse clock (one tick, at most 10 ms at HZ=100), truncated to the file
/// system's granularity (1 ns on ext4, XFS, btrfs; a ctime of exactly 0 ns hints at whole
/// seconds, FAT's is 2 s).
const MARGIN_NS: i64 = 20_000_000;
const MARGIN_COARSE_NS: i64 = 2_000_000_000;
const VERSION: u32 = 1;

#[derive(serde::Serialize, serde::Deserialize)]
struct Body {
    version: u32,
    snapshot: String,
    target: String,
    /// The kernel's boot id: after a crash, a file's ctime may be older than its data.
    boot: String,
    made_ns: i64,
    /// (index of the entry in the snapshot's manifest, the file's stat).
    files: Vec<(u32, Stat)>,
}

/// The record's MAC key: from the identity that restores, salted with the snapshot's chunk key.
pub fn mac_key(identity: &crate::crypto::Identity, chunk_key: &[u8; 32]) -> [u8; 32] {
    identity.derive_key("veza-dr restore record v1", chunk_key)
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Remove the record of `target` before a restore writes into it: a restore that fails or is
/// cut short leaves no record behind. The removal is synced, as the writes may be.
pub fn remove(records: &Path, target: &Path) {
    let path = path_for(records, target);
    match std::fs::remove_file(&path) {
        Ok(()) => {
            if let Ok(d) = std::fs::File::open(records) {
                let _ = d.sync_all();
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(record = %path.display(), error = %e, "could not remove the restore record"),
    }
}

/// Where the record of restores into `target` lives under `records` (the state directory's
/// `restored/`): one file per target, named by the hash of its path.
fn path_for(records: &Path, target: &Path) -> PathBuf {
    let h = blake3::hash(canonical(target).as_bytes());
    records.join(format!("{}.record", &h.to_hex()[..32]))
}

/// The target as one path however it was named (relative, with `..` or through a link).
fn canonical(target: &Path) -> String {
    std::fs::canonicalize(target).unwrap_or_else(|_| target.to_path_buf()).display().to_string()
}

/// Where a state directory keeps restore records.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("restored")
}

/// The clock file times are taken from (a tick behind real time at most).
fn coarse_now_ns() -> i64 {
    use nix::time::{clock_gettime, ClockId};
    match clock_gettime(ClockId::CLOCK_REALTIME_COARSE) {
        Ok(t) => t.tv_sec().saturating_mul(1_000_000_000).saturating_add(t.tv_nsec()),
        Err(_) => 0, // nothing is recorded
    }
}

/// A finished restore's files, to be recorded once the caller has made its last change to
/// the target (owners handed over, configuration written) and synced it.
#[derive(Debug)]
pub struct Pending {
    snapshot: String,
    /// The MAC key (`mac_key`).
    key: [u8; 32],
    files: Vec<(u32, PathBuf)>,
}

impl Pending {
    /// `entries`: (manifest index, entry) of everything restored; `key`: `mac_key`.
    pub fn new(snapshot: &str, key: [u8; 32], entries: &[(usize, &Entry)]) -> Pending {
        let files = entries
            .iter()
            .filter(|(_, e)| e.kind == EntryKind::File)
            .filter_map(|(i, e)| Some((u32::try_from(*i).ok()?, e.rel_path())))
            .collect();
        Pending { snapshot: snapshot.to_string(), key, files }
    }

    /// Leave out files the caller changed after the restore (their content is no longer the
    /// snapshot's, whatever their stat says).
    pub fn forget(&mut self, rels: &[&str]) {
        self.files.retain(|(_, p)| !rels.iter().any(|r| p == Path::new(r)));
    }

    /// Write the record of `target` under `records`, replacing the last one. A file with more
    /// than one link, or changed too recently (`MARGIN_NS`), is left out: a delta reads it.
    pub fn save(&self, target: &Path, records: &Path) -> Result<()> {
        self.save_in(&SafeDir::open(target)?, target, records)
    }

    /// `save`, through the caller's handle of `target` (a tree handed to another user).
    pub fn save_in(&self, dir: &SafeDir, target: &Path, records: &Path) -> Result<()> {
        // The restore's last changes (owners, modes, times) were just made: let the clock
        // move past them once, rather than leave every file out.
        std::thread::sleep(std::time::Duration::from_nanos(MARGIN_NS as u64 + 10_000_000));
        let made_ns = coarse_now_ns();
        let files = self
            .files
            .iter()
            .filter_map(|(i, rel)| {
                // The clock before the stat: a write after the stat gets at least this time.
                let now = coarse_now_ns();
                let s = Stat::of(&dir.file_stat(rel)?);
                let margin = if s.ctime_ns % 1_000_000_000 == 0 { MARGIN_COARSE_NS } else { MARGIN_NS };
                (s.ctime_ns < now.saturating_sub(margin)).then_some((*i, s))
            })
            .collect();
        let body = Body {
            version: VERSION,
            snapshot: self.snapshot.clone(),
            target: canonical(target),
            boot: boot_id(),
            made_ns,
            files,
        };
        let body = serde_json::to_vec(&body).map_err(|e| Error::failed(format!("encode the restore record: {e}")))?;
        let mac = blake3::keyed_hash(&self.key, &body);
        let mut text = mac.to_hex().to_string().into_bytes();
        text.push(b'\n');
        text.extend_from_slice(&body);
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(records)
            .map_err(|e| Error::io("create", records, e))?;
        let path = path_for(records, target);
        crate::repository::state::write_atomic(&path, &text)
    }
}

/// The last restore's record of a target, checked: the recorded snapshot's manifest and key,
/// and each recorded file's stat by path.
pub struct Known {
    pub manifest: Manifest,
    pub key: [u8; 32],
    files: HashMap<PathBuf, (usize, Stat)>,
}

/// What the record knows of one file of the snapshot being restored.
pub struct Prior<'a> {
    /// The recorded snapshot's entry at the same path: what the file holds if its stat matches.
    pub entry: &'a Entry,
    pub stat: Stat,
}

/// The record of `target`, if there is one that verifies. Anything amiss (no record, a
/// snapshot pruned since, a MAC that does not match, another target's record) only means the
/// delta reads every file, as without a record.
pub async fn load(repo: &Unlocked, records: &Path, target: &Path) -> Option<Known> {
    let text = std::fs::read(path_for(records, target)).ok()?;
    let nl = text.iter().position(|b| *b == b'\n')?;
    let (mac, body) = (std::str::from_utf8(&text[..nl]).ok()?, &text[nl + 1..]);
    let parsed: Body = serde_json::from_slice(body).ok()?;
    let why = |what: &str| tracing::info!(target = %target.display(), "restore record not used: {what}");
    if parsed.version != VERSION || parsed.target != canonical(target) {
        return None;
    }
    if parsed.boot != boot_id() || parsed.boot.is_empty() {
        why("it was made before the last boot");
        return None;
    }
    if parsed.made_ns > coarse_now_ns() {
        why("it is dated after now: the clock was set back");
        return None;
    }
    let snap = match repo.find_snapshot(&parsed.snapshot).await {
        Ok(s) if s.id.as_str() == parsed.snapshot => s,
        _ => {
            why("its snapshot is gone");
            return None;
        }
    };
    let manifest = repo.manifest(&snap).await.ok()?;
    let key = repo.chunk_key(&snap, &manifest.key_id).await.ok()?;
    let want = blake3::keyed_hash(&mac_key(repo.identity(), &key), body);
    if parse_hex32(mac).map(blake3::Hash::from_bytes) != Some(want) {
        why("its MAC does not match");
        return None;
    }
    let files = parsed
        .files
        .into_iter()
        .filter_map(|(i, s)| {
            let e = manifest.entries.get(i as usize).filter(|e| e.kind == EntryKind::File)?;
            Some((e.rel_path(), (i as usize, s)))
        })
        .collect();
    Some(Known { manifest, key, files })
}

impl Known {
    /// The prior of each of `files` (the snapshot being restored, whose chunk key is `key`).
    /// Chunk ids, file hashes and page digests are keyed: across two keys nothing compares.
    pub fn priors(&self, key: &[u8; 32], files: &[&Entry]) -> Vec<Option<Prior<'_>>> {
        files
            .iter()
            .map(|e| {
                if *key != self.key {
                    return None;
                }
                let (i, stat) = self.files.get(&e.rel_path())?;
                Some(Prior { entry: &self.manifest.entries[*i], stat: *stat })
            })
            .collect()
    }
}

/// What differs between the file as a restore of `old` (of `om`, with page digests `od`)
/// left it and `new` (of `nm`, digests `nd`), from the manifests alone; `None` when they cannot
/// tell, and the file is read instead.
///
/// A file's hash and digests describe the pages as the backup read them; a layered entry is
/// restored with some pages from its parent's base instead (a hint bit set without WAL makes
/// the two differ). So a layered entry on either side is compared by where each page is
/// restored from (chunk id and offset): the same source, the same bytes.
pub fn differ(
    om: &Manifest,
    old: &Entry,
    od: Option<&[u8]>,
    nm: &Manifest,
    new: &Entry,
    nd: Option<&[u8]>,
) -> Option<super::delta::Differ> {
    use super::delta::Differ;
    use super::pages::{DIGEST, PAGE};
    if old.pages.is_some() || new.pages.is_some() {
        let (was, now) = (page_sources(om, old)?, page_sources(nm, new)?);
        let bits: Vec<bool> = now.iter().enumerate().map(|(p, src)| was.get(p) != Some(src)).collect();
        // After a new base nearly every page has another source: reading the file then costs
        // less than fetching it.
        if bits.iter().filter(|b| **b).count() * 2 > bits.len() {
            return None;
        }
        return Some(Differ::Pages(bits));
    }
    if same_content(old, new) {
        return Some(Differ::Nothing);
    }
    if let (Some(od), Some(nd)) = (od, nd) {
        let page_len = |size: u64, p: u64| size.saturating_sub(p * PAGE as u64).min(PAGE as u64);
        let bits = (0..new.size.div_ceil(PAGE as u64))
            .map(|p| {
                let at = p as usize * DIGEST..(p as usize + 1) * DIGEST;
                let same = page_len(old.size, p) == page_len(new.size, p)
                    && matches!((od.get(at.clone()), nd.get(at)), (Some(a), Some(b)) if a == b);
                !same
            })
            .collect();
        return Some(Differ::Pages(bits));
    }
    let pieces = |m: &Manifest, e: &Entry| -> Option<Vec<(u64, String, u32)>> {
        let mut off = 0u64;
        e.chunks
            .iter()
            .map(|&c| {
                let (id, _, _, _, raw) = m.chunks.get(c as usize)?;
                let at = off;
                off += *raw as u64;
                Some((at, id.clone(), *raw))
            })
            .collect()
    };
    let had: HashMap<u64, (String, u32)> = pieces(om, old)?
        .into_iter()
        .filter(|(at, _, raw)| at + *raw as u64 <= old.size)
        .map(|(at, id, raw)| (at, (id, raw)))
        .collect();
    let differs = pieces(nm, new)?
        .into_iter()
        .filter(|(at, id, raw)| had.get(at) != Some(&(id.clone(), *raw)))
        .map(|(at, _, _)| at)
        .collect();
    Some(Differ::Pieces(differs))
}

/// Whether two entries' live reads had the same bytes (size and file hash; same chunk key).
pub fn same_content(a: &Entry, b: &Entry) -> bool {
    a.size == b.size && a.hash.is_some() && a.hash == b.hash
}

/// Where a restore takes each 8 KiB page of `e` from: (chunk id, offset in the chunk, length).
/// `None` if a write does not start on a page or a page has no source.
fn page_sources<'m>(m: &'m Manifest, e: &Entry) -> Option<Vec<(&'m str, u32, u32)>> {
    use super::pages::PAGE;
    let writes: Vec<(u32, u64, u32, u32)> = match &e.pages {
        Some(l) => super::pages::layout(m, e, l, 0)
            .ok()?
            .into_iter()
            .map(|(c, t)| {
                let raw = m.chunks.get(c as usize)?.4;
                let (src, len) = t.part.unwrap_or((0, raw));
                Some((c, t.offset, src, len))
            })
            .collect::<Option<_>>()?,
        None => {
            let mut off = 0u64;
            let mut v = Vec::with_capacity(e.chunks.len());
            for &c in &e.chunks {
                let raw = m.chunks.get(c as usize)?.4;
                v.push((c, off, 0, raw));
                off += raw as u64;
            }
            v
        }
    };
    let npages = e.size.div_ceil(PAGE as u64) as usize;
    let mut out: Vec<Option<(&str, u32, u32)>> = vec![None; npages];
    for (c, off, src, len) in writes {
        if !off.is_multiple_of(PAGE as u64) {
            return None;
        }
        let id = m.chunks.get(c as usize)?.0.as_str();
        let first = (off / PAGE as u64) as usize;
        for (k, at) in (0..len).step_by(PAGE).enumerate() {
            if let Some(slot) = out.get_mut(first + k) {
                *slot = Some((id, src + at, (len - at).min(PAGE as u32)));
            }
        }
    }
    out.into_iter().collect()
}

/// Save `pending` under `records` (if both are there); a record that cannot be written costs
/// only the next delta's speed, so it is a warning. The save waits out the clock and stats
/// every file: it runs on a blocking thread, not on the caller's async worker (the daemon has
/// two).
/// `dir`: the caller's handle of `target`, if it has one.
pub async fn save_or_warn(
    pending: Option<Pending>,
    target: &Path,
    dir: Option<std::sync::Arc<SafeDir>>,
    records: Option<&Path>,
    warnings: &mut Vec<String>,
) {
    if let (Some(p), Some(r)) = (pending, records) {
        let (target, r) = (target.to_path_buf(), r.to_path_buf());
        let saved = tokio::task::spawn_blocking(move || match dir {
            Some(d) => p.save_in(&d, &target, &r),
            None => p.save(&target, &r),
        })
        .await
        .unwrap_or_else(|e| Err(Error::failed(format!("the record's writer failed: {e}"))));
        if let Err(e) = saved {
            warnings.push(format!("the record of this restore was not saved ({e}): the next --delta reads every file"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::delta::Differ;
    use crate::pipeline::pages::{DIGEST, PAGE};
    use crate::repository::format::PageLayers;

    fn manifest(chunks: &[(&str, u32)]) -> Manifest {
        crate::pipeline::pages::tests::manifest_of(chunks)
    }

    fn file(size: u64, chunks: Vec<u32>, hash: &str) -> Entry {
        let mut e = crate::pipeline::snapshot::dir_entry("f", 0);
        e.kind = EntryKind::File;
        e.size = size;
        e.chunks = chunks;
        e.hash = Some(hash.into());
        e
    }

    #[test]
    fn manifests_alone_tell_what_of_a_recorded_file_differs() {
        let m = manifest(&[("aa", 100), ("bb", 50), ("cc", 100), ("dd", 70)]);
        // Same hash and size: nothing to fetch.
        let d = differ(&m, &file(150, vec![0, 1], "h1"), None, &m, &file(150, vec![0, 1], "h1"), None);
        assert!(matches!(d, Some(Differ::Nothing)), "{d:?}");
        // Pieces: the second piece changed, and a third was added after the old end.
        let d = differ(&m, &file(150, vec![0, 1], "h1"), None, &m, &file(270, vec![0, 3, 2], "h2"), None);
        let Some(Differ::Pieces(s)) = d else { panic!("{d:?}") };
        assert_eq!(s.into_iter().collect::<std::collections::BTreeSet<_>>(), [100, 170].into());
        // The same id at another offset is not the same piece.
        let d = differ(&m, &file(150, vec![1, 0], "h1"), None, &m, &file(150, vec![0, 1], "h2"), None);
        let Some(Differ::Pieces(s)) = d else { panic!("{d:?}") };
        assert_eq!(s.len(), 2);
        // A chunk index outside the table: read the file instead.
        assert!(differ(&m, &file(150, vec![0, 9], "x"), None, &m, &file(150, vec![0, 1], "y"), None).is_none());

        // Pages: old 3 pages, new 4 pages and a short fifth; page 1 changed.
        let dig = |pages: &[u8]| pages.iter().flat_map(|p| [*p; DIGEST]).collect::<Vec<u8>>();
        let (old, new) = (file(3 * PAGE as u64, vec![], "o"), file(4 * PAGE as u64 + 100, vec![], "n"));
        let d = differ(&m, &old, Some(&dig(&[1, 2, 3])), &m, &new, Some(&dig(&[1, 9, 3, 4, 5])));
        let Some(Differ::Pages(bits)) = d else { panic!("{d:?}") };
        assert_eq!(bits, vec![false, true, false, true, true]);
        // A last page of another length differs even with the same digest bytes.
        let (old, new) = (file(PAGE as u64 + 10, vec![], "o"), file(PAGE as u64 + 20, vec![], "n"));
        let d = differ(&m, &old, Some(&dig(&[1, 2])), &m, &new, Some(&dig(&[1, 2])));
        assert!(matches!(d, Some(Differ::Pages(b)) if b == vec![false, true]));
        // A digest list shorter than the file: the pages it lacks differ.
        let d = differ(&m, &old, Some(&dig(&[1])), &m, &file(PAGE as u64 + 10, vec![], "o2"), Some(&dig(&[1, 2])));
        assert!(matches!(d, Some(Differ::Pages(b)) if b == vec![false, true]));
    }

    #[test]
    fn a_layered_file_is_compared_by_where_its_pages_come_from() {
        use crate::repository::format::PageLayer;
        let pg = PAGE as u32;
        // Chunk 0: a 4-page base; chunks 1 and 2: one page each, two layers' blobs.
        let m = manifest(&[("aa", 4 * pg), ("bb", pg), ("cc", pg)]);
        let base = file(4 * PAGE as u64, vec![0], "live-1");
        let layered = |runs: Vec<(u32, u32)>, chunks: Vec<u32>, hash: &str| {
            let mut e = file(4 * PAGE as u64, vec![0], hash);
            e.pages = Some(PageLayers { base_size: 4 * PAGE as u64, layers: vec![PageLayer { chunks, runs }] });
            e
        };
        // Page 2 now comes from a layer: only it differs, even though the hashes (of the live
        // read) say nothing about what was restored.
        let one = layered(vec![(2, 1)], vec![1], "live-2");
        let d = differ(&m, &base, None, &m, &one, None);
        assert!(matches!(&d, Some(Differ::Pages(b)) if *b == vec![false, false, true, false]), "{d:?}");
        // The same hash on a layered entry proves nothing: the sources decide (page 2 moved
        // from layer blob bb to cc).
        let other = layered(vec![(2, 1)], vec![2], "live-2");
        let d = differ(&m, &one, None, &m, &other, None);
        assert!(matches!(&d, Some(Differ::Pages(b)) if *b == vec![false, false, true, false]), "{d:?}");
        let d = differ(&m, &one, None, &m, &one, None);
        assert!(matches!(&d, Some(Differ::Pages(b)) if b.iter().all(|x| !x)), "{d:?}");
        // A new base under every page: the file is read rather than fetched whole.
        let m2 = manifest(&[("aa", 4 * pg), ("ee", 4 * pg)]);
        assert!(differ(&m2, &one, None, &m2, &file(4 * PAGE as u64, vec![1], "x"), None).is_none());
    }
}
