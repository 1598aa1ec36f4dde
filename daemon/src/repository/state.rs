//! The host's local state for one repository: the chunk-id key, the chunk locations it wrote
//! under that key (for dedup) and plaintext copies of its own manifests (for incremental
//! change detection).
//!
//! All of it can be lost or damaged: then the next backup re-reads and re-uploads, nothing
//! else. Three rules keep a damaged or shared state from corrupting a snapshot:
//! - the chunk cache is per key (`chunks-<key-id>.bin`), so ids made under one key are never
//!   reused in a snapshot that names another (a lost `chunk-key` used to do exactly that);
//! - the cache carries a BLAKE3 checksum; a damaged one is rebuilt from the manifest copies;
//! - writers (the daemon, a CLI) change the state one at a time, under a file lock, with
//!   unique temporary names, and a backup deletes only manifest copies older than itself.

use super::format::*;
use super::Writer;
use crate::error::{Error, Kind, Result};
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct HostState {
    dir: PathBuf,
}

/// Default state directory: /var/lib/veza-dr as root, else under XDG_STATE_HOME.
pub fn default_state_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return "/var/lib/veza-dr".into();
    }
    match std::env::var_os("XDG_STATE_HOME") {
        Some(x) if !x.is_empty() => PathBuf::from(x).join("veza-dr"),
        _ => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into())).join(".local/state/veza-dr"),
    }
}

/// Write `data` to `path` (0600) through a temporary file, synced before the rename: a crash
/// leaves the old content or the new, never a part.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    // Unique per writer: two processes never write through the same temporary file.
    let tmp =
        path.with_file_name(format!(".{file}.{}.{}.tmp", std::process::id(), hex::encode(rand::random::<[u8; 4]>())));
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| Error::io("write", &tmp, e))?;
    f.write_all(data).and_then(|_| f.sync_all()).map_err(|e| Error::io("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io("write", path, e)
    })
}

const REC: usize = 32 + 32 + 8 + 4 + 4;
const MAGIC: &[u8; 8] = b"VZCHUNK2";

/// The exclusive lock on a state directory; released when dropped.
pub struct StateLock {
    _flock: nix::fcntl::Flock<std::fs::File>,
}

impl HostState {
    pub fn open(state_dir: &Path, repo_id: &str) -> Result<HostState> {
        let dir = state_dir.join("repos").join(repo_id);
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir.join("manifests")).map_err(|e| {
            Error::io("create state directory", &dir, e).with_hint("pass --state-dir DIR to a writable directory")
        })?;
        Ok(HostState { dir })
    }

    /// Take the state's write lock, waiting up to `wait` for another veza-dr on this host.
    pub fn lock(&self, wait: Duration) -> Result<StateLock> {
        let path = self.dir.join("lock");
        let deadline = std::time::Instant::now() + wait;
        loop {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| Error::io("open the state lock", &path, e))?;
            match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(flock) => return Ok(StateLock { _flock: flock }),
                Err((_, nix::errno::Errno::EWOULDBLOCK)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err((_, e)) => {
                    return Err(Error::new(
                        Kind::Locked,
                        format!("the local state {} is locked: {e}", self.dir.display()),
                    )
                    .with_hint("another veza-dr on this host is updating it; --lock-wait waits for it"))
                }
            }
        }
    }

    fn write_atomic(&self, name: &str, data: &[u8]) -> Result<()> {
        write_atomic(&self.dir.join(name), data)
    }

    /// The chunk-id key of this host for this repository, creating and uploading it if needed.
    /// A new key is created with O_EXCL under the state lock, so two first backups on one host
    /// end up with one key.
    pub async fn chunk_key(&self, repo: &Writer, wait: Duration) -> Result<(String, [u8; 32])> {
        let path = self.dir.join("chunk-key");
        let read = || -> Option<(String, [u8; 32])> {
            let text = std::fs::read_to_string(&path).ok()?;
            let (i, k) = text.trim().split_once(':')?;
            Some((i.to_string(), parse_hex32(k)?))
        };
        let (id, key, fresh) = match read() {
            Some((id, key)) => (id, key, false),
            None => {
                let _lock = tokio::task::block_in_place(|| self.lock(wait))?;
                match read() {
                    Some((id, key)) => (id, key, false),
                    None => {
                        let key: [u8; 32] = rand::random();
                        let id = hex::encode(rand::random::<[u8; 8]>());
                        // Upload first: a key in the local state is always in the repository.
                        upload_key(repo, &id, &key).await?;
                        if path.exists() {
                            // A damaged key file: keep it for inspection, start a new key.
                            let _ = std::fs::rename(&path, self.dir.join("chunk-key.damaged"));
                        }
                        let mut f = std::fs::OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .mode(0o600)
                            .open(&path)
                            .map_err(|e| Error::io("create", &path, e))?;
                        f.write_all(format!("{id}:{}\n", hex::encode(key)).as_bytes())
                            .and_then(|_| f.sync_all())
                            .map_err(|e| Error::io("write", &path, e))?;
                        (id, key, true)
                    }
                }
            }
        };
        // The repository may have been recreated under us: make sure the key is there.
        if !fresh && !repo.has_chunk_key(&id).await? {
            upload_key(repo, &id, &key).await?;
        }
        Ok((id, key))
    }

    fn chunks_file(&self, key_id: &str) -> PathBuf {
        self.dir.join(format!("chunks-{key_id}.bin"))
    }

    /// Chunks this host wrote under key `key_id`, with their locations. A damaged cache is
    /// rebuilt from the manifest copies made under the same key.
    pub fn load_chunks(&self, key_id: &str) -> HashMap<ChunkId, BlobLoc> {
        let path = self.chunks_file(key_id);
        match std::fs::read(&path) {
            Err(_) => HashMap::new(),
            Ok(b) => match decode_chunks(&b) {
                Some(m) => m,
                None => {
                    tracing::warn!(cache = %path.display(), "the chunk cache is damaged; rebuilding it from the local manifests");
                    self.rebuild_chunks(key_id)
                }
            },
        }
    }

    fn rebuild_chunks(&self, key_id: &str) -> HashMap<ChunkId, BlobLoc> {
        let mut m = HashMap::new();
        for snap in self.manifest_ids() {
            let Some(man) = self.load_manifest(&snap) else { continue };
            if man.key_id != key_id {
                continue;
            }
            let packs: Vec<Option<PackId>> = man.packs.iter().map(|p| parse_hex32(p)).collect();
            for (id, p, off, len, raw) in &man.chunks {
                if let (Some(id), Some(Some(pack))) = (parse_hex32(id), packs.get(*p as usize)) {
                    m.insert(id, BlobLoc { pack: *pack, offset: *off, len: *len, raw_len: *raw });
                }
            }
        }
        m
    }

    /// Add `m` to the cache of key `key_id` (merged with what another writer saved meanwhile).
    pub fn save_chunks(&self, key_id: &str, m: &HashMap<ChunkId, BlobLoc>, wait: Duration) -> Result<()> {
        let _lock = self.lock(wait)?;
        let mut all = self.load_chunks(key_id);
        all.extend(m.iter().map(|(k, v)| (*k, *v)));
        self.write_atomic(&format!("chunks-{key_id}.bin"), &encode_chunks(&all))
    }

    /// Keep the plaintext copy of a committed manifest (`z`: its zstd JSON, as `Writer::commit`
    /// returns it).
    pub fn save_manifest(&self, snapshot: &SnapshotId, z: &[u8]) -> Result<()> {
        self.write_atomic(&format!("manifests/{snapshot}.json.zst"), z)
    }

    pub fn load_manifest(&self, snap: &SnapshotId) -> Option<Manifest> {
        let z = std::fs::read(self.dir.join(format!("manifests/{snap}.json.zst"))).ok()?;
        let json = zstd::stream::decode_all(&z[..]).ok()?;
        serde_json::from_slice(&json).ok()
    }

    fn manifest_ids(&self) -> Vec<SnapshotId> {
        let Ok(rd) = std::fs::read_dir(self.dir.join("manifests")) else { return vec![] };
        rd.flatten().filter_map(|e| SnapshotId::parse(e.file_name().to_str()?.strip_suffix(".json.zst")?)).collect()
    }

    /// Forget manifest copies of snapshots that no longer exist. Only copies older than
    /// `since` go: a copy written by a concurrent backup is not in `keep` yet.
    pub fn retain_manifests(&self, keep: &std::collections::HashSet<SnapshotId>, since: std::time::SystemTime) {
        let Ok(rd) = std::fs::read_dir(self.dir.join("manifests")) else { return };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".json.zst") else { continue };
            let live = SnapshotId::parse(id).is_some_and(|id| keep.contains(&id));
            let old = e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t < since);
            if !live && old {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// `MAGIC`, records, then BLAKE3 of everything before it.
fn encode_chunks(m: &HashMap<ChunkId, BlobLoc>) -> Vec<u8> {
    let mut b = Vec::with_capacity(MAGIC.len() + m.len() * REC + 32);
    b.extend_from_slice(MAGIC);
    for (id, l) in m {
        b.extend_from_slice(id);
        b.extend_from_slice(&l.pack);
        b.extend_from_slice(&l.offset.to_le_bytes());
        b.extend_from_slice(&l.len.to_le_bytes());
        b.extend_from_slice(&l.raw_len.to_le_bytes());
    }
    let sum = blake3::hash(&b);
    b.extend_from_slice(sum.as_bytes());
    b
}

pub(crate) fn decode_chunks(b: &[u8]) -> Option<HashMap<ChunkId, BlobLoc>> {
    let body = b.get(..b.len().checked_sub(32)?)?;
    let records = body.strip_prefix(MAGIC.as_slice())?;
    if blake3::hash(body).as_bytes() != &b[body.len()..] || records.len() % REC != 0 {
        return None;
    }
    let mut m = HashMap::with_capacity(records.len() / REC);
    for r in records.chunks_exact(REC) {
        let id: ChunkId = r[0..32].try_into().ok()?;
        let pack: PackId = r[32..64].try_into().ok()?;
        let offset = u64::from_le_bytes(r[64..72].try_into().ok()?);
        let len = u32::from_le_bytes(r[72..76].try_into().ok()?);
        let raw_len = u32::from_le_bytes(r[76..80].try_into().ok()?);
        m.insert(id, BlobLoc { pack, offset, len, raw_len });
    }
    Some(m)
}

async fn upload_key(repo: &Writer, id: &str, key: &[u8; 32]) -> Result<()> {
    let kf = KeyFile { key: hex::encode(key), created: chrono::Utc::now().to_rfc3339(), host: super::lock::hostname() };
    repo.put_chunk_key(id, &kf).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chunk_cache_detects_a_flipped_byte() {
        let mut m = HashMap::new();
        m.insert([1u8; 32], BlobLoc { pack: [2u8; 32], offset: 77, len: 10, raw_len: 20 });
        let b = encode_chunks(&m);
        assert_eq!(decode_chunks(&b).unwrap().get(&[1u8; 32]).unwrap().offset, 77);
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 0x10;
            assert!(decode_chunks(&bad).is_none(), "a flip at byte {i} went unnoticed");
        }
        assert!(decode_chunks(&b[..b.len() - 1]).is_none());
        assert!(decode_chunks(b"").is_none());
    }
}
