//! The objects of the repository and their encodings (see docs/FORMAT.md).

use crate::source::postgres::wal::WalName;
use serde::{Deserialize, Serialize};

pub const FORMAT_VERSION: u32 = 2;
/// The manifest's own format: 3 added page layers (`Entry::pages`) and `Manifest::page_basis`;
/// 4, blobs sealed under a shared blob key (`crypto::blob`), which a reader of 3 cannot open.
/// A reader refuses a manifest newer than it knows, rather than restore it wrongly.
pub const MANIFEST_FORMAT: u32 = 4;

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
    pub id: SnapshotId,
    pub policy: String,
    pub kind: SnapshotKind,
    pub source: SourceKind,
    pub host: String,
    pub started: chrono::DateTime<chrono::Utc>,
    pub finished: chrono::DateTime<chrono::Utc>,
    pub parent: Option<SnapshotId>,
    pub packs: Vec<PackRef>,
    pub manifest_size: u64,
    pub stats: Stats,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PgMeta>,
    /// The backup's warnings, as the backup returns them; never stored in the sidecar (they
    /// name paths): the manifest holds them, the sidecar only their count.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    #[serde(default)]
    pub warning_count: u64,
    /// BLAKE3 of the sealed manifest and of the chunk-key object: the signature covers them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_hash: Option<String>,
    /// The writer's ed25519 signature over the sidecar as stored (`trust`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<crate::crypto::signing::Signature>,
}

impl Sidecar {
    /// The PostgreSQL block of a physical snapshot.
    pub fn pg(&self) -> Option<&PgInfo> {
        match &self.postgres {
            Some(PgMeta::Physical(p)) => Some(p),
            _ => None,
        }
    }
}

/// The `postgres` block of a sidecar: a physical backup's positions, or a dump's databases.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PgMeta {
    Physical(PgInfo),
    Logical(DumpInfo),
}

/// A logical snapshot: the server version and the databases dumped.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DumpInfo {
    pub version: String,
    pub databases: Vec<String>,
}

/// Whether a snapshot re-read everything or only what changed since its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotKind {
    Full,
    Incremental,
}

impl SnapshotKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotKind::Full => "full",
            SnapshotKind::Incremental => "incremental",
        }
    }
}

pub use crate::policy::SourceKind;

/// What a physical PostgreSQL snapshot needs to be restored and its WAL kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PgInfo {
    pub version: i32,
    pub system_identifier: String,
    pub timeline: u32,
    pub start_lsn: String,
    pub stop_lsn: String,
    pub start_wal: WalName,
    pub stop_wal: WalName,
    pub stop_time: chrono::DateTime<chrono::Utc>,
    pub wal_segment_size: u64,
    pub data_dir: std::path::PathBuf,
}

/// A snapshot id: `<UTC time>-<6 hex digits>`, sortable by time. Parsed from listings and the
/// command line, so only letters, digits and `-` are allowed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SnapshotId(String);

impl SnapshotId {
    pub fn parse(s: &str) -> Option<SnapshotId> {
        let ok = !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        ok.then(|| SnapshotId(s.to_string()))
    }

    /// A new id: sortable by time, unique by a random suffix.
    pub fn new(now: chrono::DateTime<chrono::Utc>) -> SnapshotId {
        SnapshotId(format!("{}-{:06x}", now.format("%Y%m%dT%H%M%SZ"), rand::random::<u32>() & 0xff_ffff))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SnapshotId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        SnapshotId::parse(&s).ok_or_else(|| format!("`{s}` is not a snapshot id"))
    }
}

impl From<SnapshotId> for String {
    fn from(s: SnapshotId) -> String {
        s.0
    }
}

impl std::fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PackRef {
    #[serde(with = "hex32")]
    pub id: PackId,
    pub size: u64,
}

/// A 32-byte id written as 64 hex digits.
pub mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(id))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        super::parse_hex32(&text).ok_or_else(|| serde::de::Error::custom(format!("`{text}` is not a 32-byte hex id")))
    }
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
    /// Pages whose checksum failed (PostgreSQL with data checksums), named in the warnings.
    #[serde(default)]
    pub page_checksum_failures: u64,
    /// Relation files stored as their changed pages over a base, and the pages stored so.
    #[serde(default)]
    pub files_layered: u64,
    #[serde(default)]
    pub pages_stored: u64,
}

/// `snapshots/<id>.manifest`: the encrypted tree.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Manifest {
    pub format: u32,
    pub snapshot: SnapshotId,
    pub policy: String,
    pub key_id: String,
    pub source_path: String,
    pub packs: Vec<String>,
    /// Chunk table: id, pack index, offset, encrypted length, plaintext length.
    pub chunks: Vec<(String, u32, u64, u32, u32)>,
    pub entries: Vec<Entry>,
    /// A physical PostgreSQL backup's label and tablespace map (`null` for other sources).
    #[serde(default)]
    pub extra: Option<PgLabel>,
    /// What the backup warned about (skipped and changing files), with their paths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// A physical backup's cluster, timeline and start: what the next backup compares page
    /// LSNs against to store only changed pages (`None`: no page layers on top of this one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_basis: Option<PageBasis>,
}

/// The position a physical snapshot's pages are as new as (see `Entry::pages`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PageBasis {
    pub system_identifier: String,
    pub timeline: u32,
    pub start_lsn: u64,
}

/// A relation file stored as a base (the entry's `chunks`, `base-size` bytes) with the pages
/// changed since laid over it, oldest layer first. A page of a later layer replaces the same
/// page of an earlier layer and of the base; the file is then cut to the entry's `size`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PageLayers {
    pub base_size: u64,
    pub layers: Vec<PageLayer>,
}

/// The pages one backup found changed: their contents, concatenated 8 KiB pages in the
/// order of `runs`, are the chunks `chunks` (chunk-table indices), each a whole number of pages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PageLayer {
    pub chunks: Vec<u32>,
    /// Runs of page numbers: `[first, count]`, in the order the pages are stored.
    pub runs: Vec<(u32, u32)>,
}

impl PageLayers {
    /// Pages held by all layers together (the chain's cost, for the re-base rule).
    pub fn pages(&self) -> u64 {
        self.layers.iter().flat_map(|l| l.runs.iter()).map(|r| r.1 as u64).sum()
    }
}

/// What `pg_backup_stop` returned: restored beside the data, never stored in PGDATA.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PgLabel {
    pub backup_label: String,
    #[serde(default)]
    pub tablespace_map: String,
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
    /// A relation file stored as base plus changed pages (manifest format 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages: Option<PageLayers>,
    /// A relation file's page digests, 16 bytes per page, as a chunk (chunk-table index), for
    /// a delta restore to compare page by page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digests: Option<u32>,
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

/// Blob plaintext framing: one flag byte (0 raw, 1 zstd) then the payload; then age.
pub const BLOB_RAW: u8 = 0;
pub const BLOB_ZSTD: u8 = 1;
