//! Bad input and faults: damaged objects, kill -9, the encrypt-only host, dead endpoints,
//! wrong credentials, a full disk. Each ends in a one-line error, a hint and an exit code.

use crate::common::*;
use std::path::{Path, PathBuf};

fn packs(backend: &Backend) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = walkdir::WalkDir::new(backend.file_path("repo", "data"))
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
        // object_store's local backend writes `<name>#<n>` first, then renames.
        .filter(|e| !e.file_name().to_string_lossy().contains('#'))
        .map(|e| e.into_path())
        .collect();
    v.sort();
    v
}

fn setup(mb: usize) -> (Backend, Fixture, PathBuf) {
    let backend = Backend::start(Kind::File);
    let fx = Fixture::new(&backend);
    let src = fx.path("src");
    tree::generate(&src, mb, 21);
    fx.volume_policy("vol", &backend, "repo", &src, "[retention]\nkeep-last = 1\nprune-grace = \"0s\"\n");
    (backend, fx, src)
}

fn one_line_error(o: &std::process::Output) -> String {
    let e = stderr(o);
    // Log lines (warnings, and object_store saying what it retries) are not the error.
    let lines: Vec<&str> = e.lines().filter(|l| !l.contains(" WARN ") && !l.contains(" INFO ")).collect();
    assert!(lines.len() <= 2 && lines[0].starts_with("veza-dr: error: "), "not a one-line error:\n{e}");
    assert!(!e.contains("panicked"), "{e}");
    e
}

#[test]
fn a_flipped_byte_is_detected_and_named_by_restore_and_verify() {
    let (backend, fx, _src) = setup(12);
    fx.ok(&["backup", "vol"]);
    let pack = packs(&backend).into_iter().max_by_key(|p| p.metadata().unwrap().len()).unwrap();
    let pack_name = pack.file_name().unwrap().to_str().unwrap().to_string();
    let mut data = std::fs::read(&pack).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0x40;
    std::fs::write(&pack, &data).unwrap();

    let id = fx.identity.to_str().unwrap();
    let r = fx.path("r");
    let o = fx.run(&["restore", "vol", "--target", r.to_str().unwrap(), "--identity", id]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let e = one_line_error(&o);
    assert!(e.contains(&pack_name), "error does not name the pack: {e}");
    assert!(e.contains("affected files: "), "{e}");
    assert!(e.contains("hint: "), "{e}");
    // The files that are not affected were restored.
    assert_eq!(std::fs::read_to_string(r.join("secret.conf")).unwrap(), "mode 600\n");

    let o = fx.run(&["verify", "vol", "--read-data", "--identity", id]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stdout(&o).contains(&pack_name) && stdout(&o).contains("DAMAGE FOUND"), "{}", stdout(&o));
    // Without a key, the pack hash still catches it.
    let o = fx.run(&["verify", "vol", "--read-data"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stdout(&o).contains("does not match its id"), "{}", stdout(&o));
    // Structure alone does not see a flipped byte (sizes match): exit 0.
    assert_eq!(fx.run(&["verify", "vol"]).status.code(), Some(0));
}

#[test]
fn truncated_and_missing_packs_are_detected_without_a_key() {
    let (backend, fx, _src) = setup(12);
    fx.ok(&["backup", "vol"]);
    let ps = packs(&backend);
    assert!(!ps.is_empty());
    let victim = &ps[0];
    let len = victim.metadata().unwrap().len();
    std::fs::OpenOptions::new().write(true).open(victim).unwrap().set_len(len / 2).unwrap();
    let o = fx.run(&["verify", "vol"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stdout(&o).contains("truncated or replaced"), "{}", stdout(&o));

    std::fs::remove_file(victim).unwrap();
    let o = fx.run(&["verify", "vol"]);
    assert_eq!(o.status.code(), Some(3));
    let name = victim.file_name().unwrap().to_str().unwrap();
    assert!(stdout(&o).contains(&format!("{name} is missing")), "{}", stdout(&o));
    let r = fx.path("r");
    let o = fx.run(&["restore", "vol", "--target", r.to_str().unwrap(), "--identity", fx.identity.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3));
    let e = one_line_error(&o);
    assert!(e.contains("pack is missing") && e.contains(name), "{e}");
}

#[test]
fn kill_dash_nine_mid_backup_leaves_only_garbage() {
    let (backend, fx, src) = setup(8);
    let first = fx.json(&["backup", "vol"]);
    // A large new file so that the second backup runs long enough to be killed in the middle.
    let mut rng = tree::Rng::new(99);
    let mut big = vec![0u8; 600 << 20];
    rng.fill(&mut big);
    std::fs::write(src.join("large/huge.bin"), &big).unwrap();
    drop(big);
    let before = packs(&backend).len();
    let mut child = fx
        .cmd(&["backup", "vol", "--json"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while packs(&backend).len() < before + 3 {
        assert!(t.elapsed().as_secs() < 120, "backup wrote no packs");
        assert!(child.try_wait().unwrap().is_none(), "backup finished before it could be killed");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    child.wait().unwrap();

    // No half snapshot: only the first one exists, and it restores.
    let snaps = fx.json(&["snapshots", "vol"]);
    assert_eq!(snaps.as_array().unwrap().len(), 1, "{snaps}");
    let v = fx.json(&["verify", "vol", "--identity", fx.identity.to_str().unwrap()]);
    assert!(v["damage"].as_array().unwrap().is_empty(), "{v}");
    assert!(v["garbage"].as_array().unwrap().len() >= 3, "the killed backup's packs are garbage: {v}");

    // The next backup works (the dead process's lock is stale at once) and both restore.
    let second = fx.json(&["backup", "vol"]);
    for (s, name) in [(&first, "r1"), (&second, "r2")] {
        let r = fx.path(name);
        fx.ok(&[
            "restore",
            "vol",
            "--snapshot",
            s["id"].as_str().unwrap(),
            "--target",
            r.to_str().unwrap(),
            "--identity",
            fx.identity.to_str().unwrap(),
        ]);
    }
    tree::assert_same(&src, &fx.path("r2"));

    // Prune: keep-last 1 forgets the first snapshot; garbage is marked, then deleted.
    let p1 = fx.json(&["prune", "vol"]);
    assert_eq!(p1["forgotten"].as_array().unwrap().len(), 1, "{p1}");
    assert!(p1["marked"].as_array().unwrap().len() >= 3, "{p1}");
    assert!(p1["deleted"].as_array().unwrap().is_empty(), "two-phase: nothing deleted on the marking run");
    let p2 = fx.json(&["prune", "vol"]);
    assert!(p2["deleted"].as_array().unwrap().len() >= 3, "{p2}");
    let v = fx.json(&["verify", "vol", "--read-data", "--identity", fx.identity.to_str().unwrap()]);
    assert!(v["damage"].as_array().unwrap().is_empty() && v["garbage"].as_array().unwrap().is_empty(), "{v}");
    let r = fx.path("r3");
    fx.ok(&["restore", "vol", "--target", r.to_str().unwrap(), "--identity", fx.identity.to_str().unwrap()]);
    tree::assert_same(&src, &r);
}

fn grep_dir(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
        .filter(|e| std::fs::read(e.path()).map(|b| b.windows(needle.len()).any(|w| w == needle)).unwrap_or(false))
        .map(|e| e.into_path())
        .collect()
}

#[test]
fn the_backup_host_needs_no_private_key_and_cannot_read_its_backups() {
    let (backend, fx, src) = setup(6);
    let marker = b"VEZA-PLAINTEXT-MARKER-0123456789";
    std::fs::write(src.join("marker.txt"), marker.repeat(1000)).unwrap();
    // Move the identity away: the backup side runs with no private key anywhere.
    let away = fx.path("elsewhere.key");
    std::fs::rename(&fx.identity, &away).unwrap();
    fx.ok(&["backup", "vol"]);
    std::fs::write(src.join("marker2.txt"), "more").unwrap();
    fx.ok(&["backup", "vol", "--incremental"]);
    fx.ok(&["verify", "vol"]);
    fx.ok(&["prune", "vol"]);
    let repo = backend.file_path("repo", "");
    assert!(grep_dir(&repo, marker).is_empty(), "plaintext reached the repository");
    assert!(grep_dir(&repo, b"AGE-SECRET-KEY").is_empty());
    assert!(grep_dir(&fx.path("state"), b"AGE-SECRET-KEY").is_empty(), "a private key reached the backup host's state");

    let r = fx.path("r");
    let o = fx.run(&["restore", "vol", "--target", r.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let e = one_line_error(&o);
    assert!(e.contains("needs a private identity") && e.contains("--identity"), "{e}");

    let wrong = fx.path("wrong.key");
    fx.ok(&["keygen", "-o", wrong.to_str().unwrap()]);
    let o = fx.run(&["restore", "vol", "--target", r.to_str().unwrap(), "--identity", wrong.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let e = one_line_error(&o);
    assert!(e.contains("cannot decrypt"), "{e}");

    let o = fx.run(&[
        "restore",
        "vol",
        "--target",
        r.to_str().unwrap(),
        "--identity",
        fx.path("missing.key").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(one_line_error(&o).contains("cannot read identity"));

    fx.ok(&["restore", "vol", "--target", r.to_str().unwrap(), "--identity", away.to_str().unwrap()]);
    assert_eq!(std::fs::read(r.join("marker.txt")).unwrap(), marker.repeat(1000));
}

#[test]
fn bad_input_gets_one_line_errors_with_hints() {
    let (_backend, fx, _src) = setup(2);
    fx.ok(&["backup", "vol"]);
    let id = fx.identity.to_str().unwrap();
    let r = fx.path("r");

    let o = fx.run(&["restore", "vol", "--snapshot", "20990101", "--target", r.to_str().unwrap(), "--identity", id]);
    assert_eq!(o.status.code(), Some(1));
    let e = one_line_error(&o);
    assert!(e.contains("snapshot 20990101 not found for policy vol") && e.contains("veza-dr snapshots vol"), "{e}");

    let o = fx.run(&["backup", "nosuch"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(one_line_error(&o).contains("known policies: vol"));

    std::fs::create_dir_all(&r).unwrap();
    std::fs::write(r.join("precious"), "do not overwrite").unwrap();
    let o = fx.run(&["restore", "vol", "--target", r.to_str().unwrap(), "--identity", id]);
    assert_eq!(o.status.code(), Some(2));
    assert!(one_line_error(&o).contains("is not empty"));
    assert_eq!(std::fs::read_to_string(r.join("precious")).unwrap(), "do not overwrite");

    // A malformed policy names file, line and column, and exits 2.
    std::fs::write(fx.path("policies/broken.toml"), "[source]\ntype = \"volume\"\npath = \"/srv\"\n[repository]\nurl = \"file:///tmp/x\"\ncompresion-level = 3\n[encryption]\nrecipients = []\n").unwrap();
    let o = fx.run(&["policy", "check"]);
    assert_eq!(o.status.code(), Some(2));
    let out = stdout(&o);
    assert!(out.contains("broken.toml:6:1: unknown field `compresion-level`"), "{out}");
    assert!(out.contains("ok    vol"), "{out}");
    let o = fx.run(&["backup", "broken"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn dead_endpoint_and_wrong_credentials() {
    let mut backend = Backend::start(Kind::Garage);
    let fx = Fixture::new(&backend);
    let src = fx.path("src");
    tree::generate(&src, 2, 1);
    fx.volume_policy("vol", &backend, "repo", &src, "");
    fx.ok(&["backup", "vol"]);

    let mut c = fx.cmd(&["snapshots", "vol"]);
    c.env("VEZA_TEST_S3_SECRET", "0000000000000000000000000000000000000000000000000000000000000000");
    let o = c.output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = one_line_error(&o);
    assert!(e.contains("check the repository credentials"), "{e}");

    backend.stop();
    let o = fx.run(&["backup", "vol"]);
    assert_eq!(o.status.code(), Some(1));
    let e = one_line_error(&o);
    assert!(e.contains("the endpoint is unreachable"), "{e}");
}

#[test]
fn a_full_disk_on_restore_is_a_clear_error() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("needs root to mount a small tmpfs; CI runs as root");
        return;
    }
    let (_backend, fx, _src) = setup(16);
    fx.ok(&["backup", "vol"]);
    let small = fx.path("small-disk");
    std::fs::create_dir_all(&small).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs", small.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs");
    let o = fx.run(&[
        "restore",
        "vol",
        "--target",
        small.join("r").to_str().unwrap(),
        "--identity",
        fx.identity.to_str().unwrap(),
    ]);
    let _ = std::process::Command::new("umount").arg(&small).status();
    assert_eq!(o.status.code(), Some(1));
    let e = one_line_error(&o);
    assert!(e.contains("No space left on device") && e.contains("disk is full"), "{e}");
}
