//! WAL archiving: `wal-push` (archive_command) and `wal-fetch` (restore_command).
//!
//! A segment is stored once at `wal/<timeline>/<name>/<fingerprint>`, where the fingerprint is
//! the first 128 bits of BLAKE3 over the plaintext. The content is age(zstd(segment)). The
//! fingerprint in the key lets a re-push of an identical segment succeed and a different
//! segment under the same name fail, with one LIST and no key. wal-push needs no local state.

use crate::crypto::{Opener, Sealer};
use crate::error::{Error, Result};
use crate::repository::Store;
use bytes::Bytes;
use futures::StreamExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Whether `name` is something PostgreSQL archives: a segment, a .history, a .backup, a .partial.
pub fn valid_name(name: &str) -> bool {
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    match name.len() {
        24 => hex(name),
        16 if name.ends_with(".history") => hex(&name[..8]),
        _ if name.ends_with(".partial") => name.len() == 32 && hex(&name[..24]),
        _ if name.ends_with(".backup") => name.len() == 40 && hex(&name[..24]) && hex(&name[25..33]),
        _ => false,
    }
}

fn dir_of(name: &str) -> String {
    format!("wal/{}/{name}/", &name[..8])
}

#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    Stored,
    AlreadyStored,
}

/// Store one WAL file. Returns only after the object store acknowledged the write.
pub async fn push(store: &Store, sealer: &Sealer, path: &Path) -> Result<Pushed> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if !valid_name(name) {
        return Err(Error::usage(format!("{} is not a WAL file name PostgreSQL archives", path.display()))
            .with_hint("archive_command must pass %p, the path of the segment"));
    }
    let data = std::fs::read(path).map_err(|e| Error::io("read WAL file", path, e))?;
    let fp = blake3::hash(&data).to_hex()[..32].to_string();
    let existing = store.list(&dir_of(name)).await?;
    if existing.iter().any(|(k, _)| k.ends_with(&fp)) {
        return Ok(Pushed::AlreadyStored);
    }
    if !existing.is_empty() {
        return Err(Error::failed(format!("WAL file {name} is already archived with different content in {}", store.url))
            .with_hint("two clusters archive into one repository, or a restored copy still archives: give each cluster its own repository prefix; nothing was overwritten"));
    }
    let sealed = tokio::task::spawn_blocking({
        let sealer = sealer.clone();
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
    store.put(&format!("{}{fp}", dir_of(name)), Bytes::from(sealed)).await?;
    Ok(Pushed::Stored)
}

/// Fetch one WAL file into `dest`. `Ok(false)` when the repository does not have it.
pub async fn fetch(store: &Store, opener: &Opener, name: &str, dest: &Path) -> Result<bool> {
    if !valid_name(name) {
        return Err(Error::usage(format!("{name} is not a WAL file name")));
    }
    let objs = store.list(&dir_of(name)).await?;
    let Some((key, _)) = objs.into_iter().next() else { return Ok(false) };
    let sealed = store.get(&key).await?;
    let plain = {
        let opener = opener.clone();
        let key = key.clone();
        tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
            let z = opener.open(&sealed, &format_args!("WAL object {key}"))?;
            let data = zstd::stream::decode_all(&z[..])
                .map_err(|e| Error::damaged(format!("WAL object {key} is corrupted: {e}")))?;
            if !key.ends_with(&blake3::hash(&data).to_hex()[..32]) {
                return Err(Error::damaged(format!("WAL object {key} does not match its fingerprint")));
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
pub async fn prefetch(store: &Store, opener: &Opener, name: &str, n: usize, spool: &Path, seg_size: u64) -> Result<()> {
    std::fs::create_dir_all(spool).map_err(|e| Error::io("create", spool, e))?;
    let mut names = Vec::new();
    let mut cur = name.to_string();
    for _ in 0..n {
        match crate::source::postgres::next_segment(&cur, seg_size) {
            Some(next) => {
                cur = next.clone();
                names.push(next);
            }
            None => break,
        }
    }
    let results: Vec<Result<bool>> = futures::stream::iter(names)
        .filter(|n| futures::future::ready(!spool.join(n).exists()))
        .map(|n| {
            let dest = spool.join(&n);
            async move { fetch(store, opener, &n, &dest).await }
        })
        .buffer_unordered(n.max(1))
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(())
}

/// Serve `name` from the spool if prefetched, else fetch it; then prefetch the next ones in a
/// detached process so that replay never waits for one request at a time.
pub async fn fetch_with_spool(
    store: &Store,
    opener: &Opener,
    name: &str,
    dest: &Path,
    spool: Option<&Path>,
) -> Result<bool> {
    if let Some(s) = spool {
        let cached = s.join(name);
        if cached.exists() && std::fs::rename(&cached, dest).is_ok() {
            return Ok(true);
        }
    }
    let found = fetch(store, opener, name, dest).await?;
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
pub async fn wait_archived(store: &Store, first: &str, last: &str, seg_size: u64, timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut cur = first.to_string();
    loop {
        loop {
            if store.list(&dir_of(&cur)).await?.is_empty() {
                break;
            }
            if cur == last {
                return Ok(());
            }
            cur = crate::source::postgres::next_segment(&cur, seg_size).unwrap_or_else(|| last.to_string());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::new(
                crate::error::Kind::Database,
                format!(
                    "WAL segment {cur} was not archived within {}s: the snapshot is not committed",
                    timeout.as_secs()
                ),
            )
            .with_hint(
                "WAL archiving is not working: check archive_command (veza-dr wal-push <policy> %p) and the server log",
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Every archived WAL name in the repository, sorted.
pub async fn list_names(store: &Store) -> Result<Vec<(String, String)>> {
    let mut v: Vec<(String, String)> = store
        .list("wal/")
        .await?
        .into_iter()
        .filter_map(|(k, _)| {
            let name = {
                let parts: Vec<&str> = k.split('/').collect();
                (parts.len() == 4).then(|| parts[2].to_string())
            };
            name.map(|n| (n, k))
        })
        .collect();
    v.sort();
    Ok(v)
}

pub fn spool_dir(target: &Path) -> PathBuf {
    target.join("veza-dr-restore/spool")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_archived_file_names() {
        assert!(valid_name("000000010000000000000003"));
        assert!(valid_name("00000002.history"));
        assert!(valid_name("000000010000000000000002.00000028.backup"));
        assert!(valid_name("000000010000000000000002.partial"));
        assert!(!valid_name("RECOVERYXLOG"));
        assert!(!valid_name("../../etc/passwd"));
    }
}
