//! UTC calendar formatting of the millisecond timestamps messages carry, for user interfaces
//! and tools, without a date crate.

/// The UTC calendar date of `at_ms` (milliseconds since the Unix epoch) as `YYYY-MM-DD`.
pub fn utc_date(at_ms: u64) -> String {
    let (y, m, d) = civil_from_days(days(at_ms));
    format!("{y:04}-{m:02}-{d:02}")
}

/// `at_ms` as an RFC 3339 UTC time to the second: `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_rfc3339(at_ms: u64) -> String {
    let secs = (at_ms / 1000) % 86_400;
    format!(
        "{}T{:02}:{:02}:{:02}Z",
        utc_date(at_ms),
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

fn days(at_ms: u64) -> i64 {
    i64::try_from(at_ms / 86_400_000).unwrap_or(i64::MAX / 2)
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day); Howard Hinnant's
/// `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates_and_times() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(1_764_201_600_000), "2025-11-27");
        assert_eq!(utc_date(951_782_400_000), "2000-02-29");
        assert_eq!(
            utc_rfc3339(1_764_201_600_000 + 3_723_000),
            "2025-11-27T01:02:03Z"
        );
    }
}
