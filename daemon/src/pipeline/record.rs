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
//! The record is MACed under a key derived from the snapshot's chunk key, so only a holder of
//! the repository's identity can write one a delta believes.

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
    made_ns: i64,
    /// (index of the entry in the snapshot's manifest, the file's stat).
    files: Vec<(u32, Stat)>,
}

fn mac_key(chunk_key: &[u8; 32]) -> [u8; 32] {
    blake3::derive_key("veza-dr restore record v1", chunk_key)
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
    key: [u8; 32],
    files: Vec<(u32, PathBuf)>,
}

impl Pending {
    /// `entries`: (manifest index, entry) of everything restored.
    pub fn new(snapshot: &str, key: [u8; 32], entries: &[(usize, &Entry)]) -> Pending {
        let files = entries
            .iter()
            .filter(|(_, e)| e.kind == EntryKind::File)
            .filter_map(|(i, e)| Some((u32::try_from(*i).ok()?, e.rel_path())))
            .collect();
        Pending { snapshot: snapshot.to_string(), key, files }
    }

    /// Write the record of `target` under `records`, replacing the last one. A file with more
    /// than one link, or changed too recently (`MARGIN_NS`), is left out: a delta reads it.
    pub fn save(&self, target: &Path, records: &Path) -> Result<()> {
        let dir = SafeDir::open(target)?;
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
            made_ns,
            files,
        };
        let body = serde_json::to_vec(&body).map_err(|e| Error::failed(format!("encode the restore record: {e}")))?;
        let mac = blake3::keyed_hash(&mac_key(&self.key), &body);
        let mut text = mac.to_hex().to_string().into_bytes();
        text.push(b'\n');
        text.extend_from_slice(&body);
        std::fs::create_dir_all(records).map_err(|e| Error::io("create", records, e))?;
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
    if parsed.version != VERSION || parsed.target != canonical(target) {
        return None;
    }
    let why = |what: &str| tracing::info!(target = %target.display(), "restore record not used: {what}");
    let snap = match repo.find_snapshot(&parsed.snapshot).await {
        Ok(s) if s.id.as_str() == parsed.snapshot => s,
        _ => {
            why("its snapshot is gone");
            return None;
        }
    };
    let manifest = repo.manifest(&snap).await.ok()?;
    let key = repo.chunk_key(&snap, &manifest.key_id).await.ok()?;
    let want = blake3::keyed_hash(&mac_key(&key), body);
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

/// What differs between the file as `old` (of `om`, with page digests `od`) left it and `new`
/// (of `nm`, digests `nd`), from the manifests alone; `None` when they cannot tell (a layered
/// file without digests on both sides), and the file is read instead.
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
    if old.size == new.size && old.hash.is_some() && old.hash == new.hash {
        return Some(Differ::Pieces(Default::default()));
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
    if old.pages.is_some() || new.pages.is_some() {
        return None;
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

/// Save `pending` under `records` (if both are there); a record that cannot be written costs
/// only the next delta's speed, so it is a warning.
pub fn save_or_warn(pending: Option<Pending>, target: &Path, records: Option<&Path>, warnings: &mut Vec<String>) {
    if let (Some(p), Some(r)) = (pending, records) {
        if let Err(e) = p.save(target, r) {
            warnings.push(format!("the record of this restore was not saved ({e}): the next --delta reads every file"));
        }
    }
}
