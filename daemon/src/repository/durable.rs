//! A file:// store whose writes survive a power cut: object_store's `LocalFileSystem` writes
//! and renames without `fsync`, so `wal-push` could exit 0 for a segment the next power cut
//! erases, and a sidecar could outlive the packs it names.
//!
//! Here a put writes a temporary file in `.tmp/` at the repository root, fsyncs it, renames it
//! into place (or links it, for a create-only put) and fsyncs every directory from the
//! object's up to the repository root (new directories too); a delete fsyncs the directory it
//! removed from. Only then does the call return. Objects marked `NotReadSoon` (WAL) are
//! written past the page cache, where the file system allows it. A writer killed mid-put leaves its temporary
//! file in `.tmp/`, outside every prefix the repository lists; opening the store removes those
//! older than an hour. Reads, listings and copies go to `LocalFileSystem` unchanged.

use crate::pipeline::sink::ALIGN;
use async_trait::async_trait;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMode, PutMultipartOptions,
    PutOptions, PutPayload, PutResult, Result,
};
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

/// A put's mark (in `PutOptions::extensions`): nothing will read this object again soon, so
/// its whole blocks are written past the page cache when it is at least `DIRECT_MIN` long.
/// WAL objects carry it (`Store::put_cold`): a push is what PostgreSQL waits for, and while
/// PostgreSQL writes hard the kernel throttles every buffered writer with its dirty pages (in
/// a bulk load a 2.5 MB object took 6.6-12 ms to write through the cache, 0.7 ms idle), while
/// nothing reads a WAL object before a restore. Other stores ignore the mark.
#[derive(Clone, Copy, Debug)]
pub struct NotReadSoon;

/// Marked objects smaller than this go through the page cache all the same.
const DIRECT_MIN: usize = 64 << 10;

/// `path` opened again for writes past the page cache, when its file system takes them at
/// `ALIGN` (statx `STATX_DIOALIGN`); `None` otherwise, and the put goes through the cache.
fn open_direct(path: &std::path::Path) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new().write(true).custom_flags(nix::libc::O_DIRECT).open(path).ok()?;
    crate::pipeline::safe_dir::dio_aligned(&f, ALIGN).then_some(f)
}

/// Write the whole blocks at the start of a one-part `payload` to `f` (opened `O_DIRECT`),
/// through the restore sink's aligned scratch; returns how many bytes that was (the caller
/// writes the rest). A payload in several parts (a pack) is left to the page cache.
fn write_direct(f: &std::fs::File, payload: &PutPayload) -> std::io::Result<usize> {
    let mut parts = payload.iter();
    let (Some(one), None) = (parts.next(), parts.next()) else { return Ok(0) };
    let whole = one.len() / ALIGN * ALIGN;
    crate::pipeline::sink::write_aligned(f, 0, &one[..whole])?;
    Ok(whole)
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

    /// `direct`: write the object's whole blocks past the page cache (`write_direct`).
    fn put_blocking(&self, dest: PathBuf, payload: PutPayload, mode: PutMode, direct: bool) -> Result<PutResult> {
        let dir = dest.parent().map(std::path::Path::to_path_buf).unwrap_or_else(|| self.root.to_path_buf());
        std::fs::create_dir_all(&dir).map_err(generic)?;
        let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let staging = self.root.join(TMP);
        std::fs::create_dir_all(&staging).map_err(generic)?;
        let tmp = staging.join(format!("{name}.{}.{}.part", std::process::id(), rand::random::<u64>()));
        let written = (|| -> std::io::Result<()> {
            let f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            let past_cache = direct && payload.content_length() >= DIRECT_MIN;
            let done = match past_cache.then(|| open_direct(&tmp)).flatten() {
                Some(d) => write_direct(&d, &payload)?,
                None => 0,
            };
            // The rest: everything, or the last partial block after the direct part.
            let mut at = 0usize;
            for chunk in payload.iter() {
                let skip = done.saturating_sub(at).min(chunk.len());
                std::os::unix::fs::FileExt::write_all_at(&f, &chunk[skip..], (at + skip) as u64)?;
                at += chunk.len();
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
        let direct = opts.extensions.get::<NotReadSoon>().is_some();
        tokio::task::spawn_blocking(move || me.put_blocking(dest, payload, opts.mode, direct))
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    /// Marked objects (WAL) go past the page cache in whole blocks and the rest through it;
    /// others through it alone. Whatever the size and the parts a payload comes in, the file
    /// holds exactly the bytes put, and no staging file is left.
    #[tokio::test]
    async fn objects_written_past_the_cache_or_through_it_are_the_bytes_put() {
        let d = tempfile::tempdir().unwrap();
        let store = DurableLocal::new(d.path()).unwrap();
        let sizes =
            [0usize, 100, DIRECT_MIN - 1, DIRECT_MIN, DIRECT_MIN + 1, ALIGN * 300, ALIGN * 300 + 1, (2 << 20) + 12345];
        for (i, size) in sizes.into_iter().enumerate() {
            let data: Vec<u8> = (0..size).map(|j| (j * 31 + i * 7 + j / 4093) as u8).collect();
            for parts in [1usize, 3, 7] {
                let payload: PutPayload =
                    data.chunks(size.div_ceil(parts).max(1)).map(Bytes::copy_from_slice).collect();
                for (key, cold) in
                    [(format!("wal/1/00000001/seg{i}/{parts}"), true), (format!("data/{i}/{parts}"), false)]
                {
                    let mut opts = PutOptions::default();
                    if cold {
                        opts.extensions.insert(NotReadSoon);
                    }
                    store.put_opts(&Path::from(key.as_str()), payload.clone(), opts).await.unwrap();
                    assert!(
                        std::fs::read(d.path().join(&key)).unwrap() == data,
                        "{key}: {size} bytes in {parts} parts"
                    );
                }
            }
        }
        assert_eq!(std::fs::read_dir(d.path().join(TMP)).unwrap().count(), 0, "no staging file left");
        // The direct path on this file system (ext4, xfs, btrfs take it; tmpfs did not before
        // Linux 6.6, and the put then goes through the cache, as checked above either way).
        let probe = d.path().join("probe");
        std::fs::write(&probe, b"").unwrap();
        if let Some(f) = open_direct(&probe) {
            let payload: PutPayload = Bytes::from(vec![9u8; ALIGN * 3 + 5]).into();
            assert_eq!(write_direct(&f, &payload).unwrap(), ALIGN * 3, "whole blocks only");
            assert_eq!(std::fs::read(&probe).unwrap(), vec![9u8; ALIGN * 3]);
        }
    }
}
