//! The objects of the repository and their encodings (see docs/FORMAT.md).

use serde::{Deserialize, Serialize};

pub const FORMAT_VERSION: u32 = 1;

/// `config`: plaintext, written once when the repository is created.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RepoConfig {
    pub format: u32,
    pub id: String,
    pub created: String,
    pub chunker: ChunkerParams,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ChunkerParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Default for ChunkerParams {
    fn default() -> Self {
        ChunkerParams { min: 256 << 10, avg: 1 << 20, max: 4 << 20 }
    }
}

/// `keys/<key-id>`: the chunk-id key, encrypted to the recipients.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyFile {
    pub key: String,
    pub created: String,
    pub host: String,
}

/// A 32-byte chunk id (keyed BLAKE3 of the plaintext chunk).
pub type ChunkId = [u8; 32];

/// Where one encrypted chunk lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobLoc {
    pub pack: PackId,
    pub offset: u64,
    pub len: u32,
    pub raw_len: u32,
}

/// A pack id: unkeyed BLAKE3 of the pack's bytes, so anyone can check a pack without a key.
pub type PackId = [u8; 32];

pub fn pack_key(id: &PackId) -> String {
    let h = hex::encode(id);
    format!("data/{}/{h}", &h[..2])
}

/// The object key of a pack given as hex (as sidecars list them).
pub fn pack_key_hex(id: &str) -> String {
    format!("data/{}/{id}", id.get(..2).unwrap_or(id))
}

pub fn index_key(id: &PackId) -> String {
    format!("index/{}", hex::encode(id))
}

pub fn sidecar_key(snap: &str) -> String {
    format!("snapshots/{snap}.json")
}

pub fn manifest_key(snap: &str) -> String {
    format!("snapshots/{snap}.manifest")
}

pub fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let v = hex::decode(s).ok()?;
    v.try_into().ok()
}

/// `index/<pack-id>`: encrypted list of the chunks in a pack.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PackIndex {
    pub chunks: Vec<IndexEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexEntry {
    pub id: String,
    pub off: u64,
    pub len: u32,
    pub raw: u32,
}

/// `snapshots/<id>.json`: the plaintext sidecar. Its presence is what makes a snapshot exist.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Sidecar {
    pub format: u32,
    pub id: String,
    pub policy: String,
    pub kind: String,
    pub source: String,
    pub host: String,
    pub started: chrono::DateTime<chrono::Utc>,
    pub finished: chrono::DateTime<chrono::Utc>,
    pub parent: Option<String>,
    pub packs: Vec<PackRef>,
    pub manifest_size: u64,
    pub stats: Stats,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PackRef {
    pub id: String,
    pub size: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Stats {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    pub files_read: u64,
    pub bytes_read: u64,
    pub chunks_new: u64,
    pub bytes_new: u64,
    pub bytes_uploaded: u64,
    pub files_changed_during_read: u64,
    pub skipped: u64,
}

/// `snapshots/<id>.manifest`: the encrypted tree.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Manifest {
    pub format: u32,
    pub snapshot: String,
    pub policy: String,
    pub key_id: String,
    pub source_path: String,
    pub packs: Vec<String>,
    /// Chunk table: id, pack index, offset, encrypted length, plaintext length.
    pub chunks: Vec<(String, u32, u64, u32, u32)>,
    pub entries: Vec<Entry>,
    #[serde(default)]
    pub extra: serde_json::Value,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum EntryKind {
    Dir,
    File,
    Symlink,
    Hardlink,
}

/// One path of the tree. Paths are relative, `/`-separated; non-UTF-8 names are hex-encoded
/// in `path-hex` so that every name survives the round trip.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Entry {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_hex: Option<String>,
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_ns: u32,
    #[serde(default)]
    pub size: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<u32>,
    /// Symlink target (hex if not UTF-8, prefixed `hex:`), or the path a hard link points to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// BLAKE3 of the whole content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// Changed while being read: the content may be inconsistent.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub changed: bool,
    /// Local-only change detection (inode and ctime); not needed to restore.
    #[serde(default)]
    pub ino: u64,
    #[serde(default)]
    pub ctime: i64,
}

use std::os::unix::ffi::{OsStrExt, OsStringExt};

impl Entry {
    pub fn rel_path(&self) -> std::path::PathBuf {
        match &self.path_hex {
            Some(h) => std::ffi::OsString::from_vec(hex::decode(h).unwrap_or_default()).into(),
            None => std::path::PathBuf::from(&self.path),
        }
    }

    pub fn set_path(&mut self, p: &std::path::Path) {
        match p.to_str() {
            Some(s) => {
                self.path = s.to_string();
                self.path_hex = None;
            }
            None => {
                self.path = String::new();
                self.path_hex = Some(hex::encode(p.as_os_str().as_bytes()));
            }
        }
    }

    /// A printable form of the path for messages.
    pub fn display(&self) -> String {
        self.rel_path().to_string_lossy().into_owned()
    }
}

pub fn encode_os(p: &std::ffi::OsStr) -> String {
    match p.to_str() {
        Some(s) if !s.starts_with("hex:") => s.to_string(),
        _ => format!("hex:{}", hex::encode(p.as_bytes())),
    }
}

pub fn decode_os(s: &str) -> std::ffi::OsString {
    match s.strip_prefix("hex:").and_then(|h| hex::decode(h).ok()) {
        Some(b) => std::ffi::OsString::from_vec(b),
        None => s.into(),
    }
}

/// A new snapshot id: sortable by time, unique by a random suffix.
pub fn new_snapshot_id(now: chrono::DateTime<chrono::Utc>) -> String {
    format!("{}-{:06x}", now.format("%Y%m%dT%H%M%SZ"), rand::random::<u32>() & 0xff_ffff)
}

/// Blob plaintext framing: one flag byte (0 raw, 1 zstd) then the payload; then age.
pub const BLOB_RAW: u8 = 0;
pub const BLOB_ZSTD: u8 = 1;
