//! The WAL jobs PostgreSQL runs: `wal-push` as archive_command (exit 0 only once the file is
//! stored) and `wal-fetch` as restore_command (exit codes in [`restore_command_exit`]), with a
//! detached prefetcher that fills the spool, one per spool under a file lock.

use crate::crypto::{Identity, Sealer};
use crate::error::{Kind, Result};
use crate::policy::{Policy, Source};
use crate::repository::Repository;
use crate::source::postgres::archive::{self, Pushed};
use crate::source::postgres::wal::{WalKind, WalName};
use std::path::Path;

/// archive_command: store one WAL file, signed with this host's key (from `state_dir`), then
/// queue it for the replicas (`walsend`). Never acknowledged on a replica alone: if the
/// primary cannot store it, the push fails and PostgreSQL keeps the segment and retries. A
/// host whose state directory cannot hold a key pushes unsigned, with a warning: archiving
/// never stops over it, and a policy that pins writers then refuses that WAL at restore.
pub async fn push(policy: &Policy, path: &Path, state_dir: &Path) -> Result<Pushed> {
    // Validate the name before touching the repository.
    archive::name_of_path(path)?;
    // Stored ahead by `wal-ahead`, and the very file: acknowledged without a second push.
    if super::walahead::take(state_dir, policy, path) {
        tracing::debug!("{} was stored ahead: acknowledged", path.display());
        super::walahead::spawn(policy, state_dir, path);
        super::waltail::spawn(policy, state_dir, path);
        return Ok(Pushed::AlreadyStored);
    }
    let t0 = std::time::Instant::now();
    let writer = writer(policy, state_dir).await?;
    let opened = t0.elapsed();
    // What wal-tail compressed of this segment while PostgreSQL wrote it (checked chunk by chunk).
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let ahead = super::waltail::ahead_file(state_dir, &policy.name, &name);
    let (pushed, key) = archive::push(&writer, path, data_dir(policy).as_deref(), Some(&ahead)).await?;
    let _ = std::fs::remove_file(&ahead);
    tracing::debug!("{name}: repository opened in {:?}, stored {:?} later", opened, t0.elapsed() - opened);
    // Stored on the primary: PostgreSQL may now be told. The replicas get it from the spool,
    // after the acknowledgement's work is done and never in its way.
    if !policy.replicas.is_empty() {
        super::walsend::enqueue(state_dir, policy, &key);
        super::walsend::spawn_sender(policy, state_dir);
    }
    super::walahead::spawn(policy, state_dir, path);
    super::waltail::spawn(policy, state_dir, path);
    Ok(pushed)
}

pub(super) fn data_dir(policy: &Policy) -> Option<std::path::PathBuf> {
    match &policy.source {
        Source::Postgres(pg) => pg.data_dir.clone(),
        Source::Volume(_) => None,
    }
}

/// The WAL writer of a policy: its repository (created if need be), sealed to its recipients,
/// signed with the host key when there is one.
pub(super) async fn writer(policy: &Policy, state_dir: &Path) -> Result<crate::repository::Writer> {
    let (repo, _) = Repository::open_or_init(policy).await?;
    let mut writer = repo.writer(Sealer::new(&policy.encryption.recipients));
    match crate::crypto::signing::host_key(state_dir) {
        Ok(key) => writer = writer.signing(key),
        Err(e) => tracing::warn!("WAL is pushed unsigned: {}", e.message),
    }
    Ok(writer)
}

/// What restore_command asked for.
pub struct FetchRequest<'a> {
    pub segment: &'a str,
    pub dest: &'a Path,
    pub identity: Option<&'a Path>,
    pub spool: Option<&'a Path>,
    pub prefetch: usize,
    /// The system identifier of the cluster being recovered (restore writes it).
    pub cluster: Option<u64>,
}

/// restore_command: `Ok(true)` when the file was written to `dest`, `Ok(false)` when the
/// repository does not have it. Starts a prefetcher of the following segments.
pub async fn fetch(policy: &Policy, req: &FetchRequest<'_>) -> Result<bool> {
    let name = archive::parse_requested(req.segment)?;
    let identity = Identity::require(req.identity, &policy.encryption, &policy.name)?;
    let repo = Repository::open(policy).await?.unlock(identity).trusting(&policy.trust.writers);
    let Some(cluster) = archive::resolve_cluster(&repo, req.cluster).await? else { return Ok(false) };
    let found = archive::fetch_with_spool(&repo, cluster, &name, req.dest, req.spool).await?;
    if found && name.kind() == WalKind::Segment && req.prefetch > 0 {
        if let (Some(spool), Some(id)) = (req.spool, req.identity) {
            spawn_prefetch(policy, cluster, &name, spool, id, req.prefetch);
        }
    }
    Ok(found)
}

/// The exit code PostgreSQL needs from restore_command: 0 found, 1 not in the repository,
/// 2 a name or command line that cannot be right (no such file can exist), 255 anything else
/// (PostgreSQL stops rather than ending recovery early on a failure that may pass).
pub fn restore_command_exit(r: &Result<bool>) -> i32 {
    match r {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) if e.kind == Kind::Usage => 2,
        Err(_) => 255,
    }
}

/// An exclusive `flock` of `path` (created if need be), or `None` when another process holds
/// it: one prefetcher per spool, one WAL sender per replica spool.
pub(super) fn try_lock(path: &Path) -> Option<nix::fcntl::Flock<std::fs::File>> {
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path).ok()?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).ok()
}

fn prefetch_lock(spool: &Path) -> Option<nix::fcntl::Flock<std::fs::File>> {
    try_lock(&spool.join(".prefetch"))
}

/// Start `veza-dr ARGS…` detached: its own process group, no terminal, nothing to wait for.
pub(super) fn spawn_detached(args: &[&std::ffi::OsStr]) {
    let Ok(exe) = std::env::current_exe() else { return };
    use std::os::unix::process::CommandExt;
    let _ = std::process::Command::new(exe)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn();
}

/// The hidden `wal-prefetch`: fill the spool with the `count` segments after `after`, unless
/// another prefetcher is at work on this spool.
pub async fn prefetch(
    policy: &Policy,
    cluster: u64,
    after: &str,
    spool: &Path,
    identity: &Path,
    count: usize,
) -> Result<()> {
    let Some(_lock) = prefetch_lock(spool) else { return Ok(()) };
    let name = archive::parse_requested(after)?;
    let repo = Repository::open(policy).await?.unlock(Identity::from_file(identity)?).trusting(&policy.trust.writers);
    archive::prefetch(&repo, cluster, &name, count, spool, 16 << 20).await
}

/// Start a detached prefetcher unless one is already running for this spool.
fn spawn_prefetch(p: &Policy, cluster: u64, after: &WalName, spool: &Path, identity: &Path, count: usize) {
    use std::ffi::OsStr;
    if prefetch_lock(spool).is_none() {
        return;
    }
    let (cluster, count) = (cluster.to_string(), count.to_string());
    let mut args: Vec<&OsStr> = Vec::new();
    if let Some(r) = &p.via {
        args.extend([OsStr::new("--repository"), OsStr::new(r)]);
    }
    args.extend([
        OsStr::new("wal-prefetch"),
        p.path.as_os_str(),
        OsStr::new(after.as_str()),
        OsStr::new("--spool"),
        spool.as_os_str(),
        OsStr::new("--identity"),
        identity.as_os_str(),
        OsStr::new("--cluster"),
        OsStr::new(&cluster),
        OsStr::new("--count"),
        OsStr::new(&count),
    ]);
    spawn_detached(&args);
}
