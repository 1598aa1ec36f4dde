//! Behaviour that follows from the shape of the code: read-only commands never create a
//! repository, every external WAL name goes through one parser, one identity type serves every
//! restore-side command (env: identities in the daemon, SSH keys).

use crate::common::*;
use std::time::{Duration, Instant};

fn one_line(o: &std::process::Output) -> String {
    stderr(o)
}

/// Every object under the policy's prefix, as the bucket holds them.
fn objects(fx: &Fixture, backend: &Backend, policy: &str, prefix: &str) -> Vec<String> {
    if backend.kind == Kind::File {
        let root = backend.dir.path().join(prefix);
        if !root.exists() {
            return vec![];
        }
        return walkdir::WalkDir::new(&root)
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file())
            .map(|e| e.path().display().to_string())
            .collect();
    }
    let (rt, store, _d) = fx.raw_store(backend, policy, prefix);
    rt.block_on(store.list("")).unwrap().into_iter().map(|(k, _)| k).collect()
}

fn read_only_commands_leave_a_mistyped_url_empty(kind: Kind) {
    let backend = Backend::start(kind);
    let fx = Fixture::new(&backend);
    let src = fx.path("src");
    tree::generate(&src, 1, 3);
    fx.volume_policy("typo", &backend, "no-such-repo", &src, "");
    let target = fx.path("restored");
    let reports = fx.path("reports");
    let id = fx.identity.to_str().unwrap().to_string();
    let wal_dest = fx.path("seg");
    let commands: Vec<Vec<String>> = vec![
        vec!["snapshots".into(), "typo".into()],
        vec![
            "restore".into(),
            "typo".into(),
            "--target".into(),
            target.display().to_string(),
            "--identity".into(),
            id.clone(),
        ],
        vec!["verify".into(), "typo".into()],
        vec!["verify".into(), "typo".into(), "--read-data".into(), "--identity".into(), id.clone()],
        vec![
            "drill".into(),
            "typo".into(),
            "--identity".into(),
            id.clone(),
            "--report-dir".into(),
            reports.display().to_string(),
        ],
        vec!["drills".into(), "typo".into()],
        vec!["prune".into(), "typo".into()],
        vec![
            "wal-fetch".into(),
            "typo".into(),
            "000000010000000000000001".into(),
            wal_dest.display().to_string(),
            "--identity".into(),
            id.clone(),
        ],
    ];
    for args in &commands {
        let o = fx.run(args);
        assert!(!o.status.success(), "{args:?} succeeded on a location with no repository");
        let err = one_line(&o);
        assert!(err.contains("there is no veza-dr repository at"), "{args:?}: {err}");
        assert!(err.contains("veza-dr init <policy>"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(objects(&fx, &backend, "typo", "no-such-repo"), Vec::<String>::new(), "{args:?} wrote to the store");
    }
    assert!(!target.exists() || std::fs::read_dir(&target).unwrap().next().is_none());

    // `init` creates it and says so; a second `init` changes nothing; then reads work.
    let out = fx.ok(&["init", "typo"]);
    assert!(out.starts_with("created repository "), "{out}");
    assert_eq!(objects(&fx, &backend, "typo", "no-such-repo").len(), 1, "init writes only the config");
    let out = fx.ok(&["init", "typo"]);
    assert!(out.contains("already exists; nothing changed"), "{out}");
    assert!(fx.ok(&["snapshots", "typo"]).contains("no snapshots for policy typo"));
}

#[test]
fn read_only_commands_never_create_a_repository_on_file() {
    read_only_commands_leave_a_mistyped_url_empty(Kind::File);
}

#[test]
fn read_only_commands_never_create_a_repository_on_moto() {
    read_only_commands_leave_a_mistyped_url_empty(Kind::Moto);
}

/// WAL names from archive_command, restore_command and the bucket are parsed, never sliced.
#[test]
fn hostile_wal_names_get_a_message_never_a_panic() {
    let (backend, fx, pg) = archiving_cluster(Kind::Moto);
    fx.pg_policy("db", &backend, "db", "physical", &pg.data, "[retention]\nkeep-last = 1\nprune-grace = \"0s\"\n");
    fx.ok(&["backup", "db"]);
    let dir = fx.path("hostile");
    std::fs::create_dir_all(&dir).unwrap();
    let names = [
        "AAAAAAAAAAAAAAAAAAAAAAAéBBBBBBBB.backup",
        "AAAAAAAAAAAAAAAé",
        "0000000100000000000000é3",
        "..",
        "00000001",
        "RECOVERYXLOG",
        "000000010000000000000001.partialX",
    ];
    for name in names {
        let path = dir.join(name);
        if name != ".." {
            std::fs::write(&path, b"not wal").unwrap();
        }
        let o = fx.run(&["wal-push", "db", path.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(2), "wal-push {name}: {}", stderr(&o));
        assert!(stderr(&o).contains("is not a WAL file name PostgreSQL archives"), "{name}: {}", stderr(&o));
        let dest = fx.path("fetched");
        let o = fx.run(&["wal-fetch", "db", name, dest.to_str().unwrap(), "--identity", fx.identity.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(2), "wal-fetch {name}: {}", stderr(&o));
        assert!(stderr(&o).contains("is not a WAL file name"), "{name}: {}", stderr(&o));
        assert!(!dest.exists());
    }
    for name in ["../../etc/passwd", "a/b/000000010000000000000001"] {
        let o = fx.run(&[
            "wal-fetch",
            "db",
            name,
            fx.path("x").to_str().unwrap(),
            "--identity",
            fx.identity.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(2), "wal-fetch {name}: {}", stderr(&o));
    }

    // Stray objects under wal/ (someone else wrote them): prune and verify go on.
    let (rt, store, _d) = fx.raw_store(&backend, "db", "db");
    for stray in [
        "wal/00000001/AAAAAAAAAAAAAAAAAAAAAAAéBBBBBBBB.backup/0123456789abcdef0123456789abcdef",
        "wal/x",
        "wal/00000001/short/0123",
        "data/zz/not-a-pack",
        "snapshots/é.manifest",
    ] {
        rt.block_on(store.put(stray, bytes::Bytes::from_static(b"stray"))).unwrap();
    }
    fx.ok(&["backup", "db"]);
    let out = fx.ok(&["prune", "db"]);
    assert!(out.contains("forget"), "{out}");
    fx.ok(&["verify", "db"]);
    let names: Vec<String> = rt.block_on(store.list("wal/")).unwrap().into_iter().map(|(k, _)| k).collect();
    assert!(names.iter().any(|k| k.contains('é') || k.contains("%C3%A9")), "prune left the stray alone: {names:?}");
}

/// The daemon drills a policy whose identity is an `env:` reference (it used to fall back to
/// the keyless verify, because only `file:` identities were looked at).
#[test]
fn the_daemon_drills_a_policy_whose_identity_is_in_the_environment() {
    let backend = Backend::start(Kind::Moto);
    let mut fx = Fixture::new(&backend);
    let src = fx.path("src");
    tree::generate(&src, 1, 5);
    let key = std::fs::read_to_string(&fx.identity).unwrap();
    fx.env.push(("VEZA_TEST_IDENTITY".into(), key));
    fx.volume_policy("vol", &backend, "vol", &src, "");
    fx.ok(&["backup", "vol"]);
    let text = std::fs::read_to_string(fx.path("policies/vol.toml")).unwrap().replace(
        "[encryption]\n",
        "[schedule]\nverify = \"*/3 * * * * *\"\n[encryption]\nidentity = \"env:VEZA_TEST_IDENTITY\"\n",
    );
    std::fs::write(fx.path("policies/vol.toml"), text).unwrap();
    let port = free_port();
    let mut daemon = fx.cmd(&["daemon", "--listen", &format!("127.0.0.1:{port}")]).spawn().unwrap();
    let t = Instant::now();
    let drills = loop {
        let h = fx.json(&["drills", "vol"]);
        if !h.as_array().unwrap().is_empty() {
            break h;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "the daemon never drilled the env-identity policy");
        std::thread::sleep(Duration::from_millis(300));
    };
    let _ = daemon.kill();
    let _ = daemon.wait();
    let r = &drills[0];
    assert_eq!(r["verdict"], "pass", "{r}");
    let phases: Vec<&str> = r["phases"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(phases, ["open identity", "choose snapshot", "fetch, decrypt, write", "compare with recorded hashes"]);
}

/// A policy with only an SSH recipient backs up and restores with the matching SSH key.
#[test]
fn an_ssh_ed25519_recipient_backs_up_and_restores_with_its_key() {
    let backend = Backend::start(Kind::File);
    let fx = Fixture::new(&backend);
    let key = fx.path("restore-side/id_ed25519");
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "veza-test", "-f", key.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "ssh-keygen: {}", stderr(&out));
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let src = fx.path("src");
    tree::generate(&src, 2, 7);
    fx.volume_policy("ssh", &backend, "ssh", &src, "");
    let path = fx.path("policies/ssh.toml");
    let text = std::fs::read_to_string(&path).unwrap().replace(&fx.recipient, public.trim());
    std::fs::write(&path, text).unwrap();
    fx.ok(&["backup", "ssh"]);
    let target = fx.path("restored");
    fx.ok(&["restore", "ssh", "--target", target.to_str().unwrap(), "--identity", key.to_str().unwrap()]);
    tree::assert_same(&src, &target);
    // The age identity of the fixture is not a recipient: it cannot read this repository.
    let o = fx.run(&[
        "restore",
        "ssh",
        "--target",
        fx.path("r2").to_str().unwrap(),
        "--identity",
        fx.identity.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("cannot decrypt"), "{}", stderr(&o));
    // The SSH key reads it through the drill too.
    let o = fx.run(&[
        "drill",
        "ssh",
        "--identity",
        key.to_str().unwrap(),
        "--report-dir",
        fx.path("rep").to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}
