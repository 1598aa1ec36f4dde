//! The repository: a versioned layout of objects in any object store (docs/FORMAT.md).
//!
//! Opening initialises an empty location. Writers need only the recipients; readers of
//! encrypted objects (manifests, keys, chunks) need an identity.

pub mod cache;
pub mod format;
pub mod lock;
pub mod store;

use crate::crypto::{Opener, Sealer};
use crate::error::{Error, Result};
use crate::policy::Policy;
use bytes::Bytes;
use format::*;
use futures::StreamExt;
pub use store::Store;

pub struct Repo {
    pub store: Store,
    pub config: RepoConfig,
    pub sealer: Sealer,
    pub policy_name: String,
}

impl Repo {
    /// Open the policy's repository, creating it on first use.
    pub async fn open(policy: &Policy) -> Result<Repo> {
        let store = Store::open(&policy.repository)?;
        Self::open_store(store, policy).await
    }

    pub async fn open_store(store: Store, policy: &Policy) -> Result<Repo> {
        let config = match store.get_opt("config").await? {
            Some(b) => parse_config(&store.url, &b)?,
            None => {
                let cfg = RepoConfig {
                    format: FORMAT_VERSION,
                    id: hex::encode(rand::random::<[u8; 16]>()),
                    created: chrono::Utc::now().to_rfc3339(),
                    chunker: ChunkerParams::default(),
                };
                let body = serde_json::to_vec_pretty(&cfg).expect("config serialises");
                store.put_new("config", Bytes::from(body)).await?;
                // Read back: on a store without conditional create, a concurrent initialiser may
                // have won; everyone adopts what is stored.
                let b = store.get("config").await?;
                let stored = parse_config(&store.url, &b)?;
                tracing::info!(repository = %store.url, id = %stored.id, "initialised repository");
                stored
            }
        };
        Ok(Repo { store, config, sealer: Sealer::new(&policy.encryption.recipients), policy_name: policy.name.clone() })
    }

    /// Encrypt and store a JSON value under `key` (zstd, then age).
    pub async fn put_sealed_json<T: serde::Serialize>(&self, key: &str, v: &T) -> Result<u64> {
        let json = serde_json::to_vec(v).expect("serialisable");
        let z = zstd::bulk::compress(&json, 3).map_err(|e| Error::failed(format!("cannot compress {key}: {e}")))?;
        let sealed = self.sealer.seal(&z)?;
        let n = sealed.len() as u64;
        self.store.put(key, Bytes::from(sealed)).await?;
        Ok(n)
    }

    pub async fn get_sealed_json<T: serde::de::DeserializeOwned>(&self, key: &str, opener: &Opener) -> Result<T> {
        let b = self.store.get(key).await.map_err(|e| missing_is_damage(e, key))?;
        let z = opener.open(&b, &format_args!("object {key}"))?;
        let json =
            zstd::stream::decode_all(&z[..]).map_err(|e| Error::damaged(format!("object {key} is corrupted: {e}")))?;
        serde_json::from_slice(&json).map_err(|e| Error::damaged(format!("object {key} is corrupted: {e}")))
    }

    /// Every committed snapshot of this repository (all policies), oldest first.
    pub async fn sidecars(&self) -> Result<Vec<Sidecar>> {
        let keys: Vec<String> =
            self.store.list("snapshots/").await?.into_iter().map(|(k, _)| k).filter(|k| k.ends_with(".json")).collect();
        let store = &self.store;
        let mut out: Vec<Sidecar> = futures::stream::iter(keys)
            .map(|k| async move {
                let b = store.get(&k).await?;
                serde_json::from_slice::<Sidecar>(&b)
                    .map_err(|e| Error::damaged(format!("snapshot sidecar {k} is corrupted: {e}")))
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_>>()?;
        out.sort_by(|a, b| a.started.cmp(&b.started).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Snapshots of this repository's policy, oldest first.
    pub async fn snapshots(&self) -> Result<Vec<Sidecar>> {
        let mut v = self.sidecars().await?;
        v.retain(|s| s.policy == self.policy_name);
        Ok(v)
    }

    /// Resolve `latest`, a full id or a unique prefix.
    pub async fn find_snapshot(&self, spec: &str) -> Result<Sidecar> {
        let snaps = self.snapshots().await?;
        if spec == "latest" {
            return snaps.into_iter().last().ok_or_else(|| {
                Error::not_found(format!("policy {} has no snapshot yet in {}", self.policy_name, self.store.url))
                    .with_hint(format!("run `veza-dr backup {}` first", self.policy_name))
            });
        }
        let matches: Vec<Sidecar> = snaps.into_iter().filter(|s| s.id.starts_with(spec)).collect();
        match matches.len() {
            1 => Ok(matches.into_iter().next().expect("one match")),
            0 => Err(Error::not_found(format!("snapshot {spec} not found for policy {}", self.policy_name))
                .with_hint(format!("list them with `veza-dr snapshots {}`", self.policy_name))),
            n => Err(Error::usage(format!("snapshot prefix {spec} matches {n} snapshots"))
                .with_hint("give more characters of the id")),
        }
    }

    pub async fn manifest(&self, snap: &Sidecar, opener: &Opener) -> Result<Manifest> {
        self.get_sealed_json(&manifest_key(&snap.id), opener).await
    }

    /// The chunk-id key `key_id`, decrypted with the identity.
    pub async fn chunk_key(&self, key_id: &str, opener: &Opener) -> Result<[u8; 32]> {
        let k: KeyFile = self.get_sealed_json(&format!("keys/{key_id}"), opener).await?;
        parse_hex32(&k.key).ok_or_else(|| Error::damaged(format!("object keys/{key_id} holds a malformed key")))
    }

    /// Packs marked for deletion by an earlier prune: (object key → time marked).
    pub async fn marks(&self) -> Result<std::collections::BTreeMap<String, chrono::DateTime<chrono::Utc>>> {
        match self.store.get_opt("prune/marks.json").await? {
            None => Ok(Default::default()),
            Some(b) => serde_json::from_slice(&b)
                .map_err(|e| Error::damaged(format!("object prune/marks.json is corrupted: {e}"))),
        }
    }

    pub async fn write_marks(
        &self,
        m: &std::collections::BTreeMap<String, chrono::DateTime<chrono::Utc>>,
    ) -> Result<()> {
        self.store.put("prune/marks.json", Bytes::from(serde_json::to_vec_pretty(m).expect("serialisable"))).await
    }

    /// Every pack in the store: pack id → size.
    pub async fn packs(&self) -> Result<std::collections::HashMap<PackId, u64>> {
        Ok(self
            .store
            .list("data/")
            .await?
            .into_iter()
            .filter_map(|(k, size)| k.rsplit('/').next().and_then(parse_hex32).map(|id| (id, size)))
            .collect())
    }
}

fn parse_config(url: &str, b: &[u8]) -> Result<RepoConfig> {
    let cfg: RepoConfig = serde_json::from_slice(b)
        .map_err(|e| Error::damaged(format!("object config in {url} is not a veza-dr repository config: {e}")))?;
    if cfg.format != FORMAT_VERSION {
        return Err(Error::failed(format!(
            "repository {url} has format {}, this veza-dr reads format {FORMAT_VERSION}",
            cfg.format
        ))
        .with_hint("use the veza-dr version that wrote it"));
    }
    Ok(cfg)
}

/// A missing object that a snapshot needs is damage, not a user error.
pub fn missing_is_damage(e: Error, key: &str) -> Error {
    if e.kind == crate::error::Kind::NotFound {
        Error::damaged(format!("object {key} is missing")).with_hint("run `veza-dr verify` to see what is affected")
    } else {
        e
    }
}
