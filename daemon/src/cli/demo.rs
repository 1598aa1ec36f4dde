//! `veza-dr demo`: the main job on embedded defaults. Makes a sample tree, an identity and a
//! policy for a local file:// repository; backs up, changes a file, backs up incrementally,
//! lists, restores the latest snapshot and compares it with the source byte for byte.

use super::Global;
use super::{commands, data};
use crate::error::{Error, Result};
use std::path::Path;

pub async fn run(g: &Global, dir: &Path) -> Result<i32> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
    let dir = dir.canonicalize().map_err(|e| Error::io("resolve", dir, e))?;
    let src = dir.join("source");
    let key = dir.join("restore.key");
    let policies = dir.join("policies");
    let restored = dir.join("restored");
    let _ = std::fs::remove_dir_all(&restored);
    make_tree(&src)?;
    let recipient = if key.exists() {
        let text = std::fs::read_to_string(&key).map_err(|e| Error::io("read", &key, e))?;
        let id: age::x25519::Identity = text
            .lines()
            .find(|l| l.starts_with("AGE-SECRET-KEY-"))
            .and_then(|l| l.parse().ok())
            .ok_or_else(|| Error::crypto(format!("{} holds no identity", key.display())))?;
        id.to_public().to_string()
    } else {
        let (text, public) = crate::crypto::seal::generate_identity();
        write_private(&key, &text)?;
        public
    };
    std::fs::create_dir_all(&policies).map_err(|e| Error::io("create", &policies, e))?;
    let policy_path = policies.join("demo.toml");
    let policy_text = format!(
        r#"# The demo policy written by `veza-dr demo`.
[source]
type = "volume"
path = "{src}"
exclude = ["*.tmp"]

[schedule]
full = "0 3 * * *"
incremental = "0 * * * *"

[repository]
url = "file://{repo}"

[encryption]
recipients = ["{recipient}"]

[retention]
keep-last = 5
keep-daily = 30
"#,
        src = src.display(),
        repo = dir.join("repository").display(),
    );
    std::fs::write(&policy_path, policy_text).map_err(|e| Error::io("write", &policy_path, e))?;
    let policy = crate::policy::load_file(&policy_path)?;
    let g = Global {
        policies: policies.clone(),
        state_dir: Some(g.state_dir.clone().unwrap_or_else(|| dir.join("state"))),
        ..g.clone()
    };

    crate::outln!("== demo in {}", dir.display());
    crate::outln!("== 1. full backup of {}", src.display());
    data::backup(&g, &policy, crate::jobs::backup::Mode::Full).await?;
    let changed = src.join("docs/notes.txt");
    std::fs::write(&changed, format!("changed at {}\n", chrono::Utc::now().to_rfc3339()))
        .map_err(|e| Error::io("write", &changed, e))?;
    crate::outln!("== 2. incremental backup after changing docs/notes.txt");
    data::backup(&g, &policy, crate::jobs::backup::Mode::Incremental).await?;
    crate::outln!("== 3. snapshots");
    Box::pin(commands::dispatch(super::Cli {
        global: g.clone(),
        command: super::Command::Snapshots { policy: policy_path.display().to_string() },
    }))
    .await?;
    crate::outln!("== 4. restore the latest snapshot with {}", key.display());
    let req = crate::jobs::restore::RestoreRequest { target: Some(restored.clone()), ..Default::default() };
    data::restore(&g, &policy, Some(&key), &req).await?;
    let diffs = compare(&src, &restored)?;
    if diffs.is_empty() {
        crate::outln!("== restored tree is identical to the source (content, modes, mtimes, links)");
        crate::outln!("   policy: {}\n   repository: {}", policy_path.display(), dir.join("repository").display());
        Ok(0)
    } else {
        Err(Error::damaged(format!("restored tree differs from the source: {}", diffs.join("; "))))
    }
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io("create", path, e))?;
    f.write_all(text.as_bytes()).map_err(|e| Error::io("write", path, e))
}

fn make_tree(src: &Path) -> Result<()> {
    let io = |e: std::io::Error| Error::io("create demo file in", src, e);
    if src.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(src.join("docs")).map_err(io)?;
    std::fs::create_dir_all(src.join("images/2026")).map_err(io)?;
    std::fs::create_dir_all(src.join("empty")).map_err(io)?;
    std::fs::write(src.join("docs/notes.txt"), "first version\n").map_err(io)?;
    std::fs::write(src.join("docs/résumé.txt"), "unicode names survive\n").map_err(io)?;
    let text: String = (0..20000).map(|i| format!("line {i}: the quick brown fox\n")).collect();
    std::fs::write(src.join("docs/big.log"), text).map_err(io)?;
    let mut rnd = vec![0u8; 3 << 20];
    let mut x: u64 = 0x9E3779B97F4A7C15;
    for b in rnd.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(src.join("images/2026/photo.bin"), &rnd).map_err(io)?;
    std::fs::write(src.join("scratch.tmp"), "excluded by the policy\n").map_err(io)?;
    std::os::unix::fs::symlink("docs/notes.txt", src.join("latest-notes")).map_err(io)?;
    std::fs::hard_link(src.join("docs/big.log"), src.join("docs/big-hardlink.log")).map_err(io)?;
    Ok(())
}

/// Differences between two trees: content, type, mode and mtime (excluded `*.tmp` ignored).
pub fn compare(a: &Path, b: &Path) -> Result<Vec<String>> {
    use std::os::unix::fs::MetadataExt;
    let mut diffs = Vec::new();
    for e in walkdir::WalkDir::new(a).sort_by_file_name() {
        let e = e.map_err(|e| Error::failed(format!("cannot walk {}: {e}", a.display())))?;
        let rel = e.path().strip_prefix(a).expect("under root");
        if rel.extension().is_some_and(|x| x == "tmp") {
            continue;
        }
        let other = b.join(rel);
        let (ma, mb) = match (e.path().symlink_metadata(), other.symlink_metadata()) {
            (Ok(ma), Ok(mb)) => (ma, mb),
            _ => {
                diffs.push(format!("{} missing", rel.display()));
                continue;
            }
        };
        if ma.file_type() != mb.file_type() || (ma.mode() != mb.mode() && !ma.file_type().is_symlink()) {
            diffs.push(format!("{} type or mode differs", rel.display()));
        } else if ma.is_file() && std::fs::read(e.path()).ok() != std::fs::read(&other).ok() {
            diffs.push(format!("{} content differs", rel.display()));
        } else if ma.file_type().is_symlink() && std::fs::read_link(e.path()).ok() != std::fs::read_link(&other).ok() {
            diffs.push(format!("{} link target differs", rel.display()));
        } else if !ma.is_dir() && (ma.mtime(), ma.mtime_nsec()) != (mb.mtime(), mb.mtime_nsec()) {
            diffs.push(format!("{} mtime differs", rel.display()));
        }
    }
    Ok(diffs)
}
