//! Security (issue 12): a restore that cannot be turned against its host, reports only
//! trusted keys sign, a dry run that cannot act. Each test shows an attack that used to work.

use crate::common::*;
use std::path::Path;

/// Decrypt, edit and re-encrypt the manifest of snapshot `id` in the bucket, as someone with
/// write access to it (and the identity, to learn a real chunk) could.
fn edit_manifest(fx: &Fixture, backend: &Backend, policy: &str, id: &str, edit: impl Fn(&mut serde_json::Value)) {
    use std::io::{Read, Write};
    let (rt, store, _d) = fx.raw_store(backend, policy, policy);
    let key = format!("snapshots/{id}.manifest");
    let sealed = rt.block_on(store.get(&key)).unwrap();
    let text = std::fs::read_to_string(&fx.identity).unwrap();
    let line = text.lines().find(|l| l.starts_with("AGE-SECRET-KEY-")).unwrap();
    let identity: age::x25519::Identity = line.parse().unwrap();
    let dec = age::Decryptor::new_buffered(&sealed[..]).unwrap();
    let mut z = Vec::new();
    dec.decrypt(std::iter::once(&identity as &dyn age::Identity)).unwrap().read_to_end(&mut z).unwrap();
    let mut m: serde_json::Value = serde_json::from_slice(&zstd::stream::decode_all(&z[..]).unwrap()).unwrap();
    edit(&mut m);
    let z = zstd::bulk::compress(&serde_json::to_vec(&m).unwrap(), 3).unwrap();
    let recipient: age::x25519::Recipient = fx.recipient.parse().unwrap();
    let enc = age::Encryptor::with_recipients(std::iter::once(&recipient as &dyn age::Recipient)).unwrap();
    let mut out = Vec::new();
    let mut w = enc.wrap_output(&mut out).unwrap();
    w.write_all(&z).unwrap();
    w.finish().unwrap();
    // The sidecar records the manifest's hash; someone with write access rewrites it too
    // (only pinned writers, which sign sidecars, stop that: see the writer tests).
    let hash = blake3::hash(&out).to_hex().to_string();
    rt.block_on(store.put(&key, bytes::Bytes::from(out))).unwrap();
    let skey = format!("snapshots/{id}.json");
    let mut side: serde_json::Value = serde_json::from_slice(&rt.block_on(store.get(&skey)).unwrap()).unwrap();
    side["manifest-hash"] = hash.into();
    rt.block_on(store.put(&skey, bytes::Bytes::from(serde_json::to_vec(&side).unwrap()))).unwrap();
}

/// A file:// repository and a fixture with policy `vol` over a small tree at `src`.
fn small_volume() -> (Backend, Fixture, std::path::PathBuf) {
    let backend = Backend::start(Kind::File);
    let fx = Fixture::new(&backend);
    let src = fx.path("src");
    small_tree(&src);
    fx.volume_policy("vol", &backend, "vol", &src, "");
    (backend, fx, src)
}

fn small_tree(src: &Path) {
    std::fs::create_dir_all(src.join("conf")).unwrap();
    std::fs::write(src.join("conf/app.yaml"), "listen: 8080\n").unwrap();
    std::fs::write(src.join("data.bin"), vec![7u8; 100_000]).unwrap();
}

/// A local user plants `target/conf -> /somewhere` (and `target/data.bin -> /somewhere/x`);
/// `restore --overwrite` used to write the snapshot's files there.
#[test]
fn restore_never_writes_through_links_planted_in_the_target() {
    let (_backend, fx, _src) = small_volume();
    fx.ok(&["backup", "vol"]);
    let outside = fx.path("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("victim"), "precious\n").unwrap();
    let target = fx.path("target");
    std::fs::create_dir_all(&target).unwrap();
    std::os::unix::fs::symlink(&outside, target.join("conf")).unwrap();
    std::os::unix::fs::symlink(outside.join("victim"), target.join("data.bin")).unwrap();
    fx.ok(&[
        "restore",
        "vol",
        "--target",
        target.to_str().unwrap(),
        "--overwrite",
        "--identity",
        fx.identity.to_str().unwrap(),
    ]);
    assert!(!outside.join("app.yaml").exists(), "the snapshot's file was written through the planted link");
    assert_eq!(std::fs::read_to_string(outside.join("victim")).unwrap(), "precious\n");
    assert!(target.join("conf").symlink_metadata().unwrap().is_dir(), "the link was replaced by the directory");
    assert_eq!(std::fs::read_to_string(target.join("conf/app.yaml")).unwrap(), "listen: 8080\n");
    assert_eq!(std::fs::read(target.join("data.bin")).unwrap(), vec![7u8; 100_000]);
    // A planted hard link to a file outside is replaced, not written through.
    let target2 = fx.path("target2");
    std::fs::create_dir_all(&target2).unwrap();
    std::fs::hard_link(outside.join("victim"), target2.join("data.bin")).unwrap();
    fx.ok(&[
        "restore",
        "vol",
        "--target",
        target2.to_str().unwrap(),
        "--overwrite",
        "--identity",
        fx.identity.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read_to_string(outside.join("victim")).unwrap(), "precious\n");
}

/// Crafted manifests: a symlink followed by a file below it, a hard link to an absolute path,
/// a duplicate path. Each used to reach outside the target; now nothing is restored.
#[test]
fn crafted_manifests_cannot_escape_the_target() {
    let (backend, fx, _src) = small_volume();
    let s = fx.json(&["backup", "vol"]);
    let id = s["id"].as_str().unwrap().to_string();
    let outside = fx.path("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("shadow"), "root:x:0\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(outside.join("shadow"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let entry = |m: &serde_json::Value, path: &str| {
        m["entries"].as_array().unwrap().iter().find(|e| e["path"] == path).cloned().unwrap()
    };
    type Attack<'a> = (&'a str, Box<dyn Fn(&mut serde_json::Value) + 'a>, &'a str);
    let attacks: Vec<Attack> = vec![
        (
            "symlink then a file below it",
            Box::new(|m: &mut serde_json::Value| {
                let mut link = entry(m, "conf");
                link["path"] = "x".into();
                link["kind"] = "symlink".into();
                link["target"] = outside.display().to_string().into();
                let mut evil = entry(m, "conf/app.yaml");
                evil["path"] = "x/evil".into();
                m["entries"].as_array_mut().unwrap().extend([link, evil]);
            }),
            "below x, which is not one of its directories",
        ),
        (
            "hard link to an absolute path",
            Box::new(|m: &mut serde_json::Value| {
                let mut h = entry(m, "data.bin");
                h["path"] = "h".into();
                h["kind"] = "hardlink".into();
                h["target"] = outside.join("shadow").display().to_string().into();
                h["mode"] = 0o777.into();
                m["entries"].as_array_mut().unwrap().push(h);
            }),
            "which is not a file before it",
        ),
        (
            "a path twice",
            Box::new(|m: &mut serde_json::Value| {
                let dup = entry(m, "data.bin");
                m["entries"].as_array_mut().unwrap().push(dup);
            }),
            "lists data.bin twice",
        ),
    ];
    let (original, original_side) = {
        let (rt, store, _d) = fx.raw_store(&backend, "vol", "vol");
        (
            rt.block_on(store.get(&format!("snapshots/{id}.manifest"))).unwrap(),
            rt.block_on(store.get(&format!("snapshots/{id}.json"))).unwrap(),
        )
    };
    for (name, attack, says) in attacks {
        edit_manifest(&fx, &backend, "vol", &id, attack);
        let target = fx.path(&format!("t-{}", name.len()));
        let o = fx.run(&[
            "restore",
            "vol",
            "--target",
            target.to_str().unwrap(),
            "--identity",
            fx.identity.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(3), "{name}: {}", stderr(&o));
        assert!(stderr(&o).contains(says) && stderr(&o).contains("nothing was restored"), "{name}: {}", stderr(&o));
        assert!(!outside.join("evil").exists(), "{name}: wrote outside the target");
        let m = std::fs::metadata(outside.join("shadow")).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600, "{name}: changed a file outside the target");
        assert_eq!(std::fs::read_dir(&target).map(|d| d.count()).unwrap_or(0), 0, "{name}: restored something");
        let (rt, store, _d) = fx.raw_store(&backend, "vol", "vol");
        rt.block_on(store.put(&format!("snapshots/{id}.manifest"), original.clone())).unwrap();
        rt.block_on(store.put(&format!("snapshots/{id}.json"), original_side.clone())).unwrap();
    }
}

/// `report verify` used to trust the key inside the report: a report signed anywhere, by any
/// key, printed "signature ok". Only this host's key and the policy's report-signers count.
#[test]
fn report_verify_trusts_only_known_signers() {
    let (_backend, fx, _src) = small_volume();
    fx.ok(&["backup", "vol"]);
    let reports = fx.path("reports");
    let o = fx.run(&[
        "drill",
        "vol",
        "--identity",
        fx.identity.to_str().unwrap(),
        "--report-dir",
        reports.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let file = json_report(&reports);
    let signer = fx.ok(&["keygen", "--signing"]).trim().to_string();
    assert!(signer.starts_with("ed25519:") && signer.len() == 8 + 64, "{signer}");
    // This host trusts its own key.
    assert!(fx
        .ok(&["report", "verify", file.to_str().unwrap()])
        .contains(&format!("signed by {signer}, a trusted signer")));
    // Another host (its own state, its own key) does not, and names the key it found.
    let other = fx.path("other-state");
    let run_other = |args: &[&str]| {
        let mut c = std::process::Command::new(bin());
        c.arg("--policies").arg(fx.path("policies")).arg("--state-dir").arg(&other).args(args);
        c.output().unwrap()
    };
    run_other(&["keygen", "--signing"]);
    let o = run_other(&["report", "verify", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", stdout(&o));
    assert!(stderr(&o).contains(&format!("signed by {signer}, which is not a trusted signer")), "{}", stderr(&o));
    // Listing the signer in the policy makes the other host trust it.
    let p = fx.path("policies/vol.toml");
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, format!("{text}\n[trust]\nreport-signers = [\"{signer}\"]\n")).unwrap();
    let o = run_other(&["report", "verify", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Sidecars are plaintext: the paths in a backup's warnings used to be stored there. They
/// live in the encrypted manifest now; the sidecar keeps their count.
#[test]
fn no_path_reaches_a_plaintext_object() {
    let backend = Backend::start(Kind::File);
    let fx = Fixture::new(&backend);
    let src = fx.path("src");
    small_tree(&src);
    let _sock = std::os::unix::net::UnixListener::bind(src.join("project-nightingale.sock")).unwrap();
    fx.volume_policy("vol", &backend, "vol", &src, "");
    let s = fx.json(&["backup", "vol"]);
    assert!(
        s["warnings"].to_string().contains("project-nightingale.sock"),
        "the backup still says what it skipped: {s}"
    );
    let listed = fx.json(&["snapshots", "vol"]);
    assert_eq!(listed[0]["warning-count"], 1, "{listed}");
    for e in walkdir::WalkDir::new(backend.dir.path()).into_iter().flatten().filter(|e| e.file_type().is_file()) {
        let b = std::fs::read(e.path()).unwrap();
        assert!(
            !String::from_utf8_lossy(&b).contains("nightingale"),
            "{} names the path in plaintext",
            e.path().display()
        );
    }
}

fn fake_segment(path: &Path, seed: u8) {
    let mut b = vec![seed; 64 << 10];
    b[0..4].copy_from_slice(&[0x10, 0xD1, 0x02, 0x00]);
    b[24..32].copy_from_slice(&7446051981417284374u64.to_le_bytes());
    std::fs::write(path, b).unwrap();
}

/// Anyone with write access to the bucket (a compromised backup host too) could add a key, a
/// manifest and a sidecar with a newer start: `restore latest` and the drills took it, and
/// forged WAL replayed. With `[trust] writers` pinned, only what a trusted host signed counts.
#[test]
fn only_pinned_writers_are_restored() {
    let backend = Backend::start(Kind::File);
    let fx = Fixture::new(&backend);
    let (src, evil) = (fx.path("src"), fx.path("evil"));
    small_tree(&src);
    std::fs::create_dir_all(evil.join("conf")).unwrap();
    std::fs::write(evil.join("conf/app.yaml"), "listen: 6666 # the attacker's\n").unwrap();
    fx.volume_policy("vol", &backend, "vol", &src, "");
    let mine = fx.json(&["backup", "vol"]);
    let me = fx.ok(&["keygen", "--signing"]).trim().to_string();
    // The forger: the same repository and recipients, its own host key, its own tree.
    let forger_dir = fx.path("forger");
    std::fs::create_dir_all(forger_dir.join("policies")).unwrap();
    let text = std::fs::read_to_string(fx.path("policies/vol.toml"))
        .unwrap()
        .replace(&src.display().to_string(), &evil.display().to_string());
    std::fs::write(forger_dir.join("policies/vol.toml"), text).unwrap();
    let forger = |args: &[&str]| {
        let mut c = std::process::Command::new(bin());
        c.arg("--policies")
            .arg(forger_dir.join("policies"))
            .arg("--state-dir")
            .arg(forger_dir.join("state"))
            .args(args);
        for (k, v) in &fx.env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let o = forger(&["backup", "vol", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let forged: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let them = String::from_utf8(forger(&["keygen", "--signing"]).stdout).unwrap().trim().to_string();
    let seg = fx.path("000000010000000000000005");
    fake_segment(&seg, 1);
    fx.ok(&["wal-push", "vol", seg.to_str().unwrap()]);
    let fseg = fx.path("000000010000000000000006");
    fake_segment(&fseg, 2);
    assert!(forger(&["wal-push", "vol", fseg.to_str().unwrap()]).status.success());
    let id = fx.identity.to_str().unwrap();

    // Nothing pinned: the forgery is what `latest` restores (the attack).
    let t = fx.path("t0");
    fx.ok(&["restore", "vol", "--target", t.to_str().unwrap(), "--identity", id]);
    assert!(std::fs::read_to_string(t.join("conf/app.yaml")).unwrap().contains("attacker"));

    // Pinned: latest is the newest trusted snapshot; the forgery is refused, naming its key.
    let p = fx.path("policies/vol.toml");
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, format!("{text}\n[trust]\nwriters = [\"{me}\"]\n")).unwrap();
    let t = fx.path("t1");
    let out = fx.ok(&["restore", "vol", "--target", t.to_str().unwrap(), "--identity", id, "--json"]);
    assert!(out.contains(mine["id"].as_str().unwrap()), "{out}");
    assert_eq!(std::fs::read_to_string(t.join("conf/app.yaml")).unwrap(), "listen: 8080\n");
    let o = fx.run(&[
        "restore",
        "vol",
        "--snapshot",
        forged["id"].as_str().unwrap(),
        "--target",
        fx.path("t2").to_str().unwrap(),
        "--identity",
        id,
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains(&format!("is signed by {them}, not by a trusted writer")), "{}", stderr(&o));
    let o = fx.run(&["verify", "vol"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stdout(&o).contains(&format!("signed by {them}")), "{}", stdout(&o));
    let o = fx.run(&["drill", "vol", "--identity", id, "--report-dir", fx.path("rep").to_str().unwrap(), "--json"]);
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(r["snapshot"], mine["id"], "the drill took the forgery: {r}");

    // WAL: the trusted segment is served, the forged one refused naming its key.
    let dest = fx.path("w");
    fx.ok(&[
        "wal-fetch",
        "vol",
        "000000010000000000000005",
        dest.to_str().unwrap(),
        "--identity",
        id,
        "--prefetch",
        "0",
    ]);
    assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(&seg).unwrap());
    let o = fx.run(&[
        "wal-fetch",
        "vol",
        "000000010000000000000006",
        dest.to_str().unwrap(),
        "--identity",
        id,
        "--prefetch",
        "0",
    ]);
    assert_eq!(o.status.code(), Some(255), "{}", stderr(&o));
    assert!(stderr(&o).contains(&format!("WAL file 000000010000000000000006 is signed by {them}")), "{}", stderr(&o));

    // Unsigned WAL (a host whose key cannot be read): archived all the same, without the
    // signature header; served where no writers are pinned, refused where they are.
    let useg = fx.path("000000010000000000000007");
    fake_segment(&useg, 3);
    let nokey = fx.path("nokey-state");
    std::fs::create_dir_all(&nokey).unwrap();
    std::fs::write(nokey.join("signing.key"), "not a key").unwrap();
    let mut c = std::process::Command::new(bin());
    c.arg("--policies").arg(fx.path("policies")).arg("--state-dir").arg(&nokey);
    for (k, v) in &fx.env {
        c.env(k, v);
    }
    let o = c.args(["wal-push", "vol", useg.to_str().unwrap()]).output().unwrap();
    assert!(o.status.success() && stderr(&o).contains("WAL is pushed unsigned"), "{}", stderr(&o));
    let udest = fx.path("u");
    let fetch =
        ["wal-fetch", "vol", "000000010000000000000007", udest.to_str().unwrap(), "--identity", id, "--prefetch", "0"];
    let o = forger(&fetch);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&udest).unwrap(), std::fs::read(&useg).unwrap());
    let o = fx.run(&fetch);
    assert_eq!(o.status.code(), Some(255), "{}", stderr(&o));
    assert!(stderr(&o).contains("WAL file 000000010000000000000007 is not signed"), "{}", stderr(&o));

    // A trusted sidecar altered in the bucket (or stripped of its signature) is refused too.
    let (rt, store, _d) = fx.raw_store(&backend, "vol", "vol");
    let key = format!("snapshots/{}.json", mine["id"].as_str().unwrap());
    let mut side: serde_json::Value = serde_json::from_slice(&rt.block_on(store.get(&key)).unwrap()).unwrap();
    side["started"] = "2099-01-01T00:00:00Z".into();
    rt.block_on(store.put(&key, bytes::Bytes::from(serde_json::to_vec(&side).unwrap()))).unwrap();
    let o = fx.run(&[
        "restore",
        "vol",
        "--snapshot",
        mine["id"].as_str().unwrap(),
        "--target",
        fx.path("t3").to_str().unwrap(),
        "--identity",
        id,
    ]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("does not match its signature"), "{}", stderr(&o));
}

/// After a full run (backup, the daemon drilling, a runbook using a secret), none of the
/// known secret values is in a log, a report, the audit log, the job history, /status or
/// /metrics.
#[test]
fn secrets_never_reach_logs_reports_or_status() {
    let backend = Backend::start(Kind::Garage);
    let mut fx = Fixture::new(&backend);
    let src = fx.path("src");
    small_tree(&src);
    let key_text = std::fs::read_to_string(&fx.identity).unwrap();
    let age_key = key_text.lines().find(|l| l.starts_with("AGE-SECRET-KEY-")).unwrap().to_string();
    let token = "tok-8c1f0e5a9b7d";
    fx.env.push(("VEZA_TEST_IDENTITY".into(), key_text));
    fx.env.push(("TEST_TOKEN".into(), token.into()));
    fx.volume_policy("vol", &backend, "vol", &src, "");
    let p = fx.path("policies/vol.toml");
    let text = std::fs::read_to_string(&p).unwrap().replace(
        "[encryption]\n",
        "[schedule]\nverify = \"*/2 * * * * *\"\n[encryption]\nidentity = \"env:VEZA_TEST_IDENTITY\"\n",
    );
    std::fs::write(&p, text).unwrap();
    let port = free_port();
    std::fs::write(
        fx.path("policies/books.toml"),
        format!("[[runbook]]\nname = \"ping\"\nsecrets = {{ token = \"env:TEST_TOKEN\" }}\n[[runbook.step]]\nname = \"call\"\nplugin = \"fixture\"\nwith = {{ mode = \"http\", url = \"http://127.0.0.1:{port}/healthz\", header = \"X-Token: ${{secret:token}}\", needs-secret = \"token\" }}\ngrants = {{ http = [\"127.0.0.1\"], secrets = [\"token\"] }}\n"),
    )
    .unwrap();
    let mut outputs = String::new();
    outputs += &fx.ok(&["backup", "vol"]);
    let daemon = fx
        .cmd(&["daemon", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--plugins")
        .arg(crate::runbook::plugins_dir())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while fx.json(&["drills", "vol"]).as_array().unwrap().is_empty() {
        assert!(t.elapsed() < std::time::Duration::from_secs(60), "no drill");
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    outputs += &http_full(port, "GET", "/status").1;
    outputs += &http_full(port, "GET", "/metrics").1;
    let o =
        fx.cmd(&["failover", "ping", "--yes"]).arg("--plugins").arg(crate::runbook::plugins_dir()).output().unwrap();
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    outputs += &stdout(&o);
    outputs += &stderr(&o);
    outputs += &fx.ok(&["drills", "vol", "--json"]);
    outputs += &fx.ok(&["history", "vol", "--json"]);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let d = daemon.wait_with_output().unwrap();
    outputs += &stderr(&d);
    let secrets = [GARAGE_SECRET, age_key.as_str(), token];
    for s in secrets {
        assert!(!outputs.contains(s), "a secret reached the output, /status or /metrics");
    }
    for e in walkdir::WalkDir::new(fx.path("state")).into_iter().flatten().filter(|e| e.file_type().is_file()) {
        let b = String::from_utf8_lossy(&std::fs::read(e.path()).unwrap()).into_owned();
        for s in secrets {
            assert!(!b.contains(s), "a secret is in {}", e.path().display());
        }
    }
    let audit = std::fs::read_to_string(fx.path("state/runbooks/audit.log")).unwrap();
    assert!(audit.contains("\"call\""), "the runbook ran: {audit}");
}
