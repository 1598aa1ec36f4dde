//! A restore target that cannot be turned against its host: every entry is created relative
//! to directory handles opened one component at a time with `O_NOFOLLOW`, so no symlink, in
//! the snapshot or planted in the target, is ever followed. Existing entries are replaced only
//! with `--overwrite`, by unlinking them first (never writing through them: a planted hard link
//! to `/etc/shadow` is unlinked, not truncated). Files are created 0600 and directories 0700;
//! the recorded owners, modes and times are applied at the end, on the entry itself
//! (`fchownat`/`utimensat` with `AT_SYMLINK_NOFOLLOW`, `fchmod` on a no-follow handle).

use crate::error::{Error, Result};
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::Mode;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Stops `SafeDir::flush_behind`'s thread when dropped (after its current `syncfs`, if any).
pub struct FlushBehind {
    _stop: std::sync::mpsc::Sender<()>,
}

/// What an existing entry is, as `restore --delta` compares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Other,
}

pub struct SafeDir {
    root: Arc<OwnedFd>,
    display: PathBuf,
    /// Directory handles by relative path: each one was reached without following a link.
    dirs: Mutex<HashMap<PathBuf, Arc<OwnedFd>>>,
}

fn err(what: &str, path: &Path, e: nix::errno::Errno) -> Error {
    Error::io(what, path, std::io::Error::from_raw_os_error(e as i32))
}

/// The largest file `read_file` reads.
pub const READ_LIMIT: u64 = 16 << 20;

const DIR_FLAGS: OFlag = OFlag::O_DIRECTORY.union(OFlag::O_NOFOLLOW).union(OFlag::O_RDONLY).union(OFlag::O_CLOEXEC);

/// The normal components of a relative path (`.` dropped); anything else is refused.
fn parts(rel: &Path) -> Result<Vec<&OsStr>> {
    let mut v = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => v.push(n),
            Component::CurDir => {}
            _ => return Err(Error::damaged(format!("manifest holds an unsafe path {}", rel.display()))),
        }
    }
    Ok(v)
}

impl SafeDir {
    /// Open the target directory (the path the operator named may itself be a link).
    pub fn open(root: &Path) -> Result<SafeDir> {
        let fd = nix::fcntl::open(root, OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| err("open restore target", root, e))?;
        Ok(SafeDir { root: Arc::new(fd), display: root.to_path_buf(), dirs: Mutex::new(HashMap::new()) })
    }

    /// Open the target of a restore whose tree is handed to another user, once, for every
    /// step after (`O_NOFOLLOW` on its last component, created 0700 when missing, its parents
    /// as the operator's path gives them). The target's parent may belong to that user, who
    /// could put a link in the target's place at any time: a handle opened once keeps every
    /// later step on the directory it first named, and a link already there is refused.
    pub fn open_target(target: &Path) -> Result<SafeDir> {
        let abs = std::path::absolute(target).map_err(|e| Error::io("resolve", target, e))?;
        let (Some(parent), Some(name)) = (abs.parent(), abs.file_name()) else {
            return Err(Error::usage(format!("{} cannot be a restore target", target.display()))
                .with_hint("name a directory below /, such as /var/lib/postgresql/15/main"));
        };
        std::fs::create_dir_all(parent).map_err(|e| Error::io("create restore target", parent, e))?;
        // Only for the message: the no-follow open below is what refuses it.
        if std::fs::symlink_metadata(&abs).is_ok_and(|m| m.is_symlink()) {
            return Err(Error::usage(format!("restore target {} is a link", target.display()))
                .with_hint("name the directory it points to: the restored tree goes to another user, and a link in its place could send it anywhere"));
        }
        let mut d = SafeDir::open_child(parent, name, true, false)?;
        d.display = target.to_path_buf();
        Ok(d)
    }

    /// `chmod` of the root itself, through its handle.
    pub fn chmod_root(&self, mode: u32) -> Result<()> {
        nix::sys::stat::fchmod(&self.root, Mode::from_bits_truncate(mode)).map_err(|e| err("chmod", &self.display, e))
    }

    /// Open directory `name` inside `parent` (the path as the operator's target gives it),
    /// never through a link: a link planted at `name` is refused. With `create` the directory
    /// is made first (0700); with `new` it must not exist yet.
    pub fn open_child(parent: &Path, name: &OsStr, create: bool, new: bool) -> Result<SafeDir> {
        let display = parent.join(name);
        let pfd = nix::fcntl::open(parent, OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| err("open directory", parent, e))?;
        if create {
            match nix::sys::stat::mkdirat(pfd.as_fd(), name, Mode::from_bits_truncate(0o700)) {
                Ok(()) => {}
                Err(nix::errno::Errno::EEXIST) if !new => {}
                Err(e) => return Err(err("create directory", &display, e)),
            }
        }
        let fd = nix::fcntl::openat(pfd.as_fd(), name, DIR_FLAGS, Mode::empty()).map_err(|e| match e {
            nix::errno::Errno::ELOOP | nix::errno::Errno::ENOTDIR => {
                Error::usage(format!("{} is not a directory (a link?): refused", display.display()))
                    .with_hint("remove it, then run the restore again")
            }
            e => err("open directory", &display, e),
        })?;
        Ok(SafeDir { root: Arc::new(fd), display, dirs: Mutex::new(HashMap::new()) })
    }

    /// Move the entry `rel` to `to_rel` in `to` (same file system), never onto an entry that
    /// exists. The entry moved is the one in the directory reached without links.
    pub fn move_to(&self, rel: &Path, to: &SafeDir, to_rel: &Path) -> Result<()> {
        let (dir, name) = self.parent(rel)?;
        let (tdir, tname) = to.parent(to_rel)?;
        nix::fcntl::renameat2(dir.as_fd(), name, tdir.as_fd(), tname, nix::fcntl::RenameFlags::RENAME_NOREPLACE)
            .map_err(|e| err(&format!("move {} to", self.full(rel).display()), &to.full(to_rel), e))?;
        let key: PathBuf = parts(rel)?.iter().collect();
        self.dirs.lock().expect("not poisoned").retain(|k, _| !k.starts_with(&key));
        Ok(())
    }

    /// Swap the entries `rel` and `to_rel` of `to` in one step (both must exist; same file
    /// system): each is the entry in the directory reached without links.
    pub fn exchange(&self, rel: &Path, to: &SafeDir, to_rel: &Path) -> Result<()> {
        let (dir, name) = self.parent(rel)?;
        let (tdir, tname) = to.parent(to_rel)?;
        nix::fcntl::renameat2(dir.as_fd(), name, tdir.as_fd(), tname, nix::fcntl::RenameFlags::RENAME_EXCHANGE)
            .map_err(|e| err(&format!("swap {} with", self.full(rel).display()), &to.full(to_rel), e))?;
        for (d, r) in [(self, rel), (to, to_rel)] {
            let key: PathBuf = parts(r)?.iter().collect();
            d.dirs.lock().expect("not poisoned").retain(|k, _| !k.starts_with(&key));
        }
        Ok(())
    }

    /// What the link `rel` names (`None` when `rel` is not a link).
    pub fn read_link(&self, rel: &Path) -> Result<Option<std::ffi::OsString>> {
        let (dir, name) = self.parent(rel)?;
        if self.existing(&dir, name) != Some(nix::sys::stat::SFlag::S_IFLNK) {
            return Ok(None);
        }
        nix::fcntl::readlinkat(dir.as_fd(), name).map(Some).map_err(|e| err("read link", &self.full(rel), e))
    }

    /// A new regular file `rel` (0600) opened for writing, in place of whatever entry is
    /// there (a link is unlinked, never written through).
    pub fn create_new(&self, rel: &Path) -> Result<std::fs::File> {
        let (dir, name) = self.parent(rel)?;
        self.clear(&dir, name, rel, true)?;
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = nix::fcntl::openat(dir.as_fd(), name, flags, Mode::from_bits_truncate(0o600))
            .map_err(|e| err("create", &self.full(rel), e))?;
        Ok(std::fs::File::from(fd))
    }

    /// The target's path, as it was opened.
    pub fn path(&self) -> &Path {
        &self.display
    }

    pub fn full(&self, rel: &Path) -> PathBuf {
        self.display.join(rel)
    }

    /// The handle of directory `rel` (relative to the root), reached component by component.
    fn dir(&self, rel: &Path) -> Result<Arc<OwnedFd>> {
        let names = parts(rel)?;
        if names.is_empty() {
            return Ok(self.root.clone());
        }
        let key: PathBuf = names.iter().collect();
        if let Some(fd) = self.dirs.lock().expect("not poisoned").get(&key) {
            return Ok(fd.clone());
        }
        let mut cur = self.root.clone();
        let mut so_far = PathBuf::new();
        for n in names {
            so_far.push(n);
            let fd = nix::fcntl::openat(cur.as_fd(), n, DIR_FLAGS, Mode::empty()).map_err(|e| match e {
                nix::errno::Errno::ELOOP | nix::errno::Errno::ENOTDIR => Error::damaged(format!(
                    "restore would write through {}, which is not a directory (a link?): refused",
                    self.full(&so_far).display()
                ))
                .with_hint("remove it from the target, or restore into an empty directory"),
                e => err("open directory", &self.full(&so_far), e),
            })?;
            cur = Arc::new(fd);
        }
        self.dirs.lock().expect("not poisoned").insert(key, cur.clone());
        Ok(cur)
    }

    /// The parent's handle and the last component of `rel`.
    fn parent<'a>(&self, rel: &'a Path) -> Result<(Arc<OwnedFd>, &'a OsStr)> {
        let names = parts(rel)?;
        let Some(name) = names.last().copied() else {
            return Err(Error::damaged(format!("manifest holds an empty path {}", rel.display())));
        };
        let parent: PathBuf = names[..names.len() - 1].iter().collect();
        Ok((self.dir(&parent)?, name))
    }

    /// What is at `rel` now, without following a link.
    fn existing(&self, dir: &OwnedFd, name: &OsStr) -> Option<nix::sys::stat::SFlag> {
        nix::sys::stat::fstatat(dir.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .ok()
            .map(|st| nix::sys::stat::SFlag::from_bits_truncate(st.st_mode & nix::libc::S_IFMT))
    }

    /// Make room for a new entry: with `overwrite`, unlink what is there (a directory that is
    /// not empty stays, and the creation then fails naming it).
    fn clear(&self, dir: &OwnedFd, name: &OsStr, rel: &Path, overwrite: bool) -> Result<()> {
        let Some(kind) = self.existing(dir, name) else { return Ok(()) };
        if !overwrite {
            return Err(Error::usage(format!("{} exists in the restore target", self.full(rel).display()))
                .with_hint("restore into an empty directory, or pass --overwrite"));
        }
        let flag = if kind == nix::sys::stat::SFlag::S_IFDIR {
            nix::unistd::UnlinkatFlags::RemoveDir
        } else {
            nix::unistd::UnlinkatFlags::NoRemoveDir
        };
        nix::unistd::unlinkat(dir.as_fd(), name, flag).map_err(|e| err("replace", &self.full(rel), e))
    }

    /// The entries of directory `rel`, each with its kind (links not followed).
    pub fn list(&self, rel: &Path) -> Result<Vec<(std::ffi::OsString, Kind)>> {
        use std::os::unix::ffi::OsStrExt;
        let fd = self.dir(rel)?;
        let dup = nix::unistd::dup(fd.as_fd()).map_err(|e| err("read directory", &self.full(rel), e))?;
        let mut d = nix::dir::Dir::from_fd(dup).map_err(|e| err("read directory", &self.full(rel), e))?;
        let mut out = Vec::new();
        for ent in d.iter() {
            let ent = ent.map_err(|e| err("read directory", &self.full(rel), e))?;
            let name = OsStr::from_bytes(ent.file_name().to_bytes());
            if name == "." || name == ".." {
                continue;
            }
            let kind = match self.existing(&fd, name) {
                Some(nix::sys::stat::SFlag::S_IFDIR) => Kind::Dir,
                Some(nix::sys::stat::SFlag::S_IFREG) => Kind::File,
                Some(nix::sys::stat::SFlag::S_IFLNK) => Kind::Symlink,
                _ => Kind::Other,
            };
            out.push((name.to_os_string(), kind));
        }
        Ok(out)
    }

    /// Remove `rel` and, for a directory, everything below it, never following a link.
    pub fn remove_all(&self, rel: &Path) -> Result<()> {
        let (dir, name) = self.parent(rel)?;
        if self.existing(&dir, name) == Some(nix::sys::stat::SFlag::S_IFDIR) {
            for (child, _) in self.list(rel)? {
                self.remove_all(&rel.join(child))?;
            }
            let key: PathBuf = parts(rel)?.iter().collect();
            self.dirs.lock().expect("not poisoned").retain(|k, _| !k.starts_with(&key));
            return nix::unistd::unlinkat(dir.as_fd(), name, nix::unistd::UnlinkatFlags::RemoveDir)
                .map_err(|e| err("remove", &self.full(rel), e));
        }
        nix::unistd::unlinkat(dir.as_fd(), name, nix::unistd::UnlinkatFlags::NoRemoveDir)
            .map_err(|e| err("remove", &self.full(rel), e))
    }

    /// The file at `rel` opened for reading and writing in place, if it is a regular file with
    /// one link; `None` when there is nothing there, or something that must not be written
    /// through (it is then unlinked, and the caller creates the file anew).
    pub fn open_in_place(&self, rel: &Path) -> Result<Option<std::fs::File>> {
        let (dir, name) = self.parent(rel)?;
        let flags = OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        match nix::fcntl::openat(dir.as_fd(), name, flags, Mode::empty()) {
            Ok(fd) => {
                let st = nix::sys::stat::fstat(&fd).map_err(|e| err("stat", &self.full(rel), e))?;
                let regular = st.st_mode & nix::libc::S_IFMT == nix::libc::S_IFREG;
                if regular && st.st_nlink == 1 {
                    return Ok(Some(std::fs::File::from(fd)));
                }
            }
            Err(nix::errno::Errno::ENOENT) => return Ok(None),
            Err(_) => {}
        }
        if self.existing(&dir, name).is_some() {
            self.remove_all(rel)?;
        }
        Ok(None)
    }

    /// The stat of the regular file at `rel` if it has one link (links not followed).
    pub fn file_stat(&self, rel: &Path) -> Option<nix::sys::stat::FileStat> {
        let (dir, name) = self.parent(rel).ok()?;
        let st = nix::sys::stat::fstatat(dir.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW).ok()?;
        (st.st_mode & nix::libc::S_IFMT == nix::libc::S_IFREG && st.st_nlink == 1).then_some(st)
    }

    /// A directory (0700 until `set_meta`). An existing directory is kept as it is.
    pub fn mkdir(&self, rel: &Path, overwrite: bool) -> Result<()> {
        if parts(rel)?.is_empty() {
            return Ok(());
        }
        let (dir, name) = self.parent(rel)?;
        match self.existing(&dir, name) {
            Some(nix::sys::stat::SFlag::S_IFDIR) => return Ok(()),
            Some(_) => self.clear(&dir, name, rel, overwrite)?,
            None => {}
        }
        nix::sys::stat::mkdirat(dir.as_fd(), name, Mode::from_bits_truncate(0o700))
            .map_err(|e| err("create directory", &self.full(rel), e))
    }

    /// A new regular file of `size` bytes (0600 until `set_meta`).
    pub fn create_file(&self, rel: &Path, size: u64, overwrite: bool) -> Result<()> {
        let (dir, name) = self.parent(rel)?;
        self.clear(&dir, name, rel, overwrite)?;
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = nix::fcntl::openat(dir.as_fd(), name, flags, Mode::from_bits_truncate(0o600))
            .map_err(|e| err("create", &self.full(rel), e))?;
        nix::unistd::ftruncate(&fd, size as i64).map_err(|e| err("allocate", &self.full(rel), e))
    }

    /// Write `data` at `offset` of the file `rel` created by `create_file`.
    pub fn write_at(&self, rel: &Path, offset: u64, data: &[u8]) -> Result<()> {
        let (dir, name) = self.parent(rel)?;
        let fd = nix::fcntl::openat(
            dir.as_fd(),
            name,
            OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| err("open", &self.full(rel), e))?;
        let f = std::fs::File::from(fd);
        std::os::unix::fs::FileExt::write_all_at(&f, data, offset).map_err(|e| Error::io("write", &self.full(rel), e))
    }

    /// The file `rel` (made by `create_file`) opened for writes past the page cache
    /// (`O_DIRECT`), if the kernel says this file takes them at offsets and addresses aligned
    /// to `align` (statx `STATX_DIOALIGN`); `None` otherwise, and the caller writes through
    /// the page cache. A kernel without `STATX_DIOALIGN` (before 6.1) gets `None` as well.
    pub fn open_direct(&self, rel: &Path, align: usize) -> Result<Option<std::fs::File>> {
        let (dir, name) = self.parent(rel)?;
        let flags = OFlag::O_RDWR | OFlag::O_DIRECT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = match nix::fcntl::openat(dir.as_fd(), name, flags, Mode::empty()) {
            Ok(fd) => fd,
            // The file system refuses O_DIRECT (tmpfs before 6.6, some FUSE file systems).
            Err(nix::errno::Errno::EINVAL) => return Ok(None),
            Err(e) => return Err(err("open", &self.full(rel), e)),
        };
        let f = std::fs::File::from(fd);
        Ok(dio_aligned(&f, align).then_some(f))
    }

    /// Wait until everything written under the target is on disk (`syncfs`: one journal
    /// commit for the whole tree, where an fsync per file would pay one each). A write error
    /// that only writeback found is reported here, so a restore never says done over bytes a
    /// power cut would lose. (Starting writeback after each write, `sync_file_range`, was
    /// measured too: it made the restore slower, not the later server start faster;
    /// `flush_behind` starts it once a second instead.)
    pub fn sync(&self) -> Result<()> {
        nix::unistd::syncfs(self.root.as_fd()).map_err(|e| err("sync", &self.display, e))
    }

    /// Writeback started while the restore still writes: a thread `syncfs`es the target's
    /// filesystem every second until the returned guard is dropped. Without it the disk sat
    /// idle while the bytes were fetched and then had all of them to write at `sync`. The
    /// thread syncs through its own open file of the root: Linux reports a writeback error
    /// once per open file, so the final `sync` on `root` still sees any error, whatever this
    /// thread saw.
    pub fn flush_behind(&self) -> FlushBehind {
        let (stop, rx) = std::sync::mpsc::channel::<()>();
        let own = nix::fcntl::openat(
            self.root.as_fd(),
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        );
        if let Ok(fd) = own {
            let _ = std::thread::Builder::new().name("flush-behind".into()).spawn(move || {
                use std::sync::mpsc::RecvTimeoutError::Timeout;
                while let Err(Timeout) = rx.recv_timeout(std::time::Duration::from_secs(1)) {
                    let _ = nix::unistd::syncfs(fd.as_fd());
                }
            });
        }
        FlushBehind { _stop: stop }
    }

    pub fn symlink(&self, rel: &Path, target: &OsStr, overwrite: bool) -> Result<()> {
        let (dir, name) = self.parent(rel)?;
        self.clear(&dir, name, rel, overwrite)?;
        nix::unistd::symlinkat(target, dir.as_fd(), name).map_err(|e| err("create symlink", &self.full(rel), e))
    }

    /// A hard link at `rel` to the restored file `first` (both inside the target).
    pub fn hardlink(&self, rel: &Path, first: &Path, overwrite: bool) -> Result<()> {
        let (fdir, fname) = self.parent(first)?;
        let (dir, name) = self.parent(rel)?;
        self.clear(&dir, name, rel, overwrite)?;
        // linkat without AT_SYMLINK_FOLLOW links the entry itself, never what a link names.
        nix::unistd::linkat(fdir.as_fd(), fname, dir.as_fd(), name, AtFlags::empty())
            .map_err(|e| err("create hard link", &self.full(rel), e))
    }

    /// Give the whole tree to `uid`:`gid`, never following a link, for a tree whose owner-to-be
    /// may already write in it (a delta restore's target, or any directory once its own owner
    /// is set). Each directory is walked through a handle opened with `O_NOFOLLOW`, and each
    /// entry is changed through an `O_PATH` handle of the entry itself, after a look at that
    /// same handle: a directory swapped for a link between the listing and the change gives
    /// away the link, never what it names. An entry other than a directory with more than one
    /// link keeps its owner (PostgreSQL makes none, and the other name may be outside the
    /// tree), and so does a device node. Returns how many entries kept their owner.
    pub fn chown_tree(&self, uid: u32, gid: u32) -> usize {
        let owner = (Some(nix::unistd::Uid::from_raw(uid)), Some(nix::unistd::Gid::from_raw(gid)));
        let mut failed = walk_chown(&self.root, owner, 0);
        if nix::unistd::fchown(self.root.as_fd(), owner.0, owner.1).is_err() {
            failed += 1;
        }
        failed
    }

    /// Write a new regular file `rel` (0600) holding `data`, in place of whatever entry is
    /// there (a link is unlinked, never written through). Durable at the caller's `sync`.
    pub fn write_new(&self, rel: &Path, data: &[u8]) -> Result<()> {
        use std::io::Write;
        self.create_new(rel)?.write_all(data).map_err(|e| Error::io("write", &self.full(rel), e))
    }

    /// The bytes of the regular file `rel`, if there is one (a link is not followed), up to
    /// `READ_LIMIT`: the file may be the server user's, who could make it as large as the
    /// disk (or sparse, larger than memory) for root to read.
    pub fn read_file(&self, rel: &Path) -> Result<Option<Vec<u8>>> {
        use std::io::Read;
        let Some((fd, _)) = self.open_regular(rel)? else { return Ok(None) };
        let mut out = Vec::new();
        std::fs::File::from(fd)
            .take(READ_LIMIT + 1)
            .read_to_end(&mut out)
            .map_err(|e| Error::io("read", &self.full(rel), e))?;
        if out.len() as u64 > READ_LIMIT {
            return Err(Error::usage(format!(
                "{} is larger than {} MiB: refused",
                self.full(rel).display(),
                READ_LIMIT >> 20
            ))
            .with_hint(
                "a configuration file is never that large: look at what wrote it, remove it, then restore again",
            ));
        }
        Ok(Some(out))
    }

    /// The regular file `rel` opened for reading (never a link, a FIFO or a device: the open
    /// does not block), with its size.
    fn open_regular(&self, rel: &Path) -> Result<Option<(OwnedFd, u64)>> {
        let (dir, name) = self.parent(rel)?;
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        let fd = match nix::fcntl::openat(dir.as_fd(), name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ELOOP) => return Ok(None),
            Err(e) => return Err(err("open", &self.full(rel), e)),
        };
        let st = nix::sys::stat::fstat(&fd).map_err(|e| err("stat", &self.full(rel), e))?;
        if st.st_mode & nix::libc::S_IFMT != nix::libc::S_IFREG {
            return Ok(None);
        }
        Ok(Some((fd, st.st_size as u64)))
    }

    /// The last `max` bytes (or fewer) of the regular file `rel`, as text; empty when there
    /// is no such file. For logs the server's user writes and could swap for anything.
    pub fn read_tail(&self, rel: &Path, max: u64) -> String {
        use std::os::unix::fs::FileExt;
        let Ok(Some((fd, size))) = self.open_regular(rel) else { return String::new() };
        let n = size.min(max);
        let mut buf = vec![0u8; n as usize];
        let got = std::fs::File::from(fd).read_at(&mut buf, size - n).unwrap_or(0);
        buf.truncate(got);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Directory `rel` and its parents, each created if missing (0700) and none a link: an
    /// entry in the way that is not a directory is replaced.
    pub fn mkdir_all(&self, rel: &Path) -> Result<()> {
        let mut so_far = PathBuf::new();
        for n in parts(rel)? {
            so_far.push(n);
            self.mkdir(&so_far, true)?;
        }
        Ok(())
    }

    /// Owner (when allowed), mode and times of the entry itself. Returns false when the owner
    /// could not be set and `must_own` is false (not root).
    pub fn set_meta(
        &self,
        rel: &Path,
        symlink: bool,
        owner: (u32, u32),
        mode: u32,
        mtime: (i64, u32),
        must_own: bool,
    ) -> Result<bool> {
        let names = parts(rel)?;
        let (dir, name): (Arc<OwnedFd>, Option<&OsStr>) = match names.last() {
            None => (self.root.clone(), None),
            Some(_) => {
                let (d, n) = self.parent(rel)?;
                (d, Some(n))
            }
        };
        let full = self.full(rel);
        let (uid, gid) = (Some(nix::unistd::Uid::from_raw(owner.0)), Some(nix::unistd::Gid::from_raw(owner.1)));
        let owned = match name {
            Some(n) => nix::unistd::fchownat(dir.as_fd(), n, uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW),
            None => nix::unistd::fchown(dir.as_fd(), uid, gid),
        };
        let owned = match owned {
            Ok(()) => true,
            Err(e) if must_own => return Err(err("set owner of", &full, e)),
            Err(_) => false,
        };
        let t = nix::sys::time::TimeSpec::new(mtime.0, mtime.1 as i64);
        if !symlink {
            // A handle on the entry itself (no follow), then fchmod: chmod by name follows links.
            let fd = match name {
                Some(n) => nix::fcntl::openat(
                    dir.as_fd(),
                    n,
                    OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| err("open", &full, e))?,
                None => {
                    nix::fcntl::openat(dir.as_fd(), ".", DIR_FLAGS, Mode::empty()).map_err(|e| err("open", &full, e))?
                }
            };
            nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(mode & 0o7777))
                .map_err(|e| err("set mode of", &full, e))?;
            nix::sys::stat::futimens(&fd, &t, &t).map_err(|e| err("set times of", &full, e))?;
        } else if let Some(n) = name {
            nix::sys::stat::utimensat(dir.as_fd(), n, &t, &t, nix::sys::stat::UtimensatFlags::NoFollowSymlink)
                .map_err(|e| err("set times of", &full, e))?;
        }
        Ok(owned)
    }
}

/// `chown_tree`'s walk below `dir`, deepest first. `depth` bounds the handles held open.
fn walk_chown(dir: &OwnedFd, owner: (Option<nix::unistd::Uid>, Option<nix::unistd::Gid>), depth: usize) -> usize {
    use std::os::unix::ffi::OsStrExt;
    let Ok(dup) = nix::unistd::dup(dir.as_fd()) else { return 1 };
    let Ok(mut d) = nix::dir::Dir::from_fd(dup) else { return 1 };
    let names: Vec<std::ffi::OsString> = d
        .iter()
        .flatten()
        .map(|e| OsStr::from_bytes(e.file_name().to_bytes()).to_os_string())
        .filter(|n| n != "." && n != "..")
        .collect();
    let mut failed = 0;
    for name in names {
        // The entry itself: a link is opened as the link (O_PATH with O_NOFOLLOW).
        let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let Ok(fd) = nix::fcntl::openat(dir.as_fd(), name.as_os_str(), flags, Mode::empty()) else {
            failed += 1;
            continue;
        };
        let Ok(st) = nix::sys::stat::fstat(&fd) else {
            failed += 1;
            continue;
        };
        let kind = st.st_mode & nix::libc::S_IFMT;
        if kind == nix::libc::S_IFDIR {
            // Reopened for reading through the O_PATH handle (".": no name a swap could change).
            match nix::fcntl::openat(fd.as_fd(), ".", DIR_FLAGS, Mode::empty()) {
                Ok(sub) if depth < 64 => failed += walk_chown(&sub, owner, depth + 1),
                _ => failed += 1,
            }
        } else if st.st_nlink > 1 || kind == nix::libc::S_IFCHR || kind == nix::libc::S_IFBLK {
            // Counted, never given: another name of the same inode may be outside the tree
            // (any kind, with fs.protected_hardlinks off), and a device node gives raw access.
            failed += 1;
            continue;
        }
        if nix::unistd::fchownat(fd.as_fd(), "", owner.0, owner.1, AtFlags::AT_EMPTY_PATH).is_err() {
            failed += 1;
        }
    }
    failed
}

/// Whether `f`, opened `O_DIRECT`, takes direct I/O at offsets and addresses aligned to
/// `align` (statx `STATX_DIOALIGN`; a kernel without it, before 6.1, says no).
pub fn dio_aligned(f: &std::fs::File, align: usize) -> bool {
    use nix::libc;
    use std::os::fd::AsRawFd;
    // SAFETY: statx only writes into `st`, a plain struct for which zeroes are valid.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: a valid descriptor, a NUL-terminated empty path with AT_EMPTY_PATH, and `st`.
    let rc = unsafe { libc::statx(f.as_raw_fd(), empty.as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut st) };
    let (mem, off) = (st.stx_dio_mem_align as usize, st.stx_dio_offset_align as usize);
    let fits = |a: usize| a != 0 && align.is_multiple_of(a);
    rc == 0 && st.stx_mask & libc::STATX_DIOALIGN != 0 && fits(mem) && fits(off)
}
