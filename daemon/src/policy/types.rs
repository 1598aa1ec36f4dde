//! Value types of policies that validate themselves while being parsed, so that a bad value is
//! reported with the file, line and column of the value itself.

use serde::{Deserialize, Deserializer};
use std::str::FromStr;

/// A duration written as text: `90s`, `15m`, `1h`, `30d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub std::time::Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s.trim())
            .map(Dur)
            .map_err(|e| format!("`{s}` is not a duration ({e}); write e.g. `90s`, `15m`, `1h` or `30d`"))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for Dur {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// A byte size written as text (`16MiB`, `512KiB`, `1GB`) or a plain integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a size; write e.g. `16MiB`"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "K" => 1 << 10,
            "MiB" | "M" => 1 << 20,
            "GiB" | "G" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            u => return Err(format!("unknown size unit `{u}` in `{s}`; use B, KiB, MiB or GiB")),
        };
        n.checked_mul(mult).map(Size).ok_or_else(|| format!("size `{s}` is too large"))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Size(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A cron expression: standard 5 fields (minute hour day month weekday), or 6 with seconds first.
#[derive(Debug, Clone)]
pub struct CronExpr {
    pub text: String,
    pub schedule: cron::Schedule,
    /// The zone the fields are read in: UTC unless the policy's `[schedule] timezone` says.
    pub tz: chrono_tz::Tz,
}

impl CronExpr {
    /// The first slot strictly after `t`, read in the expression's timezone.
    pub fn next_after(&self, t: chrono::DateTime<chrono::Utc>) -> Option<chrono::DateTime<chrono::Utc>> {
        self.schedule.after(&t.with_timezone(&self.tz)).next().map(|d| d.with_timezone(&chrono::Utc))
    }
}

impl FromStr for CronExpr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts: Vec<String> = s.split_whitespace().map(str::to_string).collect();
        let fields = parts.len();
        if fields == 5 || fields == 6 {
            // Standard cron numbers weekdays 0-7 from Sunday (0 and 7 both Sunday); the cron
            // crate numbers them 1-7 from Sunday. Translate so that `1` means Monday.
            let dow = parts.last_mut().expect("5 or 6 fields");
            *dow = standard_weekdays(dow).map_err(|e| format!("cron expression `{s}`: {e}"))?;
        }
        let s_std = parts.join(" ");
        let full = match fields {
            5 => format!("0 {s_std}"),
            6 => s_std,
            n => return Err(format!("cron expression `{s}` has {n} fields; write 5 (minute hour day month weekday) or 6 (with seconds first)")),
        };
        let schedule = cron::Schedule::from_str(&full).map_err(|e| format!("cron expression `{s}` is invalid: {e}"))?;
        Ok(CronExpr { text: s.to_string(), schedule, tz: chrono_tz::UTC })
    }
}

/// Map standard weekday numbers (0-7, Sunday = 0 or 7) to the cron crate's (1-7, Sunday = 1).
fn standard_weekdays(field: &str) -> Result<String, String> {
    let map = |n: u32| -> Result<u32, String> {
        match n {
            0..=7 => Ok(n % 7 + 1),
            _ => Err(format!("weekday {n} is out of range 0-7")),
        }
    };
    let mut out = Vec::new();
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, st)) => (r, Some(st)),
            None => (item, None),
        };
        let mapped = match range.split_once('-') {
            Some((a, b)) if a.parse::<u32>().is_ok() && b.parse::<u32>().is_ok() => {
                let (a, b) = (map(a.parse().unwrap_or(0))?, b.parse::<u32>().unwrap_or(0));
                // `x-7` ends on Sunday: in the crate's numbering that is the end of the week.
                let b = if b == 7 { 7 } else { map(b)? };
                if b < a {
                    return Err(format!("weekday range `{range}` wraps around; write Sunday as 0 at the start"));
                }
                format!("{a}-{b}")
            }
            _ => match range.parse::<u32>() {
                Ok(n) => map(n)?.to_string(),
                Err(_) => range.to_string(),
            },
        };
        out.push(match step {
            Some(st) => format!("{mapped}/{st}"),
            None => mapped,
        });
    }
    Ok(out.join(","))
}

impl<'de> Deserialize<'de> for CronExpr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes_durations_and_crons() {
        assert_eq!("16MiB".parse::<Size>().unwrap().0, 16 << 20);
        assert_eq!("1000".parse::<Size>().unwrap().0, 1000);
        assert!("16 parsecs".parse::<Size>().is_err());
        assert_eq!("1h".parse::<Dur>().unwrap().0.as_secs(), 3600);
        assert_eq!("30d".parse::<Dur>().unwrap().0.as_secs(), 30 * 86400);
        assert!("0 3 * * *".parse::<CronExpr>().is_ok());
        assert!("*/5 * * * * *".parse::<CronExpr>().is_ok());
        assert!("0 3 * *".parse::<CronExpr>().is_err());
        assert!("0 25 * * *".parse::<CronExpr>().is_err());
        // Weekdays are standard: 1 is Monday, 0 and 7 are Sunday.
        let monday_3am = "0 3 * * 1".parse::<CronExpr>().unwrap();
        let after: chrono::DateTime<chrono::Utc> = "2026-11-21T12:00:00Z".parse().unwrap(); // a Saturday
        let next = monday_3am.schedule.after(&after).next().unwrap();
        assert_eq!(next.to_rfc3339(), "2026-11-23T03:00:00+00:00");
        for sunday in ["0 3 * * 0", "0 3 * * 7", "0 3 * * SUN"] {
            let next = sunday.parse::<CronExpr>().unwrap().schedule.after(&after).next().unwrap();
            assert_eq!(next.to_rfc3339(), "2026-11-22T03:00:00+00:00", "{sunday}");
        }
        let weekdays = "0 3 * * 1-5".parse::<CronExpr>().unwrap().schedule.after(&after).next().unwrap();
        assert_eq!(weekdays.to_rfc3339(), "2026-11-23T03:00:00+00:00");
    }
}
