//! Walking a directory tree into manifest entries: modes, owners, times, symlinks, hard links
//! and empty directories, in walk order (parents before children), with excludes. A strict
//! walk (PostgreSQL's data directory) fails on anything it cannot read but a file that
//! vanished; a lenient one (volumes) skips it with a warning.

use crate::error::{Error, Result};
use crate::repository::format::*;
use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// The tree as walked: entries in walk order (parents before children), and warnings.
pub struct Walked {
    pub entries: Vec<Entry>,
    pub warnings: Vec<String>,
    pub skipped: u64,
}

pub fn walk(root: &Path, exclude: &[String], strict: bool) -> Result<Walked> {
    let meta = std::fs::metadata(root).map_err(|e| Error::io("read volume", root, e))?;
    if !meta.is_dir() {
        return Err(Error::policy(format!("volume path {} is not a directory", root.display())));
    }
    let mut gs = globset::GlobSetBuilder::new();
    for g in exclude {
        gs.add(globset::Glob::new(g).map_err(|e| Error::policy(format!("exclude pattern `{g}` is invalid: {e}")))?);
    }
    let excl = gs.build().map_err(|e| Error::policy(format!("exclude patterns are invalid: {e}")))?;
    let mut out = Walked { entries: Vec::new(), warnings: Vec::new(), skipped: 0 };
    let mut first_link: HashMap<(u64, u64), String> = HashMap::new();
    let it = walkdir::WalkDir::new(root).follow_links(false).sort_by_file_name().into_iter();
    let it = it.filter_entry(|e| {
        let rel = e.path().strip_prefix(root).unwrap_or(e.path());
        rel.as_os_str().is_empty() || !(excl.is_match(rel) || excl.is_match(e.file_name()))
    });
    for item in it {
        let de = match item {
            Ok(d) => d,
            Err(e) => {
                let vanished = e.io_error().is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound);
                if strict && !vanished {
                    let path = e.path().unwrap_or(root).to_path_buf();
                    let io = e.into_io_error().unwrap_or_else(|| std::io::Error::other("walk failed"));
                    return Err(Error::io("read", &path, io)
                        .with_hint("a physical backup needs every file of the data directory: run it as root or the data directory's owner"));
                }
                // Vanished or unreadable: warn and go on, as an SRE expects from a file backup.
                out.warnings.push(format!("skipped {}", e.to_string().replace('\n', " ")));
                out.skipped += 1;
                continue;
            }
        };
        let rel = de.path().strip_prefix(root).unwrap_or(de.path());
        let rel = if rel.as_os_str().is_empty() { Path::new(".") } else { rel };
        let m = match de.path().symlink_metadata() {
            Ok(m) => m,
            Err(e) => {
                if strict && e.kind() != std::io::ErrorKind::NotFound {
                    return Err(Error::io("read", de.path(), e));
                }
                out.warnings.push(format!("skipped {}: {e}", rel.display()));
                out.skipped += 1;
                continue;
            }
        };
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            EntryKind::Dir
        } else if ft.is_symlink() {
            EntryKind::Symlink
        } else if ft.is_file() {
            EntryKind::File
        } else {
            let what = if ft.is_socket() {
                "socket"
            } else if ft.is_fifo() {
                "fifo"
            } else if ft.is_block_device() || ft.is_char_device() {
                "device"
            } else {
                "special file"
            };
            tracing::warn!(path = %rel.display(), "skipping {what}");
            out.warnings.push(format!("skipped {what} {}", rel.display()));
            out.skipped += 1;
            continue;
        };
        let mut e = Entry {
            path: String::new(),
            path_hex: None,
            kind,
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            mtime: m.mtime(),
            mtime_ns: m.mtime_nsec() as u32,
            size: if kind == EntryKind::File { m.len() } else { 0 },
            chunks: vec![],
            target: None,
            hash: None,
            changed: false,
            pages: None,
            digests: None,
            ino: m.ino(),
            ctime: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
        };
        e.set_path(rel);
        if kind == EntryKind::Symlink {
            match std::fs::read_link(de.path()) {
                Ok(t) => e.target = Some(encode_os(t.as_os_str())),
                Err(err) => {
                    out.warnings.push(format!("skipped symlink {}: {err}", rel.display()));
                    continue;
                }
            }
        }
        if kind == EntryKind::File && m.nlink() > 1 {
            let k = (m.dev(), m.ino());
            match first_link.get(&k) {
                Some(first) => {
                    e.kind = EntryKind::Hardlink;
                    e.target = Some(first.clone());
                    e.size = 0;
                }
                None => {
                    first_link.insert(k, encode_os(rel.as_os_str()));
                }
            }
        }
        out.entries.push(e);
    }
    Ok(out)
}
