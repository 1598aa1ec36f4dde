//! The host's local state for one repository: the chunk-id key, the chunk locations it wrote
//! (for dedup) and plaintext copies of its own manifests (for incremental change detection).
//!
//! All of it can be lost: then the next backup re-reads and re-uploads, nothing else.

use super::format::*;
use super::Writer;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

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

const REC: usize = 32 + 32 + 8 + 4 + 4;

impl HostState {
    pub fn open(state_dir: &Path, repo_id: &str) -> Result<HostState> {
        let dir = state_dir.join("repos").join(repo_id);
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir.join("manifests")).map_err(|e| {
            Error::io("create state directory", &dir, e).with_hint("pass --state-dir DIR to a writable directory")
        })?;
        Ok(HostState { dir })
    }

    fn write_atomic(&self, name: &str, data: &[u8]) -> Result<()> {
        let path = self.dir.join(name);
        let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = path.with_file_name(format!(".{file}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| Error::io("write", &tmp, e))?;
        f.write_all(data).and_then(|_| f.sync_all()).map_err(|e| Error::io("write", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io("write", &path, e))
    }

    /// The chunk-id key of this host for this repository, creating and uploading it if needed.
    pub async fn chunk_key(&self, repo: &Writer) -> Result<(String, [u8; 32])> {
        let path = self.dir.join("chunk-key");
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Some((id, key)) =
                text.trim().split_once(':').and_then(|(i, k)| parse_hex32(k).map(|k| (i.to_string(), k)))
            {
                // The repository may have been recreated under us: make sure the key is there.
                if repo.has_chunk_key(&id).await? {
                    return Ok((id, key));
                }
                upload_key(repo, &id, &key).await?;
                return Ok((id, key));
            }
        }
        let key: [u8; 32] = rand::random();
        let id = hex::encode(rand::random::<[u8; 8]>());
        upload_key(repo, &id, &key).await?;
        self.write_atomic("chunk-key", format!("{id}:{}\n", hex::encode(key)).as_bytes())?;
        Ok((id, key))
    }

    /// Chunks this host wrote, with their locations.
    pub fn load_chunks(&self) -> HashMap<ChunkId, BlobLoc> {
        let Ok(b) = std::fs::read(self.dir.join("chunks.bin")) else {
            return HashMap::new();
        };
        let mut m = HashMap::with_capacity(b.len() / REC);
        for r in b.chunks_exact(REC) {
            let id: ChunkId = r[0..32].try_into().expect("32 bytes");
            let pack: PackId = r[32..64].try_into().expect("32 bytes");
            let offset = u64::from_le_bytes(r[64..72].try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(r[72..76].try_into().expect("4 bytes"));
            let raw_len = u32::from_le_bytes(r[76..80].try_into().expect("4 bytes"));
            m.insert(id, BlobLoc { pack, offset, len, raw_len });
        }
        m
    }

    pub fn save_chunks(&self, m: &HashMap<ChunkId, BlobLoc>) -> Result<()> {
        let mut b = Vec::with_capacity(m.len() * REC);
        for (id, l) in m {
            b.extend_from_slice(id);
            b.extend_from_slice(&l.pack);
            b.extend_from_slice(&l.offset.to_le_bytes());
            b.extend_from_slice(&l.len.to_le_bytes());
            b.extend_from_slice(&l.raw_len.to_le_bytes());
        }
        self.write_atomic("chunks.bin", &b)
    }

    pub fn save_manifest(&self, m: &Manifest) -> Result<()> {
        let json = serde_json::to_vec(m).expect("serialisable");
        let z = zstd::bulk::compress(&json, 3).map_err(|e| Error::failed(format!("cannot compress manifest: {e}")))?;
        self.write_atomic(&format!("manifests/{}.json.zst", m.snapshot), &z)
    }

    pub fn load_manifest(&self, snap: &SnapshotId) -> Option<Manifest> {
        let z = std::fs::read(self.dir.join(format!("manifests/{snap}.json.zst"))).ok()?;
        let json = zstd::stream::decode_all(&z[..]).ok()?;
        serde_json::from_slice(&json).ok()
    }

    /// Forget local manifests of snapshots that no longer exist.
    pub fn retain_manifests(&self, keep: &std::collections::HashSet<SnapshotId>) {
        if let Ok(rd) = std::fs::read_dir(self.dir.join("manifests")) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(id) = name.strip_suffix(".json.zst") {
                    if SnapshotId::parse(id).is_none_or(|id| !keep.contains(&id)) {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
    }
}

async fn upload_key(repo: &Writer, id: &str, key: &[u8; 32]) -> Result<()> {
    let kf = KeyFile { key: hex::encode(key), created: chrono::Utc::now().to_rfc3339(), host: super::lock::hostname() };
    repo.put_chunk_key(id, &kf).await
}
