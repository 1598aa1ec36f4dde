//! Opening an object store from a policy's `[repository]`, and the few operations the
//! repository needs, with errors that name the object and hint at the usual causes.

use crate::error::{Error, Kind, Result};
use crate::policy::RepositoryCfg;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ClientOptions, ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig};
use std::sync::Arc;
use std::time::Duration;

/// An object store rooted at the repository prefix.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    /// The repository URL, for messages.
    pub url: String,
}

impl Store {
    pub fn open(cfg: &RepositoryCfg) -> Result<Store> {
        let url = url::Url::parse(&cfg.url)
            .map_err(|e| Error::policy(format!("repository url `{}` is invalid: {e}", cfg.url)))?;
        let inner: Arc<dyn ObjectStore> = match url.scheme() {
            "file" => {
                let path = url
                    .to_file_path()
                    .map_err(|_| Error::policy(format!("repository url `{}` is not a local path", cfg.url)))?;
                std::fs::create_dir_all(&path).map_err(|e| Error::io("create repository directory", &path, e))?;
                Arc::new(
                    object_store::local::LocalFileSystem::new_with_prefix(&path)
                        .map_err(|e| Error::storage(format!("cannot open repository {}: {e}", cfg.url)))?,
                )
            }
            "s3" => {
                let bucket = url
                    .host_str()
                    .ok_or_else(|| Error::policy(format!("repository url `{}` names no bucket", cfg.url)))?;
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry())
                    .with_client_options(client_options());
                if let Some(ep) = &cfg.endpoint {
                    // Path-style requests and plain HTTP for self-hosted S3-compatible stores.
                    b = b
                        .with_endpoint(ep)
                        .with_virtual_hosted_style_request(false)
                        .with_allow_http(ep.starts_with("http://"));
                }
                if let Some(r) = &cfg.region {
                    b = b.with_region(r);
                } else if cfg.endpoint.is_some()
                    && std::env::var("AWS_REGION").is_err()
                    && std::env::var("AWS_DEFAULT_REGION").is_err()
                {
                    b = b.with_region("us-east-1");
                }
                if let Some(k) = &cfg.access_key_id {
                    b = b.with_access_key_id(k.resolve()?);
                }
                if let Some(k) = &cfg.secret_access_key {
                    b = b.with_secret_access_key(k.resolve()?);
                }
                if let Some(k) = &cfg.session_token {
                    b = b.with_token(k.resolve()?);
                }
                // Never rely on If-None-Match: some stores (Garage) accept and ignore it.
                b = b.with_conditional_put(object_store::aws::S3ConditionalPut::Disabled);
                Arc::new(
                    b.build().map_err(|e| Error::policy(format!("cannot configure s3 repository {}: {e}", cfg.url)))?,
                )
            }
            _ => {
                let opts: Vec<(String, String)> = cfg.options.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                let (store, _) = object_store::parse_url_opts(&url, opts)
                    .map_err(|e| Error::policy(format!("cannot open repository {}: {e}", cfg.url)))?;
                Arc::from(store)
            }
        };
        let prefix = match url.scheme() {
            "file" => String::new(),
            _ => url.path().trim_matches('/').to_string(),
        };
        let inner: Arc<dyn ObjectStore> = if prefix.is_empty() {
            inner
        } else {
            Arc::new(object_store::prefix::PrefixStore::new(inner, prefix.as_str()))
        };
        Ok(Store { inner, url: cfg.url.clone() })
    }

    /// Wrap any object store (tests use this to inject faults).
    pub fn from_object_store(inner: Arc<dyn ObjectStore>, url: &str) -> Store {
        Store { inner, url: url.to_string() }
    }

    pub fn raw(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    pub async fn get(&self, key: &str) -> Result<Bytes> {
        let r = self.inner.get(&ObjPath::from(key)).await.map_err(|e| self.err("read", key, e))?;
        r.bytes().await.map_err(|e| self.err("read", key, e))
    }

    /// `None` when the object does not exist.
    pub async fn get_opt(&self, key: &str) -> Result<Option<Bytes>> {
        match self.inner.get(&ObjPath::from(key)).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(|e| self.err("read", key, e))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("read", key, e)),
        }
    }

    pub async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> Result<Bytes> {
        let want = range.end - range.start;
        let b = self.inner.get_range(&ObjPath::from(key), range.clone()).await.map_err(|e| self.err("read", key, e))?;
        if b.len() as u64 != want {
            return Err(Error::damaged(format!(
                "object {key} is truncated: wanted bytes {}..{}, got {}",
                range.start,
                range.end,
                b.len()
            ))
            .with_hint("run `veza-dr verify` to list the damage; earlier snapshots may still restore"));
        }
        Ok(b)
    }

    pub async fn head_size(&self, key: &str) -> Result<Option<u64>> {
        match self.inner.head(&ObjPath::from(key)).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("stat", key, e)),
        }
    }

    pub async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        self.inner.put(&ObjPath::from(key), PutPayload::from(data)).await.map_err(|e| self.err("write", key, e))?;
        Ok(())
    }

    /// Store an object given as several buffers (a pack of blobs) without joining them.
    pub async fn put_parts(&self, key: &str, parts: Vec<Bytes>) -> Result<()> {
        let payload: PutPayload = parts.into_iter().collect();
        self.inner.put(&ObjPath::from(key), payload).await.map_err(|e| self.err("write", key, e))?;
        Ok(())
    }

    /// Create only if absent where the store enforces it; returns false if it already existed.
    pub async fn put_new(&self, key: &str, data: Bytes) -> Result<bool> {
        if self.head_size(key).await?.is_some() {
            return Ok(false);
        }
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.inner.put_opts(&ObjPath::from(key), PutPayload::from(data.clone()), opts).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            // Stores without conditional writes: HEAD above is the best check we have.
            Err(object_store::Error::NotImplemented) => {
                self.put(key, data).await?;
                Ok(true)
            }
            Err(e) => Err(self.err("write", key, e)),
        }
    }

    /// Upload a large object in parts, `part` bytes each.
    pub async fn put_multipart(&self, key: &str, parts: Vec<Bytes>, part: usize) -> Result<()> {
        let path = ObjPath::from(key);
        let upload = self.inner.put_multipart(&path).await.map_err(|e| self.err("write", key, e))?;
        let mut w = object_store::WriteMultipart::new_with_chunk_size(upload, part);
        for data in parts {
            w.wait_for_capacity(2).await.map_err(|e| self.err("write", key, e))?;
            w.write(&data);
        }
        w.finish().await.map_err(|e| self.err("write", key, e))?;
        Ok(())
    }

    pub async fn delete(&self, key: &str) -> Result<()> {
        match self.inner.delete(&ObjPath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("delete", key, e)),
        }
    }

    /// Every object under `prefix`, as (key relative to the repository, size).
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let p = ObjPath::from(prefix);
        let items: Vec<_> = self.inner.list(Some(&p)).try_collect().await.map_err(|e| self.err("list", prefix, e))?;
        Ok(items.into_iter().map(|m| (m.location.to_string(), m.size)).collect())
    }

    /// The newest modification time among objects under `prefix`, if any.
    pub async fn newest(&self, prefix: &str) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
        let p = ObjPath::from(prefix);
        let items: Vec<_> = self.inner.list(Some(&p)).try_collect().await.map_err(|e| self.err("list", prefix, e))?;
        Ok(items.into_iter().map(|m| m.last_modified).max())
    }

    fn err(&self, op: &str, key: &str, e: object_store::Error) -> Error {
        if let object_store::Error::NotFound { .. } = e {
            return Error::new(Kind::NotFound, format!("object {key} is missing from repository {}", self.url));
        }
        storage_error(&self.url, op, key, &e.to_string())
    }
}

/// Turn a store failure into one line with a hint for the usual causes.
pub fn storage_error(url: &str, op: &str, key: &str, text: &str) -> Error {
    let flat = text.replace('\n', " ");
    let lower = flat.to_lowercase();
    // Not a bare "403": it also matches ports and key names (127.0.0.1:40339).
    let hint = if lower.contains("status 403")
        || lower.contains("forbidden")
        || lower.contains("signature")
        || lower.contains("accessdenied")
        || lower.contains("invalidaccesskeyid")
    {
        "check the repository credentials (access-key-id / secret-access-key in the policy, or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    } else if lower.contains("nosuchbucket") {
        "the bucket does not exist: create it, or fix the bucket in the repository url"
    } else if ["connect", "error sending request", "connection reset", "broken pipe", "dns", "timed out", "timeout"]
        .iter()
        .any(|p| lower.contains(p))
    {
        "the endpoint is unreachable: check `endpoint` in the policy and that the object store is up"
    } else if lower.contains("no space") {
        "the repository disk is full"
    } else {
        "check the object store's logs; the operation is safe to retry"
    };
    let short: String = flat.chars().take(300).collect();
    Error::storage(format!("cannot {op} {key} in {url}: {short}")).with_hint(hint)
}

fn retry() -> RetryConfig {
    RetryConfig {
        max_retries: 4,
        retry_timeout: Duration::from_secs(30),
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            base: 2.0,
        },
    }
}

fn client_options() -> ClientOptions {
    ClientOptions::new().with_connect_timeout(Duration::from_secs(5)).with_timeout(Duration::from_secs(300))
}

#[cfg(test)]
mod tests {
    use super::storage_error;

    #[test]
    fn hints_follow_the_cause_not_digits_in_the_url() {
        let down = "Error performing GET http://127.0.0.1:40339/veza?list-type=2 in 1.3s, after 4 retries - HTTP error: error sending request";
        let e = storage_error("s3://veza/db", "list", "wal/", down);
        assert!(e.hint.as_deref().unwrap().starts_with("the endpoint is unreachable"), "{:?}", e.hint);
        let denied = "Client error with status 403 Forbidden: <Code>AccessDenied</Code>";
        let e = storage_error("s3://veza/db", "put", "data/x", denied);
        assert!(e.hint.as_deref().unwrap().starts_with("check the repository credentials"), "{:?}", e.hint);
    }
}
