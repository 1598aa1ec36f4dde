//! Volume backups end to end with the real binary against file://, moto and Garage.

use crate::common::*;

fn tree_mb() -> usize {
    std::env::var("VEZA_TEST_TREE_MB").ok().and_then(|s| s.parse().ok()).unwrap_or(1024)
}

/// Full backup, restore byte for byte, change the tree, incremental, restore both snapshots.
fn round_trip(kind: Kind, extra: &str) {
    let backend = Backend::start(kind);
    let fx = Fixture::new(&backend);
    let src = fx.path("src");
    tree::generate(&src, tree_mb(), 7);
    fx.volume_policy("vol", &backend, "repo", &src, extra);

    let s1 = fx.json(&["backup", "vol", "--full"]);
    assert_eq!(s1["kind"], "full");
    assert!(s1["stats"]["bytes-read"].as_u64().unwrap() >= ((tree_mb() as u64) << 20) * 9 / 10);
    let snaps = fx.json(&["snapshots", "vol"]);
    assert_eq!(snaps.as_array().unwrap().len(), 1);

    let r1 = fx.path("r1");
    fx.ok(&[
        "restore",
        "vol",
        "--snapshot",
        "latest",
        "--target",
        r1.to_str().unwrap(),
        "--identity",
        fx.identity.to_str().unwrap(),
    ]);
    tree::assert_same(&src, &r1);

    // Change the tree: one large file rewritten in the middle, one small file, a new file,
    // a deletion, a mode change.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(src.join("large/file-001.bin")).unwrap();
        f.seek(SeekFrom::Start(10 << 20)).unwrap();
        f.write_all(b"changed in the middle of a large file").unwrap();
    }
    std::fs::write(src.join("small/d000/e00/f00000.dat"), "rewritten small file").unwrap();
    std::fs::write(src.join("names/new file.txt"), "new").unwrap();
    std::fs::remove_file(src.join("names/日本語のファイル")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(src.join("script.sh"), std::fs::Permissions::from_mode(0o700)).unwrap();

    let s2 = fx.json(&["backup", "vol"]);
    assert_eq!(s2["kind"], "incremental");
    assert_eq!(s2["parent"], s1["id"]);
    let st = &s2["stats"];
    assert!(st["files-read"].as_u64().unwrap() <= 4, "incremental re-read unchanged files: {st}");
    assert!(st["bytes-new"].as_u64().unwrap() < 16 << 20, "incremental stored too much: {st}");

    let r2 = fx.path("r2");
    fx.ok(&["restore", "vol", "--target", r2.to_str().unwrap(), "--identity", fx.identity.to_str().unwrap()]);
    tree::assert_same(&src, &r2);
    // The first snapshot still restores on its own, unchanged.
    let r1b = fx.path("r1b");
    let id1 = s1["id"].as_str().unwrap();
    fx.ok(&[
        "restore",
        "vol",
        "--snapshot",
        &id1[..20],
        "--target",
        r1b.to_str().unwrap(),
        "--identity",
        fx.identity.to_str().unwrap(),
    ]);
    tree::assert_same(&r1, &r1b);

    let v = fx.json(&["verify", "vol", "--read-data", "--identity", fx.identity.to_str().unwrap()]);
    assert!(v["damage"].as_array().unwrap().is_empty(), "{v}");
    assert!(v["chunks-checked"].as_u64().unwrap() > 100);
}

#[test]
fn round_trip_file() {
    round_trip(Kind::File, "");
}

#[test]
fn round_trip_garage() {
    round_trip(Kind::Garage, "");
}

#[test]
fn round_trip_moto_with_multipart_packs() {
    // Packs above 32 MiB go up as multipart uploads.
    let extra = "";
    let backend = Backend::start(Kind::Moto);
    drop(backend);
    round_trip_with_pack_size(Kind::Moto, "48MiB", extra);
}

fn round_trip_with_pack_size(kind: Kind, size: &str, extra: &str) {
    // pack-size belongs to [repository]: append it there via the policy text.
    let backend = Backend::start(kind);
    let fx = Fixture::new(&backend);
    let src = fx.path("src");
    tree::generate(&src, tree_mb().min(512), 11);
    fx.volume_policy("vol", &backend, "repo", &src, extra);
    let p = fx.path("policies/vol.toml");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("[encryption]", &format!("pack-size = \"{size}\"\n\n[encryption]"));
    std::fs::write(&p, text).unwrap();
    let s = fx.json(&["backup", "vol"]);
    let big = s["packs"].as_array().unwrap().iter().filter(|p| p["size"].as_u64().unwrap() > 32 << 20).count();
    assert!(big >= 1, "expected multipart-sized packs: {s}");
    let r = fx.path("r");
    fx.ok(&["restore", "vol", "--target", r.to_str().unwrap(), "--identity", fx.identity.to_str().unwrap()]);
    tree::assert_same(&src, &r);
}

#[test]
fn include_restores_only_the_named_paths() {
    let backend = Backend::start(Kind::File);
    let fx = Fixture::new(&backend);
    let src = fx.path("src");
    tree::generate(&src, 4, 3);
    fx.volume_policy("vol", &backend, "repo", &src, "");
    fx.ok(&["backup", "vol"]);
    let r = fx.path("r");
    fx.ok(&[
        "restore",
        "vol",
        "--target",
        r.to_str().unwrap(),
        "--include",
        "names",
        "--identity",
        fx.identity.to_str().unwrap(),
    ]);
    assert!(r.join("names/café ☕ résumé.txt").exists());
    assert_eq!(std::fs::read_to_string(r.join("names/hard-b")).unwrap(), "shared inode\n");
    assert!(!r.join("large").exists());
    assert!(!r.join("script.sh").exists());
}

#[test]
fn losing_the_local_cache_costs_dedup_not_data() {
    let backend = Backend::start(Kind::File);
    let fx = Fixture::new(&backend);
    let src = fx.path("src");
    tree::generate(&src, 24, 5);
    fx.volume_policy("vol", &backend, "repo", &src, "");
    let s1 = fx.json(&["backup", "vol"]);
    let s2 = fx.json(&["backup", "vol"]);
    assert_eq!(s2["stats"]["files-read"], 0, "unchanged re-run read files: {s2}");
    assert_eq!(s2["stats"]["bytes-uploaded"], 0);
    std::fs::remove_dir_all(fx.path("state")).unwrap();
    let s3 = fx.json(&["backup", "vol", "--incremental"]);
    assert_eq!(s3["kind"], "full", "no parent without the cache");
    assert!(
        s3["stats"]["bytes-uploaded"].as_u64().unwrap() > 10 << 20,
        "without the cache everything is uploaded again"
    );
    for s in [&s1, &s2, &s3] {
        let r = fx.path(&format!("r-{}", s["id"].as_str().unwrap()));
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
        tree::assert_same(&src, &r);
    }
}

#[test]
fn special_files_are_skipped_and_changing_files_reported() {
    let backend = Backend::start(Kind::File);
    let fx = Fixture::new(&backend);
    let src = fx.path("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("plain"), "plain").unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(src.join("app.sock")).unwrap();
    nix::unistd::mkfifo(&src.join("pipe"), nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    // A file that grows while it is read.
    let growing = src.join("growing.log");
    std::fs::write(&growing, vec![b'x'; 64 << 20]).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, growing) = (stop.clone(), growing.clone());
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().append(true).open(&growing).unwrap();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                f.write_all(&[b'y'; 4096]).unwrap();
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        })
    };
    fx.volume_policy("vol", &backend, "repo", &src, "");
    let s = fx.json(&["backup", "vol"]);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.join().unwrap();
    let warnings: Vec<String> =
        s["warnings"].as_array().unwrap().iter().map(|w| w.as_str().unwrap().to_string()).collect();
    assert!(warnings.iter().any(|w| w == "skipped socket app.sock"), "{warnings:?}");
    assert!(warnings.iter().any(|w| w == "skipped fifo pipe"), "{warnings:?}");
    assert!(warnings.iter().any(|w| w.starts_with("growing.log changed while it was read")), "{warnings:?}");
    assert_eq!(s["stats"]["files-changed-during-read"], 1);
    let r = fx.path("r");
    fx.ok(&["restore", "vol", "--target", r.to_str().unwrap(), "--identity", fx.identity.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(r.join("plain")).unwrap(), "plain");
    assert!(!r.join("app.sock").exists() && !r.join("pipe").exists());
}

/// `restore --delta` over a directory that drifted from the snapshot (a page of a file
/// changed, a file cut short, one deleted, extra files and directories, a file replaced by
/// a planted symlink and another by a planted hard link to a file outside) gives the
/// snapshot exactly, fetches only what differs, and writes through no planted name.
#[test]
fn delta_restore_over_a_drifted_directory_yields_the_snapshot_exactly() {
    let backend = Backend::start(Kind::File);
    let fx = Fixture::new(&backend);
    let src = fx.path("src");
    tree::generate(&src, 24, 31);
    fx.volume_policy("vol", &backend, "vol", &src, "");
    fx.ok(&["backup", "vol"]);
    let out = fx.path("out");
    let id = fx.identity.to_str().unwrap().to_string();
    let o = out.to_str().unwrap();
    fx.ok(&["restore", "vol", "--target", o, "--identity", &id]);

    let big = out.join("large/file-000.bin");
    let mut b = std::fs::read(&big).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0xff;
    std::fs::write(&big, &b).unwrap();
    let cut = out.join("large/file-001.bin");
    let n = std::fs::metadata(&cut).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&cut).unwrap().set_len(n / 3).unwrap();
    std::fs::remove_file(out.join("secret.conf")).unwrap();
    std::fs::write(out.join("extra.txt"), "not in the snapshot").unwrap();
    std::fs::create_dir_all(out.join("junk/a/b")).unwrap();
    std::fs::write(out.join("junk/a/b/c"), "deep").unwrap();
    // Planted names: a symlink to a file outside, and a hard link to another.
    let outside = fx.path("outside-target");
    std::fs::write(&outside, "must not change").unwrap();
    std::fs::remove_file(out.join("script.sh")).unwrap();
    std::os::unix::fs::symlink(&outside, out.join("script.sh")).unwrap();
    let outside2 = fx.path("outside-hardlinked");
    std::fs::write(&outside2, "must not change either").unwrap();
    std::fs::remove_file(out.join("empty-file")).unwrap();
    std::fs::hard_link(&outside2, out.join("empty-file")).unwrap();

    let r = fx.json(&["restore", "vol", "--target", o, "--identity", &id, "--delta"]);
    tree::assert_same(&src, &out);
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "must not change");
    assert_eq!(std::fs::read_to_string(&outside2).unwrap(), "must not change either");
    let d = &r["delta"];
    assert!(d["removed"].as_u64().unwrap() >= 2, "{r}");
    assert!(d["files-created"].as_u64().unwrap() >= 3, "{r}");
    assert!(d["files-changed"].as_u64().unwrap() >= 2, "{r}");
    let (fetched, total) = (d["bytes-fetched"].as_u64().unwrap(), r["bytes"].as_u64().unwrap());
    assert!(fetched > 0 && fetched < total / 2, "a delta restore fetched {fetched} of {total} bytes: {r}");

    // Again: nothing differs, so nothing is fetched, except the one hard-linked file. A file
    // with more than one link is never written in place: it is created anew.
    let again = fx.json(&["restore", "vol", "--target", o, "--identity", &id, "--delta"]);
    let hard = std::fs::metadata(src.join("hard-a")).unwrap().len();
    assert_eq!(again["delta"]["bytes-fetched"].as_u64(), Some(hard), "{again}");
    assert_eq!(again["delta"]["files-changed"], 0, "{again}");
    tree::assert_same(&src, &out);
    // A mistyped target that holds none of the snapshot is refused, and nothing in it goes.
    let wrong = fx.path("not-a-copy");
    std::fs::create_dir_all(wrong.join("photos")).unwrap();
    std::fs::write(wrong.join("photos/2026.jpg"), "precious").unwrap();
    let w = fx.run(&["restore", "vol", "--target", wrong.to_str().unwrap(), "--identity", &id, "--delta"]);
    assert_eq!(w.status.code(), Some(2), "{}", stderr(&w));
    assert!(stderr(&w).contains("holds nothing of snapshot"), "{}", stderr(&w));
    assert_eq!(std::fs::read_to_string(wrong.join("photos/2026.jpg")).unwrap(), "precious");
    // Without --delta a non-empty target is still refused.
    let o2 = fx.run(&["restore", "vol", "--target", o, "--identity", &id]);
    assert_eq!(o2.status.code(), Some(2), "{}", stderr(&o2));
}

/// The record of a restore: a later `--delta` into the same directory compares the files
/// untouched since (same inode, size, mtime and ctime) by the snapshots' manifests instead of
/// reading them; a file changed in place behind its mtime, and a record rewritten by someone
/// without the repository's key, are seen, and the target still ends up exactly the snapshot.
#[test]
fn delta_restore_trusts_only_files_untouched_since_the_recorded_restore() {
    use std::os::unix::fs::MetadataExt;
    let backend = Backend::start(Kind::File);
    let fx = Fixture::new(&backend);
    let src = fx.path("src");
    tree::generate(&src, 24, 41);
    fx.volume_policy("vol", &backend, "vol", &src, "");
    fx.ok(&["backup", "vol", "--full"]);
    let out = fx.path("out");
    let (id, o) = (fx.identity.to_str().unwrap().to_string(), out.to_str().unwrap().to_string());
    fx.ok(&["restore", "vol", "--target", &o, "--identity", &id]);
    let records: Vec<_> = std::fs::read_dir(fx.path("state/restored")).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(records.len(), 1, "{records:?}");
    let record = records[0].clone();

    // The source moves on: one large file changes in the middle, one file is new.
    let changed = src.join("large/file-002.bin");
    let mut b = std::fs::read(&changed).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x5a;
    std::fs::write(&changed, &b).unwrap();
    std::fs::write(src.join("new.txt"), "after the first backup").unwrap();
    fx.ok(&["backup", "vol"]);

    // The copy drifts behind its mtime: same size, same mtime, other bytes.
    let sneaky = out.join("large/file-001.bin");
    let flip_keeping_mtime = |p: &std::path::Path| {
        let mtime = std::fs::metadata(p).unwrap().modified().unwrap();
        let mut b = std::fs::read(p).unwrap();
        let at = b.len() / 3;
        b[at] ^= 0x01;
        let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &b[at..at + 1], at as u64).unwrap();
        f.set_modified(mtime).unwrap();
    };
    flip_keeping_mtime(&sneaky);
    let r = fx.json(&["restore", "vol", "--target", &o, "--identity", &id, "--delta"]);
    tree::assert_same(&src, &out);
    let d = &r["delta"];
    let (known, files) = (d["files-known"].as_u64().unwrap(), r["files"].as_u64().unwrap());
    assert!(known > files / 2 && known < files, "{r}");
    let (fetched, total) = (d["bytes-fetched"].as_u64().unwrap(), r["bytes"].as_u64().unwrap());
    assert!(fetched > 0 && fetched < total / 4, "{r}");

    // Nothing changed since that delta: every single-link file is known, nothing is read.
    let again = fx.json(&["restore", "vol", "--target", &o, "--identity", &id, "--delta"]);
    assert_eq!(again["delta"]["files-changed"], 0, "{again}");
    assert!(again["delta"]["files-known"].as_u64().unwrap() > known, "{again}");
    // With --checksum every file is read again.
    let all = fx.json(&["restore", "vol", "--target", &o, "--identity", &id, "--delta", "--checksum"]);
    assert_eq!(all["delta"]["files-known"], 0, "{all}");
    tree::assert_same(&src, &out);

    // Someone without the key changes a file and rewrites its stat in the record: the MAC no
    // longer matches, the record is not used, and the file is restored.
    let victim = out.join("large/file-003.bin");
    flip_keeping_mtime(&victim);
    let m = std::fs::metadata(&victim).unwrap();
    let text = std::fs::read_to_string(&record).unwrap();
    let (mac, body) = text.split_once('\n').unwrap();
    let mut body: serde_json::Value = serde_json::from_str(body).unwrap();
    let mut rewritten = 0;
    for f in body["files"].as_array_mut().unwrap() {
        if f[1]["ino"].as_u64() == Some(m.ino()) {
            f[1]["ctime_ns"] = serde_json::json!(m.ctime() * 1_000_000_000 + m.ctime_nsec());
            rewritten += 1;
        }
    }
    assert_eq!(rewritten, 1, "{body}");
    std::fs::write(&record, format!("{mac}\n{body}")).unwrap();
    let forged = fx.json(&["restore", "vol", "--target", &o, "--identity", &id, "--delta"]);
    assert_eq!(forged["delta"]["files-known"], 0, "{forged}");
    assert!(forged["delta"]["files-changed"].as_u64().unwrap() >= 1, "{forged}");
    tree::assert_same(&src, &out);

    // A delta that fails once it has started leaves no record: its writes may have reached
    // the disk before their ctimes (a power cut), so the next delta reads every file.
    assert!(record.exists());
    flip_keeping_mtime(&victim);
    let data = backend.file_path("vol", "data");
    let hidden = fx.path("data-hidden");
    std::fs::rename(&data, &hidden).unwrap();
    let failed = fx.run(&["restore", "vol", "--target", &o, "--identity", &id, "--delta"]);
    assert_ne!(failed.status.code(), Some(0), "{}", stderr(&failed));
    std::fs::rename(&hidden, &data).unwrap();
    assert!(!record.exists(), "a failed delta left its target's record");
    let after = fx.json(&["restore", "vol", "--target", &o, "--identity", &id, "--delta"]);
    assert_eq!(after["delta"]["files-known"], 0, "{after}");
    tree::assert_same(&src, &out);
}
