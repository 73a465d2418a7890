//! Retention policies as users and operators type and read them (`/retention 24h`,
//! `server retention --set 7d,5000`).
//!
//! The node checks the same bounds again and applies the policy; see chat-sm's `retention.rs`
//! for what expires and when.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Shortest retention age accepted: one minute.
pub const RETENTION_AGE_MIN_MS: u64 = 60 * 1000;
/// Longest retention age accepted: 100 years (beyond that, say "forever").
pub const RETENTION_AGE_MAX_MS: u64 = 100 * 365 * 24 * 60 * 60 * 1000;

/// A retention policy: messages older than `max_age_ms` expire, and only the newest
/// `max_count` are kept; neither set means "keep forever".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Retention {
    /// Oldest message age kept, in ms (by the leader's clock).
    pub max_age_ms: Option<u64>,
    /// Most messages kept.
    pub max_count: Option<u64>,
}

impl Retention {
    /// Keep everything.
    pub const FOREVER: Retention = Retention {
        max_age_ms: None,
        max_count: None,
    };

    /// Parses a policy: `forever` (or `off`), an age such as `90m`, `24h`, `7d`, `2w`, a
    /// message count such as `1000`, or both joined by `,` (`7d,5000`). Bounds: an age from
    /// one minute to 100 years, a count of at least 1.
    ///
    /// # Errors
    /// A sentence saying what is wrong and what is accepted.
    pub fn parse(text: &str) -> Result<Retention, String> {
        parse(text)
    }
}

/// "forever", "24h", "1000 messages", "7d or 5000 messages".
impl fmt::Display for Retention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.max_age_ms, self.max_count) {
            (None, None) => f.write_str("forever"),
            (Some(age), None) => f.write_str(&format_age(age)),
            (None, Some(n)) => write!(f, "{n} messages"),
            (Some(age), Some(n)) => write!(f, "{} or {n} messages", format_age(age)),
        }
    }
}

/// An age in the largest unit that divides it: "7d", "36h", "90m", "61s".
fn format_age(ms: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (24 * 60 * 60 * 1000, "d"),
        (60 * 60 * 1000, "h"),
        (60 * 1000, "m"),
        (1000, "s"),
    ];
    for (unit, name) in UNITS {
        if ms.is_multiple_of(unit) {
            return format!("{}{name}", ms / unit);
        }
    }
    format!("{ms}ms")
}

/// Parses a policy as operators and users type it: `forever` (or `off`), an age such as
/// `90m`, `24h`, `7d`, `2w`, a count such as `1000` or `1000msgs`, or both joined by `,`
/// (`7d,5000`). The result is validated.
///
/// # Errors
/// A sentence saying what is wrong and what is accepted.
fn parse(text: &str) -> Result<Retention, String> {
    let text = text.trim().to_ascii_lowercase();
    if text == "forever" || text == "off" {
        return Ok(Retention::FOREVER);
    }
    let mut policy = Retention::FOREVER;
    for part in text.split(',').map(str::trim) {
        let bad = || {
            format!(
                "cannot read retention {part:?}: use an age (90m, 24h, 7d, 2w), a message count \
                 (1000), both (7d,1000), or forever"
            )
        };
        let digits = part.trim_end_matches(|c: char| !c.is_ascii_digit());
        let unit = &part[digits.len()..];
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let unit_ms: Option<u64> = match unit {
            "" | "msgs" | "messages" | "msg" => None,
            "s" => Some(1000),
            "m" | "min" => Some(60 * 1000),
            "h" => Some(60 * 60 * 1000),
            "d" => Some(24 * 60 * 60 * 1000),
            "w" => Some(7 * 24 * 60 * 60 * 1000),
            _ => return Err(bad()),
        };
        match unit_ms {
            Some(ms) if policy.max_age_ms.is_none() => {
                policy.max_age_ms = Some(n.checked_mul(ms).ok_or_else(bad)?)
            }
            None if policy.max_count.is_none() => policy.max_count = Some(n),
            _ => return Err(format!("retention {text:?} gives the same limit twice")),
        }
    }
    let valid_age = policy
        .max_age_ms
        .is_none_or(|a| (RETENTION_AGE_MIN_MS..=RETENTION_AGE_MAX_MS).contains(&a));
    if !valid_age || policy.max_count == Some(0) {
        return Err(format!(
            "retention {text:?} is out of bounds: an age from 1m to 100 years, a count of at \
             least 1"
        ));
    }
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    #[test_case("24h" => Ok(Retention { max_age_ms: Some(86_400_000), max_count: None }))]
    #[test_case("1000" => Ok(Retention { max_age_ms: None, max_count: Some(1000) }))]
    #[test_case("7d, 500msgs" => Ok(Retention { max_age_ms: Some(604_800_000), max_count: Some(500) }))]
    #[test_case("forever" => Ok(Retention::FOREVER))]
    #[test_case("OFF" => Ok(Retention::FOREVER))]
    fn parses(text: &str) -> Result<Retention, String> {
        Retention::parse(text)
    }

    #[test_case("" ; "empty")]
    #[test_case("24x" ; "unknown unit")]
    #[test_case("30s" ; "under a minute")]
    #[test_case("0" ; "no messages")]
    #[test_case("1h,2h" ; "two ages")]
    #[test_case("99999999999999999w" ; "overflow")]
    fn refuses(text: &str) {
        assert!(Retention::parse(text).is_err());
    }

    #[test]
    fn displays_what_it_parses() {
        for text in [
            "36h",
            "7d",
            "90m",
            "1000 messages",
            "2d or 10 messages",
            "forever",
        ] {
            let policy = Retention::parse(&text.replace(" or ", ",").replace(" messages", ""))
                .expect("parses");
            assert_eq!(policy.to_string(), text);
        }
    }
}
