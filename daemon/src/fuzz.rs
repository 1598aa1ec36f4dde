//! Entry points for fuzzers: each takes arbitrary bytes as something veza-dr reads from
//! outside (a policy file, a sidecar, a manifest, a pack index, a sealed blob, WAL names and
//! object keys, a drill report, the chunk cache) and must never panic, whatever the bytes.
//! `fuzz/` runs them under libFuzzer (`cargo fuzz`); the tests below run a short mutation
//! fuzzer over the same entry points on every CI run.

use crate::repository::format::{Entry, EntryKind, Manifest, PackIndex, Sidecar};
use std::path::Path;

pub fn policy(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::policy::parse_document(Path::new("policies/fuzz.toml"), text);
    }
}

pub fn sidecar(data: &[u8]) {
    if let Ok(s) = serde_json::from_slice::<Sidecar>(data) {
        let _ = s.pg().map(|p| (p.start_wal.position(), p.stop_wal.next(p.wal_segment_size.max(1 << 20))));
    }
}

pub fn manifest(data: &[u8]) {
    if let Ok(m) = serde_json::from_slice::<Manifest>(data) {
        let files: Vec<&Entry> = m.entries.iter().filter(|e| e.kind == EntryKind::File).collect();
        let _ = crate::pipeline::tree::plan(&m, &files);
        for e in &m.entries {
            let _ = crate::pipeline::tree::safe_rel(&e.rel_path());
            let _ = e.target.as_deref().map(crate::repository::format::decode_os);
        }
    }
}

pub fn index(data: &[u8]) {
    let _ = serde_json::from_slice::<PackIndex>(data);
}

/// A sealed blob opened with a fixed identity: decrypt, decompress, check against an id.
pub fn blob(data: &[u8]) {
    thread_local! {
        static ID: crate::crypto::Identity = crate::crypto::Identity::from_x25519(age::x25519::Identity::generate());
    }
    let mut dz = zstd::bulk::Decompressor::new().expect("zstd");
    let raw = data.first().map(|b| *b as u32 * 1024).unwrap_or(0);
    ID.with(|id| {
        let _ = crate::pipeline::open_blob(
            id,
            &mut dz,
            &[7; 32],
            &[9; 32],
            raw,
            data,
            &"fuzz blob",
            &mut Default::default(),
        );
    });
}

/// WAL names and every object key parser.
pub fn names(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        use crate::repository::keys;
        if let Some(n) = crate::source::postgres::wal::WalName::parse(s) {
            let _ = (n.position(), n.segment_name(), n.next(16 << 20), n.timeline(), n.kind());
        }
        let _ = (keys::parse_wal(s), keys::parse_pack(s), keys::parse_index(s), keys::parse_sidecar(s));
        let _ = (keys::parse_manifest(s), keys::parse_wal_cluster(s));
        let _ = crate::source::postgres::wal::parse_lsn(s);
        let _ = crate::source::postgres::recovery::parse_time(s);
        let _ = crate::source::postgres::archive::segment_cluster(data);
    }
}

pub fn report(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = crate::jobs::drill::verify_report(s, &[]);
    }
}

pub fn chunk_cache(data: &[u8]) {
    let _ = crate::repository::state::decode_chunks(data);
}

/// One entry point: arbitrary bytes in, no panic out.
pub type Target = fn(&[u8]);

/// The entry points by name, for `fuzz/` and the tests.
pub const TARGETS: &[(&str, Target)] = &[
    ("policy", policy),
    ("sidecar", sidecar),
    ("manifest", manifest),
    ("index", index),
    ("blob", blob),
    ("names", names),
    ("report", report),
    ("chunk_cache", chunk_cache),
];

#[cfg(test)]
mod tests {
    /// Seeds: real inputs of each kind, which the mutations start from.
    fn seeds(target: &str) -> Vec<Vec<u8>> {
        let text = |s: &str| s.as_bytes().to_vec();
        match target {
            "policy" => vec![
                text(include_str!("../../policies/db.toml")),
                text(include_str!("../../policies/uploads.toml")),
                text(include_str!("../../policies/failover.toml")),
            ],
            "sidecar" => vec![text(
                r#"{"format":2,"id":"20261201T101010Z-abcdef","policy":"db","kind":"full","source":"postgres-physical","host":"h","started":"2026-12-01T10:10:10Z","finished":"2026-12-01T10:10:12Z","parent":null,"packs":[{"id":"abababababababababababababababababababababababababababababababab","size":10}],"manifest-size":5,"stats":{"files":1,"dirs":1,"bytes":1,"files-read":1,"bytes-read":1,"chunks-new":1,"bytes-new":1,"bytes-uploaded":1,"files-changed-during-read":0,"skipped":0},"postgres":{"version":150000,"system-identifier":"7446051981417284374","timeline":1,"start-lsn":"0/3000028","stop-lsn":"0/3000100","start-wal":"000000010000000000000003","stop-wal":"000000010000000000000003","stop-time":"2026-12-01T10:10:12Z","wal-segment-size":16777216,"data-dir":"/d"}}"#,
            )],
            "manifest" => vec![text(
                r#"{"format":2,"snapshot":"20261201T101010Z-abcdef","policy":"p","key-id":"k","source-path":"/s","packs":["abababababababababababababababababababababababababababababababab"],"chunks":[["abababababababababababababababababababababababababababababababab",0,0,10,20]],"entries":[{"path":".","kind":"dir","mode":493,"uid":0,"gid":0,"mtime":1,"mtime-ns":0},{"path":"a/b","kind":"file","mode":420,"uid":0,"gid":0,"mtime":1,"mtime-ns":0,"size":20,"chunks":[0,0]},{"path":"l","kind":"symlink","mode":511,"uid":0,"gid":0,"mtime":1,"mtime-ns":0,"target":"hex:2f6574"}],"extra":null}"#,
            )],
            "index" => vec![text(r#"{"chunks":[{"id":"ab","off":0,"len":10,"raw":20}]}"#)],
            "names" => vec![
                text("000000010000000000000003"),
                text("00000002.history"),
                text("000000010000000000000002.00000028.backup"),
                text("wal/7446051981417284374/00000001/000000010000000000000003/0123456789abcdef0123456789abcdef"),
                text("data/ab/abababababababababababababababababababababababababababababababab"),
                text("snapshots/20261201T101010Z-abcdef.json"),
                text("2026-12-01 10:02:10.269957+00"),
                text("16/B374D848"),
            ],
            "report" => vec![text(
                r#"{"format":1,"id":"x","policy":"p","host":"h","started":"2026-12-01T10:10:10Z","finished":"2026-12-01T10:10:10Z","verdict":"pass","failure":null,"snapshot":null,"wal-from":null,"recovered-lsn":null,"last-transaction":null,"choice":"newest","phases":[],"checks":[],"rto":{"measured-seconds":1.0,"objective-seconds":null,"verdict":"not-set"},"rpo":{"measured-seconds":null,"objective-seconds":null,"verdict":"not-set"},"signature":{"algorithm":"ed25519","public-key":"00","value":"00"}}"#,
            )],
            _ => vec![vec![0u8; 120], b"VZCHUNK2".to_vec()],
        }
    }

    /// A few thousand mutations (flips, cuts, insertions, splices) of every seed, for about
    /// a second per target: enough to keep the entry points honest on every CI run.
    #[test]
    fn mini_fuzz_every_entry_point() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for (name, f) in super::TARGETS {
            let seeds = seeds(name);
            let t = std::time::Instant::now();
            let mut runs = 0u64;
            while t.elapsed() < std::time::Duration::from_millis(700) {
                let mut d = seeds[(next() % seeds.len() as u64) as usize].clone();
                for _ in 0..(next() % 4 + 1) {
                    let at = if d.is_empty() { 0 } else { (next() % d.len() as u64) as usize };
                    match next() % 5 {
                        0 if !d.is_empty() => d[at] ^= 1 << (next() % 8),
                        1 => d.truncate(at),
                        2 => d.insert(at, (next() % 256) as u8),
                        3 if !d.is_empty() => d[at] = b"\"{}[]:,0-9a\\\xc3"[(next() % 13) as usize],
                        _ => {
                            let other = seeds[(next() % seeds.len() as u64) as usize].clone();
                            let cut = (next() % (other.len() as u64 + 1)) as usize;
                            d.splice(at..at, other[..cut].iter().copied());
                        }
                    }
                }
                f(&d);
                runs += 1;
            }
            assert!(runs > 50, "{name}: only {runs} runs");
        }
    }
}
