//! The volume source: a directory tree with its metadata (modes, owners, times, symlinks,
//! hard links, empty directories), and its restore.

use crate::error::{Error, Result};
use crate::repository::format::*;
use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

/// The tree as walked: entries in walk order (parents before children), and warnings.
pub struct Walked {
    pub entries: Vec<Entry>,
    pub warnings: Vec<String>,
    pub skipped: u64,
}

pub fn walk(root: &Path, exclude: &[String]) -> Result<Walked> {
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

/// A restore-side path must stay inside the target.
pub fn safe_rel(p: &Path) -> Result<&Path> {
    if p.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)) {
        Ok(p)
    } else {
        Err(Error::damaged(format!("manifest holds an unsafe path {}", p.display())))
    }
}

/// Whether `rel` is selected by `--include` prefixes (or is a parent directory of one).
pub fn included(rel: &Path, includes: &[PathBuf]) -> bool {
    includes.is_empty() || rel == Path::new(".") || includes.iter().any(|i| rel.starts_with(i) || i.starts_with(rel))
}

/// Create the skeleton: directories, empty files of the right length, symlinks.
/// Returns the file paths in entry order (for chunk targets) and the entry index of each.
pub fn prepare(target: &Path, entries: &[(usize, &Entry)]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for (_, e) in entries {
        let rel = e.rel_path();
        let p = target.join(safe_rel(&rel)?);
        match e.kind {
            EntryKind::Dir => std::fs::create_dir_all(&p).map_err(|err| Error::io("create directory", &p, err))?,
            EntryKind::File => {
                // Parents come first in the manifest; create them only if they are missing.
                let f = match std::fs::File::create(&p) {
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                        let parent = p.parent().unwrap_or(target);
                        std::fs::create_dir_all(parent).map_err(|err| Error::io("create directory", parent, err))?;
                        std::fs::File::create(&p)
                    }
                    r => r,
                }
                .map_err(|err| Error::io("create", &p, err))?;
                f.set_len(e.size).map_err(|err| Error::io("allocate", &p, err))?;
                files.push(p);
            }
            EntryKind::Symlink => {
                let t = decode_os(e.target.as_deref().unwrap_or(""));
                let _ = std::fs::remove_file(&p);
                std::os::unix::fs::symlink(&t, &p).map_err(|err| Error::io("create symlink", &p, err))?;
            }
            EntryKind::Hardlink => {}
        }
    }
    Ok(files)
}

/// After the data: hard links, then owners, modes and times (directories last, deepest first,
/// so that writing into them does not move their mtime again).
pub fn finish(target: &Path, entries: &[(usize, &Entry)], warnings: &mut Vec<String>) -> Result<()> {
    let root = nix::unistd::geteuid().is_root();
    for (_, e) in entries.iter().filter(|(_, e)| e.kind == EntryKind::Hardlink) {
        let p = target.join(safe_rel(&e.rel_path())?);
        let first = target.join(decode_os(e.target.as_deref().unwrap_or("")));
        let _ = std::fs::remove_file(&p);
        if let Err(err) = std::fs::hard_link(&first, &p) {
            warnings.push(format!("cannot restore hard link {}: {err}", e.display()));
        }
    }
    let mut owner_warned = false;
    let mut apply = |e: &Entry| -> Result<()> {
        let p = target.join(safe_rel(&e.rel_path())?);
        if let Err(err) = std::os::unix::fs::lchown(&p, Some(e.uid), Some(e.gid)) {
            if root {
                return Err(Error::io("set owner of", &p, err));
            }
            if !owner_warned {
                warnings.push("not running as root: file owners were not restored".into());
                owner_warned = true;
            }
        }
        let t = filetime::FileTime::from_unix_time(e.mtime, e.mtime_ns);
        if e.kind == EntryKind::Symlink {
            filetime::set_symlink_file_times(&p, t, t).map_err(|err| Error::io("set times of", &p, err))?;
            return Ok(());
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(e.mode))
            .map_err(|err| Error::io("set mode of", &p, err))?;
        filetime::set_file_times(&p, t, t).map_err(|err| Error::io("set times of", &p, err))
    };
    for (_, e) in entries.iter().filter(|(_, e)| e.kind != EntryKind::Dir && e.kind != EntryKind::Hardlink) {
        apply(e)?;
    }
    let mut dirs: Vec<&Entry> = entries.iter().filter(|(_, e)| e.kind == EntryKind::Dir).map(|(_, e)| *e).collect();
    dirs.sort_by_key(|e| std::cmp::Reverse(e.rel_path().components().count()));
    for e in dirs {
        apply(e)?;
    }
    Ok(())
}
