//! The repository: a versioned layout of objects in any object store (docs/FORMAT.md).
//!
//! Three handles make the rules visible in types:
//! - [`Repository`] opens an existing repository and only reads (and takes leases); it never
//!   creates one, so a mistyped URL fails with the `veza-dr init` hint and leaves the store
//!   untouched;
//! - [`Writer`] holds the recipients and is the only way to put objects (writers may create
//!   the repository on first use, and log it once);
//! - [`Unlocked`] holds the restore-side identity and opens sealed objects.
//!
//! The store is private to this module and every object key is built in [`keys`].

pub mod durable;
pub mod format;
pub mod keys;
pub mod lock;
pub mod replicate;
pub mod state;
pub mod store;
pub mod trust;

use crate::crypto::{Identity, Sealer};
use crate::error::{Error, Kind, Result};
use crate::policy::{Policy, RepositoryCfg};
use crate::source::postgres::wal::WalName;
use bytes::Bytes;
use format::*;
use futures::StreamExt;
use std::collections::{BTreeMap, HashMap};
pub use store::Store;

/// The error of a read-only command pointed at a location that holds no repository.
pub fn no_repository(url: &str) -> Error {
    Error::not_found(format!("there is no veza-dr repository at {url}"))
        .with_hint("check the repository url in the policy; to create one there, run `veza-dr init <policy>`")
}

/// A read handle on an existing repository, for one policy.
#[derive(Clone)]
pub struct Repository {
    store: Store,
    config: RepoConfig,
    policy: String,
}

/// Objects marked for deletion by an earlier prune: object key → time marked.
pub type Marks = BTreeMap<String, chrono::DateTime<chrono::Utc>>;

impl Repository {
    /// Open the policy's repository; fails (and writes nothing) when there is none.
    pub async fn open(policy: &Policy) -> Result<Repository> {
        Self::open_cfg(&policy.repository, &policy.name).await
    }

    pub async fn open_cfg(cfg: &RepositoryCfg, policy: &str) -> Result<Repository> {
        let store = Store::open(cfg, false)?;
        Self::open_store(store, policy).await
    }

    /// Open over any store (tests wrap a real one to inject faults).
    pub async fn open_store(store: Store, policy: &str) -> Result<Repository> {
        let config = read_config(&store).await?.ok_or_else(|| no_repository(&store.url))?;
        Ok(Repository { store, config, policy: policy.to_string() })
    }

    /// Open the repository, creating it when the location holds none. Returns whether it was
    /// created. Only `init` and writers (backup, wal-push, the daemon) call this.
    pub async fn open_or_init(policy: &Policy) -> Result<(Repository, bool)> {
        let store = Store::open(&policy.repository, true)?;
        if let Some(config) = read_config(&store).await? {
            return Ok((Repository { store, config, policy: policy.name.clone() }, false));
        }
        let cfg = RepoConfig {
            format: FORMAT_VERSION,
            id: hex::encode(rand::random::<[u8; 16]>()),
            created: chrono::Utc::now().to_rfc3339(),
            chunker: ChunkerParams::default(),
        };
        let body = serde_json::to_vec_pretty(&cfg).expect("config serialises");
        store.put_new(keys::CONFIG, Bytes::from(body)).await?;
        // Read back: on a store without conditional create, a concurrent initialiser may have
        // won; everyone adopts what is stored.
        let config = read_config(&store).await?.ok_or_else(|| no_repository(&store.url))?;
        let created = config.id == cfg.id;
        if created {
            tracing::info!(repository = %store.url, id = %config.id, "initialised repository");
        }
        Ok((Repository { store, config, policy: policy.name.clone() }, created))
    }

    pub fn url(&self) -> &str {
        &self.store.url
    }

    /// The repository's id (names the host's local state for it).
    pub fn id(&self) -> &str {
        &self.config.id
    }

    pub fn chunker(&self) -> ChunkerParams {
        self.config.chunker
    }

    pub fn policy(&self) -> &str {
        &self.policy
    }

    /// A writer for this repository, sealing to `sealer`'s recipients.
    pub fn writer(&self, sealer: Sealer) -> Writer {
        Writer { repo: self.clone(), sealer, signer: None }
    }

    /// Open the repository's sealed objects with `identity`. Nothing is pinned: call
    /// [`Unlocked::trusting`] with the policy's writers.
    pub fn unlock(&self, identity: Identity) -> Unlocked {
        Unlocked { repo: self.clone(), identity, writers: vec![] }
    }

    /// Take a lease (shared for writers and readers, exclusive for prune).
    pub async fn lock(
        &self,
        kind: lock::LockKind,
        command: &str,
        wait: std::time::Duration,
    ) -> Result<lock::LockGuard> {
        lock::acquire(&self.store, kind, command, wait).await
    }

    /// Every committed snapshot of this repository (all policies), oldest first. A sidecar
    /// whose key or content does not parse is damage.
    pub async fn sidecars(&self) -> Result<Vec<Sidecar>> {
        let keys: Vec<String> = self
            .store
            .list(keys::SNAPSHOTS)
            .await?
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| k.ends_with(".json"))
            .collect();
        let store = &self.store;
        let mut out: Vec<Sidecar> = futures::stream::iter(keys)
            .map(|k| async move {
                store
                    .get_checked(&k, |b| {
                        let s = serde_json::from_slice::<Sidecar>(&b)
                            .map_err(|e| Error::damaged(format!("snapshot sidecar {k} is corrupted: {e}")))?;
                        if keys::sidecar(&s.id) != k {
                            return Err(Error::damaged(format!(
                                "snapshot sidecar {k} names another snapshot ({})",
                                s.id
                            )));
                        }
                        Ok(s)
                    })
                    .await
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_>>()?;
        out.sort_by(|a, b| a.started.cmp(&b.started).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Snapshots of this handle's policy, oldest first.
    pub async fn snapshots(&self) -> Result<Vec<Sidecar>> {
        let mut v = self.sidecars().await?;
        v.retain(|s| s.policy == self.policy);
        Ok(v)
    }

    /// Resolve `latest`, a full id or a unique prefix.
    pub async fn find_snapshot(&self, spec: &str) -> Result<Sidecar> {
        self.find_snapshot_in(spec, self.snapshots().await?)
    }

    /// Resolve `spec` among `snaps` (oldest first).
    fn find_snapshot_in(&self, spec: &str, snaps: Vec<Sidecar>) -> Result<Sidecar> {
        if spec == "latest" {
            return snaps.into_iter().last().ok_or_else(|| {
                Error::not_found(format!("policy {} has no snapshot yet in {}", self.policy, self.store.url))
                    .with_hint(format!("run `veza-dr backup {}` first", self.policy))
            });
        }
        let matches: Vec<Sidecar> = snaps.into_iter().filter(|s| s.id.as_str().starts_with(spec)).collect();
        match matches.len() {
            1 => Ok(matches.into_iter().next().expect("one match")),
            0 => Err(Error::not_found(format!("snapshot {spec} not found for policy {}", self.policy))
                .with_hint(format!("list them with `veza-dr snapshots {}`", self.policy))),
            n => Err(Error::usage(format!("snapshot prefix {spec} matches {n} snapshots"))
                .with_hint("give more characters of the id")),
        }
    }

    /// Every pack in the store: pack id → size. Stray keys under `data/` are left out.
    pub async fn packs(&self) -> Result<HashMap<PackId, u64>> {
        Ok(self
            .store
            .list(keys::DATA)
            .await?
            .into_iter()
            .filter_map(|(k, size)| keys::parse_pack(&k).map(|id| (id, size)))
            .collect())
    }

    /// Every pack index in the store.
    pub async fn indexes(&self) -> Result<Vec<PackId>> {
        Ok(self.store.list(keys::INDEX).await?.into_iter().filter_map(|(k, _)| keys::parse_index(&k)).collect())
    }

    /// The ids of every manifest object (committed or left by an interrupted backup).
    pub async fn manifests(&self) -> Result<Vec<SnapshotId>> {
        Ok(self.store.list(keys::SNAPSHOTS).await?.into_iter().filter_map(|(k, _)| keys::parse_manifest(&k)).collect())
    }

    pub async fn has_chunk_key(&self, key_id: &str) -> Result<bool> {
        Ok(self.store.head_size(&keys::chunk_key(key_id)).await?.is_some())
    }

    /// Bytes `range` of a pack; a short read is damage.
    pub async fn pack_range(&self, id: &PackId, range: std::ops::Range<u64>) -> Result<Bytes> {
        self.store.get_range(&keys::pack(id), range).await
    }

    /// A whole pack, checked against its id (the hash of its bytes); a mismatch is read again
    /// before it stands as damage.
    pub async fn pack(&self, id: &PackId) -> Result<Bytes> {
        let key = keys::pack(id);
        self.store
            .get_checked(&key, |b| {
                if blake3::hash(&b).as_bytes() == id {
                    Ok(b)
                } else {
                    Err(Error::damaged(format!("pack {key} does not match its id (corrupted)")))
                }
            })
            .await
    }

    pub async fn marks(&self) -> Result<Marks> {
        let parse = |b: Bytes| {
            serde_json::from_slice(&b).map_err(|e| Error::damaged(format!("object {} is corrupted: {e}", keys::MARKS)))
        };
        match self.store.get_checked(keys::MARKS, parse).await {
            Err(e) if e.kind == Kind::NotFound => Ok(Default::default()),
            r => r,
        }
    }

    /// The fingerprints stored for one WAL file of a cluster (normally zero or one).
    pub async fn wal_fingerprints(&self, cluster: u64, name: &WalName) -> Result<Vec<String>> {
        Ok(self
            .store
            .list(&keys::wal_dir(cluster, name))
            .await?
            .into_iter()
            .filter_map(|(k, _)| keys::parse_wal(&k).filter(|(c, n, _)| *c == cluster && n == name).map(|(.., fp)| fp))
            .collect())
    }

    /// One sealed WAL object, checked by `open` (read again when the check fails).
    pub async fn wal_object<T>(
        &self,
        cluster: u64,
        name: &WalName,
        fingerprint: &str,
        open: impl Fn(Bytes) -> Result<T>,
    ) -> Result<T> {
        self.store.get_checked(&keys::wal_object(cluster, name, fingerprint), open).await
    }

    /// Every archived WAL file of every cluster, sorted; keys that are not WAL objects are left out.
    pub async fn wal_files(&self) -> Result<Vec<(u64, WalName, String)>> {
        let mut v: Vec<(u64, WalName, String)> =
            self.store.list(keys::WAL).await?.into_iter().filter_map(|(k, _)| keys::parse_wal(&k)).collect();
        v.sort();
        Ok(v)
    }

    /// Every archived WAL file with when the store wrote it: (cluster, name, stored at).
    pub async fn wal_segments(&self) -> Result<Vec<(u64, WalName, chrono::DateTime<chrono::Utc>)>> {
        Ok(self
            .store
            .list_meta(keys::WAL)
            .await?
            .into_iter()
            .filter_map(|(k, _, at)| keys::parse_wal(&k).map(|(c, n, _)| (c, n, at)))
            .collect())
    }

    /// The clusters (system identifiers) whose WAL the repository holds: one listing.
    pub async fn wal_clusters(&self) -> Result<Vec<u64>> {
        Ok(self.store.list_dirs(keys::WAL).await?.iter().filter_map(|d| keys::parse_wal_cluster(d)).collect())
    }

    /// Objects and bytes the repository holds (every policy's): one listing.
    pub async fn usage(&self) -> Result<(u64, u64)> {
        let all = self.store.list("").await?;
        Ok((all.len() as u64, all.iter().map(|(_, n)| n).sum()))
    }

    /// When the newest WAL object was stored, if any.
    pub async fn newest_wal(&self) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
        self.store.newest(keys::WAL).await
    }

    /// The JSON drill reports of `policy`, oldest first (by id).
    pub async fn reports(&self, policy: &str) -> Result<Vec<(String, Bytes)>> {
        let mut ks: Vec<String> = self
            .store
            .list(&keys::reports(policy))
            .await?
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| k.ends_with(".json"))
            .collect();
        ks.sort();
        let mut out = Vec::new();
        for k in ks {
            let b = self.store.get(&k).await?;
            out.push((k, b));
        }
        Ok(out)
    }

    /// The ids of `policy`'s drill reports, oldest first: a listing, no report read.
    pub async fn report_ids(&self, policy: &str) -> Result<Vec<String>> {
        let prefix = keys::reports(policy);
        let mut ids: Vec<String> = self
            .store
            .list(&prefix)
            .await?
            .into_iter()
            .filter_map(|(k, _)| k.strip_prefix(&prefix)?.strip_suffix(".json").map(str::to_string))
            .collect();
        ids.sort();
        Ok(ids)
    }

    pub async fn report(&self, policy: &str, id: &str) -> Result<Bytes> {
        self.store.get(&keys::report(policy, id, "json")).await
    }
}

/// A JSON object of the repository (`what`: its key, for the error) as it is sealed: zstd
/// level 3 of its JSON.
fn json_zst<T: serde::Serialize>(v: &T, what: &str) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(v).expect("serialisable");
    zstd::bulk::compress(&json, 3).map_err(|e| Error::failed(format!("cannot compress {what}: {e}")))
}

/// A handle that can put objects: holds the recipients everything is sealed to.
#[derive(Clone)]
pub struct Writer {
    repo: Repository,
    sealer: Sealer,
    /// This host's key: sidecars and WAL objects it writes are signed with it.
    signer: Option<std::sync::Arc<ed25519_dalek::SigningKey>>,
}

impl std::ops::Deref for Writer {
    type Target = Repository;
    fn deref(&self) -> &Repository {
        &self.repo
    }
}

impl Writer {
    pub fn sealer(&self) -> &Sealer {
        &self.sealer
    }

    /// Sign what this writer commits with the host's key (`trust`).
    pub fn signing(mut self, key: ed25519_dalek::SigningKey) -> Writer {
        self.signer = Some(std::sync::Arc::new(key));
        self
    }

    /// Seal a JSON value (zstd, then age) and store it under `key`; returns its size and the
    /// BLAKE3 of the stored bytes.
    async fn put_sealed_json<T: serde::Serialize>(&self, key: &str, v: &T) -> Result<(u64, String)> {
        self.put_sealed_zst(key, &json_zst(v, key)?).await
    }

    /// Seal zstd-compressed JSON and store it under `key`, as `put_sealed_json`.
    async fn put_sealed_zst(&self, key: &str, z: &[u8]) -> Result<(u64, String)> {
        let sealed = self.sealer.seal(z)?;
        let n = sealed.len() as u64;
        let hash = blake3::hash(&sealed).to_hex().to_string();
        self.store.put(key, Bytes::from(sealed)).await?;
        Ok((n, hash))
    }

    pub async fn put_chunk_key(&self, key_id: &str, kf: &KeyFile) -> Result<()> {
        self.put_sealed_json(&keys::chunk_key(key_id), kf).await.map(|_| ())
    }

    /// The body of a WAL object: signed by this host when it has a key. `sealed` starts with
    /// `trust::WAL_HEAD` bytes left for the signature (`Sealer::seal_after`), which an unsigned
    /// body leaves out.
    pub fn wal_body(&self, mut sealed: Vec<u8>, cluster: u64, name: &WalName, fp: &str) -> Bytes {
        match &self.signer {
            Some(key) => {
                trust::sign_wal_in_place(&mut sealed, key, cluster, name, fp);
                Bytes::from(sealed)
            }
            None => Bytes::from(sealed).slice(trust::WAL_HEAD..),
        }
    }

    /// Store a pack given as its blobs (multipart above `multipart_threshold`), then its index.
    pub async fn put_pack(&self, id: &PackId, parts: Vec<Bytes>, size: u64, multipart_threshold: u64) -> Result<()> {
        let key = keys::pack(id);
        if size > multipart_threshold && self.store.multipart() {
            self.store.put_multipart(&key, parts, 8 << 20).await
        } else {
            self.store.put_parts(&key, parts).await
        }
    }

    /// A pack's index, already sealed.
    pub async fn put_index(&self, id: &PackId, sealed: Bytes) -> Result<()> {
        self.store.put(&keys::index(id), sealed).await
    }

    /// Commit a snapshot: the manifest first, then the sidecar that makes it exist. The lease
    /// is checked in the store before each write. Returns the manifest's zstd JSON as sealed,
    /// which is also the local plaintext copy: compressed once (a 25,000-file manifest is 9 MB
    /// of JSON; twice was a fifth of an unchanged re-run's CPU).
    pub async fn commit(&self, manifest: &Manifest, sidecar: &mut Sidecar, lease: &lock::LockGuard) -> Result<Vec<u8>> {
        lease.check().await?;
        let key = keys::manifest(&sidecar.id);
        let manifest_zst = json_zst(manifest, &key)?;
        let (size, hash) = self.put_sealed_zst(&key, &manifest_zst).await?;
        sidecar.manifest_size = size;
        sidecar.manifest_hash = Some(hash);
        // The writer cannot decrypt the key to check what it read, so the body must have the
        // size the store lists: a short answer would otherwise be hashed into the sidecar and
        // make the snapshot unrestorable (the S3 fault campaign found this).
        let kkey = keys::chunk_key(&manifest.key_id);
        let size = self.store.head_size(&kkey).await?.ok_or_else(|| missing_is_damage(Error::not_found(""), &kkey))?;
        let key = self
            .store
            .get_checked(&kkey, |b| {
                if b.len() as u64 == size {
                    Ok(b)
                } else {
                    Err(Error::damaged(format!("object {kkey}: read {} bytes of {size}", b.len())))
                }
            })
            .await
            .map_err(|e| missing_is_damage(e, "chunk key"))?;
        sidecar.key_hash = Some(blake3::hash(&key).to_hex().to_string());
        sidecar.finished = chrono::Utc::now();
        lease.check().await?;
        // Plaintext: the warnings (paths) stay in the encrypted manifest, only their count here.
        let mut stored = Sidecar { warnings: vec![], warning_count: sidecar.warnings.len() as u64, ..sidecar.clone() };
        if let Some(key) = &self.signer {
            trust::sign_sidecar(&mut stored, key);
            sidecar.signature = stored.signature.clone();
        }
        let body = serde_json::to_vec_pretty(&stored).expect("serialisable");
        self.store.put(&keys::sidecar(&sidecar.id), Bytes::from(body)).await?;
        Ok(manifest_zst)
    }

    /// Uncommit a snapshot: its sidecar first (then it no longer exists), then its manifest.
    pub async fn forget(&self, id: &SnapshotId) -> Result<()> {
        self.store.delete(&keys::sidecar(id)).await?;
        self.store.delete(&keys::manifest(id)).await
    }

    pub async fn put_wal(&self, cluster: u64, name: &WalName, fingerprint: &str, sealed: Bytes) -> Result<()> {
        self.store.put_cold(&keys::wal_object(cluster, name, fingerprint), sealed).await
    }

    pub async fn put_report(&self, policy: &str, id: &str, ext: &str, body: Bytes) -> Result<()> {
        self.store.put(&keys::report(policy, id, ext), body).await
    }

    pub async fn write_marks(&self, m: &Marks) -> Result<()> {
        self.store.put(keys::MARKS, Bytes::from(serde_json::to_vec_pretty(m).expect("serialisable"))).await
    }

    /// Delete one object that prune found unreferenced. Only keys of the shapes prune may
    /// collect are accepted: packs (with their index), indexes, manifests and WAL objects.
    pub async fn delete_garbage(&self, key: &str) -> Result<()> {
        if let Some(id) = keys::parse_pack(key) {
            self.store.delete(key).await?;
            return self.store.delete(&keys::index(&id)).await;
        }
        if keys::parse_index(key).is_some() || keys::parse_manifest(key).is_some() || keys::parse_wal(key).is_some() {
            return self.store.delete(key).await;
        }
        Err(Error::failed(format!("internal: prune refused to delete {key}, which is not a collectable object")))
    }
}

/// A handle that can open sealed objects: the repository and the restore-side identity.
#[derive(Clone)]
pub struct Unlocked {
    repo: Repository,
    identity: Identity,
    /// The writers whose objects are trusted (`[trust] writers`); empty: all.
    writers: Vec<crate::crypto::signing::PublicKey>,
}

impl std::ops::Deref for Unlocked {
    type Target = Repository;
    fn deref(&self) -> &Repository {
        &self.repo
    }
}

impl Unlocked {
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Accept only what `writers` signed (nothing pinned: everything).
    pub fn trusting(mut self, writers: &[crate::crypto::signing::PublicKey]) -> Unlocked {
        self.writers = writers.to_vec();
        self
    }

    pub fn writers(&self) -> &[crate::crypto::signing::PublicKey] {
        &self.writers
    }

    /// This policy's snapshots that trusted writers signed, oldest first (shadows the
    /// repository's: `latest` and every choice a restore or drill makes go through it).
    pub async fn snapshots(&self) -> Result<Vec<Sidecar>> {
        let mut v = self.repo.snapshots().await?;
        if !self.writers.is_empty() {
            v.retain(|s| trust::check_sidecar(s, &self.writers).is_ok());
        }
        Ok(v)
    }

    /// `latest` (the newest trusted), an id or a prefix; a named snapshot that no trusted writer
    /// signed is refused, naming its signer.
    pub async fn find_snapshot(&self, spec: &str) -> Result<Sidecar> {
        let s = self.repo.find_snapshot_in(spec, self.snapshots_for(spec).await?)?;
        trust::check_sidecar(&s, &self.writers)?;
        Ok(s)
    }

    async fn snapshots_for(&self, spec: &str) -> Result<Vec<Sidecar>> {
        if spec == "latest" {
            self.snapshots().await
        } else {
            self.repo.snapshots().await
        }
    }

    /// A sealed JSON object; with `hash`, its bytes must have that BLAKE3 (a replaced object
    /// is damage, whoever sealed it).
    async fn get_sealed_json<T: serde::de::DeserializeOwned>(&self, key: &str, hash: Option<&str>) -> Result<T> {
        self.store
            .get_checked(key, |b| {
                if hash.is_some_and(|h| blake3::hash(&b).to_hex().as_str() != h) {
                    return Err(Error::damaged(format!(
                        "object {key} is not the one its snapshot recorded (replaced)"
                    ))
                    .with_hint("run `veza-dr verify --read-data` to see what is affected; restore another snapshot"));
                }
                let z = self.identity.open(&b, &format_args!("object {key}"))?;
                let json = zstd::stream::decode_all(&z[..])
                    .map_err(|e| Error::damaged(format!("object {key} is corrupted: {e}")))?;
                serde_json::from_slice(&json).map_err(|e| Error::damaged(format!("object {key} is corrupted: {e}")))
            })
            .await
            .map_err(|e| missing_is_damage(e, key))
    }

    /// A snapshot's manifest: the snapshot's writer must be trusted, the object must have the
    /// hash its sidecar records, and it must name the snapshot; anything else is damage.
    pub async fn manifest(&self, snap: &Sidecar) -> Result<Manifest> {
        trust::check_sidecar(snap, &self.writers)?;
        let key = keys::manifest(&snap.id);
        let m: Manifest = self.get_sealed_json(&key, snap.manifest_hash.as_deref()).await?;
        if m.snapshot != snap.id {
            return Err(Error::damaged(format!("object {key} is the manifest of another snapshot ({})", m.snapshot)));
        }
        if m.format > MANIFEST_FORMAT {
            return Err(Error::failed(format!(
                "snapshot {} has manifest format {}, this veza-dr reads up to {MANIFEST_FORMAT}",
                snap.id, m.format
            ))
            .with_hint("restore it with the newer veza-dr that wrote it"));
        }
        Ok(m)
    }

    /// The chunk-id key of snapshot `snap`'s manifest, decrypted with the identity and checked
    /// against the hash the sidecar records.
    pub async fn chunk_key(&self, snap: &Sidecar, key_id: &str) -> Result<[u8; 32]> {
        let key = keys::chunk_key(key_id);
        let k: KeyFile = self.get_sealed_json(&key, snap.key_hash.as_deref()).await?;
        parse_hex32(&k.key).ok_or_else(|| Error::damaged(format!("object {key} holds a malformed key")))
    }
}

/// The repository's config, `None` when there is none; a config that does not parse is read
/// again (a short answer) before it stands as damage.
async fn read_config(store: &Store) -> Result<Option<RepoConfig>> {
    match store.get_checked(keys::CONFIG, |b| parse_config(&store.url, &b)).await {
        Ok(c) => Ok(Some(c)),
        Err(e) if e.kind == Kind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn parse_config(url: &str, b: &[u8]) -> Result<RepoConfig> {
    let cfg: RepoConfig = serde_json::from_slice(b).map_err(|e| {
        Error::damaged(format!("object config in {url} is not a veza-dr repository config: {e}"))
            .with_hint("the repository url points at something else, or its config was damaged: check the url")
    })?;
    if cfg.format != FORMAT_VERSION {
        return Err(Error::failed(format!(
            "repository {url} has format {}, this veza-dr reads format {FORMAT_VERSION}",
            cfg.format
        ))
        .with_hint("use the veza-dr version that wrote it"));
    }
    // The chunker sizes size the read buffers and FastCDC asserts its limits: a config written
    // by someone else must not make a backup allocate without bound or panic.
    let c = cfg.chunker;
    use fastcdc::v2020 as f;
    let sane = (f::MINIMUM_MIN..=f::MINIMUM_MAX).contains(&c.min)
        && (f::AVERAGE_MIN..=f::AVERAGE_MAX).contains(&c.avg)
        && (f::MAXIMUM_MIN..=f::MAXIMUM_MAX).contains(&c.max)
        && c.min <= c.avg
        && c.avg <= c.max;
    if !sane {
        return Err(Error::damaged(format!(
            "object config in {url} has chunk sizes out of range (min {}, avg {}, max {})",
            c.min, c.avg, c.max
        ))
        .with_hint("the repository config was damaged or not written by veza-dr init"));
    }
    Ok(cfg)
}

/// A missing object that a snapshot needs is damage, not a user error.
pub fn missing_is_damage(e: Error, key: &str) -> Error {
    if e.kind == Kind::NotFound {
        Error::damaged(format!("object {key} is missing")).with_hint("run `veza-dr verify` to see what is affected")
    } else {
        e
    }
}

#[cfg(test)]
mod config_tests {
    #[test]
    fn chunk_sizes_out_of_range_are_damage_not_a_panic() {
        let cfg = |min: u32, avg: u32, max: u32| {
            format!(
                r#"{{"format":{},"id":"x","created":"now","chunker":{{"min":{min},"avg":{avg},"max":{max}}}}}"#,
                super::FORMAT_VERSION
            )
        };
        assert!(super::parse_config("file:///r", cfg(256 << 10, 1 << 20, 4 << 20).as_bytes()).is_ok());
        for (min, avg, max) in [(0, 1 << 20, 4 << 20), (256 << 10, 1 << 20, u32::MAX), (2 << 20, 1 << 20, 4 << 20)] {
            let e = super::parse_config("file:///r", cfg(min, avg, max).as_bytes()).unwrap_err();
            assert_eq!(e.kind, crate::error::Kind::Damaged, "{}", e.message);
            assert!(e.message.contains("chunk sizes out of range"), "{}", e.message);
        }
    }
}
