//! Fetching chunks for a restore: blobs are grouped by pack, neighbouring blobs are read in
//! one ranged request, ranges are fetched in parallel, and each blob is decrypted, checked
//! against its id and written at its offsets. Damage is collected, not fatal: everything that
//! can be restored is, and the damaged chunks are reported with the files they affect.

use super::open_blob;
use crate::error::{Error, Kind, Result};
use crate::repository::format::*;
use crate::repository::Unlocked;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use super::sink::{FileSink, NullSink, Sink};

/// One destination of a chunk: a file, the offset there, and which bytes of the chunk go
/// (`None`: all of it; a page layer writes only the pages no later layer replaces).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub file: usize,
    pub offset: u64,
    pub part: Option<(u32, u32)>,
    /// For `--delta`: the file offset of the stored piece this write belongs to, compared
    /// with the target before anything is fetched (`None`: a layer's pages, always written).
    pub piece: Option<u64>,
}

/// A chunk to fetch and where its bytes go.
pub struct Want {
    pub id: ChunkId,
    pub loc: BlobLoc,
    pub targets: Vec<Target>,
}

/// A chunk that could not be restored.
#[derive(Debug, Clone)]
pub struct Damage {
    pub object: String,
    pub reason: String,
    pub files: Vec<usize>,
}

struct Scratch {
    dz: zstd::bulk::Decompressor<'static>,
    bufs: (Vec<u8>, Vec<u8>),
}

const MAX_RANGE: u64 = 8 << 20;
const MAX_GAP: u64 = 1 << 20;

/// Fetch, check and write every wanted chunk. Returns the damage found; a local write failure
/// (disk full, permission) aborts with an error instead.
pub async fn fetch(
    repo: &Unlocked,
    key: [u8; 32],
    wants: Vec<Want>,
    sink: Arc<dyn Sink>,
    concurrency: usize,
    bytes_done: Arc<AtomicU64>,
) -> Result<Vec<Damage>> {
    let mut by_pack: BTreeMap<PackId, Vec<Want>> = BTreeMap::new();
    for w in wants {
        by_pack.entry(w.loc.pack).or_default().push(w);
    }
    let mut ranges: Vec<(PackId, Vec<Want>)> = Vec::new();
    for (pack, mut ws) in by_pack {
        ws.sort_by_key(|w| w.loc.offset);
        let mut cur: Vec<Want> = Vec::new();
        for w in ws {
            if let (Some(first), Some(last)) = (cur.first(), cur.last()) {
                let end = last.loc.offset + last.loc.len as u64;
                let too_far = w.loc.offset > end + MAX_GAP;
                let too_big = w.loc.offset + w.loc.len as u64 - first.loc.offset > MAX_RANGE;
                if too_far || too_big {
                    ranges.push((pack, std::mem::take(&mut cur)));
                }
            }
            cur.push(w);
        }
        if !cur.is_empty() {
            ranges.push((pack, cur));
        }
    }

    // One worker's decompressor and buffers, kept from range to range: at most `concurrency`
    // exist, where a fresh set per range or chunk kept the allocator returning and faulting
    // in memory (and holding freed megabytes for its purge delay).
    let scratch: Arc<std::sync::Mutex<Vec<Scratch>>> = Default::default();
    let results: Vec<Result<Vec<Damage>>> = futures::stream::iter(ranges)
        .map(|(pack, ws)| {
            let repo = repo.clone();
            let sink = sink.clone();
            let bytes_done = bytes_done.clone();
            let scratch = scratch.clone();
            async move {
                let object = crate::repository::keys::pack(&pack);
                let start = ws[0].loc.offset;
                let end = ws.iter().map(|w| w.loc.offset + w.loc.len as u64).max().unwrap_or(start);
                let data = match repo.pack_range(&pack, start..end).await {
                    Ok(d) => d,
                    Err(e) if matches!(e.kind, Kind::NotFound | Kind::Damaged) => {
                        let reason = if e.kind == Kind::NotFound { "pack is missing".to_string() } else { e.message };
                        return Ok(ws
                            .iter()
                            .map(|w| Damage {
                                object: object.clone(),
                                reason: reason.clone(),
                                files: w.targets.iter().map(|t| t.file).collect(),
                            })
                            .collect());
                    }
                    Err(e) => return Err(e),
                };
                tokio::task::spawn_blocking(move || {
                    let mut damage = Vec::new();
                    let taken = scratch.lock().unwrap_or_else(|e| e.into_inner()).pop();
                    let mut mine = match taken {
                        Some(s) => s,
                        None => Scratch {
                            dz: zstd::bulk::Decompressor::new()
                                .map_err(|e| Error::failed(format!("cannot start zstd: {e}")))?,
                            bufs: Default::default(),
                        },
                    };
                    let Scratch { dz, bufs } = &mut mine;
                    for w in ws {
                        let a = (w.loc.offset - start) as usize;
                        let sealed = &data[a..a + w.loc.len as usize];
                        let what = format_args!("chunk {} in {object}", &hex::encode(w.id)[..16]).to_string();
                        match open_blob(repo.identity(), dz, &key, &w.id, w.loc.raw_len, sealed, &what, bufs) {
                            Ok(plain) => {
                                let mut n = 0u64;
                                for t in &w.targets {
                                    // Parts were checked against the chunk's length when planned;
                                    // `get` keeps a crafted one from panicking all the same.
                                    let bytes = match t.part {
                                        None => Some(plain),
                                        Some((a, len)) => plain.get(a as usize..a as usize + len as usize),
                                    };
                                    let Some(bytes) = bytes else {
                                        return Err(Error::damaged(format!(
                                            "{what}: a page run lies beyond the chunk"
                                        )));
                                    };
                                    sink.write(t.file, t.offset, bytes)?;
                                    n += bytes.len() as u64;
                                }
                                bytes_done.fetch_add(n, Ordering::Relaxed);
                            }
                            // A wrong identity is not damage: stop at once.
                            Err(e) if e.kind == Kind::Crypto => return Err(e),
                            Err(e) => damage.push(Damage {
                                object: object.clone(),
                                reason: e.message,
                                files: w.targets.iter().map(|t| t.file).collect(),
                            }),
                        }
                    }
                    scratch.lock().unwrap_or_else(|e| e.into_inner()).push(mine);
                    Ok(damage)
                })
                .await
                .map_err(|e| Error::failed(format!("restore worker failed: {e}")))?
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut all = Vec::new();
    for r in results {
        all.extend(r?);
    }
    Ok(all)
}
