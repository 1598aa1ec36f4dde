//! The restored data directory handed to the server's user, without following a link: the
//! tree below the target belongs to that user while root works in it, and so may the target's
//! parent, so every step goes through directory handles (`SafeDir`) opened once, the target's
//! at the start of the restore (`SafeDir::open_target`), never through a path a link could
//! redirect.

use crate::crypto::Identity;
use crate::error::{Error, Result};
use crate::pipeline::safe_dir::{Kind, SafeDir};
use std::path::{Path, PathBuf};

/// The restore's own directory in the restored tree: the policy copy and wal-fetch's spool.
pub const WORK: &str = "veza-dr-restore";

/// A private copy of the identity for the restored server's restore_command: outside the
/// data directory, in a new 0700 directory of the server's user beside it, removed when
/// dropped (unless kept for a server the operator starts later). The directory's parent may
/// belong to the server's user too, so the copy is written through a handle of the new
/// directory, opened without following a link.
pub struct IdentityCopy {
    pub dir: PathBuf,
    pub file: PathBuf,
    keep: bool,
}

impl IdentityCopy {
    pub fn create(identity: &Identity, target: &Path, uid: u32, gid: u32) -> Result<IdentityCopy> {
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "data".into());
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            Some(_) => Path::new("."),
            None => Path::new("/"),
        };
        let base = format!(".{name}.veza-dr-{}", hex::encode(rand::random::<[u8; 4]>()));
        let safe = SafeDir::open_child(parent, base.as_ref(), true, true)?;
        let copy = IdentityCopy { file: safe.full(Path::new("identity")), dir: safe.path().to_path_buf(), keep: false };
        let mut f = safe.create_new(Path::new("identity"))?;
        identity.write_copy(&mut f, &copy.file)?;
        safe.chown_tree(uid, gid);
        Ok(copy)
    }

    /// Leave the copy for a server the operator starts (they are told to delete it).
    pub fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for IdentityCopy {
    fn drop(&mut self) {
        if !self.keep {
            // remove_dir_all removes a link put in the directory's place, not what it names.
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Where `link_tablespaces` puts a restore's tablespaces: `<abs target>-tablespaces`, as
/// its parent and its name.
fn tablespace_home(target: &Path) -> Result<Option<(PathBuf, std::ffi::OsString)>> {
    let abs = std::path::absolute(target).map_err(|e| Error::io("resolve", target, e))?;
    let (Some(parent), Some(name)) = (abs.parent(), abs.file_name()) else { return Ok(None) };
    let mut dir = name.to_os_string();
    dir.push("-tablespaces");
    Ok(Some((parent.to_path_buf(), dir)))
}

/// Tablespaces come back as directories under `pg_tblspc/<oid>`: move each into
/// `<target>-tablespaces/<oid>` and link it there, as PostgreSQL expects (never onto the
/// source's own locations; with the links in place, tablespace_map is not needed). `safe` is
/// the handle of `target`. Returns that directory's handle when there was a tablespace: the
/// hand-over goes through it, never through its name (whose parent the server's user may own).
pub fn link_tablespaces(safe: &SafeDir, target: &Path) -> Result<Option<SafeDir>> {
    let spc = Path::new("pg_tblspc");
    // No pg_tblspc (or one that is not a directory): no tablespace to move.
    let Ok(entries) = safe.list(spc) else { return Ok(None) };
    let Some((parent, dir)) = tablespace_home(target)? else { return Ok(None) };
    let mut home: Option<SafeDir> = None;
    for (oid, kind) in entries {
        if kind != Kind::Dir {
            continue;
        }
        if home.is_none() {
            home = Some(SafeDir::open_child(&parent, &dir, true, false)?);
        }
        let Some(h) = home.as_ref() else { continue };
        // A link left there by a delta restore cut off after its swap (see
        // `bring_back_tablespaces`) is only a name: removing it never touches what it names.
        // So is an empty directory: what DROP TABLESPACE leaves of a location.
        if h.read_link(Path::new(&oid))?.is_some() || h.list(Path::new(&oid)).is_ok_and(|v| v.is_empty()) {
            h.remove_all(Path::new(&oid))?;
        }
        let at = spc.join(&oid);
        safe.move_to(&at, h, Path::new(&oid))?;
        safe.symlink(&at, h.path().join(&oid).as_os_str(), false)?;
    }
    Ok(home)
}

/// Before anything is written: a directory already at `<target>-tablespaces/<oid>` (left by
/// an earlier restore into another copy) would stop `link_tablespaces` after the whole tree
/// was written, with no recovery files. Links and empty directories there are fine (they
/// are removed; DROP TABLESPACE leaves its location empty). A home that is not a directory is
/// left to `link_tablespaces`, which refuses it only if there is a tablespace to move. A
/// delta calls this after `bring_back_tablespaces`.
pub fn check_tablespace_home(target: &Path) -> Result<()> {
    let Some((parent, dir)) = tablespace_home(target)? else { return Ok(()) };
    let home = parent.join(&dir);
    if !std::fs::symlink_metadata(&home).is_ok_and(|m| m.is_dir()) {
        return Ok(());
    }
    let h = SafeDir::open_child(&parent, &dir, false, false)?;
    let in_the_way = |oid: &std::ffi::OsString, k: &Kind| match k {
        Kind::Symlink => false,
        Kind::Dir => !h.list(Path::new(oid)).is_ok_and(|v| v.is_empty()),
        _ => true,
    };
    if let Some((oid, _)) = h.list(Path::new(""))?.into_iter().find(|(o, k)| in_the_way(o, k)) {
        return Err(Error::usage(format!(
            "{} is in the way: a restore into {} moves its tablespaces to {}",
            home.join(&oid).display(),
            target.display(),
            home.display()
        ))
        .with_hint("it is left from an earlier restore: move it away or remove it, then run the restore again"));
    }
    Ok(())
}

/// Before a delta restore over a data directory an earlier restore made: each tablespace
/// that `link_tablespaces` moved to `<target>-tablespaces/<oid>` goes back to
/// `pg_tblspc/<oid>` (swapped with its link in one step, then the link removed), so the delta
/// compares it in place and `link_tablespaces` moves it out again. A tablespace linked
/// anywhere else (the source's own location, on a failed primary) is refused: a delta
/// restore writes only inside its target. `safe` is the handle of `target`. Returns how many
/// were brought back.
pub fn bring_back_tablespaces(safe: &SafeDir, target: &Path) -> Result<usize> {
    let spc = Path::new("pg_tblspc");
    let Ok(entries) = safe.list(spc) else { return Ok(0) };
    let Some((parent, dir)) = tablespace_home(target)? else { return Ok(0) };
    let expected = parent.join(&dir);
    // Every link is checked before any is moved: a refusal leaves the target as it was.
    let links: Vec<_> = entries.into_iter().filter(|(_, k)| *k == Kind::Symlink).map(|(oid, _)| oid).collect();
    for oid in &links {
        let at = spc.join(oid);
        let want = expected.join(oid);
        let link = PathBuf::from(safe.read_link(&at)?.unwrap_or_default());
        if link != want {
            return Err(Error::usage(format!(
                "{} links to {}, outside the target: a delta restore writes only inside its target and {}",
                safe.full(&at).display(),
                link.display(),
                expected.display()
            ))
            .with_hint(format!(
                "restore into an empty directory, or move that tablespace to {} and link it there",
                want.display()
            )));
        }
    }
    let mut home: Option<SafeDir> = None;
    let mut moved = 0;
    for oid in links {
        let at = spc.join(&oid);
        // A home that is gone leaves nothing to bring back (one that is a link is refused).
        if home.is_none() && std::fs::symlink_metadata(&expected).is_ok() {
            home = Some(SafeDir::open_child(&parent, &dir, false, false)?);
        }
        match home.as_ref() {
            Some(h) if h.list(Path::new(""))?.iter().any(|(n, _)| *n == oid) => {
                // Whatever is at home/<oid> (the server's user may have put a link there)
                // comes in as an entry of the target, which the delta checks like any other;
                // the link, now at home, is removed.
                safe.exchange(&at, h, Path::new(&oid))?;
                h.remove_all(Path::new(&oid))?;
                moved += 1;
            }
            // Its directory is gone: the delta restores that tablespace in full.
            _ => safe.remove_all(&at)?,
        }
    }
    Ok(moved)
}

/// What recovery needs, written into the restored tree `target`: `backup_label`, `pg_wal`,
/// the work directory with its spool and a copy of the policy, `conf` appended to
/// `postgresql.auto.conf`, and `recovery.signal`. Through directory handles (`safe`, the
/// target's): a link planted at any of these names is replaced, never written through.
pub fn write_recovery(safe: &SafeDir, label: &str, policy_name: &str, policy: &[u8], conf: &str) -> Result<()> {
    safe.write_new(Path::new("backup_label"), label.as_bytes())?;
    safe.mkdir_all(Path::new("pg_wal/archive_status"))?;
    safe.mkdir_all(&Path::new(WORK).join("spool"))?;
    safe.write_new(&Path::new(WORK).join(format!("{policy_name}.toml")), policy)?;
    let auto = Path::new("postgresql.auto.conf");
    let mut text = safe.read_file(auto)?.unwrap_or_default();
    text.extend_from_slice(conf.as_bytes());
    safe.write_new(auto, &text)?;
    safe.write_new(Path::new("recovery.signal"), b"")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// Whether the test runs as root (CI does); otherwise it says it is skipped.
    fn as_root() -> bool {
        let root = nix::unistd::geteuid().is_root();
        if !root {
            eprintln!("skipped: needs root to give files away");
        }
        root
    }

    /// Links planted where the recovery files go (the tree belongs to the server's user, who
    /// can put them there between the restore's last look and these writes) are replaced, and
    /// nothing outside the tree is written.
    #[test]
    fn recovery_files_replace_planted_links_and_write_nothing_outside() {
        let t = tempfile::tempdir().unwrap();
        let (target, outside) = (t.path().join("data"), t.path().join("outside"));
        std::fs::create_dir_all(&target).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("victim"), b"precious").unwrap();
        for n in ["backup_label", "postgresql.auto.conf", "recovery.signal"] {
            std::os::unix::fs::symlink(outside.join("victim"), target.join(n)).unwrap();
        }
        for n in ["pg_wal", WORK] {
            std::os::unix::fs::symlink(&outside, target.join(n)).unwrap();
        }
        write_recovery(
            &SafeDir::open_target(&target).unwrap(),
            "START WAL LOCATION: 0/2000028\n",
            "db",
            b"[policy]",
            "restore_command = 'x'\n",
        )
        .unwrap();
        let listing: Vec<_> = std::fs::read_dir(&outside).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(listing, vec![std::ffi::OsString::from("victim")], "nothing new outside");
        assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"precious");
        for n in ["backup_label", "postgresql.auto.conf", "recovery.signal", "pg_wal", WORK] {
            assert!(!std::fs::symlink_metadata(target.join(n)).unwrap().is_symlink(), "{n} is no longer a link");
        }
        assert_eq!(std::fs::read_to_string(target.join("backup_label")).unwrap(), "START WAL LOCATION: 0/2000028\n");
        assert_eq!(std::fs::read_to_string(target.join("postgresql.auto.conf")).unwrap(), "restore_command = 'x'\n");
        assert!(target.join("pg_wal/archive_status").is_dir());
        assert_eq!(std::fs::read(target.join(WORK).join("db.toml")).unwrap(), b"[policy]");
    }

    /// Each tablespace directory is moved beside the data directory and linked; a link planted
    /// where that directory goes (its parent may be the server user's) is refused, and
    /// nothing is moved through it.
    #[test]
    fn tablespaces_move_beside_the_target_and_never_through_a_planted_link() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("data");
        std::fs::create_dir_all(target.join("pg_tblspc/16384/PG_15_202209061")).unwrap();
        std::fs::write(target.join("pg_tblspc/16384/PG_15_202209061/1"), b"rel").unwrap();
        let home = link_tablespaces(&SafeDir::open_target(&target).unwrap(), &target).unwrap().unwrap();
        let home = home.path().to_path_buf();
        assert_eq!(home, t.path().join("data-tablespaces"));
        assert_eq!(std::fs::read_link(target.join("pg_tblspc/16384")).unwrap(), home.join("16384"));
        assert_eq!(std::fs::read(target.join("pg_tblspc/16384/PG_15_202209061/1")).unwrap(), b"rel");

        let (target, outside) = (t.path().join("other"), t.path().join("outside"));
        std::fs::create_dir_all(target.join("pg_tblspc/16385")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, t.path().join("other-tablespaces")).unwrap();
        let e = link_tablespaces(&SafeDir::open_target(&target).unwrap(), &target).err().expect("refused");
        assert!(e.to_string().contains("other-tablespaces"), "{e}");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "nothing moved through the link");
        assert!(target.join("pg_tblspc/16385").is_dir());
    }

    /// A delta restore brings tablespaces an earlier restore linked beside the target back
    /// into it, and moves them out again after; a tablespace linked anywhere else is refused
    /// before anything moves; a link left at home by a swap cut short is only removed.
    #[test]
    fn a_delta_brings_back_tablespaces_linked_beside_the_target_and_refuses_others() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("data");
        for oid in ["16384", "16385"] {
            std::fs::create_dir_all(target.join("pg_tblspc").join(oid).join("PG_15_202209061")).unwrap();
            std::fs::write(target.join("pg_tblspc").join(oid).join("PG_15_202209061/1"), oid).unwrap();
        }
        let safe = SafeDir::open_target(&target).unwrap();
        let home = link_tablespaces(&safe, &target).unwrap().unwrap().path().to_path_buf();
        assert_eq!(bring_back_tablespaces(&safe, &target).unwrap(), 2);
        for oid in ["16384", "16385"] {
            let at = target.join("pg_tblspc").join(oid);
            assert!(std::fs::symlink_metadata(&at).unwrap().is_dir(), "{oid} is back in place");
            assert_eq!(std::fs::read_to_string(at.join("PG_15_202209061/1")).unwrap(), oid);
        }
        assert_eq!(std::fs::read_dir(&home).unwrap().count(), 0, "nothing left beside the target");

        // Cut short after the swap: the link sits at home; the next restore moves past it.
        std::os::unix::fs::symlink(home.join("16384"), home.join("16384")).unwrap();
        assert_eq!(link_tablespaces(&safe, &target).unwrap().unwrap().path(), home);
        assert_eq!(std::fs::read_to_string(target.join("pg_tblspc/16384/PG_15_202209061/1")).unwrap(), "16384");
        assert!(std::fs::symlink_metadata(home.join("16384")).unwrap().is_dir());

        // A tablespace at the source's own location: refused, and nothing moved.
        let elsewhere = t.path().join("primary-tablespace");
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::remove_file(target.join("pg_tblspc/16385")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, target.join("pg_tblspc/16385")).unwrap();
        let e = bring_back_tablespaces(&safe, &target).unwrap_err();
        assert!(e.to_string().contains("outside the target"), "{e}");
        assert!(std::fs::symlink_metadata(target.join("pg_tblspc/16384")).unwrap().is_symlink(), "16384 not moved");
        assert!(std::fs::symlink_metadata(home.join("16384")).unwrap().is_dir());
    }

    /// A regular postgresql.auto.conf keeps what it had, with the settings appended.
    #[test]
    fn recovery_settings_are_appended_to_the_restored_auto_conf() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("postgresql.auto.conf"), "work_mem = '8MB'\n").unwrap();
        write_recovery(&SafeDir::open_target(t.path()).unwrap(), "label", "db", b"", "restore_command = 'x'\n")
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(t.path().join("postgresql.auto.conf")).unwrap(),
            "work_mem = '8MB'\nrestore_command = 'x'\n"
        );
    }

    /// The hand-over gives every entry of the tree to the user, links as links, and leaves
    /// a file with a second name (which may be outside the tree) to its owner.
    #[test]
    fn the_hand_over_gives_the_whole_tree_and_keeps_multiply_linked_files() {
        if !as_root() {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("data");
        std::fs::create_dir_all(root.join("base/1")).unwrap();
        std::fs::write(root.join("base/1/1259"), b"x").unwrap();
        std::fs::write(t.path().join("outside"), b"y").unwrap();
        std::fs::hard_link(t.path().join("outside"), root.join("base/twice")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("link")).unwrap();
        assert_eq!(SafeDir::open_target(&root).unwrap().chown_tree(4243, 4244), 1, "the file with two names");
        for p in ["", "base", "base/1", "base/1/1259", "link"] {
            let m = std::fs::symlink_metadata(root.join(p)).unwrap();
            assert_eq!((m.uid(), m.gid()), (4243, 4244), "{p}");
        }
        assert_eq!(std::fs::symlink_metadata(root.join("base/twice")).unwrap().uid(), 0);
        assert_eq!(std::fs::metadata("/etc").unwrap().uid(), 0);
    }

    /// The server's user owns the tree while root hands it over, so it can swap a directory
    /// for a link to somewhere else between the walk's listing and its chown of an entry.
    /// Nothing outside the tree may change owner, however the race goes.
    #[test]
    fn a_directory_swapped_for_a_link_during_the_hand_over_gives_away_nothing_outside() {
        if !as_root() {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let (target, victim) = (t.path().join("data"), t.path().join("victim"));
        let names: Vec<String> = (0..3000).map(|i| format!("{i:05}")).collect();
        for d in [target.join("base"), victim.clone()] {
            std::fs::create_dir_all(&d).unwrap();
            for n in &names {
                std::fs::write(d.join(n), b"x").unwrap();
            }
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let attacker = {
            let (stop, target, victim) = (stop.clone(), target.clone(), victim.clone());
            std::thread::spawn(move || {
                let (dir, aside) = (target.join("base"), target.join("base.real"));
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = std::fs::rename(&dir, &aside);
                    let _ = std::os::unix::fs::symlink(&victim, &dir);
                    std::thread::yield_now();
                    let _ = std::fs::remove_file(&dir);
                    let _ = std::fs::rename(&aside, &dir);
                }
            })
        };
        for _ in 0..20 {
            SafeDir::open_target(&target).unwrap().chown_tree(4242, 4242);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        attacker.join().unwrap();
        let given: Vec<&String> =
            names.iter().filter(|n| std::fs::symlink_metadata(victim.join(n)).unwrap().uid() == 4242).collect();
        assert!(given.is_empty(), "{} files outside the tree were given away, e.g. {:?}", given.len(), given.first());
        assert_eq!(std::fs::symlink_metadata(&victim).unwrap().uid(), 0);
    }

    /// The target's parent may be the server user's: between the moves and the hand-over it
    /// can put links to root's directories in place of the target and of the tablespaces'
    /// home. The hand-over goes through the handles opened before, so nothing those links
    /// name changes owner, and the real tree (moved aside) is still given away.
    #[test]
    fn links_put_in_place_of_the_target_and_its_tablespaces_give_away_nothing() {
        if !as_root() {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let (target, victim) = (t.path().join("data"), t.path().join("victim"));
        std::fs::create_dir_all(target.join("pg_tblspc/16384/PG_15_202209061")).unwrap();
        std::fs::write(target.join("pg_tblspc/16384/PG_15_202209061/1"), b"rel").unwrap();
        std::fs::create_dir_all(&victim).unwrap();
        std::fs::write(victim.join("shadow"), b"x").unwrap();
        let owners = || -> Vec<(u32, u32)> {
            ["victim", "victim/shadow"]
                .iter()
                .map(|p| std::fs::symlink_metadata(t.path().join(p)).map(|m| (m.uid(), m.mode())).unwrap())
                .collect()
        };
        let before = owners();
        let safe = SafeDir::open_target(&target).unwrap();
        let home = link_tablespaces(&safe, &target).unwrap().unwrap();
        let home_path = t.path().join("data-tablespaces");
        for (p, aside) in [(&target, t.path().join("data.moved")), (&home_path, t.path().join("ts.moved"))] {
            std::fs::rename(p, &aside).unwrap();
            std::os::unix::fs::symlink(&victim, p).unwrap();
        }
        write_recovery(&safe, "label", "db", b"", "restore_command = 'x'\n").unwrap();
        assert_eq!(safe.chown_tree(4245, 4245) + home.chown_tree(4245, 4245), 0);
        safe.chmod_root(0o700).unwrap();
        assert_eq!(owners(), before, "owner and mode of what the links name");
        assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 1, "no recovery file written through the link");
        for p in ["data.moved", "data.moved/recovery.signal", "ts.moved/16384/PG_15_202209061/1"] {
            assert_eq!(std::fs::symlink_metadata(t.path().join(p)).unwrap().uid(), 4245, "{p}");
        }
    }

    /// A link is never followed at the target's own name, and a device node, or an entry
    /// other than a directory with a second name, keeps its owner and is counted.
    #[test]
    fn a_target_that_is_a_link_is_refused_and_devices_and_linked_entries_are_not_given() {
        let t = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc", t.path().join("data")).unwrap();
        let e = SafeDir::open_target(&t.path().join("data")).err().expect("refused");
        assert!(e.to_string().contains("is a link"), "{e}");
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to make device nodes and give files away");
            return;
        }
        let root = t.path().join("tree");
        std::fs::create_dir_all(&root).unwrap();
        use nix::sys::stat::{mknod, Mode, SFlag};
        let dev = nix::sys::stat::makedev(1, 3);
        if mknod(&root.join("null"), SFlag::S_IFCHR, Mode::from_bits_truncate(0o600), dev)
            == Err(nix::errno::Errno::EPERM)
        {
            eprintln!("skipped: this root may not make device nodes");
            return;
        }
        nix::unistd::mkfifo(&t.path().join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        std::fs::hard_link(t.path().join("fifo"), root.join("fifo")).unwrap();
        assert_eq!(SafeDir::open_target(&root).unwrap().chown_tree(4246, 4246), 2);
        for p in ["tree/null", "fifo"] {
            assert_eq!(std::fs::symlink_metadata(t.path().join(p)).unwrap().uid(), 0, "{p}");
        }
    }

    /// A postgresql.auto.conf the server's user made huge is refused, not read into memory; a
    /// directory left in the tablespaces' home is refused before anything is written.
    #[test]
    fn a_huge_auto_conf_and_a_stale_tablespace_home_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("data");
        std::fs::create_dir_all(&target).unwrap();
        let f = std::fs::File::create(target.join("postgresql.auto.conf")).unwrap();
        f.set_len(crate::pipeline::safe_dir::READ_LIMIT + 1).unwrap();
        let e = write_recovery(&SafeDir::open_target(&target).unwrap(), "label", "db", b"", "x = 1\n").unwrap_err();
        assert!(e.to_string().contains("larger than 16 MiB"), "{e}");

        check_tablespace_home(&target).unwrap();
        std::fs::create_dir_all(t.path().join("data-tablespaces")).unwrap();
        std::os::unix::fs::symlink("/nowhere", t.path().join("data-tablespaces/16384")).unwrap();
        check_tablespace_home(&target).unwrap();
        std::fs::create_dir_all(t.path().join("data-tablespaces/16385")).unwrap();
        check_tablespace_home(&target).unwrap(); // empty: what DROP TABLESPACE leaves
        std::fs::write(t.path().join("data-tablespaces/16385/PG_VERSION"), b"15").unwrap();
        let e = check_tablespace_home(&target).unwrap_err();
        assert!(e.to_string().contains("16385 is in the way"), "{e}");
    }

    /// What root reads back from the tree after the hand-over (the server's log): a link, a
    /// FIFO or a huge file there gives nothing or only the end, and never blocks.
    #[test]
    fn logs_in_the_handed_over_tree_are_read_safely_and_only_their_end() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("data");
        std::fs::create_dir_all(d.join(WORK)).unwrap();
        std::fs::write(t.path().join("secret"), b"root only").unwrap();
        std::os::unix::fs::symlink(t.path().join("secret"), d.join(WORK).join("server.log")).unwrap();
        let safe = SafeDir::open_target(&d).unwrap();
        assert_eq!(safe.read_tail(&Path::new(WORK).join("server.log"), 1 << 20), "", "a link is not followed");
        nix::unistd::mkfifo(&d.join(WORK).join("missing"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert_eq!(safe.read_tail(&Path::new(WORK).join("missing"), 1 << 20), "", "a FIFO is not read");
        std::fs::remove_file(d.join(WORK).join("server.log")).unwrap();
        let mut log = vec![b'x'; 100_000];
        log.extend_from_slice(b"\nredo done at 0/3000028\n");
        std::fs::write(d.join(WORK).join("server.log"), &log).unwrap();
        let tail = safe.read_tail(&Path::new(WORK).join("server.log"), 64);
        assert_eq!(tail.len(), 64);
        assert!(tail.ends_with("redo done at 0/3000028\n"), "{tail}");
    }
}
