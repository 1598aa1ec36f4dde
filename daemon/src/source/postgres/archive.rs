//! The WAL archive in the repository: storing a WAL file (`wal-push`), fetching one
//! (`wal-fetch`, with a spool of prefetched segments), and waiting until a range is archived.
//!
//! A file is stored once at `wal/<system identifier>/<timeline>/<name>/<fingerprint>`, where
//! the fingerprint is the first 128 bits of BLAKE3 over the plaintext. The content is
//! age(zstd(segment)). The fingerprint in the key lets a re-push of an identical segment
//! succeed and a different segment under the same name fail, with one LIST and no key. The
//! system identifier comes from the segment itself (its first page header), so a segment of
//! another cluster can never stand in for this cluster's WAL, and a repository holds the WAL
//! of one cluster: a second cluster's first push is refused, naming both. wal-push needs no
//! local state.

use super::wal::{WalKind, WalName};
use crate::error::{Error, Result};
use crate::repository::{keys, Repository, Unlocked, Writer};
use bytes::Bytes;
use futures::StreamExt;
use std::path::{Path, PathBuf};

#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    Stored,
    AlreadyStored,
}

/// The name of the WAL file at `path`, as archive_command passes it (`%p`).
pub fn name_of_path(path: &Path) -> Result<WalName> {
    path.file_name().and_then(|n| n.to_str()).and_then(WalName::parse).ok_or_else(|| {
        Error::usage(format!("{} is not a WAL file name PostgreSQL archives", path.display()))
            .with_hint("archive_command must pass %p, the path of the segment")
    })
}

/// A name restore_command was asked for (`%f`).
pub fn parse_requested(name: &str) -> Result<WalName> {
    WalName::parse(name).ok_or_else(|| {
        Error::usage(format!("{} is not a WAL file name", name.escape_debug()))
            .with_hint("restore_command must pass %f, the name of the file PostgreSQL asks for")
    })
}

fn fingerprint(data: &[u8]) -> String {
    blake3::hash(data).to_hex()[..32].to_string()
}

/// The system identifier in a segment's first page: a long page header (`XLP_LONG_HEADER` in
/// `xlp_info`), whose `xlp_sysid` follows the 24-byte standard header.
pub fn segment_cluster(data: &[u8]) -> Option<u64> {
    let info = u16::from_le_bytes(data.get(2..4)?.try_into().ok()?);
    if info & 0x0002 == 0 {
        return None;
    }
    Some(u64::from_le_bytes(data.get(24..32)?.try_into().ok()?))
}

/// The system identifier of the cluster in `data_dir` (`global/pg_control` starts with it).
pub fn control_cluster(data_dir: &Path) -> Result<u64> {
    let path = data_dir.join("global/pg_control");
    let b = std::fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
    b.get(..8)
        .and_then(|h| h.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| Error::damaged(format!("{} is too short to be a pg_control file", path.display())))
}

/// Which cluster a WAL file belongs to: segments say so in their header; history and backup
/// files belong to the cluster of the data directory they come from.
fn cluster_of(name: &WalName, data: &[u8], path: &Path, data_dir: Option<&Path>) -> Result<u64> {
    match name.kind() {
        WalKind::Segment | WalKind::Partial => segment_cluster(data).ok_or_else(|| {
            Error::usage(format!("{} does not start with a WAL page header", path.display()))
                .with_hint("archive_command must pass %p, the path of the segment PostgreSQL archives")
        }),
        WalKind::History | WalKind::Backup => {
            let cwd = std::env::current_dir().unwrap_or_default();
            control_cluster(data_dir.unwrap_or(&cwd))
        }
    }
}

/// Refuse to mix clusters: the repository holds the WAL of one system identifier.
pub async fn check_cluster(repo: &Repository, cluster: u64) -> Result<()> {
    let present = repo.wal_clusters().await?;
    match present.iter().find(|c| **c != cluster) {
        Some(other) if !present.contains(&cluster) => Err(Error::failed(format!(
            "repository {} holds the WAL of the cluster with system identifier {other}; this cluster is {cluster}",
            repo.url()
        ))
        .with_hint("each cluster needs its own repository (another url or prefix); a re-created cluster too")),
        _ => Ok(()),
    }
}

/// Store one WAL file of the cluster in `data_dir`. Returns only after the object store
/// acknowledged the write.
/// Also returns the object's key (the replica sender copies it).
pub async fn push(repo: &Writer, path: &Path, data_dir: Option<&Path>) -> Result<(Pushed, String)> {
    let name = name_of_path(path)?;
    let data = std::fs::read(path).map_err(|e| Error::io("read WAL file", path, e))?;
    let cluster = cluster_of(&name, &data, path, data_dir)?;
    let fp = fingerprint(&data);
    let existing = repo.wal_fingerprints(cluster, &name).await?;
    let key = keys::wal_object(cluster, &name, &fp);
    if existing.contains(&fp) {
        return Ok((Pushed::AlreadyStored, key));
    }
    if !existing.is_empty() {
        return Err(Error::failed(format!("WAL file {name} is already archived with different content in {}", repo.url()))
            .with_hint("a restored copy still archives on the same timeline: turn archiving off in the copy, or give it its own repository; nothing was overwritten"));
    }
    check_cluster(repo, cluster).await?;
    let sealed = tokio::task::spawn_blocking({
        let sealer = repo.sealer().clone();
        move || -> Result<Vec<u8>> {
            // PostgreSQL waits for each segment: compress its halves on two cores, as two
            // zstd frames (a decoder reads concatenated frames as one stream).
            let half = data.len().div_ceil(2);
            let parts: Vec<std::io::Result<Vec<u8>>> = std::thread::scope(|s| {
                let hs: Vec<_> =
                    data.chunks(half.max(1)).map(|c| s.spawn(move || zstd::bulk::compress(c, 1))).collect();
                hs.into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err(std::io::Error::other("compression thread panicked"))))
                    .collect()
            });
            let mut z = Vec::with_capacity(data.len() / 2);
            for p in parts {
                z.extend_from_slice(&p.map_err(|e| Error::failed(format!("cannot compress WAL: {e}")))?);
            }
            sealer.seal(&z)
        }
    })
    .await
    .map_err(|e| Error::failed(format!("compression failed: {e}")))??;
    let body = repo.wal_body(sealed, cluster, &name, &fp);
    repo.put_wal(cluster, &name, &fp, Bytes::from(body)).await?;
    Ok((Pushed::Stored, key))
}

/// Which cluster's WAL a restore reads: the one named, else the only one in the repository.
pub async fn resolve_cluster(repo: &Repository, named: Option<u64>) -> Result<Option<u64>> {
    if let Some(c) = named {
        return Ok(Some(c));
    }
    let present = repo.wal_clusters().await?;
    match present.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        many => Err(Error::usage(format!(
            "repository {} holds the WAL of several clusters ({})",
            repo.url(),
            many.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ")
        ))
        .with_hint("pass --cluster SYSTEM_IDENTIFIER (restore writes it into restore_command)")),
    }
}

/// One WAL file of `cluster`, decrypted and checked: (fingerprint, bytes), or `None` when the
/// repository does not have it. A segment whose header names another cluster is damage.
pub async fn fetch_bytes(repo: &Unlocked, cluster: u64, name: &WalName) -> Result<Option<(String, Vec<u8>)>> {
    let Some(fp) = repo.wal_fingerprints(cluster, name).await?.into_iter().next() else { return Ok(None) };
    let what = format!("WAL object {}", crate::repository::keys::wal_object(cluster, name, &fp));
    let segment = matches!(name.kind(), WalKind::Segment | WalKind::Partial);
    let data = repo
        .wal_object(cluster, name, &fp, |body| {
            let sealed = crate::repository::trust::open_wal(&body, repo.writers(), cluster, name, &fp)?;
            let z = repo.identity().open(sealed, &what)?;
            let data =
                zstd::stream::decode_all(&z[..]).map_err(|e| Error::damaged(format!("{what} is corrupted: {e}")))?;
            if fingerprint(&data) != fp {
                return Err(Error::damaged(format!("{what} does not match its fingerprint")));
            }
            if segment && segment_cluster(&data) != Some(cluster) {
                return Err(Error::damaged(format!("{what} is a segment of another cluster")));
            }
            Ok(data)
        })
        .await?;
    Ok(Some((fp, data)))
}

/// Fetch one WAL file of `cluster` into `dest`. `Ok(false)` when the repository does not have it.
pub async fn fetch(repo: &Unlocked, cluster: u64, name: &WalName, dest: &Path) -> Result<bool> {
    match fetch_bytes(repo, cluster, name).await? {
        Some((_, data)) => write_atomic(dest, &data).map(|_| true),
        None => Ok(false),
    }
}

/// Write `data` to `dest` through a temporary name of this process alone.
fn write_atomic(dest: &Path, data: &[u8]) -> Result<()> {
    let file = dest.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dest.with_file_name(format!(".{file}.{}.{}.veza-tmp", std::process::id(), rand::random::<u32>()));
    std::fs::write(&tmp, data).map_err(|e| Error::io("write", &tmp, e))?;
    std::fs::rename(&tmp, dest).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io("write", dest, e)
    })
}

/// A spooled file is `<name>.<fingerprint>`; it is served only if its content still has that
/// fingerprint (a file cut short by a crash or a full disk is fetched again, never served).
fn spooled(spool: &Path, name: &WalName) -> Option<PathBuf> {
    let prefix = format!("{name}.");
    let rd = std::fs::read_dir(spool).ok()?;
    for e in rd.flatten() {
        let file = e.file_name();
        let Some(fp) = file.to_str().and_then(|f| f.strip_prefix(&prefix)) else { continue };
        if fp.len() != 32 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let ok = std::fs::read(e.path()).is_ok_and(|d| fingerprint(&d) == fp);
        if ok {
            return Some(e.path());
        }
        tracing::warn!(file = %e.path().display(), "a prefetched WAL file does not match its fingerprint; fetching it again");
        let _ = std::fs::remove_file(e.path());
    }
    None
}

/// Fetch the `n` segments after `name` into `spool` in parallel, skipping those present.
pub async fn prefetch(
    repo: &Unlocked,
    cluster: u64,
    name: &WalName,
    n: usize,
    spool: &Path,
    seg_size: u64,
) -> Result<()> {
    std::fs::create_dir_all(spool).map_err(|e| Error::io("create", spool, e))?;
    let mut names = Vec::new();
    let mut cur = name.clone();
    for _ in 0..n {
        match cur.next(seg_size) {
            Some(next) => {
                cur = next.clone();
                names.push(next);
            }
            None => break,
        }
    }
    let results: Vec<Result<()>> = futures::stream::iter(names)
        .filter(|n| futures::future::ready(spooled(spool, n).is_none()))
        .map(|n| async move {
            if let Some((fp, data)) = fetch_bytes(repo, cluster, &n).await? {
                write_atomic(&spool.join(format!("{n}.{fp}")), &data)?;
            }
            Ok(())
        })
        .buffer_unordered(n.max(1))
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(())
}

/// Serve `name` from the spool if prefetched (and intact), else fetch it. A name that is not
/// there is noted in the spool's `missing` file (the supervisor names it if recovery stops early).
pub async fn fetch_with_spool(
    repo: &Unlocked,
    cluster: u64,
    name: &WalName,
    dest: &Path,
    spool: Option<&Path>,
) -> Result<bool> {
    if let Some(cached) = spool.and_then(|s| spooled(s, name)) {
        if std::fs::rename(&cached, dest).is_ok() {
            return Ok(true);
        }
    }
    let found = fetch(repo, cluster, name, dest).await?;
    if !found {
        if let Some(s) = spool {
            let _ = std::fs::create_dir_all(s);
            let _ = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(s.join("missing"))
                .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{name}\n").as_bytes()));
        }
    }
    Ok(found)
}

/// The first segment from `first` to `last` (inclusive) that the repository does not hold yet.
pub async fn first_missing(
    repo: &Repository,
    cluster: u64,
    first: &WalName,
    last: &WalName,
    seg_size: u64,
) -> Result<Option<WalName>> {
    let mut cur = first.clone();
    loop {
        if repo.wal_fingerprints(cluster, &cur).await?.is_empty() {
            return Ok(Some(cur));
        }
        if cur == *last || cur.kind() != WalKind::Segment {
            return Ok(None);
        }
        cur = match cur.next(seg_size) {
            Some(n) => n,
            None => return Ok(None),
        };
    }
}

pub fn spool_dir(target: &Path) -> PathBuf {
    target.join("veza-dr-restore/spool")
}
