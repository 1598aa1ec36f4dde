//! A file:// store whose writes survive a power cut: object_store's `LocalFileSystem` writes
//! and renames without `fsync`, so `wal-push` could exit 0 for a segment the next power cut
//! erases, and a sidecar could outlive the packs it names.
//!
//! Here a put writes a temporary file in `.tmp/` at the repository root, fsyncs it, renames it
//! into place (or links it, for a create-only put) and fsyncs every directory from the
//! object's up to the repository root (new directories too); a delete fsyncs the directory it
//! removed from. Only then does the call return. A writer killed mid-put leaves its temporary
//! file in `.tmp/`, outside every prefix the repository lists; opening the store removes those
//! older than an hour. Reads, listings and copies go to `LocalFileSystem` unchanged.

use async_trait::async_trait;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMode, PutMultipartOptions,
    PutOptions, PutPayload, PutResult, Result,
};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct DurableLocal {
    inner: Arc<LocalFileSystem>,
    root: Arc<PathBuf>,
}

impl DurableLocal {
    pub fn new(root: &std::path::Path) -> Result<DurableLocal> {
        let inner = LocalFileSystem::new_with_prefix(root)?;
        let root = std::fs::canonicalize(root).map_err(generic)?;
        if let Ok(rd) = std::fs::read_dir(root.join(TMP)) {
            for e in rd.flatten() {
                let old = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
                if old.is_some_and(|age| age > std::time::Duration::from_secs(3600)) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(DurableLocal { inner: Arc::new(inner), root: Arc::new(root) })
    }
}

impl std::fmt::Display for DurableLocal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DurableLocal({})", self.root.display())
    }
}

/// Where puts stage their data, beside (not inside) every prefix of the repository.
const TMP: &str = ".tmp";

fn generic(e: std::io::Error) -> object_store::Error {
    object_store::Error::Generic { store: "DurableLocal", source: Box::new(e) }
}

fn sync_dir(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl DurableLocal {
    /// fsync every directory from `dir` up to the root: the entries of directories just
    /// created must be durable too.
    fn sync_up(&self, dir: &std::path::Path) -> std::io::Result<()> {
        let mut cur = Some(dir);
        while let Some(d) = cur {
            sync_dir(d)?;
            if d == self.root.as_path() {
                break;
            }
            cur = d.parent().filter(|p| p.starts_with(self.root.as_path()));
        }
        Ok(())
    }

    fn put_blocking(&self, dest: PathBuf, payload: PutPayload, mode: PutMode) -> Result<PutResult> {
        let dir = dest.parent().map(std::path::Path::to_path_buf).unwrap_or_else(|| self.root.to_path_buf());
        std::fs::create_dir_all(&dir).map_err(generic)?;
        let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let staging = self.root.join(TMP);
        std::fs::create_dir_all(&staging).map_err(generic)?;
        let tmp = staging.join(format!("{name}.{}.{}.part", std::process::id(), rand::random::<u64>()));
        let written = (|| -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            for chunk in payload.iter() {
                f.write_all(chunk)?;
            }
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(generic(e));
        }
        let placed = match mode {
            // Create only: a hard link fails if the name exists, atomically.
            PutMode::Create => match std::fs::hard_link(&tmp, &dest) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(object_store::Error::AlreadyExists {
                        path: dest.display().to_string(),
                        source: Box::new(e),
                    });
                }
                r => r.and_then(|_| std::fs::remove_file(&tmp)),
            },
            _ => std::fs::rename(&tmp, &dest),
        };
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            return Err(generic(e));
        }
        self.sync_up(&dir).map_err(generic)?;
        Ok(PutResult { e_tag: None, version: None })
    }
}

#[async_trait]
impl ObjectStore for DurableLocal {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        if matches!(opts.mode, PutMode::Update(_)) {
            return Err(object_store::Error::NotImplemented);
        }
        let dest = self.inner.path_to_filesystem(location)?;
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.put_blocking(dest, payload, opts.mode))
            .await
            .map_err(|e| object_store::Error::JoinError { source: e })?
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
        // Writers never use multipart on file:// (a pack is one put); keep it working, not durable.
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn delete(&self, location: &Path) -> Result<()> {
        self.inner.delete(location).await?;
        let dest = self.inner.path_to_filesystem(location)?;
        if let Some(dir) = dest.parent().filter(|d| d.exists()) {
            let dir = dir.to_path_buf();
            tokio::task::spawn_blocking(move || sync_dir(&dir))
                .await
                .map_err(|e| object_store::Error::JoinError { source: e })?
                .map_err(generic)?;
        }
        Ok(())
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy(&self, from: &Path, to: &Path) -> Result<()> {
        self.inner.copy(from, to).await
    }

    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> Result<()> {
        self.inner.copy_if_not_exists(from, to).await
    }
}
