//! Data safety (issue 11): each test shows a way to lose or silently corrupt data that the
//! code used to allow. Real servers, the real binary.

use crate::common::pg::{psql, switch_and_wait_archived, Pg, Restored};
use crate::common::*;
use std::path::PathBuf;

fn repo_state_dir(fx: &Fixture) -> PathBuf {
    let repos = fx.path("state/repos");
    std::fs::read_dir(&repos).unwrap().flatten().next().expect("a repository state").path()
}

/// Losing `chunk-key` used to make the next incremental reuse ids made under the old key while
/// naming the new one: restore then called every unchanged file damaged.
#[test]
fn a_lost_chunk_key_never_corrupts_the_next_incremental() {
    let backend = Backend::start(Kind::File);
    let fx = Fixture::new(&backend);
    let src = fx.path("src");
    tree::generate(&src, 3, 11);
    fx.volume_policy("vol", &backend, "vol", &src, "");
    fx.ok(&["backup", "vol"]);
    let state = repo_state_dir(&fx);
    std::fs::remove_file(state.join("chunk-key")).unwrap();
    let changed = std::fs::read_dir(&src).unwrap().flatten().find(|e| e.path().is_file()).unwrap().path();
    std::fs::write(&changed, b"changed after the key was lost\n").unwrap();
    fx.ok(&["backup", "vol", "--incremental"]);
    let target = fx.path("restored");
    fx.ok(&["restore", "vol", "--target", target.to_str().unwrap(), "--identity", fx.identity.to_str().unwrap()]);
    tree::assert_same(&src, &target);
    fx.ok(&["verify", "vol", "--read-data", "--identity", fx.identity.to_str().unwrap()]);
}

/// Two first backups of two policies sharing one repository and one state directory, at once:
/// one chunk-id key, and every snapshot restores.
#[test]
fn concurrent_first_backups_share_one_key_and_both_restore() {
    let backend = Backend::start(Kind::Moto);
    let fx = Fixture::new(&backend);
    let (a, b) = (fx.path("a"), fx.path("b"));
    tree::generate(&a, 8, 21);
    tree::generate(&b, 8, 22);
    fx.volume_policy("a", &backend, "shared", &a, "");
    fx.volume_policy("b", &backend, "shared", &b, "");
    for _ in 0..2 {
        let ca = fx.cmd(&["--lock-wait", "60s", "backup", "a"]).spawn().unwrap();
        let cb = fx.cmd(&["--lock-wait", "60s", "backup", "b"]).spawn().unwrap();
        for mut c in [ca, cb] {
            assert!(c.wait().unwrap().success());
        }
    }
    let state = repo_state_dir(&fx);
    let keys: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("chunk"))
        .collect();
    assert!(keys.iter().any(|e| e.file_name() == "chunk-key"));
    for (p, src) in [("a", &a), ("b", &b)] {
        let t = fx.path(&format!("r-{p}"));
        fx.ok(&["restore", p, "--target", t.to_str().unwrap(), "--identity", fx.identity.to_str().unwrap()]);
        tree::assert_same(src, &t);
    }
    fx.ok(&["verify", "a", "--read-data", "--identity", fx.identity.to_str().unwrap()]);
}

/// A flipped byte in the chunk cache used to send the next snapshot to a wrong offset.
#[test]
fn a_damaged_chunk_cache_is_detected_and_rebuilt() {
    let backend = Backend::start(Kind::File);
    let fx = Fixture::new(&backend);
    let src = fx.path("src");
    tree::generate(&src, 3, 12);
    fx.volume_policy("vol", &backend, "vol", &src, "");
    fx.ok(&["backup", "vol"]);
    let state = repo_state_dir(&fx);
    let cache = std::fs::read_dir(&state)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("chunks"))
        .expect("a chunk cache");
    let mut b = std::fs::read(&cache).unwrap();
    // An offset field of a record in the middle.
    let at = b.len() / 2;
    b[at] ^= 0x40;
    std::fs::write(&cache, &b).unwrap();
    tree::generate(&src.join("more"), 1, 13);
    fx.ok(&["backup", "vol", "--full"]);
    let target = fx.path("restored");
    fx.ok(&["restore", "vol", "--target", target.to_str().unwrap(), "--identity", fx.identity.to_str().unwrap()]);
    tree::assert_same(&src, &target);
}

/// Two policies of one cluster in one repository (a renamed policy, or an hourly and a monthly
/// one): prune under one name used to delete the WAL the other's snapshots need.
#[test]
fn wal_retention_counts_every_policy_of_the_cluster() {
    let (backend, fx, pg) = archiving_cluster(Kind::Moto);
    let dsn = pg.dsn();
    fx.pg_policy("db", &backend, "db", "physical", &pg.data, "");
    fx.pg_policy("monthly", &backend, "db", "physical", &pg.data, "[retention]\nkeep-last = 1\nprune-grace = \"0s\"\n");
    psql(&dsn, "CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 5000) g");
    let old = fx.json(&["backup", "db", "--full"]);
    psql(&dsn, "INSERT INTO t SELECT g FROM generate_series(5001, 6000) g");
    for _ in 0..3 {
        psql(&dsn, "SELECT pg_switch_wal()");
    }
    fx.json(&["backup", "monthly", "--full"]);
    fx.json(&["backup", "monthly", "--full"]);
    switch_and_wait_archived(&dsn);
    fx.json(&["prune", "monthly"]);
    let p2 = fx.json(&["prune", "monthly"]);
    // Only WAL older than the oldest live backup of the cluster (policy db's) may go.
    let keep_from = old["postgres"]["start-wal"].as_str().unwrap()[8..24].to_string();
    let deleted: Vec<&str> = p2["deleted"].as_array().unwrap().iter().filter_map(|k| k.as_str()).collect();
    assert!(
        deleted.iter().filter(|k| k.starts_with("wal/")).all(|k| k.split('/').nth(3).unwrap()[8..24] < *keep_from),
        "WAL that policy db's snapshot needs was deleted: {p2}"
    );
    // The old policy's snapshot still recovers to consistency.
    let port = free_port();
    let r = fx.path("r");
    let id = old["id"].as_str().unwrap();
    fx.ok(&[
        "restore",
        "db",
        "--snapshot",
        id,
        "--immediate",
        "--target",
        r.to_str().unwrap(),
        "--start",
        "--port",
        &port.to_string(),
        "--identity",
        fx.identity.to_str().unwrap(),
    ]);
    let srv = Restored { data: r, port };
    assert_eq!(psql(&srv.dsn(), "SELECT count(*) FROM t"), "5000");
}

/// Another cluster's segment used to satisfy "archived up to the stop LSN": a second cluster
/// pointed at the same repository is refused at its first wal-push and its first backup,
/// naming both system identifiers.
#[test]
fn a_second_cluster_in_one_repository_is_refused_naming_both() {
    let (backend, fx, pg) = archiving_cluster(Kind::Moto);
    fx.pg_policy("db", &backend, "db", "physical", &pg.data, "");
    fx.ok(&["backup", "db"]);
    let mut env = fx.env.clone();
    let other = Pg::start("true", env.clone());
    env.retain(|(k, _)| k != "VEZA_PG_DSN");
    let text = std::fs::read_to_string(fx.path("policies/db.toml"))
        .unwrap()
        .replace(&format!("data-dir = \"{}\"", pg.data.display()), &format!("data-dir = \"{}\"", other.data.display()));
    std::fs::write(fx.path("policies/other.toml"), text).unwrap();
    let sysid = |p: &Pg| psql(&p.dsn(), "SELECT system_identifier::text FROM pg_control_system()");
    let (mine, theirs) = (sysid(&pg), sysid(&other));
    let segment = other.data.join("pg_wal/000000010000000000000001");
    let o = fx.run(&["wal-push", "other", segment.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains(&mine) && e.contains(&theirs), "{e}");
    let mut c = fx.cmd(&["backup", "other"]);
    c.env("VEZA_PG_DSN", other.dsn());
    let o = c.output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains(&mine) && e.contains(&theirs), "{e}");
}

/// A broken archive_command used to keep a backup waiting 300 s; it now fails within seconds,
/// naming the segment and when archiving last failed.
#[test]
fn a_failing_archive_command_fails_the_backup_within_seconds() {
    let backend = Backend::start(Kind::Moto);
    let mut fx = Fixture::new(&backend);
    let pg = Pg::start("false", fx.env.clone());
    fx.env.push(("VEZA_PG_DSN".into(), pg.dsn()));
    fx.pg_policy("db", &backend, "db", "physical", &pg.data, "");
    let t = std::time::Instant::now();
    let o = fx.run(&["backup", "db"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(t.elapsed() < std::time::Duration::from_secs(60), "took {:?}", t.elapsed());
    let e = stderr(&o);
    assert!(e.contains("WAL archiving is failing: segment 0000000100000000000000") && e.contains("(last at 20"), "{e}");
    assert!(e.contains("the snapshot is not committed"), "{e}");
    assert!(fx.json(&["snapshots", "db"]).as_array().unwrap().is_empty());
}

/// A prefetched segment cut short (a crash, a full disk) used to be served as it was, which can
/// end recovery early; it is checked against its fingerprint and fetched again.
#[test]
fn a_damaged_prefetched_segment_is_never_served() {
    let (backend, fx, pg) = archiving_cluster(Kind::Moto);
    fx.pg_policy("db", &backend, "db", "physical", &pg.data, "");
    let dsn = pg.dsn();
    psql(&dsn, "CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g");
    switch_and_wait_archived(&dsn);
    let name = "000000010000000000000001";
    let good = fx.path("good");
    let id = fx.identity.to_str().unwrap();
    fx.ok(&["wal-fetch", "db", name, good.to_str().unwrap(), "--identity", id, "--prefetch", "0"]);
    let bytes = std::fs::read(&good).unwrap();
    let (rt, store, _d) = fx.raw_store(&backend, "db", "db");
    let key = rt
        .block_on(store.list("wal/"))
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .find(|k| k.contains(&format!("/{name}/")))
        .unwrap();
    let fp = key.rsplit('/').next().unwrap().to_string();
    let spool = fx.path("spool");
    std::fs::create_dir_all(&spool).unwrap();
    // Half a segment under both the old spool name and the new one.
    std::fs::write(spool.join(name), &bytes[..bytes.len() / 2]).unwrap();
    std::fs::write(spool.join(format!("{name}.{fp}")), &bytes[..bytes.len() / 2]).unwrap();
    let dest = fx.path("dest");
    fx.ok(&[
        "wal-fetch",
        "db",
        name,
        dest.to_str().unwrap(),
        "--identity",
        id,
        "--spool",
        spool.to_str().unwrap(),
        "--prefetch",
        "0",
    ]);
    assert!(std::fs::read(&dest).unwrap() == bytes, "a damaged spooled segment was served");
}

/// `standby.signal` in the source used to be copied: a backup taken from a standby restored as
/// a standby that never ends recovery.
#[test]
fn standby_and_recovery_signals_are_not_backed_up() {
    let (backend, fx, pg) = archiving_cluster(Kind::Moto);
    fx.pg_policy("db", &backend, "db", "physical", &pg.data, "");
    for f in ["standby.signal", "recovery.signal"] {
        std::fs::write(pg.data.join(f), b"").unwrap();
    }
    fx.ok(&["backup", "db"]);
    for f in ["standby.signal", "recovery.signal"] {
        std::fs::remove_file(pg.data.join(f)).unwrap();
    }
    let r = fx.path("r");
    fx.ok(&["restore", "db", "--target", r.to_str().unwrap(), "--identity", fx.identity.to_str().unwrap()]);
    assert!(!r.join("standby.signal").exists(), "standby.signal was restored");
}

/// A WAL segment file as archive_command sees it: a long page header naming `sysid`.
fn fake_segment(path: &std::path::Path, sysid: u64) {
    let mut b = vec![0u8; 16 << 10];
    b[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
    b[2..4].copy_from_slice(&0x0002u16.to_le_bytes());
    b[24..32].copy_from_slice(&sysid.to_le_bytes());
    for (i, x) in b.iter_mut().enumerate().skip(64) {
        *x = (i % 251) as u8;
    }
    std::fs::write(path, b).unwrap();
}

/// On file://, object_store wrote and renamed without fsync: wal-push could exit 0 for a
/// segment a power cut then erased. Traced: the object's data, the rename and every directory
/// up to the repository root are synced before exit.
#[test]
fn file_repositories_sync_data_and_directories_before_acknowledging() {
    let backend = Backend::start(Kind::File);
    let fx = Fixture::new(&backend);
    let src = fx.path("src");
    std::fs::create_dir_all(&src).unwrap();
    fx.volume_policy("vol", &backend, "vol", &src, "");
    fx.ok(&["init", "vol"]);
    let seg = fx.path("000000010000000000000007");
    fake_segment(&seg, 7446051981417284374);
    let (o, t) = traced(
        &fx,
        "fsync,fdatasync,rename,renameat,renameat2,linkat",
        &["wal-push".as_ref(), "vol".as_ref(), seg.as_os_str()],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let repo = backend.dir.path().join("vol").canonicalize().unwrap();
    let dir = repo.join("wal/7446051981417284374/00000001/000000010000000000000007");
    let lines: Vec<&str> = t.lines().collect();
    let pos = |pred: &dyn Fn(&str) -> bool| lines.iter().position(|l| pred(l));
    let staged = format!("{}/.tmp/", repo.display());
    let synced_data = pos(&|l| l.contains("fsync(") && l.contains(&staged) && l.contains(".part>"));
    let renamed = pos(&|l| l.contains("rename") && l.contains(&dir.display().to_string()));
    let synced_dir = pos(&|l| l.contains("fsync(") && l.contains(&format!("<{}>", dir.display())));
    let synced_root = pos(&|l| l.contains("fsync(") && l.contains(&format!("<{}>", repo.display())));
    assert!(synced_data.is_some() && renamed.is_some(), "data not synced before the rename:\n{t}");
    assert!(
        synced_data < renamed && renamed < synced_dir && synced_dir.is_some(),
        "directory not synced after the rename:\n{t}"
    );
    assert!(synced_root.is_some(), "the repository root (new directories) was not synced:\n{t}");
}

/// veza-dr `args` under strace, following threads, with paths shown for descriptors.
fn traced(fx: &Fixture, calls: &str, args: &[&std::ffi::OsStr]) -> (std::process::Output, String) {
    let trace = fx.path("trace");
    let mut c = std::process::Command::new("strace");
    c.args(["-f", "-y", "-qq", "-e", &format!("trace={calls}"), "-o"])
        .arg(&trace)
        .arg(bin())
        .arg("--policies")
        .arg(fx.path("policies"))
        .arg("--state-dir")
        .arg(fx.path("state"))
        .args(args);
    c.env_remove("VEZA_DR_IDENTITY");
    for (k, v) in &fx.env {
        c.env(k, v);
    }
    let o = c.output().unwrap();
    (o, std::fs::read_to_string(&trace).unwrap_or_default())
}

/// `restore POLICY --target TARGET` with the fixture's identity, under strace.
fn traced_restore(fx: &Fixture, policy: &str, target: &std::path::Path, calls: &str) -> (std::process::Output, String) {
    let args = [
        "restore".as_ref(),
        policy.as_ref(),
        "--target".as_ref(),
        target.as_os_str(),
        "--identity".as_ref(),
        fx.identity.as_os_str(),
    ];
    traced(fx, calls, &args)
}

/// strace -f's lines with each call whole: a call another thread interrupted is printed as
/// `PID call(args <unfinished ...>` and later `PID <... call resumed>rest`; these are joined.
fn joined(t: &str) -> Vec<String> {
    let mut pending: std::collections::HashMap<&str, (usize, String)> = Default::default();
    let mut out: Vec<String> = Vec::new();
    for l in t.lines() {
        let pid = l.split_whitespace().next().unwrap_or("");
        if let Some(head) = l.strip_suffix(" <unfinished ...>") {
            pending.insert(pid, (out.len(), head.to_string()));
            out.push(String::new());
        } else if let Some((_, rest)) = l.split_once(" resumed>") {
            match pending.remove(pid) {
                Some((at, head)) => out[at] = format!("{head}{rest}"),
                None => out.push(l.to_string()),
            }
        } else {
            out.push(l.to_string());
        }
    }
    out
}

/// The target was synced (a successful syncfs on it) after the last write into it, through
/// the restore's own handle of the target. The flush-behind thread also `syncfs`es the target,
/// through a handle it opens as `.` from the root: its syncs are told apart by descriptor
/// (the trace needs `openat` and `close`), so only the final one can satisfy this.
fn synced_after_last_write(t: &str, target: &std::path::Path) {
    let target = target.canonicalize().unwrap().display().to_string();
    let lines = joined(t);
    let under = format!("{target}/");
    let handle = format!("<{target}>");
    // The descriptor a line's call returned (`= 7</path>`), or the first argument's (`(7</path>`).
    let ret_fd = |l: &str| l.rsplit_once(") = ").and_then(|(_, r)| r.split('<').next()?.trim().parse::<i32>().ok());
    let arg_fd = |l: &str| l.split_once('(').and_then(|(_, r)| r.split('<').next()?.parse::<i32>().ok());
    let mut flusher_fds = std::collections::HashSet::new();
    let (mut last_write, mut synced, mut flusher_seen) = (None, None, false);
    for (i, l) in lines.iter().enumerate() {
        if l.contains("openat(") && l.contains(&format!("{handle}, \".\"")) {
            if let Some(fd) = ret_fd(l) {
                flusher_fds.insert(fd);
                flusher_seen = true;
            }
        } else if l.contains("openat(") {
            if let Some(fd) = ret_fd(l) {
                flusher_fds.remove(&fd);
            }
        } else if l.contains("close(") {
            if let Some(fd) = arg_fd(l) {
                flusher_fds.remove(&fd);
            }
        } else if (l.contains("pwrite64(") || l.contains("write(")) && l.contains(&under) {
            last_write = Some(i);
        } else if l.contains("syncfs(")
            && l.contains(&handle)
            && l.ends_with("= 0")
            && arg_fd(l).is_some_and(|fd| !flusher_fds.contains(&fd))
        {
            synced = Some(i);
        }
    }
    assert!(flusher_seen, "the flush-behind thread's handle was not traced (is openat traced?):\n{t}");
    assert!(last_write.is_some(), "no write into the target traced:\n{t}");
    assert!(synced.is_some() && synced > last_write, "the target was not synced after the last write:\n{t}");
}

/// A restore that said done left its files dirty in the page cache: a power cut then lost
/// them, and PostgreSQL, started on the copy, paid for the flush. Now the target is synced
/// (syncfs) after the last write and before the restore reports success.
#[test]
fn a_restore_syncs_its_target_before_it_reports_done() {
    let backend = Backend::start(Kind::File);
    let fx = Fixture::new(&backend);
    let src = fx.path("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    std::fs::write(src.join("d/big"), vec![7u8; 3 << 20]).unwrap();
    std::fs::write(src.join("small"), b"small").unwrap();
    fx.volume_policy("vol", &backend, "vol", &src, "");
    fx.ok(&["backup", "vol"]);
    let target = fx.path("restored");
    let (o, t) = traced_restore(&fx, "vol", &target, "pwrite64,syncfs,openat,close");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(target.join("d/big")).unwrap(), vec![7u8; 3 << 20]);
    synced_after_last_write(&t, &target);
    // The large file went past the page cache (pipeline/sink.rs), the small one through it.
    let opened = |name: &str| {
        t.lines()
            .filter(|l| l.contains("openat(") && l.contains(&format!("\"{name}\"")))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert!(opened("big").iter().any(|l| l.contains("O_DIRECT")), "d/big was not written direct:\n{t}");
    assert!(opened("small").iter().all(|l| !l.contains("O_DIRECT")), "small was written direct:\n{t}");
}

/// A physical restore writes backup_label, recovery.signal and the recovery settings after
/// the tree: those are synced too before it reports done (without --start, nothing else would).
#[test]
fn a_physical_restore_syncs_its_recovery_files_before_it_reports_done() {
    let (backend, fx, pg) = archiving_cluster(Kind::Moto);
    fx.pg_policy("db", &backend, "db", "physical", &pg.data, "");
    psql(&pg.dsn(), "CREATE TABLE t AS SELECT generate_series(1, 1000) AS i");
    fx.ok(&["backup", "db"]);
    let target = fx.path("restored");
    let (o, t) = traced_restore(&fx, "db", &target, "write,pwrite64,syncfs,openat,close");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(target.join("recovery.signal").exists() && target.join("backup_label").exists());
    assert!(
        t.contains("recovery.signal") || t.contains("postgresql.auto.conf"),
        "the recovery files' writes were not traced:\n{t}"
    );
    synced_after_last_write(&t, &target);
}

/// A physical backup that could not read a file used to commit anyway, complete and exit 0.
/// Run as the cluster's owner, a root-only file in PGDATA fails it, naming the file.
#[test]
fn an_unreadable_file_in_pgdata_fails_the_backup_naming_it() {
    let (backend, fx, pg) = archiving_cluster(Kind::Moto);
    fx.pg_policy("db", &backend, "db", "physical", &pg.data, "");
    let secret = pg.data.join("root-only.conf");
    std::fs::write(&secret, b"x").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let state = fx.path("pgstate");
    std::fs::create_dir_all(&state).unwrap();
    std::process::Command::new("chown").args(["-R", "postgres"]).arg(&state).status().unwrap();
    crate::common::pg::open_up(&state);
    let mut c = std::process::Command::new("runuser");
    c.args(["-u", "postgres", "--", "env"]);
    for (k, v) in &fx.env {
        c.arg(format!("{k}={v}"));
    }
    c.arg(bin()).arg("--policies").arg(fx.path("policies")).arg("--state-dir").arg(&state).args(["backup", "db"]);
    let o = c.output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains(&format!("cannot read {}", secret.display())), "{}", stderr(&o));
    assert!(fx.json(&["snapshots", "db"]).as_array().unwrap().is_empty(), "a snapshot without the file was committed");
    std::fs::remove_file(&secret).unwrap();
}

/// pg_dump writing more than a pipe buffer to stderr used to deadlock the backup.
#[test]
fn a_chatty_pg_dump_does_not_deadlock() {
    let backend = Backend::start(Kind::Moto);
    let mut fx = Fixture::new(&backend);
    let pg = Pg::start("", fx.env.clone());
    fx.env.push(("VEZA_PG_DSN".into(), pg.dsn()));
    psql(&pg.dsn(), "CREATE TABLE t AS SELECT g FROM generate_series(1, 100) g");
    let bin_dir = fx.path("pgbin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let real = crate::common::pg::BIN;
    std::fs::write(
        bin_dir.join("pg_dump"),
        format!("#!/bin/sh\nhead -c 1048576 /dev/zero | tr '\\000' w >&2\nexec {real}/pg_dump \"$@\"\n"),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bin_dir.join("pg_dump"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink(format!("{real}/pg_dumpall"), bin_dir.join("pg_dumpall")).unwrap();
    fx.pg_policy("lg", &backend, "lg", "logical", &pg.data, "");
    let p = fx.path("policies/lg.toml");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("method = \"logical\"", &format!("method = \"logical\"\nbin-dir = \"{}\"", bin_dir.display()));
    std::fs::write(&p, text).unwrap();
    let mut child = fx.cmd(&["backup", "lg"]).stdout(std::process::Stdio::null()).spawn().unwrap();
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > std::time::Duration::from_secs(120) {
            let _ = child.kill();
            panic!("the logical backup deadlocked on pg_dump's stderr");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(status.success());
}

/// The leases of the repository as the bucket holds them: (key, body).
fn leases(rt: &tokio::runtime::Runtime, store: &veza_dr::repository::Store) -> Vec<(String, String)> {
    let keys: Vec<String> = rt.block_on(store.list("locks/")).unwrap().into_iter().map(|(k, _)| k).collect();
    keys.into_iter()
        .filter_map(|k| rt.block_on(store.get_opt(&k)).unwrap().map(|b| (k, String::from_utf8_lossy(&b).into_owned())))
        .collect()
}

/// A lease removed under a running backup (a prune that judged it stale) used to go
/// unnoticed: the backup re-created it and committed. The commit now lists again and refuses.
#[test]
fn a_backup_whose_lease_was_removed_does_not_commit() {
    let backend = Backend::start(Kind::Moto);
    let fx = Fixture::new(&backend);
    let src = fx.path("src");
    tree::generate(&src, 48, 31);
    fx.volume_policy("vol", &backend, "vol", &src, "");
    fx.ok(&["init", "vol"]);
    let (rt, store, _d) = fx.raw_store(&backend, "vol", "vol");
    let child = fx.cmd(&["backup", "vol"]).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let t = std::time::Instant::now();
    loop {
        if let Some((k, _)) = leases(&rt, &store).into_iter().find(|(_, b)| b.contains("backup vol")) {
            rt.block_on(store.delete(&k)).unwrap();
            break;
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(30), "the backup never took a lease");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("lost the repository lock"), "{}", stderr(&o));
    assert!(fx.json(&["snapshots", "vol"]).as_array().unwrap().is_empty(), "it committed without its lease");
}

/// Lease expiry used to compare the clocks of different hosts: a lease written by a host whose
/// clock is an hour behind looked expired and was removed. The store's clock decides now.
#[test]
fn a_lease_from_a_host_with_a_slow_clock_is_respected() {
    let backend = Backend::start(Kind::Moto);
    let fx = Fixture::new(&backend);
    let src = fx.path("src");
    tree::generate(&src, 1, 32);
    fx.volume_policy("vol", &backend, "vol", &src, "");
    fx.ok(&["backup", "vol"]);
    let (rt, store, _d) = fx.raw_store(&backend, "vol", "vol");
    let hour_ago = chrono::Utc::now() - chrono::Duration::hours(1);
    let lease = serde_json::json!({
        "kind": "shared", "host": "db-host-with-slow-clock", "pid": 4242, "command": "backup other",
        "created": hour_ago - chrono::Duration::minutes(1), "expires": hour_ago + chrono::Duration::minutes(4),
        "ttl-seconds": 300
    });
    rt.block_on(store.put("locks/slowclock.json", bytes::Bytes::from(lease.to_string()))).unwrap();
    let o = fx.run(&["prune", "vol"]);
    assert_eq!(o.status.code(), Some(1), "prune ignored a live lease: {}", stdout(&o));
    assert!(stderr(&o).contains("locked by `backup other` on db-host-with-slow-clock"), "{}", stderr(&o));
    assert!(rt.block_on(store.get_opt("locks/slowclock.json")).unwrap().is_some(), "the live lease was removed");
}

/// verify took no lease: a prune running meanwhile pulled objects away and verify reported
/// them as damage. Readers hold a shared lease, which prune waits for.
#[test]
fn readers_hold_a_shared_lease() {
    let backend = Backend::start(Kind::Moto);
    let fx = Fixture::new(&backend);
    let src = fx.path("src");
    tree::generate(&src, 48, 33);
    fx.volume_policy("vol", &backend, "vol", &src, "");
    fx.ok(&["backup", "vol"]);
    let (rt, store, _d) = fx.raw_store(&backend, "vol", "vol");
    let id = fx.identity.to_str().unwrap().to_string();
    for (what, args) in [
        ("verify vol", vec!["verify", "vol", "--read-data", "--identity", &id]),
        ("restore vol", vec!["restore", "vol", "--target", "RESTORE", "--identity", &id]),
    ] {
        let target = fx.path(&format!("r-{}", what.len()));
        let args: Vec<String> =
            args.iter().map(|a| if *a == "RESTORE" { target.display().to_string() } else { a.to_string() }).collect();
        let mut child = fx.cmd(&args).stdout(std::process::Stdio::null()).spawn().unwrap();
        let t = std::time::Instant::now();
        let mut seen = false;
        while child.try_wait().unwrap().is_none() {
            if leases(&rt, &store).iter().any(|(_, b)| b.contains(what) && b.contains("\"shared\"")) {
                seen = true;
                let o = fx.run(&["prune", "vol"]);
                assert_eq!(o.status.code(), Some(1), "prune ran under {what}");
                assert!(stderr(&o).contains(&format!("locked by `{what}`")), "{}", stderr(&o));
                break;
            }
            assert!(t.elapsed() < std::time::Duration::from_secs(60));
        }
        assert!(child.wait().unwrap().success());
        assert!(seen, "{what} took no shared lease");
    }
}

/// A backup that ran longer than the prune grace may reuse a pack prune has deleted since:
/// it is refused at commit.
#[test]
fn a_backup_older_than_the_prune_grace_does_not_commit() {
    let backend = Backend::start(Kind::Moto);
    let mut fx = Fixture::new(&backend);
    fx.env.retain(|(k, _)| k != "VEZA_DR_MIN_PRUNE_GRACE");
    fx.env.push(("VEZA_DR_MIN_PRUNE_GRACE".into(), "1s".into()));
    let src = fx.path("src");
    std::fs::create_dir_all(&src).unwrap();
    let mut big = vec![0u8; 400 << 20];
    tree::Rng::new(34).fill(&mut big);
    std::fs::write(src.join("big.bin"), &big).unwrap();
    drop(big);
    fx.volume_policy("vol", &backend, "vol", &src, "[retention]\nprune-grace = \"1s\"\n");
    let o = fx.run(&["backup", "vol"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("longer than the prune grace of 1s: it is not committed"), "{}", stderr(&o));
    assert!(fx.json(&["snapshots", "vol"]).as_array().unwrap().is_empty());
}

/// verify looks at WAL: each physical snapshot's own range, and the archive's continuity from
/// the oldest retained backup (found / missing / still uploading), with the daemon's metric.
#[test]
fn verify_finds_wal_gaps_and_the_daemon_exports_them() {
    let (backend, mut fx, pg) = archiving_cluster(Kind::Moto);
    fx.pg_policy("db", &backend, "db", "physical", &pg.data, "");
    let dsn = pg.dsn();
    psql(&dsn, "CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g");
    let snap = fx.json(&["backup", "db"]);
    for _ in 0..3 {
        psql(&dsn, "INSERT INTO t SELECT g FROM generate_series(1, 1000) g");
        psql(&dsn, "SELECT pg_switch_wal()");
    }
    switch_and_wait_archived(&dsn);
    let v = fx.json(&["verify", "db"]);
    assert!(v["damage"].as_array().unwrap().is_empty(), "{v}");
    let wal = &v["wal"][0];
    assert!(wal["found"].as_u64().unwrap() >= 4 && wal["gaps"].as_array().unwrap().is_empty(), "{v}");
    assert_eq!(wal["from"], snap["postgres"]["start-wal"]);

    // Delete a segment after the backup: a gap (still uploading while the rest is fresh).
    let stop = snap["postgres"]["stop-wal"].as_str().unwrap().to_string();
    let (rt, store, _d) = fx.raw_store(&backend, "db", "db");
    let keys: Vec<String> = rt.block_on(store.list("wal/")).unwrap().into_iter().map(|(k, _)| k).collect();
    let seg = |k: &str| k.split('/').nth(3).unwrap_or("").to_string();
    let after = keys.iter().filter(|k| seg(k).len() == 24 && seg(k) > stop).min_by_key(|k| seg(k)).unwrap().clone();
    rt.block_on(store.delete(&after)).unwrap();
    let v = fx.json(&["verify", "db"]);
    assert_eq!(v["wal"][0]["gaps"][0]["status"], "uploading", "{v}");
    fx.env.push(("VEZA_DR_WAL_UPLOADING".into(), "0s".into()));
    let o = fx.run(&["verify", "db"]);
    assert_eq!(o.status.code(), Some(3), "{}", stdout(&o));
    let out = stdout(&o);
    assert!(out.contains(&format!("1 segment(s) missing from {} to {}", seg(&after), seg(&after))), "{out}");
    assert!(out.contains("1 missing, 0 still uploading"), "{out}");

    // The daemon exports the gap.
    let port = free_port();
    let mut daemon = fx.cmd(&["daemon", "--listen", &format!("127.0.0.1:{port}")]).spawn().unwrap();
    let t = std::time::Instant::now();
    let gap = loop {
        let (_, m) = http_full(port, "GET", "/metrics");
        if let Some(v) = m.lines().find_map(|l| l.strip_prefix("veza_dr_wal_gap_segments{policy=\"db\"} ")) {
            break v.trim().parse::<f64>().unwrap();
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(30), "no gap metric: {m}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert_eq!(gap, 1.0);

    // A segment inside the snapshot's own range: that snapshot cannot reach consistency.
    let start = snap["postgres"]["start-wal"].as_str().unwrap().to_string();
    let inside = keys.iter().find(|k| seg(k) == start).unwrap();
    rt.block_on(store.delete(inside)).unwrap();
    let o = fx.run(&["verify", "db"]);
    assert_eq!(o.status.code(), Some(3));
    let id = snap["id"].as_str().unwrap();
    assert!(stdout(&o).contains(&format!("snapshot {id}: WAL segment(s) {start}")), "{}", stdout(&o));
}
