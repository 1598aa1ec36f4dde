//! Generated source trees and a strict comparison of two trees.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Deterministic fast random bytes.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
    /// Text-like data that compresses about 3×.
    pub fn text(&mut self, n: usize) -> Vec<u8> {
        const WORDS: [&str; 16] = [
            "backup",
            "restore",
            "postgres",
            "volume",
            "chunk",
            "pack",
            "age",
            "zstd",
            "drill",
            "wal",
            "segment",
            "policy",
            "retention",
            "prune",
            "snapshot",
            "verify",
        ];
        let mut out = Vec::with_capacity(n + 32);
        while out.len() < n {
            let v = self.next();
            out.extend_from_slice(WORDS[(v & 15) as usize].as_bytes());
            out.push(if v & 0x100 == 0 { b' ' } else { b'\n' });
            out.extend_from_slice(format!("{}", (v >> 20) % 100000).as_bytes());
            out.push(b' ');
        }
        out.truncate(n);
        out
    }
}

/// A tree of about `mb` MiB: large random and text files, many small files, unicode and
/// non-UTF-8 names, symlinks, hard links, empty directories, varied modes and mtimes.
pub fn generate(root: &Path, mb: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    std::fs::create_dir_all(root).unwrap();
    let big = mb.saturating_sub(mb / 10).max(1) << 20;
    // Large files: half random, half text, 64 MiB each at most.
    let mut left = big;
    let mut i = 0;
    std::fs::create_dir_all(root.join("large")).unwrap();
    while left > 0 {
        let n = left.min((big / 4).clamp(1 << 20, 64 << 20));
        let data = if i % 2 == 0 {
            let mut v = vec![0u8; n];
            rng.fill(&mut v);
            v
        } else {
            rng.text(n)
        };
        std::fs::write(root.join(format!("large/file-{i:03}.bin")), data).unwrap();
        left -= n;
        i += 1;
    }
    // Small files: a tenth of the size in files of 1–16 KiB over a few hundred directories.
    let mut small = (mb / 10).max(1) << 20;
    let mut n = 0;
    while small > 0 {
        let dir = root.join(format!("small/d{:03}/e{:02}", n % 300, n % 7));
        std::fs::create_dir_all(&dir).unwrap();
        let size = (1024 + (rng.next() % (15 * 1024)) as usize).min(small);
        let data = if n % 3 == 0 {
            let mut v = vec![0u8; size];
            rng.fill(&mut v);
            v
        } else {
            rng.text(size)
        };
        std::fs::write(dir.join(format!("f{n:05}.dat")), data).unwrap();
        small -= size;
        n += 1;
    }
    // Names, links and metadata that a careless backup loses.
    let odd = root.join("names");
    std::fs::create_dir_all(&odd).unwrap();
    std::fs::write(odd.join("café ☕ résumé.txt"), "unicode\n").unwrap();
    std::fs::write(odd.join("日本語のファイル"), "nihongo\n").unwrap();
    std::fs::write(odd.join("with space and 'quote'"), "spaces\n").unwrap();
    {
        use std::os::unix::ffi::OsStrExt;
        let raw = std::ffi::OsStr::from_bytes(b"latin1-\xe9t\xe9.txt");
        std::fs::write(odd.join(raw), "not utf-8\n").unwrap();
    }
    std::fs::write(root.join("empty-file"), "").unwrap();
    std::fs::create_dir_all(root.join("empty-dir/nested-empty")).unwrap();
    std::os::unix::fs::symlink("large/file-000.bin", root.join("link-to-large")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("dangling-link")).unwrap();
    std::os::unix::fs::symlink("names", root.join("dir-link")).unwrap();
    std::fs::write(root.join("hard-a"), "shared inode\n").unwrap();
    std::fs::hard_link(root.join("hard-a"), root.join("names/hard-b")).unwrap();
    std::fs::write(root.join("secret.conf"), "mode 600\n").unwrap();
    std::fs::set_permissions(root.join("secret.conf"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(root.join("script.sh"), "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(root.join("script.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(root.join("empty-dir"), std::fs::Permissions::from_mode(0o2750)).unwrap();
    std::fs::write(root.join("excluded.tmp"), "excluded\n").unwrap();
    let old = filetime::FileTime::from_unix_time(1_600_000_000, 123_456_789);
    filetime::set_file_mtime(root.join("secret.conf"), old).unwrap();
    filetime::set_symlink_file_times(root.join("dangling-link"), old, old).unwrap();
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::chown(root.join("script.sh"), Some(1234), Some(4321)).unwrap();
        std::os::unix::fs::lchown(root.join("dir-link"), Some(2345), Some(5432)).unwrap();
    }
    // A backup re-reads files changed within a second of its parent's start (racy-clean): let
    // the new tree age past that, so incremental tests see only the changes they make.
    std::thread::sleep(std::time::Duration::from_millis(1100));
}

#[derive(Debug, PartialEq, Eq)]
pub struct Meta {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
    size: u64,
    content: String,
    link_group: Option<u64>,
}

/// Everything that must survive a round trip, by relative path (excluding `*.tmp`).
pub fn snapshot(root: &Path) -> BTreeMap<String, Meta> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, u64> = BTreeMap::new();
    for e in walkdir::WalkDir::new(root).sort_by_file_name() {
        let e = e.unwrap();
        let rel = e.path().strip_prefix(root).unwrap().to_string_lossy().into_owned();
        if rel.ends_with(".tmp") {
            continue;
        }
        let m = e.path().symlink_metadata().unwrap();
        let ft = m.file_type();
        let (kind, content) = if ft.is_symlink() {
            ("symlink", std::fs::read_link(e.path()).unwrap().to_string_lossy().into_owned())
        } else if ft.is_dir() {
            ("dir", String::new())
        } else {
            ("file", blake3::hash(&std::fs::read(e.path()).unwrap()).to_hex().to_string())
        };
        let link_group = if ft.is_file() && m.nlink() > 1 {
            let next = inodes.len() as u64;
            Some(*inodes.entry(m.ino()).or_insert(next))
        } else {
            None
        };
        out.insert(
            rel,
            Meta {
                kind,
                mode: if ft.is_symlink() { 0 } else { m.mode() & 0o7777 },
                uid: m.uid(),
                gid: m.gid(),
                // Directory mtimes of the root are touched by the restore itself.
                mtime: if e.depth() == 0 { (0, 0) } else { (m.mtime(), m.mtime_nsec()) },
                size: if ft.is_file() { m.len() } else { 0 },
                content,
                link_group,
            },
        );
    }
    out
}

/// Panic with the first differences if two trees differ.
pub fn assert_same(a: &Path, b: &Path) {
    let (sa, sb) = (snapshot(a), snapshot(b));
    let mut diffs = Vec::new();
    for (k, v) in &sa {
        match sb.get(k) {
            None => diffs.push(format!("missing in restore: {k}")),
            Some(w) if w != v => diffs.push(format!("{k}: {v:?} != {w:?}")),
            _ => {}
        }
    }
    for k in sb.keys() {
        if !sa.contains_key(k) {
            diffs.push(format!("extra in restore: {k}"));
        }
    }
    assert!(diffs.is_empty(), "{} differences, first: {:#?}", diffs.len(), &diffs[..diffs.len().min(10)]);
    assert!(sa.len() > 5, "compared a trivially small tree");
}
