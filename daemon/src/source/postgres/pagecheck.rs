//! Page checksums checked while a physical backup reads the data directory, as PostgreSQL
//! computes them (`pg_checksum_page`: 32 parallel FNV-1a lanes over the 8 KiB page with its
//! checksum field zeroed, folded, XORed with the block number, reduced to 1..=65535).
//!
//! A page fails when its checksum does not match and its LSN is older than the backup's start:
//! a page written during the backup may be torn in our copy, and WAL replay from the start
//! rewrites it, so only a page nobody touched since the start is evidence of damage. A new
//! page (`pd_upper == 0`) must be all zeros. A short last page (a file being extended) is
//! not checked.

/// PostgreSQL's page size (veza-dr assumes the default build).
pub const BLCKSZ: usize = 8192;
/// Blocks per relation segment file (1 GiB segments).
pub const SEGMENT_BLOCKS: u64 = (1 << 30) / BLCKSZ as u64;

const N_SUMS: usize = 32;
const FNV_PRIME: u32 = 16777619;
const BASE_OFFSETS: [u32; N_SUMS] = [
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C, 0xF8D4474F,
    0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB, 0xE58F764B, 0x187636BC,
    0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4, 0x783125BB, 0x6CA8EAA2, 0xE407EAC6,
    0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
];

#[inline]
fn comp(sum: &mut u32, value: u32) {
    let t = *sum ^ value;
    *sum = t.wrapping_mul(FNV_PRIME) ^ (t >> 17);
}

/// The checksum PostgreSQL stores in `pd_checksum` for `page` at block `blkno` (of the
/// relation fork, counted across segment files).
pub fn checksum(page: &[u8], blkno: u32) -> u16 {
    debug_assert_eq!(page.len(), BLCKSZ);
    let mut sums = BASE_OFFSETS;
    for (row, words) in page.chunks_exact(4 * N_SUMS).enumerate() {
        for (j, w) in words.chunks_exact(4).enumerate() {
            let mut v = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            // The checksum field (bytes 8..10, the low half of word 2) counts as zero.
            if row == 0 && j == 2 {
                v &= 0xFFFF_0000;
            }
            comp(&mut sums[j], v);
        }
    }
    for _ in 0..2 {
        for s in sums.iter_mut() {
            comp(s, 0);
        }
    }
    let folded = sums.iter().fold(0u32, |a, s| a ^ s) ^ blkno;
    ((folded % 65535) + 1) as u16
}

/// A page's `pd_lsn` (the first 8 bytes of a whole page).
pub fn lsn(page: &[u8]) -> u64 {
    let hi = u32::from_le_bytes([page[0], page[1], page[2], page[3]]) as u64;
    let lo = u32::from_le_bytes([page[4], page[5], page[6], page[7]]) as u64;
    hi << 32 | lo
}

/// The block numbers of the pages in `data` that fail. `data` starts at block `first` of its
/// fork and at a page boundary; `start_lsn` is the backup's start.
pub fn failing_pages(data: &[u8], first: u64, start_lsn: u64) -> Vec<u64> {
    let mut bad = Vec::new();
    for (i, page) in data.chunks_exact(BLCKSZ).enumerate() {
        let blkno = first + i as u64;
        let upper = u16::from_le_bytes([page[14], page[15]]);
        if upper == 0 {
            if page.iter().any(|&b| b != 0) {
                bad.push(blkno);
            }
            continue;
        }
        if lsn(page) >= start_lsn {
            continue;
        }
        let stored = u16::from_le_bytes([page[8], page[9]]);
        if checksum(page, blkno as u32) != stored {
            bad.push(blkno);
        }
    }
    bad
}

/// For a path relative to the data directory, the first block number of the file if it is a
/// relation segment (`base/<db>/<rel>[_fork][.N]`, `global/<rel>…`, or a tablespace's
/// `pg_tblspc/<oid>/<version dir>/<db>/<rel>…`), else `None`.
pub fn first_block(rel: &str) -> Option<u64> {
    relation(rel).map(|(first, _)| first)
}

/// A relation segment's first block number and whether it belongs to the main fork (not
/// `_fsm`, `_vm` or `_init`), or `None` for a file that is not a relation segment.
pub fn relation(rel: &str) -> Option<(u64, bool)> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let parts: Vec<&str> = rel.split('/').collect();
    let file = match parts.as_slice() {
        ["global", f] => *f,
        ["base", db, f] if digits(db) => *f,
        ["pg_tblspc", oid, ver, db, f] if digits(oid) && ver.starts_with("PG_") && digits(db) => *f,
        _ => return None,
    };
    let (stem, seg) = match file.split_once('.') {
        Some((stem, n)) if digits(n) => (stem, n.parse::<u64>().ok()?),
        Some(_) => return None,
        None => (file, 0),
    };
    let rel = stem.strip_suffix("_fsm").or(stem.strip_suffix("_vm")).or(stem.strip_suffix("_init")).unwrap_or(stem);
    digits(rel).then(|| (seg * SEGMENT_BLOCKS, rel.len() == stem.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relation_files_and_their_first_block() {
        assert_eq!(first_block("base/5/16384"), Some(0));
        assert_eq!(first_block("base/5/16384.2"), Some(2 * SEGMENT_BLOCKS));
        assert_eq!(first_block("base/5/16384_fsm"), Some(0));
        assert_eq!(first_block("global/1262"), Some(0));
        assert_eq!(first_block("pg_tblspc/16400/PG_15_202209061/5/16385.1"), Some(SEGMENT_BLOCKS));
        assert_eq!(relation("base/5/16384.1"), Some((SEGMENT_BLOCKS, true)));
        assert_eq!(relation("base/5/16384_vm"), Some((0, false)));
        for no in [
            "base/5/pg_filenode.map",
            "base/5/t3_16384",
            "global/pg_control",
            "base/5/16384.x",
            "pg_wal/000000010000000000000001",
            "base/x/1",
            "base/5/16384_foo",
        ] {
            assert_eq!(first_block(no), None, "{no}");
        }
    }

    #[test]
    fn new_pages_and_pages_newer_than_the_start_pass() {
        let zero = vec![0u8; 2 * BLCKSZ];
        assert!(failing_pages(&zero, 0, 100).is_empty());
        let mut p = vec![0u8; BLCKSZ];
        p[100] = 1; // pd_upper 0 but not all zero: a damaged new page
        assert_eq!(failing_pages(&p, 7, 100), vec![7]);
        let mut p = vec![0u8; BLCKSZ];
        p[14] = 0x20; // pd_upper set, checksum wrong
        p[4] = 200; // LSN 200 >= start 100: written during the backup, not judged
        assert!(failing_pages(&p, 0, 100).is_empty());
        p[4] = 50;
        assert_eq!(failing_pages(&p, 0, 100), vec![0]);
        let c = checksum(&p, 0);
        p[8..10].copy_from_slice(&c.to_le_bytes());
        assert!(failing_pages(&p, 0, 100).is_empty(), "a page with its own checksum passes");
        // The checksum depends on the block number and on every byte but its own field.
        assert_ne!(checksum(&p, 1), c);
        p[8] ^= 0xff;
        assert_eq!(checksum(&p, 0), c);
    }
}
