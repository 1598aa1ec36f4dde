//! WAL file names and LSNs: every name that comes from outside (archive_command's %p,
//! restore_command's %f, object keys under `wal/`) becomes a [`WalName`] through one parser,
//! so no code slices unchecked text.

use std::fmt;

/// A file PostgreSQL archives: a segment, a timeline history, a backup history or a partial
/// segment. Only ASCII hex digits in fixed positions, so slicing the parts is always safe.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WalName(String);

impl TryFrom<String> for WalName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        WalName::parse(&s).ok_or_else(|| format!("`{s}` is not a WAL file name"))
    }
}

impl From<WalName> for String {
    fn from(n: WalName) -> String {
        n.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalKind {
    /// `TTTTTTTTXXXXXXXXYYYYYYYY`
    Segment,
    /// `TTTTTTTT.history`
    History,
    /// `TTTTTTTTXXXXXXXXYYYYYYYY.OOOOOOOO.backup`
    Backup,
    /// `TTTTTTTTXXXXXXXXYYYYYYYY.partial`
    Partial,
}

fn hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl WalName {
    /// Parse a name; `None` for anything PostgreSQL would not archive.
    pub fn parse(name: &str) -> Option<WalName> {
        // Every valid form is ASCII, so byte lengths and byte slices below are char-safe.
        if !name.is_ascii() {
            return None;
        }
        let ok = match name.len() {
            24 => hex(name),
            16 => name.ends_with(".history") && hex(&name[..8]),
            32 => name.ends_with(".partial") && hex(&name[..24]),
            40 => name.ends_with(".backup") && hex(&name[..24]) && &name[24..25] == "." && hex(&name[25..33]),
            _ => false,
        };
        ok.then(|| WalName(name.to_string()))
    }

    /// A segment name from its parts.
    pub fn segment(tli: u32, log: u64, seg: u64) -> WalName {
        WalName(format!("{tli:08X}{log:08X}{seg:08X}"))
    }

    /// The segment holding `lsn` on `tli`.
    pub fn for_lsn(tli: u32, lsn: u64, seg_size: u64) -> WalName {
        let seg = lsn / seg_size;
        let per_log = 0x1_0000_0000 / seg_size;
        WalName::segment(tli, seg / per_log, seg % per_log)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn kind(&self) -> WalKind {
        match self.0.len() {
            24 => WalKind::Segment,
            16 => WalKind::History,
            32 => WalKind::Partial,
            _ => WalKind::Backup,
        }
    }

    /// The timeline as its 8 hex digits.
    pub fn timeline_hex(&self) -> &str {
        &self.0[..8]
    }

    pub fn timeline(&self) -> u32 {
        u32::from_str_radix(&self.0[..8], 16).unwrap_or(0)
    }

    /// The position of the segment a name refers to (log and segment number as one string),
    /// comparable across timelines; `None` for history files.
    pub fn position(&self) -> Option<&str> {
        (self.kind() != WalKind::History).then(|| &self.0[8..24])
    }

    /// The segment a segment, backup or partial name refers to.
    pub fn segment_name(&self) -> Option<WalName> {
        self.position().map(|_| WalName(self.0[..24].to_string()))
    }

    /// The LSN where a segment starts (segments only).
    pub fn start_lsn(&self, seg_size: u64) -> Option<u64> {
        if self.kind() != WalKind::Segment || seg_size == 0 {
            return None;
        }
        let log = u64::from_str_radix(&self.0[8..16], 16).ok()?;
        let seg = u64::from_str_radix(&self.0[16..24], 16).ok()?;
        log.checked_mul(0x1_0000_0000)?.checked_add(seg.checked_mul(seg_size)?)
    }

    /// The next segment on the same timeline (segments only).
    pub fn next(&self, seg_size: u64) -> Option<WalName> {
        if self.kind() != WalKind::Segment {
            return None;
        }
        let log = u64::from_str_radix(&self.0[8..16], 16).ok()?;
        let seg = u64::from_str_radix(&self.0[16..24], 16).ok()?;
        let per_log = 0x1_0000_0000 / seg_size;
        let (log, seg) = if seg + 1 >= per_log { (log + 1, 0) } else { (log, seg + 1) };
        Some(WalName::segment(self.timeline(), log, seg))
    }
}

impl fmt::Display for WalName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

pub fn format_lsn(l: u64) -> String {
    format!("{:X}/{:X}", l >> 32, l & 0xffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_archived_file_names() {
        for ok in [
            "000000010000000000000003",
            "00000002.history",
            "000000010000000000000002.00000028.backup",
            "000000010000000000000002.partial",
        ] {
            assert_eq!(WalName::parse(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "RECOVERYXLOG",
            "../../etc/passwd",
            "AAAAAAAAAAAAAAAAAAAAAAAéBBBBBBBB.backup",
            "AAAAAAAAAAAAAAAé",
            "0000000100000000000000é3",
            "",
            "00000001000000000000000",
            "000000010000000000000002x00000028.backup",
            "0000000100000000000000020000002800000000",
        ] {
            assert!(WalName::parse(bad).is_none(), "{bad} accepted");
        }
    }

    #[test]
    fn wal_names_follow_postgres() {
        assert_eq!(WalName::for_lsn(1, parse_lsn("0/3000028").unwrap(), 16 << 20).as_str(), "000000010000000000000003");
        assert_eq!(
            WalName::for_lsn(2, parse_lsn("1/FF000000").unwrap(), 16 << 20).as_str(),
            "0000000200000001000000FF"
        );
        let n = WalName::parse("0000000100000001000000FF").unwrap();
        assert_eq!(n.next(16 << 20).unwrap().as_str(), "000000010000000200000000");
        assert_eq!(format_lsn(parse_lsn("16/B374D848").unwrap()), "16/B374D848");
        let b = WalName::parse("000000010000000000000002.00000028.backup").unwrap();
        assert_eq!(b.segment_name().unwrap().as_str(), "000000010000000000000002");
        assert!(b.next(16 << 20).is_none());
        assert_eq!(WalName::parse("00000002.history").unwrap().position(), None);
    }
}
