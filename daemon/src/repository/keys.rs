//! Every object key of the repository is built (and parsed back) here, and nowhere else.
//! Parsers take untrusted listing output and return `None` for anything that is not exactly
//! the shape this module builds, so a stray object never reaches code that slices names.

use super::format::{PackId, SnapshotId};
use crate::source::postgres::wal::WalName;

pub const CONFIG: &str = "config";
pub const KEYS: &str = "keys/";
pub const DATA: &str = "data/";
pub const INDEX: &str = "index/";
pub const SNAPSHOTS: &str = "snapshots/";
pub const LOCKS: &str = "locks/";
pub const WAL: &str = "wal/";
pub const REPORTS: &str = "reports/";
pub const MARKS: &str = "prune/marks.json";

/// `keys/<key-id>`: a chunk-id key sealed to the recipients.
pub fn chunk_key(key_id: &str) -> String {
    format!("{KEYS}{key_id}")
}

/// `data/<first two hex digits>/<pack-id>`.
pub fn pack(id: &PackId) -> String {
    let h = hex::encode(id);
    format!("{DATA}{}/{h}", &h[..2])
}

/// `index/<pack-id>`.
pub fn index(id: &PackId) -> String {
    format!("{INDEX}{}", hex::encode(id))
}

pub fn sidecar(snap: &SnapshotId) -> String {
    format!("{SNAPSHOTS}{snap}.json")
}

pub fn manifest(snap: &SnapshotId) -> String {
    format!("{SNAPSHOTS}{snap}.manifest")
}

pub fn lock(id: &str) -> String {
    format!("{LOCKS}{id}.json")
}

/// `wal/<system identifier>/`: the WAL of one cluster.
pub fn wal_cluster(cluster: u64) -> String {
    format!("{WAL}{cluster}/")
}

/// `wal/<system identifier>/<timeline>/<name>/`: the folder holding the one object of a WAL file.
pub fn wal_dir(cluster: u64, name: &WalName) -> String {
    format!("{WAL}{cluster}/{}/{name}/", name.timeline_hex())
}

/// `wal/<system identifier>/<timeline>/<name>/<fingerprint>`.
pub fn wal_object(cluster: u64, name: &WalName, fingerprint: &str) -> String {
    format!("{}{fingerprint}", wal_dir(cluster, name))
}

/// A cluster folder (`wal/<system identifier>/`, as a delimited listing returns it) to its id.
pub fn parse_wal_cluster(prefix: &str) -> Option<u64> {
    let id = prefix.strip_prefix(WAL)?.trim_end_matches('/');
    (!id.is_empty() && id.len() <= 20 && id.bytes().all(|b| b.is_ascii_digit())).then(|| id.parse().ok())?
}

/// `reports/<policy>/` and `reports/<policy>/<id>.<ext>`.
pub fn reports(policy: &str) -> String {
    format!("{REPORTS}{policy}/")
}

pub fn report(policy: &str, id: &str, ext: &str) -> String {
    format!("{REPORTS}{policy}/{id}.{ext}")
}

fn hex32(s: &str) -> Option<PackId> {
    if s.len() != 64 {
        return None;
    }
    hex::decode(s).ok()?.try_into().ok()
}

/// A pack key back to its id, if it is exactly one this module builds.
pub fn parse_pack(key: &str) -> Option<PackId> {
    let rest = key.strip_prefix(DATA)?;
    let (dir, h) = rest.split_once('/')?;
    let id = hex32(h)?;
    (dir.len() == 2 && h.starts_with(dir)).then_some(id)
}

pub fn parse_index(key: &str) -> Option<PackId> {
    hex32(key.strip_prefix(INDEX)?)
}

/// `snapshots/<id>.json` back to the id.
pub fn parse_sidecar(key: &str) -> Option<SnapshotId> {
    SnapshotId::parse(key.strip_prefix(SNAPSHOTS)?.strip_suffix(".json")?)
}

pub fn parse_manifest(key: &str) -> Option<SnapshotId> {
    SnapshotId::parse(key.strip_prefix(SNAPSHOTS)?.strip_suffix(".manifest")?)
}

/// `wal/<system identifier>/<timeline>/<name>/<fingerprint>` back to its parts.
pub fn parse_wal(key: &str) -> Option<(u64, WalName, String)> {
    let mut parts = key.strip_prefix(WAL)?.split('/');
    let (cluster, tli, name, fp) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || fp.len() != 32 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let cluster = parse_wal_cluster(&format!("{WAL}{cluster}/"))?;
    let name = WalName::parse(name)?;
    (name.timeline_hex() == tli).then(|| (cluster, name, fp.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_back_and_strays_do_not() {
        let id = [0xab; 32];
        assert_eq!(parse_pack(&pack(&id)), Some(id));
        assert_eq!(parse_index(&index(&id)), Some(id));
        assert_eq!(parse_pack("data/zz/abab"), None);
        assert_eq!(parse_pack("data/é/x"), None);
        let n = WalName::parse("000000010000000000000003").unwrap();
        let fp = "0123456789abcdef0123456789abcdef";
        let sysid = 7446051981417284374;
        assert_eq!(parse_wal(&wal_object(sysid, &n, fp)), Some((sysid, n, fp.to_string())));
        assert_eq!(parse_wal_cluster(&wal_cluster(sysid)), Some(sysid));
        for stray in [
            "wal/1/00000001/AAAAAAAAAAAAAAAAAAAAAAAéBBBBBBBB.backup/0123456789abcdef0123456789abcdef",
            "wal/x",
            "wal/1/00000001/000000010000000000000003",
            "wal/00000001/000000010000000000000003/0123456789abcdef0123456789abcdef",
            "wal/1/00000002/000000010000000000000003/0123456789abcdef0123456789abcdef",
            "wal/99999999999999999999999/00000001/000000010000000000000003/0123456789abcdef0123456789abcdef",
            "wal/é/é/é/é",
        ] {
            assert_eq!(parse_wal(stray), None, "{stray}");
        }
        let s = SnapshotId::parse("20261201T101010Z-abcdef").unwrap();
        assert_eq!(parse_sidecar(&sidecar(&s)), Some(s.clone()));
        assert_eq!(parse_manifest(&manifest(&s)), Some(s));
        assert_eq!(parse_sidecar("snapshots/../x.json"), None);
    }
}
