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
use super::walframes::{self, subtree, Ahead};
use crate::error::{Error, Result};
use crate::repository::{keys, Repository, Unlocked, Writer};
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
    short_hex(&blake3::hash(data))
}

fn short_hex(h: &blake3::Hash) -> String {
    h.to_hex()[..32].to_string()
}

/// `(left(), right())`, with `right` on a second thread when the OS gives one, else after
/// `left` on this one: a refused thread (a pids limit) must not panic restore_command, whose
/// exit code PostgreSQL would read as "no such file". `None`: `right` panicked.
fn on_two_cores<A, B: Send>(left: impl FnOnce() -> A, right: impl FnOnce() -> B + Send) -> (A, Option<B>) {
    let cell = std::sync::Mutex::new(Some(right));
    let run = || cell.lock().unwrap_or_else(|e| e.into_inner()).take().map(|f| f());
    std::thread::scope(|s| {
        let spawned = std::thread::Builder::new().spawn_scoped(s, run);
        let a = left();
        let b = match spawned {
            Ok(h) => h.join().ok().flatten(),
            Err(_) => run(),
        };
        (a, b)
    })
}

/// The first bytes of a WAL file (a segment's long page header).
fn read_head(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut head = Vec::with_capacity(64);
    std::fs::File::open(path)
        .and_then(|f| f.take(64).read_to_end(&mut head))
        .map_err(|e| Error::io("read WAL file", path, e))?;
    Ok(head)
}

/// A WAL file's fingerprint and its zstd form, in one pass on two cores (PostgreSQL waits for
/// each segment). The halves are split where BLAKE3's tree splits: each core reads its half
/// into its own buffer (the page cache copy and a fresh buffer's page faults are a fifth of a
/// push), hashes it as a subtree and compresses it; the chaining values merge into exactly
/// `fingerprint` of the file, and each frame comes from the buffer it was hashed from. A
/// segment is compressed as 1 MiB frames, one per subtree (`walframes`), and a frame that
/// `wal-tail` compressed ahead from the same bytes is taken from `ahead`; any other file as
/// one frame per half (a decoder reads concatenated frames as one stream). `head` is what
/// `read_head` saw: a file whose first bytes or length changed meanwhile is refused
/// (PostgreSQL never writes a segment it asks to archive). Also returns how many frames came
/// from `ahead`.
pub fn load(path: &Path, head: &[u8], ahead: &Ahead) -> Result<(String, Vec<u8>, usize)> {
    use blake3::hazmat::{left_subtree_len, merge_subtrees_root, Mode};
    use std::os::unix::fs::FileExt;
    let io = |e| Error::io("read WAL file", path, e);
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let read = |at: u64, n: u64| -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; n as usize];
        file.read_exact_at(&mut buf, at)?;
        Ok(buf)
    };
    let half = |at: u64, n: u64| -> std::io::Result<(blake3::hazmat::ChainingValue, Vec<u8>, Vec<u8>)> {
        let part = read(at, n)?;
        let z = zstd::bulk::compress(&part, walframes::LEVEL)?;
        Ok((subtree(&part, at), z, part))
    };
    let thread = || Error::failed("a WAL compression thread panicked");
    let (fp, z, first, reused) = if walframes::chunked(len) {
        let h = len / 2;
        let (left, right) =
            on_two_cores(|| walframes::half(&file, 0, h, len, ahead), || walframes::half(&file, h, h, h, ahead));
        let (mut left, right) = (left.map_err(io)?, right.ok_or_else(thread)?.map_err(io)?);
        left.cvs.extend(right.cvs);
        left.z.extend_from_slice(&right.z);
        (short_hex(&walframes::root(&left.cvs)), left.z, left.head, left.reused + right.reused)
    } else if len <= 1024 {
        let data = read(0, len).map_err(io)?;
        let z = zstd::bulk::compress(&data, walframes::LEVEL)
            .map_err(|e| Error::failed(format!("cannot compress WAL: {e}")))?;
        (fingerprint(&data), z, data, 0)
    } else {
        let split = left_subtree_len(len);
        let (left, right) = on_two_cores(|| half(0, split), || half(split, len - split));
        let right = right.ok_or_else(thread)?.map_err(io)?;
        let (lcv, mut z, first) = left.map_err(io)?;
        z.extend_from_slice(&right.1);
        (short_hex(&merge_subtrees_root(&lcv, &right.0, Mode::Hash)), z, first, 0)
    };
    let same_len = file.metadata().map_err(io)?.len() == len;
    if !same_len || !first.starts_with(head) {
        return Err(Error::failed(format!("{} changed while it was archived", path.display())).with_hint(
            "PostgreSQL never writes a segment it hands to archive_command: is another process writing it?",
        ));
    }
    Ok((fp, z, reused))
}

/// `fingerprint` on two cores: the halves where BLAKE3's tree splits, merged.
fn fingerprint_par(data: &[u8]) -> String {
    use blake3::hazmat::{left_subtree_len, merge_subtrees_root, Mode};
    if data.len() <= 1024 {
        return fingerprint(data);
    }
    let split = left_subtree_len(data.len() as u64) as usize;
    let (l, r) = on_two_cores(|| subtree(&data[..split], 0), || subtree(&data[split..], split as u64));
    let r = r.unwrap_or_else(|| subtree(&data[split..], split as u64));
    short_hex(&merge_subtrees_root(&l, &r, Mode::Hash))
}

/// A stored WAL file's plaintext and its fingerprint, from its zstd form (restore_command waits
/// for it). What `load` writes, frames that split where BLAKE3's tree splits (two halves, or
/// 1 MiB chunks), is decompressed and hashed on two cores, each half into its own buffer; any
/// other form (one frame, an older writer's split) in one pass. The frames' declared sizes are
/// trusted only up to the largest WAL file PostgreSQL writes, and each must be met exactly.
fn unpack(z: &[u8]) -> std::io::Result<(String, Vec<u8>)> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let Some((frames, split)) = halves(z) else {
        let data = zstd::stream::decode_all(z)?;
        return Ok((fingerprint_par(&data), data));
    };
    let total: u64 = frames.iter().map(|f| f.1).sum();
    let half = |fs: &[Frame], at: u64| -> std::io::Result<(Vec<u8>, blake3::hazmat::ChainingValue)> {
        let n: u64 = fs.iter().map(|f| f.1).sum();
        // The left half's buffer takes the right half after it, without a copy of its own.
        let mut out = Vec::with_capacity(if at == 0 { total as usize } else { n as usize });
        let mut d = zstd::bulk::Decompressor::new()?;
        for (f, size) in fs {
            let before = out.len();
            let mut cursor = std::io::Cursor::new(&mut out);
            cursor.set_position(before as u64);
            d.decompress_to_buffer(f, &mut cursor)?;
            if (out.len() - before) as u64 != *size {
                return Err(bad("a frame is not the size it declares"));
            }
        }
        let cv = subtree(&out, at);
        Ok((out, cv))
    };
    let (l, r) = frames.split_at(split);
    let at = l.iter().map(|f| f.1).sum();
    let (left, right) = on_two_cores(|| half(l, 0), || half(r, at));
    let (mut data, lcv) = left?;
    let (rest, rcv) = right.ok_or_else(|| bad("a decompression thread panicked"))??;
    data.extend_from_slice(&rest);
    let fp = short_hex(&blake3::hazmat::merge_subtrees_root(&lcv, &rcv, blake3::hazmat::Mode::Hash));
    Ok((fp, data))
}

/// A zstd frame and the content size it declares.
type Frame<'a> = (&'a [u8], u64);

/// The frames of `z` with their declared sizes, and the index of the first frame of the right
/// half, when the frames split where BLAKE3's tree splits the content they declare.
fn halves(z: &[u8]) -> Option<(Vec<Frame<'_>>, usize)> {
    use zstd::zstd_safe::{find_frame_compressed_size, get_frame_content_size};
    const MAX: u64 = 1 << 30;
    let (mut rest, mut frames, mut total) = (z, Vec::new(), 0u64);
    while !rest.is_empty() {
        let n = find_frame_compressed_size(rest).ok().filter(|&n| n > 0 && n <= rest.len())?;
        let (f, tail) = rest.split_at(n);
        let size = get_frame_content_size(f).ok().flatten()?;
        total = total.checked_add(size).filter(|&t| t <= MAX)?;
        frames.push((f, size));
        rest = tail;
    }
    if frames.len() < 2 || total <= 1024 {
        return None;
    }
    let want = blake3::hazmat::left_subtree_len(total);
    let mut sum = 0;
    let split = frames.iter().position(|f| {
        sum += f.1;
        sum >= want
    })?;
    (sum == want).then_some((frames, split + 1))
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
    one_cluster(repo, &repo.wal_clusters().await?, cluster)
}

/// `check_cluster` on a listing already made (`present`: the clusters with WAL in `repo`).
fn one_cluster(repo: &Repository, present: &[u64], cluster: u64) -> Result<()> {
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
/// `ahead`: the file where `wal-tail` compressed frames of this segment ahead, if any.
pub async fn push(
    repo: &Writer,
    path: &Path,
    data_dir: Option<&Path>,
    ahead: Option<&Path>,
) -> Result<(Pushed, String)> {
    let name = name_of_path(path)?;
    // The page header names the cluster, which the listings need; the rest is read below.
    let head = read_head(path)?;
    let cluster = cluster_of(&name, &head, path, data_dir)?;
    // The CPU work (read, fingerprint, compression, sealing) runs while the two listings are
    // asked: on S3 each is a round trip. Only a re-push of a stored file wastes it.
    let work = tokio::task::spawn_blocking({
        let (sealer, path, ahead) = (repo.sealer().clone(), path.to_path_buf(), ahead.map(Path::to_path_buf));
        move || -> Result<(String, Vec<u8>)> {
            let ahead = ahead.as_deref().map(Ahead::read).unwrap_or_default();
            let (fp, z, reused) = load(&path, &head, &ahead)?;
            if reused > 0 {
                tracing::debug!("{reused} frames of {} were compressed ahead", path.display());
            }
            Ok((fp, sealer.seal_after(crate::repository::trust::WAL_HEAD, &z)?))
        }
    });
    let t0 = std::time::Instant::now();
    let (existing, clusters) = tokio::join!(repo.wal_fingerprints(cluster, &name), repo.wal_clusters());
    let listed = t0.elapsed();
    let (fp, sealed) = work.await.map_err(|e| Error::failed(format!("compression failed: {e}")))??;
    tracing::debug!("{name}: listed in {listed:?}, sealed in {:?}", t0.elapsed());
    let existing = existing?;
    let key = keys::wal_object(cluster, &name, &fp);
    if existing.contains(&fp) {
        return Ok((Pushed::AlreadyStored, key));
    }
    if !existing.is_empty() {
        return Err(Error::failed(format!("WAL file {name} is already archived with different content in {}", repo.url()))
            .with_hint("a restored copy still archives on the same timeline: turn archiving off in the copy, or give it its own repository; nothing was overwritten"));
    }
    one_cluster(repo, &clusters?, cluster)?;
    let body = repo.wal_body(sealed, cluster, &name, &fp);
    repo.put_wal(cluster, &name, &fp, body).await?;
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
            let (got, data) = unpack(&z).map_err(|e| Error::damaged(format!("{what} is corrupted: {e}")))?;
            if got != fp {
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
        let ok = std::fs::read(e.path()).is_ok_and(|d| fingerprint_par(&d) == fp);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_core_fingerprint_is_the_plain_hash_and_the_frames_decode_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut x: u64 = 9;
        let mut gen = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|i| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    if i % 3 == 0 {
                        0
                    } else {
                        x as u8
                    }
                })
                .collect()
        };
        for n in [0, 1, 1024, 1025, 4096, 3 << 20 | 5, 16 << 20, (16 << 20) + 3] {
            let data = gen(n);
            let path = dir.path().join(format!("f{n}"));
            std::fs::write(&path, &data).unwrap();
            let head = read_head(&path).unwrap();
            assert_eq!(head, data[..n.min(64)]);
            let (fp, z, _) = load(&path, &head, &Ahead::default()).unwrap();
            assert_eq!(fp, fingerprint(&data), "size {n}");
            assert_eq!(zstd::stream::decode_all(&z[..]).unwrap(), data, "size {n}");
            assert_eq!(unpack(&z).unwrap(), (fp.clone(), data.clone()), "size {n}");
            // A segment is 1 MiB frames, read back on two cores; other files two halves.
            let frames = halves(&z).map(|(f, _)| f.len());
            let want = if walframes::chunked(n as u64) { n >> 20 } else { 2 };
            assert_eq!(frames, (n > 1024).then_some(want), "size {n}");
            assert_eq!(fingerprint_par(&data), fp);
            // One frame, and an older writer's halves (split in the middle), unpack too.
            let one = zstd::bulk::compress(&data, 1).unwrap();
            assert_eq!(unpack(&one).unwrap(), (fp.clone(), data.clone()), "size {n}");
            let mid = n.div_ceil(2).max(1);
            let mut old = Vec::new();
            for c in data.chunks(mid) {
                old.extend(zstd::bulk::compress(c, 1).unwrap());
            }
            if n > 0 {
                assert_eq!(unpack(&old).unwrap(), (fp.clone(), data.clone()), "size {n}");
            }
        }
        // Frames whose declared sizes lie are damage, not a short or long file: the second
        // frame of a 16 MiB file declares 8 MiB and holds 8 KiB less (the split still matches).
        let data = gen(16 << 20);
        let (l, r) = data.split_at(8 << 20);
        let mut z = zstd::bulk::compress(l, 1).unwrap();
        let mut rz = zstd::bulk::compress(&r[..r.len() - 8192], 1).unwrap();
        let fhd = rz[4];
        assert_eq!(fhd >> 6, 2, "a 4-byte content size field");
        let at = 5 + usize::from(fhd & 0x20 == 0) + [0, 1, 2, 4][(fhd & 3) as usize];
        assert_eq!(u32::from_le_bytes(rz[at..at + 4].try_into().unwrap()) as usize, r.len() - 8192);
        rz[at..at + 4].copy_from_slice(&(r.len() as u32).to_le_bytes());
        z.extend(rz);
        assert!(unpack(&z).is_err());
        // A file that is not the one whose header was read is refused.
        let path = dir.path().join(format!("f{}", 16 << 20));
        let err = load(&path, &[1, 2, 3], &Ahead::default()).unwrap_err();
        assert!(err.message.contains("changed while it was archived"), "{}", err.message);
    }
}
