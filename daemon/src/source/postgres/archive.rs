//! The WAL archive in the repository: storing a WAL file (`wal-push`), fetching one
//! (`wal-fetch`, with a spool of prefetched segments), and waiting until a range is archived.
//!
//! A file is stored once at `wal/<timeline>/<name>/<fingerprint>`, where the fingerprint is
//! the first 128 bits of BLAKE3 over the plaintext. The content is age(zstd(segment)). The
//! fingerprint in the key lets a re-push of an identical segment succeed and a different
//! segment under the same name fail, with one LIST and no key. wal-push needs no local state.

use super::wal::{WalKind, WalName};
use crate::error::{Error, Result};
use crate::repository::{Repository, Unlocked, Writer};
use bytes::Bytes;
use futures::StreamExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// Store one WAL file. Returns only after the object store acknowledged the write.
pub async fn push(repo: &Writer, path: &Path) -> Result<Pushed> {
    let name = name_of_path(path)?;
    let data = std::fs::read(path).map_err(|e| Error::io("read WAL file", path, e))?;
    let fp = fingerprint(&data);
    let existing = repo.wal_fingerprints(&name).await?;
    if existing.contains(&fp) {
        return Ok(Pushed::AlreadyStored);
    }
    if !existing.is_empty() {
        return Err(Error::failed(format!("WAL file {name} is already archived with different content in {}", repo.url()))
            .with_hint("two clusters archive into one repository, or a restored copy still archives: give each cluster its own repository prefix; nothing was overwritten"));
    }
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
    repo.put_wal(&name, &fp, Bytes::from(sealed)).await?;
    Ok(Pushed::Stored)
}

/// Fetch one WAL file into `dest`. `Ok(false)` when the repository does not have it.
pub async fn fetch(repo: &Unlocked, name: &WalName, dest: &Path) -> Result<bool> {
    let Some(fp) = repo.wal_fingerprints(name).await?.into_iter().next() else { return Ok(false) };
    let sealed = repo.wal_object(name, &fp).await?;
    let plain = {
        let repo = repo.clone();
        let what = format!("WAL object {}", crate::repository::keys::wal_object(name, &fp));
        tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
            let z = repo.identity().open(&sealed, &what)?;
            let data =
                zstd::stream::decode_all(&z[..]).map_err(|e| Error::damaged(format!("{what} is corrupted: {e}")))?;
            if fingerprint(&data) != fp {
                return Err(Error::damaged(format!("{what} does not match its fingerprint")));
            }
            Ok(data)
        })
        .await
        .map_err(|e| Error::failed(format!("WAL decode failed: {e}")))??
    };
    write_atomic(dest, &plain)?;
    Ok(true)
}

fn write_atomic(dest: &Path, data: &[u8]) -> Result<()> {
    let tmp = dest.with_extension("veza-tmp");
    std::fs::write(&tmp, data).map_err(|e| Error::io("write", &tmp, e))?;
    std::fs::rename(&tmp, dest).map_err(|e| Error::io("write", dest, e))
}

/// Fetch the `n` segments after `name` into `spool` in parallel, skipping those present.
pub async fn prefetch(repo: &Unlocked, name: &WalName, n: usize, spool: &Path, seg_size: u64) -> Result<()> {
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
    let results: Vec<Result<bool>> = futures::stream::iter(names)
        .filter(|n| futures::future::ready(!spool.join(n.as_str()).exists()))
        .map(|n| {
            let dest = spool.join(n.as_str());
            async move { fetch(repo, &n, &dest).await }
        })
        .buffer_unordered(n.max(1))
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(())
}

/// Serve `name` from the spool if prefetched, else fetch it. A name that is not there is
/// noted in the spool's `missing` file (the supervisor names it if recovery stops early).
pub async fn fetch_with_spool(repo: &Unlocked, name: &WalName, dest: &Path, spool: Option<&Path>) -> Result<bool> {
    if let Some(s) = spool {
        let cached = s.join(name.as_str());
        if cached.exists() && std::fs::rename(&cached, dest).is_ok() {
            return Ok(true);
        }
    }
    let found = fetch(repo, name, dest).await?;
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

/// Wait until every segment from `first` to `last` (inclusive) is in the repository.
pub async fn wait_archived(
    repo: &Repository,
    first: &WalName,
    last: &WalName,
    seg_size: u64,
    timeout: Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut cur = first.clone();
    loop {
        loop {
            if repo.wal_fingerprints(&cur).await?.is_empty() {
                break;
            }
            if cur == *last || cur.kind() != WalKind::Segment {
                return Ok(());
            }
            cur = cur.next(seg_size).unwrap_or_else(|| last.clone());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::database(format!(
                "WAL segment {cur} was not archived within {}s: the snapshot is not committed",
                timeout.as_secs()
            ))
            .with_hint(
                "WAL archiving is not working: check archive_command (veza-dr wal-push <policy> %p) and the server log",
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub fn spool_dir(target: &Path) -> PathBuf {
    target.join("veza-dr-restore/spool")
}
