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
    /// Open the store at a repository's URL. `create` lets a writer make the local directory
    /// of a file:// repository; readers never create anything.
    pub fn open(cfg: &RepositoryCfg, create: bool) -> Result<Store> {
        let url = url::Url::parse(&cfg.url)
            .map_err(|e| Error::policy(format!("repository url `{}` is invalid: {e}", cfg.url)))?;
        let inner: Arc<dyn ObjectStore> = match url.scheme() {
            "file" => {
                let path = url
                    .to_file_path()
                    .map_err(|_| Error::policy(format!("repository url `{}` is not a local path", cfg.url)))?;
                if create {
                    std::fs::create_dir_all(&path).map_err(|e| Error::io("create repository directory", &path, e))?;
                } else if !path.is_dir() {
                    return Err(super::no_repository(&cfg.url));
                }
                Arc::new(
                    super::durable::DurableLocal::new(&path)
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

    /// Whether large objects go up as multipart uploads (not on file://, where a put is one
    /// durable write).
    pub fn multipart(&self) -> bool {
        !self.url.starts_with("file:")
    }

    pub fn raw(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    pub async fn get(&self, key: &str) -> Result<Bytes> {
        self.get_checked(key, Ok).await
    }

    /// Read `key` and check it with `parse`. A body that breaks off (a reset mid-body) or whose
    /// content fails the check (a short body is caught only by the content's own checks) is
    /// read again, a few times with backoff and jitter, before its error stands: transient
    /// faults never look like damage. The request itself is retried by object_store.
    pub async fn get_checked<T>(&self, key: &str, parse: impl Fn(Bytes) -> Result<T>) -> Result<T> {
        let mut attempt = 1;
        loop {
            let r = self.inner.get(&ObjPath::from(key)).await.map_err(|e| self.err("read", key, e))?;
            let r = r.bytes().await.map_err(|e| self.err("read", key, e)).and_then(&parse);
            match r {
                Err(e) if retryable(&e) && attempt < READ_ATTEMPTS => {
                    backoff(attempt, &self.url, key, &e).await;
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    /// `None` when the object does not exist.
    pub async fn get_opt(&self, key: &str) -> Result<Option<Bytes>> {
        match self.get(key).await {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind == Kind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Bytes `range` of `key`; a short read is retried, then damage.
    pub async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> Result<Bytes> {
        let want = range.end - range.start;
        let mut attempt = 1;
        loop {
            let r =
                self.inner.get_range(&ObjPath::from(key), range.clone()).await.map_err(|e| self.err("read", key, e));
            let r = r.and_then(|b| {
                if b.len() as u64 == want {
                    return Ok(b);
                }
                Err(Error::damaged(format!(
                    "object {key} is truncated: wanted bytes {}..{}, got {}",
                    range.start,
                    range.end,
                    b.len()
                ))
                .with_hint("run `veza-dr verify` to list the damage; earlier snapshots may still restore"))
            });
            match r {
                Err(e) if retryable(&e) && attempt < READ_ATTEMPTS => {
                    backoff(attempt, &self.url, key, &e).await;
                    attempt += 1;
                }
                r => return r,
            }
        }
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

    /// `put` of an object nothing will read again soon (a WAL object): on file:// it is
    /// written past the page cache (`durable::NotReadSoon`).
    pub async fn put_cold(&self, key: &str, data: Bytes) -> Result<()> {
        let mut opts = PutOptions::default();
        opts.extensions.insert(super::durable::NotReadSoon);
        self.inner
            .put_opts(&ObjPath::from(key), PutPayload::from(data), opts)
            .await
            .map_err(|e| self.err("write", key, e))?;
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

    /// Every object under `prefix` with its size and the store's modification time.
    pub async fn list_meta(&self, prefix: &str) -> Result<Vec<(String, u64, chrono::DateTime<chrono::Utc>)>> {
        let p = ObjPath::from(prefix);
        let items: Vec<_> = self.inner.list(Some(&p)).try_collect().await.map_err(|e| self.err("list", prefix, e))?;
        Ok(items.into_iter().map(|m| (m.location.to_string(), m.size, m.last_modified)).collect())
    }

    /// The "folders" right under `prefix` (a delimited listing), as keys ending in `/`.
    pub async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>> {
        let p = ObjPath::from(prefix);
        let r = self.inner.list_with_delimiter(Some(&p)).await.map_err(|e| self.err("list", prefix, e))?;
        Ok(r.common_prefixes.into_iter().map(|d| format!("{d}/")).collect())
    }

    /// The newest modification time among objects under `prefix`, if any.
    pub async fn newest(&self, prefix: &str) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
        let p = ObjPath::from(prefix);
        let items: Vec<_> = self.inner.list(Some(&p)).try_collect().await.map_err(|e| self.err("list", prefix, e))?;
        Ok(items.into_iter().map(|m| m.last_modified).max())
    }

    fn err(&self, op: &str, key: &str, e: object_store::Error) -> Error {
        storage_error(&self.url, op, key, e)
    }
}

/// Reads are tried this often before their error stands.
const READ_ATTEMPTS: u32 = 4;

/// Storage failures and content that failed its check may pass on another try; a missing
/// object or a refused credential will not.
fn retryable(e: &Error) -> bool {
    matches!(e.kind, Kind::Storage | Kind::Damaged)
}

/// Wait before attempt `attempt + 1`: 250 ms doubling, with ±50 % jitter, and say so.
async fn backoff(attempt: u32, url: &str, key: &str, e: &Error) {
    let base = 250u64 << (attempt - 1).min(4);
    let wait = Duration::from_millis(base / 2 + rand::random::<u64>() % base);
    tracing::warn!(
        "retrying read of {key} in {url} in {} ms (attempt {} of {READ_ATTEMPTS}) after: {}",
        wait.as_millis(),
        attempt + 1,
        e.message
    );
    tokio::time::sleep(wait).await;
}

/// A store failure as one line, classified by the error's variant and causes (never its text).
pub fn storage_error(url: &str, op: &str, key: &str, e: object_store::Error) -> Error {
    use object_store::Error as E;
    let (kind, hint) = match &e {
        E::NotFound { .. } if op == "read" || op == "stat" => {
            let msg = format!("object {key} is missing from repository {url}");
            return Error::new(Kind::NotFound, msg).with_cause(e);
        }
        E::NotFound { .. } => (Kind::Storage, "the bucket does not exist: create it, or fix the bucket in the repository url"),
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => (
            Kind::Storage,
            "check the repository credentials (access-key-id / secret-access-key in the policy, or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)",
        ),
        _ => (Kind::Storage, cause_hint(&e)),
    };
    let flat = e.to_string().replace('\n', " ");
    let short: String = flat.chars().take(300).collect();
    Error::new(kind, format!("cannot {op} {key} in {url}: {short}")).with_hint(hint).with_cause(e)
}

/// The hint for a failure whose variant says nothing: look at the errors underneath.
fn cause_hint(e: &(dyn std::error::Error + 'static)) -> &'static str {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(r) = c.downcast_ref::<reqwest::Error>() {
            if r.is_connect() || r.is_timeout() {
                return "the endpoint is unreachable: check `endpoint` in the policy and that the object store is up";
            }
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::StorageFull => return "the repository disk is full",
                std::io::ErrorKind::PermissionDenied => {
                    return "veza-dr cannot write the repository directory: check its owner and mode"
                }
                std::io::ErrorKind::ConnectionRefused
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::TimedOut => {
                    return "the endpoint is unreachable: check `endpoint` in the policy and that the object store is up"
                }
                _ => {}
            }
        }
        cur = c.source();
    }
    "check the object store's logs; the operation is safe to retry"
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
    fn hints_follow_the_variant_not_digits_in_the_url() {
        let denied = object_store::Error::PermissionDenied { path: "data/x".into(), source: "status 403".into() };
        let e = storage_error("s3://veza/db", "write", "data/x", denied);
        assert!(e.hint.as_deref().unwrap().starts_with("check the repository credentials"), "{:?}", e.hint);
        let io = std::io::Error::new(std::io::ErrorKind::StorageFull, "no space");
        let full = object_store::Error::Generic { store: "LocalFileSystem", source: Box::new(io) };
        let e = storage_error("file:///r", "write", "data/x", full);
        assert_eq!(e.hint.as_deref(), Some("the repository disk is full"));
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "127.0.0.1:40339");
        let down = object_store::Error::Generic { store: "S3", source: Box::new(refused) };
        let e = storage_error("s3://veza/db", "list", "wal/", down);
        assert!(e.hint.as_deref().unwrap().starts_with("the endpoint is unreachable"), "{:?}", e.hint);
        let missing = object_store::Error::NotFound { path: "config".into(), source: "404".into() };
        assert_eq!(storage_error("s3://veza/db", "read", "config", missing).kind, crate::error::Kind::NotFound);
    }
}
